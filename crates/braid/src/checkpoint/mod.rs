//! Consistent checkpoints and exactly-once output (SPEC §5, DESIGN "Checkpoints").
//!
//! Every `interval` the reader cuts its sources between two reads and sends a barrier
//! for epoch `E` down every shard's channel, behind the events read before the cut. A
//! shard that reaches the barrier closes its output file as *pending*, writes its join's
//! in-memory state to bytes, hard-links the segment files spilled since the last
//! barrier into a staging folder, hands all of it to the [`Committer`] and goes on with
//! the next batch: that is the whole pause. The committer, a thread of its own, uploads
//! the new files (incremental: a segment file is uploaded once, then referred to by
//! name), syncs the pending outputs, writes the manifest (the commit point) and renames
//! the pending outputs to their final names. At most one epoch is in flight.
//!
//! On restart the newest manifest that reads back whole and whose files match their
//! checksums is restored; a broken one is reported and the previous one used. Output
//! produced after the restored cut (pending, in progress, or published by a newer
//! manifest that turned out broken) is removed: it will be produced again.

pub mod coordinator;
pub mod list;
pub mod s3;
pub mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use braid_core::{JoinImage, SegmentId, Side, Watermark};
use braid_io::{FileSink, PendingFile, SourcePosition};
use braid_state::FileSum;
use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::counts::SourceCounts;
use crate::engine::Unit;
use store::{sync_dir, CheckpointStore};

/// 2: state in units (a partition's join on a shard), watermarks per partition.
const MANIFEST_FORMAT: u32 = 2;
/// The store's two folders; braid touches nothing else in it.
pub const MANIFESTS: &str = "manifests";
pub const FILES: &str = "files";
/// Under it, each instance's part of a shared store (`--instance`).
pub const INSTANCES: &str = "instances";
/// Write buffer of a join image.
const IMAGE_BUFFER_BYTES: usize = 1 << 20;
/// Segment files uploaded at once by the committer.
const UPLOADS_IN_FLIGHT: usize = 8;
/// Files fetched at once by a restore (an object store answers one request per file).
const FETCHES_IN_FLIGHT: usize = 8;
/// Bytes read at a time when checksumming a file.
const CHECKSUM_BUFFER_BYTES: usize = 1 << 20;

/// A file in the checkpoint store, with its size and checksum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub name: String,
    pub bytes: u64,
    /// xxh3-64 of the content, hex.
    pub xxh3: String,
}

/// One spilled segment of a unit and its file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SegmentRef {
    pub side: u8,
    pub bucket: i64,
    pub segment: u32,
    pub file: FileRef,
}

impl SegmentRef {
    pub fn id(&self) -> SegmentId {
        SegmentId {
            side: if self.side == 0 {
                Side::Left
            } else {
                Side::Right
            },
            bucket: self.bucket,
            segment: self.segment,
        }
    }
}

/// The state of one partition's join on one shard. A partition's state is the units
/// with its number: separable from the others', so that it can move on its own.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UnitState {
    pub partition: u32,
    pub shard: usize,
    /// The join's in-memory state ([`braid_core::Join::snapshot`]).
    pub image: FileRef,
    pub segments: Vec<SegmentRef>,
}

impl UnitState {
    pub fn unit(&self) -> Unit {
        Unit {
            partition: self.partition,
            shard: self.shard,
        }
    }
}

/// Where a source stands at the cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceAt {
    Files(SourcePosition),
    /// Lines drawn from a generator (both streams).
    Generator {
        lines: u64,
    },
    /// Events of a benchmark's generator.
    Events {
        events: u64,
    },
    /// A Kafka topic: per partition, the offset of the next record to read, and where
    /// a bounded source ends.
    Kafka {
        topic: String,
        offsets: Vec<i64>,
        end: Option<Vec<i64>>,
        /// Where the history files stand while they are read (`[source.backfill]`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        history: Option<SourcePosition>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceState {
    pub name: String,
    pub at: SourceAt,
    /// Per partition: the largest event time delivered, and whether it is exhausted.
    pub partitions: Vec<(Option<i64>, bool)>,
    /// Over every partition.
    pub counts: SourceCounts,
    /// Per partition (empty in checkpoints of earlier versions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partition_counts: Vec<SourceCounts>,
    /// Per partition: its time guard (README "Times far ahead").
    #[serde(default)]
    pub guards: Vec<GuardState>,
}

