//! The TLS material that can change while the gateway runs: certificates,
//! CRLs, client CA bundles and session-ticket keys.
//!
//! A reload (SIGHUP, a file change, or an admin upload) validates the new
//! material for every listener as a whole, and only when all of it is good
//! swaps it in: each listener's certificate set through its
//! [`CertResolver`], its [`ServerConfig`] through an `ArcSwap` that workers
//! read once per accepted connection, and the ticket keys inside the shared
//! [`Ticketer`]. Connections already running keep what they started with;
//! nothing on the data path takes a lock.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ProducesTickets, StoresServerSessions};
use rustls::ServerConfig;
use tracing::{info, warn};

use crate::certs::{self, CertResolver, CertSource, TrustConfig};
use crate::config::{ClientAuthConfig, Listener, TlsPolicy};
use crate::tls::{self, ServerParts};

/// Reload failures; the old material keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{listener}: {error}")]
    Cert {
        listener: String,
        error: certs::CertError,
    },
    #[error("session ticket keys: {0}")]
    Tickets(#[from] crate::tickets::TicketError),
    #[error("TLS settings: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("no certificate named \"{0}\"")]
    UnknownName(String),
    #[error("writing the new certificate files: {0}")]
    Write(std::io::Error),
}

/// `tls.policy = "enforce"`: refuses, while choosing the certificate, a
/// client that offers none of `tls.expected_cipher_suites`, and counts it.
/// (With the provider restricted to the expected suites such a handshake
/// could not succeed anyway; refusing here makes it a counted, logged
/// policy decision instead of a generic failure.)
#[derive(Debug)]
pub struct PolicyGate {
    expected: Arc<[rustls::CipherSuite]>,
    refusals: std::sync::atomic::AtomicU64,
    last_log: std::sync::atomic::AtomicU64,
}

impl PolicyGate {
    /// Handshakes refused so far.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The certificate resolver behind a [`PolicyGate`].
#[derive(Debug)]
struct GatedResolver {
    inner: Arc<CertResolver>,
    gate: Arc<PolicyGate>,
}

impl rustls::server::ResolvesServerCert for GatedResolver {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let g = &self.gate;
        if !hello.cipher_suites().iter().any(|s| g.expected.contains(s)) {
            use std::sync::atomic::Ordering;
            g.refusals.fetch_add(1, Ordering::Relaxed);
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let last = g.last_log.load(Ordering::Relaxed);
            if now >= last + 10
                && g.last_log
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                warn!(
                    sni = hello.server_name().unwrap_or("-"),
                    offered = ?hello.cipher_suites(),
                    "TLS policy (enforce): refused a client that offers none of tls.expected_cipher_suites (counted in policy_deviations; this line at most every 10 s)"
                );
            }
            return None;
        }
        self.inner.resolve(hello)
    }
}

/// `tls.session_tickets = false`: no tickets at all.
#[derive(Debug)]
struct NoTickets;

impl ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }
    fn lifetime(&self) -> u32 {
        0
    }
    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// One listener's rotating TLS material.
pub struct ListenerTls {
    pub name: String,
    sources: Vec<CertSource>,
    client_auth: Option<ClientAuthConfig>,
    pub resolver: Arc<CertResolver>,
    /// What workers read at accept.
    pub current: Arc<ArcSwap<ServerConfig>>,
}

/// Every listener's TLS material and how to rebuild it.
pub struct TlsState {
    policy: TlsPolicy,
    trust: TrustConfig,
    pub listeners: Vec<ListenerTls>,
    /// Ticket keys from files, when configured (rotated on reload).
    file_ticketer: Option<Arc<crate::tickets::Ticketer>>,
    ticketer: Arc<dyn ProducesTickets>,
    session_storage: Arc<dyn StoresServerSessions + Send + Sync>,
    secret_extraction: bool,
    /// Enforce mode's gate, shared by every listener.
    pub policy_gate: Option<Arc<PolicyGate>>,
    /// Serializes reloads (SIGHUP, watcher and uploads may race).
    lock: Mutex<()>,
}

