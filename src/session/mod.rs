//! The SMTP session as a pure state machine (RFC 5321 §4.1, §4.3.2): it takes command
//! lines and body bytes and returns the next [`Step`]; it never touches a socket or a
//! file. It owns the whole transaction, the body phase included ([`Session::body`]): the
//! connection driver (`connection.rs`) only moves bytes, runs the store and reports
//! back, so every reply is chosen here.

mod auth;
mod body;

#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub use body::{Body, CommitError};

use crate::auth::RateLimit;
use crate::hooks::{DataVerdict, Envelope, Hooks, SessionError, SessionInfo, TlsInfo};
use crate::protocol::address::{Address, ReversePath};
use crate::protocol::command::{self, Command};
use crate::protocol::data::{BareLf, DataReader};
use crate::protocol::replies::{self, bad_sequence};
use crate::protocol::reply::Reply;
use crate::protocol::sasl::{Authenticator, Exchange};
use crate::protocol::trace::{self, Trace};
use body::{Chunk, Drain, Message};

/// The log target of every line the session writes, from any of its files: fail2ban
/// filters (contrib/fail2ban) match `mailer::<one word>`, so a submodule's own path
/// (`mailer::session::auth`) would hide its lines from them.
const LOG_TARGET: &str = module_path!();
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The per-server settings a session needs, its message limits included (the
/// driver's own are I/O limits only: `connection::WireLimits`).
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub struct Settings {
    /// This server's name: greeting, EHLO, 421s, `Received:`.
    pub hostname: String,
    /// SIZE (RFC 1870), the BDAT total, and DATA content beyond which the rest is
    /// drained and the message refused 552 (SPEC invariant 4).
    pub max_message_size: u64,
    /// What a bare LF in DATA content means (SPEC invariant 2).
    pub bare_lf: BareLf,
    /// RCPT beyond this many gets 452 4.5.3 (RFC 5321 §4.5.3.1.10).
    pub max_recipients: usize,
    /// Failed commands before 421 and close (RFC 5321 §4.2.5 leaves the limit to us).
    pub max_errors: u32,
    /// STARTTLS can be offered (a `[tls]` section exists).
    pub tls_available: bool,
    /// MAIL and AUTH need TLS first (530 5.7.0).
    pub require_tls: bool,
    /// `[auth]`, when configured: AUTH is offered (after STARTTLS, unless
    /// `allow_plaintext`).
    pub auth: Option<AuthSettings>,
}

/// `[auth]` for sessions.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub struct AuthSettings {
    /// AUTH is offered without TLS too (RFC 4954 §4 advises against it).
    pub allow_plaintext: bool,
    /// Checks user name and password.
    pub authenticator: Arc<dyn Authenticator>,
}

/// Bounds on what one session may spend beyond single commands (SPEC invariant 8).
/// Set with [`Session::set_guards`]; the defaults are the shipped config's.
#[derive(Clone)]
pub(crate) struct Guards {
    /// NOOP, RSET, VRFY, EXPN and HELP beyond this many each count as an error, as
    /// Postfix's `smtpd_junk_command_limit` does.
    pub(crate) max_junk_commands: u32,
    /// The whole session's lifetime: the first command after it gets 421 4.4.2.
    pub(crate) lifetime: Duration,
    /// Failed AUTH attempts per client address, shared by all sessions.
    pub(crate) auth_rate: Option<Arc<RateLimit>>,
}

impl Default for Guards {
    fn default() -> Guards {
        Guards {
            max_junk_commands: 100,
            lifetime: Duration::from_secs(3600),
            auth_rate: None,
        }
    }
}

/// The mail transaction (RFC 5321 §3.3), with the data each state owns. Recipients
/// live in the envelope; DATA needs at least one, which the session checks. From DATA
/// or the first BDAT on, the envelope lives in the [`Message`] being received.
#[derive(Debug)]
enum Txn {
    Idle,
    Mail(Envelope),
    /// DATA or a first BDAT chunk was accepted: the driver opens the message
    /// ([`Step::Open`]); the chunk is `Some` for BDAT.
    Opening(Message, Option<Chunk>),
    /// DATA content is arriving (RFC 5321 §4.1.1.4).
    Data(Message, DataReader),
    /// A BDAT chunk is arriving into the open message (RFC 3030 §2).
    Chunk(Message, Chunk),
    /// Between BDAT chunks: the message is open, commands are read.
    Chunked(Message),
    /// The content is complete; the last bytes the guard held went out to be written.
    Sealed(Message),
    /// The data hooks are to read the held content ([`Step::Check`]).
    Checking(Message),
    /// The driver commits the message ([`Step::Commit`]).
    Committing(Message),
    /// A refused BDAT chunk is read and thrown away (RFC 3030 §2: the octets follow
    /// the command whatever its reply).
    Drain(Drain),
}

