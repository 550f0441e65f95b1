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

/// Reader threads per store (per shard).
pub const READ_THREADS: usize = 8;
/// Reads queued for the threads before the shard waits.
const READ_QUEUE_MAX: usize = 4_096;

struct ReadJob {
    index: usize,
    key: Vec<u8>,
}

type ReadDone = (usize, Result<Option<Vec<u8>>, String>);

pub struct ReadPool {
    jobs: Option<Sender<ReadJob>>,
    done: Receiver<ReadDone>,
    threads: Vec<JoinHandle<()>>,
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
    pub fn start(db: &Arc<DB>) -> std::io::Result<ReadPool> {
        let (jobs, job_rx) = bounded::<ReadJob>(READ_QUEUE_MAX);
        let (done_tx, done) = unbounded::<ReadDone>();
        let mut threads = Vec::with_capacity(READ_THREADS);
        for i in 0..READ_THREADS {
            let (db, job_rx, done_tx) = (Arc::clone(db), job_rx.clone(), done_tx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("braid-read-{i}"))
                    .spawn(move || {
                        let read = point_read_options();
                        for job in job_rx {
                            let value = db
                                .get_pinned_opt(&job.key, &read)
                                .map(|v| v.map(|v| v.to_vec()))
                                .map_err(|e| e.to_string());
                            if done_tx.send((job.index, value)).is_err() {
                                return;
                            }
                        }
                    })?,
            );
        }
        Ok(ReadPool {
            jobs: Some(jobs),
            done,
            threads,
            outstanding: 0,
        })
    }

    /// Starts reading `key`; its value comes back from [`collect`](Self::collect)
    /// under `index`. Waits only when [`READ_QUEUE_MAX`] reads are already queued.
    pub fn submit(&mut self, index: usize, key: Vec<u8>) -> Result<(), String> {
        let jobs = self.jobs.as_ref().expect("the pool runs until dropped");
        jobs.send(ReadJob { index, key })
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

impl Drop for ReadPool {
    fn drop(&mut self) {
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