/// What a reload changed, for the log and the caller.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadSummary {
    pub listeners: usize,
    pub certificates: usize,
    pub ticket_keys: usize,
}

impl TlsState {
    /// Loads and validates everything at start.
    pub fn load(
        policy: &TlsPolicy,
        listeners: &[Listener],
        secret_extraction: bool,
    ) -> Result<TlsState, ReloadError> {
        let trust = TrustConfig {
            roots: policy.trust_roots.clone(),
            crls: policy.crls.clone(),
        };
        if trust.roots.is_none() {
            warn!("tls.trust_roots is not set: certificate chains are not validated against a trust anchor (validity dates and key match still are)");
        }
        let (file_ticketer, ticketer): (
            Option<Arc<crate::tickets::Ticketer>>,
            Arc<dyn ProducesTickets>,
        ) = if !policy.session_tickets {
            info!("session tickets off (tls.session_tickets = false)");
            (None, Arc::new(NoTickets))
        } else if policy.ticket_keys.is_empty() {
            let t = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| {
                crate::config::ConfigError::Invalid {
                    key: "tls.ticket_keys".into(),
                    message: format!("cannot create a ticketer: {e}"),
                }
            })?;
            (None, t)
        } else {
            let keys = crate::tickets::TicketKeys::load(&policy.ticket_keys)?;
            let t =
                Arc::new(crate::tickets::Ticketer::new(keys).with_lifetime(policy.ticket_lifetime));
            info!(
                files = policy.ticket_keys.len(),
                "session tickets: keys from files (shared across hosts)"
            );
            (Some(t.clone()), t)
        };
        let session_storage: Arc<dyn StoresServerSessions + Send + Sync> =
            if policy.session_cache == 0 {
                Arc::new(rustls::server::NoServerSessionStorage {})
            } else {
                rustls::server::ServerSessionMemoryCache::new(policy.session_cache)
            };
        let mut state = TlsState {
            policy: policy.clone(),
            trust,
            listeners: Vec::new(),
            file_ticketer,
            ticketer,
            session_storage,
            secret_extraction,
            policy_gate: match (policy.policy, tls::expected_suites(policy)?) {
                (crate::config::PolicyMode::Enforce, Some(expected)) => {
                    Some(Arc::new(PolicyGate {
                        expected,
                        refusals: Default::default(),
                        last_log: Default::default(),
                    }))
                }
                _ => None,
            },
            lock: Mutex::new(()),
        };
        let now = SystemTime::now();
        for l in listeners {
            let sources = sources(l);
            let set = certs::load_set(&sources, &state.trust, now).map_err(|source| {
                ReloadError::Cert {
                    listener: l.name.clone(),
                    error: source,
                }
            })?;
            let resolver = Arc::new(CertResolver::new(set));
            let cfg = state.server_config(&resolver, l.client_auth.as_ref(), &l.name)?;
            state.listeners.push(ListenerTls {
                name: l.name.clone(),
                sources,
                client_auth: l.client_auth.clone(),
                resolver,
                current: Arc::new(ArcSwap::new(cfg)),
            });
        }
        Ok(state)
    }

    fn server_config(
        &self,
        resolver: &Arc<CertResolver>,
        client_auth: Option<&ClientAuthConfig>,
        listener: &str,
    ) -> Result<Arc<ServerConfig>, ReloadError> {
        let client_verifier = match client_auth {
            Some(ca) => Some(
                certs::client_verifier(&ca.ca, &ca.crls, ca.required).map_err(|source| {
                    ReloadError::Cert {
                        listener: listener.to_string(),
                        error: source,
                    }
                })?,
            ),
            None => None,
        };
        let resolver: Arc<dyn rustls::server::ResolvesServerCert> = match &self.policy_gate {
            Some(gate) => Arc::new(GatedResolver {
                inner: resolver.clone(),
                gate: gate.clone(),
            }),
            None => resolver.clone(),
        };
        Ok(tls::build_server_config(
            &self.policy,
            ServerParts {
                resolver,
                client_verifier,
                ticketer: self.ticketer.clone(),
                session_storage: self.session_storage.clone(),
                secret_extraction: self.secret_extraction,
            },
        )?)
    }

    /// Re-reads every certificate, key, CRL, client CA bundle and ticket
    /// key file; swaps them in only if all are valid.
    pub fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        let keys = match &self.file_ticketer {
            Some(_) => Some(crate::tickets::TicketKeys::load(&self.policy.ticket_keys)?),
            None => None,
        };
        let mut staged = Vec::with_capacity(self.listeners.len());
        for l in &self.listeners {
            let set = certs::load_set(&l.sources, &self.trust, now).map_err(|source| {
                ReloadError::Cert {
                    listener: l.name.clone(),
                    error: source,
                }
            })?;
            // The listener keeps its resolver (its set is swapped below);
            // the ServerConfig is rebuilt for new client-auth CRLs/CAs.
            let cfg = self.server_config(&l.resolver, l.client_auth.as_ref(), &l.name)?;
            staged.push((set, cfg));
        }
        let mut certificates = 0;
        for (l, (set, cfg)) in self.listeners.iter().zip(staged) {
            certificates += set.entries().len();
            l.resolver.replace(set);
            l.current.store(cfg);
        }
        let mut ticket_keys = 0;
        if let (Some(t), Some(keys)) = (&self.file_ticketer, keys) {
            ticket_keys = keys.len();
            t.replace(keys);
        }
        Ok(ReloadSummary {
            listeners: self.listeners.len(),
            certificates,
            ticket_keys,
        })
    }

    /// Replaces one certificate from an uploaded PEM text (chain and key),
    /// validated like a load; on success the files are rewritten so a later
    /// reload keeps it.
    pub fn put_cert(&self, name: &str, pem: &[u8]) -> Result<certs::CertInfo, ReloadError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        let (l, source) = self
            .listeners
            .iter()
            .find_map(|l| l.sources.iter().find(|s| s.name == name).map(|s| (l, s)))
            .ok_or_else(|| ReloadError::UnknownName(name.to_string()))?;
        let cert_err = |source| ReloadError::Cert {
            listener: l.name.clone(),
            error: source,
        };
        let (chain, key) = certs::parse_pem_bundle(pem).map_err(cert_err)?;
        let chain_pem = certs::chain_to_pem(&chain);
        let key_pem = certs::key_to_pem(&key);
        let current = l.resolver.current();
        let new_set = current
            .with_replacement(name, chain, key, &self.trust, now)
            .map_err(cert_err)?;
        certs::write_pem_files(source, chain_pem.as_bytes(), key_pem.as_bytes())
            .map_err(ReloadError::Write)?;
        let info = new_set
            .info(now, self.policy.expiry_warning)
            .into_iter()
            .find(|i| i.name == name);
        l.resolver.replace(new_set);
        info.ok_or_else(|| ReloadError::UnknownName(name.to_string()))
    }

    /// Every certificate of every listener, as the admin API shows them.
    pub fn cert_infos(&self) -> Vec<(String, certs::CertInfo)> {
        let now = SystemTime::now();
        let mut out = Vec::new();
        for l in &self.listeners {
            for i in l.resolver.current().info(now, self.policy.expiry_warning) {
                out.push((l.name.clone(), i));
            }
        }
        out
    }

    /// Certificates expiring within the warning window: (listener, name,
    /// seconds left).
    pub fn expiring(&self) -> Vec<(String, String, i64)> {
        let now = SystemTime::now();
        let mut out = Vec::new();
        for l in &self.listeners {
            for (name, secs) in l
                .resolver
                .current()
                .expiring(now, self.policy.expiry_warning)
            {
                out.push((l.name.clone(), name, secs));
            }
        }
        out
    }

    /// Handshakes refused because the chosen certificate had expired.
    pub fn expired_refusals(&self) -> u64 {
        self.listeners
            .iter()
            .map(|l| l.resolver.expired_refusals())
            .sum()
    }

    /// Ticket decryption failures (file keys only).
    pub fn ticket_decrypt_failures(&self) -> u64 {
        self.file_ticketer
            .as_ref()
            .map_or(0, |t| t.decrypt_failures())
    }

    /// Every file whose change should trigger a reload.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = Vec::new();
        for l in &self.listeners {
            for s in &l.sources {
                files.push(s.cert.clone());
                files.push(s.key.clone());
            }
            if let Some(ca) = &l.client_auth {
                files.push(ca.ca.clone());
                files.extend(ca.crls.iter().cloned());
            }
        }
        files.extend(self.trust.roots.iter().cloned());
        files.extend(self.trust.crls.iter().cloned());
        files.extend(self.policy.ticket_keys.iter().cloned());
        files.sort();
        files.dedup();
        files
    }

    /// The warning window for certificate expiry.
    pub fn expiry_warning(&self) -> Duration {
        self.policy.expiry_warning
    }
}

