//! Mapping every failure of a provider call into [`ProviderError`], one function per source:
//! an HTTP status ([`status_error`]), the transport ([`transport_error`]), an error event inside
//! a stream that began with 200 ([`stream_error`]), and an answer that cannot be read
//! ([`malformed`]). Each decides whether a retry can help; `retry::send` and the stream driver
//! retry on that alone.

use std::time::{Duration, SystemTime};

use normandy_core::{Error, ProviderError};
use reqwest::header::HeaderMap;
use serde_json::Value;

/// Most bytes of a non-JSON error body kept as its message.
const MAX_TEXT_BODY: usize = 512;

/// The error of an HTTP answer that is not 2xx.
///
/// Reads both providers' error bodies — Anthropic `{"type":"error","error":{"type","message"}}`,
/// OpenAI `{"error":{"message","type","code"}}` — and the shapes compatible servers use
/// (`{"error":"text"}`, `{"detail":"text"}`, `{"message":"text"}`); any other body is kept as its
/// first 512 bytes of text.
///
/// Retryable: 408, 409, 429 and 5xx (529 included), unless a 429 says quota or billing (a
/// retry cannot refill an account). Terminal: any other status. `x-should-retry: true|false`,
/// when the provider sends it, overrides both.
pub(crate) fn status_error(
    provider: &str,
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
) -> ProviderError {
    let (error_type, code, message) = match serde_json::from_slice::<Value>(body) {
        Ok(json) => error_fields(&json),
        Err(_) => (None, None, None),
    };
    let message = message.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(&body[..body.len().min(MAX_TEXT_BODY)]);
        let text = text.trim();
        if text.is_empty() {
            let reason = reqwest::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("no reason given");
            format!("HTTP {status} {reason} (empty body)")
        } else {
            text.to_owned()
        }
    });
    let quota = status == 429 && is_quota(error_type.as_deref(), code.as_deref(), &message);
    let mut retryable = matches!(status, 408 | 409 | 429 | 500..=599) && !quota;
    match header(headers, "x-should-retry") {
        Some("true") => retryable = true,
        Some("false") => retryable = false,
        _ => {}
    }
    ProviderError {
        provider: provider.to_owned(),
        status: Some(status),
        error_type,
        code,
        request_id: request_id(headers),
        retry_after_ms: retry_after_ms(headers),
        message,
        retryable,
    }
}

/// The error of a request that got no HTTP answer, or whose body could not be read: a refused
/// connection, a timeout, a connection cut.
///
/// Retryable unless the request itself is wrong (a bad URL, a redirect loop). The text names the
/// URL without its query, user or password, and never a header.
pub(crate) fn transport_error(
    provider: &str,
    e: &reqwest::Error,
    before_first_byte: bool,
) -> ProviderError {
    let url = e.url().map(|u| {
        let mut u = u.clone();
        u.set_query(None);
        u.set_fragment(None);
        let _ = u.set_password(None);
        let _ = u.set_username("");
        u.to_string()
    });
    let to = url.as_deref().map(|u| format!(" {u}")).unwrap_or_default();
    let cause = cause_chain(e);
    let message = if e.is_builder() {
        format!("could not build the request to{to}: {cause} (check the base URL)")
    } else if e.is_redirect() {
        format!("too many redirects from{to}: {cause} (check the base URL)")
    } else if e.is_connect() {
        format!("could not connect to{to}: {cause} (is the server up and the base URL right?)")
    } else if e.is_timeout() && before_first_byte {
        format!("no answer from{to} in time: {cause}")
    } else if e.is_timeout() {
        format!("the answer from{to} stalled past the read timeout: {cause}")
    } else if before_first_byte {
        format!("the request to{to} failed: {cause}")
    } else {
        format!("reading the answer from{to} failed: {cause}")
    };
    local_error(provider, message, !(e.is_builder() || e.is_redirect()))
}

/// An error with only a message, from a failure that got no error answer from the provider (a
/// timeout, a cut connection): no status, type, code, request id or `retry-after`.
pub(crate) fn local_error(provider: &str, message: String, retryable: bool) -> ProviderError {
    ProviderError {
        provider: provider.to_owned(),
        status: None,
        error_type: None,
        code: None,
        request_id: None,
        retry_after_ms: None,
        message,
        retryable,
    }
}

/// The error of an error event inside a stream that began with 200 (Anthropic `event: error`,
/// an OpenAI `{"error": …}` chunk). The adapter decides `retryable` from the event's type.
pub(crate) fn stream_error(
    provider: &str,
    request_id: Option<&str>,
    error_type: Option<String>,
    message: String,
    retryable: bool,
) -> ProviderError {
    ProviderError {
        error_type,
        request_id: request_id.map(str::to_owned),
        ..local_error(provider, message, retryable)
    }
}

