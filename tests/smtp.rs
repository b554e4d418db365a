//! SPEC 4, one test per table row that the core server answers (STARTTLS, AUTH and
//! BDAT are covered by their own suites), over real loopback TCP, asserting the exact
//! reply codes, enhanced codes and the bytes stored in the spool.
mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Sends `line` and asserts the whole reply text.
fn expect(c: &mut Client, line: &str, reply: &str) {
    c.send(line);
    let (_, got) = c.reply();
    assert_eq!(got, reply, "reply to {line:?}");
}

/// Sends `line`, asserts the reply code and that the reply starts with
/// `"<code> <enhanced> "` (the RFC 3463 enhanced status code).
fn expect_code(c: &mut Client, line: &str, code: u16, enhanced: &str) {
    let r = c.ok(line, code);
    assert!(r.starts_with(&format!("{code} {enhanced} ")), "{line}: {r}");
}

/// Sends a message from a@x.test to b@y.test (`wire`: dot-stuffed, ending in
/// CRLF.CRLF) and asserts that it is accepted with 250 2.0.0.
fn accepted(c: &mut Client, wire: &[u8]) {
    let reply = c.transaction("a@x.test", &["b@y.test"], wire);
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
}

/// The files in `<spool>/tmp` (must be empty whenever no message is in flight).
fn tmp_files(s: &TestServer) -> Vec<String> {
    std::fs::read_dir(s.spool().join("tmp"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn greeting_is_220_hostname_esmtp() {
    let s = TestServer::plain();
    let mut c = Client::connect(s.addr);
    assert_eq!(c.reply(), (220, "220 mx.test ESMTP\r\n".to_string()));
}

#[test]
fn ehlo_lists_exactly_the_core_extensions() {
    let s = TestServer::with_toml("[limits]\nmax_message_size = 123456\n");
    let mut c = s.connect();
    expect(
        &mut c,
        "EHLO client.test",
        "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 123456\r\n250-8BITMIME\r\n\
         250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 HELP\r\n",
    );
    // Verbs are case-insensitive, and a second EHLO gives the same list.
    let again = c.ok("ehlo other.test", 250);
    assert!(
        !again.contains("STARTTLS") && !again.contains("AUTH"),
        "{again}"
    );
}

#[test]
fn helo_noop_rset_answer_250() {
    let s = TestServer::plain();
    let mut c = s.connect();
    expect(&mut c, "HELO client.test", "250 mx.test\r\n");
    expect(&mut c, "NOOP", "250 2.0.0 Ok\r\n");
    expect(&mut c, "NOOP with an argument", "250 2.0.0 Ok\r\n");
    // RSET ends the transaction: a RCPT after it has no MAIL.
    c.ok("MAIL FROM:<a@x.test>", 250);
    expect(&mut c, "RSET", "250 2.0.0 Ok\r\n");
    c.ok("RCPT TO:<b@y.test>", 503);
    // HELO alone (no ESMTP) still stores mail; the trace says so via the HELO name.
    let reply = c.transaction("a@x.test", &["b@y.test"], b"Subject: h\r\n\r\nx\r\n.\r\n");
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    let (trace, body) = split_stored(&stored[0].1);
    assert!(
        trace.contains("Received: from client.test ([127.0.0.1]) by mx.test with "),
        "{trace}"
    );
    assert_eq!(body, b"Subject: h\r\n\r\nx\r\n");
}

#[test]
fn mail_from_with_size_and_body_parameters_is_250_2_1_0() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    for line in [
        "MAIL FROM:<a@x.test>",
        "MAIL FROM:<a@x.test> SIZE=100",
        "MAIL FROM:<a@x.test> BODY=7BIT",
        "MAIL FROM:<a@x.test> BODY=8BITMIME",
        "mail from:<a@x.test> size=20 body=8bitmime",
        "MAIL FROM:<a@x.test> SIZE=20 BODY=8BITMIME SMTPUTF8 AUTH=<>",
    ] {
        expect(&mut c, line, "250 2.1.0 Ok\r\n");
        c.ok("RSET", 250);
    }
    // An 8-bit body declared with BODY=8BITMIME is stored byte for byte.
    c.ok("MAIL FROM:<a@x.test> SIZE=40 BODY=8BITMIME", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw("Subject: 8\r\n\r\nGrüße \u{2713}\r\n.\r\n".as_bytes());
    let (code, _) = c.reply();
    assert_eq!(code, 250);
    let (_, body) = split_stored(&s.stored()[0].1);
    assert_eq!(body, "Subject: 8\r\n\r\nGrüße \u{2713}\r\n".as_bytes());
}

#[test]
fn rcpt_to_is_250_2_1_5_and_recipients_are_recorded_in_order() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    expect(&mut c, "RCPT TO:<b@y.test>", "250 2.1.5 Ok\r\n");
    expect(&mut c, "rcpt to:<c@z.test>", "250 2.1.5 Ok\r\n");
    c.ok("DATA", 354);
    c.send_raw(b"Subject: r\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    let (trace, _) = split_stored(&s.stored()[0].1);
    assert!(
        trace.starts_with(
            "Return-Path: <a@x.test>\r\nX-Original-To: b@y.test\r\nX-Original-To: c@z.test\r\nReceived: "
        ),
        "{trace}"
    );
}

#[test]
fn data_gets_354_then_250_with_the_queue_id_of_the_stored_file() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    expect(&mut c, "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n");
    c.send_raw(b"Subject: d\r\n\r\nbody\r\n.\r\n");
    let (code, reply) = c.reply();
    assert_eq!(code, 250);
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let id = queue_id(&reply);
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{id}"
    );
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    let (name, bytes) = &stored[0];
    // Maildir name: <secs>.<unique>.<hostname>, the unique part being the queue id.
    let parts: Vec<&str> = name.splitn(2, '.').collect();
    assert!(parts[0].bytes().all(|b| b.is_ascii_digit()), "{name}");
    assert_eq!(parts[1], format!("{id}.mx.test"), "{name}");
    let (trace, body) = split_stored(bytes);
    assert!(
        trace.contains(&format!("\r\n        id {id} ; ")),
        "{trace}"
    );
    assert_eq!(body, b"Subject: d\r\n\r\nbody\r\n");
    assert!(tmp_files(&s).is_empty());
}

#[test]
fn vrfy_is_252_2_5_0_and_expn_is_502_5_5_1() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    expect_code(&mut c, "VRFY alice", 252, "2.5.0");
    expect_code(&mut c, "EXPN staff", 502, "5.5.1");
    c.ok("NOOP", 250);
}

