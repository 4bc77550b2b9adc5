//! An ndc node: consumes agency change feeds, keeps synchronized replicas in
//! RocksDB, and serves them to subscribers over gRPC.
//!
//! The binary (`ndc`) is a thin command line over this library; tests and
//! the load test start nodes through [`node::start`]. Modules, from the
//! bottom up (each uses only those above it in this list):
//!
//! - [`config`]: the node's configuration (YAML, env), validated.
//! - [`telemetry`], [`lifecycle`], [`security`] (TLS, certificates, tokens),
//!   [`client`], [`kafka`] (what every Kafka client shares), [`views`] (the
//!   views a node serves and their commit watchers).
//! - [`cluster`]: Raft coordination, partition ownership, the change logs.
//! - [`writer`]: the state writer, the one task that changes RocksDB state,
//!   and its dead letters.
//! - [`sources`]: Kafka and file sources feeding the writer.
//! - [`pipelines`]: pipeline specs and the runtime that runs them (the data
//!   path: sources, re-keying, writer).
//! - [`serving`]: the gRPC services — subscriptions, access, audit,
//!   pipelines — and the masking filter.
//! - [`node`]: one node put together; [`quickstart`]: the embedded demo.

pub mod client;
pub mod cluster;
pub mod config;
pub mod kafka;
pub mod lifecycle;
pub mod node;
pub mod pipelines;
pub mod quickstart;
pub mod security;
pub mod serving;
pub mod sources;
pub mod telemetry;
pub mod views;
pub mod writer;

pub use config::NodeConfig;
pub use node::{NodeAddrs, NodeHandle, start};

/// Wall-clock milliseconds since the Unix epoch (0 on a clock before it):
/// commit times, audit records, expiries.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
