//! A naive reference join and a single-threaded driver of the real one, for property
//! tests here and in `braid-state`. The reference shares no code with the join: it
//! computes watermarks, lateness and duplicates its own way and joins by nested loops.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use crate::{
    hash_id, Event, EventTime, Join, JoinKind, JoinSink, JoinSpec, KeyPart, KeyWriter, PartitionId,
    Side, StateStore, StoreError, Watermark, Watermarks,
};

/// A key part owned by a test event.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TestKeyPart {
    Int(i64),
    Str(String),
}

/// One input event of a test, in arrival order.
#[derive(Clone, Debug)]
pub struct TestEvent {
    pub side: Side,
    pub key: Vec<TestKeyPart>,
    pub time: i64,
    pub id: Option<u64>,
    pub payload: String,
}

/// Result rows as text: `key#left|right`, with `null` for a missing side; sorted. The
/// key is the encoded join key in hex, so that a sink given a wrong key fails.
pub type Rows = Vec<String>;

/// What a run produced: the rows, and the indexes of the events found late.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub rows: Rows,
    pub late: Vec<usize>,
}

#[derive(Default)]
pub struct RowSink(pub Rows);

impl JoinSink for RowSink {
    fn pair(&mut self, key: &[u8], left: &[u8], right: &[u8]) {
        self.0
            .push(format!("{}#{}|{}", hex(key), text(left), text(right)));
    }
    fn unmatched(&mut self, side: Side, key: &[u8], event: &[u8]) {
        self.0.push(match side {
            Side::Left => format!("{}#{}|null", hex(key), text(event)),
            Side::Right => format!("{}#null|{}", hex(key), text(event)),
        });
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A test event's key, encoded as the join encodes keys: by [`KeyWriter`].
fn encoded(key: &[TestKeyPart]) -> String {
    hex(encode(key).bytes())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Drives the real join: lateness and watermarks per event as braid's driver does, the
/// join's watermark advanced at the end of each batch, `+inf` at the end.
pub fn run_join<S: StateStore>(
    join: &mut Join<S>,
    events: &[TestEvent],
    batch_sizes: &[usize],
    max_out_of_orderness_ms: i64,
    allowed_lateness_ms: i64,
) -> Result<Outcome, StoreError> {
    run_join_restarting(
        join,
        events,
        batch_sizes,
        max_out_of_orderness_ms,
        allowed_lateness_ms,
        usize::MAX,
    )
}

/// [`run_join`] with a checkpoint every `restart_every` batches. Every other checkpoint
/// replaces the join's in-memory state with its image, as a restore does; the others
/// let the join go on while the image is outstanding, as a checkpoint being written in
/// the background does, and check that the image written a batch later is byte for
/// byte the one written at the barrier.
pub fn run_join_restarting<S: StateStore>(
    join: &mut Join<S>,
    events: &[TestEvent],
    batch_sizes: &[usize],
    max_out_of_orderness_ms: i64,
    allowed_lateness_ms: i64,
    restart_every: usize,
) -> Result<Outcome, StoreError> {
    let mut batches = 0usize;
    let mut checkpoints = 0usize;
    let mut outstanding: Option<(crate::JoinImage, Vec<u8>)> = None;
    let mut marks = Watermarks::new(&[1, 1], max_out_of_orderness_ms, u64::MAX, 0);
    let mut sink = RowSink::default();
    let mut late = Vec::new();
    let mut next = 0;
    let mut sizes = batch_sizes.iter().copied().cycle();
    while next < events.len() {
        let size = sizes.next().unwrap_or(1).max(1);
        let end = (next + size).min(events.len());
        // The batch's admitted events, with their encoded keys.
        let admitted = admit(
            events,
            next..end,
            &mut marks,
            allowed_lateness_ms,
            &mut late,
        );
        let batch: Vec<Event<'_>> = admitted.iter().map(as_event).collect();
        join.on_batch(&batch, &mut sink)?;
        join.advance(marks.current(), &mut sink)?;
        next = end;
        if let Some((image, at_barrier)) = outstanding.take() {
            let mut later = Vec::new();
            image.write(&mut later).expect("a Vec takes every byte");
            assert!(later == at_barrier, "an image changed after its barrier");
        }
        batches += 1;
        if batches == restart_every {
            batches = 0;
            checkpoints += 1;
            join.flush_cold_probes(&mut sink)?;
            let image = join.snapshot();
            let mut bytes = Vec::new();
            image.write(&mut bytes).expect("a Vec takes every byte");
            if checkpoints % 2 == 1 {
                join.load(&bytes).expect("a snapshot loads");
            } else {
                outstanding = Some((image, bytes));
            }
        }
    }
    join.advance(Watermark::MAX, &mut sink)?;
    sink.0.sort();
    Ok(Outcome { rows: sink.0, late })
}

/// Drives the real join as [`run_join`] does, split by key over several joins (as
/// shards hold a partition split by key group): event `e` goes to join
/// `e.key_hash % n`. After batch `resplits[i].0` the state is re-split over
/// `resplits[i].1` joins with [`Join::split_into`], as a restore with another
/// parallelism does. Returns the outcome and the joins' counts, summed.
pub fn run_join_resplitting(
    spec: JoinSpec,
    memory_max_bytes: usize,
    events: &[TestEvent],
    batch_sizes: &[usize],
    max_out_of_orderness_ms: i64,
    first_pieces: usize,
    resplits: &[(usize, usize)],
) -> Result<(Outcome, crate::JoinCounts), StoreError> {
    let new_pieces = |n: usize| -> Vec<Join<crate::MemStore>> {
        (0..n.max(1))
            .map(|_| {
                let mut piece = Join::new(spec, crate::MemStore::default(), memory_max_bytes);
                // Mixed stored forms, moved between pieces of different shapes.
                piece.set_payload_mode(crate::PayloadMode::Auto);
                piece
            })
            .collect()
    };
    let mut pieces = new_pieces(first_pieces);
    let mut resplits = resplits.iter().copied().peekable();
    let mut batches = 0usize;
    let mut marks = Watermarks::new(&[1, 1], max_out_of_orderness_ms, u64::MAX, 0);
    let mut sink = RowSink::default();
    let mut late = Vec::new();
    let mut next = 0;
    let mut sizes = batch_sizes.iter().copied().cycle();
    while next < events.len() {
        let size = sizes.next().unwrap_or(1).max(1);
        let end = (next + size).min(events.len());
        let admitted = admit(
            events,
            next..end,
            &mut marks,
            spec.allowed_lateness_ms,
            &mut late,
        );
        let n = pieces.len() as u64;
        for (p, piece) in pieces.iter_mut().enumerate() {
            let batch: Vec<Event<'_>> = admitted
                .iter()
                .filter(|(_, _, hash)| hash % n == p as u64)
                .map(as_event)
                .collect();
            piece.on_batch(&batch, &mut sink)?;
            piece.advance(marks.current(), &mut sink)?;
        }
        next = end;
        batches += 1;
        while let Some((_, n)) = resplits.next_if(|&(at, _)| at <= batches) {
            let mut split = new_pieces(n);
            let ways = split.len() as u64;
            for mut old in pieces.drain(..) {
                // A re-split starts from a checkpoint, which flushed the probes.
                old.flush_cold_probes(&mut sink)?;
                old.split_into(&mut split, |hash| (hash % ways) as usize)?;
            }
            pieces = split;
        }
    }
    let mut counts = crate::JoinCounts::default();
    for piece in &mut pieces {
        piece.advance(Watermark::MAX, &mut sink)?;
        counts.add(&piece.counts());
    }
    sink.0.sort();
    Ok((Outcome { rows: sink.0, late }, counts))
}

/// An admitted test event: the event, its encoded key and the key's hash.
type Admitted<'e> = (&'e TestEvent, Vec<u8>, u64);

/// Decides lateness for `events[range]` as braid's driver does (against the watermark
/// before each event, which then observes it): late ones go to `late` by index, the
/// rest are returned with their encoded keys.
fn admit<'e>(
    events: &'e [TestEvent],
    range: std::ops::Range<usize>,
    marks: &mut Watermarks,
    allowed_lateness_ms: i64,
    late: &mut Vec<usize>,
) -> Vec<Admitted<'e>> {
    let mut admitted = Vec::new();
    for i in range {
        let event = &events[i];
        if marks
            .current()
            .is_late(EventTime(event.time), allowed_lateness_ms)
        {
            late.push(i);
        } else {
            let key = encode(&event.key);
            admitted.push((event, key.bytes().to_vec(), key.hash()));
        }
        marks.observe(event.side.index(), PartitionId(0), EventTime(event.time), 0);
        marks.update(0);
    }
    admitted
}

