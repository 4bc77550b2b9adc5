//! Who is calling, and what they may do.
//!
//! Every request to the public gRPC listener passes the [`Gate`]: it names
//! the caller (a bearer token's `sub`, else the client certificate's URI or
//! DNS SAN, else its CN), finds the caller's grant, checks the role the
//! method needs, and hands the [`Caller`] on to the service in the request's
//! extensions. Services then check views, rows and columns against the
//! caller's grant. Requests to the peer listener pass a gate that lets in
//! only nodes of the cluster.
//!
//! Grants live in the replicated cluster state (a single node keeps them in
//! `<data_dir>/grants.json`) and every node enforces the same ones; a
//! revoked or expired grant ends its streams ([`Grants::until_revoked`]).

use crate::config::{AccessSection, JwtIssuerConfig, TlsSection};
use crate::telemetry::metric;
use ndc_coordinator::{Coordinator, Grant, PeerTls, Role, RowFilter};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tonic::Status;
use tracing::{info, warn};

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Certificate,
    Token,
    /// No credentials, let in by `access.anonymous` (development nodes).
    Anonymous,
    /// Another node of the cluster, on the peer listener.
    Peer,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Certificate => "certificate",
            Via::Token => "token",
            Via::Anonymous => "anonymous",
            Via::Peer => "peer",
        }
    }
}

/// An authenticated caller and the grant it had when its request came in.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: String,
    pub via: Via,
    /// `None`: authenticated, but granted nothing.
    pub grant: Option<Grant>,
    /// A token's `exp` (Unix ms): the caller's streams end then.
    pub token_expires_at_ms: Option<u64>,
}

impl Caller {
    pub fn role(&self) -> Option<Role> {
        self.grant.as_ref().map(|g| g.role)
    }

    /// Whether the grant lets the caller read `view`.
    pub fn may_read(&self, view: &str) -> bool {
        self.grant.as_ref().is_some_and(|g| grants_view(g, view))
    }
}

/// Whether a grant names `view` (or every view).
pub fn grants_view(grant: &Grant, view: &str) -> bool {
    grant.views.iter().any(|v| v == "*" || v == view)
}

/// The caller a service was handed by the gate. A request that did not pass
/// a gate (a service built without one) is refused.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
    req.extensions().get::<Caller>().cloned().ok_or_else(|| {
        Status::unauthenticated("no caller identity (request did not pass the gate)")
    })
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why the access configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("access.jwt: cannot read key file {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("access.jwt: key file {path}: {message}")]
    BadKey { path: PathBuf, message: String },
    #[error("cannot read the grants in {path}: {message}")]
    Grants { path: PathBuf, message: String },
}

/// A verification key of an issuer, with the algorithms it can check.
struct IssuerKey {
    kid: Option<String>,
    key: jsonwebtoken::DecodingKey,
    algorithms: Vec<jsonwebtoken::Algorithm>,
}

struct Issuer {
    config: JwtIssuerConfig,
    keys: Vec<IssuerKey>,
}

fn family(kind: &str) -> Vec<jsonwebtoken::Algorithm> {
    use jsonwebtoken::Algorithm::*;
    match kind {
        "rsa" => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        "ec" => vec![ES256, ES384],
        _ => vec![EdDSA],
    }
}

