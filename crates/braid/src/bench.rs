//! `braid bench`: throughput benchmarks that print one JSON line last.
//!
//! - `flink-peer` runs the exact workload of `shared/peers/flink` (generated in
//!   process, no parsing, results counted), checks the result count against the peer's
//!   reference table and against an independent count, and reports events/s.
//! - `files` generates a take-rate data set (not timed), then times `braid run` over it:
//!   NDJSON parsing, the join and the joined NDJSON output included.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use braid_core::{
    ColdProbeMode, Event, EventTime, JoinKind, JoinSpec, KeyPart, KeyWriter, PayloadMode, Side,
    Watermark,
};
use braid_io::flink_peer;
use serde_json::json;

use crate::checkpoint::coordinator::{open_store_at, Checkpointing};
use crate::checkpoint::store::CheckpointStore;
use crate::checkpoint::{
    fetch, read_manifest, watermark_text, Committer, CommitterConfig, CommitterStart, Part,
    ReaderSnapshot, ReaderState, SourceAt, SourceState, WatermarkState, FILES, MANIFESTS,
};
use crate::counts::SourceCounts;
use crate::engine::{Engine, EngineConfig, Layout, ShardReport};
use crate::results::CountingResults;
use crate::summary::{peak_rss_bytes, CheckpointCounts};

/// Events between two watermark advances in the flink-peer benchmark (Flink emits a
/// watermark every 200 ms; this is about as often at the rates measured).
const PEER_ADVANCE_EVENTS: u64 = 16_384;
/// An encoded flink-peer key: two integer parts of a tag byte and 8 bytes each.
const PEER_KEY_BYTES: usize = 18;

pub struct BenchOptions {
    pub events: u64,
    pub memory_max_bytes: u64,
    /// When the joins read the cold segments their probes need.
    pub cold_probes: ColdProbeMode,
    pub parallelism: usize,
    pub state_dir: std::path::PathBuf,
    /// Checkpoint this often (flink-peer), into `state_dir/../checkpoints`.
    pub checkpoint_interval_ms: Option<i64>,
    /// flink-peer: checkpoint into this store instead (a folder or `s3://bucket/prefix`);
    /// what it holds is deleted first.
    pub checkpoint_store: Option<String>,
    /// flink-peer: serve the metrics and the status page here, publish them as
    /// `braid run` does, and scrape `/metrics` once a second as the page does.
    pub metrics: Option<String>,
}

/// How often the benchmark's scraper asks for `/metrics`: as the status page does.
const SCRAPE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Scrapes `/metrics` of `addr` every `SCRAPE_INTERVAL` until `stop`; the time each
/// answer took, in ms.
fn scrape(
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<f64>> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let mut took = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let asked = Instant::now();
            let answer = std::net::TcpStream::connect(addr).and_then(|mut s| {
                s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
                let mut body = Vec::new();
                s.read_to_end(&mut body)?;
                Ok(body.len())
            });
            if answer.is_ok_and(|n| n > 0) {
                took.push(asked.elapsed().as_secs_f64() * 1e3);
            }
            std::thread::sleep(SCRAPE_INTERVAL.saturating_sub(asked.elapsed()));
        }
        took
    })
}

/// Where the flink-peer benchmark checkpoints: `--checkpoint-store`, else a folder
/// beside its state.
fn bench_store_at(options: &BenchOptions) -> String {
    options.checkpoint_store.clone().unwrap_or_else(|| {
        let dir = options.state_dir.with_file_name("checkpoints");
        dir.to_string_lossy().into_owned()
    })
}

/// The flink-peer benchmark's checkpoint store, emptied (what any earlier run left in
/// its `manifests/` and `files/` deleted).
fn bench_store(options: &BenchOptions) -> anyhow::Result<Box<dyn CheckpointStore>> {
    let store = open_store_at(&bench_store_at(options))?;
    for prefix in [MANIFESTS, FILES] {
        for name in store.list(prefix)? {
            store.delete(&name)?;
        }
    }
    Ok(store)
}

