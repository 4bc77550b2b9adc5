//! The `ndc.v1.Access` API: grants made, revoked and listed by admins (the
//! server side), and the client calls behind `ndc access`.

use crate::client::ClientTls;
use crate::serving::access::{self, Authenticator, GrantWriteError, Via, now_ms};
use crate::serving::audit::{Audit, Event};
use ndc_coordinator::{FORWARDED, forwarded};
use ndc_coordinator::{Grant, Role, RowFilter};
use ndc_operators::masking::{Level, Policy};
use ndc_proto::v1::access_client::AccessClient;
use ndc_proto::v1::access_server::Access;
use ndc_proto::v1::{
    GrantInfo, GrantRequest, GrantResponse, ListGrantsRequest, ListGrantsResponse, RevokeRequest,
    RevokeResponse, WhoAmIRequest, WhoAmIResponse,
};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use tracing::info;

pub struct AccessService {
    auth: Arc<Authenticator>,
    /// How this node reaches the leader's peer listener to forward writes.
    peer_tls: ClientTls,
    audit: Audit,
}

impl AccessService {
    pub fn new(auth: Arc<Authenticator>, peer_tls: ClientTls, audit: Audit) -> Self {
        AccessService {
            auth,
            peer_tls,
            audit,
        }
    }

    /// Records a change of access on the node the admin called (a
    /// forwarded request was recorded there already).
    async fn audit(&self, forwarded: bool, event: Event) -> Result<(), Status> {
        if forwarded {
            return Ok(());
        }
        self.audit.record(event).await.map_err(|e| {
            Status::internal(format!(
                "done, but not recorded in the audit trail: {e}; the node's operators must look at it"
            ))
        })
    }

