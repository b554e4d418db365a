//! The milter reply decoder `mailer::protocol::milter` (the bytes a filter sends us) and
//! the replycode check.
//!
//! Properties:
//! - never panics, whatever a filter sends;
//! - `Ok(Some((r, n)))`: 5 ≤ n ≤ input and n is 4 + the length prefix, which is at most
//!   MAX_PACKET; every shorter prefix is `Ok(None)` (incomplete) and never a reply;
//! - a stream is consumed packet by packet without claiming more than was given;
//! - a replycode that passes the check becomes a 4xx/5xx reply whose wire form is whole
//!   CRLF lines with no other CR or LF (so a filter cannot forge a second reply).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailer::protocol::milter::{decode, parse_reply_code, MAX_PACKET};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, n))) = decode(data) {
        assert!(n >= 5 && n <= data.len() && n - 4 <= MAX_PACKET);
        let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        assert_eq!(n, 4 + len);
        assert_eq!(decode(&data[..n - 1]), Ok(None));
        assert_eq!(decode(&data[..n.min(4)]), Ok(None));
    }
    let mut pos = 0;
    while let Ok(Some((_, n))) = decode(&data[pos..]) {
        pos += n;
    }
    assert!(pos <= data.len());

    let text = String::from_utf8_lossy(data);
    if let Some(reply) = parse_reply_code(&text) {
        assert!((400..600).contains(&reply.code));
        let wire = reply.to_bytes();
        assert!(wire.ends_with(b"\r\n"));
        for line in wire[..wire.len() - 2].split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(!line.contains(&b'\r') && !line.contains(&b'\n'));
            assert!(line.starts_with(reply.code.to_string().as_bytes()));
        }
    }
});
