//! A raw-TCP HTTP/1.1 server for adapter tests, serving scripted responses: wiremock answers
//! with a whole body, so it cannot split an SSE stream mid-frame, pace it, or cut the connection
//! halfway; this can.
//!
//! Each connection reads one request (recorded, see [`ScriptServer::requests`]) and is answered
//! with the next [`Reply`] of the script, then closed (`Connection: close`, so the client never
//! reuses it). Bodies use chunked transfer encoding by default: every [`Reply::chunk`] is one
//! HTTP chunk, which the client's HTTP stack hands up as a separate read, so a split written
//! here is a split the SSE parser sees — no timing involved.
//!
//! ```ignore
//! let server = ScriptServer::start(vec![
//!     Reply::sse().chunk("data: {\"a\":").chunk("1}\n\n").cut(),  // cut before the end marker
//!     Reply::sse().chunk("data: [DONE]\n\n"),
//! ]).await;
//! let url = server.url(); // http://127.0.0.1:PORT
//! ```

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One step of writing a response body.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    /// Write these bytes (one HTTP chunk when chunked).
    Write(Vec<u8>),
    /// Wait this long before the next step (pacing, e.g. for a read-timeout test).
    Pause(Duration),
}

/// A scripted HTTP response.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    /// The status code.
    pub(crate) status: u16,
    /// Headers beyond `Connection` and `Transfer-Encoding`/`Content-Length`.
    pub(crate) headers: Vec<(String, String)>,
    /// The body, as written.
    pub(crate) steps: Vec<Step>,
    /// Drop the connection after the steps, without ending the body: with chunked encoding the
    /// client sees a body error (a cut stream).
    pub(crate) cut: bool,
    /// Chunked transfer encoding (default). Without it the body is delimited by closing the
    /// connection, so a cut looks like a clean end of the body: an early EOF.
    pub(crate) chunked: bool,
    /// Wait this long before writing the status line (a server that queues the request).
    pub(crate) head_delay: Duration,
    /// After the steps, keep the connection open until the client closes it (see
    /// [`ScriptServer::wait_closed`]): for tests that drop a stream midway.
    pub(crate) hold: bool,
}

impl Reply {
    /// A response with this status and no body yet.
    pub(crate) fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            steps: Vec::new(),
            cut: false,
            chunked: true,
            head_delay: Duration::ZERO,
            hold: false,
        }
    }

    /// A 200 `text/event-stream` response with no body yet.
    pub(crate) fn sse() -> Self {
        Self::status(200).header("content-type", "text/event-stream")
    }

    /// A JSON response with this status and body (one chunk).
    pub(crate) fn json(status: u16, body: impl Into<String>) -> Self {
        Self::status(status)
            .header("content-type", "application/json")
            .chunk(body.into())
    }

    /// Adds a header.
    pub(crate) fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Writes these bytes next (one HTTP chunk).
    pub(crate) fn chunk(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        let bytes = bytes.into();
        if !bytes.is_empty() {
            self.steps.push(Step::Write(bytes));
        }
        self
    }

    /// Writes each of these next, one chunk each.
    pub(crate) fn chunks<B: Into<Vec<u8>>>(mut self, parts: impl IntoIterator<Item = B>) -> Self {
        for part in parts {
            self = self.chunk(part);
        }
        self
    }

    /// Writes `body` split at these byte offsets (which may fall inside a UTF-8 character or
    /// a line ending: that is the point).
    pub(crate) fn split_at(self, body: impl AsRef<[u8]>, offsets: &[usize]) -> Self {
        let body = body.as_ref();
        let mut parts = Vec::new();
        let mut from = 0;
        for &at in offsets {
            let at = at.clamp(from, body.len());
            parts.push(body[from..at].to_vec());
            from = at;
        }
        parts.push(body[from..].to_vec());
        self.chunks(parts)
    }

    /// Writes `body` in pieces of `n` bytes.
    pub(crate) fn every(self, body: impl AsRef<[u8]>, n: usize) -> Self {
        let parts: Vec<Vec<u8>> = body.as_ref().chunks(n.max(1)).map(<[u8]>::to_vec).collect();
        self.chunks(parts)
    }

    /// Waits this long before the next step.
    pub(crate) fn pause(mut self, pause: Duration) -> Self {
        self.steps.push(Step::Pause(pause));
        self
    }

    /// Drops the connection after the steps written so far, mid-body.
    pub(crate) fn cut(mut self) -> Self {
        self.cut = true;
        self
    }

    /// Waits this long before answering at all.
    pub(crate) fn head_delay(mut self, delay: Duration) -> Self {
        self.head_delay = delay;
        self
    }

    /// Keeps the connection open after the steps until the client closes it.
    pub(crate) fn hold(mut self) -> Self {
        self.hold = true;
        self
    }

    /// Delimits the body by closing the connection instead of chunked encoding.
    pub(crate) fn close_delimited(mut self) -> Self {
        self.chunked = false;
        self
    }
}

