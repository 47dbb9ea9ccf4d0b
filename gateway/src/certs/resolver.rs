//! The rustls certificate resolver over a swappable [`CertSet`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::inspect::{rfc3339, unix_secs};
use super::set::{CertSet, Selection};

/// Chooses the server certificate per handshake from the current
/// [`CertSet`], which [`replace`](Self::replace) swaps atomically (handshakes
/// in flight keep the set they started with).
///
/// A matching certificate that is expired or not yet valid at handshake time
/// is not served: the handshake fails with an alert, `expired_refusals` is
/// counted and an error is logged (at most once per entry per minute).
pub struct CertResolver {
    set: ArcSwap<CertSet>,
    clock: fn() -> SystemTime,
    expired_refusals: AtomicU64,
    no_cert: AtomicU64,
}

impl CertResolver {
    /// A resolver over `set` using the system clock.
    pub fn new(set: CertSet) -> CertResolver {
        CertResolver::with_clock(set, SystemTime::now)
    }

    /// A resolver with an injected clock (tests, simulations).
    pub fn with_clock(set: CertSet, clock: fn() -> SystemTime) -> CertResolver {
        CertResolver {
            set: ArcSwap::from_pointee(set),
            clock,
            expired_refusals: AtomicU64::new(0),
            no_cert: AtomicU64::new(0),
        }
    }

    /// Atomically installs a new set for subsequent handshakes.
    pub fn replace(&self, new_set: CertSet) {
        self.set.store(Arc::new(new_set));
    }

    /// The set currently in use.
    pub fn current(&self) -> Arc<CertSet> {
        self.set.load_full()
    }

    /// Handshakes refused because the chosen certificate was outside its
    /// validity period.
    pub fn expired_refusals(&self) -> u64 {
        self.expired_refusals.load(Ordering::Relaxed)
    }

