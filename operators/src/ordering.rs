//! Which of two events of one key is newer: the position of each in its
//! source database's log, per Debezium connector.
//!
//! A Debezium `source` block says where a change sits in the database's
//! log, in fields that differ per connector. Read as a tuple and compared
//! within one scope, they order changes the way the database committed them,
//! which neither the commit time (`ts_ms`: a millisecond clock, and for
//! MySQL snapshot reads the time the table was *scanned*) nor the Kafka
//! offset (a redelivery after a connector restart comes later) does.
//!
//! | connector | position (compared left to right) | scope |
//! |---|---|---|
//! | PostgreSQL | `sequence` = [last committed LSN, LSN] when both sides have the first, else `lsn` | the database |
//! | MySQL, MariaDB | binlog `file` (its number), `pos`, `row` | `server_id` (0, a snapshot read's, matches any) and the binlog's base name; across servers the GTID |
//! | SQL Server, Db2, Informix | `commit_lsn`, `change_lsn`, `event_serial_no` | the connector |
//! | Oracle | `commit_scn` (a snapshot read: `scn`), `scn`, `rs_id`, `ssn` | the connector |
//! | MongoDB | `ts_ms` (oplog seconds), `ord` | the connector |
//!
//! At an equal position a snapshot read (`op: r`) is older than a streamed
//! change, and a delete known only from a tombstone is newer than the
//! version it follows. Events with no position, or whose positions do not
//! compare (another connector; a MySQL failover to a server with other GTIDs),
//! fall back to the commit time, and in one stream at the same commit time
//! (or when a snapshot read is involved, whose `ts_ms` is no commit time) to
//! the offset: that fallback is counted per view and connector
//! (`ndc_replica_order_fallback_total`).

use ndc_proto::state::RowVersion;
use ndc_proto::v1::log_position::Kind;
use ndc_proto::v1::{
    BinlogPosition, CommitLsnPosition, LogPosition, OplogPosition, PostgresPosition, ScnPosition,
};
use std::borrow::Cow;
use std::cmp::Ordering;

/// What decided an order: the metric label of [`compare_versions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Basis {
    /// Both positions, in one scope.
    Position,
    /// MySQL/MariaDB on two servers: the GTIDs of one source.
    Gtid,
    /// Fallback: no position on one side.
    NoPosition,
    /// Fallback: positions of different connectors or servers.
    OtherSource,
}

impl Basis {
    /// Is this the commit-time fallback (counted, since it can misorder)?
    pub fn is_fallback(self) -> bool {
        matches!(self, Basis::NoPosition | Basis::OtherSource)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Basis::Position => "position",
            Basis::Gtid => "gtid",
            Basis::NoPosition => "no_position",
            Basis::OtherSource => "other_source",
        }
    }
}

/// The connector family of a position, as a metric label.
pub fn family(position: Option<&LogPosition>) -> &'static str {
    match position.and_then(|p| p.kind.as_ref()) {
        None => "none",
        Some(Kind::Postgres(_)) => "postgresql",
        Some(Kind::Binlog(b)) => connector_label(&b.connector),
        Some(Kind::CommitLsn(c)) => connector_label(&c.connector),
        Some(Kind::Scn(_)) => "oracle",
        Some(Kind::Oplog(_)) => "mongodb",
    }
}

/// A connector's name (`source.connector`) as a metric label: the
/// connectors Debezium ships, else `other` (labels stay few), `none` when
/// absent.
pub fn connector_label(connector: &str) -> &'static str {
    match connector {
        "" => "none",
        "postgresql" => "postgresql",
        "yugabytedb" => "yugabytedb",
        "mysql" => "mysql",
        "mariadb" => "mariadb",
        "sqlserver" => "sqlserver",
        "db2" => "db2",
        "informix" => "informix",
        "oracle" => "oracle",
        "mongodb" => "mongodb",
        "vitess" => "vitess",
        "spanner" => "spanner",
        "cassandra" => "cassandra",
        _ => "other",
    }
}