/// Why the session ends, for the driver's summary line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum CloseReason {
    /// QUIT (RFC 5321 §4.1.1.10).
    Quit,
    /// The server refused to go on: too many errors, a hook's 421 or panic, AUTH rate
    /// limit, STARTTLS command injection.
    Refused,
    /// A command or data deadline, or a transfer below `min_data_rate`.
    Timeout,
    /// `session_timeout_secs` passed.
    Lifetime,
    /// Its worker was given to a new client while it waited for a command.
    Evicted,
    /// The server is stopping.
    Shutdown,
}

/// What the driver must do next. Every call into the session answers with one of
/// these (or, in the body phase, [`Body`]); the driver never looks at a reply's code.
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum Step {
    /// Send the reply, read the next command.
    Reply(Reply),
    /// Nothing to send: read the next command.
    Continue,
    /// Send the replies and close the connection (any open message is dropped).
    Close(Vec<Reply>, CloseReason),
    /// Send the reply, then run the TLS handshake and call
    /// [`Session::tls_started`] (RFC 3207 §4.2: everything starts over, so any open
    /// message is dropped). If the client sent anything after the STARTTLS line, call
    /// [`Session::tls_injection`] instead (SPEC invariant 3).
    StartTls(Reply),
    /// A message transfer begins (DATA, or a first BDAT chunk): open a message in the
    /// store and report with [`Session::opened`]. `hold`: the data hooks read the
    /// content before it is committed, so keep it whole in one file.
    Open {
        /// The data hooks want the content.
        hold: bool,
    },
    /// A later BDAT chunk of the open message: the transfer resumes; feed the bytes
    /// that follow to [`Session::body`].
    Resume,
    /// Send the reply if any (354 after DATA), then feed the bytes that follow to
    /// [`Session::body`].
    Body(Option<Reply>),
    /// The held content is complete: let the data hooks read it through
    /// [`Session::check_content`].
    Check,
    /// The content is complete: commit the message with this verdict (trace headers,
    /// header edits of the first `header_len` content octets, copies), then report
    /// with [`Session::committed`].
    Commit {
        /// What the data hooks decided (the default without data hooks).
        verdict: DataVerdict,
        /// The length of the message's own header section, as stored.
        header_len: u64,
    },
    /// Drop the open message (nothing is stored), send the reply, read the next command.
    Abandon(Reply),
}

/// How a message ended, for its final reply and log line.
#[derive(Debug, PartialEq, Eq)]
enum MessageOutcome {
    /// Durably stored under this queue id.
    Stored(String),
    /// A data hook asked for a discard: 250 with this queue id, nothing stored.
    Discarded(String),
    TooBig,
    BareLf,
    /// A hook refused the content.
    Refused(Reply),
    /// Out of space (452 4.3.1).
    StorageFull(String),
    /// Any other storage failure (451 4.3.0).
    StorageError(String),
}

/// One SMTP session.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub struct Session {
    settings: Arc<Settings>,
    hooks: Arc<dyn Hooks>,
    info: SessionInfo,
    esmtp: bool,
    txn: Txn,
    errors: u32,
    auth: Option<Exchange>,
    /// Set when a hook panicked: these replies follow the reply due, then the session
    /// closes (see [`Session::finish`]).
    closing: Option<Vec<Reply>>,
    guards: Guards,
    started: Instant,
    /// Junk commands (NOOP, RSET, VRFY, EXPN, HELP) since the last stored message.
    junk: u32,
    /// The current command was junk beyond the limit: it counts as an error.
    junk_over: bool,
    /// `data_start` was called and neither `data` nor `reset` since.
    content_open: bool,
    /// A `data_chunk` hook panicked: the message is refused at its end.
    chunk_panicked: bool,
    /// The mechanism of the AUTH exchange in progress.
    auth_mechanism: Option<String>,
    /// The data hooks read the content ([`Hooks::wants_data`]): it is held until
    /// they have seen it, and passed to `data_chunk` as it arrives.
    hold: bool,
    /// DATA content decoded and not yet handed out (reused from message to message).
    pending: Vec<u8>,
    /// What the content guard rewrote (reused).
    scratch: Vec<u8>,
    /// `pending` was handed out with the last [`Body::Write`].
    emitted: bool,
}

