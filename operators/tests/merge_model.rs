//! The merge operator against a reference model, on a real RocksDB store.
//!
//! Three agencies' tables (population, health insurance, residence) change
//! over time: rows appear, change, move to another person and disappear.
//! Each source's changes become facts as the node's re-keying stage makes
//! them, and the facts reach the merge task in any interleaving of the
//! sources (each source in its own order), with replays of earlier facts (a
//! re-keying stage restarted from an older position), in batches of any size,
//! and with crashes that lose the open batch. Whatever happens, the golden
//! records and conflicts must equal the reference computed from each source
//! row's final state, and each view's change stream, folded from the start,
//! must give the view.

use ndc_operators::merge::{
    AttributeRule, Fact, JoinRule, MergeRules, MergeViews, Merger, Rule, facts_of_change,
};
use ndc_operators::{Pending, Position, PreparedWrite, Store, StoreConfig};
use ndc_proto::v1::{Op, SourcePosition};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// Merged sources, then a source only joined (vehicles). Residence is both
/// merged and joined (a location with its resident).
const SOURCES: [&str; 4] = ["population", "health", "residence", "vehicles"];
const MERGED: usize = 3;
const PEOPLE: [&str; 3] = ["001089000001", "079195000002", "048200000003"];
const NAMES: [&str; 3] = ["Nguyễn Văn An", "nguyễn  văn an", "Trần Thị Bình"];

/// One change of one source row.
#[derive(Debug, Clone)]
enum Step {
    Upsert {
        key: u8,
        person: usize,
        name: Option<usize>,
        birth: Option<u8>,
        phone: Option<u8>,
    },
    Delete {
        key: u8,
    },
    /// The same row again with a newer version (an UPDATE that changed
    /// nothing, as an agency's batch job may write).
    Touch {
        key: u8,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (0u8..3, 0..PEOPLE.len(), proptest::option::of(0..NAMES.len()),
              proptest::option::of(0u8..2), proptest::option::of(0u8..3))
            .prop_map(|(key, person, name, birth, phone)| Step::Upsert { key, person, name, birth, phone }),
        1 => (0u8..3).prop_map(|key| Step::Delete { key }),
        1 => (0u8..3).prop_map(|key| Step::Touch { key }),
    ]
}

/// A source's history: its steps and how far its commit clock advances
/// before each (0 makes ties with other sources likely).
fn history() -> impl Strategy<Value = Vec<(Step, u8)>> {
    proptest::collection::vec((step(), 0u8..3), 0..14)
}

fn rules() -> MergeRules {
    let rule = |rule, sources: &[&str], compare| AttributeRule {
        rule,
        sources: sources.iter().map(|s| s.to_string()).collect(),
        columns: BTreeMap::new(),
        compare,
    };
    let mut attributes = BTreeMap::new();
    attributes.insert(
        "full_name".into(),
        rule(Rule::Priority, &["population", "health"], true),
    );
    let mut birth = rule(Rule::FirstNonNull, &["population", "health"], true);
    birth.columns.insert("health".into(), "dob".into());
    attributes.insert("birth_date".into(), birth);
    attributes.insert("phone".into(), rule(Rule::MostRecent, &[], false));
    attributes.insert(
        "address_id".into(),
        rule(Rule::MostRecent, &["residence"], false),
    );
    MergeRules {
        inputs: SOURCES[..MERGED].iter().map(|s| s.to_string()).collect(),
        attributes,
    }
}

/// The row a source stores for a step: each source has its own columns.
fn row_of(source: &str, step: &Step) -> Option<Map<String, Value>> {
    let Step::Upsert {
        key,
        person,
        name,
        birth,
        phone,
    } = step
    else {
        return None;
    };
    let mut row = Map::new();
    row.insert("person_id".into(), json!(PEOPLE[*person]));
    let name = name.map(|n| NAMES[n]);
    let birth = birth.map(|b| format!("19{}-01-0{}", 89 + b, b + 1));
    match source {
        "population" => {
            row.insert("full_name".into(), json!(name));
            row.insert("birth_date".into(), json!(birth));
            row.insert("phone".into(), json!(phone));
        }
        "health" => {
            row.insert("card_no".into(), json!(format!("HC{key}")));
            row.insert("full_name".into(), json!(name));
            row.insert("dob".into(), json!(birth));
            row.insert("phone".into(), json!(phone));
        }
        "residence" => {
            row.insert("address_id".into(), json!(phone.map(|p| format!("A{p}"))));
        }
        _ => {
            row.insert("plate".into(), json!(format!("P{key}")));
            row.insert("color".into(), json!(phone));
        }
    }
    Some(row)
}

