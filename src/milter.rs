//! Milters (SPEC 9): content filters in other processes, spoken to over the Sendmail
//! milter protocol version 6 (the codec is [`crate::protocol::milter`]).
//!
//! This is the socket edge: addresses in Postfix syntax, connecting with
//! `connect_timeout_secs`, the option negotiation, one exchange per SMTP stage bounded by
//! `command_timeout_secs` (`content_timeout_secs` for the end-of-message reply), and the
//! per-session state of every configured milter. [`Milters`] is the hook the server runs
//! after `[policy]` (SPEC 7: a milter is a hook that lives in another process).
//!
//! Like Postfix (`cleanup_milter.c`), the message content goes to the milters after it is
//! stored, one milter after the other, each seeing the header fields the earlier ones
//! added or changed: OpenDMARC needs OpenDKIM's `Authentication-Results` that way. The
//! content is read from the stored file in chunks; it is never held whole in memory.
//!
//! A milter that is down, slow or speaks garbage gets its `default_action` (SPEC
//! invariant 10): every read and write has a deadline, so a milter costs a session at
//! most its timeouts.

use crate::config::{DefaultAction, MilterConfig};
use crate::hooks::{Content, DataVerdict, Envelope, Header, HeaderChange, Hooks, SessionInfo};
use crate::protocol::address::{Address, ReversePath};
use crate::protocol::command::{Body, MailParams};
use crate::protocol::milter::{
    action, cmd, encode, packet_len, parse_reply_code, parse_response, proto, Command, Family,
    Response, MAX_CHUNK,
};
use crate::protocol::reply::{Enhanced, Reply};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The actions we let a milter ask for (SPEC 9): header edits and quarantine, nothing
/// that rewrites the body or the envelope.
pub(crate) const OFFERED_ACTIONS: u32 = action::ADDHDRS | action::CHGHDRS | action::QUARANTINE;

/// Header section limits for what we show milters. Beyond them the rest of the content is
/// sent as body: a pathological header section must not grow our memory (invariant 4).
const MAX_HEADER_FIELDS: usize = 10_000;
const MAX_HEADER_BYTES: usize = 1 << 20;
/// One header field (all its lines) at most this long; libmilter's own packet limit is
/// about this size too.
const MAX_FIELD_BYTES: usize = MAX_CHUNK;

/// Where a milter listens, in Postfix's syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MilterAddress {
    /// `inet:host:port`, `inet:[v6]:port`, `inet6:...`, or Sendmail's `inet:port@host`.
    Inet { host: String, port: u16 },
    /// `unix:/path` (or `local:/path`).
    Unix(PathBuf),
}

impl MilterAddress {
    /// Parses `inet:host:port`, `inet:[::1]:port`, `inet6:[::1]:port`, `inet:port@host`
    /// (Sendmail's form) and `unix:/path` / `local:/path`.
    pub(crate) fn parse(s: &str) -> Result<MilterAddress, String> {
        let (transport, endpoint) = s.split_once(':').ok_or_else(|| {
            format!("{s:?}: expected transport:endpoint (inet:host:port or unix:/path)")
        })?;
        match transport {
            "unix" | "local" => {
                if endpoint.is_empty() {
                    return Err(format!("{s:?}: empty socket path"));
                }
                Ok(MilterAddress::Unix(PathBuf::from(endpoint)))
            }
            "inet" | "inet6" => {
                let (host, port) = if let Some((port, host)) = endpoint.split_once('@') {
                    (host, port)
                } else {
                    endpoint
                        .rsplit_once(':')
                        .ok_or_else(|| format!("{s:?}: expected host:port"))?
                };
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                let port: u16 = port
                    .parse()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("{s:?}: bad port {port:?}"))?;
                if host.is_empty() || host.contains(['[', ']', '/', ' ']) {
                    return Err(format!("{s:?}: bad host {host:?}"));
                }
                Ok(MilterAddress::Inet {
                    host: host.to_string(),
                    port,
                })
            }
            other => Err(format!(
                "{s:?}: unknown transport {other:?} (use inet:host:port or unix:/path)"
            )),
        }
    }
}

/// One configured milter, ready to connect to.
#[derive(Clone, Debug)]
pub(crate) struct MilterSpec {
    /// The address as configured, for logs.
    pub name: String,
    pub address: MilterAddress,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub content_timeout: Duration,
    pub default_action: DefaultAction,
}

impl MilterSpec {
    pub(crate) fn from_config(c: &MilterConfig) -> Result<MilterSpec, String> {
        Ok(MilterSpec {
            name: c.address.clone(),
            address: MilterAddress::parse(&c.address)?,
            connect_timeout: Duration::from_secs(c.connect_timeout_secs),
            command_timeout: Duration::from_secs(c.command_timeout_secs),
            content_timeout: Duration::from_secs(c.content_timeout_secs),
            default_action: c.default_action,
        })
    }
}

/// Why an exchange with a milter failed: each one leads to its `default_action`.
#[derive(Debug)]
pub(crate) enum Failure {
    Connect(io::Error),
    Io(io::Error),
    Timeout,
    Closed,
    Protocol(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "cannot connect: {e}"),
            Failure::Io(e) => write!(f, "I/O error: {e}"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Closed => f.write_str("closed the connection"),
            Failure::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

fn io_failure(e: io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Failure::Timeout,
        io::ErrorKind::UnexpectedEof => Failure::Closed,
        _ => Failure::Io(e),
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(Some(t)),
            Stream::Unix(s) => s.set_read_timeout(Some(t)),
        }
    }
    fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(Some(t)),
            Stream::Unix(s) => s.set_write_timeout(Some(t)),
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A negotiated connection to one milter.
pub(crate) struct Client {
    stream: Stream,
    spec: Arc<MilterSpec>,
    /// What the milter asked for (a subset of [`OFFERED_ACTIONS`]).
    pub actions: u32,
    /// The milter's protocol flags: stages it declined, replies it will not send.
    pub protocol: u32,
    out: Vec<u8>,
    /// While a message is sent: no exchange may end after this (content_timeout for the
    /// whole message), however the milter paces its reads and replies.
    cap: Option<Instant>,
    /// The milter gave its final answer to the end of the message.
    eom_answered: bool,
}

impl Client {
    /// Connects (within `connect_timeout`) and negotiates (within `command_timeout`).
    pub(crate) fn connect(spec: Arc<MilterSpec>) -> Result<Client, Failure> {
        let deadline = Instant::now() + spec.connect_timeout;
        let stream = match &spec.address {
            MilterAddress::Inet { host, port } => {
                let addrs: Vec<SocketAddr> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(Failure::Connect)?
                    .collect();
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                let mut found = None;
                for a in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Failure::Timeout);
                    }
                    match TcpStream::connect_timeout(&a, left) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or(Failure::Connect(last))?;
                // Small packets, one per stage: Nagle would add a delay to each.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
            // A Unix connect does not wait for the peer (it fails at once when nobody
            // listens), so it needs no timeout of its own.
            MilterAddress::Unix(path) => {
                Stream::Unix(UnixStream::connect(path).map_err(Failure::Connect)?)
            }
        };
        let mut c = Client {
            stream,
            spec: Arc::clone(&spec),
            actions: 0,
            protocol: 0,
            out: Vec::with_capacity(1024),
            cap: None,
            eom_answered: false,
        };
        c.queue(&Command::OptNeg {
            version: crate::protocol::milter::VERSION,
            actions: OFFERED_ACTIONS,
            protocol: proto::OFFERED,
        });
        match c.read(spec.command_timeout)? {
            Response::OptNeg {
                version,
                actions,
                protocol,
                ..
            } => {
                // Older milters (version 2..5) may answer; anything newer than what we
                // offered, or actions we did not offer, is a milter we cannot serve.
                if !(2..=crate::protocol::milter::VERSION).contains(&version) {
                    return Err(Failure::Protocol(format!("protocol version {version}")));
                }
                // Some milters (Rspamd's proxy) ask for every action whatever is
                // offered. They get what we offer; a reply that needs more (body
                // replacement, recipient changes) is then a protocol error, so the
                // message is never passed on half-modified.
                if actions & !OFFERED_ACTIONS != 0 {
                    log::debug!(
                        "milter {}: asks for actions {actions:#x}; offered {OFFERED_ACTIONS:#x}",
                        spec.name
                    );
                }
                c.actions = actions & OFFERED_ACTIONS;
                // Flags we did not offer are ignored rather than trusted.
                c.protocol = protocol & proto::OFFERED;
                log::debug!(
                    "milter {}: version {version}, actions {:#x}, protocol {:#x}",
                    spec.name,
                    c.actions,
                    c.protocol
                );
                Ok(c)
            }
            other => Err(Failure::Protocol(format!(
                "{} in the negotiation",
                other.name()
            ))),
        }
    }

