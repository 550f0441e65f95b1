//! Time buckets and their segments: the layout of join state.
//!
//! State is grouped by event time into buckets of one side each. A bucket holds one or
//! more segments: *hot* segments live in memory with a hash index; *cold* segments were
//! spilled whole to the [`StateStore`](crate::StateStore) and keep only a key filter and
//! their matched marks in memory. Expiry drops whole buckets; there are no per-event
//! timers and no per-event deletes.

use std::cmp::Ordering;
use std::sync::Arc;

use crate::bloom::Bloom;
use crate::leb128;
use crate::snapshot::{Reader, SnapshotError, Writer};
use crate::store::{PutEntry, SegmentEntries, StoreError};

mod index;

use index::KeyIndex;

/// The first arena chunk of a segment; later chunks double up to [`CHUNK_BYTES_MAX`].
const CHUNK_BYTES_MIN: usize = 4 << 10;
const CHUNK_BYTES_MAX: usize = 1 << 20;
/// Memory of one slot and of one used index entry.
const SLOT_BYTES: usize = std::mem::size_of::<Slot>();
pub(crate) const INDEX_ENTRY_BYTES: usize = index::ENTRY_BYTES;
/// Bytes of a length, a slot and an index entry in an image (see [`HotImage::write`]):
/// the least a counted item can take, which bounds what a count can ask for.
const LEN_IMAGE_BYTES: u64 = 8;
const SLOT_IMAGE_BYTES: u64 = 8 + 3 * 4;
const INDEX_ENTRY_IMAGE_BYTES: u64 = 8 + 4;

/// Where one event's record sits in a segment's arena: the key's length and the
/// payload's (LEB128, a byte each below 128), then the key and the payload. `next`
/// chains events of the same key hash, newest first; `NO_SLOT` ends the chain.
/// `hash_high` is the high half of the key hash (the index holds the low half). 24
/// bytes: the lengths in the arena take 2 where the slot took 8.
#[derive(Clone, Copy, Debug)]
struct Slot {
    time: i64,
    chunk: u32,
    offset: u32,
    next: u32,
    hash_high: u32,
}

const _: () = assert!(SLOT_BYTES == 24, "a slot is 24 bytes (its doc)");

const NO_SLOT: u32 = u32::MAX;

/// Full-size arena chunks freed by spilled and expired segments, kept for the next
/// segments. Without it every chunk was a fresh allocation and a free: glibc then either
/// kept freed chunks in its arenas (resident memory far above the budget) or, with a
/// fixed mmap threshold, mapped and faulted in every chunk (17 % of throughput).
#[derive(Default)]
pub(crate) struct ChunkPool {
    free: Vec<Vec<u8>>,
    max: usize,
}

impl ChunkPool {
    /// A pool holding at most `bytes_max` of chunks.
    pub fn new(bytes_max: usize) -> ChunkPool {
        ChunkPool {
            free: Vec::new(),
            max: bytes_max / CHUNK_BYTES_MAX,
        }
    }

    /// A chunk of at least `size` bytes of capacity.
    pub fn take(&mut self, size: usize) -> Vec<u8> {
        match self.free.pop() {
            Some(chunk) if size <= CHUNK_BYTES_MAX => chunk,
            Some(chunk) => {
                self.free.push(chunk);
                Vec::with_capacity(size)
            }
            None => Vec::with_capacity(size),
        }
    }

    pub fn give(&mut self, mut chunk: Vec<u8>) {
        if chunk.capacity() == CHUNK_BYTES_MAX && self.free.len() < self.max {
            chunk.clear();
            self.free.push(chunk);
        }
    }

    pub fn memory_bytes(&self) -> usize {
        self.free.len() * CHUNK_BYTES_MAX
    }
}

/// A set of bits, one per event of a segment: was the event matched?
#[derive(Default, Debug, Clone)]
pub(crate) struct Marks(Vec<u64>);

impl Marks {
    /// Makes room for `len` marks. Marks grow only here, as events are pushed, so that a
    /// segment's memory changes only when it is written.
    pub fn reserve_for(&mut self, len: usize) {
        if self.0.len() < len.div_ceil(64) {
            self.0.resize(len.div_ceil(64), 0);
        }
    }
    #[inline]
    pub fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    #[inline]
    pub fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    pub fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    pub fn bytes(&self) -> usize {
        self.0.capacity() * 8
    }
    fn write(&self, w: &mut Writer<'_>) {
        w.words(&self.0);
    }
    /// Reads the marks of `len` events. Marks grow with every event pushed, so there is
    /// exactly one word per 64 events: any other count is a corrupted image (and a
    /// corrupted `len` is caught here before it sizes anything).
    fn read(r: &mut Reader<'_>, len: usize) -> Result<Marks, SnapshotError> {
        let words = r.words()?;
        if words.len() != len.div_ceil(64) {
            return Err(SnapshotError(format!(
                "{} mark words for {len} events",
                words.len()
            )));
        }
        Ok(Marks(words))
    }
}

/// The events of a hot segment: an arena of key and payload bytes, slots, and a hash
/// index. Shared (read-only) with a checkpoint's image once the segment is sealed.
#[derive(Default)]
pub(crate) struct HotData {
    chunks: Vec<Vec<u8>>,
    chunk_bytes: usize,
    slots: Vec<Slot>,
    index: KeyIndex,
}

/// A hot segment's events: owned while it takes events; once a checkpoint seals it,
/// shared with the checkpoint's image (written while the shard goes on), so no more
/// events go in.
enum Events {
    Open(HotData),
    Sealed(Arc<HotData>),
}

impl Default for Events {
    fn default() -> Events {
        Events::Open(HotData::default())
    }
}

/// An in-memory segment: its events, their matched marks and their time range.
#[derive(Default)]
pub(crate) struct HotSegment {
    /// Unique within the bucket, kept when the segment is spilled.
    pub number: u32,
    events: Events,
    pub marks: Marks,
    pub time_min: i64,
    pub time_max: i64,
}

/// A hot segment as a checkpoint sees it: its events shared, its marks copied.
pub(crate) struct HotImage {
    number: u32,
    data: Arc<HotData>,
    marks: Marks,
    time_min: i64,
    time_max: i64,
}

