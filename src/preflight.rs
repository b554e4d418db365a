//! `mailer check-config`: what would fail at start, checked without changing anything.

use crate::auth::Users;
use crate::config::Config;
use crate::tls;
use std::fmt;
use std::io;
use std::net::TcpListener;

/// One problem [`preflight`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Finding {
    /// True when the server would not start (or not work) with this config.
    pub fatal: bool,
    /// What the finding is about, e.g. `spool.dir` or `server.listen 0.0.0.0:25`;
    /// empty when the message names it already.
    pub what: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = if self.fatal { "error" } else { "warning" };
        if self.what.is_empty() {
            write!(f, "{level}: {}", self.message)
        } else {
            write!(f, "{level}: {}: {}", self.what, self.message)
        }
    }
}

/// What would fail when a server starts with `config`, checked without changing
/// anything (`mailer check-config`): the TLS files and users load, the spool directory
/// is (or can be created as) a writable directory, the listen addresses can be bound.
/// An address in use or needing privileges is only a warning: the server may already
/// be running, and a service manager may grant `CAP_NET_BIND_SERVICE`.
pub(crate) fn preflight(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut fatal = |what: &str, message: String| {
        out.push(Finding {
            fatal: true,
            what: what.to_string(),
            message,
        })
    };
    if let Some(t) = &config.tls {
        if let Err(e) = tls::load_certified_key(&t.cert, &t.key) {
            fatal("", e.to_string());
        }
    }
    if let Some(a) = &config.auth {
        if let Err(e) = Users::from_config(a) {
            fatal("", e.to_string());
        }
    }
    let mut mailbox_warnings = Vec::new();
    if let Some(m) = &config.mailboxes {
        // Syntax, loops, depth and dangling targets, users_file included (SPEC 8).
        match crate::mailboxes::Maps::build(m) {
            Ok(maps) => {
                for d in maps.without_postmaster() {
                    mailbox_warnings.push(Finding {
                        fatal: false,
                        what: "mailboxes".into(),
                        message: format!(
                            "postmaster@{d} is neither a user nor an alias (RFC 5321 4.5.1)"
                        ),
                    });
                }
            }
            Err(e) => fatal("", e),
        }
    }
    if let Err(message) = check_spool_dir(&config.spool.dir) {
        fatal("spool.dir", message);
    }
    out.extend(mailbox_warnings);
    for (key, list) in [
        ("server.listen", config.listen_addrs()),
        ("server.tls_listen", config.tls_listen_addrs()),
    ] {
        for addr in list {
            let what = format!("{key} {addr}");
            match TcpListener::bind(addr) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => out.push(Finding {
                    fatal: false,
                    what,
                    message: "address in use (is the server already running?)".into(),
                }),
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => out.push(Finding {
                    fatal: false,
                    what,
                    message: format!("{e}: a port below 1024 needs root or CAP_NET_BIND_SERVICE"),
                }),
                Err(e) => out.push(Finding {
                    fatal: true,
                    what,
                    message: format!("cannot listen: {e}"),
                }),
            }
        }
    }
    out
}

/// The spool directory and its `tmp/`, `new/`, `cur/` must be directories the server
/// can write in; a missing one must be creatable. Probes with a temporary file that is
/// removed again; creates nothing else. `ServerBuilder::build` makes the same check.
pub(crate) fn check_spool_dir(dir: &std::path::Path) -> Result<(), String> {
    let probe = |d: &std::path::Path| -> Result<(), String> {
        let f = d.join(format!(".mailer-check-{}", std::process::id()));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&f)
            .map_err(|e| format!("{}: cannot create files: {e}", d.display()))?;
        std::fs::remove_file(&f).map_err(|e| format!("{}: {e}", f.display()))
    };
    let is_dir = |d: &std::path::Path| -> Result<bool, String> {
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => Ok(true),
            Ok(_) => Err(format!("{}: not a directory", d.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(format!("{}: {e}", d.display())),
        }
    };
    if is_dir(dir)? {
        probe(dir)?;
        for sub in ["tmp", "new", "cur"] {
            let d = dir.join(sub);
            if is_dir(&d)? {
                probe(&d)?;
            }
        }
        return Ok(());
    }
    // Missing: the nearest existing ancestor must let the server create it.
    let cannot = |e: String| format!("cannot create {}: {e}", dir.display());
    let mut parent = dir.parent();
    while let Some(p) = parent {
        // A relative path's last ancestor is "": the working directory.
        let last = p.as_os_str().is_empty();
        let p = if last { std::path::Path::new(".") } else { p };
        if is_dir(p).map_err(cannot)? {
            return probe(p).map_err(cannot);
        }
        parent = if last { None } else { p.parent() };
    }
    Err(cannot("no existing parent directory".into()))
}

/// `mailboxes: N users, N aliases, N domains` for `check-config`, when `[mailboxes]`
/// is set and its maps build.
pub(crate) fn mailbox_summary(config: &Config) -> Option<String> {
    let maps = crate::mailboxes::Maps::build(config.mailboxes.as_ref()?).ok()?;
    let (u, a, d) = maps.counts();
    Some(format!("mailboxes: {u} users, {a} aliases, {d} domains"))
}
