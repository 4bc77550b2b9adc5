//! Cluster mode of a node: the coordinator, the registration of source
//! partitions, and the cluster's change log.
//!
//! In a cluster, the owner of a source partition does not commit its
//! decisions to its own state: it writes their effects to the view's change
//! log (`<changes_topic_prefix><view>`, or `….shard<i>` per shard of a
//! sharded view; one partition, so every reader reads one order), and every
//! holder of the shard (every node, without placement), the owner included,
//! applies that log to its RocksDB state ([`run_log_source`] feeds the state
//! writer). Every holder thus has the shard's rows and the same change
//! stream, with the same sequence numbers: a subscriber can resume on any
//! node with its token (shards a node does not hold are read from their
//! holders), and an owner-to-be has its shard's state already.

pub mod state_transfer;
pub mod trim;

use crate::client::ClientTls;
use crate::config::{ClusterSection, KafkaSection, NodeConfig, parse_peer};
use crate::kafka::client_config;
use crate::telemetry::metric;
use anyhow::Context;
use ndc_coordinator::{Coordinator, CoordinatorConfig, Peer};
use ndc_operators::ViewId;
use ndc_proto::state::LogRecord;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// A record of a view's change log (cluster mode), read at `offset`.
#[derive(Debug)]
pub struct LogInput {
    pub view: ViewId,
    /// Offsets-store stream of the change log.
    pub stream: Arc<str>,
    pub offset: u64,
    pub record: LogRecord,
    /// A copy of the shard's whole state that replaces this node's (the log
    /// was trimmed past it; see [`trim`]); `offset` is then the next log
    /// offset the copy has applied, and `record` is empty.
    /// Each view's copy is a file ([`ndc_operators::copy_file`]), removed
    /// once installed.
    pub copy: Option<Vec<(String, std::path::PathBuf)>>,
}

/// How a node copies a shard from a holder: over the peer listener with
/// this TLS, spilling the copy to files in `dir` as it arrives.
#[derive(Clone)]
pub struct ShardCopies {
    pub tls: ClientTls,
    pub dir: std::path::PathBuf,
}

/// The cluster's change logs, shared by the state writer (which writes
/// decided effects and applies the logs) and the assignment follower (which
/// writes fences and waits for them to come back).
pub struct ClusterLog {
    pub producer: FutureProducer,
    /// View → its change-log topic.
    pub topics: BTreeMap<ViewId, String>,
    /// View → name of the view (for partition ids).
    pub names: BTreeMap<ViewId, String>,
    /// View → next log offset this node has applied.
    pub applied: BTreeMap<ViewId, watch::Receiver<u64>>,
    /// Consumer assignments of which the writer dropped records.
    pub revoked: Revocations,
}

/// Consumer assignments of which the writer dropped records (fenced: lease
/// lapsed or partition moved). The rest of such an assignment is dropped
/// too, and the consumer restarts the partition from the committed offset
/// under a new assignment: going on after a dropped record would skip it.
/// A revocation is never taken back — records of the old assignment may
/// still wait in the channel after the restart, and deciding them would
/// move the stored offset past the dropped ones (a lost batch, seen under
/// CPU caps when the restart forgot it). One id is kept per lapse.
#[derive(Debug, Default)]
pub struct Revocations(std::sync::Mutex<std::collections::HashSet<u64>>);

impl Revocations {
    /// Whether records of `assignment` may be decided: not if it was
    /// revoked; else as `may_act` says (the lease and epoch now), and if it
    /// says no, the assignment is revoked for good.
    pub fn admit(&self, assignment: u64, may_act: impl FnOnce() -> bool) -> bool {
        if self.set().contains(&assignment) {
            return false;
        }
        let ok = may_act();
        if !ok {
            self.set().insert(assignment);
        }
        ok
    }

    pub fn contains(&self, assignment: u64) -> bool {
        self.set().contains(&assignment)
    }

