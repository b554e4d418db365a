//! The one stream type both sides run over: TCP in clear text that may become TLS
//! (STARTTLS, RFC 3207; implicit TLS, RFC 8314), for the server's sessions and for the
//! client (`mailer send`) alike. Only how the rustls connection is made differs
//! ([`Upgrade`]); the handshake deadline and the closing `close_notify` are shared, so
//! the two sides cannot drift apart.

use crate::connection::Transport;
use crate::hooks::TlsInfo;
use rustls::{ConnectionCommon, SideData, StreamOwned};
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

/// What turns a clear-text socket into a rustls connection: the server's
/// configuration, or the client's configuration and server name.
pub(crate) trait Upgrade {
    /// `ServerConnection` or `ClientConnection`.
    type Conn: Deref<Target = ConnectionCommon<Self::Side>> + DerefMut;
    /// rustls' marker for the side.
    type Side: SideData;
    /// A fresh connection for this socket (the client names the server by its address
    /// when the job has no name).
    fn connection(self, tcp: &TcpStream) -> io::Result<Self::Conn>;
}

/// A connection's stream: clear text (with what it takes to upgrade, if TLS is
/// available), TLS, or broken by a failed upgrade.
pub(crate) enum Stream<U: Upgrade> {
    /// Clear text; `tls` is `None` where TLS is not offered.
    Plain {
        /// The socket.
        tcp: TcpStream,
        /// How to start TLS on it.
        tls: Option<U>,
    },
    /// After a handshake.
    Tls(Box<TlsStream<U::Conn, U::Side>>),
    /// Only during an upgrade, or after a failed one.
    Broken,
}

fn broken() -> io::Error {
    io::Error::new(
        ErrorKind::NotConnected,
        "connection closed after a failed TLS handshake",
    )
}

impl<U: Upgrade> Stream<U> {
    /// A clear-text stream that can be upgraded with `upgrade`.
    pub(crate) fn plain(tcp: TcpStream, tls: Option<U>) -> Self {
        Stream::Plain { tcp, tls }
    }

    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain { tcp, .. } => Some(tcp),
            Stream::Tls(s) => Some(&s.0.sock),
            Stream::Broken => None,
        }
    }

    /// Runs the TLS handshake in place, bounded as a whole by `budget` (not per
    /// read: a peer that trickles bytes cannot stretch it; SPEC invariant 4).
    /// `Unsupported` when the stream cannot be upgraded (already TLS, or no TLS set up).
    pub(crate) fn handshake(&mut self, budget: Duration) -> io::Result<TlsInfo> {
        let (tcp, upgrade) = match std::mem::replace(self, Stream::Broken) {
            Stream::Plain { tcp, tls: Some(u) } => (tcp, u),
            other => {
                *self = other;
                return Err(io::Error::new(ErrorKind::Unsupported, "TLS not available"));
            }
        };
        let conn = upgrade.connection(&tcp)?;
        let mut s = StreamOwned::new(conn, tcp);
        let deadline = Instant::now() + budget;
        while s.conn.is_handshaking() {
            let mut sock = Deadline {
                tcp: &mut s.sock,
                deadline,
            };
            match s.conn.complete_io(&mut sock) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return Err(io::Error::new(ErrorKind::TimedOut, e))
                }
                Err(e) => return Err(e),
            }
        }
        let info = TlsInfo {
            version: s
                .conn
                .protocol_version()
                .map_or_else(|| "unknown".into(), |v| format!("{v:?}")),
            cipher: s
                .conn
                .negotiated_cipher_suite()
                .map_or_else(|| "unknown".into(), |c| format!("{:?}", c.suite())),
        };
        *self = Stream::Tls(Box::new(TlsStream(s)));
        Ok(info)
    }
}

impl<U: Upgrade> Read for Stream<U> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain { tcp, .. } => tcp.read(buf),
            Stream::Tls(s) => s.0.read(buf),
            Stream::Broken => Err(broken()),
        }
    }
}

impl<U: Upgrade> Write for Stream<U> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain { tcp, .. } => tcp.write(buf),
            Stream::Tls(s) => s.0.write(buf),
            Stream::Broken => Err(broken()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain { tcp, .. } => tcp.flush(),
            Stream::Tls(s) => s.0.flush(),
            Stream::Broken => Err(broken()),
        }
    }
}

impl<U: Upgrade> Transport for Stream<U> {
    fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.tcp().ok_or_else(broken)?.set_read_timeout(t)
    }

    fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.tcp().ok_or_else(broken)?.set_write_timeout(t)
    }

    /// The budget is the read timeout set last (the command timeout).
    fn start_tls(&mut self) -> io::Result<TlsInfo> {
        let budget = match self.tcp() {
            Some(tcp) => tcp.read_timeout()?.unwrap_or(HANDSHAKE_DEFAULT),
            None => HANDSHAKE_DEFAULT,
        };
        self.handshake(budget)
    }
}

/// The handshake bound when the socket has no read timeout set.
const HANDSHAKE_DEFAULT: Duration = Duration::from_secs(300);

/// The socket during a handshake: each read may only wait for the time left until
/// `deadline`, so the handshake as a whole ends by then.
struct Deadline<'a> {
    tcp: &'a mut TcpStream,
    deadline: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                ErrorKind::TimedOut,
                "TLS handshake timed out",
            ));
        }
        self.tcp.set_read_timeout(Some(left))?;
        self.tcp.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// How long the closing `close_notify` may wait for a peer that does not read: it is
/// a courtesy, not worth holding a worker (or the client's exit) for.
const CLOSE_NOTIFY_WAIT: Duration = Duration::from_secs(1);

/// A TLS stream that sends close_notify when dropped (RFC 8446 §6.1: each side must
/// send it before closing its write side), so the peer can tell a clean end from a
/// truncation attack.
pub(crate) struct TlsStream<C: Deref<Target = ConnectionCommon<S>> + DerefMut, S: SideData>(
    StreamOwned<C, TcpStream>,
);

impl<C: Deref<Target = ConnectionCommon<S>> + DerefMut, S: SideData> Drop for TlsStream<C, S> {
    fn drop(&mut self) {
        let s = &mut self.0;
        s.conn.send_close_notify();
        let _ = s.sock.set_write_timeout(Some(CLOSE_NOTIFY_WAIT));
        while s.conn.wants_write() {
            if s.conn.write_tls(&mut s.sock).is_err() {
                break;
            }
        }
    }
}
