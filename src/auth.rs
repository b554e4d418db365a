//! The server side of SMTP AUTH beyond the exchange itself: the `[auth] users` store
//! (argon2id, RFC 9106) behind [`Authenticator`], and the limiter of failed attempts
//! per client. The PLAIN/LOGIN decoding lives in `protocol/sasl.rs`.

use crate::config::{AuthConfig, User};
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub use crate::protocol::sasl::Authenticator;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A bad `[auth]` section.
#[derive(Debug)]
pub enum AuthError {
    /// The user's `password_hash` is not an argon2 PHC string.
    BadHash {
        /// The account.
        user: String,
        /// What the PHC parser said.
        reason: String,
    },
    /// Two accounts with one name.
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
pub(crate) struct Users {
    hashes: HashMap<String, String>,
    /// Verified when the user is unknown, so timing does not reveal who exists.
    dummy: String,
    /// Bounds concurrent argon2 runs so an AUTH flood cannot take every core.
    gate: Gate,
}

impl Users {
    pub(crate) fn from_config(cfg: &AuthConfig) -> Result<Users, AuthError> {
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

/// The window in which failed AUTH attempts are counted.
pub(crate) const RATE_WINDOW: Duration = Duration::from_secs(60);

/// How many client addresses the rate limiter remembers. Past this, the address whose
/// last failure is oldest is forgotten, so a flood of addresses cannot grow memory.
const RATE_MAX_CLIENTS: usize = 10_000;

/// Counts failed AUTH attempts per client address (an IPv6 client per prefix, as for
/// the per-IP connection limit) in a sliding window of [`RATE_WINDOW`]. Shared by all
/// sessions; the check comes before any password hashing, so a client past the limit
/// costs no argon2 run.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub struct RateLimit {
    limit: usize,
    ipv6_prefix: u8,
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl RateLimit {
    /// `limit` failures per window (at least 1); IPv6 addresses grouped by `ipv6_prefix`.
    pub(crate) fn new(limit: u32, ipv6_prefix: u8) -> RateLimit {
        RateLimit {
            limit: (limit as usize).max(1),
            ipv6_prefix,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// True when `ip` has used up its failed attempts in the current window.
    pub(crate) fn blocked(&self, ip: IpAddr) -> bool {
        self.blocked_at(ip, Instant::now())
    }

    fn blocked_at(&self, ip: IpAddr, now: Instant) -> bool {
        let key = crate::server::client_key(ip, self.ipv6_prefix);
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let Some(q) = map.get_mut(&key) else {
            return false;
        };
        expire(q, now);
        if q.is_empty() {
            map.remove(&key);
            return false;
        }
        q.len() >= self.limit
    }

    /// Records one failed attempt by `ip`; returns the failures in the window so far.
    pub(crate) fn failed(&self, ip: IpAddr) -> usize {
        self.failed_at(ip, Instant::now())
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) -> usize {
        let key = crate::server::client_key(ip, self.ipv6_prefix);
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(&key) && map.len() >= RATE_MAX_CLIENTS {
            map.retain(|_, q| {
                expire(q, now);
                !q.is_empty()
            });
            if map.len() >= RATE_MAX_CLIENTS {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, q)| q.back().copied())
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    map.remove(&k);
                }
            }
        }
        let q = map.entry(key).or_default();
        expire(q, now);
        q.push_back(now);
        // Only the newest `limit` failures matter for the decision.
        while q.len() > self.limit {
            q.pop_front();
        }
        q.len()
    }
}

fn expire(q: &mut VecDeque<Instant>, now: Instant) {
    while q
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= RATE_WINDOW)
    {
        q.pop_front();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_counts_failures_per_address_in_a_sliding_window() {
        let rl = RateLimit::new(3, 64);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for n in 1..=3 {
            assert!(!rl.blocked_at(a, t0));
            assert_eq!(rl.failed_at(a, t0), n);
        }
        assert!(rl.blocked_at(a, t0));
        assert!(!rl.blocked_at(b, t0), "another address is not affected");
        // The same /64 is one client; another /64 is not.
        let v6a: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:0:1::2".parse().unwrap();
        let v6c: IpAddr = "2001:db8:0:2::1".parse().unwrap();
        for _ in 0..3 {
            rl.failed_at(v6a, t0);
        }
        assert!(rl.blocked_at(v6b, t0));
        assert!(!rl.blocked_at(v6c, t0));
        // A failure leaves the window after 60 s.
        assert!(!rl.blocked_at(a, t0 + RATE_WINDOW));
        assert_eq!(rl.failed_at(a, t0 + RATE_WINDOW), 1);
    }

    #[test]
    fn rate_limit_memory_is_bounded() {
        let rl = RateLimit::new(1, 64);
        let now = Instant::now();
        for i in 0..(RATE_MAX_CLIENTS as u32 + 50) {
            rl.failed_at(IpAddr::from(i.to_be_bytes()), now);
        }
        let len = rl.failures.lock().unwrap().len();
        assert_eq!(len, RATE_MAX_CLIENTS);
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
            ..AuthConfig::default()
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
            ..AuthConfig::default()
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
            ..AuthConfig::default()
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
