//! The Sendmail milter protocol (version 6), MTA side, as pure functions: an encoder for
//! the commands an MTA sends and a decoder for the replies a filter sends back.
//!
//! No socket is touched here; [`crate::milter`] does the exchange. The protocol has no
//! RFC: it is defined by Sendmail's libmilter (`include/libmilter/mfdef.h`) and by what
//! the MTAs that speak it accept (Postfix `src/milter/milter8.c` being the reference for
//! an MTA other than Sendmail).
//!
//! Every packet, in both directions, is a 4-byte big-endian length, then that many bytes:
//! one command byte and its payload. Strings in payloads end with a NUL byte; integers are
//! 32-bit big-endian (the port in a connect packet is 16-bit).
//!
//! The decoder is strict: a length over [`MAX_PACKET`], a reply code we do not know, a
//! missing NUL, a payload on a reply that takes none, or bytes left over are all errors,
//! because a filter that speaks garbage must get its `default_action` (SPEC invariant 10)
//! rather than a guess.

use crate::protocol::reply::{Enhanced, Reply};
use std::fmt;

/// The protocol version we speak (libmilter 8.14+, Postfix 2.6+).
pub(crate) const VERSION: u32 = 6;

/// The largest packet (command byte + payload) we accept from a filter. libmilter's own
/// limit is about 1 MiB (`MILTER_MAX_DATA_SIZE` with the MDS_1M option), and no legal reply
/// comes close: this only stops a broken or hostile filter from making us allocate.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub const MAX_PACKET: usize = 1 << 20;

/// The largest body chunk we send: libmilter's default `MILTER_CHUNK_SIZE` (65535), which
/// every filter accepts without negotiating a larger one.
pub(crate) const MAX_CHUNK: usize = 65535;

/// Commands the MTA sends (`SMFIC_*`).
pub(crate) mod cmd {
    pub(crate) const ABORT: u8 = b'A';
    pub(crate) const BODY: u8 = b'B';
    pub(crate) const CONNECT: u8 = b'C';
    pub(crate) const MACRO: u8 = b'D';
    pub(crate) const BODYEOB: u8 = b'E';
    pub(crate) const HELO: u8 = b'H';
    pub(crate) const HEADER: u8 = b'L';
    pub(crate) const MAIL: u8 = b'M';
    pub(crate) const EOH: u8 = b'N';
    pub(crate) const OPTNEG: u8 = b'O';
    pub(crate) const QUIT: u8 = b'Q';
    pub(crate) const RCPT: u8 = b'R';
    pub(crate) const DATA: u8 = b'T';
}

/// Actions a filter may ask for (`SMFIF_*`), negotiated in OPTNEG. The whole table,
/// though the server grants only some.
#[allow(dead_code)]
pub(crate) mod action {
    pub(crate) const ADDHDRS: u32 = 1 << 0;
    pub(crate) const CHGBODY: u32 = 1 << 1;
    pub(crate) const ADDRCPT: u32 = 1 << 2;
    pub(crate) const DELRCPT: u32 = 1 << 3;
    pub(crate) const CHGHDRS: u32 = 1 << 4;
    pub(crate) const QUARANTINE: u32 = 1 << 5;
    pub(crate) const CHGFROM: u32 = 1 << 6;
    pub(crate) const ADDRCPT_PAR: u32 = 1 << 7;
    pub(crate) const SETSYMLIST: u32 = 1 << 8;
}

/// Protocol flags (`SMFIP_*`): stages a filter does not want ("no-X"), stages it will not
/// answer ("NR_X"), and protocol extensions.
#[allow(dead_code)] // the whole table, though only some are offered
pub(crate) mod proto {
    pub(crate) const NOCONNECT: u32 = 1 << 0;
    pub(crate) const NOHELO: u32 = 1 << 1;
    pub(crate) const NOMAIL: u32 = 1 << 2;
    pub(crate) const NORCPT: u32 = 1 << 3;
    pub(crate) const NOBODY: u32 = 1 << 4;
    pub(crate) const NOHDRS: u32 = 1 << 5;
    pub(crate) const NOEOH: u32 = 1 << 6;
    pub(crate) const NR_HDR: u32 = 1 << 7;
    pub(crate) const NOUNKNOWN: u32 = 1 << 8;
    pub(crate) const NODATA: u32 = 1 << 9;
    pub(crate) const SKIP: u32 = 1 << 10;
    pub(crate) const RCPT_REJ: u32 = 1 << 11;
    pub(crate) const NR_CONN: u32 = 1 << 12;
    pub(crate) const NR_HELO: u32 = 1 << 13;
    pub(crate) const NR_MAIL: u32 = 1 << 14;
    pub(crate) const NR_RCPT: u32 = 1 << 15;
    pub(crate) const NR_DATA: u32 = 1 << 16;
    pub(crate) const NR_UNKN: u32 = 1 << 17;
    pub(crate) const NR_EOH: u32 = 1 << 18;
    pub(crate) const NR_BODY: u32 = 1 << 19;
    pub(crate) const HDR_LEADSPC: u32 = 1 << 20;

