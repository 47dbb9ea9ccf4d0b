//! The rustls client configuration for TLS to the backend ("double TLS"):
//! trust roots, an optional client certificate, and an explicit, loudly
//! logged opt-out of certificate verification.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::tls::{load_chain, load_key, CertError};

/// Settings for TLS to the backend (the `backend.tls` section).
#[derive(Debug, Clone, Default)]
pub struct UpstreamTlsSettings {
    /// PEM bundle of the CAs trusted for the backend's certificate.
    /// Required unless `insecure`.
    pub ca: Option<PathBuf>,
    /// The name checked against the backend's certificate and sent as SNI.
    pub server_name: String,
    /// PEM client certificate chain presented to the backend (with `key`).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Accept any backend certificate (handshake signatures are still checked).
    pub insecure: bool,
    /// ALPN protocols offered to the backend; none by default.
    pub alpn: Vec<Vec<u8>>,
}

/// Problems building the backend TLS client. Messages name the key or file.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("backend.tls.ca is required unless backend.tls.insecure = true")]
    CaRequired,
    #[error("backend.tls.ca file {path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error(
        "backend.tls.cert and backend.tls.key must be given together (cert: {cert}, key: {key})"
    )]
    CertKeyPair { cert: String, key: String },
    #[error("backend.tls client certificate: {0}")]
    ClientCert(#[from] CertError),
    #[error("backend.tls.server_name \"{name}\": {message}")]
    ServerName { name: String, message: String },
    #[error("backend.tls: {0}")]
    Rustls(String),
}

/// The name to verify and send as SNI (a DNS name or an IP address).
pub fn server_name(s: &UpstreamTlsSettings) -> Result<ServerName<'static>, UpstreamError> {
    let err = |message: String| UpstreamError::ServerName {
        name: s.server_name.clone(),
        message,
    };
    if s.server_name.is_empty() {
        return Err(err("must not be empty".into()));
    }
    ServerName::try_from(s.server_name.clone()).map_err(|e| err(e.to_string()))
}

/// Builds the client configuration for connections to the backend.
/// Secret extraction is enabled (keys go to kernel TLS); resumption is the
/// rustls default.
pub fn client_config(
    s: &UpstreamTlsSettings,
    versions: &[&'static rustls::SupportedProtocolVersion],
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>, UpstreamError> {
    server_name(s)?;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| UpstreamError::Rustls(e.to_string()))?;
    let builder = if s.insecure {
        tracing::warn!(
            server_name = %s.server_name,
            "backend TLS verification DISABLED for {}: any certificate is accepted \
             (backend.tls.insecure = true); do not use this in production",
            s.server_name
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert { provider }))
    } else {
        let path = s.ca.as_deref().ok_or(UpstreamError::CaRequired)?;
        builder.with_root_certificates(load_roots(path)?)
    };
    let mut cfg = match (&s.cert, &s.key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = load_chain(cert)?;
            let key_der = load_key(key)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => CertError::Mismatch {
                        cert: cert.clone(),
                        key: key.clone(),
                        message: e.to_string(),
                    },
                    other => CertError::Key {
                        path: key.clone(),
                        message: format!("unusable key: {other}"),
                    },
                })?
        }
        (cert, key) => {
            let show = |p: &Option<PathBuf>| {
                p.as_ref()
                    .map_or_else(|| "not set".to_owned(), |p| p.display().to_string())
            };
            return Err(UpstreamError::CertKeyPair {
                cert: show(cert),
                key: show(key),
            });
        }
    };
    cfg.enable_secret_extraction = true;
    cfg.alpn_protocols = s.alpn.clone();
    Ok(Arc::new(cfg))
}

/// Reads the trusted CA bundle.
fn load_roots(path: &Path) -> Result<RootCertStore, UpstreamError> {
    let err = |message: String| UpstreamError::Ca {
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(err(format!(
            "none of the {ignored} certificates is a usable trust anchor"
        )));
    }
    if ignored > 0 {
        tracing::warn!(path = %path.display(), ignored, "backend.tls.ca: some certificates were ignored");
    }
    Ok(roots)
}

