//! What a node serves over gRPC, and the rules on it: subscriptions (with
//! the masking filter every delivery goes through), access control (who may
//! call what, grants), the audit trail of deliveries, and the pipeline API.

pub mod access;
pub mod access_api;
pub mod audit;
pub mod audit_api;
pub mod filter;
pub mod pipelines_api;
pub mod shard_peer;
pub mod subscriptions;
