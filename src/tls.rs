//! The TLS crypto provider. Two are compiled in (ring through tonic, aws-lc-rs through the
//! object-store client), and with two rustls refuses to pick one itself, so locus picks ring
//! before the first TLS configuration of the process.

/// Makes ring the process's TLS crypto provider, unless one is already chosen.
pub fn choose_provider() {
    // An error only means a provider was installed first, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