fn load_keys(path: &Path) -> Result<Vec<IssuerKey>, AccessError> {
    use jsonwebtoken::DecodingKey;
    let bytes = std::fs::read(path).map_err(|source| AccessError::ReadKey {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |message: String| AccessError::BadKey {
        path: path.to_path_buf(),
        message,
    };
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a JWKS document: {e}")))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            use jsonwebtoken::jwk::AlgorithmParameters as P;
            let kind = match &jwk.algorithm {
                P::RSA(_) => "rsa",
                P::EllipticCurve(_) => "ec",
                P::OctetKeyPair(_) => "ed",
                // Shared secrets are no identity provider's public keys.
                P::OctetKey(_) => continue,
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
            keys.push(IssuerKey {
                kid: jwk.common.key_id.clone(),
                key,
                algorithms: family(kind),
            });
        }
        if keys.is_empty() {
            return Err(bad("no RSA, EC or Ed25519 key in it".into()));
        }
        return Ok(keys);
    }
    type Parse = fn(&[u8]) -> Result<DecodingKey, jsonwebtoken::errors::Error>;
    let attempts: [(&str, Parse); 3] = [
        ("rsa", DecodingKey::from_rsa_pem),
        ("ec", DecodingKey::from_ec_pem),
        ("ed", DecodingKey::from_ed_pem),
    ];
    for (kind, parse) in attempts {
        if let Ok(key) = parse(&bytes) {
            return Ok(vec![IssuerKey {
                kid: None,
                key,
                algorithms: family(kind),
            }]);
        }
    }
    Err(bad(
        "neither a PEM public key (RSA, EC, Ed25519) nor a JWKS document".into(),
    ))
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

fn load_issuers(configs: &[JwtIssuerConfig]) -> Result<Vec<Issuer>, AccessError> {
    let mut issuers = Vec::new();
    for config in configs {
        let mut keys = Vec::new();
        for path in &config.keys {
            keys.extend(load_keys(path)?);
        }
        issuers.push(Issuer {
            config: config.clone(),
            keys,
        });
    }
    Ok(issuers)
}

/// When each key file was last modified (`None`: unreadable now).
fn key_stamps(configs: &[JwtIssuerConfig]) -> Vec<Option<std::time::SystemTime>> {
    configs
        .iter()
        .flat_map(|c| &c.keys)
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Names callers: certificates, tokens, or (development) nobody.
pub struct Authenticator {
    /// Issuers with their keys, read again when a key file changes (an
    /// identity provider rotating its signing keys).
    issuers: std::sync::RwLock<Arc<Vec<Issuer>>>,
    jwt: Vec<JwtIssuerConfig>,
    stamps: std::sync::Mutex<Vec<Option<std::time::SystemTime>>>,
    admins: BTreeSet<String>,
    anonymous: bool,
    pub grants: Grants,
}

impl Authenticator {
    /// A refusal for want of a grant: `PERMISSION_DENIED` with `message` —
    /// unless this node has not yet caught up with the cluster's grants (a
    /// new node, a lost disk), where the grant may well exist: then
    /// `UNAVAILABLE`, so that a client retries or moves to another node
    /// instead of giving up. Every service refuses through this.
    pub fn not_granted(&self, message: String) -> Status {
        if self.grants.settled() {
            Status::permission_denied(message)
        } else {
            Status::unavailable(
                "this node is catching up with the cluster's grants; retry, or use another node",
            )
        }
    }

    pub fn new(
        access: &AccessSection,
        tls: &TlsSection,
        grants: Grants,
    ) -> Result<Authenticator, AccessError> {
        let stamps = key_stamps(&access.jwt);
        let issuers = load_issuers(&access.jwt)?;
        Ok(Authenticator {
            issuers: std::sync::RwLock::new(Arc::new(issuers)),
            jwt: access.jwt.clone(),
            stamps: std::sync::Mutex::new(stamps),
            admins: access.admins.iter().cloned().collect(),
            anonymous: access.anonymous_allowed(tls),
            grants,
        })
    }

    /// Reads the key files again if any changed since they were last read;
    /// keys that cannot be read keep the previous ones in force.
    pub fn reload_keys_if_changed(&self) {
        let now = key_stamps(&self.jwt);
        let Ok(mut seen) = self.stamps.lock() else {
            return;
        };
        if *seen == now {
            return;
        }
        *seen = now;
        match load_issuers(&self.jwt) {
            Ok(issuers) => {
                if let Ok(mut current) = self.issuers.write() {
                    *current = Arc::new(issuers);
                }
                metrics::counter!(metric::JWT_KEY_RELOADS, "outcome" => "reloaded").increment(1);
                info!("access.jwt key files changed: reloaded");
            }
            Err(e) => {
                metrics::counter!(metric::JWT_KEY_RELOADS, "outcome" => "failed").increment(1);
                warn!(error = %e, "access.jwt key files changed but cannot be used; keeping the previous keys");
            }
        }
    }

    /// Checks the key files every `interval` until `stop`.
    pub async fn watch_keys(
        self: Arc<Self>,
        interval: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        if self.jwt.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.reload_keys_if_changed(),
            }
        }
    }

    /// The principal of a bearer token, and when the token expires.
    fn verify_token(&self, token: &str) -> Result<(String, u64), Status> {
        let refuse = |why: &str| Status::unauthenticated(format!("bearer token refused: {why}"));
        let issuers = match self.issuers.read() {
            Ok(i) => i.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        if issuers.is_empty() {
            return Err(refuse("this node accepts no tokens (access.jwt is empty)"));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| refuse("not a JWT"))?;
        let mut last = refuse("no configured issuer's key verifies it");
        for issuer in issuers.iter() {
            for key in &issuer.keys {
                if !key.algorithms.contains(&header.alg) {
                    continue;
                }
                if let (Some(want), Some(have)) = (&header.kid, &key.kid)
                    && want != have
                {
                    continue;
                }
                let mut v = jsonwebtoken::Validation::new(header.alg);
                v.set_issuer(&[&issuer.config.issuer]);
                v.set_audience(&issuer.config.audiences);
                v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
                v.leeway = issuer.config.leeway.as_secs();
                v.validate_nbf = true;
                match jsonwebtoken::decode::<Claims>(token, &key.key, &v) {
                    Ok(data) => {
                        if data.claims.sub.trim().is_empty() {
                            return Err(refuse("its sub is empty"));
                        }
                        return Ok((data.claims.sub, data.claims.exp.saturating_mul(1000)));
                    }
                    Err(e) => {
                        use jsonwebtoken::errors::ErrorKind as K;
                        let why = match e.kind() {
                            K::ExpiredSignature => "it has expired",
                            K::ImmatureSignature => "it is not valid yet (nbf)",
                            K::InvalidAudience => "it is meant for another audience",
                            K::InvalidIssuer => "its issuer is not configured",
                            K::InvalidSignature => "its signature does not verify",
                            K::MissingRequiredClaim(_) => "it lacks exp, iss, aud or sub",
                            _ => "it does not verify",
                        };
                        last = refuse(why);
                    }
                }
            }
        }
        Err(last)
    }

    /// The grant in force for `principal` now (configured admins keep the
    /// admin role whatever the grants say).
    pub fn effective_grant(&self, principal: &str) -> Option<Grant> {
        let stored = self.grants.current(principal);
        if self.admins.contains(principal) {
            let mut g = stored.unwrap_or_else(|| Grant {
                principal: principal.to_string(),
                role: Role::Admin,
                views: Vec::new(),
                row_filter: None,
                columns: Vec::new(),
                purpose: "access.admins".into(),
                expires_at_ms: None,
                granted_by: "configuration".into(),
                granted_at_ms: 0,
                clearance: None,
                masking: Default::default(),
            });
            g.role = Role::Admin;
            g.expires_at_ms = None;
            return Some(g);
        }
        stored
    }

    /// Whether `principal` is an admin by configuration.
    pub fn is_configured_admin(&self, principal: &str) -> bool {
        self.admins.contains(principal)
    }

    pub fn configured_admins(&self) -> impl Iterator<Item = &String> {
        self.admins.iter()
    }

    /// Names the caller of a request to the public listener.
    fn authenticate<B>(&self, req: &http::Request<B>) -> Result<Caller, Status> {
        if let Some(value) = req.headers().get(http::header::AUTHORIZATION) {
            let text = value
                .to_str()
                .map_err(|_| Status::unauthenticated("authorization header is not text"))?;
            let token = text
                .strip_prefix("Bearer ")
                .or_else(|| text.strip_prefix("bearer "))
                .ok_or_else(|| {
                    Status::unauthenticated("authorization header is not a Bearer token")
                })?;
            let (principal, expires) = self.verify_token(token.trim())?;
            return Ok(Caller {
                grant: self.effective_grant(&principal),
                principal,
                via: Via::Token,
                token_expires_at_ms: Some(expires),
            });
        }
        let names = tls_peer_names(req);
        if let Some(principal) = names.into_iter().next() {
            return Ok(Caller {
                grant: self.effective_grant(&principal),
                principal,
                via: Via::Certificate,
                token_expires_at_ms: None,
            });
        }
        if self.anonymous {
            return Ok(anonymous());
        }
        Err(Status::unauthenticated(
            "no client certificate and no bearer token: this node serves known callers only",
        ))
    }
}

/// Who an anonymous caller is on a development node (`access.anonymous`).
fn anonymous() -> Caller {
    Caller {
        principal: "anonymous".into(),
        via: Via::Anonymous,
        grant: Some(Grant {
            principal: "anonymous".into(),
            role: Role::Admin,
            views: vec!["*".into()],
            row_filter: None,
            columns: Vec::new(),
            purpose: "development node (access.anonymous)".into(),
            expires_at_ms: None,
            granted_by: "configuration".into(),
            granted_at_ms: 0,
            clearance: None,
            masking: Default::default(),
        }),
        token_expires_at_ms: None,
    }
}

/// Certificate names of the TLS client of an HTTP request, most specific first.
fn tls_peer_names<B>(req: &http::Request<B>) -> Vec<String> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .and_then(|certs| {
            certs
                .first()
                .map(|c| ndc_coordinator::identity::certificate_names(c.as_ref()))
        })
        .unwrap_or_default()
}

/// What a method of the public API asks of its caller.
enum Need {
    /// Health checks and reflection: anyone who completed the handshake.
    Open,
    /// Any known caller; the service checks views.
    Known,
    Role(Role),
    /// Peer traffic: never on the public listener.
    PeerOnly,
}

fn need(path: &str) -> Need {
    match path {
        p if p.starts_with("/grpc.health.") || p.starts_with("/grpc.reflection.") => Need::Open,
        "/ndc.v1.Subscription/Subscribe"
        | "/ndc.v1.Subscription/ListViews"
        | "/ndc.v1.Access/WhoAmI" => Need::Known,
        "/ndc.v1.Pipelines/List" | "/ndc.cluster.v1.Cluster/Status" => Need::Role(Role::Operator),
        "/ndc.cluster.v1.Cluster/Heartbeat" => Need::PeerOnly,
        p if p.starts_with("/ndc.cluster.v1.Raft/") => Need::PeerOnly,
        // Everything else (pipeline and cluster changes, grants, and any
        // method added later) is for admins until said otherwise.
        _ => Need::Role(Role::Admin),
    }
}

/// Which listener a gate guards.
#[derive(Clone)]
enum Side {
    Public(Arc<Authenticator>),
    /// Other nodes only; with TLS, their certificates must name a node.
    Peer(Option<PeerTls>),
}

/// The tower layer that authenticates and authorizes every request of a
/// listener before any service sees it.
#[derive(Clone)]
pub struct Gate {
    side: Side,
}

impl Gate {
    pub fn public(auth: Arc<Authenticator>) -> Gate {
        Gate {
            side: Side::Public(auth),
        }
    }

    pub fn peer(tls: Option<PeerTls>) -> Gate {
        Gate {
            side: Side::Peer(tls),
        }
    }

    fn admit<B>(&self, req: &mut http::Request<B>) -> Result<(), Status> {
        let path = req.uri().path().to_string();
        let caller = match &self.side {
            Side::Peer(tls) => peer_caller(req, tls.as_ref())?,
            Side::Public(auth) => {
                let need = need(&path);
                if matches!(need, Need::Open) {
                    return Ok(());
                }
                if matches!(need, Need::PeerOnly) {
                    return Err(Status::permission_denied(
                        "peer traffic is taken on the peer listener only (node.peer_listen)",
                    ));
                }
                let caller = auth.authenticate(req)?;
                if let Need::Role(role) = need {
                    let has = caller.role();
                    let expired = caller
                        .grant
                        .as_ref()
                        .and_then(|g| g.expires_at_ms)
                        .is_some_and(|t| t <= now_ms());
                    if expired || has.is_none_or(|r| r < role) {
                        return Err(auth.not_granted(format!(
                            "{} ({}) may not call {path}: it needs the {} role{}",
                            caller.principal,
                            caller.via.as_str(),
                            role.as_str(),
                            match (has, expired) {
                                (_, true) => ", and its grant has expired".to_string(),
                                (Some(r), _) => format!(", and has {}", r.as_str()),
                                (None, _) => ", and has no grant".to_string(),
                            }
                        )));
                    }
                }
                caller
            }
        };
        req.extensions_mut().insert(caller);
        Ok(())
    }
}

/// A node calling on the peer listener.
fn peer_caller<B>(req: &http::Request<B>, tls: Option<&PeerTls>) -> Result<Caller, Status> {
    let principal = match tls {
        None => "peer".to_string(),
        Some(tls) => {
            let names = tls_peer_names(req);
            let node = names
                .iter()
                .find_map(|n| ndc_coordinator::identity::node_of(n, &tls.identity));
            match node {
                Some(id) => format!("node {id}"),
                None => {
                    metrics::counter!(ndc_coordinator::metric::PEER_REFUSED).increment(1);
                    return Err(Status::permission_denied(format!(
                        "{} is not a node of this cluster (cluster.peer_identity {:?})",
                        names
                            .first()
                            .map_or("a caller without a certificate", |n| n),
                        tls.identity
                    )));
                }
            }
        }
    };
    Ok(Caller {
        grant: Some(Grant {
            principal: principal.clone(),
            role: Role::Admin,
            views: vec!["*".into()],
            row_filter: None,
            columns: Vec::new(),
            purpose: "cluster peer".into(),
            expires_at_ms: None,
            granted_by: "cluster".into(),
            granted_at_ms: 0,
            clearance: None,
            masking: Default::default(),
        }),
        principal,
        via: Via::Peer,
        token_expires_at_ms: None,
    })
}

impl<S> tower::Layer<S> for Gate {
    type Service = Gated<S>;
    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            gate: self.clone(),
            inner,
        }
    }
}

