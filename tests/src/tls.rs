//! A self-signed certificate for the names a test serves, written as PEM files that
//! Envoy loads, and trusted by the test's own client.

use std::path::PathBuf;

use crate::temp_dir;

pub struct TestCert {
    /// The certificate (PEM), also what a client trusts.
    pub cert_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    dir: PathBuf,
}

impl TestCert {
    pub fn new(names: &[&str]) -> Self {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let made = rcgen::generate_simple_self_signed(names).expect("make a certificate");
        let dir = temp_dir("tls");
        let cert_pem = made.cert.pem();
        let cert_path = dir.join("tls.crt");
        let key_path = dir.join("tls.key");
        std::fs::write(&cert_path, &cert_pem).expect("write certificate");
        std::fs::write(&key_path, made.signing_key.serialize_pem()).expect("write key");
        Self {
            cert_pem,
            cert_path,
            key_path,
            dir,
        }
    }

    /// A client that trusts this certificate (and nothing else) and sends the given
    /// names to 127.0.0.1:`port`.
    pub fn client(&self, names: &[&str], port: u16) -> reqwest::Client {
        self.client_builder(names, port).build().expect("client")
    }

    /// The same, to set more before building it (HTTP/1 only, say).
    pub fn client_builder(&self, names: &[&str], port: u16) -> reqwest::ClientBuilder {
        let root = reqwest::Certificate::from_pem(self.cert_pem.as_bytes()).expect("PEM");
        let mut builder = reqwest::Client::builder()
            .tls_certs_only([root])
            .timeout(std::time::Duration::from_secs(10));
        for name in names {
            builder = builder.resolve(name, std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        }
        builder
    }
}

impl TestCert {
    /// A TLS acceptor serving this certificate, HTTP/1.1 by ALPN.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = vec![CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).expect("PEM")];
        let key = PrivateKeyDer::from_pem_file(&self.key_path).expect("key PEM");
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("certificate and key");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
    }
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
