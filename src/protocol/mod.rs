//! The SMTP wire protocol as pure functions and types: no sockets, no files.
//!
//! - [`reply`]: server replies (`Reply { code, enhanced, text }`) and their wire form.
//! - `replies`: the catalogue of the replies the server itself sends.
//! - [`command`]: parsing one command line into a typed [`command::Command`].
//! - [`address`]: RFC 5321 §4.1.2 paths and mailboxes.
//! - [`data`]: the DATA reader (dot-unstuffing, end-of-data detection, bare LF policy).
//! - [`trace`]: the trace headers written in front of every stored message.
//! - `sasl`: the AUTH exchange (PLAIN and LOGIN decoding, RFC 4954).

pub mod address;
pub mod command;
pub mod data;
pub mod milter;
pub mod proxy;
pub(crate) mod replies;
pub mod reply;
pub(crate) mod sasl;
pub mod trace;
