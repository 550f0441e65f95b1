//! The ids of retained events, for de-duplication (SPEC §3, "Duplicates").
//!
//! Ids are kept by their hash with the bucket that holds the event, and are forgotten
//! when that bucket expires. The set is split into [`ID_PARTS`] tables so that growing
//! it never doubles the whole set at once: one big table reallocating from 64 MiB to
//! 128 MiB would hold both for a moment, far beyond the budget.
//!
//! A part is an open-addressing table with linear probing over the id's low word; the
//! part is chosen by the top bits of its high word. Most ids are new, so an insert is a
//! search that ends at a vacant entry: the table stays at most [`LOAD_NUMERATOR`] /
//! [`LOAD_DENOMINATOR`] full to keep that search short, and [`IdSet::prefetch`] lets the
//! join fetch an id's first entry a few events ahead (a set of millions of ids misses
//! the cache on nearly every insert).
//!
//! An entry is 16 bytes: the id's low word, 32 bits of its high word and the number of
//! its bucket in a small table of buckets. With the part's 6 bits, 102 bits of the
//! 128-bit hash tell ids apart: n retained ids hold two different ids taken for one (a
//! false duplicate) with probability about n² / 2^103, 1 in 10^13 for a billion ids.
//!
//! Forgetting is lazy: an expired bucket is only marked forgotten, and its entries are
//! dead from then on (a search passes over them, an insert takes the first it passes
//! over). A part drops its dead entries when it is full, before it would grow, and the
//! whole set does when dead entries are as many as live ones. Before, every expiry
//! swept every part: 5 % of the take-rate job's CPU.

use std::sync::Arc;

use crate::snapshot::{Reader, SnapshotError, Writer};

const ID_PARTS: usize = 64;
/// Bits of the id hash's high word that choose its part.
const PART_BITS: u32 = 6;
/// A part grows (doubles) before it is more than this full.
const LOAD_NUMERATOR: usize = 3;
const LOAD_DENOMINATOR: usize = 4;
/// Entries of a part's first table: small, since 64 parts of it are the floor of a
/// small join's memory.
const PART_CAPACITY_MIN: usize = 8;
/// Memory of one entry.
const ID_ENTRY_BYTES: usize = std::mem::size_of::<Entry>();
/// Memory of one bucket number in [`IdSet::names`].
const NAME_BYTES: usize = std::mem::size_of::<Name>();
/// Bytes of one entry in an image: the id hash and the bucket.
const ID_IMAGE_BYTES: u64 = 16 + 8;
/// The bucket number of a vacant entry.
const VACANT: u32 = u32::MAX;

/// The kept bits of an id hash (the module's doc) but the part's, and the number of its
/// bucket in [`IdSet::names`].
#[derive(Clone, Copy)]
struct Entry {
    low: u64,
    high: u32,
    bucket: u32,
}

const VACANT_ENTRY: Entry = Entry {
    low: 0,
    high: 0,
    bucket: VACANT,
};

#[derive(Clone, Default)]
struct Part {
    /// A power of two long, or empty before the first insert.
    entries: Vec<Entry>,
    /// Entries that are not vacant, dead ones included.
    len: usize,
}

/// A bucket number: the bucket it stands for, whether that bucket is forgotten, and how
/// many entries name it (a forgotten number is given again once none does).
#[derive(Clone, Copy)]
struct Name {
    bucket: i64,
    forgotten: bool,
    entries: u64,
}

/// What an insert did.
#[derive(PartialEq, Eq)]
enum Inserted {
    /// Into a vacant entry.
    New,
    /// Over a dead entry, which named this bucket number.
    OverDead(u32),
    /// Nothing: the id is remembered, in a live entry.
    Repeat,
}

impl Part {
    /// The entries a table needs to hold `len` ids within the load limit.
    fn capacity_for(len: usize) -> usize {
        let mut capacity = PART_CAPACITY_MIN;
        while len * LOAD_DENOMINATOR > capacity * LOAD_NUMERATOR {
            capacity *= 2;
        }
        capacity
    }

