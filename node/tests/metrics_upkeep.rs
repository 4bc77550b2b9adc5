//! The metrics recorder folds histogram samples into buckets on its own,
//! whether or not anyone scrapes `/metrics` (its own process: it measures
//! the process's memory).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn histogram_samples_do_not_pile_up_when_nobody_scrapes() {
    ndc_node::telemetry::prometheus().unwrap();
    let histogram = metrics::histogram!(ndc_node::telemetry::metric::DELIVERY_LATENCY);
    let record = |n: usize| {
        for i in 0..n {
            histogram.record((i % 100) as f64 / 1000.0);
        }
    };
    // Until the background upkeep has folded what was recorded so far:
    // a round that began after the samples were (two more rounds ended).
    let folded = || {
        let seen = ndc_node::telemetry::upkeep_runs();
        let deadline = Instant::now() + Duration::from_secs(60);
        while ndc_node::telemetry::upkeep_runs() < seen + 2 {
            assert!(Instant::now() < deadline, "the metrics upkeep never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    record(500_000);
    folded();
    let before = resident_bytes();
    // 4M samples, 64 MiB as the exporter would hold them unfolded: a node
    // delivering changes that nobody scrapes. At most one batch (8 MiB) is
    // unfolded at a time, however slow the machine.
    for _ in 0..8 {
        record(500_000);
        folded();
    }
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 24 << 20,
        "resident memory grew by {} MiB for 4M histogram samples nobody scraped",
        grown >> 20
    );
    // Folded, not lost: a scrape still counts every sample.
    let text = ndc_node::telemetry::prometheus().unwrap().render();
    let count = text
        .lines()
        .find(|l| l.starts_with("ndc_subscription_delivery_latency_seconds_count"))
        .unwrap();
    assert!(count.ends_with(" 4500000"), "{count}");
}