/// The position a version compares by: its own, or, for rows stored before
/// positions existed, the PostgreSQL LSN they carried.
fn effective(v: &RowVersion) -> Option<Cow<'_, LogPosition>> {
    match (&v.position, v.lsn) {
        (Some(p), _) if p.kind.is_some() => Some(Cow::Borrowed(p)),
        (_, Some(lsn)) => Some(Cow::Owned(LogPosition {
            kind: Some(Kind::Postgres(PostgresPosition {
                last_commit_lsn: None,
                lsn,
            })),
        })),
        _ => None,
    }
}

/// How `new` compares with `old`, and what decided it.
pub fn compare_versions(new: &RowVersion, old: &RowVersion) -> (Ordering, Basis) {
    let basis = match (effective(new), effective(old)) {
        (Some(a), Some(b)) => match compare_positions(&a, &b) {
            Some((order, basis)) => return (order.then_with(|| tie(new, old)), basis),
            None => Basis::OtherSource,
        },
        _ => Basis::NoPosition,
    };
    (fallback(new, old), basis)
}

/// Two versions at one position. A tombstone's delete is copied from the
/// version it followed; between the two, the later arrival wins both ways:
/// the tombstone deletes the row it followed, and that row delivered again
/// afterwards comes back (in a redelivered stretch of a tombstone-only feed,
/// a tombstone may come again *without* the row it followed, and so delete a
/// newer row, which its own redelivery right after restores). Otherwise a
/// snapshot read is older than a streamed change.
fn tie(new: &RowVersion, old: &RowVersion) -> Ordering {
    if new.after != old.after {
        return Ordering::Greater;
    }
    (!new.snapshot).cmp(&!old.snapshot)
}

/// Commit time, then the offset in one stream. A snapshot read's `ts_ms` is
/// when the table was scanned, not a commit time: in one stream, the
/// stream's order decides instead.
fn fallback(new: &RowVersion, old: &RowVersion) -> Ordering {
    let same_stream = new.stream == old.stream;
    if same_stream && (new.snapshot || old.snapshot) {
        return new.offset.cmp(&old.offset).then_with(|| tie(new, old));
    }
    match new.source_ts_ms.cmp(&old.source_ts_ms) {
        Ordering::Equal if same_stream => new.offset.cmp(&old.offset).then_with(|| tie(new, old)),
        // Different feeds at the same instant: the later arrival wins.
        Ordering::Equal => Ordering::Greater,
        other => other,
    }
}

/// `None` when the two positions do not compare (other family or scope).
fn compare_positions(a: &LogPosition, b: &LogPosition) -> Option<(Ordering, Basis)> {
    let at = |o: Ordering| Some((o, Basis::Position));
    match (a.kind.as_ref()?, b.kind.as_ref()?) {
        (Kind::Postgres(a), Kind::Postgres(b)) => match (a.last_commit_lsn, b.last_commit_lsn) {
            (Some(ca), Some(cb)) => at((ca, a.lsn).cmp(&(cb, b.lsn))),
            _ => at(a.lsn.cmp(&b.lsn)),
        },
        (Kind::Binlog(a), Kind::Binlog(b)) if a.connector == b.connector => {
            // Snapshot reads carry server_id 0 (no binlog event was read):
            // their coordinates are the connected server's.
            let same_server = a.server_id == b.server_id || a.server_id == 0 || b.server_id == 0;
            if same_server && a.file_base == b.file_base {
                return at((a.file_index, a.pos, a.row).cmp(&(b.file_index, b.pos, b.row)));
            }
            // Another server (a failover): its binlog coordinates say
            // nothing about this one's; transactions of one GTID source do.
            // The same transaction on two servers cannot be ordered inside.
            if !a.gtid_source.is_empty() && a.gtid_source == b.gtid_source {
                return match a.gtid_sequence.cmp(&b.gtid_sequence) {
                    Ordering::Equal => None,
                    o => Some((o, Basis::Gtid)),
                };
            }
            None
        }
        (Kind::CommitLsn(a), Kind::CommitLsn(b)) if a.connector == b.connector => at((
            &a.commit_lsn,
            &a.change_lsn,
            a.event_serial_no,
        )
            .cmp(&(&b.commit_lsn, &b.change_lsn, b.event_serial_no))),
        (Kind::Scn(a), Kind::Scn(b)) => at((commit_scn(a), &a.scn, &a.rs_id, a.ssn).cmp(&(
            commit_scn(b),
            &b.scn,
            &b.rs_id,
            b.ssn,
        ))),
        (Kind::Oplog(a), Kind::Oplog(b)) => at((a.ts_ms, a.ord).cmp(&(b.ts_ms, b.ord))),
        _ => None,
    }
}

