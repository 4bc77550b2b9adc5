//! The replica operator against a reference model, on a real RocksDB store.
//!
//! A generated history of changes (upserts, deletes, truncates) is written to
//! a simulated topic the way Debezium does at least once: in order, with
//! windows of it sent again. The topic is spread over partitions by key and
//! consumed in any interleaving of partitions, in batches of any size, with
//! crashes (the store is closed without committing the open batch and opened
//! again, and reading resumes from the stored offsets). Whatever happens, the
//! replica must equal the reference model, and the change stream must be
//! gapless and, folded from the start, give the same replica.

use ndc_operators::debezium::{ChangeEvent, ChangeOp, Key, Row, SourceInfo};
use ndc_operators::{Position, Store, StoreConfig};
use ndc_proto::v1::Op;
use proptest::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Step {
    Upsert { key: u8, value: u8 },
    Delete { key: u8 },
    Truncate,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..6, any::<u8>()).prop_map(|(key, value)| Step::Upsert { key, value }),
        2 => (0u8..6).prop_map(|key| Step::Delete { key }),
        1 => Just(Step::Truncate),
    ]
}

fn key_of(k: u8) -> Key {
    Key::from_value(&json!({ "id": k }))
}

fn row_of(k: u8, value: u8) -> Row {
    let mut row = serde_json::Map::new();
    row.insert("id".into(), json!(k));
    row.insert("v".into(), json!(value));
    Row::from_map(&row)
}

/// The i-th event of the history (version i + 1).
fn event(i: usize, step: &Step, with_lsn: bool) -> ChangeEvent {
    let version = i as u64 + 1;
    let source = SourceInfo {
        ts_ms: version as i64,
        lsn: with_lsn.then_some(version),
        table: "t".into(),
        ..SourceInfo::default()
    };
    match step {
        Step::Upsert { key, value } => ChangeEvent {
            op: ChangeOp::Update,
            key: Some(key_of(*key)),
            before: None,
            after: Some(row_of(*key, *value)),
            source,
            processed_ts_ms: None,
        },
        Step::Delete { key } => ChangeEvent {
            op: ChangeOp::Delete,
            key: Some(key_of(*key)),
            before: None,
            after: None,
            source,
            processed_ts_ms: None,
        },
        Step::Truncate => ChangeEvent {
            op: ChangeOp::Truncate,
            key: None,
            before: None,
            after: None,
            source,
            processed_ts_ms: None,
        },
    }
}

/// Reference: a key holds the row of its newest event, unless that event is a
/// delete or an even newer truncate came.
fn reference(history: &[Step]) -> BTreeMap<String, String> {
    let mut state: BTreeMap<String, String> = BTreeMap::new();
    for (i, s) in history.iter().enumerate() {
        match s {
            Step::Upsert { key, value } => {
                state.insert(
                    key_of(*key).to_string(),
                    row_of(*key, *value).as_str().to_string(),
                );
            }
            Step::Delete { key } => {
                state.remove(key_of(*key).as_str());
            }
            Step::Truncate => state.clear(),
        }
        let _ = i;
    }
    state
}

#[derive(Debug, Clone)]
struct Scenario {
    history: Vec<Step>,
    /// (start, len) windows of the history that Debezium sends again after
    /// history index `at`.
    resends: Vec<(usize, usize, usize)>,
    partitions: usize,
    /// Which partition to read from next, and how many records, repeatedly.
    schedule: Vec<(usize, usize)>,
    /// Crash after this many scheduled reads (before committing).
    crashes: Vec<usize>,
    with_lsn: bool,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(step(), 1..40),
        1usize..4,
        any::<bool>(),
    )
        .prop_flat_map(|(history, partitions, with_lsn)| {
            let n = history.len();
            (
                Just(history),
                prop::collection::vec((0..n, 0..n, 1usize..6), 0..4),
                Just(partitions),
                prop::collection::vec((0..partitions, 1usize..8), 1..60),
                prop::collection::vec(0usize..60, 0..3),
                Just(with_lsn),
            )
                .prop_map(
                    |(history, resends, partitions, schedule, crashes, with_lsn)| Scenario {
                        history,
                        resends,
                        partitions,
                        schedule,
                        crashes,
                        with_lsn,
                    },
                )
        })
}

/// The topic: history entries in order, with resent windows, spread by key.
fn topic(s: &Scenario) -> Vec<Vec<usize>> {
    let mut sent = Vec::new();
    for i in 0..s.history.len() {
        sent.push(i);
        for (at, start, len) in &s.resends {
            if *at == i && *start <= i {
                sent.extend(*start..(*start + len).min(i + 1));
            }
        }
    }
    let mut parts = vec![Vec::new(); s.partitions];
    for i in sent {
        let p = match &s.history[i] {
            Step::Upsert { key, .. } | Step::Delete { key } => usize::from(*key) % s.partitions,
            Step::Truncate => 0,
        };
        parts[p].push(i);
    }
    parts
}

