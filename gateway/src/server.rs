//! Start-up and shutdown: binds every listener once per worker
//! (`SO_REUSEPORT`), starts the pinned workers, and turns signals into a
//! drain.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use socket2::{Domain, Socket, Type};
use tracing::{error, info, warn};

use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
use std::sync::mpsc::Sender;
use std::time::Duration;

use crate::audit::{AuditLog, AuditRecord, AuditWriter};
use crate::config::{Config, Listener};
use crate::metrics::{self, Snapshot, WorkerMetrics};
use crate::offload::{KtlsMode, KtlsSupport};
use crate::reload::{ListenerTls, TlsState};
use crate::session::SessionConfig;
use crate::worker::{
    self, BackendTarget, Control, ListenerInfo, WorkerListener, WorkerParams, WorkerRequest,
};

/// Start-up failures, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("backend {backend}: {source}")]
    Backend {
        backend: String,
        source: std::io::Error,
    },
    #[error("io_uring is not available: {0} (Linux 5.19 or newer is required; check the kernel.io_uring_disabled sysctl and seccomp filters)")]
    Uring(std::io::Error),
    #[error("this kernel's io_uring lacks {0}; Linux 5.19 or newer is required")]
    UringOpcodes(String),
    #[error("cannot start worker thread: {0}")]
    Thread(std::io::Error),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("ktls = \"require\" but kernel TLS is not usable on this host: {0}")]
    KtlsRequired(String),
    #[error(transparent)]
    Tls(#[from] crate::reload::ReloadError),
    #[error("{listener}.backend.tls: {error}")]
    Upstream {
        listener: String,
        error: crate::upstream::UpstreamError,
    },
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("admin API: {0}")]
    Admin(#[from] crate::admin::AdminError),
    #[error("admin.token_file {path}: {message}")]
    AdminToken { path: String, message: String },
}

