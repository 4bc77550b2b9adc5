//! The views a node serves, shared by the state writer (which publishes
//! commits) and the subscription service (which follows them). Views come
//! and go with pipeline specs while the node runs; a dropped view's watcher
//! closes, which ends its subscriptions.

use ndc_operators::ViewId;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

/// One served view.
#[derive(Debug, Clone)]
pub struct ServedView {
    pub id: ViewId,
    /// Last committed sequence of its change stream.
    pub commits: Arc<watch::Sender<u64>>,
    /// Key columns, to check subscribers' key filters (empty: any key).
    pub key_columns: Vec<String>,
}

/// Every served view by name; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ViewRegistry(Arc<RwLock<BTreeMap<String, ServedView>>>);

impl ViewRegistry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ServedView>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ServedView>> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Serves a view from its last committed sequence (kept if already served).
    pub fn insert(&self, name: &str, id: ViewId, last_seq: u64, key_columns: Vec<String>) {
        self.write()
            .entry(name.to_string())
            .or_insert_with(|| ServedView {
                id,
                commits: Arc::new(watch::channel(last_seq).0),
                key_columns,
            });
    }

    /// Stops serving a view; its subscribers' streams end.
    pub fn remove(&self, name: &str) {
        self.write().remove(name);
    }

    /// Stops serving every view (node shutdown).
    pub fn clear(&self) {
        self.write().clear();
    }

    pub fn get(&self, name: &str) -> Option<ServedView> {
        self.read().get(name).cloned()
    }

    pub fn receiver(&self, name: &str) -> Option<watch::Receiver<u64>> {
        self.read().get(name).map(|v| v.commits.subscribe())
    }

    pub fn key_columns(&self, name: &str) -> Vec<String> {
        self.read()
            .get(name)
            .map(|v| v.key_columns.clone())
            .unwrap_or_default()
    }

    /// Commit publishers by view id, for a state writer.
    pub fn publishers(&self) -> crate::pipeline::Commits {
        Arc::new(
            self.read()
                .values()
                .map(|v| (v.id, v.commits.clone()))
                .collect(),
        )
    }
}
