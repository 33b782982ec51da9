//! The real `forwarder run` binary in the lab's edge namespace, pinned to the edge
//! CPU, with its counters read through the control socket.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use forwarder::config::{Config, XdpMode};
use forwarder::datapath::{Datapath, Plan};
use forwarder::route::{keep_neighbour_resolved, route_to};
use forwarder::telemetry::snapshot::StatsSnapshot;
use forwarder_common::DropReason;

use super::sys::TempDir;
use forwarder_tests::{Lab, NsChild};

/// `$FORWARDER_BIN` (set by `cargo xtask bench`), else `forwarder` next to this
/// executable (same target directory and profile), else `target/release/forwarder`.
pub fn forwarder_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FORWARDER_BIN").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("$FORWARDER_BIN is {}, which does not exist", p.display());
        }
        return Ok(p);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join("forwarder"));
        // tests: target/<profile>/deps/<test> → target/<profile>/forwarder
        if let Some(up) = dir.parent() {
            candidates.push(up.join("forwarder"));
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    candidates.push(root.join("target/release/forwarder"));
    candidates.into_iter().find(|p| p.is_file()).context(
        "no forwarder binary: set FORWARDER_BIN or run through `cargo xtask bench` \
             (which builds it)",
    )
}

/// A running agent; stopped (SIGTERM, then SIGKILL) on drop.
pub struct AgentProc {
    child: Option<NsChild>,
    control: PathBuf,
    dir: TempDir,
}

impl AgentProc {
    /// Writes `config` and starts `taskset -c CPU forwarder run` in the edge
    /// namespace; returns once the control socket answers.
    pub fn start(lab: &Lab, config: &str, cpu: usize) -> Result<AgentProc> {
        let bin = forwarder_bin()?;
        let dir = TempDir::new("agent")?;
        let config_path = dir.path().join("forwarder.toml");
        std::fs::write(&config_path, config)?;
        let control = dir.path().join("control.sock");
        let state_dir = dir.path().join("state");
        let log = std::fs::File::create(dir.path().join("agent.log"))?;
        let nice = super::sys::NICE.to_string();
        let mut cmd = lab.edge().cmd(
            "nice",
            &[
                "-n".as_ref(),
                nice.as_ref(),
                "taskset".as_ref(),
                "-c".as_ref(),
                cpu.to_string().as_ref(),
                bin.as_os_str(),
                "run".as_ref(),
                "--config".as_ref(),
                config_path.as_os_str(),
                "--control".as_ref(),
                control.as_os_str(),
                "--state-dir".as_ref(),
                state_dir.as_os_str(),
                "--drain".as_ref(),
                "1s".as_ref(),
            ] as &[&std::ffi::OsStr],
        );
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("RUST_LOG", "warn");
        let child = lab.edge().spawn(cmd)?;
        let mut agent = AgentProc {
            child: Some(child),
            control,
            dir,
        };
        let ready = super::wait_for(Duration::from_secs(30), Duration::from_millis(50), || {
            if let Some(child) = agent.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Some(Err(status));
            }
            agent.stats().ok().map(Ok)
        });
        match ready {
            Some(Ok(_)) => Ok(agent),
            Some(Err(status)) => {
                let log =
                    std::fs::read_to_string(agent.dir.path().join("agent.log")).unwrap_or_default();
                let last = log
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                bail!(
                    "the agent exited ({status}): {}
{}",
                    last.trim(),
                    agent.log()
                )
            }
            None => bail!(
                "the agent's control socket did not answer within 30 s\n{}",
                agent.log()
            ),
        }
    }

    pub fn stats(&self) -> Result<StatsSnapshot> {
        forwarder::telemetry::control::request_stats(&self.control)
    }

    /// The agent's process id (`ip netns exec`, `nice` and `taskset` exec into it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default();
        format!("agent log:\n{}", text.trim_end())
    }

    /// SIGTERM and wait for a clean exit (the agent detaches XDP on the way out).
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let status = child.terminate(Duration::from_secs(10))?;
            if !status.success() {
                bail!("the agent exited with {status}\n{}", self.log());
            }
        }
        Ok(())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// The datapath loaded in-process inside the edge namespace (`Datapath::load`, the
/// plan of `config`, managed neighbours for its origins): the same XDP program the
/// agent attaches, without the agent's userspace. Attach and detach it per round.
pub struct InProc {
    datapath: Option<Datapath>,
    lab_edge: forwarder_tests::Netns,
    ifaces: Vec<String>,
}

