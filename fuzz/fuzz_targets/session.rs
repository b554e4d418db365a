//! A whole SMTP session driven by an arbitrary byte stream: the `Session` state
//! machine alone, through the pure driver in `pure.rs` (bytes arriving in pieces of
//! fuzz-chosen sizes, STARTTLS that fails or "succeeds" in clear, messages kept in
//! memory). The first four bytes choose limits, bare-LF policy, TLS/AUTH availability
//! and piece sizes.
//!
//! Properties:
//! - never panics (SPEC invariant 5);
//! - every line the server wrote matches `^[2-5]\d\d[ -]`, ends in CRLF, has no other
//!   CR/LF, and continuation lines share their reply's code; the greeting is 220;
//! - the `250 … queued as ID` replies are exactly the stored messages, in order;
//! - every stored message has well-formed trace headers (no CR/LF/NUL injected by
//!   client input) with 1..=max_recipients recipients, and content of at most
//!   max_message_size octets;
//! - a message stored after DATA is exactly the dot-unstuffed, CRLF-normalised bytes
//!   that followed a DATA command line up to the first `<CRLF>.<CRLF>` (SPEC invariant
//!   2: no smuggling); one stored after BDAT LAST ends with that chunk's bytes;
//! - failed commands (5xx, not counting the end-of-message verdict after 354) never
//!   exceed max_errors; reaching it (a refused BDAT chunk included) is answered by the
//!   failed command's own reply and then 421 4.7.0, the last reply;
//! - STARTTLS (CVE-2011-0411): the handshake starts only when the client has sent
//!   nothing past the STARTTLS line and the server's last words were its 220; after a
//!   220 to STARTTLS without a handshake the connection says nothing more; after a
//!   handshake, EHLO no longer offers STARTTLS.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailer::connection::End;
use mailer::protocol::command::{parse, Command};
use mailer_fuzz::{first_terminator, guarded, parse_replies, read_data, split_trace, Knobs};

#[path = "pure.rs"]
mod pure;