/// A source row's final state, with the version of its last change.
#[derive(Debug, Clone)]
struct Final {
    row: Option<Map<String, Value>>,
    ts_ms: i64,
    lsn: Option<u64>,
}

/// Runs each source's history through a replica of the source (to know each
/// change's `before`) and the re-keying of the node. Returns the facts in
/// source order and each row's final state.
fn facts_of(source: &str, history: &[(Step, u8)]) -> (Vec<Fact>, BTreeMap<String, Final>) {
    let mut replica: BTreeMap<String, Final> = BTreeMap::new();
    let mut facts = Vec::new();
    let mut clock = 1_000i64;
    // Population carries LSNs (PostgreSQL); the others do not.
    let with_lsn = source == "population";
    for (offset, (step, tick)) in history.iter().enumerate() {
        clock += i64::from(*tick);
        let key = match step {
            Step::Upsert { key, .. } | Step::Delete { key } | Step::Touch { key } => *key,
        };
        let key_json = format!("{{\"id\":{key}}}");
        let before = replica.get(&key_json).and_then(|f| f.row.clone());
        let after = match step {
            Step::Touch { .. } if before.is_none() => continue,
            Step::Touch { .. } => before.clone(),
            _ => row_of(source, step),
        };
        let lsn = with_lsn.then_some(offset as u64 + 1);
        let origin = SourcePosition {
            ts_ms: clock,
            lsn,
            stream: format!("kafka:{source}:0"),
            offset: offset as u64,
            ..SourcePosition::default()
        };
        let text = |r: &Option<Map<String, Value>>| {
            r.as_ref().map(|m| Value::Object(m.clone()).to_string())
        };
        facts.extend(facts_of_change(
            source,
            "person_id",
            &key_json,
            text(&before).as_deref(),
            text(&after).as_deref(),
            &origin,
        ));
        replica.insert(
            key_json,
            Final {
                row: after,
                ts_ms: clock,
                lsn,
            },
        );
    }
    (facts, replica)
}

/// A live source row about a person: source, key, row, commit time, LSN.
type SourceRow = (String, String, Map<String, Value>, i64, Option<u64>);
/// A row that has the attribute: source rank, the row, the value.
type Candidate<'a> = (usize, &'a SourceRow, Value);

