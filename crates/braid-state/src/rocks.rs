//! The RocksDB store.
//!
//! Key layout: `side (1) | bucket (8, big-endian, sign bit flipped) | segment (4) | key`,
//! so one bucket's segments are contiguous, and a segment is one key range.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use braid_core::{SegmentEntries, SegmentId, Side, StateStore, StoreError};

use crate::{failed, prepare_dir, segment_file_stem, segments_of_bucket, WriteFaults};

use crate::reads::{point_read_options, serve_rocks, ReadPool, ReadThreads};
use crate::{push_prefix, PREFIX_BYTES};
use rocksdb::{
    BlockBasedOptions, Cache, DBCompressionType, IngestExternalFileOptions, Options, ReadOptions,
    SstFileWriter, DB,
};

/// Tuning of the RocksDB store.
#[derive(Clone, Debug)]
pub struct RocksOptions {
    /// Block cache for reads of spilled segments; part of the process's fixed memory.
    pub block_cache_bytes: usize,
    /// Compress spilled segments with LZ4.
    pub compress: bool,
    /// Fault injection for tests: fail the segment write after this many succeeded,
    /// as a full disk would.
    pub fail_writes_after: Option<u64>,
    /// Threads for point reads, shared with other stores (a shard's units); `None`:
    /// the store starts its own.
    pub read_threads: Option<Arc<ReadThreads>>,
}

impl Default for RocksOptions {
    fn default() -> RocksOptions {
        RocksOptions {
            block_cache_bytes: 8 << 20,
            compress: true,
            fail_writes_after: None,
            read_threads: None,
        }
    }
}

pub struct RocksStore {
    /// Its reads in flight hold the database until they end.
    pool: ReadPool,
    db: Arc<DB>,
    dir: PathBuf,
    options: Options,
    /// Point reads: most are of blocks no other read will touch (a probe for a random
    /// key in a segment of hundreds of blocks), so they neither fill the block cache
    /// nor verify block checksums (the files were written by this process and are
    /// checked when checkpoints copy them, issue 3).
    point_read: ReadOptions,
    /// Reused key buffer.
    key: Vec<u8>,
    /// Every live segment's file in `segments/`: a hard link to the file RocksDB
    /// ingested, which stays unchanged, so that checkpoints can copy it.
    files: BTreeMap<SegmentId, PathBuf>,
    faults: WriteFaults,
}

impl RocksStore {
    /// Opens a fresh store in `dir`, removing the state a previous run left there.
    /// Refuses a non-empty folder that is not braid's state.
    pub fn create(dir: &Path, tuning: &RocksOptions) -> Result<RocksStore, StoreError> {
        prepare_dir(dir)?;
        // No RocksDB Bloom filters: the join keeps its own filter per segment in memory
        // and asks RocksDB only for keys that filter allows. Index blocks stay in the
        // table readers (about 1 % of the spilled bytes), not in the block cache, so
        // that data blocks never evict them and a point read is one data-block read.
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&Cache::new_lru_cache(tuning.block_cache_bytes));
        table.set_cache_index_and_filter_blocks(false);
        let mut options = Options::default();
        options.create_if_missing(true);
        options.set_block_based_table_factory(&table);
        options.set_disable_auto_compactions(true);
        options.set_compression_type(if tuning.compress {
            DBCompressionType::Lz4
        } else {
            DBCompressionType::None
        });
        options.set_max_open_files(512);
        // Nothing is written through the memtable (segments are ingested as files), so
        // keep its arena small: its blocks are sized from the write buffer.
        options.set_write_buffer_size(1 << 20);
        options.set_keep_log_file_num(2);
        let db = DB::open(&options, dir.join("db")).map_err(|e| failed("open", dir, e))?;
        let db = Arc::new(db);
        Ok(RocksStore {
            pool: ReadPool::new(match &tuning.read_threads {
                Some(threads) => Arc::clone(threads),
                None => ReadThreads::start("braid").map_err(|e| failed("start readers", dir, e))?,
            }),
            point_read: point_read_options(),
            db,
            dir: dir.to_path_buf(),
            options,
            key: Vec::new(),
            files: BTreeMap::new(),
            faults: WriteFaults::after(tuning.fail_writes_after),
        })
    }

    /// The file of each live segment. Files are immutable once written.
    pub fn segment_files(&self) -> &BTreeMap<SegmentId, PathBuf> {
        &self.files
    }

    /// Where the file of segment `id` lives; [`ingest_segments`](Self::ingest_segments)
    /// expects restored files there.
    pub fn segment_path(&self, id: SegmentId) -> PathBuf {
        self.dir.join("segments").join(rocks_file_name(id))
    }

    /// Adds segment files placed at their [`segment_path`](Self::segment_path) (by a
    /// restore from a checkpoint) to the database, all in one ingestion.
    pub fn ingest_segments(&mut self, ids: &[SegmentId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut links = Vec::with_capacity(ids.len());
        for &id in ids {
            let path = self.segment_path(id);
            let link = self
                .dir
                .join("ingest")
                .join(path.file_name().expect("a file name"));
            std::fs::hard_link(&path, &link).map_err(|e| failed("restore segment", &path, e))?;
            links.push(link);
            self.files.insert(id, path);
        }
        let mut ingest = IngestExternalFileOptions::default();
        ingest.set_move_files(true);
        self.db
            .ingest_external_file_opts(&ingest, links)
            .map_err(|e| failed("restore segments", &self.dir, e))
    }

    /// Bytes of SST files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.db
            .property_int_value("rocksdb.total-sst-files-size")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    fn set_key(&mut self, id: SegmentId, key: &[u8]) {
        self.key.clear();
        push_prefix(&mut self.key, id.side, id.bucket, Some(id.segment));
        self.key.extend_from_slice(key);
    }
}

