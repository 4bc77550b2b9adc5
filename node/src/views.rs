//! The views a node serves, shared by the state writer (which publishes
//! commits) and the subscription service (which follows them). Views come
//! and go with pipeline specs while the node runs; a dropped view's watcher
//! closes, which ends its subscriptions.

use crate::telemetry::metric;
use ndc_operators::ViewId;
use ndc_proto::v1::Change;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, watch};

/// Commit watchers of the views the writer writes (shared with the
/// subscription registry, which outlives a writer).
pub type Commits = Arc<BTreeMap<ViewId, Arc<watch::Sender<Committed>>>>;

/// The head of a view's change stream, as the state writer last committed it.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    /// Last committed sequence.
    pub seq: u64,
    /// The changes of the last commit (the last of them is `seq`), when the
    /// writer kept them: a subscriber caught up to the one before takes them
    /// from here instead of reading them back from RocksDB. Shared by every
    /// subscriber, held until the next commit.
    pub latest: Option<Arc<[Change]>>,
}

impl Committed {
    /// The kept changes that come right after `cursor`, if the last commit
    /// is exactly what a subscriber at `cursor` needs next.
    pub fn next_after(&self, cursor: u64) -> Option<&Arc<[Change]>> {
        let latest = self.latest.as_ref()?;
        (latest.first()?.seq == cursor.checked_add(1)?).then_some(latest)
    }
}

/// What a state writer takes in, by the view it is for.
pub trait ForView {
    fn view(&self) -> ViewId;
}

/// The inputs of a pool of state writers: each view is written by one of
/// them (see `writer::assign_writers`), and its records go to that writer's
/// bounded channel — a full channel stops the sources feeding it.
pub struct Inputs<T> {
    /// View → index of its writer (views not listed: the first).
    by_view: Arc<HashMap<ViewId, usize>>,
    txs: Vec<mpsc::Sender<T>>,
}

impl<T> Clone for Inputs<T> {
    fn clone(&self) -> Self {
        Inputs {
            by_view: self.by_view.clone(),
            txs: self.txs.clone(),
        }
    }
}

impl<T: ForView> Inputs<T> {
    /// One channel of `capacity` per writer; returns the receivers in
    /// writer order.
    pub fn new(
        by_view: Arc<HashMap<ViewId, usize>>,
        writers: usize,
        capacity: usize,
    ) -> (Inputs<T>, Vec<mpsc::Receiver<T>>) {
        let (txs, rxs) = (0..writers.max(1))
            .map(|_| mpsc::channel(capacity.max(1)))
            .unzip();
        (Inputs { by_view, txs }, rxs)
    }

    fn to(&self, view: ViewId) -> &mpsc::Sender<T> {
        let i = self.by_view.get(&view).copied().unwrap_or(0);
        &self.txs[i.min(self.txs.len() - 1)]
    }

    /// Waits for room in the writer's channel; fails once that writer has
    /// stopped.
    pub async fn send(&self, item: T) -> Result<(), mpsc::error::SendError<T>> {
        self.to(item.view()).send(item).await
    }

    /// [`Inputs::send`] from a thread outside the runtime (file sources).
    pub fn blocking_send(&self, item: T) -> Result<(), mpsc::error::SendError<T>> {
        self.to(item.view()).blocking_send(item)
    }

    /// Whether every writer has stopped.
    pub fn is_closed(&self) -> bool {
        self.txs.iter().all(mpsc::Sender::is_closed)
    }
}

/// Receives a view's commits.
pub type CommitReceiver = watch::Receiver<Committed>;

/// One shard of a served view: a store view of its own.
#[derive(Debug, Clone)]
pub struct Shard {
    pub id: ViewId,
    /// Its name in the store (`view#i`, or the view's name with one shard).
    pub store_name: Arc<str>,
    /// Head of its change stream.
    pub commits: Arc<watch::Sender<Committed>>,
    /// The shard whose placement this one follows: itself, or for a view
    /// derived on another shard's log (a merge's golden records, conflicts
    /// and joins), that shard (its holders apply the log that writes it).
    pub placed_as: Arc<str>,
}

/// One served view.
#[derive(Debug, Clone)]
pub struct ServedView {
    /// Its shards, in shard order (one for an unsharded view).
    pub shards: Arc<[Shard]>,
    /// Key columns, to check subscribers' key filters (empty: any key).
    pub key_columns: Vec<String>,
    /// Level of each classified column; the others are `secret`.
    pub levels: Arc<BTreeMap<String, ndc_operators::masking::Level>>,
    /// The column naming the person a row is about (audit trail).
    pub national_id: Option<Arc<str>>,
    /// The key column whose national-ID hash picks a row's shard (a
    /// pipeline's merge views); `None`: any shard may hold any key (a
    /// replica's shard is its source partition, which depends on the
    /// producer's partitioner).
    pub split_by: Option<Arc<str>>,
}

