//! The merge operator: one golden record per citizen from many agencies'
//! facts about them.
//!
//! Agencies key their tables their own way (population by person, health
//! insurance by card number, residence by address). Each source's replica
//! turns its feed into clean changes; [`facts_of_change`] re-keys each change
//! by national ID into [`Fact`]s, which travel through a repartition topic so
//! that every fact about one person meets on one task. There
//! [`Merger::apply`] keeps one *contribution* per (person, source, source key)
//! — versioned like any replica row, so replays and duplicates are dropped —
//! and recomputes that person's golden record and conflicts from the
//! contributions alone ([`resolve`]). Because the result depends only on the
//! set of contributions, and each contribution only on its own source's
//! order, any interleaving of the sources gives the same golden records.
//! Related entities (a vehicle and its owner) travel the same way, keyed by
//! the person they refer to, and are joined with the golden record there.

use crate::debezium::{ChangeEvent, ChangeOp, Key, Row, SourceInfo};
use crate::national_id::NationalId;
use crate::replica::{Outcome, Position};
use crate::store::{StoreError, Txn, ViewId};
use ndc_proto::v1::{LogPosition, SourcePosition};
use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

/// How one golden attribute is chosen among the sources that have it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The value of the first source in priority order that has the
    /// attribute, even if that value is null (the authoritative source
    /// saying "none" wins).
    Priority,
    /// The first non-null value in priority order.
    FirstNonNull,
    /// The non-null value with the latest source commit time (then LSN;
    /// ties by priority, then source key).
    MostRecent,
}

/// Survivorship of one attribute of the golden record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributeRule {
    pub rule: Rule,
    /// Sources in priority order; empty means every input, in input order.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Column of this attribute in a source, where it is not the attribute's
    /// own name (`{health: holder_name}`).
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// Disagreeing non-null values across sources raise a conflict.
    #[serde(default)]
    pub compare: bool,
}

/// The merge operator's rules: its inputs and one rule per attribute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeRules {
    /// Sources merged, in default priority order.
    pub inputs: Vec<String>,
    /// Attributes of the golden record, by name.
    pub attributes: BTreeMap<String, AttributeRule>,
}

impl MergeRules {
    /// Sources of `rule` in priority order.
    fn sources_of<'a>(&'a self, rule: &'a AttributeRule) -> &'a [String] {
        if rule.sources.is_empty() {
            &self.inputs
        } else {
            &rule.sources
        }
    }
}

/// One source row's facts about one person, as it travels on the
/// repartition topic (JSON, Kafka key = national ID).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fact {
    pub national_id: String,
    pub source: String,
    /// The row's primary key in its source (canonical JSON).
    pub source_key: String,
    /// The source row; `None` retracts this source row's contribution.
    pub row: Option<Map<String, Value>>,
    /// Commit time in the agency database.
    pub ts_ms: i64,
    pub lsn: Option<u64>,
    /// Where the change was first read (`kafka:<topic>:<partition>`), and
    /// its offset there: the fact's version.
    pub origin_stream: String,
    pub origin_offset: u64,
    /// The origin's position in its database's log (protobuf `LogPosition`,
    /// base64): what orders the fact's versions ([`crate::ordering`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    /// The origin change was a snapshot read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snapshot: bool,
}

/// Why a repartition record cannot be merged (a dead-letter reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FactError {
    #[error("not a merge fact: {0}")]
    Malformed(String),
    #[error("fact for national ID {0:?}: {1}")]
    InvalidNationalId(String, crate::national_id::NationalIdError),
}

impl Fact {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Fact, FactError> {
        let fact: Fact =
            serde_json::from_slice(bytes).map_err(|e| FactError::Malformed(e.to_string()))?;
        NationalId::parse(&fact.national_id)
            .map_err(|e| FactError::InvalidNationalId(fact.national_id.clone(), e))?;
        Ok(fact)
    }

