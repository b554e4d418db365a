//! Drives one [`Session`] over a blocking byte stream. I/O only: buffered reads with
//! deadlines, replies flushed before every blocking read (RFC 2920 pipelining), the
//! TLS handshake (RFC 3207), and the store (opening, writing, committing a message).
//! Every SMTP decision (which reply, when a message ends, what a storage error means,
//! when to close) is the session's: the driver carries out its [`Step`]s and reports
//! what the I/O did, as rustls' `complete_io` drives a connection through its public
//! calls alone.
//!
//! Generic over [`Transport`] so that tests can run whole sessions in memory.

use crate::delivery::{self, Mailbox, PlanInput, Router};
use crate::hooks::{Content, DataVerdict, TlsInfo};
use crate::protocol::address::Address;
use crate::protocol::reply::Reply;
use crate::session::{Body, CloseReason, CommitError, Session, Step};
use crate::spool::{MessageWriter, Store, StoreError};
use crate::stats::{self, SessionTally, Stats};
use std::io::{self, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// A byte stream the driver can put deadlines on and upgrade to TLS.
pub(crate) trait Transport: Read + Write {
    /// Bounds the next blocking read (`None`: no bound).
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Bounds the next blocking write. In-memory transports never block: the default
    /// does nothing.
    fn set_write_timeout(&mut self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    /// Runs the server side of a TLS handshake on this stream (RFC 3207).
    fn start_tls(&mut self) -> io::Result<TlsInfo> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TLS not available",
        ))
    }
}

/// How the server's lifecycle reaches a session (graceful stop, SPEC invariant 7).
pub(crate) trait Lifecycle {
    /// True once the server is stopping: the session answers 421 4.3.2 and closes.
    fn stopping(&self) -> bool;
    /// Called before a message transfer; `false` when stopping (then no transfer).
    /// While inside a message the server lets it finish.
    fn enter_message(&self) -> bool;
    /// The transfer that [`enter_message`](Self::enter_message) began is over.
    fn leave_message(&self);
    /// The deadline for the next command line: `normal`, or shorter while the server
    /// is short of workers (SPEC invariant 8).
    fn command_timeout(&self, normal: Duration) -> Duration {
        normal
    }
    /// The session is about to block waiting for a command (or its first one). The
    /// server may then give its worker to a new client: it shuts the socket's read side
    /// and [`got_command`](Self::got_command) returns false.
    fn at_prompt(&self) {}
    /// A command (or EOF, or a timeout) arrived. False when the session was chosen to
    /// make room for a new client meanwhile: it answers 421 4.4.2 and closes.
    fn got_command(&self) -> bool {
        true
    }
    /// The session is over; only its last replies are still to be written. The
    /// server counts the worker as free from here.
    fn closing(&self) {}
}

/// A lifecycle that never stops: the in-memory runner's (`testing`), its only user.
#[cfg_attr(not(feature = "testing"), allow(dead_code))]
pub(crate) struct Forever;

impl Lifecycle for Forever {
    fn stopping(&self) -> bool {
        false
    }
    fn enter_message(&self) -> bool {
        true
    }
    fn leave_message(&self) {}
}

/// The I/O limits the driver enforces on the wire: line length and deadlines. The
/// message limits (size, bare LF) are the session's, in its
/// [`Settings`](crate::session::Settings).
#[derive(Clone, Debug)]
pub(crate) struct WireLimits {
    /// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
    pub(crate) max_line_length: usize,
    /// The deadline for one command line (RFC 5321 §4.5.3.2).
    pub(crate) command_timeout: Duration,
    /// The longest silence inside DATA/BDAT content.
    pub(crate) data_timeout: Duration,
    /// Bytes per second inside DATA/BDAT once `data_timeout` has passed; 0 disables.
    pub(crate) min_data_rate: u64,
}

/// How a connection ended (for the log).
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum End {
    /// The client said QUIT.
    Quit,
    /// The client closed the connection.
    Eof,
    /// A deadline passed (421 4.4.2).
    Timeout,
    /// Closed after a refusal (too many errors, hook, injection).
    Closed,
    /// The server is stopping (421 4.3.2).
    ShuttingDown,
    /// Its worker was given to a new client while it waited for a command.
    Evicted,
    /// `session_timeout_secs` passed.
    Lifetime,
    /// The connection failed.
    Io(io::ErrorKind),
}

