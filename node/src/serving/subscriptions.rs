//! The gRPC subscription service.
//!
//! Each subscription is a task per shard of its view that reads the shard
//! from RocksDB, and a fan-in that merges their batches (vector resume
//! tokens) into the client's bounded channel. When the client reads slowly
//! the channels fill and the tasks wait: the server holds about twice
//! `buffer_batches` batches (plus one per shard) per subscriber, and a
//! subscriber that fell behind catches up from the durable change stream,
//! never from memory. One that keeps up takes each commit's changes from
//! the commit itself, already in memory and shared by all such subscribers,
//! without reading them back.

use crate::config::SubscriptionSection;
use crate::now_ms;
use crate::security::token;
use crate::serving::access::{self, Authenticator};
use crate::serving::audit::{Ack, Audit, AuditError, Event};
use crate::serving::filter::{Filter, Masker};
use crate::serving::shard_peer::{PeerShards, RemoteShard};
use crate::telemetry::metric;
use crate::views::{CommitReceiver, ViewRegistry};

use ndc_operators::masking::HashKeys;
use ndc_operators::{Key, SnapshotRow, StoreError, StoreReader};
use ndc_proto::v1::subscribe_request::Start;
use ndc_proto::v1::subscription_server::Subscription;
use ndc_proto::v1::{
    Change, ChangeBatch, ListViewsRequest, ListViewsResponse, Op, Progress, SourcePosition,
    SubscribeRequest, SubscribeResponse, ViewInfo, subscribe_response,
};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info_span, warn};

pub struct SubscriptionService {
    reader: StoreReader,
    views: ViewRegistry,
    config: SubscriptionSection,
    slots: Arc<Semaphore>,
    auth: Arc<Authenticator>,
    /// Keys of the `hash` masking policy.
    hash_keys: Arc<HashKeys>,
    /// Live streams per principal (`access.max_streams_per_principal`).
    streams: Arc<Mutex<HashMap<String, usize>>>,
    max_streams_per_principal: usize,
    audit: Audit,
    /// In a cluster with placement: where the shards this node does not
    /// hold are read from.
    peers: Option<PeerShards>,
}

impl SubscriptionService {
    pub fn new(
        reader: StoreReader,
        views: ViewRegistry,
        config: SubscriptionSection,
        auth: Arc<Authenticator>,
        max_streams_per_principal: usize,
        hash_keys: Arc<HashKeys>,
        audit: Audit,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(config.max_subscribers));
        SubscriptionService {
            reader,
            views,
            config,
            slots,
            auth,
            hash_keys,
            streams: Arc::default(),
            max_streams_per_principal,
            audit,
            peers: None,
        }
    }

    /// Reads the shards this node does not hold (placement) from their
    /// holders.
    pub fn with_peers(mut self, peers: Option<PeerShards>) -> Self {
        self.peers = peers;
        self
    }

    /// Counts a stream of `principal` until the returned guard drops, or
    /// refuses it past the limit.
    fn stream_slot(&self, principal: &str) -> Result<StreamSlot, Status> {
        let mut streams = self
            .streams
            .lock()
            .map_err(|_| Status::internal("stream counter poisoned"))?;
        let n = streams.entry(principal.to_string()).or_insert(0);
        if *n >= self.max_streams_per_principal {
            metrics::counter!(metric::ACCESS_REFUSED_STREAMS, "reason" => "stream_limit")
                .increment(1);
            return Err(refuse(
                tonic::Code::ResourceExhausted,
                format!(
                    "{principal} already holds {} live subscriptions on this node \
                     (access.max_streams_per_principal)",
                    self.max_streams_per_principal
                ),
            ));
        }
        *n += 1;
        Ok(StreamSlot {
            streams: self.streams.clone(),
            principal: principal.to_string(),
        })
    }
}

/// One counted stream of a principal.
struct StreamSlot {
    streams: Arc<Mutex<HashMap<String, usize>>>,
    principal: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Ok(mut s) = self.streams.lock()
            && let Some(n) = s.get_mut(&self.principal)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.remove(&self.principal);
            }
        }
    }
}

fn refuse(code: tonic::Code, message: String) -> Status {
    metrics::counter!(metric::SUBSCRIPTION_ERRORS, "code" => format!("{code:?}")).increment(1);
    Status::new(code, message)
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Expired {
            view,
            seq,
            retained_from,
        } => no_longer_retained(&format!("view {view:?}"), seq, retained_from),
        StoreError::UnknownView(v) => {
            refuse(tonic::Code::NotFound, format!("view {v:?} does not exist"))
        }
        other => refuse(tonic::Code::Internal, format!("state store: {other}")),
    }
}

/// `what` (a view, a shard) no longer holds `seq` of its change stream.
fn no_longer_retained(what: &str, seq: u64, retained_from: u64) -> Status {
    refuse(
        tonic::Code::OutOfRange,
        format!(
            "{what} no longer retains seq {seq} (retained from {retained_from}); subscribe again \
             with start=snapshot"
        ),
    )
}

/// Which node checks a resume position against a shard's `ViewMeta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Checker {
    /// The serving node, for a shard it reads itself: every check.
    Reader,
    /// Only the incarnation: the serving node, for a shard read from its
    /// holders (they check the rest); a holder asked for a snapshot.
    Server,
    /// A holder streaming the shard to another node: it waits for what it
    /// has not committed yet instead of refusing it.
    Holder,
}

/// Why a shard, as `meta` describes it, cannot be resumed after `seq`:
/// another incarnation than the caller's (when it names one), a position
/// not committed here yet (retryable), or one no longer retained.
pub(super) fn resume_refusal(
    what: &str,
    meta: &ndc_proto::state::ViewMeta,
    incarnation: Option<u64>,
    seq: u64,
    checker: Checker,
) -> Option<Status> {
    if incarnation.is_some_and(|i| i != meta.incarnation) {
        return Some(refuse(
            tonic::Code::FailedPrecondition,
            format!(
                "resume token is from another incarnation of {what} (its change stream was \
                 rebuilt); subscribe again with start=snapshot"
            ),
        ));
    }
    if checker == Checker::Reader && seq > meta.last_seq {
        // In a cluster, a node that has not yet applied as much of the
        // change log as the subscriber's last node: retryable.
        return Some(refuse(
            tonic::Code::Unavailable,
            format!(
                "this node has not caught up with the resume token of {what} yet (token seq \
                 {seq}, committed here {}); retry shortly or on another node",
                meta.last_seq
            ),
        ));
    }
    if checker != Checker::Server && seq + 1 < meta.retained_from_seq {
        return Some(no_longer_retained(what, seq + 1, meta.retained_from_seq));
    }
    None
}

fn snapshot_change(row: SnapshotRow) -> Change {
    Change {
        shard: 0,
        seq: 0,
        op: Op::Read as i32,
        key_json: row.key,
        before_json: None,
        after_json: Some(row.row_json),
        source: Some(SourcePosition {
            ts_ms: row.version.source_ts_ms,
            lsn: row.version.lsn,
            stream: row.version.stream,
            offset: row.version.offset,
            ..SourcePosition::default()
        }),
        committed_at_ms: 0,
    }
}

type Sender = mpsc::Sender<Result<SubscribeResponse, Status>>;

fn batch(
    changes: Vec<Change>,
    resume_token: String,
    snapshot: bool,
    snapshot_complete: bool,
) -> SubscribeResponse {
    SubscribeResponse {
        kind: Some(subscribe_response::Kind::Batch(ChangeBatch {
            changes,
            resume_token,
            snapshot,
            snapshot_complete,
        })),
    }
}

/// What a shard's subscriber hands the fan-in (which gives it the view's
/// vector token on its way to the client).
#[derive(Debug)]
pub(super) enum Out {
    /// Rows of the shard's snapshot (not a position yet).
    Rows(Vec<Change>),
    /// The shard's snapshot is complete: it stands at `seq`.
    SnapshotDone { seq: u64 },
    /// Changes of the shard, the last of them at `cursor` (or passed over
    /// by the filter up to it).
    Changes { changes: Vec<Change>, cursor: u64 },
    /// Nothing to send: the shard stands at `cursor`, committed `committed`.
    Progress { cursor: u64, committed: u64 },
}

#[derive(Debug)]
pub(super) struct ShardOut {
    pub(super) shard: u32,
    pub(super) out: Out,
}

/// Streams one shard of a view: its snapshot, then its change stream.
/// How one shard's batches reach the fan-in: filtered, masked and
/// audited on this node, wherever the shard is read (this node's store, or
/// a holder's over the peer listener).
pub(super) struct Delivery {
    /// The view served (labels, levels, audit).
    pub(super) view: String,
    /// Which of the view's shards.
    pub(super) shard: u32,
    pub(super) filter: Filter,
    pub(super) out: mpsc::Sender<ShardOut>,
    /// Who receives the stream and why, as the audit trail records it.
    pub(super) recipient: Arc<Recipient>,
    pub(super) audit: Audit,
    pub(super) views: ViewRegistry,
    /// A delivered batch whose audit record is being written.
    pub(super) held: Option<(Ack, Out)>,
    /// The leak test's mutation: masking off on this one path.
    #[cfg(test)]
    pub(super) unmasked: Option<DeliveryPath>,
}

/// How a local read of a shard ended without an error.
pub(super) enum Followed {
    ClientGone,
    /// Placement took the shard from this node: the read goes on from its
    /// holders, after `cursor`.
    Lost {
        cursor: u64,
        sub: Box<Subscriber>,
    },
}

