//! A recipient allow-list loaded from a file: RCPT TO an address that is not listed is
//! refused `550 5.1.1`.
//!
//! ```text
//! cargo run --example allow_list -- allowed.txt [path/to/config.toml]
//! ```
//! The file holds one entry per line: a full address (`alice@example.org`) or a whole
//! domain (`@example.org`); matching ignores case; `#` starts a comment. The server
//! uses `config.toml` from the current directory by default and runs until Ctrl-C.

use mailer::hooks::{Envelope, Hooks, SessionInfo};
use mailer::protocol::address::Address;
use mailer::{Config, Enhanced, Reply, Server};
use std::collections::HashSet;
use std::path::PathBuf;

/// The allowed addresses and domains, lower-cased.
struct AllowList {
    addresses: HashSet<String>,
    domains: HashSet<String>,
}

impl AllowList {
    fn parse(text: &str) -> AllowList {
        let mut list = AllowList {
            addresses: HashSet::new(),
            domains: HashSet::new(),
        };
        for line in text.lines() {
            let entry = line.split('#').next().unwrap_or("").trim().to_lowercase();
            if entry.is_empty() {
                continue;
            }
            match entry.strip_prefix('@') {
                Some(domain) => list.domains.insert(domain.to_string()),
                None => list.addresses.insert(entry),
            };
        }
        list
    }

    fn allows(&self, to: &Address) -> bool {
        self.addresses.contains(&to.as_str().to_lowercase())
            || to
                .domain()
                .is_some_and(|d| self.domains.contains(&d.to_lowercase()))
    }
}

impl Hooks for AllowList {
    fn rcpt(&self, _s: &SessionInfo, _e: &Envelope, to: &Address) -> Result<(), Reply> {
        if self.allows(to) {
            Ok(())
        } else {
            Err(Reply::new(
                550,
                Enhanced(5, 1, 1),
                format!("<{to}>: Recipient address rejected: not on the allow list"),
            ))
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let mut args = std::env::args().skip(1);
    let Some(list_path) = args.next() else {
        eprintln!("usage: allow_list ALLOWED.txt [CONFIG.toml]");
        std::process::exit(2);
    };
    let text = std::fs::read_to_string(&list_path)
        .map_err(|e| format!("cannot read the allow-list {list_path}: {e}"))?;
    let list = AllowList::parse(&text);
    log::info!(
        "allow-list {list_path}: {} address(es), {} domain(s)",
        list.addresses.len(),
        list.domains.len()
    );
    let config_path = PathBuf::from(args.next().unwrap_or("config.toml".into()));
    let config = Config::load(&config_path)?;
    let server = Server::builder(config).hooks(list).build()?;
    let handle = server.handle();
    ctrlc::set_handler(move || handle.shutdown())?;
    server.run()?;
    Ok(())
}
