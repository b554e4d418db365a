//! Client text made safe for a log line (SPEC invariant 11).
//!
//! Whatever a client sends (a HELO name, an address, a refused command line, an AUTH
//! user name) may end up in the log. A raw CR or LF there forges a second log line
//! that a fail2ban filter would believe; an ESC starts a terminal control sequence
//! in whoever runs `tail -f`; U+009B is the 8-bit CSI doing the same; and the bidi
//! overrides (U+202E …) make a line read differently from the bytes a filter matches.
//! So anything that is not printable is written as an escape instead:
//!
//! - C0 controls, DEL and a backslash's own escape: `\xNN` (`\x0d`, `\x7f`, `\\`);
//! - C1 controls (U+0080–U+009F), bidi controls (U+061C, U+200E/F, U+202A–U+202E,
//!   U+2066–U+2069) and other invisible format characters: `\u{NNNN}`;
//! - bytes that are not UTF-8 (only [`escape_log_bytes`] sees them): `\xNN`.
//!
//! Printable text, UTF-8 letters included, is left as it is: an operator should read
//! `jörg@example.org`, not its escapes. The backslash is escaped too, so an escape in
//! the log always means the client sent that character, never the literal text.

use std::borrow::Cow;
use std::fmt::Write;

/// `s` with every non-printable character escaped; borrowed when nothing needed it.
pub(crate) fn escape_log(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        push_char(&mut out, c);
    }
    Cow::Owned(out)
}

/// Like [`escape_log`] for bytes that may not be UTF-8 (a raw command line): valid
/// UTF-8 runs are escaped as text, every invalid byte becomes `\xNN`.
#[cfg(any(test, feature = "testing"))]
pub fn escape_log_bytes(b: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(b) {
        Ok(s) => escape_log(s),
        Err(_) => {
            let mut out = String::with_capacity(b.len() + 16);
            for chunk in b.utf8_chunks() {
                for c in chunk.valid().chars() {
                    push_char(&mut out, c);
                }
                for byte in chunk.invalid() {
                    let _ = write!(out, "\\x{byte:02x}");
                }
            }
            Cow::Owned(out)
        }
    }
}

fn push_char(out: &mut String, c: char) {
    if !needs_escape(c) {
        out.push(c);
    } else if c == '\\' {
        out.push_str("\\\\");
    } else if c.is_ascii() {
        // Writing to a String cannot fail.
        let _ = write!(out, "\\x{:02x}", c as u32);
    } else {
        let _ = write!(out, "\\u{{{:04x}}}", c as u32);
    }
}

/// True for what must not reach a log line raw.
pub(crate) fn needs_escape(c: char) -> bool {
    c == '\\' || c.is_control() || is_bidi_or_invisible(c)
}

/// Bidi marks, embeddings, overrides and isolates (Unicode UAX #9), and the other
/// zero-width format characters that hide or reorder text without showing.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub fn is_bidi_or_invisible(c: char) -> bool {
    matches!(c,
        '\u{061C}'                 // ARABIC LETTER MARK
        | '\u{200B}'..='\u{200F}'  // zero-width space/joiners, LRM, RLM
        | '\u{2028}'..='\u{202E}'  // line/paragraph separators, LRE RLE PDF LRO RLO
        | '\u{2060}'..='\u{2069}'  // word joiner, invisible operators, LRI RLI FSI PDI
        | '\u{FEFF}'               // zero-width no-break space (BOM)
        | '\u{FFF9}'..='\u{FFFB}'  // interlinear annotation controls
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_text_is_borrowed() {
        assert!(matches!(
            escape_log("jörg@例え.テスト"),
            Cow::Borrowed("jörg@例え.テスト")
        ));
    }

    #[test]
    fn controls_and_bidi_are_escaped() {
        assert_eq!(escape_log("a\r\nb"), "a\\x0d\\x0ab");
        assert_eq!(escape_log("\x1b[31m\x7f"), "\\x1b[31m\\x7f");
        assert_eq!(escape_log("x\u{9b}31m"), "x\\u{009b}31m");
        assert_eq!(escape_log("evil\u{202e}gpj.exe"), "evil\\u{202e}gpj.exe");
        assert_eq!(
            escape_log("\u{2066}a\u{2069}\u{200f}"),
            "\\u{2066}a\\u{2069}\\u{200f}"
        );
        assert_eq!(escape_log("a\\x41"), "a\\\\x41");
    }

    #[test]
    fn invalid_utf8_bytes_are_escaped() {
        assert_eq!(escape_log_bytes(b"MAIL \xff\xfe<a>"), "MAIL \\xff\\xfe<a>");
        assert_eq!(escape_log_bytes("ok \u{85}".as_bytes()), "ok \\u{0085}");
        assert_eq!(escape_log_bytes(b"plain"), "plain");
    }
}
