//! The ids of retained events, for de-duplication (SPEC §3, "Duplicates").
//!
//! Ids are kept by their 128-bit hash with the bucket that holds the event, and are
//! forgotten when that bucket expires. The set is split into [`ID_PARTS`] hash maps so
//! that growing it never doubles the whole table at once: one big map reallocating from
//! 64 MiB to 128 MiB would hold both tables for a moment, far beyond the budget.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::bucket::IdentityBuild;
use crate::snapshot::{Reader, SnapshotError, Writer};

const ID_PARTS: usize = 64;
/// Memory of one entry: 16-byte id hash, 8-byte bucket, a control byte.
const ID_ENTRY_BYTES: usize = 25;
/// Bytes of one entry in an image: the id hash and the bucket.
const ID_IMAGE_BYTES: u64 = 16 + 8;

/// An id hash, split in two words so that it aligns to 8 bytes, not 16.
#[derive(Clone, Copy, PartialEq, Eq)]
struct IdKey(u64, u64);

impl Hash for IdKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0 ^ self.1);
    }
}

/// Cloning is cheap: parts are shared until written (copy on write), so that a
/// checkpoint's copy costs nothing at the barrier and a part is copied only when the
/// shard changes it while the image is still being written.
#[derive(Clone)]
pub(crate) struct IdSet {
    parts: Vec<Arc<HashMap<IdKey, i64, IdentityBuild>>>,
    /// Entries the parts have room for, kept current so that memory is O(1) to read.
    capacity: usize,
}

impl Default for IdSet {
    fn default() -> IdSet {
        IdSet {
            parts: (0..ID_PARTS).map(|_| Arc::default()).collect(),
            capacity: 0,
        }
    }
}

impl IdSet {
    /// Remembers `id` as held by `bucket`; false if it was already remembered.
    pub fn insert(&mut self, id: u128, bucket: i64) -> bool {
        let key = IdKey(id as u64, (id >> 64) as u64);
        let slot = &mut self.parts[(key.1 >> 58) as usize % ID_PARTS];
        // Read before a shared part is copied: the copy's capacity may differ.
        let before = slot.capacity();
        let part = Arc::make_mut(slot);
        let inserted = match part.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(bucket);
                true
            }
        };
        self.capacity = self.capacity + part.capacity() - before;
        inserted
    }

    /// Forgets the ids of every bucket up to and including `last`.
    pub fn forget_up_to(&mut self, last: i64) {
        for part in &mut self.parts {
            if part.values().any(|&bucket| bucket <= last) {
                Arc::make_mut(part).retain(|_, bucket| *bucket > last);
            }
        }
        self.capacity = self.parts.iter().map(|p| p.capacity()).sum();
    }

    /// Visits every remembered id with the bucket that holds its event.
    pub fn for_each(&self, mut visit: impl FnMut(u128, i64)) {
        for part in &self.parts {
            for (key, &bucket) in part.iter() {
                visit(u128::from(key.0) | (u128::from(key.1) << 64), bucket);
            }
        }
    }

    pub fn write(&self, w: &mut Writer<'_>) {
        w.len(self.parts.iter().map(|p| p.len()).sum());
        for part in &self.parts {
            for (key, bucket) in part.iter() {
                w.u128(u128::from(key.0) | (u128::from(key.1) << 64));
                w.i64(*bucket);
            }
        }
    }

    pub fn read(r: &mut Reader<'_>) -> Result<IdSet, SnapshotError> {
        let mut ids = IdSet::default();
        for _ in 0..r.count(ID_IMAGE_BYTES)? {
            let id = r.u128()?;
            let bucket = r.i64()?;
            if !ids.insert(id, bucket) {
                return Err(SnapshotError("an id is listed twice".into()));
            }
        }
        Ok(ids)
    }

    /// O(1): the join asks after every event.
    pub fn memory_bytes(&self) -> usize {
        self.capacity * ID_ENTRY_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_forgotten() {
        let mut ids = IdSet::default();
        assert!(ids.insert(7, 1));
        assert!(!ids.insert(7, 2), "a repeat is refused");
        assert!(ids.insert(7 << 64, 2), "both halves count");
        ids.forget_up_to(1);
        assert!(ids.insert(7, 3), "forgotten with its bucket");
        assert!(!ids.insert(7 << 64, 3), "bucket 2 is still retained");
        let counted: usize = ids.parts.iter().map(|p| p.capacity()).sum();
        assert_eq!(ids.memory_bytes(), counted * ID_ENTRY_BYTES);
    }

    /// The kept capacity stays the parts' own while parts are shared with a snapshot
    /// and copied on write (the capacity is read before a copy, so it stays exact
    /// whatever capacity a copy gets), and when ids are forgotten.
    #[test]
    fn memory_stays_exact_across_copies_on_write() {
        let mut ids = IdSet::default();
        let counted = |ids: &IdSet| -> usize {
            ids.parts.iter().map(|p| p.capacity()).sum::<usize>() * ID_ENTRY_BYTES
        };
        for round in 0..5u128 {
            let snapshot = ids.clone();
            for i in 0..2_000u128 {
                ids.insert((i * 7_919 + round * 1_000_003) << 58 | i, round as i64);
                assert_eq!(ids.memory_bytes(), counted(&ids), "round {round}, id {i}");
            }
            drop(snapshot);
            ids.forget_up_to(round as i64 - 2);
            assert_eq!(ids.memory_bytes(), counted(&ids));
        }
    }
}
