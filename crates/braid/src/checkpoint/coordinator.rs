//! The reader's half of checkpointing: opening the store, choosing and fetching the
//! checkpoint to restore, putting the output folder in the state that checkpoint
//! describes, and timing barriers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use braid_io::FileSink;

use super::store::{fault_after, CheckpointStore, FaultyStore, LocalStore, PrefixStore, SlowStore};
use super::{
    epochs, fetch, manifest_name, read_manifest, Committed, Committer, CommitterConfig,
    CommitterStart, Fetched, Manifest, ReaderState, UnitRestore, FILES, INSTANCES, MANIFESTS,
};
use crate::config::{CheckpointPlan, Output, Plan};
use crate::kafka::output::{
    committed_epoch, committed_tags, Committed as KafkaCommitted, KafkaOutput, Tag,
};
use rdkafka::consumer::ConsumerGroupMetadata;
use std::sync::Arc;

/// Opens the checkpoint store a job names: a folder, or `s3://bucket/prefix`.
pub fn open_store(plan: &CheckpointPlan) -> anyhow::Result<Box<dyn CheckpointStore>> {
    open_store_at(&plan.dir)
}

/// Opens a checkpoint store: a folder, or `s3://bucket/prefix`.
pub fn open_store_at(dir: &str) -> anyhow::Result<Box<dyn CheckpointStore>> {
    let store: Box<dyn CheckpointStore> = if dir.starts_with("s3://") {
        Box::new(super::s3::S3Store::open(dir)?)
    } else {
        Box::new(LocalStore::open(Path::new(dir))?)
    };
    let store: Box<dyn CheckpointStore> = match fault_after("checkpoint-latency-ms") {
        Some(ms) => Box::new(SlowStore::new(store, ms)),
        None => store,
    };
    let store: Box<dyn CheckpointStore> = match fault_after("manifest-latency-ms") {
        Some(ms) => Box::new(SlowStore::puts_in(store, ms, MANIFESTS)),
        None => store,
    };
    Ok(match fault_after("checkpoint-put") {
        Some(n) => Box::new(FaultyStore::new(store, n)),
        None => store,
    })
}

/// A description of the join's settings; a checkpoint restores only into the same.
/// The number of shards is not part of it: whole partitions move between shards (see
/// `engine::Layout::place`).
pub fn join_fingerprint(plan: &Plan) -> String {
    let s = &plan.spec;
    format!(
        "{:?} join of {} and {} within [{}, {}] ms, lateness {} ms{}",
        s.kind,
        plan.sources[0].name,
        plan.sources[1].name,
        s.lower_ms,
        s.upper_ms,
        s.allowed_lateness_ms,
        // Its state is one partition, not one per input partition.
        if plan.repartition {
            ", repartitioned by key"
        } else {
            ""
        },
    )
}

/// A manifest's fingerprint without the `, N shards` that earlier versions added.
fn without_shards(fingerprint: &str) -> &str {
    match fingerprint.rsplit_once(", ") {
        Some((rest, last)) if last.ends_with(" shards") => rest,
        _ => fingerprint,
    }
}

/// The checkpoint a run resumes from.
pub struct Restored {
    pub manifest: Manifest,
    pub units: Vec<UnitRestore>,
}

/// Partitions an instance takes over from one manifest (its own or another
/// instance's): the reader's state at that checkpoint, of which only theirs counts.
pub struct HandedOver {
    pub tag: Tag,
    pub reader: ReaderState,
    pub partitions: Vec<u32>,
    /// Their units, fetched (taken by the engine at start).
    pub units: Vec<UnitRestore>,
}

/// Where instance `name`'s part of a shared store is (`None`: a job's own store, run
/// as one process).
pub fn instance_prefix(name: Option<&str>) -> String {
    name.map_or(String::new(), |n| format!("{INSTANCES}/{n}"))
}

