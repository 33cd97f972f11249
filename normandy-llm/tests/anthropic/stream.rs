//! Streams, from the raw-TCP script server: split mid-frame, pings and unknown events, error
//! events after a 200, thinking with signatures, cut connections, a 529 before the stream.

use super::*;

#[tokio::test]
async fn text_stream_with_pings_split_mid_frame() {
    let mut events = vec![
        message_start(),
        ping(),
        text_start(0),
        text(0, "Bonjour, "),
        ping(),
        text(0, "le monde — ça va?"),
        block_stop(0),
    ];
    events.extend(message_end("end_turn", 15));
    let body = sse(&events, "\r\n");
    // Pieces of 7 bytes: splits inside field names, JSON, CRLF pairs and UTF-8 characters.
    let server = ScriptServer::start(vec![
        Reply::sse()
            .header("request-id", "req_011CS")
            .every(&body, 7),
    ])
    .await;
    let (events, err) = stream_from(&server, fast(), "salut").await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(texts(&events), "Bonjour, le monde — ça va?");
    let response = done(&events);
    assert_eq!(
        response.content,
        [ContentBlock::text("Bonjour, le monde — ça va?")]
    );
    assert_eq!(response.stop_reason, StopReason::EndTurn);
    assert_eq!(
        response.usage,
        Usage {
            input_tokens: 12,
            output_tokens: 15,
            cache_read_tokens: 340,
            ..Usage::default()
        }
    );
    assert_eq!(response.call.request_id.as_deref(), Some("req_011CS"));
    assert_eq!(response.call.model.as_deref(), Some("claude-test-20250101"));
    assert_eq!(response.call.stop.as_deref(), Some("end_turn"));

    let sent = &server.requests()[0];
    assert_eq!(sent.request_line, "POST /v1/messages HTTP/1.1");
    assert_eq!(sent.json()["stream"], true);
    assert_eq!(sent.header("x-api-key"), Some(KEY));
}

