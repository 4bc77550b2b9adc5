//! Test fixtures of ndc, for `node/tests` and `loadtest` (dev only, never a
//! dependency of the product): a real Kafka-protocol broker on a loopback
//! port chosen at run time, node processes that keep their ports for their
//! whole life (handed to each start, never released for the node to pick
//! up), clusters of them, configurations, subscribers, and waiting on
//! conditions instead of fixed sleeps. Every fixture stops what it started
//! when dropped.
//!
//! Fixtures panic with a clear message when the environment fails them (a
//! test has nothing better to do); `try_` variants return errors for the
//! load test.

pub mod broker;
pub mod certs;
pub mod cluster;
pub mod config;
pub mod feed;
pub mod process;
pub mod subscribe;
pub mod wait;

pub use broker::{
    Broker, TANSU_RESUME_REWIND, header, kafka_partitioned_producer, publish, publish_event,
    publish_keyed,
};
pub use certs::{expired, make_certificates, make_client_certificate, openssl};
pub use cluster::{Cluster, bootstrap_list};
pub use config::node_config;
pub use process::{CpuCap, NodeProcess, Ports};
pub use subscribe::{
    changes, collect, fold, follow, follow_keys, last_positions, last_seq, read_until,
    seqs_after_snapshot, subscription, view_state, wait_rows,
};
pub use wait::{eventually, eventually_async, http_get, metric_value, metrics_text};
