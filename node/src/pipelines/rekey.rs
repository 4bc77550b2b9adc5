//! The re-keying stage of a pipeline: turns its sources' committed changes
//! into facts keyed by national ID on the pipeline's repartition topic, so
//! that all facts about one person meet on one partition (Kafka Streams'
//! repartition topics, for the same reason).
//!
//! The source's change stream is the outbox: the stage reads committed
//! changes after its cursor, publishes their facts, waits for the broker's
//! acknowledgement, and only then moves its cursor (stored in RocksDB,
//! synced). A crash between publish and cursor publishes some facts again;
//! the merge drops them as duplicates by their origin's version. When the
//! stream no longer holds the cursor's position (retention, or a merge
//! reset long after the source started), the stage re-keys the source's
//! current rows from a snapshot and follows the stream from there.

use crate::cluster::ClusterLog;
use crate::telemetry::metric;
use ndc_coordinator::Coordinator;
use ndc_operators::StoreReader;
use ndc_operators::ViewId;
use ndc_operators::merge::facts_of_change;
use ndc_proto::state::LogRecord;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Changes read per round from one source's change stream.
const CHANGES_PER_ROUND: usize = 2000;

/// One shard of a pipeline source whose rows refer to a person.
pub struct ForwardSource {
    /// Source name in the spec (the fact's `source`).
    pub source: String,
    /// The shard's store view.
    pub view: ViewId,
    /// Its store name (the cursor is stored under this name).
    pub store_name: String,
    /// Column holding the national ID.
    pub column: String,
    pub commits: crate::views::CommitReceiver,
}

pub struct Forwarder {
    pub pipeline: String,
    pub topic: String,
    /// Shards of the merge: a person's facts go to the repartition
    /// partition numbered as the person's shard (with one shard, Kafka's
    /// partitioner spreads them by national ID).
    pub person_shards: u32,
    pub sources: Vec<ForwardSource>,
    pub reader: StoreReader,
    pub producer: FutureProducer,
    /// To make a new producer when this one fails for good (an idempotent
    /// producer that the broker fenced stays fenced).
    pub producer_config: rdkafka::ClientConfig,
    pub shutdown: CancellationToken,
    /// Cluster mode: a source shard's changes are re-keyed by the node that
    /// owns its source partitions (the first of them, if several nodes own
    /// some), while its lease is valid. Its cursor travels in the shard's
    /// change log, which every holder applies: a new owner resumes where the
    /// last one got to. Facts sent twice around a hand-over are duplicates,
    /// which the merge recognises by their origin version and ignores.
    pub cluster: Option<(Coordinator, Arc<ClusterLog>)>,
}

/// Offsets-store stream, in a source shard, of its re-keying cursor for
/// one repartition topic (a merge rebuilt on a new topic starts at zero).
fn cursor_stream(topic: &str) -> String {
    format!("rekey:{topic}")
}

/// The node that re-keys a source shard: the owner of the first of its
/// partitions that has one.
fn forwarding_owner(state: &ndc_coordinator::ClusterState, shard: &str) -> Option<u64> {
    state
        .assignments
        .iter()
        .filter(|(p, _)| ndc_coordinator::state::shard_of(p) == shard)
        .find_map(|(_, a)| a.owner)
}

