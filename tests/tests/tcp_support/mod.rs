//! Shared helpers of the `tcp_*` integration tests: the agent with TCP apps, its
//! event log, origin servers and clients inside the lab.
//!
//! The agent runs as the real `forwarder run` process in `edge`
//! ([`forwarder_tests::agent::AgentProcess`]), with `event_log = "-"`: its stdout holds
//! only the JSON event lines (the log goes to stderr). Build it first
//! (`cargo build -p forwarder`), or run through `cargo xtask test`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use forwarder_tests::Lab;
use forwarder_tests::agent::AgentProcess;

/// Origin connect timeout the tests give the agent (see [`init`]).
pub const TEST_CONNECT_TIMEOUT: &str = "1s";

/// TLS handshake timeout the tests give the agent (see [`init`]).
pub const TEST_HANDSHAKE_TIMEOUT: &str = "2s";

static INIT: Once = Once::new();

/// Every test of a `tcp_*` binary calls this first: sets the agent's origin connect
/// timeout (`FORWARDER_TCP_CONNECT_TIMEOUT`, inherited by the agent process) so that
/// a blackholed origin costs one second, not five, and its TLS handshake timeout
/// (`FORWARDER_TLS_HANDSHAKE_TIMEOUT`) so that a silent client costs two, not ten.
pub fn init() {
    INIT.call_once(|| {
        // SAFETY: every test of these binaries calls `init` before anything else, and
        // `Once` makes the others wait, so no other thread of ours reads the
        // environment while it changes.
        unsafe {
            std::env::set_var("FORWARDER_TCP_CONNECT_TIMEOUT", TEST_CONNECT_TIMEOUT);
            std::env::set_var("FORWARDER_TLS_HANDSHAKE_TIMEOUT", TEST_HANDSHAKE_TIMEOUT);
        };
    });
}

/// Environment variable that runs the TCP tests with another forwarding engine:
/// its value becomes `[agent] tcp_splice` (`cargo xtask test` runs them with the
/// default and again with `on`).
pub const ENGINE_ENV: &str = "FORWARDER_TEST_TCP_SPLICE";

/// Environment variable that runs the TCP tests on another engine: its value
/// becomes `[agent] tcp_engine` (`cargo xtask test` runs them on the default,
/// `auto`, and once more with `epoll`).
pub const TCP_ENGINE_ENV: &str = "FORWARDER_TEST_TCP_ENGINE";

/// The agent's config: both edge veths, events to stdout, the settings of
/// `ENGINE_ENV` and `TCP_ENGINE_ENV` if set, then `apps` (TOML).
pub fn config(lab: &Lab, extra_agent: &str, apps: &str) -> String {
    let [ec, eo] = lab.edge_ifaces();
    let mut engine = std::env::var(ENGINE_ENV)
        .map(|e| format!("tcp_splice = \"{e}\"\n"))
        .unwrap_or_default();
    if let Ok(e) = std::env::var(TCP_ENGINE_ENV) {
        engine.push_str(&format!("tcp_engine = \"{e}\"\n"));
    }
    format!(
        "[agent]\ninterfaces = [\"{ec}\", \"{eo}\"]\nevent_log = \"-\"\n{engine}{extra_agent}\n\n{apps}\n"
    )
}

/// Starts the agent with `apps`.
pub fn start_agent(lab: &Lab, apps: &str) -> AgentProcess {
    AgentProcess::start(lab, &config(lab, "", apps)).expect("starting forwarder run")
}

/// One event line, as the JSON object the event log wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Ev(pub serde_json::Map<String, serde_json::Value>);

impl Ev {
    pub fn str(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.as_str()
    }

    pub fn num(&self, key: &str) -> Option<u64> {
        self.0.get(key)?.as_u64()
    }

    pub fn event(&self) -> &str {
        self.str("Event").unwrap_or("")
    }

    pub fn status(&self) -> u64 {
        self.num("Status").unwrap_or(u64::MAX)
    }

    pub fn ip(&self, key: &str) -> Option<IpAddr> {
        self.str(key)?.parse().ok()
    }

    /// `ClientIP`/`ClientPort` as a socket address.
    pub fn client(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(
            self.ip("ClientIP")?,
            self.num("ClientPort")? as u16,
        ))
    }

    pub fn server(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(
            self.ip("ServerIP")?,
            self.num("ServerPort")? as u16,
        ))
    }

    pub fn origin(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(
            self.ip("OriginIP")?,
            self.num("OriginPort")? as u16,
        ))
    }
}

/// Parses one event line; `None` for anything that is not a JSON object (the
/// agent's stdout also carries other output).
pub fn parse_event(line: &str) -> Option<Ev> {
    match serde_json::from_str(line.trim()).ok()? {
        serde_json::Value::Object(map) => Some(Ev(map)),
        _ => None,
    }
}

/// Every event the agent has written so far.
pub fn events(agent: &AgentProcess) -> Vec<Ev> {
    agent.stdout().lines().filter_map(parse_event).collect()
}

/// TCP events of app `app`.
pub fn app_events(agent: &AgentProcess, app: &str) -> Vec<Ev> {
    events(agent)
        .into_iter()
        .filter(|e| e.str("Application") == Some(app) && e.str("Protocol") == Some("tcp"))
        .collect()
}

