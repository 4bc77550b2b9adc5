//! Cluster coordination with real processes: a tansu broker and three (then
//! four) `ndc node` processes on loopback ports chosen at run time, talking
//! openraft over gRPC and keeping Raft state in RocksDB. Scenarios: kill -9 a
//! follower, kill -9 the leader, stop a node for longer than the failure
//! timeout and bring it back, remove a node and add a new one. After each,
//! every source partition has exactly one live owner, loads are balanced,
//! and every moved partition got a higher epoch. Under a steady load, every
//! node ends with exactly the rows a single-threaded reference computes from
//! the input, and a subscriber that fails over from node to node with its
//! resume token sees every change exactly once. Every listener speaks mutual
//! TLS: nodes prove their ids to each other with their certificates, and the
//! test calls them as a granted admin.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ndc_node::client::From;
use ndc_node::cluster::admin;
use ndc_node::config::{ClusterSection, NodeConfig};
use ndc_node::quickstart::synthetic::{Feed, Rng, Table, citizen_row, national_id};
use ndc_proto::cluster::ClusterStatus;
use ndc_testkit::cluster::Member;
use ndc_testkit::*;
use rdkafka::Message as _;
use rdkafka::producer::FutureRecord;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOPIC: &str = "population.public.citizens";
const PARTITIONS: i32 = 8;

struct Cluster {
    _broker: Broker,
    _dir: tempfile::TempDir,
    /// The member processes, each on ports bound for its whole life.
    nodes: ndc_testkit::Cluster,
    /// What the members run, on top of the common configuration.
    edit: fn(&mut NodeConfig),
}

/// Shards of the replica scenarios' view: one per partition.
const SHARDS: u32 = 8;

/// Holders per shard in the replica scenarios: an owner and a standby.
const REPLICATION_FACTOR: usize = 2;

/// Members of the replica scenarios: one configured view of `TOPIC`, in
/// `SHARDS` shards (each with its own change log and sequence numbers),
/// each held by `REPLICATION_FACTOR` of the nodes.
fn replica_member(c: &mut NodeConfig) {
    c.views[0].shards = SHARDS;
    if let Some(cluster) = c.cluster.as_mut() {
        cluster.replication_factor = REPLICATION_FACTOR;
    }
}

/// Members of the two-view scenario: besides `citizens` (8 shards), a
/// second view `mirror` of the same topic in 3 shards — a source partition
/// feeds a shard of each, placed and owned each on its own.
fn mirrored_member(c: &mut NodeConfig) {
    replica_member(c);
    let mut mirror = c.views[0].clone();
    mirror.name = "mirror".into();
    mirror.shards = 3;
    c.views.push(mirror);
}

/// Holders of each shard, owner first.
fn holders(s: &ClusterStatus) -> BTreeMap<String, Vec<u64>> {
    s.shards
        .iter()
        .map(|p| (p.shard.clone(), p.holders.clone()))
        .collect()
}

/// Every shard placed on `REPLICATION_FACTOR` distinct nodes, owners and
/// holdings within one of each other over `live`, each partition owned by
/// its shard's first holder.
fn placed_over(s: &ClusterStatus, live: &[u64]) -> bool {
    let h = holders(s);
    if h.len() != SHARDS as usize || !balanced_over(s, live) {
        return false;
    }
    let mut held: BTreeMap<u64, usize> = live.iter().map(|&n| (n, 0)).collect();
    for nodes in h.values() {
        let distinct: BTreeSet<&u64> = nodes.iter().collect();
        if nodes.len() != REPLICATION_FACTOR || distinct.len() != nodes.len() {
            return false;
        }
        for n in nodes {
            if let Some(c) = held.get_mut(n) {
                *c += 1;
            }
        }
    }
    let owned_by_first = s.partitions.iter().all(|p| {
        let shard = p.partition.split('/').next().unwrap_or_default();
        p.owner.is_some() && h.get(shard).and_then(|n| n.first().copied()) == p.owner
    });
    let max = held.values().max().copied().unwrap_or(0);
    let min = held.values().min().copied().unwrap_or(0);
    owned_by_first && max - min <= 1
}

/// Shard reads re-routed by node `id` after losing a holder.
async fn rerouted(cluster: &Cluster, id: u64) -> f64 {
    let m = cluster.members().iter().find(|m| m.id == id).unwrap();
    let text = metrics_text(m.node.http()).await;
    metric_value(&text, |l| {
        l.starts_with("ndc_subscription_remote_shards_total") && l.contains("rerouted")
    })
    .unwrap_or(0.0)
}

/// The leader `id`'s count of shards short of holders with their state.
async fn under_replicated(cluster: &Cluster, id: u64) -> f64 {
    let m = cluster.members().iter().find(|m| m.id == id).unwrap();
    metric_value(&metrics_text(m.node.http()).await, |l| {
        l.starts_with("ndc_cluster_under_replicated_shards ")
    })
    .unwrap_or(f64::NAN)
}

/// Shard streams node `id` serves to other nodes' subscriptions right now.
async fn streams_served(cluster: &Cluster, id: u64) -> f64 {
    let m = cluster.members().iter().find(|m| m.id == id).unwrap();
    metric_value(&metrics_text(m.node.http()).await, |l| {
        l.starts_with("ndc_cluster_shard_streams_active ")
    })
    .unwrap_or(0.0)
}

/// Whether node 0 re-routes a shard stream after `before` (a holder it read
/// from was killed).
async fn rerouted_within(cluster: &Cluster, before: f64) -> bool {
    // Within the failover bound; a stream may also have been re-routed just
    // before the kill, when placement took the shard from that holder, and
    // then none follows it.
    let deadline = Instant::now() + FAILOVER_BOUND;
    while Instant::now() < deadline {
        if rerouted(cluster, 0).await > before {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Every partition that moved went to a node that held its shard before
/// (a standby, with the state): none was rebuilt from the log's start.
fn moved_to_standbys(before: &ClusterStatus, after: &ClusterStatus) {
    let held_before = holders(before);
    let owners_before = owners(before);
    for p in &after.partitions {
        let shard = p.partition.split('/').next().unwrap_or_default();
        if owners_before.get(&p.partition).map(|o| o.0) != Some(p.owner) {
            assert!(
                p.owner.is_some_and(|o| held_before[shard].contains(&o)),
                "{} moved to {:?}, not a standby of {:?}",
                p.partition,
                p.owner,
                held_before[shard]
            );
        }
    }
}

/// Partition id of a source partition of the replica view (it names the
/// shard's store view).
fn replica_partition(p: i32) -> String {
    let shard = ndc_operators::shard::of_partition(p, SHARDS);
    format!(
        "{}/{TOPIC}/{p}",
        ndc_operators::shard::store_name("citizens", shard, SHARDS)
    )
}

/// The cluster runs with mutual TLS on both listeners: one development CA
/// for this test process, a certificate per node (`ndc-N`, as
/// `cluster.peer_identity` expects), and the test itself calls the nodes as
/// `admin` (configured in `access.admins`, and granted every view once the
/// cluster is up).
struct Pki {
    files: ndc_node::security::certs::DevCertificates,
    nodes: Vec<(PathBuf, PathBuf)>,
    admin: ndc_node::client::ClientTls,
}

fn pki() -> &'static Pki {
    static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let (files, nodes) =
            ndc_node::security::certs::make_dev_cluster_certificates(&dir, &[], 1, 6).unwrap();
        let admin = ndc_node::client::ClientTls {
            ca: Some(files.ca.clone()),
            cert: Some(files.admin_cert.clone()),
            key: Some(files.admin_key.clone()),
        };
        ndc_node::client::set_default_tls(admin.clone());
        Pki {
            files,
            nodes,
            admin,
        }
    })
}

/// A member's configuration (its id, data directory and the bootstrap
/// list are the fixture's to set).
fn member_config(dir: &Path, broker: &str, id: u64, edit: fn(&mut NodeConfig)) -> NodeConfig {
    let mut c: NodeConfig = node_config(
        &dir.join(format!("ndc-{id}")),
        broker,
        &[("citizens", TOPIC, &["person_id"])],
    );
    let pki = pki();
    let (cert, key) = &pki.nodes[id as usize];
    c.tls.insecure = false;
    c.tls.cert = Some(cert.clone());
    c.tls.key = Some(key.clone());
    c.tls.client_ca = Some(pki.files.ca.clone());
    c.access.admins = vec!["admin".into()];
    c.cluster = Some(ClusterSection {
        changes_replication: 1,
        // tansu's memory storage has no DeleteRecords.
        log_trim_interval: std::time::Duration::ZERO,
        ..ClusterSection::default()
    });
    edit(&mut c);
    c
}

impl Cluster {
    async fn start(nodes: u64) -> Cluster {
        Cluster::start_with(nodes, &[(TOPIC, PARTITIONS)], replica_member).await
    }

    async fn start_with(nodes: u64, topics: &[(&str, i32)], edit: fn(&mut NodeConfig)) -> Cluster {
        Cluster::start_on(Broker::start(), nodes, topics, edit).await
    }

    async fn start_on(
        broker: Broker,
        nodes: u64,
        topics: &[(&str, i32)],
        edit: fn(&mut NodeConfig),
    ) -> Cluster {
        for (topic, partitions) in topics {
            broker.create_topic(topic, *partitions).await;
        }
        let dir = tempfile::tempdir().unwrap();
        let nodes = ndc_testkit::Cluster::start(
            Path::new(env!("CARGO_BIN_EXE_ndc")),
            dir.path(),
            nodes,
            |id| member_config(dir.path(), &broker.bootstrap, id, edit),
        )
        .unwrap();
        let cluster = Cluster {
            _broker: broker,
            _dir: dir,
            nodes,
            edit,
        };
        cluster.grant_admin_every_view().await;
        cluster
    }

