//! What a shard's records showed of where its keys sit, against a reference
//! model, on a real RocksDB store — applied directly (a single node) and
//! through the change log (a cluster owner deciding, with its records
//! applied back late, and a standby applying them), in batches of any size.
//!
//! Every node must end with the same `key_placement` as the model: none
//! before a keyed record, the partition count while every keyed record sat
//! where Kafka's default partitioner puts its key, and broken (for good)
//! from the first that did not or that came with another partition count.
//! A wrong answer here would send a keyed subscription to a shard that does
//! not hold its key.

use ndc_operators::shard::{KeyPlacement, kafka_partition};
use ndc_operators::{Key, Outcome, Pending, Position, Store, StoreConfig, ViewId};
use ndc_proto::state::LogRecord;
use proptest::prelude::*;
use std::sync::Arc;

/// One keyed record: its key, the partition count of its topic, and
/// whether the producer put it where murmur2 says (else one partition on).
#[derive(Debug, Clone)]
struct Sent {
    key: u16,
    partitions: u32,
    in_place: bool,
}

fn key_of(k: u16) -> Key {
    Key::parse(&format!("{{\"id\":{k}}}")).expect("a valid key")
}

fn partition_of(s: &Sent) -> i32 {
    let right = kafka_partition(key_of(s.key).as_bytes(), s.partitions);
    let p = if s.in_place {
        right
    } else {
        (right + 1) % s.partitions
    };
    i32::try_from(p).expect("small")
}

fn sent() -> impl Strategy<Value = Sent> {
    // Mostly in place over 4 partitions: a feed that stays routable for a
    // while, then (sometimes) does not.
    (
        any::<u16>(),
        prop_oneof![20 => Just(4u32), 1 => Just(3u32)],
        prop_oneof![30 => Just(true), 1 => Just(false)],
    )
        .prop_map(|(key, partitions, in_place)| Sent {
            key,
            partitions,
            in_place,
        })
}

/// The model: what the records showed, in order.
fn reference(records: &[Sent]) -> Option<KeyPlacement> {
    let first = records.first()?;
    let broken = records
        .iter()
        .any(|s| !s.in_place || s.partitions != first.partitions);
    Some(KeyPlacement {
        partitions: first.partitions,
        broken,
    })
}

fn open(dir: &std::path::Path) -> (Store, ViewId) {
    let mut config = StoreConfig::new(dir);
    config.sync_commits = false;
    config.block_cache_bytes = 1 << 20;
    config.write_buffer_bytes = 4 << 20;
    let store = Store::open(&config, &["v".to_string()]).expect("store");
    let view = store.view_id("v").expect("view");
    (store, view)
}

fn placement(store: &Store) -> Option<KeyPlacement> {
    store.reader().view_meta("v").expect("meta").key_placement
}

const STREAM: &str = "kafka:t:0";

