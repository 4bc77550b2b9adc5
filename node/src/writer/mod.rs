//! The state writer: the one task that changes a node's RocksDB state.
//!
//! Sources decode records and hand them over through a bounded channel (a
//! full channel stops the sources: backpressure, not buffering). The writer
//! takes them in batches and, for each batch:
//! 1. writes its dead letters and waits for their acknowledgement;
//! 2. applies every record through the replica operator into one
//!    transaction, offsets included — while the previous batch is still
//!    being written (this batch sees that one's rows through an overlay);
//! 3. writes the transaction (fsync by default), after the previous one;
//! 4. only then tells subscribers about the new changes.
//!
//! A crash anywhere before 3 leaves no trace of the batch but its dead
//! letters (repeated, at-least-once, after restart); a crash after 3 loses
//! nothing, because reading resumes after the stored offsets.
//!
//! In a cluster, step 3 is replaced by writing the batch's effects to the
//! view's change log, and every node commits what it reads from that log
//! ([`Writer::process_log`]).

pub mod dead_letter;

use crate::cluster::LogInput;
use crate::config::{ChangelogSection, PipelineSection};
use crate::lifecycle::{Fatal, catch_panic};
use crate::now_ms;
use crate::telemetry::{metric, unix_seconds};
pub use crate::views::Inputs;
use crate::views::{Commits, Committed, ForView};
use crate::writer::dead_letter::{DeadLetter, DeadLetterSink};
use ndc_operators::{
    DecodeError, Decoded, Outcome, Pending, Position, PreparedWrite, Replayed, Store, ViewId,
};
use ndc_proto::state::LogRecord;
use ndc_proto::v1::Change;
use prost::Message as _;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

/// One record from a source, decoded for one view.
#[derive(Debug)]
pub struct Input {
    pub view: ViewId,
    pub pos: Position,
    pub decoded: Result<Decoded, DecodeError>,
    /// Kafka coordinates, for dead-letter headers.
    pub topic: Option<Arc<str>>,
    pub partition: Option<i32>,
    /// Partitions of the topic, when known: a keyed record is checked
    /// against where Kafka's default partitioner puts its key, so that keyed
    /// reads may go to the key's shard alone ([`ndc_operators::shard`]).
    pub partitions: Option<u32>,
    /// Cluster mode: the assignment epoch under which the record was read.
    pub epoch: Option<u64>,
    /// Cluster mode: the consumer assignment that read it (see
    /// `ClusterLog::revoked`).
    pub assignment: Option<u64>,
    /// Original bytes, kept only for rejected records.
    pub raw_key: Option<Vec<u8>>,
    pub raw_value: Option<Vec<u8>>,
}

impl ForView for Input {
    fn view(&self) -> ViewId {
        self.view
    }
}

impl ForView for LogInput {
    fn view(&self) -> ViewId {
        self.view
    }
}

/// Which writer of a pool of `writers` writes each view: the shards of
/// every configured view (`replicas`, each a view's store views in shard
/// order) spread over the writers, so that a view's shards are applied
/// on as many cores as there are writers; every other view (pipeline
/// views, whose merges write several views in one transaction) by the
/// first writer.
pub fn assign_writers(replicas: &[Vec<ViewId>], writers: usize) -> HashMap<ViewId, usize> {
    let writers = writers.max(1);
    let mut out = HashMap::new();
    let mut next = 0usize;
    for shards in replicas {
        for &view in shards {
            out.insert(view, next % writers);
            next += 1;
        }
    }
    out
}

/// Cluster mode of the state writer: decisions go to the change log, and
/// the change log is what gets committed.
pub struct ClusterWriter {
    pub coordinator: ndc_coordinator::Coordinator,
    pub log: Arc<crate::cluster::ClusterLog>,
    pub log_rx: Option<mpsc::Receiver<LogInput>>,
    /// View → next log offset applied (read by [`crate::cluster::ClusterLog::fence`]).
    pub applied: BTreeMap<ViewId, watch::Sender<u64>>,
    pub pending: Pending,
}

/// The person-keyed task of each pipeline, by its contributions view (the
/// view its repartition route feeds).
pub type Mergers = Arc<HashMap<ViewId, ndc_operators::merge::Merger>>;

/// Largest change-log record the owner writes (Kafka's default message limit
/// is 1 MB).
const MAX_LOG_RECORD_BYTES: usize = 512 << 10;

/// Next offset of each (view, stream) after the latest commit; sources read
/// it for advisory Kafka commits and lag reporting.
pub type CommittedOffsets = Arc<Mutex<HashMap<(ViewId, Arc<str>), u64>>>;

pub struct Writer {
    /// Its place in the node's pool of writers (metrics, logs).
    pub index: usize,
    pub store: Store,
    pub rx: mpsc::Receiver<Input>,
    pub dead_letters: DeadLetterSink,
    pub commits: Commits,
    pub committed_offsets: CommittedOffsets,
    pub pipeline: PipelineSection,
    pub changelog: ChangelogSection,
    pub mergers: Mergers,
    /// Cluster mode: fencing, and the change log instead of direct commits.
    pub cluster: Option<ClusterWriter>,
    /// The batch being written while the next one is applied.
    pub inflight: Option<Inflight>,
    /// Rows of the batch in flight, for the batch being applied.
    pub unwritten: Pending,
    /// Number of the last prepared batch.
    pub batches: u64,
    /// The last batch's vector, emptied, to receive the next one: a new
    /// vector grew by doubling to a batch's size every time (a copy of
    /// the batch so far at each step, 1.3% of the node's instructions).
    pub spare_batch: Vec<Input>,
    /// Where a fatal error goes (the node stops; see [`crate::lifecycle`]).
    pub fatal: Fatal,
    /// Set once this writer met a fatal error: from then on it commits
    /// nothing (its in-memory state may be ahead of the disk) and stops.
    pub failed: bool,
}

/// A prepared batch being written (and then published) on a blocking thread.
pub struct Inflight {
    number: u64,
    task: tokio::task::JoinHandle<Result<(), ndc_operators::StoreError>>,
}

/// What a commit makes visible, captured when its batch is prepared, so that
/// the thread that writes the batch can publish it the moment it is durable.
struct Publication {
    heads: Vec<Head>,
    live_rows: Vec<(String, u64)>,
    offsets: Vec<((ViewId, Arc<str>), u64)>,
}

/// A view's new head: its last sequence and, when kept, the changes
/// that led to it.
struct Head {
    view: ViewId,
    name: String,
    committed: Committed,
}

