//! A pool of threads that serve a store's point reads in parallel.
//!
//! A read of a spilled segment that is not in the page cache waits about 50 µs on the
//! disk here. One after another, a batch's few hundred such reads kept a shard idle
//! most of the time; issued together, they wait on the disk at once. The threads
//! spend their time blocked in the kernel, not on the CPU.
//!
//! The reads are gathered first ([`ReadPool::add`]) and served together
//! ([`ReadPool::collect`]): sorted by key (a segment prefix, then the key) and cut into
//! one job per thread (at most [`READ_CHUNK_KEYS`] keys each), so that a job costs one
//! wake-up, not one per key. The store turns each cut into the work its threads do
//! ([`ReadBatch`]): the RocksDB store reads a segment's keys in key order through one
//! iterator when it has a few of them (a forward seek that lands in the block the
//! iterator holds reuses it); the segment-file store reads each block once.

use std::ops::Range;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use rocksdb::{ReadOptions, DB};

/// Reader threads per shard: the stores of a shard's units share them (they never
/// read at the same time: the shard serves one unit at a time).
pub const READ_THREADS: usize = 8;
/// Jobs queued for the threads before the shard waits.
const READ_QUEUE_MAX: usize = 1_024;
/// The most keys in one job; fewer when that would leave threads idle.
pub const READ_CHUNK_KEYS: usize = 256;
/// Keys of one segment in a job from which they are read through one iterator: an
/// iterator costs a few point reads to set up, and then its forward seeks reuse the
/// block they land in.
const ITERATOR_KEYS_MIN: usize = 4;

/// One job's reads: keys (each after its segment's prefix) back to back, sorted, each
/// with its token and its range in `keys`.
pub struct ReadBatch {
    pub keys: Vec<u8>,
    pub reads: Vec<(usize, Range<usize>)>,
}

/// What a reader thread runs: one job, which reports to its pool itself.
type Job = Box<dyn FnOnce() + Send>;

/// The work of one job, built by the store on its own thread: serves a batch.
pub type BatchWork = Box<dyn FnOnce(&mut Found) -> Result<(), String> + Send>;

/// The values found by one job, back to back, each with its token.
#[derive(Default)]
pub struct Found {
    values: Vec<u8>,
    reads: Vec<(usize, Range<usize>)>,
}

impl Found {
    pub fn push(&mut self, token: usize, value: &[u8]) {
        let start = self.values.len();
        self.values.extend_from_slice(value);
        self.reads.push((token, start..self.values.len()));
    }
}

type ReadDone = Result<Found, String>;

/// Serves one batch of reads of a RocksDB store, a segment at a time; keys sharing
/// their first `prefix_bytes` are in one segment.
pub fn serve_rocks(
    db: &DB,
    prefix_bytes: usize,
    job: &ReadBatch,
    found: &mut Found,
) -> Result<(), String> {
    let keys = &job.keys;
    let mut rest = &job.reads[..];
    while let Some((_, first)) = rest.first() {
        let prefix = &keys[first.start..first.start + prefix_bytes];
        let same = rest
            .iter()
            .take_while(|(_, r)| keys[r.clone()].starts_with(prefix))
            .count();
        let (segment, after) = rest.split_at(same);
        rest = after;
        if segment.len() < ITERATOR_KEYS_MIN {
            let options = point_read_options();
            for (token, range) in segment {
                let value = db
                    .get_pinned_opt(&keys[range.clone()], &options)
                    .map_err(|e| e.to_string())?;
                if let Some(value) = value {
                    found.push(*token, &value);
                }
            }
            continue;
        }
        let mut options = point_read_options();
        options.set_iterate_lower_bound(prefix.to_vec());
        options.set_iterate_upper_bound(successor(prefix));
        let mut it = db.raw_iterator_opt(options);
        for (token, range) in segment {
            let key = &keys[range.clone()];
            // Equal keys are adjacent: the iterator already stands on the second.
            if it.key() != Some(key) {
                it.seek(key);
            }
            if let (Some(k), Some(v)) = (it.key(), it.value()) {
                if k == key {
                    found.push(*token, v);
                }
            }
        }
        it.status().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// [`READ_THREADS`] threads serving the point reads of any number of stores.
pub struct ReadThreads {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl ReadThreads {
    /// Starts the threads, named `{name}-read-{i}`.
    pub fn start(name: &str) -> std::io::Result<Arc<ReadThreads>> {
        let (jobs, job_rx) = bounded::<Job>(READ_QUEUE_MAX);
        let mut threads = Vec::with_capacity(READ_THREADS);
        for i in 0..READ_THREADS {
            let job_rx = job_rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-read-{i}"))
                    .spawn(move || job_rx.into_iter().for_each(|job| job()))?,
            );
        }
        Ok(Arc::new(ReadThreads {
            jobs: Some(jobs),
            threads,
        }))
    }
}

impl std::fmt::Debug for ReadThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadThreads({})", self.threads.len())
    }
}

