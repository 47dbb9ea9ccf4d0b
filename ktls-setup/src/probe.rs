//! What kernel TLS this host supports, tried for real on loopback TCP pairs.
//!
//! [`probe`] attaches the `tls` ULP, installs probe keys for every cipher ×
//! TLS version in both directions and sends data through the kernel, tries a
//! TLS 1.3 rekey, `TLS_RX_EXPECT_NO_PAD`, `splice(2)` out of a kTLS socket,
//! and asks io_uring which opcodes it has. Every socket has send/receive
//! timeouts ([`IO_TIMEOUT`]) and every loop is bounded, so a probe cannot
//! hang; on a host with kTLS it takes a few milliseconds.
//!
//! [`ulp_available`] is the cheap check (one loopback pair, one
//! `setsockopt`); its error string says why and how to fix it.
//!
//! # JSON schema (`ktls-setup probe --json`)
//!
//! Stable: fields are only ever added. `schema` names the version.
//!
//! ```text
//! {
//!   "schema": "ktls-setup/probe/v1",
//!   "kernel": {
//!     "release": "6.1.0-56-cloud-amd64",     // /proc/sys/kernel/osrelease
//!     "config_source": "/proc/config.gz",    // or "/boot/config-<release>", or null
//!     "config_tls": "m",                     // "y" | "m" | "unset" | "unknown"
//!     "config_modules": "y",                 // CONFIG_MODULES, same values
//!     "modules_dir": "/lib/modules/<release>",
//!     "modules_dir_exists": true,
//!     "tls_module_loaded": true,             // "tls" in /proc/modules
//!     "tls_stat": true                       // /proc/net/tls_stat exists
//!   },
//!   "ulp":              { "status": "ok" | "failed" | "skipped", "detail": null | "..." },
//!   "ciphers": [                             // 6 entries: 1.3 then 1.2, ×
//!     {                                      // AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305
//!       "version": "1.3", "cipher": "AES-128-GCM",
//!       "tx":        { "status": ..., "detail": ... },   // setsockopt(TLS_TX) accepted
//!       "rx":        { "status": ..., "detail": ... },   // setsockopt(TLS_RX) accepted
//!       "roundtrip": { "status": ..., "detail": ... }    // data sent both ways, byte-exact
//!     }
//!   ],
//!   "rekey":            { "status": "supported" | "unsupported" | "failed" | "skipped", "detail": ... },
//!   "rx_expect_no_pad": { "status": ..., "detail": ... },
//!   "splice":           { "status": ..., "detail": ... },
//!   "io_uring": {
//!     "status": "ok" | "failed",             // failed: io_uring_setup or the register probe failed
//!     "detail": null | "...",
//!     "opcodes": { "ACCEPT": true, "ASYNC_CANCEL": true, "CONNECT": true, "POLL_ADD": true,
//!                  "READ": true, "RECV": true, "SEND": true, "SHUTDOWN": true,
//!                  "SPLICE": true, "TIMEOUT": true }
//!   },
//!   "can_offload": true,                     // what the exit status says
//!   "reasons": [],                           // why not, one string each
//!   "elapsed_ms": 7
//! }
//! ```
//!
//! `can_offload` needs: the ULP, AES-128-GCM and AES-256-GCM accepted for TX
//! and RX with a working round trip on TLS 1.3 and TLS 1.2, and splice.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use rustls::ProtocolVersion;
use serde::Serialize;

use crate::crypto::{Cipher, CryptoInfo};
use crate::sock::{self, Direction, CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE};
use crate::KtlsError;

/// Send/receive timeout on every probe socket, and the bound on waits.
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Version string of the JSON document.
pub const SCHEMA: &str = "ktls-setup/probe/v1";

/// The io_uring opcodes the gateway submits.
pub const URING_OPCODES: [(&str, u8); 10] = [
    ("ACCEPT", io_uring::opcode::Accept::CODE),
    ("RECV", io_uring::opcode::Recv::CODE),
    ("SEND", io_uring::opcode::Send::CODE),
    ("CONNECT", io_uring::opcode::Connect::CODE),
    ("SHUTDOWN", io_uring::opcode::Shutdown::CODE),
    ("TIMEOUT", io_uring::opcode::Timeout::CODE),
    ("ASYNC_CANCEL", io_uring::opcode::AsyncCancel::CODE),
    ("READ", io_uring::opcode::Read::CODE),
    ("SPLICE", io_uring::opcode::Splice::CODE),
    ("POLL_ADD", io_uring::opcode::PollAdd::CODE),
];

/// A kernel config option's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ConfigState {
    #[serde(rename = "y")]
    Builtin,
    #[serde(rename = "m")]
    Module,
    #[serde(rename = "unset")]
    Unset,
    /// No readable kernel config.
    #[serde(rename = "unknown")]
    Unknown,
}

impl std::fmt::Display for ConfigState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConfigState::Builtin => "y",
            ConfigState::Module => "m",
            ConfigState::Unset => "unset",
            ConfigState::Unknown => "unknown",
        })
    }
}

