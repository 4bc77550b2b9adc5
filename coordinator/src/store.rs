//! Raft log and state machine in RocksDB (openraft storage v2).
//!
//! One database with two column families: `log` (index → entry) and `meta`
//! (vote, committed, last purged, state machine, snapshot). Every write that
//! openraft must find after a crash is synced before it is acknowledged.
//! The state machine is small (cluster metadata), so it is stored whole after
//! every applied batch, in the same write as its last applied log id.

// openraft's StorageError is large by design and is what its traits return.
#![allow(clippy::result_large_err)]

use crate::state::{ClusterState, CommandReply, NodeId};
use crate::{Member, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
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

type StorageResult<T> = Result<T, StorageError<NodeId>>;

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
            snapshot_seq: 0,
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

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageIOError<NodeId>> {
    serde_json::to_vec(value).map_err(|e| StorageIOError::write(&e))
}

/// The Raft log.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<DB>,
}

impl LogStore {
    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        let Some(bytes) = self
            .db
            .get_cf(cf(&self.db, CF_META), key)
            .map_err(|e| StorageIOError::read(&e))?
        else {
            return Ok(None);
        };
        Ok(Some(
            serde_json::from_slice(&bytes).map_err(|e| StorageIOError::read(&e))?,
        ))
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> StorageResult<()> {
        self.db
            .put_cf_opt(cf(&self.db, CF_META), key, json(value)?, &synced())
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
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
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let index = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| {
                StorageIOError::read_logs(&crate::Error::Corrupt("log key".into()))
            })?);
            if !range.contains(&index) {
                break;
            }
            let entry: Entry<TypeConfig> =
                serde_json::from_slice(&v).map_err(|e| StorageIOError::read_logs(&e))?;
            out.push(entry);
        }
        Ok(out)
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
                let (_, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
                let entry: Entry<TypeConfig> =
                    serde_json::from_slice(&v).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(entry.log_id)
            }
            None => None,
        };
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(PURGED)?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.put_meta(COMMITTED, &committed)?;
        if let Some(c) = committed {
            metrics::gauge!(crate::metric::RAFT_COMMIT_INDEX).set(c.index as f64);
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.db
            .put_cf_opt(cf(&self.db, CF_META), VOTE, json(vote)?, &synced())
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.get_meta(VOTE)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(
                cf(&self.db, CF_LOG),
                index_key(entry.log_id.index),
                serde_json::to_vec(&entry).map_err(|e| StorageIOError::write_logs(&e))?,
            );
        }
        // Synced before reporting the entries durable: a vote or an
        // acknowledged append must survive a crash.
        let result = self.db.write_opt(batch, &synced());
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            cf(&self.db, CF_LOG),
            index_key(log_id.index),
            index_key(u64::MAX),
        );
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&self.db, CF_META), PURGED, json(&log_id)?);
        batch.delete_range_cf(
            cf(&self.db, CF_LOG),
            index_key(0),
            index_key(log_id.index.saturating_add(1)),
        );
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }
}

/// The applied state: cluster metadata plus what Raft needs to know of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, Member>,
    pub cluster: ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    data: Vec<u8>,
}

/// The state machine; every applied batch is published on a watch channel
/// so the node can react to assignment changes without polling.
pub struct StateMachine {
    db: Arc<DB>,
    applied: Applied,
    published: watch::Sender<Arc<Applied>>,
    snapshot_seq: u64,
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
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.published.send_replace(Arc::new(self.applied.clone()));
        Ok(())
    }
}

/// Builds snapshots from a copy of the applied state.
pub struct SnapshotBuilder {
    applied: Applied,
    id: String,
    db: Arc<DB>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let data = json(&self.applied)?;
        let meta = SnapshotMeta {
            last_log_id: self.applied.last_applied,
            last_membership: self.applied.membership.clone(),
            snapshot_id: self.id.clone(),
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.db
            .put_cf_opt(cf(&self.db, CF_META), SNAPSHOT, json(&stored)?, &synced())
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>)> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandReply>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        for entry in entries {
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
            replies.push(reply);
        }
        self.persist()?;
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        let id = match self.applied.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.snapshot_seq),
            None => format!("--{}", self.snapshot_seq),
        };
        SnapshotBuilder {
            applied: self.applied.clone(),
            id,
            db: self.db.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let applied: Applied = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
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
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.persist()
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let Some(bytes) = self
            .db
            .get_cf(cf(&self.db, CF_META), SNAPSHOT)
            .map_err(|e| StorageIOError::read(&e))?
        else {
            return Ok(None);
        };
        let stored: StoredSnapshot =
            serde_json::from_slice(&bytes).map_err(|e| StorageIOError::read(&e))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}
