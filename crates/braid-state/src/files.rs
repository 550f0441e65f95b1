//! The segment-file store: every spilled segment is one file of braid's own format.
//!
//! A segment is written once, whole, in key order, read by exact key or scanned whole,
//! and deleted with its bucket: it needs no memtable, no compaction and no block cache.
//! What RocksDB spent on it (building and compressing blocks, checking key order,
//! ingesting the file, and on each read an index search, a block decompression and the
//! table cache) was most of a spilling run's time, so the store writes the entries as
//! they come and reads a key with one `pread`.
//!
//! A file:
//!
//! ```text
//! magic "BRAIDSG1"
//! blocks    entries back to back: key length, value length (LEB128), key, value;
//!           a block ends after the entry that takes it to BLOCK_BYTES or more,
//!           so an entry never spans two blocks
//! index     per block: its key's length (LEB128), its key, block length (LEB128);
//!           the key is the block's first key, or (since separators) any key after
//!           every key of the block before and not after its first
//! footer    index offset (u64 LE), block count (u64 LE), magic "BRAIDSG1"
//! ```
//!
//! The index lives in memory from the write (or, for a restored file, from its footer)
//! to the segment's expiry: about 13 bytes per block for flink-peer, 0.6 % of the file.
//! A point read finds the last block whose key is not after the key, reads that block
//! and walks its entries. Files are not synced: the state folder is scratch, rebuilt
//! from a checkpoint, and checkpoints sync the files they keep. The store checksums
//! each file as it writes it ([`FileSum`]), so that a checkpoint need not read it back.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use braid_core::{leb128, SegmentEntries, SegmentId, Side, StateStore, StoreError};
use xxhash_rust::xxh3::Xxh3;

use crate::reads::{BatchWork, Found, ReadBatch, ReadPool, ReadThreads};
use crate::{
    failed, parse_prefix, prepare_dir, push_prefix, segment_file_name, segments_of_bucket,
    WriteFaults, PREFIX_BYTES,
};

/// The first and last 8 bytes of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"BRAIDSG1";
/// A block ends after the entry that takes it to this many bytes: the unit of a point
/// read (about 15 flink-peer events). 2 KiB read faster than 4 KiB (a cold read copies
/// its block out of the page cache: 5 % of a spilling run's CPU at 4 KiB), for index
/// memory of about 0.6 % of the files (with first keys, 1.5 % instead of 0.75 %).
const BLOCK_BYTES: usize = 2 << 10;
/// Bytes gathered before each `write` of a segment.
const WRITE_BUFFER_BYTES: usize = 256 << 10;
/// Bytes a scan reads at a time (whole blocks; more when one block is larger).
const SCAN_READ_BYTES: usize = 256 << 10;
/// Segment files a store keeps open; reads of later ones open their file once per job.
/// The default soft limit of open files is often 1,024 per process, shared by every
/// unit's store.
pub const OPEN_FILES_MAX: usize = 128;
const FOOTER_BYTES: usize = 24;

/// The xxh3-64 (seed 0) and the length of a file's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileSum {
    pub xxh3: u64,
    pub bytes: u64,
}

/// Tuning of the segment-file store.
#[derive(Clone, Debug, Default)]
pub struct FileOptions {
    /// Fault injection for tests: fail the segment write after this many succeeded,
    /// as a full disk would.
    pub fail_writes_after: Option<u64>,
    /// Threads for point reads, shared with other stores (a shard's units); `None`:
    /// the store starts its own.
    pub read_threads: Option<Arc<ReadThreads>>,
    /// Files kept open; `None`: [`OPEN_FILES_MAX`].
    pub open_files_max: Option<usize>,
}

/// Where a segment's blocks are: for each block a key that sorts after every key of
/// the block before it and not after the block's first key, and where the block ends.
/// The first block's is its first key; a later block's is the shortest such key, its
/// first key cut after the first byte where it differs from the last key before it
/// ([`separator`]): a few bytes, where flink-peer's keys take 18. Files of earlier
/// builds, which hold every block's first key, read the same way.
#[derive(Default, Debug)]
struct BlockIndex {
    /// The blocks' keys back to back; block `i`'s ends at `key_ends[i]`.
    keys: Vec<u8>,
    key_ends: Vec<u32>,
    /// File offset of each block's end; block 0 starts after the magic. Blocks end
    /// within [`SEGMENT_FILE_BYTES_MAX`].
    block_ends: Vec<u32>,
}

