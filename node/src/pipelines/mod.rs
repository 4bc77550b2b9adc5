//! Pipelines: the specs users apply (sources, merges, joins, views) and the
//! runtime that runs them with the configured views as one data path.

pub mod rekey;
pub mod runtime;
pub mod spec;
