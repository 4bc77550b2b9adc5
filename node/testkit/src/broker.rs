//! A real Kafka-protocol broker for tests: tansu with in-memory storage, on
//! a loopback port chosen at run time; behind stunnel when it must speak
//! TLS; on tansu's SlateDB storage (in memory too) when records must be
//! deleted (DeleteRecords, which the default storage does not implement).
//! librdkafka's mock cluster only where the load test compares with it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `kafka.resume_rewind_records` for tansu 0.6.0, which answers a fetch
/// inside a record batch with the next batch (`node/tests/broker_fetch.rs`):
/// more than any batch the tests' producers write.
pub const TANSU_RESUME_REWIND: u64 = 10_000;

/// A broker process (or the mock cluster), stopped when dropped.
pub struct Broker {
    child: Option<Child>,
    /// The TLS terminator in front of the broker, when it speaks TLS.
    tls: Option<Child>,
    mock: Option<rdkafka::mocking::MockCluster<'static, DefaultProducerContext>>,
    pub bootstrap: String,
    /// librdkafka properties every client of this broker needs (TLS ...).
    pub client_properties: Vec<(String, String)>,
}

/// The tansu binary: `NDC_TANSU_BIN`, else where `./dev.sh setup` puts it.
pub fn tansu_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("NDC_TANSU_BIN") {
        return Ok(PathBuf::from(p));
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cached = PathBuf::from(home).join(".cache/ndc/tansu-0.6.0-slatedb/bin/tansu");
    if cached.exists() {
        return Ok(cached);
    }
    bail!(
        "tansu (the test broker) is not installed: run ./dev.sh setup, or set NDC_TANSU_BIN. \
         These tests need a real Kafka-protocol broker and do not skip without one."
    )
}

