//! `ndc certs dev`: a development CA and the certificates a newcomer needs
//! to run ndc with TLS on — a node's (server and client use, for 127.0.0.1
//! and localhost plus any names given), an admin's and a subscriber's
//! (client use). Not for production: the CA's key sits beside the
//! certificates; production certificates come from the agency's CA (for
//! example through cert-manager, docs/security.md).

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// Why the certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error(
        "{0} exists: ndc certs dev does not overwrite certificates (remove the directory, or choose another --out)"
    )]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// What [`make_dev_certificates`] wrote, by role.
#[derive(Debug, Clone)]
pub struct DevCertificates {
    pub ca: PathBuf,
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub subscriber_cert: PathBuf,
    pub subscriber_key: PathBuf,
}

impl DevCertificates {
    /// The files of a directory [`make_dev_certificates`] wrote into.
    pub fn in_dir(dir: &Path) -> DevCertificates {
        DevCertificates {
            ca: dir.join("ca.pem"),
            node_cert: dir.join("node.pem"),
            node_key: dir.join("node.key"),
            admin_cert: dir.join("admin.pem"),
            admin_key: dir.join("admin.key"),
            subscriber_cert: dir.join("subscriber.pem"),
            subscriber_key: dir.join("subscriber.key"),
        }
    }
}

/// Writes a development CA (`ca.pem`, `ca.key`) and, signed by it,
/// `node.pem`/`node.key` (for 127.0.0.1, localhost and `node_names`),
/// `admin.pem`/`admin.key` and `subscriber.pem`/`subscriber.key`, valid for
/// `days` from an hour ago. Keys are written readable by their owner only.
pub fn make_dev_certificates(
    dir: &Path,
    node_names: &[String],
    days: u32,
) -> Result<DevCertificates, CertsError> {
    make_dev_cluster_certificates(dir, node_names, days, 0).map(|(files, _)| files)
}

/// [`make_dev_certificates`], and for each of nodes `0..nodes` of a cluster
/// `ndc-N.pem`/`ndc-N.key`: server and client use, naming `ndc-N` (CN and
/// DNS SAN, as the default `cluster.peer_identity` expects), 127.0.0.1,
/// localhost and `node_names`.
pub fn make_dev_cluster_certificates(
    dir: &Path,
    node_names: &[String],
    days: u32,
    nodes: u32,
) -> Result<(DevCertificates, Vec<(PathBuf, PathBuf)>), CertsError> {
    let files = DevCertificates::in_dir(dir);
    if files.ca.exists() {
        return Err(CertsError::Exists(files.ca));
    }
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let now = time::OffsetDateTime::now_utc();
    let validity = |params: &mut CertificateParams| {
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(i64::from(days));
    };

    let ca_key = KeyPair::generate()?;
    write(&dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ndc development CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params);
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;
    write(&files.ca, &ca.pem(), false)?;

    let leaf = |name: &str,
                sans: Vec<String>,
                usages: Vec<ExtendedKeyUsagePurpose>,
                cert: &Path,
                key_path: &Path|
     -> Result<(), CertsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages;
        validity(&mut params);
        let signed = params.signed_by(&key, &ca)?;
        write(key_path, &key.serialize_pem(), true)?;
        write(cert, &signed.pem(), false)
    };
    let mut sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    sans.extend(node_names.iter().cloned());
    leaf(
        "ndc-node",
        sans,
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        &files.node_cert,
        &files.node_key,
    )?;
    let mut cluster = Vec::new();
    for id in 0..nodes {
        let name = format!("ndc-{id}");
        let mut sans = vec![
            name.clone(),
            "127.0.0.1".to_string(),
            "localhost".to_string(),
        ];
        sans.extend(node_names.iter().cloned());
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        leaf(
            &name,
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            &cert,
            &key,
        )?;
        cluster.push((cert, key));
    }
    leaf(
        "admin",
        Vec::new(),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        &files.admin_cert,
        &files.admin_key,
    )?;
    leaf(
        "subscriber",
        Vec::new(),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        &files.subscriber_cert,
        &files.subscriber_key,
    )?;
    Ok((files, cluster))
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), CertsError> {
    use std::io::Write;
    let error = |source| CertsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let _ = secret;
    let mut file = options.open(path).map_err(error)?;
    file.write_all(text.as_bytes()).map_err(error)
}
