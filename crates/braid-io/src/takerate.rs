//! A realistic, deterministic take-rate data set: impressions (titles shown to members
//! on homepage rows) and the plays they led to.
//!
//! Members are uniform, titles are Zipf-popular; about one impression in eight is
//! played, after a delay from seconds to hours (log-uniform, so about an eighth fall
//! outside a one-hour window); some plays are rewatches, some have no impression at all
//! (organic); events carry up to `max_out_of_orderness_ms` of disorder; a few are
//! duplicated and a few lines are malformed. Impressions carry epoch milliseconds, plays
//! RFC 3339 strings, as two services would. The same seed always gives the same lines.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Write;

use crate::format_rfc3339_ms;

/// Which stream a line belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stream {
    Impressions,
    Plays,
}

impl Stream {
    pub fn name(self) -> &'static str {
        match self {
            Stream::Impressions => "impressions",
            Stream::Plays => "plays",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TakeRateConfig {
    /// Lines to produce, of both streams, duplicates and malformed lines included.
    pub events: u64,
    pub seed: u64,
    pub profiles: u64,
    pub titles: u64,
    /// Impressions per second of event time.
    pub impressions_per_s: u64,
    pub play_rate: f64,
    pub rewatch_rate: f64,
    /// Plays no impression led to, per impression.
    pub organic_rate: f64,
    pub duplicate_rate: f64,
    pub malformed_rate: f64,
    pub max_out_of_orderness_ms: i64,
    pub start_ms: i64,
}

impl Default for TakeRateConfig {
    fn default() -> TakeRateConfig {
        TakeRateConfig {
            events: 1_000_000,
            seed: 1,
            profiles: 100_000,
            titles: 8_000,
            impressions_per_s: 500,
            play_rate: 0.12,
            rewatch_rate: 0.1,
            organic_rate: 0.02,
            duplicate_rate: 0.01,
            malformed_rate: 0.0005,
            max_out_of_orderness_ms: 5_000,
            start_ms: 1_700_000_000_000,
        }
    }
}

/// Play delays are log-uniform between these bounds.
const PLAY_DELAY_MS_MIN: f64 = 2_000.0;
const PLAY_DELAY_MS_MAX: f64 = 3.0 * 3_600_000.0;
const ZIPF_EXPONENT: f64 = 1.0;

/// A small, fast, deterministic random number generator (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        crate::flink_peer::mix64(self.0)
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// A play waiting for its time: (play time, sequence number, profile, title).
type PendingPlay = Reverse<(i64, u64, u64, u64)>;

/// The generator: an iterator of (stream, line) in arrival order.
pub struct TakeRate {
    config: TakeRateConfig,
    rng: Rng,
    title_cdf: Vec<f64>,
    impressions: u64,
    plays: u64,
    emitted: u64,
    pending: BinaryHeap<PendingPlay>,
    repeat: Option<(Stream, Vec<u8>)>,
}

impl TakeRate {
    pub fn new(config: TakeRateConfig) -> TakeRate {
        let mut total = 0.0;
        let mut title_cdf: Vec<f64> = (1..=config.titles.max(1))
            .map(|rank| {
                total += 1.0 / (rank as f64).powf(ZIPF_EXPONENT);
                total
            })
            .collect();
        for c in &mut title_cdf {
            *c /= total;
        }
        TakeRate {
            rng: Rng::new(config.seed ^ 0x5EED),
            config,
            title_cdf,
            impressions: 0,
            plays: 0,
            emitted: 0,
            pending: BinaryHeap::new(),
            repeat: None,
        }
    }

    fn title(&mut self) -> u64 {
        let x = self.rng.unit();
        self.title_cdf.partition_point(|&c| c < x) as u64 + 1
    }

    fn jitter(&mut self) -> i64 {
        self.rng
            .below(self.config.max_out_of_orderness_ms.max(0) as u64 + 1) as i64
    }

    /// The event time the generator has reached: the latest impression's, before its
    /// disorder (a paced source releases lines once the wall clock passes it).
    pub fn clock_ms(&self) -> i64 {
        self.impression_time()
    }

    fn impression_time(&self) -> i64 {
        self.config.start_ms
            + (self.impressions as i64 * 1_000) / self.config.impressions_per_s.max(1) as i64
    }

    fn schedule_play(&mut self, at_ms: i64, profile: u64, title: u64) {
        self.plays += 1;
        self.pending
            .push(Reverse((at_ms, self.plays, profile, title)));
    }

    fn delay_ms(&mut self) -> i64 {
        let (lo, hi) = (PLAY_DELAY_MS_MIN.ln(), PLAY_DELAY_MS_MAX.ln());
        (lo + self.rng.unit() * (hi - lo)).exp() as i64
    }

    /// The next impression or play, whichever comes first in event time.
    fn next_event(&mut self) -> (Stream, Vec<u8>) {
        let now = self.impression_time();
        if let Some(&Reverse((at, seq, profile, title))) = self.pending.peek() {
            if at <= now {
                self.pending.pop();
                let ts = format_rfc3339_ms(at - self.jitter());
                let duration = 60 + self.rng.below(7_200);
                let device = DEVICES[self.rng.below(DEVICES.len() as u64) as usize];
                let line = format!(
                    r#"{{"event_id":"play-{}-{seq}","profile_id":{profile},"title_id":{title},"ts":"{ts}","duration_s":{duration},"device":"{device}"}}"#,
                    self.config.seed,
                );
                return (Stream::Plays, line.into_bytes());
            }
        }
        self.impressions += 1;
        let profile = self.rng.below(self.config.profiles) + 1;
        let title = self.title();
        if self.rng.chance(self.config.play_rate) {
            let at = now + self.delay_ms();
            self.schedule_play(at, profile, title);
            if self.rng.chance(self.config.rewatch_rate) {
                let again = at + self.delay_ms();
                self.schedule_play(again, profile, title);
            }
        }
        if self.rng.chance(self.config.organic_rate) {
            let (p, t) = (self.rng.below(self.config.profiles) + 1, self.title());
            let at = now + self.rng.below(1_000) as i64;
            self.schedule_play(at, p, t);
        }
        let (ts, row, rank) = (now - self.jitter(), self.rng.below(40), self.rng.below(75));
        let device = DEVICES[self.rng.below(DEVICES.len() as u64) as usize];
        let line = format!(
            r#"{{"event_id":"imp-{}-{}","profile_id":{profile},"title_id":{title},"ts":{ts},"row":{row},"rank":{rank},"page":"home","device":"{device}"}}"#,
            self.config.seed, self.impressions,
        );
        (Stream::Impressions, line.into_bytes())
    }

    /// A broken line of one of the kinds braid must dead-letter.
    fn malformed(&mut self, good: &[u8]) -> Vec<u8> {
        const KINDS: u64 = 8;
        let fixed: &[u8] = match self.rng.below(KINDS) {
            0 => return good[..good.len() / 2].to_vec(),
            1 => b"[1,2,3]",
            2 => b"{\"event_id\":\"bad-\xff\xfe\",\"profile_id\":1,\"title_id\":2,\"ts\":1700000000000}",
            3 => br#"{"event_id":"bad-missing","title_id":2,"ts":1700000000000}"#,
            4 => br#"{"event_id":"bad-object","profile_id":{"id":1},"title_id":2,"ts":1700000000000}"#,
            5 => br#"{"event_id":"bad-float","profile_id":1.5,"title_id":2,"ts":1700000000000}"#,
            6 => br#"{"event_id":"bad-null","profile_id":null,"title_id":2,"ts":1700000000000}"#,
            _ => br#"{"event_id":"bad-time","profile_id":1,"title_id":2,"ts":"next tuesday"}"#,
        };
        fixed.to_vec()
    }
}

const DEVICES: [&str; 4] = ["tv", "mobile", "web", "tablet"];

impl Iterator for TakeRate {
    type Item = (Stream, Vec<u8>);

    fn next(&mut self) -> Option<(Stream, Vec<u8>)> {
        if self.emitted >= self.config.events {
            return None;
        }
        self.emitted += 1;
        if let Some(repeat) = self.repeat.take() {
            return Some(repeat);
        }
        let (stream, line) = self.next_event();
        if self.rng.chance(self.config.malformed_rate) {
            let bad = self.malformed(&line);
            return Some((stream, bad));
        }
        if self.rng.chance(self.config.duplicate_rate) {
            self.repeat = Some((stream, line.clone()));
        }
        Some((stream, line))
    }
}

/// Counts of a written data set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatasetCounts {
    pub impressions: u64,
    pub plays: u64,
}

/// Writes the data set as `DIR/impressions/part-NNNN.ndjson` and `DIR/plays/...`,
/// about `lines_per_file` lines a file.
pub fn write_dataset(
    dir: &std::path::Path,
    config: &TakeRateConfig,
    lines_per_file: u64,
) -> std::io::Result<DatasetCounts> {
    let mut counts = DatasetCounts::default();
    let mut writers: [Option<(std::io::BufWriter<std::fs::File>, u64, u64)>; 2] = [None, None];
    for (stream, line) in TakeRate::new(config.clone()) {
        let i = stream as usize;
        let folder = dir.join(stream.name());
        let needs_new = writers[i].as_ref().is_none_or(|w| w.1 >= lines_per_file);
        if needs_new {
            let number = writers[i].take().map_or(0, |(mut w, _, n)| {
                let _ = w.flush();
                n + 1
            });
            std::fs::create_dir_all(&folder)?;
            let file = std::fs::File::create(folder.join(format!("part-{number:04}.ndjson")))?;
            writers[i] = Some((std::io::BufWriter::with_capacity(1 << 20, file), 0, number));
        }
        let (w, lines, _) = writers[i].as_mut().expect("opened above");
        w.write_all(&line)?;
        w.write_all(b"\n")?;
        *lines += 1;
        match stream {
            Stream::Impressions => counts.impressions += 1,
            Stream::Plays => counts.plays += 1,
        }
    }
    for (mut w, _, _) in writers.into_iter().flatten() {
        w.flush()?;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_for_a_seed_and_different_across_seeds() {
        let config = TakeRateConfig {
            events: 2_000,
            ..TakeRateConfig::default()
        };
        let a: Vec<_> = TakeRate::new(config.clone()).collect();
        let b: Vec<_> = TakeRate::new(config.clone()).collect();
        let c: Vec<_> = TakeRate::new(TakeRateConfig { seed: 2, ..config }).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 2_000);
        assert!(a.iter().any(|(s, _)| *s == Stream::Plays));
    }
}