fn sources(l: &Listener) -> Vec<CertSource> {
    l.certs
        .iter()
        .map(|c| CertSource {
            name: c.name.clone(),
            cert: c.cert.clone(),
            key: c.key.clone(),
            sni: c.sni.clone(),
            default: c.default,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::testpki::{LeafSpec, Pki};
    use crate::config::{BackendAddr, CertConfig};

    fn listener(pki: &Pki) -> Listener {
        let src = pki.source("main", LeafSpec::server(&["localhost"]), &[]);
        Listener {
            name: "listener[0]".into(),
            listen: "127.0.0.1:1".parse().unwrap(),
            certs: vec![CertConfig {
                name: src.name,
                cert: src.cert,
                key: src.key,
                sni: Vec::new(),
                default: true,
            }],
            backend: BackendAddr::Tcp("127.0.0.1:2".parse().unwrap()),
            backend_tls: None,
            client_auth: None,
            proxy_protocol: false,
        }
    }

    /// Two handshakes from one client config; whether the second resumed.
    fn second_resumes(server: Arc<ServerConfig>, pki: &Pki) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.root.cert.der().clone()).unwrap();
        let client = Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let mut resumed = false;
        for _ in 0..2 {
            let mut c =
                rustls::ClientConnection::new(client.clone(), "localhost".try_into().unwrap())
                    .unwrap();
            let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
            for _ in 0..10 {
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                s.read_tls(&mut &buf[..]).unwrap();
                s.process_new_packets().unwrap();
                let mut buf = Vec::new();
                s.write_tls(&mut buf).unwrap();
                c.read_tls(&mut &buf[..]).unwrap();
                c.process_new_packets().unwrap();
            }
            assert!(!c.is_handshaking());
            resumed = c.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        }
        resumed
    }

    #[test]
    fn resumption_switches() {
        let pki = Pki::new();
        let l = listener(&pki);
        let on = TlsState::load(&TlsPolicy::default(), std::slice::from_ref(&l), false).unwrap();
        assert!(second_resumes(on.listeners[0].current.load_full(), &pki));
        let off_policy = TlsPolicy {
            session_tickets: false,
            session_cache: 0,
            ..TlsPolicy::default()
        };
        let off = TlsState::load(&off_policy, std::slice::from_ref(&l), false).unwrap();
        let cfg = off.listeners[0].current.load_full();
        assert_eq!(cfg.send_tls13_tickets, 0);
        assert!(
            !second_resumes(cfg, &pki),
            "no tickets and no cache: full handshakes only"
        );
    }
}
