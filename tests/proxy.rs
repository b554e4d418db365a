//! `server.proxy_protocol = true` (issue 8): a PROXY v1/v2 header comes before the
//! greeting; the client it names is the session's peer everywhere (Received header,
//! hooks, per-IP limit); a bad or missing header closes the connection without a
//! greeting, within the short header timeout.
mod common;
use common::*;

use mailer::hooks::{Hooks, SessionInfo};
use mailer::protocol::proxy::v2_header;
use mailer::Reply;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BODY: &[u8] = b"Subject: t\r\n\r\nhello\r\n.\r\n";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Records the peer every `connect` hook call sees.
#[derive(Clone, Default)]
struct Peers(Arc<Mutex<Vec<SocketAddr>>>);

impl Hooks for Peers {
    fn connect(&self, s: &SessionInfo) -> Result<(), Reply> {
        self.0.lock().unwrap().push(s.peer);
        Ok(())
    }
}

fn proxied(server_extra: &str, hooks: Option<Peers>) -> TestServer {
    TestServer::start(Opts {
        server_extra: format!("proxy_protocol = true\n{server_extra}"),
        toml: "[limits]\ncommand_timeout_secs = 2\n".into(),
        hooks: hooks.and_then(with_hooks),
        ..Opts::default()
    })
}

/// Connects, sends `header`, expects the greeting.
fn via_proxy(addr: SocketAddr, header: &[u8]) -> Client {
    let mut c = Client::connect(addr);
    c.send_raw(header);
    let (code, text) = c.reply();
    assert_eq!(code, 220, "greeting after PROXY header: {text}");
    c
}

/// One message through a connection opened with `header`; returns the Received line.
fn received_line(s: &TestServer, header: &[u8]) -> String {
    let before = s.stored().len();
    let mut c = via_proxy(s.addr, header);
    c.ok("EHLO client.test", 250);
    let reply = c.transaction("a@x.test", &["b@y.test"], BODY);
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let id = queue_id(&reply);
    c.ok("QUIT", 221);
    let stored = s.stored();
    assert_eq!(stored.len(), before + 1);
    let (_, bytes) = stored
        .iter()
        .find(|(name, _)| name.contains(&format!(".{id}.")))
        .expect("stored under its queue id");
    let (trace, body) = split_stored(bytes);
    assert_eq!(body, b"Subject: t\r\n\r\nhello\r\n");
    trace
        .lines()
        .find(|l| l.starts_with("Received: "))
        .expect("Received header")
        .to_string()
}

