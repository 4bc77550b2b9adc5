//! One node against a real Kafka-protocol broker (tansu) on loopback.

#![allow(clippy::unwrap_used)]

use ndc_node::client::From;
use ndc_node::quickstart::synthetic::{Feed, Table, citizen_row, national_id};
use ndc_testkit::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

const CITIZENS: &str = "population.public.citizens";
const DLQ: &str = "ndc.dead-letter";
const T: Duration = Duration::from_secs(30);

fn citizen_key(i: u64) -> String {
    json!({"person_id": national_id(i).to_string()}).to_string()
}

async fn broker_with_topics(partitions: i32) -> Broker {
    let broker = Broker::start();
    broker.create_topic(CITIZENS, partitions).await;
    broker.create_topic(DLQ, 1).await;
    broker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicates_a_feed_and_serves_snapshot_then_every_change() {
    let broker = broker_with_topics(3).await;
    let producer = broker.producer();
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    for i in 0..40 {
        publish_event(&producer, CITIZENS, &feed.event('r', i, 0, None)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = ndc_node::start(node_config(
        dir.path(),
        &broker.bootstrap,
        &[("replicates", CITIZENS, &["person_id"])],
    ))
    .await
    .unwrap();

    // Wait until the snapshot is applied, then subscribe from a snapshot.
    let addr = node.addrs.grpc;
    wait_rows(addr, "replicates", 40).await;
    let lines = collect(addr, "replicates", From::Snapshot, T, |l| {
        l.iter().any(|x| x.get("snapshot_complete").is_some())
    })
    .await;
    let snapshot = changes(&lines);
    assert_eq!(snapshot.len(), 40, "snapshot rows");
    assert!(
        snapshot
            .iter()
            .all(|c| c["op"] == "read" && c["resume_token"].is_null())
    );
    let token = lines
        .iter()
        .find_map(|l| {
            l.get("snapshot_complete")
                .map(|_| l["resume_token"].clone())
        })
        .unwrap();
    let token = token.as_str().unwrap().to_string();

    // Changes after the snapshot: updates, a delete with its tombstone, an insert.
    publish_event(&producer, CITIZENS, &feed.event('u', 3, 1, None)).await;
    publish_event(&producer, CITIZENS, &feed.event('d', 5, 0, None)).await;
    let t = feed.tombstone(5);
    publish(&producer, CITIZENS, Some(&t.key), None).await;
    publish_event(&producer, CITIZENS, &feed.event('c', 100, 0, None)).await;

    let follow = collect(addr, "replicates", From::Token(token), T, |l| {
        changes(l).len() >= 3
    })
    .await;
    let follow = changes(&follow);
    assert_eq!(follow.len(), 3, "{follow:#?}");
    let by_op: BTreeMap<&str, &Value> = follow
        .iter()
        .map(|c| (c["op"].as_str().unwrap(), *c))
        .collect();
    let update = by_op["update"];
    assert_eq!(update["key"].to_string(), citizen_key(3));
    assert_eq!(update["before"], citizen_row(3, 0));
    assert_eq!(update["after"], citizen_row(3, 1));
    assert_eq!(update["source"]["table"], "citizens");
    assert!(update["source"]["lsn"].as_u64().unwrap() > 24_000_000);
    let delete = by_op["delete"];
    assert_eq!(delete["before"], citizen_row(5, 0));
    assert!(delete["after"].is_null());
    assert_eq!(by_op["insert"]["after"], citizen_row(100, 0));
    // Sequence numbers continue the snapshot's position without a gap.
    let mut seqs: Vec<u64> = follow.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    seqs.sort();
    assert_eq!(seqs, vec![41, 42, 43]);

    // The replica equals what the feed says.
    let mut expected: BTreeMap<String, Value> = (0..40)
        .map(|i| (citizen_key(i), citizen_row(i, 0)))
        .collect();
    expected.insert(citizen_key(3), citizen_row(3, 1));
    expected.remove(&citizen_key(5));
    expected.insert(citizen_key(100), citizen_row(100, 0));
    let snap = collect(addr, "replicates", From::Snapshot, T, |l| {
        l.iter().any(|x| x.get("snapshot_complete").is_some())
    })
    .await;
    assert_eq!(fold(&snap), expected);

    let text = metrics_text(node.addrs.http).await;
    assert!(
        text.contains("ndc_source_records_total{view=\"replicates\",connector=\"postgresql\",outcome=\"inserted\"} 41"),
        "{text}"
    );
    assert!(
        text.contains(
            "ndc_source_records_total{view=\"replicates\",connector=\"none\",outcome=\"skipped\"} 1"
        ),
        "tombstone skipped"
    );
    assert!(
        !text.contains("ndc_replica_order_fallback_total{view=\"replicates\""),
        "a PostgreSQL feed is ordered by its LSNs alone: {text}"
    );
    // Every batch's durable write is timed apart from the commit around it
    // (recorded just before the commit's own sample).
    let count = |name: &str| {
        metric_value(&text, |l| l.starts_with(&format!("{name}_count "))).unwrap_or(0.0)
    };
    let commits = count("ndc_commit_duration_seconds");
    assert!(commits > 0.0, "{text}");
    assert!(
        count("ndc_state_write_duration_seconds") >= commits,
        "{text}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_go_to_the_dead_letter_topic_and_good_ones_flow() {
    let broker = broker_with_topics(1).await;
    let producer = broker.producer();
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    let good = |feed: &mut Feed, i| feed.event('c', i, 0, None);
    let mut big = feed.event('c', 9, 0, None);
    big.value = Some(format!("{{\"pad\":\"{}\"}}", "x".repeat(3000)).into_bytes());
    let bad: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "malformed_json",
            citizen_key(1).into_bytes(),
            b"{\"before\":null,\"after\":{\"person_id\":".to_vec(),
        ),
        ("unknown_op", citizen_key(2).into_bytes(), {
            let mut v: Value =
                serde_json::from_slice(good(&mut feed, 2).value.as_deref().unwrap()).unwrap();
            v["op"] = json!("x");
            v.to_string().into_bytes()
        }),
        ("wrong_type", citizen_key(3).into_bytes(), {
            let mut v: Value =
                serde_json::from_slice(good(&mut feed, 3).value.as_deref().unwrap()).unwrap();
            v["source"]["ts_ms"] = json!("yesterday");
            v.to_string().into_bytes()
        }),
        ("oversized", big.key.clone(), big.value.clone().unwrap()),
    ];
    // good, bad, good, bad ... so good records sit around every bad one.
    let mut good_ids = Vec::new();
    for (n, (_, key, value)) in bad.iter().enumerate() {
        let id = 100 + n as u64;
        let e = good(&mut feed, id);
        publish(&producer, CITIZENS, Some(&e.key), e.value.as_deref()).await;
        good_ids.push(id);
        publish(&producer, CITIZENS, Some(key), Some(value)).await;
    }
    let e = good(&mut feed, 200);
    publish(&producer, CITIZENS, Some(&e.key), e.value.as_deref()).await;
    good_ids.push(200);
    // A record with no key at all.
    let e = good(&mut feed, 201);
    publish(&producer, CITIZENS, None, e.value.as_deref()).await;

    let dir = tempfile::tempdir().unwrap();
    let mut config = node_config(
        dir.path(),
        &broker.bootstrap,
        &[("dead_letters", CITIZENS, &[])],
    );
    config.pipeline.max_record_bytes = ndc_node::config::ByteSize(2048);
    let node = ndc_node::start(config).await.unwrap();

    wait_rows(node.addrs.grpc, "dead_letters", good_ids.len() as u64).await;
    let snap = collect(node.addrs.grpc, "dead_letters", From::Snapshot, T, |l| {
        l.iter().any(|x| x.get("snapshot_complete").is_some())
    })
    .await;
    let expected: BTreeMap<String, Value> = good_ids
        .iter()
        .map(|i| (citizen_key(*i), citizen_row(*i, 0)))
        .collect();
    assert_eq!(
        fold(&snap),
        expected,
        "good records around the bad ones are applied"
    );

    let letters = broker.read_all(DLQ, 5, T);
    assert_eq!(letters.len(), 5, "four bad records and one without a key");
    let mut kinds: Vec<&str> = letters
        .iter()
        .map(|m| header(m, "ndc-error-kind").unwrap())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            "malformed_json",
            "missing_key",
            "oversized",
            "unknown_op",
            "wrong_type"
        ]
    );
    for m in &letters {
        assert_eq!(header(m, "ndc-source-topic"), Some(CITIZENS));
        assert_eq!(header(m, "ndc-source-partition"), Some("0"));
        assert_eq!(header(m, "ndc-view"), Some("dead_letters"));
        let offset: u64 = header(m, "ndc-source-offset").unwrap().parse().unwrap();
        let kind = header(m, "ndc-error-kind").unwrap();
        assert!(!header(m, "ndc-reason").unwrap().is_empty());
        if let Some((_, key, value)) = bad.iter().find(|(k, _, _)| *k == kind) {
            assert_eq!(
                rdkafka::Message::payload(m),
                Some(value.as_slice()),
                "original bytes kept for {kind}"
            );
            assert_eq!(rdkafka::Message::key(m), Some(key.as_slice()));
            assert_eq!(offset % 2, 1, "bad records sit at odd offsets");
        }
    }
    let wrong = letters
        .iter()
        .find(|m| header(m, "ndc-error-kind") == Some("wrong_type"))
        .unwrap();
    assert!(
        header(wrong, "ndc-reason")
            .unwrap()
            .contains("source.ts_ms")
    );

    let text = metrics_text(node.addrs.http).await;
    for kind in [
        "malformed_json",
        "unknown_op",
        "wrong_type",
        "oversized",
        "missing_key",
    ] {
        let line =
            format!("ndc_dead_letter_records_total{{view=\"dead_letters\",reason=\"{kind}\"}} 1");
        assert!(text.contains(&line), "missing {line}");
    }
    node.shutdown().await;
}

