//! UDP origin servers for the lab: echo servers that understand what the forwarder
//! puts in front of datagrams (SPEC §5), record what they saw, and answer the way a
//! real origin behind Spectrum would. Used by the integration tests, the demo and
//! the benchmarks.
//!
//! * [`SppEchoOrigin`]: every datagram must start with a Simple Proxy Protocol
//!   header; the reply carries the same header, then the payload.
//! * [`ProxyV2EchoOrigin`]: the first datagram of a source may start with a PROXY v2
//!   header (command PROXY, DGRAM); it is recorded and stripped, later datagrams are
//!   plain. Replies are plain.
//! * [`UdpEchoOrigin`]: plain echo (proxy protocol `off`).
//!
//! With the tag on (the default), the reply payload is `"<client>|<payload>"`, where
//! `<client>` is the client address the origin learned (from the SPP header, from the
//! source's PROXY v2 header, or the datagram's source for plain echo), so a test can
//! assert on the client side what the origin saw. [`EchoOrigin::start_with`] with
//! `tag = false` echoes the payload alone (benchmarks).
//!
//! The server is one OS thread with a blocking socket created inside the namespace;
//! it stops (and the thread is joined) when the server is dropped.
//!
//! ```no_run
//! # fn f(lab: &forwarder_tests::Lab) -> anyhow::Result<()> {
//! use forwarder_tests::spp_origin::SppEchoOrigin;
//! let origin = SppEchoOrigin::start(lab.origin(), "10.0.2.2:5000".parse()?)?;
//! // ... the client sends "hi" from 10.0.1.2:40000 to the edge 10.0.1.1:5000 ...
//! let seen = origin.wait_for(1, std::time::Duration::from_secs(2));
//! assert_eq!(seen[0].spp.unwrap().client, "10.0.1.2:40000".parse()?);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use forwarder::wire::{proxy_v2, spp};

use crate::Netns;

/// How an [`EchoOrigin`] reads datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoMode {
    /// Plain UDP (proxy protocol `off`).
    Plain,
    /// Every datagram starts with an SPP header (proxy protocol `simple`).
    Spp,
    /// A datagram may start with a PROXY v2 header (proxy protocol `v2`).
    ProxyV2,
}

/// One datagram as the origin received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The datagram's source (the forwarder's address and port towards the origin).
    pub from: SocketAddr,
    /// The local address it arrived on.
    pub to: SocketAddr,
    /// `EchoMode::Spp`: the decoded header (`None`: no valid header, no reply sent).
    pub spp: Option<spp::Repr>,
    /// `EchoMode::ProxyV2`: the PROXY v2 header in front of *this* datagram.
    pub v2: Option<proxy_v2::Repr>,
    /// The datagram after any proxy header.
    pub payload: Vec<u8>,
}

impl Received {
    /// The client address the origin learned for this datagram (SPP header, PROXY v2
    /// header of this source, or the source itself).
    pub fn client(&self) -> Option<SocketAddr> {
        if let Some(spp) = &self.spp {
            return Some(spp.client);
        }
        self.v2
            .as_ref()
            .and_then(|v2| v2.addresses)
            .map(|(client, _)| client)
    }
}

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    /// Signalled on every new datagram.
    arrived: Condvar,
    /// `EchoMode::ProxyV2`: the first header per source (`None`: the first datagram
    /// of that source had none).
    first_v2: Mutex<HashMap<SocketAddr, Option<proxy_v2::Repr>>>,
    /// Datagrams that could not be parsed as the mode requires.
    invalid: Mutex<u64>,
}

/// A UDP echo server in a lab namespace; see the module docs.
pub struct EchoOrigin {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    mode: EchoMode,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoOrigin {
    /// Binds `bind` in `ns` and serves in `mode`, tagging replies with the client.
    pub fn start(ns: &Netns, bind: SocketAddr, mode: EchoMode) -> Result<EchoOrigin> {
        EchoOrigin::start_with(ns, bind, mode, true)
    }

