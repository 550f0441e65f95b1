//! Decoding a batch of lines on two threads.
//!
//! The reader thread decodes every line it reads, and on a files job that made it the
//! bottleneck: it ran at 100 % while the shard threads waited at half load. A batch is
//! now decoded in two halves at once, the second by a helper thread, and the results
//! are used in read order, so nothing after decoding changes: the time guards, the
//! watermarks and routing still see the lines one by one, as they were read.

use crate::decode::{DecodeError, Decoded, Decoder, Schema};
use crate::files::Line;

/// Batches shorter than this are decoded by the calling thread alone: starting a
/// thread costs more than it saves on a few lines (a live topic's small polls).
pub const PARALLEL_DECODE_LINES_MIN: usize = 256;

/// The decoded lines of one batch, in read order: each line's result and, for a line
/// that decoded, its key.
#[derive(Debug, Default)]
pub struct DecodedLines {
    results: Vec<Result<Decoded, DecodeError>>,
    keys: Vec<u8>,
    /// Where each line's key ends in `keys`; it starts where the previous line's ends.
    key_ends: Vec<usize>,
}

impl DecodedLines {
    /// Line `i`'s result and its key (empty for a line that did not decode).
    pub fn get(&self, i: usize) -> (&Result<Decoded, DecodeError>, &[u8]) {
        let start = if i == 0 { 0 } else { self.key_ends[i - 1] };
        (&self.results[i], &self.keys[start..self.key_ends[i]])
    }

    fn clear(&mut self) {
        self.results.clear();
        self.keys.clear();
        self.key_ends.clear();
    }

    fn decode(&mut self, decoder: &mut Decoder, lines: &[Line<'_>], max_line_bytes: usize) {
        for line in lines {
            let result = match line.oversized {
                Some(len) => Err(DecodeError::Oversized {
                    len,
                    max: max_line_bytes,
                }),
                None => decoder.decode_at(line.bytes, line.record_time),
            };
            if result.is_ok() {
                self.keys.extend_from_slice(decoder.key().bytes());
            }
            self.key_ends.push(self.keys.len());
            self.results.push(result);
        }
    }

    fn append(&mut self, other: &mut DecodedLines) {
        let offset = self.keys.len();
        self.keys.extend_from_slice(&other.keys);
        self.key_ends
            .extend(other.key_ends.iter().map(|end| end + offset));
        self.results.append(&mut other.results);
        other.clear();
    }
}

/// Decodes the batches of one source: two decoders, one for each half of a batch.
#[derive(Debug)]
pub struct BatchDecoder {
    decoders: [Decoder; 2],
    max_line_bytes: usize,
    /// The second half's results before they are appended to the first's.
    second: DecodedLines,
}

impl BatchDecoder {
    pub fn new(schema: Schema, max_line_bytes: usize) -> BatchDecoder {
        BatchDecoder {
            decoders: [Decoder::new(schema.clone()), Decoder::new(schema)],
            max_line_bytes,
            second: DecodedLines::default(),
        }
    }

    /// A decoder for a single line (one the time guard held and now releases).
    pub fn single(&mut self) -> &mut Decoder {
        &mut self.decoders[0]
    }

    /// Decodes `lines` into `out` (cleared first), in read order.
    pub fn decode(&mut self, lines: &[Line<'_>], out: &mut DecodedLines) {
        out.clear();
        let max = self.max_line_bytes;
        let [first, second] = &mut self.decoders;
        if lines.len() < PARALLEL_DECODE_LINES_MIN {
            out.decode(first, lines, max);
            return;
        }
        let (head, tail) = lines.split_at(lines.len() / 2);
        let rest = &mut self.second;
        rest.clear();
        let helped = std::thread::scope(|scope| {
            // A helper that cannot be started (the process is at its thread limit)
            // leaves the second half to this thread.
            let helper = std::thread::Builder::new()
                .name("braid-decode".into())
                .spawn_scoped(scope, || rest.decode(second, tail, max));
            out.decode(first, head, max);
            match helper {
                Ok(helper) => {
                    if let Err(panic) = helper.join() {
                        std::panic::resume_unwind(panic);
                    }
                    true
                }
                Err(_) => {
                    out.decode(first, tail, max);
                    false
                }
            }
        });
        if helped {
            out.append(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::Position;

    /// Against decoding one line at a time with a single decoder: the same results
    /// and keys in the same order, for batches below and above the parallel threshold,
    /// with good lines, bad lines and oversized ones mixed, and with the decoders'
    /// reused buffers carried from batch to batch.
    #[test]
    fn halves_decode_as_one_decoder_would() {
        let schema = Schema {
            key: vec!["p".into(), "t".into()],
            time: Some("ts".into()),
            id: Some("id".into()),
        };
        let texts: Vec<Vec<u8>> = (0..3_000u64)
            .map(|i| match i % 7 {
                0 => b"not json".to_vec(),
                1 => format!(r#"{{"p":{i},"ts":{}}}"#, 1_700_000_000_000 + i).into_bytes(),
                2 => format!(r#"{{"p":"s{i}","t":"x","ts":"2023-11-14T22:13:20Z"}}"#).into_bytes(),
                _ => format!(
                    r#"{{"id":"e{i}","p":{},"t":{},"ts":{}}}"#,
                    i % 13,
                    i % 5,
                    1_700_000_000_000 + i * 3
                )
                .into_bytes(),
            })
            .collect();
        let lines: Vec<Line<'_>> = texts
            .iter()
            .enumerate()
            .map(|(i, bytes)| Line {
                bytes,
                position: Position {
                    file: 0,
                    line: i as u64,
                },
                oversized: (i % 101 == 0).then_some(4_096),
                record_time: None,
            })
            .collect();
        let mut batch = BatchDecoder::new(schema.clone(), 1_000);
        let mut out = DecodedLines::default();
        let mut reference = Decoder::new(schema);
        let mut start = 0;
        for size in [5, 255, 256, 1_024, 1, 1_459] {
            let chunk = &lines[start..start + size];
            batch.decode(chunk, &mut out);
            assert_eq!(out.results.len(), size);
            for (i, line) in chunk.iter().enumerate() {
                let expected = match line.oversized {
                    Some(len) => Err(DecodeError::Oversized { len, max: 1_000 }),
                    None => reference.decode_at(line.bytes, None),
                };
                let (got, key) = out.get(i);
                assert_eq!(got, &expected, "line {}", start + i);
                if expected.is_ok() {
                    assert_eq!(key, reference.key().bytes(), "line {}", start + i);
                } else {
                    assert!(key.is_empty());
                }
            }
            start += size;
        }
        assert_eq!(start, lines.len());
    }
}
