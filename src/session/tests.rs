//! The state machine in memory: command lines in, steps out.
use super::*;
use crate::hooks::{NoHooks, Policy};

fn settings(max_errors: u32, tls: bool) -> Arc<Settings> {
    Arc::new(Settings {
        hostname: "mx.test".into(),
        max_message_size: 1000,
        bare_lf: crate::protocol::data::BareLf::Normalize,
        max_recipients: 2,
        max_errors,
        tls_available: tls,
        require_tls: false,
        auth: None,
    })
}

fn session_with(settings: Arc<Settings>, hooks: Arc<dyn Hooks>) -> Session {
    let info = SessionInfo::new(
        1,
        "192.0.2.7:4000".parse().unwrap(),
        "192.0.2.1:25".parse().unwrap(),
    );
    Session::new(settings, hooks, info)
}

fn session() -> Session {
    session_with(settings(10, true), Arc::new(NoHooks))
}

/// The reply code and enhanced code (or the step name) of one command.
fn code(s: &mut Session, line: &str) -> String {
    match s.command(line.as_bytes()) {
        Step::Reply(r) => match r.enhanced {
            Some(e) => format!("{} {e}", r.code),
            None => r.code.to_string(),
        },
        Step::Close(rs, _) => format!(
            "close {}",
            rs.iter()
                .map(|r| r.code.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
        Step::Open { hold } => format!("open {hold}"),
        Step::Resume => "resume".into(),
        Step::Body(None) => match &s.txn {
            Txn::Drain(d) => {
                format!("discard {} {} {}", d.left, d.reply.code, d.close.is_some())
            }
            _ => "body".into(),
        },
        Step::StartTls(r) => format!("starttls {}", r.code),
        other => format!("{other:?}"),
    }
}

/// Feeds `input` to the body phase as the driver would, into `stored`, until it
/// needs a step (returned) or more input (`None`).
fn feed(s: &mut Session, mut input: &[u8], stored: &mut Vec<u8>) -> Option<Step> {
    loop {
        let (n, body) = s.body(input);
        input = &input[n..];
        match body {
            Body::Write(bytes) => stored.extend_from_slice(bytes),
            Body::More => return None,
            Body::Step(step) => return Some(step),
        }
    }
}

/// Opens the message the session asked for and feeds it `input`.
fn transfer(s: &mut Session, input: &[u8], stored: &mut Vec<u8>) -> Option<Step> {
    let step = s.opened(Ok("Q1"));
    assert!(matches!(step, Step::Body(_)), "{step:?}");
    feed(s, input, stored)
}

#[test]
fn greeting_names_the_host() {
    let mut s = session();
    assert_eq!(
        s.greeting(),
        Step::Reply(Reply::plain(220, "mx.test ESMTP"))
    );
}

#[test]
fn a_whole_transaction() {
    let mut s = session();
    assert_eq!(code(&mut s, "EHLO c.test"), "250");
    assert_eq!(code(&mut s, "MAIL FROM:<a@x.test> SIZE=10"), "250 2.1.0");
    assert_eq!(code(&mut s, "RCPT TO:<b@y.test>"), "250 2.1.5");
    assert_eq!(code(&mut s, "DATA"), "open false");
    let h = String::from_utf8(s.trace_headers("Q1", std::time::UNIX_EPOCH)).unwrap();
    assert!(h.starts_with("Return-Path: <a@x.test>\r\nX-Original-To: b@y.test\r\nReceived: from c.test ([192.0.2.7]) by mx.test with ESMTP\r\n"), "{h}");
    assert_eq!(s.opened(Ok("Q1")), Step::Body(Some(replies::data_prompt())));
    let mut stored = Vec::new();
    assert_eq!(
        feed(&mut s, b"Subject: x\r\n\r\n..hi\r\n", &mut stored),
        None
    );
    let end = feed(&mut s, b".\r\nQUIT\r\n", &mut stored);
    assert!(matches!(end, Some(Step::Commit { .. })), "{end:?}");
    assert_eq!(stored, b"Subject: x\r\n\r\n.hi\r\n");
    let Step::Reply(r) = s.committed(Ok(())) else {
        panic!("no reply")
    };
    assert_eq!(r.to_string(), "250 2.0.0 Ok: queued as Q1");
    assert!(s.envelope().is_none(), "the transaction ended");
    assert_eq!(code(&mut s, "QUIT"), "close 221");
}

#[test]
fn ehlo_advertises_starttls_only_before_tls() {
    let mut s = session();
    let Step::Reply(r) = s.command(b"EHLO c.test") else {
        panic!()
    };
    assert_eq!(
        r.text,
        "mx.test\nPIPELINING\nSIZE 1000\n8BITMIME\nSMTPUTF8\nENHANCEDSTATUSCODES\nCHUNKING\nSTARTTLS\nHELP"
    );
    assert_eq!(code(&mut s, "STARTTLS"), "starttls 220");
    s.tls_started(TlsInfo {
        version: "TLSv1_3".into(),
        cipher: "X".into(),
    });
    assert_eq!(
        code(&mut s, "MAIL FROM:<a@x.test>"),
        "503 5.5.1",
        "EHLO again first"
    );
    let Step::Reply(r) = s.command(b"EHLO c.test") else {
        panic!()
    };
    assert!(!r.text.contains("STARTTLS"));
    assert_eq!(code(&mut s, "STARTTLS"), "503 5.5.1");
}

#[test]
fn order_of_commands() {
    let mut s = session();
    assert_eq!(
        code(&mut s, "MAIL FROM:<a@x.test>"),
        "503 5.5.1",
        "HELO first"
    );
    assert_eq!(code(&mut s, "HELO c.test"), "250");
    assert_eq!(code(&mut s, "RCPT TO:<b@y.test>"), "503 5.5.1");
    assert_eq!(code(&mut s, "DATA"), "503 5.5.1");
    assert_eq!(code(&mut s, "MAIL FROM:<a@x.test>"), "250 2.1.0");
    assert_eq!(
        code(&mut s, "MAIL FROM:<a@x.test>"),
        "503 5.5.1",
        "nested MAIL"
    );
    assert_eq!(code(&mut s, "DATA"), "503 5.5.1", "no recipient yet");
    assert_eq!(code(&mut s, "RCPT TO:<b@y.test>"), "250 2.1.5");
    assert_eq!(code(&mut s, "RCPT TO:<c@y.test>"), "250 2.1.5");
    assert_eq!(
        code(&mut s, "RCPT TO:<d@y.test>"),
        "452 4.5.3",
        "max_recipients = 2"
    );
    assert_eq!(code(&mut s, "RSET"), "250 2.0.0");
    assert!(s.envelope().is_none());
    assert_eq!(code(&mut s, "MAIL FROM:<a@x.test> SIZE=1001"), "552 5.3.4");
}

#[test]
fn bdat_states() {
    let mut s = session();
    code(&mut s, "EHLO c.test");
    assert_eq!(
        code(&mut s, "BDAT 5"),
        "discard 5 503 false",
        "before MAIL: drained"
    );
    assert_eq!(
        feed(&mut s, b"12345", &mut Vec::new()),
        Some(Step::Reply(bad_sequence("need MAIL command")))
    );
    code(&mut s, "MAIL FROM:<a@x.test>");
    code(&mut s, "RCPT TO:<b@y.test>");
    assert_eq!(code(&mut s, "BDAT 600"), "open false");
    assert!(s.is_chunking());
    let mut stored = Vec::new();
    let chunk = [b'x'; 600];
    assert_eq!(
        transfer(&mut s, &chunk, &mut stored),
        Some(Step::Reply(replies::chunk_received(600)))
    );
    assert_eq!(stored.len(), 600, "the chunk's bytes, as they came");
    assert_eq!(code(&mut s, "DATA"), "503 5.5.1", "no DATA inside BDAT");
    assert_eq!(
        code(&mut s, "BDAT 401 LAST"),
        "discard 401 552 false",
        "over the limit in total"
    );
    assert_eq!(
        feed(&mut s, &[b'y'; 401], &mut stored),
        Some(Step::Abandon(replies::MESSAGE_TOO_BIG.into())),
        "drained, then refused; the open message is dropped"
    );
    assert!(!s.is_chunking(), "the transaction failed");
    assert_eq!(code(&mut s, "BDAT 1 LAST"), "discard 1 503 false");
    assert_eq!(
        feed(&mut s, b"z", &mut stored),
        Some(Step::Reply(bad_sequence("need MAIL command")))
    );
    assert_eq!(stored.len(), 600, "refused chunks are never written");
}

#[test]
fn bdat_last_is_answered_once_committed() {
    let mut s = session();
    code(&mut s, "EHLO c.test");
    code(&mut s, "MAIL FROM:<a@x.test>");
    code(&mut s, "RCPT TO:<b@y.test>");
    assert_eq!(code(&mut s, "BDAT 4 LAST"), "open false");
    let mut stored = Vec::new();
    // The chunk's bytes, then a pipelined command the session must leave alone.
    let step = transfer(&mut s, b"a\r\nbNOOP\r\n", &mut stored);
    assert!(matches!(step, Some(Step::Commit { .. })), "{step:?}");
    assert_eq!(stored, b"a\r\nb");
    assert_eq!(
        s.committed(Err(CommitError::Store(crate::spool::StoreError::Full(
            "x".into()
        )))),
        Step::Reply(replies::INSUFFICIENT_STORAGE.into())
    );
    assert!(s.envelope().is_none());
}

#[test]
fn errors_are_counted_to_421() {
    let mut s = session_with(settings(3, false), Arc::new(NoHooks));
    assert_eq!(code(&mut s, "FOO"), "500 5.5.2");
    assert_eq!(code(&mut s, "BAR"), "500 5.5.2");
    assert_eq!(code(&mut s, "BAZ"), "close 500,421");
}

#[test]
fn utf8_addresses_need_smtputf8() {
    let mut s = session();
    code(&mut s, "EHLO c.test");
    assert_eq!(code(&mut s, "MAIL FROM:<jö@x.test>"), "553 5.6.7");
    assert_eq!(code(&mut s, "MAIL FROM:<a@x.test>"), "250 2.1.0");
    assert_eq!(code(&mut s, "RCPT TO:<jö@y.test>"), "553 5.6.7");
    code(&mut s, "RSET");
    assert_eq!(code(&mut s, "MAIL FROM:<jö@x.test> SMTPUTF8"), "250 2.1.0");
    assert_eq!(code(&mut s, "RCPT TO:<jö@y.test>"), "250 2.1.5");
}

#[test]
fn policy_refuses_foreign_domains() {
    let hooks: Arc<dyn Hooks> = Arc::new(Policy::new(&["y.test".into()]));
    let mut s = session_with(settings(10, false), hooks);
    code(&mut s, "EHLO c.test");
    code(&mut s, "MAIL FROM:<a@x.test>");
    assert_eq!(code(&mut s, "RCPT TO:<b@Y.TEST>"), "250 2.1.5");
    assert_eq!(code(&mut s, "RCPT TO:<b@z.test>"), "550 5.7.1");
}

#[test]
fn storage_outcomes() {
    let mut s = session();
    for (outcome, want) in [
        (
            MessageOutcome::TooBig,
            "552 5.3.4 Error: message file too big",
        ),
        (
            MessageOutcome::BareLf,
            "550 5.5.2 Error: bare <LF> received",
        ),
        (
            MessageOutcome::StorageFull("x".into()),
            "452 4.3.1 Error: insufficient system storage",
        ),
        (
            MessageOutcome::StorageError("x".into()),
            "451 4.3.0 Error: queue file write error",
        ),
    ] {
        code(&mut s, "EHLO c.test");
        code(&mut s, "MAIL FROM:<a@x.test>");
        code(&mut s, "RCPT TO:<b@y.test>");
        assert_eq!(code(&mut s, "DATA"), "open false");
        let env = s.envelope().cloned();
        s.txn = Txn::Idle;
        assert_eq!(s.message_end(env, 0, outcome).to_string(), want);
    }
}

#[test]
fn refused_lines_name_the_command_without_credentials() {
    use super::refused_what;
    assert_eq!(
        refused_what(b"rcpt to:<A@x.test> NOTIFY=NEVER", false),
        "RCPT TO:<A@x.test> NOTIFY=NEVER"
    );
    assert_eq!(refused_what(b"Mail From:<a@b>", false), "MAIL FROM:<a@b>");
    assert_eq!(refused_what(b"helo Evil.Name", false), "HELO Evil.Name");
    assert_eq!(
        refused_what(b"AUTH PLAIN AGFsaWNlAHg=", false),
        "AUTH PLAIN"
    );
    assert_eq!(refused_what(b"AGFsaWNlAHg=", true), "AUTH response");
    assert_eq!(refused_what(&[b'x'; 2000], false).len(), 300);
}
