//! Subscribers as tests use them: collect lines until a condition holds,
//! follow a view across restarts by resume token, fold changes into a copy,
//! and check that a stream is gapless and free of duplicates.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ndc_node::client::{self, From, SubscribeOptions};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A plain subscription of `view` at `addr` from `from`: every key and
/// field, no progress lines, no TLS, no reconnect (set fields to change).
pub fn subscription(addr: impl ToString, view: &str, from: From) -> SubscribeOptions {
    SubscribeOptions {
        addr: addr.to_string(),
        view: view.into(),
        from,
        keys: Vec::new(),
        fields: Vec::new(),
        limit: None,
        progress: false,
        reconnect: false,
        tls: None,
        token: None,
    }
}

/// Runs `opts` and collects its lines until `done` says so or `timeout`.
pub async fn read_until(
    opts: SubscribeOptions,
    timeout: Duration,
    mut done: impl FnMut(&[Value]) -> bool + Send,
) -> Vec<Value> {
    let mut lines = Vec::new();
    let fut = client::subscribe(opts, |line| {
        lines.push(line);
        !done(&lines)
    });
    let _ = tokio::time::timeout(timeout, fut).await;
    lines
}

/// Subscribes (with progress lines) and collects output lines until `done`
/// says so or `timeout`.
pub async fn collect(
    addr: SocketAddr,
    view: &str,
    from: From,
    timeout: Duration,
    done: impl FnMut(&[Value]) -> bool + Send,
) -> Vec<Value> {
    let opts = SubscribeOptions {
        progress: true,
        ..subscription(addr, view, from)
    };
    read_until(opts, timeout, done).await
}

/// Change lines only (no progress / snapshot markers).
pub fn changes(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l.get("op").is_some()).collect()
}

/// Folds change lines into key → row, as a subscriber keeping a copy would.
pub fn fold(lines: &[Value]) -> BTreeMap<String, Value> {
    let mut state = BTreeMap::new();
    for l in lines {
        match l.get("op").and_then(Value::as_str) {
            Some("read" | "insert" | "update") => {
                state.insert(l["key"].to_string(), l["after"].clone());
            }
            Some("delete") => {
                state.remove(&l["key"].to_string());
            }
            Some("truncate") => state.clear(),
            _ => {}
        }
    }
    state
}

/// The lines a [`follow`]er has printed so far.
pub type Seen = Arc<Mutex<Vec<Value>>>;

/// A subscriber from `snapshot` that resumes with its last token whenever
/// its connection breaks (on the next address, when `addr` lists several);
/// returns the lines it prints and its task.
pub fn follow(addr: String, view: &str) -> (Seen, tokio::task::JoinHandle<anyhow::Result<()>>) {
    follow_keys(addr, view, &[])
}

/// A [`follow`]er of the rows of `keys` only (every key when empty), with
/// progress lines.
pub fn follow_keys(
    addr: String,
    view: &str,
    keys: &[String],
) -> (Seen, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let seen: Seen = Default::default();
    let sink = seen.clone();
    let task = tokio::spawn(client::subscribe(
        SubscribeOptions {
            reconnect: true,
            keys: keys.to_vec(),
            progress: !keys.is_empty(),
            ..subscription(addr, view, From::Snapshot)
        },
        move |line| {
            sink.lock().unwrap().push(line);
            true
        },
    ));
    (seen, task)
}

/// Where a subscriber is in the view's change streams: the sum over shards
/// of the highest sequence it saw in each (0 when none) — what `ListViews`
/// says the view committed (`committed_seq`) once it has caught up.
pub fn last_seq(lines: &[Value]) -> u64 {
    let mut top: BTreeMap<u64, u64> = BTreeMap::new();
    for l in lines {
        if let Some(seq) = l.get("seq").and_then(Value::as_u64) {
            let shard = l.get("shard").and_then(Value::as_u64).unwrap_or(0);
            let t = top.entry(shard).or_default();
            *t = (*t).max(seq);
        }
    }
    top.values().sum()
}

/// Where the last token a subscriber was given (with a change, a
/// completed snapshot or a progress line) stands in each shard.
pub fn last_positions(lines: &[Value]) -> Option<Vec<u64>> {
    let token = lines.iter().rev().find_map(|l| {
        l.get("resume_token")
            .or_else(|| l.get("progress")?.get("resume_token"))?
            .as_str()
    })?;
    let (_, positions) = ndc_node::security::token::peek(token)?;
    Some(positions.shards.iter().map(|p| p.seq).collect())
}

/// The sequence numbers a subscriber saw after its first completed snapshot,
/// checked, shard by shard, to be each delivered once, with no gap, in
/// order, continuing from the snapshot token's position in that shard.
/// Returns them in arrival order.
pub fn seqs_after_snapshot(lines: &[Value]) -> Vec<u64> {
    // The subscriber may have started before the first record: its snapshot
    // can be empty or partial, then the change stream continues from it.
    let snapshot_end = lines
        .iter()
        .position(|l| l.get("snapshot_complete").is_some())
        .expect("snapshot completed");
    let first_token = lines[snapshot_end]["resume_token"].as_str().unwrap();
    let start = ndc_node::security::token::peek(first_token)
        .unwrap()
        .1
        .shards;
    let mut per_shard: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut all = Vec::new();
    for l in lines[snapshot_end + 1..]
        .iter()
        .filter(|l| l.get("op").is_some())
    {
        let seq = l["seq"].as_u64().unwrap();
        let shard = l.get("shard").and_then(Value::as_u64).unwrap_or(0);
        per_shard.entry(shard).or_default().push(seq);
        all.push(seq);
    }
    for (shard, seqs) in per_shard {
        let first = start
            .get(shard as usize)
            .expect("a shard the token names")
            .seq;
        let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            seqs.len(),
            "a change of shard {shard} was delivered twice"
        );
        let want: Vec<u64> = (first + 1..=first + seqs.len() as u64).collect();
        assert_eq!(
            seqs, want,
            "gap or reordering in the change stream of shard {shard}"
        );
    }
    all
}

/// The view's committed sequence and live rows, per ListViews (plaintext).
pub async fn view_state(addr: SocketAddr, view: &str) -> Option<(u64, u64)> {
    use ndc_proto::v1::subscription_client::SubscriptionClient;
    let mut c = SubscriptionClient::connect(format!("http://{addr}"))
        .await
        .ok()?;
    let r = c
        .list_views(ndc_proto::v1::ListViewsRequest {})
        .await
        .ok()?;
    r.into_inner()
        .views
        .into_iter()
        .find(|v| v.name == view)
        .map(|v| (v.committed_seq, v.live_rows))
}

/// Waits until `view` holds `rows` live rows (per ListViews).
pub async fn wait_rows(addr: SocketAddr, view: &str, rows: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = 0;
    while Instant::now() < deadline {
        if let Some((_, live)) = view_state(addr, view).await {
            last = live;
            if last >= rows {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("view {view} has {last} rows, expected {rows}");
}