impl SourceState {
    /// The counts per partition of `partitions`; a checkpoint of an earlier version
    /// has only the total, which goes to partition 0.
    pub fn partition_counts(&self, partitions: usize) -> Vec<SourceCounts> {
        if self.partition_counts.len() == partitions {
            return self.partition_counts.clone();
        }
        let mut counts = vec![SourceCounts::default(); partitions.max(1)];
        counts[0] = self.counts;
        counts
    }
}

/// A partition's time guard at the cut: its corroborated time, the times awaiting
/// corroboration, and the events it holds back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardState {
    pub corroborated: Option<i64>,
    /// Events the partition has delivered.
    pub seen: u64,
    /// Each time awaiting corroboration, with the event count when it arrived.
    pub candidates: Vec<(i64, u64)>,
    pub held: Vec<HeldState>,
}

/// An event held back by a time guard, with the votes of the events after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldState {
    pub time: i64,
    pub agree: u32,
    pub disagree: u32,
    /// Where it was read (file index, line) and its text.
    pub file: u32,
    pub line: u64,
    /// The record's own timestamp (Kafka).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_time: Option<i64>,
    pub text: String,
}

/// A sink's file numbering: files numbered `next_file` and above come after the cut.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SinkState {
    pub dir: PathBuf,
    pub prefix: String,
    pub next_file: u64,
}

impl SinkState {
    pub fn of(sink: &FileSink) -> SinkState {
        SinkState {
            dir: sink.dir().to_path_buf(),
            prefix: sink.prefix().to_string(),
            next_file: sink.next_file(),
        }
    }
}

/// What the reader contributes to a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReaderState {
    pub sources: Vec<SourceState>,
    /// The lowest partition watermark (`Watermark::raw`).
    pub watermark: String,
    /// Per partition (of the join's state): its watermark, and the last one sent to the
    /// shards.
    pub partitions: Vec<WatermarkState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatermarkState {
    pub watermark: String,
    pub sent: String,
}

/// The commit point of one checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub job: String,
    /// The join's settings when the checkpoint was taken; a restore refuses others.
    pub join: String,
    pub epoch: u64,
    pub created_unix_ms: u64,
    /// The join's watermark in ms (`None` while it is still minus infinity).
    pub watermark_ms: Option<i64>,
    pub reader: ReaderState,
    pub units: Vec<UnitState>,
    pub sinks: Vec<SinkState>,
    /// Output files this checkpoint publishes.
    pub pending: Vec<PendingFile>,
}

impl Manifest {
    pub fn state_bytes(&self) -> u64 {
        self.files().map(|f| f.bytes).sum()
    }

    pub fn files(&self) -> impl Iterator<Item = &FileRef> {
        self.units
            .iter()
            .flat_map(|s| std::iter::once(&s.image).chain(s.segments.iter().map(|g| &g.file)))
    }

    /// Manifest bytes: a header line with the body's length and checksum, then the
    /// body. A torn or altered manifest fails [`Manifest::decode`].
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(self).expect("a manifest serialises");
        let mut out = format!(
            "BRAID-MANIFEST {MANIFEST_FORMAT} bytes={} xxh3={:016x}\n",
            body.len(),
            xxh3_64(&body)
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest, String> {
        let newline = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("no header line (torn or not a manifest)")?;
        let header = std::str::from_utf8(&bytes[..newline]).map_err(|_| "header is not text")?;
        let body = &bytes[newline + 1..];
        let mut fields = header.split(' ');
        if fields.next() != Some("BRAID-MANIFEST") {
            return Err("not a braid manifest".into());
        }
        let format = fields.next().unwrap_or_default();
        if format != MANIFEST_FORMAT.to_string() {
            return Err(format!("manifest format {format} is not {MANIFEST_FORMAT}"));
        }
        let len = fields
            .next()
            .and_then(|f| f.strip_prefix("bytes="))
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or("header without bytes=")?;
        let sum = fields
            .next()
            .and_then(|f| f.strip_prefix("xxh3="))
            .ok_or("header without xxh3=")?;
        if body.len() != len {
            return Err(format!(
                "body is {} bytes, header says {len} (torn write)",
                body.len()
            ));
        }
        if format!("{:016x}", xxh3_64(body)) != sum {
            return Err("body checksum mismatch (corrupted)".into());
        }
        serde_json::from_slice(body).map_err(|e| format!("body: {e}"))
    }
}

pub fn manifest_name(epoch: u64) -> String {
    format!("{MANIFESTS}/{epoch:020}.manifest")
}

fn epoch_of(name: &str) -> Option<u64> {
    name.strip_prefix(MANIFESTS)?
        .strip_prefix('/')?
        .strip_suffix(".manifest")?
        .parse()
        .ok()
}

/// The epochs of every manifest in the store, newest first.
pub fn epochs(store: &dyn CheckpointStore) -> anyhow::Result<Vec<u64>> {
    let mut epochs: Vec<u64> = store
        .list(MANIFESTS)?
        .iter()
        .filter_map(|n| epoch_of(n))
        .collect();
    epochs.sort_unstable_by(|a, b| b.cmp(a));
    Ok(epochs)
}

pub fn read_manifest(store: &dyn CheckpointStore, epoch: u64) -> anyhow::Result<Manifest> {
    let name = manifest_name(epoch);
    let bytes = store.get_bytes(&name)?;
    Manifest::decode(&bytes).map_err(|e| anyhow::anyhow!("{} in {}: {e}", name, store.describe()))
}

/// A writer that checksums what it passes on, so that a file need not be read back to
/// be checksummed.
struct Summed<W> {
    inner: W,
    hasher: Xxh3,
    bytes: u64,
}

impl<W> Summed<W> {
    fn new(inner: W) -> Summed<W> {
        Summed {
            inner,
            hasher: Xxh3::new(),
            bytes: 0,
        }
    }

