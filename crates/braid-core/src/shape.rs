//! Payloads kept by shape: the field names of a JSON line stored once per side, not once
//! per event.
//!
//! An NDJSON event repeats its field names in every line: on the take-rate data set they
//! are 69 of a line's 128 bytes. A side's [`Shapes`] cuts a payload into *literals*
//! (what lies between values: braces, names, quotes, colons, commas) and *values*, keeps
//! each distinct sequence of literals once (a *shape*), and stores the payload as the
//! number of its shape followed by its values, each after its length. Decoding puts the
//! literals back between the values, so the bytes come back exactly as they arrived,
//! whatever they are: the cut decides only what is shared, never what is kept.
//!
//! Stored form: one byte, the shape's number (1 to [`SHAPES_MAX`]), then per value its
//! length (LEB128) and its bytes; or a 0 byte and the payload as it came, for a payload
//! of a shape the side has no room for ([`SHAPES_MAX`] shapes or [`SHAPE_BYTES_MAX`]
//! bytes of literals), that does not start with `{` (not a JSON object), of no values
//! or more than [`VALUES_MAX`], or that its shape would not make shorter. A side's
//! shapes only grow: every stored payload names a shape that stays. They are part of a
//! checkpoint image.

use std::collections::HashMap;

use crate::leb128;
use crate::snapshot::{Reader, SnapshotError, Writer};

/// How a join keeps its events' payloads (`[state] payloads`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PayloadMode {
    /// As they came until the state passes [`AUTO_SHAPE_FRACTION`] of its budget, by
    /// shape from then on: a state that fits pays nothing for shapes (5-9 % of the
    /// take-rate job's time whole in memory), a state that does not soon holds only
    /// shaped payloads (spilling takes the oldest first), but spills more at first (5 %
    /// slower than `Shaped` at 256 MiB).
    Auto,
    /// By shape, always: the most events per byte of budget.
    #[default]
    Shaped,
    /// As they came, always.
    Verbatim,
}

/// [`PayloadMode::Auto`] keeps payloads by shape once the state holds more than this
/// fraction of its budget (1/2).
pub const AUTO_SHAPE_FRACTION: (usize, usize) = (1, 2);

/// Shapes a side keeps at most: a shape's number is one byte, 0 meaning "as it came".
pub(crate) const SHAPES_MAX: usize = 255;
/// Bytes of literals a side's shapes hold at most, all shapes together.
pub(crate) const SHAPE_BYTES_MAX: usize = 64 << 10;
/// Values a payload may have to be stored by shape.
pub(crate) const VALUES_MAX: usize = 256;
/// The marker of a payload stored as it came.
const VERBATIM: u8 = 0;
/// What a payload stored as it came starts with.
pub(crate) const VERBATIM_MARK: &[u8] = &[VERBATIM];
/// The least bytes a shape takes in an image: its literal count and one literal's length.
const SHAPE_IMAGE_BYTES_MIN: u64 = 8 + 8;

/// One shape: its literals end to end, and where each ends.
#[derive(Clone)]
struct Shape {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl Shape {
    #[inline]
    fn literal(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.bytes[start..self.ends[i] as usize]
    }

    fn values(&self) -> usize {
        self.ends.len() - 1
    }

    fn literals(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.ends.len()).map(|i| self.literal(i))
    }
}

/// The shapes of one side's payloads; see the module documentation. A clone (for a
/// checkpoint image) is at most [`SHAPE_BYTES_MAX`] and a few tables.
#[derive(Clone, Default)]
pub(crate) struct Shapes {
    shapes: Vec<Shape>,
    /// Shape numbers by the hash of their literals.
    by_hash: HashMap<u64, u8>,
    bytes: usize,
    /// Bytes of memory all of it takes.
    memory: usize,
    /// The number of the shape the last payload had, tried first (0: none yet).
    last: u8,
    /// Where each value of the payload being encoded starts and ends.
    values: Vec<(u32, u32)>,
}

