//! The citizen golden record end to end: five agencies' feeds on a real
//! Kafka-protocol broker (tansu), the example pipeline of `examples/`,
//! re-keying through the repartition topic, golden records, conflicts,
//! unmerge, the joins of the four pillars (residents, vehicle owners,
//! business representatives), invalid national IDs, and pipelines applied,
//! updated and dropped on a running node.

#![allow(clippy::unwrap_used)]

use ndc_node::client::From;
use ndc_node::quickstart::synthetic::{
    Feed, Table, business_row, citizen_row, insurance_card_row, national_id, vehicle_row,
};
use ndc_testkit::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

const DLQ: &str = "ndc.dead-letter";
const T: Duration = Duration::from_secs(30);
const PEOPLE: u64 = 14;
/// Businesses, represented by persons 1, 4, 7 and 10.
const BUSINESSES: u64 = 4;
const TABLES: [Table; 5] = [
    Table::Citizens,
    Table::Addresses,
    Table::InsuranceCards,
    Table::Vehicles,
    Table::Businesses,
];

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/national.yaml")
}

async fn broker_with_feeds() -> Broker {
    let broker = Broker::start();
    for t in TABLES {
        broker.create_topic(t.topic(), 2).await;
    }
    broker.create_topic(DLQ, 1).await;
    broker
}

/// Publishes the five agencies' snapshots of `PEOPLE` people; returns
/// their feeds, for the changes that follow.
async fn publish_snapshots(producer: &rdkafka::producer::FutureProducer) -> Vec<Feed> {
    let mut feeds: Vec<Feed> = TABLES
        .iter()
        .map(|t| Feed::new(*t, 1_767_225_600_000))
        .collect();
    for i in 0..PEOPLE {
        for (t, feed) in TABLES.iter().zip(feeds.iter_mut()) {
            if *t != Table::Businesses || i < BUSINESSES {
                publish_event(producer, t.topic(), &feed.event('r', i, 0, None)).await;
            }
        }
    }
    feeds
}

/// The rows of a view as a subscriber folding its snapshot sees them, keyed
/// by the key JSON.
async fn rows(addr: std::net::SocketAddr, view: &str) -> BTreeMap<String, Value> {
    let lines = collect(addr, view, From::Snapshot, T, |l| {
        l.iter().any(|x| x.get("snapshot_complete").is_some())
    })
    .await;
    fold(&lines)
}

fn by_person(rows: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    rows.values()
        .map(|v| (v["national_id"].as_str().unwrap().to_string(), v.clone()))
        .collect()
}

