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

use crate::config::{Config, Listener};
use crate::metrics::{self, Snapshot, WorkerMetrics};
use crate::offload::{KtlsMode, KtlsSupport};
use crate::session::SessionConfig;
use crate::worker::{self, BackendTarget, Control, WorkerListener, WorkerParams};

/// Start-up failures, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Cert(#[from] crate::tls::CertError),
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
}

/// A running gateway: its workers, their counters and the drain switch.
pub struct Gateway {
    control: Arc<Control>,
    wakers: Vec<OwnedFd>,
    workers: Vec<JoinHandle<std::io::Result<()>>>,
    metrics: Vec<Arc<WorkerMetrics>>,
    /// The bound addresses (useful when the config asked for port 0).
    pub local_addrs: Vec<SocketAddr>,
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
        raise_nofile_limit();
        let ktls = resolve_ktls(cfg.server.ktls)?;
        let mut prepared = Vec::new();
        for l in &listeners {
            prepared.push(prepare_listener(cfg, l, ktls.clone())?);
        }
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
        let mut handles = Vec::new();
        let mut metrics = Vec::new();
        for (id, socks) in sockets.into_iter().enumerate() {
            let wm = Arc::new(WorkerMetrics::default());
            metrics.push(wm.clone());
            let wake = eventfd().map_err(StartError::EventFd)?;
            let wake_dup = wake.try_clone().map_err(StartError::EventFd)?;
            wakers.push(wake);
            let params = WorkerParams {
                id,
                listeners: socks
                    .into_iter()
                    .zip(&prepared)
                    .map(|(socket, (session, backend))| WorkerListener {
                        socket,
                        session: session.clone(),
                        backend: backend.clone(),
                    })
                    .collect(),
                max_connections: cfg.server.max_connections_per_worker,
                ring_entries: cfg.server.ring_entries,
                drain_timeout: cfg.timeouts.drain,
                metrics: wm,
                control: control.clone(),
                wake: wake_dup,
            };
            let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
            let handle = std::thread::Builder::new()
                .name(format!("worker-{id}"))
                .spawn(move || {
                    if let Some(core) = core {
                        if !core_affinity::set_for_current(core) {
                            warn!(worker = id, "could not pin worker to core {}", core.id);
                        }
                    }
                    let res = worker::run(params);
                    if let Err(e) = &res {
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
                cert = %l.cert.display(),
                workers,
                ktls = if ktls.is_some() { "offload" } else { "off: records in user space" },
                "listening"
            );
        }
        Ok(Gateway {
            control,
            wakers,
            workers: handles,
            metrics,
            local_addrs,
        })
    }

    /// Stops accepting and lets connections finish within the drain period.
    pub fn begin_drain(&self) {
        self.control.draining.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    /// Closes every connection now.
    pub fn force_close(&self) {
        self.control.draining.store(true, Ordering::SeqCst);
        self.control.force.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    fn wake_all(&self) {
        for w in &self.wakers {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
            unsafe { libc::write(w.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
        }
    }

    /// The counters summed over workers.
    pub fn metrics(&self) -> Snapshot {
        metrics::snapshot(self.metrics.iter().map(|m| &**m))
    }

    /// Whether every worker has exited.
    pub fn finished(&self) -> bool {
        self.workers.iter().all(|h| h.is_finished())
    }

    /// Waits for every worker. Returns the first worker error.
    pub fn join(self) -> std::io::Result<Snapshot> {
        let mut first_err = None;
        for h in self.workers {
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
        let snap = metrics::snapshot(self.metrics.iter().map(|m| &**m));
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

fn prepare_listener(
    cfg: &Config,
    l: &Listener,
    ktls: Option<Arc<KtlsSupport>>,
) -> Result<(SessionConfig, Arc<BackendTarget>), StartError> {
    let tls = crate::tls::server_config(&cfg.tls, &l.cert, &l.key, ktls.is_some())?;
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
    };
    Ok((session, Arc::new(backend)))
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
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= lim.rlim_max {
            return;
        }
        let old = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            tracing::debug!(from = old, to = lim.rlim_max, "raised RLIMIT_NOFILE");
        }
    }
}