    /// The checksum and length of everything written so far.
    fn sum(&self) -> FileSum {
        FileSum {
            xxh3: self.hasher.digest(),
            bytes: self.bytes,
        }
    }
}

impl<W: std::io::Write> std::io::Write for Summed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// xxh3-64 and length of a local file.
pub fn checksum_file(path: &Path) -> anyhow::Result<FileSum> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; CHECKSUM_BUFFER_BYTES];
    let mut len = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            return Ok(FileSum {
                xxh3: hasher.digest(),
                bytes: len,
            });
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A name prefix unique to this process, so that files of a run that crashed before its
/// manifest committed are never confused with this run's.
pub fn run_nonce() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut seed = nanos.to_le_bytes().to_vec();
    seed.extend_from_slice(&std::process::id().to_le_bytes());
    format!("{:012x}", xxh3_64(&seed) >> 16)
}

/// What a shard hands over at a barrier.
pub struct ShardSnapshot {
    pub shard: usize,
    pub epoch: u64,
    /// Each of its units' state.
    pub units: Vec<UnitSnapshot>,
    /// The epoch's staging folder (the units' folders are in it), removed once
    /// committed.
    pub staging: PathBuf,
    pub pending: Vec<PendingFile>,
    pub sink: Option<SinkState>,
    /// How long the shard stood still for the barrier.
    pub pause: Duration,
}

/// One unit's state at a barrier.
pub struct UnitSnapshot {
    pub unit: Unit,
    /// The join's state at the barrier, written by the committer into `dir` and
    /// dropped as soon as it is written (it holds sealed segments' memory); `None` when
    /// the join has not changed since the last barrier, whose image is used again.
    pub image: Option<JoinImage>,
    /// Every live segment, and the files of those spilled since the last barrier,
    /// hard-linked into `dir`.
    pub live: Vec<SegmentId>,
    /// With their checksums as the store wrote them, if it did.
    pub new_files: Vec<(SegmentId, PathBuf, Option<FileSum>)>,
    pub dir: PathBuf,
}

/// What the reader hands over at a barrier.
pub struct ReaderSnapshot {
    pub epoch: u64,
    pub state: ReaderState,
    pub watermark_ms: Option<i64>,
    pub pending: Vec<PendingFile>,
    pub sinks: Vec<SinkState>,
    pub pause: Duration,
}

pub enum Part {
    Reader(ReaderSnapshot),
    Shard(ShardSnapshot),
}

/// A committed checkpoint, as the committer reports it.
#[derive(Clone, Debug)]
pub struct Committed {
    pub epoch: u64,
    /// The longest any shard (or the reader) stood still for the barrier.
    pub pause: Duration,
    /// From the barrier to the manifest's commit.
    pub duration: Duration,
    pub state_bytes: u64,
    pub uploaded_bytes: u64,
}

/// What the committer starts from: the restored checkpoint's segment files. (Not its
/// images: a restored unit counts as changed, so its first image is written anew.)
#[derive(Default)]
pub struct CommitterStart {
    pub uploaded: HashMap<(Unit, SegmentId), FileRef>,
}

impl CommitterStart {
    pub fn from_manifest(manifest: &Manifest) -> CommitterStart {
        let mut uploaded = HashMap::new();
        for state in &manifest.units {
            for segment in &state.segments {
                uploaded.insert((state.unit(), segment.id()), segment.file.clone());
            }
        }
        CommitterStart { uploaded }
    }
}

