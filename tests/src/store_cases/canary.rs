//! No secret at rest (invariant 4): a credential resolved for a real session appears neither
//! in the stored bytes nor in the logs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use normandy_core::{
    CatalogEntry, ConfigTemplate, Credentials, Error, LlmClient, LocalRegistry, ResumePolicy,
    ScriptedClient, Sessions, StaticCredentials, TemplateCatalog,
};

use super::{all_entries, load, node, ok, token};
use crate::harness::StoreHarness;
use crate::logs;

/// Precondition: the test binary has no other global tracing subscriber. A real session runs
/// through `Sessions` on this store, with a template naming a credential that a
/// `StaticCredentials` provider resolves to a fresh `sk-canary-<uuid>` and the client builder
/// reads. The canary (nor its uuid) appears neither in `raw_bytes()` nor in the DEBUG logs
/// captured meanwhile — while the input text does appear in the raw bytes and the session id
/// in the logs, proving both scans see real data.
pub async fn canary_secret_never_stored_or_logged(h: Arc<dyn StoreHarness>) {
    let logs = logs::capture().unwrap_or_else(|e| panic!("{e}"));
    let secret_token = token();
    let canary = format!("sk-canary-{secret_token}");
    let marker = format!("probe-{}", token());
    let template_id = format!("canary-template-{}", token());
    let template = ConfigTemplate::new(template_id.clone(), "scripted-model")
        .system_prompt("You are the canary test.")
        .resume_policy(ResumePolicy::Eager)
        .credential("api-key");

    let read_secret = Arc::new(AtomicBool::new(false));
    let entry = {
        let (canary, read_secret) = (canary.clone(), read_secret.clone());
        CatalogEntry::new(move |_template, creds: &Credentials| {
            let secret = creds.expose("api-key")?;
            if secret != canary {
                return Err(Error::Credentials {
                    reason: "api-key resolved to something other than the canary".into(),
                });
            }
            read_secret.store(true, Ordering::SeqCst);
            Ok(Arc::new(ScriptedClient::echo()) as Arc<dyn LlmClient>)
        })
    };
    // A second template whose provider refuses the key and echoes it in its error, as real
    // providers do ("invalid api key sk-..."): the error must reach neither store nor logs.
    let failing_id = format!("canary-failing-{}", token());
    let failing = ConfigTemplate::new(failing_id.clone(), "scripted-model").credential("api-key");
    let echoing = CatalogEntry::new(|_template, creds: &Credentials| {
        let key = creds.expose("api-key")?.to_string();
        Ok(Arc::new(ScriptedClient::from_fn(move |_| {
            Err(Error::Model {
                message: format!("401: invalid api key {key}"),
                retryable: false,
            })
        })) as Arc<dyn LlmClient>)
    });
    // A third through the real OpenAI-compatible adapter, against a local server that answers
    // 401 quoting the bearer key it was sent, as OpenAI's own "Incorrect API key provided"
    // does.
    let server = echo_401_server().await;
    let http_id = format!("canary-http-{}", token());
    let http = ConfigTemplate::new(http_id.clone(), "gpt-canary").credential("api-key");
    let http_entry = normandy_llm::openai::catalog_entry(
        "api-key",
        normandy_llm::openai::OpenAiConfig::default().base_url(server),
    );
    let catalog = TemplateCatalog::new()
        .with(template, entry)
        .and_then(|c| c.with(failing, echoing))
        .and_then(|c| c.with(http, http_entry))
        .expect("valid templates");
    let sessions = Sessions::builder(catalog)
        .node(node("canary-node"))
        .store(h.store())
        .registry(Arc::new(LocalRegistry::new()))
        .credentials(Arc::new(StaticCredentials::new(
            Credentials::new().with("api-key", canary.clone()),
        )))
        .build()
        .expect("build Sessions");

    let id = ok(sessions.start(&template_id).await, "start");
    let out = ok(sessions.send(&id, format!("hello {marker}")).await, "send");
    assert_eq!(out.text(), format!("echo: hello {marker}"));
    let out = ok(sessions.send(&id, "second input").await, "send again");
    assert_eq!(out.text(), "echo: second input");
    let failed_id = ok(
        sessions.start(&failing_id).await,
        "start the failing session",
    );
    let failed = sessions
        .send(&failed_id, "this turn fails")
        .await
        .expect_err("the echoing model fails the turn");
    let http_session = ok(sessions.start(&http_id).await, "start the HTTP session");
    let http_failed = sessions
        .send(&http_session, "this call gets a 401")
        .await
        .expect_err("the provider refuses the key");
    sessions.shutdown().await;
    assert!(
        read_secret.load(Ordering::SeqCst),
        "the client builder never read the credential: the case tested nothing"
    );

    let store = h.store();
    let rec = load(&*store, &id).await;
    let stored_template = rec.template.expect("the session's template is stored");
    assert_eq!(
        stored_template.credentials,
        vec!["api-key".to_string()],
        "the stored template names its credential"
    );
    assert!(
        all_entries(&*store, &id).await.len() >= 4,
        "two turns must have committed entries"
    );
    assert!(
        all_entries(&*store, &failed_id)
            .await
            .iter()
            .any(|e| e.payload.kind_name() == "turn_end"),
        "the failed turn's end (with its error) must be stored for the scan to test it"
    );

    let raw = h.raw_bytes().await;
    assert!(
        logs::find(&raw, marker.as_bytes()),
        "raw_bytes() does not contain the input text just committed: the canary scan would \
         prove nothing ({} bytes scanned)",
        raw.len()
    );
    assert!(
        !logs::find(&raw, canary.as_bytes()),
        "the canary credential is stored in the backend's raw bytes"
    );
    assert!(
        !logs::find(&raw, secret_token.as_bytes()),
        "the canary's random part is stored in the backend's raw bytes"
    );
    assert!(
        logs.contains(id.as_str().as_bytes()),
        "the captured logs never mention the session: log capture is not working"
    );
    assert!(
        !logs.contains(canary.as_bytes()) && !logs.contains(secret_token.as_bytes()),
        "the canary credential appears in the logs"
    );
    assert!(
        all_entries(&*store, &http_session)
            .await
            .iter()
            .any(|e| e.payload.kind_name() == "turn_end"),
        "the 401 turn's end must be stored for the scan to test it"
    );
    // Checked last, so a leak shows first where it matters most: at rest and in the logs.
    let text = failed.to_string();
    assert!(
        text.contains("invalid api key [redacted credential api-key]"),
        "the caller hears the provider's error with the key redacted: {text}"
    );
    let text = http_failed.to_string();
    assert!(
        text.contains("401")
            && text.contains("Incorrect API key provided")
            && !text.contains(&canary),
        "the caller hears the provider's 401 without the key: {text}"
    );
}

/// A server on loopback that answers every request 401, quoting the bearer key it was sent.
async fn echo_401_server() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !logs::find(&head, b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let key = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .starts_with("authorization: bearer ")
                            .then(|| l["authorization: bearer ".len()..].trim().to_string())
                    })
                    .unwrap_or_default();
                let body = serde_json::json!({"error": {
                    "message": format!("Incorrect API key provided: {key}."),
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                }})
                .to_string();
                let reply = format!(
                    "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/v1")
}
