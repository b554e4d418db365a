//! A worker thread and one session's lifecycle on it: PROXY header, per-IP claim, TLS,
//! the connection, the closing log line.

use super::per_ip::{canonical, IpGuard};
use super::pool::{Phase, Slot};
use super::proxy_io::read_proxy_header;
use super::{Shared, LOG_TARGET};
use crate::connection::{Connection, End, Lifecycle, WireLimits};
use crate::delivery::Router;
use crate::hooks::{Hooks, SessionInfo};
use crate::session::{Guards, Session, Settings};
use crate::stats::{ActiveGuard, CountingStore, SessionStore, SessionTally};
use crate::tls::Stream;
use crossbeam_channel::{Receiver, Sender};
use rustls::ServerConfig;
use std::cell::Cell;
use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(super) struct Job {
    pub(super) tcp: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) implicit_tls: bool,
    /// The per-IP slot of the socket peer; `None` with `proxy_protocol`, where the
    /// worker claims one for the client named in the PROXY header.
    pub(super) ip: Option<IpGuard>,
}

pub(super) struct Worker {
    pub(super) rx: Receiver<Job>,
    pub(super) shared: Arc<Shared>,
    pub(super) settings: Arc<Settings>,
    pub(super) hooks: Arc<dyn Hooks>,
    pub(super) store: Arc<CountingStore>,
    pub(super) tls: Option<Arc<ServerConfig>>,
    pub(super) limits: WireLimits,
    pub(super) router: Option<Arc<dyn Router>>,
    pub(super) done: Sender<()>,
    /// Signalled once, just before the worker first waits for a socket.
    pub(super) ready: Sender<()>,
    /// `Some(timeout)` when a PROXY header must come first.
    pub(super) proxy: Option<Duration>,
    pub(super) per_ip_max: usize,
    pub(super) guards: Guards,
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
    pub(super) fn run(self) {
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
                log::error!(target: LOG_TARGET, "session with {peer} panicked; worker continues");
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
                        target: LOG_TARGET,
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
            log::info!(
                target: LOG_TARGET,
                "session {id}: connect from {peer} via proxy {}", job.peer
            );
        } else {
            log::info!(target: LOG_TARGET, "session {id}: connect from {peer}");
        }
        let mut info = SessionInfo::new(id, peer, tcp.local_addr().unwrap_or(job.peer));
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
                        target: LOG_TARGET,
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
                        target: LOG_TARGET,
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
                        target: LOG_TARGET,
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
        let store = SessionStore {
            inner: self.store.as_ref(),
            tally: Arc::clone(&tally),
        };
        let mut conn = Connection::new(stream, session, &store, &life, self.limits.clone())
            .with_router(self.router.clone())
            .with_stats(stats, Arc::clone(&tally));
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
        target: LOG_TARGET,
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
