//! Configuration: the TOML file format, its defaults, and validation.
//!
//! Every validation error names the key it is about (`listener[0].backend`,
//! `timeouts.handshake`, ...), so an operator can fix the file without
//! reading code. Command-line flags are merged in by the binary through
//! [`Overrides`].

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration, as read from `gateway.toml`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub tls: TlsPolicy,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub audit: AuditSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub reload: ReloadSection,
    /// `[[listener]]` tables.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
}

/// `[server]`: the data plane's shape.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Worker threads; default: one per online core.
    pub workers: Option<usize>,
    /// Pin each worker to its own core.
    pub pin_workers: bool,
    /// Open connections one worker accepts; beyond it new ones are closed.
    pub max_connections_per_worker: usize,
    /// Submission queue entries per io_uring.
    pub ring_entries: u32,
    /// `listen(2)` backlog per listener socket.
    pub backlog: i32,
    /// Kernel TLS offload: `auto` (when the kernel supports it), `require`
    /// (refuse to start without it), `off`.
    pub ktls: crate::offload::KtlsMode,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            workers: None,
            pin_workers: true,
            max_connections_per_worker: 16_384,
            ring_entries: 4096,
            backlog: 4096,
            ktls: crate::offload::KtlsMode::Auto,
        }
    }
}

/// `[timeouts]`, written like `"10s"`, `"500ms"`, `"10m"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// From accept to a finished TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake: Duration,
    /// No byte in either direction for this long closes the connection.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// After SIGTERM, how long live connections may take to finish.
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
    /// Connecting to the backend.
    #[serde(with = "humantime_serde")]
    pub backend_connect: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            idle: Duration::from_secs(600),
            drain: Duration::from_secs(30),
            backend_connect: Duration::from_secs(5),
        }
    }
}

/// `[tls]`: protocol policy applied to every listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsPolicy {
    /// `"1.2"` and/or `"1.3"`.
    pub versions: Vec<String>,
    /// rustls suite names, e.g. `TLS13_AES_128_GCM_SHA256`; empty: all.
    pub cipher_suites: Vec<String>,
    /// Key-exchange groups, e.g. `X25519`, `secp256r1`; empty: the defaults.
    pub groups: Vec<String>,
    /// ALPN protocols offered to clients, in preference order.
    pub alpn: Vec<String>,
    /// Suites a handshake is expected to end with; empty: no check.
    pub expected_cipher_suites: Vec<String>,
    /// What a handshake outside `expected_cipher_suites` gets: `warn` (log
    /// and count) or `enforce` (refused with an alert).
    pub policy: PolicyMode,
    /// PEM bundle of the trust roots every served chain must lead to.
    pub trust_roots: Option<PathBuf>,
    /// CRL files (PEM or DER) consulted when certificates are loaded.
    pub crls: Vec<PathBuf>,
    /// Warn this long before a certificate expires.
    #[serde(with = "humantime_serde")]
    pub expiry_warning: Duration,
    /// Session-ticket key files (48 or 80 random bytes each, the first one
    /// encrypts); shared by all hosts of a fleet. Empty: tickets with keys
    /// that live in this process only.
    pub ticket_keys: Vec<PathBuf>,
    /// How long a session ticket stays valid.
    #[serde(with = "humantime_serde")]
    pub ticket_lifetime: Duration,
    /// Issue session tickets (stateless resumption).
    pub session_tickets: bool,
    /// Sessions kept for stateful resumption (per process); 0: none.
    pub session_cache: usize,
}

impl Default for TlsPolicy {
    fn default() -> Self {
        Self {
            versions: vec!["1.2".into(), "1.3".into()],
            cipher_suites: Vec::new(),
            groups: Vec::new(),
            alpn: vec!["http/1.1".into()],
            expected_cipher_suites: Vec::new(),
            policy: PolicyMode::Warn,
            trust_roots: None,
            crls: Vec::new(),
            expiry_warning: Duration::from_secs(30 * 86_400),
            ticket_keys: Vec::new(),
            ticket_lifetime: Duration::from_secs(12 * 3600),
            session_tickets: true,
            session_cache: 4096,
        }
    }
}

/// What a policy deviation gets.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    #[default]
    Warn,
    Enforce,
}

/// `[audit]`: one JSON line per session.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// A file path, or `-` for stdout; unset: no audit records.
    pub path: Option<String>,
}

