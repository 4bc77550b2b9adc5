//! `ndc certs dev` as a newcomer uses it: certificates for a node and its
//! clients, a node serving mutual TLS with them, and the command line
//! reaching it with the variables the quickstart prints.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
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
    for who in ["subscriber", "admin"] {
        let out = with(who);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("citizens"),
            "{who}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = views(&[("NDC_CA", certs.join("ca.pem"))]);
    assert!(!out.status.success(), "no client certificate: refused");
    let out = views(&[]);
    assert!(!out.status.success(), "plaintext: refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--tls-ca"),
        "a plaintext client is told the node speaks TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The flags, beside `ndc subscribe`'s own --key (a key filter).
    let row = r#"{"op":"c","after":{"person_id":"079305000016","full_name":"Phạm Thị Lan"},"source":{"ts_ms":1,"lsn":1}}"#;
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
        out.status.success() && stdout.contains("Phạm Thị Lan"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.shutdown().await;
}
