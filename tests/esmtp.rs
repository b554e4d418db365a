//! Issue 4: the ESMTP extensions the server advertises, over TCP against an in-process
//! server: CHUNKING/BDAT (RFC 3030), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), MAIL/RCPT
//! parameter validation, RFC 5321 §4.1.2 address rules and length limits, HELP / VRFY /
//! EXPN, the exact EHLO list; plus a property test (in memory, through the same
//! `Connection` driver) that any chunking of a body stores the same bytes.
mod common;
use common::*;
use mailer::testing::{Fail, Mem};
use proptest::prelude::*;

/// Sends `BDAT <n> [LAST]` and its bytes in one write.
fn bdat(c: &mut Client, data: &[u8], last: bool) {
    let mut w = format!("BDAT {}{}\r\n", data.len(), if last { " LAST" } else { "" }).into_bytes();
    w.extend_from_slice(data);
    c.send_raw(&w);
}

fn envelope(c: &mut Client) {
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
}

fn tmp_is_empty(s: &TestServer) -> bool {
    std::fs::read_dir(s.spool().join("tmp")).unwrap().count() == 0
}

/// The one stored message: its file name must carry the id of the 250 reply.
fn only_message(s: &TestServer, reply: &str) -> Vec<u8> {
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let id = queue_id(reply);
    let stored = s.stored();
    assert_eq!(stored.len(), 1, "exactly one message stored");
    let (name, bytes) = &stored[0];
    assert!(name.contains(&format!(".{id}.")), "{name} vs {id}");
    let (trace, body) = split_stored(bytes);
    assert!(trace.contains(&format!("id {id} ; ")), "{trace}");
    body
}

// ---------------------------------------------------------------- CHUNKING / BDAT

#[test]
fn bdat_single_chunk_last_is_stored_and_acked_with_its_id() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    envelope(&mut c);
    bdat(&mut c, b"Subject: one\r\n\r\nhello\r\n", true);
    let (code, reply) = c.reply();
    assert_eq!(code, 250);
    // The LAST reply comes only once stored: the file is in new/ when we read it.
    let body = only_message(&s, &reply);
    assert_eq!(body, b"Subject: one\r\n\r\nhello\r\n");
    c.ok("QUIT", 221);
}

#[test]
fn bdat_multi_chunk_then_zero_last() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    envelope(&mut c);
    bdat(&mut c, b"Subject: multi\r\n", false);
    assert_eq!(c.reply().1, "250 2.0.0 16 octets received\r\n");
    bdat(&mut c, b"\r\npart two", false);
    assert_eq!(c.reply().1, "250 2.0.0 10 octets received\r\n");
    bdat(&mut c, b"", false);
    assert_eq!(c.reply().1, "250 2.0.0 0 octets received\r\n");
    bdat(&mut c, b" and three\r\n", false);
    assert_eq!(c.reply().1, "250 2.0.0 12 octets received\r\n");
    // Nothing is stored before LAST.
    assert!(s.stored().is_empty());
    bdat(&mut c, b"", true);
    let (code, reply) = c.reply();
    assert_eq!(code, 250, "{reply}");
    let body = only_message(&s, &reply);
    assert_eq!(body, b"Subject: multi\r\n\r\npart two and three\r\n");
    // The transaction is over: a new one works.
    envelope(&mut c);
    bdat(&mut c, b"x\r\n", true);
    assert_eq!(c.reply().0, 250);
    assert_eq!(s.stored().len(), 2);
}

#[test]
fn bdat_content_is_binary_and_byte_exact() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    envelope(&mut c);
    // End-of-data lookalikes, dot-stuffing lookalikes, bare LF, bare CR, NUL, 8-bit.
    let mut body =
        b"Subject: bin\r\n\r\nline\r\n.\r\n..dot\r\nbare\nlf\rcr\0nul\xff\xfe\x80\r\n.".to_vec();
    // Larger than the server's 64 KiB read buffer, so the chunk spans many reads.
    body.extend((0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    body.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
    bdat(&mut c, &body, true);
    let (code, reply) = c.reply();
    assert_eq!(code, 250, "{reply}");
    assert_eq!(only_message(&s, &reply), body, "stored byte for byte");
    // The QUIT inside the chunk was data: the session is still open.
    c.ok("NOOP", 250);
}

#[test]
fn bdat_pipelined_with_its_bytes_and_the_next_command() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    c.send_raw(
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 7\r\nline1\r\nBDAT 11 LAST\r\nNOOP\r\n.\r\n\r\nNOOP\r\n",
    );
    assert_eq!(c.reply().1, "250 2.1.0 Ok\r\n");
    assert_eq!(c.reply().1, "250 2.1.5 Ok\r\n");
    assert_eq!(c.reply().1, "250 2.0.0 7 octets received\r\n");
    let (code, queued) = c.reply();
    assert_eq!(code, 250, "{queued}");
    assert_eq!(c.reply().1, "250 2.0.0 Ok\r\n", "the NOOP after the chunk");
    // Exactly those replies: the next one answers our QUIT.
    assert_eq!(c.ok("QUIT", 221), "221 2.0.0 Bye\r\n");
    assert_eq!(only_message(&s, &queued), b"line1\r\nNOOP\r\n.\r\n\r\n");
}

