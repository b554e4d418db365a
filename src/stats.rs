//! Counters for the periodic `stats:` log line and for embedders (`Handle::stats`):
//! connections, replies refused by code, messages and bytes stored, spool queue depth
//! and commit latency. The counting wrapper sits around the store; replies are counted
//! where they are written (`write_reply`).

use crate::protocol::reply::Reply;
use crate::spool::{Copy, Maildir, MessageWriter, SpoolStats, Store, StoreError};
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The reply codes counted in [`Stats`]: every valid SMTP code (RFC 5321 4.2: the
/// first digit is 2 to 5; 1yz is unused but costs nothing to count).
const REPLY_CODES: std::ops::RangeInclusive<u16> = 100..=599;
/// The codes the snapshot calls refusals.
const REFUSAL_CODES: std::ops::RangeInclusive<u16> = 400..=599;

/// Why a connection was refused before its greeting (the `reason` label of
/// `mailer_connections_refused_total`).
pub(crate) const REFUSAL_REASONS: [&str; 3] = ["per_ip_limit", "busy", "other"];

/// Upper bounds (seconds) of the spool commit latency histogram: from a fast SSD
/// (sub-millisecond fsync) to a disk in trouble.
const COMMIT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Counters for the stats line and for embedders (`Handle::stats`).
#[derive(Debug)]
pub(crate) struct Stats {
    /// Connections handed to a worker.
    pub(crate) connections_total: AtomicU64,
    /// Connections a worker is serving now.
    pub(crate) connections_active: AtomicU64,
    /// Refused before the greeting: per-IP limit or all workers busy.
    pub(crate) connections_refused: AtomicU64,
    /// Messages acknowledged with 250 (durable in `new/`).
    pub(crate) messages_accepted: AtomicU64,
    /// Bytes of the accepted messages as stored (trace headers included).
    pub(crate) bytes_accepted: AtomicU64,
    /// Messages between the end of their data and their ack: file fsync, waiting
    /// for the writer thread, rename and directory fsync.
    pub(crate) queue_depth: AtomicU64,
    /// Commits finished (stored or failed) and their summed duration, for the mean.
    pub(crate) commits: AtomicU64,
    pub(crate) commit_micros: AtomicU64,
    /// Every reply sent, by code (index = code - 100).
    replies: Vec<AtomicU64>,
    /// Connections refused before the greeting, by [`REFUSAL_REASONS`] index.
    refused_by_reason: [AtomicU64; 3],
    /// Time from the end of a message's data to its durable ack, seconds.
    pub(crate) commit_seconds: prometheus_client::metrics::histogram::Histogram,
    /// The spool writer's own counters (batches, directory fsyncs, commits).
    pub(crate) spool: Arc<SpoolStats>,
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
            replies: REPLY_CODES.map(|_| AtomicU64::new(0)).collect(),
            refused_by_reason: Default::default(),
            commit_seconds: prometheus_client::metrics::histogram::Histogram::new(COMMIT_BUCKETS),
            spool: Arc::default(),
        }
    }
}

/// The server's counters at one moment, as [`Handle::stats`](crate::Handle::stats)
/// returns them. Its `Display` is the `stats:` log line's `key=value` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections handed to a worker since the server started.
    pub connections_total: u64,
    /// Connections a worker is serving now.
    pub connections_active: u64,
    /// Connections refused before the greeting: the per-IP limit or all workers busy.
    pub connections_refused: u64,
    /// Messages renamed into `new/` and fsynced by the spool writer.
    pub messages_stored: u64,
    /// Messages acknowledged with 250 (the same as `messages_stored` once the writer
    /// has handed back every ack).
    pub messages_accepted: u64,
    /// Bytes of the accepted messages as stored, trace headers included.
    pub bytes_accepted: u64,
    /// Every 4xx/5xx reply sent, by reply code: refused commands, recipients and
    /// messages, and the 421s sent before a greeting.
    pub refused: BTreeMap<u16, u64>,
    /// Every reply sent, by code (2xx and 3xx too).
    pub replies: BTreeMap<u16, u64>,
    /// Connections refused before the greeting, by reason: `per_ip_limit`, `busy` or
    /// `other`.
    pub refused_by_reason: BTreeMap<&'static str, u64>,
    /// Messages waiting for their commit (file fsync, writer queue, directory fsync).
    pub queue_depth: u64,
    /// Commit batches the spool writer has finished (each `new/` a batch touched is
    /// fsynced once).
    pub spool_batches: u64,
    /// Mean directory-fsync time per batch, microseconds.
    pub fsync_micros_avg: u64,
    /// Mean time from the end of a message's data to its ack, microseconds.
    pub commit_micros_avg: u64,
}