    /// Handshakes for which no certificate matched (or none could sign
    /// with the client's signature schemes).
    pub fn no_cert(&self) -> u64 {
        self.no_cert.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = self.set.load();
        let names: Vec<&str> = set.entries().iter().map(|e| e.name.as_str()).collect();
        f.debug_struct("CertResolver")
            .field("certificates", &names)
            .field("expired_refusals", &self.expired_refusals())
            .field("no_cert", &self.no_cert())
            .finish()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.set.load();
        let now = unix_secs((self.clock)());
        let server_name = client_hello.server_name();
        match set.select(server_name, client_hello.signature_schemes(), now) {
            Selection::Serve(entry) => Some(entry.key.clone()),
            Selection::Refuse(entry) => {
                self.expired_refusals.fetch_add(1, Ordering::Relaxed);
                if entry.should_log_refusal(now) {
                    let why = if now < entry.not_before {
                        format!("is not valid before {}", rfc3339(entry.not_before))
                    } else {
                        format!("expired at {}", rfc3339(entry.not_after))
                    };
                    tracing::error!(
                        certificate = %entry.name,
                        sni = server_name.unwrap_or(""),
                        "refusing TLS handshake: certificate \"{}\" ({}) {}; replace it (further refusals for it are not logged for 60 s)",
                        entry.name,
                        entry.source.cert.display(),
                        why,
                    );
                }
                None
            }
            Selection::NoMatch => {
                self.no_cert.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::testpki::{at, handshake, KeyKind, LeafSpec, Pki};
    use crate::certs::{load_set, CertSource, TrustConfig};
    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::{
        AlertDescription, ClientConfig, ClientConnection, RootCertStore, ServerConfig,
        ServerConnection,
    };

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn server_config(resolver: Arc<CertResolver>) -> Arc<ServerConfig> {
        Arc::new(
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(resolver),
        )
    }

    fn client_config(pki: &Pki) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(pki.root.cert.der().clone()).unwrap();
        Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    fn connect(
        cfg: &Arc<ClientConfig>,
        server_cfg: &Arc<ServerConfig>,
        sni: &str,
    ) -> (
        Result<(), rustls::Error>,
        ClientConnection,
        ServerConnection,
    ) {
        let name = ServerName::try_from(sni.to_owned()).unwrap();
        let mut client = ClientConnection::new(cfg.clone(), name).unwrap();
        let mut server = ServerConnection::new(server_cfg.clone()).unwrap();
        let r = handshake(&mut client, &mut server);
        (r, client, server)
    }

    fn leaf_of(set: &CertSet, name: &str) -> CertificateDer<'static> {
        set.get(name).unwrap().key.cert[0].clone()
    }

    #[test]
    fn handshake_serves_the_certificate_chosen_by_sni() {
        let pki = Pki::new();
        let mut rsa = LeafSpec::server(&["api.example.com"]);
        rsa.kind = KeyKind::Rsa2048;
        let sources = vec![
            pki.source("api", LeafSpec::server(&["api.example.com"]), &[]),
            pki.source("wild", LeafSpec::server(&["*.example.com"]), &[]),
            pki.source("rsa", rsa, &[]),
        ];
        let set = load_set(&sources, &pki.trust(&[]), SystemTime::now()).unwrap();
        let resolver = Arc::new(CertResolver::new(set));
        let server_cfg = server_config(resolver.clone());
        let client_cfg = client_config(&pki);
        let current = resolver.current();

        for (sni, want) in [("api.example.com", "api"), ("www.example.com", "wild")] {
            let (r, client, server) = connect(&client_cfg, &server_cfg, sni);
            r.unwrap();
            assert_eq!(server.server_name(), Some(sni));
            let seen = &client.peer_certificates().unwrap()[0];
            assert_eq!(seen, &leaf_of(&current, want), "{sni}");
            // The chain includes the intermediate.
            assert_eq!(client.peer_certificates().unwrap().len(), 2);
        }
        // Unknown names get the default; the client then rejects the name.
        let (r, _, _) = connect(&client_cfg, &server_cfg, "elsewhere.test");
        assert!(
            matches!(r, Err(rustls::Error::InvalidCertificate(_))),
            "{r:?}"
        );
        assert_eq!(resolver.expired_refusals(), 0);
        assert_eq!(resolver.no_cert(), 0);

        // Replacing the set changes what new handshakes get.
        let only_wild = load_set(&sources[1..2], &pki.trust(&[]), SystemTime::now()).unwrap();
        let wild_leaf = leaf_of(&only_wild, "wild");
        resolver.replace(only_wild);
        // A fresh client: a resumed session would skip certificate selection.
        let (r, client, _) = connect(&client_config(&pki), &server_cfg, "api.example.com");
        r.unwrap();
        assert_eq!(client.peer_certificates().unwrap()[0], wild_leaf);
        // The previously obtained set is untouched.
        assert_eq!(current.entries().len(), 3);
    }

    fn year_2031() -> SystemTime {
        at(2031, 1, 1)
    }

    fn year_2029() -> SystemTime {
        at(2029, 1, 1)
    }

    #[test]
    fn entry_expired_after_load_is_refused_with_an_alert_and_counted() {
        let pki = Pki::new();
        let mut spec = LeafSpec::server(&["api.example.com"]);
        spec.validity = (at(2020, 1, 1), at(2030, 1, 1));
        let src: CertSource = pki.source("api", spec, &[]);
        let load = || {
            load_set(
                std::slice::from_ref(&src),
                &TrustConfig::default(),
                at(2025, 1, 1),
            )
            .unwrap()
        };

        // Valid at handshake time: selected (the client's own clock would
        // reject a 2029 view, so only check resolution here).
        let resolver = Arc::new(CertResolver::with_clock(load(), year_2029));
        let (_, client, _) = connect(
            &client_config(&pki),
            &server_config(resolver.clone()),
            "api.example.com",
        );
        assert_eq!(client.peer_certificates().map(|c| c.len()), Some(2));
        assert_eq!(resolver.expired_refusals(), 0);

        // Expired at handshake time: the server refuses with an alert.
        let resolver = Arc::new(CertResolver::with_clock(load(), year_2031));
        let server_cfg = server_config(resolver.clone());
        for _ in 0..3 {
            let (r, client, _) = connect(&client_config(&pki), &server_cfg, "api.example.com");
            assert!(
                matches!(
                    r,
                    Err(rustls::Error::AlertReceived(AlertDescription::AccessDenied))
                ),
                "{r:?}"
            );
            assert!(client.peer_certificates().is_none());
        }
        assert_eq!(resolver.expired_refusals(), 3);
        assert_eq!(resolver.no_cert(), 0);
        assert!(format!("{resolver:?}").contains("expired_refusals: 3"));
    }

    #[test]
    fn no_usable_certificate_counts_no_cert() {
        let pki = Pki::new();
        let mut spec = LeafSpec::server(&["api.example.com"]);
        spec.kind = KeyKind::Ed25519;
        let set = load_set(
            &[pki.source("ed", spec, &[])],
            &pki.trust(&[]),
            SystemTime::now(),
        )
        .unwrap();
        let resolver = Arc::new(CertResolver::new(set));
        // A client that offers only ECDSA signature schemes.
        let mut p = rustls::crypto::aws_lc_rs::default_provider();
        let ecdsa_only: Vec<_> = p
            .signature_verification_algorithms
            .mapping
            .iter()
            .filter(|(s, _)| {
                matches!(
                    s,
                    rustls::SignatureScheme::ECDSA_NISTP256_SHA256
                        | rustls::SignatureScheme::ECDSA_NISTP384_SHA384
                )
            })
            .copied()
            .collect();
        p.signature_verification_algorithms.mapping = Vec::leak(ecdsa_only);
        let mut roots = RootCertStore::empty();
        roots.add(pki.root.cert.der().clone()).unwrap();
        let client_cfg = Arc::new(
            ClientConfig::builder_with_provider(Arc::new(p))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let (r, _, _) = connect(
            &client_cfg,
            &server_config(resolver.clone()),
            "api.example.com",
        );
        assert!(r.is_err());
        assert_eq!(resolver.no_cert(), 1);
        assert_eq!(resolver.expired_refusals(), 0);
    }
}
