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
    #[inline]
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    #[inline]
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

    #[inline]
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The key's 64-bit hash, used for routing, hash indexes and filters.
    #[inline]
    pub fn hash(&self) -> u64 {
        hash_key(&self.buf)
    }
}

/// The parts of an encoded key, in order: the inverse of [`KeyWriter`]. Bytes that are
/// not a key's encoding end the parts early.
pub fn key_parts(mut key: &[u8]) -> impl Iterator<Item = KeyPart<'_>> {
    std::iter::from_fn(move || {
        let (&tag, rest) = key.split_first()?;
        match tag {
            b'I' => {
                let bytes: [u8; 8] = rest.get(..8)?.try_into().ok()?;
                key = &rest[8..];
                Some(KeyPart::Int(i64::from_be_bytes(bytes)))
            }
            b'S' => {
                let len: [u8; 4] = rest.get(..4)?.try_into().ok()?;
                let len = u32::from_be_bytes(len) as usize;
                let text = std::str::from_utf8(rest.get(4..4 + len)?).ok()?;
                key = &rest[4 + len..];
                Some(KeyPart::Str(text))
            }
            _ => None,
        }
    })
}

#[inline]
pub fn hash_key(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// An event id's 128-bit hash. The join's id set keeps 102 of its bits (16 bytes an
/// id): two of a billion retained ids are taken for one with probability about 1e-13.
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
    fn key_parts_decode_what_was_encoded() {
        let parts = [
            KeyPart::Int(-7),
            KeyPart::Str("é\"x"),
            KeyPart::Str(""),
            KeyPart::Int(i64::MAX),
        ];
        let bytes = encode(&parts);
        assert_eq!(key_parts(&bytes).collect::<Vec<_>>(), parts);
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