/// The reference: each person's golden record and conflicts, written
/// directly from the rules' definitions.
fn reference(
    finals: &BTreeMap<&str, BTreeMap<String, Final>>,
) -> (BTreeMap<String, Value>, BTreeMap<(String, String), Value>) {
    let rules = rules();
    let mut golden = BTreeMap::new();
    let mut conflicts = BTreeMap::new();
    for person in PEOPLE {
        // (source, key, row, ts, lsn) of every live row about this person.
        let mut rows = Vec::new();
        for (source, replica) in finals
            .iter()
            .filter(|(s, _)| rules.inputs.iter().any(|i| i == *s))
        {
            for (key, f) in replica {
                if let Some(row) = &f.row
                    && row.get("person_id") == Some(&json!(person))
                {
                    rows.push((source.to_string(), key.clone(), row.clone(), f.ts_ms, f.lsn));
                }
            }
        }
        if rows.is_empty() {
            continue;
        }
        let mut record = Map::new();
        let mut provenance = Map::new();
        record.insert("national_id".into(), json!(person));
        for (attribute, rule) in &rules.attributes {
            let sources = if rule.sources.is_empty() {
                &rules.inputs
            } else {
                &rule.sources
            };
            // Every (rank, row, value) that has the attribute.
            let mut have = Vec::new();
            for (rank, source) in sources.iter().enumerate() {
                let column = rule.columns.get(source).unwrap_or(attribute);
                for r in rows.iter().filter(|r| &r.0 == source) {
                    if let Some(v) = r.2.get(column) {
                        have.push((rank, r, v.clone()));
                    }
                }
            }
            // Newer first within a rank; then key.
            let newer_first = |a: &Candidate<'_>, b: &Candidate<'_>| {
                b.1.3
                    .cmp(&a.1.3)
                    .then(b.1.4.cmp(&a.1.4))
                    .then(a.1.1.cmp(&b.1.1))
            };
            let chosen = match rule.rule {
                Rule::Priority => {
                    let best = have.iter().map(|h| h.0).min();
                    let mut top: Vec<_> = have.iter().filter(|h| Some(h.0) == best).collect();
                    top.sort_by(|a, b| newer_first(a, b));
                    top.first().map(|h| (*h).clone())
                }
                Rule::FirstNonNull => {
                    let non_null: Vec<_> = have.iter().filter(|h| !h.2.is_null()).collect();
                    let best = non_null.iter().map(|h| h.0).min();
                    let mut top: Vec<_> =
                        non_null.into_iter().filter(|h| Some(h.0) == best).collect();
                    top.sort_by(|a, b| newer_first(a, b));
                    top.first().map(|h| (*h).clone())
                }
                Rule::MostRecent => {
                    let mut non_null: Vec<_> = have.iter().filter(|h| !h.2.is_null()).collect();
                    non_null.sort_by(|a, b| {
                        b.1.3
                            .cmp(&a.1.3)
                            .then(b.1.4.cmp(&a.1.4))
                            .then(a.0.cmp(&b.0))
                            .then(a.1.1.cmp(&b.1.1))
                    });
                    non_null.first().map(|h| (*h).clone())
                }
            };
            if let Some((_, r, v)) = &chosen {
                record.insert(attribute.clone(), v.clone());
                provenance.insert(
                    attribute.clone(),
                    json!({"source": r.0, "source_key": r.1, "ts_ms": r.3, "lsn": r.4}),
                );
            }
            if rule.compare {
                let norm = |v: &Value| match v {
                    Value::String(s) => s
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                        .to_lowercase(),
                    other => other.to_string(),
                };
                let mut distinct: Vec<String> = have
                    .iter()
                    .filter(|h| !h.2.is_null())
                    .map(|h| norm(&h.2))
                    .collect();
                distinct.sort();
                distinct.dedup();
                if distinct.len() > 1 {
                    let mut ordered: Vec<_> = have.iter().filter(|h| !h.2.is_null()).collect();
                    ordered.sort_by(|a, b| a.0.cmp(&b.0).then(newer_first(a, b)));
                    let values: Vec<Value> = ordered
                        .iter()
                        .map(|h| json!({"source": h.1.0, "source_key": h.1.1, "value": h.2, "ts_ms": h.1.3}))
                        .collect();
                    conflicts.insert(
                        (person.to_string(), attribute.clone()),
                        json!({"national_id": person, "attribute": attribute,
                               "chosen": chosen.as_ref().map(|c| c.2.clone()), "values": values}),
                    );
                }
            }
        }
        let mut contributors: Vec<(String, String)> =
            rows.iter().map(|r| (r.0.clone(), r.1.clone())).collect();
        contributors.sort();
        record.insert("_provenance".into(), Value::Object(provenance));
        record.insert(
            "_contributors".into(),
            contributors
                .into_iter()
                .map(|(s, k)| json!({"source": s, "source_key": k}))
                .collect(),
        );
        golden.insert(person.to_string(), Value::Object(record));
    }
    (golden, conflicts)
}

