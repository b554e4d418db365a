//! Reading the PROXY protocol header off a fresh socket (the parser is
//! [`crate::protocol::proxy`]).

use crate::protocol::proxy::{self, Parse};
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The longest wait for a PROXY header (shorter when `command_timeout_secs` is).
pub(super) const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads a PROXY header (v1 or v2) off the socket, never more bytes than the header
/// has, so the session that follows sees the client's first byte. `Ok(None)`: the
/// header says to keep the socket peer (v2 LOCAL, v1 UNKNOWN).
pub(super) fn read_proxy_header(
    mut tcp: &TcpStream,
    timeout: Duration,
) -> io::Result<Option<SocketAddr>> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(proxy::V1_MAX + 1);
    loop {
        let need = match proxy::parse(&buf) {
            Parse::Done { consumed, source } if consumed == buf.len() => return Ok(source),
            Parse::Done { .. } => {
                // The parser promises exact reads; never hand on a stream that lost bytes.
                return Err(io::Error::other("PROXY header over-read"));
            }
            Parse::Error(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            Parse::Need(n) => n,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no complete PROXY header within {timeout:?}"),
            ));
        }
        tcp.set_read_timeout(Some(left))?;
        let old = buf.len();
        buf.resize(old + need, 0);
        match tcp.read(&mut buf[old..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed after {old} byte(s) of a PROXY header"),
                ))
            }
            Ok(n) => buf.truncate(old + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(old),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                buf.truncate(old);
            }
            Err(e) => return Err(e),
        }
    }
}
