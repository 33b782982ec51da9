//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted.
//!
//! Each origin gets a permutation of the table's slots from a hash of its
//! identity (its address and port, never its position in the config), and the
//! origins take turns claiming their next preferred free slot until the table is
//! full. Removing an origin frees only its slots, which the others then claim:
//! clients of the other origins mostly stay where they were. The same origins
//! give the same table on every host, whatever their order in the config.
//!
//! Weights: in each turn an origin gains its weight in credit and claims one slot
//! per `max weight` of credit, so slot counts are proportional to weights.

use crate::tcp::origin::fnv1a;

/// One origin taking part in a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// What the table holds for this origin's slots (its offset among the app's
    /// origins).
    pub offset: u16,
    /// The identity its permutation is derived from (`Origin::label`).
    pub identity: String,
    /// > 0.
    pub weight: u32,
}

/// Builds a table of `size` slots (a prime) over `members` (not empty, weights
/// above 0). Every slot holds some member's offset.
pub fn build(members: &[Member], size: u32) -> Vec<u16> {
    const EMPTY: u32 = u32::MAX;
    let size_usize = size as usize;
    if members.is_empty() || size == 0 {
        return Vec::new();
    }
    // Turns go in the order of identities, so the config's order of origins does
    // not matter either.
    let mut sorted: Vec<&Member> = members.iter().collect();
    sorted.sort_by(|a, b| a.identity.cmp(&b.identity));
    let members = sorted;
    let permutations: Vec<(u64, u64)> = members
        .iter()
        .map(|m| {
            let offset = seeded(b"maglev-offset", &m.identity) % u64::from(size);
            let skip = seeded(b"maglev-skip", &m.identity) % u64::from(size - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = members.iter().map(|m| m.weight).max().unwrap_or(1).max(1);
    let mut slots = vec![EMPTY; size_usize];
    let mut next = vec![0u64; members.len()];
    let mut credit = vec![0u32; members.len()];
    let mut filled = 0usize;
    while filled < size_usize {
        for (i, member) in members.iter().enumerate() {
            credit[i] += member.weight;
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            let (offset, skip) = permutations[i];
            // A permutation of a prime-sized table visits every slot: a free one
            // turns up within `size` steps.
            loop {
                let slot = ((offset + next[i] * skip) % u64::from(size)) as usize;
                next[i] += 1;
                if slots[slot] == EMPTY {
                    slots[slot] = i as u32;
                    filled += 1;
                    break;
                }
            }
            if filled == size_usize {
                break;
            }
        }
    }
    slots
        .into_iter()
        .map(|i| members[i as usize].offset)
        .collect()
}

/// FNV-1a of `seed` then `identity`: two independent-enough hashes per origin.
fn seeded(seed: &[u8], identity: &str) -> u64 {
    let mut bytes = Vec::with_capacity(seed.len() + 1 + identity.len());
    bytes.extend_from_slice(seed);
    bytes.push(0);
    bytes.extend_from_slice(identity.as_bytes());
    fnv1a(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use forwarder_common::{flow_hash, maglev_table_size};

    fn members(weights: &[u32]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Member {
                offset: i as u16,
                identity: format!("10.0.{}.{}:27015", i / 200, i % 200 + 1),
                weight,
            })
            .collect()
    }

    /// 10,000 simulated clients (distinct addresses and ports), as the XDP
    /// program hashes them.
    fn clients() -> impl Iterator<Item = u32> {
        (0..10_000u32).map(|i| {
            let mut addr = [0u8; 16];
            addr[10] = 0xff;
            addr[11] = 0xff;
            addr[12..].copy_from_slice(&(0xC633_6400u32 + i * 7919).to_be_bytes());
            flow_hash(&addr, 1024 + (i % 50_000) as u16)
        })
    }

    fn shares(table: &[u16], n: usize) -> Vec<f64> {
        let mut counts = vec![0u32; n];
        let mut total = 0;
        for h in clients() {
            counts[table[(h % table.len() as u32) as usize] as usize] += 1;
            total += 1;
        }
        counts
            .iter()
            .map(|&c| f64::from(c) / f64::from(total))
            .collect()
    }

    #[test]
    fn every_slot_is_taken_and_the_table_is_deterministic() {
        let m = members(&[1, 1, 1]);
        let a = build(&m, 4093);
        assert_eq!(a.len(), 4093);
        assert!(a.iter().all(|&o| o < 3));
        assert_eq!(a, build(&m, 4093), "same members, same table");
    }

    #[test]
    fn weights_are_honoured_within_5_percent_over_10000_clients() {
        for weights in [vec![1, 1], vec![1, 2, 3], vec![3, 1, 1, 5], vec![10, 1]] {
            let m = members(&weights);
            let table = build(&m, maglev_table_size(m.len() as u32));
            let total: u32 = weights.iter().sum();
            for (i, share) in shares(&table, m.len()).into_iter().enumerate() {
                let want = f64::from(weights[i]) / f64::from(total);
                // The table itself is exact to a slot or two.
                let slots = table.iter().filter(|&&o| o as usize == i).count() as f64;
                let slot_share = slots / table.len() as f64;
                assert!(
                    (slot_share - want).abs() <= 0.01 * want,
                    "weights {weights:?}: origin {i} has {slot_share:.4} of the slots, want {want:.4}"
                );
                // Clients: within 5% of the weighted share, plus the sampling
                // noise of 10,000 hashed clients (3 standard deviations).
                let noise = 3.0 * (want * (1.0 - want) / 10_000.0).sqrt();
                assert!(
                    (share - want).abs() <= 0.05 * want + noise,
                    "weights {weights:?}: origin {i} got {share:.3} of the clients, want {want:.3}"
                );
            }
        }
    }

    #[test]
    fn removing_one_of_n_origins_moves_few_more_than_its_clients() {
        for n in [2usize, 3, 5, 10, 40] {
            let all = members(&vec![1; n]);
            let size = maglev_table_size(n as u32);
            let before = build(&all, size);
            let removed = n / 2;
            let rest: Vec<Member> = all
                .iter()
                .filter(|m| m.offset as usize != removed)
                .cloned()
                .collect();
            let after = build(&rest, size);
            let moved = clients()
                .filter(|h| {
                    let slot = (h % size) as usize;
                    before[slot] != after[slot]
                })
                .count();
            let bound = 10_000.0 * (1.0 / n as f64 + 0.02);
            assert!(
                (moved as f64) <= bound,
                "{n} origins: {moved} of 10000 clients moved, bound {bound}"
            );
            assert!(after.iter().all(|&o| o as usize != removed));
        }
    }

    #[test]
    fn the_table_depends_on_identities_not_config_order() {
        let m = members(&[1, 2, 1]);
        let mut reversed = m.clone();
        reversed.reverse();
        let a = build(&m, 4093);
        let b = build(&reversed, 4093);
        // Same identity in every slot (offsets are positions, so compare names).
        let name = |members: &[Member], offset: u16| {
            members
                .iter()
                .find(|m| m.offset == offset)
                .map(|m| m.identity.clone())
        };
        let differ = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| name(&m, **x) != name(&reversed, **y))
            .count();
        assert_eq!(differ, 0, "{differ} slots differ");
    }

    #[test]
    fn a_single_member_takes_every_slot() {
        let m = members(&[7]);
        assert!(build(&m, 4093).iter().all(|&o| o == 0));
        assert!(build(&[], 4093).is_empty());
    }
}
