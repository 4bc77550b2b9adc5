//! `ndc certs dev` as a newcomer uses it: certificates for a node and its
//! clients, a node serving mutual TLS with them, and the command line
//! reaching it with the variables the quickstart prints.

#![allow(clippy::unwrap_used)]

use ndc_testkit::*;
use std::process::Command;

fn ndc() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ndc"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_certificates_give_a_node_mutual_tls_that_the_command_line_reaches() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = ndc()
        .args(["certs", "dev", "--out"])
        .arg(&certs)
        .args(["--name", "ndc-0.ndc-peers"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.pem",
        "ca.key",
        "node.pem",
        "node.key",
        "admin.pem",
        "admin.key",
        "subscriber.pem",
        "subscriber.key",
    ] {
        assert!(certs.join(f).exists(), "{f}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(certs.join("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keys are readable by their owner only");
    }
    let again = ndc()
        .args(["certs", "dev", "--out"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(!again.status.success(), "never overwrites certificates");

    let broker = Broker::start();
    broker.create_topic("population.public.citizens", 1).await;
    broker.create_topic("ndc.dead-letter", 1).await;
    let mut config = node_config(
        &dir.path().join("node"),
        &broker.bootstrap,
        &[("citizens", "population.public.citizens", &["person_id"])],
    );
    config.tls.insecure = false;
    config.tls.cert = Some(certs.join("node.pem"));
    config.tls.key = Some(certs.join("node.key"));
    config.tls.client_ca = Some(certs.join("ca.pem"));
    config.access.admins = vec!["admin".into()];
    let node = ndc_node::start(config).await.unwrap();
    let addr = node.addrs.grpc.to_string();

    let views = |env: &[(&str, std::path::PathBuf)]| {
        let mut c = ndc();
        c.args(["views", "--addr", &addr]);
        for var in ["NDC_CA", "NDC_CERT", "NDC_KEY"] {
            c.env_remove(var);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let with = |who: &str| {
        views(&[
            ("NDC_CA", certs.join("ca.pem")),
            ("NDC_CERT", certs.join(format!("{who}.pem"))),
            ("NDC_KEY", certs.join(format!("{who}.key"))),
        ])
    };
    // Both certificates get through TLS; neither is granted a view yet,
    // so neither sees one.
    for who in ["subscriber", "admin"] {
        let out = with(who);
        assert!(
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("citizens"),
            "{who}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The admin grants the subscriber the view, through the command line.
    let access = |who: &str, args: &[&str]| {
        let mut c = ndc();
        c.arg("access")
            .args(args)
            .args(["--addr", &addr])
            .env("NDC_CA", certs.join("ca.pem"))
            .env("NDC_CERT", certs.join(format!("{who}.pem")))
            .env("NDC_KEY", certs.join(format!("{who}.key")));
        c.output().unwrap()
    };
    let grant = [
        "grant",
        "subscriber",
        "--views",
        "citizens",
        "--purpose",
        "walk-through",
    ];
    let out = access("subscriber", &grant);
    assert!(!out.status.success(), "a subscriber may not grant");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs the admin role"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = access("admin", &grant);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = with("subscriber");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("citizens"),
        "granted, the subscriber sees the view: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = access("subscriber", &["whoami"]);
    let who: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(who["principal"], "subscriber");
    assert_eq!(who["authenticated_by"], "certificate");
    assert_eq!(who["grant"]["granted_by"], "admin");
    // A narrower grant replaces it: rows, columns, an expiry.
    let out = access(
        "admin",
        &[
            "grant",
            "subscriber",
            "--views",
            "citizens",
            "--rows",
            "birth_province_code=001,079",
            "--columns",
            "person_id,full_name",
            "--expires-in",
            "90d",
            "--purpose",
            "walk-through",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        g["row_filter"],
        serde_json::json!({"column": "birth_province_code", "values": ["001", "079"]})
    );
    assert_eq!(g["columns"], serde_json::json!(["person_id", "full_name"]));
    let ninety_days_ms = 90 * 24 * 3600 * 1000;
    let expires = g["expires_at_ms"].as_u64().unwrap() - g["granted_at_ms"].as_u64().unwrap();
    assert!(expires.abs_diff(ninety_days_ms) < 60_000, "{g}");
    let out = access("admin", &["list"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("\"walk-through\"") && listed.contains("\"configured\":true"),
        "{listed}"
    );
    let out = views(&[("NDC_CA", certs.join("ca.pem"))]);
    assert!(!out.status.success(), "no client certificate: refused");
    let out = views(&[]);
    assert!(!out.status.success(), "plaintext: refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--tls-ca"),
        "a plaintext client is told the node speaks TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The flags, beside `ndc subscribe`'s own --key (a key filter); the row
    // is inside the grant's rows, and comes with the grant's columns only.
    let row = r#"{"op":"c","after":{"person_id":"079305000016","full_name":"Phạm Thị Lan","birth_province_code":"079"},"source":{"ts_ms":1,"lsn":1}}"#;
    let producer = broker.producer();
    publish(
        &producer,
        "population.public.citizens",
        Some(br#"{"person_id":"079305000016"}"#),
        Some(row.as_bytes()),
    )
    .await;
    let out = ndc()
        .args([
            "subscribe",
            "--addr",
            &addr,
            "--view",
            "citizens",
            "--from",
            "snapshot",
        ])
        .args(["--key", r#"{"person_id":"079305000016"}"#, "--limit", "1"])
        .arg("--tls-ca")
        .arg(certs.join("ca.pem"))
        .arg("--tls-cert")
        .arg(certs.join("subscriber.pem"))
        .arg("--tls-key")
        .arg(certs.join("subscriber.key"))
        .env_remove("NDC_CA")
        .env_remove("NDC_CERT")
        .env_remove("NDC_KEY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("Phạm Thị Lan")
            && !stdout.contains("birth_province_code"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.shutdown().await;
}
