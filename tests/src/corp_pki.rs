//! A generated "corporate" PKI for the certificate tests:
//! root CA -> intermediate CA -> server leaves (ECDSA P-256), plus a separate
//! client CA for mTLS, CRLs, an unrelated root ("wrong root"), and rustls
//! client configs trusting the root.
//!
//! Files written by [`CorpPki::new`] in `pki.dir`:
//! * `roots.pem`: the root CA certificate only (for `[tls] trust_roots`),
//! * `chain.pem`: the default server leaf + the intermediate,
//! * `key.pem`: the default leaf's PKCS#8 private key,
//! * `clients-ca.pem`: the client CA (for `[listener.client_auth] ca`).
//!
//! Other helpers write more files on request (`crl.pem`, named leaves, ...).
//! Every leaf gets a fresh random serial so CRLs can target one precisely.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rcgen::{
    date_time_ymd, BasicConstraints, Certificate, CertificateParams,
    CertificateRevocationListParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use rustls::client::Resumption;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use crate::client::{TlsStream, CLIENT_IO_TIMEOUT};
use crate::util::{hex, sha256, TempDir};

/// The `time::OffsetDateTime` rcgen wants for a `SystemTime` (a macro so
/// this crate needs no direct `time` dependency).
macro_rules! to_offset {
    ($t:expr) => {
        date_time_ymd(1970, 1, 1) + ($t).duration_since(UNIX_EPOCH).expect("time after 1970")
    };
}

/// A certificate authority that can sign leaves and CRLs.
pub struct Ca {
    pub cert: Certificate,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_params(cn: &str, serial: u64) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Corp");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.key_identifier_method = KeyIdMethod::Sha256;
    params.serial_number = Some(SerialNumber::from(serial));
    // 2000-01-01 .. 2100-01-01: never the reason a test fails.
    params.not_before = date_time_ymd(2000, 1, 1);
    params.not_after = date_time_ymd(2100, 1, 1);
    params
}

impl Ca {
    /// A self-signed root CA.
    pub fn root(cn: &str) -> Ca {
        let mut params = ca_params(cn, random_serial());
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("root key");
        let cert = params.self_signed(&key).expect("self-sign root");
        Ca {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    /// An intermediate CA (path length 0) signed by `self`.
    pub fn intermediate(&self, cn: &str) -> Ca {
        let mut params = ca_params(cn, random_serial());
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("inter key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign intermediate");
        Ca {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// Signs a leaf described by `spec`.
    pub fn issue(&self, spec: &LeafSpec) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        for n in &spec.dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(n.as_str().try_into().expect("DNS SAN")));
        }
        for ip in &spec.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.distinguished_name = DistinguishedName::new();
        if let Some(o) = &spec.organization {
            params
                .distinguished_name
                .push(DnType::OrganizationName, o.as_str());
        }
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.as_str());
        params.not_before = to_offset!(spec.not_before);
        params.not_after = to_offset!(spec.not_after);
        params.serial_number = Some(SerialNumber::from(spec.serial));
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if spec.client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            cert,
            key,
            serial: spec.serial,
            not_after: spec.not_after,
        }
    }

    /// A CRL signed by this CA revoking `serials` (thisUpdate = 1 h ago,
    /// nextUpdate = +30 days).
    pub fn crl(&self, serials: &[u64]) -> rcgen::CertificateRevocationList {
        let now = SystemTime::now();
        let params = CertificateRevocationListParams {
            this_update: to_offset!(now - Duration::from_secs(3600)),
            next_update: to_offset!(now + Duration::from_secs(30 * 86400)),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: to_offset!(now - Duration::from_secs(3600)),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).expect("sign CRL")
    }
}

/// A random positive serial (63 bits, never 0).
pub fn random_serial() -> u64 {
    use rand::RngCore;
    (rand::rng().next_u64() >> 1) | 1
}

/// What leaf to issue.  Build with [`LeafSpec::server`] / [`LeafSpec::client`]
/// and adjust with the `with_*` / validity helpers.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub common_name: String,
    pub organization: Option<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: u64,
    pub client: bool,
}

impl LeafSpec {
    /// A server-auth leaf with DNS SANs `dns` (CN = first name or
    /// "localhost"), valid from 1 h ago for 365 days, random serial.
    pub fn server(dns: &[&str]) -> LeafSpec {
        let now = SystemTime::now();
        LeafSpec {
            dns: dns.iter().map(|s| s.to_string()).collect(),
            ips: vec![],
            common_name: dns.first().copied().unwrap_or("localhost").to_string(),
            organization: Some("Corp".into()),
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(365 * 86400),
            serial: random_serial(),
            client: false,
        }
    }