pub struct CommitterConfig {
    pub job: String,
    pub join: String,
    pub shards: usize,
    pub keep: usize,
    /// Commits an epoch outside the store once its manifest is written (the Kafka
    /// transaction, which is then the commit point).
    pub on_commit: Option<OnCommit>,
}

pub type OnCommit = Box<dyn Fn(&Manifest) -> anyhow::Result<()> + Send + Sync>;

/// The checkpoint coordinator's background half: assembles each epoch's parts,
/// uploads, commits and publishes.
pub struct Committer {
    parts: Sender<Part>,
    done: Receiver<anyhow::Result<Committed>>,
    handle: Option<JoinHandle<()>>,
}

impl Committer {
    pub fn start(
        store: Box<dyn CheckpointStore>,
        config: CommitterConfig,
        start: CommitterStart,
    ) -> anyhow::Result<Committer> {
        // Parts of at most one epoch are in flight: the reader starts the next barrier
        // only after the previous epoch's result.
        let (parts, parts_rx) = crossbeam_channel::bounded(config.shards + 1);
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let handle = std::thread::Builder::new()
            .name("braid-checkpoint".into())
            .spawn(move || {
                let mut state = CommitterState {
                    store,
                    config,
                    nonce: run_nonce(),
                    uploaded: start.uploaded,
                    images: HashMap::new(),
                    files_of: BTreeMap::new(),
                };
                loop {
                    let result = state.next_epoch(&parts_rx);
                    let stop = !matches!(result, Ok(Some(_)));
                    match result {
                        Ok(Some(c)) => {
                            if done_tx.send(Ok(c)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(e) => {
                            let _ = done_tx.send(Err(e));
                        }
                    }
                    if stop {
                        return;
                    }
                }
            })?;
        Ok(Committer {
            parts,
            done,
            handle: Some(handle),
        })
    }

    /// Where the parts of a barrier go.
    pub fn parts(&self) -> Sender<Part> {
        self.parts.clone()
    }

    /// The result of the epoch in flight, if it is done.
    pub fn poll(&self) -> Option<anyhow::Result<Committed>> {
        self.done.try_recv().ok()
    }

    /// Waits for the result of the epoch in flight.
    pub fn wait(&self) -> anyhow::Result<Committed> {
        self.done
            .recv()
            .map_err(|_| anyhow::anyhow!("the checkpoint thread stopped"))?
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        let (closed, _) = crossbeam_channel::bounded(1);
        self.parts = closed;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

struct CommitterState {
    store: Box<dyn CheckpointStore>,
    config: CommitterConfig,
    nonce: String,
    uploaded: HashMap<(Unit, SegmentId), FileRef>,
    /// Each unit's image in the last checkpoint committed, for a unit unchanged since.
    images: HashMap<Unit, FileRef>,
    /// The files of each manifest read or written, by epoch.
    files_of: BTreeMap<u64, BTreeSet<String>>,
}

impl CommitterState {
    /// Collects one epoch's parts and commits it; `None` when the senders hung up.
    fn next_epoch(&mut self, parts: &Receiver<Part>) -> anyhow::Result<Option<Committed>> {
        let mut reader = None;
        let mut shards: Vec<Option<ShardSnapshot>> =
            (0..self.config.shards).map(|_| None).collect();
        let mut first = None;
        while reader.is_none() || shards.iter().any(Option::is_none) {
            let Ok(part) = parts.recv() else {
                return Ok(None);
            };
            first.get_or_insert_with(Instant::now);
            match part {
                Part::Reader(r) => reader = Some(r),
                Part::Shard(s) => {
                    let i = s.shard;
                    shards[i] = Some(s);
                }
            }
        }
        let reader = reader.expect("collected");
        let shards: Vec<ShardSnapshot> =
            shards.into_iter().map(|s| s.expect("collected")).collect();
        for s in &shards {
            anyhow::ensure!(
                s.epoch == reader.epoch,
                "shard {} sent epoch {} during epoch {}",
                s.shard,
                s.epoch,
                reader.epoch
            );
        }
        let started = first.expect("at least one part");
        self.commit(reader, shards, started).map(Some)
    }

    /// Uploads segment files, [`UPLOADS_IN_FLIGHT`] at a time (an object store takes
    /// one request per file, and a checkpoint can hold hundreds of new ones).
    fn upload_all(
        &self,
        files: &[(Unit, SegmentId, &Path, Option<FileSum>)],
    ) -> anyhow::Result<Vec<(Unit, SegmentId, FileRef)>> {
        in_parallel(files, UPLOADS_IN_FLIGHT, |&(unit, id, path, sum)| {
            let name = format!(
                "{FILES}/{}/{}-{}",
                unit.path(),
                self.nonce,
                path.file_name().expect("a file name").to_string_lossy()
            );
            Ok((unit, id, self.put_checked_file(name, path, sum)?))
        })
    }

    /// Syncs a local file (a link in the store must be durable too) and stores it,
    /// with its checksum: `written`, taken as the file was written, if its length
    /// still agrees; else read from the file.
    fn put_checked_file(
        &self,
        name: String,
        path: &Path,
        written: Option<FileSum>,
    ) -> anyhow::Result<FileRef> {
        let file = std::fs::File::open(path)
            .and_then(|f| f.sync_all().map(|()| f))
            .with_context(|| format!("cannot sync {}", path.display()))?;
        let length = file
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        let sum = match written {
            Some(w) if w.bytes == length => w,
            _ => checksum_file(path)?,
        };
        self.store.put_file(&name, path)?;
        Ok(FileRef {
            name,
            bytes: sum.bytes,
            xxh3: format!("{:016x}", sum.xxh3),
        })
    }

    fn commit(
        &mut self,
        reader: ReaderSnapshot,
        mut shards: Vec<ShardSnapshot>,
        started: Instant,
    ) -> anyhow::Result<Committed> {
        let epoch = reader.epoch;
        let mut uploaded_bytes = 0;
        let mut states = Vec::with_capacity(shards.len());
        let mut pending = reader.pending.clone();
        let mut sinks = reader.sinks.clone();
        let mut pause = reader.pause;
        let images = write_images(&mut shards)?;
        let new_files: Vec<(Unit, SegmentId, &Path, Option<FileSum>)> = shards
            .iter()
            .flat_map(|s| &s.units)
            .flat_map(|u| {
                u.new_files
                    .iter()
                    .map(|(id, p, sum)| (u.unit, *id, p.as_path(), *sum))
            })
            .collect();
        for (unit, id, file) in self.upload_all(&new_files)? {
            uploaded_bytes += file.bytes;
            self.uploaded.insert((unit, id), file);
        }
        for s in &shards {
            pause = pause.max(s.pause);
            pending.extend(s.pending.iter().cloned());
            sinks.extend(s.sink.clone());
        }
        let units = shards.iter().flat_map(|s| &s.units);
        let mut images_now = HashMap::new();
        for (u, image_path) in units.zip(&images) {
            let image = match image_path {
                Some((path, sum)) => {
                    let name = format!("{FILES}/{}/{}-e{epoch}.image", u.unit.path(), self.nonce);
                    let image = self.put_checked_file(name, path, Some(*sum))?;
                    uploaded_bytes += image.bytes;
                    image
                }
                None => self.images.get(&u.unit).cloned().with_context(|| {
                    format!("{}: unchanged, but no earlier image (a bug)", u.unit.path())
                })?,
            };
            images_now.insert(u.unit, image.clone());
            let mut segments = Vec::with_capacity(u.live.len());
            for id in &u.live {
                let file = self.uploaded.get(&(u.unit, *id)).with_context(|| {
                    format!("{}: segment {id:?} has no uploaded file", u.unit.path())
                })?;
                segments.push(SegmentRef {
                    side: id.side.index() as u8,
                    bucket: id.bucket,
                    segment: id.segment,
                    file: file.clone(),
                });
            }
            states.push(UnitState {
                partition: u.unit.partition,
                shard: u.unit.shard,
                image,
                segments,
            });
        }
        // Outputs must survive a crash before the manifest says they exist.
        let mut dirs = BTreeSet::new();
        for file in &pending {
            file.sync()?;
            if let Some(dir) = file.pending.parent() {
                dirs.insert(dir.to_path_buf());
            }
        }
        for dir in &dirs {
            sync_dir(dir)?;
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            job: self.config.job.clone(),
            join: self.config.join.clone(),
            epoch,
            created_unix_ms: now_unix_ms(),
            watermark_ms: reader.watermark_ms,
            reader: reader.state,
            units: states,
            sinks,
            pending,
        };
        self.store
            .put_bytes(&manifest_name(epoch), &manifest.encode())?;
        if store::fault_after("crash-after-manifest") == Some(epoch) {
            // Fault injection: die between the commit point and the publishing renames.
            std::process::abort();
        }
        if let Some(commit) = &self.config.on_commit {
            if store::fault_after("crash-before-kafka-commit") == Some(epoch) {
                std::process::abort();
            }
            commit(&manifest)?;
            if store::fault_after("crash-after-kafka-commit") == Some(epoch) {
                std::process::abort();
            }
        }
        let committed = Committed {
            epoch,
            pause,
            duration: started.elapsed() + pause,
            state_bytes: manifest.state_bytes(),
            uploaded_bytes,
        };
        publish(&manifest)?;
        for s in &shards {
            let _ = std::fs::remove_dir_all(&s.staging);
        }
        // Forget the files of segments that are gone; keep the newest manifests.
        let live: BTreeSet<(Unit, SegmentId)> = shards
            .iter()
            .flat_map(|s| &s.units)
            .flat_map(|u| u.live.iter().map(move |id| (u.unit, *id)))
            .collect();
        self.uploaded.retain(|k, _| live.contains(k));
        self.images = images_now;
        self.files_of
            .insert(epoch, manifest.files().map(|f| f.name.clone()).collect());
        self.collect_garbage()?;
        Ok(committed)
    }

    /// Keeps the newest `keep` manifests (of this run and earlier ones) and deletes the
    /// older ones, then every file no kept manifest refers to (older checkpoints' files,
    /// files of runs that crashed before their manifest).
    fn collect_garbage(&mut self) -> anyhow::Result<()> {
        let all = epochs(self.store.as_ref())?;
        let keep = self.config.keep.max(1);
        for &old in all.iter().skip(keep) {
            self.store.delete(&manifest_name(old))?;
            self.files_of.remove(&old);
        }
        let mut referenced: BTreeSet<String> = BTreeSet::new();
        for &epoch in all.iter().take(keep) {
            if !self.files_of.contains_key(&epoch) {
                // A manifest of an earlier run. One that does not decode refers to
                // nothing; one that cannot be read now (a network error) might, so no
                // file is deleted this time.
                let names = match self.store.get_bytes(&manifest_name(epoch)) {
                    Ok(bytes) => Manifest::decode(&bytes)
                        .map(|m| m.files().map(|f| f.name.clone()).collect())
                        .unwrap_or_default(),
                    Err(e) => {
                        tracing::warn!("not deleting old checkpoint files this time: {e:#}");
                        return Ok(());
                    }
                };
                self.files_of.insert(epoch, names);
            }
            referenced.extend(self.files_of[&epoch].iter().cloned());
        }
        for name in self.store.list(FILES)? {
            if !referenced.contains(&name) {
                self.store.delete(&name)?;
            }
        }
        Ok(())
    }
}

/// Writes each changed unit's join image into its staging folder, one thread per unit,
/// checksummed as it is written; returns the files with their sums (`None` for a unit
/// unchanged), in the order of the shards' units.
fn write_images(shards: &mut [ShardSnapshot]) -> anyhow::Result<Vec<Option<(PathBuf, FileSum)>>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = shards
            .iter_mut()
            .flat_map(|s| &mut s.units)
            .map(|u| {
                let image = u.image.take()?;
                let path = u.dir.join("join.image");
                Some(scope.spawn(move || {
                    let file = std::fs::File::create(&path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    let mut out =
                        std::io::BufWriter::with_capacity(IMAGE_BUFFER_BYTES, Summed::new(file));
                    image
                        .write(&mut out)
                        .and_then(|()| std::io::Write::flush(&mut out))
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    let sum = out.get_ref().sum();
                    Ok((path, sum))
                }))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Some(h) => h
                    .join()
                    .map_err(|_| anyhow::anyhow!("an image writer panicked"))?
                    .map(Some),
                None => Ok(None),
            })
            .collect()
    })
}

/// Renames a committed manifest's pending outputs to their final names (again after a
/// crash: publishing is idempotent).
pub fn publish(manifest: &Manifest) -> anyhow::Result<()> {
    let mut dirs = BTreeSet::new();
    for file in &manifest.pending {
        file.publish()?;
        if let Some(dir) = file.done.parent() {
            dirs.insert(dir.to_path_buf());
        }
    }
    for dir in &dirs {
        sync_dir(dir)?;
    }
    Ok(())
}

/// The watermark as written in manifests.
pub fn watermark_text(w: Watermark) -> String {
    w.raw().to_string()
}

pub fn parse_watermark(text: &str) -> anyhow::Result<Watermark> {
    Ok(Watermark::from_raw(text.parse().with_context(|| {
        format!("bad watermark {text:?} in a manifest")
    })?))
}

/// A unit's state fetched from the store and verified, waiting in `dir` for the
/// engine to move it into the unit's state folder.
pub struct UnitRestore {
    pub unit: Unit,
    /// The join image's file in `dir`. It stays on disk: the engine streams it into the
    /// join, so a restore never holds an image in memory.
    pub image: PathBuf,
    pub dir: PathBuf,
    pub segments: Vec<SegmentId>,
    /// Whether its segment files are in this process's part of the store (false for
    /// a partition handed over by another instance: they are uploaded again).
    pub uploaded_here: bool,
}

/// Fetches and verifies every file of `manifest` into `staging/part-p/shard-i/`,
/// [`FETCHES_IN_FLIGHT`] at a time. Any missing file or checksum mismatch fails the
/// whole restore. A segment file that the local state under `reuse` (a state folder)
/// still holds, with the manifest's size and checksum, is linked from there instead of
/// fetched: a partition that stays with a process, or comes back to it, is not
/// downloaded again.
pub fn fetch(
    store: &dyn CheckpointStore,
    manifest: &Manifest,
    staging: &Path,
    reuse: Option<&Path>,
) -> anyhow::Result<Fetched> {
    let _ = std::fs::remove_dir_all(staging);
    let mut restores = Vec::with_capacity(manifest.units.len());
    // Each file, where it goes, and the local copies it may be taken from.
    let mut files: Vec<(&FileRef, PathBuf, Vec<PathBuf>)> = Vec::new();
    let shard_dirs: Vec<PathBuf> = reuse
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("shard-"))
        })
        .collect();
    for unit in &manifest.units {
        let dir = staging.join(unit.unit().path());
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let image = dir.join("join.image");
        files.push((&unit.image, image.clone(), Vec::new()));
        for s in &unit.segments {
            let name = braid_state::segment_file_name(s.id());
            let local = shard_dirs
                .iter()
                .map(|d| {
                    d.join(format!("part-{}", unit.partition))
                        .join("segments")
                        .join(&name)
                })
                .collect();
            files.push((&s.file, dir.join(name), local));
        }
        restores.push(UnitRestore {
            unit: unit.unit(),
            image,
            dir,
            segments: unit.segments.iter().map(SegmentRef::id).collect(),
            uploaded_here: true,
        });
    }
    // Each file as a file (streamed by the store: linked or copied from a folder,
    // downloaded in pieces from S3), checked against the manifest through a buffer of
    // `CHECKSUM_BUFFER_BYTES`: nothing is ever held whole in memory.
    let reused = in_parallel(&files, FETCHES_IN_FLIGHT, |(file, to, local)| {
        for candidate in local {
            let same_size = std::fs::metadata(candidate).is_ok_and(|m| m.len() == file.bytes);
            if same_size && std::fs::hard_link(candidate, to).is_ok() {
                if verify(file, checksum_file(to)?).is_ok() {
                    return Ok(file.bytes);
                }
                std::fs::remove_file(to)
                    .with_context(|| format!("cannot remove {}", to.display()))?;
            }
        }
        store.get_file(&file.name, to)?;
        verify(file, checksum_file(to)?)?;
        Ok(0)
    })?;
    let reused_bytes: u64 = reused.iter().sum();
    Ok(Fetched {
        units: restores,
        reused_bytes,
        fetched_bytes: files.iter().map(|(f, _, _)| f.bytes).sum::<u64>() - reused_bytes,
    })
}