/// `kept`: the batch's changes (see [`ndc_operators::Txn::keep_changes`]),
/// handed to subscribers with the commit.
fn publication(
    store: &Store,
    info: &ndc_operators::CommitInfo,
    views: &[ViewId],
    kept: Vec<(ViewId, Change)>,
) -> Publication {
    let mut by_view: HashMap<ViewId, Vec<Change>> = HashMap::new();
    for (view, change) in kept {
        by_view.entry(view).or_default().push(change);
    }
    Publication {
        heads: info
            .last_seqs
            .iter()
            .map(|(v, seq)| Head {
                view: *v,
                name: store.view_name(*v).to_string(),
                committed: Committed {
                    seq: *seq,
                    latest: by_view
                        .remove(v)
                        .filter(|changes| is_run_ending_at(changes, *seq))
                        .map(Arc::from),
                },
            })
            .collect(),
        live_rows: info
            .last_seqs
            .iter()
            .filter_map(|(v, _)| Some((store.view_name(*v).to_string(), store.meta(*v)?.live_rows)))
            .collect(),
        offsets: views
            .iter()
            .flat_map(|v| {
                store
                    .offsets_of(*v)
                    .into_iter()
                    .map(move |(s, o)| ((*v, s), o))
            })
            .collect(),
    }
}

/// Whether `changes` are the consecutive sequence numbers up to `last`:
/// only then may a subscriber take them instead of reading the store.
fn is_run_ending_at(changes: &[Change], last: u64) -> bool {
    let Some(first) = changes.first() else {
        return false;
    };
    changes
        .iter()
        .enumerate()
        .all(|(i, c)| Some(c.seq) == first.seq.checked_add(i as u64))
        && changes.last().map(|c| c.seq) == Some(last)
}

/// Hands committed sequence numbers to subscribers and offsets to sources.
#[derive(Clone)]
struct Publisher {
    commits: Commits,
    committed_offsets: CommittedOffsets,
}

impl Publisher {
    fn publish(&self, p: &Publication) {
        for head in &p.heads {
            if let Some(tx) = self.commits.get(&head.view) {
                let mut committed = head.committed.clone();
                // Nobody to take them: not held until the next commit.
                if tx.receiver_count() == 0 {
                    committed.latest = None;
                }
                tx.send_replace(committed);
            }
            metrics::gauge!(metric::VIEW_SEQ, "view" => head.name.clone())
                .set(head.committed.seq as f64);
        }
        for (name, rows) in &p.live_rows {
            metrics::gauge!(metric::VIEW_ROWS, "view" => name.clone()).set(*rows as f64);
        }
        {
            let mut offsets = self
                .committed_offsets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (k, o) in &p.offsets {
                offsets.insert(k.clone(), *o);
            }
        }
    }
}

/// Moves what the channel already holds into `buf`, up to `max` records,
/// without waiting for more.
fn top_up<T>(rx: &mut mpsc::Receiver<T>, buf: &mut Vec<T>, max: usize) {
    while buf.len() < max {
        match rx.try_recv() {
            Ok(item) => buf.push(item),
            Err(_) => break,
        }
    }
}

/// Most bytes of change-log records applied in one transaction. Records
/// are up to [`MAX_LOG_RECORD_BYTES`] each when an owner ingests in bulk:
/// counted in records alone, a batch of a node replaying a log held
/// gigabytes (4.6 GiB resident replaying 5M rows, docs/performance.md).
pub const MAX_LOG_BATCH_BYTES: usize = 32 << 20;

/// Receives change-log records into `buf` (empty): waits for one, then
/// takes what has arrived, up to `max` records or [`MAX_LOG_BATCH_BYTES`].
/// Returns how many it took (0: the channel closed).
async fn recv_log_batch(
    rx: &mut mpsc::Receiver<LogInput>,
    buf: &mut Vec<LogInput>,
    max: usize,
) -> usize {
    let Some(first) = rx.recv().await else {
        return 0;
    };
    let mut bytes = first.record.encoded_len();
    buf.push(first);
    while buf.len() < max && bytes < MAX_LOG_BATCH_BYTES {
        match rx.try_recv() {
            Ok(input) => {
                bytes += input.record.encoded_len();
                buf.push(input);
            }
            Err(_) => break,
        }
    }
    buf.len()
}

/// A durable write slower than this is logged: every commit waits for it.
const SLOW_STATE_WRITE: Duration = Duration::from_secs(1);

/// Writes a prepared batch durably, timing the write alone
/// ([`metric::STATE_WRITE_SECONDS`]) apart from the apply around it.
fn write_durably(prepared: PreparedWrite) -> Result<(), ndc_operators::StoreError> {
    let started = Instant::now();
    let written = prepared.write();
    let took = started.elapsed();
    metrics::histogram!(metric::STATE_WRITE_SECONDS).record(took.as_secs_f64());
    if took >= SLOW_STATE_WRITE {
        warn!(
            seconds = took.as_secs_f64(),
            "the state's durable write (WAL fsync) was slow; commits and subscribers waited for it"
        );
    }
    written
}

/// Per-batch tallies, turned into metrics once per batch. Ordered maps: a
/// batch touches a handful of entries, each counted per record, where
/// SipHash cost more than the comparisons.
#[derive(Default)]
struct Tally {
    /// By view, connector label and outcome.
    outcomes: BTreeMap<(ViewId, &'static str, Outcome), u64>,
    /// Events ordered by the commit-time fallback, by view, connector and why.
    fallbacks: BTreeMap<(ViewId, &'static str, ndc_operators::ordering::Basis), u64>,
    newest_source_ts: BTreeMap<ViewId, i64>,
    heartbeat_ts: BTreeMap<ViewId, i64>,
}

impl Writer {
    /// Runs the writer on a thread of its own (one of tokio's blocking
    /// threads, for its whole life): it applies each batch where it receives
    /// it, instead of handing it to another thread and waiting to be woken
    /// again (at 20,000 events/s, ~50 events a batch, the hand-offs cost more
    /// CPU than the work). Returns the writer when it stops (see [`Writer::run`]).
    pub fn spawn(self, span: tracing::Span) -> tokio::task::JoinHandle<Self> {
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            runtime.block_on(tracing::Instrument::instrument(self.run(), span))
        })
    }