/// Waits (up to `timeout`) until `done` holds for app `app`'s events; returns them.
/// Panics with the events and the agent's log otherwise.
pub fn wait_events(
    agent: &AgentProcess,
    app: &str,
    timeout: Duration,
    done: impl Fn(&[Ev]) -> bool,
) -> Vec<Ev> {
    let deadline = Instant::now() + timeout;
    loop {
        let evs = app_events(agent, app);
        if done(&evs) {
            return evs;
        }
        if Instant::now() >= deadline {
            panic!(
                "events of {app} did not reach the expected state within {timeout:?}: {evs:#?}\n{}",
                agent.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The one event of `kind` whose client is `client`.
pub fn event_for<'a>(evs: &'a [Ev], kind: &str, client: SocketAddr) -> Option<&'a Ev> {
    evs.iter()
        .find(|e| e.event() == kind && e.client() == Some(client))
}

/// Waits (up to `timeout`) for the `disconnect` event of `client`'s connection to
/// app `app` and returns it.
pub fn wait_disconnect(
    agent: &AgentProcess,
    app: &str,
    client: SocketAddr,
    timeout: Duration,
) -> Ev {
    let evs = wait_events(agent, app, timeout, |e| {
        event_for(e, "disconnect", client).is_some()
    });
    event_for(&evs, "disconnect", client)
        .cloned()
        .expect("disconnect event")
}

/// A listening socket in `origin` on `addr`.
pub fn origin_listener(lab: &Lab, addr: SocketAddr) -> TcpListener {
    lab.origin()
        .run_in(move || TcpListener::bind(addr))
        .expect("thread in origin")
        .unwrap_or_else(|e| panic!("binding {addr} in origin: {e}"))
}

/// A TCP connection from `client` to `dst`, made within `timeout`, with read and write
/// timeouts of 20 s (a stuck test fails instead of hanging).
pub fn client_connect(lab: &Lab, dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = lab
        .client()
        .run_in(move || TcpStream::connect_timeout(&dst, timeout))
        .expect("thread in client")?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.set_write_timeout(Some(Duration::from_secs(20)))?;
    Ok(stream)
}

/// Serves every connection of `listener` on its own thread with `handler`, forever
/// (the thread dies with the test process; the socket with the lab).
pub fn serve<F>(listener: TcpListener, handler: F)
where
    F: Fn(TcpStream) + Send + Sync + Clone + 'static,
{
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
            let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
            let handler = handler.clone();
            std::thread::spawn(move || handler(stream));
        }
    });
}

/// Reads until EOF (or an error, returned with what came before).
pub fn read_all(stream: &mut TcpStream) -> (Vec<u8>, Option<std::io::Error>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return (out, Some(e)),
        }
    }
}

/// A client says `hello` (5 bytes) through `edge`, the origin behind `listener`
/// answers `ok` (2 bytes), then the client resets (`SO_LINGER` 0). Returns the
/// client's address and how the origin's next read ended (the error kind, if any).
pub fn hello_then_client_reset(
    lab: &Lab,
    listener: TcpListener,
    edge: SocketAddr,
    timeout: Duration,
) -> (SocketAddr, Option<std::io::ErrorKind>) {
    let (tx, rx) = std::sync::mpsc::channel();
    serve(listener, move |mut s: TcpStream| {
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).unwrap();
        s.write_all(b"ok").unwrap();
        let (_, err) = read_all(&mut s);
        let _ = tx.send(err.map(|e| e.kind()));
    });
    let mut client = client_connect(lab, edge, timeout).unwrap();
    let local = client.local_addr().unwrap();
    client.write_all(b"hello").unwrap();
    let mut ok = [0u8; 2];
    client.read_exact(&mut ok).unwrap();
    set_linger_zero(&client);
    drop(client);
    let origin_saw = rx.recv_timeout(timeout).expect("origin connection ended");
    (local, origin_saw)
}

/// Sends RST instead of FIN when `stream` is closed.
pub fn set_linger_zero(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd, pointer to a linger of the given size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
}

/// The bulk transfers' bytes and checksum: a crate built optimised even here.
pub use forwarder_testbytes::{Stream64, Sum64};

/// Sends `len` pseudo-random bytes (seed `seed`) to `stream`; returns their checksum.
pub fn send_random(stream: &mut TcpStream, seed: u64, len: u64) -> std::io::Result<(u64, u64)> {
    let mut rng = Stream64::new(seed);
    let mut sum = Sum64::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        sum.update(&buf[..n]);
        stream.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(sum.finish())
}

/// Reads until EOF; returns the checksum and length of what came.
pub fn receive_sum(stream: &mut TcpStream) -> std::io::Result<(u64, u64)> {
    let mut sum = Sum64::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(sum.finish()),
            Ok(n) => sum.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "fwd-tcp-{tag}-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating a temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Half-closes a std stream's sending side.
pub fn shutdown_write(stream: &TcpStream) {
    stream.shutdown(Shutdown::Write).expect("shutdown(Write)");
}

/// Waits until `port` accepts connections on `addr` from inside `origin` (a server
/// process just started).
pub fn wait_listening(lab: &Lab, addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = lab
            .origin()
            .run_in(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
            .unwrap_or(false);
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on {addr} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}
