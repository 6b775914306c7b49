//! rustls client configuration shared by the syslog, webhook and HEC sinks: the operator's CA
//! bundle (or the system roots), and an optional client certificate for mutual TLS.
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::policy::TlsOptions;

/// `sink` names the sink in errors.
pub fn client_config(sink: &str, s: &TlsOptions) -> Result<Arc<ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match &s.ca_file {
        Some(ca) => {
            for c in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("read ca_file {}", ca.display()))?
            {
                roots.add(c.with_context(|| format!("parse ca_file {}", ca.display()))?)?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
        }
    }
    if roots.is_empty() {
        bail!("sink {sink}: no CA certificates (set ca_file)");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let cfg = match &s.client_auth {
        Some(c) => builder.with_client_auth_cert(certs(&c.cert)?, key_of(&c.key)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .with_context(|| format!("read {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse {}", path.display()))
}

fn key_of(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("read private key {}", path.display()))
}

pub fn server_name(s: &TlsOptions, host: &str) -> Result<ServerName<'static>> {
    let name = s
        .server_name
        .clone()
        .unwrap_or_else(|| host.trim_start_matches('[').trim_end_matches(']').to_string());
    ServerName::try_from(name.clone()).with_context(|| format!("invalid TLS server name {name:?}"))
}
