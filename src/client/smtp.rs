//! The client session (RFC 5321 §3, §4.1): greeting, EHLO/HELO, STARTTLS, one
//! transaction, QUIT. Generic over [`Transport`] so that unit tests can script a server in
//! memory; `net` supplies the TCP/TLS stream.

use super::job::{Job, Pipelining, StartTls};
use super::reply::{parse_reply, ServerReply};
use super::report::DeliveryStatus;
use super::SendError;
use crate::connection::Transport;
use crate::protocol::data::dot_stuff;
use std::io::{self, ErrorKind};
use std::time::{Duration, Instant};

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// The stream, the bytes read but not yet parsed, and the per-reply bound.
struct Conn<W> {
    w: W,
    buf: Vec<u8>,
    timeout: Duration,
}

impl<W: Transport> Conn<W> {
    fn write(&mut self, bytes: &[u8], what: &str) -> Result<(), SendError> {
        let res = self.w.write_all(bytes).and_then(|()| self.w.flush());
        res.map_err(|err| {
            if is_timeout(&err) {
                SendError::Timeout {
                    step: format!("the server to take {what}"),
                    after: self.timeout,
                }
            } else {
                SendError::Io {
                    step: format!("sending {what}"),
                    err,
                }
            }
        })
    }

    /// Reads one reply. The whole reply must arrive within the timeout: the deadline
    /// is fixed when we start waiting, so a server that trickles bytes gains nothing.
    fn reply(&mut self, step: &str) -> Result<ServerReply, SendError> {
        let deadline = Instant::now() + self.timeout;
        let mut chunk = [0u8; 4096];
        loop {
            match parse_reply(&self.buf) {
                Ok(Some((r, n))) => {
                    self.buf.drain(..n);
                    log::debug!("client: <- {r}");
                    return Ok(r);
                }
                Ok(None) => {}
                Err(err) => {
                    return Err(SendError::Protocol {
                        step: step.to_string(),
                        err,
                    })
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = || SendError::Timeout {
                step: step.to_string(),
                after: self.timeout,
            };
            if left.is_zero() {
                return Err(timeout());
            }
            let read = self
                .w
                .set_read_timeout(Some(left))
                .and_then(|()| self.w.read(&mut chunk));
            match read {
                Ok(0) => {
                    return Err(SendError::Closed {
                        step: step.to_string(),
                    })
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(timeout()),
                // A TLS peer that vanishes without close_notify.
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                    return Err(SendError::Closed {
                        step: step.to_string(),
                    })
                }
                Err(err) => {
                    return Err(SendError::Io {
                        step: step.to_string(),
                        err,
                    })
                }
            }
        }
    }

    /// Reads a reply in the middle of the session: 421 means the server is closing
    /// (RFC 5321 §3.8), so nothing after it can be trusted.
    fn expect(&mut self, step: &str) -> Result<ServerReply, SendError> {
        let r = self.reply(step)?;
        if r.code == 421 {
            return Err(SendError::Closing {
                step: step.to_string(),
                reply: r,
            });
        }
        Ok(r)
    }

    /// Sends one command and waits for its reply.
    fn cmd(&mut self, line: &str, name: &str) -> Result<ServerReply, SendError> {
        log::debug!("client: -> {line}");
        self.write(format!("{line}\r\n").as_bytes(), name)?;
        self.expect(&format!("the reply to {name}"))
    }

    /// QUIT and close, ignoring failures: the outcome is already decided.
    fn quit(&mut self) {
        if self.write(b"QUIT\r\n", "QUIT").is_ok() {
            let _ = self.reply("the reply to QUIT");
        }
        // Dropping a TLS stream sends close_notify (RFC 8446 §6.1).
    }
}

/// The handshake after `220` to STARTTLS, bounded as a whole by the reply timeout.
fn start_tls<W: Transport>(c: &mut Conn<W>) -> Result<(), SendError> {
    let started =
        c.w.set_read_timeout(Some(c.timeout))
            .and_then(|()| c.w.start_tls());
    match started {
        Ok(info) => {
            log::debug!("client: TLS {} {}", info.version, info.cipher);
            Ok(())
        }
        Err(e) if is_timeout(&e) => Err(SendError::Timeout {
            step: "the TLS handshake".into(),
            after: c.timeout,
        }),
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            Err(SendError::Tls("TLS is not set up for this job".into()))
        }
        Err(e) => Err(SendError::Tls(e.to_string())),
    }
}

/// What the server advertised in its EHLO reply (RFC 5321 §4.1.1.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Ext {
    pipelining: bool,
    starttls: bool,
    size: bool,
    eight_bit: bool,
    smtputf8: bool,
}