/// State shared by the workers' control side, the admin API and reloads.
pub struct Shared {
    control: Arc<Control>,
    wakers: Vec<OwnedFd>,
    requests: Vec<Sender<WorkerRequest>>,
    metrics: Vec<Arc<WorkerMetrics>>,
    pub tls: TlsState,
    /// Behind a mutex only so shutdown can drop it; never touched by workers.
    audit: Mutex<Option<AuditLog>>,
    workers_alive: AtomicUsize,
    worker_failures: AtomicUsize,
    /// Successful and failed reloads (all triggers).
    pub reloads: std::sync::atomic::AtomicU64,
    pub reload_failures: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn wake_all(&self) {
        for w in &self.wakers {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
            unsafe { libc::write(w.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
        }
    }

    /// Counters summed over workers (plus the handshakes the enforce-mode
    /// policy refused while choosing a certificate).
    pub fn snapshot(&self) -> Snapshot {
        let mut s = metrics::snapshot(self.metrics.iter().map(|m| &**m));
        if let Some(g) = &self.tls.policy_gate {
            s.policy_deviations += g.refusals();
        }
        s
    }

    /// Every open session, asked of each worker (answered between
    /// completions; waits at most `timeout`).
    pub fn sessions(&self, timeout: Duration) -> Vec<AuditRecord> {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut asked = 0;
        for r in &self.requests {
            if r.send(WorkerRequest::Sessions(tx.clone())).is_ok() {
                asked += 1;
            }
        }
        drop(tx);
        self.wake_all();
        let deadline = std::time::Instant::now() + timeout;
        let mut out = Vec::new();
        for _ in 0..asked {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(list) => out.extend(list),
                Err(_) => break,
            }
        }
        out.sort_by(|a, b| a.start.cmp(&b.start));
        out
    }

    /// Reloads certificates, CRLs and ticket keys; logs the outcome.
    pub fn reload(
        &self,
        trigger: &str,
    ) -> Result<crate::reload::ReloadSummary, crate::reload::ReloadError> {
        match self.tls.reload() {
            Ok(s) => {
                info!(
                    trigger,
                    listeners = s.listeners,
                    certificates = s.certificates,
                    ticket_keys = s.ticket_keys,
                    "reloaded TLS material"
                );
                WorkerMetrics::inc(&self.reloads);
                Ok(s)
            }
            Err(e) => {
                error!(trigger, error = %e, "reload failed; the previous certificates keep serving");
                WorkerMetrics::inc(&self.reload_failures);
                Err(e)
            }
        }
    }

    /// Liveness: no worker has failed, and every worker is running (or,
    /// while draining, has finished its drain normally).
    pub fn workers_running(&self) -> bool {
        self.worker_failures.load(Ordering::Relaxed) == 0
            && (self.control.draining.load(Ordering::Relaxed)
                || self.workers_alive.load(Ordering::Relaxed) == self.metrics.len())
    }

    /// Whether listeners accept new connections.
    pub fn ready(&self) -> bool {
        !self.control.draining.load(Ordering::Relaxed)
            && self.workers_alive.load(Ordering::Relaxed) == self.metrics.len()
    }

    /// Prometheus exposition text.
    pub fn metrics_text(&self) -> String {
        crate::exporter::render(self)
    }

    pub fn audit_stats(&self) -> Option<crate::audit::AuditStats> {
        lock(&self.audit).as_ref().map(|a| a.stats())
    }

    /// Reopens the audit file (logrotate).
    pub fn reopen_audit(&self) {
        if let Some(a) = lock(&self.audit).as_ref() {
            a.reopen();
            info!("audit log reopen requested");
        }
    }
}

/// A running gateway: its workers, their counters and the drain switch.
pub struct Gateway {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<std::io::Result<()>>>,
    /// The bound addresses (useful when the config asked for port 0).
    pub local_addrs: Vec<SocketAddr>,
    admin: Option<crate::admin::AdminHandle>,
    audit_writer: Option<AuditWriter>,
    maintenance: Option<crate::maintenance::Maintenance>,
}

impl Gateway {
    /// Validates the configuration, loads certificates, binds every listener
    /// and starts the workers. Returns once everything is listening.
    pub fn start(cfg: &Config) -> Result<Gateway, StartError> {
        let listeners = cfg.validate()?;
        match crate::uring::missing_opcodes() {
            Ok(missing) if missing.is_empty() => {}
            Ok(missing) => return Err(StartError::UringOpcodes(missing.join(", "))),
            Err(e) => return Err(StartError::Uring(e)),
        }
        let workers = cfg.worker_count();
        let nofile = raise_nofile_limit();
        let wanted = (workers as u64)
            .saturating_mul(cfg.server.max_connections_per_worker as u64)
            .saturating_mul(2);
        if nofile < wanted {
            warn!(
                open_files_limit = nofile,
                connections = nofile.saturating_sub(64) / 2,
                "RLIMIT_NOFILE caps open connections below workers × max_connections_per_worker (each connection uses two descriptors: client and backend); beyond it accepts fail with EMFILE (logged, counted). Raise LimitNOFILE= / ulimit -n"
            );
        }
        let ktls = resolve_ktls(cfg.server.ktls)?;
        let tls_state = TlsState::load(&cfg.tls, &listeners, ktls.is_some())?;
        let mut prepared = Vec::new();
        for (l, lt) in listeners.iter().zip(&tls_state.listeners) {
            prepared.push(prepare_listener(cfg, l, lt, ktls.clone())?);
        }
        let (audit_log, audit_writer) = match cfg.audit.path.as_deref() {
            None => (None, None),
            Some(p) => {
                let dest = if p == "-" {
                    crate::audit::AuditDest::Stdout
                } else {
                    crate::audit::AuditDest::File(p.into())
                };
                let (log, writer) = crate::audit::AuditLog::open(dest)?;
                info!(path = p, "audit records on (one JSON line per session)");
                (Some(log), Some(writer))
            }
        };
        let admin_token = match &cfg.admin.token_file {
            None => None,
            Some(path) => {
                let t = std::fs::read_to_string(path).map_err(|e| StartError::AdminToken {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                let t = t.trim().to_string();
                if t.len() < 16 {
                    return Err(StartError::AdminToken {
                        path: path.display().to_string(),
                        message: "token must be at least 16 characters".into(),
                    });
                }
                Some(t)
            }
        };
        // Bind one socket per worker per listener. With port 0 the first
        // bind picks the port and the others reuse it.
        let mut local_addrs = Vec::new();
        let mut sockets: Vec<Vec<OwnedFd>> = (0..workers).map(|_| Vec::new()).collect();
        for (l, _) in listeners.iter().zip(&prepared) {
            let mut addr = l.listen;
            for per_worker in sockets.iter_mut() {
                let sock = bind_reuseport(addr, cfg.server.backlog)
                    .map_err(|source| StartError::Listen { addr, source })?;
                if addr.port() == 0 {
                    if let Some(a) = sock.local_addr().ok().and_then(|a| a.as_socket()) {
                        addr = a;
                    }
                }
                per_worker.push(sock.into());
            }
            local_addrs.push(addr);
        }
        let control = Arc::new(Control::default());
        let cores = if cfg.server.pin_workers {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut wakers = Vec::new();
        let mut params_all = Vec::new();
        let mut metrics = Vec::new();
        let mut requests = Vec::new();
        for (id, socks) in sockets.into_iter().enumerate() {
            let wm = Arc::new(WorkerMetrics::default());
            metrics.push(wm.clone());
            let wake = eventfd().map_err(StartError::EventFd)?;
            let wake_dup = wake.try_clone().map_err(StartError::EventFd)?;
            wakers.push(wake);
            let (req_tx, req_rx) = std::sync::mpsc::channel();
            requests.push(req_tx);
            let params = WorkerParams {
                id,
                listeners: socks
                    .into_iter()
                    .zip(&prepared)
                    .map(|(socket, (session, backend, info))| WorkerListener {
                        socket,
                        session: session.clone(),
                        backend: backend.clone(),
                        info: info.clone(),
                    })
                    .collect(),
                max_connections: cfg.server.max_connections_per_worker,
                ring_entries: cfg.server.ring_entries,
                drain_timeout: cfg.timeouts.drain,
                metrics: wm,
                control: control.clone(),
                wake: wake_dup,
                requests: req_rx,
                audit: audit_log.as_ref().map(|a| a.worker_sink()),
            };
            params_all.push(params);
        }
        let shared = Arc::new(Shared {
            control: control.clone(),
            wakers,
            requests,
            metrics,
            tls: tls_state,
            audit: Mutex::new(audit_log),
            workers_alive: AtomicUsize::new(0),
            worker_failures: AtomicUsize::new(0),
            reloads: Default::default(),
            reload_failures: Default::default(),
        });
        let mut handles = Vec::new();
        for params in params_all {
            let id = params.id;
            let shared_w = shared.clone();
            let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
            let handle = std::thread::Builder::new()
                .name(format!("worker-{id}"))
                .spawn(move || {
                    if let Some(core) = core {
                        if !core_affinity::set_for_current(core) {
                            warn!(worker = id, "could not pin worker to core {}", core.id);
                        }
                    }
                    shared_w.workers_alive.fetch_add(1, Ordering::SeqCst);
                    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        worker::run(params)
                    }))
                    .unwrap_or_else(|_| Err(std::io::Error::other("worker panicked")));
                    shared_w.workers_alive.fetch_sub(1, Ordering::SeqCst);
                    if let Err(e) = &res {
                        shared_w.worker_failures.fetch_add(1, Ordering::SeqCst);
                        error!(worker = id, error = %e, "worker failed");
                    }
                    res
                })
                .map_err(StartError::Thread)?;
            handles.push(handle);
        }
        for (l, addr) in listeners.iter().zip(&local_addrs) {
            info!(
                listen = %addr,
                backend = %l.backend,
                certs = l.certs.len(),
                workers,
                ktls = if ktls.is_some() { "offload" } else { "off: records in user space" },
                "listening"
            );
        }
        let admin = match &cfg.admin.listen {
            None => None,
            Some(a) => {
                let listen = match crate::config::parse_admin_listen(a).map_err(|m| {
                    crate::config::ConfigError::Invalid {
                        key: "admin.listen".into(),
                        message: m,
                    }
                })? {
                    crate::config::AdminAddr::Tcp(a) => crate::admin::AdminListen::Tcp(a),
                    crate::config::AdminAddr::Unix(p) => crate::admin::AdminListen::Unix(p),
                };
                let handle = crate::admin::spawn(
                    crate::admin::AdminConfig {
                        listen,
                        token: admin_token,
                    },
                    Arc::new(crate::maintenance::AdminState(shared.clone())),
                )?;
                info!(listen = %a, addr = ?handle.local_addr(), "admin API listening");
                Some(handle)
            }
        };
        let maintenance = Some(crate::maintenance::Maintenance::start(
            shared.clone(),
            cfg.reload.watch,
        ));
        Ok(Gateway {
            shared,
            workers: handles,
            local_addrs,
            admin,
            audit_writer,
            maintenance,
        })
    }

