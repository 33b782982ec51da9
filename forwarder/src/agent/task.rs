//! The agent's one owner: a thread that holds the `Agent` and takes `Command`s in
//! order. Reloads, snapshots for `stats` and `/metrics`, the flow scanner's reads
//! and removals, the firewall summary and the shutdown all go through it, so no
//! two of them ever touch the state at once and nothing needs a lock. Its work
//! (netlink, map writes, reading maps) is blocking and stays off the async
//! workers; the async side only sends commands.

use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use forwarder_common::{FlowKey, FlowState};
use log::{error, info};

use super::Agent;
use crate::datapath::RouteEpoch;
use crate::telemetry::events::EventLog;
use crate::telemetry::snapshot::StatsSnapshot;
use crate::udp_flows::{FlowTables, UdpFlowStats};

/// Where a command's answer goes.
pub type Reply<T> = SyncSender<anyhow::Result<T>>;

/// What the agent thread can be asked to do.
pub enum Command {
    /// The figures of `stats` and `/metrics`.
    Snapshot(Reply<StatsSnapshot>),
    /// Reload the config file at `path` (`why` says what asked); the outcome is
    /// logged, and sent back when someone waits for it.
    Reload {
        path: std::path::PathBuf,
        why: &'static str,
        done: Option<Reply<()>>,
    },
    /// Reopen the event log (after logrotate moved it).
    ReopenEventLog,
    /// Write the `clientFiltered` summary of the firewall drops since the last.
    SummariseFiltered,
    /// The UDP flow tables, for a scan, and the event log to write its events to.
    ReadFlowTables(Reply<(FlowTables, EventLog)>),
    /// Remove idle flows a scan found.
    EndUdpFlows(Vec<(FlowKey, FlowState)>),
    /// What the last scan found.
    SetUdpFlowStats(UdpFlowStats),
    /// The route epoch, for the task that bumps it from now on.
    TakeRouteEpoch(Reply<RouteEpoch>),
    /// A health check's result.
    OriginChecked(crate::lb::health::CheckResult),
    /// `forwarder drain` / `enable`: (app id, origin, drained).
    SetDrained {
        app: String,
        origin: String,
        drained: bool,
        done: Reply<()>,
    },
    /// Answers at once: the agent thread is alive (the systemd watchdog).
    Ping(Reply<()>),
    /// Stop accepting TCP connections; let open ones finish for up to `drain`,
    /// then close the rest.
    DrainTcp { drain: Duration, done: Reply<()> },
    /// Detach, put the host back, and stop.
    Shutdown(Reply<()>),
}

/// How long a caller waits for an answer before giving up (the agent thread is
/// stuck or gone).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends commands to the agent thread. Cheap to clone.
#[derive(Clone)]
pub struct AgentHandle {
    tx: Sender<Command>,
}

impl AgentHandle {
    /// Sends a command built around a reply channel and waits for the answer.
    fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> anyhow::Result<T> {
        self.ask_within(ANSWER_TIMEOUT, command)
    }

    fn ask_within<T>(
        &self,
        timeout: Duration,
        command: impl FnOnce(Reply<T>) -> Command,
    ) -> anyhow::Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tx
            .send(command(tx))
            .map_err(|_| anyhow!("the agent has stopped"))?;
        rx.recv_timeout(timeout)
            .map_err(|_| anyhow!("the agent did not answer within {timeout:?}"))?
    }

    /// Sends a command nobody waits for; false when the agent has stopped.
    pub fn tell(&self, command: Command) -> bool {
        self.tx.send(command).is_ok()
    }

    /// Whether the agent thread answers (within the usual timeout).
    pub fn ping(&self) -> anyhow::Result<()> {
        self.ask(Command::Ping)
    }

    pub fn snapshot(&self) -> anyhow::Result<StatsSnapshot> {
        self.ask(Command::Snapshot)
    }

    pub fn read_flow_tables(&self) -> anyhow::Result<(FlowTables, EventLog)> {
        self.ask(Command::ReadFlowTables)
    }

    pub fn take_route_epoch(&self) -> anyhow::Result<RouteEpoch> {
        self.ask(Command::TakeRouteEpoch)
    }

    /// Drains (`drained`) or enables an origin of an app; waits for it.
    pub fn set_drained(&self, app: &str, origin: &str, drained: bool) -> anyhow::Result<()> {
        self.ask(|done| Command::SetDrained {
            app: app.to_string(),
            origin: origin.to_string(),
            drained,
            done,
        })
    }

    /// Reloads from `path` and waits for the outcome.
    pub fn reload(&self, path: &std::path::Path, why: &'static str) -> anyhow::Result<()> {
        self.ask(|done| Command::Reload {
            path: path.to_path_buf(),
            why,
            done: Some(done),
        })
    }

    /// Drains the TCP connections; waits for it.
    pub fn drain_tcp(&self, drain: Duration) -> anyhow::Result<()> {
        self.ask_within(drain + ANSWER_TIMEOUT, |done| Command::DrainTcp {
            drain,
            done,
        })
    }

    /// Detaches and restores the host; waits for it. The agent thread ends.
    pub fn shutdown(&self) -> anyhow::Result<()> {
        self.ask(Command::Shutdown)
    }
}

