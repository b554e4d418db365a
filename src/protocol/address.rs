//! Envelope addresses per RFC 5321 §4.1.2, with RFC 6531 UTF-8 extensions.
//!
//! Parsing is strict about what could be ambiguous later (quoting, brackets, lengths)
//! and forgiving where Postfix is: a space after `FROM:`, a missing pair of angle
//! brackets, and source routes (`<@a,@b:user@c>`, accepted and ignored per §4.1.2).

use std::fmt;

/// Longest local part, in octets (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_PART: usize = 64;
/// Longest domain, in octets (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;
/// Longest path, brackets included, in octets (RFC 5321 §4.5.3.1.3).
pub const MAX_PATH: usize = 256;

/// Why an address was refused. `Display` is the reply text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressError {
    /// Not a path at all (no angle brackets where needed, junk after `>`).
    Syntax(&'static str),
    /// A part exceeds the RFC 5321 §4.5.3.1 limit.
    TooLong(&'static str),
    /// A control or bidi formatting character: never part of a real address, and
    /// dangerous downstream (logs, trace headers, mail clients showing the address).
    Forbidden(&'static str),
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressError::Syntax(what) => write!(f, "Bad address syntax: {what}"),
            AddressError::TooLong(what) => write!(f, "Address too long: {what}"),
            AddressError::Forbidden(what) => write!(f, "Bad address: {what}"),
        }
    }
}

/// A mailbox `local@domain`, kept as the client wrote it (minus brackets and source
/// route), or the special `Postmaster` recipient of §4.1.1.3 that has no domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    text: String,
    /// Byte index of the `@` between local part and domain; `None` for bare Postmaster.
    at: Option<usize>,
}

impl Address {
    /// Parses a mailbox without angle brackets, e.g. `"a b"@example.org`.
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        check_characters(s)?;
        if s.eq_ignore_ascii_case("postmaster") {
            return Ok(Address {
                text: s.to_string(),
                at: None,
            });
        }
        let at = local_part_end(s)?;
        let local = &s[..at];
        if local.len() > MAX_LOCAL_PART {
            return Err(AddressError::TooLong("local part over 64 octets"));
        }
        if s.as_bytes().get(at) != Some(&b'@') {
            return Err(AddressError::Syntax("missing @domain"));
        }
        let domain = &s[at + 1..];
        if domain.len() > MAX_DOMAIN {
            return Err(AddressError::TooLong("domain over 255 octets"));
        }
        check_domain_or_literal(domain)?;
        Ok(Address {
            text: s.to_string(),
            at: Some(at),
        })
    }

    /// The mailbox as written, e.g. `alice@example.org`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The local part as written (quotes kept).
    pub fn local_part(&self) -> &str {
        match self.at {
            Some(i) => &self.text[..i],
            None => &self.text,
        }
    }

    /// The domain or address literal; `None` for bare `Postmaster`.
    pub fn domain(&self) -> Option<&str> {
        self.at.map(|i| &self.text[i + 1..])
    }

    /// True when the address needs SMTPUTF8 (RFC 6531 §3.3).
    pub fn is_utf8(&self) -> bool {
        !self.text.is_ascii()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The MAIL FROM argument: a mailbox or the null reverse-path `<>` (bounces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReversePath {
    /// `<>`: no one to send a bounce back to (RFC 5321 §4.5.5).
    Null,
    /// A sender mailbox.
    Mailbox(Address),
}

impl ReversePath {
    /// Whether the mailbox has non-ASCII characters (needs SMTPUTF8, RFC 6531).
    pub fn is_utf8(&self) -> bool {
        matches!(self, ReversePath::Mailbox(a) if a.is_utf8())
    }
}

impl fmt::Display for ReversePath {
    /// The address without brackets; empty for the null path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Mailbox(a) => a.fmt(f),
        }
    }
}

