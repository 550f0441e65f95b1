//! The join's in-memory state as bytes, for checkpoints.
//!
//! A snapshot holds everything of a [`Join`](crate::Join) that is not in its
//! [`StateStore`](crate::StateStore): the watermark, the counts, every bucket with its
//! segments (hot ones whole: their events in order; cold ones as their filter, matched
//! marks and time range), and the remembered ids. The cold segments themselves are
//! files of the store, checkpointed beside the image.
//!
//! The encoding is little-endian and versioned by a magic header; integrity is the
//! caller's job (the checkpoint store keeps a checksum of every file).

const MAGIC: &[u8; 8] = b"BRAIDJ01";

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

/// Reads what [`Writer`] wrote; every read is bounds-checked.
pub(crate) struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if self.0.len() < n {
            return Err(SnapshotError(format!(
                "truncated: {n} more bytes expected, {} left",
                self.0.len()
            )));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }
    pub fn magic(&mut self) -> Result<(), SnapshotError> {
        if self.take(MAGIC.len())? != MAGIC {
            return Err(SnapshotError(
                "not a braid join snapshot (bad header)".into(),
            ));
        }
        Ok(())
    }
    pub fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
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
    /// A length, refused when it exceeds what is left (each counted item is ≥ 1 byte).
    pub fn len(&mut self) -> Result<usize, SnapshotError> {
        let n = self.u64()?;
        if n > self.0.len() as u64 {
            return Err(SnapshotError(format!(
                "length {n} exceeds the {} bytes left",
                self.0.len()
            )));
        }
        Ok(n as usize)
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], SnapshotError> {
        let n = self.len()?;
        self.take(n)
    }
    pub fn words(&mut self) -> Result<Vec<u64>, SnapshotError> {
        let n = self.len()?;
        (0..n).map(|_| self.u64()).collect()
    }
    pub fn end(&self) -> Result<(), SnapshotError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError(format!(
                "{} unexpected bytes after the end",
                self.0.len()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_truncation_is_an_error() {
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        w.magic();
        w.u32(7);
        w.i64(-3);
        w.u128(u128::MAX - 1);
        w.bytes(b"abc");
        w.words(&[1, 2]);
        w.finish().unwrap();
        let mut r = Reader(&buf);
        r.magic().unwrap();
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.i64().unwrap(), -3);
        assert_eq!(r.u128().unwrap(), u128::MAX - 1);
        assert_eq!(r.bytes().unwrap(), b"abc");
        assert_eq!(r.words().unwrap(), vec![1, 2]);
        r.end().unwrap();
        let mut short = Reader(&buf[..buf.len() - 3]);
        short.magic().unwrap();
        short.u32().unwrap();
        short.i64().unwrap();
        short.u128().unwrap();
        short.bytes().unwrap();
        assert!(short.words().is_err());
    }
}
