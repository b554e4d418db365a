//! The AUTH decoder `mailer::protocol::sasl::{start, respond}` (RFC 4954, PLAIN RFC 4616, LOGIN),
//! alone and inside a session. Input: a selector byte, then lines separated by LF.
//!
//! Properties:
//! - never panics;
//! - `start` with an initial response is the same as `respond` in the first state;
//!   PLAIN and LOGIN without one challenge with "" and base64 "Username:"; other
//!   mechanisms are unknown;
//! - every challenge is valid base64;
//! - `*` cancels; `=` is the empty response; anything that is not base64 is Malformed;
//! - PLAIN: `Verify { user, password }` only when the decoded bytes are exactly
//!   `authzid NUL user NUL password` with authzid empty or equal to user (else the
//!   credentials are the empty, always-refused pair); re-encoding gives the same step;
//! - LOGIN: the user is the decoded first line, the password the decoded second line;
//! - in a session: AUTH replies are only 334/235/500/501/503/504/535/538; 235 only for the
//!   right credentials, and then the session's user is set; nothing sent during an
//!   exchange is executed as a command.
#![no_main]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use mailer::hooks::{NoHooks, SessionInfo};
use mailer::protocol::sasl::{respond, start, AuthStep, Exchange};
use mailer::session::{AuthSettings, Session, Settings, Step};
use mailer::testing::OneUser;
use std::sync::Arc;

fn decode(line: &str) -> Option<Vec<u8>> {
    let l = line.trim();
    if l == "=" {
        return Some(Vec::new());
    }
    B64.decode(l).ok()
}

fn check_step(state: &Exchange, line: &str, step: &AuthStep) {
    if line.trim() == "*" {
        assert_eq!(step, &AuthStep::Cancelled);
        return;
    }
    let Some(decoded) = decode(line) else {
        assert_eq!(step, &AuthStep::Malformed, "{line:?} is not base64");
        return;
    };
    match (state, step) {
        (_, AuthStep::Challenge(c, _)) => {
            assert!(B64.decode(c).is_ok(), "challenge {c:?} is not base64");
            assert!(matches!(state, Exchange::LoginUser));
        }
        (Exchange::Plain, AuthStep::Verify { user, password }) => {
            let mut parts = decoded.splitn(3, |&b| b == 0);
            let (authz, u, p) = (parts.next(), parts.next(), parts.next());
            let (Some(authz), Some(u), Some(p)) = (authz, u, p) else {
                panic!("Verify without two NULs in {decoded:?}");
            };
            if authz.is_empty() || authz == u {
                assert_eq!(user.as_bytes(), u);
                assert_eq!(password.as_slice(), p);
            } else {
                assert!(
                    user.is_empty() && password.is_empty(),
                    "proxy auth accepted"
                );
            }
            // Round trip.
            if !user.is_empty() {
                let mut again = vec![0u8];
                again.extend_from_slice(user.as_bytes());
                again.push(0);
                again.extend_from_slice(password);
                assert_eq!(&respond(&Exchange::Plain, &B64.encode(&again)), step);
            }
        }
        (Exchange::Plain, AuthStep::Malformed) => {
            let nuls = decoded.iter().filter(|&&b| b == 0).count();
            let user_ok = decoded
                .split(|&b| b == 0)
                .nth(1)
                .is_some_and(|u| std::str::from_utf8(u).is_ok());
            assert!(nuls < 2 || !user_ok, "{decoded:?} refused");
        }
        (Exchange::LoginUser, AuthStep::Malformed) => {
            assert!(String::from_utf8(decoded).is_err());
        }
        (Exchange::LoginPassword(u), AuthStep::Verify { user, password }) => {
            assert_eq!(user, u);
            assert_eq!(password, &decoded);
        }
        (s, other) => panic!("{other:?} in state {s:?} for {line:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let lines: Vec<&str> = text.split('\n').collect();

    // The pure state machine.
    let mech = ["PLAIN", "LOGIN", "CRAM-MD5", "plain"][(sel & 3) as usize];
    let initial = (sel & 4 != 0).then(|| lines[0].trim_end_matches('\r'));
    let first = start(mech, initial);
    match (mech, initial) {
        ("PLAIN", None) => assert_eq!(first, AuthStep::Challenge("", Exchange::Plain)),
        ("LOGIN", None) => {
            assert_eq!(
                first,
                AuthStep::Challenge("VXNlcm5hbWU6", Exchange::LoginUser)
            )
        }
        ("PLAIN", Some(r)) => {
            assert_eq!(first, respond(&Exchange::Plain, r));
            check_step(&Exchange::Plain, r, &first);
        }
        ("LOGIN", Some(r)) => {
            assert_eq!(first, respond(&Exchange::LoginUser, r));
            check_step(&Exchange::LoginUser, r, &first);
        }
        _ => assert_eq!(first, AuthStep::UnknownMechanism),
    }
    let mut step = first;
    for line in lines.iter().skip(usize::from(initial.is_some())) {
        let AuthStep::Challenge(_, state) = &step else {
            break;
        };
        let next = respond(state, line);
        check_step(state, line, &next);
        step = next;
    }

    // The same lines through a session, after `AUTH <mech> [initial]`.
    let settings = Arc::new(Settings {
        hostname: "mx.test".into(),
        max_message_size: 1000,
        bare_lf: mailer::protocol::data::BareLf::Normalize,
        max_recipients: 10,
        max_errors: 1000,
        tls_available: false,
        require_tls: false,
        auth: Some(AuthSettings {
            allow_plaintext: true,
            authenticator: Arc::new(OneUser("alice", "secret")),
        }),
    });
    let info = SessionInfo::new(
        1,
        "192.0.2.1:25".parse().unwrap(),
        "192.0.2.2:25".parse().unwrap(),
    );
    let mut s = Session::new(settings, Arc::new(NoHooks), info);
    let _ = s.greeting();
    let _ = s.command(b"EHLO c.test");
    let mut cmd = format!("AUTH {mech}");
    if let Some(i) = initial {
        cmd.push(' ');
        cmd.push_str(i);
    }
    let mut in_exchange;
    let mut outcome = s.command(cmd.as_bytes());
    let mut lines = lines.iter().skip(usize::from(initial.is_some()));
    loop {
        let Step::Reply(r) = &outcome else {
            panic!("AUTH answered with {outcome:?}");
        };
        assert!(
            [334, 235, 500, 501, 503, 504, 535, 538].contains(&r.code),
            "AUTH reply {r:?}"
        );
        if r.code == 235 {
            assert_eq!(s.info().auth_user.as_deref(), Some("alice"));
        } else {
            assert_eq!(s.info().auth_user, None);
        }
        in_exchange = r.code == 334;
        if !in_exchange {
            break;
        }
        let Some(line) = lines.next() else { break };
        // A line during the exchange is an AUTH response, never a command.
        outcome = s.command(line.trim_end_matches('\r').as_bytes());
    }
    if in_exchange {
        // Still in the exchange: a command-looking line is taken as a response.
        let Step::Reply(r) = s.command(b"QUIT") else {
            panic!("QUIT executed during an AUTH exchange");
        };
        assert!([334, 501, 535].contains(&r.code), "{r:?}");
    }
});
