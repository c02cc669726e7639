//! Findings of the hostile-client review (issue #17), each proven against the real binary:
//! the test fails on the code before the fix and passes after.

mod common;

use common::{Spawn, types};
use serde_json::json;

/// A frame refused by the rate limit is still answered with its own reference, so a
/// client knows which message to send again.
#[tokio::test]
async fn a_rate_limited_frame_is_answered_with_its_reference() {
    let server = Spawn::new().env("NETRA_RATE_LIMIT", "2").env("NETRA_RATE_WINDOW", "60s").ready().await;
    let mut client = server.connect("flooder").await;
    for i in 0..2 {
        client.send(json!({"type": "ping", "message_id": format!("p-{i}")})).await;
        assert_eq!(client.next().await["type"], "pong");
    }
    client.send(json!({"type": "user_message", "message_id": "m-3", "payload": {"content": "hi"}})).await;
    let refused = client.next().await;
    assert_eq!(refused["payload"]["code"], "rate_limited", "{refused}");
    assert_eq!(refused["payload"]["ref"], "m-3", "{refused}");
    // A frame that is not even JSON still gets its rate_limited error, without a reference.
    client.send_text("{not json").await;
    let refused = client.next().await;
    assert_eq!(refused["payload"]["code"], "rate_limited", "{refused}");
    assert!(refused["payload"].get("ref").is_none(), "{refused}");
}

/// `subscribe` with an `after_seq` the thread has not reached would mute the thread on
/// that socket until its seq caught up; it is refused instead, and nothing is muted.
#[tokio::test]
async fn subscribe_past_the_last_seq_is_invalid_and_mutes_nothing() {
    let server = Spawn::new().ready().await;
    let mut tab = server.connect("ahead").await;
    let run = tab.chat("what is 1 + 1?", None).await;
    let thread = run[0]["thread_id"].as_str().expect("thread id").to_string();
    let last = run.iter().filter_map(|f| f["seq"].as_u64()).max().expect("seq");
    tab.send(json!({"type": "subscribe", "message_id": "s-1",
                    "payload": {"thread_id": thread, "after_seq": last + 1000}}))
        .await;
    let refused = tab.next().await;
    assert_eq!(refused["payload"]["code"], "invalid_field", "{refused}");
    assert_eq!(refused["payload"]["ref"], "s-1", "{refused}");
    // The socket still sees its next run in the thread, whole.
    let next = tab.chat("and 2 + 2?", Some(&thread)).await;
    assert_eq!(next.first().and_then(|f| f["seq"].as_u64()), Some(last + 1), "{:?}", types(&next));
    assert_eq!(next.last().expect("frames")["type"], "final_report", "{:?}", types(&next));
    // Subscribing exactly at the last seq is fine: nothing to replay, live from there.
    let end = next.iter().filter_map(|f| f["seq"].as_u64()).max().expect("seq");
    tab.send(json!({"type": "subscribe", "payload": {"thread_id": thread, "after_seq": end}})).await;
    tab.send(json!({"type": "ping", "timestamp": 1})).await;
    assert_eq!(tab.next().await["type"], "pong");
}
