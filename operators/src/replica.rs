//! The synchronized-replica operator: keeps the latest row per primary key
//! and turns the agency's change events into a clean change stream.
//!
//! Ordering rule, applied per key: an event replaces the stored row only if
//! it is newer. Newer means a higher LSN when both sides carry one; else a
//! later source commit time; at equal commit time, a later offset in the same
//! feed stream. Equal versions are duplicates; older ones are stale. Both are
//! counted and dropped, which makes any replay of any prefix of a feed leave
//! the same state.

use crate::debezium::{ChangeEvent, ChangeOp};
use ndc_proto::state::{RowVersion, StoredRow};
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

/// Version of an event at a position.
pub fn version_of(event: &ChangeEvent, pos: &Position) -> RowVersion {
    RowVersion {
        lsn: event.source.lsn,
        source_ts_ms: event.source.ts_ms,
        stream: String::from(&*pos.stream),
        offset: pos.offset,
    }
}

/// How `new` compares with `old` under the ordering rule of this module.
pub fn compare_versions(new: &RowVersion, old: &RowVersion) -> Ordering {
    if let (Some(a), Some(b)) = (new.lsn, old.lsn) {
        return a.cmp(&b);
    }
    match new.source_ts_ms.cmp(&old.source_ts_ms) {
        Ordering::Equal if new.stream == old.stream => new.offset.cmp(&old.offset),
        // Different feeds at the same instant: the later arrival wins.
        Ordering::Equal => Ordering::Greater,
        other => other,
    }
}

/// The effect of one keyed event on the stored row.
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
/// the stored row and the view's last truncate.
pub fn decide(
    current: Option<&StoredRow>,
    truncated_at: Option<&RowVersion>,
    event: &ChangeEvent,
    version: RowVersion,
) -> Decision {
    let baseline = current.and_then(|r| r.version.as_ref()).or(truncated_at);
    if let Some(old) = baseline {
        match compare_versions(&version, old) {
            Ordering::Less => return Decision::Skip(Outcome::Stale),
            Ordering::Equal => return Decision::Skip(Outcome::Duplicate),
            Ordering::Greater => {}
        }
    }
    let live_before = current.filter(|r| !r.deleted).map(|r| r.row_json.clone());
    match event.op {
        ChangeOp::Delete => {
            let tombstone = StoredRow {
                version: Some(version),
                deleted: true,
                row_json: String::new(),
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

    fn v(lsn: Option<u64>, ts: i64, stream: &str, offset: u64) -> RowVersion {
        RowVersion {
            lsn,
            source_ts_ms: ts,
            stream: stream.into(),
            offset,
        }
    }

    #[test]
    fn lsn_decides_when_both_have_one() {
        assert_eq!(
            compare_versions(&v(Some(10), 1, "a", 1), &v(Some(9), 5, "a", 9)),
            Ordering::Greater
        );
        assert_eq!(
            compare_versions(&v(Some(9), 9, "b", 9), &v(Some(9), 1, "a", 1)),
            Ordering::Equal
        );
    }

    #[test]
    fn falls_back_to_commit_time_then_offset() {
        assert_eq!(
            compare_versions(&v(None, 2, "a", 1), &v(Some(9), 1, "a", 9)),
            Ordering::Greater
        );
        assert_eq!(
            compare_versions(&v(None, 1, "a", 1), &v(None, 2, "a", 0)),
            Ordering::Less
        );
        assert_eq!(
            compare_versions(&v(None, 1, "a", 5), &v(None, 1, "a", 4)),
            Ordering::Greater
        );
        assert_eq!(
            compare_versions(&v(None, 1, "a", 4), &v(None, 1, "a", 4)),
            Ordering::Equal
        );
        assert_eq!(
            compare_versions(&v(None, 1, "b", 0), &v(None, 1, "a", 4)),
            Ordering::Greater
        );
    }
}