    /// The default server leaf: SAN localhost + 127.0.0.1 + `extra_dns`.
    pub fn localhost(extra_dns: &[&str]) -> LeafSpec {
        let mut dns = vec!["localhost"];
        dns.extend_from_slice(extra_dns);
        LeafSpec::server(&dns).with_ip(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// A client-auth leaf with subject `CN=<cn>,O=Corp` and no SANs.
    pub fn client(cn: &str) -> LeafSpec {
        LeafSpec {
            dns: vec![],
            common_name: cn.to_string(),
            client: true,
            ..LeafSpec::server(&[])
        }
    }

    pub fn with_ip(mut self, ip: IpAddr) -> LeafSpec {
        self.ips.push(ip);
        self
    }

    pub fn with_serial(mut self, serial: u64) -> LeafSpec {
        self.serial = serial;
        self
    }

    pub fn valid(mut self, not_before: SystemTime, not_after: SystemTime) -> LeafSpec {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Expired: valid from 30 days ago until 1 day ago.
    pub fn expired(self) -> LeafSpec {
        let now = SystemTime::now();
        self.valid(
            now - Duration::from_secs(30 * 86400),
            now - Duration::from_secs(86400),
        )
    }

    /// Not yet valid: valid from +1 day to +30 days.
    pub fn not_yet_valid(self) -> LeafSpec {
        let now = SystemTime::now();
        self.valid(
            now + Duration::from_secs(86400),
            now + Duration::from_secs(30 * 86400),
        )
    }

    /// Valid since 1 h ago, expiring `d` from now.  Note X.509 times have
    /// one-second resolution (rcgen truncates sub-seconds).
    pub fn expiring_in(self, d: Duration) -> LeafSpec {
        let now = SystemTime::now();
        self.valid(now - Duration::from_secs(3600), now + d)
    }
}

/// An issued certificate with its key.
pub struct Leaf {
    pub cert: Certificate,
    pub key: KeyPair,
    pub serial: u64,
    pub not_after: SystemTime,
}

impl Leaf {
    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// Lower-case hex SHA-256 of the leaf DER.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.cert.der())
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The leaf followed by `intermediates`, as PEM.
    pub fn chain_pem(&self, intermediates: &[&Ca]) -> String {
        let mut s = self.cert.pem();
        for ca in intermediates {
            s.push_str(&ca.cert.pem());
        }
        s
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

/// Lower-case hex SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex(&sha256(der))
}

/// Writes `contents` to `path` atomically (temp file in the same directory,
/// fsync, rename), as an operator's deployment tool would.
pub fn write_atomic(path: &Path, contents: &[u8]) {
    use std::io::Write;
    let dir = path.parent().expect("parent dir");
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap().to_string_lossy(),
        random_serial()
    ));
    {
        let mut f =
            std::fs::File::create(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
        f.write_all(contents).expect("write temp file");
        f.sync_all().expect("fsync temp file");
    }
    std::fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", tmp.display(), path.display()));
}

/// The corporate PKI.  See the module docs for the files it writes.
pub struct CorpPki {
    pub dir: TempDir,
    pub root: Ca,
    pub inter: Ca,
    pub client_ca: Ca,
    /// The default server leaf (localhost, 127.0.0.1, extra names).
    pub leaf: Leaf,
    /// `roots.pem`: root only.
    pub roots: PathBuf,
    /// `chain.pem`: default leaf + intermediate.
    pub chain: PathBuf,
    /// `key.pem`: default leaf key.
    pub key: PathBuf,
    /// `clients-ca.pem`: the client CA.
    pub clients_ca: PathBuf,
}

impl Default for CorpPki {
    fn default() -> Self {
        CorpPki::new()
    }
}

impl CorpPki {
    pub fn new() -> CorpPki {
        CorpPki::with_names(&[])
    }

    /// Like [`CorpPki::new`]; the default leaf also carries `extra_dns` SANs.
    pub fn with_names(extra_dns: &[&str]) -> CorpPki {
        let dir = TempDir::new("gw-corp-pki");
        let root = Ca::root("Corp Test Root CA");
        let inter = root.intermediate("Corp Test Issuing CA");
        let client_ca = Ca::root("Corp Test Client CA");
        let leaf = inter.issue(&LeafSpec::localhost(extra_dns));
        let roots = dir.join("roots.pem");
        let chain = dir.join("chain.pem");
        let key = dir.join("key.pem");
        let clients_ca = dir.join("clients-ca.pem");
        std::fs::write(&roots, root.pem()).expect("write roots.pem");
        std::fs::write(&chain, leaf.chain_pem(&[&inter])).expect("write chain.pem");
        std::fs::write(&key, leaf.key_pem()).expect("write key.pem");
        std::fs::write(&clients_ca, client_ca.pem()).expect("write clients-ca.pem");
        CorpPki {
            dir,
            root,
            inter,
            client_ca,
            leaf,
            roots,
            chain,
            key,
            clients_ca,
        }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Issues a server leaf from the intermediate.
    pub fn issue(&self, spec: &LeafSpec) -> Leaf {
        self.inter.issue(spec)
    }

    /// Issues a server leaf for `dns` (valid 1 h ago .. +365 d).
    pub fn leaf_for(&self, dns: &[&str]) -> Leaf {
        self.issue(&LeafSpec::server(dns))
    }

    /// A leaf for `dns`, chained to an intermediate of a freshly generated,
    /// unrelated root.  Returns (leaf, that intermediate): write the chain
    /// with `leaf.chain_pem(&[&inter])` or [`CorpPki::write_foreign`].
    pub fn wrong_root_leaf(&self, dns: &[&str]) -> (Leaf, Ca) {
        let other_root = Ca::root("Unrelated Root CA");
        let other_inter = other_root.intermediate("Unrelated Issuing CA");
        let leaf = other_inter.issue(&LeafSpec::server(dns));
        (leaf, other_inter)
    }

    /// The PEM chain (leaf + our intermediate) of `leaf`.
    pub fn chain_pem(&self, leaf: &Leaf) -> String {
        leaf.chain_pem(&[&self.inter])
    }

    /// Writes `<name>-chain.pem` (leaf + intermediate) and `<name>-key.pem`;
    /// returns (chain path, key path).
    pub fn write_leaf(&self, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
        let chain = self.dir.join(&format!("{name}-chain.pem"));
        let key = self.dir.join(&format!("{name}-key.pem"));
        std::fs::write(&chain, self.chain_pem(leaf)).expect("write chain");
        std::fs::write(&key, leaf.key_pem()).expect("write key");
        (chain, key)
    }

    /// Like [`CorpPki::write_leaf`] for a leaf of another CA, with `ca` as
    /// the intermediate in the chain file.
    pub fn write_foreign(&self, name: &str, leaf: &Leaf, ca: &Ca) -> (PathBuf, PathBuf) {
        let chain = self.dir.join(&format!("{name}-chain.pem"));
        let key = self.dir.join(&format!("{name}-key.pem"));
        std::fs::write(&chain, leaf.chain_pem(&[ca])).expect("write chain");
        std::fs::write(&key, leaf.key_pem()).expect("write key");
        (chain, key)
    }

    /// Writes `crl.pem`: a CRL from the intermediate revoking `serials`.
    pub fn write_crl(&self, serials: &[u64]) -> PathBuf {
        self.write_crl_as("crl.pem", serials)
    }

    pub fn write_crl_as(&self, file: &str, serials: &[u64]) -> PathBuf {
        let path = self.dir.join(file);
        let crl = self.inter.crl(serials);
        std::fs::write(&path, crl.pem().expect("CRL PEM")).expect("write CRL");
        path
    }

    /// Writes a CRL from the client CA revoking `serials`.
    pub fn write_client_crl(&self, file: &str, serials: &[u64]) -> PathBuf {
        let path = self.dir.join(file);
        let crl = self.client_ca.crl(serials);
        std::fs::write(&path, crl.pem().expect("CRL PEM")).expect("write CRL");
        path
    }

    /// A client certificate `CN=<cn>,O=Corp` signed by the client CA.
    pub fn client_cert(&self, cn: &str) -> Leaf {
        self.client_ca.issue(&LeafSpec::client(cn))
    }

    /// A rustls client config trusting the root only, TLS 1.2 + 1.3, no
    /// client certificate, **session resumption disabled** (so every
    /// handshake runs certificate selection on the server).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.build_client_config(None, &[])
    }

    /// Like [`CorpPki::client_config`], presenting `client` (a leaf from
    /// [`CorpPki::client_cert`]) as client certificate.
    pub fn client_config_with_cert(&self, client: &Leaf) -> Arc<ClientConfig> {
        self.build_client_config(Some(client), &[])
    }

    /// Full control: optional client cert and ALPN protocols.
    pub fn build_client_config(&self, client: Option<&Leaf>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.root.der()).expect("add root");
        let builder = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("protocol versions")
        .with_root_certificates(roots);
        let mut cfg = match client {
            None => builder.with_no_client_auth(),
            Some(c) => builder
                .with_client_auth_cert(vec![c.der()], c.key_der())
                .expect("client auth cert"),
        };
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        cfg.resumption = Resumption::disabled();
        Arc::new(cfg)
    }
}

/// TCP connect + TLS handshake with `server_name` as SNI / verified name.
/// Returns a descriptive error (including the rustls error, e.g. a received
/// alert) instead of panicking.
pub fn connect_sni(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    server_name: &str,
) -> Result<TlsStream, String> {
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("TCP connect to {addr}: {e}"))?;
    sock.set_read_timeout(Some(CLIENT_IO_TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(CLIENT_IO_TIMEOUT)).unwrap();
    let _ = sock.set_nodelay(true);
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| format!("server name {server_name}: {e}"))?;
    let mut conn = ClientConnection::new(cfg, name).map_err(|e| format!("client conn: {e}"))?;
    let deadline = Instant::now() + CLIENT_IO_TIMEOUT;
    while conn.is_handshaking() {
        if Instant::now() >= deadline {
            return Err("TLS handshake did not complete in time".into());
        }
        match conn.complete_io(&mut sock) {
            Ok((0, 0)) if conn.is_handshaking() => {
                return Err("TLS handshake: connection closed by peer".into())
            }
            Ok(_) => {}
            Err(e) => return Err(format!("TLS handshake: {e}")),
        }
    }
    while conn.wants_write() {
        conn.write_tls(&mut sock)
            .map_err(|e| format!("TLS handshake flush: {e}"))?;
    }
    Ok(StreamOwned::new(conn, sock))
}

/// The SHA-256 fingerprint (lower-case hex) of the end-entity certificate
/// the server presented on `s`.
pub fn peer_fingerprint(s: &TlsStream) -> String {
    let certs = s
        .conn
        .peer_certificates()
        .expect("server presented no certificate");
    fingerprint(certs[0].as_ref())
}

/// Blocking echo exchange on `s`: write `payload`, read exactly
/// `payload.len()` bytes back (bounded by the socket timeouts).
pub fn echo_exact(s: &mut TlsStream, payload: &[u8]) -> io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    s.write_all(payload)?;
    s.flush()?;
    let mut got = vec![0u8; payload.len()];
    s.read_exact(&mut got)?;
    Ok(got)
}

