//! SMTP AUTH (RFC 4954) as a pure exchange: the PLAIN (RFC 4616) and LOGIN
//! mechanisms decoded line by line into the next step, with no I/O and no password
//! store. The session drives it; the check of the credentials is behind
//! [`Authenticator`] (the argon2 store is [`crate::auth::Users`]).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// Checks a user name and password.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub trait Authenticator: Send + Sync {
    fn verify(&self, user: &str, password: &[u8]) -> bool;
}

/// Where an AUTH exchange stands between client lines.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum Exchange {
    /// `AUTH PLAIN` without initial response: waiting for it after `334 `.
    Plain,
    /// `AUTH LOGIN`: waiting for the user name.
    LoginUser,
    /// `AUTH LOGIN`: waiting for the password of this user.
    LoginPassword(String),
}

/// The next move in an AUTH exchange.
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum AuthStep {
    /// Send `334 <challenge>` and wait for the next line in this state.
    Challenge(&'static str, Exchange),
    /// Credentials complete: verify them.
    Verify { user: String, password: Vec<u8> },
    /// The client sent `*` (RFC 4954 §4).
    Cancelled,
    /// Not base64, or not the shape the mechanism needs.
    Malformed,
    /// Not PLAIN or LOGIN.
    UnknownMechanism,
}

/// Base64 "Username:" and "Password:" (the LOGIN convention).
const USERNAME: &str = "VXNlcm5hbWU6";
const PASSWORD: &str = "UGFzc3dvcmQ6";

/// Starts an exchange for `AUTH <mechanism> [initial]`.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub fn start(mechanism: &str, initial: Option<&str>) -> AuthStep {
    match (mechanism, initial) {
        ("PLAIN", None) => AuthStep::Challenge("", Exchange::Plain),
        ("PLAIN", Some(r)) => respond(&Exchange::Plain, r),
        ("LOGIN", None) => AuthStep::Challenge(USERNAME, Exchange::LoginUser),
        ("LOGIN", Some(r)) => respond(&Exchange::LoginUser, r),
        _ => AuthStep::UnknownMechanism,
    }
}

/// Continues an exchange with one client line.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub fn respond(state: &Exchange, line: &str) -> AuthStep {
    let line = line.trim();
    if line == "*" {
        return AuthStep::Cancelled;
    }
    // RFC 4954 §4: "=" is an empty initial response.
    let decoded = if line == "=" {
        Vec::new()
    } else {
        match B64.decode(line) {
            Ok(d) => d,
            Err(_) => return AuthStep::Malformed,
        }
    };
    match state {
        Exchange::Plain => {
            // authzid NUL authcid NUL passwd (RFC 4616 §2)
            let mut parts = decoded.splitn(3, |&b| b == 0);
            let (Some(authz), Some(user), Some(pass)) = (parts.next(), parts.next(), parts.next())
            else {
                return AuthStep::Malformed;
            };
            let Ok(user) = String::from_utf8(user.to_vec()) else {
                return AuthStep::Malformed;
            };
            if !authz.is_empty() && authz != user.as_bytes() {
                // Acting for another identity is not supported: treat as bad credentials.
                return AuthStep::Verify {
                    user: String::new(),
                    password: Vec::new(),
                };
            }
            AuthStep::Verify {
                user,
                password: pass.to_vec(),
            }
        }
        Exchange::LoginUser => match String::from_utf8(decoded) {
            Ok(u) => AuthStep::Challenge(PASSWORD, Exchange::LoginPassword(u)),
            Err(_) => AuthStep::Malformed,
        },
        Exchange::LoginPassword(u) => AuthStep::Verify {
            user: u.clone(),
            password: decoded,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_initial_response() {
        let r = B64.encode(b"\0alice\0secret");
        assert_eq!(
            start("PLAIN", Some(&r)),
            AuthStep::Verify {
                user: "alice".into(),
                password: b"secret".to_vec()
            }
        );
        assert_eq!(
            start("PLAIN", None),
            AuthStep::Challenge("", Exchange::Plain)
        );
        assert_eq!(respond(&Exchange::Plain, "*"), AuthStep::Cancelled);
        assert_eq!(
            respond(&Exchange::Plain, "!!notbase64"),
            AuthStep::Malformed
        );
        assert_eq!(
            respond(&Exchange::Plain, &B64.encode(b"nonul")),
            AuthStep::Malformed
        );
    }

    #[test]
    fn login_exchange() {
        let AuthStep::Challenge(c, st) = start("LOGIN", None) else {
            panic!()
        };
        assert_eq!(B64.decode(c).unwrap(), b"Username:");
        let AuthStep::Challenge(c, st) = respond(&st, &B64.encode("bob")) else {
            panic!()
        };
        assert_eq!(B64.decode(c).unwrap(), b"Password:");
        assert_eq!(
            respond(&st, &B64.encode("pw")),
            AuthStep::Verify {
                user: "bob".into(),
                password: b"pw".to_vec()
            }
        );
        assert_eq!(start("CRAM-MD5", None), AuthStep::UnknownMechanism);
    }
}
