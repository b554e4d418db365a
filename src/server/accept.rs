//! The acceptor threads: what happens to a new socket at once (handed to a free
//! worker, to the worker of an evicted idle session, or refused with 421).

use super::per_ip::canonical;
use super::pool::{Phase, Slot};
use super::worker::Job;
use super::{Shared, LOG_TARGET};
use crate::protocol::replies;
use crossbeam_channel::Sender;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an evicted session may take to write its 421 to a client that does not
/// read: its worker is promised to a new client.
const EVICT_WRITE_WAIT: Duration = Duration::from_secs(1);

pub(super) struct Acceptor {
    pub(super) listener: TcpListener,
    pub(super) implicit_tls: bool,
    pub(super) tx: Sender<Job>,
    pub(super) shared: Arc<Shared>,
    pub(super) per_ip_max: usize,
    /// With `proxy_protocol` every socket comes from the proxy: the per-IP limit is
    /// applied by the worker to the client in the PROXY header instead.
    pub(super) proxy_protocol: bool,
}

impl Acceptor {
    pub(super) fn run(self) {
        for conn in self.listener.incoming() {
            if self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let tcp = match conn {
                Ok(t) => t,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    log::warn!(target: LOG_TARGET, "accept failed: {e}");
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

impl Shared {
    /// Refuses a connection before its greeting: 421 4.7.0 at once rather than a
    /// silent wait (SPEC 4). An implicit-TLS client gets no reply: plaintext would be
    /// garbage to it.
    pub(super) fn refuse(
        &self,
        mut tcp: TcpStream,
        peer: SocketAddr,
        implicit_tls: bool,
        why: &str,
    ) {
        self.stats.count_refusal(why);
        log::warn!(target: LOG_TARGET, "client {}: refused connection: {why}", peer.ip());
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
        let mut out = Vec::with_capacity(128);
        let r = replies::refused(&self.hostname, why);
        crate::stats::write_reply(Some(&self.stats), &r, &mut out);
        let _ = tcp.write_all(&out);
        let _ = tcp.shutdown(Shutdown::Both);
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
                target: LOG_TARGET,
                "all workers busy: closing session {id} (waited {}s for a command) to serve {newcomer}",
                since.elapsed().as_secs()
            );
            return true;
        }
    }
}
