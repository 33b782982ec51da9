//! `uring_floor LISTEN ORIGIN`: a minimal TCP proxy on io_uring, the `uring-floor`
//! variant of the `tcp-connrate` benchmark. It is not product code: it measures
//! what a short proxied connection costs the kernel and the edge CPU when every
//! per-connection syscall of the data path (accept, connect, recv, send, shutdown,
//! close) is submitted to io_uring in batches. That is the floor an io_uring
//! engine in the agent could reach (issue 11: "measure before choosing").
//!
//! What it does per connection, and nothing more: multishot accept; `socket` and
//! `TCP_NODELAY` on both legs as plain syscalls; connect; copy both ways through a
//! 16 KiB buffer per direction (a short send is resent from where it stopped); EOF
//! from one side → `shutdown(SHUT_WR)` of the other; both ended, or any error →
//! both closed (after `shutdown(SHUT_RDWR)` on an error, so no receive stays
//! pending on a socket it closes). What the agent does beside that and this does
//! not: the edge address (`getsockname`), origin choice and failover, connect and
//! idle timeouts, the PROXY header, RST passed on, events and counters.

use std::net::{SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, RawFd};

use anyhow::{Context as _, Result, bail};
use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// Bytes read at most per `recv`, per direction.
const BUF: usize = 16 * 1024;
/// Submission queue entries (and the batch submitted per `io_uring_enter`).
const RING: u32 = 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Accept,
    Connect,
    /// Receive from the client / the origin.
    RecvClient,
    RecvOrigin,
    /// Send the client's bytes to the origin / the origin's to the client.
    SendOrigin,
    SendClient,
    Shutdown,
    Close,
}

impl Op {
    const ALL: [Op; 8] = [
        Op::Accept,
        Op::Connect,
        Op::RecvClient,
        Op::RecvOrigin,
        Op::SendOrigin,
        Op::SendClient,
        Op::Shutdown,
        Op::Close,
    ];

    fn tag(self, slot: usize) -> u64 {
        ((slot as u64) << 8) | self as u64
    }

    fn untag(data: u64) -> Option<(Op, usize)> {
        let op = *Op::ALL.get((data & 0xff) as usize)?;
        Some((op, (data >> 8) as usize))
    }
}

/// One direction's buffer: `len` bytes read, `sent` of them sent so far.
struct Direction {
    buf: Vec<u8>,
    len: usize,
    sent: usize,
}

struct Conn {
    client: RawFd,
    origin: RawFd,
    /// Must outlive the connect: the kernel reads it when the entry is issued.
    origin_addr: Box<libc::sockaddr_in>,
    up: Direction,
    down: Direction,
    /// Directions that ended with EOF.
    ended: u8,
    in_flight: u32,
    closing: bool,
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: valid fd (or the call fails harmlessly), pointer to an int.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn sockaddr(addr: SocketAddrV4) -> Box<libc::sockaddr_in> {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut sa: Box<libc::sockaddr_in> = Box::new(unsafe { std::mem::zeroed() });
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
    sa
}

struct Proxy {
    listener: RawFd,
    origin: SocketAddrV4,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    queue: Vec<squeue::Entry>,
}

impl Proxy {
    fn accept(&mut self) {
        self.queue.push(
            opcode::AcceptMulti::new(types::Fd(self.listener))
                .build()
                .user_data(Op::Accept.tag(0)),
        );
    }