    fn first(&self, low: u64) -> usize {
        low as usize & (self.entries.len() - 1)
    }

    /// Whether one more entry would pass the load limit.
    fn full(&self) -> bool {
        (self.len + 1) * LOAD_DENOMINATOR > self.entries.len() * LOAD_NUMERATOR
    }

    /// Inserts `entry` unless its id is in a live entry; the caller has made room.
    /// `names` tells dead entries (their bucket forgotten) apart.
    fn insert(&mut self, entry: Entry, names: &[Name]) -> Inserted {
        debug_assert!(!self.full());
        let mask = self.entries.len() - 1;
        let mut i = self.first(entry.low);
        let mut dead_at = None;
        loop {
            let e = self.entries[i];
            if e.bucket == VACANT {
                return match dead_at {
                    Some(d) => {
                        let old = std::mem::replace(&mut self.entries[d], entry);
                        Inserted::OverDead(old.bucket)
                    }
                    None => {
                        self.entries[i] = entry;
                        self.len += 1;
                        Inserted::New
                    }
                };
            }
            if names[e.bucket as usize].forgotten {
                dead_at.get_or_insert(i);
            } else if e.low == entry.low && e.high == entry.high {
                return Inserted::Repeat;
            }
            i = (i + 1) & mask;
        }
    }

    /// Moves the live entries into a new table of `capacity` entries; `dropped` is
    /// called with the bucket number of each dead one.
    fn resize(&mut self, capacity: usize, names: &[Name], mut dropped: impl FnMut(u32)) {
        let old = std::mem::replace(
            self,
            Part {
                entries: vec![VACANT_ENTRY; capacity],
                len: 0,
            },
        );
        let mask = capacity - 1;
        for e in old.occupied() {
            if names[e.bucket as usize].forgotten {
                dropped(e.bucket);
                continue;
            }
            let mut i = self.first(e.low);
            while self.entries[i].bucket != VACANT {
                i = (i + 1) & mask;
            }
            self.entries[i] = *e;
            self.len += 1;
        }
    }

    /// Keeps the entries `keep` accepts, in place. Entries are visited from just after
    /// a vacant one, so that no run of occupied entries wraps past the start: each kept
    /// entry is taken out and put back at the first vacant entry from its home, which
    /// is at or before where it was, after every entry before it in its run is settled.
    fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) {
        let capacity = self.entries.len();
        let Some(start) = self.entries.iter().position(|e| e.bucket == VACANT) else {
            return; // Empty (never at full load: the table grows first).
        };
        let mask = capacity - 1;
        for step in 1..=capacity {
            let i = (start + step) & mask;
            let e = self.entries[i];
            if e.bucket == VACANT {
                continue;
            }
            self.entries[i] = VACANT_ENTRY;
            if !keep(&e) {
                self.len -= 1;
                continue;
            }
            let mut j = self.first(e.low);
            while self.entries[j].bucket != VACANT {
                j = (j + 1) & mask;
            }
            self.entries[j] = e;
        }
    }

    fn occupied(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.bucket != VACANT)
    }

    /// Drops the dead entries in place, then resizes the part to what its live entries
    /// and one more need if it is smaller than that (it grows) or four times that or
    /// more (memory falls with the state); `dropped` is called with each dead entry's
    /// bucket number.
    /// Without dead entries anywhere (`any_dead` false) there is nothing to drop, and
    /// the part is only resized: growing costs one pass, as it did before forgetting
    /// was lazy.
    fn purge(&mut self, names: &[Name], any_dead: bool, mut dropped: impl FnMut(u32)) {
        if any_dead {
            self.retain(|e| {
                let live = !names[e.bucket as usize].forgotten;
                if !live {
                    dropped(e.bucket);
                }
                live
            });
        }
        let needed = Part::capacity_for(self.len + 1);
        if self.entries.len() < needed || self.entries.len() >= needed * 4 {
            self.resize(needed, names, |_| {});
        }
    }
}

