//! Server-side event hooks (SPEC 7): plain blocking calls that may refuse with a reply.
//!
//! A [`Hooks`] value sees every session event: `connect`, `helo`, `mail`, `rcpt`,
//! `data` (decisions: each may refuse with any 4xx/5xx [`Reply`]), `error`, `done`,
//! `data_start`, `data_chunk`, `reset` and `close` (notifications). Hooks run on the session's worker thread, so a slow hook holds one
//! worker; they are shared by all sessions (`Send + Sync`), so state needs a lock.
//!
//! The binary's own `[policy]` is the [`Policy`] hook; the server composes it with the
//! embedder's hooks through [`Chain`] (policy first, first refusal wins).
//!
//! # Rules the session enforces
//! - A refusal must be 4xx or 5xx, and an enhanced code, if any, must be of the same
//!   class (RFC 3463 §3.1); anything else is a hook bug and the client gets
//!   `451 4.3.0` instead.
//! - A `421` refusal closes the connection after the reply (RFC 5321 §3.8).
//! - A hook that panics is caught. If it was deciding (connect, helo, mail, rcpt, data)
//!   the client gets `451 4.3.0` and the connection closes; a panic in `data_chunk`
//!   does the same at the end of that message. If it was being notified (error, done,
//!   data_start, reset) the reply already due is sent (a stored message is still
//!   `250`), then `421 4.3.0` and the connection closes; a panic in `close` (or in a
//!   `reset` at disconnect) is only logged. Other sessions and the server go on.
//! - A verdict's header fields are checked like a refusal: a malformed one (a line
//!   break that would forge a field, a bad name) gets `451 4.3.0`, and nothing is stored.
//!
//! # Example
//!
//! ```
//! use mailer::hooks::{DataVerdict, Envelope, Header, Hooks, SessionInfo};
//! use mailer::protocol::address::Address;
//! use mailer::{Enhanced, Reply};
//!
//! /// Refuses mail to `nobody@…` and tags every message with its size.
//! struct Tagger;
//!
//! impl Hooks for Tagger {
//!     fn rcpt(&self, _s: &SessionInfo, _e: &Envelope, to: &Address) -> Result<(), Reply> {
//!         if to.local_part().eq_ignore_ascii_case("nobody") {
//!             return Err(Reply::new(550, Enhanced(5, 1, 1), "No such user here"));
//!         }
//!         Ok(())
//!     }
//!     fn wants_data(&self) -> bool {
//!         true
//!     }
//!     fn data(
//!         &self,
//!         _s: &SessionInfo,
//!         _e: &Envelope,
//!         content: &mut dyn std::io::Read,
//!     ) -> Result<DataVerdict, Reply> {
//!         // The content is read from the spool file, never held whole in memory.
//!         let size = std::io::copy(content, &mut std::io::sink())
//!             .map_err(|_| Reply::new(451, Enhanced(4, 3, 0), "read error"))?;
//!         Ok(DataVerdict {
//!             add: vec![Header::new("X-Size", size.to_string())],
//!             ..DataVerdict::default()
//!         })
//!     }
//! }
//! # let _ = mailer::Server::builder(mailer::Config::default()).hooks(Tagger);
//! ```

use crate::protocol::address::{Address, ReversePath};
pub use crate::protocol::command::{Body, MailParams};
use crate::protocol::reply::{Enhanced, Reply};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;

/// A header field that a [`Hooks::data`] hook adds to a message (e.g. a spam score or
/// `Authentication-Results`). It is stored after the server's trace headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The field name, e.g. `X-Spam-Score`: printable ASCII without `:` (RFC 5322 §2.2).
    pub name: String,
    /// The field body, without the leading space. It may be folded over several lines
    /// with `\n` (or `\r\n`) followed by a space or tab; it may hold UTF-8 (RFC 6532).
    pub value: String,
}

impl Header {
    /// A header field `name: value` (checked when the message is stored).
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Header {
        Header {
            name: name.into(),
            value: value.into(),
        }
    }

