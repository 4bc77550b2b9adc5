//! Sources: Kafka topics and newline-delimited Debezium files.
//!
//! Kafka partitions are assigned by the node, never by Kafka's consumer-group
//! protocol: on a single node, every partition of every configured topic; in
//! a cluster, the partitions the cluster assigned to this node, while its
//! lease is valid. Consumption starts after the offset stored with the
//! state; offsets committed to Kafka are advisory, for lag tooling.

use crate::config::{KafkaSection, StartFrom};
use crate::kafka::{broker_error_kind, consumer_config, resume_offset};
use crate::telemetry::{Readiness, metric};
use crate::writer::{CommittedOffsets, Input, Inputs};
use ndc_coordinator::Coordinator;
use ndc_operators::{Decoder, Position, ViewId};
use ndc_proto::cluster::HeldPartition;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Stream name of a Kafka partition.
pub fn kafka_stream(topic: &str, partition: i32) -> String {
    format!("kafka:{topic}:{partition}")
}

/// Stream name of a file source.
pub fn file_stream(path: &std::path::Path) -> String {
    format!("file:{}", path.display())
}

/// One view reading a topic.
#[derive(Debug, Clone)]
pub struct Route {
    /// The view's shards (store view and its name), in shard order: the
    /// records of partition `p` go to shard `p mod shards`
    /// ([`ndc_operators::shard`]).
    pub shards: Arc<[(ViewId, Arc<str>)]>,
    pub decoder: Decoder,
}

impl Route {
    /// A route to a view of one shard.
    pub fn one(view: ViewId, name: &str, decoder: Decoder) -> Route {
        Route {
            shards: Arc::new([(view, Arc::from(name))]),
            decoder,
        }
    }

    /// The store view that takes partition `p`'s records, and its name.
    pub fn shard(&self, p: i32) -> (ViewId, &Arc<str>) {
        let n = u32::try_from(self.shards.len()).unwrap_or(1);
        let (id, name) = &self.shards[ndc_operators::shard::of_partition(p, n) as usize];
        (*id, name)
    }
}

/// Epoch under which this node holds each (topic, partition), in cluster mode.
/// Cluster mode: the partitions the consumer holds, each with the epoch the
/// cluster gave it and the local assignment that reads it.
type Epochs = Arc<RwLock<HashMap<(String, i32), Held>>>;

/// One assignment of a partition to this node's consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    /// The highest epoch of `views` (names the assignment in logs).
    epoch: u64,
    /// The views (shards) fed by the partition that this node owns, each
    /// with the epoch of its own partition id: a topic may feed several
    /// views, each placed and owned on its own. Records go only to these.
    views: Arc<BTreeMap<ViewId, u64>>,
    /// Unique per (re)assignment of the partition to the consumer, which
    /// (re)starts reading at the committed offset. Records carry it, so that
    /// once the writer has dropped some of an assignment's records, the rest
    /// of that assignment can be dropped too (see `ClusterLog::revoked`).
    assignment: u64,
}

/// Reports consumer lag from librdkafka statistics, and keeps the high
/// watermarks for cluster status.
#[derive(Default)]
struct StatsContext {
    high_watermarks: Mutex<HashMap<(String, i32), u64>>,
}

