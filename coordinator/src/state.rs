//! The replicated cluster state and the pure half of the scheduler.
//!
//! Everything here is deterministic: the state machine applies the same
//! commands to the same state on every node, and [`plan`] turns a state plus
//! what the leader knows about liveness into the next assignment changes.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Raft node id. Nodes of a StatefulSet take their ordinal (`ndc-2` → 2).
pub type NodeId = u64;

/// A source partition, `view/stream` (for Kafka, stream is `topic/partition`).
pub type PartitionId = String;

/// Who processes a partition, and since which epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// `None` while the partition is being released by its previous owner.
    pub owner: Option<NodeId>,
    /// Raised on every change; globally unique, so never reused for a partition.
    pub epoch: u64,
    /// Raft log index of the change: a node whose state machine has applied
    /// it knows about it.
    pub since_index: u64,
}

/// Commands of the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Declare the partitions the cluster must process (idempotent; adds only).
    RegisterPartitions { partitions: Vec<PartitionId> },
    /// Set owners; each changed partition gets a new epoch.
    Assign {
        changes: Vec<(PartitionId, Option<NodeId>)>,
    },
    /// Runs a pipeline spec on every node. Applied only if the stored
    /// version is still `previous` (the one the spec was validated and its
    /// generations computed against; `None`: no such pipeline) and below
    /// the new one: two concurrent updates cannot both win.
    PutSpec {
        name: String,
        spec: StoredSpec,
        #[serde(default)]
        previous: Option<u64>,
    },
    /// Stops a pipeline on every node.
    DropSpec { name: String },
    /// Forgets partitions (of dropped pipelines, or of views reset to a new
    /// generation), with their assignments.
    UnregisterPartitions { partitions: Vec<PartitionId> },
    /// Creates or replaces a principal's grant.
    PutGrant { grant: Grant },
    /// Removes a principal's grant.
    RevokeGrant { principal: String },
    /// Sets the holders of shards (see [`ClusterState::holders`]); an
    /// empty list takes a shard out of placement (every node holds it).
    Place {
        changes: Vec<(ShardName, Vec<NodeId>)>,
    },
}

/// What openraft logs of a command: its kind and size, never its contents
/// (a grant names principals and filter values).
impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::RegisterPartitions { partitions } => {
                write!(f, "register {} partitions", partitions.len())
            }
            Command::Assign { changes } => write!(f, "assign {} partitions", changes.len()),
            Command::PutSpec { name, .. } => write!(f, "put pipeline {name}"),
            Command::DropSpec { name } => write!(f, "drop pipeline {name}"),
            Command::UnregisterPartitions { partitions } => {
                write!(f, "unregister {} partitions", partitions.len())
            }
            Command::PutGrant { .. } => f.write_str("put grant"),
            Command::RevokeGrant { .. } => f.write_str("revoke grant"),
            Command::Place { changes } => write!(f, "place {} shards", changes.len()),
        }
    }
}

/// A shard of a view: the store view `view#i` (or `view` when unsharded),
/// the first part of its partitions' ids.
pub type ShardName = String;

/// The shard a partition id (`shard/topic/partition`) belongs to.
pub fn shard_of(partition: &str) -> &str {
    partition.split('/').next().unwrap_or(partition)
}

/// Role of a principal: what it may do besides reading its views.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the views of its grant; nothing else.
    Subscriber,
    /// Also reads the cluster's and pipelines' status.
    Operator,
    /// Also manages pipelines, cluster members and grants.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Subscriber => "subscriber",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "subscriber" => Ok(Role::Subscriber),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?} (admin, operator or subscriber)"
            )),
        }
    }
}

/// Rows a grant lets through: those whose `column` holds one of `values`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowFilter {
    pub column: String,
    pub values: Vec<String>,
}

/// What one principal may do, replicated so that every node enforces the
/// same. A principal has at most one grant; a new one replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub principal: String,
    pub role: Role,
    /// Views it may read; `*` for every view.
    pub views: Vec<String>,
    #[serde(default)]
    pub row_filter: Option<RowFilter>,
    /// Columns it may read; empty for every column.
    #[serde(default)]
    pub columns: Vec<String>,
    pub purpose: String,
    /// Unix milliseconds; the grant counts for nothing from then on.
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    pub granted_by: String,
    pub granted_at_ms: u64,
    /// The highest level of field delivered as it is; `None`: every level.
    #[serde(default)]
    pub clearance: Option<ndc_operators::masking::Level>,
    /// What fields above the clearance become, by level (a level not
    /// named: removed).
    #[serde(default)]
    pub masking: BTreeMap<ndc_operators::masking::Level, ndc_operators::masking::Policy>,
}

/// A pipeline spec as the cluster runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSpec {
    pub version: u64,
    /// The spec as submitted (YAML).
    pub text: String,
    /// Generation of each of the pipeline's views: the spec version that
    /// created its current state. A reset view gets a new generation, and
    /// with it fresh change-log and repartition topics, the same on every
    /// node.
    pub generations: BTreeMap<String, u64>,
}

/// Reply of the state machine to a command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandReply {
    /// Epochs of the partitions the command changed.
    pub epochs: Vec<(PartitionId, u64)>,
    /// Why the command changed nothing (a spec update that lost a race).
    #[serde(default)]
    pub refused: Option<String>,
}

/// Cluster metadata as replicated by Raft (members live in Raft's membership).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub partitions: BTreeSet<PartitionId>,
    pub assignments: BTreeMap<PartitionId, Assignment>,
    /// Last epoch handed out.
    pub last_epoch: u64,
    /// Pipeline specs, by name.
    #[serde(default)]
    pub specs: BTreeMap<String, StoredSpec>,
    /// Grants, by principal.
    #[serde(default)]
    pub grants: BTreeMap<String, Grant>,
    /// Nodes holding each placed shard (applying its change log, keeping
    /// its rows), the first of them its owner-to-be: the others are its
    /// standbys. A shard not named here is held by every node.
    #[serde(default)]
    pub holders: BTreeMap<ShardName, Vec<NodeId>>,
}