/// Sends a barrier and the flink-peer benchmark's part of the checkpoint: the event
/// count as the source position.
fn bench_barrier(
    checkpoints: &mut Checkpointing,
    engine: &mut Engine,
    events: u64,
    watermark: Watermark,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let epoch = checkpoints.begin();
    engine.barrier(epoch)?;
    let state = ReaderState {
        sources: vec![SourceState {
            name: "flink-peer".into(),
            at: SourceAt::Events { events },
            partitions: Vec::new(),
            guards: Vec::new(),
            partition_counts: Vec::new(),
            counts: SourceCounts::default(),
        }],
        watermark: watermark_text(watermark),
        partitions: vec![WatermarkState {
            watermark: watermark_text(watermark),
            sent: watermark_text(watermark),
        }],
    };
    checkpoints
        .committer
        .parts()
        .send(Part::Reader(ReaderSnapshot {
            epoch,
            state,
            watermark_ms: Some(watermark.millis()),
            pending: Vec::new(),
            sinks: Vec::new(),
            pause: started.elapsed(),
        }))
        .map_err(|_| anyhow::anyhow!("the checkpoint thread stopped"))
}

/// Runs the flink-peer workload; returns the JSON result line.
pub fn flink_peer(options: &BenchOptions) -> anyhow::Result<serde_json::Value> {
    let expected = flink_peer::expected_results(options.events);
    let reference = flink_peer::REFERENCE_COUNTS
        .iter()
        .find(|(n, _)| *n == options.events)
        .map(|&(_, results)| results);
    if let Some(r) = reference {
        anyhow::ensure!(
            r == expected,
            "independent count {expected} differs from the peer's reference {r}"
        );
    }
    let spec = JoinSpec {
        kind: JoinKind::Inner,
        lower_ms: 0,
        upper_ms: flink_peer::WINDOW_MS,
        allowed_lateness_ms: 0,
    };
    let mut checkpoints = match options.checkpoint_interval_ms {
        Some(ms) => Some(Checkpointing::new(
            Committer::start(
                bench_store(options)?,
                CommitterConfig {
                    on_commit: None,
                    job: "bench".into(),
                    join: "flink-peer".into(),
                    shards: options.parallelism,
                    keep: 3,
                },
                CommitterStart::default(),
            )?,
            std::time::Duration::from_millis(ms as u64),
        )),
        None => None,
    };
    let live = match &options.metrics {
        Some(listen) => {
            let live = crate::live::Live::serve(listen)?;
            live.describe("bench", None, "flink-peer benchmark".into());
            Some(live)
        }
        None => None,
    };
    let stop_scraping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = live
        .as_ref()
        .map(|l| scrape(l.addr, std::sync::Arc::clone(&stop_scraping)));
    let started = Instant::now();
    let mut engine = Engine::start_with(
        EngineConfig {
            spec,
            layout: Layout::one_partition(options.parallelism),
            memory_max_bytes: options.memory_max_bytes,
            cold_probes: options.cold_probes,
            payloads: PayloadMode::default(),
            state_dir: &options.state_dir,
            checkpoints: checkpoints.as_ref().map(|c| c.committer.parts()),
            restore: Vec::new(),
        },
        |_| Ok(CountingResults::default()),
    )?;
    let mut key = KeyWriter::default();
    let mut max_time = i64::MIN;
    let mut late = 0u64;
    let mut watermark = Watermark::MIN;
    let mut read = [0u64; 2];
    let sample = |engine: &Engine, read: [u64; 2], watermark: Watermark| {
        let mut sample = crate::live::Sample::default();
        for (s, name) in ["impressions", "plays"].into_iter().enumerate() {
            let labels = vec![("source", name.to_string()), ("partition", "0".to_string())];
            sample.counter("braid_records_in_total", labels.clone(), read[s]);
            if !watermark.is_infinite() {
                sample.gauge("braid_watermark_ms", labels, watermark.millis() as f64);
            }
        }
        let gauges = engine.gauges();
        sample.add_join(["impressions", "plays"], &gauges.counts(), gauges.totals());
        sample
    };
    // Time spent sampling and publishing on this (the reading) thread, and how often.
    let mut publishing = (std::time::Duration::ZERO, 0u64);
    let mut publisher = live.as_ref().map(|l| {
        crate::live::Publisher::new(std::sync::Arc::clone(l), &sample(&engine, read, watermark))
    });
    for n in 0..options.events {
        let e = flink_peer::event(n as i64);
        if watermark.is_late(EventTime(e.time_ms), 0) {
            late += 1;
            continue;
        }
        key.clear();
        key.push(KeyPart::Int(e.profile_id));
        key.push(KeyPart::Int(e.title_id));
        engine.push(
            0,
            &Event {
                side: if e.play { Side::Right } else { Side::Left },
                key: key.bytes(),
                key_hash: key.hash(),
                time: EventTime(e.time_ms),
                id: None,
                payload: e.payload,
            },
        )?;
        read[usize::from(e.play)] += 1;
        max_time = max_time.max(e.time_ms);
        if n % PEER_ADVANCE_EVENTS == PEER_ADVANCE_EVENTS - 1 {
            watermark = Watermark::at(EventTime(max_time - flink_peer::MAX_OUT_OF_ORDERNESS_MS));
            engine.advance(&[(0, watermark)])?;
            if let Some(p) = publisher.as_mut().filter(|p| p.due()) {
                let began = Instant::now();
                let committed = checkpoints
                    .as_ref()
                    .map_or(&[][..], |c| c.committed.as_slice());
                p.publish(&sample(&engine, read, watermark), committed);
                publishing.0 += began.elapsed();
                publishing.1 += 1;
            }
            if let Some(c) = checkpoints.as_mut() {
                c.poll()?;
                if c.due() {
                    bench_barrier(c, &mut engine, n + 1, watermark)?;
                }
            }
        }
    }
    // With checkpoints: one more of the whole window's state, for the restore below.
    if let Some(c) = checkpoints.as_mut() {
        c.wait()?;
        bench_barrier(c, &mut engine, options.events, watermark)?;
        c.wait()?;
    }
    engine.advance(&[(0, Watermark::MAX)])?;
    let reports = engine.finish()?;
    let seconds = started.elapsed().as_secs_f64();
    stop_scraping.store(true, std::sync::atomic::Ordering::Relaxed);
    let scrape_json = scraper.map(|s| {
        let mut took = s.join().unwrap_or_default();
        took.sort_by(f64::total_cmp);
        json!({
            "scrapes": took.len(),
            "scrape_ms_p50": crate::summary::quantile(&took, 0.5),
            "scrape_ms_max": crate::summary::quantile(&took, 1.0),
            "publishes": publishing.1,
            "publish_ms_total": round2(publishing.0.as_secs_f64() * 1e3),
            "publish_share_of_run": publishing.0.as_secs_f64() / seconds,
        })
    });
    // The restore runs after the run's shards have ended (their joins, chunk pools and
    // stores are gone), as `braid run` restores into a fresh process after a crash.
    // Restoring while they were alive measured the run's peak plus a second state.
    let rss_before_restore = peak_rss_bytes();
    let restore = match &checkpoints {
        Some(c) => Some(time_restore(
            c.committed.last().expect("just committed").epoch,
            spec,
            options,
        )?),
        None => None,
    };
    // `time_restore` may have reset the peak to time the restore's own.
    let peak_rss = rss_before_restore.max(peak_rss_bytes());
    let checkpoint_json = checkpoints.as_ref().map(|c| {
        // The last checkpoint (for the restore) is taken after the stream; report the
        // periodic ones.
        let periodic = CheckpointCounts::new(None, None, &c.committed[..c.committed.len() - 1]);
        let r = restore.as_ref().expect("timed with checkpoints");
        json!({
            "interval_ms": c.interval.as_millis() as u64,
            "taken": periodic.taken,
            "pause_ms_p50": periodic.pause_ms[0],
            "pause_ms_p99": periodic.pause_ms[1],
            "pause_ms_max": periodic.pause_ms[2],
            "duration_ms_p50": periodic.duration_ms_median,
            "state_mb_last_periodic": mb(periodic.last_state_bytes),
            "peak_rss_mb_before_restore": mb(rss_before_restore),
            "peak_rss_mb_restore": r.peak_rss_bytes.map(mb),
            "restore_state_mb": mb(r.state_bytes),
            "restore_files": r.files,
            "restore_seconds": round2(r.seconds),
            "restore_fetch_seconds": round2(r.fetch_seconds),
        })
    });
    let results: u64 = reports.iter().map(|r| r.counts.pairs).sum();
    let spilled: u64 = reports.iter().map(|r| r.counts.spilled_events).sum();
    let spilled_segments: u64 = reports.iter().map(|r| r.counts.spilled_segments).sum();
    // Bytes per event in memory beyond its key and payload, when no event was spilled.
    let payload = (flink_peer::PAYLOAD_BYTES + PEER_KEY_BYTES) as f64;
    let overhead = (spilled == 0).then(|| {
        let bytes: usize = reports.iter().map(|r| r.peak_state_bytes).sum();
        let events: u64 = reports.iter().map(|r| r.events_at_peak).sum();
        (bytes as f64 / events.max(1) as f64 - payload).round()
    });
    let cold_reads: u64 = reports.iter().map(|r| r.counts.cold_reads).sum();
    let cold_reads_found: u64 = reports.iter().map(|r| r.counts.cold_reads_found).sum();
    Ok(json!({
        "workload": "flink-peer",
        "parallelism": options.parallelism,
        "memory_max_mb": options.memory_max_bytes >> 20,
        "expected": expected,
        "correct": results == expected && late == 0,
        "late": late,
        "spilled_events": spilled,
        "spilled_segments": spilled_segments,
        "memory_bytes_per_event_beyond_payload": overhead,
        "cold_reads": cold_reads,
        "cold_reads_found": cold_reads_found,
        "peak_state_mb": mb(reports.iter().map(|r: &ShardReport| r.peak_state_bytes as u64).sum()),
        "events": options.events,
        "results": results,
        "events_per_s": (options.events as f64 / seconds).round(),
        "seconds": round2(seconds),
        "peak_rss_mb": mb(peak_rss),
        "checkpoints": checkpoint_json,
        "metrics": scrape_json,
    }))
}

