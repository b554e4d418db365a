//! The server edge (SPEC 1): listeners, the bounded queue of sockets, the fixed worker
//! pool, per-IP limits, the spool writer, statistics and graceful shutdown.

use crate::auth::{AuthError, Users};
use crate::config::Config;
use crate::connection::Transport;
use crate::connection::{Connection, End, Lifecycle, WireLimits};
use crate::hooks::TlsInfo;
use crate::hooks::{Chain, Hooks, NoHooks, Policy, SessionInfo};
use crate::protocol::proxy::{self, Parse};
use crate::protocol::reply::{Enhanced, Reply};
use crate::session::{AuthSettings, Session, Settings};
use crate::spool::{Faults, Maildir, MessageWriter, NoFaults, SpoolStats, Store, StoreError};
use crate::tls::{self, Stream, TlsError};
use crossbeam_channel::{bounded, Receiver, SendTimeoutError, Sender};
use rustls::ServerConfig;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The longest wait for a PROXY header (shorter when `command_timeout_secs` is).
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the server could not start or run.
#[derive(Debug)]
pub enum ServerError {
    /// Bad TLS files (a configuration error).
    Tls(TlsError),
    /// Bad `[auth]` users (a configuration error).
    Auth(AuthError),
    /// The spool directory cannot be prepared.
    Spool { dir: String, err: io::Error },
    /// A listen address cannot be bound.
    Bind { addr: SocketAddr, err: io::Error },
    /// A thread could not be started.
    Thread(io::Error),
}