/// Refuses C0 and C1 control characters, DEL, and the bidi marks, embeddings,
/// overrides and isolates (and other invisible format characters). RFC 5321 never
/// allows a control in a mailbox (not even quoted: qtextSMTP is %d32-126), and RFC 6531
/// allows UTF-8 only as characters a user can read and type: U+0080–U+009F (e.g. the
/// 8-bit CSI U+009B) or U+202E would reach logs and mail clients as terminal escapes or
/// as text shown in another order than it is matched ("Trojan Source", CVE-2021-42574).
pub fn check_characters(s: &str) -> Result<(), AddressError> {
    for c in s.chars() {
        if c.is_control() {
            return Err(AddressError::Forbidden("control character in address"));
        }
        if crate::logsafe::is_bidi_or_invisible(c) {
            return Err(AddressError::Forbidden(
                "bidirectional or invisible formatting character in address",
            ));
        }
    }
    Ok(())
}

/// Splits `<path> params…` (the text after `FROM:` or `TO:`) into the path's inner
/// mailbox text (source route removed; empty for `<>`) and the rest of the line.
pub fn split_path(arg: &str) -> Result<(&str, &str), AddressError> {
    let arg = arg.trim_start_matches(' ');
    if !arg.starts_with('<') {
        // Postfix-style leniency: `MAIL FROM:user@example.org` without brackets.
        let end = arg.find(' ').unwrap_or(arg.len());
        if end == 0 {
            return Err(AddressError::Syntax("empty path"));
        }
        // The limit counts the angle brackets this form leaves out (§4.5.3.1.3).
        if end + 2 > MAX_PATH {
            return Err(AddressError::TooLong("path over 256 octets"));
        }
        check_characters(&arg[..end])?;
        return Ok((&arg[..end], &arg[end..]));
    }
    let close = path_end(arg)?;
    if close + 1 > MAX_PATH {
        return Err(AddressError::TooLong("path over 256 octets"));
    }
    // Here and not only in `Address::parse`: a source route is dropped unparsed.
    check_characters(&arg[1..close])?;
    let mut inner = &arg[1..close];
    let rest = &arg[close + 1..];
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err(AddressError::Syntax("junk after >"));
    }
    if inner.starts_with('@') {
        // A-d-l ":" Mailbox — the source route is ignored (RFC 5321 §4.1.2, §C).
        let colon = inner
            .find(':')
            .ok_or(AddressError::Syntax("source route without ':'"))?;
        for hop in inner[..colon].split(',') {
            let d = hop
                .strip_prefix('@')
                .ok_or(AddressError::Syntax("bad source route"))?;
            check_domain(d)?;
        }
        inner = &inner[colon + 1..];
    }
    Ok((inner, rest))
}

/// Index of the `>` closing the path that `s` starts with, skipping quoted strings.
fn path_end(s: &str) -> Result<usize, AddressError> {
    let b = s.as_bytes();
    let mut i = 1;
    let mut quoted = false;
    while i < b.len() {
        match b[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Ok(i),
            _ => {}
        }
        i += 1;
    }
    Err(AddressError::Syntax("missing >"))
}

/// Validates the local part at the start of `s` and returns where it ends.
fn local_part_end(s: &str) -> Result<usize, AddressError> {
    let b = s.as_bytes();
    if b.first() == Some(&b'"') {
        // Quoted-string: qtextSMTP / quoted-pairSMTP (§4.1.2), UTF-8 allowed (RFC 6531).
        let mut i = 1;
        while i < b.len() {
            match b[i] {
                b'\\' => {
                    match b.get(i + 1) {
                        Some(&c) if (32..=126).contains(&c) => i += 2,
                        _ => return Err(AddressError::Syntax("bad quoted pair")),
                    }
                    continue;
                }
                b'"' => {
                    if i == 1 {
                        // An empty quoted local part is legal but useless; refuse it as
                        // Postfix does for its ambiguity.
                        return Err(AddressError::Syntax("empty local part"));
                    }
                    return Ok(i + 1);
                }
                c if c < 32 || c == 127 => {
                    return Err(AddressError::Syntax("control character in local part"))
                }
                _ => i += 1,
            }
        }
        return Err(AddressError::Syntax("unterminated quoted local part"));
    }
    // Dot-string: Atom *("." Atom).
    let end = s
        .rfind('@')
        .ok_or(AddressError::Syntax("missing @domain"))?;
    let local = &s[..end];
    if local.is_empty() {
        return Err(AddressError::Syntax("empty local part"));
    }
    for atom in local.split('.') {
        if atom.is_empty() {
            return Err(AddressError::Syntax("empty atom in local part"));
        }
        if !atom.chars().all(is_atext) {
            return Err(AddressError::Syntax("invalid character in local part"));
        }
    }
    Ok(end)
}

