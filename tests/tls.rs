//! TLS (issue 3, SPEC 3–4, invariant 3): STARTTLS and implicit TLS with a real rustls
//! client over loopback, STARTTLS command injection (CVE-2011-0411), session reset,
//! require_tls, certificate reload, garbage and silence on the TLS port, handshake
//! deadline, protocol versions, key formats, config errors through the binary, and
//! interop with Python's `ssl`/`smtplib`.
//!
//! The keys in `tests/data/keys/` were made once with OpenSSL 3 (keys do not expire;
//! the certificates are made from them with rcgen at test time):
//! ```text
//! openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out rsa-pkcs8.pem
//! openssl pkey -in rsa-pkcs8.pem -traditional -out rsa-pkcs1.pem
//! openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out p256-pkcs8.pem
//! openssl ec -in p256-pkcs8.pem -out p256-sec1.pem
//! openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out p384-pkcs8.pem
//! openssl ec -in p384-pkcs8.pem -out p384-sec1.pem
//! openssl genpkey -algorithm ED25519 -out ed25519-pkcs8.pem
//! ```
mod common;
use common::process::{run_refused_config, ChildServer};
use common::*;

use mailer::tls::{load_certified_key, TlsError};
use mailer::{Config, Handle, Server};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ProtocolVersion, RootCertStore, StreamOwned};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BODY: &[u8] = b"Subject: tls\r\n\r\nover TLS\r\n.\r\n";

// ---------------------------------------------------------------------------------
// Helpers

/// A client config trusting all of `roots`, offering only `versions`.
fn client_cfg(
    roots: &[&CertificateDer<'static>],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).unwrap();
    }
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth(),
    )
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// An implicit-TLS connection, handshake done, greeting not yet read.
fn tls_connect(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Result<Tls, std::io::Error> {
    let tcp = TcpStream::connect_timeout(&addr, WAIT)?;
    tcp.set_read_timeout(Some(WAIT))?;
    tcp.set_write_timeout(Some(WAIT))?;
    let conn = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

fn peer_cert(s: &Tls) -> CertificateDer<'static> {
    s.conn.peer_certificates().expect("peer certificate")[0]
        .clone()
        .into_owned()
}

/// Reads one whole reply (all lines) from a raw stream.
fn read_reply(r: &mut impl BufRead) -> String {
    mailer::testing::read_wire_reply(r).expect("a reply").1
}

/// Reads until the peer closes (EOF or reset); fails if that takes longer than `limit`.
/// Returns what arrived and how long it took.
fn read_until_closed(tcp: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    tcp.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        assert!(
            start.elapsed() < limit,
            "connection still open after {limit:?}; got {got:?}"
        );
        match tcp.read(&mut buf) {
            Ok(0) => return (got, start.elapsed()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (got, start.elapsed()),
        }
    }
}

/// A server built from a whole config text (for settings `TestServer` fixes, such as
/// `workers`). `{spool}` in `toml` is replaced with a temporary spool directory.
struct Custom {
    handle: Handle,
    addrs: Vec<SocketAddr>,
    dir: tempfile::TempDir,
    thread: Option<JoinHandle<()>>,
}

impl Custom {
    fn start(toml: &str) -> Custom {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let toml = toml.replace("{spool}", &format!("{:?}", spool.display().to_string()));
        let cfg = Config::from_toml(&toml, Path::new("custom.toml")).expect("config");
        let server = Server::builder(cfg).build().expect("server builds");
        let handle = server.handle();
        let addrs = handle.local_addrs();
        let thread = std::thread::spawn(move || server.run().expect("server runs"));
        wait_until("spool created", || spool.join("new").is_dir());
        Custom {
            handle,
            addrs,
            dir,
            thread: Some(thread),
        }
    }

    fn stored(&self) -> Vec<(String, Vec<u8>)> {
        read_maildir(&self.dir.path().join("spool"))
    }
}

impl Drop for Custom {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + WAIT * 2;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !std::thread::panicking() {
                assert!(t.is_finished(), "server did not stop");
                t.join().unwrap();
            }
        }
    }
}

