//! Decoding one NDJSON line: validate it, pull out key, time and id, keep the bytes.
//!
//! The line is parsed once with serde_json; fields other than the key, time and id
//! fields are skipped without being built. Anything wrong with the line is a
//! [`DecodeError`] naming the field, which the caller dead-letters.

use std::fmt;

use braid_core::{hash_id, EventTime, KeyPart, KeyWriter};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};

/// Event times outside 1970-01-01 .. 9999-12-31 are absurd and dead-lettered.
const TIME_MS_MIN: i64 = 0;
const TIME_MS_MAX: i64 = 253_402_300_799_999;

/// Which fields of a source's records hold the key, the time and the id.
#[derive(Clone, Debug)]
pub struct Schema {
    pub key: Vec<String>,
    /// The time field; `None` takes the record's own timestamp (Kafka).
    pub time: Option<String>,
    pub id: Option<String>,
}

/// What a good line holds besides its bytes. The key is left in the decoder's
/// [`KeyWriter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub time: EventTime,
    pub id: Option<u128>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid UTF-8 at byte {0}")]
    InvalidUtf8(usize),
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("the line is JSON but not an object")]
    NotObject,
    #[error("field `{0}` is missing")]
    Missing(String),
    #[error("field `{field}` is {found}; a key part must be a string or an integer")]
    KeyType { field: String, found: &'static str },
    #[error(
        "field `{field}` is {found}; the time must be epoch milliseconds or an RFC 3339 string"
    )]
    TimeType { field: String, found: &'static str },
    #[error("field `{field}` holds an unparsable time: {reason}")]
    TimeFormat { field: String, reason: &'static str },
    #[error("field `{field}` holds {ms} ms, outside years 1970 to 9999")]
    TimeRange { field: String, ms: i64 },
    #[error("field `{field}` is {found}; an id must be a string or an integer")]
    IdType { field: String, found: &'static str },
    #[error("the line is {len} bytes, over the limit of {max}")]
    Oversized { len: usize, max: usize },
}

/// A JSON value as far as decoding cares.
#[derive(Clone, Debug, Default)]
enum Scalar {
    #[default]
    Absent,
    Int(i64),
    Str,
    Other(&'static str),
}

/// One role's value; strings are kept in `text`, reused from line to line.
#[derive(Default, Debug)]
struct Slot {
    value: Scalar,
    text: String,
}

/// Decodes lines of one source. Holds reusable buffers: one decoder per thread.
#[derive(Debug)]
pub struct Decoder {
    schema: Schema,
    /// Slots: the key parts in order, then the time, then the id.
    slots: Vec<Slot>,
    /// (slot, the earlier slot of the same field): a field with two roles is parsed
    /// into its first role's slot and copied to the other.
    aliases: Vec<(usize, usize)>,
    key: KeyWriter,
}

impl Decoder {
    pub fn new(schema: Schema) -> Decoder {
        let slots = (0..schema.key.len() + 2).map(|_| Slot::default()).collect();
        let names: Vec<Option<&String>> = schema
            .key
            .iter()
            .map(Some)
            .chain([schema.time.as_ref(), schema.id.as_ref()])
            .collect();
        let aliases = (0..names.len())
            .filter(|&i| names[i].is_some())
            .filter_map(|i| {
                let first = names.iter().position(|n| *n == names[i])?;
                (first < i).then_some((i, first))
            })
            .collect();
        Decoder {
            schema,
            slots,
            aliases,
            key: KeyWriter::default(),
        }
    }

    /// The key of the line decoded last.
    pub fn key(&self) -> &KeyWriter {
        &self.key
    }

    pub fn decode(&mut self, line: &[u8]) -> Result<Decoded, DecodeError> {
        self.decode_at(line, None)
    }

    /// Decodes a record that carries its own timestamp, the event time when the schema
    /// names no time field.
    pub fn decode_at(
        &mut self,
        line: &[u8],
        record_time: Option<i64>,
    ) -> Result<Decoded, DecodeError> {
        let text =
            std::str::from_utf8(line).map_err(|e| DecodeError::InvalidUtf8(e.valid_up_to()))?;
        for slot in &mut self.slots {
            slot.value = Scalar::Absent;
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let seed = RecordSeed {
            schema: &self.schema,
            slots: &mut self.slots,
            aliases: &self.aliases,
        };
        match seed.deserialize(&mut de).and_then(|()| de.end()) {
            Ok(()) => {}
            Err(e) if e.to_string().starts_with(NOT_OBJECT) => return Err(DecodeError::NotObject),
            Err(e) => return Err(DecodeError::Json(e.to_string())),
        }
        self.key.clear();
        for (i, field) in self.schema.key.iter().enumerate() {
            let slot = &self.slots[i];
            match slot.value {
                Scalar::Int(v) => self.key.push(KeyPart::Int(v)),
                Scalar::Str => self.key.push(KeyPart::Str(&slot.text)),
                Scalar::Absent => return Err(DecodeError::Missing(field.clone())),
                Scalar::Other(found) => {
                    return Err(DecodeError::KeyType {
                        field: field.clone(),
                        found,
                    })
                }
            }
        }
        let time = self.time(record_time)?;
        let id = self.id()?;
        Ok(Decoded { time, id })
    }

    fn time(&self, record_time: Option<i64>) -> Result<EventTime, DecodeError> {
        let Some(field) = &self.schema.time else {
            let ms = record_time.ok_or_else(|| DecodeError::Missing(RECORD_TIME.into()))?;
            return in_range(ms, RECORD_TIME);
        };
        let slot = &self.slots[self.schema.key.len()];
        let ms = match slot.value {
            Scalar::Int(ms) => ms,
            Scalar::Str => {
                crate::parse_rfc3339_ms(&slot.text).map_err(|reason| DecodeError::TimeFormat {
                    field: field.clone(),
                    reason,
                })?
            }
            Scalar::Absent => return Err(DecodeError::Missing(field.clone())),
            Scalar::Other(found) => {
                return Err(DecodeError::TimeType {
                    field: field.clone(),
                    found,
                })
            }
        };
        in_range(ms, field)
    }

    /// A missing or null id means the event takes no part in de-duplication.
    fn id(&self) -> Result<Option<u128>, DecodeError> {
        let Some(field) = &self.schema.id else {
            return Ok(None);
        };
        let slot = &self.slots[self.schema.key.len() + 1];
        match slot.value {
            Scalar::Absent | Scalar::Other("null") => Ok(None),
            Scalar::Int(v) => {
                let mut bytes = [0u8; 9];
                bytes[0] = b'I';
                bytes[1..].copy_from_slice(&v.to_be_bytes());
                Ok(Some(hash_id(&bytes)))
            }
            Scalar::Str => {
                let mut bytes = Vec::with_capacity(slot.text.len() + 1);
                bytes.push(b'S');
                bytes.extend_from_slice(slot.text.as_bytes());
                Ok(Some(hash_id(&bytes)))
            }
            Scalar::Other(found) => Err(DecodeError::IdType {
                field: field.clone(),
                found,
            }),
        }
    }
}

/// What errors call the time when it is the record's own timestamp.
const RECORD_TIME: &str = "the record's timestamp";

fn in_range(ms: i64, field: &str) -> Result<EventTime, DecodeError> {
    if !(TIME_MS_MIN..=TIME_MS_MAX).contains(&ms) {
        return Err(DecodeError::TimeRange {
            field: field.to_string(),
            ms,
        });
    }
    Ok(EventTime(ms))
}

const NOT_OBJECT: &str = "braid: not an object";

struct RecordSeed<'a> {
    schema: &'a Schema,
    slots: &'a mut [Slot],
    aliases: &'a [(usize, usize)],
}

impl<'de> DeserializeSeed<'de> for RecordSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(NOT_OBJECT)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(role) = map.next_key_seed(RoleSeed(self.schema))? {
            match role {
                Some(i) => map.next_value_seed(ScalarSeed(&mut self.slots[i]))?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        // A field that is both a key part and the time (or the id) was parsed into its
        // first role's slot; copy it to the others.
        for &(i, first) in self.aliases {
            let (value, text) = (
                self.slots[first].value.clone(),
                self.slots[first].text.clone(),
            );
            self.slots[i].value = value;
            self.slots[i].text = text;
        }
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(NOT_OBJECT))
    }
}

/// Maps a field name to the slot of its first role, or `None` for other fields.
struct RoleSeed<'a>(&'a Schema);

impl<'de> DeserializeSeed<'de> for RoleSeed<'_> {
    type Value = Option<usize>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for RoleSeed<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, name: &str) -> Result<Option<usize>, E> {
        let schema = self.0;
        Ok(schema
            .key
            .iter()
            .position(|k| k == name)
            .or_else(|| (schema.time.as_deref() == Some(name)).then_some(schema.key.len()))
            .or_else(|| (schema.id.as_deref() == Some(name)).then_some(schema.key.len() + 1)))
    }
}

