//! The replica operator against a reference model, on a real RocksDB store.
//!
//! A generated history of changes (upserts, deletes, truncates), after an
//! initial snapshot of some keys, is written to a simulated topic the way
//! Debezium does at least once: in order, with windows of it and single
//! earlier events sent again. Each event is Debezium JSON in the shape of a
//! generated connector (PostgreSQL with or without `sequence`, MySQL binlog
//! coordinates, SQL Server LSNs, Oracle SCNs, MongoDB oplog times, or none at
//! all), decoded by the real decoder: commit times (`ts_ms`) tie across
//! several changes and snapshot reads are stamped with a scan time later than
//! the changes streamed after them, so only the positions order them.
//! Deletes are Debezium events, events followed by tombstones, or (a
//! flattened feed in `tombstone` mode) tombstones alone. The topic is spread
//! over partitions by key and consumed in any interleaving of partitions, in
//! batches of any size, with crashes (the store is closed without committing
//! the open batch and opened again, and reading resumes from the stored
//! offsets). Whatever happens, the replica must equal the reference model,
//! and the change stream must be gapless and, folded from the start, give
//! the same replica.

use ndc_operators::debezium::{ChangeEvent, Decoded, Key, Row};
use ndc_operators::{Decoder, DecoderConfig, Format, Position, Store, StoreConfig, replica};
use ndc_proto::v1::Op;
use proptest::prelude::*;
use serde_json::{Value, json};
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

/// Which connector's positions the feed carries.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Connector {
    /// No position: commit time, then offset (the commit times of this
    /// feed are distinct and in order: the fallback needs that).
    None,
    Postgres,
    PostgresSequence,
    MySql,
    SqlServer,
    Oracle,
    MongoDb,
}

fn connector() -> impl Strategy<Value = Connector> {
    prop_oneof![
        Just(Connector::None),
        Just(Connector::Postgres),
        Just(Connector::PostgresSequence),
        Just(Connector::MySql),
        Just(Connector::SqlServer),
        Just(Connector::Oracle),
        Just(Connector::MongoDb),
    ]
}

/// How the feed says a row was deleted.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Deletes {
    /// A Debezium `d` event.
    Event,
    /// A `d` event and a tombstone after it.
    EventAndTombstone,
    /// Only a tombstone (a flattened feed's default): redeliveries are then
    /// stretches up to the present, as Debezium restarts from an offset.
    TombstoneOnly,
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

/// The `source` block of the change at version `v` (0: the snapshot's
/// position, shared by every snapshot read).
fn source(c: Connector, v: u64, snapshot: bool) -> Value {
    // Commit times tie across four changes; a snapshot read carries the
    // time the table was scanned, after all of them. Without positions,
    // commit times must order the feed (the fallback's assumption).
    let ts = match (c, snapshot) {
        (Connector::None, _) => v as i64,
        (_, true) => 1_000_000,
        (_, false) => (v / 4) as i64,
    };
    let snap = if snapshot { "true" } else { "false" };
    match c {
        Connector::None => json!({"ts_ms": ts, "snapshot": snap}),
        Connector::Postgres => json!({"connector": "postgresql", "ts_ms": ts, "snapshot": snap,
            "lsn": 1000 + v * 10}),
        Connector::PostgresSequence => {
            let last = if snapshot {
                Value::Null
            } else {
                json!((995 + v * 10).to_string())
            };
            json!({"connector": "postgresql", "ts_ms": ts, "snapshot": snap, "lsn": 1000 + v * 10,
                "sequence": json!([last, (1000 + v * 10).to_string()]).to_string()})
        }
        // Seven changes a binlog file; snapshot reads have server_id 0.
        Connector::MySql => json!({"connector": "mysql", "ts_ms": ts, "snapshot": snap,
            "server_id": if snapshot { 0 } else { 223344 }, "gtid": null,
            "file": format!("mysql-bin.{:06}", 3 + v / 7), "pos": 4 + (v % 7) * 120, "row": 0}),
        Connector::SqlServer => json!({"connector": "sqlserver", "ts_ms": ts, "snapshot": snap,
            "commit_lsn": format!("{:08x}:{:08x}:{:04x}", 0x27, 0x700 + v * 2, 5),
            "change_lsn": if snapshot { Value::Null } else { json!(format!("{:08x}:{:08x}:{:04x}", 0x27, 0x700 + v * 2, 3)) },
            "event_serial_no": if snapshot { Value::Null } else { json!("1") }}),
        Connector::Oracle => json!({"connector": "oracle", "ts_ms": ts, "snapshot": snap,
            "scn": (2_122_180 + v * 3).to_string(),
            "commit_scn": if snapshot { Value::Null } else { json!((2_122_181 + v * 3).to_string()) },
            "rs_id": format!("{:06x}.{:08x}.{:04x}", 0x1234, 0x12345 + v, 0x10), "ssn": 1, "txId": "6.28.807"}),
        // The oplog's seconds, and the ordinal within one second.
        Connector::MongoDb => json!({"connector": "mongodb", "snapshot": snap,
            "ts_ms": if snapshot { 1000 } else { ((v + 3) / 3) as i64 * 1000 }, "ord": (v + 3) % 3}),
    }
}

