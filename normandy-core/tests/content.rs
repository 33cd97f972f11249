//! What providers send, carried durably: blobs of the previous release still load; thinking,
//! media, structured tool results, usage and call info survive the codec and reach the model;
//! streamed deltas reach subscribers tagged with their try; a turn cut short mid-stream keeps
//! what was streamed as an incomplete entry.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use normandy_core::codec::{BlobKind, decode, encode};
use normandy_core::*;
use serde_json::json;

fn sid(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

fn runtime(catalog: TemplateCatalog, store: Arc<dyn SessionStore>) -> Sessions {
    Sessions::builder(catalog)
        .node(NodeId::new("a", 1).unwrap())
        .store(store)
        .build()
        .unwrap()
}

fn catalog(entry: CatalogEntry) -> TemplateCatalog {
    TemplateCatalog::new()
        .with(ConfigTemplate::new("t", "m"), entry)
        .unwrap()
}

async fn start(sessions: &Sessions, id: &str) -> SessionId {
    sessions
        .start_with(
            "t",
            StartOptions {
                id: Some(sid(id)),
                ..Default::default()
            },
        )
        .await
        .unwrap()
}

/// Requests a client saw, for checking what reached the model.
type Seen = Arc<Mutex<Vec<ModelRequest>>>;

fn recording(
    seen: &Seen,
    f: impl Fn(&ModelRequest) -> Result<ModelResponse> + Send + Sync + 'static,
) -> ScriptedClient {
    let seen = seen.clone();
    ScriptedClient::from_fn(move |req| {
        seen.lock().unwrap().push(req.clone());
        f(req)
    })
}

// ---------------------------------------------------------------------------------------------
// The stored format

/// Blobs written by release 0.1 (format version 2, before this content model): every entry
/// kind, a tool result in doubt, a turn state with a pending started call and a queued input.
/// They were made by that release's own encoder; `entries.json` and `turn-state.json` are the
/// same values in its JSON form.
const FIXTURES: &str = "tests/fixtures/blobs-0.1";

#[test]
fn blobs_written_by_release_0_1_load_and_encode_to_the_same_bytes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURES);
    let expected: Vec<Entry> =
        serde_json::from_slice(&std::fs::read(dir.join("entries.json")).unwrap()).unwrap();
    assert_eq!(expected.len(), 8);
    for want in &expected {
        let bytes = std::fs::read(dir.join(format!("entry-{}.bin", want.seq))).unwrap();
        let got: Entry = decode(BlobKind::Entry, &bytes, Some(&sid("s"))).unwrap();
        assert_eq!(&got, want, "entry {}", want.seq);
        assert_eq!(
            encode(BlobKind::Entry, &got).unwrap(),
            bytes,
            "entry {}: an old value encodes to its old bytes (new fields are left out)",
            want.seq
        );
    }
    // The new fields read as their defaults.
    let EntryPayload::Assistant {
        usage,
        call,
        incomplete,
        ..
    } = &expected[1].payload
    else {
        panic!("entry 2 is the first answer")
    };
    assert_eq!(*usage, Usage::new(120, 30));
    assert!(call.is_empty() && !incomplete);

    let bytes = std::fs::read(dir.join("turn-state.bin")).unwrap();
    let state: TurnState = decode(BlobKind::TurnState, &bytes, None).unwrap();
    let want: TurnState =
        serde_json::from_slice(&std::fs::read(dir.join("turn-state.json")).unwrap()).unwrap();
    assert_eq!(state, want);
    assert!(matches!(&state.phase, Phase::RunningTools { calls } if calls[0].started));
    assert_eq!(encode(BlobKind::TurnState, &state).unwrap(), bytes);
}