/// A service behind a [`Gate`].
#[derive(Clone)]
pub struct Gated<S> {
    gate: Gate,
    inner: S,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Gated<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        match self.gate.admit(&mut req) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => {
                let reason = match status.code() {
                    tonic::Code::Unauthenticated => "unauthenticated",
                    tonic::Code::Unavailable => "catching_up",
                    _ => "permission_denied",
                };
                metrics::counter!(metric::ACCESS_DENIED, "reason" => reason).increment(1);
                info!(
                    method = req.uri().path(),
                    reason,
                    message = status.message(),
                    "request refused"
                );
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The grants in force, and where changes to them go.
#[derive(Clone)]
pub struct Grants {
    rx: watch::Receiver<Arc<BTreeMap<String, Grant>>>,
    writer: Writer,
}

#[derive(Clone)]
enum Writer {
    /// A single node: a JSON file in the data directory.
    Local {
        path: PathBuf,
        tx: Arc<watch::Sender<Arc<BTreeMap<String, Grant>>>>,
        lock: Arc<tokio::sync::Mutex<()>>,
    },
    /// Through Raft (the leader; see [`GrantWriteError::NotLeader`]).
    Cluster(Coordinator),
}

/// Why a grant could not be written here.
#[derive(Debug, thiserror::Error)]
pub enum GrantWriteError {
    #[error("not the leader")]
    NotLeader { leader: Option<(u64, String)> },
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

impl Grants {
    /// A single node's grants, from `<data_dir>/grants.json`.
    pub fn local(data_dir: &Path) -> Result<Grants, AccessError> {
        let path = data_dir.join("grants.json");
        let map: BTreeMap<String, Grant> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AccessError::Grants {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(AccessError::Grants {
                    path,
                    message: e.to_string(),
                });
            }
        };
        let (tx, rx) = watch::channel(Arc::new(map));
        Ok(Grants {
            rx,
            writer: Writer::Local {
                path,
                tx: Arc::new(tx),
                lock: Arc::new(tokio::sync::Mutex::new(())),
            },
        })
    }

    /// Whether these grants are the cluster's (a single node's always are):
    /// a cluster member that has not yet caught up with the replicated
    /// state may lack a grant the cluster has, so its refusals are "not
    /// yet" (UNAVAILABLE), not "no".
    pub fn settled(&self) -> bool {
        match &self.writer {
            Writer::Local { .. } => true,
            Writer::Cluster(c) => c.caught_up(),
        }
    }

    /// A cluster member's grants: the replicated ones, followed as they change.
    pub fn replicated(coordinator: Coordinator) -> Grants {
        let mut applied = coordinator.watch();
        let initial = Arc::new(applied.borrow().cluster.grants.clone());
        let (tx, rx) = watch::channel(initial);
        tokio::spawn(async move {
            loop {
                {
                    let grants = &applied.borrow_and_update().cluster.grants;
                    if **tx.borrow() != *grants {
                        tx.send_replace(Arc::new(grants.clone()));
                    }
                }
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Grants {
            rx,
            writer: Writer::Cluster(coordinator),
        }
    }

    pub fn all(&self) -> Arc<BTreeMap<String, Grant>> {
        self.rx.borrow().clone()
    }

    /// A principal's stored grant, unless it has expired.
    pub fn current(&self, principal: &str) -> Option<Grant> {
        let now = now_ms();
        self.rx
            .borrow()
            .get(principal)
            .filter(|g| g.expires_at_ms.is_none_or(|t| t > now))
            .cloned()
    }

    pub async fn put(&self, grant: Grant) -> Result<(), GrantWriteError> {
        match &self.writer {
            Writer::Local { path, tx, lock } => {
                let _held = lock.lock().await;
                let mut map = (**tx.borrow()).clone();
                map.insert(grant.principal.clone(), grant);
                save(path, &map)?;
                tx.send_replace(Arc::new(map));
                Ok(())
            }
            Writer::Cluster(c) => propose(c, ndc_coordinator::Command::PutGrant { grant }).await,
        }
    }

    /// Removes a grant; `Refused` when there was none.
    pub async fn revoke(&self, principal: &str) -> Result<(), GrantWriteError> {
        match &self.writer {
            Writer::Local { path, tx, lock } => {
                let _held = lock.lock().await;
                let mut map = (**tx.borrow()).clone();
                if map.remove(principal).is_none() {
                    return Err(GrantWriteError::Refused(format!(
                        "{principal} has no grant"
                    )));
                }
                save(path, &map)?;
                tx.send_replace(Arc::new(map));
                Ok(())
            }
            Writer::Cluster(c) => {
                propose(
                    c,
                    ndc_coordinator::Command::RevokeGrant {
                        principal: principal.to_string(),
                    },
                )
                .await
            }
        }
    }

    /// Resolves, with the status to end the stream with, once `caller` may
    /// no longer read `view` as it was admitted to: its grant revoked,
    /// expired, or changed (views, rows, columns), or its token expired.
    pub async fn until_revoked(&self, auth: &Authenticator, caller: &Caller, view: &str) -> Status {
        let mut rx = self.rx.clone();
        let admitted = caller.grant.clone();
        loop {
            let now = now_ms();
            if caller.via == Via::Token
                && let Some(exp) = caller.token_expires_at_ms
                && exp <= now
            {
                return Status::unauthenticated(format!(
                    "the bearer token of {} has expired: subscribe again with a fresh token \
                     (and the last resume token)",
                    caller.principal
                ));
            }
            // Anonymous and peer callers hold no stored grant to lose.
            let held = matches!(caller.via, Via::Certificate | Via::Token);
            let current = held
                .then(|| auth.effective_grant(&caller.principal))
                .flatten();
            if held {
                // What the stream was admitted to see must not have changed.
                let same_scope = |a: &Grant, g: &Grant| {
                    a.row_filter == g.row_filter
                        && a.columns == g.columns
                        && a.clearance == g.clearance
                        && a.masking == g.masking
                };
                let still = current.as_ref().is_some_and(|g| {
                    grants_view(g, view) && admitted.as_ref().is_some_and(|a| same_scope(a, g))
                });
                if !still {
                    let why = match &current {
                        None => "was revoked or has expired",
                        Some(g) if !grants_view(g, view) => "no longer names this view",
                        Some(_) => "changed its rows, columns or clearance",
                    };
                    metrics::counter!(metric::STREAMS_ENDED_BY_ACCESS).increment(1);
                    info!(principal = %caller.principal, view, why, "stream ended: grant changed");
                    return Status::permission_denied(format!(
                        "the grant of {} for view {view:?} {why}: stream ended",
                        caller.principal
                    ));
                }
            }
            let deadline = [
                caller.token_expires_at_ms,
                current.and_then(|g| g.expires_at_ms),
            ]
            .into_iter()
            .flatten()
            .min();
            let wait = deadline.map_or(Duration::from_secs(3600), |d| {
                Duration::from_millis(d.saturating_sub(now)).max(Duration::from_millis(1))
            });
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    return Status::unavailable("node is shutting down");
                },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

async fn propose(
    c: &Coordinator,
    command: ndc_coordinator::Command,
) -> Result<(), GrantWriteError> {
    match c.propose(command).await {
        Ok(reply) => match reply.refused {
            Some(why) => Err(GrantWriteError::Refused(why)),
            None => Ok(()),
        },
        Err(ndc_coordinator::Error::NotLeader { leader }) => {
            Err(GrantWriteError::NotLeader { leader })
        }
        Err(e) => Err(GrantWriteError::Failed(e.to_string())),
    }
}

/// Writes the grants file atomically (a crash leaves the old or the new one).
fn save(path: &Path, map: &BTreeMap<String, Grant>) -> Result<(), GrantWriteError> {
    use std::io::Write;
    let fail = |e: std::io::Error| {
        GrantWriteError::Failed(format!("cannot write {}: {e}", path.display()))
    };
    let tmp = path.with_extension("json.tmp");
    let bytes =
        serde_json::to_vec_pretty(map).map_err(|e| GrantWriteError::Failed(e.to_string()))?;
    let mut file = std::fs::File::create(&tmp).map_err(fail)?;
    file.write_all(&bytes).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        // The rename is durable once the directory is: not fatal if it
        // cannot be synced, but worth knowing.
        if let Err(e) = d.sync_all() {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot sync the directory after a rename");
        }
    }
    Ok(())
}

/// Whether a row (JSON object text) is one a row filter lets through.
pub fn row_admitted(filter: &RowFilter, row_json: &str) -> bool {
    let Ok(map) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(row_json)
    else {
        return false;
    };
    let text = match map.get(&filter.column) {
        None | Some(serde_json::Value::Null) => return false,
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(serde_json::Value::Bool(b)) => b.to_string(),
        // Objects and arrays never equal a text value.
        Some(_) => return false,
    };
    filter.values.contains(&text)
}

/// Logs what the access configuration lets in, once at start.
pub fn log_posture(auth: &Authenticator) {
    if auth.anonymous {
        warn!(
            "access: callers without certificate or token are let in as admins reading every view \
             (access.anonymous, a development setting)"
        );
    }
    info!(
        admins = ?auth.admins,
        jwt_issuers = auth.jwt.len(),
        grants = auth.grants.all().len(),
        "access control on"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_filters_compare_values_as_text_and_fail_closed() {
        let f = RowFilter {
            column: "province".into(),
            values: vec!["HN".into(), "1".into()],
        };
        assert!(row_admitted(&f, r#"{"province":"HN"}"#));
        assert!(row_admitted(&f, r#"{"province":1}"#));
        assert!(!row_admitted(&f, r#"{"province":"HP"}"#));
        assert!(!row_admitted(&f, r#"{"province":null}"#));
        assert!(!row_admitted(&f, r#"{"other":"HN"}"#));
        assert!(!row_admitted(&f, r#"{"province":["HN"]}"#));
        assert!(!row_admitted(&f, "not json"));
    }

    #[test]
    fn methods_need_the_least_role_that_fits_and_unknown_ones_need_admin() {
        assert!(matches!(need("/grpc.health.v1.Health/Check"), Need::Open));
        assert!(matches!(
            need("/ndc.v1.Subscription/Subscribe"),
            Need::Known
        ));
        assert!(matches!(
            need("/ndc.v1.Pipelines/List"),
            Need::Role(Role::Operator)
        ));
        assert!(matches!(
            need("/ndc.v1.Pipelines/Apply"),
            Need::Role(Role::Admin)
        ));
        assert!(matches!(
            need("/ndc.v1.Access/Grant"),
            Need::Role(Role::Admin)
        ));
        assert!(matches!(
            need("/ndc.v1.Something/New"),
            Need::Role(Role::Admin)
        ));
        assert!(matches!(need("/ndc.cluster.v1.Raft/Vote"), Need::PeerOnly));
        assert!(matches!(
            need("/ndc.cluster.v1.Cluster/Heartbeat"),
            Need::PeerOnly
        ));
    }
}
