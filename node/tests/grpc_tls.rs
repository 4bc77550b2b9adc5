//! TLS on the gRPC listener, on real handshakes over loopback: a subscriber
//! with a certificate of the node's client CA is served; no certificate, one
//! of another CA, an expired one, or plaintext are refused at the handshake;
//! the node's certificate rotated in place is picked up without a restart and
//! without dropping a live stream. Certificates are made with `openssl`.

#![allow(clippy::unwrap_used)]

use ndc_node::client::{ClientTls, From, SubscribeOptions};
use ndc_node::quickstart::synthetic::{Feed, Table};
use ndc_testkit::*;
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CITIZENS: &str = "population.public.citizens";
const DLQ: &str = "ndc.dead-letter";
const T: Duration = Duration::from_secs(30);

fn client(dir: &Path, ca: &Path, name: &str) -> ClientTls {
    ClientTls {
        ca: Some(ca.to_path_buf()),
        cert: Some(dir.join(format!("{name}.pem"))),
        key: Some(dir.join(format!("{name}.key"))),
    }
}

/// Subscribes from a snapshot with `tls`; the lines until the snapshot is
/// complete, or the error that ended the attempt.
async fn snapshot(
    addr: std::net::SocketAddr,
    tls: Option<ClientTls>,
) -> Result<Vec<Value>, String> {
    let mut lines = Vec::new();
    let opts = SubscribeOptions {
        addr: addr.to_string(),
        view: "citizens".into(),
        from: From::Snapshot,
        keys: Vec::new(),
        fields: Vec::new(),
        limit: None,
        progress: false,
        reconnect: false,
        tls: Some(tls.unwrap_or_default()),
        token: None,
    };
    let result = tokio::time::timeout(
        T,
        ndc_node::client::subscribe(opts, |line| {
            let done = line.get("snapshot_complete").is_some();
            lines.push(line);
            !done
        }),
    )
    .await
    .map_err(|_| "timed out".to_string())?;
    result.map(|()| lines).map_err(|e| format!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_serves_trusted_clients_refuses_others_and_rotates_without_dropping_streams() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let other = dir.path().join("other");
    for d in [&pki, &other] {
        std::fs::create_dir_all(d).unwrap();
    }
    let ca = make_certificates(&pki, "ndc-test-ca");
    make_client_certificate(&pki, "subscriber", 2);
    make_client_certificate(&pki, "admin", 2);
    let (old_pem, _) = make_client_certificate(&pki, "expired", 0);
    make_certificates(&other, "another-ca");
    make_client_certificate(&other, "stranger", 2);

    let broker = Broker::start();
    broker.create_topic(CITIZENS, 1).await;
    broker.create_topic(DLQ, 1).await;
    let producer = broker.producer();
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    for i in 0..10 {
        publish_event(&producer, CITIZENS, &feed.event('c', i, 0, None)).await;
    }
    let mut config = node_config(
        &dir.path().join("node"),
        &broker.bootstrap,
        &[("citizens", CITIZENS, &["person_id"])],
    );
    config.tls.insecure = false;
    config.tls.cert = Some(pki.join("server.pem"));
    config.tls.key = Some(pki.join("server.key"));
    config.tls.client_ca = Some(ca.clone());
    config.tls.reload_interval = Duration::from_millis(200);
    config.access.admins = vec!["admin".into()];
    let node = ndc_node::start(config).await.unwrap();
    let addr = node.addrs.grpc;
    ndc_node::serving::access_api::grant(
        &addr.to_string(),
        Some(&client(&pki, &ca, "admin")),
        ndc_proto::v1::GrantInfo {
            principal: "subscriber".into(),
            role: "subscriber".into(),
            views: vec!["citizens".into()],
            purpose: "TLS test".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    // Served: a certificate of the client CA.
    let trusted = client(&pki, &ca, "subscriber");
    let deadline = tokio::time::Instant::now() + T;
    let rows = loop {
        let lines = snapshot(addr, Some(trusted.clone())).await.unwrap();
        let rows = fold(&lines).len();
        if rows == 10 || tokio::time::Instant::now() > deadline {
            break rows;
        }
    };
    assert_eq!(rows, 10);

    // Refused at the handshake: no client certificate, another CA's,
    // an expired one, plaintext.
    let no_cert = ClientTls {
        ca: Some(ca.clone()),
        cert: None,
        key: None,
    };
    assert!(
        snapshot(addr, Some(no_cert)).await.is_err(),
        "no client certificate"
    );
    assert!(
        snapshot(addr, Some(client(&other, &ca, "stranger")))
            .await
            .is_err(),
        "a certificate of another CA"
    );
    eventually("the certificate made with -days 0 to expire", T, || {
        expired(&old_pem)
    })
    .await;
    assert!(
        snapshot(addr, Some(client(&pki, &ca, "expired")))
            .await
            .is_err(),
        "an expired certificate"
    );
    assert!(snapshot(addr, None).await.is_err(), "plaintext");
    let text = metrics_text(node.addrs.http).await;
    assert_eq!(
        metric_value(&text, |l| l.starts_with("ndc_tls_insecure ")),
        Some(0.0)
    );
    assert!(
        metric_value(&text, |l| l.starts_with("ndc_tls_handshake_failures_total")).unwrap_or(0.0)
            >= 4.0,
        "{text}"
    );

    // A live stream on the first certificate.
    let live: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = live.clone();
    let stream = tokio::spawn(ndc_node::client::subscribe(
        SubscribeOptions {
            addr: addr.to_string(),
            view: "citizens".into(),
            from: From::Latest,
            keys: Vec::new(),
            fields: Vec::new(),
            limit: None,
            progress: true,
            reconnect: false,
            tls: Some(trusted.clone()),
            token: None,
        },
        move |line| {
            sink.lock().unwrap().push(line);
            true
        },
    ));
    eventually("the live stream to start", T, || {
        !live.lock().unwrap().is_empty()
    })
    .await;

    // cert-manager rotates the node's certificate in place: a new CA's.
    let rotated = dir.path().join("rotated");
    std::fs::create_dir_all(&rotated).unwrap();
    let new_ca = make_certificates(&rotated, "rotated-ca");
    for f in ["server.pem", "server.key"] {
        let tmp = pki.join(format!("{f}.new"));
        std::fs::copy(rotated.join(f), &tmp).unwrap();
        std::fs::rename(&tmp, pki.join(f)).unwrap();
    }
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let text = metrics_text(node.addrs.http).await;
        if metric_value(&text, |l| {
            l.starts_with("ndc_tls_reloads_total") && l.contains("reloaded")
        })
        .is_some_and(|n| n >= 1.0)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no reload: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New connections get the new certificate: the old CA no longer
    // verifies it, the new one does.
    assert!(
        snapshot(addr, Some(client(&pki, &ca, "subscriber")))
            .await
            .is_err()
    );
    let mut with_new_ca = client(&pki, &ca, "subscriber");
    with_new_ca.ca = Some(new_ca);
    snapshot(addr, Some(with_new_ca)).await.unwrap();

    // Files that do not parse keep the certificate in force.
    std::fs::write(pki.join("server.pem.new"), "not a certificate\n").unwrap();
    std::fs::rename(pki.join("server.pem.new"), pki.join("server.pem")).unwrap();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let text = metrics_text(node.addrs.http).await;
        if metric_value(&text, |l| {
            l.starts_with("ndc_tls_reloads_total") && l.contains("failed")
        })
        .is_some_and(|n| n >= 1.0)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed reload: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut still_new_ca = client(&pki, &ca, "subscriber");
    still_new_ca.ca = Some(rotated.join("ca.pem"));
    snapshot(addr, Some(still_new_ca)).await.unwrap();

    // The stream opened before the rotation still delivers.
    for i in 100..105 {
        publish_event(&producer, CITIZENS, &feed.event('c', i, 0, None)).await;
    }
    eventually(
        "the live stream to receive the changes after the rotation",
        T,
        || changes(&live.lock().unwrap()).len() >= 5,
    )
    .await;
    assert!(!stream.is_finished(), "the live stream was not dropped");
    stream.abort();
    node.shutdown().await;
}
