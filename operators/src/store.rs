//! RocksDB state of a node: replicas, their change streams and the feed
//! positions they were built from.
//!
//! One database, four column families:
//! - `rows`: `view id ‖ key` → [`StoredRow`] (deleted rows kept as tombstones);
//! - `changelog`: `view id ‖ seq` → [`Change`], the view's change stream;
//! - `offsets`: `view id ‖ stream` → next offset to read from that stream;
//! - `meta`: `view/<name>` → [`ViewMeta`].
//!
//! A [`Txn`] gathers the effects of a batch of records and commits them as one
//! write batch, so rows, change stream and offsets can never disagree after a
//! crash: a restarted node resumes reading exactly after the last record whose
//! effects are stored.
//!
//! There is one writer ([`Store`]) and any number of readers
//! ([`StoreReader`]); the writer is the only one that assigns sequence
//! numbers, so a view's change stream is gapless.

use crate::debezium::{Key, SourceInfo};
use crate::replica::{Basis, Outcome, Position};
use ndc_proto::state::{Effect, LogRecord, RowVersion, StoredRow, ViewMeta, effect};
use ndc_proto::v1::{Change, Op, SourcePosition};
use prost::Message;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, Direction,
    IteratorMode, Options, ReadOptions, WriteBatch, WriteBufferManager, WriteOptions,
};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CF_ROWS: &str = "rows";
const CF_CHANGELOG: &str = "changelog";
const CF_OFFSETS: &str = "offsets";
const CF_META: &str = "meta";
const META_NEXT_VIEW_ID: &[u8] = b"next-view-id";

/// Length of the row-key prefixes that get bloom filters: the prefix of one
/// person's rows in a merge's contributions (`{"national_id":"…12 digits…",`).
/// Prefix reads ([`Txn::live_rows_with_prefix`]) of exactly this length skip
/// the files that do not hold it.
pub const ROW_PREFIX_BLOOM_BYTES: usize = 30;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt state record {what}: {source}")]
    Corrupt {
        what: String,
        source: prost::DecodeError,
    },
    #[error("corrupt state: {0}")]
    CorruptRow(String),
    #[error("unknown view {0:?}")]
    UnknownView(String),
    /// The write-ahead log's directory changed while it still holds writes
    /// not yet in the state's files: opening would silently drop them.
    #[error(
        "the write-ahead log was in {previous} and still has files there, but storage.wal_dir now points to {configured}: move the *.log files from {previous} to {configured} (or set wal_dir back), then start again"
    )]
    WalMoved {
        previous: String,
        configured: String,
    },
    #[error("state directory: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "view {view:?} already holds changes made outside this cluster; start the node with an empty data_dir"
    )]
    Incarnation { view: String },
    #[error(
        "change stream of view {view:?} no longer holds seq {seq}: retained from {retained_from}"
    )]
    Expired {
        view: String,
        seq: u64,
        retained_from: u64,
    },
}

/// Settings of the state store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// Shared block cache for all column families.
    pub block_cache_bytes: usize,
    /// Total memtable memory for all column families.
    pub write_buffer_bytes: usize,
    /// fsync every commit: a committed batch survives power loss, not only a
    /// process crash. Subscribers only see committed batches.
    pub sync_commits: bool,
    /// LZ4 on the rows column family. Off, its blocks cost no decompression
    /// when read back from the OS page cache (the golden-record merge reads
    /// far more state than a block cache holds), at the price of disk.
    pub compress_rows: bool,
    /// Where the write-ahead log lives (default: with the state). On its
    /// own device, commit fsyncs do not queue behind flushes and compactions.
    pub wal_dir: Option<PathBuf>,
}

/// File in the state directory naming where the write-ahead log is, so that
/// a changed `wal_dir` is noticed instead of losing the log's last writes.
const WAL_DIR_MARKER: &str = "NDC_WAL_DIR";

impl StoreConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StoreConfig {
            path: path.into(),
            block_cache_bytes: 128 << 20,
            write_buffer_bytes: 128 << 20,
            sync_commits: true,
            compress_rows: false,
            wal_dir: None,
        }
    }

    /// The write-ahead log's directory in effect.
    fn effective_wal_dir(&self) -> PathBuf {
        self.wal_dir.clone().unwrap_or_else(|| self.path.clone())
    }

    /// Refuses a `wal_dir` that moved while the previous one still holds log
    /// files; records the one in effect.
    fn check_wal_dir(&self) -> Result<(), StoreError> {
        let configured = self.effective_wal_dir();
        let marker = self.path.join(WAL_DIR_MARKER);
        if let Ok(previous) = std::fs::read_to_string(&marker) {
            let previous = PathBuf::from(previous.trim_end_matches('\n'));
            let has_logs = |dir: &Path| {
                std::fs::read_dir(dir).is_ok_and(|entries| {
                    entries.flatten().any(|e| {
                        e.path().extension().is_some_and(|x| x == "log")
                            && e.metadata().is_ok_and(|m| m.len() > 0)
                    })
                })
            };
            if previous != configured && has_logs(&previous) {
                return Err(StoreError::WalMoved {
                    previous: previous.display().to_string(),
                    configured: configured.display().to_string(),
                });
            }
        }
        std::fs::create_dir_all(&self.path)?;
        std::fs::write(&marker, format!("{}\n", configured.display()))?;
        Ok(())
    }
}

/// Hashes keys that the node makes itself (view ids, stream names from its
/// configuration), never agency data: those need no protection against
/// collision flooding, and SipHash was 12% of the operator's instructions
/// (six view lookups and four offset lookups per event). Maps keyed by
/// agency data (row keys) are [`RowMap`]s, with a randomly seeded hasher.
#[derive(Default)]
struct InternalHasher(u64);

impl Hasher for InternalHasher {
    fn finish(&self) -> u64 {
        // The multiply leaves the low bits weakest; hashbrown takes its
        // buckets from the low bits and its tags from the top seven.
        self.0.rotate_left(26)
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(word));
        }
        for &b in chunks.remainder() {
            self.write_u64(u64::from(b));
        }
    }

    /// Fibonacci hashing: the golden ratio's odd multiplier spreads
    /// consecutive ids over the whole word.
    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_u32(&mut self, word: u32) {
        self.write_u64(u64::from(word));
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }
}

type InternalMap<K, V> = HashMap<K, V, BuildHasherDefault<InternalHasher>>;
type InternalSet<K> = HashSet<K, BuildHasherDefault<InternalHasher>>;

/// Rows by (view, key): keys are agency data, so the hasher is seeded at
/// random per process (foldhash, hashbrown's default), and a lookup by
/// [`RowRef`] borrows the key instead of copying it. The standard map's
/// SipHash and the copy were 5% of the node's instructions (three lookups
/// and two inserts per event).
type RowMap<V> = hashbrown::HashMap<(ViewId, Vec<u8>), V>;

/// A borrowed (view, key) of a [`RowMap`]. Its derived hash is the tuple's:
/// the view, then the key's length and bytes.
#[derive(Hash)]
struct RowRef<'a>(ViewId, &'a [u8]);

impl hashbrown::Equivalent<(ViewId, Vec<u8>)> for RowRef<'_> {
    fn equivalent(&self, key: &(ViewId, Vec<u8>)) -> bool {
        self.0 == key.0 && self.1 == key.1.as_slice()
    }
}

/// Handle of a view inside the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ViewId(u32);

impl ViewId {
    /// The id's number: unique in a store, never reused.
    pub fn as_u32(self) -> u32 {
        self.0
    }

    fn prefix(self) -> [u8; 4] {
        self.0.to_be_bytes()
    }
}

/// A row of a snapshot scan.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    pub key: String,
    pub row_json: String,
    pub version: RowVersion,
}

/// Read side of the store; cheap to clone, safe to share.
#[derive(Clone)]
pub struct StoreReader {
    db: Arc<DB>,
    /// Views can be added and dropped while readers run (pipeline specs).
    views: Arc<std::sync::RwLock<BTreeMap<String, ViewId>>>,
}

impl std::fmt::Debug for StoreReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreReader")
            .field("views", &self.views)
            .finish()
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    // Every column family is created when the store is opened.
    #[allow(clippy::expect_used)]
    db.cf_handle(name).expect("column family created at open")
}

fn decode<M: Message + Default>(bytes: &[u8], what: impl Fn() -> String) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|source| StoreError::Corrupt {
        what: what(),
        source,
    })
}

fn view_meta_key(name: &str) -> Vec<u8> {
    format!("view/{name}").into_bytes()
}

fn cursor_key(name: &str) -> Vec<u8> {
    format!("cursor/{name}").into_bytes()
}

/// Set while a copy of the view is being installed: found at open, the
/// view's state was half replaced, and it starts again empty.
fn installing_key(name: &str) -> Vec<u8> {
    format!("installing/{name}").into_bytes()
}

/// Deletes a view's rows, change stream, offsets and cursor (not its
/// metadata) in `batch`.
fn delete_view_state(batch: &mut WriteBatch, db: &DB, id: ViewId, name: &str) {
    for family in [CF_ROWS, CF_CHANGELOG, CF_OFFSETS] {
        batch.delete_range_cf(cf(db, family), id.prefix().to_vec(), prefix_end(id));
    }
    batch.delete_cf(cf(db, CF_META), cursor_key(name));
}

/// Metadata of a view with nothing in it yet, and a new incarnation.
fn empty_meta(id: u32) -> ViewMeta {
    ViewMeta {
        id,
        incarnation: new_incarnation(id),
        last_seq: 0,
        retained_from_seq: 1,
        truncated_at: None,
        live_rows: 0,
        key_placement: None,
    }
}

/// Where a copy's SST files are written before they are ingested: beside
/// the state directory, on the same file system (ingestion moves them).
fn scratch_dir(db: &DB) -> PathBuf {
    let mut dir = db.path().as_os_str().to_owned();
    dir.push(".copy");
    PathBuf::from(dir)
}