    /// The wire form `Name: value` with CRLF line ends, or why the field is malformed.
    /// A malformed field must never reach the file: a stray line break would let a
    /// hook's input forge headers or end the header section early.
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .bytes()
                .all(|b| (33..=126).contains(&b) && b != b':');
        if !name_ok {
            return Err(format!("bad header name {:?}", self.name));
        }
        let mut out = Vec::with_capacity(self.name.len() + self.value.len() + 4);
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(b": ");
        for (i, line) in self.value.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            let bad_char = line.bytes().any(|b| b == b'\r' || b == 0);
            // RFC 5322 §2.2.3: a folded line starts with white space and is not empty.
            let bad_fold = i > 0
                && (!line.starts_with([' ', '\t']) || line.trim_matches([' ', '\t']).is_empty());
            if bad_char || bad_fold {
                return Err(format!("bad value for header {}", self.name));
            }
            if i > 0 {
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(line.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        Ok(out)
    }
}

/// TLS parameters of a session once the handshake is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    /// e.g. `TLSv1_3`.
    pub version: String,
    /// e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

/// What a hook may know about the session it is called for.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    /// Unique per server process, as in the log lines.
    pub id: u64,
    /// The client (after PROXY protocol, if any).
    pub peer: SocketAddr,
    /// Set once TLS is active (implicit TLS, or after STARTTLS).
    pub tls: Option<TlsInfo>,
    /// The user name after a successful AUTH (RFC 4954).
    pub auth_user: Option<String>,
    /// The HELO/EHLO name, once given (cleared by STARTTLS: the client must say it again).
    pub helo: Option<String>,
    /// The listening address the client reached (a milter's `{daemon_addr}`).
    pub local: SocketAddr,
    /// The SASL mechanism (`PLAIN`, `LOGIN`) of a successful AUTH (a milter's `{auth_type}`).
    pub auth_mechanism: Option<String>,
}

impl SessionInfo {
    /// A session as it starts: `peer` connected to `local`, no TLS, no HELO, no AUTH
    /// yet. Also what a hook's own unit tests can call their hook with.
    pub fn new(id: u64, peer: SocketAddr, local: SocketAddr) -> SessionInfo {
        SessionInfo {
            id,
            peer,
            tls: None,
            auth_user: None,
            helo: None,
            local,
            auth_mechanism: None,
        }
    }
}

/// What the `data` hooks decided about a message, beyond accepting it.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct DataVerdict {
    /// Header fields stored right below the trace headers, in order.
    pub add: Vec<Header>,
    /// Header fields inserted into the message's own header section: the index counts
    /// its fields from 0 (0 = before the first one; past the end = after the last).
    pub insert: Vec<(usize, Header)>,
    /// Changes to fields of the message's own header section.
    pub change: Vec<HeaderChange>,
    /// Store the message in the Maildir++ folder `.Quarantine` of each of its Maildirs,
    /// with `X-Quarantine:` and this reason.
    pub quarantine: Option<String>,
    /// Answer 250 but store nothing (a milter's discard).
    pub discard: bool,
}

impl DataVerdict {
    /// Folds `other` into `self`: lists are concatenated in order, a discard or a
    /// quarantine from either side holds (the first quarantine reason is kept).
    pub fn merge(&mut self, other: DataVerdict) {
        self.add.extend(other.add);
        self.insert.extend(other.insert);
        self.change.extend(other.change);
        if self.quarantine.is_none() {
            self.quarantine = other.quarantine;
        }
        self.discard |= other.discard;
    }
}

/// A change to one header field of the message (a milter's `chgheader`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderChange {
    /// The field name, compared case-insensitively.
    pub name: String,
    /// Which field of that name: 1 is the first.
    pub index: usize,
    /// The new value; `None` deletes the field.
    pub value: Option<String>,
}

/// The stored content of a message, readable from its first byte as often as needed
/// (each data hook of a [`Chain`] reads it from the start).
pub trait Content {
    /// A reader over the content, from its first byte.
    fn reader(&mut self) -> io::Result<Box<dyn Read + '_>>;
}

/// Content held in memory (tests, embedders driving hooks by hand).
impl Content for &[u8] {
    fn reader(&mut self) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(*self))
    }
}

/// The envelope of one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The MAIL FROM reverse-path (`Null` for `<>`).
    pub from: ReversePath,
    /// The MAIL FROM parameters (SIZE, BODY, SMTPUTF8, AUTH).
    pub params: MailParams,
    /// The recipients accepted so far, in order.
    pub rcpts: Vec<Address>,
}

