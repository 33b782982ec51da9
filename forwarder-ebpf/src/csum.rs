//! Internet checksum arithmetic (RFC 1071/1624) for rewritten packets. Sums are kept
//! unfolded in a u64 and folded once at the end.

use aya_ebpf::{bindings::xdp_md, helpers::bpf_csum_diff, programs::XdpContext};

use crate::{
    addr,
    parse::{ptr_at, ptr_at_mut, read_be16},
};

/// Folds a running sum to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Sum of the big-endian 16-bit words of `bytes` (an even, constant length).
#[inline(always)]
pub const fn sum_words<const N: usize>(bytes: &[u8; N]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u64;
        i += 2;
    }
    sum
}

/// The ones' complement negation of a sum below 2^48: adding it subtracts the sum.
/// (2^48 − 1 is 0 in ones' complement arithmetic, as 2^16 ≡ 1 modulo 0xffff, so no
/// fold is needed.)
#[inline(always)]
pub fn negate(sum: u64) -> u64 {
    0xffff_ffff_ffff - sum
}

/// Combines a sum of big-endian words and a sum of words read in the CPU's byte
/// order: the folded ones' complement sum of little-endian words is the
/// byte-swapped sum of big-endian ones (RFC 1071 §2(B)).
#[inline(always)]
pub fn combine(be: u64, native: u64) -> u64 {
    be + fold(native).swap_bytes() as u64
}

/// The checksum field value for a final sum.
#[inline(always)]
pub fn finish(sum: u64) -> u16 {
    !fold(sum)
}

/// Sum in the CPU's byte order of 16-bit words (see `combine`).
#[inline(always)]
pub fn native_words<const N: usize>(words: &[u16; N]) -> u64 {
    let mut native = 0u64;
    let mut i = 0;
    while i < N {
        native += words[i] as u64;
        i += 1;
    }
    native
}

/// Sum of a whole 16-byte address in the CPU's byte order (see `combine`).
#[inline(always)]
pub fn native_addr(a: &[u8; 16]) -> u64 {
    let w = addr::u32s(a);
    w[0] as u64 + w[1] as u64 + w[2] as u64 + w[3] as u64
}

/// Sum of the IPv4 part of an IPv4-mapped address in the CPU's byte order.
#[inline(always)]
pub fn native_addr_v4(a: &[u8; 16]) -> u64 {
    addr::v4(a) as u64
}

/// Sum in the CPU's byte order of the addresses of a datagram of `family`, as its
/// pseudo-header counts them (IPv4-mapped addresses by their IPv4 part only).
#[inline(always)]
pub fn native_addrs(family: u8, src: &[u8; 16], dst: &[u8; 16]) -> u64 {
    if family == 4 {
        native_addr_v4(src) + native_addr_v4(dst)
    } else {
        native_addr(src) + native_addr(dst)
    }
}

/// Sum of the UDP pseudo-header for either family (addresses as 16 bytes;
/// IPv4-mapped addresses contribute only their IPv4 part, as `0xffff` pairs would
/// otherwise be added).
#[inline(always)]
pub fn pseudo_header(family: u8, src: &[u8; 16], dst: &[u8; 16], udp_len: u16) -> u64 {
    transport_pseudo_header(17, family, src, dst, udp_len)
}

/// As `pseudo_header`, for transport protocol `proto` (TCP or UDP) and segment
/// length `len` (IPv6 uses a 32-bit length; the upper half is 0).
#[inline(always)]
pub fn transport_pseudo_header(
    proto: u8,
    family: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    len: u16,
) -> u64 {
    combine(proto as u64 + len as u64, native_addrs(family, src, dst))
}

/// Bytes summed per `bpf_csum_diff` call (the helper takes at most 512).
const CHUNK: usize = 256;
/// Longest UDP segment whose checksum the program computes from scratch: more than
/// any linear XDP frame holds (native XDP without multi-buffer stays below 4 KiB).
pub const MAX_SUMMED_SEGMENT: usize = 16 * CHUNK;

