//! Node processes on loopback ports that the fixture binds and keeps for
//! the node's whole life: each start hands the sockets to the new process
//! (systemd's socket-activation protocol, see `ndc_node::node::Listeners`),
//! so no port is ever released for a child to pick up, a restarted node is
//! at the same address, and connections made while it is down wait in the
//! socket's backlog instead of being refused.

use anyhow::{Context, bail};
use command_fds::{CommandFdExt, FdMapping};
use ndc_node::NodeConfig;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A node's listening sockets, bound on loopback ports the system chose.
#[derive(Debug)]
pub struct Ports {
    grpc: TcpListener,
    http: TcpListener,
    peer: Option<TcpListener>,
}

impl Ports {
    /// gRPC and HTTP listeners, and a peer listener for a cluster member.
    pub fn bind(peer: bool) -> std::io::Result<Ports> {
        let any = || TcpListener::bind("127.0.0.1:0");
        Ok(Ports {
            grpc: any()?,
            http: any()?,
            peer: if peer { Some(any()?) } else { None },
        })
    }

    pub fn grpc(&self) -> SocketAddr {
        addr(&self.grpc)
    }

    pub fn http(&self) -> SocketAddr {
        addr(&self.http)
    }

    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer.as_ref().map(addr)
    }

    /// Writes the addresses into `config` (what the node reports; it listens
    /// on the sockets handed to it).
    pub fn configure(&self, config: &mut NodeConfig) {
        config.node.grpc_listen = self.grpc();
        config.node.http_listen = self.http();
        if let Some(peer) = self.peer() {
            config.node.peer_listen = peer;
        }
    }

    /// Copies of the sockets for a node started in this process
    /// (`ndc_node::node::start_with`).
    pub fn listeners(&self) -> std::io::Result<ndc_node::node::Listeners> {
        Ok(ndc_node::node::Listeners {
            grpc: Some(self.grpc.try_clone()?),
            http: Some(self.http.try_clone()?),
            peer: self.peer.as_ref().map(TcpListener::try_clone).transpose()?,
        })
    }

    /// The sockets as file descriptors 3, 4 (and 5) of a child, with the
    /// names the node looks for.
    fn hand_to(&self, command: &mut Command) -> anyhow::Result<()> {
        let mut names = Vec::new();
        let mut mappings = Vec::new();
        let sockets = [
            ("grpc", Some(&self.grpc)),
            ("http", Some(&self.http)),
            ("peer", self.peer.as_ref()),
        ];
        for (name, socket) in sockets {
            let Some(socket) = socket else { continue };
            mappings.push(FdMapping {
                parent_fd: socket.try_clone()?.into(),
                child_fd: 3 + mappings.len() as i32,
            });
            names.push(name);
        }
        command
            .fd_mappings(mappings)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        command
            .env("LISTEN_FDS", names.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .env_remove("LISTEN_PID");
        Ok(())
    }
}

fn addr(l: &TcpListener) -> SocketAddr {
    l.local_addr().expect("a bound listener has an address")
}

/// An `ndc node` process, stopped (SIGKILL) when dropped.
pub struct NodeProcess {
    bin: PathBuf,
    ports: Ports,
    config: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    /// `RUST_LOG` of the process.
    pub log_filter: String,
    child: Option<Child>,
}

