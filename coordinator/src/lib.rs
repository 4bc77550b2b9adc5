//! Cluster coordination of ndc nodes: who processes which source partition.
//!
//! The cluster, not Kafka's consumer-group protocol, assigns partitions.
//! Cluster metadata (members, partitions, owners, epochs) is replicated with
//! openraft ([`store`] keeps its log and state machine in RocksDB; [`network`]
//! carries its RPCs over tonic gRPC). The leader runs the scheduler:
//!
//! - every node sends a heartbeat to the leader every `heartbeat_interval`;
//!   an accepted heartbeat grants a lease of `lease` counted from its send
//!   time. The leader accepts only while a quorum acknowledged it recently;
//! - a node acts on a partition (commits state, publishes output) only while
//!   its lease is valid and its applied state names it owner with that epoch
//!   ([`Coordinator::may_act`]);
//! - the leader hands a partition to a new owner only when nobody can still
//!   act on it: the old owner reported it stopped after applying the change,
//!   or it has not been heard from for `failure_timeout` (≥ 2 × lease, so
//!   any lease it held has expired, even one granted by a previous leader).
//!
//! See `docs/cluster.md` for the protocol and each failure case.

pub mod identity;
mod network;
mod service;
pub mod state;
mod store;

pub use identity::PeerTls;
pub use service::{FORWARDED, forwarded};
pub use state::{
    Assignment, ClusterState, Command, Grant, KeyRoute, NodeId, PartitionId, Role, RowFilter,
    StoredSpec,
};
pub use store::Applied;

use ndc_proto::cluster::{
    HeartbeatReply, HeartbeatRequest, HeldPartition, LogPosition, ShardKeyPlacement,
};
use ndc_proto::state::KeyPlacement;
use openraft::async_runtime::WatchReceiver;
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// A member as Raft knows it: where its gRPC listener is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub addr: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

openraft::declare_raft_types!(
    /// openraft types of the ndc cluster.
    pub TypeConfig:
        D = Command,
        R = state::CommandReply,
        NodeId = NodeId,
        Node = Member,
);

type Raft = openraft::Raft<TypeConfig, store::StateMachine>;

/// A lazily connected channel to another node's peer listener
/// (`host:port`), for Raft RPCs, heartbeats and forwarded admin requests
/// alike; over mutual TLS with this node's certificate when `tls` is set.
pub fn peer_channel(
    addr: &str,
    connect_timeout: Duration,
    tls: Option<&PeerTls>,
) -> Result<tonic::transport::Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5));
    if let Some(tls) = tls {
        let config = tls
            .client_config()
            .map_err(|e| format!("cannot read the peer TLS files: {e}"))?;
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| format!("peer TLS: {e}"))?;
    }
    Ok(endpoint.connect_lazy())
}

/// Errors of the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt cluster state: {0}")]
    Corrupt(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("invalid cluster configuration: {0}")]
    Config(String),
    /// Only the leader writes to the replicated state.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<(NodeId, String)> },
}

/// A peer of the static bootstrap list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: NodeId,
    pub addr: String,
}

/// Settings of the coordinator (the node's `cluster` section).
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub node_id: NodeId,
    /// Initial voters. A node in this list initializes the cluster with all of
    /// them (safe on several nodes at once); a node not in it waits to be added.
    pub bootstrap: Vec<Peer>,
    /// Directory of the Raft database.
    pub data_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub lease: Duration,
    pub failure_timeout: Duration,
    pub raft_heartbeat: Duration,
    pub election_timeout: Duration,
    /// Mutual TLS between nodes; `None`: plaintext peer traffic.
    pub peer_tls: Option<PeerTls>,
    /// Holders per placed shard; 0: every node holds every shard.
    pub replication_factor: usize,
    /// This node's zone, sent in heartbeats (standbys go to other zones).
    pub zone: Option<String>,
    /// Raft log entries between snapshots of the cluster metadata; as many
    /// are kept behind each snapshot for followers that lag, older ones are
    /// purged (a follower further behind is sent the snapshot).
    pub snapshot_logs: u64,
    /// Records a standby may be behind a shard's furthest holder and still
    /// count as having its state (Kafka Streams' `acceptable.recovery.lag`).
    pub recovery_lag: u64,
}

impl CoordinatorConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if self.failure_timeout < self.lease * 2 {
            return Err(Error::Config(format!(
                "failure_timeout ({:?}) must be at least twice the lease ({:?})",
                self.failure_timeout, self.lease
            )));
        }
        if self.heartbeat_interval * 2 > self.lease {
            return Err(Error::Config(format!(
                "lease ({:?}) must be at least twice heartbeat_interval ({:?})",
                self.lease, self.heartbeat_interval
            )));
        }
        if self.snapshot_logs == 0 {
            return Err(Error::Config("snapshot_logs must be at least 1".into()));
        }
        if self.raft_heartbeat * 3 > self.election_timeout {
            return Err(Error::Config(format!(
                "election_timeout ({:?}) must be at least three raft heartbeats ({:?})",
                self.election_timeout, self.raft_heartbeat
            )));
        }
        Ok(())
    }
}