fn rich_entries() -> Vec<Entry> {
    let png = [0x89, b'P', b'N', b'G', 0, 1, 2, 3];
    let payloads = vec![
        EntryPayload::Input {
            input_id: InputId::new("in-1").unwrap(),
            content: vec![
                ContentBlock::text("what is in this picture?"),
                ContentBlock::image_bytes("image/png", &png).unwrap(),
                ContentBlock::image_url("image/jpeg", "https://example.com/cat.jpg"),
                ContentBlock::document_bytes("application/pdf", b"%PDF-1.7", Some("menu".into()))
                    .unwrap(),
            ],
        },
        EntryPayload::Assistant {
            message: Message {
                role: Role::Assistant,
                content: vec![
                    ContentBlock::Thinking {
                        thinking: "The user wants…".into(),
                        signature: Some("EqQBCgIYAhIM1gbcDa9GJwZA2b3h".into()),
                    },
                    ContentBlock::RedactedThinking {
                        data: "EmwKAhgBEgy3va3pzix/LafPsn4a".into(),
                    },
                    ContentBlock::ToolUse {
                        id: "toolu_01".into(),
                        name: "look".into(),
                        input: json!({"zoom": 2}),
                    },
                ],
            },
            stop_reason: StopReason::ToolUse,
            usage: Usage {
                input_tokens: 1200,
                output_tokens: 80,
                cache_read_tokens: 1000,
                cache_write_tokens: 24,
                reasoning_tokens: 40,
            },
            call: CallInfo {
                model: Some("claude-sonnet-4-5".into()),
                request_id: Some("req_011CSHoEeqs5C35K2UUqR7Fy".into()),
                stop: Some("tool_use".into()),
            },
            incomplete: false,
        },
        EntryPayload::ToolResult {
            call_id: "toolu_01".into(),
            content: "{\"cats\":1}".into(),
            is_error: false,
            structured: Some(json!({"cats": 1})),
            blocks: vec![ContentBlock::image_bytes("image/png", &png).unwrap()],
            in_doubt: None,
        },
        EntryPayload::Assistant {
            message: Message::assistant("One cat, and it is lo"),
            stop_reason: StopReason::Other,
            usage: Usage::default(),
            call: CallInfo::default(),
            incomplete: true,
        },
    ];
    payloads
        .into_iter()
        .zip(1..)
        .map(|(payload, seq)| Entry {
            seq,
            parent: (seq > 1).then(|| seq - 1),
            at_ms: 7,
            payload,
        })
        .collect()
}

#[test]
fn rich_content_round_trips_through_the_codec_and_json() {
    for entry in rich_entries() {
        let bytes = encode(BlobKind::Entry, &entry).unwrap();
        let back: Entry = decode(BlobKind::Entry, &bytes, None).unwrap();
        assert_eq!(back, entry);
        let json = serde_json::to_string(&entry).unwrap();
        assert_eq!(serde_json::from_str::<Entry>(&json).unwrap(), entry);
    }
    let json = serde_json::to_value(&rich_entries()[0]).unwrap();
    assert_eq!(
        json["payload"]["content"][1],
        json!({"type": "image", "media_type": "image/png",
               "source": {"kind": "base64", "data": "iVBORwABAgM="}})
    );
}

#[test]
fn media_over_the_limit_or_not_base64_is_a_typed_error() {
    let big = vec![0u8; MAX_INLINE_MEDIA_BYTES + 1];
    let err = ContentBlock::image_bytes("image/png", &big).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
    let err = ContentBlock::image_bytes("text/plain", b"x").unwrap_err();
    assert!(err.to_string().contains("image/"), "{err}");
    let bad = ContentBlock::Image {
        media_type: "image/png".into(),
        source: MediaSource::Base64 {
            data: "not base64!".into(),
        },
    };
    assert!(bad.validate().unwrap_err().to_string().contains("base64"));
}

// ---------------------------------------------------------------------------------------------
// What reaches the model

