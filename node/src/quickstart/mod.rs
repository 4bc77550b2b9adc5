//! `ndc quickstart`: everything in one process, nothing to install.
//!
//! An embedded Kafka-protocol broker (librdkafka's mock cluster: fine for a
//! demo, never the proof of anything), a node with two plain views and the
//! example pipeline `examples/national.yaml` (golden records of citizens
//! from four agencies), a generator of population, residence, health
//! insurance and vehicle change feeds, and a live subscription printed to
//! the terminal. Other terminals can publish to the broker (kcat) and
//! subscribe to the node while it runs.

pub mod synthetic;

use crate::client::{self, ClientTls, SubscribeOptions};
use crate::config::{KafkaSection, KafkaSourceConfig, NodeConfig, SourceConfig, ViewConfig};
use crate::now_ms;
use crate::quickstart::synthetic::{Feed, Table};
use crate::security::certs::DevCertificates;
use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct QuickstartOptions {
    pub data_dir: PathBuf,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// People in the initial snapshot of each registry.
    pub people: u64,
    /// Changes per second after the snapshot.
    pub rate: u32,
    /// Stop after this long (None: until Ctrl-C).
    pub duration: Option<Duration>,
}

pub const DEAD_LETTER_TOPIC: &str = "ndc.dead-letter";

/// The example pipeline the quickstart runs (`examples/national.yaml`).
pub const EXAMPLE_PIPELINE: &str = include_str!("../../../examples/national.yaml");

/// Principals of the development certificates (their CNs).
const ADMIN: &str = "admin";
const SUBSCRIBER: &str = "subscriber";

/// The node configuration the quickstart runs (also a template for users):
/// mutual TLS with the development certificates in `certs`.
pub fn config(bootstrap: &str, opts: &QuickstartOptions, certs: &DevCertificates) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.node.id = "ndc-quickstart".into();
    c.node.data_dir = opts.data_dir.clone();
    c.node.grpc_listen = opts.grpc_listen;
    c.tls.cert = Some(certs.node_cert.clone());
    c.tls.key = Some(certs.node_key.clone());
    c.tls.client_ca = Some(certs.ca.clone());
    // The admin certificate's CN; it grants the subscriber at start.
    c.access.admins = vec![ADMIN.into()];
    c.node.http_listen = opts.http_listen;
    c.node.shutdown_grace = Duration::from_secs(5);
    c.kafka = Some(KafkaSection {
        bootstrap_servers: bootstrap.to_string(),
        dead_letter_topic: DEAD_LETTER_TOPIC.into(),
        metadata_refresh: Duration::from_secs(2),
        ..KafkaSection::default()
    });
    c.storage.sync_commits = false;
    // The embedded broker has no CreateTopics (the node's request would go
    // unanswered and be retried with a warning a minute); it creates a
    // topic when a client first uses it.
    c.pipelines.create_repartition_topics = false;
    c.audit.create_topic = false;
    c.views = vec![
        ViewConfig {
            name: "population.citizens".into(),
            key_columns: vec!["person_id".into()],
            sources: vec![SourceConfig::Kafka(KafkaSourceConfig {
                topic: Table::Citizens.topic().into(),
                format: Default::default(),
            })],
            columns: Default::default(),
            national_id: Some("person_id".into()),
            shards: 1,
        },
        ViewConfig {
            name: "residence.addresses".into(),
            key_columns: Vec::new(),
            sources: vec![SourceConfig::Kafka(KafkaSourceConfig {
                topic: Table::Addresses.topic().into(),
                format: Default::default(),
            })],
            columns: Default::default(),
            national_id: Some("person_id".into()),
            shards: 1,
        },
    ];
    c
}

