//! Drives one [`Session`] over a blocking byte stream: buffered reads with deadlines,
//! replies flushed before every blocking read (RFC 2920 pipelining), DATA and BDAT
//! streamed into the store, STARTTLS with injection detection (SPEC invariant 3).
//!
//! Generic over [`Transport`] so that tests can run whole sessions in memory.

use crate::delivery::{self, ContentFilter, Mailbox, PlanInput, Router};
use crate::hooks::{Content, DataVerdict, TlsInfo};
use crate::protocol::address::Address;
use crate::protocol::data::{BareLf, DataReader, Verdict};
use crate::protocol::reply::Reply;
use crate::session::{MessageOutcome, Session, Step};
use crate::spool::{MessageWriter, Store, StoreError};
use std::io::{self, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// A byte stream the driver can put deadlines on and upgrade to TLS.
pub trait Transport: Read + Write {
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
pub trait Lifecycle {
    /// True once the server is stopping: the session answers 421 4.3.2 and closes.
    fn stopping(&self) -> bool;
    /// Called before a message transfer; `false` when stopping (then no transfer).
    /// While inside a message the server lets it finish.
    fn enter_message(&self) -> bool;
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

/// A lifecycle that never stops (tests, embedders that drive sessions themselves).
pub struct Forever;

impl Lifecycle for Forever {
    fn stopping(&self) -> bool {
        false
    }
    fn enter_message(&self) -> bool {
        true
    }
    fn leave_message(&self) {}
}

/// The limits the driver enforces on the wire (the rest are the session's).
#[derive(Clone, Debug)]
pub struct WireLimits {
    pub max_line_length: usize,
    pub max_message_size: u64,
    pub bare_lf: BareLf,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// Bytes per second inside DATA/BDAT once `data_timeout` has passed; 0 disables.
    pub min_data_rate: u64,
}

/// How a connection ended (for the log).
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Quit,
    /// The client closed the connection.
    Eof,
    Timeout,
    /// Closed after a refusal (too many errors, hook, injection).
    Closed,
    ShuttingDown,
    /// Its worker was given to a new client while it waited for a command.
    Evicted,
    /// `session_timeout_secs` passed.
    Lifetime,
    Io(io::ErrorKind),
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
/// How much message content is gathered before a write to the store.
const FLUSH_AT: usize = 32 * 1024;

/// The driver for one connection.
pub struct Connection<'a, T: Transport> {
    io: T,
    session: Session,
    store: &'a dyn Store,
    life: &'a dyn Lifecycle,
    limits: WireLimits,
    wants_data: bool,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    out: Vec<u8>,
    /// The message of a BDAT transaction in progress.
    chunked: Option<Incoming>,
    router: Option<Arc<dyn Router>>,
    /// The write timeout last set on the transport (saves a syscall per reply).
    write_timeout: Option<Duration>,
}

/// A message being received: its spool file, the content guard, the first error.
struct Incoming {
    /// `None` after a write error (then `error` says why).
    msg: Option<Box<dyn MessageWriter>>,
    /// The file holds the content only; the copies are made at the end (data hooks or
    /// several copies). Otherwise it holds the copy's head, then the content.
    staged: bool,
    /// The recipients' routes, when looked up at the start.
    routes: Option<Vec<Option<Vec<Mailbox>>>>,
    filter: ContentFilter,
    error: Option<StoreError>,
    scratch: Vec<u8>,
    queue_id: String,
    /// The date of the `Received:` fields.
    now: SystemTime,
}

impl Incoming {
    /// Content bytes (dot-unstuffed) into the guard, then to the hooks and the file.
    fn feed(&mut self, session: &mut Session, bytes: &[u8], wants_data: bool) {
        if self.msg.is_none() || bytes.is_empty() {
            return;
        }
        if self.filter.is_body() {
            // The common case, past the header section: no copy.
            self.filter.pass(bytes.len());
            self.write(session, bytes, wants_data);
        } else {
            let mut scratch = std::mem::take(&mut self.scratch);
            scratch.clear();
            self.filter.push(bytes, &mut scratch);
            self.write(session, &scratch, wants_data);
            self.scratch = scratch;
        }
    }

    /// The end of the content: anything the guard held back.
    fn end(&mut self, session: &mut Session, wants_data: bool) {
        let mut tail = Vec::new();
        self.filter.finish(&mut tail);
        self.write(session, &tail, wants_data);
    }

    fn write(&mut self, session: &mut Session, bytes: &[u8], wants_data: bool) {
        if bytes.is_empty() {
            return;
        }
        if wants_data && self.staged {
            session.data_chunk(bytes);
        }
        if let Some(m) = self.msg.as_mut() {
            if let Err(e) = m.write_all(bytes) {
                self.error = Some(StoreError::from_io("message file", &e));
                self.msg = None;
            }
        }
    }
}

/// The stored content as the data hooks read it: from the spool file, from its start.
struct StoredContent<'a>(&'a mut dyn MessageWriter);

impl Content for StoredContent<'_> {
    fn reader(&mut self) -> io::Result<Box<dyn Read + '_>> {
        self.0.content()
    }
}

