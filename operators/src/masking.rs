//! Classification of fields and the masking of their values (issue 20).
//!
//! A field carries a [`Level`]; a subscriber's clearance and its policy per
//! level decide what it receives of the field: the value, nothing, `null`,
//! a keyed hash (the same input gives the same output under one key
//! version, so a subscriber can still join on a hashed national ID), the
//! last characters, or a date's year. Masking fails closed: a value the
//! policy cannot apply to (a `year` of something that is no date) becomes
//! `null`, never the value itself.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// How sensitive a field is, lowest first. A field nobody classified is
/// [`Level::Secret`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Public,
    Internal,
    Confidential,
    Secret,
}

impl Level {
    /// Its name, as configurations and the command line write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Public => "public",
            Level::Internal => "internal",
            Level::Confidential => "confidential",
            Level::Secret => "secret",
        }
    }
}

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        [
            Level::Public,
            Level::Internal,
            Level::Confidential,
            Level::Secret,
        ]
        .into_iter()
        .find(|l| l.as_str() == text.trim())
        .ok_or_else(|| format!("unknown level {text:?} (public, internal, confidential or secret)"))
    }
}

/// The Data Law's (60/2024) category of a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Other,
    Important,
    Core,
}

/// What a subscriber receives of a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The value as it is.
    Deliver,
    /// The field is removed.
    Redact,
    /// The field is present, as `null`.
    Null,
    /// HMAC-SHA-256 of the value under the current key: `h<version>:<hex>`.
    Hash,
    /// The last `n` characters; the others become `*`.
    Partial(usize),
    /// A date (`YYYY-MM-DD...`) reduced to its year.
    Year,
}

/// Keys for [`Policy::Hash`], by version; new hashes use the highest.
/// Versions let keys rotate: a subscriber sees from the prefix which key
/// made a hash.
#[derive(Clone, Default)]
pub struct HashKeys {
    keys: BTreeMap<u32, ring::hmac::Key>,
}

impl std::fmt::Debug for HashKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("HashKeys")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl HashKeys {
    /// Adds key `version` (its secret bytes, read from a file by the caller).
    pub fn insert(&mut self, version: u32, secret: &[u8]) {
        self.keys.insert(
            version,
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        );
    }

    fn current(&self) -> Option<(u32, &ring::hmac::Key)> {
        self.keys.iter().next_back().map(|(v, k)| (*v, k))
    }
}

/// Appends `bytes` as lower-case hex.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
}

/// The `hash` policy's output for a value's text (`h<version>:<hex>`);
/// `None` without a key.
pub fn hash(text: &str, keys: &HashKeys) -> Option<String> {
    let (version, key) = keys.current()?;
    let tag = ring::hmac::sign(key, text.as_bytes());
    let mut out = format!("h{version}:");
    push_hex(&mut out, tag.as_ref());
    Some(out)
}

/// The text a value is masked as: a string as is, anything else as JSON.
fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What a field becomes under `policy`; `None`: the field is removed.
/// `null` stays `null` under every policy but [`Policy::Redact`].
pub fn mask(value: &Value, policy: Policy, keys: &HashKeys) -> Option<Value> {
    if value.is_null() {
        return (policy != Policy::Redact).then_some(Value::Null);
    }
    match policy {
        Policy::Deliver => Some(value.clone()),
        Policy::Redact => None,
        Policy::Null => Some(Value::Null),
        // No key: nothing to hash with, so nothing is delivered.
        Policy::Hash => Some(hash(&text_of(value), keys).map_or(Value::Null, Value::String)),
        Policy::Partial(n) => {
            let text = text_of(value);
            let chars: Vec<char> = text.chars().collect();
            let hidden = chars.len().saturating_sub(n);
            Some(Value::String(
                std::iter::repeat_n('*', hidden)
                    .chain(chars[hidden..].iter().copied())
                    .collect(),
            ))
        }
        Policy::Year => Some(match value.as_str().and_then(year_of) {
            Some(y) => Value::String(y.to_string()),
            None => Value::Null,
        }),
    }
}

