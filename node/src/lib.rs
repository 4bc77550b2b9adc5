//! An ndc node: consumes agency change feeds, keeps synchronized replicas in
//! RocksDB, and serves them to subscribers over gRPC.
//!
//! The binary (`ndc`) is a thin command line over this library; tests and
//! the load test start nodes through [`node::start`].

pub mod access;
pub mod access_api;
pub mod admin;
pub mod audit;
pub mod audit_api;
pub mod certs;
pub mod client;
pub mod cluster;
pub mod config;
pub mod dead_letter;
pub mod forward;
pub mod node;
pub mod pipeline;
pub mod quickstart;
pub mod runtime;
pub mod server;
pub mod sources;
pub mod spec;
pub mod synthetic;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod views;

pub use config::NodeConfig;
pub use node::{NodeAddrs, NodeHandle, start};

/// Wall-clock milliseconds since the Unix epoch (0 on a clock before it):
/// commit times, audit records, expiries.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