fn spec_key(name: &str) -> Vec<u8> {
    format!("spec/{name}").into_bytes()
}

fn changelog_key(view: ViewId, seq: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&view.prefix());
    k[4..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn row_key(view: ViewId, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + key.len());
    k.extend_from_slice(&view.prefix());
    k.extend_from_slice(key);
    k
}

fn offset_key(view: ViewId, stream: &str) -> Vec<u8> {
    row_key(view, stream.as_bytes())
}

/// First key after every key starting with `prefix` (for iterator bounds).
fn prefix_end(view: ViewId) -> Vec<u8> {
    (view.0 + 1).to_be_bytes().to_vec()
}

/// Every key of `view` in a column family at `snapshot`, in order, without
/// filling the block cache (a whole-view read), across prefixes (the
/// prefix bloom filters must not apply).
fn view_scan<'a>(
    snapshot: &'a rocksdb::SnapshotWithThreadMode<'a, DB>,
    family: &rocksdb::ColumnFamily,
    view: ViewId,
) -> rocksdb::DBIteratorWithThreadMode<'a, DB> {
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(prefix_end(view));
    opts.fill_cache(false);
    opts.set_total_order_seek(true);
    snapshot.iterator_cf_opt(
        family,
        opts,
        IteratorMode::From(&view.prefix(), Direction::Forward),
    )
}

/// The smallest key greater than every key starting with `prefix` (`None`
/// when the prefix is all 0xff).
fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl StoreReader {
    pub fn view_id(&self, name: &str) -> Option<ViewId> {
        self.views
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .copied()
    }

    pub fn view_names(&self) -> Vec<String> {
        self.views
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Writes a consistent copy of the whole store to `dir` (a RocksDB
    /// checkpoint: memtables flushed, table files hard-linked where the file
    /// system allows): rows, change streams, offsets and metadata as of one
    /// commit, which another node can open as its own state and resume from.
    /// `dir` must not exist.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), StoreError> {
        let checkpoint = rocksdb::checkpoint::Checkpoint::new(&*self.db)?;
        checkpoint.create_checkpoint(dir)?;
        Ok(())
    }

    /// The sum over views of their last sequence: how much state this
    /// store holds (0: none).
    pub fn changes_held(&self) -> Result<u64, StoreError> {
        let mut sum = 0u64;
        for name in self.stored_view_names()? {
            sum = sum.saturating_add(self.view_meta(&name)?.last_seq);
        }
        Ok(sum)
    }

    /// Every view whose state the store holds, registered in this process
    /// or not (to tell what a data directory was written with).
    pub fn stored_view_names(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let prefix = view_meta_key("");
        for item in self.db.prefix_iterator_cf(cf(&self.db, CF_META), &prefix) {
            let (k, _) = item?;
            let Some(name) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            out.push(String::from_utf8_lossy(name).into_owned());
        }
        Ok(out)
    }

    /// Position of a consumer of change streams (such as the re-keying
    /// stage of a pipeline), written by that consumer, not the writer.
    pub fn cursor(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self
            .db
            .get_cf(cf(&self.db, CF_META), cursor_key(name))?
            .filter(|b| b.len() == 8)
            .map_or(0, |b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b);
                u64::from_be_bytes(a)
            }))
    }

    /// Stores a consumer's position durably (synced).
    pub fn set_cursor(&self, name: &str, value: u64) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.put_cf_opt(
            cf(&self.db, CF_META),
            cursor_key(name),
            value.to_be_bytes(),
            &opts,
        )?;
        Ok(())
    }

    /// Committed next offset of `stream` for the view `name` (`None`: never
    /// read, or no such view). Read from disk: what the last commit wrote.
    pub fn stream_offset(&self, name: &str, stream: &str) -> Result<Option<u64>, StoreError> {
        let Some(view) = self.view_id(name) else {
            return Ok(None);
        };
        Ok(self
            .db
            .get_cf(cf(&self.db, CF_OFFSETS), offset_key(view, stream))?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_be_bytes))
    }

    /// Committed metadata of a view.
    pub fn view_meta(&self, name: &str) -> Result<ViewMeta, StoreError> {
        let bytes = self
            .db
            .get_cf(cf(&self.db, CF_META), view_meta_key(name))?
            .ok_or_else(|| StoreError::UnknownView(name.to_string()))?;
        decode(&bytes, || format!("meta of view {name}"))
    }

    /// Up to `limit` changes with sequence numbers after `after_seq`, in
    /// order. Fails with [`StoreError::Expired`] if retention has removed
    /// `after_seq + 1`.
    pub fn changes_after(
        &self,
        name: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Change>, StoreError> {
        let view = self
            .view_id(name)
            .ok_or_else(|| StoreError::UnknownView(name.into()))?;
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(prefix_end(view));
        let start = changelog_key(view, after_seq.saturating_add(1));
        let iter = self.db.iterator_cf_opt(
            cf(&self.db, CF_CHANGELOG),
            opts,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (k, v) = item?;
            let change: Change = decode(&v, || format!("change {k:?} of view {name}"))?;
            out.push(change);
        }
        if let Some(first) = out.first() {
            if first.seq != after_seq + 1 {
                let meta = self.view_meta(name)?;
                return Err(StoreError::Expired {
                    view: name.into(),
                    seq: after_seq + 1,
                    retained_from: meta.retained_from_seq,
                });
            }
        } else {
            // Nothing after `after_seq`: fine if it is the head, expired if
            // retention trimmed past it.
            let meta = self.view_meta(name)?;
            if after_seq + 1 < meta.retained_from_seq {
                return Err(StoreError::Expired {
                    view: name.into(),
                    seq: after_seq + 1,
                    retained_from: meta.retained_from_seq,
                });
            }
        }
        Ok(out)
    }

    /// Reads the view's live rows at one consistent point, in key order,
    /// handing them to `sink` in batches of `batch_size`; `sink` returns
    /// false to stop early. Returns the view's last sequence at that point:
    /// the change stream continues with the next one. Blocking: run it on a
    /// blocking thread.
    pub fn scan_snapshot(
        &self,
        name: &str,
        keys: Option<&[Key]>,
        batch_size: usize,
        mut sink: impl FnMut(Vec<SnapshotRow>) -> bool,
    ) -> Result<u64, StoreError> {
        let view = self
            .view_id(name)
            .ok_or_else(|| StoreError::UnknownView(name.into()))?;
        let snapshot = self.db.snapshot();
        let meta_bytes = snapshot
            .get_cf(cf(&self.db, CF_META), view_meta_key(name))?
            .ok_or_else(|| StoreError::UnknownView(name.into()))?;
        let meta: ViewMeta = decode(&meta_bytes, || format!("meta of view {name}"))?;
        let rows_cf = cf(&self.db, CF_ROWS);
        let mut batch = Vec::with_capacity(batch_size.min(4096));
        let mut push =
            |key: &[u8], value: &[u8], batch: &mut Vec<SnapshotRow>| -> Result<bool, StoreError> {
                let row: StoredRow = decode(value, || format!("row of view {name}"))?;
                if !row.deleted {
                    batch.push(SnapshotRow {
                        key: String::from_utf8_lossy(&key[4..]).into_owned(),
                        row_json: row.row_json,
                        version: row.version.unwrap_or_default(),
                    });
                }
                if batch.len() >= batch_size {
                    return Ok(sink(std::mem::take(batch)));
                }
                Ok(true)
            };
        match keys {
            Some(keys) => {
                let mut sorted: Vec<&Key> = keys.iter().collect();
                sorted.sort();
                sorted.dedup();
                for key in sorted {
                    let rk = row_key(view, key.as_bytes());
                    if let Some(value) = snapshot.get_cf(rows_cf, &rk)?
                        && !push(&rk, &value, &mut batch)?
                    {
                        return Ok(meta.last_seq);
                    }
                }
            }
            None => {
                let iter = view_scan(&snapshot, rows_cf, view);
                for item in iter {
                    let (k, v) = item?;
                    if !push(&k, &v, &mut batch)? {
                        return Ok(meta.last_seq);
                    }
                }
            }
        }
        if !batch.is_empty() {
            sink(batch);
        }
        Ok(meta.last_seq)
    }

    /// Views' whole state at one consistent point (one snapshot for all),
    /// for another node to take as its own ([`Store::install_view`]): each
    /// view's metadata, cursor, stream offsets, change stream and rows,
    /// keys without this store's view id. Handed to `sink` with the view's
    /// name, in order, `batch_size` entries at a time; `sink` returns false
    /// to stop early. Blocking: run it on a blocking thread.
    pub fn export_views(
        &self,
        names: &[String],
        batch_size: usize,
        mut sink: impl FnMut(&str, Vec<StateEntry>) -> bool,
    ) -> Result<(), StoreError> {
        let snapshot = self.db.snapshot();
        let meta_cf = cf(&self.db, CF_META);
        for name in names {
            let view = self
                .view_id(name)
                .ok_or_else(|| StoreError::UnknownView(name.clone()))?;
            let meta_bytes = snapshot
                .get_cf(meta_cf, view_meta_key(name))?
                .ok_or_else(|| StoreError::UnknownView(name.clone()))?;
            let mut batch = Vec::with_capacity(batch_size.min(4096));
            batch.push(StateEntry {
                family: StateFamily::Meta,
                key: Vec::new(),
                value: meta_bytes.to_vec(),
            });
            if let Some(cursor) = snapshot.get_cf(meta_cf, cursor_key(name))? {
                batch.push(StateEntry {
                    family: StateFamily::Cursor,
                    key: Vec::new(),
                    value: cursor.to_vec(),
                });
            }
            for family in [
                StateFamily::Offsets,
                StateFamily::Changelog,
                StateFamily::Rows,
            ] {
                let iter = view_scan(&snapshot, cf(&self.db, family.column_family()), view);
                for item in iter {
                    let (k, v) = item?;
                    batch.push(StateEntry {
                        family,
                        key: k.get(4..).unwrap_or_default().to_vec(),
                        value: v.to_vec(),
                    });
                    if batch.len() >= batch_size && !sink(name, std::mem::take(&mut batch)) {
                        return Ok(());
                    }
                }
            }
            if !batch.is_empty() && !sink(name, batch) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Approximate bytes on disk (SST files) and in memtables, for metrics.
    pub fn size_bytes(&self) -> (u64, u64) {
        let mut sst = 0;
        let mut mem = 0;
        for name in [CF_ROWS, CF_CHANGELOG, CF_OFFSETS, CF_META] {
            let handle = cf(&self.db, name);
            sst += self
                .db
                .property_int_value_cf(handle, "rocksdb.total-sst-files-size")
                .ok()
                .flatten()
                .unwrap_or(0);
            mem += self
                .db
                .property_int_value_cf(handle, "rocksdb.cur-size-all-mem-tables")
                .ok()
                .flatten()
                .unwrap_or(0);
        }
        (sst, mem)
    }
}

/// Where an entry of a copied view's state goes (see
/// [`StoreReader::export_view`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFamily {
    Rows,
    Changelog,
    Offsets,
    /// The view's [`ViewMeta`] (key empty).
    Meta,
    /// The view's cursor (key empty).
    Cursor,
}

impl StateFamily {
    fn column_family(self) -> &'static str {
        match self {
            StateFamily::Rows => CF_ROWS,
            StateFamily::Changelog => CF_CHANGELOG,
            StateFamily::Offsets => CF_OFFSETS,
            StateFamily::Meta | StateFamily::Cursor => CF_META,
        }
    }

    /// Wire number of the family (the state-copy RPC).
    pub fn number(self) -> u32 {
        match self {
            StateFamily::Rows => 1,
            StateFamily::Changelog => 2,
            StateFamily::Offsets => 3,
            StateFamily::Meta => 4,
            StateFamily::Cursor => 5,
        }
    }

    pub fn from_number(n: u32) -> Option<StateFamily> {
        Some(match n {
            1 => StateFamily::Rows,
            2 => StateFamily::Changelog,
            3 => StateFamily::Offsets,
            4 => StateFamily::Meta,
            5 => StateFamily::Cursor,
            _ => return None,
        })
    }
}

