//! braid: an event-time stream-join engine.
//!
//! Source reads, Join matches, Sink receives. This crate is the runtime around the pure
//! join of `braid-core`: the job file ([`config`]), the reader loop ([`driver`]), the
//! shard threads ([`engine`]), the result sinks ([`results`]), and the commands
//! ([`demo`], [`bench`]) that `main.rs` dispatches to.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod counts;
pub mod demo;
pub mod driver;
pub mod engine;
pub mod instance;
pub mod instances_bench;
pub mod kafka;
pub mod kafka_bench;
pub mod live;
pub mod progress;
pub mod results;
pub mod signals;
pub mod source;
pub mod summary;
pub mod units;
