//! Issue 16 / SPEC 9: the milter client against a scripted fake milter on loopback TCP.
//! The fake speaks the protocol from its own small encoder (not the crate's codec), so a
//! mistake in one is not mirrored by the other. Each test asserts the exact SMTP replies,
//! the stored bytes, and what the milter received.
mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ADDHDRS: u32 = 0x01;
const CHGHDRS: u32 = 0x10;
const QUARANTINE: u32 = 0x20;
const NOBODY: u32 = 0x10;
const NR_HDR: u32 = 0x80;

/// What the fake does when a command arrives.
#[derive(Clone)]
enum Act {
    /// Send these packets (reply code, payload).
    Send(Vec<(u8, Vec<u8>)>),
    /// Send raw bytes.
    Raw(Vec<u8>),
    /// Never answer (but keep reading).
    Hang,
    /// Stop reading (and answering) for a long while: writes to it block.
    Stall,
    /// Close the connection.
    Close,
    /// No reply (a packet the milter said it would not answer).
    Nothing,
}

fn cont() -> Act {
    Act::Send(vec![(b'c', vec![])])
}

type Script = dyn Fn(u8, &[u8]) -> Act + Send + Sync;
/// Packets received, one list per connection: (command, payload).
type Received = Arc<Mutex<Vec<Vec<(u8, Vec<u8>)>>>>;

/// A fake milter: negotiates `actions` and `protocol`, records every packet it gets
/// (per connection), and answers each as `script` says (`c` unless told otherwise).
struct Fake {
    addr: SocketAddr,
    /// Packets received, one list per connection: (command, payload).
    conns: Received,
}

fn pkt(code: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    v.push(code);
    v.extend_from_slice(payload);
    v
}

impl Fake {
    fn start(
        actions: u32,
        protocol: u32,
        script: impl Fn(u8, &[u8]) -> Act + Send + Sync + 'static,
    ) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Received = Arc::default();
        let script: Arc<Script> = Arc::new(script);
        let c2 = Arc::clone(&conns);
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { return };
                let idx = {
                    let mut c = c2.lock().unwrap();
                    c.push(Vec::new());
                    c.len() - 1
                };
                let (c3, script) = (Arc::clone(&c2), Arc::clone(&script));
                std::thread::spawn(move || serve(s, idx, c3, script, actions, protocol));
            }
        });
        Fake { addr, conns }
    }

    fn address(&self) -> String {
        format!("inet:{}", self.addr)
    }

    /// The command bytes received on connection `i`.
    fn cmds(&self, i: usize) -> String {
        self.conns.lock().unwrap()[i]
            .iter()
            .map(|(c, _)| *c as char)
            .collect()
    }

    fn packets(&self, i: usize) -> Vec<(u8, Vec<u8>)> {
        self.conns.lock().unwrap()[i].clone()
    }

    fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }
}

fn serve(
    mut s: TcpStream,
    idx: usize,
    log: Received,
    script: Arc<Script>,
    actions: u32,
    protocol: u32,
) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let mut p = vec![0u8; u32::from_be_bytes(len) as usize];
        if s.read_exact(&mut p).is_err() || p.is_empty() {
            return;
        }
        let (c, payload) = (p[0], p[1..].to_vec());
        log.lock().unwrap()[idx].push((c, payload.clone()));
        let act = match c {
            b'O' => {
                let mut o = 6u32.to_be_bytes().to_vec();
                o.extend_from_slice(&actions.to_be_bytes());
                o.extend_from_slice(&protocol.to_be_bytes());
                Act::Send(vec![(b'O', o)])
            }
            b'D' | b'A' => Act::Nothing,
            b'Q' => return,
            b'L' if protocol & NR_HDR != 0 => Act::Nothing,
            _ => script(c, &payload),
        };
        match act {
            Act::Send(list) => {
                for (code, payload) in list {
                    if s.write_all(&pkt(code, &payload)).is_err() {
                        return;
                    }
                }
            }
            Act::Raw(b) => {
                let _ = s.write_all(&b);
            }
            Act::Hang => {
                // Keep the socket open and silent until the client gives up.
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
                return;
            }
            Act::Stall => {
                std::thread::sleep(Duration::from_secs(30));
                return;
            }
            Act::Close => return,
            Act::Nothing => {}
        }
    }
}