    fn wants(&self, no_flag: u32) -> bool {
        self.protocol & no_flag == 0
    }

    fn replies(&self, nr_flag: u32) -> bool {
        self.protocol & nr_flag == 0
    }

    /// Adds a command to the output buffer; it is written before the next read (so
    /// commands the milter does not answer travel together with the next one).
    fn queue(&mut self, c: &Command<'_>) {
        encode(c, &mut self.out);
    }

    fn flush(&mut self) -> Result<(), Failure> {
        if self.out.is_empty() {
            return Ok(());
        }
        // A deadline for the whole write: a milter that reads a byte now and then
        // cannot stretch it (each write call gets only the time left).
        let deadline = self.deadline(self.spec.command_timeout);
        let mut at = 0;
        let r = loop {
            if at == self.out.len() {
                break Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(Failure::Timeout);
            }
            if let Err(e) = self.stream.set_write_timeout(left) {
                break Err(Failure::Io(e));
            }
            match self.stream.write(&self.out[at..]) {
                Ok(0) => break Err(Failure::Closed),
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(io_failure(e)),
            }
        };
        self.out.clear();
        r
    }

    fn deadline(&self, timeout: Duration) -> Instant {
        let d = Instant::now() + timeout;
        self.cap.map_or(d, |c| c.min(d))
    }

    /// Writes what is queued, then reads one reply within `timeout` (a deadline for the
    /// whole packet, so a milter trickling bytes cannot stretch it). Progress replies do
    /// not extend it: invariant 10 bounds a milter by its timeouts.
    fn read(&mut self, timeout: Duration) -> Result<Response, Failure> {
        self.flush()?;
        let deadline = self.deadline(timeout);
        loop {
            let mut prefix = [0u8; 4];
            self.read_exact_by(&mut prefix, deadline)?;
            let len = packet_len(prefix).map_err(|e| Failure::Protocol(e.to_string()))?;
            let mut packet = vec![0u8; len];
            self.read_exact_by(&mut packet, deadline)?;
            let r = parse_response(&packet).map_err(|e| Failure::Protocol(e.to_string()))?;
            if r != Response::Progress {
                return Ok(r);
            }
        }
    }

    fn read_exact_by(&mut self, mut buf: &mut [u8], deadline: Instant) -> Result<(), Failure> {
        while !buf.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::Timeout);
            }
            self.stream.set_read_timeout(left).map_err(Failure::Io)?;
            match self.stream.read(buf) {
                Ok(0) => return Err(Failure::Closed),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_failure(e)),
            }
        }
        Ok(())
    }

    /// Sends the macros (if any) and a command of a stage the milter may decline
    /// (`no_flag`) and may leave unanswered (`nr_flag`). `Ok(None)`: no reply to wait for.
    fn event(
        &mut self,
        macros: &[(&str, &str)],
        c: &Command<'_>,
        no_flag: u32,
        nr_flag: u32,
    ) -> Result<Option<Response>, Failure> {
        if no_flag != 0 && !self.wants(no_flag) {
            return Ok(None);
        }
        if !macros.is_empty() {
            let for_cmd = wire_cmd(c);
            self.queue(&Command::Macro { for_cmd, macros });
        }
        self.queue(c);
        if nr_flag != 0 && !self.replies(nr_flag) {
            // Keep the buffer bounded when many unanswered packets follow each other.
            if self.out.len() >= MAX_CHUNK {
                self.flush()?;
            }
            return Ok(None);
        }
        let t = self.spec.command_timeout;
        self.read(t).map(Some)
    }

    /// Sends `c` expecting no reply (abort, quit).
    fn send_only(&mut self, c: &Command<'_>) -> Result<(), Failure> {
        self.queue(c);
        self.flush()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stream.shutdown();
    }
}

fn wire_cmd(c: &Command<'_>) -> u8 {
    let mut v = Vec::with_capacity(16);
    // Only the command byte matters; bodies are never passed here.
    encode(c, &mut v);
    v.get(4).copied().unwrap_or(cmd::ABORT)
}

/// How the milter's state changes for the rest of the session or message.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ConnState {
    /// Events go to it.
    Active,
    /// It accepted at connect/HELO: no more events this session.
    AcceptedSession,
    /// It refused at connect/HELO (or was unreachable with tempfail/reject): every HELO,
    /// MAIL and RCPT gets this reply (SPEC 9).
    Refusing(Reply),
}

/// One milter's state within one SMTP session.
struct Conn {
    spec: Arc<MilterSpec>,
    client: Option<Client>,
    state: ConnState,
    /// Accepted (or discarded) the current message: no more events for it.
    msg_done: bool,
    discard: bool,
    /// A transaction has been started with the milter (MAIL sent) and not ended.
    in_txn: bool,
    /// The connection dropped; it may be reconnected once, at the next MAIL.
    dropped: bool,
}

/// Per-session facts remembered for a reconnection (connect and HELO are replayed).
#[derive(Default)]
struct SessionFacts {
    helo: Option<String>,
}

struct SessionMilters {
    conns: Vec<Conn>,
    facts: SessionFacts,
    /// The queue id of the message in transfer (macro `i`), from `data_start`.
    queue_id: String,
}

/// The milters of the configuration, as one hook (SPEC 7, 9).
pub(crate) struct Milters {
    specs: RwLock<Arc<Vec<Arc<MilterSpec>>>>,
    sessions: Mutex<HashMap<u64, Arc<Mutex<SessionMilters>>>>,
    hostname: String,
}

/// The reply for each default action or verdict; `at_data` selects the wording Postfix
/// uses after the message.
fn reject_reply(at_data: bool) -> Reply {
    let what = if at_data { "Message" } else { "Command" };
    Reply::new(550, Enhanced(5, 7, 1), format!("{what} rejected"))
}

fn tempfail_reply() -> Reply {
    Reply::new(
        451,
        Enhanced(4, 7, 1),
        "Service unavailable - try again later",
    )
}

fn default_reply(action: DefaultAction, at_data: bool) -> Option<Reply> {
    match action {
        DefaultAction::Tempfail => Some(tempfail_reply()),
        DefaultAction::Reject => Some(reject_reply(at_data)),
        DefaultAction::Accept => None,
    }
}

fn client_ip(s: &SessionInfo) -> String {
    s.peer.ip().to_string()
}

/// What a stage's reply means for the session.
enum Verdict {
    Continue,
    Refuse(Reply),
}

