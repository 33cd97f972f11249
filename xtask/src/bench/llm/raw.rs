//! The raw baseline: one `reqwest::Client` built as the adapters build theirs, a POST of the same
//! request, the body read with `sse-stream` (streamed) or whole, and each event's data parsed
//! with serde_json into a minimal struct, the text accumulated; what a hand-written client of
//! either provider would do, and no more. The Anthropic one picks the struct by the SSE event
//! name, as a hand-written client would.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde::{Deserialize, Serialize};
use sse_stream::SseByteStream;

use super::{
    ANTHROPIC_KEY, ANTHROPIC_MODEL, ANTHROPIC_VERSION, Kind, MAX_TOKENS, OPENAI_MODEL, PROMPT,
    SYSTEM,
};

/// One provider's raw client.
pub(super) struct Raw {
    kind: Kind,
    /// Built as `normandy_llm`'s `build_client` builds the adapters' (the default `HttpConfig`):
    /// the same timeouts, no retry layer, rustls with ring.
    client: reqwest::Client,
    stream_url: String,
    whole_url: String,
}

impl Raw {
    pub(super) fn new(kind: Kind, stream_url: String, whole_url: String) -> Result<Self> {
        // The adapters install ring as the process's provider when they build their client;
        // this makes the raw client's build independent of that order.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(120))
            .user_agent("bench-raw/0")
            .retry(reqwest::retry::never())
            .build()?;
        Ok(Self {
            kind,
            client,
            stream_url,
            whole_url,
        })
    }

    /// One response, streamed or whole, begun at `started`; returns its text's length and, for
    /// a streamed one, the time to its first text.
    pub(super) async fn once(
        &self,
        stream: bool,
        started: Instant,
    ) -> Result<(usize, Option<Duration>)> {
        let response = self.post(stream)?.send().await?.error_for_status()?;
        let mut answer = RawAnswer::new(started);
        if !stream {
            let body = response.bytes().await?;
            answer.whole(self.kind, &body)?;
            return answer.finish();
        }
        let mut events = SseByteStream::new(response.bytes_stream());
        while let Some(event) = events.next().await {
            let event = event?;
            if answer.event(self.kind, event.event.as_deref(), event.data.as_deref())? {
                return answer.finish();
            }
        }
        bail!("the raw stream ended before its end marker")
    }

    /// The POST of the bench's request, as the provider's own docs write it.
    fn post(&self, stream: bool) -> Result<reqwest::RequestBuilder> {
        let url = if stream {
            &self.stream_url
        } else {
            &self.whole_url
        };
        let post = self.client.post(url);
        Ok(match self.kind {
            Kind::OpenAi => {
                let body = serde_json::to_vec(&OpenAiBody {
                    model: OPENAI_MODEL,
                    messages: [
                        RawMessage {
                            role: "system",
                            content: SYSTEM,
                        },
                        RawMessage {
                            role: "user",
                            content: PROMPT,
                        },
                    ],
                    max_tokens: MAX_TOKENS,
                    stream: stream.then_some(true),
                    stream_options: stream.then_some(StreamOptions {
                        include_usage: true,
                    }),
                })?;
                let post = post.header(CONTENT_TYPE, "application/json").body(body);
                if stream {
                    post.header(ACCEPT, "text/event-stream")
                } else {
                    post
                }
            }
            Kind::Anthropic => {
                let body = serde_json::to_vec(&AnthropicBody {
                    model: ANTHROPIC_MODEL,
                    max_tokens: MAX_TOKENS,
                    system: SYSTEM,
                    messages: [RawMessage {
                        role: "user",
                        content: PROMPT,
                    }],
                    stream: stream.then_some(true),
                })?;
                post.header("x-api-key", ANTHROPIC_KEY)
                    .header("anthropic-version", ANTHROPIC_VERSION)
                    .header(CONTENT_TYPE, "application/json")
                    .body(body)
            }
        })
    }
}

/// What the raw client keeps of an answer: as much as `Done` carries for a text answer.
struct RawAnswer {
    started: Instant,
    /// When the first text arrived.
    first: Option<Duration>,
    text: String,
    stop: Option<String>,
    output_tokens: u64,
}

impl RawAnswer {
    fn new(started: Instant) -> Self {
        Self {
            started,
            first: None,
            text: String::new(),
            stop: None,
            output_tokens: 0,
        }
    }

    fn push(&mut self, text: &str) {
        if self.first.is_none() {
            self.first = Some(self.started.elapsed());
        }
        self.text.push_str(text);
    }

