//! Reading PEM files and upload bodies; writing validated PEM back to disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{CertError, CertSource};

/// Label used in error messages for an uploaded PEM body.
pub(crate) const UPLOAD_LABEL: &str = "uploaded PEM bundle";

/// Reads a whole file, naming it on failure.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

/// All recognised PEM sections of `bytes`, in order. Text outside sections
/// is ignored (as OpenSSL does).
fn sections(bytes: &[u8], path: &Path) -> Result<Vec<(SectionKind, Vec<u8>)>, CertError> {
    <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

fn certs_of(sections: &[(SectionKind, Vec<u8>)]) -> Vec<CertificateDer<'static>> {
    sections
        .iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der.clone()))
        .collect()
}

fn key_of(
    sections: Vec<(SectionKind, Vec<u8>)>,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, CertError> {
    let mut keys: Vec<PrivateKeyDer<'static>> = sections
        .into_iter()
        .filter_map(|(kind, der)| PrivateKeyDer::from_pem(kind, der))
        .collect();
    let err = |message: &str| CertError::Key {
        path: path.to_owned(),
        message: message.to_owned(),
    };
    match keys.len() {
        0 => Err(err(
            "no PRIVATE KEY block found (PKCS#8, RSA or EC PRIVATE KEY)",
        )),
        1 => keys.pop().ok_or_else(|| err("no PRIVATE KEY block found")),
        n => Err(err(&format!("{n} private keys found, expected one"))),
    }
}

/// The certificate chain (every `CERTIFICATE` block, leaf first) in PEM text.
pub(crate) fn chain_from_pem(
    bytes: &[u8],
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = certs_of(&sections(bytes, path)?);
    if certs.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The single private key in PEM text.
pub(crate) fn key_from_pem(bytes: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    key_of(sections(bytes, path)?, path)
}

/// Reads a PEM chain file (leaf first).
pub(crate) fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    chain_from_pem(&read_file(path)?, path)
}

/// Reads a PEM private key file.
pub(crate) fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    key_from_pem(&read_file(path)?, path)
}

/// Splits an uploaded PEM text holding a certificate chain (leaf first) and
/// exactly one private key, in any order. Only the syntax is checked here;
/// [`CertSet::with_replacement`](super::CertSet::with_replacement) validates.
pub fn parse_pem_bundle(
    pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CertError> {
    let path = Path::new(UPLOAD_LABEL);
    let sections = sections(pem, path)?;
    let certs = certs_of(&sections);
    if certs.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok((certs, key_of(sections, path)?))
}

/// Standard base64 with padding (RFC 4648), for PEM output.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn pem_block(label: &str, der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// PEM text of a certificate chain, one `CERTIFICATE` block per certificate.
pub fn chain_to_pem(chain: &[CertificateDer<'_>]) -> String {
    chain.iter().map(|c| pem_block("CERTIFICATE", c)).collect()
}

/// PEM text of a private key, with the label of its encoding.
pub fn key_to_pem(key: &PrivateKeyDer<'_>) -> String {
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    pem_block(label, key.secret_der())
}

/// Writes validated PEM to the entry's certificate and key files so that a
/// later reload from disk keeps it. Each file is replaced atomically (temp
/// file in the same directory, fsync, rename, directory fsync); the key file
/// gets mode 0600. When `cert` and `key` are the same path, that file gets
/// the chain followed by the key (mode 0600).
pub fn write_pem_files(
    entry_source: &CertSource,
    chain_pem: &[u8],
    key_pem: &[u8],
) -> io::Result<()> {
    if entry_source.cert == entry_source.key {
        let mut both = chain_pem.to_vec();
        if !both.ends_with(b"\n") {
            both.push(b'\n');
        }
        both.extend_from_slice(key_pem);
        return write_atomic(&entry_source.cert, &both, 0o600);
    }
    // Key first: a reload between the two renames sees a mismatched pair
    // and refuses it, keeping the running set.
    write_atomic(&entry_source.key, key_pem, 0o600)?;
    write_atomic(&entry_source.cert, chain_pem, 0o644)
}

fn temp_path(target: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = target.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a file path", target.display()),
        )
    })?;
    let tmp = format!(
        ".{}.tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    Ok(target.with_file_name(tmp))
}