impl Milters {
    /// The milters of `cfgs`, in order. Addresses are checked here (as check-config does).
    pub(crate) fn new(hostname: &str, cfgs: &[MilterConfig]) -> Result<Milters, String> {
        Ok(Milters {
            specs: RwLock::new(Arc::new(Self::specs(cfgs)?)),
            sessions: Mutex::new(HashMap::new()),
            hostname: hostname.to_string(),
        })
    }

    fn specs(cfgs: &[MilterConfig]) -> Result<Vec<Arc<MilterSpec>>, String> {
        cfgs.iter()
            .map(|c| MilterSpec::from_config(c).map(Arc::new))
            .collect()
    }

    /// SIGHUP: the new list applies to sessions that start after it.
    pub(crate) fn reload(&self, cfg: &crate::Config) -> Result<(), String> {
        let new = Self::specs(&cfg.milter)?;
        *self.specs.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        Ok(())
    }

    /// True when no milter is configured (the hook then does nothing).
    pub(crate) fn is_empty(&self) -> bool {
        self.specs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn session(&self, id: u64) -> Option<Arc<Mutex<SessionMilters>>> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn warn(s: &SessionInfo, spec: &MilterSpec, what: impl fmt::Display) {
        log::warn!(
            "session {}: milter {}: {what}; client {}",
            s.id,
            spec.name,
            client_ip(s)
        );
    }

    /// One log line per verdict that is not continue/accept (SPEC 9, issue 16).
    /// Each one is also counted in `mailer_milter_actions_total` (SPEC 10).
    fn log_verdict(s: &SessionInfo, spec: &MilterSpec, stage: &str, what: impl fmt::Display) {
        let what = what.to_string();
        let action = what.split_whitespace().next().unwrap_or("unknown");
        crate::metrics::milter_action(&spec.name, action);
        log::info!(
            "session {}: milter {}: {stage}: {what}; client {}",
            s.id,
            spec.name,
            client_ip(s)
        );
    }

    fn connect_macros(&self, s: &SessionInfo) -> Vec<(&'static str, String)> {
        let ip = client_ip(s);
        vec![
            ("j", self.hostname.clone()),
            ("{daemon_name}", self.hostname.clone()),
            ("{daemon_addr}", daemon_addr(s)),
            ("v", format!("mailer {}", env!("CARGO_PKG_VERSION"))),
            ("_", format!("unknown [{ip}]")),
            ("{client_addr}", ip.clone()),
            ("{client_name}", format!("[{ip}]")),
        ]
    }

    /// Connects and replays connect (and HELO, if known) on a fresh connection.
    fn open(&self, s: &SessionInfo, conn: &mut Conn, helo: Option<&str>) -> Result<(), Failure> {
        conn.client = None;
        conn.dropped = false;
        let mut client = Client::connect(Arc::clone(&conn.spec))?;
        let macros = self.connect_macros(s);
        let m: Vec<(&str, &str)> = macros.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let ip = client_ip(s);
        let host = format!("[{ip}]");
        let family = if s.peer.is_ipv4() {
            Family::Inet
        } else {
            Family::Inet6
        };
        let r = client.event(
            &m,
            &Command::Connect {
                hostname: &host,
                family,
                port: s.peer.port(),
                address: &ip,
            },
            proto::NOCONNECT,
            proto::NR_CONN,
        )?;
        conn.client = Some(client);
        if let Some(r) = r {
            if let Verdict::Refuse(rep) = self.session_verdict(s, conn, "connect", r)? {
                conn.state = ConnState::Refusing(rep);
                return Ok(());
            }
        }
        if let (Some(name), ConnState::Active) = (helo, &conn.state) {
            if let Some(r) = self.helo_event(s, conn, name)? {
                if let Verdict::Refuse(rep) = self.session_verdict(s, conn, "helo", r)? {
                    conn.state = ConnState::Refusing(rep);
                }
            }
        }
        Ok(())
    }

    fn helo_event(
        &self,
        s: &SessionInfo,
        conn: &mut Conn,
        name: &str,
    ) -> Result<Option<Response>, Failure> {
        let Some(client) = conn.client.as_mut() else {
            return Ok(None);
        };
        let (v, c) = s
            .tls
            .as_ref()
            // Postfix's spelling, "TLSv1.3", which milters match on; rustls says TLSv1_3.
            .map(|t| (t.version.replace('_', "."), t.cipher.clone()))
            .unwrap_or_default();
        let macros: Vec<(&str, &str)> = if s.tls.is_some() {
            vec![("{tls_version}", &v), ("{cipher}", &c)]
        } else {
            Vec::new()
        };
        client.event(&macros, &Command::Helo(name), proto::NOHELO, proto::NR_HELO)
    }

    /// A reply at connect or HELO: accept covers the session, a refusal stands for it.
    fn session_verdict(
        &self,
        s: &SessionInfo,
        conn: &mut Conn,
        stage: &str,
        r: Response,
    ) -> Result<Verdict, Failure> {
        match r {
            Response::Continue => Ok(Verdict::Continue),
            Response::Accept => {
                conn.state = ConnState::AcceptedSession;
                if let Some(mut c) = conn.client.take() {
                    let _ = c.send_only(&Command::Quit);
                }
                Ok(Verdict::Continue)
            }
            Response::Reject => {
                Self::log_verdict(s, &conn.spec, stage, "reject");
                Ok(Verdict::Refuse(reject_reply(false)))
            }
            Response::Tempfail => {
                Self::log_verdict(s, &conn.spec, stage, "tempfail");
                Ok(Verdict::Refuse(tempfail_reply()))
            }
            Response::ReplyCode(text) => {
                Self::log_verdict(s, &conn.spec, stage, format_args!("replycode {text:?}"));
                Ok(Verdict::Refuse(
                    parse_reply_code(&text).unwrap_or_else(tempfail_reply),
                ))
            }
            Response::Shutdown => {
                Self::log_verdict(s, &conn.spec, stage, "shutdown");
                Ok(Verdict::Refuse(Reply::new(
                    421,
                    Enhanced(4, 7, 0),
                    "Service unavailable - closing connection",
                )))
            }
            other => Err(Failure::Protocol(format!(
                "unexpected reply {} at {stage}",
                other.name()
            ))),
        }
    }

    /// A reply at MAIL or RCPT.
    fn envelope_verdict(
        &self,
        s: &SessionInfo,
        conn: &mut Conn,
        stage: &str,
        r: Response,
    ) -> Result<Verdict, Failure> {
        match r {
            Response::Accept => {
                conn.msg_done = true;
                Ok(Verdict::Continue)
            }
            Response::Discard => {
                Self::log_verdict(s, &conn.spec, stage, "discard");
                conn.msg_done = true;
                conn.discard = true;
                Ok(Verdict::Continue)
            }
            other => self.session_verdict(s, conn, stage, other),
        }
    }

    /// The milter failed: log, drop the connection, and answer its default action.
    fn fail(
        s: &SessionInfo,
        conn: &mut Conn,
        stage: &str,
        f: Failure,
        at_data: bool,
    ) -> Option<Reply> {
        let action = conn.spec.default_action;
        crate::metrics::milter_action(&conn.spec.name, "default_action");
        Self::warn(
            s,
            &conn.spec,
            format_args!("{stage}: {f}; default_action {action:?}"),
        );
        conn.client = None;
        conn.dropped = true;
        conn.in_txn = false;
        default_reply(action, at_data)
    }

    /// SMTP connect: one connection per milter for this session.
    pub(crate) fn on_connect(&self, s: &SessionInfo) {
        let specs = Arc::clone(&self.specs.read().unwrap_or_else(|p| p.into_inner()));
        if specs.is_empty() {
            return;
        }
        let mut conns = Vec::with_capacity(specs.len());
        for spec in specs.iter() {
            let mut conn = Conn {
                spec: Arc::clone(spec),
                client: None,
                state: ConnState::Active,
                msg_done: false,
                discard: false,
                in_txn: false,
                dropped: false,
            };
            if let Err(f) = self.open(s, &mut conn, None) {
                // Unreachable at connect: tempfail/reject answer HELO and MAIL from now
                // on (SPEC 9); a reconnection is tried at MAIL.
                if let Some(rep) = Self::fail(s, &mut conn, "connect", f, false) {
                    conn.state = ConnState::Refusing(rep);
                }
            }
            conns.push(conn);
        }
        let sm = SessionMilters {
            conns,
            facts: SessionFacts::default(),
            queue_id: String::new(),
        };
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(s.id, Arc::new(Mutex::new(sm)));
    }

    /// HELO/EHLO.
    pub(crate) fn on_helo(&self, s: &SessionInfo, name: &str) -> Result<(), Reply> {
        let Some(sm) = self.session(s.id) else {
            return Ok(());
        };
        let mut sm = sm.lock().unwrap_or_else(|p| p.into_inner());
        sm.facts.helo = Some(name.to_string());
        for conn in sm.conns.iter_mut() {
            match &conn.state {
                ConnState::Refusing(r) => return Err(r.clone()),
                ConnState::AcceptedSession => continue,
                ConnState::Active => {}
            }
            if conn.client.is_none() {
                continue;
            }
            self.abort_txn(s, conn);
            match self.helo_event(s, conn, name) {
                Ok(None) => {}
                Ok(Some(r)) => match self.session_verdict(s, conn, "helo", r) {
                    Ok(Verdict::Continue) => {}
                    Ok(Verdict::Refuse(rep)) => {
                        conn.state = ConnState::Refusing(rep.clone());
                        return Err(rep);
                    }
                    Err(f) => {
                        if let Some(rep) = Self::fail(s, conn, "helo", f, false) {
                            return Err(rep);
                        }
                    }
                },
                Err(f) => {
                    if let Some(rep) = Self::fail(s, conn, "helo", f, false) {
                        return Err(rep);
                    }
                }
            }
        }
        Ok(())
    }

    /// Ends a transaction the milter is in (RSET, new MAIL, failure): ABORT, no reply.
    fn abort_txn(&self, s: &SessionInfo, conn: &mut Conn) {
        conn.msg_done = false;
        conn.discard = false;
        if !conn.in_txn {
            return;
        }
        conn.in_txn = false;
        if let Some(c) = conn.client.as_mut() {
            if let Err(f) = c.send_only(&Command::Abort) {
                Self::warn(s, &conn.spec, format_args!("abort: {f}"));
                conn.client = None;
                conn.dropped = true;
            }
        }
    }

    /// MAIL FROM: a new transaction; a dropped milter is reconnected here, once.
    pub(crate) fn on_mail(
        &self,
        s: &SessionInfo,
        from: &ReversePath,
        params: &MailParams,
    ) -> Result<(), Reply> {
        let Some(sm) = self.session(s.id) else {
            return Ok(());
        };
        let mut sm = sm.lock().unwrap_or_else(|p| p.into_inner());
        let helo = sm.facts.helo.clone();
        let mut args = vec![format!("<{from}>")];
        if let Some(n) = params.size {
            args.push(format!("SIZE={n}"));
        }
        match params.body {
            Some(Body::SevenBit) => args.push("BODY=7BIT".into()),
            Some(Body::EightBitMime) => args.push("BODY=8BITMIME".into()),
            None => {}
        }
        if params.smtputf8 {
            args.push("SMTPUTF8".into());
        }
        if let Some(a) = &params.auth {
            args.push(format!("AUTH={a}"));
        }
        let mail_addr = from.to_string();
        for conn in sm.conns.iter_mut() {
            self.abort_txn(s, conn);
            if conn.state == ConnState::AcceptedSession {
                continue;
            }
            if conn.client.is_none() {
                // Unreachable at connect, or dropped since: one new attempt per
                // transaction (SPEC 9). (A milter's own refusal keeps its connection.)
                conn.state = ConnState::Active;
                if let Err(f) = self.open(s, conn, helo.as_deref()) {
                    match Self::fail(s, conn, "reconnect", f, false) {
                        Some(rep) => return Err(rep),
                        None => continue,
                    }
                }
            }
            match &conn.state {
                ConnState::Refusing(r) => return Err(r.clone()),
                ConnState::AcceptedSession => continue,
                ConnState::Active => {}
            }
            let Some(client) = conn.client.as_mut() else {
                continue;
            };
            let (auth_type, auth_authen) = auth_macros(s);
            let mut macros: Vec<(&str, &str)> = vec![("{mail_addr}", &mail_addr)];
            if let Some(u) = &auth_authen {
                macros.push(("{auth_type}", &auth_type));
                macros.push(("{auth_authen}", u));
            }
            conn.in_txn = true;
            let r = client.event(
                &macros,
                &Command::Mail(&args),
                proto::NOMAIL,
                proto::NR_MAIL,
            );
            self.envelope_outcome(s, conn, "mail", r)?;
        }
        Ok(())
    }

    /// RCPT TO.
    pub(crate) fn on_rcpt(&self, s: &SessionInfo, to: &Address) -> Result<(), Reply> {
        let Some(sm) = self.session(s.id) else {
            return Ok(());
        };
        let mut sm = sm.lock().unwrap_or_else(|p| p.into_inner());
        let rcpt = to.to_string();
        let args = vec![format!("<{rcpt}>")];
        for conn in sm.conns.iter_mut() {
            if let Some(r) = Self::skip_or_refuse(conn, false) {
                match r {
                    Ok(()) => continue,
                    Err(rep) => return Err(rep),
                }
            }
            let Some(client) = conn.client.as_mut() else {
                continue;
            };
            let macros = [("{rcpt_addr}", rcpt.as_str())];
            let r = client.event(
                &macros,
                &Command::Rcpt(&args),
                proto::NORCPT,
                proto::NR_RCPT,
            );
            self.envelope_outcome(s, conn, "rcpt", r)?;
        }
        Ok(())
    }

    /// What one milter's answer to MAIL or RCPT means for the client: a refusal, or
    /// its `default_action` when it failed, or nothing (go on).
    fn envelope_outcome(
        &self,
        s: &SessionInfo,
        conn: &mut Conn,
        stage: &str,
        r: Result<Option<Response>, Failure>,
    ) -> Result<(), Reply> {
        match r.and_then(|r| match r {
            None => Ok(Verdict::Continue),
            Some(r) => self.envelope_verdict(s, conn, stage, r),
        }) {
            Ok(Verdict::Continue) => Ok(()),
            Ok(Verdict::Refuse(rep)) => Err(rep),
            Err(f) => match Self::fail(s, conn, stage, f, false) {
                Some(rep) => Err(rep),
                None => Ok(()),
            },
        }
    }

    /// `Some(Ok)`: skip this milter for this event; `Some(Err)`: refuse with this;
    /// `None`: send the event.
    fn skip_or_refuse(conn: &Conn, at_data: bool) -> Option<Result<(), Reply>> {
        match &conn.state {
            ConnState::Refusing(r) => return Some(Err(r.clone())),
            ConnState::AcceptedSession => return Some(Ok(())),
            ConnState::Active => {}
        }
        if conn.msg_done {
            return Some(Ok(()));
        }
        if conn.client.is_none() {
            // Dropped during this transaction: its default action stands until MAIL.
            return Some(default_reply(conn.spec.default_action, at_data).map_or(Ok(()), Err));
        }
        None
    }

    /// RSET, a new HELO/EHLO, STARTTLS, QUIT: the transaction ends.
    pub(crate) fn on_reset(&self, s: &SessionInfo) {
        let Some(sm) = self.session(s.id) else {
            return;
        };
        let mut sm = sm.lock().unwrap_or_else(|p| p.into_inner());
        for conn in sm.conns.iter_mut() {
            self.abort_txn(s, conn);
        }
    }

    /// The session ended: QUIT to every milter, and the state is freed.
    pub(crate) fn on_close(&self, s: &SessionInfo) {
        let sm = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&s.id);
        let Some(sm) = sm else {
            return;
        };
        let mut sm = sm.lock().unwrap_or_else(|p| p.into_inner());
        for conn in sm.conns.iter_mut() {
            self.abort_txn(s, conn);
            if let Some(mut c) = conn.client.take() {
                let _ = c.send_only(&Command::Quit);
            }
        }
    }