    /// What we offer: every stage may be declined or left unanswered, and SKIP is
    /// understood. Not offered: RCPT_REJ (we never show refused recipients), NOUNKNOWN
    /// is offered because we never send unknown commands anyway, HDR_LEADSPC (values
    /// are sent without the space after the colon, as Sendmail does).
    pub(crate) const OFFERED: u32 = NOCONNECT
        | NOHELO
        | NOMAIL
        | NORCPT
        | NOBODY
        | NOHDRS
        | NOEOH
        | NR_HDR
        | NOUNKNOWN
        | NODATA
        | SKIP
        | NR_CONN
        | NR_HELO
        | NR_MAIL
        | NR_RCPT
        | NR_DATA
        | NR_UNKN
        | NR_EOH
        | NR_BODY;
}

/// The address family byte of a connect packet (`SMFIA_*`). Sessions only ever come
/// from IP peers; the other families complete the protocol's table.
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    /// `'4'`
    Inet,
    /// `'6'`
    Inet6,
    /// `'L'`: a Unix socket (no port).
    Unix,
    /// `'U'`: unknown (no port, no address).
    Unknown,
}

/// One MTA command. Strings are bytes: a NUL inside one would end it early on the wire,
/// so the encoder replaces NUL with a space (SMTP never carries NUL in a command, and a
/// header field holding one is broken anyway).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Command<'a> {
    /// `O`: our version, the actions we allow, the protocol flags we offer.
    OptNeg {
        version: u32,
        actions: u32,
        protocol: u32,
    },
    /// `D`: macros for the command `for_cmd` that follows.
    Macro {
        for_cmd: u8,
        macros: &'a [(&'a str, &'a str)],
    },
    /// `C`: the client's host name, family, port and address.
    Connect {
        hostname: &'a str,
        family: Family,
        port: u16,
        address: &'a str,
    },
    /// `H`: the HELO/EHLO argument.
    Helo(&'a str),
    /// `M`: `<sender>` then the ESMTP parameters, one string each.
    Mail(&'a [String]),
    /// `R`: `<recipient>` then its parameters.
    Rcpt(&'a [String]),
    /// `T`: the DATA command.
    Data,
    /// `L`: one header field: name and value (folded lines separated by `\n`).
    Header { name: &'a [u8], value: &'a [u8] },
    /// `N`: end of headers.
    Eoh,
    /// `B`: a body chunk of at most [`MAX_CHUNK`] bytes.
    Body(&'a [u8]),
    /// `E`: end of the message.
    BodyEob,
    /// `A`: the transaction is aborted (the connection stays).
    Abort,
    /// `Q`: the connection ends.
    Quit,
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend(s.iter().map(|&b| if b == 0 { b' ' } else { b }));
    out.push(0);
}

/// Appends the wire form of `c` (length prefix included) to `out`.
///
/// A body chunk longer than [`MAX_CHUNK`] is a caller bug; it is encoded anyway (filters
/// may refuse it), and a debug build panics.
pub(crate) fn encode(c: &Command<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    match c {
        Command::OptNeg {
            version,
            actions,
            protocol,
        } => {
            out.push(cmd::OPTNEG);
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(&actions.to_be_bytes());
            out.extend_from_slice(&protocol.to_be_bytes());
        }
        Command::Macro { for_cmd, macros } => {
            out.push(cmd::MACRO);
            out.push(*for_cmd);
            for (name, value) in macros.iter() {
                put_str(out, name.as_bytes());
                put_str(out, value.as_bytes());
            }
        }
        Command::Connect {
            hostname,
            family,
            port,
            address,
        } => {
            out.push(cmd::CONNECT);
            put_str(out, hostname.as_bytes());
            match family {
                Family::Inet | Family::Inet6 => {
                    out.push(if *family == Family::Inet { b'4' } else { b'6' });
                    out.extend_from_slice(&port.to_be_bytes());
                    put_str(out, address.as_bytes());
                }
                // libmilter reads a port for every family but `U` (Postfix sends 0).
                Family::Unix => {
                    out.push(b'L');
                    out.extend_from_slice(&0u16.to_be_bytes());
                    put_str(out, address.as_bytes());
                }
                Family::Unknown => out.push(b'U'),
            }
        }
        Command::Helo(name) => {
            out.push(cmd::HELO);
            put_str(out, name.as_bytes());
        }
        Command::Mail(args) | Command::Rcpt(args) => {
            out.push(if matches!(c, Command::Mail(_)) {
                cmd::MAIL
            } else {
                cmd::RCPT
            });
            for a in args.iter() {
                put_str(out, a.as_bytes());
            }
        }
        Command::Data => out.push(cmd::DATA),
        Command::Header { name, value } => {
            out.push(cmd::HEADER);
            put_str(out, name);
            put_str(out, value);
        }
        Command::Eoh => out.push(cmd::EOH),
        Command::Body(chunk) => {
            debug_assert!(chunk.len() <= MAX_CHUNK, "body chunk over MAX_CHUNK");
            out.push(cmd::BODY);
            out.extend_from_slice(chunk);
        }
        Command::BodyEob => out.push(cmd::BODYEOB),
        Command::Abort => out.push(cmd::ABORT),
        Command::Quit => out.push(cmd::QUIT),
    }
    // The length never exceeds u32: our strings come from bounded SMTP lines and header
    // fields, and body chunks are at most MAX_CHUNK. Saturate rather than wrap anyway.
    let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// A reply from a filter (`SMFIR_*`, or `O` in the negotiation).
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum Response {
    /// `O`: the filter's version, the actions it wants, its protocol flags, and the macro
    /// lists it asks for per stage (`(stage, "name name ...")`), which we read but do not
    /// need: we send the same macros to every filter.
    OptNeg {
        version: u32,
        actions: u32,
        protocol: u32,
        macros: Vec<(u32, String)>,
    },
    /// `c`
    Continue,
    /// `a`
    Accept,
    /// `r`
    Reject,
    /// `t`
    Tempfail,
    /// `y`: an SMTP reply of the filter's own (checked by [`parse_reply_code`]).
    ReplyCode(String),
    /// `d`
    Discard,
    /// `h`: append a header field.
    AddHeader { name: String, value: String },
    /// `i`: insert a header field before the `index`-th one (0 = first).
    InsHeader {
        index: u32,
        name: String,
        value: String,
    },
    /// `m`: change the `index`-th (1-based) field called `name`; an empty value deletes it.
    ChgHeader {
        index: u32,
        name: String,
        value: String,
    },
    /// `q`: quarantine, with a reason.
    Quarantine(String),
    /// `p`: still working.
    Progress,
    /// `s`: skip the rest of the body chunks.
    Skip,
    /// `4`: shut the SMTP connection down (421).
    Shutdown,
    /// `f`: cause a connection failure.
    ConnFail,
}

impl Response {
    /// The reply's name for logs and metrics.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Response::OptNeg { .. } => "optneg",
            Response::Continue => "continue",
            Response::Accept => "accept",
            Response::Reject => "reject",
            Response::Tempfail => "tempfail",
            Response::ReplyCode(_) => "replycode",
            Response::Discard => "discard",
            Response::AddHeader { .. } => "addheader",
            Response::InsHeader { .. } => "insheader",
            Response::ChgHeader { .. } => "chgheader",
            Response::Quarantine(_) => "quarantine",
            Response::Progress => "progress",
            Response::Skip => "skip",
            Response::Shutdown => "shutdown",
            Response::ConnFail => "connfail",
        }
    }
}

/// Why a filter's packet was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum DecodeError {
    /// The length prefix is 0 (no command byte) or over [`MAX_PACKET`].
    BadLength(u32),
    /// A reply code we do not know, or one we never negotiated (body replacement,
    /// recipient changes: we do not offer them).
    UnknownReply(u8),
    /// The payload does not have the shape its reply code requires.
    Malformed(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::BadLength(n) => write!(f, "bad packet length {n}"),
            DecodeError::UnknownReply(c) => {
                write!(
                    f,
                    "unexpected reply code {}",
                    char::from(*c).escape_default()
                )
            }
            DecodeError::Malformed(what) => write!(f, "malformed reply: {what}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Checks a length prefix: the number of bytes (command byte + payload) that follow.
pub(crate) fn packet_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let n = u32::from_be_bytes(prefix);
    match usize::try_from(n) {
        Ok(len) if (1..=MAX_PACKET).contains(&len) => Ok(len),
        _ => Err(DecodeError::BadLength(n)),
    }
}

/// A cursor over a payload that fails instead of running off the end.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<4>()
            .ok_or(DecodeError::Malformed(what))?;
        self.0 = rest;
        Ok(u32::from_be_bytes(*head))
    }
    /// A NUL-terminated string; invalid UTF-8 is replaced (values end up in logs and
    /// header fields, where U+FFFD is harmless).
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let nul = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Malformed(what))?;
        let s = String::from_utf8_lossy(&self.0[..nul]).into_owned();
        self.0 = &self.0[nul + 1..];
        Ok(s)
    }
    fn end(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(what))
        }
    }
}

