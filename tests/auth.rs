//! SMTP AUTH (issue 5, RFC 4954, SPEC 3–4): PLAIN and LOGIN over STARTTLS with a real
//! rustls client, every reply code, plaintext refusal, require_tls, relay policy, the
//! Received protocol (ESMTPA/ESMTPSA) with the user, max_errors, `mailer hash-password`,
//! config errors, and no credentials in the log (even at trace level).
mod common;
use common::process::{run, run_refused_config, ChildServer};
use common::*;

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::sync::OnceLock;

const USER: &str = "alice";
const PASSWORD: &str = "correct horse battery";
const BODY: &[u8] = b"Subject: auth\r\n\r\nsubmitted\r\n.\r\n";

const OK: &str = "235 2.7.0 Authentication successful\r\n";
const BAD: &str = "535 5.7.8 Authentication credentials invalid\r\n";
const CANCELLED: &str = "501 5.7.0 Authentication aborted\r\n";
const UNDECODABLE: &str = "501 5.5.2 Cannot decode response\r\n";
const NEED_TLS: &str = "538 5.7.11 Encryption required for requested authentication mechanism\r\n";
const USERNAME_CHALLENGE: &str = "334 VXNlcm5hbWU6\r\n";
const PASSWORD_CHALLENGE: &str = "334 UGFzc3dvcmQ6\r\n";

/// One argon2id hash of PASSWORD for the whole file (argon2 is slow in debug builds).
fn alice_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| mailer::auth::hash_password(PASSWORD.as_bytes()).unwrap())
}

fn b64(s: &str) -> String {
    B64.encode(s)
}

/// `\0user\0password` in base64 (RFC 4616).
fn plain(user: &str, password: &str) -> String {
    B64.encode(format!("\0{user}\0{password}"))
}

/// `[auth]` with alice (a TOML literal string keeps the `$`s as they are), then `extra`.
fn auth_toml(allow_plaintext: bool, extra: &str) -> String {
    format!(
        "[auth]\nallow_plaintext = {allow_plaintext}\n\
         users = [{{ name = \"{USER}\", password_hash = '{}' }}]\n{extra}\n",
        alice_hash()
    )
}

const POLICY: &str = "[policy]\naccept_domains = [\"y.test\"]\n";

/// STARTTLS + `[auth]` (TLS only) + the relay policy, and `extra` TOML.
fn tls_server(extra: &str) -> TestServer {
    TestServer::start(Opts {
        tls: true,
        toml: auth_toml(false, &format!("{POLICY}{extra}")),
        ..Opts::default()
    })
}

/// Connected, upgraded with STARTTLS, EHLO said again; returns the client and the
/// post-TLS EHLO reply.
fn secure(s: &TestServer) -> (Client, String) {
    let mut c = s.ehlo();
    c.ok("STARTTLS", 220);
    c.upgrade(s.tls_client_config());
    let ehlo = c.ok("EHLO client.test", 250);
    (c, ehlo)
}

fn stored_trace(s: &TestServer) -> String {
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    let (trace, body) = split_stored(&stored[0].1);
    assert_eq!(body, b"Subject: auth\r\n\r\nsubmitted\r\n");
    trace
}

#[test]
fn plain_with_initial_response_lets_the_user_relay_and_is_recorded_as_esmtpsa() {
    let s = tls_server("");
    let (mut c, ehlo) = secure(&s);
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN\r\n"), "{ehlo}");
    // Unauthenticated: only the accepted domain.
    c.ok("MAIL FROM:<alice@x.test>", 250);
    assert_eq!(
        c.cmd("RCPT TO:<bob@other.test>"),
        "550 5.7.1 <bob@other.test>: Relay access denied\r\n"
    );
    c.ok("RCPT TO:<bob@y.test>", 250);
    c.ok("RSET", 250);

    assert_eq!(c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))), OK);
    let reply = c.transaction("alice@x.test", &["bob@other.test"], BODY);
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
    c.ok("QUIT", 221);
    let trace = stored_trace(&s);
    assert!(
        trace.contains(" by mx.test with ESMTPSA (authenticated as alice)\r\n"),
        "{trace}"
    );
}