#[test]
fn data_after_bdat_in_one_transaction_is_503() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    envelope(&mut c);
    bdat(&mut c, b"hello", false);
    assert_eq!(c.reply().0, 250);
    assert_eq!(
        c.cmd("DATA"),
        "503 5.5.1 Error: DATA cannot follow BDAT in one transaction\r\n"
    );
    // RCPT and MAIL are out of sequence while chunks arrive, too.
    assert!(c.cmd("RCPT TO:<c@y.test>").starts_with("503 5.5.1 "));
    assert!(c.cmd("MAIL FROM:<a@x.test>").starts_with("503 5.5.1 "));
    c.ok("RSET", 250);
    c.ok("QUIT", 221);
    assert!(s.stored().is_empty());
    wait_until("tmp/ cleared", || tmp_is_empty(&s));
}

#[test]
fn bdat_out_of_sequence_is_refused_and_its_bytes_are_never_commands() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    // Before MAIL: the chunk holds command lookalikes; were they executed, RSET would
    // answer 250 and QUIT would answer 221 and close.
    c.send_raw(b"BDAT 12\r\nRSET\r\nQUIT\r\nNOOP\r\n");
    assert_eq!(c.reply().1, "503 5.5.1 Error: need MAIL command\r\n");
    assert_eq!(
        c.reply().1,
        "250 2.0.0 Ok\r\n",
        "only the real NOOP is answered"
    );
    // After MAIL, before RCPT: same, and the MAIL stays in force.
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.send_raw(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n");
    assert_eq!(c.reply().1, "503 5.5.1 Error: need RCPT command\r\n");
    assert_eq!(c.reply().1, "250 2.0.0 Ok\r\n");
    c.ok("RCPT TO:<b@y.test>", 250);
    bdat(&mut c, b"ok\r\n", true);
    let (code, reply) = c.reply();
    assert_eq!(code, 250, "{reply}");
    assert_eq!(only_message(&s, &reply), b"ok\r\n");
}

#[test]
fn bdat_bad_syntax_is_501() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    envelope(&mut c);
    for bad in [
        "BDAT",
        "BDAT x",
        "BDAT -1",
        "BDAT 10 FIRST",
        "BDAT 1 LAST x",
    ] {
        assert!(c.cmd(bad).starts_with("501 5.5.4 "), "{bad}");
    }
    bdat(&mut c, b"fine\r\n", true);
    assert_eq!(c.reply().0, 250);
}

#[test]
fn bdat_oversize_across_chunks_is_drained_then_552_and_nothing_is_stored() {
    let s = TestServer::with_toml("[limits]\nmax_message_size = 100\n");
    let mut c = s.ehlo();
    envelope(&mut c);
    bdat(&mut c, &[b'a'; 60], false);
    assert_eq!(c.reply().1, "250 2.0.0 60 octets received\r\n");
    // 60 + 41 > 100. The refused chunk's bytes look like commands: they are drained.
    let mut chunk = b"QUIT\r\n".to_vec();
    chunk.resize(41, b'b');
    bdat(&mut c, &chunk, false);
    assert_eq!(c.reply().1, "552 5.3.4 Error: message file too big\r\n");
    assert!(s.stored().is_empty());
    assert!(tmp_is_empty(&s), "the partial message is gone");
    // The transaction failed: later chunks are drained and refused.
    c.send_raw(b"BDAT 6 LAST\r\nQUIT\r\n");
    assert_eq!(c.reply().1, "503 5.5.1 Error: need MAIL command\r\n");
    c.ok("NOOP", 250);
    // Exactly the limit is fine.
    envelope(&mut c);
    bdat(&mut c, &[b'c'; 50], false);
    assert_eq!(c.reply().0, 250);
    bdat(&mut c, &[b'd'; 50], true);
    let (code, reply) = c.reply();
    assert_eq!(code, 250, "{reply}");
    let mut want = vec![b'c'; 50];
    want.extend_from_slice(&[b'd'; 50]);
    assert_eq!(only_message(&s, &reply), want);
}

