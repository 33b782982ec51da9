//! The receive buffers of the io_uring engine: a provided-buffer ring
//! (`IORING_REGISTER_PBUF_RING`). A receive names the group, not a buffer; the
//! kernel takes one only when bytes arrive, so an idle connection holds none. A
//! buffer goes back to the ring once its bytes are sent.
//!
//! Buffers are allocated as the load asks for them (a batch when few are left in
//! the ring), up to [`MAX_BUFFERS`], and are kept: memory follows the peak of
//! bytes in flight, not the number of connections.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::{IoUring, cqueue};

/// Bytes per buffer: what one receive reads at most.
pub(super) const BUFFER_LEN: usize = 256 * 1024;
/// Entries of the ring, and so the most buffers (32768 is the kernel's limit).
pub(super) const MAX_BUFFERS: usize = 4_096;
/// Buffers allocated at once when the ring runs low.
const BATCH: usize = 256;
/// The ring is topped up when it holds fewer buffers than this.
const LOW: usize = 64;
/// The buffer group the engine's receives name.
pub(super) const GROUP: u16 = 0;

/// A buffer id, as the kernel reports it in a completion.
pub(super) type BufferId = u16;

pub(super) struct Buffers {
    /// The ring's entries (page-aligned, `max` of them), shared with the kernel.
    ring: *mut BufRingEntry,
    /// Entries of the ring and the most buffers (a power of two).
    max: usize,
    /// Our copy of the tail: the next entry to fill.
    tail: u16,
    /// Every buffer allocated, by id.
    buffers: Vec<Box<[u8]>>,
    /// Buffers in the ring now (the kernel takes them from there).
    in_ring: usize,
}

impl Buffers {
    /// Registers an empty ring of `max` entries (a power of two, at most
    /// [`MAX_BUFFERS`]) with `ring` and puts a first batch in it.
    pub(super) fn register(ring: &IoUring, max: usize) -> io::Result<Buffers> {
        if !max.is_power_of_two() || max > MAX_BUFFERS {
            return Err(io::Error::other(format!(
                "{max} buffers: not a power of two up to {MAX_BUFFERS}"
            )));
        }
        let bytes = max * std::mem::size_of::<BufRingEntry>();
        // SAFETY: an anonymous private mapping; checked below.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut buffers = Buffers {
            ring: mem.cast(),
            max,
            tail: 0,
            buffers: Vec::new(),
            in_ring: 0,
        };
        // SAFETY: the mapping is page-aligned, zeroed, `max` entries long, and
        // lives as long as `buffers` (which the engine drops after the ring).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(mem as u64, max as u16, GROUP, 0)?;
        }
        buffers.top_up();
        Ok(buffers)
    }

    /// Allocates a batch of buffers into the ring when it runs low (and the limit
    /// allows). Whether the ring now holds any.
    pub(super) fn top_up(&mut self) -> bool {
        if self.in_ring < LOW {
            let more = BATCH.min(self.max - self.buffers.len());
            for _ in 0..more {
                let id = self.buffers.len() as BufferId;
                self.buffers.push(vec![0; BUFFER_LEN].into());
                self.give(id);
            }
        }
        self.in_ring > 0
    }

    /// Buffers in the ring, free for the kernel to fill.
    pub(super) fn free(&self) -> usize {
        self.in_ring
    }

    /// The buffer a completion says the kernel filled (taken out of the ring).
    pub(super) fn taken(&mut self, flags: u32) -> Option<BufferId> {
        let id = cqueue::buffer_select(flags)?;
        self.in_ring = self.in_ring.saturating_sub(1);
        Some(id)
    }

    /// The bytes of buffer `id`.
    pub(super) fn get(&self, id: BufferId) -> &[u8] {
        &self.buffers[usize::from(id)]
    }

    /// Puts buffer `id` back in the ring.
    pub(super) fn give(&mut self, id: BufferId) {
        let Some(buffer) = self.buffers.get_mut(usize::from(id)) else {
            return;
        };
        let mask = self.max - 1;
        // SAFETY: `tail & mask` is within the ring's MAX_BUFFERS entries; the kernel
        // reads an entry only once the tail below has moved past it.
        unsafe {
            let entry = &mut *self.ring.add(usize::from(self.tail) & mask);
            entry.set_addr(buffer.as_mut_ptr() as u64);
            entry.set_len(BUFFER_LEN as u32);
            entry.set_bid(id);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the ring's tail field (in its first entry), written with release
        // ordering so the kernel sees the entry before the tail.
        unsafe {
            let tail = BufRingEntry::tail(self.ring).cast_mut().cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
        self.in_ring += 1;
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `register`; the ring that used it is gone
        // (the engine drops its `IoUring` first).
        unsafe {
            libc::munmap(
                self.ring.cast(),
                self.max * std::mem::size_of::<BufRingEntry>(),
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    use io_uring::{opcode, squeue, types};

    use super::*;

    /// A receive from `fd` into a buffer of the group; its (result, buffer).
    fn recv(
        ring: &mut IoUring,
        buffers: &mut Buffers,
        fd: &impl AsRawFd,
    ) -> (i32, Option<BufferId>) {
        let entry = opcode::Recv::new(types::Fd(fd.as_raw_fd()), std::ptr::null_mut(), 64)
            .buf_group(GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(7);
        // SAFETY: the entry points at no memory of ours.
        unsafe { ring.submission().push(&entry).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let c = ring.completion().next().unwrap();
        assert_eq!(c.user_data(), 7);
        (c.result(), buffers.taken(c.flags()))
    }

    fn pair(bytes: &[u8]) -> (OwnedFd, UnixStream) {
        let (a, mut b) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut b, bytes).unwrap();
        (a.into(), b)
    }

    #[test]
    fn the_kernel_fills_given_buffers_and_reports_none_left() {
        let mut ring = IoUring::new(8).unwrap();
        let mut buffers = Buffers::register(&ring, 2).unwrap();
        let (a1, _b1) = pair(b"one");
        let (a2, _b2) = pair(b"two");
        let (a3, _b3) = pair(b"three");

        let (n1, id1) = recv(&mut ring, &mut buffers, &a1);
        let (n2, id2) = recv(&mut ring, &mut buffers, &a2);
        let (id1, id2) = (id1.unwrap(), id2.unwrap());
        assert_eq!((n1, n2), (3, 3));
        assert_ne!(id1, id2);
        assert_eq!(&buffers.get(id1)[..3], b"one");
        assert_eq!(&buffers.get(id2)[..3], b"two");

        // Both buffers are out and the limit is reached: nothing to receive into.
        assert_eq!(recv(&mut ring, &mut buffers, &a3), (-libc::ENOBUFS, None));
        assert!(!buffers.top_up());

        // One comes back: the waiting receive gets it, with its own bytes.
        buffers.give(id1);
        let (n3, id3) = recv(&mut ring, &mut buffers, &a3);
        assert_eq!((n3, id3), (5, Some(id1)));
        assert_eq!(&buffers.get(id1)[..5], b"three");
    }

    #[test]
    fn buffers_are_allocated_as_the_ring_runs_low() {
        let ring = IoUring::new(8).unwrap();
        let mut buffers = Buffers::register(&ring, 1024).unwrap();
        assert_eq!(buffers.buffers.len(), BATCH);
        // Taken out down to the low mark: the next top-up adds a batch.
        buffers.in_ring = LOW - 1;
        assert!(buffers.top_up());
        assert_eq!(buffers.buffers.len(), 2 * BATCH);
        assert!(Buffers::register(&ring, 3).is_err());
    }
}
