//! Parsing one SMTP command line (without its CRLF) into a typed [`Command`].
//!
//! Verbs are case-insensitive (RFC 5321 §2.4). A parse error carries the exact reply
//! the session sends, so the session never builds error text from strings itself.

use super::address::{split_path, Address, AddressError, ReversePath};
use super::reply::{Enhanced, Reply};

/// The `BODY=` value of MAIL (RFC 6152).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// `7BIT`: plain ASCII.
    SevenBit,
    /// `8BITMIME`: octets above 127 in the content.
    EightBitMime,
}

/// Parameters of MAIL FROM that we advertise: SIZE (RFC 1870), BODY (RFC 6152),
/// SMTPUTF8 (RFC 6531) and AUTH (RFC 4954 §5).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=`: the client's estimate of the message size in octets.
    pub size: Option<u64>,
    /// `BODY=`: the content's type.
    pub body: Option<Body>,
    /// `SMTPUTF8`: addresses or headers may be UTF-8.
    pub smtputf8: bool,
    /// The `AUTH=` identity as sent (xtext, or `<>`); informational only.
    pub auth: Option<String>,
}

/// One parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum Command {
    Helo(String),
    Ehlo(String),
    Mail(ReversePath, MailParams),
    Rcpt(Address),
    Data,
    /// `BDAT size [LAST]` (RFC 3030).
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954 §4).
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
}

fn syntax(text: &str) -> Reply {
    Reply::new(501, Enhanced(5, 5, 4), format!("Syntax: {text}"))
}

fn bad_address(e: AddressError) -> Reply {
    Reply::new(553, Enhanced(5, 1, 3), e.to_string())
}

/// Parses a command line. `Err` holds the reply to send.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub fn parse(line: &[u8]) -> Result<Command, Reply> {
    let line = std::str::from_utf8(line)
        .map_err(|_| Reply::new(500, Enhanced(5, 5, 2), "Error: command is not valid UTF-8"))?;
    let (verb, arg) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let arg_t = arg.trim();
    let no_arg = |cmd: Command, name: &str| {
        if arg_t.is_empty() {
            Ok(cmd)
        } else {
            Err(syntax(name))
        }
    };
    // Upper-case the verb on the stack: this runs for every command line.
    let mut upper = [0u8; 8];
    let verb_uc = match verb.as_bytes() {
        v if v.len() <= upper.len() => {
            upper[..v.len()].copy_from_slice(v);
            upper[..v.len()].make_ascii_uppercase();
            // Only ASCII was changed, so the bytes are still the UTF-8 of `verb`.
            std::str::from_utf8(&upper[..v.len()]).unwrap_or("")
        }
        _ => "",
    };
    let control = line.bytes().any(|b| b < 32 && b != b'\t' || b == 127);
    let control_reply = || {
        Reply::new(
            500,
            Enhanced(5, 5, 2),
            "Error: control character in command",
        )
    };
    // A control character in a MAIL/RCPT address is an address error (553 5.1.3,
    // invariant 11), so those two commands parse first; whatever else carries one
    // is refused as a whole, before anything of it is looked at.
    let envelope = matches!(verb_uc, "MAIL" | "RCPT");
    if control && !envelope {
        return Err(control_reply());
    }
    let no_control = |cmd: Command| {
        if control {
            Err(control_reply())
        } else {
            Ok(cmd)
        }
    };
    match verb_uc {
        "HELO" | "EHLO" => {
            if arg_t.is_empty() || arg_t.contains(' ') {
                return Err(syntax(&format!("{} hostname", verb.to_ascii_uppercase())));
            }
            let name = arg_t.to_string();
            Ok(if verb.eq_ignore_ascii_case("EHLO") {
                Command::Ehlo(name)
            } else {
                Command::Helo(name)
            })
        }
        "MAIL" => parse_mail(arg).and_then(no_control),
        "RCPT" => parse_rcpt(arg).and_then(no_control),
        "DATA" => no_arg(Command::Data, "DATA"),
        "BDAT" => parse_bdat(arg_t),
        "RSET" => no_arg(Command::Rset, "RSET"),
        "NOOP" => Ok(Command::Noop), // RFC 5321 §4.1.1.9: a parameter is allowed and ignored
        "QUIT" => no_arg(Command::Quit, "QUIT"),
        "VRFY" if !arg_t.is_empty() => Ok(Command::Vrfy),
        "VRFY" => Err(syntax("VRFY address")),
        "EXPN" => Ok(Command::Expn), // not implemented at all: 502 whatever the argument
        "HELP" => Ok(Command::Help),
        "STARTTLS" => no_arg(Command::StartTls, "STARTTLS"),
        "AUTH" => {
            let mut it = arg_t.split(' ').filter(|s| !s.is_empty());
            let mechanism = it.next().ok_or_else(|| syntax("AUTH mechanism"))?;
            let initial = it.next().map(str::to_string);
            if it.next().is_some() {
                return Err(syntax("AUTH mechanism [initial-response]"));
            }
            Ok(Command::Auth {
                mechanism: mechanism.to_ascii_uppercase(),
                initial,
            })
        }
        _ => Err(Reply::new(
            500,
            Enhanced(5, 5, 2),
            "Error: command not recognized",
        )),
    }
}