/// What a local read needs to go on from the holders when placement takes
/// its shard from this node.
#[derive(Clone)]
pub(super) struct Handoff {
    pub(super) peers: PeerShards,
    pub(super) keys: Vec<String>,
    pub(super) incarnation: u64,
}

/// Streams one shard of a view from this node's store: its snapshot, then
/// its change stream.
pub(super) struct Subscriber {
    pub(super) reader: StoreReader,
    /// The shard's name in the store.
    pub(super) store_name: Arc<str>,
    pub(super) batch_size: usize,
    pub(super) progress_interval: Duration,
    pub(super) commits: CommitReceiver,
    pub(super) d: Delivery,
    /// In a cluster with placement: where to go on when the shard leaves.
    pub(super) handoff: Option<Handoff>,
}

/// Where the changes of a batch come from on their way out. Every path
/// masks (one leak test drives each of them, and switches masking off on
/// one at a time to show it would notice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeliveryPath {
    /// The view's rows from RocksDB, whole or by key.
    Snapshot,
    /// A caught-up subscriber's changes, from the writer's last commit.
    Memory,
    /// Changes read back from the stored change stream (a resume, a slow
    /// subscriber).
    Store,
    /// Rows and changes of a shard held by another node, read from it over
    /// the peer listener.
    Peer,
}

/// Who receives a stream, of which view and why.
pub(super) struct Recipient {
    principal: String,
    purpose: String,
    view: String,
}

impl Recipient {
    /// The audit record of a batch about to be sent.
    fn delivery(
        &self,
        shard: u32,
        changes: &[Change],
        snapshot: bool,
        people: BTreeSet<String>,
    ) -> Event {
        Event::Delivery {
            principal: self.principal.clone(),
            purpose: self.purpose.clone(),
            view: self.view.clone(),
            shard,
            snapshot,
            first_seq: changes.first().map_or(0, |c| c.seq),
            last_seq: changes.last().map_or(0, |c| c.seq),
            changes: changes.len() as u64,
            national_ids: people.into_iter().collect(),
        }
    }
}

fn audit_status(e: AuditError) -> Status {
    metrics::counter!(crate::serving::audit::metric::ERRORS, "stage" => "delivery").increment(1);
    Status::unavailable(e.to_string())
}

impl Delivery {
    /// The filter a path applies.
    pub(super) fn filter_on(&self, path: DeliveryPath) -> Cow<'_, Filter> {
        #[cfg(test)]
        if self.unmasked == Some(path) {
            return Cow::Owned(Filter {
                mask: None,
                ..self.filter.clone()
            });
        }
        let _ = path;
        Cow::Borrowed(&self.filter)
    }

    /// A stream admitted under one classification of its view ends when
    /// the view is classified anew (a pipeline re-applied): the subscriber
    /// resumes under the new levels.
    pub(super) fn check_levels(&self) -> Result<(), Status> {
        match &self.filter.mask {
            Some(m) if !Arc::ptr_eq(&m.levels, &self.views.levels(&self.view)) => {
                Err(Status::aborted(format!(
                    "view {:?} was classified anew; resume to receive it under its new levels",
                    self.view
                )))
            }
            _ => Ok(()),
        }
    }

    /// Sends the held batch once its audit record is stored.
    pub(super) async fn release(&mut self) -> Result<(), Status> {
        if let Some((ack, msg)) = self.held.take() {
            ack.wait().await.map_err(audit_status)?;
            self.send(msg).await?;
        }
        Ok(())
    }

    pub(super) async fn send(&self, out: Out) -> Result<(), Status> {
        self.out
            .send(ShardOut {
                shard: self.shard,
                out,
            })
            .await
            .map_err(|_| Status::cancelled("subscriber went away"))
    }

    /// Sends the changes the filter admits (after `cursor`, the last of
    /// them); returns whether anything was sent.
    pub(super) async fn deliver<'c>(
        &mut self,
        changes: impl Iterator<Item = Cow<'c, Change>>,
        cursor: u64,
        from: DeliveryPath,
    ) -> Result<bool, Status> {
        let now = now_ms();
        let mut people = BTreeSet::new();
        let out: Vec<Change> = {
            let filter = self.filter_on(from);
            changes
                .filter(|c| filter.admits(c))
                .filter_map(|c| {
                    metrics::histogram!(metric::DELIVERY_LATENCY)
                        .record((now - c.committed_at_ms).max(0) as f64 / 1000.0);
                    filter.apply(c.into_owned(), &mut people)
                })
                .collect()
        };
        if out.is_empty() {
            return Ok(false);
        }
        self.check_levels()?;
        self.record_and_hold(out, people, false, |changes| Out::Changes {
            changes,
            cursor,
        })
        .await?;
        Ok(true)
    }

    /// Recorded before it is sent; not recorded, not sent. The record is
    /// written while the caller prepares the next batch; this batch goes
    /// out when that one is delivered, or when the stream waits.
    async fn record_and_hold(
        &mut self,
        out: Vec<Change>,
        people: BTreeSet<String>,
        snapshot: bool,
        batch: impl FnOnce(Vec<Change>) -> Out,
    ) -> Result<(), Status> {
        let ack = self
            .audit
            .submit(self.recipient.delivery(self.shard, &out, snapshot, people))
            .await
            .map_err(audit_status)?;
        metrics::counter!(metric::CHANGES_SENT, "view" => self.view.clone())
            .increment(out.len() as u64);
        self.release().await?;
        self.held = Some((ack, batch(out)));
        Ok(())
    }

    /// Sends rows of a snapshot read elsewhere (a holder's), as the
    /// snapshot of this node's store would: filtered, masked, audited.
    pub(super) async fn deliver_rows(&mut self, rows: Vec<Change>) -> Result<(), Status> {
        let mut people = BTreeSet::new();
        let out: Vec<Change> = {
            let filter = self.filter_on(DeliveryPath::Peer);
            rows.into_iter()
                .filter(|c| filter.admits(c))
                .filter_map(|c| filter.apply(c, &mut people))
                .collect()
        };
        if out.is_empty() {
            return Ok(());
        }
        self.record_and_hold(out, people, true, Out::Rows).await
    }
}

impl Subscriber {
    /// Sends the view's rows as of one consistent point; returns that point.
    pub(super) async fn snapshot(&self) -> Result<u64, Status> {
        let reader = self.reader.clone();
        let view = self.d.view.clone();
        let store_name = self.store_name.clone();
        let shard = self.d.shard;
        let keys = self.d.filter.keys.clone();
        let tx = self.d.out.clone();
        let filter = self.d.filter_on(DeliveryPath::Snapshot).into_owned();
        let batch_size = self.batch_size;
        let audit = self.d.audit.clone();
        let recipient = self.d.recipient.clone();
        let (last_seq, refused) = tokio::task::spawn_blocking(move || {
            let mut refused = None;
            // A batch whose record is being written while the next is read.
            let mut held: Option<(Ack, Vec<Change>)> = None;
            // Sends a held batch once its record is stored; not recorded,
            // not sent.
            let release =
                |held: &mut Option<(Ack, Vec<Change>)>, refused: &mut Option<Status>| -> bool {
                    let Some((ack, changes)) = held.take() else {
                        return true;
                    };
                    if let Err(e) = ack.wait_blocking() {
                        *refused = Some(audit_status(e));
                        return false;
                    }
                    metrics::counter!(metric::CHANGES_SENT, "view" => view.clone())
                        .increment(changes.len() as u64);
                    tx.blocking_send(ShardOut {
                        shard,
                        out: Out::Rows(changes),
                    })
                    .is_ok()
                };
            let last = reader.scan_snapshot(&store_name, keys.as_deref(), batch_size, |rows| {
                let mut people = BTreeSet::new();
                let changes: Vec<Change> = rows
                    .into_iter()
                    .filter_map(|r| filter.apply(snapshot_change(r), &mut people))
                    .collect();
                if changes.is_empty() {
                    return true;
                }
                let ack = match audit
                    .submit_blocking(recipient.delivery(shard, &changes, true, people))
                {
                    Ok(ack) => ack,
                    Err(e) => {
                        refused = Some(audit_status(e));
                        return false;
                    }
                };
                let sent = release(&mut held, &mut refused);
                held = Some((ack, changes));
                sent
            });
            if refused.is_none() {
                release(&mut held, &mut refused);
            }
            (last, refused)
        })
        .await
        .map_err(|e| Status::internal(format!("snapshot task failed: {e}")))?;
        if let Some(status) = refused {
            return Err(status);
        }
        let last_seq = last_seq.map_err(store_status)?;
        self.d.send(Out::SnapshotDone { seq: last_seq }).await?;
        Ok(last_seq)
    }

