//! Admin API of pipeline specs (`ndc.v1.Pipelines`): the server side over a
//! node's [`Runtime`], and the client calls behind `ndc pipeline`.

use crate::runtime::{ApplyError, Runtime};
use crate::telemetry::metric;
use ndc_proto::v1::pipelines_client::PipelinesClient;
use ndc_proto::v1::pipelines_server::Pipelines;
use ndc_proto::v1::{
    ApplyPipelineRequest, ApplyPipelineResponse, DropPipelineRequest, DropPipelineResponse,
    ListPipelinesRequest, ListPipelinesResponse, PipelineInfo,
};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span, warn};

pub struct PipelineService {
    runtime: Arc<tokio::sync::Mutex<Runtime>>,
}

impl PipelineService {
    pub fn new(runtime: Arc<tokio::sync::Mutex<Runtime>>) -> Self {
        PipelineService { runtime }
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
        let req = request.into_inner();
        let span = info_span!("pipeline_apply", dry_run = req.dry_run);
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
        let name = request.into_inner().name;
        let mut runtime = self.runtime.lock().await;
        let dropped_views = runtime
            .drop_pipeline(&name)
            .instrument(info_span!("pipeline_drop", pipeline = %name))
            .await
            .map_err(status)?;
        Ok(Response::new(DropPipelineResponse { dropped_views }))
    }
}

async fn client(addr: &str) -> anyhow::Result<PipelinesClient<tonic::transport::Channel>> {
    Ok(PipelinesClient::connect(crate::client::endpoint(addr)).await?)
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