#[test]
fn help_is_214() {
    let s = TestServer::plain();
    let mut c = s.connect();
    let h = c.ok("HELP", 214);
    assert!(
        h.starts_with("214-2.0.0 ") && h.contains("\r\n214 2.0.0 "),
        "{h}"
    );
    c.ok("NOOP", 250);
}

#[test]
fn quit_is_221_2_0_0_and_closes() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    expect(&mut c, "QUIT", "221 2.0.0 Bye\r\n");
    assert!(c.read_to_close().is_empty(), "nothing after 221");
    assert!(s.stored().is_empty());
}

#[test]
fn unknown_command_is_500_5_5_2() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    expect(
        &mut c,
        "FROB",
        "500 5.5.2 Error: command not recognized\r\n",
    );
    expect_code(&mut c, "MAIL\x01FROM:<a@x.test>", 500, "5.5.2");
    c.ok("NOOP", 250);
}

#[test]
fn bad_arguments_are_501_5_5_4() {
    let s = TestServer::with_toml("[limits]\nmax_errors = 100\n");
    let mut c = s.connect();
    for line in ["HELO", "EHLO", "EHLO two names"] {
        expect_code(&mut c, line, 501, "5.5.4");
    }
    c.ok("EHLO client.test", 250);
    for line in [
        "MAIL TO:<a@x.test>",
        "MAIL FROM:<a@x.test> SIZE=abc",
        "MAIL FROM:<a@x.test> BODY=9BIT",
        "MAIL FROM:<a@x.test> SIZE=1 SIZE=2",
        "RCPT FROM:<b@y.test>",
        "DATA now",
        "RSET now",
        "QUIT now",
        "VRFY",
    ] {
        expect_code(&mut c, line, 501, "5.5.4");
        c.ok("RSET", 250);
    }
}

