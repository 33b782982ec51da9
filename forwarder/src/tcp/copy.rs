//! Copy forwarding of one direction of a connection: `recv` into a per-thread
//! scratch buffer and `send` from it at once. Without scatter-gather offloads (veth,
//! many virtual NICs) splicing does not save the copy it promises and costs two
//! pipes (four fds, their pages) per connection; copying holds nothing per idle
//! connection. Memory is bounded: a per-connection stash exists only while the
//! destination accepts less than was read, and at most one read's worth.
//!
//! Readiness: a read shorter than the buffer drained the socket, so tokio's read
//! readiness is cleared then and there (the closure reports `WouldBlock` after
//! handling the bytes) instead of by one more `recv` that would fail with `EAGAIN`.
//! tokio only clears readiness that no newer event has refreshed, so a byte
//! arriving meanwhile is never missed.
//!
//! A connection that may be spliced in XDP (`tcp_fastpath = "xdp"`) is copied here
//! too until the handoff rule says it is worth a handoff ([`Handoff`]): then both
//! directions pause, each at a point where nothing it read is still unsent, and
//! the caller hands the connection over (or resumes copying if it cannot).

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::splice::{Fault, shutdown_write};

/// Size of each thread's scratch buffer: one read's worth.
pub const SCRATCH_LEN: usize = 128 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    send_flags(fd, buf, 0)
}

fn send_flags(fd: RawFd, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | flags,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// What one read did.
enum Step {
    /// Bytes read (and sent, or stashed).
    Moved(usize),
    /// The source sent FIN.
    Eof,
    /// Sending to the destination failed.
    WriteFailed(io::Error),
}

/// The two directions of one connection, for the FIN of the last one: once the
/// other direction has ended, the caller closes both sockets as soon as this one
/// ends, and that close sends the FIN; a `shutdown` first would be one syscall
/// more per connection for nothing. (Its receive queue is empty: the other
/// direction read it to its EOF, so the close sends FIN, not RST.)
#[derive(Debug, Default)]
pub struct Ends(AtomicBool);

impl Ends {
    /// Marks one direction ended; `true` when the other one had ended already.
    fn last(&self) -> bool {
        self.0.swap(true, Ordering::Relaxed)
    }
}

const WATCHING: u8 = 0;
const DUE: u8 = 1;
const OFF: u8 = 2;

/// The handoff rule's watch over one connection's two directions: once they have
/// moved `bytes` (both ways together) within `window` of the start, the handoff
/// is due and both directions pause. A direction that ends (FIN) first, or the
/// window passing, turns the watch off for good: the connection is copied to its
/// end. Both directions are polled by one task, so a direction never reads again
/// once the other made the handoff due (it pauses at its next await instead).
#[derive(Debug)]
pub struct Handoff {
    deadline: Instant,
    bytes: u64,
    moved: AtomicU64,
    state: AtomicU8,
    due: Notify,
}

impl Handoff {
    pub fn new(bytes: u64, window: Duration) -> Handoff {
        Handoff {
            deadline: Instant::now() + window,
            bytes,
            moved: AtomicU64::new(0),
            state: AtomicU8::new(WATCHING),
            due: Notify::new(),
        }
    }

    fn watching(&self) -> bool {
        self.state.load(Ordering::Relaxed) == WATCHING
    }

    fn is_due(&self) -> bool {
        self.state.load(Ordering::Relaxed) == DUE
    }

    /// Counts `n` bytes moved; at the threshold (within the window) the handoff
    /// is due and the other direction is woken to pause.
    fn add(&self, n: u64) {
        if !self.watching() {
            return;
        }
        let moved = self.moved.fetch_add(n, Ordering::Relaxed) + n;
        if moved < self.bytes {
            return;
        }
        if Instant::now() > self.deadline {
            self.stop();
            return;
        }
        self.state.store(DUE, Ordering::Relaxed);
        self.due.notify_waiters();
    }

    /// No handoff for this connection (any more): copy it to its end.
    pub fn stop(&self) {
        self.state.store(OFF, Ordering::Relaxed);
    }
}

/// Where a direction stopped, with the bytes it moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The source sent FIN (passed on, or left to the close: see [`Ends`]).
    Eof(u64),
    /// The handoff is due: nothing read is left unsent, and the sockets are as
    /// they were (any FIN still unread).
    Paused(u64),
}