#[test]
fn bdat_single_chunk_over_the_limit_is_552_after_draining() {
    let s = TestServer::with_toml("[limits]\nmax_message_size = 100\n");
    let mut c = s.ehlo();
    envelope(&mut c);
    // Were the chunk's bytes read as commands, QUIT would answer 221 and close.
    let mut chunk = b"QUIT\r\n".repeat(30);
    chunk.truncate(150);
    bdat(&mut c, &chunk, true);
    assert_eq!(c.reply().1, "552 5.3.4 Error: message file too big\r\n");
    c.ok("NOOP", 250);
    assert!(s.stored().is_empty());
    assert!(tmp_is_empty(&s));
}

#[test]
fn rset_in_the_middle_of_bdat_discards_the_partial_message() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    envelope(&mut c);
    bdat(&mut c, b"Subject: partial\r\n", false);
    assert_eq!(c.reply().0, 250);
    assert!(
        !tmp_is_empty(&s),
        "the partial message is being written in tmp/"
    );
    c.ok("RSET", 250);
    assert!(tmp_is_empty(&s), "RSET removed the partial message");
    // After RSET the chunk sequence is gone: BDAT needs a new MAIL.
    c.send_raw(b"BDAT 0 LAST\r\n");
    assert!(c.reply().1.starts_with("503 5.5.1 "));
    envelope(&mut c);
    bdat(&mut c, b"fresh\r\n", true);
    let (code, reply) = c.reply();
    assert_eq!(code, 250);
    assert_eq!(only_message(&s, &reply), b"fresh\r\n");
}

#[test]
fn client_leaving_in_the_middle_of_a_chunk_leaves_no_debris() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    envelope(&mut c);
    c.send_raw(b"BDAT 1000 LAST\r\nonly a few bytes");
    drop(c);
    wait_until("tmp/ cleared after the client left", || tmp_is_empty(&s));
    assert!(s.stored().is_empty());
}

// ---------------------------------------------------------------- 8BITMIME

#[test]
fn eight_bit_body_is_stored_byte_exact() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    let mut body =
        b"Subject: =?utf-8?q?8bit?=\r\nContent-Transfer-Encoding: 8bit\r\n\r\nCaf\xc3\xa9 "
            .to_vec();
    body.extend(0x80u8..=0xff);
    body.extend_from_slice(b"\r\n");
    for (i, param) in ["BODY=8BITMIME", "BODY=7BIT", "body=8bitmime"]
        .iter()
        .enumerate()
    {
        c.ok(&format!("MAIL FROM:<a@x.test> {param}"), 250);
        c.ok("RCPT TO:<b@y.test>", 250);
        c.ok("DATA", 354);
        let mut wire = body.clone();
        wire.extend_from_slice(b".\r\n");
        c.send_raw(&wire);
        let (code, reply) = c.reply();
        assert_eq!(code, 250, "{param}: {reply}");
        let stored = s.stored();
        assert_eq!(stored.len(), i + 1);
        let file = stored
            .iter()
            .find(|(name, _)| name.contains(&format!(".{}.", queue_id(&reply))))
            .expect("file for the queue id");
        assert_eq!(split_stored(&file.1).1, body, "{param}");
    }
}

#[test]
fn binarymime_is_not_advertised_and_refused() {
    let s = TestServer::plain();
    let mut c = s.connect();
    let ehlo = c.ok("EHLO client.test", 250);
    assert!(!ehlo.contains("BINARYMIME"), "{ehlo}");
    assert_eq!(
        c.cmd("MAIL FROM:<a@x.test> BODY=BINARYMIME"),
        "555 5.5.4 Unsupported option: BODY=BINARYMIME\r\n"
    );
    assert!(c
        .cmd("MAIL FROM:<a@x.test> BODY=9BIT")
        .starts_with("501 5.5.4 "));
}

// ---------------------------------------------------------------- SMTPUTF8

