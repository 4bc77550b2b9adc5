//! The data path of a node — sources, the re-keying stages of pipelines and
//! the state writer — and the pipeline specs it runs.
//!
//! Applying or dropping a pipeline does not restart the node: the data path
//! stops (sources stop reading, the writer commits what it holds and hands
//! back the store), views are added or dropped, and the data path starts
//! again from the stored offsets. The gRPC and HTTP servers keep running,
//! and subscribers of views that stay keep their streams. Ingestion pauses
//! for the length of one commit and a consumer start (well under a second
//! on loopback).

use crate::config::{NodeConfig, SourceConfig};
use crate::dead_letter::DeadLetterSink;
use crate::forward::{ForwardSource, Forwarder};
use crate::pipeline::{ClusterWriter, CommittedOffsets, Mergers, Writer};
use crate::sources::{FileSource, KafkaSource, Route, client_config, file_stream};
use crate::spec::{OperatorSpec, PipelineSpec, SpecErrors};
use crate::telemetry::{Readiness, metric};
use crate::views::ViewRegistry;
use anyhow::Context;
use ndc_operators::merge::{JoinRule, MergeViews, Merger};
use ndc_operators::{Decoder, DecoderConfig, Format, NationalIdCheck, Store, StoreReader};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

/// What applying a spec did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub name: String,
    pub version: u64,
    /// created, updated, unchanged, or valid (dry run).
    pub outcome: &'static str,
    pub views: Vec<String>,
    /// Sources and operators whose state was reset.
    pub reset: Vec<String>,
}

/// Why a spec was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Invalid(#[from] SpecErrors),
    #[error("{0}")]
    Refused(String),
    #[error("pipeline {0:?} does not exist")]
    Unknown(String),
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

/// The running data path.
struct DataPath {
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    writer: JoinHandle<Writer>,
}

/// A node's data path and its pipeline specs.
pub struct Runtime {
    config: NodeConfig,
    views: ViewRegistry,
    readiness: Readiness,
    committed: CommittedOffsets,
    specs: BTreeMap<String, PipelineSpec>,
    reader: StoreReader,
    /// Present while stopped.
    store: Option<Store>,
    running: Option<DataPath>,
    /// Cluster mode: the change-log side, handed to the first data path.
    cluster: Option<(ClusterWriter, Vec<JoinHandle<()>>)>,
}

impl Runtime {
    /// Takes the opened store, runs the specs stored in it and those of
    /// `pipelines.files`, and registers every view.
    pub fn new(
        config: NodeConfig,
        mut store: Store,
        views: ViewRegistry,
        readiness: Readiness,
    ) -> anyhow::Result<Runtime> {
        let mut specs = BTreeMap::new();
        for (name, text) in store.specs()? {
            let spec = PipelineSpec::from_yaml(&text)
                .map_err(|e| anyhow::anyhow!("stored spec of pipeline {name}: {e}"))?;
            specs.insert(name, spec);
        }
        for file in &config.pipelines.files {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read pipelines.files {}", file.display()))?;
            let spec = PipelineSpec::from_yaml(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            match specs.get(&spec.name) {
                Some(running) if running == &spec => {}
                Some(running) if running.version >= spec.version => warn!(
                    pipeline = %spec.name, file = %file.display(), running = running.version, file_version = spec.version,
                    "a newer version of this pipeline was applied through the admin API; keeping it"
                ),
                _ => {
                    let reset = reconcile(&mut store, specs.get(&spec.name), &spec)?;
                    store.save_spec(&spec.name, &text)?;
                    info!(pipeline = %spec.name, version = spec.version, ?reset, "pipeline from file applied");
                    specs.insert(spec.name.clone(), spec);
                }
            }
        }
        let mut runtime = Runtime {
            config,
            views,
            readiness,
            committed: Default::default(),
            specs,
            reader: store.reader(),
            store: Some(store),
            running: None,
            cluster: None,
        };
        runtime.register_views()?;
        Ok(runtime)
    }

    /// Cluster mode: the writer's change-log side and its tasks.
    pub fn set_cluster(&mut self, writer: ClusterWriter, tasks: Vec<JoinHandle<()>>) {
        self.cluster = Some((writer, tasks));
    }

    /// Adds every view of the config and the specs to the store and serves it.
    fn register_views(&mut self) -> anyhow::Result<()> {
        let store = self.store.as_mut().context("data path is running")?;
        let mut wanted: Vec<(String, Vec<String>)> = self
            .config
            .views
            .iter()
            .map(|v| (v.name.clone(), v.key_columns.clone()))
            .collect();
        for spec in self.specs.values() {
            wanted.extend(spec_views(spec));
        }
        let names: Vec<String> = wanted.iter().map(|(n, _)| n.clone()).collect();
        store.add_views(&names)?;
        for (name, keys) in wanted {
            let id = store.view_id(&name).context("view just added")?;
            let last = store.meta(id).map_or(0, |m| m.last_seq);
            self.views.insert(&name, id, last, keys);
        }
        Ok(())
    }

    /// Starts the data path.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        self.create_repartition_topics().await;
        let store = self.store.take().context("data path already running")?;
        match build(
            &self.config,
            &self.specs,
            store,
            &self.views,
            &self.readiness,
            &self.committed,
            self.cluster.take(),
        ) {
            Ok(path) => {
                self.running = Some(path);
                Ok(())
            }
            Err((store, e)) => {
                self.store = Some(store);
                Err(e)
            }
        }
    }

