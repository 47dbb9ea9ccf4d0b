//! The immutable, validated certificate set and SNI selection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, SignatureScheme};

use super::files::{load_chain, load_key};
use super::inspect::{inspect_leaf, rfc3339, unix_secs, LeafInfo};
use super::trust::{load_trust, Trust};
use super::{CertError, CertSource, TrustConfig};

/// One validated certificate with everything the gateway reports about it.
#[derive(Debug)]
pub struct CertEntry {
    /// Unique name from the configuration.
    pub name: String,
    /// Chain and signing key handed to rustls.
    pub key: Arc<CertifiedKey>,
    /// SNI names served (lower case; `*.` wildcards allowed).
    pub sni: Vec<String>,
    /// notBefore, Unix seconds.
    pub not_before: i64,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// Leaf subject DN (RFC 4514).
    pub subject: String,
    /// Leaf issuer DN (RFC 4514).
    pub issuer: String,
    /// Leaf DNS subject alternative names (lower case).
    pub dns_names: Vec<String>,
    /// "ECDSA P-256", "RSA 2048", "Ed25519", ...
    pub key_algorithm: String,
    /// SHA-256 of the leaf certificate's DER, lower-case hex.
    pub fingerprint_sha256: String,
    /// Where it came from (files, SNI and default settings).
    pub source: CertSource,
    /// Unix seconds of the last "refusing expired certificate" log line
    /// (0: never), for lock-free rate limiting.
    last_refusal_log: AtomicU64,
}

/// How long to stay quiet after logging a refused handshake for an entry.
pub(crate) const REFUSAL_LOG_INTERVAL_SECS: u64 = 60;

impl CertEntry {
    /// Whether `now_unix` lies within notBefore..=notAfter.
    pub fn is_current(&self, now_unix: i64) -> bool {
        self.not_before <= now_unix && now_unix <= self.not_after
    }

    /// True at most once per [`REFUSAL_LOG_INTERVAL_SECS`] for this entry.
    pub(crate) fn should_log_refusal(&self, now_unix: i64) -> bool {
        let now = u64::try_from(now_unix).unwrap_or(0).max(1);
        let last = self.last_refusal_log.load(Ordering::Relaxed);
        if last != 0 && now < last.saturating_add(REFUSAL_LOG_INTERVAL_SECS) {
            return false;
        }
        self.last_refusal_log
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    fn state(&self, now_unix: i64, warn: Duration) -> CertState {
        let warn = i64::try_from(warn.as_secs()).unwrap_or(i64::MAX);
        if now_unix < self.not_before {
            CertState::NotYetValid
        } else if now_unix > self.not_after {
            CertState::Expired
        } else if self.not_after - now_unix <= warn {
            CertState::Expiring
        } else {
            CertState::Valid
        }
    }
}

/// Validity of a certificate at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertState {
    /// Valid, and not within the warning window of its expiry.
    Valid,
    /// Valid, but expires within the warning window.
    Expiring,
    /// Past notAfter.
    Expired,
    /// Before notBefore.
    NotYetValid,
}

/// One certificate as reported by the admin API (`GET /certs`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    pub name: String,
    pub default: bool,
    pub sni: Vec<String>,
    pub subject: String,
    pub issuer: String,
    pub dns_names: Vec<String>,
    pub key_algorithm: String,
    pub fingerprint_sha256: String,
    /// RFC 3339 UTC.
    pub not_before: String,
    /// RFC 3339 UTC.
    pub not_after: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    /// Negative once expired.
    pub seconds_to_expiry: i64,
    pub state: CertState,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The outcome of choosing a certificate for one handshake.
