//! Decoding of Debezium change events as agencies publish them to Kafka.
//!
//! Accepted shapes: the full change-event envelope (`before`, `after`,
//! `source`, `op`, ...) with or without the JSON converter's
//! `{"schema", "payload"}` wrapper, and the flattened form written by the
//! `ExtractNewRecordState` transform (`__deleted`, `__op`, ...). Records that
//! are not table data (heartbeats, transaction metadata, logical-decoding
//! messages) are recognised and reported as such, never applied.
//!
//! Every failure is a [`DecodeError`] with a stable [`DecodeErrorKind`]: the
//! kind labels metrics and dead-letter records, the message tells a person
//! what was wrong and where.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// A row: column name to JSON value, as Debezium's JSON converter writes it.
pub type Row = Map<String, Value>;

/// How the values of a source are shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Debezium change-event envelope, with or without the schema wrapper.
    #[default]
    Debezium,
    /// Rows flattened by `ExtractNewRecordState` (deletes as tombstones or
    /// rows with `__deleted: "true"`).
    Flattened,
}

/// Settings that decide how one source's records are decoded.
#[derive(Debug, Clone, Default)]
pub struct DecoderConfig {
    pub format: Format,
    /// Primary-key columns taken from the row. Empty: the Kafka message key
    /// is the primary key (Debezium's default).
    pub key_columns: Vec<String>,
    /// Records whose key plus value exceed this are rejected (0: no limit).
    pub max_record_bytes: usize,
}

