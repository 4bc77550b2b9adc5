//! The synchronized-replica operator: keeps the latest row per primary key
//! and turns the agency's change events into a clean change stream.
//!
//! An event replaces the stored row only if it is newer by
//! [`crate::ordering`]: its position in the source database's log, per
//! connector. Equal versions are duplicates; older ones are stale. Both are
//! counted and dropped, which makes any replay of any prefix of a feed leave
//! the same state. A tombstone has no position of its own: it deletes the
//! row written by the event before it in its stream.

use crate::debezium::{ChangeEvent, ChangeOp};
pub use crate::ordering::{Basis, compare_versions};
use crate::store::{StoreError, Txn, ViewId, source_position};
use ndc_proto::state::{RowVersion, StoredRow, effect};
use ndc_proto::v1::Change;
use ndc_proto::v1::Op;
use std::cmp::Ordering;

/// Where a record sits in its feed: `kafka:<topic>:<partition>` or
/// `file:<path>`, and the offset (Kafka offset, or line number).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub stream: std::sync::Arc<str>,
    pub offset: u64,
}

impl Position {
    pub fn new(stream: impl Into<std::sync::Arc<str>>, offset: u64) -> Self {
        Position {
            stream: stream.into(),
            offset,
        }
    }
}

/// What happened to one record. The string form labels metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Inserted,
    Updated,
    Deleted,
    Truncated,
    /// Newer version with identical content: version advanced, no change emitted.
    Unchanged,
    /// Same version as stored: a redelivery.
    Duplicate,
    /// Older than what is stored.
    Stale,
    /// Offset below the stream's stored position: applied before a restart.
    AlreadyApplied,
    /// Not table data (tombstone after delete, heartbeat, transaction marker, message).
    Skipped,
    /// Rejected and sent to the dead-letter sink.
    DeadLettered,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Inserted => "inserted",
            Outcome::Updated => "updated",
            Outcome::Deleted => "deleted",
            Outcome::Truncated => "truncated",
            Outcome::Unchanged => "unchanged",
            Outcome::Duplicate => "duplicate",
            Outcome::Stale => "stale",
            Outcome::AlreadyApplied => "already_applied",
            Outcome::Skipped => "skipped",
            Outcome::DeadLettered => "dead_lettered",
        }
    }
}

/// Applies one change event read at `pos` to `view` in `txn`: the
/// replica operator, over the transaction's rows, offsets and change stream.
pub fn apply(
    txn: &mut Txn<'_>,
    view: ViewId,
    event: &ChangeEvent,
    pos: &Position,
) -> Result<Outcome, StoreError> {
    if event.op == ChangeOp::Truncate {
        if txn.is_applied(view, pos) {
            return Ok(Outcome::AlreadyApplied);
        }
        txn.advance(view, pos);
        return truncate(txn, view, event, pos);
    }
    apply_from(txn, view, event, pos, pos)
}

/// Applies a keyed event consumed at `consumed` whose version is that of
/// `origin`, where it was first read. Facts re-keyed through a
/// repartition topic keep their agency feed's version, so a replay of the
/// feed, re-published at new offsets, is still recognised as a duplicate.
pub fn apply_from(
    txn: &mut Txn<'_>,
    view: ViewId,
    event: &ChangeEvent,
    consumed: &Position,
    origin: &Position,
) -> Result<Outcome, StoreError> {
    if txn.is_applied(view, consumed) {
        return Ok(Outcome::AlreadyApplied);
    }
    txn.advance(view, consumed);
    let Some(key) = &event.key else {
        return Ok(Outcome::Skipped);
    };
    let truncated_at = txn.meta_mut(view)?.truncated_at.clone();
    let (decision, basis) = decide(
        txn.current_row(view, key.as_bytes())?.as_ref().as_ref(),
        truncated_at.as_ref(),
        event,
        version_of(event, origin),
    );
    if let Some(basis) = basis.filter(|b| b.is_fallback()) {
        txn.count_fallback(view, event.source.connector_label(), basis);
    }
    match decision {
        Decision::Skip(outcome) => Ok(outcome),
        Decision::Write {
            row,
            op,
            before_json,
            after_json,
            live_delta,
            outcome,
        } => {
            txn.put_row(view, key.as_bytes(), row);
            let meta = txn.meta_mut(view)?;
            meta.live_rows = meta.live_rows.saturating_add_signed(live_delta);
            if let Some(op) = op {
                let change = Change {
                    seq: 0,
                    op: op as i32,
                    key_json: key.as_str().to_string(),
                    before_json,
                    after_json,
                    source: Some(source_position(&event.source, origin)),
                    committed_at_ms: txn.now_ms(),
                    shard: 0,
                };
                txn.append_change(view, change)?;
            }
            Ok(outcome)
        }
    }
}