/// What went wrong in a session, as reported to [`Hooks::error`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionError {
    /// The client sent something the server refused with this reply.
    Protocol(Reply),
    /// Command or data deadline passed, or data came slower than the minimum rate.
    Timeout,
    /// Storing a message failed.
    Storage(String),
    /// The connection broke (reset, TLS error, closed in the middle of a message).
    Io(String),
}

/// Per-event callbacks. Every method has a default that accepts, so an implementation
/// overrides only what it cares about. A refusal must be a 4xx or 5xx reply; anything
/// else is turned into `451 4.3.0` by the session (see the [module rules](self)).
pub trait Hooks: Send + Sync {
    /// A client connected (before the greeting). Refusing sends the reply and closes.
    fn connect(&self, _session: &SessionInfo) -> Result<(), Reply> {
        Ok(())
    }
    /// HELO or EHLO with this name.
    fn helo(&self, _session: &SessionInfo, _name: &str) -> Result<(), Reply> {
        Ok(())
    }
    /// MAIL FROM, after syntax and size checks.
    fn mail(
        &self,
        _session: &SessionInfo,
        _from: &ReversePath,
        _params: &MailParams,
    ) -> Result<(), Reply> {
        Ok(())
    }
    /// RCPT TO, after syntax and recipient-count checks.
    fn rcpt(
        &self,
        _session: &SessionInfo,
        _envelope: &Envelope,
        _to: &Address,
    ) -> Result<(), Reply> {
        Ok(())
    }
    /// The start of a message's content: after the 354 reply to DATA, or with the
    /// first BDAT chunk. `queue_id` is the id the final 250 will carry.
    fn data_start(&self, _session: &SessionInfo, _envelope: &Envelope, _queue_id: &str) {}
    /// Content bytes as they arrive, in order and in pieces of any size: exactly what is
    /// stored after the trace headers (dot-unstuffed, CRLF line ends). Called only when
    /// [`wants_data`](Hooks::wants_data) is true.
    fn data_chunk(&self, _session: &SessionInfo, _envelope: &Envelope, _chunk: &[u8]) {}
    /// The end of a message, before it is made durable. `content` reads the stored
    /// content from its first byte (the server never holds a message whole in memory).
    /// Called only when [`wants_data`](Hooks::wants_data) is true. Refusing discards the
    /// message; `Ok` may ask for header fields to add, insert or change, or for a
    /// quarantine or a discard.
    fn data(
        &self,
        _session: &SessionInfo,
        _envelope: &Envelope,
        _content: &mut dyn Read,
    ) -> Result<DataVerdict, Reply> {
        Ok(DataVerdict::default())
    }
    /// [`data`](Hooks::data) with content that can be read again from the start. The
    /// server calls this one; [`Chain`] overrides it so that each of its hooks reads the
    /// whole content. Other implementations keep the default.
    fn data_from(
        &self,
        session: &SessionInfo,
        envelope: &Envelope,
        content: &mut dyn Content,
    ) -> Result<DataVerdict, Reply> {
        let mut reader = content.reader().map_err(|e| {
            log::error!(
                "session {}: cannot read the stored content: {e}",
                session.id
            );
            Reply::new(451, Enhanced(4, 3, 0), "Error: queue file read error")
        })?;
        self.data(session, envelope, &mut reader)
    }
    /// The transaction was abandoned: RSET, a new HELO/EHLO, STARTTLS, QUIT, a
    /// disconnect while one was open, or a message that ended without reaching
    /// [`data`](Hooks::data) (too big, bare LF, storage failure).
    fn reset(&self, _session: &SessionInfo) {}
    /// The session ended, whatever the reason, after its last reply. Per-session state
    /// kept by the hook can be freed here.
    fn close(&self, _session: &SessionInfo) {}
    /// Something went wrong in the session: a refused command (every 5xx and 421
    /// reply, including refusals by hooks and 5xx answers at the end of a message), a
    /// timeout, a storage failure or a broken connection.
    fn error(&self, _session: &SessionInfo, _error: &SessionError) {}
    /// A message was stored durably under `queue_id` (the id in the `250` reply and in
    /// the file name). Called once per stored message, before the client sees the `250`.
    fn done(&self, _session: &SessionInfo, _envelope: &Envelope, _queue_id: &str) {}
    /// Whether [`data_chunk`](Hooks::data_chunk) and [`data`](Hooks::data) want the
    /// content. `false` (the default) lets the server write each message once, trace
    /// headers and content in one file; `true` costs a second write of the content
    /// (the headers a hook adds must precede it), never memory.
    fn wants_data(&self) -> bool {
        false
    }
}