struct ScalarSeed<'a>(&'a mut Slot);

impl<'de> DeserializeSeed<'de> for ScalarSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScalarSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.value = Scalar::Int(v);
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.value = match i64::try_from(v) {
            Ok(v) => Scalar::Int(v),
            Err(_) => Scalar::Other("an integer beyond 64-bit signed range"),
        };
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.0.value = Scalar::Other("a float");
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.text.clear();
        self.0.text.push_str(v);
        self.0.value = Scalar::Str;
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.0.value = Scalar::Other("a boolean");
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.value = Scalar::Other("null");
        Ok(())
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.0.value = Scalar::Other("an array");
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        self.0.value = Scalar::Other("an object");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder() -> Decoder {
        Decoder::new(Schema {
            key: vec!["p".into(), "t".into()],
            time: Some("ts".into()),
            id: Some("id".into()),
        })
    }

    #[test]
    fn good_lines() {
        let mut d = decoder();
        let got = d
            .decode(br#"{"id":"a","p":42,"x":[1,{"y":null}],"t":"7","ts":1700000000000}"#)
            .unwrap();
        assert_eq!(got.time, EventTime(1_700_000_000_000));
        assert!(got.id.is_some());
        let mut w = KeyWriter::default();
        w.push(KeyPart::Int(42));
        w.push(KeyPart::Str("7"));
        assert_eq!(d.key().bytes(), w.bytes());
        let got = d
            .decode(br#"{"p":"a\"b","t":-1,"ts":"2023-11-14T22:13:20Z"}"#)
            .unwrap();
        assert_eq!(
            got,
            Decoded {
                time: EventTime(1_700_000_000_000),
                id: None
            }
        );
    }

    /// Without a time field the record's own timestamp is the event time, and a
    /// field of the same name as the old time field is just another field.
    #[test]
    fn the_record_timestamp_is_the_time_when_no_field_names_one() {
        let mut d = Decoder::new(Schema {
            key: vec!["p".into()],
            time: None,
            id: Some("ts".into()),
        });
        let got = d
            .decode_at(br#"{"p":1,"ts":5}"#, Some(1_700_000_000_000))
            .unwrap();
        assert_eq!(got.time, EventTime(1_700_000_000_000));
        assert!(got.id.is_some(), "ts is the id here");
        let err = d.decode(br#"{"p":1}"#).unwrap_err().to_string();
        assert!(err.contains("the record's timestamp"), "{err}");
        let err = d
            .decode_at(br#"{"p":1}"#, Some(-5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside years 1970 to 9999"), "{err}");
    }

    /// One field may play two roles: here `t` is a key part and the id, and `p` the
    /// other key part and the time.
    #[test]
    fn a_field_may_be_a_key_part_and_the_time_or_the_id() {
        let mut d = Decoder::new(Schema {
            key: vec!["p".into(), "t".into()],
            time: Some("p".into()),
            id: Some("t".into()),
        });
        let got = d.decode(br#"{"t":"x","p":1700000000000}"#).unwrap();
        assert_eq!(got.time, EventTime(1_700_000_000_000));
        let mut id = Decoder::new(Schema {
            key: vec!["p".into()],
            time: Some("p".into()),
            id: Some("u".into()),
        });
        let same = id.decode(br#"{"u":"x","p":1700000000000}"#).unwrap();
        assert_eq!(got.id, same.id, "the id is t's value");
        let mut w = KeyWriter::default();
        w.push(KeyPart::Int(1_700_000_000_000));
        w.push(KeyPart::Str("x"));
        assert_eq!(d.key().bytes(), w.bytes());
        let err = d.decode(br#"{"t":"x"}"#).unwrap_err().to_string();
        assert!(err.contains("`p` is missing"), "{err}");
    }

    #[test]
    fn bad_lines_name_their_fault() {
        let mut d = decoder();
        let cases: &[(&[u8], &str)] = &[
            (br#"{"p":1,"t":2,"ts":3"#, "invalid JSON"),
            (br#"[1,2]"#, "not an object"),
            (br#""str""#, "not an object"),
            (b"{\"p\":\"\xff\",\"t\":1,\"ts\":1}", "invalid UTF-8"),
            (br#"{"t":2,"ts":3}"#, "`p` is missing"),
            (br#"{"p":{},"t":2,"ts":3}"#, "`p` is an object"),
            (br#"{"p":[],"t":2,"ts":3}"#, "`p` is an array"),
            (br#"{"p":null,"t":2,"ts":3}"#, "`p` is null"),
            (br#"{"p":1.5,"t":2,"ts":3}"#, "`p` is a float"),
            (br#"{"p":true,"t":2,"ts":3}"#, "`p` is a boolean"),
            (br#"{"p":1,"t":2}"#, "`ts` is missing"),
            (br#"{"p":1,"t":2,"ts":"yesterday"}"#, "unparsable time"),
            (br#"{"p":1,"t":2,"ts":1.7e12}"#, "`ts` is a float"),
            (br#"{"p":1,"t":2,"ts":-5}"#, "outside years"),
            (br#"{"p":1,"t":2,"ts":3,"id":[1]}"#, "an id must be"),
            (br#"{"p":1,"t":2,"ts":3} x"#, "invalid JSON"),
        ];
        for (line, want) in cases {
            let got = d.decode(line).expect_err(&String::from_utf8_lossy(line));
            assert!(
                got.to_string().contains(want),
                "{}: {got}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
