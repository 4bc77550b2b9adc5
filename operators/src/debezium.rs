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
//!
//! Rows stay the JSON text the agency sent (validated, never rebuilt as
//! maps), because that text is what the replica stores and serves. A plain
//! change event is read in one pass by the decoder's own validating reader
//! (see `PlainEnvelope::scan`); everything else, and everything that reader
//! declines, is read by serde_json with borrowed [`RawValue`]s. Every field
//! that ndc interprets is type-checked, with the field named in the error.

use ndc_proto::v1::LogPosition;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::fmt;
use std::sync::Arc;

/// A row: a JSON object, kept as the text the agency sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(Box<str>);

impl Row {
    /// A row from a map of columns.
    pub fn from_map(map: &Map<String, Value>) -> Row {
        // Serializing a map of JSON values cannot fail.
        Row(serde_json::to_string(map)
            .unwrap_or_default()
            .into_boxed_str())
    }

    /// Wraps JSON text known to be an object (from a [`RawValue`]).
    fn from_object_text(text: &str) -> Row {
        Row(text.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The row as a JSON value (parses the text).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(&self.0).unwrap_or(Value::Null)
    }

    /// One column's value (parses the text; for tests and tools, not hot paths).
    pub fn get(&self, column: &str) -> Option<Value> {
        match self.to_value() {
            Value::Object(mut m) => m.remove(column),
            _ => None,
        }
    }

    /// The key made of `columns`, if all are present and not null: one pass
    /// over the row's text that parses only those columns' values.
    fn key_of_columns(&self, columns: &KeyColumns) -> Option<Key> {
        // A row's text is an object validated by serde_json as it was
        // decoded (or written by it): its members can be found from its
        // structure alone, with no second parse when a column is missing.
        key_of_valid_object_columns(&self.0, columns)
    }
}

/// Key column names sorted and unique, once per decoder: the order of the
/// canonical key, and one member per name, as when the object is parsed.
/// Each name is also kept as the JSON string the key writes, instead of
/// quoting it for every event.
#[derive(Debug, Clone, Default)]
struct KeyColumns {
    names: Vec<String>,
    /// `names[i]` as a JSON string, quotes included.
    quoted: Vec<String>,
}

impl KeyColumns {
    fn new(columns: &[String]) -> Self {
        let mut names = columns.to_vec();
        names.sort_unstable();
        names.dedup();
        let quoted = names
            .iter()
            .map(|n| serde_json::to_string(n).unwrap_or_default())
            .collect();
        KeyColumns { names, quoted }
    }
}

/// The canonical key (as [`Key::from_value`] of the object of `columns`)
/// read straight from an object's JSON text, without building a map of it:
/// the decoder's hottest step when it was a full parse of every row.
/// `None` if the text is not an object, a column is missing or null, or
/// (with `exact`) the object has members other than the columns (a column
/// named twice counts once; an object naming a member twice gives `None`,
/// left to the caller's parse-everything path).
fn key_of_object_columns(text: &str, columns: &KeyColumns, exact: bool) -> Option<Key> {
    use serde::de::DeserializeSeed;
    let names = columns.names.as_slice();
    let mut de = serde_json::Deserializer::from_str(text);
    let (found, members) = ColumnPicker(names).deserialize(&mut de).ok()?;
    de.end().ok()?;
    if exact && members != names.len() {
        return None;
    }
    canonical_key(columns, found.into_iter().map(|raw| raw.map(RawValue::get)))
}

/// [`key_of_object_columns`] (not exact) for text serde_json has already
/// validated, such as a row: the members are found by
/// [`scan_valid_object`], which reads quotes, backslashes and brackets only,
/// instead of serde_json's second full pass over the row (a fifth of the
/// decoder's instructions). `None` if a column is missing or null, or if
/// the text does not have the shape of an object.
fn key_of_valid_object_columns(text: &str, columns: &KeyColumns) -> Option<Key> {
    let names = columns.names.as_slice();
    let mut found: Vec<Option<&str>> = vec![None; names.len()];
    let mut odd_name = false;
    scan_valid_object(text, |name, value| {
        let index = match name.escaped {
            false => {
                let plain = name.text.get(1..name.text.len().saturating_sub(1));
                names.iter().position(|c| Some(c.as_str()) == plain)
            }
            // An escaped name (`"person\u005fid"`) is decoded first.
            true => match serde_json::from_str::<String>(name.text) {
                Ok(n) => names.iter().position(|c| *c == n),
                Err(_) => {
                    odd_name = true;
                    None
                }
            },
        };
        // The last of equal names wins, as in a parsed map.
        if let Some(i) = index {
            found[i] = Some(value);
        }
    })?;
    if odd_name {
        return None;
    }
    canonical_key(columns, found.into_iter())
}

/// The canonical key of `columns` from their values' JSON texts (in the
/// columns' order); `None` if one is missing or null.
fn canonical_key<'t>(
    columns: &KeyColumns,
    values: impl Iterator<Item = Option<&'t str>>,
) -> Option<Key> {
    let mut out = String::with_capacity(64);
    out.push('{');
    for (i, (name, raw)) in columns.quoted.iter().zip(values).enumerate() {
        let raw = raw.filter(|r| *r != "null")?;
        if i > 0 {
            out.push(',');
        }
        out.push_str(name);
        out.push(':');
        write_canonical_raw(raw, &mut out)?;
    }
    out.push('}');
    Some(Key(out))
}

/// Appends the canonical form of a raw JSON value: its own text where that
/// is already canonical (strings without escapes, plain integers, booleans),
/// else the canonical form of its parsed value.
fn write_canonical_raw(text: &str, out: &mut String) -> Option<()> {
    let plain_string = unescaped_string(text).is_some();
    let digits = text.strip_prefix('-').unwrap_or(text);
    let plain_integer = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    if plain_string || plain_integer || text == "true" || text == "false" {
        out.push_str(text);
    } else {
        write_canonical(&serde_json::from_str::<Value>(text).ok()?, out);
    }
    Some(())
}

/// A member name as written, quotes included.
struct WrittenName<'t> {
    text: &'t str,
    /// Whether it holds a backslash escape (and must be decoded to compare).
    escaped: bool,
}

/// Calls `member` with the name and the value text of every member of the
/// object `text`, in order, and returns how many there were. For text
/// serde_json has already validated: only the structure is read (quotes,
/// backslashes, brackets, delimiters), not the values; `None` where that
/// structure is not an object's. Never panics, whatever the text.
fn scan_valid_object<'t>(
    text: &'t str,
    mut member: impl FnMut(WrittenName<'t>, &'t str),
) -> Option<usize> {
    let b = text.as_bytes();
    let mut i = skip_json_space(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_json_space(b, i + 1);
    let mut members = 0;
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if b.get(i) != Some(&b'"') {
                return None;
            }
            let (name_end, escaped) = json_string_end(b, i)?;
            let name = WrittenName {
                text: text.get(i..name_end)?,
                escaped,
            };
            i = skip_json_space(b, name_end);
            if b.get(i) != Some(&b':') {
                return None;
            }
            let start = skip_json_space(b, i + 1);
            i = json_value_end(b, start)?;
            member(name, text.get(start..i)?);
            members += 1;
            i = skip_json_space(b, i);
            match b.get(i) {
                Some(b',') => i = skip_json_space(b, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (skip_json_space(b, i) == b.len()).then_some(members)
}

fn skip_json_space(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The index just past the string whose opening quote is at `open`, and
/// whether the string holds an escape.
fn json_string_end(b: &[u8], open: usize) -> Option<(usize, bool)> {
    let mut i = open + 1;
    let mut escaped = false;
    loop {
        i += find_string_special(b.get(i..)?)?;
        match b[i] {
            b'"' => return Some((i + 1, escaped)),
            // A backslash and the character it escapes (`\u` escapes hold
            // no quote or backslash).
            b'\\' => {
                escaped = true;
                i += 2;
            }
            // A control character: not in validated text.
            _ => i += 1,
        }
    }
}

/// The index just past the value starting at `start`.
fn json_value_end(b: &[u8], start: usize) -> Option<usize> {
    match *b.get(start)? {
        b'"' => json_string_end(b, start).map(|(end, _)| end),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                match *b.get(i)? {
                    b'"' => {
                        i = json_string_end(b, i)?.0;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        // A number, `true`, `false` or `null`: up to the next delimiter.
        _ => {
            let len = b[start..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(b.len() - start);
            (len > 0).then_some(start + len)
        }
    }
}

/// Reads the object whose `{` is at `open`, validating its member names:
/// `value` is given each member's name (as written, between the quotes),
/// whether the name holds escapes, and where its value starts, and reads
/// the value to its end. The index just past the `}`.
#[inline(always)]
fn scan_object<'b>(
    b: &'b [u8],
    open: usize,
    mut value: impl FnMut(&'b [u8], bool, usize) -> Option<usize>,
) -> Option<usize> {
    if b.get(open) != Some(&b'{') {
        return None;
    }
    let mut i = skip_json_space(b, open + 1);
    if b.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let (name_end, escaped) = valid_string_end(b, i)?;
        let name = b.get(i + 1..name_end - 1)?;
        i = skip_json_space(b, name_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_json_space(b, value(name, escaped, skip_json_space(b, i + 1))?);
        match *b.get(i)? {
            b',' => i = skip_json_space(b, i + 1),
            b'}' => return Some(i + 1),
            _ => return None,
        }
    }
}

/// Fills `slot` with `value`; `None` if it was already filled (a member
/// given twice, which the typed serde_json path rejects).
fn set_once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    slot.replace(value).is_none().then_some(())
}

/// How deep the one-pass reader follows nested rows; deeper ones take the
/// general path (serde_json, whose own limit is 128).
const MAX_SCAN_DEPTH: u32 = 64;

/// The index just past the JSON value at `start` (no leading space), if it is
/// valid JSON as serde_json reads it: the decoder's own validation of rows
/// (serde_json spent a quarter of the decoder's instructions skipping their
/// strings). Conservative: `None` also for text serde_json accepts but this
/// reader leaves to it (escaped surrogates, nesting deeper than
/// [`MAX_SCAN_DEPTH`]), so the caller falls back to serde_json, never the
/// other way round. Never panics, whatever the text.
fn valid_value_end(b: &[u8], start: usize, depth: u32) -> Option<usize> {
    match *b.get(start)? {
        b'"' => valid_string_end(b, start).map(|(end, _)| end),
        b'{' => {
            let depth = depth.checked_sub(1)?;
            scan_object(b, start, |_, _, value| valid_value_end(b, value, depth))
        }
        b'[' => {
            let depth = depth.checked_sub(1)?;
            let mut i = skip_json_space(b, start + 1);
            if b.get(i) == Some(&b']') {
                return Some(i + 1);
            }
            loop {
                i = skip_json_space(b, valid_value_end(b, i, depth)?);
                match *b.get(i)? {
                    b',' => i = skip_json_space(b, i + 1),
                    b']' => return Some(i + 1),
                    _ => return None,
                }
            }
        }
        b't' => b[start..].starts_with(b"true").then_some(start + 4),
        b'f' => b[start..].starts_with(b"false").then_some(start + 5),
        b'n' => b[start..].starts_with(b"null").then_some(start + 4),
        _ => valid_number_end(b, start),
    }
}

/// The key columns' value texts in a row, found while the row is validated
/// (one pass instead of a second scan for the key).
#[derive(Default)]
struct KeyTexts<'t> {
    found: Vec<Option<&'t str>>,
    /// A member name written with escapes: it might name a key column, so
    /// the key is left to [`key_of_valid_object_columns`].
    odd_name: bool,
}

impl KeyTexts<'_> {
    fn key(&self, columns: &KeyColumns) -> Option<Option<Key>> {
        if self.odd_name || columns.names.is_empty() || self.found.len() != columns.names.len() {
            return None;
        }
        Some(canonical_key(columns, self.found.iter().copied()))
    }
}

/// [`valid_value_end`] of a row (an object at `start`), noting the value
/// texts of the members named `columns` (the last of equal names wins, as
/// in a parsed map).
fn valid_row_end<'t>(
    text: &'t str,
    start: usize,
    columns: &KeyColumns,
    keys: &mut KeyTexts<'t>,
) -> Option<usize> {
    let b = text.as_bytes();
    if b.get(start) != Some(&b'{') {
        return valid_value_end(b, start, MAX_SCAN_DEPTH);
    }
    keys.found.clear();
    keys.found.resize(columns.names.len(), None);
    scan_object(b, start, |name, escaped, value| {
        let end = valid_value_end(b, value, MAX_SCAN_DEPTH - 1)?;
        if escaped {
            keys.odd_name = true;
        } else if let Some(k) = columns.names.iter().position(|c| c.as_bytes() == name) {
            keys.found[k] = Some(text.get(value..end)?);
        }
        Some(end)
    })
}

/// The index just past the number at `start`:
/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn valid_number_end(b: &[u8], start: usize) -> Option<usize> {
    let digits = |i: usize| {
        b.get(i..)
            .map_or(0, |s| s.iter().take_while(|c| c.is_ascii_digit()).count())
    };
    let mut i = start + usize::from(b.get(start) == Some(&b'-'));
    match b.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => i += digits(i),
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        let n = digits(i + 1);
        if n == 0 {
            return None;
        }
        i += 1 + n;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let n = digits(i);
        if n == 0 {
            return None;
        }
        i += n;
    }
    Some(i)
}

/// The index just past the valid string whose opening quote is at `open`
/// (no control characters, only JSON's escapes; `\u` escapes of surrogates
/// are left to serde_json), and whether it holds an escape.
#[inline(always)]
fn valid_string_end(b: &[u8], open: usize) -> Option<(usize, bool)> {
    let mut i = open + 1;
    let mut escaped = false;
    loop {
        i += find_string_special(b.get(i..)?)?;
        match b[i] {
            b'"' => return Some((i + 1, escaped)),
            b'\\' => match *b.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                    escaped = true;
                    i += 2;
                }
                b'u' => {
                    let hex = b.get(i + 2..i + 6)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit)
                        || matches!(hex[0], b'd' | b'D') && !matches!(hex[1], b'0'..=b'7')
                    {
                        return None;
                    }
                    escaped = true;
                    i += 6;
                }
                _ => return None,
            },
            // A control character, which JSON strings must escape.
            _ => return None,
        }
    }
}