/// Where a segment file's blocks end at the latest: their ends are kept in 4 bytes. A
/// segment holds at most `SEGMENT_BYTES_MAX` (64 MiB) of a join's memory.
const SEGMENT_FILE_BYTES_MAX: u64 = u32::MAX as u64;

/// The shortest key that sorts after `before` and not after `key`, given `before <
/// key`: `key` cut after the first byte where the two differ.
fn separator<'a>(before: &[u8], key: &'a [u8]) -> &'a [u8] {
    let common = before.iter().zip(key).take_while(|(a, b)| a == b).count();
    &key[..(common + 1).min(key.len())]
}

impl BlockIndex {
    fn len(&self) -> usize {
        self.block_ends.len()
    }

    fn block_key(&self, block: usize) -> &[u8] {
        let start = block
            .checked_sub(1)
            .map_or(0, |b| self.key_ends[b] as usize);
        &self.keys[start..self.key_ends[block] as usize]
    }

    /// Starts a block under `key` (its first key, or a [`separator`]);
    /// [`end_block`](Self::end_block) closes it.
    fn start_block(&mut self, key: &[u8]) {
        self.keys.extend_from_slice(key);
        self.key_ends
            .push(u32::try_from(self.keys.len()).expect("a segment's block keys fit in 4 GiB"));
    }

    /// Closes the open block at `end`, which callers keep within
    /// [`SEGMENT_FILE_BYTES_MAX`].
    fn end_block(&mut self, end: u64) {
        self.block_ends
            .push(u32::try_from(end).expect("segment files end before 4 GiB"));
    }

    /// The file range of block `block`.
    fn span(&self, block: usize) -> (u64, u64) {
        let start = block
            .checked_sub(1)
            .map_or(SEGMENT_MAGIC.len() as u64, |b| {
                u64::from(self.block_ends[b])
            });
        (start, u64::from(self.block_ends[block]))
    }

