//! Probes of cold segments waiting to be read, with copies of the events that made them.
//!
//! A probe that a cold segment's filter allows costs a read of the store. Read one at a
//! time, as the events arrive, each is a random read; gathered over many batches and
//! handed to the store together, the store reads each segment's keys in key order, and
//! neighbouring keys share their blocks. The join decides when to read them
//! ([`ColdProbeMode`]); until then, this holds what a read's pairs need: the probing
//! event's key and payload, where the event was stored (to mark it matched), and the
//! interval of times it matches.

use std::ops::Range;

use crate::spec::Side;
use crate::store::SegmentId;

/// When the join reads the cold segments its probes need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ColdProbeMode {
    /// At the end of every batch: a pair whose older event is on disk is emitted with
    /// the batch of the event that completes it.
    Eager,
    /// Gathered until they hold [`DEFERRED_FRACTION`] of the memory budget, a bucket is
    /// about to expire, or the caller flushes them (a checkpoint barrier, the end of
    /// the input): see [`Join::flush_cold_probes`](crate::Join::flush_cold_probes).
    #[default]
    Deferred,
}

/// Deferred probes hold at most this fraction of the memory budget before they are read.
pub const DEFERRED_FRACTION: usize = 8;

/// The bytes probes may take before they are read, in `mode` under a budget of
/// `memory_max_bytes`.
pub(super) fn deferred_bytes_max(mode: ColdProbeMode, memory_max_bytes: usize) -> usize {
    match mode {
        ColdProbeMode::Eager => 0,
        ColdProbeMode::Deferred => memory_max_bytes / DEFERRED_FRACTION,
    }
}

/// A read of one key of one cold segment for one probing event.
pub(super) struct ColdRead {
    /// Index into [`ColdProbes::events`].
    pub event: usize,
    pub segment: SegmentId,
    /// The opposite side's times the probing event matches.
    pub lo: i64,
    pub hi: i64,
}

/// A probing event, copied: its reads may be served after its batch's bytes are gone.
pub(super) struct ProbingEvent {
    pub side: Side,
    key: Range<usize>,
    payload: Range<usize>,
    /// Where the event itself was stored, to mark it matched.
    pub at: (SegmentId, usize),
}

#[derive(Default)]
pub(super) struct ColdProbes {
    pub reads: Vec<ColdRead>,
    pub events: Vec<ProbingEvent>,
    bytes: Vec<u8>,
}

impl ColdProbes {
    /// Records the probing event of the reads pushed since it was probed.
    pub fn add_event(&mut self, side: Side, key: &[u8], payload: &[u8], at: (SegmentId, usize)) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(key);
        let key_end = self.bytes.len();
        self.bytes.extend_from_slice(payload);
        self.events.push(ProbingEvent {
            side,
            key: start..key_end,
            payload: key_end..self.bytes.len(),
            at,
        });
    }

    pub fn key(&self, event: &ProbingEvent) -> &[u8] {
        &self.bytes[event.key.clone()]
    }

    pub fn payload(&self, event: &ProbingEvent) -> &[u8] {
        &self.bytes[event.payload.clone()]
    }

    pub fn is_empty(&self) -> bool {
        self.reads.is_empty()
    }

    /// The bytes the waiting probes take: what the deferral bound counts.
    pub fn pending_bytes(&self) -> usize {
        self.bytes.len()
            + self.events.len() * std::mem::size_of::<ProbingEvent>()
            + self.reads.len() * std::mem::size_of::<ColdRead>()
    }

    /// The memory held, including capacity kept for the next probes.
    pub fn memory_bytes(&self) -> usize {
        self.bytes.capacity()
            + self.events.capacity() * std::mem::size_of::<ProbingEvent>()
            + self.reads.capacity() * std::mem::size_of::<ColdRead>()
    }

    pub fn clear(&mut self) {
        self.reads.clear();
        self.events.clear();
        self.bytes.clear();
    }
}
