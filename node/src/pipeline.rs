//! The state writer: the one task that changes a node's RocksDB state.
//!
//! Sources decode records and hand them over through a bounded channel (a
//! full channel stops the sources: backpressure, not buffering). The writer
//! takes them in batches and, for each batch:
//! 1. writes its dead letters and waits for their acknowledgement;
//! 2. applies every record through the replica operator into one
//!    transaction, offsets included;
//! 3. commits the transaction (fsync by default);
//! 4. only then tells subscribers about the new changes.
//!
//! A crash anywhere before 3 leaves no trace of the batch but its dead
//! letters (repeated, at-least-once, after restart); a crash after 3 loses
//! nothing, because reading resumes after the stored offsets.

use crate::config::{ChangelogSection, PipelineSection};
use crate::dead_letter::{DeadLetter, DeadLetterSink};
use crate::telemetry::{metric, unix_seconds};
use ndc_operators::{DecodeError, Decoded, Outcome, Position, Store, ViewId};
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
    /// Cluster mode: the assignment epoch under which the record was read.
    pub epoch: Option<u64>,
    /// Original bytes, kept only for rejected records.
    pub raw_key: Option<Vec<u8>>,
    pub raw_value: Option<Vec<u8>>,
}

/// Next offset of each (view, stream) after the latest commit; sources read
/// it for advisory Kafka commits and lag reporting.
pub type CommittedOffsets = Arc<Mutex<HashMap<(ViewId, Arc<str>), u64>>>;

pub struct Writer {
    pub store: Store,
    pub rx: mpsc::Receiver<Input>,
    pub dead_letters: DeadLetterSink,
    pub commits: BTreeMap<ViewId, watch::Sender<u64>>,
    pub committed_offsets: CommittedOffsets,
    pub pipeline: PipelineSection,
    pub changelog: ChangelogSection,
    /// Cluster mode: fencing before every commit.
    pub cluster: Option<ndc_coordinator::Coordinator>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Per-batch tallies, turned into metrics once per batch.
#[derive(Default)]
struct Tally {
    outcomes: HashMap<(ViewId, Outcome), u64>,
    newest_source_ts: HashMap<ViewId, i64>,
    heartbeat_ts: HashMap<ViewId, i64>,
}

impl Writer {
    /// Runs until every source has stopped and the channel is drained.
    pub async fn run(mut self) {
        let mut buf: Vec<Input> = Vec::with_capacity(self.pipeline.max_batch_records);
        let mut last_trim = Instant::now();
        loop {
            let received = tokio::time::timeout(
                self.changelog.trim_interval,
                self.rx.recv_many(&mut buf, self.pipeline.max_batch_records),
            )
            .await;
            match received {
                Ok(0) => break,
                Ok(_) => {
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
                    let batch = std::mem::take(&mut buf);
                    self = self.process(batch).await;
                }
                Err(_) => {}
            }
            if last_trim.elapsed() >= self.changelog.trim_interval {
                self = self.trim().await;
                last_trim = Instant::now();
            }
        }
        info!("state writer stopped: all sources finished");
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
            }
        }
        // 2 + 3. Apply and commit, off the async threads.
        let now = now_ms();
        let result = tokio::task::spawn_blocking(move || {
            let mut store = self.store;
            let outcome = apply_batch(&mut store, &batch, now);
            self.store = store;
            (self, outcome)
        })
        .await;
        let (this, outcome) = match result {
            Ok(pair) => pair,
            Err(e) => {
                // A panic in the apply path: the process cannot continue safely.
                error!(error = %e, "state writer panicked");
                std::process::abort();
            }
        };
        match outcome {
            Ok((info, tally)) => {
                // 4. Publish.
                for (view, seq) in &info.last_seqs {
                    if let Some(tx) = this.commits.get(view) {
                        tx.send_replace(*seq);
                    }
                    let name = this.store.view_name(*view).to_string();
                    metrics::gauge!(metric::VIEW_SEQ, "view" => name.clone()).set(*seq as f64);
                    if let Some(meta) = this.store.meta(*view) {
                        metrics::gauge!(metric::VIEW_ROWS, "view" => name)
                            .set(meta.live_rows as f64);
                    }
                }
                if let Ok(mut offsets) = this.committed_offsets.lock() {
                    for view in this.commits.keys() {
                        for (stream, next) in this.store.offsets_of(*view) {
                            offsets.insert((*view, stream), next);
                        }
                    }
                }
                this.record(tally, now);
                metrics::histogram!(metric::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
                metrics::histogram!(metric::BATCH_RECORDS).record(records as f64);
            }
            Err(e) => {
                // The state store failed (disk full, I/O error). Nothing of the
                // batch is committed; stopping is the only safe answer: a
                // restart resumes from the last commit.
                error!(error = %e, "cannot commit to the state store; stopping the node");
                std::process::exit(70);
            }
        }
        this
    }

