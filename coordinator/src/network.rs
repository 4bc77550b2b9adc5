//! Raft RPCs over tonic gRPC: one lazily connected channel per peer.

use crate::identity::PeerTls;
use crate::state::NodeId;
use crate::{Member, TypeConfig};
use ndc_proto::cluster::RaftMessage;
use ndc_proto::cluster::raft_client::RaftClient;
use ndc_proto::cluster::raft_server::Raft as RaftRpc;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
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

    async fn call<Req, Resp, E>(
        &mut self,
        method: Method,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
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
        req.set_timeout(option.hard_ttl());
        // `set_timeout` only tells the server; a peer that accepts the
        // connection but never answers (a frozen process, whose kernel still
        // completes TCP handshakes) is timed out here.
        let call = async {
            match method {
                Method::Append => client.append_entries(req).await,
                Method::Vote => client.vote(req).await,
                Method::Snapshot => client.install_snapshot(req).await,
            }
        };
        let Ok(reply) = tokio::time::timeout(option.hard_ttl(), call).await else {
            return Err(RPCError::Unreachable(Unreachable::new(&Failure(format!(
                "{}: no answer within {:?}",
                self.addr,
                option.hard_ttl()
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
        let result: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&reply.json)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

enum Method {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(Method::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Method::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(Method::Vote, &rpc, &option).await
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

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = self
            .parse(req, |r: &AppendEntriesRequest<TypeConfig>| {
                r.vote.leader_id().voted_for()
            })?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<NodeId> = self.parse(req, |r: &VoteRequest<NodeId>| {
            r.vote.leader_id().voted_for()
        })?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = self
            .parse(req, |r: &InstallSnapshotRequest<TypeConfig>| {
                r.vote.leader_id().voted_for()
            })?;
        reply(&self.raft.install_snapshot(rpc).await)
    }
}
