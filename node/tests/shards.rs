//! Sharded views on one node, with real processes and a real broker: a view
//! of a four-partition topic split into three shards. Each shard holds the
//! partitions `p mod 3` names, with its own change stream and sequence
//! numbers; a subscriber fans in every shard, gets a resume token that is a
//! vector of per-shard positions, and resumes by it — across a kill -9 too —
//! with no gap and no duplicate in any shard; two state writers share the
//! shards. A token of the release before
//! shards is refused with a clear message, and a node whose view's shard
//! count changed refuses to start rather than misread its state.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine;
use ndc_node::client::From;
use ndc_node::quickstart::synthetic::Rng;
use ndc_proto::v1::subscribe_request::Start;
use ndc_proto::v1::subscription_client::SubscriptionClient;
use ndc_proto::v1::{ListViewsRequest, ResumeToken, SubscribeRequest, ViewInfo};
use ndc_testkit::*;
use prost::Message as _;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const TOPIC: &str = "population.public.citizens";
const PARTITIONS: i32 = 4;
const SHARDS: u32 = 3;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ndc"))
}

async fn view_info(addr: std::net::SocketAddr) -> ViewInfo {
    let mut c = SubscriptionClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    c.list_views(ListViewsRequest {})
        .await
        .unwrap()
        .into_inner()
        .views
        .into_iter()
        .find(|v| v.name == "citizens")
        .expect("view listed")
}

