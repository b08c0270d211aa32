//! TLS for the listeners. Two crypto providers are compiled in (ring through tonic, aws-lc-rs
//! through the object-store client), and with two rustls refuses to pick one itself, so locus
//! picks ring before the first TLS configuration of the process.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::Error;

/// Makes ring the process's TLS crypto provider, unless one is already chosen.
pub fn choose_provider() {
    // An error only means a provider was installed first, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An HTTP/1.1 server configuration from a PEM certificate chain (leaf first) and its key, with
/// an error that says which of the two is wrong.
pub fn http_server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::ServerConfig>, Error> {
    choose_provider();
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid(format!("TLS certificate (--tls-cert): {e}")))?;
    if certs.is_empty() {
        return Err(Error::Invalid(
            "TLS certificate (--tls-cert): no PEM `CERTIFICATE` block in it".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| Error::Invalid(format!("TLS key (--tls-key): {e}")))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            Error::Invalid(format!(
                "TLS certificate and key (--tls-cert, --tls-key): {e}"
            ))
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_certificate_or_key_is_named() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
        assert!(http_server_config(cert_pem.as_bytes(), key_pem.as_bytes()).is_ok());
        let junk = http_server_config(b"not a certificate", key_pem.as_bytes()).unwrap_err();
        assert!(junk.to_string().contains("--tls-cert"), "{junk}");
        let keyless = http_server_config(cert_pem.as_bytes(), b"no key here").unwrap_err();
        assert!(keyless.to_string().contains("--tls-key"), "{keyless}");
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let mismatch = http_server_config(
            cert_pem.as_bytes(),
            other.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap_err();
        assert!(mismatch.to_string().contains("--tls-key"), "{mismatch}");
    }
}
