//! `ndc`: the command line of the national data center's stream processor.

use anyhow::Context;
use clap::{Parser, Subcommand};
use ndc_node::client::{self, SubscribeOptions};
use ndc_node::config::NodeConfig;
use ndc_node::quickstart::{self, QuickstartOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

// Decoding allocates many small strings per record; mimalloc handles that
// pattern markedly better than the system allocator (see docs/performance.md).
// With the `override` feature (Cargo.toml) it also replaces malloc and free,
// so RocksDB's and librdkafka's allocations use it as well.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ndc",
    version,
    about = "Stream processing for the national data center"
)]
struct Cli {
    /// The CA (PEM) that signed the node's TLS certificate: connect over TLS.
    #[arg(long = "tls-ca", global = true, env = "NDC_CA")]
    ca: Option<PathBuf>,
    /// This client's certificate (PEM), for a node that asks for one (mutual TLS).
    #[arg(long = "tls-cert", global = true, env = "NDC_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// The key of `--tls-cert` (PEM). (Not `--key`: that is `ndc subscribe`'s
    /// key filter.)
    #[arg(long = "tls-key", global = true, env = "NDC_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// A file holding a bearer token (a JWT of a configured identity
    /// provider), sent with every call; read again on every connection.
    #[arg(long = "token-file", global = true, env = "NDC_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// A development CA and, signed by it, certificates for a node
    /// (127.0.0.1, localhost and each --name), an admin and a subscriber.
    /// Not for production: the CA's key is written beside them.
    Dev {
        /// Directory to write into (must not hold a ca.pem already).
        #[arg(long)]
        out: PathBuf,
        /// More DNS names or IP addresses for the node's certificate.
        #[arg(long = "name")]
        names: Vec<String>,
        /// Days the certificates are valid.
        #[arg(long, default_value_t = 30)]
        days: u32,
        /// Also a certificate for each of nodes 0..N of a cluster
        /// (`ndc-N.pem`, naming `ndc-N`, as `cluster.peer_identity` expects).
        #[arg(long, default_value_t = 0)]
        nodes: u32,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check every chain of the audit trail, in the Kafka topic a node's
    /// configuration names (or in an export): prints a JSON summary that
    /// names the first altered, removed or reordered record; exits 1 then.
    Verify {
        /// The node configuration (its kafka and audit sections).
        #[arg(long, required_unless_present = "file")]
        config: Option<PathBuf>,
        /// A JSON-lines export (`ndc audit export`) instead of the topic.
        #[arg(long, conflicts_with = "config")]
        file: Option<PathBuf>,
    },
    /// Every record of the audit topic, one JSON object per line.
    Export {
        #[arg(long)]
        config: PathBuf,
    },
    /// Which principals received data about a person, when and for which
    /// purpose (admin only), one JSON object per line.
    WhoAccessed {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        /// The 12-digit national ID.
        #[arg(long)]
        person: String,
        /// Only since this time (RFC 3339, e.g. 2026-12-01T00:00:00Z).
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        since: Option<std::time::SystemTime>,
    },
}

#[derive(Subcommand)]
enum PersonCommand {
    /// Golden records with provenance, source rows, conflicts and who
    /// received data about the person, as one JSON document (admin only;
    /// recorded in the audit trail).
    Report {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        /// The 12-digit national ID.
        #[arg(long)]
        id: String,
    },
}

async fn audit(command: AuditCommand) -> anyhow::Result<()> {
    use ndc_node::serving::audit_api;
    match command {
        AuditCommand::Verify { config, file } => {
            let verifier = match (config, file) {
                (_, Some(file)) => {
                    let text = std::fs::read_to_string(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    audit_api::verify_lines(&text)
                }
                (Some(config), None) => {
                    let config = NodeConfig::load(&config)?;
                    let kafka = config.kafka.context(
                        "the configuration has no kafka section: name an export with --file",
                    )?;
                    audit_api::verify_topic(&kafka, &config.audit.topic).await?
                }
                (None, None) => anyhow::bail!("name --config or --file"),
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&audit_api::verify_summary(&verifier))?
            );
            if verifier.first_bad.is_some() {
                std::process::exit(1);
            }
            Ok(())
        }
        AuditCommand::Export { config } => {
            let config = NodeConfig::load(&config)?;
            let kafka = config
                .kafka
                .context("the configuration has no kafka section")?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let mut failed = None;
            ndc_node::serving::audit::read_topic(&kafka, &config.audit.topic, |_, bytes| {
                if failed.is_none()
                    && let Err(e) = out.write_all(bytes).and_then(|()| out.write_all(b"\n"))
                {
                    failed = Some(e);
                }
            })
            .await?;
            if let Some(e) = failed {
                return Err(e.into());
            }
            out.flush()?;
            Ok(())
        }
        AuditCommand::WhoAccessed {
            addr,
            person,
            since,
        } => {
            let since_ms = since
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as i64);
            let answer = audit_api::who_accessed(&addr, None, &person, since_ms).await?;
            for r in answer.records {
                println!(
                    "{}",
                    serde_json::json!({"kind": r.kind, "principal": r.principal, "purpose": r.purpose, "view": r.view,
                                       "at_ms": r.at_ms, "node": r.node, "snapshot": r.snapshot,
                                       "shard": r.shard, "first_seq": r.first_seq, "last_seq": r.last_seq, "chain": r.chain, "index": r.index})
                );
            }
            if answer.truncated {
                eprintln!("(more records than one answer holds: narrow with --since)");
            }
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum AccessCommand {
    /// Create or replace a principal's grant (admin only).
    Grant {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        /// Certificate SAN or CN, or token `sub`.
        principal: String,
        /// admin, operator or subscriber.
        #[arg(long, default_value = "subscriber")]
        role: String,
        /// Views it may read (comma separated); * for every view.
        #[arg(long, value_delimiter = ',')]
        views: Vec<String>,
        /// Only rows whose COLUMN holds one of the values: COLUMN=V1,V2.
        #[arg(long)]
        rows: Option<String>,
        /// Only these columns (comma separated).
        #[arg(long, value_delimiter = ',')]
        columns: Vec<String>,
        /// Why it reads this data (recorded with the grant).
        #[arg(long)]
        purpose: String,
        /// How long the grant lasts (e.g. 90d, 12h); default: until revoked.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
        /// The highest level of field delivered as it is (public, internal,
        /// confidential, secret); default: every level.
        #[arg(long)]
        clearance: Option<String>,
        /// What fields of a level above the clearance become:
        /// LEVEL=redact|null|hash|partial:N|year (repeatable; default redact).
        #[arg(long = "mask")]
        masks: Vec<String>,
    },
    /// Remove a principal's grant: its live streams end within 2 seconds.
    Revoke {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        principal: String,
    },
    /// Every grant, one JSON object per line.
    List {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
    },
    /// Who the node takes this client for, and its grant.
    Whoami {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
    },
}

async fn access(command: AccessCommand) -> anyhow::Result<()> {
    use ndc_node::serving::access_api::{self, grant_json};
    match command {
        AccessCommand::Grant {
            addr,
            principal,
            role,
            views,
            rows,
            columns,
            purpose,
            expires_in,
            clearance,
            masks,
        } => {
            let mut masking = std::collections::HashMap::new();
            for m in masks {
                let (level, policy) = m.split_once('=').context("--mask takes LEVEL=POLICY")?;
                masking.insert(level.trim().to_string(), policy.trim().to_string());
            }
            let row_filter = match rows {
                None => None,
                Some(text) => {
                    let (column, values) = text
                        .split_once('=')
                        .context("--rows takes COLUMN=VALUE[,VALUE...]")?;
                    Some(ndc_proto::v1::RowFilter {
                        column: column.trim().to_string(),
                        values: values.split(',').map(|v| v.trim().to_string()).collect(),
                    })
                }
            };
            let expires_at_ms = match expires_in {
                None => 0,
                Some(d) => {
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
                    u64::try_from((now + d).as_millis())?
                }
            };
            let info = ndc_proto::v1::GrantInfo {
                principal,
                role,
                views,
                row_filter,
                columns,
                purpose,
                expires_at_ms,
                clearance: clearance.unwrap_or_default(),
                masking,
                ..Default::default()
            };
            println!(
                "{}",
                grant_json(&access_api::grant(&addr, None, info).await?)
            );
        }
        AccessCommand::Revoke { addr, principal } => {
            access_api::revoke(&addr, None, &principal).await?;
            println!("{}", serde_json::json!({"revoked": principal}));
        }
        AccessCommand::List { addr } => {
            for g in access_api::list(&addr, None).await? {
                println!("{}", grant_json(&g));
            }
        }
        AccessCommand::Whoami { addr } => {
            let w = access_api::who_am_i(&addr, None).await?;
            println!(
                "{}",
                serde_json::json!({"principal": w.principal, "authenticated_by": w.authenticated_by,
                                   "grant": w.grant.as_ref().map(grant_json)})
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum Command {
    /// Run a node with a YAML configuration (NDC__A__B env vars override keys).
    Node {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration (and the pipeline specs it names) and print
    /// it with every default filled in.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Follow a view and print one JSON object per line.
    Subscribe {
        /// Node gRPC address, host:port; several (comma separated) are tried
        /// in turn when a connection breaks.
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        #[arg(long)]
        view: String,
        /// snapshot | latest | a resume token
        #[arg(long, default_value = "snapshot")]
        from: client::From,
        /// Only this primary key (JSON object); repeatable.
        #[arg(long = "key")]
        keys: Vec<String>,
        /// Only these columns (comma separated).
        #[arg(long, value_delimiter = ',')]
        fields: Vec<String>,
        /// Exit after this many changes.
        #[arg(long)]
        limit: Option<u64>,
        /// Also print progress messages (heartbeats with the current token).
        #[arg(long)]
        progress: bool,
        /// Do not resume automatically when the connection drops.
        #[arg(long)]
        no_reconnect: bool,
    },
    /// List the views a node serves.
    Views {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
    },
    /// Embedded broker + node + synthetic agency feeds + live subscription.
    Quickstart {
        #[arg(long, default_value = "ndc-quickstart-data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:50051")]
        grpc_listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9464")]
        http_listen: SocketAddr,
        #[arg(long, default_value_t = 200)]
        people: u64,
        #[arg(long, default_value_t = 5)]
        rate: u32,
        /// Stop after this long (e.g. 30s); default: until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
    },
    /// Certificates for running with TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Inspect and change the cluster (any node answers; changes go to the leader).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Grant, revoke and list who may read and manage what.
    Access {
        #[command(subcommand)]
        command: AccessCommand,
    },
    /// The audit trail: verify it, export it, ask who received a person's data.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// What the center holds about one person (a data-subject access request).
    Person {
        #[command(subcommand)]
        command: PersonCommand,
    },
    /// Apply, list and drop pipeline specs on a running node.
    Pipeline {
        #[command(subcommand)]
        command: PipelineCommand,
    },
    /// Write synthetic Debezium change events as newline-delimited JSON
    /// (an agency export, for file sources).
    Generate {
        #[arg(long, default_value = "citizens")]
        table: String,
        #[arg(long, default_value_t = 1000)]
        people: u64,
        /// Updates after the snapshot rows.
        #[arg(long, default_value_t = 0)]
        updates: u64,
        #[arg(long, short)]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum PipelineCommand {
    /// Validate a spec and run it (a new pipeline, or a higher version).
    Apply {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        /// The spec (YAML); - for standard input.
        #[arg(long, short)]
        file: PathBuf,
        /// Validate only.
        #[arg(long)]
        dry_run: bool,
    },
    /// The pipelines a node runs, one JSON object per line.
    List {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
    },
    /// Stop a pipeline and delete its views and their state.
    Drop {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        name: String,
    },
    /// Validate a spec locally, without a node.
    Check {
        #[arg(long, short)]
        file: PathBuf,
    },
}

async fn pipeline(command: PipelineCommand) -> anyhow::Result<()> {
    use ndc_node::serving::pipelines_api;
    let read = |file: &PathBuf| -> anyhow::Result<String> {
        if file.as_os_str() == "-" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
            Ok(s)
        } else {
            std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
        }
    };
    match command {
        PipelineCommand::Apply {
            addr,
            file,
            dry_run,
        } => {
            let r = pipelines_api::apply(&addr, read(&file)?, dry_run).await?;
            println!(
                "{}",
                serde_json::json!({"pipeline": r.name, "version": r.version, "outcome": r.outcome,
                                   "views": r.views, "reset": r.reset})
            );
        }
        PipelineCommand::List { addr } => {
            for p in pipelines_api::list(&addr).await? {
                println!(
                    "{}",
                    serde_json::json!({"pipeline": p.name, "version": p.version, "description": p.description,
                                       "views": p.views, "topics": p.topics, "repartition_topic": p.repartition_topic})
                );
            }
        }
        PipelineCommand::Drop { addr, name } => {
            let views = pipelines_api::drop_pipeline(&addr, &name).await?;
            println!("{}", serde_json::json!({"dropped": name, "views": views}));
        }
        PipelineCommand::Check { file } => {
            let spec = ndc_node::pipelines::spec::PipelineSpec::from_yaml(&read(&file)?)?;
            println!(
                "{}",
                serde_json::json!({"pipeline": spec.name, "version": spec.version, "views": spec.views()})
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Members, leader, partition assignments and lag.
    Status {
        /// gRPC address of any node, host:port.
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        /// One JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Add a node: it joins as a learner, catches up, then becomes a voter.
    AddNode {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        /// Raft id of the new node.
        #[arg(long)]
        id: u64,
        /// host:port of the new node's peer listener (node.peer_listen).
        #[arg(long)]
        node_addr: String,
        /// Keep it a learner (it may own partitions but does not vote).
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node from the cluster; its partitions move to the others.
    RemoveNode {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        #[arg(long)]
        id: u64,
    },
}

async fn cluster(command: ClusterCommand) -> anyhow::Result<()> {
    use ndc_node::cluster::admin;
    let print_membership = |m: ndc_proto::cluster::MembershipReply| {
        println!(
            "{}",
            serde_json::json!({"voters": m.voters, "learners": m.learners})
        );
    };
    match command {
        ClusterCommand::Status { addr, json } => {
            let s = admin::status(&addr).await?;
            if json {
                println!("{}", admin::status_json(&s));
            } else {
                print!("{}", admin::status_text(&s));
            }
        }
        ClusterCommand::AddNode {
            addr,
            id,
            node_addr,
            learner,
        } => {
            print_membership(admin::add_node(&addr, id, &node_addr, learner).await?);
        }
        ClusterCommand::RemoveNode { addr, id } => {
            print_membership(admin::remove_node(&addr, id).await?)
        }
    }
    Ok(())
}

/// Exit codes: 0, 1 for an error (bad configuration, a refused request,
/// `audit verify` finding a bad record), 70 (EX_SOFTWARE) when a node
/// stopped on a fatal error of its own (see `ndc_node::lifecycle`).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            if e.downcast_ref::<ndc_node::lifecycle::FatalError>()
                .is_some()
            {
                std::process::ExitCode::from(70)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Before any thread starts: sockets handed over (systemd socket
    // activation) are taken from the environment, which is then cleared.
    let handed = ndc_node::node::Listeners::from_env()?;
    let plaintext = cli.ca.is_none() && cli.cert.is_none();
    client::set_default_tls(client::ClientTls {
        ca: cli.ca.clone(),
        cert: cli.cert.clone(),
        key: cli.key.clone(),
    });
    if let Some(path) = cli.token_file.clone() {
        client::set_token_file(path);
    }
    ndc_node::telemetry::init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Node { config } => {
                let config = NodeConfig::load(&config)?;
                ndc_node::node::run(config, handed).await
            }
            Command::CheckConfig { config } => {
                let config = NodeConfig::load(&config)?;
                // The pipeline specs it names must be valid too.
                for file in &config.pipelines.files {
                    let text = std::fs::read_to_string(file)
                        .with_context(|| format!("pipelines.files: cannot read {}", file.display()))?;
                    ndc_node::pipelines::spec::PipelineSpec::from_yaml(&text)
                        .with_context(|| format!("pipelines.files: {}", file.display()))?;
                }
                print!("{}", config.to_yaml()?);
                Ok(())
            }
            Command::Subscribe { addr, view, from, keys, fields, limit, progress, no_reconnect } => {
                let stdout = std::io::stdout();
                let opts = SubscribeOptions { addr, view, from, keys, fields, limit, progress, reconnect: !no_reconnect, tls: None, token: None };
                client::subscribe(opts, move |line| {
                    let mut out = stdout.lock();
                    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
                })
                .await
            }
            Command::Views { addr } => {
                let mut c = ndc_proto::v1::subscription_client::SubscriptionClient::new(client::connect(&addr, None).await?);
                let views = c.list_views(ndc_proto::v1::ListViewsRequest {}).await?.into_inner().views;
                for v in views {
                    println!(
                        "{}",
                        serde_json::json!({"view": v.name, "key_columns": v.key_columns, "committed_seq": v.committed_seq,
                                           "retained_from_seq": v.retained_from_seq, "live_rows": v.live_rows,
                                           "shards": v.shards, "committed_seqs": v.committed_seqs,
                                           "keyed_reads": if v.keyed_reads_routed { "keys' shards" } else { "every shard" },
                                           "column_levels": v.column_levels})
                    );
                }
                Ok(())
            }
            Command::Quickstart { data_dir, grpc_listen, http_listen, people, rate, duration } => {
                quickstart::run(QuickstartOptions { data_dir, grpc_listen, http_listen, people, rate, duration }).await
            }
            Command::Certs { command: CertsCommand::Dev { out, names, days, nodes } } => {
                let (c, cluster) = ndc_node::security::certs::make_dev_cluster_certificates(&out, &names, days, nodes)?;
                for (id, (cert, key)) in cluster.iter().enumerate() {
                    println!("cluster node {id:<9} {} {}", cert.display(), key.display());
                }
                println!("development CA        {}", c.ca.display());
                println!("node                  {} {}", c.node_cert.display(), c.node_key.display());
                println!("admin                 {} {}", c.admin_cert.display(), c.admin_key.display());
                println!("subscriber            {} {}", c.subscriber_cert.display(), c.subscriber_key.display());
                println!();
                println!("A node:    tls: {{ cert: {}, key: {}, client_ca: {} }}", c.node_cert.display(), c.node_key.display(), c.ca.display());
                println!("           access: {{ admins: [admin] }}   # the admin certificate's CN; it grants the rest (ndc access grant)");
                println!("A client:  export NDC_CA={} NDC_CERT={} NDC_KEY={}", c.ca.display(), c.subscriber_cert.display(), c.subscriber_key.display());
                Ok(())
            }
            Command::Cluster { command } => cluster(command).await,
            Command::Pipeline { command } => pipeline(command).await,
            Command::Access { command } => access(command).await,
            Command::Audit { command } => audit(command).await,
            Command::Person { command: PersonCommand::Report { addr, id } } => {
                let report = ndc_node::serving::audit_api::person_report(&addr, None, &id).await?;
                let mut out = std::io::stdout().lock();
                // A reader that stops early (`| head`) is no error.
                match writeln!(out, "{report}").and_then(|()| out.flush()) {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                    other => Ok(other?),
                }
            }
            Command::Generate { table, people, updates, output } => generate(&table, people, updates, &output),
        }
    })
    .map_err(|e| if plaintext { plaintext_hint(e) } else { e })
}

/// A plaintext client talking to a TLS listener fails at the transport
/// level, with an error that depends on timing (an HTTP/2 framing error, a
/// closed connection, a broken pipe) and says nothing useful: say what it
/// may mean.
fn plaintext_hint(e: anyhow::Error) -> anyhow::Error {
    let transport = e
        .chain()
        .any(|c| c.downcast_ref::<tonic::transport::Error>().is_some());
    if transport {
        e.context(
            "the connection failed: if the node speaks TLS (it refuses plaintext clients this way), \
             connect with --tls-ca (and --tls-cert, --tls-key for mutual TLS), or NDC_CA, NDC_CERT, NDC_KEY",
        )
    } else {
        e
    }
}

fn generate(
    table: &str,
    people: u64,
    updates: u64,
    output: &std::path::Path,
) -> anyhow::Result<()> {
    use ndc_node::quickstart::synthetic::{Feed, Rng, Table};
    let table = match table {
        "citizens" => Table::Citizens,
        "addresses" => Table::Addresses,
        "insurance_cards" => Table::InsuranceCards,
        "vehicles" => Table::Vehicles,
        "businesses" => Table::Businesses,
        other => anyhow::bail!(
            "unknown table {other:?} (citizens, addresses, insurance_cards, vehicles or businesses)"
        ),
    };
    let file = std::fs::File::create(output)
        .with_context(|| format!("cannot create {}", output.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut feed = Feed::new(table, 1_767_225_600_000);
    let mut revisions = vec![0u32; people as usize];
    for i in 0..people {
        let e = feed.event('r', i, 0, None);
        out.write_all(e.value.as_deref().unwrap_or_default())?;
        out.write_all(b"\n")?;
    }
    let mut rng = Rng::new(7);
    for _ in 0..updates {
        let i = rng.below(people.max(1));
        revisions[i as usize] += 1;
        let e = feed.event('u', i, revisions[i as usize], None);
        out.write_all(e.value.as_deref().unwrap_or_default())?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    eprintln!("wrote {} events to {}", people + updates, output.display());
    Ok(())
}
