//! A `files` source: a glob's matching files in lexical order, read as one partition.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// Read buffer of a source file.
const READ_BUFFER_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source `{source_name}`: pattern `{pattern}` is not a valid glob: {reason}")]
    Pattern {
        source_name: String,
        pattern: String,
        reason: String,
    },
    #[error("source `{source_name}`: no file matches `{pattern}`")]
    NoFiles {
        source_name: String,
        pattern: String,
    },
    #[error("source `{source_name}`: the checkpoint was taken in {} but that place in the file list now holds {}; the input files changed since, so braid cannot resume (run with --reset to start over)", expected.display(), found.display())]
    Moved {
        source_name: String,
        expected: PathBuf,
        found: PathBuf,
    },
    #[error("source `{source_name}`: cannot read {}: {error}", path.display())]
    Read {
        source_name: String,
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Where a record was read: which file of the source, which line (from 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub file: u32,
    pub line: u64,
}

/// A batch of lines, stored back to back in one buffer.
#[derive(Default, Debug)]
pub struct LineBatch {
    bytes: Vec<u8>,
    lines: Vec<LineAt>,
}

#[derive(Clone, Copy, Debug)]
struct LineAt {
    start: usize,
    end: usize,
    position: Position,
    /// The line's full length when it was cut at the limit.
    over: Option<usize>,
    /// The record's own timestamp (Kafka), the event time when no field names one.
    record_time: Option<i64>,
}

/// One line of a [`LineBatch`].
#[derive(Clone, Copy, Debug)]
pub struct Line<'a> {
    pub bytes: &'a [u8],
    pub position: Position,
    /// The line's full length when it was longer than the limit (its bytes are cut).
    pub oversized: Option<usize>,
    pub record_time: Option<i64>,
}

impl LineBatch {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.lines.clear();
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Appends a line produced elsewhere (by a generator).
    pub fn push(&mut self, line: &[u8], position: Position) {
        self.push_record(line, position, None, None);
    }