impl ServerError {
    /// True for errors in the configuration (exit 2) rather than at run time (exit 1).
    pub fn is_config(&self) -> bool {
        matches!(self, ServerError::Tls(_) | ServerError::Auth(_))
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Tls(e) => e.fmt(f),
            ServerError::Auth(e) => e.fmt(f),
            ServerError::Spool { dir, err } => write!(f, "spool.dir {dir}: {err}"),
            ServerError::Bind { addr, err } => write!(f, "cannot listen on {addr}: {err}"),
            ServerError::Thread(e) => write!(f, "cannot start a thread: {e}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// The reply codes counted in [`Stats`]: every 4xx and 5xx.
const REFUSAL_CODES: std::ops::RangeInclusive<u16> = 400..=599;

/// Counters for the stats line and for embedders ([`Handle::stats`]).
#[derive(Debug)]
pub struct Stats {
    /// Connections handed to a worker.
    pub connections_total: AtomicU64,
    /// Connections a worker is serving now.
    pub connections_active: AtomicU64,
    /// Refused before the greeting: per-IP limit or all workers busy.
    pub connections_refused: AtomicU64,
    /// Messages acknowledged with 250 (durable in `new/`).
    pub messages_accepted: AtomicU64,
    /// Bytes of the accepted messages as stored (trace headers included).
    pub bytes_accepted: AtomicU64,
    /// Messages between the end of their data and their ack: file fsync, waiting
    /// for the writer thread, rename and directory fsync.
    pub queue_depth: AtomicU64,
    /// Commits finished (stored or failed) and their summed duration, for the mean.
    pub commits: AtomicU64,
    pub commit_micros: AtomicU64,
    /// Every 4xx/5xx reply sent, by code (index = code - 400).
    refused: Vec<AtomicU64>,
    pub spool: Arc<SpoolStats>,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            connections_total: AtomicU64::new(0),
            connections_active: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            messages_accepted: AtomicU64::new(0),
            bytes_accepted: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            commit_micros: AtomicU64::new(0),
            refused: REFUSAL_CODES.map(|_| AtomicU64::new(0)).collect(),
            spool: Arc::default(),
        }
    }
}

/// A snapshot of [`Stats`]. Its `Display` is the `stats:` log line's `key=value` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub connections_total: u64,
    pub connections_active: u64,
    pub connections_refused: u64,
    /// Messages renamed into `new/` and fsynced by the spool writer.
    pub messages_stored: u64,
    /// Messages acknowledged with 250 (the same as `messages_stored` once the writer
    /// has handed back every ack).
    pub messages_accepted: u64,
    pub bytes_accepted: u64,
    /// Every 4xx/5xx reply sent, by reply code: refused commands, recipients and
    /// messages, and the 421s sent before a greeting.
    pub refused: BTreeMap<u16, u64>,
    /// Messages waiting for their commit (file fsync, writer queue, directory fsync).
    pub queue_depth: u64,
    pub spool_batches: u64,
    /// Mean directory-fsync time per batch, microseconds.
    pub fsync_micros_avg: u64,
    /// Mean time from the end of a message's data to its ack, microseconds.
    pub commit_micros_avg: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let batches = self.spool.batches.load(Ordering::Relaxed);
        let refused = REFUSAL_CODES
            .zip(&self.refused)
            .map(|(code, n)| (code, n.load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect();
        StatsSnapshot {
            connections_total: self.connections_total.load(Ordering::Relaxed),
            connections_active: self.connections_active.load(Ordering::Relaxed),
            connections_refused: self.connections_refused.load(Ordering::Relaxed),
            messages_stored: self.spool.committed.load(Ordering::Relaxed),
            messages_accepted: self.messages_accepted.load(Ordering::Relaxed),
            bytes_accepted: self.bytes_accepted.load(Ordering::Relaxed),
            refused,
            queue_depth: self.queue_depth.load(Ordering::Relaxed),
            spool_batches: batches,
            fsync_micros_avg: self
                .spool
                .dir_fsync_micros
                .load(Ordering::Relaxed)
                .checked_div(batches)
                .unwrap_or(0),
            commit_micros_avg: self
                .commit_micros
                .load(Ordering::Relaxed)
                .checked_div(self.commits.load(Ordering::Relaxed))
                .unwrap_or(0),
        }
    }

    /// Counts one reply sent with this code (only 4xx and 5xx are kept).
    pub fn count_reply(&self, code: u16) {
        if REFUSAL_CODES.contains(&code) {
            self.refused[usize::from(code - 400)].fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl fmt::Display for StatsSnapshot {
    /// `connections_active=1 connections_total=7 ... refused=550:2,552:1 ...` on one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let refused_total: u64 = self.refused.values().sum();
        let by_code = if self.refused.is_empty() {
            "-".to_string()
        } else {
            self.refused
                .iter()
                .map(|(c, n)| format!("{c}:{n}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(
            f,
            "connections_active={} connections_total={} connections_refused={} \
             messages_accepted={} bytes_accepted={} refused_total={refused_total} \
             refused={by_code} queue_depth={} spool_batches={} fsync_us_avg={} \
             commit_us_avg={}",
            self.connections_active,
            self.connections_total,
            self.connections_refused,
            self.messages_accepted,
            self.bytes_accepted,
            self.queue_depth,
            self.spool_batches,
            self.fsync_micros_avg,
            self.commit_micros_avg,
        )
    }
}

/// What one live connection shares with the shutdown logic.
struct Slot {
    tcp: TcpStream,
    in_message: Mutex<bool>,
}

/// State shared by acceptors, workers and the handle.
struct Shared {
    stopping: AtomicBool,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    next_id: AtomicU64,
    stats: Stats,
    stop_tx: Sender<()>,
    hostname: String,
}

/// Stops a running server from another thread (or a signal handler).
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Handle {
    /// Begins a graceful stop (SPEC invariant 7); [`Server::run`] returns when done.
    pub fn shutdown(&self) {
        let _ = self.shared.stop_tx.try_send(());
    }

    /// The bound listen addresses (plain first, then implicit TLS), once running.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The counters of the `stats:` log line, for embedders.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }
}

/// Builds a [`Server`].
pub struct ServerBuilder {
    config: Config,
    hooks: Option<Arc<dyn Hooks>>,
    faults: Option<Arc<dyn Faults>>,
}

impl ServerBuilder {
    /// User hooks; the config's `[policy]` runs first, then these.
    pub fn hooks(mut self, hooks: impl Hooks + 'static) -> Self {
        self.hooks = Some(Arc::new(hooks));
        self
    }

    /// Storage fault injection for tests of the spool's failure paths.
    pub fn spool_faults(mut self, faults: Arc<dyn Faults>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Loads TLS files and users and binds the listeners (the spool opens in `run`).
    pub fn build(self) -> Result<Server, ServerError> {
        let mut server = Server::new(self.config, self.hooks.unwrap_or_else(|| Arc::new(NoHooks)))?;
        if let Some(f) = self.faults {
            server.faults = f;
        }
        Ok(server)
    }
}

/// One problem [`preflight`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// True when the server would not start (or not work) with this config.
    pub fatal: bool,
    /// What the finding is about, e.g. `spool.dir` or `server.listen 0.0.0.0:25`;
    /// empty when the message names it already.
    pub what: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = if self.fatal { "error" } else { "warning" };
        if self.what.is_empty() {
            write!(f, "{level}: {}", self.message)
        } else {
            write!(f, "{level}: {}: {}", self.what, self.message)
        }
    }
}

/// What would fail when a server starts with `config`, checked without changing
/// anything (`mailer check-config`): the TLS files and users load, the spool directory
/// is (or can be created as) a writable directory, the listen addresses can be bound.
/// An address in use or needing privileges is only a warning: the server may already
/// be running, and a service manager may grant `CAP_NET_BIND_SERVICE`.
pub fn preflight(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut fatal = |what: &str, message: String| {
        out.push(Finding {
            fatal: true,
            what: what.to_string(),
            message,
        })
    };
    if let Some(t) = &config.tls {
        if let Err(e) = tls::load_certified_key(&t.cert, &t.key) {
            fatal("", e.to_string());
        }
    }
    if let Some(a) = &config.auth {
        if let Err(e) = Users::from_config(a) {
            fatal("", e.to_string());
        }
    }
    if let Err(message) = check_spool_dir(&config.spool.dir) {
        fatal("spool.dir", message);
    }
    for (key, list) in [
        ("server.listen", config.listen_addrs()),
        ("server.tls_listen", config.tls_listen_addrs()),
    ] {
        for addr in list {
            let what = format!("{key} {addr}");
            match TcpListener::bind(addr) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => out.push(Finding {
                    fatal: false,
                    what,
                    message: "address in use (is the server already running?)".into(),
                }),
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => out.push(Finding {
                    fatal: false,
                    what,
                    message: format!("{e}: a port below 1024 needs root or CAP_NET_BIND_SERVICE"),
                }),
                Err(e) => out.push(Finding {
                    fatal: true,
                    what,
                    message: format!("cannot listen: {e}"),
                }),
            }
        }
    }
    out
}

/// The spool directory and its `tmp/`, `new/`, `cur/` must be directories the server
/// can write in; a missing one must be creatable. Probes with a temporary file that is
/// removed again; creates nothing else.
fn check_spool_dir(dir: &std::path::Path) -> Result<(), String> {
    let probe = |d: &std::path::Path| -> Result<(), String> {
        let f = d.join(format!(".mailer-check-{}", std::process::id()));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&f)
            .map_err(|e| format!("{}: cannot create files: {e}", d.display()))?;
        std::fs::remove_file(&f).map_err(|e| format!("{}: {e}", f.display()))
    };
    let is_dir = |d: &std::path::Path| -> Result<bool, String> {
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => Ok(true),
            Ok(_) => Err(format!("{}: not a directory", d.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(format!("{}: {e}", d.display())),
        }
    };
    if is_dir(dir)? {
        probe(dir)?;
        for sub in ["tmp", "new", "cur"] {
            let d = dir.join(sub);
            if is_dir(&d)? {
                probe(&d)?;
            }
        }
        return Ok(());
    }
    // Missing: the nearest existing ancestor must let the server create it.
    let cannot = |e: String| format!("cannot create {}: {e}", dir.display());
    let mut parent = dir.parent();
    while let Some(p) = parent {
        // A relative path's last ancestor is "": the working directory.
        let last = p.as_os_str().is_empty();
        let p = if last { std::path::Path::new(".") } else { p };
        if is_dir(p).map_err(cannot)? {
            return probe(p).map_err(cannot);
        }
        parent = if last { None } else { p.parent() };
    }
    Err(cannot("no existing parent directory".into()))
}

/// A configured, bound server, ready to [`run`](Server::run).
pub struct Server {
    config: Config,
    settings: Arc<Settings>,
    hooks: Arc<dyn Hooks>,
    tls: Option<(Arc<ServerConfig>, Arc<tls::Reloading>)>,
    listeners: Vec<(TcpListener, bool)>,
    shared: Arc<Shared>,
    stop_rx: Receiver<()>,
    handle: Handle,
    faults: Arc<dyn Faults>,
}

struct Job {
    tcp: TcpStream,
    peer: SocketAddr,
    implicit_tls: bool,
    /// The per-IP slot of the socket peer; `None` with `proxy_protocol`, where the
    /// worker claims one for the client named in the PROXY header.
    ip: Option<IpGuard>,
}

/// Holds one per-IP slot until the connection ends.
struct IpGuard {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Shared {
    /// Claims one of `max` connection slots for `ip`; `None` when all are taken.
    fn claim_ip(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpGuard> {
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpGuard {
            shared: Arc::clone(self),
            ip,
        })
    }

    /// Refuses a connection before its greeting: 421 4.7.0 at once rather than a
    /// silent wait (SPEC 4). An implicit-TLS client gets no reply: plaintext would be
    /// garbage to it.
    fn refuse(&self, mut tcp: TcpStream, peer: SocketAddr, implicit_tls: bool, why: &str) {
        self.stats
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        log::warn!("refused {peer}: {why}");
        if implicit_tls {
            return;
        }
        // Read what already arrived (a PROXY header, pipelined commands): closing a
        // socket with unread input sends RST, which can destroy the 421 in flight.
        if tcp.set_nonblocking(true).is_ok() {
            let mut scratch = [0u8; 1024];
            for _ in 0..8 {
                if !matches!(tcp.read(&mut scratch), Ok(n) if n > 0) {
                    break;
                }
            }
            let _ = tcp.set_nonblocking(false);
        }
        self.stats.count_reply(421);
        let _ = tcp.set_write_timeout(Some(Duration::from_secs(1)));
        let r = Reply::new(421, Enhanced(4, 7, 0), format!("{} {why}", self.hostname));
        let _ = tcp.write_all(&r.to_bytes());
        let _ = tcp.shutdown(Shutdown::Both);
    }
}

/// The client address as one key: an IPv4-mapped IPv6 address (a proxy listening on
/// `::`) is the IPv4 client it stands for.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// Reads a PROXY header (v1 or v2) off the socket, never more bytes than the header
/// has, so the session that follows sees the client's first byte. `Ok(None)`: the
/// header says to keep the socket peer (v2 LOCAL, v1 UNKNOWN).
fn read_proxy_header(mut tcp: &TcpStream, timeout: Duration) -> io::Result<Option<SocketAddr>> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(proxy::V1_MAX + 1);
    loop {
        let need = match proxy::parse(&buf) {
            Parse::Done { consumed, source } if consumed == buf.len() => return Ok(source),
            Parse::Done { .. } => {
                // The parser promises exact reads; never hand on a stream that lost bytes.
                return Err(io::Error::other("PROXY header over-read"));
            }
            Parse::Error(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            Parse::Need(n) => n,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no complete PROXY header within {timeout:?}"),
            ));
        }
        tcp.set_read_timeout(Some(left))?;
        let old = buf.len();
        buf.resize(old + need, 0);
        match tcp.read(&mut buf[old..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed after {old} byte(s) of a PROXY header"),
                ))
            }
            Ok(n) => buf.truncate(old + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(old),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                buf.truncate(old);
            }
            Err(e) => return Err(e),
        }
    }
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        let mut m = self.shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Server {
    /// Starts building a server from `config`; add [`hooks`](ServerBuilder::hooks),
    /// then [`build`](ServerBuilder::build) and [`run`](Server::run).
    pub fn builder(config: Config) -> ServerBuilder {
        ServerBuilder {
            config,
            hooks: None,
            faults: None,
        }
    }

    fn new(config: Config, user_hooks: Arc<dyn Hooks>) -> Result<Server, ServerError> {
        let tls = match &config.tls {
            Some(t) => Some(tls::server_config(&t.cert, &t.key).map_err(ServerError::Tls)?),
            None => None,
        };
        let auth = match &config.auth {
            Some(a) => Some(AuthSettings {
                allow_plaintext: a.allow_plaintext,
                authenticator: Arc::new(Users::from_config(a).map_err(ServerError::Auth)?),
            }),
            None => None,
        };
        let settings = Arc::new(Settings {
            hostname: config.hostname.clone(),
            max_message_size: config.limits.max_message_size,
            max_recipients: config.limits.max_recipients,
            max_errors: config.limits.max_errors,
            tls_available: tls.is_some(),
            require_tls: config.tls.as_ref().is_some_and(|t| t.require_tls),
            auth,
        });
        let hooks: Arc<dyn Hooks> = Arc::new(Chain(vec![
            Arc::new(Policy::new(&config.policy.accept_domains)),
            user_hooks,
        ]));
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for (list, implicit) in [
            (config.listen_addrs(), false),
            (config.tls_listen_addrs(), true),
        ] {
            for addr in list {
                let l = TcpListener::bind(addr).map_err(|err| ServerError::Bind { addr, err })?;
                addrs.push(l.local_addr().unwrap_or(addr));
                listeners.push((l, implicit));
            }
        }
        let (stop_tx, stop_rx) = bounded(1);
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            slots: Mutex::new(HashMap::new()),
            per_ip: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            stats: Stats::default(),
            stop_tx,
            hostname: config.hostname.clone(),
        });
        let handle = Handle {
            shared: Arc::clone(&shared),
            addrs: Arc::new(Mutex::new(addrs)),
        };
        Ok(Server {
            config,
            settings,
            hooks,
            tls,
            listeners,
            shared,
            stop_rx,
            handle,
            faults: Arc::new(NoFaults),
        })
    }

    /// A handle to stop the server and read its addresses and counters.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Runs until [`Handle::shutdown`]; then stops gracefully and returns.
    pub fn run(self) -> Result<(), ServerError> {
        let cfg = &self.config;
        let (store, writer) = Maildir::open_with_faults(
            &cfg.spool.dir,
            &cfg.hostname,
            cfg.spool.fsync,
            Arc::clone(&self.shared.stats.spool),
            Arc::clone(&self.faults),
        )
        .map_err(|err| ServerError::Spool {
            dir: cfg.spool.dir.display().to_string(),
            err,
        })?;
        let store = Arc::new(CountingStore {
            inner: store,
            shared: Arc::clone(&self.shared),
        });
        let reload_stop = Arc::new(AtomicBool::new(false));
        if let Some((_, resolver)) = &self.tls {
            resolver.watch(Duration::from_secs(1), Arc::clone(&reload_stop));
        }
        let workers = cfg.server.workers;
        // A rendezvous channel: a socket is handed over only to an idle worker, so when
        // all workers are busy the client gets 421 4.7.0 at once instead of waiting
        // silently in a queue (SPEC 4: never hang a client silently).
        let (job_tx, job_rx) = bounded::<Job>(0);
        let (done_tx, done_rx) = bounded::<()>(workers);
        let limits = WireLimits {
            max_line_length: cfg.limits.max_line_length,
            max_message_size: cfg.limits.max_message_size,
            bare_lf: cfg.limits.bare_lf.into(),
            command_timeout: Duration::from_secs(cfg.limits.command_timeout_secs),
            data_timeout: Duration::from_secs(cfg.limits.data_timeout_secs),
            min_data_rate: cfg.limits.min_data_rate,
        };
        let wants_data = self.hooks.wants_data();
        // Each worker reports once it is about to wait for sockets; the acceptors start
        // only after all have, or the rendezvous channel would refuse the first clients
        // as "busy" while the workers are still starting.
        let (ready_tx, ready_rx) = bounded::<()>(workers);
        // The header comes at once from a proxy; a short bound frees the worker fast.
        let proxy_timeout = limits.command_timeout.min(PROXY_HEADER_TIMEOUT);
        for i in 0..workers {
            let w = Worker {
                rx: job_rx.clone(),
                shared: Arc::clone(&self.shared),
                settings: Arc::clone(&self.settings),
                hooks: Arc::clone(&self.hooks),
                store: Arc::clone(&store),
                tls: self.tls.as_ref().map(|(c, _)| Arc::clone(c)),
                limits: limits.clone(),
                wants_data,
                done: done_tx.clone(),
                ready: ready_tx.clone(),
                proxy: cfg.server.proxy_protocol.then_some(proxy_timeout),
                per_ip_max: cfg.server.max_connections_per_ip,
            };
            std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || w.run())
                .map_err(ServerError::Thread)?;
        }
        drop(done_tx);
        drop(ready_tx);
        for _ in 0..workers {
            // Err: a worker thread is gone; start anyway (the rest still serve).
            if ready_rx.recv().is_err() {
                break;
            }
        }
        drop(job_rx);
        let mut acceptors: Vec<JoinHandle<()>> = Vec::new();
        let mut wake = Vec::new();
        for (listener, implicit) in self.listeners {
            let addr = listener.local_addr().map_err(ServerError::Thread)?;
            wake.push(addr);
            let a = Acceptor {
                listener,
                implicit_tls: implicit,
                tx: job_tx.clone(),
                shared: Arc::clone(&self.shared),
                per_ip_max: cfg.server.max_connections_per_ip,
                proxy_protocol: cfg.server.proxy_protocol,
            };
            log::info!(
                "listening on {addr}{}",
                if implicit { " (implicit TLS)" } else { "" }
            );
            acceptors.push(
                std::thread::Builder::new()
                    .name(format!("accept-{addr}"))
                    .spawn(move || a.run())
                    .map_err(ServerError::Thread)?,
            );
        }
        drop(job_tx);
        let stats_every = cfg.server.stats_interval_secs;
        // Wait for the stop request, logging stats meanwhile.
        loop {
            let tick = if stats_every == 0 {
                Duration::from_secs(3600)
            } else {
                Duration::from_secs(stats_every)
            };
            match self.stop_rx.recv_timeout(tick) {
                Ok(()) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if stats_every > 0 {
                        log::info!("stats: {}", self.shared.stats.snapshot());
                    }
                }
            }
        }
        let grace = Duration::from_secs(cfg.server.shutdown_grace_secs);
        let began = Instant::now();
        log::info!("stopping: no new connections, {}s grace", grace.as_secs());
        self.shared.stopping.store(true, Ordering::SeqCst);
        reload_stop.store(true, Ordering::Relaxed);
        for addr in wake {
            // Wake the blocking accept() so the acceptor sees the flag.
            let _ = TcpStream::connect_timeout(&loopback_of(addr), Duration::from_millis(200));
        }
        for a in acceptors {
            let _ = a.join();
        }
        self.shared.close_idle();
        // Workers finish queued and running sessions, then exit.
        let force_at = grace.saturating_sub(Duration::from_millis(500));
        let mut left = workers;
        while left > 0 {
            let wait = force_at.saturating_sub(began.elapsed());
            match done_rx.recv_timeout(wait) {
                Ok(()) => left -= 1,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    log::warn!("grace period over: closing {left} busy session(s)");
                    self.shared.close_all();
                    while left > 0 && done_rx.recv_timeout(Duration::from_secs(2)).is_ok() {
                        left -= 1;
                    }
                    break;
                }
            }
        }
        drop(store);
        let _ = writer.join();
        log::info!("stopped; stats: {}", self.shared.stats.snapshot());
        Ok(())
    }
}