fn server_with(milters: &[(&str, &str)]) -> TestServer {
    let mut toml = String::new();
    for (addr, extra) in milters {
        toml.push_str(&format!("[[milter]]\naddress = {addr:?}\n{extra}\n"));
    }
    TestServer::with_toml(&toml)
}

const MSG: &[u8] = b"From: a@x.test\r\nSubject: s\r\nTo: b@y.test\r\n\r\nHello\r\n.\r\n";
const CONTENT: &[u8] = b"From: a@x.test\r\nSubject: s\r\nTo: b@y.test\r\n\r\nHello\r\n";

/// One message through a server with the fake at `at_eom`: returns the final reply.
fn one_message(f: &Fake, extra: &str) -> (TestServer, String) {
    let s = server_with(&[(&f.address(), extra)]);
    let mut c = s.ehlo();
    let r = c.transaction("a@x.test", &["b@y.test"], MSG);
    c.ok("QUIT", 221);
    (s, r)
}

fn eom(act: Act) -> impl Fn(u8, &[u8]) -> Act + Send + Sync + 'static {
    move |c, _| if c == b'E' { act.clone() } else { cont() }
}

#[test]
fn continue_stores_unchanged_and_milter_sees_every_stage() {
    let f = Fake::start(ADDHDRS, 0, eom(cont()));
    let (s, r) = one_message(&f, "");
    assert!(r.starts_with("250 2.0.0 "), "{r}");
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(split_stored(&stored[0].1).1, CONTENT);
    wait_until("quit", || f.cmds(0).ends_with('Q'));
    // Negotiation, connect, HELO, MAIL, RCPT, DATA, 3 headers, EOH, body, EOM, QUIT;
    // macros (D) before the stages that carry them (HELO has none without TLS).
    assert_eq!(f.cmds(0), "ODCHDMDRDTLLLDNBDEQ");
    let p = f.packets(0);
    // OPTNEG: version 6, only ADDHDRS|CHGHDRS|QUARANTINE offered.
    assert_eq!(&p[0].1[..8], &[0, 0, 0, 6, 0, 0, 0, 0x31]);
    // The connect packet carries the client's address and port.
    let conn = &p[2].1;
    assert!(conn.starts_with(b"[127.0.0.1]\x004"), "{conn:?}");
    assert!(conn.ends_with(b"127.0.0.1\0"));
    let macros = String::from_utf8_lossy(&p[1].1).to_string();
    for m in [
        "j\0mx.test\0",
        "{client_addr}\x00127.0.0.1\0",
        "{daemon_addr}\x00127.0.0.1\0",
        "{client_name}\0",
    ] {
        assert!(macros.contains(m), "{m:?} in {macros:?}");
    }
    assert_eq!(p[3].1, b"client.test\0");
    assert_eq!(p[5].1, b"<a@x.test>\0");
    assert!(String::from_utf8_lossy(&p[4].1).contains("{mail_addr}\0a@x.test\0"));
    assert_eq!(p[7].1, b"<b@y.test>\0");
    // `i` is the queue id of the 250 reply.
    let id = queue_id(&r);
    assert_eq!(p[8].1, format!("Ti\0{id}\0").into_bytes());
    assert_eq!(p[10].1, b"From\0a@x.test\0");
    assert_eq!(p[13].1, format!("Ni\0{id}\0").into_bytes());
    assert_eq!(p[15].1, b"Hello\r\n");
    assert_eq!(p[16].1, format!("Ei\0{id}\0").into_bytes());
}

