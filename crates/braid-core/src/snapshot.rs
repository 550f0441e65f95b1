//! The join's in-memory state as bytes, for checkpoints.
//!
//! A snapshot holds everything of a [`Join`](crate::Join) that is not in its
//! [`StateStore`](crate::StateStore): the watermark, the counts, every bucket with its
//! segments (hot ones whole: their events in order; cold ones as their filter, matched
//! marks and time range), and the remembered ids. The cold segments themselves are
//! files of the store, checkpointed beside the image.
//!
//! The encoding is little-endian and versioned by a magic header; integrity is the
//! caller's job (the checkpoint store keeps a checksum of every file). Images are
//! written and read as streams: neither side ever holds one whole in memory.

use std::io::{BufReader, ErrorKind, Read};

/// Format 02 added payload shapes (`crate::shape`): the segments of a 01 image, in it
/// and in its store, hold payloads as they came and cannot be read as 02. Format 03
/// keeps a hot event's lengths in the arena, not in its slot.
const MAGIC: &[u8; 8] = b"BRAIDJ03";
const MAGIC_FAMILY: &[u8; 6] = b"BRAIDJ";

#[derive(Debug, thiserror::Error)]
#[error("join snapshot: {0}")]
pub struct SnapshotError(pub String);

/// Writes fixed-width little-endian values to a byte sink, keeping the first error (so
/// that encoders need not check every value; [`Writer::finish`] reports it).
pub(crate) struct Writer<'a> {
    out: &'a mut dyn std::io::Write,
    error: Option<std::io::Error>,
}

impl<'a> Writer<'a> {
    pub fn new(out: &'a mut dyn std::io::Write) -> Writer<'a> {
        Writer { out, error: None }
    }
    fn put(&mut self, bytes: &[u8]) {
        if self.error.is_none() {
            if let Err(e) = self.out.write_all(bytes) {
                self.error = Some(e);
            }
        }
    }
    pub fn finish(self) -> std::io::Result<()> {
        self.error.map_or(Ok(()), Err)
    }
    pub fn magic(&mut self) {
        self.put(MAGIC);
    }
    pub fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    pub fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.put(&v.to_le_bytes());
    }
    pub fn u128(&mut self, v: u128) {
        self.put(&v.to_le_bytes());
    }
    pub fn i128(&mut self, v: i128) {
        self.put(&v.to_le_bytes());
    }
    pub fn len(&mut self, v: usize) {
        self.u64(v as u64);
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.len(v.len());
        self.put(v);
    }
    pub fn words(&mut self, v: &[u64]) {
        self.len(v.len());
        for w in v {
            self.u64(*w);
        }
    }
}

/// Bytes a [`Reader`] reads from its input at a time. A restore reads every shard's
/// image at once, so this is what each one holds beyond the state it rebuilds.
pub(crate) const READ_BUFFER_BYTES: usize = 1 << 20;

/// Reads what [`Writer`] wrote from a stream (a file, typically), through a buffer of
/// [`READ_BUFFER_BYTES`], so that decoding never holds the image whole. The image's
/// length is given up front and every read is checked against what is left of it: a
/// truncated image, or a corrupted length or count, is an error before anything is
/// allocated for it.
pub(crate) struct Reader<'a> {
    input: BufReader<&'a mut dyn Read>,
    /// Bytes of the image not read yet.
    left: u64,
}