/// What a restore fetched.
pub struct Fetched {
    pub units: Vec<UnitRestore>,
    /// Bytes taken from the local state instead of the store.
    pub reused_bytes: u64,
    pub fetched_bytes: u64,
}

/// Runs `work` on every item, `threads` at a time; the results in the items' order,
/// or the first error (once it happens, no more items start).
fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    work: impl Fn(&T) -> anyhow::Result<R> + Sync,
) -> anyhow::Result<Vec<R>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::with_capacity(items.len()));
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.min(items.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else {
                    return;
                };
                match work(item) {
                    Ok(r) => results
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((i, r)),
                    Err(e) => {
                        failed
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .get_or_insert(e);
                        // Let the others run dry: nothing more starts.
                        next.store(items.len(), std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failed
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        return Err(e);
    }
    let mut results = results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    results.sort_by_key(|&(i, _)| i);
    Ok(results.into_iter().map(|(_, r)| r).collect())
}

fn verify(file: &FileRef, got: FileSum) -> anyhow::Result<()> {
    let FileSum { xxh3, bytes } = got;
    anyhow::ensure!(
        bytes == file.bytes && format!("{xxh3:016x}") == file.xxh3,
        "{} is corrupted: {bytes} bytes with checksum {xxh3:016x}, the manifest says {} bytes with {}",
        file.name,
        file.bytes,
        file.xxh3
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `Summed` passes on through a buffer, in pieces of every size, checksums as
    /// `checksum_file` reads it back.
    #[test]
    fn a_summed_file_checksums_as_read_back() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("image");
        let mut out = std::io::BufWriter::with_capacity(
            1000,
            Summed::new(std::fs::File::create(&path).expect("create")),
        );
        let mut written = 0u64;
        for piece in 0..300u64 {
            let bytes: Vec<u8> = (0..piece * 7).map(|i| (i * 31 + piece) as u8).collect();
            out.write_all(&bytes).expect("write");
            written += bytes.len() as u64;
        }
        out.flush().expect("flush");
        let sum = out.get_ref().sum();
        assert_eq!(sum.bytes, written);
        assert_eq!(sum, checksum_file(&path).expect("checksum"));
    }

    /// A segment file the local state still holds, unchanged, is linked from there; one
    /// that changed (same name, other bytes) is fetched from the store, as is the image.
    #[test]
    fn a_restore_takes_unchanged_segment_files_from_the_local_state() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store::LocalStore::open(&dir.path().join("store")).expect("store");
        let state = dir.path().join("state");
        let local = state.join("shard-1/part-3/segments");
        std::fs::create_dir_all(&local).expect("mkdir");
        // A local store links what it stores: each upload a file of its own.
        let put = |name: &str, bytes: &[u8]| -> FileRef {
            let from = dir.path().join(name.replace('/', "-"));
            std::fs::write(&from, bytes).expect("write");
            store.put_file(name, &from).expect("put");
            let sum = checksum_file(&from).expect("checksum");
            FileRef {
                name: name.to_string(),
                bytes: sum.bytes,
                xxh3: format!("{:016x}", sum.xxh3),
            }
        };
        let segment = |n: u32, file: FileRef| SegmentRef {
            side: 0,
            bucket: 7,
            segment: n,
            file,
        };
        let kept = segment(1, put("files/a", b"kept segment"));
        let changed = segment(2, put("files/b", b"the checkpoint's bytes"));
        let image = put("files/image", b"image");
        let name = |s: &SegmentRef| braid_state::segment_file_name(s.id());
        std::fs::write(local.join(name(&kept)), b"kept segment").expect("write");
        std::fs::write(local.join(name(&changed)), b"another run's bytes!!!").expect("write");
        let manifest = Manifest {
            format: 2,
            job: "j".into(),
            join: "j".into(),
            epoch: 1,
            created_unix_ms: 0,
            watermark_ms: None,
            reader: ReaderState {
                sources: Vec::new(),
                watermark: String::new(),
                partitions: Vec::new(),
            },
            units: vec![UnitState {
                partition: 3,
                shard: 0,
                image: image.clone(),
                segments: vec![kept.clone(), changed.clone()],
            }],
            sinks: Vec::new(),
            pending: Vec::new(),
        };
        let staging = dir.path().join("staging");
        let fetched = fetch(&store, &manifest, &staging, Some(&state)).expect("fetch");
        assert_eq!(fetched.reused_bytes, kept.file.bytes);
        assert_eq!(fetched.fetched_bytes, changed.file.bytes + image.bytes);
        let unit = &fetched.units[0];
        assert_eq!(
            std::fs::read(unit.dir.join(name(&changed))).expect("read"),
            b"the checkpoint's bytes"
        );
        assert_eq!(
            std::fs::read(unit.dir.join(name(&kept))).expect("read"),
            b"kept segment"
        );
        let without = fetch(&store, &manifest, &staging, None).expect("fetch");
        assert_eq!(without.reused_bytes, 0);
    }

    /// Results come back in the items' order whatever order the threads finish in; an
    /// error is returned, and no item starts after it.
    #[test]
    fn in_parallel_keeps_order_and_stops_at_an_error() {
        let items: Vec<u64> = (0..100).collect();
        let doubled = in_parallel(&items, 8, |&i| {
            std::thread::sleep(std::time::Duration::from_micros((100 - i) * 10));
            Ok(i * 2)
        })
        .expect("no error");
        assert_eq!(doubled, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let started = std::sync::atomic::AtomicUsize::new(0);
        let failed = in_parallel(&items, 4, |&i| {
            started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if i == 10 {
                anyhow::bail!("item {i} failed");
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            Ok(i)
        });
        assert_eq!(failed.expect_err("an error").to_string(), "item 10 failed");
        let started = started.into_inner();
        assert!(
            started < 20,
            "{started} items started; the error stops the rest"
        );
    }
}