/// An Oracle change's commit SCN; a snapshot read, which has none, is at its
/// `scn` (the flashback SCN).
fn commit_scn(p: &ScnPosition) -> &[u8] {
    if p.commit_scn.is_empty() {
        &p.scn
    } else {
        &p.commit_scn
    }
}

/// Why a position field could not be read (the decoder words the error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub expected: &'static str,
}

/// A `source` field's JSON text, or `None` when absent.
pub type FieldLookup<'a> = dyn Fn(&'static str) -> Option<Cow<'a, str>> + 'a;

/// The position named by a `source` block (or a flattened row's metadata
/// fields), for `connector` (`source.connector`; when empty, the family is
/// told by which fields are present). `Ok(None)`: the event names no
/// position. `ts_ms` is `source.ts_ms` (MongoDB's oplog time).
pub fn position_of(
    connector: &str,
    ts_ms: i64,
    field: &FieldLookup<'_>,
) -> Result<Option<LogPosition>, FieldError> {
    let has = |name: &'static str| field(name).is_some_and(|t| t != "null");
    let family = match connector {
        "postgresql" | "yugabytedb" => "postgresql",
        "mysql" | "mariadb" => connector,
        "sqlserver" | "db2" | "informix" => connector,
        "oracle" => "oracle",
        "mongodb" => "mongodb",
        _ if has("lsn") || has("sequence") => "postgresql",
        _ if has("file") && has("pos") => "mysql",
        _ if has("commit_lsn") || has("change_lsn") => "sqlserver",
        _ if has("scn") || has("commit_scn") => "oracle",
        _ if has("ord") => "mongodb",
        _ => return Ok(None),
    };
    let kind = match family {
        "postgresql" => {
            let error = FieldError {
                field: "sequence",
                expected: "a JSON array of two LSN strings",
            };
            // Debezium's own text, read where it lies (this is on every
            // PostgreSQL event); anything else unescaped and parsed.
            let sequence = match field("sequence").as_deref().and_then(sequence_as_written) {
                Some(sequence) => sequence,
                None => match text(field, "sequence")? {
                    Some(s) => parse_sequence(&s).ok_or(error)?,
                    None => [None, None],
                },
            };
            let Some(lsn) = unsigned(field, "lsn")?.or(sequence[1]) else {
                return Ok(None);
            };
            Kind::Postgres(PostgresPosition {
                last_commit_lsn: sequence[0],
                lsn,
            })
        }
        "mysql" | "mariadb" => {
            let (Some(file), Some(pos)) = (text(field, "file")?, unsigned(field, "pos")?) else {
                return Ok(None);
            };
            let (file_base, file_index) = split_binlog_name(&file);
            let (gtid_source, gtid_sequence) = match text(field, "gtid")? {
                Some(g) => parse_gtid(&g),
                None => (String::new(), 0),
            };
            Kind::Binlog(BinlogPosition {
                connector: family.to_string(),
                server_id: unsigned(field, "server_id")?.unwrap_or(0),
                file_base: file_base.to_string(),
                file_index,
                pos,
                row: unsigned(field, "row")?.unwrap_or(0),
                gtid_source,
                gtid_sequence,
            })
        }
        "sqlserver" | "db2" | "informix" => {
            let commit_lsn = lsn_bytes(field, "commit_lsn")?;
            let change_lsn = lsn_bytes(field, "change_lsn")?;
            if commit_lsn.is_empty() && change_lsn.is_empty() {
                return Ok(None);
            }
            Kind::CommitLsn(CommitLsnPosition {
                connector: family.to_string(),
                commit_lsn,
                change_lsn,
                event_serial_no: unsigned(field, "event_serial_no")?.unwrap_or(0),
            })
        }
        "oracle" => {
            let scn = lsn_bytes(field, "scn")?;
            let commit_scn = lsn_bytes(field, "commit_scn")?;
            if scn.is_empty() && commit_scn.is_empty() {
                return Ok(None);
            }
            Kind::Scn(ScnPosition {
                commit_scn,
                scn,
                rs_id: lsn_bytes(field, "rs_id")?,
                ssn: unsigned(field, "ssn")?.unwrap_or(0),
            })
        }
        _ => Kind::Oplog(OplogPosition {
            ts_ms,
            ord: unsigned(field, "ord")?.unwrap_or(0),
        }),
    };
    Ok(Some(LogPosition { kind: Some(kind) }))
}