    /// The origin's log position, if it had one (an unreadable one is
    /// treated as none: the commit time then orders, counted as a fallback).
    pub fn log_position(&self) -> Option<LogPosition> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(self.position.as_deref()?)
            .ok()?;
        LogPosition::decode(bytes.as_slice()).ok()
    }

    /// Key of this fact's contribution: national ID first, so one person's
    /// contributions are adjacent in the store.
    pub fn contribution_key(&self) -> Key {
        Key::from_value(&json!({
            "national_id": self.national_id,
            "source": self.source,
            "source_key": self.source_key,
        }))
    }
}

/// Key prefix of every contribution of one person; as long as
/// [`crate::store::ROW_PREFIX_BLOOM_BYTES`] for a 12-digit ID, so that
/// reading one person's contributions uses the prefix bloom filters.
fn contributions_prefix(national_id: &str) -> String {
    format!("{{\"national_id\":{},", Value::from(national_id))
}

/// A national ID column's value as text (agencies store it as text; some
/// as a number, which loses leading zeros and is padded back).
pub fn national_id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.trim().to_string()),
        Value::Number(n) => Some(format!("{:0>12}", n.to_string())),
        _ => None,
    }
}

/// The facts one change of a source row produces: a retraction from the
/// person the row referred to before, if that changed or the row went away,
/// and the row's current contribution to the person it refers to now.
/// Rows without a national ID contribute nothing.
pub fn facts_of_change(
    source: &str,
    national_id_column: &str,
    key_json: &str,
    before_json: Option<&str>,
    after_json: Option<&str>,
    origin: &SourcePosition,
) -> Vec<Fact> {
    let parse = |json: Option<&str>| -> Option<Map<String, Value>> {
        json.and_then(|j| serde_json::from_str::<Map<String, Value>>(j).ok())
    };
    let before = parse(before_json);
    let after = parse(after_json);
    let id_of = |row: &Option<Map<String, Value>>| {
        row.as_ref()
            .and_then(|r| r.get(national_id_column))
            .and_then(national_id_text)
    };
    let (old_id, new_id) = (id_of(&before), id_of(&after));
    let fact = |national_id: String, row: Option<Map<String, Value>>| Fact {
        national_id,
        source: source.to_string(),
        source_key: key_json.to_string(),
        row,
        ts_ms: origin.ts_ms,
        lsn: origin.lsn,
        origin_stream: origin.stream.clone(),
        origin_offset: origin.offset,
        position: origin.log_position.as_ref().map(|p| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(p.encode_to_vec())
        }),
        snapshot: !matches!(origin.snapshot.as_str(), "" | "false"),
    };
    let mut facts = Vec::new();
    if let Some(old) = old_id
        && new_id.as_ref() != Some(&old)
    {
        facts.push(fact(old, None));
    }
    if let Some(new) = new_id {
        facts.push(fact(new, after));
    }
    facts
}

/// A source's current contribution to one person.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    pub source: String,
    pub source_key: String,
    pub row: Map<String, Value>,
    pub ts_ms: i64,
    pub lsn: Option<u64>,
}

/// A person's golden record and open conflicts, as JSON rows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resolved {
    /// `None` when no source says anything about the person any more.
    pub golden: Option<String>,
    /// Attribute → conflict row, for compared attributes whose sources
    /// disagree.
    pub conflicts: BTreeMap<String, String>,
}

/// Value used to compare attributes across sources: strings trimmed, inner
/// whitespace collapsed, lower-cased; anything else as JSON text.
fn comparable(value: &Value) -> String {
    match value {
        Value::String(s) => s
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase(),
        other => other.to_string(),
    }
}

