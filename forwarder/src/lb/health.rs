//! Active health checks of origins (`[apps.health_check]`).
//!
//! One task per checked origin runs a check every `interval`: for a TCP app a
//! connect (Spectrum's kind; a PROXY app's origin then gets a PROXY v1 `UNKNOWN`
//! or v2 `LOCAL` header, the forms those protocols define for health checks, so
//! it logs no broken header); for a UDP app a probe datagram and its expected
//! reply (an SPP app's probe carries an SPP header naming the probe's own socket,
//! and the reply's header is stripped before it is compared; a v2 app's carries a
//! v2 `LOCAL` header). Results go to the agent thread, which owns the verdicts
//! ([`Verdicts`]): `fall` failures in a row take an origin out, `rise` successes
//! bring it back.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt as _;
use tokio::net::UdpSocket;

use super::OriginRef;
use crate::config::{App, Config, HealthCheck, PortRange, Protocol, ProxyProtocol, UdpProbe};
use crate::tcp::origin::connect_error_status;
use crate::telemetry::analytics::Histogram;
use crate::telemetry::events::status;
use crate::wire::{proxy_v1, proxy_v2, spp};

/// Upper bounds (seconds) of `forwarder_origin_health_check_duration_seconds`.
pub const CHECK_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
];

/// The outcome of one check.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub origin: OriginRef,
    /// Which run of checks this came from (a result of a stopped one is ignored).
    pub run: u64,
    /// `None`: passed; else the Spectrum status of the failure (521 refused,
    /// 522 timeout, 523 unreachable, 520 wrong reply or other error).
    pub failure: Option<u16>,
    pub took: Duration,
}

/// Where results go (the agent thread).
pub type Report = Arc<dyn Fn(CheckResult) + Send + Sync>;

/// What one origin's check does.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CheckSpec {
    check: HealthCheck,
    target: SocketAddr,
    proxy: ProxyProtocol,
    protocol: Protocol,
    /// UDP ports a probe socket must not use: the edge ports of UDP apps and
    /// `udp_nat_ports` (replies to those are taken by the datapath).
    avoid: Arc<Vec<PortRange>>,
}

/// The running check tasks, one per checked origin.
#[derive(Default)]
pub struct Checks {
    running: BTreeMap<OriginRef, (CheckSpec, u64, tokio::task::AbortHandle)>,
    next_run: u64,
}

impl Checks {
    /// Starts, restarts or stops tasks so that exactly the origins `config`
    /// checks are checked as it says. Must run inside the tokio runtime.
    pub fn apply(&mut self, config: &Config, report: &Report) {
        let avoid = Arc::new(avoid_ports(config));
        let mut wanted: BTreeMap<OriginRef, CheckSpec> = BTreeMap::new();
        for app in &config.apps {
            let Some(check) = &app.health_check else {
                continue;
            };
            for origin in &app.origins {
                wanted.insert(
                    (app.id.clone(), origin.label()),
                    CheckSpec {
                        check: check.clone(),
                        target: SocketAddr::new(origin.addr, origin.ports.low),
                        proxy: app.proxy_protocol,
                        protocol: app.protocol,
                        avoid: avoid.clone(),
                    },
                );
            }
        }
        self.running.retain(|key, (spec, _, task)| {
            let keep = wanted.get(key) == Some(spec);
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, spec) in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            self.next_run += 1;
            let run = self.next_run;
            let task = tokio::spawn(check_loop(key.clone(), run, spec.clone(), report.clone()))
                .abort_handle();
            self.running.insert(key, (spec, run, task));
        }
    }

    /// Whether `result` comes from a check that is still running as configured.
    pub fn is_current(&self, result: &CheckResult) -> bool {
        self.running
            .get(&result.origin)
            .is_some_and(|(_, run, _)| *run == result.run)
    }

