//! `mailer`: a mail-receiving SMTP server with a durable Maildir spool, and a small
//! SMTP client. No async runtime: a fixed pool of threads runs blocking sessions.
//!
//! The public API is what an embedder needs (the README's Library section shows it in
//! use):
//!
//! - [`Server`], built from a [`Config`] by a [`ServerBuilder`] and stopped through its
//!   [`Handle`]; [`StatsSnapshot`] is what the handle reports.
//! - [`hooks`]: the session events an embedder may refuse or watch, with [`Reply`] and
//!   [`Enhanced`] (RFC 3463) for the answer and [`protocol::address`] for the typed
//!   RFC 5321 paths; [`prelude`] gathers the usual names.
//! - [`Router`] and [`Mailbox`]: where accepted recipients are delivered.
//! - [`client`]: sending one message (`mailer send`), with a reply parser of its own.
//! - [`hash_password`]: the argon2id hashes `[auth] users` holds (RFC 9106).
//! - [`cli`]: the `mailer` command line, which the binary only calls.
//!
//! Inside, the protocol core is sans-IO (parsing, replies, the DATA reader and the
//! session state machine never touch a socket or a file); the edges drive it over
//! sockets, TLS and the Maildir spool. Those modules are crate-private; the `testing`
//! feature opens them, and adds the `testing` module's in-memory scaffolding, for
//! this crate's own tests and fuzz targets only.
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
/// them at their usual paths. Inside them an item is `pub(crate)` unless the tests
/// use it; those few are `pub` and carry
/// `cfg_attr(not(feature = "testing"), allow(unreachable_pub))`.
macro_rules! internal {
    ($($(#[$attr:meta])* $name:ident;)*) => {$(
        $(#[$attr])*
        #[cfg(feature = "testing")]
        #[doc(hidden)]
        pub mod $name;
        $(#[$attr])*
        #[cfg(not(feature = "testing"))]
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
    stats;
    tls;
}

mod stream;

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
