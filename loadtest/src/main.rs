//! `ndc-loadtest`: measures an ndc node (events/s, latency percentiles, peak
//! RSS). Run it through `./dev.sh bench`, which builds in release mode and
//! provides the test broker.

use clap::Parser;
use ndc_loadtest::{LatencyFeed, TOPIC, Workload, start_broker};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Load test of an ndc node")]
struct Args {
    /// Change events per run.
    #[arg(long, default_value_t = 2_000_000)]
    events: u64,
    /// Distinct primary keys (people).
    #[arg(long, default_value_t = 500_000)]
    keys: u64,
    /// Phases to run, comma separated: file, storage (RocksDB's own
    /// ceiling), delivery (one subscriber taking a filled view as fast as
    /// it can: not in the default set), broker, latency (through the broker), latency-file (from a
    /// followed file: the node's own latency), golden, cluster (not in the
    /// default set: three nodes on one machine), capacity (not in the
    /// default set: 1, 2 and 4 node processes each capped to the same CPU),
    /// golden-capacity (not in the default set: the golden pipeline in 8
    /// shards on 1, 2 and 4 capped node processes, `--people` people), writers (not in the default set: one node with 1, then 2 state
    /// writers over a view in 4 shards), join (not in the default set: time
    /// for a node to join a cluster holding `--keys` rows, copying a peer's
    /// state or replaying the change logs).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "file,storage,broker,latency,latency-file,golden"
    )]
    phases: Vec<String>,
    /// Events per second of the latency phase.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// People of the golden phase (five agencies' rows about them).
    #[arg(long, default_value_t = 100_000)]
    people: u64,
    /// Length of the latency phase.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Node counts of the capacity phase, run in turn in each round.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    capacity_nodes: Vec<u64>,
    /// Replication factors of the capacity phase (a view in 8 shards over
    /// the topic's 8 partitions, each shard held by that many nodes); 0:
    /// the view unsharded, every node applying everything.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    capacity_rf: Vec<usize>,
    /// CPU cap of each node process in the capacity phase, in cores.
    #[arg(long, default_value_t = 0.5)]
    capacity_cores: f64,
    /// Rounds of the capacity and writers phases (node or writer counts
    /// alternate within a round).
    #[arg(long, default_value_t = 2)]
    rounds: u64,
    /// Working directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&work)?;
    let w = Workload {
        events: args.events,
        keys: args.keys,
        seed: 1,
    };
    println!(
        "ndc load test: {} events over {} keys; {} cores; work dir {}",
        w.events,
        w.keys,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        work.display()
    );
    let fresh = |name: &str| -> anyhow::Result<PathBuf> {
        let d = work.join(name);
        if d.exists() {
            std::fs::remove_dir_all(&d)?;
        }
        std::fs::create_dir_all(&d)?;
        Ok(d)
    };
    if args.phases.iter().any(|p| p == "file") {
        ndc_loadtest::file_phase(&fresh("file")?, w).await?.print();
    }
    if args.phases.iter().any(|p| p == "delivery") {
        for r in ndc_loadtest::delivery_phase(&fresh("delivery")?, w).await? {
            r.print();
        }
    }
    if args.phases.iter().any(|p| p == "storage") {
        for load in [
            ndc_loadtest::StorageLoad::NodeBytes,
            ndc_loadtest::StorageLoad::Floor,
        ] {
            ndc_loadtest::storage_phase(&fresh("storage")?, w, load)?.print();
        }
    }
    if args.phases.iter().any(|p| p == "broker") {
        let broker = start_broker()?;
        broker.try_create_topic(TOPIC, 4).await?;
        ndc_loadtest::produce_phase(&broker, TOPIC, w)
            .await?
            .print();
        ndc_loadtest::consume_phase(&broker, TOPIC, w)?.print();
        ndc_loadtest::broker_phase(&fresh("broker")?, &broker, TOPIC, w)
            .await?
            .print();
    }
    if args.phases.iter().any(|p| p == "cluster") {
        let broker = start_broker()?;
        broker.try_create_topic(TOPIC, 6).await?;
        ndc_loadtest::produce_phase(&broker, TOPIC, w)
            .await?
            .print();
        let (report, _) = ndc_loadtest::capacity_phase(
            &fresh("cluster")?,
            &broker,
            TOPIC,
            w,
            3,
            None,
            None,
            "cluster",
        )
        .await?;
        report.print();
    }
    if args.phases.iter().any(|p| p == "capacity") {
        let broker = start_broker()?;
        broker.try_create_topic(TOPIC, 8).await?;
        ndc_loadtest::produce_phase(&broker, TOPIC, w)
            .await?
            .print();
        for &rf in &args.capacity_rf {
            let mut rates: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
            for round in 0..args.rounds {
                for &nodes in &args.capacity_nodes {
                    let (report, shares) = ndc_loadtest::capacity_phase(
                        &fresh(&format!("capacity-{nodes}"))?,
                        &broker,
                        TOPIC,
                        w,
                        nodes,
                        Some(args.capacity_cores),
                        (rf > 0).then_some((8, rf)),
                        &format!("rf{rf}r{round}n{nodes}"),
                    )
                    .await?;
                    report.print();
                    for share in &shares {
                        println!("  round {round} {}", serde_json::to_string(share)?);
                    }
                    rates
                        .entry(nodes)
                        .or_default()
                        .push(report.events_per_second);
                }
            }
            print_ratios(&format!("capacity rf {rf}"), "node(s)", &rates);
        }
    }
    if args.phases.iter().any(|p| p == "golden-capacity") {
        // The golden-record pipeline in 8 shards (topics of 8 partitions)
        // on 1, 2 and 4 capped node processes, per replication factor.
        let broker = start_broker()?;
        ndc_loadtest::golden_produce(&broker, args.people, 8)
            .await?
            .print();
        for &rf in args.capacity_rf.iter().filter(|rf| **rf > 0) {
            let mut rates: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
            for round in 0..args.rounds {
                for &nodes in &args.capacity_nodes {
                    let run = format!("g{rf}r{round}n{nodes}");
                    let (report, shares) = ndc_loadtest::golden_capacity_phase(
                        &fresh(&format!("golden-capacity-{nodes}"))?,
                        &broker,
                        args.people,
                        nodes,
                        args.capacity_cores,
                        8,
                        rf,
                        &run,
                    )
                    .await?;
                    report.print();
                    for share in &shares {
                        println!("  round {round} {}", serde_json::to_string(share)?);
                    }
                    rates
                        .entry(nodes)
                        .or_default()
                        .push(report.events_per_second);
                }
            }
            print_ratios(&format!("golden capacity rf {rf}"), "node(s)", &rates);
        }
    }
    if args.phases.iter().any(|p| p == "writers") {
        // One node, a view in 4 shards over 4 partitions, 1 then 2 state
        // writers, alternating within each round.
        let broker = start_broker()?;
        broker.try_create_topic(TOPIC, 4).await?;
        ndc_loadtest::produce_phase(&broker, TOPIC, w)
            .await?
            .print();
        let mut rates: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
        for round in 0..args.rounds {
            for writers in [1usize, 2] {
                let report = ndc_loadtest::writers_phase(
                    &fresh(&format!("writers-{writers}"))?,
                    &broker,
                    TOPIC,
                    w,
                    4,
                    writers,
                    &format!("r{round}w{writers}"),
                )
                .await?;
                report.print();
                rates
                    .entry(writers)
                    .or_default()
                    .push(report.events_per_second);
            }
        }
        print_ratios("writers", "writer(s)", &rates);
    }
    if args.phases.iter().any(|p| p == "join") {
        // A node joining a cluster that holds `--keys` rows: by copying a
        // peer's state, then by replaying the change logs (alternating).
        let broker = start_broker()?;
        broker.try_create_topic(TOPIC, 4).await?;
        ndc_loadtest::produce_phase(&broker, TOPIC, w)
            .await?
            .print();
        for round in 0..args.rounds {
            for copy in [true, false] {
                let run = format!("join{round}{}", if copy { "c" } else { "r" });
                ndc_loadtest::join_phase(&fresh(&run)?, &broker, TOPIC, w, copy, &run)
                    .await?
                    .print();
            }
        }
    }
    if args.phases.iter().any(|p| p == "golden") {
        let broker = start_broker()?;
        ndc_loadtest::golden_produce(&broker, args.people, 4)
            .await?
            .print();
        ndc_loadtest::golden_phase(&fresh("golden")?, &broker, args.people)
            .await?
            .print();
    }
    if args.phases.iter().any(|p| p == "latency") {
        let broker = start_broker()?;
        broker.try_create_topic(TOPIC, 4).await?;
        let keys = args.keys.min(100_000);
        ndc_loadtest::latency_phase(
            &fresh("latency")?,
            LatencyFeed::Broker {
                broker: &broker,
                topic: TOPIC,
            },
            keys,
            args.rate,
            args.seconds,
        )
        .await?
        .print();
    }
    if args.phases.iter().any(|p| p == "latency-file") {
        let keys = args.keys.min(100_000);
        ndc_loadtest::latency_phase(
            &fresh("latency-file")?,
            LatencyFeed::File,
            keys,
            args.rate,
            args.seconds,
        )
        .await?
        .print();
    }
    Ok(())
}

/// Prints each count's mean events/s and its ratio to the count of one
/// (runs alternated in one sitting).
fn print_ratios<K: std::fmt::Display + Ord + From<u8>>(
    phase: &str,
    unit: &str,
    rates: &std::collections::BTreeMap<K, Vec<f64>>,
) {
    let mean = |r: &Vec<f64>| r.iter().sum::<f64>() / r.len() as f64;
    let Some(one) = rates.get(&K::from(1)).map(mean) else {
        return;
    };
    for (count, r) in rates {
        println!(
            "{phase}: {count} {unit} {:.0} events/s = {:.2} x one",
            mean(r),
            mean(r) / one
        );
    }
}
