//! TLS to Redis (`rediss://`): by default fred trusts the system's CAs; a
//! Redis behind a private CA is trusted through `[cluster] tls_ca_file`.

use std::io;
use std::path::Path;

use fred::types::config::TlsConnector;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// A TLS connector that trusts exactly the CA certificates in the PEM file
/// at `path` (and checks Redis's host name against its certificate).
pub(super) fn trusting(path: &Path) -> io::Result<TlsConnector> {
    let invalid = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cluster.tls_ca_file `{}`: {why}", path.display()),
        )
    };
    let mut roots = rustls::RootCertStore::empty();
    let certificates = CertificateDer::pem_file_iter(path).map_err(|e| invalid(e.to_string()))?;
    for certificate in certificates {
        let certificate = certificate.map_err(|e| invalid(e.to_string()))?;
        roots.add(certificate).map_err(|e| invalid(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(invalid("no certificate in it".into()));
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(config))
}