    /// The block that holds `key` if any does: the last whose key is not after it.
    fn find(&self, key: &[u8]) -> Option<usize> {
        let after = {
            // The first block whose key is after `key`.
            let (mut lo, mut hi) = (0, self.len());
            while lo < hi {
                let mid = (lo + hi) / 2;
                if self.block_key(mid) <= key {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            lo
        };
        after.checked_sub(1)
    }

    fn memory_bytes(&self) -> usize {
        self.keys.capacity() + (self.key_ends.capacity() + self.block_ends.capacity()) * 4
    }

    /// Gives back what growing by doubling left unused: an index never grows again.
    fn shrink_to_fit(&mut self) {
        self.keys.shrink_to_fit();
        self.key_ends.shrink_to_fit();
        self.block_ends.shrink_to_fit();
    }

    /// The index and footer as written after the blocks, which end at `data_end`.
    fn write(&self, out: &mut Vec<u8>, data_end: u64) {
        let mut start = SEGMENT_MAGIC.len() as u64;
        for block in 0..self.len() {
            let key = self.block_key(block);
            leb128::push(out, key.len());
            out.extend_from_slice(key);
            let end = u64::from(self.block_ends[block]);
            leb128::push(
                out,
                usize::try_from(end - start).expect("a block fits in memory"),
            );
            start = end;
        }
        out.extend_from_slice(&data_end.to_le_bytes());
        out.extend_from_slice(&(self.len() as u64).to_le_bytes());
        out.extend_from_slice(SEGMENT_MAGIC);
    }

    /// Reads the index of a whole file's bytes `tail` (its index and footer), whose
    /// blocks end at `data_end`; checks that blocks follow one another up to there.
    fn read(tail: &[u8], data_end: u64, blocks: u64) -> Result<BlockIndex, String> {
        let mut index = BlockIndex::default();
        let mut at = 0;
        let mut end = SEGMENT_MAGIC.len() as u64;
        for _ in 0..blocks {
            let key_len = leb128::read(tail, &mut at).ok_or("a cut index")?;
            let key = tail
                .get(at..at.checked_add(key_len).ok_or("a cut index")?)
                .ok_or("a cut index")?;
            at += key_len;
            let len = leb128::read(tail, &mut at).ok_or("a cut index")?;
            if len == 0 {
                return Err("an empty block".into());
            }
            end = end
                .checked_add(len as u64)
                .filter(|&e| e <= data_end)
                .ok_or("a block past the index")?;
            if index.len() > 0 && index.block_key(index.len() - 1) >= key {
                return Err("blocks out of key order".into());
            }
            index.start_block(key);
            index.end_block(end);
        }
        if end != data_end || at + FOOTER_BYTES != tail.len() {
            return Err("the index does not cover the blocks".into());
        }
        Ok(index)
    }
}

/// One live segment: its file and its block index. Shared with the read threads.
#[derive(Debug)]
struct SegmentFile {
    path: PathBuf,
    /// Open for the segment's life, unless the store had [`OPEN_FILES_MAX`] open when
    /// it was written.
    file: Option<Arc<File>>,
    index: BlockIndex,
    bytes: u64,
    /// The xxh3-64 of the file's bytes as this store wrote them; `None` for a file it
    /// took from a checkpoint.
    written_xxh3: Option<u64>,
}

impl SegmentFile {
    fn open(&self) -> Result<Arc<File>, String> {
        match &self.file {
            Some(f) => Ok(Arc::clone(f)),
            None => File::open(&self.path)
                .map(Arc::new)
                .map_err(|e| format!("{}: {e}", self.path.display())),
        }
    }

    fn corrupt(&self, what: &str) -> String {
        format!(
            "{}: {what}; the segment file is corrupted (`braid run --reset` starts from scratch)",
            self.path.display()
        )
    }

    /// Reads block `block` into `buf`.
    fn read_block(&self, file: &File, block: usize, buf: &mut Vec<u8>) -> Result<(), String> {
        let (start, end) = self.index.span(block);
        buf.resize((end - start) as usize, 0);
        file.read_exact_at(buf, start)
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

/// The entries of blocks read whole, in order.
struct Entries<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Entries<'a> {
    /// (key, value), or `None` for an entry cut short.
    type Item = Option<(&'a [u8], &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at == self.bytes.len() {
            return None;
        }
        let entry = (|| {
            let key_len = leb128::read(self.bytes, &mut self.at)?;
            let value_len = leb128::read(self.bytes, &mut self.at)?;
            let key_end = self.at.checked_add(key_len)?;
            let end = key_end.checked_add(value_len)?;
            let key = self.bytes.get(self.at..key_end)?;
            let value = self.bytes.get(key_end..end)?;
            self.at = end;
            Some((key, value))
        })();
        if entry.is_none() {
            self.at = self.bytes.len();
        }
        Some(entry)
    }
}

fn entries(bytes: &[u8]) -> Entries<'_> {
    Entries { bytes, at: 0 }
}

/// The value of `key` in a block read whole, if there.
fn find_in_block<'a>(
    segment: &SegmentFile,
    block: &'a [u8],
    key: &[u8],
) -> Result<Option<&'a [u8]>, String> {
    for entry in entries(block) {
        let (k, v) = entry.ok_or_else(|| segment.corrupt("an entry is cut short"))?;
        match k.cmp(key) {
            std::cmp::Ordering::Less => {}
            std::cmp::Ordering::Equal => return Ok(Some(v)),
            std::cmp::Ordering::Greater => break,
        }
    }
    Ok(None)
}