/// One key of a view's state, without the view's id: ids are per store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateEntry {
    pub family: StateFamily,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// The most a new batch reserves up front, whatever the last one took.
const MAX_BATCH_RESERVE: usize = 32 << 20;

/// Write side of the store: one per database, or one per set of views
/// after [`Store::split_off`] (a pool of writers).
pub struct Store {
    reader: StoreReader,
    metas: InternalMap<ViewId, ViewMeta>,
    names: HashMap<ViewId, String>,
    offsets: InternalMap<(ViewId, Arc<str>), u64>,
    write_opts: WriteOptions,
    sync: bool,
    /// Bytes of the last prepared batch: the next one starts that large
    /// instead of growing by doubling (each doubling copies the batch so far
    /// and touches fresh pages).
    last_batch_bytes: usize,
    /// Views whose truncates are emitted as one delete per removed row.
    row_truncates: InternalSet<ViewId>,
    /// Views read by key prefix while a batch is applied: their rows in a
    /// batch's overlay are also indexed in key order.
    prefix_scanned: InternalSet<ViewId>,
    // Kept alive for the lifetime of the database.
    _cache: Cache,
    _write_buffers: WriteBufferManager,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("views", &self.names).finish()
    }
}

/// The database-wide options of the node's state (threads, memtable
/// budget, WAL size, syncing, background priority), shared with the
/// load test's storage ceiling so that it measures the same engine.
pub fn state_db_options(write_buffers: &WriteBufferManager) -> Options {
    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.increase_parallelism(2);
    db_opts.set_max_background_jobs(2);
    db_opts.set_write_buffer_manager(write_buffers);
    db_opts.set_max_total_wal_size(256 << 20);
    db_opts.set_keep_log_file_num(5);
    // Flushes and compactions write their files to disk a megabyte at a
    // time instead of all at the end, where a 32 MiB sync would queue
    // the commits' WAL fsyncs behind it (RocksDB's tuning guide).
    db_opts.set_bytes_per_sync(1 << 20);
    // Flushes and compactions yield the CPU (and, under the bfq I/O
    // scheduler, the disk) to the commit path: the writer, the WAL's
    // fsync, the subscribers' reads. On two cores a flush beside them
    // took the commit's p99 from <= 10 to <= 25 ms. They lose nothing
    // overall: when they fall behind, the memtable budget stalls the
    // writer, which frees the CPU for them.
    if let Ok(mut env) = rocksdb::Env::new() {
        env.lower_thread_pool_cpu_priority();
        env.lower_high_priority_thread_pool_cpu_priority();
        env.lower_thread_pool_io_priority();
        env.lower_high_priority_thread_pool_io_priority();
        db_opts.set_env(&env);
    }
    db_opts
}

impl Store {
    /// Opens (or creates) the store with the given views. Views already in
    /// the store keep their state; new ones start empty.
    pub fn open(config: &StoreConfig, view_names: &[String]) -> Result<Store, StoreError> {
        let cache = Cache::new_lru_cache(config.block_cache_bytes);
        // Memtables get their own budget rather than being charged to the
        // block cache: charged, they evicted the blocks that the batched
        // lookups of current rows read, and every miss decompressed a block
        // again (measured: ~20% of the file-phase throughput,
        // docs/performance.md). The node's state memory is bounded by the
        // sum of the two budgets.
        // Stalling writes at the budget keeps memtable memory bounded even
        // when flushes fall behind the writer.
        let write_buffers =
            WriteBufferManager::new_write_buffer_manager(config.write_buffer_bytes, true);
        let mut db_opts = state_db_options(&write_buffers);
        config.check_wal_dir()?;
        if let Some(dir) = &config.wal_dir {
            db_opts.set_wal_dir(dir);
        }
        let cf_opts = |point_lookups: bool, prefix_bloom: bool, compression: DBCompressionType| {
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            table.set_cache_index_and_filter_blocks(true);
            table.set_pin_l0_filter_and_index_blocks_in_cache(true);
            let mut o = Options::default();
            if point_lookups {
                table.set_bloom_filter(10.0, false);
                // Most lookups of new keys miss: answer them from a bloom
                // filter instead of walking the memtable's skip list.
                o.set_memtable_whole_key_filtering(true);
                o.set_memtable_prefix_bloom_ratio(0.02);
            }
            if prefix_bloom {
                // Prefix reads of exactly this length (one person's rows)
                // skip every file and memtable without the prefix, instead
                // of reading and decompressing a block from each (measured:
                // the merge spent half its time in LZ4, docs/performance.md).
                o.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(
                    4 + ROW_PREFIX_BLOOM_BYTES,
                ));
            }
            o.set_block_based_table_factory(&table);
            o.set_compression_type(compression);
            o.set_write_buffer_size((config.write_buffer_bytes / 4).max(4 << 20));
            o
        };
        let cfs = vec![
            ColumnFamilyDescriptor::new(
                CF_ROWS,
                cf_opts(
                    true,
                    true,
                    if config.compress_rows {
                        DBCompressionType::Lz4
                    } else {
                        DBCompressionType::None
                    },
                ),
            ),
            ColumnFamilyDescriptor::new(
                CF_CHANGELOG,
                cf_opts(false, false, DBCompressionType::Lz4),
            ),
            ColumnFamilyDescriptor::new(CF_OFFSETS, cf_opts(true, false, DBCompressionType::Lz4)),
            ColumnFamilyDescriptor::new(CF_META, cf_opts(true, false, DBCompressionType::Lz4)),
        ];
        let db = DB::open_cf_descriptors(&db_opts, &config.path, cfs)?;

