//! Shared test harness: an in-process server on an ephemeral loopback port, an SMTP
//! client that speaks over plain TCP or TLS, certificates made with rcgen, and helpers
//! to read the spool. Every wait is bounded.
#![allow(dead_code)]

/// The real binary as a child process: see `process.rs`.
pub mod process;

use mailer::hooks::Hooks;
use mailer::{Config, Handle, Server};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A self-signed certificate for `localhost` written to `dir`.
pub struct TestCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

pub fn make_cert(dir: &Path, name: &str) -> TestCert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    let cert = dir.join(format!("{name}-cert.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    TestCert {
        cert,
        key,
        der: ck.cert.der().clone(),
    }
}

/// A server running in this process. Stopped (gracefully) on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The implicit-TLS address when `tls_listen` was configured.
    pub tls_addr: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    pub cert: Option<TestCert>,
    pub handle: Handle,
    spool_dir: PathBuf,
    thread: Option<JoinHandle<()>>,
}

/// Options for [`TestServer::start`].
#[derive(Default)]
pub struct Opts {
    /// Extra TOML appended to the generated config (sections such as `[limits]`).
    pub toml: String,
    /// Configure `[tls]` with a fresh certificate.
    pub tls: bool,
    /// Also listen for implicit TLS.
    pub implicit_tls: bool,
    /// Lines to put inside the `[tls]` section (e.g. `require_tls = true`).
    pub tls_extra: String,
    /// Lines inside `[server]` (e.g. `workers = 2`).
    pub server_extra: String,
    /// The spool directory; default `<temp dir>/spool`.
    pub spool: Option<PathBuf>,
    pub hooks:
        Option<Box<dyn FnOnce(mailer::server::ServerBuilder) -> mailer::server::ServerBuilder>>,
}

impl TestServer {
    /// A server with default settings on 127.0.0.1:0 and a temporary spool.
    pub fn plain() -> TestServer {
        TestServer::start(Opts::default())
    }

    /// A server with extra TOML (top-level sections) appended.
    pub fn with_toml(toml: &str) -> TestServer {
        TestServer::start(Opts {
            toml: toml.to_string(),
            ..Opts::default()
        })
    }

    pub fn start(opts: Opts) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let cert = (opts.tls || opts.implicit_tls).then(|| make_cert(dir.path(), "server"));
        let toml = config_toml(dir.path(), cert.as_ref(), &opts);
        let spool_dir = opts
            .spool
            .clone()
            .unwrap_or_else(|| dir.path().join("spool"));
        let cfg = Config::from_toml(&toml, Path::new("test.toml")).expect("test config");
        let mut builder = Server::builder(cfg);
        if let Some(f) = opts.hooks {
            builder = f(builder);
        }
        let server = builder.build().expect("server builds");
        let handle = server.handle();
        let addrs = handle.local_addrs();
        let thread = std::thread::spawn(move || server.run().expect("server runs"));
        let s = TestServer {
            addr: addrs[0],
            tls_addr: opts.implicit_tls.then(|| addrs[1]),
            spool_dir: spool_dir.clone(),
            dir,
            cert,
            handle,
            thread: Some(thread),
        };
        s.wait_ready();
        s
    }

    /// The spool's `new/` directory: the server creates it when `run` starts.
    fn wait_ready(&self) {
        wait_until("spool created", || self.spool().join("new").is_dir());
    }

    pub fn spool(&self) -> PathBuf {
        self.spool_dir.clone()
    }

    /// Stored messages in `new/`, sorted by name (time, then sequence).
    pub fn stored(&self) -> Vec<(String, Vec<u8>)> {
        read_maildir(&self.spool())
    }

    /// Connects and reads the greeting.
    pub fn connect(&self) -> Client {
        let mut c = Client::connect(self.addr);
        let (code, _) = c.reply();
        assert_eq!(code, 220, "greeting");
        c
    }

    /// Connects, reads the greeting and says EHLO.
    pub fn ehlo(&self) -> Client {
        let mut c = self.connect();
        c.ok("EHLO client.test", 250);
        c
    }

    /// A TLS client config trusting this server's certificate.
    pub fn tls_client_config(&self) -> Arc<ClientConfig> {
        client_config(&self.cert.as_ref().expect("server has TLS").der)
    }

    /// Stops gracefully and waits for `run` to return.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + WAIT * 4;
            while !t.is_finished() {
                assert!(Instant::now() < deadline, "server did not stop");
                std::thread::sleep(Duration::from_millis(10));
            }
            t.join().expect("server thread");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.stop_inner();
        } else {
            self.handle.shutdown();
        }
    }
}

