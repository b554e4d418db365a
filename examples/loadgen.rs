//! SMTP load generator for `bench/compare.sh` (issue 9): plain threads, blocking sockets.
//!
//! ```text
//! cargo run --release --example loadgen -- --host 127.0.0.1 --port 2525 \
//!     --sessions 32 --messages 20000 --size 4096 --rcpts 1 --per-conn 10 --pipelining
//! ```
//!
//! Each of `--sessions` threads opens a connection, EHLOs (STARTTLS first with
//! `--starttls`), sends up to `--per-conn` messages, QUITs and reconnects, until
//! `--messages` messages have been sent in all. Every message's final reply must be 250;
//! anything else (or a broken connection) counts as failed. Latency is measured per
//! message from writing MAIL to reading the final reply to the data. Prints one JSON line.
//!
//! `--idle N --hold-secs S` instead opens N connections (greeting + EHLO each), prints
//! `{"idle_open":N,...}`, keeps them open for S seconds (or until stdin reaches EOF),
//! then QUITs them: used to measure server memory with many open sessions.

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: loadgen --host H --port P [--sessions N] [--messages TOTAL] [--size BYTES]
               [--rcpts N] [--per-conn N] [--pipelining] [--starttls] [--insecure]
               [--timeout SECS] [--domain D]
       loadgen --host H --port P --idle N [--hold-secs S]";

#[derive(Clone, Debug)]
struct Opts {
    host: String,
    port: u16,
    sessions: usize,
    messages: u64,
    size: usize,
    rcpts: usize,
    per_conn: u64,
    pipelining: bool,
    starttls: bool,
    insecure: bool,
    /// Bound on the whole run; sessions stop claiming messages after it.
    timeout: Duration,
    domain: String,
    idle: usize,
    hold: Duration,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        host: "127.0.0.1".into(),
        port: 2525,
        sessions: 1,
        messages: 100,
        size: 4096,
        rcpts: 1,
        per_conn: 10,
        pipelining: false,
        starttls: false,
        insecure: false,
        timeout: Duration::from_secs(300),
        domain: "example.test".into(),
        idle: 0,
        hold: Duration::from_secs(30),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
            v.parse().map_err(|_| format!("{name}: not a number: {v}"))
        }
        match a.as_str() {
            "--host" => o.host = val(&a)?,
            "--port" => o.port = num(&a, val(&a)?)?,
            "--sessions" => o.sessions = num(&a, val(&a)?)?,
            "--messages" => o.messages = num(&a, val(&a)?)?,
            "--size" => o.size = num(&a, val(&a)?)?,
            "--rcpts" => o.rcpts = num(&a, val(&a)?)?,
            "--per-conn" => o.per_conn = num(&a, val(&a)?)?,
            "--pipelining" => o.pipelining = true,
            "--starttls" => o.starttls = true,
            "--insecure" => o.insecure = true,
            "--timeout" => o.timeout = Duration::from_secs(num(&a, val(&a)?)?),
            "--domain" => o.domain = val(&a)?,
            "--idle" => o.idle = num(&a, val(&a)?)?,
            "--hold-secs" => o.hold = Duration::from_secs(num(&a, val(&a)?)?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.sessions == 0 || o.rcpts == 0 || o.per_conn == 0 {
        return Err("--sessions, --rcpts and --per-conn must be at least 1".into());
    }
    Ok(o)
}

fn tls_config(insecure: bool) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let cfg = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(mailer::client::dangerous::AnyCertificate::new())
            .with_no_client_auth()
    } else {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(cfg))
}

/// Plain or TLS; boxed so the session code is written once.
trait Io: Read + Write + Send {}
impl<T: Read + Write + Send> Io for T {}

/// One SMTP client connection with a buffered reader for replies.
struct Conn {
    rd: BufReader<Box<dyn Io>>,
    line: String,
}