        let mut write_opts = WriteOptions::default();
        write_opts.set_sync(config.sync_commits);
        let mut store = Store {
            reader: StoreReader {
                db: Arc::new(db),
                views: Default::default(),
            },
            metas: InternalMap::default(),
            names: HashMap::new(),
            offsets: InternalMap::default(),
            write_opts,
            sync: config.sync_commits,
            last_batch_bytes: 0,
            row_truncates: Default::default(),
            prefix_scanned: Default::default(),
            _cache: cache,
            _write_buffers: write_buffers,
        };
        store.add_views(view_names)?;
        Ok(store)
    }

    /// Registers views; those already in the store keep their state, new
    /// ones start empty. Safe while readers run.
    pub fn add_views(&mut self, view_names: &[String]) -> Result<(), StoreError> {
        let db = self.reader.db.clone();
        let meta_cf = cf(&db, CF_META);
        let mut next_id = match db.get_cf(meta_cf, META_NEXT_VIEW_ID)? {
            Some(b) if b.len() == 4 => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            _ => 1,
        };
        let mut created = WriteBatch::default();
        let mut added = Vec::new();
        for name in view_names {
            if self.reader.view_id(name).is_some() {
                continue;
            }
            let stored = db.get_cf(meta_cf, view_meta_key(name))?;
            let half_installed = db.get_cf(meta_cf, installing_key(name))?.is_some();
            let meta = match stored {
                Some(bytes) if half_installed => {
                    // A copy was being installed when the node stopped: its
                    // old state is gone, the new one partly in. Empty again,
                    // with a new incarnation (resume tokens of it are void);
                    // its shard's log position is behind the log, so the copy
                    // is made again.
                    let old = decode::<ViewMeta>(&bytes, || format!("meta of view {name}"))?;
                    delete_view_state(&mut created, &db, ViewId(old.id), name);
                    created.delete_cf(meta_cf, installing_key(name));
                    let meta = empty_meta(old.id);
                    created.put_cf(meta_cf, view_meta_key(name), meta.encode_to_vec());
                    tracing::warn!(view = %name, "a shard copy was half installed when the node stopped: the view starts empty and is copied again");
                    meta
                }
                Some(bytes) => decode::<ViewMeta>(&bytes, || format!("meta of view {name}"))?,
                None => {
                    let meta = empty_meta(next_id);
                    next_id += 1;
                    created.put_cf(meta_cf, view_meta_key(name), meta.encode_to_vec());
                    meta
                }
            };
            let id = ViewId(meta.id);
            let mut opts = ReadOptions::default();
            opts.set_iterate_upper_bound(prefix_end(id));
            // (A half-installed view's offsets are being deleted.)
            let stored_offsets = if half_installed {
                None
            } else {
                Some(db.iterator_cf_opt(
                    cf(&db, CF_OFFSETS),
                    opts,
                    IteratorMode::From(&id.prefix(), Direction::Forward),
                ))
            };
            for item in stored_offsets.into_iter().flatten() {
                let (k, v) = item?;
                if k.len() < 4 || v.len() != 8 {
                    continue;
                }
                let stream: Arc<str> = String::from_utf8_lossy(&k[4..]).into();
                let mut b = [0u8; 8];
                b.copy_from_slice(&v);
                self.offsets.insert((id, stream), u64::from_be_bytes(b));
            }
            self.names.insert(id, name.clone());
            self.metas.insert(id, meta);
            added.push((name.clone(), id));
        }
        created.put_cf(meta_cf, META_NEXT_VIEW_ID, next_id.to_be_bytes());
        db.write_opt(created, &self.write_opts)?;
        self.reader
            .views
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(added);
        Ok(())
    }

    /// Removes a view and all its state (rows, change stream, offsets).
    /// Its id is never reused. Subscribers of it see it disappear.
    pub fn drop_view(&mut self, name: &str) -> Result<(), StoreError> {
        let Some(id) = self.reader.view_id(name) else {
            return Ok(());
        };
        self.reader
            .views
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        let db = self.reader.db.clone();
        let mut batch = WriteBatch::default();
        delete_view_state(&mut batch, &db, id, name);
        batch.delete_cf(cf(&db, CF_META), view_meta_key(name));
        db.write_opt(batch, &self.write_opts)?;
        self.names.remove(&id);
        self.metas.remove(&id);
        self.offsets.retain(|(v, _), _| *v != id);
        Ok(())
    }

    /// Replaces a view's whole state with a copy another store exported
    /// ([`StoreReader::export_view`]), in one synced write: rows, change
    /// stream, offsets, metadata (its sequence numbers and incarnation) and
    /// cursor become the copy's, nothing of the old state is left. The view
    /// must be written by this handle. Used by a holder that can no longer
    /// catch up from a change log (trimmed past its position).
    pub fn install_view(&mut self, name: &str, entries: Vec<StateEntry>) -> Result<(), StoreError> {
        self.install_view_from(name, entries.into_iter().map(Ok))
    }

    /// As [`Store::install_view`], reading the copy as it goes (from a
    /// file, see [`crate::copy_file`]): rows, change stream and offsets are
    /// written to SST files and ingested, so a copy's size is bounded by
    /// disk, not memory. Each family's entries must come together, keys
    /// ascending (as [`StoreReader::export_views`] gives them). Crash-safe:
    /// the view is marked before its old state is deleted and unmarked in
    /// the write that stores its new metadata; a view found marked at open
    /// starts again empty (see [`Store::add_views`]).
    pub fn install_view_from(
        &mut self,
        name: &str,
        entries: impl IntoIterator<Item = Result<StateEntry, StoreError>>,
    ) -> Result<(), StoreError> {
        let id = self
            .reader
            .view_id(name)
            .filter(|id| self.names.contains_key(id))
            .ok_or_else(|| StoreError::UnknownView(name.into()))?;
        let db = self.reader.db.clone();
        let scratch = scratch_dir(&db);
        std::fs::create_dir_all(&scratch)?;
        let sst_opts = Options::default();
        let mut meta = None;
        let mut cursor = None;
        let mut offsets = Vec::new();
        let mut open: Option<(StateFamily, rocksdb::SstFileWriter<'_>, PathBuf)> = None;
        let mut files: Vec<(StateFamily, PathBuf)> = Vec::new();
        for e in entries {
            let e = e?;
            match e.family {
                StateFamily::Meta => {
                    let mut m: ViewMeta =
                        decode(&e.value, || format!("copied meta of view {name}"))?;
                    // Ids are this store's own.
                    m.id = id.0;
                    meta = Some(m);
                }
                StateFamily::Cursor => cursor = Some(e.value),
                family => {
                    if family == StateFamily::Offsets {
                        let stream: Arc<str> = String::from_utf8_lossy(&e.key).into();
                        let value = <[u8; 8]>::try_from(e.value.as_slice()).map_err(|_| {
                            StoreError::CorruptRow(format!("copied offset of {stream} in {name}"))
                        })?;
                        offsets.push((stream, u64::from_be_bytes(value)));
                    }
                    if open.as_ref().is_none_or(|(f, _, _)| *f != family) {
                        if let Some((f, mut writer, path)) = open.take() {
                            writer.finish()?;
                            files.push((f, path));
                        }
                        if files.iter().any(|(f, _)| *f == family) {
                            return Err(StoreError::CorruptRow(format!(
                                "the copy of view {name} has its {family:?} entries apart"
                            )));
                        }
                        let path = scratch.join(format!("{}-{}.sst", id.0, family.number()));
                        let writer = rocksdb::SstFileWriter::create(&sst_opts);
                        writer.open(&path)?;
                        open = Some((family, writer, path));
                    }
                    if let Some((_, writer, _)) = open.as_mut() {
                        // Out of order keys are refused here (a corrupt copy).
                        writer.put(row_key(id, &e.key), &e.value)?;
                    }
                }
            }
        }
        if let Some((f, mut writer, path)) = open.take() {
            writer.finish()?;
            files.push((f, path));
        }
        let meta = meta.ok_or_else(|| {
            StoreError::CorruptRow(format!("the copy of view {name} has no metadata"))
        })?;
        let mut synced = WriteOptions::default();
        synced.set_sync(true);
        let meta_cf = cf(&db, CF_META);
        // 1. Marked, and the old state gone.
        let mut batch = WriteBatch::default();
        batch.put_cf(meta_cf, installing_key(name), b"");
        delete_view_state(&mut batch, &db, id, name);
        db.write_opt(batch, &synced)?;
        // 2. The copy's files, moved in (above the deletions).
        let mut ingest = rocksdb::IngestExternalFileOptions::default();
        ingest.set_move_files(true);
        for (family, path) in &files {
            db.ingest_external_file_cf_opts(
                cf(&db, family.column_family()),
                &ingest,
                vec![path.as_path()],
            )?;
        }
        // 3. Its metadata, and no longer marked.
        let mut batch = WriteBatch::default();
        if let Some(cursor) = &cursor {
            batch.put_cf(meta_cf, cursor_key(name), cursor);
        }
        batch.put_cf(meta_cf, view_meta_key(name), meta.encode_to_vec());
        batch.delete_cf(meta_cf, installing_key(name));
        db.write_opt(batch, &synced)?;
        self.metas.insert(id, meta);
        self.offsets.retain(|(v, _), _| *v != id);
        for (stream, offset) in offsets {
            self.offsets.insert((id, stream), offset);
        }
        Ok(())
    }

    /// Drops every shard of a view (`view`, `view#0`, `view#1`, …) whatever
    /// shard count it was written with; returns whether there was any.
    pub fn drop_sharded_view(&mut self, view: &str) -> Result<bool, StoreError> {
        let names: Vec<String> = self
            .reader
            .view_names()
            .into_iter()
            .filter(|n| {
                n == view || crate::shard::parse_store_name(n).is_some_and(|(v, _)| v == view)
            })
            .collect();
        for n in &names {
            self.drop_view(n)?;
        }
        Ok(!names.is_empty())
    }

    /// Splits off a write side for `views`: a second writer over the same
    /// database, that commits those views (and only those) while this one
    /// commits the rest. Views' state never spans two handles: each view's
    /// metadata, offsets and change stream are written by the handle that
    /// holds it, so two handles commit without coordinating (RocksDB groups
    /// their WAL writes). Views not held here are ignored.
    pub fn split_off(&mut self, views: &[ViewId]) -> Store {
        let mut write_opts = WriteOptions::default();
        write_opts.set_sync(self.sync);
        let mut other = Store {
            reader: self.reader.clone(),
            metas: InternalMap::default(),
            names: HashMap::new(),
            offsets: InternalMap::default(),
            write_opts,
            sync: self.sync,
            last_batch_bytes: 0,
            row_truncates: Default::default(),
            prefix_scanned: Default::default(),
            _cache: self._cache.clone(),
            _write_buffers: self._write_buffers.clone(),
        };
        for &view in views {
            let (Some(meta), Some(name)) = (self.metas.remove(&view), self.names.remove(&view))
            else {
                continue;
            };
            other.metas.insert(view, meta);
            other.names.insert(view, name);
            if self.row_truncates.remove(&view) {
                other.row_truncates.insert(view);
            }
            if self.prefix_scanned.remove(&view) {
                other.prefix_scanned.insert(view);
            }
        }
        let moved: Vec<(ViewId, Arc<str>)> = self
            .offsets
            .keys()
            .filter(|(v, _)| other.names.contains_key(v))
            .cloned()
            .collect();
        for key in moved {
            if let Some(o) = self.offsets.remove(&key) {
                other.offsets.insert(key, o);
            }
        }
        other
    }

    /// Takes back the views of a handle [`Store::split_off`] gave out.
    pub fn join(&mut self, other: Store) {
        self.metas.extend(other.metas);
        self.names.extend(other.names);
        self.offsets.extend(other.offsets);
        self.row_truncates.extend(other.row_truncates);
        self.prefix_scanned.extend(other.prefix_scanned);
    }

    /// The views this handle writes.
    pub fn held_views(&self) -> Vec<ViewId> {
        let mut v: Vec<ViewId> = self.names.keys().copied().collect();
        v.sort();
        v
    }

    /// Emits a truncate of `view` as one delete per removed row (with its
    /// `before`) instead of a single TRUNCATE change, so that consumers
    /// keyed differently (a pipeline's re-keying stage) learn which rows
    /// went. Not stored: set it every time the store is opened.
    pub fn set_truncate_as_deletes(&mut self, view: ViewId, on: bool) {
        if on {
            self.row_truncates.insert(view);
        } else {
            self.row_truncates.remove(&view);
        }
    }

    /// Marks a view as read by key prefix during batches
    /// ([`Txn::live_rows_with_prefix`]): its unwritten rows are indexed in
    /// key order, so a prefix read costs the prefix, not the whole batch.
    pub fn set_prefix_scanned(&mut self, view: ViewId) {
        self.prefix_scanned.insert(view);
    }

    /// Stores an applied pipeline spec (opaque text), so a restarted node
    /// runs what was applied.
    pub fn save_spec(&self, name: &str, text: &str) -> Result<(), StoreError> {
        let db = &self.reader.db;
        db.put_cf_opt(cf(db, CF_META), spec_key(name), text, &self.write_opts)?;
        Ok(())
    }

    pub fn remove_spec(&self, name: &str) -> Result<(), StoreError> {
        let db = &self.reader.db;
        db.delete_cf_opt(cf(db, CF_META), spec_key(name), &self.write_opts)?;
        Ok(())
    }

    /// Every stored pipeline spec, by name.
    pub fn specs(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let db = &self.reader.db;
        let mut out = BTreeMap::new();
        let start = spec_key("");
        for item in db.iterator_cf(
            cf(db, CF_META),
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(&start) {
                break;
            }
            out.insert(
                String::from_utf8_lossy(&k[start.len()..]).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
        Ok(out)
    }

    pub fn reader(&self) -> StoreReader {
        self.reader.clone()
    }

    pub fn view_id(&self, name: &str) -> Option<ViewId> {
        self.reader.view_id(name)
    }

    pub fn view_name(&self, view: ViewId) -> &str {
        self.names.get(&view).map(String::as_str).unwrap_or("")
    }

    /// Committed metadata of a view, as the writer knows it.
    pub fn meta(&self, view: ViewId) -> Option<&ViewMeta> {
        self.metas.get(&view)
    }

    /// Next offset to read from `stream` for `view` (None: never read).
    pub fn next_offset(&self, view: ViewId, stream: &str) -> Option<u64> {
        self.offsets.get(&(view, Arc::from(stream))).copied()
    }

    /// All stored stream positions of a view.
    pub fn offsets_of(&self, view: ViewId) -> Vec<(Arc<str>, u64)> {
        let mut v: Vec<_> = self
            .offsets
            .iter()
            .filter(|((id, _), _)| *id == view)
            .map(|((_, s), o)| (s.clone(), *o))
            .collect();
        v.sort();
        v
    }

    /// Starts a batch; `now_ms` stamps its changes' commit time.
    pub fn begin(&mut self, now_ms: i64) -> Txn<'_> {
        let capacity = (self.last_batch_bytes + self.last_batch_bytes / 8).min(MAX_BATCH_RESERVE);
        Txn {
            store: self,
            batch: WriteBatch::with_capacity_bytes(capacity),
            overlay: RowMap::default(),
            overlay_index: Default::default(),
            prefetched: RowMap::default(),
            metas: InternalMap::default(),
            offsets: InternalMap::default(),
            now_ms,
            changes: 0,
            recording: None,
            pending: None,
            kept: None,
            encoded: Vec::new(),
            fallbacks: BTreeMap::new(),
        }
    }

    /// Starts a batch whose effects are recorded (see [`Txn::take_effects`])
    /// for a cluster's change log rather than committed here: decisions see
    /// the committed state overlaid with `pending`, the effects this node has
    /// logged but not yet applied back from the log.
    pub fn begin_logged<'s>(&'s mut self, now_ms: i64, pending: &'s Pending) -> Txn<'s> {
        let mut txn = self.begin(now_ms);
        txn.recording = Some(Vec::new());
        txn.pending = Some(pending);
        txn
    }

    /// Starts a batch that decides on the committed state overlaid with
    /// `unwritten` (the rows of a batch still being written, see
    /// [`Txn::prepare_keeping_rows`]); nothing is recorded.
    pub fn begin_over<'s>(&'s mut self, now_ms: i64, unwritten: &'s Pending) -> Txn<'s> {
        let mut txn = self.begin(now_ms);
        txn.pending = Some(unwritten);
        txn
    }

    /// Sets the incarnation of a view that has no change yet: in a cluster,
    /// every node derives it from the view's change log, so that resume
    /// tokens are valid on every node. Fails if the view already holds
    /// changes under another incarnation.
    pub fn set_incarnation(&mut self, view: ViewId, incarnation: u64) -> Result<(), StoreError> {
        let name = self.view_name(view).to_string();
        let Some(meta) = self.metas.get(&view).cloned() else {
            return Err(StoreError::UnknownView(name));
        };
        if meta.incarnation == incarnation {
            return Ok(());
        }
        if meta.last_seq > 0 {
            return Err(StoreError::Incarnation { view: name });
        }
        let meta = ViewMeta {
            incarnation,
            ..meta
        };
        let db = &self.reader.db;
        db.put_cf_opt(
            cf(db, CF_META),
            view_meta_key(&name),
            meta.encode_to_vec(),
            &self.write_opts,
        )?;
        self.metas.insert(view, meta);
        Ok(())
    }

    /// Drops the change stream of `view` below what the limits keep: at most
    /// `max_events` entries, none committed before `min_committed_at_ms`.
    /// Returns how many entries were removed. Scans at most `scan_limit`
    /// entries per call for the age limit.
    pub fn trim_changelog(
        &mut self,
        view: ViewId,
        max_events: u64,
        min_committed_at_ms: Option<i64>,
        scan_limit: usize,
    ) -> Result<u64, StoreError> {
        let Some(meta) = self.metas.get(&view).cloned() else {
            return Ok(0);
        };
        let mut new_low = meta.retained_from_seq;
        if max_events > 0 && meta.last_seq >= max_events {
            new_low = new_low.max(meta.last_seq + 1 - max_events);
        }
        if let Some(cutoff) = min_committed_at_ms {
            let db = &self.reader.db;
            let mut opts = ReadOptions::default();
            opts.set_iterate_upper_bound(prefix_end(view));
            let start = changelog_key(view, new_low);
            let iter = db.iterator_cf_opt(
                cf(db, CF_CHANGELOG),
                opts,
                IteratorMode::From(&start, Direction::Forward),
            );
            for item in iter.take(scan_limit) {
                let (_, v) = item?;
                let change: Change = decode(&v, || "change during trim".into())?;
                if change.committed_at_ms >= cutoff {
                    break;
                }
                new_low = change.seq + 1;
            }
        }
        if new_low <= meta.retained_from_seq {
            return Ok(0);
        }
        let removed = new_low - meta.retained_from_seq;
        let db = &self.reader.db;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            cf(db, CF_CHANGELOG),
            changelog_key(view, meta.retained_from_seq),
            changelog_key(view, new_low),
        );
        let mut meta = meta;
        meta.retained_from_seq = new_low;
        batch.put_cf(
            cf(db, CF_META),
            view_meta_key(self.view_name(view)),
            meta.encode_to_vec(),
        );
        db.write_opt(batch, &self.write_opts)?;
        self.metas.insert(view, meta);
        Ok(removed)
    }
}

