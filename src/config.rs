//! The TOML configuration (SPEC 3): every key with its default, strict parsing
//! (unknown keys are errors) and validation with messages that name file, key and line.

use crate::protocol::data::BareLf;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A configuration problem: which file, which key, which line, what is wrong.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The file is not valid TOML, or has a key of the wrong type or an unknown key.
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with its line and column.
        message: String,
    },
    /// A value is out of its bounds or inconsistent with another.
    Invalid {
        /// The file.
        path: PathBuf,
        /// The dotted key, e.g. `limits.max_errors`.
        key: String,
        /// The key's line in the file, when it is there (not a default).
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, err } => {
                write!(f, "{}: cannot read config file: {err}", path.display())
            }
            ConfigError::Parse { path, message } => write!(f, "{}: {message}", path.display()),
            ConfigError::Invalid {
                path,
                key,
                line,
                message,
            } => {
                write!(f, "{}", path.display())?;
                if let Some(l) = line {
                    write!(f, ":{l}")?;
                }
                write!(f, ": key `{key}`: {message}")
            }
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { err, .. } => Some(err),
            ConfigError::Parse { .. } | ConfigError::Invalid { .. } => None,
        }
    }
}

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The name the server gives itself: in the greeting, the EHLO reply and the
    /// `Received:` header (default `localhost`).
    pub hostname: String,
    /// `[server]`: listeners, workers, connection limits.
    pub server: ServerConfig,
    /// `[tls]`: STARTTLS and implicit TLS; absent, neither is offered.
    pub tls: Option<TlsConfig>,
    /// `[limits]`: sizes, counts and timeouts per session.
    pub limits: Limits,
    /// `[spool]`: where and how messages are stored.
    pub spool: SpoolConfig,
    /// `[policy]`: which recipient domains are accepted.
    pub policy: PolicyConfig,
    /// `[auth]`: SMTP AUTH (RFC 4954); absent, AUTH is not offered.
    pub auth: Option<AuthConfig>,
    /// `[mailboxes]`: recipient validation and per-mailbox delivery.
    pub mailboxes: Option<MailboxesConfig>,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `[[milter]]` tables, called in this order (SPEC 9).
    pub milter: Vec<MilterConfig>,
}

/// One `[[milter]]` table; the timeouts are Postfix's milter_*_timeout.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MilterConfig {
    /// `inet:host:port` or `unix:/path` (Postfix syntax).
    pub address: String,
    /// Seconds to connect to the filter (default 30).
    pub connect_timeout_secs: u64,
    /// Seconds to wait for each reply to a command (default 30).
    pub command_timeout_secs: u64,
    /// Seconds to wait for the reply to the end of the message (default 300).
    pub content_timeout_secs: u64,
    /// What the client gets when the filter fails (default tempfail).
    pub default_action: DefaultAction,
}

/// What a milter that is down, slow or malformed costs the client (SPEC 9).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    /// 451 4.7.1
    Tempfail,
    /// The milter is skipped.
    Accept,
    /// 550 5.7.1
    Reject,
}

impl Default for MilterConfig {
    fn default() -> MilterConfig {
        MilterConfig {
            address: String::new(),
            connect_timeout_secs: 30,
            command_timeout_secs: 30,
            content_timeout_secs: 300,
            default_action: DefaultAction::Tempfail,
        }
    }
}

/// `[server]`: where the server listens and how many sessions it runs.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// `address:port` listeners for plain SMTP with STARTTLS (default
    /// `127.0.0.1:2525`).
    pub listen: Vec<String>,
    /// `address:port` listeners where TLS starts at once (RFC 8314 implicit TLS).
    pub tls_listen: Vec<String>,
    /// Worker threads, one session each at a time (default 64).
    pub workers: usize,
    /// Sessions one client address may hold at once (default 16).
    pub max_connections_per_ip: usize,
    /// IPv6 clients share one `max_connections_per_ip` budget per prefix of this length.
    pub ipv6_prefix: u8,
    /// Every connection starts with a PROXY protocol header (v1 or v2) naming the
    /// real client.
    pub proxy_protocol: bool,
    /// Seconds sessions get to finish after a stop is asked for (default 30).
    pub shutdown_grace_secs: u64,
    /// Seconds between statistics lines in the log; 0: none (default 60).
    pub stats_interval_secs: u64,
}

