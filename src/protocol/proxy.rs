//! The HAProxy PROXY protocol, versions 1 and 2, as a pure parser (no I/O).
//!
//! A load balancer in front of the server opens each connection with one header that
//! names the real client (`server.proxy_protocol = true`). The reference is HAProxy's
//! `proxy-protocol.txt` (sections 2.1 and 2.2).
//!
//! [`parse`] takes the bytes received so far and says whether the header is complete,
//! needs more bytes, or is malformed. [`Parse::Need`] is a lower bound on the bytes that
//! still belong to the header, so a caller that reads at most that many bytes at a time
//! never takes bytes that follow the header (the client's first SMTP command): the
//! header can be read straight off the socket before the SMTP session owns it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest v1 header, CRLF included (proxy-protocol.txt §2.1).
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub const V1_MAX: usize = 107;
/// The first bytes of every v1 header.
pub(crate) const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The 12-byte signature that starts every v2 header (§2.2).
pub(crate) const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part of a v2 header: signature, version/command, family, length.
pub(crate) const V2_FIXED: usize = 16;

/// `PROXY UNKNOWN\r\n`: the shortest v1 header, shorter than any v2 header.
const V1_MIN: usize = 15;
/// `PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n`.
const V1_MIN_TCP4: usize = 32;
/// `PROXY TCP6 :: :: 0 0\r\n`.
const V1_MIN_TCP6: usize = 22;

/// The outcome of [`parse`] on the bytes received so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum Parse {
    /// The header is incomplete; at least this many more bytes belong to it (never 0).
    Need(usize),
    /// A whole, valid header of `consumed` bytes. `source` is the client it names;
    /// `None` when the header says to keep the socket's own peer (v1 `UNKNOWN`, v2
    /// `LOCAL`, v2 `UNSPEC` or `UNIX` families).
    Done {
        consumed: usize,
        source: Option<SocketAddr>,
    },
    /// Not a valid PROXY header: the connection must be closed.
    Error(ProxyError),
}

/// Why a header is not valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum ProxyError {
    /// Neither `PROXY ` (v1) nor the v2 signature: a client that did not come through
    /// the proxy.
    Signature,
    /// v1: no CRLF within [`V1_MAX`] bytes.
    V1TooLong,
    /// v1: not `PROXY <proto> <src> <dst> <sport> <dport>` with single spaces and one
    /// CRLF, or not ASCII.
    V1Syntax,
    /// v1: a protocol other than `TCP4`, `TCP6` or `UNKNOWN`.
    V1Protocol,
    /// v1: an address that is not a plain address of the protocol's family.
    V1Address,
    /// v1: a port that is not a decimal 0..=65535 without leading zeros.
    V1Port,
    /// v2: a version other than 2.
    V2Version,
    /// v2: a command other than `LOCAL` (0) or `PROXY` (1).
    V2Command,
    /// v2: an address family other than `UNSPEC`, `INET`, `INET6`, `UNIX`.
    V2Family,
    /// v2: a transport other than `STREAM` for a proxied address (this is a TCP server).
    V2Transport,
    /// v2: a length too short for the addresses of the family.
    V2Length,
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyError::Signature => "not a PROXY protocol header",
            ProxyError::V1TooLong => "PROXY v1 header longer than 107 bytes",
            ProxyError::V1Syntax => "malformed PROXY v1 header",
            ProxyError::V1Protocol => "unknown PROXY v1 protocol",
            ProxyError::V1Address => "bad address in PROXY v1 header",
            ProxyError::V1Port => "bad port in PROXY v1 header",
            ProxyError::V2Version => "unsupported PROXY v2 version",
            ProxyError::V2Command => "unknown PROXY v2 command",
            ProxyError::V2Family => "unknown PROXY v2 address family",
            ProxyError::V2Transport => "unsupported PROXY v2 transport",
            ProxyError::V2Length => "PROXY v2 length too short for its addresses",
        })
    }
}

