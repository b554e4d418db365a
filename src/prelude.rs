//! The names a hook author usually needs, in one `use`:
//!
//! ```
//! use mailer::prelude::*;
//!
//! struct RefuseNullSender;
//! impl Hooks for RefuseNullSender {
//!     fn mail(&self, _: &SessionInfo, from: &ReversePath, _: &MailParams) -> Result<(), Reply> {
//!         match from {
//!             // RFC 5321 §4.5.5: the null reverse-path marks a bounce.
//!             ReversePath::Null => Err(Reply::new(550, Enhanced(5, 7, 1), "No bounces here")),
//!             ReversePath::Mailbox(_) => Ok(()),
//!         }
//!     }
//! }
//! let _server = Server::builder(Config::default()).hooks(RefuseNullSender);
//! ```

pub use crate::hooks::{
    Content, DataVerdict, Envelope, Header, Hooks, MailParams, SessionError, SessionInfo,
};
pub use crate::protocol::address::{Address, ReversePath};
pub use crate::{Config, Enhanced, Reply, Server};