impl Forwarder {
    pub async fn run(mut self) {
        if self.sources.is_empty() {
            return;
        }
        // Per shard: where re-keying got to, while this node re-keys it
        // (`None`: another node does; read again when it comes back here).
        let mut cursors: Vec<Option<u64>> = vec![None; self.sources.len()];
        let mut placement = self.cluster.as_ref().map(|(c, _)| c.watch());
        let mut failures = 0u32;
        loop {
            let mut progressed = false;
            for (s, slot) in self.sources.iter().zip(cursors.iter_mut()) {
                if !self.forwards_here(s) {
                    if slot.take().is_some() {
                        info!(pipeline = %self.pipeline, shard = %s.store_name,
                              "re-keying of this shard goes on elsewhere");
                    }
                    metrics::gauge!(metric::FORWARD_LAG, "view" => s.store_name.clone()).set(0.0);
                    continue;
                }
                let cursor = match *slot {
                    Some(c) => c,
                    None => match self.start_cursor(s) {
                        Ok(c) => {
                            info!(pipeline = %self.pipeline, shard = %s.store_name, cursor = c,
                                  "re-keying this shard here");
                            *slot = Some(c);
                            c
                        }
                        Err(e) => {
                            warn!(pipeline = %self.pipeline, shard = %s.store_name, error = %e,
                                  "cannot read the re-keying cursor; retrying");
                            continue;
                        }
                    },
                };
                let committed = s.commits.borrow().seq;
                metrics::gauge!(metric::FORWARD_LAG, "view" => s.store_name.clone())
                    .set(committed.saturating_sub(cursor) as f64);
                if committed <= cursor {
                    continue;
                }
                match self.forward(s, cursor).await {
                    Ok(next) => {
                        *slot = Some(next);
                        progressed = true;
                        failures = 0;
                    }
                    Err(e) => {
                        failures += 1;
                        metrics::counter!(metric::FORWARD_ERRORS, "pipeline" => self.pipeline.clone())
                            .increment(1);
                        if failures == 1 || failures.is_multiple_of(50) {
                            warn!(pipeline = %self.pipeline, shard = %s.store_name, error = %e, failures,
                                  "cannot publish facts to the repartition topic; retrying");
                        }
                        // A fatal producer error (fenced, epoch lost) never
                        // clears, and a producer failing every round for
                        // long may be stuck the same way: a new producer
                        // takes over. What the old one may have published is
                        // published again from the cursor; the merge ignores
                        // the duplicates.
                        let fatal = self.producer.client().fatal_error();
                        if fatal.is_some() || failures.is_multiple_of(20) {
                            match self.producer_config.create::<FutureProducer>() {
                                Ok(p) => {
                                    warn!(pipeline = %self.pipeline, fatal = ?fatal, failures,
                                          "the repartition producer keeps failing; a new one takes over");
                                    metrics::counter!(metric::FORWARD_PRODUCERS_RENEWED, "pipeline" => self.pipeline.clone())
                                        .increment(1);
                                    self.producer = p;
                                }
                                Err(e) => warn!(pipeline = %self.pipeline, error = %e,
                                                "cannot make a new repartition producer; retrying"),
                            }
                        }
                        tokio::select! {
                            _ = self.shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(20)))) => {}
                        }
                    }
                }
            }
            if progressed {
                continue;
            }
            let changed = futures::future::select_all(
                self.sources
                    .iter_mut()
                    .map(|s| Box::pin(s.commits.changed())),
            );
            let moved = async {
                match placement.as_mut() {
                    Some(p) => p.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                (result, _, _) = changed => {
                    if result.is_err() {
                        // A view went away (pipeline dropped): stop with it.
                        break;
                    }
                }
                alive = moved => {
                    if !alive {
                        break;
                    }
                }
                // Leases lapse without a placement change.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        info!(pipeline = %self.pipeline, "re-keying stage stopped");
    }

    /// Whether this node re-keys `s` now (always, on a single node).
    fn forwards_here(&self, s: &ForwardSource) -> bool {
        let Some((c, _)) = &self.cluster else {
            return true;
        };
        c.lease_valid()
            && forwarding_owner(&c.watch().borrow().cluster, &s.store_name) == Some(c.node_id())
    }

    /// Where re-keying of `s` resumes: the furthest of this node's own
    /// cursor and the one carried by the shard's change log.
    fn start_cursor(&self, s: &ForwardSource) -> anyhow::Result<u64> {
        let local = self.reader.cursor(&s.store_name)?;
        let carried = self
            .reader
            .stream_offset(&s.store_name, &cursor_stream(&self.topic))?
            .unwrap_or(0);
        Ok(local.max(carried))
    }

    /// Stores the cursor of `s` once the facts before it are acknowledged:
    /// here, and in a cluster in the shard's change log too.
    async fn store_cursor(&self, s: &ForwardSource, cursor: u64) -> anyhow::Result<()> {
        self.reader.set_cursor(&s.store_name, cursor)?;
        if let Some((_, log)) = &self.cluster {
            let record = LogRecord {
                view: s.store_name.clone(),
                // Not a source partition's record: no owner's epoch fences
                // it. A stale owner's lower cursor does not move it back
                // (stored offsets only rise).
                epoch: 0,
                partition: format!("{}/rekey", s.store_name),
                source_stream: cursor_stream(&self.topic),
                source_next_offset: cursor,
                fence: false,
                effects: Vec::new(),
            };
            log.append(s.view, &[record]).await?;
        }
        Ok(())
    }

    /// Publishes the facts of the changes after `cursor`; returns the new
    /// cursor once the broker has acknowledged them and it is stored.
    async fn forward(&self, s: &ForwardSource, cursor: u64) -> anyhow::Result<u64> {
        let changes = match self
            .reader
            .changes_after(&s.store_name, cursor, CHANGES_PER_ROUND)
        {
            Ok(c) => c,
            Err(ndc_operators::StoreError::Expired { retained_from, .. }) => {
                // Retention trimmed changes the stage has not re-keyed (it
                // was reset, or lagged that far): start again from the
                // source's current rows, then follow the stream after them.
                warn!(pipeline = %self.pipeline, shard = %s.store_name, cursor, retained_from,
                      "change stream trimmed past the re-keying cursor; re-keying the current rows");
                return self.forward_snapshot(s).await;
            }
            Err(e) => return Err(e.into()),
        };
        let Some(last) = changes.last().map(|c| c.seq) else {
            return Ok(cursor);
        };
        let mut deliveries = Vec::new();
        let mut facts = 0u64;
        for change in &changes {
            let origin = change.source.clone().unwrap_or_default();
            for fact in facts_of_change(
                &s.source,
                &s.column,
                &change.key_json,
                change.before_json.as_deref(),
                change.after_json.as_deref(),
                &origin,
            ) {
                deliveries.push(queue(
                    &self.producer,
                    &self.topic,
                    self.person_shards,
                    &fact,
                )?);
                facts += 1;
            }
        }
        for d in deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => anyhow::bail!("the broker refused a fact: {e}"),
                Err(_) => anyhow::bail!("the producer was dropped"),
            }
        }
        self.store_cursor(s, last).await?;
        metrics::counter!(metric::FACTS_FORWARDED, "pipeline" => self.pipeline.clone())
            .increment(facts);
        Ok(last)
    }

    /// Publishes a fact for every live row of the source, as of one
    /// consistent snapshot, and moves the cursor to that snapshot's seq.
    async fn forward_snapshot(&self, s: &ForwardSource) -> anyhow::Result<u64> {
        let reader = self.reader.clone();
        let producer = self.producer.clone();
        let shards = self.person_shards;
        let (view, source, column, topic) = (
            s.store_name.clone(),
            s.source.clone(),
            s.column.clone(),
            self.topic.clone(),
        );
        let (seq, facts) = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, u64)> {
            let mut facts = 0u64;
            let mut failure = None;
            let seq = reader.scan_snapshot(&view, None, 1000, |rows| {
                let mut deliveries = Vec::new();
                for row in rows {
                    let origin = ndc_proto::v1::SourcePosition {
                        ts_ms: row.version.source_ts_ms,
                        lsn: row.version.lsn,
                        stream: row.version.stream.clone(),
                        offset: row.version.offset,
                        log_position: row.version.position.clone(),
                        snapshot: if row.version.snapshot { "true" } else { "" }.into(),
                        ..Default::default()
                    };
                    for fact in facts_of_change(
                        &source,
                        &column,
                        &row.key,
                        None,
                        Some(&row.row_json),
                        &origin,
                    ) {
                        match queue(&producer, &topic, shards, &fact) {
                            Ok(d) => deliveries.push(d),
                            Err(e) => {
                                failure = Some(e);
                                return false;
                            }
                        }
                        facts += 1;
                    }
                }
                for d in futures::executor::block_on(futures::future::join_all(deliveries)) {
                    if !matches!(d, Ok(Ok(_))) {
                        failure = Some(anyhow::anyhow!("the broker refused a fact"));
                        return false;
                    }
                }
                true
            })?;
            match failure {
                Some(e) => Err(e),
                None => Ok((seq, facts)),
            }
        })
        .await??;
        self.store_cursor(s, seq).await?;
        metrics::counter!(metric::FACTS_FORWARDED, "pipeline" => self.pipeline.clone())
            .increment(facts);
        info!(pipeline = %self.pipeline, shard = %s.store_name, facts, seq, "re-keyed the current rows");
        Ok(seq)
    }
}

/// Queues one fact on the repartition topic, keyed by its national ID, on
/// the partition of the person's shard when the merge has several.
fn queue(
    producer: &FutureProducer,
    topic: &str,
    person_shards: u32,
    fact: &ndc_operators::merge::Fact,
) -> anyhow::Result<rdkafka::producer::DeliveryFuture> {
    let payload = fact.to_json();
    let mut record = FutureRecord::to(topic)
        .key(fact.national_id.as_bytes())
        .payload(&payload);
    if person_shards > 1 {
        let shard = ndc_operators::shard::of_national_id(&fact.national_id, person_shards);
        record = record.partition(i32::try_from(shard).unwrap_or(0));
    }
    producer
        .send_result(record)
        .map_err(|(e, _)| anyhow::anyhow!("cannot queue a fact: {e}"))
}
