//! TLS for the second listener: a certificate and key from PEM files, or a self-signed one
//! generated at start for development. ALPN offers `h2` then `http/1.1`, so browsers
//! multiplex every SSE stream and WebSocket of a page over one connection instead of
//! stalling at six per origin.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig as RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, ConfigError, parse_listen};

/// Where TLS is served when configured without `tls_listen` (SPEC §12).
pub const DEFAULT_TLS_LISTEN: &str = "127.0.0.1:8443";

/// The TLS settings the listener is given (`net::tls` runs the connections on them).
pub use crate::net::tls::Acceptor;

/// The TLS listener's address and settings, when the config asks for TLS.
pub fn from_config(config: &Config) -> Result<Option<(SocketAddr, Acceptor)>, ConfigError> {
    let s = &config.server;
    let chain = match (&s.tls_cert, &s.tls_key, s.tls_self_signed) {
        (None, None, false) => {
            if s.tls_listen.is_some() {
                return Err(ConfigError::Invalid(
                    "server.tls_listen needs tls_cert and tls_key, or tls_self_signed = true"
                        .into(),
                ));
            }
            return Ok(None);
        }
        (Some(cert), Some(key), false) => load(cert, key)?,
        (None, None, true) => self_signed()?,
        (_, _, true) => {
            return Err(ConfigError::Invalid(
                "server: tls_self_signed and tls_cert/tls_key exclude each other".into(),
            ));
        }
        _ => {
            return Err(ConfigError::Invalid(
                "server: tls_cert and tls_key go together".into(),
            ));
        }
    };
    let listen = s.tls_listen.as_deref().unwrap_or(DEFAULT_TLS_LISTEN);
    let addr = parse_listen(listen).ok_or_else(|| {
        ConfigError::Invalid(format!("server.tls_listen = {listen:?} is not an address"))
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = RustlsConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Invalid(format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain.0, chain.1)
        .map_err(|e| {
            ConfigError::Invalid(format!("the TLS certificate and key do not fit: {e}"))
        })?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some((addr, Arc::new(tls))))
}

type Chain = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn load(cert: &Path, key: &Path) -> Result<Chain, ConfigError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| ConfigError::Read {
            path: p.to_owned(),
            source,
        })
    };
    let certs = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::Invalid(format!("server.tls_cert = {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "server.tls_cert = {}: no certificate in it",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| ConfigError::Invalid(format!("server.tls_key = {}: {e}", key.display())))?;
    Ok((certs, key))
}

/// A certificate for localhost, 127.0.0.1 and ::1, valid for this run only.
pub fn self_signed() -> Result<Chain, ConfigError> {
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let cert = rcgen::generate_simple_self_signed(names)
        .map_err(|e| ConfigError::Invalid(format!("generating a self-signed certificate: {e}")))?;
    let key = PrivateKeyDer::try_from(cert.signing_key.serialize_der())
        .map_err(|e| ConfigError::Invalid(format!("self-signed key: {e}")))?;
    Ok((vec![cert.cert.der().clone()], key))
}
