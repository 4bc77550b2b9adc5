//! Change logs that stop growing forever: trimmed behind the lowest
//! position their holders still need, and a holder left behind a trimmed
//! log copies its shard's state from one that is not.
//!
//! Every holder tells the leader, in its heartbeats, how far it has applied
//! and committed each shard's log ([`report_log_positions`]). The leader
//! deletes each log's records below the lowest of its holders' positions
//! ([`run_log_trimmer`], Kafka `DeleteRecords`), keeping some records
//! (`cluster.log_trim_slack`, the last applied one at least) so that a
//! reader from an earlier offset always meets a gap rather than an empty
//! log. A shard with a holder that has not reported
//! (new, or down since this leader began) is not trimmed.
//!
//! A node that must read a shard's log from before where it now starts (a
//! new holder, or one that lost its disk) sees the gap: the log source asks
//! the shard's other holders for a copy of its whole state ([`copy_shard`],
//! the `State.CopyShard` RPC) that is at or past the log's start, has the
//! writer install it in place of what it had, and tails the log from the
//! copy's position.

use crate::cluster::ClusterLog;
use crate::config::KafkaSection;
use crate::telemetry::metric;
use anyhow::Context;
use ndc_coordinator::Coordinator;
use ndc_operators::{StateEntry, StateFamily, StoreReader};
use ndc_proto::cluster::state_client::StateClient;
use ndc_proto::cluster::{CopyShardRequest, ShardStateChunk, ShardStateEntry};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Entries per chunk of a copied shard.
const COPY_CHUNK_ENTRIES: usize = 1024;

/// Tells the coordinator, for its heartbeats, the committed position of
/// every shard log this node holds, and what each held shard's records
/// showed of where its keys sit (the leader routes keyed reads by it),
/// until `shutdown`.
pub async fn report_log_positions(
    log: Arc<ClusterLog>,
    reader: ndc_operators::StoreReader,
    coordinator: Coordinator,
    every: Duration,
    shutdown: CancellationToken,
) {
    let me = coordinator.node_id();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let applied = coordinator.watch().borrow().clone();
        let state = &applied.cluster;
        let held: Vec<(&String, u64)> = log
            .applied
            .iter()
            .filter_map(|(view, applied)| {
                let name = log.names.get(view)?;
                state.holds(me, name).then(|| (name, *applied.borrow()))
            })
            .collect();
        let positions: BTreeMap<String, u64> =
            held.iter().map(|(n, p)| ((*n).clone(), *p)).collect();
        // With the shard's last change in the same read: every change up to
        // it comes from records the placement covers.
        let placements: BTreeMap<String, (ndc_operators::shard::KeyPlacement, u64)> = held
            .iter()
            .filter_map(|(name, _)| {
                let meta = reader.view_meta(name).ok()?;
                Some(((*name).clone(), (meta.key_placement?, meta.last_seq)))
            })
            .collect();
        coordinator.set_log_positions(&positions);
        coordinator.set_key_placements(&placements);
    }
    // Stopped (the data path restarts, or the node stops): no positions
    // until it reads again, so the leader leaves its shards' logs alone
    // meanwhile — conservative, never wrong. What its shards showed of
    // their keys is left as last read: at worst behind, and any other
    // holder's break wins at the leader.
    coordinator.set_log_positions(&BTreeMap::new());
}

