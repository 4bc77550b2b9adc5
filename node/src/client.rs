//! A subscription client: prints a view's changes as JSON lines and resumes
//! with its last token when the connection drops.

use crate::security::token;
use ndc_proto::v1::subscribe_request::Start;
use ndc_proto::v1::subscription_client::SubscriptionClient;
use ndc_proto::v1::{Change, Latest, Op, Snapshot, SubscribeRequest, subscribe_response};
use serde_json::{Value, json};
use std::time::Duration;
use tracing::warn;

/// Where to start reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    Snapshot,
    Latest,
    Token(String),
}

impl std::str::FromStr for From {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "snapshot" => From::Snapshot,
            "latest" => From::Latest,
            token => From::Token(token.to_string()),
        })
    }
}

#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// `host:port` or a full `http://` URL; several, comma separated, are
    /// tried in turn when a connection fails (nodes of one cluster: a resume
    /// token is valid on every node).
    pub addr: String,
    pub view: String,
    pub from: From,
    pub keys: Vec<String>,
    pub fields: Vec<String>,
    /// Stop after this many changes (snapshot rows included).
    pub limit: Option<u64>,
    /// Also emit progress lines.
    pub progress: bool,
    /// Reconnect with the last token when the stream breaks.
    pub reconnect: bool,
    /// TLS to the node; `None`: the process default ([`set_default_tls`]).
    pub tls: Option<ClientTls>,
    /// Bearer token (a JWT); `None`: the process default ([`set_token_file`]).
    pub token: Option<String>,
}

/// How a client reaches a node's TLS listener: the CA that signed the
/// node's certificate, and this client's certificate and key for mutual TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl ClientTls {
    pub fn is_on(&self) -> bool {
        self.ca.is_some() || self.cert.is_some()
    }
}

static DEFAULT_TLS: std::sync::OnceLock<ClientTls> = std::sync::OnceLock::new();

/// The command line's `--tls-ca`, `--tls-cert`, `--tls-key`, for every connection this
/// process makes that names no TLS of its own (set once, at start).
pub fn set_default_tls(tls: ClientTls) {
    let _ = DEFAULT_TLS.set(tls);
}

static TOKEN_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The command line's `--token-file`: a bearer token sent with every call
/// this process makes, read again on every connection (a sidecar that
/// refreshes the file is picked up).
pub fn set_token_file(path: std::path::PathBuf) {
    let _ = TOKEN_FILE.set(path);
}

/// Adds the caller's bearer token, if it has one, to every request.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Credentials {
    /// A given token.
    pub fn bearer(token: &str) -> anyhow::Result<Credentials> {
        let header = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| anyhow::anyhow!("the token is not valid header text"))?;
        Ok(Credentials {
            header: Some(header),
        })
    }

    /// The process default: the token file's content, or none.
    pub fn from_process() -> anyhow::Result<Credentials> {
        use anyhow::Context;
        match TOKEN_FILE.get() {
            None => Ok(Credentials::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the token file {}", path.display()))?;
                Credentials::bearer(&text)
            }
        }
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// A connection that sends the caller's credentials with every request.
pub type Connection =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Credentials>;

/// [`channel`] with the process's bearer token (if any) on every request.
pub async fn connect(addr: &str, tls: Option<&ClientTls>) -> anyhow::Result<Connection> {
    let credentials = Credentials::from_process()?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel(addr, tls).await?,
        credentials,
    ))
}

/// A connection to a node at `addr` (`host:port` or a URL), over TLS when
/// `tls` (else the process default) says so.
/// How long connecting to a node may take (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alive ping interval, and how long a ping may go unanswered.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// How long a subscription may take to open (connect, then the node's
/// answer to the request) before the next address is tried.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn channel(
    addr: &str,
    tls: Option<&ClientTls>,
) -> anyhow::Result<tonic::transport::Channel> {
    use anyhow::Context;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let tls = tls.or(DEFAULT_TLS.get()).filter(|t| t.is_on());
    // A node that accepts connections but does not answer (frozen, or down
    // behind a socket its supervisor holds) is given up on: connecting is
    // bounded, and keep-alive pings find a connection gone silent.
    let bounded = |e: Endpoint| {
        e.connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEP_ALIVE)
            .keep_alive_timeout(KEEP_ALIVE)
            .keep_alive_while_idle(true)
    };
    let Some(tls) = tls else {
        return Ok(bounded(Endpoint::from_shared(endpoint(addr))?)
            .connect()
            .await?);
    };
    let host = addr
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let read = |p: &std::path::Path| {
        std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let mut config = ClientTlsConfig::new();
    if let Some(ca) = &tls.ca {
        config = config.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    }
    Ok(bounded(Endpoint::from_shared(format!("https://{host}"))?)
        .tls_config(config)?
        .connect()
        .await?)
}

/// A gRPC endpoint URL from `host:port` or a full URL.
pub fn endpoint(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

fn op_name(op: i32) -> &'static str {
    match Op::try_from(op) {
        Ok(Op::Insert) => "insert",
        Ok(Op::Update) => "update",
        Ok(Op::Delete) => "delete",
        Ok(Op::Truncate) => "truncate",
        Ok(Op::Read) => "read",
        _ => "unknown",
    }
}

fn parse_or_string(text: Option<&str>) -> Value {
    match text {
        None => Value::Null,
        Some(t) => serde_json::from_str(t).unwrap_or_else(|_| Value::String(t.to_string())),
    }
}