/// Metric names (Prometheus conventions).
pub mod metric {
    pub const RAFT_TERM: &str = "ndc_raft_term";
    pub const RAFT_IS_LEADER: &str = "ndc_raft_is_leader";
    pub const RAFT_LEADER_ID: &str = "ndc_raft_leader_id";
    pub const RAFT_APPLIED_INDEX: &str = "ndc_raft_applied_index";
    /// Highest log index known committed (saved by the log store).
    pub const RAFT_COMMIT_INDEX: &str = "ndc_raft_commit_index";
    pub const RAFT_LAST_LOG_INDEX: &str = "ndc_raft_last_log_index";
    pub const ASSIGNMENT_CHANGES: &str = "ndc_cluster_assignment_changes_total";
    pub const LIVE_NODES: &str = "ndc_cluster_live_nodes";
    /// Leader: placed shards with fewer live holders that have the shard's
    /// state than `replication_factor` (or than live nodes, if fewer).
    pub const UNDER_REPLICATED_SHARDS: &str = "ndc_cluster_under_replicated_shards";
    pub const OWNED_PARTITIONS: &str = "ndc_cluster_owned_partitions";
    /// Shards this node holds (applies the log of) by placement; with
    /// `replication_factor` 0 every shard, not counted here.
    pub const HELD_SHARDS: &str = "ndc_cluster_held_shards";
    /// Placement changes committed by the leader (rounds, not shards).
    pub const PLACEMENT_CHANGES: &str = "ndc_cluster_placement_changes_total";
    pub const FAILOVER_SECONDS: &str = "ndc_cluster_failover_seconds";
    pub const LEASE_VALID: &str = "ndc_cluster_lease_valid";
    /// Drains before a stop, by `outcome` (`moved`: every partition handed
    /// over; `timed_out`: not within the time given, the rest move after
    /// `failure_timeout` once the node is gone).
    pub const DRAINS: &str = "ndc_cluster_drains_total";
    /// Raft leadership handed to another voter by a leader that stops
    /// (`outcome`: `transferred`; `no_candidate`: no other live voter had
    /// the whole log; `timed_out`: none took over in time, the others elect
    /// once the leader's lease ends).
    pub const LEADER_TRANSFERS: &str = "ndc_cluster_leader_transfers_total";
    /// Peer requests refused because the caller's certificate does not name
    /// the node it claims to be (or any node).
    pub const PEER_REFUSED: &str = "ndc_cluster_peer_refused_total";
}

/// The views whose keyed reads may go to one shard (see
/// [`Coordinator::key_routes`]).
pub type KeyRoutes = Arc<BTreeMap<String, state::KeyRoute>>;

/// What the leader remembers of a node (not replicated: a new leader starts
/// from scratch and waits `failure_timeout` before trusting silence).
#[derive(Debug, Clone)]
struct NodeReport {
    accepted_at: Instant,
    applied_index: u64,
    held: Vec<HeldPartition>,
    /// The node is stopping and hands its partitions over.
    draining: bool,
    zone: String,
    /// Next change-log offset applied and committed, per shard held.
    log_positions: BTreeMap<String, u64>,
    /// Where each held shard's keys sit, as its records showed, and its
    /// last change when that was read.
    key_placements: BTreeMap<String, (KeyPlacement, u64)>,
}

#[derive(Debug, Default)]
struct LeaderView {
    term: u64,
    since: Option<Instant>,
    reports: HashMap<NodeId, NodeReport>,
    /// When a round of heartbeats to a quorum, started at this instant,
    /// last confirmed this node's leadership.
    confirmed_at: Option<Instant>,
    /// The routed views as last computed, and when: every node's heartbeat
    /// gets them, computed at most once per heartbeat interval.
    key_routes: Option<(Instant, ndc_proto::cluster::KeyRoutes)>,
}

/// Ids of the members (voters and learners) of the applied membership.
fn member_ids(applied: &Applied) -> BTreeSet<NodeId> {
    applied
        .membership
        .membership()
        .nodes()
        .map(|(id, _)| *id)
        .collect()
}

/// Placed shards with fewer live holders that have the state than the
/// factor asks (or than there are live nodes).
fn under_replicated(cluster: &ClusterState, liveness: &state::Liveness, factor: usize) -> usize {
    let want = factor.min(liveness.live.len());
    cluster
        .holders
        .iter()
        .filter(|(shard, holders)| {
            holders
                .iter()
                .filter(|n| liveness.live.contains(n) && liveness.has_state(cluster, shard, **n))
                .count()
                < want
        })
        .count()
}