/// `[tls]`: the server's certificate for STARTTLS (RFC 3207) and implicit TLS.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf.
    pub key: PathBuf,
    /// MAIL and AUTH are refused (530 5.7.0) until TLS is active.
    pub require_tls: bool,
}

/// `[limits]`: what one session may send and how long it may take.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message in bytes, advertised as SIZE (RFC 1870; default 25 MiB).
    pub max_message_size: u64,
    /// Recipients per transaction (default 100).
    pub max_recipients: usize,
    /// Longest command or text line, CRLF included (default 1000, RFC 5321 §4.5.3.1).
    pub max_line_length: usize,
    /// What a bare LF in message data gets.
    pub bare_lf: BareLfPolicy,
    /// Failed commands before the session is closed with 421 (default 10).
    pub max_errors: u32,
    /// Seconds to wait for a command (default 300, RFC 5321 §4.5.3.2.7).
    pub command_timeout_secs: u64,
    /// Seconds to wait for each block of message data (default 180).
    pub data_timeout_secs: u64,
    /// Bytes per second a message must keep up once `data_timeout_secs` has passed;
    /// 0: no floor (default 500).
    pub min_data_rate: u64,
    /// NOOP/RSET/VRFY/EXPN/HELP beyond this many each count as an error.
    pub max_junk_commands: u32,
    /// Whole-session lifetime, checked at each command.
    pub session_timeout_secs: u64,
}

/// `limits.bare_lf`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BareLfPolicy {
    /// A bare LF is stored as CRLF.
    Normalize,
    /// A message with a bare LF is refused (SMTP smuggling defence).
    Reject,
}

impl From<BareLfPolicy> for BareLf {
    fn from(p: BareLfPolicy) -> BareLf {
        match p {
            BareLfPolicy::Normalize => BareLf::Normalize,
            BareLfPolicy::Reject => BareLf::Reject,
        }
    }
}

/// `[spool]`: the Maildir messages are stored in.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// The Maildir (`tmp/`, `new/`, `cur/` are created; default `spool`).
    pub dir: PathBuf,
    /// Make each message durable before it is acknowledged (default true).
    pub fsync: bool,
    /// Octal permissions of stored files, e.g. "0640"; directories get the same bits
    /// plus x (see [`SpoolConfig::file_mode`]).
    pub file_mode: String,
    /// How message data is made durable (with `fsync`): "file", one fdatasync per
    /// message by its session, or "batch", one syncfs per batch by the spool writer
    /// (for a spool on a filesystem of its own; see `spool::DataSync`).
    pub data_sync: DataSyncPolicy,
}

/// `[spool] data_sync`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataSyncPolicy {
    /// One fdatasync per message, by its session.
    #[default]
    File,
    /// One syncfs per batch, by the spool writer.
    Batch,
}

impl SpoolConfig {
    /// `file_mode` as bits: owner read and write, group at most read and write, others
    /// at most read; never x, set-id or sticky bits (stored mail is data, and a
    /// world-writable spool would let anyone forge messages).
    pub fn file_mode(&self) -> Result<u32, String> {
        let s = self.file_mode.trim();
        let digits = s.strip_prefix("0o").unwrap_or(s);
        let mode = (!digits.is_empty() && digits.len() <= 4)
            .then(|| u32::from_str_radix(digits, 8).ok())
            .flatten()
            .ok_or_else(|| format!("{:?} is not an octal mode such as \"0640\"", self.file_mode))?;
        if mode & 0o600 != 0o600 {
            return Err(format!("{s}: the owner must be able to read and write"));
        }
        if mode & !0o666 != 0 {
            return Err(format!("{s}: no execute, set-id or sticky bits"));
        }
        if mode & 0o002 != 0 {
            return Err(format!("{s}: must not be world-writable"));
        }
        Ok(mode)
    }
}

