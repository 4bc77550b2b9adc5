//! How a node's life ends: an orderly stop asked for (SIGTERM, a test), or
//! a fatal error in a task that cannot go on without risking the state.
//!
//! Library code never exits the process. A task that meets a fatal error
//! (the state store cannot be read or written, the change log cannot be
//! written, the state writer panicked) stops doing work, raises it here, and
//! the node shuts down in order; [`crate::NodeHandle::wait`] hands the error
//! to `main`, which decides the exit code. A restart resumes from the last
//! commit, so stopping is always safe.

use std::sync::{Arc, OnceLock};
use tokio_util::sync::CancellationToken;

/// Why a node stopped on its own: the first fatal error raised.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct FatalError(pub String);

/// Raises a fatal error: records the first one and asks the node to stop.
/// Cheap to clone; every task that can fail fatally holds one.
#[derive(Clone, Debug)]
pub struct Fatal {
    stop: CancellationToken,
    first: Arc<OnceLock<FatalError>>,
}

impl Fatal {
    /// Raising cancels `stop` (the node's shutdown token).
    pub fn new(stop: CancellationToken) -> Fatal {
        Fatal {
            stop,
            first: Arc::new(OnceLock::new()),
        }
    }

    /// Records `error` (if it is the first) and asks the node to stop.
    pub fn raise(&self, error: impl std::fmt::Display) {
        let error = FatalError(error.to_string());
        tracing::error!(error = %error, "fatal error: the node stops (a restart resumes from the last commit)");
        metrics::counter!(crate::telemetry::metric::FATAL_ERRORS).increment(1);
        let _ = self.first.set(error);
        self.stop.cancel();
    }

    /// The first fatal error raised, if any.
    pub fn error(&self) -> Option<FatalError> {
        self.first.get().cloned()
    }

    /// Whether a fatal error was raised.
    pub fn raised(&self) -> bool {
        self.first.get().is_some()
    }
}

/// Runs `work`, turning a panic into an error: the caller stops and raises
/// it instead of unwinding through the task (or aborting the process).
pub fn catch_panic<T>(what: &str, work: impl FnOnce() -> T) -> Result<T, FatalError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        FatalError(format!("{what} panicked: {message}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_error_is_kept_and_the_node_is_asked_to_stop() {
        let stop = CancellationToken::new();
        let fatal = Fatal::new(stop.clone());
        assert!(!fatal.raised());
        fatal.raise("disk full");
        fatal.raise("and then something else");
        assert!(stop.is_cancelled());
        assert_eq!(fatal.error().map(|e| e.0), Some("disk full".to_string()));
    }

    #[test]
    fn a_panic_becomes_an_error_with_its_message() {
        let err = catch_panic("state writer", || panic!("boom {}", 7)).unwrap_err();
        assert_eq!(err.0, "state writer panicked: boom 7");
        assert_eq!(catch_panic("x", || 5).unwrap(), 5);
    }
}
