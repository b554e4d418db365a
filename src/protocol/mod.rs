//! The SMTP wire protocol as pure functions and types: no sockets, no files.
//!
//! - `reply`: server replies (`Reply { code, enhanced, text }`) and their wire form.
//! - `replies`: the catalogue of the replies the server itself sends.
//! - `command`: parsing one command line into a typed `Command`.
//! - [`address`]: RFC 5321 §4.1.2 paths and mailboxes.
//! - `data`: the DATA reader (dot-unstuffing, end-of-data detection, bare LF policy).
//! - `trace`: the trace headers written in front of every stored message.
//! - `sasl`: the AUTH exchange (PLAIN and LOGIN decoding, RFC 4954).

pub mod address;
pub(crate) mod replies;

internal! {
    command;
    data;
    milter;
    proxy;
    reply;
    sasl;
    trace;
}
