//! Test fixtures: a real Kafka-protocol broker (tansu) on a loopback port
//! chosen at run time, nodes started in-process or as processes, and
//! subscription helpers. Every fixture stops what it started when dropped.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use ndc_node::client::{self, SubscribeOptions};
use ndc_node::config::{KafkaSection, KafkaSourceConfig, NodeConfig, SourceConfig, ViewConfig};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A tansu broker process with in-memory storage.
pub struct Broker {
    child: Child,
    pub bootstrap: String,
    /// librdkafka properties every client of this broker needs (TLS ...).
    pub client_properties: Vec<(String, String)>,
    /// The TLS terminator in front of the broker, when it speaks TLS.
    tls: Option<Child>,
}

/// Runs the `openssl` command in `dir` (Debian package openssl).
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client certificate `name.pem` / `name.key` in `dir`, signed by the CA
/// in `dir` (see [`make_certificates`]), valid for `days` (0: expired as
/// soon as its second is over; callers wait for `expired` to say so).
pub fn make_client_certificate(dir: &Path, name: &str, days: u32) -> (PathBuf, PathBuf) {
    let run = |args: &[&str]| openssl(dir, args);
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &csr,
        "-subj",
        &format!("/CN={name}"),
    ]);
    // X.509 v3 (rustls refuses v1), for client authentication.
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        &pem,
        "-days",
        &days.to_string(),
        "-extfile",
        &ext,
    ]);
    (dir.join(pem), dir.join(key))
}

/// Has the certificate in `pem` expired (by the `openssl` command's clock)?
pub fn expired(pem: &Path) -> bool {
    Command::new("openssl")
        .args(["x509", "-checkend", "0", "-noout", "-in"])
        .arg(pem)
        .status()
        .map(|s| !s.success())
        .unwrap_or(false)
}

/// A development CA and a certificate for 127.0.0.1 it signed, made with
/// the `openssl` command: `ca.pem`, `server.pem`, `server.key` in `dir`.
pub fn make_certificates(dir: &Path, ca_name: &str) -> PathBuf {
    let run = |args: &[&str]| openssl(dir, args);
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        &format!("/CN={ca_name}"),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    dir.join("ca.pem")
}