/// An implicit-TLS client served by a `workers = 1` server once its worker is free.
/// Sockets go only to idle workers (else 421 / close at once), and a worker takes a
/// moment between its session's end and waiting for the next one: so retry, bounded.
fn tls_client_when_idle(s: &Custom, addr: SocketAddr, cfg: Arc<ClientConfig>) -> Client {
    wait_until("no session active", || {
        s.handle.stats().connections_active == 0
    });
    let start = Instant::now();
    loop {
        let mut c = Client::connect(addr);
        if c.try_upgrade(Arc::clone(&cfg)).is_ok() {
            return c;
        }
        assert!(start.elapsed() < WAIT, "not served");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A silent connection that the only worker of `s` has taken. A socket goes only to a
/// worker waiting for one; right after start the worker may not be waiting yet, and
/// then the connection is refused at once: so try again, bounded.
fn occupy_the_worker(s: &Custom, addr: SocketAddr) -> TcpStream {
    let start = Instant::now();
    loop {
        let refused = s.handle.stats().connections_refused;
        let tcp = TcpStream::connect(addr).unwrap();
        wait_until("the connection is taken or refused", || {
            let st = s.handle.stats();
            st.connections_active == 1 || st.connections_refused > refused
        });
        if s.handle.stats().connections_active == 1 {
            return tcp;
        }
        assert!(start.elapsed() < WAIT, "the worker never took a connection");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Config text: plain + implicit TLS listeners, `workers`, `[tls]` with these files.
fn tls_config(cert: &Path, key: &Path, workers: usize, limits: &str) -> String {
    format!(
        "hostname = \"mx.test\"\n\
         [server]\nlisten = [\"127.0.0.1:0\"]\ntls_listen = [\"127.0.0.1:0\"]\n\
         workers = {workers}\nshutdown_grace_secs = 2\nstats_interval_secs = 0\n\
         [tls]\ncert = {:?}\nkey = {:?}\n\
         [limits]\n{limits}\n\
         [spool]\ndir = {{spool}}\n",
        cert.display().to_string(),
        key.display().to_string()
    )
}

/// Writes [`tls_config`] (no extra limits) to `path`, for the binary, with the spool
/// `spool` next to it.
fn write_tls_config(path: &Path, cert: &Path, key: &Path, workers: usize) {
    let spool = path.with_file_name("spool").display().to_string();
    let text = tls_config(cert, key, workers, "").replace("{spool}", &format!("{spool:?}"));
    std::fs::write(path, text).unwrap();
}

/// Writes `bytes` to `path` through a temporary file and a rename (as certbot does),
/// so the reload watcher never reads a half-written file.
fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// STARTTLS (220), the handshake with `cfg`, and EHLO again (250).
fn starttls(c: &mut Client, cfg: Arc<ClientConfig>) {
    c.ok("STARTTLS", 220);
    c.upgrade(cfg);
    c.ok("EHLO client.test", 250);
}

/// MAIL, RCPT and DATA with [`BODY`], accepted with 250 2.0.0.
fn accepted(c: &mut Client) {
    let reply = c.transaction("a@x.test", &["b@y.test"], BODY);
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
}

fn assert_stored_with(stored: &[(String, Vec<u8>)], protocol: &str) {
    assert_eq!(stored.len(), 1, "one message stored");
    let (trace, body) = split_stored(&stored[0].1);
    assert!(
        trace.contains(&format!(" by mx.test with {protocol}\r\n")),
        "{trace}"
    );
    assert_eq!(body, b"Subject: tls\r\n\r\nover TLS\r\n");
}

// ---------------------------------------------------------------------------------
// STARTTLS

#[test]
fn starttls_transaction_is_stored_with_esmtps() {
    let s = TestServer::start(Opts {
        tls: true,
        ..Opts::default()
    });
    let mut c = s.connect();
    let ehlo = c.ok("EHLO client.test", 250);
    assert!(ehlo.contains("250-STARTTLS\r\n"), "{ehlo}");
    assert_eq!(c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS\r\n");
    c.upgrade(s.tls_client_config());
    let ehlo = c.ok("EHLO client.test", 250);
    assert!(!ehlo.contains("STARTTLS"), "not offered inside TLS: {ehlo}");
    // RFC 3207 §4: STARTTLS inside TLS is out of sequence.
    assert_eq!(c.cmd("STARTTLS"), "503 5.5.1 Error: TLS already active\r\n");
    let reply = c.transaction("a@x.test", &["b@y.test"], BODY);
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    c.ok("QUIT", 221);
    assert_stored_with(&s.stored(), "ESMTPS");
}

#[test]
fn without_tls_section_starttls_is_refused_454_and_not_advertised() {
    let s = TestServer::plain();
    let mut c = s.connect();
    let ehlo = c.ok("EHLO client.test", 250);
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(c.cmd("STARTTLS"), "454 4.7.0 TLS not available\r\n");
    // The session goes on in plaintext.
    accepted(&mut c);
    assert_stored_with(&s.stored(), "ESMTP");
}

#[test]
fn starttls_with_pipelined_command_closes_without_executing_it() {
    let s = TestServer::start(Opts {
        tls: true,
        ..Opts::default()
    });
    // STARTTLS and an injected command in one write (CVE-2011-0411).
    let mut c = s.ehlo();
    c.send_raw(b"STARTTLS\r\nNOOP\r\n");
    let (got, _) = read_until_closed(&mut c.tcp().try_clone().unwrap(), WAIT);
    assert_eq!(
        String::from_utf8_lossy(&got),
        "220 2.0.0 Ready to start TLS\r\n",
        "the 220, then close: no reply to NOOP, no handshake"
    );

    // A whole pipelined group: earlier replies still arrive in order, nothing after
    // STARTTLS runs (the MAIL would be 250, the RSET 250).
    let mut c = s.connect();
    c.send_raw(b"EHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<a@x.test>\r\nRSET\r\n");
    let (got, _) = read_until_closed(&mut c.tcp().try_clone().unwrap(), WAIT);
    let got = String::from_utf8(got).unwrap();
    assert!(got.starts_with("250-mx.test\r\n"), "{got}");
    assert!(
        got.ends_with("250 HELP\r\n220 2.0.0 Ready to start TLS\r\n"),
        "{got}"
    );

    // The issue's form: a client that goes on with the handshake after the 220 finds
    // the connection closed; its EHLO can never be answered by the injected NOOP.
    let mut c = s.ehlo();
    c.send_raw(b"STARTTLS\r\nNOOP\r\n");
    let (code, text) = c.reply();
    assert_eq!(
        (code, text.as_str()),
        (220, "220 2.0.0 Ready to start TLS\r\n")
    );
    assert!(c.try_upgrade(s.tls_client_config()).is_err());
    assert!(s.stored().is_empty());

    // A clean STARTTLS on the same server still works.
    let mut c = s.ehlo();
    starttls(&mut c, s.tls_client_config());
}

#[test]
fn after_starttls_the_session_starts_over() {
    let s = TestServer::start(Opts {
        tls: true,
        ..Opts::default()
    });
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<before@x.test>", 250);
    c.ok("RCPT TO:<before@y.test>", 250);
    c.ok("STARTTLS", 220);
    c.upgrade(s.tls_client_config());
    // RFC 3207 §4.2: no HELO/EHLO carried across…
    assert_eq!(
        c.cmd("MAIL FROM:<after@x.test>"),
        "503 5.5.1 Error: send HELO/EHLO first\r\n"
    );
    c.ok("EHLO client.test", 250);
    // …and no envelope: the pre-TLS MAIL and RCPT are gone.
    assert_eq!(
        c.cmd("RCPT TO:<b@y.test>"),
        "503 5.5.1 Error: need MAIL command\r\n"
    );
    assert_eq!(c.cmd("DATA"), "503 5.5.1 Error: need MAIL command\r\n");
    let reply = c.transaction("after@x.test", &["after@y.test"], BODY);
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
    let stored = s.stored();
    assert_stored_with(&stored, "ESMTPS");
    let (trace, _) = split_stored(&stored[0].1);
    assert!(
        trace.starts_with(
            "Return-Path: <after@x.test>\r\nX-Original-To: after@y.test\r\nReceived: "
        ),
        "{trace}"
    );
}

#[test]
fn require_tls_refuses_mail_before_starttls() {
    let s = TestServer::start(Opts {
        tls: true,
        tls_extra: "require_tls = true".into(),
        ..Opts::default()
    });
    let mut c = s.ehlo();
    assert_eq!(
        c.cmd("MAIL FROM:<a@x.test>"),
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    starttls(&mut c, s.tls_client_config());
    accepted(&mut c);
    assert_stored_with(&s.stored(), "ESMTPS");
}

// ---------------------------------------------------------------------------------
// Implicit TLS (RFC 8314)

#[test]
fn implicit_tls_handshakes_first_then_greets_inside_tls() {
    let s = TestServer::start(Opts {
        implicit_tls: true,
        ..Opts::default()
    });
    let addr = s.tls_addr.unwrap();
    // Nothing in plaintext comes first: the handshake succeeds, then the greeting.
    let mut c = Client::connect_tls(addr, s.tls_client_config());
    assert_eq!(c.reply().1, "220 mx.test ESMTP\r\n");
    let ehlo = c.ok("EHLO client.test", 250);
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(c.cmd("STARTTLS"), "503 5.5.1 Error: TLS already active\r\n");
    accepted(&mut c);
    c.ok("QUIT", 221);
    assert_stored_with(&s.stored(), "ESMTPS");
}

#[test]
fn tls_1_2_and_1_3_are_served() {
    let s = TestServer::start(Opts {
        implicit_tls: true,
        ..Opts::default()
    });
    let der = &s.cert.as_ref().unwrap().der;
    for (versions, want) in [
        (&[&rustls::version::TLS12][..], ProtocolVersion::TLSv1_2),
        (&[&rustls::version::TLS13][..], ProtocolVersion::TLSv1_3),
    ] {
        let mut t = tls_connect(s.tls_addr.unwrap(), client_cfg(&[der], versions)).unwrap();
        assert_eq!(t.conn.protocol_version(), Some(want));
        let mut r = BufReader::new(&mut t);
        assert_eq!(read_reply(&mut r), "220 mx.test ESMTP\r\n");
    }
    // STARTTLS with TLS 1.2 only.
    let mut c = s.ehlo();
    starttls(&mut c, client_cfg(&[der], &[&rustls::version::TLS12]));
}

/// A ClientHello as an SSLv3/TLS 1.0/TLS 1.1-only client sends it (no supported_versions
/// extension). rustls cannot offer these versions, so the bytes are written by hand.
fn legacy_client_hello(version: [u8; 2]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version);
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // session id
                  // Suites the server has (TLS 1.2 ECDHE GCM), so only the version is wrong.
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]);
    body.extend_from_slice(&[0x01, 0x00]); // null compression
                                           // signature_algorithms (ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256,
                                           // rsa_pkcs1_sha256) and supported_groups (x25519, secp256r1): with these the
                                           // same hello at version 3.3 (TLS 1.2) is answered with a ServerHello.
    let ext = [
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, //
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17,
    ];
    body.extend_from_slice(&[0x00, ext.len() as u8]);
    body.extend_from_slice(&ext);
    let mut hs = vec![0x01, 0, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01, (hs.len() >> 8) as u8, hs.len() as u8];
    rec.extend_from_slice(&hs);
    rec
}

#[test]
fn ssl3_tls1_0_and_tls1_1_are_refused_with_a_protocol_version_alert() {
    let s = TestServer::start(Opts {
        implicit_tls: true,
        ..Opts::default()
    });
    for version in [[3, 0], [3, 1], [3, 2]] {
        let mut tcp = TcpStream::connect(s.tls_addr.unwrap()).unwrap();
        tcp.write_all(&legacy_client_hello(version)).unwrap();
        let (got, _) = read_until_closed(&mut tcp, WAIT);
        // One alert record: type 21, level fatal (2), protocol_version (70). No
        // ServerHello (a handshake record, type 22).
        assert!(got.len() >= 7, "{version:?}: {got:?}");
        assert_eq!(got[0], 21, "{version:?}: an alert record: {got:?}");
        assert_eq!(&got[5..7], &[2, 70], "{version:?}: {got:?}");
        assert!(!got.contains(&22), "{version:?}: {got:?}");
    }
    // Control: the same hello as TLS 1.2 gets a ServerHello (a handshake record), so
    // the refusals above are about the version alone.
    let mut tcp = TcpStream::connect(s.tls_addr.unwrap()).unwrap();
    tcp.write_all(&legacy_client_hello([3, 3])).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut head = [0u8; 6];
    tcp.read_exact(&mut head).unwrap();
    assert_eq!((head[0], head[5]), (22, 2), "a ServerHello: {head:?}");
    drop(tcp);
    // The server is fine afterwards.
    let mut c = Client::connect_tls(s.tls_addr.unwrap(), s.tls_client_config());
    assert_eq!(c.reply().0, 220);
}

// ---------------------------------------------------------------------------------
// Certificate reload

#[test]
fn reload_serves_the_new_certificate_and_old_connections_keep_working() {
    let s = TestServer::start(Opts {
        tls: true,
        implicit_tls: true,
        ..Opts::default()
    });
    let tls_addr = s.tls_addr.unwrap();
    let old = s.cert.as_ref().unwrap();
    let fresh = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let new_der = fresh.cert.der().clone();
    assert_ne!(old.der, new_der);
    let both = client_cfg(&[&old.der, &new_der], rustls::DEFAULT_VERSIONS);

    // Before: the old certificate, on both a STARTTLS and an implicit connection.
    let t = tls_connect(tls_addr, Arc::clone(&both)).unwrap();
    assert_eq!(peer_cert(&t), old.der);
    let mut kept = s.ehlo();
    starttls(&mut kept, s.tls_client_config());

    replace_file(&old.key, fresh.key_pair.serialize_pem().as_bytes());
    replace_file(&old.cert, fresh.cert.pem().as_bytes());

    // New connections get the new certificate within a few seconds (1 s poll).
    let start = Instant::now();
    loop {
        let t = tls_connect(tls_addr, Arc::clone(&both)).unwrap();
        if peer_cert(&t) == new_der {
            break;
        }
        assert!(start.elapsed() < WAIT, "new certificate not served");
        std::thread::sleep(Duration::from_millis(50));
    }
    // STARTTLS connections too (the same resolver).
    let mut c = s.ehlo();
    starttls(&mut c, client_cfg(&[&new_der], rustls::DEFAULT_VERSIONS));
    // The connection made before the reload goes on.
    accepted(&mut kept);
}

#[test]
fn a_broken_key_on_reload_keeps_the_old_certificate() {
    // The real binary, so that the log shows when the watcher has seen the change.
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "server");
    let config = dir.path().join("config.toml");
    write_tls_config(&config, &cert.cert, &cert.key, 2);
    let mut server = ChildServer::start(&config, &[("RUST_LOG", "info")]);
    let addrs = server.listen_addrs(2);
    let tls_addr = addrs[1];
    let cfg = client_config(&cert.der);
    assert_eq!(
        peer_cert(&tls_connect(tls_addr, Arc::clone(&cfg)).unwrap()),
        cert.der
    );

    replace_file(
        &cert.key,
        b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
    );
    server.wait_log("reload failed, keeping the old certificate", 1);
    // New connections still succeed, with the old certificate, and work.
    let mut t = tls_connect(tls_addr, Arc::clone(&cfg)).unwrap();
    assert_eq!(peer_cert(&t), cert.der);
    let mut r = BufReader::new(&mut t);
    assert_eq!(read_reply(&mut r), "220 mx.test ESMTP\r\n");
    let mut c = Client::connect(addrs[0]);
    c.reply();
    c.ok("EHLO client.test", 250);
    starttls(&mut c, Arc::clone(&cfg));
    c.ok("QUIT", 221);

    // The watcher keeps watching: a good pair later is picked up.
    let fresh = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    replace_file(&cert.cert, fresh.cert.pem().as_bytes());
    replace_file(&cert.key, fresh.key_pair.serialize_pem().as_bytes());
    server.wait_log("tls: reloaded certificate", 1);
    let both = client_cfg(&[&cert.der, fresh.cert.der()], rustls::DEFAULT_VERSIONS);
    assert_eq!(
        &peer_cert(&tls_connect(tls_addr, both).unwrap()),
        fresh.cert.der()
    );
    let (status, log) = server.stop();
    assert!(status.success(), "{status}\n{log}");
}

// ---------------------------------------------------------------------------------
// Garbage, silence and trickling on the TLS port

#[test]
fn garbage_on_the_tls_port_closes_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "server");
    let s = Custom::start(&tls_config(
        &cert.cert,
        &cert.key,
        1,
        "command_timeout_secs = 1",
    ));
    let tls_addr = s.addrs[1];
    let mut noise = Vec::new();
    let mut x: u32 = 0x1234_5678;
    for _ in 0..300 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        noise.push((x >> 16) as u8);
    }
    for garbage in [&b"EHLO client.test\r\n"[..], &noise[..]] {
        // The garbage must reach the worker (not a refusal at accept): the silent
        // connection is taken first, then fed.
        let mut tcp = occupy_the_worker(&s, tls_addr);
        tcp.write_all(garbage).unwrap();
        let (got, took) = read_until_closed(&mut tcp, Duration::from_secs(5));
        assert!(!got.starts_with(b"220"), "no plaintext greeting: {got:?}");
        assert!(
            took < Duration::from_secs(1),
            "closed on the garbage: {took:?}"
        );
        // With one worker, the next good client is served: the bad one is gone.
        let mut c = tls_client_when_idle(&s, tls_addr, client_config(&cert.der));
        assert_eq!(c.reply().1, "220 mx.test ESMTP\r\n");
        c.ok("EHLO client.test", 250);
        c.ok("QUIT", 221);
        assert!(c.is_closed());
    }
}