/// One record of the topic.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sent {
    /// The snapshot read of the i-th snapshot key.
    Snapshot(usize),
    /// The i-th change of the history.
    Change(usize),
    /// The tombstone after the i-th change (a delete).
    Tombstone(usize),
}

fn decoder() -> Decoder {
    Decoder::new(DecoderConfig {
        format: Format::Debezium,
        key_columns: vec!["id".into()],
        max_record_bytes: 0,
        national_id: None,
    })
}

/// The change event a record of the topic decodes to.
fn event(s: &Scenario, sent: Sent) -> ChangeEvent {
    let decoder = decoder();
    let (key, value) = match sent {
        Sent::Snapshot(i) => {
            let (key, value) = s.snapshot[i];
            let value = json!({"op": "r", "before": null,
                "after": serde_json::from_str::<Value>(row_of(key, value).as_str()).unwrap_or_default(),
                "source": source(s.connector, 0, true)});
            (key, Some(value))
        }
        Sent::Change(i) => {
            let v = i as u64 + 1;
            let value = match &s.history[i] {
                Step::Upsert { key, value } => json!({"op": "u", "before": null,
                    "after": serde_json::from_str::<Value>(row_of(*key, *value).as_str()).unwrap_or_default(),
                    "source": source(s.connector, v, false)}),
                Step::Delete { key } => json!({"op": "d", "before": {"id": key}, "after": null,
                    "source": source(s.connector, v, false)}),
                Step::Truncate => json!({"op": "t", "before": null, "after": null,
                    "source": source(s.connector, v, false)}),
            };
            let key = match &s.history[i] {
                Step::Upsert { key, .. } | Step::Delete { key } => *key,
                Step::Truncate => 0,
            };
            (key, Some(value))
        }
        Sent::Tombstone(i) => match &s.history[i] {
            Step::Delete { key } => (*key, None),
            _ => unreachable!("tombstones follow deletes"),
        },
    };
    let key_bytes = key_of(key).as_str().as_bytes().to_vec();
    let value_bytes = value.map(|v| v.to_string().into_bytes());
    let kafka_key = match sent {
        Sent::Change(i) if matches!(s.history[i], Step::Truncate) => None,
        _ => Some(key_bytes.as_slice()),
    };
    match decoder.decode("t", kafka_key, value_bytes.as_deref()) {
        Ok(Decoded::Change(event)) => event,
        other => panic!("{sent:?} decodes to a change, got {other:?}"),
    }
}

