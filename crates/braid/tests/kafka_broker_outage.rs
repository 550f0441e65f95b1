//! Broker outages under a Kafka job, on the real binary and a real broker (noida-db,
//! started by the test). The broker is stopped (SIGTERM: a SIGKILLed noida-db forgets
//! its last second, see `common::kafka::Broker::stop`), and two seconds later
//! restarted on the same port and data. Through it braid must either carry on, or stop
//! with exit 1 and a message naming the broker; a next run then carries on.
//!
//! - `a_broker_restart_while_live_loses_and_doubles_nothing`: an unbounded job has read
//!   and committed all there was when the broker goes; more input follows the restart.
//!   The output over everything must equal the reference exactly
//!   (`check::check_exact`).
//! - `a_broker_restart_mid_run_corrupts_nothing`: a bounded job, the broker stopped a
//!   second into it, while records flow. Here only safety is asserted (no row the
//!   reference does not expect, none twice): noida-db aborts at its restart the
//!   transactions open then, yet lets their producer go on and commit them, so what was
//!   written before the restart is lost although the commit succeeded (measured; a
//!   Kafka broker keeps open transactions across a restart). No client can be complete
//!   over that; what is missing is printed.
//!
//! The seed is printed; `BRAID_SEED=N` replays one.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::generate;
use common::kafka::check::{check_safe, flush_events, max_time, read_outputs, Input};
use common::kafka::run::{complete_and_stop, wait_until, BraidRun, KafkaJob, OUTPUT_TIMEOUT};
use common::kafka::{create_job_topics, exclusive, Broker, OffsetWatch, OUT, OUT_DEAD, OUT_LATE};

/// Events of the live scenario.
const EVENTS: u64 = 20_000;
/// Events of the bounded scenario: enough that the run lasts seconds (the job's state
/// spills at 1 MiB), so that the outage can come while records flow (20,000 were all
/// read and written before the test saw any output; since spills go to braid's own
/// segment files, 60,000 were too).
const EVENTS_MID_RUN: u64 = 200_000;
const OUTAGE: Duration = Duration::from_secs(2);
/// How long a run may take, outage included (librdkafka retries for a while).
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// A data set, a fresh broker with the job's topics, and the job (bounded or not).
fn setup(dir: &Path, bounded: bool) -> (Input, Broker, std::path::PathBuf) {
    let seed = common::seed();
    eprintln!("seed {seed} (replay with BRAID_SEED={seed})");
    generate(dir, if bounded { EVENTS_MID_RUN } else { EVENTS }, seed);
    let input = Input::generated(dir);
    let broker = Broker::start();
    create_job_topics(&broker.bootstrap());
    let mut job = KafkaJob::new(&broker.bootstrap());
    if !bounded {
        job.end = None;
    }
    // noida-db can lose commits made after its restart (see the module's doc), so that
    // Kafka's committed epoch falls behind the last few checkpoints braid keeps; a
    // Kafka broker never does. Keep them all, so that the next run finds the one
    // Kafka names (seen once: "Kafka says this job committed epoch 1, but ... its
    // checkpoints: [9, 8, 7, 6]").
    job.checkpoint_keep = Some(1_000);
    let job = job.write(dir);
    (input, broker, job)
}

/// Checks how a run that saw an outage ended: on with `None` (still running, for a
/// live job) or exit 0, or exit 1 naming the broker. Returns whether it must be run
/// again.
fn stopped_for_the_outage(
    run: &BraidRun,
    status: Option<std::process::ExitStatus>,
    bootstrap: &str,
) -> bool {
    let stderr = run.stderr();
    match status {
        None => false,
        Some(s) if s.success() => false,
        Some(s) if s.code() == Some(1) => {
            assert!(
                stderr.contains(bootstrap),
                "braid stopped (exit 1) without naming the broker {bootstrap}:\n{stderr}"
            );
            eprintln!(
                "braid stopped for the outage: {}",
                stderr.lines().last().unwrap_or("")
            );
            true
        }
        Some(s) => panic!(
            "through a broker outage braid must go on or exit 1; it ended with {s}:\n{stderr}"
        ),
    }
}