/// Strips a case-insensitive `FROM:` / `TO:` prefix.
fn strip_keyword<'a>(arg: &'a str, kw: &str) -> Option<&'a str> {
    let head = arg.get(..kw.len())?;
    head.eq_ignore_ascii_case(kw).then(|| &arg[kw.len()..])
}

fn parse_mail(arg: &str) -> Result<Command, Reply> {
    let rest = strip_keyword(arg, "FROM:").ok_or_else(|| syntax("MAIL FROM:<address>"))?;
    let (inner, params) = split_path(rest).map_err(bad_address)?;
    let from = if inner.is_empty() {
        ReversePath::Null
    } else {
        ReversePath::Mailbox(Address::parse(inner).map_err(bad_address)?)
    };
    if let ReversePath::Mailbox(a) = &from {
        if a.domain().is_none() {
            return Err(bad_address(AddressError::Syntax("sender needs a domain")));
        }
    }
    let mut p = MailParams::default();
    for (key, value) in esmtp_params(params)? {
        // The same parameter twice is harmless when it says the same thing twice:
        // Python's smtplib.send_message adds SMTPUTF8 and BODY=8BITMIME itself and
        // again from mail_options. Postfix accepts that; two different values are
        // a contradiction, refused 501 5.5.4.
        let dup = || syntax(&format!("conflicting values for parameter {key}"));
        match key.to_ascii_uppercase().as_str() {
            "SIZE" => {
                let v = value.ok_or_else(|| syntax("SIZE=number"))?;
                // RFC 1870: size-value ::= 1*20DIGIT. A 20-digit value past u64 is
                // still a number, just too big: it saturates and gets 552, not 501.
                if v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(syntax("SIZE=number"));
                }
                let n = v.parse::<u64>().unwrap_or(u64::MAX);
                if p.size.replace(n).is_some_and(|old| old != n) {
                    return Err(dup());
                }
            }
            "BODY" => {
                let v = value.ok_or_else(|| syntax("BODY=7BIT|8BITMIME"))?;
                let body = if v.eq_ignore_ascii_case("7BIT") {
                    Body::SevenBit
                } else if v.eq_ignore_ascii_case("8BITMIME") {
                    Body::EightBitMime
                } else if v.eq_ignore_ascii_case("BINARYMIME") {
                    // Not advertised (RFC 3030 §3): refuse like any unsupported option.
                    return Err(Reply::new(
                        555,
                        Enhanced(5, 5, 4),
                        "Unsupported option: BODY=BINARYMIME",
                    ));
                } else {
                    return Err(syntax("BODY=7BIT|8BITMIME"));
                };
                if p.body.replace(body).is_some_and(|old| old != body) {
                    return Err(dup());
                }
            }
            "SMTPUTF8" => {
                if value.is_some() {
                    return Err(syntax("SMTPUTF8 takes no value"));
                }
                p.smtputf8 = true;
            }
            "AUTH" => {
                let v = value.ok_or_else(|| syntax("AUTH=identity"))?;
                if p.auth.replace(v.to_string()).is_some_and(|old| old != v) {
                    return Err(dup());
                }
            }
            _ => return Err(unsupported(key)),
        }
    }
    Ok(Command::Mail(from, p))
}

