//! The audit trail: a tamper-evident record of every delivery of data and
//! of every change of who may see what.
//!
//! Each node appends to its own hash chain: record `i` carries the SHA-256
//! of record `i - 1` and its own hash over its content, so altering,
//! removing or reordering a record breaks the chain at that record. A batch
//! is recorded, durably in the node's audit store, *before* it is sent: if
//! the record cannot be written, nothing is delivered (fail closed).
//!
//! Chains are shipped to the Kafka topic `audit.topic` (one partition, kept
//! forever) — the copy an auditor verifies (`ndc audit verify`) — and every
//! node reads that topic back to index the other nodes' records by national
//! ID, so `who-accessed` answers for the whole cluster on any node.
//! Shipping is at least once: a record may appear twice in the topic (same
//! chain, index and hash), which verification and indexing skip.

use crate::config::KafkaSection;
use crate::now_ms;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use rocksdb::{DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// `prev` of a chain's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Metric names of the audit trail.
pub mod metric {
    pub const RECORDS: &str = "ndc_audit_records_total";
    pub const ERRORS: &str = "ndc_audit_errors_total";
    pub const UNSHIPPED: &str = "ndc_audit_unshipped_records";
    pub const INDEXED: &str = "ndc_audit_indexed_records_total";
    pub const INVALID: &str = "ndc_audit_invalid_records_total";
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// A batch of changes sent to a subscriber.
    Delivery {
        principal: String,
        purpose: String,
        view: String,
        /// The view's shard the batch came from (its sequence numbers are
        /// the shard's); absent for shard 0, as before shards.
        #[serde(default, skip_serializing_if = "is_zero")]
        shard: u32,
        /// Rows of a snapshot (their sequence numbers are 0).
        snapshot: bool,
        first_seq: u64,
        last_seq: u64,
        changes: u64,
        /// The people the batch held data about.
        national_ids: Vec<String>,
    },
    /// A person's report handed out (`ndc person report`).
    Report {
        principal: String,
        national_ids: Vec<String>,
    },
    /// A grant created or replaced (`grant`: the grant as JSON).
    Grant {
        by: String,
        principal: String,
        grant: String,
    },
    Revoke {
        by: String,
        principal: String,
    },
    PipelineApply {
        by: String,
        pipeline: String,
        version: u64,
        spec_sha256: String,
    },
    PipelineDrop {
        by: String,
        pipeline: String,
    },
}

impl Event {
    /// The people this event concerns.
    pub fn national_ids(&self) -> &[String] {
        match self {
            Event::Delivery { national_ids, .. } | Event::Report { national_ids, .. } => {
                national_ids
            }
            _ => &[],
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Event::Delivery { .. } => "delivery",
            Event::Report { .. } => "report",
            Event::Grant { .. } => "grant",
            Event::Revoke { .. } => "revoke",
            Event::PipelineApply { .. } => "pipeline_apply",
            Event::PipelineDrop { .. } => "pipeline_drop",
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One record of a chain, as stored and shipped (JSON, `hash` last).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The chain: a node's, from the day its audit store was created.
    pub chain: String,
    /// Place in the chain, from 0, without gaps.
    pub index: u64,
    /// `hash` of the record before (GENESIS for the first).
    pub prev: String,
    pub at_ms: i64,
    pub node: String,
    pub event: Event,
    /// SHA-256 (hex) of the record's JSON without this member.
    pub hash: String,
}

/// What the hash covers: the record without its hash, in this order.
#[derive(Serialize)]
struct Body<'a> {
    chain: &'a str,
    index: u64,
    prev: &'a str,
    at_ms: i64,
    node: &'a str,
    event: &'a Event,
}

/// Whether the node that forwarded this request recorded it already (only
/// a node, on the peer listener, may say it forwarded).
pub fn recorded_by_forwarder<T>(req: &tonic::Request<T>) -> bool {
    req.metadata().get(ndc_coordinator::FORWARDED).is_some()
        && crate::serving::access::caller(req)
            .is_ok_and(|c| c.via == crate::serving::access::Via::Peer)
}

/// SHA-256 as hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = String::with_capacity(64);
    ndc_operators::masking::push_hex(&mut out, digest.as_ref());
    out
}

impl Record {
    fn body(&self) -> Body<'_> {
        Body {
            chain: &self.chain,
            index: self.index,
            prev: &self.prev,
            at_ms: self.at_ms,
            node: &self.node,
            event: &self.event,
        }
    }

    /// The hash the record's content calls for.
    pub fn content_hash(&self) -> String {
        sha256_hex(&serde_json::to_vec(&self.body()).unwrap_or_default())
    }

    /// Seals a record: its hash and its stored form in one serialization.
    fn sealed(mut self) -> (Record, Vec<u8>) {
        let mut bytes = serde_json::to_vec(&self.body()).unwrap_or_default();
        self.hash = sha256_hex(&bytes);
        // The body is an object: close it with the hash instead.
        bytes.pop();
        bytes.extend_from_slice(b",\"hash\":\"");
        bytes.extend_from_slice(self.hash.as_bytes());
        bytes.extend_from_slice(b"\"}");
        (self, bytes)
    }
}