impl Stats {
    /// The counters now, as [`Handle::stats`](crate::Handle::stats) reports them.
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let batches = self.spool.batches.load(Ordering::Relaxed);
        let replies: BTreeMap<u16, u64> = REPLY_CODES
            .zip(&self.replies)
            .map(|(code, n)| (code, n.load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect();
        let refused = replies
            .iter()
            .filter(|(code, _)| REFUSAL_CODES.contains(code))
            .map(|(&c, &n)| (c, n))
            .collect();
        let refused_by_reason = REFUSAL_REASONS
            .iter()
            .zip(&self.refused_by_reason)
            .map(|(&r, n)| (r, n.load(Ordering::Relaxed)))
            .collect();
        StatsSnapshot {
            connections_total: self.connections_total.load(Ordering::Relaxed),
            connections_active: self.connections_active.load(Ordering::Relaxed),
            connections_refused: self.connections_refused.load(Ordering::Relaxed),
            messages_stored: self.spool.committed.load(Ordering::Relaxed),
            messages_accepted: self.messages_accepted.load(Ordering::Relaxed),
            bytes_accepted: self.bytes_accepted.load(Ordering::Relaxed),
            refused,
            replies,
            refused_by_reason,
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

    /// Counts one reply sent with this code.
    pub(crate) fn count_reply(&self, code: u16) {
        if REPLY_CODES.contains(&code) {
            self.replies[usize::from(code - 100)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a connection refused before its greeting; `why` is the reply text,
    /// which tells the per-IP limit from a full pool.
    pub(crate) fn count_refusal(&self, why: &str) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
        let i = if why.contains("too many connections") {
            0
        } else if why.contains("busy") {
            1
        } else {
            2
        };
        self.refused_by_reason[i].fetch_add(1, Ordering::Relaxed);
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

pub(crate) struct ActiveGuard<'a>(pub(crate) &'a Stats);
impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What one session did, for its summary line: messages and bytes stored, and the
/// TLS version once encrypted.
#[derive(Debug, Default)]
pub(crate) struct SessionTally {
    /// Messages stored.
    pub(crate) messages: AtomicU64,
    /// Their bytes as stored.
    pub(crate) bytes: AtomicU64,
    /// The TLS version once the session is encrypted.
    tls: std::sync::Mutex<Option<String>>,
}

impl SessionTally {
    /// The TLS version, or `none`.
    pub(crate) fn tls_version(&self) -> String {
        self.tls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "none".into())
    }

    /// Notes the TLS version the session upgraded to.
    pub(crate) fn set_tls(&self, version: &str) {
        *self.tls.lock().unwrap_or_else(|p| p.into_inner()) = Some(version.to_string());
    }
}

/// One session's view of the [`CountingStore`], adding to its [`SessionTally`].
pub(crate) struct SessionStore<'a> {
    pub(crate) inner: &'a CountingStore,
    pub(crate) tally: Arc<SessionTally>,
}

impl Store for SessionStore<'_> {
    fn begin(&self) -> Result<Box<dyn MessageWriter>, StoreError> {
        Ok(self
            .inner
            .wrap(self.inner.inner.begin()?, Some(Arc::clone(&self.tally))))
    }

    fn begin_in(
        &self,
        maildir: &std::path::Path,
    ) -> Option<Result<Box<dyn MessageWriter>, StoreError>> {
        Some(
            self.inner
                .inner
                .begin_in(maildir)?
                .map(|m| self.inner.wrap(m, Some(Arc::clone(&self.tally)))),
        )
    }
}

/// The spool as sessions see it, counting accepted messages and bytes, commits in
/// flight (the queue depth) and how long commits take.
pub(crate) struct CountingStore {
    pub(crate) inner: Maildir,
    pub(crate) stats: Arc<Stats>,
}

impl CountingStore {
    fn wrap(
        &self,
        inner: Box<dyn MessageWriter>,
        tally: Option<Arc<SessionTally>>,
    ) -> Box<dyn MessageWriter> {
        Box::new(CountingMessage {
            inner,
            bytes: 0,
            stats: Arc::clone(&self.stats),
            tally,
        })
    }
}

impl Store for CountingStore {
    fn begin(&self) -> Result<Box<dyn MessageWriter>, StoreError> {
        Ok(self.wrap(self.inner.begin()?, None))
    }

    fn begin_in(
        &self,
        maildir: &std::path::Path,
    ) -> Option<Result<Box<dyn MessageWriter>, StoreError>> {
        Some(self.inner.begin_in(maildir)?.map(|m| self.wrap(m, None)))
    }
}

pub(crate) struct CountingMessage {
    inner: Box<dyn MessageWriter>,
    bytes: u64,
    stats: Arc<Stats>,
    tally: Option<Arc<SessionTally>>,
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
        (*self).counted(|m| m.commit())
    }

    fn content(&mut self) -> io::Result<Box<dyn Read + '_>> {
        self.inner.content()
    }

    fn commit_copies(self: Box<Self>, copies: Vec<Copy>) -> Result<(), StoreError> {
        (*self).counted(|m| m.commit_copies(copies))
    }
}

impl CountingMessage {
    fn counted(
        self,
        commit: impl FnOnce(Box<dyn MessageWriter>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let CountingMessage {
            inner,
            bytes,
            stats,
            tally,
        } = self;
        stats.queue_depth.fetch_add(1, Ordering::Relaxed);
        let began = Instant::now();
        let result = commit(inner);
        stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
        let took = began.elapsed();
        stats
            .commit_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.commit_seconds.observe(took.as_secs_f64());
        if result.is_ok() {
            stats.messages_accepted.fetch_add(1, Ordering::Relaxed);
            stats.bytes_accepted.fetch_add(bytes, Ordering::Relaxed);
            if let Some(t) = &tally {
                t.messages.fetch_add(1, Ordering::Relaxed);
                t.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
        }
        result
    }
}

/// The one place where the server's replies become bytes: each is counted by its code
/// (in `stats`, when the server keeps them) as it is queued in `out`. Sessions and the
/// pre-greeting refusals both write through here, so `mailer_replies_total` and the
/// `stats:` line count every reply once, on the typed [`Reply`] rather than by reading
/// the bytes back.
pub(crate) fn write_reply(stats: Option<&Stats>, reply: &Reply, out: &mut Vec<u8>) {
    if let Some(stats) = stats {
        stats.count_reply(reply.code);
    }
    reply.write_to(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::replies;

    #[test]
    fn a_reply_is_counted_once_by_its_code_as_it_is_written() {
        let stats = Stats::default();
        let mut out = Vec::new();
        // A multi-line reply is one reply.
        write_reply(Some(&stats), &replies::help("HELO"), &mut out);
        write_reply(Some(&stats), &replies::refused("mx.test", "busy"), &mut out);
        write_reply(None, &replies::OK.into(), &mut out);
        assert_eq!(
            out,
            b"214-2.0.0 Commands: HELO\r\n214 2.0.0 See RFC 5321 and RFC 3030\r\n\
              421 4.7.0 mx.test busy\r\n250 2.0.0 Ok\r\n"
        );
        let snap = stats.snapshot();
        assert_eq!(snap.replies, BTreeMap::from([(214, 1), (421, 1)]));
        assert_eq!(snap.refused, BTreeMap::from([(421, 1)]));
    }
}
