//! In-memory driver: a whole [`Connection`] over a scripted byte stream and a Vec-backed
//! [`Store`], no sockets, threads or files. Cheap enough for property tests with
//! hundreds of cases.
//!
//! ```ignore
//! let run = Mem::default().run(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n...QUIT\r\n");
//! assert_eq!(run.codes(), [220, 250, 250, ..., 221]);
//! assert_eq!(run.stored.len(), 1);
//! ```
//!
//! The whole input is available at once (as if the client pipelined everything), but
//! [`Mem::segments`] cuts it into reads of chosen sizes to exercise buffer boundaries.

use mailer::auth::Authenticator;
use mailer::connection::{Connection, End, Forever, Transport, WireLimits};
use mailer::hooks::{Hooks, NoHooks, SessionInfo, TlsInfo};
use mailer::protocol::data::BareLf;
use mailer::session::{AuthSettings, Session, Settings};
use mailer::spool::{Copy, MessageWriter, Store, StoreError};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A scripted client: reads come from `input` (in `segments`-sized pieces, cycling; the
/// rest in one piece when empty), then EOF; writes collect in `output`.
pub struct MemoryTransport {
    input: Vec<u8>,
    pos: usize,
    segments: Vec<usize>,
    next_segment: usize,
    pub output: Vec<u8>,
}

impl MemoryTransport {
    pub fn new(input: &[u8], segments: &[usize]) -> MemoryTransport {
        MemoryTransport {
            input: input.to_vec(),
            pos: 0,
            segments: segments.iter().copied().filter(|&n| n > 0).collect(),
            next_segment: 0,
            output: Vec::new(),
        }
    }
}

impl Read for MemoryTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = buf.len().min(self.input.len() - self.pos);
        if !self.segments.is_empty() {
            n = n.min(self.segments[self.next_segment % self.segments.len()]);
            self.next_segment += 1;
        }
        buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for MemoryTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for MemoryTransport {
    fn set_read_timeout(&mut self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// Where [`MemoryStore`] fails, to test storage errors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fail {
    #[default]
    Never,
    /// `begin` fails with "disk full".
    Begin,
    /// Every write fails (I/O error).
    Write,
    /// `commit` fails (I/O error).
    Commit,
}

#[derive(Default)]
struct StoreState {
    next: u64,
    committed: Vec<(String, Vec<u8>)>,
    open: usize,
    fail: Fail,
}

/// A [`Store`] keeping committed messages in memory. Clones share the same state.
#[derive(Clone, Default)]
pub struct MemoryStore(Arc<Mutex<StoreState>>);

impl MemoryStore {
    pub fn failing(fail: Fail) -> MemoryStore {
        let s = MemoryStore::default();
        s.0.lock().unwrap().fail = fail;
        s
    }
    /// Committed messages (queue id, bytes) in commit order.
    pub fn committed(&self) -> Vec<(String, Vec<u8>)> {
        self.0.lock().unwrap().committed.clone()
    }
    /// Writers begun but neither committed nor dropped (the tmp/ debris of a Maildir).
    pub fn open_writers(&self) -> usize {
        self.0.lock().unwrap().open
    }
}

impl Store for MemoryStore {
    fn begin(&self) -> Result<Box<dyn MessageWriter>, StoreError> {
        let mut st = self.0.lock().unwrap();
        if st.fail == Fail::Begin {
            return Err(StoreError::Full("memory store: disk full".into()));
        }
        st.next += 1;
        st.open += 1;
        Ok(Box::new(MemoryMessage {
            id: format!("MEM{}", st.next),
            buf: Vec::new(),
            store: self.clone(),
            fail: st.fail,
            done: false,
        }))
    }
}

struct MemoryMessage {
    id: String,
    buf: Vec<u8>,
    store: MemoryStore,
    fail: Fail,
    done: bool,
}

impl Write for MemoryMessage {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.fail == Fail::Write {
            return Err(io::Error::other("memory store: write error"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl MessageWriter for MemoryMessage {
    fn queue_id(&self) -> &str {
        &self.id
    }
    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.done = true;
        let mut st = self.store.0.lock().unwrap();
        st.open -= 1;
        if self.fail == Fail::Commit {
            return Err(StoreError::Io("memory store: commit failed".into()));
        }
        st.committed
            .push((self.id.clone(), std::mem::take(&mut self.buf)));
        Ok(())
    }
    fn content(&mut self) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(&self.buf[..]))
    }
    /// Each copy is committed as one message: its head, then the content.
    fn commit_copies(mut self: Box<Self>, copies: Vec<Copy>) -> Result<(), StoreError> {
        self.done = true;
        let mut st = self.store.0.lock().unwrap();
        st.open -= 1;
        if self.fail == Fail::Commit {
            return Err(StoreError::Io("memory store: commit failed".into()));
        }
        for c in copies {
            let mut bytes = c.head;
            match c.headers {
                Some((n, section)) => {
                    bytes.extend_from_slice(&section);
                    bytes.extend_from_slice(&self.buf[n as usize..]);
                }
                None => bytes.extend_from_slice(&self.buf),
            }
            st.committed.push((self.id.clone(), bytes));
        }
        Ok(())
    }
}

impl Drop for MemoryMessage {
    fn drop(&mut self) {
        if !self.done {
            self.store.0.lock().unwrap().open -= 1;
        }
    }
}

/// One in-memory session's settings. Fields mirror the config keys.
pub struct Mem {
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: u32,
    pub max_line_length: usize,
    pub bare_lf: BareLf,
    pub hooks: Arc<dyn Hooks>,
    /// Read sizes the client's bytes arrive in (cycled); empty: all at once.
    pub segments: Vec<usize>,
    pub peer: SocketAddr,
    pub tls: Option<TlsInfo>,
    pub fail: Fail,
    /// `[auth]` with `allow_plaintext = true` and this authenticator (no argon2 cost).
    pub auth: Option<Arc<dyn Authenticator>>,
}

/// An authenticator with one user and password, compared in the clear (tests only).
pub struct OneUser(pub &'static str, pub &'static str);

impl Authenticator for OneUser {
    fn verify(&self, user: &str, password: &[u8]) -> bool {
        user == self.0 && password == self.1.as_bytes()
    }
}

impl Default for Mem {
    fn default() -> Mem {
        Mem {
            hostname: "mx.test".into(),
            max_message_size: 26_214_400,
            max_recipients: 100,
            max_errors: 10,
            max_line_length: 1000,
            bare_lf: BareLf::Normalize,
            hooks: Arc::new(NoHooks),
            segments: Vec::new(),
            peer: "127.0.0.1:40000".parse().unwrap(),
            tls: None,
            fail: Fail::Never,
            auth: None,
        }
    }
}

/// What one in-memory session did.
pub struct MemRun {
    /// Every byte the server wrote.
    pub output: Vec<u8>,
    pub end: End,
    /// Committed messages (queue id, bytes including trace headers).
    pub stored: Vec<(String, Vec<u8>)>,
    /// Writers left neither committed nor discarded (must be 0).
    pub open_writers: usize,
}

impl MemRun {
    /// The replies as (code, wire text of the whole reply).
    pub fn replies(&self) -> Vec<(u16, String)> {
        let text = String::from_utf8_lossy(&self.output);
        let mut out = Vec::new();
        let mut cur = String::new();
        for line in text.split_inclusive("\r\n") {
            cur.push_str(line);
            if line.as_bytes().get(3) != Some(&b'-') {
                let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                out.push((code, std::mem::take(&mut cur)));
            }
        }
        out
    }

    pub fn codes(&self) -> Vec<u16> {
        self.replies().into_iter().map(|(c, _)| c).collect()
    }
}

impl Mem {
    /// Runs one session over `input` to its end.
    pub fn run(&self, input: &[u8]) -> MemRun {
        let store = MemoryStore::failing(self.fail);
        let settings = Arc::new(Settings {
            hostname: self.hostname.clone(),
            max_message_size: self.max_message_size,
            max_recipients: self.max_recipients,
            max_errors: self.max_errors,
            tls_available: false,
            require_tls: false,
            auth: self.auth.as_ref().map(|a| AuthSettings {
                allow_plaintext: true,
                authenticator: Arc::clone(a),
            }),
        });
        let info = SessionInfo {
            id: 1,
            peer: self.peer,
            tls: self.tls.clone(),
            auth_user: None,
            helo: None,
            local: "127.0.0.1:25".parse().unwrap(),
            auth_mechanism: None,
        };
        let session = Session::new(settings, Arc::clone(&self.hooks), info);
        let limits = WireLimits {
            max_line_length: self.max_line_length,
            max_message_size: self.max_message_size,
            bare_lf: self.bare_lf,
            command_timeout: Duration::from_secs(5),
            data_timeout: Duration::from_secs(5),
            min_data_rate: 0,
        };
        let io = MemoryTransport::new(input, &self.segments);
        let wants_data = self.hooks.wants_data();
        let mut conn = Connection::new(io, session, &store, &Forever, limits, wants_data);
        let end = conn.run();
        let output = conn.into_transport().output;
        MemRun {
            output,
            end,
            stored: store.committed(),
            open_writers: store.open_writers(),
        }
    }
}
