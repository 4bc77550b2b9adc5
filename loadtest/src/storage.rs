//! The storage engine's own ceiling on this machine, printed beside the
//! file phase as the broker's ceiling is printed beside the broker phase:
//! RocksDB alone, in this process, with the node's budgets and durability
//! (WAL, fsync per batch of the node's batch size), writing pre-built
//! values — no decoding, no operator, no source.
//!
//! - `floor`: each input event's bytes stored once, uncompressed. Any design
//!   that keeps the events durably writes at least this.
//! - `node-bytes`: what the replica operator writes per event — the row
//!   (uncompressed, as the node's rows) and a change holding `before` and
//!   `after` (LZ4, as the node's change streams).

use crate::{Report, Workload};
use ndc_node::config::NodeConfig;
use ndc_node::quickstart::synthetic::Rng;
use rocksdb::{
    ColumnFamilyDescriptor, DB, DBCompressionType, Options, WriteBatch, WriteBufferManager,
    WriteOptions,
};
use std::path::Path;
use std::time::Instant;

/// Which bytes a storage ceiling writes per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageLoad {
    Floor,
    NodeBytes,
}

/// Distinct values cycled through: enough that compression sees realistic
/// data, few enough to build before the clock starts.
const POOL: usize = 20_000;

/// Writes `w` into a fresh RocksDB at `dir` and reports the rate.
pub fn storage_phase(dir: &Path, w: Workload, load: StorageLoad) -> anyhow::Result<Report> {
    let node = NodeConfig::default();
    let write_buffer = node.storage.write_buffer.0 as usize;
    let batch_records = node.pipeline.max_batch_records;

    // Values: the workload's own events (floor) or their `after` rows.
    let mut events = Vec::with_capacity(POOL);
    let mut rows = Vec::with_capacity(POOL);
    for (_, value) in w.events().take(POOL) {
        let v: serde_json::Value = serde_json::from_slice(&value)?;
        let after = v
            .pointer("/payload/after")
            .or_else(|| v.get("after"))
            .map(|a| a.to_string())
            .unwrap_or_default();
        rows.push(after);
        events.push(value);
    }
    anyhow::ensure!(!events.is_empty(), "empty workload");

    let manager = WriteBufferManager::new_write_buffer_manager(write_buffer, true);
    let db_opts = ndc_operators::state_db_options(&manager);
    let cf = |compression| {
        let mut o = Options::default();
        o.set_compression_type(compression);
        o.set_write_buffer_size((write_buffer / 4).max(4 << 20));
        o
    };
    let db = DB::open_cf_descriptors(
        &db_opts,
        dir,
        vec![
            ColumnFamilyDescriptor::new("rows", cf(DBCompressionType::None)),
            ColumnFamilyDescriptor::new("changelog", cf(DBCompressionType::Lz4)),
        ],
    )?;
    let rows_cf = db.cf_handle("rows").expect("opened above");
    let changes_cf = db.cf_handle("changelog").expect("opened above");
    // NDC_BENCH_STORAGE_WAL=off: the same writes without RocksDB's WAL,
    // durable only when memtables are flushed — the ceiling of a design that
    // made state durable by checkpoints (replaying the source after a crash)
    // instead of an fsync per batch.
    let wal = std::env::var("NDC_BENCH_STORAGE_WAL").map_or(true, |v| v != "off");
    let mut sync = WriteOptions::default();
    if wal {
        sync.set_sync(true);
    } else {
        sync.disable_wal(true);
    }

    let written_before = process_write_bytes();
    let cpu_before = process_cpu_seconds();
    let mut rng = Rng::new(w.seed);
    let started = Instant::now();
    let mut batch = WriteBatch::default();
    for n in 0..w.events {
        let key_index = if n < w.keys { n } else { rng.below(w.keys) };
        let key = format!("\0\0\0\u{1}{{\"person_id\":{key_index}}}");
        let i = n as usize % events.len();
        match load {
            StorageLoad::Floor => batch.put_cf(&rows_cf, key.as_bytes(), &events[i]),
            StorageLoad::NodeBytes => {
                // ~60 bytes of version beside the row, ~100 of key, op and
                // source position beside the change, as the node stores.
                let mut row = Vec::with_capacity(rows[i].len() + 64);
                row.extend_from_slice(&[0u8; 60]);
                row.extend_from_slice(rows[i].as_bytes());
                batch.put_cf(&rows_cf, key.as_bytes(), &row);
                let before = &rows[(i + 1) % rows.len()];
                let mut change = Vec::with_capacity(before.len() + rows[i].len() + 100);
                change.extend_from_slice(key.as_bytes());
                change.extend_from_slice(&[0u8; 80]);
                if n >= w.keys {
                    change.extend_from_slice(before.as_bytes());
                }
                change.extend_from_slice(rows[i].as_bytes());
                let mut seq = [0u8; 12];
                seq[3] = 1;
                seq[4..].copy_from_slice(&n.to_be_bytes());
                batch.put_cf(&changes_cf, seq, &change);
            }
        }
        if batch.len() >= batch_records * if load == StorageLoad::Floor { 1 } else { 2 } {
            db.write_opt(std::mem::take(&mut batch), &sync)?;
        }
    }
    db.write_opt(batch, &sync)?;
    let seconds = started.elapsed().as_secs_f64();
    let written = process_write_bytes().saturating_sub(written_before);
    // Background flushes and compactions included: every thread of this
    // process, which does nothing else meanwhile.
    let cpu_us_per_event = (process_cpu_seconds() - cpu_before) * 1e6 / w.events.max(1) as f64;
    let (phase, what) = match load {
        StorageLoad::Floor => ("storage-floor", "each event's bytes once"),
        StorageLoad::NodeBytes => ("storage-node", "row + change with before and after"),
    };
    let (phase, durability) = if wal {
        (
            phase.to_string(),
            format!("WAL + fsync per {batch_records} events"),
        )
    } else {
        (
            format!("{phase}-nowal"),
            "no WAL (durable at memtable flushes only)".to_string(),
        )
    };
    Ok(Report {
        phase,
        events: w.events,
        keys: w.keys,
        seconds,
        events_per_second: w.events as f64 / seconds,
        mean_event_bytes: 0,
        node_peak_rss_bytes: None,
        latency_ms: None,
        note: format!(
            "RocksDB alone: {what}, {durability}; {:.0} bytes written to disk and {cpu_us_per_event:.1} us of CPU per event",
            written as f64 / w.events.max(1) as f64
        ),
    })
}

/// CPU time of this process so far, all threads (Linux).
fn process_cpu_seconds() -> f64 {
    crate::cpu_seconds("self").unwrap_or(0.0)
}

/// Bytes this process has caused to be written to storage (Linux).
fn process_write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