/// The index of the first `"`, `\\` or control character (below 0x20) in
/// `s`, eight bytes at a time.
#[inline(always)]
fn find_string_special(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
    while let Some(chunk) = s.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        let quotes = x ^ (ONES * u64::from(b'"'));
        let slashes = x ^ (ONES * u64::from(b'\\'));
        // The high bit of each byte that was zero, or below 0x20 (exact up
        // to the first one, which is all that is read).
        let found = ((quotes.wrapping_sub(ONES) & !quotes)
            | (slashes.wrapping_sub(ONES) & !slashes)
            | (x.wrapping_sub(ONES * 0x20) & !x))
            & HIGH_BITS;
        if found != 0 {
            return Some(i + found.trailing_zeros() as usize / 8);
        }
        i += 8;
    }
    s.get(i..)?
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .map(|p| i + p)
}

/// Visits an object once, keeping the raw values of the wanted columns and
/// counting its members.
struct ColumnPicker<'c>(&'c [String]);

impl<'de> serde::de::DeserializeSeed<'de> for ColumnPicker<'_> {
    type Value = (Vec<Option<&'de RawValue>>, usize);

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ColumnPicker<'_> {
    type Value = (Vec<Option<&'de RawValue>>, usize);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = vec![None; self.0.len()];
        let mut members = 0;
        while let Some(wanted) = map.next_key_seed(ColumnName(self.0))? {
            members += 1;
            match wanted {
                // The last of equal names wins, as in a parsed map.
                Some(i) => found[i] = Some(map.next_value::<&'de RawValue>()?),
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok((found, members))
    }
}

/// A member name, as the index of the column it names (if any).
struct ColumnName<'c>(&'c [String]);

impl<'de> serde::de::DeserializeSeed<'de> for ColumnName<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for ColumnName<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|c| c == v))
    }
}

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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
    /// A pipeline's repartition topic: [`crate::merge::Fact`]s keyed by
    /// national ID. Internal; not a source format.
    #[serde(skip)]
    Facts,
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
    /// Rows whose national ID is invalid, or inconsistent with the row, are
    /// rejected.
    pub national_id: Option<NationalIdCheck>,
}

/// Which columns of a source's rows hold a national ID and the facts it
/// encodes (birth year, gender), checked on every inserted or updated row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NationalIdCheck {
    pub column: String,
    pub birth_date_column: Option<String>,
    pub gender_column: Option<String>,
    /// A row without a national ID (column absent or null) is rejected.
    pub required: bool,
}

/// A primary key in canonical form: compact JSON with object members sorted
/// by name, so that equal keys are equal bytes whatever produced them.
/// Numbers keep their digits exactly (serde_json's `arbitrary_precision`):
/// through `f64`, distinct keys beyond 2^53 would collide.
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
/// Its strings are shared: a feed repeats the same connector, database and
/// table in every event (see [`shared_text`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceInfo {
    pub connector: Arc<str>,
    /// Logical server name (topic prefix).
    pub name: Arc<str>,
    pub db: Arc<str>,
    pub schema: Arc<str>,
    pub table: Arc<str>,
    /// Commit time in the agency database, ms since the epoch.
    pub ts_ms: i64,
    /// PostgreSQL log sequence number of the change.
    pub lsn: Option<u64>,
    pub tx_id: Option<i64>,
    /// `true`, `first`, `last`, `false`, `incremental`, ... (empty when absent).
    pub snapshot: Arc<str>,
    /// Where the change sits in the database's log, read from the fields of
    /// its connector ([`crate::ordering`]); `None` when it names none.
    pub position: Option<LogPosition>,
    /// The event is a tombstone (a key and a null value): it has no source
    /// block, and deletes the row written by the event before it in its
    /// stream.
    pub tombstone: bool,
}

impl SourceInfo {
    /// The connector, as a metric label: named by the event, else told by
    /// its position's fields.
    pub fn connector_label(&self) -> &'static str {
        match crate::ordering::connector_label(&self.connector) {
            "none" => crate::ordering::family(self.position.as_ref()),
            named => named,
        }
    }
}

/// The `source` fields that say where a change sits in its database's log
/// (besides `lsn` and `ts_ms`), read by [`crate::ordering::position_of`].
const POSITION_FIELDS: [&str; 14] = [
    "sequence",
    "server_id",
    "file",
    "pos",
    "row",
    "gtid",
    "commit_lsn",
    "change_lsn",
    "event_serial_no",
    "scn",
    "commit_scn",
    "rs_id",
    "ssn",
    "ord",
];

/// [`crate::ordering::position_of`] with its error worded as a decode error.
fn position_from<'a>(
    connector: &str,
    ts_ms: i64,
    field: &crate::ordering::FieldLookup<'a>,
    prefix: &str,
) -> Result<Option<LogPosition>, DecodeError> {
    crate::ordering::position_of(connector, ts_ms, field).map_err(|e| {
        DecodeError::wrong_type(&format!("{prefix}{}", e.field), e.expected, "another value")
    })
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

impl ChangeEvent {
    /// The delete a tombstone of `key` says (see [`SourceInfo::tombstone`]).
    pub fn tombstone(key: Key) -> ChangeEvent {
        ChangeEvent {
            op: ChangeOp::Delete,
            key: Some(key),
            before: None,
            after: None,
            source: SourceInfo {
                tombstone: true,
                ..SourceInfo::default()
            },
            processed_ts_ms: None,
        }
    }
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
    /// A fact re-keyed by national ID, from a pipeline's repartition topic.
    Fact(Box<crate::merge::Fact>),
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
    InvalidNationalId,
}

impl DecodeErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeErrorKind::Oversized => "oversized",
            DecodeErrorKind::MalformedJson => "malformed_json",
            DecodeErrorKind::NotAnObject => "not_an_object",
            DecodeErrorKind::UnknownOp => "unknown_op",
            DecodeErrorKind::WrongType => "wrong_type",
            DecodeErrorKind::MissingField => "missing_field",
            DecodeErrorKind::MissingKey => "missing_key",
            DecodeErrorKind::InvalidNationalId => "invalid_national_id",
        }
    }
}

/// A record that cannot be applied, with a reason fit for a dead-letter header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", kind.as_str())]
pub struct DecodeError {
    pub kind: DecodeErrorKind,
    pub message: String,
    /// Finer reason for metrics (the national-ID check's label).
    pub detail: Option<&'static str>,
}

impl DecodeError {
    pub fn new(kind: DecodeErrorKind, message: impl Into<String>) -> Self {
        DecodeError {
            kind,
            message: message.into(),
            detail: None,
        }
    }

    fn wrong_type(field: &str, expected: &str, got: &str) -> Self {
        DecodeError::new(
            DecodeErrorKind::WrongType,
            format!("{field}: expected {expected}, got {got}"),
        )
    }

    fn missing(field: &str) -> Self {
        DecodeError::new(DecodeErrorKind::MissingField, format!("{field} is missing"))
    }
}