impl Ext {
    fn parse(r: &ServerReply) -> Ext {
        let mut e = Ext::default();
        // The first line is the server's name and greeting text, not a keyword.
        for line in r.texts().skip(1) {
            let kw = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
            match kw.as_str() {
                "PIPELINING" => e.pipelining = true,
                "STARTTLS" => e.starttls = true,
                "SIZE" => e.size = true,
                "8BITMIME" => e.eight_bit = true,
                "SMTPUTF8" => e.smtputf8 = true,
                _ => {}
            }
        }
        e
    }
}

/// The size declared with SIZE= (RFC 1870 §3): the message as it goes on the wire
/// with CRLF line ends, before dot-stuffing.
fn wire_size(m: &[u8]) -> usize {
    let bare_lf = m
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' && (i == 0 || m[i - 1] != b'\r'))
        .count();
    // dot_stuff ends an unterminated last line with CRLF.
    let tail = if !m.is_empty() && !m.ends_with(b"\n") {
        2
    } else {
        0
    };
    m.len() + bare_lf + tail
}

/// Runs the whole session on a connected stream.
pub(crate) fn run<W: Transport>(job: &Job, w: W) -> Result<Vec<DeliveryStatus>, SendError> {
    let mut c = Conn {
        w,
        buf: Vec::new(),
        timeout: job.connection_timeout,
    };
    let greeting = c.reply("the greeting")?;
    if greeting.code != 220 {
        // RFC 5321 §3.1: a 554 greeting means no service; the client should QUIT.
        c.quit();
        return Err(SendError::Greeting(greeting));
    }
    let mut ext = hello(job, &mut c)?;

    if job.starttls != StartTls::No {
        if ext.starttls {
            let r = c.cmd("STARTTLS", "STARTTLS")?;
            if r.code == 220 {
                if !c.buf.is_empty() {
                    // Bytes that arrived in clear text would be read as if they had
                    // come over TLS: never trust them (the client side of
                    // CVE-2011-0411).
                    return Err(SendError::TlsInjection);
                }
                start_tls(&mut c)?;
                // RFC 3207 §4.2: discard all knowledge from before TLS and EHLO again.
                ext = hello(job, &mut c)?;
            } else if job.starttls == StartTls::Require {
                c.quit();
                return Err(SendError::Refused {
                    step: "STARTTLS".into(),
                    reply: r,
                });
            }
            // TRY and refused: carry on in clear text, as Postfix's "may" level does.
        } else if job.starttls == StartTls::Require {
            c.quit();
            return Err(SendError::NoStartTls);
        }
    }

    let pipelining = match job.pipelining {
        Pipelining::No => false,
        Pipelining::Try => ext.pipelining,
        Pipelining::Depend if ext.pipelining => true,
        Pipelining::Depend => {
            c.quit();
            return Err(SendError::NoPipelining);
        }
    };
    let utf8 = !job.sender_path().is_ascii() || job.recipients.iter().any(|r| !r.is_ascii());
    if utf8 && !ext.smtputf8 {
        c.quit();
        return Err(SendError::NoSmtpUtf8);
    }
    let report = transaction(job, &mut c, ext, pipelining, utf8)?;
    c.quit();
    Ok(report)
}

/// EHLO, or HELO when the server does not know EHLO (RFC 5321 §3.2: it answers 5xx,
/// typically 500 or 502). HELO means no extensions.
fn hello<W: Transport>(job: &Job, c: &mut Conn<W>) -> Result<Ext, SendError> {
    let r = c.cmd(&format!("EHLO {}", job.helo), "EHLO")?;
    if r.is_ok() {
        return Ok(Ext::parse(&r));
    }
    if r.code / 100 == 5 {
        let h = c.cmd(&format!("HELO {}", job.helo), "HELO")?;
        if h.is_ok() {
            return Ok(Ext::default());
        }
        c.quit();
        return Err(SendError::Refused {
            step: "HELO".into(),
            reply: h,
        });
    }
    c.quit();
    Err(SendError::Refused {
        step: "EHLO".into(),
        reply: r,
    })
}