#[test]
fn accept_stores() {
    let f = Fake::start(0, 0, eom(Act::Send(vec![(b'a', vec![])])));
    let (s, r) = one_message(&f, "");
    assert!(r.starts_with("250 2.0.0 "), "{r}");
    assert_eq!(s.stored().len(), 1);
}

#[test]
fn reject_tempfail_and_replycode_after_data() {
    for (act, want) in [
        (
            Act::Send(vec![(b'r', vec![])]),
            "550 5.7.1 Message rejected\r\n",
        ),
        (
            Act::Send(vec![(b't', vec![])]),
            "451 4.7.1 Service unavailable - try again later\r\n",
        ),
        (
            Act::Send(vec![(b'y', b"554 5.7.0 Spam, go away\0".to_vec())]),
            "554 5.7.0 Spam, go away\r\n",
        ),
        (
            Act::Send(vec![(b'y', b"421-4.7.0 one\r\n421 4.7.0 two\0".to_vec())]),
            "421-4.7.0 one\r\n421 4.7.0 two\r\n",
        ),
        // Not a 4xx/5xx reply: tempfail.
        (
            Act::Send(vec![(b'y', b"250 2.0.0 fine\0".to_vec())]),
            "451 4.7.1 Service unavailable - try again later\r\n",
        ),
        (
            Act::Send(vec![(b'y', b"550 4.7.1 mixed classes\0".to_vec())]),
            "451 4.7.1 Service unavailable - try again later\r\n",
        ),
    ] {
        let f = Fake::start(0, 0, eom(act));
        let s = server_with(&[(&f.address(), "")]);
        let mut c = s.ehlo();
        let r = c.transaction("a@x.test", &["b@y.test"], MSG);
        assert_eq!(r, want);
        if !want.starts_with("421") {
            // The session goes on: the next transaction is heard.
            c.ok("RSET", 250);
            c.ok("QUIT", 221);
        }
        assert!(s.stored().is_empty(), "{want}");
    }
}

#[test]
fn discard_answers_250_and_stores_nothing() {
    let f = Fake::start(0, 0, eom(Act::Send(vec![(b'd', vec![])])));
    let (s, r) = one_message(&f, "");
    assert!(r.starts_with("250 "), "{r}");
    assert!(s.stored().is_empty());
}

