//! The Maildir spool (SPEC 1, 5, 8; invariant 1): sessions stream each message into its
//! own file in `tmp/` and fsync it; one writer thread renames finished files into `new/`
//! in batches, fsyncs each touched `new/` once per batch (group commit) and only then
//! acks each session, which only then answers 250. A test (`no_ack_before_...`) records
//! the order.
//!
//! A message is written once (trace headers, then content) unless data hooks or
//! mailboxes need copies that differ in their heads: then the file holds the content
//! only ("staged"), and [`MessageWriter::commit_copies`] writes each copy (its own head,
//! then the content) into its Maildir's `tmp/`, fsyncs them all, and the writer moves
//! them into their `new/` together: all of them or none.

use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A step of storing a message, as seen by [`Faults`].
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Creating the file in `tmp/`.
    Create,
    /// Writing message bytes (before they reach the buffer).
    Write,
    /// fsync of the message file.
    SyncFile,
    /// The rename from `tmp/` into `new/`.
    Rename,
    /// fsync of `new/` after a batch of renames.
    SyncDir,
    /// The disk cache flush after a batch's syncfs, before its renames (`batch` mode).
    Flush,
}

/// Fault injection for tests: consulted before each storage step; an `Err` is
/// returned as if the real operation had failed (ENOSPC, EIO, …). The default
/// injects nothing. A test may also block in `before` to observe ordering.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub trait Faults: Send + Sync {
    fn before(&self, _op: Op) -> io::Result<()> {
        Ok(())
    }
}

/// No faults: the production setting.
pub(crate) struct NoFaults;
impl Faults for NoFaults {}

/// A storage failure.
#[derive(Debug)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum StoreError {
    /// No space left (ENOSPC, EDQUOT): temporary, 452 4.3.1.
    Full(String),
    /// Any other I/O failure: 451 4.3.0.
    Io(String),
}

impl StoreError {
    /// Classifies an I/O error on `what` (a path or step).
    pub(crate) fn from_io(what: &str, e: &io::Error) -> StoreError {
        // ENOSPC = 28, EDQUOT = 122 on Linux.
        match e.raw_os_error() {
            Some(28) | Some(122) => StoreError::Full(format!("{what}: {e}")),
            _ if e.kind() == io::ErrorKind::StorageFull => StoreError::Full(format!("{what}: {e}")),
            _ => StoreError::Io(format!("{what}: {e}")),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Full(m) => write!(f, "spool full: {m}"),
            StoreError::Io(m) => write!(f, "spool I/O error: {m}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Where sessions put messages. `begin` opens one; [`MessageWriter::commit`] makes it
/// durable. Tests substitute their own store.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub trait Store: Send + Sync {
    fn begin(&self) -> Result<Box<dyn MessageWriter>, StoreError>;
    /// Opens a message directly in another Maildir (a mailbox, created on first use),
    /// for a message that has exactly one copy there: its [`commit`](MessageWriter::commit)
    /// delivers into that Maildir's `new/`. `None`: this store cannot, and the caller
    /// stages the message instead.
    fn begin_in(&self, _maildir: &Path) -> Option<Result<Box<dyn MessageWriter>, StoreError>> {
        None
    }
}

/// One stored copy of a staged message (see [`MessageWriter::commit_copies`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub struct Copy {
    /// The Maildir: `None` is the spool's own (`spool.dir`), `Some` a mailbox's
    /// (created with its `tmp/ new/ cur/` on first delivery).
    pub maildir: Option<PathBuf>,
    /// Store in the Maildir++ folder `.Quarantine` of that Maildir instead.
    pub quarantine: bool,
    /// The bytes before the content: trace headers and added fields.
    pub head: Vec<u8>,
    /// `(n, bytes)`: the content's first `n` bytes (its header section) are replaced by
    /// `bytes` in this copy.
    pub headers: Option<(u64, Vec<u8>)>,
}

/// One message being written. Dropping it without `commit` discards it.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub trait MessageWriter: Write + Send {
    /// The queue id, as in the file name and the 250 reply.
    fn queue_id(&self) -> &str;
    /// Blocks until the message is durable in `new/` (or fails and is discarded).
    fn commit(self: Box<Self>) -> Result<(), StoreError>;
    /// A reader over everything written so far, from the first byte (for data hooks:
    /// the content is read back from the file, never held in memory).
    fn content(&mut self) -> io::Result<Box<dyn Read + '_>> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this store cannot read messages back",
        ))
    }
    /// Stores the bytes written so far (the content only) as these copies, each with
    /// its own head, and blocks until every copy is durable in its `new/`. All or
    /// nothing: when one copy fails, no copy is delivered. No copies: nothing is
    /// stored (and that is a success).
    fn commit_copies(self: Box<Self>, _copies: Vec<Copy>) -> Result<(), StoreError> {
        Err(StoreError::Io("this store cannot store copies".into()))
    }
}

/// Files finished in some `tmp/`, to be renamed into the `new/` beside it, all or none.
struct Commit {
    /// (file in tmp/, its name in new/, that new/ directory).
    files: Vec<(PathBuf, String, PathBuf)>,
    ack: AckTx,
}

/// A one-shot reply from the writer to one waiting session. A mutex and a condvar
/// rather than a channel: the wait is a whole journal commit, and a channel's receiver
/// spins and yields first, which on a 2-core host takes CPU from the sessions that are
/// still working.
#[derive(Default)]
struct Ack {
    result: Mutex<Option<Result<(), StoreError>>>,
    done: Condvar,
}

/// The writer's end of an [`Ack`]. Dropped unanswered (the writer stopped), it answers
/// with an error, so a session never waits forever.
struct AckTx(Arc<Ack>);

