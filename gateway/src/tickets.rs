//! Stateless TLS session tickets with keys from files, shared by a fleet.
//!
//! Key files are nginx-compatible (`openssl rand 80 > ticket.key`): each
//! holds 48 or 80 random bytes. The first 16 bytes are the key *name*, which
//! is written in clear at the front of every ticket so the right key can be
//! found; the AES-256-GCM key is SHA-256 of the remaining bytes. (Only the
//! file format is shared with nginx; the ticket format is our own.)
//!
//! The first file's key encrypts; every key decrypts. Operators rotate by
//! putting a new file first and keeping the old ones for a ticket lifetime.
//!
//! Ticket layout: `key name (16) | nonce (12) | ciphertext | tag (16)`, with
//! the key name as additional authenticated data.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::digest;

/// Length of the key name at the start of a key file and of a ticket.
pub const KEY_NAME_LEN: usize = 16;
/// Length of the AEAD tag at the end of a ticket.
const TAG_LEN: usize = 16;
/// Key file sizes accepted (nginx's two formats).
pub const KEY_FILE_SIZES: [usize; 2] = [48, 80];
/// Default ticket lifetime hint sent to clients.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Longest lifetime TLS 1.3 allows (RFC 8446 §4.6.1: seven days).
const MAX_LIFETIME_SECS: u64 = 7 * 24 * 3600;

/// Why ticket keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    /// No key files were given.
    #[error("session tickets: no key files given")]
    NoFiles,
    /// A key file could not be read.
    #[error("session ticket key file {path}: cannot read: {source}")]
    Unreadable {
        /// The file at fault.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A key file has the wrong size.
    #[error(
        "session ticket key file {path}: is {len} bytes, must be exactly 48 or 80 \
         (create it with `openssl rand 80 > {path}`)"
    )]
    WrongSize {
        /// The file at fault.
        path: PathBuf,
        /// Its size in bytes.
        len: usize,
    },
    /// Two key files have the same key name (first 16 bytes).
    #[error(
        "session ticket key file {path}: its key name (first 16 bytes) equals that of {other}"
    )]
    DuplicateName {
        /// The later file.
        path: PathBuf,
        /// The earlier file with the same name.
        other: PathBuf,
    },
    /// The crypto library rejected the derived key (should not happen).
    #[error("session ticket key file {path}: AES-256-GCM key setup failed")]
    KeySetup {
        /// The file at fault.
        path: PathBuf,
    },
}

/// One ticket key: its public name and the AEAD key derived from the file.
struct TicketKey {
    name: [u8; KEY_NAME_LEN],
    aead: RandomizedNonceKey,
    path: PathBuf,
}

/// An ordered set of ticket keys; the first encrypts, all decrypt.
pub struct TicketKeys {
    keys: Vec<TicketKey>,
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names and paths only: never key material.
        f.debug_list()
            .entries(self.keys.iter().map(|k| k.path.display().to_string()))
            .finish()
    }
}

impl TicketKeys {
    /// Reads the key files in order. The first file's key encrypts new
    /// tickets; all of them decrypt. Errors name the file at fault.
    pub fn load(paths: &[PathBuf]) -> Result<TicketKeys, TicketError> {
        if paths.is_empty() {
            return Err(TicketError::NoFiles);
        }
        let mut keys: Vec<TicketKey> = Vec::with_capacity(paths.len());
        for path in paths {
            let bytes = std::fs::read(path).map_err(|source| TicketError::Unreadable {
                path: path.clone(),
                source,
            })?;
            let key = key_from_bytes(path, &bytes)?;
            if let Some(other) = keys.iter().find(|k| k.name == key.name) {
                return Err(TicketError::DuplicateName {
                    path: path.clone(),
                    other: other.path.clone(),
                });
            }
            keys.push(key);
        }
        Ok(TicketKeys { keys })
    }