    /// Appends a record read elsewhere (Kafka), with its timestamp, cut at `max` bytes.
    pub fn push_record(
        &mut self,
        line: &[u8],
        position: Position,
        record_time: Option<i64>,
        max: Option<usize>,
    ) {
        let start = self.bytes.len();
        let over = max.filter(|&m| line.len() > m);
        let kept = over.map_or(line.len(), |m| m);
        self.bytes.extend_from_slice(&line[..kept]);
        self.lines.push(LineAt {
            start,
            end: self.bytes.len(),
            position,
            over: over.map(|_| line.len()),
            record_time,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Numbers the files of the lines from `start` on after `offset` others (a source
    /// that reads files as one more partition after its own).
    pub fn renumber_files(&mut self, start: usize, offset: u32) {
        for line in &mut self.lines[start..] {
            line.position.file += offset;
        }
    }

    /// The lines (without their line ends) in the order read.
    pub fn iter(&self) -> impl Iterator<Item = Line<'_>> {
        self.lines.iter().map(|l| Line {
            bytes: &self.bytes[l.start..l.end],
            position: l.position,
            oversized: l.over,
            record_time: l.record_time,
        })
    }
}

/// Where a files source stands: the next byte to read, for checkpoints.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourcePosition {
    /// Index of the file in the source's sorted list, and its path (checked on restore).
    pub file: u32,
    pub path: PathBuf,
    /// Bytes of that file already read, and the lines among them.
    pub offset: u64,
    pub line: u64,
}

pub struct FileSource {
    name: String,
    files: Vec<PathBuf>,
    /// Each file's size when the source was opened (0 when it could not be read then).
    sizes: Vec<u64>,
    current: usize,
    reader: Option<BufReader<File>>,
    line: u64,
    offset: u64,
    max_line_bytes: usize,
}

impl FileSource {
    /// Resolves `pattern` (absolute, or relative to `base`) to its files, sorted.
    pub fn open(
        name: &str,
        base: &Path,
        pattern: &str,
        max_line_bytes: usize,
    ) -> Result<FileSource, SourceError> {
        Ok(FileSource::from_files(
            name,
            resolve_glob(name, base, pattern)?,
            max_line_bytes,
        ))
    }

    /// Reads the given files, in the given order.
    pub fn from_files(name: &str, files: Vec<PathBuf>, max_line_bytes: usize) -> FileSource {
        let sizes = files
            .iter()
            .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
            .collect();
        FileSource {
            name: name.to_string(),
            files,
            sizes,
            current: 0,
            reader: None,
            line: 0,
            offset: 0,
            max_line_bytes,
        }
    }

    /// The share of the input's bytes read so far, 0 to 1 (`None` for no bytes).
    pub fn done_fraction(&self) -> Option<f64> {
        let total: u64 = self.sizes.iter().sum();
        let before: u64 = self.sizes.iter().take(self.current).sum();
        let done = (before + self.offset).min(total);
        (total > 0).then(|| done as f64 / total as f64)
    }

    /// The position after the last line read.
    pub fn position(&self) -> SourcePosition {
        SourcePosition {
            file: self.current as u32,
            path: self
                .files
                .get(self.current)
                .cloned()
                .unwrap_or_else(|| PathBuf::from("<end>")),
            offset: self.offset,
            line: self.line,
        }
    }

    /// Continues reading at `position`, taken from this source's file list earlier.
    pub fn seek(&mut self, position: &SourcePosition) -> Result<(), SourceError> {
        let index = position.file as usize;
        if index < self.files.len() && self.files[index] != position.path {
            return Err(SourceError::Moved {
                source_name: self.name.clone(),
                expected: position.path.clone(),
                found: self.files[index].clone(),
            });
        }
        self.current = index;
        self.reader = None;
        self.line = position.line;
        self.offset = position.offset;
        if let Some(path) = self.files.get(index) {
            let mut file = File::open(path).map_err(|error| self.read_error(error))?;
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(position.offset))
                .map_err(|error| self.read_error(error))?;
            self.reader = Some(BufReader::with_capacity(READ_BUFFER_BYTES, file));
        }
        Ok(())
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn path(&self, position: Position) -> &Path {
        &self.files[position.file as usize]
    }

    /// Appends up to `max_lines` lines to `batch`. Returns false once every file is read.
    /// Blank lines are not records and are skipped.
    pub fn read_batch(
        &mut self,
        batch: &mut LineBatch,
        max_lines: usize,
    ) -> Result<bool, SourceError> {
        while batch.len() < max_lines {
            if self.reader.is_none() {
                let Some(path) = self.files.get(self.current) else {
                    return Ok(false);
                };
                let file = File::open(path).map_err(|error| self.read_error(error))?;
                self.reader = Some(BufReader::with_capacity(READ_BUFFER_BYTES, file));
                self.line = 0;
                self.offset = 0;
            }
            let start = batch.bytes.len();
            let reader = self.reader.as_mut().expect("opened above");
            match read_line_bounded(reader, &mut batch.bytes, self.max_line_bytes) {
                Ok(None) => {
                    self.reader = None;
                    self.current += 1;
                    self.offset = 0;
                    self.line = 0;
                }
                Ok(Some((full_len, consumed))) => {
                    self.line += 1;
                    self.offset += consumed;
                    let mut end = batch.bytes.len();
                    while end > start && matches!(batch.bytes[end - 1], b'\n' | b'\r') {
                        end -= 1;
                    }
                    if batch.bytes[start..end].iter().all(u8::is_ascii_whitespace) {
                        batch.bytes.truncate(start);
                        continue;
                    }
                    let position = Position {
                        file: self.current as u32,
                        line: self.line,
                    };
                    let over = (full_len > self.max_line_bytes).then_some(full_len);
                    batch.lines.push(LineAt {
                        start,
                        end,
                        position,
                        over,
                        record_time: None,
                    });
                }
                Err(error) => return Err(self.read_error(error)),
            }
        }
        Ok(true)
    }

    fn read_error(&self, error: std::io::Error) -> SourceError {
        SourceError::Read {
            source_name: self.name.clone(),
            path: self.files[self.current.min(self.files.len() - 1)].clone(),
            error,
        }
    }
}

/// Resolves a source's glob, relative to `base`, to its files in lexical order.
pub fn resolve_glob(name: &str, base: &Path, pattern: &str) -> Result<Vec<PathBuf>, SourceError> {
    let full = if Path::new(pattern).is_absolute() {
        pattern.to_string()
    } else {
        base.join(pattern).to_string_lossy().into_owned()
    };
    let paths = glob::glob(&full).map_err(|e| SourceError::Pattern {
        source_name: name.to_string(),
        pattern: pattern.to_string(),
        reason: e.to_string(),
    })?;
    let mut files: Vec<PathBuf> = paths
        .filter_map(Result::ok)
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(SourceError::NoFiles {
            source_name: name.to_string(),
            pattern: full,
        });
    }
    Ok(files)
}

/// Reads one line, keeping at most `max` bytes of it (plus the newline) in `out`.
/// Returns the line's full length and the bytes consumed, or `None` at the end of the
/// file.
fn read_line_bounded(
    reader: &mut impl BufRead,
    out: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<(usize, u64)>> {
    let mut total = 0usize;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok((total > 0).then_some((total, total as u64)));
        }
        let (chunk, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let room = (max + 1).saturating_sub(total);
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        total += chunk.len();
        let used = chunk.len();
        reader.consume(used);
        if done {
            // The length without the newline.
            return Ok(Some((total - 1, total as u64)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_positions_blank_lines_and_oversized_lines() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.ndjson"), "x\n\n0123456789\r\nlast").unwrap();
        std::fs::write(dir.path().join("a.ndjson"), "first\n").unwrap();
        let mut source = FileSource::open("s", dir.path(), "*.ndjson", 5).unwrap();
        let mut batch = LineBatch::default();
        assert!(!source.read_batch(&mut batch, 100).unwrap());
        let got: Vec<(String, u32, u64, Option<usize>)> = batch
            .iter()
            .map(|l| {
                let p = l.position;
                (
                    String::from_utf8_lossy(l.bytes).into_owned(),
                    p.file,
                    p.line,
                    l.oversized,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("first".into(), 0, 1, None),
                ("x".into(), 1, 1, None),
                ("012345".into(), 1, 3, Some(11)),
                ("last".into(), 1, 4, None),
            ]
        );
    }

    #[test]
    fn reading_resumes_at_a_saved_position() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.ndjson"), "a1\n\na3\r\na4").unwrap();
        std::fs::write(dir.path().join("b.ndjson"), "b1\nb2\n").unwrap();
        let lines = |source: &mut FileSource, max| {
            let mut batch = LineBatch::default();
            source.read_batch(&mut batch, max).unwrap();
            batch
                .iter()
                .map(|l| {
                    let p = l.position;
                    (
                        String::from_utf8_lossy(l.bytes).into_owned(),
                        p.file,
                        p.line,
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut whole = FileSource::open("s", dir.path(), "*.ndjson", 100).unwrap();
        let all = lines(&mut whole, 100);
        for cut in 0..all.len() {
            let mut first = FileSource::open("s", dir.path(), "*.ndjson", 100).unwrap();
            let mut got = lines(&mut first, cut);
            let position = first.position();
            let mut resumed = FileSource::open("s", dir.path(), "*.ndjson", 100).unwrap();
            resumed.seek(&position).unwrap();
            got.extend(lines(&mut resumed, 100));
            assert_eq!(got, all, "cut after {cut} lines at {position:?}");
        }
    }

    /// The done fraction counts the bytes of the files before the current one and the
    /// offset in it, against every file's size.
    #[test]
    fn the_done_fraction_follows_the_bytes_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.ndjson"), "a1\na2\n").unwrap();
        std::fs::write(dir.path().join("b.ndjson"), "b1\nb2\n").unwrap();
        let mut source = FileSource::open("s", dir.path(), "*.ndjson", 10).unwrap();
        assert_eq!(source.done_fraction(), Some(0.0));
        let mut batch = LineBatch::default();
        source.read_batch(&mut batch, 3).unwrap();
        // a.ndjson whole (6 bytes) and b1 (3 bytes) of 12.
        assert_eq!(source.done_fraction(), Some(0.75));
        source.read_batch(&mut batch, 10).unwrap();
        assert_eq!(source.done_fraction(), Some(1.0));
    }

    #[test]
    fn a_glob_matching_nothing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileSource::open("plays", dir.path(), "none/*.ndjson", 10)
            .err()
            .unwrap();
        assert!(err.to_string().contains("no file matches"), "{err}");
    }
}