fn run(s: &Scenario) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut config = StoreConfig::new(dir.path());
    config.sync_commits = false;
    config.block_cache_bytes = 1 << 20;
    config.write_buffer_bytes = 4 << 20;
    let views = vec!["v".to_string()];
    let parts = topic(s);
    let streams: Vec<String> = (0..parts.len()).map(|p| format!("kafka:t:{p}")).collect();
    let open = || Store::open(&config, &views).map_err(|e| TestCaseError::fail(e.to_string()));

    let mut store = open()?;
    let view = store
        .view_id("v")
        .ok_or_else(|| TestCaseError::fail("view"))?;
    let mut cursors: Vec<u64> = streams
        .iter()
        .map(|s| store.next_offset(view, s).unwrap_or(0))
        .collect();
    let mut schedule = s.schedule.clone();
    // After the generated schedule, drain every partition.
    for p in 0..parts.len() {
        schedule.push((p, usize::MAX));
    }
    for (step_no, (p, count)) in schedule.iter().enumerate() {
        // The final drains (after the generated schedule) always commit.
        let crash = step_no < s.schedule.len() && s.crashes.contains(&step_no);
        {
            let mut txn = store.begin(0);
            let mut read = 0;
            while read < *count && (cursors[*p] as usize) < parts[*p].len() {
                let offset = cursors[*p];
                let i = parts[*p][offset as usize];
                let pos = Position::new(streams[*p].as_str(), offset);
                txn.apply(view, &event(i, &s.history[i], s.with_lsn), &pos)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                cursors[*p] += 1;
                read += 1;
            }
            if !crash {
                txn.commit()
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
        }
        if crash {
            drop(store);
            store = open()?;
            cursors = streams
                .iter()
                .map(|s| store.next_offset(view, s).unwrap_or(0))
                .collect();
        }
    }

    let expected = reference(&s.history);
    let reader = store.reader();
    let mut replica = BTreeMap::new();
    reader
        .scan_snapshot("v", None, 7, |rows| {
            for r in rows {
                replica.insert(r.key, r.row_json);
            }
            true
        })
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&replica, &expected, "replica differs from the reference");

    // The change stream: gapless, each change consistent with the state it
    // applies to, and folding it gives the replica.
    let changes = reader
        .changes_after("v", 0, usize::MAX)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut folded: BTreeMap<String, String> = BTreeMap::new();
    for (i, c) in changes.iter().enumerate() {
        prop_assert_eq!(c.seq, i as u64 + 1, "gap in change stream");
        match Op::try_from(c.op).map_err(|e| TestCaseError::fail(e.to_string()))? {
            Op::Insert => {
                prop_assert!(!folded.contains_key(&c.key_json), "insert of existing key");
                folded.insert(c.key_json.clone(), c.after_json.clone().unwrap_or_default());
            }
            Op::Update => {
                prop_assert_eq!(
                    folded.get(&c.key_json),
                    c.before_json.as_ref(),
                    "update before mismatch"
                );
                folded.insert(c.key_json.clone(), c.after_json.clone().unwrap_or_default());
            }
            Op::Delete => {
                let removed = folded.remove(&c.key_json);
                prop_assert_eq!(
                    removed.as_ref(),
                    c.before_json.as_ref(),
                    "delete before mismatch"
                );
            }
            Op::Truncate => folded.clear(),
            other => return Err(TestCaseError::fail(format!("unexpected op {other:?}"))),
        }
    }
    prop_assert_eq!(
        &folded,
        &expected,
        "folded change stream differs from the reference"
    );
    let meta = reader
        .view_meta("v")
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(meta.live_rows, expected.len() as u64);
    prop_assert_eq!(meta.last_seq, changes.len() as u64);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn any_delivery_and_crash_schedule_gives_the_reference_replica(s in scenario()) {
        run(&s)?;
    }
}

#[test]
fn a_replay_of_the_whole_topic_changes_nothing() {
    let history: Vec<Step> = (0..20u8)
        .map(|i| match i % 5 {
            3 => Step::Delete { key: i % 4 },
            _ => Step::Upsert {
                key: i % 4,
                value: i,
            },
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let views = vec!["v".to_string()];
    let mut store = Store::open(&StoreConfig::new(dir.path()), &views).expect("open");
    let view = store.view_id("v").expect("view");
    let apply_all = |store: &mut Store, stream: &str| {
        let mut txn = store.begin(0);
        for (i, s) in history.iter().enumerate() {
            txn.apply(view, &event(i, s, true), &Position::new(stream, i as u64))
                .expect("apply");
        }
        txn.commit().expect("commit")
    };
    let first = apply_all(&mut store, "kafka:t:0");
    assert!(first.changes > 0);
    // Same offsets again: already applied.
    assert_eq!(apply_all(&mut store, "kafka:t:0").changes, 0);
    // The same events re-published at new offsets: duplicates.
    assert_eq!(apply_all(&mut store, "kafka:t:1").changes, 0);
}
