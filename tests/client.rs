//! The client, `mailer send` (SPEC 6): against a scripted fake SMTP server on loopback
//! that records every read, and end to end against mailer's own server with STARTTLS.
mod common;
use common::*;

use mailer::client::{send, DeliveryStatus, Job, Pipelining, Report, StartTls, Status};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------
// The fake server

/// A reply the fake server never sends: it stays silent and keeps reading.
const SILENT: &str = "SILENT";

/// What the fake server answers (whole replies, CRLFs included).
#[derive(Clone)]
struct Script {
    greeting: String,
    ehlo: String,
    helo: String,
    mail: String,
    /// One per RCPT, in order; missing ones are `250 2.1.5 Ok`.
    rcpt: Vec<String>,
    data: String,
    end: String,
    starttls: String,
}

impl Default for Script {
    fn default() -> Script {
        Script {
            greeting: "220 fake.test ESMTP\r\n".into(),
            ehlo: "250-fake.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n".into(),
            helo: "250 fake.test\r\n".into(),
            mail: "250 2.1.0 Ok\r\n".into(),
            rcpt: Vec::new(),
            data: "354 End data with <CR><LF>.<CR><LF>\r\n".into(),
            end: "250 2.0.0 Ok: queued as ABC123\r\n".into(),
            starttls: "454 4.7.0 TLS not available\r\n".into(),
        }
    }
}

/// What the fake server saw.
#[derive(Debug, Default)]
struct Recording {
    /// Every read, as it came off the socket.
    reads: Vec<(Instant, Vec<u8>)>,
    /// Command lines without CRLF.
    commands: Vec<String>,
    /// Each DATA payload as it was on the wire, terminator included.
    messages: Vec<Vec<u8>>,
    /// Whether a client connected at all.
    connected: bool,
}

impl Recording {
    /// The index of the read that carried `needle`.
    fn read_with(&self, needle: &str) -> usize {
        self.reads
            .iter()
            .position(|(_, r)| String::from_utf8_lossy(r).contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} never read: {:?}", self.reads_text()))
    }

    fn reads_text(&self) -> Vec<String> {
        self.reads
            .iter()
            .map(|(_, r)| String::from_utf8_lossy(r).into_owned())
            .collect()
    }
}

struct Fake {
    addr: SocketAddr,
    thread: JoinHandle<Recording>,
}

