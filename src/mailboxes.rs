//! `[mailboxes]` (SPEC 8): which recipients exist, and which Maildirs they lead to.
//!
//! The maps are built from the config (`users`, `aliases`) and the optional
//! `users_file`, checked whole when they are built (syntax, alias loops, chains deeper
//! than [`MAX_DEPTH`], targets that lead nowhere), and then only read: every alias is
//! expanded once at build time, so a lookup at RCPT is a few hash probes.
//!
//! Matching follows Postfix's virtual maps:
//! - the `recipient_delimiter` extension is stripped (`alice+tag` → `alice`) when the
//!   address as sent has no entry of its own; each character of the setting is a
//!   delimiter (as Postfix ≥ 2.11), and a local part that would become empty is kept;
//! - ASCII letters of the local part are folded (RFC 5321 §2.4 lets the receiving host
//!   decide; every common MTA folds), the domain always, and an IDN domain matches in
//!   its U-label and `xn--` forms (RFC 5890, mapped with UTS #46 by the `idna` crate);
//! - per address: an alias first (so `alice = [alice, bob]` keeps a copy for alice and
//!   forwards one to bob), then a user; then the same for the address without its
//!   extension; then the domain's `@domain` catch-all.
//!
//! A mailbox is the Maildir `<root>/<domain in xn-- lower case>/<local lower case>/`. A
//! local part that could escape that directory (`/`, `..`, a leading `.`, NUL) is never
//! turned into a path: such users are refused when the maps are built and such
//! recipients at RCPT.
//!
//! An alias target outside the mailbox domains is an external address. mailer does not
//! relay, so a copy for it is stored in `spool.dir`, where every recipient outside the
//! mailbox domains goes, for whatever program forwards mail from there; that copy's
//! `Delivered-To:` names the external target (the first one, when a message leads to
//! several: the spool gets one copy per message).

use crate::config::{Config, MailboxesConfig};
use crate::delivery::{Mailbox, Router};
use crate::hooks::{Envelope, Hooks, Policy, SessionInfo};
use crate::protocol::address::Address;
use crate::protocol::reply::{Enhanced, Reply};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// The most alias levels between a recipient and its mailboxes (SPEC 8); deeper is a
/// configuration error, as is a loop.
pub(crate) const MAX_DEPTH: usize = 10;

/// An address in its lookup form: ASCII letters of the local part folded, quotes
/// removed; the domain in lower-case `xn--` form. A catch-all has an empty local part
/// (a real local part never is).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    local: String,
    domain: String,
}

impl Key {
    fn catch_all(domain: &str) -> Key {
        Key {
            local: String::new(),
            domain: domain.to_string(),
        }
    }

    /// `local@domain`, the local part quoted again if it needs it (RFC 5321 §4.1.2).
    fn address(&self) -> String {
        let atext = |c: char| c.is_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c);
        let dot_atom = self.local.chars().all(atext)
            && !self.local.starts_with('.')
            && !self.local.ends_with('.')
            && !self.local.contains("..");
        if dot_atom {
            format!("{}@{}", self.local, self.domain)
        } else {
            let quoted = self.local.replace('\\', "\\\\").replace('"', "\\\"");
            format!("\"{quoted}\"@{}", self.domain)
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.local.is_empty() {
            write!(f, "@{}", self.domain)
        } else {
            f.write_str(&self.address())
        }
    }
}

/// The lookup form of a domain: lower-case ASCII with IDN labels as `xn--` A-labels.
/// `None` for address literals and names that are not valid IDNA.
fn domain_key(d: &str) -> Option<String> {
    if d.starts_with('[') || d.is_empty() {
        return None;
    }
    // UTS #46 mapping folds case (ASCII and Unicode) and turns U-labels into A-labels;
    // an `xn--` label passes through after a validity check, so both forms meet here.
    idna::domain_to_ascii(d).ok().filter(|a| !a.is_empty())
}

/// The lookup form of a local part: quotes and quoted pairs removed (`"al\ice"` and
/// `alice` are the same mailbox, RFC 5321 §4.1.2), ASCII letters folded.
fn local_key(raw: &str) -> String {
    let unquoted = match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        out.push(n);
                    }
                } else {
                    out.push(c);
                }
            }
            out
        }
        None => raw.to_string(),
    };
    unquoted.to_ascii_lowercase()
}

/// Whether a local part may become one directory name under `<root>/<domain>/`.
fn path_safe(local: &str) -> bool {
    !local.is_empty()
        && !local.starts_with('.')
        && !local.contains("..")
        && !local.contains(['/', '\0'])
}

/// One alias target as written in the config.
#[derive(Clone, Debug)]
enum Target {
    /// In a mailbox domain: resolved through the maps.
    Local(Key),
    /// Outside the mailbox domains, as written.
    External(String),
}

/// Where a recipient's mail goes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Dest {
    /// A mailbox: its address (bare, for `Delivered-To:`) and Maildir.
    Mailbox { address: String, maildir: PathBuf },
    /// An external alias target, stored in `spool.dir` (mailer does not relay).
    External(String),
}

/// The answer for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Not in a mailbox domain (or no domain at all: bare `Postmaster`): `[policy]`
    /// decides, and the message goes to `spool.dir`.
    Outside,
    /// In a mailbox domain, but no user, alias or catch-all: 550 5.1.1 at RCPT.
    Unknown,
    /// The distinct destinations, in a stable order.
    Found(Vec<Dest>),
}