#[test]
fn envelope_refusals() {
    // Reject at MAIL, tempfail at RCPT, replycode at HELO.
    let f = Fake::start(0, 0, |c, p| match c {
        b'M' if p.starts_with(b"<bad@") => Act::Send(vec![(b'r', vec![])]),
        b'R' if p.starts_with(b"<later@") => Act::Send(vec![(b't', vec![])]),
        b'R' if p.starts_with(b"<own@") => {
            Act::Send(vec![(b'y', b"550 5.1.1 No such user\0".to_vec())])
        }
        b'H' if p.starts_with(b"evil") => Act::Send(vec![(b'y', b"554 5.7.1 Go away\0".to_vec())]),
        _ => cont(),
    });
    let s = server_with(&[(&f.address(), "")]);
    let mut c = s.ehlo();
    assert_eq!(
        c.cmd("MAIL FROM:<bad@x.test>"),
        "550 5.7.1 Command rejected\r\n"
    );
    c.ok("MAIL FROM:<good@x.test>", 250);
    assert_eq!(
        c.cmd("RCPT TO:<later@y.test>"),
        "451 4.7.1 Service unavailable - try again later\r\n"
    );
    assert_eq!(c.cmd("RCPT TO:<own@y.test>"), "550 5.1.1 No such user\r\n");
    c.ok("RCPT TO:<fine@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(MSG);
    assert!(c.reply().1.starts_with("250 2.0.0 "));
    c.ok("QUIT", 221);
    let mut c = s.connect();
    // A refusal at HELO stands for the whole session, as Postfix does.
    assert_eq!(c.cmd("EHLO evil.test"), "554 5.7.1 Go away\r\n");
    assert_eq!(c.cmd("EHLO good.test"), "554 5.7.1 Go away\r\n");
    c.ok("NOOP", 250);
    c.ok("QUIT", 221);
}

#[test]
fn header_edits_land_in_the_stored_copy() {
    let f = Fake::start(
        ADDHDRS | CHGHDRS,
        0,
        eom(Act::Send(vec![
            (b'h', b"X-Added\0yes\0".to_vec()),
            (b'i', [&[0, 0, 0, 1][..], b"X-Inserted\0second\0"].concat()),
            (b'm', [&[0, 0, 0, 1][..], b"Subject\0changed\0"].concat()),
            (b'm', [&[0, 0, 0, 1][..], b"To\0\0"].concat()),
            (b'm', [&[0, 0, 0, 1][..], b"X-Missing\0now here\0"].concat()),
            (b'c', vec![]),
        ])),
    );
    let (s, r) = one_message(&f, "");
    assert!(r.starts_with("250 2.0.0 "), "{r}");
    let stored = s.stored();
    let text = String::from_utf8_lossy(&stored[0].1).to_string();
    let (trace, content) = split_stored(&stored[0].1);
    assert!(trace.starts_with("Return-Path: <a@x.test>\r\n"), "{text}");
    // Added fields go below the trace headers; the insertion counts the header as it
    // stood after the addition (index 1 = before From).
    assert_eq!(
        String::from_utf8_lossy(&content),
        "X-Added: yes\r\nX-Missing: now here\r\nX-Inserted: second\r\nFrom: a@x.test\r\nSubject: changed\r\n\r\nHello\r\n",
        "{text}"
    );
}

#[test]
fn quarantine_goes_to_the_quarantine_folder() {
    let f = Fake::start(
        QUARANTINE,
        0,
        eom(Act::Send(vec![
            (b'q', b"looks like a virus\0".to_vec()),
            (b'c', vec![]),
        ])),
    );
    let (s, r) = one_message(&f, "");
    assert!(r.starts_with("250 2.0.0 "), "{r}");
    assert!(s.stored().is_empty());
    let q = read_maildir(&s.spool().join(".Quarantine"));
    assert_eq!(q.len(), 1);
    let text = String::from_utf8_lossy(&q[0].1).to_string();
    assert!(
        text.contains("\r\nX-Quarantine: looks like a virus\r\n"),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\nHello\r\n"), "{text}");
}

#[test]
fn actions_not_negotiated_are_a_protocol_error() {
    // The milter negotiated nothing, then adds a header: malformed -> tempfail.
    let f = Fake::start(
        0,
        0,
        eom(Act::Send(vec![(b'h', b"X\0y\0".to_vec()), (b'c', vec![])])),
    );
    let (s, r) = one_message(&f, "");
    assert_eq!(r, "451 4.7.1 Service unavailable - try again later\r\n");
    assert!(s.stored().is_empty());
}

#[test]
fn silent_milter_costs_only_its_timeout() {
    for (action, want) in [
        (
            "tempfail",
            "451 4.7.1 Service unavailable - try again later\r\n",
        ),
        ("reject", "550 5.7.1 Command rejected\r\n"),
        ("accept", "250 2.1.0 Ok\r\n"),
    ] {
        let f = Fake::start(0, 0, |c, _| if c == b'M' { Act::Hang } else { cont() });
        let s = server_with(&[(
            &f.address(),
            &format!("command_timeout_secs = 1\ndefault_action = {action:?}\n"),
        )]);
        let mut c = s.ehlo();
        let t = Instant::now();
        let r = c.cmd("MAIL FROM:<a@x.test>");
        let took = t.elapsed();
        assert_eq!(r, want);
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "{took:?}"
        );
        if action == "accept" {
            // Skipped for the rest of the transaction: no further wait.
            let t = Instant::now();
            c.ok("RCPT TO:<b@y.test>", 250);
            c.ok("DATA", 354);
            c.send_raw(MSG);
            let r = c.reply().1;
            assert!(r.starts_with("250 2.0.0 "), "{r}");
            assert!(t.elapsed() < Duration::from_secs(1));
            assert_eq!(s.stored().len(), 1);
        }
        c.ok("QUIT", 221);
    }
}

#[test]
fn silent_at_end_of_message_uses_content_timeout() {
    let f = Fake::start(0, 0, eom(Act::Hang));
    let s = server_with(&[(
        &f.address(),
        "command_timeout_secs = 30\ncontent_timeout_secs = 1\n",
    )]);
    let mut c = s.ehlo();
    let t = Instant::now();
    let r = c.transaction("a@x.test", &["b@y.test"], MSG);
    assert_eq!(r, "451 4.7.1 Service unavailable - try again later\r\n");
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(s.stored().is_empty());
    // Dropped: reconnected at the next MAIL, once.
    c.ok("MAIL FROM:<a@x.test>", 250);
    assert_eq!(f.connections(), 2);
    c.ok("QUIT", 221);
}

#[test]
fn milter_closing_mid_message_gets_default_action() {
    let f = Fake::start(0, 0, |c, _| if c == b'B' { Act::Close } else { cont() });
    let (s, r) = one_message(&f, "");
    assert_eq!(r, "451 4.7.1 Service unavailable - try again later\r\n");
    assert!(s.stored().is_empty());
    let f = Fake::start(0, 0, |c, _| if c == b'B' { Act::Close } else { cont() });
    let (s, r) = one_message(&f, "default_action = \"accept\"\n");
    assert!(r.starts_with("250 2.0.0 "), "{r}");
    assert_eq!(s.stored().len(), 1);
}

#[test]
fn malformed_and_oversize_packets_get_default_action() {
    for raw in [
        // 2 GiB announced.
        vec![0x7f, 0xff, 0xff, 0xff, b'c'],
        // Zero length.
        vec![0, 0, 0, 0],
        // Unknown reply code.
        pkt(b'Z', b""),
        // Continue with a payload.
        pkt(b'c', b"junk"),
        // Body replacement was never offered.
        pkt(b'b', b"new body"),
    ] {
        let f = Fake::start(0, 0, eom(Act::Raw(raw.clone())));
        let (s, r) = one_message(&f, "");
        assert_eq!(
            r, "451 4.7.1 Service unavailable - try again later\r\n",
            "{raw:?}"
        );
        assert!(s.stored().is_empty());
    }
}

#[test]
fn unreachable_milter_tempfails_helo_and_mail_but_not_noop_rset_quit() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = server_with(&[(&format!("inet:127.0.0.1:{port}"), "")]);
    let mut c = s.connect();
    let busy = "451 4.7.1 Service unavailable - try again later\r\n";
    assert_eq!(c.cmd("EHLO client.test"), busy);
    assert_eq!(c.cmd("HELO client.test"), busy);
    c.ok("NOOP", 250);
    c.ok("RSET", 250);
    c.ok("QUIT", 221);
    // With accept it is skipped.
    let s = server_with(&[(
        &format!("inet:127.0.0.1:{port}"),
        "default_action = \"accept\"\n",
    )]);
    let mut c = s.ehlo();
    assert!(c
        .transaction("a@x.test", &["b@y.test"], MSG)
        .starts_with("250 2.0.0 "));
    c.ok("QUIT", 221);
    assert_eq!(s.stored().len(), 1);
}

