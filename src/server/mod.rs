//! The server edge (SPEC 1): listeners, the bounded queue of sockets, the fixed worker
//! pool, per-IP limits, the spool writer, statistics and graceful shutdown.
//!
//! This file holds the public face (the builder, [`Server::run`], [`Handle`]) and the
//! state every part shares; each concern at the edge lives in its own file:
//! `accept` (admission, refusal, eviction), `worker` (one session's lifecycle),
//! `pool` (busy/stress accounting), `per_ip` (per-client limits), `proxy_io`
//! (reading a PROXY header), `reload` (SIGHUP) and `shutdown` (graceful stop).

mod accept;
mod per_ip;
mod pool;
mod proxy_io;
mod reload;
mod shutdown;
mod worker;

pub use crate::auth::AuthError;
pub use crate::tls::TlsError;
pub use reload::Reloader;

pub(crate) use per_ip::client_key;

use accept::Acceptor;
use pool::Pool;
use proxy_io::PROXY_HEADER_TIMEOUT;
use reload::ReloadState;
use shutdown::Running;
use worker::{Job, Worker};

use crate::auth::{RateLimit, Users};
use crate::config::Config;
use crate::config::DataSyncPolicy;
use crate::connection::WireLimits;
use crate::delivery::Router;
use crate::hooks::{Chain, Hooks, NoHooks, Policy};
use crate::mailboxes::{Mailboxes, RecipientCheck};
use crate::session::{AuthSettings, Guards, Settings};
use crate::spool::{DataSync, Faults, Maildir, NoFaults, SpoolOptions};
use crate::stats::{CountingStore, Stats, StatsSnapshot};
use crate::tls;
use crossbeam_channel::{bounded, Receiver, Sender};
use pool::Slot;
use rustls::ServerConfig;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

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
    Spool {
        /// The directory.
        dir: String,
        /// Why.
        err: io::Error,
    },
    /// A listen address cannot be bound.
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        err: io::Error,
    },
    /// A thread could not be started.
    Thread(io::Error),
    /// A value [`Config::validate`] refuses (the dotted key and the problem), the same
    /// check `mailer check-config` and the binary's startup make (invariant 12).
    Config {
        /// The dotted key, e.g. `limits.max_errors`.
        key: String,
        /// What is wrong.
        message: String,
    },
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

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServerError::Tls(e) => Some(e),
            ServerError::Auth(e) => Some(e),
            ServerError::Spool { err, .. } | ServerError::Bind { err, .. } => Some(err),
            ServerError::Thread(e) => Some(e),
            ServerError::Mailboxes(_) | ServerError::Config { .. } | ServerError::Milter(_) => None,
        }
    }
}

/// The log target of every line the server's parts write: the one `server.rs` had
/// before it was split, which log filters (`RUST_LOG`, the fail2ban filter in
/// `contrib/`) match.
const LOG_TARGET: &str = "mailer::server";

/// The default stack of a worker thread. Only touched pages take memory, so a roomy
/// stack costs address space, not RAM, and a hook that recurses deeply does not abort
/// the whole process (a stack overflow cannot be caught).
pub const DEFAULT_WORKER_STACK: usize = 2 * 1024 * 1024;

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

    /// Storage fault injection for tests of the spool's failure paths (`testing`
    /// feature only).
    #[cfg(feature = "testing")]
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
            bare_lf: config.limits.bare_lf.into(),
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
            command_timeout: Duration::from_secs(cfg.limits.command_timeout_secs),
            data_timeout: Duration::from_secs(cfg.limits.data_timeout_secs),
            min_data_rate: cfg.limits.min_data_rate,
        };
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
        self.shared.stop(
            Running {
                wake,
                acceptors,
                metrics: metrics_thread,
                reload_stop,
                done: done_rx,
                workers,
            },
            grace,
        );
        drop(store);
        let _ = writer.join();
        log::info!("stopped; stats: {}", self.shared.stats.snapshot());
        Ok(())
    }
}
