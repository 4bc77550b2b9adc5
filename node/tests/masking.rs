//! Masking by clearance on real parts (issue 20, first part): a view with
//! classified columns, a subscriber granted `internal` with confidential
//! fields hashed and secret ones removed. On the snapshot, live changes
//! (before and after images), a resume and a keyed lookup, every field it
//! receives is what the reference masking of the input gives, and no field
//! above its clearance arrives unmasked. The grant is made with the command
//! line.

#![allow(clippy::unwrap_used)]

use ndc_node::client::{ClientTls, From, SubscribeOptions};
use ndc_node::config::ColumnClass;
use ndc_node::quickstart::synthetic::{Feed, Table, citizen_row};
use ndc_operators::masking::{self, Category, HashKeys, Level, Policy};
use ndc_testkit::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

const CITIZENS: &str = "population.public.citizens";
const PEOPLE: u64 = 12;
const T: Duration = Duration::from_secs(30);

/// What the subscriber must see of a row: the reference masking.
fn masked(row: &Value, levels: &BTreeMap<&str, Level>, keys: &HashKeys) -> Value {
    let mut out = serde_json::Map::new();
    for (name, value) in row.as_object().unwrap() {
        let level = levels.get(name.as_str()).copied().unwrap_or(Level::Secret);
        let policy = match level {
            Level::Public | Level::Internal => Policy::Deliver,
            Level::Confidential => Policy::Hash,
            Level::Secret => Policy::Redact,
        };
        if let Some(v) = masking::mask(value, policy, keys) {
            out.insert(name.clone(), v);
        }
    }
    Value::Object(out)
}