/// Computes a person's golden record and conflicts from their contributions.
/// A pure function of the contribution set (its order does not matter).
pub fn resolve(rules: &MergeRules, national_id: &str, contributions: &[Contribution]) -> Resolved {
    if contributions.is_empty() {
        return Resolved::default();
    }
    let mut golden = Map::new();
    golden.insert("national_id".into(), Value::from(national_id));
    let mut provenance = Map::new();
    let mut conflicts = BTreeMap::new();
    for (attribute, rule) in &rules.attributes {
        let sources = rules.sources_of(rule);
        // Candidates in priority order: source rank, newest first, key.
        let mut candidates: Vec<(usize, &Contribution, &Value)> = contributions
            .iter()
            .filter_map(|c| {
                let rank = sources.iter().position(|s| *s == c.source)?;
                let column = rule.columns.get(&c.source).unwrap_or(attribute);
                c.row.get(column).map(|v| (rank, c, v))
            })
            .collect();
        candidates.sort_by(|a, b| {
            (a.0, Reverse(a.1.ts_ms), Reverse(a.1.lsn), &a.1.source_key).cmp(&(
                b.0,
                Reverse(b.1.ts_ms),
                Reverse(b.1.lsn),
                &b.1.source_key,
            ))
        });
        let chosen = match rule.rule {
            Rule::Priority => candidates.first().copied(),
            Rule::FirstNonNull => candidates.iter().find(|c| !c.2.is_null()).copied(),
            Rule::MostRecent => candidates
                .iter()
                .filter(|c| !c.2.is_null())
                .min_by(|a, b| {
                    (Reverse(a.1.ts_ms), Reverse(a.1.lsn), a.0, &a.1.source_key).cmp(&(
                        Reverse(b.1.ts_ms),
                        Reverse(b.1.lsn),
                        b.0,
                        &b.1.source_key,
                    ))
                })
                .copied(),
        };
        if let Some((_, c, value)) = chosen {
            golden.insert(attribute.clone(), value.clone());
            provenance.insert(
                attribute.clone(),
                json!({"source": c.source, "source_key": c.source_key, "ts_ms": c.ts_ms, "lsn": c.lsn}),
            );
        }
        if rule.compare {
            let distinct: BTreeSet<String> = candidates
                .iter()
                .filter(|c| !c.2.is_null())
                .map(|c| comparable(c.2))
                .collect();
            if distinct.len() > 1 {
                let values: Vec<Value> = candidates
                    .iter()
                    .filter(|c| !c.2.is_null())
                    .map(|(_, c, v)| {
                        json!({"source": c.source, "source_key": c.source_key, "value": v, "ts_ms": c.ts_ms})
                    })
                    .collect();
                let row = json!({
                    "national_id": national_id,
                    "attribute": attribute,
                    "chosen": chosen.map(|c| c.2.clone()),
                    "values": values,
                });
                conflicts.insert(attribute.clone(), row.to_string());
            }
        }
    }
    let mut contributors: Vec<(&str, &str)> = contributions
        .iter()
        .map(|c| (c.source.as_str(), c.source_key.as_str()))
        .collect();
    contributors.sort_unstable();
    golden.insert("_provenance".into(), Value::Object(provenance));
    golden.insert(
        "_contributors".into(),
        contributors
            .into_iter()
            .map(|(s, k)| json!({"source": s, "source_key": k}))
            .collect(),
    );
    Resolved {
        golden: Some(Value::Object(golden).to_string()),
        conflicts,
    }
}

/// The three views a merge operator writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeViews {
    /// One row per (person, source, source key): the facts as merged.
    pub contributions: ViewId,
    /// One golden record per person, keyed `{"national_id": ...}`.
    pub golden: ViewId,
    /// One row per (person, attribute) in conflict.
    pub conflicts: ViewId,
}

/// Key of a golden record.
pub fn golden_key(national_id: &str) -> Key {
    Key::from_value(&json!({ "national_id": national_id }))
}

/// Key of a conflict row.
pub fn conflict_key(national_id: &str, attribute: &str) -> Key {
    Key::from_value(&json!({ "national_id": national_id, "attribute": attribute }))
}

