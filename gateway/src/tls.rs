//! Building rustls server configurations from PEM files and the TLS policy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, SupportedProtocolVersion};

use crate::config::{ConfigError, TlsPolicy};

/// Problems with certificate or key files. Messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate file {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("key file {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("certificate {cert} and key {key} do not belong together: {message}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
}

fn version_label(v: rustls::ProtocolVersion) -> &'static str {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLS 1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLS 1.2",
        _ => "this TLS version",
    }
}

/// The protocol versions a policy names.
fn versions(policy: &TlsPolicy) -> Result<Vec<&'static SupportedProtocolVersion>, ConfigError> {
    let mut out = Vec::new();
    for v in &policy.versions {
        let version = match v.as_str() {
            "1.2" => &rustls::version::TLS12,
            "1.3" => &rustls::version::TLS13,
            other => {
                return Err(ConfigError::Invalid {
                    key: "tls.versions".into(),
                    message: format!(
                        "unsupported TLS version \"{other}\" (use \"1.2\" and/or \"1.3\")"
                    ),
                })
            }
        };
        if !out.contains(&version) {
            out.push(version);
        }
    }
    if out.is_empty() {
        return Err(ConfigError::Invalid {
            key: "tls.versions".into(),
            message: "at least one version is required".into(),
        });
    }
    Ok(out)
}

/// Picks `names` out of `items` (matched case-insensitively against
/// `name_of`), in the given order; an unknown name is an error naming `key`
/// and listing what is known.
fn pick<T: Copy>(
    items: &[T],
    names: &[String],
    key: &str,
    what: &str,
    name_of: impl Fn(&T) -> String,
) -> Result<Vec<T>, ConfigError> {
    let mut chosen = Vec::new();
    for name in names {
        match items.iter().find(|i| name_of(i).eq_ignore_ascii_case(name)) {
            Some(i) => chosen.push(*i),
            None => {
                let known: Vec<String> = items.iter().map(&name_of).collect();
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    message: format!("unknown {what} \"{name}\"; known: {}", known.join(", ")),
                });
            }
        }
    }
    Ok(chosen)
}

/// Looks up suite names in the provider, naming `key` in errors.
fn find_suites(
    provider: &CryptoProvider,
    names: &[String],
    key: &str,
) -> Result<Vec<rustls::SupportedCipherSuite>, ConfigError> {
    pick(
        &provider.cipher_suites,
        names,
        key,
        "or disallowed suite",
        |s| format!("{:?}", s.suite()),
    )
}

/// The suites a handshake is expected to end with, when a policy names
/// them.
pub fn expected_suites(
    policy: &TlsPolicy,
) -> Result<Option<Arc<[rustls::CipherSuite]>>, ConfigError> {
    if policy.expected_cipher_suites.is_empty() {
        return Ok(None);
    }
    let base = base_provider(policy)?;
    let found = find_suites(
        &base,
        &policy.expected_cipher_suites,
        "tls.expected_cipher_suites",
    )?;
    Ok(Some(found.iter().map(|s| s.suite()).collect()))
}

/// The crypto provider for the policy: its suites and groups; in
/// `enforce` mode only the expected suites remain, so a client that offers
/// none of them is refused with an alert during the handshake.
pub fn provider(policy: &TlsPolicy) -> Result<CryptoProvider, ConfigError> {
    let mut provider = base_provider(policy)?;
    if policy.policy == crate::config::PolicyMode::Enforce
        && !policy.expected_cipher_suites.is_empty()
    {
        provider.cipher_suites = find_suites(
            &provider,
            &policy.expected_cipher_suites,
            "tls.expected_cipher_suites",
        )?;
    }
    Ok(provider)
}

/// The provider restricted to `cipher_suites` and `groups`.
fn base_provider(policy: &TlsPolicy) -> Result<CryptoProvider, ConfigError> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if !policy.groups.is_empty() {
        provider.kx_groups = pick(
            &provider.kx_groups,
            &policy.groups,
            "tls.groups",
            "group",
            |g| format!("{:?}", g.name()),
        )?;
    }
    if !policy.cipher_suites.is_empty() {
        provider.cipher_suites = pick(
            &provider.cipher_suites,
            &policy.cipher_suites,
            "tls.cipher_suites",
            "suite",
            |s| format!("{:?}", s.suite()),
        )?;
    }
    Ok(provider)
}

