//! BDAT chunking (RFC 3030) through the `Session` state machine alone: the pure driver
//! in `pure.rs` hands chunk bytes to `Session::body` in pieces of fuzz-chosen sizes.
//! The fuzz input is a program: a header (message size limit, piece sizes), then
//! operations: MAIL+RCPT,
//! `BDAT n` / `BDAT n LAST` with n payload bytes taken from the input (binary, CRLF,
//! dots and command text included), RSET, NOOP. A reference model predicts every reply.
//!
//! Properties:
//! - never panics;
//! - the replies are exactly the model's, in order (so no payload byte is ever taken as
//!   a command, and a refused chunk is still consumed);
//! - per-chunk replies are `250 2.0.0 <n> octets received`; a chunk beyond the size
//!   limit gets 552 5.3.4 and ends the transaction; BDAT without a transaction 503;
//! - each `LAST` is answered `queued as` only once stored, with the stored message's
//!   id, and the stored content is exactly the concatenated chunk payloads (with the
//!   trace-header guards of `guarded` applied), after trace headers naming every
//!   recipient.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailer::connection::End;
use mailer::protocol::data::BareLf;
use mailer_fuzz::{guarded, parse_replies, split_trace, FakeTls, Knobs};

#[path = "pure.rs"]
mod pure;

#[derive(Debug)]
enum State {
    Idle,
    Rcpt(usize),
    Chunking(usize, Vec<u8>),
}

/// What the model expects: a reply code and, where fixed, its last line's text.
#[derive(Debug)]
enum Want {
    Code(u16),
    Text(u16, String),
    Queued(Vec<u8>, usize),
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let max = [16u64, 100, 1000, 1 << 20][(data[0] & 3) as usize];
    let k = Knobs {
        max_message_size: max,
        max_recipients: 100_000,
        max_errors: 1_000_000,
        max_line_length: 1000,
        bare_lf: BareLf::Normalize,
        tls_available: false,
        auth: false,
        tls: FakeTls::Fail,
        seed: u64::from(data[1]),
        max_piece: [1, 3, 16, 100, 1000, 5000, 70_000, 1 << 20][(data[2] & 7) as usize],
    };
    let mut ops = &data[3..];
    let mut wire = b"EHLO c.test\r\n".to_vec();
    let mut want = vec![Want::Code(220), Want::Code(250)];
    let mut st = State::Idle;
    let take = |n: usize, ops: &mut &[u8]| -> Vec<u8> {
        let n = n.min(ops.len());
        let (a, b) = ops.split_at(n);
        *ops = b;
        a.to_vec()
    };
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        match op & 3 {
            0 => {
                wire.extend_from_slice(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n");
                st = match st {
                    State::Idle => {
                        want.push(Want::Code(250));
                        want.push(Want::Code(250));
                        State::Rcpt(1)
                    }
                    State::Rcpt(n) => {
                        want.push(Want::Code(503));
                        want.push(Want::Code(250));
                        State::Rcpt(n + 1)
                    }
                    s @ State::Chunking(..) => {
                        want.push(Want::Code(503));
                        want.push(Want::Code(503));
                        s
                    }
                };
            }
            1 | 2 => {
                let len_byte = take(1, &mut ops).first().copied().unwrap_or(0) as usize;
                let n = if op & 3 == 1 { len_byte } else { len_byte * 9 };
                let payload = take(n, &mut ops);
                let last = op & 4 != 0;
                let lower = op & 8 != 0;
                let cmd = format!(
                    "BDAT {}{}\r\n",
                    payload.len(),
                    if last { " LAST" } else { "" }
                );
                let cmd = if lower { cmd.to_ascii_lowercase() } else { cmd };
                wire.extend_from_slice(cmd.as_bytes());
                wire.extend_from_slice(&payload);
                st = match st {
                    State::Idle => {
                        want.push(Want::Code(503));
                        State::Idle
                    }
                    State::Rcpt(r) => chunk(&mut want, r, Vec::new(), &payload, last, max),
                    State::Chunking(r, so_far) => chunk(&mut want, r, so_far, &payload, last, max),
                };
            }
            _ => {
                if op & 4 != 0 {
                    wire.extend_from_slice(b"RSET\r\n");
                    st = State::Idle;
                } else {
                    wire.extend_from_slice(b"NOOP\r\n");
                }
                want.push(Want::Code(250));
            }
        }
    }
    wire.extend_from_slice(b"QUIT\r\n");
    want.push(Want::Code(221));

    let run = pure::run_pure(&wire, &k);
    assert_eq!(run.end, End::Quit, "the session ends at its QUIT");
    assert!(run.handshakes.is_empty(), "no TLS offered, none run");
    let replies = parse_replies(&run.out);
    let codes: Vec<u16> = replies.iter().map(|r| r.code).collect();
    assert_eq!(
        replies.len(),
        want.len(),
        "reply count differs: got {codes:?}, want {want:?}"
    );
    let mut stored = run.stored.iter();
    for (i, (got, w)) in replies.iter().zip(&want).enumerate() {
        match w {
            Want::Code(c) => assert_eq!(got.code, *c, "reply {i}: {got:?}; all {codes:?}"),
            Want::Text(c, t) => {
                assert_eq!(got.code, *c, "reply {i}: {got:?}");
                assert_eq!(got.last(), t, "reply {i}");
            }
            Want::Queued(content, rcpts) => {
                let id = got
                    .queued_as()
                    .unwrap_or_else(|| panic!("reply {i}: {got:?} is not queued-as"));
                let m = stored.next().expect("queued-as without a stored message");
                assert_eq!(m.id, id, "reply names another message");
                let (n_rcpts, body) = split_trace(&m.bytes, id);
                assert_eq!(n_rcpts, *rcpts);
                assert_eq!(
                    body,
                    guarded(content),
                    "stored content differs from the chunks"
                );
            }
        }
    }
    assert!(
        stored.next().is_none(),
        "a message was stored without a reply"
    );
});

/// One accepted-transaction chunk: the model's reply and next state.
fn chunk(
    want: &mut Vec<Want>,
    rcpts: usize,
    mut so_far: Vec<u8>,
    payload: &[u8],
    last: bool,
    max: u64,
) -> State {
    if (so_far.len() + payload.len()) as u64 > max {
        want.push(Want::Text(552, "5.3.4 Error: message file too big".into()));
        return State::Idle;
    }
    so_far.extend_from_slice(payload);
    if last {
        want.push(Want::Queued(so_far, rcpts));
        State::Idle
    } else {
        want.push(Want::Text(
            250,
            format!("2.0.0 {} octets received", payload.len()),
        ));
        State::Chunking(rcpts, so_far)
    }
}
