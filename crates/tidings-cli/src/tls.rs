//! TLS for the client commands (`subscribe`, `publish`, `bench`): which certificates to trust
//! for `https://` and `wss://`, and a readable reason when a server's certificate is refused.
//!
//! One rustls configuration serves every way the CLI opens a connection (reqwest for HTTP,
//! tungstenite for `/ws`, the bench's raw sockets), so `--ca-file` and `--insecure` mean the
//! same everywhere. The crypto provider is named explicitly (aws-lc, like the server's TLS)
//! rather than taken from a process-wide default: reqwest links ring as its fallback for
//! clients built without a configuration, so two providers are linked and rustls would refuse
//! to guess between them.
//!
//! Trust: the system's roots by default; `--ca-file` replaces them with the certificates in
//! one PEM file (as `curl --cacert` does), which is how a private CA or a self-signed server
//! certificate is trusted; `--insecure` accepts any certificate (the connection is encrypted
//! but nobody is authenticated) and must be asked for by name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// `--ca-file` and `--insecure`, shared by every command that connects to a server.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM file with the CA certificate(s) to trust for https:// and wss:// URLs, instead of
    /// the system's (a private CA, or a self-signed server's own certificate).
    #[arg(
        long,
        value_name = "PEM",
        env = "TIDINGS_CA_FILE",
        conflicts_with = "insecure"
    )]
    pub ca_file: Option<PathBuf>,
    /// Accept any server certificate over https:// and wss:// (self-signed test servers).
    /// The connection is still encrypted, but the server is not authenticated.
    #[arg(long)]
    pub insecure: bool,
}

/// ALPN for clients that speak HTTP/1.1 only (a WebSocket upgrade, the bench's sockets).
pub const HTTP1: &[&[u8]] = &[b"http/1.1"];
/// ALPN for reqwest, which speaks both.
pub const HTTP1_AND_H2: &[&[u8]] = &[b"h2", b"http/1.1"];

impl TlsArgs {
    /// A client configuration offering `alpn`, trusting what the flags say.
    pub fn client_config(&self, alpn: &[&[u8]]) -> anyhow::Result<ClientConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("setting up TLS")?;
        let mut config = if self.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                .with_no_client_auth()
        } else {
            let roots = match &self.ca_file {
                Some(path) => roots_from_file(path)?,
                None => system_roots(),
            };
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

fn roots_from_file(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("--ca-file {}: cannot read it", path.display()))?;
    for cert in certs {
        let cert = cert
            .with_context(|| format!("--ca-file {}: not a PEM certificate file", path.display()))?;
        roots.add(cert).with_context(|| {
            format!(
                "--ca-file {}: a certificate in it is not valid",
                path.display()
            )
        })?;
    }
    if roots.is_empty() {
        bail!(
            "--ca-file {}: holds no certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(roots)
}

/// The operating system's trusted roots. A system without any is not an error here: the
/// handshake then fails with "unknown issuer", and [`explain`] points at `--ca-file`.
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs);
    roots
}

/// `--insecure`: every certificate is accepted, but the handshake's signatures are still
/// checked against the certificate presented, so the session is at least with its holder.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
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

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// When `err` (anywhere in its chain) is a refused server certificate: what was wrong with it
/// and what to do. `None` for every other failure.
pub fn explain(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    match rustls_error(err)? {
        rustls::Error::InvalidCertificate(why) => Some(format!(
            "the server's TLS certificate was not accepted ({}); pass --ca-file with the \
             certificate of the CA that signed it (or the server's own, if it is self-signed), \
             or --insecure to skip the check",
            describe(why)
        )),
        _ => None,
    }
}

/// The rustls error somewhere in `err`'s chain. io::Error's `source()` skips the error it
/// wraps (and reqwest nests one io::Error in another), so those are opened by hand.
fn rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(found) = err.downcast_ref::<rustls::Error>() {
        return Some(found);
    }
    if let Some(inner) = err
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        && let Some(found) = rustls_error(inner)
    {
        return Some(found);
    }
    rustls_error(err.source()?)
}

fn describe(why: &rustls::CertificateError) -> String {
    use rustls::CertificateError as E;
    match why {
        E::UnknownIssuer => "it is not signed by a trusted CA: unknown issuer".to_owned(),
        E::Expired | E::ExpiredContext { .. } => "it has expired".to_owned(),
        E::NotValidYet | E::NotValidYetContext { .. } => "it is not valid yet".to_owned(),
        E::NotValidForName | E::NotValidForNameContext { .. } => {
            "it was issued for another host name".to_owned()
        }
        // webpki's own reasons arrive as `Other`; the one a hand-made certificate hits most:
        other if format!("{other:?}").contains("CaUsedAsEndEntity") => {
            "it is a CA certificate (basicConstraints CA:TRUE), which cannot name a server"
                .to_owned()
        }
        other => format!("{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_its_name() {
        let dir = tidings_testkit::TempDir::new("tls-ca");
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = Path::new(dir.path()).join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = TlsArgs {
            ca_file: Some(path.clone()),
            insecure: false,
        }
        .client_config(HTTP1)
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("empty.pem") && text.contains("no certificate"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_ca_file_is_named_in_the_error() {
        let err = TlsArgs {
            ca_file: Some("/nonexistent/ca.pem".into()),
            insecure: false,
        }
        .client_config(HTTP1)
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/ca.pem"),
            "{err:#}"
        );
    }

    #[test]
    fn an_unknown_issuer_inside_an_io_error_is_explained() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let text = explain(&io).unwrap();
        assert!(
            text.contains("unknown issuer") && text.contains("--ca-file"),
            "{text}"
        );
        assert!(explain(&std::io::Error::other("reset")).is_none());
    }
}