pub async fn run(opts: QuickstartOptions) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("cannot start the embedded Kafka broker")?;
    let bootstrap = cluster.bootstrap_servers();
    for topic in [
        Table::Citizens.topic(),
        Table::Addresses.topic(),
        Table::InsuranceCards.topic(),
        Table::Vehicles.topic(),
        Table::Businesses.topic(),
    ] {
        cluster
            .create_topic(topic, 3, 1)
            .with_context(|| format!("cannot create topic {topic}"))?;
    }
    cluster
        .create_topic(DEAD_LETTER_TOPIC, 1, 1)
        .context("cannot create the dead-letter topic")?;

    if opts.data_dir.exists() {
        std::fs::remove_dir_all(&opts.data_dir)
            .with_context(|| format!("cannot clear {}", opts.data_dir.display()))?;
    }
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("cannot create {}", opts.data_dir.display()))?;
    let spec = opts.data_dir.join("national.yaml");
    std::fs::write(&spec, EXAMPLE_PIPELINE)
        .with_context(|| format!("cannot write {}", spec.display()))?;
    let certs =
        crate::security::certs::make_dev_certificates(&opts.data_dir.join("certs"), &[], 30)
            .context("cannot make the development certificates")?;
    let tls = ClientTls {
        ca: Some(certs.ca.clone()),
        cert: Some(certs.subscriber_cert.clone()),
        key: Some(certs.subscriber_key.clone()),
    };
    let mut node_config = config(&bootstrap, &opts, &certs);
    node_config.pipelines.files = vec![spec];
    let node = crate::node::start(node_config).await?;
    let grpc = node.addrs.grpc;
    let http = node.addrs.http;
    // As the admin, through the node's access API: the subscriber
    // certificate may read every view and see the pipelines' status.
    let admin = ClientTls {
        ca: Some(certs.ca.clone()),
        cert: Some(certs.admin_cert.clone()),
        key: Some(certs.admin_key.clone()),
    };
    crate::serving::access_api::grant(
        &grpc.to_string(),
        Some(&admin),
        ndc_proto::v1::GrantInfo {
            principal: SUBSCRIBER.into(),
            role: "operator".into(),
            views: vec!["*".into()],
            purpose: "quickstart walk-through".into(),
            ..Default::default()
        },
    )
    .await
    .context("cannot grant the quickstart's subscriber access")?;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        .create()
        .context("cannot create the generator's producer")?;
    let generator = tokio::spawn(generate(producer, opts.people, opts.rate));

    let topic = Table::Citizens.topic();
    let data = opts.data_dir.display();
    let (people, rate) = (opts.people, opts.rate);
    println!();
    println!("ndc quickstart");
    println!("==============");
    println!("  embedded Kafka broker   {bootstrap}   (librdkafka mock cluster, in this process)");
    println!("  ndc node, gRPC          {grpc}");
    println!("  metrics and health      http://{http}/metrics   /healthz   /readyz");
    println!("  state                   {data}");
    println!("  views                   population.citizens (key person_id), residence.addresses");
    println!(
        "  pipeline                national (examples/national.yaml): golden records national.people,"
    );
    println!(
        "                          national.people.conflicts, national.residents, national.vehicle_owners,"
    );
    println!("                          national.business_representatives, ...");
    println!();
    println!(
        "A generator publishes {people} citizens and their addresses as a Debezium snapshot, then"
    );
    println!(
        "{rate} changes/s (about 3% malformed: they go to topic {DEAD_LETTER_TOPIC} with the reason)."
    );
    println!();
    let (ca, cert, key) = (
        certs.ca.display(),
        certs.subscriber_cert.display(),
        certs.subscriber_key.display(),
    );
    println!("The node speaks mutual TLS, with development certificates made in {data}/certs");
    println!(
        "(CN {SUBSCRIBER:?}: granted every view, operator role; CN {ADMIN:?}: admin, access.admins)"
    );
    println!("(ndc certs dev); every ndc command takes them from these variables:");
    println!("  export NDC_CA={ca} NDC_CERT={cert} NDC_KEY={key}");
    println!();
    println!("From a second terminal, while this runs (after that export):");
    println!("  ndc subscribe --addr {grpc} --view population.citizens --from snapshot");
    println!("  ndc views --addr {grpc}");
    println!("  ndc subscribe --addr {grpc} --view national.people             # golden records");
    println!(
        "  ndc subscribe --addr {grpc} --view national.people.conflicts   # agencies disagreeing"
    );
    println!("  ndc pipeline list --addr {grpc}");
    println!(
        "  NDC_CERT={} NDC_KEY={} ndc access list --addr {grpc}   # as the admin",
        certs.admin_cert.display(),
        certs.admin_key.display()
    );
    println!(
        "  grpcurl -cacert {ca} -cert {cert} -key {key} -d '{{\"view\":\"residence.addresses\",\"latest\":{{}}}}' {grpc} ndc.v1.Subscription/Subscribe"
    );
    println!("  kcat -P -b {bootstrap} -t {topic} -K '|'    # publish your own change events");
    println!();
    wait_for_rows(&grpc.to_string(), &tls, "population.citizens", opts.people).await;
    wait_for_rows(&grpc.to_string(), &tls, "national.people", opts.people).await;
    show_golden_record(&grpc.to_string(), &tls).await;
    println!(
        "Live subscription to population.citizens (snapshot first, then changes; Ctrl-C to stop):"
    );
    let mut snapshot_rows = 0u64;
    let printer = client::subscribe(
        SubscribeOptions {
            addr: grpc.to_string(),
            view: "population.citizens".into(),
            from: client::From::Snapshot,
            keys: Vec::new(),
            fields: Vec::new(),
            limit: None,
            progress: false,
            reconnect: true,
            tls: Some(tls.clone()),
            token: None,
        },
        move |line| {
            if line.get("op").and_then(|o| o.as_str()) == Some("read") {
                snapshot_rows += 1;
                if snapshot_rows <= 3 {
                    println!("{line}");
                } else if snapshot_rows == 4 {
                    println!("... (more snapshot rows)");
                }
                return true;
            }
            if line.get("snapshot_complete").is_some() {
                println!("--- snapshot complete: {snapshot_rows} rows; live changes follow ---");
                return true;
            }
            println!("{line}");
            true
        },
    );
    let stop = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => crate::node::wait_for_signal().await,
        }
    };
    let stopped = node.shutdown_token();
    tokio::select! {
        r = printer => r?,
        _ = stop => {}
        // On its own: a fatal error (returned below).
        _ = stopped.cancelled() => {}
    }
    generator.abort();
    stopped.cancel();
    node.wait().await?;
    drop(cluster);
    println!(
        "quickstart stopped; state kept in {}",
        opts.data_dir.display()
    );
    Ok(())
}

