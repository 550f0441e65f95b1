//! braid's vocabulary and the pure interval-join state machine.
//!
//! Three nouns carry braid: a *source* delivers events, the *join* matches them, a *sink*
//! receives the results. This crate holds the join and the words it is written in. It
//! does no I/O and starts no threads: the cold state tier is reached only through the
//! [`StateStore`] trait, so the whole join can be checked against a naive reference with
//! property tests (see `tests/`).

mod bloom;
mod bucket;
mod cache;
mod ids;
mod join;
mod key;
pub mod leb128;
mod shape;
mod snapshot;
mod spec;
mod store;
mod time;
mod time_guard;
mod watermarks;

#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

pub use join::{ColdProbeMode, Event, Join, JoinCounts, JoinImage, JoinSink};
pub use key::{hash_id, hash_key, key_parts, KeyPart, KeyWriter};
pub use shape::{PayloadMode, AUTO_SHAPE_FRACTION};
pub use snapshot::SnapshotError;
pub use spec::{JoinKind, JoinSpec, Side};
pub use store::{MemStore, SegmentEntries, SegmentEntry, SegmentId, StateStore, StoreError};
pub use time::{EventTime, Watermark};
pub use time_guard::{
    Arrival, Candidate, Held, Rejected, TimeGuard, TimeGuardConfig, TimeGuardState, Verdict, Votes,
};
pub use watermarks::{PartitionId, Watermarks};