impl AckTx {
    fn send(self, result: Result<(), StoreError>) {
        self.answer(result);
    }

    fn answer(&self, result: Result<(), StoreError>) {
        let mut slot = self.0.result.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(result);
            self.0.done.notify_one();
        }
    }
}

impl Drop for AckTx {
    fn drop(&mut self) {
        self.answer(Err(StoreError::Io("spool writer has stopped".into())));
    }
}

impl Ack {
    fn wait(&self) -> Result<(), StoreError> {
        let mut slot = self.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(result) = slot.take() {
                return result;
            }
            slot = self.done.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A Maildir (`tmp/ new/ cur/`).
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub struct Maildir {
    shared: Arc<Shared>,
    seq: AtomicU64,
    tx: Sender<Commit>,
}

/// How message data is made durable before the renames into `new/` (with `fsync`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum DataSync {
    /// Each session fdatasyncs its own file before handing it to the writer: many
    /// fdatasyncs in parallel, which the filesystem folds into journal commits as it
    /// can. Costs nothing beyond the spool's own files.
    #[default]
    PerFile,
    /// The writer makes a whole batch durable with one syncfs(2) and one cache flush
    /// per filesystem (`sync_batch_data`), then renames. Fewer journal commits per
    /// message, but it also flushes whatever else is dirty on that filesystem: for a
    /// spool on a filesystem of its own.
    Batch,
}

/// How a spool stores files.
#[derive(Clone)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub struct SpoolOptions {
    /// fsync files and directories (invariant 1); off only for throwaway sinks.
    pub fsync: bool,
    pub data_sync: DataSync,
    /// Permission bits of stored files (`spool.file_mode`); directories the spool
    /// creates get the same bits plus x. Applied whatever the umask.
    pub file_mode: u32,
    pub faults: Arc<dyn Faults>,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            fsync: true,
            data_sync: DataSync::PerFile,
            file_mode: 0o600,
            faults: Arc::new(NoFaults),
        }
    }
}

/// The directory mode for a file mode: x wherever a class may read or write.
pub(crate) fn dir_mode(file_mode: u32) -> u32 {
    let mut m = file_mode & 0o777;
    for shift in [6, 3, 0] {
        if (m >> shift) & 0o7 != 0 {
            m |= 1 << shift;
        }
    }
    m
}

/// What every message of one spool needs.
struct Shared {
    dir: PathBuf,
    host: String,
    /// Sessions fsync their own files (else the writer syncs whole batches).
    sync_each: bool,
    file_mode: u32,
    dir_mode: u32,
    pid: u32,
    faults: Arc<dyn Faults>,
    /// Maildirs known to exist with their `tmp/ new/ cur/` (mailboxes are created on
    /// first delivery). Bounded: cleared when it grows past [`KNOWN_DIRS_MAX`].
    known: Mutex<HashSet<PathBuf>>,
}

const KNOWN_DIRS_MAX: usize = 4096;

/// Counters the writer thread keeps (for the stats line).
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub struct SpoolStats {
    pub batches: AtomicU64,
    pub committed: AtomicU64,
    /// Sum of directory fsync durations, in microseconds.
    pub dir_fsync_micros: AtomicU64,
}

impl Maildir {
    /// Opens (creating if needed) the Maildir at `dir`, clears debris from `tmp/` (invariant 1) and starts
    /// the writer thread. Join the handle after dropping every clone of the store.
    #[cfg(any(test, feature = "testing"))]
    pub fn open(
        dir: &Path,
        hostname: &str,
        fsync: bool,
        stats: Arc<SpoolStats>,
    ) -> io::Result<(Maildir, JoinHandle<()>)> {
        Maildir::open_with_faults(dir, hostname, fsync, stats, Arc::new(NoFaults))
    }

    /// [`open`](Self::open) with a fault injector (tests).
    #[cfg(any(test, feature = "testing"))]
    pub fn open_with_faults(
        dir: &Path,
        hostname: &str,
        fsync: bool,
        stats: Arc<SpoolStats>,
        faults: Arc<dyn Faults>,
    ) -> io::Result<(Maildir, JoinHandle<()>)> {
        let opts = SpoolOptions {
            fsync,
            faults,
            ..SpoolOptions::default()
        };
        Maildir::open_with(dir, hostname, opts, stats)
    }

    /// Opens (creating if needed) the Maildir at `dir` with these options, clears
    /// debris from `tmp/` (SPEC 5) and starts the writer thread.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn open_with(
        dir: &Path,
        hostname: &str,
        opts: SpoolOptions,
        stats: Arc<SpoolStats>,
    ) -> io::Result<(Maildir, JoinHandle<()>)> {
        let dmode = dir_mode(opts.file_mode);
        create_maildir(dir, dmode)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        // Maildir: '/' and ':' in the host part are written as octal escapes.
        let host = hostname.replace('/', "\\057").replace(':', "\\072");
        let tmp = dir.join("tmp");
        let cleared = clear_tmp(&tmp, &host, SystemTime::now())?;
        if cleared > 0 {
            log::warn!(
                "spool: removed {cleared} unfinished file(s) from {}",
                tmp.display()
            );
        }
        // Short queue: sessions block on their ack anyway; the bound just caps memory.
        let (tx, rx) = bounded::<Commit>(1024);
        let writer_faults = Arc::clone(&opts.faults);
        let fsync = opts.fsync;
        let sync_batch = fsync && opts.data_sync == DataSync::Batch;
        let handle = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer(rx, fsync, sync_batch, stats, writer_faults))?;
        let mut known = HashSet::new();
        known.insert(dir.to_path_buf());
        Ok((
            Maildir {
                shared: Arc::new(Shared {
                    dir: dir.to_path_buf(),
                    host,
                    sync_each: fsync && opts.data_sync == DataSync::PerFile,
                    file_mode: opts.file_mode,
                    dir_mode: dmode,
                    pid: std::process::id(),
                    faults: opts.faults,
                    known: Mutex::new(known),
                }),
                seq: AtomicU64::new(0),
                tx,
            },
            handle,
        ))
    }
}