impl<'a> Reader<'a> {
    /// Reads an image of `bytes` bytes from `input`.
    pub fn new(input: &'a mut dyn Read, bytes: u64) -> Reader<'a> {
        let capacity =
            usize::try_from(bytes).map_or(READ_BUFFER_BYTES, |b| b.min(READ_BUFFER_BYTES));
        Reader {
            input: BufReader::with_capacity(capacity, input),
            left: bytes,
        }
    }

    /// Fills `out` with the next bytes of the image.
    fn fill(&mut self, out: &mut [u8]) -> Result<(), SnapshotError> {
        let n = out.len() as u64;
        if self.left < n {
            return Err(SnapshotError(format!(
                "truncated: {n} more bytes expected, {} left",
                self.left
            )));
        }
        self.input.read_exact(out).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => SnapshotError(format!(
                "truncated: the input ended {} bytes before the image's stated length",
                self.left
            )),
            _ => SnapshotError(format!("cannot read the image: {e}")),
        })?;
        self.left -= n;
        Ok(())
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut bytes = [0; N];
        self.fill(&mut bytes)?;
        Ok(bytes)
    }
    pub fn magic(&mut self) -> Result<(), SnapshotError> {
        let header = self.array::<8>()?;
        if &header == MAGIC {
            return Ok(());
        }
        if header.starts_with(MAGIC_FAMILY) {
            return Err(SnapshotError(format!(
                "written by another version of braid (format {}, this braid reads {}): \
                 restore it with the braid that wrote it, or start this one from an empty \
                 state and checkpoint directory",
                String::from_utf8_lossy(&header[6..]),
                String::from_utf8_lossy(&MAGIC[6..]),
            )));
        }
        Err(SnapshotError(
            "not a braid join snapshot (bad header)".into(),
        ))
    }
    pub fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn i64(&mut self) -> Result<i64, SnapshotError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    pub fn u128(&mut self) -> Result<u128, SnapshotError> {
        Ok(u128::from_le_bytes(self.array()?))
    }
    pub fn i128(&mut self) -> Result<i128, SnapshotError> {
        Ok(i128::from_le_bytes(self.array()?))
    }
    /// A count of items that take at least `item_bytes` each in the image, refused when
    /// they cannot fit in what is left: a corrupted count never sizes an allocation.
    pub fn count(&mut self, item_bytes: u64) -> Result<usize, SnapshotError> {
        let n = self.u64()?;
        if n.saturating_mul(item_bytes.max(1)) > self.left {
            return Err(SnapshotError(format!(
                "{n} items of at least {item_bytes} bytes exceed the {} bytes left",
                self.left
            )));
        }
        usize::try_from(n).map_err(|_| SnapshotError(format!("count {n} is too large")))
    }
    /// A length in bytes, refused when it exceeds what is left.
    pub fn len(&mut self) -> Result<usize, SnapshotError> {
        self.count(1)
    }
    /// Appends the next `n` bytes to `out` (whose capacity the caller has chosen).
    pub fn append(&mut self, out: &mut Vec<u8>, n: usize) -> Result<(), SnapshotError> {
        let start = out.len();
        out.resize(start + n, 0);
        self.fill(&mut out[start..])
    }
    pub fn words(&mut self) -> Result<Vec<u64>, SnapshotError> {
        let n = self.count(8)?;
        let mut words = Vec::with_capacity(n);
        for _ in 0..n {
            words.push(self.u64()?);
        }
        Ok(words)
    }
    /// Checks that the image ended where its decoding did, and that the input holds
    /// nothing past the stated length.
    pub fn end(&mut self) -> Result<(), SnapshotError> {
        if self.left > 0 {
            return Err(SnapshotError(format!(
                "{} unexpected bytes after the end",
                self.left
            )));
        }
        let mut probe = [0u8; 1];
        match self.input.read(&mut probe) {
            Ok(0) => Ok(()),
            Ok(_) => Err(SnapshotError(
                "the input holds more than the image's stated length".into(),
            )),
            Err(e) => Err(SnapshotError(format!("cannot read the image: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An input that hands out at most `step` bytes per read, so that values straddle
    /// the reader's refills.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = out.len().min(self.step).min(self.bytes.len());
            out[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    fn sample() -> Vec<u8> {
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        w.magic();
        w.u32(7);
        w.i64(-3);
        w.u128(u128::MAX - 1);
        w.bytes(b"abc");
        w.words(&[1, 2]);
        w.finish().unwrap();
        buf
    }

    /// Decodes `sample()`'s values from `input`, stated to be `bytes` long.
    fn decode(input: &mut dyn Read, bytes: u64) -> Result<(), SnapshotError> {
        let mut r = Reader::new(input, bytes);
        r.magic()?;
        assert_eq!(r.u32()?, 7);
        assert_eq!(r.i64()?, -3);
        assert_eq!(r.u128()?, u128::MAX - 1);
        let mut abc = Vec::new();
        let n = r.len()?;
        r.append(&mut abc, n)?;
        assert_eq!(abc, b"abc");
        assert_eq!(r.words()?, vec![1, 2]);
        r.end()
    }

    #[test]
    fn values_round_trip_through_a_stream_in_any_pieces() {
        let buf = sample();
        for step in [1, 3, 8, 1 << 20] {
            let mut input = Trickle { bytes: &buf, step };
            decode(&mut input, buf.len() as u64).unwrap();
        }
    }

    #[test]
    fn truncation_is_an_error_that_says_so() {
        let buf = sample();
        for cut in 0..buf.len() {
            // The image is shorter than its stated length: the input runs dry.
            let mut input = &buf[..cut];
            let err = decode(&mut input, buf.len() as u64)
                .unwrap_err()
                .to_string();
            assert!(err.contains("truncated"), "cut at {cut}: {err}");
            // The stated length itself is short (a file cut by a crash).
            let mut input = &buf[..cut];
            let err = decode(&mut input, cut as u64).unwrap_err().to_string();
            assert!(
                err.contains("truncated") || err.contains("exceed"),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn corruption_is_an_error_before_anything_is_allocated() {
        let mut buf = sample();
        let mut bad = buf.clone();
        bad[0] ^= 1;
        let err = decode(&mut &bad[..], bad.len() as u64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad header"), "{err}");
        // An image of an older format names both formats.
        let mut old = buf.clone();
        old[6..8].copy_from_slice(b"01");
        let err = decode(&mut &old[..], old.len() as u64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("format 01, this braid reads 03"), "{err}");
        // The byte string's length, turned huge: refused, not allocated.
        let at = 8 + 4 + 8 + 16;
        bad = buf.clone();
        bad[at + 7] = 0x40;
        let err = decode(&mut &bad[..], bad.len() as u64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exceed the"), "{err}");
        // The word count, larger than the words that follow.
        bad = buf.clone();
        bad[at + 8 + 3] = 3;
        let err = decode(&mut &bad[..], bad.len() as u64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("items of at least 8 bytes"), "{err}");
        // Bytes beyond the end, in the stated length or only in the input.
        buf.push(0);
        let err = decode(&mut &buf[..], buf.len() as u64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 unexpected bytes after the end"), "{err}");
        let err = decode(&mut &buf[..], buf.len() as u64 - 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than the image's stated length"), "{err}");
    }

    #[test]
    fn read_errors_are_reported() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk on fire"))
            }
        }
        let err = decode(&mut Broken, 100).unwrap_err().to_string();
        assert!(err.contains("cannot read the image: disk on fire"), "{err}");
    }
}