    /// Number of keys loaded.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: loading requires at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The name (first 16 bytes) of the encrypting key.
    pub fn current_name(&self) -> Option<[u8; KEY_NAME_LEN]> {
        self.keys.first().map(|k| k.name)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let key = self.keys.first()?;
        let mut body = Vec::with_capacity(plain.len() + TAG_LEN);
        body.extend_from_slice(plain);
        let nonce = key
            .aead
            .seal_in_place_append_tag(Aad::from(&key.name), &mut body)
            .ok()?;
        let mut out = Vec::with_capacity(KEY_NAME_LEN + NONCE_LEN + body.len());
        out.extend_from_slice(&key.name);
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < KEY_NAME_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (name, rest) = ticket.split_at(KEY_NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key = self.keys.iter().find(|k| k.name[..] == *name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain_len = key
            .aead
            .open_in_place(nonce, Aad::from(name), &mut buf)
            .ok()?
            .len();
        buf.truncate(plain_len);
        Some(buf)
    }
}

fn key_from_bytes(path: &Path, bytes: &[u8]) -> Result<TicketKey, TicketError> {
    if !KEY_FILE_SIZES.contains(&bytes.len()) {
        return Err(TicketError::WrongSize {
            path: path.to_path_buf(),
            len: bytes.len(),
        });
    }
    let (name_bytes, secret) = bytes.split_at(KEY_NAME_LEN);
    let mut name = [0u8; KEY_NAME_LEN];
    name.copy_from_slice(name_bytes);
    let derived = digest::digest(&digest::SHA256, secret);
    let aead = RandomizedNonceKey::new(&AES_256_GCM, derived.as_ref()).map_err(|_| {
        TicketError::KeySetup {
            path: path.to_path_buf(),
        }
    })?;
    Ok(TicketKey {
        name,
        aead,
        path: path.to_path_buf(),
    })
}

/// A [`rustls::server::ProducesTickets`] whose keys can be replaced at run
/// time (on reload) without rebuilding the server configuration.
pub struct Ticketer {
    keys: ArcSwap<TicketKeys>,
    lifetime_secs: u32,
    decrypt_failures: AtomicU64,
    encrypt_failures: AtomicU64,
}

impl fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticketer")
            .field("keys", &*self.keys.load())
            .field("lifetime_secs", &self.lifetime_secs)
            .field("decrypt_failures", &self.decrypt_failures())
            .finish()
    }
}

impl Ticketer {
    /// A ticketer with the given keys and the default 12 h lifetime.
    pub fn new(keys: TicketKeys) -> Ticketer {
        Ticketer {
            keys: ArcSwap::from_pointee(keys),
            lifetime_secs: lifetime_secs(DEFAULT_LIFETIME),
            decrypt_failures: AtomicU64::new(0),
            encrypt_failures: AtomicU64::new(0),
        }
    }

    /// Sets the lifetime hint sent to clients (whole seconds, capped at
    /// the TLS 1.3 maximum of seven days).
    pub fn with_lifetime(mut self, lifetime: Duration) -> Ticketer {
        self.lifetime_secs = lifetime_secs(lifetime);
        self
    }

    /// Swaps in a new key set (reload); in-flight calls finish with the old.
    pub fn replace(&self, keys: TicketKeys) {
        self.keys.store(Arc::new(keys));
    }

    /// Tickets that could not be decrypted (unknown key name, bad tag,
    /// malformed) since start.
    pub fn decrypt_failures(&self) -> u64 {
        self.decrypt_failures.load(Ordering::Relaxed)
    }

    /// Tickets that could not be encrypted since start (should stay zero).
    pub fn encrypt_failures(&self) -> u64 {
        self.encrypt_failures.load(Ordering::Relaxed)
    }
}