/// Runs records `from..to` through `txn` as the writer does (the check,
/// then the record counted as consumed), calling `each` after each.
fn check(
    txn: &mut ndc_operators::Txn<'_>,
    view: ViewId,
    records: &[Sent],
    (from, to): (usize, usize),
    mut each: impl FnMut(&mut ndc_operators::Txn<'_>),
) {
    for (offset, s) in records.iter().enumerate().take(to).skip(from) {
        txn.check_key_placement(view, &key_of(s.key), partition_of(s), s.partitions)
            .expect("check");
        let pos = Position::new(STREAM, offset as u64);
        txn.skip(view, &pos, Outcome::Skipped);
        each(txn);
    }
}

/// Applies records `from..to` in one transaction, as a single node does.
fn apply_direct(store: &mut Store, view: ViewId, records: &[Sent], from: usize, to: usize) {
    let mut txn = store.begin(0);
    check(&mut txn, view, records, (from, to), |_| {});
    txn.commit().expect("commit");
}

fn run(records: &[Sent], batches: &[usize], lag: usize) -> Result<(), TestCaseError> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let (mut single, view) = open(dirs[0].path());
    let (mut owner, _) = open(dirs[1].path());
    let (mut standby, _) = open(dirs[2].path());
    let log_stream: Arc<str> = "log:ndc.changes.v:0".into();
    let mut log: Vec<LogRecord> = Vec::new();
    let mut pending = Pending::default();
    let mut applied_back = 0usize;
    let catch_up = |store: &mut Store, log: &[LogRecord], from: usize, to: usize| {
        let mut txn = store.begin(0);
        for (offset, record) in log.iter().enumerate().take(to).skip(from) {
            txn.replay(view, record, &log_stream, offset as u64)
                .expect("replay");
        }
        txn.commit().expect("commit");
    };

    let mut at = 0usize;
    let mut sizes = batches.iter().cycle();
    while at < records.len() {
        let size = (*sizes.next().unwrap_or(&1)).max(1);
        let end = (at + size).min(records.len());
        apply_direct(&mut single, view, records, at, end);
        // The owner decides the batch over what it has applied back and
        // what it logged since (its metadata may be behind: a change of
        // placement may be logged twice, never not at all).
        let mut effects = Vec::new();
        {
            let mut txn = owner.begin_logged(0, &pending);
            check(&mut txn, view, records, (at, end), |txn| {
                effects.extend(txn.take_effects(view).into_iter().map(|(_, e)| e));
            });
        }
        let offset = log.len() as u64;
        pending.record(view, effects.iter().map(|e| (view, e)), offset);
        log.push(LogRecord {
            view: "v".into(),
            epoch: 1,
            partition: "v/t/0".into(),
            source_stream: STREAM.into(),
            source_next_offset: end as u64,
            fence: false,
            effects,
        });
        let upto = log.len().saturating_sub(lag);
        catch_up(&mut owner, &log, applied_back, upto);
        if upto > applied_back {
            pending.applied_through(view, upto as u64 - 1);
            applied_back = upto;
        }
        // What every node shows at this point equals the model of what it
        // has applied.
        prop_assert_eq!(placement(&single), reference(&records[..end]));
        prop_assert_eq!(
            placement(&owner),
            reference(&records[..applied_records(&log, upto)])
        );
        at = end;
    }
    catch_up(&mut owner, &log, applied_back, log.len());
    catch_up(&mut standby, &log, 0, log.len());
    let want = reference(records);
    prop_assert_eq!(placement(&single), want);
    prop_assert_eq!(placement(&owner), want);
    prop_assert_eq!(placement(&standby), want);
    // Broken is for good: a store opened again keeps it.
    drop(standby);
    let (standby, _) = open(dirs[2].path());
    prop_assert_eq!(placement(&standby), want);
    Ok(())
}

/// Records the first `upto` log records carry.
fn applied_records(log: &[LogRecord], upto: usize) -> usize {
    log.iter()
        .take(upto)
        .map(|r| r.source_next_offset as usize)
        .max()
        .unwrap_or(0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_node_keeps_what_the_records_showed_of_their_keys_placement(
        records in prop::collection::vec(sent(), 0..120),
        batches in prop::collection::vec(1usize..20, 1..6),
        lag in 0usize..3,
    ) {
        run(&records, &batches, lag)?;
    }
}

#[test]
fn a_feed_keyed_by_canonical_json_with_kafkas_partitioner_is_routable_and_one_record_out_of_place_ends_it()
 {
    let in_place = |key| Sent {
        key,
        partitions: 4,
        in_place: true,
    };
    let mut records: Vec<Sent> = (0..50).map(in_place).collect();
    let dir = tempfile::tempdir().expect("dir");
    let (mut store, view) = open(dir.path());
    apply_direct(&mut store, view, &records, 0, records.len());
    assert_eq!(
        placement(&store),
        Some(KeyPlacement {
            partitions: 4,
            broken: false
        })
    );
    records.push(Sent {
        key: 7,
        partitions: 4,
        in_place: false,
    });
    records.extend((50..60).map(in_place));
    apply_direct(&mut store, view, &records, 50, records.len());
    assert_eq!(
        placement(&store),
        Some(KeyPlacement {
            partitions: 4,
            broken: true
        })
    );
}