/// Checks the national ID of a row (see [`NationalIdCheck`]).
fn check_national_id(check: &NationalIdCheck, row: &Row) -> Result<(), DecodeError> {
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(row.as_str()) else {
        return Ok(()); // rows are objects by construction
    };
    let reject = |detail: &'static str, message: String| DecodeError {
        kind: DecodeErrorKind::InvalidNationalId,
        message: format!("{}: {message}", check.column),
        detail: Some(detail),
    };
    let text = match map.get(&check.column) {
        None | Some(Value::Null) if check.required => {
            return Err(reject("missing", "national ID is missing".into()));
        }
        None | Some(Value::Null) => return Ok(()),
        Some(value) => crate::merge::national_id_text(value).ok_or_else(|| {
            reject(
                "not_text",
                format!("expected text, got {}", json_type(value)),
            )
        })?,
    };
    let column = |c: &Option<String>| c.as_ref().and_then(|c| map.get(c));
    crate::national_id::check_record(
        &text,
        column(&check.birth_date_column),
        column(&check.gender_column),
    )
    .map(|_| ())
    .map_err(|e| reject(e.label(), format!("{text:?}: {e}")))
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

/// JSON type of raw JSON text, from its first byte.
fn raw_type(raw: &RawValue) -> &'static str {
    text_type(raw.get())
}

/// The JSON type of a valid value's text.
fn text_type(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'n') => "null",
        Some(b't' | b'f') => "boolean",
        Some(b'"') => "string",
        Some(b'[') => "array",
        Some(b'{') => "object",
        _ => "number",
    }
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// Is this the topic Debezium writes heartbeats to?
pub fn is_heartbeat_topic(topic: &str) -> bool {
    topic.starts_with("__debezium-heartbeat")
}

/// Is this the transaction-metadata topic (`<prefix>.transaction`)?
pub fn is_transaction_topic(topic: &str) -> bool {
    topic.ends_with(".transaction")
}

/// A present field, `null` included (serde's `Option` would fold `null`
/// into `None`, and the wrapper check needs to tell them apart).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// The top level of a Debezium value: envelope, wrapper or transaction
/// marker, fields borrowed unparsed.
#[derive(Deserialize)]
struct RawTop<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    schema: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    op: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    before: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    after: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    source: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    ts_ms: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    status: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    event_count: Option<&'a RawValue>,
}

impl RawTop<'_> {
    fn is_wrapper(&self) -> bool {
        self.schema.is_some()
            && self.payload.is_some()
            && self.op.is_none()
            && self.before.is_none()
            && self.after.is_none()
            && self.source.is_none()
    }

    fn looks_like_transaction(&self) -> bool {
        self.op.is_none()
            && self.id.is_some()
            && matches!(
                self.status.map(RawValue::get),
                Some("\"BEGIN\"" | "\"END\"")
            )
    }
}

/// A plain change event read in one pass, its `source` block typed on the
/// way (see [`Decoder::decode_plain_envelope`]); anything it does not
/// accept takes the general path, which says what is wrong.
struct PlainEnvelope<'a> {
    op: &'a str,
    /// The texts of `before` and `after` when present (`null` included).
    before: Option<&'a str>,
    after: Option<&'a str>,
    /// The key columns' texts in `before` and `after`.
    before_keys: KeyTexts<'a>,
    after_keys: KeyTexts<'a>,
    source: SourceInfo,
    ts_ms: Option<i64>,
}

impl<'a> PlainEnvelope<'a> {
    /// Reads `text` if it is valid JSON and an object whose members `op` (a
    /// string without escapes), `source`, and, if present, `before`,
    /// `after` and `ts_ms` (an integer or null) appear once each, under
    /// names written without escapes; `None` otherwise (serde_json's
    /// general path then reads or rejects it). Rows are validated by
    /// [`valid_row_end`] and kept as text; other members are validated and
    /// skipped, as serde_json would.
    fn scan(text: &'a str, columns: &KeyColumns) -> Option<Self> {
        let b = text.as_bytes();
        let (mut before_keys, mut after_keys) = (KeyTexts::default(), KeyTexts::default());
        let (mut op, mut before, mut after, mut source, mut ts_ms) = (None, None, None, None, None);
        let end = scan_object(b, skip_json_space(b, 0), |name, escaped, start| {
            if escaped {
                return None;
            }
            let end = match name {
                b"source" => {
                    let (info, end) = match scan_source(text, start) {
                        Some(pair) => pair,
                        // Typed by serde_json: its end is where it stopped.
                        None => {
                            let mut stream = serde_json::Deserializer::from_str(text.get(start..)?)
                                .into_iter::<TypedSource<'a>>();
                            let typed = stream.next()?.ok()?;
                            let end = start + stream.byte_offset();
                            (typed.into_info(text.get(start..end)?)?.ok()?, end)
                        }
                    };
                    set_once(&mut source, info)?;
                    return Some(end);
                }
                b"before" => valid_row_end(text, start, columns, &mut before_keys)?,
                b"after" => valid_row_end(text, start, columns, &mut after_keys)?,
                _ => valid_value_end(b, start, MAX_SCAN_DEPTH)?,
            };
            let value = text.get(start..end)?;
            match name {
                b"op" => set_once(&mut op, value)?,
                b"before" => set_once(&mut before, value)?,
                b"after" => set_once(&mut after, value)?,
                b"ts_ms" => set_once(&mut ts_ms, value)?,
                _ => {}
            }
            Some(end)
        })?;
        if skip_json_space(b, end) != b.len() {
            return None;
        }
        let op = unescaped_string(op?)?;
        let ts_ms = match ts_ms {
            None | Some("null") => None,
            Some(t) => Some(json_integer(t)?),
        };
        Some(PlainEnvelope {
            op,
            before,
            after,
            before_keys,
            after_keys,
            source: source?,
            ts_ms,
        })
    }
}

/// The `source` block, fields borrowed unparsed.
#[derive(Deserialize)]
struct RawSource<'a> {
    #[serde(borrow, default)]
    connector: Option<&'a RawValue>,
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    db: Option<&'a RawValue>,
    #[serde(borrow, default)]
    schema: Option<&'a RawValue>,
    #[serde(borrow, default)]
    table: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ts_ms: Option<&'a RawValue>,
    #[serde(borrow, default)]
    lsn: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "txId")]
    tx_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    snapshot: Option<&'a RawValue>,
}

/// The `source` block when every field has its expected type (see
/// [`decode_source`]).
#[derive(Deserialize)]
struct TypedSource<'a> {
    #[serde(default)]
    connector: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    db: Option<String>,
    #[serde(default)]
    schema: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    ts_ms: Option<i64>,
    #[serde(default)]
    lsn: Option<u64>,
    #[serde(borrow, default, rename = "txId")]
    tx_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    snapshot: Option<&'a RawValue>,
}

/// The position fields of a `source` block (or a flattened row's metadata),
/// unparsed.
#[derive(Deserialize, Default)]
struct PositionFields<'a> {
    #[serde(borrow, default)]
    lsn: Option<&'a RawValue>,
    #[serde(borrow, default)]
    sequence: Option<&'a RawValue>,
    #[serde(borrow, default)]
    server_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    file: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pos: Option<&'a RawValue>,
    #[serde(borrow, default)]
    row: Option<&'a RawValue>,
    #[serde(borrow, default)]
    gtid: Option<&'a RawValue>,
    #[serde(borrow, default)]
    commit_lsn: Option<&'a RawValue>,
    #[serde(borrow, default)]
    change_lsn: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event_serial_no: Option<&'a RawValue>,
    #[serde(borrow, default)]
    scn: Option<&'a RawValue>,
    #[serde(borrow, default)]
    commit_scn: Option<&'a RawValue>,
    #[serde(borrow, default)]
    rs_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ssn: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ord: Option<&'a RawValue>,
}

impl<'a> PositionFields<'a> {
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        match name {
            "sequence" => self.sequence,
            "server_id" => self.server_id,
            "file" => self.file,
            "pos" => self.pos,
            "row" => self.row,
            "gtid" => self.gtid,
            "commit_lsn" => self.commit_lsn,
            "change_lsn" => self.change_lsn,
            "event_serial_no" => self.event_serial_no,
            "scn" => self.scn,
            "commit_scn" => self.commit_scn,
            "rs_id" => self.rs_id,
            "ssn" => self.ssn,
            "ord" => self.ord,
            "lsn" => self.lsn,
            _ => None,
        }
    }

    /// The position named by the `source` block `text` (an object), a
    /// second pass over it: the general path only.
    fn position_of(
        text: &str,
        connector: &str,
        ts_ms: i64,
    ) -> Result<Option<LogPosition>, DecodeError> {
        let fields: PositionFields<'_> = serde_json::from_str(text).map_err(|e| {
            DecodeError::new(DecodeErrorKind::MalformedJson, format!("source: {e}"))
        })?;
        let lookup = |name: &'static str| {
            fields
                .get(name)
                .map(|r| std::borrow::Cow::Borrowed(r.get()))
        };
        position_from(connector, ts_ms, &lookup, "source.")
    }
}

impl TypedSource<'_> {
    /// `None` without `ts_ms` (the field-by-field reader words that error).
    /// `text` is the block's own text, read again for the position.
    fn into_info(self, text: &str) -> Option<Result<SourceInfo, DecodeError>> {
        let ts_ms = self.ts_ms?;
        let connector = self.connector.unwrap_or_default();
        let position = match PositionFields::position_of(text, &connector, ts_ms) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        Some(snapshot_of(self.snapshot).map(|snapshot| SourceInfo {
            connector: connector.into(),
            name: self.name.unwrap_or_default().into(),
            db: self.db.unwrap_or_default().into(),
            schema: self.schema.unwrap_or_default().into(),
            table: self.table.unwrap_or_default().into(),
            ts_ms,
            lsn: self.lsn,
            tx_id: self.tx_id.and_then(|t| json_integer(t.get())),
            snapshot: snapshot.into(),
            position,
            tombstone: false,
        }))
    }
}

fn raw_i64(raw: Option<&RawValue>, field: &str) -> Result<Option<i64>, DecodeError> {
    match raw {
        None => Ok(None),
        Some(r) if is_null(r) => Ok(None),
        Some(r) => serde_json::from_str::<i64>(r.get())
            .map(Some)
            .map_err(|_| DecodeError::wrong_type(field, "integer", raw_type(r))),
    }
}

fn raw_u64(raw: Option<&RawValue>, field: &str) -> Result<Option<u64>, DecodeError> {
    match raw {
        None => Ok(None),
        Some(r) if is_null(r) => Ok(None),
        Some(r) => serde_json::from_str::<u64>(r.get())
            .map(Some)
            .map_err(|_| DecodeError::wrong_type(field, "non-negative integer", raw_type(r))),
    }
}

/// A string field (absent or null: empty).
fn raw_string(raw: Option<&RawValue>, field: &str) -> Result<String, DecodeError> {
    match raw {
        None => Ok(String::new()),
        Some(r) if is_null(r) => Ok(String::new()),
        Some(r) => serde_json::from_str::<String>(r.get())
            .map_err(|_| DecodeError::wrong_type(field, "string", raw_type(r))),
    }
}

/// `before` / `after`: an object or null.
fn raw_row(raw: Option<&RawValue>, field: &str) -> Result<Option<Row>, DecodeError> {
    text_row(raw.map(RawValue::get), field)
}

