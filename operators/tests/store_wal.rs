//! The write-ahead log in its own directory (`StoreConfig::wal_dir`).

#![allow(clippy::unwrap_used)]

use ndc_operators::{Store, StoreConfig, StoreError};

fn logs_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn the_log_goes_to_wal_dir_and_a_moved_wal_dir_is_refused_not_silently_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let wal = dir.path().join("wal");
    let mut config = StoreConfig::new(&state);
    config.wal_dir = Some(wal.clone());

    let store = Store::open(&config, &[]).unwrap();
    store.reader().set_cursor("probe", 42).unwrap();
    drop(store);
    assert!(logs_in(&wal) > 0, "the log is in wal_dir");
    assert_eq!(logs_in(&state), 0, "and not with the state");

    // Same directory: the write is read back from the log.
    let store = Store::open(&config, &[]).unwrap();
    assert_eq!(store.reader().cursor("probe").unwrap(), 42);
    drop(store);

    // wal_dir dropped from the configuration while the log still has the
    // write: refused, naming both directories.
    let moved = StoreConfig::new(&state);
    let Err(err) = Store::open(&moved, &[]) else {
        panic!(
            "opened with the log's writes left behind in {}",
            wal.display()
        );
    };
    assert!(matches!(err, StoreError::WalMoved { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&wal.display().to_string()), "{text}");
    assert!(text.contains(&state.display().to_string()), "{text}");

    // The operator moves the files as told: the write is there.
    for e in std::fs::read_dir(&wal).unwrap().flatten() {
        std::fs::rename(e.path(), state.join(e.file_name())).unwrap();
    }
    let store = Store::open(&moved, &[]).unwrap();
    assert_eq!(store.reader().cursor("probe").unwrap(), 42);
}