fn new_incarnation(view_id: u32) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32) ^ u64::from(view_id).rotate_left(17)
}

/// What a committed batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitInfo {
    /// Last committed sequence of each view the batch changed.
    pub last_seqs: Vec<(ViewId, u64)>,
    /// Changes appended to change streams.
    pub changes: u64,
}

/// Effects of a batch of records, committed atomically by [`Txn::commit`].
/// Dropping it without committing discards everything.
pub struct Txn<'s> {
    store: &'s mut Store,
    batch: WriteBatch,
    /// Rows written (Some) or removed (None) in this batch, so later records
    /// of the batch see them.
    overlay: RowMap<Option<StoredRow>>,
    /// Keys of `overlay` in prefix-scanned views, in order.
    overlay_index: std::collections::BTreeSet<(ViewId, Vec<u8>)>,
    /// Committed rows read ahead by [`Txn::prefetch`] (the writer is the only
    /// writer, so they stay valid for the whole transaction).
    prefetched: RowMap<Option<StoredRow>>,
    metas: InternalMap<ViewId, ViewMeta>,
    offsets: InternalMap<(ViewId, Arc<str>), u64>,
    now_ms: i64,
    changes: u64,
    /// Cluster owner mode: effects decided since the last take, with the
    /// view each is on.
    /// Effects recorded (cluster owner mode), each with, for a put or a
    /// remove, the key's live row just before it.
    recording: Option<Vec<(ViewId, Effect, Option<String>)>>,
    /// Cluster owner mode: logged effects not yet applied back.
    pending: Option<&'s Pending>,
    /// Changes appended, kept (see [`Txn::keep_changes`]).
    kept: Option<Vec<(ViewId, Change)>>,
    /// Where each row and change is encoded before the write batch copies
    /// it: one buffer a batch instead of an allocation per record.
    encoded: Vec<u8>,
    /// Events ordered by the commit-time fallback, by view, connector and
    /// why (see [`Txn::take_order_fallbacks`]).
    fallbacks: BTreeMap<(ViewId, &'static str, Basis), u64>,
}