impl ClusterState {
    /// Applies a command committed at Raft log index `index`.
    pub fn apply(&mut self, command: &Command, index: u64) -> CommandReply {
        let mut reply = CommandReply::default();
        match command {
            Command::RegisterPartitions { partitions } => {
                for p in partitions {
                    self.partitions.insert(p.clone());
                }
            }
            Command::Assign { changes } => {
                for (partition, owner) in changes {
                    if !self.partitions.contains(partition) {
                        continue;
                    }
                    if self.assignments.get(partition).map(|a| a.owner) == Some(*owner) {
                        continue;
                    }
                    self.last_epoch += 1;
                    self.assignments.insert(
                        partition.clone(),
                        Assignment {
                            owner: *owner,
                            epoch: self.last_epoch,
                            since_index: index,
                        },
                    );
                    reply.epochs.push((partition.clone(), self.last_epoch));
                }
            }
            Command::PutSpec {
                name,
                spec,
                previous,
            } => {
                let current = self.specs.get(name).map(|s| s.version);
                if current == *previous && current.is_none_or(|v| v < spec.version) {
                    self.specs.insert(name.clone(), spec.clone());
                } else {
                    reply.refused = Some(match current {
                        Some(v) => {
                            format!("pipeline {name} changed meanwhile: it runs version {v} now")
                        }
                        None => format!("pipeline {name} was dropped meanwhile"),
                    });
                }
            }
            Command::DropSpec { name } => {
                self.specs.remove(name);
            }
            Command::UnregisterPartitions { partitions } => {
                for p in partitions {
                    self.partitions.remove(p);
                    self.assignments.remove(p);
                }
                let shards: BTreeSet<&str> = self.partitions.iter().map(|p| shard_of(p)).collect();
                self.holders.retain(|s, _| shards.contains(s.as_str()));
            }
            Command::Place { changes } => {
                for (shard, holders) in changes {
                    if holders.is_empty() {
                        self.holders.remove(shard);
                    } else {
                        self.holders.insert(shard.clone(), holders.clone());
                    }
                }
            }
            Command::PutGrant { grant } => {
                self.grants.insert(grant.principal.clone(), grant.clone());
            }
            Command::RevokeGrant { principal } => {
                if self.grants.remove(principal).is_none() {
                    reply.refused = Some(format!("{principal} has no grant"));
                }
            }
        }
        reply
    }

    /// Partitions a node owns, with their epochs.
    pub fn owned_by(&self, node: NodeId) -> BTreeMap<PartitionId, u64> {
        self.assignments
            .iter()
            .filter(|(_, a)| a.owner == Some(node))
            .map(|(p, a)| (p.clone(), a.epoch))
            .collect()
    }

    pub fn owner(&self, partition: &str) -> Option<&Assignment> {
        self.assignments.get(partition)
    }

    /// Whether `node` holds `shard`: it is one of its holders, or the shard
    /// is not placed (every node holds it).
    pub fn holds(&self, node: NodeId, shard: &str) -> bool {
        self.holders.get(shard).is_none_or(|h| h.contains(&node))
    }

    /// The holders of a placed shard, owner-to-be first; `None`: every node.
    pub fn holders_of(&self, shard: &str) -> Option<&[NodeId]> {
        self.holders.get(shard).map(Vec::as_slice)
    }

    /// The nodes among `members` that hold `shard` (owner-to-be first): its
    /// holders, or every member when it is not placed.
    pub fn holders_among(&self, shard: &str, members: &BTreeSet<NodeId>) -> Vec<NodeId> {
        match self.holders_of(shard) {
            Some(h) if !h.is_empty() => h.iter().copied().filter(|n| members.contains(n)).collect(),
            _ => members.iter().copied().collect(),
        }
    }
}

/// What the leader knows about one partition's owner beyond the replicated
/// state: whether handing the partition to someone else is safe yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The owner is live and may keep the partition.
    Live,
    /// The owner is dead or removed, but may still hold a lease: wait.
    Pending,
    /// Nobody can be acting on the partition any more.
    Done,
}

/// Up to where each of `shards`' change logs may be trimmed: the lowest
/// next offset its holders (every member, for a shard not placed) have
/// reported applied. A shard left out: a holder has not reported it.
pub fn log_trim_points(
    state: &ClusterState,
    members: &BTreeSet<NodeId>,
    reported: &BTreeMap<NodeId, &BTreeMap<String, u64>>,
    shards: &BTreeSet<ShardName>,
) -> BTreeMap<ShardName, u64> {
    let mut out = BTreeMap::new();
    for shard in shards {
        let lowest = state
            .holders_among(shard, members)
            .iter()
            .map(|n| reported.get(n)?.get(shard).copied())
            .collect::<Option<Vec<u64>>>()
            .and_then(|p| p.into_iter().min());
        if let Some(lowest) = lowest {
            out.insert(shard.clone(), lowest);
        }
    }
    out
}

/// A view whose keys every node may route to one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRoute {
    /// The partition count its keys are placed by: key k is in shard
    /// `ndc_operators::shard::of_key(k, partitions, shards)`.
    pub partitions: u32,
    /// Per shard, in shard order: the change up to which its records are
    /// known to be in place (0 where none was reported).
    pub verified_seqs: Vec<u64>,
}