impl NodeProcess {
    /// Writes `config` (with `ports`' addresses) to `dir/<name>.yaml`; the
    /// process logs to `dir/<name>.log`. Not started yet.
    pub fn new(
        bin: &Path,
        ports: Ports,
        mut config: NodeConfig,
        dir: &Path,
        name: &str,
    ) -> anyhow::Result<NodeProcess> {
        ports.configure(&mut config);
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, config.to_yaml()?)?;
        Ok(NodeProcess {
            bin: bin.to_path_buf(),
            ports,
            config: path,
            data_dir: config.node.data_dir.clone(),
            log: dir.join(format!("{name}.log")),
            log_filter: "info,rdkafka=warn,openraft=warn".into(),
            child: None,
        })
    }

    /// [`NodeProcess::new`] on fresh ports, started.
    pub fn start_new(
        bin: &Path,
        config: NodeConfig,
        dir: &Path,
        name: &str,
    ) -> anyhow::Result<NodeProcess> {
        let peer = config.cluster.is_some();
        let mut node = NodeProcess::new(bin, Ports::bind(peer)?, config, dir, name)?;
        node.start()?;
        Ok(node)
    }

    /// Starts the process (again), handing it the node's sockets.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.running() {
            bail!("{} is running already", self.config.display());
        }
        // Written anew once this process listens (see `wait_started`).
        let _ = std::fs::remove_file(self.data_dir.join("node.addr"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = Command::new(&self.bin);
        command
            .args(["node", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", &self.log_filter)
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(log);
        self.ports.hand_to(&mut command)?;
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the process listens (it has opened its state and taken
    /// its sockets); fails at once if it exits.
    pub fn wait_started(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.data_dir.join("node.addr").exists() {
                return Ok(());
            }
            if let Some(status) = self.exited()? {
                bail!(
                    "node exited ({status}) before listening; its log ends:\n{}",
                    self.log_tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "node not listening after {timeout:?}; its log ends:\n{}",
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `/readyz` answers 200 (partitions assigned, data path up).
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = tokio::time::timeout(
                Duration::from_secs(2),
                crate::wait::try_http_get(self.http(), "/readyz"),
            )
            .await;
            if let Ok(Ok(text)) = answer
                && text.starts_with("HTTP/1.1 200")
            {
                return Ok(());
            }
            if let Some(status) = self.exited()? {
                bail!(
                    "node exited ({status}); its log ends:\n{}",
                    self.log_tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!("node not ready after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exit status, once the process has exited.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (`-STOP`, `-CONT`, `-TERM` ...) to the process.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("the node is not running")?;
        let ok = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        if !ok.success() {
            bail!("kill {signal} {pid} failed");
        }
        Ok(())
    }

    /// SIGTERM, and the exit status once the node has stopped in order.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal("-TERM")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("node still running {timeout:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn grpc(&self) -> SocketAddr {
        self.ports.grpc()
    }

    pub fn http(&self) -> SocketAddr {
        self.ports.http()
    }

    pub fn peer(&self) -> Option<SocketAddr> {
        self.ports.peer()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Peak resident memory of the process so far (VmHWM).
    pub fn peak_rss(&self) -> Option<u64> {
        peak_rss(&self.pid()?.to_string())
    }

    /// CPU time the process has used so far, all threads.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(&self.pid()?.to_string())
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// CPU time (user + system, all threads) of process `pid` ("self" for
/// this one), from `/proc` (Linux).
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields 14 and 15, counted after the command name in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some((user + system) as f64 / 100.0)
}

/// Peak resident memory (VmHWM) of process `pid` ("self" for this one).
pub fn peak_rss(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A CPU cap on one process (cgroup v1, `/sys/fs/cgroup/cpu`): `cores`
/// cores' worth of CPU time per 100 ms period, so that N node processes on
/// one machine each get the same, smaller machine. Removed when dropped
/// (once its process has exited).
#[derive(Debug)]
pub struct CpuCap {
    dir: PathBuf,
}

impl CpuCap {
    /// Whether this machine lets us cap processes (the hierarchy exists and
    /// is writable); else the load test falls back to CPU-seconds
    /// accounting.
    pub fn available() -> bool {
        let root = Path::new("/sys/fs/cgroup/cpu");
        let probe = root.join(format!("ndc-probe-{}", std::process::id()));
        let ok = std::fs::create_dir(&probe).is_ok();
        let _ = std::fs::remove_dir(&probe);
        ok
    }

    /// Caps process `pid` (all its threads) under the group `name`.
    pub fn apply(name: &str, pid: u32, cores: f64) -> anyhow::Result<CpuCap> {
        let dir = Path::new("/sys/fs/cgroup/cpu").join(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the cgroup {}", dir.display()))?;
        let period = 100_000u64;
        let quota = (cores * period as f64).round() as u64;
        std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string())?;
        std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("cannot move process {pid} into {}", dir.display()))?;
        Ok(CpuCap { dir })
    }

    /// Periods in which the group was held back by its quota, of all.
    pub fn throttled(&self) -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
        let field = |name: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        Some((field("nr_throttled ")?, field("nr_periods ")?))
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}