/// Accepts any server certificate but still checks that the handshake was
/// signed by the certificate's key, with the provider's algorithms.
#[derive(Debug)]
struct AcceptAnyCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCert {
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use rustls::pki_types::PrivateKeyDer;
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConnection, ServerConfig, ServerConnection};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn ca(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// (cert DER, key DER, cert PEM, key PEM)
    fn leaf(
        ca: &Ca,
        name: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> (
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
        String,
        String,
    ) {
        let mut p = CertificateParams::new(vec![name.to_owned()]).unwrap();
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca.issuer).unwrap();
        let key_der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (cert.der().clone(), key_der, cert.pem(), key.serialize_pem())
    }

    fn temp_file(contents: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("gw-upstream-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("f{}.pem", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&p, contents).unwrap();
        p
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn server(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
        client_ca: Option<&Ca>,
    ) -> Arc<ServerConfig> {
        let b = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .unwrap();
        let b = match client_ca {
            None => b.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
                    .unwrap();
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .unwrap();
                b.with_client_cert_verifier(v)
            }
        };
        Arc::new(b.with_single_cert(vec![cert], key).unwrap())
    }

    /// Runs an in-memory handshake; returns the server side on success.
    fn handshake(
        client: Arc<ClientConfig>,
        name: ServerName<'static>,
        server: Arc<ServerConfig>,
    ) -> Result<ServerConnection, rustls::Error> {
        let mut c = ClientConnection::new(client, name)?;
        let mut s = ServerConnection::new(server)?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                // Flush the client's last flight (client certificate case).
                let mut buf = Vec::new();
                while c.wants_write() {
                    c.write_tls(&mut buf).unwrap();
                }
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    s.read_tls(&mut rd).unwrap();
                }
                s.process_new_packets()?;
                return Ok(s);
            }
        }
        panic!("handshake did not finish");
    }

    fn settings(ca: Option<PathBuf>, name: &str) -> UpstreamTlsSettings {
        UpstreamTlsSettings {
            ca,
            server_name: name.into(),
            ..Default::default()
        }
    }

    fn build(s: &UpstreamTlsSettings) -> Result<Arc<ClientConfig>, UpstreamError> {
        client_config(s, rustls::DEFAULT_VERSIONS, provider())
    }

    #[test]
    fn trusted_ca_and_right_name_succeeds() {
        let ca = ca("backend CA");
        let (cert, key, _, _) = leaf(&ca, "backend.test", ExtendedKeyUsagePurpose::ServerAuth);
        let s = settings(Some(temp_file(&ca.pem)), "backend.test");
        let cfg = build(&s).unwrap();
        assert!(cfg.enable_secret_extraction);
        assert!(cfg.alpn_protocols.is_empty());
        handshake(cfg, server_name(&s).unwrap(), server(cert, key, None)).unwrap();
    }

    #[test]
    fn wrong_name_fails() {
        let ca = ca("backend CA");
        let (cert, key, _, _) = leaf(&ca, "backend.test", ExtendedKeyUsagePurpose::ServerAuth);
        let s = settings(Some(temp_file(&ca.pem)), "other.test");
        let e = handshake(
            build(&s).unwrap(),
            server_name(&s).unwrap(),
            server(cert, key, None),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. }
                ) | rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
            ),
            "{e:?}"
        );
    }

    #[test]
    fn untrusted_ca_fails_unless_insecure() {
        let real = ca("backend CA");
        let other = ca("someone else");
        let (cert, key, _, _) = leaf(&real, "backend.test", ExtendedKeyUsagePurpose::ServerAuth);
        let s = settings(Some(temp_file(&other.pem)), "backend.test");
        let e = handshake(
            build(&s).unwrap(),
            server_name(&s).unwrap(),
            server(cert.clone(), key.clone_key(), None),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{e:?}"
        );

        let insecure = UpstreamTlsSettings {
            insecure: true,
            ..settings(None, "backend.test")
        };
        handshake(
            build(&insecure).unwrap(),
            server_name(&insecure).unwrap(),
            server(cert, key, None),
        )
        .unwrap();
    }

    #[test]
    fn client_certificate_is_presented() {
        let server_ca = ca("backend CA");
        let client_ca = ca("gateway client CA");
        let (cert, key, _, _) = leaf(
            &server_ca,
            "backend.test",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_der, _, client_pem, client_key_pem) = leaf(
            &client_ca,
            "gateway.test",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let srv = server(cert, key, Some(&client_ca));

        // Without a client certificate, the server refuses.
        let s = settings(Some(temp_file(&server_ca.pem)), "backend.test");
        assert!(handshake(build(&s).unwrap(), server_name(&s).unwrap(), srv.clone()).is_err());

        let s = UpstreamTlsSettings {
            cert: Some(temp_file(&client_pem)),
            key: Some(temp_file(&client_key_pem)),
            ..s
        };
        let conn = handshake(build(&s).unwrap(), server_name(&s).unwrap(), srv).unwrap();
        let presented = conn.peer_certificates().unwrap();
        assert_eq!(presented[0], client_der);
    }

    #[test]
    fn configuration_errors_name_the_key_or_file() {
        let e = build(&settings(None, "backend.test"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend.tls.ca"), "{e}");

        let missing = PathBuf::from("/nonexistent/ca.pem");
        let e = build(&settings(Some(missing), "backend.test"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/ca.pem") && e.contains("backend.tls.ca"),
            "{e}"
        );

        let empty = temp_file("not a pem\n");
        let e = build(&settings(Some(empty.clone()), "backend.test"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&empty.display().to_string()), "{e}");

        let ca = ca("backend CA");
        let only_cert = UpstreamTlsSettings {
            cert: Some(PathBuf::from("/etc/client.pem")),
            ..settings(Some(temp_file(&ca.pem)), "backend.test")
        };
        let e = build(&only_cert).unwrap_err().to_string();
        assert!(
            e.contains("/etc/client.pem") && e.contains("backend.tls.key"),
            "{e}"
        );

        // A key that does not belong to the certificate.
        let (_, _, cert_pem, _) = leaf(&ca, "a.test", ExtendedKeyUsagePurpose::ClientAuth);
        let (_, _, _, other_key_pem) = leaf(&ca, "b.test", ExtendedKeyUsagePurpose::ClientAuth);
        let mismatch = UpstreamTlsSettings {
            cert: Some(temp_file(&cert_pem)),
            key: Some(temp_file(&other_key_pem)),
            ..settings(Some(temp_file(&ca.pem)), "backend.test")
        };
        let e = build(&mismatch).unwrap_err();
        assert!(
            matches!(e, UpstreamError::ClientCert(CertError::Mismatch { .. })),
            "{e}"
        );

        let e = build(&settings(Some(temp_file(&ca.pem)), "bad name!"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend.tls.server_name"), "{e}");
    }

    #[test]
    fn ip_server_name_is_accepted() {
        let s = settings(None, "192.0.2.7");
        assert!(matches!(server_name(&s).unwrap(), ServerName::IpAddress(_)));
    }
}
