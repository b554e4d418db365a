//! SMTP AUTH (RFC 4954): the PLAIN (RFC 4616) and LOGIN exchanges as a pure state
//! machine, and argon2id password verification behind the [`Authenticator`] trait.

use crate::config::{AuthConfig, User};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Condvar, Mutex};

/// Checks a user name and password.
pub trait Authenticator: Send + Sync {
    fn verify(&self, user: &str, password: &[u8]) -> bool;
}

/// A bad `[auth]` section.
#[derive(Debug)]
pub enum AuthError {
    /// The user's `password_hash` is not an argon2 PHC string.
    BadHash {
        user: String,
        reason: String,
    },
    DuplicateUser(String),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::BadHash { user, reason } => write!(
                f,
                "auth.users: password_hash of user {user:?} is not an argon2 PHC string ({reason}); make one with `mailer hash-password`"
            ),
            AuthError::DuplicateUser(u) => write!(f, "auth.users: user {u:?} appears twice"),
        }
    }
}

impl std::error::Error for AuthError {}

/// The `[auth] users` table, verified with argon2.
pub struct Users {
    hashes: HashMap<String, String>,
    /// Verified when the user is unknown, so timing does not reveal who exists.
    dummy: String,
    /// Bounds concurrent argon2 runs so an AUTH flood cannot take every core.
    gate: Gate,
}

impl Users {
    pub fn from_config(cfg: &AuthConfig) -> Result<Users, AuthError> {
        let mut hashes = HashMap::new();
        for User {
            name,
            password_hash,
        } in &cfg.users
        {
            check_hash(password_hash).map_err(|reason| AuthError::BadHash {
                user: name.clone(),
                reason,
            })?;
            if hashes.insert(name.clone(), password_hash.clone()).is_some() {
                return Err(AuthError::DuplicateUser(name.clone()));
            }
        }
        // Same parameters as real hashes made by `hash-password` (argon2 defaults).
        let dummy = hash_password(b"no such user").unwrap_or_default();
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Users {
            hashes,
            dummy,
            gate: Gate::new(cores),
        })
    }
}

impl Authenticator for Users {
    fn verify(&self, user: &str, password: &[u8]) -> bool {
        let (stored, known) = match self.hashes.get(user) {
            Some(h) => (h.as_str(), true),
            None => (self.dummy.as_str(), false),
        };
        let _permit = self.gate.enter();
        let ok = PasswordHash::new(stored)
            .map(|h| Argon2::default().verify_password(password, &h).is_ok())
            .unwrap_or(false);
        ok && known
    }
}

/// A PHC string that argon2 can verify: any other scheme (or broken parameters) would
/// make the user unable to log in without a word, so it is a config error instead.
/// Upper bounds of a configured hash's argon2 parameters: memory in KiB (2 GiB),
/// passes, lanes.
const MAX_M_COST_KIB: u32 = 2 * 1024 * 1024;
const MAX_T_COST: u32 = 64;
const MAX_P_COST: u32 = 64;

fn check_hash(phc: &str) -> Result<(), String> {
    let h = PasswordHash::new(phc).map_err(|e| e.to_string())?;
    argon2::Algorithm::try_from(h.algorithm)
        .map_err(|_| format!("algorithm {:?} is not argon2", h.algorithm.as_str()))?;
    let p = argon2::Params::try_from(&h).map_err(|e| format!("bad parameters: {e}"))?;
    // Invariant 12: every AUTH runs this hash, so its cost is a size and a duration
    // like any other. RFC 9106 §4 recommends at most 2 GiB and a few passes; beyond,
    // a typo in a hash would let each AUTH take the host's memory or minutes of CPU.
    if p.m_cost() > MAX_M_COST_KIB || p.t_cost() > MAX_T_COST || p.p_cost() > MAX_P_COST {
        return Err(format!(
            "parameters over the bounds (m <= {MAX_M_COST_KIB}, t <= {MAX_T_COST}, \
             p <= {MAX_P_COST})"
        ));
    }
    if h.hash.is_none() {
        return Err("no hash value".into());
    }
    Ok(())
}

/// An argon2id PHC string for `password` with a random salt.
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    let mut salt_bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut salt_bytes)
        .map_err(|_| "no system randomness".to_string())?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A counting semaphore.
struct Gate {
    free: Mutex<usize>,
    cv: Condvar,
}

struct Permit<'a>(&'a Gate);

impl Gate {
    fn new(n: usize) -> Gate {
        Gate {
            free: Mutex::new(n.max(1)),
            cv: Condvar::new(),
        }
    }
    fn enter(&self) -> Permit<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.cv.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.cv.notify_one();
    }
}

/// Where an AUTH exchange stands between client lines.
#[derive(Clone, Debug, PartialEq, Eq)]
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

    #[test]
    fn argon2_users_verify() {
        let hash = hash_password(b"s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let cfg = AuthConfig {
            allow_plaintext: false,
            users: vec![User {
                name: "alice".into(),
                password_hash: hash,
            }],
        };
        let users = Users::from_config(&cfg).unwrap();
        assert!(users.verify("alice", b"s3cret"));
        assert!(!users.verify("alice", b"wrong"));
        assert!(!users.verify("mallory", b"s3cret"));
        let bad = AuthConfig {
            allow_plaintext: false,
            users: vec![User {
                name: "eve".into(),
                password_hash: "plain".into(),
            }],
        };
        let e = Users::from_config(&bad).err().unwrap().to_string();
        assert!(e.contains("eve"), "{e}");
    }

    #[test]
    fn only_verifiable_argon2_hashes_are_accepted() {
        let users = |hash: &str| AuthConfig {
            allow_plaintext: false,
            users: vec![User {
                name: "eve".into(),
                password_hash: hash.into(),
            }],
        };
        for bad in [
            // A PHC string of another scheme: argon2 could never verify it.
            "$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
            // argon2id without the hash value.
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ",
            // Memory below the argon2 minimum.
            "$argon2id$v=19$m=1,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
            // Over the bounds (invariant 12): 4 GiB, 1000 passes, 100 lanes.
            "$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=19456,t=1000,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=19456,t=2,p=100$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        ] {
            let e = Users::from_config(&users(bad))
                .err()
                .expect(bad)
                .to_string();
            assert!(e.contains("\"eve\""), "{e}");
        }
        let good = hash_password(b"pw").unwrap();
        assert!(Users::from_config(&users(&good)).is_ok());
    }
}