#[test]
fn bad_address_is_553_5_1_3() {
    let s = TestServer::with_toml("[limits]\nmax_errors = 100\n");
    let mut c = s.ehlo();
    for line in [
        "MAIL FROM:<a@x.test",
        "MAIL FROM:<bad address@x.test>",
        "MAIL FROM:<no-domain>",
        "MAIL FROM:<a@@x.test>",
        "MAIL FROM:<a@x.test>junk",
    ] {
        expect_code(&mut c, line, 553, "5.1.3");
    }
    let long_local = format!("MAIL FROM:<{}@x.test>", "l".repeat(65));
    expect_code(&mut c, &long_local, 553, "5.1.3");
    c.ok("MAIL FROM:<a@x.test>", 250);
    for line in ["RCPT TO:<>", "RCPT TO:<b@>", "RCPT TO:<b@y..test>"] {
        expect_code(&mut c, line, 553, "5.1.3");
    }
    // The transaction is intact after refused recipients.
    c.ok("RCPT TO:<b@y.test>", 250);
}

#[test]
fn unknown_mail_or_rcpt_parameter_is_555_5_5_4() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    expect_code(&mut c, "MAIL FROM:<a@x.test> RET=FULL", 555, "5.5.4");
    expect_code(&mut c, "MAIL FROM:<a@x.test> FROBNICATE", 555, "5.5.4");
    c.ok("MAIL FROM:<a@x.test>", 250);
    expect_code(&mut c, "RCPT TO:<b@y.test> NOTIFY=NEVER", 555, "5.5.4");
    c.ok("RCPT TO:<b@y.test>", 250);
}

#[test]
fn wrong_order_is_503_5_5_1() {
    let s = TestServer::plain();
    // MAIL before HELO/EHLO.
    let mut c = s.connect();
    expect_code(&mut c, "MAIL FROM:<a@x.test>", 503, "5.5.1");
    c.ok("EHLO client.test", 250);
    // RCPT before MAIL, DATA before MAIL.
    expect_code(&mut c, "RCPT TO:<b@y.test>", 503, "5.5.1");
    expect_code(&mut c, "DATA", 503, "5.5.1");
    // DATA before RCPT.
    c.ok("MAIL FROM:<a@x.test>", 250);
    expect_code(&mut c, "DATA", 503, "5.5.1");
    // MAIL twice.
    expect_code(&mut c, "MAIL FROM:<a@x.test>", 503, "5.5.1");
    // None of that broke the transaction in progress.
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(b"Subject: o\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    // After the message the transaction is over: RCPT needs a new MAIL.
    expect_code(&mut c, "RCPT TO:<b@y.test>", 503, "5.5.1");
    assert_eq!(s.stored().len(), 1);
}

#[test]
fn command_line_too_long_is_500_5_5_6_and_the_session_continues() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    // Exactly the limit (1000 octets with the CRLF) is a command like any other.
    expect(
        &mut c,
        &format!("NOOP {}", "a".repeat(993)),
        "250 2.0.0 Ok\r\n",
    );
    // One octet more is too long, and the session goes on.
    expect(
        &mut c,
        &format!("NOOP {}", "a".repeat(994)),
        "500 5.5.6 Error: line too long\r\n",
    );
    expect(
        &mut c,
        &format!("NOOP {}", "a".repeat(1100)),
        "500 5.5.6 Error: line too long\r\n",
    );
    // A long MAIL is refused as a whole: no transaction starts.
    c.ok(&format!("MAIL FROM:<a@x.test> {}", "x".repeat(2000)), 500);
    c.ok("RCPT TO:<b@y.test>", 503);
    accepted(&mut c, b"Subject: l\r\n\r\nx\r\n.\r\n");
}

