//! Who may read what, on real parts: a node with mutual TLS and a JWT
//! issuer (keys made with `openssl`, tokens signed here), fed through tansu.
//! Callers without credentials, with expired or foreign tokens, or without
//! a grant are refused, with errors naming the principal and view; a row
//! filter and a column subset hold on snapshots, live changes, resumes and
//! keyed lookups alike, against a reference computed from the input; the
//! admin API is refused to a subscriber; streams per principal are bounded;
//! a revoked grant, an expiring grant and an expiring token end their live
//! streams.

#![allow(clippy::unwrap_used)]

use ndc_node::client::{self, ClientTls, Credentials, From, SubscribeOptions};
use ndc_node::quickstart::synthetic::{Feed, Table, citizen_row};
use ndc_testkit::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const CITIZENS: &str = "population.public.citizens";
const ADDRESSES: &str = "residence.public.addresses";
const PEOPLE: u64 = 24;
const T: Duration = Duration::from_secs(30);
const ISSUER: &str = "https://idp.agency.example/realms/gov";
const AUDIENCE: &str = "ndc";
const COLUMNS: [&str; 3] = ["person_id", "full_name", "marital_status"];

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token of the test issuer for `sub`, expiring in `ttl_s` seconds
/// (negative: already expired), for `aud`.
fn token(key: &jsonwebtoken::EncodingKey, sub: &str, ttl_s: i64, aud: &str) -> String {
    let exp = (now_s() as i64 + ttl_s) as u64;
    let claims =
        serde_json::json!({"sub": sub, "iss": ISSUER, "aud": aud, "exp": exp, "iat": now_s()});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        key,
    )
    .unwrap()
}

/// The rows a grant on `status` lets through after `revision`, projected
/// to the granted columns: the reference.
fn expected(status: &str, revision: u32) -> BTreeMap<String, Value> {
    (0..PEOPLE)
        .map(|i| citizen_row(i, revision))
        .filter(|r| r["marital_status"] == status)
        .map(|r| {
            let key = serde_json::json!({"person_id": r["person_id"]}).to_string();
            let projected: serde_json::Map<String, Value> = COLUMNS
                .iter()
                .map(|c| (c.to_string(), r[*c].clone()))
                .collect();
            (key, Value::Object(projected))
        })
        .collect()
}

struct Subscription {
    lines: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    done: tokio::task::JoinHandle<Result<(), String>>,
}

/// A subscription running in the background, collecting its lines.
fn follow(addr: &str, tls: &ClientTls, token: &str, from: From, keys: Vec<String>) -> Subscription {
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    let opts = SubscribeOptions {
        addr: addr.into(),
        view: "citizens".into(),
        from,
        keys,
        fields: Vec::new(),
        limit: None,
        progress: false,
        reconnect: false,
        tls: Some(tls.clone()),
        token: Some(token.into()),
    };
    let done = tokio::spawn(async move {
        client::subscribe(opts, move |l| {
            sink.lock().unwrap().push(l);
            true
        })
        .await
        .map_err(|e| format!("{e:#}"))
    });
    Subscription { lines, done }
}

impl Subscription {
    fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }
}