fn parse_rcpt(arg: &str) -> Result<Command, Reply> {
    let rest = strip_keyword(arg, "TO:").ok_or_else(|| syntax("RCPT TO:<address>"))?;
    let (inner, params) = split_path(rest).map_err(bad_address)?;
    if inner.is_empty() {
        return Err(bad_address(AddressError::Syntax("empty recipient")));
    }
    let to = Address::parse(inner).map_err(bad_address)?;
    // No RCPT parameter is advertised (no DSN), so any is unknown (RFC 5321 §4.1.1.11).
    if let Some((key, _)) = esmtp_params(params)?.first() {
        return Err(unsupported(key));
    }
    Ok(Command::Rcpt(to))
}

fn unsupported(key: &str) -> Reply {
    Reply::new(555, Enhanced(5, 5, 4), format!("Unsupported option: {key}"))
}

/// Splits ` KEY=VALUE KEY …` into pairs; keywords per RFC 5321 §4.1.2 esmtp-keyword.
fn esmtp_params(s: &str) -> Result<Vec<(&str, Option<&str>)>, Reply> {
    let mut out = Vec::new();
    for item in s.split(' ').filter(|x| !x.is_empty()) {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        let key_ok = k.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        // esmtp-value: printable characters other than `=` (RFC 5321 §4.1.2), UTF-8
        // allowed (RFC 6531 §3.3); never a control.
        let value_ok = v.is_none_or(|v| {
            !v.is_empty() && !v.contains('=') && !v.chars().any(crate::logsafe::needs_escape)
        });
        if !key_ok || !value_ok {
            // Echoed in the reply: escaped, so the client gets no control back.
            return Err(syntax(&format!(
                "bad parameter {}",
                crate::logsafe::escape_log(item)
            )));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn parse_bdat(arg: &str) -> Result<Command, Reply> {
    let mut it = arg.split(' ').filter(|s| !s.is_empty());
    let size = it
        .next()
        .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| syntax("BDAT size [LAST]"))?;
    let last = match it.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(syntax("BDAT size [LAST]")),
    };
    if it.next().is_some() {
        return Err(syntax("BDAT size [LAST]"));
    }
    Ok(Command::Bdat { size, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &str) -> u16 {
        parse(line.as_bytes()).unwrap_err().code
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(parse(b"quit").unwrap(), Command::Quit);
        assert_eq!(parse(b"NoOp").unwrap(), Command::Noop);
        assert_eq!(
            parse(b"ehlo client.test").unwrap(),
            Command::Ehlo("client.test".into())
        );
        assert_eq!(parse(b"HeLo c").unwrap(), Command::Helo("c".into()));
    }

    #[test]
    fn mail_with_params() {
        let Command::Mail(from, p) =
            parse(b"MAIL FROM:<a@x.test> SIZE=1000 BODY=8BITMIME SMTPUTF8 AUTH=<>").unwrap()
        else {
            panic!("not MAIL")
        };
        assert_eq!(from.to_string(), "a@x.test");
        assert_eq!(p.size, Some(1000));
        assert_eq!(p.body, Some(Body::EightBitMime));
        assert!(p.smtputf8);
        assert_eq!(p.auth.as_deref(), Some("<>"));
        assert_eq!(
            parse(b"mail from: <>").unwrap(),
            Command::Mail(ReversePath::Null, MailParams::default())
        );
    }

    #[test]
    fn mail_errors() {
        assert_eq!(code("MAIL"), 501);
        assert_eq!(code("MAIL TO:<a@x.test>"), 501);
        assert_eq!(code("MAIL FROM:<a@x.test> SIZE=abc"), 501);
        assert_eq!(code("MAIL FROM:<a@x.test> SIZE=-1"), 501);
        assert_eq!(code("MAIL FROM:<a@x.test> SIZE=+1"), 501);
        assert_eq!(code("MAIL FROM:<a@x.test> SIZE=123456789012345678901"), 501);
        let Ok(Command::Mail(_, p)) = parse(b"MAIL FROM:<a@x.test> SIZE=99999999999999999999")
        else {
            panic!("a 20-digit SIZE is a number")
        };
        assert_eq!(p.size, Some(u64::MAX));
        assert_eq!(code("MAIL FROM:<a@x.test> SIZE=1 SIZE=2"), 501);
        assert_eq!(code("MAIL FROM:<a@x.test> BODY=7BIT BODY=8BITMIME"), 501);
        assert_eq!(code("MAIL FROM:<a@x.test> AUTH=<> AUTH=a+40b"), 501);
        assert_eq!(code("MAIL FROM:<a@x.test> BODY=9BIT"), 501);
        assert_eq!(code("MAIL FROM:<a@x.test> BODY=BINARYMIME"), 555);
        assert_eq!(code("MAIL FROM:<a@x.test> RET=FULL"), 555);
        assert_eq!(code("MAIL FROM:<a@x.test> SMTPUTF8=yes"), 501);
        assert_eq!(code("MAIL FROM:<bad address@x.test>"), 553);
        assert_eq!(code("MAIL FROM:<a@x.test"), 553);
        assert_eq!(code("MAIL FROM:<postmaster>"), 553);
    }

    /// SPEC 4: a repeated parameter with the same value is accepted (as smtplib sends
    /// `SMTPUTF8 BODY=8BITMIME` twice with mail_options); values compare as parsed.
    #[test]
    fn repeated_identical_parameters_are_accepted() {
        let Command::Mail(_, p) = parse(
            b"MAIL FROM:<a@x.test> SMTPUTF8 BODY=8BITMIME SMTPUTF8 BODY=8bitmime SIZE=10 SIZE=10",
        )
        .unwrap() else {
            panic!("not MAIL")
        };
        assert!(p.smtputf8);
        assert_eq!(p.body, Some(Body::EightBitMime));
        assert_eq!(p.size, Some(10));
        assert!(parse(b"MAIL FROM:<a@x.test> AUTH=<> AUTH=<>").is_ok());
    }

    /// Invariant 11: a control character inside a MAIL/RCPT address is an address
    /// error (553 5.1.3); anywhere else it refuses the line (500 5.5.2).
    #[test]
    fn control_characters_in_envelope_commands() {
        let e = parse(b"MAIL FROM:<a\x01b@x.test>").unwrap_err();
        assert_eq!(
            e.to_string(),
            "553 5.1.3 Bad address: control character in address"
        );
        let e = parse("RCPT TO:<a\u{9b}b@x.test>".as_bytes()).unwrap_err();
        assert_eq!((e.code, e.enhanced), (553, Some(Enhanced(5, 1, 3))));
        let e = parse("RCPT TO:<a\u{202e}b@x.test>".as_bytes()).unwrap_err();
        assert_eq!((e.code, e.enhanced), (553, Some(Enhanced(5, 1, 3))));
        assert_eq!(code("MAIL FROM:<a@x.test> SIZE=1\x01"), 501);
        assert_eq!(code("MAIL FROM:<a@x.test> \x01"), 501);
        assert_eq!(code("HELO a\x01b"), 500);
        assert_eq!(code("MAIL\x01FROM:<a@x.test>"), 500);
    }

    #[test]
    fn rcpt_forms() {
        assert_eq!(
            parse(b"RCPT TO:<b@y.test>").unwrap(),
            Command::Rcpt(Address::parse("b@y.test").unwrap())
        );
        assert!(parse(b"rcpt to:<Postmaster>").is_ok());
        assert!(parse(b"RCPT TO:<@relay.test:b@y.test>").is_ok());
        assert_eq!(code("RCPT TO:<>"), 553);
        assert_eq!(code("RCPT TO:<b@y.test> NOTIFY=NEVER"), 555);
        assert_eq!(code("RCPT FROM:<b@y.test>"), 501);
    }

    #[test]
    fn bdat_forms() {
        assert_eq!(
            parse(b"BDAT 10").unwrap(),
            Command::Bdat {
                size: 10,
                last: false
            }
        );
        assert_eq!(
            parse(b"bdat 0 last").unwrap(),
            Command::Bdat {
                size: 0,
                last: true
            }
        );
        assert_eq!(code("BDAT"), 501);
        assert_eq!(code("BDAT x"), 501);
        assert_eq!(code("BDAT 10 FIRST"), 501);
        assert_eq!(code("BDAT 10 LAST more"), 501);
    }

    #[test]
    fn other_commands() {
        assert_eq!(code("FOO"), 500);
        assert_eq!(code("DATA now"), 501);
        assert_eq!(code("HELO"), 501);
        assert_eq!(code("VRFY"), 501);
        assert_eq!(parse(b"VRFY bob").unwrap(), Command::Vrfy);
        assert_eq!(parse(b"NOOP anything").unwrap(), Command::Noop);
        assert_eq!(
            parse(b"AUTH plain AGFsaWNlAHNlY3JldA==").unwrap(),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some("AGFsaWNlAHNlY3JldA==".into())
            }
        );
        assert_eq!(code("NOOP \x01"), 500);
        assert_eq!(parse(b"\xff\xfe").unwrap_err().code, 500);
    }
}