#[test]
fn utf8_addresses_are_accepted_with_smtputf8_and_traced_as_utf8smtp() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    assert_eq!(
        c.cmd("MAIL FROM:<jösé@例え.test> SMTPUTF8"),
        "250 2.1.0 Ok\r\n"
    );
    assert_eq!(
        c.cmd("RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>"),
        "250 2.1.5 Ok\r\n"
    );
    assert_eq!(c.cmd("RCPT TO:<ascii@y.test>"), "250 2.1.5 Ok\r\n");
    c.ok("DATA", 354);
    c.send_raw("Subject: ünïcödé\r\n\r\nGrüße\r\n.\r\n".as_bytes());
    let (code, reply) = c.reply();
    assert_eq!(code, 250, "{reply}");
    let id = queue_id(&reply);
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    let (trace, body) = split_stored(&stored[0].1);
    assert_eq!(body, "Subject: ünïcödé\r\n\r\nGrüße\r\n".as_bytes());
    let want = format!(
        "Return-Path: <jösé@例え.test>\r\nX-Original-To: δοκιμή@παράδειγμα.δοκιμή\r\nX-Original-To: ascii@y.test\r\nReceived: from client.test ([127.0.0.1]) by mx.test with UTF8SMTP\r\n        id {id} ; "
    );
    assert!(trace.starts_with(&want), "{trace}");
}

#[test]
fn smtputf8_keyword_alone_makes_the_protocol_utf8smtp() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test> SMTPUTF8", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    bdat(&mut c, b"x\r\n", true);
    assert_eq!(c.reply().0, 250);
    let (trace, _) = split_stored(&s.stored()[0].1);
    assert!(trace.contains(" with UTF8SMTP\r\n"), "{trace}");
}

#[test]
fn utf8_addresses_without_smtputf8_are_553_5_6_7() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    let refused = "553 5.6.7 Must declare SMTPUTF8 to send UTF8 addresses\r\n";
    assert_eq!(c.cmd("MAIL FROM:<jösé@例え.test>"), refused);
    assert_eq!(c.cmd("MAIL FROM:<jose@例え.test> BODY=8BITMIME"), refused);
    c.ok("MAIL FROM:<a@x.test>", 250);
    assert_eq!(c.cmd("RCPT TO:<δοκιμή@y.test>"), refused);
    assert_eq!(c.cmd("RCPT TO:<b@παράδειγμα.δοκιμή>"), refused);
    // The transaction goes on with ASCII recipients, traced as plain ESMTP.
    c.ok("RCPT TO:<b@y.test>", 250);
    bdat(&mut c, b"x\r\n", true);
    assert_eq!(c.reply().0, 250);
    let stored = s.stored();
    let (trace, _) = split_stored(&stored[0].1);
    assert!(trace.contains(" with ESMTP\r\n"), "{trace}");
    assert!(!trace.contains('δ'), "{trace}");
}

// ---------------------------------------------------------------- parameters