/// An admitted test event as the join takes it.
fn as_event<'a>((event, key, key_hash): &'a Admitted<'_>) -> Event<'a> {
    Event {
        side: event.side,
        key,
        key_hash: *key_hash,
        time: EventTime(event.time),
        id: event.id.map(|id| hash_id(&id.to_le_bytes())),
        payload: event.payload.as_bytes(),
    }
}

/// A test event's key, encoded.
fn encode(key: &[TestKeyPart]) -> KeyWriter {
    let mut writer = KeyWriter::default();
    for part in key {
        writer.push(match part {
            TestKeyPart::Int(v) => KeyPart::Int(*v),
            TestKeyPart::Str(s) => KeyPart::Str(s),
        });
    }
    writer
}

/// The reference: the relational interval join over the de-duplicated, non-late events,
/// plus the outer rows of its kind.
pub fn reference(events: &[TestEvent], spec: &JoinSpec, max_out_of_orderness_ms: i64) -> Outcome {
    let mut max_time: [Option<i64>; 2] = [None, None];
    let mut late = Vec::new();
    let mut seen_ids: [HashSet<u64>; 2] = Default::default();
    let mut admitted: [Vec<&TestEvent>; 2] = Default::default();
    for (i, e) in events.iter().enumerate() {
        let s = e.side.index();
        let watermark = match (max_time[0], max_time[1]) {
            (Some(l), Some(r)) => Some(i128::from(l.min(r)) - i128::from(max_out_of_orderness_ms)),
            _ => None,
        };
        let is_late = watermark
            .is_some_and(|w| i128::from(e.time) < w - i128::from(spec.allowed_lateness_ms));
        max_time[s] = Some(max_time[s].map_or(e.time, |m| m.max(e.time)));
        if is_late {
            late.push(i);
        } else if e.id.is_none_or(|id| seen_ids[s].insert(id)) {
            admitted[s].push(e);
        }
    }
    let mut rows = Vec::new();
    let mut matched: [HashMap<usize, bool>; 2] = Default::default();
    for (li, l) in admitted[0].iter().enumerate() {
        for (ri, r) in admitted[1].iter().enumerate() {
            let d = i128::from(r.time) - i128::from(l.time);
            if l.key == r.key && i128::from(spec.lower_ms) <= d && d <= i128::from(spec.upper_ms) {
                rows.push(format!("{}#{}|{}", encoded(&l.key), l.payload, r.payload));
                matched[0].insert(li, true);
                matched[1].insert(ri, true);
            }
        }
    }
    let outer_left = matches!(spec.kind, JoinKind::Left | JoinKind::Full);
    let outer_right = matches!(spec.kind, JoinKind::Right | JoinKind::Full);
    for (li, l) in admitted[0].iter().enumerate() {
        if outer_left && !matched[0].contains_key(&li) {
            rows.push(format!("{}#{}|null", encoded(&l.key), l.payload));
        }
    }
    for (ri, r) in admitted[1].iter().enumerate() {
        if outer_right && !matched[1].contains_key(&ri) {
            rows.push(format!("{}#null|{}", encoded(&r.key), r.payload));
        }
    }
    rows.sort();
    Outcome { rows, late }
}