    /// The test reads views as `admin`: a grant, replicated through Raft
    /// to every node (nodes that join later get it with the Raft log).
    async fn grant_admin_every_view(&self) {
        let grant = ndc_proto::v1::GrantInfo {
            principal: "admin".into(),
            role: "admin".into(),
            views: vec!["*".into()],
            purpose: "cluster test".into(),
            ..Default::default()
        };
        let started = Instant::now();
        loop {
            for m in self.members() {
                if let Ok(Ok(_)) = tokio::time::timeout(
                    Duration::from_secs(5),
                    ndc_node::serving::access_api::grant(
                        &m.addr(),
                        Some(&pki().admin),
                        grant.clone(),
                    ),
                )
                .await
                {
                    return;
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                self.dump_logs();
                panic!("the cluster took no grant within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A node that is not part of the bootstrap list (joins by add-node).
    /// Returns its peer address (what `add-node` names).
    fn prepare_joiner(&mut self, id: u64) -> String {
        let config = member_config(self._dir.path(), &self._broker.bootstrap, id, self.edit);
        self.nodes.prepare_joiner(id, config).unwrap()
    }

    /// Starts node `id` anew and adds it to the cluster through `via` (a
    /// member's gRPC address), retrying until it listens.
    async fn join(&mut self, id: u64, via: &str) -> ndc_proto::cluster::MembershipReply {
        let addr = self.prepare_joiner(id);
        self.member(id).start().unwrap();
        let deadline = Instant::now() + SETTLE;
        loop {
            match admin::add_node(via, id, &addr, false).await {
                Ok(m) => return m,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "add-node of ndc-{id} never succeeded: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn member(&mut self, id: u64) -> &mut NodeProcess {
        self.nodes.member(id)
    }

    fn members(&self) -> &[Member] {
        &self.nodes.members
    }

    /// Status from any running node (forwarded to the leader).
    async fn status(&self) -> Option<ClusterStatus> {
        for m in self.members().iter().filter(|m| m.running()) {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(2), admin::status(&m.addr())).await
                && s.leader_id.is_some()
                && self
                    .members()
                    .iter()
                    .any(|x| Some(x.id) == s.leader_id && x.running())
            {
                return Some(s);
            }
        }
        None
    }

    /// Waits until `ok` holds for the status, returning it and the time taken.
    async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&ClusterStatus) -> bool,
    ) -> (ClusterStatus, Duration) {
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < timeout {
            if let Some(s) = self.status().await {
                if ok(&s) {
                    return (s, started.elapsed());
                }
                last = Some(s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.dump_logs();
        panic!("timed out after {timeout:?} waiting for {what}; last status: {last:#?}");
    }

    fn dump_logs(&self) {
        self.nodes.dump_logs(30);
    }
}

/// Diagnostics: the change-log records that touch `keys`, and the fences of
/// their partitions, in log order.
fn log_history(cluster: &Cluster, keys: &[&String], partition_of: &BTreeMap<String, i32>) {
    use prost::Message as _;
    use rdkafka::message::Message as _;
    let log: Vec<_> = (0..SHARDS)
        .flat_map(|s| {
            cluster._broker.read_all(
                &format!("ndc.changes.citizens.shard{s}"),
                usize::MAX,
                Duration::from_secs(5),
            )
        })
        .collect();
    let parts: BTreeSet<String> = keys
        .iter()
        .filter_map(|k| partition_of.get(*k))
        .map(|p| replica_partition(*p))
        .collect();
    for member in cluster.members() {
        let text = std::fs::read_to_string(member.node.log_path()).unwrap_or_default();
        for l in text
            .lines()
            .filter(|l| l.contains("change-log gap"))
            .take(5)
        {
            eprintln!("  ndc-{}: {l}", member.id);
        }
    }
    for m in &log {
        let Some(Ok(r)) = m.payload().map(ndc_proto::state::LogRecord::decode) else {
            continue;
        };
        let touches = r
            .effects
            .iter()
            .any(|e| keys.iter().any(|k| e.key == k.as_bytes()));
        if touches || (r.fence && parts.contains(&r.partition)) {
            eprintln!(
                "  log offset {} partition {} epoch {} fence {} source_next {} effects {} touches {touches}",
                m.offset(),
                r.partition,
                r.epoch,
                r.fence,
                r.source_next_offset,
                r.effects.len()
            );
        }
    }
}

fn owners(s: &ClusterStatus) -> BTreeMap<String, (Option<u64>, u64)> {
    s.partitions
        .iter()
        .map(|p| (p.partition.clone(), (p.owner, p.epoch)))
        .collect()
}

/// Every partition owned by one of `live`, loads within one of each other.
fn balanced_over(s: &ClusterStatus, live: &[u64]) -> bool {
    if s.partitions.len() != PARTITIONS as usize {
        return false;
    }
    let mut load: BTreeMap<u64, usize> = live.iter().map(|&n| (n, 0)).collect();
    for p in &s.partitions {
        match p.owner.and_then(|o| load.get_mut(&o)) {
            Some(c) => *c += 1,
            None => return false,
        }
    }
    let max = load.values().max().copied().unwrap_or(0);
    let min = load.values().min().copied().unwrap_or(0);
    max - min <= 1
}

fn live_members(s: &ClusterStatus) -> BTreeSet<u64> {
    s.members.iter().filter(|m| m.live).map(|m| m.id).collect()
}

/// Partitions that moved got a higher epoch; the others kept theirs.
fn check_epochs(
    before: &BTreeMap<String, (Option<u64>, u64)>,
    after: &BTreeMap<String, (Option<u64>, u64)>,
) {
    for (p, (owner, epoch)) in after {
        let (old_owner, old_epoch) = before[p];
        if *owner == old_owner {
            assert!(*epoch >= old_epoch, "{p}: epoch went back");
        } else {
            assert!(
                *epoch > old_epoch,
                "{p}: moved {old_owner:?} -> {owner:?} without a new epoch"
            );
        }
    }
}

const SETTLE: Duration = Duration::from_secs(30);
/// Generous for CI; the measured times are printed (docs/cluster.md).
const FAILOVER_BOUND: Duration = Duration::from_secs(10);

/// Many people, few events each: losing an event usually leaves a stale or
/// missing row behind (updates carry whole rows, so with few people a later
/// update would hide a loss).
const PEOPLE: u64 = 5000;

/// Expected rows by partition: key → row.
type Expected = Arc<Mutex<BTreeMap<i32, BTreeMap<String, Value>>>>;

/// Publishes inserts, updates and deletes (with tombstones) of `PEOPLE`
/// people until stopped; person `i` always goes to partition `i % 6`.
fn start_load(
    bootstrap: &str,
    stop: Arc<AtomicBool>,
    expected: Expected,
    idempotent: bool,
) -> tokio::task::JoinHandle<u64> {
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", idempotent.to_string())
        // In order without idempotence too (a resent batch may repeat
        // changes: the replica drops them by version).
        .set(
            "max.in.flight.requests.per.connection",
            if idempotent { "5" } else { "1" },
        )
        .set("linger.ms", "2")
        .create()
        .unwrap();
    tokio::spawn(async move {
        let mut feed = feed::Citizens::default();
        let mut rng = Rng::new(7);
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let i = rng.below(PEOPLE);
            let partition = (i % PARTITIONS as u64) as i32;
            let change = feed.change(i, rng.below(100) < 10, true);
            for e in &change.events {
                let mut r = FutureRecord::<[u8], [u8]>::to(TOPIC)
                    .key(&e.key[..])
                    .partition(partition);
                if let Some(v) = &e.value {
                    r = r.payload(&v[..]);
                }
                producer.send(r, Duration::from_secs(10)).await.unwrap();
            }
            {
                let mut expected = expected.lock().unwrap();
                let rows = expected.entry(partition).or_default();
                match change.row {
                    Some(row) => rows.insert(change.key, row),
                    None => rows.remove(&change.key),
                };
            }
            sent += 1;
            if sent.is_multiple_of(20) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        sent
    })
}

/// The rows a node serves, from a snapshot subscription.
async fn snapshot_rows(addr: &str) -> BTreeMap<String, Value> {
    let lines = collect(
        addr.parse().unwrap(),
        "citizens",
        From::Snapshot,
        Duration::from_secs(10),
        |l| {
            l.last()
                .is_some_and(|x| x.get("snapshot_complete").is_some())
        },
    )
    .await;
    fold(&lines)
}

fn partitions_of_keys() -> BTreeMap<String, i32> {
    (0..PEOPLE)
        .map(|i| {
            (
                json!({"person_id": national_id(i).to_string()}).to_string(),
                (i % PARTITIONS as u64) as i32,
            )
        })
        .collect()
}

/// A steady load on the source topic, the reference state it implies, and a
/// subscriber that knows several nodes and resumes on the next one with its
/// token whenever its node goes away.
struct Workload {
    stop: Arc<AtomicBool>,
    expected: Expected,
    load: tokio::task::JoinHandle<u64>,
    seen: Arc<Mutex<Vec<Value>>>,
    subscriber: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Workload {
    /// Starts the load, and a subscriber trying the nodes `ids` in order.
    fn start(cluster: &Cluster, ids: &[u64]) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let expected: Expected = Arc::default();
        let load = start_load(
            &cluster._broker.bootstrap,
            stop.clone(),
            expected.clone(),
            true,
        );
        let addrs: Vec<String> = ids
            .iter()
            .map(|id| {
                cluster
                    .members()
                    .iter()
                    .find(|m| m.id == *id)
                    .unwrap()
                    .addr()
            })
            .collect();
        let (seen, subscriber) = follow(addrs.join(","), "citizens");
        Workload {
            stop,
            expected,
            load,
            seen,
            subscriber,
        }
    }

    /// Stops the load, then checks that every running node serves exactly
    /// the reference rows (all partitions) and that the subscriber, after its
    /// snapshot, saw one gapless sequence of changes: nothing lost, nothing
    /// twice, across every failover.
    /// `cluster_metrics`: what some node must have counted besides the
    /// metrics every scenario produces.
    /// Returns the reference rows.
    async fn finish(self, cluster: &Cluster, cluster_metrics: &[&str]) -> BTreeMap<String, Value> {
        let Workload {
            stop,
            expected,
            load,
            seen,
            mut subscriber,
        } = self;
        stop.store(true, Ordering::Relaxed);
        let sent = load.await.unwrap();
        eprintln!("load: {sent} records published during the scenarios");
        let (s, t) = cluster
            .wait_for(
                "every owner caught up (lag 0)",
                Duration::from_secs(60),
                |s| s.partitions.iter().all(|p| p.running && p.lag == Some(0)),
            )
            .await;
        eprintln!("owners caught up {t:?} after the load stopped");
        let expected = expected.lock().unwrap().clone();
        let addrs: BTreeMap<u64, String> = cluster
            .members()
            .iter()
            .filter(|m| m.running())
            .map(|m| (m.id, m.addr()))
            .collect();
        let partition_of = partitions_of_keys();
        let mut rows_by_node: BTreeMap<u64, BTreeMap<String, Value>> = BTreeMap::new();
        for (id, addr) in &addrs {
            rows_by_node.insert(*id, snapshot_rows(addr).await);
        }
        let _ = (&s, &partition_of);
        let everything: BTreeMap<String, Value> = expected
            .values()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Every node serves every partition, caught up through the change log.
        for id in addrs.keys() {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let rows = &rows_by_node[id];
                if rows == &everything {
                    break;
                }
                if Instant::now() >= deadline {
                    let differing: Vec<&String> = everything
                        .iter()
                        .filter(|(k, v)| rows.get(*k) != Some(v))
                        .map(|(k, _)| k)
                        .take(5)
                        .collect();
                    // What every node and the input say of those keys.
                    for k in &differing {
                        eprintln!(
                            "key {k} (partition {:?}): expected {}",
                            partition_of.get(*k),
                            everything[*k]
                        );
                        for (n, r) in &rows_by_node {
                            eprintln!("  ndc-{n}: {:?}", r.get(*k).map(|v| v.to_string()));
                        }
                    }
                    log_history(cluster, &differing, &partition_of);
                    cluster.dump_logs();
                    panic!(
                        "ndc-{id} serves {} rows, expected {}; differing keys: {differing:?}",
                        rows.len(),
                        everything.len(),
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                rows_by_node.insert(*id, snapshot_rows(&addrs[id]).await);
            }
        }
        // The subscriber converged to the same rows, and after its snapshot it
        // saw one gapless sequence of changes across all its failovers.
        let deadline = Instant::now() + Duration::from_secs(30);
        while fold(&seen.lock().unwrap()) != everything {
            if subscriber.is_finished() || Instant::now() >= deadline {
                let outcome = if subscriber.is_finished() {
                    format!("ended: {:?}", (&mut subscriber).await)
                } else {
                    "still running".into()
                };
                // Where each shard stands for the subscriber, and on a node.
                let mut top: BTreeMap<u64, u64> = BTreeMap::new();
                for l in seen.lock().unwrap().iter() {
                    if let Some(seq) = l.get("seq").and_then(Value::as_u64) {
                        let shard = l.get("shard").and_then(Value::as_u64).unwrap_or(0);
                        let t = top.entry(shard).or_default();
                        *t = (*t).max(seq);
                    }
                }
                eprintln!("subscriber per shard: {top:?}");
                for (id, addr) in &addrs {
                    eprintln!(
                        "ndc-{id} committed: {:?}",
                        committed_seqs(addr, "citizens").await
                    );
                }
                if let Some(s) = cluster.status().await {
                    eprintln!("holders: {:?}", holders(&s));
                }
                cluster.dump_logs();
                panic!("the subscriber did not converge; its task: {outcome}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Until it has seen the view's last commit: a duplicate delivered
        // after a failover would have come before it.
        let (id, addr) = addrs.iter().next().unwrap();
        let committed = committed_seq(addr, "citizens").await;
        eventually(
            &format!("the subscriber at ndc-{id}'s last commit {committed}"),
            Duration::from_secs(30),
            || last_seq(&seen.lock().unwrap()) == committed,
        )
        .await;
        subscriber.abort();
        let lines = seen.lock().unwrap().clone();
        // Across every failover.
        let seqs = seqs_after_snapshot(&lines);
        eprintln!(
            "subscriber: {} changes after its snapshot, exactly once",
            seqs.len()
        );
        assert_eq!(fold(&lines), everything);

        // Cluster metrics: Raft state on every running node; assignment
        // changes, failovers and restores recorded somewhere.
        let mut all = String::new();
        for m in cluster.members().iter().filter(|m| m.running()) {
            // A node restarted a moment ago exports its Raft gauges once
            // its Raft state has been reported; wait for that.
            let text = eventually_async(
                &format!("ndc-{}'s cluster metrics", m.id),
                SETTLE,
                || async {
                    let text = metrics_text(m.node.http()).await;
                    ["ndc_raft_commit_index", "ndc_cluster_lease_valid 1"]
                        .iter()
                        .all(|n| text.contains(n))
                        .then_some(text)
                },
            )
            .await;
            for l in text
                .lines()
                .filter(|l| l.starts_with("ndc_cluster_log_gaps_total"))
            {
                eprintln!("ndc-{}: {l}", m.id);
            }
            for name in [
                "ndc_raft_term",
                "ndc_raft_is_leader",
                "ndc_raft_commit_index",
                "ndc_raft_applied_index",
                "ndc_cluster_lease_valid 1",
                "ndc_cluster_log_read_bytes_total",
            ] {
                assert!(text.contains(name), "ndc-{}: {name} missing", m.id);
            }
            all.push_str(&text);
        }
        for name in cluster_metrics.iter().copied().chain([
            "ndc_cluster_restore_duration_seconds_count",
            "ndc_cluster_assignment_changes_total",
            "ndc_cluster_log_written_bytes_total",
            "ndc_cluster_log_records_total{outcome=\"fence\"}",
        ]) {
            assert!(all.contains(name), "{name} missing from every node");
        }
        everything
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_fail_over_when_nodes_die_and_rebalance_when_they_return() {
    let mut cluster = Cluster::start(3).await;
    cluster._broker.create_topic("ndc.dead-letter", 1).await;
    let work = Workload::start(&cluster, &[0, 1, 2]);
    let (s, t) = cluster
        .wait_for("three live members and balanced placement", SETTLE, |s| {
            live_members(s).len() == 3 && placed_over(s, &[0, 1, 2])
        })
        .await;
    eprintln!(
        "cluster formed and placed in {t:?}: leader {:?}, holders {:?}",
        s.leader_id,
        holders(&s)
    );
    // A node reads the change logs of the shards it holds, no others.
    for m in cluster.members() {
        let held = holders(&s).values().filter(|h| h.contains(&m.id)).count();
        let http = m.node.http();
        eventually_async(
            &format!("ndc-{} reading the logs of its {held} shards", m.id),
            SETTLE,
            || async move {
                let text = metrics_text(http).await;
                metric_value(&text, |l| l.starts_with("ndc_cluster_logs_read "))
                    .filter(|n| *n == held as f64)
            },
        )
        .await;
    }
    // Each source partition belongs to the shard `p mod SHARDS` names.
    let registered: BTreeSet<String> = owners(&s).into_keys().collect();
    let want: BTreeSet<String> = (0..PARTITIONS).map(replica_partition).collect();
    assert_eq!(registered, want);

    // `./dev.sh soak` (NDC_SOAK=1): the cycle of failures ten times over.
    let rounds = if std::env::var("NDC_SOAK").is_ok() {
        10
    } else {
        1
    };
    let _ = s;
    for round in 0..rounds {
        eprintln!("round {round}");
        let (s, _) = cluster
            .wait_for("a balanced cluster before the round", SETTLE, |s| {
                // Placed too: no holder kept while another catches up.
                live_members(s).len() == 3 && placed_over(s, &[0, 1, 2])
            })
            .await;
        // 1. kill -9 a follower: not the subscriber's node (0) when it can
        // be helped, so that the subscriber reads on through node 0's fan-in.
        let leader = s.leader_id.unwrap();
        let follower = match leader {
            // Either will do: the one node 0 reads shards from, if one.
            0 if streams_served(&cluster, 2).await > streams_served(&cluster, 1).await => 2,
            0 => 1,
            _ => (1..3).find(|&i| i != leader).unwrap(),
        };
        let before = owners(&s);
        let status_before = s.clone();
        // Shards node 0 reads from the follower: their streams break and
        // re-route. Which holder of a shard node 0 reads from is the one
        // that was first when its stream opened (placement may have
        // reordered them since), so the follower's own count of the shard
        // streams it serves says whether there are any (node 0 has the only
        // subscriber). With the leader's kill below, at least one of the
        // two breaks some: node 0 holds only some shards.
        let rerouted_before = rerouted(&cluster, 0).await;
        let streams_on_follower = streams_served(&cluster, follower).await;
        let read_from_follower: Vec<String> = holders(&s)
            .into_iter()
            .filter(|(_, h)| !h.contains(&0) && h.contains(&follower))
            .map(|(shard, _)| shard)
            .collect();
        cluster.member(follower).kill9();
        let survivors: Vec<u64> = (0..3).filter(|&i| i != follower).collect();
        let (s, t) = cluster
            .wait_for("follower's partitions to move", FAILOVER_BOUND, |s| {
                balanced_over(s, &survivors)
            })
            .await;
        eprintln!("follower {follower} killed: partitions moved to standbys in {t:?}");
        let mut rerouting_shown = false;
        if follower != 0 && streams_on_follower > 0.0 && round == 0 {
            // The subscriber on node 0 read these from the follower; the
            // final check shows it saw their changes once each.
            rerouting_shown |= rerouted_within(&cluster, rerouted_before).await;
            eprintln!(
                "node 0 re-routed {streams_on_follower} of {read_from_follower:?} to their standbys"
            );
        }
        check_epochs(&before, &owners(&s));
        moved_to_standbys(&status_before, &s);

        // It comes back (state kept): partitions rebalance onto it.
        cluster.member(follower).start().unwrap();
        let (s, t) = cluster
            .wait_for("rebalance onto the returning follower", SETTLE, |s| {
                live_members(s).len() == 3 && balanced_over(s, &[0, 1, 2])
            })
            .await;
        eprintln!("follower {follower} back: rebalanced in {t:?}");

        // 2. kill -9 the leader.
        let leader = s.leader_id.unwrap();
        let before = owners(&s);
        let status_before = s.clone();
        let rerouted_before = rerouted(&cluster, 0).await;
        let streams_on_leader = streams_served(&cluster, leader).await;
        cluster.member(leader).kill9();
        let survivors: Vec<u64> = (0..3).filter(|&i| i != leader).collect();
        let (s, t) = cluster
            .wait_for(
                "a new leader and the old leader's partitions moved",
                FAILOVER_BOUND,
                |s| s.leader_id.is_some_and(|l| l != leader) && balanced_over(s, &survivors),
            )
            .await;
        eprintln!(
            "leader {leader} killed: new leader {:?}, partitions moved in {t:?}",
            s.leader_id
        );
        check_epochs(&before, &owners(&s));
        moved_to_standbys(&status_before, &s);
        if leader != 0 && streams_on_leader > 0.0 && round == 0 {
            rerouting_shown |= rerouted_within(&cluster, rerouted_before).await;
            eprintln!(
                "node 0 read {streams_on_leader} shard stream(s) from the dead leader; re-routed since a kill: {rerouting_shown}"
            );
        }

        // 3. Stopped for longer than the failure timeout (its partitions
        // moved, which takes that long), then back.
        cluster.member(leader).start().unwrap();
        let (s, _) = cluster
            .wait_for("rebalance after the old leader returns", SETTLE, |s| {
                live_members(s).len() == 3 && balanced_over(s, &[0, 1, 2])
            })
            .await;
        assert_eq!(s.members.len(), 3);

        // 4. Frozen (SIGSTOP) for longer than the failure timeout while owning
        // partitions: they move; when it thaws its lease has expired, it stops
        // acting on them, and the cluster rebalances onto it.
        let frozen = s.leader_id.map(|l| (l + 1) % 3).unwrap();
        let before = owners(&s);
        cluster.member(frozen).signal("-STOP").unwrap();
        let survivors: Vec<u64> = (0..3).filter(|&i| i != frozen).collect();
        let (s, t) = cluster
            .wait_for(
                "the frozen node's partitions to move",
                FAILOVER_BOUND,
                |s| balanced_over(s, &survivors),
            )
            .await;
        eprintln!("node {frozen} frozen: partitions moved in {t:?}");
        check_epochs(&before, &owners(&s));
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.member(frozen).signal("-CONT").unwrap();
        let (s, _) = cluster
            .wait_for("rebalance after the frozen node thaws", SETTLE, |s| {
                live_members(s).len() == 3 && balanced_over(s, &[0, 1, 2])
            })
            .await;

        // 4b. Frozen for longer than the lease but shorter than the failure
        // timeout, a few times: its lease lapses, its partitions stay (same
        // epochs). Records it drew before the lapse are dropped, not decided
        // — and the rest of what its consumer drew then must not be decided
        // either, or the stored offset would jump past the dropped ones
        // (lost updates: the final check below compares every row).
        // The pauses are the scenario, not a wait for something: between
        // the lease and the failure timeout, then as long again running.
        let paused = s.leader_id.map(|l| (l + 2) % 3).unwrap();
        let timing = ClusterSection::default();
        let pause = (timing.lease + timing.failure_timeout) / 2;
        assert!(timing.lease < pause && pause < timing.failure_timeout);
        for _ in 0..3 {
            cluster.member(paused).signal("-STOP").unwrap();
            tokio::time::sleep(pause).await;
            cluster.member(paused).signal("-CONT").unwrap();
            tokio::time::sleep(pause).await;
        }
    }

    // 5. A node loses its disk (kill -9, data directory wiped, restart):
    // it rejoins with an empty Raft log, the leader catches it up, and it
    // starts from a copy of a peer's state store, then tails the change
    // logs from the positions the copy holds (finish() checks its rows).
    let s = cluster
        .wait_for("a balanced cluster", SETTLE, |s| {
            live_members(s).len() == 3 && balanced_over(s, &[0, 1, 2])
        })
        .await
        .0;
    let wiped = s.leader_id.map(|l| (l + 2) % 3).unwrap();
    cluster.member(wiped).kill9();
    std::fs::remove_dir_all(cluster._dir.path().join(format!("ndc-{wiped}"))).unwrap();
    cluster.member(wiped).start().unwrap();
    let (_, t) = cluster
        .wait_for("the wiped node back with its share", SETTLE, |s| {
            live_members(s).len() == 3 && balanced_over(s, &[0, 1, 2])
        })
        .await;
    // Asked through the wiped node itself: it knows the leader again (its
    // Raft log was re-replicated), and its partitions are running.
    let wiped_addr = cluster.member(wiped).grpc().to_string();
    let started = Instant::now();
    loop {
        if let Ok(s) = admin::status(&wiped_addr).await
            && s.leader_id.is_some_and(|l| l != wiped)
            && s.members.len() == 3
            && s.members.iter().any(|m| m.id == wiped && m.live)
            && s.partitions
                .iter()
                .filter(|p| p.owner == Some(wiped))
                .all(|p| p.running)
        {
            break;
        }
        assert!(started.elapsed() < SETTLE, "the wiped node did not rejoin");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "node {wiped} lost its data directory: rejoined in {:?}",
        t + started.elapsed()
    );
    let log = std::fs::read_to_string(cluster.member(wiped).log_path()).unwrap();
    let copied = log
        .lines()
        .rev()
        .find(|l| l.contains("started from a copy of a peer's state"))
        .unwrap_or_else(|| {
            panic!(
                "the wiped node copied no state:\n{}",
                cluster.member(wiped).log_tail(30)
            )
        });
    eprintln!("node {wiped}: {copied}");

    // The CLI shows the same picture.
    let admin = &pki().admin;
    let out = Command::new(env!("CARGO_BIN_EXE_ndc"))
        .env("NDC_CA", admin.ca.as_ref().unwrap())
        .env("NDC_CERT", admin.cert.as_ref().unwrap())
        .env("NDC_KEY", admin.key.as_ref().unwrap())
        .args([
            "cluster",
            "status",
            "--json",
            "--addr",
            &cluster.members()[0].addr(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["members"].as_array().unwrap().len(), 3);
    assert_eq!(
        json["partitions"].as_array().unwrap().len(),
        PARTITIONS as usize
    );
    assert!(json["leader"].as_u64().is_some());
    // And where each shard is held, owner first.
    let shards = json["shards"].as_array().unwrap();
    assert_eq!(shards.len(), SHARDS as usize);
    assert!(
        shards
            .iter()
            .all(|p| p["holders"].as_array().map(Vec::len) == Some(REPLICATION_FACTOR)),
        "{shards:?}"
    );

    // The subscriber's node holds some shards; it read the others from
    // their holders.
    work.finish(
        &cluster,
        &[
            "ndc_cluster_failover_seconds_count",
            "ndc_subscription_remote_shards_total{outcome=\"opened\"}",
        ],
    )
    .await;
    // Every shard wrote a change log of its own.
    for shard in 0..SHARDS {
        let topic = format!("ndc.changes.citizens.shard{shard}");
        let records = cluster._broker.read_all(&topic, 1, Duration::from_secs(10));
        assert!(!records.is_empty(), "{topic} is empty");
    }

    // A log record with an effect on a view no node holds (written by a
    // node running another pipeline version) is skipped and counted on
    // every node that reads that log (the holders of shard 0); none stops
    // or crash-loops on it.
    use prost::Message as _;
    let ghost = ndc_proto::state::LogRecord {
        view: "citizens#0".into(),
        epoch: 1,
        partition: format!("citizens#0/{TOPIC}.ghost/0"),
        source_stream: format!("kafka:{TOPIC}.ghost:0"),
        source_next_offset: 1,
        fence: false,
        effects: vec![ndc_proto::state::Effect {
            key: br#"{"person_id":"000000000000"}"#.to_vec(),
            view: "ghost.view".into(),
            kind: Some(ndc_proto::state::effect::Kind::Remove(true)),
            ..Default::default()
        }],
    };
    publish(
        &cluster._broker.producer(),
        "ndc.changes.citizens.shard0",
        Some(ghost.partition.as_bytes()),
        Some(&ghost.encode_to_vec()),
    )
    .await;
    let shard0 = cluster
        .status()
        .await
        .map(|s| holders(&s)["citizens#0"].clone())
        .unwrap();
    for m in cluster.members().iter().filter(|m| shard0.contains(&m.id)) {
        let http = m.node.http();
        eventually_async(
            "every holder of shard 0 counts the record naming an unknown view",
            Duration::from_secs(30),
            || async move {
                let text = metrics_text(http).await;
                metric_value(&text, |l| {
                    l.starts_with("ndc_cluster_log_records_total")
                        && l.contains(r#"outcome="unknown_view""#)
                })
                .filter(|n| *n >= 1.0)
            },
        )
        .await;
    }
    let (s, _) = cluster
        .wait_for("every node still live", SETTLE, |s| {
            live_members(s).len() == 3
        })
        .await;
    assert!(s.members.iter().all(|m| m.live));
}

/// The longest time, between `from` and now, that the subscriber's line
/// count (sampled every 10 ms into `samples`) did not grow.
fn longest_stall(samples: &Mutex<Vec<(Instant, usize)>>, from: Instant) -> Duration {
    let samples = samples.lock().unwrap();
    let mut stall = Duration::ZERO;
    let mut last_growth: Option<(Instant, usize)> = None;
    for &(at, n) in samples.iter().filter(|(at, _)| *at >= from) {
        match last_growth {
            Some((since, count)) if n == count => stall = stall.max(at - since),
            _ => last_growth = Some((at, n)),
        }
    }
    stall
}

/// A rolling restart under load: each node in turn gets SIGTERM, hands its
/// partitions to the others before it exits (it says so in its log, and
/// exits 0), and comes back. The cluster never waits `failure_timeout` for
/// it; nothing is lost or delivered twice; the subscriber fails over with
/// its token. How long the subscriber saw no change during each restart is
/// measured and printed (docs/cluster.md records the figures; not asserted
/// tightly on a shared 2-core machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_hands_partitions_over_before_each_node_stops() {
    let mut cluster = Cluster::start(3).await;
    cluster._broker.create_topic("ndc.dead-letter", 1).await;
    let work = Workload::start(&cluster, &[0, 1, 2]);
    let samples: Arc<Mutex<Vec<(Instant, usize)>>> = Arc::default();
    let sampler = {
        let (seen, samples) = (work.seen.clone(), samples.clone());
        tokio::spawn(async move {
            loop {
                let n = seen.lock().unwrap().len();
                samples.lock().unwrap().push((Instant::now(), n));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let (s, _) = cluster
        .wait_for("three live members and balanced partitions", SETTLE, |s| {
            live_members(s).len() == 3 && balanced_over(s, &[0, 1, 2])
        })
        .await;
    // Followers first, the leader last (it also hands Raft leadership over
    // before it stops).
    let leader = s.leader_id.unwrap();
    let order: Vec<u64> = (0..3).filter(|&i| i != leader).chain([leader]).collect();
    for id in order {
        let (s, _) = cluster
            .wait_for("a balanced cluster before the restart", SETTLE, |s| {
                live_members(s).len() == 3 && balanced_over(s, &[0, 1, 2])
            })
            .await;
        let before = owners(&s);
        // The leader now (an election under load may have moved it).
        let leads = s.leader_id == Some(id);
        let from = Instant::now();
        cluster.member(id).signal("-TERM").unwrap();
        // While it drains and stops it says it is not ready (load balancers
        // send new subscribers elsewhere).
        let http = cluster.member(id).http();
        let mut said_not_ready = false;
        let deadline = Instant::now() + SETTLE;
        let exited = loop {
            if let Some(status) = cluster.member(id).exited().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "ndc-{id} did not exit after SIGTERM"
            );
            // Short: once the process is gone its (kept) socket answers
            // nothing, and this would delay noticing the exit.
            if let Ok(Ok(text)) = tokio::time::timeout(
                Duration::from_millis(200),
                ndc_testkit::wait::try_http_get(http, "/readyz"),
            )
            .await
            {
                said_not_ready |= text.starts_with("HTTP/1.1 503");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            said_not_ready,
            "ndc-{id} never said it was not ready while stopping"
        );
        let stopped_in = from.elapsed();
        assert!(exited.success(), "ndc-{id} exited with {exited}");
        let log = cluster.member(id).log_tail(200);
        assert!(
            log.lines()
                .rev()
                .take_while(|l| !l.contains("node started"))
                .any(|l| l.contains("partitions handed over")),
            "ndc-{id} stopped without handing its partitions over:\n{log}"
        );
        if leads {
            assert!(
                log.lines()
                    .rev()
                    .take_while(|l| !l.contains("node started"))
                    .any(|l| l.contains("Raft leadership handed over")),
                "the leader ndc-{id} stopped without handing Raft leadership over:\n{log}"
            );
        }
        cluster.member(id).kill9(); // reaped already; forgets the process
        // Handed over before the node was gone: the first status after its
        // exit already shows none of its partitions on it (a node killed
        // keeps them for `failure_timeout`).
        let s = eventually_async("a cluster status", SETTLE, || cluster.status()).await;
        let still: Vec<String> = owners(&s)
            .into_iter()
            .filter(|(_, (owner, _))| *owner == Some(id))
            .map(|(p, _)| p)
            .collect();
        assert!(
            still.is_empty(),
            "ndc-{id} still owns {still:?} after it stopped"
        );
        let others: Vec<u64> = (0..3).filter(|&i| i != id).collect();
        let (s, _) = cluster
            .wait_for(
                "the stopped node's partitions on the others",
                FAILOVER_BOUND,
                |s| balanced_over(s, &others),
            )
            .await;
        check_epochs(&before, &owners(&s));
        cluster.member(id).start().unwrap();
        cluster
            .wait_for("the restarted node back with its share", SETTLE, |s| {
                live_members(s).len() == 3 && balanced_over(s, &[0, 1, 2])
            })
            .await;
        eprintln!(
            "ndc-{id} restarted: stopped {stopped_in:?} after SIGTERM; subscriber's longest stall {:?}",
            longest_stall(&samples, from)
        );
    }
    sampler.abort();
    work.finish(&cluster, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_removed_and_added_online() {
    let mut cluster = Cluster::start(3).await;
    cluster._broker.create_topic("ndc.dead-letter", 1).await;
    // The subscriber starts on node 2, the one that will be removed.
    let work = Workload::start(&cluster, &[2, 0, 1]);
    cluster
        .wait_for("three live members and balanced partitions", SETTLE, |s| {
            live_members(s).len() == 3 && balanced_over(s, &[0, 1, 2])
        })
        .await;

    // Remove node 2 (through node 0, whichever is leader): its partitions move.
    let addr0 = cluster.members()[0].addr();
    let m = admin::remove_node(&addr0, 2).await.unwrap();
    assert_eq!(m.voters, vec![0, 1]);
    let (s, t) = cluster
        .wait_for("node 2's partitions to move", FAILOVER_BOUND, |s| {
            s.members.len() == 2 && balanced_over(s, &[0, 1])
        })
        .await;
    eprintln!("node 2 removed: partitions moved in {t:?}");
    assert!(s.members.iter().all(|m| m.id != 2));
    cluster.member(2).kill9();

    // Shards node 2 held have their second holder with the state again.
    let leader = s.leader_id.unwrap();
    eventually_async("no shard under-replicated", SETTLE, || async {
        (under_replicated(&cluster, leader).await == 0.0).then_some(())
    })
    .await;
    // From here on, while node 3 joins and takes standbys, every shard keeps
    // two holders with its state (make before break): sampled throughout.
    let joining = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watch_join = {
        let (http, joining) = (cluster.member(leader).http(), joining.clone());
        let peer = cluster
            .members()
            .iter()
            .find(|m| m.id == leader)
            .unwrap()
            .addr();
        tokio::spawn(async move {
            let (mut worst, mut widest) = (0.0f64, 0usize);
            while joining.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(v) = metric_value(&metrics_text(http).await, |l| {
                    l.starts_with("ndc_cluster_under_replicated_shards ")
                }) {
                    worst = worst.max(v);
                }
                if let Ok(s) = admin::status(&peer).await {
                    let most = s.shards.iter().map(|sh| sh.holders.len()).max();
                    widest = widest.max(most.unwrap_or(0));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (worst, widest)
        })
    };

    // A new node 3 joins as learner, catches up, becomes a voter, gets work.
    let m = cluster.join(3, &addr0).await;
    assert_eq!(m.voters, vec![0, 1, 3]);
    let (s, t) = cluster
        .wait_for("rebalance onto node 3", SETTLE, |s| {
            live_members(s) == BTreeSet::from([0, 1, 3]) && balanced_over(s, &[0, 1, 3])
        })
        .await;
    eprintln!("node 3 added: rebalanced in {t:?}");
    assert!(s.members.iter().any(|m| m.id == 3 && m.role == "voter"));
    // Node 3 caught up: the holders it replaced are gone, none lacks state.
    cluster
        .wait_for("two holders per shard again", SETTLE, |s| {
            s.shards.iter().all(|sh| sh.holders.len() == 2)
                && s.shards.iter().any(|sh| sh.holders.contains(&3))
        })
        .await;
    eventually_async(
        "no shard under-replicated after the join",
        SETTLE,
        || async { (under_replicated(&cluster, leader).await == 0.0).then_some(()) },
    )
    .await;
    joining.store(false, std::sync::atomic::Ordering::Relaxed);
    let (worst, widest) = watch_join.await.unwrap();
    eprintln!(
        "while node 3 joined: {widest} holders at most on a shard, {worst} under-replicated shards at most"
    );
    assert_eq!(
        worst, 0.0,
        "a shard lost a holder with its state while node 3 caught up"
    );
    assert_eq!(
        widest, 3,
        "no replaced holder stayed while node 3 caught up"
    );

    // Removing an unknown node is a clear error.
    let err = admin::remove_node(&addr0, 42)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a member"), "{err}");

    // Every node enforces the same grants: a subscriber granted through
    // node 0 reads on node 3 (which joined after the cluster's first
    // grant), and its revocation through node 1 ends that stream within 2 s.
    let pki = pki();
    let subscriber = ndc_node::client::ClientTls {
        ca: Some(pki.files.ca.clone()),
        cert: Some(pki.files.subscriber_cert.clone()),
        key: Some(pki.files.subscriber_key.clone()),
    };
    ndc_node::serving::access_api::grant(
        &addr0,
        Some(&pki.admin),
        ndc_proto::v1::GrantInfo {
            principal: "subscriber".into(),
            role: "subscriber".into(),
            views: vec!["citizens".into()],
            purpose: "cluster test".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let addr3_public = cluster.member(3).grpc().to_string();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let opts = ndc_node::client::SubscribeOptions {
        addr: addr3_public,
        view: "citizens".into(),
        from: From::Latest,
        keys: Vec::new(),
        fields: Vec::new(),
        limit: None,
        progress: true,
        reconnect: false,
        tls: Some(subscriber),
        token: None,
    };
    let stream = tokio::spawn(async move {
        // The grant reaches node 3 through Raft: retry until it serves.
        loop {
            let tx = tx.clone();
            let r = ndc_node::client::subscribe(opts.clone(), move |l| tx.send(l).is_ok()).await;
            match r {
                Err(e) if format!("{e:#}").contains("may not read") => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                other => return other.map_err(|e| format!("{e:#}")),
            }
        }
    });
    // A change about some person, delivered by node 3.
    let person = loop {
        let line: Value = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("node 3 serves the granted subscriber")
            .unwrap();
        if let Some(id) = line["key"]["person_id"].as_str() {
            break id.to_string();
        }
    };
    let addr1 = cluster.member(1).grpc().to_string();
    ndc_node::serving::access_api::revoke(&addr1, Some(&pki.admin), "subscriber")
        .await
        .unwrap();
    let revoked = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(2), stream)
        .await
        .expect("the stream on node 3 ends within 2 s of the revocation on node 1")
        .unwrap();
    let e = ended.expect_err("ended by the revocation");
    assert!(e.contains("revoked"), "{e}");
    eprintln!(
        "revoked on node 1: the stream on node 3 ended after {:?}",
        revoked.elapsed()
    );

    // Node 0 answers who received that person's data on node 3: every
    // node indexes the others' audit chains from the audit topic.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer =
            ndc_node::serving::audit_api::who_accessed(&addr0, Some(&pki.admin), &person, 0)
                .await
                .unwrap();
        let found = answer.records.iter().find(|r| {
            r.node == "ndc-3" && r.principal == "subscriber" && r.purpose == "cluster test"
        });
        if let Some(r) = found {
            assert_eq!(r.view, "citizens");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 0 does not know of node 3's delivery about {person}: {:?}",
            answer.records
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The subscriber's node holds some shards; it read the others from
    // their holders.
    work.finish(
        &cluster,
        &[
            "ndc_cluster_failover_seconds_count",
            "ndc_subscription_remote_shards_total{outcome=\"opened\"}",
        ],
    )
    .await;
}

/// Members of the trimming scenario: the replica scenarios' view, change
/// logs trimmed every 300 ms to 5 records behind their slowest holder,
/// no state copied when a node starts without one (a node that joins must
/// copy each shard it is given from a holder, since its log no longer
/// starts at 0), and no audit trail (its producer would be one more writer
/// on the broker: see the scenario).
fn trimming_member(c: &mut NodeConfig) {
    replica_member(c);
    c.audit.enabled = false;
    if let Some(cluster) = c.cluster.as_mut() {
        cluster.log_trim_interval = Duration::from_millis(300);
        cluster.log_trim_slack = 5;
        cluster.state_from_peers = false;
    }
}

/// The offset of the first record a reader from the start of `topic`
/// (partition 0) gets.
fn first_offset(broker: &Broker, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = broker
        .client()
        .set("group.id", "trim-check")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            return m.offset();
        }
        assert!(Instant::now() < deadline, "nothing to read in {topic}");
    }
}

/// The change logs are trimmed behind their holders, and a node that needs
/// what was trimmed copies the shards from a holder instead.
///
/// On tansu's SlateDB storage, the only storage of the test broker that
/// implements DeleteRecords. It fails concurrent idempotent producers
/// (every idempotent write updates one shared record of producers in a
/// serializable transaction; with three nodes writing their logs at once,
/// their producers got `InvalidProducerEpoch` within seconds and the nodes
/// stopped), so one node writes at a time here: node 0 alone under the
/// load (a producer without idempotence, in order), then node 1 joins once
/// the load has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_logs_are_trimmed_and_a_node_behind_them_copies_its_shards() {
    let mut cluster = Cluster::start_on(
        Broker::start_trimmable(),
        1,
        &[(TOPIC, PARTITIONS)],
        trimming_member,
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let expected: Expected = Arc::default();
    let load = start_load(
        &cluster._broker.bootstrap,
        stop.clone(),
        expected.clone(),
        false,
    );
    let (s, t) = cluster
        .wait_for("every shard's log trimmed", SETTLE, |s| {
            s.shards.len() == SHARDS as usize
                && s.shards.iter().all(|p| p.log_start.is_some_and(|l| l > 0))
        })
        .await;
    eprintln!("every change log trimmed {t:?} after the start");
    // Behind the holder: each log starts before what it applied, and the
    // records before its start are gone from the broker.
    for p in &s.shards {
        let start = p.log_start.unwrap();
        assert_eq!(p.applied.len(), p.holders.len(), "{p:?}");
        assert!(p.applied.iter().all(|a| a.next_offset > start), "{p:?}");
        let topic = ndc_node::cluster::view_log_topic(&ClusterSection::default(), &p.shard, None);
        let first = first_offset(&cluster._broker, &topic);
        assert!(
            first >= start as i64,
            "{topic}: read from {first}, trimmed to {start}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap();
    cluster
        .wait_for("the owner caught up (lag 0)", SETTLE, |s| {
            s.partitions.iter().all(|p| p.running && p.lag == Some(0))
        })
        .await;
    let everything: BTreeMap<String, Value> = expected
        .lock()
        .unwrap()
        .values()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    eprintln!("load: {sent} changes, {} rows", everything.len());

    // Node 1 joins without state: every shard it is given (all of them, at
    // replication factor 2) has a log that no longer starts at 0.
    let addr0 = cluster.members()[0].addr();
    cluster.join(1, &addr0).await;
    let (_, t) = cluster
        .wait_for("both nodes holding every shard", SETTLE, |s| {
            live_members(s).len() == 2 && placed_over(s, &[0, 1])
        })
        .await;
    eprintln!("node 1 placed {t:?} after it joined");
    let http = cluster.member(1).http();
    let installed = copies_installed(&cluster, "each shard", f64::from(SHARDS)).await;
    let sent_copies = copies(&cluster, "sent").await;
    eprintln!("node 1 installed {installed} shard copies; node 0 sent {sent_copies}");
    assert!(sent_copies >= installed);
    // Both nodes serve exactly the reference rows: node 1 its shards from
    // the copies and the logs after them.
    for m in cluster.members() {
        let addr = m.addr();
        let deadline = Instant::now() + SETTLE;
        loop {
            let rows = snapshot_rows(&addr).await;
            if rows == everything {
                break;
            }
            if Instant::now() >= deadline {
                cluster.dump_logs();
                panic!(
                    "ndc-{} serves {} rows, expected {}",
                    m.id,
                    rows.len(),
                    everything.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Node 1's own state (not its fan-in): every shard's change stream at
    // the same sequence as node 0's.
    let (addr0, addr1) = (cluster.members()[0].addr(), cluster.members()[1].addr());
    assert_eq!(
        committed_seqs(&addr1, "citizens").await,
        committed_seqs(&addr0, "citizens").await
    );
    let text = metrics_text(http).await;
    assert_eq!(
        metric_value(&text, |l| l.starts_with("ndc_cluster_logs_read")),
        Some(f64::from(SHARDS)),
        "node 1 applies every shard's log itself"
    );
}

/// Shard copies counted by the running nodes on `side` (sent, installed).
/// Waits until the running nodes installed `at_least` shard copies (`what`).
async fn copies_installed(cluster: &Cluster, what: &str, at_least: f64) -> f64 {
    eventually_async(&format!("a copy of {what} installed"), SETTLE, || async {
        let n = copies(cluster, "installed").await;
        (n >= at_least).then_some(n)
    })
    .await
}

async fn copies(cluster: &Cluster, side: &str) -> f64 {
    let mut sum = 0.0;
    for m in cluster.members().iter().filter(|m| m.running()) {
        let text = metrics_text(m.node.http()).await;
        sum += metric_value(&text, |l| {
            l.starts_with("ndc_cluster_shard_copies_total")
                && l.contains(&format!("side=\"{side}\""))
        })
        .unwrap_or(0.0);
    }
    sum
}

// ---------------------------------------------------------------------------
// Pipelines on the cluster: the citizen golden record of `examples/`.

const GOLDEN_PEOPLE: u64 = 24;
/// Businesses, represented by persons 0..4.
const GOLDEN_BUSINESSES: u64 = 4;
const AGENCIES: [Table; 5] = [
    Table::Citizens,
    Table::Addresses,
    Table::InsuranceCards,
    Table::Vehicles,
    Table::Businesses,
];

fn example_spec() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/national.yaml")
}

/// Members that run only the example pipeline, submitted from each node's
/// `pipelines.files` (the first to reach the leader creates it).
fn pipeline_member(c: &mut NodeConfig) {
    c.views.clear();
    c.pipelines.files = vec![example_spec()];
}

/// What `ListViews` at `addr` says of `view` (as the test's admin).
async fn view_info(
    addr: &str,
    view: &str,
) -> Result<Option<ndc_proto::v1::ViewInfo>, tonic::Status> {
    let mut c = ndc_proto::v1::subscription_client::SubscriptionClient::new(
        ndc_node::client::channel(addr, None).await.unwrap(),
    );
    Ok(c.list_views(ndc_proto::v1::ListViewsRequest {})
        .await?
        .into_inner()
        .views
        .into_iter()
        .find(|v| v.name == view))
}

/// The committed sequence of `view` at `addr`.
async fn committed_seq(addr: &str, view: &str) -> u64 {
    view_info(addr, view)
        .await
        .unwrap()
        .map_or(0, |v| v.committed_seq)
}

/// The committed sequence of each shard of `view` at `addr` (diagnostics:
/// empty if the node does not answer).
async fn committed_seqs(addr: &str, view: &str) -> Vec<u64> {
    view_info(addr, view)
        .await
        .ok()
        .flatten()
        .map_or(Vec::new(), |v| v.committed_seqs)
}

fn socket(addr: &str) -> std::net::SocketAddr {
    addr.parse().unwrap()
}

/// The rows of a view as a subscriber of `addr` sees them after its
/// snapshot, and the resume token that ends the snapshot.
async fn view_rows(addr: &str, view: &str) -> (BTreeMap<String, Value>, Value) {
    let lines = collect(
        socket(addr),
        view,
        From::Snapshot,
        Duration::from_secs(20),
        |l| l.iter().any(|x| x.get("snapshot_complete").is_some()),
    )
    .await;
    let token = lines
        .iter()
        .find(|x| x.get("snapshot_complete").is_some())
        .map(|x| x["resume_token"].clone())
        .unwrap_or_default();
    (fold(&lines), token)
}

/// Publishes every agency's snapshot of the golden scenarios' people.
async fn publish_snapshots(producer: &rdkafka::producer::FutureProducer, feeds: &mut [Feed]) {
    for i in 0..GOLDEN_PEOPLE {
        for (t, feed) in AGENCIES.iter().zip(feeds.iter_mut()) {
            if *t != Table::Businesses || i < GOLDEN_BUSINESSES {
                publish_event(producer, t.topic(), &feed.event('r', i, 0, None)).await;
            }
        }
    }
}

/// Every person has a golden record merged from three agencies.
fn all_merged(r: &BTreeMap<String, Value>) -> bool {
    r.len() == GOLDEN_PEOPLE as usize
        && r.values()
            .all(|g| g["_contributors"].as_array().map(Vec::len) == Some(3))
}

/// Every person's golden record has the phone of citizens' row version `v`.
fn phones_are(v: u32) -> impl Fn(&BTreeMap<String, Value>) -> bool {
    move |r| {
        let g = golden_by_person(r);
        (0..GOLDEN_PEOPLE).all(|i| {
            g.get(&national_id(i).to_string())
                .is_some_and(|g| g["phone"] == citizen_row(i, v)["phone"])
        })
    }
}

/// Every vehicle is joined with its owner, who has the phone of version `v`.
fn owners_phones_are(v: u32) -> impl Fn(&BTreeMap<String, Value>) -> bool {
    move |r| {
        r.len() == GOLDEN_PEOPLE as usize
            && r.values().all(|o| {
                (0..GOLDEN_PEOPLE)
                    .find(|i| o["national_id"] == json!(national_id(*i).to_string()))
                    .is_some_and(|i| o["person"]["phone"] == citizen_row(i, v)["phone"])
            })
    }
}

fn golden_by_person(rows: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    rows.values()
        .map(|v| (v["national_id"].as_str().unwrap().to_string(), v.clone()))
        .collect()
}

/// Waits until `check` holds for `view` on every node of `addrs`, and
/// until every node holds exactly the same rows at the same position of the
/// view's change stream (equal resume tokens: the same incarnation and
/// sequence number everywhere, so a subscriber may resume on any node);
/// returns the rows.
async fn converged(
    cluster: &Cluster,
    addrs: &[String],
    view: &str,
    what: &str,
    check: impl Fn(&BTreeMap<String, Value>) -> bool,
) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut all = Vec::new();
        for a in addrs {
            all.push(view_rows(a, view).await);
        }
        // A node that is (re)starting its data path may not serve the view
        // for a moment: no token yet.
        let served = all.iter().all(|(_, t)| !t.is_null());
        if served && all.iter().all(|(rows, _)| check(rows)) && all.windows(2).all(|w| w[0] == w[1])
        {
            return all.swap_remove(0).0;
        }
        if Instant::now() >= deadline {
            cluster.dump_logs();
            panic!(
                "timed out waiting for {what} in {view} on {addrs:?}; rows per node: {:?}; first node: {:#?}",
                all.iter()
                    .map(|(r, t)| (r.len(), t.clone()))
                    .collect::<Vec<_>>(),
                all.first().map(|(r, _)| r)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_records_are_the_same_on_every_node_through_a_leader_kill_and_a_rule_change() {
    use ndc_node::quickstart::synthetic::insurance_card_row;
    use ndc_node::serving::pipelines_api as pipelines;
    let topics: Vec<(&str, i32)> = AGENCIES
        .iter()
        .map(|t| (t.topic(), 2))
        .chain([("ndc.dead-letter", 1)])
        .collect();
    let mut cluster = Cluster::start_with(3, &topics, pipeline_member).await;
    let producer = cluster._broker.producer();
    let mut feeds: Vec<Feed> = AGENCIES
        .iter()
        .map(|t| Feed::new(*t, 1_767_225_600_000))
        .collect();
    publish_snapshots(&producer, &mut feeds).await;
    let addrs: Vec<String> = cluster.members().iter().map(|m| m.addr()).collect();

    // The spec was replicated to every node; each runs it under one name.
    for a in &addrs {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(list) = pipelines::list(a).await
                && list.iter().any(|p| p.name == "national" && p.version == 1)
            {
                assert!(
                    list[0].repartition_topic.ends_with("national.people.g1"),
                    "{list:?}"
                );
                break;
            }
            if Instant::now() >= deadline {
                cluster.dump_logs();
                panic!("node {a} does not run the spec");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Every node holds the same golden records, conflicts and joins.
    let golden = converged(
        &cluster,
        &addrs,
        "national.people",
        "all people merged",
        all_merged,
    )
    .await;
    let golden = golden_by_person(&golden);
    for i in 0..GOLDEN_PEOPLE {
        let g = &golden[&national_id(i).to_string()];
        assert_eq!(g["full_name"], citizen_row(i, 0)["full_name"]);
        assert_eq!(g["_provenance"]["full_name"]["source"], "population");
    }
    converged(
        &cluster,
        &addrs,
        "national.people.conflicts",
        "conflicts",
        |r| !r.is_empty(),
    )
    .await;
    converged(
        &cluster,
        &addrs,
        "national.vehicle_owners",
        "vehicles joined",
        |r| r.len() == GOLDEN_PEOPLE as usize,
    )
    .await;
    // The pipeline's partitions (five agencies and the repartition topic,
    // two partitions each; four of the repartition topic) are spread over
    // the nodes.
    let (s, _) = cluster
        .wait_for("pipeline partitions owned", SETTLE, |s| {
            s.partitions.len() == 14 && s.partitions.iter().all(|p| p.owner.is_some())
        })
        .await;
    let owners: BTreeSet<u64> = s.partitions.iter().filter_map(|p| p.owner).collect();
    assert!(owners.len() > 1, "spread over nodes: {s:#?}");

    // Under load (every citizen changes phone), the leader is killed: the
    // others take over its partitions and the re-keying of the source
    // shards they feed; nothing is lost, nothing doubled.
    let leader = s.leader_id.unwrap();
    // The same feed: its LSNs go on rising.
    let mut citizens = feeds.swap_remove(0);
    let load = {
        let producer = producer.clone();
        tokio::spawn(async move {
            for i in 0..GOLDEN_PEOPLE {
                publish_event(
                    &producer,
                    Table::Citizens.topic(),
                    &citizens.event('u', i, 1, None),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.member(leader).kill9();
    load.await.unwrap();
    let survivors: Vec<String> = cluster
        .members()
        .iter()
        .filter(|m| m.running())
        .map(|m| m.addr())
        .collect();
    converged(
        &cluster,
        &survivors,
        "national.people",
        "new phones",
        phones_are(1),
    )
    .await;
    converged(
        &cluster,
        &survivors,
        "national.vehicle_owners",
        "owners' new phones",
        owners_phones_are(1),
    )
    .await;
    // The killed node comes back, catches up from the change logs, agrees.
    cluster.member(leader).start().unwrap();
    converged(
        &cluster,
        &addrs,
        "national.people",
        "the returning node caught up",
        phones_are(1),
    )
    .await;

    // Version 2 changes a rule, submitted to a follower (forwarded to the
    // leader): the merge is rebuilt on a fresh repartition topic, the same
    // on every node.
    let text = std::fs::read_to_string(example_spec()).unwrap();
    let v2 = text.replace("version: 1\n", "version: 2\n").replace(
        "        phone:\n          rule: most_recent\n          sources: [population, health]",
        "        phone:\n          rule: priority\n          sources: [health, population]",
    );
    assert_ne!(
        v2,
        text.replace("version: 1\n", "version: 2\n"),
        "rule edited"
    );
    let s = cluster.status().await.unwrap();
    let follower = cluster
        .members()
        .iter()
        .find(|m| Some(m.id) != s.leader_id && m.running())
        .unwrap()
        .addr();
    let r = pipelines::apply(&follower, v2, false).await.unwrap();
    assert_eq!(r.outcome, "updated");
    assert!(r.reset.contains(&"people".to_string()), "{r:?}");
    let golden = converged(&cluster, &addrs, "national.people", "health phones", |r| {
        let g = golden_by_person(r);
        g.len() == GOLDEN_PEOPLE as usize
            && (0..GOLDEN_PEOPLE).all(|i| {
                g.get(&national_id(i).to_string())
                    .is_some_and(|g| g["phone"] == insurance_card_row(i, 0)["mobile"])
            })
    })
    .await;
    assert!(
        golden
            .values()
            .all(|g| g["_provenance"]["phone"]["source"] == "health")
    );
    for a in &addrs {
        let list = pipelines::list(a).await.unwrap();
        assert_eq!(list[0].version, 2);
        assert!(
            list[0].repartition_topic.ends_with("national.people.g2"),
            "{list:?}"
        );
    }
    // The old repartition topic's partitions were forgotten.
    cluster
        .wait_for("only the new generation's partitions", SETTLE, |s| {
            s.partitions.len() == 14 && s.partitions.iter().all(|p| !p.partition.contains(".g1/"))
        })
        .await;

    // Dropped from one node: gone on every node, partitions unregistered.
    let dropped = pipelines::drop_pipeline(&addrs[0], "national")
        .await
        .unwrap();
    assert!(dropped.contains(&"national.people".to_string()));
    for a in &addrs {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pipelines::list(a).await.unwrap().is_empty() {
            assert!(
                Instant::now() < deadline,
                "node {a} still runs the pipeline"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    cluster
        .wait_for("no partitions left", SETTLE, |s| s.partitions.is_empty())
        .await;
}

/// A holder frozen (SIGSTOP) while node 0's subscriber reads shards from
/// it keeps its connections open: node 0 notices its silence (no progress
/// for `PEER_SILENCE`, 3 s) and reads those shards from their standbys,
/// well before HTTP/2 keep-alive would (about 10 s). The subscriber ends
/// with every row, gapless and without duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_holder_is_given_up_on_when_it_falls_silent() {
    let mut cluster = Cluster::start_with(3, &[(TOPIC, PARTITIONS)], replica_member).await;
    let work = Workload::start(&cluster, &[0]);
    cluster
        .wait_for("a placed and balanced cluster", SETTLE, |s| {
            live_members(s).len() == 3 && placed_over(s, &[0, 1, 2])
        })
        .await;
    // Node 0 holds some shards, not all: it reads the others from 1 or 2.
    let holder = eventually_async("node 0 reading shards from a peer", SETTLE, || async {
        let (a, b) = (
            streams_served(&cluster, 1).await,
            streams_served(&cluster, 2).await,
        );
        (a + b > 0.0).then_some(if a >= b { 1 } else { 2 })
    })
    .await;
    let http0 = cluster.members()[0].node.http();
    let silent = || async move {
        metric_value(&metrics_text(http0).await, |l| {
            l.starts_with("ndc_subscription_remote_shards_total") && l.contains("silent")
        })
        .unwrap_or(0.0)
    };
    let before = silent().await;
    let streams = streams_served(&cluster, holder).await;
    let frozen_at = Instant::now();
    cluster.member(holder).signal("-STOP").unwrap();
    eventually_async("node 0 giving up on the frozen holder", SETTLE, || async {
        let n = silent().await;
        (n > before).then_some(n)
    })
    .await;
    eprintln!(
        "node {holder} frozen with {streams} shard stream(s) to node 0: node 0 gave up on it after {:?}",
        frozen_at.elapsed()
    );
    cluster.member(holder).signal("-CONT").unwrap();
    cluster
        .wait_for("rebalance after the holder thaws", SETTLE, |s| {
            live_members(s).len() == 3 && placed_over(s, &[0, 1, 2])
        })
        .await;
    work.finish(&cluster, &[]).await;
}

/// Two views of one topic: a source partition feeds a shard of each, and
/// the two shards may be owned by different nodes, under different epochs.
/// A node consumes the partition for the views it owns only, each record
/// under its own view's epoch (with one epoch per partition, a node owning
/// both would have fenced one of them for good; one owning one of them would
/// have fenced itself waiting for a log it does not read). Both views end
/// with every row on every node, through a kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_views_of_one_topic_are_owned_and_fenced_each_on_its_own() {
    let mut cluster = Cluster::start_with(3, &[(TOPIC, PARTITIONS)], mirrored_member).await;
    let work = Workload::start(&cluster, &[0, 1]);
    let (s, _) = cluster
        .wait_for("both views' partitions owned", SETTLE, |s| {
            live_members(s).len() == 3
                && s.partitions.len() == 2 * PARTITIONS as usize
                && s.partitions.iter().all(|p| p.owner.is_some() && p.running)
        })
        .await;
    // Some source partition has its two views' shards on different owners.
    let owner_of = |view: &str, p: i32| {
        s.partitions
            .iter()
            .find(|x| {
                x.partition.starts_with(&format!("{view}#"))
                    && x.partition.ends_with(&format!("/{TOPIC}/{p}"))
            })
            .and_then(|x| x.owner)
    };
    let split = (0..PARTITIONS)
        .filter(|&p| owner_of("citizens", p) != owner_of("mirror", p))
        .count();
    eprintln!("{split} of {PARTITIONS} source partitions feed shards owned by different nodes");
    assert!(
        split > 0,
        "placement put every pair on one node: {:?}",
        owners(&s)
    );
    cluster.member(2).kill9();
    cluster
        .wait_for(
            "node 2's partitions on nodes 0 and 1",
            FAILOVER_BOUND,
            |s| {
                s.partitions
                    .iter()
                    .all(|p| matches!(p.owner, Some(0 | 1)) && p.running)
            },
        )
        .await;
    cluster.member(2).start().unwrap();
    let everything = work.finish(&cluster, &[]).await;
    for m in cluster.members() {
        let addr = m.addr();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (rows, _) = view_rows(&addr, "mirror").await;
            if rows == everything {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ndc-{}: mirror has {} rows, citizens {}",
                m.id,
                rows.len(),
                everything.len()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Members that run pipelines (submitted through the admin API) with an
/// owner and a standby per shard.
fn placed_pipeline_member(c: &mut NodeConfig) {
    c.views.clear();
    if let Some(cluster) = c.cluster.as_mut() {
        cluster.replication_factor = REPLICATION_FACTOR;
    }
}

/// Shards of the sharded pipeline scenario: its sources' (one per
/// partition of their topics) and its merge's (by national ID).
const PIPELINE_SHARDS: u32 = 4;

/// Facts each running node has re-keyed (acknowledged by the broker).
async fn facts_forwarded(cluster: &Cluster) -> BTreeMap<u64, f64> {
    let mut out = BTreeMap::new();
    for m in cluster.members().iter().filter(|m| m.running()) {
        let text = metrics_text(m.node.http()).await;
        let facts = metric_value(&text, |l| {
            l.starts_with("ndc_pipeline_facts_forwarded_total")
        })
        .unwrap_or(0.0);
        out.insert(m.id, facts);
    }
    out
}

/// The first `n` records of `topic` (the test knows how many it holds:
/// the broker's watermarks are not exact on the test broker).
fn topic_records(broker: &Broker, topic: &str, n: f64) -> Vec<rdkafka::message::OwnedMessage> {
    let n = n as usize;
    let records = broker.read_all(topic, n, Duration::from_secs(60));
    assert_eq!(records.len(), n, "records of {topic} read");
    records
}

/// A pipeline in 4 shards at replication factor 2 on 3 nodes. Each source
/// shard is re-keyed by the node that owns its partition (not the leader
/// alone); each merge shard (national ID hash) is held by its owner and a
/// standby, which apply its log and so hold its golden records, conflicts
/// and joins; every node serves every view by fanning in the shards it
/// does not hold. The node that re-keys the most is killed: the standbys
/// take its shards over and resume re-keying where its cursor, carried in
/// each shard's change log, says — the history is not published again —
/// and every node agrees on every person's new phone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_pipeline_is_re_keyed_and_merged_on_the_owners_of_its_shards() {
    use ndc_node::serving::pipelines_api as pipelines;
    let topics: Vec<(&str, i32)> = AGENCIES
        .iter()
        .map(|t| (t.topic(), PIPELINE_SHARDS as i32))
        .chain([("ndc.dead-letter", 1)])
        .collect();
    let mut cluster = Cluster::start_with(3, &topics, placed_pipeline_member).await;
    let producer = cluster._broker.producer();
    let mut feeds = start_sharded_pipeline(&cluster, &producer).await;
    let addrs: Vec<String> = cluster.members().iter().map(|m| m.addr()).collect();
    let golden = converged(
        &cluster,
        &addrs,
        "national.people",
        "all people merged",
        all_merged,
    )
    .await;
    let golden = golden_by_person(&golden);
    for i in 0..GOLDEN_PEOPLE {
        assert_eq!(
            golden[&national_id(i).to_string()]["full_name"],
            citizen_row(i, 0)["full_name"]
        );
    }
    converged(
        &cluster,
        &addrs,
        "national.vehicle_owners",
        "vehicles joined",
        |r| r.len() == GOLDEN_PEOPLE as usize,
    )
    .await;
    let topic = pipelines::list(&addrs[0]).await.unwrap()[0]
        .repartition_topic
        .clone();

    // Placement: every shard of the sources and of the merge has an owner
    // and a standby; no node holds every shard; the merge's derived views
    // are not placed on their own (they follow their contributions shard).
    let s = cluster.status().await.unwrap();
    let placed = holders(&s);
    let logs = AGENCIES.len() as u32 * PIPELINE_SHARDS + PIPELINE_SHARDS;
    for shard in 0..PIPELINE_SHARDS {
        for view in ["national.population", "national.people.contributions"] {
            let name = format!("{view}#{shard}");
            assert_eq!(
                placed.get(&name).map(Vec::len),
                Some(REPLICATION_FACTOR),
                "{name}: {placed:?}"
            );
        }
        assert!(!placed.contains_key(&format!("national.people#{shard}")));
    }
    for m in cluster.members() {
        let text = metrics_text(m.node.http()).await;
        let read = metric_value(&text, |l| l.starts_with("ndc_cluster_logs_read ")).unwrap();
        assert!(
            read < f64::from(logs),
            "ndc-{} reads {read} of {logs} logs",
            m.id
        );
    }
    // A keyed subscription to a view split by national ID reads only the
    // key's shard: from a node that does not hold it, one remote stream;
    // from one that does, none.
    let person = national_id(5).to_string();
    let key_shard = ndc_operators::shard::of_national_id(&person, PIPELINE_SHARDS);
    let key_holders = placed[&format!("national.people.contributions#{key_shard}")].clone();
    for m in cluster.members() {
        let opened = || async {
            metric_value(&metrics_text(m.node.http()).await, |l| {
                l.starts_with("ndc_subscription_remote_shards_total") && l.contains("opened")
            })
            .unwrap_or(0.0)
        };
        let before = opened().await;
        let opts = ndc_node::client::SubscribeOptions {
            keys: vec![json!({ "national_id": person }).to_string()],
            progress: true,
            ..subscription(m.addr(), "national.people", From::Snapshot)
        };
        let lines = read_until(opts, Duration::from_secs(20), |l| {
            l.iter().any(|x| x.get("snapshot_complete").is_some())
        })
        .await;
        let rows = fold(&lines);
        assert_eq!(rows.len(), 1, "ndc-{}: {lines:?}", m.id);
        assert_eq!(rows.values().next().unwrap()["national_id"], json!(person));
        let streams = opened().await - before;
        let expected = if key_holders.contains(&m.id) {
            0.0
        } else {
            1.0
        };
        assert_eq!(
            streams, expected,
            "ndc-{}: remote shard streams opened for one key (its shard held by {key_holders:?})",
            m.id
        );
    }
    // One fact per row naming a person: wait for all of them, so that the
    // cluster is at rest when a node is killed.
    let initial = (AGENCIES.len() as u64 - 1) * GOLDEN_PEOPLE + GOLDEN_BUSINESSES;
    let deadline = Instant::now() + SETTLE;
    let forwarded = loop {
        let f = facts_forwarded(&cluster).await;
        if f.values().sum::<f64>() >= initial as f64 {
            break f;
        }
        assert!(Instant::now() < deadline, "facts re-keyed: {f:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("facts re-keyed per node: {forwarded:?}");
    assert!(
        forwarded.values().filter(|f| **f > 0.0).count() > 1,
        "re-keying spread over the owners: {forwarded:?}"
    );
    let history = topic_records(&cluster._broker, &topic, forwarded.values().sum());

    // The node that re-keyed the most dies; every citizen then changes
    // phone.
    let victim = *forwarded
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0;
    cluster.member(victim).kill9();
    let mut citizens = feeds.swap_remove(0);
    for i in 0..GOLDEN_PEOPLE {
        publish_event(
            &producer,
            Table::Citizens.topic(),
            &citizens.event('u', i, 1, None),
        )
        .await;
    }
    let survivors: Vec<String> = cluster
        .members()
        .iter()
        .filter(|m| m.running())
        .map(|m| m.addr())
        .collect();
    converged(&cluster, &survivors, "national.people", "new phones", |r| {
        r.len() == GOLDEN_PEOPLE as usize && phones_are(1)(r)
    })
    .await;
    converged(
        &cluster,
        &survivors,
        "national.vehicle_owners",
        "owners' new phones",
        owners_phones_are(1),
    )
    .await;
    // Re-keying went on from the carried cursors: the facts published
    // since the kill repeat (almost) none of the history. Resuming from a
    // cursor of zero on the victim's shards would publish its share of the
    // history again (about a third of it).
    let after = facts_forwarded(&cluster).await;
    let since: f64 = after.iter().map(|(id, f)| f - forwarded[id]).sum();
    let all = topic_records(&cluster._broker, &topic, history.len() as f64 + since);
    let positions: BTreeSet<(i32, i64)> = history
        .iter()
        .map(|m| (m.partition(), m.offset()))
        .collect();
    let before: BTreeSet<&[u8]> = history.iter().filter_map(|m| m.payload()).collect();
    let new = all.len() - history.len();
    let repeated = all
        .iter()
        .filter(|m| !positions.contains(&(m.partition(), m.offset())))
        .filter(|m| m.payload().is_some_and(|p| before.contains(p)))
        .count();
    eprintln!(
        "facts: {} before the kill, {new} since, {repeated} of them repeating the history",
        history.len()
    );
    assert!(
        repeated * 10 < history.len(),
        "{repeated} facts of the history published again after the kill"
    );
    // The victim comes back with its state: it catches up on the logs of
    // the shards placement gives it again, and every node agrees.
    cluster.member(victim).start().unwrap();
    converged(
        &cluster,
        &addrs,
        "national.people",
        "the returning node caught up",
        phones_are(1),
    )
    .await;
    converged(
        &cluster,
        &addrs,
        "national.vehicle_owners",
        "the returning node's joins",
        owners_phones_are(1),
    )
    .await;
}

/// Publishes every agency's snapshot and applies the example pipeline in
/// `PIPELINE_SHARDS` shards through the first node; returns the feeds, to
/// publish more changes.
async fn start_sharded_pipeline(
    cluster: &Cluster,
    producer: &rdkafka::producer::FutureProducer,
) -> Vec<Feed> {
    use ndc_node::serving::pipelines_api as pipelines;
    let mut feeds: Vec<Feed> = AGENCIES
        .iter()
        .map(|t| Feed::new(*t, 1_767_225_600_000))
        .collect();
    publish_snapshots(producer, &mut feeds).await;
    let spec = std::fs::read_to_string(example_spec()).unwrap().replacen(
        "version: 1\n",
        &format!("version: 1\nshards: {PIPELINE_SHARDS}\n"),
        1,
    );
    let addr = cluster.members()[0].addr();
    let deadline = Instant::now() + SETTLE;
    while let Err(e) = pipelines::apply(&addr, spec.clone(), false).await {
        assert!(Instant::now() < deadline, "spec not applied: {e}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    feeds
}

/// Members of the pipeline-copy scenario: a sharded pipeline placed at
/// replication factor 2, its logs trimmed every 300 ms to 5 records behind
/// their slowest holder, no state copied at start, no audit trail (one
/// writer at a time on the broker: see the replica trimming scenario).
fn trimmed_pipeline_member(c: &mut NodeConfig) {
    placed_pipeline_member(c);
    c.audit.enabled = false;
    if let Some(cluster) = c.cluster.as_mut() {
        cluster.log_trim_interval = Duration::from_millis(300);
        cluster.log_trim_slack = 5;
        cluster.state_from_peers = false;
    }
}

/// A sharded pipeline's logs are trimmed on a node that runs it alone; a
/// node that then joins without state is given every shard (factor 2) and,
/// its logs no longer starting at 0, copies each from the holder — a merge
/// shard with the golden records, conflicts and join it writes. It ends
/// with the same golden records and the same change streams as the holder,
/// from its own state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_shard_is_copied_with_its_derived_views_to_a_node_behind_its_logs() {
    let topics: Vec<(&str, i32)> = AGENCIES
        .iter()
        .map(|t| (t.topic(), PIPELINE_SHARDS as i32))
        .chain([("ndc.dead-letter", 1)])
        .collect();
    let mut cluster = Cluster::start_on(
        Broker::start_trimmable(),
        1,
        &topics,
        trimmed_pipeline_member,
    )
    .await;
    let producer = cluster._broker.producer();
    start_sharded_pipeline(&cluster, &producer).await;
    let addr0 = cluster.members()[0].addr();
    let golden = converged(
        &cluster,
        std::slice::from_ref(&addr0),
        "national.people",
        "all people merged",
        all_merged,
    )
    .await;
    // At rest before the join: the copy is of settled shards (moving
    // owners mid-stream is the sharded-pipeline scenario's part).
    converged(
        &cluster,
        std::slice::from_ref(&addr0),
        "national.vehicle_owners",
        "vehicles joined",
        |r| r.len() == GOLDEN_PEOPLE as usize,
    )
    .await;
    // Every merge shard's log (it writes the golden records) is trimmed.
    let merge_shards: Vec<String> = (0..PIPELINE_SHARDS)
        .map(|i| format!("national.people.contributions#{i}"))
        .collect();
    let (_, t) = cluster
        .wait_for("every merge shard's log trimmed", SETTLE, |s| {
            merge_shards.iter().all(|m| {
                s.shards
                    .iter()
                    .any(|p| &p.shard == m && p.log_start.is_some_and(|l| l > 0))
            })
        })
        .await;
    eprintln!("merge logs trimmed {t:?} after the start");

    cluster.join(1, &addr0).await;
    let (s, _) = cluster
        .wait_for("both nodes holding every shard", SETTLE, |s| {
            live_members(s).len() == 2
                && !s.shards.is_empty()
                && s.shards.iter().all(|p| {
                    let mut h = p.holders.clone();
                    h.sort_unstable();
                    h == [0, 1]
                })
        })
        .await;
    let trimmed = s
        .shards
        .iter()
        .filter(|p| p.log_start.is_some_and(|l| l > 0))
        .count();
    let http = cluster.member(1).http();
    let installed = copies_installed(&cluster, "each trimmed shard", trimmed as f64).await;
    eprintln!("node 1 installed {installed} shard copies ({trimmed} shards trimmed)");
    let addr1 = cluster.members()[1].addr();
    let addrs = [addr0.clone(), addr1.clone()];
    let both = converged(
        &cluster,
        &addrs,
        "national.people",
        "the golden records on both nodes",
        all_merged,
    )
    .await;
    assert_eq!(both, golden);
    converged(
        &cluster,
        &addrs,
        "national.vehicle_owners",
        "vehicles joined on both nodes",
        |r| r.len() == GOLDEN_PEOPLE as usize,
    )
    .await;
    // Node 1's own state: it holds every shard, so it reads none remotely,
    // and each derived view's change streams stand where node 0's do.
    for view in [
        "national.people",
        "national.people.conflicts",
        "national.vehicle_owners",
    ] {
        let deadline = Instant::now() + SETTLE;
        loop {
            let (a, b) = (
                committed_seqs(&addr0, view).await,
                committed_seqs(&addr1, view).await,
            );
            if a == b && !a.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{view}: node 0 at {a:?}, node 1 at {b:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let remote = metric_value(&metrics_text(http).await, |l| {
        l.starts_with("ndc_subscription_remote_shards_total") && l.contains("opened")
    })
    .unwrap_or(0.0);
    assert_eq!(remote, 0.0, "node 1 read shards remotely");
}

/// A node joins while a sharded pipeline's first load is still being
/// re-keyed and merged: shards are placed on it and owners move to it
/// mid-stream. Every node still ends with every golden record and every
/// vehicle owner (a move must not drop facts in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_while_a_pipeline_loads_loses_no_fact() {
    let topics: Vec<(&str, i32)> = AGENCIES
        .iter()
        .map(|t| (t.topic(), PIPELINE_SHARDS as i32))
        .chain([("ndc.dead-letter", 1)])
        .collect();
    let mut cluster = Cluster::start_with(2, &topics, placed_pipeline_member).await;
    let producer = cluster._broker.producer();
    let mut feeds = start_sharded_pipeline(&cluster, &producer).await;
    // Every citizen changes phone ten times, paced, while node 2 joins.
    const VERSIONS: u32 = 10;
    let mut citizens = feeds.swap_remove(0);
    let load = {
        let producer = producer.clone();
        tokio::spawn(async move {
            for v in 1..=VERSIONS {
                for i in 0..GOLDEN_PEOPLE {
                    publish_event(
                        &producer,
                        Table::Citizens.topic(),
                        &citizens.event('u', i, v, None),
                    )
                    .await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let addr0 = cluster.members()[0].addr();
    cluster.join(2, &addr0).await;
    let (s, _) = cluster
        .wait_for("owners on node 2", SETTLE, |s| {
            s.partitions.iter().any(|p| p.owner == Some(2))
        })
        .await;
    let moved_mid_load = !load.is_finished();
    load.await.unwrap();
    eprintln!(
        "node 2 owns {} partitions; owners moved while the load ran: {moved_mid_load}",
        s.partitions.iter().filter(|p| p.owner == Some(2)).count()
    );
    let addrs: Vec<String> = cluster.members().iter().map(|m| m.addr()).collect();
    converged(
        &cluster,
        &addrs,
        "national.people",
        "every person's last phone on every node",
        |r| all_merged(r) && phones_are(VERSIONS)(r),
    )
    .await;
    converged(
        &cluster,
        &addrs,
        "national.vehicle_owners",
        "every vehicle joined on every node",
        |r| r.len() == GOLDEN_PEOPLE as usize,
    )
    .await;
}

/// `ndc_view_keys_routed{view="citizens"}` on member `id` (`None`: not set).
async fn keys_routed(cluster: &Cluster, id: u64) -> Option<f64> {
    let m = cluster.members().iter().find(|m| m.id == id).unwrap();
    metric_value(&metrics_text(m.node.http()).await, |l| {
        l.starts_with("ndc_view_keys_routed{") && l.contains("view=\"citizens\"")
    })
}

/// Shard streams every member serves to other members' subscriptions.
async fn streams_served_in_all(cluster: &Cluster) -> f64 {
    let mut total = 0.0;
    for m in cluster.members() {
        total += streams_served(cluster, m.id).await;
    }
    total
}

/// In a cluster (8 shards, an owner and a standby each, 3 nodes), a feed
/// whose keys Kafka's default partitioner placed (librdkafka's murmur2,
/// Kafka Connect's): the leader hears from the holders that every shard's
/// records show it and tells every node, and a keyed subscriber on a node
/// that does not hold the key's shard is served by one shard stream from
/// one holder — not one per shard. A record sent to another partition
/// ends that on every node; the keyed subscriber resumes with its token
/// over every shard and gets that record, and holders now serve a stream
/// per shard the serving node does not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_read_is_served_by_its_keys_shard_alone_while_the_feed_shows_kafkas_partitioner() {
    let mut cluster = Cluster::start(3).await;
    let (s, _) = cluster
        .wait_for("every shard placed and owned", SETTLE, |s| {
            live_members(s).len() == 3
                && s.partitions.len() == PARTITIONS as usize
                && s.partitions.iter().all(|p| p.owner.is_some() && p.running)
                && placed_over(s, &[0, 1, 2])
        })
        .await;
    let producer = kafka_partitioned_producer(&cluster._broker);
    let mut feed = feed::Citizens::default();
    let partition_of = feed
        .publish_partitioned(&producer, TOPIC, 200, PARTITIONS)
        .await;
    for m in [0, 1, 2] {
        eventually_async(
            &format!("ndc-{m} routes the view's keys"),
            SETTLE,
            || async { (keys_routed(&cluster, m).await == Some(1.0)).then_some(()) },
        )
        .await;
    }

    // The key's shard, from where the producer put it; served through the
    // one node that holds none of it.
    let key = feed::Citizens::default().change(0, false, false).key;
    let shard = ndc_operators::shard::of_partition(partition_of[&key], SHARDS);
    let shard_name = ndc_operators::shard::store_name("citizens", shard, SHARDS);
    let holders_of = holders(&s);
    let serving = [0u64, 1, 2]
        .into_iter()
        .find(|n| !holders_of[&shard_name].contains(n))
        .expect("a node that does not hold the key's shard");
    let addr = cluster
        .members()
        .iter()
        .find(|m| m.id == serving)
        .unwrap()
        .addr();
    assert_eq!(streams_served_in_all(&cluster).await, 0.0);
    let (seen, subscriber) = follow_keys(addr.clone(), "citizens", std::slice::from_ref(&key));
    eventually("the keyed snapshot", SETTLE, || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|l| l.get("snapshot_complete").is_some())
    })
    .await;
    assert_eq!(
        streams_served_in_all(&cluster).await,
        1.0,
        "one holder serves the key's shard {shard_name}, no other shard is read"
    );
    let row_seen = |want: Value| {
        let seen = seen.clone();
        let key = key.clone();
        move || fold(&seen.lock().unwrap()).get(&key) == Some(&want)
    };
    assert!(row_seen(feed.expected[&key].clone())());

    // The shards it does not read move up in its token to where the leader
    // says their records are known to be in place.
    eventually("the unread shards' positions moved up", SETTLE, || {
        last_positions(&seen.lock().unwrap()).is_some_and(|p| p.iter().all(|&s| s > 0))
    })
    .await;

    // The holder serving that one stream is killed while the key changes
    // 30 times: the serving node re-routes the stream to the shard's other
    // holder from its cursor, and the subscriber sees every revision once,
    // in order.
    let mut victim = None;
    for m in [0u64, 1, 2] {
        if streams_served(&cluster, m).await == 1.0 {
            victim = Some(m);
        }
    }
    let victim = victim.expect("the holder serving the keyed stream");
    assert!(holders_of[&shard_name].contains(&victim));
    let rerouted_before = rerouted(&cluster, serving).await;
    let first_revision = feed.expected[&key]["revision"].as_u64().unwrap();
    let updates: Vec<Vec<u8>> = (0..30)
        .map(|_| {
            feed.change(0, false, false).events[0]
                .value
                .clone()
                .unwrap()
        })
        .collect();
    let last_row = feed.expected[&key].clone();
    let writer = tokio::spawn({
        let producer = producer.clone();
        let key = key.clone();
        async move {
            for value in updates {
                publish_keyed(&producer, TOPIC, &key, &value, None).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    eventually("the first updates delivered", SETTLE, || {
        fold(&seen.lock().unwrap())
            .get(&key)
            .is_some_and(|r| r["revision"].as_u64() >= Some(first_revision + 5))
    })
    .await;
    cluster.member(victim).kill9();
    writer.await.unwrap();
    eventually("every update delivered", SETTLE, row_seen(last_row)).await;
    assert!(
        rerouted(&cluster, serving).await > rerouted_before,
        "ndc-{serving} re-routed the stream ndc-{victim} served"
    );
    let revisions: Vec<u64> = ndc_testkit::changes(&seen.lock().unwrap())
        .iter()
        .filter(|c| c["op"] != "read")
        .filter_map(|c| c["after"]["revision"].as_u64())
        .collect();
    let want: Vec<u64> = (first_revision + 1..=first_revision + 30).collect();
    assert_eq!(revisions, want, "every revision once, in order");
    cluster.member(victim).start().unwrap();
    let (s, _) = cluster
        .wait_for(&format!("ndc-{victim} back and placed"), SETTLE, |s| {
            live_members(s).len() == 3 && placed_over(s, &[0, 1, 2])
        })
        .await;
    // Placement may have changed.
    let held_by_serving = holders(&s)
        .values()
        .filter(|h| h.contains(&serving))
        .count();

    // The next change of the key, sent to another partition.
    let change = feed.change(0, false, false);
    let elsewhere = (partition_of[&key] + 1) % PARTITIONS;
    let value = change.events[0].value.clone().unwrap();
    publish_keyed(&producer, TOPIC, &key, &value, Some(elsewhere)).await;
    for m in [0, 1, 2] {
        eventually_async(
            &format!("ndc-{m} no longer routes the view's keys"),
            SETTLE,
            || async { (keys_routed(&cluster, m).await == Some(0.0)).then_some(()) },
        )
        .await;
    }
    eventually(
        "the change sent to another partition, delivered",
        SETTLE,
        row_seen(change.row.clone().unwrap()),
    )
    .await;
    let remote = (SHARDS as usize - held_by_serving) as f64;
    eventually_async(
        "a stream from a holder of every shard the serving node does not hold",
        SETTLE,
        || async { (streams_served_in_all(&cluster).await == remote).then_some(()) },
    )
    .await;
    subscriber.abort();
    let mut delivered = BTreeSet::new();
    for c in ndc_testkit::changes(&seen.lock().unwrap()) {
        assert!(
            delivered.insert((c["shard"].as_u64(), c["seq"].as_u64())),
            "delivered twice: {c}"
        );
    }
}