/// What a refused line asked for, for the log: the command as sent (`MAIL
/// FROM:<...>`, `RCPT TO:<...>`, `HELO name`; escaped by the log formatter), except
/// that AUTH lines never show their credentials.
fn refused_what(line: &[u8], in_auth: bool) -> String {
    if in_auth {
        return "AUTH response".into();
    }
    let text = String::from_utf8_lossy(line);
    let mut words = text.split_ascii_whitespace();
    if words
        .next()
        .is_some_and(|verb| verb.eq_ignore_ascii_case("AUTH"))
    {
        return format!("AUTH {}", words.next().unwrap_or(""));
    }
    // The verb (and MAIL's `FROM:`, RCPT's `TO:`) in upper case, so that one
    // pattern (fail2ban) matches however the client spelled it; the rest as sent,
    // bounded: a command line may be up to max_line_length.
    let text: String = text.chars().take(300).collect();
    let verb_end = text.find(' ').unwrap_or(text.len());
    let head_end = match text[..verb_end].to_ascii_uppercase().as_str() {
        "MAIL" | "RCPT" => text.find(':').unwrap_or(verb_end),
        _ => verb_end,
    };
    format!(
        "{}{}",
        text[..head_end].to_ascii_uppercase(),
        &text[head_end..]
    )
}

impl Session {
    /// A session for one connection; `info` says who the client is. The hooks are
    /// asked here whether they read message content ([`Hooks::wants_data`]).
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn new(settings: Arc<Settings>, hooks: Arc<dyn Hooks>, info: SessionInfo) -> Session {
        let hold = hooks.wants_data();
        Session {
            settings,
            hooks,
            info,
            esmtp: false,
            txn: Txn::Idle,
            errors: 0,
            auth: None,
            closing: None,
            guards: Guards::default(),
            started: Instant::now(),
            junk: 0,
            junk_over: false,
            content_open: false,
            chunk_panicked: false,
            auth_mechanism: None,
            hold,
            pending: Vec::new(),
            scratch: Vec::new(),
            emitted: false,
        }
    }

    /// Replaces the default [`Guards`] (the server sets them from its config).
    pub(crate) fn set_guards(&mut self, guards: Guards) {
        self.guards = guards;
    }

    /// How long this session may still wait for commands before its lifetime ends.
    /// A BDAT transaction in progress may finish (its size is bounded by
    /// `max_message_size`), so between its chunks the lifetime does not count.
    pub(crate) fn lifetime_left(&self) -> Duration {
        if self.is_chunking() {
            return Duration::MAX;
        }
        self.guards.lifetime.saturating_sub(self.started.elapsed())
    }

    /// 421 4.4.2 once the session lifetime has passed (`session_timeout_secs`).
    pub(crate) fn lifetime_over(&mut self) -> Step {
        log::info!(
            "session {}: client {}: session lifetime of {}s exceeded; closing",
            self.info.id,
            self.info.peer.ip(),
            self.guards.lifetime.as_secs()
        );
        self.notify_error(SessionError::Timeout);
        Step::Close(
            vec![replies::lifetime_exceeded(&self.settings.hostname)],
            CloseReason::Lifetime,
        )
    }

    /// 421 4.4.2 for a session whose worker was given to a new client while it waited
    /// for a command with every worker busy (SPEC invariant 8).
    pub(crate) fn evicted(&mut self) -> Step {
        log::warn!(
            "session {}: client {}: closed for a new client: all workers busy and this session waited longest for a command",
            self.info.id,
            self.info.peer.ip()
        );
        self.notify_error(SessionError::Timeout);
        Step::Close(
            vec![replies::evicted(&self.settings.hostname)],
            CloseReason::Evicted,
        )
    }

