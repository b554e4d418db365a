//! Edges an attacker or a careless configuration could bend (issue 13; SPEC 4
//! invariants 11 and 12, the duplicate-parameter row of section 4, section 5).
//!
//! - trace headers: a 990-octet HELO name, a UTF-8 HELO name in a message without
//!   SMTPUTF8 (stored bytes checked exactly);
//! - addresses with C0/C1 controls or bidi characters: `553 5.1.3`;
//! - Python smtplib's repeated MAIL parameters (identical: accepted; different: 501);
//! - configuration bounds: `check-config`, the server's start and the library builder
//!   refuse the same values, naming key and line; `check-config | head -1` does not
//!   panic;
//! - the log escapes what the client sent.
mod common;
use common::process::{run_refused_config, ChildServer, BIN};
use common::*;
use mailer::server::ServerError;
use mailer::{Config, Server};
use std::path::Path;
use std::process::{Command, Stdio};

/// The stored file split at the end of the trace block: the Received header is the
/// last trace field and its last line is the `id … ; date` line.
fn split_trace(file: &[u8]) -> (String, Vec<u8>) {
    let text = String::from_utf8_lossy(file);
    let start = text.find("\r\nReceived: ").expect("Received header");
    let id_line = text[start..].find("\r\n        id ").expect("id line") + start;
    let end = text[id_line + 2..].find("\r\n").expect("end of id line") + id_line + 4;
    (text[..end].to_string(), file[end..].to_vec())
}

/// The trace block without the date (which is the time of the test run).
fn without_date(trace: &str) -> String {
    let semi = trace.rfind(" ; ").expect("date");
    format!("{}\r\n", &trace[..semi])
}

fn only_message(s: &TestServer) -> Vec<u8> {
    let stored = s.stored();
    assert_eq!(stored.len(), 1, "one stored message");
    stored.into_iter().next().unwrap().1
}

/// Invariant 11: a 990-octet HELO name (the longest that fits a 1000-octet command
/// line) is cut to 255 octets ending in `...`, the Received header is folded before
/// `by`, and every stored line is at most 998 octets plus CRLF.
#[test]
fn long_helo_is_cut_and_every_stored_line_fits_998_octets() {
    let s = TestServer::plain();
    let mut c = s.connect();
    let helo = format!("{}.test", "h".repeat(985));
    assert_eq!(helo.len(), 990);
    let line = format!("EHLO {helo}\r\n");
    assert_eq!(
        line.len(),
        997,
        "within the default max_line_length of 1000"
    );
    c.ok(&format!("EHLO {helo}"), 250);
    let reply = c.transaction(
        "a@x.test",
        &["b@y.test"],
        b"Subject: t\r\n\r\nbody\r\n.\r\n",
    );
    let id = queue_id(&reply);
    assert_eq!(reply, format!("250 2.0.0 Ok: queued as {id}\r\n"));
    let file = only_message(&s);
    let (trace, body) = split_trace(&file);
    assert_eq!(
        without_date(&trace),
        format!(
            "Return-Path: <a@x.test>\r\nX-Original-To: b@y.test\r\n\
             Received: from {}... ([127.0.0.1])\r\n        by mx.test with ESMTP\r\n        \
             id {id}\r\n",
            &helo[..252]
        )
    );
    assert_eq!(body, b"Subject: t\r\n\r\nbody\r\n");
    for l in file.split(|&b| b == b'\n') {
        assert!(l.len() <= 999, "a stored line of {} octets (+LF)", l.len());
    }
    // Postfix-style: a name this long was never a host name; what is kept is enough to
    // recognise it in the log and the header.
    assert!(trace.len() < 600, "{trace}");
}