impl Fake {
    fn start(script: Script) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let thread = std::thread::spawn(move || serve_one(listener, script));
        Fake { addr, thread }
    }

    /// Waits (bounded) for the session to end and returns what was seen.
    fn finish(self) -> Recording {
        let deadline = Instant::now() + WAIT * 2;
        while !self.thread.is_finished() {
            assert!(Instant::now() < deadline, "fake server did not finish");
            std::thread::sleep(Duration::from_millis(5));
        }
        self.thread.join().expect("fake server thread")
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Serves one connection (or none, if nobody comes within WAIT).
fn serve_one(listener: TcpListener, s: Script) -> Recording {
    let mut rec = Recording::default();
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + WAIT;
    let mut tcp = loop {
        match listener.accept() {
            Ok((t, _)) => break t,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => return rec,
        }
    };
    rec.connected = true;
    tcp.set_nonblocking(false).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let say = |tcp: &mut TcpStream, r: &str| {
        if r != SILENT {
            let _ = tcp.write_all(r.as_bytes());
        }
    };
    say(&mut tcp, &s.greeting);
    let mut pending = Vec::new();
    let mut in_data = false;
    let mut rcpts = 0;
    let mut buf = [0u8; 65536];
    loop {
        let n = match tcp.read(&mut buf) {
            Ok(0) | Err(_) => return rec,
            Ok(n) => n,
        };
        rec.reads.push((Instant::now(), buf[..n].to_vec()));
        pending.extend_from_slice(&buf[..n]);
        loop {
            if in_data {
                // The payload ends at CRLF.CRLF, or is empty (".\r\n" right away).
                let end = if pending.starts_with(b".\r\n") {
                    Some(3)
                } else {
                    find(&pending, b"\r\n.\r\n").map(|i| i + 5)
                };
                let Some(end) = end else { break };
                rec.messages.push(pending.drain(..end).collect());
                in_data = false;
                say(&mut tcp, &s.end);
                continue;
            }
            let Some(i) = find(&pending, b"\r\n") else {
                break;
            };
            let line = String::from_utf8_lossy(&pending[..i]).into_owned();
            pending.drain(..i + 2);
            rec.commands.push(line.clone());
            let verb = line
                .split([' ', ':'])
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            let reply = match verb.as_str() {
                "EHLO" => s.ehlo.clone(),
                "HELO" => s.helo.clone(),
                "MAIL" => s.mail.clone(),
                "RCPT" => {
                    rcpts += 1;
                    s.rcpt
                        .get(rcpts - 1)
                        .cloned()
                        .unwrap_or_else(|| "250 2.1.5 Ok\r\n".into())
                }
                "DATA" => {
                    in_data = s.data.starts_with("354");
                    s.data.clone()
                }
                "STARTTLS" => s.starttls.clone(),
                "RSET" | "NOOP" => "250 2.0.0 Ok\r\n".into(),
                "QUIT" => {
                    say(&mut tcp, "221 2.0.0 Bye\r\n");
                    return rec;
                }
                _ => "500 5.5.2 Error: command not recognized\r\n".into(),
            };
            say(&mut tcp, &reply);
        }
    }
}

// ---------------------------------------------------------------------------------
// Helpers

const MESSAGE: &[u8] = b"Subject: test\r\n\r\nTest\r\n";

fn job_for(addr: SocketAddr, rcpts: &[&str]) -> Job {
    let mut j = Job::new(
        addr.ip().to_string(),
        Some("foo@bar.test".into()),
        rcpts.iter().map(|r| r.to_string()).collect(),
        MESSAGE.to_vec(),
    );
    j.port = addr.port();
    j.helo = "client.test".into();
    j.connection_timeout = Duration::from_secs(5);
    j
}

fn statuses(r: &Report) -> &[DeliveryStatus] {
    match r {
        Report::Ok { delivery_status } => delivery_status,
        Report::Error { message } => panic!("error report: {message}"),
    }
}

fn error_message(r: &Report) -> &str {
    match r {
        Report::Error { message } => message,
        Report::Ok { .. } => panic!("expected an error report, got {}", r.to_json()),
    }
}

fn ds(recipient: &str, status: Status, response: &str) -> DeliveryStatus {
    DeliveryStatus {
        recipient: recipient.into(),
        status,
        response: response.into(),
    }
}

fn job_json(addr: SocketAddr, extra: &str) -> String {
    format!(
        r#"{{ "host": "{}", "port": {}, "helo": "localhost", "pipelining": "TRY",
           "connection_timeout": 5, "starttls": "TRY", "sender": "foo@bar.test",
           "recipients": ["a@x.test", "b@x.test"],
           "message": "U3ViamVjdDogdGVzdA0KDQpUZXN0DQo="{extra} }}"#,
        addr.ip(),
        addr.port()
    )
}

// ---------------------------------------------------------------------------------
// Outcomes per recipient

#[test]
fn all_ok_report_is_exactly_spec_6() {
    let fake = Fake::start(Script::default());
    let report = send(&job_for(fake.addr, &["a@x.test", "b@x.test"]));
    assert_eq!(
        report.to_json(),
        r#"{"status":"ok","deliveryStatus":[{"recipient":"a@x.test","status":"Ok","response":"250 2.0.0 Ok: queued as ABC123"},{"recipient":"b@x.test","status":"Ok","response":"250 2.0.0 Ok: queued as ABC123"}]}"#
    );
    let rec = fake.finish();
    assert_eq!(
        rec.commands,
        [
            "EHLO client.test",
            "MAIL FROM:<foo@bar.test> SIZE=23",
            "RCPT TO:<a@x.test>",
            "RCPT TO:<b@x.test>",
            "DATA",
            "QUIT"
        ]
    );
    assert_eq!(
        rec.messages,
        [b"Subject: test\r\n\r\nTest\r\n.\r\n".to_vec()]
    );
}