/// Serves one batch of reads: `segments` holds, for each run of reads of one segment
/// (in `batch` order), how many reads it has and the segment (`None`: not live).
fn serve_files(
    batch: &ReadBatch,
    segments: &[(usize, Option<Arc<SegmentFile>>)],
    found: &mut Found,
) -> Result<(), String> {
    let mut reads = batch.reads.iter();
    let mut block_bytes = Vec::with_capacity(BLOCK_BYTES * 2);
    for (count, segment) in segments {
        let run = reads.by_ref().take(*count);
        let Some(segment) = segment else {
            run.for_each(drop);
            continue;
        };
        let file = segment.open()?;
        let mut loaded = None;
        for (token, range) in run {
            let key = &batch.keys[range.start + PREFIX_BYTES..range.end];
            let Some(block) = segment.index.find(key) else {
                continue;
            };
            // Keys are sorted: reads of one block follow one another.
            if loaded != Some(block) {
                segment.read_block(&file, block, &mut block_bytes)?;
                loaded = Some(block);
            }
            if let Some(value) = find_in_block(segment, &block_bytes, key)? {
                found.push(*token, value);
            }
        }
    }
    Ok(())
}

/// The store braid runs on; see the module's documentation.
pub struct FileStore {
    dir: PathBuf,
    segments: BTreeMap<SegmentId, Arc<SegmentFile>>,
    /// Each live segment's file, for checkpoints. Files are immutable once written.
    paths: BTreeMap<SegmentId, PathBuf>,
    pool: ReadPool,
    open_files: usize,
    open_files_max: usize,
    disk_bytes: u64,
    /// What the block indexes of `segments` take ([`BlockIndex::memory_bytes`]).
    index_bytes: usize,
    /// Reused: the bytes of a segment being written, of a synchronous read, a read's key.
    write_buf: Vec<u8>,
    read_buf: Vec<u8>,
    key: Vec<u8>,
    faults: WriteFaults,
}

impl FileStore {
    /// Opens a fresh store in `dir`, removing the state a previous run left there.
    /// Refuses a non-empty folder that is not braid's state.
    pub fn create(dir: &Path, tuning: &FileOptions) -> Result<FileStore, StoreError> {
        prepare_dir(dir)?;
        let threads = match &tuning.read_threads {
            Some(threads) => Arc::clone(threads),
            None => ReadThreads::start("braid").map_err(|e| failed("start readers", dir, e))?,
        };
        Ok(FileStore {
            dir: dir.to_path_buf(),
            segments: BTreeMap::new(),
            paths: BTreeMap::new(),
            pool: ReadPool::new(threads),
            open_files: 0,
            open_files_max: tuning.open_files_max.unwrap_or(OPEN_FILES_MAX),
            disk_bytes: 0,
            index_bytes: 0,
            write_buf: Vec::new(),
            read_buf: Vec::new(),
            key: Vec::new(),
            faults: WriteFaults::after(tuning.fail_writes_after),
        })
    }

    /// The file of each live segment. Files are immutable once written.
    pub fn segment_files(&self) -> &BTreeMap<SegmentId, PathBuf> {
        &self.paths
    }

    /// The checksum of segment `id`'s file as this store wrote it, if it did (not for
    /// a file taken from a checkpoint): a checkpoint keeps it without reading the file
    /// back (flink-peer at 128 MiB with checkpoints every second: 286 ms a checkpoint
    /// against 337 ms).
    pub fn written_sum(&self, id: SegmentId) -> Option<FileSum> {
        let segment = self.segments.get(&id)?;
        Some(FileSum {
            xxh3: segment.written_xxh3?,
            bytes: segment.bytes,
        })
    }

    /// Where the file of segment `id` lives; [`ingest_segments`](Self::ingest_segments)
    /// expects restored files there.
    pub fn segment_path(&self, id: SegmentId) -> PathBuf {
        self.dir.join("segments").join(segment_file_name(id))
    }

    /// Adds segment files placed at their [`segment_path`](Self::segment_path) (by a
    /// restore from a checkpoint), reading each one's index from its footer.
    pub fn ingest_segments(&mut self, ids: &[SegmentId]) -> Result<(), StoreError> {
        for &id in ids {
            let path = self.segment_path(id);
            let segment = self
                .read_footer(&path)
                .map_err(|e| failed("restore segment", &path, e))?;
            self.add(id, segment);
        }
        Ok(())
    }