/// A minimal HTTP/1.1 request to the admin API over a plain TCP socket
/// (`Connection: close`, bounded by 10 s socket timeouts).  Returns
/// (status code, body).  `extra_headers` are full lines without CRLF.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &[&str],
    body: &[u8],
) -> io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    sock.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in extra_headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    sock.write_all(&bytes)?;
    sock.flush()?;
    // Read until EOF, or until the Content-Length worth of body arrived.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(hdr_end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..hdr_end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(len) = len {
                if buf.len() >= hdr_end + 4 + len {
                    buf.truncate(hdr_end + 4 + len);
                    break;
                }
            }
        }
        match sock.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let hdr_end = find(&buf, b"\r\n\r\n").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no HTTP header in {:?}", String::from_utf8_lossy(&buf)),
        )
    })?;
    let status_line = String::from_utf8_lossy(&buf[..hdr_end])
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, status_line.clone()))?;
    Ok((
        status,
        String::from_utf8_lossy(&buf[hdr_end + 4..]).into_owned(),
    ))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Polls `GET path` on the admin API until it answers 200 (at most
/// `timeout`); returns the body.  Panics with the last error otherwise.
pub fn admin_get(addr: SocketAddr, path: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match http_request(addr, "GET", path, &[], b"") {
            Ok((200, body)) => return body,
            Ok((code, body)) => format!("HTTP {code}: {body}"),
            Err(e) => format!("{e}"),
        };
        if Instant::now() >= deadline {
            panic!("GET {path} on admin {addr} did not answer 200 within {timeout:?}: {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of the first Prometheus sample named `name` whose labels
/// contain every `label="value"` pair in `labels` (`None` if absent).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        if !labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            return None;
        }
        value.trim().parse::<f64>().ok()
    })
}