/// On the leader, every `every`: deletes the records of each shard log
/// below where all its holders are, less `slack` records (see the module
/// documentation).
pub async fn run_log_trimmer(
    kafka: KafkaSection,
    log: Arc<ClusterLog>,
    coordinator: Coordinator,
    every: Duration,
    slack: u64,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = crate::kafka::client_config(&kafka)
        .create()
        .context("cannot create the change-log trimming client")?;
    let topics: BTreeMap<String, String> = log
        .names
        .iter()
        .filter_map(|(view, name)| Some((name.clone(), log.topics.get(view)?.clone())))
        .collect();
    let shards: BTreeSet<String> = topics.keys().cloned().collect();
    // Where each log was trimmed to by this process (a new leader starts
    // again; deleting below a log's start changes nothing).
    let mut trimmed: BTreeMap<String, u64> = BTreeMap::new();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let Some(points) = coordinator.log_trim_points(&shards) else {
            trimmed.clear();
            continue;
        };
        let mut tpl = TopicPartitionList::new();
        let mut asked = Vec::new();
        for (shard, lowest) in points {
            // `slack` records every holder applied stay, the last one at
            // least: a reader from before them then meets a gap, never an
            // empty log.
            let to = lowest.saturating_sub(slack.max(1));
            if to == 0 || trimmed.get(&shard).is_some_and(|t| *t >= to) {
                continue;
            }
            let Some(topic) = topics.get(&shard) else {
                continue;
            };
            tpl.add_partition_offset(topic, 0, Offset::Offset(to as i64))?;
            asked.push((shard, topic.clone(), to));
        }
        if asked.is_empty() {
            continue;
        }
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let deleted = tokio::select! {
            r = admin.delete_records(&tpl, &opts) => r,
            _ = shutdown.cancelled() => return Ok(()),
        };
        match deleted {
            Ok(result) => {
                for (shard, topic, to) in asked {
                    let elem = result
                        .elements_for_topic(&topic)
                        .into_iter()
                        .find(|e| e.partition() == 0);
                    let error = elem.as_ref().and_then(|e| e.error().err());
                    // The broker's new start of the log, when it says.
                    let to = match elem.map(|e| e.offset()) {
                        Some(Offset::Offset(low)) if low >= 0 => low as u64,
                        _ => to,
                    };
                    match error {
                        None => {
                            let before = trimmed.insert(shard.clone(), to).unwrap_or(0);
                            coordinator.record_log_start(&shard, to);
                            metrics::counter!(metric::LOG_TRIMS, "outcome" => "trimmed")
                                .increment(1);
                            metrics::counter!(metric::LOG_RECORDS_TRIMMED)
                                .increment(to.saturating_sub(before));
                            info!(%shard, %topic, log_start = to, "change log trimmed");
                        }
                        Some(e) => {
                            metrics::counter!(metric::LOG_TRIMS, "outcome" => "failed")
                                .increment(1);
                            warn!(%shard, %topic, error = %e, "cannot trim a change log; will retry");
                        }
                    }
                }
            }
            Err(e) => {
                metrics::counter!(metric::LOG_TRIMS, "outcome" => "failed")
                    .increment(asked.len() as u64);
                warn!(error = %e, logs = asked.len(), "cannot trim the change logs (does the broker support DeleteRecords?); will retry");
            }
        }
    }
}

/// Serves `State.CopyShard`: this node's state of one shard it holds, with
/// the views its log writes besides (sent first), all as of one commit
/// (one snapshot): the log position the shard's offsets hold is exactly
/// what every view of the copy has applied.
pub fn serve_copy(
    reader: &StoreReader,
    coordinator: &Coordinator,
    views: &crate::views::ViewRegistry,
    shard: &str,
) -> Result<mpsc::Receiver<Result<ShardStateChunk, tonic::Status>>, tonic::Status> {
    let holds = coordinator
        .watch()
        .borrow()
        .cluster
        .holds(coordinator.node_id(), shard);
    if !holds || reader.view_id(shard).is_none() {
        return Err(tonic::Status::failed_precondition(format!(
            "this node does not hold shard {shard}"
        )));
    }
    let (tx, rx) = mpsc::channel(4);
    let reader = reader.clone();
    let shard = shard.to_string();
    let mut names = views.written_with(&shard);
    names.push(shard.clone());
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut entries = 0u64;
        let exported = reader.export_views(&names, COPY_CHUNK_ENTRIES, |name, batch| {
            entries += batch.len() as u64;
            tx.blocking_send(Ok(chunk(name, batch, false))).is_ok()
        });
        match exported {
            Ok(()) => {
                if tx
                    .blocking_send(Ok(chunk(&shard, Vec::new(), true)))
                    .is_ok()
                {
                    metrics::counter!(metric::SHARD_COPIES, "side" => "sent").increment(1);
                    info!(%shard, entries, seconds = started.elapsed().as_secs_f64(), "shard state sent to a holder behind its trimmed log");
                }
            }
            Err(e) => {
                warn!(%shard, error = %e, "shard state not sent");
                let _ = tx.blocking_send(Err(tonic::Status::internal(e.to_string())));
            }
        }
    });
    Ok(rx)
}

fn chunk(view: &str, batch: Vec<StateEntry>, complete: bool) -> ShardStateChunk {
    ShardStateChunk {
        view: view.to_string(),
        entries: batch
            .into_iter()
            .map(|e| ShardStateEntry {
                family: e.family.number(),
                key: e.key,
                value: e.value,
            })
            .collect(),
        complete,
    }
}