/// `[policy]`: the built-in relay check.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Recipient domains accepted; empty: every domain. Others get 550 5.7.1.
    pub accept_domains: Vec<String>,
}

/// `[auth]`: SMTP AUTH PLAIN and LOGIN (RFC 4954, RFC 4616).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Offer AUTH without TLS too (default false: passwords never travel in clear).
    pub allow_plaintext: bool,
    /// The accounts.
    pub users: Vec<User>,
    /// Failed AUTH attempts per client address per 60 s before AUTH is refused; 0: off.
    pub rate_limit: u32,
}

/// `[metrics]`: the Prometheus endpoint (SPEC 10).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `address:port` for `GET /metrics`; empty: no endpoint.
    pub listen: String,
}

/// One `[[auth.users]]` account.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// The login name.
    pub name: String,
    /// An argon2 PHC string, as `mailer hash-password` prints (RFC 9106).
    pub password_hash: String,
}

/// `[mailboxes]` (SPEC 8): recipients validated at RCPT and delivered per mailbox.
/// The maps themselves are built and checked by the crate's `mailboxes` module.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MailboxesConfig {
    /// Mailbox `a@d.test` is the Maildir `<root>/d.test/a/`.
    pub root: PathBuf,
    /// Addresses that have a mailbox.
    pub users: Vec<String>,
    /// One address per line, `#` comments; empty: none. Re-read when it changes.
    pub users_file: PathBuf,
    /// `address` or `@domain` (catch-all) to a list of target addresses.
    pub aliases: std::collections::BTreeMap<String, Vec<String>>,
    /// Each character separates a local part from its extension; empty: off.
    pub recipient_delimiter: String,
}