/// Checkpointing of one run.
pub struct Checkpointing {
    pub committer: Committer,
    pub restored: Option<Restored>,
    pub interval: Duration,
    pub next_epoch: u64,
    pub last_barrier: Instant,
    pub in_flight: bool,
    pub committed: Vec<Committed>,
    /// The Kafka output, whose transactions commit the epochs.
    pub kafka: Option<Arc<KafkaOutput>>,
    /// `--instance`: the partitions restored, by the manifest they came from.
    pub handed_over: Vec<HandedOver>,
}

impl Checkpointing {
    /// Opens the job's checkpoints and fetches the newest usable one (or none with
    /// `reset`, after deleting them all).
    pub fn open(
        plan: &Plan,
        config: &CheckpointPlan,
        reset: bool,
    ) -> anyhow::Result<Checkpointing> {
        let store = open_store(config)?;
        let all = epochs(store.as_ref())?;
        if reset {
            // Only what braid wrote: the folder or bucket may hold other things.
            for prefix in [MANIFESTS, FILES] {
                for name in store.list(prefix)? {
                    store.delete(&name)?;
                }
            }
            tracing::warn!(checkpoints = all.len(), store = %store.describe(), "--reset: deleted every checkpoint; starting fresh");
        }
        let fingerprint = join_fingerprint(plan);
        let mut restored = None;
        // With a Kafka output the Kafka commit is the commit point: only the epoch it
        // names may be restored, and newer manifests were never committed.
        let candidates: Vec<u64> = match (&plan.output, reset) {
            (Output::Kafka(_), false) => match committed_epoch(plan)? {
                KafkaCommitted::Nothing => {
                    for &epoch in &all {
                        tracing::warn!(epoch, "checkpoint was written but its Kafka transaction never committed; not using it");
                        store.delete(&manifest_name(epoch))?;
                    }
                    Vec::new()
                }
                KafkaCommitted::Epoch(e) => {
                    anyhow::ensure!(
                        all.contains(&e),
                        "Kafka says this job committed epoch {e}, but {} holds no manifest of it (its checkpoints: {all:?}); point [checkpoint] dir at the job's store, or run with --reset to start over from the sources' `start`",
                        store.describe()
                    );
                    vec![e]
                }
            },
            _ => all.clone(),
        };
        if !reset {
            let staging = plan.state_dir.join("restore");
            let mut problems = Vec::new();
            for &epoch in &candidates {
                match try_restore(store.as_ref(), epoch, plan, &fingerprint, &staging) {
                    Ok(r) => {
                        restored = Some(r);
                        break;
                    }
                    Err(Unusable::Incompatible(e)) => return Err(e),
                    Err(Unusable::Broken(e)) => {
                        tracing::warn!(
                            "checkpoint {epoch} is unusable, trying the one before: {e:#}"
                        );
                        problems.push(format!("checkpoint {epoch}: {e:#}"));
                    }
                }
            }
            if restored.is_none() && !candidates.is_empty() {
                anyhow::bail!(
                    "{} checkpoint(s) in {} and none is usable ({}); refusing to start from scratch: run with --reset to do so",
                    all.len(),
                    store.describe(),
                    problems.join("; ")
                );
            }
            if let Some(r) = &restored {
                // Checkpoints newer than the one restored are broken; their outputs
                // are removed below and they must not be mistaken for good ones.
                for &epoch in all.iter().filter(|&&e| e > r.manifest.epoch) {
                    store.delete(&manifest_name(epoch))?;
                }
                tracing::info!(epoch = r.manifest.epoch, store = %store.describe(), "restoring from checkpoint");
            }
        }
        let start = restored
            .as_ref()
            .map(|r: &Restored| CommitterStart::from_manifest(&r.manifest))
            .unwrap_or_default();
        let next_epoch = if reset {
            1
        } else {
            all.first().map_or(1, |e| e + 1)
        };
        let kafka = match &plan.output {
            Output::Kafka(output) => Some(KafkaOutput::open(plan, output, next_epoch, None, None)?),
            _ => None,
        };
        let mut checkpointing =
            Checkpointing::start(plan, config, store, fingerprint, start, kafka, next_epoch)?;
        checkpointing.restored = restored;
        Ok(checkpointing)
    }