/// One unary call's error, as `code: message`.
async fn refused<F, Fut, T>(f: F) -> String
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    match f().await {
        Ok(_) => "served".into(),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_decide_what_each_caller_reads_on_every_path_and_end_streams_when_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let certs = ndc_node::security::certs::make_dev_certificates(&pki, &[], 1).unwrap();
    openssl(
        &pki,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ec.pem",
        ],
    );
    openssl(
        &pki,
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            "ec.pem",
            "-out",
            "signing.pem",
        ],
    );
    openssl(
        &pki,
        &["ec", "-in", "ec.pem", "-pubout", "-out", "idp.pub.pem"],
    );
    let signing =
        jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(pki.join("signing.pem")).unwrap())
            .unwrap();

    let broker = Broker::start();
    broker.create_topic(CITIZENS, 2).await;
    broker.create_topic(ADDRESSES, 1).await;
    broker.create_topic("ndc.dead-letter", 1).await;
    let producer = broker.producer();
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    for i in 0..PEOPLE {
        publish_event(&producer, CITIZENS, &feed.event('c', i, 0, None)).await;
    }
    let mut config = node_config(
        &dir.path().join("node"),
        &broker.bootstrap,
        &[
            ("citizens", CITIZENS, &["person_id"]),
            ("addresses", ADDRESSES, &[]),
        ],
    );
    config.tls.insecure = false;
    config.tls.cert = Some(certs.node_cert.clone());
    config.tls.key = Some(certs.node_key.clone());
    config.tls.client_ca = Some(certs.ca.clone());
    config.access.admins = vec!["admin".into()];
    config.access.max_streams_per_principal = 2;
    config.tls.reload_interval = Duration::from_millis(200);
    config.access.jwt = vec![ndc_node::config::JwtIssuerConfig {
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        keys: vec![pki.join("idp.pub.pem")],
        leeway: Duration::ZERO,
    }];
    let node = ndc_node::start(config).await.unwrap();
    let addr = node.addrs.grpc.to_string();
    let admin = ClientTls {
        ca: Some(certs.ca.clone()),
        cert: Some(certs.admin_cert.clone()),
        key: Some(certs.admin_key.clone()),
    };
    // Token callers bring no client certificate.
    let server_only = ClientTls {
        ca: Some(certs.ca.clone()),
        cert: None,
        key: None,
    };

    // The Hanoi office may read the citizens of one marital status, three
    // columns of them.
    let status = citizen_row(0, 0)["marital_status"]
        .as_str()
        .unwrap()
        .to_string();
    let office = token(&signing, "hanoi-office", 600, AUDIENCE);
    let grant = ndc_proto::v1::GrantInfo {
        principal: "hanoi-office".into(),
        role: "subscriber".into(),
        views: vec!["citizens".into()],
        row_filter: Some(ndc_proto::v1::RowFilter {
            column: "marital_status".into(),
            values: vec![status.clone()],
        }),
        columns: COLUMNS.iter().map(|c| c.to_string()).collect(),
        purpose: "civil registry of the Hanoi office".into(),
        ..Default::default()
    };
    let granted = ndc_node::serving::access_api::grant(&addr, Some(&admin), grant.clone())
        .await
        .unwrap();
    assert_eq!(granted.granted_by, "admin");

    let channel = || async { client::channel(&addr, Some(&server_only)).await.unwrap() };
    let subscription_client = |credentials: Credentials| async move {
        ndc_proto::v1::subscription_client::SubscriptionClient::with_interceptor(
            channel().await,
            credentials,
        )
    };
    let subscribe_once = |credentials: Credentials, view: &str, fields: Vec<String>| {
        let view = view.to_string();
        async move {
            let mut c = subscription_client(credentials).await;
            let mut stream = c
                .subscribe(ndc_proto::v1::SubscribeRequest {
                    view,
                    fields,
                    ..Default::default()
                })
                .await?
                .into_inner();
            stream.message().await
        }
    };

    // Refusals: no credentials, expired, foreign audience, a view not
    // granted (existing or not), a column not granted.
    let none = refused(|| subscribe_once(Credentials::default(), "citizens", vec![])).await;
    assert!(
        none.starts_with("Unauthenticated")
            && none.contains("no client certificate and no bearer token"),
        "{none}"
    );
    let expired = Credentials::bearer(&token(&signing, "hanoi-office", -60, AUDIENCE)).unwrap();
    let e = refused(|| subscribe_once(expired, "citizens", vec![])).await;
    assert!(
        e.starts_with("Unauthenticated") && e.contains("expired"),
        "{e}"
    );
    let foreign =
        Credentials::bearer(&token(&signing, "hanoi-office", 600, "another-service")).unwrap();
    let e = refused(|| subscribe_once(foreign, "citizens", vec![])).await;
    assert!(
        e.starts_with("Unauthenticated") && e.contains("audience"),
        "{e}"
    );
    let office_creds = || Credentials::bearer(&office).unwrap();
    for view in ["addresses", "no-such-view"] {
        let e = refused(|| subscribe_once(office_creds(), view, vec![])).await;
        assert!(
            e.starts_with("PermissionDenied") && e.contains("hanoi-office") && e.contains(view),
            "{e}"
        );
        assert!(
            !e.contains("citizens"),
            "a refusal names no other view: {e}"
        );
    }
    let e = refused(|| subscribe_once(office_creds(), "citizens", vec!["birth_date".into()])).await;
    assert!(
        e.starts_with("PermissionDenied") && e.contains("birth_date"),
        "{e}"
    );

    // Views: only the granted one.
    let listed = subscription_client(office_creds())
        .await
        .list_views(ndc_proto::v1::ListViewsRequest {})
        .await
        .unwrap()
        .into_inner()
        .views;
    assert_eq!(
        listed.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["citizens"]
    );

    // The admin API is refused to a subscriber.
    let mut pipelines = ndc_proto::v1::pipelines_client::PipelinesClient::with_interceptor(
        channel().await,
        office_creds(),
    );
    let e = refused(|| pipelines.list(ndc_proto::v1::ListPipelinesRequest {})).await;
    assert!(
        e.starts_with("PermissionDenied") && e.contains("operator role"),
        "{e}"
    );
    let e = refused(|| {
        pipelines.apply(ndc_proto::v1::ApplyPipelineRequest {
            spec_yaml: "name: x".into(),
            dry_run: true,
        })
    })
    .await;
    assert!(
        e.starts_with("PermissionDenied") && e.contains("admin role"),
        "{e}"
    );
    let mut access = ndc_proto::v1::access_client::AccessClient::with_interceptor(
        channel().await,
        office_creds(),
    );
    let e = refused(|| {
        access.grant(ndc_proto::v1::GrantRequest {
            grant: Some(grant.clone()),
        })
    })
    .await;
    assert!(
        e.starts_with("PermissionDenied"),
        "a subscriber cannot grant itself more: {e}"
    );

    // Snapshot, then live changes that move rows into and out of the
    // filter: the subscriber's copy is always the reference.
    let live = follow(&addr, &server_only, &office, From::Snapshot, Vec::new());
    eventually("the filtered snapshot", T, || {
        let lines = live.lines();
        lines.iter().any(|l| l.get("snapshot_complete").is_some())
            && fold(&lines) == expected(&status, 0)
    })
    .await;
    let after_snapshot = live
        .lines()
        .iter()
        .find(|l| l.get("snapshot_complete").is_some())
        .map(|l| l["resume_token"].as_str().unwrap().to_string())
        .unwrap();
    for revision in 1..=3 {
        for i in 0..PEOPLE {
            publish_event(&producer, CITIZENS, &feed.event('u', i, revision, None)).await;
        }
    }
    let reference = expected(&status, 3);
    assert_ne!(
        reference,
        expected(&status, 0),
        "the updates move rows across the filter"
    );
    eventually("live changes through the filter", T, || {
        fold(&live.lines()) == reference
    })
    .await;
    for l in live.lines().iter().filter(|l| l.get("op").is_some()) {
        for side in ["before", "after"] {
            if let Some(row) = l[side].as_object() {
                assert!(row.keys().all(|k| COLUMNS.contains(&k.as_str())), "{l}");
                assert_eq!(
                    row["marital_status"],
                    status.as_str(),
                    "only rows of the filter: {l}"
                );
            }
        }
    }

    // Resumed from the end of the snapshot: the same rows.
    let resumed = follow(
        &addr,
        &server_only,
        &office,
        From::Token(after_snapshot),
        Vec::new(),
    );
    let mut base: Vec<Value> = live
        .lines()
        .into_iter()
        .take_while(|l| l.get("snapshot_complete").is_none())
        .collect();
    eventually("a resumed stream through the filter", T, || {
        let mut all = base.clone();
        all.extend(resumed.lines());
        fold(&all) == reference
    })
    .await;
    base.clear();

    // Two live streams are the limit for one principal.
    let keyed_in = reference.keys().next().unwrap().clone();
    let e = refused(|| subscribe_once(office_creds(), "citizens", vec![])).await;
    assert!(
        e.starts_with("ResourceExhausted") && e.contains("access.max_streams_per_principal"),
        "{e}"
    );
    resumed.done.abort();
    let _ = resumed.done.await;

    // Keyed lookups: a key inside the filter gets its row, one outside none.
    let outside = (0..PEOPLE)
        .map(|i| citizen_row(i, 3))
        .find(|r| r["marital_status"] != status.as_str())
        .map(|r| serde_json::json!({"person_id": r["person_id"]}).to_string())
        .unwrap();
    let mut keyed = None;
    let deadline = Instant::now() + T;
    while keyed.is_none() && Instant::now() < deadline {
        let k = follow(
            &addr,
            &server_only,
            &office,
            From::Snapshot,
            vec![keyed_in.clone(), outside.clone()],
        );
        let ok = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if k.lines()
                    .iter()
                    .any(|l| l.get("snapshot_complete").is_some())
                {
                    return k.lines();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        k.done.abort();
        let _ = k.done.await;
        keyed = ok.ok();
    }
    let keyed = fold(&keyed.unwrap());
    assert_eq!(keyed.keys().collect::<Vec<_>>(), [&keyed_in], "{keyed:?}");

    // Revoked: the live stream ends within 2 s, with PERMISSION_DENIED.
    ndc_node::serving::access_api::revoke(&addr, Some(&admin), "hanoi-office")
        .await
        .unwrap();
    let revoked_at = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(2), live.done)
        .await
        .expect("the stream ends within 2 s of the revocation")
        .unwrap();
    let e = ended.expect_err("ended by the revocation");
    assert!(e.contains("revoked") && e.contains("hanoi-office"), "{e}");
    eprintln!(
        "stream ended {:?} after the revocation",
        revoked_at.elapsed()
    );
    let e = refused(|| subscribe_once(office_creds(), "citizens", vec![])).await;
    assert!(e.starts_with("PermissionDenied"), "{e}");

    // A grant that expires ends its streams.
    let mut brief = grant.clone();
    brief.principal = "day-shift".into();
    brief.row_filter = None;
    let expiry_ms = (now_s() + 3) * 1000;
    brief.expires_at_ms = expiry_ms;
    ndc_node::serving::access_api::grant(&addr, Some(&admin), brief)
        .await
        .unwrap();
    let day = token(&signing, "day-shift", 600, AUDIENCE);
    let s = follow(&addr, &server_only, &day, From::Latest, Vec::new());
    let ended = tokio::time::timeout(Duration::from_secs(10), s.done)
        .await
        .expect("the stream ends when its grant expires")
        .unwrap();
    let e = ended.expect_err("ended by the grant's expiry");
    assert!(e.contains("expired") && e.contains("day-shift"), "{e}");
    let late = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64)
        .saturating_sub(expiry_ms);
    assert!(late < 2000, "ended {late} ms after the expiry");

    // A token that expires ends its stream too.
    let mut short_grant = grant.clone();
    short_grant.principal = "night-shift".into();
    short_grant.row_filter = None;
    ndc_node::serving::access_api::grant(&addr, Some(&admin), short_grant)
        .await
        .unwrap();
    let short = token(&signing, "night-shift", 3, AUDIENCE);
    let s = follow(&addr, &server_only, &short, From::Latest, Vec::new());
    let ended = tokio::time::timeout(Duration::from_secs(10), s.done)
        .await
        .expect("the stream ends when its token expires")
        .unwrap();
    let e = ended.expect_err("ended by the expiry");
    assert!(e.contains("expired") && e.contains("night-shift"), "{e}");

    // The identity provider rotates its signing key: once the key file is
    // replaced, tokens of the new key are taken and the old key's are not.
    openssl(
        &pki,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ec2.pem",
        ],
    );
    openssl(
        &pki,
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            "ec2.pem",
            "-out",
            "signing2.pem",
        ],
    );
    openssl(
        &pki,
        &["ec", "-in", "ec2.pem", "-pubout", "-out", "idp2.pub.pem"],
    );
    let rotated =
        jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(pki.join("signing2.pem")).unwrap())
            .unwrap();
    std::fs::copy(pki.join("idp2.pub.pem"), pki.join("idp.pub.pem")).unwrap();
    let deadline = Instant::now() + T;
    loop {
        let new_key = token(&rotated, "day-shift", 600, AUDIENCE);
        let mut c = ndc_proto::v1::access_client::AccessClient::with_interceptor(
            client::channel(&addr, Some(&server_only)).await.unwrap(),
            Credentials::bearer(&new_key).unwrap(),
        );
        if c.who_am_i(ndc_proto::v1::WhoAmIRequest {}).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the rotated key was never taken");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old_key = Credentials::bearer(&token(&signing, "day-shift", 600, AUDIENCE)).unwrap();
    let mut c = ndc_proto::v1::access_client::AccessClient::with_interceptor(
        client::channel(&addr, Some(&server_only)).await.unwrap(),
        old_key,
    );
    let e = refused(|| c.who_am_i(ndc_proto::v1::WhoAmIRequest {})).await;
    assert!(
        e.starts_with("Unauthenticated") && e.contains("signature"),
        "{e}"
    );

    node.shutdown().await;
}