impl<'a, T: Transport> Connection<'a, T> {
    pub fn new(
        io: T,
        session: Session,
        store: &'a dyn Store,
        life: &'a dyn Lifecycle,
        limits: WireLimits,
        wants_data: bool,
    ) -> Self {
        let cap = BUF.max(limits.max_line_length + 2);
        Connection {
            io,
            session,
            store,
            life,
            limits,
            wants_data,
            buf: vec![0; cap],
            start: 0,
            end: 0,
            out: Vec::with_capacity(4096),
            chunked: None,
            router: None,
            write_timeout: None,
        }
    }

    /// Routes recipients to mailboxes (SPEC 8); without one every message is one file
    /// in the spool.
    pub fn with_router(mut self, router: Option<Arc<dyn Router>>) -> Self {
        self.router = router;
        self
    }

    /// The stream, e.g. to inspect what the server wrote in tests.
    pub fn into_transport(self) -> T {
        self.io
    }

    /// Runs the session to its end. Never panics on client input.
    pub fn run(&mut self) -> End {
        let end = self.run_inner();
        self.life.closing();
        let _ = self.flush();
        if let End::Io(kind) = &end {
            self.session.io_error(format!("connection error: {kind}"));
        }
        self.chunked = None;
        self.session.closed();
        end
    }