impl HotSegment {
    pub fn new(number: u32) -> HotSegment {
        HotSegment {
            number,
            ..HotSegment::default()
        }
    }

    /// A segment whose index has room for `keys` distinct keys from the start: it
    /// grows by doubling otherwise, rehashing all it holds each time. (Its slots still
    /// grow by doubling: reserved from the start they counted in the budget before
    /// they held anything, and at 512 MiB twice as many events were spilled.)
    pub fn with_room(number: u32, keys: usize) -> HotSegment {
        let mut hot = HotSegment::new(number);
        if let Events::Open(d) = &mut hot.events {
            d.index.reserve(keys);
        }
        hot
    }

    /// Distinct key hashes in the segment.
    pub fn keys(&self) -> usize {
        self.data().index.len()
    }

    #[inline]
    fn data(&self) -> &HotData {
        match &self.events {
            Events::Open(d) => d,
            Events::Sealed(d) => d,
        }
    }

    /// False once a checkpoint has sealed the segment.
    #[inline]
    pub fn is_open(&self) -> bool {
        matches!(self.events, Events::Open(_))
    }

    pub fn len(&self) -> usize {
        self.data().slots.len()
    }

    /// Bytes of memory this segment holds, by capacity.
    #[inline]
    pub fn memory_bytes(&self) -> usize {
        let d = self.data();
        d.chunk_bytes
            + d.slots.capacity() * SLOT_BYTES
            + d.index.memory_bytes()
            + self.marks.bytes()
    }

    /// [`memory_bytes`](Self::memory_bytes) but the unused end of the last arena chunk:
    /// what the segment holds once that chunk is full. A segment is open to events
    /// while this is under its limit, so that its last chunk (up to 1 MiB) is filled
    /// before a new segment starts, rather than left nearly empty because its capacity
    /// alone reached the limit.
    #[inline]
    pub fn filled_bytes(&self) -> usize {
        let d = self.data();
        let tail = d.chunks.last().map_or(0, |c| c.capacity() - c.len());
        self.memory_bytes() - tail
    }

    /// Bytes of content (used, not reserved): what a spill would move to disk.
    pub fn content_bytes(&self) -> usize {
        let d = self.data();
        d.chunks.iter().map(Vec::len).sum::<usize>()
            + d.slots.len() * SLOT_BYTES
            + d.index.len() * INDEX_ENTRY_BYTES
    }

    /// Seals the segment and shares its events with a checkpoint image.
    pub fn image(&mut self) -> HotImage {
        let data = match std::mem::take(&mut self.events) {
            Events::Open(d) => Arc::new(d),
            Events::Sealed(d) => d,
        };
        self.events = Events::Sealed(Arc::clone(&data));
        HotImage {
            number: self.number,
            data,
            marks: self.marks.clone(),
            time_min: self.time_min,
            time_max: self.time_max,
        }
    }

    /// Appends an event whose payload is `payload[0]` then `payload[1]` (a stored form
    /// in two pieces); returns its ordinal in the segment.
    #[inline]
    pub fn push(
        &mut self,
        key_hash: u64,
        key: &[u8],
        time: i64,
        payload: [&[u8]; 2],
        matched: bool,
        pool: &mut ChunkPool,
    ) -> usize {
        let Events::Open(d) = &mut self.events else {
            panic!("a sealed segment takes no more events")
        };
        let payload_len = payload[0].len() + payload[1].len();
        let need =
            leb128::len_bytes(key.len()) + leb128::len_bytes(payload_len) + key.len() + payload_len;
        if d.chunks
            .last()
            .is_none_or(|c| c.capacity() - c.len() < need)
        {
            let size = (d
                .chunks
                .last()
                .map_or(CHUNK_BYTES_MIN, |c| c.capacity() * 2))
            .min(CHUNK_BYTES_MAX)
            .max(need);
            let chunk = pool.take(size);
            d.chunk_bytes += chunk.capacity();
            d.chunks.push(chunk);
        }
        let chunk_index = d.chunks.len() - 1;
        let chunk = &mut d.chunks[chunk_index];
        let offset = chunk.len();
        leb128::push(chunk, key.len());
        leb128::push(chunk, payload_len);
        chunk.extend_from_slice(key);
        chunk.extend_from_slice(payload[0]);
        chunk.extend_from_slice(payload[1]);
        let ordinal = d.slots.len();
        let ordinal_u32 =
            u32::try_from(ordinal).expect("segments are bounded far below 2^32 events");
        let slots = &d.slots;
        let next = d
            .index
            .replace(key_hash, ordinal_u32, |h| slots[h as usize].hash_high);
        d.slots.push(Slot {
            time,
            chunk: u32::try_from(chunk_index).expect("segments are bounded far below 2^32 chunks"),
            offset: u32::try_from(offset).expect("chunks are at most a line long"),
            next,
            hash_high: (key_hash >> 32) as u32,
        });
        self.marks.reserve_for(ordinal + 1);
        if matched {
            self.marks.set(ordinal);
        }
        if ordinal == 0 {
            self.time_min = time;
            self.time_max = time;
        } else {
            self.time_min = self.time_min.min(time);
            self.time_max = self.time_max.max(time);
        }
        ordinal
    }

    /// Fetches into cache where [`probe`](Self::probe) of this key and interval would
    /// look first.
    #[inline]
    pub fn prefetch(&self, key_hash: u64, lo: i64, hi: i64) {
        if hi >= self.time_min && lo <= self.time_max {
            self.data().index.prefetch(key_hash);
        }
    }

    /// Calls `hit` with (ordinal, payload) of every event with this key and a time in
    /// `[lo, hi]`.
    #[inline]
    pub fn probe(
        &self,
        key_hash: u64,
        key: &[u8],
        lo: i64,
        hi: i64,
        mut hit: impl FnMut(usize, &[u8]),
    ) {
        if hi < self.time_min || lo > self.time_max {
            return;
        }
        let d = self.data();
        let mut next = d.index.get(key_hash, |h| d.slots[h as usize].hash_high);
        while next != NO_SLOT {
            let slot = &d.slots[next as usize];
            if slot.time >= lo && slot.time <= hi && d.key(slot) == key {
                hit(next as usize, d.payload(slot));
            }
            next = slot.next;
        }
    }