#[test]
fn no_reply_flags_and_declined_stages_are_honoured() {
    // NR_HDR: the fake never answers headers (a client that waited would time out);
    // NOBODY: no body packets at all.
    let f = Fake::start(0, NR_HDR | NOBODY, eom(cont()));
    let (s, r) = one_message(&f, "command_timeout_secs = 5\n");
    assert!(r.starts_with("250 2.0.0 "), "{r}");
    assert_eq!(s.stored().len(), 1);
    wait_until("quit", || f.cmds(0).ends_with('Q'));
    assert_eq!(f.cmds(0), "ODCHDMDRDTLLLDNDEQ");
}

#[test]
fn second_milter_sees_the_first_ones_header() {
    let first = Fake::start(
        ADDHDRS,
        0,
        eom(Act::Send(vec![
            (
                b'h',
                b"Authentication-Results\0mx.test;\n\tdkim=pass\0".to_vec(),
            ),
            (b'c', vec![]),
        ])),
    );
    let second = Fake::start(
        ADDHDRS,
        0,
        eom(Act::Send(vec![
            (b'h', b"X-Second\0ok\0".to_vec()),
            (b'c', vec![]),
        ])),
    );
    let s = server_with(&[(&first.address(), ""), (&second.address(), "")]);
    let mut c = s.ehlo();
    let r = c.transaction("a@x.test", &["b@y.test"], MSG);
    assert!(r.starts_with("250 2.0.0 "), "{r}");
    c.ok("QUIT", 221);
    let headers: Vec<Vec<u8>> = second
        .packets(0)
        .into_iter()
        .filter(|(c, _)| *c == b'L')
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        headers[0],
        b"Authentication-Results\0mx.test;\n\tdkim=pass\0"
    );
    assert_eq!(headers.len(), 4);
    let (_, content) = split_stored(&s.stored()[0].1);
    assert!(
        content.starts_with(
            b"Authentication-Results: mx.test;\r\n\tdkim=pass\r\nX-Second: ok\r\nFrom: "
        ),
        "{}",
        String::from_utf8_lossy(&content)
    );
}