/// Parses one packet's command byte and payload (what follows the length prefix).
pub(crate) fn parse_response(packet: &[u8]) -> Result<Response, DecodeError> {
    let (&code, payload) = packet
        .split_first()
        .ok_or(DecodeError::Malformed("empty packet"))?;
    let mut c = Cursor(payload);
    let bare = |r: Response| {
        if payload.is_empty() {
            Ok(r)
        } else {
            Err(DecodeError::Malformed("unexpected payload"))
        }
    };
    match code {
        b'c' => bare(Response::Continue),
        b'a' => bare(Response::Accept),
        b'r' => bare(Response::Reject),
        b't' => bare(Response::Tempfail),
        b'd' => bare(Response::Discard),
        b'p' => bare(Response::Progress),
        b's' => bare(Response::Skip),
        b'4' => bare(Response::Shutdown),
        b'f' => bare(Response::ConnFail),
        b'y' => {
            let text = c.string("replycode without NUL")?;
            c.end("bytes after replycode")?;
            Ok(Response::ReplyCode(text))
        }
        b'q' => {
            let reason = c.string("quarantine without NUL")?;
            c.end("bytes after quarantine reason")?;
            Ok(Response::Quarantine(reason))
        }
        b'h' => {
            let name = c.string("addheader name")?;
            let value = c.string("addheader value")?;
            c.end("bytes after addheader")?;
            Ok(Response::AddHeader { name, value })
        }
        b'i' | b'm' => {
            let index = c.u32("header index")?;
            let name = c.string("header name")?;
            let value = c.string("header value")?;
            c.end("bytes after header change")?;
            Ok(if code == b'i' {
                Response::InsHeader { index, name, value }
            } else {
                Response::ChgHeader { index, name, value }
            })
        }
        b'O' => {
            let version = c.u32("optneg version")?;
            let actions = c.u32("optneg actions")?;
            let protocol = c.u32("optneg protocol")?;
            let mut macros = Vec::new();
            while !c.0.is_empty() {
                let stage = c.u32("optneg macro stage")?;
                let names = c.string("optneg macro list")?;
                macros.push((stage, names));
            }
            Ok(Response::OptNeg {
                version,
                actions,
                protocol,
                macros,
            })
        }
        other => Err(DecodeError::UnknownReply(other)),
    }
}

