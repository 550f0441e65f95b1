//! A `files` sink: records go to a hidden in-progress file, which becomes visible under
//! its final name only when it is committed (renamed). Readers ignore names starting
//! with `.` or `_`.
//!
//! With checkpoints the commit has two phases: at a barrier (and when a file reaches
//! its size limit) the in-progress file is closed and renamed to a hidden *pending*
//! name; the checkpoint's manifest lists it, and only once the manifest is committed
//! is it renamed to its final name ([`PendingFile::publish`]).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

const WRITE_BUFFER_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
#[error("output: cannot {operation} {}: {error}", path.display())]
pub struct SinkError {
    pub operation: &'static str,
    pub path: PathBuf,
    pub error: std::io::Error,
}

/// Turns an I/O error of `operation` on `path` into a [`SinkError`].
fn failed<'p>(
    operation: &'static str,
    path: &'p Path,
) -> impl FnOnce(std::io::Error) -> SinkError + 'p {
    move |error| SinkError {
        operation,
        path: path.to_path_buf(),
        error,
    }
}

/// A closed output file awaiting its checkpoint: hidden under `pending` until renamed
/// to `done`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingFile {
    pub pending: PathBuf,
    pub done: PathBuf,
}

impl PendingFile {
    /// Makes the file durable under its pending name (before the manifest is written).
    pub fn sync(&self) -> Result<(), SinkError> {
        File::open(&self.pending)
            .and_then(|f| f.sync_all())
            .map_err(failed("sync", &self.pending))
    }

    /// Renames the file to its final name. Publishing again (after a crash between the
    /// rename and the next checkpoint) finds it done and does nothing.
    pub fn publish(&self) -> Result<(), SinkError> {
        if !self.pending.exists() && self.done.exists() {
            return Ok(());
        }
        std::fs::rename(&self.pending, &self.done).map_err(failed("rename", &self.pending))
    }
}

pub struct FileSink {
    dir: PathBuf,
    prefix: String,
    /// The open in-progress file, its path and its bytes so far.
    open: Option<(BufWriter<File>, PathBuf, u64)>,
    next_file: u64,
    roll_bytes: u64,
    committed: Vec<PathBuf>,
    /// Two-phase commit: closed files wait here for the next checkpoint.
    two_phase: bool,
    pending: Vec<PendingFile>,
}

impl FileSink {
    /// A sink writing `DIR/PREFIX-NNNNNN.ndjson`; a file is committed once it reaches
    /// `roll_bytes` and at every [`commit`](Self::commit).
    pub fn new(dir: &Path, prefix: &str, roll_bytes: u64) -> FileSink {
        FileSink {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            open: None,
            next_file: 0,
            roll_bytes,
            committed: Vec::new(),
            two_phase: false,
            pending: Vec::new(),
        }
    }

    /// A sink whose files become visible only through checkpoints: each closed file
    /// is returned by the next [`barrier`](Self::barrier), numbered from `next_file`.
    pub fn two_phase(dir: &Path, prefix: &str, roll_bytes: u64, next_file: u64) -> FileSink {
        FileSink {
            two_phase: true,
            next_file,
            ..FileSink::new(dir, prefix, roll_bytes)
        }
    }

    pub fn is_two_phase(&self) -> bool {
        self.two_phase
    }