/// The first record that does not verify, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BadRecord {
    /// Where it is (`offset 17`, `line 18`).
    pub position: String,
    pub chain: Option<String>,
    pub index: Option<u64>,
    pub reason: String,
}

/// Checks records in the order a topic or export holds them.
#[derive(Debug, Default)]
pub struct Verifier {
    chains: BTreeMap<String, ChainState>,
    pub records: u64,
    /// Records shipped twice (same chain, index and hash), skipped.
    pub duplicates: u64,
    pub first_bad: Option<BadRecord>,
}

#[derive(Debug)]
struct ChainState {
    next: u64,
    last: String,
    /// Hashes of the last records, to recognise a record shipped again.
    recent: VecDeque<String>,
}

/// Records a re-sent one may lag behind the chain's head (more than a
/// shipping batch).
const RECENT: usize = 4096;

impl Verifier {
    /// Checks the next record; false once a record failed (the rest are
    /// not checked: the first bad one is what matters).
    pub fn check(&mut self, position: impl std::fmt::Display, bytes: &[u8]) -> bool {
        if self.first_bad.is_some() {
            return false;
        }
        let bad = |chain: Option<&str>, index: Option<u64>, reason: String| BadRecord {
            position: position.to_string(),
            chain: chain.map(str::to_string),
            index,
            reason,
        };
        let record: Record = match serde_json::from_slice(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.first_bad = Some(bad(None, None, format!("not an audit record: {e}")));
                return false;
            }
        };
        let (chain, index) = (Some(record.chain.as_str()), Some(record.index));
        if record.hash != record.content_hash() {
            self.first_bad = Some(bad(
                chain,
                index,
                "altered: its hash does not match its content".into(),
            ));
            return false;
        }
        let state = self
            .chains
            .entry(record.chain.clone())
            .or_insert_with(|| ChainState {
                next: 0,
                last: GENESIS.into(),
                recent: VecDeque::new(),
            });
        if record.index < state.next {
            let back = (state.next - record.index) as usize;
            let seen = back <= state.recent.len()
                && state.recent[state.recent.len() - back] == record.hash;
            if seen {
                self.duplicates += 1;
                return true;
            }
            self.first_bad = Some(bad(
                chain,
                index,
                format!(
                    "out of order: record {} of this chain comes after record {}",
                    record.index,
                    state.next - 1
                ),
            ));
            return false;
        }
        if record.index > state.next {
            self.first_bad = Some(bad(
                chain,
                index,
                format!(
                    "records removed or reordered: expected record {} of this chain, found {}",
                    state.next, record.index
                ),
            ));
            return false;
        }
        if record.prev != state.last {
            self.first_bad = Some(bad(
                chain,
                index,
                "broken chain: its prev is not the hash of the record before it".into(),
            ));
            return false;
        }
        state.next += 1;
        state.last = record.hash;
        state.recent.push_back(state.last.clone());
        if state.recent.len() > RECENT {
            state.recent.pop_front();
        }
        self.records += 1;
        true
    }

    /// Each chain's last verified record: (chain, index, hash).
    pub fn heads(&self) -> Vec<(String, u64, String)> {
        self.chains
            .iter()
            .filter(|(_, s)| s.next > 0)
            .map(|(c, s)| (c.clone(), s.next - 1, s.last.clone()))
            .collect()
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// Nothing is delivered without its record.
    #[error("the audit trail cannot record this ({0}); nothing was delivered")]
    Unavailable(String),
    #[error("audit store: {0}")]
    Store(String),
}

impl From<rocksdb::Error> for AuditError {
    fn from(e: rocksdb::Error) -> Self {
        AuditError::Store(e.to_string())
    }
}

fn stopped() -> AuditError {
    AuditError::Unavailable("audit writer stopped".into())
}

/// A submitted record: stored once [`Ack::wait`] returns `Ok`.
#[must_use = "a record is stored only once its Ack says so"]
pub struct Ack(Option<oneshot::Receiver<Result<(), AuditError>>>);

impl Ack {
    pub async fn wait(self) -> Result<(), AuditError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx.await.map_err(|_| stopped())?,
        }
    }

    pub fn wait_blocking(self) -> Result<(), AuditError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx.blocking_recv().map_err(|_| stopped())?,
        }
    }
}

