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
//!   event name, as a hand-written client would). Ours: the adapter's `stream()`, consumed to
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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::time::TimeValLike;
use normandy_core::{
    ContentBlock, LlmClient, Message, ModelEvent, ModelRequest, ModelResponse, SessionId,
};
use normandy_llm::anthropic::{AnthropicClient, AnthropicConfig};
use normandy_llm::openai::{OpenAiClient, OpenAiConfig};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde::{Deserialize, Serialize};
use sse_stream::SseByteStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
    let pieces = pieces();
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
    rt.block_on(async {
        for (kind, kb) in [Kind::OpenAi, Kind::Anthropic].into_iter().zip(stream_kb) {
            let bench = Bench::new(kind, &mock, text.len())?;
            bench.run(rounds, per_round, warm_up, kb).await?;
        }
        anyhow::Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// The answers

/// Prose cut into pieces of 4–8 characters, like the detokenised pieces of a real stream; with a
/// paragraph break and quotes, so some pieces need JSON escapes as real ones do.
fn pieces() -> Vec<String> {
    const PROSE: &str = "The fox had never seen snow before. It stepped out of the den, sniffed \
        the \"white\" air, and stood very still.\n\nThen, carefully, it began to dig: first with \
        one paw, then with both, until the drift gave way to the old grass beneath. ";
    const LENS: [usize; 7] = [5, 4, 7, 6, 8, 4, 6];
    let prose = PROSE.repeat(10);
    let mut at = 0;
    (0..DELTAS)
        .map(|i| {
            let n = LENS[i % LENS.len()];
            let piece = prose[at..at + n].to_owned();
            at += n;
            piece
        })
        .collect()
}

/// A string as a JSON string literal.
fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// The four pre-rendered HTTP responses the mock sends, head and body.
struct Answers {
    openai_stream: Vec<u8>,
    openai_whole: Vec<u8>,
    anthropic_stream: Vec<u8>,
    anthropic_whole: Vec<u8>,
}

impl Answers {
    fn render(pieces: &[String], text: &str) -> Self {
        Self {
            openai_stream: chunked("x-request-id", &openai_events(pieces)),
            openai_whole: whole("x-request-id", &openai_body(text)),
            anthropic_stream: chunked("request-id", &anthropic_events(pieces)),
            anthropic_whole: whole("request-id", &anthropic_body(text)),
        }
    }
}

/// A streamed response: one HTTP chunk per SSE event, as providers send them.
fn chunked(request_id_header: &str, events: &[String]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n\
         cache-control: no-cache\r\n{request_id_header}: req_bench0001\r\n\
         transfer-encoding: chunked\r\n\r\n"
    );
    for event in events {
        let _ = write!(out, "{:x}\r\n{event}\r\n", event.len());
    }
    out.push_str("0\r\n\r\n");
    out.into_bytes()
}

/// A whole JSON response.
fn whole(request_id_header: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
         {request_id_header}: req_bench0001\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const OPENAI_USAGE: &str = r#"{"prompt_tokens":31,"completion_tokens":200,"total_tokens":231,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#;

/// A Chat Completions stream as OpenAI sends it with `stream_options.include_usage`: every chunk
/// carries `"usage": null` until the last, whose `choices` is empty.
fn openai_events(pieces: &[String]) -> Vec<String> {
    let chunk = |choices: &str, usage: &str| {
        format!(
            "data: {{\"id\":\"chatcmpl-BenchA1b2C3d4E5f6G7h8I9j0K\",\"object\":\"chat.completion.chunk\",\
             \"created\":1760000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"service_tier\":\"default\",\
             \"system_fingerprint\":\"fp_560af6e559\",\"choices\":[{choices}],\"usage\":{usage}}}\n\n"
        )
    };
    let mut events = vec![chunk(
        r#"{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}"#,
        "null",
    )];
    for piece in pieces {
        let choice = format!(
            r#"{{"index":0,"delta":{{"content":{}}},"logprobs":null,"finish_reason":null}}"#,
            json_str(piece)
        );
        events.push(chunk(&choice, "null"));
    }
    events.push(chunk(
        r#"{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}"#,
        "null",
    ));
    events.push(chunk("", OPENAI_USAGE));
    events.push("data: [DONE]\n\n".to_owned());
    events
}

fn openai_body(text: &str) -> String {
    format!(
        r#"{{"id":"chatcmpl-BenchA1b2C3d4E5f6G7h8I9j0K","object":"chat.completion","created":1760000000,"model":"gpt-4o-mini-2024-07-18","choices":[{{"index":0,"message":{{"role":"assistant","content":{},"refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"stop"}}],"usage":{OPENAI_USAGE},"service_tier":"default","system_fingerprint":"fp_560af6e559"}}"#,
        json_str(text)
    )
}

const ANTHROPIC_START_USAGE: &str = r#"{"input_tokens":31,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1,"service_tier":"standard"}"#;

/// A Messages API stream as Anthropic sends it, a `ping` after the block starts and every 50
/// deltas.
fn anthropic_events(pieces: &[String]) -> Vec<String> {
    let event = |name: &str, data: &str| format!("event: {name}\ndata: {data}\n\n");
    let ping = event("ping", r#"{"type": "ping"}"#);
    let mut events = vec![
        event(
            "message_start",
            &format!(
                r#"{{"type":"message_start","message":{{"id":"msg_01BenchA1b2C3d4E5f6G7h8","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{ANTHROPIC_START_USAGE}}}}}"#
            ),
        ),
        event(
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        ping.clone(),
    ];
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 && i % 50 == 0 {
            events.push(ping.clone());
        }
        events.push(event(
            "content_block_delta",
            &format!(
                r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{}}}}}"#,
                json_str(piece)
            ),
        ));
    }
    events.push(event(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    ));
    events.push(event(
        "message_delta",
        r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":200}}"#,
    ));
    events.push(event("message_stop", r#"{"type":"message_stop"}"#));
    events
}

fn anthropic_body(text: &str) -> String {
    format!(
        r#"{{"id":"msg_01BenchA1b2C3d4E5f6G7h8","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{{"type":"text","text":{}}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{{"input_tokens":31,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":200,"service_tier":"standard"}}}}"#,
        json_str(text)
    )
}

// ---------------------------------------------------------------------------------------------
// The mock provider

/// The mock provider: one listener per pre-rendered answer, served from its own thread.
struct Mock {
    /// Ports of the OpenAI stream, OpenAI whole, Anthropic stream and Anthropic whole answers.
    ports: [u16; 4],
    /// Dropped to stop the server.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Mock {
    fn start(answers: &Answers) -> Result<Self> {
        let responses: [Arc<[u8]>; 4] = [
            answers.openai_stream.as_slice().into(),
            answers.openai_whole.as_slice().into(),
            answers.anthropic_stream.as_slice().into(),
            answers.anthropic_whole.as_slice().into(),
        ];
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let mut ports = [0u16; 4];
        let mut listeners = Vec::with_capacity(4);
        {
            // Registered with the server's runtime here, so a failure is this function's error.
            let _in_runtime = rt.enter();
            for port in &mut ports {
                let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
                listener.set_nonblocking(true)?;
                *port = listener.local_addr()?.port();
                listeners.push(TcpListener::from_std(listener)?);
            }
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name("llm-mock".into())
            .spawn(move || {
                rt.block_on(async move {
                    for (listener, response) in listeners.into_iter().zip(responses) {
                        tokio::spawn(accept(listener, response));
                    }
                    let _ = stopped.await;
                });
            })?;
        Ok(Self {
            ports,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn url(&self, answer: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[answer])
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(listener: TcpListener, response: Arc<[u8]>) {
    while let Ok((conn, _)) = listener.accept().await {
        tokio::spawn(serve(conn, response.clone()));
    }
}

/// Serves one keep-alive connection: for each request, reads its head and body, then writes the
/// answer whole. Nothing else, so the server's share of a response's latency stays small.
async fn serve(mut conn: TcpStream, response: Arc<[u8]>) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(16 << 10);
    loop {
        let (head, body) = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break (at + 4, content_length(&buf[..at]));
            }
            if conn.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        while buf.len() < head + body {
            if conn.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        buf.drain(..head + body);
        conn.write_all(&response).await?;
    }
}

fn content_length(head: &[u8]) -> usize {
    head.split(|&b| b == b'\n')
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let (name, value) = line.split_at(colon);
            name.eq_ignore_ascii_case(b"content-length")
                .then(|| std::str::from_utf8(&value[1..]).ok()?.trim().parse().ok())
                .flatten()
        })
        .next()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The clients

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    OpenAi,
    Anthropic,
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
    /// The raw client, built as `normandy_llm`'s `build_client` builds the adapters' (the default
    /// `HttpConfig`): the same timeouts, no retry layer, rustls with ring.
    raw: reqwest::Client,
    raw_stream_url: String,
    raw_whole_url: String,
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
        // The adapters install ring as the process's provider when they build their client;
        // this makes the raw client's build independent of that order.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let raw = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(120))
            .user_agent("bench-raw/0")
            .retry(reqwest::retry::never())
            .build()?;
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
            raw_stream_url: format!("{}{path}", mock.url(stream_port)),
            raw_whole_url: format!("{}{path}", mock.url(whole_port)),
            ours_stream,
            ours_whole,
            request,
            text_len,
        })
    }

    async fn run(&self, rounds: usize, per_round: usize, warm_up: usize, kb: f64) -> Result<()> {
        let name = match self.kind {
            Kind::OpenAi => "openai",
            Kind::Anthropic => "anthropic",
        };
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
        match (path, self.kind) {
            (Path::OursStream, _) => {
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
            (Path::OursWhole, _) => {
                let response = self.ours_whole.complete(self.request.clone()).await?;
                Ok((text_len(&response), None))
            }
            (Path::RawStream, Kind::OpenAi) => self.raw_openai_stream(started).await,
            (Path::RawStream, Kind::Anthropic) => self.raw_anthropic_stream(started).await,
            (Path::RawWhole, Kind::OpenAi) => self.raw_openai_whole(started).await,
            (Path::RawWhole, Kind::Anthropic) => self.raw_anthropic_whole(started).await,
        }
    }

    fn raw_openai_post(&self, url: &str, stream: bool) -> Result<reqwest::RequestBuilder> {
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
        let mut post = self
            .raw
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if stream {
            post = post.header(ACCEPT, "text/event-stream");
        }
        Ok(post)
    }

    fn raw_anthropic_post(&self, url: &str, stream: bool) -> Result<reqwest::RequestBuilder> {
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
        Ok(self
            .raw
            .post(url)
            .header("x-api-key", ANTHROPIC_KEY)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .header(CONTENT_TYPE, "application/json")
            .body(body))
    }

    async fn raw_openai_stream(&self, started: Instant) -> Result<(usize, Option<Duration>)> {
        let response = self
            .raw_openai_post(&self.raw_stream_url, true)?
            .send()
            .await?
            .error_for_status()?;
        let mut events = SseByteStream::new(response.bytes_stream());
        let mut answer = RawAnswer::new(started);
        while let Some(event) = events.next().await {
            let Some(data) = event?.data else { continue };
            if data == "[DONE]" {
                return answer.finish();
            }
            let chunk: RawChunk = serde_json::from_str(&data)?;
            if let Some(usage) = chunk.usage {
                answer.output_tokens = usage.completion_tokens;
            }
            if let Some(choice) = chunk.choices.into_iter().next() {
                if let Some(text) = choice.delta.content {
                    answer.push(&text);
                }
                if choice.finish_reason.is_some() {
                    answer.stop = choice.finish_reason;
                }
            }
        }
        bail!("the raw OpenAI stream ended before [DONE]")
    }

    async fn raw_anthropic_stream(&self, started: Instant) -> Result<(usize, Option<Duration>)> {
        let response = self
            .raw_anthropic_post(&self.raw_stream_url, true)?
            .send()
            .await?
            .error_for_status()?;
        let mut events = SseByteStream::new(response.bytes_stream());
        let mut answer = RawAnswer::new(started);
        while let Some(event) = events.next().await {
            let event = event?;
            let (Some(name), Some(data)) = (event.event.as_deref(), event.data.as_deref()) else {
                continue;
            };
            match name {
                "content_block_delta" => {
                    let delta: RawBlockDelta = serde_json::from_str(data)?;
                    if let Some(text) = delta.delta.text {
                        answer.push(&text);
                    }
                }
                "message_start" => {
                    let start: RawMessageStart = serde_json::from_str(data)?;
                    answer.output_tokens = start.message.usage.output_tokens;
                }
                "content_block_start" => {
                    let start: RawBlockStart = serde_json::from_str(data)?;
                    ensure!(start.content_block.kind == "text", "not a text block");
                }
                "message_delta" => {
                    let delta: RawMessageDelta = serde_json::from_str(data)?;
                    answer.stop = delta.delta.stop_reason;
                    answer.output_tokens = delta.usage.output_tokens;
                }
                "message_stop" => return answer.finish(),
                "error" => bail!("an error event: {data}"),
                _ => {}
            }
        }
        bail!("the raw Anthropic stream ended before message_stop")
    }

    async fn raw_openai_whole(&self, started: Instant) -> Result<(usize, Option<Duration>)> {
        let body = self
            .raw_openai_post(&self.raw_whole_url, false)?
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        let completion: RawCompletion = serde_json::from_slice(&body)?;
        let choice = completion.choices.into_iter().next().context("no choice")?;
        RawAnswer {
            text: choice.message.content.unwrap_or_default(),
            stop: choice.finish_reason,
            output_tokens: completion.usage.map_or(0, |u| u.completion_tokens),
            ..RawAnswer::new(started)
        }
        .finish()
    }

    async fn raw_anthropic_whole(&self, started: Instant) -> Result<(usize, Option<Duration>)> {
        let body = self
            .raw_anthropic_post(&self.raw_whole_url, false)?
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        let message: RawWholeMessage = serde_json::from_slice(&body)?;
        let text = message
            .content
            .into_iter()
            .filter(|b| b.kind == "text")
            .filter_map(|b| b.text)
            .collect();
        RawAnswer {
            text,
            stop: message.stop_reason,
            output_tokens: message.usage.output_tokens,
            ..RawAnswer::new(started)
        }
        .finish()
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

// ---------------------------------------------------------------------------------------------
// The raw client's wire types: what a hand-written client would read, and no more.

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

    /// The text's length and the time to its first piece.
    fn finish(self) -> Result<(usize, Option<Duration>)> {
        ensure!(self.stop.is_some(), "no stop reason");
        ensure!(self.output_tokens > 0, "no usage");
        Ok((self.text.len(), self.first))
    }
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
