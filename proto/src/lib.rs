//! Protocol buffers of ndc: the public gRPC API (`v1`) and the records kept
//! in RocksDB (`state`). One crate so that the node, the operators and clients
//! agree on one definition.

#![allow(clippy::all, missing_docs)]

/// Public subscription API (`ndc.v1`).
pub mod v1 {
    tonic::include_proto!("ndc.v1");
}

/// Records persisted in RocksDB (`ndc.state.v1`).
pub mod state {
    tonic::include_proto!("ndc.state.v1");
}

/// Cluster protocol: Raft between nodes, liveness and admin (`ndc.cluster.v1`).
pub mod cluster {
    tonic::include_proto!("ndc.cluster.v1");
}

/// Encoded file descriptor set, for gRPC server reflection (`grpcurl`).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ndc_descriptor");