/// A string field's value (`None`: absent or null).
fn text<'a>(
    field: &FieldLookup<'a>,
    name: &'static str,
) -> Result<Option<Cow<'a, str>>, FieldError> {
    value_text(field, name, "string")
}

/// A field's value as text, a string's or a number's (`None`: absent or
/// null); other JSON is an error expecting `expected`.
fn value_text<'a>(
    field: &FieldLookup<'a>,
    name: &'static str,
    expected: &'static str,
) -> Result<Option<Cow<'a, str>>, FieldError> {
    let Some(raw) = field(name) else {
        return Ok(None);
    };
    // Borrowed text stays borrowed: no copy per event on the one-pass path.
    let value = match raw {
        Cow::Borrowed(raw) => json_text(raw),
        Cow::Owned(raw) => json_text(&raw).map(|t| t.map(|t| Cow::Owned(t.into_owned()))),
    };
    value.ok_or(FieldError {
        field: name,
        expected,
    })
}

/// The value of a JSON string or number's text as text; `Some(None)` for
/// null; `None` for any other JSON.
fn json_text(raw: &str) -> Option<Option<Cow<'_, str>>> {
    let raw = raw.trim();
    match raw.as_bytes().first()? {
        b'n' if raw == "null" => Some(None),
        b'"' => match raw.strip_prefix('"')?.strip_suffix('"') {
            Some(inner) if !inner.contains('\\') => Some(Some(Cow::Borrowed(inner))),
            _ => serde_json::from_str::<String>(raw)
                .ok()
                .map(|s| Some(Cow::Owned(s))),
        },
        b'0'..=b'9' => Some(Some(Cow::Borrowed(raw))),
        _ => None,
    }
}

/// A non-negative integer field: a JSON number, or a string of digits
/// (Oracle and some converters write numbers as strings).
fn unsigned(field: &FieldLookup<'_>, name: &'static str) -> Result<Option<u64>, FieldError> {
    const EXPECTED: &str = "non-negative integer";
    match value_text(field, name, EXPECTED)? {
        None => Ok(None),
        Some(t) => t.trim().parse::<u64>().map(Some).map_err(|_| FieldError {
            field: name,
            expected: EXPECTED,
        }),
    }
}

