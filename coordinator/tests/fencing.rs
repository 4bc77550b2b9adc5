//! Fencing primitives on a real single-node cluster (openraft with its
//! RocksDB log, served over tonic on a loopback port chosen at run time).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::wait;

use ndc_coordinator::{Coordinator, Peer};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_acts_only_on_its_current_epoch_and_only_while_its_lease_holds() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let coordinator = Coordinator::start(common::config(
        0,
        vec![Peer { id: 0, addr }],
        dir.path().join("raft"),
    ))
    .await
    .unwrap();
    let server = tokio::spawn({
        let c = coordinator.clone();
        async move {
            tonic::transport::Server::builder()
                .add_service(c.raft_service())
                .add_service(c.cluster_service(true))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        }
    });

    wait("leadership", Duration::from_secs(10), || {
        coordinator.is_leader()
    })
    .await;
    let partitions: Vec<String> = (0..3).map(|p| format!("v/t/{p}")).collect();
    let mut registered = false;
    for _ in 0..100 {
        if coordinator
            .register_partitions(partitions.clone())
            .await
            .is_ok()
        {
            registered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(registered);
    let watch = coordinator.watch();
    wait(
        "all partitions assigned here",
        Duration::from_secs(10),
        || watch.borrow().cluster.owned_by(0).len() == 3,
    )
    .await;
    wait("a valid lease", Duration::from_secs(5), || {
        coordinator.lease_valid()
    })
    .await;

    let owned = watch.borrow().cluster.owned_by(0);
    let epoch = owned["v/t/1"];
    assert!(coordinator.may_act("v/t/1", epoch));
    assert!(
        !coordinator.may_act("v/t/1", epoch - 1),
        "an older epoch is fenced"
    );
    assert!(
        !coordinator.may_act("v/t/1", epoch + 1),
        "a future epoch is not ours"
    );
    assert!(
        !coordinator.may_act("v/t/9", epoch),
        "an unknown partition is not ours"
    );

    // Raft stops: no leader accepts heartbeats any more, the lease runs out
    // and the node stops acting, without being told.
    coordinator.shutdown().await;
    assert_eq!(
        coordinator.background_tasks(),
        0,
        "the coordinator's loops end with it"
    );
    let stopped = Instant::now();
    wait("the lease to expire", Duration::from_secs(5), || {
        !coordinator.lease_valid()
    })
    .await;
    // The lease is 300 ms; the bound is loose so a busy machine passes.
    assert!(stopped.elapsed() <= Duration::from_millis(300) + Duration::from_secs(1));
    assert!(!coordinator.may_act("v/t/1", epoch));
    server.abort();
}