impl Default for MailboxesConfig {
    fn default() -> MailboxesConfig {
        MailboxesConfig {
            root: "mail".into(),
            users: Vec::new(),
            users_file: PathBuf::new(),
            aliases: Default::default(),
            recipient_delimiter: "+".into(),
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            hostname: "localhost".into(),
            server: ServerConfig::default(),
            tls: None,
            limits: Limits::default(),
            spool: SpoolConfig::default(),
            policy: PolicyConfig::default(),
            auth: None,
            mailboxes: None,
            metrics: MetricsConfig::default(),
            milter: Vec::new(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            listen: vec!["127.0.0.1:2525".into()],
            tls_listen: vec![],
            workers: 64,
            max_connections_per_ip: 16,
            ipv6_prefix: 64,
            proxy_protocol: false,
            shutdown_grace_secs: 30,
            stats_interval_secs: 60,
        }
    }
}

impl Default for TlsConfig {
    fn default() -> TlsConfig {
        TlsConfig {
            cert: "certs/cert.pem".into(),
            key: "certs/key.pem".into(),
            require_tls: false,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_message_size: 26_214_400,
            max_recipients: 100,
            max_line_length: 1000,
            bare_lf: BareLfPolicy::Normalize,
            max_errors: 10,
            command_timeout_secs: 300,
            data_timeout_secs: 180,
            min_data_rate: 500,
            max_junk_commands: 100,
            session_timeout_secs: 3600,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> AuthConfig {
        AuthConfig {
            allow_plaintext: false,
            users: Vec::new(),
            rate_limit: 10,
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> SpoolConfig {
        SpoolConfig {
            dir: "spool".into(),
            fsync: true,
            file_mode: "0600".into(),
            data_sync: DataSyncPolicy::File,
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file. Relative paths inside it (spool dir,
    /// certificates) are resolved against the working directory, as Postfix does.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: path.to_path_buf(),
            err,
        })?;
        Config::from_toml(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: describe_toml_error(text, &e),
        })?;
        cfg.validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.to_path_buf(),
                line: line_of_key(text, &key),
                key,
                message,
            })?;
        Ok(cfg)
    }

    /// Checks values that parse but make no sense. Returns (dotted key, problem).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        if self.hostname.is_empty()
            || crate::protocol::address::check_domain(&self.hostname).is_err()
        {
            return err(
                "hostname",
                format!("{:?} is not a valid host name", self.hostname),
            );
        }
        if !self.hostname.is_ascii() {
            // It is written into every Received header, and a header of a message
            // sent without SMTPUTF8 must stay ASCII (invariant 11).
            return err(
                "hostname",
                format!(
                    "{:?}: write an internationalized name in its xn-- (A-label) form",
                    self.hostname
                ),
            );
        }
        let s = &self.server;
        if s.listen.is_empty() && s.tls_listen.is_empty() {
            return err("server.listen", "no listen address at all".into());
        }
        for (key, list) in [
            ("server.listen", &s.listen),
            ("server.tls_listen", &s.tls_listen),
        ] {
            for a in list {
                if a.parse::<SocketAddr>().is_err() {
                    return err(
                        key,
                        format!("{a:?} is not an address:port such as \"127.0.0.1:2525\""),
                    );
                }
            }
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            let a = &self.metrics.listen;
            return err(
                "metrics.listen",
                format!("{a:?} is not an address:port such as \"127.0.0.1:9425\""),
            );
        }
        if !s.tls_listen.is_empty() && self.tls.is_none() {
            return err(
                "server.tls_listen",
                "implicit TLS listeners need a [tls] section".into(),
            );
        }
        // Invariant 12: every number has a range, so nothing later overflows (an
        // Instant plus a 2^63-second timeout panics) or starves the host. One line per
        // key; the ranges and their reasons are in docs/configuration.md.
        let l = &self.limits;
        range("server.workers", s.workers as u64, 1, 10_000)?;
        range(
            "server.max_connections_per_ip",
            s.max_connections_per_ip as u64,
            1,
            100_000,
        )?;
        range("server.shutdown_grace_secs", s.shutdown_grace_secs, 0, HOUR)?;
        range("server.stats_interval_secs", s.stats_interval_secs, 0, DAY)?;
        range("limits.max_message_size", l.max_message_size, 1, 4 * GIB)?;
        range("limits.max_recipients", l.max_recipients as u64, 1, 100_000)?;
        // RFC 5321 §4.5.3.1.4: a command line may be 512 octets.
        range(
            "limits.max_line_length",
            l.max_line_length as u64,
            512,
            65_536,
        )?;
        range("limits.max_errors", u64::from(l.max_errors), 1, 1_000_000)?;
        range(
            "limits.command_timeout_secs",
            l.command_timeout_secs,
            1,
            DAY,
        )?;
        range("limits.data_timeout_secs", l.data_timeout_secs, 1, DAY)?;
        range("limits.min_data_rate", l.min_data_rate, 0, GIB)?;
        range("server.ipv6_prefix", u64::from(s.ipv6_prefix), 1, 128)?;
        range(
            "limits.max_junk_commands",
            u64::from(l.max_junk_commands),
            0,
            1_000_000,
        )?;
        range(
            "limits.session_timeout_secs",
            l.session_timeout_secs,
            1,
            7 * DAY,
        )?;
        if let Some(a) = &self.auth {
            range("auth.rate_limit", u64::from(a.rate_limit), 0, 1_000_000)?;
        }
        if self.spool.dir.as_os_str().is_empty() {
            return err("spool.dir", "must not be empty".into());
        }
        self.spool
            .file_mode()
            .map(|_| ())
            .or_else(|m| err("spool.file_mode", m))?;
        for d in &self.policy.accept_domains {
            if crate::protocol::address::check_domain(d).is_err() {
                return err("policy.accept_domains", format!("{d:?} is not a domain"));
            }
        }
        if let Some(m) = &self.mailboxes {
            crate::mailboxes::check_inline(m).map_err(|(k, e)| (format!("mailboxes.{k}"), e))?;
        }
        if let Some(a) = &self.auth {
            for u in &a.users {
                if u.name.is_empty() {
                    return err("auth.users", "a user has an empty name".into());
                }
            }
        }
        for (i, m) in self.milter.iter().enumerate() {
            if let Err(e) = crate::milter::MilterAddress::parse(&m.address) {
                return err(&format!("milter[{i}].address"), e);
            }
            for (k, v) in [
                ("connect_timeout_secs", m.connect_timeout_secs),
                ("command_timeout_secs", m.command_timeout_secs),
                ("content_timeout_secs", m.content_timeout_secs),
            ] {
                if !(1..=3600).contains(&v) {
                    return err(&format!("milter[{i}].{k}"), "must be 1 to 3600".into());
                }
            }
        }
        Ok(())
    }

