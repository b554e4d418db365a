//! Test scaffolding for this crate's own tests and fuzz targets, behind the `testing`
//! feature; not a supported API.
//!
//! [`Mem`] runs one whole session in memory: a scripted client ([`MemoryTransport`]),
//! a Vec-backed store ([`MemoryStore`], which can fail on demand), no sockets, threads
//! or files, so property tests and fuzzers can afford thousands of sessions.
//!
//! ```
//! use mailer::testing::Mem;
//! let run = Mem::default().run(b"EHLO c\r\nQUIT\r\n");
//! assert_eq!(run.codes(), [220, 250, 221]);
//! ```
//!
//! With the feature on, the internal modules (`session`, `connection`, `spool`, the
//! protocol parsers, …) are public at their usual paths, hidden from the docs.

mod store;
mod transport;

pub use crate::spool::{Faults, Op};
pub use store::{Fail, MemoryStore};
pub use transport::{FakeTls, MemoryTransport, Reads, Rng};

use crate::auth::Authenticator;
use crate::client::{parse_reply, read_reply, ServerReply};
use crate::connection::{Connection, End, Forever, WireLimits};
use crate::hooks::{Hooks, NoHooks, SessionInfo, TlsInfo};
use crate::protocol::data::BareLf;
use crate::session::{AuthSettings, Session, Settings};
use std::io::{self, BufRead, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Reads one reply from a live connection with the client's parser, insisting that
/// every line ends in CRLF, as a server must send it (RFC 5321 §2.3.8). Returns the
/// reply and its wire text, CRLFs included.
///
/// # Errors
/// The reader's errors; `UnexpectedEof` (naming what arrived) when the stream ends
/// inside the reply; `InvalidData` for a line without CRLF or a malformed reply.
pub fn read_wire_reply<R: BufRead>(r: &mut R) -> io::Result<(ServerReply, String)> {
    let mut wire = Vec::new();
    loop {
        let limit = (crate::client::reply::MAX_LINE + 1) as u64;
        let n = Read::take(&mut *r, limit).read_until(b'\n', &mut wire)?;
        let text = || String::from_utf8_lossy(&wire).into_owned();
        if n == 0 {
            let got = text();
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the connection closed while waiting for a reply; got {got:?}"),
            ));
        }
        if !wire.ends_with(b"\r\n") {
            let got = text();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply line without CRLF: {got:?}"),
            ));
        }
        match parse_reply(&wire) {
            Ok(Some((reply, _))) => return Ok((reply, text())),
            Ok(None) => {}
            Err(e) => {
                let got = text();
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{e}: {got:?}"),
                ));
            }
        }
    }
}

