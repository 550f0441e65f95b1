//! Proves that the streaming join equals a naive nested-loop join over the same
//! de-duplicated, non-late events: for random composite keys, times, disorder, late
//! events, duplicates, all four join kinds, negative and zero-width bounds, random batch
//! boundaries and interleavings of the two inputs, and memory budgets from "spill every
//! event" to "spill nothing". The cold tier here is the in-memory model; `braid-state`
//! runs the same property on RocksDB.

use braid_core::testkit::{reference, run_join, TestEvent, TestKeyPart};
use braid_core::{Join, JoinKind, JoinSpec, MemStore, Side};
use proptest::prelude::*;

/// One generated arrival: (side, key index, time step, jitter, extra lateness, duplicate?).
type Draw = (bool, usize, i64, i64, i64, bool);

pub fn keys() -> Vec<Vec<TestKeyPart>> {
    use TestKeyPart::{Int, Str};
    vec![
        vec![Int(1)],
        vec![Int(2)],
        vec![Str("1".into())],
        vec![Int(1), Str("x".into())],
        vec![Str("a".into()), Int(-5)],
    ]
}

/// Builds arrival-ordered events from draws: nominal times rise by `step`, each event's
/// time is its nominal time minus a jitter within the disorder bound, and sometimes minus
/// more (a late event); a duplicate repeats an earlier event of the same side.
fn build(draws: &[Draw], ooo_ms: i64) -> Vec<TestEvent> {
    let keys = keys();
    let mut nominal = 1_000_000;
    let mut events: Vec<TestEvent> = Vec::new();
    for (i, &(left, key, step, jitter, extra, duplicate)) in draws.iter().enumerate() {
        nominal += step;
        let side = if left { Side::Left } else { Side::Right };
        if duplicate {
            if let Some(original) = events.iter().rev().find(|e| e.side == side).cloned() {
                events.push(original);
                continue;
            }
        }
        events.push(TestEvent {
            side,
            key: keys[key].clone(),
            time: nominal - jitter.min(ooo_ms) - extra,
            id: Some(i as u64),
            payload: format!("{}{i}", if left { 'l' } else { 'r' }),
        });
    }
    events
}

fn kinds() -> impl Strategy<Value = JoinKind> {
    prop_oneof![
        Just(JoinKind::Inner),
        Just(JoinKind::Left),
        Just(JoinKind::Right),
        Just(JoinKind::Full)
    ]
}

fn draws() -> impl Strategy<Value = Vec<Draw>> {
    let extra = prop_oneof![8 => Just(0i64), 1 => 1i64..5_000];
    let duplicate = prop::bool::weighted(0.1);
    prop::collection::vec(
        (any::<bool>(), 0usize..5, 0i64..700, 0i64..3_000, extra, duplicate),
        0..120,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn streaming_join_equals_naive_join(
        kind in kinds(),
        lower_ms in -3_000i64..3_000,
        width_ms in prop_oneof![Just(0i64), 0i64..4_000],
        ooo_ms in prop_oneof![Just(0i64), Just(500), Just(2_000)],
        allowed_lateness_ms in prop_oneof![Just(0i64), Just(300)],
        memory_max in prop_oneof![Just(0usize), Just(4_096), Just(1 << 20)],
        draws in draws(),
        batch_sizes in prop::collection::vec(1usize..20, 1..5),
    ) {
        let spec = JoinSpec { kind, lower_ms, upper_ms: lower_ms + width_ms, allowed_lateness_ms };
        let events = build(&draws, ooo_ms);
        let mut join = Join::new(spec, MemStore::default(), memory_max);
        let got = run_join(&mut join, &events, &batch_sizes, ooo_ms, allowed_lateness_ms).expect("the model store never fails");
        let want = reference(&events, &spec, ooo_ms);
        prop_assert_eq!(&got.late, &want.late);
        prop_assert_eq!(&got.rows, &want.rows);
        let c = join.counts();
        prop_assert_eq!(c.retained, [0, 0], "+inf expires everything");
        let admitted = events.len() as u64 - got.late.len() as u64;
        let accounted: u64 = (0..2).map(|i| c.matched[i] + c.unmatched_emitted[i] + c.unmatched_expired[i] + c.duplicates[i]).sum();
        prop_assert_eq!(accounted, admitted, "every admitted event is accounted for once");
        prop_assert_eq!(join.store().segment_count(), 0, "expired buckets leave nothing behind");
    }
}
