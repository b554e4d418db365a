//! The client's reply parser `mailer::client::parse_reply` (RFC 5321 §4.2), and its
//! agreement with the server's reply writer. Input: a split byte, then bytes.
//!
//! Properties:
//! - never panics;
//! - `Ok(Some((reply, n)))`: 1 ≤ n ≤ input, the reply used whole lines (`buf[..n]`
//!   ends in LF), has 1..=MAX_LINES lines each starting with its 2xx-5xx code, and
//!   parsing exactly `buf[..n]` gives the same; any shorter prefix is `Ok(None)`
//!   (incomplete), never a different reply;
//! - a stream is consumed reply by reply without ever claiming more than was given;
//! - whatever the server's `Reply` writer produces (any code 200-599, enhanced code or
//!   not, any text, multi-line), the client parses back: same code, one line per text
//!   line, each exactly as written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailer::client::reply::{MAX_LINE, MAX_LINES};
use mailer::client::{parse_reply, ServerReply};
use mailer::{Enhanced, Reply};

fuzz_target!(|data: &[u8]| {
    let Some((&split, buf)) = data.split_first() else {
        return;
    };
    if let Ok(Some((r, n))) = parse_reply(buf) {
        check(&r, buf, n);
        let k = split as usize * n / 256;
        assert_eq!(parse_reply(&buf[..k]), Ok(None), "prefix of {k} bytes");
        if n > 0 {
            assert_eq!(parse_reply(&buf[..n - 1]), Ok(None), "prefix of n-1 bytes");
        }
    }

    // A stream of replies, read one after another.
    let mut pos = 0;
    while let Ok(Some((r, n))) = parse_reply(&buf[pos..]) {
        check(&r, &buf[pos..], n);
        pos += n;
    }
    assert!(pos <= buf.len());

    // What the server writes, the client reads back.
    if buf.len() >= 2 {
        let code = 200 + u16::from_be_bytes([buf[0], buf[1]]) % 400;
        let text = String::from_utf8_lossy(&buf[2..]).into_owned();
        let reply = if split & 1 == 0 {
            Reply::new(code, Enhanced(code as u8 / 100, 1, 2), text.clone())
        } else {
            Reply::plain(code, text.clone())
        };
        let wire = reply.to_bytes();
        let lines: Vec<&[u8]> = wire
            .strip_suffix(b"\r\n")
            .unwrap()
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .collect();
        let fits = lines.len() <= MAX_LINES && lines.iter().all(|l| l.len() + 2 <= MAX_LINE);
        let parsed = parse_reply(&wire);
        if fits {
            let Ok(Some((r, n))) = parsed else {
                panic!("server reply {wire:?} not parsed: {parsed:?}");
            };
            assert_eq!(n, wire.len());
            assert_eq!(r.code, code);
            assert_eq!(r.lines.len(), lines.len());
            for (got, want) in r.lines.iter().zip(&lines) {
                assert_eq!(got.as_bytes(), *want);
            }
        } else {
            assert!(parsed.is_err(), "oversized reply accepted");
        }
    }
});

fn check(r: &ServerReply, buf: &[u8], n: usize) {
    assert!(n >= 1 && n <= buf.len());
    assert!(buf[..n].ends_with(b"\n"));
    assert!(!r.lines.is_empty() && r.lines.len() <= MAX_LINES);
    assert!((200..600).contains(&r.code));
    let code = r.code.to_string();
    for l in &r.lines {
        assert!(l.starts_with(&code), "{l:?} in a {} reply", r.code);
    }
    assert_eq!(parse_reply(&buf[..n]), Ok(Some((r.clone(), n))));
}
