//! Cluster mode of a node: starts the coordinator and tells the cluster which
//! source partitions exist.
//!
//! Stage reached (issue 3): membership, leader election, leases, the
//! scheduler and its assignments run for real; the node does not yet let
//! those assignments decide what its pipeline consumes (see
//! `docs/cluster.md`, "Status").

use crate::config::{ClusterSection, KafkaSection, NodeConfig, SourceConfig, parse_peer};
use crate::sources::client_config;
use anyhow::Context;
use ndc_coordinator::{Coordinator, CoordinatorConfig, Peer};
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Partition id of a Kafka source partition of a view.
pub fn partition_id(view: &str, topic: &str, partition: i32) -> String {
    format!("{view}/{topic}/{partition}")
}

/// Builds the coordinator's settings from the node's configuration.
pub fn coordinator_config(
    config: &NodeConfig,
    cluster: &ClusterSection,
    grpc: SocketAddr,
) -> anyhow::Result<CoordinatorConfig> {
    let node_id = cluster
        .resolve_node_id(&config.node.id)
        .context("cluster.node_id is required unless node.id ends in -N")?;
    let bootstrap = cluster
        .bootstrap
        .iter()
        .map(|e| parse_peer(e).map(|(id, addr)| Peer { id, addr }))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("cluster.bootstrap: {e}"))?;
    Ok(CoordinatorConfig {
        node_id,
        advertise_addr: cluster
            .advertise_addr
            .clone()
            .unwrap_or_else(|| grpc.to_string()),
        bootstrap,
        data_dir: config.node.data_dir.join("raft"),
        heartbeat_interval: cluster.heartbeat_interval,
        lease: cluster.lease,
        failure_timeout: cluster.failure_timeout,
        raft_heartbeat: cluster.raft_heartbeat,
        election_timeout: cluster.election_timeout,
    })
}

/// On the leader, registers the partitions of every Kafka source with the
/// cluster, and again when topics appear or grow.
pub async fn register_partitions(
    coordinator: Coordinator,
    config: NodeConfig,
    kafka: KafkaSection,
    shutdown: CancellationToken,
) {
    let topics: Vec<(String, String)> = config
        .views
        .iter()
        .flat_map(|v| {
            v.sources.iter().filter_map(|s| match s {
                SourceConfig::Kafka(k) => Some((v.name.clone(), k.topic.clone())),
                SourceConfig::File(_) => None,
            })
        })
        .collect();
    if topics.is_empty() {
        return;
    }
    let consumer: BaseConsumer = match client_config(&kafka).create() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot create a metadata client; partitions are not registered");
            return;
        }
    };
    let consumer = std::sync::Arc::new(consumer);
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut refresh = kafka.metadata_refresh;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        if !coordinator.is_leader() {
            continue;
        }
        let c = consumer.clone();
        let names: Vec<String> = topics.iter().map(|(_, t)| t.clone()).collect();
        let found = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for topic in names {
                if let Ok(md) = c.fetch_metadata(Some(&topic), Duration::from_secs(5)) {
                    for t in md
                        .topics()
                        .iter()
                        .filter(|t| t.name() == topic && t.error().is_none())
                    {
                        out.extend(t.partitions().iter().map(|p| (topic.clone(), p.id())));
                    }
                }
            }
            out
        })
        .await
        .unwrap_or_default();
        let mut partitions = Vec::new();
        for (view, topic) in &topics {
            for (t, p) in &found {
                if t == topic {
                    partitions.push(partition_id(view, topic, *p));
                }
            }
        }
        if partitions.is_empty() {
            continue;
        }
        match coordinator.register_partitions(partitions.clone()).await {
            Ok(()) => {
                info!(count = partitions.len(), "source partitions registered");
                // Found everything once: slow down to the metadata refresh.
                every = tokio::time::interval(refresh);
                every.tick().await;
                refresh = kafka.metadata_refresh;
            }
            Err(e) => warn!(error = %e, "cannot register partitions; will retry"),
        }
    }
}

/// Client side of `ndc cluster …`: any node answers, forwarding to the leader.
pub mod admin {
    use ndc_proto::cluster::cluster_client::ClusterClient;
    use ndc_proto::cluster::{
        AddNodeRequest, ClusterStatus, MembershipReply, RemoveNodeRequest, StatusRequest,
    };
    use serde_json::{Value, json};

    async fn connect(addr: &str) -> anyhow::Result<ClusterClient<tonic::transport::Channel>> {
        let endpoint = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        Ok(ClusterClient::connect(endpoint).await?)
    }

    pub async fn status(addr: &str) -> anyhow::Result<ClusterStatus> {
        Ok(connect(addr)
            .await?
            .status(StatusRequest {})
            .await?
            .into_inner())
    }

    pub async fn add_node(
        addr: &str,
        id: u64,
        node_addr: &str,
        learner_only: bool,
    ) -> anyhow::Result<MembershipReply> {
        Ok(connect(addr)
            .await?
            .add_node(AddNodeRequest {
                id,
                addr: node_addr.to_string(),
                learner_only,
            })
            .await?
            .into_inner())
    }

    pub async fn remove_node(addr: &str, id: u64) -> anyhow::Result<MembershipReply> {
        Ok(connect(addr)
            .await?
            .remove_node(RemoveNodeRequest { id })
            .await?
            .into_inner())
    }

    /// Status as JSON (for scripts and tests).
    pub fn status_json(s: &ClusterStatus) -> Value {
        json!({
            "answered_by": s.answered_by,
            "leader": s.leader_id,
            "term": s.term,
            "last_log_index": s.last_log_index,
            "applied_index": s.applied_index,
            "members": s.members.iter().map(|m| json!({
                "id": m.id, "addr": m.addr, "role": m.role, "live": m.live,
                "last_heartbeat_ms_ago": m.last_heartbeat_ms_ago,
            })).collect::<Vec<_>>(),
            "partitions": s.partitions.iter().map(|p| json!({
                "partition": p.partition, "owner": p.owner, "epoch": p.epoch, "running": p.running,
                "next_offset": p.next_offset, "lag": p.lag,
            })).collect::<Vec<_>>(),
        })
    }

    /// Status as a table for people.
    pub fn status_text(s: &ClusterStatus) -> String {
        use std::fmt::Write;
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "leader {}  term {}  answered by {}  applied index {}",
            opt(s.leader_id),
            s.term,
            s.answered_by,
            opt(s.applied_index)
        );
        let _ = writeln!(
            out,
            "\n{:<6} {:<24} {:<8} {:<5} LAST HEARTBEAT",
            "NODE", "ADDRESS", "ROLE", "LIVE"
        );
        for m in &s.members {
            let _ = writeln!(
                out,
                "{:<6} {:<24} {:<8} {:<5} {}",
                m.id,
                m.addr,
                m.role,
                if m.live { "yes" } else { "no" },
                m.last_heartbeat_ms_ago
                    .map_or("never".to_string(), |ms| format!("{ms} ms ago"))
            );
        }
        let _ = writeln!(
            out,
            "\n{:<48} {:<6} {:<6} {:<8} {:<12} LAG",
            "PARTITION", "OWNER", "EPOCH", "RUNNING", "NEXT OFFSET"
        );
        for p in &s.partitions {
            let _ = writeln!(
                out,
                "{:<48} {:<6} {:<6} {:<8} {:<12} {}",
                p.partition,
                opt(p.owner),
                p.epoch,
                if p.running { "yes" } else { "no" },
                opt(p.next_offset),
                opt(p.lag)
            );
        }
        out
    }
}