    /// Bytes of segment files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// Bytes of memory the block indexes of live segments take.
    pub fn index_bytes(&self) -> usize {
        self.index_bytes
    }

    fn read_footer(&mut self, path: &Path) -> Result<SegmentFile, String> {
        let file = File::open(path).map_err(|e| e.to_string())?;
        let bytes = file.metadata().map_err(|e| e.to_string())?.len();
        let not_ours = || {
            format!(
                "not a braid segment file (format {}; a checkpoint of another braid version does not load: `braid run --reset` starts from scratch)",
                String::from_utf8_lossy(SEGMENT_MAGIC)
            )
        };
        if bytes < (SEGMENT_MAGIC.len() + FOOTER_BYTES) as u64 {
            return Err(not_ours());
        }
        let mut head = [0u8; 8];
        file.read_exact_at(&mut head, 0)
            .map_err(|e| e.to_string())?;
        let mut footer = [0u8; FOOTER_BYTES];
        file.read_exact_at(&mut footer, bytes - FOOTER_BYTES as u64)
            .map_err(|e| e.to_string())?;
        if &head != SEGMENT_MAGIC || &footer[16..] != SEGMENT_MAGIC {
            return Err(not_ours());
        }
        let data_end = u64::from_le_bytes(footer[..8].try_into().expect("8 bytes"));
        let blocks = u64::from_le_bytes(footer[8..16].try_into().expect("8 bytes"));
        if data_end < SEGMENT_MAGIC.len() as u64 || data_end > bytes - FOOTER_BYTES as u64 {
            return Err("its footer points outside the file (corrupted)".into());
        }
        if data_end > SEGMENT_FILE_BYTES_MAX {
            return Err("blocks past 4 GiB, more than a segment file holds (corrupted)".into());
        }
        let mut tail = vec![0u8; (bytes - data_end) as usize];
        file.read_exact_at(&mut tail, data_end)
            .map_err(|e| e.to_string())?;
        let index =
            BlockIndex::read(&tail, data_end, blocks).map_err(|e| format!("{e} (corrupted)"))?;
        if index.len() == 0 {
            return Err("a segment without entries (corrupted)".into());
        }
        Ok(SegmentFile {
            path: path.to_path_buf(),
            file: Some(Arc::new(file)),
            index,
            bytes,
            written_xxh3: None,
        })
    }

    /// Registers a live segment, closing its file if the store has as many open as it
    /// keeps.
    fn add(&mut self, id: SegmentId, mut segment: SegmentFile) {
        if self.open_files < self.open_files_max {
            self.open_files += 1;
        } else {
            segment.file = None;
        }
        self.disk_bytes += segment.bytes;
        segment.index.shrink_to_fit();
        self.index_bytes += segment.index.memory_bytes();
        self.paths.insert(id, segment.path.clone());
        self.segments.insert(id, Arc::new(segment));
    }

    fn remove(&mut self, id: SegmentId) -> Option<Arc<SegmentFile>> {
        let segment = self.segments.remove(&id)?;
        self.paths.remove(&id);
        self.disk_bytes -= segment.bytes;
        self.index_bytes -= segment.index.memory_bytes();
        if segment.file.is_some() {
            self.open_files -= 1;
        }
        Some(segment)
    }

