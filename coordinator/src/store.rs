//! Raft log and state machine in RocksDB (openraft storage v2).
//!
//! One database with two column families: `log` (index → entry) and `meta`
//! (vote, committed, last purged, state machine, snapshot). Every write that
//! openraft must find after a crash is synced before it is acknowledged.
//! The state machine is small (cluster metadata), so it is stored whole after
//! every applied batch, in the same write as its last applied log id.

use crate::TypeConfig;
use crate::state::{ClusterState, CommandReply};
use futures::StreamExt;
use openraft::alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf};
use openraft::storage::{
    EntryResponder, IOFlushed, LogState, RaftLogStorage, RaftStateMachine, SnapshotMeta,
};
use openraft::{EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder, StoredMembership};
use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;

type StorageResult<T> = Result<T, std::io::Error>;
type LogId = LogIdOf<TypeConfig>;
type Entry = EntryOf<TypeConfig>;
type Snapshot = SnapshotOf<TypeConfig, Cursor<Vec<u8>>>;

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"last-purged";
const MACHINE: &[u8] = b"state-machine";
const SNAPSHOT: &[u8] = b"snapshot";

/// Opens (or creates) the Raft database of a node.
pub fn open(path: &Path) -> Result<(LogStore, StateMachine), crate::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_LOG, Options::default()),
        ColumnFamilyDescriptor::new(CF_META, Options::default()),
    ];
    let db = Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?);
    let machine: Applied = match db.get_cf(cf(&db, CF_META), MACHINE)? {
        Some(bytes) => {
            serde_json::from_slice(&bytes).map_err(|e| crate::Error::Corrupt(e.to_string()))?
        }
        None => Applied::default(),
    };
    let (tx, _) = watch::channel(Arc::new(machine.clone()));
    Ok((
        LogStore { db: db.clone() },
        StateMachine {
            db,
            applied: machine,
            published: tx,
        },
    ))
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    // Both column families are created at open.
    #[allow(clippy::expect_used)]
    db.cf_handle(name).expect("column family created at open")
}

fn synced() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn json<T: Serialize>(value: &T) -> StorageResult<Vec<u8>> {
    serde_json::to_vec(value).map_err(std::io::Error::other)
}

fn io(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(e)
}

/// The Raft log.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<DB>,
}

impl LogStore {
    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        let Some(bytes) = self.db.get_cf(cf(&self.db, CF_META), key).map_err(io)? else {
            return Ok(None);
        };
        Ok(Some(serde_json::from_slice(&bytes).map_err(io)?))
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> StorageResult<()> {
        self.db
            .put_cf_opt(cf(&self.db, CF_META), key, json(value)?, &synced())
            .map_err(io)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            cf(&self.db, CF_LOG),
            IteratorMode::From(&index_key(start), Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(io)?;
            let index = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| io(crate::Error::Corrupt("log key".into())))?,
            );
            if !range.contains(&index) {
                break;
            }
            let entry: Entry = serde_json::from_slice(&v).map_err(io)?;
            out.push(entry);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<VoteOf<TypeConfig>>> {
        self.get_meta(VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last = match self
            .db
            .iterator_cf(cf(&self.db, CF_LOG), IteratorMode::End)
            .next()
        {
            Some(item) => {
                let (_, v) = item.map_err(io)?;
                let entry: Entry = serde_json::from_slice(&v).map_err(io)?;
                Some(entry.log_id)
            }
            None => None,
        };
        let last_purged_log_id: Option<LogId> = self.get_meta(PURGED)?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> StorageResult<()> {
        self.put_meta(COMMITTED, &committed)?;
        if let Some(c) = committed {
            metrics::gauge!(crate::metric::RAFT_COMMIT_INDEX).set(c.index as f64);
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId>> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> StorageResult<()> {
        self.db
            .put_cf_opt(cf(&self.db, CF_META), VOTE, json(vote)?, &synced())
            .map_err(io)?;
        Ok(())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(
                cf(&self.db, CF_LOG),
                index_key(entry.log_id.index),
                serde_json::to_vec(&entry).map_err(io)?,
            );
        }
        // Synced before reporting the entries durable: a vote or an
        // acknowledged append must survive a crash.
        let result = self.db.write_opt(batch, &synced());
        match result {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(std::io::Error::other(e.to_string())));
                Err(io(e))
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> StorageResult<()> {
        let from = last_log_id.map_or(0, |l| l.index.saturating_add(1));
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf(&self.db, CF_LOG), index_key(from), index_key(u64::MAX));
        self.db.write_opt(batch, &synced()).map_err(io)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> StorageResult<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&self.db, CF_META), PURGED, json(&log_id)?);
        batch.delete_range_cf(
            cf(&self.db, CF_LOG),
            index_key(0),
            index_key(log_id.index.saturating_add(1)),
        );
        self.db.write_opt(batch, &synced()).map_err(io)?;
        Ok(())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }
}

/// The applied state: cluster metadata plus what Raft needs to know of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembershipOf<TypeConfig>,
    pub cluster: ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMetaOf<TypeConfig>,
    data: Vec<u8>,
}