/// An LSN, SCN or record-set id as a 16-byte big-endian integer (empty:
/// absent): a decimal number or digit string, or hexadecimal groups
/// (`00000027:00000758:0005`, ` 0x000015.0001f4f5.0010 `) read as one
/// number, each group at its written width, as the connectors pad them.
fn lsn_bytes(field: &FieldLookup<'_>, name: &'static str) -> Result<Vec<u8>, FieldError> {
    const EXPECTED: &str = "an LSN (digits, or hexadecimal groups)";
    let Some(value) = value_text(field, name, EXPECTED)? else {
        return Ok(Vec::new());
    };
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    parse_log_number(&value)
        .map(|n| n.to_be_bytes().to_vec())
        .ok_or(FieldError {
            field: name,
            expected: EXPECTED,
        })
}

fn parse_log_number(text: &str) -> Option<u128> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().ok();
    }
    let t = t.strip_prefix("0x").unwrap_or(t);
    let hex: String = t
        .chars()
        .filter(|c| !matches!(c, ':' | '.' | '-'))
        .collect();
    if hex.is_empty() || hex.len() > 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok()
}

/// The `sequence` field's JSON text as Debezium writes it, quotes escaped:
/// `"[\"24023119\",\"24023128\"]"` (either item may be `null`); `None`
/// for any other text.
fn sequence_as_written(raw: &str) -> Option<[Option<u64>; 2]> {
    let item = |item: &str| -> Option<Option<u64>> {
        match item {
            "null" => Some(None),
            _ => item
                .strip_prefix("\\\"")?
                .strip_suffix("\\\"")?
                .parse()
                .ok()
                .map(Some),
        }
    };
    let (a, b) = raw
        .strip_prefix("\"[")?
        .strip_suffix("]\"")?
        .split_once(',')?;
    Some([item(a)?, item(b)?])
}

/// `["24023119","24023128"]` (either may be null), unescaped: what
/// [`sequence_as_written`] does not read.
fn parse_sequence(text: &str) -> Option<[Option<u64>; 2]> {
    let items: Vec<Option<String>> = serde_json::from_str(text).ok()?;
    let [last_commit, lsn] = items.as_slice() else {
        return None;
    };
    let parse = |s: &Option<String>| -> Option<Option<u64>> {
        match s {
            None => Some(None),
            Some(s) => s.parse().ok().map(Some),
        }
    };
    Some([parse(last_commit)?, parse(lsn)?])
}

/// `mysql-bin.000003` → (`mysql-bin`, 3); a name without a numeric
/// extension is its own base, number 0.
fn split_binlog_name(file: &str) -> (&str, u64) {
    match file.rsplit_once('.') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            (base, n.parse().unwrap_or(u64::MAX))
        }
        _ => (file, 0),
    }
}

