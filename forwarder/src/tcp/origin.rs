//! Choosing and connecting to an origin.
//!
//! The first origin tried is the app's consistent table's pick (`lb`) for a hash
//! of the client address, then the other selectable origins round the list, so
//! one client always lands on the same origin while it is up, and clients spread
//! by weight. The hash covers the address only (not the port): every connection
//! of a client goes to the same origin, as sticky as Spectrum's.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::config::App;
use crate::lb::Selection;
use crate::telemetry::events::status;

/// 64-bit FNV-1a.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The hash of a client address (IPv4-mapped IPv6 counts as IPv4).
pub fn client_hash(client: IpAddr) -> u64 {
    match client {
        IpAddr::V4(v4) => fnv1a(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => fnv1a(&v4.octets()),
            None => fnv1a(&v6.octets()),
        },
    }
}

/// The origins to try for a client that dialled `edge_port`, in order, as
/// (offset among the app's origins, address): `selection`'s order for the
/// client's hash (its consistent table's pick first).
pub fn candidates(
    app: &App,
    selection: &Selection,
    client: IpAddr,
    edge_port: u16,
) -> Vec<(usize, SocketAddr)> {
    selection
        .order(client_hash(client))
        .into_iter()
        .filter_map(|offset| {
            let origin = app.origins.get(offset)?;
            Some((
                offset,
                SocketAddr::new(origin.addr, app.origin_port(origin, edge_port)),
            ))
        })
        .collect()
}

/// Why connecting to an origin failed, as a Spectrum status code.
pub fn connect_error_status(err: &io::Error) -> u16 {
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => status::ORIGIN_REFUSED,
        Some(libc::ETIMEDOUT) => status::ORIGIN_CONNECT_TIMEOUT,
        Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN) => {
            status::ORIGIN_UNREACHABLE
        }
        _ if err.kind() == io::ErrorKind::TimedOut => status::ORIGIN_CONNECT_TIMEOUT,
        _ => status::ORIGIN_UNKNOWN_ERROR,
    }
}

/// Connects to `origin` within `timeout`. The error carries its status code.
pub async fn connect(origin: SocketAddr, timeout: Duration) -> Result<TcpStream, (u16, io::Error)> {
    connect_clamped(origin, timeout, None).await
}

/// As [`connect`], with the MSS of the connection clamped to `mss` (`TCP_MAXSEG`
/// before connect: the SYN offers at most that, and no segment either way is
/// larger). The XDP splice does not resize segments, so the origin leg must carry
/// nothing the client leg could not (docs/tcp.md, XDP splice).
pub async fn connect_clamped(
    origin: SocketAddr,
    timeout: Duration,
    mss: Option<u32>,
) -> Result<TcpStream, (u16, io::Error)> {
    match tokio::time::timeout(timeout, connect_nonblocking(origin, mss)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(err)) => Err((connect_error_status(&err), err)),
        Err(_) => Err((
            status::ORIGIN_CONNECT_TIMEOUT,
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ),
        )),
    }
}

/// A non-blocking connect that reads `SO_ERROR` only when the socket reports an
/// error (tokio's `TcpSocket::connect` reads it every time: one syscall more per
/// connection, and this runs once per proxied connection).
async fn connect_nonblocking(origin: SocketAddr, mss: Option<u32>) -> io::Result<TcpStream> {
    let socket = socket(origin, mss, true)?;
    match socket.connect(&origin.into()) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(err) => return Err(err),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    // Writable once established; a failed connect (refused, unreachable) is
    // reported as an error or hang-up, and only then is its error read.
    let ready = stream.ready(Interest::WRITABLE).await?;
    if (ready.is_error() || ready.is_write_closed())
        && let Some(err) = stream.take_error()?
    {
        return Err(err);
    }
    Ok(stream)
}

