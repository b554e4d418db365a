//! TLS with rustls (ring provider): certificate loading, reload when the files change,
//! and the server side of the [`Stream`] that sessions run over (RFC 3207, RFC 8314).

use crate::hooks::TlsInfo;
pub(crate) use crate::stream::Stream;
use crate::stream::Upgrade;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, ServerConnection};
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// A certificate or key that cannot be used.
#[derive(Debug)]
pub enum TlsError {
    /// A file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        err: io::Error,
    },
    /// The certificate file holds no certificate.
    NoCertificate(PathBuf),
    /// The key file holds no private key.
    NoKey(PathBuf),
    /// A file is not valid PEM.
    BadPem {
        /// The file.
        path: PathBuf,
        /// The PEM parser's error.
        err: String,
    },
    /// The key does not belong to the certificate, or is of an unsupported type.
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        err: String,
    },
    /// rustls refused the resulting configuration.
    Config(String),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, err } => write!(f, "tls: cannot read {}: {err}", path.display()),
            TlsError::NoCertificate(p) => write!(f, "tls.cert: no certificate in {}", p.display()),
            TlsError::NoKey(p) => write!(f, "tls.key: no private key in {}", p.display()),
            TlsError::BadPem { path, err } => {
                write!(f, "tls: bad PEM in {}: {err}", path.display())
            }
            TlsError::Mismatch { cert, key, err } => write!(
                f,
                "tls: key {} does not fit certificate {}: {err}",
                key.display(),
                cert.display()
            ),
            TlsError::Config(e) => write!(f, "tls: {e}"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Read { err, .. } => Some(err),
            _ => None,
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a PEM chain and key (PKCS#8, PKCS#1 or SEC1; RSA, ECDSA, Ed25519) and checks
/// that they belong together.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|err| TlsError::Read {
            path: p.to_path_buf(),
            err,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: cert.to_path_buf(),
            err: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_path_buf()));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey(key.to_path_buf()),
        other => TlsError::BadPem {
            path: key.to_path_buf(),
            err: other.to_string(),
        },
    })?;
    let ck =
        CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| TlsError::Mismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            err: e.to_string(),
        })?;
    // from_der lets an unknown consistency pass; insist on a real match.
    ck.keys_match().map_err(|e| TlsError::Mismatch {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        err: e.to_string(),
    })?;
    Ok(ck)
}

/// Serves the current certificate; a watcher swaps it when the files change.
#[derive(Debug)]
pub(crate) struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
    /// The files as they were when `current` was first loaded.
    loaded: Fingerprint,
    cert: PathBuf,
    key: PathBuf,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

/// What the watcher compares: a hash of each file's bytes (`None` when unreadable).
/// Contents, not mtime and size: file-system timestamps are coarse (a few ms on
/// Linux), so a pair replaced soon after the last load can keep both, and a renewed
/// certificate usually has the same size.
type Fingerprint = (Option<u64>, Option<u64>);

fn fingerprint(cert: &Path, key: &Path) -> Fingerprint {
    let hash = |p: &Path| {
        std::fs::read(p).ok().map(|bytes| {
            let mut h = DefaultHasher::new();
            bytes.hash(&mut h);
            h.finish()
        })
    };
    (hash(cert), hash(key))
}

impl Reloading {
    /// Reads the certificate and key files again (SIGHUP), without installing them.
    pub(crate) fn load_files(&self) -> Result<CertifiedKey, TlsError> {
        load_certified_key(&self.cert, &self.key)
    }

    /// Serves `ck` from the next handshake on.
    pub(crate) fn install(&self, ck: CertifiedKey) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
        log::info!("tls: reloaded certificate {}", self.cert.display());
    }

    /// Polls the files every `every`; a broken new pair is logged and the old stays.
    /// The watcher ends when `stop` is set.
    pub(crate) fn watch(self: &Arc<Self>, every: Duration, stop: Arc<AtomicBool>) {
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("tls-reload".into())
            .spawn(move || {
                let mut seen = me.loaded;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    let now = fingerprint(&me.cert, &me.key);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    match load_certified_key(&me.cert, &me.key) {
                        Ok(ck) => {
                            *me.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
                            log::info!("tls: reloaded certificate {}", me.cert.display());
                        }
                        Err(e) => {
                            log::error!("tls: reload failed, keeping the old certificate: {e}")
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("tls: cannot start the reload watcher: {e}");
        }
    }
}

/// Builds the server TLS config (TLS 1.2 and 1.3 only) with a reloading resolver.
pub(crate) fn server_config(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<ServerConfig>, Arc<Reloading>), TlsError> {
    // Taken before the load: a change in between is then seen by the first poll.
    let loaded = fingerprint(cert, key);
    let ck = load_certified_key(cert, key)?;
    let resolver = Arc::new(Reloading {
        current: RwLock::new(Arc::new(ck)),
        loaded,
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
    });
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    Ok((Arc::new(cfg), resolver))
}

/// The server side of a [`Stream`]: a TLS session from the server configuration.
impl Upgrade for Arc<ServerConfig> {
    type Conn = ServerConnection;
    type Side = rustls::server::ServerConnectionData;
    fn connection(self, _tcp: &TcpStream) -> io::Result<ServerConnection> {
        ServerConnection::new(self).map_err(io::Error::other)
    }
}

impl Stream<Arc<ServerConfig>> {
    /// An implicit-TLS connection (RFC 8314): the handshake before anything else,
    /// bounded by `timeout`, which also stays the socket's read and write timeout.
    pub(crate) fn accept_tls(
        tcp: TcpStream,
        cfg: Arc<ServerConfig>,
        timeout: Duration,
    ) -> io::Result<(Self, TlsInfo)> {
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        let mut s = Stream::plain(tcp, Some(cfg));
        let info = s.handshake(timeout)?;
        Ok((s, info))
    }
}