#[test]
fn mail_and_rcpt_parameter_errors() {
    let s = TestServer::with_toml("[limits]\nmax_errors = 100\n");
    let mut c = s.ehlo();
    let cases: &[(&str, &str)] = &[
        ("MAIL FROM:<a@x.test> SIZE=abc", "501 5.5.4 "),
        ("MAIL FROM:<a@x.test> SIZE=", "501 5.5.4 "),
        ("MAIL FROM:<a@x.test> SIZE", "501 5.5.4 "),
        ("MAIL FROM:<a@x.test> SIZE=-5", "501 5.5.4 "),
        ("MAIL FROM:<a@x.test> SIZE=1e6", "501 5.5.4 "),
        ("MAIL FROM:<a@x.test> SIZE=26214401", "552 5.3.4 "),
        (
            "MAIL FROM:<a@x.test> SIZE=99999999999999999999",
            "552 5.3.4 ",
        ),
        ("MAIL FROM:<a@x.test> SIZE=10 size=11", "501 5.5.4 "),
        ("MAIL FROM:<a@x.test> BODY=8BITMIME BODY=7BIT", "501 5.5.4 "),
        ("MAIL FROM:<a@x.test> SMTPUTF8=yes", "501 5.5.4 "),
        ("MAIL FROM:<a@x.test> FOO=bar", "555 5.5.4 "),
        ("MAIL FROM:<a@x.test> RET=HDRS", "555 5.5.4 "),
        ("MAIL FROM:<a@x.test> ENVID=x", "555 5.5.4 "),
        ("MAIL FROM:<a@x.test> X-UNKNOWN", "555 5.5.4 "),
        ("MAIL FROM:<a@x.test> =x", "501 5.5.4 "),
    ];
    for (cmd, want) in cases {
        let got = c.cmd(cmd);
        assert!(got.starts_with(want), "{cmd}: got {got:?}, want {want}");
    }
    // Accepted forms.
    for ok in [
        "MAIL FROM:<a@x.test> AUTH=<>",
        "MAIL FROM:<a@x.test> AUTH=alice+40x.test",
        "MAIL FROM:<a@x.test> SIZE=26214400 BODY=8BITMIME SMTPUTF8 AUTH=<>",
        "mail from:<a@x.test> size=100 body=7bit",
        "MAIL FROM:<>",
        "MAIL FROM: <a@x.test>",
        // The same parameter twice with the same value: accepted, as Postfix does
        // (Python's smtplib sends them so; SPEC 4). Different values stay 501 above.
        "MAIL FROM:<a@x.test> SIZE=10 SIZE=10",
        "MAIL FROM:<a@x.test> SMTPUTF8 SMTPUTF8",
        "MAIL FROM:<a@x.test> AUTH=<> AUTH=<>",
    ] {
        assert_eq!(c.cmd(ok), "250 2.1.0 Ok\r\n", "{ok}");
        c.ok("RSET", 250);
    }
    // RCPT takes no parameter here (DSN is not advertised).
    c.ok("MAIL FROM:<a@x.test>", 250);
    for cmd in [
        "RCPT TO:<b@y.test> NOTIFY=NEVER",
        "RCPT TO:<b@y.test> ORCPT=rfc822;b@y.test",
    ] {
        assert!(c.cmd(cmd).starts_with("555 5.5.4 "), "{cmd}");
    }
    assert_eq!(c.cmd("RCPT TO:<b@y.test>"), "250 2.1.5 Ok\r\n");
}

#[test]
fn declared_size_within_the_limit_but_content_over_it_is_552_at_the_end() {
    let s = TestServer::with_toml("[limits]\nmax_message_size = 100\n");
    let mut c = s.ehlo();
    assert!(c
        .cmd("MAIL FROM:<a@x.test> SIZE=101")
        .starts_with("552 5.3.4 "));
    c.ok("MAIL FROM:<a@x.test> SIZE=100", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    bdat(&mut c, &[b'z'; 101], true);
    assert!(c.reply().1.starts_with("552 5.3.4 "));
    assert!(s.stored().is_empty());
}

// ---------------------------------------------------------------- addresses

#[test]
fn quoted_local_parts_and_address_literals_are_accepted_and_stored_as_written() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<\"john q. doe\"@x.test>", 250);
    c.ok("RCPT TO:<\"a\\\"b c\"@[192.0.2.1]>", 250);
    c.ok("RCPT TO:<c@[IPv6:2001:db8::1]>", 250);
    c.ok("RCPT TO:<Postmaster>", 250);
    c.ok("RCPT TO:<@relay.test:d@y.test>", 250);
    bdat(&mut c, b"x\r\n", true);
    assert_eq!(c.reply().0, 250);
    let (trace, _) = split_stored(&s.stored()[0].1);
    assert!(
        trace.starts_with(
            "Return-Path: <\"john q. doe\"@x.test>\r\n\
             X-Original-To: \"a\\\"b c\"@[192.0.2.1]\r\n\
             X-Original-To: c@[IPv6:2001:db8::1]\r\n\
             X-Original-To: Postmaster\r\n\
             X-Original-To: d@y.test\r\n"
        ),
        "{trace}"
    );
}

