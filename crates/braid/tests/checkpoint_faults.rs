//! Fault injection behind the store traits (`BRAID_FAULTS`, see the README): failing
//! writes of the checkpoint store and of the state store (a full disk), a crash between
//! the commit point and the publishing of outputs, a torn manifest, a corrupted and a
//! missing checkpoint file. Each ends in a clean stop (exit 1, a message naming the
//! cause, committed checkpoints intact) and a recovery, or a fallback to the previous
//! checkpoint, whose final output equals the independent reference join exactly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    add_checkpoints, assert_success, braid, committed_lines, generate, reference_events,
    reference_join, stderr, summary, write_job,
};

struct Job {
    dir: tempfile::TempDir,
    job: PathBuf,
    want: Vec<String>,
}

impl Job {
    fn new(seed: u64) -> Job {
        let dir = tempfile::tempdir().expect("temp dir");
        generate(dir.path(), 120_000, seed);
        let job = write_job(dir.path(), "left", ("0s", "1h"), "1MiB");
        add_checkpoints(&job, "checkpoints", "50ms");
        let mut text = std::fs::read_to_string(&job).expect("job");
        text.push_str("keep = 4\n");
        std::fs::write(&job, text).expect("job");
        let (left, _) = reference_events(&dir.path().join("data/impressions"));
        let (right, _) = reference_events(&dir.path().join("data/plays"));
        let want = reference_join(&left, &right, "left", 0, 3_600_000);
        Job { dir, job, want }
    }

    fn run(&self, faults: Option<&str>) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_braid"));
        command.args(["run", "--quiet", self.job.to_str().expect("utf-8")]);
        if let Some(f) = faults {
            command.env("BRAID_FAULTS", f);
        }
        command.output().expect("braid runs")
    }

    fn checkpoints(&self) -> PathBuf {
        self.dir.path().join("checkpoints")
    }

    fn manifests(&self) -> Vec<PathBuf> {
        let mut m: Vec<PathBuf> = std::fs::read_dir(self.checkpoints().join("manifests"))
            .map(|d| d.map(|e| e.expect("entry").path()).collect())
            .unwrap_or_default();
        m.retain(|p| p.extension().is_some_and(|e| e == "manifest"));
        m.sort();
        m
    }

    /// Runs to the end without faults; the output must equal the reference.
    fn finish_and_check(&self) -> String {
        let out = self.run(None);
        assert_success(&out);
        let got = committed_lines(&self.dir.path().join("out"));
        assert_eq!(got.len(), self.want.len(), "row count after recovery");
        assert!(
            got == self.want,
            "rows after recovery differ from the reference"
        );
        let s = summary(&self.dir.path().join("out"));
        assert_eq!(s["accounted"], true, "{s:#}");
        stderr(&out)
    }

    /// Stops a run part-way with a checkpoint-store failure, leaving several committed
    /// checkpoints whose outputs are published.
    fn stop_part_way(&self) {
        let out = self.run(Some("checkpoint-put:400"));
        assert_stopped(&out, &["No space left on device"]);
        assert!(
            self.manifests().len() >= 2,
            "the run committed {} checkpoints before the fault",
            self.manifests().len()
        );
        assert!(!committed_lines(&self.dir.path().join("out")).is_empty());
    }
}

/// Asserts a clean stop: exit 1, and stderr naming every one of `causes`.
fn assert_stopped(out: &Output, causes: &[&str]) {
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(out));
    let err = stderr(out);
    for cause in causes {
        assert!(err.contains(cause), "stderr lacks `{cause}`: {err}");
    }
}

/// The files a manifest refers to (names relative to the checkpoint folder).
fn manifest_files(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).expect("manifest");
    let body = &text[text.find('\n').expect("header") + 1..];
    let json: serde_json::Value = serde_json::from_str(body).expect("manifest JSON");
    let mut names = Vec::new();
    for shard in json["units"].as_array().expect("units") {
        names.push(shard["image"]["name"].as_str().expect("name").to_string());
        for s in shard["segments"].as_array().expect("segments") {
            names.push(s["file"]["name"].as_str().expect("name").to_string());
        }
    }
    names
}

#[test]
fn a_full_disk_under_checkpoints_stops_cleanly_and_the_next_run_recovers() {
    let job = Job::new(301);
    let out = job.run(Some("checkpoint-put:300"));
    assert_stopped(&out, &["No space left on device", "checkpoint"]);
    assert!(
        !job.manifests().is_empty(),
        "earlier checkpoints are intact"
    );
    let err = job.finish_and_check();
    assert!(
        !err.contains("unusable"),
        "no checkpoint was damaged: {err}"
    );
}