impl Conn {
    fn open(addr: SocketAddr, o: &Opts, tls: Option<&Arc<ClientConfig>>) -> io::Result<Conn> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(60)))?;
        // Plain sessions use one descriptor (`--idle` holds a thousand of them); a TLS
        // session keeps `tcp` for the handshake below.
        let (io, tcp): (Box<dyn Io>, _) = if tls.is_some() {
            (Box::new(tcp.try_clone()?), Some(tcp))
        } else {
            (Box::new(tcp), None)
        };
        let mut c = Conn {
            rd: BufReader::with_capacity(16 * 1024, io),
            line: String::new(),
        };
        c.expect(220)?;
        c.send(b"EHLO loadgen.test\r\n")?;
        c.expect(250)?;
        if let (Some(cfg), Some(tcp)) = (tls, tcp) {
            c.send(b"STARTTLS\r\n")?;
            c.expect(220)?;
            let name = ServerName::try_from(o.host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let conn = ClientConnection::new(Arc::clone(cfg), name).map_err(io::Error::other)?;
            let mut s = StreamOwned::new(conn, tcp);
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock)?;
            }
            c.rd = BufReader::with_capacity(16 * 1024, Box::new(s));
            c.send(b"EHLO loadgen.test\r\n")?;
            c.expect(250)?;
        }
        Ok(c)
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let w = self.rd.get_mut();
        w.write_all(bytes)?;
        w.flush()
    }

    /// Reads one (possibly multi-line) reply with the library's parser; returns its
    /// code and keeps its last line in `line`.
    fn reply(&mut self) -> io::Result<u16> {
        let reply = mailer::client::read_reply(&mut self.rd)?;
        self.line.clear();
        self.line
            .push_str(reply.lines.last().map_or("", String::as_str));
        Ok(reply.code)
    }

    fn expect(&mut self, code: u16) -> io::Result<()> {
        let got = self.reply()?;
        if got != code {
            return Err(io::Error::other(format!(
                "expected {code}, got {:?}",
                self.line.trim_end()
            )));
        }
        Ok(())
    }
}

/// What one message transaction does on the wire.
struct Script {
    /// `MAIL` + `RCPT`s (+ `DATA` when pipelining) as one write.
    envelope: Vec<u8>,
    /// Dot-stuffed content with the terminator.
    body: Vec<u8>,
}

fn script(o: &Opts) -> Script {
    let mut envelope = format!("MAIL FROM:<sender@{}>\r\n", o.domain);
    for i in 0..o.rcpts {
        envelope.push_str(&format!("RCPT TO:<rcpt{i}@{}>\r\n", o.domain));
    }
    envelope.push_str("DATA\r\n");
    // Headers, then 78-byte lines ("x..." + CRLF) up to `size` bytes of content.
    let mut body = format!(
        "From: <sender@{d}>\r\nTo: <rcpt0@{d}>\r\nSubject: load test\r\nMessage-ID: <lg@{d}>\r\n\r\n",
        d = o.domain
    )
    .into_bytes();
    let line: Vec<u8> = (0..76)
        .map(|i| b'a' + (i % 26) as u8)
        .chain(*b"\r\n")
        .collect();
    while body.len() + line.len() <= o.size {
        body.extend_from_slice(&line);
    }
    let rest = o.size.saturating_sub(body.len());
    if rest >= 3 {
        body.extend(std::iter::repeat_n(b'z', rest - 2));
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b".\r\n");
    Script {
        envelope: envelope.into_bytes(),
        body,
    }
}

/// One message: Ok(true) when the final reply was 250.
fn transaction(c: &mut Conn, s: &Script, o: &Opts) -> io::Result<bool> {
    if o.pipelining {
        // RFC 2920: MAIL, RCPTs and DATA in one group, DATA last.
        c.send(&s.envelope)?;
        let mut ok = c.reply()? == 250;
        for _ in 0..o.rcpts {
            ok &= c.reply()? == 250;
        }
        let data = c.reply()?;
        if data != 354 {
            return Ok(false);
        }
        c.send(&s.body)?;
        let fin = c.reply()?;
        return Ok(ok && fin == 250);
    }
    let mut start = 0;
    for (i, b) in s.envelope.iter().enumerate() {
        if *b == b'\n' {
            let cmd = &s.envelope[start..=i];
            start = i + 1;
            c.send(cmd)?;
            let code = c.reply()?;
            let want = if cmd.starts_with(b"DATA") { 354 } else { 250 };
            if code != want {
                // Leave the transaction; the next one starts clean.
                c.send(b"RSET\r\n")?;
                c.reply()?;
                return Ok(false);
            }
        }
    }
    c.send(&s.body)?;
    Ok(c.reply()? == 250)
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    /// Per successful message, microseconds.
    lat: Vec<u32>,
    errors: Vec<String>,
}

