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
#![warn(missing_docs, unreachable_pub)]

/// Declares internal modules: crate-private in a normal build; public but hidden from
/// the docs with the `testing` feature, so this crate's tests and fuzz targets reach
/// them at their usual paths. Their `pub` items are that testing surface, which is why
/// `unreachable_pub` is allowed on them in a normal build.
macro_rules! internal {
    ($($(#[$attr:meta])* $name:ident;)*) => {$(
        $(#[$attr])*
        #[cfg(feature = "testing")]
        #[doc(hidden)]
        pub mod $name;
        $(#[$attr])*
        #[cfg(not(feature = "testing"))]
        #[allow(unreachable_pub)]
        pub(crate) mod $name;
    )*};
}

pub mod client;
pub mod config;
pub mod hooks;
pub mod protocol;
pub mod server;

internal! {
    auth;
    // The in-memory runner (`testing`) is the only user of a few driver pieces.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    connection;
    delivery;
    logfmt;
    logsafe;
    mailboxes;
    metrics;
    milter;
    preflight;
    session;
    spool;
    // `StatsSnapshot` (re-exported below) is public; some of its fields still lack docs.
    #[allow(missing_docs)]
    stats;
    tls;
}

pub mod cli;
pub mod prelude;
#[cfg(feature = "testing")]
pub mod testing;

pub use auth::hash_password;
pub use config::Config;
pub use delivery::{Mailbox, Router};
pub use protocol::reply::{Enhanced, Reply};
pub use server::{Handle, Server, ServerBuilder, ServerError};
pub use stats::StatsSnapshot;
