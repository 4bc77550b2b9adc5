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

use crate::config::{NodeConfig, SourceConfig, ViewConfig};
use crate::kafka::client_config;
use crate::lifecycle::Fatal;
use crate::now_ms;
use crate::pipelines::rekey::{ForwardSource, Forwarder};
use crate::pipelines::spec::{OperatorSpec, PipelineSpec, SpecErrors};
use crate::sources::{FileSource, KafkaSource, Route, file_stream};
use crate::telemetry::{Readiness, metric};
use crate::views::{ShardHead, ViewRegistry};
use crate::writer::dead_letter::DeadLetterSink;
use crate::writer::{ClusterWriter, CommittedOffsets, Mergers, Writer};
use anyhow::Context;
use ndc_coordinator::{Coordinator, StoredSpec};
use ndc_operators::merge::{JoinRule, MergeViews, Merger};
use ndc_operators::{Decoder, DecoderConfig, Format, NationalIdCheck, Store, StoreReader, ViewId};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tokio::sync::watch;
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
    /// The pool of state writers, in writer order.
    writers: Vec<JoinHandle<Writer>>,
}

/// How many state writers run, and which writes each view.
struct WriterPool {
    writers: usize,
    by_view: Arc<HashMap<ViewId, usize>>,
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
    /// Cluster mode: specs come from the replicated state.
    cluster: Option<ClusterSide>,
    /// Where the state writer's fatal errors go.
    fatal: Fatal,
}

/// Cluster mode of a runtime. Specs are replicated by Raft; every node runs
/// what the replicated state holds, and names the topics of a pipeline's
/// views after their generation, so that every node agrees on them.
struct ClusterSide {
    coordinator: Coordinator,
    /// View → generation, for the pipelines this node runs.
    generations: BTreeMap<String, u64>,
    /// Pipeline → the replicated version this node runs.
    running: BTreeMap<String, u64>,
}

/// Cursor-store name under which a node keeps a pipeline view's generation.
fn generation_key(view: &str) -> String {
    format!("generation:{view}")
}

impl Runtime {
    /// Takes the opened store, runs the specs stored in it and those of
    /// `pipelines.files`, and registers every view.
    pub fn new(
        config: NodeConfig,
        mut store: Store,
        views: ViewRegistry,
        readiness: Readiness,
        coordinator: Option<Coordinator>,
        fatal: Fatal,
    ) -> anyhow::Result<Runtime> {
        let mut specs = BTreeMap::new();
        for (name, text) in store.specs()? {
            let spec = PipelineSpec::from_yaml(&text)
                .map_err(|e| anyhow::anyhow!("stored spec of pipeline {name}: {e}"))?;
            specs.insert(name, spec);
        }
        let cluster = match coordinator {
            // The replicated specs decide; what this node stored is what it
            // ran last, to compare with. (`pipelines.files` are submitted
            // to the cluster by the node, see `admin::submit_files`.)
            Some(coordinator) => {
                let reader = store.reader();
                let mut generations = BTreeMap::new();
                for spec in specs.values() {
                    for v in spec.views() {
                        let g = reader.cursor(&generation_key(&v))?;
                        if g > 0 {
                            generations.insert(v, g);
                        }
                    }
                }
                let running = specs
                    .values()
                    .map(|s| (s.name.clone(), s.version))
                    .collect();
                Some(ClusterSide {
                    coordinator,
                    generations,
                    running,
                })
            }
            None => {
                apply_files(&config, &mut store, &mut specs)?;
                None
            }
        };
        let replicated = cluster
            .as_ref()
            .map(|c| c.coordinator.watch().borrow().cluster.specs.clone());
        let mut runtime = Runtime {
            config,
            views,
            readiness,
            committed: Default::default(),
            specs,
            reader: store.reader(),
            store: Some(store),
            fatal,
            running: None,
            cluster,
        };
        match replicated {
            Some(r) => runtime.sync_stopped(&r)?,
            None => runtime.register_views()?,
        }
        Ok(runtime)
    }

    /// Adds every view of the config and the specs to the store and serves it.
    fn register_views(&mut self) -> anyhow::Result<()> {
        let store = self.store.as_mut().context("data path is running")?;
        let mut wanted: Vec<PipelineView> = self
            .config
            .views
            .iter()
            .map(|v| PipelineView {
                name: v.name.clone(),
                keys: v.key_columns.clone(),
                shards: v.shards,
                placed_with: None,
                split_by_person: false,
            })
            .collect();
        for spec in self.specs.values() {
            wanted.extend(spec_views(spec));
        }
        let names: Vec<String> = wanted
            .iter()
            .flat_map(|v| ndc_operators::shard::store_names(&v.name, v.shards))
            .collect();
        store.add_views(&names)?;
        // Levels: configured views declare theirs; pipeline views inherit
        // them from their sources' fields.
        let mut classes: BTreeMap<String, crate::pipelines::spec::ViewClass> = self
            .config
            .views
            .iter()
            .map(|v| {
                (
                    v.name.clone(),
                    crate::pipelines::spec::ViewClass {
                        levels: v
                            .columns
                            .iter()
                            .map(|(c, k)| (c.clone(), k.level))
                            .collect(),
                        national_id: v.national_id.clone(),
                    },
                )
            })
            .collect();
        for spec in self.specs.values() {
            classes.extend(spec.classification());
        }
        for view in wanted {
            let mut heads = Vec::new();
            for (shard, store_name) in ndc_operators::shard::store_names(&view.name, view.shards)
                .into_iter()
                .enumerate()
            {
                let id = store.view_id(&store_name).context("view just added")?;
                let placed_as = view
                    .placed_with
                    .as_ref()
                    .map(|w| ndc_operators::shard::store_name(w, shard as u32, view.shards));
                heads.push(ShardHead {
                    id,
                    last_seq: store.meta(id).map_or(0, |m| m.last_seq),
                    store_name,
                    placed_as,
                });
            }
            let class = classes.remove(&view.name).unwrap_or_default();
            let split = view.shards > 1 && view.split_by_person;
            self.views.insert_sharded(
                &view.name,
                heads,
                view.keys,
                class.levels,
                class.national_id,
            );
            if split {
                self.views.set_split_by(&view.name, "national_id");
            }
        }
        Ok(())
    }

