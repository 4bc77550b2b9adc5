//! The acceptance corpus of Debezium connectors (`node/tests/corpus`), through
//! a real Kafka-protocol broker (tansu) into a node.
//!
//! Each corpus file is one table's feed in its connector's real shape (the
//! source of each is cited in its first line, with the replica expected at
//! the end, written by hand): snapshot then stream, updates in one second,
//! redeliveries of earlier events, deletes with and without tombstones, and
//! flattened feeds in each delete mode. The node must end with exactly the
//! expected rows, count the stale and duplicate events it dropped per view
//! and connector, dead-letter nothing, and fall back to commit-time ordering
//! only where the corpus says the feed names no comparable position.

#![allow(clippy::unwrap_used)]

use ndc_node::client::From;
use ndc_node::config::SourceConfig;
use ndc_operators::Format;
use ndc_testkit::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const DLQ: &str = "ndc.dead-letter";
const T: Duration = Duration::from_secs(60);
/// A row published after each corpus: once it is in the view, everything
/// before it in the (single-partition) topic has been applied.
const END: &str = "~end-of-corpus";

/// A record as published: its key and value (`None`: a tombstone's value).
type Record = (Option<Vec<u8>>, Option<Vec<u8>>);

struct Corpus {
    name: String,
    header: Value,
    records: Vec<Record>,
}

impl Corpus {
    fn view(&self) -> String {
        format!("corpus.{}", self.name)
    }

    fn key_columns(&self) -> Vec<String> {
        self.header["key_columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect()
    }

    fn format(&self) -> Format {
        match self.header["format"].as_str().unwrap() {
            "flattened" => Format::Flattened,
            _ => Format::Debezium,
        }
    }

    /// The end marker in the corpus's own format.
    fn end_record(&self) -> (Vec<u8>, Vec<u8>) {
        let mut row = serde_json::Map::new();
        for c in self.key_columns() {
            row.insert(c, json!(END));
        }
        // Keyed by the message key alone (MongoDB's {"id": ...}).
        let key = match self.key_columns().is_empty() {
            true => json!({ "id": END }),
            false => Value::Object(row.clone()),
        };
        let key = key.to_string().into_bytes();
        let value = match self.format() {
            Format::Flattened => Value::Object(row),
            _ => json!({"op": "c", "before": null, "after": row, "source": {"ts_ms": 0}}),
        };
        (key, value.to_string().into_bytes())
    }
}

fn load(dir: &Path) -> Vec<Corpus> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let mut lines = text.lines();
            let header =
                serde_json::from_str::<Value>(lines.next().unwrap()).unwrap()["corpus"].clone();
            assert!(
                header["cites"].as_str().is_some_and(|c| !c.is_empty()),
                "{} cites its source",
                path.display()
            );
            let records = lines
                .map(|l| {
                    let r: Value = serde_json::from_str(l).unwrap();
                    let bytes = |v: &Value| (!v.is_null()).then(|| v.to_string().into_bytes());
                    (bytes(&r["key"]), bytes(&r["value"]))
                })
                .collect();
            Corpus {
                name: path.file_stem().unwrap().to_string_lossy().into_owned(),
                header,
                records,
            }
        })
        .collect()
}

/// The view's rows, read as a snapshot.
async fn rows(addr: std::net::SocketAddr, view: &str) -> BTreeMap<String, Value> {
    let lines = collect(addr, view, From::Snapshot, T, |lines| {
        lines.iter().any(|l| l.get("snapshot_complete").is_some())
    })
    .await;
    fold(&lines)
}

/// The sum of a counter's series whose labels include all of `labels`.
fn counter(text: &str, name: &str, labels: &[String]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connectors_corpus_gives_the_hand_written_replica() {
    let corpora = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus"));
    assert!(corpora.len() >= 10, "the corpus is in node/tests/corpus");
    let broker = Broker::start();
    broker.create_topic(DLQ, 1).await;
    let producer = broker.producer();
    for c in &corpora {
        broker.create_topic(&c.view(), 1).await;
        for (key, value) in &c.records {
            publish(&producer, &c.view(), key.as_deref(), value.as_deref()).await;
        }
        let (key, value) = c.end_record();
        publish(&producer, &c.view(), Some(&key), Some(&value)).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let views: Vec<(String, Vec<String>)> = corpora
        .iter()
        .map(|c| (c.view(), c.key_columns()))
        .collect();
    let key_refs: Vec<Vec<&str>> = views
        .iter()
        .map(|(_, k)| k.iter().map(String::as_str).collect())
        .collect();
    let specs: Vec<(&str, &str, &[&str])> = views
        .iter()
        .zip(&key_refs)
        .map(|((v, _), k)| (v.as_str(), v.as_str(), k.as_slice()))
        .collect();
    let mut config = node_config(dir.path(), &broker.bootstrap, &specs);
    for (view, corpus) in config.views.iter_mut().zip(&corpora) {
        if let SourceConfig::Kafka(k) = &mut view.sources[0] {
            k.format = corpus.format();
        }
    }
    let node = ndc_node::start(config).await.unwrap();

    let mut failures = Vec::new();
    for c in &corpora {
        let view = c.view();
        let end_key = c.end_record().0;
        let end_key: Value = serde_json::from_slice(&end_key).unwrap();
        let mut got = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + T;
        while tokio::time::Instant::now() < deadline {
            got = rows(node.addrs.grpc, &view).await;
            if got.contains_key(&end_key.to_string()) {
                break;
            }
        }
        assert!(
            got.remove(&end_key.to_string()).is_some(),
            "{view}: the end marker never arrived; rows {got:?}"
        );
        let expected: BTreeMap<String, Value> = c.header["expected"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let key: Value = serde_json::from_str(k).unwrap();
                (key.to_string(), v.clone())
            })
            .collect();
        if got != expected {
            failures.push(format!(
                "{view}:\n  expected {expected:?}\n  got      {got:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let text = metrics_text(node.addrs.http).await;
    for c in &corpora {
        let view = format!("view=\"{}\"", c.view());
        let connector = format!("connector=\"{}\"", c.header["connector"].as_str().unwrap());
        let at_least = |field: &str| c.header[field].as_f64().unwrap();
        for (outcome, field) in [
            ("stale", "stale_at_least"),
            ("duplicate", "duplicate_at_least"),
        ] {
            let n = counter(
                &text,
                "ndc_source_records_total",
                &[
                    view.clone(),
                    connector.clone(),
                    format!("outcome=\"{outcome}\""),
                ],
            );
            assert!(
                n >= at_least(field),
                "{view}: {n} {outcome} events counted for {connector}, expected at least {}",
                at_least(field)
            );
        }
        let fallbacks = counter(
            &text,
            "ndc_replica_order_fallback_total",
            std::slice::from_ref(&view),
        );
        match at_least("fallbacks") {
            0.0 => assert_eq!(fallbacks, 0.0, "{view}: ordered by position alone"),
            n => assert!(
                fallbacks >= n,
                "{view}: {fallbacks} fallbacks, expected {n}"
            ),
        }
        let dead = counter(
            &text,
            "ndc_dead_letter_records_total",
            std::slice::from_ref(&view),
        );
        assert_eq!(dead, 0.0, "{view}: nothing in the corpus is malformed");
    }
    node.shutdown().await;
}
