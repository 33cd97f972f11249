//! Messages and what they hold: [`Message`], [`ContentBlock`] (text, tool calls and results,
//! thinking, images, documents), [`Usage`] and [`CallInfo`] — what providers send, as stored.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The user (inputs and tool results).
    User,
    /// The model.
    Assistant,
}

/// One block of message content: what providers send and take back.
///
/// Stored inside entries through the versioned codec; a field added here is optional with a
/// default, so entries written before it still load, and a block without it encodes to the same
/// bytes as before. Thinking blocks are kept in history and sent back unchanged (a provider may
/// refuse a tool-use loop whose earlier thinking was edited or dropped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ContentBlock {
    /// Plain text.
    Text {
        /// The text.
        text: String,
    },
    /// The model asks for a tool call.
    ToolUse {
        /// The call id, as the model chose it: what the call's result answers. It is *not*
        /// unique (providers restart their numbering every response, and a model may repeat an
        /// id within one) and it is not the tool's idempotency key; see
        /// [the call-id and key rules](crate::tools#call-ids-and-idempotency-keys).
        id: String,
        /// The tool's name.
        name: String,
        /// The tool's input (JSON).
        input: serde_json::Value,
    },
    /// The result of a tool call.
    ToolResult {
        /// The call id this answers.
        tool_use_id: String,
        /// The result text (what every provider takes).
        content: String,
        /// Whether the call failed.
        is_error: bool,
        /// A machine-readable result (JSON) beside the text, for providers and code that use
        /// one (MCP's `structuredContent`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        structured: Option<serde_json::Value>,
        /// Further content of the result: images and documents (and text) the tool returned.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        blocks: Vec<ContentBlock>,
    },
    /// The model's visible reasoning, with the provider's signature over it.
    Thinking {
        /// The reasoning text.
        thinking: String,
        /// The provider's signature, sent back unchanged (Anthropic requires it inside a
        /// tool-use loop). `None` where the provider gives none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
    },
    /// Reasoning the provider encrypted: opaque, kept and sent back unchanged.
    RedactedThinking {
        /// The provider's opaque data.
        data: String,
    },
    /// An image.
    Image {
        /// Its MIME type (`image/png`, `image/jpeg`, `image/gif`, `image/webp`).
        media_type: String,
        /// Where its bytes are.
        source: MediaSource,
    },
    /// A document (a PDF, a plain-text file).
    Document {
        /// Its MIME type (`application/pdf`, `text/plain`).
        media_type: String,
        /// Where its bytes are.
        source: MediaSource,
        /// A title for the model, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
    },
}

/// Where the bytes of an image or a document are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum MediaSource {
    /// Inline, base64-encoded (standard alphabet, padded): stored with the entry, so it counts
    /// towards the input size limit; at most [`MAX_INLINE_MEDIA_BYTES`] decoded bytes per block.
    Base64 {
        /// The base64 text.
        data: String,
    },
    /// A URL the provider fetches.
    Url {
        /// The URL.
        url: String,
    },
    /// A file uploaded to the provider beforehand (its Files API id).
    File {
        /// The provider's file id.
        file_id: String,
    },
}

/// The largest inline image or document, in decoded bytes (5 MiB: Anthropic's per-image limit;
/// larger files go by URL or file id).
pub const MAX_INLINE_MEDIA_BYTES: usize = 5 << 20;

impl ContentBlock {
    /// A text block.
    pub fn text(text: impl Into<String>) -> Self {
        ContentBlock::Text { text: text.into() }
    }

    /// An inline image from its bytes. Refused (`InputTooLarge`) over
    /// [`MAX_INLINE_MEDIA_BYTES`], and (`InvalidInput`) with a media type that is not `image/…`.
    pub fn image_bytes(media_type: impl Into<String>, bytes: &[u8]) -> Result<Self> {
        let media_type = media_type.into();
        if !media_type.starts_with("image/") {
            return Err(Error::invalid_input(
                None,
                format!("an image needs an image/... media type, not {media_type:?}"),
            ));
        }
        Ok(ContentBlock::Image {
            source: MediaSource::inline(bytes)?,
            media_type,
        })
    }

    /// An image the provider fetches from `url`.
    pub fn image_url(media_type: impl Into<String>, url: impl Into<String>) -> Self {
        ContentBlock::Image {
            media_type: media_type.into(),
            source: MediaSource::Url { url: url.into() },
        }
    }

    /// An inline document from its bytes (refused over [`MAX_INLINE_MEDIA_BYTES`]).
    pub fn document_bytes(
        media_type: impl Into<String>,
        bytes: &[u8],
        title: Option<String>,
    ) -> Result<Self> {
        Ok(ContentBlock::Document {
            media_type: media_type.into(),
            source: MediaSource::inline(bytes)?,
            title,
        })
    }

    /// A tool result with text only.
    pub fn tool_result(
        tool_use_id: impl Into<String>,
        content: impl Into<String>,
        is_error: bool,
    ) -> Self {
        ContentBlock::ToolResult {
            tool_use_id: tool_use_id.into(),
            content: content.into(),
            is_error,
            structured: None,
            blocks: Vec::new(),
        }
    }

