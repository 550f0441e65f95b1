//! The cold state tier: where segments go when memory is full.
//!
//! A *segment* is a frozen slice of one bucket of one side. It is written once, whole,
//! with its entries sorted by key; it is read by exact key or scanned whole; it is
//! removed only with its bucket. Every event of a key in a segment lives in one value,
//! so a probe is one point read.

use std::collections::BTreeMap;

use crate::spec::Side;

/// Names one spilled segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    pub side: Side,
    pub bucket: i64,
    pub segment: u32,
}

/// One key of a segment and the encoded list of its events.
#[derive(Clone, Copy, Debug)]
pub struct SegmentEntry<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
}

/// One point read of a batch: a key in a segment.
#[derive(Clone, Copy, Debug)]
pub struct ColdRead<'a> {
    pub id: SegmentId,
    pub key: &'a [u8],
}

#[derive(Debug, thiserror::Error)]
#[error("state store: {operation} failed: {detail}")]
pub struct StoreError {
    pub operation: &'static str,
    pub detail: String,
}

/// The cold tier's operations. Implementations: [`MemStore`] (the model, for tests) and
/// the RocksDB store in `braid-state`.
pub trait StateStore {
    /// Writes a whole segment. `entries` are sorted by key, keys unique.
    fn write_segment(
        &mut self,
        id: SegmentId,
        entries: &[SegmentEntry<'_>],
    ) -> Result<(), StoreError>;

    /// Reads the value of `key` in segment `id` into `out`; false if absent.
    fn get(&mut self, id: SegmentId, key: &[u8], out: &mut Vec<u8>) -> Result<bool, StoreError>;

    /// Reads many keys, calling `found(i, value)` for each `reads[i]` present, in any
    /// order. Stores that can wait on several reads at once override this.
    fn read_many(
        &mut self,
        reads: &[ColdRead<'_>],
        found: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<(), StoreError> {
        read_each(self, reads, found)
    }

    /// Calls `visit` with every entry of segment `id`, in key order.
    fn scan_segment(
        &mut self,
        id: SegmentId,
        visit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), StoreError>;

    /// Removes every segment of `bucket` on `side`.
    fn drop_bucket(&mut self, side: Side, bucket: i64) -> Result<(), StoreError>;
}

/// Reads one key after another: [`StateStore::read_many`] for stores without a faster
/// way, and for batches too small to hand to one.
pub fn read_each<S: StateStore + ?Sized>(
    store: &mut S,
    reads: &[ColdRead<'_>],
    found: &mut dyn FnMut(usize, &[u8]),
) -> Result<(), StoreError> {
    let mut value = Vec::new();
    for (i, read) in reads.iter().enumerate() {
        if store.get(read.id, read.key, &mut value)? {
            found(i, &value);
        }
    }
    Ok(())
}

/// The in-memory model of a [`StateStore`]: obviously right, used to check the others.
#[derive(Default, Debug)]
pub struct MemStore {
    segments: BTreeMap<SegmentId, BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemStore {
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

impl StateStore for MemStore {
    fn write_segment(
        &mut self,
        id: SegmentId,
        entries: &[SegmentEntry<'_>],
    ) -> Result<(), StoreError> {
        let map = entries
            .iter()
            .map(|e| (e.key.to_vec(), e.value.to_vec()))
            .collect();
        assert!(
            self.segments.insert(id, map).is_none(),
            "segment {id:?} written twice"
        );
        Ok(())
    }

    fn get(&mut self, id: SegmentId, key: &[u8], out: &mut Vec<u8>) -> Result<bool, StoreError> {
        out.clear();
        match self.segments.get(&id).and_then(|s| s.get(key)) {
            Some(v) => {
                out.extend_from_slice(v);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn scan_segment(
        &mut self,
        id: SegmentId,
        visit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), StoreError> {
        for (k, v) in self.segments.get(&id).into_iter().flatten() {
            visit(k, v);
        }
        Ok(())
    }

    fn drop_bucket(&mut self, side: Side, bucket: i64) -> Result<(), StoreError> {
        self.segments
            .retain(|id, _| !(id.side == side && id.bucket == bucket));
        Ok(())
    }
}
