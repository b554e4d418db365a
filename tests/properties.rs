//! Property tests (issue 10) over whole sessions, through the in-memory driver
//! (`mailer::testing`) and once over TCP with the real client:
//!
//! 1. Dot-stuffing by the client, then unstuffing by the server, is the identity on
//!    arbitrary bytes (after CRLF normalisation: a bare LF is sent and stored as CRLF,
//!    and a last line without one gets a CRLF). SPEC invariant 2, SPEC 5 "exactly as
//!    received".
//! 2. However a pipelined byte stream is cut into reads, the server sends the same
//!    replies, byte for byte, stores the same messages and ends the same way (RFC 2920;
//!    SPEC invariant 6).
mod common;
use common::*;
use mailer::client::{try_send, Job, Pipelining, StartTls, Status};
use mailer::protocol::data::dot_stuff;
use mailer::testing::Mem;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::time::Duration;

/// Message content rich in the bytes that matter to dot-stuffing and line ends.
fn content() -> impl Strategy<Value = Vec<u8>> {
    vec(
        prop_oneof![
            3 => Just(b'.'),
            3 => Just(b'\r'),
            3 => Just(b'\n'),
            2 => Just(b'a'),
            2 => any::<u8>(),
        ],
        0..600,
    )
}

/// What the server must store for `content`: bare LF as CRLF, a final CRLF added to a
/// last line without one (the client's `dot_stuff` does the same), then the trace
/// guards (an empty line before leading white space, no incoming `Return-Path:`).
fn normalise(content: &[u8]) -> Vec<u8> {
    let v = mailer::testing::normalise(content);
    let mut f = mailer::delivery::ContentFilter::new();
    let mut out = Vec::new();
    f.push(&v, &mut out);
    f.finish(&mut out);
    out
}

/// A stored file's content after the trace headers, which end with the Received
/// header's `id` line.
fn after_trace(file: &[u8]) -> &[u8] {
    let id = find(file, b"\r\n        id ").expect("trace id line");
    let end = find(&file[id + 2..], b"\r\n").expect("CRLF") + id + 4;
    &file[end..]
}

/// The stored file without the date in the Received header (it depends on the clock).
fn without_date(file: &[u8]) -> Vec<u8> {
    let id = find(file, b"\r\n        id ").expect("trace id line");
    let semi = find(&file[id..], b" ; ").expect("date separator") + id;
    let end = find(&file[semi..], b"\r\n").expect("CRLF") + semi;
    [&file[..semi], &file[end..]].concat()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

const ENVELOPE: &[u8] = b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Property 1 at the driver level: a full session (EHLO … DATA, content dot-stuffed
    /// as the client does, QUIT) stores exactly the normalised content, however the
    /// bytes are cut into reads.
    #[test]
    fn client_stuffing_then_server_unstuffing_is_the_identity(
        content in content(),
        segments in vec(1usize..64, 0..5),
    ) {
        let mut input = ENVELOPE.to_vec();
        input.extend_from_slice(&dot_stuff(&content));
        input.extend_from_slice(b"QUIT\r\n");
        let run = Mem { segments, ..Mem::default() }.run(&input);
        prop_assert_eq!(run.codes(), vec![220, 250, 250, 250, 354, 250, 221]);
        prop_assert_eq!(run.stored.len(), 1);
        prop_assert_eq!(after_trace(&run.stored[0].1), &normalise(&content)[..]);
        prop_assert_eq!(run.open_writers, 0);
    }
}

/// Property 1 end to end: `mailer::client` (which dot-stuffs) delivers arbitrary bytes
/// over TCP to a real server, which stores exactly the normalised content in `new/`.
#[test]
fn client_to_server_over_tcp_stores_exactly_the_normalised_message() {
    let s = TestServer::plain();
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&content(), |content| {
            let mut job = Job::new(
                "127.0.0.1",
                Some("a@x.test".into()),
                vec!["b@y.test".into()],
                content.clone(),
            );
            job.port = s.addr.port();
            job.starttls = StartTls::No;
            job.pipelining = Pipelining::Try;
            job.connection_timeout = Duration::from_secs(10);
            let report = try_send(&job).expect("delivery");
            prop_assert_eq!(report.len(), 1);
            prop_assert_eq!(report[0].status, Status::Ok, "{:?}", report);
            let id = queue_id(&report[0].response);
            let stored = s.stored();
            let (_, file) = stored
                .iter()
                .find(|(name, _)| name.contains(&format!(".{id}.")))
                .expect("the queued message is in new/");
            prop_assert_eq!(after_trace(file), &normalise(&content)[..]);
            Ok(())
        })
        .unwrap();
}

