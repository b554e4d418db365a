//! Logs every server event, like the event-schema example of smtp-server (Node.js):
//! connect, HELO/EHLO, MAIL, RCPT, the message content, errors and stored messages.
//!
//! ```text
//! cargo run --example log_events [-- path/to/config.toml]
//! ```
//! Runs with `config.toml` from the current directory by default, until Ctrl-C.
//! Try it with `swaks --server 127.0.0.1:2525 --to you@example.org`.

use mailer::hooks::MailParams;
use mailer::hooks::{DataVerdict, Envelope, Hooks, SessionError, SessionInfo};
use mailer::protocol::address::{Address, ReversePath};
use mailer::{Config, Enhanced, Reply, Server};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;

/// Accepts everything and logs each event with the session id.
struct LogEvents;

impl Hooks for LogEvents {
    fn connect(&self, s: &SessionInfo) -> Result<(), Reply> {
        let tls = match &s.tls {
            Some(t) => format!(" over {} ({})", t.version, t.cipher),
            None => String::new(),
        };
        log::info!("[{}] connect from {}{tls}", s.id, s.peer);
        Ok(())
    }

    fn helo(&self, s: &SessionInfo, name: &str) -> Result<(), Reply> {
        log::info!("[{}] helo {name:?}", s.id);
        Ok(())
    }

    fn mail(&self, s: &SessionInfo, from: &ReversePath, p: &MailParams) -> Result<(), Reply> {
        log::info!(
            "[{}] mail from <{from}> size={:?} body={:?} smtputf8={} auth={:?} user={:?}",
            s.id,
            p.size,
            p.body,
            p.smtputf8,
            p.auth,
            s.auth_user
        );
        Ok(())
    }

    fn rcpt(&self, s: &SessionInfo, e: &Envelope, to: &Address) -> Result<(), Reply> {
        log::info!(
            "[{}] rcpt to <{to}> (recipient {} of <{}>)",
            s.id,
            e.rcpts.len() + 1,
            e.from
        );
        Ok(())
    }

    /// Asking for the content makes the server write each message a second time (the
    /// content is read back from the spool file, never held in memory).
    fn wants_data(&self) -> bool {
        true
    }

    fn data(
        &self,
        s: &SessionInfo,
        e: &Envelope,
        content: &mut dyn Read,
    ) -> Result<DataVerdict, Reply> {
        // Only the header section is looked at, a line at a time.
        let mut subject = None;
        let mut size = 0u64;
        let mut in_headers = true;
        let mut line = Vec::new();
        let mut reader = BufReader::new(content);
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|_| Reply::new(451, Enhanced(4, 3, 0), "Error: read error"))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if line == b"\r\n" || line == b"\n" {
                in_headers = false;
            }
            if in_headers
                && subject.is_none()
                && line.len() > 8
                && line[..8].eq_ignore_ascii_case(b"subject:")
            {
                subject = Some(String::from_utf8_lossy(&line[8..]).trim().to_string());
            }
        }
        log::info!(
            "[{}] data: {size} bytes for {} recipient(s), subject {subject:?}",
            s.id,
            e.rcpts.len()
        );
        Ok(DataVerdict::default())
    }

    fn error(&self, s: &SessionInfo, err: &SessionError) {
        log::warn!("[{}] error: {err:?}", s.id);
    }

    fn done(&self, s: &SessionInfo, e: &Envelope, queue_id: &str) {
        let rcpts: Vec<String> = e.rcpts.iter().map(|r| r.to_string()).collect();
        log::info!(
            "[{}] stored {queue_id}: <{}> -> {}",
            s.id,
            e.from,
            rcpts.join(", ")
        );
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let path = PathBuf::from(std::env::args().nth(1).unwrap_or("config.toml".into()));
    let config = Config::load(&path)?;
    let server = Server::builder(config).hooks(LogEvents).build()?;
    let handle = server.handle();
    ctrlc::set_handler(move || handle.shutdown())?;
    server.run()?;
    Ok(())
}