#[test]
fn too_many_recipients_is_452_4_5_3() {
    let s = TestServer::with_toml("[limits]\nmax_recipients = 2\n");
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b1@y.test>", 250);
    c.ok("RCPT TO:<b2@y.test>", 250);
    expect(
        &mut c,
        "RCPT TO:<b3@y.test>",
        "452 4.5.3 Error: too many recipients\r\n",
    );
    // 452 is not an error that counts toward closing; the message goes to the first two.
    c.ok("DATA", 354);
    c.send_raw(b"Subject: n\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    let (trace, _) = split_stored(&s.stored()[0].1);
    assert!(
        trace.starts_with("Return-Path: <a@x.test>\r\nX-Original-To: b1@y.test\r\nX-Original-To: b2@y.test\r\nReceived: "),
        "{trace}"
    );
}

#[test]
fn declared_size_over_limit_is_552_5_3_4() {
    let s = TestServer::with_toml("[limits]\nmax_message_size = 1000\n");
    let mut c = s.ehlo();
    expect_code(&mut c, "MAIL FROM:<a@x.test> SIZE=1001", 552, "5.3.4");
    // No transaction was started; at the limit is fine.
    c.ok("RCPT TO:<b@y.test>", 503);
    c.ok("MAIL FROM:<a@x.test> SIZE=1000", 250);
}

#[test]
fn actual_size_over_limit_is_552_5_3_4_after_draining_and_nothing_is_stored() {
    let s = TestServer::with_toml("[limits]\nmax_message_size = 1000\n");
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    // 5000 octets of content with lines that look like commands: all drained as data.
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    while body.len() < 5000 {
        body.extend_from_slice(b"RSET\r\nMAIL FROM:<evil@x.test>\r\nline of text\r\n");
    }
    body.extend_from_slice(b".\r\n");
    c.send_raw(&body);
    expect_reply(&mut c, "552 5.3.4 Error: message file too big\r\n");
    c.ok("NOOP", 250);
    assert!(s.stored().is_empty());
    assert!(tmp_files(&s).is_empty(), "{:?}", tmp_files(&s));
    // Exactly at the limit: stored.
    let mut ok = b"Subject: ok\r\n\r\n".to_vec();
    ok.resize(1000 - 2, b'y');
    ok.extend_from_slice(b"\r\n");
    assert_eq!(ok.len(), 1000);
    ok.extend_from_slice(b".\r\n");
    accepted(&mut c, &ok);
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(split_stored(&stored[0].1).1.len(), 1000);
}

fn expect_reply(c: &mut Client, reply: &str) {
    let (_, got) = c.reply();
    assert_eq!(got, reply);
}

#[test]
fn recipient_domain_not_accepted_is_550_5_7_1() {
    let s = TestServer::with_toml("[policy]\naccept_domains = [\"y.test\", \"z.test\"]\n");
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@elsewhere.test>", 250);
    expect(
        &mut c,
        "RCPT TO:<b@x.test>",
        "550 5.7.1 <b@x.test>: Relay access denied\r\n",
    );
    c.ok("RCPT TO:<b@Y.TEST>", 250);
    c.ok("RCPT TO:<c@z.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(b"Subject: p\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    let (trace, _) = split_stored(&s.stored()[0].1);
    assert!(!trace.contains("b@x.test"), "{trace}");
    assert!(
        trace.contains("X-Original-To: b@Y.TEST\r\nX-Original-To: c@z.test\r\n"),
        "{trace}"
    );
}

#[test]
fn starttls_without_tls_configured_is_454_4_7_0() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    expect(&mut c, "STARTTLS", "454 4.7.0 TLS not available\r\n");
    // Still plain text, still usable.
    c.ok("NOOP", 250);
}

#[test]
fn too_many_errors_is_the_error_reply_then_421_4_7_0_and_close() {
    let s = TestServer::with_toml("[limits]\nmax_errors = 3\n");
    let mut c = s.ehlo();
    expect(&mut c, "FOO", "500 5.5.2 Error: command not recognized\r\n");
    c.ok("NOOP", 250); // successes do not reset or add to the count
    assert!(c.ok("RCPT TO:<b@y.test>", 503).starts_with("503 5.5.1"));
    c.send("BAZ");
    let rest = String::from_utf8(c.read_to_close()).unwrap();
    assert_eq!(
        rest,
        "500 5.5.2 Error: command not recognized\r\n421 4.7.0 mx.test Error: too many errors\r\n"
    );
}

/// Reads whatever the server sends within `limit`, until it closes.
fn read_all_within(tcp: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    tcp.set_read_timeout(Some(limit)).unwrap();
    let mut v = Vec::new();
    let _ = tcp.read_to_end(&mut v);
    (v, start.elapsed())
}

/// True when a new connection is greeted with 220 (not refused with 421).
fn greets(s: &TestServer) -> bool {
    let mut t = TcpStream::connect(s.addr).unwrap();
    t.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 4];
    t.read_exact(&mut buf).is_ok() && &buf == b"220 "
}