/// The partition a change came from, by its source stream
/// (`kafka:<topic>:<partition>`).
fn partition_of(line: &Value) -> u32 {
    line["source"]["stream"]
        .as_str()
        .and_then(|s| s.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("a Kafka stream")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_view_is_fanned_in_and_resumed_by_a_vector_token() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = node_config(
        &dir.path().join("node"),
        &broker.bootstrap,
        &[("citizens", TOPIC, &["person_id"])],
    );
    config.views[0].shards = SHARDS;
    config.pipeline.max_batch_records = 100;
    // Two state writers: shards 0 and 2 on the first, 1 on the second.
    config.pipeline.writers = 2;
    let mut node = NodeProcess::start_new(bin(), config.clone(), dir.path(), "node").unwrap();
    node.wait_ready(Duration::from_secs(60)).await.unwrap();
    let grpc = node.grpc();

    // A subscriber from the (empty) snapshot that resumes with its last
    // token whenever its connection breaks.
    let (seen, subscriber) = follow(grpc.to_string(), "citizens");

    // Inserts, updates and deletes of 240 people, keyed: the producer puts
    // each person in one partition, hence in one shard.
    let producer = broker.producer();
    let mut feed = feed::Citizens::default();
    let mut rng = Rng::new(7);
    let total = 2400;
    let mut late = None;
    for n in 0..total {
        if n == total / 3 {
            // A second subscriber, from a snapshot taken while changes flow
            // (complete before the crash below, so that it is one snapshot).
            let (late_seen, task) = follow(grpc.to_string(), "citizens");
            eventually(
                "the late subscriber's snapshot",
                Duration::from_secs(30),
                || {
                    late_seen
                        .lock()
                        .unwrap()
                        .iter()
                        .any(|l| l.get("snapshot_complete").is_some())
                },
            )
            .await;
            late = Some((late_seen, task));
        }
        if n == total / 2 {
            // A crash half-way: the subscriber resumes on the restarted
            // node with its vector token.
            node.kill9();
            node.start().unwrap();
        }
        let i = rng.below(240);
        for e in feed.change(i, rng.below(10) == 0, false).events {
            publish(&producer, TOPIC, Some(&e.key), e.value.as_deref()).await;
        }
    }
    let expected = feed.expected;

    // The subscriber reaches the view's last commit in every shard.
    eventually_async(
        "the subscriber at every shard's last commit",
        Duration::from_secs(120),
        || async {
            let (committed, _) = view_state(grpc, "citizens").await?;
            let lines = seen.lock().unwrap().clone();
            (fold(&lines) == expected && last_seq(&lines) == committed).then_some(())
        },
    )
    .await;
    subscriber.abort();
    let lines = seen.lock().unwrap().clone();

    // The late subscriber: every shard's rows first, then one token, then
    // changes — none of any shard before the snapshot is complete — and
    // the same view in the end, gapless in every shard.
    let (late_seen, late_task) = late.expect("started");
    eventually_async(
        "the late subscriber at every shard's last commit",
        Duration::from_secs(60),
        || async {
            let (committed, _) = view_state(grpc, "citizens").await?;
            (last_seq(&late_seen.lock().unwrap()) == committed).then_some(())
        },
    )
    .await;
    late_task.abort();
    let late_lines = late_seen.lock().unwrap().clone();
    let complete = late_lines
        .iter()
        .position(|l| l.get("snapshot_complete").is_some())
        .expect("the late snapshot completed");
    assert!(
        late_lines[..complete].iter().all(|l| l["op"] == "read"),
        "only snapshot rows before the snapshot is complete"
    );
    assert!(
        late_lines[..complete].len() > 10,
        "the late snapshot held rows: {}",
        complete
    );
    seqs_after_snapshot(&late_lines);
    assert_eq!(fold(&late_lines), expected);
    // Gapless and duplicate-free in each shard, across the crash.
    let delivered = seqs_after_snapshot(&lines);
    assert!(delivered.len() >= total / 2, "{} changes", delivered.len());
    assert_eq!(fold(&lines), expected);

    // Each change is in the shard of its source partition, and every shard
    // has changes of its own.
    let changes = changes(&lines);
    for c in &changes {
        assert_eq!(
            c["shard"].as_u64().unwrap() as u32,
            partition_of(c) % SHARDS,
            "{c}"
        );
    }
    let info = view_info(grpc).await;
    assert_eq!(info.shards, SHARDS);
    assert_eq!(info.committed_seqs.len(), SHARDS as usize);
    assert!(
        info.committed_seqs.iter().all(|&s| s > 0),
        "every shard has its own change stream: {:?}",
        info.committed_seqs
    );
    assert_eq!(info.committed_seqs.iter().sum::<u64>(), info.committed_seq);
    assert_eq!(info.live_rows, expected.len() as u64);

    // Both writers of the pool committed their shards (counted since the
    // restart).
    let metrics = metrics_text(node.http()).await;
    for writer in ["0", "1"] {
        let commits = metric_value(&metrics, |l| {
            l.starts_with("ndc_writer_commits_total{")
                && l.contains(&format!("writer=\"{writer}\""))
        });
        assert!(
            commits.is_some_and(|n| n > 0.0),
            "writer {writer}: {commits:?}"
        );
    }

    // Resuming from any change's token (a vector of per-shard positions)
    // continues exactly after it: the same changes, shard by shard, as the
    // first subscriber saw after it.
    let middle = changes.len() / 2;
    let token = changes[middle]["resume_token"]
        .as_str()
        .expect("a change's own token")
        .to_string();
    let rest = read_until(
        subscription(grpc, "citizens", From::Token(token)),
        Duration::from_secs(60),
        |l| ndc_testkit::changes(l).len() >= changes.len() - middle - 1,
    )
    .await;
    let per_shard = |lines: &[&Value]| {
        let mut out: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for l in lines {
            out.entry(l["shard"].as_u64().unwrap())
                .or_default()
                .push(l["seq"].as_u64().unwrap());
        }
        out
    };
    assert_eq!(
        per_shard(&ndc_testkit::changes(&rest)),
        per_shard(&changes[middle + 1..]),
        "a resumed subscriber continues after its token in every shard"
    );

    // A token of the release before shards (one position) cannot say where
    // a sharded view's shards stand: refused, with what to do.
    let old = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
        ResumeToken {
            format: 1,
            view: "citizens".into(),
            incarnation: 1,
            seq: 1,
            shards: Vec::new(),
        }
        .encode_to_vec(),
    );
    let mut client = SubscriptionClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let refused = client
        .subscribe(SubscribeRequest {
            view: "citizens".into(),
            start: Some(Start::ResumeToken(old)),
            ..Default::default()
        })
        .await
        .expect_err("a one-position token of a sharded view");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("before views had shards")
            && refused.message().contains("start=snapshot"),
        "{}",
        refused.message()
    );

    // The shard count is fixed for the life of the view's state: a node
    // configured with another one refuses to start, and says why.
    node.terminate(Duration::from_secs(30)).unwrap();
    let mut resharded = config;
    resharded.views[0].shards = 2;
    let mut other = NodeProcess::start_new(bin(), resharded, dir.path(), "resharded").unwrap();
    let err = other
        .wait_started(Duration::from_secs(30))
        .expect_err("a changed shard count");
    assert!(
        err.to_string().contains(
            "configured with 2 shard(s) but its state in this data directory was written with 3"
        ),
        "{err}"
    );
}