/// `KEY`'s state in a kernel `.config` text. A config that does not mention
/// the key at all counts as `Unset` (that is what `make` does).
pub fn parse_config(text: &str, key: &str) -> ConfigState {
    for line in text.lines().take(100_000) {
        let line = line.trim();
        if let Some(v) = line.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
            return match v {
                "y" => ConfigState::Builtin,
                "m" => ConfigState::Module,
                _ => ConfigState::Unset,
            };
        }
        if line.strip_prefix("# ").and_then(|r| r.strip_prefix(key)) == Some(" is not set") {
            return ConfigState::Unset;
        }
    }
    ConfigState::Unset
}

/// What the running kernel says about TLS support, without touching a socket.
#[derive(Debug, Clone, Serialize)]
pub struct KernelInfo {
    pub release: String,
    pub config_source: Option<String>,
    pub config_tls: ConfigState,
    pub config_modules: ConfigState,
    pub modules_dir: String,
    pub modules_dir_exists: bool,
    pub tls_module_loaded: bool,
    pub tls_stat: bool,
}

/// Bounded read of a small text file.
fn read_text(path: &Path, limit: u64) -> io::Result<String> {
    let mut s = String::new();
    std::fs::File::open(path)?
        .take(limit)
        .read_to_string(&mut s)?;
    Ok(s)
}

fn read_kernel_config(release: &str) -> Option<(String, String)> {
    const LIMIT: u64 = 16 << 20;
    if let Ok(f) = std::fs::File::open("/proc/config.gz") {
        let mut s = String::new();
        if flate2::read::GzDecoder::new(f)
            .take(LIMIT)
            .read_to_string(&mut s)
            .is_ok()
        {
            return Some(("/proc/config.gz".into(), s));
        }
    }
    for p in [
        format!("/boot/config-{release}"),
        format!("/lib/modules/{release}/config"),
    ] {
        if let Ok(s) = read_text(Path::new(&p), LIMIT) {
            return Some((p, s));
        }
    }
    None
}

/// Whether `name` is a loaded module per a `/proc/modules` text.
pub fn module_loaded(proc_modules: &str, name: &str) -> bool {
    proc_modules
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

impl KernelInfo {
    /// Reads `/proc`, the kernel config and `/lib/modules`.
    pub fn read() -> Self {
        let release = read_text(Path::new("/proc/sys/kernel/osrelease"), 256)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let (config_source, config_tls, config_modules) = match read_kernel_config(&release) {
            Some((src, text)) => (
                Some(src),
                parse_config(&text, "CONFIG_TLS"),
                parse_config(&text, "CONFIG_MODULES"),
            ),
            None => (None, ConfigState::Unknown, ConfigState::Unknown),
        };
        let modules_dir = format!("/lib/modules/{release}");
        let modules_dir_exists = Path::new(&modules_dir).is_dir();
        let tls_module_loaded = read_text(Path::new("/proc/modules"), 4 << 20)
            .map(|s| module_loaded(&s, "tls"))
            .unwrap_or(false);
        KernelInfo {
            release,
            config_source,
            config_tls,
            config_modules,
            modules_dir,
            modules_dir_exists,
            tls_module_loaded,
            tls_stat: Path::new("/proc/net/tls_stat").exists(),
        }
    }

    /// Whether this kernel could load the `tls` module at all (None: cannot
    /// tell), with the reason when it cannot.
    pub fn modules_unsupported(&self) -> Option<String> {
        if self.config_modules == ConfigState::Unset {
            return Some(format!(
                "kernel {} is built without loadable module support (CONFIG_MODULES is not set{})",
                self.release,
                self.source_note()
            ));
        }
        if !self.modules_dir_exists {
            return Some(format!(
                "{} does not exist: no modules are installed for kernel {}",
                self.modules_dir, self.release
            ));
        }
        None
    }

    fn source_note(&self) -> String {
        match &self.config_source {
            Some(s) => format!(", per {s}"),
            None => String::new(),
        }
    }

    /// Why the TLS ULP is missing and what to do, given the error
    /// `setsockopt(TCP_ULP, "tls")` returned.
    pub fn diagnose_ulp(&self, err: &io::Error) -> String {
        let head = format!("setsockopt(TCP_ULP, \"tls\") failed: {err}");
        let why = match self.config_tls {
            ConfigState::Unset => format!(
                "kernel {} is built without kernel TLS (CONFIG_TLS is not set{}); \
                 boot a kernel with CONFIG_TLS=y or CONFIG_TLS=m (e.g. a distribution kernel) — \
                 `ktls-setup enable` cannot fix this",
                self.release,
                self.source_note()
            ),
            ConfigState::Module => {
                if let Some(why) = self.modules_unsupported() {
                    format!(
                        "CONFIG_TLS=m but {why}; install the modules of kernel {} \
                         (e.g. its linux-modules/linux-image package) or use a kernel with CONFIG_TLS=y",
                        self.release
                    )
                } else if !self.tls_module_loaded {
                    "the tls module is not loaded (CONFIG_TLS=m) and was not auto-loaded; \
                     run `ktls-setup enable` (modprobe tls, and load it at boot)"
                        .to_string()
                } else {
                    "the tls module is loaded but refuses this socket".to_string()
                }
            }
            ConfigState::Builtin => "CONFIG_TLS=y yet the ULP is refused".to_string(),
            ConfigState::Unknown => {
                if let Some(why) = self.modules_unsupported() {
                    format!(
                        "no kernel config found (/proc/config.gz, /boot/config-{}); {why}, \
                         so kernel TLS needs a kernel built with CONFIG_TLS=y",
                        self.release
                    )
                } else if !self.tls_module_loaded {
                    "no kernel config found; the tls module is not loaded: try `ktls-setup enable` \
                     (modprobe tls); if that fails the kernel lacks CONFIG_TLS"
                        .to_string()
                } else {
                    "no kernel config found; the tls module is loaded but refuses this socket"
                        .to_string()
                }
            }
        };
        format!("kernel TLS unavailable: {head}: {why}")
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub status: Status,
    pub detail: Option<String>,
}

/// Status of a [`Check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Failed,
    Skipped,
    /// Rekey only: the kernel accepted new keys and data still flowed.
    Supported,
    /// Rekey only: the kernel refuses a second key install (EBUSY, < 6.14).
    Unsupported,
}

impl Check {
    pub fn ok() -> Self {
        Check {
            status: Status::Ok,
            detail: None,
        }
    }
    pub fn failed(detail: impl Into<String>) -> Self {
        Check {
            status: Status::Failed,
            detail: Some(detail.into()),
        }
    }
    pub fn skipped(detail: impl Into<String>) -> Self {
        Check {
            status: Status::Skipped,
            detail: Some(detail.into()),
        }
    }
    pub fn is_ok(&self) -> bool {
        matches!(self.status, Status::Ok | Status::Supported)
    }
    fn from_result<E: std::fmt::Display>(r: Result<(), E>) -> Self {
        match r {
            Ok(()) => Check::ok(),
            Err(e) => Check::failed(e.to_string()),
        }
    }
    /// A short word for tables.
    pub fn word(&self) -> &'static str {
        match self.status {
            Status::Ok => "ok",
            Status::Failed => "FAILED",
            Status::Skipped => "-",
            Status::Supported => "supported",
            Status::Unsupported => "unsupported",
        }
    }
}

