//! Node configuration: YAML file, then environment overrides, then
//! validation. Every key is documented in `docs/configuration.md`.
//!
//! Environment variables `NDC__A__B=value` set key `a.b` (numbers index
//! lists: `NDC__VIEWS__0__NAME`); values are read as YAML scalars.

use ndc_operators::Format;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "NDC__";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[derive(Default)]
pub struct NodeConfig {
    pub node: NodeSection,
    /// Absent: no Kafka (file sources only; dead letters go to a file).
    pub kafka: Option<KafkaSection>,
    pub storage: StorageSection,
    pub pipeline: PipelineSection,
    pub subscriptions: SubscriptionSection,
    pub changelog: ChangelogSection,
    pub dead_letter: DeadLetterSection,
    /// Absent: a single node. Present: a Raft-coordinated cluster member.
    pub cluster: Option<ClusterSection>,
    pub views: Vec<ViewConfig>,
    pub pipelines: PipelinesSection,
    pub tls: TlsSection,
    pub access: AccessSection,
    pub audit: AuditSection,
}

/// Who may call the node's public API, and with which limits
/// (docs/security.md). Grants themselves are managed with `ndc access`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessSection {
    /// Principals that have the admin role whatever the grants say, so that
    /// the first grants can be made (as Kafka's `super.users`).
    pub admins: Vec<String>,
    /// Whether a caller with neither a client certificate nor a token is let
    /// in, as an admin that reads every view. Absent: as `tls.insecure`
    /// says (a plaintext development node stays usable as it was); only
    /// with `tls.insecure: true`.
    pub anonymous: Option<bool>,
    /// Live subscriptions one principal may hold on a node.
    pub max_streams_per_principal: usize,
    /// Identity providers whose bearer tokens (JWT) identify callers.
    pub jwt: Vec<JwtIssuerConfig>,
    /// Keys of the `hash` masking policy, by version (the highest is used):
    /// files of secret bytes, never the configuration itself.
    pub hash_keys: Vec<HashKeyConfig>,
}

/// One version of the masking hash key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashKeyConfig {
    pub version: u32,
    pub file: PathBuf,
}

impl Default for AccessSection {
    fn default() -> Self {
        AccessSection {
            admins: Vec::new(),
            anonymous: None,
            max_streams_per_principal: 16,
            jwt: Vec::new(),
            hash_keys: Vec::new(),
        }
    }
}

impl AccessSection {
    /// Whether anonymous callers are let in under this TLS setting.
    pub fn anonymous_allowed(&self, tls: &TlsSection) -> bool {
        self.anonymous.unwrap_or(tls.insecure)
    }
}

/// An OIDC/JWT issuer (a Keycloak realm, for example) and the keys its
/// tokens are signed with: files, so nothing is fetched at run time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuerConfig {
    /// The tokens' `iss`, exactly.
    pub issuer: String,
    /// Accepted `aud` values; a token must name one of them.
    pub audiences: Vec<String>,
    /// Public keys: PEM files (RSA or EC public keys) or JWKS JSON files
    /// (the realm's `certs` document, saved).
    pub keys: Vec<PathBuf>,
    /// Tolerated clock difference for `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

/// TLS on the node's gRPC listener. Plaintext only when `insecure` says so.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// Server certificate chain (PEM), e.g. a cert-manager Secret's `tls.crt`.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM), e.g. `tls.key`.
    pub key: Option<PathBuf>,
    /// Clients must present a certificate this CA signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// Serve plaintext: no encryption, no client certificates. Logged as a
    /// WARN line at start and exported as `ndc_tls_insecure 1`.
    pub insecure: bool,
    /// How often the files are checked for a rotation.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: None,
            key: None,
            client_ca: None,
            insecure: false,
            reload_interval: Duration::from_secs(10),
        }
    }
}

/// Pipeline specs and their repartition topics (`docs/pipelines.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelinesSection {
    /// Spec files applied at start. Specs applied through the admin API
    /// (`ndc pipeline apply`) are kept in the state and run again at start.
    pub files: Vec<PathBuf>,
    /// Repartition topic of pipeline P: `<prefix>P` (created by the node).
    pub repartition_topic_prefix: String,
    pub repartition_partitions: i32,
    pub repartition_replication: i32,
    /// Off where the platform provisions topics (a Strimzi `KafkaTopic`,
    /// GitOps) or the broker creates them on first use: the node then
    /// waits for them instead of retrying CreateTopics with warnings.
    pub create_repartition_topics: bool,
}

impl Default for PipelinesSection {
    fn default() -> Self {
        PipelinesSection {
            files: Vec::new(),
            repartition_topic_prefix: "ndc.repartition.".into(),
            repartition_partitions: 4,
            repartition_replication: 1,
            create_repartition_topics: true,
        }
    }
}

