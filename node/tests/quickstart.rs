//! `ndc quickstart` as a user runs it: one command, no broker installed.

#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn quickstart_replicates_and_shows_live_changes() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ndc"))
        .current_dir(dir.path())
        .args([
            "quickstart",
            "--duration",
            "8s",
            "--people",
            "50",
            "--rate",
            "20",
        ])
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quickstart failed\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("ndc subscribe --addr 127.0.0.1:"),
        "tells how to subscribe:\n{stdout}"
    );
    // With TLS on, and the certificates a second terminal needs.
    let export = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("export "))
        .unwrap_or_else(|| panic!("no export line:\n{stdout}"));
    for var in ["NDC_CA=", "NDC_CERT=", "NDC_KEY="] {
        let path = export
            .split_whitespace()
            .find_map(|w| w.strip_prefix(var))
            .unwrap_or_else(|| panic!("{var} in {export}"));
        assert!(
            dir.path().join(path).exists() || std::path::Path::new(path).exists(),
            "{path}"
        );
    }
    // Live inserts and deletes start right after the agency snapshot, so the
    // view holds about, not exactly, the 50 people when the demo subscribes.
    let rows: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("--- snapshot complete: "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no snapshot line:\n{stdout}"));
    assert!(
        (40..=70).contains(&rows),
        "snapshot of {rows} rows:\n{stdout}"
    );
    let live: Vec<serde_json::Value> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("--- snapshot complete"))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        live.len() >= 20,
        "expected live changes, got {}:\n{stdout}",
        live.len()
    );
    for c in &live {
        let id = c["key"]["person_id"].as_str().unwrap();
        ndc_operators::national_id::NationalId::parse(id).unwrap();
        assert!(c["resume_token"].is_string());
    }
    assert!(stdout.contains("quickstart stopped"));
    // The example pipeline ran: a golden record with provenance was shown.
    let golden: serde_json::Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("golden record: "))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no golden record shown:\n{stdout}"));
    ndc_operators::national_id::NationalId::parse(golden["national_id"].as_str().unwrap()).unwrap();
    assert_eq!(
        golden["_provenance"]["full_name"]["source"], "population",
        "{golden}"
    );
    let sources: std::collections::BTreeSet<&str> = golden["_contributors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["source"].as_str().unwrap())
        .collect();
    for source in ["population", "residence", "health"] {
        assert!(sources.contains(source), "{source} contributed: {golden}");
    }
}