/// A view's rows (parsed), and the same view rebuilt by folding its change
/// stream, which must agree.
fn view_rows(store: &Store, name: &str) -> BTreeMap<String, Value> {
    let reader = store.reader();
    let mut rows = BTreeMap::new();
    reader
        .scan_snapshot(name, None, 5, |batch| {
            for r in batch {
                rows.insert(r.key, serde_json::from_str(&r.row_json).expect("json row"));
            }
            true
        })
        .expect("snapshot");
    let mut folded = BTreeMap::new();
    let changes = reader.changes_after(name, 0, usize::MAX).expect("changes");
    for (i, c) in changes.iter().enumerate() {
        assert_eq!(c.seq, i as u64 + 1, "{name}: gapless change stream");
        match Op::try_from(c.op).expect("op") {
            Op::Delete => {
                let gone = folded.remove(&c.key_json);
                assert_eq!(
                    gone.as_deref(),
                    c.before_json.as_deref(),
                    "{name}: delete's before"
                );
            }
            _ => {
                let before =
                    folded.insert(c.key_json.clone(), c.after_json.clone().expect("after"));
                assert_eq!(
                    before.as_deref(),
                    c.before_json.as_deref(),
                    "{name}: before of {}",
                    c.key_json
                );
            }
        }
    }
    let folded: BTreeMap<String, Value> = folded
        .into_iter()
        .map(|(k, v)| (k, serde_json::from_str(&v).expect("json")))
        .collect();
    assert_eq!(
        folded, rows,
        "{name}: folded change stream differs from the view"
    );
    rows
}

/// How the facts reach the merge task.
#[derive(Debug, Clone)]
struct Delivery {
    /// Which source's next fact comes next (indices wrap).
    picks: Vec<u8>,
    /// After delivering this many facts, a source is replayed from an
    /// earlier fact (re-keying restarted from an older position).
    replays: Vec<(u8, u8, u8)>,
    /// Commit after each of these counts.
    batch: usize,
    /// Crash (lose the open batch) when the delivered count hits these.
    crashes: Vec<u8>,
    /// Write each batch while the next is applied, as the node does.
    pipelined: bool,
    /// Cluster path instead: decide over logged-but-unapplied effects and
    /// write them to a change log that the owner (lagging) and another node
    /// apply; `pipelined` is then ignored.
    logged: bool,
}

fn delivery() -> impl Strategy<Value = Delivery> {
    (
        proptest::collection::vec(0u8..4, 0..100),
        proptest::collection::vec((0u8..70, 0u8..4, 0u8..20), 0..4),
        1usize..7,
        proptest::collection::vec(0u8..70, 0..3),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(picks, replays, batch, crashes, pipelined, logged)| Delivery {
                picks,
                replays,
                batch,
                crashes,
                pipelined,
                logged,
            },
        )
}

/// The repartition topic as the merge task reads it: the facts in the
/// generated interleaving, with replays.
fn topic(per_source: &[Vec<Fact>], d: &Delivery) -> Vec<Fact> {
    let mut next = vec![0usize; per_source.len()];
    let mut out = Vec::new();
    let mut picks = d.picks.iter().copied().chain(std::iter::repeat(0u8));
    loop {
        if next.iter().zip(per_source).all(|(n, f)| *n >= f.len()) {
            break;
        }
        for (at, source, back) in &d.replays {
            if out.len() == usize::from(*at) {
                let s = usize::from(*source);
                next[s] = next[s].saturating_sub(usize::from(*back));
            }
        }
        // The next source with facts left, from the pick onwards.
        let pick = usize::from(picks.next().unwrap_or(0));
        let Some(s) = (0..per_source.len())
            .map(|i| (pick + i) % per_source.len())
            .find(|s| next[*s] < per_source[*s].len())
        else {
            break;
        };
        out.push(per_source[s][next[s]].clone());
        next[s] += 1;
    }
    out
}

const VIEWS: [&str; 5] = [
    "people.contributions",
    "people.golden",
    "people.conflicts",
    "people.residents",
    "people.owners",
];

/// The joins: (stream, attributes copied, view index).
const JOINS: [(&str, &[&str], usize); 2] = [("residence", &["full_name"], 3), ("vehicles", &[], 4)];