#[test]
fn per_ip_connection_limit_is_421_4_7_0_at_once() {
    let s = TestServer::start(Opts {
        server_extra: "max_connections_per_ip = 2".into(),
        ..Opts::default()
    });
    let mut a = s.ehlo();
    let _b = s.ehlo();
    let mut third = TcpStream::connect(s.addr).unwrap();
    let (got, took) = read_all_within(&mut third, WAIT);
    assert_eq!(
        String::from_utf8_lossy(&got),
        "421 4.7.0 mx.test Error: too many connections from your host\r\n"
    );
    assert!(took < Duration::from_secs(3), "refusal took {took:?}");
    // Once one of the two leaves, a new connection from the same IP is served.
    a.ok("QUIT", 221);
    a.read_to_close();
    wait_until("a slot is free again", || greets(&s));
}

#[test]
fn all_workers_busy_is_421_4_7_0_promptly_never_a_silent_hang() {
    // One worker. Sockets are handed only to a free worker, so while it is busy inside
    // a message (a session waiting at a prompt would be closed to make room: SPEC
    // invariant 8) every further client is refused at once.
    let s = TestServer::start(Opts {
        server_extra: "workers = 1".into(),
        ..Opts::default()
    });
    let mut busy = s.ehlo(); // occupies the only worker
    busy.ok("MAIL FROM:<a@x.test>", 250);
    busy.ok("RCPT TO:<b@y.test>", 250);
    busy.ok("DATA", 354);
    for _ in 0..2 {
        let mut next = TcpStream::connect(s.addr).unwrap();
        let (got, took) = read_all_within(&mut next, WAIT);
        assert_eq!(
            String::from_utf8_lossy(&got),
            "421 4.7.0 mx.test Error: server busy, try again later\r\n"
        );
        assert!(took < Duration::from_secs(3), "refusal took {took:?}");
    }
    // The busy session was not disturbed, and once it ends the worker serves again.
    busy.send_raw(b"Subject: x\r\n\r\nx\r\n.\r\n");
    assert_eq!(busy.reply().0, 250);
    busy.ok("QUIT", 221);
    busy.read_to_close();
    wait_until("the worker is free again", || greets(&s));
    assert!(s.handle.stats().connections_refused >= 2);
}