/// Reference: the snapshot's rows, then each change of the history in turn.
fn reference(s: &Scenario) -> BTreeMap<String, String> {
    let mut state: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in &s.snapshot {
        state.insert(
            key_of(*key).to_string(),
            row_of(*key, *value).as_str().to_string(),
        );
    }
    for step in &s.history {
        match step {
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
    }
    state
}

#[derive(Debug, Clone)]
struct Scenario {
    connector: Connector,
    deletes: Deletes,
    /// Rows read by the initial snapshot (distinct keys), before the history.
    snapshot: Vec<(u8, u8)>,
    history: Vec<Step>,
    /// (at, start, len): after the change `at`, Debezium sends changes
    /// `start..start+len` again (with `TombstoneOnly`: `start..=at`).
    resends: Vec<(usize, usize, usize)>,
    /// (at, i): after the change `at`, the single earlier record `i` of the
    /// topic (snapshot reads first, then changes) comes again.
    redeliveries: Vec<(usize, usize)>,
    partitions: usize,
    /// Which partition to read from next, and how many records, repeatedly.
    schedule: Vec<(usize, usize)>,
    /// Crash after this many scheduled reads (before committing).
    crashes: Vec<usize>,
}

fn deletes() -> impl Strategy<Value = Deletes> {
    prop_oneof![
        Just(Deletes::Event),
        Just(Deletes::EventAndTombstone),
        Just(Deletes::TombstoneOnly),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(step(), 1..40),
        prop::collection::btree_map(0u8..6, any::<u8>(), 0..6),
        1usize..4,
        connector(),
        deletes(),
    )
        .prop_flat_map(|(history, snapshot, partitions, connector, deletes)| {
            let n = history.len();
            let records = n + snapshot.len();
            (
                Just(history),
                Just(snapshot.into_iter().collect::<Vec<_>>()),
                prop::collection::vec((0..n, 0..n, 1usize..6), 0..4),
                prop::collection::vec((0..n, 0..records), 0..6),
                Just(partitions),
                prop::collection::vec((0..partitions, 1usize..8), 1..60),
                prop::collection::vec(0usize..60, 0..3),
                Just((connector, deletes)),
            )
                .prop_map(
                    |(
                        history,
                        snapshot,
                        resends,
                        redeliveries,
                        partitions,
                        schedule,
                        crashes,
                        (connector, deletes),
                    )| Scenario {
                        connector,
                        deletes,
                        snapshot,
                        history,
                        resends,
                        redeliveries,
                        partitions,
                        schedule,
                        crashes,
                    },
                )
        })
}

/// The records of change `i`: the change itself, a tombstone after a delete,
/// or the tombstone alone, as the feed's delete mode says.
fn records_of(s: &Scenario, i: usize) -> Vec<Sent> {
    match (&s.history[i], s.deletes) {
        (Step::Delete { .. }, Deletes::EventAndTombstone) => {
            vec![Sent::Change(i), Sent::Tombstone(i)]
        }
        (Step::Delete { .. }, Deletes::TombstoneOnly) => vec![Sent::Tombstone(i)],
        _ => vec![Sent::Change(i)],
    }
}

/// The topic: the snapshot, then history entries in order, with resent
/// windows and single redeliveries, spread by key.
fn topic(s: &Scenario) -> Vec<Vec<Sent>> {
    let mut sent: Vec<Sent> = (0..s.snapshot.len()).map(Sent::Snapshot).collect();
    for i in 0..s.history.len() {
        sent.extend(records_of(s, i));
        for (at, start, len) in &s.resends {
            if *at == i && *start <= i {
                // A tombstone-only feed has nothing that orders a tombstone
                // but its place after the row it deletes: Debezium resends
                // from an offset up to where it was, never a stretch alone.
                let end = match s.deletes {
                    Deletes::TombstoneOnly => i + 1,
                    _ => (*start + len).min(i + 1),
                };
                for j in *start..end {
                    sent.extend(records_of(s, j));
                }
            }
        }
        for (at, r) in &s.redeliveries {
            if *at != i || s.deletes == Deletes::TombstoneOnly {
                continue;
            }
            match r.checked_sub(s.snapshot.len()) {
                // Without positions only the stream's order places a
                // snapshot read (its ts_ms is a scan time): one delivered
                // again late is a new read (design.md, "Fallback").
                None if s.connector == Connector::None => {}
                None => sent.push(Sent::Snapshot(*r)),
                Some(j) if j <= i => sent.extend(records_of(s, j)),
                Some(_) => {}
            }
        }
    }
    let mut parts = vec![Vec::new(); s.partitions];
    for r in sent {
        let key = match r {
            Sent::Snapshot(i) => Some(s.snapshot[i].0),
            Sent::Change(i) | Sent::Tombstone(i) => match &s.history[i] {
                Step::Upsert { key, .. } | Step::Delete { key } => Some(*key),
                Step::Truncate => None,
            },
        };
        parts[key.map_or(0, |k| usize::from(k) % s.partitions)].push(r);
    }
    parts
}

/// Cases per property: 96 in the test suite; `PROPTEST_CASES=N` for a
/// deeper run.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
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
                let record = parts[*p][offset as usize];
                let pos = Position::new(streams[*p].as_str(), offset);
                replica::apply(&mut txn, view, &event(s, record), &pos)
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

    verify(&store, s)
}

