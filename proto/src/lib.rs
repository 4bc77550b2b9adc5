//! Protocol buffers of ndc: the public gRPC API (`v1`) and the records kept
//! in RocksDB (`state`). One crate so that the node, the operators and clients
//! agree on one definition.

#![allow(clippy::all, missing_docs)]

/// Generated code, in modules that mirror the protobuf packages (so that
/// one package can refer to another).
pub mod ndc {
    pub mod v1 {
        tonic::include_proto!("ndc.v1");
    }
    pub mod state {
        pub mod v1 {
            tonic::include_proto!("ndc.state.v1");
        }
    }
    pub mod cluster {
        pub mod v1 {
            tonic::include_proto!("ndc.cluster.v1");
        }
    }
}

/// Public subscription API (`ndc.v1`).
pub use ndc::v1;

/// Records persisted in RocksDB and replicated through the cluster's change
/// log (`ndc.state.v1`).
pub use ndc::state::v1 as state;

/// Cluster protocol: Raft between nodes, liveness and admin (`ndc.cluster.v1`).
pub use ndc::cluster::v1 as cluster;

/// Encoded file descriptor set, for gRPC server reflection (`grpcurl`).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ndc_descriptor");
