//! The body phase of a transaction: DATA content (RFC 5321 §4.1.1.4) and BDAT chunks
//! (RFC 3030 §2), from the moment the message is opened to its final reply.
//!
//! The session owns all of it, as states of its transaction; the driver only moves
//! bytes. It calls [`Session::body`] with whatever input it holds and does what comes
//! back: write content bytes to the open message ([`Body::Write`]), read more
//! ([`Body::More`]), or carry out the next [`Step`] (commit, abandon, reply). What the
//! store did is reported back with [`Session::opened`], [`Session::write_failed`] and
//! [`Session::committed`], so every reply is chosen here. The shape follows ureq-proto's
//! server `RecvBody` (the machine owns the body state, the driver moves buffers) and
//! rustls' `complete_io` (the driver uses only the machine's public calls).

use super::{CloseReason, MessageOutcome, Session, Step, Txn, LOG_TARGET};
use crate::delivery::ContentFilter;
use crate::hooks::{Content, DataVerdict, Envelope, Hooks, SessionInfo};
use crate::protocol::data::{DataReader, Verdict};
use crate::protocol::replies;
use crate::protocol::reply::Reply;
use crate::spool::StoreError;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// How much DATA content is gathered before it is handed out for one write: fewer,
/// larger writes to the store.
const FLUSH_AT: usize = 32 * 1024;

/// What [`Session::body`] asks of the driver.
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum Body<'a> {
    /// Append these content bytes to the open message (report a failure with
    /// [`Session::write_failed`]), then call [`Session::body`] again. They are the
    /// input itself wherever the content guard lets them through unchanged, so body
    /// bytes are not copied on their way to the file.
    Write(&'a [u8]),
    /// Every byte given was consumed: read more (bounded by the data deadline), then
    /// call [`Session::body`] again. At end of input call [`Session::body_eof`].
    More,
    /// The body phase is over or needs the store: carry out this step.
    Step(Step),
}

/// Why the driver could not commit a message, for [`Session::committed`].
#[derive(Debug)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum CommitError {
    /// The store failed (452 4.3.1 when full, else 451 4.3.0).
    Store(StoreError),
    /// The copies could not be planned (a router panic, a header edit that does not
    /// fit): 451 4.3.0.
    Plan(String),
}

/// The message of a transaction in its body phase.
#[derive(Debug)]
pub(super) struct Message {
    pub(super) env: Envelope,
    /// The store's id, once the driver has opened the message.
    pub(super) queue_id: String,
    /// The content guard (trace headers cannot be continued, no client Return-Path).
    guard: ContentFilter,
    /// The first storage failure: later content is dropped and the message refused at
    /// its end (the rest is still read, so it never runs as commands).
    failed: Option<StoreError>,
    /// Content octets so far (DATA: as read; BDAT: the chunk sizes).
    pub(super) size: u64,
}

impl Message {
    pub(super) fn new(env: Envelope, size: u64) -> Message {
        Message {
            env,
            queue_id: String::new(),
            guard: ContentFilter::new(),
            failed: None,
            size,
        }
    }
}

/// A BDAT chunk in transfer (RFC 3030 §2: exactly `size` octets follow the command).
#[derive(Clone, Copy, Debug)]
pub(super) struct Chunk {
    pub(super) left: u64,
    pub(super) size: u64,
    pub(super) last: bool,
}

/// A refused BDAT chunk: its octets are read and thrown away, never run as commands,
/// then the refusal is sent.
#[derive(Debug)]
pub(super) struct Drain {
    pub(super) left: u64,
    pub(super) reply: Reply,
    /// `421` when the refusal reached `max_errors`.
    pub(super) close: Option<Reply>,
    /// The transaction to go back to (a BDAT before RCPT keeps its MAIL).
    pub(super) env: Option<Envelope>,
    /// The chunk ended a transaction whose message was open: the driver drops it.
    pub(super) abandon: bool,
}

