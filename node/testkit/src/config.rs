//! Node configurations for tests: loopback, plaintext unless a test says
//! otherwise, short intervals, and the test broker's resume rewind.

use ndc_node::NodeConfig;
use ndc_node::config::{KafkaSection, KafkaSourceConfig, SourceConfig, ViewConfig};
use std::path::Path;
use std::time::Duration;

/// A node configuration on ports the system picks (`127.0.0.1:0`; a
/// [`crate::Ports`] overrides them for a process) with one Kafka view per
/// (name, topic, key columns). Views keyed by `person_id` name it as their
/// national ID, so the audit trail records whose rows went out.
pub fn node_config(
    data_dir: &Path,
    bootstrap: &str,
    views: &[(&str, &str, &[&str])],
) -> NodeConfig {
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut c = NodeConfig::default();
    c.node.data_dir = data_dir.to_path_buf();
    c.node.grpc_listen = loopback;
    c.node.http_listen = loopback;
    c.node.peer_listen = loopback;
    c.node.shutdown_grace = Duration::from_secs(10);
    // Plaintext on loopback; tests/grpc_tls.rs runs the listener with TLS.
    c.tls.insecure = true;
    c.kafka = Some(KafkaSection {
        bootstrap_servers: bootstrap.into(),
        metadata_refresh: Duration::from_millis(500),
        commit_interval: Duration::from_millis(500),
        resume_rewind_records: crate::TANSU_RESUME_REWIND,
        ..KafkaSection::default()
    });
    c.storage.sync_commits = false;
    c.subscriptions.progress_interval = Duration::from_millis(200);
    c.views = views
        .iter()
        .map(|(name, topic, keys)| ViewConfig {
            name: name.to_string(),
            key_columns: keys.iter().map(|k| k.to_string()).collect(),
            sources: vec![SourceConfig::Kafka(KafkaSourceConfig {
                topic: topic.to_string(),
                format: Default::default(),
            })],
            columns: Default::default(),
            national_id: keys.contains(&"person_id").then(|| "person_id".to_string()),
            shards: 1,
        })
        .collect();
    c
}