    /// Socket addresses of the plain listeners (validated).
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.server
            .listen
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    /// Socket addresses of the implicit-TLS listeners (validated).
    pub fn tls_listen_addrs(&self) -> Vec<SocketAddr> {
        self.server
            .tls_listen
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    /// The metrics endpoint's address, when `[metrics] listen` is set (validated).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.listen.parse().ok()
    }

    /// The effective settings as TOML (for `check-config`).
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if let Some(a) = &mut shown.auth {
            for u in &mut a.users {
                u.password_hash = "(set)".into();
            }
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot print settings: {e}\n"))
    }
}

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;
const GIB: u64 = 1 << 30;

/// Checks that `value` of the dotted `key` is within `min..=max` (invariant 12). Other
/// parts of the configuration call it for their own keys, one line each.
pub(crate) fn range(key: &str, value: u64, min: u64, max: u64) -> Result<(), (String, String)> {
    let problem = if value < min && min == 1 {
        "must be greater than 0".to_string()
    } else if value < min {
        format!("must be at least {min}, not {value}")
    } else if value > max {
        format!("must be at most {}, not {value}", describe(key, max))
    } else {
        return Ok(());
    };
    Err((key.to_string(), problem))
}

/// A bound as a reader of the message wants it: `86400 (1 day)`, `4294967296 (4 GiB)`.
fn describe(key: &str, n: u64) -> String {
    let unit = if key.ends_with("_secs") {
        match n {
            n if n >= DAY && n.is_multiple_of(DAY) => Some(plural(n / DAY, "day")),
            n if n >= HOUR && n.is_multiple_of(HOUR) => Some(plural(n / HOUR, "hour")),
            _ => None,
        }
    } else if n >= GIB
        && n.is_multiple_of(GIB)
        && (key.ends_with("_size") || key.ends_with("_rate"))
    {
        Some(format!("{} GiB", n / GIB))
    } else {
        None
    };
    match unit {
        Some(u) => format!("{n} ({u})"),
        None => n.to_string(),
    }
}

fn plural(n: u64, unit: &str) -> String {
    if n == 1 {
        format!("1 {unit}")
    } else {
        format!("{n} {unit}s")
    }
}

/// toml's messages already carry line and column; put them on one line with the key.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let msg = e.message().trim().to_string();
    match line {
        // Quote the line: serde's type errors do not always name the key.
        Some(l) => {
            let src = text.lines().nth(l - 1).unwrap_or("").trim();
            format!("line {l}: {msg} (in `{src}`)")
        }
        None => msg,
    }
}