/// Resolves when an audit store is closed (a node restarted in the same
/// process opens it again).
pub struct Closed(oneshot::Receiver<()>);

impl Closed {
    pub async fn wait(self) {
        let _ = self.0.await;
    }
}

/// What the writer is asked.
enum Request {
    Append(Pending),
    /// Answered once everything asked before is indexed (a query that
    /// must see the deliveries just recorded).
    Barrier(oneshot::Sender<()>),
}

struct Pending {
    event: Event,
    at_ms: i64,
    reply: oneshot::Sender<Result<(), AuditError>>,
}

/// The node's audit trail; cheap to clone. Disabled (`audit.enabled:
/// false`), it records nothing.
#[derive(Clone, Default)]
pub struct Audit {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    db: Arc<DB>,
    tx: mpsc::Sender<Request>,
    chain: String,
    /// Woken when records were appended (the shipper waits on it).
    appended: Arc<Notify>,
}

mod key {
    pub const CHAIN: &[u8] = b"m:chain";
    pub const HEAD: &[u8] = b"m:head";
    pub const SHIPPED: &[u8] = b"m:shipped";
    pub const CONSUMED: &[u8] = b"m:consumed";
    /// Own records before this index are indexed by person.
    pub const INDEXED: &[u8] = b"m:indexed";

    pub fn record(chain: &str, index: u64) -> Vec<u8> {
        let mut k = Vec::with_capacity(chain.len() + 10);
        k.push(b'r');
        k.extend_from_slice(chain.as_bytes());
        k.push(0);
        k.extend_from_slice(&index.to_be_bytes());
        k
    }

    pub fn person_prefix(national_id: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(national_id.len() + 2);
        k.push(b'p');
        k.extend_from_slice(national_id.as_bytes());
        k.push(0);
        k
    }

    /// Index entry: person, time, then the record's place.
    pub fn person(national_id: &str, at_ms: i64, chain: &str, index: u64) -> Vec<u8> {
        let mut k = person_prefix(national_id);
        k.extend_from_slice(&(at_ms.max(0) as u64).to_be_bytes());
        k.extend_from_slice(&record(chain, index));
        k
    }
}

#[derive(Serialize, Deserialize)]
struct Head {
    next: u64,
    last: String,
}

fn get_u64(db: &DB, k: &[u8]) -> Result<u64, AuditError> {
    Ok(match db.get(k)? {
        Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(|_| {
            AuditError::Store(format!("{} is not a u64", String::from_utf8_lossy(k)))
        })?),
        None => 0,
    })
}

/// Indexes by person the own records a crash left unindexed.
fn reindex(db: &DB, chain: &str, head: u64) -> Result<(), AuditError> {
    let mut from = get_u64(db, key::INDEXED)?;
    while from < head {
        let mut batch = WriteBatch::default();
        let upto = head.min(from + 1000);
        for index in from..upto {
            let Some(bytes) = db.get(key::record(chain, index))? else {
                continue;
            };
            let r: Record = serde_json::from_slice(&bytes)
                .map_err(|e| AuditError::Store(format!("audit record {index}: {e}")))?;
            for id in r.event.national_ids() {
                batch.put(key::person(id, r.at_ms, chain, index), b"");
            }
        }
        batch.put(key::INDEXED, upto.to_be_bytes());
        db.write(batch)?;
        from = upto;
    }
    Ok(())
}

