//! Load tests of an ndc node, run as a separate `ndc node` process so that
//! its memory is measured alone.
//!
//! Phases (see `docs/performance.md` for figures):
//! - `file`: a newline-delimited Debezium export through the file source;
//! - `storage` (reports `storage-node` and `storage-floor`): RocksDB alone
//!   writing what the file phase makes the node write, and the floor (each
//!   event once), in this process (`NDC_BENCH_STORAGE_WAL=off`: without
//!   RocksDB's WAL, reported as `storage-node-nowal` and `storage-floor-nowal`);
//! - `broker-ceiling`: the broker's own produce and consume rates;
//! - `broker`: the node catching up on a topic filled beforehand;
//! - `delivery` (reports `delivery-snapshot` and `delivery-catchup`): one
//!   subscriber taking a filled view as fast as it can, snapshot then the
//!   whole change stream (`NDC_BENCH_MASK=on` masks, `NDC_BENCH_AUDIT=off`
//!   turns the audit trail off: their cost where delivery is the work);
//! - `latency`: a steady rate through broker and node to a subscriber,
//!   with end-to-end latency percentiles;
//!   With `NDC_BENCH_TLS=on`, single-node phases run the node's listener on
//!   mutual TLS (development certificates) and the subscriber over it,
//!   reported as `latency+tls` (and likewise);
//! - `golden`: the example pipeline (`examples/national.yaml`) catching up
//!   on five agencies' snapshots: replicas, re-keying through the
//!   repartition topic, golden records, conflicts and joins.

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use ndc_node::config::{
    FileSourceConfig, KafkaSection, KafkaSourceConfig, NodeConfig, SourceConfig, ViewConfig,
};
use ndc_node::quickstart::synthetic::{Feed, Rng, Table};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod storage;
pub use ndc_testkit::Broker;
pub use storage::{StorageLoad, storage_phase};

pub const VIEW: &str = "citizens";
pub const TOPIC: &str = "bench.population.citizens";

/// What one phase measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub phase: String,
    pub events: u64,
    pub keys: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    pub mean_event_bytes: u64,
    pub node_peak_rss_bytes: Option<u64>,
    pub latency_ms: Option<Percentiles>,
    pub note: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub samples: u64,
}

impl Report {
    pub fn print(&self) {
        let rss = self
            .node_peak_rss_bytes
            .map(|b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<16} {:>10} events {:>9} keys {:>8.2} s {:>11.0} events/s  node peak RSS {:>10}  {}",
            self.phase,
            self.events,
            self.keys,
            self.seconds,
            self.events_per_second,
            rss,
            self.note
        );
        if let Some(l) = &self.latency_ms {
            println!(
                "{:<16} latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  ({} samples)",
                "", l.p50, l.p90, l.p99, l.p999, l.max, l.samples
            );
        }
        if let Ok(json) = serde_json::to_string(self) {
            println!("JSON {json}");
        }
    }
}

pub use ndc_testkit::process::{cpu_seconds, peak_rss};

/// Path of the `ndc` binary built beside this one.
pub fn ndc_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("ndc");
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p ndc-node)",
            bin.display()
        );
    }
    Ok(bin)
}

/// The test broker: tansu (`NDC_TANSU_BIN`), or librdkafka's in-process
/// mock cluster with `NDC_BENCH_BROKER=mock` (for comparison only).
pub fn start_broker() -> anyhow::Result<Broker> {
    if std::env::var("NDC_BENCH_BROKER").is_ok_and(|b| b == "mock") {
        return Broker::start_mock();
    }
    std::env::var("NDC_TANSU_BIN").context("NDC_TANSU_BIN is not set (use ./dev.sh bench)")?;
    Broker::try_start()
}

/// A node process of the load test (the testkit's, on ports it holds) and
/// how to call it.
pub struct NodeProcess {
    process: ndc_testkit::NodeProcess,
    pub grpc: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
    /// How clients reach it when its listener speaks TLS (`NDC_BENCH_TLS`).
    client_tls: Option<ndc_node::client::ClientTls>,
}

impl NodeProcess {
    /// Starts `config` in `work` (`node.yaml`, `node.log`) and waits until
    /// it listens (and, on TLS, has granted the subscriber).
    pub fn start(config: &NodeConfig, work: &Path) -> anyhow::Result<NodeProcess> {
        let mut process =
            ndc_testkit::NodeProcess::start_new(&ndc_binary()?, config.clone(), work, "node")?;
        process.log_filter = "warn".into();
        process.wait_started(Duration::from_secs(30))?;
        // A node on TLS runs with base_config's development certificates:
        // its clients take the subscriber's.
        let client_tls = config.tls.cert.as_ref().map(|_| {
            let certs = ndc_node::security::certs::DevCertificates::in_dir(&work.join("certs"));
            ndc_node::client::ClientTls {
                ca: Some(certs.ca),
                cert: Some(certs.subscriber_cert),
                key: Some(certs.subscriber_key),
            }
        });
        let (grpc, http) = (process.grpc(), process.http());
        if client_tls.is_some() {
            grant_subscriber(&grpc.to_string(), &work.join("certs"))?;
        }
        Ok(NodeProcess {
            process,
            grpc,
            http,
            client_tls,
        })
    }

    /// Waits until `/readyz` answers 200 (partitions assigned).
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.process.wait_ready(timeout).await
    }

    /// The node's Prometheus exposition.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(ndc_testkit::wait::try_http_get(self.http, "/metrics").await?)
    }

    /// Peak resident memory of the node so far (VmHWM).
    pub fn peak_rss(&self) -> Option<u64> {
        self.process.peak_rss()
    }

    /// CPU time the node has used so far, all threads.
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.process.cpu_seconds()
    }

    /// A gRPC connection to the node (over TLS when it speaks TLS).
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        ndc_node::client::channel(&self.grpc.to_string(), self.client_tls.as_ref()).await
    }

    /// Every view the node serves, as `ListViews` reports it.
    pub async fn views(&self) -> anyhow::Result<Vec<ndc_proto::v1::ViewInfo>> {
        let mut c =
            ndc_proto::v1::subscription_client::SubscriptionClient::new(self.channel().await?);
        Ok(c.list_views(ndc_proto::v1::ListViewsRequest {})
            .await?
            .into_inner()
            .views)
    }

    /// Polls until the view has committed `seq`; returns (first progress, done) instants.
    pub async fn wait_committed(
        &self,
        seq: u64,
        timeout: Duration,
    ) -> anyhow::Result<(Instant, Instant)> {
        wait_committed(
            &self.grpc.to_string(),
            self.client_tls.as_ref(),
            seq,
            timeout,
        )
        .await
    }
}

/// The load test's view at `addr`, as `ListViews` reports it.
async fn bench_view(
    addr: &str,
    tls: Option<&ndc_node::client::ClientTls>,
) -> anyhow::Result<Option<ndc_proto::v1::ViewInfo>> {
    let mut c = ndc_proto::v1::subscription_client::SubscriptionClient::new(
        ndc_node::client::channel(addr, tls).await?,
    );
    Ok(c.list_views(ndc_proto::v1::ListViewsRequest {})
        .await?
        .into_inner()
        .views
        .into_iter()
        .find(|v| v.name == VIEW))
}