#[derive(Debug)]
pub enum Selection<'a> {
    /// Serve this entry.
    Serve(&'a Arc<CertEntry>),
    /// The matching entry is expired or not yet valid: refuse the handshake.
    Refuse(&'a Arc<CertEntry>),
    /// Nothing matched (or no match supports the client's signature schemes).
    NoMatch,
}

/// An immutable, validated set of server certificates with SNI indexes.
#[derive(Debug)]
pub struct CertSet {
    entries: Vec<Arc<CertEntry>>,
    default: usize,
    /// Exact lower-case name -> entry indexes, in configuration order.
    exact: HashMap<String, Vec<usize>>,
    /// Wildcard suffix ("example.com" for "*.example.com") -> entry indexes.
    wildcard: HashMap<String, Vec<usize>>,
}

/// Loads and validates every source (see the module docs for the checks):
/// PEM syntax, key/leaf match, validity at `now`, the chain against
/// `trust.roots` with CRLs, names and defaults.
pub fn load_set(
    sources: &[CertSource],
    trust: &TrustConfig,
    now: SystemTime,
) -> Result<CertSet, CertError> {
    check_sources(sources)?;
    let trust = load_trust(trust, now)?;
    let mut entries = Vec::with_capacity(sources.len());
    for src in sources {
        let chain = load_chain(&src.cert)?;
        let key = load_key(&src.key)?;
        let entry = build_entry(src, chain, key, &src.cert, &src.key, trust.as_ref(), now)?;
        entries.push(Arc::new(entry));
    }
    CertSet::assemble(entries)
}

/// Name, uniqueness and default checks, before touching any file.
fn check_sources(sources: &[CertSource]) -> Result<(), CertError> {
    if sources.is_empty() {
        return Err(CertError::NoCertificates);
    }
    let mut default: Option<&str> = None;
    for (i, src) in sources.iter().enumerate() {
        if src.name.trim().is_empty() {
            return Err(CertError::EmptyName {
                path: src.cert.clone(),
            });
        }
        if sources[..i].iter().any(|s| s.name == src.name) {
            return Err(CertError::DuplicateName {
                name: src.name.clone(),
                path: src.cert.clone(),
            });
        }
        if src.default {
            if let Some(first) = default {
                return Err(CertError::MultipleDefaults {
                    first: first.to_owned(),
                    second: src.name.clone(),
                });
            }
            default = Some(&src.name);
        }
    }
    Ok(())
}

/// Validates one chain + key; `cert_origin`/`key_origin` name them in errors.
fn build_entry(
    src: &CertSource,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_origin: &Path,
    key_origin: &Path,
    trust: Option<&Trust>,
    now: SystemTime,
) -> Result<CertEntry, CertError> {
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: cert_origin.to_owned(),
        });
    };
    let info: LeafInfo = inspect_leaf(leaf, cert_origin)?;

    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::Key {
            path: key_origin.to_owned(),
            message: format!("unsupported or malformed key: {e}"),
        })?;
    let certified = CertifiedKey::new(chain.clone(), signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            return Err(CertError::KeyMismatch {
                cert: cert_origin.to_owned(),
                key: key_origin.to_owned(),
            })
        }
        Err(e) => {
            return Err(CertError::Parse {
                path: cert_origin.to_owned(),
                message: e.to_string(),
            })
        }
    }

    let now_unix = unix_secs(now);
    if now_unix < info.not_before {
        return Err(CertError::NotYetValid {
            path: cert_origin.to_owned(),
            not_before: rfc3339(info.not_before),
        });
    }
    if now_unix > info.not_after {
        return Err(CertError::Expired {
            path: cert_origin.to_owned(),
            not_after: rfc3339(info.not_after),
        });
    }
    if let Some(trust) = trust {
        trust.verify(&chain, cert_origin, now)?;
    }

    let wanted = if src.sni.is_empty() {
        &info.dns_names
    } else {
        &src.sni
    };
    let mut sni = Vec::with_capacity(wanted.len());
    for name in wanted {
        let normal = normalize_sni(name).map_err(|message| CertError::InvalidSni {
            name: src.name.clone(),
            path: src.cert.clone(),
            sni: name.clone(),
            message,
        })?;
        if !info.dns_names.iter().any(|san| san_covers(san, &normal)) {
            tracing::warn!(
                certificate = %src.name,
                sni = %normal,
                "certificate \"{}\" ({}) is served for \"{}\" but its SAN names ({}) do not cover it; clients will reject it",
                src.name,
                cert_origin.display(),
                normal,
                info.dns_names.join(", "),
            );
        }
        if !sni.contains(&normal) {
            sni.push(normal);
        }
    }

    Ok(CertEntry {
        name: src.name.clone(),
        key: Arc::new(certified),
        sni,
        not_before: info.not_before,
        not_after: info.not_after,
        subject: info.subject,
        issuer: info.issuer,
        dns_names: info.dns_names,
        key_algorithm: info.key_algorithm,
        fingerprint_sha256: info.fingerprint_sha256,
        source: src.clone(),
        last_refusal_log: AtomicU64::new(0),
    })
}