fn tansu_binary() -> PathBuf {
    if let Ok(p) = std::env::var("NDC_TANSU_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cached = PathBuf::from(home).join(".cache/ndc/tansu-0.6.0/bin/tansu");
    if cached.exists() {
        return cached;
    }
    panic!(
        "tansu (the test broker) is not installed: run ./dev.sh setup, or set NDC_TANSU_BIN. \
         These tests need a real Kafka-protocol broker and do not skip without one."
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A tansu broker with in-memory storage listening on `listen` and
/// advertising `advertise` (URLs `tcp://host:port`).
fn spawn_tansu(bin: &Path, listen: &str, advertise: &str) -> Child {
    Command::new(bin)
        .args(["broker", "--listener-url", listen])
        .args(["--advertised-listener-url", advertise])
        .args(["--storage-engine", "memory://tansu/"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu")
}

impl Broker {
    pub fn start() -> Broker {
        let bin = tansu_binary();
        for _ in 0..5 {
            let port = free_port();
            let url = format!("tcp://127.0.0.1:{port}");
            let child = spawn_tansu(&bin, &url, &url);
            let mut broker = Broker {
                child,
                bootstrap: format!("127.0.0.1:{port}"),
                client_properties: Vec::new(),
                tls: None,
            };
            if broker.wait_ready(Duration::from_secs(15)) {
                return broker;
            }
        }
        panic!("tansu did not become ready");
    }

    /// A broker that speaks only TLS: tansu behind stunnel (Debian's
    /// `stunnel4`), which holds the certificate made in `dir` (tansu 0.6.0
    /// has no TLS listener of its own); tansu advertises stunnel's port, so
    /// every connection, after the first metadata answer too, is TLS.
    /// Clients trust `dir/ca.pem` (see `client_properties`).
    pub fn start_tls(dir: &Path) -> Broker {
        make_certificates(dir, "ndc-test-ca");
        let bin = tansu_binary();
        for _ in 0..5 {
            let (plain, tls) = (free_port(), free_port());
            let child = spawn_tansu(
                &bin,
                &format!("tcp://127.0.0.1:{plain}"),
                &format!("tcp://127.0.0.1:{tls}"),
            );
            let conf = dir.join("stunnel.conf");
            std::fs::write(
                &conf,
                format!(
                    "foreground = yes\npid =\nsyslog = no\noutput = {}\n[kafka]\naccept = 127.0.0.1:{tls}\nconnect = 127.0.0.1:{plain}\ncert = {}\nkey = {}\n",
                    dir.join("stunnel.log").display(),
                    dir.join("server.pem").display(),
                    dir.join("server.key").display()
                ),
            )
            .unwrap();
            let stunnel = Command::new("stunnel4")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start stunnel4 (Debian package stunnel4; ./dev.sh setup installs it)");
            let mut broker = Broker {
                child,
                bootstrap: format!("127.0.0.1:{tls}"),
                client_properties: vec![
                    ("security.protocol".into(), "ssl".into()),
                    (
                        "ssl.ca.location".into(),
                        dir.join("ca.pem").display().to_string(),
                    ),
                ],
                tls: Some(stunnel),
            };
            if broker.wait_ready(Duration::from_secs(15)) {
                return broker;
            }
        }
        panic!("tansu behind stunnel did not become ready");
    }

    /// A client configuration for this broker.
    pub fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        for (k, v) in &self.client_properties {
            c.set(k, v);
        }
        c
    }

    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Some(Ok(Some(_))) = self.tls.as_mut().map(Child::try_wait) {
                return false;
            }
            let consumer: BaseConsumer = self.client().create().unwrap();
            if consumer
                .fetch_metadata(None, Duration::from_millis(500))
                .is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.client().create().unwrap();
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let results = admin
            .create_topics(&[topic], &AdminOptions::new())
            .await
            .unwrap();
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
        }
    }

    pub fn producer(&self) -> FutureProducer {
        self.client()
            .set("enable.idempotence", "true")
            .set("linger.ms", "2")
            .create()
            .unwrap()
    }

    /// Reads every record of `topic` (all partitions) until `n` are seen.
    pub fn read_all(
        &self,
        topic: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<rdkafka::message::OwnedMessage> {
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", format!("test-reader-{}", free_port()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                out.push(m.detach());
            }
        }
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.child).chain(self.tls.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Publishes one record; `value: None` is a tombstone.
pub async fn publish(p: &FutureProducer, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) {
    let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
    if let Some(k) = key {
        r = r.key(k);
    }
    if let Some(v) = value {
        r = r.payload(v);
    }
    p.send(r, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// Publishes one synthetic change event (tombstone if it has no value).
pub async fn publish_event(p: &FutureProducer, topic: &str, e: &ndc_node::synthetic::Event) {
    publish(p, topic, Some(&e.key), e.value.as_deref()).await;
}

/// A node configuration on free ports with one Kafka view per (name, topic, key columns).
pub fn node_config(
    data_dir: &Path,
    bootstrap: &str,
    views: &[(&str, &str, &[&str])],
) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.node.data_dir = data_dir.to_path_buf();
    c.node.grpc_listen = "127.0.0.1:0".parse().unwrap();
    c.node.http_listen = "127.0.0.1:0".parse().unwrap();
    c.node.shutdown_grace = Duration::from_secs(10);
    // Plaintext on loopback; tests/grpc_tls.rs runs the listener with TLS.
    c.tls.insecure = true;
    c.kafka = Some(KafkaSection {
        bootstrap_servers: bootstrap.into(),
        metadata_refresh: Duration::from_millis(500),
        commit_interval: Duration::from_millis(500),
        ..KafkaSection::default()
    });
    c.storage.sync_commits = false;
    c.subscriptions.progress_interval = Duration::from_millis(200);
    c.views = views
        .iter()
        .map(|(name, topic, keys)| ViewConfig {
            name: name.to_string(),
            key_columns: keys.iter().map(|k| k.to_string()).collect(),
            sources: vec![SourceConfig::Kafka(KafkaSourceConfig {
                topic: topic.to_string(),
                format: Default::default(),
            })],
            columns: Default::default(),
            // Views of people: the audit trail records whose rows went out.
            national_id: keys.contains(&"person_id").then(|| "person_id".to_string()),
        })
        .collect();
    c
}

/// Subscribes and collects output lines until `done` says so or `timeout`.
pub async fn collect(
    addr: std::net::SocketAddr,
    view: &str,
    from: client::From,
    timeout: Duration,
    mut done: impl FnMut(&[Value]) -> bool + Send,
) -> Vec<Value> {
    let mut lines = Vec::new();
    let opts = SubscribeOptions {
        addr: addr.to_string(),
        view: view.into(),
        from,
        keys: Vec::new(),
        fields: Vec::new(),
        limit: None,
        progress: true,
        reconnect: false,
        tls: None,
        token: None,
    };
    let fut = client::subscribe(opts, |line| {
        lines.push(line);
        !done(&lines)
    });
    let _ = tokio::time::timeout(timeout, fut).await;
    lines
}

/// Change lines only (no progress / snapshot markers).
pub fn changes(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l.get("op").is_some()).collect()
}

/// Folds change lines into key → row, as a subscriber keeping a copy would.
pub fn fold(lines: &[Value]) -> std::collections::BTreeMap<String, Value> {
    let mut state = std::collections::BTreeMap::new();
    for l in lines {
        match l.get("op").and_then(Value::as_str) {
            Some("read" | "insert" | "update") => {
                state.insert(l["key"].to_string(), l["after"].clone());
            }
            Some("delete") => {
                state.remove(&l["key"].to_string());
            }
            Some("truncate") => state.clear(),
            _ => {}
        }
    }
    state
}

/// Polls `f` until it returns true.
pub async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Fetches the node's Prometheus exposition.
pub async fn metrics_text(http: std::net::SocketAddr) -> String {
    http_get(http, "/metrics").await
}

/// `GET path` on a node's HTTP port: the whole response, status line first.
pub async fn http_get(http: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of the first line of a Prometheus exposition that `line`
/// accepts; `None` when no line does. A matching line whose value does not
/// parse fails the test.
pub fn metric_value(text: &str, line: impl Fn(&str) -> bool) -> Option<f64> {
    let found = text.lines().find(|l| !l.starts_with('#') && line(l))?;
    let value = found.rsplit(' ').next().unwrap_or_default();
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("metric line without a number: {found}")),
    )
}

pub fn header<'a>(m: &'a rdkafka::message::OwnedMessage, name: &str) -> Option<&'a str> {
    use rdkafka::message::Headers;
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

pub fn payload(m: &rdkafka::message::OwnedMessage) -> Option<&[u8]> {
    m.payload()
}

/// Waits until `view` holds `rows` live rows (per ListViews).
pub async fn wait_rows(addr: std::net::SocketAddr, view: &str, rows: u64) {
    use ndc_proto::v1::subscription_client::SubscriptionClient;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = 0;
    while Instant::now() < deadline {
        if let Ok(mut c) = SubscriptionClient::connect(format!("http://{addr}")).await
            && let Ok(r) = c.list_views(ndc_proto::v1::ListViewsRequest {}).await
            && let Some(v) = r.into_inner().views.into_iter().find(|v| v.name == view)
        {
            last = v.live_rows;
            if last >= rows {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("view {view} has {last} rows, expected {rows}");
}

/// A subscriber from `snapshot` that resumes with its last token whenever
/// its connection breaks (on the next address, when `addr` lists several);
/// returns the lines it prints and its task.
pub fn follow(
    addr: String,
    view: &str,
) -> (
    std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let seen: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
    let sink = seen.clone();
    let task = tokio::spawn(client::subscribe(
        SubscribeOptions {
            addr,
            view: view.into(),
            from: client::From::Snapshot,
            keys: vec![],
            fields: vec![],
            limit: None,
            progress: false,
            reconnect: true,
            tls: None,
            token: None,
        },
        move |line| {
            sink.lock().unwrap().push(line);
            true
        },
    ));
    (seen, task)
}

/// The sequence numbers a subscriber saw after its first completed snapshot,
/// checked to be each delivered once, with no gap, in order, continuing
/// from the snapshot's token.
pub fn seqs_after_snapshot(lines: &[Value]) -> Vec<u64> {
    // The subscriber may have started before the first record: its snapshot
    // can be empty or partial, then the change stream continues from it.
    let snapshot_end = lines
        .iter()
        .position(|l| l.get("snapshot_complete").is_some())
        .expect("snapshot completed");
    let first_token = lines[snapshot_end]["resume_token"].as_str().unwrap();
    let first_seq = ndc_node::token::peek(first_token).unwrap().1.seq;
    let seqs: Vec<u64> = lines[snapshot_end + 1..]
        .iter()
        .filter(|l| l.get("op").is_some())
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    let distinct: std::collections::BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(distinct.len(), seqs.len(), "a change was delivered twice");
    let want: Vec<u64> = (first_seq + 1..=first_seq + seqs.len() as u64).collect();
    assert_eq!(seqs, want, "gap or reordering in the change stream");
    seqs
}
