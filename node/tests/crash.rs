//! Crash safety with real processes: an `ndc node` process is killed with
//! SIGKILL again and again while change events stream in; a subscriber
//! resumes by token through every restart. In the end the subscriber's copy
//! equals what the feed says, it saw every sequence number exactly once, and
//! every bad record reached the dead-letter topic.

#![allow(clippy::unwrap_used)]

use ndc_node::quickstart::synthetic::{Rng, national_id};
use ndc_testkit::*;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const TOPIC: &str = "population.public.citizens";
const DLQ: &str = "ndc.dead-letter";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_any_point_loses_nothing_and_delivers_no_duplicate() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 3).await;
    broker.create_topic(DLQ, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = node_config(
        &dir.path().join("node"),
        &broker.bootstrap,
        &[("citizens", TOPIC, &["person_id"])],
    );
    config.tls.insecure = true;
    config.storage.sync_commits = true;
    config.pipeline.max_batch_records = 200;
    // Its ports stay bound across kills: the subscriber's connections wait
    // in the backlog while the node is down.
    let mut node = NodeProcess::start_new(
        std::path::Path::new(env!("CARGO_BIN_EXE_ndc")),
        config,
        dir.path(),
        "node",
    )
    .unwrap();
    let grpc = node.grpc();

    // A subscriber that keeps resuming with its last token.
    let (seen, subscriber) = follow(grpc.to_string(), "citizens");

    // The feed: inserts, updates, deletes with tombstones, some bad records.
    let producer = broker.producer();
    let mut feed = feed::Citizens::default();
    let mut rng = Rng::new(42);
    let people = 300u64;
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
            node.kill9();
            node.start().unwrap();
        }
        let i = rng.below(people);
        let roll = rng.below(100);
        if roll < 2 {
            let key = json!({"person_id": national_id(i).to_string()}).to_string();
            publish(
                &producer,
                TOPIC,
                Some(key.as_bytes()),
                Some(b"{\"op\":\"c\",\"after\":"),
            )
            .await;
            bad_records += 1;
        } else {
            for e in feed.change(i, roll < 12, true).events {
                publish(&producer, TOPIC, Some(&e.key), e.value.as_deref()).await;
            }
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
        if fold(&lines) == feed.expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "subscriber did not converge; node log:\n{}",
            node.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Until the subscriber has seen the view's last committed change: a
    // duplicate delivered after a resume would have come before it.
    eventually_async(
        "the subscriber at the view's last commit",
        Duration::from_secs(60),
        || async {
            let (committed, _) = view_state(grpc, "citizens").await?;
            (last_seq(&seen.lock().unwrap()) == committed).then_some(())
        },
    )
    .await;
    subscriber.abort();
    let lines = seen.lock().unwrap().clone();

    seqs_after_snapshot(&lines);
    assert_eq!(fold(&lines), feed.expected);

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
    let log_text = std::fs::read_to_string(node.log_path()).unwrap();
    assert_eq!(
        log_text.matches("node started").count(),
        kills_at.len() + 1,
        "{}",
        node.log_tail(40)
    );
    drop(node);
}