fn session_thread(
    addr: SocketAddr,
    o: Arc<Opts>,
    s: Arc<Script>,
    tls: Option<Arc<ClientConfig>>,
    next: Arc<AtomicU64>,
    deadline: Instant,
) -> Tally {
    let mut t = Tally::default();
    let claim = || {
        if Instant::now() >= deadline {
            return false;
        }
        next.fetch_add(1, Ordering::Relaxed) < o.messages
    };
    'conns: loop {
        if !claim() {
            break;
        }
        let mut c = match Conn::open(addr, &o, tls.as_ref()) {
            Ok(c) => c,
            Err(e) => {
                t.failed += 1;
                note(&mut t, format!("connect: {e}"));
                // Do not spin on a refusing server.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let mut sent = 0;
        loop {
            let began = Instant::now();
            match transaction(&mut c, &s, &o) {
                Ok(true) => {
                    t.ok += 1;
                    t.lat
                        .push(began.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                Ok(false) => {
                    t.failed += 1;
                    note(&mut t, format!("refused: {}", c.line.trim_end()));
                }
                Err(e) => {
                    t.failed += 1;
                    note(&mut t, format!("session: {e}"));
                    continue 'conns;
                }
            }
            sent += 1;
            if sent == o.per_conn || !claim() {
                break;
            }
        }
        let _ = c.send(b"QUIT\r\n").and_then(|_| c.expect(221));
    }
    t
}

fn note(t: &mut Tally, e: String) {
    if t.errors.len() < 3 {
        t.errors.push(e);
    }
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

fn idle(addr: SocketAddr, o: &Opts) -> Result<(), String> {
    let began = Instant::now();
    let mut conns = Vec::with_capacity(o.idle);
    for i in 0..o.idle {
        if began.elapsed() > o.timeout {
            return Err(format!("opened only {i} connections in time"));
        }
        conns.push(Conn::open(addr, o, None).map_err(|e| format!("connection {i}: {e}"))?);
    }
    println!(
        "{{\"idle_open\":{},\"secs\":{:.3}}}",
        conns.len(),
        began.elapsed().as_secs_f64()
    );
    let _ = io::stdout().flush();
    // Hold until stdin closes or the time is up, whichever is first.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = io::stdin().read_to_end(&mut sink);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(o.hold);
    for c in &mut conns {
        let _ = c.send(b"QUIT\r\n");
    }
    Ok(())
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("loadgen: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let addr = match (o.host.as_str(), o.port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
    {
        Some(a) => a,
        None => {
            eprintln!("loadgen: cannot resolve {}", o.host);
            return ExitCode::from(2);
        }
    };
    if o.idle > 0 {
        return match idle(addr, &o) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("loadgen: {e}");
                ExitCode::from(1)
            }
        };
    }
    let tls = if o.starttls {
        match tls_config(o.insecure) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("loadgen: TLS: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let s = Arc::new(script(&o));
    let o = Arc::new(o);
    let next = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let deadline = began + o.timeout;
    let threads: Vec<_> = (0..o.sessions)
        .map(|_| {
            let (o, s, tls, next) = (
                Arc::clone(&o),
                Arc::clone(&s),
                tls.clone(),
                Arc::clone(&next),
            );
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || session_thread(addr, o, s, tls, next, deadline))
        })
        .collect();
    let mut all = Tally::default();
    for th in threads {
        match th.map_err(|e| e.to_string()).and_then(|h| {
            h.join()
                .map_err(|_| "a session thread panicked".to_string())
        }) {
            Ok(t) => {
                all.ok += t.ok;
                all.failed += t.failed;
                all.lat.extend(t.lat);
                for e in t.errors {
                    if all.errors.len() < 5 {
                        all.errors.push(e);
                    }
                }
            }
            Err(e) => {
                eprintln!("loadgen: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let secs = began.elapsed().as_secs_f64();
    all.lat.sort_unstable();
    let content = (s.body.len() - 3) as f64;
    // Written by hand so the keys keep this order (serde_json's map sorts them).
    let report = format!(
        "{{\"sessions\":{},\"messages\":{},\"ok\":{},\"failed\":{},\"secs\":{},\"msgs_per_sec\":{},\"mib_per_sec\":{},\"p50_ms\":{},\"p99_ms\":{},\"max_ms\":{}}}",
        o.sessions,
        all.ok + all.failed,
        all.ok,
        all.failed,
        num(secs),
        num(all.ok as f64 / secs),
        num(all.ok as f64 * content / secs / 1048576.0),
        num(pct(&all.lat, 0.50)),
        num(pct(&all.lat, 0.99)),
        num(all.lat.last().copied().unwrap_or(0) as f64 / 1000.0),
    );
    println!("{report}");
    for e in &all.errors {
        eprintln!("loadgen: {e}");
    }
    if all.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// A JSON number with three decimals (always finite here).
fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "0".into()
    }
}