/// What an address leads to in one step.
enum Entry {
    User(Key),
    Alias(Key),
    Nothing,
}

/// The built, checked maps. Immutable: a reload builds a new one.
#[derive(Debug, Default)]
pub(crate) struct Maps {
    users: HashSet<Key>,
    aliases: HashMap<Key, Vec<Target>>,
    /// Every alias (and catch-all) expanded to its final destinations.
    resolved: HashMap<Key, BTreeSet<Dest>>,
    domains: BTreeSet<String>,
    delimiters: Vec<char>,
    root: PathBuf,
}

/// Parses one address of the maps into its lookup form.
fn parse_entry(s: &str) -> Result<Key, String> {
    let s = s.trim();
    let a = Address::parse(s).map_err(|e| format!("{s:?}: {e}"))?;
    let d = a
        .domain()
        .ok_or_else(|| format!("{s:?}: an address with a domain is needed"))?;
    let domain = domain_key(d).ok_or_else(|| format!("{s:?}: {d:?} is not a domain name"))?;
    Ok(Key {
        local: local_key(a.local_part()),
        domain,
    })
}

/// Parses a user: an address whose local part can be a directory name.
fn parse_user(s: &str) -> Result<Key, String> {
    let k = parse_entry(s)?;
    if !path_safe(&k.local) {
        return Err(format!(
            "{s:?}: this local part cannot be a mailbox directory name"
        ));
    }
    Ok(k)
}

/// Parses an alias key: an address or `@domain`.
fn parse_alias_key(s: &str) -> Result<Key, String> {
    match s.trim().strip_prefix('@') {
        Some(d) => crate::protocol::address::check_domain(d)
            .map_err(|e| format!("\"@{d}\": {e}"))
            .and_then(|()| domain_key(d).ok_or_else(|| format!("\"@{d}\": not a domain")))
            .map(|domain| Key::catch_all(&domain)),
        None => parse_entry(s),
    }
}

/// Checks what the config file itself holds (syntax of users, alias keys and
/// targets, the delimiter), without reading `users_file`. Returns (key, problem).
/// Loops and dangling targets need the whole maps: [`Maps::build`] checks those.
pub(crate) fn check_inline(cfg: &MailboxesConfig) -> Result<(), (String, String)> {
    if cfg.root.as_os_str().is_empty() {
        return Err(("root".into(), "must not be empty".into()));
    }
    if cfg
        .recipient_delimiter
        .chars()
        .any(|c| c == '@' || c == '"' || c.is_whitespace() || c.is_control())
    {
        return Err((
            "recipient_delimiter".into(),
            format!("{:?} cannot separate an extension", cfg.recipient_delimiter),
        ));
    }
    for u in &cfg.users {
        parse_user(u).map_err(|e| ("users".to_string(), e))?;
    }
    for (k, targets) in &cfg.aliases {
        parse_alias_key(k).map_err(|e| ("aliases".to_string(), e))?;
        if targets.is_empty() {
            return Err(("aliases".into(), format!("{k:?} has no targets")));
        }
        for t in targets {
            if t.trim().starts_with('@') {
                return Err((
                    "aliases".into(),
                    format!("{k:?}: target {t:?} must be an address, not a domain"),
                ));
            }
            parse_entry(t).map_err(|e| ("aliases".to_string(), format!("{k:?}: {e}")))?;
        }
    }
    Ok(())
}

/// Reads `users_file`: one address per line; blank lines and `#` comments (a line
/// starting with `#`, or ` #` after the address) are skipped. Errors name file and line.
fn read_users_file(path: &Path) -> Result<Vec<Key>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("mailboxes.users_file {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = match line.find(" #").or_else(|| line.find("\t#")) {
            Some(c) => &line[..c],
            None => line,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let k = parse_user(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        out.push(k);
    }
    Ok(out)
}

/// A hash of the file's bytes (`None` when unreadable): contents rather than mtime,
/// for the reason given in [`crate::tls`] (coarse timestamps, same sizes).
fn fingerprint(path: &Path) -> Option<u64> {
    std::fs::read(path).ok().map(|bytes| {
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        h.finish()
    })
}