#[test]
fn v1_tcp4_and_tcp6_set_the_received_address_and_the_hook_peer() {
    let peers = Peers::default();
    let s = proxied("", Some(peers.clone()));
    assert_eq!(
        received_line(&s, b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n"),
        "Received: from client.test ([192.0.2.7]) by mx.test with ESMTP"
    );
    assert_eq!(
        received_line(&s, b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 25\r\n"),
        "Received: from client.test ([IPv6:2001:db8::7]) by mx.test with ESMTP"
    );
    assert_eq!(
        *peers.0.lock().unwrap(),
        vec![sa("192.0.2.7:40000"), sa("[2001:db8::7]:40001")]
    );
}

#[test]
fn v2_inet_inet6_mapped_and_tlvs_set_the_received_address() {
    let peers = Peers::default();
    let s = proxied("", Some(peers.clone()));
    let h = v2_header(Some((sa("198.51.100.9:5000"), sa("127.0.0.1:25"))), &[]);
    assert_eq!(
        received_line(&s, &h),
        "Received: from client.test ([198.51.100.9]) by mx.test with ESMTP"
    );
    let h = v2_header(Some((sa("[2001:db8::9]:5001"), sa("[::1]:25"))), &[]);
    assert_eq!(
        received_line(&s, &h),
        "Received: from client.test ([IPv6:2001:db8::9]) by mx.test with ESMTP"
    );
    // A proxy listening on `::` names IPv4 clients as mapped addresses: the client is
    // the IPv4 address (one per-IP key, one Received form).
    let h = v2_header(Some((sa("[::ffff:192.0.2.33]:5002"), sa("[::1]:25"))), &[]);
    // PP2_TYPE_ALPN, as HAProxy may append.
    let mut with_tlv = h.clone();
    let tlv = [0x01, 0x00, 0x04, b's', b'm', b't', b'p'];
    with_tlv[14..16].copy_from_slice(&(36u16 + tlv.len() as u16).to_be_bytes());
    with_tlv.extend_from_slice(&tlv);
    assert_eq!(
        received_line(&s, &with_tlv),
        "Received: from client.test ([192.0.2.33]) by mx.test with ESMTP"
    );
    assert_eq!(
        *peers.0.lock().unwrap(),
        vec![
            sa("198.51.100.9:5000"),
            sa("[2001:db8::9]:5001"),
            sa("192.0.2.33:5002")
        ]
    );
}

#[test]
fn v2_local_and_v1_unknown_keep_the_socket_peer() {
    let peers = Peers::default();
    let s = proxied("", Some(peers.clone()));
    assert_eq!(
        received_line(&s, &v2_header(None, &[])),
        "Received: from client.test ([127.0.0.1]) by mx.test with ESMTP"
    );
    assert_eq!(
        received_line(&s, b"PROXY UNKNOWN\r\n"),
        "Received: from client.test ([127.0.0.1]) by mx.test with ESMTP"
    );
    let seen = peers.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|p| p.ip() == sa("127.0.0.1:1").ip()),
        "{seen:?}"
    );
}

#[test]
fn bytes_after_the_header_belong_to_the_session() {
    // The header and a command in one packet: the header reader must not swallow it.
    let s = proxied("", None);
    for header in [
        b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n".to_vec(),
        v2_header(Some((sa("192.0.2.7:40000"), sa("127.0.0.1:25"))), &[]),
    ] {
        let mut c = Client::connect(s.addr);
        let mut bytes = header;
        bytes.extend_from_slice(b"NOOP\r\nQUIT\r\n");
        c.send_raw(&bytes);
        assert_eq!(c.reply().0, 220);
        assert_eq!(c.reply().0, 250);
        assert_eq!(c.reply().0, 221);
    }
}

#[test]
fn per_ip_limit_applies_to_the_proxied_address() {
    // Every socket comes from 127.0.0.1 (the "proxy"); the limit of 2 counts clients.
    let s = proxied("max_connections_per_ip = 2", None);
    let h1 = b"PROXY TCP4 192.0.2.1 127.0.0.1 1000 25\r\n";
    let h2 = b"PROXY TCP4 192.0.2.2 127.0.0.1 1000 25\r\n";
    let a = via_proxy(s.addr, h1);
    let _b = via_proxy(s.addr, h1);
    let mut c = Client::connect(s.addr);
    c.send_raw(h1);
    let (code, text) = c.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("421 4.7.0 "), "{text}");
    assert!(c.is_closed());
    // Another client through the same proxy socket address is not affected: with the
    // acceptor counting socket peers this fourth connection from 127.0.0.1 would fail.
    let mut d = via_proxy(s.addr, h2);
    let _e = via_proxy(s.addr, h2);
    d.ok("NOOP", 250);
    // A slot frees when a session ends.
    drop(a);
    wait_until("slot of 192.0.2.1 released", || {
        let mut c = Client::connect(s.addr);
        c.send_raw(h1);
        c.reply().0 == 220
    });
    assert!(s.handle.stats().connections_refused >= 1);
}

/// Connects, sends `bytes`, and returns what the server wrote before closing and how
/// long it took to close.
fn closed_without_greeting(addr: SocketAddr, bytes: &[u8]) -> (Vec<u8>, Duration) {
    let began = Instant::now();
    let mut c = Client::connect(addr);
    if !bytes.is_empty() {
        c.send_raw(bytes);
    }
    let got = c.read_to_close();
    (got, began.elapsed())
}