impl ServedView {
    /// Split by source partition into more than one shard: a keyed read
    /// goes to one shard only while its keys are routed.
    fn keys_by_partition(&self) -> bool {
        self.split_by.is_none() && self.shards.len() > 1
    }
}

/// A shard to serve: its store view and last committed sequence.
#[derive(Debug, Clone)]
pub struct ShardHead {
    pub id: ViewId,
    pub store_name: String,
    pub last_seq: u64,
    /// See [`Shard::placed_as`]; `None`: itself.
    pub placed_as: Option<String>,
}

/// Every served view by name; cheap to clone.
#[derive(Debug, Clone)]
pub struct ViewRegistry {
    views: Arc<RwLock<BTreeMap<String, ServedView>>>,
    /// The node is stopping: no view is served any more, and asking for
    /// one is asking the wrong node, not naming a view that does not exist.
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// Replica views whose keys are routed to their shards, with the
    /// partition count they are placed by and each shard's verified point
    /// ([`ndc_operators::shard`], "Keys routed to their shard"): from the
    /// leader in a cluster, from the node's own shards alone.
    key_routes: Arc<watch::Sender<KeyRoutes>>,
    /// The same views with their partition counts only: changes only when a
    /// view is routed or stops being routed (the verified points above move
    /// with every heartbeat).
    routed_views: Arc<watch::Sender<RoutedViews>>,
}

/// Views whose keys are routed to their shards, with the partition count
/// and each shard's verified point.
pub type KeyRoutes = ndc_coordinator::KeyRoutes;

/// Views whose keys are routed to their shards (view → partition count).
pub type RoutedViews = Arc<BTreeMap<String, u32>>;

impl Default for ViewRegistry {
    fn default() -> Self {
        ViewRegistry {
            views: Default::default(),
            closed: Default::default(),
            key_routes: Arc::new(watch::channel(KeyRoutes::default()).0),
            routed_views: Arc::new(watch::channel(RoutedViews::default()).0),
        }
    }
}

