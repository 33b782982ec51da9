//! Zero-copy forwarding of one direction of a connection: `splice(2)` from the
//! source socket into a pipe, then from the pipe into the destination socket. The
//! payload moves as page references inside the kernel; it never enters userspace.
//!
//! Both sockets are non-blocking and registered with tokio; readiness comes from
//! `readable()`/`writable()` and every `splice` runs inside `try_io`, so a
//! `EAGAIN` clears tokio's readiness and the next wait is a real one.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// The pipe size each direction asks for (`F_SETPIPE_SZ`): 256 KiB moves a TCP
/// window's worth per round; the default (64 KiB) is kept if the kernel refuses.
pub const PIPE_SIZE: usize = 256 * 1024;

/// A pipe used as the in-kernel buffer of one direction.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe, spliced in and not yet out.
    len: usize,
    capacity: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for two fds.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two fresh fds that we now own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a valid pipe fd.
        let size = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        let capacity = if size > 0 {
            size as usize
        } else {
            // SAFETY: as above.
            let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            if size > 0 { size as usize } else { 65_536 }
        };
        Ok(Pipe {
            read,
            write,
            len: 0,
            capacity,
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Empty pipes kept for the next connections of the splice engine: a connection
/// takes two and gives them back empty, so it costs no `pipe2`, `fcntl` or
/// `close` (8 syscalls) once the pool is warm. A pipe that still holds data (the
/// connection ended mid-transfer) is closed instead.
#[derive(Default)]
pub struct PipePool {
    pipes: std::sync::Mutex<Vec<Pipe>>,
}

impl PipePool {
    /// Most pipes kept (each holds 2 fds and counts against the per-user pipe
    /// pages while idle): 32 connections' worth.
    pub const MAX: usize = 64;

    /// A pipe from the pool, or a new one.
    pub fn take(&self) -> io::Result<Pipe> {
        let pooled = self.lock().pop();
        match pooled {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    /// Gives `pipe` back: kept when it is empty and the pool has room.
    pub fn give(&self, pipe: Pipe) {
        if pipe.len != 0 {
            return;
        }
        let mut pipes = self.lock();
        if pipes.len() < Self::MAX {
            pipes.push(pipe);
        }
    }

    /// Pipes kept now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pipe>> {
        self.pipes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain splice(2) between two fds we hold, no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Which end failed.
#[derive(Debug)]
pub enum Fault {
    /// Reading the source socket failed (e.g. `ECONNRESET`: the source sent RST).
    Read(io::Error),
    /// Writing to the destination socket failed (`EPIPE`, `ECONNRESET`, ...).
    Write(io::Error),
}

/// `shutdown(fd, SHUT_WR)`: sends our FIN to that peer.
pub fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    // SAFETY: valid socket fd.
    if unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Moves everything `src` sends to `dst` until `src` sends FIN; then sends FIN to
/// `dst` (half-close) and returns the byte count. `on_bytes` is called with each
/// chunk's size as it is read from `src`.
pub async fn forward(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &mut Pipe,
    mut on_bytes: impl FnMut(u64),
) -> Result<u64, Fault> {
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    let (pipe_r, pipe_w) = (pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
    let mut total = 0u64;
    loop {
        // Fill: only into an empty pipe, so an EAGAIN can only be the socket's.
        debug_assert_eq!(pipe.len, 0);
        let n = loop {
            src.readable().await.map_err(Fault::Read)?;
            match src.try_io(Interest::READABLE, || splice(src_fd, pipe_w, pipe.capacity)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fault::Read(e)),
            }
        };
        if n == 0 {
            shutdown_write(dst).map_err(Fault::Write)?;
            return Ok(total);
        }
        pipe.len = n;
        total += n as u64;
        on_bytes(n as u64);
        // Drain: the pipe holds data, so an EAGAIN can only be the socket's.
        while pipe.len > 0 {
            dst.writable().await.map_err(Fault::Write)?;
            match dst.try_io(Interest::WRITABLE, || splice(pipe_r, dst_fd, pipe.len)) {
                Ok(0) => {
                    return Err(Fault::Write(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "splice into the socket moved nothing",
                    )));
                }
                Ok(n) => pipe.len -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fault::Write(e)),
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

    #[tokio::test]
    async fn forwards_and_half_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // client <-> (a_in) proxy (b_out) <-> server
        let (mut client, a_in) = pair(&listener).await;
        let (b_out, mut server) = pair(&listener).await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut pipe = Pipe::new().unwrap();
        assert!(pipe.capacity() >= 65_536);
        let mut seen = 0;
        let (moved, received) =
            tokio::join!(forward(&a_in, &b_out, &mut pipe, |n| seen += n), async {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                got
            });
        assert_eq!(moved.unwrap(), data.len() as u64);
        assert_eq!(seen, data.len() as u64);
        assert!(received == data, "payload differs");
        // The other direction still works after the half-close.
        let mut client = writer.await.unwrap();
        server.write_all(b"reply").await.unwrap();
        drop(server);
        let mut pipe = Pipe::new().unwrap();
        let (moved, reply) = tokio::join!(forward(&b_out, &a_in, &mut pipe, |_| {}), async {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        assert_eq!(moved.unwrap(), 5);
        assert_eq!(reply, b"reply");
    }

    #[tokio::test]
    async fn the_pool_reuses_empty_pipes_only() {
        let pool = PipePool::default();
        let pipe = pool.take().unwrap();
        let fd = pipe.read.as_raw_fd();
        pool.give(pipe);
        assert_eq!(pool.len(), 1);
        let again = pool.take().unwrap();
        assert_eq!(again.read.as_raw_fd(), fd, "the same pipe comes back");
        assert!(pool.is_empty());
        // A pipe that still holds data is not kept.
        let mut full = again;
        full.len = 10;
        pool.give(full);
        assert!(pool.is_empty());
        // At most MAX are kept.
        let pipes: Vec<Pipe> = (0..PipePool::MAX + 3)
            .map(|_| Pipe::new().unwrap())
            .collect();
        for p in pipes {
            pool.give(p);
        }
        assert_eq!(pool.len(), PipePool::MAX);
    }

    #[tokio::test]
    async fn reset_is_a_read_fault() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, a_in) = pair(&listener).await;
        let (b_out, _server) = pair(&listener).await;
        crate::tcp::conn::reset(&client);
        drop(client);
        let mut pipe = Pipe::new().unwrap();
        match forward(&a_in, &b_out, &mut pipe, |_| {}).await {
            Err(Fault::Read(e)) => assert_eq!(e.raw_os_error(), Some(libc::ECONNRESET)),
            other => panic!("expected a read fault, got {other:?}"),
        }
    }
}