    /// Stops every check.
    pub fn stop(&mut self) {
        for (_, (_, _, task)) in std::mem::take(&mut self.running) {
            task.abort();
        }
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The UDP ports the datapath answers for on the way back (see `Checks::apply`).
fn avoid_ports(config: &Config) -> Vec<PortRange> {
    let mut ports = vec![config.agent.udp_nat_ports];
    ports.extend(
        config
            .apps
            .iter()
            .filter(|a| a.protocol == Protocol::Udp)
            .map(|a| a.ports),
    );
    ports
}

async fn check_loop(origin: OriginRef, run: u64, spec: CheckSpec, report: Report) {
    let mut ticker = tokio::time::interval(spec.check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe_socket: Option<UdpSocket> = None;
    loop {
        ticker.tick().await;
        let started = Instant::now();
        let outcome = tokio::time::timeout(spec.check.timeout, async {
            match (&spec.protocol, &spec.check.probe) {
                (Protocol::Udp, Some(probe)) => {
                    udp_check(&spec, probe, &mut probe_socket, &spec.avoid).await
                }
                _ => tcp_check(&spec).await,
            }
        })
        .await;
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(code)) => Some(code),
            Err(_) => Some(status::ORIGIN_CONNECT_TIMEOUT),
        };
        if failure.is_some() {
            // A fresh socket next time (a refused port may have left an error).
            probe_socket = None;
        }
        report(CheckResult {
            origin: origin.clone(),
            run,
            failure,
            took: started.elapsed(),
        });
    }
}

/// A TCP connect; a PROXY app's origin then gets the header for health checks.
async fn tcp_check(spec: &CheckSpec) -> Result<(), u16> {
    let mut stream = crate::tcp::origin::connect(spec.target, spec.check.timeout)
        .await
        .map_err(|(code, _)| code)?;
    let header = match spec.proxy {
        ProxyProtocol::V1 => Some(proxy_v1::Repr::Unknown.emit_to_vec()),
        ProxyProtocol::V2 => proxy_v2::Repr::local().emit_to_vec().ok(),
        _ => None,
    };
    if let Some(header) = header {
        stream
            .write_all(&header)
            .await
            .map_err(|_| status::ORIGIN_IO_ERROR)?;
    }
    let _ = stream.shutdown().await;
    Ok(())
}

/// A probe datagram and its reply.
async fn udp_check(
    spec: &CheckSpec,
    probe: &UdpProbe,
    socket: &mut Option<UdpSocket>,
    avoid: &[PortRange],
) -> Result<(), u16> {
    if socket.is_none() {
        *socket = Some(
            probe_socket(spec.target, avoid)
                .await
                .map_err(|e| connect_error_status(&e))?,
        );
    }
    let Some(sock) = socket.as_ref() else {
        return Err(status::ORIGIN_UNKNOWN_ERROR);
    };
    let local = sock.local_addr().map_err(|e| connect_error_status(&e))?;
    let mut datagram = match spec.proxy {
        ProxyProtocol::Simple => spp::Repr {
            client: local,
            proxy: local,
        }
        .emit_to_vec(),
        ProxyProtocol::V2 => proxy_v2::Repr::local().emit_to_vec().unwrap_or_default(),
        _ => Vec::new(),
    };
    datagram.extend_from_slice(&probe.send);
    sock.send(&datagram)
        .await
        .map_err(|e| connect_error_status(&e))?;
    let mut buf = vec![0u8; 65_536];
    let n = sock
        .recv(&mut buf)
        .await
        .map_err(|e| connect_error_status(&e))?;
    let reply = &buf[..n];
    let payload = match spec.proxy {
        ProxyProtocol::Simple => match spp::Header::new_checked(reply) {
            Ok(header) if spp::Repr::parse(&header).is_ok() => header.payload(),
            _ => return Err(status::ORIGIN_UNKNOWN_ERROR),
        },
        _ => reply,
    };
    if payload.starts_with(&probe.expect) {
        Ok(())
    } else {
        Err(status::ORIGIN_UNKNOWN_ERROR)
    }
}

/// A UDP socket connected to `target`, on a port the datapath leaves to the host
/// (the kernel picks; a pick among `avoid` is tried again).
async fn probe_socket(target: SocketAddr, avoid: &[PortRange]) -> io::Result<UdpSocket> {
    let any = match target.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    for _ in 0..64 {
        let socket = UdpSocket::bind(SocketAddr::new(any, 0)).await?;
        let port = socket.local_addr()?.port();
        if avoid.iter().any(|r| r.contains(port)) {
            continue;
        }
        socket.connect(target).await?;
        return Ok(socket);
    }
    Err(io::Error::other(
        "no ephemeral UDP port outside the edge ports and udp_nat_ports",
    ))
}

/// One origin's verdict and check figures.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub up: bool,
    /// Consecutive results that disagree with `up`.
    pub streak: u32,
    /// Status of the last failed check (0: the last check passed or none ran).
    pub last_failure: u16,
    pub checks: u64,
    pub durations: Histogram,
}

