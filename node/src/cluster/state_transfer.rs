//! State transfer: a node that starts without state copies a peer's.
//!
//! Every node applies the same change logs to the same state, and stores
//! the log positions it applied with that state (one commit). So a
//! consistent copy of any node's store — a RocksDB checkpoint — is a state
//! another node can start from and then tail the logs after those positions
//! to reach what every node has. A new node (or one that lost its disk)
//! thus costs a file copy and the logs' tail, not a replay of every log
//! from its start.
//!
//! The copy travels over the peer listener (mutual TLS between nodes):
//! [`StateService`] serves it, [`copy_from_peers`] fetches it into
//! `<state>.incoming`, syncs it and renames it into place before the store is
//! opened, so a crash half-way leaves no half-copied state behind.

use crate::client::ClientTls;
use crate::config::{ClusterSection, parse_peer};
use crate::telemetry::metric;
use ndc_coordinator::Coordinator;
use ndc_operators::StoreReader;
use ndc_proto::cluster::state_client::StateClient;
use ndc_proto::cluster::state_server::State;
use ndc_proto::cluster::{
    CheckpointChunk, CheckpointRequest, CopyShardRequest, DescribeStateRequest, ShardStateChunk,
    StateDescription,
};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

/// Bytes per chunk of a transferred file.
const CHUNK_BYTES: usize = 1 << 20;

/// Serves this node's state to peers that start without one.
pub struct StateService {
    reader: StoreReader,
    coordinator: Coordinator,
    views: crate::views::ViewRegistry,
    /// Where checkpoints are made (removed once sent).
    dir: PathBuf,
}

impl StateService {
    pub fn new(
        reader: StoreReader,
        coordinator: Coordinator,
        views: crate::views::ViewRegistry,
        data_dir: &Path,
    ) -> Self {
        let dir = data_dir.join("checkpoints");
        // Checkpoints an earlier process was sending when it stopped.
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            warn!(dir = %dir.display(), error = %e, "cannot remove old checkpoints");
        }
        StateService {
            reader,
            coordinator,
            views,
            dir,
        }
    }
}

/// A checkpoint directory, removed when the transfer ends however it ends.
struct Made(PathBuf);

impl Drop for Made {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            warn!(dir = %self.0.display(), error = %e, "cannot remove a sent checkpoint");
        }
    }
}

/// The files of a checkpoint, relative to it, in a stable order.
fn files_of(dir: &Path) -> std::io::Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_file() {
            out.push((PathBuf::from(entry.file_name()), meta.len()));
        }
    }
    out.sort();
    Ok(out)
}

/// Streams the checkpoint in `dir` into `tx`, file by file.
fn send_checkpoint(
    dir: &Path,
    tx: &mpsc::Sender<Result<CheckpointChunk, Status>>,
) -> std::io::Result<u64> {
    let files = files_of(dir)?;
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    let mut first = true;
    let mut sent = 0u64;
    let count = files.len();
    for (i, (name, _)) in files.into_iter().enumerate() {
        let mut file = std::fs::File::open(dir.join(&name))?;
        let mut offset = 0u64;
        loop {
            let mut data = Vec::with_capacity(CHUNK_BYTES);
            let n = (&mut file)
                .take(CHUNK_BYTES as u64)
                .read_to_end(&mut data)?;
            let last_of_file = n < CHUNK_BYTES;
            let chunk = CheckpointChunk {
                file: name.to_string_lossy().into_owned(),
                offset,
                data,
                complete: last_of_file && i + 1 == count,
                total_bytes: if first { total } else { 0 },
            };
            first = false;
            offset += n as u64;
            sent += n as u64;
            if tx.blocking_send(Ok(chunk)).is_err() {
                return Err(std::io::Error::other("the receiving node went away"));
            }
            if last_of_file {
                break;
            }
        }
    }
    Ok(sent)
}