#[test]
fn a_silent_client_on_the_tls_port_is_cut_after_the_command_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "server");
    let s = Custom::start(&tls_config(
        &cert.cert,
        &cert.key,
        1,
        "command_timeout_secs = 1",
    ));
    let tls_addr = s.addrs[1];
    let mut silent = occupy_the_worker(&s, tls_addr);
    let (got, took) = read_until_closed(&mut silent, Duration::from_secs(5));
    assert!(got.is_empty(), "{got:?}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(4),
        "cut after {took:?}"
    );
    // The only worker is free again.
    let mut c = tls_client_when_idle(&s, tls_addr, client_config(&cert.der));
    assert_eq!(c.reply().0, 220);
    c.ok("EHLO client.test", 250);
    accepted(&mut c);
    assert_stored_with(&s.stored(), "ESMTPS");
}

/// Sends one byte every 150 ms until the peer closes; returns how long that took.
fn trickle_until_closed(tcp: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    tcp.set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    let mut buf = [0u8; 512];
    loop {
        assert!(start.elapsed() < limit, "still open after {limit:?}");
        if tcp.write_all(&[0]).is_err() {
            return start.elapsed();
        }
        match tcp.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return start.elapsed(),
        }
    }
}

#[test]
fn a_trickled_handshake_is_cut_at_the_command_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "server");
    let s = Custom::start(&tls_config(
        &cert.cert,
        &cert.key,
        2,
        "command_timeout_secs = 1",
    ));
    // A TLS record header announcing 16 KiB, then one byte at a time: each read is
    // quick, but the handshake as a whole must end at the command timeout.
    let mut tcp = TcpStream::connect(s.addrs[1]).unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00]).unwrap();
    let took = trickle_until_closed(&mut tcp, Duration::from_secs(8));
    assert!(took < Duration::from_secs(3), "implicit TLS: {took:?}");

    // The same after STARTTLS.
    let mut c = Client::connect(s.addrs[0]);
    c.reply();
    c.ok("EHLO client.test", 250);
    c.ok("STARTTLS", 220);
    let mut tcp = c.tcp().try_clone().unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00]).unwrap();
    let took = trickle_until_closed(&mut tcp, Duration::from_secs(8));
    assert!(took < Duration::from_secs(3), "STARTTLS: {took:?}");
}