/// Effects a cluster node has written to the change log but not yet applied
/// back from it: the newest row of each key and the newest truncate of each
/// view, with the log offset that carries them.
#[derive(Debug, Default)]
pub struct Pending {
    /// (view, key) → (row, the log it was written to, offset there).
    rows: RowMap<(Option<StoredRow>, Logged)>,
    truncates: InternalMap<ViewId, (RowVersion, Logged)>,
    /// Keys of `rows` in prefix-scanned views, in order.
    index: std::collections::BTreeSet<(ViewId, Vec<u8>)>,
}

/// Where a pending effect was logged: the change log of `log` (a view), at
/// `offset` (or, for the single node's pipelined writer, batch number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Logged {
    log: ViewId,
    offset: u64,
}

/// The rows a log record's puts and removes wrote and replaced, by view and
/// key, as its effects go: where a change's images left out of the log are
/// (the owner leaves out what repeats them, every holder puts it back).
#[derive(Default)]
struct RowImages {
    last: HashMap<(ViewId, Vec<u8>), Images>,
}

/// What the last put or remove of a key wrote (`None`: removed, or a
/// tombstone) and the live row it replaced.
#[derive(Debug, Clone, Default)]
struct Images {
    written: Option<String>,
    replaced: Option<String>,
}

impl RowImages {
    /// Owner: notes a put or remove (with the live row it replaced), or
    /// leaves out a change's images that repeat the ones noted for its key.
    fn elide_or_note(&mut self, view: ViewId, e: &mut Effect, replaced: Option<String>) {
        match &mut e.kind {
            Some(effect::Kind::Put(row)) => {
                let written = (!row.deleted).then(|| row.row_json.clone());
                self.note(view, &e.key, written, replaced);
            }
            Some(effect::Kind::Remove(_)) => self.note(view, &e.key, None, replaced),
            Some(effect::Kind::Change(c)) => {
                let Some(images) = self.last.get(&(view, c.key_json.as_bytes().to_vec())) else {
                    return;
                };
                if c.after_json.is_some() && c.after_json == images.written {
                    c.after_json = None;
                    e.after_is_row = true;
                }
                if c.before_json.is_some() && c.before_json == images.replaced {
                    c.before_json = None;
                    e.before_was_row = true;
                }
            }
            _ => {}
        }
    }

    /// Holder: notes a put or remove about to be applied.
    fn note(
        &mut self,
        view: ViewId,
        key: &[u8],
        written: Option<String>,
        replaced: Option<String>,
    ) {
        self.last
            .insert((view, key.to_vec()), Images { written, replaced });
    }

    /// Holder: a change with the images the owner left out put back.
    fn restore(&self, view: ViewId, e: &Effect, change: &Change) -> Result<Change, StoreError> {
        let mut change = change.clone();
        if !(e.after_is_row || e.before_was_row) {
            return Ok(change);
        }
        let Some(images) = self.last.get(&(view, change.key_json.as_bytes().to_vec())) else {
            return Err(StoreError::CorruptRow(format!(
                "change-log record: a change of key {} refers to a row this record does not write",
                change.key_json
            )));
        };
        if e.after_is_row {
            change.after_json = images.written.clone();
        }
        if e.before_was_row {
            change.before_json = images.replaced.clone();
        }
        Ok(change)
    }
}

impl Pending {
    /// Remembers `effects` (each on its view), logged in `log`'s change log at
    /// `offset`.
    pub fn record<'e>(
        &mut self,
        log: ViewId,
        effects: impl IntoIterator<Item = (ViewId, &'e Effect)>,
        offset: u64,
    ) {
        let at = Logged { log, offset };
        for (view, e) in effects {
            match &e.kind {
                // Indexed for every view: which views are read by prefix is
                // the store's knowledge, and a stale index entry is harmless.
                Some(effect::Kind::Put(row)) => {
                    self.rows
                        .insert((view, e.key.clone()), (Some(row.clone()), at));
                    self.index.insert((view, e.key.clone()));
                }
                Some(effect::Kind::Remove(_)) => {
                    self.rows.insert((view, e.key.clone()), (None, at));
                    self.index.insert((view, e.key.clone()));
                }
                Some(effect::Kind::Truncate(v)) => {
                    self.truncates.insert(view, (v.clone(), at));
                }
                Some(effect::Kind::Change(_) | effect::Kind::KeyPlacement(_)) | None => {}
            }
        }
    }

    /// Forgets what `log`'s change log has delivered back: everything
    /// logged there at or before `offset`, whichever view it is on.
    pub fn applied_through(&mut self, log: ViewId, offset: u64) {
        let done = |at: &Logged| at.log == log && at.offset <= offset;
        self.rows.retain(|_, (_, at)| !done(at));
        self.truncates.retain(|_, (_, at)| !done(at));
        self.reindex();
    }

    fn reindex(&mut self) {
        if !self.index.is_empty() {
            let rows = &self.rows;
            self.index.retain(|k| rows.contains_key(k));
        }
    }

    /// Forgets everything, of every view, recorded at or before `offset`.
    pub fn applied_through_all(&mut self, offset: u64) {
        self.rows.retain(|_, (_, at)| at.offset > offset);
        self.truncates.retain(|_, (_, at)| at.offset > offset);
        self.reindex();
    }

    pub fn len(&self) -> usize {
        self.rows.len() + self.truncates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rows a prepared batch wrote (`Some`) or removed (`None`).
#[derive(Debug, Default)]
pub struct RowOverlay(
    RowMap<Option<StoredRow>>,
    std::collections::BTreeSet<(ViewId, Vec<u8>)>,
);

impl Pending {
    /// Overlays the rows of prepared batch `number` (moved, not copied).
    pub fn absorb(&mut self, rows: RowOverlay, number: u64) {
        let at = Logged {
            log: ViewId(u32::MAX),
            offset: number,
        };
        for (k, row) in rows.0 {
            self.rows.insert(k, (row, at));
        }
        self.index.extend(rows.1);
    }
}

/// What applying one log record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// Its effects were applied.
    Applied,
    /// A new owner's fence: the partition's epoch rose.
    Fence,
    /// From an owner whose epoch was superseded: ignored.
    Fenced,
    /// At or below the stored log position (read again after a restart).
    AlreadyApplied,
    /// Applied, except effects on views this node does not hold (a pipeline
    /// another node runs a newer version of): they are skipped, the log
    /// position still advances, and the caller reports the names. Failing
    /// instead would stop every node at the same record after each restart.
    PartlyApplied { unknown_views: Vec<String> },
}

impl std::fmt::Debug for Txn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("changes", &self.changes)
            .finish()
    }
}