fn verify(store: &Store, s: &Scenario) -> Result<(), TestCaseError> {
    let expected = reference(s);
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

/// The state writer's pipeline: batch N+1 is applied while batch N is
/// still being written (N+1 sees N through a `Pending` overlay), and a crash
/// loses whatever was not written yet. Same outcome as one batch at a time.
fn run_pipelined(s: &Scenario) -> Result<(), TestCaseError> {
    use ndc_operators::{Pending, PreparedWrite};
    let fail = |e: ndc_operators::StoreError| TestCaseError::fail(e.to_string());
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
    let mut cursors = vec![0u64; parts.len()];
    let mut pending = Pending::default();
    let mut inflight: Option<(PreparedWrite, u64)> = None;
    let mut schedule = s.schedule.clone();
    for p in 0..parts.len() {
        schedule.push((p, usize::MAX));
    }
    for (step_no, (p, count)) in schedule.iter().enumerate() {
        let step_no = step_no as u64;
        let (prepared, rows) = {
            let mut txn = store.begin_over(0, &pending);
            let mut read = 0;
            while read < *count && (cursors[*p] as usize) < parts[*p].len() {
                let offset = cursors[*p];
                let record = parts[*p][offset as usize];
                let pos = Position::new(streams[*p].as_str(), offset);
                replica::apply(&mut txn, view, &event(s, record), &pos).map_err(fail)?;
                cursors[*p] += 1;
                read += 1;
            }
            let (_, prepared, rows) = txn.prepare_keeping_rows();
            (prepared, rows)
        };
        // Batch N is written only now, after N+1 was applied.
        if let Some((write, n)) = inflight.take() {
            write.write().map_err(fail)?;
            pending.applied_through_all(n);
        }
        pending.absorb(rows, step_no);
        inflight = Some((prepared, step_no));
        if (step_no as usize) < s.schedule.len() && s.crashes.contains(&(step_no as usize)) {
            // The batch in flight is lost with the process.
            inflight = None;
            drop(store);
            store = open()?;
            pending = Pending::default();
            cursors = streams
                .iter()
                .map(|st| store.next_offset(view, st).unwrap_or(0))
                .collect();
        }
    }
    if let Some((write, _)) = inflight.take() {
        write.write().map_err(fail)?;
    }
    verify(&store, s)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn any_delivery_and_crash_schedule_gives_the_reference_replica(s in scenario()) {
        run(&s)?;
    }

    #[test]
    fn a_pipelined_writer_gives_the_reference_replica(s in scenario()) {
        run_pipelined(&s)?;
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
    let scenario = Scenario {
        connector: Connector::MySql,
        deletes: Deletes::EventAndTombstone,
        snapshot: vec![(0, 1), (5, 2)],
        history,
        resends: vec![],
        redeliveries: vec![],
        partitions: 1,
        schedule: vec![],
        crashes: vec![],
    };
    let records = topic(&scenario).remove(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let views = vec!["v".to_string()];
    let mut store = Store::open(&StoreConfig::new(dir.path()), &views).expect("open");
    let view = store.view_id("v").expect("view");
    let apply_all = |store: &mut Store, stream: &str| {
        let mut txn = store.begin(0);
        for (i, r) in records.iter().enumerate() {
            replica::apply(
                &mut txn,
                view,
                &event(&scenario, *r),
                &Position::new(stream, i as u64),
            )
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

/// The cluster path: an owner decides on its committed state overlaid with
/// what it has logged but not yet applied back (`Pending`), records the
/// effects instead of committing them, and appends them to a log; every node
/// (the owner included, lagging behind) applies the log. The result must be
/// the reference replica, and every node's change stream must be identical,
/// sequence numbers included, and consistent.
fn run_logged(s: &Scenario) -> Result<(), TestCaseError> {
    use ndc_operators::{Pending, Replayed};
    use ndc_proto::state::LogRecord;
    use std::sync::Arc;

    let fail = |e: ndc_operators::StoreError| TestCaseError::fail(e.to_string());
    let open = |dir: &std::path::Path| {
        let mut config = StoreConfig::new(dir);
        config.sync_commits = false;
        config.block_cache_bytes = 1 << 20;
        config.write_buffer_bytes = 4 << 20;
        Store::open(&config, &["v".to_string()]).map_err(|e| TestCaseError::fail(e.to_string()))
    };
    let owner_dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let other_dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut owner = open(owner_dir.path())?;
    let mut other = open(other_dir.path())?;
    let view = owner
        .view_id("v")
        .ok_or_else(|| TestCaseError::fail("view"))?;
    let log_stream: Arc<str> = "log:ndc.changes.v:0".into();
    let parts = topic(s);
    let streams: Vec<String> = (0..parts.len()).map(|p| format!("kafka:t:{p}")).collect();
    let mut log: Vec<LogRecord> = Vec::new();
    let mut pending = Pending::default();
    let mut cursors = vec![0u64; parts.len()];

    let catch_up =
        |store: &mut Store, log: &[LogRecord], upto: usize| -> Result<(), TestCaseError> {
            let mut txn = store.begin(0);
            for (offset, record) in log.iter().enumerate().take(upto) {
                let r = txn
                    .replay(view, record, &log_stream, offset as u64)
                    .map_err(fail)?;
                prop_assert!(r != Replayed::Fenced, "no owner change in this scenario");
            }
            txn.commit().map_err(fail)?;
            Ok(())
        };

    let mut schedule = s.schedule.clone();
    for p in 0..parts.len() {
        schedule.push((p, usize::MAX));
    }
    for (step_no, (p, count)) in schedule.iter().enumerate() {
        let mut effects = Vec::new();
        let mut next = None;
        {
            let mut txn = owner.begin_logged(0, &pending);
            let mut read = 0;
            while read < *count && (cursors[*p] as usize) < parts[*p].len() {
                let offset = cursors[*p];
                let record = parts[*p][offset as usize];
                let pos = Position::new(streams[*p].as_str(), offset);
                replica::apply(&mut txn, view, &event(s, record), &pos).map_err(fail)?;
                effects.extend(txn.take_effects(view).into_iter().map(|(_, e)| e));
                cursors[*p] += 1;
                next = Some(cursors[*p]);
                read += 1;
            }
            // Dropped: nothing committed on the owner by deciding.
        }
        if let Some(next) = next {
            let offset = log.len() as u64;
            pending.record(view, effects.iter().map(|e| (view, e)), offset);
            log.push(LogRecord {
                view: "v".into(),
                epoch: 1,
                partition: format!("v/t/{p}"),
                source_stream: streams[*p].clone(),
                source_next_offset: next,
                fence: false,
                effects,
            });
        }
        // The owner applies the log back, lagging by 0–2 records.
        let upto = log.len().saturating_sub(step_no % 3);
        catch_up(&mut owner, &log, upto)?;
        if upto > 0 {
            pending.applied_through(view, upto as u64 - 1);
        }
        // A crash of the owner: pending effects are lost; on restart it first
        // applies the whole log, then resumes each source from the stored
        // offsets.
        if step_no < s.schedule.len() && s.crashes.contains(&step_no) {
            drop(owner);
            owner = open(owner_dir.path())?;
            pending = Pending::default();
            catch_up(&mut owner, &log, log.len())?;
            cursors = streams
                .iter()
                .map(|st| owner.next_offset(view, st).unwrap_or(0))
                .collect();
        }
    }
    catch_up(&mut owner, &log, log.len())?;
    catch_up(&mut other, &log, log.len())?;

    // Both nodes hold the reference replica and a consistent change stream,
    // and they agree on it, sequence numbers included.
    verify(&owner, s)?;
    verify(&other, s)?;
    let owner_changes = owner
        .reader()
        .changes_after("v", 0, usize::MAX)
        .map_err(fail)?;
    let other_changes = other
        .reader()
        .changes_after("v", 0, usize::MAX)
        .map_err(fail)?;
    prop_assert_eq!(
        &owner_changes,
        &other_changes,
        "nodes disagree on the change stream"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn the_cluster_log_gives_every_node_the_reference_replica_and_one_change_stream(s in scenario()) {
        run_logged(&s)?;
    }
}

/// A store (unsynced) holding one view, `v`.
#[allow(clippy::unwrap_used)]
fn store_of_one_view(dir: &std::path::Path) -> (Store, ndc_operators::ViewId) {
    let mut config = StoreConfig::new(dir);
    config.sync_commits = false;
    let store = Store::open(&config, &["v".to_string()]).unwrap();
    let view = store.view_id("v").unwrap();
    (store, view)
}

#[test]
fn records_of_a_fenced_owner_are_ignored_by_every_node() {
    use ndc_operators::Replayed;
    use ndc_proto::state::LogRecord;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let (mut store, view) = store_of_one_view(dir.path());
    let log: Arc<str> = "log:x:0".into();
    let record = |epoch: u64, fence: bool, next: u64| LogRecord {
        view: "v".into(),
        epoch,
        partition: "v/t/0".into(),
        source_stream: "kafka:t:0".into(),
        source_next_offset: next,
        fence,
        effects: vec![],
    };
    let mut txn = store.begin(0);
    assert_eq!(
        txn.replay(view, &record(3, false, 10), &log, 0).unwrap(),
        Replayed::Applied
    );
    assert_eq!(
        txn.replay(view, &record(5, true, 0), &log, 1).unwrap(),
        Replayed::Fence
    );
    // The old owner (epoch 3) wrote after the new owner's fence: ignored.
    assert_eq!(
        txn.replay(view, &record(3, false, 20), &log, 2).unwrap(),
        Replayed::Fenced
    );
    assert_eq!(
        txn.replay(view, &record(5, false, 12), &log, 3).unwrap(),
        Replayed::Applied
    );
    // Read again after a restart: already applied.
    assert_eq!(
        txn.replay(view, &record(5, false, 12), &log, 3).unwrap(),
        Replayed::AlreadyApplied
    );
    txn.commit().unwrap();
    assert_eq!(store.next_offset(view, "kafka:t:0"), Some(12));
    assert_eq!(store.next_offset(view, "log:x:0"), Some(4));
}

/// A log record may carry effects on a view this node does not hold (another
/// node runs a newer pipeline): those are skipped and named, the rest is
/// applied and the log position advances, so the record is not met again.
#[test]
fn effects_on_a_view_this_node_does_not_hold_are_skipped_not_fatal() {
    use ndc_operators::Replayed;
    use ndc_proto::state::{Effect, LogRecord, StoredRow, effect};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let (mut store, view) = store_of_one_view(dir.path());
    let log: Arc<str> = "log:x:0".into();
    let put = |view: &str, key: &str| Effect {
        key: key.as_bytes().to_vec(),
        view: view.into(),
        kind: Some(effect::Kind::Put(StoredRow {
            version: None,
            deleted: false,
            row_json: "{}".into(),
            unapplied: None,
        })),
        ..Effect::default()
    };
    let record = LogRecord {
        view: "v".into(),
        epoch: 1,
        partition: "v/t/0".into(),
        source_stream: "kafka:t:0".into(),
        source_next_offset: 7,
        fence: false,
        effects: vec![put("", "a"), put("golden_v9", "b"), put("golden_v9", "c")],
    };
    let mut txn = store.begin(0);
    assert_eq!(
        txn.replay(view, &record, &log, 0).unwrap(),
        Replayed::PartlyApplied {
            unknown_views: vec!["golden_v9".into()]
        }
    );
    assert_eq!(
        txn.replay(view, &record, &log, 0).unwrap(),
        Replayed::AlreadyApplied
    );
    txn.commit().unwrap();
    assert_eq!(store.next_offset(view, "log:x:0"), Some(1));
    assert_eq!(store.next_offset(view, "kafka:t:0"), Some(7));
    assert_eq!(store.meta(view).map(|m| m.live_rows), Some(1));
}
