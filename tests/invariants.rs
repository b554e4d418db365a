//! SPEC 4 invariants 1, 2, 4, 5, 6 and 7, each with a test that fails if the invariant
//! breaks. (Invariant 3, STARTTLS injection, lives in tests/tls.rs.)
mod common;
use common::process::{free_port, write_config, ChildServer};
use common::*;
use mailer::hooks::{Envelope, Hooks, SessionInfo};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------
// Invariant 1: durability.

/// What the `done` hook saw: queue id, that file's bytes in new/ (if there), tmp/ names.
type Seen = Arc<Mutex<Vec<(String, Option<Vec<u8>>, Vec<String>)>>>;

/// Records, at the moment the server reports a message stored (the `done` hook runs
/// after the commit and before the 250 is written), what `new/` and `tmp/` hold.
struct SeeSpool {
    spool: Arc<Mutex<Option<PathBuf>>>,
    seen: Seen,
}

impl Hooks for SeeSpool {
    fn done(&self, _s: &SessionInfo, _e: &Envelope, queue_id: &str) {
        let spool = self.spool.lock().unwrap().clone().expect("spool path set");
        let file = dir_names(&spool.join("new"))
            .into_iter()
            .find(|n| n.contains(&format!(".{queue_id}.")))
            .map(|n| std::fs::read(spool.join("new").join(n)).unwrap());
        let tmp = dir_names(&spool.join("tmp"));
        self.seen
            .lock()
            .unwrap()
            .push((queue_id.to_string(), file, tmp));
    }
}

#[test]
fn durability_250_only_once_the_whole_file_is_in_new() {
    let spool = Arc::new(Mutex::new(None));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = TestServer::start(Opts {
        hooks: with_hooks(SeeSpool {
            spool: Arc::clone(&spool),
            seen: Arc::clone(&seen),
        }),
        ..Opts::default()
    });
    *spool.lock().unwrap() = Some(s.spool());
    let mut c = s.ehlo();
    // Big enough (2 MB) that an early ack would catch the file unwritten or in tmp/.
    let mut body = b"Subject: durable\r\n\r\n".to_vec();
    let mut i = 0u32;
    while body.len() < 2 << 20 {
        body.extend_from_slice(format!("line {i:08} of the durable message\r\n").as_bytes());
        i += 1;
    }
    let mut wire = body.clone();
    wire.extend_from_slice(b".\r\n");
    for round in 0..3 {
        let reply = c.transaction("a@x.test", &["b@y.test"], &wire);
        // The instant the 250 arrives: the file is in new/, whole, and tmp/ is empty.
        let new_now = read_maildir(&s.spool());
        let tmp_now = dir_names(&s.spool().join("tmp"));
        assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
        let id = queue_id(&reply);
        let (_, bytes) = new_now
            .iter()
            .find(|(n, _)| n.contains(&format!(".{id}.")))
            .unwrap_or_else(|| panic!("round {round}: 250 for {id} but no file in new/"));
        assert_eq!(split_stored(bytes).1, body, "round {round}: partial file");
        assert!(
            tmp_now.is_empty(),
            "round {round}: tmp/ still holds {tmp_now:?}"
        );
        // And the server itself saw it there before answering.
        let seen = seen.lock().unwrap();
        let (sid, file, tmp) = seen.last().expect("done hook ran");
        assert_eq!(sid, &id);
        assert_eq!(
            split_stored(file.as_ref().expect("in new/ at done")).1,
            body
        );
        assert!(tmp.is_empty(), "{tmp:?}");
    }
}

#[test]
fn durability_debris_in_tmp_is_cleared_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(spool.join(sub)).unwrap();
    }
    std::fs::write(
        spool.join("tmp/1700000000.M1P1Q1.mx.test"),
        b"Return-Path: <a@",
    )
    .unwrap();
    std::fs::write(spool.join("tmp/1700000000.M2P1Q2.mx.test"), b"").unwrap();
    // A whole message already in new/ survives the restart untouched.
    std::fs::write(spool.join("new/1700000000.M3P1Q3.mx.test"), b"kept\r\n").unwrap();
    let toml = format!(
        "hostname = \"mx.test\"\n[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\
         stats_interval_secs = 0\n[spool]\ndir = {:?}\n",
        spool.display().to_string()
    );
    let cfg = mailer::Config::from_toml(&toml, Path::new("t.toml")).unwrap();
    let server = mailer::Server::builder(cfg).build().unwrap();
    let handle = server.handle();
    let addr = handle.local_addrs()[0];
    let t = std::thread::spawn(move || server.run().unwrap());
    // Once a session is greeted, the spool has been opened (and cleaned).
    let mut c = Client::connect(addr);
    assert_eq!(c.reply().0, 220);
    assert!(dir_names(&spool.join("tmp")).is_empty());
    assert_eq!(
        read_maildir(&spool),
        vec![(
            "1700000000.M3P1Q3.mx.test".to_string(),
            b"kept\r\n".to_vec()
        )]
    );
    drop(c);
    handle.shutdown();
    t.join().unwrap();
}