/// Where the bytes of a [`Body::Write`] are.
enum Out {
    Input(Range<usize>),
    Pending,
    Scratch,
}

/// One round of the body phase, before its bytes are borrowed.
enum Next {
    Write(Out),
    More,
    Step(Step),
}

impl Session {
    /// The driver opened the message asked for by [`Step::Open`] (`Ok` with its queue
    /// id) or could not (the error). DATA then gets its 354 (RFC 5321 §4.1.1.4); a
    /// BDAT chunk is read either way, and refused at its end if nothing could be
    /// stored.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn opened(&mut self, result: Result<&str, StoreError>) -> Step {
        let Txn::Opening(mut msg, chunk) = std::mem::replace(&mut self.txn, Txn::Idle) else {
            return self.finish(Step::Continue);
        };
        match result {
            Ok(id) => {
                msg.queue_id = id.to_string();
                self.content_open = true;
                self.chunk_panicked = false;
                let hooks = Arc::clone(&self.hooks);
                let (env, id) = (&msg.env, msg.queue_id.as_str());
                self.notify(|s| hooks.data_start(s, env, id));
            }
            Err(e) => msg.failed = Some(e),
        }
        let step = match (chunk, msg.failed.take()) {
            (Some(chunk), failed) => {
                msg.failed = failed;
                self.txn = Txn::Chunk(msg, chunk);
                Step::Body(None)
            }
            (None, Some(e)) => {
                let reply = self.message_end(Some(msg.env), 0, storage(e));
                Step::Reply(reply)
            }
            (None, None) => {
                let reader = DataReader::new(self.settings.max_message_size, self.settings.bare_lf);
                self.txn = Txn::Data(msg, reader);
                self.emitted = false;
                self.pending.clear();
                // Once per session: the buffer is reused from message to message.
                self.pending.reserve(FLUSH_AT * 2);
                Step::Body(Some(replies::data_prompt()))
            }
        };
        self.finish(step)
    }

    /// The driver could not append content to the message: it is dropped at its end
    /// and refused (452 4.3.1 or 451 4.3.0); the rest of its content is still read.
    pub(crate) fn write_failed(&mut self, e: StoreError) {
        if let Some(msg) = self.message_mut() {
            msg.failed.get_or_insert(e);
        }
    }

    /// The body phase: takes bytes from `input` (returns how many) and says what to do
    /// next. Bytes after the end of the content (pipelined commands) are left alone:
    /// `<CRLF>.<CRLF>` ends DATA and nothing else does (SPEC invariant 2); a BDAT chunk
    /// is exactly its declared size, refused or not.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn body<'a>(&'a mut self, input: &'a [u8]) -> (usize, Body<'a>) {
        self.scratch.clear();
        if std::mem::take(&mut self.emitted) {
            self.pending.clear();
        }
        let (n, next) = self.advance(input);
        let body = match next {
            Next::Write(Out::Input(r)) => Body::Write(&input[r]),
            Next::Write(Out::Pending) => Body::Write(&self.pending),
            Next::Write(Out::Scratch) => Body::Write(&self.scratch),
            Next::More => Body::More,
            Next::Step(step) => Body::Step(self.finish(step)),
        };
        (n, body)
    }

    /// The client closed the connection inside the body phase: the message is
    /// abandoned (the driver drops it unstored).
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn body_eof(&mut self) {
        let what = match self.txn {
            Txn::Data(..) => "connection closed during DATA",
            _ => "connection closed during BDAT",
        };
        self.io_error(what.into());
    }

    /// The open message, in every state that has one.
    pub(super) fn message(&self) -> Option<&Message> {
        match &self.txn {
            Txn::Opening(m, _)
            | Txn::Data(m, _)
            | Txn::Chunk(m, _)
            | Txn::Chunked(m)
            | Txn::Sealed(m)
            | Txn::Checking(m)
            | Txn::Committing(m) => Some(m),
            Txn::Idle | Txn::Mail(_) | Txn::Drain(_) => None,
        }
    }

    fn message_mut(&mut self) -> Option<&mut Message> {
        match &mut self.txn {
            Txn::Opening(m, _)
            | Txn::Data(m, _)
            | Txn::Chunk(m, _)
            | Txn::Chunked(m)
            | Txn::Sealed(m)
            | Txn::Checking(m)
            | Txn::Committing(m) => Some(m),
            Txn::Idle | Txn::Mail(_) | Txn::Drain(_) => None,
        }
    }

    fn advance(&mut self, input: &[u8]) -> (usize, Next) {
        let Session {
            txn,
            pending,
            scratch,
            hooks,
            info,
            chunk_panicked,
            hold,
            emitted,
            ..
        } = self;
        match txn {
            Txn::Data(msg, reader) => {
                let n = reader.feed(input, pending);
                let done = reader.is_done();
                if pending.len() >= FLUSH_AT || (done && !pending.is_empty()) {
                    *emitted = true;
                    if reader.is_keeping() && msg.failed.is_none() {
                        let sink = Sink {
                            hooks,
                            info,
                            hold: *hold,
                            panicked: chunk_panicked,
                            scratch,
                        };
                        match emit(msg, pending, sink) {
                            Some(Emitted::Whole) => return (n, Next::Write(Out::Pending)),
                            Some(Emitted::Scratch) => return (n, Next::Write(Out::Scratch)),
                            None => {}
                        }
                    }
                }
                if !done {
                    return (n, Next::More);
                }
                let verdict = reader.verdict();
                let size = reader.size();
                // The state was matched just above: the `else` cannot run.
                let Txn::Data(mut msg, _) = std::mem::replace(&mut self.txn, Txn::Idle) else {
                    return (n, Next::More);
                };
                msg.size = size;
                let step = match verdict {
                    Verdict::Ok => return (n, self.seal(msg)),
                    Verdict::TooBig => self.abandon(msg, MessageOutcome::TooBig),
                    Verdict::BareLf => self.abandon(msg, MessageOutcome::BareLf),
                };
                (n, Next::Step(step))
            }
            Txn::Chunk(msg, chunk) => {
                let take = (chunk.left.min(input.len() as u64)) as usize;
                chunk.left -= take as u64;
                if take > 0 && msg.failed.is_none() {
                    let sink = Sink {
                        hooks,
                        info,
                        hold: *hold,
                        panicked: chunk_panicked,
                        scratch,
                    };
                    match emit(msg, &input[..take], sink) {
                        Some(Emitted::Whole) => return (take, Next::Write(Out::Input(0..take))),
                        Some(Emitted::Scratch) => return (take, Next::Write(Out::Scratch)),
                        None => {}
                    }
                }
                if chunk.left > 0 {
                    return (take, Next::More);
                }
                // The state was matched just above: the `else` cannot run.
                let Txn::Chunk(msg, chunk) = std::mem::replace(&mut self.txn, Txn::Idle) else {
                    return (take, Next::More);
                };
                (take, self.chunk_done(msg, chunk))
            }
            Txn::Drain(drain) => {
                let take = (drain.left.min(input.len() as u64)) as usize;
                drain.left -= take as u64;
                if drain.left > 0 {
                    return (take, Next::More);
                }
                // The state was matched just above: the `else` cannot run.
                let Txn::Drain(d) = std::mem::replace(&mut self.txn, Txn::Idle) else {
                    return (take, Next::More);
                };
                self.txn = d.env.map_or(Txn::Idle, Txn::Mail);
                let step = match (d.close, d.abandon) {
                    (Some(bye), _) => Step::Close(vec![d.reply, bye], CloseReason::Refused),
                    (None, true) => Step::Abandon(d.reply),
                    (None, false) => Step::Reply(d.reply),
                };
                (take, Next::Step(step))
            }
            Txn::Sealed(_) => {
                // The state was matched just above: the `else` cannot run.
                let Txn::Sealed(msg) = std::mem::replace(&mut self.txn, Txn::Idle) else {
                    return (0, Next::More);
                };
                (0, Next::Step(self.sealed(msg)))
            }
            // Not in a body phase: nothing to take.
            _ => (0, Next::Step(Step::Continue)),
        }
    }

    /// A BDAT chunk was read whole: 250 per chunk (RFC 3030 §2), or the message ends.
    fn chunk_done(&mut self, msg: Message, chunk: Chunk) -> Next {
        if msg.failed.is_some() {
            // The transaction failed; later chunks are drained and refused 503.
            return Next::Step(self.abandon(msg, MessageOutcome::TooBig));
        }
        if !chunk.last {
            self.txn = Txn::Chunked(msg);
            return Next::Step(Step::Reply(replies::chunk_received(chunk.size)));
        }
        self.seal(msg)
    }

    /// The content is complete: what the guard still held goes out, then the end.
    fn seal(&mut self, mut msg: Message) -> Next {
        if msg.failed.is_none() {
            msg.guard.finish(&mut self.scratch);
            if !self.scratch.is_empty() {
                let Session {
                    hooks,
                    info,
                    chunk_panicked,
                    hold,
                    scratch,
                    ..
                } = self;
                let sink = Sink {
                    hooks,
                    info,
                    hold: *hold,
                    panicked: chunk_panicked,
                    scratch,
                };
                sink.hook(&msg.env, None);
                self.txn = Txn::Sealed(msg);
                return Next::Write(Out::Scratch);
            }
        }
        Next::Step(self.sealed(msg))
    }

    /// The whole content is in the message: the data hooks read it, or it is committed.
    fn sealed(&mut self, msg: Message) -> Step {
        if msg.failed.is_some() {
            return self.abandon(msg, MessageOutcome::TooBig);
        }
        if self.hold {
            self.txn = Txn::Checking(msg);
            return Step::Check;
        }
        let header_len = msg.guard.header_len();
        self.txn = Txn::Committing(msg);
        Step::Commit {
            verdict: DataVerdict::default(),
            header_len,
        }
    }

    /// The message is not stored: the driver drops it and sends the refusal. A storage
    /// failure recorded on the message wins over `outcome`.
    fn abandon(&mut self, mut msg: Message, outcome: MessageOutcome) -> Step {
        let outcome = msg.failed.take().map_or(outcome, storage);
        let reply = self.message_end(Some(msg.env), msg.size, outcome);
        Step::Abandon(reply)
    }

    /// After [`Step::Check`]: the data hooks read the held content. Their verdict
    /// comes back as [`Step::Commit`]; a refusal or a discard as [`Step::Abandon`]
    /// (the discard with its 250); a hook that panicked closes (451 4.3.0, then close).
    pub(crate) fn check_content(&mut self, content: &mut dyn Content) -> Step {
        let Txn::Checking(msg) = std::mem::replace(&mut self.txn, Txn::Idle) else {
            return self.finish(Step::Continue);
        };
        self.content_open = false;
        let verdict = if std::mem::take(&mut self.chunk_panicked) {
            // As for any deciding hook that panics: 451, then close.
            self.closing = Some(Vec::new());
            Err(replies::INTERNAL_ERROR.into())
        } else {
            let hooks = Arc::clone(&self.hooks);
            let env = &msg.env;
            match self.hook(|s| hooks.data_from(s, env, content)) {
                Ok(verdict) => Ok(verdict),
                Err(Step::Reply(rep)) => Err(rep),
                Err(Step::Close(mut replies, _)) if !replies.is_empty() => {
                    // A panic (451) or a 421 refusal: that reply, then close.
                    let first = replies.remove(0);
                    self.closing = Some(replies);
                    Err(first)
                }
                Err(_) => Err(replies::INTERNAL_ERROR.into()),
            }
        };
        let step = match verdict {
            Ok(v) if v.discard => {
                // Dropping the held message removes it: 250, nothing stored.
                let id = msg.queue_id.clone();
                self.abandon(msg, MessageOutcome::Discarded(id))
            }
            Ok(verdict) => {
                let header_len = msg.guard.header_len();
                self.txn = Txn::Committing(msg);
                Step::Commit {
                    verdict,
                    header_len,
                }
            }
            Err(reply) => self.abandon(msg, MessageOutcome::Refused(reply)),
        };
        self.finish(step)
    }

    /// After [`Step::Commit`]: how the driver's commit ended. The 250 with the queue id
    /// is sent only now, once the message is durable (SPEC invariant 1; for BDAT, the
    /// LAST chunk's reply, RFC 3030 §2).
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn committed(&mut self, result: Result<(), CommitError>) -> Step {
        let msg = match std::mem::replace(&mut self.txn, Txn::Idle) {
            Txn::Committing(msg) | Txn::Checking(msg) => msg,
            other => {
                self.txn = other;
                return self.finish(Step::Continue);
            }
        };
        let outcome = match result {
            Ok(()) => MessageOutcome::Stored(msg.queue_id.clone()),
            Err(CommitError::Store(e)) => storage(e),
            Err(CommitError::Plan(why)) => MessageOutcome::Refused(self.hook_failed(&why)),
        };
        let reply = self.message_end(Some(msg.env), msg.size, outcome);
        self.finish(Step::Reply(reply))
    }
}

