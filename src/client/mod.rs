//! The SMTP client behind `mailer send` (SPEC 6): delivers one raw message to one
//! server and reports what happened to each recipient.
//!
//! ```no_run
//! use mailer::client::{send, Job, Report};
//!
//! let mut job = Job::new("127.0.0.1", Some("a@x.test".into()), vec!["b@y.test".into()],
//!                        b"Subject: hi\r\n\r\nhello\r\n".to_vec());
//! job.port = 2525;
//! match send(&job) {
//!     Report::Ok { delivery_status } => for d in delivery_status {
//!         println!("{}: {:?} {}", d.recipient, d.status, d.response);
//!     },
//!     Report::Error { message } => eprintln!("{message}"),
//! }
//! ```
//!
//! Layout: [`job`] (the JSON job), [`reply`] (pure reply parser), [`report`] (the JSON
//! report), `smtp` (the session, generic over its stream), `net` (TCP, DNS, rustls).

pub mod job;
mod net;
pub mod reply;
pub mod report;
mod smtp;

pub use job::{Job, JobError, Pipelining, StartTls};

/// Things that turn off a safety check, kept out of the way as rustls does: a caller
/// has to name `dangerous` to reach them.
pub mod dangerous {
    /// A certificate verifier that accepts any server certificate (still checking the
    /// handshake signature): what `tls_verify: false` uses, for self-signed test servers.
    pub use super::net::AnyCertificate;
}
pub use reply::{parse_reply, read_reply, ReplyError, ServerReply};
pub use report::{DeliveryStatus, Report, Status};

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Why a session failed (the cause in an error report).
#[derive(Debug)]
pub enum SendError {
    /// The job does not validate (only for jobs built in code; the CLI checks first).
    BadJob(JobError),
    /// The host name did not resolve, or resolved to nothing.
    Resolve {
        /// The name looked up.
        host: String,
        /// The resolver's error.
        err: String,
    },
    /// No address of the host accepted the connection (each address with its error).
    Connect {
        /// Each address tried, with its error.
        errors: Vec<(SocketAddr, io::Error)>,
    },
    /// A step took longer than `connection_timeout`.
    Timeout {
        /// The step (`connect`, `MAIL`, `DATA`, ...).
        step: String,
        /// How long was waited.
        after: Duration,
    },
    /// The server closed the connection while we waited for it.
    Closed {
        /// The step waited on.
        step: String,
    },
    /// A read or write failed.
    Io {
        /// The step.
        step: String,
        /// The I/O error.
        err: io::Error,
    },
    /// The server's reply broke RFC 5321 §4.2.
    Protocol {
        /// The step.
        step: String,
        /// What is wrong with the reply.
        err: ReplyError,
    },
    /// The greeting was not 220 (RFC 5321 §3.1: 554 means "no service here").
    Greeting(ServerReply),
    /// A refusal that ends the session: EHLO and HELO refused, STARTTLS refused with
    /// REQUIRE.
    Refused {
        /// The step refused.
        step: String,
        /// The refusal.
        reply: ServerReply,
    },
    /// 421 at any point: the server is closing the session (RFC 5321 §3.8).
    Closing {
        /// The step answered with 421.
        step: String,
        /// The 421 reply.
        reply: ServerReply,
    },
    /// `starttls: REQUIRE` and the server does not advertise STARTTLS.
    NoStartTls,
    /// `pipelining: DEPEND` and the server does not advertise PIPELINING.
    NoPipelining,
    /// Non-ASCII addresses and the server does not advertise SMTPUTF8 (RFC 6531 §3.2).
    NoSmtpUtf8,
    /// The CA file could not be used.
    CaFile {
        /// The `ca_file`.
        path: PathBuf,
        /// Why it could not be used.
        err: String,
    },
    /// The TLS handshake failed (certificate not trusted, name mismatch, ...).
    Tls(String),
    /// The server sent bytes after its STARTTLS 220 and before the handshake: they
    /// would be taken as if they had come over TLS (the client side of CVE-2011-0411).
    TlsInjection,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::BadJob(e) => write!(f, "{e}"),
            SendError::Resolve { host, err } => write!(f, "cannot resolve host {host}: {err}"),
            SendError::Connect { errors } => {
                f.write_str("cannot connect to ")?;
                for (i, (addr, err)) in errors.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "; " };
                    write!(f, "{sep}{addr}: {err}")?;
                }
                Ok(())
            }
            SendError::Timeout { step, after } => {
                write!(f, "timeout after {:?} waiting for {step}", after)
            }
            SendError::Closed { step } => {
                write!(
                    f,
                    "connection closed by the server while waiting for {step}"
                )
            }
            SendError::Io { step, err } => write!(f, "I/O error ({step}): {err}"),
            SendError::Protocol { step, err } => write!(f, "{err} in {step}"),
            SendError::Greeting(r) => write!(f, "greeting was not 220: {r}"),
            SendError::Refused { step, reply } => write!(f, "{step} refused: {reply}"),
            SendError::Closing { step, reply } => {
                write!(f, "server closed the session (at {step}): {reply}")
            }
            SendError::NoStartTls => write!(
                f,
                "server does not offer STARTTLS and the job requires it (starttls REQUIRE)"
            ),
            SendError::NoPipelining => write!(
                f,
                "server does not offer PIPELINING and the job depends on it (pipelining DEPEND)"
            ),
            SendError::NoSmtpUtf8 => write!(
                f,
                "addresses need SMTPUTF8 and the server does not offer it"
            ),
            SendError::CaFile { path, err } => {
                write!(f, "cannot use ca_file {}: {err}", path.display())
            }
            SendError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            SendError::TlsInjection => write!(
                f,
                "server sent data after its STARTTLS reply, before the TLS handshake"
            ),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::BadJob(e) => Some(e),
            SendError::Io { err, .. } => Some(err),
            SendError::Protocol { err, .. } => Some(err),
            // The last address tried.
            SendError::Connect { errors } => errors.last().map(|(_, e)| e as _),
            _ => None,
        }
    }
}

/// Delivers `job` and reports the outcome. Never panics on any server behaviour;
/// every wait is bounded by `job.connection_timeout` (DNS and connect included).
pub fn send(job: &Job) -> Report {
    match try_send(job) {
        Ok(delivery_status) => Report::Ok { delivery_status },
        Err(e) => Report::error(e),
    }
}

/// Like [`send`], with the failure as a typed error.
pub fn try_send(job: &Job) -> Result<Vec<DeliveryStatus>, SendError> {
    job.validate().map_err(SendError::BadJob)?;
    // TLS settings (and the CA file) are checked before anything goes on the wire.
    let tls = match job.starttls {
        StartTls::No => None,
        _ => Some(net::tls_setup(job)?),
    };
    let stream = net::connect(job, tls)?;
    smtp::run(job, stream)
}