/// A loopback port free right now, for a process that cannot be handed a
/// socket (tansu binds its own): the caller retries when it was taken.
fn probe_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Where a tansu broker keeps its records (both in memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Storage {
    /// tansu's default storage, `memory://`: no DeleteRecords.
    Memory,
    /// SlateDB over an in-memory object store, `slatedb://memory`:
    /// DeleteRecords moves a partition's start (needs tansu built with
    /// `tansu-broker/slatedb`, as `./dev.sh setup` does).
    Slate,
}

/// tansu listening on `listen` and advertising `advertise` (URLs
/// `tcp://host:port`).
fn spawn_tansu(
    bin: &Path,
    listen: &str,
    advertise: &str,
    storage: Storage,
) -> anyhow::Result<Child> {
    let engine = match storage {
        Storage::Memory => "memory://tansu/",
        Storage::Slate => "slatedb://memory/",
    };
    Command::new(bin)
        .args(["broker", "--listener-url", listen])
        .args(["--advertised-listener-url", advertise])
        .args(["--storage-engine", engine])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start tansu ({})", bin.display()))
}

impl Broker {
    /// A tansu broker; panics when it cannot start.
    pub fn start() -> Broker {
        Broker::try_start().expect("start the test broker")
    }

    /// A tansu broker. tansu binds its port itself: a port taken between the
    /// probe and tansu's bind shows as a broker that never answers, and the
    /// start is tried again on another port.
    pub fn try_start() -> anyhow::Result<Broker> {
        Broker::try_start_on(Storage::Memory)
    }

    /// A tansu broker whose partitions can be trimmed (Kafka DeleteRecords:
    /// the change logs' trimming); panics when it cannot start.
    pub fn start_trimmable() -> Broker {
        Broker::try_start_on(Storage::Slate).expect(
            "start the test broker on SlateDB storage (tansu built with tansu-broker/slatedb: ./dev.sh setup)",
        )
    }

    fn try_start_on(storage: Storage) -> anyhow::Result<Broker> {
        let bin = tansu_binary()?;
        Broker::until_ready("tansu", || {
            let port = probe_port()?;
            let url = format!("tcp://127.0.0.1:{port}");
            Ok(Broker {
                child: Some(spawn_tansu(&bin, &url, &url, storage)?),
                tls: None,
                mock: None,
                bootstrap: format!("127.0.0.1:{port}"),
                client_properties: Vec::new(),
            })
        })
    }

    /// Starts a broker with `start` until one answers (five tries: each on
    /// ports probed anew; one that does not answer is dropped, which stops
    /// its processes).
    fn until_ready(
        what: &str,
        mut start: impl FnMut() -> anyhow::Result<Broker>,
    ) -> anyhow::Result<Broker> {
        for _ in 0..5 {
            let mut broker = start()?;
            if broker.wait_ready(Duration::from_secs(15)) {
                return Ok(broker);
            }
        }
        bail!("{what} did not become ready")
    }

    /// librdkafka's in-process mock cluster: for the load test's comparison
    /// only (`NDC_BENCH_BROKER=mock`), never the proof of anything.
    pub fn start_mock() -> anyhow::Result<Broker> {
        let mock = rdkafka::mocking::MockCluster::new(1)?;
        Ok(Broker {
            child: None,
            tls: None,
            bootstrap: mock.bootstrap_servers(),
            mock: Some(mock),
            client_properties: Vec::new(),
        })
    }

    /// A broker that speaks only TLS: tansu behind stunnel (Debian's
    /// `stunnel4`), which holds the certificate made in `dir` (tansu 0.6.0
    /// has no TLS listener of its own); tansu advertises stunnel's port, so
    /// every connection, after the first metadata answer too, is TLS.
    /// Clients trust `dir/ca.pem` (see `client_properties`).
    pub fn start_tls(dir: &Path) -> Broker {
        crate::certs::make_certificates(dir, "ndc-test-ca");
        let bin = tansu_binary().unwrap();
        Broker::until_ready("tansu behind stunnel", || {
            let (plain, tls) = (probe_port()?, probe_port()?);
            let child = spawn_tansu(
                &bin,
                &format!("tcp://127.0.0.1:{plain}"),
                &format!("tcp://127.0.0.1:{tls}"),
                Storage::Memory,
            )?;
            let conf = dir.join("stunnel.conf");
            std::fs::write(
                &conf,
                format!(
                    "foreground = yes\npid =\nsyslog = no\noutput = {}\n[kafka]\naccept = 127.0.0.1:{tls}\nconnect = 127.0.0.1:{plain}\ncert = {}\nkey = {}\n",
                    dir.join("stunnel.log").display(),
                    dir.join("server.pem").display(),
                    dir.join("server.key").display()
                ),
            )?;
            let stunnel = Command::new("stunnel4")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start stunnel4 (Debian package stunnel4; ./dev.sh setup installs it)")?;
            Ok(Broker {
                child: Some(child),
                tls: Some(stunnel),
                mock: None,
                bootstrap: format!("127.0.0.1:{tls}"),
                client_properties: vec![
                    ("security.protocol".into(), "ssl".into()),
                    (
                        "ssl.ca.location".into(),
                        dir.join("ca.pem").display().to_string(),
                    ),
                ],
            })
        })
        .expect("start tansu behind stunnel")
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

    /// Whether the broker answers metadata requests before `timeout` (false
    /// at once when its process died, e.g. on a port taken meanwhile).
    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            for child in self.child.iter_mut().chain(self.tls.as_mut()) {
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
            }
            let Ok(consumer) = self.client().create::<BaseConsumer>() else {
                return false;
            };
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

    /// Creates `name` with `partitions`; panics when it cannot.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        self.try_create_topic(name, partitions)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    pub async fn try_create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        if let Some(mock) = &self.mock {
            mock.create_topic(name, partitions, 1)?;
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> = self.client().create()?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for r in admin.create_topics(&[topic], &AdminOptions::new()).await? {
            r.map_err(|(t, e)| anyhow::anyhow!("create topic {t}: {e}"))?;
        }
        Ok(())
    }

    /// An idempotent producer sending at once (tests) — see
    /// [`Broker::bulk_producer`] for filling topics.
    pub fn producer(&self) -> FutureProducer {
        self.client()
            .set("enable.idempotence", "true")
            .set("linger.ms", "2")
            .create()
            .expect("a producer")
    }

    /// An idempotent producer batching for throughput (the load test).
    pub fn bulk_producer(&self) -> anyhow::Result<FutureProducer> {
        Ok(self
            .client()
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "1000000")
            .set("enable.idempotence", "true")
            .create()?)
    }

    /// Reads every record of `topic` (all partitions) until `n` are seen or
    /// `timeout` passes.
    pub fn read_all(
        &self,
        topic: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<rdkafka::message::OwnedMessage> {
        static READERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let reader = READERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let consumer: BaseConsumer = self
            .client()
            .set(
                "group.id",
                format!("test-reader-{}-{reader}", std::process::id()),
            )
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
        for child in self.child.iter_mut().chain(self.tls.as_mut()) {
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

/// A producer placing keyed records with Kafka's default partitioner
/// (librdkafka's `murmur2_random`, what Kafka Connect and so Debezium use),
/// not the CRC32 one librdkafka uses by default.
pub fn kafka_partitioned_producer(broker: &Broker) -> FutureProducer {
    broker
        .client()
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .create()
        .expect("a producer")
}

/// Publishes a keyed record to `partition`, or where the producer's
/// partitioner puts it; returns the partition it went to.
pub async fn publish_keyed(
    p: &FutureProducer,
    topic: &str,
    key: &str,
    value: &[u8],
    partition: Option<i32>,
) -> i32 {
    let mut r: FutureRecord<'_, [u8], [u8]> =
        FutureRecord::to(topic).key(key.as_bytes()).payload(value);
    if let Some(p) = partition {
        r = r.partition(p);
    }
    p.send(r, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap()
        .partition
}

/// Publishes one synthetic change event (tombstone if it has no value).
pub async fn publish_event(
    p: &FutureProducer,
    topic: &str,
    e: &ndc_node::quickstart::synthetic::Event,
) {
    publish(p, topic, Some(&e.key), e.value.as_deref()).await;
}

/// A header of a record, as text.
pub fn header<'a>(m: &'a rdkafka::message::OwnedMessage, name: &str) -> Option<&'a str> {
    use rdkafka::message::Headers;
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}