/// Distinguishes this process from an earlier one that had the same pid (a restarted
/// container is often pid 1 again): part of every name, so names are unique across
/// processes and a live process's files can be told from a dead one's.
fn process_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS's random source once per process.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        format!("{:08x}", h.finish() as u32)
    })
}

/// Files in `tmp/` older than this are removed whoever wrote them (Maildir's rule).
const TMP_MAX_AGE: Duration = Duration::from_secs(36 * 3600);

/// Whether a file in `tmp/` belongs to a live writer: our name form, this host, and a
/// process that still runs (this one, or a pid with an entry in /proc).
fn tmp_is_live(name: &str, host: &str) -> bool {
    let mut parts = name.splitn(3, '.');
    let (Some(secs), Some(unique), Some(h)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    if h != host || secs.parse::<u64>().is_err() || !unique.starts_with('M') {
        return false;
    }
    let after = |tag: char| unique.split_once(tag).map(|(_, rest)| rest);
    let pid: Option<u32> = after('P').and_then(|r| {
        let digits: String = r.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    });
    let token = after('R').map(|r| {
        r.chars()
            .take_while(char::is_ascii_hexdigit)
            .collect::<String>()
    });
    match (pid, token) {
        (Some(pid), Some(token)) if pid == std::process::id() => token == process_token(),
        (Some(pid), Some(_)) => Path::new("/proc").join(pid.to_string()).exists(),
        _ => false,
    }
}

/// Removes from `tmp/` every file no live process is writing (SPEC 5), so that several
/// instances can share a spool. Returns how many were removed.
fn clear_tmp(tmp: &Path, host: &str, now: SystemTime) -> io::Result<usize> {
    let mut cleared = 0;
    for entry in fs::read_dir(tmp)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > TMP_MAX_AGE);
        let live = name.to_str().is_some_and(|n| tmp_is_live(n, host));
        if old || !live {
            match fs::remove_file(entry.path()) {
                Ok(()) => cleared += 1,
                // Its writer finished (renamed it) meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(cleared)
}

/// Moves `from` to `to` unless `to` exists: a Maildir name must never replace a
/// delivered message. RENAME_NOREPLACE where the filesystem has it, else link + unlink
/// (link(2) fails on an existing name too).
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            fs::hard_link(from, to)?;
            fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Creates a Maildir's `tmp/ new/ cur/` (and missing parents), making each new
/// directory entry durable: a message acknowledged in a brand-new mailbox must not
/// vanish with its directory in a crash (invariant 1).
fn create_maildir(dir: &Path, mode: u32) -> io::Result<()> {
    for sub in ["tmp", "new", "cur"] {
        create_dir_durably(&dir.join(sub), mode)?;
    }
    Ok(())
}

/// `mkdir -p` with `mode` (whatever the umask), fsyncing the parent of every directory
/// it creates.
fn create_dir_durably(path: &Path, mode: u32) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            create_dir_durably(parent, mode)?;
        }
    }
    match fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        // Another session (or process) created it meanwhile.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    // The umask may have taken bits away: set exactly what the operator asked for.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

impl Store for Maildir {
    fn begin(&self) -> Result<Box<dyn MessageWriter>, StoreError> {
        self.begin_at(self.shared.dir.clone())
    }