impl ClientContext for StatsContext {
    /// A broker the consumer cannot reach or trust: counted by cause
    /// (`ndc_source_errors_total{kind}`) and logged with librdkafka's
    /// reason; the node stays not ready while no metadata comes back.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let kind = broker_error_kind(reason);
        metrics::counter!(metric::SOURCE_ERRORS, "kind" => kind).increment(1);
        warn!(kind, error = %error, reason, "kafka client error");
    }

    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (id, p) in &t.partitions {
                if *id >= 0
                    && let (Ok(high), Ok(mut w)) =
                        (u64::try_from(p.hi_offset), self.high_watermarks.lock())
                {
                    w.insert((topic.clone(), *id), high);
                }
                if *id < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!(metric::SOURCE_LAG, "topic" => topic.clone(), "partition" => id.to_string())
                    .set(p.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for StatsContext {}

pub struct KafkaSource {
    pub config: KafkaSection,
    /// Topic → the views reading it.
    pub routes: BTreeMap<String, Vec<Route>>,
    /// Stored next offsets, by (view, stream), when the node started.
    pub start_offsets: HashMap<(ViewId, String), u64>,
    pub tx: Inputs<Input>,
    pub committed: CommittedOffsets,
    pub readiness: Readiness,
    pub shutdown: CancellationToken,
    /// Cluster mode: consume only what the cluster assigns to this node, and
    /// fence each gained partition in its view's change log first.
    pub cluster: Option<(Coordinator, Arc<crate::cluster::ClusterLog>)>,
}

impl KafkaSource {
    pub async fn run(self) -> anyhow::Result<()> {
        let mut cc = consumer_config(&self.config, &self.config.group_id, self.config.start_from);
        cc.set("statistics.interval.ms", "1000");
        let consumer: Arc<StreamConsumer<StatsContext>> =
            Arc::new(cc.create_with_context(StatsContext::default())?);
        let KafkaSource {
            config,
            routes,
            start_offsets,
            tx,
            committed,
            readiness,
            shutdown,
            cluster,
        } = self;
        let epochs: Epochs = Default::default();
        let assigner = Arc::new(Assigner {
            routes,
            start_offsets,
            start_from: config.start_from,
            kafka: config.clone(),
            readiness,
            assigned: Mutex::new(BTreeSet::new()),
            partition_counts: RwLock::new(HashMap::new()),
        });
        let refresher = match cluster.clone() {
            // Metadata is fetched on its own task: a metadata request can take
            // hundreds of milliseconds, and consumption must not wait for it.
            None => tokio::spawn({
                let assigner = assigner.clone();
                let consumer = consumer.clone();
                let shutdown = shutdown.clone();
                let mut refresh = tokio::time::interval(config.metadata_refresh);
                async move {
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = refresh.tick() => {}
                        }
                        // A metadata request to a broker that does not answer
                        // takes seconds: shutdown does not wait for it.
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = assigner.assign_new_partitions(&consumer) => {}
                        }
                    }
                }
            }),
            Some((coordinator, log)) => tokio::spawn(follow_assignments(
                assigner.clone(),
                consumer.clone(),
                coordinator,
                log,
                epochs.clone(),
                committed.clone(),
                shutdown.clone(),
            )),
        };
        let mut commit = tokio::time::interval(config.commit_interval);
        let mut decoded_since_error = true;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = commit.tick() => assigner.commit_advisory(&consumer, &committed),
                msg = consumer.recv() => match msg {
                    Ok(m) => {
                        decoded_since_error = true;
                        let topic = m.topic();
                        let Some(routes) = assigner.routes.get(topic) else { continue };
                        let partition = m.partition();
                        let held = if cluster.is_some() {
                            // Fetched before an unassignment: not ours any more.
                            let Some(h) = epochs.read().ok().and_then(|e| e.get(&(topic.to_string(), partition)).cloned()) else { continue };
                            Some(h)
                        } else {
                            None
                        };
                        let Ok(offset) = u64::try_from(m.offset()) else {
                            warn!(topic, partition, offset = m.offset(), "record without an offset; skipped");
                            continue;
                        };
                        let stream: Arc<str> = kafka_stream(topic, partition).into();
                        let topic_arc: Arc<str> = topic.into();
                        let partitions = assigner.partition_count(topic);
                        for route in routes {
                            // In a cluster: only to the views whose partition
                            // this node owns, under that partition's epoch.
                            let epoch = match &held {
                                Some(h) => match h.views.get(&route.shard(partition).0) {
                                    Some(e) => Some(*e),
                                    None => continue,
                                },
                                None => None,
                            };
                            let decoded = route.decoder.decode(topic, m.key(), m.payload());
                            let keep_raw = decoded.is_err();
                            let input = Input {
                                view: route.shard(partition).0,
                                pos: Position { stream: stream.clone(), offset },
                                decoded,
                                topic: Some(topic_arc.clone()),
                                partition: Some(partition),
                                // Checked only where it matters: a view of one
                                // shard has no shard to route a key to.
                                partitions: partitions.filter(|_| route.shards.len() > 1),
                                epoch,
                                assignment: held.as_ref().map(|h| h.assignment),
                                raw_key: if keep_raw { m.key().map(<[u8]>::to_vec) } else { None },
                                raw_value: if keep_raw { m.payload().map(<[u8]>::to_vec) } else { None },
                            };
                            // Waits while the state writer is busy (backpressure),
                            // but not past a shutdown: what was not handed over
                            // is read again from the stored offsets.
                            let sent = tokio::select! {
                                r = tx.send(input) => r.is_ok(),
                                _ = shutdown.cancelled() => false,
                            };
                            if !sent {
                                refresher.abort();
                                return Ok(());
                            }
                        }
                    }
                    Err(e) => {
                        metrics::counter!(metric::SOURCE_ERRORS, "kind" => "consume").increment(1);
                        if decoded_since_error {
                            warn!(error = %e, "Kafka consumer error; retrying");
                        }
                        decoded_since_error = false;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
        if let Err(e) = refresher.await {
            warn!(error = %e, "the metadata refresher panicked");
        }
        assigner.commit_advisory(&consumer, &committed);
        // Closing a consumer whose broker does not answer blocks in
        // librdkafka: not on this task, which the node's shutdown awaits.
        tokio::task::spawn_blocking(move || drop(consumer));
        info!("Kafka source stopped");
        Ok(())
    }
}

/// Places partitions on the consumer: every partition of every configured
/// topic, from the offset stored with the state.
struct Assigner {
    routes: BTreeMap<String, Vec<Route>>,
    start_offsets: HashMap<(ViewId, String), u64>,
    start_from: StartFrom,
    kafka: KafkaSection,
    readiness: Readiness,
    assigned: Mutex<BTreeSet<(String, i32)>>,
    /// Partitions of each source topic, as last known (topic metadata; in a
    /// cluster, the partitions the leader registered): each keyed record is
    /// checked against where Kafka's partitioner puts its key.
    partition_counts: RwLock<HashMap<String, u32>>,
}

impl Assigner {
    fn partition_count(&self, topic: &str) -> Option<u32> {
        self.partition_counts
            .read()
            .ok()
            .and_then(|c| c.get(topic).copied())
    }

    fn set_partition_count(&self, topic: &str, count: u32) {
        if self.partition_count(topic) != Some(count)
            && let Ok(mut c) = self.partition_counts.write()
        {
            c.insert(topic.to_string(), count);
        }
    }
}

impl Assigner {
    /// Where to start consuming a partition: the smallest next offset its
    /// views committed (`committed`, else what was stored when the node
    /// started), or `start_from` if some view never read it. A topic shared by
    /// several views starts at the lowest; each view skips what it applied.
    fn start_offset(
        &self,
        topic: &str,
        p: i32,
        committed: &HashMap<(ViewId, Arc<str>), u64>,
    ) -> Offset {
        let stream: Arc<str> = kafka_stream(topic, p).into();
        let routes = self.routes.get(topic).map(Vec::as_slice).unwrap_or(&[]);
        let stored: Vec<Option<u64>> = routes
            .iter()
            .map(|r| {
                committed
                    .get(&(r.shard(p).0, stream.clone()))
                    .copied()
                    .or_else(|| {
                        self.start_offsets
                            .get(&(r.shard(p).0, stream.to_string()))
                            .copied()
                    })
            })
            .collect();
        if stored.iter().all(Option::is_some) {
            resume_offset(
                &self.kafka,
                stored.iter().flatten().min().copied().unwrap_or(0),
            )
        } else {
            match self.start_from {
                StartFrom::Earliest => Offset::Beginning,
                StartFrom::Latest => Offset::End,
            }
        }
    }

    /// The smallest next offset any view of `topic` has committed for `p`.
    fn committed_next(
        &self,
        topic: &str,
        p: i32,
        committed: &HashMap<(ViewId, Arc<str>), u64>,
    ) -> Option<u64> {
        let stream: Arc<str> = kafka_stream(topic, p).into();
        self.routes.get(topic).and_then(|rs| {
            rs.iter()
                .filter_map(|r| committed.get(&(r.shard(p).0, stream.clone())).copied())
                .min()
        })
    }

    /// Assigns partitions not yet assigned; the node is ready once every
    /// topic was found.
    async fn assign_new_partitions(&self, consumer: &Arc<StreamConsumer<StatsContext>>) {
        let mut missing = Vec::new();
        let mut tpl = TopicPartitionList::new();
        let mut added = Vec::new();
        for topic in self.routes.keys() {
            let c = consumer.clone();
            let t = topic.clone();
            let meta = tokio::task::spawn_blocking(move || {
                c.fetch_metadata(Some(&t), Duration::from_secs(5))
            })
            .await;
            let partitions: Vec<i32> = match meta {
                Ok(Ok(md)) => md
                    .topics()
                    .iter()
                    .filter(|t| t.name() == topic && t.error().is_none())
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .collect(),
                Ok(Err(e)) => {
                    metrics::counter!(metric::SOURCE_ERRORS, "kind" => "metadata").increment(1);
                    warn!(topic = %topic, error = %e, "cannot fetch topic metadata");
                    Vec::new()
                }
                Err(_) => Vec::new(),
            };
            if partitions.is_empty() {
                missing.push(topic.clone());
                continue;
            }
            if let Some(count) = partitions
                .iter()
                .max()
                .and_then(|m| u32::try_from(*m).ok())
                .map(|m| m + 1)
                .filter(|c| *c as usize == partitions.len())
            {
                self.set_partition_count(topic, count);
            }
            let assigned = self
                .assigned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            for p in partitions {
                if assigned.contains(&(topic.clone(), p)) {
                    continue;
                }
                let offset = self.start_offset(topic, p, &HashMap::new());
                if let Err(e) = tpl.add_partition_offset(topic, p, offset) {
                    warn!(topic = %topic, partition = p, error = %e, "cannot add partition");
                    continue;
                }
                info!(topic = %topic, partition = p, ?offset, "assigning partition");
                added.push((topic.clone(), p));
            }
        }
        if tpl.count() > 0 {
            match consumer.incremental_assign(&tpl) {
                Ok(()) => {
                    let mut a = self
                        .assigned
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    a.extend(added);
                }
                Err(e) => {
                    metrics::counter!(metric::SOURCE_ERRORS, "kind" => "assign").increment(1);
                    warn!(error = %e, "cannot assign partitions; will retry");
                }
            }
        }
        self.readiness.set(missing.is_empty());
        if !missing.is_empty() {
            warn!(topics = ?missing, "source topics not found; retrying");
        }
    }

    /// Commits the state's offsets to Kafka so that lag tooling sees progress.
    fn commit_advisory(
        &self,
        consumer: &StreamConsumer<StatsContext>,
        committed: &CommittedOffsets,
    ) {
        let committed = committed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let assigned = self
            .assigned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut tpl = TopicPartitionList::new();
        for (topic, p) in &assigned {
            let stream = kafka_stream(topic, *p);
            let routes = self.routes.get(topic).map(Vec::as_slice).unwrap_or(&[]);
            let next = routes
                .iter()
                .filter_map(|r| {
                    committed
                        .get(&(r.shard(*p).0, Arc::from(stream.as_str())))
                        .copied()
                })
                .min();
            if let Some(next) = next {
                metrics::gauge!(metric::SOURCE_OFFSET, "topic" => topic.clone(), "partition" => p.to_string())
                    .set(next as f64);
                if let Err(e) = tpl.add_partition_offset(topic, *p, Offset::Offset(next as i64)) {
                    warn!(topic = %topic, partition = *p, error = %e, "cannot note a committed offset for Kafka (advisory; the state keeps its own)");
                }
            }
        }
        if tpl.count() > 0
            && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
        {
            warn!(error = %e, "advisory offset commit failed");
        }
    }
}

/// Resolves once `partition` is no longer this node's at `epoch` in the
/// applied cluster state.
async fn assignment_changed(coordinator: &Coordinator, partition: &str, epoch: u64) {
    let me = coordinator.node_id();
    let mut applied = coordinator.watch();
    loop {
        let still = applied
            .borrow_and_update()
            .cluster
            .owner(partition)
            .is_some_and(|a| a.owner == Some(me) && a.epoch == epoch);
        if !still || applied.changed().await.is_err() {
            return;
        }
    }
}

/// Cluster mode: keeps the consumer's assignment equal to the partitions the
/// cluster gives this node (none while its lease is not valid), and reports
/// them, with offsets and high watermarks, in the node's heartbeats.
async fn follow_assignments(
    assigner: Arc<Assigner>,
    consumer: Arc<StreamConsumer<StatsContext>>,
    coordinator: Coordinator,
    log: Arc<crate::cluster::ClusterLog>,
    epochs: Epochs,
    committed: CommittedOffsets,
    shutdown: CancellationToken,
) {
    let mut applied = coordinator.watch();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report = std::time::Instant::now() - Duration::from_secs(1);
    let mut next_assignment = 0u64;
    // The Raft index of the state the topics' partition counts were last
    // taken from.
    let mut counted_at: Option<Option<u64>> = None;
    // Partitions gained and not yet caught up: when, and from which offset.
    let mut restoring: HashMap<(String, i32), (std::time::Instant, u64)> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            r = applied.changed() => if r.is_err() { break },
        }
        let lease = coordinator.lease_valid();
        assigner.readiness.set(lease);
        // What this node should consume now: (topic, partition) → the
        // views it owns there, with their epochs.
        let mut desired: BTreeMap<(String, i32), BTreeMap<ViewId, u64>> = BTreeMap::new();
        let owned = {
            let applied = coordinator.watch().borrow().clone();
            // The partitions the leader registered for each topic, from its
            // metadata: what Kafka's partitioner divides by (counted again
            // only when the replicated state has changed).
            let index = applied.last_applied.map(|l| l.index);
            let mut counts: HashMap<&str, BTreeSet<&str>> = HashMap::new();
            if counted_at != Some(index) {
                counted_at = Some(index);
                for pid in &applied.cluster.partitions {
                    let mut parts = pid.rsplitn(3, '/');
                    if let (Some(p), Some(topic)) = (parts.next(), parts.next())
                        && assigner.routes.contains_key(topic)
                    {
                        counts.entry(topic).or_default().insert(p);
                    }
                }
            }
            for (topic, partitions) in counts {
                if let Ok(n) = u32::try_from(partitions.len()) {
                    assigner.set_partition_count(topic, n);
                }
            }
            applied.cluster.owned_by(coordinator.node_id())
        };
        if lease {
            for (topic, routes) in &assigner.routes {
                for route in routes {
                    for (view, name) in route.shards.iter() {
                        let prefix = format!("{name}/{topic}/");
                        for (pid, epoch) in &owned {
                            if let Some(p) = pid
                                .strip_prefix(&prefix)
                                .and_then(|p| p.parse::<i32>().ok())
                                .filter(|p| route.shard(*p).0 == *view)
                            {
                                desired
                                    .entry((topic.clone(), p))
                                    .or_default()
                                    .insert(*view, *epoch);
                            }
                        }
                    }
                }
            }
        }
        let current: HashMap<(String, i32), Held> =
            epochs.read().map(|e| e.clone()).unwrap_or_default();
        // An assignment some of whose records the writer dropped (its lease
        // had lapsed) must not go on from where the consumer is: it is
        // restarted from the committed offset (removed now, added again on
        // the next round), or the dropped records would be skipped for good.
        let revoked = log.revoked.snapshot();
        let removed: Vec<(String, i32)> = current
            .iter()
            .filter(|(k, h)| desired.get(*k) != Some(&*h.views) || revoked.contains(&h.assignment))
            .map(|(k, _)| k.clone())
            .collect();
        let added: Vec<((String, i32), BTreeMap<ViewId, u64>)> = desired
            .iter()
            .filter(|(k, v)| current.get(*k).map(|h| &*h.views) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // The old assignment stays revoked (see `cluster::Revocations`).
        if !removed.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (t, p) in &removed {
                tpl.add_partition(t, *p);
            }
            if let Ok(mut e) = epochs.write() {
                for k in &removed {
                    e.remove(k);
                }
            }
            {
                let mut a = assigner
                    .assigned
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for k in &removed {
                    a.remove(k);
                }
            }
            match consumer.incremental_unassign(&tpl) {
                Ok(()) => {
                    info!(partitions = ?removed, "stopped consuming partitions (no longer assigned here)")
                }
                Err(e) => warn!(error = %e, "cannot unassign partitions"),
            }
        }
        // A gained partition is fenced in each of its views' change logs
        // first: once this node has applied its fence, its state holds every
        // effect that counts and the source offset to resume from.
        let mut fenced = Vec::with_capacity(added.len());
        for ((topic, p), views) in added {
            let mut ok = true;
            for route in assigner
                .routes
                .get(&topic)
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                let (view, name) = route.shard(p);
                let pid = crate::cluster::partition_id(name, &topic, p);
                // Only the views whose partition this node owns: another
                // view's shard (of the same topic) may be held elsewhere,
                // and this node would wait for a log it does not read.
                let Some(&pid_epoch) = views.get(&view) else {
                    continue;
                };
                // The wait ends if the assignment changes meanwhile: a node
                // that lost the partition (or its shard) again before its
                // fence came back would otherwise wait for it forever, and
                // consume none of the partitions it owns.
                let moved_on = assignment_changed(&coordinator, &pid, pid_epoch);
                tokio::select! {
                    r = log.fence(view, &pid, pid_epoch, &shutdown) => {
                        if let Err(e) = r {
                            warn!(partition = %pid, error = %e, "cannot fence the partition yet; will retry");
                            ok = false;
                            break;
                        }
                    }
                    () = moved_on => {
                        info!(partition = %pid, epoch = pid_epoch, "assignment changed while fencing the partition; planning again");
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                fenced.push(((topic, p), views));
            }
        }
        let added = fenced;
        if !added.is_empty() {
            let offsets = committed.lock().map(|c| c.clone()).unwrap_or_default();
            let mut tpl = TopicPartitionList::new();
            for ((topic, p), views) in &added {
                // The latest committed offset, else the one found at start.
                let offset = assigner.start_offset(topic, *p, &offsets);
                if tpl.add_partition_offset(topic, *p, offset).is_ok() {
                    info!(topic = %topic, partition = p, epochs = ?views.values().collect::<Vec<_>>(), ?offset, "consuming partition assigned by the cluster");
                }
            }
            match consumer.incremental_assign(&tpl) {
                Ok(()) => {
                    for (k, _) in &added {
                        let from = assigner.committed_next(&k.0, k.1, &offsets).unwrap_or(0);
                        restoring.insert(k.clone(), (std::time::Instant::now(), from));
                    }
                    if let Ok(mut e) = epochs.write() {
                        for (k, views) in &added {
                            next_assignment += 1;
                            e.insert(
                                k.clone(),
                                Held {
                                    epoch: views.values().copied().max().unwrap_or(0),
                                    views: Arc::new(views.clone()),
                                    assignment: next_assignment,
                                },
                            );
                        }
                    }
                    {
                        let mut a = assigner
                            .assigned
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        a.extend(added.iter().map(|(k, _)| k.clone()));
                    }
                }
                Err(e) => {
                    metrics::counter!(metric::SOURCE_ERRORS, "kind" => "assign").increment(1);
                    warn!(error = %e, "cannot assign partitions; will retry");
                }
            }
        }
        if last_report.elapsed() >= Duration::from_millis(200)
            || !added.is_empty()
            || !removed.is_empty()
        {
            last_report = std::time::Instant::now();
            let offsets = committed.lock().map(|c| c.clone()).unwrap_or_default();
            let highs = consumer
                .context()
                .high_watermarks
                .lock()
                .map(|w| w.clone())
                .unwrap_or_default();
            let held: Vec<HeldPartition> = epochs
                .read()
                .map(|e| e.clone())
                .unwrap_or_default()
                .into_iter()
                .flat_map(|((topic, p), Held { views, .. })| {
                    let stream: Arc<str> = kafka_stream(&topic, p).into();
                    let high = highs.get(&(topic.clone(), p)).copied();
                    assigner
                        .routes
                        .get(&topic)
                        .map(Vec::as_slice)
                        .unwrap_or(&[])
                        .iter()
                        .filter_map(|r| {
                            let (view, name) = r.shard(p);
                            Some(HeldPartition {
                                partition: crate::cluster::partition_id(name, &topic, p),
                                epoch: *views.get(&view)?,
                                next_offset: offsets.get(&(view, stream.clone())).copied(),
                                high_watermark: high,
                            })
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            // A gained partition is restored once its state has caught up
            // with the partition's end (replayed from the stored offset, or
            // from the start of the source topic if this node never held it).
            restoring.retain(|(topic, p), (since, from)| {
                let next = assigner.committed_next(topic, *p, &offsets);
                let (Some(next), Some(high)) = (next, highs.get(&(topic.clone(), *p)).copied()) else {
                    return true;
                };
                if next < high {
                    return true;
                }
                let records = next.saturating_sub(*from);
                metrics::histogram!(metric::RESTORE_SECONDS).record(since.elapsed().as_secs_f64());
                metrics::counter!(metric::RESTORE_RECORDS).increment(records);
                info!(topic = %topic, partition = p, records, seconds = since.elapsed().as_secs_f64(),
                      "partition state restored and caught up");
                false
            });
            restoring.retain(|k, _| epochs.read().map(|e| e.contains_key(k)).unwrap_or(false));
            coordinator.set_held(held);
        }
    }
}

/// Reads a newline-delimited Debezium export from the stored line on: once,
/// or, with `follow`, as it grows.
pub struct FileSource {
    pub path: PathBuf,
    pub view: ViewId,
    pub decoder: Decoder,
    pub start_line: u64,
    /// Wait at the end of the file for more lines instead of finishing.
    pub follow: bool,
    pub tx: Inputs<Input>,
    pub shutdown: CancellationToken,
}

/// How long a following source waits at the end of the file: short while
/// lines keep coming (the wait is in every event's latency), longer once
/// the file has been idle for a while (each wait is a wakeup and a read).
const FOLLOW_POLL_MIN: std::time::Duration = std::time::Duration::from_millis(1);
const FOLLOW_POLL_MAX: std::time::Duration = std::time::Duration::from_millis(50);
/// Idle for less than this, the file counts as still being written: a
/// writer that paused (descheduled for 20 ms, say) would otherwise find the
/// source sleeping 16 ms more after its next line.
const FOLLOW_ACTIVE: std::time::Duration = std::time::Duration::from_secs(1);

/// The wait after `poll` at the end of a followed file whose last line came
/// `idle` ago.
fn next_poll(poll: std::time::Duration, idle: std::time::Duration) -> std::time::Duration {
    if idle < FOLLOW_ACTIVE {
        FOLLOW_POLL_MIN
    } else {
        (poll * 2).clamp(FOLLOW_POLL_MIN, FOLLOW_POLL_MAX)
    }
}

impl FileSource {
    /// Blocking: run on a blocking thread.
    pub fn run(self) -> anyhow::Result<u64> {
        let file = std::fs::File::open(&self.path)
            .map_err(|e| anyhow::anyhow!("cannot open file source {}: {e}", self.path.display()))?;
        let stream: Arc<str> = file_stream(&self.path).into();
        let limit = self.decoder.config().max_record_bytes;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut line_no = 0u64;
        let mut buf = Vec::new();
        let mut sent = 0u64;
        // A line read in parts (following a file whose writer has not yet
        // written its newline): its length and whether it was cut so far.
        let mut partial: Option<(usize, bool)> = None;
        let mut poll = FOLLOW_POLL_MIN;
        let mut last_line = std::time::Instant::now();
        // Bytes of a line held for its newline (a writer mid-line; one
        // that stays up names an export whose last line was never ended).
        let held = metrics::gauge!(metric::FILE_PARTIAL_LINE_BYTES, "path" => self.path.display().to_string());
        loop {
            // A closed channel: the node is gone (a following source would
            // otherwise wait at the end of the file forever, holding up the
            // runtime's shutdown).
            if self.shutdown.is_cancelled() || self.tx.is_closed() {
                break;
            }
            let (before, cut_before) = partial.take().unwrap_or_else(|| {
                buf.clear();
                (0, false)
            });
            let line = read_line_bounded(&mut reader, &mut buf, limit)?;
            let (read, truncated) = (before + line.len, cut_before || line.cut);
            if self.follow && !line.complete {
                // At the end of the file: wait for the rest of the line, or
                // for the next one.
                if read > 0 {
                    partial = Some((read, truncated));
                }
                held.set(read as f64);
                std::thread::sleep(poll);
                poll = next_poll(poll, last_line.elapsed());
                continue;
            }
            if self.follow {
                poll = FOLLOW_POLL_MIN;
                last_line = std::time::Instant::now();
                held.set(0.0);
            }
            if read == 0 {
                break;
            }
            let n = line_no;
            line_no += 1;
            if n < self.start_line {
                continue;
            }
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            if buf.iter().all(u8::is_ascii_whitespace) && !truncated {
                continue;
            }
            let decoded = if truncated {
                Err(ndc_operators::DecodeError::new(
                    ndc_operators::DecodeErrorKind::Oversized,
                    format!("line is {read} bytes, the limit is {limit}"),
                ))
            } else {
                self.decoder.decode("", None, Some(&buf))
            };
            let keep_raw = decoded.is_err();
            let input = Input {
                view: self.view,
                pos: Position {
                    stream: stream.clone(),
                    offset: n,
                },
                decoded,
                topic: None,
                partition: None,
                partitions: None,
                epoch: None,
                assignment: None,
                raw_key: None,
                raw_value: keep_raw.then(|| buf.clone()),
            };
            if self.tx.blocking_send(input).is_err() {
                break;
            }
            sent += 1;
        }
        info!(path = %self.path.display(), lines = line_no, sent, "file source finished");
        Ok(sent)
    }
}

/// What one call of [`read_line_bounded`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LineRead {
    /// Bytes read, the newline included.
    len: usize,
    /// Bytes were dropped to keep the line within the limit.
    cut: bool,
    /// The newline was found (else the file ended first).
    complete: bool,
}

/// Reads one line into `buf` (appending to what it holds), keeping it to at
/// most `limit` bytes (0: no limit) and discarding the rest.
fn read_line_bounded<R: Read>(
    reader: &mut BufReader<R>,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<LineRead> {
    let mut line = LineRead {
        len: 0,
        cut: false,
        complete: false,
    };
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(line);
        }
        // memchr scans a word or a vector register at a time; a byte-wise
        // search was 4% of the node's instructions on a file source.
        let (chunk, done) = match memchr::memchr(b'\n', available) {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let len = chunk.len();
        if limit == 0 || buf.len() + len <= limit + 2 {
            buf.extend_from_slice(chunk);
        } else {
            line.cut = true;
            let room = (limit + 2).saturating_sub(buf.len());
            buf.extend_from_slice(&chunk[..room.min(len)]);
        }
        line.len += len;
        reader.consume(len);
        if done {
            line.complete = true;
            return Ok(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_followed_file_is_polled_every_millisecond_until_idle_for_a_second() {
        let ms = std::time::Duration::from_millis;
        // Still being written: however long the source has waited already.
        assert_eq!(next_poll(ms(1), ms(0)), ms(1));
        assert_eq!(next_poll(ms(32), ms(999)), ms(1));
        // Idle: back off, doubling, to at most 50 ms.
        assert_eq!(next_poll(ms(1), ms(1000)), ms(2));
        assert_eq!(next_poll(ms(16), ms(5000)), ms(32));
        assert_eq!(next_poll(ms(32), ms(5000)), ms(50));
        assert_eq!(next_poll(ms(50), ms(60_000)), ms(50));
    }

    #[test]
    fn bounded_lines_are_cut_not_buffered() {
        let data = b"short\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\nlast".to_vec();
        let mut r = BufReader::with_capacity(8, data.as_slice());
        let mut buf = Vec::new();
        let line = |len, cut, complete| LineRead { len, cut, complete };
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 10).expect("read"),
            line(6, false, true)
        );
        assert_eq!(buf, b"short\n");
        buf.clear();
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 10).expect("read"),
            line(41, true, true)
        );
        assert!(buf.len() <= 12);
        buf.clear();
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 10).expect("read"),
            line(4, false, false)
        );
        assert_eq!(buf, b"last");
        buf.clear();
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 10).expect("read"),
            line(0, false, false)
        );
    }
}
