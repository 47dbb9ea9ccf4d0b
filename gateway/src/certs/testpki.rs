//! Test-only PKI: root CA -> intermediate CA -> leaves, CRLs, files in a
//! temporary directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    date_time_ymd, BasicConstraints, Certificate, CertificateParams,
    CertificateRevocationListParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};

use super::{CertSource, TrustConfig};

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Midnight UTC of a date.
pub fn at(year: i32, month: u8, day: u8) -> SystemTime {
    let secs = date_time_ymd(year, month, day).unix_timestamp();
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap())
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap()
}

#[derive(Clone, Copy, Debug)]
pub enum KeyKind {
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
    Ed25519,
}

impl KeyKind {
    fn generate(self) -> KeyPair {
        let alg = match self {
            KeyKind::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyKind::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
            KeyKind::Ed25519 => &rcgen::PKCS_ED25519,
        };
        KeyPair::generate_for(alg).unwrap()
    }
}

/// What leaf to issue.
pub struct LeafSpec {
    pub names: Vec<String>,
    pub common_name: String,
    pub kind: KeyKind,
    pub validity: (SystemTime, SystemTime),
    pub serial: u64,
    pub client: bool,
}

impl LeafSpec {
    /// A server-auth ECDSA P-256 leaf for `names`, CN = the first name,
    /// valid 2000..2100.
    pub fn server(names: &[&str]) -> LeafSpec {
        LeafSpec {
            names: names.iter().map(|s| s.to_string()).collect(),
            common_name: names.first().map(|s| s.to_string()).unwrap_or_default(),
            kind: KeyKind::EcdsaP256,
            validity: (at(2000, 1, 1), at(2100, 1, 1)),
            serial: 1000 + u64::from(rand_u16()),
            client: false,
        }
    }

    /// A client-auth leaf with subject `CN=<cn>,O=Corp` and no SANs.
    pub fn client(cn: &str) -> LeafSpec {
        LeafSpec {
            names: vec![],
            common_name: cn.to_owned(),
            client: true,
            ..LeafSpec::server(&[])
        }
    }
}

fn rand_u16() -> u16 {
    static N: AtomicU64 = AtomicU64::new(1);
    (N.fetch_add(1, Ordering::Relaxed) % 60000) as u16
}

pub struct Leaf {
    pub cert: Certificate,
    pub key: KeyPair,
}

impl Leaf {
    /// The leaf followed by the given intermediates, as PEM.
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
}

/// A certificate authority able to issue certificates and CRLs.
pub struct Ca {
    pub cert: Certificate,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
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
    params
}

impl Ca {
    pub fn root(cn: &str) -> Ca {
        let mut params = ca_params(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyKind::EcdsaP256.generate();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    pub fn intermediate_with_serial(&self, cn: &str, serial: u64) -> Ca {
        let mut params = ca_params(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.serial_number = Some(SerialNumber::from(serial));
        params.use_authority_key_identifier_extension = true;
        let key = KeyKind::EcdsaP384.generate();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Ca {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    pub fn intermediate(&self, cn: &str) -> Ca {
        self.intermediate_with_serial(cn, 77)
    }

    pub fn leaf(&self, spec: LeafSpec) -> Leaf {
        let mut params = CertificateParams::new(spec.names.clone()).unwrap();
        // Subject in DER order O, CN: RFC 4514 text "CN=...,O=Corp".
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Corp");
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.as_str());
        let epoch = date_time_ymd(1970, 1, 1);
        params.not_before = epoch + since_epoch(spec.validity.0);
        params.not_after = epoch + since_epoch(spec.validity.1);
        params.serial_number = Some(SerialNumber::from(spec.serial));
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if matches!(spec.kind, KeyKind::Rsa2048) {
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        params.extended_key_usages = vec![if spec.client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = spec.kind.generate();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert, key }
    }

    /// A CRL revoking `serials`, valid `this_update..next_update`.
    pub fn crl(
        &self,
        serials: &[u64],
        validity: (SystemTime, SystemTime),
    ) -> rcgen::CertificateRevocationList {
        let epoch = date_time_ymd(1970, 1, 1);
        let params = CertificateRevocationListParams {
            this_update: epoch + since_epoch(validity.0),
            next_update: epoch + since_epoch(validity.1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: epoch + since_epoch(validity.0),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).unwrap()
    }
}

/// Root -> intermediate, with the root bundle written to `roots`.
pub struct Pki {
    pub dir: TempDir,
    pub root: Ca,
    pub inter: Ca,
    pub inter_serial: u64,
    pub roots: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TempDir::new("gw-certs");
        let root = Ca::root("Test Root");
        let inter_serial = 77;
        let inter = root.intermediate_with_serial("Test Intermediate", inter_serial);
        let roots = dir.join("roots.pem");
        std::fs::write(&roots, root.cert.pem()).unwrap();
        Pki {
            dir,
            root,
            inter,
            inter_serial,
            roots,
        }
    }

    /// Trust in the root, with these CRL files.
    pub fn trust(&self, crls: &[PathBuf]) -> TrustConfig {
        TrustConfig {
            roots: Some(self.roots.clone()),
            crls: crls.to_vec(),
        }
    }

    /// Issues a leaf from the intermediate and writes chain + key files.
    pub fn source(&self, name: &str, spec: LeafSpec, sni: &[&str]) -> CertSource {
        let leaf = self.inter.leaf(spec);
        self.write_leaf(name, &leaf, sni)
    }

    /// Writes `leaf` + the intermediate as `<name>.pem`, the key as `<name>.key`.
    pub fn write_leaf(&self, name: &str, leaf: &Leaf, sni: &[&str]) -> CertSource {
        let cert = self.dir.join(&format!("{name}.pem"));
        let key = self.dir.join(&format!("{name}.key"));
        std::fs::write(&cert, leaf.chain_pem(&[&self.inter])).unwrap();
        std::fs::write(&key, leaf.key_pem()).unwrap();
        CertSource {
            name: name.to_owned(),
            cert,
            key,
            sni: sni.iter().map(|s| s.to_string()).collect(),
            default: false,
        }
    }

    /// Writes a CRL from `ca` (PEM or DER) and returns its path.
    pub fn write_crl(
        &self,
        file: &str,
        ca: &Ca,
        serials: &[u64],
        validity: (SystemTime, SystemTime),
        pem: bool,
    ) -> PathBuf {
        let crl = ca.crl(serials, validity);
        let path = self.dir.join(file);
        if pem {
            std::fs::write(&path, crl.pem().unwrap()).unwrap();
        } else {
            std::fs::write(&path, crl.der().as_ref()).unwrap();
        }
        path
    }
}

/// Runs a handshake over in-memory buffers. On failure, returns the
/// client's error (after delivering the server's alert to it).
pub fn handshake(
    client: &mut rustls::ClientConnection,
    server: &mut rustls::ServerConnection,
) -> Result<(), rustls::Error> {
    for _ in 0..20 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
        }
        let server_result = server.process_new_packets();
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
        }
        client.process_new_packets()?;
        server_result?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    Err(rustls::Error::General("handshake did not finish".into()))
}