/// The registries a golden record is shown from (the example pipeline's).
const SHOWN_SOURCES: [&str; 3] = ["population", "residence", "health"];

/// Does this golden record (a change's `after`) have a contribution from
/// every registry in [`SHOWN_SOURCES`]?
fn merged_from_every_source(golden: &serde_json::Value) -> bool {
    let contributors = golden["_contributors"].as_array();
    SHOWN_SOURCES
        .iter()
        .all(|source| contributors.is_some_and(|c| c.iter().any(|x| x["source"] == *source)))
}

/// Prints one golden record with its provenance: the first one (from the
/// snapshot, else the live changes after it) that every registry has
/// contributed to. Facts of one person arrive from three feeds in any order,
/// so a record read too early may not have them all yet; this waits for
/// one that has (up to 30 s), rather than showing a half-merged record.
async fn show_golden_record(addr: &str, tls: &ClientTls) {
    let mut found = None;
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        client::subscribe(
            SubscribeOptions {
                addr: addr.to_string(),
                view: "national.people".into(),
                from: client::From::Snapshot,
                keys: Vec::new(),
                fields: Vec::new(),
                limit: None,
                progress: false,
                reconnect: false,
                tls: Some(tls.clone()),
                token: None,
            },
            |line| {
                if merged_from_every_source(&line["after"]) {
                    found = Some(line);
                    return false;
                }
                true
            },
        ),
    )
    .await;
    match found {
        Some(line) => {
            println!(
                "A golden record, merged from the population, health and residence registries:"
            );
            println!("golden record: {}", line["after"]);
            println!();
        }
        None => println!("(no golden record merged from all three registries within 30 s)"),
    }
}

