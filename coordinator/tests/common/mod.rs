//! Helpers shared by the coordinator's integration tests.

use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it holds; panics naming `what` after
/// `timeout`.
pub async fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}