#[test]
fn command_timeout_is_421_4_4_2_and_close() {
    let s = TestServer::with_toml("[limits]\ncommand_timeout_secs = 1\n");
    let mut c = s.ehlo();
    let start = Instant::now();
    let rest = String::from_utf8(c.read_to_close()).unwrap();
    let took = start.elapsed();
    assert_eq!(rest, "421 4.4.2 mx.test Error: timeout exceeded\r\n");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

/// Writes `chunks` one by one, `every` apart, on a second handle (until a write fails)
/// while waiting for the reply: it must be the 421 4.4.2 timeout, within `limit`, and
/// the connection must then be closed.
fn trickle_until_timeout(c: &mut Client, chunks: Vec<Vec<u8>>, every: Duration, limit: Duration) {
    let mut w = c.tcp().try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for chunk in chunks {
            if w.write_all(&chunk).is_err() {
                return;
            }
            std::thread::sleep(every);
        }
    });
    let start = Instant::now();
    let (code, text) = c.reply();
    let took = start.elapsed();
    assert_eq!(
        (code, text.as_str()),
        (421, "421 4.4.2 mx.test Error: timeout exceeded\r\n")
    );
    assert!(took < limit, "{took:?}");
    assert!(c.is_closed());
    trickle.join().unwrap();
}

#[test]
fn trickled_command_bytes_do_not_restart_the_command_clock() {
    let s = TestServer::with_toml("[limits]\ncommand_timeout_secs = 1\n");
    let mut c = s.ehlo();
    // One byte every 150 ms: the whole line would take 3 s, far past the 1 s deadline.
    let bytes = b"NOOP trickle trickle\r\n".iter().map(|b| vec![*b]);
    trickle_until_timeout(
        &mut c,
        bytes.collect(),
        Duration::from_millis(150),
        Duration::from_millis(2500),
    );
}

#[test]
fn data_timeout_is_421_4_4_2_and_nothing_is_stored() {
    let s = TestServer::with_toml("[limits]\ndata_timeout_secs = 1\ncommand_timeout_secs = 30\n");
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(b"Subject: slow\r\n\r\npart of a body\r\n");
    let start = Instant::now();
    let rest = String::from_utf8(c.read_to_close()).unwrap();
    let took = start.elapsed();
    assert_eq!(rest, "421 4.4.2 mx.test Error: timeout exceeded\r\n");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(s.stored().is_empty());
    wait_until("tmp/ emptied", || tmp_files(&s).is_empty());
}

#[test]
fn data_slower_than_min_data_rate_is_421_4_4_2() {
    let s = TestServer::with_toml(
        "[limits]\ndata_timeout_secs = 1\nmin_data_rate = 100000\ncommand_timeout_secs = 30\n",
    );
    let mut c = s.ehlo();
    // A fast message on the same settings is fine.
    accepted(&mut c, b"Subject: fast\r\n\r\nx\r\n.\r\n");
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    // Never silent for data_timeout, but ~100 bytes/s: below the minimum rate.
    trickle_until_timeout(
        &mut c,
        vec![b"0123456789".to_vec(); 40],
        Duration::from_millis(100),
        Duration::from_millis(3000),
    );
    assert_eq!(s.stored().len(), 1, "only the fast message");
}

#[test]
fn several_messages_on_one_connection() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    let mut ids = Vec::new();
    for i in 0..4 {
        let body = format!("Subject: m{i}\r\n\r\nbody {i}\r\n");
        let reply = c.transaction(
            &format!("s{i}@x.test"),
            &[&format!("r{i}@y.test")],
            format!("{body}.\r\n").as_bytes(),
        );
        assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
        ids.push((queue_id(&reply), i, body));
    }
    c.ok("QUIT", 221);
    let stored = s.stored();
    assert_eq!(stored.len(), 4);
    for (id, i, body) in ids {
        let (_, bytes) = stored
            .iter()
            .find(|(n, _)| n.contains(&format!(".{id}.")))
            .unwrap_or_else(|| panic!("no file for {id}"));
        let (trace, got) = split_stored(bytes);
        assert!(
            trace.starts_with(&format!(
                "Return-Path: <s{i}@x.test>\r\nX-Original-To: r{i}@y.test\r\n"
            )),
            "{trace}"
        );
        assert_eq!(got, body.as_bytes());
    }
}