/// Cloning is cheap: parts are shared until written (copy on write), so that a
/// checkpoint's copy costs nothing at the barrier and a part is copied only when the
/// shard changes it while the image is still being written.
#[derive(Clone)]
pub(crate) struct IdSet {
    parts: Vec<Arc<Part>>,
    /// The buckets entries name, by number. As long as the number of buckets the join
    /// holds ids of, plus forgotten ones whose dead entries are not all dropped yet.
    names: Vec<Name>,
    /// The bucket named last, with its number: events come nearly in time order.
    last_named: Option<(i64, u32)>,
    /// Entries the parts have room for, kept current so that memory is O(1) to read.
    capacity: usize,
    /// Entries, live and dead, and dead ones.
    occupied: u64,
    dead: u64,
}

impl Default for IdSet {
    fn default() -> IdSet {
        IdSet {
            parts: (0..ID_PARTS).map(|_| Arc::default()).collect(),
            names: Vec::new(),
            last_named: None,
            capacity: 0,
            occupied: 0,
            dead: 0,
        }
    }
}

/// The bits of `id` the set keeps, as it hands ids back: the low word, the high word's
/// low 32 bits and its top [`PART_BITS`].
#[cfg(test)]
fn kept(id: u128) -> u128 {
    let (low, high) = split(id);
    joined(low, high, part_of(id))
}

fn split(id: u128) -> (u64, u32) {
    (id as u64, (id >> 64) as u32)
}

/// The id whose kept bits are `low`, `high` and `part`: the inverse of [`split`] and
/// [`part_of`].
fn joined(low: u64, high: u32, part: usize) -> u128 {
    u128::from(low) | u128::from(high) << 64 | (part as u128) << (128 - PART_BITS)
}

fn part_of(id: u128) -> usize {
    (id >> (128 - PART_BITS)) as usize % ID_PARTS
}

impl IdSet {
    /// Remembers `id` as held by `bucket`; false if it was already remembered.
    pub fn insert(&mut self, id: u128, bucket: i64) -> bool {
        let number = self.name(bucket);
        let (low, high) = split(id);
        let p = part_of(id);
        if self.parts[p].full() {
            let before = self.parts[p].entries.len();
            let mut gone = vec![0; self.names.len()];
            let part = Arc::make_mut(&mut self.parts[p]);
            part.purge(&self.names, self.dead > 0, |n| gone[n as usize] += 1);
            self.capacity = self.capacity + part.entries.len() - before;
            self.forget_entries(&gone);
        }
        let shared = &mut self.parts[p];
        let before = shared.entries.len();
        let part = Arc::make_mut(shared);
        let inserted = part.insert(
            Entry {
                low,
                high,
                bucket: number,
            },
            &self.names,
        );
        self.capacity = self.capacity + part.entries.len() - before;
        match inserted {
            Inserted::Repeat => return false,
            Inserted::New => self.occupied += 1,
            Inserted::OverDead(old) => {
                self.dead -= 1;
                self.unname(old, 1);
                self.occupied += 1;
            }
        }
        self.names[number as usize].entries += 1;
        true
    }

    /// The number of `bucket` in [`IdSet::names`], given one if it has none.
    fn name(&mut self, bucket: i64) -> u32 {
        if let Some((b, n)) = self.last_named {
            if b == bucket {
                return n;
            }
        }
        let live = |name: &Name| !name.forgotten && name.bucket == bucket;
        let free = |name: &Name| name.forgotten && name.entries == 0;
        let named = Name {
            bucket,
            forgotten: false,
            entries: 0,
        };
        let n = match self.names.iter().position(live) {
            Some(n) => n,
            None => match self.names.iter().position(free) {
                Some(n) => {
                    self.names[n] = named;
                    n
                }
                None => {
                    self.names.push(named);
                    self.names.len() - 1
                }
            },
        };
        let n = u32::try_from(n).expect("fewer buckets than entries");
        self.last_named = Some((bucket, n));
        n
    }