    /// End of message: the content goes to each milter in turn, each seeing the edits of
    /// the ones before; their edits are merged into one verdict for the stored copy.
    pub(crate) fn on_data(
        &self,
        s: &SessionInfo,
        content: &mut dyn Content,
    ) -> Result<DataVerdict, Reply> {
        let Some(sm) = self.session(s.id) else {
            return Ok(DataVerdict::default());
        };
        let mut sm = sm.lock().unwrap_or_else(|p| p.into_inner());
        let queue_id = sm.queue_id.clone();
        let r = self.data_inner(s, &mut sm, &queue_id, content);
        // A milter that did not finish the message (it was refused, discarded or
        // accepted before its end, or another milter refused first) is told to abort
        // it, as Postfix does; one that answered the end of message is done.
        for conn in sm.conns.iter_mut() {
            self.abort_txn(s, conn);
        }
        r
    }

    fn data_inner(
        &self,
        s: &SessionInfo,
        sm: &mut SessionMilters,
        queue_id: &str,
        content: &mut dyn Content,
    ) -> Result<DataVerdict, Reply> {
        let mut verdict = DataVerdict::default();
        if sm.conns.iter().any(|c| c.discard) {
            let names: Vec<&str> = sm
                .conns
                .iter()
                .filter(|c| c.discard)
                .map(|c| c.spec.name.as_str())
                .collect();
            log::warn!(
                "session {}: message {queue_id} discarded by milter {}; client {}",
                s.id,
                names.join(", "),
                client_ip(s)
            );
            verdict.discard = true;
            return Ok(verdict);
        }
        // Which milters get the content: decided before reading, so the body is copied
        // for the later ones only when there are later ones.
        let mut todo = Vec::new();
        for (i, conn) in sm.conns.iter().enumerate() {
            match Self::skip_or_refuse(conn, true) {
                Some(Ok(())) => {}
                Some(Err(rep)) => return Err(rep),
                None => todo.push(i),
            }
        }
        if todo.is_empty() {
            return Ok(verdict);
        }
        let unreadable = |e: io::Error| {
            log::error!(
                "session {}: reading the stored message for milters: {e}",
                s.id
            );
            Reply::new(451, Enhanced(4, 3, 0), "Error: queue file read error")
        };
        let mut fields: Option<Vec<Field>> = None;
        let mut edits = Edits::default();
        for &i in todo.iter() {
            let conn = &mut sm.conns[i];
            // Each milter reads the stored content from its first byte, as Postfix
            // re-reads its queue file for each milter.
            let raw = content.reader().map_err(unreadable)?;
            let mut reader = BufReader::with_capacity(MAX_CHUNK, raw);
            let (f, body_start) = read_header_section(&mut reader).map_err(unreadable)?;
            let fields = fields.get_or_insert(f);
            let body = io::Cursor::new(body_start).chain(reader);
            let res = self.message_to(s, conn, queue_id, fields, &edits, Box::new(body));
            match res {
                Ok(MsgOutcome::Done(mods)) => {
                    for m in mods {
                        if let Err(why) = edits.apply(fields, m) {
                            Self::warn(s, &conn.spec, why);
                        }
                    }
                }
                Ok(MsgOutcome::Accepted) => {}
                Ok(MsgOutcome::Discard) => {
                    log::warn!(
                        "session {}: message {queue_id} discarded by milter {}; client {}",
                        s.id,
                        conn.spec.name,
                        client_ip(s)
                    );
                    verdict.discard = true;
                    return Ok(verdict);
                }
                Ok(MsgOutcome::Refuse(rep)) => return Err(rep),
                Err(f) => {
                    if let Some(rep) = Self::fail(s, conn, "message", f, true) {
                        return Err(rep);
                    }
                }
            }
        }
        if let Some(fields) = &fields {
            edits.into_verdict(fields, &mut verdict);
        }
        Ok(verdict)
    }

