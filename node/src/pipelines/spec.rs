//! Pipeline specs: what a data steward submits to integrate agencies' feeds.
//!
//! A spec names its sources (one agency table each: topic, format, key,
//! national-ID column, field classification) and its operators (merge:
//! golden records; join: enrich a related entity with its person's golden
//! record). Operators read sources or other operators, so a spec is a DAG;
//! every node of it is a view subscribers can read, named
//! `<pipeline>.<node>` (the merge also publishes `<pipeline>.<merge>.conflicts`
//! and `<pipeline>.<merge>.contributions`). See `docs/pipelines.md`.

use ndc_operators::Format;
use ndc_operators::masking::{Category, Level};
use ndc_operators::merge::MergeRules;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A pipeline spec (YAML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Names the pipeline and prefixes its views.
    pub name: String,
    /// Raised by the author on every change; an apply with a lower or equal
    /// version than the running one is refused unless identical.
    #[serde(default = "one")]
    pub version: u64,
    #[serde(default)]
    pub description: String,
    /// Shards of every view of the pipeline: a source's split by its
    /// topic's partitions (`partition mod shards`), the merge's and its
    /// joins' by national ID. Each shard is placed on its own nodes in a
    /// cluster; fixed once the pipeline runs (a change rebuilds it).
    #[serde(default = "one_shard", skip_serializing_if = "is_one_shard")]
    pub shards: u32,
    pub sources: BTreeMap<String, SourceSpec>,
    #[serde(default)]
    pub operators: BTreeMap<String, OperatorSpec>,
    /// Columns whose inherited level is lowered on purpose, by
    /// `<source or operator view>.<column>` (`people.gender`,
    /// `vehicle_owners.row.make`): the only way a level goes down.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub declassify: BTreeMap<String, Declassification>,
}

/// A level lowered on purpose, and why (kept with the spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declassification {
    pub level: Level,
    pub reason: String,
}

fn one() -> u64 {
    1
}

fn one_shard() -> u32 {
    1
}

fn is_one_shard(n: &u32) -> bool {
    *n == 1
}

/// Most shards a pipeline may have (a shard is a change log, a RocksDB key
/// range and a placement unit each).
pub const MAX_SHARDS: u32 = 256;

/// One agency table's change feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub topic: String,
    #[serde(default)]
    pub format: Format,
    /// Primary-key columns; empty: the Kafka message key.
    #[serde(default)]
    pub key: Vec<String>,
    /// Where the row's national ID is, checked on every row.
    #[serde(default)]
    pub national_id: Option<NationalIdSpec>,
    /// Level (and Data Law category) of each column; a column not named
    /// here is `secret`. Every view made from the source inherits them.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldClass>,
}

/// The national-ID column of a source and the columns it must agree with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NationalIdSpec {
    pub column: String,
    /// Birth date column: its year must match the ID's century and year digits.
    #[serde(default)]
    pub birth_date: Option<String>,
    /// Gender column: must match the ID's century/gender digit.
    #[serde(default)]
    pub gender: Option<String>,
    /// Reject rows without a national ID (default). `false` for related
    /// entities that may have no person (a state-owned vehicle).
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

/// How sensitive a source column is: a level (`confidential`), or a level
/// and the Data Law's category (`{level: confidential, category: core}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FieldClass {
    Level(Level),
    Classified {
        level: Level,
        #[serde(default = "other")]
        category: Category,
    },
}

fn other() -> Category {
    Category::Other
}

impl FieldClass {
    pub fn level(&self) -> Level {
        match self {
            FieldClass::Level(l) | FieldClass::Classified { level: l, .. } => *l,
        }
    }

    pub fn category(&self) -> Category {
        match self {
            FieldClass::Level(_) => Category::Other,
            FieldClass::Classified { category, .. } => *category,
        }
    }
}

/// The levels of a view's columns (the others are `secret`) and the column
/// naming the person its rows are about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewClass {
    pub levels: BTreeMap<String, Level>,
    pub national_id: Option<String>,
}

/// An operator of the DAG.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OperatorSpec {
    /// Golden records: facts of the inputs re-keyed by national ID.
    Merge(MergeRules),
    /// A related entity (its source), enriched with the golden record of
    /// the person in its `on` column, kept current as either side changes.
    Join(JoinSpec),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinSpec {
    /// The related entity's source (vehicles, residences, businesses ...).
    pub stream: String,
    /// The merge operator whose golden records are looked up.
    pub table: String,
    /// Column of the stream's rows holding the person's national ID.
    pub on: String,
    /// Golden attributes copied into the result; empty: all.
    #[serde(default)]
    pub attributes: Vec<String>,
}