    /// The transaction is abandoned: tell the hooks (RSET, HELO/EHLO, STARTTLS, QUIT,
    /// disconnect, a message that ended before its `data` call). True when the driver
    /// held an open message for it (it must drop it).
    fn abort_transaction(&mut self, always: bool) -> bool {
        let held = self.message_open();
        let open = !matches!(self.txn, Txn::Idle) || self.content_open;
        self.txn = Txn::Idle;
        self.content_open = false;
        self.chunk_panicked = false;
        if open || always {
            let hooks = Arc::clone(&self.hooks);
            self.notify(|s| hooks.reset(s));
        }
        held
    }

    /// True while the driver holds an open message for this transaction.
    fn message_open(&self) -> bool {
        !matches!(self.txn, Txn::Idle | Txn::Mail(_) | Txn::Drain(_))
    }

    /// The last word on every step: once a notification hook has panicked, the reply
    /// due is followed by 421 and the session closes (RFC 5321 §3.8). A step still
    /// inside the body phase goes on; the close follows the message's final reply.
    fn finish(&mut self, step: Step) -> Step {
        let Some(mut more) = self.closing.take() else {
            return step;
        };
        match step {
            Step::Reply(r) | Step::Abandon(r) => {
                more.insert(0, r);
                Step::Close(more, CloseReason::Refused)
            }
            Step::Continue => Step::Close(more, CloseReason::Refused),
            Step::Close(..) => step,
            other => {
                self.closing = Some(more);
                other
            }
        }
    }

