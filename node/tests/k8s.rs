//! The Kubernetes manifest's embedded node configuration stays valid.

#![allow(clippy::unwrap_used)]

use serde::Deserialize;

#[test]
fn configmap_holds_a_valid_node_config() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../k8s/ndc.yaml")).unwrap();
    let mut found = false;
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value = serde_norway::Value::deserialize(doc).unwrap();
        if value["kind"].as_str() == Some("ConfigMap") {
            let config = value["data"]["ndc.yaml"].as_str().unwrap();
            let parsed = ndc_node::NodeConfig::from_yaml_with_env(
                config,
                "k8s/ndc.yaml",
                std::iter::empty(),
            )
            .unwrap();
            assert_eq!(parsed.node.grpc_listen.port(), 50051);
            found = true;
        }
    }
    assert!(found, "no ConfigMap in k8s/ndc.yaml");
}
