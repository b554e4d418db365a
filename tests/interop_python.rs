//! Interoperability with Python's `smtplib`, sending the way applications do:
//! `send_message` with a multipart message and a UTF-8 subject, `sendmail` to two
//! recipients, and `send_message` from a UTF-8 address (SMTPUTF8 + BODY=8BITMIME).
//! The stored bytes must be exactly what smtplib flattened and sent.
mod common;
use common::*;
use std::process::Command;

const SCRIPT: &str = r#"
import io, sys, smtplib
from email.message import EmailMessage
from email.generator import BytesGenerator

port, out = int(sys.argv[1]), sys.argv[2]

def flat(msg, utf8=False):
    # Exactly what smtplib.SMTP.send_message does before DATA.
    buf = io.BytesIO()
    g = BytesGenerator(buf, policy=msg.policy.clone(utf8=True)) if utf8 else BytesGenerator(buf)
    g.flatten(msg, linesep='\r\n')
    return buf.getvalue()

# 1. A multipart message with a UTF-8 subject and body, and a binary attachment.
m = EmailMessage()
m['From'] = 'Jörg Sender <sender@x.test>'
m['To'] = 'Rcpt <b@y.test>'
m['Subject'] = 'Grüße aus Köln ✓'
m.set_content('Hallo Welt, grüße!\n.a line that starts with a dot\n\nEnd.\n')
m.add_attachment(b'\x00\x01\x02binary\r\n.\r\n', maintype='application',
                 subtype='octet-stream', filename='a.bin')
m.set_boundary('==py-boundary==')
open(out + '/one.eml', 'wb').write(flat(m))
with smtplib.SMTP('127.0.0.1', port, local_hostname='py.test', timeout=20) as s:
    s.ehlo()
    assert s.has_extn('pipelining') and s.has_extn('size') and s.has_extn('smtputf8')
    refused = s.send_message(m)
    assert refused == {}, refused

    # 2. sendmail with a raw string to two recipients, on the same connection.
    refused = s.sendmail('a@x.test', ['b@y.test', 'c@y.test'],
                         'Subject: two\r\n\r\n.leading dot\r\nline\n')
    assert refused == {}, refused

# 3. An internationalized sender: smtplib adds SMTPUTF8 and BODY=8BITMIME.
m = EmailMessage()
m['From'] = 'jörg@x.test'
m['To'] = 'b@y.test'
m['Subject'] = 'ünïcödé'
m.set_content('Inhalt: äöü\n')
open(out + '/three.eml', 'wb').write(flat(m, utf8=True))
with smtplib.SMTP('127.0.0.1', port, local_hostname='py.test', timeout=20) as s:
    assert s.send_message(m) == {}
print('sent')
"#;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn python3() -> Option<String> {
    match Command::new("python3").arg("--version").output() {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        _ => None,
    }
}

#[test]
fn python_smtplib_send_message_and_sendmail_are_stored_byte_exact() {
    let Some(version) = python3() else {
        eprintln!("skipped: python3 is not installed (needed to run smtplib)");
        return;
    };
    eprintln!("using {version}");
    let s = TestServer::plain();
    let work = tempfile::tempdir().unwrap();
    let script = work.path().join("send.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(s.addr.port().to_string())
        .arg(work.path())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "smtplib failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "sent");

    let stored = s.stored();
    assert_eq!(stored.len(), 3, "three messages");
    let find = |needle: &[u8]| {
        let hits: Vec<_> = stored
            .iter()
            .map(|(_, b)| split_stored(b))
            .filter(|(_, body)| contains(body, needle))
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "one message containing {:?}",
            String::from_utf8_lossy(needle)
        );
        hits.into_iter().next().unwrap()
    };

    // 1. send_message, multipart: exactly the bytes smtplib flattened.
    let one = std::fs::read(work.path().join("one.eml")).unwrap();
    let (trace, body) = find(b"==py-boundary==");
    assert_eq!(
        body,
        one,
        "stored:\n{}\nsent:\n{}",
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&one)
    );
    assert!(
        trace.starts_with(
            "Return-Path: <sender@x.test>\r\nX-Original-To: b@y.test\r\n\
             Received: from py.test ([127.0.0.1]) by mx.test with ESMTP\r\n"
        ),
        "{trace}"
    );
    // Independent of Python's generator: the 8-bit body and the dot line survived.
    assert!(
        contains(&body, "\r\n\r\nHallo Welt, grüße!\r\n".as_bytes()),
        "8-bit text"
    );
    assert!(contains(&body, b"\r\n.a line that starts with a dot\r\n"));
    assert!(contains(&body, b"Content-Transfer-Encoding: 8bit\r\n"));

    // 2. sendmail to two recipients: LF fixed to CRLF by smtplib, dot unstuffed by us.
    let (trace, body) = find(b"Subject: two\r\n");
    assert_eq!(body, b"Subject: two\r\n\r\n.leading dot\r\nline\r\n");
    assert!(
        trace.starts_with(
            "Return-Path: <a@x.test>\r\nX-Original-To: b@y.test\r\nX-Original-To: c@y.test\r\n\
             Received: from py.test ([127.0.0.1]) by mx.test with ESMTP\r\n"
        ),
        "{trace}"
    );

    // 3. SMTPUTF8: UTF-8 headers as sent, and the protocol is UTF8SMTP (RFC 6531).
    let three = std::fs::read(work.path().join("three.eml")).unwrap();
    let (trace, body) = find("Inhalt: äöü".as_bytes());
    assert_eq!(body, three);
    assert!(contains(&body, "Subject: ünïcödé\r\n".as_bytes()));
    assert!(
        trace.starts_with(
            "Return-Path: <jörg@x.test>\r\nX-Original-To: b@y.test\r\n\
             Received: from py.test ([127.0.0.1]) by mx.test with UTF8SMTP\r\n"
        ),
        "{trace}"
    );
}
