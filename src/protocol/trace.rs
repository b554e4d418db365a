//! The trace headers written in front of each stored message (SPEC 5, RFC 5321 §4.4).

use super::address::{Address, ReversePath};
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Everything the Received header says about how the message arrived.
#[derive(Clone, Debug)]
pub(crate) struct Trace<'a> {
    pub helo: &'a str,
    pub client_ip: IpAddr,
    pub hostname: &'a str,
    pub tls: bool,
    /// The authenticated user, if any (recorded in a comment, RFC 5321 §4.4).
    pub auth_user: Option<&'a str>,
    pub smtputf8: bool,
    pub queue_id: &'a str,
}

impl Trace<'_> {
    /// The `with` protocol name (RFC 3848; RFC 6531 §3.7.3 for UTF8SMTP*).
    pub(crate) fn protocol(&self) -> String {
        let base = if self.smtputf8 { "UTF8SMTP" } else { "ESMTP" };
        let s = if self.tls { "S" } else { "" };
        let a = if self.auth_user.is_some() { "A" } else { "" };
        format!("{base}{s}{a}")
    }
}

/// `[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3).
pub(crate) fn ip_literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("[{v4}]"),
            None => format!("[IPv6:{v6}]"),
        },
    }
}

/// The longest a client-supplied name (HELO name, AUTH user) may be in a trace
/// header, escapes included; longer ones are cut and end in `...`. A real host name is
/// at most 255 octets (RFC 1035 §2.3.4), so this cuts only junk.
pub(crate) const MAX_TRACE_NAME: usize = 255;

/// Where a trace line is folded before its next clause (RFC 5322 §2.1.1 asks for 78
/// as a SHOULD and forbids more than 998). The usual Received line (short HELO name,
/// host name and user) stays on one line, as it always was; a longer one is folded
/// before `by` and before the comment, each of which is bounded, so no line of the
/// block can pass 998 octets whatever the client sends.
const FOLD_AT: usize = 100;

/// The header block: Return-Path, one X-Original-To per recipient, Received.
///
/// Addresses need no treatment here: the parser refused controls and bidi characters
/// in them and bounds a path to 256 octets (so `Return-Path: <…>` is at most 270), and
/// the session refused 8-bit addresses without SMTPUTF8 (553 5.6.7).
pub(crate) fn headers(from: &ReversePath, rcpts: &[Address], t: &Trace<'_>, now: SystemTime) -> Vec<u8> {
    let mut h = String::with_capacity(256);
    h.push_str(&format!("Return-Path: <{from}>\r\n"));
    for r in rcpts {
        h.push_str(&format!("X-Original-To: {r}\r\n"));
    }
    let mut line = format!(
        "Received: from {} ({})",
        trace_name(t.helo, t.smtputf8, false),
        ip_literal(t.client_ip)
    );
    let by = format!(" by {} with {}", t.hostname, t.protocol());
    // The user goes in the comment allowed before ID (RFC 5321 §4.4 Opt-info CFWS).
    let auth = t
        .auth_user
        .map(|u| format!(" (authenticated as {})", trace_name(u, t.smtputf8, true)));
    for clause in std::iter::once(by).chain(auth) {
        if line.len() + clause.len() > FOLD_AT {
            // Folding whitespace: CRLF then the clause's own leading space, indented.
            h.push_str(&line);
            h.push_str("\r\n       ");
            line.clear();
        }
        line.push_str(&clause);
    }
    h.push_str(&line);
    h.push_str(&format!(
        "\r\n        id {} ; {}\r\n",
        t.queue_id,
        rfc5322_date(now)
    ));
    h.into_bytes()
}

/// A client-supplied name as it may appear in a trace header (invariant 11).
///
/// Kept as is: printable ASCII, and, in an SMTPUTF8 message (RFC 6532 allows UTF-8 in
/// its header fields), printable non-ASCII characters. Everything else is written as
/// `\xNN` per octet of its UTF-8 form: controls, bidi and invisible formatting
/// characters, any 8-bit character of a non-SMTPUTF8 message (whose header must stay
/// ASCII, RFC 5322 §2.2), the parentheses (they would open or close a comment
/// early) and the backslash itself (so an escape always means an escaped octet).
/// Postfix replaces such characters with `?`; the escape keeps what the client sent
/// readable for whoever investigates a message. Spaces stay in a user name (inside a
/// comment); a HELO name cannot contain one. The result is at most
/// [`MAX_TRACE_NAME`] octets, cut between characters and ending in `...` if longer.
pub(crate) fn trace_name(s: &str, utf8: bool, space_ok: bool) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_TRACE_NAME));
    // Where to cut if the whole does not fit: the last character boundary that leaves
    // room for the `...`.
    let mut cut = 0;
    for c in s.chars() {
        let keep = match c {
            '(' | ')' | '\\' => false,
            ' ' => space_ok,
            '!'..='~' => true,
            _ => utf8 && !c.is_ascii() && !crate::logsafe::needs_escape(c),
        };
        if keep {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
        if out.len() <= MAX_TRACE_NAME - 3 {
            cut = out.len();
        } else if out.len() > MAX_TRACE_NAME {
            out.truncate(cut);
            out.push_str("...");
            return out;
        }
    }
    out
}