/// Decodes one packet from the front of `buf`: `Ok(None)` when more bytes are needed,
/// else the reply and how many bytes it used.
#[cfg(any(test, feature = "testing"))]
pub fn decode(buf: &[u8]) -> Result<Option<(Response, usize)>, DecodeError> {
    let Some((prefix, rest)) = buf.split_first_chunk::<4>() else {
        return Ok(None);
    };
    let len = packet_len(*prefix)?;
    if rest.len() < len {
        return Ok(None);
    }
    parse_response(&rest[..len]).map(|r| Some((r, 4 + len)))
}

/// Checks a `replycode` text and turns it into our reply: `4xy` or `5xy`, optionally an
/// enhanced code of the same class (RFC 3463 §3.1), then text. A multi-line reply
/// (`5xy-...` lines joined by CRLF) must repeat the same code on every line (RFC 5321
/// §4.2.1). `None` when it is not a usable refusal; the caller then tempfails.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub fn parse_reply_code(text: &str) -> Option<Reply> {
    let text = text.strip_suffix("\r\n").unwrap_or(text);
    let lines: Vec<&str> = text.split("\r\n").collect();
    let code_str = lines.first()?.get(..3)?;
    if !code_str.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code: u16 = code_str.parse().ok()?;
    if !(400..600).contains(&code) {
        return None;
    }
    let mut texts = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        if line.get(..3) != Some(code_str) {
            return None;
        }
        match (line.as_bytes().get(3), last) {
            (None, true) => texts.push(""),
            (Some(b' '), true) | (Some(b'-'), false) => texts.push(&line[4..]),
            _ => return None,
        }
    }
    // Control characters would break our reply line or the log line.
    if texts.iter().any(|t| t.chars().any(|c| c.is_control())) {
        return None;
    }
    let first_word = texts[0].split(' ').next().unwrap_or("");
    let enhanced = parse_enhanced(first_word);
    if let Some(e) = enhanced {
        if u16::from(e.0) != code / 100 {
            return None;
        }
        // Our Reply writes the enhanced code on each line itself.
        for t in texts.iter_mut() {
            if let Some(rest) = t.strip_prefix(first_word) {
                *t = rest.strip_prefix(' ').unwrap_or(rest);
            }
        }
    }
    Some(Reply {
        code,
        enhanced,
        text: texts.join("\n"),
    })
}