    /// DATA, the header fields (as the earlier milters left them), EOH, the body in
    /// chunks, end of message, and the end-of-message replies, all within the milter's
    /// content_timeout (each exchange also within its command_timeout).
    #[allow(clippy::too_many_arguments)]
    fn message_to(
        &self,
        s: &SessionInfo,
        conn: &mut Conn,
        queue_id: &str,
        fields: &[Field],
        edits: &Edits,
        body: Box<dyn Read + '_>,
    ) -> Result<MsgOutcome, Failure> {
        let spec = Arc::clone(&conn.spec);
        let Some(client) = conn.client.as_mut() else {
            return Ok(MsgOutcome::Accepted);
        };
        client.cap = Some(Instant::now() + spec.content_timeout);
        client.eom_answered = false;
        let r = Self::message_stages(s, &spec, client, queue_id, fields, edits, body);
        client.cap = None;
        if client.eom_answered {
            conn.in_txn = false;
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn message_stages(
        s: &SessionInfo,
        spec: &Arc<MilterSpec>,
        client: &mut Client,
        queue_id: &str,
        fields: &[Field],
        edits: &Edits,
        mut body: Box<dyn Read + '_>,
    ) -> Result<MsgOutcome, Failure> {
        let i_macro = [("i", queue_id)];
        let step = |r: Option<Response>, stage: &str| -> Result<Option<MsgOutcome>, Failure> {
            match r {
                None | Some(Response::Continue) => Ok(None),
                Some(Response::Accept) => Ok(Some(MsgOutcome::Accepted)),
                Some(Response::Discard) => Ok(Some(MsgOutcome::Discard)),
                Some(Response::Reject) => {
                    Self::log_verdict(s, spec, stage, "reject");
                    Ok(Some(MsgOutcome::Refuse(reject_reply(true))))
                }
                Some(Response::Tempfail) => {
                    Self::log_verdict(s, spec, stage, "tempfail");
                    Ok(Some(MsgOutcome::Refuse(tempfail_reply())))
                }
                Some(Response::ReplyCode(t)) => {
                    Self::log_verdict(s, spec, stage, format_args!("replycode {t:?}"));
                    Ok(Some(MsgOutcome::Refuse(
                        parse_reply_code(&t).unwrap_or_else(tempfail_reply),
                    )))
                }
                Some(other) => Err(Failure::Protocol(format!(
                    "unexpected reply {} at {stage}",
                    other.name()
                ))),
            }
        };
        macro_rules! check {
            ($r:expr, $stage:expr) => {
                if let Some(o) = step($r, $stage)? {
                    return Ok(o);
                }
            };
        }
        check!(
            client.event(&i_macro, &Command::Data, proto::NODATA, proto::NR_DATA)?,
            "data"
        );
        let view = edits.view(fields);
        if client.wants(proto::NOHDRS) {
            for v in &view {
                let r = client.event(
                    &[],
                    &Command::Header {
                        name: v.name,
                        value: v.value,
                    },
                    proto::NOHDRS,
                    proto::NR_HDR,
                )?;
                check!(r, "header");
            }
        }
        check!(
            client.event(&i_macro, &Command::Eoh, proto::NOEOH, proto::NR_EOH)?,
            "eoh"
        );
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut skip = !client.wants(proto::NOBODY);
        loop {
            let n = read_full(&mut body, &mut buf).map_err(|e| {
                Failure::Io(io::Error::new(
                    e.kind(),
                    format!("reading the message: {e}"),
                ))
            })?;
            if n == 0 {
                break;
            }
            if skip {
                break;
            }
            match client.event(
                &[],
                &Command::Body(&buf[..n]),
                proto::NOBODY,
                proto::NR_BODY,
            )? {
                Some(Response::Skip) => skip = true,
                r => check!(r, "body"),
            }
        }
        // End of message: modifications, then one final reply, within content_timeout.
        client.queue(&Command::Macro {
            for_cmd: cmd::BODYEOB,
            macros: &i_macro,
        });
        client.queue(&Command::BodyEob);
        let deadline = Instant::now() + spec.content_timeout;
        let mut mods = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::Timeout);
            }
            let r = client.read(left)?;
            if !matches!(
                r,
                Response::AddHeader { .. }
                    | Response::InsHeader { .. }
                    | Response::ChgHeader { .. }
                    | Response::Quarantine(_)
            ) {
                client.eom_answered = true;
            }
            match r {
                Response::AddHeader { .. }
                | Response::InsHeader { .. }
                | Response::ChgHeader { .. } => {
                    // libmilter checks insheader against ADDHDRS too (smfi_insheader).
                    let needed = if matches!(r, Response::ChgHeader { .. }) {
                        action::CHGHDRS
                    } else {
                        action::ADDHDRS
                    };
                    if client.actions & needed == 0 {
                        return Err(Failure::Protocol(format!("{} not negotiated", r.name())));
                    }
                    mods.push(r);
                }
                Response::Quarantine(_) => {
                    if client.actions & action::QUARANTINE == 0 {
                        return Err(Failure::Protocol("quarantine not negotiated".into()));
                    }
                    Self::log_verdict(s, spec, "eom", r.name());
                    mods.push(r);
                }
                Response::Continue | Response::Accept => return Ok(MsgOutcome::Done(mods)),
                other => {
                    if let Some(o) = step(Some(other), "eom")? {
                        return Ok(o);
                    }
                }
            }
        }
    }
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