    /// Opens instance `plan.instance`'s checkpoints in the shared store and restores
    /// each partition of `owned` from the checkpoint its committed offsets name: its
    /// own, another instance's (a hand-over) or none (a fresh partition). Only the
    /// Kafka commit says which checkpoint holds a partition, so there is no fallback
    /// to an older one.
    pub fn open_instance(
        plan: &Plan,
        config: &CheckpointPlan,
        owned: &Arc<Vec<u32>>,
        member: Option<Arc<ConsumerGroupMetadata>>,
    ) -> anyhow::Result<Checkpointing> {
        let Output::Kafka(output) = &plan.output else {
            anyhow::bail!("an instance writes to Kafka");
        };
        let me = plan.instance.as_deref();
        let store = PrefixStore::new(open_store(config)?, &instance_prefix(me));
        let own_epochs = epochs(&store)?;
        let next_epoch = own_epochs.first().map_or(1, |e| e + 1);
        // The transactional producers first: their `init_transactions` fences any
        // other process of this instance's name, which then commits nothing more, so
        // the committed offsets read next are final (as Kafka Streams initialises its
        // producer before it fetches a task's committed offsets).
        let kafka = KafkaOutput::open(plan, output, next_epoch, Some(Arc::clone(owned)), member)?;
        let fingerprint = join_fingerprint(plan);
        let mut by_manifest: std::collections::BTreeMap<Tag, Vec<u32>> = Default::default();
        for (p, tag) in committed_tags(plan, owned)? {
            by_manifest.entry(tag).or_default().push(p);
        }
        let staging = plan.state_dir.join("restore");
        let _ = std::fs::remove_dir_all(&staging);
        let mut start = CommitterStart::default();
        let mut handed_over = Vec::new();
        for (tag, mut partitions) in by_manifest {
            partitions.sort_unstable();
            let from = tag.instance.as_deref();
            let theirs = PrefixStore::new(open_store(config)?, &instance_prefix(from));
            let mut manifest = read_manifest(&theirs, tag.epoch).with_context(|| {
                format!(
                    "Kafka says partitions {partitions:?} were last committed at {tag}, whose checkpoint in {} cannot be read; is [checkpoint] dir the store every instance shares?",
                    theirs.describe()
                )
            })?;
            if without_shards(&manifest.join) != fingerprint || manifest.job != plan.name {
                anyhow::bail!(
                    "checkpoint {} in {} is of job `{}` ({}), but {} describes job `{}` ({}); every instance must run the same job file",
                    tag.epoch,
                    theirs.describe(),
                    manifest.job,
                    manifest.join,
                    plan.file.display(),
                    plan.name,
                    fingerprint
                );
            }
            manifest.units.retain(|u| partitions.contains(&u.partition));
            let name = format!("{}-{}", from.unwrap_or("job"), tag.epoch);
            let Fetched {
                units: mut fetched,
                reused_bytes,
                fetched_bytes,
            } = fetch(
                &theirs,
                &manifest,
                &staging.join(name),
                Some(&plan.state_dir),
            )?;
            if from == me {
                start
                    .uploaded
                    .extend(CommitterStart::from_manifest(&manifest).uploaded);
            } else {
                for unit in &mut fetched {
                    unit.uploaded_here = false;
                }
            }
            tracing::info!(
                %tag,
                ?partitions,
                units = fetched.len(),
                bytes = manifest.state_bytes(),
                reused_bytes,
                fetched_bytes,
                "restoring partitions"
            );
            handed_over.push(HandedOver {
                tag,
                reader: manifest.reader,
                partitions,
                units: fetched,
            });
        }
        let mut checkpointing = Checkpointing::start(
            plan,
            config,
            Box::new(store),
            fingerprint,
            start,
            Some(kafka),
            next_epoch,
        )?;
        checkpointing.handed_over = handed_over;
        Ok(checkpointing)
    }