    fn accepted(&mut self, client: RawFd) {
        // SAFETY: plain socket(2); checked below.
        let origin =
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if origin < 0 {
            // SAFETY: our fd.
            unsafe { libc::close(client) };
            return;
        }
        set_nodelay(client);
        set_nodelay(origin);
        let conn = Conn {
            client,
            origin,
            origin_addr: sockaddr(self.origin),
            up: Direction {
                buf: vec![0; BUF],
                len: 0,
                sent: 0,
            },
            down: Direction {
                buf: vec![0; BUF],
                len: 0,
                sent: 0,
            },
            ended: 0,
            in_flight: 1,
            closing: false,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.conns[slot] = Some(conn);
                slot
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        let Some(c) = self.conns[slot].as_ref() else {
            return;
        };
        self.queue.push(
            opcode::Connect::new(
                types::Fd(c.origin),
                (&*c.origin_addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
            .build()
            .user_data(Op::Connect.tag(slot)),
        );
    }

    fn completed(&mut self, op: Op, slot: usize, res: i32) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        c.in_flight -= 1;
        let queue = &mut self.queue;
        let fault = res < 0 && !matches!(op, Op::Shutdown | Op::Close);
        if !fault {
            match op {
                Op::Connect => {
                    c.in_flight += 2;
                    queue.push(recv(c.client, &mut c.up, Op::RecvClient.tag(slot)));
                    queue.push(recv(c.origin, &mut c.down, Op::RecvOrigin.tag(slot)));
                }
                Op::RecvClient | Op::RecvOrigin => {
                    let (to, dir, send_op) = match op {
                        Op::RecvClient => (c.origin, &mut c.up, Op::SendOrigin),
                        _ => (c.client, &mut c.down, Op::SendClient),
                    };
                    if res == 0 {
                        c.ended += 1;
                        // The last direction's FIN goes with the close below.
                        if c.ended < 2 {
                            c.in_flight += 1;
                            queue.push(
                                opcode::Shutdown::new(types::Fd(to), libc::SHUT_WR)
                                    .build()
                                    .user_data(Op::Shutdown.tag(slot)),
                            );
                        }
                    } else {
                        dir.len = res as usize;
                        dir.sent = 0;
                        c.in_flight += 1;
                        queue.push(send(to, dir, send_op.tag(slot)));
                    }
                }
                Op::SendOrigin | Op::SendClient => {
                    let (from, to, dir, recv_op) = match op {
                        Op::SendOrigin => (c.client, c.origin, &mut c.up, Op::RecvClient),
                        _ => (c.origin, c.client, &mut c.down, Op::RecvOrigin),
                    };
                    dir.sent += res as usize;
                    c.in_flight += 1;
                    if dir.sent < dir.len {
                        queue.push(send(to, dir, op.tag(slot)));
                    } else {
                        queue.push(recv(from, dir, recv_op.tag(slot)));
                    }
                }
                Op::Accept | Op::Shutdown | Op::Close => {}
            }
        }
        if (fault || c.ended == 2) && !c.closing {
            c.closing = true;
            for fd in [c.client, c.origin] {
                if fault {
                    // Wakes a receive still pending on the other socket.
                    // SAFETY: our fd.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                }
                c.in_flight += 1;
                queue.push(
                    opcode::Close::new(types::Fd(fd))
                        .build()
                        .user_data(Op::Close.tag(slot)),
                );
            }
        }
        if c.closing && c.in_flight == 0 {
            self.conns[slot] = None;
            self.free.push(slot);
        }
    }
}

fn recv(fd: RawFd, dir: &mut Direction, tag: u64) -> squeue::Entry {
    opcode::Recv::new(types::Fd(fd), dir.buf.as_mut_ptr(), BUF as u32)
        .build()
        .user_data(tag)
}

fn send(fd: RawFd, dir: &Direction, tag: u64) -> squeue::Entry {
    let rest = &dir.buf[dir.sent..dir.len];
    opcode::Send::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(tag)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, origin] = args.as_slice() else {
        bail!("usage: uring_floor LISTEN_ADDR ORIGIN_ADDR (IPv4)");
    };
    let listen: SocketAddr = listen.parse().context("LISTEN_ADDR")?;
    let origin: SocketAddrV4 = origin.parse().context("ORIGIN_ADDR (IPv4)")?;
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_defer_taskrun()
        .build(RING)
        .context("io_uring_setup")?;
    let mut proxy = Proxy {
        listener: listener.as_raw_fd(),
        origin,
        conns: Vec::new(),
        free: Vec::new(),
        queue: Vec::new(),
    };
    proxy.accept();
    let mut completions = Vec::new();
    loop {
        while !proxy.queue.is_empty() {
            let mut sq = ring.submission();
            let room = sq.capacity() - sq.len();
            let n = room.min(proxy.queue.len());
            for entry in proxy.queue.drain(..n) {
                // SAFETY: every buffer and address an entry points to lives in
                // `proxy.conns` until the entry's completion has been handled.
                unsafe { sq.push(&entry).context("submission queue full")? };
            }
            drop(sq);
            if !proxy.queue.is_empty() {
                ring.submit().context("io_uring_enter")?;
            }
        }
        ring.submit_and_wait(1).context("io_uring_enter")?;
        completions.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for (data, res, flags) in completions.drain(..) {
            let Some((op, slot)) = Op::untag(data) else {
                continue;
            };
            if op == Op::Accept {
                if !cqueue::more(flags) {
                    proxy.accept();
                }
                if res >= 0 {
                    proxy.accepted(res);
                }
                continue;
            }
            proxy.completed(op, slot, res);
        }
    }
}
