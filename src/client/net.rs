//! The client's edges: DNS with a deadline, TCP connect with a timeout, and rustls
//! (ring provider, TLS 1.2/1.3) for STARTTLS with webpki roots, a private CA file, or
//! no certificate verification at all.

use super::job::{Job, StartTls};
use super::SendError;
use crate::stream::{Stream, Upgrade};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_name, WebPkiServerVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// How to run a handshake when the server says 220 to STARTTLS.
pub(crate) struct TlsSetup {
    config: Arc<ClientConfig>,
    /// The name to verify (and send as SNI); `None`: the host is not a valid DNS name
    /// and verification is off, so the peer's IP address stands in.
    name: Option<ServerName<'static>>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any certificate chain (`tls_verify: false`) but still checks that the
/// handshake is signed by the key in the certificate presented, with the provider's
/// algorithms: an attacker must at least hold the key of the certificate it shows.
#[derive(Debug)]
pub struct AnyCertificate(Arc<CryptoProvider>);

impl AnyCertificate {
    /// The verifier for self-signed test servers, with the ring provider.
    pub fn new() -> Arc<AnyCertificate> {
        Arc::new(AnyCertificate(provider()))
    }
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The roots to trust: the job's CA file (instead of the public roots, as curl's
/// `--cacert`), else the Mozilla roots from webpki-roots. Also returns the
/// certificates of the CA file themselves: a server certificate equal to one of them
/// is trusted as it is (a self-signed server certificate named in `ca_file`).
fn roots(job: &Job) -> Result<(RootCertStore, Vec<CertificateDer<'static>>), SendError> {
    let mut roots = RootCertStore::empty();
    let Some(path) = &job.ca_file else {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok((roots, Vec::new()));
    };
    let ca_err = |err: String| SendError::CaFile {
        path: path.clone(),
        err,
    };
    let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
    let mut pinned = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| ca_err(e.to_string()))?;
        // A certificate webpki cannot take as a trust anchor may still be pinned.
        let _ = roots.add(cert.clone());
        pinned.push(cert);
    }
    if pinned.is_empty() {
        return Err(ca_err("no certificate in the file".into()));
    }
    Ok((roots, pinned))
}

/// Verification with the two exceptions SPEC 6 asks for:
/// - a server certificate byte-for-byte equal to one in `ca_file` is trusted as it
///   is, whatever its CA flag (webpki refuses a CA certificate as an end entity,
///   `CaUsedAsEndEntity`, which is what `openssl req -x509` makes), once the name
///   matches, as curl's `--cacert` does;
/// - with `starttls: TRY` a failed verification does not stop the delivery
///   (opportunistic TLS, RFC 7435 section 4; Postfix's `may` level): the session goes
///   on encrypted and the reason is logged.
///
/// The handshake signature is always checked against the certificate's key.
#[derive(Debug)]
struct Checked {
    inner: Arc<WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
    opportunistic: bool,
}

impl ServerCertVerifier for Checked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .or_else(|e| {
                if self
                    .pinned
                    .iter()
                    .any(|p| p.as_ref() == end_entity.as_ref())
                {
                    let parsed = ParsedCertificate::try_from(end_entity)?;
                    verify_server_name(&parsed, server_name)?;
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(e)
                }
            });
        match verdict {
            Err(e) if self.opportunistic => {
                log::warn!(
                    "client: the server certificate was not verified ({e}); going on \
                     encrypted without authentication (starttls TRY)"
                );
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    // The handshake signatures are checked exactly as the WebPKI verifier checks them,
    // with the same provider's algorithms.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Builds the TLS client settings for `job` (before connecting, so that a bad CA file
/// fails without touching the network).
pub(crate) fn tls_setup(job: &Job) -> Result<TlsSetup, SendError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| SendError::Tls(e.to_string()))?;
    let config = if job.tls_verify {
        let (roots, pinned) = roots(job)?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .map_err(|e| SendError::Tls(e.to_string()))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Checked {
                inner,
                pinned,
                opportunistic: job.starttls == StartTls::Try,
            }))
            .with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    };
    let host = job.host_name();
    let name = match host.parse::<IpAddr>() {
        Ok(ip) => Some(ServerName::IpAddress(ip.into())),
        Err(_) => match ServerName::try_from(host.to_string()) {
            Ok(n) => Some(n),
            Err(e) if job.tls_verify && job.starttls != StartTls::Try => {
                return Err(SendError::Tls(format!(
                    "{host:?} cannot be checked against a certificate: {e}"
                )))
            }
            Err(_) => None,
        },
    };
    Ok(TlsSetup {
        config: Arc::new(config),
        name,
    })
}

/// Resolves `host` within `timeout`. std has no resolver timeout, so the lookup runs
/// on a helper thread; on timeout it is left to finish (or fail) on its own.
fn resolve(host: &str, port: u16, timeout: Duration) -> Result<Vec<SocketAddr>, SendError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let (tx, rx) = mpsc::channel();
    let name = host.to_string();
    let resolve_err = |err: String| SendError::Resolve {
        host: host.to_string(),
        err,
    };
    std::thread::Builder::new()
        .name("mailer-dns".into())
        .spawn(move || {
            let res = (name.as_str(), port)
                .to_socket_addrs()
                .map(|a| a.collect::<Vec<_>>());
            // The receiver may have given up waiting; then nobody needs the answer.
            let _ = tx.send(res);
        })
        .map_err(|e| resolve_err(e.to_string()))?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
        Ok(Ok(_)) => Err(resolve_err("no addresses".into())),
        Ok(Err(e)) => Err(resolve_err(e.to_string())),
        Err(_) => Err(SendError::Timeout {
            step: format!("the address of {host}"),
            after: timeout,
        }),
    }
}

/// Connects to the first address of the host that answers, each attempt bounded by
/// the job's timeout (as Postfix's smtp_connect_timeout is per address).
pub(crate) fn connect(job: &Job, tls: Option<TlsSetup>) -> Result<NetStream, SendError> {
    let timeout = job.connection_timeout;
    let addrs = resolve(job.host_name(), job.port, timeout)?;
    let mut errors = Vec::new();
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(tcp) => {
                let set = tcp.set_write_timeout(Some(timeout));
                if let Err(err) = set {
                    errors.push((addr, err));
                    continue;
                }
                log::debug!("client: connected to {addr}");
                return Ok(Stream::plain(tcp, tls));
            }
            Err(err) => errors.push((addr, err)),
        }
    }
    Err(SendError::Connect { errors })
}

/// The client side of a [`Stream`]: a TLS session for the job's server name, or for
/// the peer's address when the host is not a DNS name (verification is off then).
impl Upgrade for TlsSetup {
    type Conn = ClientConnection;
    type Side = rustls::client::ClientConnectionData;
    fn connection(self, tcp: &TcpStream) -> io::Result<ClientConnection> {
        let name = match self.name {
            Some(n) => n,
            None => ServerName::IpAddress(tcp.peer_addr()?.ip().into()),
        };
        ClientConnection::new(self.config, name).map_err(io::Error::other)
    }
}

/// The client's stream: clear text, or TLS after STARTTLS.
pub(crate) type NetStream = Stream<TlsSetup>;