impl Shapes {
    /// Bytes of memory the shapes hold (kept up to date as shapes are added: the join
    /// asks after every event).
    pub fn memory_bytes(&self) -> usize {
        self.memory
    }

    /// Adds a shape, keeping the count of bytes.
    fn add(&mut self, shape: Shape, hash: u64) -> u8 {
        self.bytes += shape.bytes.len();
        self.memory += shape.bytes.capacity()
            + shape.ends.capacity() * 4
            + std::mem::size_of::<Shape>()
            // A hash table entry, with its share of empty ones.
            + 2 * std::mem::size_of::<(u64, u8)>();
        self.shapes.push(shape);
        let number = self.shapes.len() as u8;
        self.by_hash.entry(hash).or_insert(number);
        number
    }

    /// Writes `payload`'s stored form into `out` (cleared first) and returns true; or
    /// returns false if it is stored as it came: [`VERBATIM_MARK`] then the payload
    /// (left to the caller, which need not copy it first).
    pub fn encode(&mut self, payload: &[u8], out: &mut Vec<u8>) -> bool {
        // Most payloads have the shape the one before had: matched and cut in one pass.
        if self.last != VERBATIM
            && self.encode_as(self.last, payload, out)
            && out.len() <= payload.len()
        {
            return true;
        }
        out.clear();
        // Only a JSON object is cut (anything else is not scanned for values), and one
        // without values is data, not a shape: it would take a shape of its own.
        let number = if payload.first() == Some(&b'{')
            && split(payload, &mut self.values)
            && !self.values.is_empty()
        {
            self.number_of(payload)
        } else {
            VERBATIM
        };
        if number != VERBATIM {
            out.push(number);
            for &(start, end) in &self.values {
                push_value(out, &payload[start as usize..end as usize]);
            }
            if out.len() <= payload.len() {
                return true;
            }
        }
        false
    }

    /// The payload whose stored form is `stored`: borrowed from it when it was stored
    /// as it came, else rebuilt in `out`. Bytes [`encode`](Self::encode) did not write
    /// (a corrupted image) decode to some bytes, never to a panic.
    pub fn decode<'a>(&self, stored: &'a [u8], out: &'a mut Vec<u8>) -> &'a [u8] {
        let Some((&number, mut rest)) = stored.split_first() else {
            return stored;
        };
        let Some(shape) = usize::from(number)
            .checked_sub(1)
            .and_then(|i| self.shapes.get(i))
        else {
            return rest;
        };
        out.clear();
        for i in 0..shape.values() {
            out.extend_from_slice(shape.literal(i));
            let mut at = 0;
            let len = leb128::read(rest, &mut at).unwrap_or(0);
            let value = rest.get(at..).unwrap_or_default();
            let len = len.min(value.len());
            out.extend_from_slice(&value[..len]);
            rest = &value[len..];
        }
        out.extend_from_slice(shape.literal(shape.values()));
        out
    }

    /// Writes `payload`'s stored form by shape `number` into `out` if the payload has
    /// that shape's literals; false if not, with `out` holding a part of it. A value is
    /// cut at the first byte that can start the literal after it (a quote after a
    /// string, a comma or brace after a number), which is where [`split`] cuts it in
    /// JSON; on anything else the literal that follows does not match and the caller
    /// cuts the payload afresh. Any cut whose literals are the shape's decodes to the
    /// payload, so no cut can lose a byte.
    fn encode_as(&self, number: u8, payload: &[u8], out: &mut Vec<u8>) -> bool {
        let shape = &self.shapes[usize::from(number) - 1];
        out.clear();
        out.reserve(payload.len() + 1);
        out.push(number);
        let mut at = 0;
        let mut literal = shape.literal(0);
        for i in 0..shape.values() {
            if !starts_with(&payload[at..], literal) {
                return false;
            }
            at += literal.len();
            if payload.get(at) == Some(&b'[') {
                return false; // Arrays: `split` finds their end.
            }
            literal = shape.literal(i + 1);
            let end = match literal.first() {
                Some(&first) => find_byte(payload, at, first),
                None => payload.len(),
            };
            push_value(out, &payload[at..end]);
            at = end;
        }
        payload.len() - at == literal.len() && starts_with(&payload[at..], literal)
    }