    /// Creates the pipelines' repartition topics before the sources look
    /// for them (else the first facts wait for a metadata refresh). A broker
    /// that does not answer only delays: the data path retries.
    async fn create_repartition_topics(&self) {
        let (Some(kafka), Some(store)) = (&self.config.kafka, &self.store) else {
            return;
        };
        let topics: Vec<String> = self
            .specs
            .values()
            .filter_map(|s| repartition_topic(&self.config, &store.reader(), s))
            .collect();
        if topics.is_empty() {
            return;
        }
        let p = &self.config.pipelines;
        let created = crate::sources::create_topics(
            kafka,
            &topics,
            p.repartition_partitions,
            p.repartition_replication,
            "repartition",
        );
        match tokio::time::timeout(std::time::Duration::from_secs(3), created).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot create repartition topics yet"),
            Err(_) => warn!("creating repartition topics timed out"),
        }
    }

    /// Stops the data path: sources stop, the writer commits what it holds.
    pub async fn stop(&mut self) {
        let Some(path) = self.running.take() else {
            return;
        };
        path.shutdown.cancel();
        for t in path.tasks {
            let _ = t.await;
        }
        match path.writer.await {
            Ok(writer) => self.store = Some(writer.store),
            Err(e) => {
                error!(error = %e, "state writer failed; stopping the node");
                std::process::exit(70);
            }
        }
    }

    /// Validates and runs a spec (see [`Applied`]).
    pub async fn apply(&mut self, text: &str, dry_run: bool) -> Result<Applied, ApplyError> {
        let spec = PipelineSpec::from_yaml(text)?;
        let views = spec.views();
        let config_views: BTreeSet<&str> =
            self.config.views.iter().map(|v| v.name.as_str()).collect();
        if let Some(clash) = views.iter().find(|v| config_views.contains(v.as_str())) {
            return Err(ApplyError::Refused(format!(
                "view {clash} is already configured in the node's views section"
            )));
        }
        let running = self.specs.get(&spec.name);
        if let Some(r) = running {
            if r == &spec {
                return Ok(Applied {
                    name: spec.name.clone(),
                    version: spec.version,
                    outcome: "unchanged",
                    views,
                    reset: Vec::new(),
                });
            }
            if spec.version <= r.version {
                return Err(ApplyError::Refused(format!(
                    "pipeline {} runs version {}; raise version above it to update",
                    spec.name, r.version
                )));
            }
        }
        if self.config.cluster.is_some() {
            return Err(ApplyError::Refused(
                "pipelines run on a single node in this release (docs/pipelines.md, Limits)".into(),
            ));
        }
        if self.config.kafka.is_none() {
            return Err(ApplyError::Refused(
                "this node has no kafka section; pipelines read Kafka topics".into(),
            ));
        }
        let created = running.is_none();
        if dry_run {
            return Ok(Applied {
                name: spec.name.clone(),
                version: spec.version,
                outcome: "valid",
                views,
                reset: Vec::new(),
            });
        }
        self.stop().await;
        let result = self.apply_stopped(&spec, text);
        if let Err(e) = self.start().await {
            error!(error = %e, "cannot restart the data path after an apply");
            return Err(ApplyError::Failed(e));
        }
        let reset = result.map_err(ApplyError::Failed)?;
        metrics::counter!(metric::PIPELINE_APPLIES, "outcome" => "applied").increment(1);
        Ok(Applied {
            name: spec.name.clone(),
            version: spec.version,
            outcome: if created { "created" } else { "updated" },
            views,
            reset: reset.into_iter().collect(),
        })
    }

    fn apply_stopped(
        &mut self,
        spec: &PipelineSpec,
        text: &str,
    ) -> anyhow::Result<BTreeSet<String>> {
        let old_spec = self.specs.get(&spec.name).cloned();
        let store = self.store.as_mut().context("data path stopped")?;
        let old = old_spec.as_ref();
        let old_views: BTreeSet<String> = old
            .map(|o| o.views().into_iter().collect())
            .unwrap_or_default();
        let reset = reconcile(store, old, spec)?;
        for v in &old_views {
            if store.view_id(v).is_none() {
                self.views.remove(v);
            }
        }
        // Views whose state was reset get a fresh watcher (their
        // subscribers' tokens no longer apply).
        for v in spec.views() {
            if self
                .views
                .get(&v)
                .is_some_and(|s| store.view_id(&v) != Some(s.id))
            {
                self.views.remove(&v);
            }
        }
        store.save_spec(&spec.name, text)?;
        self.specs.insert(spec.name.clone(), spec.clone());
        self.register_views()?;
        // Kept state under changed rules: recompute every golden record now
        // rather than at each person's next change.
        if let Some(old) = old_spec
            && old.operators != spec.operators
            && let Some(store) = self.store.as_mut()
            && let Some(merger) = merger_of(spec, store)?
        {
            store.set_prefix_scanned(merger.views.contributions);
            let mut txn = store.begin(now_ms());
            let people = merger.refresh_all(&mut txn)?;
            txn.commit()?;
            info!(pipeline = %spec.name, people, "golden records recomputed under the new rules");
        }
        info!(pipeline = %spec.name, version = spec.version, ?reset, "pipeline applied");
        Ok(reset)
    }

    /// Stops a pipeline and deletes its views.
    pub async fn drop_pipeline(&mut self, name: &str) -> Result<Vec<String>, ApplyError> {
        let Some(spec) = self.specs.get(name).cloned() else {
            return Err(ApplyError::Unknown(name.into()));
        };
        self.stop().await;
        let result = (|| -> anyhow::Result<Vec<String>> {
            let store = self.store.as_mut().context("data path stopped")?;
            let views = spec.views();
            for v in &views {
                store.drop_view(v)?;
                self.views.remove(v);
            }
            store.remove_spec(name)?;
            self.specs.remove(name);
            Ok(views)
        })();
        if let Err(e) = self.start().await {
            return Err(ApplyError::Failed(e));
        }
        metrics::counter!(metric::PIPELINE_APPLIES, "outcome" => "dropped").increment(1);
        info!(pipeline = %name, "pipeline dropped");
        result.map_err(ApplyError::Failed)
    }

    pub fn specs(&self) -> &BTreeMap<String, PipelineSpec> {
        &self.specs
    }

    /// Repartition topic of a running pipeline, if it has a merge.
    pub fn repartition_topic(&self, spec: &PipelineSpec) -> Option<String> {
        repartition_topic(&self.config, &self.reader, spec)
    }

    /// Stops the data path for good (node shutdown).
    pub async fn shutdown(&mut self) {
        self.stop().await;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A pipeline's views with their key columns.
fn spec_views(spec: &PipelineSpec) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for (name, source) in &spec.sources {
        out.push((spec.view(name), source.key.clone()));
    }
    for (name, op) in &spec.operators {
        match op {
            OperatorSpec::Merge(_) => {
                out.push((spec.view(name), vec!["national_id".into()]));
                out.push((
                    format!("{}.conflicts", spec.view(name)),
                    vec!["attribute".into(), "national_id".into()],
                ));
                out.push((
                    format!("{}.contributions", spec.view(name)),
                    vec!["national_id".into(), "source".into(), "source_key".into()],
                ));
            }
            OperatorSpec::Join(_) => out.push((
                spec.view(name),
                vec!["national_id".into(), "source_key".into()],
            )),
        }
    }
    out
}

