//! Throw-away PKI: root CA -> leaf for `localhost` + `127.0.0.1` (ECDSA P-256).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;

use crate::util::TempDir;

/// PEM files in a temp dir:
/// * `chain.pem`: the leaf certificate only,
/// * `key.pem`: the leaf's PKCS#8 private key,
/// * `ca.pem`: the root CA certificate (what clients trust).
pub struct Pki {
    pub dir: TempDir,
    pub chain: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub ca_der: CertificateDer<'static>,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TempDir::new("gw-pki");

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mcp-tls-gateway test root CA");
        ca_params
            .distinguished_name
            .push(DnType::OrganizationName, "gateway-tests");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("ca key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign ca");
        let issuer = Issuer::new(ca_params, ca_key);

        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
        leaf_params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf_params.use_authority_key_identifier_extension = true;
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &issuer)
            .expect("sign leaf");

        let chain = dir.join("chain.pem");
        let key = dir.join("key.pem");
        let ca = dir.join("ca.pem");
        std::fs::write(&chain, leaf_cert.pem()).expect("write chain.pem");
        std::fs::write(&key, leaf_key.serialize_pem()).expect("write key.pem");
        std::fs::write(&ca, ca_cert.pem()).expect("write ca.pem");

        Pki {
            dir,
            chain,
            key,
            ca,
            ca_der: ca_cert.der().clone(),
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}
