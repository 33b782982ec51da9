//! Scenario `tls`: Edge TLS termination, the forwarder (`tls = "flexible"`,
//! rustls with ring) against HAProxy (`bind … ssl crt`, OpenSSL), the same ECDSA
//! P-256 certificate, TLS 1.3 with TLS_AES_256_GCM_SHA384 and X25519 for both
//! (the clients ask for exactly that).
//!
//! * full handshakes per second: parallel `openssl s_time -new` clients (no
//!   session resumption), each connection a complete handshake, then close;
//! * bulk throughput: `curl` downloading from a plain HTTP origin through the
//!   proxy (origin → client, encrypted by the proxy).
//!
//! Same topology and pinning as the TCP scenarios (`tcp.rs`): the proxies and the
//! edge's NAPI threads on the edge CPU; clients, origin and their NAPI threads on
//! the generator CPU.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use forwarder::tls::test_pki::TestPki;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::sys::{self, TempDir};
use super::tcp::{
    Proxies, proxy_lab, start_haproxy, start_origin_server, start_pinned_agent, with_process_cpu,
};
use super::{Metric, Options, Scenario, Target, Variant};
use forwarder_tests::{EDGE_CLIENT_V4, Lab, NsTask, ORIGIN_V4};

/// The origin's HTTP server (plain), and the ports in front of it.
const ORIGIN_PORT: u16 = 8080;
const FORWARDER_PORT: u16 = 8443;
const HAPROXY_PORT: u16 = 18443;
/// The name in the edge certificate.
const NAME: &str = "bench.example";
/// Parallel `s_time` clients (enough to keep the edge CPU busy between a client's
/// own handshakes).
const HANDSHAKE_CLIENTS: usize = 4;
/// The proxy-bound handshake run: each proxy gets the same share of one CPU
/// (`sys::CpuBudget::proxy`), and enough parallel clients that the clients,
/// with the whole generator CPU, can go faster than either proxy. Without it the
/// four clients above set the rate (they spend about as much CPU per handshake as
/// a proxy) and both proxies idle part of the time.
const BUDGET_CLIENTS: usize = 12;
/// The one cipher suite both proxies are asked for.
const SUITE: &str = "TLS_AES_256_GCM_SHA384";

struct TlsLab {
    lab: Lab,
    proxies: Proxies,
    _origin: NsTask<()>,
    /// Keeps the certificates until the lab goes.
    _pki: TestPki,
    ca: String,
    _dir: TempDir,
}

/// The origin: reads an HTTP request head, answers `200` with as many bytes as the
/// path says (`GET /N`), closes.
fn start_origin(lab: &Lab, cpu: usize) -> Result<NsTask<()>> {
    start_origin_server(lab, ORIGIN_PORT, cpu, |mut s| async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&head);
        let len: u64 = text
            .split_whitespace()
            .nth(1)
            .and_then(|path| path.trim_start_matches('/').parse().ok())
            .unwrap_or(0);
        let header =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
        if s.write_all(header.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![0x5au8; 256 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if s.write_all(&chunk[..n]).await.is_err() {
                return;
            }
            left -= n as u64;
        }
        let _ = s.shutdown().await;
    })
}

