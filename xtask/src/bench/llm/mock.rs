//! The mock provider: pre-rendered answers (a streamed and a whole one per provider) served over
//! raw HTTP/1.1 with keep-alive from loopback listeners in their own thread.

use std::fmt::Write as _;
use std::sync::Arc;
use std::thread;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::DELTAS;

// ---------------------------------------------------------------------------------------------
// The answers

/// Prose cut into pieces of 4–8 characters, like the detokenised pieces of a real stream; with a
/// paragraph break and quotes, so some pieces need JSON escapes as real ones do.
pub(super) fn pieces() -> Vec<String> {
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
pub(super) struct Answers {
    pub(super) openai_stream: Vec<u8>,
    openai_whole: Vec<u8>,
    pub(super) anthropic_stream: Vec<u8>,
    anthropic_whole: Vec<u8>,
}

impl Answers {
    pub(super) fn render(pieces: &[String], text: &str) -> Self {
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
pub(super) struct Mock {
    /// Ports of the OpenAI stream, OpenAI whole, Anthropic stream and Anthropic whole answers.
    ports: [u16; 4],
    /// Dropped to stop the server.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Mock {
    pub(super) fn start(answers: &Answers) -> Result<Self> {
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

    pub(super) fn url(&self, answer: usize) -> String {
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
