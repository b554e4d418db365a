//! The shortest path: one message over loopback, stored byte-exact.
mod common;
use common::*;

#[test]
fn one_message_is_stored_byte_exact_with_trace_headers() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    let reply = c.transaction(
        "a@x.test",
        &["b@y.test"],
        b"Subject: t\r\n\r\nhello\r\n.\r\n",
    );
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let id = queue_id(&reply);
    c.ok("QUIT", 221);
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    let (name, bytes) = &stored[0];
    assert!(name.contains(&format!(".{id}.mx.test")), "{name} vs {id}");
    let (trace, body) = split_stored(bytes);
    assert_eq!(body, b"Subject: t\r\n\r\nhello\r\n");
    assert!(trace.starts_with("Return-Path: <a@x.test>\r\nX-Original-To: b@y.test\r\nReceived: from client.test ([127.0.0.1]) by mx.test with ESMTP\r\n        id "), "{trace}");
    assert!(trace.contains(&format!("id {id} ; ")), "{trace}");
}
