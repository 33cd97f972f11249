//! `cargo xtask bench llm`: what the model adapters (`normandy-llm`'s OpenAI and Anthropic
//! clients) add to a streamed response, in latency and client CPU, beside the best raw client of
//! the same shape reading the same mock stream in the same run. Target: ours ≤ 1.1× the raw
//! client's CPU per response, and ≤ 50 µs added latency (p50).
//!
//! - The server is a mock on loopback, in its own OS thread with its own tokio runtime, so its
//!   CPU is not counted as the client's. It speaks raw HTTP/1.1 with keep-alive: one listener per
//!   (provider, streamed or whole answer), each answering every POST with the same pre-rendered
//!   bytes after reading the request head and its body (by Content-Length). A streamed answer is
//!   a realistic one, sent chunked with one HTTP chunk per event as the providers send it: for
//!   OpenAI a role chunk, 200 text deltas of 4–8 characters, the finish_reason chunk, the usage
//!   chunk and `[DONE]`; for Anthropic message_start, content_block_start, 200 text_delta
//!   events, content_block_stop, message_delta and message_stop, with a few pings.
//! - The client runs on the benchmark's main thread in a current-thread tokio runtime, so all of
//!   its work (hyper's connection task, timers, SSE framing, JSON) runs on that one thread and
//!   `getrusage(RUSAGE_THREAD)` around a phase is the client's CPU for that phase.
//! - Paths, per provider. Raw: one `reqwest::Client` built with the adapter's options, a POST of
//!   the same request, the body read with `sse-stream`, each event's data parsed with serde_json
//!   into a minimal struct, the text accumulated (the Anthropic one picks the struct by the SSE
//!   event name, as a hand-written client would; `raw`). Ours: the adapter's `stream()`, consumed to
//!   `Done`. For information, the whole (non-streamed) answer too: raw POST + serde_json beside
//!   the adapter's `complete()`.
//! - After a warm-up, 10 rounds of 200 responses per path, the paths' order rotating each round,
//!   so a slow spell on a small shared VM hits every path alike.
//!
//! Latency runs from the call to the last event (`Done`, `[DONE]`, `message_stop`, the parsed
//! body). The server writes a whole answer at once, so this latency is mostly the client's own
//! work on the response: the adapter's added latency is its added work over all 200 events, not
//! network waits. A real stream trickles in over seconds, where what a user waits for is the work
//! on one event; the time to the first text delta (request building, sending, the headers, the
//! first events) is printed beside it for that reason.
//!
//! `NORMANDY_BENCH_LLM_ONLY=openai` (or `anthropic`) runs one provider only: for a profile of
//! one adapter, e.g. `valgrind --tool=callgrind target/release/xtask bench llm --quick`.

mod mock;
mod raw;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use futures::StreamExt;
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::time::TimeValLike;
use normandy_core::{
    ContentBlock, LlmClient, Message, ModelEvent, ModelRequest, ModelResponse, SessionId,
};
use normandy_llm::anthropic::{AnthropicClient, AnthropicConfig};
use normandy_llm::openai::{OpenAiClient, OpenAiConfig};

use self::mock::{Answers, Mock};
use self::raw::Raw;
use super::report;

/// Text deltas per streamed answer: a few paragraphs, a typical chat answer.
const DELTAS: usize = 200;
/// The added latency the issue allows, at p50.
const TARGET_ADDED: Duration = Duration::from_micros(50);
/// The CPU ratio (ours / raw) the issue allows.
const TARGET_CPU_RATIO: f64 = 1.1;

const SYSTEM: &str = "You are a storyteller. Answer in plain prose.";
const PROMPT: &str = "Tell me a short story about a fox who sees snow for the first time.";
const MAX_TOKENS: u32 = 1024;
const OPENAI_MODEL: &str = "gpt-4o-mini";
const ANTHROPIC_MODEL: &str = "claude-sonnet-4-5";
const ANTHROPIC_VERSION: &str = "2023-06-01";
const ANTHROPIC_KEY: &str = "sk-ant-bench-0000";