#[test]
fn address_forms_quoted_source_route_and_null_sender() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<\"john q. doe\"@x.test>", 250);
    c.ok("RCPT TO:<@relay1.test,@relay2.test:b@y.test>", 250);
    c.ok("RCPT TO:<Postmaster>", 250);
    c.ok("RCPT TO:<\"odd@local\"@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(b"Subject: q\r\n\r\nx\r\n.\r\n");
    let first = queue_id(&c.reply().1);
    // The null reverse-path (bounces), with Postfix's leniency for a space after FROM:.
    c.ok("MAIL FROM: <>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(b"Subject: bounce\r\n\r\nx\r\n.\r\n");
    let second = queue_id(&c.reply().1);
    let stored = s.stored();
    let trace_of = |id: &str| {
        split_stored(
            &stored
                .iter()
                .find(|(n, _)| n.contains(&format!(".{id}.")))
                .unwrap()
                .1,
        )
        .0
    };
    assert!(
        trace_of(&first).starts_with(
            "Return-Path: <\"john q. doe\"@x.test>\r\nX-Original-To: b@y.test\r\n\
             X-Original-To: Postmaster\r\nX-Original-To: \"odd@local\"@y.test\r\nReceived: "
        ),
        "{}",
        trace_of(&first)
    );
    assert!(
        trace_of(&second).starts_with("Return-Path: <>\r\nX-Original-To: b@y.test\r\nReceived: "),
        "{}",
        trace_of(&second)
    );
}

/// Replaces a spool subdirectory with a regular file (root ignores permissions).
fn break_dir(s: &TestServer, sub: &str) {
    let p = s.spool().join(sub);
    std::fs::remove_dir_all(&p).unwrap();
    std::fs::write(&p, b"not a directory").unwrap();
}

fn repair_dir(s: &TestServer, sub: &str) {
    let p = s.spool().join(sub);
    std::fs::remove_file(&p).unwrap();
    std::fs::create_dir(&p).unwrap();
}

#[test]
fn storage_failure_opening_the_file_is_451_and_the_session_goes_on() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    break_dir(&s, "tmp");
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    // The message file cannot even be created: DATA is refused before 354.
    expect(
        &mut c,
        "DATA",
        "451 4.3.0 Error: queue file write error\r\n",
    );
    c.ok("NOOP", 250);
    assert!(s.stored().is_empty());
    repair_dir(&s, "tmp");
    accepted(&mut c, b"Subject: again\r\n\r\nx\r\n.\r\n");
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(split_stored(&stored[0].1).1, b"Subject: again\r\n\r\nx\r\n");
}

#[test]
fn storage_failure_at_commit_is_451_nothing_stored_and_a_later_message_succeeds() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    let mut other = s.ehlo(); // another session, unaffected
    break_dir(&s, "new");
    let reply = c.transaction(
        "a@x.test",
        &["b@y.test"],
        b"Subject: lost\r\n\r\nx\r\n.\r\n",
    );
    assert_eq!(reply, "451 4.3.0 Error: queue file write error\r\n");
    // The refused message leaves nothing behind, not even in tmp/.
    assert!(tmp_files(&s).is_empty(), "{:?}", tmp_files(&s));
    c.ok("NOOP", 250);
    other.ok("NOOP", 250);
    repair_dir(&s, "new");
    accepted(&mut c, b"Subject: kept\r\n\r\nx\r\n.\r\n");
    accepted(&mut other, b"Subject: too\r\n\r\nx\r\n.\r\n");
    let bodies: Vec<Vec<u8>> = s.stored().iter().map(|(_, b)| split_stored(b).1).collect();
    assert_eq!(bodies.len(), 2);
    assert!(bodies.contains(&b"Subject: kept\r\n\r\nx\r\n".to_vec()));
    assert!(bodies.contains(&b"Subject: too\r\n\r\nx\r\n".to_vec()));
}
