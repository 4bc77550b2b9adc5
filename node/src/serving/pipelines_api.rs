//! Admin API of pipeline specs (`ndc.v1.Pipelines`): the server side over a
//! node's [`Runtime`], and the client calls behind `ndc pipeline`.

use crate::client::ClientTls;
use crate::pipelines::runtime::{ApplyError, Runtime};
use crate::pipelines::spec::PipelineSpec;
use crate::telemetry::metric;
use ndc_coordinator::{Command, Coordinator};
use ndc_proto::v1::pipelines_client::PipelinesClient;
use ndc_proto::v1::pipelines_server::Pipelines;
use ndc_proto::v1::{
    ApplyPipelineRequest, ApplyPipelineResponse, DropPipelineRequest, DropPipelineResponse,
    ListPipelinesRequest, ListPipelinesResponse, PipelineInfo,
};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};
use tracing::{Instrument, error, info, info_span, warn};

pub struct PipelineService {
    runtime: Arc<tokio::sync::Mutex<Runtime>>,
    /// Cluster mode: specs are replicated through the leader.
    coordinator: Option<Coordinator>,
    /// How this node reaches the leader's peer listener to forward.
    peer_tls: ClientTls,
    audit: crate::serving::audit::Audit,
}

impl PipelineService {
    pub fn new(
        runtime: Arc<tokio::sync::Mutex<Runtime>>,
        coordinator: Option<Coordinator>,
        peer_tls: ClientTls,
        audit: crate::serving::audit::Audit,
    ) -> Self {
        PipelineService {
            runtime,
            coordinator,
            peer_tls,
            audit,
        }
    }

    /// Records a pipeline change on the node it was asked of.
    async fn audit(
        &self,
        forwarded: bool,
        event: crate::serving::audit::Event,
    ) -> Result<(), Status> {
        if forwarded {
            return Ok(());
        }
        self.audit.record(event).await.map_err(|e| {
            Status::internal(format!(
                "done, but not recorded in the audit trail: {e}; the node's operators must look at it"
            ))
        })
    }

    /// Cluster mode: validates against the replicated specs, replicates the
    /// spec through the leader (forwarding the request when this node is
    /// not the leader), and answers once this node runs it.
    async fn apply_in_cluster(
        &self,
        coordinator: &Coordinator,
        req: ApplyPipelineRequest,
    ) -> Result<ApplyPipelineResponse, Status> {
        let replicated = coordinator.watch().borrow().cluster.specs.clone();
        let (applied, stored) = self
            .runtime
            .lock()
            .await
            .plan_cluster(&req.spec_yaml, &replicated)
            .map_err(status)?;
        let response = ApplyPipelineResponse {
            name: applied.name.clone(),
            version: applied.version,
            outcome: if req.dry_run {
                "valid"
            } else {
                applied.outcome
            }
            .to_string(),
            views: applied.views.clone(),
            reset: applied.reset.clone(),
        };
        let Some(stored) = stored.filter(|_| !req.dry_run) else {
            return Ok(response);
        };
        let command = Command::PutSpec {
            name: applied.name.clone(),
            spec: stored,
            previous: replicated.get(&applied.name).map(|s| s.version),
        };
        match coordinator.propose(command).await {
            Ok(reply) => {
                if let Some(why) = reply.refused {
                    return Err(Status::aborted(format!("{why}; apply again")));
                }
            }
            Err(ndc_coordinator::Error::NotLeader {
                leader: Some((leader, addr)),
            }) if leader != coordinator.node_id() => {
                // The leader validates again against the latest state.
                let forwarded = peer_client(&addr, &self.peer_tls)
                    .await
                    .map_err(|e| {
                        Status::unavailable(format!("cannot reach the leader at {addr}: {e}"))
                    })?
                    .apply(ndc_coordinator::forwarded(req, Duration::from_secs(60)))
                    .await?
                    .into_inner();
                self.wait_until_running(&forwarded.name, Some(forwarded.version))
                    .await?;
                return Ok(forwarded);
            }
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "cannot replicate the spec: {e}"
                )));
            }
        }
        self.wait_until_running(&applied.name, Some(applied.version))
            .await?;
        metrics::counter!(metric::PIPELINE_APPLIES, "outcome" => "applied").increment(1);
        Ok(response)
    }

    /// Waits until this node runs `version` of pipeline `name` (`None`: no
    /// longer runs it).
    async fn wait_until_running(&self, name: &str, version: Option<u64>) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let running = self
                .runtime
                .lock()
                .await
                .specs()
                .get(name)
                .map(|s| s.version);
            let done = match version {
                Some(v) => running.is_some_and(|r| r >= v),
                None => running.is_none(),
            };
            if done {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(
                    "replicated, but this node does not run it yet; see ndc pipeline list",
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn drop_in_cluster(
        &self,
        coordinator: &Coordinator,
        name: String,
    ) -> Result<Vec<String>, Status> {
        let views = {
            let stored = coordinator
                .watch()
                .borrow()
                .cluster
                .specs
                .get(&name)
                .cloned();
            match stored.map(|s| PipelineSpec::from_yaml(&s.text)) {
                Some(Ok(spec)) => spec.views(),
                Some(Err(_)) => Vec::new(),
                None => return Err(status(ApplyError::Unknown(name))),
            }
        };
        match coordinator
            .propose(Command::DropSpec { name: name.clone() })
            .await
        {
            Ok(_) => {}
            Err(ndc_coordinator::Error::NotLeader {
                leader: Some((leader, addr)),
            }) if leader != coordinator.node_id() => {
                let dropped = peer_client(&addr, &self.peer_tls)
                    .await
                    .map_err(|e| {
                        Status::unavailable(format!("cannot reach the leader at {addr}: {e}"))
                    })?
                    .drop(ndc_coordinator::forwarded(
                        DropPipelineRequest { name: name.clone() },
                        Duration::from_secs(60),
                    ))
                    .await?
                    .into_inner()
                    .dropped_views;
                self.wait_until_running(&name, None).await?;
                return Ok(dropped);
            }
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "cannot replicate the drop: {e}"
                )));
            }
        }
        self.wait_until_running(&name, None).await?;
        metrics::counter!(metric::PIPELINE_APPLIES, "outcome" => "dropped").increment(1);
        Ok(views)
    }
}