#[test]
fn plain_with_an_empty_challenge() {
    let s = tls_server("");
    let (mut c, _) = secure(&s);
    // RFC 4954 §4: no initial response, the server sends an empty challenge.
    assert_eq!(c.cmd("AUTH PLAIN"), "334 \r\n");
    assert_eq!(c.cmd(&plain(USER, PASSWORD)), OK);
    // The authzid may name the same user (RFC 4616 §2).
    let mut c2 = secure(&s).0;
    let with_authz = B64.encode(format!("{USER}\0{USER}\0{PASSWORD}"));
    assert_eq!(c2.cmd(&format!("AUTH PLAIN {with_authz}")), OK);
}

#[test]
fn login_with_the_two_challenges() {
    let s = tls_server("");
    let (mut c, _) = secure(&s);
    assert_eq!(c.cmd("AUTH LOGIN"), USERNAME_CHALLENGE);
    assert_eq!(c.cmd(&b64(USER)), PASSWORD_CHALLENGE);
    assert_eq!(c.cmd(&b64(PASSWORD)), OK);
    let reply = c.transaction("alice@x.test", &["bob@other.test"], BODY);
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
    assert!(stored_trace(&s).contains(" with ESMTPSA (authenticated as alice)\r\n"));

    // The user name as an initial response: straight to the password challenge.
    let (mut c, _) = secure(&s);
    assert_eq!(
        c.cmd(&format!("AUTH LOGIN {}", b64(USER))),
        PASSWORD_CHALLENGE
    );
    assert_eq!(c.cmd(&b64(PASSWORD)), OK);
}

#[test]
fn cancel_bad_credentials_unknown_mechanism_and_bad_base64() {
    let s = tls_server("[limits]\nmax_errors = 50\n");
    let (mut c, _) = secure(&s);
    // `*` cancels at every step (RFC 4954 §4).
    assert_eq!(c.cmd("AUTH PLAIN"), "334 \r\n");
    assert_eq!(c.cmd("*"), CANCELLED);
    assert_eq!(c.cmd("AUTH LOGIN"), USERNAME_CHALLENGE);
    assert_eq!(c.cmd("*"), CANCELLED);
    assert_eq!(c.cmd("AUTH LOGIN"), USERNAME_CHALLENGE);
    assert_eq!(c.cmd(&b64(USER)), PASSWORD_CHALLENGE);
    assert_eq!(c.cmd("*"), CANCELLED);
    // Wrong password, unknown user: the same 535.
    assert_eq!(c.cmd(&format!("AUTH PLAIN {}", plain(USER, "wrong"))), BAD);
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain("mallory", PASSWORD))),
        BAD
    );
    assert_eq!(c.cmd("AUTH LOGIN"), USERNAME_CHALLENGE);
    assert_eq!(c.cmd(&b64("mallory")), PASSWORD_CHALLENGE);
    assert_eq!(c.cmd(&b64(PASSWORD)), BAD);
    // Acting for another identity is not supported.
    let other_authz = B64.encode(format!("bob\0{USER}\0{PASSWORD}"));
    assert_eq!(c.cmd(&format!("AUTH PLAIN {other_authz}")), BAD);
    // Unknown mechanisms.
    for m in ["CRAM-MD5", "XOAUTH2 dG9rZW4=", "GSSAPI"] {
        assert_eq!(
            c.cmd(&format!("AUTH {m}")),
            "504 5.5.4 Unsupported authentication mechanism\r\n"
        );
    }
    // Not base64, or base64 of the wrong shape.
    assert_eq!(c.cmd("AUTH PLAIN !!!notbase64"), UNDECODABLE);
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", b64("no NULs here"))),
        UNDECODABLE
    );
    assert_eq!(c.cmd("AUTH PLAIN"), "334 \r\n");
    assert_eq!(c.cmd("%%%"), UNDECODABLE);
    assert_eq!(c.cmd("AUTH LOGIN"), USERNAME_CHALLENGE);
    assert_eq!(c.cmd("not base64!"), UNDECODABLE);
    // Nothing of that authenticated anybody: relaying is still refused…
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@other.test>", 550);
    c.ok("RSET", 250);
    // …and a good AUTH still works on the same connection.
    assert_eq!(c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))), OK);
}