// ---------------------------------------------------------------------------------
// Key formats and certificate errors

fn keys_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/keys")
}

/// (key file, the PKCS#8 form of the same key): every algorithm and encoding.
const KEY_FILES: &[(&str, &str)] = &[
    ("rsa-pkcs8.pem", "rsa-pkcs8.pem"),
    ("rsa-pkcs1.pem", "rsa-pkcs8.pem"),
    ("p256-pkcs8.pem", "p256-pkcs8.pem"),
    ("p256-sec1.pem", "p256-pkcs8.pem"),
    ("p384-pkcs8.pem", "p384-pkcs8.pem"),
    ("p384-sec1.pem", "p384-pkcs8.pem"),
    ("ed25519-pkcs8.pem", "ed25519-pkcs8.pem"),
];

/// A self-signed `localhost` certificate for the key in `pkcs8` (rcgen, made now so it
/// never expires under the tests), written to `dir`.
fn cert_for_key(dir: &Path, pkcs8: &str) -> (PathBuf, CertificateDer<'static>) {
    let pem = std::fs::read_to_string(keys_dir().join(pkcs8)).unwrap();
    let kp = rcgen::KeyPair::from_pem(&pem).expect(pkcs8);
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&kp)
        .unwrap();
    let path = dir.join(format!("{pkcs8}.crt"));
    std::fs::write(&path, cert.pem()).unwrap();
    (path, cert.der().clone())
}