#[test]
fn mixed_rcpt_outcomes_keep_their_own_replies() {
    let fake = Fake::start(Script {
        rcpt: vec![
            "250 2.1.5 Ok\r\n".into(),
            "550-5.1.1 <b@x.test>: Recipient address rejected:\r\n550 5.1.1 User unknown\r\n"
                .into(),
            "452 4.5.3 Error: too many recipients\r\n".into(),
        ],
        ..Script::default()
    });
    let report = send(&job_for(fake.addr, &["a@x.test", "b@x.test", "c@x.test"]));
    assert_eq!(
        statuses(&report),
        [
            ds("a@x.test", Status::Ok, "250 2.0.0 Ok: queued as ABC123"),
            ds(
                "b@x.test",
                Status::PermanentError,
                "550-5.1.1 <b@x.test>: Recipient address rejected:\n550 5.1.1 User unknown"
            ),
            ds(
                "c@x.test",
                Status::TransientError,
                "452 4.5.3 Error: too many recipients"
            ),
        ]
    );
    assert_eq!(fake.finish().messages.len(), 1);
}

#[test]
fn a_552_at_end_of_data_fails_every_accepted_recipient() {
    let fake = Fake::start(Script {
        rcpt: vec![
            "250 2.1.5 Ok\r\n".into(),
            "550 5.1.1 No such user\r\n".into(),
        ],
        end: "552 5.3.4 Error: message file too big\r\n".into(),
        ..Script::default()
    });
    let report = send(&job_for(fake.addr, &["a@x.test", "b@x.test", "c@x.test"]));
    assert_eq!(
        statuses(&report),
        [
            ds(
                "a@x.test",
                Status::PermanentError,
                "552 5.3.4 Error: message file too big"
            ),
            ds("b@x.test", Status::PermanentError, "550 5.1.1 No such user"),
            ds(
                "c@x.test",
                Status::PermanentError,
                "552 5.3.4 Error: message file too big"
            ),
        ]
    );
    fake.finish();
}

#[test]
fn a_451_at_end_of_data_is_transient() {
    let fake = Fake::start(Script {
        end: "451 4.3.0 Error: queue file write error\r\n".into(),
        ..Script::default()
    });
    let report = send(&job_for(fake.addr, &["a@x.test"]));
    assert_eq!(
        statuses(&report),
        [ds(
            "a@x.test",
            Status::TransientError,
            "451 4.3.0 Error: queue file write error"
        )]
    );
    fake.finish();
}

#[test]
fn no_recipient_accepted_means_no_data() {
    for mode in [Pipelining::No, Pipelining::Try] {
        let fake = Fake::start(Script {
            rcpt: vec!["550 5.1.1 No\r\n".into(), "451 4.3.0 Later\r\n".into()],
            // A pipelining server must refuse DATA when no RCPT succeeded.
            data: "554 5.5.1 Error: no valid recipients\r\n".into(),
            ..Script::default()
        });
        let mut job = job_for(fake.addr, &["a@x.test", "b@x.test"]);
        job.pipelining = mode;
        let report = send(&job);
        assert_eq!(
            statuses(&report),
            [
                ds("a@x.test", Status::PermanentError, "550 5.1.1 No"),
                ds("b@x.test", Status::TransientError, "451 4.3.0 Later"),
            ]
        );
        let rec = fake.finish();
        assert!(rec.messages.is_empty(), "{mode:?}");
        assert_eq!(rec.commands.last().unwrap(), "QUIT");
        // Without pipelining DATA is not even sent.
        assert_eq!(
            rec.commands.iter().any(|c| c == "DATA"),
            mode == Pipelining::Try,
            "{mode:?}: {:?}",
            rec.commands
        );
    }
}

#[test]
fn refused_sender_is_every_recipients_answer() {
    let fake = Fake::start(Script {
        mail: "553 5.7.1 <foo@bar.test>: Sender address rejected\r\n".into(),
        rcpt: vec!["503 5.5.1 Error: need MAIL command\r\n".into(); 2],
        data: "503 5.5.1 Error: need RCPT command\r\n".into(),
        ..Script::default()
    });
    let report = send(&job_for(fake.addr, &["a@x.test", "b@x.test"]));
    let want = "553 5.7.1 <foo@bar.test>: Sender address rejected";
    assert_eq!(
        statuses(&report),
        [
            ds("a@x.test", Status::PermanentError, want),
            ds("b@x.test", Status::PermanentError, want)
        ]
    );
    fake.finish();
}

