//! Server-side event hooks (SPEC 7): plain blocking calls that may refuse with a reply.
//!
//! The binary's own `[policy]` is the [`Policy`] hook; embedders compose theirs with it
//! through [`Chain`] (first refusal wins).

use crate::protocol::address::{Address, ReversePath};
use crate::protocol::command::MailParams;
use crate::protocol::reply::{Enhanced, Reply};
use std::net::SocketAddr;
use std::sync::Arc;

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
    pub tls: Option<TlsInfo>,
    pub auth_user: Option<String>,
    /// The HELO/EHLO name, once given.
    pub helo: Option<String>,
}

/// The envelope of one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub from: ReversePath,
    pub params: MailParams,
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
    /// The connection broke (reset, TLS error).
    Io(String),
}

/// Per-event callbacks. Every method has a default that accepts, so an implementation
/// overrides only what it cares about. A refusal must be a 4xx or 5xx reply; anything
/// else is turned into `451 4.3.0` by the session.
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
    /// The whole message content (as it will be stored, after the trace headers) before
    /// it is made durable. Refusing discards it.
    fn data(
        &self,
        _session: &SessionInfo,
        _envelope: &Envelope,
        _content: &[u8],
    ) -> Result<(), Reply> {
        Ok(())
    }
    /// Something went wrong in the session.
    fn error(&self, _session: &SessionInfo, _error: &SessionError) {}
    /// A message was stored durably under `queue_id`.
    fn done(&self, _session: &SessionInfo, _envelope: &Envelope, _queue_id: &str) {}
    /// Whether [`data`](Hooks::data) wants the content. `false` (the default) lets the
    /// server stream a message to disk without holding it in memory.
    fn wants_data(&self) -> bool {
        false
    }
}

/// Accepts everything.
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
    fn data(&self, s: &SessionInfo, e: &Envelope, c: &[u8]) -> Result<(), Reply> {
        self.0.iter().try_for_each(|h| h.data(s, e, c))
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