/// A spec problem, located by its path in the spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SpecError {
    pub path: String,
    pub message: String,
}

/// Several problems, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pipeline spec:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
pub struct SpecErrors(pub Vec<SpecError>);

impl PipelineSpec {
    /// Parses YAML (or JSON) and validates.
    pub fn from_yaml(text: &str) -> Result<PipelineSpec, SpecErrors> {
        let one = |path: &str, message: String| {
            SpecErrors(vec![SpecError {
                path: path.into(),
                message,
            }])
        };
        let value: serde_norway::Value =
            serde_norway::from_str(text).map_err(|e| one("(yaml)", e.to_string()))?;
        let spec: PipelineSpec = crate::config::from_yaml_value(&value)
            .map_err(|(path, message)| one(&path, message))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks references and names; reports every problem at once.
    pub fn validate(&self) -> Result<(), SpecErrors> {
        let mut errors = Vec::new();
        let mut bad = |path: String, message: &str| {
            errors.push(SpecError {
                path,
                message: message.into(),
            })
        };
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        };
        if !name_ok(&self.name) {
            bad(
                "name".into(),
                "must be non-empty lowercase letters, digits, '_' or '-'",
            );
        }
        if self.sources.is_empty() {
            bad("sources".into(), "a pipeline needs at least one source");
        }
        if !(1..=MAX_SHARDS).contains(&self.shards) {
            bad("shards".into(), "must be between 1 and 256");
        }
        for (name, source) in &self.sources {
            let at = format!("sources.{name}");
            if !name_ok(name) {
                bad(
                    at.clone(),
                    "source names are lowercase letters, digits, '_' or '-'",
                );
            }
            if self.operators.contains_key(name) {
                bad(at.clone(), "a source and an operator share this name");
            }
            if source.topic.trim().is_empty() {
                bad(format!("{at}.topic"), "must not be empty");
            }
            if source.key.iter().any(|c| c.trim().is_empty()) {
                bad(format!("{at}.key"), "column names must not be empty");
            }
            let mut columns = BTreeSet::new();
            if let Some(repeated) = source.key.iter().find(|c| !columns.insert(*c)) {
                bad(
                    format!("{at}.key"),
                    &format!("column {repeated:?} is named twice"),
                );
            }
            if let Some(id) = &source.national_id
                && id.column.trim().is_empty()
            {
                bad(format!("{at}.national_id.column"), "must not be empty");
            }
        }
        let mut join_streams = BTreeSet::new();
        for (name, op) in &self.operators {
            let at = format!("operators.{name}");
            if !name_ok(name) {
                bad(
                    at.clone(),
                    "operator names are lowercase letters, digits, '_' or '-'",
                );
            }
            match op {
                OperatorSpec::Merge(m) => {
                    if m.inputs.is_empty() {
                        bad(
                            format!("{at}.merge.inputs"),
                            "a merge needs at least one input",
                        );
                    }
                    for (i, input) in m.inputs.iter().enumerate() {
                        match self.sources.get(input) {
                            None => bad(
                                format!("{at}.merge.inputs[{i}]"),
                                &format!("{input:?} is not a source of this pipeline"),
                            ),
                            Some(s) if s.national_id.is_none() => bad(
                                format!("{at}.merge.inputs[{i}]"),
                                &format!("source {input:?} has no national_id column to merge on"),
                            ),
                            Some(_) => {}
                        }
                    }
                    if m.attributes.is_empty() {
                        bad(
                            format!("{at}.merge.attributes"),
                            "name at least one attribute",
                        );
                    }
                    for (attr, rule) in &m.attributes {
                        let here = format!("{at}.merge.attributes.{attr}");
                        if attr.starts_with('_') || attr == "national_id" {
                            bad(here.clone(), "reserved attribute name");
                        }
                        for (i, s) in rule.sources.iter().enumerate() {
                            if !m.inputs.contains(s) {
                                bad(
                                    format!("{here}.sources[{i}]"),
                                    &format!("{s:?} is not an input of this merge"),
                                );
                            }
                        }
                        for s in rule.columns.keys() {
                            if !m.inputs.contains(s) {
                                bad(
                                    format!("{here}.columns.{s}"),
                                    &format!("{s:?} is not an input of this merge"),
                                );
                            }
                        }
                    }
                }
                OperatorSpec::Join(j) => {
                    match self.sources.get(&j.stream) {
                        None => bad(
                            format!("{at}.join.stream"),
                            &format!("{:?} is not a source of this pipeline", j.stream),
                        ),
                        // A merged source's facts are re-keyed by its
                        // national_id column; a join of it must use the same.
                        Some(s)
                            if self.merge_inputs().contains(j.stream.as_str())
                                && s.national_id.as_ref().is_some_and(|n| n.column != j.on) =>
                        {
                            bad(
                                format!("{at}.join.on"),
                                &format!(
                                    "{:?} is merged by its national_id column; join it on that column",
                                    j.stream
                                ),
                            )
                        }
                        Some(_) => {}
                    }
                    if !join_streams.insert(j.stream.clone()) {
                        bad(
                            format!("{at}.join.stream"),
                            &format!("{:?} is already joined by another operator", j.stream),
                        );
                    }
                    match self.operators.get(&j.table) {
                        Some(OperatorSpec::Merge(m)) => {
                            for (i, a) in j.attributes.iter().enumerate() {
                                if !m.attributes.contains_key(a) {
                                    bad(
                                        format!("{at}.join.attributes[{i}]"),
                                        &format!("{a:?} is not an attribute of {:?}", j.table),
                                    );
                                }
                            }
                        }
                        _ => bad(
                            format!("{at}.join.table"),
                            &format!("{:?} is not a merge operator of this pipeline", j.table),
                        ),
                    }
                    if j.on.trim().is_empty() {
                        bad(format!("{at}.join.on"), "must not be empty");
                    }
                }
            }
        }
        if self.merges().count() > 1 {
            bad(
                "operators".into(),
                "one merge per pipeline (its repartition topic carries one person space)",
            );
        }
        errors.extend(self.declassify_errors());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SpecErrors(errors))
        }
    }

    /// The merge operators (name, rules).
    pub fn merges(&self) -> impl Iterator<Item = (&str, &MergeRules)> {
        self.operators.iter().filter_map(|(n, o)| match o {
            OperatorSpec::Merge(m) => Some((n.as_str(), m)),
            OperatorSpec::Join(_) => None,
        })
    }

    /// The join operators (name, spec).
    pub fn joins(&self) -> impl Iterator<Item = (&str, &JoinSpec)> {
        self.operators.iter().filter_map(|(n, o)| match o {
            OperatorSpec::Join(j) => Some((n.as_str(), j)),
            OperatorSpec::Merge(_) => None,
        })
    }

    fn merge_inputs(&self) -> BTreeSet<&str> {
        self.merges()
            .flat_map(|(_, m)| m.inputs.iter().map(String::as_str))
            .collect()
    }

    /// View of a source or operator of this pipeline.
    pub fn view(&self, node: &str) -> String {
        format!("{}.{node}", self.name)
    }

    /// Every view this pipeline writes, in a stable order.
    pub fn views(&self) -> Vec<String> {
        self.sources
            .keys()
            .chain(self.operators.keys())
            .flat_map(|node| self.node_views(node))
            .collect()
    }

    /// The store views (shards) of one of this pipeline's views, in shard
    /// order.
    pub fn store_names(&self, view: &str) -> Vec<String> {
        ndc_operators::shard::store_names(view, self.shards)
    }

    /// The views of one source or operator: a merge also writes its
    /// conflicts and contributions.
    pub fn node_views(&self, node: &str) -> Vec<String> {
        let base = self.view(node);
        match self.operators.get(node) {
            Some(OperatorSpec::Merge(_)) => vec![
                base.clone(),
                format!("{base}.conflicts"),
                format!("{base}.contributions"),
            ],
            _ => vec![base],
        }
    }

    /// The column of `source` that carries the national ID facts are
    /// re-keyed by: its `national_id.column` when merged, the join's `on`
    /// column when joined; `None` for a source that is only replicated.
    pub fn rekey_column(&self, source: &str) -> Option<&str> {
        if self.merge_inputs().contains(source) {
            return self
                .sources
                .get(source)?
                .national_id
                .as_ref()
                .map(|n| n.column.as_str());
        }
        self.joins()
            .find(|(_, j)| j.stream == source)
            .map(|(_, j)| j.on.as_str())
    }

    /// A source column's level: as declared, else `secret`.
    fn level_in(&self, source: &str, column: &str) -> Level {
        self.sources
            .get(source)
            .and_then(|s| s.fields.get(column))
            .map_or(Level::Secret, FieldClass::level)
    }

    /// A source key's level: its highest column (`secret` for a message
    /// key, whose columns the spec does not name).
    fn key_level(&self, source: &str) -> Level {
        match self.sources.get(source) {
            Some(s) if !s.key.is_empty() => s
                .key
                .iter()
                .map(|c| self.level_in(source, c))
                .max()
                .unwrap_or(Level::Secret),
            _ => Level::Secret,
        }
    }

    /// The level of a source's national-ID column.
    fn id_level(&self, source: &str) -> Level {
        match self
            .sources
            .get(source)
            .and_then(|s| s.national_id.as_ref())
        {
            Some(n) => self.level_in(source, &n.column),
            None => Level::Secret,
        }
    }

    /// A golden attribute's level: the highest of the columns it is chosen
    /// from.
    fn attribute_level(&self, m: &MergeRules, attribute: &str) -> Level {
        let Some(rule) = m.attributes.get(attribute) else {
            return Level::Secret;
        };
        let sources = if rule.sources.is_empty() {
            &m.inputs
        } else {
            &rule.sources
        };
        sources
            .iter()
            .map(|s| self.level_in(s, rule.columns.get(s).map_or(attribute, String::as_str)))
            .max()
            .unwrap_or(Level::Secret)
    }

    /// Every view's column levels as inherited from the sources' fields: a
    /// value made from several inputs carries the highest of their levels
    /// (docs/security.md, "Levels of pipeline views"). Keyed by the view's
    /// name within the pipeline (`people`, `people.conflicts`).
    fn inherited(&self) -> BTreeMap<String, ViewClass> {
        let top = |levels: &mut dyn Iterator<Item = Level>| levels.max().unwrap_or(Level::Secret);
        let person = Some("national_id".to_string());
        let mut out = BTreeMap::new();
        for (name, source) in &self.sources {
            out.insert(
                name.clone(),
                ViewClass {
                    levels: source
                        .fields
                        .iter()
                        .map(|(c, f)| (c.clone(), f.level()))
                        .collect(),
                    national_id: source.national_id.as_ref().map(|n| n.column.clone()),
                },
            );
        }
        for (name, m) in self.merges() {
            let id = top(&mut m.inputs.iter().map(|s| self.id_level(s)));
            let keys = top(&mut m.inputs.iter().map(|s| self.key_level(s)));
            let mut golden: BTreeMap<String, Level> = m
                .attributes
                .keys()
                .map(|a| (a.clone(), self.attribute_level(m, a)))
                .collect();
            golden.insert("national_id".into(), id);
            // Which source and row each value came from: as sensitive as
            // the sources' keys.
            golden.insert("_provenance".into(), keys);
            golden.insert("_contributors".into(), keys);
            // A conflict row shows compared attributes' values from every
            // source, with their keys.
            let compared = m
                .attributes
                .iter()
                .filter(|(_, r)| r.compare)
                .map(|(a, _)| self.attribute_level(m, a))
                .max()
                .unwrap_or(Level::Public);
            let conflicts = BTreeMap::from([
                ("national_id".to_string(), id),
                ("attribute".to_string(), Level::Public),
                ("chosen".to_string(), compared),
                ("values".to_string(), compared.max(keys)),
            ]);
            // A contribution is one input's row: a column is as sensitive
            // as the highest of the inputs' levels for it.
            let mut contributions: BTreeMap<String, Level> = m
                .inputs
                .iter()
                .filter_map(|s| self.sources.get(s))
                .flat_map(|s| s.fields.keys())
                .map(|c| {
                    (
                        c.clone(),
                        top(&mut m.inputs.iter().map(|s| self.level_in(s, c))),
                    )
                })
                .collect();
            contributions.insert("national_id".into(), id);
            contributions.insert("source".into(), Level::Public);
            contributions.insert("source_key".into(), keys);
            for (suffix, levels) in [
                ("", golden),
                (".conflicts", conflicts),
                (".contributions", contributions),
            ] {
                out.insert(
                    format!("{name}{suffix}"),
                    ViewClass {
                        levels,
                        national_id: person.clone(),
                    },
                );
            }
        }
        for (name, j) in self.joins() {
            let mut levels = BTreeMap::from([
                ("national_id".to_string(), self.level_in(&j.stream, &j.on)),
                ("source_key".to_string(), self.key_level(&j.stream)),
            ]);
            // `row` and `person` are objects: each member has its level
            // (`row.plate`), the object as a whole the highest of them.
            let fields = self.sources.get(&j.stream).map(|s| &s.fields);
            for (c, f) in fields.into_iter().flatten() {
                levels.insert(format!("row.{c}"), f.level());
            }
            levels.insert(
                "row".into(),
                top(&mut fields.into_iter().flatten().map(|(_, f)| f.level())).max(Level::Secret),
            );
            if let Some(OperatorSpec::Merge(m)) = self.operators.get(&j.table) {
                let attributes: Vec<&String> = if j.attributes.is_empty() {
                    m.attributes.keys().collect()
                } else {
                    j.attributes.iter().collect()
                };
                let mut highest = Level::Public;
                for a in attributes {
                    let l = self.attribute_level(m, a);
                    highest = highest.max(l);
                    levels.insert(format!("person.{a}"), l);
                }
                levels.insert("person".into(), highest);
            }
            out.insert(
                name.to_string(),
                ViewClass {
                    levels,
                    national_id: person.clone(),
                },
            );
        }
        out
    }

    /// Which view and column a `declassify` entry names.
    fn declassified<'a>(
        &self,
        entry: &'a str,
        views: &BTreeMap<String, ViewClass>,
    ) -> Option<(String, &'a str)> {
        views
            .keys()
            .filter(|v| entry.len() > v.len() + 1 && entry.starts_with(v.as_str()))
            .filter(|v| entry.as_bytes()[v.len()] == b'.')
            .max_by_key(|v| v.len())
            .map(|v| (v.clone(), &entry[v.len() + 1..]))
    }

    /// Every view's classification, inherited and then declassified as the
    /// spec says; keyed by full view name.
    pub fn classification(&self) -> BTreeMap<String, ViewClass> {
        let mut views = self.inherited();
        for (entry, d) in &self.declassify {
            if let Some((view, column)) = self.declassified(entry, &views)
                && let Some(class) = views.get_mut(&view)
            {
                class.levels.insert(column.to_string(), d.level);
            }
        }
        views.into_iter().map(|(v, c)| (self.view(&v), c)).collect()
    }

    /// Problems of the `declassify` entries: each names a view and column
    /// of this pipeline, says why, and does not raise what it names.
    fn declassify_errors(&self) -> Vec<SpecError> {
        let views = self.inherited();
        let mut errors = Vec::new();
        for (entry, d) in &self.declassify {
            let path = format!("declassify.{entry}");
            let Some((view, column)) = self.declassified(entry, &views) else {
                errors.push(SpecError {
                    path,
                    message:
                        "name a view of this pipeline and one of its columns (`people.gender`)"
                            .into(),
                });
                continue;
            };
            if d.reason.trim().is_empty() {
                errors.push(SpecError {
                    path: format!("{path}.reason"),
                    message: "say why this column may be seen at a lower level".into(),
                });
            }
            let inherited = views[&view]
                .levels
                .get(column)
                .copied()
                .unwrap_or(Level::Secret);
            if d.level > inherited {
                errors.push(SpecError {
                    path: format!("{path}.level"),
                    message: format!(
                        "{column} of {view} is {} already; declassify only lowers",
                        inherited.as_str()
                    ),
                });
            }
        }
        errors
    }

    /// Levels this spec lowers from `running` without saying so in
    /// `declassify` (a classified column that would be seen at a lower
    /// level than it is now). Columns classified for the first time are
    /// not lowered: undeclared, they were `secret` by default only.
    pub fn lowered_from(&self, running: &PipelineSpec) -> Result<(), SpecErrors> {
        let now = self.classification();
        let mut errors = Vec::new();
        for (view, was) in running.classification() {
            let Some(is) = now.get(&view) else { continue };
            for (column, before) in &was.levels {
                let after = is.levels.get(column).copied().unwrap_or(Level::Secret);
                let entry = format!("{}.{column}", &view[self.name.len() + 1..]);
                if after < *before && !self.declassify.contains_key(&entry) {
                    errors.push(SpecError {
                        path: format!("declassify.{entry}"),
                        message: format!(
                            "this version lowers {column} of {view} from {} to {}; \
                             say so: declassify: {{{entry}: {{level: {}, reason: ...}}}}",
                            before.as_str(),
                            after.as_str(),
                            after.as_str()
                        ),
                    });
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SpecErrors(errors))
        }
    }

    /// Whether the pipeline needs its repartition topic.
    pub fn repartitions(&self) -> bool {
        self.operators.values().next().is_some()
    }

    /// The operators whose state shape differs between `self` and `next`:
    /// their state is dropped on update. (Attribute rules are not shape:
    /// golden records are recomputed from the kept contributions.)
    pub fn reshaped(&self, next: &PipelineSpec) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if self.shards != next.shards {
            // Every view is split anew: everything is rebuilt.
            out.extend(next.sources.keys().chain(next.operators.keys()).cloned());
            return out;
        }
        for (name, s) in &next.sources {
            let same = self.sources.get(name).is_some_and(|old| {
                old.topic == s.topic && old.format == s.format && old.key == s.key
            });
            if !same {
                out.insert(name.clone());
            }
        }
        for (name, op) in &next.operators {
            let same = match (self.operators.get(name), op) {
                (Some(OperatorSpec::Merge(a)), OperatorSpec::Merge(b)) => {
                    a.inputs == b.inputs
                        && b.inputs
                            .iter()
                            .all(|i| self.rekey_column(i) == next.rekey_column(i))
                }
                (Some(OperatorSpec::Join(a)), OperatorSpec::Join(b)) => {
                    a.stream == b.stream && a.on == b.on && a.table == b.table
                }
                _ => false,
            };
            if !same {
                out.insert(name.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
name: citizen
version: 2
sources:
  population:
    topic: population.public.citizen
    key: [person_id]
    national_id: {column: person_id, birth_date: birth_date, gender: gender}
    fields: {person_id: confidential, full_name: confidential}
  health:
    topic: health.public.insurance_card
    national_id: {column: person_id}
  vehicles:
    topic: vehicles.public.vehicle
    national_id: {column: owner_id, required: false}
operators:
  people:
    merge:
      inputs: [population, health]
      attributes:
        full_name: {rule: priority, sources: [population, health], compare: true}
        phone: {rule: most_recent, columns: {health: mobile}}
  vehicle_owners:
    join: {stream: vehicles, table: people, on: owner_id, attributes: [full_name]}
"#;

    #[test]
    fn a_valid_spec_names_its_views_and_rekey_columns() {
        let spec = PipelineSpec::from_yaml(SPEC).expect("valid");
        assert_eq!(spec.version, 2);
        assert_eq!(
            spec.views(),
            [
                "citizen.health",
                "citizen.population",
                "citizen.vehicles",
                "citizen.people",
                "citizen.people.conflicts",
                "citizen.people.contributions",
                "citizen.vehicle_owners",
            ]
        );
        assert_eq!(spec.rekey_column("population"), Some("person_id"));
        assert_eq!(spec.rekey_column("vehicles"), Some("owner_id"));
        assert!(spec.repartitions());
    }

    #[test]
    fn errors_point_at_the_field() {
        let wrong_type = SPEC.replace("version: 2", "version: two");
        let e = PipelineSpec::from_yaml(&wrong_type).expect_err("invalid");
        assert_eq!(e.0[0].path, "version", "{e}");
        let unknown_rule = SPEC.replace("rule: most_recent", "rule: newest");
        let e = PipelineSpec::from_yaml(&unknown_rule).expect_err("invalid");
        assert_eq!(
            e.0[0].path, "operators.people.merge.attributes.phone.rule",
            "{e}"
        );
        let unknown_field = SPEC.replace("compare: true", "compare: true, weight: 3");
        let e = PipelineSpec::from_yaml(&unknown_field).expect_err("invalid");
        assert!(
            e.0[0]
                .path
                .starts_with("operators.people.merge.attributes.full_name"),
            "{e}"
        );
        let dangling = SPEC
            .replace(
                "inputs: [population, health]",
                "inputs: [population, insurance]",
            )
            .replace("columns: {health: mobile}", "columns: {dmv: mobile}");
        let e = PipelineSpec::from_yaml(&dangling).expect_err("invalid");
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "operators.people.merge.inputs[1]",
                "operators.people.merge.attributes.full_name.sources[1]",
                "operators.people.merge.attributes.phone.columns.dmv",
            ],
            "{e}"
        );
        let merged_join = SPEC.replace(
            "operators:\n",
            "operators:\n  homes:\n    join: {stream: health, table: people, on: card_no}\n",
        );
        let e = PipelineSpec::from_yaml(&merged_join).expect_err("invalid");
        assert_eq!(e.0[0].path, "operators.homes.join.on", "{e}");
        let ok = merged_join.replace("on: card_no", "on: person_id");
        assert!(PipelineSpec::from_yaml(&ok).is_ok());
        let bad_join = SPEC.replace("table: people", "table: vehicles");
        let e = PipelineSpec::from_yaml(&bad_join).expect_err("invalid");
        assert_eq!(e.0[0].path, "operators.vehicle_owners.join.table");
        let twice = SPEC.replace("key: [person_id]", "key: [person_id, person_id]");
        let e = PipelineSpec::from_yaml(&twice).expect_err("invalid");
        assert_eq!(e.0[0].path, "sources.population.key", "{e}");
        assert!(
            e.to_string()
                .contains(r#"column "person_id" is named twice"#),
            "{e}"
        );
        let blank = SPEC.replace("key: [person_id]", "key: [person_id, ' ']");
        let e = PipelineSpec::from_yaml(&blank).expect_err("invalid");
        assert_eq!(e.0[0].path, "sources.population.key", "{e}");
        let no_id = SPEC.replace("    national_id: {column: person_id}\n", "");
        let e = PipelineSpec::from_yaml(&no_id).expect_err("invalid");
        assert_eq!(e.0[0].path, "operators.people.merge.inputs[1]", "{e}");
    }

    #[test]
    fn rule_changes_keep_state_and_rekeying_changes_reset_it() {
        let old = PipelineSpec::from_yaml(SPEC).expect("valid");
        let rules =
            PipelineSpec::from_yaml(&SPEC.replace("rule: priority", "rule: first_non_null"))
                .expect("valid");
        assert!(old.reshaped(&rules).is_empty());
        let rekeyed = PipelineSpec::from_yaml(&SPEC.replace(
            "national_id: {column: person_id}\n",
            "national_id: {column: holder_id}\n",
        ))
        .expect("valid");
        assert_eq!(
            old.reshaped(&rekeyed),
            BTreeSet::from(["people".to_string()])
        );
        let retopic =
            PipelineSpec::from_yaml(&SPEC.replace("vehicles.public.vehicle", "dmv.vehicle"))
                .expect("valid");
        assert_eq!(
            retopic.reshaped(&old),
            BTreeSet::from(["vehicles".to_string()])
        );
    }

    const NATIONAL: &str = include_str!("../../../examples/national.yaml");

    fn level_of(c: &BTreeMap<String, ViewClass>, view: &str, column: &str) -> Level {
        c[view].levels.get(column).copied().unwrap_or(Level::Secret)
    }

    #[test]
    fn shards_are_bounded_and_a_new_count_rebuilds_everything() {
        let one = PipelineSpec::from_yaml(SPEC).expect("valid");
        assert_eq!(one.shards, 1);
        assert_eq!(one.store_names("citizen.people"), ["citizen.people"]);
        let four = PipelineSpec::from_yaml(&SPEC.replace("version: 2", "version: 3\nshards: 4"))
            .expect("valid");
        assert_eq!(
            four.store_names("citizen.people"),
            [
                "citizen.people#0",
                "citizen.people#1",
                "citizen.people#2",
                "citizen.people#3"
            ]
        );
        let every: BTreeSet<String> = four
            .sources
            .keys()
            .chain(four.operators.keys())
            .cloned()
            .collect();
        assert_eq!(one.reshaped(&four), every);
        assert!(four.reshaped(&four).is_empty());
        for bad in ["shards: 0", "shards: 257"] {
            let e =
                PipelineSpec::from_yaml(&SPEC.replace("version: 2", &format!("version: 2\n{bad}")))
                    .expect_err(bad);
            assert!(e.to_string().contains("shards"), "{e}");
        }
    }

    #[test]
    fn pipeline_views_inherit_the_highest_level_of_their_inputs() {
        let spec = PipelineSpec::from_yaml(NATIONAL).unwrap();
        let c = spec.classification();
        // A source view: as declared, undeclared columns secret.
        assert_eq!(
            level_of(&c, "national.population", "gender"),
            Level::Internal
        );
        assert_eq!(
            level_of(&c, "national.population", "nationality"),
            Level::Secret
        );
        assert_eq!(
            c["national.population"].national_id.as_deref(),
            Some("person_id")
        );
        // Golden attributes: the highest of the columns they come from.
        assert_eq!(level_of(&c, "national.people", "gender"), Level::Internal);
        assert_eq!(
            level_of(&c, "national.people", "full_name"),
            Level::Confidential
        );
        assert_eq!(level_of(&c, "national.people", "phone"), Level::Secret);
        assert_eq!(
            level_of(&c, "national.people", "province_code"),
            Level::Public
        );
        assert_eq!(
            level_of(&c, "national.people", "national_id"),
            Level::Confidential
        );
        // Provenance names source keys: residence's key (address_id) is
        // undeclared, so secret.
        assert_eq!(
            level_of(&c, "national.people", "_provenance"),
            Level::Secret
        );
        // A conflict row: its values are as high as the compared attributes.
        assert_eq!(
            level_of(&c, "national.people.conflicts", "attribute"),
            Level::Public
        );
        assert_eq!(
            level_of(&c, "national.people.conflicts", "chosen"),
            Level::Confidential
        );
        // A contribution column: the highest of every input's level for it.
        assert_eq!(
            level_of(&c, "national.people.contributions", "province_code"),
            Level::Secret
        );
        assert_eq!(
            level_of(&c, "national.people.contributions", "source"),
            Level::Public
        );
        // A join: the entity's members as declared, the person's as the
        // golden attributes.
        assert_eq!(
            level_of(&c, "national.vehicle_owners", "row.make"),
            Level::Public
        );
        assert_eq!(
            level_of(&c, "national.vehicle_owners", "row.plate"),
            Level::Internal
        );
        assert_eq!(
            level_of(&c, "national.vehicle_owners", "person.full_name"),
            Level::Confidential
        );
        assert_eq!(
            level_of(&c, "national.vehicle_owners", "person.province_code"),
            Level::Public
        );
        assert_eq!(
            level_of(&c, "national.vehicle_owners", "national_id"),
            Level::Confidential
        );
        assert_eq!(
            c["national.vehicle_owners"].national_id.as_deref(),
            Some("national_id")
        );
    }

    #[test]
    fn only_declassify_lowers_a_level_and_it_must_say_why() {
        let lowered = format!(
            "{NATIONAL}\ndeclassify:\n  people.gender: {{level: public, reason: population statistics}}\n"
        );
        let spec = PipelineSpec::from_yaml(&lowered).unwrap();
        assert_eq!(
            level_of(&spec.classification(), "national.people", "gender"),
            Level::Public
        );
        let bad = format!(
            "{NATIONAL}\ndeclassify:\n  people.gender: {{level: secret, reason: x}}\n  people.nothing_here.x: {{level: public, reason: x}}\n  nowhere.x: {{level: public, reason: x}}\n  people.phone: {{level: public, reason: ' '}}\n"
        );
        let errors = PipelineSpec::from_yaml(&bad).unwrap_err().to_string();
        assert!(
            errors.contains("declassify.people.gender.level: gender of people is internal already"),
            "{errors}"
        );
        assert!(
            errors.contains("declassify.nowhere.x: name a view"),
            "{errors}"
        );
        assert!(
            errors.contains("declassify.people.phone.reason"),
            "{errors}"
        );
    }

    #[test]
    fn a_new_version_that_lowers_a_level_is_refused_unless_it_says_so() {
        let v1 = PipelineSpec::from_yaml(NATIONAL).unwrap();
        let lower = NATIONAL.replace("version: 1", "version: 2").replace(
            "      full_name: confidential\n      birth_date",
            "      full_name: internal\n      birth_date",
        );
        let v2 = PipelineSpec::from_yaml(&lower).unwrap();
        let refused = v2.lowered_from(&v1).unwrap_err().to_string();
        assert!(
            refused.contains("declassify.population.full_name: this version lowers full_name of national.population from confidential to internal"),
            "{refused}"
        );
        // Golden full_name still takes health's confidential holder_name.
        assert!(!refused.contains("people.full_name"), "{refused}");
        let said = format!(
            "{lower}\ndeclassify:\n  population.full_name: {{level: internal, reason: names are public in the registry}}\n"
        );
        PipelineSpec::from_yaml(&said)
            .unwrap()
            .lowered_from(&v1)
            .unwrap();
        // Raising is always allowed; classifying a column for the first time too.
        let raised = NATIONAL.replace("version: 1", "version: 2").replace(
            "      gender: internal\n",
            "      gender: secret\n      nationality: public\n",
        );
        PipelineSpec::from_yaml(&raised)
            .unwrap()
            .lowered_from(&v1)
            .unwrap();
    }
}