/// Handle of a node's coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    config: CoordinatorConfig,
    raft: Raft,
    applied: watch::Receiver<Arc<Applied>>,
    /// Until when this node may act on what it owns.
    lease_until: Mutex<Option<Instant>>,
    /// What this node processes right now (set by the node, sent in heartbeats).
    held: Mutex<Vec<HeldPartition>>,
    /// Change-log positions this node has committed, per shard (set by the
    /// node, sent in heartbeats).
    log_positions: Mutex<Vec<LogPosition>>,
    /// Leader: where each shard's change log was last trimmed up to.
    log_starts: Mutex<BTreeMap<String, u64>>,
    /// What this node's shards' records showed of where their keys sit (set
    /// by the node, sent in heartbeats).
    key_placements: Mutex<Vec<ShardKeyPlacement>>,
    /// The views whose keys may be routed, as the leader last said.
    key_routes: watch::Sender<KeyRoutes>,
    /// Stopping: heartbeats ask the leader to move this node's partitions.
    draining: std::sync::atomic::AtomicBool,
    /// The leader's applied index in the first heartbeat reply this node
    /// got (`u64::MAX` before it), and whether this node has applied as
    /// much since (see [`Coordinator::caught_up`]).
    catch_up_to: std::sync::atomic::AtomicU64,
    caught_up: std::sync::atomic::AtomicBool,
    leader: Mutex<LeaderView>,
    /// Ends the background loops (heartbeats, scheduler, metrics).
    stop: tokio_util::sync::CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Coordinator {
    /// Opens the Raft state, starts Raft and the background tasks.
    pub async fn start(config: CoordinatorConfig) -> Result<Coordinator, Error> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir).map_err(|e| Error::Config(e.to_string()))?;
        let (log, machine) = store::open(&config.data_dir)?;
        let applied = machine.subscribe();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let raft_config = openraft::Config {
            cluster_name: "ndc".into(),
            heartbeat_interval: ms(config.raft_heartbeat),
            election_timeout_min: ms(config.election_timeout),
            election_timeout_max: ms(config.election_timeout) * 2,
            // A node that lost its data directory comes back with an empty
            // log; the leader re-replicates it instead of refusing it.
            allow_log_reversion: Some(true),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_logs),
            max_in_snapshot_log_to_keep: config.snapshot_logs,
            ..Default::default()
        }
        .validate()
        .map_err(|e| Error::Config(e.to_string()))?;
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network::Network {
                tls: config.peer_tls.clone(),
            },
            log,
            machine,
        )
        .await
        .map_err(|e| Error::Raft(e.to_string()))?;
        let coordinator = Coordinator {
            inner: Arc::new(Inner {
                config,
                raft,
                applied,
                lease_until: Mutex::new(None),
                held: Mutex::new(Vec::new()),
                log_positions: Mutex::new(Vec::new()),
                key_placements: Mutex::new(Vec::new()),
                key_routes: watch::channel(KeyRoutes::default()).0,
                log_starts: Mutex::new(BTreeMap::new()),
                draining: std::sync::atomic::AtomicBool::new(false),
                catch_up_to: std::sync::atomic::AtomicU64::new(u64::MAX),
                caught_up: std::sync::atomic::AtomicBool::new(false),
                leader: Mutex::new(LeaderView::default()),
                stop: tokio_util::sync::CancellationToken::new(),
                tasks: Mutex::new(Vec::new()),
            }),
        };
        coordinator.bootstrap().await?;
        let tasks = vec![
            tokio::spawn(coordinator.clone().heartbeats()),
            tokio::spawn(coordinator.clone().scheduler()),
            tokio::spawn(coordinator.clone().observe()),
        ];
        if let Ok(mut t) = coordinator.inner.tasks.lock() {
            *t = tasks;
        }
        Ok(coordinator)
    }

    async fn bootstrap(&self) -> Result<(), Error> {
        let c = &self.inner.config;
        if !c.bootstrap.iter().any(|p| p.id == c.node_id) {
            info!(
                node = c.node_id,
                "not in the bootstrap list: waiting to be added (ndc cluster add-node)"
            );
            return Ok(());
        }
        let initialized = self
            .inner
            .raft
            .is_initialized()
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        if initialized {
            return Ok(());
        }
        let members: BTreeMap<NodeId, Member> = c
            .bootstrap
            .iter()
            .map(|p| {
                (
                    p.id,
                    Member {
                        addr: p.addr.clone(),
                    },
                )
            })
            .collect();
        match self.inner.raft.initialize(members).await {
            Ok(()) => info!(
                node = c.node_id,
                voters = c.bootstrap.len(),
                "cluster initialized"
            ),
            // Another node was first, or this node already has a log.
            Err(e) => info!(node = c.node_id, reason = %e, "cluster not initialized here"),
        }
        Ok(())
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.config.node_id
    }

    /// tonic service of the Raft RPCs, to add to the node's gRPC server.
    pub fn raft_service(
        &self,
    ) -> ndc_proto::cluster::raft_server::RaftServer<network::RaftService> {
        ndc_proto::cluster::raft_server::RaftServer::new(network::RaftService {
            raft: self.inner.raft.clone(),
            tls: self.inner.config.peer_tls.clone(),
        })
        .max_decoding_message_size(64 << 20)
    }

    /// tonic service of heartbeats and cluster administration. On the peer
    /// listener (`peer`), it takes heartbeats and admin requests forwarded
    /// by other nodes; on the public one, admin requests (authorized by the
    /// node before they get here) and no heartbeats.
    pub fn cluster_service(
        &self,
        peer: bool,
    ) -> ndc_proto::cluster::cluster_server::ClusterServer<service::ClusterService> {
        ndc_proto::cluster::cluster_server::ClusterServer::new(service::ClusterService {
            coordinator: self.clone(),
            peer,
        })
    }

    /// TLS between nodes, if on.
    pub fn peer_tls(&self) -> Option<&PeerTls> {
        self.inner.config.peer_tls.as_ref()
    }

    /// The applied cluster state, updated on every applied Raft entry.
    pub fn watch(&self) -> watch::Receiver<Arc<Applied>> {
        self.inner.applied.clone()
    }

    /// Registers partitions the cluster must process (through the leader).
    pub async fn register_partitions(&self, partitions: Vec<PartitionId>) -> Result<(), Error> {
        let all_known = {
            let applied = self.inner.applied.borrow();
            partitions
                .iter()
                .all(|p| applied.cluster.partitions.contains(p))
        };
        if all_known {
            return Ok(());
        }
        self.propose(Command::RegisterPartitions { partitions })
            .await
            .map(|_| ())
    }

    /// Writes a command to the replicated state; only on the leader (else
    /// [`Error::NotLeader`], naming the leader to forward to).
    ///
    /// A leader just elected accepts writes once a quorum has acknowledged
    /// it (its lease); until then, at most `election_timeout`, the write
    /// waits here instead of failing (it was not appended, so a retry
    /// cannot apply it twice).
    pub async fn propose(&self, command: Command) -> Result<state::CommandReply, Error> {
        use openraft::error::{ClientWriteError, ForwardReason, RaftError};
        let deadline = Instant::now() + self.inner.config.election_timeout;
        loop {
            match self.inner.raft.client_write(command.clone()).await {
                Ok(r) => return Ok(r.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))
                    if f.reason == ForwardReason::LeaseExpired
                        && self.is_leader()
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(self.inner.config.raft_heartbeat / 4).await;
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    return Err(Error::NotLeader {
                        leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
                    });
                }
                Err(e) => return Err(Error::Raft(e.to_string())),
            }
        }
    }

    /// Forgets partitions (see [`Command::UnregisterPartitions`]).
    pub async fn unregister_partitions(&self, partitions: Vec<PartitionId>) -> Result<(), Error> {
        if partitions.is_empty() {
            return Ok(());
        }
        self.propose(Command::UnregisterPartitions { partitions })
            .await
            .map(|_| ())
    }

    /// Whether this node may commit state or publish output for `partition`
    /// under `epoch` right now: checked before every commit and publish.
    pub fn may_act(&self, partition: &str, epoch: u64) -> bool {
        if !self.lease_valid() {
            return false;
        }
        let applied = self.inner.applied.borrow();
        applied
            .cluster
            .owner(partition)
            .is_some_and(|a| a.owner == Some(self.node_id()) && a.epoch == epoch)
    }

    /// Whether this node's lease is valid now.
    pub fn lease_valid(&self) -> bool {
        self.inner
            .lease_until
            .lock()
            .ok()
            .and_then(|l| *l)
            .is_some_and(|until| Instant::now() < until)
    }

    /// Asks the leader (in the next heartbeats) to hand this node's
    /// partitions to other nodes, and to give it none, while `draining`;
    /// see [`Coordinator::drain`].
    pub fn set_draining(&self, draining: bool) {
        self.inner
            .draining
            .store(draining, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this node has applied the replicated state as far as the
    /// leader had when it first heard from it: until then its grants and
    /// specs may be behind (a node that joined, or lost its disk), and a
    /// refusal by them is "not yet", not "no". Stays true once reached.
    pub fn caught_up(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.inner.caught_up.load(Relaxed) {
            return true;
        }
        let target = self.inner.catch_up_to.load(Relaxed);
        let reached = target != u64::MAX && self.applied_index() >= target;
        if reached {
            self.inner.caught_up.store(true, Relaxed);
        }
        reached
    }

    pub fn is_draining(&self) -> bool {
        self.inner
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Hands this node's partitions to other nodes before it stops (a
    /// rolling restart): asks for it in the heartbeats, then waits until the
    /// applied state gives this node none, at most `timeout`. Returns
    /// whether they all moved (not when no other node could take them).
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.set_draining(true);
        let mut applied = self.inner.applied.clone();
        let me = self.node_id();
        let wait = async {
            loop {
                if applied.borrow_and_update().cluster.owned_by(me).is_empty() {
                    return;
                }
                if applied.changed().await.is_err() {
                    return;
                }
            }
        };
        let moved = tokio::time::timeout(timeout, wait).await.is_ok()
            && self.inner.applied.borrow().cluster.owned_by(me).is_empty();
        metrics::counter!(metric::DRAINS, "outcome" => if moved { "moved" } else { "timed_out" })
            .increment(1);
        moved
    }

    /// Hands Raft leadership to another voter before this node stops, so the
    /// cluster has a leader at once instead of after the old one's lease
    /// (`election_timeout` × 2) and an election. The other voter chosen is a
    /// live one (heard from within `lease`), not draining, with the most log
    /// replicated; it must have the whole log, so this waits (within
    /// `timeout`) until it has. Returns `None` when this node is not the
    /// leader, else whether another node leads now.
    pub async fn hand_over_leadership(&self, timeout: Duration) -> Option<bool> {
        let deadline = tokio::time::Instant::now() + timeout;
        let me = self.node_id();
        let mut rx = self.inner.raft.metrics();
        let metrics = rx.borrow_watched().clone();
        if metrics.state != ServerState::Leader {
            return None;
        }
        let outcome = |outcome: &'static str| {
            metrics::counter!(metric::LEADER_TRANSFERS, "outcome" => outcome).increment(1);
        };
        let candidates: BTreeSet<NodeId> = {
            let Ok(view) = self.inner.leader.lock() else {
                outcome("no_candidate");
                return Some(false);
            };
            let now = Instant::now();
            metrics
                .membership_config
                .membership()
                .voter_ids()
                .filter(|id| *id != me)
                .filter(|id| {
                    view.reports.get(id).is_some_and(|r| {
                        !r.draining && now.duration_since(r.accepted_at) < self.inner.config.lease
                    })
                })
                .collect()
        };
        // The candidate with the most log; wait until one has all of it.
        let target = loop {
            let m = rx.borrow_watched().clone();
            if m.state != ServerState::Leader {
                // Lost leadership meanwhile: someone else leads (or will).
                return Some(m.current_leader.is_some_and(|l| l != me));
            }
            let last = m.last_log_index;
            let best = m.replication.as_ref().and_then(|r| {
                r.iter()
                    .filter(|(id, _)| candidates.contains(id))
                    .map(|(id, matched)| (matched.map(|l| l.index), *id))
                    .max()
            });
            match best {
                Some((matched, id)) if matched >= last => break id,
                Some(_) => {}
                None => {
                    warn!("no other live voter to hand Raft leadership to");
                    outcome("no_candidate");
                    return Some(false);
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                warn!("no other voter had the whole Raft log in time; not handing over leadership");
                outcome("no_candidate");
                return Some(false);
            }
        };
        info!(to = target, "handing Raft leadership over");
        if let Err(e) = self.inner.raft.trigger().transfer_leader(target).await {
            warn!(error = %e, "Raft leadership transfer not started");
            outcome("timed_out");
            return Some(false);
        }
        let handed = async {
            loop {
                let m = rx.borrow_watched().clone();
                if m.current_leader.is_some_and(|l| l != me) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        // One election: the target votes at once and the others, told of
        // the handover, grant it. If it does not (it died meanwhile, or runs
        // a build without transfers), this leader writes nothing more, so
        // it is not kept waiting long.
        let deadline =
            deadline.min(tokio::time::Instant::now() + self.inner.config.election_timeout * 4);
        let moved = tokio::time::timeout_at(deadline, handed).await.is_ok()
            && rx.borrow_watched().current_leader.is_some_and(|l| l != me);
        outcome(if moved { "transferred" } else { "timed_out" });
        Some(moved)
    }

    /// Tells the leader (in the next heartbeats) what this node processes.
    pub fn set_held(&self, held: Vec<HeldPartition>) {
        if let Ok(mut h) = self.inner.held.lock() {
            *h = held;
        }
    }

    /// Tells the leader (in the next heartbeats) how far this node has
    /// applied and committed each shard's change log.
    pub fn set_log_positions(&self, positions: &BTreeMap<String, u64>) {
        if let Ok(mut p) = self.inner.log_positions.lock() {
            *p = positions
                .iter()
                .map(|(shard, next_offset)| LogPosition {
                    shard: shard.clone(),
                    next_offset: *next_offset,
                })
                .collect();
        }
    }

    /// Tells the leader (in the next heartbeats) what each shard this node
    /// holds showed of where its keys sit, with the shard's last change
    /// when that was read.
    pub fn set_key_placements(&self, placements: &BTreeMap<String, (KeyPlacement, u64)>) {
        if let Ok(mut p) = self.inner.key_placements.lock() {
            *p = placements
                .iter()
                .map(|(shard, (placement, last_seq))| ShardKeyPlacement {
                    shard: shard.clone(),
                    placement: Some(*placement),
                    last_seq: *last_seq,
                })
                .collect();
        }
    }

    /// The views whose keyed reads may go to the key's shard alone (see
    /// [`ndc_operators::shard::key_route`]), as the leader last said. Empty until it has: every keyed read then reads
    /// every shard.
    pub fn key_routes(&self) -> watch::Receiver<KeyRoutes> {
        self.inner.key_routes.subscribe()
    }

    /// Leader: up to where each of `shards`' change logs may be trimmed —
    /// the lowest position its holders (every member, for a shard not
    /// placed) have reported to this leader. A shard with a holder that has
    /// not reported yet (new, down since this leader began) is left out:
    /// it may still need the whole log. `None` when this node is not a
    /// leader whose leadership a quorum confirmed recently.
    pub fn log_trim_points(&self, shards: &BTreeSet<String>) -> Option<BTreeMap<String, u64>> {
        let metrics = self.inner.raft.metrics().borrow_watched().clone();
        if metrics.state != ServerState::Leader {
            return None;
        }
        let applied = self.inner.applied.borrow().clone();
        let members = member_ids(&applied);
        let view = self.inner.leader.lock().ok()?;
        let confirmed = view
            .confirmed_at
            .is_some_and(|t| t.elapsed() < self.inner.config.lease);
        if view.term != metrics.current_term || !confirmed {
            return None;
        }
        let positions: BTreeMap<NodeId, &BTreeMap<String, u64>> = view
            .reports
            .iter()
            .map(|(n, r)| (*n, &r.log_positions))
            .collect();
        Some(state::log_trim_points(
            &applied.cluster,
            &members,
            &positions,
            shards,
        ))
    }

    /// Leader: the change log of `shard` now starts at `offset` (for status).
    pub fn record_log_start(&self, shard: &str, offset: u64) {
        if let Ok(mut starts) = self.inner.log_starts.lock() {
            starts.insert(shard.to_string(), offset);
        }
    }

    /// Stops the background loops and Raft (for an orderly node shutdown);
    /// returns once they have ended.
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        let mut tasks = match self.inner.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for t in &mut tasks {
            match tokio::time::timeout(Duration::from_secs(5), &mut *t).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "a coordinator task ended abnormally"),
                Err(_) => warn!("a coordinator task did not end within 5 s of shutdown"),
            }
        }
        // Kept, finished or not, for `background_tasks`.
        if let Ok(mut t) = self.inner.tasks.lock() {
            *t = tasks;
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            warn!(error = %e, "Raft did not shut down cleanly");
        }
    }

    /// Background loops still running (0 after [`Coordinator::shutdown`]).
    pub fn background_tasks(&self) -> usize {
        self.inner
            .tasks
            .lock()
            .map_or(0, |t| t.iter().filter(|t| !t.is_finished()).count())
    }

    /// Ids of the cluster's members, as this node has applied them.
    pub fn members(&self) -> BTreeSet<NodeId> {
        member_ids(&self.inner.applied.borrow())
    }

    /// The peer address of a member.
    pub fn member_addr(&self, id: NodeId) -> Option<String> {
        self.leader_addr(id)
    }

    fn leader_addr(&self, leader: NodeId) -> Option<String> {
        let applied = self.inner.applied.borrow();
        applied
            .membership
            .membership()
            .get_node(&leader)
            .map(|m| m.addr.clone())
    }

    /// Sends a heartbeat to the leader every `heartbeat_interval`, renewing
    /// this node's lease when accepted.
    async fn heartbeats(self) {
        let interval = self.inner.config.heartbeat_interval;
        let mut clients: HashMap<
            String,
            ndc_proto::cluster::cluster_client::ClusterClient<tonic::transport::Channel>,
        > = HashMap::new();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let sent = Instant::now();
            let request = HeartbeatRequest {
                node_id: self.node_id(),
                applied_index: self.applied_index(),
                held: self
                    .inner
                    .held
                    .lock()
                    .map(|h| h.clone())
                    .unwrap_or_default(),
                draining: self.is_draining(),
                zone: self.inner.config.zone.clone().unwrap_or_default(),
                log_positions: self
                    .inner
                    .log_positions
                    .lock()
                    .map(|p| p.clone())
                    .unwrap_or_default(),
                key_placements: self
                    .inner
                    .key_placements
                    .lock()
                    .map(|p| p.clone())
                    .unwrap_or_default(),
            };
            let metrics = self.inner.raft.metrics().borrow_watched().clone();
            let reply = match metrics.current_leader {
                None => None,
                Some(leader) if leader == self.node_id() => Some(self.accept_heartbeat(request)),
                Some(leader) => match self.leader_addr(leader) {
                    None => None,
                    Some(addr) => {
                        let client = match clients.get(&addr) {
                            Some(c) => c.clone(),
                            None => {
                                let Ok(channel) = peer_channel(
                                    &addr,
                                    Duration::from_millis(500),
                                    self.inner.config.peer_tls.as_ref(),
                                ) else {
                                    continue;
                                };
                                let c =
                                    ndc_proto::cluster::cluster_client::ClusterClient::new(channel);
                                clients.insert(addr.clone(), c.clone());
                                c
                            }
                        };
                        let mut client = client;
                        let wait = interval.max(Duration::from_millis(100));
                        let mut req = tonic::Request::new(request);
                        req.set_timeout(wait);
                        // Enforced here too: a leader that accepts the
                        // connection but never answers (frozen) must not
                        // stop this loop.
                        match tokio::time::timeout(wait, client.heartbeat(req)).await {
                            Ok(Ok(r)) => Some(r.into_inner()),
                            Ok(Err(_)) | Err(_) => None,
                        }
                    }
                },
            };
            if let Some(reply) = &reply
                && reply.accepted
            {
                use std::sync::atomic::Ordering::Relaxed;
                let _ = self.inner.catch_up_to.compare_exchange(
                    u64::MAX,
                    reply.leader_applied_index,
                    Relaxed,
                    Relaxed,
                );
            }
            if let Some(routes) = reply
                .as_ref()
                .filter(|r| r.accepted)
                .and_then(|r| r.key_routes.as_ref())
            {
                let routes: BTreeMap<String, state::KeyRoute> = routes
                    .routes
                    .iter()
                    .map(|r| {
                        let route = state::KeyRoute {
                            partitions: r.partitions,
                            verified_seqs: r.verified_seqs.clone(),
                        };
                        (r.view.clone(), route)
                    })
                    .collect();
                self.inner.key_routes.send_if_modified(|known| {
                    let changed = **known != routes;
                    if changed {
                        *known = Arc::new(routes);
                    }
                    changed
                });
            }
            if let Some(reply) = reply
                && reply.accepted
                && let Ok(mut lease) = self.inner.lease_until.lock()
            {
                let granted = Duration::from_millis(reply.lease_ms).min(self.inner.config.lease);
                *lease = Some(sent + granted);
            }
            metrics::gauge!(metric::LEASE_VALID).set(if self.lease_valid() { 1.0 } else { 0.0 });
        }
    }

    fn applied_index(&self) -> u64 {
        self.inner
            .applied
            .borrow()
            .last_applied
            .map(|l| l.index)
            .unwrap_or(0)
    }

    /// Leader side of a heartbeat.
    pub(crate) fn accept_heartbeat(&self, request: HeartbeatRequest) -> HeartbeatReply {
        let metrics = self.inner.raft.metrics().borrow_watched().clone();
        let leader_addr = metrics
            .current_leader
            .and_then(|l| self.leader_addr(l))
            .unwrap_or_default();
        let mut reply = HeartbeatReply {
            accepted: false,
            leader_id: metrics.current_leader,
            leader_addr,
            term: metrics.current_term,
            lease_ms: 0,
            leader_applied_index: metrics.last_applied.map_or(0, |l| l.index),
            key_routes: None,
        };
        let is_leader = metrics.state == ServerState::Leader;
        let is_member = metrics
            .membership_config
            .membership()
            .get_node(&request.node_id)
            .is_some();
        if !(is_leader && is_member) {
            return reply;
        }
        let mut view = match self.inner.leader.lock() {
            Ok(v) => v,
            Err(_) => return reply,
        };
        self.reset_if_new_term(&mut view, metrics.current_term);
        // A leader cut off from its quorum must not extend anyone's lease:
        // its leadership must have been confirmed by a quorum recently.
        let confirmed = view
            .confirmed_at
            .is_some_and(|t| t.elapsed() < self.inner.config.lease);
        if !confirmed {
            return reply;
        }
        view.reports.insert(
            request.node_id,
            NodeReport {
                accepted_at: Instant::now(),
                applied_index: request.applied_index,
                held: request.held,
                draining: request.draining,
                zone: request.zone,
                log_positions: request
                    .log_positions
                    .into_iter()
                    .map(|p| (p.shard, p.next_offset))
                    .collect(),
                key_placements: request
                    .key_placements
                    .into_iter()
                    .filter_map(|p| Some((p.shard, (p.placement?, p.last_seq))))
                    .collect(),
            },
        );
        reply.key_routes = self.known_key_routes(&mut view);
        reply.accepted = true;
        reply.lease_ms = u64::try_from(self.inner.config.lease.as_millis()).unwrap_or(u64::MAX);
        reply
    }

    /// Leader: the views whose keys may be routed, from what the holders
    /// of their shards reported — once every member has reported to this
    /// leader, or `failure_timeout` has passed since it began (a member
    /// still silent is down, and the other holders of its shards apply the
    /// same log). Before that `None`: nodes keep what they had rather
    /// than drop a route only because a new leader has not heard of it.
    fn known_key_routes(&self, view: &mut LeaderView) -> Option<ndc_proto::cluster::KeyRoutes> {
        if let Some((at, routes)) = &view.key_routes
            && at.elapsed() < self.inner.config.heartbeat_interval
        {
            return Some(routes.clone());
        }
        let applied = self.inner.applied.borrow().clone();
        let members = member_ids(&applied);
        let heard_all = members.iter().all(|m| view.reports.contains_key(m));
        let waited = view
            .since
            .is_some_and(|t| t.elapsed() >= self.inner.config.failure_timeout);
        if !(heard_all || waited) {
            return None;
        }
        let reports: BTreeMap<NodeId, &BTreeMap<String, (KeyPlacement, u64)>> = view
            .reports
            .iter()
            .map(|(n, r)| (*n, &r.key_placements))
            .collect();
        let routes = ndc_proto::cluster::KeyRoutes {
            routes: state::key_routes(&applied.cluster, &members, &reports)
                .into_iter()
                .map(|(view, r)| ndc_proto::cluster::KeyRoute {
                    view,
                    partitions: r.partitions,
                    verified_seqs: r.verified_seqs,
                })
                .collect(),
        };
        view.key_routes = Some((Instant::now(), routes.clone()));
        Some(routes)
    }

    fn reset_if_new_term(&self, view: &mut LeaderView, term: u64) {
        if view.term != term || view.since.is_none() {
            // Where logs start is known again once this leader trims them.
            if let Ok(mut starts) = self.inner.log_starts.lock() {
                starts.clear();
            }
            *view = LeaderView {
                term,
                since: Some(Instant::now()),
                reports: HashMap::new(),
                confirmed_at: None,
                key_routes: None,
            };
        }
    }

    /// The leader's periodic scheduling round.
    async fn scheduler(self) {
        let mut ticker = tokio::time::interval(self.inner.config.heartbeat_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let metrics = self.inner.raft.metrics().borrow_watched().clone();
            if metrics.state != ServerState::Leader {
                continue;
            }
            // Confirm leadership with a quorum; the confirmation counts from
            // when the round started (conservative).
            let started = Instant::now();
            let confirm = tokio::time::timeout(
                self.inner.config.lease,
                self.inner
                    .raft
                    .ensure_linearizable(openraft::ReadPolicy::ReadIndex),
            )
            .await;
            if let Ok(mut view) = self.inner.leader.lock() {
                self.reset_if_new_term(&mut view, metrics.current_term);
                if matches!(confirm, Ok(Ok(_))) {
                    view.confirmed_at = Some(started);
                }
            }
            let applied = self.inner.applied.borrow().clone();
            let (liveness, dead_since) = {
                let Ok(mut view) = self.inner.leader.lock() else {
                    continue;
                };
                self.reset_if_new_term(&mut view, metrics.current_term);
                self.liveness(&view, &applied)
            };
            metrics::gauge!(metric::LIVE_NODES).set(liveness.live.len() as f64);
            metrics::gauge!(metric::UNDER_REPLICATED_SHARDS).set(under_replicated(
                &applied.cluster,
                &liveness,
                self.inner.config.replication_factor,
            ) as f64);
            // Placement first; the owners are planned on the state it makes.
            let mut cluster = applied.cluster.clone();
            // Every shard fed by registered partitions: configured views'
            // and pipelines' (a merge's derived views follow its
            // contributions' shards, see the node's views).
            let placed: BTreeSet<String> = cluster
                .partitions
                .iter()
                .map(|p| state::shard_of(p).to_string())
                .collect();
            let placement = state::place(
                &cluster,
                &placed,
                &liveness,
                self.inner.config.replication_factor,
            );
            if !placement.is_empty() {
                info!(changes = ?placement, live = ?liveness.live, "placement changes");
                let command = Command::Place { changes: placement };
                match self.propose(command.clone()).await {
                    Ok(_) => {
                        metrics::counter!(metric::PLACEMENT_CHANGES).increment(1);
                        cluster.apply(&command, 0);
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot commit placement changes");
                        continue;
                    }
                }
            }
            let changes = state::plan(&cluster, &liveness);
            if changes.is_empty() {
                continue;
            }
            info!(?changes, live = ?liveness.live, "assignment changes");
            let failovers: Vec<f64> = changes
                .iter()
                .filter_map(|(p, owner)| {
                    owner
                        .and(dead_since.get(p))
                        .map(|t| t.elapsed().as_secs_f64())
                })
                .collect();
            let n = changes.len() as u64;
            match self.propose(Command::Assign { changes }).await {
                Ok(_) => {
                    metrics::counter!(metric::ASSIGNMENT_CHANGES).increment(n);
                    for s in failovers {
                        metrics::histogram!(metric::FAILOVER_SECONDS).record(s);
                    }
                }
                Err(e) => warn!(error = %e, "cannot commit assignment changes"),
            }
        }
    }

    /// Live nodes and released partitions, from the leader's reports. Also
    /// returns, for partitions whose owner was lost, when it was last heard.
    fn liveness(
        &self,
        view: &LeaderView,
        applied: &Applied,
    ) -> (state::Liveness, HashMap<PartitionId, Instant>) {
        let now = Instant::now();
        let timeout = self.inner.config.failure_timeout;
        let since = view.since.unwrap_or(now);
        let members = member_ids(applied);
        // Last time each node could have renewed a lease: its last accepted
        // heartbeat, or, never heard by this leader, when this leader began.
        let last_heard = |id: NodeId| {
            view.reports
                .get(&id)
                .map(|r| r.accepted_at)
                .unwrap_or(since)
                .max(since)
        };
        // A node this leader has heard from is silent after `failure_timeout`
        // without heartbeats. One it never heard from can only hold a lease
        // granted by an earlier leader, and those end within 2 × lease of
        // this leader's start (docs/cluster.md, "Protocol of a move").
        let grace = (self.inner.config.lease * 2).min(timeout);
        let silent = |id: NodeId| match view.reports.get(&id) {
            Some(_) => now.duration_since(last_heard(id)) >= timeout,
            None => now.duration_since(since) >= grace,
        };
        let live: BTreeSet<NodeId> = members
            .iter()
            .copied()
            .filter(|&id| {
                id == self.node_id()
                    || view
                        .reports
                        .get(&id)
                        .is_some_and(|r| now.duration_since(r.accepted_at) < timeout)
            })
            .collect();
        let mut released = BTreeSet::new();
        let mut dead_since = HashMap::new();
        // Every node that is or was a member by this leader's knowledge.
        let known: BTreeSet<NodeId> = members
            .iter()
            .copied()
            .chain(view.reports.keys().copied())
            .collect();
        for p in &applied.cluster.partitions {
            let assignment = applied.cluster.owner(p);
            let free = match assignment.and_then(|a| a.owner) {
                Some(owner) if live.contains(&owner) => false,
                Some(owner) => {
                    dead_since.insert(p.clone(), last_heard(owner));
                    silent(owner)
                }
                None => {
                    // Unassigned at `since_index`: every node either reported,
                    // after applying that change, that it does not hold it, or
                    // has been silent long enough for its lease to expire.
                    let since_index = assignment.map(|a| a.since_index).unwrap_or(0);
                    known.iter().all(|&id| {
                        let stopped = view.reports.get(&id).is_some_and(|r| {
                            r.applied_index >= since_index
                                && !r.held.iter().any(|h| &h.partition == p)
                        });
                        stopped || silent(id)
                    })
                }
            };
            if free {
                released.insert(p.clone());
            }
        }
        let draining = live
            .iter()
            .copied()
            .filter(|id| view.reports.get(id).is_some_and(|r| r.draining))
            .collect();
        let mut zones: BTreeMap<NodeId, String> = view
            .reports
            .iter()
            .filter(|(_, r)| !r.zone.is_empty())
            .map(|(id, r)| (*id, r.zone.clone()))
            .collect();
        if let Some(z) = &self.inner.config.zone {
            zones.insert(self.node_id(), z.clone());
        }
        let lost = members
            .iter()
            .copied()
            .filter(|&id| !live.contains(&id) && silent(id))
            .collect();
        let catching_up = self.catching_up(view, applied, &live);
        (
            state::Liveness {
                live,
                released,
                draining,
                members,
                zones,
                lost,
                catching_up,
                new_holders_catch_up: true,
            },
            dead_since,
        )
    }

    /// Live holders of placed shards without the shard's state yet, by
    /// the log positions they report: none, before the log's start (it was
    /// trimmed past them: they copy the shard), or more than
    /// `recovery_lag` records behind the furthest holder.
    fn catching_up(
        &self,
        view: &LeaderView,
        applied: &Applied,
        live: &BTreeSet<NodeId>,
    ) -> BTreeSet<(String, NodeId)> {
        let starts = self
            .inner
            .log_starts
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let position = |n: &NodeId, shard: &str| {
            view.reports
                .get(n)
                .and_then(|r| r.log_positions.get(shard).copied())
        };
        let mut out = BTreeSet::new();
        for (shard, holders) in &applied.cluster.holders {
            let furthest = holders
                .iter()
                .filter(|n| live.contains(n))
                .filter_map(|n| position(n, shard))
                .max()
                .unwrap_or(0);
            let start = starts.get(shard).copied().unwrap_or(0);
            let needed = start.max(furthest.saturating_sub(self.inner.config.recovery_lag));
            for n in holders.iter().filter(|n| live.contains(n)) {
                if position(n, shard).is_none_or(|p| p < needed) {
                    out.insert((shard.clone(), *n));
                }
            }
        }
        out
    }

    /// Publishes Raft metrics.
    async fn observe(self) {
        let mut rx = self.inner.raft.metrics();
        loop {
            {
                let m = rx.borrow_and_update().clone();
                metrics::gauge!(metric::RAFT_TERM).set(m.current_term as f64);
                metrics::gauge!(metric::RAFT_IS_LEADER).set(if m.state == ServerState::Leader {
                    1.0
                } else {
                    0.0
                });
                metrics::gauge!(metric::RAFT_LEADER_ID)
                    .set(m.current_leader.map(|l| l as f64).unwrap_or(-1.0));
                metrics::gauge!(metric::RAFT_APPLIED_INDEX)
                    .set(m.last_applied.map(|l| l.index as f64).unwrap_or(0.0));
                metrics::gauge!(metric::RAFT_LAST_LOG_INDEX)
                    .set(m.last_log_index.unwrap_or(0) as f64);
                let owned = self
                    .inner
                    .applied
                    .borrow()
                    .cluster
                    .owned_by(self.node_id())
                    .len();
                metrics::gauge!(metric::OWNED_PARTITIONS).set(owned as f64);
                let held = self
                    .inner
                    .applied
                    .borrow()
                    .cluster
                    .holders
                    .values()
                    .filter(|h| h.contains(&self.node_id()))
                    .count();
                metrics::gauge!(metric::HELD_SHARDS).set(held as f64);
            }
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Adds a node: as a learner first (it catches up), then as a voter.
    pub(crate) async fn add_node(
        &self,
        id: NodeId,
        addr: String,
        learner_only: bool,
    ) -> Result<(), Error> {
        self.inner
            .raft
            .add_learner(id, Member { addr }, true)
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        if !learner_only {
            self.inner
                .raft
                .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
                .await
                .map_err(|e| Error::Raft(e.to_string()))?;
        }
        Ok(())
    }

    /// Removes a node from the cluster (voter or learner).
    pub(crate) async fn remove_node(&self, id: NodeId) -> Result<(), Error> {
        let is_voter = self
            .inner
            .applied
            .borrow()
            .membership
            .membership()
            .voter_ids()
            .any(|v| v == id);
        let change = if is_voter {
            ChangeMembers::RemoveVoters([id].into())
        } else {
            ChangeMembers::RemoveNodes([id].into())
        };
        self.inner
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        Ok(())
    }

    /// Leader-side status: members with liveness, assignments with what their
    /// owners last reported.
    pub(crate) fn status(&self) -> ndc_proto::cluster::ClusterStatus {
        use ndc_proto::cluster::{ClusterStatus, MemberStatus, PartitionStatus};
        let metrics = self.inner.raft.metrics().borrow_watched().clone();
        let applied = self.inner.applied.borrow().clone();
        let view = self.inner.leader.lock();
        let now = Instant::now();
        let is_leader = metrics.state == ServerState::Leader;
        let membership = applied.membership.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, m)| {
                let report = view.as_ref().ok().and_then(|v| v.reports.get(id).cloned());
                let ago = report.as_ref().map(|r| now.duration_since(r.accepted_at));
                MemberStatus {
                    id: *id,
                    addr: m.addr.clone(),
                    role: if voters.contains(id) {
                        "voter"
                    } else {
                        "learner"
                    }
                    .into(),
                    last_heartbeat_ms_ago: ago.map(|d| d.as_millis() as u64),
                    live: is_leader
                        && (*id == self.node_id()
                            || ago.is_some_and(|d| d < self.inner.config.failure_timeout)),
                    draining: report.as_ref().is_some_and(|r| r.draining),
                }
            })
            .collect();
        let partitions = applied
            .cluster
            .partitions
            .iter()
            .map(|p| {
                let a = applied.cluster.owner(p);
                let owner = a.and_then(|a| a.owner);
                let held = owner.and_then(|o| {
                    view.as_ref().ok().and_then(|v| {
                        v.reports
                            .get(&o)
                            .and_then(|r| r.held.iter().find(|h| &h.partition == p).cloned())
                    })
                });
                PartitionStatus {
                    partition: p.clone(),
                    owner,
                    epoch: a.map(|a| a.epoch).unwrap_or(0),
                    running: held.is_some(),
                    next_offset: held.as_ref().and_then(|h| h.next_offset),
                    lag: held
                        .as_ref()
                        .and_then(|h| Some(h.high_watermark?.saturating_sub(h.next_offset?))),
                }
            })
            .collect();
        let shards = applied
            .cluster
            .holders
            .iter()
            .map(|(shard, holders)| ndc_proto::cluster::ShardPlacement {
                shard: shard.clone(),
                holders: holders.clone(),
                applied: holders
                    .iter()
                    .filter_map(|n| {
                        let report = view.as_ref().ok()?.reports.get(n)?;
                        Some(ndc_proto::cluster::HolderPosition {
                            node: *n,
                            next_offset: *report.log_positions.get(shard)?,
                        })
                    })
                    .collect(),
                log_start: self
                    .inner
                    .log_starts
                    .lock()
                    .ok()
                    .and_then(|s| s.get(shard).copied()),
            })
            .collect();
        ClusterStatus {
            shards,
            answered_by: self.node_id(),
            leader_id: metrics.current_leader,
            term: metrics.current_term,
            last_log_index: metrics.last_log_index,
            applied_index: applied.last_applied.map(|l| l.index),
            members,
            partitions,
        }
    }

    /// Up to which Raft log index this node's log was purged behind a
    /// snapshot (`None`: nothing purged yet).
    pub fn raft_log_purged_to(&self) -> Option<u64> {
        self.inner
            .raft
            .metrics()
            .borrow_watched()
            .purged
            .map(|l| l.index)
    }

    /// The Raft term this node is in.
    pub fn raft_term(&self) -> u64 {
        self.inner.raft.metrics().borrow_watched().current_term
    }

    /// Whether this node is the Raft leader now.
    pub fn is_leader(&self) -> bool {
        self.inner.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    /// The leader now, with its gRPC address.
    pub fn current_leader_addr(&self) -> Option<(NodeId, String)> {
        let leader = self.inner.raft.metrics().borrow_watched().current_leader?;
        Some((leader, self.leader_addr(leader)?))
    }
}