    fn run_inner(&mut self) -> End {
        let step = self.session.greeting();
        if let Some(end) = self.simple(step) {
            return end;
        }
        loop {
            if self.life.stopping() {
                return self.shutdown_now();
            }
            let read = self.read_line();
            if !self.life.got_command() {
                // Whatever arrived is not run: the worker belongs to a new client now.
                let r = self.session.evicted();
                self.reply(&r);
                return End::Evicted;
            }
            let step = match read {
                // Disjoint fields: the line is borrowed from the buffer, not copied.
                Ok(Read1::Line(a, b)) => self.session.command(&self.buf[a..b]),
                Ok(Read1::TooLong) => self.session.line_too_long(),
                // The server shuts the read side of idle sessions when it stops.
                Ok(Read1::Eof) | Err(_) if self.life.stopping() => return self.shutdown_now(),
                Ok(Read1::Eof) => return End::Eof,
                Ok(Read1::Timeout) => return self.timed_out(),
                Ok(Read1::Lifetime) => {
                    let r = self.session.lifetime_over();
                    self.reply(&r);
                    return End::Lifetime;
                }
                Err(e) => return End::Io(e.kind()),
            };
            let outcome = match step {
                Step::Data => self.data(),
                Step::Chunk { size, last } => self.chunk(size, last),
                Step::Discard { size, reply, close } => self.discard(size, reply, close),
                Step::StartTls(reply) => self.start_tls(&reply),
                other => match self.simple(other) {
                    Some(end) => Err(end),
                    None => Ok(()),
                },
            };
            if let Err(end) = outcome {
                return end;
            }
            if let Some(replies) = self.session.take_close() {
                // A hook panicked (or refused with 421): its session ends here.
                for r in &replies {
                    self.reply(r);
                }
                return End::Closed;
            }
            if self.chunked.is_some() && !self.session.is_chunking() {
                // RSET, EHLO or a failed chunk ended the BDAT transaction.
                self.chunked = None;
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

    /// Reply / Close steps. `Some` when the connection ends.
    fn simple(&mut self, step: Step) -> Option<End> {
        match step {
            Step::Reply(r) => {
                self.reply(&r);
                None
            }
            Step::Close(rs) => {
                let quit = rs.first().is_some_and(|r| r.code == 221);
                for r in &rs {
                    self.reply(r);
                }
                Some(if quit { End::Quit } else { End::Closed })
            }
            // Only the main loop produces the other steps.
            _ => Some(End::Closed),
        }
    }

    fn reply(&mut self, r: &Reply) {
        r.write_to(&mut self.out);
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

    fn timed_out(&mut self) -> End {
        let r = self.session.timeout();
        self.reply(&r);
        End::Timeout
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
    fn fill_data(&mut self, began: Instant, got: u64) -> Result<usize, End> {
        let deadline = Instant::now() + self.limits.data_timeout;
        match self.fill(deadline) {
            Ok(n) => {
                let elapsed = began.elapsed();
                if self.limits.min_data_rate > 0 && elapsed > self.limits.data_timeout {
                    let rate = (got + n as u64) as f64 / elapsed.as_secs_f64();
                    if rate < self.limits.min_data_rate as f64 {
                        return Err(self.timed_out());
                    }
                }
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(self.timed_out()),
            Err(e) => Err(End::Io(e.kind())),
        }
    }

    /// Opens a message. Without data hooks the head of every copy is known now: a
    /// message with one copy (the usual case) is written directly where it belongs,
    /// head first, and committed as one file. Otherwise it is staged: the file holds
    /// the content only and the copies are made at the end.
    fn open_message(&mut self) -> Incoming {
        let mut inc = Incoming {
            msg: None,
            staged: true,
            routes: None,
            filter: ContentFilter::new(),
            error: None,
            scratch: Vec::new(),
            queue_id: String::new(),
            now: SystemTime::now(),
        };
        // Some(target): one copy, in the spool (None) or in that mailbox's Maildir.
        let mut direct: Option<Option<std::path::PathBuf>> = None;
        if !self.wants_data {
            match &self.router {
                None => direct = Some(None),
                Some(router) => {
                    if let Some(routes) = self.routes(router) {
                        let no_trace = |_: &[Address]| Vec::new();
                        let copies = self.plan_copies(&routes, &no_trace, &DataVerdict::default());
                        if let Ok([one]) = copies.as_deref() {
                            direct = Some(one.maildir.clone());
                        }
                        inc.routes = Some(routes);
                    }
                }
            }
        }
        let begun = match &direct {
            Some(None) => Some(self.store.begin()),
            Some(Some(dir)) => self.store.begin_in(dir),
            None => None,
        };
        let begun = match begun {
            Some(b) => {
                inc.staged = false;
                b
            }
            None => self.store.begin(),
        };
        let mut msg = match begun {
            Ok(m) => m,
            Err(e) => {
                inc.error = Some(e);
                return inc;
            }
        };
        inc.queue_id = msg.queue_id().to_string();
        if !inc.staged {
            let head = match &inc.routes {
                None => Ok(self.session.trace_headers(&inc.queue_id, inc.now)),
                Some(routes) => {
                    let session = &self.session;
                    let (id, now) = (&inc.queue_id, inc.now);
                    let trace = |r: &[Address]| session.trace_for(r, id, now);
                    self.plan_copies(routes, &trace, &DataVerdict::default())
                        .map(|mut c| c.pop().map(|c| c.head).unwrap_or_default())
                }
            };
            let written = match head {
                Ok(h) => msg
                    .write_all(&h)
                    .map_err(|e| StoreError::from_io("message file", &e)),
                Err(why) => Err(StoreError::Io(why)),
            };
            if let Err(e) = written {
                inc.error = Some(e);
                return inc;
            }
        }
        inc.msg = Some(msg);
        inc
    }

    /// Each recipient's route; `None` if the router panicked (then the message is
    /// staged and routed again at its end, where a panic refuses it).
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

    /// DATA: 354, stream until `<CRLF>.<CRLF>`, store, answer.
    fn data(&mut self) -> Result<(), End> {
        if !self.life.enter_message() {
            return Err(self.shutdown_now());
        }
        let result = self.data_inner();
        self.life.leave_message();
        result
    }

    fn shutdown_now(&mut self) -> End {
        let r = self.session.shutting_down();
        self.reply(&r);
        End::ShuttingDown
    }

    fn data_inner(&mut self) -> Result<(), End> {
        let mut inc = self.open_message();
        if let Some(e) = inc.error.take() {
            let r = self.session.message_end(storage(e), 0);
            self.reply(&r);
            return Ok(());
        }
        self.reply(&Session::data_prompt());
        self.session.data_start(&inc.queue_id);
        let wants = self.wants_data;
        let mut reader = DataReader::new(self.limits.max_message_size, self.limits.bare_lf);
        let mut pending = Vec::with_capacity(FLUSH_AT * 2);
        let began = Instant::now();
        loop {
            let n = reader.feed(&self.buf[self.start..self.end], &mut pending);
            self.start += n;
            if pending.len() >= FLUSH_AT || reader.is_done() {
                if reader.is_keeping() {
                    inc.feed(&mut self.session, &pending, wants);
                }
                pending.clear();
            }
            if reader.is_done() {
                break;
            }
            self.fill_data(began, reader.size())?;
            if self.end == self.start {
                // EOF inside DATA: the message is abandoned (dropped = removed).
                self.session
                    .io_error("connection closed during DATA".into());
                return Err(End::Eof);
            }
        }
        let outcome = match reader.verdict() {
            Verdict::TooBig => MessageOutcome::TooBig,
            Verdict::BareLf => MessageOutcome::BareLf,
            Verdict::Ok => self.finish(inc),
        };
        let r = self.session.message_end(outcome, reader.size());
        self.reply(&r);
        Ok(())
    }

    /// The end of the content: on the fast path, commit the one file; staged, run the
    /// data hooks on the stored content, plan the copies (SPEC 8, 9) and commit them.
    fn finish(&mut self, mut inc: Incoming) -> MessageOutcome {
        inc.end(&mut self.session, self.wants_data);
        if let Some(e) = inc.error.take() {
            return storage(e);
        }
        let Some(mut msg) = inc.msg.take() else {
            return MessageOutcome::StorageError("message file closed".into());
        };
        let id = inc.queue_id.clone();
        if !inc.staged {
            return match msg.commit() {
                Ok(()) => MessageOutcome::Stored(id),
                Err(e) => storage(e),
            };
        }
        let verdict = if self.wants_data {
            match self.session.check_content(&mut StoredContent(msg.as_mut())) {
                Ok(v) => v,
                Err(reply) => return MessageOutcome::Refused(reply),
            }
        } else {
            DataVerdict::default()
        };
        if verdict.discard {
            // Dropping the writer removes the staged file.
            return MessageOutcome::Discarded(id);
        }
        let rcpts = self
            .session
            .envelope()
            .map(|e| e.rcpts.clone())
            .unwrap_or_default();
        let routes = match (inc.routes.take(), &self.router) {
            (Some(routes), _) => routes,
            (None, Some(router)) => match self.routes(router) {
                Some(r) => r,
                None => {
                    return MessageOutcome::Refused(self.session.hook_failed("router panicked"))
                }
            },
            (None, None) => Vec::new(),
        };
        let section = if verdict.insert.is_empty() && verdict.change.is_empty() {
            None
        } else {
            // Bounded by the message size limit, and read only for header edits.
            let mut section = Vec::new();
            let len = inc.filter.header_len();
            if let Err(e) = msg
                .content()
                .and_then(|r| r.take(len).read_to_end(&mut section))
            {
                return storage(StoreError::from_io("message file", &e));
            }
            Some(section)
        };
        let session = &self.session;
        let trace = |r: &[Address]| session.trace_for(r, &id, inc.now);
        let input = PlanInput {
            rcpts: &rcpts,
            routes: &routes,
            trace: &trace,
            header_section: section.as_deref(),
        };
        let copies = match delivery::plan(&input, &verdict) {
            Ok(c) => c,
            Err(why) => return MessageOutcome::Refused(self.session.hook_failed(&why)),
        };
        match msg.commit_copies(copies) {
            Ok(()) => MessageOutcome::Stored(id),
            Err(e) => storage(e),
        }
    }

    /// BDAT: append exactly `size` bytes; answer per chunk, LAST only once stored.
    fn chunk(&mut self, size: u64, last: bool) -> Result<(), End> {
        if !self.life.enter_message() {
            return Err(self.shutdown_now());
        }
        let result = self.chunk_inner(size, last);
        self.life.leave_message();
        result
    }

    fn chunk_inner(&mut self, size: u64, last: bool) -> Result<(), End> {
        let mut inc = match self.chunked.take() {
            Some(inc) => inc,
            None => {
                let inc = self.open_message();
                if inc.error.is_none() {
                    self.session.data_start(&inc.queue_id);
                }
                inc
            }
        };
        let wants = self.wants_data;
        self.transfer(size, &mut |session, bytes| inc.feed(session, bytes, wants))?;
        let reply = match (inc.error.take(), last) {
            // The transaction failed; later chunks are drained and refused 503.
            (Some(e), _) => self.session.chunk_end(size, Err(storage(e))),
            (None, false) => {
                self.chunked = Some(inc);
                self.session.chunk_end(size, Ok(()))
            }
            (None, true) => {
                let outcome = self.finish(inc);
                self.session.message_end(outcome, size)
            }
        };
        self.reply(&reply);
        Ok(())
    }

    /// A refused BDAT: its bytes are consumed, never executed as commands.
    fn discard(&mut self, size: u64, reply: Reply, close: Option<Reply>) -> Result<(), End> {
        self.transfer(size, &mut |_, _| {})?;
        self.chunked = None;
        self.reply(&reply);
        if let Some(bye) = close {
            self.reply(&bye);
            return Err(End::Closed);
        }
        Ok(())
    }

    /// Moves exactly `size` bytes from the stream to `sink`.
    fn transfer(
        &mut self,
        size: u64,
        sink: &mut dyn FnMut(&mut Session, &[u8]),
    ) -> Result<(), End> {
        let began = Instant::now();
        let mut left = size;
        loop {
            let take = (left.min((self.end - self.start) as u64)) as usize;
            sink(&mut self.session, &self.buf[self.start..self.start + take]);
            self.start += take;
            left -= take as u64;
            if left == 0 {
                return Ok(());
            }
            if self.fill_data(began, size - left)? == 0 {
                self.session
                    .io_error("connection closed during BDAT".into());
                return Err(End::Eof);
            }
        }
    }

    /// STARTTLS: reply, refuse pipelined bytes (CVE-2011-0411), handshake, reset.
    fn start_tls(&mut self, reply: &Reply) -> Result<(), End> {
        self.reply(reply);
        if self.start != self.end {
            log::warn!(
                "session {}: client {}: refused {} byte(s) pipelined after STARTTLS (command injection attempt); closing",
                self.session.info().id,
                self.session.info().peer.ip(),
                self.end - self.start
            );
            // The replies so far (the 220 included) still go out, in order (RFC 2920);
            // nothing follows them: the pipelined bytes are dropped unread and the
            // connection closes instead of running the handshake.
            let _ = self.flush();
            return Err(End::Closed);
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
                self.session.tls_started(info);
                self.chunked = None;
                Ok(())
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

fn storage(e: StoreError) -> MessageOutcome {
    match e {
        StoreError::Full(m) => MessageOutcome::StorageFull(m),
        StoreError::Io(m) => MessageOutcome::StorageError(m),
    }
}