enum MsgOutcome {
    Done(Vec<Response>),
    Accepted,
    Discard,
    Refuse(Reply),
}

fn auth_macros(s: &SessionInfo) -> (String, Option<String>) {
    (auth_mechanism(s), s.auth_user.clone())
}

/// One header field of the content: name, and value as milters get it (without the
/// space after the colon, folded lines joined by `\n` as Sendmail does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Field {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// Reads the header section: the fields, and the bytes already read that belong to the
/// body (the body starts after the empty line; a line that is no header field ends the
/// section too, and is body). Beyond the limits above, the rest is body.
pub(crate) fn read_header_section(r: &mut dyn BufRead) -> io::Result<(Vec<Field>, Vec<u8>)> {
    let mut fields: Vec<Field> = Vec::new();
    let mut total = 0usize;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r
            .take(MAX_FIELD_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok((fields, Vec::new()));
        }
        if line == b"\r\n" || line == b"\n" {
            return Ok((fields, Vec::new()));
        }
        let complete = line.ends_with(b"\n");
        total += n;
        let content = line
            .strip_suffix(b"\r\n")
            .or_else(|| line.strip_suffix(b"\n"))
            .unwrap_or(&line);
        let over = !complete || total > MAX_HEADER_BYTES;
        if !over && matches!(content.first(), Some(b' ' | b'\t')) {
            if let Some(last) = fields.last_mut() {
                if last.name.len() + last.value.len() + content.len() < MAX_FIELD_BYTES {
                    last.value.push(b'\n');
                    last.value.extend_from_slice(content);
                    continue;
                }
            }
        } else if !over && fields.len() < MAX_HEADER_FIELDS {
            if let Some(colon) = content.iter().position(|&b| b == b':') {
                // RFC 5322 §2.2: printable ASCII other than colon; white space before
                // the colon is tolerated (obsolete syntax, §4.5) and dropped.
                let name = trim_end_ws(&content[..colon]);
                if !name.is_empty() && name.iter().all(|b| (33..=126).contains(b)) {
                    let mut value = &content[colon + 1..];
                    if let Some(v) = value.strip_prefix(b" ") {
                        value = v;
                    }
                    fields.push(Field {
                        name: name.to_vec(),
                        value: value.to_vec(),
                    });
                    continue;
                }
            }
        }
        // Not a header field: this line is where the body starts.
        return Ok((fields, line));
    }
}

fn trim_end_ws(b: &[u8]) -> &[u8] {
    let end = b
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(0, |p| p + 1);
    &b[..end]
}

/// Where a header field a milter sees comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// `edits.add[j]`
    Added(usize),
    /// `edits.insert[j]`
    Inserted(usize),
    /// The content's field `i`, the `occ`-th (1-based) of its name.
    Original { i: usize, occ: usize },
}

struct ViewField<'a> {
    origin: Origin,
    name: &'a [u8],
    value: &'a [u8],
}

/// The header edits of the milters so far, relative to the content's own fields (the
/// shape of [`DataVerdict`]).
#[derive(Default)]
struct Edits {
    add: Vec<Header>,
    insert: Vec<(usize, Header)>,
    change: Vec<HeaderChange>,
    quarantine: Option<String>,
}

impl Edits {
    /// The edits in the form the delivery applies them (`delivery::edit_header_section`:
    /// changes one after the other, then insertions one after the other, each index
    /// counted in the header as it stands then). Our model keeps every position relative
    /// to the content's own fields, so: value changes first (they shift nothing),
    /// deletions from the last occurrence of a name back (so earlier occurrences keep
    /// their number), then each insertion at its field's position among the fields
    /// left, after the insertions already made.
    fn into_verdict(self, fields: &[Field], verdict: &mut DataVerdict) {
        let mut deleted = vec![false; fields.len()];
        let mut changes: Vec<HeaderChange> = Vec::with_capacity(self.change.len());
        let mut deletions: Vec<HeaderChange> = Vec::new();
        for c in self.change {
            match c.value {
                Some(_) => changes.push(c),
                None => {
                    let at = fields
                        .iter()
                        .enumerate()
                        .filter(|(_, f)| eq_name(&f.name, c.name.as_bytes()))
                        .nth(c.index.saturating_sub(1))
                        .map(|(i, _)| i);
                    if let Some(at) = at {
                        deleted[at] = true;
                    }
                    deletions.push(c);
                }
            }
        }
        deletions.sort_by_key(|c| std::cmp::Reverse(c.index));
        changes.extend(deletions);
        let mut insert = Vec::with_capacity(self.insert.len());
        for (k, (at, h)) in self.insert.into_iter().enumerate() {
            let kept = deleted[..at.min(fields.len())]
                .iter()
                .filter(|d| !**d)
                .count();
            insert.push((kept + k, h));
        }
        verdict.add = self.add;
        verdict.insert = insert;
        verdict.change = changes;
        if self.quarantine.is_some() {
            verdict.quarantine = self.quarantine;
        }
    }
}

fn eq_name(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
}