impl TlsLab {
    fn new(opts: &Options) -> Result<TlsLab> {
        let lab = proxy_lab(opts, forwarder_tests::Links::Direct)?;
        let dir = TempDir::new("tls")?;
        let origin = start_origin(&lab, opts.gen_cpu)?;
        let pki = TestPki::new("bench");
        let ca = pki.ca("ca");
        let edge = pki.leaf("edge", &[NAME], Some(&ca));
        let [ec, eo] = lab.edge_ifaces();
        let config = format!(
            "[agent]\ninterfaces = [\"{ec}\", \"{eo}\"]\npass = [\"tcp/{HAPROXY_PORT}\"]\n\n\
             [[apps]]\nid = \"tls\"\nprotocol = \"tcp/{FORWARDER_PORT}\"\n\
             origin_direct = [\"tcp://{ORIGIN_V4}:{ORIGIN_PORT}\"]\ntls = \"flexible\"\n\
             tls_certificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
            edge.cert.display(),
            edge.key.display()
        );
        let agent = start_pinned_agent(&lab, &config, opts)?;
        // HAProxy wants the chain and the key in one file.
        let combined = dir.path().join("edge-combined.pem");
        let mut pem = std::fs::read(&edge.cert)?;
        pem.extend(std::fs::read(&edge.key)?);
        std::fs::write(&combined, pem)?;
        let haproxy_config = format!(
            "global\n    maxconn 4000\n    nbthread 1\n    \
             ssl-default-bind-ciphersuites {SUITE}\n\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    \
             timeout client 60s\n    timeout server 60s\n\n\
             listen tls\n    bind {EDGE_CLIENT_V4}:{HAPROXY_PORT} ssl crt {}\n    \
             server origin {ORIGIN_V4}:{ORIGIN_PORT}\n",
            combined.display()
        );
        let haproxy = start_haproxy(
            &lab,
            dir.path(),
            opts.edge_cpu,
            &haproxy_config,
            HAPROXY_PORT,
        )
        .map_err(|e| format!("{e:#}"));
        let mut tl = TlsLab {
            lab,
            proxies: Proxies {
                agent: Some(agent),
                haproxy,
                forwarder: Ok(()),
                floor: Err("not in this scenario".into()),
            },
            _origin: origin,
            ca: ca.cert.display().to_string(),
            _pki: pki,
            _dir: dir,
        };
        if tl.proxies.haproxy.is_ok()
            && let Err(e) = tl.download(HAPROXY_PORT, 1000, 0)
        {
            tl.proxies.haproxy = Err(format!("HAProxy does not relay: {e:#}"));
        }
        tl.proxies.forwarder = tl
            .download(FORWARDER_PORT, 1000, 0)
            .map(|_| ())
            .map_err(|e| format!("the forwarder does not terminate and relay: {e:#}"));
        Ok(tl)
    }

    fn port(&self, variant: &str) -> Result<u16> {
        match variant {
            "forwarder" => {
                if let Err(e) = &self.proxies.forwarder {
                    bail!("{e}");
                }
                Ok(FORWARDER_PORT)
            }
            "haproxy" => Ok(HAPROXY_PORT),
            other => bail!("unknown variant {other}"),
        }
    }

    /// `program args…` in `client`, pinned to `cpu` at the highest priority, killed
    /// after 60 s.
    fn pinned_client(&self, cpu: usize, program: &str, args: &[&str]) -> std::process::Command {
        let cpu = cpu.to_string();
        let mut all = vec!["60", "nice", "-n", "-20", "taskset", "-c", &cpu, program];
        all.extend_from_slice(args);
        self.lab.client().cmd("timeout", &all)
    }

    /// `curl` downloads `bytes` through the proxy on `port`; bytes per second.
    fn download(&self, port: u16, bytes: u64, cpu: usize) -> Result<f64> {
        let resolve = format!("{NAME}:{port}:{EDGE_CLIENT_V4}");
        let url = format!("https://{NAME}:{port}/{bytes}");
        let mut cmd = self.pinned_client(
            cpu,
            "curl",
            &[
                "-sS",
                "--fail",
                "--http1.1",
                "--tlsv1.3",
                "--tls13-ciphers",
                SUITE,
                "--cacert",
                &self.ca,
                "--resolve",
                &resolve,
                "-o",
                "/dev/null",
                "-w",
                "%{size_download} %{speed_download}",
                &url,
            ],
        );
        let out = forwarder_tests::OutputOk::output_ok(&mut cmd).context("curl")?;
        let mut words = out.split_whitespace();
        let size: f64 = words.next().context("curl size")?.parse()?;
        let speed: f64 = words.next().context("curl speed")?.parse()?;
        if size as u64 != bytes {
            bail!("curl got {size} bytes of {bytes}");
        }
        Ok(speed)
    }

