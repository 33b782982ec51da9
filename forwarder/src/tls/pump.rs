//! One direction of a terminated connection: plaintext read from one side, written
//! to the other, through rustls on the TLS side(s). No zero-copy here: rustls
//! encrypts and decrypts in user space (kTLS would need `CONFIG_TLS`).
//!
//! A peer that closes TCP without TLS's `close_notify` ends its direction like a
//! FIN does (as HAProxy and nginx treat it); end of input sends `close_notify`
//! and then FIN on the TLS side (`shutdown`).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::tcp::splice::Fault;

/// Plaintext moved per read: one TLS record holds at most 16 KiB, and a few
/// records per read keep the syscall count low.
pub const BUFFER_LEN: usize = 64 * 1024;

/// Moves everything `src` yields to `dst` until `src` ends, then shuts `dst`'s
/// sending side; returns the byte count. `on_bytes` sees each chunk's size.
pub async fn forward<R, W>(
    src: &mut R,
    dst: &mut W,
    mut on_bytes: impl FnMut(u64),
) -> Result<u64, Fault>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER_LEN];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Fault::Read(e)),
        };
        on_bytes(n as u64);
        total += n as u64;
        dst.write_all(&buf[..n]).await.map_err(Fault::Write)?;
        dst.flush().await.map_err(Fault::Write)?;
    }
    dst.shutdown().await.map_err(Fault::Write)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forwards_and_shuts_down() {
        let (mut a, mut a_peer) = tokio::io::duplex(1024);
        let (mut b, mut b_peer) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a_peer.write_all(&sent).await.unwrap();
            a_peer.shutdown().await.unwrap();
            a_peer
        });
        let mut seen = 0;
        let moved = forward(&mut a, &mut b, |n| seen += n).await.unwrap();
        assert_eq!(moved, data.len() as u64);
        assert_eq!(seen, moved);
        let mut got = Vec::new();
        b_peer.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "payload differs");
        drop(writer.await.unwrap());
    }
}
