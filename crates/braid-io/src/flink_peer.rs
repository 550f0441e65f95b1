//! The workload of `shared/peers/flink` (its README, "Workload spec"), reproduced
//! exactly so that braid and Flink are measured on the same events.
//!
//! Events `n = 0 .. N-1`: 18 % plays, 82 % impressions; event time rises by
//! `1000 / R` ms per event with up to 5 s of disorder; every impression has its own key
//! (profile_id, title_id); a play targets an impression up to about an hour back, or
//! none ("organic"). The join is `p.ts BETWEEN i.ts AND i.ts + 1 h`.

pub const T0_MS: i64 = 1_700_000_000_000;
pub const WINDOW_MS: i64 = 3_600_000;
pub const MAX_OUT_OF_ORDERNESS_MS: i64 = 5_000;
/// Events per event-time second.
pub const EVENTS_PER_S: i64 = 1_000;
const PLAY_PCT: u64 = 18;
const ORGANIC_PCT: u64 = 10;
pub const PAYLOAD_BYTES: usize = 100;

/// The reference result counts of the Flink peer README: (events, join results).
pub const REFERENCE_COUNTS: [(u64, u64); 5] = [
    (2_000_000, 90_130),
    (5_000_000, 517_443),
    (10_000_000, 1_327_000),
    (20_000_000, 2_946_602),
    (40_000_000, 6_187_033),
];

/// The splitmix64 finalizer: a bijection on 64-bit values.
pub fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn u(n: i64, salt: u64, modulus: u64) -> u64 {
    (mix64(n as u64 ^ salt) >> 1) % modulus
}

pub fn is_play(n: i64) -> bool {
    u(n, 0x1111, 100) < PLAY_PCT
}

pub fn time_ms(n: i64) -> i64 {
    T0_MS + (n * 1000) / EVENTS_PER_S - u(n, 0x4444, MAX_OUT_OF_ORDERNESS_MS as u64 + 1) as i64
}

/// The impression a play targets, or `None` for an organic play.
pub fn target(n: i64) -> Option<i64> {
    if u(n, 0x2222, 100) < ORGANIC_PCT {
        return None;
    }
    let mut m = n - 1 - u(n, 0x3333, 3600 * EVENTS_PER_S as u64) as i64;
    while m >= 0 && is_play(m) {
        m -= 1;
    }
    (m >= 0).then_some(m)
}

/// One event: is it a play, its key, its time and its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerEvent {
    pub play: bool,
    pub profile_id: i64,
    pub title_id: i64,
    pub time_ms: i64,
    pub payload: &'static [u8],
}

static PAD: [u8; 256] = {
    let mut pad = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        pad[i] = b'a' + (i % 26) as u8;
        i += 1;
    }
    pad
};

pub fn event(n: i64) -> PeerEvent {
    let play = is_play(n);
    let x = match (play, play.then(|| target(n)).flatten()) {
        (false, _) => mix64(2 * n as u64),
        (true, Some(m)) => mix64(2 * m as u64),
        (true, None) => mix64(2 * n as u64 + 1),
    };
    let offset = (n & 127) as usize;
    PeerEvent {
        play,
        profile_id: (x >> 14) as i64,
        title_id: (x & 16383) as i64,
        time_ms: time_ms(n),
        payload: &PAD[offset..offset + PAYLOAD_BYTES],
    }
}

/// The exact number of join results for events `0 .. events`, computed independently
/// of any join (as the peer's `Gen.expected`).
pub fn expected_results(events: u64) -> u64 {
    let mut matches = 0;
    for n in 0..events as i64 {
        if !is_play(n) {
            continue;
        }
        if let Some(m) = target(n) {
            let (tp, ti) = (time_ms(n), time_ms(m));
            if tp >= ti && tp <= ti + WINDOW_MS {
                matches += 1;
            }
        }
    }
    matches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_peer_reference_count_for_two_million() {
        let (events, results) = REFERENCE_COUNTS[0];
        assert_eq!(expected_results(events), results);
        let plays = (0..events as i64).filter(|&n| is_play(n)).count();
        assert_eq!(plays, 360_563);
    }

    #[test]
    fn payload_is_the_pad_window() {
        let e = event(130);
        assert_eq!(&e.payload[..3], b"cde");
        assert_eq!(e.payload.len(), 100);
    }
}