impl std::error::Error for ProxyError {}

/// Parses a PROXY v1 or v2 header at the start of `buf` (the bytes received so far).
/// Bytes after the header are ignored and never needed: see [`Parse::Need`].
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub fn parse(buf: &[u8]) -> Parse {
    if buf.len() < V1_PREFIX.len() && V1_PREFIX.starts_with(buf) && !buf.is_empty() {
        return Parse::Need(V1_MIN - buf.len());
    }
    if buf.starts_with(V1_PREFIX) {
        return v1(buf);
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Parse::Error(ProxyError::Signature);
    }
    if buf.is_empty() {
        // Either version: the shorter minimum is safe for both.
        return Parse::Need(V1_MIN);
    }
    if buf.len() < V2_FIXED {
        return Parse::Need(V2_FIXED - buf.len());
    }
    v2(buf)
}

/// §2.1: `PROXY TCP4 192.0.2.1 198.51.100.1 56324 25\r\n`, at most 107 bytes.
fn v1(buf: &[u8]) -> Parse {
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        // A CR is only allowed as the last byte so far (the start of the CRLF).
        let last_cr = buf.last() == Some(&b'\r');
        if buf[..buf.len() - usize::from(last_cr)].contains(&b'\r') {
            return Parse::Error(ProxyError::V1Syntax);
        }
        let rest = &buf[V1_PREFIX.len()..];
        let min_total = if rest.starts_with(b"TCP4") {
            V1_MIN_TCP4
        } else if rest.starts_with(b"TCP6") {
            V1_MIN_TCP6
        } else {
            V1_MIN
        };
        let need = min_total
            .saturating_sub(buf.len())
            .max(if last_cr { 1 } else { 2 });
        if buf.len() + need > V1_MAX {
            return Parse::Error(ProxyError::V1TooLong);
        }
        return Parse::Need(need);
    };
    if lf + 1 > V1_MAX {
        return Parse::Error(ProxyError::V1TooLong);
    }
    if buf[lf - 1] != b'\r' {
        return Parse::Error(ProxyError::V1Syntax);
    }
    let line = &buf[V1_PREFIX.len()..lf - 1];
    match v1_fields(line) {
        Ok(source) => Parse::Done {
            consumed: lf + 1,
            source,
        },
        Err(e) => Parse::Error(e),
    }
}

/// The part of a v1 line after `PROXY ` and before CRLF.
fn v1_fields(line: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    if !line.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(ProxyError::V1Syntax);
    }
    // Printable ASCII, checked above.
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1Syntax)?;
    // "UNKNOWN" may be followed by anything up to the CRLF, which is ignored.
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return Ok(None);
    }
    let fields: Vec<&str> = line.split(' ').collect();
    let v6 = match fields[0] {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(ProxyError::V1Protocol),
    };
    let [_, src, dst, sport, dport] = fields[..] else {
        return Err(ProxyError::V1Syntax);
    };
    let src = v1_address(src, v6)?;
    v1_address(dst, v6)?;
    let sport = v1_port(sport)?;
    v1_port(dport)?;
    Ok(Some(SocketAddr::new(src, sport)))
}

fn v1_address(s: &str, v6: bool) -> Result<IpAddr, ProxyError> {
    let ip = if v6 {
        s.parse::<Ipv6Addr>().map(IpAddr::V6)
    } else {
        s.parse::<Ipv4Addr>().map(IpAddr::V4)
    };
    ip.map_err(|_| ProxyError::V1Address)
}

fn v1_port(s: &str) -> Result<u16, ProxyError> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return Err(ProxyError::V1Port);
    }
    s.parse().map_err(|_| ProxyError::V1Port)
}