    /// Streams every change after `cursor` until the client goes away.
    ///
    /// Caught up, it takes each commit's changes from the commit itself
    /// ([`crate::views::Committed::next_after`]); behind (a slow client, a new
    /// subscription, a commit missed while sending), it reads them from the
    /// durable change stream.
    pub(super) async fn follow(mut self, mut cursor: u64) -> Result<Followed, Status> {
        // Placement taking the shard from this node ends the local read.
        let peers = self.handoff.as_ref().map(|h| h.peers.clone());
        let name = self.store_name.clone();
        let mut lost = std::pin::pin!(async move {
            match peers {
                Some(p) => p.lost(&name).await,
                None => std::future::pending::<()>().await,
            }
        });
        let mut last_sent = Instant::now();
        // The first round reads the store whatever the head says.
        let mut read_store = true;
        loop {
            let head = self.commits.borrow_and_update().clone();
            if let Some(kept) = head.next_after(cursor).filter(|_| !read_store) {
                metrics::counter!(metric::CHANGES_READ, "view" => self.d.view.clone(), "from" => "memory")
                    .increment(kept.len() as u64);
                // A commit may hold more changes than a batch the client takes.
                for part in kept.chunks(self.batch_size.max(1)) {
                    if let Some(last) = part.last() {
                        cursor = last.seq;
                    }
                    if self
                        .d
                        .deliver(part.iter().map(Cow::Borrowed), cursor, DeliveryPath::Memory)
                        .await?
                    {
                        last_sent = Instant::now();
                    }
                }
                continue;
            }
            if read_store || head.seq > cursor {
                read_store = false;
                let reader = self.reader.clone();
                let store_name = self.store_name.clone();
                let limit = self.batch_size;
                let changes = tokio::task::spawn_blocking(move || {
                    reader.changes_after(&store_name, cursor, limit)
                })
                .await
                .map_err(|e| Status::internal(format!("read task failed: {e}")))?
                .map_err(store_status)?;
                let full = changes.len() >= limit;
                metrics::counter!(metric::CHANGES_READ, "view" => self.d.view.clone(), "from" => "store")
                    .increment(changes.len() as u64);
                if let Some(last) = changes.last() {
                    cursor = last.seq;
                    if self
                        .d
                        .deliver(
                            changes.into_iter().map(Cow::Owned),
                            cursor,
                            DeliveryPath::Store,
                        )
                        .await?
                    {
                        last_sent = Instant::now();
                    }
                }
                if full {
                    read_store = true;
                }
                // A short read reached the head: read again only if more
                // was committed since, which the next round sees.
                continue;
            }
            // Caught up: what is held goes out before the stream waits.
            self.d.release().await?;
            // Wait for the next commit, or say we are alive.
            let wait = self.progress_interval.saturating_sub(last_sent.elapsed());
            let committed = head.seq;
            tokio::select! {
                changed = self.commits.changed() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("node is shutting down"));
                    }
                }
                _ = tokio::time::sleep(wait) => {
                    self.d.send(Out::Progress { cursor, committed }).await?;
                    last_sent = Instant::now();
                }
                _ = self.d.out.closed() => return Ok(Followed::ClientGone),
                () = &mut lost => {
                    self.d.release().await?;
                    return Ok(Followed::Lost { cursor, sub: Box::new(self) });
                }
            }
        }
    }
}

/// A subscriber of one shard for another node's fan-in: every row and
/// change of the shard (the keys asked for, if any), unmasked and not
/// audited here — the node serving the subscriber does both.
#[allow(clippy::too_many_arguments)]
pub(super) fn raw_subscriber(
    reader: StoreReader,
    view: &str,
    shard: crate::views::Shard,
    keys: Vec<Key>,
    batch_size: usize,
    progress_interval: Duration,
    views: ViewRegistry,
    out: mpsc::Sender<ShardOut>,
) -> Subscriber {
    Subscriber {
        reader,
        store_name: shard.store_name.clone(),
        batch_size,
        progress_interval,
        commits: shard.commits.subscribe(),
        d: Delivery {
            view: view.to_string(),
            shard: 0,
            filter: Filter::new(keys, Vec::new(), None),
            out,
            recipient: Arc::new(Recipient {
                principal: "peer".into(),
                purpose: "fan-in".into(),
                view: view.to_string(),
            }),
            audit: Audit::default(),
            views,
            held: None,
            #[cfg(test)]
            unmasked: None,
        },
        handoff: None,
    }
}

/// One shard's part of a subscription, as the fan-in drives it: its
/// snapshot (returning where it stands), then its changes after a cursor
/// until the client goes away. [`Subscriber`] reads the store; tests drive
/// the fan-in with scripted shards.
pub(super) trait ShardStream: Send + 'static {
    fn shard(&self) -> u32;
    fn snapshot(&mut self) -> impl std::future::Future<Output = Result<u64, Status>> + Send;
    /// Where a `latest` start begins: the shard's head as its reader
    /// knows it (sent on as progress, so that the view's token has it).
    fn head(&mut self) -> impl std::future::Future<Output = Result<u64, Status>> + Send;
    fn follow(self, cursor: u64) -> impl std::future::Future<Output = Result<(), Status>> + Send;
}

impl ShardStream for Subscriber {
    fn shard(&self) -> u32 {
        self.d.shard
    }

    fn snapshot(&mut self) -> impl std::future::Future<Output = Result<u64, Status>> + Send {
        Subscriber::snapshot(self)
    }

    async fn head(&mut self) -> Result<u64, Status> {
        let seq = self.commits.borrow().seq;
        self.d
            .send(Out::Progress {
                cursor: seq,
                committed: seq,
            })
            .await?;
        Ok(seq)
    }

    async fn follow(self, cursor: u64) -> Result<(), Status> {
        match Subscriber::follow(self, cursor).await? {
            Followed::ClientGone => Ok(()),
            Followed::Lost { cursor, sub } => sub.into_remote().follow(cursor).await,
        }
    }
}

/// A shard of a subscription: read from this node's store, or from its
/// holders.
enum AnyShard {
    Local(Box<Subscriber>),
    Remote(Box<RemoteShard>),
    Idle(Box<IdleShard>),
}

/// A shard that cannot hold any key of a keyed subscription (the view is
/// split by national ID, or a replica's keys are routed): not read, here or
/// on its holders. It stands at 0 in a snapshot's token, or where the token
/// it resumes from says (a later read of it with other keys starts there).
/// Of a routed replica it then moves up to where the shard's records are
/// known to be in place (`routes`): a read resumed once the route is
/// withdrawn reads the shard from there, not from its start.
struct IdleShard {
    d: Delivery,
    routes: Option<watch::Receiver<crate::views::KeyRoutes>>,
    /// At most one move a period: the client hears of positions only in
    /// progress messages, once a period.
    every: Duration,
}

impl IdleShard {
    /// Stands at `cursor`, and moves up with the shard's verified point
    /// while the route lasts, until the client goes away.
    async fn follow(mut self, mut cursor: u64) -> Result<(), Status> {
        self.stand_at(cursor).await?;
        let Some(mut routes) = self.routes.take() else {
            self.d.out.closed().await;
            return Ok(());
        };
        loop {
            tokio::select! {
                _ = self.d.out.closed() => return Ok(()),
                r = routes.changed() => if r.is_err() {
                    self.d.out.closed().await;
                    return Ok(());
                },
            }
            let verified = routes
                .borrow_and_update()
                .get(&self.d.view)
                .and_then(|r| r.verified_seqs.get(self.d.shard as usize).copied());
            if let Some(v) = verified.filter(|v| *v > cursor) {
                cursor = self.stand_at(v).await?;
                tokio::select! {
                    _ = self.d.out.closed() => return Ok(()),
                    _ = tokio::time::sleep(self.every) => {}
                }
            }
        }
    }

    async fn stand_at(&self, seq: u64) -> Result<u64, Status> {
        self.d
            .send(Out::Progress {
                cursor: seq,
                committed: seq,
            })
            .await?;
        Ok(seq)
    }
}

impl Subscriber {
    /// The same read, from the shard's holders (placement took it from
    /// this node).
    fn into_remote(self) -> RemoteShard {
        let handoff = self
            .handoff
            .expect("only a read with a handoff loses its shard");
        metrics::counter!(metric::REMOTE_SHARDS, "outcome" => "handed_off").increment(1);
        RemoteShard {
            holders: handoff.peers.holder_addrs(&self.store_name),
            store_name: self.store_name.to_string(),
            peers: handoff.peers,
            keys: handoff.keys,
            batch_size: self.batch_size as u32,
            incarnation: handoff.incarnation,
            stream: None,
            current: None,
            d: self.d,
        }
    }
}

impl ShardStream for AnyShard {
    fn shard(&self) -> u32 {
        match self {
            AnyShard::Local(s) => s.shard(),
            AnyShard::Remote(s) => s.shard(),
            AnyShard::Idle(s) => s.d.shard,
        }
    }

    async fn snapshot(&mut self) -> Result<u64, Status> {
        match self {
            AnyShard::Local(s) => ShardStream::snapshot(&mut **s).await,
            AnyShard::Remote(s) => s.snapshot().await,
            AnyShard::Idle(s) => {
                s.d.send(Out::SnapshotDone { seq: 0 }).await?;
                Ok(0)
            }
        }
    }

    async fn head(&mut self) -> Result<u64, Status> {
        match self {
            AnyShard::Local(s) => s.head().await,
            AnyShard::Remote(s) => s.head().await,
            AnyShard::Idle(s) => s.stand_at(0).await,
        }
    }

    async fn follow(self, cursor: u64) -> Result<(), Status> {
        match self {
            AnyShard::Local(s) => ShardStream::follow(*s, cursor).await,
            AnyShard::Remote(s) => (*s).follow(cursor).await,
            // Heard of, so that a resumed token carries it; then nothing
            // but its verified point moving up, until the client goes away.
            AnyShard::Idle(s) => s.follow(cursor).await,
        }
    }
}