/// The views whose keys every node may route to one shard: for each
/// sharded view with registered partitions, what the holders of each of
/// its shards reported of where that shard's keys sit, with the shard's last
/// change then (any holder's report counts: all apply the same log; a break
/// reported by any wins; the highest change reported is the shard's
/// verified point), judged by [`ndc_operators::shard::key_route`]. A shard
/// no holder reported on withholds its view's route.
pub fn key_routes(
    state: &ClusterState,
    members: &BTreeSet<NodeId>,
    reported: &BTreeMap<NodeId, &BTreeMap<String, (ndc_proto::state::KeyPlacement, u64)>>,
) -> BTreeMap<String, KeyRoute> {
    use ndc_operators::shard;
    let mut views: BTreeMap<&str, BTreeMap<u32, &str>> = BTreeMap::new();
    for pid in &state.partitions {
        let name = shard_of(pid);
        if let Some((view, i)) = shard::parse_store_name(name) {
            views.entry(view).or_default().insert(i, name);
        }
    }
    let mut out = BTreeMap::new();
    for (view, shards) in views {
        let count = shards.keys().max().map_or(0, |m| m + 1) as usize;
        let mut placements = vec![None; count];
        let mut verified_seqs = vec![0; count];
        for (i, name) in shards {
            let mut known = None;
            for n in state.holders_among(name, members) {
                if let Some((p, seq)) = reported.get(&n).and_then(|r| r.get(name)) {
                    known = Some(shard::merge_key_placement(known, *p));
                    verified_seqs[i as usize] = verified_seqs[i as usize].max(*seq);
                }
            }
            placements[i as usize] = known;
        }
        if let Some(partitions) = shard::key_route(&placements) {
            let route = KeyRoute {
                partitions,
                verified_seqs,
            };
            out.insert(view.to_string(), route);
        }
    }
    out
}

/// Input of [`plan`]: the leader's view of the cluster at one instant.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    /// Members that heartbeat in time, in id order: they may own partitions.
    pub live: BTreeSet<NodeId>,
    /// Partitions (unowned, or owned by a node not live) that no node can be
    /// acting on any more: reported released, or every lease has expired.
    pub released: BTreeSet<PartitionId>,
    /// Live nodes that are stopping: they keep nothing and take nothing,
    /// as long as another live node can take their partitions.
    pub draining: BTreeSet<NodeId>,
    /// Every member, live or not: a member that is down keeps the shards
    /// it holds (its state is on its disk); a node no longer a member
    /// holds nothing.
    pub members: BTreeSet<NodeId>,
    /// Zones of the nodes that said theirs: standbys go to other zones
    /// than their shard's other holders where they can.
    pub zones: BTreeMap<NodeId, String>,
    /// Members silent for longer than the failure timeout (or, never heard
    /// by this leader, for as long as any lease lasts): they cannot act.
    /// A member neither live nor lost is not known yet (a new leader has
    /// not heard from it): placement waits for it rather than replace it.
    pub lost: BTreeSet<NodeId>,
    /// Live holders that do not have a shard's state yet: they report no
    /// position in its log, or one before the log's start (they must copy
    /// the shard), or one further behind than the acceptable recovery lag.
    /// A standby that has the state is promoted before one that has not,
    /// and a holder that has it, replaced, keeps the shard until its
    /// replacement has caught up (make before break).
    pub catching_up: BTreeSet<(ShardName, NodeId)>,
    /// A node that does not hold a shard yet has none of its state (the
    /// leader's view; off, only `catching_up` says who lacks it).
    pub new_holders_catch_up: bool,
}

impl Liveness {
    /// Whether `node` has `shard`'s state (see [`Liveness::catching_up`]).
    pub fn has_state(&self, state: &ClusterState, shard: &str, node: NodeId) -> bool {
        !self.catching_up.contains(&(shard.to_string(), node))
            && (!self.new_holders_catch_up
                || state.holders.get(shard).is_some_and(|h| h.contains(&node)))
    }

    /// Nodes that may take work: live, not draining; if every live node
    /// drains, nobody else could take over, and they keep it.
    fn takers(&self) -> BTreeSet<NodeId> {
        let takers: BTreeSet<NodeId> = self.live.difference(&self.draining).copied().collect();
        if takers.is_empty() {
            self.live.clone()
        } else {
            takers
        }
    }
}

