//! Shared pieces of the fuzz targets: the knobs a fuzz input chooses, a session runner
//! over the crate's own in-memory transport and store (`mailer::testing`), and checkers
//! for the server's output.
//!
//! Every checker panics (which libFuzzer reports as a crash) when a property fails.

use mailer::client::parse_reply;
use mailer::connection::End;
use mailer::protocol::data::{BareLf, DataReader};
use mailer::testing::{Mem, OneUser};
use std::sync::Arc;

pub use mailer::testing::{normalise, FakeTls};

/// One committed message: queue id and the bytes written (trace headers + content).
#[derive(Clone, Debug)]
pub struct Stored {
    pub id: String,
    pub bytes: Vec<u8>,
}

/// What the transport saw of the session.
pub struct Transcript {
    /// Input offset and output length at each `start_tls` call.
    pub handshakes: Vec<(usize, usize)>,
}

/// The knobs a fuzz input chooses.
#[derive(Clone, Debug)]
pub struct Knobs {
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: u32,
    pub max_line_length: usize,
    pub bare_lf: BareLf,
    pub tls_available: bool,
    pub auth: bool,
    pub tls: FakeTls,
    pub seed: u64,
    pub max_piece: usize,
}

impl Knobs {
    /// Derives knobs from the first four bytes of a fuzz input (missing bytes are 0).
    pub fn from_header(h: [u8; 4]) -> Knobs {
        Knobs {
            max_message_size: [64, 300, 1000, 100_000][(h[0] & 3) as usize],
            max_recipients: 1 + ((h[0] >> 2) & 7) as usize,
            max_errors: 1 + u32::from(h[1] & 15),
            max_line_length: [512, 600, 1000, 4096][((h[1] >> 4) & 3) as usize],
            bare_lf: if h[1] & 0x40 != 0 {
                BareLf::Reject
            } else {
                BareLf::Normalize
            },
            tls_available: h[1] & 0x80 == 0,
            auth: h[0] & 0x20 == 0,
            tls: if h[0] & 0x40 != 0 {
                FakeTls::Fail
            } else {
                FakeTls::Succeed
            },
            seed: u64::from(h[2]),
            max_piece: [1, 2, 7, 64, 512, 4096, 100_000, 1 << 20][(h[3] & 7) as usize],
        }
    }
}

/// The result of one in-memory session.
pub struct Run {
    pub end: End,
    /// Everything the server wrote.
    pub out: Vec<u8>,
    pub stored: Vec<Stored>,
    pub transport: Transcript,
}

/// Runs a whole session over `input` with the given knobs.
pub fn run_session(input: &[u8], k: &Knobs) -> Run {
    let mem = Mem {
        max_message_size: k.max_message_size,
        max_recipients: k.max_recipients,
        max_errors: k.max_errors,
        max_line_length: k.max_line_length,
        bare_lf: k.bare_lf,
        random_reads: Some((k.seed, k.max_piece)),
        peer: "192.0.2.1:4000".parse().expect("a literal address"),
        starttls: k.tls_available.then_some(k.tls),
        auth: k
            .auth
            .then(|| Arc::new(OneUser("alice", "secret")) as Arc<dyn mailer::auth::Authenticator>),
        ..Mem::default()
    };
    let run = mem.run(input);
    Run {
        end: run.end,
        out: run.output,
        stored: run
            .stored
            .into_iter()
            .map(|(id, bytes)| Stored { id, bytes })
            .collect(),
        transport: Transcript {
            handshakes: run.handshakes,
        },
    }
}

/// One reply as it appeared on the wire: code, and the text of each line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireReply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl WireReply {
    /// The text of the last line (after `NNN `).
    pub fn last(&self) -> &str {
        self.lines.last().map(String::as_str).unwrap_or("")
    }
    /// The queue id if this is `250 2.0.0 Ok: queued as ID`.
    pub fn queued_as(&self) -> Option<&str> {
        if self.code != 250 {
            return None;
        }
        self.last().strip_prefix("2.0.0 Ok: queued as ")
    }
}

/// Splits the server's output into replies with the library's parser
/// (`mailer::client::parse_reply`), asserting that every line matches `^[2-5]\d\d[ -]`,
/// ends in CRLF, carries no other CR or LF, and that continuation lines share their
/// reply's code (RFC 5321 §4.2.1).
pub fn parse_replies(out: &[u8]) -> Vec<WireReply> {
    assert!(
        out.is_empty() || out.ends_with(b"\r\n"),
        "output does not end in CRLF: {:?}",
        String::from_utf8_lossy(&out[out.len().saturating_sub(80)..])
    );
    let mut lines = out.split(|&b| b == b'\n');
    // The piece after the final LF is empty (checked above).
    lines.next_back();
    for line in lines {
        let line = line
            .strip_suffix(b"\r")
            .unwrap_or_else(|| panic!("bare LF in a reply: {:?}", String::from_utf8_lossy(line)));
        assert!(
            !line.contains(&b'\r'),
            "bare CR inside a reply line: {:?}",
            String::from_utf8_lossy(line)
        );
        assert!(
            line.len() >= 4,
            "not an SMTP reply line: {:?}",
            String::from_utf8_lossy(line)
        );
    }
    let mut replies = Vec::new();
    let mut rest = out;
    while !rest.is_empty() {
        match parse_reply(rest) {
            Ok(Some((r, n))) => {
                replies.push(WireReply {
                    code: r.code,
                    lines: r.texts().map(str::to_string).collect(),
                });
                rest = &rest[n..];
            }
            Ok(None) => panic!("multi-line reply without its last line"),
            Err(e) => panic!("not an SMTP reply: {e}"),
        }
    }
    replies
}