    /// Runs until every source has stopped and the channel is drained;
    /// hands itself back (its store) with everything committed.
    pub async fn run(mut self) -> Self {
        let mut buf: Vec<Input> = Vec::with_capacity(self.pipeline.max_batch_records);
        let mut log_buf: Vec<LogInput> = Vec::new();
        let mut log_rx = self.cluster.as_mut().and_then(|c| c.log_rx.take());
        let mut sources_done = false;
        let mut last_trim = Instant::now();
        loop {
            if self.failed || (sources_done && log_rx.is_none()) {
                break;
            }
            let max = self.pipeline.max_batch_records;
            let received = tokio::select! {
                n = self.rx.recv_many(&mut buf, max), if !sources_done => Some(Ok(n)),
                n = async {
                    match log_rx.as_mut() {
                        Some(rx) => recv_log_batch(rx, &mut log_buf, max).await,
                        None => std::future::pending().await,
                    }
                } => Some(Err(n)),
                _ = tokio::time::sleep(self.changelog.trim_interval) => None,
            };
            match received {
                Some(Err(0)) => log_rx = None,
                Some(Err(_)) => {
                    let batch = std::mem::take(&mut log_buf);
                    self = self.process_log(batch).await;
                }
                Some(Ok(0)) => sources_done = true,
                Some(Ok(_)) => {
                    // Give the sources a moment to fill the batch.
                    let deadline = tokio::time::Instant::now() + self.pipeline.max_batch_delay;
                    while buf.len() < self.pipeline.max_batch_records {
                        let room = self.pipeline.max_batch_records - buf.len();
                        match tokio::time::timeout_at(deadline, self.rx.recv_many(&mut buf, room))
                            .await
                        {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                    // Short of a full batch the node keeps up: rather than
                    // apply these few records now and wait for the write in
                    // flight afterwards, wait for it first and take what
                    // arrived meanwhile into this batch. A record arriving
                    // during a write is then committed by the next write,
                    // not the one after it, and batches are fewer and larger
                    // at low rates. Under load batches are full and keep
                    // being applied while the previous one is written.
                    if self.inflight.is_some() && buf.len() < self.pipeline.max_batch_records {
                        self.finish_inflight().await;
                        top_up(&mut self.rx, &mut buf, self.pipeline.max_batch_records);
                    }
                    let batch = std::mem::take(&mut buf);
                    self = self.process(batch).await;
                    buf = std::mem::take(&mut self.spare_batch);
                }
                None => {}
            }
            if last_trim.elapsed() >= self.changelog.trim_interval {
                self.finish_inflight().await;
                self = self.trim().await;
                last_trim = Instant::now();
            }
        }
        self.finish_inflight().await;
        if self.failed {
            error!(
                "state writer stopped on a fatal error; nothing after the last commit was written"
            );
        } else {
            info!("state writer stopped: all sources finished");
        }
        self
    }

    /// Stops this writer on a fatal error (see [`Writer::failed`]) and asks
    /// the node to stop.
    fn fail(&mut self, error: impl std::fmt::Display) {
        self.failed = true;
        self.fatal.raise(error);
    }

    async fn process(mut self, mut batch: Vec<Input>) -> Self {
        let started = Instant::now();
        if let Some(c) = &self.cluster {
            self.fence(c, &mut batch);
            if batch.is_empty() {
                return self;
            }
        }
        let records = batch.len();
        // 1. Dead letters first, acknowledged, for records not applied before.
        let letters: Vec<DeadLetter> = batch
            .iter()
            .filter_map(|i| {
                let err = i.decoded.as_ref().err()?;
                let applied = self
                    .store
                    .next_offset(i.view, &i.pos.stream)
                    .is_some_and(|n| i.pos.offset < n);
                (!applied).then(|| DeadLetter {
                    view: self.store.view_name(i.view).to_string(),
                    stream: i.pos.stream.to_string(),
                    topic: i.topic.as_deref().map(str::to_string),
                    partition: i.partition,
                    offset: i.pos.offset,
                    key: i.raw_key.clone(),
                    value: i.raw_value.clone(),
                    error: err.clone(),
                })
            })
            .collect();
        if !letters.is_empty() {
            let mut attempt = 0u32;
            while let Err(e) = self.dead_letters.write_all(&letters).await {
                attempt += 1;
                metrics::counter!(metric::DEAD_LETTER_ERRORS).increment(1);
                let wait = Duration::from_millis(100 * u64::from(attempt.min(50)));
                error!(error = %e, attempt, "cannot write dead letters; the batch waits (nothing is committed past them)");
                tokio::time::sleep(wait).await;
            }
            for l in &letters {
                warn!(view = %l.view, stream = %l.stream, offset = l.offset, kind = l.error.kind.as_str(),
                      reason = %l.error.message, "record dead-lettered");
                metrics::counter!(metric::DEAD_LETTERS, "view" => l.view.clone(), "reason" => l.error.kind.as_str())
                    .increment(1);
                if l.error.kind == ndc_operators::DecodeErrorKind::InvalidNationalId {
                    metrics::counter!(metric::INVALID_NATIONAL_IDS, "view" => l.view.clone(),
                        "reason" => l.error.detail.unwrap_or("other"))
                    .increment(1);
                }
            }
        }
        if self.cluster.is_some() {
            return self.decide_and_log(batch, started).await;
        }
        // 2 + 3. Apply, on the writer's own thread (see [`Writer::spawn`]),
        // while the previous batch is still being written (it is seen
        // through `unwritten`).
        let now = now_ms();
        self.batches += 1;
        let number = self.batches;
        let views: Vec<ViewId> = self.commits.keys().copied().collect();
        let keep = self.has_followers();
        let outcome = catch_panic("state writer", || {
            apply_batch(
                &mut self.store,
                &self.unwritten,
                &self.mergers,
                &batch,
                now,
                keep,
            )
            .map(|a| {
                let publication = publication(&self.store, &a.info, &views, a.kept);
                (a.prepared, publication, a.rows, a.tally)
            })
        });
        batch.clear();
        self.spare_batch = batch;
        match outcome {
            Err(e) => self.fail(e),
            Ok(Err(e)) => self.fail(format!("cannot read the state store: {e}")),
            Ok(Ok((prepared, publication, effects, tally))) => {
                // Writes stay in order: the previous batch first. If it
                // failed, this one is not written: committing it without
                // the previous one would move the stored offsets past
                // records that were never committed.
                self.finish_inflight().await;
                if self.failed {
                    return self;
                }
                self.unwritten.absorb(effects, number);
                // 4. Write, then publish as soon as it is durable.
                let publisher = self.publisher();
                let commits = self.commit_counter();
                let task = tokio::task::spawn_blocking(move || {
                    write_durably(prepared)?;
                    commits.increment(1);
                    publisher.publish(&publication);
                    metrics::histogram!(metric::COMMIT_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    Ok(())
                });
                self.inflight = Some(Inflight { number, task });
                self.record(tally, now);
                metrics::histogram!(metric::BATCH_RECORDS).record(records as f64);
            }
        }
        self
    }

    /// Waits for the batch in flight to be durable (and published).
    async fn finish_inflight(&mut self) {
        let Some(Inflight { number, task }) = self.inflight.take() else {
            return;
        };
        match task.await {
            Ok(Ok(())) => self.unwritten.applied_through_all(number),
            // The state store failed (disk full, I/O error). The batch is
            // not committed; stopping is the only safe answer: a restart
            // resumes from the last commit.
            Ok(Err(e)) => self.fail(format!("cannot commit to the state store: {e}")),
            Err(e) => self.fail(format!("the state write panicked: {e}")),
        }
    }

    /// Whether any view has a subscriber (or forwarder) to hand a batch's
    /// changes to; without one they are not kept past the batch.
    fn has_followers(&self) -> bool {
        self.commits.values().any(|tx| tx.receiver_count() > 0)
    }

    fn commit_counter(&self) -> metrics::Counter {
        metrics::counter!(metric::WRITER_COMMITS, "writer" => self.index.to_string())
    }

    fn publisher(&self) -> Publisher {
        Publisher {
            commits: self.commits.clone(),
            committed_offsets: self.committed_offsets.clone(),
        }
    }

    /// Cluster mode, owner side: decides the batch against the state plus
    /// what this node has logged but not applied back, and writes the effects
    /// to the change log. Nothing is committed here: the log comes back
    /// through [`Writer::process_log`], on this node as on every other.
    async fn decide_and_log(mut self, batch: Vec<Input>, started: Instant) -> Self {
        let records = batch.len();
        let now = now_ms();
        let outcome = catch_panic("state writer", || match &self.cluster {
            Some(c) => decide_batch(&mut self.store, &c.pending, &self.mergers, &batch, now),
            None => Ok((Vec::new(), Tally::default())),
        });
        let (logged, tally) = match outcome {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                self.fail(format!("cannot read the state store: {e}"));
                return self;
            }
            Err(e) => {
                self.fail(e);
                return self;
            }
        };
        let mut by_view: BTreeMap<ViewId, (Vec<LogRecord>, Vec<Vec<ViewId>>)> = BTreeMap::new();
        for d in logged {
            let (records, on) = by_view.entry(d.log).or_default();
            records.push(d.record);
            on.push(d.on);
        }
        let mut log_failed = None;
        if let Some(c) = self.cluster.as_mut() {
            for (view, (records, on)) in by_view {
                match c.log.append(view, &records).await {
                    Ok(offsets) => {
                        for ((record, on), offset) in records.iter().zip(&on).zip(offsets) {
                            c.pending
                                .record(view, on.iter().copied().zip(&record.effects), offset);
                        }
                    }
                    Err(e) => {
                        // Some records may be in the log; the rest are not.
                        // A restart resumes from what the log delivers back.
                        log_failed = Some(format!("cannot write the change log: {e}"));
                        break;
                    }
                }
            }
            metrics::gauge!(metric::LOG_PENDING).set(c.pending.len() as f64);
        }
        if let Some(e) = log_failed {
            self.fail(e);
            return self;
        }
        self.record(tally, now);
        metrics::histogram!(metric::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(metric::BATCH_RECORDS).record(records as f64);
        self
    }

    /// Cluster mode, every node: applies change-log records and commits them
    /// with the log position, then publishes like a local commit.
    /// Applies a batch of change-log records; a shard copy among them
    /// (see [`crate::cluster::trim`]) is installed in its place in the
    /// order: what came before it is committed first, what comes after
    /// applies on top of it.
    async fn process_log(mut self, batch: Vec<LogInput>) -> Self {
        if batch.iter().all(|i| i.copy.is_none()) {
            return self.process_log_records(batch).await;
        }
        let mut run = Vec::new();
        for mut input in batch {
            match input.copy.take() {
                None => run.push(input),
                Some(entries) => {
                    if !run.is_empty() {
                        self = self.process_log_records(std::mem::take(&mut run)).await;
                    }
                    if self.failed {
                        return self;
                    }
                    self.install_copy(input.view, input.offset, entries);
                }
            }
        }
        if !run.is_empty() && !self.failed {
            self = self.process_log_records(run).await;
        }
        self
    }

    /// Replaces a shard's state — the views its log writes, the shard's
    /// own last (it holds the log position: a crash half-way leaves the
    /// shard behind the log's start, and it is copied again) — with a
    /// holder's copy whose log position is `next_offset`, and tells
    /// subscribers and the fence waiters.
    fn install_copy(
        &mut self,
        view: ViewId,
        next_offset: u64,
        copy: Vec<(String, std::path::PathBuf)>,
    ) {
        let started = Instant::now();
        let mut heads = Vec::new();
        for (name, file) in copy {
            // A view this node does not run (other pipeline versions) is
            // skipped, as its effects in log records are.
            let Some(id) = self
                .store
                .view_id(&name)
                .filter(|id| self.store.held_views().contains(id))
            else {
                warn!(view = %name, "a shard copy names a view this writer does not hold; skipped (run the same pipeline versions on every node)");
                let _ = std::fs::remove_file(&file);
                continue;
            };
            let installed = ndc_operators::copy_file::read_copy_file(&file)
                .and_then(|entries| self.store.install_view_from(&name, entries));
            let _ = std::fs::remove_file(&file);
            if let Err(e) = installed {
                self.fail(format!("cannot install the copy of {name}: {e}"));
                return;
            }
            heads.push((id, self.store.meta(id).map_or(0, |m| m.last_seq)));
        }
        metrics::counter!(metric::SHARD_COPIES, "side" => "installed").increment(1);
        info!(shard = %self.store.view_name(view), views = heads.len(), next_offset,
              seconds = started.elapsed().as_secs_f64(), "shard state replaced by a holder's copy");
        let info = ndc_operators::CommitInfo {
            last_seqs: heads,
            changes: 0,
        };
        let views: Vec<ViewId> = self.commits.keys().copied().collect();
        self.publisher()
            .publish(&publication(&self.store, &info, &views, Vec::new()));
        if let Some(c) = self.cluster.as_mut() {
            if let Some(last) = next_offset.checked_sub(1) {
                c.pending.applied_through(view, last);
            }
            if let Some(tx) = c.applied.get(&view) {
                tx.send_replace(next_offset);
            }
        }
    }

    async fn process_log_records(mut self, batch: Vec<LogInput>) -> Self {
        let now = now_ms();
        let keep = self.has_followers();
        let outcome = catch_panic("state writer", || {
            let mut counts: HashMap<&'static str, u64> = HashMap::new();
            let mut txn = self.store.begin(now);
            if keep {
                txn.keep_changes();
            }
            for input in &batch {
                let r = txn.replay(input.view, &input.record, &input.stream, input.offset)?;
                let name = match r {
                    Replayed::PartlyApplied { unknown_views } => {
                        warn!(views = ?unknown_views, offset = input.offset,
                              "change-log record names views this node does not hold; their effects are skipped (run the same pipeline versions on every node)");
                        "unknown_view"
                    }
                    Replayed::Applied => "applied",
                    Replayed::Fence => "fence",
                    Replayed::Fenced => "fenced",
                    Replayed::AlreadyApplied => "already_applied",
                };
                *counts.entry(name).or_insert(0) += 1;
            }
            let kept = txn.take_changes();
            let (info, prepared) = txn.prepare();
            write_durably(prepared)?;
            Ok::<_, ndc_operators::StoreError>((info, counts, kept))
        });
        match outcome {
            Err(e) => self.fail(e),
            Ok(Err(e)) => self.fail(format!("cannot commit to the state store: {e}")),
            Ok(Ok((info, counts, kept))) => {
                self.commit_counter().increment(1);
                for (outcome, n) in counts {
                    metrics::counter!(metric::LOG_RECORDS, "outcome" => outcome).increment(n);
                }
                let mut last: BTreeMap<ViewId, u64> = BTreeMap::new();
                for input in &batch {
                    let e = last.entry(input.view).or_insert(0);
                    *e = (*e).max(input.offset);
                }
                // Publish first: a new owner waiting for its fence reads the
                // stored source offsets as soon as `applied` passes it.
                let views: Vec<ViewId> = self.commits.keys().copied().collect();
                self.publisher()
                    .publish(&publication(&self.store, &info, &views, kept));
                if let Some(c) = self.cluster.as_mut() {
                    for (view, offset) in &last {
                        c.pending.applied_through(*view, *offset);
                        if let Some(tx) = c.applied.get(view) {
                            tx.send_replace(offset + 1);
                        }
                    }
                    metrics::gauge!(metric::LOG_PENDING).set(c.pending.len() as f64);
                }
            }
        }
        self
    }

    /// Drops records of partitions this node may not act on any more (lease
    /// expired, or the partition moved to another owner or epoch): neither
    /// their effects nor their offsets are committed, nothing is published.
    ///
    /// Once some records of a consumer assignment are dropped, the rest of
    /// that assignment is dropped too (even if the lease comes back at once)
    /// and the consumer restarts the partition from the committed offset:
    /// deciding later records would move the stored offset past the dropped
    /// ones, and they would never be read again.
    fn fence(&self, cluster: &ClusterWriter, batch: &mut Vec<Input>) {
        let mut verdicts: HashMap<(ViewId, Arc<str>, i32, u64, u64), bool> = HashMap::new();
        let before = batch.len();
        batch.retain(|i| {
            let (Some(topic), Some(partition), Some(epoch)) = (&i.topic, i.partition, i.epoch)
            else {
                return true; // not from a cluster-assigned partition (file sources)
            };
            let assignment = i.assignment.unwrap_or(0);
            *verdicts
                .entry((i.view, topic.clone(), partition, epoch, assignment))
                .or_insert_with(|| {
                    cluster.log.revoked.admit(assignment, || {
                        let pid = crate::cluster::partition_id(
                            self.store.view_name(i.view),
                            topic,
                            partition,
                        );
                        cluster.coordinator.may_act(&pid, epoch)
                    })
                })
        });
        let dropped = before - batch.len();
        if dropped > 0 {
            metrics::counter!(metric::FENCED_RECORDS).increment(dropped as u64);
            info!(
                dropped,
                "records of partitions no longer held here were dropped before commit"
            );
        }
    }

    fn record(&self, tally: Tally, now: i64) {
        for ((view, connector, outcome), n) in tally.outcomes {
            metrics::counter!(metric::SOURCE_RECORDS, "view" => self.store.view_name(view).to_string(),
                              "connector" => connector, "outcome" => outcome.as_str())
            .increment(n);
        }
        for ((view, connector, basis), n) in tally.fallbacks {
            metrics::counter!(metric::ORDER_FALLBACKS, "view" => self.store.view_name(view).to_string(),
                              "connector" => connector, "reason" => basis.as_str())
            .increment(n);
        }
        for (view, ts) in tally.newest_source_ts {
            let name = self.store.view_name(view).to_string();
            metrics::gauge!(metric::VIEW_SOURCE_TS, "view" => name.clone()).set(unix_seconds(ts));
            if ts > 0 {
                metrics::gauge!(metric::REPLICATION_LAG, "view" => name)
                    .set(((now - ts).max(0)) as f64 / 1000.0);
            }
        }
        for (view, ts) in tally.heartbeat_ts {
            metrics::gauge!(metric::HEARTBEAT_TS, "view" => self.store.view_name(view).to_string())
                .set(unix_seconds(ts));
        }
    }

    async fn trim(mut self) -> Self {
        let max_events = self.changelog.retention_events;
        let period = self.changelog.retention_period;
        let trimmed = catch_panic("change stream retention", || {
            let cutoff = now_ms() - i64::try_from(period.as_millis()).unwrap_or(i64::MAX);
            let views: Vec<ViewId> = self.commits.keys().copied().collect();
            for view in views {
                match self
                    .store
                    .trim_changelog(view, max_events, Some(cutoff), 100_000)
                {
                    Ok(0) => {}
                    Ok(n) => {
                        let name = self.store.view_name(view).to_string();
                        info!(view = %name, removed = n, "change stream trimmed by retention");
                        metrics::counter!(metric::CHANGELOG_TRIMMED, "view" => name).increment(n);
                    }
                    Err(e) => warn!(error = %e, "change stream retention failed; will retry"),
                }
            }
            let (sst, mem) = self.store.reader().size_bytes();
            metrics::gauge!(metric::STATE_SST_BYTES).set(sst as f64);
            metrics::gauge!(metric::STATE_MEMTABLE_BYTES).set(mem as f64);
        });
        if let Err(e) = trimmed {
            self.fail(e);
        }
        self
    }
}

/// The keys a batch will look up, for one batched read.
fn keys_of(batch: &[Input]) -> impl Iterator<Item = (ViewId, &ndc_operators::Key)> {
    batch.iter().filter_map(|i| match &i.decoded {
        Ok(Decoded::Change(e)) => e.key.as_ref().map(|k| (i.view, k)),
        _ => None,
    })
}

/// Runs one record through the replica operator (or records it as consumed
/// without effect), counting what happened.
fn apply_input(
    txn: &mut ndc_operators::Txn<'_>,
    mergers: &Mergers,
    input: &Input,
    tally: &mut Tally,
) -> Result<Outcome, ndc_operators::StoreError> {
    let outcome = match &input.decoded {
        Ok(Decoded::Change(event)) => {
            let outcome = ndc_operators::replica::apply(txn, input.view, event, &input.pos)?;
            if outcome != Outcome::AlreadyApplied
                && let (Some(key), Some(p), Some(n)) =
                    (&event.key, input.partition, input.partitions)
                && let Some((before, now)) = txn.check_key_placement(input.view, key, p, n)?
                && now.broken
            {
                // Which key is not said: keys name people. Whether the view
                // was routed, and so whether its keyed reads change, is the
                // serving side's to say (`ViewRegistry::set_key_routes`).
                info!(
                    view = txn.view_name(input.view),
                    partition = p,
                    partitions = n,
                    after_records_in_place = before.is_some(),
                    "a keyed record is not in the partition Kafka's default partitioner gives its \
                     key (another partitioner, a key layout other than canonical JSON, or \
                     partitions added): keyed reads of this view read every shard"
                );
            }
            if matches!(
                outcome,
                Outcome::Inserted | Outcome::Updated | Outcome::Deleted | Outcome::Truncated
            ) {
                let ts = tally.newest_source_ts.entry(input.view).or_insert(0);
                *ts = (*ts).max(event.source.ts_ms);
            }
            outcome
        }
        Ok(Decoded::Heartbeat { ts_ms }) => {
            if let Some(ts) = ts_ms {
                let e = tally.heartbeat_ts.entry(input.view).or_insert(0);
                *e = (*e).max(*ts);
            }
            txn.skip(input.view, &input.pos, Outcome::Skipped)
        }
        Ok(Decoded::Fact(fact)) => match mergers.get(&input.view) {
            Some(merger) => merger.apply(txn, fact, &input.pos)?,
            None => txn.skip(input.view, &input.pos, Outcome::Skipped),
        },
        Ok(Decoded::Tombstone { .. } | Decoded::Transaction(_) | Decoded::Message) => {
            txn.skip(input.view, &input.pos, Outcome::Skipped)
        }
        Err(_) => txn.skip(input.view, &input.pos, Outcome::DeadLettered),
    };
    let connector = match &input.decoded {
        Ok(Decoded::Change(event)) => event.source.connector_label(),
        _ => "none",
    };
    *tally
        .outcomes
        .entry((input.view, connector, outcome))
        .or_insert(0) += 1;
    for (key, n) in txn.take_order_fallbacks() {
        *tally.fallbacks.entry(key).or_insert(0) += n;
    }
    Ok(outcome)
}

/// A batch applied, ready to be written.
struct AppliedBatch {
    info: ndc_operators::CommitInfo,
    prepared: ndc_operators::PreparedWrite,
    /// Its rows, for the next batch while this one is written.
    rows: ndc_operators::RowOverlay,
    /// Its changes, for subscribers (when kept).
    kept: Vec<(ViewId, Change)>,
    tally: Tally,
}

fn apply_batch(
    store: &mut Store,
    unwritten: &Pending,
    mergers: &Mergers,
    batch: &[Input],
    now: i64,
    keep_changes: bool,
) -> Result<AppliedBatch, ndc_operators::StoreError> {
    let mut tally = Tally::default();
    let mut txn = store.begin_over(now, unwritten);
    if keep_changes {
        txn.keep_changes();
    }
    txn.prefetch(keys_of(batch))?;
    for input in batch {
        apply_input(&mut txn, mergers, input, &mut tally)?;
    }
    let kept = txn.take_changes();
    let (info, prepared, rows) = txn.prepare_keeping_rows();
    Ok(AppliedBatch {
        info,
        prepared,
        rows,
        kept,
        tally,
    })
}

/// A change-log record being decided, with the view each of its effects is
/// on (index for index), for the writer's pending overlay.
struct Decided {
    log: ViewId,
    record: LogRecord,
    on: Vec<ViewId>,
}

/// Cluster mode: decides a batch without committing it. Returns, per view,
/// change-log records: runs of consecutive records of one source partition
/// with their effects and the source offset to resume from after them.
fn decide_batch(
    store: &mut Store,
    pending: &Pending,
    mergers: &Mergers,
    batch: &[Input],
    now: i64,
) -> Result<(Vec<Decided>, Tally), ndc_operators::StoreError> {
    let mut tally = Tally::default();
    let names: HashMap<ViewId, String> = batch
        .iter()
        .map(|i| (i.view, store.view_name(i.view).to_string()))
        .collect();
    let mut txn = store.begin_logged(now, pending);
    txn.prefetch(keys_of(batch))?;
    let mut out: Vec<Decided> = Vec::new();
    // (view, stream) → index in `out` of the record being filled, and its size.
    let mut open: HashMap<(ViewId, Arc<str>), (usize, usize)> = HashMap::new();
    for input in batch {
        let outcome = apply_input(&mut txn, mergers, input, &mut tally)?;
        let effects = txn.take_effects(input.view);
        if outcome == Outcome::AlreadyApplied {
            continue;
        }
        let (Some(topic), Some(partition), Some(epoch)) =
            (&input.topic, input.partition, input.epoch)
        else {
            continue; // cluster mode reads only cluster-assigned Kafka partitions
        };
        let size: usize = effects.iter().map(|(_, e)| e.encoded_len()).sum();
        let key = (input.view, input.pos.stream.clone());
        let index = match open.get(&key) {
            Some((index, filled)) if filled + size <= MAX_LOG_RECORD_BYTES || *filled == 0 => {
                *index
            }
            _ => {
                let view_name = names.get(&input.view).cloned().unwrap_or_default();
                out.push(Decided {
                    log: input.view,
                    record: LogRecord {
                        partition: crate::cluster::partition_id(&view_name, topic, partition),
                        view: view_name,
                        epoch,
                        source_stream: input.pos.stream.to_string(),
                        source_next_offset: 0,
                        fence: false,
                        effects: Vec::new(),
                    },
                    on: Vec::new(),
                });
                open.insert(key.clone(), (out.len() - 1, 0));
                out.len() - 1
            }
        };
        if let Some(d) = out.get_mut(index) {
            for (on, effect) in effects {
                d.on.push(on);
                d.record.effects.push(effect);
            }
            d.record.source_next_offset = d.record.source_next_offset.max(input.pos.offset + 1);
        }
        if let Some(entry) = open.get_mut(&key) {
            entry.1 += size;
        }
    }
    // Dropped, not committed: the effects come back through the log.
    drop(txn);
    Ok((out, tally))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(seqs: &[u64]) -> Vec<Change> {
        seqs.iter()
            .map(|&seq| Change {
                seq,
                ..Default::default()
            })
            .collect()
    }

    #[tokio::test]
    async fn a_top_up_takes_what_is_waiting_up_to_a_full_batch_and_never_waits() {
        let (tx, mut rx) = mpsc::channel::<u32>(16);
        for i in 0..5 {
            tx.send(i).await.unwrap();
        }
        let mut buf = vec![100];
        top_up(&mut rx, &mut buf, 4);
        assert_eq!(buf, vec![100, 0, 1, 2], "stops at a full batch");
        top_up(&mut rx, &mut buf, 10);
        assert_eq!(buf, vec![100, 0, 1, 2, 3, 4], "takes the rest, in order");
        // Nothing waiting (and the sender still open): returns at once.
        top_up(&mut rx, &mut buf, 10);
        assert_eq!(buf.len(), 6);
        drop(tx);
        top_up(&mut rx, &mut buf, 10);
        assert_eq!(buf.len(), 6, "a closed channel is left for recv to report");
    }

    /// A node replaying a log of the largest records applies them a bounded
    /// number of bytes at a time, not `max_batch_records` of them (5,000 ×
    /// 512 KiB); small records still fill a batch by count.
    #[tokio::test]
    async fn log_batches_are_bounded_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _, _, view) = writer(dir.path());
        let input = |bytes: usize| LogInput {
            view,
            stream: Arc::from("log:t:0"),
            offset: 0,
            record: LogRecord {
                partition: "p".repeat(bytes),
                ..LogRecord::default()
            },
            copy: None,
        };
        let (tx, mut rx) = mpsc::channel(1000);
        for _ in 0..200 {
            tx.send(input(MAX_LOG_RECORD_BYTES)).await.unwrap();
        }
        let mut buf = Vec::new();
        let n = recv_log_batch(&mut rx, &mut buf, 5000).await;
        let bytes: usize = buf.iter().map(|i| i.record.encoded_len()).sum();
        assert!(
            n < 200 && bytes <= MAX_LOG_BATCH_BYTES + MAX_LOG_RECORD_BYTES + 16,
            "{n} records, {bytes} bytes"
        );
        buf.clear();
        while rx.try_recv().is_ok() {}
        for _ in 0..300 {
            tx.send(input(100)).await.unwrap();
        }
        assert_eq!(recv_log_batch(&mut rx, &mut buf, 250).await, 250);
        drop(tx);
        buf.clear();
        assert_eq!(recv_log_batch(&mut rx, &mut buf, 250).await, 50);
        buf.clear();
        assert_eq!(recv_log_batch(&mut rx, &mut buf, 250).await, 0, "closed");
    }

    /// A writer over a fresh store with one view `v`, fed by the returned
    /// sender; fatal errors go to the returned handle.
    fn writer(dir: &std::path::Path) -> (Writer, mpsc::Sender<Input>, Fatal, ViewId) {
        let mut config = ndc_operators::StoreConfig::new(dir.join("state"));
        config.sync_commits = false;
        let store = Store::open(&config, &["v".to_string()]).unwrap();
        let view = store.view_id("v").unwrap();
        let views = crate::views::ViewRegistry::default();
        views.insert("v", view, 0, vec!["id".into()], Default::default(), None);
        let (tx, rx) = mpsc::channel(16);
        let fatal = Fatal::new(tokio_util::sync::CancellationToken::new());
        let writer = writer_over(0, store, rx, dir, &views, &fatal, Default::default());
        (writer, tx, fatal, view)
    }

    fn writer_over(
        index: usize,
        store: Store,
        rx: mpsc::Receiver<Input>,
        dir: &std::path::Path,
        views: &crate::views::ViewRegistry,
        fatal: &Fatal,
        committed_offsets: CommittedOffsets,
    ) -> Writer {
        Writer {
            index,
            store,
            rx,
            dead_letters: DeadLetterSink::File {
                path: dir.join("dead-letters.ndjson"),
            },
            commits: views.publishers(),
            committed_offsets,
            pipeline: Default::default(),
            changelog: Default::default(),
            mergers: Default::default(),
            cluster: None,
            inflight: None,
            unwritten: Default::default(),
            batches: 0,
            spare_batch: Vec::new(),
            fatal: fatal.clone(),
            failed: false,
        }
    }

    /// A pool of two writers over one store, each with the handle of its
    /// own views (`Store::split_off`): records are routed to the writer of
    /// their view, both commit at the same time, and what each committed —
    /// rows, change streams, offsets, metadata — is all there once the
    /// handles are joined, and after the store is opened again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pool_of_writers_commits_each_writers_views_side_by_side() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ndc_operators::StoreConfig::new(dir.path().join("state"));
        config.sync_commits = true;
        let names = ["a".to_string(), "b".to_string()];
        let mut store = Store::open(&config, &names).unwrap();
        let (a, b) = (store.view_id("a").unwrap(), store.view_id("b").unwrap());
        let views = crate::views::ViewRegistry::default();
        views.insert("a", a, 0, vec!["id".into()], Default::default(), None);
        views.insert("b", b, 0, vec!["id".into()], Default::default(), None);
        let by_view = Arc::new(assign_writers(&[vec![a, b]], 2));
        assert_eq!((by_view[&a], by_view[&b]), (0, 1));
        let second = store.split_off(&[b]);
        assert_eq!(store.held_views(), vec![a]);
        assert_eq!(second.held_views(), vec![b]);
        let (inputs, rxs) = Inputs::<Input>::new(by_view, 2, 64);
        let fatal = Fatal::new(tokio_util::sync::CancellationToken::new());
        let committed = CommittedOffsets::default();
        let mut running = Vec::new();
        for (i, (store, rx)) in [store, second].into_iter().zip(rxs).enumerate() {
            let w = writer_over(i, store, rx, dir.path(), &views, &fatal, committed.clone());
            running.push(w.spawn(tracing::info_span!("test_writer", writer = i)));
        }
        let per_view = 500u64;
        for n in 0..per_view {
            inputs.send(insert(a, n, n)).await.unwrap();
            inputs.send(insert(b, n, n)).await.unwrap();
        }
        drop(inputs);
        let mut joined: Option<Store> = None;
        let mut commits_by = Vec::new();
        for r in running {
            let w = tokio::time::timeout(Duration::from_secs(30), r)
                .await
                .expect("each writer stops once its channel is drained")
                .unwrap();
            assert!(!w.failed);
            commits_by.push(w.batches);
            match joined.as_mut() {
                None => joined = Some(w.store),
                Some(s) => s.join(w.store),
            }
        }
        assert!(
            commits_by.iter().all(|&n| n > 0),
            "both writers committed: {commits_by:?}"
        );
        let check = |store: &Store| {
            for view in [a, b] {
                assert_eq!(store.meta(view).map(|m| m.last_seq), Some(per_view));
                assert_eq!(store.meta(view).map(|m| m.live_rows), Some(per_view));
                assert_eq!(store.next_offset(view, "file:test"), Some(per_view));
            }
        };
        let joined = joined.unwrap();
        assert_eq!(joined.held_views(), vec![a, b]);
        check(&joined);
        drop(joined);
        let reopened = Store::open(&config, &names).unwrap();
        check(&reopened);
        let changes = reopened.reader().changes_after("b", 0, 10_000).unwrap();
        assert_eq!(changes.len() as u64, per_view);
    }

