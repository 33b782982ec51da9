//! Internet checksum arithmetic (RFC 1071/1624) for rewritten packets. Sums are kept
//! unfolded in a u64 and folded once at the end.

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
pub fn sum_words<const N: usize>(bytes: &[u8; N]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u64;
        i += 2;
    }
    sum
}

/// The ones' complement negation of a sum: adding it subtracts the sum.
#[inline(always)]
pub fn negate(sum: u64) -> u64 {
    (!fold(sum)) as u64
}

/// The checksum field value for a final sum.
#[inline(always)]
pub fn finish(sum: u64) -> u16 {
    !fold(sum)
}

/// IPv4 header checksum of a 20-byte header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_header(header: &[u8; 20]) -> u16 {
    finish(sum_words(header))
}

/// Sum of the UDP pseudo-header for either family (addresses as 16 bytes;
/// IPv4-mapped addresses contribute only their IPv4 part, as `0xffff` pairs would
/// otherwise be added).
#[inline(always)]
pub fn pseudo_header(family: u8, src: &[u8; 16], dst: &[u8; 16], udp_len: u16) -> u64 {
    let addrs = if family == 4 {
        sum_words(&[src[12], src[13], src[14], src[15]])
            + sum_words(&[dst[12], dst[13], dst[14], dst[15]])
    } else {
        sum_words(src) + sum_words(dst)
    };
    // Protocol 17 and the UDP length (IPv6 uses a 32-bit length; the upper half is 0).
    addrs + 17 + udp_len as u64
}