    /// The session is over (after its last reply, whatever the reason): an open
    /// transaction is reset, then the `close` hook runs.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn closed(&mut self) {
        let _ = self.abort_transaction(false);
        let hooks = Arc::clone(&self.hooks);
        self.notify(|s| hooks.close(s));
    }

    /// The reply for a hook that misbehaved at the end of a message (logged here).
    fn hook_failed(&self, why: &str) -> Reply {
        log::error!("session {}: data hook: {why}; sending 451", self.info.id);
        replies::INTERNAL_ERROR.into()
    }

    /// What hooks see: id, peer, TLS, user, HELO name.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// The envelope of the transaction in progress.
    pub(crate) fn envelope(&self) -> Option<&Envelope> {
        match &self.txn {
            Txn::Mail(env) => Some(env),
            _ => self.message().map(|m| &m.env),
        }
    }

    /// True while a BDAT transaction's message is in transfer (between its chunks
    /// too): the session is then never idle at a prompt (SPEC invariant 8).
    pub(crate) fn is_chunking(&self) -> bool {
        matches!(
            self.txn,
            Txn::Chunk(..) | Txn::Chunked(_) | Txn::Opening(_, Some(_))
        )
    }

    /// The greeting, after the `connect` hook (a refusal closes).
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn greeting(&mut self) -> Step {
        let hooks = Arc::clone(&self.hooks);
        let step = match self.hook(|s| hooks.connect(s)) {
            Ok(()) => Step::Reply(replies::greeting(&self.settings.hostname)),
            Err(step) => step_close(step),
        };
        self.finish(step)
    }

    /// Handles one command line (without CRLF), or one AUTH response line.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn command(&mut self, line: &[u8]) -> Step {
        if self.lifetime_left().is_zero() {
            // A message in transfer was allowed to finish; no new command starts.
            self.auth = None;
            return self.lifetime_over();
        }
        self.junk_over = false;
        let in_auth = self.auth.is_some();
        let step = match self.auth.take() {
            Some(ex) => self.auth_response(&ex, line),
            None => match command::parse(line) {
                Ok(cmd) => self.dispatch(cmd),
                Err(reply) => Step::Reply(reply),
            },
        };
        if let Some(rep) = self.refusal(&step) {
            // 535 has its own `auth failed` line (auth_step).
            if rep.is_refusal() && rep.code != 535 {
                log::info!(
                    "session {}: client {}: refused {}: {rep}",
                    self.info.id,
                    self.info.peer.ip(),
                    refused_what(line, in_auth)
                );
            }
        }
        let step = self.count_errors(step);
        self.finish(step)
    }

    /// The refusal a step carries: its reply, or a refused BDAT chunk's once drained.
    fn refusal<'s>(&'s self, step: &'s Step) -> Option<&'s Reply> {
        match (step, &self.txn) {
            (Step::Reply(rep), _) => Some(rep),
            (Step::Body(None), Txn::Drain(d)) => Some(&d.reply),
            _ => None,
        }
    }

    /// A command line longer than `max_line_length` (it was discarded).
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn line_too_long(&mut self) -> Step {
        self.auth = None;
        log::info!(
            "session {}: client {}: refused a command line over the length limit",
            self.info.id,
            self.info.peer.ip()
        );
        let step = self.count_errors(Step::Reply(replies::LINE_TOO_LONG.into()));
        self.finish(step)
    }

    /// RFC 5321 §4.2.5: every failed command counts; when the count reaches
    /// `max_errors`, the reply is followed by 421 and the connection closes.
    fn count_errors(&mut self, step: Step) -> Step {
        let failed = self
            .refusal(&step)
            .is_some_and(|rep| rep.code >= 500 || rep.code == 421);
        let junk = std::mem::take(&mut self.junk_over);
        if !failed && !junk {
            return step;
        }
        if failed {
            if let Some(rep) = self.refusal(&step).cloned() {
                self.notify_error(SessionError::Protocol(rep));
            }
        } else {
            log::info!(
                "session {}: client {}: more than {} NOOP/RSET/VRFY/EXPN/HELP; counted as an error",
                self.info.id,
                self.info.peer.ip(),
                self.guards.max_junk_commands
            );
        }
        self.errors += 1;
        if self.errors < self.settings.max_errors {
            return step;
        }
        let bye = replies::too_many_errors(&self.settings.hostname);
        match step {
            Step::Reply(rep) => Step::Close(vec![rep, bye], CloseReason::Refused),
            // A refused chunk's bytes are still drained before the replies, so the
            // client reads them instead of a reset.
            other => {
                if let Txn::Drain(d) = &mut self.txn {
                    d.close = Some(bye);
                }
                other
            }
        }
    }

    fn dispatch(&mut self, cmd: Command) -> Step {
        if matches!(
            cmd,
            Command::Noop | Command::Rset | Command::Vrfy | Command::Expn | Command::Help
        ) {
            self.junk = self.junk.saturating_add(1);
            self.junk_over = self.junk > self.guards.max_junk_commands;
        }
        let s = &self.settings;
        match cmd {
            Command::Helo(name) => self.helo(name, false),
            Command::Ehlo(name) => self.helo(name, true),
            Command::Mail(from, params) => self.mail(from, params),
            Command::Rcpt(to) => self.rcpt(to),
            Command::Data => match std::mem::replace(&mut self.txn, Txn::Idle) {
                Txn::Mail(env) if !env.rcpts.is_empty() => {
                    self.txn = Txn::Opening(Message::new(env, 0), None);
                    Step::Open {
                        hold: self.hold,
                    }
                }
                Txn::Mail(env) => {
                    self.txn = Txn::Mail(env);
                    Step::Reply(bad_sequence("need RCPT command"))
                }
                Txn::Idle => Step::Reply(bad_sequence("need MAIL command")),
                other => {
                    self.txn = other;
                    Step::Reply(bad_sequence("DATA cannot follow BDAT in one transaction"))
                }
            },
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                let reply = replies::OK.into();
                if self.abort_transaction(true) {
                    Step::Abandon(reply)
                } else {
                    Step::Reply(reply)
                }
            }
            Command::Noop => Step::Reply(replies::OK.into()),
            Command::Quit => {
                let _ = self.abort_transaction(false);
                Step::Close(vec![replies::BYE.into()], CloseReason::Quit)
            }
            Command::Vrfy => Step::Reply(replies::CANNOT_VRFY.into()),
            Command::Expn => Step::Reply(replies::NOT_IMPLEMENTED.into()),
            Command::Help => Step::Reply(self.help()),
            Command::StartTls => {
                if self.info.tls.is_some() {
                    Step::Reply(bad_sequence("TLS already active"))
                } else if !s.tls_available {
                    Step::Reply(replies::TLS_NOT_AVAILABLE.into())
                } else {
                    Step::StartTls(replies::READY_FOR_TLS.into())
                }
            }
            Command::Auth { mechanism, initial } => self.auth_start(&mechanism, initial.as_deref()),
        }
    }

    fn helo(&mut self, name: String, esmtp: bool) -> Step {
        let hooks = Arc::clone(&self.hooks);
        if let Err(step) = self.hook(|s| hooks.helo(s, &name)) {
            return step;
        }
        // RFC 5321 §4.1.4: HELO/EHLO resets any transaction in progress.
        let held = self.abort_transaction(false);
        self.esmtp = esmtp;
        self.info.helo = Some(name);
        let reply = self.helo_reply(esmtp);
        if held {
            Step::Abandon(reply)
        } else {
            Step::Reply(reply)
        }
    }

    /// HELO's 250, or EHLO's with the extensions offered now (RFC 5321 §4.1.1.1).
    fn helo_reply(&self, esmtp: bool) -> Reply {
        if !esmtp {
            return Reply::plain(250, self.settings.hostname.clone());
        }
        let s = &self.settings;
        let mut lines = vec![
            s.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", s.max_message_size),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "CHUNKING".into(),
        ];
        if s.tls_available && self.info.tls.is_none() {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.push("HELP".into());
        Reply::plain(250, lines.join("\n"))
    }

    /// 214: the commands this server implements with the current configuration.
    fn help(&self) -> Reply {
        let mut cmds = String::from("HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP");
        if self.settings.tls_available {
            cmds.push_str(" STARTTLS");
        }
        if self.settings.auth.is_some() {
            cmds.push_str(" AUTH");
        }
        replies::help(&cmds)
    }

    fn auth_offered(&self) -> bool {
        match &self.settings.auth {
            Some(a) => self.info.tls.is_some() || a.allow_plaintext,
            None => false,
        }
    }

    fn tls_required(&self) -> Option<Step> {
        (self.settings.require_tls && self.info.tls.is_none())
            .then(|| Step::Reply(replies::MUST_STARTTLS.into()))
    }

    fn mail(&mut self, from: ReversePath, params: command::MailParams) -> Step {
        if let Some(step) = self.tls_required() {
            return step;
        }
        if self.info.helo.is_none() {
            return Step::Reply(bad_sequence("send HELO/EHLO first"));
        }
        if !matches!(self.txn, Txn::Idle) {
            return Step::Reply(bad_sequence("nested MAIL command"));
        }
        if params
            .size
            .is_some_and(|n| n > self.settings.max_message_size)
        {
            return Step::Reply(replies::SIZE_OVER_LIMIT.into());
        }
        if from.is_utf8() && !params.smtputf8 {
            // RFC 6531 §3.7.4.1
            return Step::Reply(replies::SMTPUTF8_REQUIRED.into());
        }
        let hooks = Arc::clone(&self.hooks);
        if let Err(step) = self.hook(|s| hooks.mail(s, &from, &params)) {
            return step;
        }
        self.txn = Txn::Mail(Envelope {
            from,
            params,
            rcpts: Vec::new(),
        });
        Step::Reply(replies::MAIL_OK.into())
    }

    fn rcpt(&mut self, to: crate::protocol::address::Address) -> Step {
        let env = match &self.txn {
            Txn::Mail(env) => env,
            Txn::Idle | Txn::Drain(_) => return Step::Reply(bad_sequence("need MAIL command")),
            _ => return Step::Reply(bad_sequence("RCPT during BDAT")),
        };
        if env.rcpts.len() >= self.settings.max_recipients {
            return Step::Reply(replies::TOO_MANY_RECIPIENTS.into());
        }
        if to.is_utf8() && !env.params.smtputf8 {
            return Step::Reply(replies::SMTPUTF8_REQUIRED.into());
        }
        let hooks = Arc::clone(&self.hooks);
        let env_snapshot = env.clone();
        if let Err(step) = self.hook(|s| hooks.rcpt(s, &env_snapshot, &to)) {
            return step;
        }
        if let Txn::Mail(env) = &mut self.txn {
            env.rcpts.push(to);
        }
        Step::Reply(replies::RCPT_OK.into())
    }

    /// BDAT (RFC 3030 §2): the chunk's octets follow the command whatever its reply,
    /// so a refused chunk is drained ([`Txn::Drain`]) and its refusal sent after it.
    fn bdat(&mut self, size: u64, last: bool) -> Step {
        let max = self.settings.max_message_size;
        let chunk = Chunk {
            left: size,
            size,
            last,
        };
        let drain = |reply: Reply, env: Option<Envelope>, abandon: bool| {
            Txn::Drain(Drain {
                left: size,
                reply,
                close: None,
                env,
                abandon,
            })
        };
        self.txn = match std::mem::replace(&mut self.txn, Txn::Idle) {
            Txn::Mail(env) if env.rcpts.is_empty() => {
                drain(bad_sequence("need RCPT command"), Some(env), false)
            }
            // The transaction fails; it ends Idle, so later chunks get 503 (drained).
            Txn::Mail(_) if size > max => drain(replies::MESSAGE_TOO_BIG.into(), None, false),
            Txn::Mail(env) => {
                self.txn = Txn::Opening(Message::new(env, size), Some(chunk));
                return Step::Open {
                    hold: self.hold,
                };
            }
            Txn::Chunked(msg) if msg.size.saturating_add(size) > max => {
                drain(replies::MESSAGE_TOO_BIG.into(), None, true)
            }
            Txn::Chunked(mut msg) => {
                msg.size += size;
                self.txn = Txn::Chunk(msg, chunk);
                return Step::Resume;
            }
            _ => drain(bad_sequence("need MAIL command"), None, false),
        };
        Step::Body(None)
    }

    /// The trace headers for the message in progress (SPEC 5), naming every recipient.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn trace_headers(&self, queue_id: &str, now: SystemTime) -> Vec<u8> {
        match self.envelope() {
            Some(env) => self.trace_for(&env.rcpts, queue_id, now),
            None => Vec::new(),
        }
    }

    /// The trace headers for one stored copy: `Return-Path:`, an `X-Original-To:` for
    /// each of `rcpts` (the recipients this copy is for), `Received:`.
    pub(crate) fn trace_for(&self, rcpts: &[Address], queue_id: &str, now: SystemTime) -> Vec<u8> {
        let Some(env) = self.envelope() else {
            return Vec::new();
        };
        let t = Trace {
            helo: self.info.helo.as_deref().unwrap_or("unknown"),
            client_ip: self.info.peer.ip(),
            hostname: &self.settings.hostname,
            tls: self.info.tls.is_some(),
            auth_user: self.info.auth_user.as_deref(),
            smtputf8: env.params.smtputf8,
            queue_id,
        };
        trace::headers(&env.from, rcpts, &t, now)
    }

    /// The end of a message (DATA or BDAT LAST, or a failed chunk): its final reply
    /// and log line. The transaction is over (the caller took it out of `txn`); `size`
    /// counts its content octets.
    fn message_end(&mut self, env: Option<Envelope>, size: u64, outcome: MessageOutcome) -> Reply {
        let ended = matches!(
            outcome,
            MessageOutcome::Stored(_) | MessageOutcome::Discarded(_)
        );
        if std::mem::take(&mut self.content_open) && !ended {
            // The hooks saw the content start but not the message through.
            self.chunk_panicked = false;
            let hooks = Arc::clone(&self.hooks);
            self.notify(|s| hooks.reset(s));
        }
        let (from, rcpts) = env
            .as_ref()
            .map_or((String::new(), 0), |e| (e.from.to_string(), e.rcpts.len()));
        let reply = match outcome {
            MessageOutcome::Stored(id) => {
                // A session that delivers mail is doing work: its junk allowance starts over.
                self.junk = 0;
                log::info!(
                    "session {}: stored {id}: {size} bytes from <{from}> to {rcpts} recipient(s)",
                    self.info.id
                );
                if let Some(env) = &env {
                    let hooks = Arc::clone(&self.hooks);
                    // The message is stored whatever the hook does: the reply stays 250.
                    self.notify(|s| hooks.done(s, env, &id));
                }
                return replies::queued(&id);
            }
            MessageOutcome::Discarded(id) => {
                log::warn!(
                    "session {}: discarded {id} as a data hook asked: {size} bytes from <{from}> to {rcpts} recipient(s)",
                    self.info.id
                );
                return replies::queued(&id);
            }
            MessageOutcome::TooBig => replies::MESSAGE_TOO_BIG.into(),
            MessageOutcome::BareLf => replies::BARE_LF.into(),
            MessageOutcome::Refused(rep) => rep,
            MessageOutcome::StorageFull(e) => {
                log::error!("session {}: storage failure: {e}", self.info.id);
                self.notify_error(SessionError::Storage(e));
                replies::INSUFFICIENT_STORAGE.into()
            }
            MessageOutcome::StorageError(e) => {
                log::error!("session {}: storage failure: {e}", self.info.id);
                self.notify_error(SessionError::Storage(e));
                replies::WRITE_ERROR.into()
            }
        };
        if reply.code >= 500 {
            self.notify_error(SessionError::Protocol(reply.clone()));
        }
        log::info!(
            "session {}: client {}: refused message from <{from}> ({size} bytes): {reply}",
            self.info.id,
            self.info.peer.ip()
        );
        reply
    }

    /// After a successful TLS handshake: everything starts over (RFC 3207 §4.2).
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn tls_started(&mut self, tls: TlsInfo) -> Step {
        let _ = self.abort_transaction(false);
        self.info.tls = Some(tls);
        self.info.helo = None;
        self.info.auth_user = None;
        self.info.auth_mechanism = None;
        self.esmtp = false;
        self.auth = None;
        self.finish(Step::Continue)
    }

    /// The client sent `pending` bytes after its STARTTLS line, before the handshake
    /// (CVE-2011-0411, SPEC invariant 3): they are never run; the session closes after
    /// the 220 already due.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn tls_injection(&mut self, pending: usize) -> Step {
        log::warn!(
            "session {}: client {}: refused {pending} byte(s) pipelined after STARTTLS (command injection attempt); closing",
            self.info.id,
            self.info.peer.ip(),
        );
        Step::Close(Vec::new(), CloseReason::Refused)
    }

    /// 421 for a command or data deadline, or a too slow transfer.
    pub(crate) fn timeout(&mut self) -> Step {
        self.notify_error(SessionError::Timeout);
        Step::Close(
            vec![replies::timeout(&self.settings.hostname)],
            CloseReason::Timeout,
        )
    }

    /// 421 when the server is stopping (SPEC invariant 7).
    pub(crate) fn shutting_down(&self) -> Step {
        Step::Close(
            vec![replies::shutting_down(&self.settings.hostname)],
            CloseReason::Shutdown,
        )
    }

    /// The connection broke (or the client left in the middle of a message).
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn io_error(&mut self, what: String) {
        log::info!(
            "session {}: client {}: {what}",
            self.info.id,
            self.info.peer.ip()
        );
        self.notify_error(SessionError::Io(what));
    }

    fn notify_error(&mut self, e: SessionError) {
        let hooks = Arc::clone(&self.hooks);
        self.notify(|s| hooks.error(s, &e));
    }

    /// Runs a notification hook (error, done), catching panics: the reply already due
    /// stands, then the connection closes with 421 (RFC 5321 §3.8).
    fn notify(&mut self, f: impl FnOnce(&SessionInfo)) {
        let info = &self.info;
        if catch_unwind(AssertUnwindSafe(|| f(info))).is_err() {
            log::error!(
                "session {}: a hook panicked; closing the session",
                self.info.id
            );
            if self.closing.is_none() {
                self.closing = Some(vec![replies::hook_panicked(&self.settings.hostname)]);
            }
        }
    }

    /// Runs a deciding hook, catching panics, and turns a refusal into the step to take.
    fn hook<T>(&mut self, f: impl FnOnce(&SessionInfo) -> Result<T, Reply>) -> Result<T, Step> {
        let info = &self.info;
        match catch_unwind(AssertUnwindSafe(|| f(info))) {
            Ok(Ok(v)) => Ok(v),
            // RFC 3463 §3.1: the enhanced code's class must match the reply's.
            Ok(Err(reply))
                if reply.is_refusal()
                    && reply
                        .enhanced
                        .is_none_or(|e| u16::from(e.0) == reply.code / 100) =>
            {
                if reply.code == 421 {
                    // 421 means the server closes the channel (RFC 5321 §3.8).
                    Err(Step::Close(vec![reply], CloseReason::Refused))
                } else {
                    Err(Step::Reply(reply))
                }
            }
            Ok(Err(reply)) => {
                log::error!(
                    "session {}: hook refused with a non-error or inconsistent reply {reply}; sending 451",
                    self.info.id,
                );
                Err(Step::Reply(replies::INTERNAL_ERROR.into()))
            }
            Err(_) => {
                log::error!(
                    "session {}: a hook panicked; closing the session",
                    self.info.id
                );
                Err(Step::Close(
                    vec![replies::INTERNAL_ERROR.into()],
                    CloseReason::Refused,
                ))
            }
        }
    }
}

fn step_close(step: Step) -> Step {
    match step {
        Step::Reply(rep) => Step::Close(vec![rep], CloseReason::Refused),
        other => other,
    }
}

#[cfg(test)]
mod tests;
