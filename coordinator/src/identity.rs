//! Who is on the other end of a TLS connection: the names in its
//! certificate, and whether they make it the cluster node it claims to be.

use crate::NodeId;
use std::path::PathBuf;
use std::time::SystemTime;
use tonic::Status;

/// The names a certificate is known by, most specific first: URI SANs,
/// then DNS SANs, then the subject's common names. Empty for one that does
/// not parse (the TLS layer verified it already, so that is not expected).
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push((*u).to_string()),
                GeneralName::DNSName(d) => dns.push((*d).to_string()),
                _ => {}
            }
        }
    }
    let cns = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string));
    uris.into_iter().chain(dns).chain(cns).collect()
}

/// The certificate names of a request's TLS peer (empty without TLS).
pub fn peer_names<T>(req: &tonic::Request<T>) -> Vec<String> {
    req.peer_certs()
        .and_then(|certs| certs.first().map(|c| certificate_names(c.as_ref())))
        .unwrap_or_default()
}

/// Which node a certificate name stands for, by the cluster's naming rule
/// (`cluster.peer_identity`, `{id}` standing for the node id): the whole
/// name or its first DNS label must match, so `ndc-2` and
/// `ndc-2.ndc-peers.ndc.svc.cluster.local` both name node 2.
pub fn node_of(name: &str, template: &str) -> Option<NodeId> {
    let (prefix, suffix) = template.split_once("{id}")?;
    let candidates = [Some(name), name.split('.').next()];
    candidates.into_iter().flatten().find_map(|n| {
        let digits = n.strip_prefix(prefix)?.strip_suffix(suffix)?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    })
}

/// TLS between nodes: the cluster's CA, and this node's certificate and key
/// (used as a client when it calls a peer). The files are read again when
/// they change, so a rotated certificate is used on new connections.
#[derive(Debug, Clone)]
pub struct PeerTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `cluster.peer_identity`: how a node id appears in its certificate.
    pub identity: String,
}

impl PeerTls {
    pub(crate) fn stamps(&self) -> Vec<Option<SystemTime>> {
        [&self.ca, &self.cert, &self.key]
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    pub(crate) fn client_config(&self) -> std::io::Result<tonic::transport::ClientTlsConfig> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&self.ca)?))
            .identity(Identity::from_pem(
                std::fs::read(&self.cert)?,
                std::fs::read(&self.key)?,
            )))
    }

    /// Checks that a peer's request comes from the node it claims to be
    /// (`claimed`), or, with `None`, from some node of the cluster.
    pub fn check<T>(&self, req: &tonic::Request<T>, claimed: Option<NodeId>) -> Result<(), Status> {
        let names = peer_names(req);
        let ids: Vec<NodeId> = names
            .iter()
            .filter_map(|n| node_of(n, &self.identity))
            .collect();
        let ok = match claimed {
            Some(id) => ids.contains(&id),
            None => !ids.is_empty(),
        };
        if ok {
            return Ok(());
        }
        metrics::counter!(crate::metric::PEER_REFUSED).increment(1);
        let who = names.first().map_or("a peer without a certificate", |n| n);
        let what = match claimed {
            Some(id) => format!("node {id}"),
            None => "a cluster node".to_string(),
        };
        tracing::warn!(peer = %who, claimed = ?claimed, "peer refused: its certificate does not name the node it claims to be");
        Err(Status::permission_denied(format!(
            "{who} may not speak for {what} (cluster.peer_identity {:?})",
            self.identity
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_the_template_by_whole_name_or_first_label() {
        assert_eq!(node_of("ndc-2", "ndc-{id}"), Some(2));
        assert_eq!(node_of("ndc-12.ndc-peers.ndc.svc", "ndc-{id}"), Some(12));
        assert_eq!(
            node_of("spiffe://gov/node/3", "spiffe://gov/node/{id}"),
            Some(3)
        );
        assert_eq!(node_of("ndc-", "ndc-{id}"), None);
        assert_eq!(node_of("ndc-2x", "ndc-{id}"), None);
        assert_eq!(node_of("xndc-2", "ndc-{id}"), None);
        assert_eq!(node_of("admin", "ndc-{id}"), None);
        assert_eq!(node_of("ndc-1", "no placeholder"), None);
    }
}