    /// Reads what [`HotImage::write`] wrote, checking that every slot points into the
    /// arena and every chain into the slots.
    pub fn read(r: &mut Reader<'_>, pool: &mut ChunkPool) -> Result<HotSegment, SnapshotError> {
        let number = r.u32()?;
        let time_min = r.i64()?;
        let time_max = r.i64()?;
        let mut hot = HotData::default();
        let chunks = r.count(LEN_IMAGE_BYTES)?;
        for _ in 0..chunks {
            // Read straight into the arena chunk: a load holds no copy of the image.
            let bytes = r.len()?;
            let mut chunk = pool.take(bytes.max(CHUNK_BYTES_MIN));
            r.append(&mut chunk, bytes)?;
            hot.chunk_bytes += chunk.capacity();
            hot.chunks.push(chunk);
        }
        let len = r.count(SLOT_IMAGE_BYTES)?;
        let bad = |what: &str| SnapshotError(format!("hot segment {number}: {what}"));
        hot.slots.reserve_exact(len);
        for i in 0..len {
            let slot = Slot {
                time: r.i64()?,
                chunk: r.u32()?,
                offset: r.u32()?,
                next: r.u32()?,
                hash_high: 0,
            };
            let fits = hot
                .chunks
                .get(slot.chunk as usize)
                .and_then(|c| c.get(slot.offset as usize..))
                .and_then(record_span)
                .is_some();
            // A chain runs from newer events to older ones: that bounds every walk.
            if !fits || (slot.next != NO_SLOT && slot.next as usize >= i) {
                return Err(bad("a slot points outside the segment"));
            }
            hot.slots.push(slot);
        }
        let keys = r.count(INDEX_ENTRY_IMAGE_BYTES)?;
        hot.index.reserve(keys);
        for _ in 0..keys {
            let hash = r.u64()?;
            let head = r.u32()?;
            if head as usize >= len {
                return Err(bad("an index entry points outside the slots"));
            }
            let mut next = head;
            while next != NO_SLOT {
                let slot = &mut hot.slots[next as usize];
                slot.hash_high = (hash >> 32) as u32;
                next = slot.next;
            }
            let slots = &hot.slots;
            let before = hot
                .index
                .replace(hash, head, |h| slots[h as usize].hash_high);
            if before != NO_SLOT {
                return Err(bad("two index entries of one key hash"));
            }
        }
        Ok(HotSegment {
            number,
            events: Events::Open(hot),
            marks: Marks::read(r, len)?,
            time_min,
            time_max,
        })
    }

    /// Gives the segment's arena chunks back to the pool; those a checkpoint image still
    /// shares are freed when the image is written.
    pub fn release_chunks(&mut self, pool: &mut ChunkPool) {
        let owned = match std::mem::take(&mut self.events) {
            Events::Open(d) => Some(d),
            Events::Sealed(d) => Arc::into_inner(d),
        };
        for chunk in owned.into_iter().flat_map(|d| d.chunks) {
            pool.give(chunk);
        }
    }

    /// The distinct key hashes of the segment's events.
    pub fn key_hashes(&self) -> impl Iterator<Item = u64> + '_ {
        let d = self.data();
        d.index.chains().map(|(low, head)| d.full_hash(low, head))
    }

    /// Visits every event: whether it matched, its key, its time, its payload.
    pub fn for_each(&self, mut visit: impl FnMut(bool, &[u8], i64, &[u8])) {
        let d = self.data();
        for (i, slot) in d.slots.iter().enumerate() {
            visit(self.marks.get(i), d.key(slot), slot.time, d.payload(slot));
        }
    }

    /// The segment for the cold tier: one entry per distinct key, sorted by key, whose
    /// value lists the key's events, newest first (see [`decode_events`]), encoded one
    /// key at a time into `scratch` as the store takes them. Also builds the key filter
    /// of `hashes`, the segment's [`key_hashes`](Self::key_hashes).
    pub fn freeze<'a>(
        &'a self,
        hashes: &[u64],
        order: &'a mut Vec<SpillOrder>,
        scratch: &'a mut Vec<u8>,
    ) -> (Frozen<'a>, Bloom) {
        let d = self.data();
        debug_assert_eq!(hashes.len(), d.index.len());
        let mut bloom = Bloom::new(hashes.len());
        for &hash in hashes {
            bloom.insert(hash);
        }
        // Every event's key prefix, read in slot order, which is the arena's: records
        // in index order were a cache miss each (86 % of this function's time at
        // `memory_max` 128 MiB). Events of one key (or of keys sharing a 64-bit hash)
        // are told apart by the key bytes, so collisions need no chain walk. `order`
        // is reused from spill to spill: a fresh one per spill was zeroed pages each
        // time (it is larger than the allocator keeps).
        order.clear();
        order.extend(
            d.slots
                .iter()
                .enumerate()
                .map(|(i, slot)| SpillOrder::new(d.key(slot), i as u32)),
        );
        // Byte order, then newest first within a key; only keys longer than the
        // prefix that share it reach into the arena.
        let key = |ordinal: u32| d.key(&d.slots[ordinal as usize]);
        order.sort_unstable_by(|a, b| a.cmp(b, key));
        (
            Frozen {
                data: d,
                events: order,
                scratch,
            },
            bloom,
        )
    }
}

/// Key bytes an event's [`SpillOrder`] holds: flink-peer's keys are 18 bytes, and with
/// 16 every two events of one key, and of keys that differ only past their 16th byte,
/// were told apart in the arena, a cache miss each (4.5 % of a flink-peer run at
/// 128 MiB went to the sort).
const SPILL_PREFIX_BYTES: usize = 24;

/// An event's place in a spill's order: its key's first [`SPILL_PREFIX_BYTES`] as
/// numbers, zero-padded, the key's length, and the event's ordinal. The same size as
/// a 16-byte prefix and an ordinal were (32 bytes, the `u128`'s alignment).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SpillOrder {
    first: u128,
    second: u64,
    len: u32,
    ordinal: u32,
}