/// MAIL, RCPT for each recipient, DATA and the message; the report per recipient.
fn transaction<W: Transport>(
    job: &Job,
    c: &mut Conn<W>,
    ext: Ext,
    pipelining: bool,
    utf8: bool,
) -> Result<Vec<DeliveryStatus>, SendError> {
    let mut mail = format!("MAIL FROM:<{}>", job.sender_path());
    if ext.size {
        mail.push_str(&format!(" SIZE={}", wire_size(&job.message)));
    }
    // RFC 6152: declare 8-bit content when the server can take it. Without 8BITMIME
    // the message goes as it is (we do not convert); the server may refuse it.
    if ext.eight_bit && !job.message.is_ascii() {
        mail.push_str(" BODY=8BITMIME");
    }
    if utf8 {
        mail.push_str(" SMTPUTF8");
    }
    let rcpts: Vec<String> = (0..job.recipients.len())
        .map(|i| format!("RCPT TO:<{}>", job.recipient_path(i)))
        .collect();
    let all_get = |r: &ServerReply| {
        job.recipients
            .iter()
            .map(|rcpt| DeliveryStatus::from_reply(rcpt, r))
            .collect::<Vec<_>>()
    };

    let mail_r;
    let mut rcpt_rs = Vec::with_capacity(rcpts.len());
    let data_r;
    if pipelining {
        // RFC 2920 §3.1: MAIL, the RCPTs and DATA (the last command of the group) go
        // in one write; the replies come back in order and every one is checked.
        let mut batch = String::new();
        for line in std::iter::once(&mail).chain(&rcpts) {
            batch.push_str(line);
            batch.push_str("\r\n");
        }
        batch.push_str("DATA\r\n");
        log::debug!("client: -> {}", batch.replace("\r\n", " | "));
        c.write(batch.as_bytes(), "MAIL, RCPT and DATA")?;
        mail_r = c.expect("the reply to MAIL FROM")?;
        for line in &rcpts {
            rcpt_rs.push(c.expect(&format!("the reply to {line}"))?);
        }
        data_r = Some(c.expect("the reply to DATA")?);
    } else {
        mail_r = c.cmd(&mail, "MAIL FROM")?;
        if !mail_r.is_ok() {
            return Ok(all_get(&mail_r));
        }
        for line in &rcpts {
            rcpt_rs.push(c.cmd(line, line)?);
        }
        // No recipient accepted: skip DATA, the caller QUITs.
        data_r = if rcpt_rs.iter().any(ServerReply::is_ok) {
            Some(c.cmd("DATA", "DATA")?)
        } else {
            None
        };
    }

    let accepted = mail_r.is_ok() && rcpt_rs.iter().any(ServerReply::is_ok);
    let data_r = match data_r {
        Some(d) if d.code == 354 && !accepted => {
            // RFC 2920 §3.1: a pipelining client cannot count on DATA being refused
            // when MAIL or every RCPT was; if the server said 354 anyway, the client
            // "should send a single dot". A QUIT here would be taken as message text
            // and leave both sides waiting; the lone dot ends an empty message that
            // has no recipients, so the server cannot deliver it. Its reply does not
            // change anyone's outcome.
            c.write(b".\r\n", "the end of an empty message")?;
            c.expect("the reply to an empty message")?;
            None
        }
        other => other,
    };
    if !mail_r.is_ok() {
        // Every RCPT after a refused MAIL fails for that reason (503 "need MAIL"):
        // the MAIL reply is the cause worth reporting.
        return Ok(all_get(&mail_r));
    }
    let final_r = match data_r {
        Some(d) if accepted && d.code == 354 => {
            c.write(&dot_stuff(&job.message), "the message")?;
            Some(c.expect("the reply to the end of data")?)
        }
        // DATA refused (e.g. 554 no valid recipients): that is the final word.
        Some(d) if accepted => Some(d),
        _ => None,
    };
    Ok(job
        .recipients
        .iter()
        .zip(&rcpt_rs)
        .map(|(rcpt, r)| match (&final_r, r.is_ok()) {
            (Some(f), true) => DeliveryStatus::from_reply(rcpt, f),
            _ => DeliveryStatus::from_reply(rcpt, r),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::report::Status;
    use super::*;
    use crate::hooks::TlsInfo;
    use std::collections::VecDeque;
    use std::io::{Read, Write};

    /// A scripted server: each read returns the next chunk; everything written is kept.
    struct Mock {
        chunks: VecDeque<Vec<u8>>,
        written: Vec<u8>,
        tls: bool,
    }

    impl Mock {
        fn new(chunks: &[&str]) -> Mock {
            Mock {
                chunks: chunks.iter().map(|c| c.as_bytes().to_vec()).collect(),
                written: Vec::new(),
                tls: false,
            }
        }
    }

    impl Read for Mock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.chunks.pop_front() {
                None => Err(io::Error::new(ErrorKind::WouldBlock, "silent")),
                Some(c) => {
                    let n = c.len().min(buf.len());
                    buf[..n].copy_from_slice(&c[..n]);
                    if n < c.len() {
                        self.chunks.push_front(c[n..].to_vec());
                    }
                    Ok(n)
                }
            }
        }
    }

    impl Write for Mock {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Transport for &mut Mock {
        fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
            assert!(t.is_some_and(|t| !t.is_zero()));
            Ok(())
        }
        fn start_tls(&mut self) -> io::Result<TlsInfo> {
            self.tls = true;
            Ok(TlsInfo {
                version: "TLSv1_3".into(),
                cipher: "TLS13_AES_128_GCM_SHA256".into(),
            })
        }
    }

    fn job(pipelining: Pipelining, rcpts: &[&str], message: &[u8]) -> Job {
        let mut j = Job::new(
            "127.0.0.1",
            Some("s@x.test".into()),
            rcpts.iter().map(|r| r.to_string()).collect(),
            message.to_vec(),
        );
        j.helo = "client.test".into();
        j.pipelining = pipelining;
        j.starttls = StartTls::Try;
        j
    }

    const EHLO: &str = "250-mx\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n";

    #[test]
    fn pipelined_all_rcpt_refused_but_354_sends_a_lone_dot() {
        let mut m = Mock::new(&[
            "220 mx\r\n",
            EHLO,
            "250 2.1.0 Ok\r\n550 5.1.1 no a\r\n452 4.5.3 no b\r\n354 go\r\n",
            "554 5.5.1 no valid recipients\r\n",
            "221 bye\r\n",
        ]);
        let out = run(&job(Pipelining::Try, &["a@x", "b@x"], b"hi\r\n"), &mut m).unwrap();
        assert_eq!(out[0].status, Status::PermanentError);
        assert_eq!(out[0].response, "550 5.1.1 no a");
        assert_eq!(out[1].status, Status::TransientError);
        assert_eq!(out[1].response, "452 4.5.3 no b");
        let w = String::from_utf8(m.written).unwrap();
        assert!(
            w.ends_with("MAIL FROM:<s@x.test> SIZE=4\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n.\r\nQUIT\r\n"),
            "{w}"
        );
        assert!(!w.contains("hi"), "the message must not be sent: {w}");
    }

    #[test]
    fn refused_mail_is_every_recipients_answer() {
        let mut m = Mock::new(&[
            "220 mx\r\n",
            EHLO,
            "553 5.1.8 bad sender\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n",
            "503 5.5.1 need RCPT\r\n",
            "221 bye\r\n",
        ]);
        let out = run(&job(Pipelining::Try, &["a@x"], b"hi\r\n"), &mut m).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].response, "553 5.1.8 bad sender");
        assert_eq!(out[0].status, Status::PermanentError);

        let mut m = Mock::new(&["220 mx\r\n", EHLO, "451 4.3.0 try later\r\n", "221 bye\r\n"]);
        let out = run(&job(Pipelining::No, &["a@x", "b@x"], b"hi"), &mut m).unwrap();
        assert!(out
            .iter()
            .all(|d| d.status == Status::TransientError && d.response == "451 4.3.0 try later"));
        let w = String::from_utf8(m.written).unwrap();
        assert!(!w.contains("RCPT"), "{w}");
    }

    #[test]
    fn data_refused_is_the_answer_for_accepted_recipients() {
        let mut m = Mock::new(&[
            "220 mx\r\n",
            EHLO,
            "250 ok\r\n250 ok\r\n550 no\r\n554 5.3.0 no DATA today\r\n",
            "221 bye\r\n",
        ]);
        let out = run(&job(Pipelining::Try, &["a@x", "b@x"], b"x"), &mut m).unwrap();
        assert_eq!(out[0].response, "554 5.3.0 no DATA today");
        assert_eq!(out[1].response, "550 no");
        assert!(!String::from_utf8(m.written).unwrap().contains("\r\n.\r\n"));
    }

    #[test]
    fn starttls_then_ehlo_again_and_injection_is_refused() {
        let ehlo_tls = "250-mx\r\n250-STARTTLS\r\n250 PIPELINING\r\n";
        let mut m = Mock::new(&[
            "220 mx\r\n",
            ehlo_tls,
            "220 2.0.0 go\r\n",
            EHLO,
            "250 ok\r\n250 ok\r\n354 go\r\n",
            "250 2.0.0 queued\r\n",
            "221 bye\r\n",
        ]);
        let out = run(&job(Pipelining::Try, &["a@x"], b"x"), &mut m).unwrap();
        assert!(m.tls);
        assert_eq!(out[0].response, "250 2.0.0 queued");
        let w = String::from_utf8(m.written).unwrap();
        assert!(
            w.starts_with("EHLO client.test\r\nSTARTTLS\r\nEHLO client.test\r\nMAIL"),
            "{w}"
        );

        let mut m = Mock::new(&["220 mx\r\n", ehlo_tls, "220 2.0.0 go\r\n250 forged\r\n"]);
        let e = run(&job(Pipelining::Try, &["a@x"], b"x"), &mut m).unwrap_err();
        assert!(matches!(e, SendError::TlsInjection), "{e}");
        assert!(!m.tls);
    }

    #[test]
    fn a_421_ends_the_session_with_an_error() {
        let mut m = Mock::new(&["220 mx\r\n", EHLO, "250 ok\r\n421 4.7.0 too busy\r\n"]);
        let e = run(&job(Pipelining::Try, &["a@x", "b@x"], b"x"), &mut m).unwrap_err();
        assert_eq!(
            e.to_string(),
            "server closed the session (at the reply to RCPT TO:<a@x>): 421 4.7.0 too busy"
        );
    }

    #[test]
    fn silence_is_a_timeout_and_garbage_a_protocol_error() {
        let mut m = Mock::new(&["220 mx\r\n"]);
        let e = run(&job(Pipelining::Try, &["a@x"], b"x"), &mut m).unwrap_err();
        assert!(matches!(e, SendError::Timeout { .. }), "{e}");
        let mut m = Mock::new(&["220 mx\r\n", "hello there\r\n"]);
        let e = run(&job(Pipelining::Try, &["a@x"], b"x"), &mut m).unwrap_err();
        assert!(matches!(e, SendError::Protocol { .. }), "{e}");
    }

    #[test]
    fn mail_parameters() {
        let mut m = Mock::new(&[
            "220 mx\r\n",
            "250-mx\r\n250-SIZE\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 ok\r\n",
            "221 bye\r\n",
        ]);
        let out = run(&job(Pipelining::Try, &["ü@x"], "é\nb".as_bytes()), &mut m).unwrap();
        assert_eq!(out[0].status, Status::Ok);
        let w = String::from_utf8(m.written).unwrap();
        assert!(
            w.contains("MAIL FROM:<s@x.test> SIZE=7 BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<ü@x>\r\nDATA\r\né\r\nb\r\n.\r\n"),
            "{w}"
        );
    }

    #[test]
    fn wire_sizes() {
        assert_eq!(wire_size(b""), 0);
        assert_eq!(wire_size(b"a\r\n"), 3);
        assert_eq!(wire_size(b"a\nb"), 6);
        assert_eq!(wire_size(b"\n"), 2);
        // dot_stuff adds the stuffing dots and the 3-byte terminator, nothing else.
        for (m, dots) in [(&b"a\nb\r\n.c"[..], 1), (b"..\n", 1), (b"x", 0)] {
            assert_eq!(dot_stuff(m).len(), wire_size(m) + dots + 3, "{m:?}");
        }
    }
}