/// `[admin]`: the admin HTTP API.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// `HOST:PORT` or `unix:/path`; unset: no admin API.
    pub listen: Option<String>,
    /// File holding the bearer token (required off loopback).
    pub token_file: Option<PathBuf>,
}

/// `[reload]`: certificate rotation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadSection {
    /// Reload when a certificate, key, CRL or ticket-key file changes.
    pub watch: bool,
}

impl Default for ReloadSection {
    fn default() -> Self {
        Self { watch: true }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub format: LogFormat,
    /// A `tracing` filter: `info`, `debug`, `mcp_tls_gateway=debug,info`...
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// One `[[listener]]`: where to listen, which certificates, which backend.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub listen: String,
    /// Shorthand for a single certificate (the default one).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// `[[listener.certs]]`: several certificates chosen by SNI.
    #[serde(default)]
    pub certs: Vec<CertConfig>,
    pub backend: BackendConfig,
    /// `[listener.client_auth]`: mutual TLS.
    #[serde(default)]
    pub client_auth: Option<ClientAuthConfig>,
    /// Send a PROXY protocol v2 header (with TLS details) to the backend.
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// One certificate of a listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Server names it answers (`api.example.com`, `*.example.com`).
    #[serde(default)]
    pub sni: Vec<String>,
    /// Served when no SNI name matches.
    #[serde(default)]
    pub default: bool,
}

/// `backend = "HOST:PORT"`, or a table with upstream TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum BackendConfig {
    Addr(String),
    Table(BackendTable),
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig::Addr(String::new())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTable {
    pub addr: String,
    #[serde(default)]
    pub tls: Option<BackendTlsConfig>,
}

/// `backend.tls`: TLS from the gateway to the backend.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsConfig {
    /// PEM bundle the backend's certificate must chain to.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Name checked against the backend's certificate (and sent as SNI).
    pub server_name: String,
    /// Client certificate presented to the backend.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Skip certificate verification. Logged loudly; for tests only.
    #[serde(default)]
    pub insecure: bool,
}

/// `[listener.client_auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    /// PEM bundle of the CAs client certificates must chain to.
    pub ca: PathBuf,
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// Refuse clients without a certificate (otherwise optional).
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

/// Where the plaintext backend is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendAddr::Tcp(a) => write!(f, "{a}"),
            BackendAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A listener after validation.
#[derive(Debug, Clone)]
pub struct Listener {
    /// `listener[i]`, for logs and audit records.
    pub name: String,
    pub listen: SocketAddr,
    /// At least one; exactly one has `default` set.
    pub certs: Vec<CertConfig>,
    pub backend: BackendAddr,
    pub backend_tls: Option<BackendTlsConfig>,
    pub client_auth: Option<ClientAuthConfig>,
    pub proxy_protocol: bool,
}

/// Configuration problems. Messages name the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Values given on the command line; each one, when set, wins over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub backend: Option<String>,
    pub workers: Option<usize>,
    pub max_connections: Option<usize>,
    pub handshake_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub drain_timeout: Option<Duration>,
    pub backend_connect_timeout: Option<Duration>,
    pub tls_versions: Option<Vec<String>>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub ktls: Option<crate::offload::KtlsMode>,
}

impl Config {
    /// Reads and parses a TOML file (no validation yet).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text; the error text names the key and line.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Applies command-line values. `--listen/--cert/--key/--backend` define
    /// one listener and must come together; they replace the file's
    /// listeners.
    pub fn apply(&mut self, o: Overrides) -> Result<(), ConfigError> {
        let listener_flags = [
            o.listen.is_some(),
            o.cert.is_some(),
            o.key.is_some(),
            o.backend.is_some(),
        ];
        if listener_flags.iter().any(|&b| b) {
            match (o.listen, o.cert, o.key, o.backend) {
                (Some(listen), Some(cert), Some(key), Some(backend)) => {
                    self.listeners = vec![ListenerConfig {
                        listen,
                        cert: Some(cert),
                        key: Some(key),
                        backend: BackendConfig::Addr(backend),
                        ..Default::default()
                    }];
                }
                _ => {
                    return Err(invalid(
                        "--listen/--cert/--key/--backend",
                        "these four flags go together: give all of them, or use --config",
                    ))
                }
            }
        }
        if let Some(v) = o.workers {
            self.server.workers = Some(v);
        }
        if let Some(v) = o.max_connections {
            self.server.max_connections_per_worker = v;
        }
        if let Some(v) = o.handshake_timeout {
            self.timeouts.handshake = v;
        }
        if let Some(v) = o.idle_timeout {
            self.timeouts.idle = v;
        }
        if let Some(v) = o.drain_timeout {
            self.timeouts.drain = v;
        }
        if let Some(v) = o.backend_connect_timeout {
            self.timeouts.backend_connect = v;
        }
        if let Some(v) = o.tls_versions {
            self.tls.versions = v;
        }
        if let Some(v) = o.log_format {
            self.log.format = v;
        }
        if let Some(v) = o.log_level {
            self.log.level = v;
        }
        if let Some(v) = o.ktls {
            self.server.ktls = v;
        }
        Ok(())
    }