/// Accepts everything (the default when an embedder gives no hooks).
pub struct NoHooks;
impl Hooks for NoHooks {}

/// Runs hooks in order; the first refusal wins. Notifications go to all.
pub struct Chain(pub Vec<Arc<dyn Hooks>>);

impl Hooks for Chain {
    fn connect(&self, s: &SessionInfo) -> Result<(), Reply> {
        self.0.iter().try_for_each(|h| h.connect(s))
    }
    fn helo(&self, s: &SessionInfo, name: &str) -> Result<(), Reply> {
        self.0.iter().try_for_each(|h| h.helo(s, name))
    }
    fn mail(&self, s: &SessionInfo, from: &ReversePath, p: &MailParams) -> Result<(), Reply> {
        self.0.iter().try_for_each(|h| h.mail(s, from, p))
    }
    fn rcpt(&self, s: &SessionInfo, e: &Envelope, to: &Address) -> Result<(), Reply> {
        self.0.iter().try_for_each(|h| h.rcpt(s, e, to))
    }
    fn data_start(&self, s: &SessionInfo, e: &Envelope, q: &str) {
        self.0.iter().for_each(|h| h.data_start(s, e, q))
    }
    fn data_chunk(&self, s: &SessionInfo, e: &Envelope, chunk: &[u8]) {
        for h in self.0.iter().filter(|h| h.wants_data()) {
            h.data_chunk(s, e, chunk);
        }
    }
    /// With a plain reader, only the first hook that wants data can read it: call
    /// [`data_from`](Hooks::data_from) to give each hook the whole content.
    fn data(&self, s: &SessionInfo, e: &Envelope, c: &mut dyn Read) -> Result<DataVerdict, Reply> {
        let mut once = Some(c);
        let mut all = DataVerdict::default();
        for h in self.0.iter().filter(|h| h.wants_data()) {
            let v = match once.take() {
                Some(c) => h.data(s, e, c)?,
                None => h.data(s, e, &mut io::empty())?,
            };
            all.merge(v);
        }
        Ok(all)
    }
    /// Each hook that wants data reads the content from its start; the verdicts are
    /// merged in order ([`DataVerdict::merge`]); the first refusal wins.
    fn data_from(
        &self,
        s: &SessionInfo,
        e: &Envelope,
        c: &mut dyn Content,
    ) -> Result<DataVerdict, Reply> {
        let mut all = DataVerdict::default();
        for h in self.0.iter().filter(|h| h.wants_data()) {
            all.merge(h.data_from(s, e, c)?);
        }
        Ok(all)
    }
    fn reset(&self, s: &SessionInfo) {
        self.0.iter().for_each(|h| h.reset(s))
    }
    fn close(&self, s: &SessionInfo) {
        self.0.iter().for_each(|h| h.close(s))
    }
    fn error(&self, s: &SessionInfo, err: &SessionError) {
        self.0.iter().for_each(|h| h.error(s, err))
    }
    fn done(&self, s: &SessionInfo, e: &Envelope, q: &str) {
        self.0.iter().for_each(|h| h.done(s, e, q))
    }
    fn wants_data(&self) -> bool {
        self.0.iter().any(|h| h.wants_data())
    }
}

/// `[policy] accept_domains`: unauthenticated clients may only send to these domains
/// (case-insensitive); empty accepts any. Authenticated clients may relay anywhere.
pub struct Policy {
    domains: Vec<String>,
}

impl Policy {
    /// A policy accepting recipients in `domains` (any domain when empty).
    pub fn new(domains: &[String]) -> Policy {
        Policy {
            domains: domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        }
    }
}

impl Hooks for Policy {
    fn rcpt(&self, s: &SessionInfo, _e: &Envelope, to: &Address) -> Result<(), Reply> {
        if self.domains.is_empty() || s.auth_user.is_some() {
            return Ok(());
        }
        // Bare `Postmaster` is always deliverable (RFC 5321 §4.5.1).
        let ok = match to.domain() {
            None => true,
            Some(d) => self.domains.iter().any(|a| a.eq_ignore_ascii_case(d)),
        };
        if ok {
            Ok(())
        } else {
            Err(Reply::new(
                550,
                Enhanced(5, 7, 1),
                format!("<{to}>: Relay access denied"),
            ))
        }
    }
}