// ---------------------------------------------------------------------------------
// Pipelining on the wire (RFC 2920)

#[test]
fn try_with_pipelining_sends_mail_rcpt_data_in_one_write() {
    let fake = Fake::start(Script::default());
    let report = send(&job_for(fake.addr, &["a@x.test", "b@x.test"]));
    assert!(report.all_ok(), "{}", report.to_json());
    let rec = fake.finish();
    let i = rec.read_with("MAIL FROM:");
    assert_eq!(
        String::from_utf8_lossy(&rec.reads[i].1),
        "MAIL FROM:<foo@bar.test> SIZE=23\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n",
        "all reads: {:?}",
        rec.reads_text()
    );
    // EHLO was not pipelined with anything, and the message came after 354.
    assert_eq!(rec.reads[0].1, b"EHLO client.test\r\n");
    assert!(rec.read_with("Subject: test") > i);
}

#[test]
fn depend_with_pipelining_pipelines() {
    let fake = Fake::start(Script::default());
    let mut job = job_for(fake.addr, &["a@x.test"]);
    job.pipelining = Pipelining::Depend;
    assert!(send(&job).all_ok());
    let rec = fake.finish();
    let i = rec.read_with("MAIL FROM:");
    assert!(String::from_utf8_lossy(&rec.reads[i].1).ends_with("RCPT TO:<a@x.test>\r\nDATA\r\n"));
}

#[test]
fn no_pipelining_sends_one_command_per_reply() {
    for (mode, ehlo) in [
        // NO never pipelines, even when offered.
        (Pipelining::No, Script::default().ehlo),
        // TRY does not pipeline when the server does not offer it.
        (
            Pipelining::Try,
            "250-fake.test\r\n250 SIZE 1000000\r\n".to_string(),
        ),
    ] {
        let fake = Fake::start(Script {
            ehlo,
            ..Script::default()
        });
        let mut job = job_for(fake.addr, &["a@x.test", "b@x.test"]);
        job.pipelining = mode;
        let report = send(&job);
        assert!(report.all_ok(), "{}", report.to_json());
        let rec = fake.finish();
        let reads = rec.reads_text();
        assert_eq!(
            reads[..6],
            [
                "EHLO client.test\r\n",
                "MAIL FROM:<foo@bar.test> SIZE=23\r\n",
                "RCPT TO:<a@x.test>\r\n",
                "RCPT TO:<b@x.test>\r\n",
                "DATA\r\n",
                "Subject: test\r\n\r\nTest\r\n.\r\n",
            ],
            "{mode:?}"
        );
    }
}

#[test]
fn depend_without_pipelining_is_an_error_and_sends_no_envelope() {
    let fake = Fake::start(Script {
        ehlo: "250-fake.test\r\n250 8BITMIME\r\n".into(),
        ..Script::default()
    });
    let mut job = job_for(fake.addr, &["a@x.test"]);
    job.pipelining = Pipelining::Depend;
    let report = send(&job);
    assert_eq!(
        report.to_json(),
        r#"{"status":"error","message":"Error while deliver messages: server does not offer PIPELINING and the job depends on it (pipelining DEPEND)"}"#
    );
    assert_eq!(fake.finish().commands, ["EHLO client.test", "QUIT"]);
}

// ---------------------------------------------------------------------------------
// Session failures: error reports

#[test]
fn starttls_require_without_starttls_is_an_error() {
    let fake = Fake::start(Script::default());
    let mut job = job_for(fake.addr, &["a@x.test"]);
    job.starttls = StartTls::Require;
    let report = send(&job);
    assert_eq!(
        error_message(&report),
        "Error while deliver messages: server does not offer STARTTLS and the job requires it (starttls REQUIRE)"
    );
    assert_eq!(fake.finish().commands, ["EHLO client.test", "QUIT"]);
}

