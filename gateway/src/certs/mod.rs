//! Server certificates: loading and validating PEM files into an immutable
//! [`CertSet`], choosing one per handshake by SNI ([`CertResolver`]), admin
//! uploads, and the mTLS client-certificate verifier.
//!
//! Submodules, by responsibility:
//! - `files`: reading PEM files and upload bodies, atomic writes.
//! - `inspect`: facts read from a leaf certificate (validity, names, key).
//! - `trust`: trust roots, CRLs and chain verification with webpki.
//! - `set`: the validated set, SNI lookup, status for the admin API.
//! - `resolver`: the rustls [`ResolvesServerCert`](rustls::server::ResolvesServerCert).
//! - `client`: the mTLS verifier and the peer identity string.

use std::path::PathBuf;

mod client;
mod files;
mod inspect;
mod resolver;
mod set;
mod trust;

#[cfg(test)]
pub(crate) mod testpki;

pub use client::{client_verifier, peer_identity};
pub use files::{chain_to_pem, key_to_pem, parse_pem_bundle, write_pem_files};
pub use resolver::CertResolver;
pub use set::{load_set, CertEntry, CertInfo, CertSet, CertState, Selection};

/// One configured server certificate: a PEM chain (leaf first) and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSource {
    /// Unique name (admin API, logs).
    pub name: String,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1): ECDSA P-256/P-384, RSA, Ed25519.
    pub key: PathBuf,
    /// Server names served by this certificate (`*.example.com` allowed).
    /// Empty: the leaf certificate's DNS subject alternative names.
    pub sni: Vec<String>,
    /// Served when no SNI name matches. At most one source may set it;
    /// without any, the first source is the default.
    pub default: bool,
}

/// What server certificates are checked against at load time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustConfig {
    /// PEM bundle of the corporate PKI roots. When set, every chain must
    /// verify against it (server-auth EKU).
    pub roots: Option<PathBuf>,
    /// CRL files (PEM or DER). Revoked leaves or intermediates are refused;
    /// certificates a CRL does not cover are allowed. Requires `roots`.
    pub crls: Vec<PathBuf>,
}

/// Problems with certificates, keys, trust roots and CRLs. Every message
/// names the file (or upload) at fault and the reason.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The file could not be read (missing, permissions, ...).
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The PEM text is malformed (bad base64, missing END line, ...).
    #[error("{path}: not valid PEM: {message}")]
    Pem { path: PathBuf, message: String },
    /// The PEM text holds no `CERTIFICATE` block.
    #[error("{path}: no CERTIFICATE block found")]
    NoCertificate { path: PathBuf },
    /// A certificate block does not hold a usable X.509 certificate.
    #[error("{path}: not a valid X.509 certificate: {message}")]
    Parse { path: PathBuf, message: String },
    /// The private key is missing, malformed or of an unsupported type.
    #[error("{path}: bad private key: {message}")]
    Key { path: PathBuf, message: String },
    /// The private key is not the key of the leaf certificate.
    #[error("key {key} does not match the leaf certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// The leaf certificate's notBefore is in the future.
    #[error("{path}: certificate is not valid before {not_before}")]
    NotYetValid { path: PathBuf, not_before: String },
    /// The leaf certificate's notAfter is in the past.
    #[error("{path}: certificate expired at {not_after}")]
    Expired { path: PathBuf, not_after: String },
    /// The chain does not lead to any of the configured roots.
    #[error("{path}: not issued by the trust roots in {roots}")]
    UntrustedIssuer { path: PathBuf, roots: PathBuf },
    /// A signature in the chain does not verify.
    #[error("{path}: bad signature in the certificate chain ({message})")]
    BadSignature { path: PathBuf, message: String },
    /// Other chain verification failures (EKU, constraints, intermediates).
    #[error("{path}: chain does not verify against the trust roots in {roots}: {message}")]
    Chain {
        path: PathBuf,
        roots: PathBuf,
        message: String,
    },
    /// The leaf or an intermediate is listed in a CRL.
    #[error("{path}: revoked per CRL {crl}")]
    Revoked { path: PathBuf, crl: PathBuf },
    /// The trust roots file is unusable.
    #[error("trust roots {path}: {message}")]
    Roots { path: PathBuf, message: String },
    /// A CRL file is unusable.
    #[error("CRL {path}: {message}")]
    Crl { path: PathBuf, message: String },
    /// CRLs were configured without trust roots.
    #[error("CRL {crl} is configured but no trust roots are: revocation is checked on chains verified against the roots")]
    CrlsWithoutRoots { crl: PathBuf },
    /// An SNI name is not a valid DNS name or wildcard.
    #[error("certificate \"{name}\" ({path}): invalid SNI name \"{sni}\": {message}")]
    InvalidSni {
        name: String,
        path: PathBuf,
        sni: String,
        message: String,
    },
    /// Two sources share a name.
    #[error("certificate name \"{name}\" is used twice (again for {path})")]
    DuplicateName { name: String, path: PathBuf },
    /// A source has an empty name.
    #[error("certificate {path}: the name must not be empty")]
    EmptyName { path: PathBuf },
    /// No sources at all.
    #[error("no certificates configured")]
    NoCertificates,
    /// More than one source is marked `default`.
    #[error("more than one default certificate: \"{first}\" and \"{second}\"")]
    MultipleDefaults { first: String, second: String },
    /// A replacement names a certificate the set does not have.
    #[error("no certificate named \"{name}\"")]
    UnknownName { name: String },
    /// The mTLS client verifier could not be built.
    #[error("client CA bundle {path}: {message}")]
    ClientVerifier { path: PathBuf, message: String },
}
