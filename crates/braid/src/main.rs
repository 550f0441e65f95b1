//! The `braid` command line (SPEC §1). Exit codes: 0 success, 2 bad usage or job file,
//! 1 any runtime failure (one-line cause on stderr; the chain with `-v`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use braid::bench::BenchOptions;
use braid::config::JobError;
use braid::kafka_bench::KafkaBenchOptions;
use braid::units::{parse_duration_ms, parse_size_bytes};
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

#[derive(Parser)]
#[command(
    name = "braid",
    version,
    about = "Joins event streams in event time, with state on disk."
)]
struct Cli {
    /// More log output on stderr, and the full cause chain of an error.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// No progress display.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// `braid run`: print the run summary as one JSON object on stdout (stderr when
    /// the results go to stdout) instead of the table.
    #[arg(long, global = true)]
    json: bool,
    /// Logs on stderr as text, or as one JSON object per line.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a realistic data set, run the take-rate join over it, print a summary.
    Demo {
        #[arg(long, default_value = "braid-demo")]
        dir: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Run live instead: the join over two generators that run until Ctrl-C, with
        /// the status page on (its address is printed).
        #[arg(long)]
        live: bool,
        /// --live: impressions a second (plays follow at about a seventh of that).
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        /// --live: where the status page and the metrics are served.
        #[arg(long, value_name = "ADDR", default_value = braid::config::METRICS_LISTEN_DEFAULT)]
        metrics: String,
    },
    /// Run a job to the end of its bounded inputs.
    Run {
        job: PathBuf,
        /// Delete the job's checkpoints and start from the beginning of its inputs.
        #[arg(long)]
        reset: bool,
        /// Run as instance NAME of a job several processes share through Kafka's
        /// consumer group (its local state goes under `[state] dir/NAME`).
        #[arg(long, value_name = "NAME", conflicts_with = "reset")]
        instance: Option<String>,
        /// Serve Prometheus metrics at /metrics and the status page at / on ADDR
        /// (HOST:PORT, or a port alone for the loopback address); overrides the job
        /// file's `[metrics] listen`.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
    },
    /// Check a job file and print the resolved plan.
    Validate { job: PathBuf },
    /// List a job's checkpoints: epoch, time, watermark, state size, source positions.
    Checkpoints {
        job: PathBuf,
        /// Show one checkpoint in detail.
        #[arg(long, value_name = "EPOCH")]
        inspect: Option<u64>,
        /// The checkpoints of instance NAME (`braid run JOB --instance NAME`).
        #[arg(long, value_name = "NAME")]
        instance: Option<String>,
    },
    /// Write a synthetic impressions/plays data set (NDJSON) and a job.toml for it.
    Generate(GenerateArgs),
    /// Measure throughput; prints one JSON line last.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[arg(long)]
    out: PathBuf,
    /// Lines to write, both streams together.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Distinct members.
    #[arg(long, default_value_t = 100_000)]
    profiles: u64,
    /// Distinct titles (Zipf-popular).
    #[arg(long, default_value_t = 8_000)]
    titles: u64,
    /// Impressions per second of event time.
    #[arg(long, default_value_t = 500)]
    impressions_per_s: u64,
    /// Share of impressions that lead to a play.
    #[arg(long, default_value_t = 0.12)]
    play_rate: f64,
    #[arg(long, default_value_t = 0.01)]
    duplicate_rate: f64,
    #[arg(long, default_value_t = 0.0005)]
    malformed_rate: f64,
    /// Bounded disorder of event times, e.g. 5s.
    #[arg(long, default_value = "5s")]
    max_out_of_orderness: String,
    #[arg(long, default_value_t = 250_000)]
    lines_per_file: u64,
    /// Event time of the first impression, RFC 3339.
    #[arg(long, default_value = "2023-11-14T22:13:20Z")]
    start: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum Workload {
    FlinkPeer,
    Files,
    /// Kafka → join → Kafka on a broker you run (`--brokers`), with the ceiling of the
    /// same broker without the join and the latency of a live run.
    Kafka,
    /// `braid run --instance` processes on a broker you run (`--brokers`): one against
    /// two, and the time to hand half the partitions over.
    Instances,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[arg(long, value_enum, default_value = "flink-peer")]
    workload: Workload,
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Default: 128MiB; 2GiB for kafka.
    #[arg(long)]
    memory_max: Option<String>,
    /// flink-peer and files: when probes of spilled state are read, "deferred" (gathered,
    /// the default) or "eager" (at the end of every batch), as `[state] cold_probes`.
    #[arg(long, default_value = "deferred")]
    cold_probes: String,
    /// Shard threads (default: the number of cores).
    #[arg(long)]
    parallelism: Option<usize>,
    /// Scratch folder for state (and the files workload's data).
    #[arg(long, default_value = ".braid/bench")]
    dir: PathBuf,
    /// flink-peer: take checkpoints this often (e.g. 10s) into DIR/checkpoints, and at
    /// the end time a restore of the last one into fresh state. kafka: the job's
    /// checkpoint interval (default 10s).
    #[arg(long)]
    checkpoint_interval: Option<String>,
    /// flink-peer: checkpoint into this store instead of DIR/checkpoints (a folder or
    /// `s3://bucket/prefix`, with the AWS_* variables of `[checkpoint] dir`); what it
    /// holds is deleted first.
    #[arg(long)]
    checkpoint_store: Option<String>,
    /// kafka: the broker, HOST:PORT.
    #[arg(long)]
    brokers: Option<String>,
    /// kafka: the latency run appends this many events/s ...
    #[arg(long, default_value_t = 20_000)]
    live_rate: u64,
    /// ... for this long (s); 0 skips the latency run.
    #[arg(long, default_value_t = 60)]
    live_seconds: u64,
    /// instances: measure only the hand-over, filling the topics at this many events/s
    /// while the first instance reads them (for state too large to fill first).
    #[arg(long)]
    fill_rate: Option<u64>,
    /// kafka, instances: impressions per second of event time in the generated input
    /// (the state's size, with the job's one-hour window).
    #[arg(long, default_value_t = braid_io::takerate::TakeRateConfig::default().impressions_per_s)]
    impressions_per_s: u64,
    /// flink-peer: serve the metrics and the status page on ADDR while it runs, and
    /// scrape them once a second (their cost; the scrape times are reported).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

/// Errors that are the user's to fix in what they wrote (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => LevelFilter::WARN,
        1 => LevelFilter::INFO,
        _ => LevelFilter::DEBUG,
    };
    // `BRAID_LOG=debug` or `BRAID_LOG=braid=debug,warn`: a level, or levels per target.
    let filter = std::env::var("BRAID_LOG")
        .ok()
        .and_then(|spec| spec.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(level));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => logs.json().with_filter(filter).boxed(),
    };
    tracing_subscriber::registry().with(logs).init();
    let progress = !cli.quiet && std::io::stderr().is_terminal();
    let summary_format = if cli.json {
        SummaryFormat::Json
    } else {
        SummaryFormat::Table
    };
    match dispatch(cli.command, progress, summary_format) {
        Ok(code) => code,
        Err(e) => {
            let usage =
                e.downcast_ref::<JobError>().is_some() || e.downcast_ref::<UsageError>().is_some();
            if cli.verbose > 0 {
                eprintln!("braid: error: {e:?}");
            } else {
                eprintln!("braid: error: {e}");
            }
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// How `braid run` prints its summary.
#[derive(Clone, Copy)]
enum SummaryFormat {
    Table,
    Json,
}

impl SummaryFormat {
    fn render(self, summary: &braid::summary::Summary) -> String {
        match self {
            SummaryFormat::Table => summary.to_string(),
            SummaryFormat::Json => summary.to_json().to_string(),
        }
    }
}

fn dispatch(command: Command, progress: bool, format: SummaryFormat) -> anyhow::Result<ExitCode> {
    match command {
        Command::Demo {
            dir,
            events,
            live: false,
            ..
        } => braid::demo::demo(&dir, events, progress)?,
        Command::Demo {
            dir,
            live: true,
            rate,
            metrics,
            ..
        } => braid::demo::demo_live(&dir, rate, &metrics, progress)?,
        Command::Validate { job } => print!("{}", braid::config::load(&job)?),
        Command::Checkpoints {
            job,
            inspect,
            instance,
        } => {
            let plan = braid::config::load(&job)?;
            let plan = match instance {
                Some(name) => plan.as_instance(&name)?,
                None => plan,
            };
            print!("{}", braid::checkpoint::list::describe(&plan, inspect)?);
        }
        Command::Run {
            job,
            reset,
            instance: Some(name),
            metrics,
        } => {
            debug_assert!(!reset);
            let plan = with_metrics(braid::config::load(&job)?, metrics)?.as_instance(&name)?;
            braid::signals::install();
            let live = start_live(&plan)?;
            match braid::instance::run_instance(&plan, progress, live.clone())? {
                Some(summary) => {
                    println!("{}", format.render(&summary));
                    summary.check().map_err(anyhow::Error::msg)?;
                }
                None => println!("instance `{name}` owned no partition"),
            }
            linger(&plan, live.as_deref());
        }
        Command::Run {
            job,
            reset,
            instance: None,
            metrics,
        } => {
            let plan = with_metrics(braid::config::load(&job)?, metrics)?;
            braid::signals::install();
            let live = start_live(&plan)?;
            let summary = braid::driver::run(
                &plan,
                &braid::driver::RunOptions {
                    progress,
                    reset,
                    live: live.clone(),
                    ..Default::default()
                },
            )?;
            // With results on stdout, the summary must not mix with them.
            if plan.output == braid::config::Output::Stdout {
                eprintln!("{}", format.render(&summary));
            } else {
                println!("{}", format.render(&summary));
            }
            linger(&plan, live.as_deref());
            summary.check().map_err(anyhow::Error::msg)?;
        }
        Command::Generate(args) => generate(&args)?,
        Command::Bench(args) => bench(&args)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `--metrics ADDR` over the job file's `[metrics] listen`.
fn with_metrics(
    mut plan: braid::config::Plan,
    listen: Option<String>,
) -> anyhow::Result<braid::config::Plan> {
    if let Some(listen) = listen {
        braid::live::resolve_listen(&listen)
            .map_err(|e| UsageError(format!("--metrics: {e:#}")))?;
        let linger_ms = plan.metrics.as_ref().map_or(0, |m| m.linger_ms);
        plan.metrics = Some(braid::live::MetricsPlan { listen, linger_ms });
    }
    Ok(plan)
}

/// Serves the metrics and the status page when the job asks, and says where.
fn start_live(
    plan: &braid::config::Plan,
) -> anyhow::Result<Option<std::sync::Arc<braid::live::Live>>> {
    let Some(metrics) = &plan.metrics else {
        return Ok(None);
    };
    let live = braid::live::Live::start(plan, metrics)?;
    eprintln!(
        "braid: status page at http://{0}/, metrics at http://{0}/metrics",
        live.addr
    );
    Ok(Some(live))
}

/// After a bounded run, keeps the metrics up for `[metrics] linger`, so that a last
/// scrape sees the final counts; a signal ends the wait.
fn linger(plan: &braid::config::Plan, live: Option<&braid::live::Live>) {
    let (Some(m), Some(_)) = (&plan.metrics, live) else {
        return;
    };
    let until = std::time::Instant::now() + std::time::Duration::from_millis(m.linger_ms);
    while std::time::Instant::now() < until && !braid::signals::stop_requested() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let usage = |e: String| UsageError(e);
    let disorder = parse_duration_ms(&args.max_out_of_orderness)
        .map_err(|e| usage(format!("--max-out-of-orderness: {e}")))?;
    let start_ms = braid_io::parse_rfc3339_ms(&args.start).map_err(|e| {
        usage(format!(
            "--start: `{}` is not an RFC 3339 time ({e}), e.g. 2023-11-14T22:13:20Z",
            args.start
        ))
    })?;
    for (flag, rate) in [
        ("--play-rate", args.play_rate),
        ("--duplicate-rate", args.duplicate_rate),
        ("--malformed-rate", args.malformed_rate),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            return Err(usage(format!("{flag}: {rate} is not a share between 0 and 1")).into());
        }
    }
    if args.profiles == 0
        || args.titles == 0
        || args.impressions_per_s == 0
        || args.lines_per_file == 0
        || disorder < 0
    {
        return Err(usage("--profiles, --titles, --impressions-per-s and --lines-per-file must be positive, --max-out-of-orderness not negative".into()).into());
    }
    let config = braid_io::takerate::TakeRateConfig {
        events: args.events,
        seed: args.seed,
        profiles: args.profiles,
        titles: args.titles,
        impressions_per_s: args.impressions_per_s,
        play_rate: args.play_rate,
        duplicate_rate: args.duplicate_rate,
        malformed_rate: args.malformed_rate,
        max_out_of_orderness_ms: disorder,
        start_ms,
        ..Default::default()
    };
    let (job, counts) = braid::demo::write_take_rate(
        &args.out,
        &config,
        args.lines_per_file,
        "take-rate",
        braid::demo::DEMO_MEMORY_MAX_BYTES,
    )?;
    println!(
        "wrote {} impression and {} play lines under {}; run them with: braid run {}",
        counts.impressions,
        counts.plays,
        args.out.join("data").display(),
        job.display()
    );
    Ok(())
}

fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    if args.live_rate == 0 && args.live_seconds > 0 {
        return Err(
            UsageError("--live-rate: must be positive (or --live-seconds 0)".into()).into(),
        );
    }
    let memory_max = args.memory_max.as_deref().unwrap_or(match args.workload {
        Workload::Kafka | Workload::Instances => "2GiB",
        _ => "128MiB",
    });
    let memory_max_bytes =
        parse_size_bytes(memory_max).map_err(|e| UsageError(format!("--memory-max: {e}")))?;
    let cold_probes = braid::config::parse_cold_probes(&args.cold_probes).ok_or_else(|| {
        UsageError(format!(
            "--cold-probes: `{}` is neither deferred nor eager",
            args.cold_probes
        ))
    })?;
    let options = BenchOptions {
        events: args.events,
        memory_max_bytes,
        cold_probes,
        parallelism: args
            .parallelism
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from)),
        state_dir: args.dir.join("state"),
        checkpoint_interval_ms: args
            .checkpoint_interval
            .as_deref()
            .map(|i| {
                parse_duration_ms(i).map_err(|e| UsageError(format!("--checkpoint-interval: {e}")))
            })
            .transpose()?,
        checkpoint_store: args.checkpoint_store.clone(),
        metrics: args.metrics.clone(),
    };
    let line = match args.workload {
        Workload::FlinkPeer => braid::bench::flink_peer(&options)?,
        Workload::Files => braid::bench::files(&options, &args.dir.join("files"))?,
        Workload::Kafka | Workload::Instances => {
            let kafka = KafkaBenchOptions {
                brokers: args.brokers.clone().ok_or_else(|| {
                    UsageError(
                        "--brokers: the kafka and instances workloads need a broker, e.g. 127.0.0.1:9092"
                            .into(),
                    )
                })?,
                events: args.events,
                parallelism: options.parallelism,
                memory_max_bytes,
                checkpoint_interval_ms: options.checkpoint_interval_ms.unwrap_or(10_000),
                dir: std::path::absolute(args.dir.join("kafka"))?,
                live_rate: args.live_rate,
                live_seconds: args.live_seconds,
                impressions_per_s: args.impressions_per_s,
            };
            match args.workload {
                Workload::Instances => braid::instances_bench::instances(
                    &kafka,
                    args.checkpoint_store.as_deref(),
                    args.fill_rate,
                )?,
                _ => braid::kafka_bench::kafka(&kafka)?,
            }
        }
    };
    println!("{line}");
    if line["correct"] == serde_json::Value::Bool(false) {
        anyhow::bail!(
            "the result count is wrong: {} results, {} expected",
            line["results"],
            line["expected"]
        );
    }
    Ok(())
}