/// Validates the policy alone (versions, suite names, ALPN), for
/// `check-config` and start-up.
pub fn check_policy(policy: &TlsPolicy) -> Result<(), ConfigError> {
    let versions = versions(policy)?;
    expected_suites(policy)?;
    let provider = provider(policy)?;
    for v in &versions {
        if !provider.cipher_suites.iter().any(|s| s.version() == *v) {
            let enforce = policy.policy == crate::config::PolicyMode::Enforce
                && !policy.expected_cipher_suites.is_empty();
            return Err(if enforce {
                ConfigError::Invalid {
                    key: "tls.expected_cipher_suites".into(),
                    message: format!(
                        "policy = \"enforce\" allows only the expected suites, and none of them is for {}; add one, or remove that version from tls.versions",
                        version_label(v.version)
                    ),
                }
            } else {
                ConfigError::Invalid {
                    key: "tls.cipher_suites".into(),
                    message: format!("no suite left for {}", version_label(v.version)),
                }
            });
        }
    }
    for (i, p) in policy.alpn.iter().enumerate() {
        if p.is_empty() || p.len() > 255 {
            return Err(ConfigError::Invalid {
                key: format!("tls.alpn[{i}]"),
                message: "must be 1 to 255 bytes".into(),
            });
        }
    }
    Ok(())
}

/// Reads a PEM certificate chain (leaf first).
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let err = |message: String| CertError::Cert {
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let err = |message: String| CertError::Key {
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => err("no PRIVATE KEY block found".into()),
        other => err(format!("not a valid PEM private key: {other}")),
    })
}

/// The protocol versions of a policy (validated).
pub fn policy_versions(
    policy: &TlsPolicy,
) -> Result<Vec<&'static SupportedProtocolVersion>, ConfigError> {
    versions(policy)
}

/// Everything besides the policy that goes into a listener's
/// [`ServerConfig`]; the parts that survive a reload are shared.
pub struct ServerParts {
    /// Picks the certificate by SNI; rotated in place.
    pub resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    /// Mutual TLS, when configured.
    pub client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    pub ticketer: Arc<dyn rustls::server::ProducesTickets>,
    pub session_storage: Arc<dyn rustls::server::StoresServerSessions + Send + Sync>,
    /// Allow handing the keys to kernel TLS after the handshake.
    pub secret_extraction: bool,
}

/// Builds a listener's server configuration from the policy and its parts.
pub fn build_server_config(
    policy: &TlsPolicy,
    parts: ServerParts,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let versions = versions(policy)?;
    let provider = Arc::new(provider(policy)?);
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| ConfigError::Invalid {
            key: "tls".into(),
            message: e.to_string(),
        })?;
    let builder = match parts.client_verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(parts.resolver);
    cfg.alpn_protocols = policy.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    cfg.max_early_data_size = 0;
    cfg.enable_secret_extraction = parts.secret_extraction;
    cfg.ticketer = parts.ticketer;
    cfg.session_storage = parts.session_storage;
    if !policy.session_tickets && policy.session_cache == 0 {
        // No resumption of any kind: no TLS 1.3 ticket messages either.
        cfg.send_tls13_tickets = 0;
    }
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_suite_and_version_are_named() {
        let mut p = TlsPolicy {
            cipher_suites: vec!["TLS13_AES_128_GCM_SHA256".into()],
            ..Default::default()
        };
        p.versions = vec!["1.3".into()];
        check_policy(&p).unwrap();
        p.versions = vec!["1.2".into()];
        let e = check_policy(&p).unwrap_err().to_string();
        assert!(e.starts_with("tls.cipher_suites"), "{e}");
        p.cipher_suites = vec!["TLS_NOPE".into()];
        let e = check_policy(&p).unwrap_err().to_string();
        assert!(e.contains("TLS_NOPE"), "{e}");
    }
}
