//! Trust roots, CRLs, and chain verification of server certificates.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, TrustAnchor, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationOptionsBuilder, UnknownStatusPolicy,
};

use super::files::read_file;
use super::inspect::{rfc3339, unix_secs};
use super::{CertError, TrustConfig};

/// Loaded trust roots and CRLs, ready for verification.
pub(crate) struct Trust {
    roots_path: PathBuf,
    anchors: Vec<TrustAnchor<'static>>,
    crls: Vec<(PathBuf, CertRevocationList<'static>)>,
}

/// Reads the certificates of a PEM roots bundle.
pub(crate) fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read_file(path)?;
    let err = |message: String| CertError::Roots {
        path: path.to_owned(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Reads CRL files (PEM `X509 CRL` blocks, or one DER CRL). A CRL past its
/// nextUpdate is still used, with a warning.
pub(crate) fn read_crls(
    paths: &[PathBuf],
    now: SystemTime,
) -> Result<Vec<(PathBuf, CertificateRevocationListDer<'static>)>, CertError> {
    let mut out = Vec::new();
    for path in paths {
        let bytes = read_file(path)?;
        let err = |message: String| CertError::Crl {
            path: path.clone(),
            message,
        };
        let ders: Vec<CertificateRevocationListDer<'static>> =
            if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
                let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| err(format!("not valid PEM: {e}")))?;
                sections
                    .into_iter()
                    .filter(|(kind, _)| *kind == SectionKind::Crl)
                    .map(|(_, der)| CertificateRevocationListDer::from(der))
                    .collect()
            } else {
                vec![CertificateRevocationListDer::from(bytes)]
            };
        if ders.is_empty() {
            return Err(err("no X509 CRL block found".into()));
        }
        for der in ders {
            let crl = match x509_parser::parse_x509_crl(der.as_ref()) {
                Ok((_, crl)) => crl,
                Err(e) => return Err(err(format!("not a valid CRL: {e}"))),
            };
            if let Some(next) = crl.next_update() {
                if next.timestamp() < unix_secs(now) {
                    tracing::warn!(
                        crl = %path.display(),
                        next_update = %rfc3339(next.timestamp()),
                        "CRL {} is past its nextUpdate ({}); still using it",
                        path.display(),
                        rfc3339(next.timestamp()),
                    );
                }
            }
            out.push((path.clone(), der));
        }
    }
    Ok(out)
}

/// Loads the trust configuration; `None` when no roots are configured.
pub(crate) fn load_trust(cfg: &TrustConfig, now: SystemTime) -> Result<Option<Trust>, CertError> {
    let Some(roots_path) = &cfg.roots else {
        return match cfg.crls.first() {
            Some(crl) => Err(CertError::CrlsWithoutRoots { crl: crl.clone() }),
            None => Ok(None),
        };
    };
    let mut anchors = Vec::new();
    for (i, der) in read_roots(roots_path)?.iter().enumerate() {
        let anchor = webpki::anchor_from_trusted_cert(der).map_err(|e| CertError::Roots {
            path: roots_path.clone(),
            message: format!("certificate #{}: unusable as a trust anchor: {e}", i + 1),
        })?;
        anchors.push(anchor.to_owned());
    }
    let mut crls = Vec::new();
    for (path, der) in read_crls(&cfg.crls, now)? {
        let owned =
            OwnedCertRevocationList::from_der(der.as_ref()).map_err(|e| CertError::Crl {
                path: path.clone(),
                message: format!("unsupported CRL: {e}"),
            })?;
        crls.push((path, CertRevocationList::from(owned)));
    }
    Ok(Some(Trust {
        roots_path: roots_path.clone(),
        anchors,
        crls,
    }))
}

impl Trust {
    /// Verifies `chain` (leaf first, from `path`) for server authentication
    /// at `now`, with revocation checks against every CRL.
    pub(crate) fn verify(
        &self,
        chain: &[CertificateDer<'static>],
        path: &Path,
        now: SystemTime,
    ) -> Result<(), CertError> {
        let crls: Vec<&CertRevocationList<'static>> = self.crls.iter().map(|(_, c)| c).collect();
        match self.verify_with(chain, now, &crls) {
            Err(webpki::Error::CertRevoked) => {
                // Name the CRL that revoked it: re-check against each alone.
                let crl = self
                    .crls
                    .iter()
                    .find(|(_, crl)| {
                        matches!(
                            self.verify_with(chain, now, &[crl]),
                            Err(webpki::Error::CertRevoked)
                        )
                    })
                    .or(self.crls.first())
                    .map(|(p, _)| p.clone())
                    .unwrap_or_default();
                Err(CertError::Revoked {
                    path: path.to_owned(),
                    crl,
                })
            }
            Err(e) => Err(self.map_error(e, path)),
            Ok(()) => Ok(()),
        }
    }

    fn verify_with(
        &self,
        chain: &[CertificateDer<'static>],
        now: SystemTime,
        crls: &[&CertRevocationList<'_>],
    ) -> Result<(), webpki::Error> {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(webpki::Error::BadDer);
        };
        let ee = EndEntityCert::try_from(leaf)?;
        let revocation = match RevocationOptionsBuilder::new(crls) {
            Ok(b) => Some(
                b.with_status_policy(UnknownStatusPolicy::Allow)
                    .with_expiration_policy(ExpirationPolicy::Ignore)
                    .build(),
            ),
            // No CRLs given.
            Err(_) => None,
        };
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let time = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        ee.verify_for_usage(
            provider.signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            time,
            KeyUsage::server_auth(),
            revocation,
            None,
        )
        .map(|_| ())
    }

    fn map_error(&self, e: webpki::Error, path: &Path) -> CertError {
        use webpki::Error as E;
        let path = path.to_owned();
        match e {
            E::UnknownIssuer => CertError::UntrustedIssuer {
                path,
                roots: self.roots_path.clone(),
            },
            E::InvalidSignatureForPublicKey
            | E::SignatureAlgorithmMismatch
            | E::UnsupportedSignatureAlgorithmContext(_)
            | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => CertError::BadSignature {
                path,
                message: format!("{e:?}"),
            },
            E::CertExpired { .. } | E::CertNotValidYet { .. } => CertError::Chain {
                path,
                roots: self.roots_path.clone(),
                message: format!("an intermediate certificate is outside its validity: {e:?}"),
            },
            other => CertError::Chain {
                path,
                roots: self.roots_path.clone(),
                message: format!("{other:?}"),
            },
        }
    }
}