/// Input offsets just after each LF-terminated line, with the line (no CR/LF).
fn lines(input: &[u8]) -> Vec<(usize, &[u8])> {
    let mut v = Vec::new();
    let mut start = 0;
    for (i, &b) in input.iter().enumerate() {
        if b == b'\n' {
            v.push((i + 1, strip_cr(&input[start..i])));
            start = i + 1;
        }
    }
    v
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Every place a command starting with `first` (either case) may begin (after a BDAT
/// payload a command need not start a line): the command and the offset after its LF.
fn commands_from(input: &[u8], first: u8) -> Vec<(Command, usize)> {
    let mut v = Vec::new();
    for i in 0..input.len() {
        if !input[i].eq_ignore_ascii_case(&first) {
            continue;
        }
        let Some(lf) = input[i..].iter().position(|&b| b == b'\n') else {
            break;
        };
        if let Ok(c) = parse(strip_cr(&input[i..i + lf])) {
            v.push((c, i + lf + 1));
        }
    }
    v
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let k = Knobs::from_header([data[0], data[1], data[2], data[3]]);
    let input = &data[4..];
    let run = pure::run_pure(input, &k);
    let replies = parse_replies(&run.out);
    assert_eq!(replies.first().map(|r| r.code), Some(220), "greeting");

    // Queued-as replies are the stored messages.
    let queued: Vec<&str> = replies.iter().filter_map(|r| r.queued_as()).collect();
    let ids: Vec<&str> = run.stored.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(queued, ids, "queued-as replies vs stored messages");

    // Which stored messages came from DATA (their final reply follows a 354).
    let mut from_data = Vec::new();
    let mut after_354 = false;
    let mut errors = 0u32;
    for (i, r) in replies.iter().enumerate() {
        if after_354 {
            after_354 = false;
            if let Some(id) = r.queued_as() {
                from_data.push(id.to_string());
            }
            continue;
        }
        if r.code == 354 {
            after_354 = true;
            continue;
        }
        let bye = r.code == 421 && r.last().starts_with("4.7.0 ");
        if r.code >= 500 {
            errors += 1;
            assert!(errors <= k.max_errors, "{errors} errors > {}", k.max_errors);
            if errors == k.max_errors {
                let next = replies
                    .get(i + 1)
                    .expect("421 after the last allowed error");
                assert_eq!(next.code, 421, "{next:?}");
                assert!(next.last().starts_with("4.7.0 "), "{next:?}");
            }
        }
        if bye {
            // Too many errors: the last failed command got its own reply, then the 421.
            assert_eq!(errors, k.max_errors, "421 4.7.0 after {errors} errors");
            assert_eq!(run.end, End::Closed);
        }
        if r.code == 421 {
            assert_eq!(i + 1, replies.len(), "replies after a 421");
        }
    }

    let all_lines = lines(input);
    let data_starts: Vec<usize> = commands_from(input, b'D')
        .into_iter()
        .filter(|(c, _)| *c == Command::Data)
        .map(|(_, p)| p)
        .collect();
    let last_chunks: Vec<&[u8]> = commands_from(input, b'B')
        .into_iter()
        .filter_map(|(c, p)| match c {
            Command::Bdat { size, last: true } => {
                input.get(p..p.checked_add(usize::try_from(size).ok()?)?)
            }
            _ => None,
        })
        .collect();

    let mut next_candidate = 0;
    for m in &run.stored {
        let (rcpts, body) = split_trace(&m.bytes, &m.id);
        assert!(
            rcpts >= 1 && rcpts <= k.max_recipients,
            "{rcpts} recipients"
        );
        // The guard may add an empty line (2 bytes) in front of what was received.
        assert!(
            body.len() as u64 <= k.max_message_size + 2,
            "stored {} > {}",
            body.len(),
            k.max_message_size
        );
        if from_data.contains(&m.id) {
            // The content is what followed some later DATA line, unstuffed.
            let found = data_starts[next_candidate..].iter().position(|&p| {
                let (out, _, r) = read_data(&input[p..], k.max_message_size, k.bare_lf);
                r.is_done() && r.is_keeping() && guarded(&out) == body
            });
            let Some(j) = found else {
                panic!("stored DATA message {} matches no DATA in the input", m.id);
            };
            // Independently of the reader: the content ended at the first CRLF.CRLF.
            let p = data_starts[next_candidate + j];
            let (_, n, _) = read_data(&input[p..], k.max_message_size, k.bare_lf);
            assert_eq!(
                first_terminator(&input[p..]),
                Some(n),
                "message {} did not end at the first <CRLF>.<CRLF>",
                m.id
            );
            next_candidate += j + 1;
        } else {
            assert!(
                // A LAST chunk still in the header section may lose a Return-Path field.
                last_chunks.iter().any(|c| {
                    body.ends_with(c)
                        || c.to_ascii_lowercase()
                            .windows(11)
                            .any(|w| w == b"return-path")
                }),
                "stored BDAT message {} does not end with a LAST chunk",
                m.id
            );
        }
    }

    // STARTTLS.
    for &(in_pos, out_len) in &run.handshakes {
        let line = all_lines
            .iter()
            .find(|&&(p, _)| p == in_pos)
            .map(|&(_, l)| l)
            .unwrap_or_else(|| panic!("handshake at input offset {in_pos}, not at a line end"));
        assert_eq!(
            parse(line),
            Ok(Command::StartTls),
            "handshake after {line:?}"
        );
        assert!(
            run.out[..out_len].ends_with(b"220 2.0.0 Ready to start TLS\r\n"),
            "handshake without its 220 last"
        );
    }
    let tls_ok = k.tls == mailer_fuzz::FakeTls::Succeed;
    for (i, r) in replies.iter().enumerate() {
        if r.code == 220 && r.last() == "2.0.0 Ready to start TLS" {
            let n_before: usize = replies[..=i]
                .iter()
                .filter(|r| r.last() == "2.0.0 Ready to start TLS")
                .count();
            if !tls_ok || run.handshakes.len() < n_before {
                assert_eq!(i + 1, replies.len(), "replies after an aborted STARTTLS");
            }
        }
    }
    if let Some(&(_, out_len)) = run.handshakes.first() {
        if tls_ok {
            for r in parse_replies(&run.out[out_len..]) {
                assert!(
                    !(r.code == 250 && r.lines.iter().any(|l| l == "STARTTLS")),
                    "STARTTLS offered again after TLS"
                );
            }
        }
    }
});
