//! Shards across nodes. With placement (`cluster.replication_factor`), a
//! node holds only some shards of a view; a subscriber may still connect to
//! any node. The serving node reads the shards it does not hold from their
//! holders over the peer listener ([`ShardService`], one stream per shard,
//! raw: the holder neither masks nor audits) and treats each as one more
//! shard of its fan-in ([`RemoteShard`]): it filters, masks and audits as
//! for its own. Sequence numbers of a shard are the same on every holder
//! (they come from its change log), so when a holder is lost mid-stream the
//! serving node resumes from the shard's cursor on another holder: no gap,
//! no duplicate.

use super::subscriptions::{Checker, Delivery, DeliveryPath, Out, ShardStream, resume_refusal};
use crate::client::ClientTls;
use crate::telemetry::metric;
use crate::views::ViewRegistry;
use ndc_coordinator::Coordinator;
use ndc_operators::StoreReader;
use ndc_proto::cluster::follow_shard_request::Start;
use ndc_proto::cluster::follow_shard_response::Kind;
use ndc_proto::cluster::shards_client::ShardsClient;
use ndc_proto::cluster::shards_server::Shards;
use ndc_proto::cluster::{
    FollowShardRequest, FollowShardResponse, ShardChanges, ShardHead, ShardHeadRequest,
    ShardProgress,
};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

/// How long a serving node keeps trying the holders of a shard whose
/// stream broke before it ends the subscription (`UNAVAILABLE`; the
/// client resumes with its token).
const REROUTE_WINDOW: Duration = Duration::from_secs(10);

/// How often a holder streaming a shard to this node says where it stands
/// when it has nothing else to send.
const PEER_PROGRESS: Duration = Duration::from_millis(500);

/// A holder silent this long (six of its progress intervals) is given up
/// on, and the shard read from another: a frozen holder (SIGSTOP, a stuck
/// VM) keeps its TCP connection open, which HTTP/2 keep-alive notices only
/// after about 10 s.
const PEER_SILENCE: Duration = Duration::from_secs(3);

