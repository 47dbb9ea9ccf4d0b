//! mTLS: the client-certificate verifier and the peer identity string.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use super::inspect::format_dn;
use super::trust::{read_crls, read_roots};
use super::CertError;

/// A verifier accepting client certificates issued under `ca_bundle` (PEM)
/// and not revoked by `crls` (PEM or DER; certificates they do not cover
/// are accepted; expired CRLs are used, with a warning). `required = false`
/// also lets clients without a certificate in.
pub fn client_verifier(
    ca_bundle: &Path,
    crls: &[PathBuf],
    required: bool,
) -> Result<Arc<dyn ClientCertVerifier>, CertError> {
    let mut roots = RootCertStore::empty();
    for (i, der) in read_roots(ca_bundle)?.into_iter().enumerate() {
        roots.add(der).map_err(|e| CertError::Roots {
            path: ca_bundle.to_owned(),
            message: format!("certificate #{}: unusable as a trust anchor: {e}", i + 1),
        })?;
    }
    let crls = read_crls(crls, SystemTime::now())?;
    let mut builder = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .with_crls(crls.into_iter().map(|(_, der)| der))
    .allow_unknown_revocation_status();
    if !required {
        builder = builder.allow_unauthenticated();
    }
    builder.build().map_err(|e| CertError::ClientVerifier {
        path: ca_bundle.to_owned(),
        message: e.to_string(),
    })
}

/// The subject DN of a (client) certificate as an RFC 4514 string, e.g.
/// `CN=alice,O=Corp`, for audit records and PROXY headers. `None` when the
/// certificate cannot be parsed or its subject is empty.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = super::inspect::parse(cert, Path::new("peer certificate")).ok()?;
    let dn = format_dn(parsed.subject());
    (!dn.is_empty()).then_some(dn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::testpki::{at, Ca, LeafSpec, Pki};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    struct Setup {
        pki: Pki,
        server_chain: Vec<CertificateDer<'static>>,
        server_key: PrivateKeyDer<'static>,
    }

    fn setup() -> Setup {
        let pki = Pki::new();
        let leaf = pki.inter.leaf(LeafSpec::server(&["gw.example.com"]));
        Setup {
            server_chain: vec![leaf.cert.der().clone(), pki.inter.cert.der().clone()],
            server_key: PrivatePkcs8KeyDer::from(leaf.key.serialize_der()).into(),
            pki,
        }
    }

    fn run(
        s: &Setup,
        verifier: Arc<dyn ClientCertVerifier>,
        client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> (Result<(), rustls::Error>, ServerConnection) {
        let server_cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(s.server_chain.clone(), s.server_key.clone_key())
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(s.pki.root.cert.der().clone()).unwrap();
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let client_cfg = match client_cert {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
            None => builder.with_no_client_auth(),
        };
        let mut client = ClientConnection::new(
            Arc::new(client_cfg),
            ServerName::try_from("gw.example.com").unwrap(),
        )
        .unwrap();
        let mut server = ServerConnection::new(Arc::new(server_cfg)).unwrap();
        let r = crate::certs::testpki::handshake(&mut client, &mut server);
        // TLS 1.3: the server judges the client certificate after the
        // client has finished; surface a server-side failure as well.
        let r = r.and_then(|()| {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).unwrap();
            }
            server.process_new_packets().map(|_| ())
        });
        (r, server)
    }

    fn client_cert(
        ca: &Ca,
        cn: &str,
        serial: u64,
        inter: &Ca,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut spec = LeafSpec::client(cn);
        spec.serial = serial;
        let leaf = ca.leaf(spec);
        (
            vec![leaf.cert.der().clone(), inter.cert.der().clone()],
            PrivatePkcs8KeyDer::from(leaf.key.serialize_der()).into(),
        )
    }

    #[test]
    fn required_rejects_anonymous_and_accepts_a_good_certificate() {
        let s = setup();
        let v = client_verifier(&s.pki.roots, &[], true).unwrap();
        let (r, _) = run(&s, v.clone(), None);
        assert!(r.is_err(), "anonymous client must be refused");

        let cert = client_cert(&s.pki.inter, "alice", 501, &s.pki.inter);
        let (r, server) = run(&s, v, Some(cert));
        r.unwrap();
        let peer = &server.peer_certificates().unwrap()[0];
        assert_eq!(peer_identity(peer).as_deref(), Some("CN=alice,O=Corp"));
    }

    #[test]
    fn optional_accepts_anonymous() {
        let s = setup();
        let v = client_verifier(&s.pki.roots, &[], false).unwrap();
        let (r, server) = run(&s, v.clone(), None);
        r.unwrap();
        assert!(server.peer_certificates().is_none());
        // A certificate from an unknown CA is still refused.
        let stranger = Ca::root("Stranger");
        let cert = client_cert(&stranger, "mallory", 9, &stranger);
        let (r, _) = run(&s, v, Some(cert));
        assert!(r.is_err());
    }

    #[test]
    fn revoked_client_certificate_is_rejected() {
        let s = setup();
        let crl = s.pki.write_crl(
            "clients.crl",
            &s.pki.inter,
            &[666],
            (at(2025, 1, 1), at(2099, 1, 1)),
            true,
        );
        let v = client_verifier(&s.pki.roots, std::slice::from_ref(&crl), true).unwrap();
        let revoked = client_cert(&s.pki.inter, "bob", 666, &s.pki.inter);
        let (r, _) = run(&s, v.clone(), Some(revoked));
        assert!(r.is_err(), "revoked certificate accepted");
        let good = client_cert(&s.pki.inter, "carol", 667, &s.pki.inter);
        let (r, _) = run(&s, v, Some(good));
        r.unwrap();
        // Without the CRL the revoked one would have passed.
        let v = client_verifier(&s.pki.roots, &[], true).unwrap();
        let revoked = client_cert(&s.pki.inter, "bob", 666, &s.pki.inter);
        run(&s, v, Some(revoked)).0.unwrap();
    }

    #[test]
    fn bad_inputs_name_the_file() {
        let s = setup();
        let missing = s.pki.dir.join("nope.pem");
        let e = client_verifier(&missing, &[], true).err().unwrap();
        assert!(matches!(e, CertError::Read { .. }), "{e}");
        assert!(e.to_string().contains("nope.pem"), "{e}");
        let empty = s.pki.dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = client_verifier(&empty, &[], true).err().unwrap();
        assert!(matches!(e, CertError::Roots { .. }), "{e}");
        assert_eq!(peer_identity(&CertificateDer::from(vec![1, 2, 3])), None);
    }
}
