//! `mailer send` and TLS (SPEC 6, issue 17): `starttls: TRY` is opportunistic (a
//! certificate that fails verification does not stop the delivery, RFC 7435), only
//! `REQUIRE` with `tls_verify` turns it into an error, and `ca_file` may name the
//! server's own self-signed certificate, even one marked as a CA (what `openssl req
//! -x509` makes, as the repository's `certs/cert.pem`).
mod common;
use common::process::run;
use common::*;

use base64::Engine;
use mailer::client::{send, Job, Report, StartTls};
use std::path::{Path, PathBuf};
use std::time::Duration;

const MESSAGE: &[u8] = b"Subject: tls\r\n\r\nover TLS\r\n";

fn job(s: &TestServer, host: &str, mode: StartTls) -> Job {
    let mut j = Job::new(
        host.to_string(),
        Some("foo@bar.test".into()),
        vec!["a@x.test".into()],
        MESSAGE.to_vec(),
    );
    j.port = s.addr.port();
    j.helo = "client.test".into();
    j.connection_timeout = Duration::from_secs(5);
    j.starttls = mode;
    j
}

fn error_message(r: &Report) -> String {
    match r {
        Report::Error { message } => message.clone(),
        Report::Ok { .. } => panic!("expected an error report, got {}", r.to_json()),
    }
}

/// The repository's own certificate pair (openssl, `CA:TRUE`, for localhost and
/// 127.0.0.1).
fn repo_cert() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    (root.join("cert.pem"), root.join("key.pem"))
}

fn server_with_repo_cert() -> TestServer {
    let (cert, key) = repo_cert();
    TestServer::start(Opts {
        toml: format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
        ..Opts::default()
    })
}

#[test]
fn try_against_a_self_signed_server_delivers_encrypted() {
    let s = TestServer::start(Opts {
        tls: true,
        ..Opts::default()
    });
    let j = job(&s, "127.0.0.1", StartTls::Try);
    assert!(j.tls_verify, "the default verifies");
    let report = send(&j);
    assert!(report.all_ok(), "{}", report.to_json());
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    let (trace, body) = split_stored(&stored[0].1);
    assert_eq!(body, MESSAGE);
    assert!(trace.contains(" with ESMTPS\r\n"), "{trace}");
}

#[test]
fn try_logs_the_verification_failure_on_stderr() {
    let s = TestServer::start(Opts {
        tls: true,
        ..Opts::default()
    });
    let json = format!(
        r#"{{"host":"127.0.0.1","port":{},"helo":"client.test","connection_timeout":5,
            "starttls":"TRY","sender":"foo@bar.test","recipients":["a@x.test"],
            "message":"{}"}}"#,
        s.addr.port(),
        base64::engine::general_purpose::STANDARD.encode(MESSAGE)
    );
    let out = run(&["send", "-"], json.as_bytes());
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains(r#""status":"ok""#), "{}", out.stdout);
    assert!(
        out.stderr.contains("server certificate was not verified")
            && out.stderr.contains("UnknownIssuer")
            && out.stderr.contains("going on encrypted"),
        "{}",
        out.stderr
    );
    assert_eq!(s.stored().len(), 1);
}

#[test]
fn require_with_verification_fails_against_a_self_signed_server() {
    let s = TestServer::start(Opts {
        tls: true,
        ..Opts::default()
    });
    let msg = error_message(&send(&job(&s, "localhost", StartTls::Require)));
    assert_eq!(
        msg,
        "Error while deliver messages: TLS handshake failed: invalid peer certificate: UnknownIssuer"
    );
    assert!(s.stored().is_empty());
}

#[test]
fn ca_file_naming_the_servers_self_signed_ca_certificate_delivers_under_require() {
    let s = server_with_repo_cert();
    let (cert, _) = repo_cert();
    for host in ["127.0.0.1", "localhost"] {
        let mut j = job(&s, host, StartTls::Require);
        j.ca_file = Some(cert.clone());
        let report = send(&j);
        assert!(report.all_ok(), "{host}: {}", report.to_json());
    }
    assert_eq!(s.stored().len(), 2);
}

#[test]
fn ca_file_with_another_certificate_still_fails_under_require() {
    let s = server_with_repo_cert();
    let other = make_cert(s.dir.path(), "other");
    let mut j = job(&s, "localhost", StartTls::Require);
    j.ca_file = Some(other.cert);
    let msg = error_message(&send(&j));
    assert!(
        msg.starts_with(
            "Error while deliver messages: TLS handshake failed: invalid peer certificate: "
        ),
        "{msg}"
    );
    assert!(s.stored().is_empty());
}

/// The client ends its TLS session with close_notify (RFC 8446 §6.1), as the server
/// does (tests/pool.rs): a scripted rustls server reads to the end of the stream after
/// QUIT and gets a clean end, not the `UnexpectedEof` of a truncated session.
#[test]
fn the_client_ends_its_tls_session_with_close_notify() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::io::{BufRead, BufReader, Read, Write};

    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "scripted");
    let chain = vec![CertificateDer::from_pem_file(&cert.cert).unwrap()];
    let key = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();

    // The server's side of the dialogue; returns what the final read saw.
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let mut clear = BufReader::new(tcp);
        clear
            .get_mut()
            .write_all(b"220 scripted.test ESMTP\r\n")
            .unwrap();
        step(&mut clear, "EHLO", "250-scripted.test\r\n250 STARTTLS\r\n");
        step(&mut clear, "STARTTLS", "220 2.0.0 Ready to start TLS\r\n");
        let conn = rustls::ServerConnection::new(std::sync::Arc::new(cfg)).unwrap();
        let mut tls = BufReader::new(rustls::StreamOwned::new(conn, clear.into_inner()));
        step(&mut tls, "EHLO", "250 scripted.test\r\n");
        step(&mut tls, "MAIL FROM:<foo@bar.test>", "250 2.1.0 Ok\r\n");
        step(&mut tls, "RCPT TO:<a@x.test>", "250 2.1.5 Ok\r\n");
        step(&mut tls, "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n");
        loop {
            let mut line = String::new();
            assert!(tls.read_line(&mut line).unwrap() > 0, "the message ends");
            if line == ".\r\n" {
                break;
            }
        }
        tls.get_mut()
            .write_all(b"250 2.0.0 Ok: queued as X1\r\n")
            .unwrap();
        step(&mut tls, "QUIT", "221 2.0.0 Bye\r\n");
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest).map(|_| rest)
    });

    let mut j = Job::new(
        "localhost".to_string(),
        Some("foo@bar.test".into()),
        vec!["a@x.test".into()],
        MESSAGE.to_vec(),
    );
    j.port = port;
    j.helo = "client.test".into();
    j.connection_timeout = WAIT;
    j.starttls = StartTls::Require;
    j.tls_verify = false;
    let report = send(&j);
    assert!(report.all_ok(), "{}", report.to_json());
    let end = server.join().unwrap();
    assert_eq!(
        end.map_err(|e| e.kind()),
        Ok(Vec::new()),
        "a clean TLS close after QUIT (close_notify), nothing more"
    );
}

/// One line of a scripted server: the client's line starts with `starts`; `reply` answers.
fn step<S: std::io::Read + std::io::Write>(
    s: &mut std::io::BufReader<S>,
    starts: &str,
    reply: &str,
) {
    use std::io::BufRead;
    let mut line = String::new();
    s.read_line(&mut line).unwrap();
    assert!(line.starts_with(starts), "expected {starts}, got {line:?}");
    s.get_mut().write_all(reply.as_bytes()).unwrap();
}