impl Audit {
    /// Opens (or creates) the audit store in `dir` and starts its writer.
    /// `sync`: every append is synced to disk before the batch goes out
    /// (`storage.sync_commits`). The store closes once every clone of the
    /// returned trail is dropped; [`Closed`] resolves then.
    pub fn open(dir: &Path, node: &str, sync: bool) -> Result<(Audit, Closed), AuditError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        let db = Arc::new(DB::open(&opts, dir)?);
        let chain = match db.get(key::CHAIN)? {
            Some(c) => String::from_utf8_lossy(&c).into_owned(),
            None => {
                // A new chain per store: a node whose disk was wiped starts
                // another one rather than reusing indexes already shipped.
                let mut salt = [0u8; 4];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
                    .map_err(|_| AuditError::Store("no randomness".into()))?;
                let c = format!(
                    "{node}.{:x}{:02x}{:02x}{:02x}{:02x}",
                    now_ms(),
                    salt[0],
                    salt[1],
                    salt[2],
                    salt[3]
                );
                db.put(key::CHAIN, c.as_bytes())?;
                c
            }
        };
        let head: Head = match db.get(key::HEAD)? {
            Some(h) => serde_json::from_slice(&h)
                .map_err(|e| AuditError::Store(format!("head of the chain: {e}")))?,
            None => Head {
                next: 0,
                last: GENESIS.into(),
            },
        };
        reindex(&db, &chain, head.next)?;
        let (tx, rx) = mpsc::channel(4096);
        let appended = Arc::new(Notify::new());
        let writer = Writer {
            db: db.clone(),
            chain: chain.clone(),
            node: node.to_string(),
            head,
            sync,
            appended: appended.clone(),
            index_behind: false,
        };
        let (closed_tx, closed) = oneshot::channel();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                writer.run(rx);
                let _ = closed_tx.send(());
            })
            .map_err(|e| AuditError::Store(format!("cannot start the audit writer: {e}")))?;
        info!(%chain, "audit trail open");
        Ok((
            Audit {
                inner: Some(Arc::new(Inner {
                    db,
                    tx,
                    chain,
                    appended,
                })),
            },
            Closed(closed),
        ))
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// This node's chain.
    pub fn chain(&self) -> Option<&str> {
        self.inner.as_ref().map(|i| i.chain.as_str())
    }

    fn pending(event: Event) -> (Pending, oneshot::Receiver<Result<(), AuditError>>) {
        let (reply, rx) = oneshot::channel();
        (
            Pending {
                event,
                at_ms: now_ms(),
                reply,
            },
            rx,
        )
    }

    /// Hands a record to the writer; it is stored once the returned
    /// [`Ack`] says so (the caller may prepare its next batch meanwhile).
    pub async fn submit(&self, event: Event) -> Result<Ack, AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(Ack(None));
        };
        let (p, rx) = Self::pending(event);
        inner
            .tx
            .send(Request::Append(p))
            .await
            .map_err(|_| stopped())?;
        Ok(Ack(Some(rx)))
    }

    /// [`Audit::submit`] from a blocking thread.
    pub fn submit_blocking(&self, event: Event) -> Result<Ack, AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(Ack(None));
        };
        let (p, rx) = Self::pending(event);
        inner
            .tx
            .blocking_send(Request::Append(p))
            .map_err(|_| stopped())?;
        Ok(Ack(Some(rx)))
    }

    /// Appends a record; returns once it is stored.
    pub async fn record(&self, event: Event) -> Result<(), AuditError> {
        self.submit(event).await?.wait().await
    }

    /// [`Audit::record`] from a blocking thread.
    pub fn record_blocking(&self, event: Event) -> Result<(), AuditError> {
        self.submit_blocking(event)?.wait_blocking()
    }

    /// Records about one person at or after `since_ms`, oldest first, at
    /// most `limit` (and whether there were more). Blocking.
    pub fn who_accessed(
        &self,
        national_id: &str,
        since_ms: i64,
        limit: usize,
    ) -> Result<(Vec<Record>, bool), AuditError> {
        let Some(inner) = &self.inner else {
            return Ok((Vec::new(), false));
        };
        // What was recorded before this question is indexed first.
        let (done, indexed) = oneshot::channel();
        if inner.tx.blocking_send(Request::Barrier(done)).is_ok() {
            let _ = indexed.blocking_recv();
        }
        let prefix = key::person_prefix(national_id);
        let mut from = prefix.clone();
        from.extend_from_slice(&(since_ms.max(0) as u64).to_be_bytes());
        let mut out = Vec::new();
        for item in inner
            .db
            .iterator(IteratorMode::From(&from, Direction::Forward))
        {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if out.len() >= limit {
                return Ok((out, true));
            }
            let record_key = &k[prefix.len() + 8..];
            if let Some(bytes) = inner.db.get(record_key)? {
                let record: Record = serde_json::from_slice(&bytes)
                    .map_err(|e| AuditError::Store(format!("audit record: {e}")))?;
                out.push(record);
            }
        }
        Ok((out, false))
    }

    /// This node's records from `index` on, at most `limit`, as stored.
    fn own_records(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(Vec::new());
        };
        let start = key::record(&inner.chain, from);
        let prefix = &start[..start.len() - 8];
        let mut out = Vec::new();
        for item in inner
            .db
            .iterator(IteratorMode::From(&start, Direction::Forward))
            .take(limit)
        {
            let (k, v) = item?;
            if !k.starts_with(prefix) || k.len() != start.len() {
                break;
            }
            let index = u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap_or_default());
            out.push((index, v.to_vec()));
        }
        Ok(out)
    }

    /// Indexes a record of another node's chain read from the topic, and
    /// moves the topic position past it.
    fn index_foreign(
        &self,
        record: Option<(&Record, &[u8])>,
        next_offset: u64,
    ) -> Result<(), AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let mut batch = WriteBatch::default();
        if let Some((r, bytes)) = record {
            batch.put(key::record(&r.chain, r.index), bytes);
            for id in r.event.national_ids() {
                batch.put(key::person(id, r.at_ms, &r.chain, r.index), b"");
            }
        }
        batch.put(key::CONSUMED, next_offset.to_be_bytes());
        inner.db.write(batch)?;
        Ok(())
    }
}

