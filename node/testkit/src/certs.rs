//! Certificates made with the `openssl` command (Debian package openssl),
//! independent of the node's own certificate code: for brokers behind TLS
//! and for clients whose certificates the node must accept or refuse.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs the `openssl` command in `dir` (Debian package openssl).
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client certificate `name.pem` / `name.key` in `dir`, signed by the CA
/// in `dir` (see [`make_certificates`]), valid for `days` (0: expired as
/// soon as its second is over; callers wait for `expired` to say so).
pub fn make_client_certificate(dir: &Path, name: &str, days: u32) -> (PathBuf, PathBuf) {
    let run = |args: &[&str]| openssl(dir, args);
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &csr,
        "-subj",
        &format!("/CN={name}"),
    ]);
    // X.509 v3 (rustls refuses v1), for client authentication.
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        &pem,
        "-days",
        &days.to_string(),
        "-extfile",
        &ext,
    ]);
    (dir.join(pem), dir.join(key))
}

/// Has the certificate in `pem` expired (by the `openssl` command's clock)?
pub fn expired(pem: &Path) -> bool {
    Command::new("openssl")
        .args(["x509", "-checkend", "0", "-noout", "-in"])
        .arg(pem)
        .status()
        .map(|s| !s.success())
        .unwrap_or(false)
}

/// A development CA and a certificate for 127.0.0.1 it signed, made with
/// the `openssl` command: `ca.pem`, `server.pem`, `server.key` in `dir`.
pub fn make_certificates(dir: &Path, ca_name: &str) -> PathBuf {
    let run = |args: &[&str]| openssl(dir, args);
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        &format!("/CN={ca_name}"),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    dir.join("ca.pem")
}