    /// Every revoked assignment.
    pub fn snapshot(&self) -> std::collections::HashSet<u64> {
        self.set().clone()
    }

    /// The set, also after a thread panicked holding it: a set of ids stays
    /// consistent, and reading it as empty would let a fenced assignment's
    /// records through.
    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u64>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Offsets-store stream name of a change-log topic.
pub fn log_stream(topic: &str) -> String {
    format!("log:{topic}:0")
}

/// Incarnation of a view in a cluster: the same on every node, derived from
/// its change log, so that resume tokens are valid on every node.
pub fn incarnation_of(topic: &str) -> u64 {
    // FNV-1a: stable across releases and platforms (unlike std's hasher).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "ndc-cluster-log:".bytes().chain(topic.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl ClusterLog {
    /// Appends records to `view`'s change log in order; returns their offsets.
    pub async fn append(&self, view: ViewId, records: &[LogRecord]) -> anyhow::Result<Vec<u64>> {
        let topic = self.topics.get(&view).context("view has no change log")?;
        let payloads: Vec<(Vec<u8>, &str)> = records
            .iter()
            .map(|r| (r.encode_to_vec(), r.partition.as_str()))
            .collect();
        // Enqueued in order; the idempotent producer keeps that order.
        let sends = payloads.iter().map(|(bytes, key)| {
            self.producer.send(
                FutureRecord::to(topic)
                    .partition(0)
                    .key(*key)
                    .payload(bytes),
                Duration::from_secs(30),
            )
        });
        let mut offsets = Vec::with_capacity(records.len());
        for result in futures::future::join_all(sends).await {
            match result {
                Ok(d) => offsets.push(u64::try_from(d.offset).map_err(|_| {
                    anyhow::anyhow!(
                        "change log {topic}: the broker acknowledged a write at offset {}",
                        d.offset
                    )
                })?),
                Err((e, _)) => anyhow::bail!("cannot write to change log {topic}: {e}"),
            }
        }
        for (bytes, _) in &payloads {
            metrics::counter!(metric::LOG_BYTES_WRITTEN).increment(bytes.len() as u64);
        }
        Ok(offsets)
    }

    /// A new owner's first step on a partition: writes a fence with its epoch
    /// and waits until this node has applied the log up to it. From then on
    /// the state holds every effect of earlier owners that counts, and the
    /// partition's stored source offset says where to resume.
    pub async fn fence(
        &self,
        view: ViewId,
        partition: &str,
        epoch: u64,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let record = LogRecord {
            view: self.names.get(&view).cloned().unwrap_or_default(),
            epoch,
            partition: partition.to_string(),
            fence: true,
            ..LogRecord::default()
        };
        let offset = self
            .append(view, &[record])
            .await?
            .first()
            .copied()
            .unwrap_or(0);
        let mut applied = self
            .applied
            .get(&view)
            .context("view has no change log")?
            .clone();
        tokio::select! {
            r = applied.wait_for(|next| *next > offset) => { r.context("state writer stopped")?; }
            _ = shutdown.cancelled() => anyhow::bail!("shutting down"),
        }
        Ok(())
    }
}

/// Creates the change-log topics that do not exist yet (one partition each,
/// kept forever: every node, including one added later, reads them from the
/// start).
pub async fn create_log_topics(
    kafka: &KafkaSection,
    cluster: &ClusterSection,
    topics: &[String],
) -> anyhow::Result<()> {
    crate::kafka::create_topics(kafka, topics, 1, cluster.changes_replication, "change-log").await
}

/// Reads the change logs of the views this node holds (every view, unless
/// placement says otherwise) from the offset stored with the state, and
/// hands their records to the state writer. Follows placement: a shard
/// gained is read from where this node left it (its stored offset; the
/// log's start if it never held it), a shard lost is no longer read.
///
/// With `copies` (the logs may be trimmed), a log whose records this node
/// needs are gone (a gap that persists) is not applied across the gap: the
/// shard's state is copied from another holder, installed by the writer,
/// and the log read on from the copy's position.
pub async fn run_log_source(
    kafka: KafkaSection,
    log: Arc<ClusterLog>,
    coordinator: Coordinator,
    start: BTreeMap<ViewId, Option<u64>>,
    tx: crate::views::Inputs<LogInput>,
    copies: Option<ShardCopies>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if let Some(c) = &copies {
        // Left by copies cut short (the node stopped): never installed.
        let _ = std::fs::remove_dir_all(&c.dir);
        std::fs::create_dir_all(&c.dir)
            .with_context(|| format!("cannot create {}", c.dir.display()))?;
    }
    let consumer: StreamConsumer = crate::kafka::consumer_config(
        &kafka,
        &format!("{}-log", kafka.group_id),
        crate::config::StartFrom::Earliest,
    )
    .create()
    .context("cannot create the change-log consumer")?;
    let mut views: BTreeMap<String, (ViewId, Arc<str>)> = BTreeMap::new();
    // Per log topic: read once, in order, gaps read again. Only nodes write
    // a change log, without transactions: its offsets have no gaps, and
    // every node must apply every record. Kept across placement changes:
    // a shard held again resumes after the last record handed on.
    let mut expected: BTreeMap<String, crate::kafka::Gapless> = BTreeMap::new();
    for (view, topic) in &log.topics {
        let next = start.get(view).copied().flatten();
        views.insert(topic.clone(), (*view, log_stream(topic).into()));
        expected.insert(
            topic.clone(),
            crate::kafka::Gapless::new(next.unwrap_or(0), false),
        );
    }
    let me = coordinator.node_id();
    let held_topics = |state: &ndc_coordinator::ClusterState| -> BTreeSet<String> {
        log.topics
            .iter()
            .filter(|(view, _)| log.names.get(view).is_none_or(|name| state.holds(me, name)))
            .map(|(_, topic)| topic.clone())
            .collect()
    };
    let mut placement = coordinator.watch();
    let mut reading: Option<BTreeSet<String>> = None;
    // Logs whose shard is being copied from a holder (their records are
    // not applied meanwhile), and the copies as they arrive.
    let mut copying: BTreeSet<String> = BTreeSet::new();
    let (copied_tx, mut copied_rx) = tokio::sync::mpsc::channel::<(String, trim::ShardCopy)>(4);
    let mut quiet_errors = false;
    // Placement is looked at when it changes, not for every record.
    let mut placement_changed = true;
    loop {
        let wanted = placement_changed
            .then(|| held_topics(&placement.borrow_and_update().cluster))
            .filter(|w| reading.as_ref() != Some(w));
        placement_changed = false;
        if let Some(wanted) = wanted {
            let mut tpl = TopicPartitionList::new();
            for topic in &wanted {
                let next = expected.get(topic).map(|e| e.next()).unwrap_or(0);
                let offset = match next {
                    0 => Offset::Beginning,
                    n => crate::kafka::resume_offset(&kafka, n),
                };
                tpl.add_partition_offset(topic, 0, offset)?;
            }
            consumer.assign(&tpl)?;
            if let Some(before) = &reading {
                let gained: Vec<&String> = wanted.difference(before).collect();
                let lost: Vec<&String> = before.difference(&wanted).collect();
                info!(?gained, ?lost, "change logs read here follow placement");
            }
            metrics::gauge!(metric::LOGS_READ).set(wanted.len() as f64);
            reading = Some(wanted);
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = placement.changed() => {
                if r.is_err() {
                    break;
                }
                placement_changed = true;
                continue;
            }
            Some((topic, copy)) = copied_rx.recv() => {
                copying.remove(&topic);
                let Some((view, stream)) = views.get(&topic).cloned() else { continue };
                if !reading.as_ref().is_some_and(|r| r.contains(&topic)) {
                    info!(%topic, "a shard copy arrived after placement took the shard away; dropped");
                    continue;
                }
                info!(%topic, from = copy.from, next_offset = copy.next_offset, views = copy.views.len(),
                      "shard state copied from a holder; reading its log on from the copy");
                let offset = copy.next_offset;
                let input = LogInput { view, stream, offset, record: LogRecord::default(), copy: Some(copy.views) };
                let sent = tokio::select! {
                    r = tx.send(input) => r.is_ok(),
                    _ = shutdown.cancelled() => false,
                };
                if !sent {
                    break;
                }
                // This log goes on from the copy's position (the others
                // where they are); if the seek fails, every held log is
                // assigned again from where it stands.
                let from = crate::kafka::resume_offset(&kafka, offset);
                if let Err(e) = consumer.seek(&topic, 0, from, Duration::from_secs(5)) {
                    warn!(%topic, error = %e, "cannot seek the change log to the copy's position; assigning the logs again");
                    reading = None;
                    placement_changed = true;
                }
                expected.insert(topic, crate::kafka::Gapless::new(offset, false));
                continue;
            }
            m = consumer.recv() => match m {
                Ok(m) => {
                    quiet_errors = false;
                    if !reading.as_ref().is_some_and(|r| r.contains(m.topic())) || copying.contains(m.topic()) {
                        continue;
                    }
                    let Some((view, stream)) = views.get(m.topic()).cloned() else { continue };
                    let Ok(offset) = u64::try_from(m.offset()) else {
                        warn!(topic = m.topic(), offset = m.offset(), "change-log record without an offset; skipped");
                        continue;
                    };
                    if let Some(order) = expected.get_mut(m.topic()) {
                        match order.step(offset) {
                            crate::kafka::Step::Skip => continue,
                            crate::kafka::Step::SeekBack { next } => {
                                metrics::counter!(metric::LOG_GAPS).increment(1);
                                warn!(topic = m.topic(), expected = next, got = offset,
                                      "change-log gap: records were skipped by the broker; reading again from before it");
                                if let Err(e) = consumer.seek(m.topic(), 0, crate::kafka::resume_offset(&kafka, next), Duration::from_secs(5)) {
                                    warn!(error = %e, "cannot seek the change log; will retry");
                                }
                                continue;
                            }
                            crate::kafka::Step::Take { missing: Some(needed) } if copies.is_some() => {
                                // Trimmed past this node: copy the shard.
                                let (Some(copies), Some(shard)) = (copies.clone(), log.names.get(&view).cloned()) else { continue };
                                metrics::counter!(metric::LOG_GAPS).increment(1);
                                warn!(topic = m.topic(), needed, first = offset,
                                      "change log starts after what this node has applied (trimmed): copying the shard's state from a holder");
                                copying.insert(m.topic().to_string());
                                tokio::spawn(copy_until_done(
                                    coordinator.clone(), copies, shard, m.topic().to_string(),
                                    stream.to_string(), offset, copied_tx.clone(), shutdown.clone(),
                                ));
                                continue;
                            }
                            crate::kafka::Step::Take { missing } => {
                                if let Some(expected) = missing {
                                    metrics::counter!(metric::LOG_GAPS).increment(1);
                                    error!(topic = m.topic(), expected, got = offset,
                                           "change-log gap persists: these records are missing from the log");
                                }
                                order.taken(offset);
                            }
                        }
                    }
                    metrics::counter!(metric::LOG_BYTES_READ).increment(m.payload_len() as u64);
                    let record = match LogRecord::decode(m.payload().unwrap_or_default()) {
                        Ok(r) => r,
                        Err(e) => {
                            // Only nodes write these logs: a record that does not
                            // decode is a bug or foreign data. Count it, skip it.
                            metrics::counter!(metric::LOG_RECORDS, "outcome" => "undecodable").increment(1);
                            error!(topic = m.topic(), offset, error = %e, "change-log record does not decode; skipped");
                            continue;
                        }
                    };
                    // Backpressure, but not past a shutdown.
                    let sent = tokio::select! {
                        r = tx.send(LogInput { view, stream, offset, record, copy: None }) => r.is_ok(),
                        _ = shutdown.cancelled() => false,
                    };
                    if !sent {
                        break;
                    }
                }
                Err(e) => {
                    if !quiet_errors {
                        warn!(error = %e, "change-log consumer error; retrying");
                    }
                    quiet_errors = true;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    info!("change-log source stopped");
    Ok(())
}

/// Copies `shard` from a holder whose copy reaches `at_least` (retrying
/// each second: holders may be catching up themselves), then hands it to
/// the log source.
#[allow(clippy::too_many_arguments)]
async fn copy_until_done(
    coordinator: Coordinator,
    copies: ShardCopies,
    shard: String,
    topic: String,
    stream: String,
    at_least: u64,
    done: tokio::sync::mpsc::Sender<(String, trim::ShardCopy)>,
    shutdown: CancellationToken,
) {
    let started = std::time::Instant::now();
    loop {
        if let Some(copy) = trim::copy_shard(&coordinator, &copies, &shard, &stream, at_least).await
        {
            metrics::counter!(metric::SHARD_COPIES, "side" => "received", "outcome" => "copied")
                .increment(1);
            info!(%shard, seconds = started.elapsed().as_secs_f64(), "shard state received");
            let _ = done.send((topic, copy)).await;
            return;
        }
        metrics::counter!(metric::SHARD_COPIES, "side" => "received", "outcome" => "none")
            .increment(1);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Partition id of a Kafka source partition of a view.
pub fn partition_id(view: &str, topic: &str, partition: i32) -> String {
    format!("{view}/{topic}/{partition}")
}

/// Builds the coordinator's settings from the node's configuration.
pub fn coordinator_config(
    config: &NodeConfig,
    cluster: &ClusterSection,
) -> anyhow::Result<CoordinatorConfig> {
    let node_id = cluster
        .resolve_node_id(&config.node.id)
        .context("cluster.node_id is required unless node.id ends in -N")?;
    let bootstrap = cluster
        .bootstrap
        .iter()
        .map(|e| parse_peer(e).map(|(id, addr)| Peer { id, addr }))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("cluster.bootstrap: {e}"))?;
    Ok(CoordinatorConfig {
        node_id,
        bootstrap,
        data_dir: config.node.data_dir.join("raft"),
        heartbeat_interval: cluster.heartbeat_interval,
        lease: cluster.lease,
        failure_timeout: cluster.failure_timeout,
        raft_heartbeat: cluster.raft_heartbeat,
        election_timeout: cluster.election_timeout,
        replication_factor: cluster.replication_factor,
        zone: cluster.zone.clone(),
        snapshot_logs: cluster.raft_snapshot_logs,
        recovery_lag: cluster.acceptable_recovery_lag,
        peer_tls: match (peer_client_tls(config), config.tls.insecure) {
            (tls, false) => match (tls.ca, tls.cert, tls.key) {
                (Some(ca), Some(cert), Some(key)) => Some(ndc_coordinator::PeerTls {
                    ca,
                    cert,
                    key,
                    identity: cluster.peer_identity.clone(),
                }),
                _ => anyhow::bail!("cluster peers need tls.cert, tls.key and cluster.peer_ca"),
            },
            (_, true) => None,
        },
    })
}

/// Change-log topic of a view (of a shard: `<prefix><view>.shard<i>`).
pub fn log_topic(cluster: &ClusterSection, view: &str) -> String {
    format!(
        "{}{}",
        cluster.changes_topic_prefix,
        ndc_operators::shard::topic_safe(view)
    )
}

/// Change-log topic of a view: a configured view's by name; a pipeline
/// view's by name and generation, so that a view reset by a spec update
/// starts a fresh log (and incarnation) on every node.
pub fn view_log_topic(cluster: &ClusterSection, view: &str, generation: Option<u64>) -> String {
    match generation {
        None => log_topic(cluster, view),
        Some(g) => format!("{}{view}.g{g}", cluster.changes_topic_prefix),
    }
}

/// Every (view, Kafka topic, the view's shards) the cluster must consume,
/// given the replicated pipeline specs (see
/// `pipelines::runtime::cluster_routes`).
pub type Routes = Box<
    dyn Fn(&BTreeMap<String, ndc_coordinator::StoredSpec>) -> BTreeSet<(String, String, u32)>
        + Send
        + Sync,
>;

/// On the leader, registers the partitions of every Kafka source with the
/// cluster — configured views and the replicated pipeline specs, as `routes`
/// tells — as topics appear or grow, and forgets those of views no longer run.
pub async fn register_partitions(
    coordinator: Coordinator,
    routes: Routes,
    kafka: KafkaSection,
    shutdown: CancellationToken,
) {
    let consumer: BaseConsumer = match client_config(&kafka).create() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot create a metadata client; partitions are not registered");
            return;
        }
    };
    let consumer = std::sync::Arc::new(consumer);
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut last_fetch: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        if !coordinator.is_leader() {
            last_fetch = None;
            continue;
        }
        let state = coordinator.watch().borrow().cluster.clone();
        let routes = routes(&state.specs);
        // A partition id names the store view of its shard.
        let pair_of = |pid: &str| {
            let mut parts = pid.splitn(3, '/');
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        };
        let wanted: BTreeSet<(String, String)> = routes
            .iter()
            .flat_map(|(view, topic, shards)| {
                ndc_operators::shard::store_names(view, *shards)
                    .into_iter()
                    .map(|s| (s, topic.clone()))
            })
            .collect();
        // Partitions of views (or topics) no longer run.
        let stale: Vec<String> = state
            .partitions
            .iter()
            .filter(|p| pair_of(p).is_none_or(|pair| !wanted.contains(&pair)))
            .cloned()
            .collect();
        if !stale.is_empty() {
            match coordinator.unregister_partitions(stale.clone()).await {
                Ok(()) => {
                    info!(partitions = ?stale, "partitions of views no longer run unregistered")
                }
                Err(e) => warn!(error = %e, "cannot unregister partitions; will retry"),
            }
        }
        // A route without partitions yet is looked up every second; the
        // rest every metadata refresh (topics that grow).
        let registered: BTreeSet<(String, String)> = state
            .partitions
            .iter()
            .filter_map(|p| pair_of(p))
            .map(
                |(store_name, topic)| match ndc_operators::shard::parse_store_name(&store_name) {
                    Some((view, _)) => (view.to_string(), topic),
                    None => (store_name, topic),
                },
            )
            .collect();
        let missing = routes
            .iter()
            .any(|(v, t, _)| !registered.contains(&(v.clone(), t.clone())));
        if !missing && last_fetch.is_some_and(|t| t.elapsed() < kafka.metadata_refresh) {
            continue;
        }
        last_fetch = Some(std::time::Instant::now());
        let c = consumer.clone();
        let names: BTreeSet<String> = routes.iter().map(|(_, t, _)| t.clone()).collect();
        let found = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for topic in names {
                if let Ok(md) = c.fetch_metadata(Some(&topic), Duration::from_secs(5)) {
                    for t in md
                        .topics()
                        .iter()
                        .filter(|t| t.name() == topic && t.error().is_none())
                    {
                        out.extend(t.partitions().iter().map(|p| (topic.clone(), p.id())));
                    }
                }
            }
            out
        })
        .await
        .unwrap_or_default();
        let mut partitions = Vec::new();
        for (view, topic, shards) in &routes {
            for (t, p) in &found {
                if t == topic {
                    let shard = ndc_operators::shard::of_partition(*p, *shards);
                    let store_name = ndc_operators::shard::store_name(view, shard, *shards);
                    partitions.push(partition_id(&store_name, topic, *p));
                }
            }
        }
        if partitions.iter().all(|p| state.partitions.contains(p)) {
            continue;
        }
        match coordinator.register_partitions(partitions.clone()).await {
            Ok(()) => info!(count = partitions.len(), "source partitions registered"),
            Err(e) => warn!(error = %e, "cannot register partitions; will retry"),
        }
    }
}

/// Client side of `ndc cluster …`: any node answers, forwarding to the leader.
pub mod admin {
    use ndc_proto::cluster::cluster_client::ClusterClient;
    use ndc_proto::cluster::{
        AddNodeRequest, ClusterStatus, MembershipReply, RemoveNodeRequest, StatusRequest,
    };
    use serde_json::{Value, json};

