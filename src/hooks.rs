//! Server-side event hooks (SPEC 7): plain blocking calls that may refuse with a reply.
//!
//! A [`Hooks`] value sees every session event: `connect`, `helo`, `mail`, `rcpt`,
//! `data` (decisions: each may refuse with any 4xx/5xx [`Reply`]), `error` and `done`
//! (notifications). Hooks run on the session's worker thread, so a slow hook holds one
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
//!   the client gets `451 4.3.0` and the connection closes; if it was being notified
//!   (error, done) the reply already due is sent (a stored message is still `250`),
//!   then `421 4.3.0` and the connection closes. Other sessions and the server go on.
//!
//! # Example
//!
//! ```
//! use mailer::hooks::{Envelope, Header, Hooks, SessionInfo};
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
//!     fn data(&self, _s: &SessionInfo, _e: &Envelope, content: &[u8]) -> Result<Vec<Header>, Reply> {
//!         Ok(vec![Header::new("X-Size", content.len().to_string())])
//!     }
//! }
//! # let _ = mailer::Server::builder(mailer::Config::default()).hooks(Tagger);
//! ```

use crate::protocol::address::{Address, ReversePath};
use crate::protocol::command::MailParams;
use crate::protocol::reply::{Enhanced, Reply};
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

/// What the data hooks decide about a stored message beyond accepting it.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct DataVerdict {
    pub add: Vec<Header>,
    pub insert: Vec<(usize, Header)>,
    pub change: Vec<HeaderChange>,
    pub quarantine: Option<String>,
    pub discard: bool,
}

/// A milter's chgheader: the `index`-th (1-based) field called `name`; `None` deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderChange {
    pub name: String,
    pub index: usize,
    pub value: Option<String>,
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
    /// The whole message content (exactly as it will be stored after the trace headers)
    /// before it is made durable. Called only when [`wants_data`](Hooks::wants_data) is
    /// true. Refusing discards the message; `Ok` may carry header fields to add: they are
    /// stored after the server's trace headers and before the message, in order.
    fn data(
        &self,
        _session: &SessionInfo,
        _envelope: &Envelope,
        _content: &[u8],
    ) -> Result<Vec<Header>, Reply> {
        Ok(Vec::new())
    }
    /// Something went wrong in the session: a refused command (every 5xx and 421
    /// reply, including refusals by hooks and 5xx answers at the end of a message), a
    /// timeout, a storage failure or a broken connection.
    fn error(&self, _session: &SessionInfo, _error: &SessionError) {}
    /// A message was stored durably under `queue_id` (the id in the `250` reply and in
    /// the file name). Called once per stored message, before the client sees the `250`.
    fn done(&self, _session: &SessionInfo, _envelope: &Envelope, _queue_id: &str) {}
    /// Whether [`data`](Hooks::data) wants the content. `false` (the default) lets the
    /// server stream a message to disk without holding it in memory.
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
    /// Only the hooks that want data see it; their headers are concatenated in order.
    fn data(&self, s: &SessionInfo, e: &Envelope, c: &[u8]) -> Result<Vec<Header>, Reply> {
        let mut all = Vec::new();
        for h in self.0.iter().filter(|h| h.wants_data()) {
            all.extend(h.data(s, e, c)?);
        }
        Ok(all)
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