// ---------------------------------------------------------------------------------
// Invariant 2: end of data is <CRLF>.<CRLF> and nothing else.

/// A message whose content hides a complete second transaction behind `sep`.
fn smuggling_payload(sep: &[u8]) -> Vec<u8> {
    let mut p = b"Subject: outer\r\n\r\nbefore".to_vec();
    p.extend_from_slice(sep);
    p.extend_from_slice(
        b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n\
          Subject: smuggled\r\n\r\nevil\r\n.\r\n",
    );
    p
}

const SMUGGLED: &[u8] =
    b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n";

/// Sends one DATA with `payload` (which carries its own real end) and QUIT; returns the
/// final reply to the message. Fails if the server answers anything for the
/// smuggled commands.
fn send_smuggling(s: &TestServer, payload: &[u8]) -> String {
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(payload);
    let (_, reply) = c.reply();
    // A vulnerable server would now answer the smuggled MAIL with 250 2.1.0.
    c.send("QUIT");
    let (code, text) = c.reply();
    assert_eq!(code, 221, "after the message: {text}");
    reply
}

fn has_bare_lf(b: &[u8]) -> bool {
    b.iter()
        .enumerate()
        .any(|(i, &x)| x == b'\n' && (i == 0 || b[i - 1] != b'\r'))
}

/// Sends the smuggling payload with `sep`, asserts it was taken as one message (250,
/// exactly one file) and returns what was stored, without the trace headers.
fn smuggled_into_one_message(s: &TestServer, sep: &[u8]) -> Vec<u8> {
    let reply = send_smuggling(s, &smuggling_payload(sep));
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
    let stored = s.stored();
    assert_eq!(stored.len(), 1, "exactly one message");
    split_stored(&stored[0].1).1
}

/// The outer message as stored when `sep` is content: `before`, then `stored_sep` (what
/// the separator becomes), then the smuggled commands as text.
fn outer_with(stored_sep: &[u8]) -> Vec<u8> {
    let mut want = b"Subject: outer\r\n\r\nbefore".to_vec();
    want.extend_from_slice(stored_sep);
    want.extend_from_slice(SMUGGLED);
    want
}

#[test]
fn smuggling_lf_dot_lf_is_content_one_message_stored_with_crlf() {
    let s = TestServer::plain();
    let body = smuggled_into_one_message(&s, b"\n.\n");
    assert_eq!(body, outer_with(b"\r\n.\r\n"));
}

#[test]
fn smuggling_lf_dot_crlf_is_content_one_message_stored_with_crlf() {
    let s = TestServer::plain();
    let body = smuggled_into_one_message(&s, b"\n.\r\n");
    assert_eq!(body, outer_with(b"\r\n.\r\n"));
}

