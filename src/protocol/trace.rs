//! The trace headers written in front of each stored message (SPEC 5, RFC 5321 §4.4).

use super::address::{Address, ReversePath};
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Everything the Received header says about how the message arrived.
#[derive(Clone, Debug)]
pub struct Trace<'a> {
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
    pub fn protocol(&self) -> String {
        let base = if self.smtputf8 { "UTF8SMTP" } else { "ESMTP" };
        let s = if self.tls { "S" } else { "" };
        let a = if self.auth_user.is_some() { "A" } else { "" };
        format!("{base}{s}{a}")
    }
}

/// `[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3).
pub fn ip_literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("[{v4}]"),
            None => format!("[IPv6:{v6}]"),
        },
    }
}

/// The header block: Return-Path, one X-Original-To per recipient, Received.
pub fn headers(from: &ReversePath, rcpts: &[Address], t: &Trace<'_>, now: SystemTime) -> Vec<u8> {
    let mut h = String::with_capacity(256);
    h.push_str(&format!("Return-Path: <{from}>\r\n"));
    for r in rcpts {
        h.push_str(&format!("X-Original-To: {r}\r\n"));
    }
    // The user goes in the comment allowed before ID (RFC 5321 §4.4 Opt-info CFWS).
    let auth = match t.auth_user {
        Some(u) => format!(" (authenticated as {})", sanitize(u)),
        None => String::new(),
    };
    h.push_str(&format!(
        "Received: from {} ({}) by {} with {}{auth}\r\n        id {} ; {}\r\n",
        sanitize(t.helo),
        ip_literal(t.client_ip),
        t.hostname,
        t.protocol(),
        t.queue_id,
        rfc5322_date(now)
    ));
    h.into_bytes()
}

/// HELO names and user names are client input: keep them from breaking the header.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || c == '(' || c == ')' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// An RFC 5322 §3.3 date in UTC, e.g. `Mon, 23 Nov 2026 02:50:18 +0000`.
pub fn rfc5322_date(t: SystemTime) -> String {
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