/// A record of megabytes, beyond what the dead-letter topic takes in one
/// record, is dead-lettered whole: in chunks whose values, joined in order,
/// are every byte of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_larger_than_the_dead_letter_topic_takes_is_kept_whole_in_chunks() {
    let broker = broker_with_topics(1).await;
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("message.max.bytes", "10485760")
        .create()
        .unwrap();
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    let before = feed.event('c', 1, 0, None);
    let after = feed.event('c', 2, 0, None);
    let key = citizen_key(9).into_bytes();
    // 2.5 MiB of varied bytes (no run a compressor would fold away).
    let value: Vec<u8> = (0..(5usize << 19))
        .map(|i| b'a' + ((i * 7 + i / 13) % 26) as u8)
        .collect();
    publish_event(&producer, CITIZENS, &before).await;
    publish(&producer, CITIZENS, Some(&key), Some(&value)).await;
    publish_event(&producer, CITIZENS, &after).await;

    let dir = tempfile::tempdir().unwrap();
    let config = node_config(
        dir.path(),
        &broker.bootstrap,
        &[("big", CITIZENS, &["person_id"])],
    );
    let node = ndc_node::start(config).await.unwrap();
    wait_rows(node.addrs.grpc, "big", 2).await;

    let first = broker.read_all(DLQ, 1, T);
    let chunk = header(&first[0], "ndc-chunk").expect("written in chunks");
    let n: usize = chunk.split_once('/').unwrap().1.parse().unwrap();
    assert!(n >= 3, "2.5 MiB in records of at most 1 MiB: {chunk}");
    let mut letters = broker.read_all(DLQ, n, T);
    assert_eq!(letters.len(), n);
    letters.sort_by_key(rdkafka::Message::offset);
    let mut joined = Vec::new();
    for (i, m) in letters.iter().enumerate() {
        assert_eq!(
            header(m, "ndc-chunk"),
            Some(format!("{}/{n}", i + 1).as_str())
        );
        assert_eq!(header(m, "ndc-error-kind"), Some("oversized"));
        assert_eq!(header(m, "ndc-source-offset"), Some("1"));
        assert_eq!(
            header(m, "ndc-original-size"),
            Some(value.len().to_string().as_str())
        );
        assert_eq!(rdkafka::Message::key(m), Some(key.as_slice()));
        joined.extend_from_slice(rdkafka::Message::payload(m).unwrap());
    }
    assert!(
        joined == value,
        "the chunks join to every byte of the record"
    );
    let text = metrics_text(node.addrs.http).await;
    assert!(
        text.contains("ndc_dead_letter_records_total{view=\"big\",reason=\"oversized\"} 1"),
        "one dead letter, however many records it took"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_tokens_continue_without_gap_or_duplicate_across_disconnects_and_restarts() {
    let broker = broker_with_topics(2).await;
    let producer = broker.producer();
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    for i in 0..30 {
        publish_event(&producer, CITIZENS, &feed.event('c', i, 0, None)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(
        dir.path(),
        &broker.bootstrap,
        &[("citizens", CITIZENS, &["person_id"])],
    );
    let node = ndc_node::start(config.clone()).await.unwrap();

    // Read the first 10 changes, then disconnect. The first token is of the
    // format written before views had shards (one position): a view of one
    // shard still resumes from it.
    let mut got: Vec<Value> = Vec::new();
    let latest_zero = {
        use base64::Engine as _;
        use prost::Message as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            ndc_proto::v1::ResumeToken {
                format: 1,
                view: "citizens".into(),
                incarnation: view_incarnation(node.addrs.grpc).await,
                seq: 0,
                shards: Vec::new(),
            }
            .encode_to_vec(),
        )
    };
    let part = collect(
        node.addrs.grpc,
        "citizens",
        From::Token(latest_zero),
        T,
        |l| changes(l).len() >= 10,
    )
    .await;
    got.extend(changes(&part).into_iter().take(10).cloned());
    let token = got.last().unwrap()["resume_token"]
        .as_str()
        .unwrap()
        .to_string();

    // Resume on the same node: changes 11..=30.
    let part = collect(node.addrs.grpc, "citizens", From::Token(token), T, |l| {
        changes(l).len() >= 10
    })
    .await;
    got.extend(changes(&part).into_iter().take(10).cloned());
    let token = got.last().unwrap()["resume_token"]
        .as_str()
        .unwrap()
        .to_string();

    // Restart the node; more changes arrive while it is down.
    node.shutdown().await;
    for i in 30..45 {
        publish_event(&producer, CITIZENS, &feed.event('c', i, 0, None)).await;
    }
    let node = ndc_node::start(config).await.unwrap();
    let part = collect(node.addrs.grpc, "citizens", From::Token(token), T, |l| {
        changes(l).len() >= 25
    })
    .await;
    got.extend(changes(&part).into_iter().cloned());
    let seqs: Vec<u64> = got.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=45).collect::<Vec<_>>(),
        "every change exactly once, in order"
    );
    let keys: std::collections::BTreeSet<String> =
        got.iter().map(|c| c["key"].to_string()).collect();
    assert_eq!(keys.len(), 45);

    // Nothing more: a progress message, not a duplicate.
    let token = got.last().unwrap()["resume_token"]
        .as_str()
        .unwrap()
        .to_string();
    let tail = collect(
        node.addrs.grpc,
        "citizens",
        From::Token(token),
        Duration::from_secs(3),
        |l| l.iter().any(|x| x.get("progress").is_some()),
    )
    .await;
    assert!(changes(&tail).is_empty(), "{tail:?}");
    assert_eq!(tail.last().unwrap()["progress"]["committed_seq"], 45);
    node.shutdown().await;
}