impl SpillOrder {
    fn new(key: &[u8], ordinal: u32) -> SpillOrder {
        let mut prefix = [0u8; SPILL_PREFIX_BYTES];
        let n = key.len().min(SPILL_PREFIX_BYTES);
        prefix[..n].copy_from_slice(&key[..n]);
        let (first, second) = prefix.split_at(16);
        SpillOrder {
            first: u128::from_be_bytes(first.try_into().expect("16 bytes")),
            second: u64::from_be_bytes(second.try_into().expect("8 bytes")),
            len: u32::try_from(key.len()).unwrap_or(u32::MAX),
            ordinal,
        }
    }

    /// Keys in byte order (`key` gives an ordinal's key), then newest first. Two keys
    /// that fit the prefix and share it differ only in trailing zeros, so the shorter
    /// comes first; longer ones that share it are compared whole.
    fn cmp<'k>(&self, other: &SpillOrder, key: impl Fn(u32) -> &'k [u8]) -> Ordering {
        self.first
            .cmp(&other.first)
            .then(self.second.cmp(&other.second))
            .then_with(|| {
                if self.len.max(other.len) as usize <= SPILL_PREFIX_BYTES {
                    self.len.cmp(&other.len)
                } else {
                    key(self.ordinal).cmp(key(other.ordinal))
                }
            })
            .then(other.ordinal.cmp(&self.ordinal))
    }

    /// Whether `other` is an event of a key that cannot be this one's.
    fn other_key(&self, other: &SpillOrder) -> bool {
        (self.first, self.second, self.len) != (other.first, other.second, other.len)
    }
}

/// A hot segment's entries in key order, encoded as the store asks for them.
pub(crate) struct Frozen<'a> {
    data: &'a HotData,
    /// Every event: its key's first bytes and its ordinal; sorted by key, then newest
    /// first.
    events: &'a [SpillOrder],
    scratch: &'a mut Vec<u8>,
}

/// Events ahead whose record [`Frozen::each`] fetches into cache while it encodes one
/// (key order visits the arena at random); their slots are fetched twice as far ahead,
/// since a record's address is in its slot.
const FREEZE_PREFETCH_AHEAD: usize = 8;
/// How much of a record [`Frozen::each`] fetches ahead: its lengths, a key and a payload
/// of flink-peer's size. Fetching only its first cache line left the copy of the rest a
/// miss: 3.7 % of a flink-peer run at 128 MiB; fetching 160 bytes ran it 6 % faster (3
/// alternating rounds).
const RECORD_PREFETCH_BYTES: usize = 160;
const CACHE_LINE_BYTES: usize = 64;

impl SegmentEntries for Frozen<'_> {
    fn each(&mut self, put: &mut PutEntry<'_>) -> Result<(), StoreError> {
        let d = self.data;
        let events = self.events;
        let mut i = 0;
        while i < events.len() {
            let first = events[i];
            let key = d.key(&d.slots[first.ordinal as usize]);
            self.scratch.clear();
            while let Some(event) = events.get(i) {
                if first.other_key(event) {
                    break;
                }
                if let Some(ahead) = events.get(i + 2 * FREEZE_PREFETCH_AHEAD) {
                    crate::cache::prefetch(&d.slots[ahead.ordinal as usize]);
                }
                if let Some(ahead) = events.get(i + FREEZE_PREFETCH_AHEAD) {
                    d.prefetch_record(&d.slots[ahead.ordinal as usize]);
                }
                let ordinal = event.ordinal;
                let slot = &d.slots[ordinal as usize];
                let (k, payload) = d.record(slot);
                if k != key {
                    break;
                }
                encode_event(self.scratch, ordinal, slot.time, payload);
                i += 1;
            }
            put(key, self.scratch)?;
        }
        Ok(())
    }
}

impl HotData {
    /// The key hash of the chain that `head` starts, whose low half is `low`.
    fn full_hash(&self, low: u32, head: u32) -> u64 {
        u64::from(self.slots[head as usize].hash_high) << 32 | u64::from(low)
    }

    /// The key and the payload of a slot's record.
    #[inline]
    fn record(&self, slot: &Slot) -> (&[u8], &[u8]) {
        let bytes = &self.chunks[slot.chunk as usize][slot.offset as usize..];
        // Written by `push`, checked by `HotSegment::read`: well formed.
        let mut at = 0;
        let key_len = leb128::read(bytes, &mut at).expect("a record starts with its lengths");
        let payload_len = leb128::read(bytes, &mut at).expect("a record starts with its lengths");
        let (key, rest) = bytes[at..].split_at(key_len);
        (key, &rest[..payload_len])
    }

    #[inline]
    fn key(&self, slot: &Slot) -> &[u8] {
        self.record(slot).0
    }

    /// Fetches into cache the first [`RECORD_PREFETCH_BYTES`] of a slot's record: a
    /// byte every cache line's width and the last, so that every line they touch is
    /// fetched wherever the record starts.
    fn prefetch_record(&self, slot: &Slot) {
        let chunk = &self.chunks[slot.chunk as usize];
        let start = slot.offset as usize;
        let last = start + RECORD_PREFETCH_BYTES - 1;
        for at in (start..last).step_by(CACHE_LINE_BYTES).chain([last]) {
            if let Some(byte) = chunk.get(at) {
                crate::cache::prefetch(byte);
            }
        }
    }

    #[inline]
    fn payload(&self, slot: &Slot) -> &[u8] {
        self.record(slot).1
    }
}

/// The length of the record at the start of `bytes`, if it is one that fits: its two
/// lengths well formed and its key and payload within `bytes`.
fn record_span(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    let key_len = leb128::read(bytes, &mut at)?;
    let payload_len = leb128::read(bytes, &mut at)?;
    let end = at.checked_add(key_len)?.checked_add(payload_len)?;
    (end <= bytes.len()).then_some(end)
}

