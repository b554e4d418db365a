//! AUTH in a session (RFC 4954): the SASL exchange itself is pure
//! (`protocol::sasl`); here it meets the session's state, TLS, the per-client rate
//! limit and the authenticator.

use super::{CloseReason, Session, Step, Txn, LOG_TARGET};
use crate::auth::RATE_WINDOW;
use crate::protocol::replies::{self, bad_sequence};
use crate::protocol::sasl::{self, AuthStep, Exchange};

impl Session {
    /// AUTH: only after EHLO, once per session, outside a transaction, and over TLS
    /// unless `allow_plaintext` (RFC 4954 §4).
    pub(super) fn auth_start(&mut self, mechanism: &str, initial: Option<&str>) -> Step {
        if self.settings.auth.is_none() {
            return Step::Reply(bad_sequence("authentication not enabled"));
        }
        if let Some(step) = self.auth_rate_exceeded() {
            return step;
        }
        let Some(auth) = &self.settings.auth else {
            return Step::Reply(bad_sequence("authentication not enabled"));
        };
        if let Some(step) = self.tls_required() {
            return step;
        }
        if self.info.tls.is_none() && !auth.allow_plaintext {
            return Step::Reply(replies::ENCRYPTION_REQUIRED.into());
        }
        if self.info.helo.is_none() || !self.esmtp {
            // AUTH is an ESMTP extension: it exists only after EHLO (RFC 4954 §3).
            return Step::Reply(bad_sequence("send EHLO first"));
        }
        if self.info.auth_user.is_some() {
            return Step::Reply(bad_sequence("already authenticated"));
        }
        if !matches!(self.txn, Txn::Idle) {
            return Step::Reply(bad_sequence("MAIL transaction in progress"));
        }
        self.auth_mechanism = Some(mechanism.to_ascii_uppercase());
        let step = sasl::start(mechanism, initial);
        self.auth_step(step)
    }

    /// 421 4.7.0 and close when this client has failed AUTH `auth.rate_limit` times in
    /// the window (SPEC 4).
    fn auth_rate_exceeded(&mut self) -> Option<Step> {
        let rl = self.guards.auth_rate.as_ref()?;
        let ip = self.info.peer.ip();
        if !rl.blocked(ip) {
            return None;
        }
        log::warn!(
            target: LOG_TARGET,
            "session {}: client {ip}: refused AUTH: too many failed attempts in the last {}s; closing",
            self.info.id,
            RATE_WINDOW.as_secs()
        );
        self.auth = None;
        Some(Step::Close(
            vec![replies::auth_rate_exceeded(&self.settings.hostname)],
            CloseReason::Refused,
        ))
    }

    /// One client line inside the exchange: never a command (RFC 4954 §4).
    pub(super) fn auth_response(&mut self, ex: &Exchange, line: &[u8]) -> Step {
        match std::str::from_utf8(line) {
            Ok(l) => {
                let step = sasl::respond(ex, l);
                self.auth_step(step)
            }
            Err(_) => self.auth_step(AuthStep::Malformed),
        }
    }

    /// Where the exchange stands: a challenge, a refusal, or the credentials checked.
    fn auth_step(&mut self, step: AuthStep) -> Step {
        match step {
            AuthStep::Challenge(c, next) => {
                self.auth = Some(next);
                Step::Reply(replies::challenge(c))
            }
            AuthStep::Cancelled => Step::Reply(replies::AUTH_ABORTED.into()),
            AuthStep::Malformed => Step::Reply(replies::AUTH_UNDECODABLE.into()),
            AuthStep::UnknownMechanism => Step::Reply(replies::AUTH_UNKNOWN_MECHANISM.into()),
            AuthStep::Verify { user, password } => {
                // Checked again here: other sessions of this client may have failed
                // since this exchange began. Nothing is hashed past the limit.
                if let Some(step) = self.auth_rate_exceeded() {
                    return step;
                }
                let ok = match &self.settings.auth {
                    Some(a) => !user.is_empty() && a.authenticator.verify(&user, &password),
                    None => false,
                };
                if ok {
                    // The user name (escaped: it is client input) goes to the log; the
                    // password and the base64 lines never do. A failed attempt logs no
                    // name, since users do type passwords into the name field.
                    log::info!(
                        target: LOG_TARGET,
                        "session {}: authenticated as {user:?}",
                        self.info.id
                    );
                    self.info.auth_user = Some(user);
                    self.info.auth_mechanism = self.auth_mechanism.take();
                    Step::Reply(replies::AUTH_OK.into())
                } else {
                    log::warn!(
                        target: LOG_TARGET,
                        "session {}: client {}: auth failed",
                        self.info.id,
                        self.info.peer.ip()
                    );
                    if let Some(rl) = &self.guards.auth_rate {
                        rl.failed(self.info.peer.ip());
                    }
                    Step::Reply(replies::AUTH_FAILED.into())
                }
            }
        }
    }
}