    /// The number of the shape of `payload` (cut at `self.values`), added if it is new
    /// and there is room; [`VERBATIM`] if not.
    fn number_of(&mut self, payload: &[u8]) -> u8 {
        let hash = literals_hash(literals(payload, &self.values));
        let number = match self.by_hash.get(&hash) {
            Some(&number) if self.matches(number, payload) => number,
            Some(_) => return VERBATIM,
            None => {
                let literal_bytes = payload.len()
                    - self
                        .values
                        .iter()
                        .map(|&(s, e)| (e - s) as usize)
                        .sum::<usize>();
                if self.shapes.len() == SHAPES_MAX || self.bytes + literal_bytes > SHAPE_BYTES_MAX {
                    return VERBATIM;
                }
                let mut shape = Shape {
                    bytes: Vec::with_capacity(literal_bytes),
                    ends: Vec::with_capacity(self.values.len() + 1),
                };
                for literal in literals(payload, &self.values) {
                    shape.bytes.extend_from_slice(literal);
                    shape.ends.push(shape.bytes.len() as u32);
                }
                self.add(shape, hash)
            }
        };
        self.last = number;
        number
    }

    /// Whether `payload`, cut at `self.values`, has the literals of shape `number`.
    fn matches(&self, number: u8, payload: &[u8]) -> bool {
        let shape = &self.shapes[usize::from(number) - 1];
        shape.values() == self.values.len() && literals(payload, &self.values).eq(shape.literals())
    }

    pub fn write(&self, w: &mut Writer<'_>) {
        w.len(self.shapes.len());
        for shape in &self.shapes {
            w.len(shape.ends.len());
            for i in 0..shape.ends.len() {
                w.bytes(shape.literal(i));
            }
        }
    }

    /// Reads shapes as [`write`](Self::write) wrote them, refusing more than a side
    /// keeps.
    pub fn read(r: &mut Reader<'_>) -> Result<Shapes, SnapshotError> {
        let mut shapes = Shapes::default();
        let count = r.count(SHAPE_IMAGE_BYTES_MIN)?;
        if count > SHAPES_MAX {
            return Err(SnapshotError(format!(
                "{count} payload shapes, more than the {SHAPES_MAX} a side keeps"
            )));
        }
        for number in 1..=count {
            let literals = r.count(8)?;
            if literals == 0 || literals > VALUES_MAX + 1 {
                return Err(SnapshotError(format!(
                    "payload shape {number} has {literals} literals, not 1 to {}",
                    VALUES_MAX + 1
                )));
            }
            let mut shape = Shape {
                bytes: Vec::new(),
                ends: Vec::with_capacity(literals),
            };
            for _ in 0..literals {
                let len = r.len()?;
                if shapes.bytes + shape.bytes.len() + len > SHAPE_BYTES_MAX {
                    return Err(SnapshotError(format!(
                        "payload shapes of more than the {SHAPE_BYTES_MAX} bytes a side keeps"
                    )));
                }
                r.append(&mut shape.bytes, len)?;
                shape.ends.push(shape.bytes.len() as u32);
            }
            let hash = literals_hash(shape.literals());
            shapes.add(shape, hash);
        }
        Ok(shapes)
    }
}

/// Whether `bytes` starts with `prefix`: a literal is a few bytes, compared a word at a
/// time without a call (the last word overlapping the one before).
#[inline]
fn starts_with(bytes: &[u8], prefix: &[u8]) -> bool {
    let n = prefix.len();
    if bytes.len() < n {
        return false;
    }
    let word = |b: &[u8], i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let half = |b: &[u8], i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    if n >= 8 {
        (0..n - 8)
            .step_by(8)
            .all(|i| word(bytes, i) == word(prefix, i))
            && word(bytes, n - 8) == word(prefix, n - 8)
    } else if n >= 4 {
        half(bytes, 0) == half(prefix, 0) && half(bytes, n - 4) == half(prefix, n - 4)
    } else {
        bytes[..n] == *prefix
    }
}