    async fn connect(addr: &str) -> anyhow::Result<ClusterClient<crate::client::Connection>> {
        Ok(ClusterClient::new(
            crate::client::connect(addr, None).await?,
        ))
    }

    pub async fn status(addr: &str) -> anyhow::Result<ClusterStatus> {
        Ok(connect(addr)
            .await?
            .status(StatusRequest {})
            .await?
            .into_inner())
    }

    pub async fn add_node(
        addr: &str,
        id: u64,
        node_addr: &str,
        learner_only: bool,
    ) -> anyhow::Result<MembershipReply> {
        Ok(connect(addr)
            .await?
            .add_node(AddNodeRequest {
                id,
                addr: node_addr.to_string(),
                learner_only,
            })
            .await?
            .into_inner())
    }

    pub async fn remove_node(addr: &str, id: u64) -> anyhow::Result<MembershipReply> {
        Ok(connect(addr)
            .await?
            .remove_node(RemoveNodeRequest { id })
            .await?
            .into_inner())
    }

    /// Status as JSON (for scripts and tests).
    pub fn status_json(s: &ClusterStatus) -> Value {
        json!({
            "answered_by": s.answered_by,
            "leader": s.leader_id,
            "term": s.term,
            "last_log_index": s.last_log_index,
            "applied_index": s.applied_index,
            "members": s.members.iter().map(|m| json!({
                "id": m.id, "addr": m.addr, "role": m.role, "live": m.live,
                "draining": m.draining, "last_heartbeat_ms_ago": m.last_heartbeat_ms_ago,
            })).collect::<Vec<_>>(),
            "shards": s.shards.iter().map(|p| json!({
                "shard": p.shard, "holders": p.holders, "log_start": p.log_start,
                "applied": p.applied.iter().map(|a| json!({"node": a.node, "next_offset": a.next_offset})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "partitions": s.partitions.iter().map(|p| json!({
                "partition": p.partition, "owner": p.owner, "epoch": p.epoch, "running": p.running,
                "next_offset": p.next_offset, "lag": p.lag,
            })).collect::<Vec<_>>(),
        })
    }

    /// Status as a table for people.
    pub fn status_text(s: &ClusterStatus) -> String {
        use std::fmt::Write;
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "leader {}  term {}  answered by {}  applied index {}",
            opt(s.leader_id),
            s.term,
            s.answered_by,
            opt(s.applied_index)
        );
        let _ = writeln!(
            out,
            "\n{:<6} {:<24} {:<8} {:<5} LAST HEARTBEAT",
            "NODE", "ADDRESS", "ROLE", "LIVE"
        );
        for m in &s.members {
            let _ = writeln!(
                out,
                "{:<6} {:<24} {:<8} {:<5} {}",
                m.id,
                m.addr,
                m.role,
                match (m.live, m.draining) {
                    (true, true) => "drain",
                    (true, false) => "yes",
                    _ => "no",
                },
                m.last_heartbeat_ms_ago
                    .map_or("never".to_string(), |ms| format!("{ms} ms ago"))
            );
        }
        if !s.shards.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<40} {:<10} {:<16} LOG APPLIED (per holder)",
                "SHARD", "LOG START", "HOLDERS"
            );
            for p in &s.shards {
                let holders: Vec<String> = p.holders.iter().map(u64::to_string).collect();
                let applied: Vec<String> = p
                    .holders
                    .iter()
                    .map(|n| {
                        let at = p.applied.iter().find(|a| a.node == *n);
                        opt(at.map(|a| a.next_offset))
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "{:<40} {:<10} {:<16} {}",
                    p.shard,
                    opt(p.log_start),
                    holders.join(" "),
                    applied.join(" ")
                );
            }
        }
        let _ = writeln!(
            out,
            "\n{:<48} {:<6} {:<6} {:<8} {:<12} LAG",
            "PARTITION", "OWNER", "EPOCH", "RUNNING", "NEXT OFFSET"
        );
        for p in &s.partitions {
            let _ = writeln!(
                out,
                "{:<48} {:<6} {:<6} {:<8} {:<12} {}",
                p.partition,
                opt(p.owner),
                p.epoch,
                if p.running { "yes" } else { "no" },
                opt(p.next_offset),
                opt(p.lag)
            );
        }
        out
    }
}

/// How this node calls other nodes' peer listeners: the cluster's CA, and
/// its own certificate as a client (plaintext when TLS is off).
pub fn peer_client_tls(config: &NodeConfig) -> ClientTls {
    if config.tls.insecure {
        return ClientTls::default();
    }
    ClientTls {
        ca: config
            .cluster
            .as_ref()
            .and_then(|c| c.peer_ca.clone())
            .or_else(|| config.tls.client_ca.clone()),
        cert: config.tls.cert.clone(),
        key: config.tls.key.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The window that lost a batch: an assignment fenced once is never
    /// admitted again, even after the partition was restarted under a new
    /// assignment and the lease is valid again.
    #[test]
    fn an_assignment_fenced_once_is_never_admitted_again() {
        let r = Revocations::default();
        assert!(r.admit(1, || true), "lease valid: decided");
        assert!(!r.admit(1, || false), "lease lapsed: dropped, revoked");
        assert!(r.contains(1));
        // The partition restarts from the committed offset as assignment 2.
        assert!(r.admit(2, || true));
        // Records of assignment 1 still in the channel: dropped, although
        // the lease is back.
        assert!(!r.admit(1, || true));
        assert!(r.snapshot().contains(&1) && !r.contains(2));
    }

    /// `ndc cluster status` shows where each placed shard is held, owner
    /// first; without placement, no such table.
    #[test]
    fn the_status_table_lists_each_shards_holders() {
        let mut status = ndc_proto::cluster::ClusterStatus {
            shards: vec![ndc_proto::cluster::ShardPlacement {
                shard: "citizens#3".into(),
                holders: vec![2, 0],
                applied: vec![ndc_proto::cluster::HolderPosition {
                    node: 0,
                    next_offset: 1200,
                }],
                log_start: Some(1100),
            }],
            ..Default::default()
        };
        let text = admin::status_text(&status);
        assert!(text.contains("HOLDERS"), "{text}");
        // Holders owner first, where the log starts, how far each applied.
        assert!(
            text.lines().any(|l| l.starts_with("citizens#3")
                && l.split_whitespace().collect::<Vec<_>>()[1..]
                    == ["1100", "2", "0", "-", "1200"]),
            "{text}"
        );
        assert_eq!(
            admin::status_json(&status)["shards"][0]["holders"],
            serde_json::json!([2, 0])
        );
        assert_eq!(
            admin::status_json(&status)["shards"][0]["applied"][0]["next_offset"],
            1200
        );
        status.shards.clear();
        assert!(!admin::status_text(&status).contains("HOLDERS"));
    }
}
