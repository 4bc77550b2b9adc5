//! Three coordinators in one process, each with its RocksDB Raft store and
//! its own tonic server on a loopback port chosen at run time, speaking the
//! real Raft RPCs to each other: leadership handed over by a leader that
//! stops, and a node behind the purged log brought up by a snapshot.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::wait;

use ndc_coordinator::{Command, Coordinator, CoordinatorConfig, Peer};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

struct Node {
    coordinator: Coordinator,
    server: tokio::task::JoinHandle<()>,
}

impl Node {
    async fn stop(self) {
        self.coordinator.shutdown().await;
        self.server.abort();
    }
}

/// Listeners bound first (kept open until their server takes them), so
/// every node's address is known before any starts.
async fn listeners(n: usize) -> (Vec<TcpListener>, Vec<Peer>) {
    let mut listeners = Vec::new();
    let mut peers = Vec::new();
    for id in 0..n {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.push(Peer {
            id: id as u64,
            addr: l.local_addr().unwrap().to_string(),
        });
        listeners.push(l);
    }
    (listeners, peers)
}

async fn start(
    id: u64,
    listener: TcpListener,
    peers: &[Peer],
    dir: &std::path::Path,
    snapshot_logs: u64,
) -> Node {
    let coordinator = Coordinator::start(CoordinatorConfig {
        election_timeout: Duration::from_millis(300),
        snapshot_logs,
        ..common::config(id, peers.to_vec(), dir.join(format!("raft-{id}")))
    })
    .await
    .unwrap();
    let server = tokio::spawn({
        let c = coordinator.clone();
        async move {
            let _ = tonic::transport::Server::builder()
                .add_service(c.raft_service())
                .add_service(c.cluster_service(true))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        }
    });
    Node {
        coordinator,
        server,
    }
}

fn leader_of(nodes: &[Option<Node>]) -> Option<usize> {
    nodes
        .iter()
        .position(|n| n.as_ref().is_some_and(|n| n.coordinator.is_leader()))
}

/// Every running node names `id` its leader.
fn all_follow(nodes: &[Option<Node>], id: u64) -> bool {
    nodes.iter().flatten().all(|n| {
        n.coordinator
            .current_leader_addr()
            .is_some_and(|(l, _)| l == id)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_stops_hands_leadership_to_a_caught_up_voter() {
    let dir = tempfile::tempdir().unwrap();
    let (listeners, peers) = listeners(3).await;
    let mut nodes: Vec<Option<Node>> = Vec::new();
    for (id, l) in listeners.into_iter().enumerate() {
        nodes.push(Some(start(id as u64, l, &peers, dir.path(), 5000).await));
    }
    wait("a leader followed by all", Duration::from_secs(15), || {
        leader_of(&nodes).is_some_and(|l| all_follow(&nodes, l as u64))
    })
    .await;
    // Three handovers in a row: each new leader hands over in turn.
    for _ in 0..3 {
        let old = leader_of(&nodes).unwrap();
        let term = nodes[old].as_ref().unwrap().coordinator.raft_term();
        let c = nodes[old].as_ref().unwrap().coordinator.clone();
        // Something in the log the new leader must have.
        c.propose(Command::RegisterPartitions {
            partitions: vec![format!("v/t/{term}")],
        })
        .await
        .unwrap();
        // The leader hands over only to a member whose heartbeat it has had
        // (a leader just elected may not have had one yet): asked again
        // until then.
        let deadline = Instant::now() + Duration::from_secs(5);
        let took = loop {
            let started = Instant::now();
            match c.hand_over_leadership(Duration::from_secs(5)).await {
                Some(true) => break started.elapsed(),
                Some(false) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => panic!("leadership not handed over: {other:?}"),
            }
        };
        let new = leader_of(&nodes);
        assert!(
            new.is_some_and(|n| n != old),
            "no other node leads right after the handover"
        );
        let new = new.unwrap();
        let new_term = nodes[new].as_ref().unwrap().coordinator.raft_term();
        // One election, by the chosen voter: no lease waited out, no split vote.
        assert_eq!(
            new_term,
            term + 1,
            "the handover took more than one election"
        );
        eprintln!("leadership {old} -> {new} in {took:?} (term {term} -> {new_term})");
        wait(
            "every node follows the new leader",
            Duration::from_secs(5),
            || all_follow(&nodes, new as u64),
        )
        .await;
        let partitions = &c.watch().borrow().cluster.partitions.clone();
        assert!(
            partitions.contains(&format!("v/t/{term}")),
            "the old leader's last write is lost"
        );
    }
    // A follower is asked: it does not lead, there is nothing to hand over.
    let follower = (0..3).find(|&i| Some(i) != leader_of(&nodes)).unwrap();
    assert_eq!(
        nodes[follower]
            .as_ref()
            .unwrap()
            .coordinator
            .hand_over_leadership(Duration::from_secs(1))
            .await,
        None
    );
    for n in nodes.into_iter().flatten() {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_leader_has_no_one_to_hand_over_to() {
    let dir = tempfile::tempdir().unwrap();
    let (mut listeners, peers) = listeners(1).await;
    let node = start(0, listeners.remove(0), &peers, dir.path(), 5000).await;
    wait("leadership", Duration::from_secs(10), || {
        node.coordinator.is_leader()
    })
    .await;
    assert_eq!(
        node.coordinator
            .hand_over_leadership(Duration::from_secs(1))
            .await,
        Some(false)
    );
    assert!(node.coordinator.is_leader());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_the_purged_log_is_sent_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (mut listeners, peers) = listeners(3).await;
    let late_listener = listeners.pop().unwrap();
    let mut nodes: Vec<Option<Node>> = Vec::new();
    for (id, l) in listeners.into_iter().enumerate() {
        nodes.push(Some(start(id as u64, l, &peers, dir.path(), 10).await));
    }
    nodes.push(None);
    wait("a leader", Duration::from_secs(15), || {
        leader_of(&nodes).is_some()
    })
    .await;
    let leader = nodes[leader_of(&nodes).unwrap()]
        .as_ref()
        .unwrap()
        .coordinator
        .clone();
    for i in 0..60 {
        leader
            .propose(Command::RegisterPartitions {
                partitions: vec![format!("v/t/{i}")],
            })
            .await
            .unwrap();
    }
    wait(
        "the log purged behind a snapshot",
        Duration::from_secs(10),
        || leader.raft_log_purged_to().is_some_and(|p| p > 20),
    )
    .await;
    // The third voter starts with an empty disk: the entries it lacks are
    // gone, only the snapshot has them.
    nodes[2] = Some(start(2, late_listener, &peers, dir.path(), 10).await);
    let late = nodes[2].as_ref().unwrap().coordinator.clone();
    // (The leader's scheduler goes on assigning partitions meanwhile.)
    wait(
        "the late node holds the leader's state",
        Duration::from_secs(15),
        || late.watch().borrow().cluster == leader.watch().borrow().cluster,
    )
    .await;
    assert_eq!(late.watch().borrow().cluster.partitions.len(), 60);
    // And it goes on from there with the log.
    leader
        .propose(Command::RegisterPartitions {
            partitions: vec!["v/t/after".into()],
        })
        .await
        .unwrap();
    wait(
        "the late node applies what follows",
        Duration::from_secs(10),
        || {
            late.watch()
                .borrow()
                .cluster
                .partitions
                .contains("v/t/after")
        },
    )
    .await;
    for n in nodes.into_iter().flatten() {
        n.stop().await;
    }
}
