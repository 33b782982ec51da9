//! Deterministic pseudo-random bytes and a running checksum over a byte stream, for
//! the integration tests' bulk transfers (gigabytes each way through the proxy).
//!
//! A crate of its own so that the workspace can build it optimised in test builds
//! (`[profile.dev.package.forwarder-testbytes]`): unoptimised, filling and summing
//! cost more CPU than the transfer they check. Nothing here is `#[inline]` or
//! generic, so callers run this crate's optimised code.

/// Deterministic pseudo-random bytes (xorshift64*), 8 at a time.
pub struct Stream64(u64);

impl Stream64 {
    pub fn new(seed: u64) -> Self {
        Stream64(seed | 1)
    }

    /// The next `buf.len()` bytes of the stream. The stream advances by a whole
    /// word per 8 bytes or part of them: only a last call may end mid-word.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A 64-bit checksum over a byte stream fed in pieces of any size (FNV-1a-like over
/// 8-byte little-endian words; a last partial word is zero-padded at `finish`).
#[derive(Default)]
pub struct Sum64 {
    hash: u64,
    pending: [u8; 8],
    pending_len: usize,
    /// Bytes fed so far.
    pub len: u64,
}

impl Sum64 {
    pub fn new() -> Self {
        Sum64 {
            hash: 0xcbf2_9ce4_8422_2325,
            pending: [0; 8],
            pending_len: 0,
            len: 0,
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.pending_len > 0 {
            let take = (8 - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len < 8 {
                // `data` is used up: the word waits for more.
                return;
            }
            self.word(u64::from_le_bytes(self.pending));
            self.pending_len = 0;
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.word(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    fn word(&mut self, w: u64) {
        self.hash ^= w;
        self.hash = self
            .hash
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(17);
    }

    /// The checksum and the number of bytes fed.
    pub fn finish(mut self) -> (u64, u64) {
        if self.pending_len > 0 {
            let mut word = [0u8; 8];
            word[..self.pending_len].copy_from_slice(&self.pending[..self.pending_len]);
            self.word(u64::from_le_bytes(word));
        }
        (self.hash, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        Stream64::new(seed).fill(&mut v);
        v
    }

    #[test]
    fn the_sum_does_not_depend_on_how_the_stream_is_cut() {
        let data = bytes(7, 10_003);
        let mut whole = Sum64::new();
        whole.update(&data);
        let whole = whole.finish();
        for cut in [1, 3, 7, 8, 9, 1000, 4097] {
            let mut pieces = Sum64::new();
            for piece in data.chunks(cut) {
                pieces.update(piece);
            }
            assert_eq!(pieces.finish(), whole, "pieces of {cut}");
        }
        assert_eq!(whole.1, 10_003);
    }

    #[test]
    fn a_changed_swapped_or_missing_byte_changes_the_sum() {
        let data = bytes(9, 4096);
        let sum = |d: &[u8]| {
            let mut s = Sum64::new();
            s.update(d);
            s.finish()
        };
        let good = sum(&data);
        let mut flipped = data.clone();
        flipped[1234] ^= 1;
        assert_ne!(sum(&flipped), good);
        let mut swapped = data.clone();
        swapped.swap(100, 3000);
        assert_ne!(sum(&swapped), good);
        assert_ne!(sum(&data[..4095]), good);
    }

    #[test]
    fn streams_are_deterministic_per_seed_and_differ_between_seeds() {
        assert_eq!(bytes(1, 64), bytes(1, 64));
        assert_ne!(bytes(1, 64), bytes(2, 64));
        // Filled in pieces of whole words, the stream is the same as in one go.
        let mut s = Stream64::new(3);
        let mut v = vec![0u8; 64];
        s.fill(&mut v[..16]);
        s.fill(&mut v[16..]);
        assert_eq!(v, bytes(3, 64));
    }
}