fn loopback_of(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

impl Shared {
    /// Shuts the read side of every session that is not inside a message, so its
    /// blocked read returns and it answers 421 4.3.2.
    fn close_idle(&self) {
        let slots: Vec<_> = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for s in slots {
            let busy = s.in_message.lock().unwrap_or_else(|p| p.into_inner());
            if !*busy {
                let _ = s.tcp.shutdown(Shutdown::Read);
            }
        }
    }

    fn close_all(&self) {
        for s in self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            let _ = s.tcp.shutdown(Shutdown::Both);
        }
    }
}

/// How long a new connection may wait for an idle worker before it gets 421 4.7.0.
const HANDOFF_WAIT: Duration = Duration::from_millis(200);

struct Acceptor {
    listener: TcpListener,
    implicit_tls: bool,
    tx: Sender<Job>,
    shared: Arc<Shared>,
    per_ip_max: usize,
    /// With `proxy_protocol` every socket comes from the proxy: the per-IP limit is
    /// applied by the worker to the client in the PROXY header instead.
    proxy_protocol: bool,
}

impl Acceptor {
    fn run(self) {
        for conn in self.listener.incoming() {
            if self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let tcp = match conn {
                Ok(t) => t,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    log::warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let Ok(peer) = tcp.peer_addr() else { continue };
            let ip = if self.proxy_protocol {
                None
            } else {
                match self.shared.claim_ip(canonical(peer).ip(), self.per_ip_max) {
                    Some(guard) => Some(guard),
                    None => {
                        self.shared.refuse(
                            tcp,
                            peer,
                            self.implicit_tls,
                            "Error: too many connections from your host",
                        );
                        continue;
                    }
                }
            };
            let job = Job {
                tcp,
                peer,
                implicit_tls: self.implicit_tls,
                ip,
            };
            // A short wait covers a worker that is between two sessions (or still
            // starting); past it, every worker is truly busy.
            match self.tx.send_timeout(job, HANDOFF_WAIT) {
                Ok(()) => {}
                Err(SendTimeoutError::Timeout(job)) | Err(SendTimeoutError::Disconnected(job)) => {
                    self.shared.refuse(
                        job.tcp,
                        peer,
                        self.implicit_tls,
                        "Error: server busy, try again later",
                    );
                }
            }
        }
    }
}

struct Worker {
    rx: Receiver<Job>,
    shared: Arc<Shared>,
    settings: Arc<Settings>,
    hooks: Arc<dyn Hooks>,
    store: Arc<CountingStore>,
    tls: Option<Arc<ServerConfig>>,
    limits: WireLimits,
    wants_data: bool,
    done: Sender<()>,
    /// Signalled once, just before the worker first waits for a socket.
    ready: Sender<()>,
    /// `Some(timeout)` when a PROXY header must come first.
    proxy: Option<Duration>,
    per_ip_max: usize,
}

/// The worker's view of the server lifecycle for one connection.
struct Life<'a> {
    shared: &'a Shared,
    slot: &'a Slot,
}

