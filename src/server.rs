//! The server edge (SPEC 1): listeners, the bounded queue of sockets, the fixed worker
//! pool, per-IP limits, the spool writer, statistics and graceful shutdown.

use crate::auth::{AuthError, RateLimit, Users};
use crate::config::Config;
use crate::config::DataSyncPolicy;
use crate::connection::{Connection, End, Lifecycle, WireLimits};
use crate::delivery::Router;
use crate::hooks::{Chain, Hooks, NoHooks, Policy, SessionInfo};
use crate::mailboxes::{Mailboxes, RecipientCheck};
use crate::protocol::proxy::{self, Parse};
use crate::protocol::reply::{Enhanced, Reply};
use crate::session::{AuthSettings, Guards, Session, Settings};
use crate::spool::{DataSync, Faults, Maildir, NoFaults, SpoolOptions};
use crate::stats::{
    ActiveGuard, CountReplies, CountingStore, SessionStore, SessionTally, Stats, StatsSnapshot,
};
use crate::tls::{self, Stream, TlsError};
use crossbeam_channel::{bounded, Receiver, Sender};
use rustls::ServerConfig;
use std::cell::Cell;
use std::collections::HashMap;
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
    /// Bad `[mailboxes]` maps (a configuration error).
    Mailboxes(String),
    /// The spool directory cannot be prepared.
    Spool { dir: String, err: io::Error },
    /// A listen address cannot be bound.
    Bind { addr: SocketAddr, err: io::Error },
    /// A thread could not be started.
    Thread(io::Error),
    /// A value [`Config::validate`] refuses (the dotted key and the problem), the same
    /// check `mailer check-config` and the binary's startup make (invariant 12).
    Config { key: String, message: String },
    /// A bad `[[milter]]` address (a configuration error).
    Milter(String),
}

impl ServerError {
    /// True for errors in the configuration (exit 2) rather than at run time (exit 1).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            ServerError::Tls(_)
                | ServerError::Auth(_)
                | ServerError::Config { .. }
                | ServerError::Milter(_)
                | ServerError::Mailboxes(_)
        )
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Tls(e) => e.fmt(f),
            ServerError::Auth(e) => e.fmt(f),
            ServerError::Mailboxes(e) => e.fmt(f),
            ServerError::Spool { dir, err } => write!(f, "spool.dir {dir}: {err}"),
            ServerError::Bind { addr, err } => write!(f, "cannot listen on {addr}: {err}"),
            ServerError::Thread(e) => write!(f, "cannot start a thread: {e}"),
            ServerError::Config { key, message } => write!(f, "key `{key}`: {message}"),
            ServerError::Milter(e) => write!(f, "milter.address: {e}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// The default stack of a worker thread. Only touched pages take memory, so a roomy
/// stack costs address space, not RAM, and a hook that recurses deeply does not abort
/// the whole process (a stack overflow cannot be caught).
pub const DEFAULT_WORKER_STACK: usize = 2 * 1024 * 1024;

/// While the pool is under stress, the longest wait for a command (SPEC invariant 8,
/// after Postfix's stress-adaptive `smtpd_timeout`).
const STRESS_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an evicted session may take to write its 421 to a client that does not
/// read: its worker is promised to a new client.
const EVICT_WRITE_WAIT: Duration = Duration::from_secs(1);

/// Where one live connection stands, for the shutdown logic and the acceptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Running a command, a hook, a handshake: not to be interrupted.
    Working,
    /// Blocked waiting for a command (or the first one) since then.
    Prompt(Instant),
    /// Inside DATA or BDAT: never evicted, finished at shutdown.
    Message,
    /// Chosen to give its worker to a new client; its read side is shut.
    Evicted,
}

/// What one live connection shares with the shutdown logic and the acceptor.
struct Slot {
    tcp: TcpStream,
    phase: Mutex<Phase>,
    /// Set once the worker counts as free again (see [`Shared::release`]).
    released: Arc<AtomicBool>,
}