#[tonic::async_trait]
impl State for StateService {
    async fn describe(
        &self,
        _request: Request<DescribeStateRequest>,
    ) -> Result<Response<StateDescription>, Status> {
        let reader = self.reader.clone();
        let changes = tokio::task::spawn_blocking(move || reader.changes_held())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(StateDescription {
            changes,
            caught_up: self.coordinator.caught_up(),
        }))
    }

    type CheckpointStream = ReceiverStream<Result<CheckpointChunk, Status>>;

    async fn checkpoint(
        &self,
        _request: Request<CheckpointRequest>,
    ) -> Result<Response<Self::CheckpointStream>, Status> {
        static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.dir.join(format!("{}-{n}", std::process::id()));
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Status::internal(format!("cannot create {}: {e}", self.dir.display())))?;
        let reader = self.reader.clone();
        let made = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || reader.checkpoint(&dir).map(|()| Made(dir)))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(format!("cannot make a checkpoint: {e}")))?
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            match send_checkpoint(&made.0, &tx) {
                Ok(bytes) => {
                    metrics::counter!(metric::STATE_SENT_BYTES).increment(bytes);
                    info!(
                        bytes,
                        seconds = started.elapsed().as_secs_f64(),
                        "state checkpoint sent to a starting peer"
                    );
                }
                Err(e) => {
                    warn!(error = %e, "state checkpoint not sent");
                    let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
                }
            }
            drop(made);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type CopyShardStream = ReceiverStream<Result<ShardStateChunk, Status>>;

    async fn copy_shard(
        &self,
        request: Request<CopyShardRequest>,
    ) -> Result<Response<Self::CopyShardStream>, Status> {
        let shard = request.into_inner().shard;
        let rx =
            crate::cluster::trim::serve_copy(&self.reader, &self.coordinator, &self.views, &shard)?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What [`copy_from_peers`] did.
#[derive(Debug)]
pub struct Copied {
    pub peer: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// Whether a state directory holds a store (else it is created empty).
fn holds_state(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// A node without state (`state_dir` missing or empty) copies the state of
/// the first caught-up peer with state to answer, if any does (see the module
/// documentation). Returns what it copied; `None` when the node has state,
/// or no peer has any (a new cluster): it then starts empty, as before.
/// A transfer that fails part-way is discarded, and the next peer tried.
pub async fn copy_from_peers(
    cluster: &ClusterSection,
    me: u64,
    state_dir: &Path,
    tls: &ClientTls,
) -> anyhow::Result<Option<Copied>> {
    if !cluster.state_from_peers || holds_state(state_dir) {
        return Ok(None);
    }
    let peers: Vec<(u64, String)> = cluster
        .bootstrap
        .iter()
        .filter_map(|e| parse_peer(e).ok())
        .filter(|(id, _)| *id != me)
        .collect();
    // Every peer at once, each given `state_from_peers_timeout`; the first
    // caught-up peer with state to answer is copied (a peer not started
    // yet, or gone, costs nothing once another has answered).
    let mut asks: futures::stream::FuturesUnordered<_> = peers
        .iter()
        .map(|(id, addr)| async move {
            let ask = async {
                let mut c = StateClient::new(crate::client::channel(addr, Some(tls)).await?);
                anyhow::Ok(c.describe(DescribeStateRequest {}).await?.into_inner())
            };
            match tokio::time::timeout(cluster.state_from_peers_timeout, ask).await {
                Ok(Ok(d)) => Some((*id, addr.clone(), d)),
                Ok(Err(e)) => {
                    info!(peer = id, error = %e, "peer cannot describe its state");
                    None
                }
                Err(_) => None,
            }
        })
        .collect();
    while let Some(answer) = futures::StreamExt::next(&mut asks).await {
        let Some((peer, addr, d)) = answer else {
            continue;
        };
        if !d.caught_up || d.changes == 0 {
            continue;
        }
        let started = Instant::now();
        match fetch(&addr, tls, state_dir).await {
            Ok(bytes) => {
                let copied = Copied {
                    peer,
                    bytes,
                    seconds: started.elapsed().as_secs_f64(),
                };
                metrics::counter!(metric::STATE_RECEIVED_BYTES).increment(bytes);
                metrics::gauge!(metric::STATE_COPY_SECONDS).set(copied.seconds);
                return Ok(Some(copied));
            }
            Err(e) => warn!(peer, error = %e, "cannot copy the peer's state; trying the next"),
        }
    }
    Ok(None)
}

/// Copies one peer's checkpoint into `<state_dir>.incoming`, syncs it and
/// renames it to `state_dir`. Returns the bytes copied.
async fn fetch(addr: &str, tls: &ClientTls, state_dir: &Path) -> anyhow::Result<u64> {
    use tokio::io::AsyncWriteExt;
    let incoming = state_dir.with_extension("incoming");
    if tokio::fs::try_exists(&incoming).await? {
        tokio::fs::remove_dir_all(&incoming).await?;
    }
    tokio::fs::create_dir_all(&incoming).await?;
    let mut c = StateClient::new(crate::client::channel(addr, Some(tls)).await?)
        .max_decoding_message_size(CHUNK_BYTES * 2);
    let mut stream = c.checkpoint(CheckpointRequest {}).await?.into_inner();
    // The file being written, and how much of it.
    let mut open: Option<(String, tokio::fs::File, u64)> = None;
    let mut bytes = 0u64;
    let mut complete = false;
    while let Some(chunk) = stream.message().await? {
        let name = Path::new(&chunk.file);
        anyhow::ensure!(
            name.components().count() == 1
                && matches!(
                    name.components().next(),
                    Some(std::path::Component::Normal(_))
                ),
            "the peer sent a file outside its checkpoint: {:?}",
            chunk.file
        );
        if open.as_ref().is_none_or(|(f, _, _)| *f != chunk.file) {
            if let Some((_, f, _)) = open.take() {
                f.sync_all().await?;
            }
            let file = tokio::fs::File::create(incoming.join(name)).await?;
            open = Some((chunk.file.clone(), file, 0));
        }
        if let Some((_, f, written)) = open.as_mut() {
            anyhow::ensure!(
                chunk.offset == *written,
                "the peer sent {:?} out of order (offset {}, {} written)",
                chunk.file,
                chunk.offset,
                written
            );
            f.write_all(&chunk.data).await?;
            *written += chunk.data.len() as u64;
        }
        bytes += chunk.data.len() as u64;
        if chunk.complete {
            complete = true;
            break;
        }
    }
    anyhow::ensure!(complete, "the copy ended before its last file");
    if let Some((_, f, _)) = open.take() {
        f.sync_all().await?;
    }
    tokio::fs::File::open(&incoming).await?.sync_all().await?;
    if tokio::fs::try_exists(state_dir).await? {
        tokio::fs::remove_dir(state_dir).await?; // empty: checked by the caller
    }
    tokio::fs::rename(&incoming, state_dir).await?;
    if let Some(parent) = state_dir.parent() {
        tokio::fs::File::open(parent).await?.sync_all().await?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A peer with state that sends the chunks it is given, then ends (or
    /// fails, when the script ends with an error).
    struct Scripted(Arc<Vec<Result<CheckpointChunk, Status>>>);

    #[tonic::async_trait]
    impl State for Scripted {
        async fn describe(
            &self,
            _: Request<DescribeStateRequest>,
        ) -> Result<Response<StateDescription>, Status> {
            Ok(Response::new(StateDescription {
                changes: 10,
                caught_up: true,
            }))
        }

        type CheckpointStream = ReceiverStream<Result<CheckpointChunk, Status>>;

        async fn checkpoint(
            &self,
            _: Request<CheckpointRequest>,
        ) -> Result<Response<Self::CheckpointStream>, Status> {
            let (tx, rx) = mpsc::channel(16);
            for item in self.0.iter() {
                tx.send(item.clone()).await.unwrap();
            }
            Ok(Response::new(ReceiverStream::new(rx)))
        }

        type CopyShardStream = ReceiverStream<Result<ShardStateChunk, Status>>;

        async fn copy_shard(
            &self,
            _: Request<CopyShardRequest>,
        ) -> Result<Response<Self::CopyShardStream>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    fn chunk(file: &str, offset: u64, data: &[u8], complete: bool) -> CheckpointChunk {
        CheckpointChunk {
            file: file.into(),
            offset,
            data: data.to_vec(),
            complete,
            total_bytes: 0,
        }
    }

    /// Serves `script` on a loopback port the system picks; returns the
    /// cluster section naming it as the only peer.
    async fn peer(script: Vec<Result<CheckpointChunk, Status>>) -> ClusterSection {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ndc_proto::cluster::state_server::StateServer::new(
                    Scripted(Arc::new(script)),
                ))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        ClusterSection {
            bootstrap: vec![format!("1={addr}")],
            ..ClusterSection::default()
        }
    }

    /// A copy is all or nothing: one that breaks off, or names a file
    /// outside the checkpoint, or skips bytes, leaves no state behind (the
    /// node starts empty, or copies again at its next start); a whole one
    /// is in place, byte for byte.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_of_a_peers_state_is_all_or_nothing() {
        let tls = ClientTls::default();
        let broken = [
            vec![
                Ok(chunk("000009.sst", 0, b"half", false)),
                Err(Status::internal("peer went away")),
            ],
            vec![Ok(chunk("../outside", 0, b"x", true))],
            vec![
                Ok(chunk("CURRENT", 0, b"MANIFEST", false)),
                Ok(chunk("CURRENT", 100, b"-000001", true)),
            ],
            // Ends without the last chunk.
            vec![Ok(chunk("CURRENT", 0, b"MANIFEST", false))],
        ];
        for script in broken {
            let dir = tempfile::tempdir().unwrap();
            let state = dir.path().join("state");
            let cluster = peer(script).await;
            let copied = copy_from_peers(&cluster, 0, &state, &tls).await.unwrap();
            assert!(copied.is_none());
            assert!(!holds_state(&state), "no state left by a broken copy");
            assert!(!dir.path().join("outside").exists());
        }

        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        // A leftover of a copy a crash interrupted is replaced.
        std::fs::create_dir_all(state.with_extension("incoming")).unwrap();
        std::fs::write(state.with_extension("incoming").join("junk"), b"junk").unwrap();
        let cluster = peer(vec![
            Ok(chunk("CURRENT", 0, b"MANIFEST", false)),
            Ok(chunk("CURRENT", 8, b"-000001\n", false)),
            Ok(chunk("MANIFEST-000001", 0, b"m", true)),
        ])
        .await;
        let copied = copy_from_peers(&cluster, 0, &state, &tls)
            .await
            .unwrap()
            .expect("a whole copy");
        assert_eq!((copied.peer, copied.bytes), (1, 17));
        assert_eq!(
            std::fs::read(state.join("CURRENT")).unwrap(),
            b"MANIFEST-000001\n"
        );
        assert_eq!(std::fs::read(state.join("MANIFEST-000001")).unwrap(), b"m");
        assert!(!state.join("junk").exists());
        assert!(!state.with_extension("incoming").exists());
        // A node with state copies nothing.
        assert!(
            copy_from_peers(&cluster, 0, &state, &tls)
                .await
                .unwrap()
                .is_none()
        );
    }
}
