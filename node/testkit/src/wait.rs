//! Waiting on conditions, never for a fixed time, and reading a node's
//! HTTP endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How often a condition is checked again.
const POLL: Duration = Duration::from_millis(50);

/// Polls `f` until it holds; panics naming `what` after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// Polls the asynchronous `f` until it returns `Some`, and returns that;
/// panics naming `what` after `timeout`.
pub async fn eventually_async<T, F: Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// `GET path` on a node's HTTP port: the whole response, status line first.
pub async fn try_http_get(http: SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// [`try_http_get`], panicking when the node does not answer.
pub async fn http_get(http: SocketAddr, path: &str) -> String {
    try_http_get(http, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} from {http}: {e}"))
}

/// The node's Prometheus exposition.
pub async fn metrics_text(http: SocketAddr) -> String {
    http_get(http, "/metrics").await
}

/// The value of the first line of a Prometheus exposition that `line`
/// accepts; `None` when no line does. A matching line whose value does not
/// parse fails the test.
pub fn metric_value(text: &str, line: impl Fn(&str) -> bool) -> Option<f64> {
    let found = text.lines().find(|l| !l.starts_with('#') && line(l))?;
    let value = found.rsplit(' ').next().unwrap_or_default();
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("metric line without a number: {found}")),
    )
}
