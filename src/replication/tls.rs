//! TLS for the replicated log, in one place for the server and its followers: the log server's
//! acceptor (rustls, ring) from PEM files, and the certificates a follower trusts for an
//! `https://` upstream or peer. The configuration readers call these too, so a file that cannot
//! be used is reported when the configuration is checked, not when the first link comes up.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tokio_rustls::TlsAcceptor;

/// A TLS certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, Serialize)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A TLS acceptor for the certificate chain and key in `files` (PEM).
pub fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert_file)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", files.cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", files.cert_file.display()));
    }
    // The error names the file, never its content.
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|e| format!("cannot read a private key from {}: {e}", files.key_file.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "{} and {} do not make a TLS identity: {e}",
                files.cert_file.display(),
                files.key_file.display()
            )
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The certificates of a PEM file, to trust for an `https://` upstream.
pub fn trust(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{} is not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}