#[test]
fn auth_twice_and_auth_inside_a_transaction_are_out_of_sequence() {
    let s = tls_server("");
    let (mut c, _) = secure(&s);
    assert_eq!(c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))), OK);
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))),
        "503 5.5.1 Error: already authenticated\r\n"
    );
    assert_eq!(
        c.cmd("AUTH LOGIN"),
        "503 5.5.1 Error: already authenticated\r\n"
    );

    let (mut c, _) = secure(&s);
    c.ok("MAIL FROM:<a@x.test>", 250);
    // RFC 4954 §4: not permitted during a mail transaction.
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))),
        "503 5.5.1 Error: MAIL transaction in progress\r\n"
    );
    c.ok("RSET", 250);
    assert_eq!(c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))), OK);
}

#[test]
fn auth_is_refused_and_not_offered_without_tls() {
    let s = tls_server("");
    let mut c = s.connect();
    let ehlo = c.ok("EHLO client.test", 250);
    assert!(!ehlo.contains("AUTH"), "not offered before TLS: {ehlo}");
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))),
        NEED_TLS
    );
    assert_eq!(c.cmd("AUTH LOGIN"), NEED_TLS);
    // Refused AUTH authenticated nobody.
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@other.test>", 550);
    c.ok("RSET", 250);
    c.ok("STARTTLS", 220);
    c.upgrade(s.tls_client_config());
    let ehlo = c.ok("EHLO client.test", 250);
    assert!(
        ehlo.contains("250-AUTH PLAIN LOGIN\r\n"),
        "offered inside TLS: {ehlo}"
    );
    assert_eq!(c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))), OK);

    // No [tls] at all: never offered, always 538.
    let s = TestServer::with_toml(&auth_toml(false, ""));
    let mut c = s.connect();
    assert!(!c.ok("EHLO client.test", 250).contains("AUTH"));
    assert_eq!(c.cmd("AUTH LOGIN"), NEED_TLS);
}

#[test]
fn require_tls_refuses_auth_before_tls_with_530() {
    let s = TestServer::start(Opts {
        tls: true,
        tls_extra: "require_tls = true".into(),
        toml: auth_toml(true, ""),
        ..Opts::default()
    });
    let mut c = s.ehlo();
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))),
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    c.ok("STARTTLS", 220);
    c.upgrade(s.tls_client_config());
    c.ok("EHLO client.test", 250);
    assert_eq!(c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))), OK);
}

#[test]
fn plaintext_auth_when_allowed_is_recorded_as_esmtpa() {
    let s = TestServer::with_toml(&auth_toml(true, POLICY));
    let mut c = s.connect();
    let ehlo = c.ok("EHLO client.test", 250);
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN\r\n"), "{ehlo}");
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@other.test>", 550);
    c.ok("RSET", 250);
    assert_eq!(c.cmd("AUTH LOGIN"), USERNAME_CHALLENGE);
    assert_eq!(c.cmd(&b64(USER)), PASSWORD_CHALLENGE);
    assert_eq!(c.cmd(&b64(PASSWORD)), OK);
    let reply = c.transaction("alice@x.test", &["bob@other.test"], BODY);
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
    let trace = stored_trace(&s);
    assert!(
        trace.contains(" by mx.test with ESMTPA (authenticated as alice)\r\n"),
        "{trace}"
    );
}

#[test]
fn authentication_is_not_carried_across_starttls() {
    let s = TestServer::start(Opts {
        tls: true,
        toml: auth_toml(true, POLICY),
        ..Opts::default()
    });
    let mut c = s.ehlo();
    assert_eq!(c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))), OK);
    c.ok("STARTTLS", 220);
    c.upgrade(s.tls_client_config());
    c.ok("EHLO client.test", 250);
    // RFC 3207 §4.2 / SPEC invariant 3: the plaintext AUTH is forgotten.
    c.ok("MAIL FROM:<a@x.test>", 250);
    assert_eq!(
        c.cmd("RCPT TO:<b@other.test>"),
        "550 5.7.1 <b@other.test>: Relay access denied\r\n"
    );
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(BODY);
    assert!(c.reply().1.starts_with("250 2.0.0 "));
    let trace = stored_trace(&s);
    assert!(trace.contains(" by mx.test with ESMTPS\r\n"), "{trace}");
    assert!(!trace.contains("authenticated"), "{trace}");
    // And AUTH is possible again (not "already authenticated").
    assert_eq!(c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))), OK);
}