impl ViewRegistry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ServedView>> {
        self.views
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ServedView>> {
        self.views
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Serves a view of one shard from its last committed sequence.
    pub fn insert(
        &self,
        name: &str,
        id: ViewId,
        last_seq: u64,
        key_columns: Vec<String>,
        levels: BTreeMap<String, ndc_operators::masking::Level>,
        national_id: Option<String>,
    ) {
        let shard = ShardHead {
            id,
            store_name: name.to_string(),
            last_seq,
            placed_as: None,
        };
        self.insert_sharded(name, vec![shard], key_columns, levels, national_id);
    }

    /// Serves a view from its shards' last committed sequences (kept if
    /// already served; a new classification replaces the old one, which
    /// ends the streams masked under it).
    pub fn insert_sharded(
        &self,
        name: &str,
        shards: Vec<ShardHead>,
        key_columns: Vec<String>,
        levels: BTreeMap<String, ndc_operators::masking::Level>,
        national_id: Option<String>,
    ) {
        let mut views = self.write();
        if let Some(v) = views.get_mut(name) {
            if *v.levels != levels {
                v.levels = Arc::new(levels);
            }
            v.national_id = national_id.map(Into::into);
            return;
        }
        let shards: Vec<Shard> = shards
            .into_iter()
            .map(|s| Shard {
                id: s.id,
                placed_as: s.placed_as.as_deref().unwrap_or(&s.store_name).into(),
                store_name: s.store_name.into(),
                commits: Arc::new(
                    watch::channel(Committed {
                        seq: s.last_seq,
                        latest: None,
                    })
                    .0,
                ),
            })
            .collect();
        views.entry(name.to_string()).or_insert_with(|| ServedView {
            shards: shards.into(),
            key_columns,
            levels: Arc::new(levels),
            national_id: national_id.map(Into::into),
            split_by: None,
        });
    }

    /// Says that `name`'s rows are split over its shards by the
    /// national-ID hash of `column` (a keyed read then needs only the
    /// keys' shards).
    pub fn set_split_by(&self, name: &str, column: &str) {
        if let Some(v) = self.write().get_mut(name) {
            v.split_by = Some(column.into());
        }
    }

    /// The shards that may hold rows with the given keys (JSON objects of
    /// the key columns), in shard order: only the keys' shards when the
    /// key decides the shard (a view split by national ID, or a replica
    /// while its keys are routed), else every shard.
    pub fn shards_of_keys(&self, name: &str, keys: &[ndc_operators::Key]) -> Option<Vec<bool>> {
        use ndc_operators::shard;
        let views = self.read();
        let view = views.get(name)?;
        let n = view.shards.len();
        if keys.is_empty() || n < 2 {
            return Some(vec![true; n]);
        }
        // A replica's keys' shards are known only while routed.
        let partitions = match view.split_by {
            Some(_) => None,
            None => self.key_route(name),
        };
        let shard_of = |key: &ndc_operators::Key| match (&view.split_by, partitions) {
            (Some(column), _) => serde_json::from_str::<serde_json::Value>(key.as_str())
                .ok()
                .and_then(|k| ndc_operators::merge::national_id_text(k.get(&**column)?))
                .map(|id| shard::of_national_id(&id, n as u32)),
            (None, Some(p)) => Some(shard::of_key(key.as_bytes(), p, n as u32)),
            (None, None) => None,
        };
        let mut wanted = vec![false; n];
        for key in keys {
            match shard_of(key).and_then(|s| wanted.get_mut(s as usize)) {
                Some(w) => *w = true,
                // A key without its national ID, or of a replica not routed,
                // could be anywhere.
                None => {
                    metrics::counter!(metric::KEYED_READS, "shards" => "all").increment(1);
                    return Some(vec![true; n]);
                }
            }
        }
        metrics::counter!(metric::KEYED_READS, "shards" => "routed").increment(1);
        Some(wanted)
    }

    /// Whether a keyed read of the view reads only its keys' shards.
    pub fn keyed_reads_routed(&self, name: &str) -> bool {
        match self.read().get(name) {
            Some(v) if v.shards.len() > 1 => v.split_by.is_some() || self.key_route(name).is_some(),
            _ => false,
        }
    }

    /// The partition count a replica view's keys are routed by, while they
    /// are ([`ViewRegistry::set_key_routes`]).
    pub fn key_route(&self, name: &str) -> Option<u32> {
        self.key_routes.borrow().get(name).map(|r| r.partitions)
    }

    /// Follows the routed views with each shard's verified point (moves with
    /// every heartbeat): a shard a keyed read leaves unread moves up with it.
    pub fn watch_key_routes(&self) -> watch::Receiver<KeyRoutes> {
        self.key_routes.subscribe()
    }

    /// Follows which views are routed: a keyed read that left shards unread
    /// ends when its view's route changes.
    pub fn watch_routed_views(&self) -> watch::Receiver<RoutedViews> {
        self.routed_views.subscribe()
    }

    /// Replaces the routed views (the leader's word in a cluster,
    /// [`ViewRegistry::local_key_routes`] on a single node).
    pub fn set_key_routes(&self, routes: KeyRoutes) {
        let sharded: Vec<String> = self
            .read()
            .iter()
            .filter(|(_, v)| v.keys_by_partition())
            .map(|(name, _)| name.clone())
            .collect();
        for name in sharded {
            let routed = routes.contains_key(&name);
            metrics::gauge!(metric::KEYS_ROUTED, "view" => name).set(f64::from(u8::from(routed)));
        }
        let views: BTreeMap<String, u32> = routes
            .iter()
            .map(|(name, r)| (name.clone(), r.partitions))
            .collect();
        self.routed_views.send_if_modified(|known| {
            for name in known.keys().filter(|n| !views.contains_key(*n)) {
                tracing::warn!(
                    view = %name,
                    "the view's keys are no longer known to sit in their shards (a shard's \
                     owner logged the record out of place): keyed reads now read every shard, \
                     and keyed subscriptions that relied on it resume over every shard"
                );
            }
            for name in views.keys().filter(|n| !known.contains_key(*n)) {
                tracing::info!(view = %name, "keyed reads of the view go to their keys' shards");
            }
            let changed = **known != views;
            if changed {
                *known = Arc::new(views);
            }
            changed
        });
        self.key_routes.send_if_modified(|known| {
            let changed = **known != *routes;
            if changed {
                *known = routes;
            }
            changed
        });
    }

    /// Single node: the replica views its own shards show routable.
    pub fn local_key_routes(&self, reader: &ndc_operators::StoreReader) -> KeyRoutes {
        let views: Vec<(String, Vec<Arc<str>>)> = self
            .read()
            .iter()
            .filter(|(_, v)| v.keys_by_partition())
            .map(|(name, v)| {
                let names = v.shards.iter().map(|s| s.store_name.clone()).collect();
                (name.clone(), names)
            })
            .collect();
        let mut routes = BTreeMap::new();
        for (name, shards) in views {
            // Each shard's placement with its last change, in one read.
            let metas: Vec<_> = shards.iter().map(|s| reader.view_meta(s).ok()).collect();
            let placements: Vec<_> = metas
                .iter()
                .map(|m| m.as_ref().and_then(|m| m.key_placement))
                .collect();
            if let Some(partitions) = ndc_operators::shard::key_route(&placements) {
                let verified_seqs = metas
                    .iter()
                    .map(|m| m.as_ref().map_or(0, |m| m.last_seq))
                    .collect();
                let route = ndc_coordinator::KeyRoute {
                    partitions,
                    verified_seqs,
                };
                routes.insert(name, route);
            }
        }
        Arc::new(routes)
    }

    /// The column naming the person a view's rows are about.
    pub fn national_id(&self, name: &str) -> Option<Arc<str>> {
        self.read().get(name).and_then(|v| v.national_id.clone())
    }

    /// Levels of a view's classified columns (the others are `secret`).
    pub fn levels(&self, name: &str) -> Arc<BTreeMap<String, ndc_operators::masking::Level>> {
        self.read()
            .get(name)
            .map(|v| v.levels.clone())
            .unwrap_or_default()
    }

    /// Stops serving a view; its subscribers' streams end.
    pub fn remove(&self, name: &str) {
        self.write().remove(name);
    }

    /// Stops serving every view (node shutdown).
    pub fn clear(&self) {
        self.write().clear();
    }

    /// Stops serving for good (the node is shutting down): every view's
    /// watcher is dropped, which ends its streams, and later requests are
    /// told to go elsewhere.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.clear();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn get(&self, name: &str) -> Option<ServedView> {
        self.read().get(name).cloned()
    }