fn config_toml(dir: &Path, cert: Option<&TestCert>, opts: &Opts) -> String {
    let mut t = String::new();
    t.push_str("hostname = \"mx.test\"\n[server]\nlisten = [\"127.0.0.1:0\"]\n");
    if opts.implicit_tls {
        t.push_str("tls_listen = [\"127.0.0.1:0\"]\n");
    }
    // Defaults for tests, unless `server_extra` sets them (TOML forbids duplicate keys).
    for (key, value) in [
        ("workers", "8"),
        ("shutdown_grace_secs", "5"),
        ("stats_interval_secs", "0"),
    ] {
        let set = opts
            .server_extra
            .lines()
            .any(|l| l.split('=').next().is_some_and(|k| k.trim() == key));
        if !set {
            t.push_str(&format!("{key} = {value}\n"));
        }
    }
    t.push_str(&opts.server_extra);
    t.push('\n');
    if let Some(c) = cert {
        t.push_str(&format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n{}\n",
            c.cert.display().to_string(),
            c.key.display().to_string(),
            opts.tls_extra
        ));
    }
    t.push_str(&format!(
        "[spool]\ndir = {:?}\nfsync = true\n",
        opts.spool
            .clone()
            .unwrap_or_else(|| dir.join("spool"))
            .display()
            .to_string()
    ));
    t.push_str(&opts.toml);
    t
}

