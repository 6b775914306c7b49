//! A throw-away CA and a server certificate, generated per test; nothing is stored in the repo.
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Pki {
    /// The CA certificate (PEM), for a client's `ca_file`.
    pub ca: PathBuf,
    /// A TLS server configuration presenting the certificate.
    pub server: Arc<rustls::ServerConfig>,
}

impl Pki {
    /// A CA whose PEM is written to `dir/ca.pem`, and a certificate for `names` it signed.
    pub fn new(dir: &Path, names: &[&str]) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        Pki { ca: ca_path, server: Arc::new(server) }
    }

    /// A CA and a `localhost` certificate.
    pub fn localhost(dir: &Path) -> Pki {
        Pki::new(dir, &["localhost"])
    }
}