/// The state machine; every applied batch is published on a watch channel
/// so the node can react to assignment changes without polling.
pub struct StateMachine {
    db: Arc<DB>,
    applied: Applied,
    published: watch::Sender<Arc<Applied>>,
}

impl StateMachine {
    pub fn subscribe(&self) -> watch::Receiver<Arc<Applied>> {
        self.published.subscribe()
    }

    fn persist(&self) -> StorageResult<()> {
        self.db
            .put_cf_opt(
                cf(&self.db, CF_META),
                MACHINE,
                json(&self.applied)?,
                &synced(),
            )
            .map_err(io)?;
        self.published.send_replace(Arc::new(self.applied.clone()));
        Ok(())
    }
}

/// Builds snapshots from a copy of the applied state.
pub struct SnapshotBuilder {
    applied: Applied,
    db: Arc<DB>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> StorageResult<Snapshot> {
        let data = json(&self.applied)?;
        let meta = SnapshotMeta {
            last_log_id: self.applied.last_applied,
            last_membership: self.applied.membership.clone(),
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.db
            .put_cf_opt(cf(&self.db, CF_META), SNAPSHOT, json(&stored)?, &synced())
            .map_err(io)?;
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId>, StoredMembershipOf<TypeConfig>)> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> StorageResult<()>
    where
        S: futures::Stream<Item = Result<EntryResponder<TypeConfig>, std::io::Error>>
            + Unpin
            + OptionalSend,
    {
        // The whole batch is persisted in one write before any caller hears
        // of it: a reply means the change survives a crash.
        let mut replies = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            self.applied.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => CommandReply::default(),
                EntryPayload::Normal(command) => {
                    self.applied.cluster.apply(&command, entry.log_id.index)
                }
                EntryPayload::Membership(m) => {
                    self.applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    CommandReply::default()
                }
            };
            if let Some(responder) = responder {
                replies.push((responder, reply));
            }
        }
        self.persist()?;
        for (responder, reply) in replies {
            responder.send(reply);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            applied: self.applied.clone(),
            db: self.db.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Cursor<Vec<u8>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let applied: Applied = serde_json::from_slice(&data).map_err(io)?;
        self.applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            cluster: applied.cluster,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.db
            .put_cf_opt(cf(&self.db, CF_META), SNAPSHOT, json(&stored)?, &synced())
            .map_err(io)?;
        self.persist()
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot>> {
        let Some(bytes) = self
            .db
            .get_cf(cf(&self.db, CF_META), SNAPSHOT)
            .map_err(io)?
        else {
            return Ok(None);
        };
        let stored: StoredSnapshot = serde_json::from_slice(&bytes).map_err(io)?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Cursor::new(stored.data),
        }))
    }
}
