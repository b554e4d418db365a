//! The DATA reader `mailer::protocol::data::DataReader` (RFC 5321 §4.5.2; SPEC
//! invariant 2). Input: one options byte, one split byte, then the bytes that follow
//! the DATA command on the wire.
//!
//! Properties:
//! - never panics;
//! - end of data is detected iff `\r\n.\r\n` occurs in the input or it starts with
//!   `.\r\n`, and exactly at the first such place: `\n.\n`, `\n.\r\n`, `\r\n.\n`,
//!   `\r.\r` never end it (SMTP smuggling); without an end, all input is consumed;
//! - splitting the input into two feeds at any point gives the same output (unless the
//!   message is too big and so discarded anyway), consumed count, verdict and size;
//! - the output never contains anything that would end a message early: dot-stuffing
//!   it and reading it again gives it back, ending exactly at the new terminator;
//! - round trip: `dot_stuff` of the input, read back, is the CRLF-normalised input;
//! - limits: the output never exceeds `max_size`; `TooBig` iff the content is larger;
//!   what is kept is a prefix of the full content;
//! - bare LF: with `Reject` the verdict is `BareLf` iff an LF not preceded by CR was
//!   consumed (and the message is not too big); with `Normalize`, never.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailer::protocol::data::{dot_stuff, BareLf, Verdict};
use mailer_fuzz::{first_terminator, normalise, read_data};

const BIG: u64 = 1 << 30;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (opts, split, input) = (data[0], data[1], &data[2..]);
    let max = [0u64, 8, 64, BIG][(opts & 3) as usize];
    let mode = if opts & 4 != 0 {
        BareLf::Reject
    } else {
        BareLf::Normalize
    };

    let (out, n, r) = read_data(input, max, mode);

    // End iff a real terminator occurs, exactly at the first one.
    match first_terminator(input) {
        Some(end) => {
            assert!(r.is_done(), "terminator at {end} not seen");
            assert_eq!(n, end, "ended at the wrong place");
        }
        None => {
            assert!(!r.is_done(), "ended without <CRLF>.<CRLF> after {n} bytes");
            assert_eq!(n, input.len(), "stopped early without an end");
        }
    }

    // Split anywhere: same result.
    let k = if input.is_empty() {
        0
    } else {
        split as usize * input.len() / 255
    };
    let mut r2 = mailer::protocol::data::DataReader::new(max, mode);
    let mut out2 = Vec::new();
    let mut n2 = r2.feed(&input[..k], &mut out2);
    if !r2.is_done() {
        n2 += r2.feed(&input[k..], &mut out2);
    }
    if r.verdict() != Verdict::TooBig {
        // (What is kept of a message that is too big anyway may differ.)
        assert_eq!(out2, out, "split at {k} changed the output");
    }
    assert_eq!(n2, n, "split at {k} changed the consumed count");
    assert_eq!(r2.is_done(), r.is_done());
    assert_eq!(r2.verdict(), r.verdict());
    assert_eq!(r2.size(), r.size());

    // The full content, with no size limit.
    let (full, n_full, rf) = read_data(input, BIG, BareLf::Normalize);
    assert_eq!(n_full, n);
    assert_eq!(rf.size(), full.len() as u64);
    assert_eq!(r.size(), rf.size(), "size counts all content");
    if rf.is_done() {
        assert!(full.is_empty() || full.ends_with(b"\r\n"), "{full:?}");
    }

    // Limits.
    assert!(out.len() as u64 <= max, "kept {} > {max}", out.len());
    assert_eq!(r.verdict() == Verdict::TooBig, r.size() > max);
    assert!(
        full.starts_with(&out),
        "kept bytes are not a prefix of the content"
    );

    // Bare LF policy.
    let bare = input[..n]
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || input[i - 1] != b'\r'));
    match mode {
        BareLf::Normalize => assert_ne!(r.verdict(), Verdict::BareLf),
        BareLf::Reject => {
            if r.verdict() != Verdict::TooBig {
                assert_eq!(r.verdict() == Verdict::BareLf, bare, "bare LF verdict");
            }
        }
    }
    if r.verdict() == Verdict::Ok {
        assert_eq!(out, full);
    }

    // Nothing in the output ends a re-sent message early.
    let again = dot_stuff(&full);
    let (back, n_back, rb) = read_data(&again, BIG, BareLf::Normalize);
    assert!(rb.is_done());
    assert_eq!(n_back, again.len(), "re-sent content ended early");
    assert_eq!(back, normalise(&full));

    // Client/server round trip on the input taken as content.
    let wire = dot_stuff(input);
    let (rt, n_rt, rr) = read_data(&wire, BIG, BareLf::Normalize);
    assert!(rr.is_done());
    assert_eq!(n_rt, wire.len(), "dot-stuffed input ended early");
    assert_eq!(rt, normalise(input), "round trip changed the content");
});
