//! TLS on the node's gRPC listener (rustls): a server certificate, and a
//! client CA for mutual TLS. The files are checked for changes every
//! `tls.reload_interval` (cert-manager rotates them in place): a new
//! connection's handshake uses the configuration read last, and streams open
//! on an older one keep it, so a rotation drops nothing. A file that cannot
//! be read or does not parse keeps the previous configuration, with a WARN
//! line and `ndc_tls_reloads_total{outcome="failed"}`.

use crate::config::TlsSection;
use crate::telemetry::metric;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{key}: cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tls.{key}: {path}: {message}")]
    Invalid {
        key: &'static str,
        path: PathBuf,
        message: String,
    },
}

/// The files a server configuration is built from.
#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    /// A client without a certificate completes the handshake (it must
    /// then bring a bearer token: access.jwt).
    client_cert_optional: bool,
}

impl Files {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    /// When each file was last modified (`None`: unreadable now).
    fn stamps(&self) -> Vec<Option<SystemTime>> {
        self.paths()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    fn load(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let certs = read_certificates("cert", &self.cert)?;
        if certs.is_empty() {
            return Err(TlsError::Invalid {
                key: "cert",
                path: self.cert.clone(),
                message: "no PEM certificate in it".into(),
            });
        }
        let key: PrivateKeyDer<'static> = read_pem("key", &self.key, |bytes| {
            PrivateKeyDer::from_pem_slice(bytes).map_err(|e| e.to_string())
        })?;
        // ring, as tonic's client uses: aws-lc-rs would add its C build
        // (minutes on two cores) for the post-quantum key exchange, which
        // rustls now deprecates ring's provider for lacking.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid {
                key: "cert",
                path: self.cert.clone(),
                message: e.to_string(),
            })?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let cas = read_certificates("client_ca", path)?;
                for ca in cas {
                    roots.add(ca).map_err(|e| TlsError::Invalid {
                        key: "client_ca",
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                }
                let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                );
                if self.client_cert_optional {
                    verifier = verifier.allow_unauthenticated();
                }
                let verifier = verifier.build().map_err(|e| TlsError::Invalid {
                    key: "client_ca",
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Invalid {
                key: "key",
                path: self.key.clone(),
                message: format!("does not go with tls.cert: {e}"),
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Every PEM certificate in a file.
fn read_certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    read_pem(key, path, |bytes| {
        CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    })
}

fn read_pem<T>(
    key: &'static str,
    path: &Path,
    parse: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<T, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    parse(&bytes).map_err(|message| TlsError::Invalid {
        key,
        path: path.to_path_buf(),
        message,
    })
}

/// The server configuration in force, and where it is read from.
pub struct ServerTls {
    files: Files,
    current: RwLock<Arc<rustls::ServerConfig>>,
    stamps: std::sync::Mutex<Vec<Option<SystemTime>>>,
    reload_interval: Duration,
}

impl ServerTls {
    /// Reads the configuration's files; `Ok(None)` when TLS is off
    /// (`tls.insecure: true`, already validated). With
    /// `client_cert_optional`, clients without a certificate complete the
    /// handshake (callers with bearer tokens).
    pub fn from_config(
        tls: &TlsSection,
        client_cert_optional: bool,
    ) -> Result<Option<Arc<ServerTls>>, TlsError> {
        let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
            return Ok(None);
        };
        let files = Files {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: tls.client_ca.clone(),
            client_cert_optional,
        };
        let stamps = files.stamps();
        let config = files.load()?;
        Ok(Some(Arc::new(ServerTls {
            files,
            current: RwLock::new(config),
            stamps: std::sync::Mutex::new(stamps),
            reload_interval: tls.reload_interval,
        })))
    }

    fn config(&self) -> Arc<rustls::ServerConfig> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads the files again if any changed since they were last read.
    fn reload_if_changed(&self) {
        let now = self.files.stamps();
        let Ok(mut seen) = self.stamps.lock() else {
            return;
        };
        if *seen == now {
            return;
        }
        *seen = now;
        match self.files.load() {
            Ok(config) => {
                if let Ok(mut current) = self.current.write() {
                    *current = config;
                }
                metrics::counter!(metric::TLS_RELOADS, "outcome" => "reloaded").increment(1);
                info!(cert = %self.files.cert.display(), "TLS certificate files changed: reloaded");
            }
            Err(e) => {
                metrics::counter!(metric::TLS_RELOADS, "outcome" => "failed").increment(1);
                warn!(error = %e, "TLS certificate files changed but cannot be used; keeping the previous ones");
            }
        }
    }

    /// Accepts TCP connections on `listener` and yields those whose TLS
    /// handshake succeeds (each on a task of its own: a slow or failing
    /// client holds up no other), until `shutdown`.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let watcher = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(watcher.reload_interval);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => watcher.reload_if_changed(),
                }
            }
        });
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            debug!(error = %e, "accept failed");
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(self.config());
                let tx = tx.clone();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                            .await;
                    match handshake {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => {
                            metrics::counter!(metric::TLS_HANDSHAKE_FAILURES).increment(1);
                            debug!(%peer, error = %e, "TLS handshake refused");
                        }
                        Err(_) => {
                            metrics::counter!(metric::TLS_HANDSHAKE_FAILURES).increment(1);
                            debug!(%peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}