#[test]
fn starttls_refused_is_an_error_with_require_and_ignored_with_try() {
    let ehlo = "250-fake.test\r\n250-STARTTLS\r\n250 PIPELINING\r\n".to_string();
    let fake = Fake::start(Script {
        ehlo: ehlo.clone(),
        ..Script::default()
    });
    let mut job = job_for(fake.addr, &["a@x.test"]);
    job.starttls = StartTls::Require;
    assert_eq!(
        error_message(&send(&job)),
        "Error while deliver messages: STARTTLS refused: 454 4.7.0 TLS not available"
    );
    assert_eq!(
        fake.finish().commands,
        ["EHLO client.test", "STARTTLS", "QUIT"]
    );

    let fake = Fake::start(Script {
        ehlo,
        ..Script::default()
    });
    let mut job = job_for(fake.addr, &["a@x.test"]);
    job.starttls = StartTls::Try;
    assert!(send(&job).all_ok());
    assert_eq!(fake.finish().messages.len(), 1);
}

#[test]
fn silent_server_times_out_within_the_bound() {
    let fake = Fake::start(Script {
        greeting: SILENT.into(),
        ..Script::default()
    });
    let mut job = job_for(fake.addr, &["a@x.test"]);
    job.connection_timeout = Duration::from_secs(1);
    let t = Instant::now();
    let report = send(&job);
    let took = t.elapsed();
    assert_eq!(
        error_message(&report),
        "Error while deliver messages: timeout after 1s waiting for the greeting"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    fake.finish();
}

#[test]
fn silence_after_the_envelope_times_out_too() {
    let fake = Fake::start(Script {
        data: SILENT.into(),
        ..Script::default()
    });
    let mut job = job_for(fake.addr, &["a@x.test"]);
    job.connection_timeout = Duration::from_secs(1);
    let t = Instant::now();
    let report = send(&job);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(
        error_message(&report),
        "Error while deliver messages: timeout after 1s waiting for the reply to DATA"
    );
    fake.finish();
}

#[test]
fn a_trickling_server_cannot_stretch_one_reply_past_the_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        // One byte every 200 ms: each read succeeds, the reply never completes in time.
        for b in b"220 slow.test ESMTP and a very long greeting text\r\n" {
            if tcp.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let mut job = job_for(addr, &["a@x.test"]);
    job.connection_timeout = Duration::from_secs(1);
    let t = Instant::now();
    let report = send(&job);
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    assert!(
        error_message(&report).contains("timeout after 1s waiting for the greeting"),
        "{}",
        report.to_json()
    );
    server.join().unwrap();
}

#[test]
fn connection_refused_is_an_error_report() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // the listener is dropped: nothing listens there now
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let report = send(&job_for(addr, &["a@x.test"]));
    let msg = error_message(&report);
    assert!(
        msg.starts_with(&format!(
            "Error while deliver messages: cannot connect to 127.0.0.1:{port}: "
        )) && msg.contains("refused"),
        "{msg}"
    );
}

#[test]
fn dns_failure_is_an_error_report() {
    let mut job = job_for("127.0.0.1:25".parse().unwrap(), &["a@x.test"]);
    job.host = "no-such-host.invalid".into(); // RFC 2606: never resolves
    let msg = error_message(&send(&job)).to_string();
    assert!(
        msg.starts_with("Error while deliver messages: cannot resolve host no-such-host.invalid")
            || msg.starts_with("Error while deliver messages: timeout"),
        "{msg}"
    );
}

#[test]
fn greeting_other_than_220_is_an_error() {
    let fake = Fake::start(Script {
        greeting: "554 5.7.1 fake.test: no SMTP service here\r\n".into(),
        ..Script::default()
    });
    let report = send(&job_for(fake.addr, &["a@x.test"]));
    assert_eq!(
        error_message(&report),
        "Error while deliver messages: greeting was not 220: 554 5.7.1 fake.test: no SMTP service here"
    );
    // RFC 5321 §3.1: after a 554 greeting the client says QUIT, nothing else.
    assert_eq!(fake.finish().commands, ["QUIT"]);
}