/// MySQL `uuid:N` → (uuid, N); MariaDB `domain-server-seq` → (domain,
/// seq): a MariaDB sequence number grows across servers within its
/// domain. Anything else: no GTID.
fn parse_gtid(gtid: &str) -> (String, u64) {
    if let Some((uuid, n)) = gtid.rsplit_once(':')
        && let Ok(n) = n.trim().parse::<u64>()
    {
        return (uuid.trim().to_ascii_lowercase(), n);
    }
    let parts: Vec<&str> = gtid.trim().split('-').collect();
    if let [domain, _server, seq] = parts.as_slice()
        && let (Ok(_), Ok(seq)) = (domain.parse::<u32>(), seq.parse::<u64>())
    {
        return (format!("domain-{domain}"), seq);
    }
    (String::new(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn position(source: Value) -> Option<LogPosition> {
        let map = source.as_object().cloned().unwrap_or_default();
        let connector = map
            .get("connector")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let ts = map.get("ts_ms").and_then(Value::as_i64).unwrap_or(0);
        let lookup = move |name: &'static str| map.get(name).map(|v| Cow::Owned(v.to_string()));
        position_of(&connector, ts, &lookup).expect("valid position")
    }

    fn version(source: Value, op: &str, stream: &str, offset: u64) -> RowVersion {
        RowVersion {
            lsn: source.get("lsn").and_then(Value::as_u64),
            source_ts_ms: source.get("ts_ms").and_then(Value::as_i64).unwrap_or(0),
            position: position(source),
            snapshot: op == "r",
            stream: stream.into(),
            offset,
            after: false,
        }
    }

    #[test]
    fn mysql_orders_by_binlog_position_not_by_the_scan_time_of_a_snapshot() {
        // Debezium's MySQL snapshot stamps reads with the scan time, a
        // second after updates streamed right behind it.
        let snapshot = version(
            json!({"connector":"mysql","server_id":223344,"file":"mysql-bin.000003","pos":154,"row":0,"ts_ms":1_700_000_001_000i64,"snapshot":"true"}),
            "r",
            "k:0",
            0,
        );
        let update = version(
            json!({"connector":"mysql","server_id":223344,"file":"mysql-bin.000003","pos":484,"row":0,"ts_ms":1_700_000_000_000i64}),
            "u",
            "k:0",
            1,
        );
        assert_eq!(
            compare_versions(&update, &snapshot),
            (Ordering::Greater, Basis::Position)
        );
        // Same second, later binlog position; then a redelivery of the first.
        let second = version(
            json!({"connector":"mysql","server_id":223344,"file":"mysql-bin.000003","pos":560,"row":0,"ts_ms":1_700_000_000_000i64}),
            "u",
            "k:0",
            2,
        );
        assert_eq!(compare_versions(&second, &update).0, Ordering::Greater);
        let mut redelivered = update.clone();
        redelivered.offset = 3;
        assert_eq!(compare_versions(&redelivered, &second).0, Ordering::Less);
        assert_eq!(compare_versions(&redelivered, &update).0, Ordering::Equal);
        // The next binlog file comes after any position in this one,
        // including past the fixed-width numbers' rollover.
        let next_file = version(
            json!({"connector":"mysql","server_id":223344,"file":"mysql-bin.1000000","pos":4,"row":0,"ts_ms":0}),
            "u",
            "k:0",
            4,
        );
        assert_eq!(compare_versions(&next_file, &second).0, Ordering::Greater);
    }

    #[test]
    fn mysql_after_a_failover_uses_the_gtid_then_falls_back() {
        let on = |server: u64, pos: u64, gtid: &str, ts: i64| {
            version(
                json!({"connector":"mysql","server_id":server,"file":"bin.000001","pos":pos,"gtid":gtid,"ts_ms":ts}),
                "u",
                "k:0",
                pos,
            )
        };
        let old = on(1, 9000, "3e11fa47-71ca-11e1-9e33-c80aa9429562:23", 5);
        let replicated = on(2, 400, "3E11FA47-71CA-11E1-9E33-C80AA9429562:24", 5);
        assert_eq!(
            compare_versions(&replicated, &old),
            (Ordering::Greater, Basis::Gtid)
        );
        let own = on(2, 500, "aaaaaaaa-71ca-11e1-9e33-c80aa9429562:1", 6);
        assert_eq!(
            compare_versions(&own, &old),
            (Ordering::Greater, Basis::OtherSource)
        );
    }

    #[test]
    fn postgres_uses_the_sequence_when_both_have_it() {
        let pg = |seq: Value, lsn: u64| {
            version(
                json!({"connector":"postgresql","lsn":lsn,"sequence":seq.to_string(),"ts_ms":1}),
                "u",
                "k:0",
                0,
            )
        };
        let a = pg(json!(["100", "90"]), 90);
        let b = pg(json!(["200", "150"]), 150);
        assert_eq!(compare_versions(&b, &a).0, Ordering::Greater);
        let snapshot = version(
            json!({"connector":"postgresql","lsn":120,"sequence":"[null,\"120\"]","ts_ms":9}),
            "r",
            "k:0",
            0,
        );
        assert_eq!(compare_versions(&b, &snapshot).0, Ordering::Greater);
        assert_eq!(compare_versions(&snapshot, &a).0, Ordering::Greater);
        // A row stored before positions existed: its LSN still compares.
        let legacy = RowVersion {
            lsn: Some(150),
            source_ts_ms: 1,
            stream: "k:0".into(),
            offset: 0,
            ..RowVersion::default()
        };
        assert_eq!(
            compare_versions(&b, &legacy),
            (Ordering::Equal, Basis::Position)
        );
    }

    #[test]
    fn sql_server_and_oracle_compare_hexadecimal_log_numbers() {
        let ss = |commit: &str, change: Value, serial: u64, op: &str| {
            version(
                json!({"connector":"sqlserver","commit_lsn":commit,"change_lsn":change,"event_serial_no":serial,"ts_ms":1}),
                op,
                "k:0",
                0,
            )
        };
        let snapshot = ss("00000025:00000d98:0003", Value::Null, 0, "r");
        let change = ss(
            "00000025:00000d98:0003",
            json!("00000025:00000d98:0002"),
            1,
            "u",
        );
        let later = ss(
            "00000026:00000001:0001",
            json!("00000026:00000001:0000"),
            1,
            "u",
        );
        assert_eq!(compare_versions(&change, &snapshot).0, Ordering::Greater);
        assert_eq!(compare_versions(&later, &change).0, Ordering::Greater);
        let second_half = ss(
            "00000026:00000001:0001",
            json!("00000026:00000001:0000"),
            2,
            "u",
        );
        assert_eq!(compare_versions(&second_half, &later).0, Ordering::Greater);

        let ora = |scn: &str, commit: Value, rs: &str, ssn: u64, op: &str| {
            version(
                json!({"connector":"oracle","scn":scn,"commit_scn":commit,"rs_id":rs,"ssn":ssn,"ts_ms":1}),
                op,
                "k:0",
                0,
            )
        };
        let snap = ora("2122184", Value::Null, "", 0, "r");
        let first = ora(
            "2122180",
            json!("2122190"),
            " 0x000015.0001f4f5.0010 ",
            0,
            "u",
        );
        let second = ora(
            "2122185",
            json!("2122190"),
            " 0x000015.0001f4f6.0010 ",
            0,
            "u",
        );
        assert_eq!(compare_versions(&first, &snap).0, Ordering::Greater);
        assert_eq!(compare_versions(&second, &first).0, Ordering::Greater);
    }

    #[test]
    fn mongodb_orders_by_oplog_time_and_ordinal() {
        let m = |ts: i64, ord: u64| {
            version(
                json!({"connector":"mongodb","ts_ms":ts,"ord":ord}),
                "u",
                "k:0",
                0,
            )
        };
        assert_eq!(
            compare_versions(&m(1000, 2), &m(1000, 1)),
            (Ordering::Greater, Basis::Position)
        );
        assert_eq!(compare_versions(&m(1000, 9), &m(2000, 1)).0, Ordering::Less);
    }

    #[test]
    fn at_one_position_a_streamed_change_beats_a_snapshot_read_and_a_tombstone_and_its_row_take_turns()
     {
        let src = json!({"connector":"postgresql","lsn":77,"ts_ms":1});
        let read = version(src.clone(), "r", "k:0", 0);
        let change = version(src, "u", "k:0", 1);
        let mut tomb = change.clone();
        tomb.after = true;
        assert_eq!(compare_versions(&change, &read).0, Ordering::Greater);
        assert_eq!(compare_versions(&read, &change).0, Ordering::Less);
        assert_eq!(compare_versions(&read, &read).0, Ordering::Equal);
        assert_eq!(compare_versions(&change, &change).0, Ordering::Equal);
        // The tombstone deletes the row it followed; the row, delivered
        // again, comes back: the later arrival wins between them.
        assert_eq!(compare_versions(&tomb, &change).0, Ordering::Greater);
        assert_eq!(compare_versions(&change, &tomb).0, Ordering::Greater);
        assert_eq!(compare_versions(&tomb, &tomb).0, Ordering::Equal);
    }

    #[test]
    fn without_positions_commit_time_decides_and_is_a_counted_fallback() {
        let plain = |ts: i64, op: &str, stream: &str, offset: u64| {
            version(json!({"ts_ms": ts}), op, stream, offset)
        };
        assert_eq!(
            compare_versions(&plain(2, "u", "a", 0), &plain(1, "u", "a", 9)),
            (Ordering::Greater, Basis::NoPosition)
        );
        assert_eq!(
            compare_versions(&plain(1, "u", "a", 5), &plain(1, "u", "a", 4)).0,
            Ordering::Greater
        );
        assert_eq!(
            compare_versions(&plain(1, "u", "b", 0), &plain(1, "u", "a", 4)).0,
            Ordering::Greater
        );
        // A snapshot read's ts_ms is its scan time: the stream's order wins.
        assert_eq!(
            compare_versions(&plain(1, "u", "a", 5), &plain(9, "r", "a", 4)).0,
            Ordering::Greater
        );
        // Positions of two connectors do not compare.
        let pg = version(
            json!({"connector":"postgresql","lsn":5,"ts_ms":3}),
            "u",
            "a",
            0,
        );
        let my = version(
            json!({"connector":"mysql","file":"b.000001","pos":9,"ts_ms":2}),
            "u",
            "a",
            1,
        );
        assert_eq!(
            compare_versions(&my, &pg),
            (Ordering::Less, Basis::OtherSource)
        );
    }

    #[test]
    fn the_family_is_told_by_the_fields_when_the_connector_is_not_named() {
        let p = position(json!({"lsn": 5})).expect("postgres");
        assert_eq!(family(Some(&p)), "postgresql");
        let p = position(json!({"file": "b.000002", "pos": 4})).expect("binlog");
        assert_eq!(family(Some(&p)), "mysql");
        assert!(position(json!({"ts_ms": 4})).is_none());
        assert_eq!(family(None), "none");
    }

    #[test]
    fn a_sequence_is_read_compact_or_spaced() {
        for text in [
            r#"["24023119","24023128"]"#,
            r#"[ "24023119" , "24023128" ]"#,
        ] {
            assert_eq!(
                parse_sequence(text),
                Some([Some(24023119), Some(24023128)]),
                "{text}"
            );
        }
        assert_eq!(parse_sequence(r#"[null,"7"]"#), Some([None, Some(7)]));
        // As it lies in the event, quotes escaped: read without unescaping.
        assert_eq!(
            sequence_as_written(r#""[\"24023119\",\"24023128\"]""#),
            Some([Some(24023119), Some(24023128)])
        );
        assert_eq!(
            sequence_as_written(r#""[null,\"7\"]""#),
            Some([None, Some(7)])
        );
        assert_eq!(sequence_as_written(r#""[\"1\"]""#), None);
        assert_eq!(sequence_as_written(r#""[\"x\",\"2\"]""#), None);
        assert_eq!(parse_sequence(r#"["1","2","3"]"#), None);
        assert_eq!(parse_sequence(r#"["x","2"]"#), None);
    }

    #[test]
    fn malformed_position_fields_are_errors_not_guesses() {
        let bad = |source: Value| {
            let map = source.as_object().cloned().unwrap_or_default();
            let lookup = move |n: &'static str| map.get(n).map(|v| Cow::Owned(v.to_string()));
            position_of("", 0, &lookup)
        };
        assert_eq!(
            bad(json!({"file": "b.1", "pos": "x"}))
                .err()
                .map(|e| e.field),
            Some("pos")
        );
        assert_eq!(
            bad(json!({"lsn": 1, "sequence": "[1]"}))
                .err()
                .map(|e| e.field),
            Some("sequence")
        );
        assert_eq!(
            bad(json!({"commit_lsn": "zz:00"})).err().map(|e| e.field),
            Some("commit_lsn")
        );
        assert_eq!(bad(json!({"lsn": -3})).err().map(|e| e.field), Some("lsn"));
    }
}
