//! Reading a whole hash map in a few system calls (`BPF_MAP_LOOKUP_BATCH`, one
//! call per `CHUNK` entries) instead of two per entry as iteration by key does: the
//! agent reads the UDP flow tables every scan, and under a flood they are full.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use aya::{Pod, maps::MapData};

/// Entries fetched per call. Larger than any hash bucket, so the kernel never
/// answers `ENOSPC` for a bucket that does not fit.
const CHUNK: usize = 8192;

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, value) of the hash map `map` (plain or LRU), read in batches. An
/// entry added or removed while the batches run may be missed or seen; none is
/// seen twice.
pub fn read_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    // SAFETY: Pod types are plain bytes; all-zero is a valid value.
    let zero_key: K = unsafe { std::mem::zeroed() };
    let zero_value: V = unsafe { std::mem::zeroed() };
    let mut keys = vec![zero_key; CHUNK];
    let mut values = vec![zero_value; CHUNK];
    // The hash map's cursor is a bucket index (a u32); 8 bytes leave room.
    let mut cursor = [0u64; 1];
    let mut out = Vec::new();
    let fd = map.fd().as_fd().as_raw_fd();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor.as_ptr() as u64 },
            out_batch: cursor.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        first = false;
        // SAFETY: attr points at buffers of `count` keys and values of the map's
        // sizes (the caller's types are the map's), and a cursor of 8 bytes.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        let got = (attr.count as usize).min(CHUNK);
        out.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        match err {
            None if got > 0 => continue,
            None => return Ok(out),
            // The last batch: the map is read to its end.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) => return Err(e),
        }
    }
}
