//! braid's on-disk state tier: two implementations of [`braid_core::StateStore`].
//!
//! [`FileStore`] (the one braid runs on) writes every spilled segment as one file of its
//! own format: entries in key order in blocks of about 2 KiB, with a key of each block
//! kept in memory, so a point read is one `pread` of one block.
//! [`RocksStore`] writes every spilled segment as one SST file with `SstFileWriter` and
//! ingests it into the bottom level (no memtable, no write-ahead log, no compaction).
//! In both, expiry deletes whole files, leaving no tombstones.

mod files;
mod reads;
mod rocks;

use std::collections::BTreeMap;
use std::path::Path;

use braid_core::{SegmentId, Side, StoreError};

pub use files::{FileOptions, FileStore, FileSum, SEGMENT_MAGIC};
pub use reads::ReadThreads;
pub use rocks::{RocksOptions, RocksStore};

/// The file that marks a folder as braid's state, so that braid never wipes anything else.
pub const MARKER_FILE: &str = "BRAID_STATE";

/// Bytes of a segment prefix (see [`push_prefix`]).
pub(crate) const PREFIX_BYTES: usize = 13;

/// The file name of segment `id` in a [`FileStore`], unique within one store's history.
pub fn segment_file_name(id: SegmentId) -> String {
    format!("{}.seg", segment_file_stem(id))
}

/// The name of segment `id`'s file without its extension.
fn segment_file_stem(id: SegmentId) -> String {
    format!(
        "{}-{:016x}-{:08x}",
        id.side.index(),
        (id.bucket as u64) ^ (1 << 63),
        id.segment
    )
}

/// Fault injection for tests: the segment write after `fail_after` succeeded ones fails
/// as a full disk would.
pub(crate) struct WriteFaults {
    writes: u64,
    fail_after: Option<u64>,
}

impl WriteFaults {
    pub(crate) fn after(fail_after: Option<u64>) -> WriteFaults {
        WriteFaults {
            writes: 0,
            fail_after,
        }
    }

    /// Counts a write of `path`; the injected error if it is the one to fail.
    pub(crate) fn before_write(&mut self, path: &Path) -> Result<(), StoreError> {
        if self.fail_after == Some(self.writes) {
            return Err(failed(
                "write segment",
                path,
                "No space left on device (os error 28) (injected fault)",
            ));
        }
        self.writes += 1;
        Ok(())
    }
}

/// The segments of `bucket` on `side` among the keys of `segments`.
pub(crate) fn segments_of_bucket<V>(
    segments: &BTreeMap<SegmentId, V>,
    side: Side,
    bucket: i64,
) -> Vec<SegmentId> {
    let first = SegmentId {
        side,
        bucket,
        segment: 0,
    };
    segments
        .range(first..)
        .take_while(|(id, _)| id.side == side && id.bucket == bucket)
        .map(|(id, _)| *id)
        .collect()
}

fn failed(operation: &'static str, dir: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError {
        operation,
        detail: format!("{}: {e}", dir.display()),
    }
}

/// Opens `dir` for a fresh store, removing the state a previous run left there.
/// Refuses a non-empty folder that is not braid's state.
pub(crate) fn prepare_dir(dir: &Path) -> Result<(), StoreError> {
    let marker = dir.join(MARKER_FILE);
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .map_err(|e| failed("read", dir, e))?
            .next()
            .is_none();
        if !empty && !marker.exists() {
            return Err(failed(
                "open",
                dir,
                "the folder is not empty and holds no braid state; choose another [state] dir",
            ));
        }
    }
    // The marker is written first and never removed, so that a crash at any point of
    // clearing the folder leaves it recognisable as braid's.
    std::fs::create_dir_all(dir).map_err(|e| failed("create", dir, e))?;
    std::fs::write(&marker, b"braid state\n").map_err(|e| failed("create", dir, e))?;
    for entry in std::fs::read_dir(dir).map_err(|e| failed("read", dir, e))? {
        let entry = entry.map_err(|e| failed("read", dir, e))?;
        if entry.file_name() == MARKER_FILE {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| failed("clear", &path, e))?;
    }
    for sub in ["ingest", "segments"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| failed("create", dir, e))?;
    }
    Ok(())
}

/// Appends the order-preserving prefix of a bucket, or of one of its segments.
pub(crate) fn push_prefix(out: &mut Vec<u8>, side: Side, bucket: i64, segment: Option<u32>) {
    out.push(side.index() as u8);
    out.extend_from_slice(&((bucket as u64) ^ (1 << 63)).to_be_bytes());
    if let Some(segment) = segment {
        out.extend_from_slice(&segment.to_be_bytes());
    }
}

/// The segment a prefix written by [`push_prefix`] names.
pub(crate) fn parse_prefix(prefix: &[u8]) -> SegmentId {
    let side = if prefix[0] == 0 {
        Side::Left
    } else {
        Side::Right
    };
    let bucket = u64::from_be_bytes(prefix[1..9].try_into().expect("8 bytes")) ^ (1 << 63);
    let segment = u32::from_be_bytes(prefix[9..13].try_into().expect("4 bytes"));
    SegmentId {
        side,
        bucket: bucket as i64,
        segment,
    }
}