impl Maps {
    /// Builds and checks the maps from the config and, when set, `users_file`.
    /// Errors name the key, or the file and line.
    pub(crate) fn build(cfg: &MailboxesConfig) -> Result<Maps, String> {
        check_inline(cfg).map_err(|(k, e)| format!("mailboxes.{k}: {e}"))?;
        let mut users: HashSet<Key> = HashSet::new();
        for u in &cfg.users {
            users.insert(parse_user(u).map_err(|e| format!("mailboxes.users: {e}"))?);
        }
        if !cfg.users_file.as_os_str().is_empty() {
            users.extend(read_users_file(&cfg.users_file)?);
        }
        let mut alias_keys = Vec::new();
        for (k, targets) in &cfg.aliases {
            let key = parse_alias_key(k).map_err(|e| format!("mailboxes.aliases: {e}"))?;
            alias_keys.push((key, targets));
        }
        let domains: BTreeSet<String> = users
            .iter()
            .chain(alias_keys.iter().map(|(k, _)| k))
            .map(|k| k.domain.clone())
            .collect();
        let mut aliases = HashMap::new();
        for (key, targets) in alias_keys {
            let mut list = Vec::new();
            for t in targets {
                let tk = parse_entry(t).map_err(|e| format!("mailboxes.aliases: {e}"))?;
                list.push(if domains.contains(&tk.domain) {
                    Target::Local(tk)
                } else {
                    Target::External(t.trim().to_string())
                });
            }
            if aliases.insert(key.clone(), list).is_some() {
                return Err(format!(
                    "mailboxes.aliases: {key} is listed twice (in two spellings)"
                ));
            }
        }
        let mut maps = Maps {
            users,
            aliases,
            resolved: HashMap::new(),
            domains,
            delimiters: cfg.recipient_delimiter.chars().collect(),
            root: cfg.root.clone(),
        };
        let mut keys: Vec<Key> = maps.aliases.keys().cloned().collect();
        keys.sort();
        let mut memo: HashMap<Key, (BTreeSet<Dest>, usize)> = HashMap::new();
        for k in keys {
            let mut stack = Vec::new();
            maps.expand(&k, &mut stack, &mut memo)
                .map_err(|e| format!("mailboxes.aliases: {e}"))?;
        }
        maps.resolved = memo.into_iter().map(|(k, (d, _))| (k, d)).collect();
        Ok(maps)
    }

    /// Counts for `check-config`: (users, aliases incl. catch-alls, mailbox domains).
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        (self.users.len(), self.aliases.len(), self.domains.len())
    }

    /// Mailbox domains where `postmaster@` leads nowhere, although RFC 5321 §4.5.1
    /// requires every domain to accept it (`check-config` warns).
    pub(crate) fn without_postmaster(&self) -> Vec<String> {
        self.domains
            .iter()
            .filter(|d| {
                let k = Key {
                    local: "postmaster".into(),
                    domain: d.to_string(),
                };
                matches!(self.find(&k), Entry::Nothing)
            })
            .cloned()
            .collect()
    }

    fn mailbox(&self, k: &Key) -> Dest {
        Dest::Mailbox {
            address: k.address(),
            maildir: self.root.join(&k.domain).join(&k.local),
        }
    }

    /// `key` without its extension, when it has one.
    fn stripped(&self, key: &Key) -> Option<Key> {
        let i = key.local.find(|c| self.delimiters.contains(&c))?;
        // Postfix keeps `+foo` whole: an empty local part is no address.
        (i > 0).then(|| Key {
            local: key.local[..i].to_string(),
            domain: key.domain.clone(),
        })
    }

    /// One step of the lookup order in the module documentation.
    fn find(&self, key: &Key) -> Entry {
        for k in std::iter::once(key.clone()).chain(self.stripped(key)) {
            if self.aliases.contains_key(&k) {
                return Entry::Alias(k);
            }
            if self.users.contains(&k) {
                return Entry::User(k);
            }
        }
        let c = Key::catch_all(&key.domain);
        if self.aliases.contains_key(&c) {
            return Entry::Alias(c);
        }
        Entry::Nothing
    }

    /// Expands `alias` into `memo`: its destinations and its height (alias levels down
    /// to the deepest mailbox). `stack` is the chain of aliases that led here.
    fn expand(
        &self,
        alias: &Key,
        stack: &mut Vec<Key>,
        memo: &mut HashMap<Key, (BTreeSet<Dest>, usize)>,
    ) -> Result<usize, String> {
        if stack.contains(alias) {
            let chain: Vec<String> = stack.iter().map(Key::to_string).collect();
            return Err(format!("alias loop: {} -> {alias}", chain.join(" -> ")));
        }
        if let Some((_, h)) = memo.get(alias) {
            return self.check_depth(stack, alias, *h);
        }
        stack.push(alias.clone());
        let mut dests = BTreeSet::new();
        let mut height = 1;
        let targets = self.aliases.get(alias).map(Vec::as_slice).unwrap_or(&[]);
        for t in targets {
            let k = match t {
                Target::External(a) => {
                    dests.insert(Dest::External(a.clone()));
                    continue;
                }
                Target::Local(k) => k,
            };
            // An alias that names itself keeps a copy in its own mailbox.
            if k == alias && self.users.contains(k) {
                dests.insert(self.mailbox(k));
                continue;
            }
            match self.find(k) {
                Entry::User(u) => {
                    dests.insert(self.mailbox(&u));
                }
                Entry::Alias(a) => {
                    let h = self.expand(&a, stack, memo)?;
                    height = height.max(h + 1);
                    if let Some((d, _)) = memo.get(&a) {
                        dests.extend(d.iter().cloned());
                    }
                }
                Entry::Nothing => {
                    return Err(format!(
                        "{alias}: target {k} is neither a user nor an alias \
                         (and its domain is a mailbox domain, so it is not external)"
                    ))
                }
            }
        }
        stack.pop();
        memo.insert(alias.clone(), (dests, height));
        self.check_depth(stack, alias, height)
    }

    fn check_depth(&self, stack: &[Key], alias: &Key, height: usize) -> Result<usize, String> {
        if stack.len() + height > MAX_DEPTH {
            let top = stack.first().unwrap_or(alias);
            return Err(format!("{top}: more than {MAX_DEPTH} levels of aliases"));
        }
        Ok(height)
    }

    /// Resolves a recipient as sent (SPEC 8).
    pub(crate) fn lookup(&self, rcpt: &Address) -> Lookup {
        let Some(domain) = rcpt.domain().and_then(domain_key) else {
            return Lookup::Outside;
        };
        if !self.domains.contains(&domain) {
            return Lookup::Outside;
        }
        let key = Key {
            local: local_key(rcpt.local_part()),
            domain,
        };
        // Checked on the address as sent: no part of it may name a path, even when
        // only a catch-all would match.
        if !path_safe(&key.local) {
            return Lookup::Unknown;
        }
        match self.find(&key) {
            Entry::User(u) => Lookup::Found(vec![self.mailbox(&u)]),
            Entry::Alias(a) => Lookup::Found(
                self.resolved
                    .get(&a)
                    .map(|d| d.iter().cloned().collect())
                    .unwrap_or_default(),
            ),
            Entry::Nothing => Lookup::Unknown,
        }
    }
}

