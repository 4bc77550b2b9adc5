//! A running node: state store, sources, state writer, gRPC and HTTP servers.

use crate::config::NodeConfig;
use crate::lifecycle::{Fatal, FatalError};
use crate::pipelines::runtime::Runtime;
use crate::serving::subscriptions::SubscriptionService;
use crate::telemetry::{self, Readiness};
use crate::views::ViewRegistry;
use anyhow::Context;
use ndc_operators::{Store, StoreConfig};
use ndc_proto::v1::access_server::AccessServer;
use ndc_proto::v1::pipelines_server::PipelinesServer;
use ndc_proto::v1::subscription_server::SubscriptionServer;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often a single node re-reads which of its views' keys are routed to
/// their shards (in a cluster the leader says so in every heartbeat).
const KEY_ROUTES_REFRESH: std::time::Duration = std::time::Duration::from_millis(500);
use tracing::{Instrument, error, info, info_span, warn};

/// Serves a tonic `router` on `listener` until `stop`: over TLS when `tls`
/// is `Some`, else plaintext. Plaintext connections get TCP_NODELAY (tonic's
/// own `tcp_nodelay` is ignored for an incoming stream, and with Nagle's
/// algorithm on, a change batch written behind one not yet acknowledged
/// waited for the subscriber's delayed ACK). A macro: the routers' layered
/// types differ.
macro_rules! serve {
    ($router:expr, $listener:expr, $tls:expr, $stop:expr) => {
        match $tls {
            Some(tls) => {
                let incoming = tls.incoming($listener, $stop.clone());
                $router
                    .serve_with_incoming_shutdown(incoming, $stop.cancelled_owned())
                    .await
            }
            None => {
                let incoming = tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::TcpListenerStream::new($listener),
                    |conn| {
                        let conn = conn?;
                        conn.set_nodelay(true)?;
                        Ok::<_, std::io::Error>(conn)
                    },
                );
                $router
                    .serve_with_incoming_shutdown(incoming, $stop.cancelled_owned())
                    .await
            }
        }
    };
}

/// Addresses a started node listens on; written to `<data_dir>/node.addr`
/// as JSON so that scripts and tests can find ports chosen at run time.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct NodeAddrs {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Cluster mode: the peer listener.
    #[serde(default)]
    pub peer: Option<SocketAddr>,
}

/// A started node. Dropping it does not stop it; call [`NodeHandle::shutdown`].
pub struct NodeHandle {
    pub addrs: NodeAddrs,
    pub readiness: Readiness,
    shutdown: CancellationToken,
    fatal: Fatal,
    main: JoinHandle<()>,
}