#[test]
fn a_421_midway_is_an_error() {
    let fake = Fake::start(Script {
        rcpt: vec!["421 4.7.0 fake.test Error: too many errors\r\n".into()],
        ..Script::default()
    });
    let report = send(&job_for(fake.addr, &["a@x.test"]));
    assert_eq!(
        error_message(&report),
        "Error while deliver messages: server closed the session (at the reply to RCPT TO:<a@x.test>): 421 4.7.0 fake.test Error: too many errors"
    );
    fake.finish();
}

#[test]
fn garbage_reply_is_an_error() {
    let fake = Fake::start(Script {
        mail: "hello, I am not SMTP\r\n".into(),
        ..Script::default()
    });
    let report = send(&job_for(fake.addr, &["a@x.test"]));
    assert_eq!(
        error_message(&report),
        "Error while deliver messages: malformed reply line \"hello, I am not SMTP\" in the reply to MAIL FROM"
    );
    fake.finish();
}

// ---------------------------------------------------------------------------------
// Greeting, HELO fallback, message encoding

#[test]
fn ehlo_502_falls_back_to_helo_without_extensions() {
    let fake = Fake::start(Script {
        ehlo: "502 5.5.1 Error: command not implemented\r\n".into(),
        ..Script::default()
    });
    let report = send(&job_for(fake.addr, &["a@x.test"]));
    assert!(report.all_ok(), "{}", report.to_json());
    let rec = fake.finish();
    assert_eq!(
        rec.commands,
        [
            "EHLO client.test",
            "HELO client.test",
            "MAIL FROM:<foo@bar.test>",
            "RCPT TO:<a@x.test>",
            "DATA",
            "QUIT"
        ]
    );
    // No PIPELINING after HELO: MAIL came alone.
    assert_eq!(
        rec.reads[rec.read_with("MAIL")].1,
        b"MAIL FROM:<foo@bar.test>\r\n"
    );
}

#[test]
fn lines_starting_with_a_dot_are_stuffed_and_bare_lf_becomes_crlf() {
    let fake = Fake::start(Script::default());
    let mut job = job_for(fake.addr, &["a@x.test"]);
    job.message = b".hidden\r\n..two\r\n.\r\nbare\nlf\r\n. \r\nno end".to_vec();
    assert!(send(&job).all_ok());
    let rec = fake.finish();
    assert_eq!(
        String::from_utf8_lossy(&rec.messages[0]),
        "..hidden\r\n...two\r\n..\r\nbare\r\nlf\r\n.. \r\nno end\r\n.\r\n"
    );
    // SIZE counts the CRLF-normalised message, without the stuffing (RFC 1870).
    assert!(
        rec.commands
            .contains(&"MAIL FROM:<foo@bar.test> SIZE=41".to_string()),
        "{:?}",
        rec.commands
    );
}

#[test]
fn eight_bit_message_declares_8bitmime_and_null_sender_is_empty_path() {
    let fake = Fake::start(Script::default());
    let mut job = job_for(fake.addr, &["a@x.test"]);
    job.sender = None;
    job.message = "Subject: café\r\n\r\nÀ bientôt\r\n".as_bytes().to_vec();
    assert!(send(&job).all_ok());
    let rec = fake.finish();
    assert_eq!(rec.commands[1], "MAIL FROM:<> SIZE=31 BODY=8BITMIME");
}

// ---------------------------------------------------------------------------------
// The command line

#[test]
fn cli_reads_the_job_from_a_file_or_stdin_and_exits_0_with_the_report() {
    let dir = tempfile::tempdir().unwrap();
    for how in ["file", "-", "nothing"] {
        let fake = Fake::start(Script::default());
        let json = job_json(fake.addr, "");
        let path = dir.path().join("job.json");
        std::fs::write(&path, &json).unwrap();
        let out = match how {
            "file" => process::run(&["send", path.to_str().unwrap()], b""),
            "-" => process::run(&["send", "-"], json.as_bytes()),
            _ => process::run(&["send"], json.as_bytes()),
        };
        assert_eq!(out.status.code(), Some(0), "{how}: {out:?}");
        assert_eq!(
            out.stdout,
            "{\"status\":\"ok\",\"deliveryStatus\":[{\"recipient\":\"a@x.test\",\"status\":\"Ok\",\"response\":\"250 2.0.0 Ok: queued as ABC123\"},{\"recipient\":\"b@x.test\",\"status\":\"Ok\",\"response\":\"250 2.0.0 Ok: queued as ABC123\"}]}\n",
            "{how}"
        );
        let rec = fake.finish();
        assert_eq!(rec.commands[0], "EHLO localhost");
        assert_eq!(
            rec.messages,
            [b"Subject: test\r\n\r\nTest\r\n.\r\n".to_vec()]
        );
    }
}