/// Files in `<dir>/new`, sorted by name.
pub fn read_maildir(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("new"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    (
                        e.file_name().into_string().unwrap(),
                        std::fs::read(e.path()).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    // In delivery order: the names' microseconds are not zero-padded (`M99` after
    // `M100` by bytes), so order by the numbers, then the queue sequence.
    v.sort_by_key(|(name, _)| (maildir_order(name), name.clone()));
    v
}

/// (seconds, microseconds, sequence) from a `<secs>.M<usec>P<pid>R<token>Q<seq>.<host>`
/// name; zeros for other names.
fn maildir_order(name: &str) -> (u64, u64, u64) {
    let num = |s: &str| {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or(0)
    };
    let (secs, rest) = name.split_once('.').unwrap_or((name, ""));
    let usec = rest.strip_prefix('M').map_or(0, num);
    let seq = rest.split_once('Q').map_or(0, |(_, q)| num(q));
    (num(secs), usec, seq)
}

/// Splits a stored file into (trace headers, message). The trace block is the
/// Return-Path, X-Original-To and Received lines (with its folded continuation lines).
pub fn split_stored(file: &[u8]) -> (String, Vec<u8>) {
    let text = file;
    let mut pos = 0;
    loop {
        let rest = &text[pos..];
        let is_trace = rest.starts_with(b"Return-Path: ")
            || rest.starts_with(b"X-Original-To: ")
            || rest.starts_with(b"Received: ")
            // Continuation lines of a folded trace header (`        by …`, `        id …`).
            || (pos > 0 && rest.starts_with(b"        "));
        if !is_trace {
            break;
        }
        let end = rest.windows(2).position(|w| w == b"\r\n").expect("CRLF") + 2;
        pos += end;
    }
    (
        String::from_utf8(text[..pos].to_vec()).unwrap(),
        text[pos..].to_vec(),
    )
}

/// Polls `cond` every 10 ms until it holds; fails the test after [`WAIT`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A rustls client config trusting exactly `root`.
pub fn client_config(root: &CertificateDer<'static>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

trait Io: Read + Write + Send {}
impl<T: Read + Write + Send> Io for T {}

/// A line-oriented SMTP test client over TCP, upgradable to TLS.
pub struct Client {
    io: Option<BufReader<Box<dyn Io>>>,
    tcp: TcpStream,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        tcp.set_write_timeout(Some(WAIT)).unwrap();
        let io: Box<dyn Io> = Box::new(tcp.try_clone().unwrap());
        Client {
            io: Some(BufReader::new(io)),
            tcp,
        }
    }

    /// Connects with implicit TLS and completes the handshake.
    pub fn connect_tls(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Client {
        let mut c = Client::connect(addr);
        c.upgrade(cfg);
        c
    }

    /// Replaces the stream with TLS over the same socket (after `220` to STARTTLS).
    pub fn upgrade(&mut self, cfg: Arc<ClientConfig>) {
        let old = self.io.take().expect("stream");
        assert!(
            old.buffer().is_empty(),
            "bytes buffered before the TLS handshake"
        );
        let conn = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
        let mut tls = StreamOwned::new(conn, self.tcp.try_clone().unwrap());
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
        }
        let io: Box<dyn Io> = Box::new(tls);
        self.io = Some(BufReader::new(io));
    }

    /// Like [`upgrade`](Self::upgrade) but returns the handshake error.
    pub fn try_upgrade(&mut self, cfg: Arc<ClientConfig>) -> Result<(), std::io::Error> {
        let old = self.io.take().expect("stream");
        drop(old);
        let conn = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
        let mut tls = StreamOwned::new(conn, self.tcp.try_clone().unwrap());
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        let io: Box<dyn Io> = Box::new(tls);
        self.io = Some(BufReader::new(io));
        Ok(())
    }

    /// Reads one raw line (with its CRLF) into `line`; 0 at EOF.
    pub fn read_line(&mut self, line: &mut String) -> std::io::Result<usize> {
        self.io.as_mut().expect("stream").read_line(line)
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Writes raw bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let io = self.io.as_mut().unwrap().get_mut();
        io.write_all(bytes).expect("write");
        io.flush().expect("flush");
    }

    /// Writes `line` + CRLF.
    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes());
    }

    /// Reads one (possibly multi-line) reply: (code, the raw text with CRLFs).
    pub fn reply(&mut self) -> (u16, String) {
        let io = self.io.as_mut().expect("stream");
        let (reply, wire) = mailer::testing::read_wire_reply(io).expect("read reply");
        (reply.code, wire)
    }

    /// Sends a command and returns the whole reply text.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(line);
        self.reply().1
    }

    /// Sends a command and asserts the reply code; returns the text.
    pub fn ok(&mut self, line: &str, code: u16) -> String {
        self.send(line);
        let (c, text) = self.reply();
        assert_eq!(c, code, "reply to {line:?}: {text}");
        text
    }

    /// Reads until EOF (or error); returns what arrived. Asserts it closes within WAIT.
    pub fn read_to_close(&mut self) -> Vec<u8> {
        let mut v = Vec::new();
        let _ = self.io.as_mut().unwrap().read_to_end(&mut v);
        v
    }

    /// True when the server has closed the connection (EOF or reset on read). A read
    /// that times out (after [`WAIT`]) means the connection is still open: false.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.io.as_mut().unwrap().read(&mut b) {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    /// MAIL, RCPTs, DATA with `body` (already dot-stuffed and ending in CRLF.CRLF);
    /// returns the final reply text.
    pub fn transaction(&mut self, from: &str, rcpts: &[&str], wire_body: &[u8]) -> String {
        self.ok(&format!("MAIL FROM:<{from}>"), 250);
        for r in rcpts {
            self.ok(&format!("RCPT TO:<{r}>"), 250);
        }
        self.ok("DATA", 354);
        self.send_raw(wire_body);
        self.reply().1
    }
}

/// The queue id in `250 2.0.0 Ok: queued as <id>`.
pub fn queue_id(reply: &str) -> String {
    reply
        .trim_end()
        .rsplit(' ')
        .next()
        .expect("queue id")
        .to_string()
}

/// Registers a hooks value on the builder (for [`Opts::hooks`]).
pub fn with_hooks<H: Hooks + 'static>(
    h: H,
) -> Option<Box<dyn FnOnce(mailer::server::ServerBuilder) -> mailer::server::ServerBuilder>> {
    Some(Box::new(move |b| b.hooks(h)))
}