/// RFC 5322 atext, plus any non-ASCII character (RFC 6531 §3.3 UTF8-non-ascii).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn check_domain_or_literal(d: &str) -> Result<(), AddressError> {
    if let Some(lit) = d.strip_prefix('[') {
        let lit = lit
            .strip_suffix(']')
            .ok_or(AddressError::Syntax("unterminated address literal"))?;
        return check_address_literal(lit);
    }
    check_domain(d)
}

/// `Domain = sub-domain *("." sub-domain)`, sub-domains as LDH labels; U-labels allowed.
pub fn check_domain(d: &str) -> Result<(), AddressError> {
    if d.is_empty() {
        return Err(AddressError::Syntax("empty domain"));
    }
    if d.len() > MAX_DOMAIN {
        return Err(AddressError::TooLong("domain over 255 octets"));
    }
    for label in d.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii());
        if !ok {
            return Err(AddressError::Syntax("invalid domain"));
        }
    }
    Ok(())
}

/// `[192.0.2.1]`, `[IPv6:2001:db8::1]` or a General-address-literal `[tag:content]`.
fn check_address_literal(lit: &str) -> Result<(), AddressError> {
    if lit.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    if let Some((tag, content)) = lit.split_once(':') {
        if tag.eq_ignore_ascii_case("IPv6") {
            return content
                .parse::<std::net::Ipv6Addr>()
                .map(|_| ())
                .map_err(|_| AddressError::Syntax("bad IPv6 address literal"));
        }
        // General-address-literal = Standardized-tag ":" 1*dcontent. dcontent allows
        // `<`, `>` and `"`, but we refuse them: inside brackets (`RCPT TO:<...>`,
        // `Return-Path: <...>`) a `>` would end the path early and a `"` would open a
        // quoted string, so the address would not survive being written back.
        let tag_ok = !tag.is_empty()
            && tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !tag.ends_with('-');
        let content_ok = !content.is_empty()
            && content.bytes().all(|b| {
                ((33..=90).contains(&b) || (94..=126).contains(&b)) && !b"<>\"".contains(&b)
            });
        if tag_ok && content_ok {
            return Ok(());
        }
    }
    Err(AddressError::Syntax("bad address literal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(s: &str) -> Result<Address, AddressError> {
        Address::parse(s)
    }

    #[test]
    fn plain_and_quoted_local_parts() {
        let a = mailbox("alice@example.org").unwrap();
        assert_eq!(a.local_part(), "alice");
        assert_eq!(a.domain(), Some("example.org"));
        let q = mailbox("\"a b@c\"@example.org").unwrap();
        assert_eq!(q.local_part(), "\"a b@c\"");
        assert_eq!(q.domain(), Some("example.org"));
        assert!(mailbox("\"a\\\"b\"@x.test").is_ok());
        assert!(mailbox("first.last+tag@x.test").is_ok());
    }

    #[test]
    fn bad_mailboxes() {
        for bad in [
            "alice",
            "@example.org",
            "a..b@x.test",
            ".a@x.test",
            "a@",
            "a@-x.test",
            "a@x..test",
            "a b@x.test",
            "\"unterminated@x.test",
            "a@[300.1.1.1]",
            "a@[IPv6:zz::1]",
        ] {
            assert!(mailbox(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn address_literals() {
        assert!(mailbox("a@[192.0.2.1]").is_ok());
        assert!(mailbox("a@[IPv6:2001:db8::1]").is_ok());
        assert_eq!(
            mailbox("a@[192.0.2.1]").unwrap().domain(),
            Some("[192.0.2.1]")
        );
    }

    #[test]
    fn postmaster_without_domain() {
        let p = mailbox("Postmaster").unwrap();
        assert_eq!(p.domain(), None);
    }

    #[test]
    fn length_limits() {
        let long_local = format!("{}@x.test", "a".repeat(65));
        assert!(matches!(
            mailbox(&long_local),
            Err(AddressError::TooLong(_))
        ));
        let ok_local = format!("{}@x.test", "a".repeat(64));
        assert!(mailbox(&ok_local).is_ok());
        let long_domain = format!("a@{}.test", "b.".repeat(130));
        assert!(matches!(
            mailbox(&long_domain),
            Err(AddressError::TooLong(_))
        ));
        let label = format!("a@{}.test", "b".repeat(64));
        assert!(mailbox(&label).is_err());
    }

    #[test]
    fn utf8_is_detected() {
        assert!(mailbox("jösé@例え.テスト").unwrap().is_utf8());
        assert!(!mailbox("a@x.test").unwrap().is_utf8());
    }

    #[test]
    fn split_path_forms() {
        assert_eq!(split_path("<a@x.test>").unwrap(), ("a@x.test", ""));
        assert_eq!(
            split_path(" <a@x.test> SIZE=1").unwrap(),
            ("a@x.test", " SIZE=1")
        );
        assert_eq!(split_path("<>").unwrap(), ("", ""));
        assert_eq!(
            split_path("<@r1.test,@r2.test:a@x.test>").unwrap(),
            ("a@x.test", "")
        );
        assert_eq!(
            split_path("a@x.test BODY=7BIT").unwrap(),
            ("a@x.test", " BODY=7BIT")
        );
        assert_eq!(
            split_path("<\"a>b\"@x.test>").unwrap(),
            ("\"a>b\"@x.test", "")
        );
        assert!(split_path("<a@x.test").is_err());
        assert!(split_path("<a@x.test>junk").is_err());
        assert!(split_path("<@bad_route:a@x.test>").is_err());
        let long = format!("<{}@{}>", "a".repeat(64), "b".repeat(200));
        assert!(matches!(split_path(&long), Err(AddressError::TooLong(_))));
    }

    /// Invariant 11: controls (C0, DEL, C1 as UTF-8) and bidi/invisible formatting
    /// characters are refused wherever they are: local part (quoted or not), domain,
    /// source route.
    #[test]
    fn controls_and_bidi_are_forbidden() {
        for bad in [
            "a\u{9b}b@x.test",
            "a@x\u{85}.test",
            "\"a\tb\"@x.test",
            "\"a\u{7f}\"@x.test",
            "evil\u{202e}gpj@x.test",
            "a@\u{2066}x.test",
            "a\u{200f}@x.test",
            "a\u{200e}@x.test",
            "a@x.test\u{2069}",
            "\u{feff}a@x.test",
        ] {
            assert!(
                matches!(mailbox(bad), Err(AddressError::Forbidden(_))),
                "{bad:?} should be forbidden"
            );
        }
        assert!(matches!(
            split_path("<@r\u{202a}.test:a@x.test>"),
            Err(AddressError::Forbidden(_))
        ));
        assert!(matches!(
            split_path("a\u{9b}@x.test SIZE=1"),
            Err(AddressError::Forbidden(_))
        ));
        // Ordinary international text is not affected.
        assert!(mailbox("jörg@bücher.example").is_ok());
        assert!(mailbox("אבג@x.test").is_ok());
    }

    /// Fuzz finding (target `address`): `a@[x:>]` and `a@[x:"]` were valid mailboxes
    /// without brackets but not inside them, where `>` ends the path and `"` opens a
    /// quoted string.
    #[test]
    fn general_literal_refuses_angle_brackets() {
        assert!(mailbox("a@[x:y]").is_ok());
        assert!(mailbox("a@[x:>]").is_err());
        assert!(mailbox("a@[x:<]").is_err());
        assert!(mailbox("a@[x:\"]").is_err());
        assert!(split_path("a@[x:>]").is_ok(), "splitting does not validate");
    }

    /// Fuzz finding (target `address`): without brackets, a 255- or 256-octet path was
    /// accepted although with its brackets it is over the 256-octet limit.
    #[test]
    fn unbracketed_path_limit_counts_the_brackets() {
        let at_limit = format!("{}@{}", "a".repeat(60), "b".repeat(193));
        assert_eq!(at_limit.len() + 2, MAX_PATH);
        assert!(split_path(&at_limit).is_ok());
        assert!(split_path(&format!("<{at_limit}>")).is_ok());
        let over = format!("{at_limit}b");
        assert!(matches!(split_path(&over), Err(AddressError::TooLong(_))));
        assert!(matches!(
            split_path(&format!("<{over}>")),
            Err(AddressError::TooLong(_))
        ));
    }
}
