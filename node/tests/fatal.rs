//! A node whose state store cannot be written stops, and says so with its
//! exit status: an `ndc node` process is started with a file-size limit
//! (`ulimit -f`; SIGXFSZ ignored, so a write past it fails with EFBIG as a
//! full disk would fail it) and fed an export larger than the limit. Its
//! state writer meets the store's write error, commits nothing more, the
//! node shuts down in order, and the process exits with status 70
//! (EX_SOFTWARE) — not a crash, not a hang, not 0. What it committed is
//! whole, and once the cause is gone a restart applies the rest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ndc_node::NodeConfig;
use ndc_node::config::{FileSourceConfig, SourceConfig, ViewConfig};
use ndc_node::quickstart::synthetic::{Feed, Table};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn a_state_store_that_cannot_be_written_stops_the_node_with_status_70() {
    let dir = tempfile::tempdir().unwrap();
    // An export of ~40 MB: its write-ahead log outgrows a 16 MiB limit.
    let export = dir.path().join("export.ndjson");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&export).unwrap());
        let mut feed = Feed::new(Table::Citizens, 1_767_225_600_000);
        for i in 0..60_000u64 {
            let e = feed.event('c', i, 0, None);
            out.write_all(e.value.as_deref().unwrap()).unwrap();
            out.write_all(b"\n").unwrap();
        }
    }
    let mut config = NodeConfig::default();
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.node.data_dir = dir.path().join("data");
    config.node.grpc_listen = loopback;
    config.node.http_listen = loopback;
    config.tls.insecure = true;
    config.audit.enabled = false;
    config.views = vec![ViewConfig {
        name: "citizens".into(),
        key_columns: vec!["person_id".into()],
        sources: vec![SourceConfig::File(FileSourceConfig {
            path: export.clone(),
            format: Default::default(),
            follow: false,
        })],
        columns: Default::default(),
        national_id: None,
        shards: 1,
    }];
    let config_path = dir.path().join("node.yaml");
    std::fs::write(&config_path, config.to_yaml().unwrap()).unwrap();
    let log_path = dir.path().join("node.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // dash's `ulimit -f` counts 512-byte blocks: 32768 is 16 MiB. `trap ''`
    // ignores SIGXFSZ, which `exec` keeps: the write fails instead of the
    // signal killing the process.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"trap '' XFSZ; ulimit -f 32768; exec "$0" node --config "$1""#)
        .arg(env!("CARGO_BIN_EXE_ndc"))
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the node did not stop within 120 s:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(70),
        "{status}; its log ends:\n{}",
        tail(&text)
    );
    // The write-ahead log's append met the limit, as it would a full disk.
    assert!(
        text.contains("fatal error: the node stops")
            && text.contains("cannot commit to the state store")
            && text.contains("File too large"),
        "{}",
        tail(&text)
    );
    assert!(
        text.contains("node stopped"),
        "an orderly stop:\n{}",
        tail(&text)
    );

    // What was committed is whole: every person below the stored offset is
    // there (each line inserts another one), no batch skipped.
    {
        let store = ndc_operators::Store::open(
            &ndc_operators::StoreConfig::new(config.node.data_dir.join("state")),
            &["citizens".to_string()],
        )
        .unwrap();
        let view = store.view_id("citizens").unwrap();
        let stream = ndc_node::sources::file_stream(&export);
        let next = store.next_offset(view, &stream).unwrap_or(0);
        let rows = store.meta(view).map_or(0, |m| m.live_rows);
        assert_eq!(rows, next, "rows committed = lines below the stored offset");
        assert!(
            next < 60_000,
            "the limit stopped it part-way ({next} lines)"
        );
    }

    // The cause gone (no limit), a restart resumes from the last commit
    // and applies the rest.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut node = ndc_testkit::NodeProcess::start_new(
            std::path::Path::new(env!("CARGO_BIN_EXE_ndc")),
            config,
            dir.path(),
            "restarted",
        )
        .unwrap();
        node.wait_ready(Duration::from_secs(60)).await.unwrap();
        ndc_testkit::wait_rows(node.grpc(), "citizens", 60_000).await;
    });
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
