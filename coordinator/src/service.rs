//! The `Cluster` gRPC service: heartbeats and administration. Any node
//! answers; what only the leader knows or can do is forwarded to it once.

use crate::Coordinator;
use ndc_proto::cluster::cluster_client::ClusterClient;
use ndc_proto::cluster::cluster_server::Cluster;
use ndc_proto::cluster::{
    AddNodeRequest, ClusterStatus, HeartbeatReply, HeartbeatRequest, MembershipReply,
    RemoveNodeRequest, StatusRequest,
};
use std::time::Duration;
use tonic::{Request, Response, Status};

/// Metadata key that marks a request one node forwarded to another (the
/// receiver does not forward it again).
pub const FORWARDED: &str = "ndc-forwarded";

/// How long a forwarded cluster admin request may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ClusterService {
    pub(crate) coordinator: Coordinator,
    /// Served on the peer listener (see [`Coordinator::cluster_service`]).
    pub(crate) peer: bool,
}

impl ClusterService {
    /// A client of the leader, unless this node is the leader or the request
    /// was already forwarded once.
    fn leader_client<T>(
        &self,
        req: &Request<T>,
    ) -> Result<Option<ClusterClient<tonic::transport::Channel>>, Status> {
        if self.coordinator.is_leader() {
            return Ok(None);
        }
        if self.peer || req.metadata().get(FORWARDED).is_some() {
            return Err(Status::unavailable(
                "this node is not the leader (request already forwarded once)",
            ));
        }
        let Some((id, addr)) = self.coordinator.current_leader_addr() else {
            return Err(Status::unavailable("no leader elected yet; retry shortly"));
        };
        let channel =
            crate::peer_channel(&addr, Duration::from_secs(2), self.coordinator.peer_tls())
                .map_err(|e| Status::internal(format!("leader {id}: {e}")))?;
        Ok(Some(ClusterClient::new(channel)))
    }

    /// On the peer listener: the caller must be a node of the cluster, and
    /// an admin request must come forwarded (people use the public one).
    fn check_forwarded<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if !self.peer {
            return Ok(());
        }
        if req.metadata().get(FORWARDED).is_none() {
            return Err(Status::permission_denied(
                "the peer listener takes admin requests only as forwarded by another node; \
                 use the node's public gRPC listener",
            ));
        }
        match self.coordinator.peer_tls() {
            Some(tls) => tls.check(req, None),
            None => Ok(()),
        }
    }

    fn membership(&self) -> MembershipReply {
        let applied = self.coordinator.watch().borrow().clone();
        let m = applied.membership.membership();
        MembershipReply {
            voters: m.voter_ids().collect(),
            learners: m.learner_ids().collect(),
        }
    }
}

/// A request as forwarded to the leader, marked [`FORWARDED`].
pub fn forwarded<T>(inner: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(inner);
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r.set_timeout(timeout);
    r
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        if !self.peer {
            return Err(Status::permission_denied(
                "heartbeats are taken on the peer listener only (node.peer_listen)",
            ));
        }
        if let Some(tls) = self.coordinator.peer_tls() {
            tls.check(&req, Some(req.get_ref().node_id))?;
        }
        Ok(Response::new(
            self.coordinator.accept_heartbeat(req.into_inner()),
        ))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<ClusterStatus>, Status> {
        self.check_forwarded(&req)?;
        match self.leader_client(&req) {
            Ok(Some(mut leader)) => match leader
                .status(forwarded(StatusRequest {}, ADMIN_TIMEOUT))
                .await
            {
                Ok(r) => Ok(r),
                // The leader is unreachable: this node's own view is better than nothing.
                Err(_) => Ok(Response::new(self.coordinator.status())),
            },
            Ok(None) | Err(_) => Ok(Response::new(self.coordinator.status())),
        }
    }

    async fn add_node(
        &self,
        req: Request<AddNodeRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        self.check_forwarded(&req)?;
        if let Some(mut leader) = self.leader_client(&req)? {
            return leader
                .add_node(forwarded(req.into_inner(), ADMIN_TIMEOUT))
                .await;
        }
        let r = req.into_inner();
        if r.addr.trim().is_empty() {
            return Err(Status::invalid_argument(
                "addr (host:port of the node's gRPC listener) is required",
            ));
        }
        self.coordinator
            .add_node(r.id, r.addr, r.learner_only)
            .await
            .map_err(|e| Status::failed_precondition(format!("cannot add node {}: {e}", r.id)))?;
        Ok(Response::new(self.membership()))
    }

    async fn remove_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        self.check_forwarded(&req)?;
        if let Some(mut leader) = self.leader_client(&req)? {
            return leader
                .remove_node(forwarded(req.into_inner(), ADMIN_TIMEOUT))
                .await;
        }
        let id = req.into_inner().id;
        let known = self
            .coordinator
            .watch()
            .borrow()
            .membership
            .membership()
            .get_node(&id)
            .is_some();
        if !known {
            return Err(Status::not_found(format!("node {id} is not a member")));
        }
        self.coordinator
            .remove_node(id)
            .await
            .map_err(|e| Status::failed_precondition(format!("cannot remove node {id}: {e}")))?;
        Ok(Response::new(self.membership()))
    }
}
