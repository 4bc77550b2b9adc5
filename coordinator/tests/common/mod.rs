//! Helpers shared by the coordinator's integration tests.

use ndc_coordinator::{CoordinatorConfig, Peer};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A node's coordinator settings for tests: short intervals, plaintext,
/// every node holding every shard.
pub fn config(node_id: u64, bootstrap: Vec<Peer>, data_dir: PathBuf) -> CoordinatorConfig {
    CoordinatorConfig {
        node_id,
        bootstrap,
        data_dir,
        heartbeat_interval: Duration::from_millis(50),
        lease: Duration::from_millis(300),
        failure_timeout: Duration::from_millis(600),
        raft_heartbeat: Duration::from_millis(50),
        election_timeout: Duration::from_millis(200),
        peer_tls: None,
        replication_factor: 0,
        zone: None,
        snapshot_logs: 5000,
        recovery_lag: 10_000,
    }
}

/// Polls `f` every 20 ms until it holds; panics naming `what` after
/// `timeout`.
pub async fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}