    /// A shard copy in a log batch replaces, in the batch's order, every
    /// view it carries (those the shard's log writes, then the shard), and
    /// their heads go to subscribers; a view this node does not run is
    /// skipped without stopping the writer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shard_copy_replaces_each_view_it_carries_and_publishes_their_heads() {
        let (holder_dir, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let names = ["contributions".to_string(), "golden".to_string()];
        let open = |dir: &std::path::Path, names: &[String]| {
            let mut config = ndc_operators::StoreConfig::new(dir.join("state"));
            config.sync_commits = false;
            Store::open(&config, names).unwrap()
        };
        // What the holder has: rows in both views.
        let holder = open(holder_dir.path(), &names);
        let (hc, hg) = (
            holder.view_id("contributions").unwrap(),
            holder.view_id("golden").unwrap(),
        );
        let (tx, rx) = mpsc::channel(64);
        let fatal = Fatal::new(tokio_util::sync::CancellationToken::new());
        let hviews = crate::views::ViewRegistry::default();
        let w = writer_over(
            0,
            holder,
            rx,
            holder_dir.path(),
            &hviews,
            &fatal,
            Default::default(),
        );
        let running = w.spawn(tracing::info_span!("holder"));
        for n in 0..5 {
            tx.send(insert(hc, n, n)).await.unwrap();
            tx.send(insert(hg, n, 100 + n)).await.unwrap();
        }
        drop(tx);
        let holder = running.await.unwrap().store;
        let mut copy: Vec<(String, Vec<ndc_operators::StateEntry>)> = Vec::new();
        let exported = ["golden".to_string(), "contributions".to_string()];
        holder
            .reader()
            .export_views(&exported, 2, |name, batch| {
                match copy.last_mut() {
                    Some((n, entries)) if n == name => entries.extend(batch),
                    _ => copy.push((name.to_string(), batch)),
                }
                true
            })
            .unwrap();
        copy.insert(0, ("not-run-here".to_string(), Vec::new()));
        // Spilled to files, as the log source receives them.
        let spill = tempfile::tempdir().unwrap();
        let copy: Vec<(String, std::path::PathBuf)> = copy
            .into_iter()
            .enumerate()
            .map(|(i, (name, entries))| {
                let path = spill.path().join(format!("{i}.copy"));
                let mut file = ndc_operators::copy_file::CopyFileWriter::create(&path).unwrap();
                for e in &entries {
                    file.push(e).unwrap();
                }
                file.finish().unwrap();
                (name, path)
            })
            .collect();
        let files: Vec<std::path::PathBuf> = copy.iter().map(|(_, p)| p.clone()).collect();

        // This node: an older state of its own, a subscriber's view of the
        // heads, and the copy arriving in a log batch.
        let mine = [names[0].clone(), names[1].clone(), "other".to_string()];
        let store = open(dir.path(), &mine);
        let (c, g) = (
            store.view_id("contributions").unwrap(),
            store.view_id("golden").unwrap(),
        );
        let views = crate::views::ViewRegistry::default();
        views.insert(
            "contributions",
            c,
            0,
            vec!["id".into()],
            Default::default(),
            None,
        );
        views.insert("golden", g, 0, vec!["id".into()], Default::default(), None);
        let heads = views.publishers();
        let golden_head = heads[&g].subscribe();
        let (_tx, rx) = mpsc::channel(1);
        let mut w = writer_over(0, store, rx, dir.path(), &views, &fatal, Default::default());
        // Rows the holder does not have: gone once the copy is installed.
        w = w.process(vec![insert(g, 0, 900), insert(c, 0, 901)]).await;
        w.finish_inflight().await;
        let input = LogInput {
            view: c,
            stream: Arc::from("log:t:0"),
            offset: 42,
            record: LogRecord::default(),
            copy: Some(copy),
        };
        let w = w.process_log(vec![input]).await;
        assert!(!w.failed, "a view not run here is skipped, not fatal");
        assert!(!fatal.raised());
        let rows = |reader: &ndc_operators::StoreReader, view: &str| {
            let mut out = Vec::new();
            reader
                .scan_snapshot(view, None, 100, |b| {
                    out.extend(b.into_iter().map(|r| r.row_json));
                    true
                })
                .unwrap();
            out
        };
        let (theirs, ours) = (holder.reader(), w.store.reader());
        for view in ["contributions", "golden"] {
            assert_eq!(rows(&ours, view), rows(&theirs, view), "{view}");
            assert_eq!(
                ours.view_meta(view).unwrap().last_seq,
                theirs.view_meta(view).unwrap().last_seq
            );
        }
        assert_eq!(
            golden_head.borrow().seq,
            theirs.view_meta("golden").unwrap().last_seq
        );
        assert!(
            files.iter().all(|f| !f.exists()),
            "the copy's files are removed once installed"
        );
    }