/// Waits until `check` holds for the folded snapshot of `view`.
async fn until(
    addr: std::net::SocketAddr,
    view: &str,
    what: &str,
    mut check: impl FnMut(&BTreeMap<String, Value>) -> bool,
) -> BTreeMap<String, Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = rows(addr, view).await;
        if check(&r) {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what} in {view}: {r:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A population row with a given national ID and birth date (for invalid IDs).
fn bad_citizen(id: &str, birth_date: &str, gender: &str) -> (Vec<u8>, Vec<u8>) {
    let key = json!({"person_id": id}).to_string().into_bytes();
    let value = json!({
        "before": null,
        "after": {"person_id": id, "full_name": "Lê Văn Sai", "gender": gender, "birth_date": birth_date},
        "source": {"connector": "postgresql", "db": "population", "schema": "public", "table": "citizens",
                   "ts_ms": 1_767_225_600_000i64, "lsn": 1, "snapshot": "false"},
        "op": "c", "ts_ms": 1_767_225_600_003i64,
    })
    .to_string()
    .into_bytes();
    (key, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_records_conflicts_and_the_four_pillars_from_five_agencies() {
    let broker = broker_with_feeds().await;
    let producer = broker.producer();
    let mut feeds = publish_snapshots(&producer).await;
    // Invalid national IDs: unknown province 003; a woman born in 1989
    // whose century/gender digit says a man; a birth year that disagrees.
    for (id, date, gender) in [
        ("003089123456", "1989-04-30", "male"),
        ("001089123456", "1989-04-30", "female"),
        ("001089123457", "1990-04-30", "male"),
    ] {
        let (k, v) = bad_citizen(id, date, gender);
        publish(&producer, Table::Citizens.topic(), Some(&k), Some(&v)).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let mut config = node_config(dir.path(), &broker.bootstrap, &[]);
    config.pipelines.files = vec![example()];
    let node = ndc_node::start(config).await.unwrap();
    let addr = node.addrs.grpc;

    // Every person has a golden record with facts from three agencies.
    let golden = until(addr, "national.people", "all people merged", |r| {
        r.len() == PEOPLE as usize
            && r.values()
                .all(|g| g["_contributors"].as_array().map(Vec::len) == Some(3))
    })
    .await;
    let golden = by_person(&golden);
    for i in 0..PEOPLE {
        let id = national_id(i).to_string();
        let g = &golden[&id];
        let citizen = citizen_row(i, 0);
        let card = insurance_card_row(i, 0);
        assert_eq!(
            g["full_name"], citizen["full_name"],
            "population has priority"
        );
        assert_eq!(g["_provenance"]["full_name"]["source"], "population");
        assert_eq!(g["birth_date"], citizen["birth_date"]);
        assert_eq!(g["gender"], citizen["gender"]);
        assert_eq!(g["address_id"], json!(i + 1));
        assert_eq!(g["health_card_no"], card["card_no"]);
        assert_eq!(g["_provenance"]["address_id"]["source"], "residence");
        assert!(
            g["_provenance"]["full_name"]["lsn"].is_u64(),
            "provenance carries the LSN"
        );
    }

    // Conflicts: names spelled without diacritics (i % 7 == 3) and birth
    // dates a year off (i % 13 == 5) in the health-insurance records.
    let expected: BTreeSet<(String, String)> = (0..PEOPLE)
        .flat_map(|i| {
            let id = national_id(i).to_string();
            let mut c = Vec::new();
            if i % 7 == 3 {
                c.push((id.clone(), "full_name".to_string()));
            }
            if i % 13 == 5 {
                c.push((id, "birth_date".to_string()));
            }
            c
        })
        .collect();
    let conflicts = until(addr, "national.people.conflicts", "conflicts", |r| {
        r.len() == expected.len()
    })
    .await;
    // A person's report: the golden record with its provenance, the
    // three agencies' rows it was merged from, the open conflict, and who
    // received data about the person (the reads above, as `anonymous`).
    let id = national_id(3).to_string();
    let report: Value = serde_json::from_str(
        &ndc_node::serving::audit_api::person_report(&addr.to_string(), None, &id)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(report["golden_records"][0]["view"], "national.people");
    assert_eq!(
        report["golden_records"][0]["row"]["national_id"],
        id.as_str()
    );
    assert_eq!(
        report["golden_records"][0]["row"]["_provenance"]["full_name"]["source"],
        "population"
    );
    let sources: BTreeSet<&str> = report["source_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["view"].as_str().unwrap())
        .collect();
    assert_eq!(
        sources,
        BTreeSet::from([
            "national.health",
            "national.population",
            "national.residence"
        ]),
        "{report:#}"
    );
    assert!(
        report["source_rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["row"] == citizen_row(3, 0)),
        "{report:#}"
    );
    assert_eq!(
        report["conflicts"][0]["row"]["attribute"], "full_name",
        "{report:#}"
    );
    assert!(
        report["received_by"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["view"] == "national.people"),
        "{report:#}"
    );
    assert!(
        report["views_not_searched"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "national.vehicle_owners"),
        "{report:#}"
    );

    let found: BTreeSet<(String, String)> = conflicts
        .values()
        .map(|c| {
            (
                c["national_id"].as_str().unwrap().to_string(),
                c["attribute"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(found, expected);
    assert!(
        conflicts
            .values()
            .all(|c| c["values"].as_array().map(Vec::len) == Some(2)),
        "each conflict lists both sources' values: {conflicts:#?}"
    );

    // Vehicles joined with their owner's golden record.
    let joined = until(addr, "national.vehicle_owners", "vehicles joined", |r| {
        r.len() == PEOPLE as usize
    })
    .await;
    for row in joined.values() {
        let plate = &row["row"]["plate"];
        let i = (0..PEOPLE)
            .find(|i| &vehicle_row(*i, 0)["plate"] == plate)
            .unwrap();
        let owner = i / 2 * 2;
        assert_eq!(row["national_id"], json!(national_id(owner).to_string()));
        assert_eq!(
            row["person"]["full_name"],
            citizen_row(owner, 0)["full_name"]
        );
        assert!(
            row["person"].get("_provenance").is_none(),
            "only the chosen attributes"
        );
    }

    // Locations: each address with its resident; activities: each
    // business with its legal representative.
    let residents = until(addr, "national.residents", "addresses joined", |r| {
        r.len() == PEOPLE as usize
    })
    .await;
    for row in residents.values() {
        let i = row["row"]["address_id"].as_u64().unwrap() - 1;
        assert_eq!(row["national_id"], json!(national_id(i).to_string()));
        assert_eq!(row["person"]["full_name"], citizen_row(i, 0)["full_name"]);
        assert_eq!(row["person"]["gender"], citizen_row(i, 0)["gender"]);
    }
    let representatives = until(
        addr,
        "national.business_representatives",
        "businesses joined",
        |r| r.len() == BUSINESSES as usize,
    )
    .await;
    for i in 0..BUSINESSES {
        let code = business_row(i, 0)["business_code"].clone();
        let row = representatives
            .values()
            .find(|r| r["row"]["business_code"] == code)
            .unwrap();
        assert_eq!(
            row["national_id"],
            json!(national_id(3 * i + 1).to_string())
        );
        assert_eq!(
            row["person"]["full_name"],
            citizen_row(3 * i + 1, 0)["full_name"]
        );
    }

    // Either side changes → the result follows. The owner's phone changes;
    // the health card of person 3 is cancelled (unmerge: its name conflict
    // goes, the other sources stay); vehicle 0 is sold to person 1.
    let citizens = Table::Citizens.topic();
    publish_event(&producer, citizens, &feeds[0].event('u', 0, 1, None)).await;
    let cards = Table::InsuranceCards.topic();
    publish_event(&producer, cards, &feeds[2].event('d', 3, 0, None)).await;
    publish_event(&producer, cards, &feeds[2].tombstone(3)).await;
    let vehicles = Table::Vehicles.topic();
    publish_event(&producer, vehicles, &feeds[3].event('u', 0, 1, None)).await;
    publish_event(&producer, vehicles, &feeds[3].event('u', 0, 2, None)).await;

    let new_phone = citizen_row(0, 1)["phone"].clone();
    let id0 = national_id(0).to_string();
    let id1 = national_id(1).to_string();
    let id3 = national_id(3).to_string();
    let golden = until(addr, "national.people", "updates merged", |r| {
        let g = by_person(r);
        g[&id0]["phone"] == new_phone
            && g[&id3]["_contributors"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    let g3 = &by_person(&golden)[&id3];
    assert!(
        g3.get("health_card_no").is_none(),
        "the cancelled card's facts are gone"
    );
    assert_eq!(g3["full_name"], citizen_row(3, 0)["full_name"]);
    let conflicts = rows(addr, "national.people.conflicts").await;
    assert!(
        !conflicts.values().any(|c| c["national_id"] == json!(id3)),
        "person 3's conflict resolved by the unmerge"
    );
    let plate0 = vehicle_row(0, 0)["plate"].clone();
    let joined = until(addr, "national.vehicle_owners", "vehicle 0 sold", |r| {
        r.values()
            .any(|v| v["row"]["plate"] == plate0 && v["national_id"] == json!(id1))
    })
    .await;
    assert_eq!(
        joined
            .values()
            .filter(|v| v["row"]["plate"] == plate0)
            .count(),
        1,
        "the sold vehicle left its old owner"
    );
    let vehicle1 = joined
        .values()
        .find(|v| v["row"]["plate"] == vehicle_row(1, 0)["plate"])
        .unwrap();
    assert_eq!(
        vehicle1["person"]["phone"], new_phone,
        "join follows the golden record"
    );

    // The residence registry truncates its table (Debezium names no rows):
    // every address's facts leave its resident's golden record, and the
    // residents join empties; the other agencies' facts stay.
    let truncate = json!({
        "before": null, "after": null,
        "source": {"connector": "postgresql", "db": "residence", "schema": "public", "table": "addresses",
                   "ts_ms": 1_767_300_000_000i64, "lsn": 99_000_000, "snapshot": "false"},
        "op": "t", "ts_ms": 1_767_300_000_003i64,
    })
    .to_string();
    publish(
        &producer,
        Table::Addresses.topic(),
        None,
        Some(truncate.as_bytes()),
    )
    .await;
    let golden = until(addr, "national.people", "residence retracted", |r| {
        r.values().all(|g| g.get("address_id").is_none())
    })
    .await;
    assert_eq!(
        golden.len(),
        PEOPLE as usize,
        "the other agencies' facts keep everyone"
    );
    assert!(golden.values().all(|g| {
        g["_contributors"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["source"] != "residence")
    }));
    until(addr, "national.residents", "residents emptied", |r| {
        r.is_empty()
    })
    .await;

    // Invalid national IDs went to the dead-letter topic, with the reason,
    // and are counted per source.
    let letters = broker.read_all(DLQ, 3, Duration::from_secs(20));
    assert_eq!(letters.len(), 3, "three invalid IDs dead-lettered");
    for m in &letters {
        assert_eq!(header(m, "ndc-error-kind"), Some("invalid_national_id"));
    }
    let reasons: BTreeSet<String> = letters
        .iter()
        .map(|m| header(m, "ndc-reason").unwrap_or_default().to_string())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("province code 003")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("Female")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("1990")), "{reasons:?}");
    let metrics = metrics_text(node.addrs.http).await;
    for reason in ["unknown_province", "gender_mismatch", "birth_year_mismatch"] {
        let counted = metrics.lines().any(|l| {
            l.starts_with("ndc_national_id_invalid_total{")
                && l.contains(&format!("reason=\"{reason}\""))
                && l.contains("view=\"national.population\"")
                && l.ends_with(" 1")
        });
        assert!(
            counted,
            "{reason} not counted for national.population:\n{metrics}"
        );
    }
    assert!(metrics.contains("ndc_pipeline_facts_forwarded_total{pipeline=\"national\"}"));
    node.shutdown().await;
}

const SMALL: &str = r#"
name: small
version: 1
sources:
  population:
    topic: population.public.citizens
    key: [person_id]
    national_id: {column: person_id, birth_date: birth_date, gender: gender}
    fields: {person_id: confidential, full_name: confidential, phone: secret}
  health:
    topic: health.public.insurance_cards
    key: [card_no]
    national_id: {column: person_id}
operators:
  people:
    merge:
      inputs: [population, health]
      attributes:
        full_name: {rule: priority, sources: [population, health], columns: {health: holder_name}, compare: true}
        phone: {rule: priority, sources: [population, health], columns: {health: mobile}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_are_applied_updated_and_dropped_on_a_running_node() {
    use ndc_node::serving::pipelines_api;
    let broker = broker_with_feeds().await;
    let producer = broker.producer();
    let mut citizens = Feed::new(Table::Citizens, 1_767_225_600_000);
    let mut cards = Feed::new(Table::InsuranceCards, 1_767_225_600_000);
    for i in 0..PEOPLE {
        publish_event(
            &producer,
            Table::Citizens.topic(),
            &citizens.event('r', i, 0, None),
        )
        .await;
        publish_event(
            &producer,
            Table::InsuranceCards.topic(),
            &cards.event('r', i, 0, None),
        )
        .await;
    }
    let dir = tempfile::tempdir().unwrap();
    // A plain replica configured the usual way keeps serving throughout.
    let config = node_config(
        dir.path(),
        &broker.bootstrap,
        &[("plain", Table::Citizens.topic(), &["person_id"])],
    );
    let node = ndc_node::start(config.clone()).await.unwrap();
    let addr = node.addrs.grpc;
    wait_rows(addr, "plain", PEOPLE).await;
    let (seen, follower) = follow(addr.to_string(), "plain");

    // Invalid: the error names the field.
    let e = pipelines_api::apply(
        &addr.to_string(),
        SMALL.replace("rule: priority", "rule: best"),
        false,
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("operators.people.merge.attributes.full_name.rule"),
        "{e}"
    );
    // Dry run: valid, nothing runs.
    let r = pipelines_api::apply(&addr.to_string(), SMALL.into(), true)
        .await
        .unwrap();
    assert_eq!(r.outcome, "valid");
    assert!(
        pipelines_api::list(&addr.to_string())
            .await
            .unwrap()
            .is_empty()
    );

    let r = pipelines_api::apply(&addr.to_string(), SMALL.into(), false)
        .await
        .unwrap();
    assert_eq!(r.outcome, "created");
    assert!(r.views.contains(&"small.people".to_string()));
    let golden = until(addr, "small.people", "merged", |r| {
        r.len() == PEOPLE as usize
            && r.values()
                .all(|g| g["_contributors"].as_array().map(Vec::len) == Some(2))
    })
    .await;
    let id0 = national_id(0).to_string();
    assert_eq!(
        by_person(&golden)[&id0]["phone"],
        citizen_row(0, 0)["phone"]
    );
    let r = pipelines_api::apply(&addr.to_string(), SMALL.into(), false)
        .await
        .unwrap();
    assert_eq!(r.outcome, "unchanged");
    let e = pipelines_api::apply(
        &addr.to_string(),
        SMALL.replace("compare: true", "compare: false"),
        false,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("raise version"), "{e}");

    // A version that lowers a classified column without saying so is
    // refused, naming the entry that would say so.
    let e = pipelines_api::apply(
        &addr.to_string(),
        SMALL
            .replace("version: 1", "version: 2")
            .replace("full_name: confidential,", "full_name: internal,"),
        false,
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains(
            "declassify.population.full_name: this version lowers full_name of small.population from confidential to internal"
        ),
        "{e}"
    );

    // Version 2 changes a rule: the state is kept (nothing reset, nothing
    // re-read) and every golden record is recomputed under the new rule.
    let contributions_before = rows(addr, "small.people.contributions").await;
    let v2 = SMALL.replace("version: 1", "version: 2").replace(
        "phone: {rule: priority, sources: [population, health]",
        "phone: {rule: priority, sources: [health, population]",
    );
    let r = pipelines_api::apply(&addr.to_string(), v2.clone(), false)
        .await
        .unwrap();
    assert_eq!((r.outcome.as_str(), r.reset.len()), ("updated", 0));
    let golden = until(addr, "small.people", "recomputed", |r| {
        by_person(r)
            .get(&id0)
            .is_some_and(|g| g["phone"] == insurance_card_row(0, 0)["mobile"])
    })
    .await;
    assert_eq!(
        by_person(&golden)[&id0]["_provenance"]["phone"]["source"],
        "health"
    );
    assert_eq!(
        rows(addr, "small.people.contributions").await,
        contributions_before
    );

    // Version 3 re-keys health by another column: health and the merge are
    // reset and rebuilt from the feeds.
    let v3 = v2
        .replace("version: 2", "version: 3")
        .replace(
            "    national_id: {column: person_id}\n",
            "    key: [card_no, person_id]\n    national_id: {column: person_id}\n",
        )
        .replace("    key: [card_no]\n    key:", "    key:");
    let r = pipelines_api::apply(&addr.to_string(), v3, false)
        .await
        .unwrap();
    assert_eq!(r.reset, ["health", "people"], "{r:?}");
    until(addr, "small.people", "rebuilt", |r| {
        r.len() == PEOPLE as usize
            && r.values()
                .all(|g| g["_contributors"].as_array().map(Vec::len) == Some(2))
    })
    .await;

    // Every change of the pipeline is in the audit trail, with who made it.
    let kafka = config.kafka.clone().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut applied = Vec::new();
        ndc_node::serving::audit::read_topic(&kafka, "ndc.audit", |_, bytes| {
            let r: Value = serde_json::from_slice(bytes).unwrap();
            if r["event"]["kind"] == "pipeline_apply" {
                assert_eq!(r["event"]["by"], "anonymous", "{r}");
                applied.push(r["event"]["version"].as_u64().unwrap());
            }
        })
        .await
        .unwrap();
        if applied == [1, 2, 3] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{applied:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A restart runs what was applied.
    node.shutdown().await;
    let (stop_seen, _) = (seen.lock().unwrap().len(), ());
    follower.abort();
    let node = ndc_node::start(config.clone()).await.unwrap();
    let addr = node.addrs.grpc;
    let listed = pipelines_api::list(&addr.to_string()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].name.as_str(), listed[0].version), ("small", 3));
    assert!(
        listed[0]
            .repartition_topic
            .starts_with("ndc.repartition.small.")
    );

    // Drop: the views and their state go; the plain view keeps serving.
    let (seen, follower) = follow(addr.to_string(), "plain");
    let dropped = pipelines_api::drop_pipeline(&addr.to_string(), "small")
        .await
        .unwrap();
    assert!(dropped.contains(&"small.people".to_string()));
    assert!(
        pipelines_api::list(&addr.to_string())
            .await
            .unwrap()
            .is_empty()
    );
    let e = collect(
        addr,
        "small.people",
        From::Snapshot,
        Duration::from_secs(2),
        |_| false,
    )
    .await;
    assert!(e.is_empty(), "dropped view no longer served: {e:?}");
    publish_event(
        &producer,
        Table::Citizens.topic(),
        &citizens.event('u', 5, 1, None),
    )
    .await;
    eventually("the plain view follows after the drop", T, || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|l| l["op"] == "update" && l["after"]["revision"] == 1)
    })
    .await;
    assert!(stop_seen > 0);
    follower.abort();
    node.shutdown().await;
}

/// A pipeline split into shards gives the same views as the same pipeline
/// in one: two nodes read the same five feeds, one runs the example spec,
/// the other the spec with `shards: 3` (sources split by partition, the
/// merge and its joins by national ID); their golden records, conflicts
/// and vehicle owners are equal row for row, and the sharded node serves
/// each from three shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_in_shards_gives_the_same_views_as_in_one() {
    let broker = broker_with_feeds().await;
    let producer = broker.producer();
    let mut feeds = publish_snapshots(&producer).await;
    // Then some people move and change phone.
    for i in (0..PEOPLE).step_by(3) {
        publish_event(
            &producer,
            Table::Citizens.topic(),
            &feeds[0].event('u', i, 1, None),
        )
        .await;
        publish_event(
            &producer,
            Table::Addresses.topic(),
            &feeds[1].event('u', i, 1, None),
        )
        .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(example()).unwrap();
    let sharded_spec = dir.path().join("sharded.yaml");
    std::fs::write(
        &sharded_spec,
        text.replacen("version: 1\n", "version: 1\nshards: 3\n", 1),
    )
    .unwrap();
    let mut nodes = Vec::new();
    for (name, spec) in [("one", example()), ("sharded", sharded_spec)] {
        let data = dir.path().join(name);
        let mut config = node_config(&data, &broker.bootstrap, &[]);
        config.pipelines.files = vec![spec];
        config.pipelines.repartition_topic_prefix = format!("ndc.repartition.{name}.");
        if let Some(k) = config.kafka.as_mut() {
            k.group_id = format!("ndc-{name}");
        }
        nodes.push(ndc_node::start(config).await.unwrap());
    }
    let (one, sharded) = (nodes[0].addrs.grpc, nodes[1].addrs.grpc);
    let merged = |r: &BTreeMap<String, Value>| {
        r.len() == PEOPLE as usize
            && r.values()
                .all(|g| g["_contributors"].as_array().map(Vec::len) == Some(3))
            && (0..PEOPLE).step_by(3).all(|i| {
                r.values().any(|g| {
                    g["national_id"] == json!(national_id(i).to_string())
                        && g["phone"] == citizen_row(i, 1)["phone"]
                })
            })
    };
    let reference = until(one, "national.people", "all people merged", merged).await;
    let split = until(sharded, "national.people", "all people merged", merged).await;
    assert_eq!(by_person(&split), by_person(&reference));
    for view in [
        "national.people.conflicts",
        "national.vehicle_owners",
        "national.residents",
    ] {
        let reference = rows(one, view).await;
        let split = until(sharded, view, "the same rows", |r| {
            r.len() == reference.len()
        })
        .await;
        assert!(!reference.is_empty(), "{view} has rows");
        assert_eq!(split, reference, "{view}");
    }
    // A keyed read goes to the person's shard and finds the same row.
    let person = national_id(4).to_string();
    let opts = ndc_node::client::SubscribeOptions {
        keys: vec![json!({ "national_id": person }).to_string()],
        progress: true,
        ..subscription(sharded, "national.people", From::Snapshot)
    };
    let lines = read_until(opts, T, |l| {
        l.iter().any(|x| x.get("snapshot_complete").is_some())
    })
    .await;
    let keyed = by_person(&fold(&lines));
    assert_eq!(keyed.len(), 1, "{lines:?}");
    assert_eq!(keyed[&person], by_person(&reference)[&person]);
    // Resumed with its token (the shards it does not read stand at 0 in
    // it), it gets the person's next change.
    let token = lines
        .iter()
        .find(|x| x.get("snapshot_complete").is_some())
        .and_then(|x| x["resume_token"].as_str())
        .unwrap()
        .to_string();
    publish_event(
        &producer,
        Table::Citizens.topic(),
        &feeds[0].event('u', 4, 2, None),
    )
    .await;
    let opts = ndc_node::client::SubscribeOptions {
        keys: vec![json!({ "national_id": person }).to_string()],
        ..subscription(sharded, "national.people", From::Token(token))
    };
    let phone = citizen_row(4, 2)["phone"].clone();
    let resumed = read_until(opts, T, |l| {
        changes(l).iter().any(|c| c["after"]["phone"] == phone)
    })
    .await;
    let seen = changes(&resumed);
    assert!(
        seen.iter().any(|c| c["after"]["phone"] == phone),
        "{resumed:?}"
    );
    assert!(
        seen.iter()
            .all(|c| c["after"]["national_id"] == json!(person)),
        "only the person's changes: {resumed:?}"
    );
    let mut c = ndc_proto::v1::subscription_client::SubscriptionClient::new(
        ndc_node::client::channel(&sharded.to_string(), None)
            .await
            .unwrap(),
    );
    let views = c
        .list_views(ndc_proto::v1::ListViewsRequest {})
        .await
        .unwrap()
        .into_inner()
        .views;
    let people = views.iter().find(|v| v.name == "national.people").unwrap();
    assert_eq!(people.committed_seqs.len(), 3, "{people:?}");
    assert!(
        people.committed_seqs.iter().all(|s| *s > 0),
        "every shard holds people: {people:?}"
    );
    for node in nodes {
        node.shutdown().await;
    }
}
