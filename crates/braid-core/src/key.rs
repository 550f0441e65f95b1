//! Join keys: composite keys of strings and 64-bit integers, encoded to bytes once.
//!
//! Encoding: per part, a tag byte (`I` for an integer, `S` for a string), then the
//! integer as 8 big-endian bytes or the string's length as 4 big-endian bytes followed
//! by its UTF-8. Equal keys have equal bytes, the integer `7` and the string `"7"`
//! differ, and no concatenation of parts is ambiguous.

use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

/// One part of a composite key, as read from an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPart<'a> {
    Int(i64),
    Str(&'a str),
}

/// Appends encoded key parts to a reusable buffer.
#[derive(Default, Debug)]
pub struct KeyWriter {
    buf: Vec<u8>,
}

impl KeyWriter {
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    pub fn push(&mut self, part: KeyPart<'_>) {
        match part {
            KeyPart::Int(v) => {
                self.buf.push(b'I');
                self.buf.extend_from_slice(&v.to_be_bytes());
            }
            KeyPart::Str(s) => {
                self.buf.push(b'S');
                let len = u32::try_from(s.len()).expect("key parts are bounded by the line size");
                self.buf.extend_from_slice(&len.to_be_bytes());
                self.buf.extend_from_slice(s.as_bytes());
            }
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The key's 64-bit hash, used for routing, hash indexes and filters.
    pub fn hash(&self) -> u64 {
        hash_key(&self.buf)
    }
}

pub fn hash_key(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// An event id's 128-bit hash: duplicates are detected by this hash, whose collision
/// probability over a day of a billion ids is about 1e-21.
pub fn hash_id(id: &[u8]) -> u128 {
    xxh3_128(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(parts: &[KeyPart<'_>]) -> Vec<u8> {
        let mut w = KeyWriter::default();
        for p in parts {
            w.push(*p);
        }
        w.bytes().to_vec()
    }

    #[test]
    fn integers_and_strings_never_collide() {
        let cases: &[(&[KeyPart<'_>], &[KeyPart<'_>])] = &[
            (&[KeyPart::Int(7)], &[KeyPart::Str("7")]),
            (
                &[KeyPart::Str("ab"), KeyPart::Str("c")],
                &[KeyPart::Str("a"), KeyPart::Str("bc")],
            ),
            (
                &[KeyPart::Int(1), KeyPart::Int(2)],
                &[KeyPart::Int(2), KeyPart::Int(1)],
            ),
            (&[KeyPart::Str("")], &[KeyPart::Str(""), KeyPart::Str("")]),
        ];
        for (a, b) in cases {
            assert_ne!(encode(a), encode(b), "{a:?} vs {b:?}");
        }
        assert_eq!(encode(&[KeyPart::Int(-3)]), encode(&[KeyPart::Int(-3)]));
    }
}