#[test]
fn every_supported_key_type_and_encoding_loads_and_serves_tls_1_2_and_1_3() {
    let dir = tempfile::tempdir().unwrap();
    for (key_file, pkcs8) in KEY_FILES {
        let (cert, der) = cert_for_key(dir.path(), pkcs8);
        let key = keys_dir().join(key_file);
        let ck = load_certified_key(&cert, &key).unwrap_or_else(|e| panic!("{key_file}: {e}"));
        assert_eq!(ck.cert[0], der);
        // And through a server: a real handshake signs with the key.
        // Two workers: the second connection never waits for the first to be reaped.
        let s = Custom::start(&tls_config(&cert, &key, 2, ""));
        for versions in [
            &[&rustls::version::TLS12][..],
            &[&rustls::version::TLS13][..],
        ] {
            let mut t = tls_connect(s.addrs[1], client_cfg(&[&der], versions))
                .unwrap_or_else(|e| panic!("{key_file}: {e}"));
            let mut r = BufReader::new(&mut t);
            assert_eq!(read_reply(&mut r), "220 mx.test ESMTP\r\n", "{key_file}");
        }
    }
}

/// Broken setups: (what, cert path, key path, a path the message must name).
fn broken_setups(dir: &Path) -> Vec<(&'static str, PathBuf, PathBuf, PathBuf)> {
    let good = make_cert(dir, "good");
    let other = make_cert(dir, "other");
    let missing = dir.join("missing.pem");
    vec![
        (
            "missing cert",
            missing.clone(),
            good.key.clone(),
            missing.clone(),
        ),
        (
            "missing key",
            good.cert.clone(),
            missing.clone(),
            missing.clone(),
        ),
        // A key where the certificate should be: no certificate in the file.
        (
            "no certificate",
            good.key.clone(),
            good.key.clone(),
            good.key.clone(),
        ),
        // A certificate where the key should be: no key in the file.
        (
            "no key",
            good.cert.clone(),
            good.cert.clone(),
            good.cert.clone(),
        ),
        (
            "mismatch",
            good.cert.clone(),
            other.key.clone(),
            other.key.clone(),
        ),
    ]
}