/// The 1-based line of `key` in the file, if it is there. `key` is dotted as
/// `validate` names it: `limits.max_errors` (in `[limits]`, or written
/// `limits.max_errors = …` at the top), or `milter[1].address` for the second
/// `[[milter]]` table. Good enough for the files people write; `None` otherwise.
fn line_of_key(text: &str, dotted: &str) -> Option<usize> {
    let (table, key) = match dotted.rsplit_once('.') {
        Some((t, k)) => (t, k),
        None => ("", dotted),
    };
    // `name[i]`: the i-th `[[name]]` table.
    let (table, index) = match table.strip_suffix(']').and_then(|t| t.split_once('[')) {
        Some((name, i)) => (name, i.parse::<usize>().ok()),
        None => (table, None),
    };
    let mut current = String::new();
    let mut seen: usize = 0;
    let mut in_wanted = table.is_empty() && index.is_none();
    for (i, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if l.starts_with('[') {
            let array = l.starts_with("[[");
            let name = l.trim_start_matches('[');
            current = name[..name.find(']').unwrap_or(name.len())]
                .trim()
                .to_string();
            in_wanted = current == table
                && match index {
                    Some(n) if array => {
                        seen += 1;
                        seen == n + 1
                    }
                    Some(_) => false,
                    None => !array,
                };
            continue;
        }
        let Some((k, _)) = l.split_once('=') else {
            continue;
        };
        let k = k.trim();
        let dotted_at_top = current.is_empty() && index.is_none() && k == dotted;
        if (in_wanted && k == key) || dotted_at_top {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_error_keeps_its_io_source() {
        use std::error::Error as _;
        let err = Config::load(Path::new("/nonexistent/mailer.toml")).unwrap_err();
        let io = err
            .source()
            .and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(
            io.map(std::io::Error::kind),
            Some(std::io::ErrorKind::NotFound)
        );
    }

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::from_toml(s, Path::new("t.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.hostname, "localhost");
        assert_eq!(c.server.listen, vec!["127.0.0.1:2525"]);
        assert_eq!(c.server.workers, 64);
        assert_eq!(c.limits.max_message_size, 26_214_400);
        assert_eq!(c.limits.bare_lf, BareLfPolicy::Normalize);
        assert!(c.tls.is_none() && c.auth.is_none());
        assert!(c.spool.fsync);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = parse("hostname = \"a.test\"\n[limits]\nmax_sise = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_sise"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.starts_with("t.toml"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = parse("[server]\nworkers = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("workers"), "{e}");
    }

    #[test]
    fn invalid_values_name_key_and_line() {
        let e = parse("[server]\nworkers = 0\n").unwrap_err().to_string();
        assert_eq!(e, "t.toml:2: key `server.workers`: must be greater than 0");
        let e = parse("[server]\nlisten = [\"nowhere\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.listen") && e.contains(":2:"), "{e}");
        let e = parse("[limits]\nbare_lf = \"maybe\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bare_lf") || e.contains("maybe"), "{e}");
    }

    /// Invariant 12: each number is bounded above and below; the message names the
    /// file, the line, the key, the bound and the value.
    #[test]
    fn bounds_name_key_line_and_limit() {
        let e = parse("[limits]\ncommand_timeout_secs = 9223372036854775807\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "t.toml:2: key `limits.command_timeout_secs`: must be at most 86400 (1 day), \
             not 9223372036854775807"
        );
        for (toml, key) in [
            ("[server]\nworkers = 10001\n", "server.workers"),
            (
                "[server]\nmax_connections_per_ip = 0\n",
                "server.max_connections_per_ip",
            ),
            (
                "[server]\nshutdown_grace_secs = 3601\n",
                "server.shutdown_grace_secs",
            ),
            (
                "[server]\nstats_interval_secs = 86401\n",
                "server.stats_interval_secs",
            ),
            (
                "[limits]\nmax_message_size = 4294967297\n",
                "limits.max_message_size",
            ),
            (
                "[limits]\nmax_recipients = 100001\n",
                "limits.max_recipients",
            ),
            (
                "[limits]\nmax_line_length = 65537\n",
                "limits.max_line_length",
            ),
            (
                "[limits]\nmax_line_length = 511\n",
                "limits.max_line_length",
            ),
            ("[limits]\nmax_errors = 1000001\n", "limits.max_errors"),
            (
                "[limits]\ndata_timeout_secs = 86401\n",
                "limits.data_timeout_secs",
            ),
            (
                "[limits]\nmin_data_rate = 1073741825\n",
                "limits.min_data_rate",
            ),
        ] {
            let e = parse(toml).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("t.toml:2: key `{key}`: must be")),
                "{e}"
            );
        }
        // The bounds themselves are allowed.
        let c = parse(
            "[server]\nworkers = 10000\nshutdown_grace_secs = 3600\nstats_interval_secs = 86400\n\
             [limits]\nmax_message_size = 4294967296\nmax_line_length = 65536\n\
             command_timeout_secs = 86400\ndata_timeout_secs = 86400\nmin_data_rate = 0\n",
        );
        assert!(c.is_ok(), "{:?}", c.err());
        let e = parse("hostname = \"bücher.test\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `hostname`") && e.contains("xn--"), "{e}");
    }

    #[test]
    fn lines_of_keys() {
        let text = "hostname = \"a\"\nlimits.max_errors = 3\n[server] # main\nworkers = 1\n\
                    [[milter]]\naddress = \"x\"\n[[milter]]\n  address = \"y\"\n[limits]\nmax_errors = 4\n";
        assert_eq!(line_of_key(text, "hostname"), Some(1));
        assert_eq!(line_of_key(text, "limits.max_errors"), Some(2));
        assert_eq!(line_of_key(text, "server.workers"), Some(4));
        assert_eq!(line_of_key(text, "milter[0].address"), Some(6));
        assert_eq!(line_of_key(text, "milter[1].address"), Some(8));
        assert_eq!(line_of_key(text, "milter[2].address"), None);
        assert_eq!(line_of_key(text, "server.listen"), None);
    }

    #[test]
    fn tables_parse() {
        let c = parse(
            "[tls]\ncert = \"a.pem\"\nkey = \"b.pem\"\nrequire_tls = true\n\
             [auth]\nusers = [{ name = \"alice\", password_hash = \"x\" }]\n",
        )
        .unwrap();
        assert!(c.tls.unwrap().require_tls);
        assert_eq!(c.auth.unwrap().users[0].name, "alice");
    }

    #[test]
    fn metrics_listen_is_an_address_or_empty() {
        assert!(parse("").unwrap().metrics_addr().is_none());
        let c = parse("[metrics]\nlisten = \"127.0.0.1:9425\"\n").unwrap();
        assert_eq!(c.metrics_addr(), Some("127.0.0.1:9425".parse().unwrap()));
        let e = parse("[metrics]\nlisten = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.toml:2: key `metrics.listen`:"), "{e}");
    }

    #[test]
    fn milter_tables() {
        let c = parse(
            "[[milter]]\naddress = \"inet:127.0.0.1:8891\"\n\
             [[milter]]\naddress = \"unix:/run/m.sock\"\ndefault_action = \"accept\"\n\
             command_timeout_secs = 5\n",
        )
        .unwrap();
        assert_eq!(c.milter.len(), 2);
        assert_eq!(c.milter[0].content_timeout_secs, 300);
        assert_eq!(c.milter[0].default_action, DefaultAction::Tempfail);
        assert_eq!(c.milter[1].default_action, DefaultAction::Accept);
        assert_eq!(c.milter[1].command_timeout_secs, 5);
        assert!(c.to_toml().contains("[[milter]]"));
        let e = parse("[[milter]]\naddress = \"tcp:x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("milter[0].address"), "{e}");
        let e = parse("[[milter]]\naddress = \"inet:h:1\"\ncontent_timeout_secs = 3601\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("milter[0].content_timeout_secs"), "{e}");
        let e = parse("[[milter]]\naddress = \"inet:h:1\"\ndefault_action = \"maybe\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("maybe") || e.contains("default_action"), "{e}");
    }

    #[test]
    fn effective_settings_hide_password_hashes() {
        let c =
            parse("[auth]\nusers = [{ name = \"alice\", password_hash = \"$argon2id$secret\" }]\n")
                .unwrap();
        let shown = c.to_toml();
        assert!(!shown.contains("secret") && shown.contains("alice"));
    }
}
