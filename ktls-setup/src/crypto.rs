//! rustls traffic secrets → the kernel's crypto-info structs.

use ktls_sys::bindings as sys;
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

use crate::KtlsError;

/// The AEADs both rustls and kernel TLS implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    pub const ALL: [Cipher; 3] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::Chacha20Poly1305,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "AES-128-GCM",
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "ChaCha20-Poly1305",
        }
    }

    pub fn key_len(self) -> usize {
        match self {
            Cipher::Aes128Gcm => 16,
            Cipher::Aes256Gcm | Cipher::Chacha20Poly1305 => 32,
        }
    }
}

impl std::fmt::Display for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One direction's keys, laid out as the kernel expects for `TLS_TX` /
/// `TLS_RX`.
pub enum CryptoInfo {
    Aes128Gcm(sys::tls12_crypto_info_aes_gcm_128),
    Aes256Gcm(sys::tls12_crypto_info_aes_gcm_256),
    Chacha20Poly1305(sys::tls12_crypto_info_chacha20_poly1305),
}

impl std::fmt::Debug for CryptoInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "CryptoInfo({})", self.cipher())
    }
}

fn kernel_version(v: ProtocolVersion) -> Result<u16, KtlsError> {
    match v {
        ProtocolVersion::TLSv1_2 => {
            Ok(((sys::TLS_1_2_VERSION_MAJOR << 8) | sys::TLS_1_2_VERSION_MINOR) as u16)
        }
        ProtocolVersion::TLSv1_3 => {
            Ok(((sys::TLS_1_3_VERSION_MAJOR << 8) | sys::TLS_1_3_VERSION_MINOR) as u16)
        }
        other => Err(KtlsError::UnsupportedVersion(other)),
    }
}

fn info(version: u16, cipher: u32) -> sys::tls_crypto_info {
    sys::tls_crypto_info {
        version,
        cipher_type: cipher as u16,
    }
}

impl CryptoInfo {
    /// Builds the struct for one direction from rustls' secrets and the
    /// record sequence number to start at.
    pub fn new(
        version: ProtocolVersion,
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
    ) -> Result<Self, KtlsError> {
        let (cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (Cipher::Aes128Gcm, key.as_ref(), iv.as_ref())
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (Cipher::Aes256Gcm, key.as_ref(), iv.as_ref())
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key.as_ref(), iv.as_ref())
            }
            _ => {
                return Err(KtlsError::Protocol(
                    "traffic secrets for a cipher kTLS lacks",
                ))
            }
        };
        Self::from_parts(version, cipher, key, iv, seq)
    }

    /// Builds the struct from raw key material: `iv` is the 12-byte
    /// (implicit) nonce; for AES-GCM its first 4 bytes are the kernel's
    /// `salt` and the rest its `iv`.
    pub fn from_parts(
        version: ProtocolVersion,
        cipher: Cipher,
        key: &[u8],
        iv: &[u8],
        seq: u64,
    ) -> Result<Self, KtlsError> {
        let v = kernel_version(version)?;
        let rec_seq = seq.to_be_bytes();
        if iv.len() != 12 {
            return Err(KtlsError::Protocol("IV must be 12 bytes"));
        }
        Ok(match cipher {
            Cipher::Aes128Gcm => {
                let mut s = sys::tls12_crypto_info_aes_gcm_128 {
                    info: info(v, sys::TLS_CIPHER_AES_GCM_128),
                    iv: [0; 8],
                    key: [0; 16],
                    salt: [0; 4],
                    rec_seq,
                };
                copy_exact(&mut s.key, key)?;
                copy_exact(&mut s.salt, &iv[..4])?;
                copy_exact(&mut s.iv, &iv[4..])?;
                CryptoInfo::Aes128Gcm(s)
            }
            Cipher::Aes256Gcm => {
                let mut s = sys::tls12_crypto_info_aes_gcm_256 {
                    info: info(v, sys::TLS_CIPHER_AES_GCM_256),
                    iv: [0; 8],
                    key: [0; 32],
                    salt: [0; 4],
                    rec_seq,
                };
                copy_exact(&mut s.key, key)?;
                copy_exact(&mut s.salt, &iv[..4])?;
                copy_exact(&mut s.iv, &iv[4..])?;
                CryptoInfo::Aes256Gcm(s)
            }
            Cipher::Chacha20Poly1305 => {
                let mut s = sys::tls12_crypto_info_chacha20_poly1305 {
                    info: info(v, sys::TLS_CIPHER_CHACHA20_POLY1305),
                    iv: [0; 12],
                    key: [0; 32],
                    salt: sys::__IncompleteArrayField::new(),
                    rec_seq,
                };
                copy_exact(&mut s.key, key)?;
                copy_exact(&mut s.iv, iv)?;
                CryptoInfo::Chacha20Poly1305(s)
            }
        })
    }

    /// Test keys (all bytes `fill`), for probing what a kernel accepts.
    pub fn for_probe(
        version: ProtocolVersion,
        cipher: Cipher,
        fill: u8,
    ) -> Result<Self, KtlsError> {
        let key = vec![fill; cipher.key_len()];
        Self::from_parts(version, cipher, &key, &[fill; 12], 0)
    }

    pub fn cipher(&self) -> Cipher {
        match self {
            CryptoInfo::Aes128Gcm(_) => Cipher::Aes128Gcm,
            CryptoInfo::Aes256Gcm(_) => Cipher::Aes256Gcm,
            CryptoInfo::Chacha20Poly1305(_) => Cipher::Chacha20Poly1305,
        }
    }

    /// The struct's bytes, for `setsockopt`.
    pub fn as_bytes(&self) -> &[u8] {
        fn bytes<T>(t: &T) -> &[u8] {
            // SAFETY: the kernel structs are `repr(C)` plain byte arrays and
            // u16s with no padding (their layout tests live in `ktls-sys`);
            // viewing them as bytes for the lifetime of the borrow is sound.
            unsafe {
                std::slice::from_raw_parts(t as *const T as *const u8, std::mem::size_of::<T>())
            }
        }
        match self {
            CryptoInfo::Aes128Gcm(s) => bytes(s),
            CryptoInfo::Aes256Gcm(s) => bytes(s),
            CryptoInfo::Chacha20Poly1305(s) => bytes(s),
        }
    }
}