    /// Waits until this node enforces what was just written (a cluster
    /// applies it from the replicated log, on every node).
    async fn wait_applied(&self, ok: impl Fn(&Authenticator) -> bool) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !ok(&self.auth) {
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(
                    "written, but this node does not enforce it yet; see ndc access list",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// The wire form of a grant.
pub fn info_of(g: &Grant, configured: bool) -> GrantInfo {
    GrantInfo {
        principal: g.principal.clone(),
        role: g.role.as_str().into(),
        views: g.views.clone(),
        row_filter: g.row_filter.as_ref().map(|f| ndc_proto::v1::RowFilter {
            column: f.column.clone(),
            values: f.values.clone(),
        }),
        columns: g.columns.clone(),
        purpose: g.purpose.clone(),
        expires_at_ms: g.expires_at_ms.unwrap_or(0),
        granted_by: g.granted_by.clone(),
        granted_at_ms: g.granted_at_ms,
        configured,
        clearance: g
            .clearance
            .map(|l| l.as_str().to_string())
            .unwrap_or_default(),
        masking: g
            .masking
            .iter()
            .map(|(l, p)| (l.as_str().to_string(), policy_name(*p)))
            .collect(),
    }
}

/// A grant from its wire form, checked.
fn grant_of(info: GrantInfo) -> Result<Grant, Status> {
    let bad = |m: String| Status::invalid_argument(m);
    let principal = info.principal.trim().to_string();
    if principal.is_empty() {
        return Err(bad("a grant names its principal".into()));
    }
    let role: Role = info.role.parse().map_err(bad)?;
    if info.purpose.trim().is_empty() {
        return Err(bad(
            "a grant states its purpose (why the principal reads this data)".into(),
        ));
    }
    if role == Role::Subscriber && info.views.is_empty() {
        return Err(bad(
            "a subscriber's grant names the views it may read".into()
        ));
    }
    if info.views.iter().any(|v| v.trim().is_empty()) {
        return Err(bad("a view name is empty".into()));
    }
    let row_filter = match info.row_filter {
        None => None,
        Some(f) if f.column.trim().is_empty() || f.values.is_empty() => {
            return Err(bad(
                "a row filter names a column and at least one value".into()
            ));
        }
        Some(f) => Some(RowFilter {
            column: f.column,
            values: f.values,
        }),
    };
    let expires_at_ms = (info.expires_at_ms > 0).then_some(info.expires_at_ms);
    if expires_at_ms.is_some_and(|t| t <= now_ms()) {
        return Err(bad("the grant's expiry is in the past".into()));
    }
    Ok(Grant {
        principal,
        role,
        views: info.views,
        row_filter,
        columns: info.columns,
        purpose: info.purpose,
        expires_at_ms,
        granted_by: info.granted_by,
        granted_at_ms: info.granted_at_ms,
        clearance: match info.clearance.trim() {
            "" => None,
            l => Some(l.parse::<Level>().map_err(bad)?),
        },
        masking: info
            .masking
            .iter()
            .map(|(l, p)| Ok((l.parse::<Level>()?, parse_policy(p)?)))
            .collect::<Result<_, String>>()
            .map_err(bad)?,
    })
}

fn policy_name(p: Policy) -> String {
    match p {
        Policy::Deliver => "deliver".into(),
        Policy::Redact => "redact".into(),
        Policy::Null => "null".into(),
        Policy::Hash => "hash".into(),
        Policy::Partial(n) => format!("partial:{n}"),
        Policy::Year => "year".into(),
    }
}

/// A masking policy by name: redact, null, hash, partial:N, year.
pub fn parse_policy(text: &str) -> Result<Policy, String> {
    match text.trim() {
        "redact" => Ok(Policy::Redact),
        "null" => Ok(Policy::Null),
        "hash" => Ok(Policy::Hash),
        "year" => Ok(Policy::Year),
        other => other
            .strip_prefix("partial:")
            .and_then(|n| n.parse().ok())
            .map(Policy::Partial)
            .ok_or_else(|| {
                format!("unknown masking {other:?} (redact, null, hash, partial:N or year)")
            }),
    }
}

impl AccessService {
    async fn leader(&self, addr: &str) -> Result<AccessClient<tonic::transport::Channel>, Status> {
        crate::client::channel(addr, Some(&self.peer_tls))
            .await
            .map(AccessClient::new)
            .map_err(|e| Status::unavailable(format!("cannot reach the leader at {addr}: {e:#}")))
    }

    fn write_error<T>(&self, req: &Request<T>, e: GrantWriteError) -> Result<String, Status> {
        match e {
            GrantWriteError::NotLeader {
                leader: Some((_, addr)),
            } if req.metadata().get(FORWARDED).is_none() => Ok(addr),
            GrantWriteError::NotLeader { .. } => Err(Status::unavailable(
                "no leader to write the grant; retry shortly",
            )),
            GrantWriteError::Refused(m) => Err(Status::not_found(m)),
            GrantWriteError::Failed(m) => Err(Status::unavailable(m)),
        }
    }
}

#[tonic::async_trait]
impl Access for AccessService {
    async fn grant(&self, req: Request<GrantRequest>) -> Result<Response<GrantResponse>, Status> {
        let caller = access::caller(&req)?;
        let recorded = crate::serving::audit::recorded_by_forwarder(&req);
        let info = req
            .get_ref()
            .grant
            .clone()
            .ok_or_else(|| Status::invalid_argument("no grant in the request"))?;
        let mut grant = grant_of(info)?;
        // A forwarding node already recorded who granted it and when.
        if caller.via != Via::Peer {
            grant.granted_by = caller.principal.clone();
            grant.granted_at_ms = now_ms();
        }
        if let Err(e) = self.auth.grants.put(grant.clone()).await {
            let addr = self.write_error(&req, e)?;
            self.leader(&addr)
                .await?
                .grant(forwarded(
                    GrantRequest {
                        grant: Some(info_of(&grant, false)),
                    },
                    Duration::from_secs(30),
                ))
                .await?;
        }
        let want = grant.clone();
        self.wait_applied(move |a| a.grants.all().get(&want.principal) == Some(&want))
            .await?;
        info!(principal = %grant.principal, role = grant.role.as_str(), views = ?grant.views,
              purpose = %grant.purpose, granted_by = %grant.granted_by, "grant made");
        self.audit(
            recorded,
            Event::Grant {
                by: caller.principal.clone(),
                principal: grant.principal.clone(),
                grant: serde_json::to_string(&grant).unwrap_or_default(),
            },
        )
        .await?;
        Ok(Response::new(GrantResponse {
            grant: Some(info_of(
                &grant,
                self.auth.is_configured_admin(&grant.principal),
            )),
        }))
    }

    async fn revoke(
        &self,
        req: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let caller = access::caller(&req)?;
        let recorded = crate::serving::audit::recorded_by_forwarder(&req);
        let principal = req.get_ref().principal.trim().to_string();
        if principal.is_empty() {
            return Err(Status::invalid_argument("name the principal to revoke"));
        }
        if let Err(e) = self.auth.grants.revoke(&principal).await {
            let addr = self.write_error(&req, e)?;
            self.leader(&addr)
                .await?
                .revoke(forwarded(
                    RevokeRequest {
                        principal: principal.clone(),
                    },
                    Duration::from_secs(30),
                ))
                .await?;
        }
        let p = principal.clone();
        self.wait_applied(move |a| !a.grants.all().contains_key(&p))
            .await?;
        info!(principal = %principal, revoked_by = %caller.principal, "grant revoked");
        self.audit(
            recorded,
            Event::Revoke {
                by: caller.principal.clone(),
                principal,
            },
        )
        .await?;
        Ok(Response::new(RevokeResponse { existed: true }))
    }

    async fn list(
        &self,
        _: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        let stored = self.auth.grants.all();
        let mut grants: Vec<GrantInfo> = stored
            .values()
            .map(|g| info_of(g, self.auth.is_configured_admin(&g.principal)))
            .collect();
        for admin in self.auth.configured_admins() {
            if !stored.contains_key(admin)
                && let Some(g) = self.auth.effective_grant(admin)
            {
                grants.push(info_of(&g, true));
            }
        }
        grants.sort_by(|a, b| a.principal.cmp(&b.principal));
        Ok(Response::new(ListGrantsResponse { grants }))
    }

    async fn who_am_i(
        &self,
        req: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let caller = access::caller(&req)?;
        Ok(Response::new(WhoAmIResponse {
            grant: caller
                .grant
                .as_ref()
                .map(|g| info_of(g, self.auth.is_configured_admin(&g.principal))),
            principal: caller.principal,
            authenticated_by: caller.via.as_str().into(),
        }))
    }
}

async fn client(
    addr: &str,
    tls: Option<&ClientTls>,
) -> anyhow::Result<AccessClient<crate::client::Connection>> {
    Ok(AccessClient::new(crate::client::connect(addr, tls).await?))
}

fn refused(s: Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// `ndc access grant`.
pub async fn grant(
    addr: &str,
    tls: Option<&ClientTls>,
    grant: GrantInfo,
) -> anyhow::Result<GrantInfo> {
    client(addr, tls)
        .await?
        .grant(GrantRequest { grant: Some(grant) })
        .await
        .map_err(refused)?
        .into_inner()
        .grant
        .ok_or_else(|| anyhow::anyhow!("the node answered without the grant"))
}

/// `ndc access revoke`.
pub async fn revoke(addr: &str, tls: Option<&ClientTls>, principal: &str) -> anyhow::Result<()> {
    client(addr, tls)
        .await?
        .revoke(RevokeRequest {
            principal: principal.into(),
        })
        .await
        .map_err(refused)?;
    Ok(())
}

/// `ndc access list`.
pub async fn list(addr: &str, tls: Option<&ClientTls>) -> anyhow::Result<Vec<GrantInfo>> {
    Ok(client(addr, tls)
        .await?
        .list(ListGrantsRequest {})
        .await
        .map_err(refused)?
        .into_inner()
        .grants)
}

/// `ndc access whoami`.
pub async fn who_am_i(addr: &str, tls: Option<&ClientTls>) -> anyhow::Result<WhoAmIResponse> {
    Ok(client(addr, tls)
        .await?
        .who_am_i(WhoAmIRequest {})
        .await
        .map_err(refused)?
        .into_inner())
}

/// A grant as one JSON line.
pub fn grant_json(g: &GrantInfo) -> serde_json::Value {
    serde_json::json!({
        "principal": g.principal,
        "role": g.role,
        "views": g.views,
        "row_filter": g.row_filter.as_ref().map(|f| serde_json::json!({"column": f.column, "values": f.values})),
        "columns": g.columns,
        "purpose": g.purpose,
        "expires_at_ms": (g.expires_at_ms > 0).then_some(g.expires_at_ms),
        "granted_by": g.granted_by,
        "granted_at_ms": g.granted_at_ms,
        "clearance": (!g.clearance.is_empty()).then_some(&g.clearance),
        "masking": g.masking,
        "configured": g.configured,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_policies_read_as_the_command_line_writes_them() {
        for (text, policy) in [
            ("redact", Policy::Redact),
            ("null", Policy::Null),
            ("hash", Policy::Hash),
            ("partial:4", Policy::Partial(4)),
            ("year", Policy::Year),
        ] {
            assert_eq!(parse_policy(text), Ok(policy));
            assert_eq!(policy_name(policy), text);
        }
        assert!(parse_policy("partial:x").is_err());
        assert!(parse_policy("scramble").is_err());
        for level in [
            Level::Public,
            Level::Internal,
            Level::Confidential,
            Level::Secret,
        ] {
            assert_eq!(level.as_str().parse::<Level>(), Ok(level));
        }
        assert!("top-secret".parse::<Level>().is_err());
    }
}