/// The reply for a recipient in a mailbox domain that resolves to nothing (SPEC 4).
pub(crate) fn user_unknown(rcpt: &Address) -> Reply {
    Reply::new(
        550,
        Enhanced(5, 1, 1),
        format!("<{rcpt}>: Recipient address rejected: User unknown"),
    )
}

/// The live maps: swapped whole by [`reload`](Mailboxes::reload) and when
/// `users_file` changes; a build that fails keeps the maps in use.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub struct Mailboxes {
    maps: RwLock<Arc<Maps>>,
    /// The settings the maps in use were built from, and the fingerprint of
    /// `users_file` when it was last read (successfully or not).
    source: Mutex<(MailboxesConfig, Option<u64>)>,
    /// `spool.dir`: where copies for external alias targets go.
    spool: PathBuf,
}

impl std::fmt::Debug for Mailboxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailboxes").finish_non_exhaustive()
    }
}

impl Mailboxes {
    /// Builds the maps; an error names the key, or the file and line. `spool_dir`
    /// receives the copies for external alias targets.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn new(cfg: &MailboxesConfig, spool_dir: &Path) -> Result<Mailboxes, String> {
        // Taken before the read: a change in between is then seen by the next poll.
        let fp = fingerprint(&cfg.users_file);
        let maps = Maps::build(cfg)?;
        Ok(Mailboxes {
            maps: RwLock::new(Arc::new(maps)),
            source: Mutex::new((cfg.clone(), fp)),
            spool: spool_dir.to_path_buf(),
        })
    }

    /// The maps in use now.
    pub(crate) fn maps(&self) -> Arc<Maps> {
        Arc::clone(&self.maps.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Rebuilds from a new config (SIGHUP). On error the maps in use stay, the error is
    /// logged at ERROR and returned. A config without `[mailboxes]` empties the maps:
    /// every recipient is then outside the mailbox domains, as in v1.
    pub(crate) fn reload(&self, cfg: &Config) -> Result<(), String> {
        let m = cfg.mailboxes.clone().unwrap_or_else(|| MailboxesConfig {
            users: Vec::new(),
            users_file: PathBuf::new(),
            aliases: Default::default(),
            ..MailboxesConfig::default()
        });
        self.rebuild(m)
    }

    fn rebuild(&self, cfg: MailboxesConfig) -> Result<(), String> {
        let mut source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        let fp = fingerprint(&cfg.users_file);
        match Maps::build(&cfg) {
            Ok(maps) => {
                let (u, a, d) = maps.counts();
                *self.maps.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(maps);
                *source = (cfg, fp);
                log::info!("mailboxes: loaded {u} users, {a} aliases, {d} domains");
                Ok(())
            }
            Err(e) => {
                // The settings of the maps in use stay; the file's state as tried is
                // remembered, so a broken file is reported once, not every second.
                source.1 = fp;
                log::error!("mailboxes: reload failed, keeping the maps in use: {e}");
                Err(e)
            }
        }
    }

    /// Re-reads `users_file` if its bytes changed since the last build. Returns
    /// `Some(result)` when it tried.
    pub(crate) fn check_file(&self) -> Option<Result<(), String>> {
        let cfg = {
            let source = self.source.lock().unwrap_or_else(|p| p.into_inner());
            if source.0.users_file.as_os_str().is_empty()
                || fingerprint(&source.0.users_file) == source.1
            {
                return None;
            }
            source.0.clone()
        };
        Some(self.rebuild(cfg))
    }

    /// Polls `users_file` every `every` until `stop` is set (as the TLS certificate
    /// watcher does).
    pub(crate) fn watch(self: &Arc<Self>, every: Duration, stop: Arc<AtomicBool>) {
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("mailboxes-reload".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    let _ = me.check_file();
                }
            });
        if let Err(e) = spawned {
            log::error!("mailboxes: cannot start the users_file watcher: {e}");
        }
    }
}