/// Next placement changes for `shards` (the placed ones) at
/// `replication_factor` holders each.
///
/// - a holder no longer a member is dropped;
/// - a shard without a live, non-draining holder gets one in front (it
///   catches up from the shard's log), else the first such holder is moved
///   to the front: the owner-to-be is always one that can take over, and
///   a standby is promoted rather than a node without the state;
/// - a shard with fewer holders than `replication_factor` gets more, on
///   the nodes holding fewest (another zone than its holders' where one is
///   free; ties: fewest shards owned, then lowest id); down members still
///   count as holders (they come back with their state);
/// - holders above `replication_factor` are dropped from the back (down
///   ones first).
///
/// `replication_factor` 0 places nothing: every shard leaves placement.
pub fn place(
    state: &ClusterState,
    shards: &BTreeSet<ShardName>,
    liveness: &Liveness,
    replication_factor: usize,
) -> Vec<(ShardName, Vec<NodeId>)> {
    if replication_factor == 0 {
        return state
            .holders
            .keys()
            .map(|shard| (shard.clone(), Vec::new()))
            .collect();
    }
    let takers = liveness.takers();
    let has_state = |shard: &str, n: &NodeId| liveness.has_state(state, shard, *n);
    let mut load = Load::default();
    for (shard, holders) in &state.holders {
        if shards.contains(shard) {
            load.add(
                holders.iter().filter(|n| liveness.members.contains(n)),
                true,
            );
        }
    }
    // Holders that stay (members), by shard.
    let mut next: BTreeMap<&ShardName, (Vec<NodeId>, Vec<NodeId>)> = shards
        .iter()
        .map(|shard| {
            let before = state.holders.get(shard).cloned().unwrap_or_default();
            let kept = before
                .iter()
                .copied()
                .filter(|n| liveness.members.contains(n))
                .collect();
            (shard, (before, kept))
        })
        .collect();
    // First every shard's owner-to-be: a holder that can take over moved
    // to the front, else a new one (the node owning fewest: shards placed
    // together spread their owners first, then their standbys).
    // Not known yet: neither live nor lost.
    let unknown = |n: &NodeId| !liveness.live.contains(n) && !liveness.lost.contains(n);
    for (shard, (_, holders)) in next.iter_mut() {
        if holders.first().is_some_and(unknown) {
            continue;
        }
        // A taker with the state before one still catching up.
        let taker = holders
            .iter()
            .position(|n| takers.contains(n) && has_state(shard, n))
            .or_else(|| holders.iter().position(|n| takers.contains(n)));
        match taker {
            Some(0) => {}
            Some(i) => {
                load.demote(holders[0]);
                let n = holders.remove(i);
                holders.insert(0, n);
                load.promote(n);
            }
            // No holder can take over: a new one, unless one may still be
            // back (not known yet).
            None if holders.iter().any(unknown) => {}
            None => {
                if let Some(n) = load.pick(&takers, holders, &liveness.zones, true) {
                    if let Some(&old) = holders.first() {
                        load.demote(old);
                    }
                    holders.insert(0, n);
                    load.add([&n], true);
                }
            }
        }
    }
    // Then standbys up to the factor, on the nodes holding fewest; and
    // holders above it dropped, the down ones first.
    let owners: BTreeSet<(&str, NodeId)> = state
        .assignments
        .iter()
        .filter_map(|(p, a)| Some((shard_of(p), a.owner?)))
        .collect();
    for (shard, (_, holders)) in next.iter_mut() {
        let shard = shard.as_str();
        while holders.len() < replication_factor {
            let Some(n) = load.pick(&takers, holders, &liveness.zones, false) else {
                break;
            };
            holders.push(n);
            load.add([&n], false);
        }
        // A live node still owning one of the shard's partitions keeps it
        // until its partitions have moved (it applies what it decided).
        while holders.len() > replication_factor {
            let owning = |n: &NodeId| liveness.live.contains(n) && owners.contains(&(shard, *n));
            let Some(i) = holders
                .iter()
                .rposition(|n| !liveness.live.contains(n))
                .filter(|&i| i > 0)
                .or_else(|| (1..holders.len()).rev().find(|&i| !owning(&holders[i])))
            else {
                break;
            };
            load.remove(holders.remove(i));
        }
    }
    // Holdings even out: a node holding two more than another hands it a
    // standby (never an owner-to-be). Shards placed this round trade at
    // once (nobody holds their state yet); others only once every member
    // is known (a new leader's first rounds change nothing), and the new
    // standby catches up from the shard's log (or its copied state) while
    // the owner goes on.
    let settled = !liveness.members.iter().any(unknown);
    // Shards held and owned-to-be per (node, view): a view's shards cost
    // alike, different views' do not (a merge's shards against its
    // sources'), so moves take a shard of the view most concentrated on
    // the giving node, and every view ends spread, not only the counts.
    // Holders kept above the factor (an owner whose partitions have not
    // moved yet) are leaving: counted nowhere, so the evening passes judge
    // the placement the moves lead to — counting them, a round moved shards
    // off a node that was about to lose them and the next moved them back.
    // A shard mid-move is not moved again (see `movable`).
    for (_, h) in next.values() {
        for n in h.iter().skip(replication_factor) {
            load.remove(*n);
        }
    }
    let mut per_view = ViewLoad::default();
    for (shard, (_, h)) in &next {
        per_view.add(&h[..h.len().min(replication_factor)], shard);
    }
    // The two passes run until neither changes anything: promoting a
    // standby can make its old owner a standby that may then be traded.
    loop {
        let mut changed = false;
        // Bounded: each move lowers the spread of the counts or of one
        // view's, but a bound keeps a round finite whatever the input.
        for _ in 0..4 * (next.len() + takers.len()) {
            let held = |n: &NodeId| load.held.get(n).copied().unwrap_or(0);
            let zone = |n: &NodeId| liveness.zones.get(n);
            // Where `from` (holder `j` of `h`) may hand `shard` to `to`: a
            // standby, or with factor 1 the whole shard (the new holder
            // goes first, the old one stays until its partitions have
            // moved, then it is dropped above the factor); never onto a
            // holder, nor into a zone its other holders are in, nor from a
            // node that still owns some of its partitions (mid-move).
            let movable =
                |shard: &str, before: &[NodeId], h: &[NodeId], from: NodeId, to: NodeId| {
                    if !(before.is_empty() || settled) || h.contains(&to) {
                        return None;
                    }
                    if h.len() > replication_factor {
                        return None;
                    }
                    let j = match h.len() {
                        1 if h[0] == from => 0,
                        _ => (1..h.len()).find(|&j| h[j] == from)?,
                    };
                    if j > 0 && owners.contains(&(shard, from)) {
                        return None;
                    }
                    let other_zones = h.iter().filter(|n| **n != from).filter_map(zone);
                    let fits = zone(&to) == zone(&from)
                        || zone(&to).is_none_or(|z| !other_zones.clone().any(|o| o == z));
                    fits.then_some(j)
                };
            let most = takers
                .iter()
                .max_by_key(|n| (held(n), std::cmp::Reverse(**n)));
            let least = takers.iter().min_by_key(|n| (held(n), **n));
            // Counts first: the node holding most hands the node holding
            // fewest a shard of the view it has most more of.
            let by_count = match (most, least) {
                (Some(&most), Some(&least)) if held(&most) >= held(&least) + 2 => next
                    .iter()
                    .filter_map(|(shard, (before, h))| {
                        Some((*shard, movable(shard, before, h, most, least)?, most, least))
                    })
                    .max_by_key(|(shard, _, _, _)| {
                        (
                            per_view.excess(&per_view.held, most, least, shard),
                            std::cmp::Reverse(*shard),
                        )
                    }),
                _ => None,
            };
            // Then views: a node holding two more of a view's shards than
            // another hands it one, if the other holds fewer shards in all
            // (the counts stay within one of each other), or as many and
            // has a shard of another view to hand back (the counts' pass
            // then does: a swap).
            let takers = &takers;
            let hand_back = |from: NodeId, to: NodeId, view: &str| {
                next.iter().any(|(s2, (b2, h2))| {
                    view_of(s2) != view
                        && per_view.excess(&per_view.held, to, from, s2) >= 1
                        && movable(s2, b2, h2, to, from).is_some()
                })
            };
            let by_view = || {
                next.iter()
                    .flat_map(|(shard, (before, h))| {
                        h.iter().flat_map(move |&from| {
                            takers.iter().map(move |&to| (*shard, before, h, from, to))
                        })
                    })
                    .filter(|(shard, _, _, from, to)| {
                        per_view.excess(&per_view.held, *from, *to, shard) >= 2
                            && (held(to) < held(from)
                                || (held(to) == held(from)
                                    && hand_back(*from, *to, view_of(shard))))
                    })
                    .filter_map(|(shard, before, h, from, to)| {
                        Some((shard, movable(shard, before, h, from, to)?, from, to))
                    })
                    .max_by_key(|(shard, _, from, to)| {
                        (
                            per_view.excess(&per_view.held, *from, *to, shard),
                            std::cmp::Reverse(*shard),
                        )
                    })
            };
            let Some((shard, j, from, to)) = by_count.or_else(by_view) else {
                break;
            };
            changed = true;
            per_view.moved(HeldOrFirst::Held, from, to, shard);
            if j == 0 {
                per_view.moved(HeldOrFirst::First, from, to, shard);
            }
            if let Some((_, h)) = next.get_mut(shard) {
                if j == 0 {
                    load.demote(from);
                    load.promote(to);
                }
                if j == 0 && owners.contains(&(shard.as_str(), from)) {
                    h.insert(0, to);
                } else {
                    h[j] = to;
                }
                load.remove(from);
                load.add([&to], false);
            }
        }
        // Owners-to-be even out among the nodes that can take over: a shard
        // whose first holder owns two more than one of its standbys is handed
        // to that standby (it holds the state: a fence, not a copy). Not while
        // some member is not known yet (a new leader's first rounds).
        while settled && !next.is_empty() {
            let count = |n: &NodeId| load.first.get(n).copied().unwrap_or(0);
            let candidates = next.iter().filter_map(|(shard, (_, h))| {
                let top = count(h.first()?);
                let j = (1..h.len().min(replication_factor))
                    .filter(|&j| {
                        takers.contains(&h[j]) && has_state(shard, &h[j]) && count(&h[j]) + 2 <= top
                    })
                    .min_by_key(|&j| (count(&h[j]), h[j]))?;
                Some((*shard, j, h[0], h[j]))
            });
            let swap = candidates.max_by_key(|(shard, _, from, to)| {
                (
                    per_view.excess(&per_view.first, *from, *to, shard),
                    std::cmp::Reverse(*shard),
                )
            });
            let Some((shard, j, from, to)) = swap else {
                break;
            };
            changed = true;
            per_view.moved(HeldOrFirst::First, from, to, shard);
            if let Some((_, h)) = next.get_mut(shard) {
                load.demote(h[0]);
                load.promote(h[j]);
                h.swap(0, j);
            }
        }
        if !changed {
            break;
        }
    }
    // Make before break: a holder with the state that this round drops
    // stays, after the others, while a holder that replaces it catches up
    // (as many as it takes for `replication_factor` holders with the
    // state). The rounds above see it as gone: the next one drops it again
    // and this keeps it again (no change) until its replacement is ready.
    for (shard, (before, holders)) in next.iter_mut() {
        let ready = |n: &NodeId| has_state(shard, n);
        if holders.iter().all(ready) {
            continue;
        }
        let with_state = holders
            .iter()
            .filter(|n| ready(n) && liveness.live.contains(n))
            .count();
        let keep: Vec<NodeId> = before
            .iter()
            .copied()
            .filter(|n| !holders.contains(n))
            .filter(|n| liveness.live.contains(n) && liveness.members.contains(n) && ready(n))
            .take(replication_factor.saturating_sub(with_state))
            .collect();
        holders.extend(keep);
    }
    next.into_iter()
        .filter(|(_, (before, holders))| holders != before)
        .map(|(shard, (_, holders))| (shard.clone(), holders))
        .collect()
}