/// One change as the JSON line `ndc subscribe` prints.
pub fn change_json(view: &str, c: &Change, resume_token: Option<String>) -> Value {
    let source = c.source.clone().unwrap_or_default();
    json!({
        "view": view,
        "shard": c.shard,
        "seq": c.seq,
        "op": op_name(c.op),
        "key": parse_or_string(Some(&c.key_json)).clone(),
        "before": parse_or_string(c.before_json.as_deref()),
        "after": parse_or_string(c.after_json.as_deref()),
        "source": {
            "table": source.table, "db": source.db, "ts_ms": source.ts_ms, "lsn": source.lsn,
            "tx_id": source.tx_id, "snapshot": source.snapshot, "stream": source.stream, "offset": source.offset,
        },
        "committed_at_ms": c.committed_at_ms,
        "resume_token": resume_token,
    })
}

/// Streams a view, handing each output line to `emit` (return false to
/// stop). Returns when `limit` is reached, `emit` says stop, or on an error
/// that reconnecting cannot fix.
pub async fn subscribe(
    opts: SubscribeOptions,
    mut emit: impl FnMut(Value) -> bool,
) -> anyhow::Result<()> {
    let mut from = opts.from.clone();
    let mut seen = 0u64;
    let mut backoff = Duration::from_millis(200);
    let addrs: Vec<&str> = opts
        .addr
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    anyhow::ensure!(!addrs.is_empty(), "no address to subscribe to");
    let mut current = 0usize;
    loop {
        let addr = addrs[current % addrs.len()];
        let result: anyhow::Result<bool> = async {
            let credentials = match &opts.token {
                Some(t) => Credentials::bearer(t)?,
                None => Credentials::from_process()?,
            };
            let start = match &from {
                From::Snapshot => Start::Snapshot(Snapshot {}),
                From::Latest => Start::Latest(Latest {}),
                From::Token(t) => Start::ResumeToken(t.clone()),
            };
            let request = SubscribeRequest {
                view: opts.view.clone(),
                start: Some(start),
                keys: opts.keys.clone(),
                fields: opts.fields.clone(),
                max_batch_size: 0,
            };
            let open = async {
                let mut client = SubscriptionClient::with_interceptor(
                    channel(addr, opts.tls.as_ref()).await?,
                    credentials,
                );
                Ok::<_, anyhow::Error>(client.subscribe(request).await?.into_inner())
            };
            let mut stream = tokio::time::timeout(OPEN_TIMEOUT, open)
                .await
                .map_err(|_| anyhow::anyhow!("{addr} did not answer within {OPEN_TIMEOUT:?}"))??;
            backoff = Duration::from_millis(200);
            while let Some(msg) = stream.message().await? {
                match msg.kind {
                    Some(subscribe_response::Kind::Batch(b)) => {
                        // A change's own token: the positions before the batch,
                        // moved up to the change in its shard.
                        let mut at = match &from {
                            From::Token(t) => token::peek(t).map(|(_, p)| p.shards),
                            _ => None,
                        };
                        if !b.snapshot
                            && let Some((_, now)) = token::peek(&b.resume_token)
                            && at.as_ref().is_none_or(|a| a.len() != now.shards.len())
                        {
                            // No earlier position (started at `latest`): the
                            // batch's own, which holds each change's shard.
                            at = Some(now.shards);
                        }
                        for c in &b.changes {
                            let t = match at.as_mut().and_then(|a| a.get_mut(c.shard as usize)) {
                                Some(p) if c.seq > 0 => {
                                    p.seq = c.seq;
                                    at.as_deref().map(|a| token::encode(&opts.view, a))
                                }
                                _ => None,
                            };
                            seen += 1;
                            if !emit(change_json(&opts.view, c, t)) {
                                return Ok(true);
                            }
                            if opts.limit.is_some_and(|l| seen >= l) {
                                return Ok(true);
                            }
                        }
                        if b.snapshot_complete
                            && !emit(json!({"view": opts.view, "snapshot_complete": true, "resume_token": b.resume_token})) {
                                return Ok(true);
                            }
                        if !b.resume_token.is_empty() {
                            from = From::Token(b.resume_token.clone());
                        }
                    }
                    Some(subscribe_response::Kind::Progress(p)) => {
                        from = From::Token(p.resume_token.clone());
                        if opts.progress
                            && !emit(json!({"view": opts.view, "progress": {
                                "committed_seq": p.committed_seq, "server_time_ms": p.server_time_ms,
                                "resume_token": p.resume_token}}))
                        {
                            return Ok(true);
                        }
                    }
                    None => {}
                }
            }
            Ok(false)
        }
        .await;
        match result {
            Ok(true) => return Ok(()),
            Ok(false) if !opts.reconnect => return Ok(()),
            Err(e) if !opts.reconnect || is_final(&e) => return Err(e),
            Ok(false) => warn!(addr, "stream ended; resuming"),
            Err(e) => {
                warn!(addr, error = %e, "subscription interrupted; resuming from the last token")
            }
        }
        // Next address, if there are several; back off once all were tried.
        current += 1;
        if addrs.len() > 1 && !current.is_multiple_of(addrs.len()) {
            continue;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Errors that reconnecting cannot fix (bad request, unknown view ...).
fn is_final(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tonic::Status>().is_some_and(|s| {
        matches!(
            s.code(),
            tonic::Code::InvalidArgument
                | tonic::Code::NotFound
                | tonic::Code::FailedPrecondition
                | tonic::Code::OutOfRange
                | tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated
        )
    })
}
