//! The audit trail on real parts (issue 20): a subscriber granted three
//! people of a view reads them (snapshot and live); `ndc audit
//! who-accessed` names it, with its purpose, for those people and for no
//! one else; the grant and its revocation are recorded; the chain shipped
//! to Kafka verifies with `ndc audit verify`, and an export altered, cut or
//! reordered, or a record forged into the topic, is caught and named;
//! `ndc person report` gives the person's row and who received it, and is
//! itself recorded.

#![allow(clippy::unwrap_used)]

use ndc_node::client::{ClientTls, From, SubscribeOptions};
use ndc_node::quickstart::synthetic::{Feed, Table, citizen_row};
use ndc_testkit::*;
use rdkafka::producer::FutureRecord;
use serde_json::Value;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

const CITIZENS: &str = "population.public.citizens";
const PEOPLE: u64 = 8;
const T: Duration = Duration::from_secs(30);

struct Cli<'a> {
    ca: &'a Path,
    cert: &'a Path,
    key: &'a Path,
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_ndc"))
            .args(args)
            .env("NDC_CA", self.ca)
            .env("NDC_CERT", self.cert)
            .env("NDC_KEY", self.key)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ndc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// The lines of a subscription to `citizens` until `done` says so.
async fn read(
    addr: &str,
    tls: &ClientTls,
    from: From,
    done: impl Fn(&[Value]) -> bool + Send,
) -> Vec<Value> {
    let opts = SubscribeOptions {
        tls: Some(tls.clone()),
        ..subscription(addr, "citizens", from)
    };
    read_until(opts, T, done).await
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn id_of(i: u64) -> String {
    citizen_row(i, 0)["person_id"].as_str().unwrap().to_string()
}

/// `ndc audit verify --file` of these lines: (exit code, summary).
fn verify_file(dir: &Path, name: &str, lines: &[&str]) -> (i32, Value) {
    let file = dir.join(name);
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ndc"))
        .args(["audit", "verify", "--file", file.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        serde_json::from_slice(&out.stdout).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_recorded_per_person_and_tampering_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let certs =
        ndc_node::security::certs::make_dev_certificates(&dir.path().join("pki"), &[], 1).unwrap();
    let broker = Broker::start();
    broker.create_topic(CITIZENS, 1).await;
    broker.create_topic("ndc.dead-letter", 1).await;
    let producer = broker.producer();
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    for i in 0..PEOPLE {
        publish_event(&producer, CITIZENS, &feed.event('c', i, 0, None)).await;
    }
    let mut config = node_config(
        &dir.path().join("node"),
        &broker.bootstrap,
        &[("citizens", CITIZENS, &["person_id"])],
    );
    config.tls.insecure = false;
    config.tls.cert = Some(certs.node_cert.clone());
    config.tls.key = Some(certs.node_key.clone());
    config.tls.client_ca = Some(certs.ca.clone());
    config.access.admins = vec!["admin".into()];
    let config_file = dir.path().join("node.yaml");
    std::fs::write(&config_file, config.to_yaml().unwrap()).unwrap();
    let config_file = config_file.to_str().unwrap().to_string();
    let node = ndc_node::start(config).await.unwrap();
    let addr = node.addrs.grpc.to_string();
    let admin = Cli {
        ca: &certs.ca,
        cert: &certs.admin_cert,
        key: &certs.admin_key,
    };
    let subscriber_cli = Cli {
        ca: &certs.ca,
        cert: &certs.subscriber_cert,
        key: &certs.subscriber_key,
    };

    // The subscriber may read three people, for one purpose.
    let granted: Vec<String> = (0..3).map(id_of).collect();
    let rows = format!("person_id={}", granted.join(","));
    admin.ok(&[
        "access",
        "grant",
        "subscriber",
        "--views",
        "citizens",
        "--rows",
        &rows,
        "--purpose",
        "benefits",
        "--addr",
        &addr,
    ]);
    let subscriber = ClientTls {
        ca: Some(certs.ca.clone()),
        cert: Some(certs.subscriber_cert.clone()),
        key: Some(certs.subscriber_key.clone()),
    };
    // Snapshot: the three people (the node may still be reading the topic).
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + T;
    while fold(&lines).len() < 3 {
        assert!(std::time::Instant::now() < deadline, "{lines:?}");
        lines = read(&addr, &subscriber, From::Snapshot, |l| {
            l.iter().any(|x| x.get("snapshot_complete").is_some())
        })
        .await;
    }
    let token = lines
        .iter()
        .find(|x| x.get("snapshot_complete").is_some())
        .and_then(|x| x["resume_token"].as_str())
        .unwrap()
        .to_string();
    // Live: an update of person 0 (and of person 5, not granted).
    publish_event(&producer, CITIZENS, &feed.event('u', 5, 1, None)).await;
    publish_event(&producer, CITIZENS, &feed.event('u', 0, 1, None)).await;
    let live = read(&addr, &subscriber, From::Token(token), |l| {
        l.iter().any(|x| x["op"] == "update")
    })
    .await;
    assert!(live.iter().any(|x| x["op"] == "update"), "{live:?}");

    // Who received data about person 0: the subscriber, for its purpose,
    // from the snapshot and from the live change.
    let who = json_lines(&admin.ok(&[
        "audit",
        "who-accessed",
        "--person",
        &granted[0],
        "--addr",
        &addr,
    ]));
    let deliveries: Vec<&Value> = who.iter().filter(|r| r["kind"] == "delivery").collect();
    assert!(deliveries.len() >= 2, "{who:?}");
    for r in &deliveries {
        assert_eq!(r["principal"], "subscriber", "{r}");
        assert_eq!(r["purpose"], "benefits", "{r}");
        assert_eq!(r["view"], "citizens", "{r}");
    }
    assert!(deliveries.iter().any(|r| r["snapshot"] == true));
    assert!(
        deliveries
            .iter()
            .any(|r| r["snapshot"] == false && r["first_seq"].as_u64().unwrap() > 0)
    );
    // Person 5 changed too, but was never delivered to anyone.
    let who5 = admin.ok(&[
        "audit",
        "who-accessed",
        "--person",
        &id_of(5),
        "--addr",
        &addr,
    ]);
    assert!(who5.trim().is_empty(), "{who5}");
    // --since after everything: nothing.
    let later = admin.ok(&[
        "audit",
        "who-accessed",
        "--person",
        &granted[0],
        "--since",
        "2100-01-01T00:00:00Z",
        "--addr",
        &addr,
    ]);
    assert!(later.trim().is_empty(), "{later}");
    // Only admins ask.
    let refused = subscriber_cli.run(&[
        "audit",
        "who-accessed",
        "--person",
        &granted[0],
        "--addr",
        &addr,
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("admin"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // An invalid ID is refused with the reason.
    let bad = admin.run(&[
        "audit",
        "who-accessed",
        "--person",
        "12345",
        "--addr",
        &addr,
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a national ID"));

    // A person's report: the row held, and who received it; the report
    // itself is recorded.
    let report: Value = serde_json::from_str(&admin.ok(&[
        "person",
        "report",
        "--id",
        &granted[0],
        "--addr",
        &addr,
    ]))
    .unwrap();
    assert_eq!(report["national_id"], granted[0].as_str());
    assert_eq!(report["source_rows"][0]["view"], "citizens", "{report:#}");
    assert_eq!(
        report["source_rows"][0]["row"],
        citizen_row(0, 1),
        "{report:#}"
    );
    assert!(
        report["received_by"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["principal"] == "subscriber" && r["purpose"] == "benefits"),
        "{report:#}"
    );
    let who = json_lines(&admin.ok(&[
        "audit",
        "who-accessed",
        "--person",
        &granted[0],
        "--addr",
        &addr,
    ]));
    assert!(
        who.iter()
            .any(|r| r["kind"] == "report" && r["principal"] == "admin"),
        "{who:?}"
    );

    admin.ok(&["access", "revoke", "subscriber", "--addr", &addr]);

    // The chain reaches the audit topic, grant and revocation included,
    // and verifies there.
    let mut exported = String::new();
    let deadline = std::time::Instant::now() + T;
    loop {
        let out = admin.run(&["audit", "export", "--config", &config_file]);
        if out.status.success() {
            exported = String::from_utf8(out.stdout).unwrap();
            if exported.contains("\"kind\":\"revoke\"") {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not shipped: {exported}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records = json_lines(&exported);
    let kinds: Vec<&str> = records
        .iter()
        .map(|r| r["event"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"grant"), "{kinds:?}");
    assert!(
        kinds.contains(&"delivery") && kinds.contains(&"report"),
        "{kinds:?}"
    );
    assert_eq!(records[0]["event"]["by"], "admin");
    let grant: Value =
        serde_json::from_str(records[0]["event"]["grant"].as_str().unwrap()).unwrap();
    assert_eq!(grant["purpose"], "benefits");
    let out = admin.run(&["audit", "verify", "--config", &config_file]);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{summary:#}");
    assert_eq!(summary["ok"], true);
    assert!(
        summary["records"].as_u64().unwrap()
            >= records.len() as u64 - summary["duplicates_skipped"].as_u64().unwrap()
    );

    // Tampering with an export: altered, removed, reordered.
    let lines: Vec<&str> = exported.lines().collect();
    assert!(lines.len() >= 4, "{lines:?}");
    let (code, s) = verify_file(dir.path(), "clean.jsonl", &lines);
    assert_eq!((code, &s["ok"]), (0, &Value::Bool(true)), "{s:#}");
    let mut altered = lines.clone();
    let changed = altered[1].replacen("\"at_ms\":", "\"at_ms\":1", 1);
    altered[1] = &changed;
    let (code, s) = verify_file(dir.path(), "altered.jsonl", &altered);
    assert_eq!(code, 1);
    assert_eq!(s["first_bad"]["position"], "line 2", "{s:#}");
    assert!(
        s["first_bad"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("altered"),
        "{s:#}"
    );
    let mut removed = lines.clone();
    removed.remove(2);
    let (code, s) = verify_file(dir.path(), "removed.jsonl", &removed);
    assert_eq!(code, 1);
    assert_eq!(s["first_bad"]["position"], "line 3", "{s:#}");
    assert_eq!(s["first_bad"]["index"], 3, "{s:#}");
    let mut reordered = lines.clone();
    reordered.swap(1, 2);
    let (code, s) = verify_file(dir.path(), "reordered.jsonl", &reordered);
    assert_eq!(code, 1);
    assert_eq!(s["first_bad"]["position"], "line 2", "{s:#}");

    // A record forged into the topic itself (a copy of a delivery, edited
    // to hide the person) is named by its offset.
    let mut forged: Value = serde_json::from_str(lines[1]).unwrap();
    forged["event"]["national_ids"] = serde_json::json!([]);
    let forged = forged.to_string();
    producer
        .send(
            FutureRecord::<(), _>::to("ndc.audit").payload(&forged),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let out = admin.run(&["audit", "verify", "--config", &config_file]);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{summary:#}");
    let position = summary["first_bad"]["position"].as_str().unwrap();
    assert!(position.starts_with("offset "), "{summary:#}");
    assert!(
        summary["first_bad"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("altered"),
        "{summary:#}"
    );
    node.shutdown().await;
}