impl HotImage {
    /// Writes the segment as it is in memory: arena chunks, slots, index, marks. Loading
    /// it back ([`HotSegment::read`]) is then copies and one map insert per key.
    pub fn write(&self, w: &mut Writer<'_>) {
        let d = &*self.data;
        w.u32(self.number);
        w.i64(self.time_min);
        w.i64(self.time_max);
        w.len(d.chunks.len());
        for chunk in &d.chunks {
            w.bytes(chunk);
        }
        w.len(d.slots.len());
        for slot in &d.slots {
            w.i64(slot.time);
            w.u32(slot.chunk);
            w.u32(slot.offset);
            w.u32(slot.next);
        }
        w.len(d.index.len());
        for (low, head) in d.index.chains() {
            w.u64(d.full_hash(low, head));
            w.u32(head);
        }
        self.marks.write(w);
    }
}

/// A segment in the cold tier: what stays in memory is its filter and matched marks.
pub(crate) struct ColdSegment {
    pub number: u32,
    pub len: usize,
    /// Shared with checkpoint images, which never change it.
    pub bloom: Arc<Bloom>,
    pub marks: Marks,
    pub time_min: i64,
    pub time_max: i64,
    /// Whether the bucket's whole filter ([`SegmentGroups::excludes`]) covers this
    /// segment. Not in checkpoint images either.
    pub in_whole: bool,
    /// The bucket's group whose filter covers this segment, or [`NO_GROUP`]. Groups are
    /// not in checkpoint images: a restored segment is in none.
    pub group: u32,
}

impl ColdSegment {
    pub fn memory_bytes(&self) -> usize {
        self.bloom.bytes() + self.marks.bytes() + std::mem::size_of::<ColdSegment>()
    }

    /// The segment as a checkpoint sees it: its filter shared, its marks copied.
    pub fn image(&self) -> ColdSegment {
        ColdSegment {
            number: self.number,
            len: self.len,
            bloom: Arc::clone(&self.bloom),
            marks: self.marks.clone(),
            time_min: self.time_min,
            time_max: self.time_max,
            group: NO_GROUP,
            in_whole: false,
        }
    }

    pub fn write(&self, w: &mut Writer<'_>) {
        w.u32(self.number);
        w.len(self.len);
        w.i64(self.time_min);
        w.i64(self.time_max);
        self.bloom.write(w);
        self.marks.write(w);
    }

    pub fn read(r: &mut Reader<'_>) -> Result<ColdSegment, SnapshotError> {
        let number = r.u32()?;
        let len = r.u64()? as usize;
        let time_min = r.i64()?;
        let time_max = r.i64()?;
        let bloom = Arc::new(Bloom::read(r)?);
        let marks = Marks::read(r, len)?;
        Ok(ColdSegment {
            number,
            len,
            bloom,
            marks,
            time_min,
            time_max,
            group: NO_GROUP,
            in_whole: false,
        })
    }
}

pub(crate) enum Segment {
    Hot(HotSegment),
    Cold(ColdSegment),
}

impl Segment {
    /// Events in the segment.
    pub fn len(&self) -> usize {
        match self {
            Segment::Hot(h) => h.len(),
            Segment::Cold(c) => c.len,
        }
    }

    pub fn number(&self) -> u32 {
        match self {
            Segment::Hot(h) => h.number,
            Segment::Cold(c) => c.number,
        }
    }

    pub fn marks_mut(&mut self) -> &mut Marks {
        match self {
            Segment::Hot(h) => &mut h.marks,
            Segment::Cold(c) => &mut c.marks,
        }
    }

    pub fn memory_bytes(&self) -> usize {
        match self {
            Segment::Hot(h) => h.memory_bytes(),
            Segment::Cold(c) => c.memory_bytes(),
        }
    }

    /// Reads one segment of a [`BucketImage`], hot or cold.
    pub fn read(r: &mut Reader<'_>, pool: &mut ChunkPool) -> Result<Segment, SnapshotError> {
        match r.u8()? {
            0 => Ok(Segment::Hot(HotSegment::read(r, pool)?)),
            1 => Ok(Segment::Cold(ColdSegment::read(r)?)),
            other => Err(SnapshotError(format!("bad segment tag {other}"))),
        }
    }
}

/// The least bytes a segment takes in an image: a tag, a number and two times.
const SEGMENT_IMAGE_BYTES_MIN: u64 = 1 + 4 + 2 * 8;

/// Bits per key of a group's filter: a false positive costs a look at the group's
/// segment filters, not a read, so it can be looser than theirs (about 1 %).
const GROUP_BLOOM_BITS_PER_KEY: usize = 10;
/// Cold segments per group filter.
pub(crate) const GROUP_SEGMENTS: usize = 8;
/// A cold segment in no group.
pub(crate) const NO_GROUP: u32 = u32::MAX;
/// Bits per key of a bucket's whole filter (about 1 % false positives at its planned
/// size), and how far past that size it may fill (5 bits per key, about 10 %) before
/// it is given up.
const WHOLE_BLOOM_BITS_PER_KEY: usize = 10;
const WHOLE_OVERFILL: usize = 2;

/// One filter over the keys of every segment a bucket spills, sized when it spills
/// its first (from the bucket before it: streams keep their rate). A probe's interval
/// covers every bucket of the window and the key is in one or two of them: for the
/// others one check replaces a check of each group (a dozen per bucket at 32 MiB).
#[derive(Default)]
enum Whole {
    /// The bucket has not spilled since it was created or loaded.
    #[default]
    Unplanned,
    Building {
        filter: Bloom,
        keys: usize,
        keys_planned: usize,
    },
    /// No estimate of its size when it first spilled, or it outgrew the plan.
    Off,
}

/// Key filters over groups of a bucket's cold segments, in front of the segments' own.
/// A probe's interval overlaps every bucket of the window (9 for a one-hour join), and
/// a spilled bucket holds one filter per segment (dozens when the budget is small):
/// checking each of them for every probe took a fifth of a spilling run's CPU, for a
/// key that is in one segment at most. A group's filter covers exactly the segments
/// that name it, so a probe checks one filter per group and the segments' filters only
/// in a group that may hold the key. Hot segments and cold ones not (yet) in a group
/// are checked one by one, as before.
#[derive(Default)]
pub(crate) struct SegmentGroups {
    filters: Vec<Bloom>,
    /// The spilled segments not yet in a group, and the high halves of their key
    /// hashes (see [`group_hash`]).
    pending: Vec<u32>,
    pending_hashes: Vec<u32>,
    whole: Whole,
}