/// Cluster membership and failure-detection timings (`docs/cluster.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// Raft node id. Absent: the ordinal at the end of `node.id`
    /// (`ndc-2` → 2), as in a Kubernetes StatefulSet.
    pub node_id: Option<u64>,
    /// Initial voters, `ID=HOST:PORT` or `HOST:PORT` with the id as the
    /// ordinal of the host's first label (`ndc-1.ndc:50052` → 1), at their
    /// peer listeners (`node.peer_listen`). Nodes in the list form the
    /// cluster; others wait for `ndc cluster add-node`.
    pub bootstrap: Vec<String>,
    /// With TLS: the CA that signs the nodes' certificates (peers must
    /// present one). Absent: `tls.client_ca`.
    pub peer_ca: Option<PathBuf>,
    /// How a node id appears in its certificate (a URI or DNS SAN or the
    /// CN, whole or as its first DNS label), `{id}` standing for the id:
    /// a peer may only speak for the node its certificate names.
    pub peer_identity: String,
    /// How often a node renews its lease with the leader.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How long an accepted heartbeat lets a node act on its partitions.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Silence after which the leader moves a node's partitions (≥ 2 × lease).
    #[serde(with = "humantime_serde")]
    pub failure_timeout: Duration,
    /// Raft leader heartbeat.
    #[serde(with = "humantime_serde")]
    pub raft_heartbeat: Duration,
    /// Raft election timeout (randomised between this and twice this).
    #[serde(with = "humantime_serde")]
    pub election_timeout: Duration,
    /// Raft log entries between snapshots of the cluster metadata (as many
    /// are kept behind a snapshot; a follower further behind gets it).
    pub raft_snapshot_logs: u64,
    /// Records a standby may be behind its shard's furthest holder and
    /// still count as having the shard's state: it is promoted first, and a
    /// holder it replaces is dropped only once it is within this.
    pub acceptable_recovery_lag: u64,
    /// Change log of view V: topic `<prefix>V` (created by the nodes).
    pub changes_topic_prefix: String,
    /// Replication factor of the change-log topics the nodes create.
    pub changes_replication: i32,
    /// On SIGTERM, how long a node waits for its partitions to be handed to
    /// other nodes before it stops anyway (the rest then move after
    /// `failure_timeout`). Counted before `node.shutdown_grace`.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// A node that starts without state (new, or its disk lost) copies the
    /// state store of a caught-up peer (a RocksDB checkpoint over the peer
    /// listener; the first of `bootstrap` to answer) and tails the change
    /// logs from there, instead of replaying every log from its start.
    pub state_from_peers: bool,
    /// How long a starting node waits for each peer to describe its state;
    /// peers that do not answer in time (not started yet) are passed over.
    #[serde(with = "humantime_serde")]
    pub state_from_peers_timeout: Duration,
    /// Nodes holding each shard of a configured view: its owner and
    /// `replication_factor - 1` standbys, which apply its change log and
    /// take over when the owner is lost. A node applies only the logs of
    /// the shards it holds and fetches the others from their holders when
    /// a subscriber asks. 0: every node holds every shard (a node's work
    /// done N times: availability, no capacity). A pipeline's shards are
    /// placed the same way (its derived views follow their contributions
    /// shard).
    pub replication_factor: usize,
    /// This node's failure zone (a Kubernetes zone, a rack): a shard's
    /// standbys go to other zones than its owner's where there are any.
    pub zone: Option<String>,
    /// How often the leader trims the change logs behind the lowest
    /// position each shard's holders have applied (Kafka DeleteRecords), so
    /// that they stop growing forever; a holder left behind a trimmed log
    /// copies its shard from another. 0: never trim (a broker without
    /// DeleteRecords, such as tansu's memory storage).
    #[serde(with = "humantime_serde")]
    pub log_trim_interval: Duration,
    /// Records each change log keeps behind its slowest holder when
    /// trimmed (at least 1): a holder briefly behind goes on from the log
    /// instead of copying the shard, and a broker that deletes whole record
    /// batches (tansu) keeps the batch the slowest holder is in.
    pub log_trim_slack: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            node_id: None,
            bootstrap: Vec::new(),
            peer_ca: None,
            peer_identity: "ndc-{id}".into(),
            heartbeat_interval: Duration::from_millis(200),
            lease: Duration::from_millis(600),
            failure_timeout: Duration::from_millis(1500),
            raft_heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_millis(300),
            raft_snapshot_logs: 5000,
            acceptable_recovery_lag: 10_000,
            changes_topic_prefix: "ndc.changes.".into(),
            changes_replication: 3,
            drain_timeout: Duration::from_secs(10),
            state_from_peers: true,
            state_from_peers_timeout: Duration::from_secs(2),
            replication_factor: 0,
            zone: None,
            log_trim_interval: Duration::from_secs(60),
            log_trim_slack: 1000,
        }
    }
}

/// Deserializes a parsed YAML document, or says where it is wrong: the path
/// of the offending key (`operators.people.merge.inputs[1]`) and why. Goes
/// through JSON's data model, where externally tagged enums (`kafka: {...}`)
/// deserialize from single-key maps.
pub(crate) fn from_yaml_value<T: serde::de::DeserializeOwned>(
    value: &serde_norway::Value,
) -> Result<T, (String, String)> {
    let value =
        serde_json::to_value(value).map_err(|e| ("(top level)".to_string(), e.to_string()))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            "(top level)".into()
        } else {
            path
        };
        (path, e.into_inner().to_string())
    })
}

/// Id from a name ending in `-N` (`ndc-2`, `ndc-2.ndc.svc:50051` → 2).
pub fn ordinal_of(name: &str) -> Option<u64> {
    let first = name.split(['.', ':']).next()?;
    let (_, n) = first.rsplit_once('-')?;
    n.parse().ok()
}

/// Parses a bootstrap entry: `ID=HOST:PORT` or `HOST:PORT` with an ordinal.
pub fn parse_peer(entry: &str) -> Result<(u64, String), String> {
    let (id, addr) = match entry.split_once('=') {
        Some((id, addr)) => (
            id.trim()
                .parse::<u64>()
                .map_err(|_| format!("{entry:?}: id before '=' must be a number"))?,
            addr.trim(),
        ),
        None => (
            ordinal_of(entry.trim()).ok_or_else(|| {
                format!("{entry:?}: write ID=HOST:PORT, or use a host name ending in -N")
            })?,
            entry.trim(),
        ),
    };
    if !addr.contains(':') {
        return Err(format!("{entry:?}: address must be HOST:PORT"));
    }
    Ok((id, addr.to_string()))
}