    fn write_file(
        &mut self,
        path: &Path,
        entries: &mut dyn SegmentEntries,
    ) -> Result<SegmentFile, StoreError> {
        let fail = |e: &dyn std::fmt::Display| failed("write segment", path, e);
        // Read as well: the handle serves the segment's reads.
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| fail(&e))?;
        let buf = &mut self.write_buf;
        buf.clear();
        buf.extend_from_slice(SEGMENT_MAGIC);
        let mut index = BlockIndex::default();
        // Bytes written before `buf`, where the open block started, the last key.
        let mut written = 0u64;
        let mut block_start = None::<u64>;
        let mut last_key = Vec::new();
        let mut sum = Xxh3::new();
        entries.each(&mut |key, value| {
            let at = written + buf.len() as u64;
            match block_start {
                Some(start) if at - start < BLOCK_BYTES as u64 => {}
                Some(_) => {
                    index.end_block(at);
                    index.start_block(separator(&last_key, key));
                    block_start = Some(at);
                }
                None => {
                    index.start_block(key);
                    block_start = Some(at);
                }
            }
            last_key.clear();
            last_key.extend_from_slice(key);
            leb128::push(buf, key.len());
            leb128::push(buf, value.len());
            buf.extend_from_slice(key);
            buf.extend_from_slice(value);
            if written + buf.len() as u64 > SEGMENT_FILE_BYTES_MAX {
                return Err(fail(&"a segment of 4 GiB or more"));
            }
            if buf.len() >= WRITE_BUFFER_BYTES {
                sum.update(buf);
                file.write_all(buf).map_err(|e| fail(&e))?;
                written += buf.len() as u64;
                buf.clear();
            }
            Ok(())
        })?;
        let data_end = written + buf.len() as u64;
        if block_start.is_none() {
            return Err(fail(&"a segment without entries"));
        }
        index.end_block(data_end);
        index.write(buf, data_end);
        sum.update(buf);
        file.write_all(buf).map_err(|e| fail(&e))?;
        let bytes = written + buf.len() as u64;
        buf.clear();
        if buf.capacity() > WRITE_BUFFER_BYTES * 2 {
            buf.shrink_to(WRITE_BUFFER_BYTES * 2);
        }
        Ok(SegmentFile {
            path: path.to_path_buf(),
            file: Some(Arc::new(file)),
            index,
            bytes,
            written_xxh3: Some(sum.digest()),
        })
    }
}

