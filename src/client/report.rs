//! The JSON report (SPEC 6).
//!
//! ```json
//! {"status":"ok","deliveryStatus":[{"recipient":"a@x.test","status":"Ok","response":"250 2.0.0 Ok: queued as X"}]}
//! {"status":"error","message":"Error while deliver messages: <cause>"}
//! ```

use super::reply::ServerReply;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The prefix of every error report's message (SPEC 6, kept word for word).
pub const ERROR_PREFIX: &str = "Error while deliver messages: ";

/// What happened to one recipient, by the class of its reply (RFC 5321 §4.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// 2xx: the server took responsibility for the message.
    Ok,
    /// 4xx: try again later.
    TransientError,
    /// 5xx (or anything else that is not a success): do not retry.
    PermanentError,
}

impl Status {
    /// The status a reply code stands for.
    pub fn of(code: u16) -> Status {
        match code / 100 {
            2 => Status::Ok,
            4 => Status::TransientError,
            _ => Status::PermanentError,
        }
    }
}

/// One entry of `deliveryStatus`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryStatus {
    /// The recipient as the job wrote it.
    pub recipient: String,
    /// Delivered, refused for now, or refused for good.
    pub status: Status,
    /// The reply that decided it, lines joined with `\n` (see [`ServerReply::text`]).
    pub response: String,
}

impl DeliveryStatus {
    pub(crate) fn from_reply(recipient: &str, reply: &ServerReply) -> DeliveryStatus {
        DeliveryStatus {
            recipient: recipient.to_string(),
            status: Status::of(reply.code),
            response: reply.text(),
        }
    }
}

/// The outcome of one job: per-recipient results, or why the session failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status")]
pub enum Report {
    /// The session ran to the end; one entry per recipient, in job order.
    #[serde(rename = "ok")]
    Ok {
        /// One entry per recipient, in job order.
        #[serde(rename = "deliveryStatus")]
        delivery_status: Vec<DeliveryStatus>,
    },
    /// The connection or session failed; `message` starts with [`ERROR_PREFIX`].
    #[serde(rename = "error")]
    Error {
        /// What went wrong, starting with [`ERROR_PREFIX`].
        message: String,
    },
}

impl Report {
    /// An error report for `cause`.
    pub fn error(cause: impl fmt::Display) -> Report {
        Report::Error {
            message: format!("{ERROR_PREFIX}{cause}"),
        }
    }

    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        // Serialising strings, enums and vectors of them cannot fail.
        serde_json::to_string(self).expect("a report always serialises")
    }

    /// True for [`Report::Ok`] with every recipient [`Status::Ok`].
    pub fn all_ok(&self) -> bool {
        matches!(self, Report::Ok { delivery_status } if delivery_status.iter().all(|d| d.status == Status::Ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_exactly_spec_6() {
        let r = Report::Ok {
            delivery_status: vec![
                DeliveryStatus {
                    recipient: "a@x.test".into(),
                    status: Status::Ok,
                    response: "250 2.0.0 Ok: queued as X".into(),
                },
                DeliveryStatus {
                    recipient: "b@x.test".into(),
                    status: Status::PermanentError,
                    response: "550-5.1.1 no\n550 5.1.1 such user".into(),
                },
            ],
        };
        assert_eq!(
            r.to_json(),
            r#"{"status":"ok","deliveryStatus":[{"recipient":"a@x.test","status":"Ok","response":"250 2.0.0 Ok: queued as X"},{"recipient":"b@x.test","status":"PermanentError","response":"550-5.1.1 no\n550 5.1.1 such user"}]}"#
        );
        assert_eq!(
            Report::error("timeout").to_json(),
            r#"{"status":"error","message":"Error while deliver messages: timeout"}"#
        );
        let back: Report = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn classes() {
        assert_eq!(Status::of(250), Status::Ok);
        assert_eq!(Status::of(251), Status::Ok);
        assert_eq!(Status::of(452), Status::TransientError);
        assert_eq!(Status::of(552), Status::PermanentError);
        assert_eq!(Status::of(354), Status::PermanentError);
    }
}