/// A primary key in canonical form: compact JSON with object members sorted
/// by name, so that equal keys are equal bytes whatever produced them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    /// Canonical key of a JSON value (objects: members sorted by name).
    pub fn from_value(value: &Value) -> Key {
        let mut out = String::new();
        write_canonical(value, &mut out);
        Key(out)
    }

    /// Parses and canonicalises a key written as JSON by a person or client.
    pub fn parse(text: &str) -> Result<Key, DecodeError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| DecodeError::new(DecodeErrorKind::MalformedJson, format!("key: {e}")))?;
        Ok(Key::from_value(&value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (name, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(name.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The operation of a change event (Debezium `op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeOp {
    Create,
    Update,
    Delete,
    /// A row read by the connector's snapshot (`r`).
    Read,
    /// The whole table was truncated (`t`).
    Truncate,
}

impl ChangeOp {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Create => "c",
            ChangeOp::Update => "u",
            ChangeOp::Delete => "d",
            ChangeOp::Read => "r",
            ChangeOp::Truncate => "t",
        }
    }
}

/// Debezium `source` block: where in the agency database the change happened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceInfo {
    pub connector: String,
    /// Logical server name (topic prefix).
    pub name: String,
    pub db: String,
    pub schema: String,
    pub table: String,
    /// Commit time in the agency database, ms since the epoch.
    pub ts_ms: i64,
    /// PostgreSQL log sequence number of the change.
    pub lsn: Option<u64>,
    pub tx_id: Option<i64>,
    /// `true`, `first`, `last`, `false`, `incremental`, ... (empty when absent).
    pub snapshot: String,
}

/// One row-level change, decoded and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    pub op: ChangeOp,
    /// Primary key; `None` only for truncate.
    pub key: Option<Key>,
    pub before: Option<Row>,
    pub after: Option<Row>,
    pub source: SourceInfo,
    /// When the connector processed the change (top-level `ts_ms`).
    pub processed_ts_ms: Option<i64>,
}

/// Transaction boundary from a `<prefix>.transaction` topic.
#[derive(Debug, Clone, PartialEq)]
pub struct TransactionMarker {
    pub id: String,
    pub status: TransactionStatus,
    pub event_count: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    Begin,
    End,
}

/// What one Kafka record (or file line) turned out to be.
// Not boxed: a decoded record is moved once, from source to state writer,
// and a box would cost an allocation per record on the hot path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Change(ChangeEvent),
    /// Null value after a delete (envelope format): compaction marker only.
    Tombstone {
        key: Option<Key>,
    },
    /// Connector heartbeat; `ts_ms` tells how live the feed is.
    Heartbeat {
        ts_ms: Option<i64>,
    },
    Transaction(TransactionMarker),
    /// Logical-decoding message (`op: m`): not table data.
    Message,
}

/// Why a record was rejected. The string form labels metrics and the
/// `ndc-error-kind` header of dead-letter records, so it never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodeErrorKind {
    Oversized,
    MalformedJson,
    NotAnObject,
    UnknownOp,
    WrongType,
    MissingField,
    MissingKey,
}

impl DecodeErrorKind {
    pub const ALL: [DecodeErrorKind; 7] = [
        DecodeErrorKind::Oversized,
        DecodeErrorKind::MalformedJson,
        DecodeErrorKind::NotAnObject,
        DecodeErrorKind::UnknownOp,
        DecodeErrorKind::WrongType,
        DecodeErrorKind::MissingField,
        DecodeErrorKind::MissingKey,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DecodeErrorKind::Oversized => "oversized",
            DecodeErrorKind::MalformedJson => "malformed_json",
            DecodeErrorKind::NotAnObject => "not_an_object",
            DecodeErrorKind::UnknownOp => "unknown_op",
            DecodeErrorKind::WrongType => "wrong_type",
            DecodeErrorKind::MissingField => "missing_field",
            DecodeErrorKind::MissingKey => "missing_key",
        }
    }
}

/// A record that cannot be applied, with a reason fit for a dead-letter header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", kind.as_str())]
pub struct DecodeError {
    pub kind: DecodeErrorKind,
    pub message: String,
}

impl DecodeError {
    pub fn new(kind: DecodeErrorKind, message: impl Into<String>) -> Self {
        DecodeError {
            kind,
            message: message.into(),
        }
    }

    fn wrong_type(field: &str, expected: &str, got: &Value) -> Self {
        DecodeError::new(
            DecodeErrorKind::WrongType,
            format!("{field}: expected {expected}, got {}", json_type(got)),
        )
    }

    fn missing(field: &str) -> Self {
        DecodeError::new(DecodeErrorKind::MissingField, format!("{field} is missing"))
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Is this the topic Debezium writes heartbeats to?
pub fn is_heartbeat_topic(topic: &str) -> bool {
    topic.starts_with("__debezium-heartbeat")
}

/// Is this the transaction-metadata topic (`<prefix>.transaction`)?
pub fn is_transaction_topic(topic: &str) -> bool {
    topic.ends_with(".transaction")
}

/// Decodes records of one source.
#[derive(Debug, Clone)]
pub struct Decoder {
    config: DecoderConfig,
}

impl Decoder {
    pub fn new(config: DecoderConfig) -> Self {
        Decoder { config }
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// Decodes one record. `topic` is used only to recognise heartbeat and
    /// transaction topics; pass "" for file sources.
    pub fn decode(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<Decoded, DecodeError> {
        let size = key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len);
        if self.config.max_record_bytes > 0 && size > self.config.max_record_bytes {
            return Err(DecodeError::new(
                DecodeErrorKind::Oversized,
                format!(
                    "record is {size} bytes, the limit is {}",
                    self.config.max_record_bytes
                ),
            ));
        }
        if is_heartbeat_topic(topic) {
            return Ok(Decoded::Heartbeat {
                ts_ms: value
                    .and_then(|v| parse_json(v, "value").ok())
                    .map(unwrap_envelope)
                    .and_then(|p| p.get("ts_ms").and_then(Value::as_i64)),
            });
        }
        let Some(value) = value else {
            return match self.config.format {
                Format::Debezium => Ok(Decoded::Tombstone {
                    key: key.map(parse_kafka_key).transpose()?,
                }),
                Format::Flattened => {
                    let key = key.map(parse_kafka_key).transpose()?.ok_or_else(|| {
                        DecodeError::new(
                            DecodeErrorKind::MissingKey,
                            "tombstone without a message key",
                        )
                    })?;
                    Ok(Decoded::Change(ChangeEvent {
                        op: ChangeOp::Delete,
                        key: Some(key),
                        before: None,
                        after: None,
                        source: SourceInfo::default(),
                        processed_ts_ms: None,
                    }))
                }
            };
        };
        let payload = unwrap_envelope(parse_json(value, "value")?);
        let Value::Object(payload) = payload else {
            if payload.is_null() {
                // `{"schema": ..., "payload": null}`: the converter's tombstone.
                return self.decode(topic, key, None);
            }
            return Err(DecodeError::new(
                DecodeErrorKind::NotAnObject,
                format!("value: expected an object, got {}", json_type(&payload)),
            ));
        };
        if self.config.format == Format::Debezium
            && (is_transaction_topic(topic) || looks_like_transaction(&payload))
        {
            return decode_transaction(&payload).map(Decoded::Transaction);
        }
        match self.config.format {
            Format::Debezium => self.decode_envelope(payload, key),
            Format::Flattened => self.decode_flattened(payload, key),
        }
    }

    fn decode_envelope(&self, mut p: Row, key: Option<&[u8]>) -> Result<Decoded, DecodeError> {
        let op = match p.get("op") {
            None | Some(Value::Null) => return Err(DecodeError::missing("op")),
            Some(Value::String(s)) => match s.as_str() {
                "c" => ChangeOp::Create,
                "u" => ChangeOp::Update,
                "d" => ChangeOp::Delete,
                "r" => ChangeOp::Read,
                "t" => ChangeOp::Truncate,
                "m" => return Ok(Decoded::Message),
                other => {
                    return Err(DecodeError::new(
                        DecodeErrorKind::UnknownOp,
                        format!("op: unknown operation {other:?} (expected c, u, d, r, t or m)"),
                    ));
                }
            },
            Some(other) => return Err(DecodeError::wrong_type("op", "string", other)),
        };
        let before = take_row(&mut p, "before")?;
        let after = take_row(&mut p, "after")?;
        let source = match p.get("source") {
            Some(Value::Object(s)) => decode_source(s)?,
            None | Some(Value::Null) => return Err(DecodeError::missing("source")),
            Some(other) => return Err(DecodeError::wrong_type("source", "object", other)),
        };
        let processed_ts_ms = opt_i64(&p, "ts_ms", "ts_ms")?;
        match op {
            ChangeOp::Create | ChangeOp::Read | ChangeOp::Update if after.is_none() => {
                return Err(DecodeError::missing("after"));
            }
            _ => {}
        }
        let key = if op == ChangeOp::Truncate {
            None
        } else {
            let row = if op == ChangeOp::Delete {
                before.as_ref()
            } else {
                after.as_ref()
            };
            Some(self.key_of(row, key)?)
        };
        Ok(Decoded::Change(ChangeEvent {
            op,
            key,
            before,
            after,
            source,
            processed_ts_ms,
        }))
    }

    fn decode_flattened(&self, mut row: Row, key: Option<&[u8]>) -> Result<Decoded, DecodeError> {
        let deleted = match row.get("__deleted") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if s == "true" || s == "false" => s == "true",
            Some(other) => {
                return Err(DecodeError::wrong_type(
                    "__deleted",
                    "\"true\" or \"false\"",
                    other,
                ));
            }
        };
        let op = match row.get("__op") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(match s.as_str() {
                "c" => ChangeOp::Create,
                "u" => ChangeOp::Update,
                "d" => ChangeOp::Delete,
                "r" => ChangeOp::Read,
                other => {
                    return Err(DecodeError::new(
                        DecodeErrorKind::UnknownOp,
                        format!("__op: unknown operation {other:?} (expected c, u, d or r)"),
                    ));
                }
            }),
            Some(other) => return Err(DecodeError::wrong_type("__op", "string", other)),
        };
        let op = match (deleted, op) {
            (true, _) | (false, Some(ChangeOp::Delete)) => ChangeOp::Delete,
            (false, Some(op)) => op,
            (false, None) => ChangeOp::Update,
        };
        let source = SourceInfo {
            ts_ms: opt_i64(&row, "__source_ts_ms", "__source_ts_ms")?
                .or(opt_i64(&row, "__ts_ms", "__ts_ms")?)
                .unwrap_or(0),
            lsn: opt_u64(&row, "__lsn", "__lsn")?.or(opt_u64(
                &row,
                "__source_lsn",
                "__source_lsn",
            )?),
            db: opt_string(&row, "__db"),
            schema: opt_string(&row, "__schema"),
            table: first_non_empty(
                opt_string(&row, "__table"),
                opt_string(&row, "__source_table"),
            ),
            connector: opt_string(&row, "__source_connector"),
            ..SourceInfo::default()
        };
        row.retain(|name, _| !name.starts_with("__"));
        let key = Some(self.key_of(Some(&row), key)?);
        let (before, after) = if op == ChangeOp::Delete {
            (Some(row), None)
        } else {
            (None, Some(row))
        };
        Ok(Decoded::Change(ChangeEvent {
            op,
            key,
            before,
            after,
            source,
            processed_ts_ms: None,
        }))
    }

    /// Primary key: the configured columns of `row` when set and present,
    /// else the Kafka message key.
    fn key_of(&self, row: Option<&Row>, kafka_key: Option<&[u8]>) -> Result<Key, DecodeError> {
        if !self.config.key_columns.is_empty()
            && let Some(row) = row
        {
            let mut key = Row::new();
            let mut complete = true;
            for col in &self.config.key_columns {
                match row.get(col) {
                    Some(v) if !v.is_null() => {
                        key.insert(col.clone(), v.clone());
                    }
                    _ => complete = false,
                }
            }
            if complete {
                return Ok(Key::from_value(&Value::Object(key)));
            }
        }
        match kafka_key {
            Some(k) => parse_kafka_key(k),
            None if self.config.key_columns.is_empty() => Err(DecodeError::new(
                DecodeErrorKind::MissingKey,
                "no message key and no key columns configured",
            )),
            None => Err(DecodeError::new(
                DecodeErrorKind::MissingKey,
                format!(
                    "key columns {:?} are not all present in the row, and there is no message key",
                    self.config.key_columns
                ),
            )),
        }
    }
}

fn first_non_empty(a: String, b: String) -> String {
    if a.is_empty() { b } else { a }
}

fn parse_json(bytes: &[u8], what: &str) -> Result<Value, DecodeError> {
    serde_json::from_slice(bytes)
        .map_err(|e| DecodeError::new(DecodeErrorKind::MalformedJson, format!("{what}: {e}")))
}

/// Strips the JSON converter's `{"schema": ..., "payload": ...}` wrapper.
fn unwrap_envelope(value: Value) -> Value {
    match value {
        Value::Object(mut map)
            if map.len() == 2 && map.contains_key("schema") && map.contains_key("payload") =>
        {
            map.remove("payload").unwrap_or(Value::Null)
        }
        other => other,
    }
}

fn parse_kafka_key(bytes: &[u8]) -> Result<Key, DecodeError> {
    let value = serde_json::from_slice(bytes).map_err(|e| {
        DecodeError::new(DecodeErrorKind::MalformedJson, format!("message key: {e}"))
    })?;
    let value = unwrap_envelope(value);
    if value.is_null() {
        return Err(DecodeError::new(
            DecodeErrorKind::MissingKey,
            "message key is null",
        ));
    }
    Ok(Key::from_value(&value))
}

fn take_row(p: &mut Row, field: &str) -> Result<Option<Row>, DecodeError> {
    match p.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(row)) => Ok(Some(row)),
        Some(other) => Err(DecodeError::wrong_type(field, "object or null", &other)),
    }
}

fn opt_i64(map: &Row, field: &str, label: &str) -> Result<Option<i64>, DecodeError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| DecodeError::wrong_type(label, "integer", v)),
        Some(v) => Err(DecodeError::wrong_type(label, "integer", v)),
    }
}

fn opt_u64(map: &Row, field: &str, label: &str) -> Result<Option<u64>, DecodeError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| DecodeError::wrong_type(label, "non-negative integer", v)),
        Some(v) => Err(DecodeError::wrong_type(label, "non-negative integer", v)),
    }
}

fn opt_string(map: &Row, field: &str) -> String {
    match map.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    }
}

fn decode_source(s: &Row) -> Result<SourceInfo, DecodeError> {
    let ts_ms =
        opt_i64(s, "ts_ms", "source.ts_ms")?.ok_or_else(|| DecodeError::missing("source.ts_ms"))?;
    let snapshot = match s.get("snapshot") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(v)) => v.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(other) => return Err(DecodeError::wrong_type("source.snapshot", "string", other)),
    };
    for field in ["connector", "name", "db", "schema", "table"] {
        if let Some(v) = s.get(field)
            && !(v.is_string() || v.is_null())
        {
            return Err(DecodeError::wrong_type(
                &format!("source.{field}"),
                "string",
                v,
            ));
        }
    }
    Ok(SourceInfo {
        connector: opt_string(s, "connector"),
        name: opt_string(s, "name"),
        db: opt_string(s, "db"),
        schema: opt_string(s, "schema"),
        table: opt_string(s, "table"),
        ts_ms,
        lsn: opt_u64(s, "lsn", "source.lsn")?,
        tx_id: opt_i64(s, "txId", "source.txId")?,
        snapshot,
    })
}

fn looks_like_transaction(p: &Row) -> bool {
    !p.contains_key("op")
        && matches!(p.get("status"), Some(Value::String(s)) if s == "BEGIN" || s == "END")
        && p.contains_key("id")
}

fn decode_transaction(p: &Row) -> Result<TransactionMarker, DecodeError> {
    let status = match p.get("status") {
        Some(Value::String(s)) if s == "BEGIN" => TransactionStatus::Begin,
        Some(Value::String(s)) if s == "END" => TransactionStatus::End,
        Some(Value::String(s)) => {
            return Err(DecodeError::new(
                DecodeErrorKind::UnknownOp,
                format!("status: unknown transaction status {s:?} (expected BEGIN or END)"),
            ));
        }
        Some(other) => return Err(DecodeError::wrong_type("status", "string", other)),
        None => return Err(DecodeError::missing("status")),
    };
    let id = match p.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(DecodeError::wrong_type("id", "string", other)),
        None => return Err(DecodeError::missing("id")),
    };
    Ok(TransactionMarker {
        id,
        status,
        event_count: opt_u64(p, "event_count", "event_count")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decoder() -> Decoder {
        Decoder::new(DecoderConfig::default())
    }

    fn pg_event(op: &str, before: Value, after: Value) -> Value {
        json!({
            "before": before,
            "after": after,
            "source": {
                "version": "2.7.0.Final", "connector": "postgresql", "name": "population",
                "ts_ms": 1_700_000_000_123_i64, "snapshot": "false", "db": "population",
                "sequence": "[\"24023120\",\"24023128\"]", "schema": "public",
                "table": "citizens", "txId": 591, "lsn": 24023128, "xmin": null
            },
            "op": op,
            "ts_ms": 1_700_000_000_456_i64,
            "transaction": null
        })
    }

    fn bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).expect("serialize test json")
    }

    fn change(d: Decoded) -> ChangeEvent {
        match d {
            Decoded::Change(c) => c,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn decodes_bare_postgres_create_with_source_fields() {
        let v = pg_event(
            "c",
            Value::Null,
            json!({"person_id": "001089123456", "name": "An"}),
        );
        let key = bytes(&json!({"person_id": "001089123456"}));
        let c = change(
            decoder()
                .decode("population.public.citizens", Some(&key), Some(&bytes(&v)))
                .expect("decodes"),
        );
        assert_eq!(c.op, ChangeOp::Create);
        assert_eq!(
            c.key.as_ref().map(Key::as_str),
            Some(r#"{"person_id":"001089123456"}"#)
        );
        assert_eq!(c.source.lsn, Some(24023128));
        assert_eq!(c.source.tx_id, Some(591));
        assert_eq!(c.source.ts_ms, 1_700_000_000_123);
        assert_eq!(c.source.snapshot, "false");
        assert_eq!(c.source.table, "citizens");
        assert_eq!(c.source.schema, "public");
        assert_eq!(c.source.db, "population");
        assert_eq!(c.processed_ts_ms, Some(1_700_000_000_456));
        assert_eq!(
            c.after.as_ref().and_then(|r| r.get("name")),
            Some(&json!("An"))
        );
    }

    #[test]
    fn unwraps_schema_envelope_in_value_and_key() {
        let v = json!({"schema": {"type": "struct"}, "payload": pg_event("u", json!({"id": 1, "x": 1}), json!({"id": 1, "x": 2}))});
        let k = json!({"schema": {"type": "struct"}, "payload": {"id": 1}});
        let c = change(
            decoder()
                .decode("t", Some(&bytes(&k)), Some(&bytes(&v)))
                .expect("decodes"),
        );
        assert_eq!(c.op, ChangeOp::Update);
        assert_eq!(c.key, Some(Key(r#"{"id":1}"#.into())));
    }

    #[test]
    fn key_is_canonical_whatever_the_member_order() {
        let a = Key::parse(r#"{"b": 2, "a": {"d": 1, "c": [1, "x"]}}"#).expect("parses");
        let b = Key::parse(r#"{"a":{"c":[1,"x"],"d":1},"b":2}"#).expect("parses");
        assert_eq!(a, b);
        assert_eq!(a.as_str(), r#"{"a":{"c":[1,"x"],"d":1},"b":2}"#);
    }

    #[test]
    fn key_columns_override_message_key() {
        let d = Decoder::new(DecoderConfig {
            key_columns: vec!["card_no".into()],
            ..DecoderConfig::default()
        });
        let v = pg_event("c", Value::Null, json!({"id": 7, "card_no": "HN-1"}));
        let c = change(
            d.decode("t", Some(br#"{"id":7}"#), Some(&bytes(&v)))
                .expect("decodes"),
        );
        assert_eq!(c.key, Some(Key(r#"{"card_no":"HN-1"}"#.into())));
        // Deletes take the key from `before`.
        let v = pg_event("d", json!({"id": 7, "card_no": "HN-1"}), Value::Null);
        let c = change(d.decode("t", None, Some(&bytes(&v))).expect("decodes"));
        assert_eq!(c.op, ChangeOp::Delete);
        assert_eq!(c.key, Some(Key(r#"{"card_no":"HN-1"}"#.into())));
    }

    #[test]
    fn tombstone_and_null_payload_are_tombstones() {
        let d = decoder();
        assert_eq!(
            d.decode("t", Some(br#"{"id":1}"#), None).expect("decodes"),
            Decoded::Tombstone {
                key: Some(Key(r#"{"id":1}"#.into()))
            }
        );
        let v = json!({"schema": null, "payload": null});
        assert_eq!(
            d.decode("t", Some(br#"{"id":1}"#), Some(&bytes(&v)))
                .expect("decodes"),
            Decoded::Tombstone {
                key: Some(Key(r#"{"id":1}"#.into()))
            }
        );
    }

    #[test]
    fn truncate_has_no_key_and_message_is_not_data() {
        let v = json!({"op": "t", "source": {"ts_ms": 5, "table": "citizens"}, "ts_ms": 6});
        let c = change(
            decoder()
                .decode("t", None, Some(&bytes(&v)))
                .expect("decodes"),
        );
        assert_eq!(c.op, ChangeOp::Truncate);
        assert_eq!(c.key, None);
        let m = json!({"op": "m", "source": {"ts_ms": 5}, "message": {"prefix": "x"}});
        assert_eq!(
            decoder()
                .decode("t", None, Some(&bytes(&m)))
                .expect("decodes"),
            Decoded::Message
        );
    }

    #[test]
    fn recognises_heartbeat_and_transaction_records() {
        let d = decoder();
        let hb = d
            .decode(
                "__debezium-heartbeat.population",
                Some(br#"{"serverName":"population"}"#),
                Some(br#"{"ts_ms":1700000000000}"#),
            )
            .expect("decodes");
        assert_eq!(
            hb,
            Decoded::Heartbeat {
                ts_ms: Some(1_700_000_000_000)
            }
        );
        let tx = json!({"status": "END", "id": "571:53195832", "ts_ms": 1, "event_count": 2,
                        "data_collections": [{"data_collection": "public.citizens", "event_count": 2}]});
        assert_eq!(
            d.decode("population.transaction", None, Some(&bytes(&tx)))
                .expect("decodes"),
            Decoded::Transaction(TransactionMarker {
                id: "571:53195832".into(),
                status: TransactionStatus::End,
                event_count: Some(2)
            })
        );
        // A BEGIN marker that landed on a data topic is still not data.
        let begin = json!({"status": "BEGIN", "id": "571:1", "ts_ms": 1});
        assert!(matches!(
            d.decode("population.public.citizens", None, Some(&bytes(&begin))),
            Ok(Decoded::Transaction(_))
        ));
    }

    #[test]
    fn flattened_rows_deletes_and_tombstones() {
        let d = Decoder::new(DecoderConfig {
            format: Format::Flattened,
            ..DecoderConfig::default()
        });
        let row = json!({"id": 3, "city": "Huế", "__op": "c", "__source_ts_ms": 42, "__lsn": 99, "__table": "addr"});
        let c = change(
            d.decode("t", Some(br#"{"id":3}"#), Some(&bytes(&row)))
                .expect("decodes"),
        );
        assert_eq!(c.op, ChangeOp::Create);
        assert_eq!(c.source.ts_ms, 42);
        assert_eq!(c.source.lsn, Some(99));
        assert_eq!(c.source.table, "addr");
        assert_eq!(
            c.after,
            Some(
                json!({"id": 3, "city": "Huế"})
                    .as_object()
                    .cloned()
                    .expect("object")
            )
        );
        let del = json!({"id": 3, "city": "Huế", "__deleted": "true"});
        let c = change(
            d.decode("t", Some(br#"{"id":3}"#), Some(&bytes(&del)))
                .expect("decodes"),
        );
        assert_eq!(c.op, ChangeOp::Delete);
        assert!(c.after.is_none());
        let c = change(d.decode("t", Some(br#"{"id":3}"#), None).expect("decodes"));
        assert_eq!(c.op, ChangeOp::Delete);
        assert!(d.decode("t", None, None).is_err());
    }

    fn kind_of(value: &[u8]) -> DecodeErrorKind {
        decoder()
            .decode("t", Some(br#"{"id":1}"#), Some(value))
            .expect_err("must be rejected")
            .kind
    }

    #[test]
    fn rejects_bad_records_with_a_reason() {
        assert_eq!(kind_of(b"{not json"), DecodeErrorKind::MalformedJson);
        assert_eq!(kind_of(b"[1,2]"), DecodeErrorKind::NotAnObject);
        let mut v = pg_event("x", Value::Null, json!({"id": 1}));
        assert_eq!(kind_of(&bytes(&v)), DecodeErrorKind::UnknownOp);
        v["op"] = json!(1);
        assert_eq!(kind_of(&bytes(&v)), DecodeErrorKind::WrongType);
        v["op"] = json!("c");
        v["after"] = json!("a string");
        assert_eq!(kind_of(&bytes(&v)), DecodeErrorKind::WrongType);
        v["after"] = Value::Null;
        assert_eq!(kind_of(&bytes(&v)), DecodeErrorKind::MissingField);
        v["after"] = json!({"id": 1});
        v["source"]["lsn"] = json!("not a number");
        let err = decoder()
            .decode("t", Some(br#"{"id":1}"#), Some(&bytes(&v)))
            .expect_err("rejected");
        assert_eq!(err.kind, DecodeErrorKind::WrongType);
        assert!(err.message.contains("source.lsn"), "{err}");
        v["source"]["lsn"] = json!(1);
        v["source"]["ts_ms"] = json!("yesterday");
        assert_eq!(kind_of(&bytes(&v)), DecodeErrorKind::WrongType);
        v.as_object_mut().map(|o| o.remove("source"));
        assert_eq!(kind_of(&bytes(&v)), DecodeErrorKind::MissingField);
        let ok = pg_event("c", Value::Null, json!({"id": 1}));
        let err = decoder()
            .decode("t", None, Some(&bytes(&ok)))
            .expect_err("no key");
        assert_eq!(err.kind, DecodeErrorKind::MissingKey);
        let err = decoder()
            .decode("t", Some(b"{oops"), Some(&bytes(&ok)))
            .expect_err("bad key");
        assert_eq!(err.kind, DecodeErrorKind::MalformedJson);
    }

    #[test]
    fn rejects_oversized_records_before_parsing() {
        let d = Decoder::new(DecoderConfig {
            max_record_bytes: 64,
            ..DecoderConfig::default()
        });
        let v = vec![b'x'; 100];
        let err = d.decode("t", None, Some(&v)).expect_err("too big");
        assert_eq!(err.kind, DecodeErrorKind::Oversized);
        assert!(err.message.contains("100 bytes"));
    }
}