impl Slot {
    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The acceptors' view of the worker pool. Counted under one lock so that the
/// decision "hand over, evict or refuse" never waits (SPEC invariant 8).
struct Pool {
    workers: usize,
    /// Workers running a session.
    busy: usize,
    /// Sockets handed over but not yet taken by a worker.
    queued: usize,
    /// Sessions told to close for a new client that have not ended yet: each one's
    /// worker is already promised to a queued socket.
    evicting: usize,
}

impl Pool {
    /// Workers free for a new socket now or as soon as an evicted session ends.
    fn available(&self) -> usize {
        (self.workers + self.evicting).saturating_sub(self.busy + self.queued)
    }
}

/// State shared by acceptors, workers and the handle.
struct Shared {
    stopping: AtomicBool,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    pool: Mutex<Pool>,
    /// More than 80 % of the workers are busy: sessions waiting for a command get
    /// [`STRESS_COMMAND_TIMEOUT`].
    stressed: AtomicBool,
    ipv6_prefix: u8,
    next_id: AtomicU64,
    stats: Arc<Stats>,
    stop_tx: Sender<()>,
    hostname: String,
}

/// A component's reaction to a reload (SIGHUP): re-read its state from the new
/// config, or say why it cannot (then the reload fails and nothing changes).
pub type Reloader = Box<dyn Fn(&Config) -> Result<(), String> + Send + Sync>;

/// What a reload needs: the settings the server runs with, the certificate and the
/// registered reloaders. The mutex also keeps two reloads from interleaving.
struct ReloadState {
    /// The config the server started with: changed keys outside [`LIVE_KEYS`] are
    /// compared against it (they keep their start value until a restart).
    running: Config,
    /// The config of the last successful reload (or the start): what the reloaders
    /// currently run with, to roll back to when a later reloader fails.
    applied: Config,
    tls: Option<Arc<tls::Reloading>>,
    reloaders: Vec<Reloader>,
}

/// Config keys a reload applies at once; every other changed key needs a restart.
/// The certificate is reloaded from its files (same paths) on every reload.
const LIVE_KEYS: [&str; 2] = ["mailboxes", "milter"];

/// The dotted keys whose values differ between `a` and `b` (tables compared key by
/// key, anything else as a whole).
fn changed_keys(
    prefix: &str,
    a: Option<&toml::Value>,
    b: Option<&toml::Value>,
    out: &mut Vec<String>,
) {
    match (a, b) {
        (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                changed_keys(&key, x.get(k), y.get(k), out);
            }
        }
        (x, y) if x != y => out.push(prefix.to_string()),
        _ => {}
    }
}

/// Stops a running server from another thread (or a signal handler), reloads it, and
/// reads its addresses and counters.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    metrics_addr: Option<SocketAddr>,
    reload: Arc<Mutex<ReloadState>>,
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

    /// The bound address of the metrics endpoint (`[metrics] listen`), if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Applies `new` (already parsed and validated, e.g. by [`Config::load`]) to the
    /// running server, as SIGHUP does: the certificate is read again from its files
    /// and every [`ServerBuilder::on_reload`] reloader runs. All or nothing as far as
    /// possible: the certificate is loaded first but installed only after every
    /// reloader succeeded. `Ok` lists the changed keys that take effect only at the
    /// next start (listen addresses, workers, limits...); `Err` says why nothing
    /// was applied (the running settings stay).
    pub fn reload(&self, new: &Config) -> Result<Vec<String>, String> {
        new.validate()
            .map_err(|(key, msg)| format!("key `{key}`: {msg}"))?;
        let mut state = self.reload.lock().unwrap_or_else(|p| p.into_inner());
        let as_value = |c: &Config| toml::Value::try_from(c).map_err(|e| e.to_string());
        let (old_v, new_v) = (as_value(&state.running)?, as_value(new)?);
        let mut changed = Vec::new();
        changed_keys("", Some(&old_v), Some(&new_v), &mut changed);
        let restart: Vec<String> = changed
            .into_iter()
            .filter(|k| {
                !LIVE_KEYS
                    .iter()
                    .any(|live| k == live || k.starts_with(&format!("{live}.")))
            })
            .collect();
        // The same certificate files: read them again now (a renewal). Other paths
        // (or TLS switched on or off) are in `restart`.
        let cert = match (&state.tls, &new.tls, &state.running.tls) {
            (Some(resolver), Some(t), Some(old)) if t.cert == old.cert && t.key == old.key => {
                Some((resolver, resolver.load_files().map_err(|e| e.to_string())?))
            }
            _ => None,
        };
        for (i, reloader) in state.reloaders.iter().enumerate() {
            if let Err(e) = reloader(new) {
                // Put the ones that already took the new config back on the old one.
                for undo in &state.reloaders[..i] {
                    if let Err(u) = undo(&state.applied) {
                        log::error!("reload: rolling back a component failed: {u}");
                    }
                }
                return Err(e);
            }
        }
        if let Some((resolver, ck)) = cert {
            resolver.install(ck);
        }
        state.applied = new.clone();
        Ok(restart)
    }
}