/// Brings the store from `old` to `new`: drops the views of what `new`
/// removes or reshapes (a merge whose inputs are reshaped is reshaped too,
/// and so is a join of a reshaped stream or merge). Returns what was reset.
fn reconcile(
    store: &mut Store,
    old: Option<&PipelineSpec>,
    new: &PipelineSpec,
) -> anyhow::Result<BTreeSet<String>> {
    let Some(old) = old else {
        return Ok(BTreeSet::new());
    };
    let mut reset = old.reshaped(new);
    // Propagate along the DAG: sources → merges → joins.
    for (name, rules) in new.merges() {
        if rules.inputs.iter().any(|i| reset.contains(i)) {
            reset.insert(name.to_string());
        }
    }
    for (name, join) in new.joins() {
        if reset.contains(&join.stream) || reset.contains(&join.table) {
            reset.insert(name.to_string());
        }
    }
    // Only what existed can be reset; what is new starts empty anyway.
    let existed: BTreeSet<&String> = old.sources.keys().chain(old.operators.keys()).collect();
    reset.retain(|n| existed.contains(n));
    let new_views: BTreeSet<String> = new.views().into_iter().collect();
    let mut drop: Vec<String> = old
        .views()
        .into_iter()
        .filter(|v| !new_views.contains(v))
        .collect();
    for name in &reset {
        let base = new.view(name);
        drop.push(base.clone());
        drop.push(format!("{base}.conflicts"));
        drop.push(format!("{base}.contributions"));
    }
    // A reset merge re-reads its inputs from the start: their re-keying
    // cursors go back to zero.
    for (name, rules) in new.merges() {
        if reset.contains(name) {
            for input in &rules.inputs {
                store.reader().set_cursor(&new.view(input), 0)?;
            }
        }
    }
    for (_, join) in new.joins() {
        if reset.contains(&join.table) || reset.contains(&join.stream) {
            store.reader().set_cursor(&new.view(&join.stream), 0)?;
        }
    }
    for v in drop {
        store.drop_view(&v)?;
    }
    Ok(reset)
}