/// Moves everything `src` sends to `dst` until `src` sends FIN; then sends FIN to
/// `dst` (half-close) and returns the byte count. `on_bytes` is called with each
/// chunk's size as it is read from `src`.
pub async fn forward(
    src: &TcpStream,
    dst: &TcpStream,
    on_bytes: impl FnMut(u64),
) -> Result<u64, Fault> {
    match forward_ending(src, dst, None, None, on_bytes).await? {
        Stop::Eof(total) | Stop::Paused(total) => Ok(total),
    }
}

/// As [`forward`]; with `ends`, the direction that ends last leaves its FIN to
/// the caller's close (see [`Ends`]): the caller must close `dst` right after.
/// With `handoff`, pauses when the handoff is due.
pub async fn forward_ending(
    src: &TcpStream,
    dst: &TcpStream,
    ends: Option<&Ends>,
    handoff: Option<&Handoff>,
    mut on_bytes: impl FnMut(u64),
) -> Result<Stop, Fault> {
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    // Bytes read but not yet accepted by a slow destination.
    let mut stash: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        // A slow destination's leftovers first: nothing more is read meanwhile, so
        // the stash never exceeds one read.
        while !stash.is_empty() {
            dst.writable().await.map_err(Fault::Write)?;
            match dst.try_io(Interest::WRITABLE, || send(dst_fd, &stash)) {
                Ok(n) => {
                    stash.drain(..n);
                }
                Err(e) if would_block(&e) => continue,
                Err(e) => return Err(Fault::Write(e)),
            }
        }
        if stash.capacity() > 0 {
            // The destination caught up: give the memory back.
            stash = Vec::new();
        }
        // Read-closed (the peer's FIN has arrived) means this read is the last one
        // with data: it is sent with MSG_MORE, so that the FIN the next round sends
        // (`shutdown`) leaves in the same segment instead of one more.
        if handoff.is_some_and(Handoff::is_due) {
            return Ok(Stop::Paused(total));
        }
        // While the watch is on, the wait for the source's bytes also ends when
        // the other direction made the handoff due.
        let ready = if let Some(h) = handoff.filter(|h| h.watching()) {
            tokio::select! {
                biased;
                _ = h.due.notified() => return Ok(Stop::Paused(total)),
                r = src.ready(Interest::READABLE) => r,
            }
        } else {
            src.ready(Interest::READABLE).await
        }
        .map_err(Fault::Read)?;
        let last = ready.is_read_closed();
        let mut step = None;
        let result = src.try_io(Interest::READABLE, || {
            SCRATCH.with_borrow_mut(|buf| {
                if buf.len() < SCRATCH_LEN {
                    buf.resize(SCRATCH_LEN, 0);
                }
                let n = recv(src_fd, buf)?;
                if n == 0 {
                    step = Some(Step::Eof);
                    return Ok(());
                }
                // Straight on from the scratch buffer; keep what does not fit.
                let more = if last { libc::MSG_MORE } else { 0 };
                let sent = match send_flags(dst_fd, &buf[..n], more) {
                    Ok(sent) => sent,
                    Err(e) if would_block(&e) => 0,
                    Err(e) => {
                        step = Some(Step::WriteFailed(e));
                        return Ok(());
                    }
                };
                if sent < n {
                    stash.extend_from_slice(&buf[sent..n]);
                }
                step = Some(Step::Moved(n));
                if n < buf.len() {
                    // A short read drained the socket: clear the readiness now.
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            })
        });
        if let Err(e) = result
            && !would_block(&e)
        {
            return Err(Fault::Read(e));
        }
        match step.take() {
            None => continue,
            Some(Step::Eof) => {
                // Half-closed: copied to its end.
                if let Some(h) = handoff {
                    h.stop();
                }
                if !ends.is_some_and(Ends::last) {
                    shutdown_write(dst).map_err(Fault::Write)?;
                }
                return Ok(Stop::Eof(total));
            }
            Some(Step::WriteFailed(e)) => return Err(Fault::Write(e)),
            Some(Step::Moved(n)) => {
                total += n as u64;
                on_bytes(n as u64);
                // Due: pauses once what it read is all sent (the loop's top).
                if let Some(h) = handoff {
                    h.add(n as u64);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::test_util::pair;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn data(len: u32) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn forwards_and_half_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, a_in) = pair(&listener).await;
        let (b_out, mut server) = pair(&listener).await;
        let data = data(3_000_000);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut seen = 0;
        let (moved, received) = tokio::join!(forward(&a_in, &b_out, |n| seen += n), async {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        assert_eq!(moved.unwrap(), data.len() as u64);
        assert_eq!(seen, data.len() as u64);
        assert!(received == data, "payload differs");
        let mut client = writer.await.unwrap();
        server.write_all(b"reply").await.unwrap();
        drop(server);
        let (moved, reply) = tokio::join!(forward(&b_out, &a_in, |_| {}), async {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        assert_eq!(moved.unwrap(), 5);
        assert_eq!(reply, b"reply");
    }

    /// With `Ends`, the first direction to end half-closes at once; the last leaves
    /// its FIN to the close that follows, and the peer then reads everything and
    /// a clean EOF.
    #[tokio::test]
    async fn the_last_direction_leaves_its_fin_to_the_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, a_in) = pair(&listener).await;
        let (b_out, mut server) = pair(&listener).await;
        let ends = Ends::default();
        // The origin answers and closes first: its direction ends first.
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let down = forward_ending(&b_out, &a_in, Some(&ends), None, |_| {}).await;
        assert_eq!(down.unwrap(), Stop::Eof(5));
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply", "the first FIN was passed on at once");
        client.write_all(b"last").await.unwrap();
        client.shutdown().await.unwrap();
        let up = forward_ending(&a_in, &b_out, Some(&ends), None, |_| {}).await;
        assert_eq!(up.unwrap(), Stop::Eof(4));
        // No shutdown yet: the origin has the bytes but no EOF until the close.
        let mut buf = [0u8; 8];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"last");
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(200), server.read(&mut buf))
                .await;
        assert!(early.is_err(), "EOF before the close: {early:?}");
        drop(b_out);
        drop(a_in);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0, "a clean EOF (FIN)");
    }

    /// A destination that reads slowly: the stash path carries every byte, in order.
    #[tokio::test]
    async fn a_slow_destination_gets_every_byte_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, a_in) = pair(&listener).await;
        let (b_out, mut server) = pair(&listener).await;
        let data = data(8_000_000);
        let sent = data.clone();
        tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
        });
        let (moved, received) = tokio::join!(forward(&a_in, &b_out, |_| {}), async {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 4096];
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    break got;
                }
                got.extend_from_slice(&buf[..n]);
                if got.len() % 65_536 < 4096 {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        });
        assert_eq!(moved.unwrap(), data.len() as u64);
        assert!(received == data, "payload differs");
    }

    /// Both directions of one connection under a handoff watch.
    async fn both_ways(
        a_in: &TcpStream,
        b_out: &TcpStream,
        handoff: &Handoff,
    ) -> (Result<Stop, Fault>, Result<Stop, Fault>) {
        let ends = Ends::default();
        tokio::join!(
            forward_ending(a_in, b_out, Some(&ends), Some(handoff), |_| {}),
            forward_ending(b_out, a_in, Some(&ends), Some(handoff), |_| {}),
        )
    }

    /// At the threshold both directions pause, the idle one too; what was read
    /// was all sent, and the rest waits unread in the source socket.
    #[tokio::test]
    async fn the_handoff_pauses_both_directions_at_the_threshold() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, a_in) = pair(&listener).await;
        let (b_out, mut server) = pair(&listener).await;
        let data = data(1_000_000);
        client.write_all(&data).await.unwrap();
        let handoff = Handoff::new(100_000, Duration::from_secs(10));
        let (up, down) = both_ways(&a_in, &b_out, &handoff).await;
        let Ok(Stop::Paused(moved)) = up else {
            panic!("client → origin: {up:?}");
        };
        assert_eq!(down.unwrap(), Stop::Paused(0));
        assert!((100_000..1_000_000).contains(&moved), "moved {moved}");
        let mut got = vec![0u8; moved as usize];
        server.read_exact(&mut got).await.unwrap();
        assert!(got == data[..moved as usize], "the forwarded bytes differ");
        // Nothing more was sent, and the rest is still in `a_in`, in order.
        let mut probe = [0u8; 1];
        let more = tokio::time::timeout(Duration::from_millis(100), server.read(&mut probe)).await;
        assert!(more.is_err(), "a byte after the pause: {more:?}");
        let mut rest = vec![0u8; data.len() - moved as usize];
        let mut a_in = a_in;
        a_in.read_exact(&mut rest).await.unwrap();
        assert!(rest == data[moved as usize..], "the unread rest differs");
        // Stopped: copied to the end, never paused again.
        handoff.stop();
        client.write_all(&data).await.unwrap();
        client.shutdown().await.unwrap();
        server.shutdown().await.unwrap();
        let (up, down) = both_ways(&a_in, &b_out, &handoff).await;
        assert_eq!(up.unwrap(), Stop::Eof(1_000_000));
        assert_eq!(down.unwrap(), Stop::Eof(0));
    }

    /// A direction that ends below the threshold turns the watch off: the other
    /// one goes on past the threshold to its own end. (A FIN still unread when
    /// the other direction crosses the threshold does not: both pause, and the
    /// handoff finds the peer closed, `repair::peer_closed`.)
    #[tokio::test]
    async fn a_half_close_below_the_threshold_means_no_handoff() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, a_in) = pair(&listener).await;
        let (b_out, mut server) = pair(&listener).await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let handoff = Handoff::new(100_000, Duration::from_secs(10));
        let answer = data(500_000);
        let sent = answer.clone();
        // The origin answers once the request and its FIN have passed.
        let origin = tokio::spawn(async move {
            let mut req = Vec::new();
            server.read_to_end(&mut req).await.unwrap();
            assert_eq!(req, b"request");
            server.write_all(&sent).await.unwrap();
            server.shutdown().await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let (up, down) = both_ways(&a_in, &b_out, &handoff).await;
        assert_eq!(up.unwrap(), Stop::Eof(7));
        assert_eq!(down.unwrap(), Stop::Eof(500_000));
        origin.await.unwrap();
        drop((a_in, b_out));
        assert!(reader.await.unwrap() == answer);
    }

    /// Bytes past the window do not make the handoff due.
    #[tokio::test]
    async fn the_threshold_counts_only_within_the_window() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, a_in) = pair(&listener).await;
        let (b_out, mut server) = pair(&listener).await;
        let handoff = Handoff::new(100_000, Duration::from_millis(50));
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(&data(300_000)).await.unwrap();
        client.shutdown().await.unwrap();
        server.shutdown().await.unwrap();
        let drain = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got.len()
        });
        let (up, down) = both_ways(&a_in, &b_out, &handoff).await;
        assert_eq!(up.unwrap(), Stop::Eof(300_000));
        assert_eq!(down.unwrap(), Stop::Eof(0));
        drop((a_in, b_out));
        assert_eq!(drain.await.unwrap(), 300_000);
    }

    #[tokio::test]
    async fn reset_is_a_read_fault() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, a_in) = pair(&listener).await;
        let (b_out, _server) = pair(&listener).await;
        crate::tcp::conn::reset(&client);
        drop(client);
        match forward(&a_in, &b_out, |_| {}).await {
            Err(Fault::Read(e)) => assert_eq!(e.raw_os_error(), Some(libc::ECONNRESET)),
            other => panic!("expected a read fault, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_destination_that_reset_is_a_write_fault() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, a_in) = pair(&listener).await;
        let (b_out, server) = pair(&listener).await;
        crate::tcp::conn::reset(&server);
        drop(server);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let writer = tokio::spawn(async move {
            // Enough that the reset is seen while sending.
            let _ = client.write_all(&vec![1u8; 1 << 20]).await;
            client
        });
        match forward(&a_in, &b_out, |_| {}).await {
            Err(Fault::Write(_)) => {}
            other => panic!("expected a write fault, got {other:?}"),
        }
        drop(writer.await);
    }
}