/// A shard's state copied from a holder (by store view: the views its log
/// writes besides it, then the shard; each in a file), and the next log
/// offset it holds.
pub struct ShardCopy {
    pub views: Vec<(String, PathBuf)>,
    pub next_offset: u64,
    pub from: u64,
}

/// Copies `shard`'s state from one of its other holders whose copy has
/// applied its log (`stream`, in the offsets) at least up to `at_least`:
/// the log's start, so that the copy can be tailed from. `None` when no
/// holder has such a copy now (each tried once).
pub async fn copy_shard(
    coordinator: &Coordinator,
    copies: &super::ShardCopies,
    shard: &str,
    stream: &str,
    at_least: u64,
) -> Option<ShardCopy> {
    let me = coordinator.node_id();
    let holders = coordinator
        .watch()
        .borrow()
        .cluster
        .holders_among(shard, &coordinator.members());
    for peer in holders.into_iter().filter(|n| *n != me) {
        let Some(addr) = coordinator.member_addr(peer) else {
            continue;
        };
        match fetch_copy(&addr, copies, shard, stream).await {
            Ok((views, next_offset)) if next_offset >= at_least => {
                return Some(ShardCopy {
                    views,
                    next_offset,
                    from: peer,
                });
            }
            Ok((_, next_offset)) => {
                info!(%shard, peer, next_offset, at_least, "a holder's copy is behind the log's start too; trying another");
            }
            Err(e) => {
                warn!(%shard, peer, error = %e, "cannot copy a shard's state from a holder");
            }
        }
    }
    None
}

async fn fetch_copy(
    addr: &str,
    copies: &super::ShardCopies,
    shard: &str,
    stream: &str,
) -> anyhow::Result<(Vec<(String, PathBuf)>, u64)> {
    use ndc_operators::copy_file::CopyFileWriter;
    let mut client = StateClient::new(crate::client::channel(addr, Some(&copies.tls)).await?)
        .max_decoding_message_size(64 << 20);
    let mut chunks = client
        .copy_shard(CopyShardRequest {
            shard: shard.to_string(),
        })
        .await?
        .into_inner();
    // One file per view, as the chunks come: memory holds one chunk.
    let dir = copies.dir.join(shard);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut views: Vec<(String, PathBuf)> = Vec::new();
    let mut open: Option<(CopyFileWriter, u64)> = None;
    let mut next_offset = None;
    async fn finish(open: Option<(CopyFileWriter, u64)>) -> anyhow::Result<()> {
        if let Some((writer, _)) = open {
            tokio::task::spawn_blocking(move || writer.finish()).await??;
        }
        Ok(())
    }
    while let Some(chunk) = chunks.message().await? {
        if views.last().is_none_or(|(v, _)| *v != chunk.view) {
            finish(open.take()).await?;
            let path = dir.join(format!("{}.copy", views.len()));
            open = Some((CopyFileWriter::create(&path)?, 0));
            views.push((chunk.view.clone(), path));
        }
        let (Some((view, _)), Some((writer, written))) = (views.last(), open.as_mut()) else {
            continue;
        };
        for e in chunk.entries {
            let family = StateFamily::from_number(e.family)
                .with_context(|| format!("unknown state family {}", e.family))?;
            if family == StateFamily::Offsets && view == shard && e.key == stream.as_bytes() {
                let value = <[u8; 8]>::try_from(e.value.as_slice())
                    .context("a log offset that is not 8 bytes")?;
                next_offset = Some(u64::from_be_bytes(value));
            }
            writer.push(&StateEntry {
                family,
                key: e.key,
                value: e.value,
            })?;
            *written += 1;
        }
        if chunk.complete {
            if open.as_ref().is_some_and(|(_, n)| *n == 0) {
                // A view with nothing (the holder sends each view's
                // metadata, so only a view it no longer has).
                finish(open.take()).await?;
                if let Some((_, path)) = views.pop() {
                    let _ = std::fs::remove_file(path);
                }
            }
            finish(open.take()).await?;
            anyhow::ensure!(
                views.last().is_some_and(|(v, _)| v == shard),
                "the copy does not end with the shard itself"
            );
            return Ok((views, next_offset.unwrap_or(0)));
        }
    }
    anyhow::bail!("the copy ended before it was complete")
}