#[tokio::test]
async fn image_inputs_reach_the_model_and_bad_ones_never_activate_the_session() {
    let seen = Seen::default();
    let client = recording(&seen, |_| Ok(ModelResponse::text("a cat")));
    let store = Arc::new(InMemoryStore::new());
    let sessions = runtime(catalog(CatalogEntry::with_client(client)), store.clone());
    let id = start(&sessions, "img").await;
    let image = ContentBlock::image_bytes("image/png", b"\x89PNG").unwrap();
    let input = Input {
        id: None,
        content: vec![ContentBlock::text("what is this?"), image.clone()],
    };
    assert_eq!(sessions.send(&id, input).await.unwrap().text(), "a cat");
    let first = seen.lock().unwrap()[0].clone();
    assert_eq!(first.messages[0].content[1], image);

    let epoch = store.load(&id).await.unwrap().unwrap().epoch;
    assert!(sessions.passivate(&id).await);
    for (content, why) in [
        (
            vec![ContentBlock::Image {
                media_type: "image/png".into(),
                source: MediaSource::Base64 { data: "%%%".into() },
            }],
            "base64",
        ),
        (
            vec![ContentBlock::Thinking {
                thinking: "forged".into(),
                signature: None,
            }],
            "thinking",
        ),
    ] {
        let err = sessions
            .send(&id, Input { id: None, content })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        assert!(err.to_string().contains(why), "{err}");
    }
    assert_eq!(
        store.load(&id).await.unwrap().unwrap().epoch,
        epoch,
        "a refused input never activates the session"
    );
}

/// A tool that returns JSON and a picture.
struct Camera;

#[async_trait]
impl Tool for Camera {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "camera".into(),
            description: "takes a picture".into(),
            input_schema: json!({"type": "object"}),
        }
    }

    async fn call(&self, _input: serde_json::Value, _ctx: ToolContext) -> ToolOutput {
        ToolOutput::json(json!({"width": 2, "height": 1}))
            .with_block(ContentBlock::image_bytes("image/png", b"\x89PNG").unwrap())
    }
}

#[tokio::test]
async fn thinking_and_structured_tool_results_go_back_to_the_model_unchanged() {
    let thinking = ContentBlock::Thinking {
        thinking: "I should look.".into(),
        signature: Some("sig-abc".into()),
    };
    let redacted = ContentBlock::RedactedThinking {
        data: "opaque".into(),
    };
    let seen = Seen::default();
    let (t, r) = (thinking.clone(), redacted.clone());
    let client = recording(&seen, move |req| {
        if req.last_tool_results().is_empty() {
            let mut response = ModelResponse::tool_call("c1", "camera", json!({}));
            response.content.insert(0, t.clone());
            response.content.insert(1, r.clone());
            response.usage = Usage {
                input_tokens: 10,
                output_tokens: 5,
                cache_read_tokens: 100,
                cache_write_tokens: 3,
                reasoning_tokens: 2,
            };
            response.call = CallInfo {
                model: Some("m-2025".into()),
                request_id: Some("req-1".into()),
                stop: Some("tool_use".into()),
            };
            Ok(response)
        } else {
            Ok(ModelResponse::text("a wide picture").with_usage(20, 4))
        }
    });
    let store = Arc::new(InMemoryStore::new());
    let sessions = runtime(
        catalog(CatalogEntry::with_client(client).tool(Camera)),
        store.clone(),
    );
    let id = start(&sessions, "think").await;
    let outcome = sessions.send(&id, "look").await.unwrap();
    assert_eq!(outcome.text(), "a wide picture");
    assert_eq!(
        outcome.usage,
        Usage {
            input_tokens: 30,
            output_tokens: 9,
            cache_read_tokens: 100,
            cache_write_tokens: 3,
            reasoning_tokens: 2,
        },
        "a turn's usage sums every counter"
    );

    let second = seen.lock().unwrap()[1].clone();
    let assistant = &second.messages[1];
    assert_eq!(assistant.role, Role::Assistant);
    assert_eq!(
        &assistant.content[..2],
        &[thinking, redacted],
        "thinking goes back unchanged, signature included"
    );
    let ContentBlock::ToolResult {
        structured, blocks, ..
    } = &second.messages[2].content[0]
    else {
        panic!("the tool result follows: {:?}", second.messages[2])
    };
    assert_eq!(structured, &Some(json!({"width": 2, "height": 1})));
    assert!(matches!(&blocks[..], [ContentBlock::Image { .. }]));

    // Rebuilt from the store alone, the session says the same.
    let history = sessions.history_all(&id).await.unwrap();
    let call = history
        .iter()
        .find_map(|e| match &e.payload {
            EntryPayload::Assistant { call, .. } if !call.is_empty() => Some(call.clone()),
            _ => None,
        })
        .expect("the call info is stored with the response");
    assert_eq!(call.request_id.as_deref(), Some("req-1"));
    let rebuilt = Conversation::from_entries(&history);
    assert_eq!(rebuilt.messages()[..3], second.messages[..3]);
}