impl ClusterSection {
    /// This node's Raft id.
    pub fn resolve_node_id(&self, node_name: &str) -> Option<u64> {
        self.node_id.or_else(|| ordinal_of(node_name))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    pub id: String,
    pub data_dir: PathBuf,
    /// Public gRPC API: subscriptions, views, admin.
    pub grpc_listen: SocketAddr,
    /// Cluster mode: Raft, heartbeats and requests forwarded between nodes,
    /// on a port of their own (only other nodes reach it; with TLS, only
    /// with a certificate of the cluster's CA naming the node they are).
    pub peer_listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub http_listen: SocketAddr,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            id: "ndc-0".into(),
            data_dir: PathBuf::from("ndc-data"),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// librdkafka properties that hold secrets: refused in `kafka.properties`,
/// accepted in `kafka.secrets` (which takes any property).
pub const SECRET_PROPERTIES: [&str; 8] = [
    "sasl.password",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl.keystore.password",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
];

/// Where a secret's value is: a file (its contents, without a trailing
/// newline: a Kubernetes Secret mounted as a file) or an environment
/// variable. Never the configuration itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretRef {
    File(PathBuf),
    Env(String),
}

/// A secret's value: never printed, logged or serialized.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl KafkaSection {
    /// Reads every secret named in `secrets` into `resolved_secrets`. An
    /// error names the property and where it was to be read from, never a
    /// value.
    pub fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        let mut resolved = BTreeMap::new();
        for (property, at) in &self.secrets {
            let key = format!("kafka.secrets.{property}");
            let value = match at {
                SecretRef::File(path) => {
                    std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
                        key: key.clone(),
                        message: format!("cannot read {}: {e}", path.display()),
                    })?
                }
                SecretRef::Env(var) => std::env::var(var).map_err(|_| ConfigError::Invalid {
                    key: key.clone(),
                    message: format!("environment variable {var} is not set (or not UTF-8)"),
                })?,
            };
            let value = value.strip_suffix('\n').unwrap_or(&value);
            let value = value.strip_suffix('\r').unwrap_or(value);
            if value.is_empty() {
                return Err(ConfigError::Invalid {
                    key,
                    message: "the secret is empty".into(),
                });
            }
            resolved.insert(property.clone(), Secret(value.to_string()));
        }
        self.resolved_secrets = resolved;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartFrom {
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSection {
    pub bootstrap_servers: String,
    pub client_id: String,
    /// Group under which offsets are committed for lag tooling only; the
    /// node's own offsets live in RocksDB with its state.
    pub group_id: String,
    /// Where to start a partition that has no stored offset.
    pub start_from: StartFrom,
    pub dead_letter_topic: String,
    /// Extra librdkafka properties (TLS, SASL, timeouts ...). Never a
    /// secret: those are named in `secrets`.
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties whose values are secrets (`sasl.password`,
    /// `ssl.key.password` ...), each read from a file or an environment
    /// variable when the node starts; the configuration holds only where.
    pub secrets: BTreeMap<String, SecretRef>,
    /// The secrets' values, once read ([`KafkaSection::resolve_secrets`]).
    #[serde(skip)]
    pub resolved_secrets: BTreeMap<String, Secret>,
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How often topic metadata is checked for missing topics and new partitions.
    #[serde(with = "humantime_serde")]
    pub metadata_refresh: Duration,
    /// Records re-read before a stored offset when a partition is resumed
    /// (the ones already applied are recognised and skipped). 0 for Kafka,
    /// which answers a fetch inside a record batch with that batch. A
    /// broker that answers with the next batch instead — tansu 0.6.0, the
    /// test broker — skips the rest of the batch; set this to more than its
    /// largest batch (the tests use 10000).
    pub resume_rewind_records: u64,
}

impl Default for KafkaSection {
    fn default() -> Self {
        KafkaSection {
            bootstrap_servers: "127.0.0.1:9092".into(),
            client_id: "ndc".into(),
            group_id: "ndc".into(),
            start_from: StartFrom::Earliest,
            dead_letter_topic: "ndc.dead-letter".into(),
            properties: BTreeMap::new(),
            secrets: BTreeMap::new(),
            resolved_secrets: BTreeMap::new(),
            commit_interval: Duration::from_secs(5),
            metadata_refresh: Duration::from_secs(10),
            resume_rewind_records: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    pub block_cache: ByteSize,
    pub write_buffer: ByteSize,
    /// fsync every commit (survives power loss, not only a process crash).
    pub sync_commits: bool,
    /// LZ4 on stored rows: less disk, but every block read back from disk
    /// (not from the block cache) is decompressed first.
    pub compress_rows: bool,
    /// The write-ahead log's directory (default: with the state, in
    /// `data_dir/state`). On a device of its own, commit fsyncs do not queue
    /// behind flushes and compactions.
    pub wal_dir: Option<PathBuf>,
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            block_cache: ByteSize(128 << 20),
            write_buffer: ByteSize(128 << 20),
            sync_commits: true,
            compress_rows: false,
            wal_dir: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSection {
    pub max_batch_records: usize,
    #[serde(with = "humantime_serde")]
    pub max_batch_delay: Duration,
    /// Records (key + value) above this go to the dead-letter sink.
    pub max_record_bytes: ByteSize,
    /// Decoded records buffered between sources and the state writers
    /// (shared out among them).
    pub channel_capacity: usize,
    /// State writers, each applying and committing its share of the views'
    /// shards on a thread of its own; 0: one per core.
    pub writers: usize,
}

/// Most state writers a node runs.
pub const MAX_WRITERS: usize = 64;

impl PipelineSection {
    /// The number of state writers to run: `writers`, or one per core.
    pub fn writer_count(&self) -> usize {
        match self.writers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
        .clamp(1, MAX_WRITERS)
    }

    /// Each writer's channel: an equal share of `channel_capacity`, but
    /// room for at least one full batch.
    pub fn channel_per_writer(&self) -> usize {
        (self.channel_capacity / self.writer_count()).max(self.max_batch_records)
    }
}

impl Default for PipelineSection {
    fn default() -> Self {
        PipelineSection {
            max_batch_records: 5000,
            // Group commit: take what has arrived; records arriving during a
            // commit (and its fsync) form the next batch, so batches grow
            // with load without an artificial wait (measured: lower latency
            // and no loss of throughput, docs/performance.md).
            max_batch_delay: Duration::ZERO,
            max_record_bytes: ByteSize(1 << 20),
            channel_capacity: 20_000,
            writers: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubscriptionSection {
    /// Changes per batch unless the client asks for fewer.
    pub max_batch_size: u32,
    /// Batches buffered per subscriber before the server stops reading for it.
    pub buffer_batches: usize,
    /// Progress message after this long without changes.
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
    pub max_subscribers: usize,
    /// Key filters one subscription may name.
    pub max_keys: usize,
    /// Columns one subscription may name.
    pub max_fields: usize,
    /// Largest request message the gRPC server decodes.
    pub max_request_bytes: ByteSize,
}

impl Default for SubscriptionSection {
    fn default() -> Self {
        SubscriptionSection {
            max_batch_size: 1000,
            buffer_batches: 4,
            progress_interval: Duration::from_secs(5),
            max_subscribers: 1024,
            max_keys: 10_000,
            max_fields: 256,
            max_request_bytes: ByteSize(4 << 20),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChangelogSection {
    /// Changes kept per view (0: no count limit).
    pub retention_events: u64,
    /// Changes older than this are dropped.
    #[serde(with = "humantime_serde")]
    pub retention_period: Duration,
    #[serde(with = "humantime_serde")]
    pub trim_interval: Duration,
}

impl Default for ChangelogSection {
    fn default() -> Self {
        ChangelogSection {
            retention_events: 50_000_000,
            retention_period: Duration::from_secs(7 * 24 * 3600),
            trim_interval: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetterSection {
    /// File for dead letters when there is no Kafka (default:
    /// `<data_dir>/dead-letter.ndjson`).
    pub file: Option<PathBuf>,
}

/// The audit trail of deliveries and access changes (docs/security.md,
/// "The audit trail").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSection {
    /// Off only to measure what it costs: without it nothing shows who
    /// received what.
    pub enabled: bool,
    /// Kafka topic every node's chain is replicated to (one partition, kept
    /// forever) and read back from to index other nodes' records.
    pub topic: String,
    /// Whether the node creates that topic (one partition, kept forever)
    /// when it is missing.
    pub create_topic: bool,
    /// Replication factor of that topic when the node creates it.
    pub replication: i32,
    /// Records one `who-accessed` answer holds at most.
    pub max_answer_records: usize,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            enabled: true,
            topic: "ndc.audit".into(),
            create_topic: true,
            replication: 1,
            max_answer_records: 10_000,
        }
    }
}

/// A replicated table served to subscribers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    pub name: String,
    /// Primary-key columns; empty: the Kafka message key.
    #[serde(default)]
    pub key_columns: Vec<String>,
    pub sources: Vec<SourceConfig>,
    /// Classification per column; a column not named here is `secret`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: BTreeMap<String, ColumnClass>,
    /// The column holding the person's national ID, if rows are about a
    /// person: the audit trail records whose data each delivery held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub national_id: Option<String>,
    /// Shards the view's key space is split into, by source partition
    /// (`partition % shards`): each shard has its own change stream,
    /// sequence numbers, RocksDB key range and, in a cluster, change log.
    /// Fixed for the life of the view's state.
    #[serde(default = "default_shards", skip_serializing_if = "is_one")]
    pub shards: u32,
}

fn default_shards() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

impl ViewConfig {
    /// Store names of the view's shards.
    pub fn store_names(&self) -> Vec<String> {
        ndc_operators::shard::store_names(&self.name, self.shards)
    }
}

/// Most shards a view may have.
pub const MAX_SHARDS: u32 = 256;

/// How sensitive a column is (docs/security.md, data protection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnClass {
    pub level: ndc_operators::masking::Level,
    #[serde(default = "default_category")]
    pub category: ndc_operators::masking::Category,
}

fn default_category() -> ndc_operators::masking::Category {
    ndc_operators::masking::Category::Other
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum SourceConfig {
    Kafka(KafkaSourceConfig),
    /// Newline-delimited Debezium JSON (an agency's initial export).
    File(FileSourceConfig),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    pub topic: String,
    #[serde(default)]
    pub format: Format,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub format: Format,
    /// Keep reading as the file grows (`tail -f`), for exports that are
    /// appended to; a last line without its newline waits for the rest.
    #[serde(default)]
    pub follow: bool,
}

/// A size in bytes, written as a number or with a unit (`64MiB`, `1GB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }

    fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{text:?} is not a size (e.g. 512KiB, 64MiB)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1000,
            "kib" | "k" => 1 << 10,
            "mb" => 1_000_000,
            "mib" | "m" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" | "g" => 1 << 30,
            other => return Err(format!("unknown size unit {other:?} in {text:?}")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// Everything wrong with a configuration, each naming its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid YAML: {message}")]
    Yaml { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Many(Vec<ConfigError>),
}

impl NodeConfig {
    /// Store names of every configured view's shards (what the node opens,
    /// logs and, in a cluster, places).
    pub fn view_store_names<B: FromIterator<String>>(&self) -> B {
        self.views
            .iter()
            .flat_map(ViewConfig::store_names)
            .collect()
    }

    /// Loads a YAML file and applies `NDC__*` overrides from the process
    /// environment, then validates.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml_with_env(&text, &path.display().to_string(), std::env::vars())
    }

    /// Parses YAML text, applies the given `NDC__*` variables, validates.
    pub fn from_yaml_with_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<NodeConfig, ConfigError> {
        let mut value: serde_norway::Value = if text.trim().is_empty() {
            serde_norway::Value::Mapping(Default::default())
        } else {
            serde_norway::from_str(text).map_err(|e| ConfigError::Yaml {
                path: origin.to_string(),
                message: e.to_string(),
            })?
        };
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        vars.sort();
        for (var, raw) in vars {
            apply_override(&mut value, &var, &raw)?;
        }
        let mut config: NodeConfig = from_yaml_value(&value)
            .map_err(|(key, message)| ConfigError::Invalid { key, message })?;
        config.validate()?;
        if let Some(k) = &mut config.kafka {
            k.resolve_secrets()?;
        }
        Ok(config)
    }

    /// Checks cross-field rules; reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut bad = |key: String, message: &str| {
            errors.push(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        if self.node.id.trim().is_empty() {
            bad("node.id".into(), "must not be empty");
        }
        if self.node.data_dir.as_os_str().is_empty() {
            bad("node.data_dir".into(), "must not be empty");
        }
        if let Some(k) = &self.kafka {
            if k.bootstrap_servers.trim().is_empty() {
                bad("kafka.bootstrap_servers".into(), "must not be empty");
            }
            if k.dead_letter_topic.trim().is_empty() {
                bad("kafka.dead_letter_topic".into(), "must not be empty");
            }
            if k.group_id.trim().is_empty() {
                bad("kafka.group_id".into(), "must not be empty");
            }
            for property in k.properties.keys() {
                if SECRET_PROPERTIES.contains(&property.as_str()) {
                    bad(
                        format!("kafka.properties.{property}"),
                        &format!(
                            "a secret is never written in the configuration: name where it is, \
                             as kafka.secrets.{property}: {{file: PATH}} or {{env: VARIABLE}}"
                        ),
                    );
                }
                if k.secrets.contains_key(property) {
                    bad(
                        format!("kafka.properties.{property}"),
                        "also named in kafka.secrets: give it once",
                    );
                }
            }
        }
        match (&self.tls.cert, &self.tls.key, self.tls.insecure) {
            (Some(_), Some(_), false) | (None, None, true) => {}
            (_, _, true) => bad(
                "tls.insecure".into(),
                "is true, but tls.cert or tls.key is given too: say one or the other",
            ),
            (None, None, false) => bad(
                "tls".into(),
                "the gRPC listener needs tls.cert and tls.key (tls.client_ca for mutual TLS), \
                 or tls.insecure: true to serve plaintext (docs/security.md)",
            ),
            (Some(_), None, false) => bad("tls.key".into(), "is needed with tls.cert"),
            (None, Some(_), false) => bad("tls.cert".into(), "is needed with tls.key"),
        }
        if self.tls.client_ca.is_some() && self.tls.insecure {
            bad("tls.client_ca".into(), "needs TLS: tls.insecure is true");
        }
        if self.tls.reload_interval < Duration::from_millis(100) {
            bad("tls.reload_interval".into(), "must be at least 100ms");
        }
        if let Some(c) = &self.cluster {
            if !self.tls.insecure && c.peer_ca.is_none() && self.tls.client_ca.is_none() {
                bad(
                    "cluster.peer_ca".into(),
                    "with TLS, peers must prove they are nodes of this cluster: name the CA \
                     of the nodes' certificates (or set tls.client_ca)",
                );
            }
            if !c.peer_identity.contains("{id}") {
                bad("cluster.peer_identity".into(), "must contain {id}");
            }
            if c.peer_ca.is_some() && self.tls.insecure {
                bad("cluster.peer_ca".into(), "needs TLS: tls.insecure is true");
            }
            if self.node.peer_listen == self.node.grpc_listen {
                bad(
                    "node.peer_listen".into(),
                    "must differ from node.grpc_listen: peers and callers are told apart by port",
                );
            }
        }
        if self.access.anonymous == Some(true) && !self.tls.insecure {
            bad(
                "access.anonymous".into(),
                "only with tls.insecure: true (a development node); give callers certificates or tokens",
            );
        }
        if self.access.max_streams_per_principal == 0 {
            bad(
                "access.max_streams_per_principal".into(),
                "must be at least 1",
            );
        }
        for (i, j) in self.access.jwt.iter().enumerate() {
            if j.issuer.trim().is_empty() {
                bad(format!("access.jwt[{i}].issuer"), "must not be empty");
            }
            if j.audiences.is_empty() {
                bad(
                    format!("access.jwt[{i}].audiences"),
                    "name at least one: a token meant for another service must not open this one",
                );
            }
            if j.keys.is_empty() {
                bad(
                    format!("access.jwt[{i}].keys"),
                    "name at least one key file",
                );
            }
        }
        if self.pipeline.max_batch_records == 0 {
            bad("pipeline.max_batch_records".into(), "must be at least 1");
        }
        if self.pipeline.writers > MAX_WRITERS {
            bad(
                "pipeline.writers".into(),
                &format!("must be at most {MAX_WRITERS} (0: one per core)"),
            );
        }
        if self.pipeline.channel_capacity == 0 {
            bad("pipeline.channel_capacity".into(), "must be at least 1");
        }
        if self.pipeline.max_record_bytes.0 < 64 {
            bad(
                "pipeline.max_record_bytes".into(),
                "must be at least 64 bytes",
            );
        }
        if self.storage.block_cache.0 < (1 << 20) {
            bad("storage.block_cache".into(), "must be at least 1MiB");
        }
        if self.storage.write_buffer.0 < (4 << 20) {
            bad("storage.write_buffer".into(), "must be at least 4MiB");
        }
        if self.subscriptions.max_batch_size == 0 {
            bad("subscriptions.max_batch_size".into(), "must be at least 1");
        }
        if self.subscriptions.buffer_batches == 0 {
            bad("subscriptions.buffer_batches".into(), "must be at least 1");
        }
        if self.subscriptions.max_keys == 0 || self.subscriptions.max_fields == 0 {
            bad(
                "subscriptions.max_keys".into(),
                "max_keys and max_fields must be at least 1",
            );
        }
        if self.subscriptions.max_request_bytes.0 < 4096 {
            bad(
                "subscriptions.max_request_bytes".into(),
                "must be at least 4KiB",
            );
        }
        if self.subscriptions.max_subscribers == 0 {
            bad("subscriptions.max_subscribers".into(), "must be at least 1");
        }
        if self.subscriptions.progress_interval < Duration::from_millis(10) {
            bad(
                "subscriptions.progress_interval".into(),
                "must be at least 10ms",
            );
        }
        if self.pipelines.repartition_topic_prefix.trim().is_empty() {
            bad(
                "pipelines.repartition_topic_prefix".into(),
                "must not be empty",
            );
        }
        if self.pipelines.repartition_partitions < 1 {
            bad(
                "pipelines.repartition_partitions".into(),
                "must be at least 1",
            );
        }
        if self.pipelines.repartition_replication < 1 {
            bad(
                "pipelines.repartition_replication".into(),
                "must be at least 1",
            );
        }
        if !self.pipelines.files.is_empty() && self.kafka.is_none() {
            bad(
                "pipelines.files".into(),
                "pipelines read Kafka topics and re-key through one: add the kafka section",
            );
        }
        if let Some(c) = &self.cluster {
            if c.resolve_node_id(&self.node.id).is_none() {
                bad(
                    "cluster.node_id".into(),
                    "required unless node.id ends in -N (a StatefulSet ordinal)",
                );
            }
            let mut ids = std::collections::BTreeSet::new();
            for (i, entry) in c.bootstrap.iter().enumerate() {
                match parse_peer(entry) {
                    Ok((id, _)) => {
                        if !ids.insert(id) {
                            bad(format!("cluster.bootstrap.{i}"), "duplicate node id");
                        }
                    }
                    Err(e) => bad(format!("cluster.bootstrap.{i}"), &e),
                }
            }
            if c.failure_timeout < c.lease * 2 {
                bad(
                    "cluster.failure_timeout".into(),
                    "must be at least twice cluster.lease",
                );
            }
            if c.lease < c.heartbeat_interval * 2 {
                bad(
                    "cluster.lease".into(),
                    "must be at least twice cluster.heartbeat_interval",
                );
            }
            if self.kafka.is_none() {
                bad(
                    "cluster".into(),
                    "a cluster needs the kafka section (its change logs are Kafka topics)",
                );
            }
            for (i, v) in self.views.iter().enumerate() {
                for (j, src) in v.sources.iter().enumerate() {
                    if matches!(src, SourceConfig::File(_)) {
                        bad(
                            format!("views[{i}].sources[{j}].file"),
                            "file sources are not supported in a cluster (every node would read the file); publish the export to a topic",
                        );
                    }
                }
            }
            if c.changes_topic_prefix.trim().is_empty() {
                bad("cluster.changes_topic_prefix".into(), "must not be empty");
            }
            if c.changes_replication < 1 {
                bad("cluster.changes_replication".into(), "must be at least 1");
            }
            if c.replication_factor > 16 {
                bad(
                    "cluster.replication_factor".into(),
                    "must be at most 16 (0: every node holds every shard)",
                );
            }
            if c.zone.as_ref().is_some_and(|z| z.trim().is_empty()) {
                bad("cluster.zone".into(), "must not be empty when given");
            }
            if c.raft_snapshot_logs == 0 {
                bad("cluster.raft_snapshot_logs".into(), "must be at least 1");
            }
            if c.election_timeout < c.raft_heartbeat * 3 {
                bad(
                    "cluster.election_timeout".into(),
                    "must be at least three cluster.raft_heartbeat",
                );
            }
        }
        // With Kafka, a node may start empty and take pipelines through
        // `ndc pipeline apply`; without it there is nothing it could run.
        if self.views.is_empty() && self.pipelines.files.is_empty() && self.kafka.is_none() {
            bad(
                "views".into(),
                "at least one view (or, with a kafka section, a pipeline) is required",
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, view) in self.views.iter().enumerate() {
            let at = format!("views[{i}]");
            if view.name.trim().is_empty() {
                bad(format!("{at}.name"), "must not be empty");
            } else if !view
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                bad(
                    format!("{at}.name"),
                    "may contain only letters, digits, '.', '_' and '-'",
                );
            } else if ndc_operators::shard::is_shard_suffixed(&view.name) {
                bad(
                    format!("{at}.name"),
                    "must not end in '.shard<N>' (the change-log topics of sharded views are named so)",
                );
            } else if !names.insert(view.name.clone()) {
                bad(format!("{at}.name"), "another view has the same name");
            }
            if view.shards == 0 || view.shards > MAX_SHARDS {
                bad(
                    format!("{at}.shards"),
                    &format!("must be between 1 and {MAX_SHARDS}"),
                );
            }
            if view.shards > 1
                && view
                    .sources
                    .iter()
                    .any(|s| matches!(s, SourceConfig::File(_)))
            {
                bad(
                    format!("{at}.shards"),
                    "a sharded view reads Kafka sources only (a shard is a set of source partitions; a file has none): publish the export to a topic",
                );
            }
            if view.key_columns.iter().any(|c| c.trim().is_empty()) {
                bad(
                    format!("{at}.key_columns"),
                    "column names must not be empty",
                );
            }
            let mut columns = std::collections::BTreeSet::new();
            if let Some(repeated) = view.key_columns.iter().find(|c| !columns.insert(*c)) {
                bad(
                    format!("{at}.key_columns"),
                    &format!("column {repeated:?} is named twice"),
                );
            }
            if view.sources.is_empty() {
                bad(format!("{at}.sources"), "at least one source is required");
            }
            for (j, source) in view.sources.iter().enumerate() {
                match source {
                    SourceConfig::Kafka(k) => {
                        if k.topic.trim().is_empty() {
                            bad(
                                format!("{at}.sources[{j}].kafka.topic"),
                                "must not be empty",
                            );
                        }
                        if self.kafka.is_none() {
                            bad(
                                format!("{at}.sources[{j}].kafka"),
                                "a Kafka source needs the top-level `kafka` section",
                            );
                        }
                    }
                    SourceConfig::File(f) => {
                        if f.path.as_os_str().is_empty() {
                            bad(format!("{at}.sources[{j}].file.path"), "must not be empty");
                        }
                    }
                }
            }
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Many(errors)),
        }
    }

    /// The configuration as YAML that [`NodeConfig::from_yaml_with_env`]
    /// reads back (sources as `kafka: {...}` maps, not YAML tags).
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        let invalid = |e: &dyn std::fmt::Display| ConfigError::Invalid {
            key: "(top level)".into(),
            message: e.to_string(),
        };
        // Through JSON text, which YAML reads: numbers stay numbers (a JSON
        // value handed to another serializer would not, with exact numbers).
        let json = serde_json::to_string(self).map_err(|e| invalid(&e))?;
        let value: serde_norway::Value = serde_norway::from_str(&json).map_err(|e| invalid(&e))?;
        serde_norway::to_string(&value).map_err(|e| invalid(&e))
    }

    /// Where dead letters go when there is no Kafka.
    pub fn dead_letter_file(&self) -> PathBuf {
        self.dead_letter
            .file
            .clone()
            .unwrap_or_else(|| self.node.data_dir.join("dead-letter.ndjson"))
    }
}

fn apply_override(root: &mut serde_norway::Value, var: &str, raw: &str) -> Result<(), ConfigError> {
    use serde_norway::Value;
    let err = |message: String| ConfigError::Env {
        var: var.to_string(),
        message,
    };
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    if path.iter().any(String::is_empty) {
        return Err(err("empty path segment".into()));
    }
    // An empty value is an empty string (YAML would read it as null).
    let parsed: Value = if raw.trim().is_empty() {
        Value::String(raw.to_string())
    } else {
        serde_norway::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()))
    };
    let mut node = root;
    for (i, segment) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        if node.is_null() {
            *node = Value::Mapping(Default::default());
        }
        node = match node {
            Value::Sequence(items) => {
                let idx: usize = segment
                    .parse()
                    .map_err(|_| err(format!("{segment:?} must be a list index")))?;
                if idx > items.len() {
                    return Err(err(format!(
                        "index {idx} is past the end of a list of {}",
                        items.len()
                    )));
                }
                if idx == items.len() {
                    items.push(Value::Null);
                }
                &mut items[idx]
            }
            Value::Mapping(map) => map
                .entry(Value::String(segment.clone()))
                .or_insert(Value::Null),
            _ => return Err(err(format!("cannot set {segment:?} inside a scalar"))),
        };
        if last {
            *node = parsed.clone();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
tls: { insecure: true }
kafka:
  bootstrap_servers: 127.0.0.1:9092
views:
  - name: population.citizens
    key_columns: [person_id]
    sources:
      - kafka: { topic: population.public.citizens }
"#;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<NodeConfig, ConfigError> {
        NodeConfig::from_yaml_with_env(
            text,
            "test.yaml",
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn cluster_ids_come_from_statefulset_ordinals_or_explicit_ids() {
        let text = format!(
            "{MINIMAL}node: {{ id: ndc-2 }}\ncluster:\n  bootstrap: [ndc-0.ndc:50051, ndc-1.ndc:50051, \"7=10.0.0.9:50051\"]\n"
        );
        let c = parse(&text, &[]).expect("valid");
        let cluster = c.cluster.expect("cluster section");
        assert_eq!(cluster.resolve_node_id(&c.node.id), Some(2));
        let peers: Vec<_> = cluster
            .bootstrap
            .iter()
            .map(|e| parse_peer(e).expect("peer"))
            .collect();
        assert_eq!(
            peers,
            vec![
                (0, "ndc-0.ndc:50051".to_string()),
                (1, "ndc-1.ndc:50051".to_string()),
                (7, "10.0.0.9:50051".to_string())
            ]
        );
    }

    #[test]
    fn cluster_errors_name_the_key() {
        let text = format!(
            "{MINIMAL}node: {{ id: edge }}\ncluster:\n  bootstrap: [nohost, \"1=a:1\", \"1=b:2\"]\n  lease: 2s\n  failure_timeout: 3s\n"
        );
        let err = parse(&text, &[]).expect_err("invalid").to_string();
        for key in [
            "cluster.node_id",
            "cluster.bootstrap.0",
            "cluster.bootstrap.2",
            "cluster.failure_timeout",
        ] {
            assert!(err.contains(key), "{key} missing from: {err}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL, &[]).expect("valid");
        assert_eq!(c.pipeline.max_record_bytes, ByteSize(1 << 20));
        assert!(c.storage.sync_commits);
        assert!(c.pipelines.create_repartition_topics);
        assert_eq!(c.views[0].key_columns, vec!["person_id"]);
        assert!(
            matches!(&c.views[0].sources[0], SourceConfig::Kafka(k) if k.format == Format::Debezium)
        );
    }

    #[test]
    fn env_overrides_nested_keys_and_list_items() {
        let c = parse(
            MINIMAL,
            &[
                ("NDC__STORAGE__SYNC_COMMITS", "false"),
                ("NDC__STORAGE__BLOCK_CACHE", "64MiB"),
                ("NDC__NODE__GRPC_LISTEN", "0.0.0.0:6000"),
                ("NDC__VIEWS__0__NAME", "citizens"),
                ("NDC__KAFKA__PROPERTIES__SECURITY.PROTOCOL", "ssl"),
                ("NDC__PIPELINES__CREATE_REPARTITION_TOPICS", "false"),
                ("OTHER", "ignored"),
            ],
        )
        .expect("valid");
        assert!(!c.storage.sync_commits);
        assert!(!c.pipelines.create_repartition_topics);
        assert_eq!(c.storage.block_cache, ByteSize(64 << 20));
        assert_eq!(c.node.grpc_listen.port(), 6000);
        assert_eq!(c.views[0].name, "citizens");
        assert_eq!(
            c.kafka
                .as_ref()
                .and_then(|k| k.properties.get("security.protocol"))
                .map(String::as_str),
            Some("ssl")
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(&MINIMAL.replace("key_columns", "key_colums"), &[]).expect_err("typo");
        assert!(
            e.to_string().contains("views[0]") && e.to_string().contains("key_colums"),
            "{e}"
        );
        let e = parse(
            &format!("{MINIMAL}pipeline:\n  max_batch_delay: soon\n"),
            &[],
        )
        .expect_err("bad duration");
        assert!(e.to_string().starts_with("pipeline.max_batch_delay"), "{e}");
        let e = parse(
            MINIMAL,
            &[
                ("NDC__STORAGE__WRITE_BUFFER", "1KiB"),
                ("NDC__VIEWS__0__SOURCES__0__KAFKA__TOPIC", ""),
            ],
        )
        .expect_err("two problems");
        let text = e.to_string();
        assert!(
            text.contains("storage.write_buffer: must be at least 4MiB"),
            "{text}"
        );
        assert!(
            text.contains("views[0].sources[0].kafka.topic: must not be empty"),
            "{text}"
        );
    }

    #[test]
    fn a_key_column_named_twice_is_rejected() {
        let text = MINIMAL.replace(
            "key_columns: [person_id]",
            "key_columns: [person_id, person_id]",
        );
        let e = parse(&text, &[]).expect_err("repeated key column");
        assert!(
            e.to_string()
                .contains(r#"views[0].key_columns: column "person_id" is named twice"#),
            "{e}"
        );
    }

    #[test]
    fn kafka_source_requires_kafka_section_and_names_must_be_unique() {
        let text = r#"
views:
  - name: a
    sources: [ { kafka: { topic: t } } ]
  - name: a
    sources: [ { file: { path: x.ndjson } } ]
"#;
        let text = parse(text, &[]).expect_err("invalid").to_string();
        assert!(
            text.contains("views[0].sources[0].kafka: a Kafka source needs"),
            "{text}"
        );
        assert!(
            text.contains("views[1].name: another view has the same name"),
            "{text}"
        );
    }

    #[test]
    fn shard_counts_names_and_writers_are_checked() {
        let text = r#"
kafka: { bootstrap_servers: 127.0.0.1:9092 }
pipeline: { writers: 65 }
views:
  - name: a
    shards: 0
    sources: [ { kafka: { topic: t } } ]
  - name: b
    shards: 257
    sources: [ { kafka: { topic: t } } ]
  - name: c.shard3
    sources: [ { kafka: { topic: t } } ]
  - name: d
    shards: 2
    sources: [ { file: { path: x.ndjson } } ]
  - name: e
    shards: 4
    sources: [ { kafka: { topic: t } } ]
"#;
        let text = parse(text, &[]).expect_err("invalid").to_string();
        for wanted in [
            "views[0].shards: must be between 1 and 256",
            "views[1].shards: must be between 1 and 256",
            "views[2].name: must not end in '.shard<N>'",
            "views[3].shards: a sharded view reads Kafka sources only",
            "pipeline.writers: must be at most 64",
        ] {
            assert!(text.contains(wanted), "{wanted}: {text}");
        }
        assert!(!text.contains("views[4]"), "{text}");
    }

    #[test]
    fn placement_settings_are_checked_and_the_zone_comes_from_the_environment() {
        let cluster = |extra: &str| {
            format!(
                r#"
kafka: {{ bootstrap_servers: 127.0.0.1:9092 }}
node: {{ id: ndc-0 }}
tls: {{ insecure: true }}
cluster: {{ bootstrap: ["ndc-0.ndc:50052"]{extra} }}
views:
  - name: a
    shards: 8
    sources: [ {{ kafka: {{ topic: t }} }} ]
"#
            )
        };
        let text = parse(&cluster(", replication_factor: 17, zone: ' '"), &[])
            .expect_err("invalid")
            .to_string();
        assert!(
            text.contains("cluster.replication_factor: must be at most 16"),
            "{text}"
        );
        assert!(text.contains("cluster.zone: must not be empty"), "{text}");
        let c = parse(
            &cluster(", replication_factor: 2"),
            &[("NDC__CLUSTER__ZONE", "eu-west-1a")],
        )
        .expect("valid");
        let section = c.cluster.expect("cluster section");
        assert_eq!(section.replication_factor, 2);
        assert_eq!(section.zone.as_deref(), Some("eu-west-1a"));
    }

    #[test]
    fn printed_config_reads_back() {
        let c = parse(MINIMAL, &[("NDC__STORAGE__BLOCK_CACHE", "64MiB")]).expect("valid");
        let text = c.to_yaml().expect("serializes");
        assert!(text.contains("kafka:") && !text.contains('!'), "{text}");
        let back = parse(&text, &[]).expect("reads back");
        assert_eq!(back.to_yaml().expect("serializes"), text);
    }

    #[test]
    fn a_secret_inline_is_refused_and_one_named_is_read_but_never_printed() {
        let inline = MINIMAL.replace(
            "  bootstrap_servers: 127.0.0.1:9092",
            "  bootstrap_servers: 127.0.0.1:9092\n  properties: { security.protocol: sasl_ssl, sasl.password: hunter2 }",
        );
        let e = parse(&inline, &[]).expect_err("inline secret").to_string();
        assert!(e.contains("kafka.properties.sasl.password"), "{e}");
        assert!(
            e.contains("kafka.secrets.sasl.password"),
            "says where it goes: {e}"
        );
        assert!(
            !e.contains("hunter2"),
            "the error never repeats the value: {e}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cr3t-from-file\n").expect("write");
        let named = MINIMAL.replace(
            "  bootstrap_servers: 127.0.0.1:9092",
            &format!(
                "  bootstrap_servers: 127.0.0.1:9092\n  properties: {{ security.protocol: sasl_ssl, sasl.mechanism: SCRAM-SHA-512, sasl.username: ingest }}\n  secrets: {{ sasl.password: {{ file: {} }} }}",
                file.display()
            ),
        );
        let c = parse(&named, &[]).expect("valid");
        let k = c.kafka.as_ref().expect("kafka");
        assert_eq!(
            k.resolved_secrets.get("sasl.password").map(Secret::expose),
            Some("s3cr3t-from-file"),
            "read without the trailing newline"
        );
        let printed = c.to_yaml().expect("serializes");
        assert!(!printed.contains("s3cr3t"), "{printed}");
        assert!(printed.contains("sasl.password"), "{printed}");
        assert!(!format!("{c:?}").contains("s3cr3t"), "nor in Debug");
        let back = parse(&printed, &[]).expect("what check-config prints reads back");
        assert_eq!(
            back.kafka.map(|k| k.resolved_secrets),
            Some(k.resolved_secrets.clone())
        );

        let missing = named.replace(&file.display().to_string(), "/nonexistent/secret");
        let e = parse(&missing, &[]).expect_err("unreadable").to_string();
        assert!(
            e.contains("kafka.secrets.sasl.password") && e.contains("/nonexistent/secret"),
            "{e}"
        );
    }

    #[test]
    fn plaintext_only_when_the_configuration_says_insecure() {
        let none = MINIMAL.replace("tls: { insecure: true }\n", "");
        let e = parse(&none, &[])
            .expect_err("no TLS, no insecure")
            .to_string();
        assert!(
            e.contains("tls.cert and tls.key") && e.contains("tls.insecure: true"),
            "{e}"
        );
        let both = MINIMAL.replace(
            "tls: { insecure: true }",
            "tls: { insecure: true, cert: /c.pem, key: /k.pem }",
        );
        assert!(parse(&both, &[]).is_err());
        let half = MINIMAL.replace("tls: { insecure: true }", "tls: { cert: /c.pem }");
        let e = parse(&half, &[])
            .expect_err("a cert without its key")
            .to_string();
        assert!(e.contains("tls.key"), "{e}");
        let tls = MINIMAL.replace(
            "tls: { insecure: true }",
            "tls: { cert: /c.pem, key: /k.pem, client_ca: /ca.pem }",
        );
        let c = parse(&tls, &[]).expect("valid");
        assert_eq!(c.tls.reload_interval, Duration::from_secs(10));
        let cluster =
            format!("{tls}node: {{ id: ndc-0 }}\ncluster:\n  bootstrap: [ndc-0.ndc:50052]\n");
        let c = parse(&cluster, &[]).expect("peers verified with tls.client_ca");
        assert_eq!(
            c.cluster.map(|c| c.peer_identity),
            Some("ndc-{id}".to_string())
        );
        let no_ca = MINIMAL.replace(
            "tls: { insecure: true }",
            "tls: { cert: /c.pem, key: /k.pem }\nnode: { id: ndc-0 }\ncluster:\n  bootstrap: [ndc-0.ndc:50052]",
        );
        let e = parse(&no_ca, &[])
            .expect_err("peers unverifiable")
            .to_string();
        assert!(e.contains("cluster.peer_ca"), "{e}");
        let anonymous = format!("{tls}access: {{ anonymous: true }}\n");
        let e = parse(&anonymous, &[])
            .expect_err("anonymous over TLS")
            .to_string();
        assert!(e.contains("access.anonymous"), "{e}");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("512"), Ok(ByteSize(512)));
        assert_eq!(ByteSize::parse("2KiB"), Ok(ByteSize(2048)));
        assert_eq!(ByteSize::parse("1 GB"), Ok(ByteSize(1_000_000_000)));
        assert!(ByteSize::parse("12 parsecs").is_err());
    }
}