/// Builds a [`Server`].
pub struct ServerBuilder {
    config: Config,
    hooks: Option<Arc<dyn Hooks>>,
    faults: Option<Arc<dyn Faults>>,
    stack_size: usize,
    reloaders: Vec<Reloader>,
    router: Option<Arc<dyn Router>>,
}

impl ServerBuilder {
    /// The stack size of each worker thread, in bytes; default
    /// [`DEFAULT_WORKER_STACK`] (2 MiB). Hooks run on these threads: raise it for hooks
    /// that recurse deeply, since a stack overflow aborts the whole process. The
    /// memory is reserved as address space and only used as far as it is touched.
    pub fn worker_stack_size(mut self, bytes: usize) -> Self {
        self.stack_size = bytes;
        self
    }

    /// Delivers recipients to mailboxes (SPEC 8): each distinct mailbox gets its own
    /// copy; recipients the router does not know go to `spool.dir`.
    pub fn router(mut self, router: Arc<dyn Router>) -> Self {
        self.router = Some(router);
        self
    }

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

    /// Registers a component to reload on [`Handle::reload`] (SIGHUP), in order.
    pub fn on_reload(mut self, reloader: Reloader) -> Self {
        self.reloaders.push(reloader);
        self
    }

    /// Loads TLS files and users and binds the listeners (the spool opens in `run`).
    pub fn build(self) -> Result<Server, ServerError> {
        let mut server = Server::new(self.config, self.hooks.unwrap_or_else(|| Arc::new(NoHooks)))?;
        if let Some(f) = self.faults {
            server.faults = f;
        }
        // Below this, a worker could not even run a session's own frames.
        server.stack_size = self.stack_size.max(64 * 1024);
        if self.router.is_some() {
            server.router = self.router;
        }
        let mut reloaders = self.reloaders;
        // SIGHUP re-reads the mailbox maps (SPEC 2), first among the reloaders so that
        // a later one that fails rolls them back too. Without [mailboxes] at start
        // there is no RCPT check or router to feed: adding the table needs a restart.
        let mailbox_reloader: Reloader = match server.mailboxes.clone() {
            Some(m) => Box::new(move |c: &Config| m.reload(c)),
            None => Box::new(|c: &Config| {
                if c.mailboxes.is_some() {
                    log::warn!("reload: [mailboxes] was added; it takes effect at the next start");
                }
                Ok(())
            }),
        };
        reloaders.insert(0, mailbox_reloader);
        let mut state = server
            .handle
            .reload
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // The server's own reloaders (milters) follow the mailbox maps, then the embedder's.
        let own = std::mem::take(&mut state.reloaders);
        reloaders.splice(1..1, own);
        state.reloaders = reloaders;
        drop(state);
        Ok(server)
    }
}