/// The year of an ISO date or timestamp (`1987-04-12`, `1987-04-12T...`).
fn year_of(text: &str) -> Option<&str> {
    let year = text.get(..4)?;
    let well_formed = year.bytes().all(|b| b.is_ascii_digit())
        && text.as_bytes().get(4) == Some(&b'-')
        && text.len() >= 10;
    well_formed.then_some(year)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn keys(version: u32, secret: &[u8]) -> HashKeys {
        let mut k = HashKeys::default();
        k.insert(version, secret);
        k
    }

    #[test]
    fn each_policy_does_what_it_says() {
        let k = keys(1, b"k1");
        let id = json!("079305000016");
        assert_eq!(mask(&id, Policy::Deliver, &k), Some(id.clone()));
        assert_eq!(mask(&id, Policy::Redact, &k), None);
        assert_eq!(mask(&id, Policy::Null, &k), Some(Value::Null));
        assert_eq!(
            mask(&id, Policy::Partial(4), &k),
            Some(json!("********0016"))
        );
        assert_eq!(
            mask(&json!("Lan"), Policy::Partial(4), &k),
            Some(json!("Lan"))
        );
        assert_eq!(
            mask(&json!("1987-04-12"), Policy::Year, &k),
            Some(json!("1987"))
        );
        assert_eq!(mask(&json!("soon"), Policy::Year, &k), Some(Value::Null));
        assert_eq!(mask(&json!(19870412), Policy::Year, &k), Some(Value::Null));
        let h = mask(&id, Policy::Hash, &k).unwrap();
        assert!(h.as_str().unwrap().starts_with("h1:"), "{h}");
        assert_eq!(h.as_str().unwrap().len(), 3 + 64);
        assert_eq!(
            mask(&id, Policy::Hash, &HashKeys::default()),
            Some(Value::Null)
        );
        assert_eq!(mask(&Value::Null, Policy::Hash, &k), Some(Value::Null));
        assert_eq!(mask(&Value::Null, Policy::Redact, &k), None);
    }

    #[test]
    fn hashes_join_under_one_key_and_change_with_its_version() {
        let one = keys(1, b"k1");
        let mut two = keys(1, b"k1");
        two.insert(2, b"k2");
        let id = json!("079305000016");
        assert_eq!(mask(&id, Policy::Hash, &one), mask(&id, Policy::Hash, &one));
        let rotated = mask(&id, Policy::Hash, &two).unwrap();
        assert!(rotated.as_str().unwrap().starts_with("h2:"));
        assert_ne!(Some(rotated), mask(&id, Policy::Hash, &one));
        assert!(
            !format!("{two:?}").contains("k2"),
            "no key material in Debug"
        );
    }

    #[test]
    fn levels_and_categories_order_as_their_sensitivity() {
        assert!(Level::Public < Level::Internal && Level::Confidential < Level::Secret);
        assert!(Category::Other < Category::Important && Category::Important < Category::Core);
        let parsed: Level = serde_json::from_str("\"confidential\"").unwrap();
        assert_eq!(parsed, Level::Confidential);
    }

    fn values() -> impl Strategy<Value = Value> {
        prop_oneof![
            "[0-9]{12}".prop_map(Value::from),
            "\\PC{0,24}".prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            "[12][0-9]{3}-[01][0-9]-[0-3][0-9]".prop_map(Value::from),
        ]
    }

    fn policies() -> impl Strategy<Value = Policy> {
        prop_oneof![
            Just(Policy::Redact),
            Just(Policy::Null),
            Just(Policy::Hash),
            (0usize..6).prop_map(Policy::Partial),
            Just(Policy::Year),
        ]
    }

    proptest! {
        /// No masking policy hands the value on: what comes out is absent,
        /// null, a hash, a year, or the value with all but its last `n`
        /// characters starred (the whole value only when it is that short).
        #[test]
        fn no_masking_policy_delivers_the_value(value in values(), policy in policies(), secret in any::<[u8; 16]>()) {
            let k = keys(3, &secret);
            let out = mask(&value, policy, &k);
            let text = text_of(&value);
            match (policy, &out) {
                (Policy::Redact, None) | (_, Some(Value::Null)) => {}
                (Policy::Hash, Some(Value::String(h))) => {
                    prop_assert!(h.starts_with("h3:") && h.len() == 67);
                    prop_assert!(text.len() < 4 || !h.contains(&text));
                }
                (Policy::Year, Some(Value::String(y))) => {
                    prop_assert_eq!(y.len(), 4);
                    prop_assert!(text.starts_with(y.as_str()));
                }
                (Policy::Partial(n), Some(Value::String(p))) => {
                    let chars: Vec<char> = text.chars().collect();
                    let kept = chars.len().min(n);
                    prop_assert_eq!(p.chars().count(), chars.len());
                    prop_assert!(p.chars().take(chars.len() - kept).all(|c| c == '*'));
                    prop_assert!(p.ends_with(&chars[chars.len() - kept..].iter().collect::<String>()));
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }
}