/// A stored file split into its trace block and the message content. Asserts the
/// trace block's shape (SPEC 5): Return-Path, one X-Original-To per recipient,
/// the Received header (folded, its last line naming `id`).
pub fn split_trace(bytes: &[u8], id: &str) -> (usize, Vec<u8>) {
    let mut pos = 0;
    let next_line = |pos: &mut usize| -> Vec<u8> {
        let rest = &bytes[*pos..];
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("trace header line without CRLF");
        let line = rest[..end].to_vec();
        assert!(
            !line.contains(&b'\r') && !line.contains(&b'\n') && !line.contains(&0),
            "CR, LF or NUL inside a trace header line: {:?}",
            String::from_utf8_lossy(&line)
        );
        *pos += end + 2;
        line
    };
    let first = next_line(&mut pos);
    assert!(first.starts_with(b"Return-Path: <") && first.ends_with(b">"));
    let mut rcpts = 0;
    let received = loop {
        let l = next_line(&mut pos);
        if l.starts_with(b"X-Original-To: ") {
            rcpts += 1;
            continue;
        }
        break l;
    };
    assert!(received.starts_with(b"Received: from "), "{received:?}");
    assert!(received.len() <= 998, "Received line over 998 octets");
    // A long HELO name folds the header before `by` (invariant 11): the id line is the
    // last continuation line, and every line stays within RFC 5322's 998 octets.
    let want = format!("        id {id} ; ");
    loop {
        let l = next_line(&mut pos);
        assert!(l.len() <= 998, "Received line over 998 octets");
        assert!(
            l.starts_with(b" ") || l.starts_with(b"\t"),
            "Received ends without naming {id}: {:?}",
            String::from_utf8_lossy(&l)
        );
        if l.starts_with(want.as_bytes()) {
            break;
        }
    }
    (rcpts, bytes[pos..].to_vec())
}

/// Reads `input` with a fresh [`DataReader`]; returns (content, consumed, done).
pub fn read_data(input: &[u8], max: u64, bare: BareLf) -> (Vec<u8>, usize, DataReader) {
    let mut r = DataReader::new(max, bare);
    let mut out = Vec::new();
    let n = r.feed(input, &mut out);
    (out, n, r)
}

/// The stored form of received content (SPEC 5, invariant 11), written here apart from
/// the server's streaming filter so the two can be compared: content whose first byte
/// is a space or tab gets an empty line before it; otherwise every `Return-Path:` field
/// of the header section (the lines before the first empty line), with its continuation
/// lines, is left out. A field name counts when `Return-Path`, any case, is followed by
/// spaces or tabs and the colon within the first 64 bytes of its line (the filter
/// decides within that many bytes).
pub fn guarded(content: &[u8]) -> Vec<u8> {
    if matches!(content.first(), Some(b' ' | b'\t')) {
        return [b"\r\n".as_slice(), content].concat();
    }
    let mut out = Vec::with_capacity(content.len());
    let mut dropping = false;
    let mut pos = 0;
    while pos < content.len() {
        let end = content[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(content.len(), |n| pos + n + 1);
        let line = &content[pos..end];
        if line == b"\r\n" || line == b"\n" {
            out.extend_from_slice(&content[pos..]);
            return out;
        }
        if !matches!(line[0], b' ' | b'\t') {
            dropping = is_return_path_field(line);
        }
        if !dropping {
            out.extend_from_slice(line);
        }
        pos = end;
    }
    out
}

/// Whether a header line starts a `Return-Path:` field (see [`guarded`]).
pub fn is_return_path_field(line: &[u8]) -> bool {
    const NAME: &[u8] = b"return-path";
    if line.len() <= NAME.len() || !line[..NAME.len()].eq_ignore_ascii_case(NAME) {
        return false;
    }
    let colon = line[NAME.len()..]
        .iter()
        .position(|&b| !matches!(b, b' ' | b'\t'))
        .map(|i| NAME.len() + i);
    matches!(colon, Some(i) if line[i] == b':' && i < 64)
}

/// Where the first end-of-data marker ends: a leading `.\r\n` or the first `\r\n.\r\n`.
pub fn first_terminator(input: &[u8]) -> Option<usize> {
    if input.starts_with(b".\r\n") {
        return Some(3);
    }
    input
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|i| i + 5)
}
