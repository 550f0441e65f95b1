//! `braid run JOB --instance NAME`: one of several processes sharing a job (SPEC §6).
//!
//! Kafka's consumer group is the whole of the coordination. A membership consumer,
//! subscribed to both topics as the static member `NAME` with the `range` assignor
//! (which gives partition p of equally partitioned topics to one member), fetches
//! nothing: it only learns the partitions this process owns. The job runs in
//! **generations**, one per assignment: a generation restores each owned partition
//! from the checkpoint its committed offsets name (this instance's or the previous
//! owner's, in the shared store) and runs the join over those partitions. When the
//! group revokes them, the rebalance callback ends the generation and waits until its
//! final checkpoint has committed output and offsets (the Kafka transaction); only
//! then does the group go on, so a new owner never reads a partition before its last
//! owner's commit. Rebalances are eager (`range`): every member gives up everything
//! and takes its new share, as Kafka Streams did before cooperative rebalancing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::{Input, Plan};
use crate::driver::{run, RunOptions};
use crate::kafka::client_config;
use crate::kafka::output::Fenced;
use crate::summary::Summary;

/// How long the membership thread waits in one poll (rebalance callbacks run in it).
const MEMBERSHIP_POLL: Duration = Duration::from_millis(100);
/// How long a member may take to commit its partitions when the group revokes them:
/// `max.poll.interval.ms`, which librdkafka sends as the rebalance timeout (the group
/// waits that long for every member to rejoin). Kafka's default is 300 s; a revoking
/// instance commits only what changed since its last checkpoint, and on noida-db a
/// join now and then goes unanswered until this timeout (README). The job's
/// `[source.properties]` may set another.
const REVOKE_COMMIT_MAX_MS: &str = "30000";
/// How long a leaving instance waits for the group to take its leave.
const LEAVE_WAIT: Duration = Duration::from_secs(5);
/// How long a leaving instance that is still joining waits for the group's answer:
/// a member that leaves before it has an assignment sends no LeaveGroup, and the
/// group keeps it (noida-db never expires it; Kafka after `session.timeout.ms`).
const JOIN_WAIT_ON_LEAVE: Duration = Duration::from_secs(60);
/// How many times a generation fenced by another process of this name starts again
/// while the group still names this process its member (the other was a zombie, or
/// fenced in turn by this process's two producers initialising after its own).
const FENCED_RESTARTS_MAX: u32 = 3;
/// How long a fenced generation waits before it asks whether the group fenced it too.
const FENCED_RESTART_PAUSE: Duration = Duration::from_secs(2);
/// A join the group has not answered within this many rebalance timeouts is sent
/// again (unsubscribe, subscribe). A coordinator answers every join within one
/// rebalance timeout; noida-db now and then answers none when a member leaves in the
/// middle of a rebalance, and the group then waits for ever (README).
const REJOIN_AFTER_REBALANCE_TIMEOUTS: u32 = 2;

/// What the rebalance callbacks and the generations share.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Tells the running generation that its partitions are revoked.
    revoked: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    /// The partitions last assigned, not yet taken by a generation, and this member
    /// of the group in the generation that assigned them.
    assigned: Option<(Vec<u32>, Option<Arc<ConsumerGroupMetadata>>)>,
    /// A generation is running on an assignment.
    running: bool,
    /// The group has answered this member's join with an assignment.
    joined: bool,
    /// The membership consumer has left the group (or failed).
    closed: bool,
    /// The group has fenced this member: another process joined with its name.
    fenced: bool,
    /// Since when this member has been waiting for the group's answer to its join
    /// (from the subscription, and from each revocation); `None` once assigned.
    waiting_since: Option<Instant>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct MembershipContext {
    shared: Arc<Shared>,
}