/// Where a subscription starts in each shard: at a snapshot (`None`), or
/// after these sequences (a resume token, or this node's heads for
/// `latest`); `None` for a shard: at its head as its holder knows it.
type StartAt = Option<Vec<Option<u64>>>;

/// One subscription over every shard of a view: a task per shard, whose
/// batches are merged into the client's stream in arrival order (a key
/// lives in one shard, so its changes stay in order), each carrying the
/// vector of the shards' positions as its token.
struct FanIn {
    view: String,
    incarnations: Vec<u64>,
    progress_interval: Duration,
    tx: Sender,
}

impl FanIn {
    fn token(&self, cursors: &[Option<u64>]) -> Option<String> {
        let positions: Option<Vec<token::Position>> = cursors
            .iter()
            .zip(&self.incarnations)
            .map(|(c, &incarnation)| c.map(|seq| token::Position { incarnation, seq }))
            .collect();
        positions.map(|p| token::encode(&self.view, &p))
    }

    async fn send(&self, msg: SubscribeResponse) -> Result<(), Status> {
        self.tx
            .send(Ok(msg))
            .await
            .map_err(|_| Status::cancelled("subscriber went away"))
    }

    /// Runs the shards' subscribers until the client goes away or one of
    /// them fails. A snapshot is complete once every shard's is: no change
    /// is sent before that (each shard waits for the others), so the
    /// stream is the view's rows, then one token, then changes.
    async fn run<S: ShardStream>(
        self,
        subscribers: Vec<S>,
        start: StartAt,
        mut rx: mpsc::Receiver<ShardOut>,
    ) -> Result<(), Status> {
        let n = subscribers.len();
        let barrier = Arc::new(tokio::sync::Barrier::new(n));
        let mut tasks = tokio::task::JoinSet::new();
        for mut sub in subscribers {
            let from = start
                .as_ref()
                .map(|s| s.get(sub.shard() as usize).copied().flatten());
            let barrier = barrier.clone();
            tasks.spawn(
                async move {
                    let cursor = match from {
                        Some(Some(c)) => c,
                        Some(None) => sub.head().await?,
                        None => {
                            let c = sub.snapshot().await?;
                            barrier.wait().await;
                            c
                        }
                    };
                    sub.follow(cursor).await
                }
                .in_current_span(),
            );
        }
        let mut cursors: Vec<Option<u64>> = match &start {
            Some(s) => s.clone(),
            None => vec![None; n],
        };
        let mut committed: Vec<u64> = vec![0; n];
        let mut last_progress: Option<Instant> = None;
        loop {
            let ShardOut { shard, out } = tokio::select! {
                msg = rx.recv() => match msg {
                    Some(m) => m,
                    None => return Ok(()),
                },
                done = tasks.join_next() => match done {
                    Some(Ok(Ok(()))) => continue,
                    Some(Ok(Err(status))) => return Err(status),
                    Some(Err(e)) => return Err(Status::internal(format!("subscription task failed: {e}"))),
                    None => return Ok(()),
                },
            };
            let i = shard as usize;
            let tag = |mut changes: Vec<Change>| {
                for c in &mut changes {
                    c.shard = shard;
                }
                changes
            };
            match out {
                Out::Rows(changes) => {
                    self.send(batch(tag(changes), String::new(), true, false))
                        .await?
                }
                Out::SnapshotDone { seq } => {
                    cursors[i] = Some(seq);
                    committed[i] = committed[i].max(seq);
                    if let Some(token) = self.token(&cursors) {
                        self.send(batch(Vec::new(), token, true, true)).await?;
                    }
                }
                Out::Changes { changes, cursor } => {
                    cursors[i] = Some(cursor);
                    committed[i] = committed[i].max(cursor);
                    let token = self.token(&cursors).unwrap_or_default();
                    self.send(batch(tag(changes), token, false, false)).await?;
                }
                Out::Progress {
                    cursor,
                    committed: head,
                } => {
                    cursors[i] = Some(cursor);
                    committed[i] = head;
                    // Every shard says it is alive: the client hears it
                    // about once per interval, not once per shard.
                    if last_progress.is_some_and(|t| t.elapsed() < self.progress_interval / 2) {
                        continue;
                    }
                    let Some(resume_token) = self.token(&cursors) else {
                        continue;
                    };
                    last_progress = Some(Instant::now());
                    self.send(SubscribeResponse {
                        kind: Some(subscribe_response::Kind::Progress(Progress {
                            resume_token,
                            committed_seq: committed.iter().sum(),
                            committed_seqs: committed.clone(),
                            server_time_ms: now_ms(),
                        })),
                    })
                    .await?;
                }
            }
        }
    }
}

/// A subscription's response stream: what the subscription task sends,
/// unless access ended the stream, which then ends at once with that
/// status, dropping what was buffered.
pub struct Guarded {
    rx: ReceiverStream<Result<SubscribeResponse, Status>>,
    end: Option<tokio::sync::oneshot::Receiver<Status>>,
    ended: bool,
}

impl tokio_stream::Stream for Guarded {
    type Item = Result<SubscribeResponse, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::future::Future;
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(end) = self.end.as_mut() {
            match std::pin::Pin::new(end).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    self.end = None;
                    self.ended = true;
                    self.rx.close();
                    return Poll::Ready(Some(Err(status)));
                }
                // The task ended without revocation: nothing more to watch.
                Poll::Ready(Err(_)) => self.end = None,
                Poll::Pending => {}
            }
        }
        std::pin::Pin::new(&mut self.rx).poll_next(cx)
    }
}

/// Where a resume token resumes each shard of a view, or why it cannot.
fn resume_at(
    view: &str,
    t: &str,
    metas: &[ndc_proto::state::ViewMeta],
    remote: &[Option<Vec<String>>],
    read: &[bool],
) -> Result<Vec<u64>, Status> {
    let pos = token::decode(t, view).map_err(|m| refuse(tonic::Code::InvalidArgument, m))?;
    if pos.shards.len() != metas.len() {
        let message = if pos.single_format {
            format!(
                "resume token is from a release before views had shards (one position) and view \
                 {view:?} has {} shards; subscribe again with start=snapshot",
                metas.len()
            )
        } else {
            format!(
                "resume token holds positions in {} shards and view {view:?} has {} (its shards \
                 changed); subscribe again with start=snapshot",
                pos.shards.len(),
                metas.len()
            )
        };
        return Err(refuse(tonic::Code::FailedPrecondition, message));
    }
    let shard = |i: usize| match metas.len() {
        1 => String::new(),
        _ => format!(" (shard {i})"),
    };
    let mut seqs = Vec::with_capacity(metas.len());
    for (i, (p, meta)) in pos.shards.iter().zip(metas).enumerate() {
        // A shard read elsewhere is checked by its holder; one not read
        // (a keyed read's other shards) only for its incarnation.
        let checker = match (remote.get(i), read.get(i)) {
            (Some(Some(_)), _) | (_, Some(false)) => Checker::Server,
            _ => Checker::Reader,
        };
        let what = format!("view {view:?}{}", shard(i));
        if let Some(refused) = resume_refusal(&what, meta, Some(p.incarnation), p.seq, checker) {
            return Err(refused);
        }
        seqs.push(p.seq);
    }
    Ok(seqs)
}