/// Replaces `target` with `contents` atomically and durably.
fn write_atomic(target: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path(target)?;
    let named = |e: io::Error, what: &str, p: &Path| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| named(e, "cannot create", &tmp))?;
        f.write_all(contents)
            .map_err(|e| named(e, "cannot write", &tmp))?;
        f.sync_all().map_err(|e| named(e, "cannot fsync", &tmp))?;
        std::fs::rename(&tmp, target).map_err(|e| named(e, "cannot rename onto", target))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| named(e, "cannot fsync directory", dir))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::certs::testpki::{Ca, LeafSpec, TempDir};

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn bundle_in_any_order_and_round_trip() {
        let ca = Ca::root("root");
        let leaf = ca.leaf(LeafSpec::server(&["a.example.com"]));
        let body = format!("{}{}", leaf.key_pem(), leaf.chain_pem(&[]));
        let (chain, key) = parse_pem_bundle(body.as_bytes()).unwrap();
        assert_eq!(chain.len(), 1);
        assert_eq!(chain[0].as_ref(), leaf.cert.der().as_ref());
        assert_eq!(key.secret_der(), leaf.key.serialize_der().as_slice());
        // Our encoder produces PEM that parses back to the same DER.
        let again = format!("{}{}", chain_to_pem(&chain), key_to_pem(&key));
        let (chain2, key2) = parse_pem_bundle(again.as_bytes()).unwrap();
        assert_eq!(chain2, chain);
        assert_eq!(key2.secret_der(), key.secret_der());
    }

    #[test]
    fn bundle_errors_are_distinct() {
        let ca = Ca::root("root");
        let leaf = ca.leaf(LeafSpec::server(&["a.example.com"]));
        let e = parse_pem_bundle(leaf.key_pem().as_bytes()).unwrap_err();
        assert!(matches!(e, CertError::NoCertificate { .. }), "{e}");
        let e = parse_pem_bundle(leaf.chain_pem(&[]).as_bytes()).unwrap_err();
        assert!(matches!(e, CertError::Key { .. }), "{e}");
        assert!(e.to_string().contains(UPLOAD_LABEL), "{e}");
        let two_keys = format!(
            "{}{}{}",
            leaf.chain_pem(&[]),
            leaf.key_pem(),
            leaf.key_pem()
        );
        let e = parse_pem_bundle(two_keys.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("2 private keys"), "{e}");
        let bad = "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n";
        let e = parse_pem_bundle(bad.as_bytes()).unwrap_err();
        assert!(matches!(e, CertError::Pem { .. }), "{e}");
    }

    #[test]
    fn writes_atomically_with_key_mode_0600() {
        let dir = TempDir::new("certs-write");
        let src = CertSource {
            name: "a".into(),
            cert: dir.join("a.pem"),
            key: dir.join("a.key"),
            sni: vec![],
            default: false,
        };
        std::fs::write(&src.cert, "old").unwrap();
        write_pem_files(&src, b"CHAIN\n", b"KEY\n").unwrap();
        assert_eq!(std::fs::read(&src.cert).unwrap(), b"CHAIN\n");
        assert_eq!(std::fs::read(&src.key).unwrap(), b"KEY\n");
        let mode = std::fs::metadata(&src.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temp files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        let combined = CertSource {
            key: src.cert.clone(),
            ..src.clone()
        };
        write_pem_files(&combined, b"CHAIN", b"KEY\n").unwrap();
        assert_eq!(std::fs::read(&src.cert).unwrap(), b"CHAIN\nKEY\n");
        let mode = std::fs::metadata(&src.cert).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let missing_dir = CertSource {
            cert: dir.join("nope/a.pem"),
            key: dir.join("nope/a.key"),
            ..src
        };
        let e = write_pem_files(&missing_dir, b"C", b"K").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