/// TLS version label used in reports ("1.2", "1.3").
pub fn version_label(v: ProtocolVersion) -> &'static str {
    match v {
        ProtocolVersion::TLSv1_2 => "1.2",
        ProtocolVersion::TLSv1_3 => "1.3",
        _ => "?",
    }
}

/// One cipher × version.
#[derive(Debug, Clone, Serialize)]
pub struct CipherResult {
    pub version: &'static str,
    pub cipher: &'static str,
    pub tx: Check,
    pub rx: Check,
    pub roundtrip: Check,
}

impl CipherResult {
    pub fn works(&self) -> bool {
        self.tx.is_ok() && self.rx.is_ok() && self.roundtrip.is_ok()
    }
}

/// io_uring support.
#[derive(Debug, Clone, Serialize)]
pub struct UringReport {
    pub status: Status,
    pub detail: Option<String>,
    pub opcodes: BTreeMap<&'static str, bool>,
}

/// Everything [`probe`] found.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub schema: &'static str,
    pub kernel: KernelInfo,
    pub ulp: Check,
    pub ciphers: Vec<CipherResult>,
    pub rekey: Check,
    pub rx_expect_no_pad: Check,
    pub splice: Check,
    pub io_uring: UringReport,
    pub can_offload: bool,
    pub reasons: Vec<String>,
    pub elapsed_ms: u64,
}

/// The (version, cipher) pairs the gateway needs for offload.
pub const REQUIRED: [(ProtocolVersion, Cipher); 4] = [
    (ProtocolVersion::TLSv1_3, Cipher::Aes128Gcm),
    (ProtocolVersion::TLSv1_3, Cipher::Aes256Gcm),
    (ProtocolVersion::TLSv1_2, Cipher::Aes128Gcm),
    (ProtocolVersion::TLSv1_2, Cipher::Aes256Gcm),
];

impl ProbeReport {
    /// Whether the gateway can offload on this host; the error is the reason
    /// (several joined with "; ").
    pub fn can_offload(&self) -> Result<(), String> {
        let r = self.compute_reasons();
        if r.is_empty() {
            Ok(())
        } else {
            Err(r.join("; "))
        }
    }

    /// The cipher result for a version and cipher.
    pub fn cipher(&self, version: ProtocolVersion, cipher: Cipher) -> Option<&CipherResult> {
        self.ciphers
            .iter()
            .find(|c| c.version == version_label(version) && c.cipher == cipher.name())
    }

    /// The (version, cipher) pairs that passed.
    pub fn working(&self) -> Vec<(ProtocolVersion, Cipher)> {
        let mut out = Vec::new();
        for v in [ProtocolVersion::TLSv1_3, ProtocolVersion::TLSv1_2] {
            for c in Cipher::ALL {
                if self.cipher(v, c).is_some_and(CipherResult::works) {
                    out.push((v, c));
                }
            }
        }
        out
    }

