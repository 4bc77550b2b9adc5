//! The peer listener, on real handshakes: only certificates of the
//! cluster's CA that name a node get in, and a node may speak only for
//! itself (heartbeats and Raft messages claiming another node's id are
//! refused). Peer traffic is refused on the public listener, and cluster
//! administration there needs a role.

#![allow(clippy::unwrap_used)]

use ndc_node::client::ClientTls;
use ndc_node::config::ClusterSection;
use ndc_proto::cluster::cluster_client::ClusterClient;
use ndc_proto::cluster::raft_client::RaftClient;
use ndc_proto::cluster::{HeartbeatRequest, RaftMessage, StatusRequest};
use ndc_testkit::*;
use std::path::PathBuf;

fn as_who(ca: &std::path::Path, (cert, key): &(PathBuf, PathBuf)) -> ClientTls {
    ClientTls {
        ca: Some(ca.to_path_buf()),
        cert: Some(cert.clone()),
        key: Some(key.clone()),
    }
}

fn code_and_message(r: Result<impl Sized, tonic::Status>) -> String {
    match r {
        Ok(_) => "served".into(),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_speaks_only_for_the_node_its_certificate_names() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, nodes) = ndc_node::security::certs::make_dev_cluster_certificates(
        &dir.path().join("pki"),
        &[],
        1,
        3,
    )
    .unwrap();
    let broker = Broker::start();
    broker.create_topic("population.public.citizens", 1).await;
    let mut config = node_config(
        &dir.path().join("node"),
        &broker.bootstrap,
        &[("citizens", "population.public.citizens", &["person_id"])],
    );
    // Its own peer address is in its bootstrap list: the socket is bound
    // here and handed to the node, never released in between.
    let ports = Ports::bind(true).unwrap();
    let peer_addr = ports.peer().unwrap();
    ports.configure(&mut config);
    config.node.id = "ndc-0".into();
    config.tls.insecure = false;
    config.tls.cert = Some(nodes[0].0.clone());
    config.tls.key = Some(nodes[0].1.clone());
    config.tls.client_ca = Some(certs.ca.clone());
    config.access.admins = vec!["admin".into()];
    config.cluster = Some(ClusterSection {
        bootstrap: vec![format!("0={peer_addr}")],
        changes_replication: 1,
        // tansu's memory storage has no DeleteRecords.
        log_trim_interval: std::time::Duration::ZERO,
        ..ClusterSection::default()
    });
    let node = ndc_node::node::start_with(config, ports.listeners().unwrap())
        .await
        .unwrap();
    let peer = node.addrs.peer.unwrap().to_string();
    let public = node.addrs.grpc.to_string();
    let node1 = as_who(&certs.ca, &nodes[1]);
    let admin = as_who(
        &certs.ca,
        &(certs.admin_cert.clone(), certs.admin_key.clone()),
    );
    let subscriber = as_who(
        &certs.ca,
        &(certs.subscriber_cert.clone(), certs.subscriber_key.clone()),
    );
    let cluster = |addr: String, tls: ClientTls| async move {
        ClusterClient::new(ndc_node::client::channel(&addr, Some(&tls)).await.unwrap())
    };
    let heartbeat = |node_id| HeartbeatRequest {
        node_id,
        applied_index: 0,
        held: Vec::new(),
        draining: false,
        zone: String::new(),
        log_positions: Vec::new(),
        key_placements: Vec::new(),
    };

    // Node 1's certificate speaks for node 1 (not a member: not accepted,
    // but heard), never for node 2.
    let mut c = cluster(peer.clone(), node1.clone()).await;
    let own = c.heartbeat(heartbeat(1)).await.unwrap().into_inner();
    assert!(!own.accepted, "node 1 is no member");
    let e = code_and_message(c.heartbeat(heartbeat(2)).await);
    assert!(
        e.starts_with("PermissionDenied") && e.contains("node 2"),
        "{e}"
    );
    // A vote for node 2's candidacy from node 1's certificate.
    let mut raft = RaftClient::new(
        ndc_node::client::channel(&peer, Some(&node1))
            .await
            .unwrap(),
    );
    let vote =
        br#"{"vote":{"leader_id":{"term":99,"node_id":2},"committed":false},"last_log_id":null}"#;
    let e = code_and_message(
        raft.vote(RaftMessage {
            json: vote.to_vec(),
        })
        .await,
    );
    assert!(
        e.starts_with("PermissionDenied") && e.contains("node 2"),
        "{e}"
    );

    // The admin's certificate is of the right CA but names no node.
    let mut c = cluster(peer.clone(), admin.clone()).await;
    let e = code_and_message(c.heartbeat(heartbeat(0)).await);
    assert!(
        e.starts_with("PermissionDenied") && e.contains("not a node of this cluster"),
        "{e}"
    );

    // On the public listener: no peer traffic, and status needs a role.
    let mut c = cluster(public.clone(), admin.clone()).await;
    let e = code_and_message(c.heartbeat(heartbeat(0)).await);
    assert!(
        e.starts_with("PermissionDenied") && e.contains("peer listener"),
        "{e}"
    );
    c.status(StatusRequest {}).await.unwrap();
    let c = cluster(public, subscriber).await;
    // Until the node has caught up with the cluster's grants it cannot tell
    // a missing role from one it has not seen yet: UNAVAILABLE, retried.
    let e = eventually_async(
        "a definite answer once the node caught up with its grants",
        std::time::Duration::from_secs(30),
        || {
            let mut c = c.clone();
            async move {
                let e = code_and_message(c.status(StatusRequest {}).await);
                (!e.starts_with("Unavailable")).then_some(e)
            }
        },
    )
    .await;
    assert!(
        e.starts_with("PermissionDenied")
            && e.contains("subscriber")
            && e.contains("operator role"),
        "{e}"
    );

    let metrics = http_get(node.addrs.http, "/metrics").await;
    let refused: f64 = metrics
        .lines()
        .find(|l| l.starts_with("ndc_cluster_peer_refused_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(refused >= 3.0, "{metrics}");
    node.shutdown().await;
}