async fn lines_until(
    addr: &str,
    tls: &ClientTls,
    from: From,
    keys: Vec<String>,
    done: impl Fn(&[Value]) -> bool + Send,
) -> Vec<Value> {
    let opts = SubscribeOptions {
        keys,
        tls: Some(tls.clone()),
        ..subscription(addr, "citizens", from)
    };
    read_until(opts, T, done).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_above_the_clearance_never_leave_unmasked_on_any_path() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let certs = ndc_node::security::certs::make_dev_certificates(&pki, &[], 1).unwrap();
    std::fs::write(
        dir.path().join("hash.key"),
        b"a test key of 32 bytes, no more.",
    )
    .unwrap();
    let mut keys = HashKeys::default();
    keys.insert(1, b"a test key of 32 bytes, no more.");

    let broker = Broker::start();
    broker.create_topic(CITIZENS, 1).await;
    broker.create_topic("ndc.dead-letter", 1).await;
    let producer = broker.producer();
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    for i in 0..PEOPLE {
        publish_event(&producer, CITIZENS, &feed.event('c', i, 0, None)).await;
    }
    let levels: BTreeMap<&str, Level> = [
        ("person_id", Level::Internal),
        ("marital_status", Level::Public),
        ("full_name", Level::Confidential),
        ("birth_date", Level::Confidential),
    ]
    .into();
    let mut config = node_config(
        &dir.path().join("node"),
        &broker.bootstrap,
        &[("citizens", CITIZENS, &["person_id"])],
    );
    config.views[0].columns = levels
        .iter()
        .map(|(c, l)| {
            (
                c.to_string(),
                ColumnClass {
                    level: *l,
                    category: Category::Core,
                },
            )
        })
        .collect();
    config.tls.insecure = false;
    config.tls.cert = Some(certs.node_cert.clone());
    config.tls.key = Some(certs.node_key.clone());
    config.tls.client_ca = Some(certs.ca.clone());
    config.access.admins = vec!["admin".into()];
    config.access.hash_keys = vec![ndc_node::config::HashKeyConfig {
        version: 1,
        file: dir.path().join("hash.key"),
    }];
    let node = ndc_node::start(config).await.unwrap();
    let addr = node.addrs.grpc.to_string();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ndc"))
        .args(["access", "grant", "subscriber", "--views", "citizens"])
        .args(["--clearance", "internal", "--mask", "confidential=hash"])
        .args(["--purpose", "statistics", "--addr", &addr])
        .env("NDC_CA", &certs.ca)
        .env("NDC_CERT", &certs.admin_cert)
        .env("NDC_KEY", &certs.admin_key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let subscriber = ClientTls {
        ca: Some(certs.ca.clone()),
        cert: Some(certs.subscriber_cert.clone()),
        key: Some(certs.subscriber_key.clone()),
    };
    let reference = |revision: u32| -> BTreeMap<String, Value> {
        (0..PEOPLE)
            .map(|i| {
                let row = citizen_row(i, revision);
                let key = serde_json::json!({"person_id": row["person_id"]}).to_string();
                (key, masked(&row, &levels, &keys))
            })
            .collect()
    };
    let check = |lines: &[Value]| {
        for l in lines.iter().filter(|l| l.get("op").is_some()) {
            for side in ["before", "after"] {
                if let Some(row) = l[side].as_object() {
                    for (name, v) in row {
                        let level = levels.get(name.as_str()).copied().unwrap_or(Level::Secret);
                        assert!(level < Level::Secret, "a secret field arrived: {l}");
                        if level == Level::Confidential {
                            assert!(v.as_str().unwrap().starts_with("h1:"), "{l}");
                        }
                    }
                }
            }
        }
    };

    // Snapshot.
    let snap = |l: &[Value]| l.iter().any(|x| x.get("snapshot_complete").is_some());
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + T;
    while fold(&lines) != reference(0) {
        assert!(std::time::Instant::now() < deadline, "{lines:?}");
        lines = lines_until(&addr, &subscriber, From::Snapshot, vec![], snap).await;
    }
    check(&lines);
    let token = lines
        .iter()
        .find(|x| x.get("snapshot_complete").is_some())
        .map(|x| x["resume_token"].as_str().unwrap().to_string())
        .unwrap();

    // Live changes and their before images, then the same from a resume.
    for i in 0..PEOPLE {
        publish_event(&producer, CITIZENS, &feed.event('u', i, 1, None)).await;
    }
    let final_rows = reference(1);
    let resumed = lines_until(&addr, &subscriber, From::Token(token), vec![], |l| {
        let mut all = lines.clone();
        all.extend_from_slice(l);
        fold(&all) == final_rows
    })
    .await;
    let mut all = lines.clone();
    all.extend(resumed.iter().cloned());
    assert_eq!(fold(&all), final_rows);
    check(&resumed);
    assert!(
        resumed.iter().any(|l| l["before"].is_object()),
        "updates carry before images, masked"
    );

    // `ndc views` shows each classified column's level.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ndc"))
        .args(["views", "--addr", &addr])
        .env("NDC_CA", &certs.ca)
        .env("NDC_CERT", &certs.subscriber_cert)
        .env("NDC_KEY", &certs.subscriber_key)
        .output()
        .unwrap();
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        view["column_levels"],
        serde_json::json!({"person_id": "internal", "marital_status": "public",
                           "full_name": "confidential", "birth_date": "confidential"})
    );

    // A keyed lookup.
    let key = final_rows.keys().next().unwrap().clone();
    let keyed = lines_until(&addr, &subscriber, From::Snapshot, vec![key.clone()], snap).await;
    check(&keyed);
    assert_eq!(fold(&keyed).get(&key), final_rows.get(&key));

    // Raising the clearance changes what the stream was admitted to see:
    // the live stream ends, and a new one sees under the new grant.
    let opts = SubscribeOptions {
        addr: addr.clone(),
        view: "citizens".into(),
        from: From::Latest,
        keys: Vec::new(),
        fields: Vec::new(),
        limit: None,
        progress: true,
        reconnect: false,
        tls: Some(subscriber.clone()),
        token: None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let live = tokio::spawn(ndc_node::client::subscribe(opts, move |l| {
        tx.send(l).is_ok()
    }));
    tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    let admin = ClientTls {
        ca: Some(certs.ca.clone()),
        cert: Some(certs.admin_cert.clone()),
        key: Some(certs.admin_key.clone()),
    };
    ndc_node::serving::access_api::grant(
        &addr,
        Some(&admin),
        ndc_proto::v1::GrantInfo {
            principal: "subscriber".into(),
            role: "subscriber".into(),
            views: vec!["citizens".into()],
            purpose: "statistics".into(),
            clearance: "confidential".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(2), live)
        .await
        .expect("a changed clearance ends the stream within 2 s")
        .unwrap();
    let e = format!("{:#}", ended.expect_err("ended by the grant change"));
    assert!(e.contains("clearance"), "{e}");
    node.shutdown().await;
}
