//! Logs every server event, like the event-schema example of smtp-server (Node.js):
//! connect, HELO/EHLO, MAIL, RCPT, the message content, errors and stored messages.
//!
//! ```text
//! cargo run --example log_events [-- path/to/config.toml]
//! ```
//! Runs with `config.toml` from the current directory by default, until Ctrl-C.
//! Try it with `swaks --server 127.0.0.1:2525 --to you@example.org`.

use mailer::hooks::{Envelope, Header, Hooks, SessionError, SessionInfo};
use mailer::protocol::address::{Address, ReversePath};
use mailer::protocol::command::MailParams;
use mailer::{Config, Reply, Server};
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

    /// Asking for the content makes the server hold each message in memory until this
    /// returns (streaming to disk is the default); fine for a demo.
    fn wants_data(&self) -> bool {
        true
    }

    fn data(&self, s: &SessionInfo, e: &Envelope, content: &[u8]) -> Result<Vec<Header>, Reply> {
        let subject = content
            .split(|&b| b == b'\n')
            .take_while(|line| *line != b"\r" && !line.is_empty())
            .find(|line| line.len() > 8 && line[..8].eq_ignore_ascii_case(b"subject:"))
            .map(|line| String::from_utf8_lossy(&line[8..]).trim().to_string());
        log::info!(
            "[{}] data: {} bytes for {} recipient(s), subject {subject:?}",
            s.id,
            content.len(),
            e.rcpts.len()
        );
        Ok(Vec::new())
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