    fn compute_reasons(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.ulp.is_ok() {
            out.push(
                self.ulp
                    .detail
                    .clone()
                    .unwrap_or_else(|| "kernel TLS unavailable".to_string()),
            );
            return out;
        }
        for (v, c) in REQUIRED {
            match self.cipher(v, c) {
                None => out.push(format!("{c} on TLS {} was not probed", version_label(v))),
                Some(r) if !r.works() => {
                    let (what, check) = if !r.tx.is_ok() {
                        ("TLS_TX refused", &r.tx)
                    } else if !r.rx.is_ok() {
                        ("TLS_RX refused", &r.rx)
                    } else {
                        ("round trip failed", &r.roundtrip)
                    };
                    out.push(format!(
                        "{c} on TLS {}: {what}: {}",
                        version_label(v),
                        check.detail.as_deref().unwrap_or("?")
                    ));
                }
                Some(_) => {}
            }
        }
        if !self.splice.is_ok() {
            out.push(format!(
                "splice from a kTLS socket: {}",
                self.splice.detail.as_deref().unwrap_or("failed")
            ));
        }
        out
    }

    /// The readable table `ktls-setup probe` prints.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let k = &self.kernel;
        let _ = writeln!(s, "kernel      {}", k.release);
        let _ = writeln!(
            s,
            "config      CONFIG_TLS={} CONFIG_MODULES={} ({})",
            k.config_tls,
            k.config_modules,
            k.config_source
                .as_deref()
                .unwrap_or("no kernel config found")
        );
        let _ = writeln!(
            s,
            "modules     {} {}; tls module {}; /proc/net/tls_stat {}",
            k.modules_dir,
            if k.modules_dir_exists {
                "exists"
            } else {
                "missing"
            },
            if k.tls_module_loaded {
                "loaded"
            } else {
                "not loaded"
            },
            if k.tls_stat { "present" } else { "absent" }
        );
        let ulp_note = if self.ulp.is_ok() {
            String::new()
        } else {
            " (reason below)".to_string()
        };
        let _ = writeln!(s, "TLS ULP     {}{ulp_note}", self.ulp.word());
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<8} {:<18} {:<7} {:<7} roundtrip",
            "version", "cipher", "TX", "RX"
        );
        for c in &self.ciphers {
            let _ = writeln!(
                s,
                "TLS {:<4} {:<18} {:<7} {:<7} {}",
                c.version,
                c.cipher,
                c.tx.word(),
                c.rx.word(),
                c.roundtrip.word()
            );
        }
        for c in &self.ciphers {
            for (what, ch) in [("TX", &c.tx), ("RX", &c.rx), ("roundtrip", &c.roundtrip)] {
                if ch.status == Status::Failed {
                    let _ = writeln!(
                        s,
                        "  TLS {} {} {what}: {}",
                        c.version,
                        c.cipher,
                        ch.detail.as_deref().unwrap_or("")
                    );
                }
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "rekey (TLS 1.3 KeyUpdate)  {}{}",
            self.rekey.word(),
            detail(&self.rekey)
        );
        let _ = writeln!(
            s,
            "TLS_RX_EXPECT_NO_PAD       {}{}",
            self.rx_expect_no_pad.word(),
            detail(&self.rx_expect_no_pad)
        );
        let _ = writeln!(
            s,
            "splice from kTLS socket    {}{}",
            self.splice.word(),
            detail(&self.splice)
        );
        let ops: Vec<String> = URING_OPCODES
            .iter()
            .map(|(n, _)| {
                let ok = self.io_uring.opcodes.get(n).copied().unwrap_or(false);
                format!("{n}{}", if ok { "" } else { "(missing)" })
            })
            .collect();
        let _ = writeln!(
            s,
            "io_uring                   {}{}: {}",
            if self.io_uring.status == Status::Ok {
                "ok"
            } else {
                "FAILED"
            },
            self.io_uring
                .detail
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default(),
            ops.join(" ")
        );
        let _ = writeln!(s);
        if self.can_offload {
            let _ = writeln!(s, "offload: yes ({} ms)", self.elapsed_ms);
        } else {
            let _ = writeln!(s, "offload: NO ({} ms)", self.elapsed_ms);
            for r in &self.reasons {
                let _ = writeln!(s, "  - {r}");
            }
        }
        s
    }
}

fn detail(c: &Check) -> String {
    match &c.detail {
        Some(d) => format!(" ({d})"),
        None => String::new(),
    }
}

/// A connected loopback TCP pair with timeouts on both ends.
pub fn tcp_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr: SocketAddr = listener.local_addr()?;
    let a = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let b = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    };
    for s in [&a, &b] {
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
    }
    Ok((a, b))
}

/// The cheap check: can a TCP socket get the `tls` ULP? The error says why
/// not and how to fix it.
pub fn ulp_available() -> Result<(), String> {
    let (a, _b) = tcp_pair()
        .map_err(|e| format!("cannot make a loopback TCP pair to probe kernel TLS: {e}"))?;
    match sock::enable_ulp(a.as_fd()) {
        Ok(()) => Ok(()),
        Err(KtlsError::Unavailable(e)) => Err(KernelInfo::read().diagnose_ulp(&e)),
        Err(e) => Err(e.to_string()),
    }
}