#[test]
fn smuggling_crlf_dot_lf_is_content_one_message() {
    let s = TestServer::plain();
    let body = smuggled_into_one_message(&s, b"\r\n.\n");
    assert!(
        body.starts_with(b"Subject: outer\r\n\r\nbefore\r\n"),
        "{body:?}"
    );
    assert!(
        body.ends_with(SMUGGLED),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(!has_bare_lf(&body), "bare LF stored: {body:?}");
}

#[test]
fn smuggling_cr_dot_cr_is_content_and_bare_cr_is_kept() {
    let s = TestServer::plain();
    let body = smuggled_into_one_message(&s, b"\r.\r");
    assert_eq!(body, outer_with(b"\r.\r"));
}

#[test]
fn bare_lf_reject_refuses_after_the_real_end_and_stores_nothing() {
    let s = TestServer::with_toml("[limits]\nbare_lf = \"reject\"\n");
    for sep in [&b"\n.\n"[..], b"\n.\r\n", b"\r\n.\n"] {
        let reply = send_smuggling(&s, &smuggling_payload(sep));
        assert_eq!(reply, "550 5.5.2 Error: bare <LF> received\r\n", "{sep:?}");
    }
    // One bare LF anywhere is enough.
    let reply = send_smuggling(&s, b"Subject: x\r\n\r\nok\nline\r\n.\r\n");
    assert_eq!(reply, "550 5.5.2 Error: bare <LF> received\r\n");
    assert!(s.stored().is_empty());
    assert!(dir_names(&s.spool().join("tmp")).is_empty());
    // Bare CR is not bare LF: kept and stored.
    let body = smuggled_into_one_message(&s, b"\r.\r");
    assert_eq!(body, outer_with(b"\r.\r"));
}

#[test]
fn dot_stuffing_is_removed_exactly() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    let reply = c.transaction(
        "a@x.test",
        &["b@y.test"],
        b"Subject: dots\r\n\r\n..\r\n...two\r\n.one\r\nmid.dot.\r\n..\r\n\r\n.\r\n",
    );
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
    let stored = s.stored();
    assert_eq!(
        split_stored(&stored[0].1).1,
        b"Subject: dots\r\n\r\n.\r\n..two\r\none\r\nmid.dot.\r\n.\r\n\r\n"
    );
    // The terminator split across writes still ends the message exactly once.
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    for part in [&b"Subject: split\r\n\r\nx\r"[..], b"\n", b".", b"\r", b"\n"] {
        c.send_raw(part);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.reply().0, 250);
    c.ok("NOOP", 250);
    assert_eq!(s.stored().len(), 2);
}

// ---------------------------------------------------------------------------------
// Invariant 4: bounded memory and time.

#[test]
fn oversize_message_is_drained_answered_552_and_the_session_continues() {
    let s = TestServer::with_toml("[limits]\nmax_message_size = 100000\n");
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    // 5 MB of lines, some of which look like commands; none may be executed.
    let chunk =
        b"QUIT\r\nRSET\r\nsome ordinary text of the oversize message .......\r\n".repeat(1000);
    let mut sent = 0;
    while sent < 5 << 20 {
        c.send_raw(&chunk);
        sent += chunk.len();
    }
    c.send_raw(b".\r\n");
    let (code, text) = c.reply();
    assert_eq!(text, "552 5.3.4 Error: message file too big\r\n", "{code}");
    c.ok("NOOP", 250);
    let reply = c.transaction(
        "a@x.test",
        &["b@y.test"],
        b"Subject: small\r\n\r\nx\r\n.\r\n",
    );
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(split_stored(&stored[0].1).1, b"Subject: small\r\n\r\nx\r\n");
}

/// VmHWM (peak resident set) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn oversize_message_is_not_buffered_peak_memory_stays_small() {
    if !Path::new("/proc/self/status").exists() {
        eprintln!("skipped: no /proc to read the peak memory from");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        free_port(),
        &dir.path().join("spool"),
        "",
        "[limits]\nmax_message_size = 100000\n",
    );
    let mut p = ChildServer::start(&cfg, &[]);
    let addr = p.ready(1)[0];
    let before = peak_rss_kib(p.pid());
    let mut c = Client::connect(addr);
    assert_eq!(c.reply().0, 220);
    c.ok("EHLO client.test", 250);
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    let chunk =
        b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(4096);
    let mut sent = 0;
    while sent < 32 << 20 {
        c.send_raw(&chunk);
        sent += chunk.len();
    }
    c.send_raw(b".\r\n");
    assert!(c.reply().1.starts_with("552 5.3.4 "));
    c.ok("NOOP", 250);
    let after = peak_rss_kib(p.pid());
    eprintln!("server peak RSS: {before} KiB before, {after} KiB after 32 MB");
    // 32 MB went through; the server's peak grew by far less than that.
    assert!(
        after < before + 16 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB for a 32 MB message"
    );
    assert!(read_maildir(&dir.path().join("spool")).is_empty());
}

#[test]
fn a_100_kb_command_line_is_500_5_5_6_and_its_tail_is_never_executed() {
    let s = TestServer::plain();
    let mut c = s.ehlo();
    // A huge line whose tail would close the session if it were taken as a command.
    let mut line = "NOOP ".to_string();
    while line.len() < 100 * 1024 {
        line.push_str("QUIT\r");
    }
    line.push_str("QUIT");
    c.send(&line);
    assert_eq!(c.reply().1, "500 5.5.6 Error: line too long\r\n");
    c.ok("NOOP", 250);
    // The same without a line end for a while (sent in pieces), then the end.
    for _ in 0..10 {
        c.send_raw(&[b'x'; 10 * 1024]);
    }
    c.send_raw(b"\r\n");
    assert_eq!(c.reply().1, "500 5.5.6 Error: line too long\r\n");
    let reply = c.transaction("a@x.test", &["b@y.test"], b"Subject: l\r\n\r\nx\r\n.\r\n");
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
}

