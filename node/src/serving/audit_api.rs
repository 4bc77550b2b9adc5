//! The `ndc.v1.Audit` API (admins only): who received data about a person,
//! and a person's own report; and the client calls behind `ndc audit` and
//! `ndc person`.

use crate::client::ClientTls;
use crate::pipelines::runtime::Runtime;
use crate::pipelines::spec::{OperatorSpec, PipelineSpec};
use crate::serving::access;
use crate::serving::audit::{Audit, Event, Record};
use crate::views::ViewRegistry;
use ndc_operators::national_id::NationalId;
use ndc_operators::{Key, StoreReader};
use ndc_proto::v1::audit_client::AuditClient;
use ndc_proto::v1::audit_server::Audit as AuditApi;
use ndc_proto::v1::{
    AccessRecord, PersonReportRequest, PersonReportResponse, WhoAccessedRequest,
    WhoAccessedResponse,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AuditService {
    audit: Audit,
    reader: StoreReader,
    views: ViewRegistry,
    runtime: Arc<tokio::sync::Mutex<Runtime>>,
    node: String,
    max_records: usize,
}

impl AuditService {
    pub fn new(
        audit: Audit,
        reader: StoreReader,
        views: ViewRegistry,
        runtime: Arc<tokio::sync::Mutex<Runtime>>,
        node: String,
        max_records: usize,
    ) -> Self {
        AuditService {
            audit,
            reader,
            views,
            runtime,
            node,
            max_records,
        }
    }

    async fn who_accessed(
        &self,
        national_id: &str,
        since_ms: i64,
        limit: usize,
    ) -> Result<(Vec<Record>, bool), Status> {
        if !self.audit.is_enabled() {
            return Err(Status::failed_precondition(
                "this node keeps no audit trail (audit.enabled: false)",
            ));
        }
        let audit = self.audit.clone();
        let id = national_id.to_string();
        tokio::task::spawn_blocking(move || audit.who_accessed(&id, since_ms, limit))
            .await
            .map_err(|e| Status::internal(format!("audit read failed: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))
    }

    /// One row of a view by key, if it is there: (key, row, source position).
    /// A sharded view's row is in one of its shards (the one its source
    /// partition feeds, which the key alone does not tell): each is asked.
    async fn row(&self, view: &str, key: &Key) -> Result<Option<Value>, Status> {
        // Only the key's shard when the view is split by national ID.
        let wanted = self
            .views
            .shards_of_keys(view, std::slice::from_ref(key))
            .unwrap_or_default();
        let shards: Vec<Arc<str>> = self
            .views
            .shards(view)
            .map(|s| {
                s.iter()
                    .zip(&wanted)
                    .filter(|(_, wanted)| **wanted)
                    .map(|(s, _)| s.store_name.clone())
                    .collect()
            })
            .unwrap_or_default();
        for store_name in shards {
            if let Some(row) = self.shard_row(view, &store_name, key).await? {
                return Ok(Some(row));
            }
        }
        Ok(None)
    }

    async fn shard_row(
        &self,
        view: &str,
        store_name: &str,
        key: &Key,
    ) -> Result<Option<Value>, Status> {
        let reader = self.reader.clone();
        let (view, store_name, key) = (view.to_string(), store_name.to_string(), key.clone());
        tokio::task::spawn_blocking(move || {
            let mut found = None;
            reader.scan_snapshot(&store_name, Some(std::slice::from_ref(&key)), 1, |rows| {
                found = rows.into_iter().next().map(|r| {
                    json!({
                        "view": view,
                        "key": serde_json::from_str::<Value>(&r.key).unwrap_or(Value::String(r.key)),
                        "row": serde_json::from_str::<Value>(&r.row_json).unwrap_or(Value::String(r.row_json)),
                        "source": {
                            "stream": r.version.stream,
                            "offset": r.version.offset,
                            "lsn": r.version.lsn,
                            "ts_ms": r.version.source_ts_ms,
                        },
                    })
                });
                false
            })
            .map(|_| found)
        })
        .await
        .map_err(|e| Status::internal(format!("read failed: {e}")))?
        .or_else(|e| match e {
            ndc_operators::StoreError::UnknownView(_) => Ok(None),
            e => Err(Status::internal(format!("state store: {e}"))),
        })
    }
}

/// A national ID asked about, checked.
fn national_id(text: &str) -> Result<String, Status> {
    let text = text.trim();
    NationalId::parse(text)
        .map_err(|e| Status::invalid_argument(format!("{text:?} is not a national ID: {e}")))?;
    Ok(text.to_string())
}

fn access_record(r: Record) -> AccessRecord {
    let mut out = AccessRecord {
        kind: r.event.kind().into(),
        at_ms: r.at_ms,
        node: r.node,
        chain: r.chain,
        index: r.index,
        ..AccessRecord::default()
    };
    match r.event {
        Event::Delivery {
            principal,
            purpose,
            view,
            shard,
            snapshot,
            first_seq,
            last_seq,
            ..
        } => {
            out.principal = principal;
            out.purpose = purpose;
            out.view = view;
            out.shard = shard;
            out.snapshot = snapshot;
            out.first_seq = first_seq;
            out.last_seq = last_seq;
        }
        Event::Report { principal, .. } => out.principal = principal,
        _ => {}
    }
    out
}

#[tonic::async_trait]
impl AuditApi for AuditService {
    async fn who_accessed(
        &self,
        req: Request<WhoAccessedRequest>,
    ) -> Result<Response<WhoAccessedResponse>, Status> {
        let req = req.into_inner();
        let id = national_id(&req.national_id)?;
        let limit = match req.limit {
            0 => 1000,
            n => n as usize,
        }
        .min(self.max_records);
        let (records, truncated) = self.who_accessed(&id, req.since_ms, limit).await?;
        Ok(Response::new(WhoAccessedResponse {
            records: records.into_iter().map(access_record).collect(),
            truncated,
        }))
    }

    async fn person_report(
        &self,
        req: Request<PersonReportRequest>,
    ) -> Result<Response<PersonReportResponse>, Status> {
        let caller = access::caller(&req)?;
        let id = national_id(&req.get_ref().national_id)?;
        let specs: Vec<PipelineSpec> = self
            .runtime
            .lock()
            .await
            .specs()
            .values()
            .cloned()
            .collect();
        let mut golden = Vec::new();
        let mut sources = Vec::new();
        let mut conflicts = Vec::new();
        let mut searched = Vec::new();
        let mut not_searched = Vec::new();
        let by_id = Key::from_value(&json!({ "national_id": id }));
        for spec in &specs {
            for (name, m) in spec.merges() {
                let view = spec.view(name);
                searched.push(view.clone());
                let Some(record) = self.row(&view, &by_id).await? else {
                    continue;
                };
                // The source rows it was merged from.
                let contributors = record["row"]["_contributors"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for c in contributors {
                    let (Some(source), Some(key)) =
                        (c["source"].as_str(), c["source_key"].as_str())
                    else {
                        continue;
                    };
                    let Ok(key) = Key::parse(key) else { continue };
                    if let Some(row) = self.row(&spec.view(source), &key).await? {
                        sources.push(row);
                    }
                }
                for (attribute, rule) in &m.attributes {
                    if rule.compare {
                        let key =
                            Key::from_value(&json!({ "attribute": attribute, "national_id": id }));
                        if let Some(row) = self.row(&format!("{view}.conflicts"), &key).await? {
                            conflicts.push(row);
                        }
                    }
                }
                golden.push(record);
            }
            for (name, op) in &spec.operators {
                if let OperatorSpec::Join(_) = op {
                    not_searched.push(spec.view(name));
                }
            }
        }
        // Configured views keyed by their national-ID column.
        for name in self.views.names() {
            if specs
                .iter()
                .any(|s| name.starts_with(&format!("{}.", s.name)))
            {
                continue;
            }
            let keys = self.views.key_columns(&name);
            match self.views.national_id(&name) {
                Some(col) if keys.len() == 1 && keys[0] == *col => {
                    searched.push(name.clone());
                    let key = Key::from_value(&json!({ col.to_string(): id }));
                    if let Some(row) = self.row(&name, &key).await? {
                        sources.push(row);
                    }
                }
                _ => not_searched.push(name),
            }
        }
        let (received, truncated) = self.who_accessed(&id, 0, self.max_records).await?;
        let received: Vec<Value> = received
            .into_iter()
            .filter(|r| matches!(r.event, Event::Delivery { .. }))
            .map(|r| {
                let a = access_record(r);
                json!({
                    "principal": a.principal, "purpose": a.purpose, "view": a.view,
                    "at_ms": a.at_ms, "node": a.node, "snapshot": a.snapshot,
                    "shard": a.shard, "first_seq": a.first_seq, "last_seq": a.last_seq,
                })
            })
            .collect();
        let report = json!({
            "national_id": id,
            "generated_at_ms": access::now_ms(),
            "node": self.node,
            "golden_records": golden,
            "source_rows": sources,
            "conflicts": conflicts,
            "received_by": received,
            "received_by_truncated": truncated,
            "views_searched": searched,
            "views_not_searched": not_searched,
        });
        // The report itself hands out personal data: recorded first.
        self.audit
            .record(Event::Report {
                principal: caller.principal,
                national_ids: vec![id],
            })
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(PersonReportResponse {
            report_json: serde_json::to_string_pretty(&report).unwrap_or_default(),
        }))
    }
}

async fn client(
    addr: &str,
    tls: Option<&ClientTls>,
) -> anyhow::Result<AuditClient<crate::client::Connection>> {
    Ok(AuditClient::new(crate::client::connect(addr, tls).await?))
}

/// `ndc audit who-accessed`.
pub async fn who_accessed(
    addr: &str,
    tls: Option<&ClientTls>,
    national_id: &str,
    since_ms: i64,
) -> anyhow::Result<WhoAccessedResponse> {
    Ok(client(addr, tls)
        .await?
        .who_accessed(WhoAccessedRequest {
            national_id: national_id.into(),
            since_ms,
            limit: 0,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner())
}

/// `ndc person report`.
pub async fn person_report(
    addr: &str,
    tls: Option<&ClientTls>,
    national_id: &str,
) -> anyhow::Result<String> {
    Ok(client(addr, tls)
        .await?
        .person_report(PersonReportRequest {
            national_id: national_id.into(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .report_json)
}

/// Every record of an audit topic, verified in order: the verifier and
/// the number of records read.
pub async fn verify_topic(
    kafka: &crate::config::KafkaSection,
    topic: &str,
) -> anyhow::Result<crate::serving::audit::Verifier> {
    let mut v = crate::serving::audit::Verifier::default();
    crate::serving::audit::read_topic(kafka, topic, |offset, bytes| {
        v.check(format!("offset {offset}"), bytes);
    })
    .await?;
    Ok(v)
}

/// Records of a JSON-lines export, verified in order.
pub fn verify_lines(text: &str) -> crate::serving::audit::Verifier {
    let mut v = crate::serving::audit::Verifier::default();
    for (i, line) in text.lines().enumerate() {
        if !line.trim().is_empty() {
            v.check(format!("line {}", i + 1), line.as_bytes());
        }
    }
    v
}

/// What `ndc audit verify` prints.
pub fn verify_summary(v: &crate::serving::audit::Verifier) -> Value {
    let heads: BTreeMap<String, Value> = v
        .heads()
        .into_iter()
        .map(|(c, i, h)| (c, json!({"last_index": i, "last_hash": h})))
        .collect();
    json!({
        "ok": v.first_bad.is_none(),
        "records": v.records,
        "duplicates_skipped": v.duplicates,
        "chains": heads,
        "first_bad": v.first_bad,
    })
}