/// One step of a pipelined client script.
#[derive(Clone, Debug)]
enum Op {
    /// MAIL, `rcpts` RCPTs, DATA and the dot-stuffed content.
    Data {
        rcpts: usize,
        content: Vec<u8>,
    },
    /// MAIL, RCPT, then BDAT chunks (the last one with LAST when `last`).
    Bdat {
        chunks: Vec<Vec<u8>>,
        last: bool,
    },
    Rset,
    Noop,
    /// An unknown command (500).
    Unknown,
    /// RCPT without MAIL (503).
    OutOfOrder,
    /// A command line over the 1000-octet limit (500 5.5.6).
    LongLine,
    /// A line of arbitrary bytes.
    Junk(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..4, content()).prop_map(|(rcpts, content)| Op::Data { rcpts, content }),
        3 => (vec(vec(any::<u8>(), 0..300), 1..4), any::<bool>())
            .prop_map(|(chunks, last)| Op::Bdat { chunks, last }),
        1 => Just(Op::Rset),
        1 => Just(Op::Noop),
        1 => Just(Op::Unknown),
        1 => Just(Op::OutOfOrder),
        1 => Just(Op::LongLine),
        1 => vec(any::<u8>().prop_filter("no LF", |&b| b != b'\n'), 0..40).prop_map(Op::Junk),
    ]
}

fn script(ops: &[Op]) -> Vec<u8> {
    let mut w = b"EHLO c.test\r\n".to_vec();
    for op in ops {
        match op {
            Op::Data { rcpts, content } => {
                w.extend_from_slice(b"MAIL FROM:<a@x.test>\r\n");
                for i in 0..*rcpts {
                    w.extend_from_slice(format!("RCPT TO:<r{i}@y.test>\r\n").as_bytes());
                }
                w.extend_from_slice(b"DATA\r\n");
                w.extend_from_slice(&dot_stuff(content));
            }
            Op::Bdat { chunks, last } => {
                w.extend_from_slice(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n");
                for (i, c) in chunks.iter().enumerate() {
                    let is_last = *last && i + 1 == chunks.len();
                    let cmd = format!("BDAT {}{}\r\n", c.len(), if is_last { " LAST" } else { "" });
                    w.extend_from_slice(cmd.as_bytes());
                    w.extend_from_slice(c);
                }
            }
            Op::Rset => w.extend_from_slice(b"RSET\r\n"),
            Op::Noop => w.extend_from_slice(b"NOOP\r\n"),
            Op::Unknown => w.extend_from_slice(b"FROB x\r\n"),
            Op::OutOfOrder => w.extend_from_slice(b"RCPT TO:<b@y.test>\r\n"),
            Op::LongLine => {
                w.extend_from_slice(b"NOOP ");
                w.extend(std::iter::repeat_n(b'x', 1500));
                w.extend_from_slice(b"\r\n");
            }
            Op::Junk(bytes) => {
                w.extend_from_slice(bytes);
                w.extend_from_slice(b"\r\n");
            }
        }
    }
    w.extend_from_slice(b"QUIT\r\n");
    w
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Property 2: the whole pipelined stream in one read, or cut into reads of
    /// arbitrary sizes (down to single bytes), gives byte-identical replies, the same
    /// stored messages (queue ids included) and the same end. A small size limit makes
    /// some messages 552 and some chunks refused; RSET drops a BDAT transaction halfway.
    #[test]
    fn any_split_into_reads_gives_the_same_replies_and_stored_bytes(
        ops in vec(op(), 1..12),
        segments in vec(1usize..200, 1..6),
        tiny in any::<bool>(),
    ) {
        let input = script(&ops);
        let base = Mem { max_message_size: 900, ..Mem::default() };
        let whole = Mem { segments: Vec::new(), ..base }.run(&input);
        let segments = if tiny { vec![1] } else { segments };
        let cut = Mem { segments: segments.clone(), max_message_size: 900, ..Mem::default() }
            .run(&input);
        prop_assert_eq!(
            String::from_utf8_lossy(&whole.output),
            String::from_utf8_lossy(&cut.output),
            "replies differ with reads of {:?}",
            segments
        );
        prop_assert_eq!(&whole.end, &cut.end);
        prop_assert_eq!(whole.stored.len(), cut.stored.len());
        for ((id_a, a), (id_b, b)) in whole.stored.iter().zip(&cut.stored) {
            prop_assert_eq!(id_a, id_b);
            prop_assert_eq!(without_date(a), without_date(b));
        }
        prop_assert_eq!(cut.open_writers, 0);
        // Sanity: the stream did something (the greeting and EHLO at least).
        prop_assert!(whole.codes().starts_with(&[220, 250]));
    }
}
