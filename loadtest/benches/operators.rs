//! The node's two CPU stages on their own, in one process and one thread
//! each, so that a change to either can be measured without a node, a
//! broker or a file source around it:
//!
//! - `decode`: Debezium JSON → [`Decoded`] (the file phase's decoder: key
//!   column `person_id`, 1 MiB record limit);
//! - `apply`: the replica operator over real RocksDB with the node's
//!   defaults (128 MiB block cache and memtables, fsync per batch), batches
//!   of 5,000 as the state writer makes them: prefetch, apply, write.
//!
//! Prints events/s, per-batch latency percentiles, CPU per event (all
//! threads, RocksDB's flushes and compactions included) and peak RSS.
//! The machine's speed swings by 2x from hour to hour; for A/B comparisons
//! that must not depend on it, run under callgrind, which counts
//! instructions: `./dev.sh bench-ops --callgrind` (see docs/performance.md).
//!
//! `cargo bench -p ndc-loadtest --bench operators -- [--events N] [--keys K] [--stage decode|apply|all|none] [--check-key-placement]`
//!
//! `--check-key-placement`: the apply stage also checks each event's key
//! against Kafka's default partitioner, as the state writer does for a
//! Kafka source (8 partitions, each event where murmur2 puts it).

use hdrhistogram::Histogram;
use ndc_loadtest::{Workload, cpu_seconds, peak_rss};
use ndc_operators::{
    Decoded, Decoder, DecoderConfig, Format, Position, Store, StoreConfig, ViewId,
};
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 5000;

struct Args {
    events: u64,
    keys: u64,
    stage: String,
    check_key_placement: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        events: 1_000_000,
        keys: 250_000,
        stage: "all".into(),
        check_key_placement: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            "--events" => a.events = it.next().unwrap_or_default().parse()?,
            "--keys" => a.keys = it.next().unwrap_or_default().parse()?,
            "--stage" => a.stage = it.next().unwrap_or_default(),
            "--check-key-placement" => a.check_key_placement = true,
            other => anyhow::bail!(
                "unknown argument {other:?}; use --events N --keys K --stage decode|apply|all|none \
                 [--check-key-placement]"
            ),
        }
    }
    anyhow::ensure!(
        ["decode", "apply", "all", "none"].contains(&a.stage.as_str()),
        "--stage must be decode, apply, all or none"
    );
    anyhow::ensure!(a.keys > 0 && a.events >= a.keys, "need events >= keys > 0");
    Ok(a)
}

/// What one stage did, as a line of the report.
struct Measured {
    events: u64,
    seconds: f64,
    cpu_seconds: f64,
    batches: Histogram<u64>,
}

impl Measured {
    fn print(&self, stage: &str, note: &str) {
        let ms = |q: f64| self.batches.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{stage:<8} {:>9} events {:>8.2} s {:>10.0} events/s  batch of {BATCH} p50 {:>7.2} ms p99 {:>7.2} ms max {:>7.2} ms  CPU {:>5.2} us/event  peak RSS {:>6.1} MiB  {note}",
            self.events,
            self.seconds,
            self.events as f64 / self.seconds,
            ms(0.5),
            ms(0.99),
            self.batches.max() as f64 / 1000.0,
            self.cpu_seconds * 1e6 / self.events.max(1) as f64,
            peak_rss("self").unwrap_or(0) as f64 / (1 << 20) as f64,
        );
    }
}

/// Runs `step` over `batches`, timing each.
fn measure<T>(batches: &[T], events: u64, mut step: impl FnMut(&T)) -> anyhow::Result<Measured> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let cpu = cpu_seconds("self").unwrap_or(0.0);
    let started = Instant::now();
    for b in batches {
        let t = Instant::now();
        step(b);
        hist.saturating_record(t.elapsed().as_micros() as u64);
    }
    Ok(Measured {
        events,
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: cpu_seconds("self").unwrap_or(0.0) - cpu,
        batches: hist,
    })
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let w = Workload {
        events: a.events,
        keys: a.keys,
        seed: 7,
    };
    let raw: Vec<(Vec<u8>, Vec<u8>)> = w.events().collect();
    let mean = raw.iter().map(|(_, v)| v.len()).sum::<usize>() / raw.len().max(1);
    println!(
        "ndc operator bench: {} events over {} keys, ~{mean} bytes each",
        a.events, a.keys
    );
    if a.stage == "none" {
        return Ok(());
    }
    let decoder = Decoder::new(DecoderConfig {
        format: Format::Debezium,
        key_columns: vec!["person_id".into()],
        max_record_bytes: 1 << 20,
        national_id: None,
    });
    let raw_batches: Vec<&[(Vec<u8>, Vec<u8>)]> = raw.chunks(BATCH).collect();
    let mut decoded: Vec<Vec<Decoded>> = Vec::with_capacity(raw_batches.len());
    let mut rejected = 0u64;
    let decode = measure(&raw_batches, a.events, |batch| {
        let mut out = Vec::with_capacity(batch.len());
        for (_, value) in batch.iter() {
            // As the file source: the line is the value, there is no key.
            match decoder.decode("", None, Some(value)) {
                Ok(d) => out.push(d),
                Err(_) => rejected += 1,
            }
        }
        decoded.push(out);
    })?;
    anyhow::ensure!(rejected == 0, "{rejected} generated events did not decode");
    if a.stage != "apply" {
        decode.print("decode", "one thread");
    }
    if a.stage == "decode" {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let view = "bench".to_string();
    let mut store = Store::open(&StoreConfig::new(dir.path()), std::slice::from_ref(&view))?;
    let id: ViewId = store
        .view_id(&view)
        .ok_or_else(|| anyhow::anyhow!("view not registered"))?;
    let stream: std::sync::Arc<str> = "export.ndjson".into();
    let mut offset = 0u64;
    let mut failed = None;
    let apply = measure(&decoded, a.events, |batch| {
        if failed.is_some() {
            return;
        }
        let mut txn = store.begin(0);
        let keys = batch.iter().filter_map(|d| match d {
            Decoded::Change(e) => e.key.as_ref().map(|k| (id, k)),
            _ => None,
        });
        let result = txn.prefetch(keys).and_then(|()| {
            for d in batch {
                let pos = Position::new(stream.clone(), offset);
                offset += 1;
                match d {
                    Decoded::Change(e) => {
                        ndc_operators::replica::apply(&mut txn, id, e, &pos)?;
                        if let (true, Some(key)) = (a.check_key_placement, &e.key) {
                            let p = ndc_operators::shard::kafka_partition(key.as_bytes(), 8);
                            txn.check_key_placement(id, key, p as i32, 8)?;
                        }
                    }
                    _ => {
                        txn.skip(id, &pos, ndc_operators::Outcome::Skipped);
                    }
                }
            }
            txn.commit().map(|_| ())
        });
        if let Err(e) = result {
            failed = Some(e);
        }
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    let (sst, memtables) = store.reader().size_bytes();
    apply.print(
        "apply",
        &format!(
            "one thread, RocksDB fsync per batch; {:.0} MiB in SST files, {:.0} MiB in memtables",
            sst as f64 / (1 << 20) as f64,
            memtables as f64 / (1 << 20) as f64
        ),
    );
    Ok(())
}