    /// Checks every value and resolves the listeners.
    pub fn validate(&self) -> Result<Vec<Listener>, ConfigError> {
        if self.listeners.is_empty() {
            return Err(invalid(
                "listener",
                "no listener configured: add a [[listener]] table or use --listen/--cert/--key/--backend",
            ));
        }
        if self.server.workers == Some(0) {
            return Err(invalid("server.workers", "must be at least 1"));
        }
        if self.server.max_connections_per_worker == 0 {
            return Err(invalid(
                "server.max_connections_per_worker",
                "must be at least 1",
            ));
        }
        if !(8..=32_768).contains(&self.server.ring_entries) {
            return Err(invalid(
                "server.ring_entries",
                "must be between 8 and 32768",
            ));
        }
        if self.server.backlog < 1 {
            return Err(invalid("server.backlog", "must be at least 1"));
        }
        for (key, d) in [
            ("timeouts.handshake", self.timeouts.handshake),
            ("timeouts.idle", self.timeouts.idle),
            ("timeouts.backend_connect", self.timeouts.backend_connect),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        crate::tls::check_policy(&self.tls)?;
        if let Some(a) = &self.admin.listen {
            parse_admin_listen(a).map_err(|m| invalid("admin.listen", m))?;
        }
        if self.audit.path.as_deref() == Some("") {
            return Err(invalid(
                "audit.path",
                "must be a file path or \"-\" for stdout",
            ));
        }
        let mut seen = Vec::new();
        let mut out = Vec::with_capacity(self.listeners.len());
        for (i, l) in self.listeners.iter().enumerate() {
            let key = |k: &str| format!("listener[{i}].{k}");
            let listen = resolve_one(&l.listen).map_err(|m| invalid(key("listen"), m))?;
            if seen.contains(&listen) {
                return Err(invalid(
                    key("listen"),
                    format!("{listen} is used by another listener"),
                ));
            }
            seen.push(listen);
            let (addr, backend_tls) = match &l.backend {
                BackendConfig::Addr(a) => (a.as_str(), None),
                BackendConfig::Table(t) => (t.addr.as_str(), t.tls.clone()),
            };
            let backend = parse_backend(addr).map_err(|m| invalid(key("backend"), m))?;
            if let Some(t) = &backend_tls {
                if t.server_name.is_empty() {
                    return Err(invalid(key("backend.tls.server_name"), "must not be empty"));
                }
                if t.ca.is_none() && !t.insecure {
                    return Err(invalid(
                        key("backend.tls.ca"),
                        "a CA bundle is required to verify the backend (or insecure = true, for tests only)",
                    ));
                }
                if t.cert.is_some() != t.key.is_some() {
                    return Err(invalid(key("backend.tls.cert"), "cert and key go together"));
                }
            }
            let mut certs = l.certs.clone();
            match (&l.cert, &l.key) {
                (Some(cert), Some(key)) => certs.insert(
                    0,
                    CertConfig {
                        name: if i == 0 && l.certs.is_empty() {
                            "default".into()
                        } else {
                            format!("listener{i}-default")
                        },
                        cert: cert.clone(),
                        key: key.clone(),
                        sni: Vec::new(),
                        default: !l.certs.iter().any(|c| c.default),
                    },
                ),
                (None, None) => {}
                _ => return Err(invalid(key("cert"), "cert and key go together")),
            }
            if certs.is_empty() {
                return Err(invalid(
                    key("certs"),
                    "no certificate: set cert/key or add [[listener.certs]] tables",
                ));
            }
            if certs.iter().filter(|c| c.default).count() > 1 {
                return Err(invalid(key("certs"), "more than one default certificate"));
            }
            if !certs.iter().any(|c| c.default) {
                certs[0].default = true;
            }
            for (j, c) in certs.iter().enumerate() {
                if c.name.is_empty() {
                    return Err(invalid(
                        key(&format!("certs[{j}].name")),
                        "must not be empty",
                    ));
                }
            }
            for (j, c) in certs.iter().enumerate() {
                if out
                    .iter()
                    .flat_map(|l: &Listener| &l.certs)
                    .chain(&certs[..j])
                    .any(|o| o.name == c.name)
                {
                    return Err(invalid(
                        key(&format!("certs[{j}].name")),
                        format!("\"{}\" is used by another certificate (names are global: the admin API addresses certificates by name)", c.name),
                    ));
                }
            }
            out.push(Listener {
                name: format!("listener[{i}]"),
                listen,
                certs,
                backend,
                backend_tls,
                client_auth: l.client_auth.clone(),
                proxy_protocol: l.proxy_protocol,
            });
        }
        Ok(out)
    }

    /// Worker count: configured, or one per online core.
    pub fn worker_count(&self) -> usize {
        self.server
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

fn resolve_one(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    match s.to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| format!("\"{s}\" resolves to no address")),
        Err(e) => Err(format!("\"{s}\" is not HOST:PORT ({e})")),
    }
}

/// Parses `HOST:PORT` or `unix:/path`.
pub fn parse_backend(s: &str) -> Result<BackendAddr, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("unix: needs a socket path, e.g. unix:/run/mcp.sock".into());
        }
        if path.len() >= 108 {
            return Err(format!(
                "unix socket path is too long ({} bytes, at most 107)",
                path.len()
            ));
        }
        return Ok(BackendAddr::Unix(PathBuf::from(path)));
    }
    resolve_one(s).map(BackendAddr::Tcp)
}