#[test]
fn certificate_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let setups = broken_setups(dir.path());
    let mut kinds = Vec::new();
    for (what, cert, key, named) in &setups {
        let err = match load_certified_key(cert, key) {
            Ok(_) => panic!("{what}: loaded"),
            Err(e) => e,
        };
        let msg = err.to_string();
        assert!(msg.contains(&named.display().to_string()), "{what}: {msg}");
        kinds.push(match err {
            TlsError::Read { .. } => "read",
            TlsError::NoCertificate(_) => "no certificate",
            TlsError::NoKey(_) => "no key",
            TlsError::Mismatch { .. } => "mismatch",
            other => panic!("{what}: unexpected {other}"),
        });
    }
    assert_eq!(
        kinds,
        ["read", "read", "no certificate", "no key", "mismatch"]
    );
    // Neither PEM at all: no certificate, no key.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a PEM file\n").unwrap();
    let good = make_cert(dir.path(), "good2");
    assert!(matches!(
        load_certified_key(&junk, &good.key),
        Err(TlsError::NoCertificate(_))
    ));
    assert!(matches!(
        load_certified_key(&good.cert, &junk),
        Err(TlsError::NoKey(_))
    ));
}

#[test]
fn broken_tls_files_make_check_config_and_the_server_exit_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (what, cert, key, named)) in broken_setups(dir.path()).into_iter().enumerate() {
        let config = dir.path().join(format!("config-{i}.toml"));
        write_tls_config(&config, &cert, &key, 1);
        for (args, out) in run_refused_config(config.to_str().unwrap()) {
            assert_eq!(out.status.code(), Some(2), "{what} {args}: {}", out.stderr);
            assert!(
                out.stderr.contains(&named.display().to_string()),
                "{what} {args}: {}",
                out.stderr
            );
            assert!(out.stdout.is_empty(), "{what}: {}", out.stdout);
        }
    }
}