    fn insert(view: ViewId, offset: u64, id: u64) -> Input {
        let decoder = ndc_operators::Decoder::new(ndc_operators::DecoderConfig {
            key_columns: vec!["id".into()],
            ..Default::default()
        });
        let key = format!(r#"{{"id":{id}}}"#);
        let value = format!(r#"{{"op":"c","after":{{"id":{id}}},"source":{{"ts_ms":{offset}}}}}"#);
        Input {
            view,
            pos: Position::new("file:test", offset),
            decoded: decoder.decode("", Some(key.as_bytes()), Some(value.as_bytes())),
            topic: None,
            partition: None,
            partitions: None,
            epoch: None,
            assignment: None,
            raw_key: None,
            raw_value: None,
        }
    }

    /// A batch the store cannot apply (here: a record for a view the store
    /// does not have) stops the writer: the error is raised for `main`, the
    /// node is asked to stop, and nothing of that batch or any later one is
    /// committed — a restart resumes from the last commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_error_stops_the_writer_and_commits_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, tx, fatal, view) = writer(dir.path());
        let committed = writer.committed_offsets.clone();
        let running = writer.spawn(tracing::info_span!("test_writer"));
        let next_offset = |c: &CommittedOffsets| {
            c.lock()
                .unwrap()
                .get(&(view, Arc::from("file:test")))
                .copied()
        };
        // The first record is committed before anything goes wrong.
        tx.send(insert(view, 0, 1)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while next_offset(&committed) != Some(1) {
            assert!(
                Instant::now() < deadline,
                "the first record was not committed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A view id of another store, unknown to this one.
        let other = {
            let config = ndc_operators::StoreConfig::new(dir.path().join("other"));
            let names: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
            let store = Store::open(&config, &names).unwrap();
            store.view_id("d").unwrap()
        };
        assert_ne!(other, view);
        tx.send(insert(other, 1, 2)).await.unwrap();
        tx.send(insert(view, 2, 3)).await.unwrap();
        let writer = tokio::time::timeout(Duration::from_secs(10), running)
            .await
            .expect("the writer stops on its own")
            .unwrap();
        assert!(writer.failed);
        let error = fatal.error().expect("the error is raised").0;
        assert!(error.contains("cannot read the state store"), "{error}");
        assert_eq!(
            next_offset(&committed),
            Some(1),
            "nothing committed after the failure"
        );
        assert_eq!(writer.store.next_offset(view, "file:test"), Some(1));
    }

    #[test]
    fn only_a_gapless_run_up_to_the_commit_is_handed_to_subscribers() {
        assert!(is_run_ending_at(&changes(&[4, 5, 6]), 6));
        assert!(is_run_ending_at(&changes(&[6]), 6));
        assert!(!is_run_ending_at(&changes(&[4, 6]), 6), "a gap");
        assert!(
            !is_run_ending_at(&changes(&[4, 5]), 6),
            "short of the commit"
        );
        assert!(!is_run_ending_at(&changes(&[5, 4, 6]), 6), "out of order");
        assert!(!is_run_ending_at(&[], 6));
    }
}
