//! Issue 7 / SPEC 7: the library API with user hooks. A scripted hook records every
//! event and can refuse or panic at any one of them; the tests check the exact replies
//! on the wire, when `done` and `error` fire, what hooks see of the session, the data
//! hook's content and headers, `Chain`, `Policy`, and that a panicking hook ends only
//! its own session.
mod common;
use common::*;
use mailer::hooks::MailParams;
use mailer::hooks::{
    Chain, DataVerdict, Envelope, Header, Hooks, Policy, SessionError, SessionInfo,
};
use mailer::protocol::address::{Address, ReversePath};
use mailer::testing::{Mem, OneUser};
use mailer::{Enhanced, Reply};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, PartialEq)]
enum Ev {
    Connect,
    Helo(String),
    Mail(String),
    Rcpt(String),
    Data(Vec<u8>),
    Error(SessionError),
    Done {
        id: String,
        from: String,
        rcpts: Vec<String>,
    },
}

type Log = Arc<Mutex<Vec<(Ev, SessionInfo)>>>;

const SCRIPTED_PANIC: &str = "scripted hook panic";

/// Keeps the expected panics of scripted hooks out of the test output; any other
/// panic (a failing assertion) is still reported by the default hook.
fn quiet_scripted_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .unwrap_or("");
            if !msg.starts_with(SCRIPTED_PANIC) {
                default(info);
            }
        }));
    });
}

/// Connects once the single worker is free again: with `workers = 1` a client that
/// arrives while the previous session is still winding down is refused 421 4.7.0 at
/// once (SPEC 4), so retry (bounded). A 220 proves the worker survived.
fn connect_when_idle(s: &TestServer) -> Client {
    let (c, greeting) = first_reply_when_idle(s);
    assert!(greeting.starts_with("220 "), "{greeting}");
    c
}

/// The first reply a free worker gives (greeting, or a connect hook's answer).
fn first_reply_when_idle(s: &TestServer) -> (Client, String) {
    let mut found = None;
    wait_until("a free worker answers", || {
        let mut c = Client::connect(s.addr);
        let (_, text) = c.reply();
        if text.starts_with("421 4.7.0 ") {
            return false;
        }
        found = Some((c, text));
        true
    });
    found.unwrap()
}

/// Records every event; refuses or panics at the event named in `refuse`/`panic_at`
/// ("connect", "helo", "mail", "rcpt", "data", "error", "done").
#[derive(Default)]
struct Script {
    log: Log,
    refuse: Option<(&'static str, Reply)>,
    panic_at: Option<&'static str>,
    /// Only refuse/panic for this recipient or sender (all when `None`).
    only_for: Option<&'static str>,
    wants_data: bool,
    headers: Vec<Header>,
}

impl Script {
    fn refusing(at: &'static str, reply: Reply) -> (Script, Log) {
        let s = Script {
            refuse: Some((at, reply)),
            ..Script::default()
        };
        let log = Arc::clone(&s.log);
        (s, log)
    }

    fn panicking(at: &'static str) -> (Script, Log) {
        let s = Script {
            panic_at: Some(at),
            ..Script::default()
        };
        let log = Arc::clone(&s.log);
        (s, log)
    }

