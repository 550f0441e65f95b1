//! Proves that the streaming join equals a naive nested-loop join over the same
//! de-duplicated, non-late events: for random composite keys, times, disorder, late
//! events, duplicates, all four join kinds, negative and zero-width bounds, random batch
//! boundaries and interleavings of the two inputs, and memory budgets from "spill every
//! event" to "spill nothing". The cold tier here is the in-memory model; `braid-state`
//! runs the same property on RocksDB.

use braid_core::testkit::{
    build, draws, kinds, reference, run_join, run_join_resplitting, run_join_restarting,
};
use braid_core::{ColdProbeMode, Join, JoinSpec, MemStore, PayloadMode};
use proptest::prelude::*;

/// Every way of keeping payloads; `Auto` mixes stored forms in one state (shaped at
/// budget 0, as they came at 1 MiB, both at 4 KiB).
fn payload_modes() -> impl Strategy<Value = PayloadMode> {
    prop_oneof![
        Just(PayloadMode::Shaped),
        Just(PayloadMode::Auto),
        Just(PayloadMode::Verbatim)
    ]
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
        cold_probes in prop_oneof![Just(None), Just(Some(ColdProbeMode::Eager)), Just(Some(ColdProbeMode::Deferred))],
        payloads in payload_modes(),
    ) {
        let spec = JoinSpec { kind, lower_ms, upper_ms: lower_ms + width_ms, allowed_lateness_ms };
        let events = build(&draws, ooo_ms);
        let mut join = Join::new(spec, MemStore::default(), memory_max);
        join.set_payload_mode(payloads);
        // None: probes wait as long as the join lets them (before an expiry).
        match cold_probes {
            Some(mode) => join.set_cold_probe_mode(mode),
            None => join.set_deferred_probe_bytes_max(usize::MAX),
        }
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
        if memory_max == 0 && admitted > 0 {
            prop_assert!(c.spilled_events > 0, "a zero budget spills every event");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// A join restored from snapshots of itself (as after a crash and a restore from a
    /// checkpoint) finds exactly what the naive join finds: hot and cold segments,
    /// matched marks, remembered ids, counts and the watermark all survive the image.
    #[test]
    fn join_restored_from_snapshots_equals_naive_join(
        kind in kinds(),
        lower_ms in -3_000i64..3_000,
        width_ms in 0i64..4_000,
        ooo_ms in prop_oneof![Just(0i64), Just(500)],
        memory_max in prop_oneof![Just(0usize), Just(4_096), Just(1 << 20)],
        draws in draws(),
        batch_sizes in prop::collection::vec(1usize..20, 1..5),
        restart_every in 1usize..4,
        payloads in payload_modes(),
    ) {
        let spec = JoinSpec { kind, lower_ms, upper_ms: lower_ms + width_ms, allowed_lateness_ms: 0 };
        let events = build(&draws, ooo_ms);
        let mut join = Join::new(spec, MemStore::default(), memory_max);
        join.set_payload_mode(payloads);
        // Probes wait for an expiry or a checkpoint barrier, whichever comes first.
        join.set_deferred_probe_bytes_max(usize::MAX);
        let got = run_join_restarting(&mut join, &events, &batch_sizes, ooo_ms, 0, restart_every).expect("the model store never fails");
        let want = reference(&events, &spec, ooo_ms);
        prop_assert_eq!(&got.rows, &want.rows);
        prop_assert_eq!(join.counts().retained, [0, 0]);
        prop_assert_eq!(join.store().segment_count(), 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// A partition's state split by key over several joins and re-split over another
    /// number mid-run (a restore with another parallelism) finds exactly what the naive
    /// join finds, and its counts account for every admitted event once.
    #[test]
    fn join_re_split_by_key_equals_naive_join(
        kind in kinds(),
        lower_ms in -3_000i64..3_000,
        width_ms in 0i64..4_000,
        ooo_ms in prop_oneof![Just(0i64), Just(500)],
        memory_max in prop_oneof![Just(0usize), Just(4_096), Just(1 << 20)],
        draws in draws(),
        batch_sizes in prop::collection::vec(1usize..20, 1..5),
        first in 1usize..4,
        resplits in prop::collection::vec((1usize..8, 1usize..4), 1..3),
    ) {
        let spec = JoinSpec { kind, lower_ms, upper_ms: lower_ms + width_ms, allowed_lateness_ms: 0 };
        let events = build(&draws, ooo_ms);
        let mut resplits = resplits;
        resplits.sort();
        let (got, c) = run_join_resplitting(spec, memory_max, &events, &batch_sizes, ooo_ms, first, &resplits).expect("the model store never fails");
        let want = reference(&events, &spec, ooo_ms);
        prop_assert_eq!(&got.late, &want.late);
        prop_assert_eq!(&got.rows, &want.rows);
        prop_assert_eq!(c.retained, [0, 0]);
        let admitted = events.len() as u64 - got.late.len() as u64;
        let accounted: u64 = (0..2).map(|i| c.matched[i] + c.unmatched_emitted[i] + c.unmatched_expired[i] + c.duplicates[i]).sum();
        prop_assert_eq!(accounted, admitted, "every admitted event is accounted for once");
    }
}
