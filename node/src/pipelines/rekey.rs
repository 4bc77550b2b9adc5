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

use crate::telemetry::metric;
use ndc_operators::StoreReader;
use ndc_operators::merge::facts_of_change;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Changes read per round from one source's change stream.
const CHANGES_PER_ROUND: usize = 2000;

/// One source of a pipeline whose rows refer to a person.
pub struct ForwardSource {
    /// Source name in the spec (the fact's `source`).
    pub source: String,
    /// Its view (the cursor is stored under this name).
    pub view: String,
    /// Column holding the national ID.
    pub column: String,
    pub commits: crate::views::CommitReceiver,
}

pub struct Forwarder {
    pub pipeline: String,
    pub topic: String,
    pub sources: Vec<ForwardSource>,
    pub reader: StoreReader,
    pub producer: FutureProducer,
    pub shutdown: CancellationToken,
    /// Cluster mode: every node holds every source view's change stream;
    /// only the leader (with a valid lease) re-keys it. After a leader
    /// change, the new leader resumes from its own cursor: facts it sends
    /// again are duplicates, which the merge recognises by their origin
    /// version and ignores.
    pub active_if_leader: Option<ndc_coordinator::Coordinator>,
}

impl Forwarder {
    pub async fn run(mut self) {
        if self.sources.is_empty() {
            return;
        }
        let mut cursors = Vec::new();
        for s in &self.sources {
            cursors.push(self.reader.cursor(&s.view).unwrap_or(0));
        }
        let mut failures = 0u32;
        loop {
            if let Some(c) = &self.active_if_leader
                && !(c.is_leader() && c.lease_valid())
            {
                tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                continue;
            }
            let mut progressed = false;
            for (i, s) in self.sources.iter().enumerate() {
                let committed = s.commits.borrow().seq;
                metrics::gauge!(metric::FORWARD_LAG, "view" => s.view.clone())
                    .set(committed.saturating_sub(cursors[i]) as f64);
                if committed <= cursors[i] {
                    continue;
                }
                match self.forward(s, cursors[i]).await {
                    Ok(next) => {
                        cursors[i] = next;
                        progressed = true;
                        failures = 0;
                    }
                    Err(e) => {
                        failures += 1;
                        metrics::counter!(metric::FORWARD_ERRORS, "pipeline" => self.pipeline.clone())
                            .increment(1);
                        if failures == 1 || failures.is_multiple_of(50) {
                            warn!(pipeline = %self.pipeline, view = %s.view, error = %e, failures,
                                  "cannot publish facts to the repartition topic; retrying");
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
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                (result, _, _) = changed => {
                    if result.is_err() {
                        // A view went away (pipeline dropped): stop with it.
                        break;
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        info!(pipeline = %self.pipeline, "re-keying stage stopped");
    }

    /// Publishes the facts of the changes after `cursor`; returns the new
    /// cursor once the broker has acknowledged them and it is stored.
    async fn forward(&self, s: &ForwardSource, cursor: u64) -> anyhow::Result<u64> {
        let changes = match self
            .reader
            .changes_after(&s.view, cursor, CHANGES_PER_ROUND)
        {
            Ok(c) => c,
            Err(ndc_operators::StoreError::Expired { retained_from, .. }) => {
                // Retention trimmed changes the stage has not re-keyed (it
                // was reset, or lagged that far): start again from the
                // source's current rows, then follow the stream after them.
                warn!(pipeline = %self.pipeline, view = %s.view, cursor, retained_from,
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
                deliveries.push(queue(&self.producer, &self.topic, &fact)?);
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
        self.reader.set_cursor(&s.view, last)?;
        metrics::counter!(metric::FACTS_FORWARDED, "pipeline" => self.pipeline.clone())
            .increment(facts);
        Ok(last)
    }

    /// Publishes a fact for every live row of the source, as of one
    /// consistent snapshot, and moves the cursor to that snapshot's seq.
    async fn forward_snapshot(&self, s: &ForwardSource) -> anyhow::Result<u64> {
        let reader = self.reader.clone();
        let producer = self.producer.clone();
        let (view, source, column, topic) = (
            s.view.clone(),
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
                        match queue(&producer, &topic, &fact) {
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
        self.reader.set_cursor(&s.view, seq)?;
        metrics::counter!(metric::FACTS_FORWARDED, "pipeline" => self.pipeline.clone())
            .increment(facts);
        info!(pipeline = %self.pipeline, view = %s.view, facts, seq, "re-keyed the current rows");
        Ok(seq)
    }
}

/// Queues one fact on the repartition topic, keyed by its national ID.
fn queue(
    producer: &FutureProducer,
    topic: &str,
    fact: &ndc_operators::merge::Fact,
) -> anyhow::Result<rdkafka::producer::DeliveryFuture> {
    let payload = fact.to_json();
    let record = FutureRecord::to(topic)
        .key(fact.national_id.as_bytes())
        .payload(&payload);
    producer
        .send_result(record)
        .map_err(|(e, _)| anyhow::anyhow!("cannot queue a fact: {e}"))
}