/// An RFC 5322 §3.3 date in UTC, e.g. `Mon, 23 Nov 2026 02:50:18 +0000`.
pub(crate) fn rfc5322_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MO: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        WD[(days % 7) as usize],
        d,
        MO[(m - 1) as usize],
        y,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's civil_from_days.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 +0000");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_402_218);
        assert_eq!(rfc5322_date(t), "Mon, 23 Nov 2026 02:50:18 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn header_block() {
        let t = Trace {
            helo: "client.test",
            client_ip: "127.0.0.1".parse().unwrap(),
            hostname: "mx.test",
            tls: true,
            auth_user: None,
            smtputf8: false,
            queue_id: "Q1",
        };
        let rcpts = [
            Address::parse("b@y.test").unwrap(),
            Address::parse("c@y.test").unwrap(),
        ];
        let h = headers(&ReversePath::Null, &rcpts, &t, UNIX_EPOCH);
        assert_eq!(
            String::from_utf8(h).unwrap(),
            "Return-Path: <>\r\nX-Original-To: b@y.test\r\nX-Original-To: c@y.test\r\n\
             Received: from client.test ([127.0.0.1]) by mx.test with ESMTPS\r\n        \
             id Q1 ; Thu, 01 Jan 1970 00:00:00 +0000\r\n"
        );
    }

    fn trace(helo: &str, smtputf8: bool, auth_user: Option<&'static str>) -> String {
        let t = Trace {
            helo,
            client_ip: "192.0.2.1".parse().unwrap(),
            hostname: "mx.test",
            tls: false,
            auth_user,
            smtputf8,
            queue_id: "Q1",
        };
        let rcpts = [Address::parse("b@y.test").unwrap()];
        String::from_utf8(headers(&ReversePath::Null, &rcpts, &t, UNIX_EPOCH)).unwrap()
    }

    /// Invariant 11: a 990-octet HELO name is cut to 255 octets ending in `...`, the
    /// Received header is folded before `by`, and no line passes 998 octets.
    #[test]
    fn long_helo_is_cut_and_folded() {
        let helo = "a".repeat(990);
        let h = trace(&helo, false, Some("alice"));
        let cut = format!("{}...", "a".repeat(252));
        assert_eq!(
            h,
            format!(
                "Return-Path: <>\r\nX-Original-To: b@y.test\r\n\
                 Received: from {cut} ([192.0.2.1])\r\n        \
                 by mx.test with ESMTPA (authenticated as alice)\r\n        \
                 id Q1 ; Thu, 01 Jan 1970 00:00:00 +0000\r\n"
            )
        );
        assert!(h.split("\r\n").all(|l| l.len() <= 998));
    }

    /// Invariant 11: without SMTPUTF8 the trace stays ASCII (each octet of a non-ASCII
    /// character as `\xNN`); with it, printable UTF-8 stays and controls/bidi do not.
    #[test]
    fn helo_encoding() {
        assert_eq!(
            trace_name("bücher.test", false, false),
            "b\\xc3\\xbccher.test"
        );
        assert_eq!(trace_name("bücher.test", true, false), "bücher.test");
        assert_eq!(
            trace_name("a\u{202e}b\u{9b}(c)\\\t", true, false),
            "a\\xe2\\x80\\xaeb\\xc2\\x9b\\x28c\\x29\\x5c\\x09"
        );
        assert_eq!(trace_name("Al Ice", false, true), "Al Ice");
        assert_eq!(trace_name("a b", false, false), "a\\x20b");
        let h = trace(&"ü".repeat(400), false, Some("jörg"));
        assert!(h.is_ascii(), "{h}");
        assert!(h.contains(" (authenticated as j\\xc3\\xb6rg)"), "{h}");
        // Escapes are never split by the cut: 63 whole escapes (252 octets), then `...`.
        let name = trace_name(&"\u{1}".repeat(100), false, false);
        assert_eq!(name, format!("{}...", "\\x01".repeat(63)));
        // Exactly at the limit: kept whole.
        let name = trace_name(&"a".repeat(MAX_TRACE_NAME), false, false);
        assert_eq!(name.len(), MAX_TRACE_NAME);
        assert!(!name.ends_with("..."));
        // The longest possible addresses still give short lines.
        let local = "a".repeat(64);
        let long = format!(
            "{local}@{}bbbb.test",
            format!("{}.", "b".repeat(59)).repeat(3)
        );
        assert_eq!(long.len(), 254);
        let from = ReversePath::Mailbox(Address::parse(&long).unwrap());
        let t = Trace {
            helo: "h",
            client_ip: "::1".parse().unwrap(),
            hostname: "x",
            tls: false,
            auth_user: None,
            smtputf8: false,
            queue_id: "q",
        };
        let h = headers(&from, &[Address::parse(&long).unwrap()], &t, UNIX_EPOCH);
        let h = String::from_utf8(h).unwrap();
        assert!(h.split("\r\n").all(|l| l.len() <= 998), "{h}");
    }

    #[test]
    fn protocols() {
        let mut t = Trace {
            helo: "h",
            client_ip: "::1".parse().unwrap(),
            hostname: "x",
            tls: false,
            auth_user: None,
            smtputf8: false,
            queue_id: "q",
        };
        assert_eq!(t.protocol(), "ESMTP");
        t.auth_user = Some("alice");
        assert_eq!(t.protocol(), "ESMTPA");
        t.tls = true;
        t.smtputf8 = true;
        assert_eq!(t.protocol(), "UTF8SMTPSA");
        assert_eq!(ip_literal(t.client_ip), "[IPv6:::1]");
    }
}