/// A request the server received.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    /// The request line, e.g. `POST /v1/chat/completions HTTP/1.1`.
    pub(crate) request_line: String,
    /// Headers, names lowercased, in order.
    pub(crate) headers: Vec<(String, String)>,
    /// The body.
    pub(crate) body: Vec<u8>,
}

impl Received {
    /// A header's value.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is not JSON")
    }
}

/// The server: answers connection `n` with reply `n`; past the script, with a 599 saying so.
pub(crate) struct ScriptServer {
    addr: std::net::SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    /// How many held connections the client closed.
    closed: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptServer {
    /// Starts serving `script` on a free local port.
    pub(crate) async fn start(script: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let (closed_tx, closed) = tokio::sync::watch::channel(0usize);
        let closed_tx = Arc::new(closed_tx);
        let task = tokio::spawn(async move {
            let mut script = script.into_iter();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let reply = script.next().unwrap_or_else(|| {
                    Reply::json(
                        599,
                        r#"{"error":{"message":"the test script has no more replies","type":"test_script_exhausted"}}"#,
                    )
                    .header("x-should-retry", "false")
                });
                let log = log.clone();
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    if let Ok(true) = serve(socket, reply, log).await {
                        closed_tx.send_modify(|n| *n += 1);
                    }
                });
            }
        });
        Self {
            addr,
            received,
            closed,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests received so far. A request is recorded before its reply is written, so
    /// once a client has a reply its request is here.
    pub(crate) fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// How many requests were received so far.
    pub(crate) fn request_count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Waits until the client has closed `n` held connections (see [`Reply::hold`]).
    pub(crate) async fn wait_closed(&self, n: usize) {
        let mut closed = self.closed.clone();
        closed
            .wait_for(|c| *c >= n)
            .await
            .expect("the script server stopped");
    }
}

impl Drop for ScriptServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one connection; `Ok(true)` when it was held and the client closed it.
async fn serve(
    mut socket: TcpStream,
    reply: Reply,
    log: Arc<Mutex<Vec<Received>>>,
) -> std::io::Result<bool> {
    let request = read_request(&mut socket).await?;
    log.lock().unwrap().push(request);
    if !reply.head_delay.is_zero() {
        tokio::time::sleep(reply.head_delay).await;
    }

    let mut head = format!(
        "HTTP/1.1 {} Scripted\r\nconnection: close\r\n",
        reply.status
    );
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if reply.chunked {
        head.push_str("transfer-encoding: chunked\r\n");
    }
    head.push_str("\r\n");
    socket.write_all(head.as_bytes()).await?;
    socket.flush().await?;

    for step in &reply.steps {
        match step {
            Step::Write(bytes) if reply.chunked => {
                let mut frame = format!("{:x}\r\n", bytes.len()).into_bytes();
                frame.extend_from_slice(bytes);
                frame.extend_from_slice(b"\r\n");
                socket.write_all(&frame).await?;
                socket.flush().await?;
            }
            Step::Write(bytes) => {
                socket.write_all(bytes).await?;
                socket.flush().await?;
            }
            Step::Pause(d) => tokio::time::sleep(*d).await,
        }
    }
    if reply.hold {
        // Until the client closes: a read of 0 bytes (FIN) or an error (RST).
        let mut tmp = [0u8; 1024];
        while let Ok(n) = socket.read(&mut tmp).await {
            if n == 0 {
                break;
            }
        }
        return Ok(true);
    }
    if reply.chunked && !reply.cut {
        socket.write_all(b"0\r\n\r\n").await?;
    }
    socket.flush().await?;
    // FIN, not RST: the whole request was read, so nothing unread is left to turn the close
    // into a reset that could discard bytes still in flight to the client.
    socket.shutdown().await?;
    Ok(false)
}

async fn read_request(socket: &mut TcpStream) -> std::io::Result<Received> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = socket.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = socket.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Ok(Received {
        request_line,
        headers,
        body,
    })
}

/// Mounts on a wiremock `server`: `first` for the first `times` POSTs, then `then`.
pub(crate) async fn mount_then(
    server: &wiremock::MockServer,
    first: wiremock::ResponseTemplate,
    times: u64,
    then: wiremock::ResponseTemplate,
) {
    use wiremock::Mock;
    use wiremock::matchers::method;
    Mock::given(method("POST"))
        .respond_with(first)
        .up_to_n_times(times)
        .mount(server)
        .await;
    Mock::given(method("POST"))
        .respond_with(then)
        .mount(server)
        .await;
}
