//! The graceful stop (SPEC invariant 7): waking the acceptors, closing idle sessions,
//! and closing the rest when the grace period ends.

use super::pool::Phase;
use super::{Shared, LOG_TARGET};
use crossbeam_channel::Receiver;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the graceful stop wakes, joins and waits for.
pub(super) struct Running {
    /// The listen (and metrics) addresses, connected to once to wake a blocked accept().
    pub(super) wake: Vec<SocketAddr>,
    pub(super) acceptors: Vec<JoinHandle<()>>,
    pub(super) metrics: Option<JoinHandle<()>>,
    /// Stops the certificate and mailbox-map watchers (and the metrics server).
    pub(super) reload_stop: Arc<AtomicBool>,
    /// One message per worker thread as it exits.
    pub(super) done: Receiver<()>,
    pub(super) workers: usize,
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
    /// Stops gracefully: no new connections, idle sessions told to close at once,
    /// sessions inside a message given `grace` to finish, then closed.
    pub(super) fn stop(&self, running: Running, grace: Duration) {
        let began = Instant::now();
        log::info!(target: LOG_TARGET, "stopping: no new connections, {}s grace", grace.as_secs());
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        self.stopping.store(true, Ordering::SeqCst);
        running.reload_stop.store(true, Ordering::SeqCst);
        for addr in running.wake {
            // Wake the blocking accept() so the acceptor sees the flag.
            let _ = TcpStream::connect_timeout(&loopback_of(addr), Duration::from_millis(200));
        }
        for a in running.acceptors {
            let _ = a.join();
        }
        if let Some(m) = running.metrics {
            let _ = m.join();
        }
        self.close_idle();
        // Workers finish queued and running sessions, then exit.
        let force_at = grace.saturating_sub(Duration::from_millis(500));
        let mut left = running.workers;
        while left > 0 {
            let wait = force_at.saturating_sub(began.elapsed());
            match running.done.recv_timeout(wait) {
                Ok(()) => left -= 1,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    log::warn!(
                        target: LOG_TARGET,
                        "grace period over: closing {left} busy session(s)"
                    );
                    self.close_all();
                    while left > 0 && running.done.recv_timeout(Duration::from_secs(2)).is_ok() {
                        left -= 1;
                    }
                    break;
                }
            }
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
