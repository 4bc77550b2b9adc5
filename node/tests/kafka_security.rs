//! The Kafka client as agencies' brokers need it: TLS with CA verification,
//! every compression codec Kafka Connect writes, and secrets that never
//! appear in the configuration ndc prints. Against real parts: tansu behind
//! stunnel (a TLS endpoint on loopback), certificates made by `openssl`.

#![allow(clippy::unwrap_used)]

use ndc_node::quickstart::synthetic::{Feed, Table};
use ndc_testkit::*;
use std::time::Duration;

const CITIZENS: &str = "population.public.citizens";
const DLQ: &str = "ndc.dead-letter";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reads_a_tls_broker_it_trusts_and_stays_not_ready_with_a_wrong_ca() {
    let dir = tempfile::tempdir().unwrap();
    let broker_dir = dir.path().join("broker");
    std::fs::create_dir_all(&broker_dir).unwrap();
    let broker = Broker::start_tls(&broker_dir);
    broker.create_topic(CITIZENS, 2).await;
    broker.create_topic(DLQ, 1).await;
    let producer = broker.producer();
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    for i in 0..20 {
        publish_event(&producer, CITIZENS, &feed.event('c', i, 0, None)).await;
    }

    // A CA that did not sign the broker's certificate.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let wrong_ca = make_certificates(&other, "not-the-brokers-ca");
    let data = dir.path().join("node");
    let config = |ca: &std::path::Path| {
        let mut c = node_config(
            &data,
            &broker.bootstrap,
            &[("citizens", CITIZENS, &["person_id"])],
        );
        let k = c.kafka.as_mut().unwrap();
        k.properties
            .insert("security.protocol".into(), "ssl".into());
        k.properties
            .insert("ssl.ca.location".into(), ca.display().to_string());
        c
    };

    let node = ndc_node::start(config(&wrong_ca)).await.unwrap();
    let http = node.addrs.http;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut text = String::new();
    while tokio::time::Instant::now() < deadline {
        text = metrics_text(http).await;
        if metric_value(&text, |l| {
            l.starts_with("ndc_source_errors_total{") && l.contains("kind=\"tls\"")
        })
        .is_some_and(|n| n > 0.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        text.contains("kind=\"tls\""),
        "a refused certificate is counted as a TLS error: {text}"
    );
    let ready = http_get(http, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "not ready: {ready}");
    node.shutdown().await;

    // With the broker's CA, the same node reads everything: nothing was
    // lost while it could not connect.
    let ca = broker_dir.join("ca.pem");
    let node = ndc_node::start(config(&ca)).await.unwrap();
    wait_rows(node.addrs.grpc, "citizens", 20).await;
    let ready = http_get(node.addrs.http, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "ready: {ready}");
    node.shutdown().await;
}

/// A broker nobody answers for: counted as `kind="broker"`, not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_counted_and_keeps_the_node_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 (tcpmux): privileged, nothing listens there on a test machine.
    let closed = "127.0.0.1:1".to_string();
    let node = ndc_node::start(node_config(
        dir.path(),
        &closed,
        &[("citizens", CITIZENS, &["person_id"])],
    ))
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut text = String::new();
    while tokio::time::Instant::now() < deadline {
        text = metrics_text(node.addrs.http).await;
        if text.contains("kind=\"broker\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(text.contains("kind=\"broker\""), "{text}");
    let ready = http_get(node.addrs.http, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "not ready: {ready}");
    node.shutdown().await;
}

/// Kafka Connect's producers compress with any of Kafka's codecs; a batch
/// the client cannot decompress would stall its partition for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_every_compression_codec_are_read() {
    let broker = Broker::start();
    broker.create_topic(CITIZENS, 1).await;
    broker.create_topic(DLQ, 1).await;
    let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
    let codecs = ["gzip", "snappy", "lz4", "zstd"];
    for (n, codec) in codecs.iter().enumerate() {
        let producer: rdkafka::producer::FutureProducer = broker
            .client()
            .set("compression.type", *codec)
            .set("linger.ms", "20")
            .create()
            .unwrap();
        // Sent together, so they travel as one compressed batch.
        let events: Vec<_> = (0..10)
            .map(|i| feed.event('c', (n * 10 + i) as u64, 0, None))
            .collect();
        let sends = events.iter().map(|e| {
            let record: rdkafka::producer::FutureRecord<'_, [u8], [u8]> =
                rdkafka::producer::FutureRecord::to(CITIZENS)
                    .key(e.key.as_slice())
                    .payload(e.value.as_deref().unwrap());
            producer.send(record, Duration::from_secs(10))
        });
        for r in futures::future::join_all(sends).await {
            r.map_err(|(e, _)| e).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let node = ndc_node::start(node_config(
        dir.path(),
        &broker.bootstrap,
        &[("citizens", CITIZENS, &["person_id"])],
    ))
    .await
    .unwrap();
    wait_rows(node.addrs.grpc, "citizens", 40).await;
    node.shutdown().await;
}

/// `check-config` shows where a secret is read from, never its value; a
/// secret written inline is refused without repeating it.
#[test]
fn check_config_never_prints_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, kafka: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "node: {{ data_dir: {} }}\ntls: {{ insecure: true }}\nkafka:\n  bootstrap_servers: 127.0.0.1:9092\n{kafka}\nviews:\n  - name: citizens\n    key_columns: [person_id]\n    sources: [ {{ kafka: {{ topic: t }} }} ]\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        path
    };
    let named = write(
        "named.yaml",
        "  properties: { security.protocol: sasl_ssl, sasl.mechanism: SCRAM-SHA-512, sasl.username: ingest }\n  secrets: { sasl.password: { env: NDC_TEST_KAFKA_PASSWORD } }",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ndc"))
        .args(["check-config", "--config"])
        .arg(&named)
        .env("NDC_TEST_KAFKA_PASSWORD", "pw-Zq81-do-not-print")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("NDC_TEST_KAFKA_PASSWORD"), "{stdout}");
    assert!(
        !stdout.contains("pw-Zq81") && !stderr.contains("pw-Zq81"),
        "{stdout}{stderr}"
    );

    let unset = std::process::Command::new(env!("CARGO_BIN_EXE_ndc"))
        .args(["check-config", "--config"])
        .arg(&named)
        .env_remove("NDC_TEST_KAFKA_PASSWORD")
        .output()
        .unwrap();
    assert!(!unset.status.success());
    assert!(
        String::from_utf8_lossy(&unset.stderr).contains("NDC_TEST_KAFKA_PASSWORD is not set"),
        "{}",
        String::from_utf8_lossy(&unset.stderr)
    );

    let inline = write(
        "inline.yaml",
        "  properties: { security.protocol: sasl_ssl, sasl.password: pw-Zq81-do-not-print }",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ndc"))
        .args(["check-config", "--config"])
        .arg(&inline)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("kafka.secrets.sasl.password"), "{all}");
    assert!(!all.contains("pw-Zq81"), "{all}");
}

/// What agencies' brokers need is compiled into librdkafka, as it says.
#[test]
fn librdkafka_is_built_with_tls_sasl_and_every_codec() {
    let features = rdkafka::ClientConfig::new()
        .create_native_config()
        .unwrap()
        .get("builtin.features")
        .unwrap();
    for feature in [
        "ssl",
        "sasl_scram",
        "sasl_oauthbearer",
        "sasl_gssapi",
        "oidc",
        "gzip",
        "snappy",
        "lz4",
        "zstd",
    ] {
        assert!(
            features.split(',').any(|f| f == feature),
            "librdkafka without {feature}: {features}"
        );
    }
}