    fn event(
        &self,
        at: &'static str,
        ev: Ev,
        info: &SessionInfo,
        subject: Option<&str>,
    ) -> Result<(), Reply> {
        self.log.lock().unwrap().push((ev, info.clone()));
        let applies = match (self.only_for, subject) {
            (None, _) => true,
            (Some(want), Some(got)) => want == got,
            (Some(_), None) => false,
        };
        if applies && self.panic_at == Some(at) {
            quiet_scripted_panics();
            panic!("{SCRIPTED_PANIC} at {at}");
        }
        match &self.refuse {
            Some((when, reply)) if *when == at && applies => Err(reply.clone()),
            _ => Ok(()),
        }
    }
}

impl Hooks for Script {
    fn connect(&self, s: &SessionInfo) -> Result<(), Reply> {
        self.event("connect", Ev::Connect, s, None)
    }
    fn helo(&self, s: &SessionInfo, name: &str) -> Result<(), Reply> {
        self.event("helo", Ev::Helo(name.into()), s, None)
    }
    fn mail(&self, s: &SessionInfo, from: &ReversePath, _p: &MailParams) -> Result<(), Reply> {
        let from = from.to_string();
        self.event("mail", Ev::Mail(from.clone()), s, Some(&from))
    }
    fn rcpt(&self, s: &SessionInfo, _e: &Envelope, to: &Address) -> Result<(), Reply> {
        self.event("rcpt", Ev::Rcpt(to.to_string()), s, Some(to.as_str()))
    }
    fn data(
        &self,
        s: &SessionInfo,
        _e: &Envelope,
        c: &mut dyn std::io::Read,
    ) -> Result<DataVerdict, Reply> {
        let mut content = Vec::new();
        c.read_to_end(&mut content).unwrap();
        self.event("data", Ev::Data(content), s, None)?;
        Ok(DataVerdict {
            add: self.headers.clone(),
            ..DataVerdict::default()
        })
    }
    fn error(&self, s: &SessionInfo, e: &SessionError) {
        let _ = self.event("error", Ev::Error(e.clone()), s, None);
    }
    fn done(&self, s: &SessionInfo, e: &Envelope, id: &str) {
        let ev = Ev::Done {
            id: id.into(),
            from: e.from.to_string(),
            rcpts: e.rcpts.iter().map(|r| r.to_string()).collect(),
        };
        let _ = self.event("done", ev, s, None);
    }
    fn wants_data(&self) -> bool {
        self.wants_data
    }
}

fn events(log: &Log) -> Vec<Ev> {
    log.lock().unwrap().iter().map(|(e, _)| e.clone()).collect()
}

fn errors(log: &Log) -> Vec<SessionError> {
    events(log)
        .into_iter()
        .filter_map(|e| match e {
            Ev::Error(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn dones(log: &Log) -> Vec<Ev> {
    events(log)
        .into_iter()
        .filter(|e| matches!(e, Ev::Done { .. }))
        .collect()
}

fn server_with(h: impl Hooks + 'static) -> TestServer {
    TestServer::start(Opts {
        hooks: with_hooks(h),
        ..Opts::default()
    })
}

fn server_with_toml(h: impl Hooks + 'static, toml: &str, server_extra: &str) -> TestServer {
    TestServer::start(Opts {
        hooks: with_hooks(h),
        toml: toml.into(),
        server_extra: server_extra.into(),
        ..Opts::default()
    })
}

fn bdat(c: &mut Client, data: &[u8], last: bool) {
    let mut w = format!("BDAT {}{}\r\n", data.len(), if last { " LAST" } else { "" }).into_bytes();
    w.extend_from_slice(data);
    c.send_raw(&w);
}

// ------------------------------------------------------------------ refusals

#[test]
fn refusal_at_each_event_is_exactly_the_hooks_reply() {
    let refusal = Reply::new(554, Enhanced(5, 7, 1), "Not today\nAsk again tomorrow");
    let wire = "554-5.7.1 Not today\r\n554 5.7.1 Ask again tomorrow\r\n";
    let temp = Reply::new(450, Enhanced(4, 7, 1), "Greylisted");

    // connect: the reply replaces the greeting and the connection closes.
    let (h, _) = Script::refusing("connect", refusal.clone());
    let s = server_with(h);
    let mut c = Client::connect(s.addr);
    assert_eq!(c.reply().1, wire);
    assert!(c.is_closed());

    // helo: EHLO and HELO both get it; the session goes on.
    let (h, log) = Script::refusing("helo", temp.clone());
    let s = server_with(h);
    let mut c = s.connect();
    assert_eq!(c.cmd("EHLO client.test"), "450 4.7.1 Greylisted\r\n");
    assert_eq!(c.cmd("HELO client.test"), "450 4.7.1 Greylisted\r\n");
    // Refused HELO leaves the session without a name: MAIL is out of sequence.
    assert!(c.cmd("MAIL FROM:<a@x.test>").starts_with("503 5.5.1 "));
    c.ok("QUIT", 221);
    assert!(log.lock().unwrap().iter().all(|(_, i)| i.helo.is_none()));

    // mail
    let (h, _) = Script::refusing("mail", refusal.clone());
    let s = server_with(h);
    let mut c = s.ehlo();
    assert_eq!(c.cmd("MAIL FROM:<a@x.test>"), wire);
    assert!(c.cmd("RCPT TO:<b@y.test>").starts_with("503 5.5.1 "));

    // rcpt: only the refused recipient is dropped.
    let (h, log) = Script {
        only_for: Some("bad@y.test"),
        ..Script::refusing("rcpt", temp.clone()).0
    }
    .with_log();
    let s = server_with(h);
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    assert_eq!(c.cmd("RCPT TO:<bad@y.test>"), "450 4.7.1 Greylisted\r\n");
    c.ok("RCPT TO:<good@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(b"x\r\n.\r\n");
    let (code, reply) = c.reply();
    assert_eq!(code, 250);
    assert_eq!(
        dones(&log),
        [Ev::Done {
            id: queue_id(&reply),
            from: "a@x.test".into(),
            rcpts: vec!["good@y.test".into()],
        }]
    );
}

impl Script {
    fn with_log(self) -> (Script, Log) {
        let log = Arc::clone(&self.log);
        (self, log)
    }
}

#[test]
fn data_refusal_is_the_hooks_reply_for_data_and_bdat_and_nothing_is_stored() {
    let (h, log) = Script {
        wants_data: true,
        ..Script::refusing("data", Reply::new(550, Enhanced(5, 7, 1), "Spam")).0
    }
    .with_log();
    let s = server_with(h);
    let mut c = s.ehlo();
    let reply = c.transaction("a@x.test", &["b@y.test"], b"buy now\r\n.\r\n");
    assert_eq!(reply, "550 5.7.1 Spam\r\n");
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    bdat(&mut c, b"buy ", false);
    assert_eq!(c.reply().0, 250);
    bdat(&mut c, b"now\r\n", true);
    assert_eq!(c.reply().1, "550 5.7.1 Spam\r\n");
    c.ok("QUIT", 221);
    assert!(s.stored().is_empty());
    assert!(
        dones(&log).is_empty(),
        "done fires only for stored messages"
    );
    let data: Vec<_> = events(&log)
        .into_iter()
        .filter(|e| matches!(e, Ev::Data(_)))
        .collect();
    assert_eq!(
        data,
        [
            Ev::Data(b"buy now\r\n".to_vec()),
            Ev::Data(b"buy now\r\n".to_vec())
        ]
    );
}

#[test]
fn refusals_that_are_not_4xx_or_5xx_become_451() {
    for bad in [
        Reply::new(250, Enhanced(2, 1, 5), "Ok?"),
        Reply::plain(354, "go on"),
        Reply::new(550, Enhanced(4, 1, 1), "class mismatch"),
        Reply::plain(600, "no such class"),
    ] {
        let (h, _) = Script::refusing("rcpt", bad.clone());
        let s = server_with(h);
        let mut c = s.ehlo();
        c.ok("MAIL FROM:<a@x.test>", 250);
        assert_eq!(
            c.cmd("RCPT TO:<b@y.test>"),
            "451 4.3.0 Error: internal error\r\n",
            "{bad:?}"
        );
        // Not fatal: the session goes on.
        c.ok("NOOP", 250);
    }
}

#[test]
fn a_421_refusal_closes_the_connection() {
    let (h, _) = Script::refusing(
        "mail",
        Reply::new(421, Enhanced(4, 7, 0), "mx.test Go away"),
    );
    let s = server_with(h);
    let mut c = s.ehlo();
    assert_eq!(
        c.cmd("MAIL FROM:<a@x.test>"),
        "421 4.7.0 mx.test Go away\r\n"
    );
    assert!(c.is_closed());
}

// ------------------------------------------------------------------ done / error

#[test]
fn done_fires_once_per_stored_message_with_its_queue_id() {
    let (h, log) = Script::default().with_log();
    let s = server_with_toml(h, "[limits]\nmax_message_size = 1000\n", "");
    let mut c = s.ehlo();
    let r1 = c.transaction("a@x.test", &["b@y.test", "c@y.test"], b"one\r\n.\r\n");
    // done runs before the 250 goes out: no wait needed.
    let id1 = queue_id(&r1);
    assert_eq!(dones(&log).len(), 1);
    c.ok("MAIL FROM:<>", 250);
    c.ok("RCPT TO:<d@y.test>", 250);
    bdat(&mut c, b"two\r\n", true);
    let (code, r2) = c.reply();
    assert_eq!(code, 250, "{r2}");
    let id2 = queue_id(&r2);
    // Refused at the end (too big) and abandoned (RSET): no done.
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    bdat(&mut c, &[b'x'; 1001], true);
    assert!(c.reply().1.starts_with("552 5.3.4 "));
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("RSET", 250);
    c.ok("QUIT", 221);
    assert_ne!(id1, id2);
    assert_eq!(
        dones(&log),
        [
            Ev::Done {
                id: id1.clone(),
                from: "a@x.test".into(),
                rcpts: vec!["b@y.test".into(), "c@y.test".into()],
            },
            Ev::Done {
                id: id2.clone(),
                from: String::new(),
                rcpts: vec!["d@y.test".into()],
            },
        ]
    );
    let names: Vec<String> = s.stored().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 2);
    for id in [&id1, &id2] {
        assert!(
            names.iter().any(|n| n.contains(&format!(".{id}."))),
            "{id} in {names:?}"
        );
    }
}

#[test]
fn error_fires_on_protocol_errors() {
    let (h, log) = Script::default().with_log();
    let s = server_with(h);
    let mut c = s.ehlo();
    let unknown = c.cmd("FOO bar");
    assert_eq!(unknown, "500 5.5.2 Error: command not recognized\r\n");
    assert!(c.cmd("RCPT TO:<b@y.test>").starts_with("503 5.5.1 "));
    c.ok("NOOP", 250);
    assert_eq!(
        errors(&log),
        [
            SessionError::Protocol(Reply::new(
                500,
                Enhanced(5, 5, 2),
                "Error: command not recognized"
            )),
            SessionError::Protocol(Reply::new(
                503,
                Enhanced(5, 5, 1),
                "Error: need MAIL command"
            )),
        ]
    );
}

#[test]
fn error_fires_on_a_command_timeout() {
    let (h, log) = Script::default().with_log();
    let s = server_with_toml(h, "[limits]\ncommand_timeout_secs = 1\n", "");
    let mut c = s.ehlo();
    // Say nothing: the server gives up after 1 s.
    let (code, text) = c.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("421 4.4.2 mx.test "), "{text}");
    assert_eq!(errors(&log), [SessionError::Timeout]);
}

#[test]
fn error_fires_on_a_data_timeout_and_when_the_client_leaves_mid_message() {
    let (h, log) = Script::default().with_log();
    let s = server_with_toml(h, "[limits]\ndata_timeout_secs = 1\n", "");
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(b"Subject: slow\r\n");
    assert!(c.reply().1.starts_with("421 4.4.2 "));
    assert_eq!(errors(&log), [SessionError::Timeout]);

    let (h, log) = Script::default().with_log();
    let s = server_with(h);
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(b"Subject: gone\r\n");
    drop(c);
    wait_until("error hook told about the lost connection", || {
        errors(&log) == [SessionError::Io("connection closed during DATA".into())]
    });
    assert!(s.stored().is_empty());
}

// ------------------------------------------------------------------ panics

#[test]
fn a_panicking_hook_ends_only_its_session_and_the_server_goes_on() {
    // One worker: the next client is served by the very thread that saw the panic.
    let (h, _) = Script {
        only_for: Some("boom@y.test"),
        ..Script::panicking("rcpt").0
    }
    .with_log();
    let s = server_with_toml(h, "", "workers = 1");
    let mut c = connect_when_idle(&s);
    c.ok("EHLO client.test", 250);
    c.ok("MAIL FROM:<a@x.test>", 250);
    assert_eq!(
        c.cmd("RCPT TO:<boom@y.test>"),
        "451 4.3.0 Error: internal error\r\n"
    );
    assert!(c.is_closed(), "the session closes after a hook panic");
    let mut d = connect_when_idle(&s);
    d.ok("EHLO client.test", 250);
    let reply = d.transaction("a@x.test", &["fine@y.test"], b"still here\r\n.\r\n");
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    assert_eq!(s.stored().len(), 1);
}

#[test]
fn panics_at_connect_helo_mail_and_data_answer_451_and_close() {
    for at in ["connect", "helo", "mail", "data"] {
        let (h, _) = Script {
            wants_data: true,
            ..Script::panicking(at).0
        }
        .with_log();
        let s = server_with_toml(h, "", "workers = 1");
        let (mut c, greeting) = first_reply_when_idle(&s);
        let internal = "451 4.3.0 Error: internal error\r\n";
        let got = match at {
            "connect" => greeting,
            _ => {
                assert!(greeting.starts_with("220 "), "{greeting}");
                match at {
                    "helo" => c.cmd("EHLO client.test"),
                    "mail" => {
                        c.ok("EHLO client.test", 250);
                        c.cmd("MAIL FROM:<a@x.test>")
                    }
                    _ => {
                        c.ok("EHLO client.test", 250);
                        c.transaction("a@x.test", &["b@y.test"], b"x\r\n.\r\n")
                    }
                }
            }
        };
        assert_eq!(got, internal, "panic at {at}");
        assert!(c.is_closed(), "closed after a panic at {at}");
        assert!(s.stored().is_empty());
        // The one worker survived and serves the next client.
        if at == "connect" {
            assert_eq!(first_reply_when_idle(&s).1, internal);
        } else {
            let mut d = connect_when_idle(&s);
            d.ok("QUIT", 221);
        }
    }
}

#[test]
fn panic_in_done_keeps_the_250_then_closes_with_421() {
    let (h, _) = Script::panicking("done");
    let s = server_with(h);
    let mut c = s.ehlo();
    let reply = c.transaction("a@x.test", &["b@y.test"], b"x\r\n.\r\n");
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    assert_eq!(
        s.stored().len(),
        1,
        "the message is stored whatever done does"
    );
    assert_eq!(
        c.reply().1,
        "421 4.3.0 mx.test Error: internal error, closing connection\r\n"
    );
    assert!(c.is_closed());
}

#[test]
fn panic_in_error_keeps_the_reply_then_closes_with_421() {
    let (h, _) = Script::panicking("error");
    let s = server_with(h);
    let mut c = s.ehlo();
    assert_eq!(c.cmd("FOO"), "500 5.5.2 Error: command not recognized\r\n");
    assert!(c.reply().1.starts_with("421 4.3.0 "));
    assert!(c.is_closed());
    // Also with a refused BDAT (the chunk is drained first).
    let mut c = s.ehlo();
    bdat(&mut c, b"RSET\r\n", true);
    assert!(c.reply().1.starts_with("503 5.5.1 "));
    assert!(c.reply().1.starts_with("421 4.3.0 "));
    assert!(c.is_closed());
}

// ------------------------------------------------------------------ session info

#[test]
fn hooks_see_id_peer_helo_and_tls() {
    let (h, log) = Script::default().with_log();
    let s = TestServer::start(Opts {
        hooks: with_hooks(h),
        tls: true,
        ..Opts::default()
    });
    let mut c = s.ehlo();
    let local = c.tcp().local_addr().unwrap();
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RSET", 250);
    c.ok("STARTTLS", 220);
    c.upgrade(s.tls_client_config());
    c.ok("EHLO after.tls", 250);
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("QUIT", 221);
    let mut d = s.ehlo();
    d.ok("QUIT", 221);

    let log = log.lock().unwrap().clone();
    let first_id = log[0].1.id;
    let (plain, rest): (Vec<_>, Vec<_>) = log.iter().partition(|(_, i)| i.tls.is_none());
    // Before TLS: connect (no helo yet), helo (the hook sees the name as argument),
    // mail (with the name), then the second client's connect and helo.
    let plain: Vec<_> = plain
        .into_iter()
        .filter(|(_, i)| i.id == first_id)
        .collect();
    assert_eq!(plain[0].0, Ev::Connect);
    assert_eq!(plain[0].1.helo, None);
    assert_eq!(plain[1].0, Ev::Helo("client.test".into()));
    assert_eq!(plain[2].0, Ev::Mail("a@x.test".into()));
    assert_eq!(plain[2].1.helo.as_deref(), Some("client.test"));
    for (_, info) in &plain {
        assert_eq!(info.peer, local, "the client's address");
        assert_eq!(info.auth_user, None);
    }
    // After STARTTLS: TLS parameters, the new HELO name, same session id.
    assert_eq!(rest.len(), 2, "{rest:?}");
    assert_eq!(rest[0].0, Ev::Helo("after.tls".into()));
    assert_eq!(rest[0].1.helo, None, "STARTTLS forgot the old name");
    let (ev, info) = rest[1];
    assert_eq!(*ev, Ev::Mail("a@x.test".into()));
    assert_eq!(info.id, first_id);
    assert_eq!(info.helo.as_deref(), Some("after.tls"));
    let tls = info.tls.as_ref().unwrap();
    assert_eq!(tls.version, "TLSv1_3");
    assert!(tls.cipher.starts_with("TLS13_"), "{}", tls.cipher);
    // The second client is another session.
    assert!(log.iter().any(|(_, i)| i.id != first_id));
}

#[test]
fn hooks_see_the_authenticated_user() {
    let (h, log) = Script::default().with_log();
    let run = Mem {
        hooks: Arc::new(h),
        auth: Some(Arc::new(OneUser("alice", "secret"))),
        ..Mem::default()
    }
    // AUTH PLAIN \0alice\0secret
    .run(b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@x.test>\r\nQUIT\r\n");
    assert_eq!(run.codes(), [220, 250, 235, 250, 221]);
    let log = log.lock().unwrap();
    let (ev, info) = log.last().unwrap();
    assert_eq!(*ev, Ev::Mail("a@x.test".into()));
    assert_eq!(info.auth_user.as_deref(), Some("alice"));
    assert_eq!(info.peer, "127.0.0.1:40000".parse().unwrap());
}

// ------------------------------------------------------------------ data hook

#[test]
fn data_hook_sees_the_whole_content_and_its_headers_are_stored() {
    let (h, log) = Script {
        wants_data: true,
        headers: vec![
            Header::new("X-Spam-Score", "0.1"),
            Header::new(
                "Authentication-Results",
                "mx.test;\n\tspf=pass smtp.mailfrom=x.test",
            ),
        ],
        ..Script::default()
    }
    .with_log();
    let s = server_with(h);
    let mut c = s.ehlo();
    let reply = c.transaction(
        "a@x.test",
        &["b@y.test"],
        b"Subject: hi\r\n\r\n..dotted\r\nbody\r\n.\r\n",
    );
    assert!(reply.starts_with("250 "), "{reply}");
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    bdat(&mut c, b"Subject: chunks\r\n", false);
    assert_eq!(c.reply().0, 250);
    bdat(&mut c, b"\r\nbinary\0\r\n", true);
    assert_eq!(c.reply().0, 250);
    let contents: Vec<_> = events(&log)
        .into_iter()
        .filter_map(|e| match e {
            Ev::Data(d) => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(
        contents,
        [
            b"Subject: hi\r\n\r\n.dotted\r\nbody\r\n".to_vec(),
            b"Subject: chunks\r\n\r\nbinary\0\r\n".to_vec()
        ]
    );
    let stored = s.stored();
    assert_eq!(stored.len(), 2);
    for (i, (_, file)) in stored.iter().enumerate() {
        let (_, after_trace) = split_stored(file);
        let mut want = b"X-Spam-Score: 0.1\r\nAuthentication-Results: mx.test;\r\n\tspf=pass smtp.mailfrom=x.test\r\n".to_vec();
        want.extend_from_slice(&contents[i]);
        assert_eq!(after_trace, want);
    }
}

#[test]
fn malformed_hook_headers_are_refused_451_and_nothing_is_stored() {
    for bad in [
        Header::new("X-Bad Name", "v"),
        Header::new("X-Colon:", "v"),
        Header::new("", "v"),
        Header::new("X-Inject", "v\r\nX-Forged: yes"),
        Header::new("X-Inject", "v\n\nbody"),
        Header::new("X-Cr", "a\rb"),
    ] {
        let (h, _) = Script {
            wants_data: true,
            headers: vec![bad.clone()],
            ..Script::default()
        }
        .with_log();
        let run = Mem {
            hooks: Arc::new(h),
            ..Mem::default()
        }
        .run(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n");
        assert_eq!(run.codes(), [220, 250, 250, 250, 354, 451, 221], "{bad:?}");
        assert!(run.stored.is_empty());
        assert_eq!(run.open_writers, 0);
    }
}

#[test]
fn data_hook_is_not_called_unless_wanted() {
    let (h, log) = Script::default().with_log();
    let s = server_with(h);
    let mut c = s.ehlo();
    let reply = c.transaction("a@x.test", &["b@y.test"], b"x\r\n.\r\n");
    assert!(reply.starts_with("250 "), "{reply}");
    assert!(!events(&log).iter().any(|e| matches!(e, Ev::Data(_))));
}

// ------------------------------------------------------------------ Chain and Policy

#[test]
fn chain_first_refusal_wins_and_notifications_reach_all() {
    // A refuses only both@; B refuses every recipient. A comes first.
    let (a, log_a) = Script {
        only_for: Some("both@y.test"),
        ..Script::refusing("rcpt", Reply::new(550, Enhanced(5, 1, 1), "A says no")).0
    }
    .with_log();
    let (b, log_b) = Script {
        wants_data: true,
        ..Script::refusing("rcpt", Reply::new(450, Enhanced(4, 2, 0), "B says later")).0
    }
    .with_log();
    let chain = Chain(vec![Arc::new(a), Arc::new(b)]);
    assert!(chain.wants_data());
    let s = server_with(chain);
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    assert_eq!(c.cmd("RCPT TO:<both@y.test>"), "550 5.1.1 A says no\r\n");
    assert_eq!(
        c.cmd("RCPT TO:<other@y.test>"),
        "450 4.2.0 B says later\r\n"
    );
    // B never saw both@ (A refused first); A saw both.
    let rcpts = |log: &Log| -> Vec<Ev> {
        events(log)
            .into_iter()
            .filter(|e| matches!(e, Ev::Rcpt(_)))
            .collect()
    };
    assert_eq!(
        rcpts(&log_a),
        [
            Ev::Rcpt("both@y.test".into()),
            Ev::Rcpt("other@y.test".into())
        ]
    );
    assert_eq!(rcpts(&log_b), [Ev::Rcpt("other@y.test".into())]);
    // Notifications go to every hook.
    assert_eq!(errors(&log_a).len(), 1);
    assert_eq!(errors(&log_b).len(), 1);
}

#[test]
fn chain_gives_data_only_to_hooks_that_want_it_and_joins_their_headers() {
    let (a, log_a) = Script {
        headers: vec![Header::new("X-A", "never")],
        ..Script::default()
    }
    .with_log();
    let (b, log_b) = Script {
        wants_data: true,
        headers: vec![Header::new("X-B", "1")],
        ..Script::default()
    }
    .with_log();
    let (c2, _) = Script {
        wants_data: true,
        headers: vec![Header::new("X-C", "2")],
        ..Script::default()
    }
    .with_log();
    let chain = Chain(vec![Arc::new(a), Arc::new(b), Arc::new(c2)]);
    let run = Mem {
        hooks: Arc::new(chain),
        ..Mem::default()
    }
    .run(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n");
    assert_eq!(run.codes(), [220, 250, 250, 250, 354, 250, 221]);
    let (_, after) = split_stored(&run.stored[0].1);
    assert_eq!(after, b"X-B: 1\r\nX-C: 2\r\nbody\r\n");
    assert!(!events(&log_a).iter().any(|e| matches!(e, Ev::Data(_))));
    assert!(events(&log_b).iter().any(|e| matches!(e, Ev::Data(_))));
}

#[test]
fn policy_hook_accepts_listed_domains_postmaster_and_authenticated_relay() {
    let p = Policy::new(&["Example.ORG".to_string()]);
    let mut info = SessionInfo {
        helo: Some("c".into()),
        ..SessionInfo::new(
            1,
            "192.0.2.7:1234".parse().unwrap(),
            "192.0.2.1:25".parse().unwrap(),
        )
    };
    let env = Envelope {
        from: ReversePath::Null,
        params: MailParams::default(),
        rcpts: vec![],
    };
    let rcpt =
        |p: &Policy, info: &SessionInfo, a: &str| p.rcpt(info, &env, &Address::parse(a).unwrap());
    assert_eq!(rcpt(&p, &info, "a@example.org"), Ok(()));
    assert_eq!(rcpt(&p, &info, "a@EXAMPLE.org"), Ok(()));
    assert_eq!(rcpt(&p, &info, "Postmaster"), Ok(()));
    assert_eq!(
        rcpt(&p, &info, "a@other.test"),
        Err(Reply::new(
            550,
            Enhanced(5, 7, 1),
            "<a@other.test>: Relay access denied"
        ))
    );
    assert!(rcpt(&p, &info, "a@sub.example.org").is_err());
    info.auth_user = Some("alice".into());
    assert_eq!(rcpt(&p, &info, "a@other.test"), Ok(()));
    let open = Policy::new(&[]);
    info.auth_user = None;
    assert_eq!(rcpt(&open, &info, "a@anything.test"), Ok(()));
}

#[test]
fn config_policy_runs_before_user_hooks() {
    let (h, log) = Script::default().with_log();
    let s = server_with_toml(h, "[policy]\naccept_domains = [\"y.test\"]\n", "");
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    assert_eq!(
        c.cmd("RCPT TO:<b@elsewhere.test>"),
        "550 5.7.1 <b@elsewhere.test>: Relay access denied\r\n"
    );
    c.ok("RCPT TO:<b@Y.TEST>", 250);
    let rcpts: Vec<_> = events(&log)
        .into_iter()
        .filter(|e| matches!(e, Ev::Rcpt(_)))
        .collect();
    assert_eq!(rcpts, [Ev::Rcpt("b@Y.TEST".into())], "policy refused first");
}
