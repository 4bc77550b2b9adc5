//! Raft RPCs over tonic gRPC: one lazily connected channel per peer.

use crate::identity::PeerTls;
use crate::state::NodeId;
use crate::{Member, TypeConfig};
use ndc_proto::cluster::RaftMessage;
use ndc_proto::cluster::raft_client::RaftClient;
use ndc_proto::cluster::raft_server::Raft as RaftRpc;
use openraft::alias::{SnapshotOf, VoteOf};
use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::storage::SnapshotMeta;
use openraft::vote::RaftLeaderId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::io::Cursor;
use std::time::{Duration, Instant, SystemTime};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Creates one [`PeerClient`] per peer.
#[derive(Debug, Clone, Default)]
pub struct Network {
    pub(crate) tls: Option<PeerTls>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        let mut client = PeerClient {
            target,
            addr: node.addr.clone(),
            tls: self.tls.clone(),
            channel: Err(String::new()),
            stamps: Vec::new(),
            checked: Instant::now(),
        };
        client.connect();
        client
    }
}

/// Sends Raft RPCs to one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    tls: Option<PeerTls>,
    channel: Result<Channel, String>,
    /// When the TLS files were last modified, as of the channel's making:
    /// a rotated certificate makes a new channel.
    stamps: Vec<Option<SystemTime>>,
    checked: Instant,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

impl PeerClient {
    fn connect(&mut self) {
        self.stamps = self.tls.as_ref().map(PeerTls::stamps).unwrap_or_default();
        self.channel =
            crate::peer_channel(&self.addr, Duration::from_millis(500), self.tls.as_ref());
    }

    /// Makes a new channel when the TLS files changed (checked every few
    /// seconds) or the last attempt failed.
    fn refresh(&mut self) {
        let Some(tls) = &self.tls else { return };
        if self.channel.is_ok() && self.checked.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.checked = Instant::now();
        if self.channel.is_err() || tls.stamps() != self.stamps {
            self.connect();
        }
    }

    /// One RPC. The remote answers `Result<Resp, RaftError>`; its error
    /// (its Raft stopped) is reported as a network error, text only: error
    /// bodies differ between openraft versions.
    async fn call<Req, Resp>(
        &mut self,
        method: Method,
        request: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        self.refresh();
        let channel = match &self.channel {
            Ok(c) => c.clone(),
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(&Failure(format!(
                    "{}: {e}",
                    self.addr
                )))));
            }
        };
        let json =
            serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = RaftClient::new(channel);
        let mut req = Request::new(RaftMessage { json });
        req.set_timeout(ttl);
        // `set_timeout` only tells the server; a peer that accepts the
        // connection but never answers (a frozen process, whose kernel still
        // completes TCP handshakes) is timed out here.
        let call = async {
            match method {
                Method::Append => client.append_entries(req).await,
                Method::Vote => client.vote(req).await,
                Method::Snapshot => client.install_full_snapshot(req).await,
                Method::TransferLeader => client.transfer_leader(req).await,
            }
        };
        let Ok(reply) = tokio::time::timeout(ttl, call).await else {
            return Err(RPCError::Unreachable(Unreachable::new(&Failure(format!(
                "{}: no answer within {ttl:?}",
                self.addr,
            )))));
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&Failure(format!(
                    "{}: {}",
                    self.addr,
                    status.message()
                )))));
            }
            Err(status) => {
                return Err(RPCError::Network(NetworkError::new(&Failure(format!(
                    "{}: {status}",
                    self.addr
                )))));
            }
        };
        let result: Result<Resp, serde_json::Value> = serde_json::from_slice(&reply.json)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            RPCError::Network(NetworkError::new(&Failure(format!(
                "node {} ({}) failed: {e}",
                self.target, self.addr
            ))))
        })
    }
}

enum Method {
    Append,
    Vote,
    Snapshot,
    TransferLeader,
}

/// A whole snapshot as sent to a follower.
#[derive(Serialize, Deserialize)]
struct FullSnapshot {
    vote: VoteOf<TypeConfig>,
    meta: SnapshotMeta<openraft::alias::CommittedLeaderIdOf<TypeConfig>, NodeId, Member>,
    data: Vec<u8>,
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Method::Append, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Method::Vote, &rpc, option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, Cursor<Vec<u8>>>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let request = FullSnapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot.into_inner(),
        };
        let send = self.call(Method::Snapshot, &request, option.hard_ttl());
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            reply = send => reply.map_err(|e| match e {
                RPCError::Timeout(t) => StreamingError::Timeout(t),
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                RPCError::Network(n) => StreamingError::Network(n),
                RPCError::RemoteError(r) => StreamingError::Network(NetworkError::new(&r)),
            }),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Method::TransferLeader, &req, option.hard_ttl())
            .await
    }
}

/// Server side of the Raft RPCs: hands them to the local Raft instance.
#[derive(Clone)]
pub struct RaftService {
    pub(crate) raft: crate::Raft,
    /// With TLS, the sender's certificate must name the node the message
    /// says it is from (the candidate of a vote, the leader of the rest).
    pub(crate) tls: Option<PeerTls>,
}

impl RaftService {
    fn parse<T: DeserializeOwned>(
        &self,
        req: Request<RaftMessage>,
        sender: impl FnOnce(&T) -> Option<NodeId>,
    ) -> Result<T, Status> {
        let rpc: T = serde_json::from_slice(&req.get_ref().json)
            .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))?;
        if let Some(tls) = &self.tls {
            let claimed = sender(&rpc)
                .ok_or_else(|| Status::permission_denied("a raft message that names no sender"))?;
            tls.check(&req, Some(claimed))?;
        }
        Ok(rpc)
    }
}

fn reply<T: Serialize>(result: &T) -> Result<Response<RaftMessage>, Status> {
    let json = serde_json::to_vec(result).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftMessage { json }))
}

fn fatal_reply<T: Serialize>(
    result: Result<T, Fatal<TypeConfig>>,
) -> Result<Response<RaftMessage>, Status> {
    reply(&result.map_err(RaftError::<TypeConfig>::Fatal))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = self
            .parse(req, |r: &AppendEntriesRequest<TypeConfig>| {
                Some(*r.vote.leader_id().node_id())
            })?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<TypeConfig> = self.parse(req, |r: &VoteRequest<TypeConfig>| {
            Some(*r.vote.leader_id().node_id())
        })?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        _req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        Err(Status::failed_precondition(
            "chunked Raft snapshots (ndc built with openraft 0.9) are not accepted: \
             upgrade the leader, it then sends whole snapshots",
        ))
    }

    async fn install_full_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: FullSnapshot =
            self.parse(req, |r: &FullSnapshot| Some(*r.vote.leader_id().node_id()))?;
        let snapshot = openraft::Snapshot {
            meta: rpc.meta,
            snapshot: Cursor::new(rpc.data),
        };
        fatal_reply(self.raft.install_full_snapshot(rpc.vote, snapshot).await)
    }

    async fn transfer_leader(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: TransferLeaderRequest<TypeConfig> = self
            .parse(req, |r: &TransferLeaderRequest<TypeConfig>| {
                Some(*r.from_leader().leader_id().node_id())
            })?;
        fatal_reply(self.raft.handle_transfer_leader(rpc).await)
    }
}