impl Default for Verdict {
    fn default() -> Self {
        Verdict {
            // Up until proven otherwise: a start or reload never begins with
            // every origin out.
            up: true,
            streak: 0,
            last_failure: 0,
            checks: 0,
            durations: Histogram::new(&CHECK_BUCKETS),
        }
    }
}

/// What a result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    WentDown,
    CameUp,
}

/// The verdicts of every checked origin, owned by the agent thread.
#[derive(Debug, Default)]
pub struct Verdicts {
    verdicts: BTreeMap<OriginRef, Verdict>,
}

impl Verdicts {
    /// Counts `result` under `check`'s rise and fall; says if the origin changed.
    pub fn record(&mut self, result: &CheckResult, check: &HealthCheck) -> Option<Transition> {
        let v = self.verdicts.entry(result.origin.clone()).or_default();
        v.checks += 1;
        v.durations.observe(result.took.as_secs_f64());
        let passed = result.failure.is_none();
        if let Some(code) = result.failure {
            v.last_failure = code;
        }
        if passed == v.up {
            v.streak = 0;
            return None;
        }
        v.streak += 1;
        let needed = if v.up { check.fall } else { check.rise };
        if v.streak < needed {
            return None;
        }
        v.up = passed;
        v.streak = 0;
        if passed {
            v.last_failure = 0;
        }
        Some(if passed {
            Transition::CameUp
        } else {
            Transition::WentDown
        })
    }

    pub fn get(&self, origin: &OriginRef) -> Option<&Verdict> {
        self.verdicts.get(origin)
    }

    /// Forgets origins `config` no longer checks (a removed origin or check).
    pub fn retain_checked(&mut self, config: &Config) {
        self.verdicts.retain(|(app, origin), _| {
            config.apps.iter().any(|a: &App| {
                a.id == *app
                    && a.health_check.is_some()
                    && a.origins.iter().any(|o| o.label() == *origin)
            })
        });
    }

    /// The origins that are down.
    pub fn down(&self) -> impl Iterator<Item = &OriginRef> {
        self.verdicts
            .iter()
            .filter(|(_, v)| !v.up)
            .map(|(origin, _)| origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rise: u32, fall: u32) -> HealthCheck {
        HealthCheck {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise,
            fall,
            probe: None,
        }
    }

    fn result(ok: bool) -> CheckResult {
        CheckResult {
            origin: ("a".into(), "10.0.0.1:22".into()),
            run: 1,
            failure: (!ok).then_some(status::ORIGIN_REFUSED),
            took: Duration::from_millis(1),
        }
    }

    #[test]
    fn fall_failures_take_an_origin_out_and_rise_successes_bring_it_back() {
        let c = check(2, 3);
        let mut v = Verdicts::default();
        assert_eq!(v.record(&result(false), &c), None);
        assert_eq!(v.record(&result(false), &c), None);
        assert_eq!(
            v.record(&result(true), &c),
            None,
            "a pass resets the streak"
        );
        assert_eq!(v.record(&result(false), &c), None);
        assert_eq!(v.record(&result(false), &c), None);
        assert_eq!(v.record(&result(false), &c), Some(Transition::WentDown));
        let key = ("a".to_string(), "10.0.0.1:22".to_string());
        assert_eq!(v.get(&key).map(|v| v.last_failure), Some(521));
        assert_eq!(v.down().count(), 1);
        assert_eq!(v.record(&result(true), &c), None);
        assert_eq!(v.record(&result(true), &c), Some(Transition::CameUp));
        assert_eq!(v.down().count(), 0);
        assert_eq!(v.get(&key).map(|v| v.checks), Some(8));
    }
}