/// A stream-table join: the related entities of `stream` (vehicles,
/// residences ...), each enriched with the golden record of the person it
/// refers to, in view `view` keyed `{"national_id", "source_key"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinRule {
    pub stream: String,
    /// Golden attributes copied; empty: all.
    pub attributes: Vec<String>,
    pub view: ViewId,
}

/// Key of a join result.
pub fn join_key(national_id: &str, source_key: &str) -> Key {
    Key::from_value(&json!({ "national_id": national_id, "source_key": source_key }))
}

/// Everything the person-keyed task of one pipeline does with a fact: the
/// merge into golden records, and the joins of related entities with them.
/// All facts about a person arrive on one repartition partition, so the
/// golden record and every related entity of a person change together.
#[derive(Debug, Clone, PartialEq)]
pub struct Merger {
    pub rules: MergeRules,
    pub views: MergeViews,
    pub joins: Vec<JoinRule>,
}

impl Merger {
    /// Merges one fact read at `consumed`: updates its contribution (dropped
    /// if not newer than the stored one, by its origin's version), then the
    /// person's golden record, conflicts and joined entities. Returns what
    /// happened to the contribution.
    pub fn apply(
        &self,
        txn: &mut Txn<'_>,
        fact: &Fact,
        consumed: &Position,
    ) -> Result<Outcome, StoreError> {
        let views = self.views;
        let source = SourceInfo {
            ts_ms: fact.ts_ms,
            lsn: fact.lsn,
            table: fact.source.as_str().into(),
            position: fact.log_position(),
            ..SourceInfo::default()
        };
        let event = ChangeEvent {
            op: match (&fact.row, fact.snapshot) {
                (Some(_), true) => ChangeOp::Read,
                (Some(_), false) => ChangeOp::Update,
                (None, _) => ChangeOp::Delete,
            },
            key: Some(fact.contribution_key()),
            before: None,
            after: fact.row.as_ref().map(Row::from_map),
            source,
            processed_ts_ms: None,
        };
        let origin = Position::new(fact.origin_stream.as_str(), fact.origin_offset);
        let outcome =
            crate::replica::apply_from(txn, views.contributions, &event, consumed, &origin)?;
        // `Unchanged` too: same content, newer version — the commit time
        // may change a `most_recent` choice and the provenance.
        if !matches!(
            outcome,
            Outcome::Inserted | Outcome::Updated | Outcome::Deleted | Outcome::Unchanged
        ) {
            return Ok(outcome);
        }
        let position = SourcePosition {
            table: fact.source.clone(),
            ts_ms: fact.ts_ms,
            lsn: fact.lsn,
            stream: fact.origin_stream.clone(),
            offset: fact.origin_offset,
            ..SourcePosition::default()
        };
        self.refresh(txn, &fact.national_id, &position)?;
        if fact.row.is_none()
            && let Some(join) = self.joins.iter().find(|j| j.stream == fact.source)
        {
            txn.put_derived(
                join.view,
                &join_key(&fact.national_id, &fact.source_key),
                None,
                position,
            )?;
        }
        Ok(outcome)
    }