/// Repartition topic of a pipeline: named after its merge state (the
/// contributions view's id), so a reset merge starts on a fresh topic
/// instead of re-reading facts re-keyed by the old rules.
fn repartition_topic(
    config: &NodeConfig,
    store: &StoreReader,
    spec: &PipelineSpec,
) -> Option<String> {
    let (merge, _) = spec.merges().next()?;
    let id = store.view_id(&format!("{}.contributions", spec.view(merge)))?;
    Some(format!(
        "{}{}.{}",
        config.pipelines.repartition_topic_prefix,
        spec.name,
        id.as_u32()
    ))
}

/// The person-keyed task of a pipeline (its merge and the joins on it).
fn merger_of(spec: &PipelineSpec, store: &Store) -> anyhow::Result<Option<Merger>> {
    let Some((merge, rules)) = spec.merges().next() else {
        return Ok(None);
    };
    let view_id = |name: &str| {
        store
            .view_id(name)
            .with_context(|| format!("view {name} is not registered"))
    };
    let base = spec.view(merge);
    let views = MergeViews {
        contributions: view_id(&format!("{base}.contributions"))?,
        golden: view_id(&base)?,
        conflicts: view_id(&format!("{base}.conflicts"))?,
    };
    let mut joins = Vec::new();
    for (name, join) in spec.joins().filter(|(_, j)| j.table == merge) {
        joins.push(JoinRule {
            stream: join.stream.clone(),
            attributes: join.attributes.clone(),
            view: view_id(&spec.view(name))?,
        });
    }
    Ok(Some(Merger {
        rules: rules.clone(),
        views,
        joins,
    }))
}

/// National-ID check of a pipeline source: its own `national_id`, else the
/// `on` column of a join reading it (optional there).
fn national_id_check(spec: &PipelineSpec, source: &str) -> Option<NationalIdCheck> {
    let s = spec.sources.get(source)?;
    if let Some(n) = &s.national_id {
        return Some(NationalIdCheck {
            column: n.column.clone(),
            birth_date_column: n.birth_date.clone(),
            gender_column: n.gender.clone(),
            required: n.required,
        });
    }
    spec.joins()
        .find(|(_, j)| j.stream == source)
        .map(|(_, j)| NationalIdCheck {
            column: j.on.clone(),
            required: false,
            ..NationalIdCheck::default()
        })
}