/// A malformed or truncated answer: bad JSON in a tool call's arguments, a block the adapter
/// cannot read, a stream that ends mid-block or before its end marker.
///
/// Retryable (a new sample usually parses; the engine bounds the tries), with error type
/// `malformed_response` and `what` as the message.
pub(crate) fn malformed(provider: &str, request_id: Option<&str>, what: String) -> Error {
    Error::Provider(Box::new(ProviderError {
        error_type: Some("malformed_response".to_owned()),
        request_id: request_id.map(str::to_owned),
        ..local_error(provider, what, true)
    }))
}

/// What the shared layers may say of a failure in a log line or a `Restart` reason: its status,
/// type, code and request id, and the message only where this crate wrote it — never a
/// provider's message. A provider may echo the key it was sent in its message, and these layers
/// run before the adapter's [`redact`].
pub(crate) fn summary(error: &Error) -> String {
    match error.inner() {
        Error::Provider(e) => {
            let mut out = e.provider.clone();
            if let Some(status) = e.status {
                out.push_str(&format!(" status {status}"));
            }
            for part in [&e.error_type, &e.code].into_iter().flatten() {
                out.push_str(&format!(" {part}"));
            }
            // A failure without a status or type is ours (a cut stream, a timeout, a refused
            // connection): its text came from this crate, not from the provider.
            if e.status.is_none() && e.error_type.is_none() {
                out.push_str(&format!(": {}", e.message));
            }
            if let Some(id) = &e.request_id {
                out.push_str(&format!(" (request id {id})"));
            }
            out
        }
        other => format!("{:?} error", other.kind()),
    }
}

/// Hides `secret` in every text of a provider error: a provider may echo the key it was sent in
/// its error body (a 401 saying which key is wrong). Secrets shorter than 8 bytes are left
/// alone: no real key is that short, and hiding a short string would garble the message.
pub(crate) fn redact(error: Error, secret: &str) -> Error {
    const MASK: &str = "[redacted]";
    if secret.len() < 8 {
        return error;
    }
    let scrub = |s: &mut String| {
        if s.contains(secret) {
            *s = s.replace(secret, MASK);
        }
    };
    match error {
        Error::Provider(mut e) => {
            scrub(&mut e.message);
            for s in [&mut e.error_type, &mut e.code, &mut e.request_id]
                .into_iter()
                .flatten()
            {
                scrub(s);
            }
            Error::Provider(e)
        }
        Error::Model {
            mut message,
            retryable,
        } => {
            scrub(&mut message);
            Error::Model { message, retryable }
        }
        other => other,
    }
}

/// The provider's request id: `request-id` (Anthropic) or `x-request-id` (OpenAI and most
/// compatible servers).
pub(crate) fn request_id(headers: &HeaderMap) -> Option<String> {
    header(headers, "request-id")
        .or_else(|| header(headers, "x-request-id"))
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// How long the provider asks callers to wait: `retry-after-ms` (milliseconds, OpenAI), else
/// `retry-after` (seconds, or an HTTP date).
pub(crate) fn retry_after_ms(headers: &HeaderMap) -> Option<u64> {
    if let Some(ms) = header(headers, "retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(ms.ceil() as u64);
    }
    let v = header(headers, "retry-after")?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| (secs * 1000.0).ceil() as u64);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let wait = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
}

