//! Reading one `chat.completion.chunk`: hand-written serde visitors for the chunk, its first
//! choice and that choice's delta, which write each field once into a [`Chunk`] on the parser's
//! stack.
//!
//! Why not `#[derive(Deserialize)]` on nested structs (chunk → choices → choice → delta), as this
//! was: each derived layer builds its value and returns it by value through `Option` and `Result`
//! wrappers, so the ~200-byte choice was copied at every level, and every field a struct knows
//! costs its share of that whether it is present or not. Measured under callgrind on the bench's
//! text chunk (`cargo xtask bench llm`): the derived types took 6,160 instructions a chunk, a raw
//! client's minimal derive (`choices[].delta.content` only) 5,375, these visitors 5,680. Usage
//! (once a stream) and tool-call pieces keep their derived types.
//!
//! What is read is what the derived types read, with the same errors: the first choice of index
//! 0 (or without an index); later choices are still read as choices, so a chunk that would not
//! parse as a whole still fails; a member given twice is serde's `duplicate field` error; `null`
//! stands for an absent member; unknown members are skipped. `id` and `model` are borrowed from
//! the event when they have no JSON escapes and copied when they have; `id` is read only until
//! the parser has one (only the first is kept).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::openai::response::WireUsage;

/// What a chunk carries that the parser uses.
#[derive(Debug, Default)]
pub(super) struct Chunk<'a> {
    pub(super) id: Option<Cow<'a, str>>,
    pub(super) model: Option<Cow<'a, str>>,
    /// The chunk has an `error` member that is not `null`: it reports a failure.
    pub(super) error: bool,
    /// Boxed: it comes once a stream, and a smaller `Chunk` is less to clear and drop per event.
    pub(super) usage: Option<Box<WireUsage>>,
    /// The first choice of index 0 (or without an index); all `None` when there is none.
    pub(super) choice: Choice,
}

/// One choice's fields, its delta's among them (`None` as well when it has no delta).
#[derive(Debug, Default)]
pub(super) struct Choice {
    pub(super) index: Option<u64>,
    pub(super) finish_reason: Option<String>,
    pub(super) content: Option<String>,
    pub(super) reasoning_content: Option<String>,
    pub(super) reasoning: Option<String>,
    pub(super) refusal: Option<String>,
    pub(super) tool_calls: Option<Vec<ToolDelta>>,
}

/// A piece of a streamed tool call.
#[derive(Debug, Deserialize)]
pub(super) struct ToolDelta {
    pub(super) index: Option<u64>,
    pub(super) id: Option<String>,
    pub(super) function: Option<FunctionDelta>,
}

#[derive(Debug, Deserialize)]
pub(super) struct FunctionDelta {
    pub(super) name: Option<String>,
    pub(super) arguments: Option<String>,
}

impl<'a> Chunk<'a> {
    /// Reads `data`, a whole chunk, into `self` (a fresh `Chunk`). On an error `self` holds
    /// whatever was read before it. With `want_id` false, `id` is skipped unread: the parser
    /// keeps the first one, and every chunk repeats it.
    pub(super) fn read(&mut self, data: &'a str, want_id: bool) -> serde_json::Result<()> {
        let mut de = serde_json::Deserializer::from_str(data);
        ChunkSeed {
            chunk: self,
            want_id,
        }
        .deserialize(&mut de)?;
        de.end()
    }
}

// ---------------------------------------------------------------------------------------------
// Member names

/// The members a level knows, as a derived struct's field identifiers are.
trait Field: Copy {
    fn from_name(name: &str) -> Option<Self>;
    fn name(self) -> &'static str;
    /// This member's bit in a `seen` mask.
    fn bit(self) -> u8;
}

/// A member name, read as one of `F` or (unknown) `None`.
struct Key<F>(PhantomData<F>);

impl<'de, F: Field> DeserializeSeed<'de> for Key<F> {
    type Value = Option<F>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<F>, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de, F: Field> Visitor<'de> for Key<F> {
    type Value = Option<F>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<F>, E> {
        Ok(F::from_name(v))
    }
}

/// The next member of `map` that this level knows, skipping unknown ones; a known one given a
/// second time is an error, as with a derived struct.
fn next_field<'de, A: MapAccess<'de>, F: Field>(
    map: &mut A,
    seen: &mut u8,
) -> Result<Option<F>, A::Error> {
    loop {
        match map.next_key_seed(Key::<F>(PhantomData))? {
            None => return Ok(None),
            Some(None) => {
                map.next_value::<IgnoredAny>()?;
            }
            Some(Some(field)) => {
                if *seen & field.bit() != 0 {
                    return Err(de::Error::duplicate_field(field.name()));
                }
                *seen |= field.bit();
                return Ok(Some(field));
            }
        }
    }
}