/// Clears the debris a crashed mailer left in the mailboxes' `tmp/` directories under
/// `root` (invariant 1, as the spool does at start), and returns how many files went.
/// Call it before the first delivery. Only files named the way mailer names them
/// (`<secs>.M<usec>P<pid>[R<token>]Q<seq>[C<n>].<host>`, SPEC 5) with this host name
/// are candidates, and of those only the ones whose process is gone (or has this
/// process's pid: a restarted container reuses pids, and nothing of ours is being
/// written yet). The Maildirs are shared with Dovecot, whose own files in `tmp/`
/// (named without `Q`) and those of a live mailer instance are left alone.
pub(crate) fn clear_debris(root: &Path, hostname: &str) -> usize {
    let host = hostname.replace('/', "\\057").replace(':', "\\072");
    let ours_and_dead = |name: &str| -> bool {
        let Some(rest) = name.strip_suffix(host.as_str()) else {
            return false;
        };
        let mut parts = rest.splitn(3, '.');
        let (Some(secs), Some(unique), Some("")) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        match our_unique_pid(unique) {
            Some(pid) if secs.parse::<u64>().is_ok() => {
                pid == std::process::id() || !Path::new(&format!("/proc/{pid}")).exists()
            }
            _ => false,
        }
    };
    let mut removed = 0;
    let dirs = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    for domain in dirs(root) {
        for mailbox in dirs(&domain) {
            let tmp = mailbox.join("tmp");
            let Ok(rd) = std::fs::read_dir(&tmp) else {
                continue;
            };
            for e in rd.filter_map(Result::ok) {
                let name = e.file_name();
                if name.to_str().is_some_and(ours_and_dead) {
                    match std::fs::remove_file(e.path()) {
                        Ok(()) => removed += 1,
                        Err(err) => log::error!(
                            "mailboxes: cannot remove debris {}: {err}",
                            e.path().display()
                        ),
                    }
                }
            }
        }
    }
    if removed > 0 {
        log::warn!(
            "mailboxes: removed {removed} unfinished file(s) from tmp/ under {}",
            root.display()
        );
    }
    removed
}

/// The pid in the unique part of a mailer file name, `M<usec>P<pid>[R<hex>]Q<seq>[C<n>]`;
/// `None` for anything else (Dovecot's `M<usec>P<pid>` has no `Q`).
fn our_unique_pid(unique: &str) -> Option<u32> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (usec, rest) = unique.strip_prefix('M')?.split_once('P')?;
    let (pid_token, seq_copy) = rest.split_once('Q')?;
    let (pid, token) = pid_token.split_once('R').unwrap_or((pid_token, ""));
    let (seq, copy) = seq_copy.split_once('C').unwrap_or((seq_copy, "0"));
    let ok =
        digits(usec) && digits(seq) && digits(copy) && token.bytes().all(|b| b.is_ascii_hexdigit());
    if ok && digits(pid) {
        pid.parse().ok()
    } else {
        None
    }
}

/// Delivery routes (SPEC 8), looked up again at the end of the message with the maps
/// in use then. A recipient outside the mailbox domains, or one that a reload removed
/// since RCPT, goes to `spool.dir` as in v1: an accepted message is never dropped.
impl Router for Mailboxes {
    fn route(&self, rcpt: &Address) -> Option<Vec<Mailbox>> {
        let Lookup::Found(dests) = self.maps().lookup(rcpt) else {
            return None;
        };
        let boxes = dests
            .into_iter()
            .map(|d| match d {
                Dest::Mailbox { address, maildir } => Mailbox { address, maildir },
                Dest::External(address) => Mailbox {
                    address,
                    maildir: self.spool.clone(),
                },
            })
            .collect();
        Some(boxes)
    }
}

/// The RCPT check of `[mailboxes]` as a hook (SPEC 7): a recipient in a mailbox domain
/// must resolve, or gets `550 5.1.1 … User unknown` (the transaction goes on with the
/// other recipients); any other recipient is left to `outside` (the binary passes its
/// `[policy]`), so mailbox domains need not be listed in `accept_domains`.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub struct RecipientCheck {
    mailboxes: Arc<Mailboxes>,
    outside: Option<Policy>,
}

impl RecipientCheck {
    /// Checks mailbox-domain recipients; others are accepted, or judged by `outside`.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn new(mailboxes: Arc<Mailboxes>, outside: Option<Policy>) -> RecipientCheck {
        RecipientCheck { mailboxes, outside }
    }
}