/// A configured, bound server, ready to [`run`](Server::run).
pub struct Server {
    config: Config,
    settings: Arc<Settings>,
    hooks: Arc<dyn Hooks>,
    tls: Option<(Arc<ServerConfig>, Arc<tls::Reloading>)>,
    listeners: Vec<(TcpListener, bool)>,
    metrics: Option<TcpListener>,
    shared: Arc<Shared>,
    stop_rx: Receiver<()>,
    handle: Handle,
    faults: Arc<dyn Faults>,
    stack_size: usize,
    guards: Guards,
    mailboxes: Option<Arc<Mailboxes>>,
    router: Option<Arc<dyn Router>>,
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
    /// Claims one of `max` connection slots for the client `ip` (an IPv6 client counts
    /// by its `ipv6_prefix`); `None` when all are taken.
    fn claim_ip(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpGuard> {
        let ip = client_key(ip, self.ipv6_prefix);
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
        self.stats.count_refusal(why);
        log::warn!("client {}: refused connection: {why}", peer.ip());
        if implicit_tls {
            return;
        }
        // Nothing here may block: the acceptor refuses the next client right after
        // this one (SPEC invariant 8). A fresh socket's send buffer takes a 421 whole,
        // so a non-blocking write suffices.
        let _ = tcp.set_nonblocking(true);
        // Read what already arrived (a PROXY header, pipelined commands): closing a
        // socket with unread input sends RST, which can destroy the 421 in flight.
        let mut scratch = [0u8; 1024];
        for _ in 0..8 {
            if !matches!(tcp.read(&mut scratch), Ok(n) if n > 0) {
                break;
            }
        }
        self.stats.count_reply(421);
        let r = Reply::new(421, Enhanced(4, 7, 0), format!("{} {why}", self.hostname));
        let _ = tcp.write_all(&r.to_bytes());
        let _ = tcp.shutdown(Shutdown::Both);
    }
}

/// The key a client is counted under: an IPv4-mapped IPv6 address is the IPv4 client
/// it stands for; any other IPv6 address counts by its first `ipv6_prefix` bits, since
/// one host or site is usually given a whole /64 and can pick any address in it.
pub(crate) fn client_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u32::from(ipv6_prefix.clamp(1, 128));
                let mask = u128::MAX << (128 - bits);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
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
            stack_size: DEFAULT_WORKER_STACK,
            reloaders: Vec::new(),
            router: None,
        }
    }

    fn new(config: Config, user_hooks: Arc<dyn Hooks>) -> Result<Server, ServerError> {
        // A Config built in code never went through `Config::from_toml`: check it as
        // check-config does, so that no value can overflow later and no listen address
        // is silently dropped by `listen_addrs` (invariant 12).
        config
            .validate()
            .map_err(|(key, message)| ServerError::Config { key, message })?;
        // The spool is opened in `run`; what check-config checks of it fails here too.
        crate::preflight::check_spool_dir(&config.spool.dir).map_err(|m| ServerError::Spool {
            dir: config.spool.dir.display().to_string(),
            err: io::Error::other(m),
        })?;
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
        let policy = Policy::new(&config.policy.accept_domains);
        let mailboxes = match &config.mailboxes {
            Some(m) => Some(Arc::new(
                Mailboxes::new(m, &config.spool.dir).map_err(ServerError::Mailboxes)?,
            )),
            None => None,
        };
        // With [mailboxes], its RCPT check judges mailbox-domain recipients and leaves
        // the others to [policy].
        let first: Arc<dyn Hooks> = match &mailboxes {
            Some(m) => Arc::new(RecipientCheck::new(Arc::clone(m), Some(policy))),
            None => Arc::new(policy),
        };
        let mut chain: Vec<Arc<dyn Hooks>> = vec![first];
        // The milters run after [policy], in configuration order (SPEC 9).
        let mut reloaders: Vec<Reloader> = Vec::new();
        if !config.milter.is_empty() {
            let milters = Arc::new(
                crate::milter::Milters::new(&config.hostname, &config.milter)
                    .map_err(ServerError::Milter)?,
            );
            let m = Arc::clone(&milters);
            reloaders.push(Box::new(move |c: &Config| m.reload(c)));
            chain.push(milters);
        }
        chain.push(user_hooks);
        let hooks: Arc<dyn Hooks> = Arc::new(Chain(chain));
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
        let metrics = match config.metrics_addr() {
            Some(addr) => {
                Some(TcpListener::bind(addr).map_err(|err| ServerError::Bind { addr, err })?)
            }
            None => None,
        };
        let (stop_tx, stop_rx) = bounded(1);
        let guards = Guards {
            max_junk_commands: config.limits.max_junk_commands,
            lifetime: Duration::from_secs(config.limits.session_timeout_secs),
            auth_rate: config
                .auth
                .as_ref()
                .filter(|a| a.rate_limit > 0)
                .map(|a| Arc::new(RateLimit::new(a.rate_limit, config.server.ipv6_prefix))),
        };
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            slots: Mutex::new(HashMap::new()),
            per_ip: Mutex::new(HashMap::new()),
            pool: Mutex::new(Pool {
                workers: config.server.workers,
                busy: 0,
                queued: 0,
                evicting: 0,
            }),
            stressed: AtomicBool::new(false),
            ipv6_prefix: config.server.ipv6_prefix,
            next_id: AtomicU64::new(1),
            stats: Arc::new(Stats::default()),
            stop_tx,
            hostname: config.hostname.clone(),
        });
        let handle = Handle {
            shared: Arc::clone(&shared),
            addrs: Arc::new(Mutex::new(addrs)),
            metrics_addr: metrics.as_ref().and_then(|l| l.local_addr().ok()),
            reload: Arc::new(Mutex::new(ReloadState {
                running: config.clone(),
                applied: config.clone(),
                tls: tls.as_ref().map(|(_, r)| Arc::clone(r)),
                reloaders,
            })),
        };
        Ok(Server {
            config,
            settings,
            hooks,
            tls,
            listeners,
            metrics,
            shared,
            stop_rx,
            handle,
            faults: Arc::new(NoFaults),
            stack_size: DEFAULT_WORKER_STACK,
            guards,
            // With [mailboxes] the maps route delivery; an embedder's router wins.
            router: mailboxes.clone().map(|m| m as Arc<dyn Router>),
            mailboxes,
        })
    }

    /// The live `[mailboxes]` maps, for reloading them (SIGHUP).
    pub fn mailboxes(&self) -> Option<Arc<Mailboxes>> {
        self.mailboxes.clone()
    }

    /// A handle to stop the server and read its addresses and counters.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Runs until [`Handle::shutdown`]; then stops gracefully and returns.
    pub fn run(self) -> Result<(), ServerError> {
        let cfg = &self.config;
        // Before the spool opens (so before any delivery): a crash's debris in the
        // mailboxes' tmp/ (invariant 1).
        if let Some(m) = &cfg.mailboxes {
            crate::mailboxes::clear_debris(&m.root, &cfg.hostname);
        }
        let spool_opts = cfg
            .spool
            .file_mode()
            .map(|file_mode| SpoolOptions {
                fsync: cfg.spool.fsync,
                data_sync: match cfg.spool.data_sync {
                    DataSyncPolicy::File => DataSync::PerFile,
                    DataSyncPolicy::Batch => DataSync::Batch,
                },
                file_mode,
                faults: Arc::clone(&self.faults),
            })
            .map_err(|m| io::Error::new(io::ErrorKind::InvalidInput, format!("file_mode {m}")));
        let (store, writer) = spool_opts
            .and_then(|opts| {
                Maildir::open_with(
                    &cfg.spool.dir,
                    &cfg.hostname,
                    opts,
                    Arc::clone(&self.shared.stats.spool),
                )
            })
            .map_err(|err| ServerError::Spool {
                dir: cfg.spool.dir.display().to_string(),
                err,
            })?;
        let store = Arc::new(CountingStore {
            inner: store,
            stats: Arc::clone(&self.shared.stats),
        });
        let reload_stop = Arc::new(AtomicBool::new(false));
        if let Some((_, resolver)) = &self.tls {
            resolver.watch(Duration::from_secs(1), Arc::clone(&reload_stop));
        }
        if let Some(m) = &self.mailboxes {
            m.watch(Duration::from_secs(1), Arc::clone(&reload_stop));
        }
        let workers = cfg.server.workers;
        // A socket is queued only when a worker is free for it (or will be, once an
        // evicted session ends): the acceptor counts that in `Shared::pool`, so a
        // client never waits in a queue behind busy workers (SPEC 4: never hang a
        // client silently). The capacity is never reached; it is a safety bound.
        let (job_tx, job_rx) = bounded::<Job>(workers * 2);
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
                router: self.router.clone(),
                done: done_tx.clone(),
                ready: ready_tx.clone(),
                proxy: cfg.server.proxy_protocol.then_some(proxy_timeout),
                per_ip_max: cfg.server.max_connections_per_ip,
                guards: self.guards.clone(),
            };
            std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .stack_size(self.stack_size)
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
        let mut metrics_thread = None;
        if let Some(listener) = self.metrics {
            let addr = listener.local_addr().map_err(ServerError::Thread)?;
            log::info!("metrics: serving http://{addr}/metrics");
            wake.push(addr);
            metrics_thread = Some(
                crate::metrics::spawn(
                    listener,
                    Arc::clone(&self.shared.stats),
                    workers,
                    Arc::clone(&reload_stop),
                )
                .map_err(ServerError::Thread)?,
            );
        }
        // Every listener is bound and served, the spool is open: ready (sd_notify(3);
        // a no-op without NOTIFY_SOCKET).
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            log::warn!("systemd: cannot send READY=1: {e}");
        }
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
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        self.shared.stopping.store(true, Ordering::SeqCst);
        reload_stop.store(true, Ordering::SeqCst);
        for addr in wake {
            // Wake the blocking accept() so the acceptor sees the flag.
            let _ = TcpStream::connect_timeout(&loopback_of(addr), Duration::from_millis(200));
        }
        for a in acceptors {
            let _ = a.join();
        }
        if let Some(m) = metrics_thread {
            let _ = m.join();
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
    /// A worker took a queued socket.
    fn took_job(&self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.queued = pool.queued.saturating_sub(1);
        pool.busy += 1;
        self.update_stress(&pool);
    }

    /// A worker's session is over (`evicted`: it had been told to make room): the
    /// worker counts as free from now on, once. Called before the last reply is
    /// written, so a client that reconnects on reading it never finds its own old
    /// session still counted busy.
    fn release(&self, released: &AtomicBool, evicted: bool) {
        if released.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.busy = pool.busy.saturating_sub(1);
        if evicted {
            pool.evicting = pool.evicting.saturating_sub(1);
        }
        self.update_stress(&pool);
    }

    /// Stress begins when more than 80 % of the workers are busy and ends at 70 % or
    /// less: the gap keeps one episode from being logged many times when the count
    /// hovers around the threshold.
    fn update_stress(&self, pool: &Pool) {
        let (busy, n) = (pool.busy, pool.workers);
        let was = self.stressed.load(Ordering::SeqCst);
        if !was && busy * 5 > n * 4 {
            self.stressed.store(true, Ordering::SeqCst);
            log::warn!(
                "entering stress: {busy} of {n} workers busy; sessions waiting for a command get {}s, and when all are busy the longest waiting one is closed for a new client",
                STRESS_COMMAND_TIMEOUT.as_secs()
            );
        } else if was && busy * 10 <= n * 7 {
            self.stressed.store(false, Ordering::SeqCst);
            log::warn!("leaving stress: {busy} of {n} workers busy");
        }
    }

    /// The deadline for a command: shorter while under stress.
    fn command_timeout(&self, normal: Duration) -> Duration {
        if self.stressed.load(Ordering::SeqCst) {
            normal.min(STRESS_COMMAND_TIMEOUT)
        } else {
            normal
        }
    }

    /// Decides at once what happens to a new socket: queued for a free worker, queued
    /// for the worker of the session that has waited longest for a command (which is
    /// told to close), or refused (every session is working or inside a message).
    fn admit(&self, tx: &Sender<Job>, job: Job) -> Result<(), Job> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.available() == 0 {
            if !self.evict_one(job.peer) {
                return Err(job);
            }
            pool.evicting += 1;
        }
        match tx.try_send(job) {
            Ok(()) => {
                pool.queued += 1;
                Ok(())
            }
            Err(e) => Err(e.into_inner()),
        }
    }

    /// Tells the session that has waited longest at a command prompt to close (its
    /// read side is shut, as at shutdown); false when no session waits for a command.
    fn evict_one(&self, newcomer: SocketAddr) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let mut best: Option<(Instant, u64, &Arc<Slot>)> = None;
            for (id, slot) in slots.iter() {
                if let Phase::Prompt(since) = *slot.phase() {
                    if best.is_none_or(|(b, _, _)| since < b) {
                        best = Some((since, *id, slot));
                    }
                }
            }
            let Some((since, id, slot)) = best else {
                return false;
            };
            let mut phase = slot.phase();
            // It may have received a command since it was looked at: then it is
            // working, and the next longest waiting session is the one.
            if *phase != Phase::Prompt(since) {
                continue;
            }
            *phase = Phase::Evicted;
            let _ = slot.tcp.set_write_timeout(Some(EVICT_WRITE_WAIT));
            let _ = slot.tcp.shutdown(Shutdown::Read);
            log::warn!(
                "all workers busy: closing session {id} (waited {}s for a command) to serve {newcomer}",
                since.elapsed().as_secs()
            );
            return true;
        }
    }

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
            let phase = s.phase();
            if *phase != Phase::Message {
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
            if let Err(job) = self.shared.admit(&self.tx, job) {
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

struct Worker {
    rx: Receiver<Job>,
    shared: Arc<Shared>,
    settings: Arc<Settings>,
    hooks: Arc<dyn Hooks>,
    store: Arc<CountingStore>,
    tls: Option<Arc<ServerConfig>>,
    limits: WireLimits,
    wants_data: bool,
    router: Option<Arc<dyn Router>>,
    done: Sender<()>,
    /// Signalled once, just before the worker first waits for a socket.
    ready: Sender<()>,
    /// `Some(timeout)` when a PROXY header must come first.
    proxy: Option<Duration>,
    per_ip_max: usize,
    guards: Guards,
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
        let mut phase = self.slot.phase();
        if self.stopping() || *phase == Phase::Evicted {
            return false;
        }
        *phase = Phase::Message;
        true
    }
    fn leave_message(&self) {
        let mut phase = self.slot.phase();
        if *phase == Phase::Message {
            *phase = Phase::Working;
        }
    }
    fn command_timeout(&self, normal: Duration) -> Duration {
        self.shared.command_timeout(normal)
    }
    fn at_prompt(&self) {
        let mut phase = self.slot.phase();
        if *phase == Phase::Working {
            *phase = Phase::Prompt(Instant::now());
        }
    }
    fn got_command(&self) -> bool {
        let mut phase = self.slot.phase();
        if *phase == Phase::Evicted {
            return false;
        }
        *phase = Phase::Working;
        true
    }
    fn closing(&self) {
        let evicted = *self.slot.phase() == Phase::Evicted;
        self.shared.release(&self.slot.released, evicted);
    }
}

impl Worker {
    fn run(self) {
        let _ = self.ready.send(());
        while let Ok(job) = self.rx.recv() {
            self.shared.took_job();
            let peer = job.peer;
            let evicted = Cell::new(false);
            let released = Arc::new(AtomicBool::new(false));
            // A panic in one session must not end the worker or the server (invariant 5).
            let served = catch_unwind(AssertUnwindSafe(|| {
                self.serve(job, &evicted, Arc::clone(&released))
            }));
            if served.is_err() {
                log::error!("session with {peer} panicked; worker continues");
            }
            self.shared.release(&released, evicted.get());
        }
        let _ = self.done.send(());
    }

    fn serve(&self, job: Job, evicted: &Cell<bool>, released: Arc<AtomicBool>) {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let _scope = crate::logfmt::SessionScope::enter(id);
        let began = Instant::now();
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
            phase: Mutex::new(Phase::Working),
            released,
        });
        self.shared
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::clone(&slot));
        let _unregister = Unregister {
            shared: &self.shared,
            id,
            evicted,
        };
        let mut peer = job.peer;
        let mut _ip = job.ip;
        if let Some(timeout) = self.proxy {
            // The PROXY header comes before anything else, TLS included; without a
            // valid one the connection closes without a greeting.
            match read_proxy_header(&tcp, timeout) {
                Ok(source) => peer = source.map_or(peer, canonical),
                Err(e) => {
                    log::info!(
                        "session {id}: client {}: bad or missing PROXY header: {e}; closing",
                        peer.ip()
                    );
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
            local: tcp.local_addr().unwrap_or(job.peer),
            auth_mechanism: None,
        };
        let tally = Arc::new(SessionTally::default());
        let stream = if job.implicit_tls {
            let Some(cfg) = &self.tls else { return };
            // A client that connects and stays silent holds a worker like one silent at
            // a command prompt: it may be closed for a new client, and under stress it
            // gets the short deadline.
            *slot.phase() = Phase::Prompt(Instant::now());
            let timeout = self.shared.command_timeout(self.limits.command_timeout);
            let accepted = Stream::accept_tls(tcp, Arc::clone(cfg), timeout);
            {
                let mut phase = slot.phase();
                if *phase == Phase::Evicted {
                    log::warn!(
                        "session {id}: client {}: closed during the TLS handshake for a new client",
                        peer.ip()
                    );
                    drop(phase);
                    log_summary(id, peer, began, &tally, "evicted");
                    return;
                }
                *phase = Phase::Working;
            }
            match accepted {
                Ok((s, tls)) => {
                    log::info!(
                        "session {id}: TLS established, {} {}",
                        tls.version,
                        tls.cipher
                    );
                    tally.set_tls(&tls.version);
                    info.tls = Some(tls);
                    s
                }
                Err(e) => {
                    log::info!(
                        "session {id}: client {}: TLS handshake failed: {e}",
                        peer.ip()
                    );
                    log_summary(id, peer, began, &tally, "tls-failed");
                    return;
                }
            }
        } else {
            Stream::Plain {
                tcp,
                tls: self.tls.clone(),
            }
        };
        let mut session = Session::new(Arc::clone(&self.settings), Arc::clone(&self.hooks), info);
        session.set_guards(self.guards.clone());
        let life = Life {
            shared: &self.shared,
            slot: &slot,
        };
        let stream = CountReplies::new(stream, stats).with_tally(Arc::clone(&tally));
        let store = SessionStore {
            inner: self.store.as_ref(),
            tally: Arc::clone(&tally),
        };
        let mut conn = Connection::new(
            stream,
            session,
            &store,
            &life,
            self.limits.clone(),
            self.wants_data,
        )
        .with_router(self.router.clone());
        let end = conn.run();
        // The stream goes first (a TLS session sends close_notify as it is dropped).
        drop(conn);
        linger(&slot.tcp);
        let reason = match end {
            End::Quit => "quit".to_string(),
            End::Eof => "client-closed".to_string(),
            End::Timeout => "timeout".to_string(),
            End::Closed => "server-closed".to_string(),
            End::ShuttingDown => "shutdown".to_string(),
            End::Evicted => "evicted".to_string(),
            End::Lifetime => "session-lifetime".to_string(),
            End::Io(kind) => format!("io-error({})", kind.to_string().replace(' ', "-")),
        };
        log_summary(id, peer, began, &tally, &reason);
    }
}