#[test]
fn a_full_disk_under_state_stops_cleanly_and_the_next_run_recovers() {
    let job = Job::new(302);
    let out = job.run(Some("state-write:200"));
    assert_stopped(&out, &["No space left on device", "write segment"]);
    job.finish_and_check();
}

#[test]
fn a_crash_between_commit_and_publish_is_finished_on_restart() {
    let job = Job::new(303);
    let out = job.run(Some("crash-after-manifest:3"));
    assert!(!out.status.success(), "the process aborted");
    let hidden_pending = std::fs::read_dir(job.dir.path().join("out"))
        .expect("out")
        .filter(|e| {
            e.as_ref()
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .ends_with(".pending")
        })
        .count();
    assert!(hidden_pending > 0, "epoch 3's outputs were left pending");
    job.finish_and_check();
}

#[test]
fn a_torn_newest_manifest_falls_back_to_the_previous_checkpoint() {
    let job = Job::new(304);
    job.stop_part_way();
    let newest = job.manifests().pop().expect("a manifest");
    let bytes = std::fs::read(&newest).expect("manifest");
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).expect("tear");
    let err = job.finish_and_check();
    assert!(err.contains("unusable") && err.contains("torn"), "{err}");
}

#[test]
fn a_corrupted_checkpoint_file_falls_back_to_the_previous_checkpoint() {
    let job = Job::new(305);
    job.stop_part_way();
    let newest = job.manifests().pop().expect("a manifest");
    let files = manifest_files(&newest);
    let victim = job.checkpoints().join(files.last().expect("a file"));
    // Segment files are hard links shared with the state: replace, do not edit in place.
    let mut bytes = std::fs::read(&victim).expect("file");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::remove_file(&victim).expect("unlink");
    std::fs::write(&victim, bytes).expect("corrupt");
    // On a new machine: with its local state, a restore would take the intact local
    // copy of a segment file instead of the store's.
    std::fs::remove_dir_all(job.dir.path().join("state")).expect("remove the state");
    let err = job.finish_and_check();
    assert!(err.contains("corrupted"), "{err}");
    assert!(
        err.contains(files.last().expect("a file")),
        "names the file: {err}"
    );
}

#[test]
fn a_missing_checkpoint_file_falls_back_to_the_previous_checkpoint() {
    let job = Job::new(306);
    job.stop_part_way();
    let newest = job.manifests().pop().expect("a manifest");
    let files = manifest_files(&newest);
    std::fs::remove_file(job.checkpoints().join(&files[0])).expect("remove");
    let err = job.finish_and_check();
    assert!(err.contains("unusable"), "{err}");
}

#[test]
fn without_a_usable_checkpoint_braid_refuses_to_start_over_unless_reset() {
    let job = Job::new(307);
    job.stop_part_way();
    for manifest in job.manifests() {
        std::fs::write(&manifest, b"garbage").expect("break");
    }
    let out = job.run(None);
    assert_stopped(&out, &["none is usable", "--reset"]);
    // --reset starts over; the earlier output must be cleared by the user first.
    let refused = braid(&[
        "run",
        "--quiet",
        "--reset",
        job.job.to_str().expect("utf-8"),
    ]);
    assert_stopped(&refused, &["already holds committed output"]);
    std::fs::remove_dir_all(job.dir.path().join("out")).expect("clear output");
    let fresh = braid(&[
        "run",
        "--quiet",
        "--reset",
        job.job.to_str().expect("utf-8"),
    ]);
    assert_success(&fresh);
    let got = committed_lines(&job.dir.path().join("out"));
    assert!(got == job.want, "a reset run equals the reference");
}

#[test]
fn checkpoints_are_listed_and_inspected() {
    let job = Job::new(308);
    job.stop_part_way();
    let out = braid(&["checkpoints", job.job.to_str().expect("utf-8")]);
    assert_success(&out);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let listed = text.lines().filter(|l| l.contains("impressions:")).count();
    assert_eq!(listed, job.manifests().len(), "{text}");
    assert!(listed <= 4, "at most `keep` checkpoints are kept: {text}");
    let epoch: u64 = text
        .lines()
        .find(|l| l.contains("impressions:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|e| e.parse().ok())
        .expect("an epoch");
    let detail = braid(&[
        "checkpoints",
        job.job.to_str().expect("utf-8"),
        "--inspect",
        &epoch.to_string(),
    ]);
    assert_success(&detail);
    let detail = String::from_utf8_lossy(&detail.stdout).into_owned();
    assert!(detail.contains(&format!("checkpoint {epoch}")), "{detail}");
    assert!(detail.contains("source `plays`"), "{detail}");
}
