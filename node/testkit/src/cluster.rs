//! A cluster of node processes on loopback: every member's ports are bound
//! before any member starts, so each configuration names its peers, and
//! each member keeps its ports across restarts.

use crate::process::{NodeProcess, Ports};
use ndc_node::NodeConfig;
use std::path::{Path, PathBuf};

/// `ID=127.0.0.1:PORT` of each `(id, peer ports)`, as `cluster.bootstrap`
/// takes them.
pub fn bootstrap_list<'p>(members: impl IntoIterator<Item = (u64, &'p Ports)>) -> Vec<String> {
    members
        .into_iter()
        .filter_map(|(id, p)| Some(format!("{id}={}", p.peer()?)))
        .collect()
}

/// One member: its Raft id and its process.
pub struct Member {
    pub id: u64,
    pub node: NodeProcess,
}

impl Member {
    /// Its public gRPC address.
    pub fn addr(&self) -> String {
        self.node.grpc().to_string()
    }

    pub fn running(&self) -> bool {
        self.node.running()
    }
}

/// Node processes forming one cluster (stopped when dropped).
pub struct Cluster {
    pub members: Vec<Member>,
    bin: PathBuf,
    dir: PathBuf,
    /// The initial voters, as every member's `cluster.bootstrap` names them.
    bootstrap: Vec<String>,
}

impl Cluster {
    /// Members `0..nodes`, configured but not started: `config(id)` gives
    /// each one's configuration, in which this sets `node.id` (`ndc-ID`,
    /// the id its certificate names), `node.data_dir` (`dir/ndc-ID`) and
    /// `cluster.bootstrap` (every member). Each logs to `dir/ndc-ID.log`.
    pub fn prepare(
        bin: &Path,
        dir: &Path,
        nodes: u64,
        config: impl Fn(u64) -> NodeConfig,
    ) -> anyhow::Result<Cluster> {
        let ports: Vec<Ports> = (0..nodes)
            .map(|_| Ports::bind(true))
            .collect::<Result<_, _>>()?;
        let bootstrap = bootstrap_list((0..nodes).zip(&ports));
        let mut cluster = Cluster {
            members: Vec::new(),
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            bootstrap,
        };
        for (id, ports) in (0..nodes).zip(ports) {
            cluster.add(id, ports, config(id))?;
        }
        Ok(cluster)
    }

    /// [`Cluster::prepare`], every member started.
    pub fn start(
        bin: &Path,
        dir: &Path,
        nodes: u64,
        config: impl Fn(u64) -> NodeConfig,
    ) -> anyhow::Result<Cluster> {
        let mut cluster = Cluster::prepare(bin, dir, nodes, config)?;
        for m in &mut cluster.members {
            m.node.start()?;
        }
        Ok(cluster)
    }

    /// A member outside the bootstrap list (it names the initial voters,
    /// as a node added to a StatefulSet does, and waits for `add-node`),
    /// not started. Returns its peer address, what `add-node` names.
    pub fn prepare_joiner(&mut self, id: u64, config: NodeConfig) -> anyhow::Result<String> {
        let ports = Ports::bind(true)?;
        let peer = ports
            .peer()
            .map(|p| p.to_string())
            .unwrap_or_else(String::new);
        self.add(id, ports, config)?;
        Ok(peer)
    }

    fn add(&mut self, id: u64, ports: Ports, mut config: NodeConfig) -> anyhow::Result<()> {
        let name = format!("ndc-{id}");
        config.node.id = name.clone();
        config.node.data_dir = self.dir.join(&name);
        config
            .cluster
            .get_or_insert_with(Default::default)
            .bootstrap = self.bootstrap.clone();
        let node = NodeProcess::new(&self.bin, ports, config, &self.dir, &name)?;
        self.members.push(Member { id, node });
        Ok(())
    }

    /// The member with Raft id `id`.
    pub fn member(&mut self, id: u64) -> &mut NodeProcess {
        match self.members.iter_mut().find(|m| m.id == id) {
            Some(m) => &mut m.node,
            None => panic!("no member {id}"),
        }
    }

    /// Each member's panics and last `lines` log lines, on stderr (for a
    /// failing test).
    pub fn dump_logs(&self, lines: usize) {
        for m in &self.members {
            let text = std::fs::read_to_string(m.node.log_path()).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            for (i, l) in all.iter().enumerate() {
                if l.contains("panicked at") {
                    eprintln!("---- ndc-{} panicked:", m.id);
                    for l in &all[i..(i + 4).min(all.len())] {
                        eprintln!("{l}");
                    }
                }
            }
            eprintln!("---- ndc-{} log (last {lines} lines)", m.id);
            eprintln!("{}", all[all.len().saturating_sub(lines)..].join("\n"));
        }
    }
}