    /// As [`EchoOrigin::start`]; `tag = false` echoes payloads without the
    /// `"<client>|"` prefix.
    pub fn start_with(
        ns: &Netns,
        bind: SocketAddr,
        mode: EchoMode,
        tag: bool,
    ) -> Result<EchoOrigin> {
        let socket = ns
            .run_in(move || UdpSocket::bind(bind))?
            .with_context(|| format!("binding the origin socket {bind} in {}", ns.name()))?;
        // Short timeouts let the thread notice `stop`.
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let local = socket.local_addr()?;
        let socket = Arc::new(socket);
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (socket, shared, stop) = (socket.clone(), shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("origin {local}"))
                .spawn(move || serve(&socket, local, mode, tag, &shared, &stop))
                .context("spawning the origin thread")?
        };
        Ok(EchoOrigin {
            socket,
            local,
            mode,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn mode(&self) -> EchoMode {
        self.mode
    }

    /// Every datagram received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    /// How many datagrams were received.
    pub fn count(&self) -> usize {
        lock(&self.shared.received).len()
    }

    /// Waits until at least `n` datagrams were received or `timeout` passed, and
    /// returns what was received.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut received = lock(&self.shared.received);
        while received.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            received = match self.shared.arrived.wait_timeout(received, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        received.clone()
    }

    /// `(client, proxy)` of every SPP datagram, in arrival order.
    pub fn spp_pairs(&self) -> Vec<(SocketAddr, SocketAddr)> {
        lock(&self.shared.received)
            .iter()
            .filter_map(|r| r.spp.map(|h| (h.client, h.proxy)))
            .collect()
    }

    /// `EchoMode::ProxyV2`: the header of the first datagram from `source`
    /// (`Some(None)`: that datagram had none; `None`: nothing from `source` yet).
    pub fn first_v2(&self, source: SocketAddr) -> Option<Option<proxy_v2::Repr>> {
        lock(&self.shared.first_v2).get(&source).cloned()
    }

    /// Datagrams dropped because they lacked the header the mode requires.
    pub fn invalid(&self) -> u64 {
        *lock(&self.shared.invalid)
    }

    /// Forgets what was received (counters and first headers included).
    pub fn clear(&self) {
        lock(&self.shared.received).clear();
        lock(&self.shared.first_v2).clear();
        *lock(&self.shared.invalid) = 0;
    }

    /// Sends `bytes` from the server's own socket (forged replies in tests).
    pub fn send_raw(&self, bytes: &[u8], to: SocketAddr) -> Result<()> {
        let sent = self
            .socket
            .send_to(bytes, to)
            .with_context(|| format!("sending from {} to {to}", self.local))?;
        anyhow::ensure!(sent == bytes.len(), "short send to {to}");
        Ok(())
    }
}

impl Drop for EchoOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn serve(
    socket: &UdpSocket,
    local: SocketAddr,
    mode: EchoMode,
    tag: bool,
    shared: &Shared,
    stop: &AtomicBool,
) {
    let mut buf = vec![0u8; 65536];
    let mut reply = Vec::with_capacity(65536);
    while !stop.load(Ordering::Relaxed) {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                log::warn!("origin {local}: recv failed: {e}");
                return;
            }
        };
        let datagram = &buf[..len];
        let mut rec = Received {
            from,
            to: local,
            spp: None,
            v2: None,
            payload: Vec::new(),
        };
        reply.clear();
        let client_text;
        match mode {
            EchoMode::Plain => {
                rec.payload = datagram.to_vec();
                client_text = from.to_string();
            }
            EchoMode::Spp => {
                let Ok(h) = spp::Repr::parse(&spp::Header::new_unchecked(datagram)) else {
                    *lock(&shared.invalid) += 1;
                    rec.payload = datagram.to_vec();
                    push(shared, rec);
                    continue;
                };
                rec.spp = Some(h);
                rec.payload = datagram[spp::HEADER_LEN..].to_vec();
                client_text = h.client.to_string();
                reply.extend_from_slice(&datagram[..spp::HEADER_LEN]);
            }
            EchoMode::ProxyV2 => {
                let (header, rest) = match proxy_v2::parse(datagram) {
                    Ok((repr, hlen)) => (Some(repr), &datagram[hlen..]),
                    Err(_) => (None, datagram),
                };
                rec.v2 = header.clone();
                rec.payload = rest.to_vec();
                let mut first = lock(&shared.first_v2);
                let known = first.entry(from).or_insert(header);
                client_text = known
                    .as_ref()
                    .and_then(|h| h.addresses)
                    .map_or_else(|| from.to_string(), |(client, _)| client.to_string());
            }
        }
        if tag {
            reply.extend_from_slice(client_text.as_bytes());
            reply.push(b'|');
        }
        reply.extend_from_slice(&rec.payload);
        push(shared, rec);
        if let Err(e) = socket.send_to(&reply, from) {
            log::warn!("origin {local}: reply to {from} failed: {e}");
        }
    }
}

fn push(shared: &Shared, rec: Received) {
    lock(&shared.received).push(rec);
    shared.arrived.notify_all();
}

macro_rules! echo_kind {
    ($(#[$doc:meta])* $name:ident, $mode:expr) => {
        $(#[$doc])*
        pub struct $name(EchoOrigin);

        impl $name {
            /// Binds `bind` in `ns` and serves, tagging replies with the client.
            pub fn start(ns: &Netns, bind: SocketAddr) -> Result<$name> {
                EchoOrigin::start(ns, bind, $mode).map($name)
            }

            /// As `start`; `tag = false` echoes payloads alone.
            pub fn start_with(ns: &Netns, bind: SocketAddr, tag: bool) -> Result<$name> {
                EchoOrigin::start_with(ns, bind, $mode, tag).map($name)
            }
        }

        impl Deref for $name {
            type Target = EchoOrigin;
            fn deref(&self) -> &EchoOrigin {
                &self.0
            }
        }
    };
}

echo_kind!(
    /// An SPP-aware echo origin (proxy protocol `simple`): replies carry the
    /// datagram's own SPP header, then `"<client>|<payload>"`.
    SppEchoOrigin,
    EchoMode::Spp
);
echo_kind!(
    /// A PROXY-v2-aware echo origin (proxy protocol `v2`): records and strips the
    /// header, replies `"<client>|<payload>"` plainly.
    ProxyV2EchoOrigin,
    EchoMode::ProxyV2
);
echo_kind!(
    /// A plain UDP echo origin (proxy protocol `off`): replies
    /// `"<source>|<payload>"`.
    UdpEchoOrigin,
    EchoMode::Plain
);

/// Builds an SPP datagram: header naming `client` and `proxy`, then `payload`.
pub fn spp_datagram(client: SocketAddr, proxy: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut d = spp::Repr { client, proxy }.emit_to_vec();
    d.extend_from_slice(payload);
    d
}