/// §2.2: signature, version/command, family/transport, length, addresses, TLVs.
/// `buf` holds at least the 16 fixed bytes.
fn v2(buf: &[u8]) -> Parse {
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = V2_FIXED + len;
    if version != 2 {
        return Parse::Error(ProxyError::V2Version);
    }
    let local = match command {
        0 => true,
        1 => false,
        _ => return Parse::Error(ProxyError::V2Command),
    };
    // LOCAL (health checks, the proxy's own connections): "the receiver must accept
    // this connection as valid and must use the real connection endpoints and discard
    // the protocol block including the family which is ignored".
    let addr_len = if local {
        0
    } else {
        let addr_len = match family {
            0 => 0,   // UNSPEC: no address; keep the socket peer.
            1 => 12,  // INET: 4 + 4 + 2 + 2
            2 => 36,  // INET6: 16 + 16 + 2 + 2
            3 => 216, // UNIX: 108 + 108
            _ => return Parse::Error(ProxyError::V2Family),
        };
        let ok_transport = match family {
            0 => transport == 0,
            _ => transport == 1, // STREAM
        };
        if !ok_transport {
            return Parse::Error(ProxyError::V2Transport);
        }
        addr_len
    };
    if len < addr_len {
        return Parse::Error(ProxyError::V2Length);
    }
    if buf.len() < total {
        return Parse::Need(total - buf.len());
    }
    // TLVs (§2.2.7) may follow the addresses inside `len`; none of them matter here.
    let a = &buf[V2_FIXED..];
    let source = match (local, family) {
        (false, 1) => {
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
        }
        (false, 2) => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a[..16]);
            let ip = Ipv6Addr::from(octets);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        _ => None,
    };
    Parse::Done {
        consumed: total,
        source,
    }
}

