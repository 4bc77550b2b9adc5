//! What the node assumes of the broker when it reads a partition.
//!
//! Resuming a partition in the middle of a record batch: a node resumes a
//! source topic or a change log from the offset stored with its state, which
//! may fall inside a batch its producer wrote. tansu 0.6.0 (the test broker)
//! answers a fetch from such an offset with the next batch only, skipping
//! the rest of the current one; `kafka::resume_offset` with
//! `kafka.resume_rewind_records` (as the tests set it) reads from far
//! enough before it that no broker skips anything (the records before the
//! stored offset are recognised as applied and skipped by the state writer).

#![allow(clippy::unwrap_used)]

use ndc_node::config::KafkaSection;
use ndc_node::kafka::resume_offset;
use ndc_testkit::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// A consumer group of its own for each probe.
fn probe_group() -> String {
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("probe-{}-{n}", std::process::id())
}

/// The offsets read from `topic` partition 0 starting at `from`, until
/// `last` is read or a few seconds pass.
fn offsets_from(broker: &Broker, topic: &str, from: Offset, last: i64) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", probe_group())
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, from).unwrap();
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::new();
    while out.last() != Some(&last) && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(m.offset());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_inside_a_record_batch_reads_the_rest_of_the_batch() {
    let broker = Broker::start();
    broker.create_topic("batched", 1).await;
    let producer = broker.producer();
    // Sent together: one record batch (the producer lingers), then one more.
    let payloads: Vec<String> = (0..20).map(|i| format!("record {i}")).collect();
    let sends = payloads.iter().map(|p| {
        producer.send(
            FutureRecord::<(), _>::to("batched").partition(0).payload(p),
            Duration::from_secs(10),
        )
    });
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }
    producer
        .send(
            FutureRecord::<(), _>::to("batched")
                .partition(0)
                .payload("record 20"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // What the broker does with a plain fetch from offset 7: the reason for
    // the rewind. (If a later tansu fixes this, the rewind is merely
    // harmless; this line then documents that the workaround can go.)
    let plain = offsets_from(&broker, "batched", Offset::Offset(7), 20);
    eprintln!("fetch from offset 7 returns offsets {plain:?}");
    let rewind = KafkaSection {
        resume_rewind_records: TANSU_RESUME_REWIND,
        ..KafkaSection::default()
    };
    for next in [0u64, 1, 7, 19, 20] {
        let read = offsets_from(&broker, "batched", resume_offset(&rewind, next), 20);
        let wanted: Vec<i64> = (next as i64..=20).collect();
        let from_next: Vec<i64> = read.into_iter().filter(|o| *o >= next as i64).collect();
        assert_eq!(from_next, wanted, "resuming at {next}");
    }
}

/// Reading a long history with small fetch responses (as a node catching up
/// a change log does): the offsets read must be contiguous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_history_in_small_fetches_skips_nothing() {
    let broker = Broker::start();
    broker.create_topic("history", 1).await;
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let payload = vec![b'x'; 3000];
    let total = 3000i64;
    for _ in 0..(total / 300) {
        let sends = (0..300).map(|_| {
            producer.send(
                FutureRecord::<(), _>::to("history")
                    .partition(0)
                    .payload(&payload),
                Duration::from_secs(10),
            )
        });
        for r in futures::future::join_all(sends).await {
            r.unwrap();
        }
    }
    for max in ["65536", "1048576"] {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &broker.bootstrap)
            .set("group.id", probe_group())
            .set("enable.auto.commit", "false")
            .set("fetch.max.bytes", max)
            .set("message.max.bytes", "65536")
            .set("max.partition.fetch.bytes", max)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("history", 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut read = Vec::new();
        while read.last() != Some(&(total - 1)) && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                read.push(m.offset());
            }
        }
        let gaps: Vec<(i64, i64)> = read
            .windows(2)
            .filter(|w| w[1] != w[0] + 1)
            .map(|w| (w[0], w[1]))
            .take(10)
            .collect();
        assert!(
            gaps.is_empty(),
            "fetches of at most {max} bytes: gaps {gaps:?}"
        );
        assert_eq!(read.len() as i64, total, "fetches of at most {max} bytes");
    }
}