impl Txn<'_> {
    /// Has the record at `pos` already been applied (in an earlier batch or
    /// this one)?
    pub fn is_applied(&self, view: ViewId, pos: &Position) -> bool {
        pos.offset < self.stored(&(view, pos.stream.clone()))
    }

    /// A stream's stored value (next offset, or epoch), this batch included.
    fn stored(&self, key: &(ViewId, Arc<str>)) -> u64 {
        self.offsets
            .get(key)
            .or_else(|| self.store.offsets.get(key))
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn advance(&mut self, view: ViewId, pos: &Position) {
        self.raise(view, pos.stream.clone(), pos.offset + 1);
    }

    /// When the batch is applied (wall clock, ms): commit time of its changes.
    pub(crate) fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// Counts an event ordered by the commit-time fallback (see
    /// [`Txn::take_order_fallbacks`]).
    pub(crate) fn count_fallback(&mut self, view: ViewId, connector: &'static str, basis: Basis) {
        *self.fallbacks.entry((view, connector, basis)).or_insert(0) += 1;
    }

    /// Whether a truncate of `view` is emitted as one DELETE per removed row
    /// (the view's subscribers cannot take a TRUNCATE).
    pub(crate) fn truncates_row_by_row(&self, view: ViewId) -> bool {
        self.store.row_truncates.contains(&view)
    }

    /// Notes where a keyed record of `view` from partition `partition` of a
    /// topic of `partitions` partitions sat: the view's metadata keeps
    /// whether every such record so far is where Kafka's default
    /// partitioner puts its key ([`crate::shard`], "Keys routed to their
    /// shard"). Only a change of that is written (and, for a cluster owner,
    /// logged for the shard's holders): the first keyed record, or the first
    /// out of place, after which the view is never routed again. Returns
    /// what the view's metadata said before and says now when this record
    /// changed it.
    pub fn check_key_placement(
        &mut self,
        view: ViewId,
        key: &Key,
        partition: i32,
        partitions: u32,
    ) -> Result<
        Option<(
            Option<crate::shard::KeyPlacement>,
            crate::shard::KeyPlacement,
        )>,
        StoreError,
    > {
        let fits = i64::from(crate::shard::kafka_partition(key.as_bytes(), partitions))
            == i64::from(partition);
        let seen = crate::shard::KeyPlacement {
            partitions,
            broken: !fits,
        };
        let meta = self.meta_mut(view)?;
        let now = crate::shard::merge_key_placement(meta.key_placement, seen);
        let before = meta.key_placement;
        if before == Some(now) {
            return Ok(None);
        }
        meta.key_placement = Some(now);
        self.record(view, &[], || effect::Kind::KeyPlacement(now));
        Ok(Some((before, now)))
    }

    /// The name of one of the store's views (for logs).
    pub fn view_name(&self, view: ViewId) -> &str {
        self.store.view_name(view)
    }

    /// Records that the record at `pos` was consumed without changing the
    /// replica (dead-lettered, heartbeat, tombstone, ...).
    pub fn skip(&mut self, view: ViewId, pos: &Position, outcome: Outcome) -> Outcome {
        if self.is_applied(view, pos) {
            return Outcome::AlreadyApplied;
        }
        self.advance(view, pos);
        outcome
    }

    pub(crate) fn meta_mut(&mut self, view: ViewId) -> Result<&mut ViewMeta, StoreError> {
        use std::collections::hash_map::Entry;
        match self.metas.entry(view) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let mut meta = self
                    .store
                    .metas
                    .get(&view)
                    .cloned()
                    .ok_or_else(|| StoreError::UnknownView(format!("id {}", view.0)))?;
                if let Some((v, _)) = self.pending.and_then(|p| p.truncates.get(&view)) {
                    meta.truncated_at = Some(v.clone());
                }
                Ok(e.insert(meta))
            }
        }
    }

    /// Reads the committed rows of `keys` in one batched lookup, so that
    /// applying a batch does not pay one point lookup per record.
    pub fn prefetch<'k>(
        &mut self,
        keys: impl IntoIterator<Item = (ViewId, &'k Key)>,
    ) -> Result<(), StoreError> {
        let mut wanted: Vec<Vec<u8>> = keys
            .into_iter()
            .map(|(view, key)| row_key(view, key.as_bytes()))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        // The batch's rows land in both maps: grow them once, not by doubling.
        self.prefetched.reserve(wanted.len());
        self.overlay.reserve(wanted.len());
        let db = &self.store.reader.db;
        let found = db.batched_multi_get_cf(cf(db, CF_ROWS), wanted.iter(), true);
        for (rk, value) in wanted.into_iter().zip(found) {
            let row: Option<StoredRow> = value?
                .map(|b| decode(&b, || "stored row".into()))
                .transpose()?;
            let view = ViewId(u32::from_be_bytes([rk[0], rk[1], rk[2], rk[3]]));
            self.prefetched.insert((view, rk[4..].to_vec()), row);
        }
        Ok(())
    }

    /// The row of `key` as this batch sees it: written earlier in the batch,
    /// by a batch not yet durable (`pending`), or committed. Borrowed when
    /// the batch already holds it (a row is ~500 bytes).
    pub(crate) fn current_row(
        &self,
        view: ViewId,
        key: &[u8],
    ) -> Result<Cow<'_, Option<StoredRow>>, StoreError> {
        let lookup = RowRef(view, key);
        if let Some(row) = self.overlay.get(&lookup) {
            return Ok(Cow::Borrowed(row));
        }
        if let Some((row, _)) = self.pending.and_then(|p| p.rows.get(&lookup)) {
            return Ok(Cow::Borrowed(row));
        }
        if let Some(row) = self.prefetched.get(&lookup) {
            return Ok(Cow::Borrowed(row));
        }
        let db = &self.store.reader.db;
        let row = db
            .get_pinned_cf(cf(db, CF_ROWS), row_key(view, key))?
            .map(|b| decode(&b, || "stored row".into()))
            .transpose()?;
        Ok(Cow::Owned(row))
    }

    /// Whether `key` has a row that is not a tombstone.
    /// The key's row, if live.
    fn live_row_json(&self, view: ViewId, key: &[u8]) -> Result<Option<String>, StoreError> {
        Ok(self
            .current_row(view, key)?
            .as_ref()
            .as_ref()
            .filter(|r| !r.deleted)
            .map(|r| r.row_json.clone()))
    }

    /// Records an effect in cluster owner mode; `kind` is only built (rows
    /// and changes cloned) when recording, not on a single node's hot path.
    pub(crate) fn record(&mut self, view: ViewId, key: &[u8], kind: impl FnOnce() -> effect::Kind) {
        if self.recording.is_none() {
            return;
        }
        let kind = kind();
        // What a put or remove replaces, for the change that follows it
        // (see `take_effects`); a row that cannot be read is not elided.
        let before = match kind {
            effect::Kind::Put(_) | effect::Kind::Remove(_) => {
                self.current_row(view, key).ok().and_then(|r| {
                    r.as_ref()
                        .as_ref()
                        .filter(|r| !r.deleted)
                        .map(|r| r.row_json.clone())
                })
            }
            _ => None,
        };
        if let Some(r) = &mut self.recording {
            r.push((
                view,
                Effect {
                    key: key.to_vec(),
                    kind: Some(kind),
                    view: String::new(),
                    after_is_row: false,
                    before_was_row: false,
                },
                before,
            ));
        }
    }

    /// Keeps every change the batch appends (moved, after encoding) for
    /// [`Txn::take_changes`]: the writer hands them to subscribers that are
    /// caught up, who then need not read them back from RocksDB.
    pub fn keep_changes(&mut self) {
        self.kept.get_or_insert_with(Vec::new);
    }

    /// Changes appended since the last call (with [`Txn::keep_changes`];
    /// empty otherwise), each with its view, in sequence order per view.
    pub fn take_changes(&mut self) -> Vec<(ViewId, Change)> {
        self.kept.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// How many events since the last call were ordered by the commit-time
    /// fallback (no position, or positions that do not compare), by view,
    /// connector label and why.
    pub fn take_order_fallbacks(&mut self) -> BTreeMap<(ViewId, &'static str, Basis), u64> {
        std::mem::take(&mut self.fallbacks)
    }

    /// Effects recorded since the last call (cluster owner mode; empty
    /// otherwise), each with its view, to be carried by `log`'s change log:
    /// an effect on another view names it.
    ///
    /// A change's images that repeat a row every holder has by then (the
    /// row its key's last put wrote; the live row that put replaced) are
    /// left out and flagged: [`Txn::replay`] puts them back.
    pub fn take_effects(&mut self, log: ViewId) -> Vec<(ViewId, Effect)> {
        let recorded = self
            .recording
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        let mut images = RowImages::default();
        let mut effects = Vec::with_capacity(recorded.len());
        for (view, mut e, before) in recorded {
            images.elide_or_note(view, &mut e, before);
            if view != log {
                e.view = self.store.view_name(view).to_string();
            }
            effects.push((view, e));
        }
        effects
    }

    pub(crate) fn append_change(
        &mut self,
        view: ViewId,
        mut change: Change,
    ) -> Result<(), StoreError> {
        self.record(view, &[], || effect::Kind::Change(change.clone()));
        let meta = self.meta_mut(view)?;
        meta.last_seq += 1;
        change.seq = meta.last_seq;
        let seq = meta.last_seq;
        self.put_encoded(CF_CHANGELOG, changelog_key(view, seq), &change);
        self.changes += 1;
        if let Some(kept) = &mut self.kept {
            kept.push((view, change));
        }
        Ok(())
    }

    /// Puts `message`, encoded, under `key` in the column family `family`.
    fn put_encoded(&mut self, family: &str, key: impl AsRef<[u8]>, message: &impl Message) {
        self.encoded.clear();
        message.encode_raw(&mut self.encoded);
        let db = &self.store.reader.db;
        self.batch.put_cf(cf(db, family), key, &self.encoded);
    }

    pub(crate) fn put_row(&mut self, view: ViewId, key: &[u8], row: StoredRow) {
        self.put_encoded(CF_ROWS, row_key(view, key), &row);
        self.record(view, key, || effect::Kind::Put(row.clone()));
        self.index(view, key);
        self.overlay.insert((view, key.to_vec()), Some(row));
    }

    fn index(&mut self, view: ViewId, key: &[u8]) {
        if self.store.prefix_scanned.contains(&view) {
            self.overlay_index.insert((view, key.to_vec()));
        }
    }

    pub(crate) fn remove_row(&mut self, view: ViewId, key: &[u8]) {
        let db = &self.store.reader.db;
        self.batch.delete_cf(cf(db, CF_ROWS), row_key(view, key));
        self.record(view, key, || effect::Kind::Remove(true));
        self.index(view, key);
        self.overlay.insert((view, key.to_vec()), None);
    }

    /// Sets the row of a derived view (one computed from other state, such as
    /// a golden record) to `row_json`, or removes it (`None`), and emits the
    /// change if the content differs. Derived rows carry no version: their
    /// operator is the only writer and decides from state, not from order.
    pub fn put_derived(
        &mut self,
        view: ViewId,
        key: &Key,
        row_json: Option<String>,
        source: SourcePosition,
    ) -> Result<Option<Op>, StoreError> {
        let before = self
            .current_row(view, key.as_bytes())?
            .into_owned()
            .filter(|r| !r.deleted)
            .map(|r| r.row_json);
        if before == row_json {
            return Ok(None);
        }
        let (op, delta) = match (&before, &row_json) {
            (None, Some(_)) => (Op::Insert, 1),
            (Some(_), Some(_)) => (Op::Update, 0),
            _ => (Op::Delete, -1),
        };
        match &row_json {
            Some(json) => self.put_row(
                view,
                key.as_bytes(),
                StoredRow {
                    version: None,
                    deleted: false,
                    row_json: json.clone(),
                    unapplied: None,
                },
            ),
            None => self.remove_row(view, key.as_bytes()),
        }
        let meta = self.meta_mut(view)?;
        meta.live_rows = meta.live_rows.saturating_add_signed(delta);
        self.append_change(
            view,
            Change {
                seq: 0,
                op: op as i32,
                key_json: key.as_str().to_string(),
                before_json: before,
                after_json: row_json,
                source: Some(source),
                committed_at_ms: self.now_ms,
                shard: 0,
            },
        )?;
        Ok(Some(op))
    }

    /// Live rows of `view` whose key starts with `prefix`, as this batch sees
    /// them (committed rows, then what is logged or in flight, then this
    /// batch), in key order.
    pub fn live_rows_with_prefix(
        &self,
        view: ViewId,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, StoredRow)>, StoreError> {
        Ok(self
            .rows_with_prefix(view, prefix)?
            .into_iter()
            .filter(|(_, r)| !r.deleted)
            .collect())
    }

    /// Every stored row (tombstones included) of `view` under `prefix`.
    pub(crate) fn rows_with_prefix(
        &self,
        view: ViewId,
        prefix: &[u8],
    ) -> Result<BTreeMap<Vec<u8>, StoredRow>, StoreError> {
        let mut rows: BTreeMap<Vec<u8>, StoredRow> = BTreeMap::new();
        let db = &self.store.reader.db;
        let mut opts = ReadOptions::default();
        let start = row_key(view, prefix);
        opts.set_iterate_upper_bound(
            prefix_upper_bound(&start).unwrap_or_else(|| prefix_end(view)),
        );
        if prefix.len() == ROW_PREFIX_BLOOM_BYTES {
            opts.set_prefix_same_as_start(true);
        } else {
            opts.set_total_order_seek(true);
        }
        for item in db.iterator_cf_opt(
            cf(db, CF_ROWS),
            opts,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (k, v) = item?;
            rows.insert(k[4..].to_vec(), decode(&v, || "stored row".into())?);
        }
        let mut overlay = |key: &Vec<u8>, row: &Option<StoredRow>| {
            match row {
                Some(row) => rows.insert(key.clone(), row.clone()),
                None => rows.remove(key),
            };
        };
        if self.store.prefix_scanned.contains(&view) {
            // In key order from the indexes: the prefix, not the batch.
            let from = (view, prefix.to_vec());
            let under = |(v, k): &&(ViewId, Vec<u8>)| *v == view && k.starts_with(prefix);
            if let Some(p) = self.pending {
                for k in p.index.range(from.clone()..).take_while(under) {
                    if let Some((row, _)) = p.rows.get(k) {
                        overlay(&k.1, row);
                    }
                }
            }
            for k in self.overlay_index.range(from..).take_while(under) {
                if let Some(row) = self.overlay.get(k) {
                    overlay(&k.1, row);
                }
            }
        } else {
            let overlays = self
                .pending
                .into_iter()
                .flat_map(|p| p.rows.iter().map(|(k, (row, _))| (k, row)))
                .chain(self.overlay.iter());
            for ((v, key), row) in overlays {
                if *v == view && key.starts_with(prefix) {
                    overlay(key, row);
                }
            }
        }
        Ok(rows)
    }

    fn raise(&mut self, view: ViewId, stream: Arc<str>, value: u64) {
        let key = (view, stream);
        let current = self.stored(&key);
        self.offsets.insert(key, current.max(value));
    }

    /// Applies one record of a cluster's change log, read from `log_stream`
    /// at `log_offset`. Records of a partition whose epoch is lower than one
    /// already applied are ignored (their owner was fenced); every node
    /// applies the same log with the same rule, so every node's change stream
    /// gets the same sequence numbers.
    pub fn replay(
        &mut self,
        view: ViewId,
        record: &LogRecord,
        log_stream: &Arc<str>,
        log_offset: u64,
    ) -> Result<Replayed, StoreError> {
        let pos = Position {
            stream: log_stream.clone(),
            offset: log_offset,
        };
        if self.is_applied(view, &pos) {
            return Ok(Replayed::AlreadyApplied);
        }
        self.advance(view, &pos);
        let epoch_stream = format!("epoch:{}", record.partition);
        let epoch_stream: Arc<str> = Arc::from(epoch_stream.as_str());
        let current = self.stored(&(view, epoch_stream.clone()));
        if record.epoch < current {
            return Ok(Replayed::Fenced);
        }
        self.raise(view, epoch_stream, record.epoch);
        if record.fence {
            return Ok(Replayed::Fence);
        }
        let mut unknown_views: Vec<String> = Vec::new();
        let mut images = RowImages::default();
        for e in &record.effects {
            let view = if e.view.is_empty() {
                view
            } else {
                match self.store.view_id(&e.view) {
                    Some(id) => id,
                    None => {
                        if !unknown_views.contains(&e.view) {
                            unknown_views.push(e.view.clone());
                        }
                        continue;
                    }
                }
            };
            match &e.kind {
                Some(effect::Kind::Put(row)) => {
                    let replaced = self.live_row_json(view, &e.key)?;
                    let was_live = replaced.is_some();
                    images.note(
                        view,
                        &e.key,
                        (!row.deleted).then(|| row.row_json.clone()),
                        replaced,
                    );
                    let delta = i64::from(!row.deleted) - i64::from(was_live);
                    self.put_encoded(CF_ROWS, row_key(view, &e.key), row);
                    self.index(view, &e.key);
                    self.overlay
                        .insert((view, e.key.clone()), Some(row.clone()));
                    let meta = self.meta_mut(view)?;
                    meta.live_rows = meta.live_rows.saturating_add_signed(delta);
                }
                Some(effect::Kind::Remove(_)) => {
                    let replaced = self.live_row_json(view, &e.key)?;
                    let was_live = replaced.is_some();
                    images.note(view, &e.key, None, replaced);
                    let db = &self.store.reader.db;
                    self.batch.delete_cf(cf(db, CF_ROWS), row_key(view, &e.key));
                    self.index(view, &e.key);
                    self.overlay.insert((view, e.key.clone()), None);
                    let meta = self.meta_mut(view)?;
                    meta.live_rows = meta.live_rows.saturating_sub(u64::from(was_live));
                }
                Some(effect::Kind::Change(change)) => {
                    let change = images.restore(view, e, change)?;
                    self.append_change(view, change)?
                }
                Some(effect::Kind::Truncate(version)) => {
                    self.meta_mut(view)?.truncated_at = Some(version.clone());
                }
                Some(effect::Kind::KeyPlacement(placement)) => {
                    // Merged, not set: an owner deciding over metadata not
                    // yet caught up with its own log may log an older view
                    // again, which must not undo a break.
                    let meta = self.meta_mut(view)?;
                    meta.key_placement = Some(crate::shard::merge_key_placement(
                        meta.key_placement,
                        *placement,
                    ));
                }
                None => {}
            }
        }
        if !record.source_stream.is_empty() {
            self.raise(
                view,
                Arc::from(record.source_stream.as_str()),
                record.source_next_offset,
            );
        }
        if unknown_views.is_empty() {
            Ok(Replayed::Applied)
        } else {
            Ok(Replayed::PartlyApplied { unknown_views })
        }
    }

    /// Writes the batch atomically (synced when configured). Nothing of it is
    /// visible to readers before this returns.
    pub fn commit(self) -> Result<CommitInfo, StoreError> {
        let (info, prepared) = self.prepare();
        prepared.write()?;
        Ok(info)
    }

    /// Ends the batch for the writer: the next batch already sees its
    /// sequence numbers, offsets and view metadata, but nothing is durable or
    /// visible to readers until [`PreparedWrite::write`] returns. Lets a
    /// writer apply batch N+1 while batch N is written: batch N+1 must then
    /// see batch N's rows through a [`Pending`] overlay
    /// ([`Store::begin_logged`]), and a failed write must stop the writer
    /// (the in-memory state is ahead of the disk).
    pub fn prepare(self) -> (CommitInfo, PreparedWrite) {
        let (info, write, _) = self.prepare_keeping_rows();
        (info, write)
    }

    /// [`Txn::prepare`], also handing back the rows the batch wrote (or
    /// removed), to overlay on the next batch with [`Pending::absorb`] while
    /// this one is written. (Truncates need no overlay: the view metadata the
    /// next batch reads is already updated.)
    pub fn prepare_keeping_rows(self) -> (CommitInfo, PreparedWrite, RowOverlay) {
        let Txn {
            store,
            mut batch,
            metas,
            offsets,
            changes,
            overlay,
            overlay_index,
            ..
        } = self;
        let db = store.reader.db.clone();
        for ((view, stream), next) in &offsets {
            batch.put_cf(
                cf(&db, CF_OFFSETS),
                offset_key(*view, stream),
                next.to_be_bytes(),
            );
        }
        for (view, meta) in &metas {
            batch.put_cf(
                cf(&db, CF_META),
                view_meta_key(store.view_name(*view)),
                meta.encode_to_vec(),
            );
        }
        let mut last_seqs: Vec<(ViewId, u64)> =
            metas.iter().map(|(v, m)| (*v, m.last_seq)).collect();
        last_seqs.sort();
        store.offsets.extend(offsets);
        store.metas.extend(metas);
        let sync = store.sync;
        store.last_batch_bytes = batch.size_in_bytes();
        (
            CommitInfo { last_seqs, changes },
            PreparedWrite { db, batch, sync },
            RowOverlay(overlay, overlay_index),
        )
    }
}