/// Invariant 11: a UTF-8 HELO name in a message sent without SMTPUTF8 leaves the trace
/// headers pure ASCII (each octet as `\xNN`); with SMTPUTF8 the name stays readable.
/// Bidi and control characters are escaped in both.
#[test]
fn utf8_helo_leaves_trace_headers_ascii_without_smtputf8() {
    let s = TestServer::plain();
    let mut c = s.connect();
    c.ok("EHLO bücher\u{202e}.test", 250);
    let r1 = c.transaction("a@x.test", &["b@y.test"], b"Subject: 1\r\n\r\nx\r\n.\r\n");
    c.ok("MAIL FROM:<a@x.test> SMTPUTF8", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(b"Subject: 2\r\n\r\nx\r\n.\r\n");
    let r2 = c.reply().1;
    c.ok("QUIT", 221);
    let stored = s.stored();
    assert_eq!(stored.len(), 2);
    let by_id = |reply: &str| {
        let id = queue_id(reply);
        let (_, f) = stored
            .iter()
            .find(|(_, f)| String::from_utf8_lossy(f).contains(&format!(" id {id} ; ")))
            .expect("message with that id");
        (id, split_trace(f).0)
    };
    let (id1, t1) = by_id(&r1);
    assert!(t1.is_ascii(), "{t1}");
    assert_eq!(
        without_date(&t1),
        format!(
            "Return-Path: <a@x.test>\r\nX-Original-To: b@y.test\r\n\
             Received: from b\\xc3\\xbccher\\xe2\\x80\\xae.test ([127.0.0.1]) by mx.test with ESMTP\r\n        \
             id {id1}\r\n"
        )
    );
    let (id2, t2) = by_id(&r2);
    assert_eq!(
        without_date(&t2),
        format!(
            "Return-Path: <a@x.test>\r\nX-Original-To: b@y.test\r\n\
             Received: from bücher\\xe2\\x80\\xae.test ([127.0.0.1]) by mx.test with UTF8SMTP\r\n        \
             id {id2}\r\n"
        )
    );
}

/// Invariant 11: C0 and C1 controls and bidi marks, overrides and isolates in a MAIL or
/// RCPT address are refused `553 5.1.3`, with SMTPUTF8 or without, and the session goes
/// on (the next good address is accepted).
#[test]
fn control_and_bidi_characters_in_addresses_get_553() {
    // Each refusal counts as an error (RFC 5321 §4.2.5); allow all of them here.
    let s = TestServer::with_toml("[limits]\nmax_errors = 100\n");
    let mut c = s.ehlo();
    let control = "553 5.1.3 Bad address: control character in address\r\n";
    let bidi =
        "553 5.1.3 Bad address: bidirectional or invisible formatting character in address\r\n";
    for (addr, reply) in [
        ("a\u{1}b@x.test", control),
        ("a\tb@x.test", control),
        ("\"a\u{7f}b\"@x.test", control),
        ("a\u{9b}31m@x.test", control),
        ("a@x\u{85}.test", control),
        ("evil\u{202e}fdp.exe@x.test", bidi),
        ("a\u{202a}b@x.test", bidi),
        ("a@\u{2066}x.test", bidi),
        ("a\u{2069}@x.test", bidi),
        ("a\u{200e}@x.test", bidi),
        ("a\u{200f}@x.test", bidi),
    ] {
        assert_eq!(c.cmd(&format!("MAIL FROM:<{addr}>")), reply, "{addr:?}");
        assert_eq!(
            c.cmd(&format!("MAIL FROM:<{addr}> SMTPUTF8")),
            reply,
            "{addr:?} with SMTPUTF8"
        );
    }
    c.ok("MAIL FROM:<a@x.test> SMTPUTF8", 250);
    for (addr, reply) in [
        ("b\u{9b}@y.test", control),
        ("b@y.test\u{1}", control),
        ("\u{202e}b@y.test", bidi),
        ("@r\u{2067}.test:b@y.test", bidi),
    ] {
        assert_eq!(c.cmd(&format!("RCPT TO:<{addr}>")), reply, "{addr:?}");
    }
    c.ok("RCPT TO:<jörg@y.test>", 250);
    c.ok("QUIT", 221);
}

const SMTPLIB_SCRIPT: &str = r#"
import io, sys, smtplib
from email.message import EmailMessage
from email.generator import BytesGenerator

port, out = int(sys.argv[1]), sys.argv[2]
m = EmailMessage()
m['From'] = 'jörg@x.test'
m['To'] = 'b@y.test'
m['Subject'] = 'dup'
m.set_content('Grüße\n')
buf = io.BytesIO()
BytesGenerator(buf, policy=m.policy.clone(utf8=True)).flatten(m, linesep='\r\n')
open(out + '/dup.eml', 'wb').write(buf.getvalue())
with smtplib.SMTP('127.0.0.1', port, local_hostname='py.test', timeout=20) as s:
    # smtplib adds SMTPUTF8 and BODY=8BITMIME itself for a UTF-8 address, after
    # mail_options: each parameter goes out twice.
    assert s.send_message(m, mail_options=['SMTPUTF8', 'BODY=8BITMIME']) == {}
    code, text = s.mail('a@x.test', ['BODY=7BIT', 'BODY=8BITMIME'])
    print(code, text.decode())
    s.rset()
    code, text = s.mail('a@x.test', ['SIZE=10', 'SIZE=10', 'BODY=7BIT', 'BODY=7BIT'])
    print(code, text.decode())
print('sent')
"#;

/// SPEC 4: Python's `smtplib.send_message(..., mail_options=["SMTPUTF8",
/// "BODY=8BITMIME"])` sends both parameters twice; identical repeats are accepted (as
/// Postfix does), different values get 501 5.5.4. The message is stored byte-exact.
#[test]
fn smtplib_repeated_mail_parameters_are_accepted() {
    match Command::new("python3").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => {
            eprintln!("skipped: python3 is not installed (needed to run smtplib)");
            return;
        }
    }
    let s = TestServer::plain();
    let work = tempfile::tempdir().unwrap();
    let script = work.path().join("dup.py");
    std::fs::write(&script, SMTPLIB_SCRIPT).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(s.addr.port().to_string())
        .arg(work.path())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "smtplib failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        "501 5.5.4 Syntax: conflicting values for parameter BODY\n\
         250 2.1.0 Ok\n\
         sent\n"
    );
    let sent = std::fs::read(work.path().join("dup.eml")).unwrap();
    let (trace, body) = split_trace(&only_message(&s));
    assert_eq!(body, sent);
    assert!(
        trace.starts_with(
            "Return-Path: <jörg@x.test>\r\nX-Original-To: b@y.test\r\n\
             Received: from py.test ([127.0.0.1]) by mx.test with UTF8SMTP\r\n"
        ),
        "{trace}"
    );
}

