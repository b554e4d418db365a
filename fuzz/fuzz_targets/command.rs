//! The command-line parser `mailer::protocol::command::parse`.
//!
//! Properties:
//! - never panics;
//! - a refusal is one 5xx reply line with a 5.x.x enhanced code (no CR/LF in its text,
//!   so client bytes can never forge a reply line);
//! - a line with a control character (other than TAB) or invalid UTF-8 is refused;
//! - verbs are case-insensitive: changing the verb's case changes nothing (RFC 5321 §2.4);
//! - what is accepted is well-formed and survives a round trip: printing the parsed
//!   command in canonical form and parsing it again gives the same command.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailer::protocol::address::{Address, ReversePath};
use mailer::protocol::command::{parse, Body, Command};

fn canonical(cmd: &Command) -> Option<String> {
    Some(match cmd {
        Command::Helo(n) => format!("HELO {n}"),
        Command::Ehlo(n) => format!("EHLO {n}"),
        Command::Mail(from, p) => {
            let mut s = format!("MAIL FROM:<{from}>");
            if let Some(n) = p.size {
                s.push_str(&format!(" SIZE={n}"));
            }
            match p.body {
                Some(Body::SevenBit) => s.push_str(" BODY=7BIT"),
                Some(Body::EightBitMime) => s.push_str(" BODY=8BITMIME"),
                None => {}
            }
            if p.smtputf8 {
                s.push_str(" SMTPUTF8");
            }
            if let Some(a) = &p.auth {
                s.push_str(&format!(" AUTH={a}"));
            }
            s
        }
        Command::Rcpt(to) => format!("RCPT TO:<{to}>"),
        Command::Bdat { size, last } => {
            format!("BDAT {size}{}", if *last { " LAST" } else { "" })
        }
        Command::Auth { mechanism, initial } => match initial {
            Some(i) => format!("AUTH {mechanism} {i}"),
            None => format!("AUTH {mechanism}"),
        },
        // Commands without arguments (or whose argument is ignored) need no round trip.
        _ => return None,
    })
}

fn check_address(a: &Address) {
    assert_eq!(Address::parse(a.as_str()).as_ref(), Ok(a), "{a:?} reparses");
    assert!(
        !a.as_str().bytes().any(|b| b < 32 || b == 127),
        "control character in accepted address {a:?}"
    );
    if let Some(d) = a.domain() {
        assert!(a.local_part().len() <= 64 && d.len() <= 255, "{a:?}");
    }
}

fn with_verb_case(line: &[u8], upper: bool) -> Vec<u8> {
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let mut v = line.to_vec();
    for b in &mut v[..end] {
        *b = if upper {
            b.to_ascii_uppercase()
        } else {
            b.to_ascii_lowercase()
        };
    }
    v
}

fuzz_target!(|line: &[u8]| {
    let res = parse(line);
    let bad_bytes = std::str::from_utf8(line).is_err()
        || line.iter().any(|&b| (b < 32 && b != b'\t') || b == 127);
    match &res {
        Err(reply) => {
            assert!((500..600).contains(&reply.code), "{reply:?}");
            assert_eq!(reply.enhanced.map(|e| e.0), Some(5), "{reply:?}");
            assert!(!reply.text.contains(['\r', '\n']), "{reply:?}");
            let wire = reply.to_bytes();
            assert!(wire.ends_with(b"\r\n"));
            assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 1);
        }
        Ok(cmd) => {
            assert!(!bad_bytes, "accepted {line:?} as {cmd:?}");
            match cmd {
                Command::Helo(n) | Command::Ehlo(n) => {
                    assert!(!n.is_empty() && !n.contains(' '), "{cmd:?}");
                }
                Command::Mail(ReversePath::Mailbox(a), p) => {
                    check_address(a);
                    assert!(a.domain().is_some(), "sender without domain: {cmd:?}");
                    if let Some(auth) = &p.auth {
                        assert!(!auth.is_empty() && !auth.contains([' ', '=']), "{cmd:?}");
                    }
                }
                Command::Rcpt(a) => check_address(a),
                Command::Auth { mechanism, initial } => {
                    assert!(!mechanism.is_empty() && !mechanism.contains(' '));
                    assert_eq!(mechanism, &mechanism.to_ascii_uppercase());
                    assert!(initial.as_ref().is_none_or(|i| !i.contains(' ')));
                }
                _ => {}
            }
            if let Some(text) = canonical(cmd) {
                assert_eq!(
                    parse(text.as_bytes()).as_ref(),
                    Ok(cmd),
                    "round trip of {:?} via {text:?}",
                    String::from_utf8_lossy(line)
                );
            }
        }
    }
    assert_eq!(parse(&with_verb_case(line, true)), res, "upper-cased verb");
    assert_eq!(parse(&with_verb_case(line, false)), res, "lower-cased verb");
});