/// Removes every row older than the truncate. Emits one TRUNCATE change
/// when no live row survives (the usual case), else a DELETE per removed
/// row so subscribers keep the rows written after the truncate.
fn truncate(
    txn: &mut Txn<'_>,
    view: ViewId,
    event: &ChangeEvent,
    pos: &Position,
) -> Result<Outcome, StoreError> {
    let version = version_of(event, pos);
    if let Some(prev) = &txn.meta_mut(view)?.truncated_at
        && compare_versions(&version, prev).0 != Ordering::Greater
    {
        return Ok(Outcome::Stale);
    }
    let rows = txn.rows_with_prefix(view, &[])?;
    let mut removed = Vec::new();
    let mut survivors = 0u64;
    for (key, row) in rows {
        let older = row
            .version
            .as_ref()
            .is_none_or(|rv| compare_versions(&version, rv).0 == Ordering::Greater);
        if older {
            if !row.deleted {
                removed.push((key.clone(), row.row_json.clone()));
            }
            txn.remove_row(view, &key);
        } else if !row.deleted {
            survivors += 1;
        }
    }
    txn.record(view, &[], || effect::Kind::Truncate(version.clone()));
    {
        let meta = txn.meta_mut(view)?;
        meta.truncated_at = Some(version);
        meta.live_rows = survivors;
    }
    let source = source_position(&event.source, pos);
    if survivors == 0 && !txn.truncates_row_by_row(view) {
        txn.append_change(
            view,
            Change {
                seq: 0,
                op: Op::Truncate as i32,
                key_json: String::new(),
                before_json: None,
                after_json: None,
                source: Some(source),
                committed_at_ms: txn.now_ms(),
                shard: 0,
            },
        )?;
    } else {
        for (key, before) in removed {
            txn.append_change(
                view,
                Change {
                    seq: 0,
                    op: Op::Delete as i32,
                    key_json: String::from_utf8_lossy(&key).into_owned(),
                    before_json: Some(before),
                    after_json: None,
                    source: Some(source.clone()),
                    committed_at_ms: txn.now_ms(),
                    shard: 0,
                },
            )?;
        }
    }
    Ok(Outcome::Truncated)
}

/// Version of an event at a position.
pub fn version_of(event: &ChangeEvent, pos: &Position) -> RowVersion {
    RowVersion {
        lsn: event.source.lsn,
        source_ts_ms: event.source.ts_ms,
        stream: String::from(&*pos.stream),
        offset: pos.offset,
        position: event.source.position.clone(),
        snapshot: event.op == ChangeOp::Read,
        after: false,
    }
}

/// The effect of one keyed event on the stored row.
// Not boxed: a decision is made and consumed once per event, and a box
// would cost an allocation per event on the hot path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Store `row`; emit a change unless `op` is `None` (unchanged content).
    Write {
        row: StoredRow,
        op: Option<Op>,
        before_json: Option<String>,
        after_json: Option<String>,
        /// +1 when a live row appears, -1 when one disappears.
        live_delta: i64,
        outcome: Outcome,
    },
    Skip(Outcome),
}

/// Decides what a keyed event (create, read, update or delete) does, given
/// the stored row and the view's last truncate; with what ordered it, when
/// it was compared with a stored version.
pub fn decide(
    current: Option<&StoredRow>,
    truncated_at: Option<&RowVersion>,
    event: &ChangeEvent,
    version: RowVersion,
) -> (Decision, Option<Basis>) {
    if event.source.tombstone {
        return decide_tombstone(current, version);
    }
    let baseline = current.and_then(|r| r.version.as_ref()).or(truncated_at);
    let Some(old) = baseline else {
        return (decide_newer(current, event, version), None);
    };
    let (order, basis) = compare_versions(&version, old);
    // A stale event is remembered on the row: a tombstone right after it in
    // its stream deletes what it wrote, not the stored row. So is a duplicate
    // that is newer in its stream than what the row remembers (the tombstone
    // after it deletes the stored row, which it repeats).
    let (outcome, remember) = match order {
        Ordering::Less => (Outcome::Stale, true),
        Ordering::Equal => (
            Outcome::Duplicate,
            current.is_some_and(|row| {
                row.unapplied.is_some()
                    || row
                        .version
                        .as_ref()
                        .is_some_and(|v| v.stream != version.stream)
            }),
        ),
        Ordering::Greater => return (decide_newer(current, event, version), Some(basis)),
    };
    let decision = match current {
        Some(row) if remember => Decision::Write {
            row: StoredRow {
                unapplied: Some(version),
                ..row.clone()
            },
            op: None,
            before_json: None,
            after_json: None,
            live_delta: 0,
            outcome,
        },
        _ => Decision::Skip(outcome),
    };
    (decision, Some(basis))
}

