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
    Read {
        path: PathBuf,
        err: std::io::Error,
    },
    Parse {
        path: PathBuf,
        message: String,
    },
    Invalid {
        path: PathBuf,
        key: String,
        line: Option<usize>,
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

impl std::error::Error for ConfigError {}

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub hostname: String,
    pub server: ServerConfig,
    pub tls: Option<TlsConfig>,
    pub limits: Limits,
    pub spool: SpoolConfig,
    pub policy: PolicyConfig,
    pub auth: Option<AuthConfig>,
    pub mailboxes: Option<MailboxesConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: Vec<String>,
    pub tls_listen: Vec<String>,
    pub workers: usize,
    pub max_connections_per_ip: usize,
    pub proxy_protocol: bool,
    pub shutdown_grace_secs: u64,
    pub stats_interval_secs: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub require_tls: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_line_length: usize,
    pub bare_lf: BareLfPolicy,
    pub max_errors: u32,
    pub command_timeout_secs: u64,
    pub data_timeout_secs: u64,
    pub min_data_rate: u64,
}

/// `limits.bare_lf`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BareLfPolicy {
    Normalize,
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

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    pub dir: PathBuf,
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
    #[default]
    File,
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

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub accept_domains: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub allow_plaintext: bool,
    pub users: Vec<User>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub password_hash: String,
}

/// `[mailboxes]` (SPEC 8): recipients validated at RCPT and delivered per mailbox.
/// The maps themselves are built and checked by [`crate::mailboxes`].
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
        if !s.tls_listen.is_empty() && self.tls.is_none() {
            return err(
                "server.tls_listen",
                "implicit TLS listeners need a [tls] section".into(),
            );
        }
        let positive: [(&str, u64); 9] = [
            ("server.workers", s.workers as u64),
            (
                "server.max_connections_per_ip",
                s.max_connections_per_ip as u64,
            ),
            ("limits.max_message_size", self.limits.max_message_size),
            ("limits.max_recipients", self.limits.max_recipients as u64),
            ("limits.max_line_length", self.limits.max_line_length as u64),
            ("limits.max_errors", u64::from(self.limits.max_errors)),
            (
                "limits.command_timeout_secs",
                self.limits.command_timeout_secs,
            ),
            ("limits.data_timeout_secs", self.limits.data_timeout_secs),
            ("server.shutdown_grace_secs", s.shutdown_grace_secs.max(1)),
        ];
        for (key, v) in positive {
            if v == 0 {
                return err(key, "must be greater than 0".into());
            }
        }
        if self.limits.max_line_length < 512 {
            // RFC 5321 §4.5.3.1.4: a command line may be 512 octets.
            return err(
                "limits.max_line_length",
                "must be at least 512 (RFC 5321 4.5.3.1.4)".into(),
            );
        }
        if s.workers > 100_000 {
            return err("server.workers", "more than 100000 threads".into());
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

/// The 1-based line of `key` (dotted: `limits.max_errors`) in the file, if it is there.
fn line_of_key(text: &str, dotted: &str) -> Option<usize> {
    let (table, key) = match dotted.rsplit_once('.') {
        Some((t, k)) => (t, k),
        None => ("", dotted),
    };
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if let Some(h) = l.strip_prefix('[') {
            current = h.trim_end_matches(']').trim().to_string();
            continue;
        }
        if current == table {
            if let Some((k, _)) = l.split_once('=') {
                if k.trim() == key {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn effective_settings_hide_password_hashes() {
        let c =
            parse("[auth]\nusers = [{ name = \"alice\", password_hash = \"$argon2id$secret\" }]\n")
                .unwrap();
        let shown = c.to_toml();
        assert!(!shown.contains("secret") && shown.contains("alice"));
    }
}
