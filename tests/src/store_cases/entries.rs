//! `entries`: paging by `after` and `limit`, and an unknown session.

use std::sync::Arc;

use normandy_core::{ContentBlock, Entry, ErrorKind, ResumePolicy, Seq};

use super::{applied, batch, err, idle, input, names, node, ok, reply, sid, start};
use crate::harness::StoreHarness;

/// Precondition: none. `entries(after, limit)` returns entries with seq > `after`, ascending, at
/// most `limit`, exactly as committed; past the end or with limit 0 it is empty; a huge limit
/// is fine.
pub async fn entries_pages_by_after_and_limit(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("paging");
    let epoch = start(&*store, &id, ResumePolicy::Lazy, &node("a")).await;
    let written: Vec<Entry> = vec![
        input(1, "in-1"),
        reply(2),
        reply(3),
        input(4, "in-2"),
        reply(5),
        reply(6),
        input(7, "in-3"),
        reply(8),
        reply(9),
        reply(10),
    ];
    let mut seq = 0;
    for chunk in [&written[0..3], &written[3..6], &written[6..10]] {
        let b = batch(chunk.to_vec(), idle());
        applied(
            store.commit(&id, epoch, seq, &b).await,
            b.new_seq(seq),
            "commit",
        );
        seq = b.new_seq(seq);
    }
    let seqs = |es: Vec<Entry>| es.iter().map(|e| e.seq).collect::<Vec<_>>();
    let page = |after: Seq, limit: usize| {
        let store = store.clone();
        let id = id.clone();
        async move { ok(store.entries(&id, after, limit).await, "entries") }
    };
    assert_eq!(seqs(page(0, 3).await), vec![1, 2, 3]);
    assert_eq!(seqs(page(3, 3).await), vec![4, 5, 6]);
    assert_eq!(seqs(page(6, 3).await), vec![7, 8, 9]);
    assert_eq!(seqs(page(9, 3).await), vec![10]);
    assert_eq!(seqs(page(4, 2).await), vec![5, 6]);
    assert!(
        page(10, 3).await.is_empty(),
        "entries after the last must be empty"
    );
    assert!(
        page(50, 3).await.is_empty(),
        "entries far past the end must be empty"
    );
    assert!(page(0, 0).await.is_empty(), "limit 0 must return nothing");
    assert_eq!(page(0, usize::MAX).await, written, "limit usize::MAX");
    assert_eq!(
        page(0, 100).await,
        written,
        "entries differ from what was committed"
    );
    assert_eq!(page(7, 100).await, written[7..].to_vec());
}

/// Precondition: none. `entries` of an unknown id is `NotFound` naming it, not an empty list.
pub async fn entries_unknown_is_not_found(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("no-entries");
    let e = err(
        store.entries(&id, 0, 10).await,
        ErrorKind::NotFound,
        "entries of an unknown id",
    );
    names(&e, &id, "NotFound");
}

/// Precondition: none. What providers send — thinking with its signature, redacted thinking,
/// inline and linked images, a document, a tool result with structured content and an image,
/// every usage counter, the call's model and request id, an incomplete response — is stored
/// and read back exactly; a 300 KiB inline image is no special case.
pub async fn provider_content_is_stored_exactly(h: Arc<dyn StoreHarness>) {
    use normandy_core::{CallInfo, EntryPayload, Message, Role, StopReason, Usage};
    use serde_json::json;

    let store = h.store();
    let id = sid("rich");
    let epoch = start(&*store, &id, ResumePolicy::Lazy, &node("a")).await;
    let picture: Vec<u8> = (0..300 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let image = ContentBlock::image_bytes("image/png", &picture).expect("image");
    let mut first = input(1, "in-1");
    if let EntryPayload::Input { content, .. } = &mut first.payload {
        content.push(image.clone());
        content.push(ContentBlock::image_url(
            "image/jpeg",
            "https://example.com/a.jpg",
        ));
        content.push(
            ContentBlock::document_bytes("application/pdf", b"%PDF-1.7", Some("menu".into()))
                .expect("document"),
        );
    }
    let mut answer = reply(2);
    answer.payload = EntryPayload::Assistant {
        message: Message {
            role: Role::Assistant,
            content: vec![
                ContentBlock::Thinking {
                    thinking: "Let me look at the picture.".into(),
                    signature: Some("EqQBCgIYAhIM1gbcDa9GJwZA2b3h".into()),
                },
                ContentBlock::RedactedThinking {
                    data: "EmwKAhgBEgy3va3pzix".into(),
                },
                ContentBlock::ToolUse {
                    id: "toolu_01".into(),
                    name: "zoom".into(),
                    input: json!({"factor": 2.5, "region": [0, 0, 10, 10]}),
                },
            ],
        },
        stop_reason: StopReason::ToolUse,
        usage: Usage {
            input_tokens: 10,
            output_tokens: 20,
            cache_read_tokens: 30,
            cache_write_tokens: 40,
            reasoning_tokens: 5,
        },
        call: CallInfo {
            model: Some("claude-sonnet-4-5".into()),
            request_id: Some("req_011".into()),
            stop: Some("tool_use".into()),
        },
        incomplete: false,
    };
    let mut result = reply(3);
    result.payload = EntryPayload::ToolResult {
        call_id: "toolu_01".into(),
        content: "{\"found\":true}".into(),
        is_error: false,
        structured: Some(json!({"found": true})),
        blocks: vec![image],
        in_doubt: None,
    };
    let mut partial = reply(4);
    partial.payload = EntryPayload::Assistant {
        message: Message::assistant("It is a ca"),
        stop_reason: StopReason::Other,
        usage: Usage::default(),
        call: CallInfo::default(),
        incomplete: true,
    };
    let written = vec![first, answer, result, partial];
    let b = batch(written.clone(), idle());
    applied(store.commit(&id, epoch, 0, &b).await, 4, "commit");
    assert_eq!(ok(store.entries(&id, 0, 10).await, "entries"), written);
}