#[tonic::async_trait]
impl Subscription for SubscriptionService {
    type SubscribeStream = Guarded;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = access::caller(&request)?;
        let req = request.into_inner();
        // A view not granted is refused before the node says whether it
        // has it: the caller learns nothing of views it may not read.
        if !caller.may_read(&req.view) {
            let status = self.auth.not_granted(format!(
                "{} ({}) may not read view {:?}",
                caller.principal,
                caller.via.as_str(),
                req.view
            ));
            if status.code() == tonic::Code::PermissionDenied {
                metrics::counter!(metric::ACCESS_REFUSED_STREAMS, "reason" => "view").increment(1);
            }
            return Err(refuse(status.code(), status.message().to_string()));
        }
        let granted_columns = caller
            .grant
            .as_ref()
            .map(|g| g.columns.clone())
            .unwrap_or_default();
        let fields = if granted_columns.is_empty() {
            req.fields.clone()
        } else if req.fields.is_empty() {
            granted_columns.clone()
        } else {
            if let Some(f) = req.fields.iter().find(|f| !granted_columns.contains(f)) {
                metrics::counter!(metric::ACCESS_REFUSED_STREAMS, "reason" => "columns")
                    .increment(1);
                return Err(refuse(
                    tonic::Code::PermissionDenied,
                    format!(
                        "{} may not read field {f:?} of view {:?}",
                        caller.principal, req.view
                    ),
                ));
            }
            req.fields.clone()
        };
        // The error names the view asked for and nothing else: the node's
        // other views are not the caller's to learn from a refusal.
        let Some(shards) = self.views.shards(&req.view) else {
            if self.views.is_closed() {
                return Err(refuse(
                    tonic::Code::Unavailable,
                    "this node is shutting down; resume on another node".into(),
                ));
            }
            if !self.auth.grants.settled() {
                return Err(refuse(
                    tonic::Code::Unavailable,
                    "this node is catching up with the cluster's pipelines; retry, or use another node".into(),
                ));
            }
            return Err(refuse(
                tonic::Code::NotFound,
                format!("view {:?} does not exist here", req.view),
            ));
        };
        let limits = [
            (
                req.keys.len(),
                self.config.max_keys,
                "keys",
                "subscriptions.max_keys",
            ),
            (
                req.fields.len(),
                self.config.max_fields,
                "fields",
                "subscriptions.max_fields",
            ),
        ];
        for (given, limit, what, key) in limits {
            if given > limit {
                return Err(refuse(
                    tonic::Code::InvalidArgument,
                    format!(
                        "a subscription names at most {limit} {what} ({key}); this one names {given}"
                    ),
                ));
            }
        }
        let metas = shards
            .iter()
            .map(|s| self.reader.view_meta(&s.store_name))
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_status)?;
        let mut keys = std::collections::BTreeSet::new();
        for k in &req.keys {
            let key = Key::parse(k).map_err(|e| {
                refuse(
                    tonic::Code::InvalidArgument,
                    format!("key filter {k:?} is not valid JSON: {}", e.message),
                )
            })?;
            keys.insert(key);
        }
        let cols = self.views.key_columns(&req.view);
        if !cols.is_empty() {
            for k in &keys {
                let ok = serde_json::from_str::<serde_json::Map<String, Value>>(k.as_str())
                    .is_ok_and(|m| m.len() == cols.len() && cols.iter().all(|c| m.contains_key(c)));
                if !ok {
                    return Err(refuse(
                        tonic::Code::InvalidArgument,
                        format!(
                            "key filter {k} must be an object with exactly the key columns {cols:?}"
                        ),
                    ));
                }
            }
        }
        // A keyed read of a view split by national ID reads only the keys'
        // shards; the others stand still in its token.
        let keys: Vec<Key> = keys.into_iter().collect();
        // A replica's keys are routed only while every shard's records show
        // them where Kafka's partitioner puts them: a read that leaves shards
        // unread for that ends when it stops, and resumes over every shard.
        let mut routes = self.views.watch_routed_views();
        let route = routes.borrow_and_update().get(&req.view).copied();
        let read = self
            .views
            .shards_of_keys(&req.view, &keys)
            .unwrap_or_else(|| vec![true; shards.len()]);
        let rerouted = (route.is_some() && read.contains(&false)).then(|| {
            let view = req.view.clone();
            async move {
                while routes.changed().await.is_ok() {
                    if routes.borrow_and_update().get(&view).copied() != route {
                        return refuse(
                            tonic::Code::Unavailable,
                            format!(
                                "the keys of view {view:?} are no longer known to sit in their \
                                 shards (a record came from a partition Kafka's partitioner \
                                 does not give its key); resume with the last token, which \
                                 now reads every shard"
                            ),
                        );
                    }
                }
                std::future::pending().await
            }
        });
        // Shards held elsewhere (placement): read from their holders.
        let remote: Vec<Option<Vec<String>>> = shards
            .iter()
            .zip(&read)
            .map(|(s, read)| {
                self.peers
                    .as_ref()
                    .filter(|_| *read)
                    .and_then(|p| p.remote_holders(&s.store_name))
            })
            .collect();
        let start = req.start.unwrap_or(Start::Snapshot(Default::default()));
        let start_at: StartAt = match &start {
            Start::Snapshot(_) => None,
            Start::Latest(_) => Some(
                shards
                    .iter()
                    .zip(&remote)
                    .zip(&read)
                    .map(|((s, r), read)| match read {
                        true => r.is_none().then(|| s.commits.borrow().seq),
                        false => Some(0),
                    })
                    .collect(),
            ),
            Start::ResumeToken(t) => Some(
                resume_at(&req.view, t, &metas, &remote, &read)?
                    .into_iter()
                    .map(Some)
                    .collect(),
            ),
        };
        let stream_slot = self.stream_slot(&caller.principal)?;
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            refuse(
                tonic::Code::ResourceExhausted,
                format!(
                    "this node already serves {} subscriptions (subscriptions.max_subscribers)",
                    self.config.max_subscribers
                ),
            )
        })?;
        let batch_size = match req.max_batch_size {
            0 => self.config.max_batch_size,
            n => n.min(self.config.max_batch_size),
        } as usize;
        let (tx, rx) = mpsc::channel(self.config.buffer_batches);
        let filter = Filter {
            mask: caller
                .grant
                .as_ref()
                .and_then(|g| g.clearance.map(|c| (c, g.masking.clone())))
                .map(|(clearance, policies)| {
                    Arc::new(Masker {
                        levels: self.views.levels(&req.view),
                        clearance,
                        policies,
                        keys: self.hash_keys.clone(),
                    })
                }),
            person: self.views.national_id(&req.view),
            ..Filter::new(
                keys,
                fields,
                caller.grant.as_ref().and_then(|g| g.row_filter.clone()),
            )
        };
        let recipient = Arc::new(Recipient {
            principal: caller.principal.clone(),
            purpose: caller
                .grant
                .as_ref()
                .map(|g| g.purpose.clone())
                .unwrap_or_default(),
            view: req.view.clone(),
        });
        let (shard_tx, shard_rx) = mpsc::channel(self.config.buffer_batches.max(1));
        let key_texts: Vec<String> = req.keys.clone();
        let subscribers: Vec<AnyShard> = shards
            .iter()
            .enumerate()
            .zip(remote)
            .zip(&metas)
            .zip(&read)
            .map(|((((i, shard), remote), meta), read)| {
                let d = Delivery {
                    view: req.view.clone(),
                    shard: i as u32,
                    filter: filter.clone(),
                    out: shard_tx.clone(),
                    recipient: recipient.clone(),
                    audit: self.audit.clone(),
                    views: self.views.clone(),
                    held: None,
                    #[cfg(test)]
                    unmasked: None,
                };
                if !read {
                    let routes = route.map(|_| self.views.watch_key_routes());
                    let every = self.config.progress_interval;
                    return AnyShard::Idle(Box::new(IdleShard { d, routes, every }));
                }
                match (remote, &self.peers) {
                    (Some(holders), Some(peers)) => AnyShard::Remote(Box::new(RemoteShard {
                        d,
                        store_name: shard.store_name.to_string(),
                        holders,
                        peers: peers.clone(),
                        keys: key_texts.clone(),
                        batch_size: batch_size as u32,
                        incarnation: meta.incarnation,
                        stream: None,
                        current: None,
                    })),
                    _ => AnyShard::Local(Box::new(Subscriber {
                        reader: self.reader.clone(),
                        store_name: shard.store_name.clone(),
                        batch_size,
                        progress_interval: self.config.progress_interval,
                        commits: shard.commits.subscribe(),
                        d,
                        handoff: self.peers.clone().map(|peers| Handoff {
                            peers,
                            keys: key_texts.clone(),
                            incarnation: meta.incarnation,
                        }),
                    })),
                }
            })
            .collect();
        drop(shard_tx);
        let fan_in = FanIn {
            view: req.view.clone(),
            incarnations: metas.iter().map(|m| m.incarnation).collect(),
            progress_interval: self.config.progress_interval,
            tx: tx.clone(),
        };
        let view = req.view.clone();
        let span = info_span!("subscription", view = %view, from = ?start_at, principal = %caller.principal);
        let auth = self.auth.clone();
        let (end_tx, end_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(
            async move {
                let _permit = permit;
                let _slot = stream_slot;
                let gauge = metrics::gauge!(metric::SUBSCRIPTIONS, "view" => view.clone());
                gauge.increment(1.0);
                let work = fan_in.run(subscribers, start_at, shard_rx);
                // The stream lasts as long as the grant it was admitted under;
                // when that ends, so does the stream, ahead of anything still
                // buffered for it.
                let rerouted = async move {
                    match rerouted {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                };
                let result = tokio::select! {
                    r = work => r,
                    status = auth.grants.until_revoked(&auth, &caller, &view) => {
                        let _ = end_tx.send(status);
                        Ok(())
                    }
                    status = rerouted => Err(status),
                };
                gauge.decrement(1.0);
                match result {
                    Ok(()) => debug!("subscriber disconnected"),
                    Err(status) if status.code() == tonic::Code::Cancelled => {
                        debug!("subscriber disconnected")
                    }
                    Err(status) => {
                        warn!(error = %status.message(), "subscription ended with an error");
                        let _ = tx.send(Err(status)).await;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Guarded {
            rx: ReceiverStream::new(rx),
            end: Some(end_rx),
            ended: false,
        }))
    }

    async fn list_views(
        &self,
        request: Request<ListViewsRequest>,
    ) -> Result<Response<ListViewsResponse>, Status> {
        let caller = access::caller(&request)?;
        let mut views = Vec::new();
        for name in self.views.names() {
            // Only the views the caller may read.
            let Some(shards) = self.views.shards(&name) else {
                continue;
            };
            if !caller.may_read(&name) {
                continue;
            }
            let mut metas = shards
                .iter()
                .map(|s| self.reader.view_meta(&s.store_name))
                .collect::<Result<Vec<_>, _>>()
                .map_err(store_status)?;
            // Shards held elsewhere: where their holders stand.
            if let Some(peers) = &self.peers {
                for (shard, meta) in shards.iter().zip(metas.iter_mut()) {
                    let Some(holders) = peers.remote_holders(&shard.store_name) else {
                        continue;
                    };
                    let head = peers
                        .head(&holders, &shard.store_name)
                        .await
                        .ok_or_else(|| {
                            Status::unavailable(format!(
                                "no holder of shard {} of view {name:?} answers; retry",
                                shard.store_name
                            ))
                        })?;
                    meta.last_seq = head.last_seq;
                    meta.retained_from_seq = head.retained_from_seq;
                    meta.live_rows = head.live_rows;
                }
            }
            views.push(ViewInfo {
                key_columns: self.views.key_columns(&name),
                committed_seq: metas.iter().map(|m| m.last_seq).sum(),
                retained_from_seq: metas.iter().map(|m| m.retained_from_seq).min().unwrap_or(1),
                live_rows: metas.iter().map(|m| m.live_rows).sum(),
                column_levels: self
                    .views
                    .levels(&name)
                    .iter()
                    .map(|(c, l)| (c.clone(), l.as_str().to_string()))
                    .collect(),
                shards: shards.len() as u32,
                committed_seqs: metas.iter().map(|m| m.last_seq).collect(),
                keyed_reads_routed: self.views.keyed_reads_routed(&name),
                name,
            });
        }
        Ok(Response::new(ListViewsResponse { views }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndc_coordinator::RowFilter;
    use ndc_operators::masking::{self, Level, Policy};
    use proptest::prelude::*;

    const COLUMNS: [&str; 6] = ["id", "name", "born", "phone", "status", "note"];

    fn level() -> impl Strategy<Value = Level> {
        prop_oneof![
            Just(Level::Public),
            Just(Level::Internal),
            Just(Level::Confidential),
            Just(Level::Secret)
        ]
    }

    fn policy() -> impl Strategy<Value = Policy> {
        prop_oneof![
            Just(Policy::Redact),
            Just(Policy::Null),
            Just(Policy::Hash),
            (0usize..5).prop_map(Policy::Partial),
            Just(Policy::Year)
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            "[0-9]{12}".prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
            "[12][0-9]{3}-[01][0-9]-[0-3][0-9]".prop_map(Value::from),
            any::<i32>().prop_map(Value::from),
        ]
    }

    fn row() -> impl Strategy<Value = Option<serde_json::Map<String, Value>>> {
        proptest::option::of(
            proptest::collection::vec(value(), COLUMNS.len()).prop_map(|vals| {
                COLUMNS
                    .iter()
                    .zip(vals)
                    .map(|(c, v)| (c.to_string(), v))
                    .collect()
            }),
        )
    }

    /// The reference: what one field of a row may become for a subscriber.
    fn reference_field(
        name: &str,
        value: &Value,
        levels: &std::collections::BTreeMap<String, Level>,
        clearance: Level,
        policies: &std::collections::BTreeMap<Level, Policy>,
        key: bool,
        keys: &HashKeys,
    ) -> Option<Value> {
        let level = levels.get(name).copied().unwrap_or(Level::Secret);
        if level <= clearance {
            return Some(value.clone());
        }
        let mut p = policies.get(&level).copied().unwrap_or(Policy::Redact);
        if key && matches!(p, Policy::Redact | Policy::Null) {
            p = Policy::Hash;
        }
        masking::mask(value, p, keys)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("NDC_MASKING_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2000)
        ))]
        /// Whatever the classification, grant, policies, operation and
        /// images, every field a subscriber receives, in the key and both
        /// images, is what the reference masking gives: nothing above the
        /// clearance leaves as it is.
        #[test]
        fn every_field_above_the_clearance_is_masked(
            levels in proptest::collection::btree_map(proptest::sample::select(COLUMNS.to_vec()).prop_map(str::to_string), level(), 0..6),
            clearance in level(),
            policies in proptest::collection::btree_map(level(), policy(), 0..4),
            before in row(),
            after in row(),
            op in prop_oneof![Just(Op::Insert), Just(Op::Update), Just(Op::Delete), Just(Op::Read)],
            key_value in value(),
        ) {
            let mut keys = HashKeys::default();
            keys.insert(1, b"property test key");
            let keys = Arc::new(keys);
            let levels = Arc::new(levels);
            let mut filter = Filter::new(Vec::new(), Vec::new(), None);
            filter.mask = Some(Arc::new(Masker {
                levels: levels.clone(),
                clearance,
                policies: policies.clone(),
                keys: keys.clone(),
            }));
            let key = serde_json::json!({"id": key_value});
            let text = |r: &Option<serde_json::Map<String, Value>>| r.as_ref().map(|m| Value::Object(m.clone()).to_string());
            let c = Change {
                op: op as i32,
                key_json: key.to_string(),
                before_json: text(&before),
                after_json: text(&after),
                ..Change::default()
            };
            let out = filter.apply(c, &mut BTreeSet::new()).expect("no row filter: every change goes out");
            let expect = |row: &serde_json::Map<String, Value>, is_key: bool| -> Value {
                Value::Object(row.iter().filter_map(|(n, v)| {
                    reference_field(n, v, &levels, clearance, &policies, is_key, &keys).map(|m| (n.clone(), m))
                }).collect())
            };
            let parsed = |t: &Option<String>| t.as_deref().map(|t| serde_json::from_str::<Value>(t).unwrap());
            prop_assert_eq!(parsed(&out.before_json), before.as_ref().map(|r| expect(r, false)));
            prop_assert_eq!(parsed(&out.after_json), after.as_ref().map(|r| expect(r, false)));
            let key_map = key.as_object().unwrap().clone();
            prop_assert_eq!(serde_json::from_str::<Value>(&out.key_json).unwrap(), expect(&key_map, true));
        }
    }

    fn change(op: Op, before: Option<&str>, after: Option<&str>) -> Change {
        Change {
            seq: 7,
            op: op as i32,
            key_json: r#"{"id":1}"#.into(),
            before_json: before.map(str::to_string),
            after_json: after.map(str::to_string),
            ..Change::default()
        }
    }

    /// Once the node closes its views (it is shutting down), a new
    /// subscription is told to go elsewhere — `UNAVAILABLE`, which clients
    /// retry on the next node — not that the view does not exist.
    #[tokio::test]
    async fn a_closing_node_answers_unavailable_not_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = ndc_operators::Store::open(
            &ndc_operators::StoreConfig::new(dir.path().join("state")),
            &["v".to_string()],
        )
        .unwrap();
        let views = ViewRegistry::default();
        views.insert(
            "v",
            store.view_id("v").unwrap(),
            0,
            Vec::new(),
            Default::default(),
            None,
        );
        let auth = Arc::new(
            Authenticator::new(
                &Default::default(),
                &Default::default(),
                crate::serving::access::Grants::local(dir.path()).unwrap(),
            )
            .unwrap(),
        );
        let service = SubscriptionService::new(
            store.reader(),
            views.clone(),
            Default::default(),
            auth,
            16,
            Arc::new(HashKeys::default()),
            Audit::default(),
        );
        let ask = |view: &str| {
            let mut request = Request::new(SubscribeRequest {
                view: view.into(),
                ..Default::default()
            });
            request.extensions_mut().insert(access::Caller {
                principal: "reader".into(),
                via: access::Via::Anonymous,
                grant: Some(ndc_coordinator::Grant {
                    principal: "reader".into(),
                    role: ndc_coordinator::Role::Subscriber,
                    views: vec!["*".into()],
                    row_filter: None,
                    columns: Vec::new(),
                    purpose: "test".into(),
                    expires_at_ms: None,
                    granted_by: "test".into(),
                    granted_at_ms: 0,
                    clearance: None,
                    masking: Default::default(),
                }),
                token_expires_at_ms: None,
            });
            request
        };
        let code = |r: Result<Response<Guarded>, Status>| r.err().map(|s| s.code());
        assert_eq!(code(service.subscribe(ask("v")).await), None, "served");
        assert_eq!(
            code(service.subscribe(ask("w")).await),
            Some(tonic::Code::NotFound)
        );
        views.close();
        for view in ["v", "w"] {
            let refused = service.subscribe(ask(view)).await.err().expect("refused");
            assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
            assert!(refused.message().contains("shutting down"), "{refused:?}");
        }
    }

    /// A shard scripted for the fan-in: its snapshot (one row, standing at
    /// `at`) waits for `gate` when it has one; its changes are one change
    /// right after the cursor, then nothing until the client goes.
    struct Scripted {
        shard: u32,
        at: u64,
        gate: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
        out: mpsc::Sender<ShardOut>,
    }

    impl ShardStream for Scripted {
        fn shard(&self) -> u32 {
            self.shard
        }

        async fn head(&mut self) -> Result<u64, Status> {
            Ok(self.at)
        }

        fn snapshot(&mut self) -> impl std::future::Future<Output = Result<u64, Status>> + Send {
            let gate = self.gate.lock().unwrap().take();
            async move {
                if let Some(gate) = gate {
                    let _ = gate.await;
                }
                let row = Change {
                    op: Op::Read as i32,
                    key_json: format!("{{\"k\":{}}}", self.shard),
                    ..Change::default()
                };
                for out in [Out::Rows(vec![row]), Out::SnapshotDone { seq: self.at }] {
                    let msg = ShardOut {
                        shard: self.shard,
                        out,
                    };
                    self.out.send(msg).await.unwrap();
                }
                Ok(self.at)
            }
        }

        async fn follow(self, cursor: u64) -> Result<(), Status> {
            let change = Change {
                seq: cursor + 1,
                op: Op::Update as i32,
                ..Change::default()
            };
            let out = Out::Changes {
                changes: vec![change],
                cursor: cursor + 1,
            };
            let _ = self
                .out
                .send(ShardOut {
                    shard: self.shard,
                    out,
                })
                .await;
            self.out.closed().await;
            Ok(())
        }
    }

    /// The fan-in sends no change of any shard before every shard's snapshot
    /// is complete — even when one shard is done long before another — and
    /// then the view's token: the vector of the shards' positions, moved up
    /// shard by shard as their changes go out. Time is paused: waiting
    /// "a second" returns once every task is idle, so a change that could
    /// slip out early would have.
    #[tokio::test(start_paused = true)]
    async fn the_fan_in_sends_no_change_before_every_shard_snapshot_is_complete() {
        let (client_tx, mut client_rx) = mpsc::channel(64);
        let (shard_tx, shard_rx) = mpsc::channel(64);
        let (open, gate) = tokio::sync::oneshot::channel();
        let shards = vec![
            Scripted {
                shard: 0,
                at: 40,
                gate: Mutex::new(None),
                out: shard_tx.clone(),
            },
            Scripted {
                shard: 1,
                at: 9,
                gate: Mutex::new(Some(gate)),
                out: shard_tx,
            },
        ];
        let fan_in = FanIn {
            view: "v".into(),
            incarnations: vec![7, 8],
            progress_interval: Duration::from_secs(3600),
            tx: client_tx,
        };
        let running = tokio::spawn(fan_in.run(shards, None, shard_rx));
        let batch_of = |m: Result<SubscribeResponse, Status>| match m.unwrap().kind {
            Some(subscribe_response::Kind::Batch(b)) => b,
            other => panic!("not a batch: {other:?}"),
        };
        // Shard 0 is done; shard 1 waits: only shard 0's rows went out.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let early = batch_of(client_rx.try_recv().expect("shard 0's rows"));
        assert!(early.snapshot && !early.snapshot_complete);
        assert_eq!(early.changes[0].shard, 0);
        assert!(
            client_rx.try_recv().is_err(),
            "nothing more before shard 1's snapshot is complete"
        );
        open.send(()).unwrap();
        let mut rest = Vec::new();
        while rest.len() < 4 {
            rest.push(batch_of(client_rx.recv().await.expect("a batch")));
        }
        assert!(rest[0].snapshot && rest[0].changes[0].shard == 1);
        assert!(rest[1].snapshot_complete, "{rest:?}");
        let positions = |t: &str| {
            token::decode(t, "v")
                .unwrap()
                .shards
                .iter()
                .map(|p| (p.incarnation, p.seq))
                .collect::<Vec<_>>()
        };
        assert_eq!(positions(&rest[1].resume_token), [(7, 40), (8, 9)]);
        let mut moved: Vec<(u32, Vec<(u64, u64)>)> = rest[2..]
            .iter()
            .map(|b| {
                assert!(!b.snapshot);
                (b.changes[0].shard, positions(&b.resume_token))
            })
            .collect();
        moved.sort();
        // Each change batch moves its own shard's position only (the other
        // shard's is where it was when the batch went out).
        assert_eq!(moved[0].0, 0);
        assert_eq!(moved[0].1[0], (7, 41));
        assert_eq!(moved[1].0, 1);
        assert_eq!(moved[1].1[1], (8, 10));
        drop(client_rx);
        running.abort();
    }

    #[test]
    fn a_row_filter_turns_moves_across_it_into_deletes_and_inserts() {
        let f = Filter::new(
            Vec::new(),
            vec!["id".into()],
            Some(RowFilter {
                column: "p".into(),
                values: vec!["HN".into()],
            }),
        );
        let (hn, hp) = (r#"{"id":1,"p":"HN"}"#, r#"{"id":1,"p":"HP"}"#);
        let out = f
            .apply(change(Op::Update, Some(hn), Some(hp)), &mut BTreeSet::new())
            .unwrap();
        assert_eq!(
            (out.op, out.before_json.as_deref(), out.after_json),
            (Op::Delete as i32, Some(r#"{"id":1}"#), None)
        );
        let into = f
            .apply(change(Op::Update, Some(hp), Some(hn)), &mut BTreeSet::new())
            .unwrap();
        assert_eq!(
            (into.op, into.before_json, into.after_json.as_deref()),
            (Op::Insert as i32, None, Some(r#"{"id":1}"#))
        );
        assert!(
            f.apply(change(Op::Update, Some(hp), Some(hp)), &mut BTreeSet::new())
                .is_none()
        );
        assert!(
            f.apply(change(Op::Insert, None, Some(hp)), &mut BTreeSet::new())
                .is_none()
        );
        assert!(
            f.apply(change(Op::Delete, Some(hp), None), &mut BTreeSet::new())
                .is_none()
        );
        let snapshot = f
            .apply(change(Op::Read, None, Some(hn)), &mut BTreeSet::new())
            .unwrap();
        assert_eq!(snapshot.op, Op::Read as i32);
        // A delete whose old row is unknown goes by key alone.
        let blind = f
            .apply(change(Op::Delete, None, None), &mut BTreeSet::new())
            .unwrap();
        assert_eq!(
            (blind.op, blind.before_json, blind.after_json),
            (Op::Delete as i32, None, None)
        );
        assert!(
            f.apply(change(Op::Truncate, None, None), &mut BTreeSet::new())
                .is_some()
        );
    }

    /// Every delivery path driven itself — a snapshot (whole or keyed) from
    /// RocksDB, live changes from the writer's memory, a resume from the
    /// stored change stream — over generated classifications (top-level
    /// fields and members of object fields), grants, policies, rows and
    /// updates: each field of every key, `before` and `after` image that
    /// leaves is the reference masking of the input. `NDC_PATH_CASES` sets
    /// the number of cases (docs/security.md gives a run of 1,000,000).
    mod paths {
        use super::*;
        use ndc_operators::{Store, StoreConfig};
        use proptest::test_runner::{Config, TestCaseError, TestRunner};
        use std::cell::RefCell;

        const MEMBERS: [&str; 2] = ["a", "b"];
        const PATHS: [DeliveryPath; 5] = [
            DeliveryPath::Snapshot,
            DeliveryPath::Snapshot,
            DeliveryPath::Memory,
            DeliveryPath::Store,
            DeliveryPath::Peer,
        ];

        type Row = serde_json::Map<String, Value>;
        type Levels = std::collections::BTreeMap<String, Level>;
        type Policies = std::collections::BTreeMap<Level, Policy>;

        #[derive(Debug, Clone)]
        struct Case {
            levels: Levels,
            clearance: Level,
            policies: Policies,
            /// Per key: the row inserted, then the row it is updated to.
            rows: Vec<(Row, Row)>,
            path: DeliveryPath,
            keyed: bool,
        }

        fn full_row() -> impl Strategy<Value = Row> {
            (
                proptest::collection::vec(value(), COLUMNS.len()),
                proptest::collection::vec(value(), MEMBERS.len()),
            )
                .prop_map(|(vals, members)| {
                    let mut row: Row = COLUMNS
                        .iter()
                        .zip(vals)
                        .map(|(c, v)| (c.to_string(), v))
                        .collect();
                    let person: Row = MEMBERS
                        .iter()
                        .zip(members)
                        .map(|(m, v)| (m.to_string(), v))
                        .collect();
                    row.insert("person".into(), Value::Object(person));
                    row
                })
        }

        fn names() -> Vec<String> {
            COLUMNS
                .iter()
                .map(|c| c.to_string())
                .chain(MEMBERS.iter().map(|m| format!("person.{m}")))
                .chain(std::iter::once("person".to_string()))
                .collect()
        }

        fn case() -> impl Strategy<Value = Case> {
            (
                proptest::collection::btree_map(proptest::sample::select(names()), level(), 0..9),
                level(),
                proptest::collection::btree_map(level(), policy(), 0..4),
                proptest::collection::vec((full_row(), full_row()), 1..4),
                proptest::sample::select(PATHS.to_vec()),
                any::<bool>(),
            )
                .prop_map(|(levels, clearance, policies, rows, path, keyed)| Case {
                    levels,
                    clearance,
                    policies,
                    rows,
                    path,
                    keyed,
                })
        }

        /// The reference masking of a whole row (an object field whose
        /// members are classified: member by member).
        fn reference(row: &Row, case: &Case, key: bool, keys: &HashKeys) -> Value {
            let field = |name: &str, v: &Value| {
                reference_field(
                    name,
                    v,
                    &case.levels,
                    case.clearance,
                    &case.policies,
                    key,
                    keys,
                )
            };
            let mut out = Row::new();
            for (name, v) in row {
                let prefix = format!("{name}.");
                match v {
                    Value::Object(inner) if case.levels.keys().any(|k| k.starts_with(&prefix)) => {
                        let members = inner
                            .iter()
                            .filter_map(|(m, iv)| {
                                field(&format!("{name}.{m}"), iv).map(|x| (m.clone(), x))
                            })
                            .collect();
                        out.insert(name.clone(), Value::Object(members));
                    }
                    _ => {
                        if let Some(x) = field(name, v) {
                            out.insert(name.clone(), x);
                        }
                    }
                }
            }
            Value::Object(out)
        }

        struct Bench {
            _dir: tempfile::TempDir,
            store: Store,
            view: ndc_operators::ViewId,
            views: ViewRegistry,
            keys: Arc<HashKeys>,
            rt: tokio::runtime::Runtime,
            next_key: u64,
            cases: u64,
        }

        fn bench() -> Bench {
            let dir = tempfile::tempdir().unwrap();
            let mut config = StoreConfig::new(dir.path().join("state"));
            config.sync_commits = false;
            let store = Store::open(&config, &["v".to_string()]).unwrap();
            let view = store.view_id("v").unwrap();
            let mut keys = HashKeys::default();
            keys.insert(1, b"property test key");
            Bench {
                _dir: dir,
                store,
                view,
                views: ViewRegistry::default(),
                keys: Arc::new(keys),
                rt: tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap(),
                next_key: 0,
                cases: 0,
            }
        }

        /// Writes rows as one transaction; returns the view's head after.
        fn write(b: &mut Bench, rows: &[(Key, Option<String>)]) -> u64 {
            let mut txn = b.store.begin(0);
            for (key, row) in rows {
                txn.put_derived(b.view, key, row.clone(), SourcePosition::default())
                    .unwrap();
            }
            txn.commit().unwrap();
            b.store.meta(b.view).map_or(0, |m| m.last_seq)
        }

        /// Runs one case through its path; the changes that left.
        fn deliver(
            b: &mut Bench,
            case: &Case,
            unmasked: Option<DeliveryPath>,
        ) -> (Vec<Key>, Vec<Change>, Vec<Change>) {
            let keys: Vec<Key> = case
                .rows
                .iter()
                .map(|_| {
                    b.next_key += 1;
                    Key::from_value(&serde_json::json!({"id": format!("k{}", b.next_key)}))
                })
                .collect();
            let text = |r: &Row| Value::Object(r.clone()).to_string();
            let head = b.store.meta(b.view).map_or(0, |m| m.last_seq);
            // What the path is given: rows in the store (snapshot, resume)
            // or changes in memory only (live).
            let mut given = Vec::new();
            let mut latest = None;
            match case.path {
                DeliveryPath::Snapshot | DeliveryPath::Store => {
                    let inserts: Vec<_> = keys
                        .iter()
                        .zip(&case.rows)
                        .map(|(k, (r0, _))| (k.clone(), Some(text(r0))))
                        .collect();
                    let updates: Vec<_> = keys
                        .iter()
                        .zip(&case.rows)
                        .map(|(k, (_, r1))| (k.clone(), Some(text(r1))))
                        .collect();
                    write(b, &inserts);
                    write(b, &updates);
                    given = b.store.reader().changes_after("v", head, 1000).unwrap();
                }
                DeliveryPath::Memory | DeliveryPath::Peer => {
                    let mut seq = head;
                    for (op, pick) in [(Op::Insert, 0), (Op::Update, 1)] {
                        for (k, (r0, r1)) in keys.iter().zip(&case.rows) {
                            seq += 1;
                            given.push(Change {
                                seq,
                                op: op as i32,
                                key_json: k.as_str().to_string(),
                                before_json: (pick == 1).then(|| text(r0)),
                                after_json: Some(text(if pick == 1 { r1 } else { r0 })),
                                ..Change::default()
                            });
                        }
                    }
                    if case.path == DeliveryPath::Memory {
                        latest = Some(Arc::<[Change]>::from(given.clone()));
                    }
                }
            }
            let levels = case.levels.clone();
            b.views
                .insert("v", b.view, head, vec!["id".into()], levels, None);
            let mut filter = Filter::new(
                if case.keyed {
                    vec![keys[0].clone()]
                } else {
                    Vec::new()
                },
                Vec::new(),
                None,
            );
            filter.mask = Some(Arc::new(Masker {
                levels: b.views.levels("v"),
                clearance: case.clearance,
                policies: case.policies.clone(),
                keys: b.keys.clone(),
            }));
            let head_after = given.last().map_or(head, |c| c.seq);
            let (commits_tx, commits) = tokio::sync::watch::channel(crate::views::Committed {
                seq: head_after,
                latest,
            });
            // Closed: a follower ends once nothing more can come.
            drop(commits_tx);
            let (tx, mut rx) = mpsc::channel(10_000);
            let sub = Subscriber {
                reader: b.store.reader(),
                store_name: "v".into(),
                batch_size: 2,
                progress_interval: Duration::from_secs(3600),
                commits,
                d: Delivery {
                    view: "v".into(),
                    shard: 0,
                    filter,
                    out: tx,
                    recipient: Arc::new(Recipient {
                        principal: "p".into(),
                        purpose: String::new(),
                        view: "v".into(),
                    }),
                    audit: Audit::default(),
                    views: b.views.clone(),
                    held: None,
                    unmasked,
                },
                handoff: None,
            };
            let from_peer = given.clone();
            let out = b.rt.block_on(async move {
                match case.path {
                    DeliveryPath::Snapshot => {
                        sub.snapshot().await.unwrap();
                        // Its sender goes with it: the batches end.
                        drop(sub);
                    }
                    // What a holder sent: snapshot rows, then changes.
                    DeliveryPath::Peer => {
                        let mut d = sub.d;
                        let (rows, changes) = from_peer.split_at(from_peer.len() / 2);
                        d.deliver_rows(rows.to_vec()).await.unwrap();
                        let cursor = changes.last().map_or(0, |c| c.seq);
                        d.deliver(
                            changes.iter().map(Cow::Borrowed),
                            cursor,
                            DeliveryPath::Peer,
                        )
                        .await
                        .unwrap();
                        d.release().await.unwrap();
                    }
                    _ => {
                        let ended = sub.follow(head).await;
                        assert_eq!(
                            ended.err().map(|e| e.code()),
                            Some(tonic::Code::Unavailable)
                        );
                    }
                }
                let mut out = Vec::new();
                while let Some(ShardOut { out: msg, .. }) = rx.recv().await {
                    if let Out::Rows(changes) | Out::Changes { changes, .. } = msg {
                        out.extend(changes);
                    }
                }
                out
            });
            (keys, given, out)
        }

        fn check(
            b: &mut Bench,
            case: &Case,
            unmasked: Option<DeliveryPath>,
        ) -> Result<(), TestCaseError> {
            let (keys, given, out) = deliver(b, case, unmasked);
            let keys_arc = b.keys.clone();
            let parsed = |t: &Option<String>| -> Option<Row> {
                t.as_deref().map(|t| serde_json::from_str(t).unwrap())
            };
            let masked = |t: &Option<String>, key: bool| {
                parsed(t).map(|r| reference(&r, case, key, &keys_arc))
            };
            let delivered = |t: &Option<String>| parsed(t).map(Value::Object);
            let expected: Vec<Change> = match case.path {
                // The snapshot: each key's last row, in key order.
                DeliveryPath::Snapshot => {
                    let mut last: Vec<(Key, &Row)> = keys
                        .iter()
                        .cloned()
                        .zip(case.rows.iter().map(|(_, r1)| r1))
                        .collect();
                    last.sort_by(|a, b| a.0.cmp(&b.0));
                    last.into_iter()
                        .filter(|(k, _)| !case.keyed || *k == keys[0])
                        .map(|(k, r)| Change {
                            key_json: k.as_str().to_string(),
                            after_json: Some(Value::Object(r.clone()).to_string()),
                            ..Change::default()
                        })
                        .collect()
                }
                _ => given
                    .into_iter()
                    .filter(|c| !case.keyed || c.key_json == keys[0].as_str())
                    .collect(),
            };
            prop_assert_eq!(out.len(), expected.len());
            for (o, e) in out.iter().zip(&expected) {
                let key: Row = serde_json::from_str(&e.key_json).unwrap();
                prop_assert_eq!(
                    serde_json::from_str::<Value>(&o.key_json).unwrap(),
                    reference(&key, case, true, &keys_arc)
                );
                prop_assert_eq!(delivered(&o.after_json), masked(&e.after_json, false));
                prop_assert_eq!(delivered(&o.before_json), masked(&e.before_json, false));
            }
            // Leave the view empty for the next case; a fresh store now and
            // then, or scans wade through ever more deleted rows.
            let gone: Vec<_> = keys.into_iter().map(|k| (k, None)).collect();
            write(b, &gone);
            b.cases += 1;
            if b.cases.is_multiple_of(2000) {
                *b = bench();
            }
            Ok(())
        }

        fn run(
            cases: u32,
            only: Option<DeliveryPath>,
            unmasked: Option<DeliveryPath>,
        ) -> Result<(), String> {
            let bench = RefCell::new(bench());
            let mut runner = TestRunner::new(Config {
                cases,
                failure_persistence: None,
                ..Config::default()
            });
            let strategy = case().prop_map(move |mut c| {
                if let Some(p) = only {
                    c.path = p;
                }
                c
            });
            runner
                .run(&strategy, |case| {
                    check(&mut bench.borrow_mut(), &case, unmasked)
                })
                .map_err(|e| e.to_string())
        }

        #[test]
        fn no_path_delivers_a_field_above_the_clearance_unmasked() {
            let cases = std::env::var("NDC_PATH_CASES")
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(1500);
            run(cases, None, None).unwrap();
        }

        /// The test above is no tautology: with masking switched off on any
        /// one path, it finds the leak.
        #[test]
        fn switching_masking_off_on_any_one_path_is_caught() {
            for path in [
                DeliveryPath::Snapshot,
                DeliveryPath::Memory,
                DeliveryPath::Store,
                DeliveryPath::Peer,
            ] {
                let found = run(300, Some(path), Some(path));
                assert!(found.is_err(), "masking off on {path:?} went unnoticed");
                // And the other paths still pass with it off there.
                run(
                    50,
                    Some(if path == DeliveryPath::Store {
                        DeliveryPath::Memory
                    } else {
                        DeliveryPath::Store
                    }),
                    Some(path),
                )
                .unwrap();
            }
        }
    }
}
