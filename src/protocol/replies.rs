//! The catalogue of the replies the server sends on its own: every fixed reply as a
//! constant, every reply with a variable part (the hostname, a queue id, a size) as a
//! constructor. Sessions and the acceptor build their replies here and nowhere else,
//! so the whole table (code, RFC 3463 enhanced code, text) can be read in one place;
//! `docs/` describes the situations. Replies a hook or a milter chooses are theirs.

use super::reply::{Enhanced, Reply};

/// A reply fixed at compile time (a [`Reply`] owns its text, so it cannot be a
/// constant itself): turn it into one with [`Canned::reply`] or `Reply::from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Canned {
    /// The three-digit reply code (RFC 5321 §4.2).
    pub(crate) code: u16,
    /// The enhanced status code (RFC 3463).
    pub(crate) enhanced: Enhanced,
    /// The text after the codes.
    pub(crate) text: &'static str,
}

impl Canned {
    const fn new(code: u16, enhanced: Enhanced, text: &'static str) -> Canned {
        Canned {
            code,
            enhanced,
            text,
        }
    }

    /// The reply to send.
    pub(crate) fn reply(self) -> Reply {
        Reply::new(self.code, self.enhanced, self.text)
    }
}

impl From<Canned> for Reply {
    fn from(c: Canned) -> Reply {
        c.reply()
    }
}

// Successes.

/// RSET, NOOP, HELO's transaction reset.
pub(crate) const OK: Canned = Canned::new(250, Enhanced(2, 0, 0), "Ok");
/// MAIL accepted (RFC 3463: 2.1.0, originator address valid).
pub(crate) const MAIL_OK: Canned = Canned::new(250, Enhanced(2, 1, 0), "Ok");
/// RCPT accepted (2.1.5, destination address valid).
pub(crate) const RCPT_OK: Canned = Canned::new(250, Enhanced(2, 1, 5), "Ok");
/// QUIT.
pub(crate) const BYE: Canned = Canned::new(221, Enhanced(2, 0, 0), "Bye");
/// VRFY is never answered with a mailbox (RFC 5321 §3.5.3 allows 252).
pub(crate) const CANNOT_VRFY: Canned = Canned::new(
    252,
    Enhanced(2, 5, 0),
    "Cannot VRFY user, but will accept message and attempt delivery",
);
/// STARTTLS accepted: the handshake follows (RFC 3207 §4).
pub(crate) const READY_FOR_TLS: Canned = Canned::new(220, Enhanced(2, 0, 0), "Ready to start TLS");
/// AUTH succeeded (RFC 4954 §6).
pub(crate) const AUTH_OK: Canned = Canned::new(235, Enhanced(2, 7, 0), "Authentication successful");

// Refusals of one command; the session goes on.

/// EXPN.
pub(crate) const NOT_IMPLEMENTED: Canned =
    Canned::new(502, Enhanced(5, 5, 1), "Error: command not implemented");
/// A command line over `max_line_length` (discarded).
pub(crate) const LINE_TOO_LONG: Canned =
    Canned::new(500, Enhanced(5, 5, 6), "Error: line too long");
/// STARTTLS without a certificate configured.
pub(crate) const TLS_NOT_AVAILABLE: Canned =
    Canned::new(454, Enhanced(4, 7, 0), "TLS not available");
/// MAIL or AUTH before STARTTLS with `require_tls`.
pub(crate) const MUST_STARTTLS: Canned = Canned::new(
    530,
    Enhanced(5, 7, 0),
    "Must issue a STARTTLS command first",
);
/// MAIL's declared SIZE over the limit (RFC 1870 §6.1).
pub(crate) const SIZE_OVER_LIMIT: Canned =
    Canned::new(552, Enhanced(5, 3, 4), "Message size exceeds fixed limit");
/// A UTF-8 address without MAIL's SMTPUTF8 parameter (RFC 6531 §3.7.4.1).
pub(crate) const SMTPUTF8_REQUIRED: Canned = Canned::new(
    553,
    Enhanced(5, 6, 7),
    "Must declare SMTPUTF8 to send UTF8 addresses",
);
/// RCPT past `max_recipients` (RFC 5321 §4.5.3.1.10: 452, the client may retry later).
pub(crate) const TOO_MANY_RECIPIENTS: Canned =
    Canned::new(452, Enhanced(4, 5, 3), "Error: too many recipients");
/// Message content over the size limit, at its end or at a BDAT chunk.
pub(crate) const MESSAGE_TOO_BIG: Canned =
    Canned::new(552, Enhanced(5, 3, 4), "Error: message file too big");
/// A bare LF in content with `bare_lf = "reject"`.
pub(crate) const BARE_LF: Canned = Canned::new(550, Enhanced(5, 5, 2), "Error: bare <LF> received");
/// The spool's disk is full: not stored.
pub(crate) const INSUFFICIENT_STORAGE: Canned =
    Canned::new(452, Enhanced(4, 3, 1), "Error: insufficient system storage");
/// Any other storage failure: not stored.
pub(crate) const WRITE_ERROR: Canned =
    Canned::new(451, Enhanced(4, 3, 0), "Error: queue file write error");
/// A hook that failed or misbehaved: try again later.
pub(crate) const INTERNAL_ERROR: Canned =
    Canned::new(451, Enhanced(4, 3, 0), "Error: internal error");