impl From<CloseReason> for End {
    fn from(why: CloseReason) -> End {
        match why {
            CloseReason::Quit => End::Quit,
            CloseReason::Refused => End::Closed,
            CloseReason::Timeout => End::Timeout,
            CloseReason::Lifetime => End::Lifetime,
            CloseReason::Evicted => End::Evicted,
            CloseReason::Shutdown => End::ShuttingDown,
        }
    }
}

enum Read1 {
    Line(usize, usize),
    TooLong,
    Eof,
    Timeout,
    /// The session lifetime ended while waiting.
    Lifetime,
}

const BUF: usize = 64 * 1024;
/// Replies that may wait unsent while commands are read. Past this, the replies are
/// written (bounded by the command deadline) before another command is read, so a
/// client that pipelines without reading cannot make the server buffer without bound
/// (SPEC invariant 8).
const OUT_HIGH: usize = 8 * 1024;
/// While waiting for a command, how often the deadline is looked at again: it
/// shortens when the server comes under stress.
const RECHECK: Duration = Duration::from_secs(1);

/// The driver for one connection.
pub(crate) struct Connection<'a, T: Transport> {
    io: T,
    session: Session,
    store: &'a dyn Store,
    life: &'a dyn Lifecycle,
    limits: WireLimits,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    out: Vec<u8>,
    /// The message file the session asked to open ([`Step::Open`]), until it says to
    /// commit or drop it: an I/O resource, as the socket is.
    msg: Option<Incoming>,
    router: Option<Arc<dyn Router>>,
    /// The write timeout last set on the transport (saves a syscall per reply).
    write_timeout: Option<Duration>,
    /// Where replies are counted, and the session's tally (its TLS version).
    stats: Option<(&'a Stats, Arc<SessionTally>)>,
}

/// An open message file and how it is laid out.
struct Incoming {
    writer: Box<dyn MessageWriter>,
    /// The file holds the content only; the copies are made at commit (data hooks, or
    /// several copies). Otherwise it holds the one copy's head, then the content.
    staged: bool,
    /// The recipients' routes, when looked up at the start.
    routes: Option<Vec<Option<Vec<Mailbox>>>>,
    /// The date of the `Received:` fields.
    now: SystemTime,
}

/// The stored content as the data hooks read it: from the spool file, from its start.
struct StoredContent<'a>(&'a mut dyn MessageWriter);

impl Content for StoredContent<'_> {
    fn reader(&mut self) -> io::Result<Box<dyn Read + '_>> {
        self.0.content()
    }
}

impl<'a, T: Transport> Connection<'a, T> {
    /// A driver for `session` over `io`.
    pub(crate) fn new(
        io: T,
        session: Session,
        store: &'a dyn Store,
        life: &'a dyn Lifecycle,
        limits: WireLimits,
    ) -> Self {
        let cap = BUF.max(limits.max_line_length + 2);
        Connection {
            io,
            session,
            store,
            life,
            limits,
            buf: vec![0; cap],
            start: 0,
            end: 0,
            out: Vec::with_capacity(4096),
            msg: None,
            router: None,
            write_timeout: None,
            stats: None,
        }
    }

    /// Routes recipients to mailboxes (SPEC 8); without one every message is one file
    /// in the spool.
    pub(crate) fn with_router(mut self, router: Option<Arc<dyn Router>>) -> Self {
        self.router = router;
        self
    }

    /// Counts every reply in `stats` and notes a STARTTLS upgrade in `tally`.
    pub(crate) fn with_stats(mut self, stats: &'a Stats, tally: Arc<SessionTally>) -> Self {
        self.stats = Some((stats, tally));
        self
    }