/// The view a shard belongs to (`view#i` → `view`).
fn view_of(shard: &str) -> &str {
    shard.rsplit_once('#').map_or(shard, |(view, _)| view)
}

/// Which count of [`ViewLoad`] a move changes.
enum HeldOrFirst {
    Held,
    First,
}

/// Shards held and owned-to-be per (node, view), as the evening passes go.
#[derive(Default)]
struct ViewLoad {
    held: BTreeMap<(NodeId, String), usize>,
    first: BTreeMap<(NodeId, String), usize>,
}

impl ViewLoad {
    fn add(&mut self, holders: &[NodeId], shard: &str) {
        let view = view_of(shard).to_string();
        for (i, n) in holders.iter().enumerate() {
            *self.held.entry((*n, view.clone())).or_default() += 1;
            if i == 0 {
                *self.first.entry((*n, view.clone())).or_default() += 1;
            }
        }
    }

    /// How many more of `shard`'s view `from` has than `to`.
    fn excess(
        &self,
        counts: &BTreeMap<(NodeId, String), usize>,
        from: NodeId,
        to: NodeId,
        shard: &str,
    ) -> isize {
        let view = view_of(shard).to_string();
        let of = |n: NodeId| counts.get(&(n, view.clone())).copied().unwrap_or(0) as isize;
        of(from) - of(to)
    }