/// The index of the first `byte` in `p` from `from`, or `p`'s length: eight bytes at a
/// time (a word whose XOR with the byte repeated has a zero byte holds it).
#[inline]
fn find_byte(p: &[u8], from: usize, byte: u8) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let repeated = ONES * u64::from(byte);
    let mut i = from;
    while i + 8 <= p.len() {
        let x = u64::from_le_bytes(p[i..i + 8].try_into().expect("8 bytes")) ^ repeated;
        let zeros = x.wrapping_sub(ONES) & !x & HIGHS;
        if zeros != 0 {
            // The lowest flagged byte is the first zero (borrows only run upwards).
            return i + (zeros.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    p[i..]
        .iter()
        .position(|&b| b == byte)
        .map_or(p.len(), |at| i + at)
}

/// The literals of `payload` cut at `values`, in order.
fn literals<'a>(
    payload: &'a [u8],
    values: &'a [(u32, u32)],
) -> impl Iterator<Item = &'a [u8]> + 'a {
    let starts = std::iter::once(0).chain(values.iter().map(|&(_, end)| end as usize));
    let ends = values
        .iter()
        .map(|&(start, _)| start as usize)
        .chain(std::iter::once(payload.len()));
    starts
        .zip(ends)
        .map(move |(start, end)| &payload[start..end])
}

/// A hash of a sequence of literals (FNV-1a, each literal closed by its length, so that
/// where literals end counts).
fn literals_hash<'a>(literals: impl Iterator<Item = &'a [u8]>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for literal in literals {
        for &b in literal.iter().chain(&(literal.len() as u32).to_le_bytes()) {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// Cuts `p` into literals and values, writing where each value starts and ends into
/// `values`; false if it has more than [`VALUES_MAX`]. A value is what follows a `:`
/// outside strings (and the spaces after it): a string's contents (its quotes are
/// literals), an array whole, or anything else up to a `,`, `}`, `]` or white space. An
/// object after a `:` is not a value: its names are literals and its fields' values are
/// values.
fn split(p: &[u8], values: &mut Vec<(u32, u32)>) -> bool {
    values.clear();
    let n = p.len();
    let mut i = 0;
    while i < n {
        match p[i] {
            b'"' => i = (string_end(p, i + 1) + 1).min(n),
            b':' => {
                i += 1;
                while i < n && p[i] == b' ' {
                    i += 1;
                }
                if i == n || p[i] == b'{' {
                    continue;
                }
                // The next literal starts at a string's closing quote, after it.
                let (start, end, next) = match p[i] {
                    b'"' => {
                        let close = string_end(p, i + 1);
                        (i + 1, close, (close + 1).min(n))
                    }
                    b'[' => {
                        let end = array_end(p, i);
                        (i, end, end)
                    }
                    _ => {
                        let end = scalar_end(p, i);
                        (i, end, end)
                    }
                };
                if values.len() == VALUES_MAX {
                    return false;
                }
                values.push((start as u32, end as u32));
                i = next;
            }
            _ => i += 1,
        }
    }
    true
}

/// The index of the quote that closes a string whose contents start at `from`, or the
/// payload's length if none does.
fn string_end(p: &[u8], from: usize) -> usize {
    let mut i = from;
    while i < p.len() {
        match p[i] {
            b'"' => return i,
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    p.len()
}

/// The index just after the `]` that closes the array opened at `open`, or the
/// payload's length.
fn array_end(p: &[u8], open: usize) -> usize {
    let mut depth = 0usize;
    let mut i = open;
    while i < p.len() {
        match p[i] {
            b'"' => i = string_end(p, i + 1),
            b'[' => depth += 1,
            b']' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    p.len()
}

/// The index of the first `,`, `}`, `]` or white space from `from`, or the length.
fn scalar_end(p: &[u8], from: usize) -> usize {
    p[from..]
        .iter()
        .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n'))
        .map_or(p.len(), |at| from + at)
}

/// Appends a value as the stored form has it: its length, then its bytes.
fn push_value(out: &mut Vec<u8>, value: &[u8]) {
    leb128::push(out, value.len());
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `payload`'s stored form, as the join keeps it.
    fn stored(shapes: &mut Shapes, payload: &[u8]) -> Vec<u8> {
        let mut stored = Vec::new();
        if !shapes.encode(payload, &mut stored) {
            stored = [VERBATIM_MARK, payload].concat();
        }
        stored
    }

    fn round_trip(shapes: &mut Shapes, payload: &[u8]) -> usize {
        let stored = stored(shapes, payload);
        let mut out = Vec::new();
        assert_eq!(
            shapes.decode(&stored, &mut out),
            payload,
            "{:?}",
            String::from_utf8_lossy(payload)
        );
        stored.len()
    }

    const IMPRESSION: &[u8] = br#"{"event_id":"imp-3-17","profile_id":123,"title_id":45,"ts":1700000000000,"row":3,"rank":5,"page":"home","device":"tv"}"#;

    #[test]
    fn json_lines_come_back_exactly_and_shorter() {
        let mut shapes = Shapes::default();
        let stored = round_trip(&mut shapes, IMPRESSION);
        assert!(
            stored < IMPRESSION.len() / 2,
            "{stored} of {} bytes",
            IMPRESSION.len()
        );
        let other = br#"{"event_id":"imp-4-1","profile_id":9,"title_id":4500,"ts":1700000000123,"row":13,"rank":15,"page":"home","device":"phone"}"#;
        round_trip(&mut shapes, other);
        assert_eq!(shapes.shapes.len(), 1, "one shape for both");
    }

    #[test]
    fn odd_payloads_come_back_exactly() {
        let mut shapes = Shapes::default();
        let odd: [&[u8]; 14] = [
            b"",
            b"{}",
            b":",
            b"::::",
            b"not json at all",
            br#"{"a": "x\"y:z", "b" : [1, [2, "]"], {"c":3}], "n":{"m":null}}"#,
            br#"{"a":"unterminated"#,
            br#"{"a":[1,2"#,
            br#"{"a":"\"#,
            br#"{"a\":b":1}"#,
            b"{\"a\":\t1 ,\"b\":\r\n2}",
            br#"{"a":}"#,
            b"\xff\xfe:\x00",
            br#"{"k":"v"}{"k":"v"}"#,
        ];
        for payload in odd {
            round_trip(&mut shapes, payload);
        }
    }

    /// Every byte string of a small alphabet of JSON's structural bytes, up to length 5,
    /// comes back as it went in.
    #[test]
    fn every_short_string_of_structural_bytes_comes_back() {
        let alphabet = b"\"\\:{}[], a1";
        let mut shapes = Shapes::default();
        let mut payload = Vec::new();
        fn each(
            alphabet: &[u8],
            payload: &mut Vec<u8>,
            left: usize,
            visit: &mut impl FnMut(&[u8]),
        ) {
            visit(payload);
            if left == 0 {
                return;
            }
            for &b in alphabet {
                payload.push(b);
                each(alphabet, payload, left - 1, visit);
                payload.pop();
            }
        }
        let mut count = 0;
        each(alphabet, &mut payload, 5, &mut |p| {
            round_trip(&mut shapes, p);
            count += 1;
        });
        assert!(count > 100_000);
        assert!(shapes.shapes.len() > 150, "{} shapes", shapes.shapes.len());
        assert!(shapes.shapes.iter().all(|s| s.values() > 0));
    }

    #[test]
    fn a_full_table_stores_new_shapes_as_they_came() {
        let mut shapes = Shapes::default();
        for i in 0..SHAPES_MAX + 10 {
            let payload = format!(r#"{{"field_{i}":"some value","other":12345}}"#);
            let stored = round_trip(&mut shapes, payload.as_bytes());
            if i < SHAPES_MAX {
                assert!(stored < payload.len(), "shape {i} kept");
            } else {
                assert_eq!(stored, payload.len() + 1, "shape {i} stored as it came");
            }
        }
        // Known shapes are still used.
        assert!(round_trip(&mut shapes, br#"{"field_3":"x","other":1}"#) < 10);
    }

    #[test]
    fn a_payload_its_shape_would_not_shorten_is_stored_as_it_came() {
        let mut shapes = Shapes::default();
        // One value of 200 bytes after a literal of 2: its length takes 2 bytes.
        let payload = [&b"{:"[..], &[b'x'; 200]].concat();
        let mut scratch = Vec::new();
        assert!(!shapes.encode(&payload, &mut scratch));
        let stored = stored(&mut shapes, &payload);
        assert_eq!((stored[0], &stored[1..]), (VERBATIM, &payload[..]));
        let mut out = Vec::new();
        assert_eq!(shapes.decode(&stored, &mut out), payload);
    }

    #[test]
    fn shapes_survive_an_image_and_keep_their_numbers() {
        let mut shapes = Shapes::default();
        let payloads: Vec<String> = (0..20)
            .map(|i| format!(r#"{{"a{}":"v{i}","b":{i}}}"#, i % 7))
            .collect();
        let stored: Vec<Vec<u8>> = payloads
            .iter()
            .map(|p| stored(&mut shapes, p.as_bytes()))
            .collect();
        let mut image = Vec::new();
        let mut w = Writer::new(&mut image);
        shapes.write(&mut w);
        w.finish().expect("a Vec takes every byte");
        let mut input = &image[..];
        let mut r = Reader::new(&mut input, image.len() as u64);
        let mut read = Shapes::read(&mut r).expect("the image reads");
        r.end().expect("the whole image was read");
        for (p, s) in payloads.iter().zip(&stored) {
            let mut out = Vec::new();
            assert_eq!(read.decode(s, &mut out), p.as_bytes());
        }
        // The read table finds the same shapes for new payloads.
        assert_eq!(read.shapes.len(), 7);
        round_trip(&mut read, br#"{"a3":"new","b":99}"#);
        assert_eq!(read.shapes.len(), 7);
        // Every truncation is an error.
        for cut in 0..image.len() {
            let mut input = &image[..cut];
            let mut r = Reader::new(&mut input, cut as u64);
            assert!(
                Shapes::read(&mut r).and_then(|_| r.end()).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn word_at_a_time_helpers_agree_with_the_slice_methods() {
        let p: Vec<u8> = (0..40u8)
            .map(|i| b"ab,\"}c"[usize::from(i) % 6] ^ (i / 7))
            .collect();
        for from in 0..=p.len() {
            for byte in [b'a', b',', b'"', b'}', 0, 0x80, b'b' ^ 5] {
                let want = p[from..]
                    .iter()
                    .position(|&b| b == byte)
                    .map_or(p.len(), |at| from + at);
                assert_eq!(find_byte(&p, from, byte), want, "from {from} byte {byte}");
            }
            for len in 0..=p.len() - from {
                let prefix = &p[from..from + len];
                for start in 0..p.len() {
                    assert_eq!(
                        starts_with(&p[start..], prefix),
                        p[start..].starts_with(prefix),
                        "start {start} prefix {from}..+{len}"
                    );
                }
            }
        }
    }

    #[test]
    fn corrupted_stored_bytes_never_panic() {
        let mut shapes = Shapes::default();
        let stored = stored(&mut shapes, IMPRESSION);
        let mut out = Vec::new();
        for at in 0..stored.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = stored.clone();
                bad[at] ^= flip;
                shapes.decode(&bad, &mut out);
                shapes.decode(&bad[..at], &mut out);
            }
        }
        assert_eq!(shapes.decode(&[], &mut out), b"");
    }
}