    /// Drops records of partitions this node may not act on any more (lease
    /// expired, or the partition moved to another owner or epoch): neither
    /// their effects nor their offsets are committed, nothing is published.
    fn fence(&self, coordinator: &ndc_coordinator::Coordinator, batch: &mut Vec<Input>) {
        let mut verdicts: HashMap<(ViewId, Arc<str>, i32, u64), bool> = HashMap::new();
        let before = batch.len();
        batch.retain(|i| {
            let (Some(topic), Some(partition), Some(epoch)) = (&i.topic, i.partition, i.epoch)
            else {
                return true; // not from a cluster-assigned partition (file sources)
            };
            *verdicts
                .entry((i.view, topic.clone(), partition, epoch))
                .or_insert_with(|| {
                    let pid = crate::cluster::partition_id(
                        self.store.view_name(i.view),
                        topic,
                        partition,
                    );
                    coordinator.may_act(&pid, epoch)
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
        for ((view, outcome), n) in tally.outcomes {
            metrics::counter!(metric::SOURCE_RECORDS, "view" => self.store.view_name(view).to_string(),
                              "outcome" => outcome.as_str())
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

    async fn trim(self) -> Self {
        let max_events = self.changelog.retention_events;
        let period = self.changelog.retention_period;
        let result = tokio::task::spawn_blocking(move || {
            let mut this = self;
            let cutoff = now_ms() - i64::try_from(period.as_millis()).unwrap_or(i64::MAX);
            let views: Vec<ViewId> = this.commits.keys().copied().collect();
            for view in views {
                match this
                    .store
                    .trim_changelog(view, max_events, Some(cutoff), 100_000)
                {
                    Ok(0) => {}
                    Ok(n) => {
                        let name = this.store.view_name(view).to_string();
                        info!(view = %name, removed = n, "change stream trimmed by retention");
                        metrics::counter!(metric::CHANGELOG_TRIMMED, "view" => name).increment(n);
                    }
                    Err(e) => warn!(error = %e, "change stream retention failed; will retry"),
                }
            }
            let (sst, mem) = this.store.reader().size_bytes();
            metrics::gauge!(metric::STATE_SST_BYTES).set(sst as f64);
            metrics::gauge!(metric::STATE_MEMTABLE_BYTES).set(mem as f64);
            this
        })
        .await;
        match result {
            Ok(this) => this,
            Err(e) => {
                error!(error = %e, "retention task panicked");
                std::process::abort();
            }
        }
    }
}

fn apply_batch(
    store: &mut Store,
    batch: &[Input],
    now: i64,
) -> Result<(ndc_operators::CommitInfo, Tally), ndc_operators::StoreError> {
    let mut tally = Tally::default();
    let mut txn = store.begin(now);
    txn.prefetch(batch.iter().filter_map(|i| match &i.decoded {
        Ok(Decoded::Change(e)) => e.key.as_ref().map(|k| (i.view, k)),
        _ => None,
    }))?;
    for input in batch {
        let outcome = match &input.decoded {
            Ok(Decoded::Change(event)) => {
                let outcome = txn.apply(input.view, event, &input.pos)?;
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
            Ok(Decoded::Tombstone { .. } | Decoded::Transaction(_) | Decoded::Message) => {
                txn.skip(input.view, &input.pos, Outcome::Skipped)
            }
            Err(_) => txn.skip(input.view, &input.pos, Outcome::DeadLettered),
        };
        *tally.outcomes.entry((input.view, outcome)).or_insert(0) += 1;
    }
    let info = txn.commit()?;
    Ok((info, tally))
}