/// AUTH over plaintext without `allow_plaintext` (RFC 4954 §6).
pub(crate) const ENCRYPTION_REQUIRED: Canned = Canned::new(
    538,
    Enhanced(5, 7, 11),
    "Encryption required for requested authentication mechanism",
);
/// The client cancelled AUTH with `*` (RFC 4954 §4).
pub(crate) const AUTH_ABORTED: Canned =
    Canned::new(501, Enhanced(5, 7, 0), "Authentication aborted");
/// An AUTH response that is not base64 or not the mechanism's shape.
pub(crate) const AUTH_UNDECODABLE: Canned =
    Canned::new(501, Enhanced(5, 5, 2), "Cannot decode response");
/// An AUTH mechanism other than PLAIN and LOGIN.
pub(crate) const AUTH_UNKNOWN_MECHANISM: Canned = Canned::new(
    504,
    Enhanced(5, 5, 4),
    "Unsupported authentication mechanism",
);
/// Wrong user name or password (RFC 4954 §6).
pub(crate) const AUTH_FAILED: Canned =
    Canned::new(535, Enhanced(5, 7, 8), "Authentication credentials invalid");

// Replies with a variable part.

/// The greeting (no enhanced code: RFC 2034 §3 gives none before EHLO).
pub(crate) fn greeting(hostname: &str) -> Reply {
    Reply::plain(220, format!("{hostname} ESMTP"))
}

/// The 354 reply to DATA (RFC 5321 §4.1.1.4).
pub(crate) fn data_prompt() -> Reply {
    Reply::plain(354, "End data with <CR><LF>.<CR><LF>")
}

/// One AUTH challenge (already base64, RFC 4954 §4).
pub(crate) fn challenge(base64: &str) -> Reply {
    Reply::plain(334, base64)
}

/// A command out of order (RFC 5321 §4.1.4); `what` says which order was broken.
pub(crate) fn bad_sequence(what: &str) -> Reply {
    Reply::new(503, Enhanced(5, 5, 1), format!("Error: {what}"))
}

/// A message stored (or discarded on a hook's word) under `queue_id`.
pub(crate) fn queued(queue_id: &str) -> Reply {
    Reply::new(250, Enhanced(2, 0, 0), format!("Ok: queued as {queue_id}"))
}

/// A BDAT chunk other than the last one, appended (RFC 3030 §2).
pub(crate) fn chunk_received(size: u64) -> Reply {
    Reply::new(250, Enhanced(2, 0, 0), format!("{size} octets received"))
}

/// HELP: the commands `cmds` this server implements as configured.
pub(crate) fn help(cmds: &str) -> Reply {
    Reply::new(
        214,
        Enhanced(2, 0, 0),
        format!("Commands: {cmds}\nSee RFC 5321 and RFC 3030"),
    )
}

// Closing replies: 421 names the host (RFC 5321 §3.8) and the connection ends.

/// `max_errors` reached.
pub(crate) fn too_many_errors(hostname: &str) -> Reply {
    Reply::new(
        421,
        Enhanced(4, 7, 0),
        format!("{hostname} Error: too many errors"),
    )
}

/// A command or data deadline passed, or the transfer was too slow.
pub(crate) fn timeout(hostname: &str) -> Reply {
    Reply::new(
        421,
        Enhanced(4, 4, 2),
        format!("{hostname} Error: timeout exceeded"),
    )
}

/// The session outlived `session_timeout_secs`.
pub(crate) fn lifetime_exceeded(hostname: &str) -> Reply {
    Reply::new(
        421,
        Enhanced(4, 4, 2),
        format!("{hostname} Error: session lifetime exceeded"),
    )
}

/// The session waited longest for a command while every worker was busy: its
/// worker goes to a new client.
pub(crate) fn evicted(hostname: &str) -> Reply {
    Reply::new(
        421,
        Enhanced(4, 4, 2),
        format!("{hostname} Error: timeout exceeded, server busy"),
    )
}

/// The server is stopping.
pub(crate) fn shutting_down(hostname: &str) -> Reply {
    Reply::new(
        421,
        Enhanced(4, 3, 2),
        format!("{hostname} Service shutting down, closing transmission channel"),
    )
}

/// A hook panicked: the session cannot go on safely.
pub(crate) fn hook_panicked(hostname: &str) -> Reply {
    Reply::new(
        421,
        Enhanced(4, 3, 0),
        format!("{hostname} Error: internal error, closing connection"),
    )
}

/// The client used up its failed AUTH attempts (`auth.rate_limit`).
pub(crate) fn auth_rate_exceeded(hostname: &str) -> Reply {
    Reply::new(
        421,
        Enhanced(4, 7, 0),
        format!("{hostname} Error: too many failed authentications, try again later"),
    )
}

/// A connection refused before its greeting (per-IP limit, every worker busy);
/// `why` is the text after the hostname.
pub(crate) fn refused(hostname: &str, why: &str) -> Reply {
    Reply::new(421, Enhanced(4, 7, 0), format!("{hostname} {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canned_and_built_replies_have_their_wire_form() {
        assert_eq!(
            Reply::from(TOO_MANY_RECIPIENTS).to_bytes(),
            b"452 4.5.3 Error: too many recipients\r\n"
        );
        assert_eq!(
            bad_sequence("need MAIL command").to_bytes(),
            b"503 5.5.1 Error: need MAIL command\r\n"
        );
        assert_eq!(greeting("mx.test").to_bytes(), b"220 mx.test ESMTP\r\n");
        assert_eq!(
            help("HELO").to_bytes(),
            b"214-2.0.0 Commands: HELO\r\n214 2.0.0 See RFC 5321 and RFC 3030\r\n"
        );
    }
}