#[test]
fn cli_error_report_also_exits_0() {
    let fake = Fake::start(Script {
        greeting: "554 5.3.2 not now\r\n".into(),
        ..Script::default()
    });
    let out = process::run(&["send", "-"], job_json(fake.addr, "").as_bytes());
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        out.stdout,
        "{\"status\":\"error\",\"message\":\"Error while deliver messages: greeting was not 220: 554 5.3.2 not now\"}\n"
    );
    fake.finish();
}

#[test]
fn bad_jobs_exit_2_naming_the_field_and_send_nothing() {
    // A listener the job points at: a bad job must never connect to it.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let good = job_json(addr, "");
    // The good job with `field` replaced by `value` (JSON text) or removed (None).
    let with = |field: &str, value: Option<&str>| {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        let obj = v.as_object_mut().unwrap();
        match value {
            Some(x) => obj.insert(field.into(), serde_json::from_str(x).unwrap()),
            None => obj.remove(field),
        };
        v.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        (with("host", None), "\"host\""),
        (with("port", Some("\"25\"")), "\"port\""),
        (
            with("connection_timeout", Some("\"5\"")),
            "\"connection_timeout\"",
        ),
        (with("pipelining", Some("\"SOMETIMES\"")), "\"pipelining\""),
        (with("starttls", Some("1")), "\"starttls\""),
        (with("tls_verify", Some("\"no\"")), "\"tls_verify\""),
        (with("sender", None), "\"sender\""),
        (with("sender", Some("42")), "\"sender\""),
        (with("recipients", Some("[]")), "\"recipients\""),
        (with("recipients", Some("\"a@x.test\"")), "\"recipients\""),
        (with("recipients", None), "\"recipients\""),
        (with("message", Some("\"not*base64\"")), "\"message\""),
        (with("message", Some("5")), "\"message\""),
        (with("message", None), "\"message\""),
        ("{ not json".to_string(), "JSON"),
    ];
    for (json, named) in cases {
        assert_ne!(json, good, "the case did not change the job");
        let out = process::run(&["send"], json.as_bytes());
        let stderr = &out.stderr;
        assert_eq!(out.status.code(), Some(2), "{json}: {stderr}");
        assert!(out.stdout.is_empty(), "{json}: no report for a bad job");
        assert!(
            stderr.contains(named),
            "{json}: {stderr:?} should name {named}"
        );
    }
    assert!(
        listener.accept().is_err(),
        "a bad job must not connect anywhere"
    );
}