fn copy_exact(dst: &mut [u8], src: &[u8]) -> Result<(), KtlsError> {
    if dst.len() != src.len() {
        return Err(KtlsError::Protocol(
            "key or IV length does not match the cipher",
        ));
    }
    dst.copy_from_slice(src);
    Ok(())
}

/// The kernel cipher for a rustls suite, if there is one.
pub fn cipher_for_suite(suite: rustls::CipherSuite) -> Option<Cipher> {
    use rustls::CipherSuite as S;
    match suite {
        S::TLS13_AES_128_GCM_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Some(Cipher::Aes128Gcm),
        S::TLS13_AES_256_GCM_SHA384
        | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Some(Cipher::Aes256Gcm),
        S::TLS13_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Some(Cipher::Chacha20Poly1305),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcm_splits_salt_and_iv_and_encodes_seq() {
        let iv: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        let ci = CryptoInfo::from_parts(
            ProtocolVersion::TLSv1_3,
            Cipher::Aes128Gcm,
            &[7u8; 16],
            &iv,
            0x0102,
        )
        .unwrap();
        let CryptoInfo::Aes128Gcm(ref raw) = ci else {
            panic!("wrong variant")
        };
        assert_eq!(raw.info.version, 0x0304);
        assert_eq!(raw.info.cipher_type as u32, sys::TLS_CIPHER_AES_GCM_128);
        assert_eq!(raw.salt, [1, 2, 3, 4]);
        assert_eq!(raw.iv, [5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(raw.rec_seq, [0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(ci.as_bytes().len(), 40);
    }

    #[test]
    fn chacha_keeps_whole_iv() {
        let ci =
            CryptoInfo::for_probe(ProtocolVersion::TLSv1_2, Cipher::Chacha20Poly1305, 9).unwrap();
        let CryptoInfo::Chacha20Poly1305(ref raw) = ci else {
            panic!("wrong variant")
        };
        assert_eq!(raw.info.version, 0x0303);
        assert_eq!(raw.iv, [9; 12]);
        assert_eq!(ci.as_bytes().len(), 56);
        assert!(
            !format!("{ci:?}").contains('9'),
            "Debug must not print keys"
        );
    }

    #[test]
    fn suites_map_to_ciphers() {
        assert_eq!(
            cipher_for_suite(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384),
            Some(Cipher::Aes256Gcm)
        );
        assert_eq!(
            cipher_for_suite(rustls::CipherSuite::TLS_NULL_WITH_NULL_NULL),
            None
        );
    }
}