/// The one line that ends every session (fail2ban matches `reason=timeout`).
fn log_summary(id: u64, peer: SocketAddr, began: Instant, tally: &SessionTally, reason: &str) {
    log::info!(
        "session {id}: client {}: disconnect reason={reason} duration={:.3}s messages={} bytes={} tls={}",
        peer.ip(),
        began.elapsed().as_secs_f64(),
        tally.messages.load(Ordering::Relaxed),
        tally.bytes.load(Ordering::Relaxed),
        tally.tls_version(),
    );
}

/// Closes like a web server's lingering close, without waiting: FIN goes out behind
/// the last reply, then what the client sent and the session did not read (pipelined
/// commands after a 421, a dripping attacker's bytes) is read and dropped. Closing a
/// socket with unread input makes the kernel send RST and drop replies not yet on the
/// wire, so the client could miss the 421 that says why it was closed.
fn linger(tcp: &TcpStream) {
    if tcp.shutdown(Shutdown::Write).is_err() || tcp.set_nonblocking(true).is_err() {
        return;
    }
    let mut scratch = [0u8; 4096];
    let mut reader = tcp;
    for _ in 0..16 {
        if !matches!(reader.read(&mut scratch), Ok(n) if n > 0) {
            break;
        }
    }
}

/// Removes a session's slot when it ends (a panic included) and notes whether it had
/// been evicted, for the pool's count.
struct Unregister<'a> {
    shared: &'a Shared,
    id: u64,
    evicted: &'a Cell<bool>,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        let slot = self
            .shared
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        if let Some(slot) = slot {
            self.evicted.set(*slot.phase() == Phase::Evicted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_counted_by_ipv4_address_or_ipv6_prefix() {
        let key = |ip: &str, prefix| client_key(ip.parse().unwrap(), prefix).to_string();
        assert_eq!(key("192.0.2.1", 64), "192.0.2.1");
        assert_eq!(key("::ffff:192.0.2.1", 64), "192.0.2.1");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 64), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 48), "2001:db8:1::");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 128), "2001:db8:1:2:3:4:5:6");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 1), "::");
    }

    #[test]
    fn the_pool_counts_evicted_workers_as_promised() {
        let mut p = Pool {
            workers: 2,
            busy: 2,
            queued: 0,
            evicting: 0,
        };
        assert_eq!(p.available(), 0);
        // One session told to close, its worker promised to one queued socket.
        p.evicting = 1;
        assert_eq!(p.available(), 1);
        p.queued = 1;
        assert_eq!(p.available(), 0);
        // The evicted session ends, the worker takes the socket: still nothing free.
        p.evicting = 0;
        p.busy = 1;
        assert_eq!(p.available(), 0);
        p.queued = 0;
        p.busy = 2;
        assert_eq!(p.available(), 0);
    }
}