/// The output topics' records are all committed (no transaction holds any) and stay
/// so for a second: braid has nothing in flight.
fn quiet(bootstrap: &str) -> Result<(), String> {
    let watches: Vec<OffsetWatch> = [OUT, OUT_LATE, OUT_DEAD]
        .iter()
        .map(|t| OffsetWatch::new(bootstrap, t))
        .collect();
    let ends = || watches.iter().map(OffsetWatch::ends).collect::<Vec<_>>();
    let before = ends();
    std::thread::sleep(Duration::from_secs(1));
    let after = ends();
    if before == after && after.iter().all(|(high, stable)| high == stable) {
        Ok(())
    } else {
        Err(format!("output still moving: {before:?} then {after:?}"))
    }
}

#[test]
fn a_broker_restart_while_live_loses_and_doubles_nothing() {
    let _serial = exclusive();
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut input, mut broker, job) = setup(dir.path(), false);
    let bootstrap = broker.bootstrap();
    let half = Input {
        impressions: input.impressions[..input.impressions.len() / 2].to_vec(),
        plays: input.plays[..input.plays.len() / 2].to_vec(),
    };
    let rest = Input {
        impressions: input.impressions[half.impressions.len()..].to_vec(),
        plays: input.plays[half.plays.len()..].to_vec(),
    };
    half.produce(&bootstrap);
    let mut run = BraidRun::start(&job, None, &dir.path().join("run-1.log"));
    let answer = wait_until(OUTPUT_TIMEOUT, || {
        if !common::kafka::read_committed(&bootstrap, OUT).is_empty() {
            quiet(&bootstrap)
        } else {
            Err("no output yet".to_string())
        }
    });
    answer.unwrap_or_else(|e| panic!("braid did not settle: {e}\n{}", run.stderr()));
    let stopped = Instant::now();
    broker.stop();
    std::thread::sleep(OUTAGE);
    broker.restart();
    eprintln!("outage: {:.1} s", stopped.elapsed().as_secs_f64());
    let flush = flush_events(max_time(&input));
    rest.produce(&bootstrap);
    flush.produce(&bootstrap);
    input.extend(flush);
    let status = run.try_wait();
    if stopped_for_the_outage(&run, status, &bootstrap) {
        run = BraidRun::start(&job, None, &dir.path().join("run-2.log"));
    }
    complete_and_stop(&bootstrap, &input, &mut run, "after the outage");
}

#[test]
fn a_broker_restart_mid_run_corrupts_nothing() {
    let _serial = exclusive();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, mut broker, job) = setup(dir.path(), true);
    let bootstrap = broker.bootstrap();
    input.produce(&bootstrap);
    let watch = OffsetWatch::new(&bootstrap, OUT);
    let mut run = BraidRun::start(&job, None, &dir.path().join("run-1.log"));
    // The outage comes once records flow, so that it hits transactions in flight.
    let flowing = wait_until(OUTPUT_TIMEOUT, || match run.try_wait() {
        Some(status) => panic!(
            "braid ended ({status}) before the outage:\n{}",
            run.stderr()
        ),
        None if watch.ends().0 > 0 => Ok(()),
        None => Err("no output yet".to_string()),
    });
    flowing.unwrap_or_else(|e| panic!("{e}:\n{}", run.stderr()));
    broker.stop();
    std::thread::sleep(OUTAGE);
    broker.restart();
    let status = run.wait_for(RUN_TIMEOUT);
    assert!(
        status.is_some(),
        "braid still runs {RUN_TIMEOUT:?} after the outage:\n{}",
        run.stderr()
    );
    if stopped_for_the_outage(&run, status, &bootstrap) {
        let mut again = BraidRun::start(&job, None, &dir.path().join("run-2.log"));
        let status = again.wait_for(RUN_TIMEOUT);
        assert!(
            status.is_some_and(|s| s.success()),
            "the run after the outage ended with {status:?} (None: still running):\n{}",
            again.stderr()
        );
    }
    match check_safe(&input, &read_outputs(&bootstrap)) {
        Ok(0) => eprintln!("after the outage: output exact"),
        Ok(missing) => eprintln!(
            "after the outage: {missing} expected rows missing (what noida-db dropped of the \
             transactions open at its restart), nothing wrong or twice"
        ),
        Err(e) => panic!("after the outage: {e}"),
    }
}