/// Starts the agent thread owning `agent`. `runtime` is the async runtime the TCP
/// proxy's tasks run on (entered by the thread, so a reload can start listeners).
pub fn spawn(
    agent: Agent,
    runtime: tokio::runtime::Handle,
    notifier: Option<std::sync::Arc<super::notify::Notifier>>,
) -> anyhow::Result<(AgentHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let mut agent = agent;
    {
        let _runtime = runtime.enter();
        agent.start_health_checks(super::origins::report_to(tx.clone()));
    }
    let thread = std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || serve(agent, &rx, &runtime, notifier.as_deref()))
        .context("starting the agent thread")?;
    Ok((AgentHandle { tx }, thread))
}

/// The agent thread: one command at a time until `Shutdown` (or until every
/// handle is gone, which shuts down without draining).
fn serve(
    mut agent: Agent,
    rx: &Receiver<Command>,
    runtime: &tokio::runtime::Handle,
    notifier: Option<&super::notify::Notifier>,
) {
    let done = loop {
        let Ok(command) = rx.recv() else {
            break None;
        };
        match command {
            Command::Snapshot(reply) => {
                let _ = reply.send(agent.snapshot());
            }
            Command::Reload { path, why, done } => {
                // A reload may open listeners, whose tasks run on the runtime.
                let _runtime = runtime.enter();
                info!("{why}: reloading {}", path.display());
                if let Some(n) = notifier {
                    n.reloading();
                }
                let result = super::load_config(&path).and_then(|c| agent.reload(c));
                agent.record_reload(result.is_ok());
                match &result {
                    Ok(()) => info!("reload applied"),
                    Err(err) => error!("reload rejected, the running config stays: {err:#}"),
                }
                if let Some(n) = notifier {
                    let status = match &result {
                        Ok(()) => "serving; last reload applied".to_string(),
                        Err(err) => {
                            let text = format!("{err:#}");
                            let first = text.lines().next().unwrap_or("").to_string();
                            format!("serving the previous config; reload rejected: {first}")
                        }
                    };
                    n.send(&format!("READY=1\nSTATUS={status}"));
                }
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
            Command::ReopenEventLog => {
                if let Err(err) = agent.events().reopen() {
                    error!("reopening the event log failed: {err:#}");
                }
            }
            Command::SummariseFiltered => {
                if let Err(err) = agent.summarise_filtered() {
                    error!("summarising firewall drops failed: {err:#}");
                }
            }
            Command::ReadFlowTables(reply) => {
                let tables = agent.read_flow_tables();
                let _ = reply.send(tables.map(|t| (t, agent.events().clone())));
            }
            Command::EndUdpFlows(flows) => agent.end_udp_flows(&flows),
            Command::SetUdpFlowStats(stats) => agent.set_udp_flow_stats(stats),
            Command::OriginChecked(result) => {
                let _runtime = runtime.enter();
                if let Err(err) = agent.origin_checked(result) {
                    error!("applying a health check result failed: {err:#}");
                }
            }
            Command::SetDrained {
                app,
                origin,
                drained,
                done,
            } => {
                let _ = done.send(agent.set_drained(&app, &origin, drained));
            }
            Command::Ping(reply) => {
                let _ = reply.send(Ok(()));
            }
            Command::TakeRouteEpoch(reply) => {
                let _ = reply.send(agent.take_route_epoch());
            }
            Command::DrainTcp { drain, done } => {
                runtime.block_on(agent.drain_tcp(drain));
                let _ = done.send(Ok(()));
            }
            Command::Shutdown(done) => break Some(done),
        }
    };
    let result = agent.shutdown();
    match done {
        Some(done) => {
            let _ = done.send(result);
        }
        None => {
            if let Err(err) = result {
                error!("shutting down: {err:#}");
            }
        }
    }
}
