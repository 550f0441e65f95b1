//! braid's sources and sinks.
//!
//! - [`Decoder`] pulls the key, time and id out of one NDJSON line, leaving the line's
//!   bytes untouched so that they can be written back verbatim; [`BatchDecoder`]
//!   decodes a batch of lines in two halves at once.
//! - [`FileSource`] reads a source's files in lexical order as one partition, line by
//!   line, with bounded line length and each line's position.
//! - [`FileSink`] writes records to hidden files and makes them visible by renaming.
//! - [`takerate`] generates realistic impressions and plays; [`flink_peer`] reproduces
//!   the workload of the Flink peer benchmark exactly.

mod batch_decode;
mod decode;
mod files;
pub mod flink_peer;
mod rfc3339;
mod sink;
pub mod takerate;

pub use batch_decode::{BatchDecoder, DecodedLines, PARALLEL_DECODE_LINES_MIN};
pub use decode::{DecodeError, Decoded, Decoder, Schema};
pub use files::{resolve_glob, FileSource, Line, LineBatch, Position, SourceError, SourcePosition};
pub use rfc3339::{format_rfc3339_ms, parse_rfc3339_ms};
pub use sink::{FileSink, PendingFile, SinkError};