/// Builds a v2 header (for clients, tests and tools): `PROXY` with the given
/// addresses (both of one family), or `LOCAL` when `addrs` is `None`; `tlvs` are
/// appended as they are.
#[cfg(any(test, feature = "testing"))]
pub fn v2_header(addrs: Option<(SocketAddr, SocketAddr)>, tlvs: &[u8]) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    let mut body = Vec::new();
    let (cmd, fam) = match addrs {
        None => (0x20, 0x00),
        Some((SocketAddr::V4(s), SocketAddr::V4(d))) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            body.extend_from_slice(&s.port().to_be_bytes());
            body.extend_from_slice(&d.port().to_be_bytes());
            (0x21, 0x11)
        }
        Some((s, d)) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            body.extend_from_slice(&v6(s).octets());
            body.extend_from_slice(&v6(d).octets());
            body.extend_from_slice(&s.port().to_be_bytes());
            body.extend_from_slice(&d.port().to_be_bytes());
            (0x21, 0x21)
        }
    };
    body.extend_from_slice(tlvs);
    h.push(cmd);
    h.push(fam);
    // A v2 body is at most 65535 bytes; callers pass small TLV blocks.
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&body);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Feeds `stream` the way the server reads a socket: at most `Need(n)` bytes at a
    /// time, in reads of at most `chunk` bytes. Returns the result and the bytes read.
    fn feed(stream: &[u8], chunk: usize) -> (Parse, usize) {
        let mut got = 0;
        loop {
            match parse(&stream[..got]) {
                Parse::Need(n) => {
                    assert!(n > 0);
                    let take = n.min(chunk).min(stream.len() - got);
                    if take == 0 {
                        return (Parse::Need(n), got);
                    }
                    got += take;
                }
                other => return (other, got),
            }
        }
    }

    /// A whole header followed by an SMTP command: parsed in every read size, the
    /// header is found and not one byte after it is read.
    fn assert_header(header: &[u8], source: Option<SocketAddr>) {
        let mut stream = header.to_vec();
        stream.extend_from_slice(b"EHLO client.test\r\n");
        for chunk in [1, 2, 3, 7, 16, 1000] {
            let (p, read) = feed(&stream, chunk);
            assert_eq!(
                p,
                Parse::Done {
                    consumed: header.len(),
                    source
                },
                "chunk {chunk}: {:?}",
                String::from_utf8_lossy(header)
            );
            assert_eq!(read, header.len(), "over-read with chunk {chunk}");
        }
        // The whole stream at once: the trailing command is ignored.
        assert_eq!(
            parse(&stream),
            Parse::Done {
                consumed: header.len(),
                source
            }
        );
    }

    fn assert_error(stream: &[u8], e: ProxyError) {
        for chunk in [1, 5, 1000] {
            let (p, _) = feed(stream, chunk);
            assert_eq!(
                p,
                Parse::Error(e),
                "chunk {chunk}: {:?}",
                String::from_utf8_lossy(stream)
            );
        }
    }

    /// A truncated header never completes: it asks for more, and never errs.
    fn assert_truncated(header: &[u8]) {
        for cut in 0..header.len() {
            match parse(&header[..cut]) {
                Parse::Need(n) => assert!(cut + n <= header.len(), "cut {cut} need {n}"),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn v1_tcp4() {
        assert_header(
            b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n",
            Some(sa("192.0.2.7:56324")),
        );
        assert_header(b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n", Some(sa("0.0.0.0:0")));
        assert_header(
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            Some(sa("255.255.255.255:65535")),
        );
    }

    #[test]
    fn v1_tcp6() {
        assert_header(
            b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 25\r\n",
            Some(sa("[2001:db8::1]:4000")),
        );
        assert_header(b"PROXY TCP6 :: :: 0 0\r\n", Some(sa("[::]:0")));
        let longest = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_header(
            longest,
            Some(sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535")),
        );
        // The spec's worst case is exactly 107 bytes and is accepted.
        let worst = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(worst.len(), V1_MAX);
        assert_header(worst, None);
        // An IPv4 address under TCP6 (and the reverse) is refused.
        assert_error(
            b"PROXY TCP6 192.0.2.1 192.0.2.2 1 2\r\n",
            ProxyError::V1Address,
        );
        assert_error(b"PROXY TCP4 ::1 ::1 1 2\r\n", ProxyError::V1Address);
    }

    #[test]
    fn v1_unknown_keeps_the_socket_peer() {
        assert_header(b"PROXY UNKNOWN\r\n", None);
        assert_header(b"PROXY UNKNOWN ffff:f::1 ffff:f::2 65535 65535\r\n", None);
    }

    #[test]
    fn v1_truncated_asks_for_more() {
        assert_truncated(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n");
        assert_truncated(b"PROXY TCP6 :: :: 0 0\r\n");
        assert_truncated(b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v1_too_long() {
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(200, b'x');
        assert_error(&long, ProxyError::V1TooLong);
        // 108 bytes including CRLF: one too many, even though complete.
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX - 1, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(line.len(), V1_MAX + 1);
        assert_eq!(parse(&line), Parse::Error(ProxyError::V1TooLong));
        // Exactly 107 is fine.
        line.truncate(V1_MAX - 2);
        line.extend_from_slice(b"\r\n");
        assert_header(&line, None);
    }

    #[test]
    fn v1_malformed_lines() {
        use ProxyError::*;
        let cases: &[(&[u8], ProxyError)] = &[
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", V1Syntax), // LF without CR
            (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", V1Syntax), // CR inside
            (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", V1Syntax), // double space
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", V1Syntax), // trailing space
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", V1Syntax), // missing port
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", V1Syntax), // extra field
            (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", V1Syntax), // tab
            (b"PROXY TCP4 1.2.3.\xc3\xa9 5.6.7.8 1 2\r\n", V1Syntax), // not ASCII
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", V1Protocol),
            (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", V1Protocol),
            (b"PROXY \r\n", V1Protocol),
            (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", V1Address),
            (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", V1Address),
            (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", V1Address),
            (b"PROXY TCP4 1.2.3.4 5.6.7 1 2\r\n", V1Address), // bad destination
            (b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", V1Address),
            (b"PROXY TCP6 [::1] ::2 1 2\r\n", V1Address),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", V1Port),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", V1Port),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", V1Port),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", V1Port),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", V1Port),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 0x19\r\n", V1Port),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", V1Port),
        ];
        for (line, e) in cases {
            assert_eq!(
                parse(line),
                Parse::Error(*e),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn wrong_signature_fails_at_the_first_wrong_byte() {
        // A client that did not come through the proxy: refused without waiting.
        assert_eq!(parse(b"E"), Parse::Error(ProxyError::Signature));
        assert_eq!(parse(b"EHLO x\r\n"), Parse::Error(ProxyError::Signature));
        assert_eq!(parse(b"PROXZ"), Parse::Error(ProxyError::Signature));
        assert_eq!(parse(b"proxy "), Parse::Error(ProxyError::Signature));
        assert_eq!(
            parse(b"\r\n\r\n\0\r\nQUIX"),
            Parse::Error(ProxyError::Signature)
        );
        assert_eq!(parse(b"\r\n\r\n\x01"), Parse::Error(ProxyError::Signature));
        // A TLS ClientHello (implicit TLS without the proxy).
        assert_eq!(
            parse(&[0x16, 0x03, 0x01]),
            Parse::Error(ProxyError::Signature)
        );
        // Nothing yet: wait.
        assert_eq!(parse(b""), Parse::Need(V1_MIN));
        assert_eq!(parse(b"PRO"), Parse::Need(V1_MIN - 3));
        assert_eq!(parse(b"\r\n"), Parse::Need(V2_FIXED - 2));
    }

    fn v2_raw(ver_cmd: u8, fam: u8, len: u16, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[ver_cmd, fam]);
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v2_inet_and_inet6() {
        let h = v2_header(Some((sa("192.0.2.7:40000"), sa("127.0.0.1:25"))), &[]);
        assert_eq!(h.len(), 16 + 12);
        assert_header(&h, Some(sa("192.0.2.7:40000")));
        let h = v2_header(Some((sa("[2001:db8::7]:1234"), sa("[::1]:25"))), &[]);
        assert_eq!(h.len(), 16 + 36);
        assert_header(&h, Some(sa("[2001:db8::7]:1234")));
    }

    #[test]
    fn v2_with_tlvs() {
        // PP2_TYPE_ALPN "smtp" and PP2_TYPE_AUTHORITY "mx.test", as HAProxy appends them.
        let mut tlvs = vec![0x01, 0x00, 0x04];
        tlvs.extend_from_slice(b"smtp");
        tlvs.extend_from_slice(&[0x02, 0x00, 0x07]);
        tlvs.extend_from_slice(b"mx.test");
        let h = v2_header(Some((sa("192.0.2.7:40000"), sa("127.0.0.1:25"))), &tlvs);
        assert_eq!(h.len(), 16 + 12 + tlvs.len());
        assert_header(&h, Some(sa("192.0.2.7:40000")));
        assert_truncated(&h);
    }

    #[test]
    fn v2_local_keeps_the_socket_peer() {
        let h = v2_header(None, &[]);
        assert_eq!(h.len(), 16);
        assert_header(&h, None);
        // LOCAL ignores the family and any address block (health checks).
        let h = v2_raw(0x20, 0x11, 12, &[9; 12]);
        assert_header(&h, None);
        let h = v2_raw(0x20, 0xff, 3, &[1, 2, 3]);
        assert_header(&h, None);
    }

    #[test]
    fn v2_unspec_and_unix_keep_the_socket_peer() {
        assert_header(&v2_raw(0x21, 0x00, 0, &[]), None);
        // UNSPEC with a TLV block.
        assert_header(&v2_raw(0x21, 0x00, 4, &[0x04, 0x00, 0x01, 0x00]), None);
        assert_header(&v2_raw(0x21, 0x31, 216, &[0; 216]), None);
    }

    #[test]
    fn v2_truncated_asks_for_more() {
        let h = v2_header(Some((sa("192.0.2.7:40000"), sa("127.0.0.1:25"))), &[]);
        assert_truncated(&h);
        let h = v2_header(Some((sa("[2001:db8::7]:1234"), sa("[::1]:25"))), &[]);
        assert_truncated(&h);
        assert_truncated(&v2_header(None, &[]));
    }

    #[test]
    fn v2_malformed() {
        use ProxyError::*;
        let body = [0u8; 36];
        let cases: Vec<(Vec<u8>, ProxyError)> = vec![
            (v2_raw(0x11, 0x11, 12, &body[..12]), V2Version),
            (v2_raw(0x31, 0x11, 12, &body[..12]), V2Version),
            (v2_raw(0x01, 0x11, 12, &body[..12]), V2Version),
            (v2_raw(0x22, 0x11, 12, &body[..12]), V2Command),
            (v2_raw(0x2f, 0x11, 12, &body[..12]), V2Command),
            (v2_raw(0x21, 0x41, 12, &body[..12]), V2Family),
            (v2_raw(0x21, 0xf1, 12, &body[..12]), V2Family),
            (v2_raw(0x21, 0x12, 12, &body[..12]), V2Transport), // INET over DGRAM
            (v2_raw(0x21, 0x10, 12, &body[..12]), V2Transport), // INET, UNSPEC transport
            (v2_raw(0x21, 0x13, 12, &body[..12]), V2Transport), // unknown transport
            (v2_raw(0x21, 0x22, 36, &body), V2Transport),       // INET6 over DGRAM
            (v2_raw(0x21, 0x32, 216, &[0; 216]), V2Transport),  // UNIX DGRAM
            (v2_raw(0x21, 0x01, 0, &[]), V2Transport),          // UNSPEC family + STREAM
            (v2_raw(0x21, 0x11, 11, &body[..11]), V2Length),    // INET needs 12
            (v2_raw(0x21, 0x11, 0, &[]), V2Length),
            (v2_raw(0x21, 0x21, 12, &body[..12]), V2Length), // INET6 needs 36
            (v2_raw(0x21, 0x31, 108, &[0; 108]), V2Length),  // UNIX needs 216
        ];
        for (h, e) in cases {
            // The fixed 16 bytes are enough to refuse: no wait for the body.
            assert_eq!(parse(&h[..16]), Parse::Error(e), "{h:02x?}");
            assert_error(&h, e);
        }
    }

    #[test]
    fn v2_length_bounds_the_read() {
        // A large declared length asks for exactly that many bytes, no more.
        let h = v2_raw(0x21, 0x11, 65535, &[]);
        assert_eq!(parse(&h), Parse::Need(65535));
        let mut full = h.clone();
        full.resize(16 + 65535, 0);
        assert!(matches!(
            parse(&full),
            Parse::Done {
                consumed: 65551,
                ..
            }
        ));
    }

    proptest! {
        /// Arbitrary bytes never panic, `Need` is never 0, `Done` never claims more
        /// than it was given, and a header is never longer than its version allows.
        #[test]
        fn arbitrary_input_is_safe(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            match parse(&bytes) {
                Parse::Need(n) => prop_assert!(n > 0),
                Parse::Done { consumed, .. } => {
                    prop_assert!(consumed <= bytes.len());
                    if bytes.starts_with(V1_PREFIX) {
                        prop_assert!(consumed <= V1_MAX);
                    }
                }
                Parse::Error(_) => {}
            }
        }

        /// Random v1-looking lines behave the same.
        #[test]
        fn arbitrary_v1_lines_are_safe(tail in "[ -~\r\n]{0,120}") {
            let mut line = V1_PREFIX.to_vec();
            line.extend_from_slice(tail.as_bytes());
            match parse(&line) {
                Parse::Need(n) => prop_assert!(n > 0 && line.len() + n <= V1_MAX),
                Parse::Done { consumed, .. } => prop_assert!(consumed <= V1_MAX),
                Parse::Error(_) => {}
            }
        }
    }
}
