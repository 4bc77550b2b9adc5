//! What one subscriber may see of a change: the keys and fields it asked
//! for, the rows its grant covers, and every field above its clearance
//! masked as the grant's policy says. The one filter every delivery path
//! (snapshot, memory, store, keyed lookups) goes through.

use crate::serving::access::row_admitted;
use ndc_coordinator::RowFilter;
use ndc_operators::Key;
use ndc_operators::masking::{self, HashKeys, Level, Policy};
use ndc_proto::v1::{Change, Op};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

/// What a subscriber asked to see, narrowed to what its grant lets it see.
#[derive(Clone)]
pub struct Filter {
    /// Keys asked for, parsed once (the snapshot looks them up)...
    pub keys: Option<Vec<Key>>,
    /// ...and their canonical text, which changes are matched against.
    pub key_set: HashSet<String>,
    pub fields: Option<Vec<String>>,
    /// The grant's rows: the subscriber's copy of the view holds only
    /// these, so a row moving out of them arrives as a delete, and one
    /// moving in as an insert.
    pub rows: Option<RowFilter>,
    /// Fields above the grant's clearance, masked as its policy says.
    pub mask: Option<Arc<Masker>>,
    /// The column holding the person a row is about, for the audit trail.
    pub person: Option<Arc<str>>,
}

/// Appends `text` as a JSON string (quoted, escaped where needed).
fn push_json_string(out: &mut String, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(text);
        out.push('"');
    } else {
        out.push_str(&Value::from(text).to_string());
    }
}

/// The text of a row's top-level field (a string as is, a number as
/// written), without building the rest of the row: the other members are
/// skipped as they are read.
pub fn field_text(row: &str, column: &str) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Find<'c>(&'c str);
    impl<'de> Visitor<'de> for Find<'_> {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                if name == self.0 {
                    return Ok(match map.next_value::<Value>()? {
                        Value::String(s) => Some(s),
                        Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    });
                }
                map.next_value::<IgnoredAny>()?;
            }
            Ok(None)
        }
    }
    let mut de = serde_json::Deserializer::from_str(row);
    de.deserialize_map(Find(column)).ok().flatten()
}

/// A JSON object's members as written, in name order.
type Fields<'a> = std::collections::BTreeMap<Cow<'a, str>, &'a serde_json::value::RawValue>;
/// The same, names borrowed (no name has an escape).
type BorrowedFields<'a> = std::collections::BTreeMap<&'a str, &'a serde_json::value::RawValue>;

/// Masks the fields of rows and keys above a grant's clearance.
pub struct Masker {
    pub levels: Arc<std::collections::BTreeMap<String, Level>>,
    pub clearance: Level,
    pub policies: std::collections::BTreeMap<Level, Policy>,
    pub keys: Arc<HashKeys>,
}

impl Masker {
    /// The policy of one field (`column`), or of one member of an object
    /// field (`row.plate`).
    fn policy(&self, column: &str) -> Policy {
        let level = self.levels.get(column).copied().unwrap_or(Level::Secret);
        if level <= self.clearance {
            Policy::Deliver
        } else {
            self.policies.get(&level).copied().unwrap_or(Policy::Redact)
        }
    }

    /// A row (JSON object text) with its fields masked; text that is no
    /// object is withheld.
    pub fn row(&self, row: String, key: bool) -> String {
        let mut out = String::with_capacity(row.len());
        if self.write_text(&row, key, None, &mut out) {
            out
        } else if key {
            row
        } else {
            "null".into()
        }
    }

