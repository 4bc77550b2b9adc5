//! The Kubernetes manifest's embedded node configuration stays valid.

#![allow(clippy::unwrap_used)]

use serde::Deserialize;

#[test]
fn configmap_holds_a_valid_node_config() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../k8s/ndc.yaml")).unwrap();
    let mut found = false;
    let mut replicas = None;
    let mut voters = None;
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value = serde_norway::Value::deserialize(doc).unwrap();
        if value["kind"].as_str() == Some("StatefulSet") {
            replicas = value["spec"]["replicas"].as_u64();
            assert_eq!(
                value["spec"]["podManagementPolicy"].as_str(),
                Some("Parallel")
            );
        }
        if value["kind"].as_str() == Some("NetworkPolicy") {
            // The peer port is reachable from ndc pods only.
            let rules = value["spec"]["ingress"].as_sequence().unwrap();
            let peer = rules
                .iter()
                .find(|r| {
                    r["ports"]
                        .as_sequence()
                        .is_some_and(|p| p.iter().any(|p| p["port"].as_u64() == Some(50052)))
                })
                .expect("a rule for the peer port");
            assert_eq!(
                peer["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str(),
                Some("ndc")
            );
            assert!(
                rules
                    .iter()
                    .filter(|r| r["from"].is_null())
                    .all(|r| r["ports"]
                        .as_sequence()
                        .is_some_and(|p| p.iter().all(|p| p["port"].as_u64() != Some(50052)))),
                "no open rule admits the peer port"
            );
        }
        if value["kind"].as_str() == Some("ConfigMap") {
            let config = value["data"]["ndc.yaml"].as_str().unwrap();
            let parsed = ndc_node::NodeConfig::from_yaml_with_env(
                config,
                "k8s/ndc.yaml",
                std::iter::empty(),
            )
            .unwrap();
            assert_eq!(parsed.node.grpc_listen.port(), 50051);
            assert_eq!(parsed.node.peer_listen.port(), 50052);
            assert!(!parsed.tls.insecure, "the manifest runs with TLS");
            assert!(parsed.tls.client_ca.is_some(), "mutual TLS");
            // The StatefulSet's pods are ndc-0..ndc-2; each finds its id and
            // its peers from the names.
            let cluster = parsed.cluster.as_ref().unwrap();
            let ids: Vec<u64> = cluster
                .bootstrap
                .iter()
                .map(|e| ndc_node::config::parse_peer(e).unwrap().0)
                .collect();
            assert_eq!(ids, vec![0, 1, 2]);
            voters = Some(ids.len() as u64);
            assert_eq!(cluster.resolve_node_id("ndc-2"), Some(2));
            found = true;
        }
    }
    assert!(found, "no ConfigMap in k8s/ndc.yaml");
    assert_eq!(
        replicas, voters,
        "StatefulSet replicas and bootstrap voters differ"
    );
}