fn parse_enhanced(word: &str) -> Option<Enhanced> {
    let mut parts = word.split('.');
    let mut num = |max_len: usize| -> Option<u16> {
        let p = parts.next()?;
        if p.is_empty() || p.len() > max_len || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok()
    };
    let class = u8::try_from(num(1)?).ok()?;
    let (subject, detail) = (num(3)?, num(3)?);
    if parts.next().is_some() || !(2..=5).contains(&class) {
        return None;
    }
    Some(Enhanced(class, subject, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(c: Command<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        encode(&c, &mut v);
        v
    }

    fn pkt(code: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        v.push(code);
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn encodes_optneg() {
        let v = enc(Command::OptNeg {
            version: 6,
            actions: action::ADDHDRS | action::CHGHDRS | action::QUARANTINE,
            protocol: 0x1f_ffff,
        });
        assert_eq!(
            v,
            [0, 0, 0, 13, b'O', 0, 0, 0, 6, 0, 0, 0, 0x31, 0, 0x1f, 0xff, 0xff]
        );
    }

    #[test]
    fn encodes_connect_families() {
        let v = enc(Command::Connect {
            hostname: "[192.0.2.1]",
            family: Family::Inet,
            port: 4242,
            address: "192.0.2.1",
        });
        let mut payload = b"[192.0.2.1]\x004".to_vec();
        payload.extend_from_slice(&4242u16.to_be_bytes());
        payload.extend_from_slice(b"192.0.2.1\0");
        assert_eq!(v, pkt(b'C', &payload));
        let v = enc(Command::Connect {
            hostname: "h",
            family: Family::Unknown,
            port: 9,
            address: "x",
        });
        assert_eq!(v, pkt(b'C', b"h\0U"));
    }

    #[test]
    fn encodes_strings_and_replaces_nul() {
        assert_eq!(enc(Command::Helo("a\0b")), pkt(b'H', b"a b\0"));
        let args = vec!["<a@b.test>".to_string(), "SIZE=10".to_string()];
        assert_eq!(
            enc(Command::Mail(&args)),
            pkt(b'M', b"<a@b.test>\0SIZE=10\0")
        );
        assert_eq!(enc(Command::Rcpt(&args[..1])), pkt(b'R', b"<a@b.test>\0"));
        assert_eq!(
            enc(Command::Macro {
                for_cmd: b'C',
                macros: &[("j", "mx.test"), ("{daemon_name}", "mailer")]
            }),
            pkt(b'D', b"Cj\0mx.test\0{daemon_name}\0mailer\0")
        );
        assert_eq!(
            enc(Command::Header {
                name: b"Subject",
                value: b"hi\n\tthere"
            }),
            pkt(b'L', b"Subject\0hi\n\tthere\0")
        );
    }

    #[test]
    fn encodes_bare_commands() {
        for (c, b) in [
            (Command::Data, b'T'),
            (Command::Eoh, b'N'),
            (Command::BodyEob, b'E'),
            (Command::Abort, b'A'),
            (Command::Quit, b'Q'),
        ] {
            assert_eq!(enc(c), [0, 0, 0, 1, b]);
        }
        assert_eq!(enc(Command::Body(b"xy\r\n")), pkt(b'B', b"xy\r\n"));
    }

    #[test]
    fn decodes_every_reply() {
        let cases: Vec<(Vec<u8>, Response)> = vec![
            (pkt(b'c', b""), Response::Continue),
            (pkt(b'a', b""), Response::Accept),
            (pkt(b'r', b""), Response::Reject),
            (pkt(b't', b""), Response::Tempfail),
            (pkt(b'd', b""), Response::Discard),
            (pkt(b'p', b""), Response::Progress),
            (pkt(b's', b""), Response::Skip),
            (
                pkt(b'y', b"554 5.7.1 no\0"),
                Response::ReplyCode("554 5.7.1 no".into()),
            ),
            (pkt(b'q', b"virus\0"), Response::Quarantine("virus".into())),
            (
                pkt(b'h', b"X-A\0b c\0"),
                Response::AddHeader {
                    name: "X-A".into(),
                    value: "b c".into(),
                },
            ),
            (
                pkt(b'i', b"\0\0\0\x02X-I\0v\0"),
                Response::InsHeader {
                    index: 2,
                    name: "X-I".into(),
                    value: "v".into(),
                },
            ),
            (
                pkt(b'm', b"\0\0\0\x01Subject\0\0"),
                Response::ChgHeader {
                    index: 1,
                    name: "Subject".into(),
                    value: String::new(),
                },
            ),
            (
                pkt(b'O', b"\0\0\0\x06\0\0\0\x01\0\0\0\x10\0\0\0\x05{x} i\0"),
                Response::OptNeg {
                    version: 6,
                    actions: 1,
                    protocol: 0x10,
                    macros: vec![(5, "{x} i".into())],
                },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode(&bytes), Ok(Some((want, bytes.len()))), "{bytes:?}");
        }
    }

    #[test]
    fn partial_packets_need_more() {
        let p = pkt(b'h', b"X-A\0b\0");
        for n in 0..p.len() {
            assert_eq!(decode(&p[..n]), Ok(None), "prefix {n}");
        }
    }

    #[test]
    fn refuses_malformed_and_oversize() {
        assert_eq!(decode(&[0, 0, 0, 0]), Err(DecodeError::BadLength(0)));
        let big = (MAX_PACKET as u32 + 1).to_be_bytes();
        assert_eq!(
            decode(&big),
            Err(DecodeError::BadLength(MAX_PACKET as u32 + 1))
        );
        assert_eq!(decode(&[0xff; 4]), Err(DecodeError::BadLength(u32::MAX)));
        assert!(matches!(
            decode(&pkt(b'c', b"x")),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(&pkt(b'y', b"550 no")),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(&pkt(b'h', b"X\0v")),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(&pkt(b'h', b"X\0v\0z")),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(&pkt(b'i', b"\0\0X\0v\0")),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(&pkt(b'O', b"\0\0\0\x06")),
            Err(DecodeError::Malformed(_))
        ));
        // Body replacement and recipient changes are never offered.
        assert_eq!(
            decode(&pkt(b'b', b"x")),
            Err(DecodeError::UnknownReply(b'b'))
        );
        assert_eq!(
            decode(&pkt(b'+', b"<a@b>\0")),
            Err(DecodeError::UnknownReply(b'+'))
        );
    }

    #[test]
    fn reply_codes() {
        let r = |t: &str| {
            parse_reply_code(t).map(|r| String::from_utf8(r.to_bytes()).unwrap_or_default())
        };
        assert_eq!(
            r("554 5.7.1 Go away").as_deref(),
            Some("554 5.7.1 Go away\r\n")
        );
        assert_eq!(r("421 try later").as_deref(), Some("421 try later\r\n"));
        assert_eq!(
            r("550-5.7.1 one\r\n550 5.7.1 two\r\n").as_deref(),
            Some("550-5.7.1 one\r\n550 5.7.1 two\r\n")
        );
        assert_eq!(r("550").as_deref(), Some("550 \r\n"));
        assert_eq!(r("250 ok"), None);
        assert_eq!(r("550 4.7.1 mixed"), None);
        assert_eq!(r("55x no"), None);
        assert_eq!(r("550-a\r\n551 b"), None);
        assert_eq!(r("550 a\rb"), None);
        assert_eq!(r("550 a\r\n"), Some("550 a\r\n".into()));
        assert_eq!(r(""), None);
        assert_eq!(r("5"), None);
    }
}