/// The same repeats over a raw connection, with the exact replies.
#[test]
fn repeated_parameters_over_the_wire() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    assert_eq!(
        c.cmd("MAIL FROM:<a@x.test> SIZE=10 SIZE=11"),
        "501 5.5.4 Syntax: conflicting values for parameter SIZE\r\n"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<a@x.test> AUTH=<> AUTH=a+2Bb"),
        "501 5.5.4 Syntax: conflicting values for parameter AUTH\r\n"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<a@x.test> SMTPUTF8 smtputf8 BODY=8BITMIME body=8bitmime SIZE=5 SIZE=5"),
        "250 2.1.0 Ok\r\n"
    );
}

/// Config lines over their bounds: (TOML line inside its table, table, dotted key).
const OVER_BOUNDS: &[(&str, &str, &str)] = &[
    (
        "command_timeout_secs = 9223372036854775807",
        "limits",
        "limits.command_timeout_secs",
    ),
    (
        "data_timeout_secs = 86401",
        "limits",
        "limits.data_timeout_secs",
    ),
    (
        "max_message_size = 4294967297",
        "limits",
        "limits.max_message_size",
    ),
    ("max_recipients = 100001", "limits", "limits.max_recipients"),
    (
        "max_line_length = 65537",
        "limits",
        "limits.max_line_length",
    ),
    ("max_line_length = 100", "limits", "limits.max_line_length"),
    (
        "min_data_rate = 1073741825",
        "limits",
        "limits.min_data_rate",
    ),
    ("workers = 10001", "server", "server.workers"),
    (
        "max_connections_per_ip = 0",
        "server",
        "server.max_connections_per_ip",
    ),
    (
        "shutdown_grace_secs = 3601",
        "server",
        "server.shutdown_grace_secs",
    ),
    (
        "stats_interval_secs = 86401",
        "server",
        "server.stats_interval_secs",
    ),
];