impl Lifecycle for Life<'_> {
    fn stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }
    fn enter_message(&self) -> bool {
        let mut busy = self
            .slot
            .in_message
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.stopping() {
            return false;
        }
        *busy = true;
        true
    }
    fn leave_message(&self) {
        *self
            .slot
            .in_message
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = false;
    }
}

impl Worker {
    fn run(self) {
        let _ = self.ready.send(());
        while let Ok(job) = self.rx.recv() {
            let peer = job.peer;
            // A panic in one session must not end the worker or the server (invariant 5).
            if catch_unwind(AssertUnwindSafe(|| self.serve(job))).is_err() {
                log::error!("session with {peer} panicked; worker continues");
            }
        }
        let _ = self.done.send(());
    }

    fn serve(&self, job: Job) {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let stats = &self.shared.stats;
        stats.connections_total.fetch_add(1, Ordering::Relaxed);
        stats.connections_active.fetch_add(1, Ordering::Relaxed);
        let _active = ActiveGuard(stats);
        let tcp = job.tcp;
        let _ = tcp.set_nodelay(true);
        let _ = tcp.set_write_timeout(Some(self.limits.command_timeout));
        let Ok(clone) = tcp.try_clone() else { return };
        let slot = Arc::new(Slot {
            tcp: clone,
            in_message: Mutex::new(false),
        });
        self.shared
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::clone(&slot));
        let _unregister = Unregister(&self.shared, id);
        let mut peer = job.peer;
        let mut _ip = job.ip;
        if let Some(timeout) = self.proxy {
            // The PROXY header comes before anything else, TLS included; without a
            // valid one the connection closes without a greeting.
            match read_proxy_header(&tcp, timeout) {
                Ok(source) => peer = source.map_or(peer, canonical),
                Err(e) => {
                    log::info!("session {id}: {peer}: bad or missing PROXY header: {e}; closing");
                    return;
                }
            }
            match self.shared.claim_ip(peer.ip(), self.per_ip_max) {
                Some(guard) => _ip = Some(guard),
                None => {
                    let why = "Error: too many connections from your host";
                    self.shared.refuse(tcp, peer, job.implicit_tls, why);
                    return;
                }
            }
            log::info!("session {id}: connect from {peer} via proxy {}", job.peer);
        } else {
            log::info!("session {id}: connect from {peer}");
        }
        let mut info = SessionInfo {
            id,
            peer,
            tls: None,
            auth_user: None,
            helo: None,
        };
        let stream = if job.implicit_tls {
            let Some(cfg) = &self.tls else { return };
            match Stream::accept_tls(tcp, Arc::clone(cfg), self.limits.command_timeout) {
                Ok((s, tls)) => {
                    log::info!(
                        "session {id}: TLS established, {} {}",
                        tls.version,
                        tls.cipher
                    );
                    info.tls = Some(tls);
                    s
                }
                Err(e) => {
                    log::info!("session {id}: TLS handshake failed: {e}");
                    return;
                }
            }
        } else {
            Stream::Plain {
                tcp,
                tls: self.tls.clone(),
            }
        };
        let session = Session::new(Arc::clone(&self.settings), Arc::clone(&self.hooks), info);
        let life = Life {
            shared: &self.shared,
            slot: &slot,
        };
        let stream = CountReplies::new(stream, stats);
        let mut conn = Connection::new(
            stream,
            session,
            self.store.as_ref(),
            &life,
            self.limits.clone(),
            self.wants_data,
        );
        let end = conn.run();
        match end {
            End::Quit | End::Eof | End::ShuttingDown => {
                log::info!("session {id}: disconnect ({end:?})")
            }
            other => log::info!("session {id}: closed ({other:?})"),
        }
    }
}