fn open(dir: &std::path::Path) -> (Store, Merger) {
    let names: Vec<String> = VIEWS.iter().map(|s| s.to_string()).collect();
    let mut store = Store::open(&StoreConfig::new(dir), &names).expect("open");
    // As the node does: contributions are read by person (key prefix).
    let contributions = store.view_id(VIEWS[0]).expect("view");
    store.set_prefix_scanned(contributions);
    let id = |n: &str| store.view_id(n).expect("view");
    let merger = Merger {
        rules: rules(),
        views: MergeViews {
            contributions: id(VIEWS[0]),
            golden: id(VIEWS[1]),
            conflicts: id(VIEWS[2]),
        },
        joins: JOINS
            .iter()
            .map(|(stream, attributes, view)| JoinRule {
                stream: stream.to_string(),
                attributes: attributes.iter().map(|a| a.to_string()).collect(),
                view: id(VIEWS[*view]),
            })
            .collect(),
    };
    (store, merger)
}

/// The reference rows of a join: each live stream row with its person's
/// reference golden record (the chosen attributes), or null.
fn reference_join(
    finals: &BTreeMap<&str, BTreeMap<String, Final>>,
    golden: &BTreeMap<String, Value>,
    stream: &str,
    attributes: &[&str],
) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for (key, f) in &finals[stream] {
        let Some(row) = &f.row else { continue };
        let id = row["person_id"].as_str().expect("id").to_string();
        let person = golden.get(&id).map(|g| {
            let kept: Map<String, Value> = g
                .as_object()
                .expect("object")
                .iter()
                .filter(|(k, _)| {
                    *k == "national_id"
                        || (!k.starts_with('_')
                            && (attributes.is_empty() || attributes.contains(&k.as_str())))
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Value::Object(kept)
        });
        out.insert(
            (id.clone(), key.clone()),
            json!({"national_id": id, "source_key": key, "row": row, "person": person}),
        );
    }
    out
}

fn run(histories: &[Vec<(Step, u8)>; 4], d: &Delivery) -> Result<(), TestCaseError> {
    let mut per_source = Vec::new();
    let mut finals = BTreeMap::new();
    for (source, history) in SOURCES.iter().zip(histories) {
        let (facts, replica) = facts_of(source, history);
        per_source.push(facts);
        finals.insert(*source, replica);
    }
    let topic = topic(&per_source, d);
    let dir = tempfile::tempdir().expect("tempdir");
    let other_dir = tempfile::tempdir().expect("tempdir");
    let store = if d.logged {
        run_logged(&topic, d, dir.path(), other_dir.path())?
    } else {
        run_local(&topic, d, dir.path())
    };
    check(&store, &finals)
}

/// Applies the facts of `topic` from `next` on, each followed by
/// `after_each`, until a batch is full or a crash point is reached (then
/// returns true: the batch is lost).
fn fill_batch(
    merger: &Merger,
    txn: &mut ndc_operators::Txn<'_>,
    topic: &[Fact],
    next: &mut usize,
    crashes: &mut Vec<u8>,
    batch: usize,
    mut after_each: impl FnMut(&mut ndc_operators::Txn<'_>),
) -> bool {
    let stream = "kafka:ndc.repartition.people:0";
    for (i, fact) in topic.iter().enumerate().skip(*next) {
        merger
            .apply(txn, fact, &Position::new(stream, i as u64))
            .expect("apply");
        after_each(txn);
        *next = i + 1;
        if let Some(c) = crashes.iter().position(|c| usize::from(*c) == *next) {
            crashes.remove(c);
            return true;
        }
        if next.is_multiple_of(batch) {
            return false;
        }
    }
    false
}

/// The single node's writer: commits each batch (pipelined or not).
fn run_local(topic: &[Fact], d: &Delivery, dir: &std::path::Path) -> Store {
    let stream = "kafka:ndc.repartition.people:0";
    let (mut store, mut merger) = open(dir);
    let mut crashes = d.crashes.clone();
    // Pipelined as the node's writer: batch N is written after batch N+1
    // was applied over it (through `pending`); a crash loses both.
    let mut pending = Pending::default();
    let mut inflight: Option<(PreparedWrite, u64)> = None;
    let mut batches = 0u64;
    // Next fact to deliver: after the stored offset, or after what was
    // applied in memory when pipelining.
    let mut next = 0usize;
    loop {
        if next >= topic.len() {
            break;
        }
        batches += 1;
        let mut txn = if d.pipelined {
            store.begin_over(0, &pending)
        } else {
            store.begin(0)
        };
        let crashed = fill_batch(
            &merger,
            &mut txn,
            topic,
            &mut next,
            &mut crashes,
            d.batch,
            |_| {},
        );
        if crashed {
            drop(txn);
            inflight = None;
            pending = Pending::default();
            drop(store);
            (store, merger) = open(dir);
            next = store
                .next_offset(merger.views.contributions, stream)
                .unwrap_or(0) as usize;
        } else if d.pipelined {
            let (_, prepared, rows) = txn.prepare_keeping_rows();
            if let Some((write, n)) = inflight.take() {
                write.write().expect("write");
                pending.applied_through_all(n);
            }
            pending.absorb(rows, batches);
            inflight = Some((prepared, batches));
        } else {
            txn.commit().expect("commit");
        }
    }
    if let Some((write, _)) = inflight.take() {
        write.write().expect("write");
    }
    store
}

/// The cluster path: the owner of the repartition partition decides each
/// batch over what it logged but has not applied back, records the effects
/// (contributions, golden records, conflicts and joins: four views in one
/// log record) in the contributions view's change log, and every node
/// applies that log — the owner lagging 0–2 records behind, and losing its
/// pending effects in a crash. Both nodes must end with the reference views
/// and identical change streams, sequence numbers included.
fn run_logged(
    topic: &[Fact],
    d: &Delivery,
    owner_dir: &std::path::Path,
    other_dir: &std::path::Path,
) -> Result<Store, TestCaseError> {
    use ndc_proto::state::LogRecord;
    use std::sync::Arc;
    let stream = "kafka:ndc.repartition.people:0";
    let (mut owner, mut merger) = open(owner_dir);
    let (mut other, _) = open(other_dir);
    let view = merger.views.contributions;
    let log_stream: Arc<str> = "log:ndc.changes.people.contributions:0".into();
    let mut log: Vec<LogRecord> = Vec::new();
    let mut pending = Pending::default();
    let catch_up = |store: &mut Store, log: &[LogRecord], upto: usize| {
        let mut txn = store.begin(0);
        for (offset, record) in log.iter().enumerate().take(upto) {
            txn.replay(view, record, &log_stream, offset as u64)
                .expect("replay");
        }
        txn.commit().expect("commit");
    };
    let mut crashes = d.crashes.clone();
    let mut next = 0usize;
    let mut step = 0usize;
    while next < topic.len() {
        step += 1;
        let mut effects = Vec::new();
        let crashed = {
            let mut txn = owner.begin_logged(0, &pending);
            fill_batch(
                &merger,
                &mut txn,
                topic,
                &mut next,
                &mut crashes,
                d.batch,
                |txn| {
                    effects.extend(txn.take_effects(view));
                },
            )
        };
        if crashed {
            // The batch never reached the log; the owner restarts, applies
            // the whole log and resumes from the offset it stores.
            drop(owner);
            (owner, merger) = open(owner_dir);
            pending = Pending::default();
            catch_up(&mut owner, &log, log.len());
            next = owner.next_offset(view, stream).unwrap_or(0) as usize;
            continue;
        }
        let offset = log.len() as u64;
        pending.record(view, effects.iter().map(|(v, e)| (*v, e)), offset);
        log.push(LogRecord {
            view: VIEWS[0].into(),
            epoch: 1,
            partition: "people.contributions/t/0".into(),
            source_stream: stream.into(),
            source_next_offset: next as u64,
            fence: false,
            effects: effects.into_iter().map(|(_, e)| e).collect(),
        });
        let upto = log.len().saturating_sub(step % 3);
        // Replaying is idempotent: the stored log position skips the rest.
        catch_up(&mut owner, &log, upto);
        if upto > 0 {
            pending.applied_through(view, upto as u64 - 1);
        }
    }
    catch_up(&mut owner, &log, log.len());
    catch_up(&mut other, &log, log.len());
    for name in VIEWS {
        let a = owner
            .reader()
            .changes_after(name, 0, usize::MAX)
            .expect("changes");
        let b = other
            .reader()
            .changes_after(name, 0, usize::MAX)
            .expect("changes");
        prop_assert_eq!(a, b, "nodes disagree on the change stream of {}", name);
    }
    Ok(other)
}

/// The views equal the reference written from the rules' definitions.
fn check(
    store: &Store,
    finals: &BTreeMap<&str, BTreeMap<String, Final>>,
) -> Result<(), TestCaseError> {
    let (golden, conflicts) = reference(finals);
    let stored_golden: BTreeMap<String, Value> = view_rows(store, VIEWS[1])
        .into_values()
        .map(|v| (v["national_id"].as_str().expect("id").to_string(), v))
        .collect();
    prop_assert_eq!(&stored_golden, &golden);
    let stored_conflicts: BTreeMap<(String, String), Value> = view_rows(store, VIEWS[2])
        .into_values()
        .map(|v| {
            (
                (
                    v["national_id"].as_str().expect("id").to_string(),
                    v["attribute"].as_str().expect("attribute").to_string(),
                ),
                v,
            )
        })
        .collect();
    prop_assert_eq!(stored_conflicts, conflicts);
    view_rows(store, VIEWS[0]);
    for (stream, attributes, view) in JOINS {
        let stored: BTreeMap<(String, String), Value> = view_rows(store, VIEWS[view])
            .into_values()
            .map(|v| {
                let k = (
                    v["national_id"].as_str().expect("id").to_string(),
                    v["source_key"].as_str().expect("key").to_string(),
                );
                (k, v)
            })
            .collect();
        prop_assert_eq!(
            stored,
            reference_join(finals, &golden, stream, attributes),
            "join of {}",
            stream
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn golden_records_conflicts_and_joins_match_the_reference(
        population in history(), health in history(), residence in history(),
        vehicles in history(), d in delivery()
    ) {
        run(&[population, health, residence, vehicles], &d)?;
    }
}

/// The unmerge case, spelled out: a health card moved to another person
/// takes its facts with it, and a delete retracts only that source.
#[test]
fn a_moved_or_deleted_source_row_retracts_only_its_contribution() {
    let upsert = |key, person, name| Step::Upsert {
        key,
        person,
        name: Some(name),
        birth: Some(0),
        phone: Some(1),
    };
    let population = vec![(upsert(0, 0, 0), 1)];
    let health = vec![
        (upsert(0, 0, 2), 1), // card 0 says person 0 is "Trần Thị Bình": conflict
        (upsert(0, 1, 2), 1), // card 0 moves to person 1: conflict resolved
        (Step::Delete { key: 0 }, 1), // and is deleted: person 1 disappears
    ];
    let (pop_facts, _) = facts_of("population", &population);
    let (health_facts, _) = facts_of("health", &health);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, merger) = open(dir.path());
    let mut offset = 0;
    let mut apply = |store: &mut Store, facts: &[Fact]| {
        let mut txn = store.begin(0);
        for f in facts {
            merger
                .apply(&mut txn, f, &Position::new("t", offset))
                .expect("apply");
            offset += 1;
        }
        txn.commit().expect("commit");
    };
    apply(&mut store, &pop_facts);
    apply(&mut store, &health_facts[..1]);
    let conflicts = view_rows(&store, VIEWS[2]);
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    let golden = view_rows(&store, VIEWS[1]);
    let record = golden.values().next().expect("one person");
    assert_eq!(
        record["full_name"],
        json!("Nguyễn Văn An"),
        "population has priority"
    );
    assert_eq!(
        record["_provenance"]["full_name"]["source"],
        json!("population")
    );
    assert_eq!(record["_contributors"].as_array().map(Vec::len), Some(2));
    // The move: a retraction for person 0, a contribution for person 1.
    apply(&mut store, &health_facts[1..3]);
    assert!(view_rows(&store, VIEWS[2]).is_empty(), "conflict resolved");
    let golden = view_rows(&store, VIEWS[1]);
    assert_eq!(golden.len(), 2);
    apply(&mut store, &health_facts[3..]);
    let golden = view_rows(&store, VIEWS[1]);
    assert_eq!(golden.len(), 1, "person 1 had only the card: gone");
    let record = golden.values().next().expect("person 0");
    assert_eq!(record["_contributors"].as_array().map(Vec::len), Some(1));
}