impl InProc {
    pub fn load(lab: &Lab, config: &str) -> Result<InProc> {
        let config = Config::parse(config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let ifaces = config.agent.interfaces.clone();
        let datapath = lab.edge().run_in(move || -> Result<Datapath> {
            let edges = [
                forwarder_tests::EDGE_CLIENT_V4.into(),
                forwarder_tests::EDGE_ORIGIN_V4.into(),
            ];
            let plan = Plan::build(&config, &edges, route_to)?;
            for app in &config.apps {
                for origin in &app.origins {
                    keep_neighbour_resolved(&route_to(origin.addr)?.neighbour())?;
                }
            }
            let mut datapath = Datapath::load()?;
            datapath.apply(&plan)?;
            Ok(datapath)
        })??;
        Ok(InProc {
            datapath: Some(datapath),
            lab_edge: lab.edge().clone(),
            ifaces,
        })
    }

    /// Attaches XDP (driver mode) to every configured interface.
    pub fn attach(&mut self) -> Result<()> {
        let datapath = self.datapath.as_mut().context("datapath gone")?;
        let ifaces = self.ifaces.clone();
        self.lab_edge.run_in(move || -> Result<()> {
            for i in &ifaces {
                datapath.attach_xdp(i, XdpMode::Driver)?;
            }
            Ok(())
        })?
    }

    pub fn detach(&mut self) -> Result<()> {
        let datapath = self.datapath.as_mut().context("datapath gone")?;
        self.lab_edge.run_in(move || datapath.detach_all())?
    }

    /// Answers every new flow from its origin (`eo` of the lab, the origin's MAC)
    /// so the client's next datagram makes it assured (see `bench::flows`).
    pub fn answer_new_flows(&self, eo: &str, origin_mac: [u8; 6]) -> Result<usize> {
        let datapath = self.datapath.as_ref().context("datapath gone")?;
        let eo = eo.to_string();
        self.lab_edge.run_in(move || -> Result<usize> {
            let ifindex = forwarder::datapath::ifindex(&eo)?;
            super::flows::answer_new_flows(datapath, ifindex, origin_mac)
        })?
    }

    /// How many UDP flows are assured and how many new.
    pub fn flow_admission(&self) -> Result<(usize, usize)> {
        let datapath = self.datapath.as_ref().context("datapath gone")?;
        let flows = datapath.udp_flows()?;
        let assured = flows
            .iter()
            .filter(|(_, s)| s.admission == forwarder_common::ADMISSION_ASSURED)
            .count();
        Ok((assured, flows.len() - assured))
    }

    /// Non-zero drop counters, e.g. `no_route=12` (for error messages).
    pub fn drop_summary(&self) -> String {
        let Some(datapath) = self.datapath.as_ref() else {
            return String::new();
        };
        match datapath.counters() {
            Ok(c) => DropReason::ALL
                .iter()
                .filter(|r| c.drop_count(**r) > 0)
                .map(|r| format!("{}={}", r.label(), c.drop_count(*r)))
                .collect::<Vec<_>>()
                .join(" "),
            Err(e) => format!("({e:#})"),
        }
    }

    pub fn drops(&self, reason: DropReason) -> Result<u64> {
        let datapath = self.datapath.as_ref().context("datapath gone")?;
        Ok(datapath.counters()?.drop_count(reason))
    }

    /// The kernel's (run time ns, run count) of the datapath program.
    pub fn run_stats(&self) -> Result<(u64, u64)> {
        let datapath = self.datapath.as_ref().context("datapath gone")?;
        datapath.xdp_program_stats(forwarder::datapath::PROG_XDP)
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}

/// A program other than the agent (nginx, haproxy, iperf3 …) in a lab namespace,
/// its output in a log file; killed on drop.
pub struct Proc {
    pub child: NsChild,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `program args` in `ns` pinned to `cpu`, output to `log`.
    pub fn spawn(
        ns: &forwarder_tests::Netns,
        cpu: usize,
        program: &str,
        args: &[&str],
        log: PathBuf,
    ) -> Result<Proc> {
        let file = std::fs::File::create(&log)?;
        let cpu = cpu.to_string();
        let nice = super::sys::NICE.to_string();
        let mut full = vec!["-n", nice.as_str(), "taskset", "-c", cpu.as_str(), program];
        full.extend_from_slice(args);
        let mut cmd = ns.cmd("nice", &full);
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = ns
            .spawn(cmd)
            .with_context(|| format!("starting {program}"))?;
        Ok(Proc { child, log })
    }

    /// Fails with the log when the process has already exited.
    pub fn check_running(&mut self, what: &str) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let last = log
                .lines()
                .rev()
                .find(|l| l.contains("ALERT") || l.contains("emerg") || l.contains("rror"))
                .or_else(|| log.lines().rev().find(|l| !l.trim().is_empty()))
                .unwrap_or("");
            bail!("{what} exited ({status}): {}\n{}", last.trim(), log.trim());
        }
        Ok(())
    }
}