/// Polls until the view at `addr` has committed `seq`; returns (first
/// progress, done) instants.
async fn wait_committed(
    addr: &str,
    tls: Option<&ndc_node::client::ClientTls>,
    seq: u64,
    timeout: Duration,
) -> anyhow::Result<(Instant, Instant)> {
    let deadline = Instant::now() + timeout;
    let mut first = None;
    // No progress for this long short of the target: something is lost
    // or stuck; say so instead of waiting out `timeout`.
    let stuck_after = Duration::from_secs(120);
    let (mut last, mut last_moved) = (0u64, Instant::now());
    loop {
        let c = bench_view(addr, tls)
            .await
            .ok()
            .flatten()
            .map_or(0, |v| v.committed_seq);
        if c != last {
            (last, last_moved) = (c, Instant::now());
        } else if last_moved.elapsed() > stuck_after {
            bail!(
                "{addr}: committed {c} of {seq}, no progress for {stuck_after:?} (lost or stuck changes)"
            );
        }
        if c > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if c >= seq {
            let now = Instant::now();
            return Ok((first.unwrap_or(now), now));
        }
        if Instant::now() > deadline {
            bail!("timed out: committed {c} of {seq}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A workload: `events` change events over `keys` people; the first `keys`
/// events insert everyone, the rest update random people.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub events: u64,
    pub keys: u64,
    pub seed: u64,
}

impl Workload {
    /// The events in order, as (key, value).
    pub fn events(&self) -> WorkloadEvents {
        WorkloadEvents {
            w: *self,
            n: 0,
            feed: Feed::new(Table::Citizens, 1_767_225_600_000),
            revisions: vec![0; self.keys as usize],
            rng: Rng::new(self.seed),
        }
    }
}

/// Iterator over a [`Workload`]'s events.
pub struct WorkloadEvents {
    w: Workload,
    n: u64,
    feed: Feed,
    revisions: Vec<u32>,
    rng: Rng,
}

impl Iterator for WorkloadEvents {
    type Item = (Vec<u8>, Vec<u8>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.n >= self.w.events {
            return None;
        }
        let (op, i) = if self.n < self.w.keys {
            ('c', self.n)
        } else {
            ('u', self.rng.below(self.w.keys))
        };
        self.n += 1;
        if op == 'u' {
            self.revisions[i as usize] += 1;
        }
        let e = self.feed.event(op, i, self.revisions[i as usize], None);
        Some((e.key, e.value.unwrap_or_default()))
    }
}

/// Is `NDC_BENCH_TLS=on` (single-node phases: the listener speaks mutual
/// TLS with development certificates, and the load test's subscriber too)?
pub fn bench_tls() -> bool {
    std::env::var("NDC_BENCH_TLS").is_ok_and(|v| v == "on")
}

/// Is `NDC_BENCH_MASK=on` too (with `NDC_BENCH_TLS=on`: the view's columns
/// are classified and the subscriber's grant has clearance `internal`,
/// confidential fields hashed, secret ones removed)?
pub fn bench_mask() -> bool {
    bench_tls() && std::env::var("NDC_BENCH_MASK").is_ok_and(|v| v == "on")
}

/// The load test view's classification with `NDC_BENCH_MASK=on`: two
/// columns public or internal, two confidential, the rest secret (and the
/// send stamp public, to measure latency).
fn bench_columns() -> std::collections::BTreeMap<String, ndc_node::config::ColumnClass> {
    if bench_mask() {
        use ndc_operators::masking::{Category, Level};
        [
            ("person_id", Level::Internal),
            ("marital_status", Level::Public),
            ("full_name", Level::Confidential),
            ("birth_date", Level::Confidential),
            // The load test's own send stamp, to measure latency.
            ("sent_at_us", Level::Public),
        ]
        .into_iter()
        .map(|(name, level)| {
            (
                name.to_string(),
                ndc_node::config::ColumnClass {
                    level,
                    category: Category::Core,
                },
            )
        })
        .collect()
    } else {
        Default::default()
    }
}

/// `NDC_BENCH_AUDIT=off`: the node keeps no audit trail (to measure what
/// recording every delivered batch costs; on by default, as in production).
pub fn bench_audit() -> bool {
    std::env::var("NDC_BENCH_AUDIT").map_or(true, |v| v != "off")
}

/// As the development admin (`access.admins` in [`base_config`]), grants
/// the subscriber certificate every view, through the node's access API (on
/// a thread of its own: callers may or may not be inside a runtime).
fn grant_subscriber(addr: &str, certs: &Path) -> anyhow::Result<()> {
    let certs = ndc_node::security::certs::DevCertificates::in_dir(certs);
    let admin = ndc_node::client::ClientTls {
        ca: Some(certs.ca),
        cert: Some(certs.admin_cert),
        key: Some(certs.admin_key),
    };
    let addr = addr.to_string();
    std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let mut grant = ndc_proto::v1::GrantInfo {
                    principal: "subscriber".into(),
                    role: "subscriber".into(),
                    views: vec!["*".into()],
                    purpose: "load test".into(),
                    ..Default::default()
                };
                if bench_mask() {
                    grant.clearance = "internal".into();
                    grant.masking = [("confidential".to_string(), "hash".to_string())].into();
                }
                match ndc_node::serving::access_api::grant(&addr, Some(&admin), grant).await {
                    Ok(_) => return Ok(()),
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the grant thread panicked"))?
}

pub fn base_config(work: &Path) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.node.data_dir = work.join("node");
    c.node.grpc_listen = "127.0.0.1:0".parse().expect("literal address");
    let certs = ndc_node::security::certs::DevCertificates::in_dir(&work.join("certs"));
    if bench_tls()
        && (certs.ca.exists()
            || ndc_node::security::certs::make_dev_certificates(&work.join("certs"), &[], 2)
                .is_ok())
    {
        c.tls.cert = Some(certs.node_cert);
        c.tls.key = Some(certs.node_key);
        c.tls.client_ca = Some(certs.ca);
        c.access.admins = vec!["admin".into()];
        if bench_mask() {
            let key = work.join("certs").join("hash.key");
            if std::fs::write(&key, b"load test masking key, 32 bytes.").is_ok() {
                c.access.hash_keys = vec![ndc_node::config::HashKeyConfig {
                    version: 1,
                    file: key,
                }];
            }
        }
    } else {
        c.tls.insecure = true;
    }
    c.audit.enabled = bench_audit();
    c.node.http_listen = "127.0.0.1:0".parse().expect("literal address");
    c
}

/// A node reading the load test's view from `export`, once or following it.
fn file_config(work: &Path, export: &Path, follow: bool) -> NodeConfig {
    let mut c = base_config(work);
    c.views = vec![ViewConfig {
        name: VIEW.into(),
        key_columns: vec!["person_id".into()],
        sources: vec![SourceConfig::File(FileSourceConfig {
            path: export.to_path_buf(),
            format: Default::default(),
            follow,
        })],
        columns: bench_columns(),
        national_id: Some("person_id".into()),
        shards: 1,
    }];
    c
}

/// File source: write the export, then time the node applying it.
pub async fn file_phase(work: &Path, w: Workload) -> anyhow::Result<Report> {
    let export = work.join("export.ndjson");
    let mut bytes = 0u64;
    {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&export)?);
        for (_, v) in w.events() {
            bytes += v.len() as u64;
            out.write_all(&v)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    let c = file_config(work, &export, false);
    let started = Instant::now();
    let node = NodeProcess::start(&c, work)?;
    let (_, done) = node
        .wait_committed(w.events, Duration::from_secs(3600))
        .await?;
    let seconds = done.duration_since(started).as_secs_f64();
    let cpu = node
        .cpu_seconds()
        .map(|s| {
            format!(
                "; node CPU {:.1} us per event",
                s * 1e6 / w.events.max(1) as f64
            )
        })
        .unwrap_or_default();
    let report = Report {
        phase: "file".into(),
        events: w.events,
        keys: w.keys,
        seconds,
        events_per_second: w.events as f64 / seconds,
        mean_event_bytes: bytes / w.events.max(1),
        node_peak_rss_bytes: node.peak_rss(),
        latency_ms: None,
        note: format!("node process start to last commit, fsync per batch{cpu}"),
    };
    drop(node);
    let _ = std::fs::remove_file(&export);
    Ok(report)
}

/// A phase's name with what was on: `+tls`, `+mask`, `-audit`.
fn label(phase: &str, node: &NodeProcess) -> String {
    let mut name = phase.to_string();
    if node.client_tls.is_some() {
        name.push_str("+tls");
        if bench_mask() {
            name.push_str("+mask");
        }
    }
    if !bench_audit() {
        name.push_str("-audit");
    }
    name
}

/// Delivery throughput: a node holding the workload's view (applied from a
/// file beforehand), then one subscriber taking everything as fast as it
/// can: the snapshot (`delivery-snapshot`), then every change again from
/// the stored change stream (`delivery-catchup`, a resume from the start).
/// With `NDC_BENCH_TLS`, `NDC_BENCH_MASK` and `NDC_BENCH_AUDIT` as they say:
/// the cost of masking and of the audit trail where delivery is the work.
pub async fn delivery_phase(work: &Path, w: Workload) -> anyhow::Result<Vec<Report>> {
    use ndc_proto::v1::subscription_client::SubscriptionClient;
    use ndc_proto::v1::{SubscribeRequest, subscribe_request::Start, subscribe_response::Kind};
    let export = work.join("export.ndjson");
    {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&export)?);
        for (_, v) in w.events() {
            out.write_all(&v)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    let c = file_config(work, &export, false);
    let node = NodeProcess::start(&c, work)?;
    node.wait_committed(w.events, Duration::from_secs(3600))
        .await?;
    let mut reports = Vec::new();
    // The change streams' incarnations, from the snapshot's resume token:
    // the catch-up resumes from before their first changes.
    let mut incarnation: Option<Vec<ndc_node::security::token::Position>> = None;
    for name in ["delivery-snapshot", "delivery-catchup"] {
        let start = match &incarnation {
            None => Start::Snapshot(Default::default()),
            Some(shards) => Start::ResumeToken(ndc_node::security::token::encode(
                VIEW,
                &shards
                    .iter()
                    .map(|p: &ndc_node::security::token::Position| {
                        ndc_node::security::token::Position {
                            incarnation: p.incarnation,
                            seq: 0,
                        }
                    })
                    .collect::<Vec<_>>(),
            )),
        };
        let mut client =
            SubscriptionClient::new(node.channel().await?).max_decoding_message_size(64 << 20);
        let cpu_before = node.cpu_seconds().unwrap_or(0.0);
        let began = Instant::now();
        let mut stream = client
            .subscribe(SubscribeRequest {
                view: VIEW.into(),
                start: Some(start),
                keys: vec![],
                fields: vec![],
                max_batch_size: 0,
            })
            .await?
            .into_inner();
        // The snapshot ends with its completion marker; the catch-up with
        // the last change.
        let want = if incarnation.is_none() {
            u64::MAX
        } else {
            w.events
        };
        let mut got = 0u64;
        while got < want {
            let Some(msg) = tokio::time::timeout(Duration::from_secs(60), stream.message())
                .await
                .context("no batch for 60 s")??
            else {
                bail!("the stream ended after {got} of {want} changes");
            };
            if let Some(Kind::Batch(b)) = msg.kind {
                got += b.changes.len() as u64;
                if b.snapshot_complete {
                    incarnation = Some(
                        ndc_node::security::token::decode(&b.resume_token, VIEW)
                            .map_err(|e| anyhow::anyhow!("snapshot token: {e}"))?
                            .shards,
                    );
                    break;
                }
            }
        }
        let seconds = began.elapsed().as_secs_f64();
        let cpu = node.cpu_seconds().unwrap_or(0.0) - cpu_before;
        reports.push(Report {
            phase: label(name, &node),
            events: got,
            keys: w.keys,
            seconds,
            events_per_second: got as f64 / seconds,
            mean_event_bytes: 0,
            node_peak_rss_bytes: node.peak_rss(),
            latency_ms: None,
            note: format!(
                "one subscriber, as fast as it takes them; node CPU {:.1} us per change delivered",
                cpu * 1e6 / got.max(1) as f64
            ),
        });
    }
    drop(node);
    let _ = std::fs::remove_file(&export);
    Ok(reports)
}

/// Fills `topic` with the workload as fast as the broker takes it; returns
/// (produce report, mean bytes).
pub async fn produce_phase(broker: &Broker, topic: &str, w: Workload) -> anyhow::Result<Report> {
    let producer = broker.bulk_producer()?;
    let mut bytes = 0u64;
    let started = Instant::now();
    let mut events = w.events().peekable();
    while events.peek().is_some() {
        let chunk: Vec<(Vec<u8>, Vec<u8>)> = events.by_ref().take(10_000).collect();
        let sends = chunk.iter().map(|(k, v)| {
            bytes += v.len() as u64;
            producer.send(
                FutureRecord::to(topic)
                    .key(k.as_slice())
                    .payload(v.as_slice()),
                Duration::from_secs(60),
            )
        });
        for r in futures::future::join_all(sends).await {
            r.map_err(|(e, _)| e)?;
        }
    }
    producer.flush(Duration::from_secs(60))?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Report {
        phase: "broker-produce".into(),
        events: w.events,
        keys: w.keys,
        seconds,
        events_per_second: w.events as f64 / seconds,
        mean_event_bytes: bytes / w.events.max(1),
        node_peak_rss_bytes: None,
        latency_ms: None,
        note: "rdkafka producer, 10k in flight, idempotent, acks=all".into(),
    })
}

/// Reads the whole topic with a plain consumer: the broker's consume ceiling.
pub fn consume_phase(broker: &Broker, topic: &str, w: Workload) -> anyhow::Result<Report> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", "bench-ceiling")
        // The node's own fetch setting, for a like-for-like ceiling.
        .set("fetch.wait.max.ms", "5")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut seen = 0u64;
    let mut bytes = 0u64;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(3600);
    while seen < w.events && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            bytes += m.payload_len() as u64;
            seen += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Report {
        phase: "broker-consume".into(),
        events: seen,
        keys: w.keys,
        seconds,
        events_per_second: seen as f64 / seconds,
        mean_event_bytes: bytes / seen.max(1),
        node_peak_rss_bytes: None,
        latency_ms: None,
        note: "rdkafka consumer, no processing, fetch.wait.max.ms=5 as the node".into(),
    })
}

