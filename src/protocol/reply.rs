//! Server replies: a three-digit code, an optional RFC 3463 enhanced status code and text.

use std::fmt;
use std::io::Write as _;

/// An RFC 3463 enhanced status code such as `2.1.0` (RFC 2034 puts it after the reply code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enhanced(pub u8, pub u16, pub u16);

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One SMTP reply. `text` may hold several lines separated by `\n`; they are sent as a
/// multi-line reply (`250-` continuation, RFC 5321 §4.2.1), each line carrying the
/// enhanced code when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code (RFC 5321 §4.2.1).
    pub code: u16,
    /// The enhanced status code (RFC 3463), written in front of each line's text.
    pub enhanced: Option<Enhanced>,
    /// The text; lines separated by `\n`.
    pub text: String,
}

impl Reply {
    /// A reply with an enhanced status code.
    pub fn new(code: u16, enhanced: Enhanced, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            text: text.into(),
        }
    }

    /// A reply without an enhanced status code (greeting, EHLO, HELO, 354).
    pub fn plain(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: None,
            text: text.into(),
        }
    }

    /// 4xx and 5xx: the class a hook may use to refuse.
    pub fn is_refusal(&self) -> bool {
        (400..600).contains(&self.code)
    }

    /// Appends the wire form (CRLF-terminated lines) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        loop {
            let line = lines.next().unwrap_or("");
            let last = lines.peek().is_none();
            // Formatting straight into `out`: no temporary String per reply line.
            let sep = if last { ' ' } else { '-' };
            let _ = write!(out, "{}{sep}", self.code); // writing to a Vec cannot fail
            if let Some(e) = self.enhanced {
                let _ = write!(out, "{e}");
                if !line.is_empty() {
                    out.push(b' ');
                }
            }
            // Replies never carry raw CR/LF from their text: that would forge a reply line.
            out.extend(line.bytes().filter(|&b| b != b'\r'));
            out.extend_from_slice(b"\r\n");
            if last {
                break;
            }
        }
    }

    /// The wire form as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.text.len() + 16);
        self.write_to(&mut v);
        v
    }
}

impl fmt::Display for Reply {
    /// The reply on one line, as logged and as the client reports it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wire = self.to_bytes();
        let s = String::from_utf8_lossy(&wire);
        write!(f, "{}", s.trim_end().replace("\r\n", "\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_enhanced_code() {
        let r = Reply::new(250, Enhanced(2, 1, 0), "Ok");
        assert_eq!(r.to_bytes(), b"250 2.1.0 Ok\r\n");
    }

    #[test]
    fn multi_line_uses_continuation_and_repeats_enhanced_code() {
        let r = Reply::new(214, Enhanced(2, 0, 0), "a\nb");
        assert_eq!(r.to_bytes(), b"214-2.0.0 a\r\n214 2.0.0 b\r\n");
        let e = Reply::plain(250, "host\nPIPELINING\nHELP");
        assert_eq!(e.to_bytes(), b"250-host\r\n250-PIPELINING\r\n250 HELP\r\n");
    }

    #[test]
    fn carriage_return_in_text_cannot_forge_lines() {
        let r = Reply::plain(250, "a\r");
        assert_eq!(r.to_bytes(), b"250 a\r\n");
    }
}
