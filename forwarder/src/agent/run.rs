//! `forwarder run`: load the config, fill and attach the datapath, serve until
//! SIGINT/SIGTERM, then detach everything. The async side here only waits for
//! signals and timers and sends the agent thread commands (`task`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use log::{error, info, warn};
use tokio::signal::unix::{SignalKind, signal};

use super::{Agent, AgentHandle, Command, load_config, task};
use crate::host::HostState;
use crate::reload::ConfigWatch;
use crate::telemetry::analytics::FILTERED_SUMMARY_INTERVAL;
use crate::telemetry::control::{ControlSocket, SnapshotFn};
use crate::telemetry::metrics::MetricsServer;

/// Options of `forwarder run` besides the config.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    pub drain: Duration,
    pub control: PathBuf,
    /// Where the single-instance lock and the journal of host changes live.
    pub state_dir: PathBuf,
}

pub fn run_cli(options: RunOptions) -> anyhow::Result<ExitCode> {
    match crate::fd_limit::raise_to_hard() {
        Ok((old, new)) if new > old => info!("open-file limit raised from {old} to {new}"),
        Ok((_, limit)) => info!("open-file limit {limit}"),
        Err(err) => warn!("could not raise the open-file limit: {err}"),
    }
    // One worker per CPU the agent may run on (its affinity). An agent pinned to
    // one CPU runs everything on one thread (tokio's current-thread scheduler): no
    // second thread to wake, no work-stealing bookkeeping per task (docs/tcp.md,
    // "Runtime").
    // `FORWARDER_RUNTIME=multi-thread` keeps the work-stealing scheduler on one CPU
    // too (for comparisons; docs/tcp.md, "Runtime").
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    let multi_on_one = std::env::var("FORWARDER_RUNTIME").is_ok_and(|v| v == "multi-thread");
    let mut builder = if workers == 1 && !multi_on_one {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    info!(
        "async runtime: {workers} worker thread(s), {}",
        if workers == 1 && !multi_on_one {
            "current-thread scheduler"
        } else {
            "multi-thread scheduler"
        }
    );
    runtime.block_on(run(options))?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `f` (a blocking call on the agent's handle) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("a blocking call failed: {e}"))?
}

async fn run(options: RunOptions) -> anyhow::Result<()> {
    // Handlers first: a signal that arrives while the agent starts waits for the
    // loop below instead of killing the process (SIGHUP's and SIGUSR1's default
    // action) once the control socket already answers.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigusr1 = signal(SignalKind::user_defined1())?;
    // Before anything on the host is touched: one agent per state directory, and
    // what a dead one left behind put back.
    let host = HostState::acquire(&options.state_dir, Some(&options.control))?;
    let config = load_config(&options.config)?;
    let metrics_listen = config.agent.metrics_listen;
    let mut watch = ConfigWatch::new(&options.config);
    let notifier = super::notify::Notifier::from_env().map(Arc::new);
    let apps = config.apps.len();
    let (agent, agent_thread) = task::spawn(
        Agent::start(config, host)?,
        tokio::runtime::Handle::current(),
        notifier.clone(),
    )?;
    let snapshot: SnapshotFn = {
        let agent = agent.clone();
        Arc::new(move || agent.snapshot())
    };
    let handlers = crate::telemetry::control::Handlers {
        snapshot: snapshot.clone(),
        set_drained: {
            let agent = agent.clone();
            Arc::new(move |app, origin, drained| agent.set_drained(app, origin, drained))
        },
    };
    let control = ControlSocket::bind(&options.control, handlers)?;
    info!("control socket at {}", options.control.display());
    // `/ready`: the datapath is attached and its maps and listeners are up from
    // here on, until the shutdown begins.
    let ready = Arc::new(AtomicBool::new(true));
    let _metrics = match metrics_listen {
        Some(addr) => Some(MetricsServer::bind_ready(addr, snapshot, ready.clone()).await?),
        None => None,
    };

    let route_epoch = {
        let agent = agent.clone();
        blocking(move || agent.take_route_epoch()).await?
    };
    let route_follower = tokio::spawn(crate::route::follow_route_changes(route_epoch));

    let stop_scans = Arc::new(AtomicBool::new(false));
    let flow_scanner = {
        let agent = agent.clone();
        let stop = stop_scans.clone();
        std::thread::Builder::new()
            .name("udp-flow-scan".into())
            .spawn(move || super::flow_scan::run(&agent, &stop))
            .context("starting the UDP flow scanner")?
    };

    let reload = |agent: &AgentHandle, why: &'static str| {
        agent.tell(Command::Reload {
            path: options.config.clone(),
            why,
            done: None,
        });
    };
    if let Some(n) = &notifier {
        n.send(&format!("READY=1\nSTATUS=serving {apps} apps"));
    }
    // Under systemd's watchdog: a ping the agent thread must answer, at half the
    // watchdog's interval; a stuck agent thread then gets the service restarted.
    let watchdog = super::notify::watchdog_interval().filter(|_| notifier.is_some());
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut watch_tick = tokio::time::interval(crate::reload::WATCH_INTERVAL);
    let mut filtered_tick = tokio::time::interval(FILTERED_SUMMARY_INTERVAL);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                watch.mark_current();
                reload(&agent, "SIGHUP");
            }
            // logrotate's postrotate: the event log is reopened, the config is not
            // touched.
            _ = sigusr1.recv() => {
                info!("SIGUSR1: reopening the event log");
                agent.tell(Command::ReopenEventLog);
            }
            _ = watch_tick.tick() => {
                if watch.changed() {
                    reload(&agent, "config file changed");
                }
            }
            _ = filtered_tick.tick() => {
                agent.tell(Command::SummariseFiltered);
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                let pinged = {
                    let agent = agent.clone();
                    blocking(move || agent.ping()).await
                };
                match (pinged, &notifier) {
                    (Ok(()), Some(n)) => n.send("WATCHDOG=1"),
                    (Err(err), _) => error!("the agent thread did not answer the watchdog: {err:#}"),
                    _ => {}
                }
            }
        }
    }
    info!("shutting down");
    ready.store(false, Ordering::SeqCst);
    if let Some(n) = &notifier {
        n.send("STOPPING=1\nSTATUS=draining and detaching");
    }
    stop_scans.store(true, Ordering::SeqCst);
    let scanner_done = blocking(move || {
        flow_scanner
            .join()
            .map_err(|_| anyhow!("the UDP flow scanner panicked"))
    })
    .await;
    if let Err(err) = scanner_done {
        error!("{err:#}");
    }
    route_follower.abort();
    let drain = options.drain;
    {
        let agent = agent.clone();
        blocking(move || agent.drain_tcp(drain)).await?;
    }
    drop(control);
    blocking(move || agent.shutdown()).await?;
    let joined = blocking(move || {
        agent_thread
            .join()
            .map_err(|_| anyhow!("the agent thread panicked"))
    })
    .await;
    if let Err(err) = joined {
        error!("{err:#}");
    }
    info!("detached; bye");
    Ok(())
}

/// Parses `--drain` and other command-line durations ("10s", "500ms", "2m").
pub fn parse_duration_arg(text: &str) -> anyhow::Result<Duration> {
    crate::config::parse_duration(text).map_err(|e| anyhow!("bad duration {text:?}: {e}"))
}
