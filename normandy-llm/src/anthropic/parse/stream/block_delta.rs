//! The fast path's reading of a `content_block_delta` event, the one event a streamed answer
//! sends per piece: hand-written serde visitors that write each member once into a
//! [`BlockDelta`] on the parser's stack.
//!
//! A derived struct pair did the same work with each layer's value returned by value, and every
//! member it knows costs its share whether present or not (callgrind, the bench's text delta:
//! 2,419 instructions an event derived, 2,354 here; a raw client reading only `delta.text`,
//! 2,148). Anything this does not read as the derived pair would have — a member twice, a wrong
//! type, a `type` with JSON escapes — is an error here too, and the caller then reads the event
//! through the tagged `Event` enum, which decides.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

/// The members of a `content_block_delta` event's data that the parser uses.
#[derive(Debug, Default)]
pub(super) struct BlockDelta<'a> {
    pub(super) index: Option<u32>,
    /// `delta.type`, borrowed (a type with escapes fails the read).
    pub(super) kind: Option<&'a str>,
    pub(super) text: Option<String>,
    pub(super) thinking: Option<String>,
    pub(super) signature: Option<String>,
    pub(super) partial_json: Option<String>,
}

impl<'a> BlockDelta<'a> {
    /// Reads `data` into `self` (a fresh `BlockDelta`).
    pub(super) fn read(&mut self, data: &'a str) -> serde_json::Result<()> {
        let mut de = serde_json::Deserializer::from_str(data);
        de.deserialize_map(Event(self))?;
        de.end()
    }
}

/// A member name: the known ones of both levels (each level takes its own), or `None`.
#[derive(Clone, Copy)]
enum Field {
    Index,
    Delta,
    Type,
    Text,
    Thinking,
    Signature,
    PartialJson,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Self::Index => "index",
            Self::Delta => "delta",
            Self::Type => "type",
            Self::Text => "text",
            Self::Thinking => "thinking",
            Self::Signature => "signature",
            Self::PartialJson => "partial_json",
        }
    }
}

struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Option<Field>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Field>, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Option<Field>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<Field>, E> {
        Ok(match v {
            "index" => Some(Field::Index),
            "delta" => Some(Field::Delta),
            "type" => Some(Field::Type),
            "text" => Some(Field::Text),
            "thinking" => Some(Field::Thinking),
            "signature" => Some(Field::Signature),
            "partial_json" => Some(Field::PartialJson),
            _ => None,
        })
    }
}

/// The next member of `map` that `known` accepts, skipping the others; one given twice is an
/// error, as with a derived struct.
fn next_field<'de, A: MapAccess<'de>>(
    map: &mut A,
    seen: &mut u8,
    known: fn(Field) -> bool,
) -> Result<Option<Field>, A::Error> {
    loop {
        match map.next_key_seed(Key)? {
            None => return Ok(None),
            Some(Some(field)) if known(field) => {
                let bit = 1 << field as u8;
                if *seen & bit != 0 {
                    return Err(de::Error::duplicate_field(field.name()));
                }
                *seen |= bit;
                return Ok(Some(field));
            }
            Some(_) => {
                map.next_value::<IgnoredAny>()?;
            }
        }
    }
}

/// The event object: `index` and `delta` (its `type` member is the SSE event's name again).
struct Event<'o, 'a>(&'o mut BlockDelta<'a>);

impl<'de: 'a, 'a> Visitor<'de> for Event<'_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a content_block_delta object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.0;
        let mut seen = 0;
        let known = |f| matches!(f, Field::Index | Field::Delta);
        while let Some(field) = next_field(&mut map, &mut seen, known)? {
            match field {
                Field::Index => out.index = Some(map.next_value()?),
                _ => map.next_value_seed(Delta(&mut *out))?,
            }
        }
        Ok(())
    }
}

/// The `delta` object.
struct Delta<'o, 'a>(&'o mut BlockDelta<'a>);

impl<'de: 'a, 'a> DeserializeSeed<'de> for Delta<'_, 'a> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for Delta<'_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a delta object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.0;
        let mut seen = 0;
        let known = |f| !matches!(f, Field::Index | Field::Delta);
        while let Some(field) = next_field(&mut map, &mut seen, known)? {
            match field {
                Field::Type => out.kind = Some(map.next_value()?),
                Field::Text => out.text = map.next_value()?,
                Field::Thinking => out.thinking = map.next_value()?,
                Field::Signature => out.signature = map.next_value()?,
                _ => out.partial_json = map.next_value()?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(data: &str) -> serde_json::Result<BlockDelta<'_>> {
        let mut d = BlockDelta::default();
        d.read(data).map(|()| d)
    }

    #[test]
    fn a_text_delta() {
        let d = read(r#"{"type":"content_block_delta","index":2,"delta":{"type":"text_delta","text":"a\nb"}}"#)
            .unwrap();
        assert_eq!(d.index, Some(2));
        assert_eq!(d.kind, Some("text_delta"));
        assert_eq!(d.text.as_deref(), Some("a\nb"));
        assert!(d.thinking.is_none() && d.signature.is_none() && d.partial_json.is_none());
    }

    #[test]
    fn members_in_any_order_and_unknown_ones() {
        let d = read(r#"{"delta":{"partial_json":"{\"a\"","extra":[1],"type":"input_json_delta"},"x":null,"index":0}"#)
            .unwrap();
        assert_eq!(d.index, Some(0));
        assert_eq!(d.kind, Some("input_json_delta"));
        assert_eq!(d.partial_json.as_deref(), Some("{\"a\""));
        let d = read(
            r#"{"index":1,"delta":{"type":"thinking_delta","thinking":"hm","signature":null}}"#,
        )
        .unwrap();
        assert_eq!(d.thinking.as_deref(), Some("hm"));
        assert!(d.signature.is_none());
    }

    #[test]
    fn what_the_tagged_enum_must_decide_is_an_error() {
        for bad in [
            r#"{"index":0,"index":1,"delta":{"type":"text_delta","text":"a"}}"#,
            r#"{"index":0,"delta":{"type":"text_delta","text":"a","text":"b"}}"#,
            r#"{"index":"0","delta":{"type":"text_delta","text":"a"}}"#,
            r#"{"index":0,"delta":{"type":"text\u005fdelta","text":"a"}}"#,
            r#"{"index":0,"delta":{"type":"text_delta","text":1}}"#,
            r#"{"index":0,"delta":"text"}"#,
            r#"{"index":0,"delta":{}} trailing"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
    }
}