#[test]
fn rset_aborts_and_quit_closes_the_milter() {
    let f = Fake::start(0, 0, eom(cont()));
    let s = server_with(&[(&f.address(), "")]);
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RSET", 250);
    c.ok("QUIT", 221);
    wait_until("quit", || f.cmds(0).ends_with('Q'));
    assert_eq!(f.cmds(0), "ODCHDMAQ");
}

#[test]
fn large_body_goes_in_chunks_of_at_most_64k() {
    let f = Fake::start(0, 0, eom(cont()));
    let s = server_with(&[(&f.address(), "")]);
    let mut c = s.ehlo();
    let line = "x".repeat(998);
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..300 {
        body.extend_from_slice(line.as_bytes());
        body.extend_from_slice(b"\r\n");
    }
    let mut wire = body.clone();
    wire.extend_from_slice(b".\r\n");
    assert!(c
        .transaction("a@x.test", &["b@y.test"], &wire)
        .starts_with("250 2.0.0 "));
    c.ok("QUIT", 221);
    let chunks: Vec<Vec<u8>> = f
        .packets(0)
        .into_iter()
        .filter(|(c, _)| *c == b'B')
        .map(|(_, p)| p)
        .collect();
    assert!(chunks.len() >= 5);
    assert!(chunks.iter().all(|c| c.len() <= 65535));
    assert_eq!(chunks.concat(), body[b"Subject: big\r\n\r\n".len()..]);
}

#[test]
fn a_milter_asking_for_every_action_gets_the_offered_ones() {
    // Rspamd's proxy asks for all of them (0x3f) whatever is offered.
    let f = Fake::start(
        0x3f,
        0,
        eom(Act::Send(vec![
            (b'h', b"X-Spam\0no\0".to_vec()),
            (b'c', vec![]),
        ])),
    );
    let (s, r) = one_message(&f, "");
    assert!(r.starts_with("250 2.0.0 "), "{r}");
    let (_, content) = split_stored(&s.stored()[0].1);
    assert!(content.starts_with(b"X-Spam: no\r\nFrom: "));
    // ...but a recipient change (never offered) is refused as malformed.
    let f = Fake::start(
        0x3f,
        0,
        eom(Act::Send(vec![
            (b'+', b"<x@y.test>\0".to_vec()),
            (b'c', vec![]),
        ])),
    );
    let (s, r) = one_message(&f, "");
    assert_eq!(r, "451 4.7.1 Service unavailable - try again later\r\n");
    assert!(s.stored().is_empty());
}

