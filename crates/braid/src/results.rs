//! Result sinks of the shards: joined records (SPEC §4) to files or stdout, or only
//! counted (benchmarks).

use std::io::Write;
use std::sync::{Arc, Mutex};

use braid_core::{JoinSink, Side};
use braid_io::{FileSink, PendingFile};

use crate::checkpoint::SinkState;
use crate::engine::ResultSink;

/// The fixed bytes around the two sides of a joined record:
/// `{"LEFT":` left `,"RIGHT":` right `}`.
#[derive(Clone, Debug)]
pub struct RecordShape {
    open: Vec<u8>,
    middle: Vec<u8>,
    open_null: Vec<u8>,
    middle_null: Vec<u8>,
}

impl RecordShape {
    pub fn new(left: &str, right: &str) -> RecordShape {
        let l = serde_json::to_string(left).expect("a string serialises");
        let r = serde_json::to_string(right).expect("a string serialises");
        RecordShape {
            open: format!("{{{l}:").into_bytes(),
            middle: format!(",{r}:").into_bytes(),
            open_null: format!("{{{l}:null,{r}:").into_bytes(),
            middle_null: format!(",{r}:null}}").into_bytes(),
        }
    }

    /// Calls `write` with the parts of one record; `None` is a missing side.
    pub fn parts<'a>(
        &'a self,
        left: Option<&'a [u8]>,
        right: Option<&'a [u8]>,
        write: impl FnOnce(&[&[u8]]),
    ) {
        match (left, right) {
            (Some(l), Some(r)) => write(&[&self.open, l, &self.middle, r, b"}"]),
            (Some(l), None) => write(&[&self.open, l, &self.middle_null]),
            (None, Some(r)) => write(&[&self.open_null, r, b"}"]),
            (None, None) => unreachable!("a record has at least one side"),
        }
    }
}

/// Where a shard's result lines go: files (hidden until committed) or stdout.
pub trait LineOut: Send + 'static {
    /// Writes the concatenation of `parts` and a newline.
    fn write_line(&mut self, parts: &[&[u8]]) -> anyhow::Result<()>;
    /// At a checkpoint barrier: closes what was written as pending (files) or flushes
    /// it (stdout, which cannot take back lines: at-least-once across a restore).
    fn barrier(&mut self) -> anyhow::Result<(Vec<PendingFile>, Option<SinkState>)>;
    /// Makes everything written visible (commits one-phase files, flushes stdout).
    fn finish(&mut self) -> anyhow::Result<()>;
}

impl LineOut for FileSink {
    fn write_line(&mut self, parts: &[&[u8]]) -> anyhow::Result<()> {
        Ok(self.write_parts(parts)?)
    }
    fn barrier(&mut self) -> anyhow::Result<(Vec<PendingFile>, Option<SinkState>)> {
        let pending = FileSink::barrier(self)?;
        Ok((pending, Some(SinkState::of(self))))
    }
    fn finish(&mut self) -> anyhow::Result<()> {
        if self.is_two_phase() {
            // Checkpoints publish what was written; the final one is taken at the end.
            return Ok(());
        }
        Ok(self.commit()?)
    }
}

/// Bytes a stdout sink gathers before it takes the lock and writes them.
const STDOUT_CHUNK_BYTES: usize = 256 << 10;

/// Standard output shared by the shards, written in whole chunks of lines.
pub struct StdoutLines {
    buffer: Vec<u8>,
    out: Arc<Mutex<std::io::Stdout>>,
}

impl StdoutLines {
    pub fn new(out: Arc<Mutex<std::io::Stdout>>) -> StdoutLines {
        StdoutLines {
            buffer: Vec::with_capacity(STDOUT_CHUNK_BYTES),
            out,
        }
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        let mut out = self
            .out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let written = out.write_all(&self.buffer).and_then(|()| out.flush());
        self.buffer.clear();
        written.map_err(|e| anyhow::anyhow!("cannot write to stdout: {e}"))
    }
}

impl LineOut for StdoutLines {
    fn write_line(&mut self, parts: &[&[u8]]) -> anyhow::Result<()> {
        for p in parts {
            self.buffer.extend_from_slice(p);
        }
        self.buffer.push(b'\n');
        if self.buffer.len() >= STDOUT_CHUNK_BYTES {
            self.flush()?;
        }
        Ok(())
    }
    fn barrier(&mut self) -> anyhow::Result<(Vec<PendingFile>, Option<SinkState>)> {
        self.flush()?;
        Ok((Vec::new(), None))
    }
    fn finish(&mut self) -> anyhow::Result<()> {
        self.flush()
    }
}

/// Writes joined records (SPEC §4) as lines; the first write error is kept and
/// reported after the batch, since the join's sink cannot fail mid-batch.
pub struct Records<W> {
    shape: RecordShape,
    out: W,
    error: Option<anyhow::Error>,
}

impl<W: LineOut> Records<W> {
    pub fn new(shape: RecordShape, out: W) -> Records<W> {
        Records {
            shape,
            out,
            error: None,
        }
    }

    fn record(&mut self, left: Option<&[u8]>, right: Option<&[u8]>) {
        if self.error.is_some() {
            return;
        }
        let mut result = Ok(());
        self.shape
            .parts(left, right, |parts| result = self.out.write_line(parts));
        if let Err(e) = result {
            self.error = Some(e);
        }
    }
}

impl<W: LineOut> JoinSink for Records<W> {
    fn pair(&mut self, _key: &[u8], left: &[u8], right: &[u8]) {
        self.record(Some(left), Some(right));
    }
    fn unmatched(&mut self, side: Side, _key: &[u8], event: &[u8]) {
        match side {
            Side::Left => self.record(Some(event), None),
            Side::Right => self.record(None, Some(event)),
        }
    }
}

impl<W: LineOut> ResultSink for Records<W> {
    fn take_error(&mut self) -> Option<anyhow::Error> {
        self.error.take()
    }
    fn barrier(&mut self, _epoch: u64) -> anyhow::Result<(Vec<PendingFile>, Option<SinkState>)> {
        self.error.take().map_or(Ok(()), Err)?;
        self.out.barrier()
    }
    fn finish(&mut self) -> anyhow::Result<()> {
        self.error.take().map_or(Ok(()), Err)?;
        self.out.finish()
    }
}

/// Counts results and their bytes without writing them (benchmarks).
#[derive(Default)]
pub struct CountingResults {
    pub bytes: u64,
}

impl JoinSink for CountingResults {
    fn pair(&mut self, _key: &[u8], left: &[u8], right: &[u8]) {
        self.bytes += (left.len() + right.len()) as u64;
    }
    fn unmatched(&mut self, _side: Side, _key: &[u8], event: &[u8]) {
        self.bytes += event.len() as u64;
    }
}

impl ResultSink for CountingResults {
    fn take_error(&mut self) -> Option<anyhow::Error> {
        None
    }
    fn barrier(&mut self, _epoch: u64) -> anyhow::Result<(Vec<PendingFile>, Option<SinkState>)> {
        Ok((Vec::new(), None))
    }
    fn finish(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}