/// Cluster mode: keeps the node's data path on the replicated specs.
pub async fn follow_replicated_specs(
    runtime: Arc<tokio::sync::Mutex<Runtime>>,
    coordinator: Coordinator,
    shutdown: CancellationToken,
) {
    let mut watch = coordinator.watch();
    loop {
        let replicated = watch.borrow_and_update().cluster.specs.clone();
        let mut r = runtime.lock().await;
        if shutdown.is_cancelled() {
            return;
        }
        if !r.in_sync(&replicated)
            && let Err(e) = r.sync(&replicated).await
        {
            error!(error = %format!("{e:#}"), "cannot run the replicated pipeline specs; retrying");
            drop(r);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        drop(r);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = watch.changed() => if changed.is_err() { return },
        }
    }
}

/// Cluster mode: submits `pipelines.files` to the cluster through this
/// node's own peer listener (as the node, which forwards to the leader),
/// until each is replicated or refused (an older version than the one
/// running).
pub async fn submit_files(
    addr: String,
    tls: ClientTls,
    files: Vec<std::path::PathBuf>,
    shutdown: CancellationToken,
) {
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                error!(file = %file.display(), error = %e, "cannot read pipelines.files entry");
                continue;
            }
        };
        let mut attempt = 0u32;
        loop {
            let mut c = match peer_client(&addr, &tls).await {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let request = ApplyPipelineRequest {
                spec_yaml: text.clone(),
                dry_run: false,
            };
            match c.apply(request).await {
                Ok(r) => {
                    let r = r.into_inner();
                    info!(file = %file.display(), pipeline = %r.name, version = r.version, outcome = %r.outcome,
                          "pipeline file submitted to the cluster");
                    break;
                }
                Err(s) if matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition) => {
                    warn!(file = %file.display(), reason = %s.message(), "pipeline file not applied");
                    break;
                }
                Err(s) => {
                    attempt += 1;
                    if attempt % 20 == 1 {
                        info!(file = %file.display(), reason = %s.message(), "pipeline file waits for the cluster");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

fn status(e: ApplyError) -> Status {
    match e {
        ApplyError::Invalid(e) => Status::invalid_argument(e.to_string()),
        ApplyError::Refused(m) => Status::failed_precondition(m),
        ApplyError::Unknown(_) => Status::not_found(e.to_string()),
        ApplyError::Failed(e) => Status::internal(format!("{e:#}")),
    }
}

#[tonic::async_trait]
impl Pipelines for PipelineService {
    async fn apply(
        &self,
        request: Request<ApplyPipelineRequest>,
    ) -> Result<Response<ApplyPipelineResponse>, Status> {
        let by = crate::serving::access::caller(&request)?.principal;
        let forwarded = crate::serving::audit::recorded_by_forwarder(&request);
        let req = request.into_inner();
        let digest = crate::serving::audit::sha256_hex(req.spec_yaml.as_bytes());
        let dry_run = req.dry_run;
        let applied = self.apply_here(req).await?;
        let a = applied.get_ref();
        if !dry_run && a.outcome != "unchanged" {
            self.audit(
                forwarded,
                crate::serving::audit::Event::PipelineApply {
                    by,
                    pipeline: a.name.clone(),
                    version: a.version,
                    spec_sha256: digest,
                },
            )
            .await?;
        }
        Ok(applied)
    }

    async fn list(
        &self,
        _: Request<ListPipelinesRequest>,
    ) -> Result<Response<ListPipelinesResponse>, Status> {
        let runtime = self.runtime.lock().await;
        let pipelines = runtime
            .specs()
            .values()
            .map(|s| PipelineInfo {
                name: s.name.clone(),
                version: s.version,
                description: s.description.clone(),
                views: s.views(),
                topics: s.sources.values().map(|src| src.topic.clone()).collect(),
                repartition_topic: runtime.repartition_topic(s).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(ListPipelinesResponse { pipelines }))
    }

    async fn drop(
        &self,
        request: Request<DropPipelineRequest>,
    ) -> Result<Response<DropPipelineResponse>, Status> {
        let by = crate::serving::access::caller(&request)?.principal;
        let forwarded = crate::serving::audit::recorded_by_forwarder(&request);
        let name = request.into_inner().name;
        let dropped = self.drop_here(name.clone()).await?;
        self.audit(
            forwarded,
            crate::serving::audit::Event::PipelineDrop { by, pipeline: name },
        )
        .await?;
        Ok(dropped)
    }
}

impl PipelineService {
    async fn apply_here(
        &self,
        req: ApplyPipelineRequest,
    ) -> Result<Response<ApplyPipelineResponse>, Status> {
        let span = info_span!("pipeline_apply", dry_run = req.dry_run);
        if let Some(c) = &self.coordinator {
            return self
                .apply_in_cluster(c, req)
                .instrument(span)
                .await
                .map(Response::new)
                .inspect_err(|e| warn!(error = %e.message(), "pipeline spec refused"));
        }
        async {
            // One change at a time: applies and drops are serialised.
            let mut runtime = self.runtime.lock().await;
            match runtime.apply(&req.spec_yaml, req.dry_run).await {
                Ok(a) => Ok(Response::new(ApplyPipelineResponse {
                    name: a.name,
                    version: a.version,
                    outcome: a.outcome.to_string(),
                    views: a.views,
                    reset: a.reset,
                })),
                Err(e) => {
                    warn!(error = %e, "pipeline spec refused");
                    metrics::counter!(metric::PIPELINE_APPLIES, "outcome" => "rejected")
                        .increment(1);
                    Err(status(e))
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn drop_here(&self, name: String) -> Result<Response<DropPipelineResponse>, Status> {
        if let Some(c) = &self.coordinator {
            let dropped_views = self
                .drop_in_cluster(c, name.clone())
                .instrument(info_span!("pipeline_drop", pipeline = %name))
                .await?;
            return Ok(Response::new(DropPipelineResponse { dropped_views }));
        }
        let mut runtime = self.runtime.lock().await;
        let dropped_views = runtime
            .drop_pipeline(&name)
            .instrument(info_span!("pipeline_drop", pipeline = %name))
            .await
            .map_err(status)?;
        Ok(Response::new(DropPipelineResponse { dropped_views }))
    }
}

async fn client(addr: &str) -> anyhow::Result<PipelinesClient<crate::client::Connection>> {
    Ok(PipelinesClient::new(
        crate::client::connect(addr, None).await?,
    ))
}

/// A client of another node's peer listener, as this node.
async fn peer_client(
    addr: &str,
    tls: &ClientTls,
) -> anyhow::Result<PipelinesClient<tonic::transport::Channel>> {
    Ok(PipelinesClient::new(
        crate::client::channel(addr, Some(tls)).await?,
    ))
}

fn refused(s: Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// `ndc pipeline apply`.
pub async fn apply(
    addr: &str,
    spec_yaml: String,
    dry_run: bool,
) -> anyhow::Result<ApplyPipelineResponse> {
    let mut c = client(addr).await?;
    Ok(c.apply(ApplyPipelineRequest { spec_yaml, dry_run })
        .await
        .map_err(refused)?
        .into_inner())
}

/// `ndc pipeline list`.
pub async fn list(addr: &str) -> anyhow::Result<Vec<PipelineInfo>> {
    let mut c = client(addr).await?;
    Ok(c.list(ListPipelinesRequest {})
        .await
        .map_err(refused)?
        .into_inner()
        .pipelines)
}

/// `ndc pipeline drop`.
pub async fn drop_pipeline(addr: &str, name: &str) -> anyhow::Result<Vec<String>> {
    let mut c = client(addr).await?;
    Ok(c.drop(DropPipelineRequest { name: name.into() })
        .await
        .map_err(refused)?
        .into_inner()
        .dropped_views)
}