/// The `(type, code, message)` of an error body or an in-stream error object, in any of the
/// shapes providers use. A numeric `code` (llama.cpp sends the HTTP status) becomes its text.
pub(crate) fn error_fields(json: &Value) -> (Option<String>, Option<String>, Option<String>) {
    let text = |v: Option<&Value>| -> Option<String> {
        match v? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    match json.get("error") {
        Some(Value::Object(_)) => {
            let e = &json["error"];
            (
                text(e.get("type")),
                text(e.get("code")),
                text(e.get("message")),
            )
        }
        Some(Value::String(s)) => (None, None, Some(s.clone())),
        _ => {
            let detail = match json.get("detail") {
                // FastAPI-style validation errors (vLLM): a list of objects; keep it as JSON.
                Some(Value::Array(_)) => Some(json["detail"].to_string()),
                other => text(other),
            };
            (None, None, detail.or_else(|| text(json.get("message"))))
        }
    }
}

/// Whether a 429 is a quota or billing refusal rather than a rate limit.
fn is_quota(error_type: Option<&str>, code: Option<&str>, message: &str) -> bool {
    let says = |s: &str| {
        let s = s.to_ascii_lowercase();
        s == "insufficient_quota" || s.starts_with("billing")
    };
    let message = message.to_ascii_lowercase();
    error_type.is_some_and(says)
        || code.is_some_and(says)
        || message.contains("quota")
        || message.contains("billing")
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The messages of an error's sources, joined, skipping repeats (hyper and its legacy client
/// wrap the same I/O error more than once).
fn cause_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        cur = c.source();
    }
    if parts.is_empty() {
        // No source: reqwest's own text is the only description. It may name the URL
        // with its query, which never carries a key here (keys go in headers).
        return e.to_string();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn reads_anthropic_and_openai_bodies() {
        let a = status_error(
            "anthropic",
            529,
            &headers(&[("request-id", "req_1")]),
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        assert_eq!(a.error_type.as_deref(), Some("overloaded_error"));
        assert_eq!(a.message, "Overloaded");
        assert_eq!(a.request_id.as_deref(), Some("req_1"));
        assert!(a.retryable);

        let o = status_error(
            "openai",
            400,
            &headers(&[("x-request-id", "req_2")]),
            br#"{"error":{"message":"bad","type":"invalid_request_error","code":"context_length_exceeded"}}"#,
        );
        assert_eq!(o.code.as_deref(), Some("context_length_exceeded"));
        assert_eq!(o.request_id.as_deref(), Some("req_2"));
        assert!(!o.retryable);

        let llama = status_error(
            "llama.cpp",
            500,
            &HeaderMap::new(),
            br#"{"error":{"code":500,"message":"boom","type":"server_error"}}"#,
        );
        assert_eq!(llama.code.as_deref(), Some("500"));
        assert!(llama.retryable);
    }

    #[test]
    fn non_json_bodies_are_kept_short() {
        let body = "x".repeat(2000);
        let e = status_error("openai", 502, &HeaderMap::new(), body.as_bytes());
        assert_eq!(e.message.len(), MAX_TEXT_BODY);
        let e = status_error("openai", 503, &HeaderMap::new(), b"");
        assert!(
            e.message.contains("503 Service Unavailable"),
            "{}",
            e.message
        );
    }

    #[test]
    fn retryable_by_status_quota_and_header() {
        let h = HeaderMap::new();
        for s in [408, 409, 429, 500, 502, 503, 529] {
            assert!(status_error("p", s, &h, b"{}").retryable, "{s}");
        }
        for s in [400, 401, 403, 404, 413, 422, 418] {
            assert!(!status_error("p", s, &h, b"{}").retryable, "{s}");
        }
        let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert!(!status_error("p", 429, &h, quota).retryable);
        let billing = br#"{"error":{"message":"x","type":"billing_hard_limit_reached"}}"#;
        assert!(!status_error("p", 429, &h, billing).retryable);
        let no = headers(&[("x-should-retry", "false")]);
        assert!(!status_error("p", 503, &no, b"").retryable);
        let yes = headers(&[("x-should-retry", "true")]);
        assert!(status_error("p", 400, &yes, b"").retryable);
    }

    #[test]
    fn retry_after_in_all_forms() {
        assert_eq!(
            retry_after_ms(&headers(&[("retry-after-ms", "250"), ("retry-after", "9")])),
            Some(250)
        );
        assert_eq!(
            retry_after_ms(&headers(&[("retry-after", "2")])),
            Some(2000)
        );
        assert_eq!(
            retry_after_ms(&headers(&[("retry-after", "0.5")])),
            Some(500)
        );
        let later = SystemTime::now() + Duration::from_secs(30);
        let date = httpdate::fmt_http_date(later);
        let ms = retry_after_ms(&headers(&[("retry-after", &date)])).unwrap();
        assert!((28_000..=30_000).contains(&ms), "{ms}");
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(30));
        assert_eq!(retry_after_ms(&headers(&[("retry-after", &past)])), Some(0));
        assert_eq!(retry_after_ms(&headers(&[("retry-after", "soon")])), None);
    }

    #[test]
    fn redact_hides_the_secret_everywhere() {
        let key = "sk-canary-0123456789";
        let e = Error::Provider(Box::new(status_error(
            "openai",
            401,
            &HeaderMap::new(),
            format!(
                r#"{{"error":{{"message":"Incorrect API key provided: {key}","code":"{key}"}}}}"#
            )
            .as_bytes(),
        )));
        let e = redact(e, key);
        assert!(!e.to_string().contains(key));
        assert!(!format!("{e:?}").contains(key));
        assert!(e.to_string().contains("[redacted]"));
    }

    #[test]
    fn malformed_is_retryable_and_typed() {
        let Error::Provider(e) = malformed("openai", Some("r1"), "bad tool JSON".into()) else {
            panic!("not a provider error");
        };
        assert!(e.retryable);
        assert_eq!(e.error_type.as_deref(), Some("malformed_response"));
        assert_eq!(e.status, None);
    }
}
