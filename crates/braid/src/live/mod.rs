//! What a running job shows while it runs (issue 11): Prometheus metrics at `/metrics`
//! and a status page at `/`, on the address of `[metrics] listen` or `--metrics`.
//!
//! The values are not counted twice: the reader loop samples what it and the shards
//! already count (`driver`'s per-partition counts, `engine::StateGauges`, the
//! committer's `Committed` epochs) every `PUBLISH_INTERVAL` and sets them on a
//! Prometheus recorder of its own (`metrics-exporter-prometheus` without its HTTP
//! stack). One thread of braid's own (`server`) answers the requests. Without
//! `[metrics]` none of this exists and the reader loop does nothing more.

mod server;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use metrics::{Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use braid_core::JoinCounts;

use crate::checkpoint::Committed;
use crate::config::Plan;

/// How often the reader loop sets the metrics from its counts: the page's charts move
/// once a second, Prometheus scrapes every 15 s or so.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);

/// Upper bounds of the checkpoint histograms' buckets, in seconds.
const CHECKPOINT_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Every metric braid publishes, with its kind, unit and help text.
const DESCRIPTIONS: &[(&str, Kind, Unit, &str)] = &[
    ("braid_records_in_total", Kind::Counter, Unit::Count, "Records read, per source and partition (this process, since it started)."),
    ("braid_dead_letters_total", Kind::Counter, Unit::Count, "Records that could not be read, written to _dead/ (or the dead-letter topic)."),
    ("braid_duplicates_total", Kind::Counter, Unit::Count, "Events dropped as duplicates of an id already in state."),
    ("braid_late_total", Kind::Counter, Unit::Count, "Events behind the watermark by more than the allowed lateness, written to _late/."),
    ("braid_matched_total", Kind::Counter, Unit::Count, "Events that matched at least once, counted when they leave state."),
    ("braid_unmatched_total", Kind::Counter, Unit::Count, "Events that matched nothing and were emitted with a null opposite side."),
    ("braid_expired_total", Kind::Counter, Unit::Count, "Events that matched nothing and left state unemitted (the side an inner or one-sided join does not emit)."),
    ("braid_output_records_total", Kind::Counter, Unit::Count, "Records emitted: joined pairs, and unmatched rows of outer joins."),
    ("braid_cold_reads_total", Kind::Counter, Unit::Count, "Point reads of state spilled to disk."),
    ("braid_checkpoints_total", Kind::Counter, Unit::Count, "Checkpoints committed by this process."),
    ("braid_watermark_ms", Kind::Gauge, Unit::Milliseconds, "Event-time watermark per source partition (ms since the epoch)."),
    ("braid_watermark_lag_seconds", Kind::Gauge, Unit::Seconds, "Wall clock minus the job's watermark."),
    ("braid_state_bytes", Kind::Gauge, Unit::Bytes, "Bytes of join state, in memory and on disk."),
    ("braid_state_events", Kind::Gauge, Unit::Count, "Events in the join's state, per source."),
    ("braid_checkpoint_duration_seconds", Kind::Histogram, Unit::Seconds, "From a checkpoint's barrier to its committed manifest."),
    ("braid_checkpoint_pause_seconds", Kind::Histogram, Unit::Seconds, "How long the pipeline stood still for a checkpoint's barrier."),
    ("braid_checkpoint_bytes", Kind::Gauge, Unit::Bytes, "State bytes of the last checkpoint."),
    ("braid_last_checkpoint_epoch", Kind::Gauge, Unit::Count, "Epoch of the last committed checkpoint."),
    ("braid_alignment_paused_seconds_total", Kind::Gauge, Unit::Seconds, "Time a source with records waited while the other, behind in event time, was read (event alignment); a running total."),
    ("braid_consumer_lag", Kind::Gauge, Unit::Count, "Records in a Kafka partition after the next one this process reads."),
    ("braid_partition_owned", Kind::Gauge, Unit::Count, "1 for each partition of a Kafka topic this process reads, 0 for the others."),
    ("braid_running", Kind::Gauge, Unit::Count, "1 while the job runs, 0 once it has finished or stopped."),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Where the metrics and the page are served, and how long after a bounded run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsPlan {
    pub listen: String,
    /// After a bounded run ends, keep answering this long, so that a scrape sees the
    /// final counts (0: exit at once).
    pub linger_ms: u64,
}

/// The labels of one series.
pub type Labels = Vec<(&'static str, String)>;

/// One reading of every value, taken by the reader loop.
#[derive(Default)]
pub struct Sample {
    pub counters: Vec<(&'static str, Labels, u64)>,
    pub gauges: Vec<(&'static str, Labels, f64)>,
}

impl Sample {
    /// The join's part: its counts, per source `names` (left, right), and the state's
    /// size by tier (`state`: bytes in memory and on disk).
    pub fn add_join(&mut self, names: [&str; 2], join: &JoinCounts, state: (u64, u64)) {
        for (s, name) in names.iter().enumerate() {
            let labels = || vec![("source", name.to_string())];
            self.counter("braid_duplicates_total", labels(), join.duplicates[s]);
            self.counter("braid_matched_total", labels(), join.matched[s]);
            self.counter("braid_unmatched_total", labels(), join.unmatched_emitted[s]);
            self.counter("braid_expired_total", labels(), join.unmatched_expired[s]);
            self.gauge("braid_state_events", labels(), join.retained[s] as f64);
        }
        let kind = |k: &str| vec![("kind", k.to_string())];
        self.counter("braid_output_records_total", kind("pair"), join.pairs);
        self.counter(
            "braid_output_records_total",
            kind("unmatched"),
            join.unmatched_emitted.iter().sum(),
        );
        self.counter("braid_cold_reads_total", Vec::new(), join.cold_reads);
        let tier = |t: &str| vec![("tier", t.to_string())];
        self.gauge("braid_state_bytes", tier("memory"), state.0 as f64);
        self.gauge("braid_state_bytes", tier("disk"), state.1 as f64);
    }

    pub fn counter(&mut self, name: &'static str, labels: Labels, value: u64) {
        self.counters.push((name, labels, value));
    }

    pub fn gauge(&mut self, name: &'static str, labels: Labels, value: f64) {
        self.gauges.push((name, labels, value));
    }
}

/// What the page shows beside the charts.
#[derive(Default)]
struct Status {
    job: String,
    instance: Option<String>,
    /// The resolved plan, as `braid validate` prints it (it names no property: they
    /// may hold secrets).
    plan: String,
    state: &'static str,
}

/// The process's metrics and page: one per process, across an instance's generations.
pub struct Live {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    status: Mutex<Status>,
    /// Per counter series: the value last published, where the next run goes on from
    /// (a counter counts what this process did; a run restores its checkpoint's counts).
    published: Mutex<HashMap<String, u64>>,
    pub addr: SocketAddr,
}

impl Live {
    /// Binds the address and starts the thread that answers on it, for `plan`.
    pub fn start(plan: &Plan, metrics: &MetricsPlan) -> anyhow::Result<Arc<Live>> {
        let live = Live::serve(&metrics.listen)?;
        // The plan shows the address bound (port 0 takes any free one).
        let mut shown = plan.clone();
        if let Some(m) = shown.metrics.as_mut() {
            m.listen = live.addr.to_string();
        }
        live.set_plan(&shown);
        Ok(live)
    }

    /// Binds `listen` and starts the thread that answers on it; no plan yet.
    pub fn serve(listen: &str) -> anyhow::Result<Arc<Live>> {
        let addr = resolve_listen(listen)?;
        let listener = TcpListener::bind(addr).with_context(|| {
            format!(
                "[metrics] listen: cannot listen on {addr}; is another process using the port? Name another, or port 0 for any free one"
            )
        })?;
        let addr = listener.local_addr()?;
        let mut builder = PrometheusBuilder::new();
        for name in [
            "braid_checkpoint_duration_seconds",
            "braid_checkpoint_pause_seconds",
        ] {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.into()), CHECKPOINT_SECONDS_BUCKETS)
                .expect("non-empty buckets");
        }
        let recorder = builder.build_recorder();
        for &(name, kind, unit, help) in DESCRIPTIONS {
            match kind {
                Kind::Counter => recorder.describe_counter(name.into(), Some(unit), help.into()),
                Kind::Gauge => recorder.describe_gauge(name.into(), Some(unit), help.into()),
                Kind::Histogram => {
                    recorder.describe_histogram(name.into(), Some(unit), help.into())
                }
            }
        }
        let live = Arc::new(Live {
            handle: recorder.handle(),
            recorder,
            status: Mutex::new(Status::default()),
            published: Mutex::new(HashMap::new()),
            addr,
        });
        live.set_state("starting");
        let serving = Arc::clone(&live);
        std::thread::Builder::new()
            .name("braid-metrics".into())
            .spawn(move || server::serve(&listener, &serving))?;
        tracing::info!(%addr, "metrics at /metrics, status page at /");
        Ok(live)
    }

    /// The plan the page shows.
    pub fn set_plan(&self, plan: &Plan) {
        self.describe(&plan.name, plan.instance.clone(), plan.to_string());
    }

    /// What the page shows of the job: its name, instance and plan.
    pub fn describe(&self, job: &str, instance: Option<String>, plan: String) {
        let mut status = self.status.lock().expect("status lock");
        status.job = job.to_string();
        status.instance = instance;
        status.plan = plan;
    }

    /// `starting`, `running`, `finished` or `stopped`.
    pub fn set_state(&self, state: &'static str) {
        self.status.lock().expect("status lock").state = state;
        let running = if state == "running" { 1.0 } else { 0.0 };
        self.gauge("braid_running", &Vec::new()).set(running);
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// What `/status` answers: the job, its state and plan, as JSON.
    fn status_json(&self) -> String {
        let status = self.status.lock().expect("status lock");
        serde_json::json!({
            "job": status.job,
            "instance": status.instance,
            "state": status.state,
            "plan": status.plan,
            "version": env!("CARGO_PKG_VERSION"),
        })
        .to_string()
    }

    fn gauge(&self, name: &'static str, labels: &Labels) -> metrics::Gauge {
        self.recorder
            .register_gauge(&key(name, labels), &metadata())
    }
}

fn key(name: &'static str, labels: &Labels) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.clone()))
            .collect::<Vec<_>>(),
    )
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

/// `HOST:PORT`, `:PORT` or `PORT`; a bare port is on the loopback address.
pub fn resolve_listen(text: &str) -> anyhow::Result<SocketAddr> {
    let text = text.trim();
    let full = if let Ok(port) = text.parse::<u16>() {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = text.strip_prefix(':') {
        format!("127.0.0.1:{port}")
    } else {
        text.to_string()
    };
    use std::net::ToSocketAddrs;
    full.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| {
            format!("[metrics] listen: `{text}` is not an address to listen on; write HOST:PORT, e.g. 127.0.0.1:9464, or a port alone for the loopback address")
        })
}

/// One run's publishing: counters go on from what earlier runs of this process
/// published, by what this run added since its start (its restored counts are not
/// this process's work).
pub struct Publisher {
    live: Arc<Live>,
    /// Per counter series: (what earlier runs published, the value at this run's start).
    counters: HashMap<String, (u64, u64)>,
    last: Instant,
    /// Committed checkpoints of this run already recorded.
    checkpoints_seen: usize,
    checkpoints: u64,
}

impl Publisher {
    /// Starts a run's publishing at its restored values.
    pub fn new(live: Arc<Live>, start: &Sample) -> Publisher {
        let published = live.published.lock().expect("published lock").clone();
        let counters = start
            .counters
            .iter()
            .map(|(name, labels, value)| {
                let id = series_id(name, labels);
                let base = published.get(&id).copied().unwrap_or(0);
                (id, (base, *value))
            })
            .collect();
        let checkpoints = published
            .get("braid_checkpoints_total")
            .copied()
            .unwrap_or(0);
        live.set_state("running");
        Publisher {
            live,
            counters,
            last: Instant::now(),
            checkpoints_seen: 0,
            checkpoints,
        }
    }

    /// Whether `PUBLISH_INTERVAL` has passed since the last publish.
    pub fn due(&self) -> bool {
        self.last.elapsed() >= PUBLISH_INTERVAL
    }

    /// Sets every value of `sample`, and records the checkpoints committed since the
    /// last call.
    pub fn publish(&mut self, sample: &Sample, committed: &[Committed]) {
        self.last = Instant::now();
        let recorder = &self.live.recorder;
        let mut published = self.live.published.lock().expect("published lock");
        for (name, labels, value) in &sample.counters {
            let id = series_id(name, labels);
            let earlier = published.get(&id).copied().unwrap_or(0);
            let &mut (base, start) = self.counters.entry(id.clone()).or_insert((earlier, 0));
            let total = base + value.saturating_sub(start);
            recorder
                .register_counter(&key(name, labels), &metadata())
                .absolute(total);
            published.insert(id, total);
        }
        for (name, labels, value) in &sample.gauges {
            recorder
                .register_gauge(&key(name, labels), &metadata())
                .set(*value);
        }
        for c in committed.iter().skip(self.checkpoints_seen) {
            let none = Vec::new();
            recorder
                .register_histogram(
                    &key("braid_checkpoint_duration_seconds", &none),
                    &metadata(),
                )
                .record(c.duration.as_secs_f64());
            recorder
                .register_histogram(&key("braid_checkpoint_pause_seconds", &none), &metadata())
                .record(c.pause.as_secs_f64());
            self.live
                .gauge("braid_checkpoint_bytes", &none)
                .set(c.state_bytes as f64);
            self.live
                .gauge("braid_last_checkpoint_epoch", &none)
                .set(c.epoch as f64);
            self.checkpoints += 1;
        }
        self.checkpoints_seen = self.checkpoints_seen.max(committed.len());
        recorder
            .register_counter(&key("braid_checkpoints_total", &Vec::new()), &metadata())
            .absolute(self.checkpoints);
        published.insert("braid_checkpoints_total".into(), self.checkpoints);
    }

    /// The run has ended: `finished` (bounded inputs read) or `stopped`.
    pub fn end(&self, state: &'static str) {
        self.live.set_state(state);
    }
}

/// A series' identity: its name and labels.
fn series_id(name: &str, labels: &Labels) -> String {
    let mut id = name.to_string();
    for (k, v) in labels {
        id.push_str(&format!(",{k}={v}"));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: u64) -> Sample {
        let mut sample = Sample::default();
        let labels = vec![("source", "a".to_string()), ("partition", "0".to_string())];
        sample.counter("braid_records_in_total", labels, n);
        sample.gauge(
            "braid_state_events",
            vec![("source", "a".to_string())],
            n as f64,
        );
        sample
    }

    /// The value of the series whose line starts with `series` in the text format.
    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    }

    #[test]
    fn counters_count_this_process_across_runs_and_gauges_are_set() {
        let live = Live::serve("127.0.0.1:0").unwrap();
        // A run restored at 100 reads 50.
        let mut run = Publisher::new(Arc::clone(&live), &records(100));
        run.publish(&records(150), &[]);
        let series = "braid_records_in_total{source=\"a\",partition=\"0\"}";
        assert_eq!(value(&live.render(), series), 50.0);
        assert_eq!(
            value(&live.render(), "braid_state_events{source=\"a\"}"),
            150.0
        );
        // The next run (another generation) is restored at 400 and reads 10: the
        // counter goes on from 50, never back.
        let mut next = Publisher::new(Arc::clone(&live), &records(400));
        next.publish(&records(410), &[]);
        assert_eq!(value(&live.render(), series), 60.0);
        let committed = [Committed {
            epoch: 7,
            pause: Duration::from_millis(3),
            duration: Duration::from_millis(40),
            state_bytes: 1_000,
            uploaded_bytes: 10,
        }];
        next.publish(&records(410), &committed);
        next.publish(&records(410), &committed);
        let text = live.render();
        assert_eq!(value(&text, "braid_checkpoints_total"), 1.0, "once each");
        assert_eq!(value(&text, "braid_last_checkpoint_epoch"), 7.0);
        assert_eq!(value(&text, "braid_checkpoint_duration_seconds_count"), 1.0);
        assert_eq!(value(&text, "braid_checkpoint_pause_seconds_sum"), 0.003);
        assert!(text.contains("# TYPE braid_checkpoint_duration_seconds histogram"));
        assert!(text.contains("# HELP braid_records_in_total"));
        next.end("finished");
        assert_eq!(value(&live.render(), "braid_running"), 0.0);
        assert!(live.status_json().contains("\"state\":\"finished\""));
    }

    #[test]
    fn a_bare_port_listens_on_the_loopback_address() {
        assert_eq!(
            resolve_listen("9464").unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
        assert_eq!(
            resolve_listen(":0").unwrap(),
            "127.0.0.1:0".parse().unwrap()
        );
        assert_eq!(
            resolve_listen("0.0.0.0:9464").unwrap(),
            "0.0.0.0:9464".parse().unwrap()
        );
        let e = resolve_listen("nine").unwrap_err().to_string();
        assert!(e.contains("HOST:PORT"), "{e}");
    }
}