    fn moved(&mut self, which: HeldOrFirst, from: NodeId, to: NodeId, shard: &str) {
        let counts = match which {
            HeldOrFirst::Held => &mut self.held,
            HeldOrFirst::First => &mut self.first,
        };
        let view = view_of(shard).to_string();
        if let Some(c) = counts.get_mut(&(from, view.clone())) {
            *c = c.saturating_sub(1);
        }
        *counts.entry((to, view)).or_default() += 1;
    }
}

/// Shards held, and shards owned-to-be, per node, as placement goes.
#[derive(Default)]
struct Load {
    held: BTreeMap<NodeId, usize>,
    first: BTreeMap<NodeId, usize>,
}

impl Load {
    fn add<'a>(&mut self, nodes: impl IntoIterator<Item = &'a NodeId>, first_is_owner: bool) {
        for (i, n) in nodes.into_iter().enumerate() {
            *self.held.entry(*n).or_default() += 1;
            if first_is_owner && i == 0 {
                self.promote(*n);
            }
        }
    }

    fn remove(&mut self, n: NodeId) {
        if let Some(c) = self.held.get_mut(&n) {
            *c = c.saturating_sub(1);
        }
    }

    fn promote(&mut self, n: NodeId) {
        *self.first.entry(n).or_default() += 1;
    }

    fn demote(&mut self, n: NodeId) {
        if let Some(c) = self.first.get_mut(&n) {
            *c = c.saturating_sub(1);
        }
    }

    /// The taker not among `holders` to add: another zone than theirs
    /// where one is free, then the fewest owned (`owner`) or held, then the
    /// lowest id.
    fn pick(
        &self,
        takers: &BTreeSet<NodeId>,
        holders: &[NodeId],
        zones: &BTreeMap<NodeId, String>,
        owner: bool,
    ) -> Option<NodeId> {
        let used: BTreeSet<&String> = holders.iter().filter_map(|n| zones.get(n)).collect();
        takers
            .iter()
            .copied()
            .filter(|n| !holders.contains(n))
            .min_by_key(|n| {
                let h = self.held.get(n).copied().unwrap_or(0);
                let f = self.first.get(n).copied().unwrap_or(0);
                let same_zone = zones.get(n).is_some_and(|z| used.contains(z));
                if owner {
                    (same_zone, f, h, *n)
                } else {
                    (same_zone, h, f, *n)
                }
            })
    }
}