impl NodeHandle {
    /// Stops sources, lets the state writer commit what it holds, ends
    /// subscriptions, then stops the servers.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.main.await;
    }

    /// Waits until the node stops (after a shutdown request, or on its own
    /// after a fatal error, which is returned).
    pub async fn wait(self) -> Result<(), FatalError> {
        let _ = self.main.await;
        self.fatal.error().map_or(Ok(()), Err)
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Listening sockets handed to the node instead of bound by it, by name:
/// systemd socket activation (`LISTEN_FDS`, with `FileDescriptorName=`
/// `grpc`, `http`, `peer` giving `LISTEN_FDNAMES`). Whoever starts the node
/// keeps its ports across restarts, and tests hand each node process ports
/// they bound themselves, never releasing one for the node to pick up.
#[derive(Debug, Default)]
pub struct Listeners {
    pub grpc: Option<std::net::TcpListener>,
    pub http: Option<std::net::TcpListener>,
    pub peer: Option<std::net::TcpListener>,
}

impl Listeners {
    /// The sockets named in the environment (none when `LISTEN_FDS` is
    /// unset). Call it first thing in `main`, before any other thread runs:
    /// it clears the variables, as the protocol asks.
    pub fn from_env() -> anyhow::Result<Listeners> {
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        let mut fds = listenfd::ListenFd::from_env();
        let mut out = Listeners::default();
        if fds.len() == 0 {
            return Ok(out);
        }
        let names: Vec<&str> = names.split(':').collect();
        if names.len() != fds.len() {
            anyhow::bail!(
                "{} sockets handed to the node (LISTEN_FDS) but {} names (LISTEN_FDNAMES); name each grpc, http or peer",
                fds.len(),
                names.len()
            );
        }
        for (index, name) in names.into_iter().enumerate() {
            let listener = fds
                .take_tcp_listener(index)
                .map_err(|e| anyhow::anyhow!("socket {name} handed to the node: {e}"))?
                .ok_or_else(|| anyhow::anyhow!("socket {name} handed to the node is gone"))?;
            let slot = match name {
                "grpc" => &mut out.grpc,
                "http" => &mut out.http,
                "peer" => &mut out.peer,
                other => anyhow::bail!(
                    "socket named {other:?} handed to the node (LISTEN_FDNAMES): expected grpc, http or peer"
                ),
            };
            *slot = Some(listener);
        }
        Ok(out)
    }
}

/// Opens state, binds listeners and starts every task.
pub async fn start(config: NodeConfig) -> anyhow::Result<NodeHandle> {
    start_with(config, Listeners::default()).await
}

/// [`start`], listening on the sockets handed over where there are any.
pub async fn start_with(mut config: NodeConfig, handed: Listeners) -> anyhow::Result<NodeHandle> {
    let _ = telemetry::prometheus();
    // Loaded configurations have read their secrets already; one built in
    // code reads them here.
    if let Some(k) = &mut config.kafka
        && k.resolved_secrets.len() != k.secrets.len()
    {
        k.resolve_secrets()?;
    }
    // Before anything starts: unusable certificate files stop the node here.
    // With token issuers, a caller may come with a token instead of a
    // client certificate.
    let tls =
        crate::security::tls::ServerTls::from_config(&config.tls, !config.access.jwt.is_empty())?;
    std::fs::create_dir_all(&config.node.data_dir).with_context(|| {
        format!(
            "cannot create node.data_dir {}",
            config.node.data_dir.display()
        )
    })?;
    let view_names: Vec<String> = config.view_store_names();
    let mut store_config = StoreConfig::new(config.node.data_dir.join("state"));
    // A cluster node without state copies a peer's (it then tails the
    // change logs from the positions the copy holds).
    if let Some(cluster) = &config.cluster {
        if config.storage.wal_dir.is_some() && cluster.state_from_peers {
            info!(
                "storage.wal_dir is set: a node without state replays the change logs instead of copying a peer's state"
            );
        } else if let Some(me) = cluster.resolve_node_id(&config.node.id) {
            let tls = crate::cluster::peer_client_tls(&config);
            match crate::cluster::state_transfer::copy_from_peers(
                cluster,
                me,
                &store_config.path,
                &tls,
            )
            .await
            {
                Ok(Some(c)) => info!(
                    peer = c.peer,
                    bytes = c.bytes,
                    seconds = c.seconds,
                    "started from a copy of a peer's state; tailing the change logs from its positions"
                ),
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "cannot copy a peer's state; replaying the change logs instead")
                }
            }
        }
    }
    store_config.block_cache_bytes = config.storage.block_cache.as_usize();
    store_config.write_buffer_bytes = config.storage.write_buffer.as_usize();
    store_config.sync_commits = config.storage.sync_commits;
    store_config.compress_rows = config.storage.compress_rows;
    store_config.wal_dir = config.storage.wal_dir.clone();
    let mut store = Store::open(&store_config, &[]).with_context(|| {
        format!(
            "cannot open the state store in {} (is another node using this data_dir?)",
            store_config.path.display()
        )
    })?;
    crate::pipelines::runtime::check_shards(&config.views, &store.reader().stored_view_names()?)?;
    store.add_views(&view_names)?;
    let reader = store.reader();

    let grpc_listener = telemetry::bind_or_adopt(
        handed.grpc,
        config.node.grpc_listen,
        "gRPC (node.grpc_listen)",
    )
    .await?;
    let http_listener = telemetry::bind_or_adopt(
        handed.http,
        config.node.http_listen,
        "HTTP (node.http_listen)",
    )
    .await?;
    let peer_listener = match &config.cluster {
        Some(_) => Some(
            telemetry::bind_or_adopt(
                handed.peer,
                config.node.peer_listen,
                "peer gRPC (node.peer_listen)",
            )
            .await?,
        ),
        None => None,
    };
    let addrs = NodeAddrs {
        grpc: grpc_listener.local_addr()?,
        http: http_listener.local_addr()?,
        peer: peer_listener.as_ref().map(|l| l.local_addr()).transpose()?,
    };
    std::fs::write(
        config.node.data_dir.join("node.addr"),
        serde_json::to_vec(&addrs)?,
    )?;

    let shutdown = CancellationToken::new();
    let fatal = Fatal::new(shutdown.clone());
    let coordinator = match &config.cluster {
        Some(cluster) => {
            let cc = crate::cluster::coordinator_config(&config, cluster)?;
            let c = ndc_coordinator::Coordinator::start(cc)
                .await
                .context("cannot start the cluster coordinator")?;
            if let Some(k) = &config.kafka {
                let routes_of = config.clone();
                tokio::spawn(crate::cluster::register_partitions(
                    c.clone(),
                    Box::new(move |specs| {
                        crate::pipelines::runtime::cluster_routes(&routes_of, specs)
                    }),
                    k.clone(),
                    shutdown.clone(),
                ));
            }
            Some(c)
        }
        None => None,
    };
    let readiness = Readiness::default();
    let views = ViewRegistry::default();
    let runtime = Runtime::new(
        config.clone(),
        store,
        views.clone(),
        readiness.clone(),
        coordinator.clone(),
        fatal.clone(),
    )?;
    let runtime = Arc::new(tokio::sync::Mutex::new(runtime));
    runtime.lock().await.start().await?;
    tokio::spawn(
        crate::views::follow_key_routes(
            views.clone(),
            coordinator.clone(),
            reader.clone(),
            KEY_ROUTES_REFRESH,
            shutdown.clone(),
        )
        .instrument(info_span!("key_routes")),
    );
    if let Some(c) = &coordinator {
        tokio::spawn(
            crate::serving::pipelines_api::follow_replicated_specs(
                runtime.clone(),
                c.clone(),
                shutdown.clone(),
            )
            .instrument(info_span!("pipeline_sync")),
        );
    }

    // Who may call: grants replicated in a cluster, kept in the data
    // directory on a single node.
    let grants = match &coordinator {
        Some(c) => crate::serving::access::Grants::replicated(c.clone()),
        None => crate::serving::access::Grants::local(&config.node.data_dir)?,
    };
    let auth = Arc::new(crate::serving::access::Authenticator::new(
        &config.access,
        &config.tls,
        grants,
    )?);
    crate::serving::access::log_posture(&auth);
    tokio::spawn(
        auth.clone()
            .watch_keys(config.tls.reload_interval, shutdown.clone()),
    );
    let peer_client_tls = crate::cluster::peer_client_tls(&config);
    let mut hash_keys = ndc_operators::masking::HashKeys::default();
    for k in &config.access.hash_keys {
        let secret = std::fs::read(&k.file).with_context(|| {
            format!(
                "access.hash_keys: cannot read key version {} ({})",
                k.version,
                k.file.display()
            )
        })?;
        anyhow::ensure!(
            secret.len() >= 16,
            "access.hash_keys: key version {} is shorter than 16 bytes",
            k.version
        );
        hash_keys.insert(k.version, &secret);
    }

    // The audit trail: open before anything can be delivered.
    let (audit, audit_closed) = if config.audit.enabled {
        let dir = config.node.data_dir.join("audit");
        let (audit, closed) =
            crate::serving::audit::Audit::open(&dir, &config.node.id, config.storage.sync_commits)
                .with_context(|| format!("cannot open the audit trail in {}", dir.display()))?;
        (audit, Some(closed))
    } else {
        warn!("audit.enabled: false: deliveries and access changes are not recorded");
        (crate::serving::audit::Audit::default(), None)
    };
    if let (true, Some(k)) = (audit.is_enabled(), &config.kafka) {
        let producer: rdkafka::producer::FutureProducer = crate::kafka::client_config(k)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .context("cannot create the audit producer")?;
        tokio::spawn(
            crate::serving::audit::replicate(
                audit.clone(),
                producer,
                k.clone(),
                config.audit.clone(),
                shutdown.clone(),
            )
            .instrument(info_span!("audit_replication")),
        );
    }

    // Servers.
    let audit_service = crate::serving::audit_api::AuditService::new(
        audit.clone(),
        reader.clone(),
        views.clone(),
        runtime.clone(),
        config.node.id.clone(),
        config.audit.max_answer_records,
    );
    let service = SubscriptionService::new(
        reader.clone(),
        views.clone(),
        config.subscriptions.clone(),
        auth.clone(),
        config.access.max_streams_per_principal,
        Arc::new(hash_keys),
        audit.clone(),
    )
    .with_peers(coordinator.as_ref().map(|c| {
        crate::serving::shard_peer::PeerShards::new(
            c.clone(),
            peer_client_tls.clone(),
            views.clone(),
        )
    }));
    let pipelines = crate::serving::pipelines_api::PipelineService::new(
        runtime.clone(),
        coordinator.clone(),
        peer_client_tls.clone(),
        audit.clone(),
    );
    let access_service = crate::serving::access_api::AccessService::new(
        auth.clone(),
        peer_client_tls.clone(),
        audit.clone(),
    );
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ndc_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build gRPC reflection")?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<SubscriptionServer<SubscriptionService>>()
        .await;
    let server_stop = CancellationToken::new();
    let grpc_stop = server_stop.clone();
    let cluster_service = coordinator.as_ref().map(|c| c.cluster_service(false));
    let peer_task = match (&coordinator, peer_listener) {
        (Some(c), Some(listener)) => Some(start_peer_server(
            &config,
            c,
            listener,
            PeerServices {
                pipelines: crate::serving::pipelines_api::PipelineService::new(
                    runtime.clone(),
                    coordinator.clone(),
                    peer_client_tls.clone(),
                    audit.clone(),
                ),
                access: crate::serving::access_api::AccessService::new(
                    auth.clone(),
                    peer_client_tls.clone(),
                    audit.clone(),
                ),
                state: crate::cluster::state_transfer::StateService::new(
                    reader.clone(),
                    c.clone(),
                    views.clone(),
                    &config.node.data_dir,
                ),
                shards: crate::serving::shard_peer::ShardService::new(
                    reader.clone(),
                    views.clone(),
                    c.clone(),
                    &config.subscriptions,
                ),
            },
            server_stop.clone(),
        )?),
        _ => None,
    };
    if tls.is_none() {
        warn!(
            grpc = %addrs.grpc,
            "tls.insecure: the gRPC listener serves plaintext, without client certificates"
        );
    }
    metrics::gauge!(crate::telemetry::metric::TLS_INSECURE).set(if tls.is_none() {
        1.0
    } else {
        0.0
    });
    let max_request_bytes = config.subscriptions.max_request_bytes.as_usize();
    let grpc_task = tokio::spawn(async move {
        let router = tonic::transport::Server::builder()
            .layer(crate::serving::access::Gate::public(auth))
            .add_service(
                SubscriptionServer::new(service).max_decoding_message_size(max_request_bytes),
            )
            .add_service(PipelinesServer::new(pipelines))
            .add_service(AccessServer::new(access_service))
            .add_service(ndc_proto::v1::audit_server::AuditServer::new(audit_service))
            .add_service(reflection)
            .add_service(health_service)
            .add_optional_service(cluster_service);
        let result = serve!(router, grpc_listener, tls, grpc_stop);
        if let Err(e) = result {
            error!(error = %e, "gRPC server failed");
        }
    });
    let http_task = tokio::spawn(telemetry::serve_http(
        http_listener,
        readiness.clone(),
        server_stop.clone(),
    ));
    info!(node = %config.node.id, grpc = %addrs.grpc, http = %addrs.http, views = ?view_names, "node started");
    if let (Some(_), Some(peer)) = (&coordinator, addrs.peer)
        && !config.pipelines.files.is_empty()
    {
        tokio::spawn(
            crate::serving::pipelines_api::submit_files(
                local_addr(peer),
                peer_client_tls.clone(),
                config.pipelines.files.clone(),
                shutdown.clone(),
            )
            .instrument(info_span!("pipeline_files")),
        );
    }

    let grace = config.node.shutdown_grace;
    let drain_timeout = config.cluster.as_ref().map(|c| c.drain_timeout);
    let stop = shutdown.clone();
    let ready = readiness.clone();
    let stopping_fatal = fatal.clone();
    let main = tokio::spawn(async move {
        stop.cancelled().await;
        ready.stop();
        // In a cluster, hand the partitions to other nodes first, while this
        // node still serves and heartbeats: they take over at once instead
        // of after `failure_timeout`. Not after a fatal error: the node
        // stops at once, and they move as from a dead node.
        if let (Some(c), Some(timeout)) = (&coordinator, drain_timeout)
            && !stopping_fatal.raised()
        {
            info!("shutting down: handing partitions to other nodes");
            let started = std::time::Instant::now();
            if c.drain(timeout).await {
                info!(
                    seconds = started.elapsed().as_secs_f64(),
                    "partitions handed over"
                );
            } else {
                warn!(
                    ?timeout,
                    "partitions not all handed over in time; the rest move once this node is gone"
                );
            }
        }
        // A leader hands Raft leadership over next (even after a fatal
        // error: leadership has nothing to do with the data path), so the
        // cluster keeps a leader instead of electing one after this node's
        // lease. Its partitions are gone by now: the new leader has nothing
        // of this node's to move.
        if let (Some(c), Some(timeout)) = (&coordinator, drain_timeout)
            && let Some(handed) = c.hand_over_leadership(timeout).await
        {
            if handed {
                info!("Raft leadership handed over");
            } else {
                warn!(
                    "Raft leadership not handed over; the others elect a leader once this node is gone"
                );
            }
        }
        info!("shutting down: stopping sources");
        let orderly = async {
            // Sources stop; the writer drains the channel and commits.
            runtime.lock().await.shutdown().await;
            // Dropping the commit watchers ends the subscriptions; later
            // requests are told to resume on another node.
            views.close();
            if !stopping_fatal.raised() {
                info!("state committed; stopping servers");
            } else {
                info!(
                    "data path stopped on a fatal error (nothing after the last commit was written); stopping servers"
                );
            }
            if let Some(c) = &coordinator {
                c.shutdown().await;
            }
            server_stop.cancel();
            for (what, task) in [("gRPC server", Some(grpc_task)), ("peer server", peer_task)] {
                if let Some(Err(e)) = futures::future::OptionFuture::from(task).await {
                    error!(error = %e, "{what} task panicked");
                }
            }
            if let Err(e) = http_task.await {
                error!(error = %e, "HTTP server task panicked");
            }
            // Every holder of the audit trail is gone: its store closes.
            if let Some(closed) = audit_closed {
                closed.wait().await;
            }
        };
        if tokio::time::timeout(grace, orderly).await.is_err() {
            warn!(?grace, "shutdown grace period exceeded; stopping anyway");
        }
        info!("node stopped");
    });
    Ok(NodeHandle {
        addrs,
        readiness,
        shutdown,
        fatal,
        main,
    })
}

