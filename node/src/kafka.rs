//! What every Kafka client of a node shares: librdkafka settings from the
//! `kafka` section, internal topics, where a resumed partition starts, and
//! how a client error is labelled. Sources, the cluster's change log, the
//! re-keying stage and the audit trail all build on these.

use crate::config::{KafkaSection, StartFrom};
use rdkafka::{ClientConfig, Offset};
use std::time::Duration;
use tracing::info;

/// Creates internal topics (change logs, repartition topics) that do not
/// exist yet, kept forever: the state built from them must be rebuildable.
pub async fn create_topics(
    kafka: &KafkaSection,
    topics: &[String],
    partitions: i32,
    replication: i32,
    what: &str,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::error::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = client_config(kafka)
        .create()
        .context("cannot create a Kafka admin client")?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            NewTopic::new(t, partitions, TopicReplication::Fixed(replication))
                .set("retention.ms", "-1")
                .set("cleanup.policy", "delete")
        })
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .with_context(|| format!("cannot create the {what} topics"))?;
    for r in results {
        match r {
            Ok(t) => info!(topic = %t, "{what} topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => anyhow::bail!("cannot create {what} topic {t}: {e}"),
        }
    }
    Ok(())
}

/// Where to resume reading a partition whose next offset to apply is
/// `next`: there, or `kafka.resume_rewind_records` before it.
///
/// A Kafka broker answers a fetch from offset `n` with the record batch that
/// contains `n` (the client skips the records before it). tansu 0.6.0, the
/// test broker, answers with the first batch that *starts* at or after `n`:
/// resuming in the middle of a batch silently skipped the rest of it (seen
/// as a node missing one row of the cluster's change log after a restart;
/// `node/tests/broker_fetch.rs`). Rewinding by more than a batch lands at or
/// before the batch's start; the records already applied are recognised by
/// their offsets and skipped by the state writer. On Kafka the rewind is 0
/// and costs nothing.
pub fn resume_offset(kafka: &KafkaSection, next: u64) -> Offset {
    let from = next.saturating_sub(kafka.resume_rewind_records);
    Offset::Offset(i64::try_from(from).unwrap_or(i64::MAX))
}

/// The cause of a librdkafka client error, from its reason, as a metric
/// label: `tls` (handshake, certificate), `authentication` (SASL), else
/// `broker` (connection refused, timed out, ...).
pub fn broker_error_kind(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("ssl") || r.contains("certificate") || r.contains("tls") {
        "tls"
    } else if r.contains("sasl") || r.contains("authenticat") {
        "authentication"
    } else {
        "broker"
    }
}

/// librdkafka settings shared by the node's consumer and producers.
pub fn client_config(k: &KafkaSection) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers)
        .set("client.id", &k.client_id)
        .set("socket.keepalive.enable", "true");
    for (key, value) in &k.properties {
        c.set(key, value);
    }
    for (key, value) in &k.resolved_secrets {
        c.set(key, value.expose());
    }
    c
}

/// librdkafka settings of a consumer that the node assigns partitions to
/// itself (offsets live with the state; commits to Kafka are advisory).
pub fn consumer_config(k: &KafkaSection, group_id: &str, reset: StartFrom) -> ClientConfig {
    let mut cc = client_config(k);
    cc.set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set(
            "auto.offset.reset",
            match reset {
                StartFrom::Earliest => "earliest",
                StartFrom::Latest => "latest",
            },
        );
    // Defaults for low latency, unless the configuration says otherwise:
    // a broker that holds fetches for the full wait (librdkafka's default
    // 500 ms) would otherwise add that to every change.
    for (key, value) in [("fetch.wait.max.ms", "5")] {
        if !k.properties.contains_key(key) {
            cc.set(key, value);
        }
    }
    cc
}

/// Reads of a partition written by one producer without transactions,
/// whose offsets therefore have no gaps (a change log, the audit topic):
/// each record is taken once, in order, and a gap — records a broker
/// skipped (tansu 0.6.0 does when a fetch starts inside a record batch) — is
/// read again from before it, a few times, before it is accepted as real.
#[derive(Debug, Clone)]
pub struct Gapless {
    next: u64,
    retries: u32,
    /// Whether the first record may come after `next` (a read from the
    /// topic's start, whose first records may be gone).
    open_start: bool,
    started: bool,
}

/// What to do with a record read from a [`Gapless`] partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Taken already (read again after a seek or a rewind): skip it.
    Skip,
    /// Records before it are missing: seek back to read from `next` (with
    /// [`resume_offset`]), and skip this one.
    SeekBack { next: u64 },
    /// Take it; `missing` names where a gap that persisted began.
    Take { missing: Option<u64> },
}

/// Reads again from before a gap this many times before accepting it.
const GAP_RETRIES: u32 = 5;

impl Gapless {
    /// Expects `next` first; with `open_start`, whatever comes first.
    pub fn new(next: u64, open_start: bool) -> Gapless {
        Gapless {
            next,
            retries: 0,
            open_start,
            started: false,
        }
    }

    /// The next offset expected.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// What to do with the record at `offset`. A taken record counts as
    /// read once [`Gapless::taken`] says so.
    pub fn step(&mut self, offset: u64) -> Step {
        if offset < self.next {
            return Step::Skip;
        }
        let mut missing = None;
        if offset > self.next && (self.started || !self.open_start) {
            if self.retries < GAP_RETRIES {
                self.retries += 1;
                return Step::SeekBack { next: self.next };
            }
            missing = Some(self.next);
        }
        Step::Take { missing }
    }

    /// The record at `offset` was handled: the next one is expected.
    pub fn taken(&mut self, offset: u64) {
        self.next = offset + 1;
        self.retries = 0;
        self.started = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gapless_partition_is_taken_once_in_order_and_a_gap_is_read_again() {
        let mut g = Gapless::new(3, false);
        assert_eq!(g.step(1), Step::Skip, "before the start");
        assert_eq!(g.step(3), Step::Take { missing: None });
        g.taken(3);
        assert_eq!(g.step(3), Step::Skip, "read again after a rewind");
        // 4 and 5 skipped by the broker: read again from 4, a few times.
        for _ in 0..GAP_RETRIES {
            assert_eq!(g.step(6), Step::SeekBack { next: 4 });
        }
        // Then the gap is accepted (and named).
        assert_eq!(g.step(6), Step::Take { missing: Some(4) });
        g.taken(6);
        assert_eq!(g.next(), 7);
        // A retry that fills the gap resets the count.
        assert_eq!(g.step(9), Step::SeekBack { next: 7 });
        assert_eq!(g.step(7), Step::Take { missing: None });
    }

    #[test]
    fn a_read_from_the_start_takes_whatever_comes_first() {
        let mut g = Gapless::new(0, true);
        assert_eq!(g.step(40), Step::Take { missing: None });
        g.taken(40);
        assert_eq!(g.step(42), Step::SeekBack { next: 41 });
    }
}