impl Drop for ReadThreads {
    fn drop(&mut self) {
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// One store's reads, served by (possibly shared) [`ReadThreads`].
pub struct ReadPool {
    threads: Arc<ReadThreads>,
    done_tx: Sender<ReadDone>,
    done: Receiver<ReadDone>,
    /// Reads added and not yet collected: their keys back to back, and each read's
    /// token and key.
    keys: Vec<u8>,
    reads: Vec<(usize, Range<usize>)>,
}

/// Options of a point read: no block-cache fill, no checksum (see `RocksStore`).
pub fn point_read_options() -> ReadOptions {
    let mut read = ReadOptions::default();
    read.fill_cache(false);
    read.set_verify_checksums(false);
    read
}

/// The first key after every key that starts with `prefix`.
fn successor(prefix: &[u8]) -> Vec<u8> {
    let mut next = prefix.to_vec();
    while let Some(last) = next.pop() {
        if last < u8::MAX {
            next.push(last + 1);
            return next;
        }
    }
    unreachable!("a segment prefix is never all 0xFF (its first byte is the side)")
}

impl ReadPool {
    /// A store's reads on `threads`.
    pub fn new(threads: Arc<ReadThreads>) -> ReadPool {
        let (done_tx, done) = unbounded::<ReadDone>();
        ReadPool {
            threads,
            done_tx,
            done,
            keys: Vec::new(),
            reads: Vec::new(),
        }
    }

    /// Adds a read of `key` (its segment prefix included); its value comes back from
    /// [`collect`](Self::collect) under `token`.
    pub fn add(&mut self, token: usize, key: &[u8]) {
        let start = self.keys.len();
        self.keys.extend_from_slice(key);
        self.reads.push((token, start..self.keys.len()));
    }

    /// Serves every added read, each cut by the work `serve` makes of it on the
    /// threads; calls `found(token, value)` for each present key, in any order. Returns
    /// the first error after all reads have finished.
    pub fn collect(
        &mut self,
        serve: &mut dyn FnMut(ReadBatch) -> BatchWork,
        found: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<(), String> {
        let jobs = self
            .threads
            .jobs
            .as_ref()
            .expect("the threads run until dropped");
        let keys = &self.keys;
        self.reads
            .sort_unstable_by(|a, b| keys[a.1.clone()].cmp(&keys[b.1.clone()]));
        let mut outstanding = 0usize;
        let mut first_error = None;
        let chunk_keys = self
            .reads
            .len()
            .div_ceil(READ_THREADS)
            .clamp(1, READ_CHUNK_KEYS);
        for chunk in self.reads.chunks(chunk_keys) {
            let mut job_keys = Vec::with_capacity(chunk.iter().map(|(_, r)| r.len()).sum());
            let job_reads = chunk
                .iter()
                .map(|(token, r)| {
                    let start = job_keys.len();
                    job_keys.extend_from_slice(&keys[r.clone()]);
                    (*token, start..job_keys.len())
                })
                .collect();
            let work = serve(ReadBatch {
                keys: job_keys,
                reads: job_reads,
            });
            let done = self.done_tx.clone();
            let job: Job = Box::new(move || {
                let mut found = Found::default();
                let result = work(&mut found).map(|()| found);
                // A store dropped with reads outstanding no longer listens.
                let _ = done.send(result);
            });
            // A full queue: take finished jobs while waiting for room.
            let mut job = Some(job);
            while let Some(j) = job.take() {
                match jobs.try_send(j) {
                    Ok(()) => outstanding += 1,
                    Err(crossbeam_channel::TrySendError::Full(j)) => {
                        job = Some(j);
                        take_one(&self.done, found, &mut first_error)?;
                        outstanding -= 1;
                    }
                    Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                        return Err("a read thread died".to_string())
                    }
                }
            }
        }
        self.keys.clear();
        self.reads.clear();
        for _ in 0..outstanding {
            take_one(&self.done, found, &mut first_error)?;
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Waits for one finished job and hands its values to `found`; keeps its error, if
/// it failed, in `first_error`.
fn take_one(
    done: &Receiver<ReadDone>,
    found: &mut dyn FnMut(usize, &[u8]),
    first_error: &mut Option<String>,
) -> Result<(), String> {
    let done = done.recv().map_err(|_| "a read thread died".to_string())?;
    match done {
        Ok(f) => {
            for (token, range) in f.reads {
                found(token, &f.values[range]);
            }
        }
        Err(e) => {
            first_error.get_or_insert(e);
        }
    }
    Ok(())
}
