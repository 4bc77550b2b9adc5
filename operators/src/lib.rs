//! Operators of ndc: decoding agency change feeds and keeping their state.
//!
//! - [`debezium`]: Debezium change events → [`debezium::Decoded`] or a typed
//!   [`debezium::DecodeError`] (the dead-letter reason).
//! - [`ordering`]: which of two events of a key is newer: each connector's
//!   position in its source database's log.
//! - [`replica`]: the synchronized replica operator: each event decided
//!   against the stored row and applied to a [`store::Txn`].
//! - [`store`]: RocksDB state: replicas, change streams and feed offsets,
//!   committed atomically.
//! - [`merge`]: the golden record of each citizen from many agencies' facts.
//! - [`national_id`]: the 12-digit citizen identification number.
//! - [`shard`]: how a view's key space is split into shards.

pub mod copy_file;
pub mod debezium;
pub mod masking;
pub mod merge;
pub mod national_id;
pub mod ordering;
pub mod replica;
pub mod shard;
pub mod store;

pub use debezium::{
    ChangeEvent, ChangeOp, DecodeError, DecodeErrorKind, Decoded, Decoder, DecoderConfig, Format,
    Key, NationalIdCheck, Row,
};
pub use replica::{Outcome, Position};
pub use store::{
    CommitInfo, Pending, PreparedWrite, Replayed, RowOverlay, SnapshotRow, StateEntry, StateFamily,
    Store, StoreConfig, StoreError, StoreReader, Txn, ViewId, state_db_options,
};