/// Builds and starts a data path over `store`. On error the store is handed
/// back.
#[allow(clippy::result_large_err)]
fn build(
    config: &NodeConfig,
    specs: &BTreeMap<String, PipelineSpec>,
    store: Store,
    views: &ViewRegistry,
    readiness: &Readiness,
    committed: &CommittedOffsets,
    cluster: Option<(ClusterWriter, Vec<JoinHandle<()>>)>,
) -> Result<DataPath, (Store, anyhow::Error)> {
    let shutdown = CancellationToken::new();
    let (tx, rx) = mpsc::channel(config.pipeline.channel_capacity);
    let decoder = |format, key_columns: &[String], national_id| {
        Decoder::new(DecoderConfig {
            format,
            key_columns: key_columns.to_vec(),
            max_record_bytes: config.pipeline.max_record_bytes.as_usize(),
            national_id,
        })
    };
    let mut routes: BTreeMap<String, Vec<Route>> = BTreeMap::new();
    let mut start_offsets = HashMap::new();
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let mut mergers = HashMap::new();
    let mut forwarders = Vec::new();
    let mut repartition_topics = Vec::new();
    // A truncate of a source re-keyed by national ID must say which rows
    // went, so that their facts are retracted from the people they named;
    // and the merge reads a person's contributions by key prefix.
    let mut store = store;
    for spec in specs.values() {
        for name in spec.sources.keys() {
            if spec.rekey_column(name).is_some()
                && let Some(id) = store.view_id(&spec.view(name))
            {
                store.set_truncate_as_deletes(id, true);
            }
        }
        // The merge reads a person's contributions by key prefix.
        if let Some((merge, _)) = spec.merges().next()
            && let Some(id) = store.view_id(&format!("{}.contributions", spec.view(merge)))
        {
            store.set_prefix_scanned(id);
        }
    }
    let view_id = |name: &str| {
        store
            .view_id(name)
            .with_context(|| format!("view {name} is not registered"))
    };
    let setup = (|| -> anyhow::Result<()> {
        for view in &config.views {
            let id = view_id(&view.name)?;
            for source in &view.sources {
                match source {
                    SourceConfig::Kafka(k) => {
                        routes.entry(k.topic.clone()).or_default().push(Route {
                            view: id,
                            view_name: view.name.as_str().into(),
                            decoder: decoder(k.format, &view.key_columns, None),
                        })
                    }
                    SourceConfig::File(f) => {
                        let fs = FileSource {
                            path: f.path.clone(),
                            view: id,
                            decoder: decoder(f.format, &view.key_columns, None),
                            start_line: store.next_offset(id, &file_stream(&f.path)).unwrap_or(0),
                            tx: tx.clone(),
                            shutdown: shutdown.clone(),
                        };
                        let span =
                            info_span!("file_source", view = %view.name, path = %f.path.display());
                        tasks.push(tokio::task::spawn_blocking(move || {
                            let _g = span.enter();
                            if let Err(e) = fs.run() {
                                error!(error = %e, "file source failed");
                            }
                        }));
                    }
                }
            }
        }
        for spec in specs.values() {
            let mut forward = Vec::new();
            for (name, source) in &spec.sources {
                let view = spec.view(name);
                let id = view_id(&view)?;
                routes.entry(source.topic.clone()).or_default().push(Route {
                    view: id,
                    view_name: view.as_str().into(),
                    decoder: decoder(source.format, &source.key, national_id_check(spec, name)),
                });
                if let Some(column) = spec.rekey_column(name) {
                    forward.push(ForwardSource {
                        source: name.clone(),
                        view: view.clone(),
                        column: column.to_string(),
                        commits: views.receiver(&view).context("view served")?,
                    });
                }
            }
            let Some(merger) = merger_of(spec, &store)? else {
                continue;
            };
            let topic = repartition_topic(config, &store.reader(), spec)
                .context("merge views registered")?;
            let merge_views = merger.views;
            let contributions = store.view_name(merge_views.contributions).to_string();
            mergers.insert(merge_views.contributions, merger);
            routes.entry(topic.clone()).or_default().push(Route {
                view: merge_views.contributions,
                view_name: contributions.into(),
                decoder: decoder(Format::Facts, &[], None),
            });
            repartition_topics.push(topic.clone());
            forwarders.push((spec.name.clone(), topic, forward));
        }
        for route in routes.values().flatten() {
            for (stream, next) in store.offsets_of(route.view) {
                start_offsets.insert((route.view, stream.to_string()), next);
            }
        }
        Ok(())
    })();
    if let Err(e) = setup {
        return Err((store, e));
    }
    let dead_letters = match &config.kafka {
        Some(k) => match client_config(k)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.max.bytes", "10485760")
            .create()
        {
            Ok(producer) => DeadLetterSink::Kafka {
                producer,
                topic: k.dead_letter_topic.clone(),
                node: config.node.id.clone(),
                max_value_bytes: 900 << 10,
            },
            Err(e) => {
                return Err((
                    store,
                    anyhow::anyhow!("cannot create the dead-letter producer: {e}"),
                ));
            }
        },
        None => DeadLetterSink::File {
            path: config.dead_letter_file(),
        },
    };
    let (cluster_writer, cluster_tasks) = match cluster {
        Some((w, t)) => (Some(w), t),
        None => (None, Vec::new()),
    };
    if routes.is_empty() {
        readiness.set(true);
    } else if let Some(k) = &config.kafka {
        if !repartition_topics.is_empty() {
            let kafka = k.clone();
            let section = config.pipelines.clone();
            let topics = repartition_topics.clone();
            // Created before the consumer looks for them; the source waits
            // for missing topics anyway, so a slow broker only delays.
            tasks.push(tokio::spawn(async move {
                let mut attempt = 0;
                while let Err(e) = crate::sources::create_topics(
                    &kafka,
                    &topics,
                    section.repartition_partitions,
                    section.repartition_replication,
                    "repartition",
                )
                .await
                {
                    attempt += 1;
                    if attempt % 10 == 1 {
                        warn!(error = %e, "cannot create repartition topics yet; retrying");
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }));
        }
        let source = KafkaSource {
            config: k.clone(),
            routes,
            start_offsets,
            tx: tx.clone(),
            committed: committed.clone(),
            readiness: readiness.clone(),
            shutdown: shutdown.clone(),
            cluster: cluster_writer
                .as_ref()
                .map(|w| (w.coordinator.clone(), w.log.clone())),
        };
        tasks.push(tokio::spawn(
            async move {
                if let Err(e) = source.run().await {
                    error!(error = %e, "Kafka source failed");
                }
            }
            .instrument(info_span!("kafka_source")),
        ));
        for (pipeline, topic, sources) in forwarders {
            let producer = match client_config(k)
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("linger.ms", "2")
                // A broker that does not answer fails a round in 30 s (then
                // retried) rather than holding a pipeline apply for minutes.
                .set("message.timeout.ms", "30000")
                .create()
            {
                Ok(p) => p,
                Err(e) => {
                    shutdown.cancel();
                    return Err((
                        store,
                        anyhow::anyhow!("cannot create the repartition producer: {e}"),
                    ));
                }
            };
            let f = Forwarder {
                pipeline: pipeline.clone(),
                topic,
                sources,
                reader: store.reader(),
                producer,
                shutdown: shutdown.clone(),
            };
            tasks.push(tokio::spawn(
                f.run()
                    .instrument(info_span!("rekey", pipeline = %pipeline)),
            ));
        }
    }
    drop(tx);
    tasks.extend(cluster_tasks);
    let writer = Writer {
        store,
        rx,
        dead_letters,
        commits: views.publishers(),
        committed_offsets: committed.clone(),
        pipeline: config.pipeline.clone(),
        changelog: config.changelog.clone(),
        mergers: Mergers::new(mergers),
        cluster: cluster_writer,
        inflight: None,
        unwritten: Default::default(),
        batches: 0,
    };
    let writer = tokio::spawn(writer.run().instrument(info_span!("state_writer")));
    Ok(DataPath {
        shutdown,
        tasks,
        writer,
    })
}