/// Lower-cases and checks an SNI name: a DNS name, or `*.` followed by a
/// DNS name of at least two labels.
fn normalize_sni(name: &str) -> Result<String, String> {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with('.') {
        return Err("must not end with a dot".into());
    }
    let base = match lower.strip_prefix("*.") {
        Some(rest) => {
            if !rest.contains('.') {
                return Err("a wildcard needs at least two labels after \"*.\"".into());
            }
            rest
        }
        None => &lower,
    };
    if base.contains('*') {
        return Err("\"*\" is only allowed as the whole first label".into());
    }
    DnsName::try_from(base).map_err(|_| "not a valid DNS name".to_owned())?;
    Ok(lower)
}

/// Whether the SAN entry `san` (maybe a wildcard) covers the SNI name `sni`
/// (maybe a wildcard itself).
fn san_covers(san: &str, sni: &str) -> bool {
    if san == sni {
        return true;
    }
    match (san.strip_prefix("*."), sni.split_once('.')) {
        (Some(suffix), Some((label, rest))) => !label.is_empty() && label != "*" && rest == suffix,
        _ => false,
    }
}

impl CertSet {
    /// Indexes validated entries; checks names and defaults.
    fn assemble(entries: Vec<Arc<CertEntry>>) -> Result<CertSet, CertError> {
        let sources: Vec<CertSource> = entries.iter().map(|e| e.source.clone()).collect();
        check_sources(&sources)?;
        let default = entries.iter().position(|e| e.source.default).unwrap_or(0);
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            for name in &e.sni {
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_owned()).or_default().push(i),
                    None => exact.entry(name.clone()).or_default().push(i),
                }
            }
        }
        Ok(CertSet {
            entries,
            default,
            exact,
            wildcard,
        })
    }

    /// All entries, in configuration order.
    pub fn entries(&self) -> &[Arc<CertEntry>] {
        &self.entries
    }

    /// The entry with this name.
    pub fn get(&self, name: &str) -> Option<&Arc<CertEntry>> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The entry served when no SNI name matches.
    pub fn default_entry(&self) -> &Arc<CertEntry> {
        &self.entries[self.default]
    }

    /// Entries for `server_name`: exact matches, then `*.` matches of exactly
    /// one label, in configuration order; the default entry when neither
    /// matches or there is no name.
    pub fn candidates(&self, server_name: Option<&str>) -> Vec<&Arc<CertEntry>> {
        let mut out = Vec::new();
        if let Some(name) = server_name {
            let name = name.strip_suffix('.').unwrap_or(name);
            let lower;
            let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                lower = name.to_ascii_lowercase();
                lower.as_str()
            } else {
                name
            };
            if let Some(ix) = self.exact.get(name) {
                out.extend(ix.iter().map(|&i| &self.entries[i]));
            }
            if let Some((label, rest)) = name.split_once('.') {
                if !label.is_empty() {
                    if let Some(ix) = self.wildcard.get(rest) {
                        out.extend(ix.iter().map(|&i| &self.entries[i]));
                    }
                }
            }
        }
        if out.is_empty() {
            out.push(self.default_entry());
        }
        out
    }

    /// Chooses the entry for a handshake: the first candidate whose key
    /// supports one of the client's `schemes` and is valid at `now_unix`.
    /// If the only usable candidates are outside their validity, the first
    /// of them is returned as [`Selection::Refuse`].
    pub fn select(
        &self,
        server_name: Option<&str>,
        schemes: &[SignatureScheme],
        now_unix: i64,
    ) -> Selection<'_> {
        let mut refused = None;
        for entry in self.candidates(server_name) {
            if entry.key.key.choose_scheme(schemes).is_none() {
                continue;
            }
            if entry.is_current(now_unix) {
                return Selection::Serve(entry);
            }
            refused.get_or_insert(entry);
        }
        match refused {
            Some(e) => Selection::Refuse(e),
            None => Selection::NoMatch,
        }
    }

    /// Status of every entry at `now`; `warn` is the "expiring" window.
    pub fn info(&self, now: SystemTime, warn: Duration) -> Vec<CertInfo> {
        let now = unix_secs(now);
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| CertInfo {
                name: e.name.clone(),
                default: i == self.default,
                sni: e.sni.clone(),
                subject: e.subject.clone(),
                issuer: e.issuer.clone(),
                dns_names: e.dns_names.clone(),
                key_algorithm: e.key_algorithm.clone(),
                fingerprint_sha256: e.fingerprint_sha256.clone(),
                not_before: rfc3339(e.not_before),
                not_after: rfc3339(e.not_after),
                not_before_unix: e.not_before,
                not_after_unix: e.not_after,
                seconds_to_expiry: e.not_after.saturating_sub(now),
                state: e.state(now, warn),
                cert_file: e.source.cert.clone(),
                key_file: e.source.key.clone(),
            })
            .collect()
    }

    /// `(name, seconds_to_expiry)` of entries expiring within `warn` of
    /// `now`, including already expired ones (negative seconds).
    pub fn expiring(&self, now: SystemTime, warn: Duration) -> Vec<(String, i64)> {
        let now = unix_secs(now);
        let warn = i64::try_from(warn.as_secs()).unwrap_or(i64::MAX);
        self.entries
            .iter()
            .map(|e| (e.name.clone(), e.not_after.saturating_sub(now)))
            .filter(|(_, left)| *left <= warn)
            .collect()
    }

    /// A new set with entry `name` replaced by `chain` + `key` (an upload),
    /// validated exactly like [`load_set`] does. The entry keeps its files,
    /// SNI and default settings; `self` is unchanged either way.
    pub fn with_replacement(
        &self,
        name: &str,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        trust: &TrustConfig,
        now: SystemTime,
    ) -> Result<CertSet, CertError> {
        let Some(pos) = self.entries.iter().position(|e| e.name == name) else {
            return Err(CertError::UnknownName {
                name: name.to_owned(),
            });
        };
        let trust = load_trust(trust, now)?;
        let origin = PathBuf::from(format!("upload for certificate \"{name}\""));
        let src = &self.entries[pos].source;
        let entry = build_entry(src, chain, key, &origin, &origin, trust.as_ref(), now)?;
        let mut entries = self.entries.clone();
        entries[pos] = Arc::new(entry);
        CertSet::assemble(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::testpki::{at, Ca, KeyKind, LeafSpec, Pki};

    const ALL_SCHEMES: &[SignatureScheme] = &[
        SignatureScheme::ECDSA_NISTP256_SHA256,
        SignatureScheme::ECDSA_NISTP384_SHA384,
        SignatureScheme::ED25519,
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PKCS1_SHA256,
    ];

    fn names(sel: Selection<'_>) -> String {
        match sel {
            Selection::Serve(e) => format!("serve {}", e.name),
            Selection::Refuse(e) => format!("refuse {}", e.name),
            Selection::NoMatch => "none".into(),
        }
    }

    #[test]
    fn good_chains_of_each_key_type_load_and_select() {
        let pki = Pki::new();
        let mut ec = LeafSpec::server(&["api.example.com"]);
        ec.kind = KeyKind::EcdsaP256;
        let mut rsa = LeafSpec::server(&["api.example.com"]);
        rsa.kind = KeyKind::Rsa2048;
        let mut ed = LeafSpec::server(&["*.example.com", "example.com"]);
        ed.kind = KeyKind::Ed25519;
        let sources = vec![
            pki.source("ec", ec, &[]),
            pki.source("rsa", rsa, &[]),
            pki.source("ed", ed, &["*.example.com"]),
        ];
        let set = load_set(&sources, &pki.trust(&[]), at(2026, 1, 1)).unwrap();
        assert_eq!(set.default_entry().name, "ec");
        let algs: Vec<_> = set
            .entries()
            .iter()
            .map(|e| e.key_algorithm.as_str())
            .collect();
        assert_eq!(algs, ["ECDSA P-256", "RSA 2048", "Ed25519"]);
        assert_eq!(set.get("ed").unwrap().sni, ["*.example.com"]);
        assert_eq!(set.get("ec").unwrap().sni, ["api.example.com"]);
        let now = unix_secs(at(2026, 1, 1));

        // Exact match, first entry that supports the schemes.
        assert_eq!(
            names(set.select(Some("API.Example.com"), ALL_SCHEMES, now)),
            "serve ec"
        );
        let rsa_only = &[SignatureScheme::RSA_PSS_SHA256];
        assert_eq!(
            names(set.select(Some("api.example.com"), rsa_only, now)),
            "serve rsa"
        );
        // Exact candidates first, then the wildcard ones.
        let ed_only = &[SignatureScheme::ED25519];
        assert_eq!(
            names(set.select(Some("api.example.com"), ed_only, now)),
            "serve ed"
        );
        // Wildcards match exactly one label.
        assert_eq!(
            names(set.select(Some("www.example.com"), ALL_SCHEMES, now)),
            "serve ed"
        );
        assert_eq!(
            names(set.select(Some("a.b.example.com"), ALL_SCHEMES, now)),
            "serve ec"
        );
        // No SNI, unknown name: the default.
        assert_eq!(names(set.select(None, ALL_SCHEMES, now)), "serve ec");
        assert_eq!(
            names(set.select(Some("other.test"), ALL_SCHEMES, now)),
            "serve ec"
        );
        // The default cannot sign with what the client offers.
        assert_eq!(names(set.select(Some("other.test"), ed_only, now)), "none");
    }

    #[test]
    fn explicit_default_and_name_rules() {
        let pki = Pki::new();
        let a = pki.source("a", LeafSpec::server(&["a.example.com"]), &[]);
        let mut b = pki.source("b", LeafSpec::server(&["b.example.com"]), &[]);
        b.default = true;
        let set = load_set(
            &[a.clone(), b.clone()],
            &TrustConfig::default(),
            at(2026, 1, 1),
        )
        .unwrap();
        assert_eq!(set.default_entry().name, "b");

        let e = load_set(&[], &TrustConfig::default(), at(2026, 1, 1)).unwrap_err();
        assert!(matches!(e, CertError::NoCertificates), "{e}");

        let mut a2 = a.clone();
        a2.default = true;
        let e = load_set(&[a2, b.clone()], &TrustConfig::default(), at(2026, 1, 1)).unwrap_err();
        assert!(matches!(e, CertError::MultipleDefaults { .. }), "{e}");

        let e = load_set(
            &[a.clone(), a.clone()],
            &TrustConfig::default(),
            at(2026, 1, 1),
        )
        .unwrap_err();
        assert!(matches!(e, CertError::DuplicateName { .. }), "{e}");

        for bad in [
            "*.com",
            "a.*.example.com",
            "bad_name!.com",
            "example.com.",
            "*",
        ] {
            let mut s = a.clone();
            s.sni = vec![bad.into()];
            let e = load_set(&[s], &TrustConfig::default(), at(2026, 1, 1)).unwrap_err();
            assert!(matches!(e, CertError::InvalidSni { .. }), "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn each_failure_has_its_variant_and_names_the_file() {
        let pki = Pki::new();
        let now = at(2026, 1, 1);
        let trust = pki.trust(&[]);
        let check =
            |src: CertSource, trust: &TrustConfig, want: fn(&CertError) -> bool, file: &Path| {
                let e = load_set(&[src], trust, now).unwrap_err();
                assert!(want(&e), "unexpected variant: {e:?}");
                assert!(e.to_string().contains(&*file.to_string_lossy()), "{e}");
                e.to_string()
            };

        // Issued by another root.
        let other = Ca::root("Other Root");
        let leaf = other.leaf(LeafSpec::server(&["a.example.com"]));
        let src = pki.write_leaf("wrongroot", &leaf, &[]);
        let msg = check(
            src.clone(),
            &trust,
            |e| matches!(e, CertError::UntrustedIssuer { .. }),
            &src.cert,
        );
        assert!(msg.contains("not issued by the trust roots in"), "{msg}");
        assert!(msg.contains(&*pki.roots.to_string_lossy()), "{msg}");
        // Without roots configured, the same certificate is fine.
        load_set(&[src], &TrustConfig::default(), now).unwrap();

        // Expired and not yet valid, checked even without roots.
        let mut spec = LeafSpec::server(&["a.example.com"]);
        spec.validity = (at(2020, 1, 1), at(2025, 6, 1));
        let src = pki.source("old", spec, &[]);
        let msg = check(
            src.clone(),
            &TrustConfig::default(),
            |e| matches!(e, CertError::Expired { .. }),
            &src.cert,
        );
        assert!(msg.contains("expired at 2025-06-01T00:00:00Z"), "{msg}");
        let mut spec = LeafSpec::server(&["a.example.com"]);
        spec.validity = (at(2027, 1, 1), at(2028, 1, 1));
        let src = pki.source("future", spec, &[]);
        let msg = check(
            src.clone(),
            &TrustConfig::default(),
            |e| matches!(e, CertError::NotYetValid { .. }),
            &src.cert,
        );
        assert!(msg.contains("2027-01-01T00:00:00Z"), "{msg}");

        // Key of another certificate.
        let a = pki.source("a", LeafSpec::server(&["a.example.com"]), &[]);
        let b = pki.source("b", LeafSpec::server(&["b.example.com"]), &[]);
        let mixed = CertSource {
            key: b.key.clone(),
            ..a.clone()
        };
        let msg = check(
            mixed,
            &trust,
            |e| matches!(e, CertError::KeyMismatch { .. }),
            &a.cert,
        );
        assert!(msg.contains(&*b.key.to_string_lossy()), "{msg}");

        // Corrupt PEM, no certificate, bad key, missing file.
        let bad = pki.dir.join("corrupt.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        check(
            CertSource {
                cert: bad.clone(),
                ..a.clone()
            },
            &trust,
            |e| matches!(e, CertError::Pem { .. }),
            &bad,
        );
        check(
            CertSource {
                cert: a.key.clone(),
                ..a.clone()
            },
            &trust,
            |e| matches!(e, CertError::NoCertificate { .. }),
            &a.key,
        );
        check(
            CertSource {
                key: a.cert.clone(),
                ..a.clone()
            },
            &trust,
            |e| matches!(e, CertError::Key { .. }),
            &a.cert,
        );
        let garbage_key = pki.dir.join("garbage.key");
        std::fs::write(
            &garbage_key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        check(
            CertSource {
                key: garbage_key.clone(),
                ..a.clone()
            },
            &trust,
            |e| matches!(e, CertError::Key { .. }),
            &garbage_key,
        );
        let missing = pki.dir.join("missing.pem");
        check(
            CertSource {
                cert: missing.clone(),
                ..a.clone()
            },
            &trust,
            |e| matches!(e, CertError::Read { .. }),
            &missing,
        );
        let garbage_der = pki.dir.join("garbage-der.pem");
        std::fs::write(
            &garbage_der,
            "-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        check(
            CertSource {
                cert: garbage_der.clone(),
                ..a
            },
            &trust,
            |e| matches!(e, CertError::Parse { .. }),
            &garbage_der,
        );
    }

    #[test]
    fn crls_refuse_revoked_leaves_and_intermediates() {
        let pki = Pki::new();
        let now = at(2026, 1, 1);
        let mut spec = LeafSpec::server(&["r.example.com"]);
        spec.serial = 4242;
        let revoked = pki.source("revoked", spec, &[]);
        let good = pki.source("good", LeafSpec::server(&["g.example.com"]), &[]);

        // The intermediate's CRL lists the leaf; the root's CRL lists nothing.
        let inter_crl = pki.write_crl(
            "inter.crl",
            &pki.inter,
            &[4242],
            (at(2025, 1, 1), at(2027, 1, 1)),
            false,
        );
        let root_crl = pki.write_crl(
            "root.crl",
            &pki.root,
            &[],
            (at(2025, 1, 1), at(2027, 1, 1)),
            true,
        );
        let trust = pki.trust(&[root_crl.clone(), inter_crl.clone()]);
        let e = load_set(&[good.clone(), revoked.clone()], &trust, now).unwrap_err();
        assert!(matches!(e, CertError::Revoked { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&*revoked.cert.to_string_lossy()), "{msg}");
        assert!(
            msg.contains(&format!("revoked per CRL {}", inter_crl.display())),
            "{msg}"
        );
        load_set(std::slice::from_ref(&good), &trust, now).unwrap();

        // An expired CRL is still used (and only warned about).
        let stale = pki.write_crl(
            "stale.crl",
            &pki.inter,
            &[4242],
            (at(2024, 1, 1), at(2025, 1, 1)),
            true,
        );
        let e = load_set(std::slice::from_ref(&revoked), &pki.trust(&[stale]), now).unwrap_err();
        assert!(matches!(e, CertError::Revoked { .. }), "{e:?}");

        // The root revokes the intermediate: every leaf under it is refused.
        let inter_serial = pki.inter_serial;
        let root_revokes = pki.write_crl(
            "root-revokes.crl",
            &pki.root,
            &[inter_serial],
            (at(2025, 1, 1), at(2027, 1, 1)),
            false,
        );
        let e = load_set(
            std::slice::from_ref(&good),
            &pki.trust(std::slice::from_ref(&root_revokes)),
            now,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("revoked per CRL {}", root_revokes.display())),
            "{e}"
        );

        // Unknown status (no CRL from the intermediate) is allowed.
        load_set(std::slice::from_ref(&good), &pki.trust(&[root_crl]), now).unwrap();

        // CRLs without roots, and a corrupt CRL.
        let no_roots = TrustConfig {
            roots: None,
            crls: vec![inter_crl],
        };
        let e = load_set(std::slice::from_ref(&good), &no_roots, now).unwrap_err();
        assert!(matches!(e, CertError::CrlsWithoutRoots { .. }), "{e}");
        let junk = pki.dir.join("junk.crl");
        std::fs::write(&junk, b"\x30\x03\x02\x01\x01").unwrap();
        let e = load_set(&[good], &pki.trust(std::slice::from_ref(&junk)), now).unwrap_err();
        assert!(matches!(e, CertError::Crl { .. }), "{e}");
        assert!(e.to_string().contains(&*junk.to_string_lossy()), "{e}");
    }

    #[test]
    fn info_and_expiring_report_states() {
        let pki = Pki::new();
        let mut soon = LeafSpec::server(&["soon.example.com"]);
        soon.validity = (at(2025, 1, 1), at(2026, 1, 11));
        let mut later = LeafSpec::server(&["later.example.com"]);
        later.validity = (at(2025, 1, 1), at(2030, 1, 1));
        let set = load_set(
            &[
                pki.source("soon", soon, &[]),
                pki.source("later", later, &[]),
            ],
            &pki.trust(&[]),
            at(2026, 1, 1),
        )
        .unwrap();
        let warn = Duration::from_secs(30 * 86400);
        let info = set.info(at(2026, 1, 1), warn);
        assert_eq!(info[0].state, CertState::Expiring);
        assert_eq!(info[0].seconds_to_expiry, 10 * 86400);
        assert!(info[0].default);
        assert_eq!(info[1].state, CertState::Valid);
        assert_eq!(info[1].not_after, "2030-01-01T00:00:00Z");
        assert_eq!(info[1].issuer, "CN=Test Intermediate,O=Corp");
        let info = set.info(at(2026, 2, 1), warn);
        assert_eq!(info[0].state, CertState::Expired);
        assert!(info[0].seconds_to_expiry < 0);
        let info = set.info(at(2024, 2, 1), warn);
        assert_eq!(info[0].state, CertState::NotYetValid);
        let json = serde_json::to_value(&info[0]).unwrap();
        assert_eq!(json["state"], "not_yet_valid");
        assert_eq!(json["name"], "soon");
        assert_eq!(json["seconds_to_expiry"], info[0].seconds_to_expiry);

        assert_eq!(
            set.expiring(at(2026, 1, 1), warn),
            [("soon".to_owned(), 10 * 86400)]
        );
        assert_eq!(set.expiring(at(2026, 1, 1), Duration::from_secs(86400)), []);
        assert_eq!(
            set.expiring(at(2026, 1, 12), Duration::ZERO),
            [("soon".to_owned(), -86400)]
        );
    }

    #[test]
    fn replacement_swaps_one_entry_and_failures_change_nothing() {
        let pki = Pki::new();
        let now = at(2026, 1, 1);
        let trust = pki.trust(&[]);
        let a = pki.source("a", LeafSpec::server(&["a.example.com"]), &[]);
        let b = pki.source("b", LeafSpec::server(&["b.example.com"]), &[]);
        let set = load_set(&[a, b], &trust, now).unwrap();
        let old_a = set.get("a").unwrap().fingerprint_sha256.clone();
        let b_arc = set.get("b").unwrap().clone();

        let mut spec = LeafSpec::server(&["a.example.com"]);
        spec.kind = KeyKind::Ed25519;
        let new_leaf = pki.inter.leaf(spec);
        let body = format!(
            "{}{}",
            new_leaf.key_pem(),
            new_leaf.chain_pem(&[&pki.inter])
        );
        let (chain, key) = crate::certs::parse_pem_bundle(body.as_bytes()).unwrap();
        let new = set.with_replacement("a", chain, key, &trust, now).unwrap();
        let a2 = new.get("a").unwrap();
        assert_ne!(a2.fingerprint_sha256, old_a);
        assert_eq!(a2.key_algorithm, "Ed25519");
        assert_eq!(a2.sni, ["a.example.com"]);
        assert!(
            Arc::ptr_eq(new.get("b").unwrap(), &b_arc),
            "untouched entries are shared"
        );
        assert_eq!(
            set.get("a").unwrap().fingerprint_sha256,
            old_a,
            "old set unchanged"
        );

        // Failed replacements: unknown name, untrusted chain, key mismatch.
        let (chain, key) = crate::certs::parse_pem_bundle(body.as_bytes()).unwrap();
        let e = set
            .with_replacement("zzz", chain, key, &trust, now)
            .unwrap_err();
        assert!(matches!(e, CertError::UnknownName { .. }), "{e}");
        let stranger = Ca::root("Stranger").leaf(LeafSpec::server(&["a.example.com"]));
        let body = format!("{}{}", stranger.chain_pem(&[]), stranger.key_pem());
        let (chain, key) = crate::certs::parse_pem_bundle(body.as_bytes()).unwrap();
        let e = set
            .with_replacement("a", chain, key, &trust, now)
            .unwrap_err();
        assert!(matches!(e, CertError::UntrustedIssuer { .. }), "{e}");
        assert!(
            e.to_string().contains("upload for certificate \"a\""),
            "{e}"
        );
        let body = format!(
            "{}{}",
            new_leaf.chain_pem(&[&pki.inter]),
            stranger.key_pem()
        );
        let (chain, key) = crate::certs::parse_pem_bundle(body.as_bytes()).unwrap();
        let e = set
            .with_replacement("a", chain, key, &trust, now)
            .unwrap_err();
        assert!(matches!(e, CertError::KeyMismatch { .. }), "{e}");
        assert_eq!(set.get("a").unwrap().fingerprint_sha256, old_a);
    }

    #[test]
    fn refusal_logging_is_rate_limited_per_entry() {
        let pki = Pki::new();
        let set = load_set(
            &[pki.source("a", LeafSpec::server(&["a.example.com"]), &[])],
            &TrustConfig::default(),
            at(2026, 1, 1),
        )
        .unwrap();
        let e = set.get("a").unwrap();
        assert!(e.should_log_refusal(1000));
        assert!(!e.should_log_refusal(1001));
        assert!(!e.should_log_refusal(1059));
        assert!(e.should_log_refusal(1060));
        assert!(!e.should_log_refusal(1061));
    }

    #[test]
    fn san_coverage() {
        assert!(san_covers("*.example.com", "a.example.com"));
        assert!(!san_covers("*.example.com", "a.b.example.com"));
        assert!(san_covers("*.example.com", "*.example.com"));
        assert!(!san_covers("example.com", "a.example.com"));
    }
}