    /// The stream, to inspect what the server wrote (the in-memory runner only).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn into_transport(self) -> T {
        self.io
    }

    /// Runs the session to its end. Never panics on client input.
    pub(crate) fn run(&mut self) -> End {
        let end = self.run_inner();
        self.life.closing();
        let _ = self.flush();
        if let End::Io(kind) = &end {
            self.session.io_error(format!("connection error: {kind}"));
        }
        self.msg = None;
        self.session.closed();
        end
    }

    fn run_inner(&mut self) -> End {
        let step = self.session.greeting();
        if let Some(end) = self.perform(step) {
            return end;
        }
        loop {
            if self.life.stopping() {
                let step = self.session.shutting_down();
                return self.perform(step).unwrap_or(End::ShuttingDown);
            }
            let read = self.read_line();
            if !self.life.got_command() {
                // Whatever arrived is not run: the worker belongs to a new client now.
                let step = self.session.evicted();
                return self.perform(step).unwrap_or(End::Evicted);
            }
            let step = match read {
                // Disjoint fields: the line is borrowed from the buffer, not copied.
                Ok(Read1::Line(a, b)) => self.session.command(&self.buf[a..b]),
                Ok(Read1::TooLong) => self.session.line_too_long(),
                // The server shuts the read side of idle sessions when it stops.
                Ok(Read1::Eof) | Err(_) if self.life.stopping() => self.session.shutting_down(),
                Ok(Read1::Eof) => return End::Eof,
                Ok(Read1::Timeout) => self.session.timeout(),
                Ok(Read1::Lifetime) => self.session.lifetime_over(),
                Err(e) => return End::Io(e.kind()),
            };
            if let Some(end) = self.perform(step) {
                return end;
            }
            if self.out.len() >= OUT_HIGH {
                // Backpressure: the client must take its replies before more of its
                // pipelined commands are read.
                if let Err(e) = self.flush_bounded() {
                    return End::Io(e.kind());
                }
            }
        }
    }

    /// Carries out the session's steps until it waits for the next command (`None`)
    /// or the connection ends. A message transfer (DATA, one BDAT chunk) is bracketed
    /// by the lifecycle's `enter_message`/`leave_message`: the pool never takes the
    /// worker of a session in the middle of a message (SPEC invariant 8).
    fn perform(&mut self, first: Step) -> Option<End> {
        let mut step = first;
        let mut in_message = false;
        let end = loop {
            step = match step {
                Step::Reply(r) => {
                    self.reply(&r);
                    break None;
                }
                Step::Continue => break None,
                Step::Close(replies, why) => {
                    self.msg = None;
                    for r in &replies {
                        self.reply(r);
                    }
                    break Some(End::from(why));
                }
                Step::Abandon(r) => {
                    // Dropping the writer removes its file: nothing is stored.
                    self.msg = None;
                    self.reply(&r);
                    break None;
                }
                Step::StartTls(r) => {
                    self.msg = None;
                    self.reply(&r);
                    match self.start_tls() {
                        Ok(next) => next,
                        Err(end) => break Some(end),
                    }
                }
                Step::Open { hold } => {
                    if !self.life.enter_message() {
                        self.session.shutting_down()
                    } else {
                        in_message = true;
                        match self.open_message(hold) {
                            Ok(id) => self.session.opened(Ok(&id)),
                            Err(e) => self.session.opened(Err(e)),
                        }
                    }
                }
                Step::Resume => {
                    if !self.life.enter_message() {
                        self.session.shutting_down()
                    } else {
                        in_message = true;
                        Step::Body(None)
                    }
                }
                Step::Body(r) => {
                    if let Some(r) = r {
                        self.reply(&r);
                    }
                    match self.body() {
                        Ok(next) => next,
                        Err(end) => break Some(end),
                    }
                }
                Step::Check => match self.msg.as_mut() {
                    Some(m) => self
                        .session
                        .check_content(&mut StoredContent(m.writer.as_mut())),
                    None => self.session.committed(Err(closed_file())),
                },
                Step::Commit {
                    verdict,
                    header_len,
                } => {
                    let result = self.commit(&verdict, header_len);
                    self.session.committed(result)
                }
            };
        };
        if in_message {
            self.life.leave_message();
        }
        end
    }

    /// Moves body bytes from the input buffer to the session, and the content it gives
    /// back to the open message, until the body phase needs a step. Silence is bounded
    /// by `data_timeout`, the whole transfer by `min_data_rate` (SPEC invariant 4).
    fn body(&mut self) -> Result<Step, End> {
        let began = Instant::now();
        let mut got = 0u64;
        loop {
            // Disjoint fields: the session reads the buffer in place, and what it
            // hands back is written from there (or from its own buffers) unchanged.
            let (n, body) = self.session.body(&self.buf[self.start..self.end]);
            self.start += n;
            got += n as u64;
            let failed = match body {
                Body::Write(bytes) => match self.msg.as_mut() {
                    Some(m) => m.writer.write_all(bytes).err(),
                    None => None,
                },
                Body::Step(step) => return Ok(step),
                Body::More => {
                    match self.fill_data(began, got) {
                        Ok(0) => {
                            // EOF inside the content: the message is abandoned.
                            self.session.body_eof();
                            return Err(End::Eof);
                        }
                        Ok(_) => {}
                        Err(Some(e)) => return Err(End::Io(e.kind())),
                        Err(None) => return Ok(self.session.timeout()),
                    }
                    None
                }
            };
            if let Some(e) = failed {
                // Dropping the writer removes the file; the session refuses the message
                // at its end.
                self.msg = None;
                self.session
                    .write_failed(StoreError::from_io("message file", &e));
            }
        }
    }

    /// The one place a reply is written: counted by its code, then queued.
    fn reply(&mut self, r: &Reply) {
        stats::write_reply(self.stats.as_ref().map(|(s, _)| *s), r, &mut self.out);
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let res = self.io.write_all(&self.out).and_then(|_| self.io.flush());
            self.out.clear();
            res?;
        }
        Ok(())
    }

    /// Writes pending replies; a client that does not read gets the command deadline
    /// (shorter under stress) before the connection is given up.
    fn flush_bounded(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let t = Some(self.life.command_timeout(self.limits.command_timeout));
        if self.write_timeout != t {
            self.io.set_write_timeout(t)?;
            self.write_timeout = t;
        }
        self.flush()
    }

    /// Reads more bytes, flushing pending replies first. Returns 0 at EOF;
    /// `TimedOut` when `deadline` passes.
    fn fill(&mut self, deadline: Instant) -> io::Result<usize> {
        self.flush()?;
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(io::Error::other("input buffer full"));
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.io.set_read_timeout(Some(left))?;
            match self.io.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(io::ErrorKind::TimedOut.into())
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One command line within the command deadline (RFC 5321 §4.5.3.2: the whole
    /// line must arrive in time; partial bytes do not restart the clock). Its length
    /// counts the CRLF, as RFC 5321 §4.5.3.1.4 counts it for the 512-octet minimum.
    ///
    /// The deadline is taken again every [`RECHECK`]: it shortens when the server comes
    /// under stress (SPEC invariant 8), and it never passes the session lifetime.
    fn read_line(&mut self) -> io::Result<Read1> {
        let began = Instant::now();
        let max = self.limits.max_line_length;
        let mut discarding = false;
        let mut scanned = 0;
        loop {
            let avail = &self.buf[self.start + scanned..self.end];
            if let Some(i) = avail.iter().position(|&b| b == b'\n') {
                let lf = self.start + scanned + i;
                let a = self.start;
                self.start = lf + 1;
                if discarding || lf + 1 - a > max {
                    return Ok(Read1::TooLong);
                }
                let b = if lf > a && self.buf[lf - 1] == b'\r' {
                    lf - 1
                } else {
                    lf
                };
                return Ok(Read1::Line(a, b));
            }
            scanned = self.end - self.start;
            if scanned >= max {
                // Too long even if the LF came next: forget it and skip to the next LF.
                discarding = true;
                self.start = self.end;
                scanned = 0;
            }
            let now = Instant::now();
            let deadline = began + self.life.command_timeout(self.limits.command_timeout);
            if now >= deadline {
                return Ok(Read1::Timeout);
            }
            let life_left = self.session.lifetime_left();
            if life_left.is_zero() {
                return Ok(Read1::Lifetime);
            }
            // The session counts as waiting at a prompt before its replies go out: a
            // client that has read its reply must find this worker available to make
            // room for a new client (invariant 8), or a newcomer arriving right then
            // would be refused although this session is idle. Evicting it now only
            // shuts the read side; the replies still go out, then 421 4.4.2.
            // Between BDAT chunks a message is in transfer: that session never is.
            if !self.session.is_chunking() {
                self.life.at_prompt();
            }
            self.flush_bounded()?;
            let life_end = now.checked_add(life_left).unwrap_or(deadline);
            let wake = deadline.min(life_end).min(now + RECHECK);
            match self.fill(wake) {
                Ok(0) => return Ok(Read1::Eof),
                Ok(_) => {}
                // Look at the deadlines again.
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Data-phase read: silence bounded by `data_timeout`; after that long, the
    /// average rate must stay above `min_data_rate` (slowloris, invariant 4).
    /// `Err(None)` when either deadline is missed.
    fn fill_data(&mut self, began: Instant, got: u64) -> Result<usize, Option<io::Error>> {
        let deadline = Instant::now() + self.limits.data_timeout;
        match self.fill(deadline) {
            Ok(n) => {
                let elapsed = began.elapsed();
                if self.limits.min_data_rate > 0 && elapsed > self.limits.data_timeout {
                    let rate = (got + n as u64) as f64 / elapsed.as_secs_f64();
                    if rate < self.limits.min_data_rate as f64 {
                        return Err(None);
                    }
                }
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(None),
            Err(e) => Err(Some(e)),
        }
    }

    /// Opens a message. Unless the data hooks hold the content, the head of every
    /// copy is known now: a message with one copy (the usual case) is written directly
    /// where it belongs, head first, and committed as one file. Otherwise it is staged:
    /// the file holds the content only and the copies are made at commit.
    fn open_message(&mut self, hold: bool) -> Result<String, StoreError> {
        let mut routes = None;
        // Some(target): one copy, in the spool (None) or in that mailbox's Maildir.
        let mut direct: Option<Option<std::path::PathBuf>> = None;
        if !hold {
            match &self.router {
                None => direct = Some(None),
                Some(router) => {
                    if let Some(r) = self.routes(router) {
                        let no_trace = |_: &[Address]| Vec::new();
                        let copies = self.plan_copies(&r, &no_trace, &DataVerdict::default());
                        if let Ok([one]) = copies.as_deref() {
                            direct = Some(one.maildir.clone());
                        }
                        routes = Some(r);
                    }
                }
            }
        }
        let begun = match &direct {
            Some(None) => Some(self.store.begin()),
            Some(Some(dir)) => self.store.begin_in(dir),
            None => None,
        };
        let (begun, staged) = match begun {
            Some(b) => (b, false),
            None => (self.store.begin(), true),
        };
        let mut writer = begun?;
        let queue_id = writer.queue_id().to_string();
        let now = SystemTime::now();
        if !staged {
            let head = match &routes {
                None => Ok(self.session.trace_headers(&queue_id, now)),
                Some(routes) => {
                    let session = &self.session;
                    let trace = |r: &[Address]| session.trace_for(r, &queue_id, now);
                    self.plan_copies(routes, &trace, &DataVerdict::default())
                        .map(|mut c| c.pop().map(|c| c.head).unwrap_or_default())
                }
            };
            match head {
                Ok(h) => writer
                    .write_all(&h)
                    .map_err(|e| StoreError::from_io("message file", &e))?,
                Err(why) => return Err(StoreError::Io(why)),
            }
        }
        self.msg = Some(Incoming {
            writer,
            staged,
            routes,
            now,
        });
        Ok(queue_id)
    }

    /// Each recipient's route; `None` if the router panicked (then the message is
    /// staged and routed again at commit, where a panic refuses it).
    fn routes(&self, router: &Arc<dyn Router>) -> Option<Vec<Option<Vec<Mailbox>>>> {
        let rcpts = self
            .session
            .envelope()
            .map(|e| e.rcpts.as_slice())
            .unwrap_or(&[]);
        catch_unwind(AssertUnwindSafe(|| {
            rcpts.iter().map(|a| router.route(a)).collect::<Vec<_>>()
        }))
        .ok()
    }

    /// [`delivery::plan`] for the transaction in progress.
    fn plan_copies(
        &self,
        routes: &[Option<Vec<Mailbox>>],
        trace: &dyn Fn(&[Address]) -> Vec<u8>,
        verdict: &DataVerdict,
    ) -> Result<Vec<crate::spool::Copy>, String> {
        let rcpts = self
            .session
            .envelope()
            .map(|e| e.rcpts.as_slice())
            .unwrap_or(&[]);
        let input = PlanInput {
            rcpts,
            routes,
            trace,
            header_section: None,
        };
        delivery::plan(&input, verdict)
    }

    /// Commits the open message: on the fast path the one file as written; staged, the
    /// copies planned from `verdict` (SPEC 8, 9), reading the first `header_len`
    /// octets back only when the verdict edits the header section.
    fn commit(&mut self, verdict: &DataVerdict, header_len: u64) -> Result<(), CommitError> {
        let Some(mut inc) = self.msg.take() else {
            return Err(closed_file());
        };
        if !inc.staged {
            return inc.writer.commit().map_err(CommitError::Store);
        }
        let routes = match (inc.routes.take(), &self.router) {
            (Some(routes), _) => routes,
            (None, Some(router)) => match self.routes(router) {
                Some(r) => r,
                None => return Err(CommitError::Plan("router panicked".into())),
            },
            (None, None) => Vec::new(),
        };
        let section = if verdict.insert.is_empty() && verdict.change.is_empty() {
            None
        } else {
            // Bounded by the message size limit, and read only for header edits.
            let mut section = Vec::new();
            if let Err(e) = inc
                .writer
                .content()
                .and_then(|r| r.take(header_len).read_to_end(&mut section))
            {
                return Err(CommitError::Store(StoreError::from_io("message file", &e)));
            }
            Some(section)
        };
        let rcpts = self
            .session
            .envelope()
            .map(|e| e.rcpts.as_slice())
            .unwrap_or(&[]);
        let session = &self.session;
        let (id, now) = (inc.writer.queue_id(), inc.now);
        let trace = |r: &[Address]| session.trace_for(r, id, now);
        let input = PlanInput {
            rcpts,
            routes: &routes,
            trace: &trace,
            header_section: section.as_deref(),
        };
        let copies = delivery::plan(&input, verdict).map_err(CommitError::Plan)?;
        inc.writer.commit_copies(copies).map_err(CommitError::Store)
    }

    /// STARTTLS after its 220: bytes already pipelined behind the command are never
    /// run (CVE-2011-0411); otherwise the handshake, bounded like a command.
    fn start_tls(&mut self) -> Result<Step, End> {
        if self.start != self.end {
            // The replies so far (the 220 included) still go out, in order (RFC 2920);
            // nothing follows them: the pipelined bytes are dropped unread and the
            // connection closes instead of running the handshake.
            let step = self.session.tls_injection(self.end - self.start);
            let _ = self.flush();
            return Ok(step);
        }
        if let Err(e) = self.flush() {
            return Err(End::Io(e.kind()));
        }
        // The handshake is bounded like a command (shorter under stress).
        let timeout = self.life.command_timeout(self.limits.command_timeout);
        if let Err(e) = self.io.set_read_timeout(Some(timeout)) {
            return Err(End::Io(e.kind()));
        }
        match self.io.start_tls() {
            Ok(info) => {
                log::info!(
                    "session {}: TLS established, {} {}",
                    self.session.info().id,
                    info.version,
                    info.cipher
                );
                if let Some((_, tally)) = &self.stats {
                    tally.set_tls(&info.version);
                }
                Ok(self.session.tls_started(info))
            }
            Err(e) => {
                log::info!(
                    "session {}: client {}: TLS handshake failed: {e}",
                    self.session.info().id,
                    self.session.info().peer.ip()
                );
                Err(End::Io(e.kind()))
            }
        }
    }
}

/// The commit of a message whose file was already dropped after a write error.
fn closed_file() -> CommitError {
    CommitError::Store(StoreError::Io("message file closed".into()))
}

#[cfg(test)]
mod tests {
    //! The driver carries out the session's steps: a message it was told to drop is
    //! gone before the next one opens.
    use super::*;
    use crate::hooks::{NoHooks, SessionInfo};
    use crate::protocol::data::BareLf;
    use crate::session::Settings;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Counts the writers open at once; committed messages are their bytes.
    #[derive(Default)]
    struct Files {
        open: Arc<AtomicUsize>,
        most: AtomicUsize,
        stored: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    struct File(Vec<u8>, Arc<AtomicUsize>, Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for File {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Drop for File {
        fn drop(&mut self) {
            self.1.fetch_sub(1, Ordering::SeqCst);
        }
    }
    impl MessageWriter for File {
        fn queue_id(&self) -> &str {
            "Q"
        }
        fn commit(self: Box<Self>) -> Result<(), StoreError> {
            let stored = &mut *self.2.lock().unwrap_or_else(|p| p.into_inner());
            stored.push(self.0.clone());
            Ok(())
        }
    }
    impl Store for Files {
        fn begin(&self) -> Result<Box<dyn MessageWriter>, StoreError> {
            let open = self.open.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(open, Ordering::SeqCst);
            Ok(Box::new(File(
                Vec::new(),
                Arc::clone(&self.open),
                Arc::clone(&self.stored),
            )))
        }
    }

    fn run(input: &[u8]) -> (String, Files) {
        let settings = Arc::new(Settings {
            hostname: "mx.test".into(),
            max_message_size: 10,
            bare_lf: BareLf::Normalize,
            max_recipients: 10,
            max_errors: 10,
            tls_available: false,
            require_tls: false,
            auth: None,
        });
        let info = SessionInfo::new(
            1,
            "192.0.2.7:4000".parse().expect("a literal address"),
            "192.0.2.1:25".parse().expect("a literal address"),
        );
        let session = Session::new(settings, Arc::new(NoHooks), info);
        let limits = WireLimits {
            max_line_length: 512,
            command_timeout: Duration::from_secs(5),
            data_timeout: Duration::from_secs(5),
            min_data_rate: 0,
        };
        let files = Files::default();
        let wire = crate::testing::MemoryTransport::new(input, &[]);
        let mut conn = Connection::new(wire, session, &files, &Forever, limits);
        assert_eq!(conn.run(), End::Quit);
        let out = String::from_utf8_lossy(&conn.into_transport().output).into_owned();
        (out, files)
    }

    /// The reply codes in `out`, one per reply, read with the client's parser.
    fn codes(out: &str) -> Vec<String> {
        let mut rest = out.as_bytes();
        let mut codes = Vec::new();
        while let Ok(Some((r, n))) = crate::client::parse_reply(rest) {
            codes.push(r.code.to_string());
            rest = &rest[n..];
        }
        assert!(rest.is_empty(), "malformed server output: {out:?}");
        codes
    }

    #[test]
    fn a_bdat_message_ended_by_rset_ehlo_or_a_refused_chunk_is_dropped_at_once() {
        let env = "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n";
        let input = format!(
            "EHLO c\r\n{env}BDAT 3\r\nabcRSET\r\n\
             {env}BDAT 3\r\nabcEHLO c\r\n\
             {env}BDAT 8\r\n12345678BDAT 8\r\n12345678\
             {env}BDAT 2 LAST\r\nokQUIT\r\n"
        );
        let (out, files) = run(input.as_bytes());
        assert_eq!(
            codes(&out),
            [
                "220", "250", "250", "250", "250", "250", // RSET
                "250", "250", "250", "250", // EHLO
                "250", "250", "250", "552", // over the size in total
                "250", "250", "250", "221"
            ],
            "{out}"
        );
        assert_eq!(
            files.most.load(Ordering::SeqCst),
            1,
            "never two messages open at once"
        );
        assert_eq!(files.open.load(Ordering::SeqCst), 0);
        let stored = files.stored.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(stored.len(), 1);
        assert!(stored[0].ends_with(b"ok"), "{:?}", stored[0]);
    }
}
