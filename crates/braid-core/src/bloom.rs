//! A compact key filter for a spilled segment: a probe for a key the segment cannot hold
//! costs a few memory reads instead of a disk seek. Most probes in the reference workload
//! find nothing, so this is what makes a miss cheap.

/// Bits per key: about 1 % false positives with six probes.
const BLOOM_BITS_PER_KEY: usize = 10;
const BLOOM_PROBES: u32 = 6;

#[derive(Debug)]
pub struct Bloom {
    words: Box<[u64]>,
    mask: u64,
}

impl Bloom {
    pub fn new(keys: usize) -> Bloom {
        let bits = (keys.max(1) * BLOOM_BITS_PER_KEY).next_power_of_two().max(64);
        Bloom {
            words: vec![0; bits / 64].into_boxed_slice(),
            mask: bits as u64 - 1,
        }
    }

    pub fn insert(&mut self, hash: u64) {
        let bits: [u64; BLOOM_PROBES as usize] = std::array::from_fn(|i| self.bit(hash, i as u64));
        for bit in bits {
            self.words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    pub fn may_contain(&self, hash: u64) -> bool {
        (0..u64::from(BLOOM_PROBES)).all(|i| {
            let bit = self.bit(hash, i);
            self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
        })
    }

    pub fn bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// Double hashing (Kirsch–Mitzenmacher): probe `i` is `h1 + i * h2`.
    fn bit(&self, hash: u64, i: u64) -> u64 {
        let h2 = hash.rotate_left(32) | 1;
        hash.wrapping_add(i.wrapping_mul(h2)) & self.mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::hash_key;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let mut bloom = Bloom::new(10_000);
        for i in 0u64..10_000 {
            bloom.insert(hash_key(&i.to_be_bytes()));
        }
        for i in 0u64..10_000 {
            assert!(bloom.may_contain(hash_key(&i.to_be_bytes())));
        }
        let false_positives = (10_000u64..110_000)
            .filter(|i| bloom.may_contain(hash_key(&i.to_be_bytes())))
            .count();
        assert!(false_positives < 2_000, "{false_positives} of 100000");
    }
}