#[test]
fn milter_that_stops_reading_the_body_costs_only_content_timeout() {
    // The milter stops reading at the first body chunk: the socket buffers fill up and
    // our writes block. The whole message exchange is bounded by content_timeout.
    let f = Fake::start(0, 0, |c, _| if c == b'B' { Act::Stall } else { cont() });
    let s = server_with(&[(
        &f.address(),
        "command_timeout_secs = 30\ncontent_timeout_secs = 2\n",
    )]);
    let mut c = s.ehlo();
    let mut wire = b"Subject: big\r\n\r\n".to_vec();
    let line = [b'y'; 998];
    while wire.len() < 20 << 20 {
        wire.extend_from_slice(&line);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b".\r\n");
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(&wire);
    // Timed from the end of the data: the milter is only asked then.
    let t = Instant::now();
    let r = c.reply().1;
    assert_eq!(r, "451 4.7.1 Service unavailable - try again later\r\n");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(s.stored().is_empty());
}

#[test]
fn discard_at_rcpt_discards_the_message_and_skips_the_content() {
    let f = Fake::start(0, 0, |c, _| {
        if c == b'R' {
            Act::Send(vec![(b'd', vec![])])
        } else {
            cont()
        }
    });
    let (s, r) = one_message(&f, "");
    assert!(r.starts_with("250 "), "{r}");
    assert!(s.stored().is_empty());
    wait_until("quit", || f.cmds(0).ends_with('Q'));
    // No content after RCPT: the milter is told the message is over (ABORT), as
    // Postfix does.
    assert_eq!(f.cmds(0), "ODCHDMDRAQ");
}

#[test]
fn tls_and_auth_macros_after_starttls() {
    let f = Fake::start(0, 0, eom(cont()));
    let s = TestServer::start(Opts {
        tls: true,
        toml: format!("[[milter]]\naddress = {:?}\n", f.address()),
        ..Opts::default()
    });
    let mut c = s.ehlo();
    c.ok("STARTTLS", 220);
    c.upgrade(s.tls_client_config());
    c.ok("EHLO client.test", 250);
    assert!(c
        .transaction("a@x.test", &["b@y.test"], MSG)
        .starts_with("250 2.0.0 "));
    c.ok("QUIT", 221);
    wait_until("quit", || f.cmds(0).ends_with('Q'));
    // The second HELO carries the TLS macros; STARTTLS reset nothing at the milter,
    // which had no transaction open.
    let p = f.packets(0);
    let helos: Vec<usize> = p
        .iter()
        .enumerate()
        .filter(|(_, (c, _))| *c == b'H')
        .map(|(i, _)| i)
        .collect();
    assert_eq!(helos.len(), 2);
    let macros = String::from_utf8_lossy(&p[helos[1] - 1].1).to_string();
    assert!(
        macros.starts_with("H{tls_version}\0TLSv1.3\0{cipher}\0TLS13_"),
        "{macros:?}"
    );
}

#[test]
fn client_address_behind_proxy_is_the_proxied_one() {
    let f = Fake::start(0, 0, eom(cont()));
    let s = TestServer::start(Opts {
        server_extra: "proxy_protocol = true".into(),
        toml: format!("[[milter]]\naddress = {:?}\n", f.address()),
        ..Opts::default()
    });
    let mut c = Client::connect(s.addr);
    c.send_raw(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n");
    assert!(c.reply().1.starts_with("220 "));
    c.ok("EHLO client.test", 250);
    c.ok("QUIT", 221);
    wait_until("quit", || f.cmds(0).ends_with('Q'));
    let p = f.packets(0);
    let mut conn = b"[192.0.2.7]\x004".to_vec();
    conn.extend_from_slice(&40000u16.to_be_bytes());
    conn.extend_from_slice(b"192.0.2.7\0");
    assert_eq!(p[2], (b'C', conn));
    let macros = String::from_utf8_lossy(&p[1].1).to_string();
    assert!(
        macros.contains("{client_addr}\x00192.0.2.7\0"),
        "{macros:?}"
    );
}
