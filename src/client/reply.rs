//! Reading server replies (RFC 5321 §4.2): a pure parser over a byte buffer, so that
//! every shape of reply can be tested in memory.
//!
//! ```text
//! Reply-line = *( Reply-code "-" [ textstring ] CRLF )
//!              Reply-code [ SP textstring ] CRLF
//! ```

use std::fmt;
use std::io::{self, BufRead};

/// Longest reply line accepted, CRLF included. RFC 5321 §4.5.3.1.5 allows 512 octets;
/// real servers exceed it in long EHLO lists, so we are generous but still bounded.
pub const MAX_LINE: usize = 4096;

/// Most lines in one multi-line reply.
pub const MAX_LINES: usize = 256;

/// One reply as the server sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerReply {
    /// The three-digit code.
    pub code: u16,
    /// Every line as sent, code and separator included, line ending removed.
    pub lines: Vec<String>,
}

impl ServerReply {
    /// The reply as reported (SPEC 6 `response`): the lines exactly as the server sent
    /// them, joined with `\n` and without CRLFs, e.g. `"550-5.1.1 No\n550 5.1.1 such user"`.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The text after `NNN-` / `NNN ` on each line (for EHLO keywords).
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(|l| l.get(4..).unwrap_or(""))
    }

    /// 2xx.
    pub fn is_ok(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

impl fmt::Display for ServerReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// A reply that breaks RFC 5321 §4.2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyError {
    /// A line that does not start with a reply code and a valid separator.
    BadLine(String),
    /// The lines of one multi-line reply carry different codes (§4.2.1 forbids it).
    CodeMismatch {
        /// The code of the reply's first line.
        first: u16,
        /// The line with another code.
        line: String,
    },
    /// A line longer than [`MAX_LINE`].
    LineTooLong,
    /// More than [`MAX_LINES`] lines.
    TooManyLines,
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::BadLine(l) => write!(f, "malformed reply line {l:?}"),
            ReplyError::CodeMismatch { first, line } => {
                write!(f, "reply line {line:?} does not repeat the code {first}")
            }
            ReplyError::LineTooLong => write!(f, "reply line over {MAX_LINE} bytes"),
            ReplyError::TooManyLines => write!(f, "reply of more than {MAX_LINES} lines"),
        }
    }
}

impl std::error::Error for ReplyError {}

/// Parses one reply from the front of `buf`. `Ok(None)`: not complete yet, read more;
/// `Ok(Some((reply, n)))`: the reply used the first `n` bytes.
///
/// Lines end in CRLF; a bare LF is accepted too (be liberal in what you accept,
/// RFC 5321 §4.5.2 robustness). The first digit must be 2-5 (§4.2.1).
pub fn parse_reply(buf: &[u8]) -> Result<Option<(ServerReply, usize)>, ReplyError> {
    let mut pos = 0;
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let rest = &buf[pos..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            return if rest.len() > MAX_LINE {
                Err(ReplyError::LineTooLong)
            } else {
                Ok(None)
            };
        };
        if nl + 1 > MAX_LINE {
            return Err(ReplyError::LineTooLong);
        }
        let raw = &rest[..nl];
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        pos += nl + 1;
        let line = String::from_utf8_lossy(raw).into_owned();
        let b = raw;
        let digits_ok =
            b.len() >= 3 && (b'2'..=b'5').contains(&b[0]) && b[1..3].iter().all(u8::is_ascii_digit);
        if !digits_ok {
            return Err(ReplyError::BadLine(line));
        }
        let this =
            u16::from(b[0] - b'0') * 100 + u16::from(b[1] - b'0') * 10 + u16::from(b[2] - b'0');
        let last = match b.get(3) {
            None | Some(b' ') => true,
            Some(b'-') => false,
            Some(_) => return Err(ReplyError::BadLine(line)),
        };
        match code {
            None => code = Some(this),
            Some(first) if first != this => {
                return Err(ReplyError::CodeMismatch { first, line });
            }
            Some(_) => {}
        }
        lines.push(line);
        if last {
            return Ok(Some((ServerReply { code: this, lines }, pos)));
        }
        if lines.len() >= MAX_LINES {
            return Err(ReplyError::TooManyLines);
        }
    }
}