/// Receives exactly `want` bytes of application data, bounded by the
/// socket timeout and a deadline.
fn recv_exact_data(fd: BorrowedFd<'_>, want: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(want);
    let mut buf = vec![0u8; 16 * 1024 + 64];
    let deadline = Instant::now() + IO_TIMEOUT;
    while out.len() < want {
        if Instant::now() > deadline {
            return Err(format!("timed out after {} of {want} bytes", out.len()));
        }
        let (ct, n) = sock::recv_record(fd, &mut buf).map_err(|e| format!("recv: {e}"))?;
        if ct != CONTENT_APPLICATION_DATA {
            return Err(format!("unexpected record type {ct}"));
        }
        if n == 0 {
            return Err(format!("EOF after {} of {want} bytes", out.len()));
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(out)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Sends `len` bytes from `a` and checks `b` gets them.
fn transfer(a: &mut TcpStream, b: &TcpStream, len: usize, seed: u8) -> Result<(), String> {
    let data = pattern(len, seed);
    a.write_all(&data).map_err(|e| format!("send: {e}"))?;
    let got = recv_exact_data(b.as_fd(), len)?;
    if got != data {
        return Err("received bytes differ from those sent".into());
    }
    Ok(())
}

/// One pair with keys installed in both directions.
struct ProbePair {
    a: TcpStream,
    b: TcpStream,
}

const PROBE_LEN: usize = 20_000; // more than one 16 KiB record

/// Tries one cipher × version; returns the pair if it works, for more checks.
fn probe_cipher(version: ProtocolVersion, cipher: Cipher) -> (CipherResult, Option<ProbePair>) {
    let mut result = CipherResult {
        version: version_label(version),
        cipher: cipher.name(),
        tx: Check::skipped("not tried"),
        rx: Check::skipped("not tried"),
        roundtrip: Check::skipped("not tried"),
    };
    let (mut a, mut b) = match tcp_pair() {
        Ok(p) => p,
        Err(e) => {
            result.tx = Check::failed(format!("loopback pair: {e}"));
            return (result, None);
        }
    };
    let setup = || -> Result<(CryptoInfo, CryptoInfo), KtlsError> {
        sock::enable_ulp(a.as_fd())?;
        sock::enable_ulp(b.as_fd())?;
        Ok((
            CryptoInfo::for_probe(version, cipher, 0x5a)?,
            CryptoInfo::for_probe(version, cipher, 0xa5)?,
        ))
    };
    let (ab, ba) = match setup() {
        Ok(k) => k,
        Err(e) => {
            result.tx = Check::failed(e.to_string());
            return (result, None);
        }
    };
    // a→b uses `ab`, b→a uses `ba`.
    let tx = sock::set_crypto(a.as_fd(), Direction::Tx, &ab)
        .and_then(|()| sock::set_crypto(b.as_fd(), Direction::Tx, &ba));
    let rx = sock::set_crypto(b.as_fd(), Direction::Rx, &ab)
        .and_then(|()| sock::set_crypto(a.as_fd(), Direction::Rx, &ba));
    let both = tx.is_ok() && rx.is_ok();
    result.tx = Check::from_result(tx.map_err(|e| errno_text(&e)));
    result.rx = Check::from_result(rx.map_err(|e| errno_text(&e)));
    if !both {
        result.roundtrip = Check::skipped("keys refused");
        return (result, None);
    }
    result.roundtrip = Check::from_result(
        transfer(&mut a, &b, PROBE_LEN, 1).and_then(|()| transfer(&mut b, &a, PROBE_LEN, 2)),
    );
    let pair = result.roundtrip.is_ok().then_some(ProbePair { a, b });
    (result, pair)
}

fn errno_text(e: &KtlsError) -> String {
    match e {
        KtlsError::CryptoRejected { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// TLS 1.3 rekey on a working pair: a KeyUpdate record under the old key,
/// then new keys on both ends, then data.
fn probe_rekey(p: &mut ProbePair) -> Check {
    let key_update = [24u8, 0, 0, 1, 0];
    if let Err(e) = sock::send_record(p.a.as_fd(), CONTENT_HANDSHAKE, &key_update) {
        return Check::failed(format!("sending KeyUpdate: {e}"));
    }
    let mut buf = [0u8; 64];
    match sock::recv_record(p.b.as_fd(), &mut buf) {
        Ok((CONTENT_HANDSHAKE, 5)) if buf[..5] == key_update => {}
        Ok((ct, n)) => return Check::failed(format!("KeyUpdate arrived as type {ct}, {n} bytes")),
        Err(e) => return Check::failed(format!("receiving KeyUpdate: {e}")),
    }
    let (v, c) = (ProtocolVersion::TLSv1_3, Cipher::Aes128Gcm);
    let new = match CryptoInfo::for_probe(v, c, 0x3c) {
        Ok(k) => k,
        Err(e) => return Check::failed(e.to_string()),
    };
    match sock::set_crypto(p.a.as_fd(), Direction::Tx, &new) {
        Ok(()) => {}
        Err(KtlsError::CryptoRejected { source, .. })
            if source.raw_os_error() == Some(libc::EBUSY) =>
        {
            return Check {
                status: Status::Unsupported,
                detail: Some(format!(
                    "second TLS_TX refused: {source} (kernels before 6.14 cannot rekey; \
                     a peer's KeyUpdate ends the connection)"
                )),
            };
        }
        Err(e) => return Check::failed(format!("second TLS_TX: {}", errno_text(&e))),
    }
    if let Err(e) = sock::set_crypto(p.b.as_fd(), Direction::Rx, &new) {
        return Check::failed(format!(
            "TLS_TX rekeyed but second TLS_RX refused: {}",
            errno_text(&e)
        ));
    }
    match transfer(&mut p.a, &p.b, PROBE_LEN, 3) {
        Ok(()) => Check {
            status: Status::Supported,
            detail: None,
        },
        Err(e) => Check::failed(format!("data after rekey: {e}")),
    }
}

fn probe_no_pad(p: &ProbePair) -> Check {
    Check::from_result(sock::set_rx_expect_no_pad(p.b.as_fd()))
}

/// `splice(2)` from the kTLS socket `b` into a pipe, non-blocking, polled.
fn probe_splice(p: &mut ProbePair) -> Check {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Check::failed(format!("pipe2: {}", io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded, so both are fresh descriptors owned by us.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let len = 3000;
    let data = pattern(len, 4);
    if let Err(e) = p.a.write_all(&data) {
        return Check::failed(format!("send: {e}"));
    }
    let mut got = Vec::with_capacity(len);
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut tmp = vec![0u8; len];
    while got.len() < len {
        if Instant::now() > deadline {
            return Check::failed(format!("timed out after {} of {len} bytes", got.len()));
        }
        let mut pfd = libc::pollfd {
            fd: p.b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, bounded timeout.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        // SAFETY: both descriptors are live; null offsets mean "current
        // position" as sockets and pipes require.
        let n = unsafe {
            libc::splice(
                p.b.as_raw_fd(),
                std::ptr::null_mut(),
                wr.as_raw_fd(),
                std::ptr::null_mut(),
                len - got.len(),
                libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Check::failed(format!("splice: {e}"));
        }
        if n == 0 {
            return Check::failed("splice returned EOF");
        }
        // SAFETY: `tmp` is writable for its length; `rd` is live.
        let r = unsafe {
            libc::read(
                rd.as_raw_fd(),
                tmp.as_mut_ptr() as *mut libc::c_void,
                tmp.len(),
            )
        };
        if r < 0 {
            return Check::failed(format!("read from pipe: {}", io::Error::last_os_error()));
        }
        got.extend_from_slice(&tmp[..r as usize]);
    }
    if got == data {
        Check::ok()
    } else {
        Check::failed("spliced bytes differ from those sent")
    }
}

fn probe_uring() -> UringReport {
    let mut opcodes: BTreeMap<&'static str, bool> =
        URING_OPCODES.iter().map(|(n, _)| (*n, false)).collect();
    let ring = match io_uring::IoUring::new(4) {
        Ok(r) => r,
        Err(e) => {
            let hint = if e.raw_os_error() == Some(libc::EPERM) {
                " (kernel.io_uring_disabled sysctl?)"
            } else {
                ""
            };
            return UringReport {
                status: Status::Failed,
                detail: Some(format!("io_uring_setup: {e}{hint}")),
                opcodes,
            };
        }
    };
    let mut probe = io_uring::Probe::new();
    if let Err(e) = ring.submitter().register_probe(&mut probe) {
        return UringReport {
            status: Status::Failed,
            detail: Some(format!("IORING_REGISTER_PROBE: {e}")),
            opcodes,
        };
    }
    for (name, code) in URING_OPCODES {
        opcodes.insert(name, probe.is_supported(code));
    }
    let missing: Vec<&str> = opcodes
        .iter()
        .filter(|(_, ok)| !**ok)
        .map(|(n, _)| *n)
        .collect();
    UringReport {
        status: if missing.is_empty() {
            Status::Ok
        } else {
            Status::Failed
        },
        detail: if missing.is_empty() {
            None
        } else {
            Some(format!("missing: {}", missing.join(", ")))
        },
        opcodes,
    }
}

/// Probes everything; see the module docs.
pub fn probe() -> ProbeReport {
    let start = Instant::now();
    let kernel = KernelInfo::read();
    let ulp = match tcp_pair() {
        Err(e) => Check::failed(format!("cannot make a loopback TCP pair: {e}")),
        Ok((a, _b)) => match sock::enable_ulp(a.as_fd()) {
            Ok(()) => Check::ok(),
            Err(KtlsError::Unavailable(e)) => Check::failed(kernel.diagnose_ulp(&e)),
            Err(e) => Check::failed(e.to_string()),
        },
    };
    let mut ciphers = Vec::new();
    let mut rekey = Check::skipped("TLS ULP unavailable");
    let mut no_pad = Check::skipped("TLS ULP unavailable");
    let mut splice = Check::skipped("TLS ULP unavailable");
    // The kernel may only be able to tell us after a module loaded, so
    // re-read what /proc says once the ULP worked.
    let kernel = if ulp.is_ok() {
        KernelInfo::read()
    } else {
        kernel
    };
    for v in [ProtocolVersion::TLSv1_3, ProtocolVersion::TLSv1_2] {
        for c in Cipher::ALL {
            if !ulp.is_ok() {
                ciphers.push(CipherResult {
                    version: version_label(v),
                    cipher: c.name(),
                    tx: Check::skipped("TLS ULP unavailable"),
                    rx: Check::skipped("TLS ULP unavailable"),
                    roundtrip: Check::skipped("TLS ULP unavailable"),
                });
                continue;
            }
            let (result, mut pair) = probe_cipher(v, c);
            if v == ProtocolVersion::TLSv1_3 && c == Cipher::Aes128Gcm {
                if let Some(pair) = pair.as_mut() {
                    no_pad = probe_no_pad(pair);
                    rekey = probe_rekey(pair);
                } else {
                    no_pad = Check::skipped("AES-128-GCM on TLS 1.3 does not work");
                    rekey = Check::skipped("AES-128-GCM on TLS 1.3 does not work");
                }
            }
            // splice: on TLS 1.3 (AES-256-GCM) and TLS 1.2 (AES-128-GCM).
            if (v == ProtocolVersion::TLSv1_3 && c == Cipher::Aes256Gcm)
                || (v == ProtocolVersion::TLSv1_2 && c == Cipher::Aes128Gcm)
            {
                let this = match pair.as_mut() {
                    Some(pair) => probe_splice(pair),
                    None => Check::failed(format!("{c} on TLS {} does not work", version_label(v))),
                };
                splice = match (splice.status, this.is_ok()) {
                    // first one, or the earlier one passed: take this one
                    (Status::Skipped, _) | (Status::Ok, _) => match this.detail {
                        Some(d) => Check::failed(format!("TLS {}: {d}", version_label(v))),
                        None => Check::ok(),
                    },
                    _ => splice,
                };
            }
            ciphers.push(result);
        }
    }
    let mut report = ProbeReport {
        schema: SCHEMA,
        kernel,
        ulp,
        ciphers,
        rekey,
        rx_expect_no_pad: no_pad,
        splice,
        io_uring: probe_uring(),
        can_offload: false,
        reasons: Vec::new(),
        elapsed_ms: 0,
    };
    report.reasons = report.compute_reasons();
    report.can_offload = report.reasons.is_empty();
    report.elapsed_ms = start.elapsed().as_millis() as u64;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(tls: ConfigState, modules: ConfigState, dir: bool, loaded: bool) -> KernelInfo {
        KernelInfo {
            release: "6.18.0-test".into(),
            config_source: Some("/proc/config.gz".into()),
            config_tls: tls,
            config_modules: modules,
            modules_dir: "/lib/modules/6.18.0-test".into(),
            modules_dir_exists: dir,
            tls_module_loaded: loaded,
            tls_stat: loaded,
        }
    }

    fn enoent() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOENT)
    }

    #[test]
    fn config_parsing() {
        let cfg =
            "CONFIG_TLS_DEVICE=y\n# CONFIG_TLS is not set\nCONFIG_MODULES=y\nCONFIG_IO_URING=y\n";
        assert_eq!(parse_config(cfg, "CONFIG_TLS"), ConfigState::Unset);
        assert_eq!(parse_config(cfg, "CONFIG_MODULES"), ConfigState::Builtin);
        assert_eq!(
            parse_config("CONFIG_TLS=m\n", "CONFIG_TLS"),
            ConfigState::Module
        );
        assert_eq!(
            parse_config("CONFIG_TLS_TOE=y\n", "CONFIG_TLS"),
            ConfigState::Unset
        );
        assert_eq!(parse_config("", "CONFIG_TLS"), ConfigState::Unset);
    }

    #[test]
    fn proc_modules_parsing() {
        let m = "tls 126976 0 - Live 0x0\ntls_foo 1 0 - Live 0x0\n";
        assert!(module_loaded(m, "tls"));
        assert!(!module_loaded("tls_foo 1 0 - Live 0x0\n", "tls"));
    }

    #[test]
    fn reason_config_unset() {
        let r =
            kernel(ConfigState::Unset, ConfigState::Unset, false, false).diagnose_ulp(&enoent());
        assert!(
            r.starts_with("kernel TLS unavailable: setsockopt(TCP_ULP, \"tls\") failed"),
            "{r}"
        );
        assert!(
            r.contains("CONFIG_TLS is not set, per /proc/config.gz"),
            "{r}"
        );
        assert!(r.contains("CONFIG_TLS=y or CONFIG_TLS=m"), "{r}");
        assert!(r.contains("cannot fix"), "{r}");
    }

    #[test]
    fn reason_module_not_loaded() {
        let r =
            kernel(ConfigState::Module, ConfigState::Builtin, true, false).diagnose_ulp(&enoent());
        assert!(r.contains("not loaded"), "{r}");
        assert!(r.contains("ktls-setup enable"), "{r}");
    }

    #[test]
    fn reason_module_without_modules_dir() {
        let r =
            kernel(ConfigState::Module, ConfigState::Builtin, false, false).diagnose_ulp(&enoent());
        assert!(r.contains("/lib/modules/6.18.0-test does not exist"), "{r}");
    }

    #[test]
    fn reason_unknown_config_no_modules() {
        let mut k = kernel(ConfigState::Unknown, ConfigState::Unknown, false, false);
        k.config_source = None;
        let r = k.diagnose_ulp(&enoent());
        assert!(r.contains("no kernel config found"), "{r}");
        assert!(r.contains("CONFIG_TLS=y"), "{r}");
    }

    fn sample_report(ok: bool) -> ProbeReport {
        let mut ciphers = Vec::new();
        for v in ["1.3", "1.2"] {
            for c in Cipher::ALL {
                ciphers.push(CipherResult {
                    version: v,
                    cipher: c.name(),
                    tx: Check::ok(),
                    rx: if ok || c != Cipher::Aes256Gcm || v != "1.2" {
                        Check::ok()
                    } else {
                        Check::failed("Invalid argument (os error 22)")
                    },
                    roundtrip: Check::ok(),
                });
            }
        }
        let mut r = ProbeReport {
            schema: SCHEMA,
            kernel: kernel(ConfigState::Module, ConfigState::Builtin, true, true),
            ulp: Check::ok(),
            ciphers,
            rekey: Check {
                status: Status::Unsupported,
                detail: Some("EBUSY".into()),
            },
            rx_expect_no_pad: Check::ok(),
            splice: Check::ok(),
            io_uring: UringReport {
                status: Status::Ok,
                detail: None,
                opcodes: URING_OPCODES.iter().map(|(n, _)| (*n, true)).collect(),
            },
            can_offload: false,
            reasons: Vec::new(),
            elapsed_ms: 3,
        };
        r.reasons = r.compute_reasons();
        r.can_offload = r.reasons.is_empty();
        r
    }

    #[test]
    fn can_offload_and_reasons() {
        let good = sample_report(true);
        assert_eq!(good.can_offload(), Ok(()));
        assert_eq!(good.working().len(), 6);
        let bad = sample_report(false);
        let e = bad.can_offload().unwrap_err();
        assert_eq!(
            e,
            "AES-256-GCM on TLS 1.2: TLS_RX refused: Invalid argument (os error 22)"
        );
        assert!(!bad.can_offload);
        assert!(bad.to_text().contains("offload: NO"));

        let mut no_ulp = sample_report(true);
        no_ulp.ulp = Check::failed("kernel TLS unavailable: because");
        no_ulp.splice = Check::failed("x");
        assert_eq!(
            no_ulp.can_offload().unwrap_err(),
            "kernel TLS unavailable: because"
        );
    }

    #[test]
    fn json_schema_shape() {
        let v = serde_json::to_value(sample_report(true)).unwrap();
        assert_eq!(v["schema"], SCHEMA);
        let obj = v.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "can_offload",
                "ciphers",
                "elapsed_ms",
                "io_uring",
                "kernel",
                "reasons",
                "rekey",
                "rx_expect_no_pad",
                "schema",
                "splice",
                "ulp"
            ]
        );
        let k = &v["kernel"];
        for key in [
            "release",
            "config_source",
            "config_tls",
            "config_modules",
            "modules_dir",
            "modules_dir_exists",
            "tls_module_loaded",
            "tls_stat",
        ] {
            assert!(k.get(key).is_some(), "kernel.{key} missing");
        }
        assert_eq!(k["config_tls"], "m");
        assert_eq!(k["config_modules"], "y");
        assert_eq!(
            v["ulp"],
            serde_json::json!({"status": "ok", "detail": null})
        );
        assert_eq!(v["rekey"]["status"], "unsupported");
        let c0 = &v["ciphers"][0];
        assert_eq!(c0["version"], "1.3");
        assert_eq!(c0["cipher"], "AES-128-GCM");
        for key in ["tx", "rx", "roundtrip"] {
            assert_eq!(c0[key]["status"], "ok");
        }
        assert_eq!(v["ciphers"].as_array().unwrap().len(), 6);
        assert_eq!(v["io_uring"]["opcodes"].as_object().unwrap().len(), 10);
        assert_eq!(v["io_uring"]["opcodes"]["SPLICE"], true);
        assert_eq!(v["can_offload"], true);
        assert_eq!(v["reasons"], serde_json::json!([]));
    }

    /// On any host: the probe terminates, and the report is consistent.
    #[test]
    fn probe_runs_and_is_consistent() {
        let r = probe();
        assert_eq!(r.can_offload, r.can_offload().is_ok());
        assert_eq!(r.ciphers.len(), 6);
        if !r.ulp.is_ok() {
            assert!(ulp_available().is_err());
            assert!(
                r.reasons[0].starts_with("kernel TLS unavailable"),
                "{:?}",
                r.reasons
            );
        }
    }
}