/// Where the admin API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Parses `HOST:PORT` or `unix:/path` for `admin.listen`.
pub fn parse_admin_listen(s: &str) -> Result<AdminAddr, String> {
    match parse_backend(s)? {
        BackendAddr::Tcp(a) => Ok(AdminAddr::Tcp(a)),
        BackendAddr::Unix(p) => Ok(AdminAddr::Unix(p)),
    }
}

/// Parses a human duration such as `10s`, `500ms`, `10m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("\"{s}\" is not a duration like 10s, 500ms or 10m: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
workers = 2
[timeouts]
handshake = "2s"
idle = "10m"
[tls]
versions = ["1.3"]
[[listener]]
listen = "127.0.0.1:8443"
cert = "chain.pem"
key = "key.pem"
backend = "unix:/run/mcp.sock"
"#;

    #[test]
    fn parses_and_validates() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.timeouts.handshake, Duration::from_secs(2));
        assert_eq!(c.timeouts.drain, Duration::from_secs(30), "default kept");
        let l = c.validate().unwrap();
        assert_eq!(l[0].backend, BackendAddr::Unix("/run/mcp.sock".into()));
        assert_eq!(c.worker_count(), 2);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml(&GOOD.replace("\"2s\"", "\"soon\"")).unwrap_err();
        assert!(e.contains("handshake"), "{e}");
        let e = Config::from_toml(&GOOD.replace("workers = 2", "wrokers = 2")).unwrap_err();
        assert!(e.contains("wrokers"), "{e}");
        let c = Config::from_toml(&GOOD.replace("unix:/run/mcp.sock", "nowhere")).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("listener[0].backend:"), "{e}");
        let c = Config::from_toml(&GOOD.replace("[\"1.3\"]", "[\"1.1\"]")).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("tls.versions:"), "{e}");
    }

    #[test]
    fn flags_define_a_listener_and_win() {
        let mut c = Config::from_toml(GOOD).unwrap();
        c.apply(Overrides {
            listen: Some("127.0.0.1:9443".into()),
            cert: Some("a.pem".into()),
            key: Some("b.pem".into()),
            backend: Some("127.0.0.1:9100".into()),
            handshake_timeout: Some(Duration::from_secs(1)),
            ..Default::default()
        })
        .unwrap();
        let l = c.validate().unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].listen, "127.0.0.1:9443".parse().unwrap());
        assert_eq!(c.timeouts.handshake, Duration::from_secs(1));
        let mut c = Config::default();
        let e = c
            .apply(Overrides {
                listen: Some("127.0.0.1:1".into()),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("--listen"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("soon").is_err());
    }
}