impl SegmentGroups {
    pub fn memory_bytes(&self) -> usize {
        let whole = match &self.whole {
            Whole::Building { filter, .. } => filter.bytes(),
            Whole::Unplanned | Whole::Off => 0,
        };
        whole
            + self.filters.iter().map(Bloom::bytes).sum::<usize>()
            + (self.pending.capacity() + self.pending_hashes.capacity())
                * std::mem::size_of::<u32>()
    }

    pub fn len(&self) -> usize {
        self.filters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Takes the `keys` key hashes of segment `number`, about to spill, in one pass:
    /// into the bucket's whole filter, and for the segment's group. Returns whether the
    /// whole filter covers the segment. The first spill plans the filter for
    /// `keys_expected` keys (none: no filter for this bucket); one that outgrows its
    /// plan is given up, and covers nothing from then on.
    pub fn add_spilled(
        &mut self,
        number: u32,
        keys_expected: Option<usize>,
        keys: usize,
        hashes: impl Iterator<Item = u64>,
    ) -> bool {
        let in_whole = self.plan_whole(keys_expected, keys);
        self.pending.push(number);
        self.pending_hashes.reserve_exact(keys);
        let mut whole = match &mut self.whole {
            Whole::Building { filter, .. } if in_whole => Some(filter),
            _ => None,
        };
        for hash in hashes {
            if let Some(filter) = whole.as_mut() {
                filter.insert(whole_hash(hash));
            }
            self.pending_hashes.push((hash >> 32) as u32);
        }
        in_whole
    }

    /// Makes room in the whole filter for `keys` more keys, planning it on the first
    /// spill; false if there is none (any more).
    fn plan_whole(&mut self, keys_expected: Option<usize>, keys: usize) -> bool {
        if matches!(self.whole, Whole::Unplanned) {
            // Groups form only after the filter is planned, so that every grouped
            // segment is in it (see `excludes`).
            debug_assert!(self.filters.is_empty() && self.pending.is_empty());
            self.whole = match keys_expected {
                Some(planned) => Whole::Building {
                    filter: Bloom::with_bits_per_key(planned, WHOLE_BLOOM_BITS_PER_KEY),
                    keys: 0,
                    keys_planned: planned,
                },
                None => Whole::Off,
            };
        }
        let Whole::Building {
            keys: held,
            keys_planned,
            ..
        } = &mut self.whole
        else {
            return false;
        };
        *held += keys;
        if *held > *keys_planned * WHOLE_OVERFILL {
            self.whole = Whole::Off;
            return false;
        }
        true
    }

    /// Whether the whole filter is there (planned and not given up): then it covers
    /// every segment marked `in_whole`.
    pub fn whole_covers(&self) -> bool {
        matches!(self.whole, Whole::Building { .. })
    }

    /// True when no segment the whole filter covers holds the key. Every grouped
    /// segment is covered then: the filter was planned at the bucket's first spill,
    /// before any group.
    #[inline]
    pub fn excludes(&self, hash: u64) -> bool {
        match &self.whole {
            Whole::Building { filter, .. } => !filter.may_contain(whole_hash(hash)),
            Whole::Unplanned | Whole::Off => false,
        }
    }

    /// Fetches into cache what checking the whole filter, or else every group
    /// filter, for `hash` reads.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        if let Whole::Building { filter, .. } = &self.whole {
            filter.prefetch(whole_hash(hash));
            return;
        }
        let hash = group_hash((hash >> 32) as u32);
        for filter in &self.filters {
            filter.prefetch(hash);
        }
    }

    /// Whether group `group`'s segments may hold the key.
    #[inline]
    pub fn may_contain(&self, group: usize, hash: u64) -> bool {
        self.filters[group].may_contain(group_hash((hash >> 32) as u32))
    }
}