    fn begin_in(&self, maildir: &Path) -> Option<Result<Box<dyn MessageWriter>, StoreError>> {
        let sh = &self.shared;
        let dir = match ensure_maildir(sh, maildir.to_path_buf()) {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        Some(self.begin_at(dir))
    }
}

impl Maildir {
    /// A new message file in `<maildir>/tmp/`, to be committed into `<maildir>/new/`.
    fn begin_at(&self, maildir: PathBuf) -> Result<Box<dyn MessageWriter>, StoreError> {
        let sh = &self.shared;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let queue_id = format!(
            "M{}P{}R{}Q{}",
            now.subsec_micros(),
            sh.pid,
            process_token(),
            seq
        );
        let name = format!("{}.{}.{}", now.as_secs(), queue_id, sh.host);
        let tmp = maildir.join("tmp").join(&name);
        let file = sh
            .faults
            .before(Op::Create)
            .and_then(|()| {
                create_file(
                    OpenOptions::new().read(true).write(true),
                    &tmp,
                    sh.file_mode,
                )
            })
            .map_err(|e| StoreError::from_io(&tmp.display().to_string(), &e))?;
        Ok(Box::new(MaildirMessage {
            // Small: the connection hands over content in 32 KiB runs, which bypass the
            // buffer; it only gathers the trace headers and short messages into one write.
            out: Some(BufWriter::with_capacity(8 * 1024, file)),
            tmp,
            name,
            queue_id,
            maildir,
            tx: self.tx.clone(),
            shared: Arc::clone(&self.shared),
        }))
    }
}

/// Creates a Maildir on first use (remembered, so later messages pay nothing).
fn ensure_maildir(sh: &Shared, dir: PathBuf) -> Result<PathBuf, StoreError> {
    let mut known = sh.known.lock().unwrap_or_else(|p| p.into_inner());
    if !known.contains(&dir) {
        create_maildir(&dir, sh.dir_mode)
            .map_err(|e| StoreError::from_io(&dir.display().to_string(), &e))?;
        // No tmp/ clearing here: a mailbox is shared with its reader (Dovecot writes
        // its own files in tmp/); mailboxes::clear_debris removes only our own dead
        // files, at start.
        if known.len() >= KNOWN_DIRS_MAX {
            known.clear();
        }
        known.insert(dir.clone());
    }
    Ok(dir)
}

struct MaildirMessage {
    /// `None` once handed to the writer thread.
    out: Option<BufWriter<File>>,
    /// The Maildir whose tmp/ holds the file (and whose new/ `commit` delivers into).
    maildir: PathBuf,
    tmp: PathBuf,
    name: String,
    queue_id: String,
    tx: Sender<Commit>,
    shared: Arc<Shared>,
}

impl Write for MaildirMessage {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.faults.before(Op::Write)?;
        match &mut self.out {
            Some(w) => w.write(buf),
            None => Err(io::Error::other("message already committed")),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

/// Creates a new file with exactly `mode`: the umask may have taken bits away at
/// creation, so they are set again on the open descriptor (fchmod, no path race).
fn create_file(opts: &mut OpenOptions, path: &Path, mode: u32) -> io::Result<File> {
    let file = opts.create_new(true).mode(mode).open(path)?;
    if let Err(e) = file.set_permissions(fs::Permissions::from_mode(mode)) {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}

/// Reads a file from a position without moving its shared offset.
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl MaildirMessage {
    /// Sends files to the writer and waits for the verdict. From the send on, the
    /// writer owns them: in new/ on success, removed on failure.
    fn hand_over(&self, files: Vec<(PathBuf, String, PathBuf)>) -> Result<(), StoreError> {
        let ack = Arc::new(Ack::default());
        let commit = Commit {
            files,
            ack: AckTx(Arc::clone(&ack)),
        };
        self.tx
            .send(commit)
            .map_err(|_| StoreError::Io("spool writer has stopped".into()))?;
        ack.wait()
    }

    /// Writes one copy into `<maildir>/tmp/`, fsynced; returns its path.
    fn write_copy(
        &self,
        content: &File,
        len: u64,
        copy: &Copy,
        tmp_name: &str,
        maildir: &Path,
    ) -> Result<PathBuf, StoreError> {
        let sh = &self.shared;
        let path = maildir.join("tmp").join(tmp_name);
        let what = path.display().to_string();
        let io_err = |e: io::Error| StoreError::from_io(&what, &e);
        let file = sh
            .faults
            .before(Op::Create)
            .and_then(|()| create_file(OpenOptions::new().write(true), &path, sh.file_mode))
            .map_err(io_err)?;
        // From here a failure must not leave the half-written copy behind.
        let written = (|| {
            let mut out = BufWriter::with_capacity(8 * 1024, &file);
            let (skip, section) = match &copy.headers {
                Some((n, bytes)) => ((*n).min(len), bytes.as_slice()),
                None => (0, &[][..]),
            };
            sh.faults.before(Op::Write)?;
            out.write_all(&copy.head)?;
            out.write_all(section)?;
            // File to file: std copies in the kernel (copy_file_range) where it can.
            let mut from = content;
            io::Seek::seek(&mut from, io::SeekFrom::Start(skip))?;
            io::copy(&mut from.take(len - skip), &mut out)?;
            out.flush()?;
            drop(out);
            if sh.sync_each {
                sh.faults.before(Op::SyncFile)?;
                file.sync_data()?;
                #[cfg(test)]
                probe::record(probe::Event::FileSynced, &path.display().to_string());
            }
            Ok(())
        })();
        match written {
            Ok(()) => Ok(path),
            Err(e) => {
                let _ = fs::remove_file(&path);
                Err(io_err(e))
            }
        }
    }

    /// The Maildir a copy goes to, created on first use.
    fn target(&self, copy: &Copy) -> Result<PathBuf, StoreError> {
        let sh = &self.shared;
        let mut dir = copy.maildir.clone().unwrap_or_else(|| sh.dir.clone());
        if copy.quarantine {
            // A Maildir++ folder (the Courier/Dovecot layout): `.Name` inside the Maildir.
            dir.push(".Quarantine");
        }
        ensure_maildir(sh, dir)
    }
}

impl MessageWriter for MaildirMessage {
    fn queue_id(&self) -> &str {
        &self.queue_id
    }

    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        let what = self.tmp.display().to_string();
        let Some(out) = self.out.take() else {
            return Err(StoreError::Io(format!("{what}: committed twice")));
        };
        let file = out
            .into_inner()
            .map_err(|e| StoreError::from_io(&what, e.error()))?;
        let sh = Arc::clone(&self.shared);
        if sh.sync_each {
            // Each session syncs its own file, so many fsyncs run in parallel and the
            // filesystem folds them into few journal commits.
            sh.faults
                .before(Op::SyncFile)
                .and_then(|()| file.sync_data())
                .map_err(|e| StoreError::from_io(&what, &e))?;
            #[cfg(test)]
            probe::record(probe::Event::FileSynced, &self.name);
        }
        drop(file);
        let files = vec![(
            self.tmp.clone(),
            self.name.clone(),
            self.maildir.join("new"),
        )];
        // From the hand-over the writer owns the file: in new/ on success, removed on failure.
        let tmp = std::mem::take(&mut self.tmp);
        let result = self.hand_over(files);
        if matches!(&result, Err(StoreError::Io(m)) if m == "spool writer has stopped") {
            let _ = fs::remove_file(&tmp);
        }
        #[cfg(test)]
        probe::record(probe::Event::Acked, &self.name);
        result
    }

    fn content(&mut self) -> io::Result<Box<dyn Read + '_>> {
        match &mut self.out {
            Some(w) => {
                w.flush()?;
                Ok(Box::new(ReadAt {
                    file: w.get_ref(),
                    pos: 0,
                }))
            }
            None => Err(io::Error::other("message already committed")),
        }
    }

    fn commit_copies(mut self: Box<Self>, copies: Vec<Copy>) -> Result<(), StoreError> {
        let what = self.tmp.display().to_string();
        let Some(out) = self.out.take() else {
            return Err(StoreError::Io(format!("{what}: committed twice")));
        };
        let content = out
            .into_inner()
            .map_err(|e| StoreError::from_io(&what, e.error()))?;
        let len = content
            .metadata()
            .map_err(|e| StoreError::from_io(&what, &e))?
            .len();
        let mut files = Vec::with_capacity(copies.len());
        let mut failed = None;
        for (i, copy) in copies.iter().enumerate() {
            // The tmp name differs from the staged content's (both may be in spool tmp/);
            // the name in new/ is the message's, with the queue id of the 250.
            let tmp_name = self
                .name
                .replacen(&self.queue_id, &format!("{}C{i}", self.queue_id), 1);
            let written = self
                .target(copy)
                .and_then(|dir| Ok((self.write_copy(&content, len, copy, &tmp_name, &dir)?, dir)));
            match written {
                Ok((path, dir)) => files.push((path, self.name.clone(), dir.join("new"))),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(content);
        // The staged content is no longer needed, whatever happens next.
        let _ = fs::remove_file(&self.tmp);
        self.tmp = PathBuf::new();
        if let Some(e) = failed {
            log::error!("spool: {e}");
            for (path, _, _) in &files {
                let _ = fs::remove_file(path);
            }
            return Err(e);
        }
        if files.is_empty() {
            return Ok(());
        }
        let tmps: Vec<PathBuf> = files.iter().map(|f| f.0.clone()).collect();
        let result = self.hand_over(files);
        if matches!(&result, Err(StoreError::Io(m)) if m == "spool writer has stopped") {
            for t in &tmps {
                let _ = fs::remove_file(t);
            }
        }
        #[cfg(test)]
        probe::record(probe::Event::Acked, &self.name);
        result
    }
}

impl Drop for MaildirMessage {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.out = None;
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The writer thread: batch, (sync the data,) rename, one fsync per touched
/// directory, ack.
fn writer(
    rx: Receiver<Commit>,
    fsync: bool,
    sync_batch: bool,
    stats: Arc<SpoolStats>,
    faults: Arc<dyn Faults>,
) {
    let mut batch: Vec<Commit> = Vec::with_capacity(256);
    // Descriptors kept open: an fsync through any descriptor of a directory makes its
    // entries durable. Dropped after an error; bounded by clearing.
    let mut dirs: HashMap<PathBuf, File> = HashMap::new();
    let mut filesystems: HashMap<PathBuf, (u64, File)> = HashMap::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        if sync_batch {
            if let Err(e) = sync_batch_data(&batch, &mut filesystems, faults.as_ref()) {
                log::error!("spool: syncfs failed: {e}");
                for c in batch.drain(..) {
                    for (tmp, _, _) in &c.files {
                        let _ = fs::remove_file(tmp);
                    }
                    c.ack.send(Err(StoreError::from_io("syncfs", &e)));
                }
                continue;
            }
        }
        // Each commit's files go in together: a failed rename takes back the ones
        // already moved (nobody has been told about them), and the rest are removed.
        let mut renamed: Vec<(Commit, Vec<PathBuf>)> = Vec::with_capacity(batch.len());
        for c in batch.drain(..) {
            let mut done = Vec::with_capacity(c.files.len());
            let mut error = None;
            for (tmp, name, new_dir) in &c.files {
                let dest = new_dir.join(name);
                match faults
                    .before(Op::Rename)
                    .and_then(|()| rename_noreplace(tmp, &dest))
                {
                    Ok(()) => {
                        #[cfg(test)]
                        probe::record(
                            probe::Event::Renamed,
                            &if c.files.len() == 1 && tmp.ends_with(name) {
                                name.clone()
                            } else {
                                tmp.display().to_string()
                            },
                        );
                        done.push(dest)
                    }
                    Err(e) => {
                        error = Some(StoreError::from_io(&dest.display().to_string(), &e));
                        break;
                    }
                }
            }
            match error {
                None => renamed.push((c, done)),
                Some(e) => {
                    log::error!("spool: {e}");
                    for dest in &done {
                        let _ = fs::remove_file(dest);
                    }
                    for (tmp, _, _) in &c.files {
                        let _ = fs::remove_file(tmp);
                    }
                    c.ack.send(Err(e));
                }
            }
        }
        if renamed.is_empty() {
            continue;
        }
        let started = Instant::now();
        let touched: BTreeSet<&Path> = renamed
            .iter()
            .flat_map(|(c, _)| c.files.iter().map(|f| f.2.as_path()))
            .collect();
        let mut failed: HashMap<PathBuf, io::Error> = HashMap::new();
        if fsync {
            for dir in touched {
                if let Err(e) = faults
                    .before(Op::SyncDir)
                    .and_then(|()| sync_dir(&mut dirs, dir))
                {
                    log::error!("spool: fsync of {} failed: {e}", dir.display());
                    failed.insert(dir.to_path_buf(), e);
                }
            }
        }
        stats
            .dir_fsync_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        for (c, dests) in renamed {
            let bad = c
                .files
                .iter()
                .find_map(|f| failed.get(&f.2).map(|e| (&f.2, e)));
            match bad {
                None => {
                    stats.committed.fetch_add(1, Ordering::Relaxed);
                    c.ack.send(Ok(()));
                }
                Some((dir, e)) => {
                    // Not durable: take the files back out so a refused message is
                    // never delivered later (the client will retry it).
                    for dest in &dests {
                        let _ = fs::remove_file(dest);
                    }
                    c.ack
                        .send(Err(StoreError::from_io(&dir.display().to_string(), e)));
                }
            }
        }
    }
}

/// [`DataSync::Batch`]: one syncfs(2) per filesystem holding files of the batch, then
/// one flush of the disk's write cache.
///
/// Why this keeps invariant 1: every file of the batch was written and closed by its
/// session before it was handed over, so its data is in the page cache (or already on
/// disk) when the writer starts. syncfs writes back every dirty inode of the filesystem
/// and waits for it: the files' data, and the metadata needed to read it back (size,
/// block map, the conversion of unwritten extents). But sync_filesystem() asks the
/// filesystem to flush the disk cache (->sync_fs with wait) *before* its last step,
/// which writes the block device's dirty buffers; a filesystem that keeps inodes there
/// (ext4 without a journal, ext2) gets them written after that flush, into a volatile
/// cache. So an fsync follows on the same filesystem: it ends with a cache flush of
/// its own, after syncfs's writes have completed. It is an fsync of new/, which is on
/// tmp/'s filesystem (the renames need that) and which no session writes, so it has
/// little to write; not of tmp/, whose directory blocks it would write again, locked
/// against the sessions creating their files meanwhile. Only then is every file of
/// the batch as durable as one fdatasync each would have made it, and only then are
/// the files renamed into new/ and new/ fsynced, so new/ never names a file whose data
/// or inode a power cut could lose.
/// Since Linux 5.8 syncfs reports writeback errors on the filesystem since the
/// descriptor was opened; any error fails the whole batch (the clients retry), never
/// a silent loss.
fn sync_batch_data(
    batch: &[Commit],
    filesystems: &mut HashMap<PathBuf, (u64, File)>,
    faults: &dyn Faults,
) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut synced: BTreeSet<u64> = BTreeSet::new();
    for c in batch {
        for (_, _, dir) in &c.files {
            if !filesystems.contains_key(dir) {
                let f = File::open(dir)?;
                let dev = f.metadata()?.dev();
                if filesystems.len() >= KNOWN_DIRS_MAX {
                    filesystems.clear();
                }
                filesystems.insert(dir.to_path_buf(), (dev, f));
            }
            let Some((dev, f)) = filesystems.get(dir) else {
                continue;
            };
            if synced.insert(*dev) {
                faults.before(Op::SyncFile)?;
                rustix::fs::syncfs(f)?;
                faults.before(Op::Flush)?;
                f.sync_all()?;
            }
        }
    }
    #[cfg(test)]
    for c in batch {
        for (tmp, name, _) in &c.files {
            let key = if c.files.len() == 1 && tmp.ends_with(name) {
                name.clone()
            } else {
                tmp.display().to_string()
            };
            probe::record(probe::Event::FileSynced, &key);
        }
    }
    Ok(())
}

/// fsync a directory so the renames in it are durable.
fn sync_dir(cached: &mut HashMap<PathBuf, File>, dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    probe::record(probe::Event::DirSyncStart, &dir.display().to_string());
    let result = match cached.get(dir) {
        Some(f) => f.sync_all(),
        None => {
            let f = File::open(dir)?;
            let r = f.sync_all();
            if cached.len() >= KNOWN_DIRS_MAX {
                cached.clear();
            }
            cached.insert(dir.to_path_buf(), f);
            r
        }
    };
    if result.is_err() {
        cached.remove(dir);
    }
    #[cfg(test)]
    probe::record(probe::Event::DirSyncEnd, &dir.display().to_string());
    result
}

/// Test-only record of the durability steps, in the order they happened, so that a test
/// can prove that no ack precedes the fsyncs (SPEC invariant 1).
#[cfg(test)]
mod probe {
    use std::sync::Mutex;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Event {
        /// The message file's fsync returned (key: the file name).
        FileSynced,
        /// The writer renamed it into new/.
        Renamed,
        /// The writer began / ended an fsync of new/ (key: the directory's path).
        DirSyncStart,
        DirSyncEnd,
        /// The session got its ack (what it answers 250 on).
        Acked,
    }

    pub(super) static EVENTS: Mutex<Vec<(Event, String)>> = Mutex::new(Vec::new());

    pub(super) fn record(event: Event, key: &str) {
        EVENTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((event, key.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_moves_whole_file_into_new_and_tmp_is_cleared_at_open() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("tmp")).unwrap();
        fs::write(d.path().join("tmp").join("debris"), b"partial").unwrap();
        let (md, h) = Maildir::open(d.path(), "mx/a:b", true, Arc::default()).unwrap();
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        let mut m = md.begin().unwrap();
        let id = m.queue_id().to_string();
        m.write_all(b"hello\r\n").unwrap();
        m.commit().unwrap();
        let names: Vec<_> = fs::read_dir(d.path().join("new"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 1);
        assert!(names[0].contains(&format!(".{id}.")), "{names:?}");
        assert!(names[0].ends_with("mx\\057a\\072b"), "{names:?}");
        let body = fs::read(d.path().join("new").join(&names[0])).unwrap();
        assert_eq!(body, b"hello\r\n");
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        drop(md);
        h.join().unwrap();
    }

    /// SPEC invariant 1, on the real Maildir with many sessions committing at once: for
    /// every message, its file fsync, then its rename into new/, then the start and the
    /// end of one fsync of new/, and only then the ack the session answers 250 on.
    #[test]
    fn no_ack_before_file_fsync_rename_and_dir_fsync() {
        order_probe(DataSync::PerFile, "order-probe.test");
    }

    /// The same order when the writer syncs whole batches (syncfs, issue 18).
    #[test]
    fn no_ack_before_batch_sync_rename_and_dir_fsync() {
        order_probe(DataSync::Batch, "order-probe-batch.test");
    }

    fn order_probe(data_sync: DataSync, host: &str) {
        use probe::Event::*;
        let d = tempfile::tempdir().unwrap();
        // A host name of its own: file names end with it, so this test's events can be
        // told from those of tests running at the same time.
        let opts = SpoolOptions {
            data_sync,
            ..SpoolOptions::default()
        };
        let (md, h) = Maildir::open_with(d.path(), host, opts, Arc::default()).unwrap();
        let md = Arc::new(md);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let md = Arc::clone(&md);
                std::thread::spawn(move || {
                    for i in 0..10 {
                        let mut m = md.begin().unwrap();
                        writeln!(m, "message {t}/{i}\r").unwrap();
                        m.commit().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(md);
        h.join().unwrap();
        let new_dir = d.path().join("new").display().to_string();
        let events: Vec<_> = probe::EVENTS
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, k)| k.ends_with(host) || *k == new_dir)
            .cloned()
            .collect();
        let names: Vec<String> = fs::read_dir(d.path().join("new"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 80);
        let at = |ev: probe::Event, name: &str| {
            let hits: Vec<usize> = (0..events.len())
                .filter(|&i| events[i].0 == ev && events[i].1 == name)
                .collect();
            assert_eq!(hits.len(), 1, "{ev:?} of {name} seen {} times", hits.len());
            hits[0]
        };
        let dir_event = |i: usize, ev: probe::Event| events[i].0 == ev && events[i].1 == new_dir;
        for name in &names {
            let synced = at(FileSynced, name);
            let renamed = at(Renamed, name);
            let acked = at(Acked, name);
            assert!(synced < renamed, "renamed before its fsync: {name}");
            // The dir fsync that covers it: begun after the rename, ended before the ack.
            let covered = (renamed..acked).any(|s| {
                dir_event(s, DirSyncStart) && (s..acked).any(|e| dir_event(e, DirSyncEnd))
            });
            assert!(
                covered,
                "acked without a new/ fsync after its rename: {name}"
            );
        }
        // Group commit: never more directory fsyncs than messages.
        let batches = (0..events.len())
            .filter(|&i| dir_event(i, DirSyncEnd))
            .count();
        assert!((1..=80).contains(&batches), "{batches} directory fsyncs");
    }

    /// Invariant 1 for copies in several Maildirs (SPEC 8): every copy's fsync, then
    /// its rename, then a fsync of its new/ that begins after that rename and ends
    /// before the session's ack; one new/ fsync per directory per batch at most.
    #[test]
    fn copies_in_several_maildirs_are_durable_before_the_ack() {
        use probe::Event::*;
        let d = tempfile::tempdir().unwrap();
        let host = "multi-probe.test";
        let (md, h) = Maildir::open(&d.path().join("spool"), host, true, Arc::default()).unwrap();
        let md = Arc::new(md);
        let boxes: Vec<PathBuf> = ["a", "b", "c"].iter().map(|n| d.path().join(n)).collect();
        let threads: Vec<_> = (0..6)
            .map(|t| {
                let md = Arc::clone(&md);
                let boxes = boxes.clone();
                std::thread::spawn(move || {
                    let mut names = Vec::new();
                    for i in 0..8 {
                        let mut m = md.begin().unwrap();
                        write!(m, "content {t}/{i}\r\n").unwrap();
                        let mut copies = vec![Copy {
                            maildir: None,
                            quarantine: false,
                            head: b"X-Spool: yes\r\n".to_vec(),
                            headers: None,
                        }];
                        for b in &boxes {
                            copies.push(Copy {
                                maildir: Some(b.clone()),
                                quarantine: false,
                                head: format!("Delivered-To: {}\r\n", b.display()).into_bytes(),
                                headers: None,
                            });
                        }
                        let name = m.queue_id().to_string();
                        m.commit_copies(copies).unwrap();
                        names.push(name);
                    }
                    names
                })
            })
            .collect();
        let ids: Vec<String> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        drop(md);
        h.join().unwrap();
        let events: Vec<_> = probe::EVENTS
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, k)| k.contains(host) || k.starts_with(&d.path().display().to_string()))
            .cloned()
            .collect();
        let mut dirs = vec![d.path().join("spool")];
        dirs.extend(boxes.iter().cloned());
        let mut per_dir_syncs = 0;
        for dir in &dirs {
            let new_dir = dir.join("new");
            let files: Vec<String> = fs::read_dir(&new_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(files.len(), 48, "{}", new_dir.display());
            assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
            let new_key = new_dir.display().to_string();
            per_dir_syncs += events
                .iter()
                .filter(|(e, k)| *e == DirSyncEnd && *k == new_key)
                .count();
            for id in &ids {
                let name = files
                    .iter()
                    .find(|f| f.contains(&format!(".{id}.")))
                    .unwrap();
                let body = fs::read(new_dir.join(name)).unwrap();
                assert!(body.ends_with(b"\r\n") && body.windows(8).any(|w| w == b"content "));
                // The copy's tmp path (events are keyed by it) and the message's ack.
                let tmp_prefix = dir.join("tmp").display().to_string();
                let at = |ev: probe::Event, pred: &dyn Fn(&str) -> bool| {
                    let hits: Vec<usize> = (0..events.len())
                        .filter(|&i| events[i].0 == ev && pred(&events[i].1))
                        .collect();
                    assert_eq!(hits.len(), 1, "{ev:?} for {id} in {}", dir.display());
                    hits[0]
                };
                let is_copy =
                    |k: &str| k.starts_with(&tmp_prefix) && k.contains(&format!(".{id}C"));
                let synced = at(FileSynced, &is_copy);
                let renamed = at(Renamed, &is_copy);
                let acked = at(Acked, &|k: &str| k.contains(&format!(".{id}.")));
                assert!(synced < renamed && renamed < acked);
                let covered = (renamed..acked).any(|s| {
                    events[s] == (DirSyncStart, new_key.clone())
                        && (s..acked).any(|e| events[e] == (DirSyncEnd, new_key.clone()))
                });
                assert!(covered, "{id} acked before {new_key} was synced");
            }
        }
        // Group commit: at most one fsync per directory per message, usually fewer.
        assert!(per_dir_syncs <= 4 * 48, "{per_dir_syncs}");
    }

    #[test]
    fn a_name_clash_never_replaces_a_delivered_file() {
        let d = tempfile::tempdir().unwrap();
        let (from, to) = (d.path().join("from"), d.path().join("to"));
        fs::write(&from, b"new").unwrap();
        fs::write(&to, b"delivered").unwrap();
        let e = rename_noreplace(&from, &to).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&to).unwrap(), b"delivered");
        assert_eq!(fs::read(&from).unwrap(), b"new");
        let free = d.path().join("free");
        rename_noreplace(&from, &free).unwrap();
        assert_eq!(fs::read(&free).unwrap(), b"new");
        assert!(!from.exists());
    }

    /// The writer refuses a commit whose name is taken in new/: the client gets an
    /// error (and retries under a new id), the delivered file stays as it was.
    #[test]
    fn a_commit_clashing_with_new_fails_and_keeps_the_old_file() {
        let d = tempfile::tempdir().unwrap();
        let (md, h) = Maildir::open(d.path(), "clash.test", true, Arc::default()).unwrap();
        let mut m = md.begin().unwrap();
        m.write_all(b"second\r\n").unwrap();
        let new_dir = d.path().join("new");
        // The exact name the message will get in new/.
        let name = fs::read_dir(d.path().join("tmp"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        let taken = new_dir.join(name);
        fs::write(&taken, b"first\r\n").unwrap();
        assert!(m.commit().is_err());
        assert_eq!(fs::read(&taken).unwrap(), b"first\r\n");
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        drop(md);
        h.join().unwrap();
    }

    #[test]
    fn names_are_unique_across_processes_and_tell_who_writes_them() {
        let d = tempfile::tempdir().unwrap();
        let (md, h) = Maildir::open(d.path(), "mx.test", false, Arc::default()).unwrap();
        let m = md.begin().unwrap();
        let id = m.queue_id().to_string();
        let me = std::process::id();
        assert!(id.contains(&format!("P{me}R{}Q", process_token())), "{id}");
        let name = format!("1700000000.{id}.mx.test");
        assert!(tmp_is_live(&name, "mx.test"));
        assert!(!tmp_is_live(&name, "other.test"), "another host's name");
        // The same pid with another token: an earlier process (a restarted container).
        let earlier = format!("1700000000.M1P{me}R00000000Q0.mx.test");
        assert!(process_token() == "00000000" || !tmp_is_live(&earlier, "mx.test"));
        drop(m);
        drop(md);
        h.join().unwrap();
    }

    /// SPEC 5: at start, tmp/ keeps what a live process of this host is writing and
    /// loses the rest (a dead pid, foreign names, anything older than 36 hours).
    #[test]
    fn tmp_cleanup_keeps_live_writers_only() {
        let d = tempfile::tempdir().unwrap();
        let tmp = d.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        let pid_max: u64 = fs::read_to_string("/proc/sys/kernel/pid_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let dead = pid_max + 1;
        let init_live = "1700000000.M5P1Rabcdef01Q3.mx.test";
        let files = [
            (init_live, true),
            ("1700000000.M5P1Rabcdef01Q3C0.mx.test", true),
            ("1700000000.M5P1Rabcdef01Q4.other.host", false),
            (&*format!("1700000000.M5P{dead}Rabcdef01Q3.mx.test"), false),
            ("debris", false),
            ("1700000000.nonsense.mx.test", false),
        ];
        for (name, _) in &files {
            fs::write(tmp.join(name), b"x").unwrap();
        }
        let old = tmp.join("1700000000.M6P1Rabcdef01Q9.mx.test");
        let f = File::create(&old).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(37 * 3600))
            .unwrap();
        drop(f);
        let removed = clear_tmp(&tmp, "mx.test", SystemTime::now()).unwrap();
        assert_eq!(removed, 5);
        for (name, kept) in &files {
            assert_eq!(tmp.join(name).exists(), *kept, "{name}");
        }
        assert!(!old.exists());
    }

    #[test]
    fn dir_modes_add_x_where_a_class_has_access() {
        assert_eq!(dir_mode(0o600), 0o700);
        assert_eq!(dir_mode(0o640), 0o750);
        assert_eq!(dir_mode(0o660), 0o770);
        assert_eq!(dir_mode(0o644), 0o755);
    }

    #[test]
    fn dropped_message_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (md, h) = Maildir::open(d.path(), "h", false, Arc::default()).unwrap();
        let mut m = md.begin().unwrap();
        m.write_all(b"x").unwrap();
        drop(m);
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(d.path().join("new")).unwrap().count(), 0);
        drop(md);
        h.join().unwrap();
    }

    #[test]
    fn enospc_is_full() {
        let e = io::Error::from_raw_os_error(28);
        assert!(matches!(StoreError::from_io("x", &e), StoreError::Full(_)));
        let e = io::Error::from_raw_os_error(5);
        assert!(matches!(StoreError::from_io("x", &e), StoreError::Io(_)));
    }
}