/// Appends records in group commits: one RocksDB write (synced if asked)
/// for everything waiting.
struct Writer {
    db: Arc<DB>,
    chain: String,
    node: String,
    head: Head,
    sync: bool,
    appended: Arc<Notify>,
    /// An index write failed since the start.
    index_behind: bool,
}

impl Writer {
    /// Appends until every sender is gone; the store closes on return.
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut opts = WriteOptions::default();
        opts.set_sync(self.sync);
        while let Some(first) = rx.blocking_recv() {
            let mut pending = Vec::new();
            let mut barriers = Vec::new();
            let mut next_request = Some(first);
            while let Some(request) = next_request.take() {
                match request {
                    Request::Append(p) => pending.push(p),
                    Request::Barrier(done) => barriers.push(done),
                }
                if pending.len() < 1024 {
                    next_request = rx.try_recv().ok();
                }
            }
            self.append(pending, &opts);
            for done in barriers {
                let _ = done.send(());
            }
        }
    }

    /// Seals and stores records in one durable write and answers their
    /// senders; then indexes them by person (not waited for: a crash
    /// before it is redone at open).
    fn append(&mut self, pending: Vec<Pending>, opts: &WriteOptions) {
        if pending.is_empty() {
            return;
        }
        let mut batch = WriteBatch::default();
        let mut index = WriteBatch::default();
        let (mut next, mut last) = (self.head.next, self.head.last.clone());
        let mut replies = Vec::with_capacity(pending.len());
        let mut kinds = Vec::with_capacity(pending.len());
        for p in pending {
            let (record, bytes) = Record {
                chain: self.chain.clone(),
                index: next,
                prev: last,
                at_ms: p.at_ms,
                node: self.node.clone(),
                event: p.event,
                hash: String::new(),
            }
            .sealed();
            batch.put(key::record(&record.chain, record.index), &bytes);
            for id in record.event.national_ids() {
                index.put(
                    key::person(id, record.at_ms, &record.chain, record.index),
                    b"",
                );
            }
            kinds.push(record.event.kind());
            last = record.hash;
            next += 1;
            replies.push(p.reply);
        }
        let head = Head { next, last };
        batch.put(key::HEAD, serde_json::to_vec(&head).unwrap_or_default());
        match self.db.write_opt(batch, opts) {
            Ok(()) => {
                self.head = head;
                for kind in kinds {
                    metrics::counter!(metric::RECORDS, "kind" => kind).increment(1);
                }
                for r in replies {
                    let _ = r.send(Ok(()));
                }
                self.appended.notify_one();
                // Once an index write failed, the mark stays before it, so
                // that the next start redoes everything since.
                if !self.index_behind {
                    index.put(key::INDEXED, next.to_be_bytes());
                }
                if let Err(e) = self.db.write(index) {
                    self.index_behind = true;
                    metrics::counter!(metric::ERRORS, "stage" => "index").increment(1);
                    warn!(error = %e, "cannot index audit records by person; redone at the next start");
                }
            }
            Err(e) => {
                metrics::counter!(metric::ERRORS, "stage" => "append").increment(1);
                warn!(error = %e, "cannot append to the audit trail; the deliveries waiting for it are refused");
                for r in replies {
                    let _ = r.send(Err(AuditError::Unavailable(e.to_string())));
                }
            }
        }
    }
}