macro_rules! fields {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $key:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy)]
        enum $name {
            $($variant),*
        }

        impl Field for $name {
                    fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($key => Some(Self::$variant),)*
                    _ => None,
                }
            }

            fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $key),*
                }
            }

                    fn bit(self) -> u8 {
                1 << self as u8
            }
        }
    };
}

fields!(
    /// A chunk's members.
    ChunkField { Id = "id", Model = "model", Error = "error", Choices = "choices", Usage = "usage" }
);
fields!(
    /// A choice's members.
    ChoiceField { Index = "index", Delta = "delta", FinishReason = "finish_reason" }
);
fields!(
    /// A delta's members.
    DeltaField {
        Content = "content",
        ReasoningContent = "reasoning_content",
        Reasoning = "reasoning",
        Refusal = "refusal",
        ToolCalls = "tool_calls",
    }
);

// ---------------------------------------------------------------------------------------------
// The levels

/// A string or `null`, borrowed from the input when it has no escapes.
struct Text<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_option(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Text<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_none<E: de::Error>(self) -> Result<Text<'de>, E> {
        Ok(Text(None))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Text<'de>, E> {
        Ok(Text(None))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Text<'de>, D::Error> {
        d.deserialize_str(self)
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
        Ok(Text(Some(Cow::Borrowed(v))))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
        Ok(Text(Some(Cow::Owned(v.to_owned()))))
    }
}

/// The chunk object.
struct ChunkSeed<'c, 'a> {
    chunk: &'c mut Chunk<'a>,
    /// Whether to read `id` (else it is skipped).
    want_id: bool,
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for ChunkSeed<'_, 'a> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for ChunkSeed<'_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a chat.completion.chunk object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let chunk = self.chunk;
        let mut seen = 0;
        while let Some(field) = next_field(&mut map, &mut seen)? {
            match field {
                ChunkField::Id if !self.want_id => {
                    map.next_value::<IgnoredAny>()?;
                }
                ChunkField::Id => chunk.id = map.next_value::<Text<'de>>()?.0,
                ChunkField::Model => chunk.model = map.next_value::<Text<'de>>()?.0,
                ChunkField::Error => {
                    chunk.error = map.next_value::<Option<IgnoredAny>>()?.is_some();
                }
                ChunkField::Choices => map.next_value_seed(Choices(&mut chunk.choice))?,
                ChunkField::Usage => chunk.usage = map.next_value()?,
            }
        }
        Ok(())
    }
}

/// `choices` (or `null`): the first choice of index 0 into the `Choice`, the others read and
/// dropped.
struct Choices<'c>(&'c mut Choice);

impl<'de> DeserializeSeed<'de> for Choices<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for Choices<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let first = self.0;
        loop {
            if seq.next_element_seed(ChoiceSeed(first))?.is_none() {
                return Ok(());
            }
            if first.index.unwrap_or(0) == 0 {
                break;
            }
            *first = Choice::default();
        }
        while seq.next_element_seed(OtherChoice)?.is_some() {}
        Ok(())
    }
}

/// A choice after the first: read as one (so that a chunk that would not parse as a whole still
/// fails), then dropped. Its `Choice` is made only when there is one to read.
struct OtherChoice;

impl<'de> DeserializeSeed<'de> for OtherChoice {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        ChoiceSeed(&mut Choice::default()).deserialize(d)
    }
}

/// One choice object.
struct ChoiceSeed<'c>(&'c mut Choice);

impl<'de> DeserializeSeed<'de> for ChoiceSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ChoiceSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a choice object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let choice = self.0;
        let mut seen = 0;
        while let Some(field) = next_field(&mut map, &mut seen)? {
            match field {
                ChoiceField::Index => choice.index = map.next_value()?,
                ChoiceField::FinishReason => choice.finish_reason = map.next_value()?,
                ChoiceField::Delta => map.next_value_seed(DeltaSeed(choice))?,
            }
        }
        Ok(())
    }
}

/// A choice's `delta` (or `null`), into the choice's own fields.
struct DeltaSeed<'c>(&'c mut Choice);