impl StateStore for FileStore {
    fn write_segment(
        &mut self,
        id: SegmentId,
        entries: &mut dyn SegmentEntries,
    ) -> Result<(), StoreError> {
        let path = self.segment_path(id);
        self.faults.before_write(&path)?;
        match self.write_file(&path, entries) {
            Ok(segment) => {
                self.add(id, segment);
                Ok(())
            }
            Err(e) => {
                // Leave no partial file behind; the write's error is what matters.
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    fn get(&mut self, id: SegmentId, key: &[u8], out: &mut Vec<u8>) -> Result<bool, StoreError> {
        out.clear();
        let Some(segment) = self.segments.get(&id) else {
            return Ok(false);
        };
        let Some(block) = segment.index.find(key) else {
            return Ok(false);
        };
        let fail = |e| failed("get", &self.dir, e);
        let file = segment.open().map_err(fail)?;
        segment
            .read_block(&file, block, &mut self.read_buf)
            .map_err(fail)?;
        match find_in_block(segment, &self.read_buf, key).map_err(fail)? {
            Some(value) => {
                out.extend_from_slice(value);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn start_read(&mut self, token: usize, id: SegmentId, key: &[u8]) -> Result<(), StoreError> {
        self.key.clear();
        push_prefix(&mut self.key, id.side, id.bucket, Some(id.segment));
        self.key.extend_from_slice(key);
        self.pool.add(token, &self.key);
        Ok(())
    }

    fn finish_reads(&mut self, found: &mut dyn FnMut(usize, &[u8])) -> Result<(), StoreError> {
        let live = &self.segments;
        self.pool
            .collect(
                &mut |batch: ReadBatch| -> BatchWork {
                    // Runs of reads of one segment, with the segment (sorted by prefix).
                    let mut segments: Vec<(usize, Option<Arc<SegmentFile>>)> = Vec::new();
                    let mut last: Option<&[u8]> = None;
                    for (_, range) in &batch.reads {
                        let prefix = &batch.keys[range.start..range.start + PREFIX_BYTES];
                        match segments.last_mut() {
                            Some((count, _)) if last == Some(prefix) => *count += 1,
                            _ => {
                                let segment = live.get(&parse_prefix(prefix)).cloned();
                                segments.push((1, segment));
                                last = Some(prefix);
                            }
                        }
                    }
                    Box::new(move |found| serve_files(&batch, &segments, found))
                },
                found,
            )
            .map_err(|e| failed("get", &self.dir, e))
    }

    fn scan_segment(
        &mut self,
        id: SegmentId,
        visit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), StoreError> {
        let Some(segment) = self.segments.get(&id) else {
            return Ok(());
        };
        let fail = |e| failed("scan segment", &self.dir, e);
        let file = segment.open().map_err(fail)?;
        let buf = &mut self.read_buf;
        let mut block = 0;
        while block < segment.index.len() {
            // Whole blocks, up to SCAN_READ_BYTES (at least one).
            let (start, mut end) = segment.index.span(block);
            block += 1;
            while block < segment.index.len() {
                let (_, next_end) = segment.index.span(block);
                if next_end - start > SCAN_READ_BYTES as u64 {
                    break;
                }
                end = next_end;
                block += 1;
            }
            buf.resize((end - start) as usize, 0);
            file.read_exact_at(buf, start)
                .map_err(|e| fail(format!("{}: {e}", segment.path.display())))?;
            for entry in entries(buf) {
                let (k, v) = entry.ok_or_else(|| fail(segment.corrupt("an entry is cut short")))?;
                visit(k, v);
            }
        }
        if buf.capacity() > SCAN_READ_BYTES * 2 {
            *buf = Vec::new();
        }
        Ok(())
    }

    /// The block indexes of live segments ([`BlockIndex::memory_bytes`]): about 13
    /// bytes per block of [`BLOCK_BYTES`] for flink-peer, 0.6 % of the files.
    fn memory_bytes(&self) -> usize {
        self.index_bytes
    }

    fn drop_bucket(&mut self, side: Side, bucket: i64) -> Result<(), StoreError> {
        for id in segments_of_bucket(&self.segments, side, bucket) {
            let segment = self.remove(id).expect("listed above");
            std::fs::remove_file(&segment.path)
                .map_err(|e| failed("drop bucket", &segment.path, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_core::SegmentEntry;

    fn id(segment: u32) -> SegmentId {
        SegmentId {
            side: Side::Left,
            bucket: 7,
            segment,
        }
    }

    type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

    /// A store with one segment of 300 keys whose values take several blocks.
    impl FileStore {
        /// One read through the read threads.
        fn read_one(&mut self, id: SegmentId, key: &[u8]) -> Result<Vec<u8>, StoreError> {
            self.start_read(0, id, key)?;
            let mut got = Vec::new();
            self.finish_reads(&mut |_, v| got = v.to_vec())?;
            Ok(got)
        }
    }

    fn store_with_segment(dir: &Path) -> (FileStore, KeyValues) {
        let mut store = FileStore::create(dir, &FileOptions::default()).expect("open");
        let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..300u32)
            .map(|i| {
                let key = format!("key-{i:05}").into_bytes();
                (key, vec![i as u8; (i as usize * 37) % 200])
            })
            .collect();
        let list: Vec<SegmentEntry<'_>> = entries
            .iter()
            .map(|(key, value)| SegmentEntry { key, value })
            .collect();
        store
            .write_segment(id(0), &mut list.as_slice())
            .expect("write");
        (store, entries)
    }

    #[test]
    fn blocks_end_after_the_entry_that_fills_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, entries) = store_with_segment(dir.path());
        let index = &store.segments[&id(0)].index;
        let bytes: usize = entries.iter().map(|(k, v)| k.len() + v.len() + 3).sum();
        assert!(index.len() > 3, "{} blocks", index.len());
        assert!(
            index.len() <= bytes / BLOCK_BYTES + 1,
            "{} blocks",
            index.len()
        );
        for block in 0..index.len() - 1 {
            let (start, end) = index.span(block);
            assert!(end - start >= BLOCK_BYTES as u64, "block {block}");
            assert!(end - start < (BLOCK_BYTES + 220) as u64, "block {block}");
        }
        assert_eq!(store.index_bytes(), index.memory_bytes());
    }

    /// The checksum taken while writing is the file's: a checkpoint keeps it as the
    /// file's without reading the file back. A restored file has none.
    #[test]
    fn the_written_sum_is_the_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, _) = store_with_segment(dir.path());
        let bytes = std::fs::read(store.segment_path(id(0))).expect("read");
        let expected = FileSum {
            xxh3: xxhash_rust::xxh3::xxh3_64(&bytes),
            bytes: bytes.len() as u64,
        };
        assert_eq!(store.written_sum(id(0)), Some(expected));

        let copy = tempfile::tempdir().expect("temp dir");
        let mut restored = FileStore::create(copy.path(), &FileOptions::default()).expect("open");
        std::fs::write(restored.segment_path(id(0)), &bytes).expect("copy");
        restored.ingest_segments(&[id(0)]).expect("ingest");
        assert_eq!(restored.written_sum(id(0)), None);
        assert_eq!(restored.written_sum(id(1)), None);
    }

    /// The join counts the block indexes in its budget: what the store reports is what
    /// the live segments' indexes hold (their first keys at least, nothing left over
    /// from growing them), until their bucket is dropped.
    #[test]
    fn index_memory_is_counted_until_the_bucket_is_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut store, _) = store_with_segment(dir.path());
        let index = &store.segments[&id(0)].index;
        let keys: usize = (0..index.len()).map(|b| index.block_key(b).len()).sum();
        let exact = keys + index.len() * (4 + 4);
        assert_eq!(StateStore::memory_bytes(&store), exact);
        let id0 = id(0);
        store.drop_bucket(id0.side, id0.bucket).expect("drop");
        assert_eq!(StateStore::memory_bytes(&store), 0);
    }

    /// A file of another format (an SST of an older braid, say) is refused with what
    /// to do; so is every truncation of a segment file, and a flipped byte never makes
    /// a read or a scan panic.
    #[test]
    fn foreign_cut_and_corrupted_files_are_refused_or_read_without_panicking() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, entries) = store_with_segment(&dir.path().join("a"));
        let good = std::fs::read(store.segment_path(id(0))).expect("read");
        let mut other =
            FileStore::create(&dir.path().join("b"), &FileOptions::default()).expect("open");
        let path = other.segment_path(id(0));
        let mut load = |bytes: &[u8]| {
            std::fs::write(&path, bytes).expect("write");
            other.read_footer(&path).map(drop)
        };
        let e = load(b"SST\0 this is not ours, but long enough").expect_err("refused");
        assert!(
            e.contains("not a braid segment file") && e.contains("--reset"),
            "{e}"
        );
        // Every cut of the index and footer, and of the blocks every 61st.
        let index_start = good.len() - store.segments[&id(0)].index.len() * 12 - FOOTER_BYTES;
        for cut in (0..good.len()).filter(|&c| c % 61 == 0 || c + 64 >= index_start) {
            assert!(load(&good[..cut]).is_err(), "cut at {cut}");
        }
        // Each flipped file under a path of its own, served by one store.
        let flipped = dir.path().join("flipped");
        std::fs::create_dir_all(&flipped).expect("mkdir");
        let mut out = Vec::new();
        for at in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[at] ^= 0x5a;
            let path = flipped.join(format!("{at}.seg"));
            std::fs::write(&path, &bad).expect("write");
            let Ok(segment) = other.read_footer(&path) else {
                continue;
            };
            let n = at as u32 + 1;
            other.add(id(n), segment);
            for (key, _) in entries.iter().step_by(13) {
                let _ = other.get(id(n), key, &mut out);
            }
            let _ = other.scan_segment(id(n), &mut |_, _| {});
            let _ = other.read_one(id(n), &entries[5].0);
        }
        let mut back =
            FileStore::create(&dir.path().join("d"), &FileOptions::default()).expect("open");
        std::fs::write(back.segment_path(id(0)), &good).expect("write");
        back.ingest_segments(&[id(0)]).expect("a good copy loads");
        for (key, value) in &entries {
            assert!(back.get(id(0), key, &mut out).expect("get"), "{key:?}");
            assert_eq!(&out, value);
        }
    }
}