struct ActiveGuard<'a>(&'a Stats);
impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Unregister<'a>(&'a Shared, u64);
impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.0
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

/// The spool as sessions see it, counting accepted messages and bytes, commits in
/// flight (the queue depth) and how long commits take.
struct CountingStore {
    inner: Maildir,
    shared: Arc<Shared>,
}

impl Store for CountingStore {
    fn begin(&self) -> Result<Box<dyn MessageWriter>, StoreError> {
        Ok(Box::new(CountingMessage {
            inner: self.inner.begin()?,
            bytes: 0,
            shared: Arc::clone(&self.shared),
        }))
    }
}

struct CountingMessage {
    inner: Box<dyn MessageWriter>,
    bytes: u64,
    shared: Arc<Shared>,
}

impl Write for CountingMessage {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl MessageWriter for CountingMessage {
    fn queue_id(&self) -> &str {
        self.inner.queue_id()
    }

    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let stats = &self.shared.stats;
        stats.queue_depth.fetch_add(1, Ordering::Relaxed);
        let began = Instant::now();
        let result = self.inner.commit();
        stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
        stats
            .commit_micros
            .fetch_add(began.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats.commits.fetch_add(1, Ordering::Relaxed);
        if result.is_ok() {
            stats.messages_accepted.fetch_add(1, Ordering::Relaxed);
            stats
                .bytes_accepted
                .fetch_add(self.bytes, Ordering::Relaxed);
        }
        result
    }
}

/// The session's stream, counting every 4xx/5xx reply the server writes by its code
/// (the last line of a multi-line reply, `NNN `, counts once). It sees the plaintext
/// side of TLS, so it counts replies in TLS sessions too.
struct CountReplies<'a, T> {
    inner: T,
    stats: &'a Stats,
    /// Bytes of the current line seen so far, up to 4 (`NNN` and the separator).
    seen: usize,
    code: [u8; 3],
}

impl<'a, T> CountReplies<'a, T> {
    fn new(inner: T, stats: &'a Stats) -> Self {
        CountReplies {
            inner,
            stats,
            seen: 0,
            code: [0; 3],
        }
    }

    fn observe(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.seen = 0;
                continue;
            }
            match self.seen {
                0..=2 => self.code[self.seen] = b,
                3 => {
                    // `NNN ` ends a reply; `NNN-` continues it.
                    if b == b' ' {
                        if let Ok(code) = std::str::from_utf8(&self.code).unwrap_or("").parse() {
                            self.stats.count_reply(code);
                        }
                    }
                }
                _ => continue,
            }
            self.seen += 1;
        }
    }
}

impl<T: Read> Read for CountReplies<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<T: Write> Write for CountReplies<'_, T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.observe(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Transport> Transport for CountReplies<'_, T> {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(timeout)
    }
    fn start_tls(&mut self) -> io::Result<TlsInfo> {
        self.inner.start_tls()
    }
}
