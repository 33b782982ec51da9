//! Word views of the 16-byte addresses (IPv4 as `::ffff:a.b.c.d`) the program keeps
//! in its own structs: one home for the cast every sum, copy and lookup key uses.
//!
//! Every such address lives in a field at a 4-byte-aligned offset of a 4-byte-aligned
//! struct (`Packet`, `FlowKey`, `NatKey`, `OriginInfo`), so the casts are aligned;
//! words instead of bytes keep sums, copies and compares short.

/// The address as four 32-bit words (CPU byte order, as they lie in memory).
#[inline(always)]
pub fn u32s(a: &[u8; 16]) -> &[u32; 4] {
    // SAFETY: same size; alignment 4 holds for every caller (see above).
    unsafe { &*(a as *const [u8; 16] as *const [u32; 4]) }
}

/// The IPv4 part of an IPv4-mapped address, as it lies in memory (network order).
#[inline(always)]
pub fn v4(a: &[u8; 16]) -> u32 {
    u32s(a)[3]
}

/// Whether the address is IPv4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    let w = u32s(a);
    w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// The address as eight 16-bit words.
#[inline(always)]
pub fn u16s(a: &[u8; 16]) -> &[u16; 8] {
    // SAFETY: same size; the address is at least 4-byte aligned.
    unsafe { &*(a as *const [u8; 16] as *const [u16; 8]) }
}

/// As `u16s`, to write.
#[inline(always)]
pub fn u16s_mut(a: &mut [u8; 16]) -> &mut [u16; 8] {
    // SAFETY: as in `u16s`.
    unsafe { &mut *(a as *mut [u8; 16] as *mut [u16; 8]) }
}
