//! Facts read once from a leaf certificate: validity, names, key type,
//! fingerprint. Nothing here runs per handshake.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::objects::{oid2abbrev, oid_registry};
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519, OID_SIG_ED448,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::X509Name;

use super::CertError;

/// What the gateway reports about a leaf certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LeafInfo {
    pub not_before: i64,
    pub not_after: i64,
    pub subject: String,
    pub issuer: String,
    pub dns_names: Vec<String>,
    pub key_algorithm: String,
    pub fingerprint_sha256: String,
}

/// Parses `der` (the leaf found in `path`).
pub(crate) fn inspect_leaf(der: &CertificateDer<'_>, path: &Path) -> Result<LeafInfo, CertError> {
    let cert = parse(der, path)?;
    let validity = cert.validity();
    let mut dns_names = Vec::new();
    match cert.subject_alternative_name() {
        Ok(Some(san)) => {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(n) = name {
                    dns_names.push(n.to_ascii_lowercase());
                }
            }
        }
        Ok(None) => {}
        Err(e) => {
            return Err(CertError::Parse {
                path: path.to_owned(),
                message: format!("subjectAltName: {e}"),
            })
        }
    }
    Ok(LeafInfo {
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        subject: format_dn(cert.subject()),
        issuer: format_dn(cert.issuer()),
        dns_names,
        key_algorithm: key_algorithm(&cert),
        fingerprint_sha256: hex(&Sha256::digest(der.as_ref())),
    })
}

/// Parses a DER certificate, rejecting trailing bytes.
pub(crate) fn parse<'a>(
    der: &'a CertificateDer<'_>,
    path: &Path,
) -> Result<X509Certificate<'a>, CertError> {
    let err = |message: String| CertError::Parse {
        path: path.to_owned(),
        message,
    };
    match X509Certificate::from_der(der.as_ref()) {
        Ok((rest, _)) if !rest.is_empty() => Err(err(format!(
            "{} bytes of trailing data after the certificate",
            rest.len()
        ))),
        Ok((_, cert)) => Ok(cert),
        Err(e) => Err(err(e.to_string())),
    }
}

/// "ECDSA P-256", "RSA 2048", "Ed25519", ...
fn key_algorithm(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| Oid::try_from(p).ok());
        let name = match curve {
            Some(c) if c == OID_EC_P256 => "P-256".to_owned(),
            Some(c) if c == OID_NIST_EC_P384 => "P-384".to_owned(),
            Some(c) if c == OID_NIST_EC_P521 => "P-521".to_owned(),
            Some(c) => c.to_id_string(),
            None => "(unknown curve)".to_owned(),
        };
        format!("ECDSA {name}")
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => format!("RSA {}", bit_length(rsa.modulus)),
            _ => "RSA".to_owned(),
        }
    } else if *alg == OID_SIG_ED25519 {
        "Ed25519".to_owned()
    } else if *alg == OID_SIG_ED448 {
        "Ed448".to_owned()
    } else {
        format!("unknown ({})", alg.to_id_string())
    }
}

/// Bit length of a big-endian unsigned integer.
fn bit_length(be: &[u8]) -> usize {
    let digits: Vec<u8> = be.iter().copied().skip_while(|b| *b == 0).collect();
    match digits.first() {
        Some(first) => (digits.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
        None => 0,
    }
}

/// Lower-case hex without separators.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A distinguished name as an RFC 4514 string: most specific RDN first,
/// `,` between RDNs, `+` inside multi-valued RDNs, e.g. `CN=alice,O=Corp`.
/// Attributes without a known short name appear as dotted OIDs; values that
/// are not strings as `#` and hex of the DER value.
pub(crate) fn format_dn(name: &X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let key = match oid2abbrev(attr.attr_type(), oid_registry()) {
                        Ok(abbrev) => abbrev.to_owned(),
                        Err(_) => attr.attr_type().to_id_string(),
                    };
                    let value = match attr.as_str() {
                        Ok(s) => escape_dn_value(s),
                        Err(_) => format!("#{}", hex(attr.as_slice())),
                    };
                    format!("{key}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// RFC 4514 section 2.4 escaping.
fn escape_dn_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let last = s.chars().count().saturating_sub(1);
    for (i, c) in s.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if c == '\0' {
            out.push_str("\\00");
        } else if special {
            out.push('\\');
            out.push(c);
        } else if c.is_control() {
            // Keep log and PROXY-header consumers safe from raw control bytes.
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("\\{b:02x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Seconds since the Unix epoch (negative before it).
pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// RFC 3339 UTC, whole seconds: `2030-01-01T00:00:00Z`.
pub(crate) fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // d is in 1..=31 and m in 1..=12 by construction.
    (y, m as u32, d as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::testpki::{at, Ca, KeyKind, LeafSpec};

    #[test]
    fn leaf_facts_for_each_key_type() {
        let root = Ca::root("Test Root");
        let inter = root.intermediate("Test Intermediate");
        for (kind, expect) in [
            (KeyKind::EcdsaP256, "ECDSA P-256"),
            (KeyKind::EcdsaP384, "ECDSA P-384"),
            (KeyKind::Rsa2048, "RSA 2048"),
            (KeyKind::Ed25519, "Ed25519"),
        ] {
            let mut spec = LeafSpec::server(&["API.example.com", "*.example.org"]);
            spec.kind = kind;
            spec.validity = (at(2024, 1, 1), at(2030, 6, 1));
            let leaf = inter.leaf(spec);
            let info = inspect_leaf(leaf.cert.der(), Path::new("x.pem")).unwrap();
            assert_eq!(info.key_algorithm, expect);
            assert_eq!(info.dns_names, ["api.example.com", "*.example.org"]);
            assert_eq!(info.subject, "CN=API.example.com,O=Corp");
            assert_eq!(info.issuer, "CN=Test Intermediate,O=Corp");
            assert_eq!(rfc3339(info.not_before), "2024-01-01T00:00:00Z");
            assert_eq!(rfc3339(info.not_after), "2030-06-01T00:00:00Z");
            let fp = hex(&Sha256::digest(leaf.cert.der().as_ref()));
            assert_eq!(info.fingerprint_sha256, fp);
            assert_eq!(fp.len(), 64);
        }
    }

    #[test]
    fn garbage_der_is_a_parse_error_naming_the_file() {
        let der = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let e = inspect_leaf(&der, Path::new("/etc/gw/bad.pem")).unwrap_err();
        assert!(matches!(e, CertError::Parse { .. }), "{e}");
        assert!(e.to_string().contains("/etc/gw/bad.pem"), "{e}");
    }

    #[test]
    fn dn_escaping_and_bits() {
        assert_eq!(escape_dn_value("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape_dn_value(" #x "), "\\ #x\\ ");
        assert_eq!(escape_dn_value("a\nb"), "a\\0ab");
        assert_eq!(bit_length(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(bit_length(&[0x01, 0xff]), 9);
        assert_eq!(bit_length(&[]), 0);
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(rfc3339(68_043_243_391), "4126-03-16T12:56:31Z");
        assert_eq!(
            unix_secs(UNIX_EPOCH - std::time::Duration::from_secs(5)),
            -5
        );
    }
}