fn lifetime_secs(d: Duration) -> u32 {
    // Capped at seven days, so the conversion cannot fail.
    u32::try_from(d.as_secs().min(MAX_LIFETIME_SECS)).unwrap_or(u32::MAX)
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime_secs
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let out = self.keys.load().encrypt(plain);
        if out.is_none() {
            self.encrypt_failures.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let out = self.keys.load().decrypt(cipher);
        if out.is_none() {
            self.decrypt_failures.fetch_add(1, Ordering::Relaxed);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::server::ProducesTickets;
    use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore, ServerConnection};

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "tickets-test-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn key_file(&self, name: &str, len: usize) -> PathBuf {
            let mut bytes = vec![0u8; len];
            aws_lc_rs::rand::fill(&mut bytes).unwrap();
            let p = self.0.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ticketer(paths: &[PathBuf]) -> Ticketer {
        Ticketer::new(TicketKeys::load(paths).unwrap())
    }

    #[test]
    fn round_trip_and_layout() {
        let d = TempDir::new("rt");
        let a = d.key_file("a.key", 80);
        let t = ticketer(std::slice::from_ref(&a));
        let plain = b"session state goes here".to_vec();
        let ticket = t.encrypt(&plain).unwrap();
        assert_eq!(
            ticket.len(),
            KEY_NAME_LEN + NONCE_LEN + plain.len() + TAG_LEN
        );
        let file = std::fs::read(&a).unwrap();
        assert_eq!(&ticket[..KEY_NAME_LEN], &file[..KEY_NAME_LEN]);
        assert_ne!(
            &ticket[KEY_NAME_LEN + NONCE_LEN..][..plain.len()],
            &plain[..]
        );
        assert_eq!(t.decrypt(&ticket), Some(plain.clone()));
        // Random nonces: the same plaintext encrypts differently each time.
        assert_ne!(t.encrypt(&plain).unwrap(), ticket);
        assert_eq!(t.decrypt_failures(), 0);
        assert_eq!(t.lifetime(), 12 * 3600);
        assert!(t.enabled());
    }

    #[test]
    fn lifetime_is_configurable_and_capped() {
        let d = TempDir::new("life");
        let a = d.key_file("a.key", 48);
        let t = ticketer(std::slice::from_ref(&a)).with_lifetime(Duration::from_secs(300));
        assert_eq!(t.lifetime(), 300);
        let t = t.with_lifetime(Duration::from_secs(30 * 24 * 3600));
        assert_eq!(t.lifetime(), 7 * 24 * 3600);
    }

    #[test]
    fn rotation_keeps_old_keys_for_decrypt_only() {
        let d = TempDir::new("rot");
        let a = d.key_file("a.key", 80);
        let b = d.key_file("b.key", 48);
        let t = ticketer(std::slice::from_ref(&a));
        let old = t.encrypt(b"old").unwrap();

        t.replace(TicketKeys::load(&[b.clone(), a.clone()]).unwrap());
        assert_eq!(t.decrypt(&old).as_deref(), Some(&b"old"[..]));
        let new = t.encrypt(b"new").unwrap();
        assert_eq!(
            &new[..KEY_NAME_LEN],
            &std::fs::read(&b).unwrap()[..KEY_NAME_LEN]
        );

        t.replace(TicketKeys::load(std::slice::from_ref(&b)).unwrap());
        assert_eq!(t.decrypt(&old), None);
        assert_eq!(t.decrypt_failures(), 1);
        assert_eq!(t.decrypt(&new).as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn two_hosts_share_tickets() {
        let d = TempDir::new("hosts");
        let paths = vec![d.key_file("a.key", 80), d.key_file("b.key", 80)];
        let host1 = ticketer(&paths);
        let host2 = ticketer(&paths);
        let t1 = host1.encrypt(b"from host 1").unwrap();
        let t2 = host2.encrypt(b"from host 2").unwrap();
        assert_eq!(host2.decrypt(&t1).as_deref(), Some(&b"from host 1"[..]));
        assert_eq!(host1.decrypt(&t2).as_deref(), Some(&b"from host 2"[..]));
    }

    #[test]
    fn tampered_or_garbage_tickets_fail_cleanly() {
        let d = TempDir::new("tamper");
        let a = d.key_file("a.key", 80);
        let t = ticketer(std::slice::from_ref(&a));
        let ticket = t.encrypt(b"precious").unwrap();
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 0x01;
            assert_eq!(t.decrypt(&bad), None, "flipped byte {i}");
        }
        for len in 0..ticket.len() {
            assert_eq!(t.decrypt(&ticket[..len]), None, "truncated to {len}");
        }
        assert_eq!(t.decrypt(&[0xff; 200]), None);
        assert_eq!(t.decrypt_failures(), 2 * ticket.len() as u64 + 1);
        // The genuine ticket still works.
        assert!(t.decrypt(&ticket).is_some());
    }

    #[test]
    fn load_errors_name_the_file() {
        let d = TempDir::new("err");
        let good = d.key_file("good.key", 80);
        let short = d.key_file("short.key", 32);
        let err = TicketKeys::load(&[good.clone(), short.clone()]).unwrap_err();
        assert!(
            matches!(err, TicketError::WrongSize { len: 32, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&short.display().to_string()), "{msg}");
        assert!(msg.contains("48 or 80"), "{msg}");

        let missing = d.0.join("missing.key");
        let err = TicketKeys::load(std::slice::from_ref(&missing)).unwrap_err();
        assert!(matches!(err, TicketError::Unreadable { .. }), "{err:?}");
        assert!(err.to_string().contains("missing.key"), "{err}");

        let copy = d.0.join("copy.key");
        std::fs::copy(&good, &copy).unwrap();
        let err = TicketKeys::load(&[good.clone(), copy.clone()]).unwrap_err();
        assert!(matches!(err, TicketError::DuplicateName { .. }), "{err:?}");
        assert!(err.to_string().contains("copy.key"), "{err}");

        assert!(matches!(TicketKeys::load(&[]), Err(TicketError::NoFiles)));
    }

    // ---- real rustls handshakes ----

    struct Pki {
        chain: Vec<CertificateDer<'static>>,
        key: Vec<u8>,
        roots: RootCertStore,
    }

    fn pki() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(ca.der().to_vec())).unwrap();
        Pki {
            chain: vec![CertificateDer::from(leaf.der().to_vec())],
            key: leaf_key.serialize_der(),
            roots,
        }
    }

    /// A TLS 1.3 server config whose tickets come from `paths`, with no
    /// stateful session cache so only tickets can resume.
    fn server_config(pki: &Pki, paths: &[PathBuf]) -> Arc<rustls::ServerConfig> {
        let mut cfg =
            rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .with_no_client_auth()
                .with_single_cert(
                    pki.chain.clone(),
                    PrivateKeyDer::try_from(pki.key.clone()).unwrap(),
                )
                .unwrap();
        cfg.ticketer = Arc::new(ticketer(paths));
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Arc::new(cfg)
    }

    /// Moves TLS bytes both ways until neither side has anything to send.
    fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) {
        for _ in 0..20 {
            let mut moved = false;
            while client.wants_write() {
                let mut buf = Vec::new();
                client.write_tls(&mut buf).unwrap();
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    server.read_tls(&mut rd).unwrap();
                }
                server.process_new_packets().unwrap();
                moved = true;
            }
            while server.wants_write() {
                let mut buf = Vec::new();
                server.write_tls(&mut buf).unwrap();
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    client.read_tls(&mut rd).unwrap();
                }
                client.process_new_packets().unwrap();
                moved = true;
            }
            if !moved && !client.is_handshaking() && !server.is_handshaking() {
                return;
            }
        }
        panic!("handshake did not settle");
    }

    fn connect(
        client_cfg: &Arc<ClientConfig>,
        server_cfg: &Arc<rustls::ServerConfig>,
    ) -> (ClientConnection, ServerConnection) {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = ClientConnection::new(client_cfg.clone(), name).unwrap();
        let mut s = ServerConnection::new(server_cfg.clone()).unwrap();
        handshake(&mut c, &mut s);
        (c, s)
    }

    #[test]
    fn rustls_resumes_across_hosts_sharing_key_files() {
        let d = TempDir::new("tls");
        let paths = vec![d.key_file("a.key", 80)];
        let pki = pki();
        let host1 = server_config(&pki, &paths);
        let host2 = server_config(&pki, &paths);
        let client_cfg = Arc::new(
            ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .with_root_certificates(pki.roots.clone())
                .with_no_client_auth(),
        );

        let (c1, s1) = connect(&client_cfg, &host1);
        assert_eq!(c1.handshake_kind(), Some(HandshakeKind::Full));
        assert_eq!(s1.handshake_kind(), Some(HandshakeKind::Full));

        let (c2, s2) = connect(&client_cfg, &host2);
        assert_eq!(c2.handshake_kind(), Some(HandshakeKind::Resumed));
        assert_eq!(s2.handshake_kind(), Some(HandshakeKind::Resumed));

        // A host with different keys cannot resume: full handshake.
        let other = server_config(&pki, &[d.key_file("other.key", 80)]);
        let (c3, _s3) = connect(&client_cfg, &other);
        assert_eq!(c3.handshake_kind(), Some(HandshakeKind::Full));
    }
}
