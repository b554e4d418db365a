//! The PROXY protocol header parser `mailer::protocol::proxy::parse` (HAProxy
//! proxy-protocol.txt §2.1 v1, §2.2 v2). Input: a selector byte, then header bytes.
//!
//! Properties:
//! - never panics;
//! - `Need(n)` has n ≥ 1, and a reader that reads at most `n` bytes at a time (as the
//!   server does, straight off the socket) ends with the same result as parsing the
//!   whole input, never reading a byte past the header (the client's first command);
//! - `Done { consumed }`: consumed ≤ input, a v1 header is at most 107 bytes and ends
//!   in CRLF, and the result depends only on those bytes (not on what follows);
//! - an error stays an error whatever bytes follow (no "valid later");
//! - round trip: headers built from fuzz addresses (v1 TCP4/TCP6 text, v2 with TLVs via
//!   `v2_header`) parse to exactly their length and their source address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailer::protocol::proxy::{parse, v2_header, Parse, V1_MAX};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Reads `stream` as the server does: at most `Need(n)` bytes per read.
fn incremental(stream: &[u8]) -> (Parse, usize) {
    let mut have = 0;
    loop {
        let r = parse(&stream[..have]);
        match r {
            Parse::Need(n) => {
                assert!(n >= 1, "Need(0)");
                if have == stream.len() {
                    return (r, have);
                }
                have = (have + n).min(stream.len());
            }
            _ => return (r, have),
        }
    }
}

fn check_done(input: &[u8], consumed: usize) {
    assert!(consumed <= input.len());
    if input.starts_with(b"PROXY ") {
        assert!(consumed <= V1_MAX, "v1 header of {consumed} bytes");
        assert!(input[..consumed].ends_with(b"\r\n"));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let whole = parse(input);
    match whole {
        Parse::Need(n) => assert!(n >= 1),
        Parse::Done { consumed, source } => {
            check_done(input, consumed);
            assert_eq!(
                parse(&input[..consumed]),
                Parse::Done { consumed, source },
                "result depends on bytes after the header"
            );
        }
        Parse::Error(_) => {}
    }

    // The server's way of reading: never past the header, same outcome.
    let (inc, read) = incremental(input);
    match (whole, inc) {
        (Parse::Done { consumed, .. }, Parse::Done { .. }) => {
            assert_eq!(inc, whole);
            assert_eq!(read, consumed, "read past the header");
        }
        (Parse::Error(_), Parse::Error(_)) => {}
        (Parse::Need(_), Parse::Need(_)) => assert_eq!(read, input.len()),
        (w, i) => panic!("whole input: {w:?}, incrementally: {i:?}"),
    }

    // Errors are final: appending bytes never makes a header valid.
    if let Parse::Error(_) = whole {
        let mut more = input.to_vec();
        more.extend_from_slice(b"\r\n");
        more.extend(std::iter::repeat_n(sel, 300));
        assert!(
            matches!(parse(&more), Parse::Error(_)),
            "error became {:?}",
            parse(&more)
        );
    }

    // Round trips from fuzz-chosen addresses.
    if input.len() >= 36 {
        let a: [u8; 16] = input[..16].try_into().unwrap();
        let b: [u8; 16] = input[16..32].try_into().unwrap();
        let sp = u16::from_be_bytes([input[32], input[33]]);
        let dp = u16::from_be_bytes([input[34], input[35]]);
        let tlvs = &input[36..input.len().min(36 + 200)];
        let (s, d): (SocketAddr, SocketAddr) = if sel & 1 == 0 {
            let s4 = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            let d4 = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            ((s4, sp).into(), (d4, dp).into())
        } else {
            (
                (Ipv6Addr::from(a), sp).into(),
                (Ipv6Addr::from(b), dp).into(),
            )
        };
        let h = v2_header(Some((s, d)), tlvs);
        let mut stream = h.clone();
        stream.extend_from_slice(b"EHLO c\r\n");
        assert_eq!(
            parse(&stream),
            Parse::Done {
                consumed: h.len(),
                source: Some(s)
            }
        );
        assert_eq!(incremental(&stream).1, h.len());
        let local = v2_header(None, tlvs);
        assert_eq!(
            parse(&local),
            Parse::Done {
                consumed: local.len(),
                source: None
            }
        );
        let v1 = match (s.ip(), d.ip()) {
            (IpAddr::V4(x), IpAddr::V4(y)) => format!("PROXY TCP4 {x} {y} {sp} {dp}\r\n"),
            (x, y) => format!("PROXY TCP6 {x} {y} {sp} {dp}\r\n"),
        };
        let mut stream = v1.clone().into_bytes();
        stream.extend_from_slice(tlvs);
        assert_eq!(
            parse(&stream),
            Parse::Done {
                consumed: v1.len(),
                source: Some(s)
            },
            "{v1:?}"
        );
        assert_eq!(incremental(&stream).1, v1.len());
    }
});