// ---------------------------------------------------------------------------------
// Interop with a non-Rust TLS stack

const PYTHON_CLIENT: &str = r#"
import smtplib, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
# Python 3.13 adds X509 strict checks that a minimal self-signed test cert need not meet.
ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
s = smtplib.SMTP("localhost", port, timeout=10)
s.ehlo("py.test")
assert s.has_extn("starttls"), s.esmtp_features
s.starttls(context=ctx)
s.ehlo("py.test")
assert not s.has_extn("starttls"), s.esmtp_features
print(s.sock.version(), s.sock.cipher()[0])
refused = s.sendmail("py@x.test", ["b@y.test"], b"Subject: tls\r\n\r\nover TLS\r\n")
assert refused == {}, refused
s.quit()
"#;

#[test]
fn python_smtplib_starttls_interop() {
    let s = TestServer::start(Opts {
        tls: true,
        ..Opts::default()
    });
    let ca = s.cert.as_ref().unwrap().cert.display().to_string();
    let out = std::process::Command::new("python3")
        .args(["-c", PYTHON_CLIENT, &s.addr.port().to_string(), &ca])
        .output()
        .expect("python3 is needed for the interop test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("TLSv1.3 TLS_"), "{stdout}");
    wait_until("message stored", || !s.stored().is_empty());
    let stored = s.stored();
    assert_stored_with(&stored, "ESMTPS");
    assert!(split_stored(&stored[0].1)
        .0
        .contains("Received: from py.test "));
}