fn kafka_config(work: &Path, broker: &Broker, topic: &str) -> NodeConfig {
    let mut c = base_config(work);
    c.kafka = Some(KafkaSection {
        bootstrap_servers: broker.bootstrap.clone(),
        metadata_refresh: Duration::from_secs(
            std::env::var("NDC_BENCH_REFRESH_S")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(10),
        ),
        resume_rewind_records: ndc_testkit::TANSU_RESUME_REWIND,
        ..KafkaSection::default()
    });
    c.views = vec![ViewConfig {
        name: VIEW.into(),
        key_columns: vec!["person_id".into()],
        sources: vec![SourceConfig::Kafka(KafkaSourceConfig {
            topic: topic.into(),
            format: Default::default(),
        })],
        columns: bench_columns(),
        national_id: Some("person_id".into()),
        shards: 1,
    }];
    c
}

/// Source tables of the golden phase, with how many rows each has for
/// `people` people.
fn golden_tables(people: u64) -> [(Table, u64); 5] {
    [
        (Table::Citizens, people),
        (Table::Addresses, people),
        (Table::InsuranceCards, people),
        (Table::Vehicles, people),
        (Table::Businesses, people / 3),
    ]
}

/// Fills the five agencies' topics (of `partitions` partitions) with their
/// snapshots.
pub async fn golden_produce(
    broker: &Broker,
    people: u64,
    partitions: i32,
) -> anyhow::Result<Report> {
    let producer = broker.bulk_producer()?;
    let started = Instant::now();
    let mut events = 0u64;
    let mut bytes = 0u64;
    for (table, rows) in golden_tables(people) {
        broker.try_create_topic(table.topic(), partitions).await?;
        let mut feed = Feed::new(table, 1_767_225_600_000);
        let mut inflight = Vec::with_capacity(10_000);
        for i in 0..rows {
            let e = feed.event('r', i, 0, None);
            let value = e.value.unwrap_or_default();
            bytes += value.len() as u64;
            let record = FutureRecord::to(table.topic()).key(&e.key).payload(&value);
            match producer.send_result(record) {
                Ok(d) => inflight.push(d),
                Err((e, _)) => bail!("produce: {e}"),
            }
            events += 1;
            if inflight.len() >= 10_000 {
                for d in inflight.drain(..) {
                    d.await?.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
                }
            }
        }
        for d in inflight.drain(..) {
            d.await?.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Report {
        phase: "golden-produce".into(),
        events,
        keys: people,
        seconds,
        events_per_second: events as f64 / seconds,
        mean_event_bytes: bytes / events.max(1),
        node_peak_rss_bytes: None,
        latency_ms: None,
        note: "five agencies' snapshots into the broker".into(),
    })
}

/// The example pipeline catching up on the filled topics: timed from the
/// node's start until every source row's facts are merged (or kept for a
/// join) and every vehicle is joined with its owner.
pub async fn golden_phase(work: &Path, broker: &Broker, people: u64) -> anyhow::Result<Report> {
    let mut c = base_config(work);
    c.kafka = Some(KafkaSection {
        bootstrap_servers: broker.bootstrap.clone(),
        metadata_refresh: Duration::from_secs(2),
        ..KafkaSection::default()
    });
    let spec = work.join("national.yaml");
    std::fs::write(&spec, ndc_node::quickstart::EXAMPLE_PIPELINE)?;
    c.pipelines.files = vec![spec];
    let events: u64 = golden_tables(people).iter().map(|(_, n)| n).sum();
    let started = Instant::now();
    let node = NodeProcess::start(&c, work)?;
    let deadline = started + Duration::from_secs(3600);
    loop {
        // One ListViews per poll for both views.
        let views = node.views().await.unwrap_or_default();
        let rows = |name: &str| {
            views
                .iter()
                .find(|v| v.name == name)
                .map_or(0, |v| v.live_rows)
        };
        let merged = rows("national.people.contributions");
        let joined = rows("national.vehicle_owners");
        // Every source row is one contribution (merged or joined).
        if merged >= events && joined >= people {
            break;
        }
        if Instant::now() > deadline {
            bail!("timed out: {merged} contributions, {joined} vehicles joined");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Report {
        phase: "golden".into(),
        events,
        keys: people,
        seconds,
        events_per_second: events as f64 / seconds,
        mean_event_bytes: 0,
        node_peak_rss_bytes: node.peak_rss(),
        latency_ms: None,
        note: "source events/s: node start to all golden records and joins complete".into(),
    })
}

/// The node catching up on a filled topic.
pub async fn broker_phase(
    work: &Path,
    broker: &Broker,
    topic: &str,
    w: Workload,
) -> anyhow::Result<Report> {
    let c = kafka_config(work, broker, topic);
    drain_phase(
        work,
        &c,
        w,
        "broker".into(),
        "node process start to last commit, topic filled beforehand".into(),
    )
    .await
}

/// Starts a node on a topic filled beforehand and reports it from its start
/// to its last commit (its CPU seconds added to `note`).
async fn drain_phase(
    work: &Path,
    config: &NodeConfig,
    w: Workload,
    phase: String,
    note: String,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let node = NodeProcess::start(config, work)?;
    let (_, done) = node
        .wait_committed(w.events, Duration::from_secs(3600))
        .await?;
    let seconds = done.duration_since(started).as_secs_f64();
    let cpu = node.cpu_seconds().unwrap_or(0.0);
    Ok(Report {
        phase,
        events: w.events,
        keys: w.keys,
        seconds,
        events_per_second: w.events as f64 / seconds,
        mean_event_bytes: 0,
        node_peak_rss_bytes: node.peak_rss(),
        latency_ms: None,
        note: format!("{note}; node CPU {cpu:.1} s"),
    })
}

/// One node's throughput with a pool of `writers` state writers: a view of
/// `shards` shards (the topic's partitions spread over them), from the node
/// process's start on a topic filled beforehand to its last commit. Run
/// with 1 and with 2 writers, alternating, for item 6 of issue 21 (all
/// cores of a node used): the ratio tells what the second writer adds.
pub async fn writers_phase(
    work: &Path,
    broker: &Broker,
    topic: &str,
    w: Workload,
    shards: u32,
    writers: usize,
    label: &str,
) -> anyhow::Result<Report> {
    let mut c = kafka_config(work, broker, topic);
    c.views[0].shards = shards;
    c.pipeline.writers = writers;
    drain_phase(
        work,
        &c,
        w,
        format!("writers-{label}"),
        format!(
            "{writers} writer(s), {shards} shards; node start to last commit, topic filled beforehand"
        ),
    )
    .await
}

/// A cluster member of run `run` (plaintext, no audit trail), with a
/// change log and consumer group of its own: an earlier run's log would
/// hand this one its state and source offsets (a replay, not ingestion).
fn cluster_config(work: &Path, broker: &Broker, topic: &str, run: &str) -> NodeConfig {
    let mut c = kafka_config(work, broker, topic);
    c.tls.insecure = true;
    c.audit.enabled = false;
    c.cluster = Some(ndc_node::config::ClusterSection {
        changes_replication: 1,
        // tansu's memory storage has no DeleteRecords.
        log_trim_interval: std::time::Duration::ZERO,
        changes_topic_prefix: format!("ndc.changes.{run}."),
        ..Default::default()
    });
    if let Some(k) = c.kafka.as_mut() {
        k.group_id = format!("ndc-{run}");
    }
    c
}

/// The golden-record pipeline on a cluster of `nodes` node processes, each
/// capped to `cores` (cgroup v1, when writable): the example spec in
/// `shards` shards, each held by `rf` nodes, catching up on the five
/// agencies' filled topics. Timed from the first start until every node
/// serves every contribution and every vehicle joined with its owner (the
/// shards it does not hold through its fan-in).
#[allow(clippy::too_many_arguments)]
pub async fn golden_capacity_phase(
    work: &Path,
    broker: &Broker,
    people: u64,
    nodes: u64,
    cores: f64,
    shards: u32,
    rf: usize,
    run: &str,
) -> anyhow::Result<(Report, Vec<NodeShare>)> {
    let cap = ndc_testkit::CpuCap::available();
    let spec = work.join("national.yaml");
    std::fs::create_dir_all(work)?;
    std::fs::write(
        &spec,
        ndc_node::quickstart::EXAMPLE_PIPELINE.replacen(
            "version: 1\n",
            &format!("version: 1\nshards: {shards}\n"),
            1,
        ),
    )?;
    if !std::fs::read_to_string(&spec)?.contains("\nshards: ") {
        bail!("the example spec has no `version: 1` line to put `shards` after");
    }
    let mut cluster = ndc_testkit::Cluster::prepare(&ndc_binary()?, work, nodes, |_| {
        let mut c = cluster_config(work, broker, TOPIC, run);
        c.views.clear();
        c.pipelines.files = vec![spec.clone()];
        c.pipelines.repartition_topic_prefix = format!("ndc.repartition.{run}.");
        if let Some(cluster) = c.cluster.as_mut() {
            cluster.replication_factor = rf;
        }
        c
    })?;
    let events: u64 = golden_tables(people).iter().map(|(_, n)| n).sum();
    let started = Instant::now();
    let mut caps = Vec::new();
    for m in &mut cluster.members {
        m.node.log_filter = "warn".into();
        m.node.start()?;
        match (cap, m.node.pid()) {
            (true, Some(pid)) => {
                let name = format!("ndc-bench-{}-{}", std::process::id(), m.id);
                caps.push(Some(ndc_testkit::CpuCap::apply(&name, pid, cores)?));
            }
            _ => caps.push(None),
        }
    }
    let deadline = started + Duration::from_secs(3600);
    let mut pending: Vec<String> = cluster.members.iter().map(|m| m.addr()).collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for addr in pending {
            let views = match ndc_node::client::channel(&addr, None).await {
                Ok(ch) => ndc_proto::v1::subscription_client::SubscriptionClient::new(ch)
                    .list_views(ndc_proto::v1::ListViewsRequest {})
                    .await
                    .map(|r| r.into_inner().views)
                    .unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            let rows = |name: &str| {
                views
                    .iter()
                    .find(|v| v.name == name)
                    .map_or(0, |v| v.live_rows)
            };
            // Every source row is one contribution (merged or joined).
            if rows("national.people.contributions") < events
                || rows("national.vehicle_owners") < people
            {
                still.push(addr);
            }
        }
        pending = still;
        if Instant::now() > deadline {
            bail!("timed out: {pending:?} not complete");
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut shares = Vec::new();
    for (m, cap) in cluster.members.iter().zip(&caps) {
        let text = ndc_testkit::metrics_text(m.node.http()).await;
        let counter = |name: &str| {
            ndc_testkit::metric_value(&text, |l| l.starts_with(&format!("{name} "))).unwrap_or(0.0)
                as u64
        };
        shares.push(NodeShare {
            node: m.id,
            cpu_seconds: m.node.cpu_seconds().unwrap_or(0.0),
            live_rows: counter("ndc_cluster_logs_read"),
            throttled: cap.as_ref().and_then(ndc_testkit::CpuCap::throttled),
            log_written_bytes: counter("ndc_cluster_log_written_bytes_total"),
            log_read_bytes: counter("ndc_cluster_log_read_bytes_total"),
        });
    }
    let report = Report {
        phase: format!("golden-capacity-{nodes}-rf{rf}"),
        events,
        keys: people,
        seconds,
        events_per_second: events as f64 / seconds,
        mean_event_bytes: 0,
        node_peak_rss_bytes: cluster
            .members
            .iter()
            .filter_map(|m| m.node.peak_rss())
            .max(),
        latency_ms: None,
        note: format!(
            "{nodes} node processes{}, example pipeline in {shards} shards at RF {rf}: start until every node serves every contribution and joined vehicle; topics filled beforehand (live_rows in the shares: change logs the node reads)",
            if cap {
                format!(" capped to {cores} core(s) each")
            } else {
                " NOT capped (no writable cgroup v1 cpu hierarchy)".to_string()
            }
        ),
    };
    drop(cluster);
    drop(caps);
    Ok((report, shares))
}

/// One node's share of a capacity run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeShare {
    pub node: u64,
    pub cpu_seconds: f64,
    pub live_rows: u64,
    /// Periods its CPU cap held it back, of all (`None`: not capped).
    pub throttled: Option<(u64, u64)>,
    /// Change-log bytes it wrote (as an owner) and read (as a holder).
    pub log_written_bytes: u64,
    pub log_read_bytes: u64,
}

/// Capacity of a cluster of `nodes` node processes, each capped to `cores`
/// of CPU when given (cgroup v1; without it, uncapped and accounted in CPU
/// seconds; `None`: the `cluster` phase, uncapped):
/// from their start on a topic filled beforehand until every node has
/// committed every change. Reports cluster events/s and, per node, the CPU
/// it used and the rows it holds — what tells whether adding nodes adds
/// capacity, or only copies.
///
/// `placement`: `None` runs the view unsharded on every node (each node
/// applies everything); `Some((shards, rf))` splits it in `shards` shards
/// held by `rf` nodes each (`cluster.replication_factor`).
#[allow(clippy::too_many_arguments)]
pub async fn capacity_phase(
    work: &Path,
    broker: &Broker,
    topic: &str,
    w: Workload,
    nodes: u64,
    cores: Option<f64>,
    placement: Option<(u32, usize)>,
    run: &str,
) -> anyhow::Result<(Report, Vec<NodeShare>)> {
    let cap = cores.filter(|_| ndc_testkit::CpuCap::available());
    let mut cluster = ndc_testkit::Cluster::prepare(&ndc_binary()?, work, nodes, |_| {
        let mut c = cluster_config(work, broker, topic, run);
        if let Some((shards, rf)) = placement {
            c.views[0].shards = shards;
            if let Some(cluster) = c.cluster.as_mut() {
                cluster.replication_factor = rf;
            }
        }
        c
    })?;
    let started = Instant::now();
    let mut caps = Vec::new();
    for m in &mut cluster.members {
        m.node.log_filter = "warn".into();
        m.node.start()?;
        if let (Some(cores), Some(pid)) = (cap, m.node.pid()) {
            let name = format!("ndc-bench-{}-{}", std::process::id(), m.id);
            caps.push(Some(ndc_testkit::CpuCap::apply(&name, pid, cores)?));
        } else {
            caps.push(None);
        }
    }
    let mut done = started;
    for m in &cluster.members {
        let (_, d) = wait_committed(&m.addr(), None, w.events, Duration::from_secs(3600)).await?;
        done = done.max(d);
    }
    let seconds = done.duration_since(started).as_secs_f64();
    let mut shares = Vec::new();
    // With placement: which shards each node holds.
    let holders = match placement {
        Some(_) => {
            let status = ndc_node::cluster::admin::status(&cluster.members[0].addr()).await?;
            status
                .shards
                .into_iter()
                .map(|p| (p.shard, p.holders))
                .collect()
        }
        None => std::collections::BTreeMap::<String, Vec<u64>>::new(),
    };
    for (m, cap) in cluster.members.iter().zip(&caps) {
        // What a subscriber of this node sees (its shards and the others').
        let rows = bench_view(&m.addr(), None)
            .await?
            .map_or(0, |v| v.live_rows);
        // Every person inserted once, none deleted: a node short of that
        // lost something (a measure of a wrong result is no measure).
        if rows != w.keys {
            bail!("ndc-{} serves {rows} rows, not {}", m.id, w.keys);
        }
        let text = ndc_testkit::metrics_text(m.node.http()).await;
        let counter = |name: &str| {
            ndc_testkit::metric_value(&text, |l| l.starts_with(&format!("{name} "))).unwrap_or(0.0)
                as u64
        };
        let (log_written_bytes, log_read_bytes) = (
            counter("ndc_cluster_log_written_bytes_total"),
            counter("ndc_cluster_log_read_bytes_total"),
        );
        // What it holds itself: the rows of its shards.
        let held = if placement.is_some() {
            holders
                .iter()
                .filter(|(_, h)| h.contains(&m.id))
                .map(|(shard, _)| {
                    ndc_testkit::metric_value(&text, |l| {
                        l.starts_with(&format!("ndc_view_rows{{view=\"{shard}\"}}"))
                    })
                    .unwrap_or(0.0) as u64
                })
                .sum()
        } else {
            rows
        };
        shares.push(NodeShare {
            node: m.id,
            cpu_seconds: m.node.cpu_seconds().unwrap_or(0.0),
            live_rows: held,
            throttled: cap.as_ref().and_then(ndc_testkit::CpuCap::throttled),
            log_written_bytes,
            log_read_bytes,
        });
    }
    if let Some((_, rf)) = placement {
        // Each row on `rf` nodes (all of them, with fewer nodes than that).
        let copies = rf.min(nodes as usize) as u64;
        let held: u64 = shares.iter().map(|s| s.live_rows).sum();
        if held != w.keys * copies {
            bail!(
                "the nodes hold {held} rows between them, not {} × {copies}",
                w.keys
            );
        }
    }
    let report = Report {
        phase: format!(
            "{}-{nodes}{}",
            if cores.is_some() {
                "capacity"
            } else {
                "cluster"
            },
            match placement {
                Some((_, rf)) => format!("-rf{rf}"),
                None => String::new(),
            }
        ),
        events: w.events,
        keys: w.keys,
        seconds,
        events_per_second: w.events as f64 / seconds,
        mean_event_bytes: 0,
        node_peak_rss_bytes: cluster
            .members
            .iter()
            .filter_map(|m| m.node.peak_rss())
            .max(),
        latency_ms: None,
        note: match (cap, cores) {
            (Some(cores), _) => format!(
                "{nodes} node processes capped to {cores} core(s) each (cgroup cpu.cfs_quota_us), start until every node has committed every change; topic filled beforehand"
            ),
            (None, Some(_)) => format!(
                "{nodes} node processes, NOT capped (no writable cgroup v1 cpu hierarchy): compare CPU seconds per node instead"
            ),
            (None, None) => format!(
                "{nodes} node processes from start until every node has committed every change; topic filled beforehand; RSS: largest node"
            ),
        },
    };
    // The processes go before their caps (a cgroup with a process in it
    // cannot be removed).
    drop(cluster);
    drop(caps);
    Ok((report, shares))
}

/// Time for a node to join a cluster that holds `w.keys` rows: one node
/// ingests the topic (filled beforehand) into its state; then a second node
/// starts without state and is added as a learner, and is timed from its
/// start until its view has every change — with `copy_state` by copying the
/// first node's state store, else by replaying the change logs from their
/// start. Reports the seconds to join and the bytes copied.
pub async fn join_phase(
    work: &Path,
    broker: &Broker,
    topic: &str,
    w: Workload,
    copy_state: bool,
    run: &str,
) -> anyhow::Result<Report> {
    let config = |_: u64| {
        let mut c = cluster_config(work, broker, topic, run);
        if let Some(cluster) = c.cluster.as_mut() {
            cluster.state_from_peers = copy_state;
        }
        c
    };
    let mut cluster = ndc_testkit::Cluster::prepare(&ndc_binary()?, work, 1, config)?;
    let joiner_peer = cluster.prepare_joiner(1, config(1))?;
    for m in &mut cluster.members {
        m.node.log_filter = "warn,ndc_node::node=info".into();
    }
    cluster.members[0].node.start()?;
    let first = cluster.members[0].addr();
    wait_committed(&first, None, w.events, Duration::from_secs(7200)).await?;
    let started = Instant::now();
    cluster.members[1].node.start()?;
    // The joiner listens once its state is in place (copied or empty).
    cluster.members[1]
        .node
        .wait_started(Duration::from_secs(3600))?;
    let listening = started.elapsed().as_secs_f64();
    ndc_node::cluster::admin::add_node(&first, 1, &joiner_peer, true).await?;
    let (_, done) = wait_committed(
        &cluster.members[1].addr(),
        None,
        w.events,
        Duration::from_secs(7200),
    )
    .await?;
    let seconds = done.duration_since(started).as_secs_f64();
    let rows = bench_view(&cluster.members[1].addr(), None)
        .await?
        .map_or(0, |v| v.live_rows);
    if rows != w.keys {
        bail!("the joiner holds {rows} rows, not {}", w.keys);
    }
    let metrics = ndc_testkit::metrics_text(cluster.members[1].node.http()).await;
    let copied = ndc_testkit::metric_value(&metrics, |l| {
        l.starts_with("ndc_cluster_state_received_bytes_total")
    })
    .unwrap_or(0.0);
    let report = Report {
        phase: format!("join-{}", if copy_state { "copy" } else { "replay" }),
        events: w.events,
        keys: w.keys,
        seconds,
        events_per_second: w.events as f64 / seconds,
        mean_event_bytes: 0,
        node_peak_rss_bytes: cluster.members[1].node.peak_rss(),
        latency_ms: None,
        note: format!(
            "joiner start until its view has every change ({} rows); listening after {listening:.1} s; {:.0} MiB of state copied; joiner CPU {:.1} s",
            rows,
            copied / (1024.0 * 1024.0),
            cluster.members[1].node.cpu_seconds().unwrap_or(0.0)
        ),
    };
    drop(cluster);
    Ok(report)
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Placeholder of the send time in a prepared event: as many digits as a
/// microsecond Unix time has (until the year 2286), so that stamping it is
/// an overwrite in place.
const STAMP_PLACEHOLDER: &str = "1000000000000000";

/// An update event whose `after.sent_at_us` is stamped when it is sent.
struct StampedEvent {
    key: Vec<u8>,
    value: Vec<u8>,
    stamp_at: usize,
}

impl StampedEvent {
    fn stamp(&mut self, now_us: i64) {
        let digits = now_us.to_string();
        if digits.len() == STAMP_PLACEHOLDER.len() {
            self.value[self.stamp_at..self.stamp_at + digits.len()]
                .copy_from_slice(digits.as_bytes());
        }
    }
}

/// The latency phase's events, built before its clock starts: building and
/// re-serialising JSON per event cost the generator most of a core, taken
/// from the node and the broker it measures on the same two cores.
fn prepare_stamped_events(keys: u64, total: u64) -> anyhow::Result<Vec<StampedEvent>> {
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    let mut revisions = vec![0u32; keys as usize];
    let mut rng = Rng::new(11);
    let field = format!("\"sent_at_us\":{STAMP_PLACEHOLDER}");
    let mut events = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let i = rng.below(keys);
        revisions[i as usize] += 1;
        let e = feed.event('u', i, revisions[i as usize], None);
        let mut v: serde_json::Value =
            serde_json::from_slice(e.value.as_deref().unwrap_or_default())?;
        v["after"]["sent_at_us"] = serde_json::from_str(STAMP_PLACEHOLDER)?;
        let value = v.to_string();
        let stamp_at = value
            .find(&field)
            .context("placeholder of the send time in the event")?
            + field.len()
            - STAMP_PLACEHOLDER.len();
        events.push(StampedEvent {
            key: e.key,
            value: value.into_bytes(),
            stamp_at,
        });
    }
    Ok(events)
}

/// The send time a latency-phase row carries, read without parsing the row.
fn sent_at_us(after_json: &str) -> Option<i64> {
    let rest = &after_json[after_json.find("\"sent_at_us\":")? + 13..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Where the latency phase's events enter the node.
pub enum LatencyFeed<'a> {
    /// Produced to `topic` on the test broker, which shares the node's cores.
    Broker { broker: &'a Broker, topic: &'a str },
    /// Appended to a file the node follows: the node's own latency, without
    /// a broker's batching, fetch waits and CPU on the same two cores.
    File,
}

/// Steady `rate` events/s for `seconds`; latency from the event's send
/// (producer send, or write to the followed file) to subscriber receipt,
/// per change.
pub async fn latency_phase(
    work: &Path,
    feed: LatencyFeed<'_>,
    keys: u64,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Report> {
    use ndc_proto::v1::subscription_client::SubscriptionClient;
    use ndc_proto::v1::{
        Latest, SubscribeRequest, subscribe_request::Start, subscribe_response::Kind,
    };
    // The first seconds warm up (partition assignment, first fetches,
    // connection set-up) and are not recorded.
    let warmup = 3;
    let total = rate * (seconds + warmup);
    let prepared = prepare_stamped_events(keys, total)?;
    // NDC_BENCH_FEED_DIR: where the followed file is written (default: the
    // work dir, beside the node's state). On tmpfs, the generator's ~12 MB/s
    // of input no longer shares the state's file system and its writeback,
    // as input from the network would not (docs/performance.md).
    let feed_dir =
        std::env::var_os("NDC_BENCH_FEED_DIR").map_or_else(|| work.to_path_buf(), PathBuf::from);
    let export = feed_dir.join(format!("latency-{}.ndjson", std::process::id()));
    let c = match &feed {
        LatencyFeed::Broker { broker, topic } => {
            let mut c = kafka_config(work, broker, topic);
            if let Ok(props) = std::env::var("NDC_BENCH_KAFKA_PROPERTIES") {
                for kv in props.split(',').filter(|kv| !kv.is_empty()) {
                    if let Some((k, v)) = kv.split_once('=')
                        && let Some(kafka) = c.kafka.as_mut()
                    {
                        kafka.properties.insert(k.into(), v.into());
                    }
                }
            }
            c
        }
        LatencyFeed::File => {
            std::fs::File::create(&export)?;
            file_config(work, &export, true)
        }
    };
    let mut node = NodeProcess::start(&c, work)?;
    node.wait_ready(Duration::from_secs(30)).await?;
    let mut client = SubscriptionClient::new(node.channel().await?);
    let mut stream = client
        .subscribe(SubscribeRequest {
            view: VIEW.into(),
            start: Some(Start::Latest(Latest {})),
            keys: vec![],
            fields: vec![],
            max_batch_size: 0,
        })
        .await?
        .into_inner();
    let measure_from_us = now_us() + (warmup as i64) * 1_000_000;
    // NDC_BENCH_TIMELINE=<ms>: the timeline's step (1: a second).
    let step_us = std::env::var("NDC_BENCH_TIMELINE")
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
        .map_or(1_000_000, |ms| if ms > 1 { ms * 1000 } else { 1_000_000 });
    let receiver = tokio::spawn(async move {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
        // Split at the node's commit: send → commit (broker and ingest) and
        // commit → receipt (serving), in ms (commit times are ms).
        let mut ingest = Histogram::<u64>::new_with_bounds(1, 60_000, 3).expect("valid bounds");
        let mut serve = Histogram::<u64>::new_with_bounds(1, 60_000, 3).expect("valid bounds");
        // Per step of the run, by send time, the worst latency and the
        // worst of each half (send -> commit, commit -> receipt), in ms: the
        // tail's moments, to lay beside the node's log (flushes, compactions).
        let mut worst_per_step: BTreeMap<i64, (i64, i64, i64)> = BTreeMap::new();
        let mut got = 0u64;
        while got < total {
            let Ok(Ok(Some(msg))) =
                tokio::time::timeout(Duration::from_secs(30), stream.message()).await
            else {
                break;
            };
            let received = now_us();
            if let Some(Kind::Batch(b)) = msg.kind {
                for change in b.changes {
                    got += 1;
                    let sent = change.after_json.as_deref().and_then(sent_at_us);
                    if let Some(sent) = sent.filter(|s| *s >= measure_from_us) {
                        let _ = hist.record((received - sent).max(1) as u64);
                        let committed_us = change.committed_at_ms * 1000;
                        let worst = worst_per_step.entry(sent / step_us).or_default();
                        worst.0 = worst.0.max((received - sent) / 1000);
                        worst.1 = worst.1.max((committed_us - sent) / 1000);
                        worst.2 = worst.2.max((received - committed_us) / 1000);
                        let _ = ingest.record(((committed_us - sent) / 1000).max(1) as u64);
                        let _ = serve.record(((received - committed_us) / 1000).max(1) as u64);
                    }
                }
            }
        }
        (hist, ingest, serve, worst_per_step)
    });
    let phase = match feed {
        LatencyFeed::Broker { .. } => "latency",
        LatencyFeed::File => "latency-file",
    };
    let (sent_for, how, generator_late) = match feed {
        LatencyFeed::Broker { broker, topic } => {
            let linger = std::env::var("NDC_BENCH_LINGER_MS").unwrap_or_else(|_| "5".into());
            let sent_for = send_to_broker(broker, topic, &linger, prepared, rate).await?;
            (
                sent_for,
                format!("producer send (linger {linger} ms)"),
                BTreeMap::new(),
            )
        }
        LatencyFeed::File => {
            let (sent_for, late) = append_to_file(&export, prepared, rate, step_us).await?;
            (sent_for, "write to the followed file".to_string(), late)
        }
    };
    let (hist, ingest, serve, worst_per_step) = receiver.await?;
    if std::env::var_os("NDC_BENCH_TIMELINE").is_some() {
        for (step, (worst, ingest, serve)) in &worst_per_step {
            let second = *step as f64 * step_us as f64 / 1e6;
            let late = generator_late
                .get(step)
                .map_or(String::new(), |l| format!("; generator {l} ms behind"));
            println!(
                "  second {second:.1} (unix, sent): worst latency {worst} ms \
                 (send->commit {ingest}, commit->receipt {serve}){late}"
            );
        }
    }
    let split = format!(
        "; send->commit p50 {} p99 {} ms, commit->receipt p50 {} p99 {} ms",
        ingest.value_at_quantile(0.5),
        ingest.value_at_quantile(0.99),
        serve.value_at_quantile(0.5),
        serve.value_at_quantile(0.99)
    );
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let cpu = node
        .cpu_seconds()
        .map(|s| format!("; node CPU {:.2} cores", s / (sent_for + warmup as f64)))
        .unwrap_or_default();
    let inside = node
        .metrics()
        .await
        .map(|m| node_breakdown(&m))
        .unwrap_or_default();
    let report = Report {
        phase: label(phase, &node),
        events: total,
        keys,
        seconds: sent_for,
        events_per_second: total as f64 / sent_for,
        mean_event_bytes: 0,
        node_peak_rss_bytes: node.peak_rss(),
        latency_ms: Some(Percentiles {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: hist.max() as f64 / 1000.0,
            samples: hist.len(),
        }),
        note: format!(
            "steady {rate}/s after {warmup} s warm-up, {how} to subscriber receipt{split}{cpu}{inside}"
        ),
    };
    drop(node);
    let _ = std::fs::remove_file(&export);
    Ok(report)
}

/// Sends `events` at `rate` per second, each stamped as it is sent; returns
/// the seconds the sending took.
async fn send_to_broker(
    broker: &Broker,
    topic: &str,
    linger: &str,
    events: Vec<StampedEvent>,
    rate: u64,
) -> anyhow::Result<f64> {
    use futures::StreamExt;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        // Kafka's own default since 4.0 (KIP-1030). With 0, librdkafka's
        // broker thread wakes for every message: measured here at ~0.45 of
        // a core at 20,000/s, taken from the node and the broker under test.
        // The linger is inside the measured latency (it starts at send).
        .set("linger.ms", linger)
        .set("enable.idempotence", "true")
        .create()?;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let started = Instant::now();
    let mut inflight = futures::stream::FuturesUnordered::new();
    for (n, mut e) in events.into_iter().enumerate() {
        let due = started + interval.mul_f64(n as f64);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        e.stamp(now_us());
        let p = producer.clone();
        inflight.push(async move {
            p.send(
                FutureRecord::to(topic)
                    .key(e.key.as_slice())
                    .payload(e.value.as_slice()),
                Duration::from_secs(30),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
        });
        while inflight.len() > 5000 {
            if let Some(r) = inflight.next().await {
                r?;
            }
        }
        // Collect finished sends without waiting.
        while let Some(Some(r)) = futures::FutureExt::now_or_never(inflight.next()) {
            r?;
        }
    }
    while let Some(r) = inflight.next().await {
        r?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Appends `events` to `path` at `rate` per second, each stamped as it is
/// written; the events due at one wakeup go out in one write, and the file is
/// synced as it grows, as an agency's exporter would. Returns the seconds it
/// took and, per timeline step of `step_us` (by stamp, as the receiver keys
/// its steps), how late (ms) the generator itself ran behind its schedule: a
/// stall there is the machine's, not the node's.
async fn append_to_file(
    path: &Path,
    events: Vec<StampedEvent>,
    rate: u64,
    step_us: i64,
) -> anyhow::Result<(f64, BTreeMap<i64, i64>)> {
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    // NDC_BENCH_FEED_SYNC_MS (default 250; 0: never): how often the file is
    // flushed to disk as it grows, on a thread of its own, as a well-behaved
    // exporter would. Left to the kernel, its dirty pages were written back
    // all at once 30 s later (`vm.dirty_expire_centisecs`), hundreds of MB,
    // and stalled the node's WAL fsyncs on the same ext4 file system for
    // 60-190 ms (docs/performance.md): the harness's stall, not the node's.
    let sync_every = std::env::var("NDC_BENCH_FEED_SYNC_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(250);
    let _syncing = match sync_every {
        0 => None,
        ms => Some(sync_periodically(
            file.try_clone()?,
            Duration::from_millis(ms),
        )?),
    };
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let started = Instant::now();
    let mut pending = Vec::with_capacity(1 << 20);
    let mut late_per_step: BTreeMap<i64, i64> = BTreeMap::new();
    for (n, mut e) in events.into_iter().enumerate() {
        let due = started + interval.mul_f64(n as f64);
        let now = Instant::now();
        let late = now.saturating_duration_since(due).as_millis() as i64;
        if due > now {
            if !pending.is_empty() {
                file.write_all(&pending)?;
                pending.clear();
            }
            tokio::time::sleep(due - now).await;
        }
        let stamp = now_us();
        e.stamp(stamp);
        let worst = late_per_step.entry(stamp / step_us).or_default();
        *worst = (*worst).max(late);
        pending.extend_from_slice(&e.value);
        pending.push(b'\n');
    }
    file.write_all(&pending)?;
    Ok((started.elapsed().as_secs_f64(), late_per_step))
}

/// Calls `fdatasync` on `file` every `every` until the returned sender is
/// dropped.
fn sync_periodically(
    file: std::fs::File,
    every: Duration,
) -> std::io::Result<std::sync::mpsc::Sender<()>> {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("feed-sync".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every)
            {
                if let Err(e) = file.sync_data() {
                    eprintln!("cannot sync the followed file, no longer syncing it: {e}");
                    break;
                }
            }
        })?;
    Ok(stop)
}

/// The bucket bound at or below which `q` of a Prometheus histogram's
/// observations fall (over all its label sets): enough to tell a 2 ms
/// commit from a 100 ms one.
pub fn histogram_quantile(metrics: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{");
    // Keyed by the bound's bits: bounds are never negative, and the bits of
    // non-negative floats (+Inf included) order as the numbers do.
    let mut buckets: BTreeMap<u64, f64> = BTreeMap::new();
    for line in metrics.lines().filter(|l| l.starts_with(&prefix)) {
        let le = line.split("le=\"").nth(1)?.split('"').next()?;
        let count: f64 = line.rsplit(' ').next()?.parse().ok()?;
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        *buckets.entry(bound.to_bits()).or_default() += count;
    }
    let total = *buckets.values().next_back()?;
    buckets
        .into_iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(b, _)| f64::from_bits(b))
}

/// Where the node's time went in a latency phase, from its own histograms.
fn node_breakdown(metrics: &str) -> String {
    use ndc_node::telemetry::metric;
    let q = |name: &str, q: f64| {
        histogram_quantile(metrics, name, q).map_or("?".to_string(), |v| {
            if v.is_finite() {
                format!("{}", v * 1000.0)
            } else {
                "inf".into()
            }
        })
    };
    let records = |q: f64| {
        histogram_quantile(metrics, metric::BATCH_RECORDS, q)
            .map_or("?".to_string(), |v| format!("{v}"))
    };
    format!(
        "; node: batch start->durable p50 <= {} p99 <= {} max <= {} ms (the durable write alone p50 <= {} \
         p99 <= {} max <= {} ms), batch records p50 <= {} p99 <= {}, commit->send p99 <= {} ms",
        q(metric::COMMIT_SECONDS, 0.5),
        q(metric::COMMIT_SECONDS, 0.99),
        q(metric::COMMIT_SECONDS, 1.0),
        q(metric::STATE_WRITE_SECONDS, 0.5),
        q(metric::STATE_WRITE_SECONDS, 0.99),
        q(metric::STATE_WRITE_SECONDS, 1.0),
        records(0.5),
        records(0.99),
        q(metric::DELIVERY_LATENCY, 0.99),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_buckets_of_every_label_set() {
        let text = "\
# TYPE h histogram
h_bucket{view=\"a\",le=\"0.001\"} 50
h_bucket{view=\"a\",le=\"0.01\"} 98
h_bucket{view=\"a\",le=\"+Inf\"} 100
h_bucket{view=\"b\",le=\"0.001\"} 0
h_bucket{view=\"b\",le=\"0.01\"} 0
h_bucket{view=\"b\",le=\"+Inf\"} 100
h_sum 1
h_count 200
";
        assert_eq!(histogram_quantile(text, "h", 0.25), Some(0.001));
        assert_eq!(histogram_quantile(text, "h", 0.49), Some(0.01));
        assert_eq!(histogram_quantile(text, "h", 0.99), Some(f64::INFINITY));
        assert_eq!(histogram_quantile(text, "other", 0.5), None);
    }
}
