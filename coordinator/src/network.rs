//! Raft RPCs over tonic gRPC: one lazily connected channel per peer.

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
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Creates one [`PeerClient`] per peer.
#[derive(Debug, Clone, Default)]
pub struct Network;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        let channel = crate::peer_channel(&node.addr, Duration::from_millis(500)).ok();
        PeerClient {
            target,
            addr: node.addr.clone(),
            channel,
        }
    }
}

/// Sends Raft RPCs to one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    channel: Option<Channel>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

impl PeerClient {
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
        let Some(channel) = self.channel.clone() else {
            return Err(RPCError::Unreachable(Unreachable::new(&Failure(format!(
                "bad peer address {:?}",
                self.addr
            )))));
        };
        let json =
            serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = RaftClient::new(channel);
        let mut req = Request::new(RaftMessage { json });
        req.set_timeout(option.hard_ttl());
        let reply = match method {
            Method::Append => client.append_entries(req).await,
            Method::Vote => client.vote(req).await,
            Method::Snapshot => client.install_snapshot(req).await,
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
}

fn parse<T: DeserializeOwned>(req: Request<RaftMessage>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().json)
        .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))
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
        let rpc: AppendEntriesRequest<TypeConfig> = parse(req)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<NodeId> = parse(req)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = parse(req)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }
}