#[test]
fn cli_usage_errors_exit_2() {
    let out = process::run(&["send", "a.json", "b.json"], b"");
    assert_eq!(out.status.code(), Some(2));
    let out = process::run(&["send", "/nonexistent/job.json"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("/nonexistent/job.json"));
}

// ---------------------------------------------------------------------------------
// End to end against mailer's own server

/// A message that exercises the transfer: dot lines, 8-bit text, a long body.
fn e2e_message() -> Vec<u8> {
    let mut m = "From: a@x.test\r\nSubject: énd to énd\r\n\r\n.first\r\n..second\r\n.\r\n"
        .as_bytes()
        .to_vec();
    for i in 0..2000 {
        m.extend_from_slice(format!("line {i} of the body, some text to fill it\r\n").as_bytes());
    }
    m.extend_from_slice(b"last\r\n");
    m
}

fn e2e_job(s: &TestServer, host: &str, rcpts: &[&str]) -> Job {
    let mut job = job_for(s.addr, rcpts);
    job.host = host.into();
    job.message = e2e_message();
    job.starttls = StartTls::Require;
    job
}

#[test]
fn end_to_end_starttls_without_verification_stores_the_exact_bytes() {
    let s = TestServer::start(Opts {
        tls: true,
        ..Opts::default()
    });
    let mut job = e2e_job(&s, "127.0.0.1", &["a@x.test", "b@y.test"]);
    job.tls_verify = false;
    let report = send(&job);
    let st = statuses(&report);
    assert_eq!(st.len(), 2);
    assert!(report.all_ok(), "{}", report.to_json());
    assert!(
        st[0].response.starts_with("250 2.0.0 Ok: queued as "),
        "{st:?}"
    );
    assert_eq!(st[0].response, st[1].response);
    let id = queue_id(&st[0].response);

    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    let (name, bytes) = &stored[0];
    assert!(name.contains(&id), "{name} vs {id}");
    let (trace, body) = split_stored(bytes);
    assert_eq!(body, e2e_message());
    assert!(
        trace.starts_with(
            "Return-Path: <foo@bar.test>\r\nX-Original-To: a@x.test\r\nX-Original-To: b@y.test\r\nReceived: from client.test ([127.0.0.1]) by mx.test with ESMTPS\r\n"
        ),
        "{trace}"
    );
}

#[test]
fn end_to_end_verified_with_the_ca_file() {
    let s = TestServer::start(Opts {
        tls: true,
        ..Opts::default()
    });
    // The certificate is for "localhost": the name is checked, so connect by name.
    let mut job = e2e_job(&s, "localhost", &["a@x.test"]);
    job.tls_verify = true;
    job.ca_file = Some(s.cert.as_ref().unwrap().cert.clone());
    let report = send(&job);
    assert!(report.all_ok(), "{}", report.to_json());
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    let (trace, body) = split_stored(&stored[0].1);
    assert_eq!(body, e2e_message());
    assert!(trace.contains(" with ESMTPS\r\n"), "{trace}");

    // The same trusted CA, but a name the certificate does not carry: refused.
    let mut job = e2e_job(&s, "127.0.0.1", &["a@x.test"]);
    job.ca_file = Some(s.cert.as_ref().unwrap().cert.clone());
    let msg = error_message(&send(&job)).to_string();
    assert!(
        msg.starts_with("Error while deliver messages: TLS handshake failed: ")
            && msg.contains("certificate"),
        "{msg}"
    );
    assert_eq!(s.stored().len(), 1);
}

#[test]
fn end_to_end_self_signed_is_refused_when_verifying_against_public_roots() {
    let s = TestServer::start(Opts {
        tls: true,
        ..Opts::default()
    });
    let job = e2e_job(&s, "localhost", &["a@x.test"]);
    assert!(job.tls_verify);
    let msg = error_message(&send(&job)).to_string();
    assert!(
        msg.starts_with("Error while deliver messages: TLS handshake failed: invalid peer certificate: UnknownIssuer"),
        "{msg}"
    );
    assert!(s.stored().is_empty());
}

#[test]
fn end_to_end_policy_refusal_and_no_pipelining_over_plain_text() {
    let s = TestServer::with_toml("[policy]\naccept_domains = [\"x.test\"]\n");
    for mode in [Pipelining::Try, Pipelining::No] {
        let mut job = job_for(s.addr, &["a@x.test", "b@elsewhere.test", "c@x.test"]);
        job.starttls = StartTls::Try; // not offered: plain text
        job.pipelining = mode;
        let report = send(&job);
        let st = statuses(&report);
        assert_eq!(st[0].status, Status::Ok, "{mode:?}: {st:?}");
        assert_eq!(st[1].status, Status::PermanentError);
        assert_eq!(
            st[1].response,
            "550 5.7.1 <b@elsewhere.test>: Relay access denied"
        );
        assert_eq!(st[2].response, st[0].response);
    }
    let stored = s.stored();
    assert_eq!(stored.len(), 2);
    for (_, bytes) in &stored {
        let (trace, body) = split_stored(bytes);
        assert_eq!(body, MESSAGE);
        assert!(trace.contains("X-Original-To: a@x.test\r\nX-Original-To: c@x.test\r\nReceived: from client.test ([127.0.0.1]) by mx.test with ESMTP\r\n"), "{trace}");
    }
}
