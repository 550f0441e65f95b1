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

/// Takes one (key, value) entry of a segment being written.
pub type PutEntry<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), StoreError> + 'a;

/// A segment's entries, handed to the store one at a time in key order, so that a
/// spill never holds a second copy of the segment (a list of whole values was a
/// segment-sized buffer per shard beyond the budget: 16 MiB at `memory_max` 512 MiB).
pub trait SegmentEntries {
    /// Calls `put` with every (key, value) in key order, keys unique; stops at the
    /// first error `put` returns.
    fn each(&mut self, put: &mut PutEntry<'_>) -> Result<(), StoreError>;
}

impl SegmentEntries for &[SegmentEntry<'_>] {
    fn each(&mut self, put: &mut PutEntry<'_>) -> Result<(), StoreError> {
        self.iter().try_for_each(|e| put(e.key, e.value))
    }
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
    /// Writes a whole segment of at least one entry.
    fn write_segment(
        &mut self,
        id: SegmentId,
        entries: &mut dyn SegmentEntries,
    ) -> Result<(), StoreError>;

    /// Reads the value of `key` in segment `id` into `out`; false if absent.
    fn get(&mut self, id: SegmentId, key: &[u8], out: &mut Vec<u8>) -> Result<bool, StoreError>;

    /// Starts reading `key` of segment `id`; its value arrives at the next
    /// [`finish_reads`](Self::finish_reads) under `token`. A store that can read in the
    /// background starts now, so that the read overlaps the rest of the batch.
    fn start_read(&mut self, token: usize, id: SegmentId, key: &[u8]) -> Result<(), StoreError>;

    /// Completes every started read, calling `found(token, value)` for each key
    /// present, in any order.
    fn finish_reads(&mut self, found: &mut dyn FnMut(usize, &[u8])) -> Result<(), StoreError>;

    /// Calls `visit` with every entry of segment `id`, in key order.
    fn scan_segment(
        &mut self,
        id: SegmentId,
        visit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), StoreError>;

    /// Removes every segment of `bucket` on `side`.
    fn drop_bucket(&mut self, side: Side, bucket: i64) -> Result<(), StoreError>;

    /// Memory the store keeps for its live segments (what finds a key in a segment
    /// without reading it), which the join counts in its budget.
    fn memory_bytes(&self) -> usize;
}

/// The in-memory model of a [`StateStore`]: obviously right, used to check the others.
#[derive(Default, Debug)]
pub struct MemStore {
    segments: BTreeMap<SegmentId, BTreeMap<Vec<u8>, Vec<u8>>>,
    /// Reads started and not yet finished: (token, segment, key).
    started: Vec<(usize, SegmentId, Vec<u8>)>,
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
        entries: &mut dyn SegmentEntries,
    ) -> Result<(), StoreError> {
        let mut map = BTreeMap::new();
        let mut last: Option<Vec<u8>> = None;
        entries.each(&mut |key, value| {
            assert!(
                last.as_deref().is_none_or(|l| l < key),
                "segment {id:?}: entries out of key order"
            );
            last = Some(key.to_vec());
            map.insert(key.to_vec(), value.to_vec());
            Ok(())
        })?;
        assert!(!map.is_empty(), "segment {id:?} written without entries");
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

    fn start_read(&mut self, token: usize, id: SegmentId, key: &[u8]) -> Result<(), StoreError> {
        self.started.push((token, id, key.to_vec()));
        Ok(())
    }

    fn finish_reads(&mut self, found: &mut dyn FnMut(usize, &[u8])) -> Result<(), StoreError> {
        for (token, id, key) in self.started.drain(..) {
            if let Some(value) = self.segments.get(&id).and_then(|s| s.get(&key)) {
                found(token, value);
            }
        }
        Ok(())
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

    /// None: the model's segments stand for files on disk.
    fn memory_bytes(&self) -> usize {
        0
    }
}