/// A validated `before` or `after` text (absent, `null` or an object) as a
/// row.
fn text_row(text: Option<&str>, field: &str) -> Result<Option<Row>, DecodeError> {
    match text {
        None | Some("null") => Ok(None),
        Some(t) if t.starts_with('{') => Ok(Some(Row::from_object_text(t))),
        // MongoDB's connector writes the document as a string of JSON.
        Some(t) if t.starts_with('"') => serde_json::from_str::<String>(t)
            .ok()
            .and_then(|doc| serde_json::from_str::<Map<String, Value>>(&doc).ok())
            .map(|doc| Some(Row::from_map(&doc)))
            .ok_or_else(|| {
                DecodeError::wrong_type(
                    field,
                    "object, a string of a JSON object, or null",
                    "string",
                )
            }),
        Some(t) => Err(DecodeError::wrong_type(
            field,
            "object or null",
            text_type(t),
        )),
    }
}

/// Reads the `source` block at `start` in one pass, as [`TypedSource`]
/// would, with its end; `None` for anything but the common shape (an
/// object whose `ts_ms` is present, the fields ndc reads of their types or
/// null, strings without escapes, no field twice), which serde_json then
/// reads or rejects.
fn scan_source(text: &str, start: usize) -> Option<(SourceInfo, usize)> {
    let b = text.as_bytes();
    let mut fields: [Option<&str>; 9] = [None; 9];
    let mut position_fields: [Option<&str>; POSITION_FIELDS.len()] = [None; POSITION_FIELDS.len()];
    let end = scan_object(b, start, |name, escaped, value| {
        if escaped {
            return None;
        }
        let end = valid_value_end(b, value, MAX_SCAN_DEPTH)?;
        let slot = match name {
            b"connector" => 0,
            b"name" => 1,
            b"db" => 2,
            b"schema" => 3,
            b"table" => 4,
            b"ts_ms" => 5,
            b"lsn" => 6,
            b"txId" => 7,
            b"snapshot" => 8,
            _ => {
                if let Some(i) = POSITION_FIELDS.iter().position(|f| f.as_bytes() == name) {
                    set_once(&mut position_fields[i], text.get(value..end)?)?;
                }
                return Some(end);
            }
        };
        set_once(&mut fields[slot], text.get(value..end)?)?;
        Some(end)
    })?;
    /// A string without escapes (its text), or null (empty), shared with
    /// the previous event's value of the same field.
    fn plain_string(slot: SourceText, field: Option<&str>) -> Option<Arc<str>> {
        match field {
            None | Some("null") => Some(shared_text(slot, "")),
            Some(t) => unescaped_string(t).map(|t| shared_text(slot, t)),
        }
    }
    fn integer<T: std::str::FromStr>(field: Option<&str>) -> Option<Option<T>> {
        match field {
            None | Some("null") => Some(None),
            Some(t) => json_integer(t).map(Some),
        }
    }
    let [
        connector,
        name,
        db,
        schema,
        table,
        ts_ms,
        lsn,
        tx_id,
        snapshot,
    ] = fields;
    let snapshot = match snapshot {
        Some(t @ ("true" | "false")) => shared_text(SourceText::Snapshot, t),
        other => plain_string(SourceText::Snapshot, other)?,
    };
    let connector = plain_string(SourceText::Connector, connector)?;
    let ts_ms = integer(ts_ms)??;
    let lookup = |name: &'static str| {
        let raw = match name {
            "lsn" => lsn,
            _ => POSITION_FIELDS
                .iter()
                .position(|f| *f == name)
                .and_then(|i| position_fields[i]),
        };
        raw.map(std::borrow::Cow::Borrowed)
    };
    // A position field the general path would reject: it words the error.
    let position = crate::ordering::position_of(&connector, ts_ms, &lookup).ok()?;
    let info = SourceInfo {
        connector,
        name: plain_string(SourceText::Name, name)?,
        db: plain_string(SourceText::Db, db)?,
        schema: plain_string(SourceText::Schema, schema)?,
        table: plain_string(SourceText::Table, table)?,
        ts_ms,
        lsn: integer(lsn)?,
        tx_id: tx_id.and_then(json_integer),
        snapshot,
        position,
        tombstone: false,
    };
    Some((info, end))
}

/// The strings of a `source` block, each remembered by [`shared_text`].
#[derive(Clone, Copy)]
enum SourceText {
    Connector,
    Name,
    Db,
    Schema,
    Table,
    Snapshot,
}

/// `text` as a shared string: the one this thread made last for `slot` when
/// equal (a feed repeats its connector, database and table in every event),
/// else a new one. Six strings allocated per event, and freed on the
/// writer's thread, were 2% of the node's instructions.
fn shared_text(slot: SourceText, text: &str) -> Arc<str> {
    thread_local! {
        static LAST: std::cell::RefCell<[Option<Arc<str>>; 6]> = Default::default();
    }
    LAST.with_borrow_mut(|last| {
        let last = &mut last[slot as usize];
        match last {
            Some(shared) if **shared == *text => shared.clone(),
            _ => last.insert(Arc::from(text)).clone(),
        }
    })
}

/// The contents of a JSON string's text written without escapes (so they
/// are its value), quotes removed; `None` for any other text.
fn unescaped_string(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains('\\')).then_some(inner)
}

/// The integer of type `T` a validated JSON number's text is for serde_json:
/// digits only, in range (`-0` is a float to serde_json, like `1.0` and
/// `1e3`).
fn json_integer<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.starts_with("-0") {
        return None;
    }
    text.parse().ok()
}

/// Decodes records of one source.
#[derive(Debug, Clone)]
pub struct Decoder {
    config: DecoderConfig,
    key_names: KeyColumns,
}

impl Decoder {
    pub fn new(config: DecoderConfig) -> Self {
        Decoder {
            key_names: KeyColumns::new(&config.key_columns),
            config,
        }
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
        let decoded = self.decode_record(topic, key, value)?;
        if let (Some(check), Decoded::Change(event)) = (&self.config.national_id, &decoded)
            && let Some(after) = &event.after
        {
            check_national_id(check, after)?;
        }
        Ok(decoded)
    }