#[test]
fn failed_auth_counts_toward_max_errors() {
    let s = tls_server("[limits]\nmax_errors = 3\n");
    let (mut c, _) = secure(&s);
    assert_eq!(c.cmd(&format!("AUTH PLAIN {}", plain(USER, "guess1"))), BAD);
    assert_eq!(c.cmd("AUTH PLAIN"), "334 \r\n");
    assert_eq!(c.cmd("*"), CANCELLED);
    c.send(&format!("AUTH PLAIN {}", plain(USER, "guess2")));
    assert_eq!(c.reply().1, BAD);
    assert_eq!(c.reply().1, "421 4.7.0 mx.test Error: too many errors\r\n");
    assert!(c.is_closed());
}

#[test]
fn without_an_auth_section_auth_is_not_offered() {
    let s = TestServer::plain();
    let mut c = s.connect();
    assert!(!c.ok("EHLO client.test", 250).contains("AUTH"));
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))),
        "503 5.5.1 Error: authentication not enabled\r\n"
    );
}

// ---------------------------------------------------------------------------------
// Through the binary

#[test]
fn hash_password_prints_an_argon2id_phc_string_that_verifies_and_logs_in() {
    let out = run(&["hash-password"], format!("{PASSWORD}\n").as_bytes());
    assert!(out.status.success(), "{}", out.stderr);
    let phc = out.stdout.strip_suffix('\n').expect("one line");
    assert!(!phc.contains('\n'), "{phc:?}");
    assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
    let parsed = PasswordHash::new(phc).unwrap();
    // The newline ended the input; it is not part of the password.
    assert!(Argon2::default()
        .verify_password(PASSWORD.as_bytes(), &parsed)
        .is_ok());
    assert!(Argon2::default()
        .verify_password(format!("{PASSWORD}\n").as_bytes(), &parsed)
        .is_err());
    // The printed hash is usable in `[auth]` as it is.
    let s = TestServer::start(Opts {
        tls: true,
        toml: format!("[auth]\nusers = [{{ name = \"carol\", password_hash = '{phc}' }}]\n"),
        ..Opts::default()
    });
    let (mut c, _) = secure(&s);
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain("carol", PASSWORD))),
        OK
    );

    for empty in [&b""[..], b"\n", b"\r\n"] {
        let out = run(&["hash-password"], empty);
        assert!(!out.status.success(), "{empty:?}: {}", out.stdout);
        assert!(out.stdout.is_empty(), "{empty:?}: {}", out.stdout);
        assert!(out.stderr.contains("empty password"), "{}", out.stderr);
    }
}

#[test]
fn a_user_with_a_bad_hash_is_a_config_error_naming_the_user() {
    let dir = tempfile::tempdir().unwrap();
    for (i, hash) in [
        "hunter2",
        "$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
    ]
    .into_iter()
    .enumerate()
    {
        let config = dir.path().join(format!("config-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "hostname = \"mx.test\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n\
                 [spool]\ndir = {:?}\n\
                 [auth]\nusers = [{{ name = \"{USER}\", password_hash = '{}' }}, \
                 {{ name = \"bob\", password_hash = '{hash}' }}]\n",
                dir.path().join("spool").display().to_string(),
                alice_hash()
            ),
        )
        .unwrap();
        for (args, out) in run_refused_config(config.to_str().unwrap()) {
            assert_eq!(out.status.code(), Some(2), "{args}: {}", out.stderr);
            assert!(out.stderr.contains("\"bob\""), "{args}: {}", out.stderr);
            assert!(out.stderr.contains("password_hash"), "{}", out.stderr);
            assert!(!out.stderr.contains(alice_hash()), "{}", out.stderr);
        }
    }
}