#[test]
fn malformed_or_missing_header_closes_without_a_greeting() {
    let s = proxied("", None);
    let mut bad_family = v2_header(Some((sa("192.0.2.7:1"), sa("127.0.0.1:25"))), &[]);
    bad_family[13] = 0x41;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a client speaking SMTP first",
            b"EHLO client.test\r\n".to_vec(),
        ),
        ("TLS ClientHello", vec![0x16, 0x03, 0x01, 0x00, 0x10]),
        (
            "v1 bad port",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 99999 25\r\n".to_vec(),
        ),
        (
            "v1 bad address",
            b"PROXY TCP4 192.0.2.300 127.0.0.1 1 25\r\n".to_vec(),
        ),
        (
            "v1 LF only",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 1 25\n".to_vec(),
        ),
        ("v1 too long", {
            let mut v = b"PROXY UNKNOWN ".to_vec();
            v.resize(120, b'x');
            v
        }),
        ("v2 unknown family", bad_family),
        ("v2 bad version", {
            let mut v = v2_header(None, &[]);
            v[12] = 0x10;
            v
        }),
    ];
    for (what, bytes) in cases {
        let (got, took) = closed_without_greeting(s.addr, &bytes);
        assert!(got.is_empty(), "{what}: server wrote {got:?}");
        // Refused at once, not after the header timeout.
        assert!(took < Duration::from_millis(1500), "{what}: took {took:?}");
    }
    // The server is still fine.
    via_proxy(s.addr, b"PROXY UNKNOWN\r\n").ok("QUIT", 221);
}

#[test]
fn slow_or_missing_header_is_closed_after_the_short_timeout() {
    // command_timeout_secs = 2, so the header timeout is min(2 s, 5 s) = 2 s.
    let s = proxied("", None);
    let addr = s.addr;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("nothing", vec![]),
        ("truncated v1", b"PROXY TCP4 192.0.2.7 12".to_vec()),
        ("truncated v2", v2_header(None, &[])[..10].to_vec()),
    ];
    let threads: Vec<_> = cases
        .into_iter()
        .map(|(what, bytes)| {
            std::thread::spawn(move || (what, closed_without_greeting(addr, &bytes)))
        })
        .collect();
    for t in threads {
        let (what, (got, took)) = t.join().unwrap();
        assert!(got.is_empty(), "{what}: server wrote {got:?}");
        assert!(
            took >= Duration::from_millis(1800) && took < Duration::from_secs(5),
            "{what}: closed after {took:?}"
        );
    }
}

#[test]
fn implicit_tls_reads_the_header_before_the_handshake() {
    let s = TestServer::start(Opts {
        implicit_tls: true,
        server_extra: "proxy_protocol = true".into(),
        ..Opts::default()
    });
    let mut c = Client::connect(s.tls_addr.unwrap());
    c.send_raw(&v2_header(
        Some((sa("203.0.113.5:4444"), sa("127.0.0.1:465"))),
        &[],
    ));
    c.upgrade(s.tls_client_config());
    assert_eq!(c.reply().0, 220);
    c.ok("EHLO client.test", 250);
    let reply = c.transaction("a@x.test", &["b@y.test"], BODY);
    assert!(reply.starts_with("250 "), "{reply}");
    c.ok("QUIT", 221);
    let (trace, _) = split_stored(&s.stored()[0].1);
    assert!(
        trace.contains("Received: from client.test ([203.0.113.5]) by mx.test with ESMTPS\r\n"),
        "{trace}"
    );
}

#[test]
fn without_proxy_protocol_a_header_is_just_a_bad_command() {
    // The default: a PROXY line is not special (no spoofing without the setting).
    let s = TestServer::plain();
    let mut c = s.connect();
    let text = c.cmd("PROXY TCP4 192.0.2.7 127.0.0.1 40000 25");
    assert!(text.starts_with("500 5.5.2 "), "{text}");
}