/// CRLF-normalises content as the client side does before sending: a bare LF becomes
/// CRLF, and a non-empty text that does not end in LF gets a final CRLF (the oracle
/// the property tests and fuzz targets compare stored messages with).
pub fn normalise(content: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(content.len() + 8);
    let mut prev = 0u8;
    for &b in content {
        if b == b'\n' && prev != b'\r' {
            v.push(b'\r');
        }
        v.push(b);
        prev = b;
    }
    if !v.is_empty() && !v.ends_with(b"\n") {
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// An authenticator with one user and password, compared in the clear (no argon2 cost).
pub struct OneUser(pub &'static str, pub &'static str);

impl Authenticator for OneUser {
    fn verify(&self, user: &str, password: &[u8]) -> bool {
        user == self.0 && password == self.1.as_bytes()
    }
}

/// One in-memory session's settings; the fields mirror the config keys.
pub struct Mem {
    /// `server.hostname`.
    pub hostname: String,
    /// `limits.max_message_size`.
    pub max_message_size: u64,
    /// `limits.max_recipients`.
    pub max_recipients: usize,
    /// `limits.max_errors`.
    pub max_errors: u32,
    /// `limits.max_line_length`.
    pub max_line_length: usize,
    /// `limits.bare_lf`.
    pub bare_lf: BareLf,
    /// The embedder's hooks.
    pub hooks: Arc<dyn Hooks>,
    /// Read sizes the client's bytes arrive in (cycled); empty: all at once. Ignored
    /// when `random_reads` is set.
    pub segments: Vec<usize>,
    /// Read sizes drawn from `1..=max` with this seed: `(seed, max)`.
    pub random_reads: Option<(u64, usize)>,
    /// The client's address.
    pub peer: SocketAddr,
    /// TLS already active from the first byte (implicit TLS).
    pub tls: Option<TlsInfo>,
    /// STARTTLS is offered, and what its handshake does.
    pub starttls: Option<FakeTls>,
    /// Where the store fails.
    pub fail: Fail,
    /// `[auth]` with `allow_plaintext = true` and this authenticator.
    pub auth: Option<Arc<dyn Authenticator>>,
}

impl Default for Mem {
    fn default() -> Mem {
        Mem {
            hostname: "mx.test".into(),
            max_message_size: 26_214_400,
            max_recipients: 100,
            max_errors: 10,
            max_line_length: 1000,
            bare_lf: BareLf::Normalize,
            hooks: Arc::new(NoHooks),
            segments: Vec::new(),
            random_reads: None,
            peer: SocketAddr::from((Ipv4Addr::LOCALHOST, 40000)),
            tls: None,
            starttls: None,
            fail: Fail::Never,
            auth: None,
        }
    }
}

/// What one in-memory session did.
pub struct MemRun {
    /// Every byte the server wrote.
    pub output: Vec<u8>,
    /// How the session ended.
    pub end: End,
    /// Committed messages (queue id, bytes including the trace headers).
    pub stored: Vec<(String, Vec<u8>)>,
    /// Writers left neither committed nor discarded (must be 0).
    pub open_writers: usize,
    /// Input offset and output length at each STARTTLS handshake.
    pub handshakes: Vec<(usize, usize)>,
}

impl MemRun {
    /// The replies as (code, wire text of the whole reply, CRLFs included).
    ///
    /// # Panics
    /// If the output is not a sequence of well-formed replies (RFC 5321 §4.2).
    pub fn replies(&self) -> Vec<(u16, String)> {
        let mut rest = &self.output[..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            match parse_reply(rest) {
                Ok(Some((r, n))) => {
                    out.push((r.code, String::from_utf8_lossy(&rest[..n]).into_owned()));
                    rest = &rest[n..];
                }
                Ok(None) => panic!("server output ends inside a reply: {:?}", self.output),
                Err(e) => panic!("malformed server output ({e}): {:?}", self.output),
            }
        }
        out
    }

    /// The replies' codes in order.
    pub fn codes(&self) -> Vec<u16> {
        self.parsed().into_iter().map(|r| r.code).collect()
    }

    /// The replies, read with the client's parser.
    ///
    /// # Panics
    /// If the output is not a sequence of well-formed replies.
    pub fn parsed(&self) -> Vec<ServerReply> {
        let mut rest = &self.output[..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            match read_reply(&mut rest) {
                Ok(r) => out.push(r),
                Err(e) => panic!("malformed server output ({e}): {:?}", self.output),
            }
        }
        out
    }
}

impl Mem {
    /// Runs one session over `input` to its end.
    pub fn run(&self, input: &[u8]) -> MemRun {
        let store = MemoryStore::failing(self.fail);
        let settings = Arc::new(Settings {
            hostname: self.hostname.clone(),
            max_message_size: self.max_message_size,
            bare_lf: self.bare_lf,
            max_recipients: self.max_recipients,
            max_errors: self.max_errors,
            tls_available: self.starttls.is_some(),
            require_tls: false,
            auth: self.auth.as_ref().map(|a| AuthSettings {
                allow_plaintext: true,
                authenticator: Arc::clone(a),
            }),
        });
        let info = SessionInfo {
            tls: self.tls.clone(),
            ..SessionInfo::new(1, self.peer, SocketAddr::from((Ipv4Addr::LOCALHOST, 25)))
        };
        let session = Session::new(settings, Arc::clone(&self.hooks), info);
        let limits = WireLimits {
            max_line_length: self.max_line_length,
            command_timeout: Duration::from_secs(5),
            data_timeout: Duration::from_secs(5),
            min_data_rate: 0,
        };
        let mut io = match self.random_reads {
            Some((seed, max)) => MemoryTransport::with_reads(
                input,
                Reads::Random {
                    rng: Rng::new(seed),
                    max,
                },
            ),
            None => MemoryTransport::new(input, &self.segments),
        };
        if let Some(tls) = self.starttls {
            io = io.fake_tls(tls);
        }
        let mut conn = Connection::new(io, session, &store, &Forever, limits);
        let end = conn.run();
        let io = conn.into_transport();
        MemRun {
            output: io.output,
            end,
            stored: store.committed(),
            open_writers: store.open_writers(),
            handshakes: io.handshakes,
        }
    }
}