    fn decode_record(
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
                    .and_then(|v| serde_json::from_slice::<Value>(v).ok())
                    .map(unwrap_envelope)
                    .and_then(|p| p.get("ts_ms").and_then(Value::as_i64)),
            });
        }
        let Some(value) = value else {
            if is_transaction_topic(topic) {
                return Ok(Decoded::Tombstone {
                    key: key.map(parse_kafka_key).transpose()?,
                });
            }
            return self.tombstone(key);
        };
        let text = std::str::from_utf8(value).map_err(|e| {
            DecodeError::new(
                DecodeErrorKind::MalformedJson,
                format!("value: not UTF-8: {e}"),
            )
        })?;
        match self.config.format {
            Format::Facts => crate::merge::Fact::from_json(value)
                .map(|f| Decoded::Fact(Box::new(f)))
                .map_err(|e| match e {
                    crate::merge::FactError::Malformed(m) => {
                        DecodeError::new(DecodeErrorKind::MalformedJson, m)
                    }
                    crate::merge::FactError::InvalidNationalId(_, ref cause) => DecodeError {
                        kind: DecodeErrorKind::InvalidNationalId,
                        message: e.to_string(),
                        detail: Some(cause.label()),
                    },
                }),
            Format::Debezium => self.decode_envelope_text(topic, text, key),
            Format::Flattened => {
                let payload = unwrap_envelope(parse_json(value, "value")?);
                match payload {
                    Value::Object(row) => self.decode_flattened(row, key),
                    Value::Null => self.tombstone(key),
                    other => Err(DecodeError::new(
                        DecodeErrorKind::NotAnObject,
                        format!("value: expected an object, got {}", json_type(&other)),
                    )),
                }
            }
        }
    }

    /// A null value. In a table's feed, whatever its format, it deletes
    /// the key's row if that row was written by the event before it in its
    /// stream (a flattened feed in `drop` mode says deletes with it alone;
    /// after a Debezium delete it finds the row deleted already, and a
    /// compacted topic may hold it without the delete).
    fn tombstone(&self, key: Option<&[u8]>) -> Result<Decoded, DecodeError> {
        match (self.config.format, key) {
            (Format::Facts, _) | (Format::Debezium, None) => Ok(Decoded::Tombstone {
                key: key.map(parse_kafka_key).transpose()?,
            }),
            (Format::Flattened, None) => Err(DecodeError::new(
                DecodeErrorKind::MissingKey,
                "tombstone without a message key",
            )),
            (Format::Debezium | Format::Flattened, Some(key)) => Ok(Decoded::Change(
                ChangeEvent::tombstone(self.key_of(None, Some(key))?),
            )),
        }
    }

    fn decode_envelope_text(
        &self,
        topic: &str,
        text: &str,
        key: Option<&[u8]>,
    ) -> Result<Decoded, DecodeError> {
        if !is_transaction_topic(topic)
            && let Some(decoded) = self.decode_plain_envelope(text, key)
        {
            return decoded;
        }
        self.decode_envelope_general(topic, text, key)
    }

    /// The common case in one pass over the text: an insert, update, delete
    /// or snapshot read whose `source` block has its expected types. The
    /// general path scans the `source` block twice (once to find its end,
    /// once to read it), a quarter of the decoder's instructions. `None`:
    /// not such an event, or one the general path rejects, so that the
    /// reason is worded in one place.
    fn decode_plain_envelope(
        &self,
        text: &str,
        key: Option<&[u8]>,
    ) -> Option<Result<Decoded, DecodeError>> {
        let top = PlainEnvelope::scan(text, &self.key_names)?;
        let op = match top.op {
            "c" => ChangeOp::Create,
            "u" => ChangeOp::Update,
            "d" => ChangeOp::Delete,
            "r" => ChangeOp::Read,
            _ => return None,
        };
        let before = text_row(top.before, "before").ok()?;
        let after = text_row(top.after, "after").ok()?;
        let source = top.source;
        let (row, keys) = match op {
            ChangeOp::Delete => (before.as_ref(), &top.before_keys),
            // Without `after`, the general path words the error.
            _ => (Some(after.as_ref()?), &top.after_keys),
        };
        // A row's key columns were noted as it was validated; only a name
        // written with escapes sends it to the structural scan.
        let row_key = || {
            keys.key(&self.key_names)
                .unwrap_or_else(|| row.and_then(|r| r.key_of_columns(&self.key_names)))
        };
        Some(self.key_of_with(row_key, key).map(|key| {
            Decoded::Change(ChangeEvent {
                op,
                key: Some(key),
                before,
                after,
                source,
                processed_ts_ms: top.ts_ms,
            })
        }))
    }

    fn decode_envelope_general(
        &self,
        topic: &str,
        text: &str,
        key: Option<&[u8]>,
    ) -> Result<Decoded, DecodeError> {
        let trimmed = text.trim_start();
        if !trimmed.starts_with('{') {
            // Not an object: say which JSON it is, or that it is not JSON.
            let v: Value = serde_json::from_str(text).map_err(|e| {
                DecodeError::new(DecodeErrorKind::MalformedJson, format!("value: {e}"))
            })?;
            return Err(DecodeError::new(
                DecodeErrorKind::NotAnObject,
                format!("value: expected an object, got {}", json_type(&v)),
            ));
        }
        let top: RawTop<'_> = serde_json::from_str(text)
            .map_err(|e| DecodeError::new(DecodeErrorKind::MalformedJson, format!("value: {e}")))?;
        if top.is_wrapper() {
            let payload = top.payload.map(RawValue::get).unwrap_or("null");
            return match payload.as_bytes().first() {
                Some(b'{') => self.decode_envelope_text(topic, payload, key),
                Some(b'n') => self.tombstone(key),
                _ => Err(DecodeError::new(
                    DecodeErrorKind::NotAnObject,
                    format!(
                        "payload: expected an object, got {}",
                        top.payload.map_or("nothing", raw_type)
                    ),
                )),
            };
        }
        if is_transaction_topic(topic) || top.looks_like_transaction() {
            return decode_transaction(&top).map(Decoded::Transaction);
        }
        let op = match top.op {
            None => return Err(DecodeError::missing("op")),
            Some(r) if is_null(r) => return Err(DecodeError::missing("op")),
            Some(r) => match serde_json::from_str::<String>(r.get()) {
                Err(_) => return Err(DecodeError::wrong_type("op", "string", raw_type(r))),
                Ok(s) => match s.as_str() {
                    "c" => ChangeOp::Create,
                    "u" => ChangeOp::Update,
                    "d" => ChangeOp::Delete,
                    "r" => ChangeOp::Read,
                    "t" => ChangeOp::Truncate,
                    "m" => return Ok(Decoded::Message),
                    other => {
                        return Err(DecodeError::new(
                            DecodeErrorKind::UnknownOp,
                            format!(
                                "op: unknown operation {other:?} (expected c, u, d, r, t or m)"
                            ),
                        ));
                    }
                },
            },
        };
        let before = raw_row(top.before, "before")?;
        let after = raw_row(top.after, "after")?;
        let source = match top.source {
            None => return Err(DecodeError::missing("source")),
            Some(r) if is_null(r) => return Err(DecodeError::missing("source")),
            Some(r) if r.get().starts_with('{') => decode_source(r)?,
            Some(r) => return Err(DecodeError::wrong_type("source", "object", raw_type(r))),
        };
        let processed_ts_ms = raw_i64(top.ts_ms, "ts_ms")?;
        if matches!(op, ChangeOp::Create | ChangeOp::Read | ChangeOp::Update) && after.is_none() {
            return Err(DecodeError::missing("after"));
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

    fn decode_flattened(
        &self,
        mut row: Map<String, Value>,
        key: Option<&[u8]>,
    ) -> Result<Decoded, DecodeError> {
        let deleted = match row.get("__deleted") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if s == "true" || s == "false" => s == "true",
            Some(other) => {
                return Err(DecodeError::wrong_type(
                    "__deleted",
                    "\"true\" or \"false\"",
                    json_type(other),
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
            Some(other) => return Err(DecodeError::wrong_type("__op", "string", json_type(other))),
        };
        let op = match (deleted, op) {
            (true, _) | (false, Some(ChangeOp::Delete)) => ChangeOp::Delete,
            (false, Some(op)) => op,
            (false, None) => ChangeOp::Update,
        };
        let ts_ms = map_i64(&row, "__source_ts_ms")?
            .or(map_i64(&row, "__ts_ms")?)
            .unwrap_or(0);
        let connector = first_non_empty(
            map_string(&row, "__source_connector"),
            map_string(&row, "__connector"),
        );
        // `add.fields` names a source field `__source_<f>`, or `__<f>`.
        let metadata = |name: &'static str| {
            row.get(&format!("__source_{name}"))
                .or_else(|| row.get(&format!("__{name}")))
                .map(|v| std::borrow::Cow::Owned(v.to_string()))
        };
        let position = position_from(&connector, ts_ms, &metadata, "__")?;
        let source = SourceInfo {
            ts_ms,
            lsn: map_u64(&row, "__lsn")?.or(map_u64(&row, "__source_lsn")?),
            db: first_non_empty(map_string(&row, "__db"), map_string(&row, "__source_db")).into(),
            schema: first_non_empty(
                map_string(&row, "__schema"),
                map_string(&row, "__source_schema"),
            )
            .into(),
            table: first_non_empty(
                map_string(&row, "__table"),
                map_string(&row, "__source_table"),
            )
            .into(),
            connector: connector.into(),
            snapshot: first_non_empty(
                map_string(&row, "__source_snapshot"),
                map_string(&row, "__snapshot"),
            )
            .into(),
            position,
            ..SourceInfo::default()
        };
        row.retain(|name, _| !name.starts_with("__"));
        let row = Row::from_map(&row);
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
        self.key_of_with(
            || row.and_then(|r| r.key_of_columns(&self.key_names)),
            kafka_key,
        )
    }

    /// [`Decoder::key_of`], the row's key (from its key columns) computed by
    /// `row_key` only when needed.
    fn key_of_with(
        &self,
        row_key: impl FnOnce() -> Option<Key>,
        kafka_key: Option<&[u8]>,
    ) -> Result<Key, DecodeError> {
        // Debezium's message key holds exactly the primary-key columns: when
        // they are the configured ones, it is the key, without reading the row.
        if !self.config.key_columns.is_empty()
            && let Some(key) = kafka_key
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|text| key_of_object_columns(text, &self.key_names, true))
        {
            return Ok(key);
        }
        if !self.config.key_columns.is_empty()
            && let Some(bytes) = kafka_key
            && let Ok(Value::Object(k)) =
                serde_json::from_slice::<Value>(bytes).map(unwrap_envelope)
            && k.len() == self.key_names.names.len()
            && self
                .config
                .key_columns
                .iter()
                .all(|c| k.get(c).is_some_and(|v| !v.is_null()))
        {
            return Ok(Key::from_value(&Value::Object(k)));
        }
        if !self.config.key_columns.is_empty()
            && let Some(key) = row_key()
        {
            return Ok(key);
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

/// A flattened row's integer metadata field: a number, or its digits as a
/// string (`add.fields` writes `"__lsn": "123456789"`).
fn map_i64(map: &Map<String, Value>, field: &str) -> Result<Option<i64>, DecodeError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| DecodeError::wrong_type(field, "integer", json_type(v))),
        Some(v @ Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| DecodeError::wrong_type(field, "integer", json_type(v))),
        Some(v) => Err(DecodeError::wrong_type(field, "integer", json_type(v))),
    }
}

fn map_u64(map: &Map<String, Value>, field: &str) -> Result<Option<u64>, DecodeError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| DecodeError::wrong_type(field, "non-negative integer", json_type(v))),
        Some(v @ Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| DecodeError::wrong_type(field, "non-negative integer", json_type(v))),
        Some(v) => Err(DecodeError::wrong_type(
            field,
            "non-negative integer",
            json_type(v),
        )),
    }
}

fn map_string(map: &Map<String, Value>, field: &str) -> String {
    match map.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    }
}

fn decode_source(raw: &RawValue) -> Result<SourceInfo, DecodeError> {
    // A well-formed block in one typed pass (5% of the node's CPU went to
    // reading it field by field); anything it does not accept takes the
    // field-by-field path below, which says what is wrong.
    if let Ok(s) = serde_json::from_str::<TypedSource<'_>>(raw.get())
        && let Some(info) = s.into_info(raw.get())
    {
        return info;
    }
    decode_source_by_field(raw)
}

/// The `source` block read field by field, each checked for its type.
fn decode_source_by_field(raw: &RawValue) -> Result<SourceInfo, DecodeError> {
    let s: RawSource<'_> = serde_json::from_str(raw.get())
        .map_err(|e| DecodeError::new(DecodeErrorKind::MalformedJson, format!("source: {e}")))?;
    let ts_ms =
        raw_i64(s.ts_ms, "source.ts_ms")?.ok_or_else(|| DecodeError::missing("source.ts_ms"))?;
    let snapshot = snapshot_of(s.snapshot)?;
    Ok(SourceInfo {
        connector: raw_string(s.connector, "source.connector")?.into(),
        name: raw_string(s.name, "source.name")?.into(),
        db: raw_string(s.db, "source.db")?.into(),
        schema: raw_string(s.schema, "source.schema")?.into(),
        table: raw_string(s.table, "source.table")?.into(),
        ts_ms,
        lsn: raw_u64(s.lsn, "source.lsn")?,
        // Oracle writes its transaction id as text ("6.28.807"): not a number.
        tx_id: raw_i64(s.tx_id, "source.txId").ok().flatten(),
        snapshot: snapshot.into(),
        position: PositionFields::position_of(
            raw.get(),
            &raw_string(s.connector, "source.connector")?,
            ts_ms,
        )?,
        tombstone: false,
    })
}

/// `source.snapshot`: a string (`"true"`, `"last"`, `"incremental"`, …) or,
/// from older connectors, a boolean.
fn snapshot_of(raw: Option<&RawValue>) -> Result<String, DecodeError> {
    Ok(match raw {
        None => String::new(),
        Some(r) if is_null(r) => String::new(),
        Some(r) if r.get() == "true" || r.get() == "false" => r.get().to_string(),
        Some(r) => raw_string(Some(r), "source.snapshot")?,
    })
}