struct RestoreTiming {
    seconds: f64,
    fetch_seconds: f64,
    state_bytes: u64,
    files: usize,
    /// The process's peak resident memory during the restore alone, where it can be
    /// measured apart (see [`reset_peak_rss`]).
    peak_rss_bytes: Option<u64>,
}

/// Resets the process's peak resident memory (`VmHWM`) to what it holds now, so that
/// the peak of what follows can be read apart (Linux: `/proc/self/clear_refs`). False
/// where that is not possible.
///
/// First it hands the memory the allocator keeps free (what the run's shards freed:
/// glibc keeps each thread's arena after the thread ends) back to the system, so that
/// the restore's peak starts from what a fresh process after a crash would hold, not
/// from the run's leftovers (measured: 852 MB for a 410 MB restore at 512 MiB without).
fn reset_peak_rss() -> bool {
    // SAFETY: malloc_trim only releases free heap pages; no Rust object refers to them.
    unsafe {
        libc::malloc_trim(0);
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Restores checkpoint `epoch` into fresh state, as `braid run` does after a crash:
/// fetch and verify every file, ingest the segments, load the join images.
fn time_restore(
    epoch: u64,
    spec: JoinSpec,
    options: &BenchOptions,
) -> anyhow::Result<RestoreTiming> {
    let store = open_store_at(&bench_store_at(options))?;
    let state_dir = options.state_dir.with_file_name("restored");
    let apart = reset_peak_rss();
    let started = Instant::now();
    let manifest = read_manifest(store.as_ref(), epoch)?;
    let shards = fetch(store.as_ref(), &manifest, &state_dir.join("restore"), None)?.units;
    let fetch_seconds = started.elapsed().as_secs_f64();
    let engine = Engine::start_with(
        EngineConfig {
            spec,
            layout: Layout::one_partition(options.parallelism),
            memory_max_bytes: options.memory_max_bytes,
            cold_probes: options.cold_probes,
            payloads: PayloadMode::default(),
            state_dir: &state_dir,
            checkpoints: None,
            restore: shards,
        },
        |_| Ok(CountingResults::default()),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let peak = apart.then(peak_rss_bytes);
    engine.finish()?;
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(RestoreTiming {
        seconds,
        fetch_seconds,
        state_bytes: manifest.state_bytes(),
        files: manifest.files().count(),
        peak_rss_bytes: peak,
    })
}

/// Generates a data set of `events` lines under `dir` (untimed), then times a run over it.
pub fn files(options: &BenchOptions, dir: &Path) -> anyhow::Result<serde_json::Value> {
    let config = braid_io::takerate::TakeRateConfig {
        events: options.events,
        ..Default::default()
    };
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    let (job, _) = crate::demo::write_take_rate(
        dir,
        &config,
        1_000_000,
        "bench-files",
        options.memory_max_bytes,
    )?;
    // The run is a child process so that its peak resident memory is the run's alone,
    // not the generator's.
    let text = std::fs::read_to_string(&job)?;
    // The job's checkpoints: as `--checkpoint-interval` says, or none.
    let (body, _) = text
        .split_once("[checkpoint]")
        .context("the take-rate job has a [checkpoint] section")?;
    let checkpoint = match options.checkpoint_interval_ms {
        Some(ms) => format!("[checkpoint]\ndir = \".braid/checkpoints\"\ninterval = \"{ms}ms\"\n"),
        None => String::new(),
    };
    let body = body.replacen(
        "[state]\n",
        &format!(
            "[state]\ncold_probes = \"{}\"\n",
            crate::config::cold_probes_name(options.cold_probes)
        ),
        1,
    );
    std::fs::write(
        &job,
        format!("parallelism = {}\n{body}{checkpoint}", options.parallelism),
    )?;
    let braid = std::env::current_exe().context("cannot find the braid binary")?;
    let status = std::process::Command::new(braid)
        .arg("run")
        .arg("--quiet")
        .arg(&job)
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(
        status.success(),
        "braid run {} failed: {status}",
        job.display()
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/_summary.json"))?)?;
    anyhow::ensure!(
        summary["accounted"] == true,
        "the run's accounting does not add up: {summary}"
    );
    let count = |side: &str, field: &str| summary[side][field].as_u64().unwrap_or(0);
    let events = count("left", "read") + count("right", "read");
    let seconds = summary["seconds"].as_f64().unwrap_or(f64::NAN);
    let output_bytes: u64 = std::fs::read_dir(dir.join("out"))?
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(std::fs::Metadata::is_file)
        .map(|m| m.len())
        .sum();
    Ok(json!({
        "workload": "files",
        "parallelism": options.parallelism,
        "memory_max_mb": options.memory_max_bytes >> 20,
        "pairs": summary["pairs"],
        "output_mb": mb(output_bytes),
        "events": events,
        "results": summary["pairs"].as_u64().unwrap_or(0) + count("left", "unmatched_emitted") + count("right", "unmatched_emitted"),
        "events_per_s": (events as f64 / seconds).round(),
        "seconds": round2(seconds),
        "peak_rss_mb": mb(summary["peak_rss_bytes"].as_u64().unwrap_or(0)),
    }))
}

fn mb(bytes: u64) -> f64 {
    (bytes as f64 / 1048576.0).round()
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
