//! A tiny rate limiter: a sender may reach at most N recipients per minute; beyond
//! that, RCPT is refused `450 4.7.1` (temporary, so a legitimate sender retries later).
//!
//! ```text
//! cargo run --example rate_limit -- [N] [path/to/config.toml]
//! ```
//! N defaults to 10. The sender is the MAIL FROM address (lower-cased; `<>` for
//! bounces) together with the client's IP, so a forged sender on one host does not use
//! up another host's allowance. Runs with `config.toml` until Ctrl-C.

use mailer::hooks::{Envelope, Hooks, SessionInfo};
use mailer::protocol::address::Address;
use mailer::{Config, Enhanced, Reply, Server};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

/// Recipients accepted per (client IP, sender) in the last minute (a sliding window).
struct RateLimit {
    per_minute: usize,
    seen: Mutex<HashMap<(IpAddr, String), VecDeque<Instant>>>,
}

impl RateLimit {
    fn new(per_minute: usize) -> RateLimit {
        RateLimit {
            per_minute,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one recipient for `key` at `now`; false when over the limit.
    fn admit(&self, key: (IpAddr, String), now: Instant) -> bool {
        // A panic elsewhere while holding the lock leaves the map usable.
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = |t: &Instant| now.duration_since(*t) < WINDOW;
        // Keep memory bounded: now and then forget senders that went quiet.
        if seen.len() > 10_000 {
            seen.retain(|_, times| times.back().is_some_and(fresh));
        }
        let times = seen.entry(key).or_default();
        while times.front().is_some_and(|t| !fresh(t)) {
            times.pop_front();
        }
        if times.len() >= self.per_minute {
            return false;
        }
        times.push_back(now);
        true
    }
}

impl Hooks for RateLimit {
    fn rcpt(&self, s: &SessionInfo, e: &Envelope, _to: &Address) -> Result<(), Reply> {
        let sender = e.from.to_string().to_lowercase();
        if self.admit((s.peer.ip(), sender.clone()), Instant::now()) {
            Ok(())
        } else {
            log::warn!(
                "[{}] rate limit: <{sender}> from {} is over {} recipients per minute",
                s.id,
                s.peer.ip(),
                self.per_minute
            );
            Err(Reply::new(
                450,
                Enhanced(4, 7, 1),
                format!(
                    "Rate limit exceeded: at most {} recipients per minute, try again later",
                    self.per_minute
                ),
            ))
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let mut args = std::env::args().skip(1);
    let per_minute = match args.next() {
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or(format!("N must be a positive number, not {n:?}"))?,
        None => 10,
    };
    let config_path = PathBuf::from(args.next().unwrap_or("config.toml".into()));
    let config = Config::load(&config_path)?;
    log::info!("at most {per_minute} recipients per sender per minute");
    let server = Server::builder(config)
        .hooks(RateLimit::new(per_minute))
        .build()?;
    let handle = server.handle();
    ctrlc::set_handler(move || handle.shutdown())?;
    server.run()?;
    Ok(())
}