    /// Recomputes a person's golden record, conflicts and joined entities
    /// from their stored contributions; emits changes only where the result
    /// differs. `position` is recorded as the changes' source.
    pub fn refresh(
        &self,
        txn: &mut Txn<'_>,
        national_id: &str,
        position: &SourcePosition,
    ) -> Result<(), StoreError> {
        let views = self.views;
        let prefix = contributions_prefix(national_id);
        let mut all = Vec::new();
        for (key, stored) in txn.live_rows_with_prefix(views.contributions, prefix.as_bytes())? {
            all.push(contribution_of(&key, &stored)?);
        }
        let merged: Vec<Contribution> = all
            .iter()
            .filter(|c| self.rules.inputs.contains(&c.source))
            .cloned()
            .collect();
        let resolved = resolve(&self.rules, national_id, &merged);
        let golden: Option<Map<String, Value>> = resolved
            .golden
            .as_deref()
            .and_then(|g| serde_json::from_str(g).ok());
        txn.put_derived(
            views.golden,
            &golden_key(national_id),
            resolved.golden,
            position.clone(),
        )?;
        let mut conflicts = resolved.conflicts;
        for (attribute, rule) in &self.rules.attributes {
            if rule.compare {
                txn.put_derived(
                    views.conflicts,
                    &conflict_key(national_id, attribute),
                    conflicts.remove(attribute),
                    position.clone(),
                )?;
            }
        }
        for join in &self.joins {
            let person = golden.as_ref().map(|g| {
                let mut p = Map::new();
                for (k, v) in g {
                    let wanted = k == "national_id"
                        || (!k.starts_with('_')
                            && (join.attributes.is_empty() || join.attributes.contains(k)));
                    if wanted {
                        p.insert(k.clone(), v.clone());
                    }
                }
                Value::Object(p)
            });
            // A join's stream may also be a merge input (a residence is
            // both facts about its resident and a location in its own right).
            for c in all.iter().filter(|c| c.source == join.stream) {
                let row = json!({
                    "national_id": national_id,
                    "source_key": c.source_key,
                    "row": c.row,
                    "person": person,
                });
                txn.put_derived(
                    join.view,
                    &join_key(national_id, &c.source_key),
                    Some(row.to_string()),
                    position.clone(),
                )?;
            }
        }
        Ok(())
    }

    /// Recomputes every person (after the rules changed, the state kept).
    /// Returns how many people were recomputed.
    pub fn refresh_all(&self, txn: &mut Txn<'_>) -> Result<u64, StoreError> {
        let mut people = BTreeSet::new();
        for (key, _) in txn.live_rows_with_prefix(self.views.contributions, b"")? {
            let key: Map<String, Value> = serde_json::from_slice(&key)
                .map_err(|e| StoreError::CorruptRow(format!("contribution key: {e}")))?;
            if let Some(id) = key.get("national_id").and_then(Value::as_str) {
                people.insert(id.to_string());
            }
        }
        let position = SourcePosition {
            table: "(rules changed)".into(),
            ..SourcePosition::default()
        };
        for id in &people {
            self.refresh(txn, id, &position)?;
        }
        Ok(people.len() as u64)
    }
}

/// A stored contribution back into a [`Contribution`]: the key names the
/// source and source key, the row is the source row, the version its time.
fn contribution_of(
    key: &[u8],
    stored: &ndc_proto::state::StoredRow,
) -> Result<Contribution, StoreError> {
    let corrupt = |what: &str| StoreError::CorruptRow(format!("contribution: {what}"));
    let key: Map<String, Value> =
        serde_json::from_slice(key).map_err(|e| corrupt(&e.to_string()))?;
    let text = |k: &str| {
        key.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| corrupt(k))
    };
    let row = serde_json::from_str(&stored.row_json).map_err(|e| corrupt(&e.to_string()))?;
    let version = stored
        .version
        .as_ref()
        .ok_or_else(|| corrupt("no version"))?;
    Ok(Contribution {
        source: text("source")?,
        source_key: text("source_key")?,
        row,
        ts_ms: version.source_ts_ms,
        lsn: version.lsn,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_persons_prefix_has_the_bloom_filtered_length_and_starts_their_keys() {
        let prefix = super::contributions_prefix("001089123456");
        assert_eq!(prefix.len(), crate::store::ROW_PREFIX_BLOOM_BYTES);
        // Written by hand beside the canonical key: they must agree.
        let fact = super::Fact {
            national_id: "001089123456".into(),
            source: "health".into(),
            source_key: r#"{"card_no":"HC1"}"#.into(),
            row: None,
            ts_ms: 0,
            lsn: None,
            origin_stream: String::new(),
            origin_offset: 0,
            position: None,
            snapshot: false,
        };
        assert!(fact.contribution_key().as_str().starts_with(&prefix));
    }
}