pub(crate) fn run(quick: bool) -> Result<()> {
    let (rounds, per_round, warm_up) = if quick { (2, 50, 50) } else { (10, 200, 200) };
    let pieces = mock::pieces();
    let text: String = pieces.concat();
    let answers = Answers::render(&pieces, &text);
    let stream_kb = [
        answers.openai_stream.len() as f64 / 1024.0,
        answers.anthropic_stream.len() as f64 / 1024.0,
    ];
    // Declared before the client's runtime, so it is dropped after it (the clients' pooled
    // connections close before their server does).
    let mock = Mock::start(&answers)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!(
        "bench llm (mock provider on loopback in its own thread; client on one current-thread \
         runtime; {DELTAS} text deltas per answer; {rounds} rounds × {per_round} responses per \
         path after {warm_up} of warm-up)"
    );
    let only = std::env::var("NORMANDY_BENCH_LLM_ONLY").ok();
    rt.block_on(async {
        for (kind, kb) in [Kind::OpenAi, Kind::Anthropic].into_iter().zip(stream_kb) {
            if only.as_deref().is_some_and(|only| only != kind.name()) {
                continue;
            }
            let bench = Bench::new(kind, &mock, text.len())?;
            bench.run(rounds, per_round, warm_up, kb).await?;
        }
        anyhow::Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// The clients

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    OpenAi,
    Anthropic,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::OpenAi => "openai",
            Kind::Anthropic => "anthropic",
        }
    }
}

/// The paths measured, in their starting order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    RawStream,
    OursStream,
    RawWhole,
    OursWhole,
}

const PATHS: [Path; 4] = [
    Path::RawStream,
    Path::OursStream,
    Path::RawWhole,
    Path::OursWhole,
];

/// One provider's clients, raw and ours.
struct Bench {
    kind: Kind,
    /// The raw client, streamed and whole.
    raw: Raw,
    /// Ours, one client per mock listener (streamed answers and whole ones).
    ours_stream: Box<dyn LlmClient>,
    ours_whole: Box<dyn LlmClient>,
    request: ModelRequest,
    /// The answer's text length, checked on every response so no path skips work.
    text_len: usize,
}

/// What one path measured.
#[derive(Default)]
struct Measured {
    latencies: Vec<Duration>,
    /// Time to the first text delta (streamed paths only).
    first_deltas: Vec<Duration>,
    cpu: Duration,
}

impl Measured {
    fn cpu_per_response(&self) -> Duration {
        self.cpu / self.latencies.len().max(1) as u32
    }
}

impl Bench {
    fn new(kind: Kind, mock: &Mock, text_len: usize) -> Result<Self> {
        let (stream_port, whole_port) = match kind {
            Kind::OpenAi => (0, 1),
            Kind::Anthropic => (2, 3),
        };
        let (ours_stream, ours_whole, path, model): (Box<dyn LlmClient>, Box<dyn LlmClient>, _, _) =
            match kind {
                Kind::OpenAi => {
                    let client = |port| {
                        OpenAiClient::new(
                            OpenAiConfig::default().base_url(format!("{}/v1", mock.url(port))),
                        )
                    };
                    (
                        Box::new(client(stream_port)?),
                        Box::new(client(whole_port)?),
                        "/v1/chat/completions",
                        OPENAI_MODEL,
                    )
                }
                Kind::Anthropic => {
                    let client = |port| {
                        AnthropicClient::new(
                            ANTHROPIC_KEY,
                            AnthropicConfig::new().base_url(mock.url(port)),
                        )
                    };
                    (
                        Box::new(client(stream_port)?),
                        Box::new(client(whole_port)?),
                        "/v1/messages",
                        ANTHROPIC_MODEL,
                    )
                }
            };
        let raw = Raw::new(
            kind,
            format!("{}{path}", mock.url(stream_port)),
            format!("{}{path}", mock.url(whole_port)),
        )?;
        let params = BTreeMap::from([("max_tokens".to_owned(), MAX_TOKENS.into())]);
        let request = ModelRequest {
            session: SessionId::new("bench-llm")?,
            model: model.to_owned(),
            system: Some(SYSTEM.to_owned()),
            messages: Arc::new(vec![Message::user(PROMPT)]),
            tools: Vec::new().into(),
            params: Arc::new(params),
        };
        Ok(Self {
            kind,
            raw,
            ours_stream,
            ours_whole,
            request,
            text_len,
        })
    }

