//! A pure driver for the `session` and `bdat` targets: the `Session` state machine
//! alone, with no `Connection`, socket or store. It does what the real driver does
//! through the session's public calls only (as rustls' `complete_io` does): command
//! lines in, steps out, body bytes through `Session::body`, messages kept in memory.
//!
//! The fuzz input stands for the client's bytes; they "arrive" in pieces of
//! pseudo-random size (`Knobs::max_piece`), so the body phase sees every split, and
//! STARTTLS sees exactly what has arrived behind its line.

use mailer::connection::End;
use mailer::hooks::{NoHooks, SessionInfo, TlsInfo};
use mailer::session::{AuthSettings, Body, Session, Settings, Step};
use mailer::testing::{FakeTls, OneUser, Rng};
use mailer_fuzz::{Knobs, Stored};
use std::io;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

/// The result of one session.
pub struct PureRun {
    pub end: End,
    /// Every reply the session asked to send, in wire form.
    pub out: Vec<u8>,
    /// The committed messages: trace headers, then the content written.
    pub stored: Vec<Stored>,
    /// Input offset and output length at each TLS handshake.
    pub handshakes: Vec<(usize, usize)>,
}

struct Driver<'a> {
    input: &'a [u8],
    /// Bytes handed to the session so far.
    pos: usize,
    /// Bytes "arrived" so far.
    avail: usize,
    rng: Rng,
    max_piece: usize,
    max_line: usize,
    tls: FakeTls,
    out: Vec<u8>,
    stored: Vec<Stored>,
    open: Option<Stored>,
    next_id: u64,
    handshakes: Vec<(usize, usize)>,
}

/// Runs a whole session over `input` with the given knobs.
pub fn run_pure(input: &[u8], k: &Knobs) -> PureRun {
    let settings = Arc::new(Settings {
        hostname: "mx.test".into(),
        max_message_size: k.max_message_size,
        bare_lf: k.bare_lf,
        max_recipients: k.max_recipients,
        max_errors: k.max_errors,
        tls_available: k.tls_available,
        require_tls: false,
        auth: k.auth.then(|| AuthSettings {
            allow_plaintext: true,
            authenticator: Arc::new(OneUser("alice", "secret")),
        }),
    });
    let info = SessionInfo::new(
        1,
        "192.0.2.1:4000".parse().unwrap(),
        "192.0.2.2:25".parse().unwrap(),
    );
    let mut s = Session::new(settings, Arc::new(NoHooks), info);
    let mut d = Driver {
        input,
        pos: 0,
        avail: 0,
        rng: Rng::new(k.seed),
        max_piece: k.max_piece.max(1),
        max_line: k.max_line_length,
        tls: k.tls,
        out: Vec::new(),
        stored: Vec::new(),
        open: None,
        next_id: 0,
        handshakes: Vec::new(),
    };
    let end = d.run(&mut s);
    if let End::Io(kind) = &end {
        s.io_error(format!("connection error: {kind}"));
    }
    s.closed();
    PureRun {
        end,
        out: d.out,
        stored: d.stored,
        handshakes: d.handshakes,
    }
}

impl Driver<'_> {
    /// More client bytes arrive; false at the end of the input.
    fn receive(&mut self) -> bool {
        if self.avail == self.input.len() {
            return false;
        }
        self.avail = (self.avail + self.rng.size(self.max_piece)).min(self.input.len());
        true
    }

    fn run(&mut self, s: &mut Session) -> End {
        let greeting = s.greeting();
        if let Some(end) = self.perform(s, greeting) {
            return end;
        }
        let input = self.input;
        loop {
            let lf = loop {
                let got = &input[self.pos..self.avail];
                if let Some(i) = got.iter().position(|&b| b == b'\n') {
                    break Some(self.pos + i);
                }
                if !self.receive() {
                    break None;
                }
            };
            let Some(lf) = lf else { return End::Eof };
            let a = self.pos;
            self.pos = lf + 1;
            let step = if lf + 1 - a > self.max_line {
                s.line_too_long()
            } else {
                let b = if lf > a && input[lf - 1] == b'\r' {
                    lf - 1
                } else {
                    lf
                };
                s.command(&input[a..b])
            };
            if let Some(end) = self.perform(s, step) {
                return end;
            }
        }
    }

    /// Carries out steps until the session waits for a command (`None`) or the
    /// connection ends.
    fn perform(&mut self, s: &mut Session, first: Step) -> Option<End> {
        let mut step = first;
        loop {
            step = match step {
                Step::Reply(r) => {
                    r.write_to(&mut self.out);
                    return None;
                }
                Step::Continue => return None,
                Step::Close(replies, why) => {
                    self.open = None;
                    for r in &replies {
                        r.write_to(&mut self.out);
                    }
                    return Some(End::from(why));
                }
                Step::Abandon(r) => {
                    self.open = None;
                    r.write_to(&mut self.out);
                    return None;
                }
                Step::StartTls(r) => {
                    self.open = None;
                    r.write_to(&mut self.out);
                    if self.avail != self.pos {
                        s.tls_injection(self.avail - self.pos)
                    } else {
                        self.handshakes.push((self.pos, self.out.len()));
                        match self.tls {
                            FakeTls::Fail => return Some(End::Io(io::ErrorKind::InvalidData)),
                            FakeTls::Succeed => s.tls_started(TlsInfo {
                                version: "TLSv1_3".into(),
                                cipher: "FAKE".into(),
                            }),
                        }
                    }
                }
                Step::Open { hold } => {
                    assert!(!hold, "content held without a data hook");
                    assert!(self.open.is_none(), "a second message opened");
                    self.next_id += 1;
                    let id = format!("Q{}", self.next_id);
                    let bytes = s.trace_headers(&id, UNIX_EPOCH);
                    self.open = Some(Stored {
                        id: id.clone(),
                        bytes,
                    });
                    s.opened(Ok(&id))
                }
                Step::Resume => {
                    assert!(self.open.is_some(), "a chunk resumed without a message");
                    Step::Body(None)
                }
                Step::Body(r) => {
                    if let Some(r) = r {
                        r.write_to(&mut self.out);
                    }
                    match self.body(s) {
                        Ok(next) => next,
                        Err(end) => return Some(end),
                    }
                }
                Step::Check => panic!("data hooks asked for without any"),
                Step::Commit { .. } => {
                    let m = self.open.take().expect("commit without an open message");
                    self.stored.push(m);
                    s.committed(Ok(()))
                }
            };
        }
    }

    /// The body phase: arrived bytes to the session, its content to the message.
    fn body(&mut self, s: &mut Session) -> Result<Step, End> {
        let input = self.input;
        loop {
            let (n, body) = s.body(&input[self.pos..self.avail]);
            assert!(n <= self.avail - self.pos, "consumed more than given");
            self.pos += n;
            match body {
                Body::Write(bytes) => {
                    assert!(!bytes.is_empty(), "an empty write");
                    let m = self.open.as_mut().expect("content without an open message");
                    m.bytes.extend_from_slice(bytes);
                }
                Body::More => {
                    assert_eq!(self.pos, self.avail, "asked for more with input left");
                    if !self.receive() {
                        s.body_eof();
                        return Err(End::Eof);
                    }
                }
                Body::Step(step) => return Ok(step),
            }
        }
    }
}