    /// The number the next file gets: part of a checkpoint.
    pub fn next_file(&self) -> u64 {
        self.next_file
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Closes the open file as pending and returns every file closed since the last
    /// barrier (two-phase sinks).
    pub fn barrier(&mut self) -> Result<Vec<PendingFile>, SinkError> {
        self.close_pending()?;
        Ok(std::mem::take(&mut self.pending))
    }

    /// Flushes the open file and renames it to its pending name.
    fn close_pending(&mut self) -> Result<(), SinkError> {
        let Some((_, path)) = self.close_open()? else {
            return Ok(());
        };
        let file = PendingFile {
            pending: self
                .dir
                .join(format!(".{}.pending", self.file_name(self.next_file))),
            done: self.dir.join(self.file_name(self.next_file)),
        };
        std::fs::rename(&path, &file.pending).map_err(failed("rename", &path))?;
        self.next_file += 1;
        self.pending.push(file);
        Ok(())
    }

    /// Flushes and closes the open in-progress file, if any; returns it and its path.
    fn close_open(&mut self) -> Result<Option<(File, PathBuf)>, SinkError> {
        let Some((writer, path, _)) = self.open.take() else {
            return Ok(None);
        };
        match writer.into_inner() {
            Ok(file) => Ok(Some((file, path))),
            Err(e) => Err(failed("write", &path)(e.into_error())),
        }
    }

    /// The final name of file number `n`.
    fn file_name(&self, n: u64) -> String {
        format!("{}-{n:06}.ndjson", self.prefix)
    }

    /// The number of a final file name of a sink with `prefix` (see `file_name`).
    pub fn file_number(name: &str, prefix: &str) -> Option<u64> {
        name.strip_prefix(prefix)?
            .strip_prefix('-')?
            .strip_suffix(".ndjson")?
            .parse()
            .ok()
    }

    /// Appends one record and a newline.
    pub fn write(&mut self, record: &[u8]) -> Result<(), SinkError> {
        self.write_parts(&[record])
    }

    /// Appends the concatenation of `parts` and a newline.
    pub fn write_parts(&mut self, parts: &[&[u8]]) -> Result<(), SinkError> {
        if self.open.is_none() {
            std::fs::create_dir_all(&self.dir).map_err(failed("create", &self.dir))?;
            let path = self
                .dir
                .join(format!(".{}.inprogress", self.file_name(self.next_file)));
            let file = File::create(&path).map_err(failed("create", &path))?;
            self.open = Some((BufWriter::with_capacity(WRITE_BUFFER_BYTES, file), path, 0));
        }
        let (writer, path, bytes) = self.open.as_mut().expect("opened above");
        for part in parts {
            writer.write_all(part).map_err(failed("write", path))?;
            *bytes += part.len() as u64;
        }
        writer.write_all(b"\n").map_err(failed("write", path))?;
        *bytes += 1;
        if *bytes >= self.roll_bytes {
            if self.two_phase {
                self.close_pending()?;
            } else {
                self.commit()?;
            }
        }
        Ok(())
    }

    /// Flushes, syncs and renames the open file to its final name (one-phase sinks).
    pub fn commit(&mut self) -> Result<(), SinkError> {
        debug_assert!(
            !self.two_phase,
            "two-phase sinks commit through checkpoints"
        );
        let Some((file, path)) = self.close_open()? else {
            return Ok(());
        };
        file.sync_all().map_err(failed("sync", &path))?;
        let done = self.dir.join(self.file_name(self.next_file));
        std::fs::rename(&path, &done).map_err(failed("rename", &path))?;
        self.next_file += 1;
        self.committed.push(done);
        Ok(())
    }

    pub fn committed(&self) -> &[PathBuf] {
        &self.committed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_visible_before_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(dir.path(), "part-0", 1 << 30);
        sink.write(b"{\"a\":1}").unwrap();
        let visible = |d: &Path| {
            std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.') && !n.starts_with('_'))
                .count()
        };
        assert_eq!(visible(dir.path()), 0);
        sink.commit().unwrap();
        assert_eq!(visible(dir.path()), 1);
        let text = std::fs::read_to_string(&sink.committed()[0]).unwrap();
        assert_eq!(text, "{\"a\":1}\n");
    }

    #[test]
    fn two_phase_files_stay_hidden_until_published() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::two_phase(dir.path(), "p", 10, 7);
        for _ in 0..3 {
            sink.write(b"12345").unwrap();
        }
        let pending = sink.barrier().unwrap();
        assert_eq!(
            pending.len(),
            2,
            "one rolled at the limit, one closed at the barrier"
        );
        assert_eq!(sink.next_file(), 9);
        let names = |d: &Path| {
            let mut n: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        assert_eq!(
            names(dir.path()),
            vec![".p-000007.ndjson.pending", ".p-000008.ndjson.pending"]
        );
        for file in &pending {
            file.sync().unwrap();
            file.publish().unwrap();
            file.publish().unwrap();
        }
        assert_eq!(
            names(dir.path()),
            vec!["p-000007.ndjson", "p-000008.ndjson"]
        );
        assert!(sink.barrier().unwrap().is_empty());
    }

    #[test]
    fn files_roll_at_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(dir.path(), "p", 10);
        for _ in 0..5 {
            sink.write(b"12345").unwrap();
        }
        sink.commit().unwrap();
        assert_eq!(sink.committed().len(), 3);
    }
}