impl<'de> DeserializeSeed<'de> for DeltaSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for DeltaSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a delta object")
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let choice = self.0;
        let mut seen = 0;
        while let Some(field) = next_field(&mut map, &mut seen)? {
            match field {
                DeltaField::Content => choice.content = map.next_value()?,
                DeltaField::ReasoningContent => choice.reasoning_content = map.next_value()?,
                DeltaField::Reasoning => choice.reasoning = map.next_value()?,
                DeltaField::Refusal => choice.refusal = map.next_value()?,
                DeltaField::ToolCalls => choice.tool_calls = map.next_value()?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(data: &str) -> serde_json::Result<Chunk<'_>> {
        let mut chunk = Chunk::default();
        chunk.read(data, true).map(|()| chunk)
    }

    #[test]
    fn a_text_chunk_borrows_its_id_and_model() {
        let c = read(r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":null,"choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}],"usage":null}"#).unwrap();
        assert!(matches!(c.id, Some(Cow::Borrowed("c1"))));
        assert!(matches!(c.model, Some(Cow::Borrowed("m"))));
        assert_eq!(c.choice.content.as_deref(), Some("Hi"));
        assert_eq!(c.choice.index, Some(0));
        assert!(c.choice.finish_reason.is_none() && c.usage.is_none() && !c.error);
    }

    #[test]
    fn the_id_is_skipped_once_the_parser_has_one() {
        let mut c = Chunk::default();
        c.read(r#"{"id":"c2","model":"m","choices":[]}"#, false)
            .unwrap();
        assert!(c.id.is_none());
        assert_eq!(c.model.as_deref(), Some("m"));
    }

    #[test]
    fn escaped_strings_are_read_too() {
        let c = read(r#"{"id":"c\"1","model":"m\u00e9","choices":[{"delta":{"content":"a\nb"}}]}"#)
            .unwrap();
        assert_eq!(c.id.as_deref(), Some("c\"1"));
        assert_eq!(c.model.as_deref(), Some("mé"));
        assert_eq!(c.choice.content.as_deref(), Some("a\nb"));
    }

    #[test]
    fn the_first_choice_of_index_zero_is_kept_and_the_others_still_read() {
        let c = read(
            r#"{"choices":[{"index":1,"delta":{"content":"one"}},{"index":0,"delta":{"content":"zero"},"finish_reason":"stop"},{"index":2,"delta":{"content":"two"}}]}"#,
        )
        .unwrap();
        assert_eq!(c.choice.content.as_deref(), Some("zero"));
        assert_eq!(c.choice.finish_reason.as_deref(), Some("stop"));
        let c = read(r#"{"choices":[{"index":1,"delta":{"content":"one"}}]}"#).unwrap();
        assert!(c.choice.content.is_none() && c.choice.index.is_none());
        // A later choice of the wrong shape fails the chunk, as it did with derived types.
        assert!(read(r#"{"choices":[{"index":0},{"index":"x"}]}"#).is_err());
    }

    #[test]
    fn nulls_and_empty_members_are_absent() {
        let c =
            read(r#"{"id":null,"model":null,"error":null,"choices":null,"usage":null}"#).unwrap();
        assert!(c.id.is_none() && c.model.is_none() && !c.error);
        let c = read(r#"{"choices":[{"index":0,"delta":null,"finish_reason":"length"}]}"#).unwrap();
        assert_eq!(c.choice.finish_reason.as_deref(), Some("length"));
        assert!(c.choice.content.is_none());
        let c =
            read(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#).unwrap();
        assert!(c.usage.is_some());
    }

    #[test]
    fn an_error_member_is_flagged() {
        let c = read(r#"{"error":{"message":"boom","type":"server_error"}}"#).unwrap();
        assert!(c.error);
    }

    #[test]
    fn tool_call_pieces_and_reasoning_are_read() {
        let c = read(
            r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hm","reasoning":"hm2","refusal":"no","tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":"{"}}]}}]}"#,
        )
        .unwrap();
        assert_eq!(c.choice.reasoning_content.as_deref(), Some("hm"));
        assert_eq!(c.choice.reasoning.as_deref(), Some("hm2"));
        assert_eq!(c.choice.refusal.as_deref(), Some("no"));
        let calls = c.choice.tool_calls.unwrap();
        assert_eq!(calls[0].id.as_deref(), Some("call_1"));
        let f = calls[0].function.as_ref().unwrap();
        assert_eq!(
            (f.name.as_deref(), f.arguments.as_deref()),
            (Some("f"), Some("{"))
        );
    }

    #[test]
    fn wrong_shapes_and_repeated_members_are_errors() {
        for bad in [
            r#"{"id":5}"#,
            r#"{"choices":{}}"#,
            r#"{"choices":[{"delta":"x"}]}"#,
            r#"{"choices":[{"index":"0"}]}"#,
            r#"{"choices":[{"delta":{"content":1}}]}"#,
            r#"{"id":"a","id":"b"}"#,
            r#"{"choices":[{"delta":{"content":null,"content":"x"}}]}"#,
            r#"{"choices":[]} trailing"#,
            r#"[]"#,
        ] {
            let e = read(bad).unwrap_err();
            assert!(!e.to_string().is_empty(), "{bad}");
        }
        let e = read(r#"{"model":"a","model":"b"}"#).unwrap_err();
        assert!(e.to_string().contains("duplicate field `model`"), "{e}");
    }
}