/// Waits (up to 30 s) until the view holds `rows` rows, so that the demo
/// subscription starts with the agency's snapshot in place.
async fn wait_for_rows(addr: &str, tls: &ClientTls, view: &str, rows: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if let Ok(channel) = client::channel(addr, Some(tls)).await {
            let mut c = ndc_proto::v1::subscription_client::SubscriptionClient::new(channel);
            if let Ok(r) = c.list_views(ndc_proto::v1::ListViewsRequest {}).await
                && r.into_inner()
                    .views
                    .iter()
                    .any(|v| v.name == view && v.live_rows >= rows)
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Publishes a snapshot of `people` citizens and addresses, then a steady
/// stream of updates, inserts and deletes at `rate` per second.
async fn generate(producer: FutureProducer, people: u64, rate: u32) -> anyhow::Result<()> {
    let mut citizens = Feed::new(Table::Citizens, now_ms());
    let mut addresses = Feed::new(Table::Addresses, now_ms());
    let mut cards = Feed::new(Table::InsuranceCards, now_ms());
    let mut vehicles = Feed::new(Table::Vehicles, now_ms());
    let mut businesses = Feed::new(Table::Businesses, now_ms());
    let mut revisions: Vec<u32> = vec![0; people as usize];
    let send = |topic: &'static str, e: crate::quickstart::synthetic::Event| {
        let producer = producer.clone();
        async move {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(topic).key(e.key.as_slice());
            if let Some(v) = e.value.as_deref() {
                record = record.payload(v);
            }
            producer
                .send(record, Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)
        }
    };
    for i in 0..people {
        send(
            Table::Citizens.topic(),
            citizens.event('r', i, 0, Some(now_ms())),
        )
        .await?;
        send(
            Table::Addresses.topic(),
            addresses.event('r', i, 0, Some(now_ms())),
        )
        .await?;
        send(
            Table::InsuranceCards.topic(),
            cards.event('r', i, 0, Some(now_ms())),
        )
        .await?;
        send(
            Table::Vehicles.topic(),
            vehicles.event('r', i, 0, Some(now_ms())),
        )
        .await?;
        if 3 * i + 1 < people {
            send(
                Table::Businesses.topic(),
                businesses.event('r', i, 0, Some(now_ms())),
            )
            .await?;
        }
    }
    let mut rng = crate::quickstart::synthetic::Rng::new(now_ms() as u64);
    let mut next_person = people;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    loop {
        tick.tick().await;
        let roll = rng.below(100);
        if roll < 3 {
            // An agency bug: a change event cut short.
            let e = crate::quickstart::synthetic::Event {
                key: b"{\"person_id\":\"000000000000\"}".to_vec(),
                value: Some(b"{\"before\":null,\"after\":{\"person_id\":".to_vec()),
            };
            send(Table::Citizens.topic(), e).await?;
        } else if roll < 10 {
            send(
                Table::Citizens.topic(),
                citizens.event('c', next_person, 0, Some(now_ms())),
            )
            .await?;
            revisions.push(0);
            next_person += 1;
        } else if roll < 13 && !revisions.is_empty() {
            let i = rng.below(revisions.len() as u64);
            let rev = revisions[i as usize];
            send(
                Table::Citizens.topic(),
                citizens.event('d', i, rev, Some(now_ms())),
            )
            .await?;
            send(Table::Citizens.topic(), citizens.tombstone(i)).await?;
        } else if roll < 60 && !revisions.is_empty() {
            let i = rng.below(revisions.len() as u64);
            revisions[i as usize] += 1;
            let rev = revisions[i as usize];
            send(
                Table::Citizens.topic(),
                citizens.event('u', i, rev, Some(now_ms())),
            )
            .await?;
        } else if roll < 70 {
            let i = rng.below(people.max(1));
            send(
                Table::InsuranceCards.topic(),
                cards.event('u', i, 1 + rng.below(9) as u32, Some(now_ms())),
            )
            .await?;
        } else if roll < 75 {
            // Vehicles change hands (every fifth is sold from revision 2).
            let i = rng.below(people.max(1));
            send(
                Table::Vehicles.topic(),
                vehicles.event('u', i, 1 + rng.below(3) as u32, Some(now_ms())),
            )
            .await?;
        } else {
            let i = rng.below(people.max(1));
            send(
                Table::Addresses.topic(),
                addresses.event('u', i, 1 + rng.below(9) as u32, Some(now_ms())),
            )
            .await?;
        }
    }
}