#[test]
fn address_syntax_and_length_limits_are_553_5_1_3() {
    let s = TestServer::with_toml("[limits]\nmax_errors = 100\n");
    let mut c = s.ehlo();
    let label = "d".repeat(63);
    // RFC 5321 §4.5.3.1: local part 64, domain 255, path 256 (with the brackets).
    let local64 = format!("{}@x.test", "a".repeat(64));
    let local65 = format!("{}@x.test", "a".repeat(65));
    // A mailbox of exactly 254 octets makes a 256-octet path.
    let domain = format!("{label}.{label}.{label}.{}", "e".repeat(10));
    let at_limit = format!("{}@{domain}", "a".repeat(254 - 1 - domain.len()));
    assert_eq!(at_limit.len() + 2, 256);
    let over_limit = format!("a{at_limit}");
    let long_domain = format!("a@{label}.{label}.{label}.{label}.x");
    assert!(long_domain.len() - 2 > 255);
    for (addr, want) in [
        (local64.as_str(), "250 "),
        (local65.as_str(), "553 5.1.3 "),
        (at_limit.as_str(), "250 "),
        (over_limit.as_str(), "553 5.1.3 "),
        (long_domain.as_str(), "553 5.1.3 "),
        ("a..b@x.test", "553 5.1.3 "),
        ("a b@x.test", "553 5.1.3 "),
        ("a@-x.test", "553 5.1.3 "),
        ("a@[300.0.0.1]", "553 5.1.3 "),
        ("a@[IPv6:2001:zz::1]", "553 5.1.3 "),
        ("\"unterminated@x.test", "553 5.1.3 "),
        ("nodomain", "553 5.1.3 "),
    ] {
        let got = c.cmd(&format!("MAIL FROM:<{addr}>"));
        assert!(got.starts_with(want), "MAIL {addr}: {got}");
        c.ok("RSET", 250);
        c.ok("MAIL FROM:<a@x.test>", 250);
        let got = c.cmd(&format!("RCPT TO:<{addr}>"));
        assert!(got.starts_with(want), "RCPT {addr}: {got}");
        c.ok("RSET", 250);
    }
    assert!(c.cmd("MAIL FROM:<a@x.test").starts_with("553 5.1.3 "));
    assert!(c.cmd("MAIL FROM:<a@x.test>junk").starts_with("553 5.1.3 "));
    assert!(c.cmd("MAIL TO:<a@x.test>").starts_with("501 5.5.4 "));
}

// ---------------------------------------------------------------- EHLO / HELP / VRFY / EXPN

#[test]
fn ehlo_advertises_exactly_what_is_implemented() {
    let s = TestServer::with_toml("[limits]\nmax_message_size = 1000000\n");
    let mut c = s.connect();
    assert_eq!(
        c.ok("EHLO client.test", 250),
        "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n\
         250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 HELP\r\n"
    );
    // HELO: no extensions.
    assert_eq!(c.ok("HELO client.test", 250), "250 mx.test\r\n");
    // With [tls] configured, STARTTLS joins the list (and HELP names it).
    let t = TestServer::start(Opts {
        tls: true,
        ..Opts::default()
    });
    let mut c = t.connect();
    let ehlo = c.ok("EHLO client.test", 250);
    assert!(ehlo.contains("\r\n250-STARTTLS\r\n250 HELP\r\n"), "{ehlo}");
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert!(c.cmd("HELP").contains(" STARTTLS"));
}

#[test]
fn help_vrfy_expn() {
    let s = TestServer::plain();
    let mut c = s.connect();
    // HELP works before EHLO, with or without an argument.
    let help = c.ok("HELP", 214);
    assert_eq!(
        help,
        "214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP\r\n\
         214 2.0.0 See RFC 5321 and RFC 3030\r\n"
    );
    assert_eq!(c.ok("HELP MAIL", 214), help);
    assert!(!help.contains("STARTTLS") && !help.contains("AUTH") && !help.contains("EXPN"));
    assert_eq!(
        c.cmd("VRFY bob"),
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"
    );
    assert_eq!(
        c.cmd("EXPN staff"),
        "502 5.5.1 Error: command not implemented\r\n"
    );
    assert!(c.cmd("VRFY").starts_with("501 5.5.4 "));
}

// ---------------------------------------------------------------- in memory

/// The content after the trace headers of a message stored with `id`.
fn content_after_trace<'a>(file: &'a [u8], id: &str) -> &'a [u8] {
    let marker = format!("\r\n        id {id} ; ");
    let at = file
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())
        .expect("Received id line");
    let rest = &file[at + marker.len()..];
    let eol = rest.windows(2).position(|w| w == b"\r\n").expect("CRLF") + 2;
    &rest[eol..]
}

/// The content as stored: the trace-header guards (leading white space, incoming
/// `Return-Path:`) applied to the body in one piece.
fn guarded(body: &[u8]) -> Vec<u8> {
    let mut f = mailer::delivery::ContentFilter::new();
    let mut out = Vec::new();
    f.push(body, &mut out);
    f.finish(&mut out);
    out
}

