//! braid's on-disk state tier: [`RocksStore`], the RocksDB implementation of
//! [`braid_core::StateStore`].
//!
//! Every spilled segment becomes one SST file, written sorted with `SstFileWriter` and
//! ingested into the bottom level (no memtable, no write-ahead log, no compaction).
//! Expiry deletes whole files with `DeleteFilesInRange`, leaving no tombstones.

mod reads;
mod rocks;

pub use reads::ReadThreads;
pub use rocks::{segment_file_name, RocksOptions, RocksStore, MARKER_FILE};