/// The file name of segment `id` in a RocksDB store.
fn rocks_file_name(id: SegmentId) -> String {
    format!("{}.sst", segment_file_stem(id))
}

impl StateStore for RocksStore {
    fn write_segment(
        &mut self,
        id: SegmentId,
        entries: &mut dyn SegmentEntries,
    ) -> Result<(), StoreError> {
        let path = self.segment_path(id);
        self.faults.before_write(&path)?;
        let mut writer = SstFileWriter::create(&self.options);
        writer
            .open(&path)
            .map_err(|e| failed("write segment", &path, e))?;
        let mut key = Vec::with_capacity(PREFIX_BYTES + 64);
        entries.each(&mut |entry_key, value| {
            key.clear();
            push_prefix(&mut key, id.side, id.bucket, Some(id.segment));
            key.extend_from_slice(entry_key);
            writer
                .put(&key, value)
                .map_err(|e| failed("write segment", &path, e))
        })?;
        writer
            .finish()
            .map_err(|e| failed("write segment", &path, e))?;
        // RocksDB moves the ingested link into its folder; `path` stays, unchanged.
        let link = self
            .dir
            .join("ingest")
            .join(path.file_name().expect("a file name"));
        std::fs::hard_link(&path, &link).map_err(|e| failed("ingest segment", &path, e))?;
        let mut ingest = IngestExternalFileOptions::default();
        ingest.set_move_files(true);
        self.db
            .ingest_external_file_opts(&ingest, vec![&link])
            .map_err(|e| failed("ingest segment", &path, e))?;
        self.files.insert(id, path);
        Ok(())
    }

    fn get(&mut self, id: SegmentId, key: &[u8], out: &mut Vec<u8>) -> Result<bool, StoreError> {
        self.set_key(id, key);
        out.clear();
        match self.db.get_pinned_opt(&self.key, &self.point_read) {
            Ok(Some(value)) => {
                out.extend_from_slice(&value);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(failed("get", &self.dir, e)),
        }
    }

    fn start_read(&mut self, token: usize, id: SegmentId, key: &[u8]) -> Result<(), StoreError> {
        self.set_key(id, key);
        self.pool.add(token, &self.key);
        Ok(())
    }

    fn finish_reads(&mut self, found: &mut dyn FnMut(usize, &[u8])) -> Result<(), StoreError> {
        let db = &self.db;
        self.pool
            .collect(
                &mut |batch| {
                    let db = Arc::clone(db);
                    Box::new(move |found| serve_rocks(&db, PREFIX_BYTES, &batch, found))
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
        let mut lower = Vec::with_capacity(PREFIX_BYTES);
        push_prefix(&mut lower, id.side, id.bucket, Some(id.segment));
        let mut upper = Vec::with_capacity(PREFIX_BYTES);
        push_prefix(&mut upper, id.side, id.bucket, Some(id.segment + 1));
        let mut read = ReadOptions::default();
        read.set_iterate_lower_bound(lower);
        read.set_iterate_upper_bound(upper);
        read.fill_cache(false);
        let mut it = self.db.raw_iterator_opt(read);
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            visit(&k[PREFIX_BYTES..], v);
            it.next();
        }
        it.status()
            .map_err(|e| failed("scan segment", &self.dir, e))
    }

    /// Not counted: RocksDB keeps its index blocks in its own caches.
    fn memory_bytes(&self) -> usize {
        0
    }

    fn drop_bucket(&mut self, side: Side, bucket: i64) -> Result<(), StoreError> {
        let mut from = Vec::with_capacity(PREFIX_BYTES);
        push_prefix(&mut from, side, bucket, None);
        let mut to = Vec::with_capacity(PREFIX_BYTES);
        match bucket.checked_add(1) {
            Some(next) => push_prefix(&mut to, side, next, None),
            None => to.push(side.index() as u8 + 1),
        }
        // Each segment is one file in the bottom level and files are never compacted
        // together, so deleting the files inside the range removes the bucket whole.
        self.db
            .delete_file_in_range(&from, &to)
            .map_err(|e| failed("drop bucket", &self.dir, e))?;
        for id in segments_of_bucket(&self.files, side, bucket) {
            let path = self.files.remove(&id).expect("listed above");
            std::fs::remove_file(&path).map_err(|e| failed("drop bucket", &path, e))?;
        }
        Ok(())
    }
}