impl ClientContext for MembershipContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            tracing::warn!(target: "librdkafka", "membership: {fac}: {message}");
        } else {
            // librdkafka's own debug lines (`BRAID_MEMBERSHIP_DEBUG=cgrp`).
            tracing::info!(target: "librdkafka", "membership: {fac}: {message}");
        }
    }
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", "membership: {error}: {reason}");
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::FencedInstanceId) {
            self.shared.lock().fenced = true;
        }
    }
}

impl ConsumerContext for MembershipContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let started = Instant::now();
            let mut state = self.shared.lock();
            state.assigned = None;
            if state.running {
                tracing::info!(
                    partitions = list.count(),
                    "the group revokes this instance's partitions"
                );
                self.shared.revoked.store(true, Ordering::Release);
                while state.running {
                    state = self
                        .shared
                        .changed
                        .wait(state)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                tracing::info!(
                    commit_ms = started.elapsed().as_millis() as u64,
                    "revoked partitions committed; the group may hand them over"
                );
            }
            state.waiting_since = Some(Instant::now());
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            // It fetches nothing: the generation's own consumers read.
            if let Err(e) = consumer.pause(list) {
                tracing::warn!("membership: cannot pause the assigned partitions: {e}");
            }
            let mut partitions: Vec<u32> = list
                .elements()
                .iter()
                .map(|e| e.partition() as u32)
                .collect();
            partitions.sort_unstable();
            partitions.dedup();
            tracing::info!(?partitions, "the group assigns partitions");
            let member = consumer.group_metadata().map(Arc::new);
            let mut state = self.shared.lock();
            state.assigned = Some((partitions, member));
            state.joined = true;
            state.waiting_since = None;
            drop(state);
            self.shared.changed.notify_all();
        }
    }
}