// ---------------------------------------------------------------------------------------------
// Streaming

/// Collects a session's events until its turn finishes.
async fn until_finished(events: &mut EventStream) -> (Vec<TurnEvent>, TurnOutcome) {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), events.next()).await {
            Ok(Some(Ok(TurnEvent::TurnFinished(o)))) => return (seen, o),
            Ok(Some(Ok(e))) => seen.push(e),
            other => panic!("no turn end: {other:?}"),
        }
    }
}

fn text_deltas(events: &[TurnEvent]) -> Vec<(InputId, u32, Attempt, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            TurnEvent::ModelDelta {
                turn,
                step,
                attempt,
                delta: ModelDelta::Text { text, .. },
            } => Some((turn.clone(), *step, *attempt, text.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn streamed_deltas_reach_subscribers_and_the_committed_answer_is_their_sum() {
    let answer = "Paris is lovely in the spring.";
    let client = ScriptedClient::from_fn(move |_| Ok(ModelResponse::text(answer)))
        .streaming(4, Duration::from_millis(1));
    let sessions = runtime(
        catalog(CatalogEntry::with_client(client)),
        Arc::new(InMemoryStore::new()),
    );
    let id = start(&sessions, "stream").await;
    let mut events = sessions.subscribe(&id, 0).await.unwrap();
    let input_id = InputId::new("in-1").unwrap();
    let send = {
        let (sessions, id) = (sessions.clone(), id.clone());
        let input = Input::text("where?").with_id(input_id.clone());
        tokio::spawn(async move { sessions.send(&id, input).await })
    };
    let (seen, outcome) = until_finished(&mut events).await;
    assert_eq!(send.await.unwrap().unwrap().text(), answer);
    assert_eq!(outcome.text(), answer);
    let deltas = text_deltas(&seen);
    assert_eq!(deltas.len(), answer.len().div_ceil(4));
    assert!(
        deltas
            .iter()
            .all(|(turn, step, attempt, _)| *turn == input_id
                && *step == 1
                && *attempt == deltas[0].2),
        "{deltas:?}"
    );
    let joined: String = deltas.iter().map(|d| d.3.as_str()).collect();
    assert_eq!(joined, answer);
    // Deltas come before the committed answer, never after.
    let answer_at = seen
        .iter()
        .position(|e| matches!(e, TurnEvent::Entry(e) if e.payload.kind_name() == "assistant"))
        .unwrap();
    let last_delta = seen
        .iter()
        .rposition(|e| matches!(e, TurnEvent::ModelDelta { .. }))
        .unwrap();
    assert!(last_delta < answer_at);
}

#[tokio::test]
async fn a_turn_cancelled_mid_stream_keeps_what_was_streamed_as_an_incomplete_entry() {
    let answer = "A long answer that streams slowly, five characters at a time, so that the \
                  cancel below lands long before its end, however loaded the machine is: forty \
                  pieces, thirty milliseconds apart.";
    let seen = Seen::default();
    let client = recording(&seen, move |req| {
        Ok(ModelResponse::text(match req.last_user_text().as_deref() {
            Some("next") => "short".to_string(),
            _ => answer.to_string(),
        }))
    })
    .streaming(5, Duration::from_millis(30));
    let sessions = runtime(
        catalog(CatalogEntry::with_client(client)),
        Arc::new(InMemoryStore::new()),
    );
    let id = start(&sessions, "cut").await;
    let mut events = sessions.subscribe(&id, 0).await.unwrap();
    let send = {
        let (sessions, id) = (sessions.clone(), id.clone());
        tokio::spawn(async move { sessions.send(&id, "tell me").await })
    };
    // Wait for three deltas, then cancel.
    let mut streamed = String::new();
    let mut deltas = 0;
    while deltas < 3 {
        match tokio::time::timeout(Duration::from_secs(20), events.next()).await {
            Ok(Some(Ok(TurnEvent::ModelDelta {
                delta: ModelDelta::Text { text, .. },
                ..
            }))) => {
                streamed.push_str(&text);
                deltas += 1;
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no delta: {other:?}"),
        }
    }
    assert!(sessions.cancel(&id).await.unwrap());
    let err = send.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled);

    let history = sessions.history_all(&id).await.unwrap();
    let (text, position) = history
        .iter()
        .enumerate()
        .find_map(|(i, e)| match &e.payload {
            EntryPayload::Assistant {
                message,
                incomplete: true,
                ..
            } => Some((message.text(), i)),
            _ => None,
        })
        .expect("the streamed text is kept, marked incomplete");
    assert!(
        text.starts_with(&streamed) && answer.starts_with(&text) && text.len() < answer.len(),
        "kept {text:?} after streaming {streamed:?}"
    );
    assert!(
        matches!(
            &history[position + 1].payload,
            EntryPayload::TurnEnd {
                status: TurnStatus::Cancelled,
                answer_seq: None,
                ..
            }
        ),
        "the turn ends right after it, as cancelled"
    );

    // The next turn's model never sees the cut-off text.
    assert_eq!(sessions.send(&id, "next").await.unwrap().text(), "short");
    let last = seen.lock().unwrap().last().unwrap().clone();
    assert!(
        last.messages
            .iter()
            .all(|m| m.role != Role::Assistant || !m.text().starts_with("A long")),
        "{:?}",
        last.messages
    );
}

/// Streams "one", restarts, then streams "two" and finishes; the first call of all fails
/// retryably after a delta, asking for a 300 ms wait.
struct Flaky {
    calls: AtomicU32,
}

#[async_trait]
impl LlmClient for Flaky {
    async fn complete(&self, _request: ModelRequest) -> Result<ModelResponse> {
        Ok(ModelResponse::text("two"))
    }

    async fn stream(&self, _request: ModelRequest) -> Result<ModelStream> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let text = |t: &str| {
            Ok(ModelEvent::Delta(ModelDelta::Text {
                index: 0,
                text: t.into(),
            }))
        };
        let events = if call == 0 {
            vec![
                text("zero"),
                Err(Error::Provider(Box::new(ProviderError {
                    provider: "test".into(),
                    status: Some(529),
                    error_type: Some("overloaded_error".into()),
                    code: None,
                    request_id: None,
                    retry_after_ms: Some(300),
                    message: "Overloaded".into(),
                    retryable: true,
                }))),
            ]
        } else {
            vec![
                text("one"),
                Ok(ModelEvent::Restart {
                    reason: "stream cut".into(),
                }),
                text("two"),
                Ok(ModelEvent::Done(Box::new(ModelResponse::text("two")))),
            ]
        };
        Ok(futures::stream::iter(events).boxed())
    }
}

#[tokio::test]
async fn every_try_of_a_call_has_its_own_attempt_and_a_providers_retry_after_is_waited() {
    let flaky = Arc::new(Flaky {
        calls: AtomicU32::new(0),
    });
    let entry = CatalogEntry::new({
        let flaky = flaky.clone();
        move |_, _| Ok(flaky.clone() as Arc<dyn LlmClient>)
    });
    let sessions = runtime(catalog(entry), Arc::new(InMemoryStore::new()));
    let id = start(&sessions, "retry").await;
    let mut events = sessions.subscribe(&id, 0).await.unwrap();
    let started = Instant::now();
    let send = {
        let (sessions, id) = (sessions.clone(), id.clone());
        tokio::spawn(async move { sessions.send(&id, "go").await })
    };
    let (seen, outcome) = until_finished(&mut events).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the engine waits the provider's retry-after ({:?})",
        started.elapsed()
    );
    assert_eq!(send.await.unwrap().unwrap().text(), "two");
    assert_eq!(outcome.text(), "two");
    let deltas = text_deltas(&seen);
    let texts: Vec<&str> = deltas.iter().map(|d| d.3.as_str()).collect();
    assert_eq!(texts, ["zero", "one", "two"]);
    let attempts: Vec<Attempt> = deltas.iter().map(|d| d.2).collect();
    assert!(
        attempts[0] != attempts[1] && attempts[1] != attempts[2],
        "a retried call and a restarted stream are new attempts: {attempts:?}"
    );
    assert!(attempts.iter().all(|a| a.epoch == attempts[0].epoch));
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 2);
}
