//! Kernel TLS offload policy: what the host's kernel supports, decided once
//! at start-up, and the `ktls = auto | require | off` setting.

use ktls_setup::Cipher;
use rustls::{CipherSuite, ProtocolVersion};
use serde::Deserialize;

/// The `ktls` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KtlsMode {
    /// Offload when the kernel supports it, else relay records in user space.
    #[default]
    Auto,
    /// Refuse to start without kernel TLS.
    Require,
    /// Always relay records in user space.
    Off,
}

impl std::str::FromStr for KtlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(KtlsMode::Auto),
            "require" => Ok(KtlsMode::Require),
            "off" => Ok(KtlsMode::Off),
            other => Err(format!("\"{other}\" is not one of auto, require, off")),
        }
    }
}

/// Which (version, cipher) pairs the kernel accepted for both directions.
#[derive(Debug, Clone, Default)]
pub struct KtlsSupport {
    pairs: Vec<(ProtocolVersion, Cipher)>,
    /// The kernel can install new keys on a kTLS socket (TLS 1.3 KeyUpdate,
    /// Linux 6.14+).
    pub rekey: bool,
}

impl KtlsSupport {
    /// Whether a connection with this version and suite can be offloaded.
    pub fn supports(&self, version: ProtocolVersion, suite: CipherSuite) -> bool {
        match ktls_setup::crypto::cipher_for_suite(suite) {
            Some(c) => self.pairs.contains(&(version, c)),
            None => false,
        }
    }

    /// Every version and cipher, without asking the kernel: for tests that
    /// drive sessions with a simulated kernel.
    pub fn assume_all() -> Self {
        let mut pairs = Vec::new();
        for v in [ProtocolVersion::TLSv1_3, ProtocolVersion::TLSv1_2] {
            for c in Cipher::ALL {
                pairs.push((v, c));
            }
        }
        Self { pairs, rekey: true }
    }

    /// Exactly one version and suite, without asking the kernel: for tests.
    pub fn only(version: ProtocolVersion, suite: rustls::CipherSuite) -> Self {
        let pairs = ktls_setup::crypto::cipher_for_suite(suite)
            .map(|c| vec![(version, c)])
            .unwrap_or_default();
        Self {
            pairs,
            rekey: false,
        }
    }

    /// Human-readable list, for the start-up log.
    pub fn describe(&self) -> String {
        self.pairs
            .iter()
            .map(|(v, c)| {
                format!(
                    "{}/{}",
                    if *v == ProtocolVersion::TLSv1_3 {
                        "1.3"
                    } else {
                        "1.2"
                    },
                    c
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Probes kernel TLS for real (`ktls_setup::probe`: the `tls` ULP, TX and
/// RX keys and a round trip for each version and cipher, splice from a kTLS
/// socket, the io_uring opcodes). `Err` says why offload is impossible on
/// this host and how to fix it.
pub fn detect() -> Result<KtlsSupport, String> {
    let report = ktls_setup::probe::probe();
    report.can_offload()?;
    let pairs = report.working();
    if pairs.is_empty() {
        return Err("no cipher works with kernel TLS on this host".into());
    }
    Ok(KtlsSupport {
        pairs,
        rekey: report.rekey.is_ok(),
    })
}