impl Hooks for RecipientCheck {
    fn rcpt(&self, s: &SessionInfo, e: &Envelope, to: &Address) -> Result<(), Reply> {
        match self.mailboxes.maps().lookup(to) {
            Lookup::Found(_) => Ok(()),
            Lookup::Unknown => Err(user_unknown(to)),
            Lookup::Outside => match &self.outside {
                Some(p) => p.rcpt(s, e, to),
                None => Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(users: &[&str], aliases: &[(&str, &[&str])]) -> MailboxesConfig {
        MailboxesConfig {
            root: "/m".into(),
            users: users.iter().map(|s| s.to_string()).collect(),
            users_file: PathBuf::new(),
            aliases: aliases
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect(),
            recipient_delimiter: "+".into(),
        }
    }

    fn addr(s: &str) -> Address {
        Address::parse(s).expect("test address")
    }

    fn mbox(a: &str, dir: &str) -> Dest {
        Dest::Mailbox {
            address: a.into(),
            maildir: PathBuf::from(dir),
        }
    }

    fn found(m: &Maps, a: &str) -> Vec<Dest> {
        match m.lookup(&addr(a)) {
            Lookup::Found(d) => d,
            other => panic!("{a}: {other:?}"),
        }
    }

    #[test]
    fn user_resolves_to_its_maildir() {
        let m = Maps::build(&cfg(&["alice@example.org"], &[])).unwrap();
        assert_eq!(
            found(&m, "alice@example.org"),
            vec![mbox("alice@example.org", "/m/example.org/alice")]
        );
        assert_eq!(m.lookup(&addr("bob@example.org")), Lookup::Unknown);
        assert_eq!(m.lookup(&addr("alice@other.test")), Lookup::Outside);
        assert_eq!(m.lookup(&addr("Postmaster")), Lookup::Outside);
        assert_eq!(m.lookup(&addr("alice@[127.0.0.1]")), Lookup::Outside);
        assert_eq!(m.counts(), (1, 0, 1));
    }

    #[test]
    fn case_is_folded_in_local_part_and_domain() {
        let m = Maps::build(&cfg(&["Alice@Example.ORG"], &[])).unwrap();
        let want = vec![mbox("alice@example.org", "/m/example.org/alice")];
        assert_eq!(found(&m, "ALICE@EXAMPLE.org"), want);
        assert_eq!(found(&m, "alice@example.org"), want);
        assert_eq!(found(&m, "\"alice\"@example.org"), want);
    }

    #[test]
    fn delimiter_extension_is_stripped_unless_the_full_address_exists() {
        let m = Maps::build(&cfg(&["alice@example.org", "bob+lists@example.org"], &[])).unwrap();
        let alice = vec![mbox("alice@example.org", "/m/example.org/alice")];
        assert_eq!(found(&m, "alice+tag@example.org"), alice);
        assert_eq!(found(&m, "Alice+Tag+more@example.org"), alice);
        assert_eq!(
            found(&m, "bob+lists@example.org"),
            vec![mbox("bob+lists@example.org", "/m/example.org/bob+lists")]
        );
        assert_eq!(m.lookup(&addr("bob+other@example.org")), Lookup::Unknown);
        // An empty local part before the delimiter is not stripped.
        assert_eq!(m.lookup(&addr("+alice@example.org")), Lookup::Unknown);
        let mut off = cfg(&["alice@example.org"], &[]);
        off.recipient_delimiter = String::new();
        let m = Maps::build(&off).unwrap();
        assert_eq!(m.lookup(&addr("alice+tag@example.org")), Lookup::Unknown);
        let mut two = cfg(&["alice@example.org"], &[]);
        two.recipient_delimiter = "+-".into();
        let m = Maps::build(&two).unwrap();
        assert_eq!(found(&m, "alice-tag@example.org"), alice);
    }

    #[test]
    fn alias_chain_resolves_recursively_and_deduplicates() {
        let m = Maps::build(&cfg(
            &["alice@example.org", "bob@example.org"],
            &[
                ("postmaster@example.org", &["abuse@example.org"]),
                (
                    "abuse@example.org",
                    &["alice@example.org", "team@example.org"],
                ),
                (
                    "team@example.org",
                    &["alice@example.org", "bob@example.org"],
                ),
            ],
        ))
        .unwrap();
        assert_eq!(
            found(&m, "postmaster+x@example.org"),
            vec![
                mbox("alice@example.org", "/m/example.org/alice"),
                mbox("bob@example.org", "/m/example.org/bob"),
            ]
        );
        assert_eq!(m.counts(), (2, 3, 1));
    }

    #[test]
    fn alias_naming_itself_keeps_a_copy_and_external_targets_are_kept() {
        let m = Maps::build(&cfg(
            &["alice@example.org"],
            &[(
                "alice@example.org",
                &["alice@example.org", "Al@Elsewhere.test"],
            )],
        ))
        .unwrap();
        assert_eq!(
            found(&m, "alice@example.org"),
            vec![
                mbox("alice@example.org", "/m/example.org/alice"),
                Dest::External("Al@Elsewhere.test".into()),
            ]
        );
    }

    #[test]
    fn catch_all_applies_when_nothing_else_matches() {
        let m = Maps::build(&cfg(
            &["alice@example.org", "bob@example.net"],
            &[("@example.net", &["alice@example.org"])],
        ))
        .unwrap();
        assert_eq!(
            found(&m, "anything@example.net"),
            vec![mbox("alice@example.org", "/m/example.org/alice")]
        );
        assert_eq!(
            found(&m, "bob@example.net"),
            vec![mbox("bob@example.net", "/m/example.net/bob")]
        );
        assert_eq!(m.lookup(&addr("x@example.org")), Lookup::Unknown);
        assert_eq!(m.counts(), (2, 1, 2));
        // example.net has its postmaster through the catch-all; example.org has none.
        assert_eq!(m.without_postmaster(), vec!["example.org".to_string()]);
    }

    #[test]
    fn idn_domains_match_in_both_forms_and_use_the_a_label_on_disk() {
        let want = vec![mbox(
            "jörg@xn--bcher-kva.example",
            "/m/xn--bcher-kva.example/jörg",
        )];
        for user in ["jörg@bücher.example", "jörg@XN--BCHER-KVA.example"] {
            let m = Maps::build(&cfg(&[user], &[])).unwrap();
            assert_eq!(found(&m, "jörg@bücher.example"), want, "{user}");
            assert_eq!(found(&m, "Jörg@xn--bcher-kva.EXAMPLE"), want, "{user}");
            assert_eq!(found(&m, "jörg@BÜCHER.example"), want, "{user}");
        }
        let m = Maps::build(&cfg(&["a@x.test"], &[("@bücher.example", &["a@x.test"])])).unwrap();
        assert_eq!(
            found(&m, "z@xn--bcher-kva.example"),
            vec![mbox("a@x.test", "/m/x.test/a")]
        );
    }

    #[test]
    fn loops_are_configuration_errors() {
        let e = Maps::build(&cfg(
            &["alice@example.org"],
            &[
                ("a@example.org", &["b@example.org"]),
                ("b@example.org", &["c@example.org"]),
                ("c@example.org", &["A@example.org"]),
            ],
        ))
        .unwrap_err();
        assert!(
            e.contains("alias loop") && e.contains("a@example.org"),
            "{e}"
        );
        // An alias naming itself without being a user is a loop too.
        let e = Maps::build(&cfg(
            &["x@example.org"],
            &[("a@example.org", &["a@example.org"])],
        ))
        .unwrap_err();
        assert!(e.contains("alias loop"), "{e}");
        // A catch-all whose target falls back on the same catch-all.
        let e = Maps::build(&cfg(
            &["x@example.org"],
            &[("@example.org", &["nobody@example.org"])],
        ))
        .unwrap_err();
        assert!(e.contains("alias loop"), "{e}");
    }

    fn chain(n: usize) -> MailboxesConfig {
        let names: Vec<String> = (0..n).map(|i| format!("a{i}@example.org")).collect();
        let targets: Vec<Vec<String>> = (0..n)
            .map(|i| match names.get(i + 1) {
                Some(next) => vec![next.clone()],
                None => vec!["user@example.org".to_string()],
            })
            .collect();
        let mut c = cfg(&["user@example.org"], &[]);
        c.aliases = names.into_iter().zip(targets).collect();
        c
    }

    #[test]
    fn ten_levels_are_fine_eleven_are_an_error() {
        let m = Maps::build(&chain(MAX_DEPTH)).unwrap();
        assert_eq!(
            found(&m, "a0@example.org"),
            vec![mbox("user@example.org", "/m/example.org/user")]
        );
        let e = Maps::build(&chain(MAX_DEPTH + 1)).unwrap_err();
        assert!(
            e.contains("more than 10 levels") && e.contains("a0@"),
            "{e}"
        );
    }

    #[test]
    fn dangling_targets_and_bad_syntax_are_errors() {
        let e = Maps::build(&cfg(
            &["alice@example.org"],
            &[("a@example.org", &["typo@example.org"])],
        ))
        .unwrap_err();
        assert!(
            e.contains("typo@example.org") && e.contains("neither"),
            "{e}"
        );
        for bad in ["no-domain", "a@", "a@[1.2.3.4]", "a b@x.test"] {
            assert!(Maps::build(&cfg(&[bad], &[])).is_err(), "{bad}");
        }
        assert!(Maps::build(&cfg(&["a@x.test"], &[("@", &["a@x.test"])])).is_err());
        assert!(Maps::build(&cfg(&["a@x.test"], &[("b@x.test", &[])])).is_err());
        assert!(Maps::build(&cfg(&["a@x.test"], &[("b@x.test", &["@x.test"])])).is_err());
        for bad in ["@", " ", "\"", "a\tb"] {
            let mut c = cfg(&["a@x.test"], &[]);
            c.recipient_delimiter = bad.into();
            let e = Maps::build(&c).unwrap_err();
            assert!(
                e.starts_with("mailboxes.recipient_delimiter: "),
                "{bad:?}: {e}"
            );
        }
        let mut c = cfg(&["a@x.test"], &[]);
        c.root = PathBuf::new();
        assert!(Maps::build(&c).unwrap_err().starts_with("mailboxes.root: "));
    }

    #[test]
    fn local_parts_that_could_escape_are_refused_as_users_and_recipients() {
        for bad in [
            "\"../etc\"@x.test",
            "\"a/b\"@x.test",
            "a/b@x.test",
            "\".hidden\"@x.test",
            "\"..\"@x.test",
            "\".\"@x.test",
        ] {
            let e = Maps::build(&cfg(&[bad], &[])).unwrap_err();
            assert!(e.contains("directory"), "{bad}: {e}");
        }
        assert!(!path_safe("a\0b") && !path_safe("") && path_safe("a.b"));
        let m = Maps::build(&cfg(&["a@x.test"], &[("@x.test", &["a@x.test"])])).unwrap();
        for bad in [
            "\"../a\"@x.test",
            "\"a/b\"@x.test",
            "a/b@x.test",
            "\"..\"@x.test",
        ] {
            assert_eq!(m.lookup(&addr(bad)), Lookup::Unknown, "{bad}");
        }
    }

    #[test]
    fn users_file_is_read_with_comments_and_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("users");
        std::fs::write(
            &f,
            "# users\n\nbob@example.org  # Bob\n  carol@Example.org\n",
        )
        .unwrap();
        let mut c = cfg(&["alice@example.org"], &[]);
        c.users_file = f.clone();
        let m = Maps::build(&c).unwrap();
        assert_eq!(m.counts(), (3, 0, 1));
        assert!(matches!(
            m.lookup(&addr("carol@example.org")),
            Lookup::Found(_)
        ));
        std::fs::write(&f, "bob@example.org\nnot an address\n").unwrap();
        let e = Maps::build(&c).unwrap_err();
        assert!(e.starts_with(&format!("{}:2: ", f.display())), "{e}");
    }

    #[test]
    fn a_broken_users_file_keeps_the_old_maps_until_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("users");
        std::fs::write(&f, "bob@example.org\n").unwrap();
        let mut c = cfg(&[], &[]);
        c.users_file = f.clone();
        let mb = Mailboxes::new(&c, Path::new("/spool")).unwrap();
        assert_eq!(mb.check_file(), None, "unchanged file: nothing to do");
        std::fs::write(&f, "bob@example.org\n\"../x\"@example.org\n").unwrap();
        let e = mb.check_file().unwrap().unwrap_err();
        assert!(e.contains(":2: "), "{e}");
        assert!(matches!(
            mb.maps().lookup(&addr("bob@example.org")),
            Lookup::Found(_)
        ));
        assert_eq!(mb.check_file(), None, "a broken file is reported once");
        // A SIGHUP reload naming a broken file fails and leaves the settings in use.
        let broken = dir.path().join("broken");
        std::fs::write(&broken, "no address\n").unwrap();
        let mut other = c.clone();
        other.users_file = broken;
        let full = Config {
            mailboxes: Some(other),
            ..Config::default()
        };
        assert!(mb.reload(&full).is_err());
        std::fs::write(&f, "carol@example.org\n").unwrap();
        mb.check_file().unwrap().unwrap();
        assert_eq!(mb.maps().lookup(&addr("bob@example.org")), Lookup::Unknown);
        assert!(matches!(
            mb.maps().lookup(&addr("carol@example.org")),
            Lookup::Found(_)
        ));
    }

    #[test]
    fn reload_swaps_the_maps_or_keeps_them() {
        let mb = Mailboxes::new(&cfg(&["a@x.test"], &[]), Path::new("/spool")).unwrap();
        let mut full = Config {
            mailboxes: Some(cfg(&["b@x.test"], &[])),
            ..Config::default()
        };
        mb.reload(&full).unwrap();
        assert_eq!(mb.maps().lookup(&addr("a@x.test")), Lookup::Unknown);
        full.mailboxes = Some(cfg(&["b@x.test"], &[("c@x.test", &["d@x.test"])]));
        assert!(mb.reload(&full).is_err());
        assert!(matches!(
            mb.maps().lookup(&addr("b@x.test")),
            Lookup::Found(_)
        ));
        full.mailboxes = None;
        mb.reload(&full).unwrap();
        assert_eq!(mb.maps().lookup(&addr("b@x.test")), Lookup::Outside);
    }

    #[test]
    fn router_sends_external_targets_and_outsiders_to_the_spool() {
        let mb = Mailboxes::new(
            &cfg(
                &["alice@example.org"],
                &[("fwd@example.org", &["alice@example.org", "x@far.test"])],
            ),
            Path::new("/spool"),
        )
        .unwrap();
        let boxes = mb.route(&addr("Fwd+a@example.org")).unwrap();
        assert_eq!(
            boxes,
            vec![
                Mailbox {
                    address: "alice@example.org".into(),
                    maildir: "/m/example.org/alice".into()
                },
                Mailbox {
                    address: "x@far.test".into(),
                    maildir: "/spool".into()
                },
            ]
        );
        assert_eq!(mb.route(&addr("x@far.test")), None);
        assert_eq!(mb.route(&addr("nobody@example.org")), None);
    }

    #[test]
    fn only_our_dead_debris_is_cleared_from_mailbox_tmp() {
        let root = tempfile::tempdir().unwrap();
        let tmp = root.path().join("example.org/alice/tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let me = std::process::id();
        // pid_max is at most 2^22 on Linux: 4294967295 cannot run; pid 1 always does.
        let dead = [
            "1700000000.M12P4294967295Rab12cd34Q7C1.mx.test".to_string(),
            "1700000000.M12P4294967295Q7.mx.test".to_string(),
            // This pid, but nothing of ours is written yet: an earlier process's.
            format!("1700000000.M12P{me}R00ff00ffQ7C0.mx.test"),
        ];
        let keep = [
            "1700000000.M12P1Rab12cd34Q7C0.mx.test", // a live process
            "1700000000.M12P4294967295Rab12cd34Q7C1.other.host", // another host
            "1700000000.M12P4294967295.mx.test",     // Dovecot's form
            "1700000000.M12P4294967295RxyzQ7.mx.test", // not our form
            "dovecot.index.tmp",
        ];
        for d in &dead {
            std::fs::write(tmp.join(d), b"partial").unwrap();
        }
        for k in &keep {
            std::fs::write(tmp.join(k), b"x").unwrap();
        }
        assert_eq!(clear_debris(root.path(), "mx.test"), dead.len());
        for d in &dead {
            assert!(!tmp.join(d).exists(), "{d}");
        }
        for k in &keep {
            assert!(tmp.join(k).exists(), "{k}");
        }
        assert_eq!(clear_debris(&root.path().join("missing"), "mx.test"), 0);
    }
}