/// An address to call a listener bound to `addr` at (a wildcard bind is
/// called on loopback).
fn local_addr(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port()).to_string()
}

/// The peer listener: Raft, heartbeats, and admin requests forwarded by
/// other nodes, behind a gate that lets in only nodes of the cluster (with
/// TLS: certificates of the cluster's CA naming a node).
/// What the peer listener serves besides Raft and heartbeats.
struct PeerServices {
    pipelines: crate::serving::pipelines_api::PipelineService,
    access: crate::serving::access_api::AccessService,
    state: crate::cluster::state_transfer::StateService,
    shards: crate::serving::shard_peer::ShardService,
}

fn start_peer_server(
    config: &NodeConfig,
    coordinator: &ndc_coordinator::Coordinator,
    listener: tokio::net::TcpListener,
    services: PeerServices,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let PeerServices {
        pipelines,
        access,
        state,
        shards,
    } = services;
    let mut section = config.tls.clone();
    section.client_ca = crate::cluster::peer_client_tls(config).ca;
    let tls = crate::security::tls::ServerTls::from_config(&section, false)?;
    let router = tonic::transport::Server::builder()
        .layer(crate::serving::access::Gate::peer(
            coordinator.peer_tls().cloned(),
        ))
        .add_service(coordinator.raft_service())
        .add_service(coordinator.cluster_service(true))
        .add_service(PipelinesServer::new(pipelines))
        .add_service(AccessServer::new(access))
        .add_service(ndc_proto::cluster::state_server::StateServer::new(state))
        .add_service(
            ndc_proto::cluster::shards_server::ShardsServer::new(shards)
                .max_encoding_message_size(64 << 20),
        );
    Ok(tokio::spawn(async move {
        let result = serve!(router, listener, tls, stop);
        if let Err(e) = result {
            error!(error = %e, "peer gRPC server failed");
        }
    }))
}

/// Runs a node until SIGTERM or Ctrl-C.
pub async fn run(config: NodeConfig, handed: Listeners) -> anyhow::Result<()> {
    let handle = start_with(config, handed).await?;
    let token = handle.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        token.cancel();
    });
    handle.wait().await?;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
