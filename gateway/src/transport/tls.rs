//! TLS material for the TLS and QUIC listeners: the configured certificate
//! chain and key (PEM files), or in development mode a self-signed
//! certificate generated at start. Production mode refuses to run TLS or
//! QUIC without a configured certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// TLS or QUIC is enabled in production mode without a certificate.
    #[error("TLS/QUIC listeners need tls_cert and tls_key outside development mode")]
    NoCertificate,
    /// Only one of certificate and key is configured.
    #[error("tls_cert and tls_key must be configured together")]
    HalfConfigured,
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The PEM file holds no usable certificate or key.
    #[error("{0} holds no usable PEM item")]
    Empty(String),
    /// rustls or rcgen refused the material.
    #[error("TLS configuration failed: {0}")]
    Invalid(String),
}

/// The certificate chain and key both TLS listeners use.
#[derive(Debug)]
pub struct TlsMaterial {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// True if generated at start (development mode).
    pub self_signed: bool,
}

impl TlsMaterial {
    /// Loads the configured files, or generates a self-signed certificate
    /// for `localhost`/`127.0.0.1` in development mode.
    pub fn load_or_generate(
        cert: Option<&Path>,
        key: Option<&Path>,
        dev_mode: bool,
    ) -> Result<Self, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => Self::load(cert, key),
            (None, None) if dev_mode => Self::self_signed(),
            (None, None) => Err(TlsError::NoCertificate),
            _ => Err(TlsError::HalfConfigured),
        }
    }

    fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let cert_pem = read(cert)?;
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
            .collect::<Result<_, _>>()
            .map_err(|source| TlsError::Read {
                path: cert.display().to_string(),
                source,
            })?;
        if chain.is_empty() {
            return Err(TlsError::Empty(cert.display().to_string()));
        }
        let key_pem = read(key)?;
        let key_der = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|source| TlsError::Read {
                path: key.display().to_string(),
                source,
            })?
            .ok_or_else(|| TlsError::Empty(key.display().to_string()))?;
        Ok(Self {
            chain,
            key: key_der,
            self_signed: false,
        })
    }

    fn self_signed() -> Result<Self, TlsError> {
        let generated = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .map_err(|e| TlsError::Invalid(e.to_string()))?;
        tracing::warn!(
            "development mode: no TLS certificate configured, using a self-signed one for localhost"
        );
        Ok(Self {
            chain: vec![generated.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                generated.signing_key.serialize_der(),
            )),
            self_signed: true,
        })
    }

    /// A rustls server configuration over this material (TLS 1.2 and 1.3;
    /// QUIC takes the same configuration and uses 1.3).
    ///
    /// Reconnecting clients resume their TLS session: the server hands out
    /// stateless tickets (encrypted under keys rotated every 6 hours, held
    /// by this process), so a phone back from a short sleep skips the
    /// certificate and its signature, and the server keeps no per-client
    /// state for it (the default stateful cache holds 256 sessions, far
    /// fewer than a gateway's clients). A ticket from another gateway
    /// process does not decrypt here: that client gets a full handshake.
    /// Early data (0-RTT) stays refused (`max_early_data_size` 0): see
    /// docs/architecture.md.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        install_ring_provider();
        let mut provider = rustls::crypto::ring::default_provider();
        prefer_sha256_suites(&mut provider.cipher_suites);
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        config.ticketer =
            rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::Invalid(e.to_string()))?;
        config.max_early_data_size = 0;
        // Our order, not the client's: rustls clients (the SDK among
        // them) put AES-256-GCM-SHA384 first.
        config.ignore_client_order = true;
        // The TCP listener's record layer takes the traffic keys over from
        // rustls once the handshake is done (`transport::tls_record`);
        // QUIC's configuration turns this off again.
        config.enable_secret_extraction = true;
        Ok(Arc::new(config))
    }
}

/// Puts the cipher suites whose handshake hash is SHA-256 before the
/// SHA-384 ones (AES-256-GCM), keeping the provider's order otherwise:
/// TLS 1.3 AES-128-GCM first. Every key a handshake derives (a QUIC one
/// derives some forty) is an HKDF over the suite's hash, and this CPU runs
/// SHA-256 in hardware but SHA-384 in software: with AES-256-GCM-SHA384,
/// SHA-512 blocks were 7% of a QUIC handshake's server CPU. AES-128 keeps
/// a 128-bit security level, the one X25519 and P-256 give anyway.
fn prefer_sha256_suites(suites: &mut [rustls::SupportedCipherSuite]) {
    use rustls::CipherSuite::{
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS13_AES_256_GCM_SHA384,
    };
    suites.sort_by_key(|suite| {
        matches!(
            suite.suite(),
            TLS13_AES_256_GCM_SHA384
                | TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                | TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        )
    });
}

/// Installs ring as the process's rustls provider (once; "already
/// installed" is fine).
pub fn install_ring_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
