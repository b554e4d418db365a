//! The acceptors' and workers' shared count of the pool: which worker is busy, which
//! session waits at a prompt, and when the pool is under stress (SPEC invariant 8).

use super::{Shared, LOG_TARGET};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// While the pool is under stress, the longest wait for a command (SPEC invariant 8,
/// after Postfix's stress-adaptive `smtpd_timeout`).
const STRESS_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Where one live connection stands, for the shutdown logic and the acceptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
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
pub(super) struct Slot {
    pub(super) tcp: TcpStream,
    pub(super) phase: Mutex<Phase>,
    /// Set once the worker counts as free again (see [`Shared::release`]).
    pub(super) released: Arc<AtomicBool>,
}

impl Slot {
    pub(super) fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The acceptors' view of the worker pool. Counted under one lock so that the
/// decision "hand over, evict or refuse" never waits (SPEC invariant 8).
pub(super) struct Pool {
    pub(super) workers: usize,
    /// Workers running a session.
    pub(super) busy: usize,
    /// Sockets handed over but not yet taken by a worker.
    pub(super) queued: usize,
    /// Sessions told to close for a new client that have not ended yet: each one's
    /// worker is already promised to a queued socket.
    pub(super) evicting: usize,
}

impl Pool {
    /// Workers free for a new socket now or as soon as an evicted session ends.
    pub(super) fn available(&self) -> usize {
        (self.workers + self.evicting).saturating_sub(self.busy + self.queued)
    }
}

impl Shared {
    /// A worker took a queued socket.
    pub(super) fn took_job(&self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.queued = pool.queued.saturating_sub(1);
        pool.busy += 1;
        self.update_stress(&pool);
    }

    /// A worker's session is over (`evicted`: it had been told to make room): the
    /// worker counts as free from now on, once. Called before the last reply is
    /// written, so a client that reconnects on reading it never finds its own old
    /// session still counted busy.
    pub(super) fn release(&self, released: &AtomicBool, evicted: bool) {
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
                target: LOG_TARGET,
                "entering stress: {busy} of {n} workers busy; sessions waiting for a command get {}s, and when all are busy the longest waiting one is closed for a new client",
                STRESS_COMMAND_TIMEOUT.as_secs()
            );
        } else if was && busy * 10 <= n * 7 {
            self.stressed.store(false, Ordering::SeqCst);
            log::warn!(target: LOG_TARGET, "leaving stress: {busy} of {n} workers busy");
        }
    }

    /// The deadline for a command: shorter while under stress.
    pub(super) fn command_timeout(&self, normal: Duration) -> Duration {
        if self.stressed.load(Ordering::SeqCst) {
            normal.min(STRESS_COMMAND_TIMEOUT)
        } else {
            normal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