#[tokio::test]
async fn tool_use_stream_with_input_split_at_odd_places() {
    let fragments = [
        "",
        "{\"ci",
        "ty\": \"São ",
        "Paulo\", \"units\"",
        ": [\"°C\"",
        "]}",
    ];
    let mut events = vec![
        message_start(),
        text_start(0),
        text(0, "Let me check."),
        block_stop(0),
        tool_use_start(1, "toolu_01A"),
    ];
    for f in fragments {
        events.push(tool_input(1, f));
    }
    events.push(block_stop(1));
    events.extend(message_end("tool_use", 40));
    let body = sse(&events, "\n");
    let server = ScriptServer::start(vec![Reply::sse().every(&body, 13)]).await;
    let (events, err) = stream_from(&server, fast(), "weather?").await;
    assert!(err.is_none(), "{err:?}");
    let deltas: Vec<&ModelDelta> = events
        .iter()
        .filter_map(|e| match e {
            ModelEvent::Delta(d) => Some(d),
            _ => None,
        })
        .collect();
    assert!(deltas.contains(&&ModelDelta::ToolUseStart {
        index: 1,
        id: "toolu_01A".into(),
        name: "get_weather".into(),
    }));
    let joined: String = deltas
        .iter()
        .filter_map(|d| match d {
            ModelDelta::ToolInput { partial_json, .. } => Some(partial_json.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(joined, fragments.concat());
    let response = done(&events);
    assert_eq!(response.stop_reason, StopReason::ToolUse);
    assert_eq!(
        response.content,
        [
            ContentBlock::text("Let me check."),
            ContentBlock::ToolUse {
                id: "toolu_01A".into(),
                name: "get_weather".into(),
                input: json!({"city": "São Paulo", "units": ["°C"]}),
            },
        ]
    );
}

#[tokio::test]
async fn thinking_and_redacted_thinking_go_back_unchanged_with_the_signature() {
    let signature = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgwhEQ+/=";
    let mut events = vec![
        message_start(),
        block_start(0, json!({"type": "thinking", "thinking": ""})),
        thinking(0, "The user wants "),
        thinking(0, "the weather.\n"),
        signature_delta(0, &signature[..20]),
        signature_delta(0, &signature[20..]),
        block_stop(0),
        block_start(
            1,
            json!({"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"}),
        ),
        block_stop(1),
        tool_use_start(2, "toolu_01B"),
        tool_input(2, "{\"city\": \"Oslo\"}"),
        block_stop(2),
    ];
    events.extend(message_end("tool_use", 90));
    let server = ScriptServer::start(vec![
        Reply::sse().every(sse(&events, "\n"), 64),
        Reply::sse().chunk(sse(&text_stream("It is cold."), "\n")),
    ])
    .await;
    let client = client(&server.url(), fast());
    let mut params = BTreeMap::new();
    params.insert(
        "thinking".to_owned(),
        json!({"type": "enabled", "budget_tokens": 2048}),
    );
    let first = ModelRequest {
        params: Arc::new(params),
        ..request(vec![Message::user("Weather in Oslo?")])
    };
    let (events, err) = drain(client.stream(first.clone()).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(events.iter().any(|e| matches!(
        e,
        ModelEvent::Delta(ModelDelta::Thinking { index: 0, text }) if text == "The user wants "
    )));
    let response = done(&events).clone();
    assert_eq!(
        response.content[..2],
        [
            ContentBlock::Thinking {
                thinking: "The user wants the weather.\n".into(),
                signature: Some(signature.into()),
            },
            ContentBlock::RedactedThinking {
                data: "EmwKAhgBEgy3va3pzix/LafPsn4a".into()
            },
        ]
    );

    // The tool loop's next call sends the assistant turn back as it came.
    let mut messages = (*first.messages).clone();
    messages.push(Message {
        role: Role::Assistant,
        content: response.content.clone(),
    });
    messages.push(Message {
        role: Role::User,
        content: vec![ContentBlock::tool_result("toolu_01B", "-3 °C", false)],
    });
    let second = ModelRequest {
        messages: Arc::new(messages),
        ..first
    };
    let (events, err) = drain(client.stream(second).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(texts(&events), "It is cold.");
    let sent = server.requests()[1].json();
    assert_eq!(
        sent["thinking"],
        json!({"type": "enabled", "budget_tokens": 2048})
    );
    assert_eq!(
        sent["messages"][1],
        json!({"role": "assistant", "content": [
            {"type": "thinking", "thinking": "The user wants the weather.\n", "signature": signature},
            {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"},
            {"type": "tool_use", "id": "toolu_01B", "name": "get_weather", "input": {"city": "Oslo"}},
        ]})
    );
    assert_eq!(sent["messages"][2]["content"][0]["type"], "tool_result");
    assert_eq!(
        sent["messages"][2]["content"][0]["tool_use_id"],
        "toolu_01B"
    );
}

#[tokio::test]
async fn unknown_event_types_and_block_types_are_ignored() {
    let mut events = vec![
        message_start(),
        (
            "brand_new_event",
            json!({"type": "brand_new_event", "payload": [1, 2, 3]}),
        ),
        block_start(0, json!({"type": "future_block", "whatever": true})),
        delta(0, json!({"type": "future_delta", "x": 1})),
        block_stop(0),
        text_start(1),
        text(1, "still here"),
        block_stop(1),
    ];
    events.extend(message_end("end_turn", 3));
    let server = ScriptServer::start(vec![Reply::sse().chunk(sse(&events, "\n"))]).await;
    let (events, err) = stream_from(&server, fast(), "hi").await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(done(&events).content, [ContentBlock::text("still here")]);
}

#[tokio::test]
async fn an_overloaded_error_event_after_200_is_retried() {
    let failing = [
        message_start(),
        text_start(0),
        text(0, "Half an ans"),
        (
            "error",
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ),
    ];
    let server = ScriptServer::start(vec![
        Reply::sse().chunk(sse(&failing, "\n")),
        Reply::sse().chunk(sse(&text_stream("A whole answer."), "\n")),
    ])
    .await;
    let (events, err) = stream_from(&server, fast(), "hi").await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(restarts(&events), 1, "{events:?}");
    // Deltas after the restart are the new answer's.
    let after: Vec<ModelEvent> = events
        .iter()
        .skip_while(|e| !matches!(e, ModelEvent::Restart { .. }))
        .cloned()
        .collect();
    assert_eq!(texts(&after), "A whole answer.");
    assert_eq!(
        done(&events).content,
        [ContentBlock::text("A whole answer.")]
    );
    assert_eq!(server.request_count(), 2);
}

#[tokio::test]
async fn a_terminal_error_event_ends_the_stream_without_a_retry() {
    let failing = [
        message_start(),
        (
            "error",
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long"}}),
        ),
    ];
    let server = ScriptServer::start(vec![
        Reply::sse()
            .header("request-id", "req_bad")
            .chunk(sse(&failing, "\n")),
    ])
    .await;
    let (_, err) = stream_from(&server, fast(), "hi").await;
    let err = err.expect("the error event ends the stream");
    let p = provider(&err);
    assert!(!p.retryable);
    assert_eq!(p.error_type.as_deref(), Some("invalid_request_error"));
    assert_eq!(p.request_id.as_deref(), Some("req_bad"));
    assert_eq!(p.status, None);
    assert_eq!(server.request_count(), 1);
}

#[tokio::test]
async fn bad_tool_json_is_a_malformed_error_naming_the_call() {
    let mut events = vec![
        message_start(),
        tool_use_start(0, "toolu_01C"),
        tool_input(0, "{\"city\": \"Lim"),
        block_stop(0),
    ];
    events.extend(message_end("tool_use", 9));
    let server = ScriptServer::start(vec![Reply::sse().chunk(sse(&events, "\n"))]).await;
    let (events, err) = stream_from(&server, fast().max_retries(0), "hi").await;
    assert!(!events.iter().any(|e| matches!(e, ModelEvent::Done(_))));
    let err = err.expect("malformed");
    let p = provider(&err);
    assert_eq!(p.error_type.as_deref(), Some("malformed_response"));
    assert!(
        p.message.contains("toolu_01C") && p.message.contains("get_weather"),
        "{p}"
    );
    assert!(p.retryable, "a new sample usually parses");
}

#[tokio::test]
async fn a_stream_cut_before_message_stop_restarts_then_succeeds() {
    let partial = [message_start(), text_start(0), text(0, "The first try")];
    let server = ScriptServer::start(vec![
        // A connection dropped mid-body (chunked: a read error).
        Reply::sse().chunk(sse(&partial, "\n")).cut(),
        // A body that ends cleanly but before `message_stop` (close-delimited: an early EOF).
        Reply::sse()
            .close_delimited()
            .chunk(sse(&partial, "\n"))
            .chunk("event: content_block_delta\ndata: {\"type\": \"content_bl"),
        Reply::sse().chunk(sse(&text_stream("The third try."), "\n")),
    ])
    .await;
    let (events, err) = stream_from(&server, fast(), "hi").await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(restarts(&events), 2, "{events:?}");
    assert_eq!(
        done(&events).content,
        [ContentBlock::text("The third try.")]
    );
    assert_eq!(server.request_count(), 3);
}

#[tokio::test]
async fn a_stream_cut_every_time_fails_retryable_once_the_budget_is_spent() {
    let partial = [message_start(), text_start(0)];
    let cut = Reply::sse().chunk(sse(&partial, "\n")).cut();
    let server = ScriptServer::start(vec![cut.clone(), cut.clone(), cut]).await;
    let (events, err) = stream_from(&server, fast().max_retries(2), "hi").await;
    assert!(!events.iter().any(|e| matches!(e, ModelEvent::Done(_))));
    let err = err.expect("out of retries");
    assert!(err.is_retryable(), "{err}");
    assert_eq!(provider(&err).provider, "anthropic");
    assert_eq!(server.request_count(), 3);
}

#[tokio::test]
async fn a_stream_answered_529_then_200_is_retried() {
    let server = ScriptServer::start(vec![
        Reply::json(
            529,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        ),
        Reply::sse().chunk(sse(&text_stream("fine"), "\n")),
    ])
    .await;
    let (events, err) = stream_from(&server, fast(), "hi").await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        restarts(&events),
        0,
        "nothing was streamed before the retry"
    );
    assert_eq!(done(&events).content, [ContentBlock::text("fine")]);
}