    /// Writes the object `text` masked; false when it is no object. Field
    /// names are borrowed from the text unless one has escapes.
    fn write_text(&self, text: &str, key: bool, within: Option<&str>, out: &mut String) -> bool {
        if let Ok(fields) = serde_json::from_str::<BorrowedFields<'_>>(text) {
            self.write_object(&fields, key, within, out);
        } else if let Ok(fields) = serde_json::from_str::<Fields<'_>>(text) {
            self.write_object(&fields, key, within, out);
        } else {
            return false;
        }
        true
    }

    /// Writes an object's members, masked, in name order, in one pass: a
    /// member delivered as it is is copied as written, never parsed; only
    /// masked ones are. `within`: the field holding the object, whose
    /// members are classified one by one (a join's `row.plate`).
    fn write_object<K: AsRef<str>>(
        &self,
        fields: &std::collections::BTreeMap<K, &serde_json::value::RawValue>,
        key: bool,
        within: Option<&str>,
        out: &mut String,
    ) {
        out.push('{');
        let mut first = true;
        for (name, raw) in fields {
            let name = name.as_ref();
            let text = raw.get();
            let value: Cow<'_, str> =
                if within.is_none() && text.trim_start().starts_with('{') && self.has_members(name)
                {
                    let mut object = String::with_capacity(text.len());
                    if !self.write_text(text, key, Some(name), &mut object) {
                        continue;
                    }
                    Cow::Owned(object)
                } else {
                    let mut policy = match within {
                        Some(outer) => self.policy(&format!("{outer}.{name}")),
                        None => self.policy(name),
                    };
                    // A subscriber follows a row by its key: a key column above
                    // the clearance is hashed at least, never removed.
                    if key && matches!(policy, Policy::Redact | Policy::Null) {
                        policy = Policy::Hash;
                    }
                    if policy == Policy::Deliver {
                        Cow::Borrowed(text)
                    } else if policy == Policy::Redact {
                        // Removed whatever it holds: not even parsed.
                        continue;
                    } else if let (Policy::Hash, Ok(plain)) =
                        (policy, serde_json::from_str::<&str>(text))
                    {
                        // A string without escapes: signed as it stands.
                        match masking::hash(plain, &self.keys) {
                            Some(h) => Cow::Owned(format!("\"{h}\"")),
                            None => Cow::Borrowed("null"),
                        }
                    } else {
                        let masked = serde_json::from_str::<Value>(text)
                            .ok()
                            .and_then(|v| masking::mask(&v, policy, &self.keys));
                        match masked {
                            Some(v) => Cow::Owned(v.to_string()),
                            None => continue,
                        }
                    }
                };
            if !first {
                out.push(',');
            }
            first = false;
            push_json_string(out, name);
            out.push(':');
            out.push_str(&value);
        }
        out.push('}');
    }

    /// Whether an object field's members are classified one by one.
    fn has_members(&self, field: &str) -> bool {
        let prefix = format!("{field}.");
        self.levels
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&prefix))
    }
}

impl Filter {
    pub fn new(keys: Vec<Key>, fields: Vec<String>, rows: Option<RowFilter>) -> Self {
        Filter {
            key_set: keys.iter().map(|k| k.as_str().to_string()).collect(),
            keys: (!keys.is_empty()).then_some(keys),
            fields: (!fields.is_empty()).then_some(fields),
            rows,
            mask: None,
            person: None,
        }
    }

    /// The person a change is about: in its new row, else its old row,
    /// else its key.
    pub fn person_of(&self, c: &Change) -> Option<String> {
        let column = self.person.as_deref()?;
        [c.after_json.as_deref(), c.before_json.as_deref()]
            .into_iter()
            .flatten()
            .chain(std::iter::once(c.key_json.as_str()))
            .find_map(|row| field_text(row, column))
    }

    pub fn admits(&self, c: &Change) -> bool {
        // A truncate affects every key.
        self.keys.is_none() || c.op == Op::Truncate as i32 || self.key_set.contains(&c.key_json)
    }

    /// The change as the grant's rows see it; `None` when it is outside them.
    fn scoped(&self, mut c: Change) -> Option<Change> {
        let Some(rows) = &self.rows else {
            return Some(c);
        };
        if c.op == Op::Truncate as i32 {
            return Some(c);
        }
        let inside = |row: &Option<String>| row.as_deref().is_some_and(|r| row_admitted(rows, r));
        let (was, is) = (inside(&c.before_json), inside(&c.after_json));
        match (was, is) {
            (true, true) => {}
            (false, false) => {
                // A delete whose old row is unknown: pass the key on (a delete
                // of a key the subscriber never had is harmless; keeping a row
                // that is gone is not), without any row.
                if c.op == Op::Delete as i32 && c.before_json.is_none() {
                    c.after_json = None;
                    return Some(c);
                }
                return None;
            }
            (true, false) => {
                c.op = Op::Delete as i32;
                c.after_json = None;
            }
            (false, true) => {
                if c.op != Op::Read as i32 {
                    c.op = Op::Insert as i32;
                }
                c.before_json = None;
            }
        }
        Some(c)
    }

    fn project(&self, row: Option<String>) -> Option<String> {
        let (Some(fields), Some(row)) = (&self.fields, row.as_ref()) else {
            return row;
        };
        match serde_json::from_str::<serde_json::Map<String, Value>>(row) {
            Ok(mut map) => {
                map.retain(|name, _| fields.iter().any(|f| f == name));
                Some(Value::Object(map).to_string())
            }
            Err(_) => Some(row.clone()),
        }
    }

    /// The change as this subscriber may see it; the person it is about
    /// (before masking hides who) is added to `people`.
    pub fn apply(&self, c: Change, people: &mut BTreeSet<String>) -> Option<Change> {
        let mut c = self.scoped(c)?;
        if let Some(id) = self.person_of(&c) {
            people.insert(id);
        }
        if self.fields.is_some() {
            c.before_json = self.project(c.before_json.take());
            c.after_json = self.project(c.after_json.take());
        }
        // Last, on every path (snapshot, memory, store, keyed, before
        // images): nothing above the clearance leaves unmasked.
        if let Some(m) = &self.mask {
            c.before_json = c.before_json.take().map(|r| m.row(r, false));
            c.after_json = c.after_json.take().map(|r| m.row(r, false));
            c.key_json = m.row(std::mem::take(&mut c.key_json), true);
        }
        Some(c)
    }
}
