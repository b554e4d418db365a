//! `mailer`: a mail-receiving SMTP server with a durable Maildir spool, and a small
//! SMTP client. No async runtime: a fixed pool of threads runs blocking sessions.
//!
//! The core is sans-IO: [`protocol`] (parsing, replies, the DATA reader) and
//! [`session`] (the state machine) never touch a socket or a file. The edges are
//! [`connection`] (drives a session over a stream), [`server`] (listeners, pool,
//! shutdown), [`tls`], [`spool`] and [`client`].
//!
//! ```no_run
//! use mailer::{Config, Server, hooks::{Hooks, SessionInfo}, Reply};
//! use mailer::protocol::address::Address;
//! use mailer::hooks::Envelope;
//!
//! struct OnlyAlice;
//! impl Hooks for OnlyAlice {
//!     fn rcpt(&self, _: &SessionInfo, _: &Envelope, to: &Address) -> Result<(), Reply> {
//!         if to.local_part() == "alice" { Ok(()) } else {
//!             Err(Reply::new(550, mailer::Enhanced(5, 1, 1), "No such user"))
//!         }
//!     }
//! }
//!
//! let server = Server::builder(Config::default()).hooks(OnlyAlice).build()?;
//! let handle = server.handle();
//! std::thread::spawn(move || { std::thread::sleep(std::time::Duration::from_secs(5)); handle.shutdown() });
//! server.run()?;
//! # Ok::<(), mailer::server::ServerError>(())
//! ```

#![forbid(unsafe_code)]
// Every `pub` item is reachable from outside the crate, or says `pub(crate)`/`pub(super)`
// (issue 14). Test builds are left out only because spool.rs's test-only probe module
// still has `pub` items; drop the `cfg_attr` once they are `pub(super)`.
#![cfg_attr(not(test), warn(unreachable_pub))]

pub mod auth;
pub mod client;
pub mod config;
pub mod connection;
pub mod delivery;
pub mod hooks;
pub mod logfmt;
pub mod logsafe;
pub mod mailboxes;
pub mod metrics;
pub mod milter;
pub mod preflight;
pub mod protocol;
pub mod server;
pub mod session;
pub mod spool;
pub mod stats;
mod stream;
pub mod tls;

pub use config::Config;
pub use protocol::reply::{Enhanced, Reply};
pub use server::{Handle, Server};