impl Edits {
    /// The header section as the next milter sees it, in stored order: added fields
    /// (below the trace headers), then the content's fields with insertions before
    /// their index, changed values, deleted ones left out.
    fn view<'a>(&'a self, fields: &'a [Field]) -> Vec<ViewField<'a>> {
        let mut v = Vec::with_capacity(fields.len() + self.add.len() + self.insert.len());
        for (j, h) in self.add.iter().enumerate() {
            v.push(ViewField {
                origin: Origin::Added(j),
                name: h.name.as_bytes(),
                value: h.value.as_bytes(),
            });
        }
        let mut counts: HashMap<Vec<u8>, usize> = HashMap::new();
        for (i, f) in fields.iter().enumerate() {
            for (j, (_, h)) in self
                .insert
                .iter()
                .enumerate()
                .filter(|(_, (at, _))| *at == i)
            {
                v.push(ViewField {
                    origin: Origin::Inserted(j),
                    name: h.name.as_bytes(),
                    value: h.value.as_bytes(),
                });
            }
            // Occurrences are counted only for names some change refers to.
            let mut occ = 0;
            let mut value: &[u8] = &f.value;
            let mut deleted = false;
            if self
                .change
                .iter()
                .any(|c| eq_name(c.name.as_bytes(), &f.name))
            {
                let k = counts.entry(f.name.to_ascii_lowercase()).or_insert(0);
                *k += 1;
                occ = *k;
                if let Some(c) = self
                    .change
                    .iter()
                    .rev()
                    .find(|c| c.index == occ && eq_name(c.name.as_bytes(), &f.name))
                {
                    match &c.value {
                        Some(nv) => value = nv.as_bytes(),
                        None => deleted = true,
                    }
                }
            }
            if !deleted {
                v.push(ViewField {
                    origin: Origin::Original { i, occ },
                    name: &f.name,
                    value,
                });
            }
        }
        for (j, (_, h)) in self
            .insert
            .iter()
            .enumerate()
            .filter(|(_, (at, _))| *at >= fields.len())
        {
            v.push(ViewField {
                origin: Origin::Inserted(j),
                name: h.name.as_bytes(),
                value: h.value.as_bytes(),
            });
        }
        v
    }

    /// Applies one end-of-message modification of the milter that saw `view(fields)`.
    fn apply(&mut self, fields: &[Field], m: Response) -> Result<(), String> {
        let header = |name: String, value: String| -> Result<Header, String> {
            let h = Header::new(name, value);
            h.to_bytes()?;
            Ok(h)
        };
        // Map positions against the view this milter saw (recomputed: cheap, and the
        // edits have not changed since it was sent).
        let view: Vec<(Origin, Vec<u8>)> = self
            .view(fields)
            .iter()
            .map(|v| (v.origin, v.name.to_ascii_lowercase()))
            .collect();
        match m {
            Response::AddHeader { name, value } => {
                self.add.push(header(name, value)?);
            }
            Response::InsHeader { index, name, value } => {
                let h = header(name, value)?;
                let index = index as usize;
                match view.get(index).map(|v| v.0) {
                    Some(Origin::Added(j)) => self.add.insert(j, h),
                    Some(Origin::Inserted(j)) => {
                        let at = self.insert[j].0;
                        self.insert.insert(j, (at, h));
                    }
                    Some(Origin::Original { i, .. }) => {
                        // After the insertions already in front of field i.
                        let pos = self
                            .insert
                            .iter()
                            .rposition(|(at, _)| *at <= i)
                            .map_or(0, |p| p + 1);
                        self.insert.insert(pos, (i, h));
                    }
                    None => self.insert.push((fields.len(), h)),
                }
            }
            Response::ChgHeader { index, name, value } => {
                // Index 0 means the first, as Sendmail and Postfix take it.
                let k = (index as usize).max(1);
                let lname = name.to_ascii_lowercase().into_bytes();
                let hit = view
                    .iter()
                    .filter(|(_, n)| *n == lname)
                    .nth(k - 1)
                    .map(|v| v.0);
                let new_value = if value.is_empty() { None } else { Some(value) };
                match hit {
                    Some(Origin::Added(j)) => match new_value {
                        Some(v) => self.add[j] = header(name, v)?,
                        None => {
                            self.add.remove(j);
                        }
                    },
                    Some(Origin::Inserted(j)) => match new_value {
                        Some(v) => self.insert[j].1 = header(name, v)?,
                        None => {
                            self.insert.remove(j);
                        }
                    },
                    Some(Origin::Original { i, .. }) => {
                        if let Some(v) = &new_value {
                            header(name.clone(), v.clone())?;
                        }
                        // The occurrence among all of the content's fields of that name.
                        let occ = fields[..=i]
                            .iter()
                            .filter(|f| eq_name(&f.name, name.as_bytes()))
                            .count();
                        self.change.retain(|c| {
                            !(c.index == occ && eq_name(c.name.as_bytes(), name.as_bytes()))
                        });
                        self.change.push(HeaderChange {
                            name,
                            index: occ,
                            value: new_value,
                        });
                    }
                    // No such field: a change adds it, a deletion does nothing (as
                    // Sendmail and Postfix do).
                    None => {
                        if let Some(v) = new_value {
                            self.add.push(header(name, v)?);
                        }
                    }
                }
            }
            Response::Quarantine(reason) => {
                let reason = reason.replace(['\r', '\n'], " ");
                self.quarantine = Some(reason);
            }
            other => return Err(format!("unexpected {}", other.name())),
        }
        Ok(())
    }
}

/// `{daemon_addr}`: the address the client reached.
fn daemon_addr(s: &SessionInfo) -> String {
    s.local.ip().to_string()
}

/// `{auth_type}`: the SASL mechanism of a successful AUTH.
fn auth_mechanism(s: &SessionInfo) -> String {
    s.auth_mechanism.clone().unwrap_or_default()
}

/// A plain reader as [`Content`]: readable once (a second reader is empty). The server
/// calls [`Hooks::data_from`], which re-reads the stored file for each milter.
struct Once<'a>(Option<&'a mut dyn Read>);

impl Content for Once<'_> {
    fn reader(&mut self) -> io::Result<Box<dyn Read + '_>> {
        match self.0.take() {
            Some(r) => Ok(Box::new(r)),
            None => Ok(Box::new(io::empty())),
        }
    }
}