    /// `clients` parallel `openssl s_time -new` for `secs` seconds;
    /// (completed handshakes, wall time).
    fn handshakes(
        &self,
        port: u16,
        secs: u64,
        cpu: usize,
        clients: usize,
    ) -> Result<(u64, Duration)> {
        let connect = format!("{EDGE_CLIENT_V4}:{port}");
        let secs = secs.to_string();
        let args = [
            "s_time",
            "-connect",
            &connect,
            "-new",
            "-time",
            &secs,
            "-ciphersuites",
            SUITE,
            "-CAfile",
            &self.ca,
        ];
        let started = Instant::now();
        let children: Vec<std::process::Child> = (0..clients)
            .map(|_| {
                self.pinned_client(cpu, "openssl", &args)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .context("openssl s_time")
            })
            .collect::<Result<_>>()?;
        let mut total = 0u64;
        for child in children {
            let out = child.wait_with_output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            // "N connections in T real seconds, …" (the -new pass).
            let n: u64 = text
                .lines()
                .find(|l| l.contains("connections in") && l.contains("real seconds"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("no count in s_time's output:\n{text}"))?;
            total += n;
        }
        Ok((total, started.elapsed()))
    }
}

/// Scenario `tls`.
#[derive(Default)]
pub struct TlsTermination {
    tl: Option<TlsLab>,
    /// Per variant: the share of one CPU the proxy process used during its last
    /// budget run (near `sys::PROXY_CPU_SHARE` when the proxy, not the clients, was the
    /// limit).
    budget_used: Vec<(String, f64)>,
    /// Why no budget could be set, if so.
    budget_error: Option<String>,
}

impl TlsTermination {
    fn handshake_secs(opts: &Options) -> u64 {
        opts.duration(Duration::from_secs(3), Duration::from_secs(1))
            .as_secs()
            .max(1)
    }

    fn bulk_bytes(opts: &Options) -> u64 {
        let base: f64 = if opts.quick { 32.0 } else { 512.0 };
        (base * opts.time_scale * 1024.0 * 1024.0) as u64
    }
}

impl Scenario for TlsTermination {
    fn name(&self) -> &'static str {
        "tls"
    }

