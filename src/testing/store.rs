//! A [`Store`] that keeps committed messages in memory, with storage failures on demand.

use crate::spool::{Copy, MessageWriter, Store, StoreError};
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Where a [`MemoryStore`] fails, to test the storage error replies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fail {
    /// Every step succeeds.
    #[default]
    Never,
    /// `begin` fails as a full disk does.
    Begin,
    /// Every write fails (an I/O error).
    Write,
    /// `commit` fails (an I/O error).
    Commit,
}

#[derive(Default)]
struct State {
    next: u64,
    committed: Vec<(String, Vec<u8>)>,
    open: usize,
    fail: Fail,
}

/// Committed messages in memory, with queue ids `MEM1`, `MEM2`, … Clones share one
/// state.
#[derive(Clone, Default)]
pub struct MemoryStore(Arc<Mutex<State>>);

impl MemoryStore {
    /// A store that fails at `fail`.
    pub fn failing(fail: Fail) -> MemoryStore {
        let s = MemoryStore::default();
        s.state().fail = fail;
        s
    }

    /// Committed messages (queue id, bytes) in commit order.
    pub fn committed(&self) -> Vec<(String, Vec<u8>)> {
        self.state().committed.clone()
    }

    /// Writers begun but neither committed nor dropped (a Maildir's `tmp/` debris).
    pub fn open_writers(&self) -> usize {
        self.state().open
    }

    /// The state; a panic elsewhere while it was held leaves it usable for the checks.
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Store for MemoryStore {
    fn begin(&self) -> Result<Box<dyn MessageWriter>, StoreError> {
        let mut st = self.state();
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

/// A message being written; dropped without a commit, it vanishes.
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
        let mut st = self.store.state();
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
        let mut st = self.store.state();
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
            self.store.state().open -= 1;
        }
    }
}
