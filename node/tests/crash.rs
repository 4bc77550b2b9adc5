//! Crash safety with real processes: an `ndc node` process is killed with
//! SIGKILL again and again while change events stream in; a subscriber
//! resumes by token through every restart. In the end the subscriber's copy
//! equals what the feed says, it saw every sequence number exactly once, and
//! every bad record reached the dead-letter topic.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ndc_node::synthetic::{Feed, Rng, Table, citizen_row, national_id};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOPIC: &str = "population.public.citizens";
const DLQ: &str = "ndc.dead-letter";

struct NodeProcess {
    child: Child,
}

impl NodeProcess {
    fn start(config: &std::path::Path, log: &std::path::Path) -> NodeProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ndc"))
            .args(["node", "--config"])
            .arg(config)
            .env("RUST_LOG", "info,rdkafka=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        NodeProcess { child }
    }

    fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_any_point_loses_nothing_and_delivers_no_duplicate() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 3).await;
    broker.create_topic(DLQ, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let grpc_port = free_port();
    let mut config = node_config(
        &dir.path().join("node"),
        &broker.bootstrap,
        &[("citizens", TOPIC, &["person_id"])],
    );
    config.node.grpc_listen = format!("127.0.0.1:{grpc_port}").parse().unwrap();
    config.tls.insecure = true;
    config.storage.sync_commits = true;
    config.pipeline.max_batch_records = 200;
    let config_path = dir.path().join("ndc.yaml");
    std::fs::write(&config_path, config.to_yaml().unwrap()).unwrap();
    let log = dir.path().join("node.log");

    let mut node = Some(NodeProcess::start(&config_path, &log));

    // A subscriber that keeps resuming with its last token.
    let (seen, subscriber) = follow(format!("127.0.0.1:{grpc_port}"), "citizens");

    // The feed: inserts, updates, deletes with tombstones, some bad records.
    let producer = broker.producer();
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    let mut rng = Rng::new(42);
    let people = 300u64;
    let mut revision: BTreeMap<u64, u32> = BTreeMap::new();
    let mut expected: BTreeMap<String, Value> = BTreeMap::new();
    let mut bad_records = 0usize;
    // `./dev.sh soak` (NDC_SOAK=1): ten times the records and kills.
    let soak = std::env::var("NDC_SOAK").is_ok();
    let total = if soak { 40_000 } else { 4000 };
    let kills_at: Vec<usize> = (1..=if soak { 40 } else { 4 })
        .map(|k| k * total / (if soak { 41 } else { 5 }) + 13 * k)
        .collect();
    let started = Instant::now();
    for n in 0..total {
        if kills_at.contains(&n) {
            // Kill at an arbitrary point, restart at once (records keep coming).
            node.take().unwrap().kill9();
            node = Some(NodeProcess::start(&config_path, &log));
        }
        let i = rng.below(people);
        let roll = rng.below(100);
        let key = json!({"person_id": national_id(i).to_string()}).to_string();
        if roll < 2 {
            publish(
                &producer,
                TOPIC,
                Some(key.as_bytes()),
                Some(b"{\"op\":\"c\",\"after\":"),
            )
            .await;
            bad_records += 1;
        } else if roll < 12 && revision.contains_key(&i) {
            let e = feed.event('d', i, revision[&i], None);
            publish(&producer, TOPIC, Some(&e.key), e.value.as_deref()).await;
            publish(&producer, TOPIC, Some(&e.key), None).await;
            revision.remove(&i);
            expected.remove(&key);
        } else {
            let (op, rev) = match revision.get(&i) {
                Some(r) => ('u', r + 1),
                None => ('c', 0),
            };
            let e = feed.event(op, i, rev, None);
            publish(&producer, TOPIC, Some(&e.key), e.value.as_deref()).await;
            revision.insert(i, rev);
            expected.insert(key, citizen_row(i, rev));
        }
        if n % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!("published {total} records in {:?}", started.elapsed());

    // Wait for the subscriber's copy to converge.
    let deadline = Instant::now() + Duration::from_secs(if soak { 600 } else { 90 });
    loop {
        let lines = seen.lock().unwrap().clone();
        if fold(&lines) == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "subscriber did not converge; node log:\n{}",
            tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A moment more, so that a late duplicate would show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    subscriber.abort();
    let lines = seen.lock().unwrap().clone();

    seqs_after_snapshot(&lines);
    assert_eq!(fold(&lines), expected);

    // Every bad record reached the dead-letter topic (at least once).
    let letters = broker.read_all(DLQ, bad_records, Duration::from_secs(30));
    let offsets: BTreeSet<(String, String)> = letters
        .iter()
        .map(|m| {
            (
                header(m, "ndc-source-partition").unwrap().to_string(),
                header(m, "ndc-source-offset").unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        offsets.len(),
        bad_records,
        "dead letters by source position"
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        log_text.matches("node started").count(),
        kills_at.len() + 1,
        "{}",
        tail(&log)
    );
    drop(node);
}

fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