/// Where the shards this node does not hold are read from.
#[derive(Clone)]
pub struct PeerShards {
    coordinator: Coordinator,
    tls: ClientTls,
    /// Which shard each served shard follows in placement.
    views: ViewRegistry,
    /// One HTTP/2 connection per holder, shared by every shard stream to
    /// it (a channel reconnects by itself when its holder comes back).
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl PeerShards {
    pub fn new(coordinator: Coordinator, tls: ClientTls, views: ViewRegistry) -> Self {
        PeerShards {
            coordinator,
            tls,
            views,
            channels: Arc::default(),
        }
    }

    /// The connection to the holder at `addr`.
    async fn channel(&self, addr: &str) -> anyhow::Result<Channel> {
        let cached = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(addr)
            .cloned();
        if let Some(c) = cached {
            return Ok(c);
        }
        let c = crate::client::channel(addr, Some(&self.tls)).await?;
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Forgets the connection to a holder that failed (the next stream
    /// connects anew).
    fn forget(&self, addr: &str) {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(addr);
    }

    /// The peer addresses of `shard`'s holders, owner first, if this node
    /// does not hold it; `None` when it does (or nothing is placed).
    pub fn remote_holders(&self, shard: &str) -> Option<Vec<String>> {
        let me = self.coordinator.node_id();
        let placed = self.views.placed_as(shard);
        if self.coordinator.watch().borrow().cluster.holds(me, &placed) {
            return None;
        }
        Some(self.holder_addrs(shard))
    }

    /// Where a shard held elsewhere stands: the first of its holders to
    /// answer (each within 2 s); `None` if none does.
    pub async fn head(&self, holders: &[String], shard: &str) -> Option<ShardHead> {
        for addr in holders {
            let asked = async {
                let channel = self.channel(addr).await.ok()?;
                ShardsClient::new(channel)
                    .head(ShardHeadRequest {
                        shard: shard.to_string(),
                    })
                    .await
                    .ok()
                    .map(Response::into_inner)
            };
            if let Ok(Some(head)) = tokio::time::timeout(Duration::from_secs(2), asked).await {
                return Some(head);
            }
        }
        None
    }
    /// The peer addresses of every holder of `shard`, owner first (this
    /// node's own too: a read that goes on from the holders may find it is
    /// one again). Empty when the shard is not placed.
    pub fn holder_addrs(&self, shard: &str) -> Vec<String> {
        let placed = self.views.placed_as(shard);
        let holders = self
            .coordinator
            .watch()
            .borrow()
            .cluster
            .holders_of(&placed)
            .map(<[u64]>::to_vec)
            .unwrap_or_default();
        holders
            .into_iter()
            .filter_map(|id| self.coordinator.member_addr(id))
            .collect()
    }

    /// Resolves once placement takes `shard` from this node.
    pub async fn lost(&self, shard: &str) {
        let placed = self.views.placed_as(shard);
        if !until_not_held(&self.coordinator, &placed).await {
            // The node is stopping: the read ends with it.
            std::future::pending::<()>().await;
        }
    }
}

/// Waits until placement takes `shard` from this node (`true`), or the node
/// stops (`false`).
async fn until_not_held(coordinator: &Coordinator, shard: &str) -> bool {
    let me = coordinator.node_id();
    let mut placement = coordinator.watch();
    loop {
        if !placement.borrow_and_update().cluster.holds(me, shard) {
            return true;
        }
        if placement.changed().await.is_err() {
            return false;
        }
    }
}

/// The holder's side: streams one shard of its store, raw.
pub struct ShardService {
    reader: StoreReader,
    views: ViewRegistry,
    coordinator: Coordinator,
    progress_interval: Duration,
    max_batch_size: u32,
}

impl ShardService {
    pub fn new(
        reader: StoreReader,
        views: ViewRegistry,
        coordinator: Coordinator,
        config: &crate::config::SubscriptionSection,
    ) -> Self {
        ShardService {
            reader,
            views,
            coordinator,
            progress_interval: config.progress_interval,
            max_batch_size: config.max_batch_size,
        }
    }

    /// Refuses a shard this node does not hold: a node that held it once
    /// has its rows as they were, not as they are.
    fn check_holder(&self, shard: &str) -> Result<(), Status> {
        let me = self.coordinator.node_id();
        let placed = self.views.placed_as(shard);
        if self.coordinator.watch().borrow().cluster.holds(me, &placed) {
            Ok(())
        } else {
            Err(Status::unavailable(format!(
                "node {me} does not hold shard {shard} (placement moved it)"
            )))
        }
    }
}

fn to_wire(out: Out) -> FollowShardResponse {
    let kind = match out {
        Out::Rows(changes) => Kind::Rows(ShardChanges { changes, cursor: 0 }),
        Out::SnapshotDone { seq } => Kind::SnapshotDone(seq),
        Out::Changes { changes, cursor } => Kind::Changes(ShardChanges { changes, cursor }),
        Out::Progress { cursor, committed } => Kind::Progress(ShardProgress { cursor, committed }),
    };
    FollowShardResponse { kind: Some(kind) }
}

#[tonic::async_trait]
impl Shards for ShardService {
    type FollowStream = ReceiverStream<Result<FollowShardResponse, Status>>;

    async fn head(
        &self,
        request: Request<ShardHeadRequest>,
    ) -> Result<Response<ShardHead>, Status> {
        let shard = request.into_inner().shard;
        self.check_holder(&shard)?;
        let meta = self
            .reader
            .view_meta(&shard)
            .map_err(|e| Status::not_found(e.to_string()))?;
        Ok(Response::new(ShardHead {
            last_seq: meta.last_seq,
            retained_from_seq: meta.retained_from_seq,
            live_rows: meta.live_rows,
        }))
    }

    async fn follow(
        &self,
        request: Request<FollowShardRequest>,
    ) -> Result<Response<Self::FollowStream>, Status> {
        let req = request.into_inner();
        self.check_holder(&req.shard)?;
        let view = ndc_operators::shard::parse_store_name(&req.shard)
            .map_or(req.shard.as_str(), |(v, _)| v)
            .to_string();
        let shard = self
            .views
            .shards(&view)
            .and_then(|s| s.iter().find(|s| *s.store_name == *req.shard).cloned())
            .ok_or_else(|| Status::not_found(format!("shard {} is not served here", req.shard)))?;
        let meta = self
            .reader
            .view_meta(&shard.store_name)
            .map_err(|e| Status::internal(e.to_string()))?;
        // The incarnation for every start; a resume's position too.
        let (seq, checker) = match req.start {
            Some(Start::After(seq)) => (seq, Checker::Holder),
            _ => (0, Checker::Server),
        };
        if let Some(refused) = resume_refusal(
            &format!("shard {}", req.shard),
            &meta,
            (req.incarnation != 0).then_some(req.incarnation),
            seq,
            checker,
        ) {
            return Err(refused);
        }
        let keys = req
            .keys
            .iter()
            .map(|k| ndc_operators::Key::parse(k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(format!("key filter: {}", e.message)))?;
        let (shard_tx, mut shard_rx) = mpsc::channel(4);
        let sub = super::subscriptions::raw_subscriber(
            self.reader.clone(),
            &view,
            shard.clone(),
            keys,
            match req.batch_size {
                0 => self.max_batch_size,
                n => n.min(self.max_batch_size),
            } as usize,
            match req.progress_ms {
                0 => self.progress_interval,
                ms => Duration::from_millis(u64::from(ms.max(50))),
            },
            self.views.clone(),
            shard_tx,
        );
        let (tx, rx) = mpsc::channel(4);
        let start = req.start.unwrap_or(Start::Snapshot(true));
        let forward = tx.clone();
        // The stream ends when placement takes the shard from this node:
        // from then on its copy falls behind, silently.
        let coordinator = self.coordinator.clone();
        let name = req.shard.clone();
        let placed = self.views.placed_as(&name);
        let moved = async move {
            if until_not_held(&coordinator, &placed).await {
                Status::unavailable(format!(
                    "node {} no longer holds shard {name}; resume on a holder",
                    coordinator.node_id()
                ))
            } else {
                Status::unavailable("node is shutting down")
            }
        };
        tokio::spawn(async move {
            let gauge = metrics::gauge!(metric::SHARDS_SERVED);
            gauge.increment(1.0);
            let work = async {
                let cursor = match start {
                    Start::Snapshot(_) => sub.snapshot().await?,
                    Start::After(seq) => seq,
                    Start::Latest(_) => {
                        let seq = sub.commits.borrow().seq;
                        let started = FollowShardResponse {
                            kind: Some(Kind::StartedAt(seq)),
                        };
                        if tx.send(Ok(started)).await.is_err() {
                            return Ok(());
                        }
                        seq
                    }
                };
                sub.follow(cursor).await.map(|_| ())
            };
            let pump = async {
                while let Some(out) = shard_rx.recv().await {
                    if forward.send(Ok(to_wire(out.out))).await.is_err() {
                        break;
                    }
                }
            };
            // The pump ends when the subscriber is done or the caller went.
            let result = tokio::select! {
                r = work => r,
                () = pump => Ok(()),
                status = moved => Err(status),
            };
            if let Err(status) = result {
                let _ = tx.send(Err(status)).await;
            }
            gauge.decrement(1.0);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A shard of a subscription read from its holders.
pub(super) struct RemoteShard {
    pub(super) d: Delivery,
    pub(super) store_name: String,
    pub(super) holders: Vec<String>,
    pub(super) peers: PeerShards,
    pub(super) keys: Vec<String>,
    pub(super) batch_size: u32,
    pub(super) incarnation: u64,
    pub(super) stream: Option<Streaming<FollowShardResponse>>,
    /// The holder read from now.
    pub(super) current: Option<String>,
}

/// Whether a holder's refusal is final for the subscription (else another
/// holder is tried).
fn is_final(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::OutOfRange
            | tonic::Code::FailedPrecondition
            | tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::PermissionDenied
    )
}

impl RemoteShard {
    /// Opens the shard's stream on the first holder that answers (the
    /// owner first), trying again for [`REROUTE_WINDOW`] with placement
    /// looked up anew each round (a holder lost is replaced by a standby).
    async fn open(&mut self, start: Start) -> Result<Streaming<FollowShardResponse>, Status> {
        let until = Instant::now() + REROUTE_WINDOW;
        let mut last = String::from("no holder known");
        let mut pause = Duration::from_millis(50);
        loop {
            for addr in self.holders.clone() {
                let request = FollowShardRequest {
                    shard: self.store_name.clone(),
                    start: Some(start),
                    keys: self.keys.clone(),
                    batch_size: self.batch_size,
                    incarnation: self.incarnation,
                    progress_ms: PEER_PROGRESS.as_millis() as u32,
                };
                let opened = async {
                    let channel = self
                        .peers
                        .channel(&addr)
                        .await
                        .map_err(|e| Status::unavailable(format!("{addr}: {e:#}")))?;
                    ShardsClient::new(channel)
                        .max_decoding_message_size(64 << 20)
                        .follow(request)
                        .await
                        .map(Response::into_inner)
                };
                match opened.await {
                    Ok(stream) => {
                        self.current = Some(addr);
                        metrics::counter!(metric::REMOTE_SHARDS, "outcome" => "opened")
                            .increment(1);
                        return Ok(stream);
                    }
                    Err(status) if is_final(&status) => return Err(status),
                    Err(status) => {
                        self.peers.forget(&addr);
                        last = format!("{addr}: {}", status.message());
                    }
                }
            }
            if Instant::now() >= until || self.d.out.is_closed() {
                return Err(Status::unavailable(format!(
                    "no holder of shard {} answers ({last}); resume with your token",
                    self.store_name
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            self.refresh_holders();
        }
    }

    /// Placement anew (this node's own peer listener too, if it holds the
    /// shard now: the sequences are the same everywhere); the holder just
    /// lost, if any, is tried last, on a new connection.
    fn refresh_holders(&mut self) {
        let now = self.peers.holder_addrs(&self.store_name);
        if !now.is_empty() {
            self.holders = now;
        }
        if let Some(lost) = self.current.take() {
            self.peers.forget(&lost);
            if let Some(i) = self.holders.iter().position(|a| *a == lost) {
                let a = self.holders.remove(i);
                self.holders.push(a);
            }
        }
    }
}

impl ShardStream for RemoteShard {
    fn shard(&self) -> u32 {
        self.d.shard
    }

    async fn snapshot(&mut self) -> Result<u64, Status> {
        let mut stream = self.open(Start::Snapshot(true)).await?;
        loop {
            let msg = stream.message().await.map_err(|s| {
                Status::unavailable(format!(
                    "the holder of shard {} was lost during the snapshot ({}); subscribe again",
                    self.store_name,
                    s.message()
                ))
            })?;
            match msg.and_then(|m| m.kind) {
                Some(Kind::Rows(rows)) => self.d.deliver_rows(rows.changes).await?,
                Some(Kind::SnapshotDone(seq)) => {
                    self.d.release().await?;
                    self.d.send(Out::SnapshotDone { seq }).await?;
                    self.stream = Some(stream);
                    return Ok(seq);
                }
                Some(_) => {}
                None => {
                    return Err(Status::unavailable(format!(
                        "the holder of shard {} ended the stream during the snapshot; subscribe again",
                        self.store_name
                    )));
                }
            }
        }
    }

    async fn head(&mut self) -> Result<u64, Status> {
        let mut stream = self.open(Start::Latest(true)).await?;
        loop {
            match stream.message().await?.and_then(|m| m.kind) {
                Some(Kind::StartedAt(seq)) => {
                    self.d
                        .send(Out::Progress {
                            cursor: seq,
                            committed: seq,
                        })
                        .await?;
                    self.stream = Some(stream);
                    return Ok(seq);
                }
                Some(_) => {}
                None => {
                    return Err(Status::unavailable(format!(
                        "the holder of shard {} ended the stream; subscribe again",
                        self.store_name
                    )));
                }
            }
        }
    }

    async fn follow(mut self, mut cursor: u64) -> Result<(), Status> {
        loop {
            let mut stream = match self.stream.take() {
                Some(s) => s,
                None => self.open(Start::After(cursor)).await?,
            };
            let broke = loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    () = self.d.out.closed() => return Ok(()),
                    () = tokio::time::sleep(PEER_SILENCE) => {
                        metrics::counter!(metric::REMOTE_SHARDS, "outcome" => "silent").increment(1);
                        break format!("the holder was silent for {PEER_SILENCE:?}");
                    }
                };
                match msg {
                    Ok(Some(FollowShardResponse { kind: Some(kind) })) => match kind {
                        Kind::Changes(c) => {
                            cursor = c.cursor;
                            self.d
                                .deliver(
                                    c.changes.iter().map(Cow::Borrowed),
                                    c.cursor,
                                    DeliveryPath::Peer,
                                )
                                .await?;
                            self.d.release().await?;
                        }
                        Kind::Progress(p) => {
                            cursor = cursor.max(p.cursor);
                            self.d
                                .send(Out::Progress {
                                    cursor,
                                    committed: p.committed,
                                })
                                .await?;
                        }
                        Kind::Rows(_) | Kind::SnapshotDone(_) | Kind::StartedAt(_) => {}
                    },
                    Ok(Some(FollowShardResponse { kind: None })) => {}
                    Ok(None) => break "the holder ended the stream".to_string(),
                    Err(status) if is_final(&status) => return Err(status),
                    Err(status) => break status.message().to_string(),
                }
            };
            if self.d.out.is_closed() {
                return Ok(());
            }
            metrics::counter!(metric::REMOTE_SHARDS, "outcome" => "rerouted").increment(1);
            warn!(shard = %self.store_name, cursor, reason = %broke,
                  "lost the holder of a shard mid-stream; resuming from its cursor on another");
            self.refresh_holders();
            info!(shard = %self.store_name, holders = ?self.holders, "shard holders now");
        }
    }
}