    /// The state shared with the admin API and reloads.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The admin API's TCP address, when it listens on TCP.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr())
    }

    /// Reloads certificates, CRLs and ticket keys (SIGHUP).
    pub fn reload(&self) -> Result<crate::reload::ReloadSummary, crate::reload::ReloadError> {
        self.shared.reload("SIGHUP")
    }

    /// Reopens the audit log (SIGUSR1).
    pub fn reopen_audit(&self) {
        self.shared.reopen_audit();
    }

    /// Stops accepting and lets connections finish within the drain period.
    pub fn begin_drain(&self) {
        self.shared.control.draining.store(true, Ordering::SeqCst);
        self.shared.wake_all();
    }

    /// Closes every connection now.
    pub fn force_close(&self) {
        self.shared.control.draining.store(true, Ordering::SeqCst);
        self.shared.control.force.store(true, Ordering::SeqCst);
        self.shared.wake_all();
    }

    /// The counters summed over workers.
    pub fn metrics(&self) -> Snapshot {
        self.shared.snapshot()
    }

    /// Whether every worker has exited.
    pub fn finished(&self) -> bool {
        self.workers.iter().all(|h| h.is_finished())
    }

    /// Waits for every worker, then flushes the audit log and stops the
    /// admin API. Returns the first worker error.
    pub fn join(mut self) -> std::io::Result<Snapshot> {
        let mut first_err = None;
        for h in std::mem::take(&mut self.workers) {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(std::io::Error::other("worker panicked"));
                }
            }
        }
        let snap = self.shared.snapshot();
        if let Some(m) = self.maintenance.take() {
            m.stop();
        }
        if let Some(a) = self.admin.take() {
            a.shutdown();
        }
        if let Some(w) = self.audit_writer.take() {
            // Workers are gone (their sinks flushed on drop); the shared
            // log handle must go too before the writer can finish.
            drop(lock(&self.shared.audit).take());
            match w.finish() {
                Ok(s) => info!(records = s.records_written, "audit log flushed"),
                Err(e) => error!(error = %e, "audit log: final flush failed"),
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(snap),
        }
    }
}