/// The write of a prepared batch; may run on any thread.
pub struct PreparedWrite {
    db: Arc<DB>,
    batch: WriteBatch,
    sync: bool,
}

impl std::fmt::Debug for PreparedWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedWrite")
            .field("bytes", &self.batch.size_in_bytes())
            .finish()
    }
}

impl PreparedWrite {
    /// Writes the batch atomically (synced when configured).
    pub fn write(self) -> Result<(), StoreError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(self.sync);
        self.db.write_opt(self.batch, &opts)?;
        Ok(())
    }
}

pub(crate) fn source_position(s: &SourceInfo, pos: &Position) -> SourcePosition {
    SourcePosition {
        connector: String::from(&*s.connector),
        db: String::from(&*s.db),
        schema: String::from(&*s.schema),
        table: String::from(&*s.table),
        ts_ms: s.ts_ms,
        lsn: s.lsn,
        tx_id: s.tx_id,
        snapshot: String::from(&*s.snapshot),
        stream: String::from(&*pos.stream),
        offset: pos.offset,
        log_position: s.position.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A borrowed key finds exactly the rows stored under its owned
        /// form: its hash must be the tuple's, or every lookup would miss.
        #[test]
        fn a_borrowed_row_key_finds_what_the_owned_one_stored(
            stored in proptest::collection::hash_map((0u32..3, proptest::collection::vec(any::<u8>(), 0..40)), any::<u64>(), 0..50),
            probes in proptest::collection::vec((0u32..3, proptest::collection::vec(any::<u8>(), 0..40)), 0..50),
        ) {
            let map: RowMap<u64> = stored.iter().map(|((v, k), n)| ((ViewId(*v), k.clone()), *n)).collect();
            for (v, k) in stored.keys().chain(&probes) {
                prop_assert_eq!(map.get(&RowRef(ViewId(*v), k)), stored.get(&(*v, k.clone())));
            }
        }
    }
}