    /// Starts the data path.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let repartition_ready = self.create_repartition_topics().await;
        let shutdown = CancellationToken::new();
        let pool = self.writer_pool()?;
        let logs = match self.cluster.is_some() {
            true => Some(self.open_logs(&shutdown, &pool).await?),
            false => None,
        };
        let store = self.store.take().context("data path already running")?;
        match build(self, store, logs, shutdown, repartition_ready, pool) {
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

    /// Which writer of the pool writes each view: configured views' shards
    /// spread over the writers, everything else on the first.
    fn writer_pool(&self) -> anyhow::Result<WriterPool> {
        let store = self.store.as_ref().context("data path already running")?;
        let replicas: Vec<Vec<ViewId>> = self
            .config
            .views
            .iter()
            .map(|v| {
                v.store_names()
                    .iter()
                    .filter_map(|n| store.view_id(n))
                    .collect()
            })
            .collect();
        let writers = self.config.pipeline.writer_count();
        Ok(WriterPool {
            writers,
            by_view: Arc::new(crate::writer::assign_writers(&replicas, writers)),
        })
    }

    /// Creates the pipelines' repartition topics before the sources look
    /// for them (else the first facts wait for a metadata refresh). A broker
    /// that does not answer only delays: the data path retries.
    /// Returns whether they all exist now (else the data path keeps trying).
    async fn create_repartition_topics(&self) -> bool {
        let (Some(kafka), Some(store)) = (&self.config.kafka, &self.store) else {
            return true;
        };
        if !self.config.pipelines.create_repartition_topics {
            // Provisioned elsewhere: the source waits until they exist.
            return true;
        }
        let topics: Vec<String> = self
            .specs
            .values()
            .filter_map(|s| {
                repartition_topic(
                    &self.config,
                    &store.reader(),
                    self.cluster.as_ref().map(|c| &c.generations),
                    s,
                )
            })
            .collect();
        if topics.is_empty() {
            return true;
        }
        let p = &self.config.pipelines;
        let created = crate::kafka::create_topics(
            kafka,
            &topics,
            repartition_partitions(&self.config, &self.specs),
            p.repartition_replication,
            "repartition",
        );
        match tokio::time::timeout(std::time::Duration::from_secs(3), created).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot create repartition topics yet");
                false
            }
            Err(_) => {
                warn!("creating repartition topics timed out");
                false
            }
        }
    }

    /// Stops the data path: sources stop, the writer commits what it holds.
    pub async fn stop(&mut self) {
        let Some(path) = self.running.take() else {
            return;
        };
        path.shutdown.cancel();
        for t in path.tasks {
            if let Err(e) = t.await {
                error!(error = %e, "a data-path task panicked");
            }
        }
        let mut store: Option<Store> = None;
        let mut usable = true;
        for handle in path.writers {
            match handle.await {
                // A failed writer's store may be ahead of its disk: it is
                // not run again (the node is stopping; a restart reopens it).
                Ok(writer) if writer.failed => usable = false,
                Ok(writer) => match store.as_mut() {
                    None => store = Some(writer.store),
                    Some(s) => s.join(writer.store),
                },
                Err(e) => {
                    usable = false;
                    self.fatal.raise(format!("the state writer panicked: {e}"));
                }
            }
        }
        if usable {
            self.store = store;
        }
    }

    /// Validates and runs a spec (see [`Applied`]).
    pub async fn apply(&mut self, text: &str, dry_run: bool) -> Result<Applied, ApplyError> {
        let spec = PipelineSpec::from_yaml(text)?;
        let views = spec.views();
        self.check_views(&spec)?;
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
            spec.lowered_from(r)?;
        }
        if self.cluster.is_some() {
            return Err(ApplyError::Refused(
                "a cluster node applies specs through the replicated state".into(),
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
            if !has_view(store, v) {
                self.views.remove(v);
            }
        }
        // Views whose state was reset get a fresh watcher (their
        // subscribers' tokens no longer apply).
        for v in spec.views() {
            let first = spec.store_names(&v).first().and_then(|n| store.view_id(n));
            if self
                .views
                .get(&v)
                .is_some_and(|s| s.shards.first().map(|s| s.id) != first)
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
        {
            let mut people = 0;
            for merger in mergers_of(spec, store)? {
                store.set_prefix_scanned(merger.views.contributions);
                let mut txn = store.begin(now_ms());
                people += merger.refresh_all(&mut txn)?;
                txn.commit()?;
            }
            if people > 0 {
                info!(pipeline = %spec.name, people, "golden records recomputed under the new rules");
            }
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
                store.drop_sharded_view(v)?;
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

    /// Cluster mode: the change-log side of a data path. Every view gets the
    /// incarnation of its change log; views fed by sources (configured
    /// views, pipeline sources, merge contributions) get their log topic
    /// created and read.
    async fn open_logs(
        &mut self,
        shutdown: &CancellationToken,
        pool: &WriterPool,
    ) -> anyhow::Result<(Vec<ClusterWriter>, Vec<JoinHandle<()>>)> {
        let (Some(side), Some(section), Some(kafka)) =
            (&self.cluster, &self.config.cluster, &self.config.kafka)
        else {
            anyhow::bail!("cluster mode needs the cluster and kafka sections");
        };
        let store = self.store.as_mut().context("data path is running")?;
        // Every shard of a configured view has a log of its own.
        let mut logged: BTreeSet<String> = self.config.view_store_names();
        let mut all: Vec<(String, Option<u64>)> =
            logged.iter().map(|n| (n.clone(), None)).collect();
        for spec in self.specs.values() {
            for v in spec.views() {
                let g = side.generations.get(&v).copied();
                all.extend(spec.store_names(&v).into_iter().map(|n| (n, g)));
            }
            for s in spec.sources.keys() {
                logged.extend(spec.store_names(&spec.view(s)));
            }
            if let Some(c) = contributions_view(spec) {
                logged.extend(spec.store_names(&c));
            }
        }
        let mut topics = BTreeMap::new();
        let mut names = BTreeMap::new();
        let mut applied_tx = BTreeMap::new();
        let mut applied_rx = BTreeMap::new();
        let mut start = BTreeMap::new();
        for (name, generation) in all {
            let id = store
                .view_id(&name)
                .with_context(|| format!("view {name} is not registered"))?;
            let topic = crate::cluster::view_log_topic(section, &name, generation);
            store
                .set_incarnation(id, crate::cluster::incarnation_of(&topic))
                .with_context(|| format!("view {name}"))?;
            if !logged.contains(&name) {
                continue;
            }
            let next = store.next_offset(id, &crate::cluster::log_stream(&topic));
            let (atx, arx) = watch::channel(next.unwrap_or(0));
            applied_tx.insert(id, atx);
            applied_rx.insert(id, arx);
            start.insert(id, next);
            names.insert(id, name);
            topics.insert(id, topic);
        }
        let wanted: Vec<String> = topics.values().cloned().collect();
        let mut attempt = 0;
        while !wanted.is_empty()
            && let Err(e) = crate::cluster::create_log_topics(kafka, section, &wanted).await
        {
            attempt += 1;
            if attempt >= 30 {
                return Err(e);
            }
            warn!(error = %e, "change-log topics not ready; retrying");
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        let producer = client_config(kafka)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.max.bytes", "2097152")
            .create()
            .context("cannot create the change-log producer")?;
        let log = Arc::new(crate::cluster::ClusterLog {
            producer,
            topics,
            names,
            applied: applied_rx,
            revoked: Default::default(),
        });
        // A few batches of the largest records (512 KiB) per writer: a node
        // replaying a log holds tens of megabytes here, not a gigabyte.
        let (log_tx, log_rxs) = crate::views::Inputs::new(pool.by_view.clone(), pool.writers, 128);
        // Logs may be trimmed: a holder left behind copies its shard.
        let trimming = !section.log_trim_interval.is_zero();
        let copies = trimming.then(|| crate::cluster::ShardCopies {
            tls: crate::cluster::peer_client_tls(&self.config),
            dir: self.config.node.data_dir.join("shard-copies"),
        });
        let mut tasks = Vec::new();
        if trimming {
            let trimmer = crate::cluster::trim::run_log_trimmer(
                kafka.clone(),
                log.clone(),
                side.coordinator.clone(),
                section.log_trim_interval,
                section.log_trim_slack,
                shutdown.clone(),
            );
            tasks.push(tokio::spawn(
                async move {
                    if let Err(e) = trimmer.await {
                        error!(error = %e, "change-log trimming failed");
                    }
                }
                .instrument(info_span!("log_trimmer")),
            ));
        }
        tasks.push(tokio::spawn(
            crate::cluster::trim::report_log_positions(
                log.clone(),
                self.reader.clone(),
                side.coordinator.clone(),
                section.heartbeat_interval,
                shutdown.clone(),
            )
            .instrument(info_span!("log_positions")),
        ));
        let task = tokio::spawn(
            {
                let kafka = kafka.clone();
                let log = log.clone();
                let shutdown = shutdown.clone();
                let coordinator = side.coordinator.clone();
                async move {
                    if let Err(e) = crate::cluster::run_log_source(
                        kafka,
                        log,
                        coordinator,
                        start,
                        log_tx,
                        copies,
                        shutdown,
                    )
                    .await
                    {
                        error!(error = %e, "change-log source failed");
                    }
                }
            }
            .instrument(info_span!("log_source")),
        );
        // Each writer applies the logs of its views and says how far.
        let mut applied: Vec<BTreeMap<ViewId, watch::Sender<u64>>> =
            (0..pool.writers).map(|_| BTreeMap::new()).collect();
        for (view, tx) in applied_tx {
            let w = pool.by_view.get(&view).copied().unwrap_or(0);
            applied[w].insert(view, tx);
        }
        let writers = log_rxs
            .into_iter()
            .zip(applied)
            .map(|(log_rx, applied)| ClusterWriter {
                coordinator: side.coordinator.clone(),
                log: log.clone(),
                log_rx: Some(log_rx),
                applied,
                pending: Default::default(),
            })
            .collect();
        tasks.push(task);
        Ok((writers, tasks))
    }

    /// Cluster mode: whether this node runs exactly the replicated specs.
    pub fn in_sync(&self, replicated: &BTreeMap<String, StoredSpec>) -> bool {
        self.cluster.as_ref().is_none_or(|side| {
            side.running.len() == replicated.len()
                && replicated
                    .iter()
                    .all(|(name, s)| side.running.get(name) == Some(&s.version))
        })
    }

    /// Cluster mode: brings the data path to the replicated specs.
    pub async fn sync(&mut self, replicated: &BTreeMap<String, StoredSpec>) -> anyhow::Result<()> {
        self.stop().await;
        let result = self.sync_stopped(replicated);
        if result.is_ok() {
            metrics::counter!(metric::PIPELINE_APPLIES, "outcome" => "replicated").increment(1);
        }
        self.start().await?;
        result
    }

    /// Cluster mode, data path stopped: runs the replicated specs. A view
    /// whose replicated generation differs from the one this node holds is
    /// dropped and rebuilt from the change log (and, for a merge, from
    /// re-keyed facts on a fresh repartition topic).
    fn sync_stopped(&mut self, replicated: &BTreeMap<String, StoredSpec>) -> anyhow::Result<()> {
        let store = self.store.as_mut().context("data path is running")?;
        let side = self.cluster.as_mut().context("not a cluster node")?;
        let reader = store.reader();
        let gone: Vec<String> = self
            .specs
            .keys()
            .filter(|n| !replicated.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(spec) = self.specs.remove(&name) {
                for v in spec.views() {
                    store.drop_sharded_view(&v)?;
                    self.views.remove(&v);
                    side.generations.remove(&v);
                    reader.set_cursor(&generation_key(&v), 0)?;
                }
            }
            store.remove_spec(&name)?;
            side.running.remove(&name);
            info!(pipeline = %name, "pipeline dropped (replicated)");
        }
        for (name, stored) in replicated {
            if side.running.get(name) == Some(&stored.version) {
                continue;
            }
            let new = match PipelineSpec::from_yaml(&stored.text) {
                Ok(s) => s,
                Err(e) => {
                    // Validated by the leader before it was replicated.
                    error!(pipeline = %name, error = %e, "replicated spec does not parse; not run");
                    continue;
                }
            };
            let old = self.specs.get(name).cloned();
            let new_views: BTreeSet<String> = new.views().into_iter().collect();
            let mut every: BTreeSet<String> = new_views.clone();
            if let Some(o) = &old {
                every.extend(o.views());
            }
            let mut dropped = BTreeSet::new();
            for v in &every {
                let want = stored.generations.get(v).copied();
                let have = side.generations.get(v).copied();
                if new_views.contains(v) && want == have && want.is_some() {
                    continue;
                }
                if store.drop_sharded_view(v)? {
                    dropped.insert(v.clone());
                }
                self.views.remove(v);
                side.generations.remove(v);
            }
            // A re-created source, merge or join re-reads its inputs.
            let merge_dropped = new
                .merges()
                .next()
                .is_some_and(|(m, _)| dropped.contains(&format!("{}.contributions", new.view(m))));
            for source in new.sources.keys() {
                let v = new.view(source);
                let join_dropped = new
                    .joins()
                    .any(|(j, js)| &js.stream == source && dropped.contains(&new.view(j)));
                if dropped.contains(&v) || merge_dropped || join_dropped {
                    for shard in new.store_names(&v) {
                        reader.set_cursor(&shard, 0)?;
                    }
                }
            }
            for v in &new_views {
                let g = stored.generations.get(v).copied().unwrap_or(stored.version);
                reader.set_cursor(&generation_key(v), g)?;
                side.generations.insert(v.clone(), g);
            }
            store.save_spec(name, &stored.text)?;
            self.specs.insert(name.clone(), new);
            side.running.insert(name.clone(), stored.version);
            info!(pipeline = %name, version = stored.version, ?dropped, "pipeline applied (replicated)");
        }
        self.register_views()
    }

    /// Cluster mode: validates a spec against the replicated state and
    /// computes what it replicates: its views' generations (a view keeps
    /// its generation, and so its state, unless its operator is reset).
    /// `None` when the spec is already running.
    pub fn plan_cluster(
        &self,
        text: &str,
        replicated: &BTreeMap<String, StoredSpec>,
    ) -> Result<(Applied, Option<StoredSpec>), ApplyError> {
        let spec = PipelineSpec::from_yaml(text)?;
        self.check_views(&spec)?;
        let views = spec.views();
        let current = replicated.get(&spec.name);
        let old = current.and_then(|c| PipelineSpec::from_yaml(&c.text).ok());
        if let (Some(c), Some(o)) = (current, &old) {
            if o == &spec {
                return Ok((
                    Applied {
                        name: spec.name.clone(),
                        version: spec.version,
                        outcome: "unchanged",
                        views,
                        reset: Vec::new(),
                    },
                    None,
                ));
            }
            if spec.version <= c.version {
                return Err(ApplyError::Refused(format!(
                    "pipeline {} runs version {}; raise version above it to update",
                    spec.name, c.version
                )));
            }
            spec.lowered_from(o)?;
        }
        let mut reset = old
            .as_ref()
            .map(|o| reset_set(o, &spec))
            .unwrap_or_default();
        if let Some(o) = &old
            && o.operators != spec.operators
        {
            // Changed rules: a single node recomputes golden records from
            // the kept contributions; a cluster rebuilds the operators'
            // state through the change log, so that every node computes it
            // in the same order (docs/pipelines.md, "In a cluster").
            reset.extend(
                spec.operators
                    .keys()
                    .filter(|n| o.operators.contains_key(*n))
                    .cloned(),
            );
        }
        let mut generations = BTreeMap::new();
        let nodes = spec.sources.keys().chain(spec.operators.keys());
        for node in nodes {
            let kept = old.as_ref().is_some_and(|o| {
                (o.sources.contains_key(node) || o.operators.contains_key(node))
                    && !reset.contains(node)
            });
            for v in spec.node_views(node) {
                let g = match (kept, current) {
                    (true, Some(c)) => c.generations.get(&v).copied().unwrap_or(spec.version),
                    _ => spec.version,
                };
                generations.insert(v, g);
            }
        }
        Ok((
            Applied {
                name: spec.name.clone(),
                version: spec.version,
                outcome: if current.is_some() {
                    "updated"
                } else {
                    "created"
                },
                views,
                reset: reset.into_iter().collect(),
            },
            Some(StoredSpec {
                version: spec.version,
                text: text.to_string(),
                generations,
            }),
        ))
    }

    /// A spec may not take a configured view's name, and needs Kafka.
    fn check_views(&self, spec: &PipelineSpec) -> Result<(), ApplyError> {
        let config_views: BTreeSet<&str> =
            self.config.views.iter().map(|v| v.name.as_str()).collect();
        if let Some(clash) = spec
            .views()
            .iter()
            .find(|v| config_views.contains(v.as_str()))
        {
            return Err(ApplyError::Refused(format!(
                "view {clash} is already configured in the node's views section"
            )));
        }
        if self.config.kafka.is_none() {
            return Err(ApplyError::Refused(
                "this node has no kafka section; pipelines read Kafka topics".into(),
            ));
        }
        Ok(())
    }

    /// Cluster mode: the coordinator.
    pub fn coordinator(&self) -> Option<&Coordinator> {
        self.cluster.as_ref().map(|c| &c.coordinator)
    }

    pub fn specs(&self) -> &BTreeMap<String, PipelineSpec> {
        &self.specs
    }

    /// Repartition topic of a running pipeline, if it has a merge.
    pub fn repartition_topic(&self, spec: &PipelineSpec) -> Option<String> {
        repartition_topic(
            &self.config,
            &self.reader,
            self.cluster.as_ref().map(|c| &c.generations),
            spec,
        )
    }

    /// Stops the data path for good (node shutdown).
    pub async fn shutdown(&mut self) {
        self.stop().await;
    }
}

/// Single node: runs the spec files of `pipelines.files` that are newer than
/// what the node runs.
fn apply_files(
    config: &NodeConfig,
    store: &mut Store,
    specs: &mut BTreeMap<String, PipelineSpec>,
) -> anyhow::Result<()> {
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
                let reset = reconcile(store, specs.get(&spec.name), &spec)?;
                store.save_spec(&spec.name, &text)?;
                info!(pipeline = %spec.name, version = spec.version, ?reset, "pipeline from file applied");
                specs.insert(spec.name.clone(), spec);
            }
        }
    }
    Ok(())
}

/// A view to serve: its key columns, its shards, and the view whose shard
/// `i` writes its shard `i` (`None`: it is fed itself).
struct PipelineView {
    name: String,
    keys: Vec<String>,
    shards: u32,
    placed_with: Option<String>,
    /// Split by the national-ID hash of its `national_id` key column (the
    /// merge's views), not by source partition.
    split_by_person: bool,
}

/// The contributions view of a pipeline's merge: fed by the repartition
/// topic, its log carries the effects on the golden records, conflicts and
/// joins of the same shard.
fn contributions_view(spec: &PipelineSpec) -> Option<String> {
    spec.merges()
        .next()
        .map(|(merge, _)| format!("{}.contributions", spec.view(merge)))
}

/// A pipeline's views with their key columns.
fn spec_views(spec: &PipelineSpec) -> Vec<PipelineView> {
    let contributions = contributions_view(spec);
    let view = |name: String, keys: &[&str], derived: bool| PipelineView {
        name,
        keys: keys.iter().map(|k| k.to_string()).collect(),
        shards: spec.shards,
        placed_with: if derived { contributions.clone() } else { None },
        split_by_person: true,
    };
    let mut out = Vec::new();
    for (name, source) in &spec.sources {
        out.push(PipelineView {
            name: spec.view(name),
            keys: source.key.clone(),
            shards: spec.shards,
            placed_with: None,
            split_by_person: false,
        });
    }
    for (name, op) in &spec.operators {
        match op {
            OperatorSpec::Merge(_) => {
                out.push(view(spec.view(name), &["national_id"], true));
                out.push(view(
                    format!("{}.conflicts", spec.view(name)),
                    &["attribute", "national_id"],
                    true,
                ));
                out.push(view(
                    format!("{}.contributions", spec.view(name)),
                    &["national_id", "source", "source_key"],
                    false,
                ));
            }
            OperatorSpec::Join(_) => {
                out.push(view(spec.view(name), &["national_id", "source_key"], true))
            }
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
    let reset = reset_set(old, new);
    let new_views: BTreeSet<String> = new.views().into_iter().collect();
    let mut drop: Vec<String> = old
        .views()
        .into_iter()
        .filter(|v| !new_views.contains(v))
        .collect();
    for name in &reset {
        drop.extend(new.node_views(name));
    }
    // A reset merge re-reads its inputs from the start: their re-keying
    // cursors go back to zero.
    for (name, rules) in new.merges() {
        if reset.contains(name) {
            for input in &rules.inputs {
                for shard in new.store_names(&new.view(input)) {
                    store.reader().set_cursor(&shard, 0)?;
                }
            }
        }
    }
    for (_, join) in new.joins() {
        if reset.contains(&join.table) || reset.contains(&join.stream) {
            for shard in new.store_names(&new.view(&join.stream)) {
                store.reader().set_cursor(&shard, 0)?;
            }
        }
    }
    for v in drop {
        store.drop_sharded_view(&v)?;
    }
    Ok(reset)
}

/// The sources and operators of `old` whose state `new` cannot keep: those
/// reshaped, and what reads them along the DAG (sources → merges → joins).
fn reset_set(old: &PipelineSpec, new: &PipelineSpec) -> BTreeSet<String> {
    let mut reset = old.reshaped(new);
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
    reset
}

/// Refuses to serve a configured view under a shard count other than the
/// one its state was written with: its rows, change streams and tokens are
/// per shard, and re-splitting them is a rebuild, not a restart.
pub fn check_shards(views: &[ViewConfig], stored: &[String]) -> anyhow::Result<()> {
    for view in views {
        let wanted: BTreeSet<String> = view.store_names().into_iter().collect();
        let found: Vec<&String> = stored
            .iter()
            .filter(|s| {
                *s == &view.name
                    || ndc_operators::shard::parse_store_name(s)
                        .is_some_and(|(v, _)| v == view.name)
            })
            .collect();
        if let Some(other) = found.iter().find(|s| !wanted.contains(**s)) {
            let had = found
                .iter()
                .filter(|s| ndc_operators::shard::parse_store_name(s).is_some())
                .count()
                .max(1);
            anyhow::bail!(
                "view {:?} is configured with {} shard(s) but its state in this data directory \
                 was written with {had} (found {other:?}); a view's shard count is fixed: keep \
                 `shards: {had}`, or rebuild the view under a new name (or from an empty data_dir)",
                view.name,
                view.shards
            );
        }
    }
    Ok(())
}

/// Cluster mode: the repartition topic of a pipeline, named after its
/// contributions view's generation (the same on every node).
pub fn cluster_repartition_topic(
    config: &NodeConfig,
    spec: &PipelineSpec,
    generations: &BTreeMap<String, u64>,
) -> Option<String> {
    let (merge, _) = spec.merges().next()?;
    let g = generations.get(&format!("{}.contributions", spec.view(merge)))?;
    Some(format!(
        "{}{}.{merge}.g{g}",
        config.pipelines.repartition_topic_prefix, spec.name
    ))
}

/// Cluster mode: every (view, Kafka topic) the cluster must consume, from
/// the configured views and the replicated specs. The leader registers
/// their partitions with the scheduler.
pub fn cluster_routes(
    config: &NodeConfig,
    specs: &BTreeMap<String, StoredSpec>,
) -> BTreeSet<(String, String, u32)> {
    let mut out = BTreeSet::new();
    for v in &config.views {
        for s in &v.sources {
            if let SourceConfig::Kafka(k) = s {
                out.insert((v.name.clone(), k.topic.clone(), v.shards));
            }
        }
    }
    for stored in specs.values() {
        let Ok(spec) = PipelineSpec::from_yaml(&stored.text) else {
            continue;
        };
        for (name, source) in &spec.sources {
            out.insert((spec.view(name), source.topic.clone(), spec.shards));
        }
        if let (Some(contributions), Some(topic)) = (
            contributions_view(&spec),
            cluster_repartition_topic(config, &spec, &stored.generations),
        ) {
            out.insert((contributions, topic, spec.shards));
        }
    }
    out
}

/// Repartition topic of a pipeline: named after its merge state (the
/// contributions view's id), so a reset merge starts on a fresh topic
/// instead of re-reading facts re-keyed by the old rules.
///
/// In a cluster it is named after the contributions view's generation
/// instead, the same on every node.
fn repartition_topic(
    config: &NodeConfig,
    store: &StoreReader,
    generations: Option<&BTreeMap<String, u64>>,
    spec: &PipelineSpec,
) -> Option<String> {
    if let Some(generations) = generations {
        return cluster_repartition_topic(config, spec, generations);
    }
    let contributions = contributions_view(spec)?;
    let id = store.view_id(spec.store_names(&contributions).first()?)?;
    Some(format!(
        "{}{}.{}",
        config.pipelines.repartition_topic_prefix,
        spec.name,
        id.as_u32()
    ))
}

/// The person-keyed tasks of a pipeline (its merge and the joins on it),
/// one per shard: shard `i` of the contributions writes shard `i` of the
/// golden records, conflicts and joins, as every person's facts meet in
/// one shard.
fn mergers_of(spec: &PipelineSpec, store: &Store) -> anyhow::Result<Vec<Merger>> {
    let Some((merge, rules)) = spec.merges().next() else {
        return Ok(Vec::new());
    };
    let base = spec.view(merge);
    let shard_ids = |view: &str| -> anyhow::Result<Vec<ViewId>> {
        spec.store_names(view)
            .iter()
            .map(|name| {
                store
                    .view_id(name)
                    .with_context(|| format!("view {name} is not registered"))
            })
            .collect()
    };
    let contributions = shard_ids(&format!("{base}.contributions"))?;
    let golden = shard_ids(&base)?;
    let conflicts = shard_ids(&format!("{base}.conflicts"))?;
    let mut joins = Vec::new();
    for (name, join) in spec.joins().filter(|(_, j)| j.table == merge) {
        joins.push((join, shard_ids(&spec.view(name))?));
    }
    Ok((0..contributions.len())
        .map(|i| Merger {
            rules: rules.clone(),
            views: MergeViews {
                contributions: contributions[i],
                golden: golden[i],
                conflicts: conflicts[i],
            },
            joins: joins
                .iter()
                .map(|(join, ids)| JoinRule {
                    stream: join.stream.clone(),
                    attributes: join.attributes.clone(),
                    view: ids[i],
                })
                .collect(),
        })
        .collect())
}

/// Partitions of the repartition topics this node creates: as configured,
/// and at least one per shard of the merges (the re-keying stage writes a
/// person's facts to the partition numbered as the person's shard).
fn repartition_partitions(config: &NodeConfig, specs: &BTreeMap<String, PipelineSpec>) -> i32 {
    let shards = specs
        .values()
        .filter(|s| s.repartitions())
        .map(|s| i32::try_from(s.shards).unwrap_or(i32::MAX))
        .max()
        .unwrap_or(1);
    config.pipelines.repartition_partitions.max(shards)
}

/// Whether the store holds any shard of `view`.
fn has_view(store: &Store, view: &str) -> bool {
    store.reader().view_names().iter().any(|n| {
        n == view || ndc_operators::shard::parse_store_name(n).is_some_and(|(v, _)| v == view)
    })
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
    runtime: &Runtime,
    store: Store,
    cluster: Option<(Vec<ClusterWriter>, Vec<JoinHandle<()>>)>,
    shutdown: CancellationToken,
    repartition_ready: bool,
    pool: WriterPool,
) -> Result<DataPath, (Store, anyhow::Error)> {
    let Runtime {
        config,
        specs,
        views,
        readiness,
        committed,
        ..
    } = runtime;
    let generations = runtime.cluster.as_ref().map(|c| &c.generations);
    let (tx, rxs) = crate::views::Inputs::new(
        pool.by_view.clone(),
        pool.writers,
        config.pipeline.channel_per_writer(),
    );
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
            if spec.rekey_column(name).is_some() {
                for shard in spec.store_names(&spec.view(name)) {
                    if let Some(id) = store.view_id(&shard) {
                        store.set_truncate_as_deletes(id, true);
                    }
                }
            }
        }
        // The merge reads a person's contributions by key prefix.
        if let Some(contributions) = contributions_view(spec) {
            for shard in spec.store_names(&contributions) {
                if let Some(id) = store.view_id(&shard) {
                    store.set_prefix_scanned(id);
                }
            }
        }
    }
    let view_id = |name: &str| {
        store
            .view_id(name)
            .with_context(|| format!("view {name} is not registered"))
    };
    let setup = (|| -> anyhow::Result<()> {
        for view in &config.views {
            let shards: Arc<[(ViewId, Arc<str>)]> = view
                .store_names()
                .into_iter()
                .map(|n| Ok((view_id(&n)?, Arc::from(n.as_str()))))
                .collect::<anyhow::Result<Vec<_>>>()?
                .into();
            let id = shards[0].0;
            for source in &view.sources {
                match source {
                    SourceConfig::Kafka(k) => {
                        routes.entry(k.topic.clone()).or_default().push(Route {
                            shards: shards.clone(),
                            decoder: decoder(k.format, &view.key_columns, None),
                        })
                    }
                    SourceConfig::File(f) => {
                        let fs = FileSource {
                            path: f.path.clone(),
                            view: id,
                            decoder: decoder(f.format, &view.key_columns, None),
                            start_line: store.next_offset(id, &file_stream(&f.path)).unwrap_or(0),
                            follow: f.follow,
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
        let shards_of =
            |spec: &PipelineSpec, view: &str| -> anyhow::Result<Vec<(ViewId, Arc<str>)>> {
                spec.store_names(view)
                    .into_iter()
                    .map(|n| Ok((view_id(&n)?, Arc::from(n.as_str()))))
                    .collect()
            };
        for spec in specs.values() {
            let mut forward = Vec::new();
            for (name, source) in &spec.sources {
                let view = spec.view(name);
                let shards: Arc<[(ViewId, Arc<str>)]> = shards_of(spec, &view)?.into();
                routes.entry(source.topic.clone()).or_default().push(Route {
                    shards: shards.clone(),
                    decoder: decoder(source.format, &source.key, national_id_check(spec, name)),
                });
                if let Some(column) = spec.rekey_column(name) {
                    for (id, store_name) in shards.iter() {
                        forward.push(ForwardSource {
                            source: name.clone(),
                            view: *id,
                            store_name: store_name.to_string(),
                            column: column.to_string(),
                            commits: views
                                .shard_receiver(&view, store_name)
                                .context("view served")?,
                        });
                    }
                }
            }
            let Some(contributions) = contributions_view(spec) else {
                continue;
            };
            let topic = repartition_topic(config, &store.reader(), generations, spec)
                .context("merge views registered")?;
            for merger in mergers_of(spec, &store)? {
                mergers.insert(merger.views.contributions, merger);
            }
            routes.entry(topic.clone()).or_default().push(Route {
                shards: shards_of(spec, &contributions)?.into(),
                decoder: decoder(Format::Facts, &[], None),
            });
            repartition_topics.push(topic.clone());
            forwarders.push((spec.name.clone(), topic, spec.shards, forward));
        }
        for (view, _) in routes.values().flatten().flat_map(|r| r.shards.iter()) {
            for (stream, next) in store.offsets_of(*view) {
                start_offsets.insert((*view, stream.to_string()), next);
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
            .set(
                "message.max.bytes",
                crate::writer::dead_letter::PRODUCER_MAX_MESSAGE_BYTES.to_string(),
            )
            .create()
            .and_then(|producer| Ok((producer, client_config(k).create()?)))
        {
            Ok((producer, admin)) => DeadLetterSink::kafka(
                producer,
                admin,
                k.dead_letter_topic.clone(),
                config.node.id.clone(),
            ),
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
    let (cluster_writers, cluster_tasks) = match cluster {
        Some((w, t)) => (Some(w), t),
        None => (None, Vec::new()),
    };
    let cluster_side = cluster_writers
        .as_ref()
        .and_then(|w| w.first())
        .map(|w| (w.coordinator.clone(), w.log.clone()));
    if routes.is_empty() {
        readiness.set(true);
    } else if let Some(k) = &config.kafka {
        if !repartition_ready && !repartition_topics.is_empty() {
            let kafka = k.clone();
            let section = config.pipelines.clone();
            let partitions = repartition_partitions(config, specs);
            let topics = repartition_topics.clone();
            // Not created at start (broker slow or down): keep trying; the
            // source waits for missing topics, so this only delays.
            tasks.push(tokio::spawn(async move {
                let mut attempt = 0;
                while let Err(e) = crate::kafka::create_topics(
                    &kafka,
                    &topics,
                    partitions,
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
            cluster: cluster_side.clone(),
        };
        tasks.push(tokio::spawn(
            async move {
                if let Err(e) = source.run().await {
                    error!(error = %e, "Kafka source failed");
                }
            }
            .instrument(info_span!("kafka_source")),
        ));
        for (pipeline, topic, shards, sources) in forwarders {
            let mut producer_config = client_config(k);
            producer_config
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("linger.ms", "2")
                // A broker that does not answer fails a round in 30 s (then
                // retried) rather than holding a pipeline apply for minutes.
                .set("message.timeout.ms", "30000");
            let producer = match producer_config.create() {
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
                person_shards: shards,
                sources,
                reader: store.reader(),
                producer,
                producer_config,
                shutdown: shutdown.clone(),
                cluster: cluster_side.clone(),
            };
            tasks.push(tokio::spawn(
                f.run()
                    .instrument(info_span!("rekey", pipeline = %pipeline)),
            ));
        }
    }
    drop(tx);
    tasks.extend(cluster_tasks);
    // The pool: the first writer keeps the store handle and every view not
    // given to another; each other writer splits off its own views.
    let mut store = store;
    let mut stores: Vec<Store> = (1..pool.writers)
        .map(|w| {
            let mine: Vec<ViewId> = pool
                .by_view
                .iter()
                .filter(|(_, i)| **i == w)
                .map(|(v, _)| *v)
                .collect();
            store.split_off(&mine)
        })
        .collect();
    stores.insert(0, store);
    let mut cluster_writers = cluster_writers.map(Vec::into_iter);
    let all_commits = views.publishers();
    let mergers = Mergers::new(mergers);
    let writers = stores
        .into_iter()
        .zip(rxs)
        .enumerate()
        .map(|(i, (store, rx))| {
            // Each writer publishes the commits of its own views.
            let held: std::collections::HashSet<ViewId> = store.held_views().into_iter().collect();
            let commits = Arc::new(
                all_commits
                    .iter()
                    .filter(|(v, _)| held.contains(v))
                    .map(|(v, c)| (*v, c.clone()))
                    .collect(),
            );
            Writer {
                index: i,
                store,
                rx,
                dead_letters: dead_letters.clone(),
                commits,
                committed_offsets: committed.clone(),
                pipeline: config.pipeline.clone(),
                changelog: config.changelog.clone(),
                mergers: mergers.clone(),
                cluster: cluster_writers.as_mut().and_then(Iterator::next),
                inflight: None,
                unwritten: Default::default(),
                batches: 0,
                spare_batch: Vec::new(),
                fatal: runtime.fatal.clone(),
                failed: false,
            }
            .spawn(info_span!("state_writer", writer = i))
        })
        .collect();
    Ok(DataPath {
        shutdown,
        tasks,
        writers,
    })
}