    fn title(&self) -> &'static str {
        "Edge TLS termination (flexible): full handshakes/s, bulk download throughput"
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric {
                name: "handshakes",
                unit: "handshakes/s",
                higher_is_better: true,
            },
            Metric {
                name: "handshake_cpu",
                unit: "µs CPU/handshake",
                higher_is_better: false,
            },
            Metric {
                name: "handshakes_budget",
                unit: "handshakes/s, proxy on 15 % of a CPU",
                higher_is_better: true,
            },
            Metric {
                name: "throughput",
                unit: "Gbit/s",
                higher_is_better: true,
            },
            Metric {
                name: "bulk_cpu",
                unit: "µs CPU/MB",
                higher_is_better: false,
            },
        ]
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant {
                name: "forwarder",
                label: "forwarder tls = flexible (rustls, ring)",
            },
            Variant {
                name: "haproxy",
                label: "HAProxy bind ssl (OpenSSL), mode tcp",
            },
        ]
    }

    fn baseline(&self) -> &'static str {
        "haproxy"
    }

    fn targets(&self) -> Vec<Target> {
        vec![
            Target {
                text: "full TLS handshakes/s ≥ 1.0× HAProxy (proxy-bound: each proxy on the \
                       same 15 % of a CPU)",
                variant: "forwarder",
                vs: Some("haproxy"),
                metric: "handshakes_budget",
                bound: 1.0,
                at_least: true,
            },
            Target {
                text: "TLS bulk throughput (flexible) ≥ 1.0× HAProxy",
                variant: "forwarder",
                vs: Some("haproxy"),
                metric: "throughput",
                bound: 1.0,
                at_least: true,
            },
        ]
    }

    fn prepare(&mut self, opts: &Options) -> Result<()> {
        for tool in ["openssl", "curl"] {
            if !sys::have(tool) {
                bail!("{tool} not installed");
            }
        }
        self.tl = Some(TlsLab::new(opts)?);
        Ok(())
    }

    fn unavailable(&mut self, variant: &str, _opts: &Options) -> Option<String> {
        self.tl.as_ref()?.proxies.unavailable(variant)
    }

    fn measure(&mut self, variant: &str, _round: usize, opts: &Options) -> Result<Vec<f64>> {
        let tl = self.tl.as_ref().context("no lab")?;
        let port = tl.port(variant)?;
        let pid = tl.proxies.pid(variant);
        let secs = TlsTermination::handshake_secs(opts);
        let ((handshakes, elapsed), hs_cpu) = with_process_cpu(pid, || {
            tl.handshakes(port, secs, opts.gen_cpu, HANDSHAKE_CLIENTS)
        })?;
        if handshakes == 0 {
            bail!("no handshake completed");
        }
        // No cgroup cpu controller here: the budget figure is missing (n/a in the
        // report, the reason in its notes), the others are still measured.
        let budget = pid
            .context("no pid for the proxy")
            .and_then(|pid| Ok((pid, sys::CpuBudget::proxy(variant, pid)?)));
        let budget_rate = match budget {
            Err(e) => {
                self.budget_error = Some(format!("{e:#}"));
                f64::NAN
            }
            // `_budget` holds the proxy in its cgroup until the arm ends.
            Ok((pid, _budget)) => {
                let ((n, elapsed), cpu) = with_process_cpu(Some(pid), || {
                    tl.handshakes(port, secs, opts.gen_cpu, BUDGET_CLIENTS)
                })?;
                if n == 0 {
                    bail!("no handshake completed on the CPU budget");
                }
                let used = cpu.unwrap_or(f64::NAN) / elapsed.as_secs_f64();
                self.budget_used.retain(|(v, _)| v != variant);
                self.budget_used.push((variant.to_string(), used));
                n as f64 / elapsed.as_secs_f64()
            }
        };
        let bytes = TlsTermination::bulk_bytes(opts);
        let (speed, bulk_cpu) = with_process_cpu(pid, || tl.download(port, bytes, opts.gen_cpu))?;
        let megabytes = bytes as f64 / 1e6;
        Ok(vec![
            handshakes as f64 / elapsed.as_secs_f64(),
            hs_cpu.map_or(f64::NAN, |c| c * 1e6 / handshakes as f64),
            budget_rate,
            speed * 8.0 / 1e9,
            bulk_cpu.map_or(f64::NAN, |c| c * 1e6 / megabytes),
        ])
    }

    fn notes(&self, opts: &Options) -> Vec<String> {
        vec![
            format!(
                "Handshakes: {HANDSHAKE_CLIENTS} parallel `openssl s_time -new -time {}` \
                 (a full TLS 1.3 handshake per connection, {SUITE}, X25519, ECDSA P-256 \
                 certificate; no resumption), then close; the proxy connects to the origin \
                 for each. Rate = completed connections / wall time.",
                TlsTermination::handshake_secs(opts)
            ),
            format!(
                "Proxy-bound handshakes (the target's figure): the same run with \
                 {BUDGET_CLIENTS} clients while the proxy process (all its threads) is held \
                 to {:.0} % of one CPU by a cgroup CFS quota ({} ms period), the same for \
                 both proxies; the clients can then go faster than either proxy, so the rate \
                 is what the proxy's own CPU per handshake allows. Kernel TCP work in \
                 softirq is not charged to the quota.",
                sys::PROXY_CPU_SHARE * 100.0,
                sys::PROXY_CPU_PERIOD.as_millis()
            ),
            match &self.budget_error {
                Some(why) => format!("No CPU budget could be set, so no proxy-bound figure: {why}"),
                None => String::new(),
            },
            format!(
                "CPU the proxies used during their last budget run (process utime + stime \
                 over wall time): {}.",
                self.budget_used
                    .iter()
                    .map(|(v, used)| format!("{v} {:.0} % of a CPU", used * 100.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!(
                "Throughput: one `curl --http1.1 --tlsv1.3` download of {} MiB through the \
                 proxy from a plain HTTP origin (tokio, 256 KiB writes); curl's speed.",
                TlsTermination::bulk_bytes(opts) / (1024 * 1024)
            ),
            format!(
                "Pinned: the agent, HAProxy (nbthread 1) and the edge NAPI threads on CPU {}; \
                 openssl/curl clients, the origin and their NAPI threads on CPU {}. The \
                 clients spend as much CPU per handshake as the proxies, so the handshake \
                 rate can be client-bound: the CPU µs per handshake of each proxy is the \
                 figure to compare then.",
                opts.edge_cpu, opts.gen_cpu
            ),
        ]
        .into_iter()
        .filter(|note| !note.is_empty())
        .collect()
    }

    fn finish(&mut self) {
        if let Some(mut tl) = self.tl.take() {
            tl.proxies.stop();
        }
    }
}