impl Hooks for Milters {
    /// Never refuses here: a milter's refusal or absence answers HELO and MAIL (SPEC 9).
    fn connect(&self, s: &SessionInfo) -> Result<(), Reply> {
        self.on_connect(s);
        Ok(())
    }
    fn helo(&self, s: &SessionInfo, name: &str) -> Result<(), Reply> {
        self.on_helo(s, name)
    }
    fn mail(&self, s: &SessionInfo, from: &ReversePath, params: &MailParams) -> Result<(), Reply> {
        self.on_mail(s, from, params)
    }
    fn rcpt(&self, s: &SessionInfo, _e: &Envelope, to: &Address) -> Result<(), Reply> {
        self.on_rcpt(s, to)
    }
    fn data_start(&self, s: &SessionInfo, _e: &Envelope, queue_id: &str) {
        if let Some(sm) = self.session(s.id) {
            sm.lock().unwrap_or_else(|p| p.into_inner()).queue_id = queue_id.to_string();
        }
    }
    fn data(
        &self,
        s: &SessionInfo,
        _e: &Envelope,
        content: &mut dyn Read,
    ) -> Result<DataVerdict, Reply> {
        self.on_data(s, &mut Once(Some(content)))
    }
    fn data_from(
        &self,
        s: &SessionInfo,
        _e: &Envelope,
        content: &mut dyn Content,
    ) -> Result<DataVerdict, Reply> {
        self.on_data(s, content)
    }
    fn reset(&self, s: &SessionInfo) {
        self.on_reset(s)
    }
    fn close(&self, s: &SessionInfo) {
        self.on_close(s)
    }
    fn wants_data(&self) -> bool {
        !self.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let inet = |h: &str, p| MilterAddress::Inet {
            host: h.into(),
            port: p,
        };
        assert_eq!(
            MilterAddress::parse("inet:127.0.0.1:8891"),
            Ok(inet("127.0.0.1", 8891))
        );
        assert_eq!(
            MilterAddress::parse("inet:[::1]:8891"),
            Ok(inet("::1", 8891))
        );
        assert_eq!(MilterAddress::parse("inet6:[::1]:12"), Ok(inet("::1", 12)));
        assert_eq!(
            MilterAddress::parse("inet:8891@localhost"),
            Ok(inet("localhost", 8891))
        );
        assert_eq!(
            MilterAddress::parse("unix:/run/opendkim/opendkim.sock"),
            Ok(MilterAddress::Unix("/run/opendkim/opendkim.sock".into()))
        );
        for bad in [
            "",
            "inet:",
            "inet:host",
            "inet:host:0",
            "inet:host:99999",
            "tcp:h:1",
            "unix:",
            "inet::25",
            "127.0.0.1:8891",
        ] {
            assert!(MilterAddress::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn fields(text: &[u8]) -> (Vec<Field>, Vec<u8>, Vec<u8>) {
        let mut r = io::Cursor::new(text);
        let (f, start) = read_header_section(&mut r).unwrap_or_default();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap_or_default();
        (f, start, rest)
    }

    #[test]
    fn header_section() {
        let (f, start, rest) = fields(b"Subject: a\r\n b\r\nFrom:x\r\nTo :  y\r\n\r\nbody\r\n");
        assert_eq!(
            f,
            vec![
                Field {
                    name: b"Subject".to_vec(),
                    value: b"a\n b".to_vec()
                },
                Field {
                    name: b"From".to_vec(),
                    value: b"x".to_vec()
                },
                Field {
                    name: b"To".to_vec(),
                    value: b" y".to_vec()
                },
            ]
        );
        assert_eq!((start, rest), (Vec::new(), b"body\r\n".to_vec()));
        // No empty line: the first line that is not a field starts the body.
        let (f, start, rest) = fields(b"A: 1\r\nnot a header\r\nB: 2\r\n");
        assert_eq!(f.len(), 1);
        assert_eq!(start, b"not a header\r\n");
        assert_eq!(rest, b"B: 2\r\n");
        let (f, start, _) = fields(b" leading space\r\n");
        assert!(f.is_empty());
        assert_eq!(start, b" leading space\r\n");
    }

    fn fl(list: &[(&str, &str)]) -> Vec<Field> {
        list.iter()
            .map(|(n, v)| Field {
                name: n.as_bytes().to_vec(),
                value: v.as_bytes().to_vec(),
            })
            .collect()
    }

    fn shown(e: &Edits, f: &[Field]) -> Vec<String> {
        e.view(f)
            .iter()
            .map(|v| {
                format!(
                    "{}: {}",
                    String::from_utf8_lossy(v.name),
                    String::from_utf8_lossy(v.value)
                )
            })
            .collect()
    }

    #[test]
    fn edits_compose_across_milters() {
        let f = fl(&[
            ("From", "a"),
            ("Subject", "s"),
            ("To", "b"),
            ("Subject", "t"),
        ]);
        let mut e = Edits::default();
        let ins = |index: u32, name: &str, value: &str| Response::InsHeader {
            index,
            name: name.into(),
            value: value.into(),
        };
        let chg = |index: u32, name: &str, value: &str| Response::ChgHeader {
            index,
            name: name.into(),
            value: value.into(),
        };
        // Milter 1: each edit applies to the header as the ones before left it (as
        // Sendmail applies them): index 1 is From once X-A is added on top.
        e.apply(
            &f,
            Response::AddHeader {
                name: "X-A".into(),
                value: "1".into(),
            },
        )
        .unwrap_or_default();
        e.apply(&f, ins(1, "X-I", "2")).unwrap_or_default();
        e.apply(&f, chg(2, "subject", "T2")).unwrap_or_default();
        assert_eq!(
            shown(&e, &f),
            [
                "X-A: 1",
                "X-I: 2",
                "From: a",
                "Subject: s",
                "To: b",
                "Subject: T2"
            ]
        );
        // Milter 2 sees that view: index 0 is X-A, the 1st Subject is the content's first.
        e.apply(&f, ins(0, "X-Top", "0")).unwrap_or_default();
        e.apply(&f, chg(1, "Subject", "")).unwrap_or_default();
        e.apply(&f, chg(1, "X-I", "22")).unwrap_or_default();
        e.apply(&f, chg(1, "X-New", "n")).unwrap_or_default();
        e.apply(&f, ins(99, "X-End", "e")).unwrap_or_default();
        assert_eq!(
            shown(&e, &f),
            [
                "X-Top: 0",
                "X-A: 1",
                "X-New: n",
                "X-I: 22",
                "From: a",
                "To: b",
                "Subject: T2",
                "X-End: e"
            ]
        );
        assert_eq!(e.change.len(), 2);
        assert!(e
            .apply(
                &f,
                Response::AddHeader {
                    name: "Bad Name".into(),
                    value: "x".into()
                }
            )
            .is_err());
        assert!(e
            .apply(
                &f,
                Response::AddHeader {
                    name: "X".into(),
                    value: "a\r\nB: forged".into()
                }
            )
            .is_err());
    }

    /// The verdict, applied the way the delivery applies it, gives the header the last
    /// milter saw (added fields apart: those go above the content's section).
    #[test]
    fn verdict_matches_the_delivery_edits() {
        let f = fl(&[
            ("From", "a"),
            ("Subject", "s"),
            ("To", "b"),
            ("Subject", "t"),
            ("Cc", "c"),
        ]);
        let section: Vec<u8> = f
            .iter()
            .flat_map(|x| [&x.name[..], b": ", &x.value[..], b"\r\n"].concat())
            .collect();
        let ins = |index: u32, name: &str| Response::InsHeader {
            index,
            name: name.into(),
            value: "v".into(),
        };
        let chg = |index: u32, name: &str, value: &str| Response::ChgHeader {
            index,
            name: name.into(),
            value: value.into(),
        };
        let scripts: Vec<Vec<Response>> = vec![
            vec![
                chg(1, "Subject", ""),
                chg(2, "Subject", "T2"),
                ins(1, "X-1"),
            ],
            vec![
                ins(0, "X-0"),
                ins(3, "X-3"),
                chg(1, "To", ""),
                ins(3, "X-3b"),
                ins(9, "X-End"),
            ],
            vec![
                chg(2, "subject", ""),
                chg(1, "Subject", ""),
                ins(2, "X-2"),
                chg(1, "Cc", "C"),
            ],
            vec![
                ins(2, "X-A"),
                ins(2, "X-B"),
                chg(1, "From", ""),
                chg(1, "X-A", "changed"),
            ],
        ];
        for script in scripts {
            let mut e = Edits::default();
            for m in script.clone() {
                e.apply(&f, m).unwrap_or_default();
            }
            let want: Vec<String> = e
                .view(&f)
                .iter()
                .filter(|v| !matches!(v.origin, Origin::Added(_)))
                .map(|v| {
                    format!(
                        "{}: {}",
                        String::from_utf8_lossy(v.name),
                        String::from_utf8_lossy(v.value)
                    )
                })
                .collect();
            let mut v = DataVerdict::default();
            e.into_verdict(&f, &mut v);
            let edited = crate::delivery::edit_header_section(&section, &v.insert, &v.change)
                .unwrap_or_default();
            let got: Vec<String> = String::from_utf8_lossy(&edited)
                .split_terminator("\r\n")
                .map(str::to_string)
                .collect();
            assert_eq!(got, want, "{script:?}");
        }
    }
}
