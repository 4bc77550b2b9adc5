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

/// A broker with the topic, a directory, and a node's configuration with
/// the view in `SHARDS` shards.
async fn sharded_view() -> (Broker, tempfile::TempDir, ndc_node::config::NodeConfig) {
    let broker = Broker::start();
    broker.create_topic(TOPIC, PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = node_config(
        &dir.path().join("node"),
        &broker.bootstrap,
        &[("citizens", TOPIC, &["person_id"])],
    );
    config.views[0].shards = SHARDS;
    (broker, dir, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_view_is_fanned_in_and_resumed_by_a_vector_token() {
    let (broker, dir, mut config) = sharded_view().await;
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
    // The producer placed keys with librdkafka's default partitioner
    // (CRC32), not Kafka's: keyed reads read every shard.
    assert!(!info.keyed_reads_routed);
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

/// `ndc_view_keys_routed{view="citizens"}` on the node at `http`.
async fn keys_routed(http: std::net::SocketAddr) -> Option<f64> {
    metric_value(&metrics_text(http).await, |l| {
        l.starts_with("ndc_view_keys_routed{") && l.contains("view=\"citizens\"")
    })
}

/// Where the first completed snapshot's token stands in each shard.
fn snapshot_positions(lines: &[Value]) -> Option<Vec<u64>> {
    let line = lines
        .iter()
        .find(|l| l.get("snapshot_complete").is_some())?;
    let (_, positions) = ndc_node::security::token::peek(line["resume_token"].as_str()?)?;
    Some(positions.shards.iter().map(|p| p.seq).collect())
}

/// A feed keyed by canonical JSON and placed by Kafka's default partitioner
/// (murmur2 — what Kafka Connect, and so Debezium, uses; here librdkafka's
/// own, so the producer, not ndc, decides each key's partition): a keyed
/// read goes to the key's shard alone. One record sent to another
/// partition ends that — the keyed stream ends with a retryable error, its
/// client resumes with its token over every shard and gets that record —
/// and keyed reads from then on read every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_read_goes_to_its_keys_shard_while_the_feed_shows_kafkas_partitioner() {
    let (broker, dir, config) = sharded_view().await;
    let mut node = NodeProcess::start_new(bin(), config, dir.path(), "node").unwrap();
    node.wait_ready(Duration::from_secs(60)).await.unwrap();
    let (grpc, http) = (node.grpc(), node.http());

    let producer = kafka_partitioned_producer(&broker);
    let mut feed = feed::Citizens::default();
    let partition_of = feed
        .publish_partitioned(&producer, TOPIC, 60, PARTITIONS)
        .await;
    eventually_async(
        "the view's keys routed to their shards",
        Duration::from_secs(30),
        || async { (keys_routed(http).await == Some(1.0)).then_some(()) },
    )
    .await;

    assert!(view_info(grpc).await.keyed_reads_routed);

    // A keyed subscriber (resuming by token when its stream breaks): its
    // snapshot reads only the key's shard; the others stand at 0.
    let key = feed::Citizens::default().change(0, false, false).key;
    let shard = partition_of[&key] as u32 % SHARDS;
    let (seen, subscriber) = follow_keys(grpc.to_string(), "citizens", std::slice::from_ref(&key));
    let positions = eventually_async("the keyed snapshot", Duration::from_secs(30), || async {
        snapshot_positions(&seen.lock().unwrap())
    })
    .await;
    for (i, seq) in positions.iter().enumerate() {
        if i as u32 == shard {
            assert!(*seq > 0, "the key's shard {i} was read: {positions:?}");
        } else {
            assert_eq!(*seq, 0, "shard {i} holds no row of {key}: {positions:?}");
        }
    }
    let routed = |text: &str| {
        metric_value(text, |l| {
            l.starts_with("ndc_subscription_keyed_reads_total{") && l.contains("shards=\"routed\"")
        })
    };
    assert!(routed(&metrics_text(http).await).is_some_and(|n| n >= 1.0));
    let row_seen = |want: Value| {
        let seen = seen.clone();
        let key = key.clone();
        move || fold(&seen.lock().unwrap()).get(&key) == Some(&want)
    };

    // An update where the partitioner puts it: delivered as ever.
    let change = feed.change(0, false, false);
    let value = change.events[0].value.clone().unwrap();
    publish_keyed(&producer, TOPIC, &key, &value, None).await;
    eventually(
        "the update in the key's partition",
        Duration::from_secs(30),
        row_seen(change.row.clone().unwrap()),
    )
    .await;

    // The shards it does not read move up in its token to where their
    // records are known to be in place (so that once the route is
    // withdrawn, a resume reads them from there, not from their start).
    eventually(
        "the unread shards' positions moved up",
        Duration::from_secs(30),
        || last_positions(&seen.lock().unwrap()).is_some_and(|p| p.iter().all(|&s| s > 0)),
    )
    .await;

    // The next one sent to another partition, as a producer with another
    // partitioner would: the view is no longer routed, and the keyed
    // subscriber, resumed over every shard, gets it.
    let change = feed.change(0, false, false);
    let value = change.events[0].value.clone().unwrap();
    let elsewhere = (partition_of[&key] + 1) % PARTITIONS;
    publish_keyed(&producer, TOPIC, &key, &value, Some(elsewhere)).await;
    eventually_async(
        "the view's keys no longer routed",
        Duration::from_secs(30),
        || async { (keys_routed(http).await == Some(0.0)).then_some(()) },
    )
    .await;
    eventually(
        "the update from another partition",
        Duration::from_secs(30),
        row_seen(change.row.clone().unwrap()),
    )
    .await;
    subscriber.abort();
    let lines = seen.lock().unwrap().clone();
    let mut delivered = std::collections::BTreeSet::new();
    for c in ndc_testkit::changes(&lines) {
        assert!(
            delivered.insert((c["shard"].as_u64(), c["seq"].as_u64())),
            "delivered twice: {c}"
        );
    }
    let ended = metric_value(&metrics_text(http).await, |l| {
        l.starts_with("ndc_subscription_errors_total{") && l.contains("Unavailable")
    });
    assert!(
        ended.is_some_and(|n| n >= 1.0),
        "the routed stream was ended: {ended:?}"
    );
    // The node says so (a WARN: keyed reads changed), and the shard's owner
    // says why, naming the partition, never the key (a person).
    let log = std::fs::read_to_string(node.log_path()).unwrap();
    let plain = |line: &str| {
        let mut out = String::new();
        let mut in_escape = false;
        for c in line.chars() {
            match (in_escape, c) {
                (false, '\u{1b}') => in_escape = true,
                (true, 'm') => in_escape = false,
                (false, c) => out.push(c),
                _ => {}
            }
        }
        out
    };
    let warning = log
        .lines()
        .map(plain)
        .find(|l| l.contains("WARN") && l.contains("no longer known to sit in their shards"))
        .expect("a warning that keyed reads now read every shard");
    assert!(warning.contains("view=citizens"), "{warning}");
    let why = log
        .lines()
        .map(plain)
        .find(|l| l.contains("not in the partition Kafka's default partitioner gives"))
        .expect("the owner's account of the record out of place");
    let person = serde_json::from_str::<Value>(&key).unwrap()["person_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.contains(&format!("partition={elsewhere}")) && !why.contains(&person),
        "{why}"
    );

    // From now on a keyed read reads every shard.
    assert!(!view_info(grpc).await.keyed_reads_routed);
    let lines = read_until(
        ndc_node::client::SubscribeOptions {
            keys: vec![key.clone()],
            progress: true,
            ..subscription(grpc, "citizens", From::Snapshot)
        },
        Duration::from_secs(30),
        |l| l.iter().any(|l| l.get("snapshot_complete").is_some()),
    )
    .await;
    let positions = snapshot_positions(&lines).expect("a snapshot");
    assert!(
        positions.iter().all(|&s| s > 0),
        "every shard read: {positions:?}"
    );
    // Its newest row is there. (So is the one before, in the key's first
    // shard: a key sent to two partitions lives in two shards — the limit
    // of splitting by partition, docs/cluster.md "Limits" — so the
    // snapshot is not folded here.)
    let key_value: Value = serde_json::from_str(&key).unwrap();
    assert!(
        changes(&lines)
            .iter()
            .any(|c| c["key"] == key_value && Some(&c["after"]) == change.row.as_ref()),
        "{lines:?}"
    );
}