/// Decides once, at start, whether connections move to kernel TLS.
fn resolve_ktls(mode: KtlsMode) -> Result<Option<Arc<KtlsSupport>>, StartError> {
    match mode {
        KtlsMode::Off => {
            info!("kernel TLS offload off (ktls = \"off\"): TLS records are relayed in user space");
            Ok(None)
        }
        KtlsMode::Auto => match crate::offload::detect() {
            Ok(s) => {
                info!(ciphers = %s.describe(), "kernel TLS offload on: records encrypted by the kernel, bytes moved with splice");
                Ok(Some(Arc::new(s)))
            }
            Err(why) => {
                warn!(reason = %why, "kernel TLS unavailable: falling back to user-space TLS records for every connection (counted as userspace_path)");
                Ok(None)
            }
        },
        KtlsMode::Require => match crate::offload::detect() {
            Ok(s) => {
                info!(ciphers = %s.describe(), "kernel TLS offload on (required)");
                Ok(Some(Arc::new(s)))
            }
            Err(why) => Err(StartError::KtlsRequired(why)),
        },
    }
}

type Prepared = (SessionConfig, Arc<BackendTarget>, Arc<ListenerInfo>);

/// The TLS client settings for a listener's backend, when it speaks TLS
/// (also run by `check-config`).
pub fn upstream_tls(
    policy: &crate::config::TlsPolicy,
    l: &Listener,
) -> Result<Option<crate::session::UpstreamTls>, StartError> {
    let Some(t) = &l.backend_tls else {
        return Ok(None);
    };
    let settings = crate::upstream::UpstreamTlsSettings {
        ca: t.ca.clone(),
        server_name: t.server_name.clone(),
        cert: t.cert.clone(),
        key: t.key.clone(),
        insecure: t.insecure,
        ..Default::default()
    };
    let err = |error| StartError::Upstream {
        listener: l.name.clone(),
        error,
    };
    let versions = crate::tls::policy_versions(policy)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = crate::upstream::client_config(&settings, &versions, provider).map_err(err)?;
    let server_name = crate::upstream::server_name(&settings).map_err(err)?;
    Ok(Some(crate::session::UpstreamTls {
        config,
        server_name,
    }))
}