#[test]
fn credentials_never_appear_in_the_log_even_at_trace_level() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "server");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"mx.test\"\n[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\
             stats_interval_secs = 0\n\
             [tls]\ncert = {:?}\nkey = {:?}\n[spool]\ndir = {:?}\n{}",
            cert.cert.display().to_string(),
            cert.key.display().to_string(),
            dir.path().join("spool").display().to_string(),
            auth_toml(true, POLICY)
        ),
    )
    .unwrap();
    let mut server = ChildServer::start(&config, &[("RUST_LOG", "trace")]);
    let addr = server.listen_addrs(1)[0];
    let wrong = "Tr0ub4dor&3";
    let greet = |tls: bool| {
        let mut c = Client::connect(addr);
        assert_eq!(c.reply().0, 220);
        c.ok("EHLO client.test", 250);
        if tls {
            c.ok("STARTTLS", 220);
            c.upgrade(client_config(&cert.der));
            c.ok("EHLO client.test", 250);
        }
        c
    };
    for tls in [true, false] {
        // PLAIN with an initial response, then a message.
        let mut c = greet(tls);
        assert_eq!(c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))), OK);
        let reply = c.transaction("alice@x.test", &["bob@other.test"], BODY);
        assert!(reply.starts_with("250 2.0.0 "), "{reply}");
        c.ok("QUIT", 221);
        // LOGIN, with a wrong password first, and PLAIN after an empty challenge.
        let mut c = greet(tls);
        assert_eq!(c.cmd("AUTH LOGIN"), USERNAME_CHALLENGE);
        assert_eq!(c.cmd(&b64(USER)), PASSWORD_CHALLENGE);
        assert_eq!(c.cmd(&b64(wrong)), BAD);
        assert_eq!(c.cmd("AUTH LOGIN"), USERNAME_CHALLENGE);
        assert_eq!(c.cmd(&b64(USER)), PASSWORD_CHALLENGE);
        assert_eq!(c.cmd(&b64(PASSWORD)), OK);
        c.ok("QUIT", 221);
        let mut c = greet(tls);
        assert_eq!(c.cmd("AUTH PLAIN"), "334 \r\n");
        assert_eq!(c.cmd(&plain(USER, wrong)), BAD);
        // A password typed where the user name goes.
        assert_eq!(c.cmd("AUTH LOGIN"), USERNAME_CHALLENGE);
        assert_eq!(c.cmd(&b64(PASSWORD)), PASSWORD_CHALLENGE);
        assert_eq!(c.cmd(&b64(wrong)), BAD);
        c.ok("QUIT", 221);
    }
    server.wait_log("authenticated as \"alice\"", 4);
    let (status, log) = server.stop();
    assert!(status.success(), "{status}");
    assert!(log.contains(" TRACE "), "trace logging is on");
    for secret in [
        PASSWORD.to_string(),
        wrong.to_string(),
        plain(USER, PASSWORD),
        plain(USER, wrong),
        b64(USER),
        b64(PASSWORD),
        b64(wrong),
        // Also the raw bytes in any escaped form a log line might use.
        format!("\\0{USER}\\0"),
        format!("\\u{{0}}{USER}"),
    ] {
        assert!(!log.contains(&secret), "{secret:?} is in the log:\n{log}");
    }
    // The user name itself is recorded (SPEC: the log names the authenticated user).
    assert_eq!(log.matches("authenticated as \"alice\"").count(), 4);
    // Each failure names the client address, for fail2ban (three per round).
    assert_eq!(log.matches("client 127.0.0.1: auth failed").count(), 6);
}

#[test]
fn auth_needs_ehlo_first() {
    let s = TestServer::with_toml(&auth_toml(true, ""));
    let mut c = s.connect();
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))),
        "503 5.5.1 Error: send EHLO first\r\n"
    );
    // HELO does not open ESMTP extensions such as AUTH (RFC 4954 §3).
    c.ok("HELO client.test", 250);
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))),
        "503 5.5.1 Error: send EHLO first\r\n"
    );
    c.ok("EHLO client.test", 250);
    assert_eq!(c.cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD))), OK);
}