fn decode_transaction(top: &RawTop<'_>) -> Result<TransactionMarker, DecodeError> {
    let status = match top.status {
        None => return Err(DecodeError::missing("status")),
        Some(r) => match raw_string(Some(r), "status")?.as_str() {
            "BEGIN" => TransactionStatus::Begin,
            "END" => TransactionStatus::End,
            other => {
                return Err(DecodeError::new(
                    DecodeErrorKind::UnknownOp,
                    format!("status: unknown transaction status {other:?} (expected BEGIN or END)"),
                ));
            }
        },
    };
    let id = match top.id {
        None => return Err(DecodeError::missing("id")),
        Some(r) if is_null(r) => return Err(DecodeError::missing("id")),
        Some(r) => raw_string(Some(r), "id")?,
    };
    Ok(TransactionMarker {
        id,
        status,
        event_count: raw_u64(top.event_count, "event_count")?,
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
    fn national_ids_are_checked_against_the_row() {
        let d = Decoder::new(DecoderConfig {
            national_id: Some(NationalIdCheck {
                column: "person_id".into(),
                birth_date_column: Some("birth_date".into()),
                gender_column: Some("gender".into()),
                required: true,
            }),
            ..DecoderConfig::default()
        });
        let row = |id: Value, birth: &str, gender: &str| {
            bytes(&pg_event(
                "c",
                Value::Null,
                json!({"person_id": id, "birth_date": birth, "gender": gender}),
            ))
        };
        let key = br#"{"person_id":"x"}"#;
        let ok = d.decode(
            "t",
            Some(key),
            Some(&row(json!("079305000001"), "2005-02-01", "nữ")),
        );
        assert!(matches!(ok, Ok(Decoded::Change(_))), "{ok:?}");
        let cases = [
            (
                json!("079305000001"),
                "2005-02-01",
                "male",
                "gender_mismatch",
            ),
            (
                json!("079305000001"),
                "1905-02-01",
                "female",
                "birth_year_mismatch",
            ),
            (
                json!("003089123456"),
                "1989-01-01",
                "male",
                "unknown_province",
            ),
            (json!("0790891234"), "1989-01-01", "male", "length"),
            (json!(null), "1989-01-01", "male", "missing"),
            (json!(true), "1989-01-01", "male", "not_text"),
        ];
        for (id, birth, gender, detail) in cases {
            let e = d
                .decode("t", Some(key), Some(&row(id.clone(), birth, gender)))
                .expect_err("invalid");
            assert_eq!(e.kind, DecodeErrorKind::InvalidNationalId, "{id}");
            assert_eq!(e.detail, Some(detail), "{id}: {e}");
            assert!(e.message.starts_with("person_id: "), "{e}");
        }
        // Deletes carry no new row: not checked.
        let delete = bytes(&pg_event("d", json!({"person_id": "bad"}), Value::Null));
        assert!(d.decode("t", Some(key), Some(&delete)).is_ok());
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
        assert_eq!(&*c.source.snapshot, "false");
        assert_eq!(&*c.source.table, "citizens");
        assert_eq!(&*c.source.schema, "public");
        assert_eq!(&*c.source.db, "population");
        assert_eq!(c.processed_ts_ms, Some(1_700_000_000_456));
        assert_eq!(
            c.after.as_ref().and_then(|r| r.get("name")),
            Some(json!("An"))
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
    fn large_numeric_keys_stay_exact_and_distinct() {
        // Found by fuzzing: through f64, these two keys were one key.
        let a = Key::parse(r#"{"id": 11111111111111111111111}"#).expect("parses");
        let b = Key::parse(r#"{"id": 11111111111111111111112}"#).expect("parses");
        assert_ne!(a, b);
        assert_eq!(a.as_str(), r#"{"id":11111111111111111111111}"#);
        assert_eq!(Key::parse(a.as_str()).expect("parses"), a);
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
    fn tombstone_and_null_payload_are_positionless_deletes_of_their_key() {
        let d = decoder();
        let tombstone = Decoded::Change(ChangeEvent::tombstone(Key(r#"{"id":1}"#.into())));
        assert_eq!(
            d.decode("t", Some(br#"{"id":1}"#), None).expect("decodes"),
            tombstone
        );
        let v = json!({"schema": null, "payload": null});
        assert_eq!(
            d.decode("t", Some(br#"{"id":1}"#), Some(&bytes(&v)))
                .expect("decodes"),
            tombstone
        );
        // Without a key there is nothing to delete; on the transaction topic
        // it is no table's.
        assert_eq!(
            d.decode("t", None, None).expect("decodes"),
            Decoded::Tombstone { key: None }
        );
        assert!(matches!(
            d.decode("srv.transaction", Some(br#"{"id":"x"}"#), None),
            Ok(Decoded::Tombstone { .. })
        ));
    }

    #[test]
    fn each_connectors_source_block_gives_its_log_position_on_both_paths() {
        use ndc_proto::v1::log_position::Kind;
        const KEY: &[u8] = br#"{"id":1}"#;
        let d = decoder();
        let cases = [
            (
                json!({"connector":"mysql","ts_ms":1,"snapshot":false,"server_id":223344,"gtid":null,"file":"mysql-bin.000003","pos":484,"row":0,"thread":7}),
                "mysql",
            ),
            (
                json!({"connector":"postgresql","ts_ms":1,"sequence":"[\"24023119\",\"24023128\"]","lsn":24023128,"txId":555}),
                "postgresql",
            ),
            (
                json!({"connector":"sqlserver","ts_ms":1,"change_lsn":"00000027:00000758:0003","commit_lsn":"00000027:00000758:0005","event_serial_no":"1"}),
                "sqlserver",
            ),
            (
                json!({"connector":"oracle","ts_ms":1,"txId":"6.28.807","scn":"2122185","commit_scn":"2122185","rs_id":"001234.00012345.0124","ssn":1}),
                "oracle",
            ),
            (
                json!({"connector":"mongodb","ts_ms":1558965508000i64,"ord":31}),
                "mongodb",
            ),
        ];
        for (source, family) in cases {
            let v = json!({"op":"c","before":null,"after":{"id":1},"source":source});
            let fast = change(d.decode("t", Some(KEY), Some(&bytes(&v))).expect("decodes"));
            assert_eq!(
                crate::ordering::family(fast.source.position.as_ref()),
                family,
                "{source}"
            );
            // The general path (serde_json's) reads the same position.
            let general = d
                .decode_envelope_general("t", &v.to_string(), Some(KEY))
                .map(change)
                .expect("general path");
            assert_eq!(general.source.position, fast.source.position, "{source}");
        }
        let v = json!({"op":"c","after":{"id":1},"source":{"connector":"mysql","ts_ms":1,"file":"b.000001","pos":"x"}});
        let e = d
            .decode("t", Some(KEY), Some(&bytes(&v)))
            .expect_err("pos is no number");
        assert_eq!(e.kind, DecodeErrorKind::WrongType);
        assert!(e.message.contains("source.pos"), "{e}");
        let mysql = json!({"op":"u","after":{"id":1},"source":{"connector":"mysql","ts_ms":1,"server_id":7,"file":"mysql-bin.000012","pos":560,"row":2,"gtid":"3E11FA47-71CA-11E1-9E33-C80AA9429562:23"}});
        let c = change(
            d.decode("t", Some(KEY), Some(&bytes(&mysql)))
                .expect("decodes"),
        );
        let Some(Kind::Binlog(b)) = c.source.position.and_then(|p| p.kind) else {
            panic!("binlog position");
        };
        assert_eq!(
            (
                b.server_id,
                b.file_base.as_str(),
                b.file_index,
                b.pos,
                b.row
            ),
            (7, "mysql-bin", 12, 560, 2)
        );
        assert_eq!(
            (b.gtid_source.as_str(), b.gtid_sequence),
            ("3e11fa47-71ca-11e1-9e33-c80aa9429562", 23)
        );
    }

    #[test]
    fn flattened_metadata_fields_give_the_position_as_numbers_or_digit_strings() {
        let d = Decoder::new(DecoderConfig {
            format: Format::Flattened,
            key_columns: vec!["id".into()],
            max_record_bytes: 0,
            national_id: None,
        });
        let v = json!({"id":1,"name":"a","__op":"u","__table":"customers","__lsn":"123456789","__source_ts_ms":"1559033904863"});
        let c = change(d.decode("t", None, Some(&bytes(&v))).expect("decodes"));
        assert_eq!(c.source.lsn, Some(123_456_789));
        assert_eq!(c.source.ts_ms, 1_559_033_904_863);
        assert_eq!(
            crate::ordering::family(c.source.position.as_ref()),
            "postgresql"
        );
        assert_eq!(c.after.expect("row").as_str(), r#"{"id":1,"name":"a"}"#);
        let v = json!({"id":1,"__source_connector":"mysql","__source_file":"bin.000002","__source_pos":77,"__deleted":"true"});
        let c = change(d.decode("t", None, Some(&bytes(&v))).expect("decodes"));
        assert_eq!(c.op, ChangeOp::Delete);
        assert_eq!(crate::ordering::family(c.source.position.as_ref()), "mysql");
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
        assert_eq!(&*c.source.table, "addr");
        assert_eq!(
            c.after.map(|r| r.to_value()),
            Some(json!({"id": 3, "city": "Huế"}))
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

/// The one-pass key reader against the definition: parse the whole object,
/// pick the columns, canonicalise.
#[cfg(test)]
mod key_from_text {
    use super::*;
    use proptest::prelude::*;

    fn reference(text: &str, columns: &[String], exact: bool) -> Option<Key> {
        let Ok(Value::Object(all)) = serde_json::from_str::<Value>(text) else {
            return None;
        };
        // A column named twice is one member of the key.
        let distinct: std::collections::BTreeSet<&String> = columns.iter().collect();
        if exact && all.len() != distinct.len() {
            return None;
        }
        let picked: Map<String, Value> = columns
            .iter()
            .map(|c| {
                all.get(c)
                    .filter(|v| !v.is_null())
                    .map(|v| (c.clone(), v.clone()))
            })
            .collect::<Option<_>>()?;
        Some(Key::from_value(&Value::Object(picked)))
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("id".to_string()),
            Just("person_id".to_string()),
            Just("b".to_string()),
            Just("é\"q".to_string()),
        ]
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            Just("18446744073709551617".to_string()),
            Just("1.50".to_string()),
            Just("-0".to_string()),
            Just("2e3".to_string()),
            "[a-z0-9 ]{0,6}".prop_map(|s| format!("\"{s}\"")),
            Just("\"a\\u00e9\\/b\\n\"".to_string()),
            Just("{\"z\":1, \"a\":[1, {\"y\":null}]}".to_string()),
            Just("[ 2 , \"x\" ]".to_string()),
            // Delimiters, brackets and escaped quotes inside strings.
            Just("\"},]\\\"{[\\\\\"".to_string()),
            Just("{\"k\":\"]}\\\"\",\"n\":[[],{}]}".to_string()),
        ]
    }

    fn space() -> impl Strategy<Value = String> {
        prop_oneof![Just(""), Just(" "), Just("\n\t"), Just(" \r\n ")].prop_map(str::to_string)
    }

    proptest! {
        #[test]
        fn keys_read_from_text_are_those_of_the_parsed_object(
            members in proptest::collection::vec((name(), value()), 0..5),
            columns in proptest::collection::vec(name(), 1..3),
            exact in any::<bool>(),
            spaces in proptest::collection::vec(space(), 4),
        ) {
            let [outer, around_colon, around_comma, inner] = [0, 1, 2, 3].map(|i| spaces[i].as_str());
            let sep = format!("{around_comma},{around_comma}");
            let body: Vec<String> = members
                .iter()
                .map(|(n, v)| {
                    let n = serde_json::to_string(n).unwrap_or_default();
                    format!("{n}{around_colon}:{around_colon}{v}")
                })
                .collect();
            let text = format!("{outer}{{{inner}{}{inner}}}{outer}", body.join(&sep));
            let fast = key_of_object_columns(&text, &KeyColumns::new(&columns), exact);
            let slow = reference(&text, &columns, exact);
            // A row's path: the members found from the text's structure.
            let scanned = key_of_valid_object_columns(&text, &KeyColumns::new(&columns));
            prop_assert_eq!(&scanned, &reference(&text, &columns, false), "{}", text);
            // The envelope's path: the key columns noted as the row is
            // validated; only names written with escapes are left to the scan.
            let cols = KeyColumns::new(&columns);
            let mut keys = KeyTexts::default();
            let start = skip_json_space(text.as_bytes(), 0);
            let end = valid_row_end(&text, start, &cols, &mut keys);
            prop_assert!(end.is_some_and(|e| skip_json_space(text.as_bytes(), e) == text.len()), "{}", text);
            match keys.key(&cols) {
                Some(key) => prop_assert_eq!(&key, &scanned, "{}", text),
                None => prop_assert!(text.contains("\\\"q"), "{}", text),
            }
            let duplicates = {
                let mut names: Vec<&String> = members.iter().map(|(n, _)| n).collect();
                names.sort();
                names.windows(2).any(|w| w[0] == w[1])
            };
            if exact && duplicates {
                // Counted differently; the caller falls back to the reference path.
                prop_assert!(fast.is_none() || fast == slow);
            } else {
                prop_assert_eq!(fast, slow, "{}", text);
            }
        }
    }

    #[test]
    fn escaped_member_names_are_matched() {
        let columns = KeyColumns::new(&["person_id".to_string()]);
        let text = r#"{"person\u005fid":"7","x":1}"#;
        for key in [
            key_of_object_columns(text, &columns, false),
            key_of_valid_object_columns(text, &columns),
        ] {
            assert_eq!(
                key.map(|k| k.as_str().to_string()),
                Some(r#"{"person_id":"7"}"#.into())
            );
        }
    }

    proptest! {
        /// The structural scan is meant for validated text, but nothing
        /// it is given may make it panic or read out of bounds.
        #[test]
        fn scanning_any_text_never_panics(
            text in prop_oneof![".{0,40}", "[{}\\[\\]\":,\\\\ a1]{0,40}"],
        ) {
            let mut seen = 0;
            let members = scan_valid_object(&text, |_, _| seen += 1);
            prop_assert!(members.is_none_or(|n| n == seen));
        }
    }
}

/// The one-pass `source` reader against the field-by-field one, which
/// defines the result and every error.
#[cfg(test)]
mod source_block {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            Just("\"true\"".to_string()),
            Just("\"incremental\"".to_string()),
            Just("\"a\\u00e9\"".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            Just("18446744073709551615".to_string()),
            Just("18446744073709551616".to_string()),
            Just("1.5".to_string()),
            Just("1e3".to_string()),
            Just("[1]".to_string()),
            Just("{\"x\":1}".to_string()),
        ])
    }

    const FIELDS: [&str; 10] = [
        "connector",
        "name",
        "db",
        "schema",
        "table",
        "ts_ms",
        "lsn",
        "txId",
        "snapshot",
        "version",
    ];

    proptest! {
        #[test]
        fn one_pass_and_field_by_field_agree(
            values in proptest::collection::vec(value(), FIELDS.len()),
            duplicate in proptest::option::of(0..FIELDS.len()),
        ) {
            let mut members: Vec<String> = FIELDS
                .iter()
                .zip(&values)
                .filter_map(|(f, v)| v.as_ref().map(|v| format!("\"{f}\":{v}")))
                .collect();
            if let Some(i) = duplicate {
                members.push(format!("\"{}\":1", FIELDS[i]));
            }
            let text = format!("{{{}}}", members.join(","));
            let Ok(raw) = serde_json::from_str::<&RawValue>(&text) else {
                return Ok(());
            };
            let fast = decode_source(raw).map_err(|e| e.to_string());
            let slow = decode_source_by_field(raw).map_err(|e| e.to_string());
            prop_assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{}", text);
        }
    }
}

/// The one-pass envelope reader against the general one: the same event or
/// the same error, whatever the envelope holds.
#[cfg(test)]
mod plain_envelope {
    use super::*;
    use proptest::prelude::*;

    /// One of `texts`, or absent.
    fn one_of(texts: &'static [&'static str]) -> impl Strategy<Value = Option<String>> {
        proptest::option::of(proptest::sample::select(texts).prop_map(str::to_string))
    }

    /// `op` values: the plain ones, others, an escaped `c`, wrong types.
    const OPS: &[&str] = &[
        "\"c\"",
        "\"u\"",
        "\"d\"",
        "\"r\"",
        "\"t\"",
        "\"m\"",
        "\"x\"",
        "\"\\u0063\"",
        "null",
        "1",
    ];

    /// `before` / `after` values.
    const ROWS: &[&str] = &[
        "null",
        "{\"person_id\":\"7\",\"name\":\"An\"}",
        "{\"person_id\":8,\"x\":[1,{\"y\":null}]}",
        "{\"name\":\"no key\"}",
        "{\"person_id\":null}",
        "\"text\"",
        "[1]",
        // Valid, with space and escapes; then text serde_json rejects (a
        // leading zero, a bare dot, a raw tab, an unknown escape, trailing
        // commas, a truncated literal); a lone escaped surrogate.
        "{ \"person_id\" : \"7\" ,\n\t\"n\" : \"a\\\"b\\\\\\u00e9\\n\" }",
        "{\"person_id\":\"7\",\"n\":-0.5e+3,\"m\":{\"a\":[true,false,null,{},[]]}}",
        "{\"person_id\":\"7\",\"n\":01}",
        "{\"person_id\":\"7\",\"n\":1.}",
        "{\"person_id\":\"7\",\"n\":\"tab\there\"}",
        "{\"person_id\":\"7\",\"n\":\"\\x\"}",
        "{\"person_id\":\"7\",\"n\":[1,2,]}",
        "{\"person_id\":\"7\",}",
        "{\"person_id\":\"7\",\"n\":tru}",
        "{\"person_id\":\"7\",\"n\":\"\\ud800\"}",
        // The key column twice (the last wins), or under an escaped name.
        "{\"person_id\":\"7\",\"x\":{\"person_id\":1},\"person_id\":\"8\"}",
        "{\"person\\u005fid\":\"5\",\"n\":1}",
    ];

    /// `source` blocks, well and badly typed.
    const SOURCES: &[&str] = &[
        "null",
        "{\"connector\":\"postgresql\",\"name\":\"p\",\"db\":\"d\",\"schema\":\"s\",\"table\":\"t\",\"ts_ms\":5,\"lsn\":9,\"txId\":3,\"snapshot\":\"false\",\"version\":\"2.7\"}",
        "{\"ts_ms\":5,\"snapshot\":true}",
        "{\"ts_ms\":5,\"snapshot\":7}",
        "{\"ts_ms\":\"5\"}",
        "{\"db\":\"d\"}",
        "{\"ts_ms\":5,\"lsn\":-1}",
        "{\"ts_ms\":5,\"ts_ms\":6}",
        "[]",
        // Space, nulls, escapes, nested unknown fields, edge numbers.
        "{ \"connector\" : null , \"db\" : \"d\\u00e9\" , \"ts_ms\" : -0 , \"snapshot\" : null }",
        "{\"ts_ms\":5,\"snapshot\":\"last\",\"sequence\":\"[\\\"1\\\",null]\",\"x\":{\"y\":[1,{}]}}",
        "{\"ts_ms\":5,\"lsn\":18446744073709551615,\"txId\":-9223372036854775808}",
        "{\"ts_ms\":5,\"lsn\":18446744073709551616}",
        "{\"ts_ms\":5,\"txId\":1.0}",
        "{\"ts_ms\":5e0}",
        "{\"ts_ms\":5,\"table\":7}",
        "{\"ts_ms\":5,\"snapshot\":\"t\\\"x\"}",
        "{\"ts_ms\":5,\"n\\u0061me\":\"p\"}",
        "{\"ts_ms\":5,}",
        "{\"ts_ms\":5,\"db\":\"d\",\"db\":\"e\"}",
        "{}",
    ];

    /// Top-level `ts_ms` values.
    const TS_MS: &[&str] = &[
        "null",
        "17",
        "-5",
        "-0",
        "1.5",
        "1e3",
        "99999999999999999999",
        "\"17\"",
    ];

    /// Members beside the envelope's own: a transaction block, a wrapper,
    /// a second `op`, a transaction marker.
    const EXTRA_MEMBERS: &[&str] = &[
        "\"transaction\":null",
        "\"schema\":{}",
        "\"payload\":{}",
        "\"op\":\"c\"",
        "\"status\":\"BEGIN\",\"id\":\"1\"",
        "\"transaction\":{\"id\":\"x\",\"total_order\":1}",
        "\"source\":{\"ts_ms\":1}",
        "\"o\\u0070\":\"c\"",
        "\"before\":null",
        "\"after\":{\"person_id\":\"9\"}",
        "\"ts_ms\":3",
    ];

    /// Kafka message keys.
    const MESSAGE_KEYS: &[&str] = &["{\"person_id\":\"7\"}", "7", "not json"];

    proptest! {
        // Most generated envelopes are rejected somewhere; enough cases for
        // the accepted ones to cover every op and source shape.
        #![proptest_config(ProptestConfig::with_cases(2048))]
        #[test]
        fn one_pass_and_general_agree(
            op in one_of(OPS),
            before in one_of(ROWS),
            after in one_of(ROWS),
            source in one_of(SOURCES),
            ts_ms in one_of(TS_MS),
            extra in one_of(EXTRA_MEMBERS),
            key in one_of(MESSAGE_KEYS),
            key_columns in prop_oneof![Just(vec![]), Just(vec!["person_id".to_string()])],
            space in proptest::sample::select(&["", " ", "\n\t\r "][..]),
        ) {
            let members: Vec<String> = [("op", op), ("before", before), ("after", after),
                ("source", source), ("ts_ms", ts_ms)]
                .into_iter()
                .filter_map(|(name, v)| v.map(|v| format!("\"{name}\"{space}:{space}{v}")))
                .chain(extra)
                .collect();
            let text = format!("{space}{{{space}{}{space}}}{space}",
                members.join(&format!("{space},{space}")));
            let decoder = Decoder::new(DecoderConfig {
                format: Format::Debezium,
                key_columns,
                max_record_bytes: 0,
                national_id: None,
            });
            let key = key.as_deref().map(str::as_bytes);
            let fast = decoder.decode_envelope_text("agency.public.t", &text, key);
            let general = decoder.decode_envelope_general("agency.public.t", &text, key);
            prop_assert_eq!(fast, general, "{}", text);
        }
    }

    /// A delete's key is its `before` row's, an insert's its `after` row's,
    /// whatever the other row holds; both paths agree.
    #[test]
    fn the_key_comes_from_the_row_the_op_names() {
        let decoder = Decoder::new(DecoderConfig {
            format: Format::Debezium,
            key_columns: vec!["person_id".into()],
            max_record_bytes: 0,
            national_id: None,
        });
        let source = r#""source":{"ts_ms":5}"#;
        for (op, expected) in [("d", "7"), ("c", "8")] {
            let text = format!(
                r#"{{"before":{{"person_id":"7"}},"after":{{"person_id":"8"}},"op":"{op}",{source}}}"#
            );
            let fast = decoder.decode_envelope_text("agency.public.t", &text, None);
            assert_eq!(
                fast,
                decoder.decode_envelope_general("agency.public.t", &text, None)
            );
            let Ok(Decoded::Change(change)) = fast else {
                panic!("{text} not decoded");
            };
            assert_eq!(
                change.key.map(|k| k.as_str().to_string()),
                Some(format!(r#"{{"person_id":"{expected}"}}"#))
            );
        }
    }
}

#[cfg(test)]
mod valid_json {
    use super::*;
    use proptest::prelude::*;

    /// The one-pass reader's verdict on a whole text: the end of its value,
    /// if that is the end of the text (space aside).
    fn accepts(text: &str) -> bool {
        let b = text.as_bytes();
        valid_value_end(b, skip_json_space(b, 0), MAX_SCAN_DEPTH)
            .is_some_and(|end| skip_json_space(b, end) == b.len())
    }

    fn serde_accepts(text: &str) -> bool {
        serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
    }

    /// Any JSON value, its strings drawn from quotes, backslashes, control
    /// characters and non-ASCII text.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-z\"\\\\\u{0}-\u{1f}é漢😀 ]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(6, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z\"\\\\é]{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Text close to JSON: its delimiters, digits, literals' letters,
    /// escapes and space.
    fn near_json() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            proptest::sample::select(
                &[
                    "{",
                    "}",
                    "[",
                    "]",
                    ",",
                    ":",
                    "\"",
                    "\\",
                    "0",
                    "1",
                    "9",
                    "-",
                    "+",
                    ".",
                    "e",
                    "E",
                    "true",
                    "false",
                    "null",
                    "tru",
                    "\\u00e9",
                    "\\ud800",
                    "\\ud83d\\ude00",
                    "\\n",
                    "\\x",
                    " ",
                    "\n",
                    "\t",
                    "\u{1}",
                    "a",
                    "é",
                ][..],
            ),
            0..24,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Whatever it accepts, serde_json accepts; never panics.
        #[test]
        fn accepts_only_what_serde_json_accepts(text in near_json()) {
            if accepts(&text) {
                prop_assert!(serde_accepts(&text), "accepted invalid JSON {:?}", text);
            }
        }

        /// One character of valid JSON replaced, removed or added: still
        /// nothing serde_json rejects gets through.
        #[test]
        fn edited_json_is_judged_like_serde_json(
            v in value(),
            at in any::<proptest::sample::Index>(),
            edit in 0..3u8,
            c in proptest::sample::select(
                &['{', '}', '[', ']', ',', ':', '"', '\\', '0', '-', '.', 'e', ' ', '\u{1}', 'x'][..]),
        ) {
            let mut chars: Vec<char> = serde_json::to_string(&v).unwrap_or_default().chars().collect();
            let i = at.index(chars.len() + 1);
            match edit {
                0 if i < chars.len() => chars[i] = c,
                1 if i < chars.len() => { chars.remove(i); }
                _ => chars.insert(i, c),
            }
            let text: String = chars.into_iter().collect();
            if accepts(&text) {
                prop_assert!(serde_accepts(&text), "accepted invalid JSON {:?}", text);
            }
        }

        /// Every JSON value serde_json writes, compact or pretty, is read in
        /// one pass (serde_json writes no surrogate escapes; these values
        /// nest less than the reader's limit), so agency rows take the fast
        /// path.
        #[test]
        fn accepts_what_serde_json_writes(v in value()) {
            let compact = serde_json::to_string(&v).unwrap_or_default();
            let pretty = serde_json::to_string_pretty(&v).unwrap_or_default();
            prop_assert!(accepts(&compact), "{}", compact);
            prop_assert!(accepts(&pretty), "{}", pretty);
            prop_assert!(accepts(&format!(" \n{pretty}\t\r")), "{}", pretty);
        }

        /// The eight-byte search finds what a plain search finds, in any
        /// bytes (those just below and above 0x20, 0x7f and 0x80 included).
        #[test]
        fn string_special_search_is_a_plain_search(
            bytes in proptest::collection::vec(
                proptest::sample::select(&[b'"', b'\\', b'a', 0u8, 0x1f, 0x20, b'!', b'#', 0x7f, 0x80, 0xa2, 0xdd, 0xff][..]),
                0..40,
            ),
            dense in any::<bool>(),
        ) {
            // Sparse: only the last byte is a quote, the rest of the word searched in full.
            let b: Vec<u8> = if dense {
                bytes
            } else {
                bytes.iter().map(|&c| if c == b'"' || c == b'\\' || c < 0x20 { b'x' } else { c }).chain([b'"']).collect()
            };
            prop_assert_eq!(
                find_string_special(&b),
                b.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20)
            );
        }
    }

    proptest! {
        /// The envelope and `source` readers, given any text (valid or
        /// not, cut anywhere), never panic or read out of bounds, and what
        /// they accept is JSON.
        #[test]
        fn the_envelope_readers_never_panic(
            text in prop_oneof![".{0,60}", near_json().prop_map(|t| format!("{{\"op\":\"c\",\"source\":{t}"))],
            cut in any::<proptest::sample::Index>(),
        ) {
            let columns = KeyColumns::new(&["person_id".to_string()]);
            let end = text.char_indices().map(|(i, _)| i).chain([text.len()]).nth(cut.index(text.chars().count() + 1)).unwrap_or(0);
            for t in [text.as_str(), &text[..end]] {
                if PlainEnvelope::scan(t, &columns).is_some() {
                    prop_assert!(serde_accepts(t), "{}", t);
                }
                for start in [0, t.len() / 2] {
                    let _ = scan_source(t, start);
                    let _ = valid_row_end(t, start, &columns, &mut KeyTexts::default());
                }
            }
        }
    }

    #[test]
    fn surrogate_escapes_and_deep_nesting_are_left_to_serde_json() {
        assert!(!accepts("\"\\ud83d\\ude00\""));
        assert!(serde_accepts("\"\\ud83d\\ude00\""));
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(!accepts(&deep));
        assert!(serde_accepts(&deep));
        assert!(accepts("\"\\uD7FF\\uE000\\u00e9\""));
    }
}

#[cfg(test)]
mod source_scan {
    use super::*;
    use proptest::prelude::*;

    /// Members of `source` blocks: Debezium's, of other types, null,
    /// escaped, unknown and nested.
    const MEMBERS: &[&str] = &[
        "\"connector\":\"postgresql\"",
        "\"connector\":null",
        "\"name\":\"p\"",
        "\"db\":\"d\"",
        "\"db\":\"d\\u00e9\"",
        "\"schema\":\"s\"",
        "\"table\":\"t\"",
        "\"table\":7",
        "\"ts_ms\":5",
        "\"ts_ms\":-0",
        "\"ts_ms\":5e0",
        "\"ts_ms\":null",
        "\"lsn\":9",
        "\"lsn\":-1",
        "\"lsn\":18446744073709551615",
        "\"lsn\":18446744073709551616",
        "\"txId\":3",
        "\"txId\":1.0",
        "\"txId\":null",
        "\"snapshot\":true",
        "\"snapshot\":\"false\"",
        "\"snapshot\":\"last\"",
        "\"snapshot\":\"t\\\"x\"",
        "\"snapshot\":7",
        "\"snapshot\":null",
        "\"version\":\"2.7\"",
        "\"sequence\":\"[\\\"1\\\",null]\"",
        "\"x\":{\"y\":[1,{}]}",
        "\"n\\u0061me\":\"q\"",
        "\"connector\":\"mysql\"",
        "\"file\":\"mysql-bin.000003\"",
        "\"pos\":484",
        "\"pos\":\"x\"",
        "\"row\":\"2\"",
        "\"server_id\":223344",
        "\"gtid\":\"3e11fa47-71ca-11e1-9e33-c80aa9429562:23\"",
        "\"commit_lsn\":\"00000027:00000758:0005\"",
        "\"change_lsn\":null",
        "\"scn\":\"2122185\"",
        "\"ord\":31",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// What the one-pass reader reads, serde_json's typed pass reads
        /// the same; where the one-pass reader declines, the caller falls
        /// back to serde_json.
        #[test]
        fn one_pass_source_agrees_with_serde_json(
            members in proptest::collection::vec(proptest::sample::select(MEMBERS), 0..8),
            space in proptest::sample::select(&["", " ", "\n\t "][..]),
        ) {
            let text = format!("{{{space}{}{space}}}", members.join(&format!("{space},{space}")));
            let typed = serde_json::from_str::<TypedSource<'_>>(&text)
                .ok()
                .and_then(|t| t.into_info(&text))
                .and_then(Result::ok);
            if let Some((info, end)) = scan_source(&text, 0) {
                prop_assert_eq!(end, text.len());
                prop_assert_eq!(Some(info), typed, "{}", text);
            }
        }
    }

    #[test]
    fn debezium_source_blocks_are_read_in_one_pass() {
        let text = r#"{"version":"2.7.3.Final","connector":"postgresql","name":"population","ts_ms":1767225600000,"snapshot":"false","db":"pop","sequence":"[null,\"3\"]","schema":"public","table":"citizens","txId":9,"lsn":33,"xmin":null}"#;
        let (info, end) = scan_source(text, 0).expect("the common shape");
        assert_eq!(end, text.len());
        assert_eq!(&*info.connector, "postgresql");
        assert_eq!(
            (info.ts_ms, info.lsn, info.tx_id),
            (1_767_225_600_000, Some(33), Some(9))
        );
        assert_eq!(
            (&*info.db, &*info.table, &*info.snapshot),
            ("pop", "citizens", "false")
        );
        // The next event of the feed shares the strings instead of copying.
        let (next, _) = scan_source(text, 0).expect("the common shape");
        assert!(Arc::ptr_eq(&info.table, &next.table) && Arc::ptr_eq(&info.db, &next.db));
        let (info, _) =
            scan_source(r#"{"ts_ms":1,"snapshot":true}"#, 0).expect("a boolean snapshot");
        assert_eq!((&*info.snapshot, &*info.table), ("true", ""));
    }

    #[test]
    fn a_shared_source_string_is_always_the_text_it_was_asked_for() {
        let table = shared_text(SourceText::Table, "citizens");
        assert!(Arc::ptr_eq(
            &table,
            &shared_text(SourceText::Table, "citizens")
        ));
        // Another field with the same text, or the same field with another
        // text, never gets the remembered one.
        assert_eq!(&*shared_text(SourceText::Schema, "public"), "public");
        assert_eq!(&*shared_text(SourceText::Table, "addresses"), "addresses");
        assert_eq!(&*shared_text(SourceText::Table, "citizens"), "citizens");
        assert_eq!(&*shared_text(SourceText::Table, "citizen"), "citizen");
        assert_eq!(&*shared_text(SourceText::Table, ""), "");
    }
}