/// Next assignment changes: as few moves as give every live node its fair
/// share (`⌈P/N⌉` at most, `⌊P/N⌋` at least).
///
/// Moves happen in two steps so that no partition is ever processed by two
/// nodes: a partition leaving a live node is first unassigned (its owner
/// stops when it applies that), and only handed on once it is in
/// `liveness.released`. Partitions of dead nodes are handed on once released
/// (every lease they might hold has expired).
pub fn plan(state: &ClusterState, liveness: &Liveness) -> Vec<(PartitionId, Option<NodeId>)> {
    // Nodes that may own partitions: the live ones not draining; if every
    // live node drains, nobody could take over, and they keep what they own.
    let takers = liveness.takers();
    let live = &takers;
    let mut changes = Vec::new();
    if live.is_empty() {
        return changes;
    }
    // A placed shard's partitions go to its first holder that can take
    // them, and to nobody else (the others do not apply its log).
    let (placed, free): (Vec<&PartitionId>, Vec<&PartitionId>) = state
        .partitions
        .iter()
        .partition(|p| state.holders.contains_key(shard_of(p)));
    for p in placed {
        let target = state
            .holders_of(shard_of(p))
            .and_then(|h| h.iter().copied().find(|n| takers.contains(n)));
        match state.assignments.get(p).and_then(|a| a.owner) {
            Some(owner) if Some(owner) == target => {}
            // First step of a move: the owner stops.
            Some(owner) if liveness.live.contains(&owner) => changes.push((p.clone(), None)),
            _ => {
                if let Some(t) = target
                    && liveness.released.contains(p)
                {
                    changes.push((p.clone(), Some(t)));
                }
            }
        }
    }
    let total = free.len();
    let n = live.len();
    let floor = total / n;
    let ceil = total.div_ceil(n);

    // Current load of live nodes, and the partitions that need an owner.
    let mut load: BTreeMap<NodeId, Vec<&PartitionId>> =
        live.iter().map(|&id| (id, Vec::new())).collect();
    let mut homeless: Vec<&PartitionId> = Vec::new();
    for p in free {
        match state.assignments.get(p).and_then(|a| a.owner) {
            Some(owner) if live.contains(&owner) => {
                if let Some(v) = load.get_mut(&owner) {
                    v.push(p);
                }
            }
            // A draining node gives its partitions up at once (the first
            // step of a move, as for a node above its share).
            Some(owner) if liveness.live.contains(&owner) => {
                changes.push((p.clone(), None));
            }
            Some(_) => {
                // Owned by a node that is not live: unassign only once
                // released; until then, leave it (and its epoch) alone.
                if liveness.released.contains(p) {
                    homeless.push(p);
                }
            }
            None => {
                if liveness.released.contains(p) {
                    homeless.push(p);
                }
            }
        }
    }

    // How many nodes may keep `ceil` partitions: total - n*floor of them.
    let mut at_ceil_allowed = total - n * floor;
    // Nodes above their share give partitions up (first step of a move).
    for parts in load.values_mut() {
        let keep = if parts.len() >= ceil && at_ceil_allowed > 0 && ceil > floor {
            at_ceil_allowed -= 1;
            ceil
        } else {
            floor
        }
        .min(parts.len());
        while parts.len() > keep {
            // Give up the highest-ordered partitions: deterministic.
            if let Some(p) = parts.pop() {
                changes.push((p.clone(), None));
            }
        }
    }
    // Homeless partitions go to the least-loaded live nodes (ties: lowest id).
    for p in homeless {
        let Some((&target, _)) = load
            .iter()
            .filter(|(_, parts)| parts.len() < ceil)
            .min_by_key(|(id, parts)| (parts.len(), **id))
        else {
            break;
        };
        if let Some(v) = load.get_mut(&target) {
            v.push(p);
        }
        changes.push((p.clone(), Some(target)));
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(parts: usize) -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(
            &Command::RegisterPartitions {
                partitions: (0..parts).map(|i| format!("v/t/{i}")).collect(),
            },
            1,
        );
        s
    }

    fn all_released(s: &ClusterState) -> BTreeSet<PartitionId> {
        s.partitions.iter().cloned().collect()
    }

    /// A log is trimmed only behind every holder that is still a member,
    /// and not at all while one of them has not said where it is.
    #[test]
    fn a_log_is_trimmed_behind_its_slowest_holder_and_not_before_each_reported() {
        let mut s = ClusterState::default();
        s.apply(
            &Command::Place {
                changes: vec![
                    ("v#0".into(), vec![1, 2]),
                    ("v#1".into(), vec![2, 3]),
                    ("v#2".into(), vec![1, 9]),
                ],
            },
            1,
        );
        let members = BTreeSet::from([1, 2, 3]);
        let n1 = BTreeMap::from([
            ("v#0".to_string(), 40),
            ("v#2".to_string(), 7),
            ("w".to_string(), 5),
        ]);
        let n2 = BTreeMap::from([
            ("v#0".to_string(), 30),
            ("v#1".to_string(), 50),
            ("w".to_string(), 9),
        ]);
        let n3 = BTreeMap::from([("v#1".to_string(), 60)]);
        let shards: BTreeSet<ShardName> = ["v#0", "v#1", "v#2", "w"]
            .into_iter()
            .map(String::from)
            .collect();
        let reported = BTreeMap::from([(1, &n1), (2, &n2), (3, &n3)]);
        let points = log_trim_points(&s, &members, &reported, &shards);
        assert_eq!(
            points,
            BTreeMap::from([
                // The slowest of its holders.
                ("v#0".to_string(), 30),
                ("v#1".to_string(), 50),
                // Node 9 is no member: it holds nothing back.
                ("v#2".to_string(), 7),
            ]),
            "`w` is not placed: every member holds it, and node 3 has not reported it"
        );
        let without_3 = BTreeMap::from([(1, &n1), (2, &n2)]);
        let points = log_trim_points(&s, &members, &without_3, &shards);
        assert!(!points.contains_key("v#1"), "{points:?}");
        assert_eq!(points.get("v#0"), Some(&30));
    }

    #[test]
    fn keys_are_routed_only_on_every_shards_evidence_and_a_break_reported_by_any_holder_wins() {
        use ndc_proto::state::KeyPlacement;
        let ok = KeyPlacement {
            partitions: 3,
            broken: false,
        };
        let broken = KeyPlacement {
            partitions: 3,
            broken: true,
        };
        let mut s = ClusterState::default();
        let partitions = [
            "v#0/t/0", "v#1/t/1", "v#2/t/2", "w/u/0", "x#0/u/0", "x#1/u/1",
        ];
        s.apply(
            &Command::RegisterPartitions {
                partitions: partitions.iter().map(|p| p.to_string()).collect(),
            },
            1,
        );
        s.apply(
            &Command::Place {
                changes: vec![
                    ("v#0".into(), vec![1, 2]),
                    ("v#1".into(), vec![2, 3]),
                    ("v#2".into(), vec![3, 1]),
                ],
            },
            2,
        );
        let members = BTreeSet::from([1, 2, 3]);
        type Report = BTreeMap<String, (KeyPlacement, u64)>;
        let all = |shards: &[&str], p: KeyPlacement, seq: u64| -> Report {
            shards.iter().map(|s| (s.to_string(), (p, seq))).collect()
        };
        // Node 1 alone reported v#0 and v#2; v#1's holders (2, 3) said nothing.
        let n1 = all(&["v#0", "v#2", "w", "x#0", "x#1"], ok, 10);
        let reported = BTreeMap::from([(1, &n1)]);
        let routes = key_routes(&s, &members, &reported);
        assert_eq!(
            routes.keys().collect::<Vec<_>>(),
            ["x"],
            "v waits for v#1; w has one shard, nothing to route"
        );
        assert_eq!(routes["x"].partitions, 3);
        // Node 3 holds v#1 and v#2 and is further on in v#2: the highest counts.
        let n3 = all(&["v#1", "v#2"], ok, 12);
        let reported = BTreeMap::from([(1, &n1), (3, &n3)]);
        let routes = key_routes(&s, &members, &reported);
        assert_eq!(
            routes.get("v"),
            Some(&KeyRoute {
                partitions: 3,
                verified_seqs: vec![10, 12, 12],
            })
        );
        // A standby of v#2 (node 3) applied a record out of place: gone,
        // whatever the other holder still says.
        let n3 = BTreeMap::from([
            ("v#1".to_string(), (ok, 12)),
            ("v#2".to_string(), (broken, 13)),
        ]);
        let reported = BTreeMap::from([(1, &n1), (3, &n3)]);
        assert_eq!(key_routes(&s, &members, &reported).get("v"), None);
        // A report from a node that no longer holds the shard does not count.
        let n2 = all(&["v#1"], ok, 9);
        let n9 = all(&["v#0", "v#1", "v#2"], broken, 50);
        let reported = BTreeMap::from([(1, &n1), (2, &n2), (9, &n9)]);
        let routes = key_routes(&s, &members, &reported);
        assert_eq!(
            routes.get("v").map(|r| r.verified_seqs.clone()),
            Some(vec![10, 9, 10])
        );
    }

    #[test]
    fn epochs_rise_on_every_change_and_never_repeat() {
        let mut s = state(2);
        let r = s.apply(
            &Command::Assign {
                changes: vec![("v/t/0".into(), Some(1)), ("v/t/1".into(), Some(2))],
            },
            1,
        );
        assert_eq!(r.epochs, vec![("v/t/0".into(), 1), ("v/t/1".into(), 2)]);
        // No change: no new epoch.
        let r = s.apply(
            &Command::Assign {
                changes: vec![("v/t/0".into(), Some(1))],
            },
            1,
        );
        assert!(r.epochs.is_empty());
        let r = s.apply(
            &Command::Assign {
                changes: vec![("v/t/0".into(), None)],
            },
            1,
        );
        assert_eq!(r.epochs, vec![("v/t/0".into(), 3)]);
        // Unknown partitions are ignored.
        let r = s.apply(
            &Command::Assign {
                changes: vec![("v/t/9".into(), Some(1))],
            },
            1,
        );
        assert!(r.epochs.is_empty());
        assert_eq!(
            s.owned_by(2).into_iter().collect::<Vec<_>>(),
            vec![("v/t/1".to_string(), 2)]
        );
    }

    #[test]
    fn a_draining_node_gives_everything_up_and_takes_nothing() {
        let mut s = state(6);
        let all = |s: &ClusterState| all_released(s);
        let first = plan(
            &s,
            &Liveness {
                live: [1, 2, 3].into(),
                released: all(&s),
                draining: BTreeSet::new(),
                ..Default::default()
            },
        );
        s.apply(&Command::Assign { changes: first }, 1);
        assert_eq!(s.owned_by(3).len(), 2);
        // Node 3 drains: its partitions are unassigned (first step), and
        // once released they go to 1 and 2, never back to 3.
        let draining = Liveness {
            live: [1, 2, 3].into(),
            released: BTreeSet::new(),
            draining: [3].into(),
            ..Default::default()
        };
        let give_up = plan(&s, &draining);
        assert_eq!(give_up.len(), 2);
        assert!(give_up.iter().all(|(_, owner)| owner.is_none()));
        s.apply(&Command::Assign { changes: give_up }, 2);
        let released = Liveness {
            released: all(&s),
            ..draining.clone()
        };
        let take = plan(&s, &released);
        assert!(take.iter().all(|(_, owner)| matches!(owner, Some(1 | 2))));
        s.apply(&Command::Assign { changes: take }, 3);
        assert!(s.owned_by(3).is_empty());
        assert_eq!((s.owned_by(1).len(), s.owned_by(2).len()), (3, 3));
        // With nobody else live, a draining node keeps what it has.
        let alone = Liveness {
            live: [1].into(),
            released: all(&s),
            draining: [1].into(),
            ..Default::default()
        };
        assert!(
            plan(&s, &alone)
                .iter()
                .all(|(p, o)| o.is_some() || s.owner(p).and_then(|a| a.owner) != Some(1))
        );
    }

    #[test]
    fn a_dead_owner_keeps_its_partitions_until_they_are_released() {
        let mut s = state(4);
        let first = plan(
            &s,
            &Liveness {
                live: [1, 2].into(),
                released: all_released(&s),
                draining: BTreeSet::new(),
                ..Default::default()
            },
        );
        s.apply(&Command::Assign { changes: first }, 1);
        assert_eq!(s.owned_by(1).len(), 2);
        // Node 2 dies; its partitions are not released yet.
        let l = Liveness {
            live: [1].into(),
            released: BTreeSet::new(),
            draining: BTreeSet::new(),
            ..Default::default()
        };
        let changes = plan(&s, &l);
        assert!(
            changes
                .iter()
                .all(|(p, _)| s.owner(p).and_then(|a| a.owner) != Some(2))
        );
        // Released: they move to node 1.
        let l = Liveness {
            live: [1].into(),
            released: s.owned_by(2).into_keys().collect(),
            draining: BTreeSet::new(),
            ..Default::default()
        };
        let changes = plan(&s, &l);
        s.apply(&Command::Assign { changes }, 1);
        assert_eq!(s.owned_by(1).len(), 4);
    }

    #[test]
    fn a_spec_is_replaced_only_by_a_higher_version_and_dropped_partitions_are_forgotten() {
        let spec = |version: u64| StoredSpec {
            version,
            text: format!("version: {version}"),
            generations: [("p.people".to_string(), version)].into(),
        };
        let mut s = state(2);
        let put = |version, previous| Command::PutSpec {
            name: "p".into(),
            spec: spec(version),
            previous,
        };
        assert_eq!(s.apply(&put(2, None), 1).refused, None);
        // A late, older proposal does not go back.
        assert!(s.apply(&put(1, None), 2).refused.is_some());
        assert_eq!(s.specs.get("p").map(|s| s.version), Some(2));
        // Two updates validated against version 2: the first wins.
        assert_eq!(s.apply(&put(3, Some(2)), 3).refused, None);
        assert!(s.apply(&put(4, Some(2)), 3).refused.is_some());
        assert_eq!(s.specs.get("p"), Some(&spec(3)));
        s.apply(
            &Command::Assign {
                changes: vec![("v/t/0".into(), Some(1))],
            },
            4,
        );
        s.apply(
            &Command::UnregisterPartitions {
                partitions: vec!["v/t/0".into()],
            },
            5,
        );
        assert!(!s.partitions.contains("v/t/0") && s.owner("v/t/0").is_none());
        assert!(s.partitions.contains("v/t/1"));
        s.apply(&Command::DropSpec { name: "p".into() }, 6);
        assert!(s.specs.is_empty());
    }
}