// ---------------------------------------------------------------------------------
// Invariant 5: no panic on any input; one session's fault never ends another.

/// Counts panics on the server's own threads (worker-N, accept-*, spool-writer) in this
/// test process: a caught panic is invisible on the wire, so catch it here.
fn server_panics() -> &'static AtomicUsize {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().unwrap_or("").to_string();
            if name.starts_with("worker-")
                || name.starts_with("accept-")
                || name.starts_with("spool-writer")
            {
                COUNT.fetch_add(1, Ordering::SeqCst);
            }
            prev(info);
        }));
    });
    &COUNT
}

/// xorshift64*: a small seeded generator so failures are reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const FRAGMENTS: &[&[u8]] = &[
    b"EHLO x\r\n",
    b"HELO \r\n",
    b"MAIL FROM:<a@x.test>\r\n",
    b"MAIL FROM:<\"\\\r\n",
    b"MAIL FROM:<a@x.test> SIZE=99999999999999999999999\r\n",
    b"RCPT TO:<b@y.test>\r\n",
    b"RCPT TO:<@,@:@>\r\n",
    b"DATA\r\n",
    b"\r\n.\r\n",
    b".\r\n",
    b"BDAT 7\r\n",
    b"BDAT 100 LAST\r\n",
    b"BDAT 0 LAST\r\n",
    b"AUTH PLAIN\r\n",
    b"STARTTLS\r\n",
    b"RSET\r\n",
    b"\xff\xfe\x00\r\n",
    b"\n",
    b"\r",
    b"VRFY \xc3\x28\r\n",
    b"MAIL FROM:<\xe2\x82\xac@x.test> SMTPUTF8\r\n",
];

/// Seeded garbage: random bytes mixed with command fragments, ~40 KB.
fn garbage(seed: u64) -> Vec<u8> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut out = Vec::new();
    while out.len() < 40 * 1024 {
        if r.below(3) == 0 {
            out.extend_from_slice(FRAGMENTS[r.below(FRAGMENTS.len())]);
        } else {
            let n = r.below(200);
            for _ in 0..n {
                out.push(r.next() as u8);
            }
        }
    }
    out
}