/// The whole filter's hash of a key: mixed, so that its false positives are
/// independent of the segments' filters (which take the key hash as it is).
#[inline]
fn whole_hash(hash: u64) -> u64 {
    let z = (hash ^ (hash >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 29)
}

/// A group filter's hash of a key: rebuilt from the high half of its 64-bit hash
/// (which is all a bucket keeps of a spilled segment's keys until they are grouped),
/// mixed so that the filter's block and bits are independent.
#[inline]
fn group_hash(high: u32) -> u64 {
    let z = u64::from(high).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (z ^ (z >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

/// All state of one side whose event times fall in `[id * width, (id + 1) * width)`.
#[derive(Default)]
pub(crate) struct Bucket {
    pub segments: Vec<Segment>,
    /// The number the next segment of this bucket gets.
    pub next_segment_number: u32,
    pub groups: SegmentGroups,
}

/// A bucket as a checkpoint sees it, written after the barrier by another thread.
pub(crate) struct BucketImage {
    next_segment_number: u32,
    hot: Vec<HotImage>,
    cold: Vec<ColdSegment>,
    /// The segments in the bucket's order: hot (true) or cold, by position in its list.
    order: Vec<bool>,
}

impl BucketImage {
    pub fn write(&self, w: &mut Writer<'_>) {
        w.u32(self.next_segment_number);
        w.len(self.order.len());
        let (mut hot, mut cold) = (self.hot.iter(), self.cold.iter());
        for &is_hot in &self.order {
            if is_hot {
                w.u8(0);
                hot.next().expect("one per hot entry").write(w);
            } else {
                w.u8(1);
                cold.next().expect("one per cold entry").write(w);
            }
        }
    }
}

impl Bucket {
    /// Seals the bucket's hot segments and shares them with a checkpoint image: the
    /// pause of a checkpoint is this, not the writing of the events.
    pub fn image(&mut self) -> BucketImage {
        let mut image = BucketImage {
            next_segment_number: self.next_segment_number,
            hot: Vec::new(),
            cold: Vec::new(),
            order: Vec::with_capacity(self.segments.len()),
        };
        for segment in &mut self.segments {
            match segment {
                Segment::Hot(hot) => {
                    image.hot.push(hot.image());
                    image.order.push(true);
                }
                Segment::Cold(cold) => {
                    image.cold.push(cold.image());
                    image.order.push(false);
                }
            }
        }
        image
    }

    /// Reads what [`BucketImage::write`] writes before the segments: an empty bucket,
    /// with room for the number of segments that follow (read them with
    /// [`Segment::read`]). A load takes segments one at a time, so that the memory
    /// budget can be enforced between two.
    pub fn read_header(r: &mut Reader<'_>) -> Result<(Bucket, usize), SnapshotError> {
        let next_segment_number = r.u32()?;
        let count = r.count(SEGMENT_IMAGE_BYTES_MIN)?;
        let bucket = Bucket {
            segments: Vec::with_capacity(count),
            next_segment_number,
            groups: SegmentGroups::default(),
        };
        Ok((bucket, count))
    }

    pub fn segment_mut(&mut self, number: u32) -> Option<&mut Segment> {
        self.segments.iter_mut().find(|s| s.number() == number)
    }

    /// Puts the spilled segments not yet in a group into one, when there are
    /// [`GROUP_SEGMENTS`] of them, or at least two and `last`: the bucket takes no more
    /// events and holds no hot segment. Returns the change in the groups' memory.
    ///
    /// Not when the group would be the bucket's only one and cover only segments its
    /// whole filter covers: it would answer what the whole filter answers, at the same
    /// 10 bits a key. The segments stay ungrouped (a probe the whole filter lets
    /// through checks their filters, fewer than [`GROUP_SEGMENTS`]) and their pending
    /// hashes are dropped.
    pub fn group(&mut self, last: bool) -> isize {
        let g = &mut self.groups;
        let enough = g.pending.len() >= GROUP_SEGMENTS
            || (last
                && g.pending.len() >= 2
                && !self.segments.iter().any(|s| matches!(s, Segment::Hot(_))));
        if !enough {
            return 0;
        }
        let before = g.memory_bytes() as isize;
        let whole_suffices = last
            && g.filters.is_empty()
            && g.whole_covers()
            && self.segments.iter().all(|s| match s {
                Segment::Cold(cold) => cold.in_whole || !g.pending.contains(&cold.number),
                Segment::Hot(_) => true,
            });
        if whole_suffices {
            g.pending = Vec::new();
            g.pending_hashes = Vec::new();
            return g.memory_bytes() as isize - before;
        }
        let mut bloom = Bloom::with_bits_per_key(g.pending_hashes.len(), GROUP_BLOOM_BITS_PER_KEY);
        for &high in &g.pending_hashes {
            bloom.insert(group_hash(high));
        }
        let group = g.filters.len() as u32;
        g.filters.push(bloom);
        for segment in &mut self.segments {
            if let Segment::Cold(cold) = segment {
                if g.pending.contains(&cold.number) {
                    cold.group = group;
                }
            }
        }
        g.pending = Vec::new();
        g.pending_hashes = Vec::new();
        g.memory_bytes() as isize - before
    }
}

/// Appends one event to a cold value: ordinal, time, payload length, payload.
fn encode_event(out: &mut Vec<u8>, ordinal: u32, time: i64, payload: &[u8]) {
    out.extend_from_slice(&ordinal.to_le_bytes());
    out.extend_from_slice(&time.to_le_bytes());
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .expect("payloads are at most a line long")
            .to_le_bytes(),
    );
    out.extend_from_slice(payload);
}

/// Calls `visit` with (ordinal, time, payload) of every event in a cold value.
///
/// # Panics
/// On a value that [`encode_event`] did not write: the store returned corrupt data.
pub(crate) fn decode_events(mut value: &[u8], mut visit: impl FnMut(usize, i64, &[u8])) {
    while !value.is_empty() {
        let (head, rest) = value.split_at(16);
        let ordinal = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
        let time = i64::from_le_bytes(head[4..12].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) as usize;
        let (payload, rest) = rest.split_at(len);
        visit(ordinal as usize, time, payload);
        value = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole filter never rules out a key of a segment it covers, rules out most
    /// others, keeps the plan of the first spill, and excludes nothing once given up.
    #[test]
    fn whole_filter_covers_its_segments_until_it_outgrows_its_plan() {
        let hash = |i: u64| crate::key::hash_key(&i.to_le_bytes());
        let mut g = SegmentGroups::default();
        assert!(g.add_spilled(0, Some(1_000), 600, (0..600).map(hash)));
        // A later estimate does not re-plan it.
        assert!(g.add_spilled(1, Some(1), 900, (600..1_500).map(hash)));
        assert!(
            (0..1_500).all(|i| !g.excludes(hash(i))),
            "no false negatives"
        );
        let ruled_out = (10_000..20_000).filter(|&i| g.excludes(hash(i))).count();
        assert!(
            ruled_out > 9_000,
            "{ruled_out} of 10,000 unknown keys ruled out"
        );
        // 2,001 keys planned for 1,000: given up, and its memory with it.
        let before = g.memory_bytes();
        assert!(!g.add_spilled(2, Some(1_000), 501, (1_500..2_001).map(hash)));
        assert!((10_000..20_000).all(|i| !g.excludes(hash(i))));
        assert!(
            g.memory_bytes() < before + 501 * 4,
            "the filter's memory is given back"
        );
        assert!(!g.add_spilled(3, Some(10_000), 1, std::iter::once(hash(1))));

        let mut unplanned = SegmentGroups::default();
        assert!(!unplanned.add_spilled(0, None, 10, (0..10).map(hash)));
        assert!(!unplanned.excludes(hash(99)));
    }

    #[test]
    fn freeze_groups_events_by_key_in_key_order() {
        let mut seg = HotSegment::default();
        let mut pool = ChunkPool::default();
        // Two keys forced into one hash chain, as on a hash collision.
        seg.push(1, b"b", 10, [b"b10", b""], false, &mut pool);
        seg.push(1, b"a", 11, [b"a11", b""], true, &mut pool);
        seg.push(1, b"b", 12, [b"b12", b""], false, &mut pool);
        seg.push(2, b"c", 13, [b"c13", b""], false, &mut pool);
        let mut scratch = Vec::new();
        let hashes: Vec<u64> = seg.key_hashes().collect();
        let mut order = Vec::new();
        let (mut frozen, bloom) = seg.freeze(&hashes, &mut order, &mut scratch);
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        frozen
            .each(&mut |k, v| {
                entries.push((k.to_vec(), v.to_vec()));
                Ok(())
            })
            .expect("collecting cannot fail");
        let keys: Vec<&[u8]> = entries.iter().map(|e| &e.0[..]).collect();
        assert_eq!(keys, vec![&b"a"[..], b"b", b"c"]);
        let mut b_events = Vec::new();
        decode_events(&entries[1].1, |ord, t, p| {
            b_events.push((ord, t, p.to_vec()))
        });
        b_events.sort();
        assert_eq!(
            b_events,
            vec![(0, 10, b"b10".to_vec()), (2, 12, b"b12".to_vec())]
        );
        assert!(bloom.may_contain(1) && bloom.may_contain(2));
    }

    /// The spill's order is byte order, then newest first: for short keys (zero
    /// padding ties them with keys that continue in zeros) and long ones, keys that
    /// share 16 or 24 bytes, and repeated keys.
    #[test]
    fn the_spill_order_is_byte_order_then_newest_first() {
        let mut keys: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            b"ab".to_vec(),
            b"ab\0".to_vec(),
            b"ab\0\x01".to_vec(),
            [b"0123456789abcdef".as_slice(), b"x"].concat(),
            b"0123456789abcdef".to_vec(),
            [b"0123456789abcdef".as_slice(), b"\0"].concat(),
            [b"0123456789abcdeg".as_slice(), b"\0"].concat(),
            vec![0xff; 17],
            [b"0123456789abcdef01234567".as_slice(), b"x"].concat(),
            b"0123456789abcdef01234567".to_vec(),
            [b"0123456789abcdef01234567".as_slice(), b"\0"].concat(),
            [b"0123456789abcdef0123456".as_slice(), b"\0"].concat(),
            vec![0xff; 24],
            vec![0xff; 25],
        ];
        let mut z = 7u64;
        for _ in 0..500 {
            z = z
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (z >> 59) as usize + 10;
            // Few distinct bytes, so that long shared prefixes are common.
            keys.push((0..len).map(|i| ((z >> (i % 50)) & 3) as u8).collect());
        }
        // Every key three times: events of one key, told apart by their ordinals.
        let events: Vec<&[u8]> = keys
            .iter()
            .chain(&keys)
            .chain(&keys)
            .map(Vec::as_slice)
            .collect();
        let mut order: Vec<SpillOrder> = events
            .iter()
            .enumerate()
            .map(|(i, key)| SpillOrder::new(key, i as u32))
            .collect();
        order.sort_unstable_by(|a, b| a.cmp(b, |i| events[i as usize]));
        let mut want: Vec<(&[u8], std::cmp::Reverse<u32>)> = events
            .iter()
            .enumerate()
            .map(|(i, &key)| (key, std::cmp::Reverse(i as u32)))
            .collect();
        want.sort();
        let got: Vec<(&[u8], std::cmp::Reverse<u32>)> = order
            .iter()
            .map(|o| (events[o.ordinal as usize], std::cmp::Reverse(o.ordinal)))
            .collect();
        assert_eq!(got, want);
        // Neighbours told apart as other keys have other keys.
        for pair in order.windows(2) {
            let (a, b) = (
                events[pair[0].ordinal as usize],
                events[pair[1].ordinal as usize],
            );
            assert!(!pair[0].other_key(&pair[1]) || a != b, "{a:?} {b:?}");
        }
        assert_eq!(std::mem::size_of::<SpillOrder>(), 32);
    }

    #[test]
    fn records_keep_their_lengths_in_the_arena_and_a_bad_one_is_refused() {
        let mut seg = HotSegment::default();
        let mut pool = ChunkPool::default();
        let long = vec![b'p'; 300]; // a payload length of two bytes
        seg.push(7, b"key", 1, [b"{", &long], true, &mut pool);
        seg.push(8, b"", 2, [b"", b""], false, &mut pool);
        let mut seen = Vec::new();
        seg.for_each(|m, k, t, p| seen.push((m, k.to_vec(), t, p.len())));
        assert_eq!(
            seen,
            vec![(true, b"key".to_vec(), 1, 301), (false, vec![], 2, 0)]
        );
        let mut image = Vec::new();
        let mut w = Writer::new(&mut image);
        seg.image().write(&mut w);
        w.finish().expect("a Vec takes every byte");
        let read = |image: &[u8]| {
            let mut input = image;
            let mut r = Reader::new(&mut input, image.len() as u64);
            HotSegment::read(&mut r, &mut ChunkPool::default())
        };
        let back = read(&image).expect("the image reads");
        let mut again = Vec::new();
        back.for_each(|m, k, t, p| again.push((m, k.to_vec(), t, p.len())));
        assert_eq!(again, seen);
        // The first record's key length, made longer than the arena: refused.
        let at = 4 + 8 + 8 + 8 + 8; // number, times, chunk count, first chunk's length
        assert_eq!(
            image[at], 3,
            "the first record starts with its key's length"
        );
        let mut bad = image.clone();
        bad[at] = 0x7f;
        let err = read(&bad)
            .err()
            .expect("a record past the arena is refused");
        assert!(err.to_string().contains("outside the segment"), "{err}");
    }

    #[test]
    fn probe_checks_key_bytes_and_time() {
        let mut seg = HotSegment::default();
        let mut pool = ChunkPool::default();
        seg.push(1, b"a", 10, [b"x", b""], false, &mut pool);
        seg.push(1, b"b", 10, [b"y", b""], false, &mut pool);
        seg.push(1, b"a", 20, [b"z", b""], false, &mut pool);
        let mut hits = Vec::new();
        seg.probe(1, b"a", 0, 15, |ord, p| hits.push((ord, p.to_vec())));
        assert_eq!(hits, vec![(0, b"x".to_vec())]);
    }
}
