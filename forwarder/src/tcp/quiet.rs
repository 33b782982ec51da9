//! Bringing a connection to a quiet point before the XDP splice: whatever either
//! peer sends meanwhile is forwarded at once (so a client that speaks first, or a
//! first request and its answer, do not keep it from being spliced), until both of
//! the agent's sockets have nothing unread and nothing unacknowledged.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::conn::Side;
use super::repair;
use super::splice::Fault;

/// Readiness is not reported for acknowledgements: the sockets are looked at
/// again this often while bytes are in flight.
const POLL: Duration = Duration::from_millis(2);
/// Bytes forwarded at most per read.
const CHUNK: usize = 64 * 1024;

/// Payload bytes forwarded on the way to the quiet point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    pub client_bytes: u64,
    pub origin_bytes: u64,
}

/// Why no quiet point was reached.
#[derive(Debug)]
pub enum NotQuiet {
    /// Still busy at the deadline, or more than the budget moved.
    Busy,
    /// A peer closed its side: the socket path takes it from here (the EOF stays
    /// on the socket for its next read).
    Closed,
    /// Reading from `source` or writing its bytes on failed (a peer reset). The
    /// kernel reports a socket's error once, so the socket path would see a plain
    /// EOF after this: the connection ends here, with this fault.
    Fault { source: Side, fault: Fault },
    /// The socket state could not be read.
    Failed(io::Error),
}

/// Forwards what arrives until both sockets are quiet, for at most `wait` and
/// `budget` bytes (both ways together). Bytes moved are added to `drained`.
pub async fn drain_until_quiet(
    client: &TcpStream,
    origin: &TcpStream,
    wait: Duration,
    budget: u64,
    drained: &mut Drained,
) -> Result<(), NotQuiet> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let quiet = repair::is_quiet(client)
            .and_then(|c| Ok(c && repair::is_quiet(origin)?))
            .map_err(NotQuiet::Failed)?;
        if quiet {
            return Ok(());
        }
        if Instant::now() >= deadline || drained.client_bytes + drained.origin_bytes > budget {
            return Err(NotQuiet::Busy);
        }
        tokio::select! {
            r = client.readable() => {
                r.map_err(|_| NotQuiet::Closed)?;
                drained.client_bytes += move_some(client, origin, Side::Client, &mut buf).await?;
            }
            r = origin.readable() => {
                r.map_err(|_| NotQuiet::Closed)?;
                drained.origin_bytes += move_some(origin, client, Side::Origin, &mut buf).await?;
            }
            _ = tokio::time::sleep_until(deadline.min(Instant::now() + POLL)) => {}
        }
    }
}

/// Reads what `from` (the `source` side) has, without waiting, and writes all of
/// it to `to`.
async fn move_some(
    from: &TcpStream,
    to: &TcpStream,
    source: Side,
    buf: &mut [u8],
) -> Result<u64, NotQuiet> {
    let fault = |fault| NotQuiet::Fault { source, fault };
    let n = match from.try_read(buf) {
        Ok(0) => return Err(NotQuiet::Closed),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
        Err(e) => return Err(fault(Fault::Read(e))),
    };
    let mut rest = &buf[..n];
    while !rest.is_empty() {
        to.writable().await.map_err(|e| fault(Fault::Write(e)))?;
        match to.try_write(rest) {
            Ok(k) => rest = &rest[k..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(fault(Fault::Write(e))),
        }
    }
    Ok(n as u64)
}