/// A socket for a connection to `origin`: `TCP_NODELAY` (the proxy adds no Nagle
/// delay to what the endpoints segmented), its MSS clamped to `mss` when given,
/// non-blocking or not (the io_uring engine drives blocking sockets).
pub fn socket(origin: SocketAddr, mss: Option<u32>, nonblocking: bool) -> io::Result<Socket> {
    let kind = match nonblocking {
        true => Type::STREAM.nonblocking(),
        false => Type::STREAM,
    };
    let socket = Socket::new(
        Domain::for_address(origin),
        kind.cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    if let Some(mss) = mss {
        socket.set_tcp_mss(mss)?;
    }
    Ok(socket)
}

/// `TCP_MAXSEG` of a socket: its current MSS (connected) or the clamp (set).
pub fn maxseg(sock: &impl std::os::fd::AsRawFd) -> io::Result<u32> {
    super::repair::getsockopt_u32(sock.as_raw_fd(), libc::TCP_MAXSEG)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Origin, PortRange, Protocol, ProxyProtocol};

    fn app(origins: &[&str], ports: (u16, u16)) -> App {
        App {
            id: "t".into(),
            protocol: Protocol::Tcp,
            ports: PortRange::new(ports.0, ports.1).unwrap(),
            edge_ips: vec![],
            origins: origins
                .iter()
                .map(|o| Origin::parse_url(o).unwrap().1)
                .collect::<Vec<Origin>>(),
            proxy_protocol: ProxyProtocol::Off,
            ip_firewall: true,
            udp_new_flows_per_second: None,
            health_check: None,
            tls: Default::default(),
            tcp_fastpath: Default::default(),
        }
    }

    #[test]
    fn fnv_known_values() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn mapped_and_plain_ipv4_hash_alike() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_hash(v4), client_hash(mapped));
    }

    #[test]
    fn candidates_follow_the_table_and_map_ports_by_offset() {
        let a = app(
            &[
                "tcp://10.0.0.1:8100-8199",
                "tcp://10.0.0.2:9100-9199",
                "tcp://[fd00::3]:100-199",
            ],
            (8000, 8099),
        );
        let selection = Selection::new(&a, &Default::default());
        let client: IpAddr = "10.0.1.2".parse().unwrap();
        let list = candidates(&a, &selection, client, 8099);
        let all: Vec<SocketAddr> = vec![
            "10.0.0.1:8199".parse().unwrap(),
            "10.0.0.2:9199".parse().unwrap(),
            "[fd00::3]:199".parse().unwrap(),
        ];
        let order = selection.order(client_hash(client));
        assert_eq!(list.len(), 3);
        for (k, &offset) in order.iter().enumerate() {
            assert_eq!(list[k], (offset, all[offset]));
        }
        // Stable for one client; different clients spread.
        assert_eq!(candidates(&a, &selection, client, 8099), list);
        let firsts: std::collections::BTreeSet<SocketAddr> = (1..=60u8)
            .map(|i| candidates(&a, &selection, IpAddr::from([10, 0, 1, i]), 8000)[0].1)
            .collect();
        assert_eq!(firsts.len(), 3, "60 clients use all three origins");
    }

    #[test]
    fn connect_errors_map_to_spectrum_codes() {
        let e = |code| io::Error::from_raw_os_error(code);
        assert_eq!(connect_error_status(&e(libc::ECONNREFUSED)), 521);
        assert_eq!(connect_error_status(&e(libc::ETIMEDOUT)), 522);
        assert_eq!(connect_error_status(&e(libc::EHOSTUNREACH)), 523);
        assert_eq!(connect_error_status(&e(libc::ENETUNREACH)), 523);
        assert_eq!(connect_error_status(&e(libc::EACCES)), 520);
    }

    #[tokio::test]
    async fn connect_refused_and_timeout() {
        // A port nobody listens on, on loopback: refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = connect(addr, Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(err.0, 521);
        // Accepted.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ok = connect(listener.local_addr().unwrap(), Duration::from_secs(2)).await;
        assert!(ok.is_ok());
    }

    #[tokio::test]
    async fn a_clamped_connection_carries_segments_no_larger_than_the_clamp() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = connect_clamped(addr, Duration::from_secs(5), Some(1000))
            .await
            .unwrap();
        let (accepted, _) = listener.accept().unwrap();
        // Loopback's MTU would give ~65000; the SYN offered 1000 at most.
        assert!(
            maxseg(&accepted).unwrap() <= 1000,
            "{}",
            maxseg(&accepted).unwrap()
        );
        assert!(maxseg(&stream).unwrap() <= 1000);
        let unclamped = connect(addr, Duration::from_secs(5)).await.unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(maxseg(&accepted).unwrap() > 1000);
        drop(unclamped);
    }
}