/// What the content guard let out of one piece of content.
enum Emitted {
    /// The piece itself, unchanged (past the header section: no copy).
    Whole,
    /// The scratch buffer.
    Scratch,
}

/// The parts of a session that content passes on its way out.
struct Sink<'s> {
    hooks: &'s Arc<dyn Hooks>,
    info: &'s SessionInfo,
    hold: bool,
    panicked: &'s mut bool,
    scratch: &'s mut Vec<u8>,
}

impl Sink<'_> {
    /// Content as it is stored (`bytes`, or the scratch buffer when `None`), for the
    /// hooks that want data (`data_chunk`). A panic refuses the message at its end
    /// instead of ending the transfer.
    fn hook(self, env: &Envelope, bytes: Option<&[u8]>) {
        let chunk = bytes.unwrap_or(self.scratch);
        if !self.hold || chunk.is_empty() || *self.panicked {
            return;
        }
        let (hooks, info) = (self.hooks, self.info);
        if catch_unwind(AssertUnwindSafe(|| hooks.data_chunk(info, env, chunk))).is_err() {
            log::error!(
                target: LOG_TARGET,
                "session {}: a data_chunk hook panicked; the message will be refused",
                info.id
            );
            *self.panicked = true;
        }
    }
}

/// Passes one piece of content through the message's guard to the data hooks; `None`
/// when nothing is to be written yet (the guard holds it back).
fn emit(msg: &mut Message, bytes: &[u8], sink: Sink<'_>) -> Option<Emitted> {
    if bytes.is_empty() {
        return None;
    }
    if msg.guard.is_body() {
        // The common case, past the header section: no copy.
        msg.guard.pass(bytes.len());
        sink.hook(&msg.env, Some(bytes));
        return Some(Emitted::Whole);
    }
    msg.guard.push(bytes, sink.scratch);
    if sink.scratch.is_empty() {
        return None;
    }
    sink.hook(&msg.env, None);
    Some(Emitted::Scratch)
}

/// A storage failure as the message's outcome (452 4.3.1 when out of space).
fn storage(e: StoreError) -> MessageOutcome {
    match e {
        StoreError::Full(m) => MessageOutcome::StorageFull(m),
        StoreError::Io(m) => MessageOutcome::StorageError(m),
    }
}