// Strategies for property tests of the join.

/// One generated arrival: (side, key index, time step, jitter, extra lateness, duplicate?).
pub type Draw = (bool, usize, i64, i64, i64, bool);

fn keys() -> Vec<Vec<TestKeyPart>> {
    use TestKeyPart::{Int, Str};
    vec![
        vec![Int(1)],
        vec![Int(2)],
        vec![Str("1".into())],
        vec![Int(1), Str("x".into())],
        vec![Str("a".into()), Int(-5)],
    ]
}

/// Builds arrival-ordered events from draws: nominal times rise by `step`, each event's
/// time is its nominal time minus a jitter within the disorder bound, and sometimes minus
/// more (a late event); a duplicate repeats an earlier event of the same side.
pub fn build(draws: &[Draw], ooo_ms: i64) -> Vec<TestEvent> {
    let keys = keys();
    let mut nominal = 1_000_000;
    let mut events: Vec<TestEvent> = Vec::new();
    for (i, &(left, key, step, jitter, extra, duplicate)) in draws.iter().enumerate() {
        nominal += step;
        let side = if left { Side::Left } else { Side::Right };
        if duplicate {
            if let Some(original) = events.iter().rev().find(|e| e.side == side).cloned() {
                events.push(original);
                continue;
            }
        }
        events.push(TestEvent {
            side,
            key: keys[key].clone(),
            time: nominal - jitter.min(ooo_ms) - extra,
            id: Some(i as u64),
            payload: payload(if left { 'l' } else { 'r' }, i),
        });
    }
    events
}

/// Event `i`'s payload: plain text or JSON objects of three shapes, so that the join
/// stores some as they came and some by shape (`crate::shape`), and the reference
/// compares them byte for byte.
fn payload(side: char, i: usize) -> String {
    match i % 4 {
        0 => format!("{side}{i}"),
        1 => format!(r#"{{"side":"{side}","n":{i}}}"#),
        2 => {
            format!(r#"{{"side":"{side}","n":{i},"tags":["a,{i}",{{"b":1}}],"at":{{"t":"{i}"}}}}"#)
        }
        _ => format!(r#"{{"n": {i}, "side" : "{side}\"q:", "e":""}}"#),
    }
}

pub fn kinds() -> impl Strategy<Value = JoinKind> {
    prop_oneof![
        Just(JoinKind::Inner),
        Just(JoinKind::Left),
        Just(JoinKind::Right),
        Just(JoinKind::Full)
    ]
}

pub fn draws() -> impl Strategy<Value = Vec<Draw>> {
    let extra = prop_oneof![8 => Just(0i64), 1 => 1i64..5_000];
    let duplicate = prop::bool::weighted(0.1);
    prop::collection::vec(
        (
            any::<bool>(),
            0usize..5,
            0i64..700,
            0i64..3_000,
            extra,
            duplicate,
        ),
        0..120,
    )
}