    /// Bytes this block stores, for size limits: text, tool input and inline media.
    pub fn stored_size(&self) -> usize {
        match self {
            ContentBlock::Text { text } => text.len(),
            ContentBlock::ToolUse { input, .. } => input.to_string().len(),
            ContentBlock::ToolResult {
                content,
                structured,
                blocks,
                ..
            } => {
                content.len()
                    + structured.as_ref().map_or(0, |s| s.to_string().len())
                    + blocks.iter().map(ContentBlock::stored_size).sum::<usize>()
            }
            ContentBlock::Thinking {
                thinking,
                signature,
            } => thinking.len() + signature.as_ref().map_or(0, String::len),
            ContentBlock::RedactedThinking { data } => data.len(),
            ContentBlock::Image { source, .. } | ContentBlock::Document { source, .. } => {
                source.stored_size()
            }
        }
    }

    /// Checks what the engine cannot send on: inline media over [`MAX_INLINE_MEDIA_BYTES`] or
    /// not valid base64 (a typed error naming the block, never a provider's 400 later).
    pub fn validate(&self) -> Result<()> {
        match self {
            ContentBlock::Image { source, .. } | ContentBlock::Document { source, .. } => {
                source.validate()
            }
            ContentBlock::ToolResult { blocks, .. } => {
                blocks.iter().try_for_each(ContentBlock::validate)
            }
            _ => Ok(()),
        }
    }
}

impl MediaSource {
    /// Inline bytes, base64-encoded; refused over [`MAX_INLINE_MEDIA_BYTES`].
    pub fn inline(bytes: &[u8]) -> Result<Self> {
        use base64::Engine as _;
        if bytes.len() > MAX_INLINE_MEDIA_BYTES {
            return Err(too_large(bytes.len()));
        }
        Ok(MediaSource::Base64 {
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
        })
    }

    /// The decoded bytes of an inline source (`None` for a URL or a file id).
    pub fn bytes(&self) -> Option<Result<Vec<u8>>> {
        use base64::Engine as _;
        match self {
            MediaSource::Base64 { data } => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .map_err(|e| {
                        Error::invalid_input(None, format!("inline media is not base64: {e}"))
                    }),
            ),
            _ => None,
        }
    }

    fn stored_size(&self) -> usize {
        match self {
            MediaSource::Base64 { data } => data.len(),
            MediaSource::Url { url } => url.len(),
            MediaSource::File { file_id } => file_id.len(),
        }
    }

    fn validate(&self) -> Result<()> {
        match self {
            MediaSource::Base64 { data } => {
                let decoded = data.len() / 4 * 3;
                if decoded > MAX_INLINE_MEDIA_BYTES + 2 {
                    return Err(too_large(decoded));
                }
                self.bytes().transpose().map(drop)
            }
            MediaSource::Url { url } if url.is_empty() => {
                Err(Error::invalid_input(None, "a media URL must not be empty"))
            }
            MediaSource::File { file_id } if file_id.is_empty() => Err(Error::invalid_input(
                None,
                "a media file id must not be empty",
            )),
            _ => Ok(()),
        }
    }
}

fn too_large(size: usize) -> Error {
    Error::invalid_input(
        None,
        format!(
            "inline media of {size} bytes exceeds the limit of {MAX_INLINE_MEDIA_BYTES} bytes \
             (send larger files by URL or provider file id)"
        ),
    )
}

/// A message of the conversation as the model sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// Its blocks.
    pub content: Vec<ContentBlock>,
}

impl Message {
    /// A user message with one text block.
    pub fn user(text: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: vec![ContentBlock::text(text)],
        }
    }

    /// An assistant message with one text block.
    pub fn assistant(text: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: vec![ContentBlock::text(text)],
        }
    }

    /// All text blocks joined with newlines.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for block in &self.content {
            if let ContentBlock::Text { text } = block {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(text);
            }
        }
        out
    }

    /// The tool calls this message asks for.
    pub fn tool_uses(&self) -> impl Iterator<Item = (&str, &str, &serde_json::Value)> {
        self.content.iter().filter_map(|b| match b {
            ContentBlock::ToolUse { id, name, input } => Some((id.as_str(), name.as_str(), input)),
            _ => None,
        })
    }
}

/// Why the model stopped. The provider's own word is kept beside it in [`CallInfo::stop`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StopReason {
    /// It finished its answer.
    EndTurn,
    /// It wants tool results.
    ToolUse,
    /// It hit the token limit.
    MaxTokens,
    /// It produced one of the request's stop sequences.
    StopSequence,
    /// It declined to answer (a refusal, or the provider's content filter).
    Refusal,
    /// The provider paused a long turn; sending the response back continues it.
    PauseTurn,
    /// Any other reason.
    Other,
}

/// Token usage. Fields a provider does not report stay 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens, not counting those read from or written to the prompt cache.
    pub input_tokens: u64,
    /// Completion tokens (reasoning included, as providers bill them).
    pub output_tokens: u64,
    /// Prompt tokens read from the provider's prompt cache.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_read_tokens: u64,
    /// Prompt tokens written to the provider's prompt cache.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_tokens: u64,
    /// Of `output_tokens`, those spent reasoning.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reasoning_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Usage {
    /// Input and output tokens, nothing cached, no reasoning.
    pub fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            input_tokens,
            output_tokens,
            ..Self::default()
        }
    }

    /// Adds another usage to this one.
    pub fn add(&mut self, other: Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_read_tokens += other.cache_read_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
    }
}

/// What a provider said about one model call, kept with its response entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallInfo {
    /// The model that answered, as the provider named it (it may differ from the one asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The provider's request id (`request-id`, `x-request-id`, or the response's `id`): what its
    /// support asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The provider's own stop reason (`end_turn`, `stop`, `length`, `content_filter`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<String>,
}

impl CallInfo {
    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        self.model.is_none() && self.request_id.is_none() && self.stop.is_none()
    }
}