/// This process's membership of the job's group, polled on a thread of its own.
struct Membership {
    shared: Arc<Shared>,
    leave: Arc<AtomicBool>,
    /// With `leave`: stop without leaving the group.
    abandon: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Membership {
    fn join(plan: &Plan, instance: &str) -> anyhow::Result<Membership> {
        let k = plan
            .kafka_group()
            .context("an instance reads Kafka sources")?;
        let topics: Vec<String> = plan
            .sources
            .iter()
            .filter_map(|s| match &s.input {
                Input::Kafka(k) => Some(k.topic.clone()),
                _ => None,
            })
            .collect();
        let shared = Arc::new(Shared::default());
        let mut config = client_config(
            &k.brokers,
            &[
                ("enable.auto.commit", "false"),
                ("partition.assignment.strategy", "range"),
                ("session.timeout.ms", "10000"),
                ("heartbeat.interval.ms", "1000"),
                ("max.poll.interval.ms", REVOKE_COMMIT_MAX_MS),
            ],
            &k.properties,
        );
        config
            .set("group.id", &k.group)
            .set("group.instance.id", instance);
        // librdkafka's debug contexts for the membership consumer, e.g. `cgrp`.
        if let Ok(debug) = std::env::var("BRAID_MEMBERSHIP_DEBUG") {
            config.set("debug", debug);
            config.set_log_level(RDKafkaLogLevel::Debug);
        }
        let consumer: BaseConsumer<MembershipContext> = config
            .create_with_context(MembershipContext {
                shared: Arc::clone(&shared),
            })
            .with_context(|| format!("cannot create the membership consumer for {}", k.brokers))?;
        let rebalance_timeout = config
            .get("max.poll.interval.ms")
            .and_then(|ms| ms.parse().ok())
            .map_or(Duration::from_secs(30), Duration::from_millis);
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .with_context(|| format!("cannot join group `{}` at {}", k.group, k.brokers))?;
        shared.lock().waiting_since = Some(Instant::now());
        let rejoin = Rejoin {
            topics: topics.clone(),
            after: rebalance_timeout * REJOIN_AFTER_REBALANCE_TIMEOUTS,
        };
        let leave = Arc::new(AtomicBool::new(false));
        let abandon = Arc::new(AtomicBool::new(false));
        let thread = {
            let (shared, leave, abandon) = (
                Arc::clone(&shared),
                Arc::clone(&leave),
                Arc::clone(&abandon),
            );
            std::thread::Builder::new()
                .name("braid-membership".into())
                .spawn(move || membership_loop(&consumer, &shared, &rejoin, &leave, &abandon))?
        };
        Ok(Membership {
            shared,
            leave,
            abandon,
            thread: Some(thread),
        })
    }

    /// Waits for the next assignment (`None`: stop requested, or the membership
    /// ended) and marks a generation running on it.
    fn next_assignment(&self) -> Option<(Vec<u32>, Option<Arc<ConsumerGroupMetadata>>)> {
        let mut state = self.shared.lock();
        loop {
            if crate::signals::stop_requested() || state.closed {
                return None;
            }
            if let Some(owned) = state.assigned.take() {
                state.running = true;
                self.shared.revoked.store(false, Ordering::Release);
                return Some(owned);
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, MEMBERSHIP_POLL)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// The generation has ended (its partitions committed): a revocation may go on.
    fn generation_ended(&self) {
        self.shared.lock().running = false;
        self.shared.changed.notify_all();
    }

    /// Leaves the group (so that the others take this instance's partitions at once)
    /// and stops the membership thread.
    fn leave(mut self) -> anyhow::Result<()> {
        self.leave.store(true, Ordering::Release);
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => anyhow::bail!("the membership thread panicked"),
            None => Ok(()),
        }
    }

    /// Stops polling without leaving the group.
    fn abandon(mut self) {
        self.abandon.store(true, Ordering::Release);
        self.leave.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.leave.store(true, Ordering::Release);
    }
}

/// Polls the membership consumer (the rebalance callbacks run here) until told to
/// leave; then, once the group has answered its join, unsubscribes, which (unlike
/// closing) makes even a static member leave the group, so that its partitions go to
/// the others without waiting for it.
fn membership_loop(
    consumer: &BaseConsumer<MembershipContext>,
    shared: &Shared,
    rejoin: &Rejoin,
    leave: &AtomicBool,
    abandon: &AtomicBool,
) -> anyhow::Result<()> {
    while !leave.load(Ordering::Acquire) {
        if let Some(Err(e)) = consumer.poll(MEMBERSHIP_POLL) {
            tracing::debug!("membership: {e}");
        }
        rejoin.if_unanswered(consumer, shared)?;
    }
    if abandon.load(Ordering::Acquire) {
        return Ok(());
    }
    let deadline = Instant::now() + JOIN_WAIT_ON_LEAVE;
    while !shared.lock().joined && Instant::now() < deadline {
        let _ = consumer.poll(MEMBERSHIP_POLL);
        rejoin.if_unanswered(consumer, shared)?;
    }
    consumer.unsubscribe();
    let deadline = Instant::now() + LEAVE_WAIT;
    while Instant::now() < deadline && !consumer.assignment().is_ok_and(|a| a.count() == 0) {
        let _ = consumer.poll(MEMBERSHIP_POLL);
    }
    // A moment for the LeaveGroup request to go out.
    for _ in 0..5 {
        let _ = consumer.poll(MEMBERSHIP_POLL);
    }
    shared.lock().closed = true;
    shared.changed.notify_all();
    Ok(())
}

/// Sends a join again when the group has left it unanswered too long.
struct Rejoin {
    topics: Vec<String>,
    after: Duration,
}

impl Rejoin {
    /// Unsubscribes (for a static member that is a LeaveGroup) and subscribes again (a
    /// new JoinGroup of the same static member) when this member has waited `after`
    /// for an answer, no generation running.
    fn if_unanswered(
        &self,
        consumer: &BaseConsumer<MembershipContext>,
        shared: &Shared,
    ) -> anyhow::Result<()> {
        let waited = {
            let state = shared.lock();
            match state.waiting_since {
                Some(since) if !state.running && state.assigned.is_none() => since.elapsed(),
                _ => return Ok(()),
            }
        };
        if waited < self.after {
            return Ok(());
        }
        tracing::warn!(
            waited_s = waited.as_secs(),
            "the group has not answered this instance's join; joining again"
        );
        consumer.unsubscribe();
        let names: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .context("cannot join the job's group again")?;
        shared.lock().waiting_since = Some(Instant::now());
        Ok(())
    }
}

/// Whether an error is this process being fenced by another of its name.
fn is_fenced(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Fenced>())
}

/// Locks the instance's local state folder for this process: a second process of
/// the same name on this machine would share (and wreck) it.
fn lock_state(plan: &Plan, instance: &str) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(&plan.state_dir)
        .with_context(|| format!("cannot create {}", plan.state_dir.display()))?;
    let path = plan.state_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "instance `{instance}` already runs on this machine ({} is locked by another process); give each instance its own --instance name",
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Runs instance `plan.instance` of a shared job: one generation per assignment,
/// until every partition it owns has ended (bounded inputs) or a stop is requested.
/// Returns the last generation's summary (`None` if it never owned a partition).
pub fn run_instance(
    plan: &Plan,
    progress: bool,
    live: Option<Arc<crate::live::Live>>,
) -> anyhow::Result<Option<Summary>> {
    let instance = plan.instance.as_deref().context("an instance has a name")?;
    let bounded = plan.sources.iter().all(|s| match &s.input {
        Input::Kafka(k) => k.end.is_some(),
        _ => true,
    });
    let _lock = lock_state(plan, instance)?;
    let membership = Membership::join(plan, instance)?;
    tracing::info!(instance, "joined the job's group; waiting for partitions");
    let mut last = None;
    let mut fenced_restarts = 0;
    // A generation fenced while this process is still the group's member runs again.
    let mut again = None;
    let outcome = loop {
        let Some((owned, member)) = again.take().or_else(|| membership.next_assignment()) else {
            break Ok(());
        };
        if owned.is_empty() {
            membership.generation_ended();
            if bounded {
                tracing::info!("no partitions assigned: nothing to do");
                break Ok(());
            }
            continue;
        }
        let options = RunOptions {
            progress,
            reset: false,
            owned: Some(Arc::new(owned.clone())),
            revoked: Some(Arc::clone(&membership.shared.revoked)),
            member: member.clone(),
            live: live.clone(),
        };
        let result = run(plan, &options);
        let summary = match result {
            Ok(summary) => summary,
            Err(e) if is_fenced(&e) && fenced_restarts < FENCED_RESTARTS_MAX => {
                // Give the group a moment to fence whichever process it does not name.
                std::thread::sleep(FENCED_RESTART_PAUSE);
                let state = membership.shared.lock();
                if state.fenced || state.closed || membership.shared.revoked.load(Ordering::Acquire)
                {
                    drop(state);
                    membership.generation_ended();
                    break Err(e);
                }
                drop(state);
                fenced_restarts += 1;
                tracing::warn!(
                    restart = fenced_restarts,
                    "fenced by another process of this instance's name, but the group still names this process its member: starting the generation again (the restore reads the latest commit)"
                );
                again = Some((owned, member));
                continue;
            }
            Err(e) => {
                membership.generation_ended();
                break Err(e);
            }
        };
        membership.generation_ended();
        let revoked = membership.shared.revoked.load(Ordering::Acquire);
        let stopped = crate::signals::stop_requested();
        last = Some(summary);
        if stopped || !revoked {
            break Ok(());
        }
    };
    // Leaving also on an error: the others take the partitions over from their last
    // committed checkpoint. Not when fenced: the member of this name is now the
    // process that fenced this one, and a LeaveGroup would take it out of the group.
    let fenced = outcome.as_ref().err().is_some_and(is_fenced);
    let left = if fenced {
        tracing::warn!(
            "fenced by another process of this instance's name: not leaving the group for it"
        );
        membership.abandon();
        Ok(())
    } else {
        membership.leave()
    };
    outcome?;
    left?;
    Ok(last)
}