/// A tombstone (no position of its own, `version` only says where in its
/// stream it is): it deletes the live row if the event before it in its
/// stream is the one that wrote that row (or one at the same position); it is
/// stale if that event was stale. When the row came from another stream,
/// nothing tells: the later arrival wins, counted as a fallback.
fn decide_tombstone(current: Option<&StoredRow>, version: RowVersion) -> (Decision, Option<Basis>) {
    let Some(row) = current.filter(|r| !r.deleted) else {
        return (Decision::Skip(Outcome::Skipped), None);
    };
    let stored = row.version.as_ref();
    let before_in_stream = [row.unapplied.as_ref(), stored]
        .into_iter()
        .flatten()
        .filter(|v| v.stream == version.stream && v.offset < version.offset)
        .max_by_key(|v| v.offset);
    let follows = |v: &RowVersion| RowVersion {
        stream: version.stream.clone(),
        offset: version.offset,
        after: true,
        ..v.clone()
    };
    let (deleted_at, basis) = match (before_in_stream, stored) {
        (Some(previous), Some(stored)) => {
            let at = follows(previous);
            let (order, by) = compare_versions(&at, stored);
            if order != Ordering::Greater {
                return (Decision::Skip(Outcome::Stale), Some(by));
            }
            (at, Some(by))
        }
        (_, stored) => (
            stored.map_or_else(|| version.clone(), follows),
            Some(Basis::NoPosition),
        ),
    };
    let decision = Decision::Write {
        row: StoredRow {
            version: Some(deleted_at),
            deleted: true,
            row_json: String::new(),
            unapplied: None,
        },
        op: Some(Op::Delete),
        before_json: Some(row.row_json.clone()),
        after_json: None,
        live_delta: -1,
        outcome: Outcome::Deleted,
    };
    (decision, basis)
}

