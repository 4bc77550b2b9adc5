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
    pub sources: BTreeMap<String, SourceSpec>,
    #[serde(default)]
    pub operators: BTreeMap<String, OperatorSpec>,
}

fn one() -> u64 {
    1
}

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
    /// Security level of each column (placeholders until subscriptions
    /// filter by clearance).
    #[serde(default)]
    pub fields: BTreeMap<String, Classification>,
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

/// Security level of a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classification {
    Public,
    Internal,
    Confidential,
    Secret,
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

    /// Whether the pipeline needs its repartition topic.
    pub fn repartitions(&self) -> bool {
        self.operators.values().next().is_some()
    }

    /// The operators whose state shape differs between `self` and `next`:
    /// their state is dropped on update. (Attribute rules are not shape:
    /// golden records are recomputed from the kept contributions.)
    pub fn reshaped(&self, next: &PipelineSpec) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
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
}