/// Replicates the trail through Kafka until `shutdown`: creates the audit
/// topic if asked (retrying while the broker is away; records wait in the
/// local store meanwhile), then ships this node's chain to it and indexes
/// the other nodes' records from it.
pub async fn replicate(
    audit: Audit,
    producer: FutureProducer,
    kafka: KafkaSection,
    config: crate::config::AuditSection,
    shutdown: CancellationToken,
) {
    if config.create_topic {
        let topics = std::slice::from_ref(&config.topic);
        loop {
            // A node stopping does not wait for a broker that is away.
            let created = tokio::select! {
                r = crate::kafka::create_topics(&kafka, topics, 1, config.replication, "audit") => r,
                _ = shutdown.cancelled() => return,
            };
            let Err(e) = created else { break };
            metrics::counter!(metric::ERRORS, "stage" => "topic").increment(1);
            warn!(error = %format!("{e:#}"), topic = %config.topic, "cannot create the audit topic; retrying in 5 s");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
    let indexer = index_cluster(audit.clone(), kafka, config.topic.clone(), shutdown.clone());
    let shipper = ship(audit, producer, config.topic, shutdown);
    let (indexed, ()) = tokio::join!(indexer, shipper);
    if let Err(e) = indexed {
        tracing::error!(error = %format!("{e:#}"), "the audit index of other nodes' records stopped");
    }
}

/// Ships this node's chain to the audit topic, in order, from where it
/// stopped; runs until `shutdown`.
pub async fn ship(
    audit: Audit,
    producer: FutureProducer,
    topic: String,
    shutdown: CancellationToken,
) {
    let Some(inner) = audit.inner.clone() else {
        return;
    };
    let unshipped = metrics::gauge!(metric::UNSHIPPED);
    loop {
        let shipped = match get_u64(&inner.db, key::SHIPPED) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot read the audit shipping position");
                0
            }
        };
        let records = match audit.own_records(shipped, 1000) {
            Ok(r) => r,
            Err(e) => {
                metrics::counter!(metric::ERRORS, "stage" => "ship").increment(1);
                warn!(error = %e, "cannot read the audit trail to ship it");
                Vec::new()
            }
        };
        let Some(&(last, _)) = records.last() else {
            unshipped.set(0.0);
            tokio::select! {
                _ = inner.appended.notified() => continue,
                _ = shutdown.cancelled() => return,
            }
        };
        let sends = records.iter().map(|(_, bytes)| {
            producer.send(
                FutureRecord::to(&topic)
                    .key(inner.chain.as_bytes())
                    .payload(bytes.as_slice()),
                Duration::from_secs(30),
            )
        });
        let results = tokio::select! {
            r = futures::future::join_all(sends) => r,
            // What was not acknowledged is shipped again after a restart.
            _ = shutdown.cancelled() => return,
        };
        if let Some(Err((e, _))) = results.into_iter().find(|r| r.is_err()) {
            metrics::counter!(metric::ERRORS, "stage" => "ship").increment(1);
            warn!(error = %e, "cannot ship the audit trail to Kafka; retrying");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                _ = shutdown.cancelled() => return,
            }
        }
        if let Err(e) = inner.db.put(key::SHIPPED, (last + 1).to_be_bytes()) {
            warn!(error = %e, "cannot store the audit shipping position");
        }
        let head = get_u64_head(&inner.db);
        unshipped.set(head.saturating_sub(last + 1) as f64);
    }
}

fn get_u64_head(db: &DB) -> u64 {
    db.get(key::HEAD)
        .ok()
        .flatten()
        .and_then(|h| serde_json::from_slice::<Head>(&h).ok())
        .map_or(0, |h| h.next)
}

/// Reads the audit topic from where this node stopped and indexes the other
/// nodes' records by national ID; runs until `shutdown`.
pub async fn index_cluster(
    audit: Audit,
    kafka: KafkaSection,
    topic: String,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(inner) = audit.inner.clone() else {
        return Ok(());
    };
    let consumer: StreamConsumer = crate::kafka::consumer_config(
        &kafka,
        &format!("{}-audit", kafka.group_id),
        crate::config::StartFrom::Earliest,
    )
    .create()?;
    let consumed = get_u64(&inner.db, key::CONSUMED)?;
    let mut order = crate::kafka::Gapless::new(consumed, consumed == 0);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(
        &topic,
        0,
        if consumed == 0 {
            Offset::Beginning
        } else {
            crate::kafka::resume_offset(&kafka, consumed)
        },
    )?;
    consumer.assign(&tpl)?;
    // This node's own records, as its writer lays them out: indexed when
    // written, skipped here without being parsed.
    let own = format!(
        "{{\"chain\":{},",
        serde_json::to_string(&inner.chain).unwrap_or_default()
    );
    loop {
        let m = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = consumer.recv() => m,
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "audit topic read failed; retrying");
                continue;
            }
        };
        let Ok(offset) = u64::try_from(m.offset()) else {
            continue;
        };
        match order.step(offset) {
            crate::kafka::Step::Skip => continue,
            crate::kafka::Step::SeekBack { next } => {
                if let Err(e) = consumer.seek(
                    &topic,
                    0,
                    crate::kafka::resume_offset(&kafka, next),
                    Duration::from_secs(5),
                ) {
                    warn!(error = %e, "cannot seek the audit topic");
                }
                continue;
            }
            crate::kafka::Step::Take { missing } => {
                if let Some(expected) = missing {
                    warn!(
                        expected,
                        got = offset,
                        "audit topic gap persists: records missing"
                    );
                }
            }
        }
        let bytes = m.payload().unwrap_or_default();
        let foreign = if bytes.starts_with(own.as_bytes()) {
            None
        } else {
            match serde_json::from_slice::<Record>(bytes) {
                Ok(r) if r.hash != r.content_hash() => {
                    metrics::counter!(metric::INVALID).increment(1);
                    warn!(offset, chain = %r.chain, index = r.index, "audit record does not verify; not indexed (run `ndc audit verify`)");
                    None
                }
                Ok(r) if r.chain != inner.chain => Some(r),
                Ok(_) => None,
                Err(e) => {
                    metrics::counter!(metric::INVALID).increment(1);
                    warn!(offset, error = %e, "not an audit record; not indexed");
                    None
                }
            }
        };
        // A small unsynced write: the position moves with the index entry.
        if let Err(e) = audit.index_foreign(foreign.as_ref().map(|r| (r, bytes)), offset + 1) {
            metrics::counter!(metric::ERRORS, "stage" => "index").increment(1);
            warn!(error = %e, "cannot index an audit record; reading it again");
            if let Err(e) = consumer.seek(
                &topic,
                0,
                Offset::Offset(offset as i64),
                Duration::from_secs(5),
            ) {
                warn!(error = %e, "cannot seek the audit topic back; the gap check reads the record again");
            }
            continue;
        }
        if foreign.is_some() {
            metrics::counter!(metric::INDEXED).increment(1);
        }
        order.taken(offset);
    }
}