    /// Counts `count` dead entries naming `number` dropped.
    fn unname(&mut self, number: u32, count: u64) {
        self.names[number as usize].entries -= count;
        self.occupied -= count;
    }

    /// Counts dropped dead entries, `gone[n]` of bucket number `n`.
    fn forget_entries(&mut self, gone: &[u64]) {
        for (n, &count) in gone.iter().enumerate() {
            if count > 0 {
                self.dead -= count;
                self.unname(n as u32, count);
            }
        }
    }

    /// A hint to fetch the entry where a search for `id` starts; changes nothing.
    #[inline]
    pub fn prefetch(&self, id: u128) {
        let part = &self.parts[part_of(id)];
        if !part.entries.is_empty() {
            crate::cache::prefetch(&part.entries[part.first(id as u64)]);
        }
    }

    /// Forgets the ids of every bucket up to and including `last`: their entries are
    /// dead from now on. They are dropped when their part fills up, or all at once
    /// here when dead entries are as many as live ones, which also gives memory back
    /// as the state shrinks.
    pub fn forget_up_to(&mut self, last: i64) {
        for name in &mut self.names {
            if !name.forgotten && name.bucket <= last {
                name.forgotten = true;
                self.dead += name.entries;
            }
        }
        self.last_named = None;
        if self.dead * 2 < self.occupied.max(1) {
            return;
        }
        let mut gone = vec![0; self.names.len()];
        for shared in &mut self.parts {
            if shared.len == 0 {
                continue;
            }
            Arc::make_mut(shared).purge(&self.names, true, |n| gone[n as usize] += 1);
        }
        self.forget_entries(&gone);
        debug_assert_eq!(self.dead, 0);
        self.capacity = self.parts.iter().map(|p| p.entries.len()).sum();
    }

    /// Visits every remembered id (its kept bits) with the bucket that holds its event.
    pub fn for_each(&self, mut visit: impl FnMut(u128, i64)) {
        for (p, part) in self.parts.iter().enumerate() {
            for e in part.occupied() {
                let name = self.names[e.bucket as usize];
                if !name.forgotten {
                    visit(joined(e.low, e.high, p), name.bucket);
                }
            }
        }
    }