fn prepare_listener(
    cfg: &Config,
    l: &Listener,
    lt: &ListenerTls,
    ktls: Option<Arc<KtlsSupport>>,
) -> Result<Prepared, StartError> {
    let tls = lt.current.load_full();
    let upstream = upstream_tls(&cfg.tls, l)?;
    let backend = BackendTarget::new(&l.backend).map_err(|source| StartError::Backend {
        backend: l.backend.to_string(),
        source,
    })?;
    let session = SessionConfig {
        tls,
        public_addr: l.listen.to_string().into(),
        handshake_timeout: cfg.timeouts.handshake,
        idle_timeout: cfg.timeouts.idle,
        backend_connect_timeout: cfg.timeouts.backend_connect,
        ktls,
        upstream,
        expected_suites: crate::tls::expected_suites(&cfg.tls)?,
    };
    let info = Arc::new(ListenerInfo {
        name: l.name.clone(),
        proxy_protocol: l.proxy_protocol,
        policy_enforce: cfg.tls.policy == crate::config::PolicyMode::Enforce
            && !cfg.tls.expected_cipher_suites.is_empty(),
        tls: lt.current.clone(),
    });
    Ok((session, Arc::new(backend), info))
}

fn bind_reuseport(addr: SocketAddr, backlog: i32) -> std::io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    Ok(sock)
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned descriptor is new and owned here.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Every connection holds two descriptors: raise the soft `RLIMIT_NOFILE` to
/// the hard limit, as servers do, so the default soft limit of 1024 does
/// not cap the gateway at ~500 connections.
/// Returns the soft limit in effect afterwards.
fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return u64::MAX;
        }
        if lim.rlim_cur >= lim.rlim_max {
            return lim.rlim_cur;
        }
        let old = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            tracing::debug!(from = old, to = lim.rlim_max, "raised RLIMIT_NOFILE");
            return lim.rlim_max;
        }
        old
    }
}