#[test]
fn no_panic_on_garbage_and_other_sessions_and_the_server_carry_on() {
    let panics = server_panics();
    let s = TestServer::with_toml(
        "[limits]\nmax_errors = 100000\ncommand_timeout_secs = 5\ndata_timeout_secs = 2\n\
         max_message_size = 200000\n",
    );
    // A normal session open the whole time.
    let mut bystander = s.ehlo();
    bystander.ok("MAIL FROM:<a@x.test>", 250);
    let before = panics.load(Ordering::SeqCst);
    let threads: Vec<_> = (0..6u64)
        .map(|seed| {
            let addr = s.addr;
            std::thread::spawn(move || {
                let mut tcp = TcpStream::connect(addr).unwrap();
                tcp.set_read_timeout(Some(WAIT)).unwrap();
                tcp.set_write_timeout(Some(WAIT)).unwrap();
                let mut rd = tcp.try_clone().unwrap();
                // Drain replies so the server never blocks writing them.
                let reader = std::thread::spawn(move || {
                    let mut sink = Vec::new();
                    let _ = rd.read_to_end(&mut sink);
                    sink.len()
                });
                let g = garbage(seed);
                for piece in g.chunks(997) {
                    if tcp.write_all(piece).is_err() {
                        break; // the server may close on e.g. STARTTLS injection
                    }
                }
                let _ = tcp.shutdown(Shutdown::Write);
                let start = Instant::now();
                reader.join().unwrap();
                assert!(start.elapsed() < WAIT * 2);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("garbage client thread");
    }
    assert_eq!(
        panics.load(Ordering::SeqCst),
        before,
        "a server thread panicked"
    );
    // The bystander's transaction is intact; new clients are served.
    bystander.ok("RCPT TO:<b@y.test>", 250);
    bystander.ok("DATA", 354);
    bystander.send_raw(b"Subject: alive\r\n\r\nstill here\r\n.\r\n");
    assert!(bystander.reply().1.starts_with("250 2.0.0 "));
    let mut fresh = s.ehlo();
    let reply = fresh.transaction(
        "a@x.test",
        &["b@y.test"],
        b"Subject: fresh\r\n\r\nx\r\n.\r\n",
    );
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
    let bodies: Vec<Vec<u8>> = s.stored().iter().map(|(_, b)| split_stored(b).1).collect();
    assert!(bodies.contains(&b"Subject: alive\r\n\r\nstill here\r\n".to_vec()));
    assert!(bodies.contains(&b"Subject: fresh\r\n\r\nx\r\n".to_vec()));
    assert_eq!(
        panics.load(Ordering::SeqCst),
        before,
        "a server thread panicked"
    );
}

// ---------------------------------------------------------------------------------
// Invariant 6: pipelining.

#[test]
fn pipelined_transaction_in_one_write_is_answered_in_order() {
    let s = TestServer::plain();
    let mut c = s.connect();
    c.send_raw(
        b"EHLO client.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n\
          RCPT TO:<bad address>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n",
    );
    let (code, ehlo) = c.reply();
    assert_eq!(code, 250);
    assert!(ehlo.contains("250-PIPELINING\r\n"), "{ehlo}");
    assert_eq!(c.reply().1, "250 2.1.0 Ok\r\n");
    assert_eq!(c.reply().1, "250 2.1.5 Ok\r\n");
    assert_eq!(c.reply().0, 553);
    assert_eq!(c.reply().1, "250 2.1.5 Ok\r\n");
    assert_eq!(c.reply().0, 354);
    // Body, end of data and QUIT in one write.
    c.send_raw(b"Subject: piped\r\n\r\nbody\r\n.\r\nQUIT\r\n");
    let (code, reply) = c.reply();
    assert_eq!(code, 250, "{reply}");
    assert_eq!(c.reply().1, "221 2.0.0 Bye\r\n");
    assert!(c.read_to_close().is_empty());
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    assert!(stored[0].0.contains(&format!(".{}.", queue_id(&reply))));
    let (trace, body) = split_stored(&stored[0].1);
    assert!(trace.starts_with("Return-Path: <a@x.test>\r\nX-Original-To: b@y.test\r\nX-Original-To: c@y.test\r\nReceived: "), "{trace}");
    assert_eq!(body, b"Subject: piped\r\n\r\nbody\r\n");
}

#[test]
fn two_whole_transactions_in_one_write() {
    let s = TestServer::plain();
    let mut c = s.connect();
    c.send_raw(
        b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n\
          Subject: one\r\n\r\n1\r\n.\r\n\
          MAIL FROM:<a@x.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n\
          Subject: two\r\n\r\n2\r\n.\r\nQUIT\r\n",
    );
    let codes: Vec<u16> = (0..9).map(|_| c.reply().0).collect();
    assert_eq!(codes, [250, 250, 250, 354, 250, 250, 250, 354, 250]);
    assert_eq!(c.reply().0, 221);
    let bodies: Vec<Vec<u8>> = s.stored().iter().map(|(_, b)| split_stored(b).1).collect();
    assert_eq!(bodies.len(), 2);
    assert!(bodies.contains(&b"Subject: one\r\n\r\n1\r\n".to_vec()));
    assert!(bodies.contains(&b"Subject: two\r\n\r\n2\r\n".to_vec()));
}

#[test]
fn replies_are_flushed_before_the_server_blocks_on_reading() {
    let s = TestServer::with_toml("[limits]\ncommand_timeout_secs = 60\n");
    let mut c = s.ehlo();
    // A single command and a wait: the reply must come without more input.
    c.tcp()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    c.ok("NOOP", 250);
    // Two whole commands and the start of a third: both replies arrive although the
    // server is now blocked waiting for the rest of the third line.
    c.send_raw(b"NOOP\r\nRSET\r\nNO");
    assert_eq!(c.reply().1, "250 2.0.0 Ok\r\n");
    assert_eq!(c.reply().1, "250 2.0.0 Ok\r\n");
    c.send_raw(b"OP\r\n");
    assert_eq!(c.reply().1, "250 2.0.0 Ok\r\n");
}

// ---------------------------------------------------------------------------------
// Invariant 7: graceful stop (the real binary, real signals).

struct Stopping {
    _dir: tempfile::TempDir,
    spool: PathBuf,
    proc: ChildServer,
    addr: std::net::SocketAddr,
}

fn start_binary(grace: u64) -> Stopping {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let cfg = write_config(
        dir.path(),
        free_port(),
        &spool,
        &format!("shutdown_grace_secs = {grace}"),
        "[limits]\ndata_timeout_secs = 60\ncommand_timeout_secs = 60\n",
    );
    let mut proc = ChildServer::start(&cfg, &[]);
    let addr = proc.ready(1)[0];
    Stopping {
        _dir: dir,
        spool,
        proc,
        addr,
    }
}

impl Stopping {
    /// Waits up to `limit` for the binary to exit (`what` says why it should) and
    /// asserts exit status 0.
    fn exits_0_within(&mut self, limit: Duration, what: &str) {
        let status = self.proc.wait_exit(limit).expect(what);
        assert!(
            status.success(),
            "exit status {status}; log:\n{}",
            self.proc.log()
        );
    }
}

fn greeted(addr: std::net::SocketAddr) -> Client {
    let mut c = Client::connect(addr);
    assert_eq!(c.reply().0, 220);
    c.ok("EHLO client.test", 250);
    c
}

#[test]
fn sigterm_idle_sessions_get_421_4_3_2_messages_in_data_finish_and_exit_is_0() {
    let mut st = start_binary(10);
    let addr = st.addr;
    let mut idle = greeted(addr);
    let mut busy = greeted(addr);
    busy.ok("MAIL FROM:<a@x.test>", 250);
    busy.ok("RCPT TO:<b@y.test>", 250);
    busy.ok("DATA", 354);
    busy.send_raw(b"Subject: in flight\r\n\r\nfirst half\r\n");
    let signalled = Instant::now();
    st.proc.signal("TERM");
    // The idle session is told at once and closed.
    let rest = String::from_utf8(idle.read_to_close()).unwrap();
    assert_eq!(
        rest,
        "421 4.3.2 mx.test Service shutting down, closing transmission channel\r\n"
    );
    // No new connections once stopping (the listener is closed by now).
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(_) => {}
        Ok(mut t) => {
            // Accepted by the kernel only if the socket was still there: no greeting.
            t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = Vec::new();
            let _ = t.read_to_end(&mut buf);
            assert!(!buf.starts_with(b"220"), "greeted while stopping");
        }
    }
    // The message in DATA finishes and is stored; then the session is closed.
    busy.send_raw(b"second half\r\n.\r\n");
    let (code, reply) = busy.reply();
    assert_eq!(code, 250, "{reply}");
    let id = queue_id(&reply);
    let rest = String::from_utf8(busy.read_to_close()).unwrap();
    assert_eq!(
        rest,
        "421 4.3.2 mx.test Service shutting down, closing transmission channel\r\n"
    );
    st.exits_0_within(Duration::from_secs(10), "exits within shutdown_grace_secs");
    assert!(signalled.elapsed() < Duration::from_secs(10));
    let stored = read_maildir(&st.spool);
    assert_eq!(stored.len(), 1);
    assert!(stored[0].0.contains(&format!(".{id}.")));
    assert_eq!(
        split_stored(&stored[0].1).1,
        b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n"
    );
    assert!(dir_names(&st.spool.join("tmp")).is_empty());
}

#[test]
fn sigint_stops_gracefully_with_exit_0() {
    let mut st = start_binary(5);
    let mut idle = greeted(st.addr);
    st.proc.signal("INT");
    let rest = String::from_utf8(idle.read_to_close()).unwrap();
    assert!(rest.starts_with("421 4.3.2 "), "{rest}");
    st.exits_0_within(Duration::from_secs(5), "exits");
}

#[test]
fn a_message_that_never_finishes_does_not_hold_the_stop_past_the_grace_period() {
    let mut st = start_binary(2);
    let mut stuck = greeted(st.addr);
    stuck.ok("MAIL FROM:<a@x.test>", 250);
    stuck.ok("RCPT TO:<b@y.test>", 250);
    stuck.ok("DATA", 354);
    stuck.send_raw(b"Subject: never ends\r\n\r\n");
    let signalled = Instant::now();
    st.proc.signal("TERM");
    st.exits_0_within(Duration::from_secs(6), "exits after the grace period");
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_millis(3000),
        "took {took:?} with a 2 s grace"
    );
    stuck.read_to_close();
    assert!(
        read_maildir(&st.spool).is_empty(),
        "an unfinished message was stored"
    );
}