/// Whether a UDP checksum field holds only the folded pseudo-header sum, as a
/// same-host sender with checksum offload leaves it (`CHECKSUM_PARTIAL`). A full
/// checksum equal to that value by chance (1 in 65536) is recomputed from the
/// payload too, which is merely slower.
#[inline(always)]
pub fn is_partial(field: u16, pseudo_header_sum: u64) -> bool {
    field == fold(pseudo_header_sum)
}

/// Completes the transport checksum of the segment at `l4` (`len` bytes; the field
/// at `l4 + field`: 6 for UDP, 16 for TCP), whose field holds only the
/// pseudo-header sum (the caller checked: see `is_partial`): the segment's sum with
/// that field in place is the full sum, written into the frame.
/// Returns false when the segment could not be summed (longer than
/// `MAX_SUMMED_SEGMENT`).
///
/// Not inlined on purpose: a BPF subprogram, so the verifier's many paths through
/// the summing loop end at its return instead of multiplying the rest of the
/// program.
#[inline(never)]
pub fn complete_partial(ctx: *mut xdp_md, l4: usize, len: usize, field: usize) -> bool {
    let ctx = XdpContext::new(ctx);
    let l4 = l4 & 0xfff;
    let Some(sum) = segment_sum(&ctx, l4, len) else {
        return false;
    };
    let checksum = match !sum {
        0 => 0xffff,
        c => c,
    };
    let Some(field) = ptr_at_mut::<[u8; 2]>(&ctx, l4 + (field & 0x1f)) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at_mut; packet memory, exclusively ours.
    unsafe { *field = u16::to_be_bytes(checksum) };
    true
}

/// Ones' complement sum (big-endian words, folded) of `len` bytes of the packet at
/// `start`: the whole UDP segment of a partial-checksum frame. The checksum field
/// of such a frame holds the pseudo-header sum, so the complement of this sum is
/// the full checksum. `None` when the bytes are not all in the frame or `len`
/// exceeds `MAX_SUMMED_SEGMENT`.
#[inline(always)]
fn segment_sum(ctx: &XdpContext, start: usize, len: usize) -> Option<u16> {
    if len > MAX_SUMMED_SEGMENT {
        return None;
    }
    let start = start & 0xfff;
    // bpf_csum_diff sums memory in the CPU's byte order; folded, that is the
    // big-endian sum byte-swapped (RFC 1071 §2(B)).
    let mut native = 0u64;
    let mut off = 0usize;
    for _ in 0..MAX_SUMMED_SEGMENT / CHUNK {
        if len - off < CHUNK {
            break;
        }
        native += chunk_sum::<CHUNK>(ctx, start + off)?;
        off += CHUNK;
    }
    // The rest (< 256 bytes): one constant-size chunk per bit of its length.
    let rest = len - off;
    if rest & 128 != 0 {
        native += chunk_sum::<128>(ctx, start + off)?;
        off += 128;
    }
    if rest & 64 != 0 {
        native += chunk_sum::<64>(ctx, start + off)?;
        off += 64;
    }
    if rest & 32 != 0 {
        native += chunk_sum::<32>(ctx, start + off)?;
        off += 32;
    }
    if rest & 16 != 0 {
        native += chunk_sum::<16>(ctx, start + off)?;
        off += 16;
    }
    if rest & 8 != 0 {
        native += chunk_sum::<8>(ctx, start + off)?;
        off += 8;
    }
    if rest & 4 != 0 {
        native += chunk_sum::<4>(ctx, start + off)?;
        off += 4;
    }
    let mut sum = fold(native).swap_bytes() as u64;
    if rest & 2 != 0 {
        sum += read_be16(ctx, start + off)? as u64;
        off += 2;
    }
    if rest & 1 != 0 {
        let p = ptr_at::<u8>(ctx, start + off)?;
        // SAFETY: bounds checked by ptr_at. The odd byte is the high half of a word.
        sum += (unsafe { *p } as u64) << 8;
    }
    Some(fold(sum))
}

/// `bpf_csum_diff` over `N` bytes (a multiple of 4) of the packet at `offset`.
#[inline(always)]
fn chunk_sum<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<u64> {
    let p = ptr_at::<[u8; N]>(ctx, offset & 0x1fff)?;
    // SAFETY: the helper reads N bytes that ptr_at proved are inside the packet.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p as *mut u32, N as u32, 0) };
    Some(sum as u32 as u64)
}