    pub fn write(&self, w: &mut Writer<'_>) {
        w.len((self.occupied - self.dead) as usize);
        self.for_each(|id, bucket| {
            w.u128(id);
            w.i64(bucket);
        });
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
        self.capacity * ID_ENTRY_BYTES + self.names.capacity() * NAME_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ids` written to an image and read back.
    fn through_an_image(ids: &IdSet) -> IdSet {
        let mut image = Vec::new();
        let mut w = Writer::new(&mut image);
        ids.write(&mut w);
        w.finish().expect("a Vec takes every byte");
        let bytes = image.len() as u64;
        IdSet::read(&mut Reader::new(&mut image.as_slice(), bytes)).expect("the image reads")
    }

    #[test]
    fn remembers_until_forgotten() {
        let mut ids = IdSet::default();
        assert!(ids.insert(7, 1));
        assert!(!ids.insert(7, 2), "a repeat is refused");
        assert!(ids.insert(7 << 64, 2), "both halves count");
        assert!(ids.insert(7 | 1 << 127, 2), "the part's bits count");
        assert!(!ids.insert(7 | 1 << 100, 2), "bits 96 to 121 are not kept");
        assert_eq!(kept(7 | 1 << 100 | 1 << 127), 7 | 1 << 127);
        assert_eq!(
            kept(u128::MAX).count_ones(),
            102,
            "as the module's doc says"
        );
        ids.forget_up_to(1);
        assert!(ids.insert(7, 3), "forgotten with its bucket");
        assert!(!ids.insert(7 << 64, 3), "bucket 2 is still retained");
        let counted: usize = ids.parts.iter().map(|p| p.entries.len()).sum();
        assert_eq!(
            ids.memory_bytes(),
            counted * ID_ENTRY_BYTES + ids.names.capacity() * NAME_BYTES
        );
    }

    /// The kept capacity stays the parts' own while parts are shared with a snapshot
    /// and copied on write (the capacity is read before a copy, so it stays exact
    /// whatever capacity a copy gets), and when ids are forgotten.
    #[test]
    fn memory_stays_exact_across_copies_on_write() {
        let mut ids = IdSet::default();
        let counted = |ids: &IdSet| -> usize {
            ids.parts.iter().map(|p| p.entries.len()).sum::<usize>() * ID_ENTRY_BYTES
                + ids.names.capacity() * NAME_BYTES
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

    /// Forgetting a bucket whose entries are fewer than the live ones only marks them
    /// dead: they are not remembered (an insert takes them over), not visited, not in an
    /// image; parts drop them as they fill, so memory stays that of the live ids.
    #[test]
    fn forgotten_ids_are_dead_at_once_and_dropped_as_parts_fill() {
        let mut ids = IdSet::default();
        let id = |i: u128| kept(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835));
        for i in 0..3_000 {
            assert!(ids.insert(id(i), (i / 1_000) as i64));
        }
        let capacity = ids.capacity;
        ids.forget_up_to(0);
        assert_eq!(
            (ids.occupied, ids.dead),
            (3_000, 1_000),
            "marked, not swept"
        );
        assert_eq!(ids.capacity, capacity);
        let mut seen = 0;
        ids.for_each(|_, bucket| {
            assert!(bucket >= 1);
            seen += 1;
        });
        assert_eq!(seen, 2_000);
        assert!(ids.insert(id(5), 2), "a forgotten id is new again");
        assert!(!ids.insert(id(1_005), 2), "a live id is a repeat");
        // Many more rounds, each forgetting the one before last: the dead are dropped
        // as parts fill, and the parts stay the size of two rounds' ids.
        for round in 3..40u128 {
            for i in round * 1_000..(round + 1) * 1_000 {
                assert!(ids.insert(id(i), round as i64));
            }
            ids.forget_up_to(round as i64 - 2);
            let live: usize = (ids.occupied - ids.dead) as usize;
            assert!(live <= 2_001, "round {round}: {live} live");
        }
        assert!(
            ids.capacity <= 4 * capacity,
            "{} entries for at most 2,000 live ids, {capacity} for 3,000 at the start",
            ids.capacity
        );
        let read = through_an_image(&ids);
        assert_eq!(read.occupied, ids.occupied - ids.dead);
    }

    /// Against a model set over many ids: inserts, repeats, growth past several
    /// doublings, forgetting by bucket (which shrinks parts) and an image round trip.
    #[test]
    fn agrees_with_a_model_through_growth_and_forgetting() {
        use std::collections::HashMap;
        let mut ids = IdSet::default();
        let mut model: HashMap<u128, i64> = HashMap::new();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..6i64 {
            for _ in 0..20_000 {
                // Few distinct ids, so that repeats are common.
                let id = kept(
                    u128::from(next() % 60_000)
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
                );
                let bucket = round * 10 + (next() % 10) as i64;
                let new = !model.contains_key(&id);
                if new {
                    model.insert(id, bucket);
                }
                assert_eq!(ids.insert(id, bucket), new, "id {id:#x}");
            }
            let last = round * 10 - 5;
            ids.forget_up_to(last);
            model.retain(|_, b| *b > last);
            let mut seen = HashMap::new();
            ids.for_each(|id, bucket| {
                seen.insert(id, bucket);
            });
            assert_eq!(seen, model, "round {round}");
            let live: usize = ids.parts.iter().map(|p| p.len).sum();
            assert!(
                ids.memory_bytes() >= live * ID_ENTRY_BYTES * LOAD_DENOMINATOR / LOAD_NUMERATOR
            );
        }
        let read = through_an_image(&ids);
        let mut seen = HashMap::new();
        read.for_each(|id, bucket| {
            seen.insert(id, bucket);
        });
        assert_eq!(seen, model);
    }
}