/// Reads one whole reply from a blocking reader, a line at a time, with
/// [`parse_reply`]: nothing after the reply's last line is consumed.
///
/// # Errors
/// The reader's own errors; `UnexpectedEof` when the stream ends before the reply's
/// last line; `InvalidData` (with the [`ReplyError`] inside) for a malformed reply.
pub fn read_reply<R: BufRead>(r: &mut R) -> io::Result<ServerReply> {
    let mut buf = Vec::new();
    loop {
        // Bounded: one line is at most MAX_LINE bytes before parse_reply refuses it.
        let n = io::Read::take(&mut *r, (MAX_LINE + 1) as u64).read_until(b'\n', &mut buf)?;
        match parse_reply(&buf) {
            Ok(Some((reply, _))) => return Ok(reply),
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            Ok(None) if n == 0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the stream ended inside a reply",
                ))
            }
            Ok(None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one(s: &str) -> ServerReply {
        let (r, n) = parse_reply(s.as_bytes()).unwrap().unwrap();
        assert_eq!(n, s.len());
        r
    }

    #[test]
    fn single_line() {
        let r = one("250 2.0.0 Ok: queued as X\r\n");
        assert_eq!(r.code, 250);
        assert_eq!(r.text(), "250 2.0.0 Ok: queued as X");
        assert!(r.is_ok());
    }

    #[test]
    fn code_alone_is_a_reply() {
        let r = one("250\r\n");
        assert_eq!(r.code, 250);
        assert_eq!(r.texts().collect::<Vec<_>>(), [""]);
    }

    #[test]
    fn multi_line_is_joined_as_sent() {
        let r = one("250-mx.test\r\n250-PIPELINING\r\n250 SIZE 100\r\n");
        assert_eq!(r.text(), "250-mx.test\n250-PIPELINING\n250 SIZE 100");
        assert_eq!(
            r.texts().collect::<Vec<_>>(),
            ["mx.test", "PIPELINING", "SIZE 100"]
        );
    }

    #[test]
    fn bare_lf_is_accepted() {
        let r = one("550-a\n550 b\n");
        assert_eq!(r.text(), "550-a\n550 b");
    }

    #[test]
    fn incomplete_waits_for_more() {
        for s in ["", "25", "250-a\r\n", "250-a\r\n250 b", "250 b\r"] {
            assert_eq!(parse_reply(s.as_bytes()), Ok(None), "{s:?}");
        }
    }

    #[test]
    fn leaves_following_replies_in_the_buffer() {
        let buf = b"250 2.1.0 Ok\r\n550 5.1.1 No\r\n354 go\r\n";
        let (a, n) = parse_reply(buf).unwrap().unwrap();
        assert_eq!((a.code, n), (250, 14));
        let (b, m) = parse_reply(&buf[n..]).unwrap().unwrap();
        assert_eq!(b.code, 550);
        let (c, _) = parse_reply(&buf[n + m..]).unwrap().unwrap();
        assert_eq!(c.code, 354);
    }

    #[test]
    fn malformed_lines_are_errors() {
        for s in [
            "hello\r\n",
            "25\r\n",
            "2x0 a\r\n",
            "650 a\r\n",
            "150 a\r\n",
            "250_a\r\n",
            "\r\n",
        ] {
            assert!(
                matches!(parse_reply(s.as_bytes()), Err(ReplyError::BadLine(_))),
                "{s:?}"
            );
        }
        assert!(matches!(
            parse_reply(b"250-a\r\n251 b\r\n"),
            Err(ReplyError::CodeMismatch { first: 250, .. })
        ));
    }

    #[test]
    fn bounded() {
        let long = vec![b'a'; MAX_LINE + 1];
        assert_eq!(parse_reply(&long), Err(ReplyError::LineTooLong));
        let mut long_line = b"250 ".to_vec();
        long_line.extend(vec![b'a'; MAX_LINE]);
        long_line.extend(b"\r\n");
        assert_eq!(parse_reply(&long_line), Err(ReplyError::LineTooLong));
        let many = "250-x\r\n".repeat(MAX_LINES + 1);
        assert_eq!(parse_reply(many.as_bytes()), Err(ReplyError::TooManyLines));
    }

    proptest! {
        /// Never panics; a parsed reply never claims more bytes than it was given.
        #[test]
        fn total(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((r, n))) = parse_reply(&buf) {
                prop_assert!(n <= buf.len());
                prop_assert!(!r.lines.is_empty());
            }
        }
    }
}