async fn view_incarnation(addr: std::net::SocketAddr) -> u64 {
    view_incarnation_of(addr, "citizens").await
}

async fn view_incarnation_of(addr: std::net::SocketAddr, view: &str) -> u64 {
    // A "latest" subscription's progress token carries the incarnation.
    let lines = collect(addr, view, From::Latest, T, |l| {
        l.iter().any(|x| x.get("progress").is_some())
    })
    .await;
    let token = lines.iter().find_map(|l| l.get("progress")).unwrap()["resume_token"]
        .as_str()
        .unwrap()
        .to_string();
    ndc_node::security::token::peek(&token).unwrap().1.shards[0].incarnation
}

/// A resume token of a view of one shard.
fn token_of(view: &str, incarnation: u64, seq: u64) -> String {
    ndc_node::security::token::encode(
        view,
        &[ndc_node::security::token::Position { incarnation, seq }],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses() {
    use ndc_proto::v1::SubscribeRequest;
    use ndc_proto::v1::subscribe_request::Start;
    use ndc_proto::v1::subscription_client::SubscriptionClient;
    let broker = broker_with_topics(1).await;
    let dir = tempfile::tempdir().unwrap();
    let node = ndc_node::start(node_config(
        dir.path(),
        &broker.bootstrap,
        &[("citizens", CITIZENS, &["person_id"])],
    ))
    .await
    .unwrap();
    let mut client = SubscriptionClient::connect(format!("http://{}", node.addrs.grpc))
        .await
        .unwrap();
    let req = |view: &str, start: Option<Start>, keys: Vec<String>| SubscribeRequest {
        view: view.into(),
        start,
        keys,
        fields: vec![],
        max_batch_size: 0,
    };
    let err = client
        .subscribe(req("nope", None, vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("\"nope\" does not exist") && !err.message().contains("citizens"),
        "names the view asked for, and no other: {}",
        err.message()
    );
    // Requests are bounded, and the refusal names the limit.
    let many: Vec<String> = (0..10_001)
        .map(|i| format!("{{\"person_id\":\"{i}\"}}"))
        .collect();
    let err = client
        .subscribe(req("citizens", None, many))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("subscriptions.max_keys") && err.message().contains("10001"),
        "{}",
        err.message()
    );
    let mut wide = req("citizens", None, vec![]);
    wide.fields = (0..300).map(|i| format!("c{i}")).collect();
    let err = client.subscribe(wide).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("subscriptions.max_fields"),
        "{}",
        err.message()
    );
    let mut huge = req("citizens", None, vec![]);
    huge.fields = vec!["x".repeat(5 << 20)];
    let err = client.subscribe(huge).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{}", err.message());
    assert!(
        err.message().contains("limit"),
        "names the limit: {}",
        err.message()
    );

    let err = client
        .subscribe(req(
            "citizens",
            Some(Start::ResumeToken("garbage!".into())),
            vec![],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("resume token"), "{}", err.message());

    let other = token_of("addresses", 1, 0);
    let err = client
        .subscribe(req("citizens", Some(Start::ResumeToken(other)), vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("belongs to view \"addresses\""),
        "{}",
        err.message()
    );

    let stale = token_of("citizens", 12345, 0);
    let err = client
        .subscribe(req("citizens", Some(Start::ResumeToken(stale)), vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    let err = client
        .subscribe(req("citizens", None, vec!["{not json".into()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = client
        .subscribe(req("citizens", None, vec!["{\"id\":1}".into()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("person_id"), "{}", err.message());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_and_field_filters() {
    let broker = broker_with_topics(2).await;
    let producer = broker.producer();
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    for i in 0..20 {
        publish_event(&producer, CITIZENS, &feed.event('c', i, 0, None)).await;
    }
    for rev in 1..=3 {
        publish_event(&producer, CITIZENS, &feed.event('u', 7, rev, None)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = ndc_node::start(node_config(
        dir.path(),
        &broker.bootstrap,
        &[("citizens", CITIZENS, &["person_id"])],
    ))
    .await
    .unwrap();
    let mut lines = Vec::new();
    let opts = ndc_node::client::SubscribeOptions {
        addr: node.addrs.grpc.to_string(),
        view: "citizens".into(),
        from: From::Token(token_of(
            "citizens",
            view_incarnation(node.addrs.grpc).await,
            0,
        )),
        keys: vec![citizen_key(7)],
        fields: vec!["person_id".into(), "marital_status".into()],
        limit: Some(4),
        progress: false,
        reconnect: false,
        tls: None,
        token: None,
    };
    tokio::time::timeout(
        T,
        ndc_node::client::subscribe(opts, |l| {
            lines.push(l);
            true
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(lines.len(), 4);
    let key7 = json!({"person_id": national_id(7).to_string()});
    assert!(lines.iter().all(|l| l["key"] == key7));
    assert_eq!(lines[0]["op"], "insert");
    for l in &lines {
        let after = l["after"].as_object().unwrap();
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            vec!["marital_status", "person_id"]
        );
    }
    assert_eq!(
        lines[3]["after"]["marital_status"],
        citizen_row(7, 3)["marital_status"]
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_catches_up_from_storage_and_does_not_hold_back_the_node() {
    let broker = broker_with_topics(2).await;
    let producer = broker.producer();
    let dir = tempfile::tempdir().unwrap();
    let mut config = node_config(
        dir.path(),
        &broker.bootstrap,
        &[("citizens", CITIZENS, &["person_id"])],
    );
    config.views[0].name = "slow".into();
    config.subscriptions.max_batch_size = 50;
    config.subscriptions.buffer_batches = 2;
    let node = ndc_node::start(config).await.unwrap();
    let inc = view_incarnation_of(node.addrs.grpc, "slow").await;

    let total = 3000u64;
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    let sends: Vec<_> = (0..total).map(|i| feed.event('c', i, 0, None)).collect();
    let futs = sends
        .iter()
        .map(|e| publish(&producer, CITIZENS, Some(&e.key), e.value.as_deref()));
    futures::future::join_all(futs).await;

    // A subscriber that reads one batch, then stalls.
    use ndc_proto::v1::subscription_client::SubscriptionClient;
    use ndc_proto::v1::{SubscribeRequest, subscribe_request::Start};
    let mut client = SubscriptionClient::connect(format!("http://{}", node.addrs.grpc))
        .await
        .unwrap();
    let mut stream = client
        .subscribe(SubscribeRequest {
            view: "slow".into(),
            start: Some(Start::ResumeToken(token_of("slow", inc, 0))),
            keys: vec![],
            fields: vec![],
            max_batch_size: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    if let Some(m) = stream.message().await.unwrap()
        && let Some(ndc_proto::v1::subscribe_response::Kind::Batch(b)) = m.kind
    {
        seqs.extend(b.changes.iter().map(|c| c.seq));
    }
    // While it stalls, the node keeps applying: all changes get committed.
    let http = node.addrs.http;
    let mut committed = 0.0;
    for _ in 0..300 {
        let text = metrics_text(http).await;
        committed = metric_value(&text, |l| {
            l.starts_with("ndc_view_committed_seq{view=\"slow\"}")
        })
        .unwrap_or(0.0);
        if committed >= total as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        committed, total as f64,
        "the node committed everything while the subscriber stalled"
    );
    // Then the subscriber reads on, slowly, and gets every change in order.
    while seqs.len() < total as usize {
        let m = tokio::time::timeout(T, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(ndc_proto::v1::subscribe_response::Kind::Batch(b)) = m.kind {
            assert!(b.changes.len() <= 50);
            seqs.extend(b.changes.iter().map(|c| c.seq));
        }
    }
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_export_backfills_through_the_same_path_then_kafka_continues() {
    let broker = broker_with_topics(1).await;
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("citizens-export.ndjson");
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    let mut text = String::new();
    for i in 0..25 {
        text.push_str(
            std::str::from_utf8(feed.event('r', i, 0, None).value.as_deref().unwrap()).unwrap(),
        );
        text.push('\n');
    }
    text.push_str("{ this line is broken\n");
    text.push('\n');
    std::fs::write(&export, text).unwrap();

    let mut config = node_config(
        &dir.path().join("node"),
        &broker.bootstrap,
        &[("backfill", CITIZENS, &["person_id"])],
    );
    config.views[0]
        .sources
        .push(ndc_node::config::SourceConfig::File(
            ndc_node::config::FileSourceConfig {
                path: export.clone(),
                format: Default::default(),
                follow: false,
            },
        ));
    let node = ndc_node::start(config.clone()).await.unwrap();
    // Kafka then updates some of the exported rows.
    let producer = broker.producer();
    for i in 0..5 {
        publish_event(&producer, CITIZENS, &feed.event('u', i, 1, None)).await;
    }
    let mut expected: BTreeMap<String, Value> = (0..25)
        .map(|i| (citizen_key(i), citizen_row(i, 0)))
        .collect();
    for i in 0..5 {
        expected.insert(citizen_key(i), citizen_row(i, 1));
    }
    let mut snap = Vec::new();
    for _ in 0..100 {
        snap = collect(node.addrs.grpc, "backfill", From::Snapshot, T, |l| {
            l.iter().any(|x| x.get("snapshot_complete").is_some())
        })
        .await;
        if fold(&snap) == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fold(&snap), expected);
    // The broken line went to the dead-letter topic with its line number.
    let letters = broker.read_all(DLQ, 1, T);
    assert_eq!(letters.len(), 1);
    assert_eq!(header(&letters[0], "ndc-source-offset"), Some("25"));
    assert_eq!(
        header(&letters[0], "ndc-source-stream"),
        Some(format!("file:{}", export.display()).as_str())
    );

    // A restart does not read the file again.
    node.shutdown().await;
    let node = ndc_node::start(config).await.unwrap();
    // Kafka partitions are resumed before their stored offsets on the test
    // broker (`kafka.resume_rewind_records`): the 5 updates come again and
    // are recognised as applied — once they have, the data path has run
    // since the restart. The file's 26 lines are not read again.
    let already_applied = |text: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with("ndc_source_records_total{")
                    && l.contains("view=\"backfill\"")
                    && l.contains("outcome=\"already_applied\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let http = node.addrs.http;
    let text = eventually_async("the Kafka updates read again", T, || async {
        let text = metrics_text(http).await;
        (already_applied(&text) >= 5.0).then_some(text)
    })
    .await;
    let again = already_applied(&text);
    assert!(again <= 5.0, "file re-read after restart:\n{text}");
    node.shutdown().await;
}

/// A node without Kafka: one view fed by the file `export`.
fn file_only_node(
    dir: &std::path::Path,
    view: &str,
    export: &std::path::Path,
    follow: bool,
) -> ndc_node::NodeConfig {
    let mut config = ndc_node::NodeConfig::default();
    config.node.data_dir = dir.join("node");
    config.node.grpc_listen = "127.0.0.1:0".parse().unwrap();
    config.tls.insecure = true;
    config.node.http_listen = "127.0.0.1:0".parse().unwrap();
    config.storage.sync_commits = false;
    config.views = vec![ndc_node::config::ViewConfig {
        name: view.into(),
        key_columns: vec!["person_id".into()],
        sources: vec![ndc_node::config::SourceConfig::File(
            ndc_node::config::FileSourceConfig {
                path: export.to_path_buf(),
                format: Default::default(),
                follow,
            },
        )],
        columns: Default::default(),
        national_id: None,
        shards: 1,
    }];
    config.validate().unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_kafka_a_file_source_works_and_dead_letters_go_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export.ndjson");
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    let mut lines = Vec::new();
    for i in 0..10 {
        lines.push(String::from_utf8(feed.event('r', i, 0, None).value.unwrap()).unwrap());
    }
    lines.insert(4, "{\"op\":\"c\",\"after\":[]}".into());
    std::fs::write(&export, lines.join("\n") + "\n").unwrap();

    let config = file_only_node(dir.path(), "file_only", &export, false);
    let node = ndc_node::start(config.clone()).await.unwrap();
    wait_rows(node.addrs.grpc, "file_only", 10).await;
    let dead = std::fs::read_to_string(config.dead_letter_file()).unwrap();
    let letters: Vec<Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 1, "{dead}");
    assert_eq!(letters[0]["error_kind"], "wrong_type");
    assert_eq!(letters[0]["offset"], 4);
    assert!(letters[0]["reason"].as_str().unwrap().contains("after"));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_file_is_read_as_it_grows_and_a_half_written_line_waits() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("growing.ndjson");
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    let lines: Vec<String> = (0..8)
        .map(|i| String::from_utf8(feed.event('r', i, 0, None).value.unwrap()).unwrap())
        .collect();
    std::fs::write(&export, "").unwrap();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&export)
        .unwrap();

    let config = file_only_node(dir.path(), "growing", &export, true);
    let view_info = |addr: std::net::SocketAddr| async move {
        use ndc_proto::v1::subscription_client::SubscriptionClient;
        let mut c = SubscriptionClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let views = c.list_views(ndc_proto::v1::ListViewsRequest {}).await;
        views.unwrap().into_inner().views.remove(0)
    };

    let node = ndc_node::start(config.clone()).await.unwrap();
    // Lines appended after the start are read: the source did not finish
    // at the (empty) end of the file.
    let http = node.addrs.http;
    eventually_async("the node ready", T, || async {
        http_get(http, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await;
    writeln!(file, "{}\n{}\n{}", lines[0], lines[1], lines[2]).unwrap();
    wait_rows(node.addrs.grpc, "growing", 3).await;

    // Half a line: held, not decoded (it would be malformed JSON). Once the
    // source says it holds it, nothing more was committed.
    let (head, tail) = lines[3].split_at(lines[3].len() / 2);
    write!(file, "{head}").unwrap();
    file.flush().unwrap();
    let path = export.display().to_string();
    eventually_async("the half line held", T, || {
        let path = path.clone();
        async move {
            let text = metrics_text(http).await;
            metric_value(&text, |l| {
                l.starts_with("ndc_source_file_partial_line_bytes{")
                    && l.contains(&format!("path=\"{path}\""))
            })
            .filter(|held| *held == head.len() as f64)
        }
    })
    .await;
    assert_eq!(view_info(node.addrs.grpc).await.committed_seq, 3);
    writeln!(file, "{tail}\n{}", lines[4]).unwrap();
    wait_rows(node.addrs.grpc, "growing", 5).await;
    node.shutdown().await;

    // After a restart the source goes on from the first line not applied.
    writeln!(file, "{}", lines[5]).unwrap();
    let node = ndc_node::start(config.clone()).await.unwrap();
    wait_rows(node.addrs.grpc, "growing", 6).await;
    writeln!(file, "{}\n{}", lines[6], lines[7]).unwrap();
    wait_rows(node.addrs.grpc, "growing", 8).await;
    let info = view_info(node.addrs.grpc).await;
    assert_eq!((info.live_rows, info.committed_seq), (8, 8));
    let snapshot = collect(node.addrs.grpc, "growing", From::Snapshot, T, |l| {
        l.iter().any(|l| l.get("snapshot_complete").is_some())
    })
    .await;
    let rows = fold(&snapshot);
    let expected: Value = serde_json::from_str::<Value>(&lines[3]).unwrap()["after"].clone();
    assert_eq!(rows.get(&citizen_key(3)), Some(&expected), "{rows:?}");
    assert!(
        std::fs::read_to_string(config.dead_letter_file()).map_or(true, |d| d.is_empty()),
        "no line was dead-lettered"
    );
    node.shutdown().await;
}

/// Change lines without their resume tokens (which name the batch a change
/// was sent in, not the change).
fn without_tokens(lines: &[Value]) -> Vec<Value> {
    changes(lines)
        .into_iter()
        .map(|l| {
            let mut l = l.clone();
            l.as_object_mut().unwrap().remove("resume_token");
            l
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_keep_up_get_each_commit_from_memory_exactly_as_storage_has_it() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("kept.ndjson");
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    let mut line =
        |op, i, rev| String::from_utf8(feed.event(op, i, rev, None).value.unwrap()).unwrap();
    let initial: Vec<String> = (0..3).map(|i| line('r', i, 0)).collect();
    std::fs::write(&export, initial.join("\n") + "\n").unwrap();
    let config = file_only_node(dir.path(), "kept", &export, true);
    let node = ndc_node::start(config).await.unwrap();
    wait_rows(node.addrs.grpc, "kept", 3).await;
    let grpc = node.addrs.grpc;

    // Rounds of five changes (inserts of 3 and 4, updates, a delete of 4),
    // a commit or two each, while two subscribers follow.
    let last_seq = 3 + 6 * 5;
    let everything = tokio::spawn(collect(grpc, "kept", From::Snapshot, T, move |l| {
        l.iter().any(|x| x["seq"] == last_seq)
    }));
    let restricted = tokio::spawn(async move {
        let mut lines = Vec::new();
        let opts = ndc_node::client::SubscribeOptions {
            addr: grpc.to_string(),
            view: "kept".into(),
            from: From::Latest,
            keys: vec![citizen_key(3)],
            fields: vec!["person_id".into(), "marital_status".into()],
            limit: Some(6),
            progress: false,
            reconnect: false,
            tls: None,
            token: None,
        };
        let fut = ndc_node::client::subscribe(opts, |l| {
            lines.push(l);
            true
        });
        tokio::time::timeout(T, fut).await.unwrap().unwrap();
        lines
    });
    let http = node.addrs.http;
    eventually_async("both subscribers open", T, || async {
        let text = metrics_text(http).await;
        let open = metric_value(&text, |l| {
            l.starts_with("ndc_subscriptions_active{") && l.contains("view=\"kept\"")
        });
        (open.unwrap_or(0.0) >= 2.0).then_some(())
    })
    .await;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&export)
        .unwrap();
    for rev in 1..=6u32 {
        let round: Vec<String> = (0..5)
            .map(|i| match (rev, i) {
                (1, 3 | 4) => line('c', i, rev),
                (6, 4) => line('d', i, rev - 1),
                _ => line('u', i, rev),
            })
            .collect();
        writeln!(file, "{}", round.join("\n")).unwrap();
        file.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let everything = everything.await.unwrap();
    let restricted = restricted.await.unwrap();

    // What the followers got from memory is what storage holds: a late
    // subscriber reads the same changes back from RocksDB.
    let incarnation = view_incarnation_of(grpc, "kept").await;
    let token = token_of("kept", incarnation, 3);
    let stored = collect(grpc, "kept", From::Token(token), T, move |l| {
        l.iter().any(|x| x["seq"] == last_seq)
    })
    .await;
    let followed: Vec<Value> = without_tokens(&everything)
        .into_iter()
        .filter(|l| l["seq"].as_u64() > Some(3))
        .collect();
    let seqs: Vec<u64> = followed
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (4..=last_seq).collect::<Vec<_>>(),
        "each change once, in order"
    );
    assert_eq!(followed, without_tokens(&stored));
    assert_eq!(followed.last().unwrap()["op"], "delete");
    assert_eq!(followed.last().unwrap()["after"], Value::Null);

    // The key and field filters hold on changes taken from memory.
    let restricted = changes(&restricted);
    assert_eq!(restricted.len(), 6);
    for l in &restricted {
        assert_eq!(l["key"].to_string(), citizen_key(3));
        for side in ["before", "after"] {
            if let Some(row) = l[side].as_object() {
                assert_eq!(
                    row.keys().collect::<Vec<_>>(),
                    vec!["marital_status", "person_id"]
                );
            }
        }
    }
    assert_eq!(
        restricted[5]["after"]["marital_status"],
        citizen_row(3, 6)["marital_status"]
    );

    let text = metrics_text(node.addrs.http).await;
    let from_memory = metric_value(&text, |l| {
        l.starts_with("ndc_subscription_changes_read_total")
            && l.contains("view=\"kept\"")
            && l.contains("from=\"memory\"")
    })
    .unwrap_or(0.0);
    assert!(
        from_memory > 0.0,
        "no change was taken from memory:\n{text}"
    );
    node.shutdown().await;
}