    /// Starts the committer on `store`; with a Kafka output, its transactions commit
    /// the epochs.
    fn start(
        plan: &Plan,
        config: &CheckpointPlan,
        store: Box<dyn CheckpointStore>,
        fingerprint: String,
        start: CommitterStart,
        kafka: Option<Arc<KafkaOutput>>,
        next_epoch: u64,
    ) -> anyhow::Result<Checkpointing> {
        let on_commit = kafka
            .clone()
            .map(|k| -> super::OnCommit { Box::new(move |m| k.commit(m)) });
        let committer = Committer::start(
            store,
            CommitterConfig {
                job: plan.name.clone(),
                join: fingerprint,
                shards: plan.parallelism,
                keep: config.keep,
                on_commit,
            },
            start,
        )?;
        let mut checkpointing =
            Checkpointing::new(committer, Duration::from_millis(config.interval_ms as u64));
        checkpointing.next_epoch = next_epoch;
        checkpointing.kafka = kafka;
        Ok(checkpointing)
    }

    /// Checkpointing from epoch 1 with nothing restored (benchmarks).
    pub fn new(committer: Committer, interval: Duration) -> Checkpointing {
        Checkpointing {
            committer,
            restored: None,
            interval,
            next_epoch: 1,
            last_barrier: Instant::now(),
            in_flight: false,
            committed: Vec::new(),
            kafka: None,
            handed_over: Vec::new(),
        }
    }

    /// Takes the result of the epoch in flight, if it is done; an error stops the job.
    pub fn poll(&mut self) -> anyhow::Result<()> {
        if self.in_flight {
            if let Some(result) = self.committer.poll() {
                self.record(result)?;
            }
        }
        Ok(())
    }

    pub fn wait(&mut self) -> anyhow::Result<()> {
        if self.in_flight {
            let result = self.committer.wait();
            self.record(result)?;
        }
        Ok(())
    }

    fn record(&mut self, result: anyhow::Result<Committed>) -> anyhow::Result<()> {
        self.in_flight = false;
        // The cause stays in the chain (a fenced producer is told apart by its type).
        let committed = result.map_err(|e| {
            let message = format!(
                "checkpoint failed: {e:#}. The job stops; every committed checkpoint is intact and the next `braid run` resumes from the newest"
            );
            e.context(message)
        })?;
        tracing::info!(
            epoch = committed.epoch,
            pause_ms = committed.pause.as_millis() as u64,
            duration_ms = committed.duration.as_millis() as u64,
            state_bytes = committed.state_bytes,
            uploaded_bytes = committed.uploaded_bytes,
            "checkpoint committed"
        );
        self.committed.push(committed);
        Ok(())
    }

    /// True when the next barrier is due.
    pub fn due(&self) -> bool {
        !self.in_flight && self.last_barrier.elapsed() >= self.interval
    }

    /// Claims the epoch of a barrier being sent.
    pub fn begin(&mut self) -> u64 {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.in_flight = true;
        self.last_barrier = Instant::now();
        epoch
    }
}

enum Unusable {
    /// The checkpoint is fine but belongs to another job or join: never fall back.
    Incompatible(anyhow::Error),
    Broken(anyhow::Error),
}

fn try_restore(
    store: &dyn CheckpointStore,
    epoch: u64,
    plan: &Plan,
    fingerprint: &str,
    staging: &Path,
) -> Result<Restored, Unusable> {
    let manifest = read_manifest(store, epoch).map_err(Unusable::Broken)?;
    if without_shards(&manifest.join) != fingerprint || manifest.job != plan.name {
        return Err(Unusable::Incompatible(anyhow::anyhow!(
            "checkpoint {epoch} in {} is of job `{}` ({}), but {} describes job `{}` ({}); restore the job file's settings, point [checkpoint] dir elsewhere, or run with --reset",
            store.describe(),
            manifest.job,
            manifest.join,
            plan.file.display(),
            plan.name,
            fingerprint
        )));
    }
    let fetched =
        fetch(store, &manifest, staging, Some(&plan.state_dir)).map_err(Unusable::Broken)?;
    if fetched.reused_bytes > 0 {
        tracing::info!(
            reused_bytes = fetched.reused_bytes,
            fetched_bytes = fetched.fetched_bytes,
            "segment files the local state still held were not fetched"
        );
    }
    let units = fetched.units;
    Ok(Restored { manifest, units })
}