    /// Commits of one shard of a view, by its store name.
    pub fn shard_receiver(&self, view: &str, store_name: &str) -> Option<CommitReceiver> {
        self.read().get(view).and_then(|v| {
            v.shards
                .iter()
                .find(|s| &*s.store_name == store_name)
                .map(|s| s.commits.subscribe())
        })
    }

    /// The shard whose placement the shard `store_name` follows (itself if
    /// no served view says otherwise).
    pub fn placed_as(&self, store_name: &str) -> Arc<str> {
        let view =
            ndc_operators::shard::parse_store_name(store_name).map_or(store_name, |(v, _)| v);
        self.read()
            .get(view)
            .and_then(|v| {
                v.shards
                    .iter()
                    .find(|s| &*s.store_name == store_name)
                    .map(|s| s.placed_as.clone())
            })
            .unwrap_or_else(|| store_name.into())
    }

    /// Store names of the shards written by `store_name`'s log besides
    /// itself: those placed as it (a merge's golden records, conflicts and
    /// joins, by its contributions' shards).
    pub fn written_with(&self, store_name: &str) -> Vec<String> {
        self.read()
            .values()
            .flat_map(|v| v.shards.iter())
            .filter(|s| &*s.placed_as == store_name && &*s.store_name != store_name)
            .map(|s| s.store_name.to_string())
            .collect()
    }

    /// Names of the served views.
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// A view's shards, in shard order.
    pub fn shards(&self, name: &str) -> Option<Arc<[Shard]>> {
        self.read().get(name).map(|v| v.shards.clone())
    }

    pub fn key_columns(&self, name: &str) -> Vec<String> {
        self.read()
            .get(name)
            .map(|v| v.key_columns.clone())
            .unwrap_or_default()
    }

    /// Commit publishers by view id, for a state writer.
    pub fn publishers(&self) -> Commits {
        Arc::new(
            self.read()
                .values()
                .flat_map(|v| v.shards.iter().map(|s| (s.id, s.commits.clone())))
                .collect(),
        )
    }
}

/// Keeps `views`' routed views as the cluster's leader says (`Some`), or as
/// the node's own shards show, re-read every `every` (`None`: a single
/// node holds every shard), until `shutdown`.
pub async fn follow_key_routes(
    views: ViewRegistry,
    leader: Option<ndc_coordinator::Coordinator>,
    reader: ndc_operators::StoreReader,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    match leader {
        Some(coordinator) => {
            let mut routes = coordinator.key_routes();
            loop {
                let now = routes.borrow_and_update().clone();
                views.set_key_routes(now);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = routes.changed() => if r.is_err() { return },
                }
            }
        }
        None => {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                views.set_key_routes(views.local_key_routes(&reader));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit_of(seqs: std::ops::RangeInclusive<u64>) -> Committed {
        let changes: Vec<Change> = seqs
            .clone()
            .map(|seq| Change {
                seq,
                ..Default::default()
            })
            .collect();
        Committed {
            seq: *seqs.end(),
            latest: Some(changes.into()),
        }
    }

    #[test]
    fn kept_changes_serve_only_the_subscriber_right_before_them() {
        let head = commit_of(11..=15);
        assert!(head.next_after(10).is_some());
        // Behind (a commit missed) or ahead (read past it from the store):
        // the store, not these changes.
        assert!(head.next_after(9).is_none());
        assert!(head.next_after(11).is_none());
        assert!(head.next_after(15).is_none());
        assert!(head.next_after(u64::MAX).is_none());
        let nothing_kept = Committed {
            seq: 15,
            latest: None,
        };
        assert!(nothing_kept.next_after(10).is_none());
    }
}
