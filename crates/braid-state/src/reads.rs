//! A pool of threads that serve a batch's point reads in parallel.
//!
//! A read of a spilled segment that is not in the page cache waits about 50 µs on the
//! disk here. One after another, a batch's few hundred such reads kept a shard idle
//! most of the time; issued together, they wait on the disk at once. The threads
//! spend their time blocked in the kernel, not on the CPU.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use rocksdb::{ReadOptions, DB};

/// Reader threads per shard: the stores of a shard's units share them (they never
/// read at the same time: the shard serves one unit at a time).
pub const READ_THREADS: usize = 8;
/// Reads queued for the threads before the shard waits.
const READ_QUEUE_MAX: usize = 4_096;

struct ReadJob {
    db: Arc<DB>,
    index: usize,
    key: Vec<u8>,
    done: Sender<ReadDone>,
}

type ReadDone = (usize, Result<Option<Vec<u8>>, String>);

/// [`READ_THREADS`] threads serving the point reads of any number of stores.
pub struct ReadThreads {
    jobs: Option<Sender<ReadJob>>,
    threads: Vec<JoinHandle<()>>,
}

impl ReadThreads {
    /// Starts the threads, named `{name}-read-{i}`.
    pub fn start(name: &str) -> std::io::Result<Arc<ReadThreads>> {
        let (jobs, job_rx) = bounded::<ReadJob>(READ_QUEUE_MAX);
        let mut threads = Vec::with_capacity(READ_THREADS);
        for i in 0..READ_THREADS {
            let job_rx = job_rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-read-{i}"))
                    .spawn(move || {
                        let read = point_read_options();
                        for job in job_rx {
                            let value = job
                                .db
                                .get_pinned_opt(&job.key, &read)
                                .map(|v| v.map(|v| v.to_vec()))
                                .map_err(|e| e.to_string());
                            // A store dropped with reads outstanding no longer listens.
                            let _ = job.done.send((job.index, value));
                        }
                    })?,
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
    db: Arc<DB>,
    done_tx: Sender<ReadDone>,
    done: Receiver<ReadDone>,
    /// Reads submitted and not yet collected.
    outstanding: usize,
}

/// Options of a point read: no block-cache fill, no checksum (see `RocksStore`).
pub fn point_read_options() -> ReadOptions {
    let mut read = ReadOptions::default();
    read.fill_cache(false);
    read.set_verify_checksums(false);
    read
}

impl ReadPool {
    /// Reads of `db` on `threads`.
    pub fn new(threads: Arc<ReadThreads>, db: &Arc<DB>) -> ReadPool {
        let (done_tx, done) = unbounded::<ReadDone>();
        ReadPool {
            threads,
            db: Arc::clone(db),
            done_tx,
            done,
            outstanding: 0,
        }
    }

    /// Starts reading `key`; its value comes back from [`collect`](Self::collect)
    /// under `index`. Waits only when [`READ_QUEUE_MAX`] reads are already queued.
    pub fn submit(&mut self, index: usize, key: Vec<u8>) -> Result<(), String> {
        let jobs = self
            .threads
            .jobs
            .as_ref()
            .expect("the threads run until dropped");
        jobs.send(ReadJob {
            db: Arc::clone(&self.db),
            index,
            key,
            done: self.done_tx.clone(),
        })
        .map_err(|_| "a read thread died".to_string())?;
        self.outstanding += 1;
        Ok(())
    }

    /// Waits for every submitted read; calls `found(index, value)` for each present
    /// key, in any order. Returns the first error after all reads have finished.
    pub fn collect(&mut self, found: &mut dyn FnMut(usize, &[u8])) -> Result<(), String> {
        let mut first_error = None;
        while self.outstanding > 0 {
            let done = self
                .done
                .recv()
                .map_err(|_| "a read thread died".to_string())?;
            self.outstanding -= 1;
            take(done, found, &mut first_error);
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn take(done: ReadDone, found: &mut dyn FnMut(usize, &[u8]), first_error: &mut Option<String>) {
    match done {
        (index, Ok(Some(value))) => found(index, &value),
        (_, Ok(None)) => {}
        (_, Err(e)) => {
            first_error.get_or_insert(e);
        }
    }
}