/// Reads the audit topic from its start to its end (where the broker
/// says the partition ends when the reader gets there), handing each record
/// (offset, bytes) to `each`; returns how many were read. For `ndc audit
/// verify` and `export`.
pub async fn read_topic(
    kafka: &KafkaSection,
    topic: &str,
    mut each: impl FnMut(u64, &[u8]),
) -> anyhow::Result<u64> {
    use anyhow::Context;
    use rdkafka::error::KafkaError;
    let consumer: StreamConsumer = crate::kafka::consumer_config(
        kafka,
        &format!("{}-audit-verify", kafka.group_id),
        crate::config::StartFrom::Earliest,
    )
    // The end is the fetch's end-of-partition event: the test broker's
    // ListOffsets answers an end before the last record batch's records.
    .set("enable.partition.eof", "true")
    .create()
    .context("cannot create the audit topic consumer")?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut order = crate::kafka::Gapless::new(0, true);
    let mut read = 0u64;
    loop {
        let m = match tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .with_context(|| {
                format!(
                    "audit topic {topic}: nothing read for 30 s at offset {}",
                    order.next()
                )
            })? {
            Ok(m) => m,
            Err(KafkaError::PartitionEOF(_)) => return Ok(read),
            Err(e) => return Err(e).with_context(|| format!("cannot read audit topic {topic}")),
        };
        let offset = m.offset().max(0) as u64;
        match order.step(offset) {
            crate::kafka::Step::Skip => continue,
            crate::kafka::Step::SeekBack { next } => {
                consumer.seek(
                    topic,
                    0,
                    crate::kafka::resume_offset(kafka, next),
                    Duration::from_secs(5),
                )?;
                continue;
            }
            // A gap that persists is left for the verifier to name.
            crate::kafka::Step::Take { .. } => {}
        }
        each(offset, m.payload().unwrap_or_default());
        read += 1;
        order.taken(offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(view: &str, ids: &[&str]) -> Event {
        Event::Delivery {
            principal: "agency-a".into(),
            purpose: "benefits".into(),
            view: view.into(),
            shard: 0,
            snapshot: false,
            first_seq: 1,
            last_seq: 2,
            changes: 2,
            national_ids: ids.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// A chain of `n` records as the writer seals them.
    fn chain(n: u64) -> Vec<Vec<u8>> {
        let mut last = GENESIS.to_string();
        (0..n)
            .map(|index| {
                let (r, bytes) = Record {
                    chain: "n1.abc".into(),
                    index,
                    prev: last.clone(),
                    at_ms: 1_000 + index as i64,
                    node: "n1".into(),
                    event: delivery("people", &["001234567890"]),
                    hash: String::new(),
                }
                .sealed();
                last = r.hash;
                bytes
            })
            .collect()
    }

    fn verify(records: &[Vec<u8>]) -> Verifier {
        let mut v = Verifier::default();
        for (i, r) in records.iter().enumerate() {
            v.check(format!("line {}", i + 1), r);
        }
        v
    }

    #[test]
    fn the_stored_form_is_the_record_and_verifies() {
        let records = chain(5);
        let first: Record = serde_json::from_slice(&records[0]).unwrap();
        assert_eq!(first.prev, GENESIS);
        assert_eq!(first.hash, first.content_hash());
        let v = verify(&records);
        assert_eq!(v.first_bad, None);
        assert_eq!(v.records, 5);
        assert_eq!(v.heads()[0].1, 4);
    }

    #[test]
    fn a_record_shipped_twice_is_skipped() {
        let mut records = chain(5);
        records.insert(3, records[1].clone());
        records.push(records[4].clone());
        let v = verify(&records);
        assert_eq!(v.first_bad, None);
        assert_eq!((v.records, v.duplicates), (5, 2));
    }

    #[test]
    fn altered_removed_and_reordered_records_are_named() {
        let records = chain(6);
        // Altered: a principal changed.
        let mut altered = records.clone();
        altered[3] = String::from_utf8(altered[3].clone())
            .unwrap()
            .replace("agency-a", "agency-b")
            .into_bytes();
        let bad = verify(&altered).first_bad.unwrap();
        assert_eq!((bad.position.as_str(), bad.index), ("line 4", Some(3)));
        assert!(bad.reason.starts_with("altered"), "{bad:?}");
        // Removed.
        let mut removed = records.clone();
        removed.remove(2);
        let bad = verify(&removed).first_bad.unwrap();
        assert_eq!((bad.position.as_str(), bad.index), ("line 3", Some(3)));
        assert!(bad.reason.contains("expected record 2"), "{bad:?}");
        // Reordered.
        let mut reordered = records.clone();
        reordered.swap(4, 5);
        let bad = verify(&reordered).first_bad.unwrap();
        assert_eq!((bad.position.as_str(), bad.index), ("line 5", Some(5)));
        // Re-sealed after an edit: its own hash fits, the chain does not.
        let mut forged: Record = serde_json::from_slice(&records[2]).unwrap();
        forged.event = delivery("people", &[]);
        let (_, forged) = forged.sealed();
        let mut resealed = records.clone();
        resealed[2] = forged;
        let bad = verify(&resealed).first_bad.unwrap();
        assert_eq!((bad.position.as_str(), bad.index), ("line 4", Some(3)));
        assert!(bad.reason.starts_with("broken chain"), "{bad:?}");
        // Garbage.
        let bad = verify(&[b"{not json".to_vec()]).first_bad.unwrap();
        assert!(bad.reason.starts_with("not an audit record"), "{bad:?}");
    }

    #[tokio::test]
    async fn appends_chain_and_are_indexed_by_person() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, closed) = Audit::open(dir.path(), "n1", false).unwrap();
        audit
            .record(delivery("people", &["001234567890", "079201000123"]))
            .await
            .unwrap();
        audit
            .record(delivery("people", &["079201000123"]))
            .await
            .unwrap();
        let a2 = audit.clone();
        tokio::task::spawn_blocking(move || {
            a2.record_blocking(delivery("cars", &["001234567890"]))
        })
        .await
        .unwrap()
        .unwrap();
        // Asked right after the appends: they are indexed first.
        let a = audit.clone();
        let (seen, more) =
            tokio::task::spawn_blocking(move || a.who_accessed("001234567890", 0, 100))
                .await
                .unwrap()
                .unwrap();
        assert!(!more);
        assert_eq!(seen.len(), 2);
        assert!(matches!(&seen[1].event, Event::Delivery { view, .. } if view == "cars"));
        let a = audit.clone();
        let (seen, more) =
            tokio::task::spawn_blocking(move || a.who_accessed("079201000123", 0, 1))
                .await
                .unwrap()
                .unwrap();
        assert!(more);
        assert_eq!(seen.len(), 1);
        let mut v = Verifier::default();
        for (i, bytes) in audit.own_records(0, 100).unwrap() {
            assert!(v.check(i, &bytes), "{:?}", v.first_bad);
        }
        assert_eq!(v.records, 3);
        // The chain goes on after a restart.
        let chain = audit.chain().unwrap().to_string();
        drop(audit);
        closed.wait().await;
        // A crash between a record and its index: redone at open.
        {
            let db = DB::open_default(dir.path()).unwrap();
            db.put(key::INDEXED, 0u64.to_be_bytes()).unwrap();
            let prefix = key::person_prefix("079201000123");
            let stale: Vec<Box<[u8]>> = db
                .prefix_iterator(&prefix)
                .map(|i| i.unwrap().0)
                .filter(|k| k.starts_with(&prefix))
                .collect();
            for k in stale {
                db.delete(k).unwrap();
            }
        }
        let (audit, _) = Audit::open(dir.path(), "n1", false).unwrap();
        assert_eq!(audit.chain(), Some(chain.as_str()));
        let a = audit.clone();
        let (seen, _) = tokio::task::spawn_blocking(move || a.who_accessed("079201000123", 0, 9))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen.len(), 2, "reindexed at open");
        audit.record(delivery("people", &[])).await.unwrap();
        let mut v = Verifier::default();
        for (i, bytes) in audit.own_records(0, 100).unwrap() {
            assert!(v.check(i, &bytes), "{:?}", v.first_bad);
        }
        assert_eq!(v.records, 4);
    }
}