/// A config with `line` in `[table]` (`server` or `limits`), on line 5 of the file.
fn bounded_config(dir: &Path, spool: &Path, table: &str, line: &str) -> String {
    let port = common::process::free_port();
    let line4 = if table == "server" {
        "proxy_protocol = false"
    } else {
        "[limits]"
    };
    let text = format!(
        "hostname = \"mx.test\"\n\
         [server]\n\
         listen = [\"127.0.0.1:{port}\"]\n\
         {line4}\n\
         {line}\n\
         [spool]\n\
         dir = {:?}\n",
        spool.display().to_string()
    );
    let path = dir.join(format!("{table}.toml"));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Invariant 12: each value over (or under) its bound is an exit-2 configuration
/// error from `check-config` and from the server's start, naming the file, line 5 and
/// the key; and `ServerBuilder::build` refuses the same value with the same key.
#[test]
fn config_bounds_are_enforced_by_check_config_startup_and_builder() {
    let d = tempfile::tempdir().unwrap();
    let spool = d.path().join("spool");
    for &(line, table, key) in OVER_BOUNDS {
        let cfg = bounded_config(d.path(), &spool, table, line);
        for (cmd, out) in run_refused_config(&cfg) {
            assert_eq!(out.status.code(), Some(2), "{cmd} with {line}: {out:?}");
            let want = format!("mailer: {cfg}:5: key `{key}`: must be ");
            assert!(
                out.stderr.starts_with(&want),
                "{cmd} with {line}: {}",
                out.stderr
            );
            assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        }
        // The builder, from the same text parsed without validation (as an embedder
        // building a Config in code would have it).
        let text = std::fs::read_to_string(&cfg).unwrap();
        let parsed: Config = toml::from_str(&text).expect("parses as TOML");
        match Server::builder(parsed).build() {
            Err(e @ ServerError::Config { .. }) => {
                assert!(e.is_config());
                assert!(
                    e.to_string().starts_with(&format!("key `{key}`: must be ")),
                    "{e}"
                );
            }
            Err(e) => panic!("{line}: wrong error {e}"),
            Ok(_) => panic!("{line}: the builder accepted it"),
        }
    }
    assert!(!spool.exists(), "nothing was created");
}

/// The exact message for the value from the issue, and the builder's refusal of a
/// listen address that is not one (it used to be dropped silently: no listener).
#[test]
fn huge_timeout_message_and_bad_listen_address_in_the_builder() {
    let d = tempfile::tempdir().unwrap();
    let cfg = bounded_config(
        d.path(),
        &d.path().join("spool"),
        "limits",
        "command_timeout_secs = 9223372036854775807",
    );
    let out = common::process::run(&["check-config", "--config", &cfg], b"");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        out.stderr,
        format!(
            "mailer: {cfg}:5: key `limits.command_timeout_secs`: must be at most 86400 (1 day), \
             not 9223372036854775807\n"
        )
    );
    assert_eq!(out.stdout, "");

    let mut c = Config::default();
    c.spool.dir = d.path().join("spool");
    c.server.listen = vec!["127.0.0.1:0".into(), "localhost:25".into()];
    let e = Server::builder(c.clone()).build().err().expect("refused");
    assert!(e.is_config(), "{e}");
    assert!(
        e.to_string()
            .starts_with("key `server.listen`: \"localhost:25\" is not"),
        "{e}"
    );
    // A spool path check-config calls fatal is refused by the builder too.
    let file = d.path().join("file");
    std::fs::write(&file, b"").unwrap();
    c.server.listen = vec!["127.0.0.1:0".into()];
    c.spool.dir = file.join("spool");
    let e = Server::builder(c).build().err().expect("refused");
    assert!(matches!(e, ServerError::Spool { .. }), "{e}");
}

/// `mailer check-config | head -1`: the reader goes away before the settings are
/// printed. The write fails with EPIPE (Rust ignores SIGPIPE); that must not panic.
#[test]
fn check_config_into_a_closed_pipe_does_not_panic() {
    let d = tempfile::tempdir().unwrap();
    let spool = d.path().join("spool");
    let cfg = bounded_config(d.path(), &spool, "limits", "max_recipients = 7");
    // Deterministic: the read end is closed before the child starts.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(BIN)
        .args(["check-config", "--config", &cfg])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run mailer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // And through a shell, as an operator types it.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; '{BIN}' check-config --config '{cfg}' | head -1"
        ))
        .output()
        .expect("run bash");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("# {cfg}: OK\n")
    );
}

/// Invariant 11, the log: what a client sends is escaped in the log (here in a refused
/// parameter, echoed escaped in the reply and so in the refusal line), never raw.
#[test]
fn log_lines_escape_client_text() {
    let d = tempfile::tempdir().unwrap();
    let port = common::process::free_port();
    let cfg = common::process::write_config(d.path(), port, &d.path().join("spool"), "", "");
    let mut server = ChildServer::start(&cfg, &[]);
    let addr = server.ready(1)[0];
    let mut c = Client::connect(addr);
    assert_eq!(c.reply().0, 220);
    c.ok("EHLO client.test", 250);
    assert_eq!(
        c.cmd("MAIL FROM:<a@x.test> X=\u{9b}31m\u{202e}"),
        "501 5.5.4 Syntax: bad parameter X=\\u{009b}31m\\u{202e}\r\n"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<\u{202e}a@x.test>"),
        "553 5.1.3 Bad address: bidirectional or invisible formatting character in address\r\n"
    );
    c.ok("QUIT", 221);
    server.wait_log("553 5.1.3 Bad address", 1);
    let (_, log) = server.stop();
    assert!(
        log.contains("501 5.5.4 Syntax: bad parameter X=\\u{009b}31m\\u{202e}"),
        "{log}"
    );
    for raw in ['\u{9b}', '\u{202e}', '\u{1b}'] {
        assert!(!log.contains(raw), "raw {raw:?} in the log:\n{log}");
    }
}