/// Puts a files output folder in the state a checkpoint describes: its pending files
/// published, files of every sink numbered from the checkpoint's `next_file` on removed
/// (output after the cut, to be produced again), hidden leftovers removed. Without a
/// checkpoint, the folder must hold no committed output.
pub fn recover_output(dir: &Path, manifest: Option<&Manifest>) -> anyhow::Result<()> {
    let folders = [dir.to_path_buf(), dir.join("_late"), dir.join("_dead")];
    if let Some(m) = manifest {
        super::publish(m)?;
    }
    for folder in &folders {
        let Ok(entries) = std::fs::read_dir(folder) else {
            continue;
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let hidden = name.starts_with('.')
                && (name.ends_with(".inprogress") || name.ends_with(".pending"));
            if hidden {
                remove(&entry.path())?;
                continue;
            }
            if !name.ends_with(".ndjson") {
                continue;
            }
            match manifest {
                None => anyhow::bail!(
                    "output folder {} already holds committed output ({name}) of an earlier run and no checkpoint to resume; remove it or set another [output] path",
                    folder.display()
                ),
                Some(m) => {
                    let after_cut = m.sinks.iter().any(|s| {
                        s.dir == *folder
                            && FileSink::file_number(&name, &s.prefix).is_some_and(|n| n >= s.next_file)
                    });
                    if after_cut {
                        tracing::warn!(file = %entry.path().display(), "removing output published after the restored checkpoint; it will be written again");
                        remove(&entry.path())?;
                    }
                }
            }
        }
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output folder {}", dir.display()))
}

fn remove(path: &PathBuf) -> anyhow::Result<()> {
    std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{ReaderState, SinkState};
    use braid_io::PendingFile;

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn recovery_publishes_the_checkpoint_and_removes_output_after_its_cut() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        for name in [
            "part-0-000000.ndjson",
            "part-0-000001.ndjson",
            "part-0-000002.ndjson",
            "part-0-000003.ndjson",
            ".part-0-000004.ndjson.inprogress",
            ".part-1-000000.ndjson.pending",
            ".part-1-000001.ndjson.pending",
            "notes.txt",
        ] {
            std::fs::write(out.join(name), name).unwrap();
        }
        let manifest = Manifest {
            format: 1,
            job: "j".into(),
            join: "j".into(),
            epoch: 7,
            created_unix_ms: 0,
            watermark_ms: None,
            reader: ReaderState {
                sources: Vec::new(),
                watermark: "0".into(),
                partitions: Vec::new(),
            },
            units: Vec::new(),
            sinks: vec![
                SinkState {
                    dir: out.clone(),
                    prefix: "part-0".into(),
                    next_file: 2,
                },
                SinkState {
                    dir: out.clone(),
                    prefix: "part-1".into(),
                    next_file: 1,
                },
            ],
            pending: vec![PendingFile {
                pending: out.join(".part-1-000000.ndjson.pending"),
                done: out.join("part-1-000000.ndjson"),
            }],
        };
        recover_output(&out, Some(&manifest)).unwrap();
        assert_eq!(
            names(&out),
            vec![
                "notes.txt",
                "part-0-000000.ndjson",
                "part-0-000001.ndjson",
                "part-1-000000.ndjson"
            ]
        );
        let err = recover_output(&out, None).unwrap_err().to_string();
        assert!(err.contains("already holds committed output"), "{err}");
    }
}