/// What an event newer than the stored row does.
fn decide_newer(current: Option<&StoredRow>, event: &ChangeEvent, version: RowVersion) -> Decision {
    let live_before = current.filter(|r| !r.deleted).map(|r| r.row_json.clone());
    match event.op {
        ChangeOp::Delete => {
            let tombstone = StoredRow {
                version: Some(version),
                deleted: true,
                row_json: String::new(),
                unapplied: None,
            };
            match live_before {
                Some(before) => Decision::Write {
                    row: tombstone,
                    op: Some(Op::Delete),
                    before_json: Some(before),
                    after_json: None,
                    live_delta: -1,
                    outcome: Outcome::Deleted,
                },
                None => Decision::Write {
                    row: tombstone,
                    op: None,
                    before_json: None,
                    after_json: None,
                    live_delta: 0,
                    outcome: Outcome::Unchanged,
                },
            }
        }
        ChangeOp::Create | ChangeOp::Read | ChangeOp::Update => {
            let Some(after) = event.after.as_ref().map(|r| r.as_str().to_string()) else {
                return Decision::Skip(Outcome::Skipped);
            };
            let row = StoredRow {
                version: Some(version),
                deleted: false,
                row_json: after.clone(),
                unapplied: None,
            };
            match live_before {
                Some(before) if before == after => Decision::Write {
                    row,
                    op: None,
                    before_json: None,
                    after_json: None,
                    live_delta: 0,
                    outcome: Outcome::Unchanged,
                },
                Some(before) => Decision::Write {
                    row,
                    op: Some(Op::Update),
                    before_json: Some(before),
                    after_json: Some(after),
                    live_delta: 0,
                    outcome: Outcome::Updated,
                },
                None => Decision::Write {
                    row,
                    op: Some(Op::Insert),
                    before_json: None,
                    after_json: Some(after),
                    live_delta: 1,
                    outcome: Outcome::Inserted,
                },
            }
        }
        ChangeOp::Truncate => Decision::Skip(Outcome::Skipped),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::debezium::{Key, Row, SourceInfo};
    use ndc_proto::v1::log_position::Kind;
    use ndc_proto::v1::{LogPosition, PostgresPosition};

    fn pg(lsn: u64) -> SourceInfo {
        SourceInfo {
            connector: "postgresql".into(),
            lsn: Some(lsn),
            ts_ms: 1,
            position: Some(LogPosition {
                kind: Some(Kind::Postgres(PostgresPosition {
                    last_commit_lsn: None,
                    lsn,
                })),
            }),
            ..SourceInfo::default()
        }
    }

    fn upsert(source: SourceInfo, value: u32) -> ChangeEvent {
        let mut row = serde_json::Map::new();
        row.insert("id".into(), 1.into());
        row.insert("v".into(), value.into());
        ChangeEvent {
            op: ChangeOp::Update,
            key: Some(Key::from_value(&serde_json::json!({"id": 1}))),
            before: None,
            after: Some(Row::from_map(&row)),
            source,
            processed_ts_ms: None,
        }
    }

    fn tombstone() -> ChangeEvent {
        ChangeEvent::tombstone(Key::from_value(&serde_json::json!({"id": 1})))
    }

    /// Applies `events` (each at its offset in `stream`) and returns the
    /// stored row and the outcomes.
    fn run(events: &[(&str, u64, ChangeEvent)]) -> (Option<StoredRow>, Vec<Outcome>) {
        let mut row: Option<StoredRow> = None;
        let mut outcomes = Vec::new();
        for (stream, offset, event) in events {
            let version = version_of(event, &Position::new(*stream, *offset));
            let (decision, _) = decide(row.as_ref(), None, event, version);
            match decision {
                Decision::Write {
                    row: new, outcome, ..
                } => {
                    row = Some(new);
                    outcomes.push(outcome);
                }
                Decision::Skip(outcome) => outcomes.push(outcome),
            }
        }
        (row, outcomes)
    }

    #[test]
    fn a_tombstone_deletes_the_row_the_event_before_it_wrote() {
        let (row, outcomes) = run(&[("s", 0, upsert(pg(10), 1)), ("s", 1, tombstone())]);
        assert!(row.expect("row").deleted);
        assert_eq!(outcomes, [Outcome::Inserted, Outcome::Deleted]);
    }

    #[test]
    fn a_redelivered_row_and_its_tombstone_change_nothing() {
        // v1 at 10, v2 at 20 (stored); then v1 and the tombstone after it
        // are delivered again: v1 is stale, so the tombstone is too.
        let (row, outcomes) = run(&[
            ("s", 0, upsert(pg(10), 1)),
            ("s", 1, upsert(pg(20), 2)),
            ("s", 2, upsert(pg(10), 1)),
            ("s", 3, tombstone()),
        ]);
        let row = row.expect("row");
        assert!(!row.deleted);
        assert!(row.row_json.contains("\"v\":2"), "{row:?}");
        assert_eq!(
            outcomes,
            [
                Outcome::Inserted,
                Outcome::Updated,
                Outcome::Stale,
                Outcome::Stale
            ]
        );
    }

    #[test]
    fn a_redelivered_row_and_its_tombstone_end_deleted_and_a_new_insert_wins() {
        let (row, outcomes) = run(&[
            ("s", 0, upsert(pg(10), 1)),
            ("s", 1, tombstone()),
            ("s", 2, upsert(pg(10), 1)),
            ("s", 3, tombstone()),
        ]);
        assert!(row.expect("row").deleted);
        assert_eq!(
            outcomes,
            [
                Outcome::Inserted,
                Outcome::Deleted,
                Outcome::Inserted,
                Outcome::Deleted
            ]
        );
        let (row, _) = run(&[
            ("s", 0, upsert(pg(10), 1)),
            ("s", 1, tombstone()),
            ("s", 2, upsert(pg(30), 3)),
        ]);
        assert!(!row.expect("row").deleted);
    }

    #[test]
    fn a_tombstone_redelivered_without_its_row_is_undone_by_the_row_after_it() {
        // v1, its tombstone, v2; the connector restarts after v1 and sends
        // the tombstone and v2 again: the tombstone alone deletes v2, whose
        // own redelivery right after restores it.
        let (row, outcomes) = run(&[
            ("s", 0, upsert(pg(10), 1)),
            ("s", 1, tombstone()),
            ("s", 2, upsert(pg(20), 2)),
            ("s", 3, tombstone()),
            ("s", 4, upsert(pg(20), 2)),
        ]);
        let row = row.expect("row");
        assert!(!row.deleted && row.row_json.contains("\"v\":2"), "{row:?}");
        assert_eq!(outcomes[3], Outcome::Deleted);
        assert_eq!(outcomes[4], Outcome::Inserted);
    }

    #[test]
    fn a_tombstone_for_a_row_of_another_stream_deletes_it_as_a_counted_fallback() {
        let v = upsert(pg(10), 1);
        let first = version_of(&v, &Position::new("file:x", 0));
        let (Decision::Write { row, .. }, _) = decide(None, None, &v, first) else {
            panic!("insert");
        };
        let t = tombstone();
        let at = version_of(&t, &Position::new("kafka:t:0", 5));
        let (decision, basis) = decide(Some(&row), None, &t, at);
        assert!(matches!(
            decision,
            Decision::Write {
                outcome: Outcome::Deleted,
                ..
            }
        ));
        assert_eq!(basis, Some(Basis::NoPosition));
    }
}
