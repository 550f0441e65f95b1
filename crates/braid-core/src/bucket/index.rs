//! A hot segment's hash index: key hash → the newest event with that hash.
//!
//! Open addressing with linear probing over one `u64` per key hash: the hash's low half
//! above the ordinal of the chain's head. A lookup is one cache line of the table (the
//! standard map took two: its control bytes, then its entries) and the table is half
//! the size. The high half of each hash is kept in its head's slot, read only when the
//! low halves agree, so that two hashes are one key only when all 64 bits are equal.

use super::NO_SLOT;
use crate::cache::prefetch;

/// No chain: the head is [`NO_SLOT`].
const EMPTY: u64 = u64::MAX;
/// The table doubles when a key would fill more than this fraction of it. Most
/// lookups miss (a key is in one of the segments probed at most), and a miss reads on
/// to an empty entry: about 2.5 entries at 1/2, 8.5 at 3/4, so that it mostly stays
/// within the one cache line prefetched.
const LOAD_NUMERATOR: usize = 1;
const LOAD_DENOMINATOR: usize = 2;
const CAPACITY_MIN: usize = 16;
/// Bytes of one table entry.
pub(super) const ENTRY_BYTES: usize = std::mem::size_of::<u64>();

#[derive(Default)]
pub(super) struct KeyIndex {
    /// A power of two long, or empty.
    entries: Vec<u64>,
    len: usize,
}

#[inline]
fn entry(hash: u64, head: u32) -> u64 {
    (hash & 0xffff_ffff) << 32 | u64::from(head)
}

#[inline]
fn head_of(entry: u64) -> u32 {
    entry as u32
}

#[inline]
fn low_of(entry: u64) -> u32 {
    (entry >> 32) as u32
}

impl KeyIndex {
    /// Distinct key hashes.
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn memory_bytes(&self) -> usize {
        self.entries.capacity() * ENTRY_BYTES
    }

    /// Where `hash`'s chain is, or the empty entry where it would go. `high` gives the
    /// high half of the hash of the chain that `head` starts.
    #[inline]
    fn position(&self, hash: u64, high: impl Fn(u32) -> u32) -> usize {
        let mask = self.entries.len() - 1;
        let mut at = hash as usize & mask;
        loop {
            let e = self.entries[at];
            if e == EMPTY || (low_of(e) == hash as u32 && high(head_of(e)) == (hash >> 32) as u32) {
                return at;
            }
            at = (at + 1) & mask;
        }
    }

    /// The head of `hash`'s chain, or [`NO_SLOT`].
    #[inline]
    pub fn get(&self, hash: u64, high: impl Fn(u32) -> u32) -> u32 {
        if self.entries.is_empty() {
            return NO_SLOT;
        }
        head_of(self.entries[self.position(hash, high)])
    }

    /// Makes `head` the head of `hash`'s chain; returns the head it had ([`NO_SLOT`]
    /// for a new hash).
    #[inline]
    pub fn replace(&mut self, hash: u64, head: u32, high: impl Fn(u32) -> u32) -> u32 {
        debug_assert!(head != NO_SLOT);
        if (self.len + 1) * LOAD_DENOMINATOR > self.entries.len() * LOAD_NUMERATOR {
            self.grow();
        }
        let at = self.position(hash, high);
        let before = head_of(self.entries[at]);
        if before == NO_SLOT {
            self.len += 1;
        }
        self.entries[at] = entry(hash, head);
        before
    }

    /// Makes room for `keys` hashes without growing.
    pub fn reserve(&mut self, keys: usize) {
        if self.entries.is_empty() && keys > 0 {
            let capacity = (keys * LOAD_DENOMINATOR / LOAD_NUMERATOR + 1)
                .next_power_of_two()
                .max(CAPACITY_MIN);
            self.entries = vec![EMPTY; capacity];
        }
        while keys * LOAD_DENOMINATOR > self.entries.len() * LOAD_NUMERATOR {
            self.grow();
        }
    }

    /// Doubles the table. An entry's place depends only on its low half, which the
    /// entry holds: no slot is read.
    fn grow(&mut self) {
        let capacity = (self.entries.len() * 2).max(CAPACITY_MIN);
        let old = std::mem::replace(&mut self.entries, vec![EMPTY; capacity]);
        let mask = capacity - 1;
        for e in old.into_iter().filter(|&e| e != EMPTY) {
            let mut at = low_of(e) as usize & mask;
            while self.entries[at] != EMPTY {
                at = (at + 1) & mask;
            }
            self.entries[at] = e;
        }
    }

    /// (low half of the hash, head) of every chain.
    pub fn chains(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.entries
            .iter()
            .filter(|&&e| e != EMPTY)
            .map(|&e| (low_of(e), head_of(e)))
    }

    /// Asks the processor to fetch the table entry where a lookup of `hash` starts, so
    /// that a lookup a few events later finds it in cache.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        if self.entries.is_empty() {
            return;
        }
        let at = hash as usize & (self.entries.len() - 1);
        prefetch(&self.entries[at]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The index against a map, with hashes that share their low or high halves (the
    /// cases the two-part compare must tell apart).
    #[test]
    fn agrees_with_a_map_on_hashes_sharing_halves() {
        let mut index = KeyIndex::default();
        let mut model: HashMap<u64, u32> = HashMap::new();
        // high half of each chain's hash, by head (the slots' role)
        let mut highs: Vec<u32> = Vec::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..20_000u32 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let hash = match i % 4 {
                0 => x,
                1 => x & 0xffff_ffff | 7 << 32, // same high half, low varies
                2 => (x & !0xffff_ffff) | 3,    // same low half, high varies
                _ => [5u64, 3, 7 << 32 | 3][(x % 3) as usize],
            };
            highs.push((hash >> 32) as u32);
            let before = index.replace(hash, i, |h| highs[h as usize]);
            assert_eq!(
                before,
                model.insert(hash, i).unwrap_or(NO_SLOT),
                "hash {hash:#x}"
            );
            // the old head's slot now chains from the new one: its high half is the same
        }
        assert_eq!(index.len(), model.len());
        for (&hash, &head) in &model {
            assert_eq!(index.get(hash, |h| highs[h as usize]), head);
        }
        assert_eq!(
            index.get(0xdead_beef_0000_0001, |h| highs[h as usize]),
            NO_SLOT
        );
        let mut chains: Vec<(u32, u32)> = index.chains().collect();
        let mut expected: Vec<(u32, u32)> = model.iter().map(|(&k, &v)| (k as u32, v)).collect();
        chains.sort_unstable();
        expected.sort_unstable();
        assert_eq!(chains, expected);
        assert!(index.memory_bytes() * LOAD_NUMERATOR >= model.len() * LOAD_DENOMINATOR * 8);
    }
}