fn bdat_session(chunks: &[&[u8]], zero_last: bool) -> Vec<u8> {
    let mut input = b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n".to_vec();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = !zero_last && i + 1 == chunks.len();
        input.extend_from_slice(
            format!(
                "BDAT {}{}\r\n",
                chunk.len(),
                if last { " LAST" } else { "" }
            )
            .as_bytes(),
        );
        input.extend_from_slice(chunk);
    }
    if zero_last || chunks.is_empty() {
        input.extend_from_slice(b"BDAT 0 LAST\r\n");
    }
    input.extend_from_slice(b"QUIT\r\n");
    input
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Issue 4: any sequence of chunk sizes splitting a body (and any way the bytes are
    /// cut into reads) stores the same bytes, and each reply is the expected one.
    #[test]
    fn any_chunking_reassembles_the_same_bytes(
        body in proptest::collection::vec(any::<u8>(), 0..3000),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        segments in proptest::collection::vec(1usize..300, 0..4),
        zero_last in any::<bool>(),
    ) {
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        bounds.push(0);
        bounds.push(body.len());
        bounds.sort_unstable();
        let chunks: Vec<&[u8]> = bounds.windows(2).map(|w| &body[w[0]..w[1]]).collect();
        let input = bdat_session(&chunks, zero_last);
        let run = Mem { segments, ..Mem::default() }.run(&input);
        let replies = run.replies();
        let n = chunks.len() + usize::from(zero_last || chunks.is_empty());
        prop_assert_eq!(replies.len(), 4 + n + 1, "{:?}", replies);
        for (i, (code, text)) in replies[4..4 + n - 1].iter().enumerate() {
            prop_assert_eq!(*code, 250);
            prop_assert_eq!(text, &format!("250 2.0.0 {} octets received\r\n", chunks[i].len()));
        }
        prop_assert_eq!(&replies[3 + n].1, "250 2.0.0 Ok: queued as MEM1\r\n");
        prop_assert_eq!(replies[4 + n].0, 221);
        prop_assert_eq!(run.stored.len(), 1);
        prop_assert_eq!(content_after_trace(&run.stored[0].1, "MEM1"), &guarded(&body)[..]);
        prop_assert_eq!(run.open_writers, 0);
    }
}

#[test]
fn bdat_storage_failures_in_memory() {
    // Cannot open a message: 452 4.3.1 on the first chunk, later chunks 503.
    let run = Mem {
        fail: Fail::Begin,
        ..Mem::default()
    }
    .run(&bdat_session(&[b"abc", b"def"], false));
    assert_eq!(run.codes(), [220, 250, 250, 250, 452, 503, 221]);
    assert!(run.replies()[4].1.starts_with("452 4.3.1 "));
    assert!(run.stored.is_empty());
    // A write fails: 451 4.3.0 for that chunk, the partial message is dropped.
    let run = Mem {
        fail: Fail::Write,
        ..Mem::default()
    }
    .run(&bdat_session(&[b"abc", b"def"], true));
    assert_eq!(run.codes(), [220, 250, 250, 250, 451, 503, 503, 221]);
    assert_eq!(run.open_writers, 0);
    // The commit fails: the LAST reply says so, never 250.
    let run = Mem {
        fail: Fail::Commit,
        ..Mem::default()
    }
    .run(&bdat_session(&[b"abc"], false));
    assert_eq!(run.codes(), [220, 250, 250, 250, 451, 221]);
    assert!(run.stored.is_empty());
}

#[test]
fn refused_bdat_counts_as_an_error_and_the_limit_still_closes() {
    // max_errors = 3: three out-of-sequence chunks, the third answered 503 then 421.
    let run = Mem {
        max_errors: 3,
        ..Mem::default()
    }
    .run(b"EHLO c\r\nBDAT 4\r\nQUITBDAT 4\r\nQUITBDAT 4\r\nQUITNOOP\r\n");
    assert_eq!(run.codes(), [220, 250, 503, 503, 503, 421]);
    assert!(run.replies()[5].1.starts_with("421 4.7.0 mx.test "));
    assert_eq!(run.end, mailer::connection::End::Closed);
}

#[test]
fn eof_inside_a_chunk_in_memory_leaves_no_open_message() {
    let run = Mem::default().run(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 3\r\nabcBDAT 100 LAST\r\nshort");
    assert_eq!(run.codes(), [220, 250, 250, 250, 250]);
    assert!(run.stored.is_empty());
    assert_eq!(run.open_writers, 0);
    assert_eq!(run.end, mailer::connection::End::Eof);
}