    /// One SSE event of a streamed answer; true at the provider's end marker.
    fn event(&mut self, kind: Kind, name: Option<&str>, data: Option<&str>) -> Result<bool> {
        match kind {
            Kind::OpenAi => {
                let Some(data) = data else { return Ok(false) };
                if data == "[DONE]" {
                    return Ok(true);
                }
                let chunk: RawChunk = serde_json::from_str(data)?;
                if let Some(usage) = chunk.usage {
                    self.output_tokens = usage.completion_tokens;
                }
                if let Some(choice) = chunk.choices.into_iter().next() {
                    if let Some(text) = choice.delta.content {
                        self.push(&text);
                    }
                    if choice.finish_reason.is_some() {
                        self.stop = choice.finish_reason;
                    }
                }
            }
            Kind::Anthropic => {
                let (Some(name), Some(data)) = (name, data) else {
                    return Ok(false);
                };
                match name {
                    "content_block_delta" => {
                        let delta: RawBlockDelta = serde_json::from_str(data)?;
                        if let Some(text) = delta.delta.text {
                            self.push(&text);
                        }
                    }
                    "message_start" => {
                        let start: RawMessageStart = serde_json::from_str(data)?;
                        self.output_tokens = start.message.usage.output_tokens;
                    }
                    "content_block_start" => {
                        let start: RawBlockStart = serde_json::from_str(data)?;
                        ensure!(start.content_block.kind == "text", "not a text block");
                    }
                    "message_delta" => {
                        let delta: RawMessageDelta = serde_json::from_str(data)?;
                        self.stop = delta.delta.stop_reason;
                        self.output_tokens = delta.usage.output_tokens;
                    }
                    "message_stop" => return Ok(true),
                    "error" => bail!("an error event: {data}"),
                    _ => {}
                }
            }
        }
        Ok(false)
    }

    /// A whole (non-streamed) answer's body.
    fn whole(&mut self, kind: Kind, body: &[u8]) -> Result<()> {
        match kind {
            Kind::OpenAi => {
                let completion: RawCompletion = serde_json::from_slice(body)?;
                let choice = completion.choices.into_iter().next().context("no choice")?;
                self.text = choice.message.content.unwrap_or_default();
                self.stop = choice.finish_reason;
                self.output_tokens = completion.usage.map_or(0, |u| u.completion_tokens);
            }
            Kind::Anthropic => {
                let message: RawWholeMessage = serde_json::from_slice(body)?;
                self.text = message
                    .content
                    .into_iter()
                    .filter(|b| b.kind == "text")
                    .filter_map(|b| b.text)
                    .collect();
                self.stop = message.stop_reason;
                self.output_tokens = message.usage.output_tokens;
            }
        }
        Ok(())
    }

    /// The text's length and the time to its first piece.
    fn finish(self) -> Result<(usize, Option<Duration>)> {
        ensure!(self.stop.is_some(), "no stop reason");
        ensure!(self.output_tokens > 0, "no usage");
        Ok((self.text.len(), self.first))
    }
}

// ---------------------------------------------------------------------------------------------
// The wire types: what a hand-written client would read, and no more.

#[derive(Serialize)]
struct RawMessage {
    role: &'static str,
    content: &'static str,
}

#[derive(Serialize)]
struct OpenAiBody {
    model: &'static str,
    messages: [RawMessage; 2],
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct AnthropicBody {
    model: &'static str,
    max_tokens: u32,
    system: &'static str,
    messages: [RawMessage; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
}

#[derive(Deserialize)]
struct RawChunk {
    #[serde(default)]
    choices: Vec<RawChoice>,
    usage: Option<RawUsage>,
}

#[derive(Deserialize)]
struct RawChoice {
    #[serde(default)]
    delta: RawDelta,
    finish_reason: Option<String>,
}

#[derive(Default, Deserialize)]
struct RawDelta {
    content: Option<String>,
}

#[derive(Deserialize)]
struct RawUsage {
    completion_tokens: u64,
}

#[derive(Deserialize)]
struct RawCompletion {
    choices: Vec<RawCompletionChoice>,
    usage: Option<RawUsage>,
}

#[derive(Deserialize)]
struct RawCompletionChoice {
    message: RawCompletionMessage,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct RawCompletionMessage {
    content: Option<String>,
}

#[derive(Deserialize)]
struct RawBlockDelta {
    delta: RawTextDelta,
}

#[derive(Deserialize)]
struct RawTextDelta {
    text: Option<String>,
}

#[derive(Deserialize)]
struct RawMessageStart {
    message: RawStartMessage,
}

#[derive(Deserialize)]
struct RawStartMessage {
    usage: RawAnthropicUsage,
}

#[derive(Deserialize)]
struct RawBlockStart {
    content_block: RawBlockKind,
}

#[derive(Deserialize)]
struct RawBlockKind {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct RawMessageDelta {
    delta: RawStop,
    usage: RawAnthropicUsage,
}

#[derive(Deserialize)]
struct RawStop {
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct RawAnthropicUsage {
    #[serde(default)]
    output_tokens: u64,
}

#[derive(Deserialize)]
struct RawWholeMessage {
    content: Vec<RawWholeBlock>,
    stop_reason: Option<String>,
    usage: RawAnthropicUsage,
}

#[derive(Deserialize)]
struct RawWholeBlock {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}