    async fn run(&self, rounds: usize, per_round: usize, warm_up: usize, kb: f64) -> Result<()> {
        let name = self.kind.name();
        for path in PATHS {
            // Warm-up: connections open, pools and allocator caches filled, code paged in.
            let mut scratch = Measured::default();
            self.phase(path, warm_up, &mut scratch).await?;
        }
        let mut measured: [Measured; 4] = Default::default();
        for round in 0..rounds {
            for k in 0..PATHS.len() {
                let at = (round + k) % PATHS.len();
                self.phase(PATHS[at], per_round, &mut measured[at]).await?;
            }
        }
        let [raw_stream, ours_stream, raw_whole, ours_whole] = &mut measured;
        let stream_label = match self.kind {
            Kind::OpenAi => "chat completions",
            Kind::Anthropic => "messages",
        };
        let whole_label = "raw reqwest + serde_json";
        println!(
            "{name} ({stream_label}; {DELTAS} text deltas, {kb:.1} KB per streamed answer), \
             ours vs raw reqwest + sse-stream + serde_json:"
        );
        let raw_label = "raw stream";
        let (raw_p50, ours_p50) = (
            report::percentile(&mut raw_stream.latencies, 0.5),
            report::percentile(&mut ours_stream.latencies, 0.5),
        );
        report::latency(
            &format!("{name} stream(), latency p50"),
            ours_p50,
            &format!("{raw_label}, p50"),
            raw_p50,
        );
        report::latency(
            &format!("{name} stream(), latency p99"),
            report::percentile(&mut ours_stream.latencies, 0.99),
            &format!("{raw_label}, p99"),
            report::percentile(&mut raw_stream.latencies, 0.99),
        );
        report::latency(
            &format!("{name} stream(), first delta p50"),
            report::percentile(&mut ours_stream.first_deltas, 0.5),
            &format!("{raw_label}, first delta p50"),
            report::percentile(&mut raw_stream.first_deltas, 0.5),
        );
        let (raw_cpu, ours_cpu) = (
            raw_stream.cpu_per_response(),
            ours_stream.cpu_per_response(),
        );
        report::latency(
            &format!("{name} stream(), client CPU per response"),
            ours_cpu,
            &format!("{raw_label}, CPU per response"),
            raw_cpu,
        );
        report::latency(
            &format!("{name} complete(), latency p50"),
            report::percentile(&mut ours_whole.latencies, 0.5),
            &format!("{whole_label}, p50"),
            report::percentile(&mut raw_whole.latencies, 0.5),
        );
        report::latency(
            &format!("{name} complete(), client CPU per response"),
            ours_whole.cpu_per_response(),
            &format!("{whole_label}, CPU"),
            raw_whole.cpu_per_response(),
        );
        let added_us = (ours_p50.as_secs_f64() - raw_p50.as_secs_f64()) * 1e6;
        let cpu_ratio = ours_cpu.as_secs_f64() / raw_cpu.as_secs_f64();
        let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
        println!(
            "  {name} stream(): added latency (p50) {added_us:.1} µs (target ≤ {} µs): {}; \
             CPU ours/raw {cpu_ratio:.2} (target ≤ {TARGET_CPU_RATIO:.2}): {}",
            TARGET_ADDED.as_micros(),
            verdict(added_us <= TARGET_ADDED.as_secs_f64() * 1e6),
            verdict(cpu_ratio <= TARGET_CPU_RATIO),
        );
        Ok(())
    }

    /// Runs `n` responses of one path, adding their latencies and the thread's CPU to `into`.
    async fn phase(&self, path: Path, n: usize, into: &mut Measured) -> Result<()> {
        let cpu = thread_cpu()?;
        for _ in 0..n {
            let started = Instant::now();
            let (len, first_delta) = self.once(path, started).await?;
            into.latencies.push(started.elapsed());
            into.first_deltas.extend(first_delta);
            ensure!(
                len == self.text_len,
                "a response's text has {len} bytes, expected {}",
                self.text_len
            );
        }
        into.cpu += thread_cpu()? - cpu;
        Ok(())
    }

    /// One response by one path, begun at `started`; returns its text's length and, for a
    /// streamed path, the time to its first text delta.
    async fn once(&self, path: Path, started: Instant) -> Result<(usize, Option<Duration>)> {
        match path {
            Path::OursStream => {
                let mut events = self.ours_stream.stream(self.request.clone()).await?;
                let mut first = None;
                while let Some(event) = events.next().await {
                    match event? {
                        ModelEvent::Delta(_) if first.is_none() => {
                            first = Some(started.elapsed());
                        }
                        ModelEvent::Done(response) => return Ok((text_len(&response), first)),
                        _ => {}
                    }
                }
                bail!("the adapter's stream ended without Done")
            }
            Path::OursWhole => {
                let response = self.ours_whole.complete(self.request.clone()).await?;
                Ok((text_len(&response), None))
            }
            Path::RawStream => self.raw.once(true, started).await,
            Path::RawWhole => self.raw.once(false, started).await,
        }
    }
}

/// The text length of a response's text blocks.
fn text_len(response: &ModelResponse) -> usize {
    response
        .content
        .iter()
        .map(|b| match b {
            ContentBlock::Text { text } => text.len(),
            _ => 0,
        })
        .sum()
}

/// The CPU time (user + system) of the calling thread.
fn thread_cpu() -> Result<Duration> {
    let usage = getrusage(UsageWho::RUSAGE_THREAD)?;
    let micros = usage.user_time().num_microseconds() + usage.system_time().num_microseconds();
    Ok(Duration::from_micros(micros.max(0) as u64))
}
