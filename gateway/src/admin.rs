//! The admin HTTP API (metrics, sessions, certificates, health) served by
//! hyper on one dedicated OS thread named "admin" with a current-thread
//! tokio runtime, so nothing an admin client does can slow the workers.
//!
//! Routes: `GET /metrics`, `GET /sessions`, `GET /certs`,
//! `PUT /certs/{name}`, `GET /healthz`, `GET /readyz`, `GET /` (HTML).
//!
//! Access control:
//! - Unix socket: created with mode 0600; the file permissions are the
//!   control (a configured token is still required).
//! - TCP: a non-loopback address needs a token ([`spawn`] refuses
//!   otherwise). A configured token is required as `Authorization: Bearer`
//!   on every route except `/healthz` and `/readyz`; without a token, only
//!   loopback peers are served (403 for others).

mod auth;
mod page;
mod routes;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use routes::State;

/// At most this many admin connections are served at once; more wait in
/// the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// A client must send a request's headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open requests may run on after [`AdminHandle::shutdown`].
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Threads for slow backend calls (`sessions`, `put_cert`).
const BLOCKING_THREADS: usize = 4;

/// What the admin API reads from and acts on. Implemented by the server.
pub trait AdminBackend: Send + Sync + 'static {
    /// The Prometheus text exposition (version 0.0.4). Called on the admin
    /// thread: must be quick, like `certs`, `healthy` and `ready`.
    fn metrics_text(&self) -> String;
    /// A JSON array of the active sessions. May block for up to ~200 ms
    /// (it is called on a blocking thread).
    fn sessions(&self) -> serde_json::Value;
    /// A JSON array describing the loaded certificates.
    fn certs(&self) -> serde_json::Value;
    /// Replaces the certificate `name` with `pem` (chain + key). Called on
    /// a blocking thread. Returns a JSON description of the new certificate.
    fn put_cert(&self, name: &str, pem: &[u8]) -> Result<serde_json::Value, PutCertError>;
    /// The process is alive and its workers are running.
    fn healthy(&self) -> bool;
    /// The listeners are accepting (false while draining).
    fn ready(&self) -> bool;
}

/// Why a certificate upload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PutCertError {
    /// No certificate of that name is configured (404).
    #[error("no certificate named \"{0}\" is configured")]
    UnknownName(String),
    /// The PEM is unusable: unparsable, key mismatch, expired... (422).
    #[error("invalid certificate: {0}")]
    Invalid(String),
}

/// Where the admin API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminListen {
    /// A TCP address (port 0 picks a free port, see [`AdminHandle::local_addr`]).
    Tcp(SocketAddr),
    /// A Unix socket path; a stale socket there is replaced.
    Unix(PathBuf),
}

/// The admin API settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// The listen address.
    pub listen: AdminListen,
    /// The bearer token required on protected routes, if any.
    pub token: Option<String>,
}

/// Why the admin API could not start. Messages name the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "admin.listen {addr} is not a loopback address: set admin.token to expose the admin API"
    )]
    TokenRequired { addr: SocketAddr },
    #[error("admin.token must not be empty")]
    EmptyToken,
    #[error("admin.listen {addr}: cannot listen: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "admin.listen {path}: a file that is not a socket is in the way; refusing to remove it"
    )]
    NotASocket { path: PathBuf },
    #[error("admin.listen {path}: another process is serving on this socket")]
    InUse { path: PathBuf },
    #[error("admin API: cannot start its runtime or thread: {0}")]
    Start(std::io::Error),
}

/// The running admin API. Dropping it shuts it down too.
#[derive(Debug)]
pub struct AdminHandle {
    thread: Option<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
    local_addr: Option<SocketAddr>,
    /// The socket file and its (device, inode), removed at shutdown if
    /// still ours.
    unix: Option<(PathBuf, u64, u64)>,
}

impl AdminHandle {
    /// The bound TCP address (`None` for a Unix socket).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Stops accepting, lets open requests finish for a short grace period,
    /// joins the admin thread and removes the Unix socket file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("admin thread panicked");
            }
        }
        if let Some((path, dev, ino)) = self.unix.take() {
            let ours = std::fs::symlink_metadata(&path)
                .is_ok_and(|m| m.file_type().is_socket() && m.dev() == dev && m.ino() == ino);
            if ours {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove admin socket");
                }
            }
        }
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A bound listener, registered with the admin runtime.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Binds the listener and starts the admin thread.
pub fn spawn(cfg: AdminConfig, backend: Arc<dyn AdminBackend>) -> Result<AdminHandle, AdminError> {
    if cfg.token.as_deref().is_some_and(str::is_empty) {
        return Err(AdminError::EmptyToken);
    }
    if let AdminListen::Tcp(addr) = &cfg.listen {
        if cfg.token.is_none() && !auth::is_loopback(addr.ip()) {
            return Err(AdminError::TokenRequired { addr: *addr });
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_name("admin-blocking")
        .build()
        .map_err(AdminError::Start)?;

    let (listener, local_addr, unix) = {
        let _enter = rt.enter();
        match &cfg.listen {
            AdminListen::Tcp(addr) => {
                let bind_err = |source| AdminError::Bind {
                    addr: addr.to_string(),
                    source,
                };
                let std = std::net::TcpListener::bind(addr).map_err(bind_err)?;
                std.set_nonblocking(true).map_err(bind_err)?;
                let local = std.local_addr().map_err(bind_err)?;
                let l = tokio::net::TcpListener::from_std(std).map_err(bind_err)?;
                (Listener::Tcp(l), Some(local), None)
            }
            AdminListen::Unix(path) => {
                let (std, dev, ino) = bind_unix(path)?;
                let l =
                    tokio::net::UnixListener::from_std(std).map_err(|source| AdminError::Bind {
                        addr: path.display().to_string(),
                        source,
                    })?;
                (Listener::Unix(l), None, Some((path.clone(), dev, ino)))
            }
        }
    };

    let (tx, rx) = watch::channel(false);
    let state = Arc::new(State {
        backend,
        token: cfg.token,
    });
    let thread = std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            rt.block_on(serve(listener, state, rx));
            rt.shutdown_timeout(SHUTDOWN_GRACE);
        })
        .map_err(AdminError::Start)?;
    match (&local_addr, &unix) {
        (Some(a), _) => tracing::info!(addr = %a, "admin API listening"),
        (_, Some((p, _, _))) => tracing::info!(path = %p.display(), "admin API listening"),
        _ => {}
    }
    Ok(AdminHandle {
        thread: Some(thread),
        shutdown: tx,
        local_addr,
        unix,
    })
}

/// Creates the Unix socket with mode 0600 before it listens (no window in
/// which others could connect), replacing a stale socket file.
fn bind_unix(path: &Path) -> Result<(std::os::unix::net::UnixListener, u64, u64), AdminError> {
    let bind_err = |source| AdminError::Bind {
        addr: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(AdminError::InUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        Ok(_) => {
            return Err(AdminError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
        .map_err(bind_err)?;
    let addr = socket2::SockAddr::unix(path).map_err(bind_err)?;
    sock.bind(&addr).map_err(bind_err)?;
    let listen = || -> std::io::Result<(u64, u64)> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let m = std::fs::symlink_metadata(path)?;
        sock.listen(128)?;
        sock.set_nonblocking(true)?;
        Ok((m.dev(), m.ino()))
    };
    match listen() {
        Ok((dev, ino)) => Ok((sock.into(), dev, ino)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(bind_err(e))
        }
    }
}

/// The accept loop: one task per connection, at most [`MAX_CONNECTIONS`].
async fn serve(listener: Listener, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            a = accept(&listener) => a,
        };
        match accepted {
            Ok(Accepted::Tcp(io, peer)) => {
                let (state, rx) = (Arc::clone(&state), shutdown.clone());
                conns.spawn(async move {
                    connection(io, Some(peer.ip()), state, rx).await;
                    drop(permit);
                });
            }
            Ok(Accepted::Unix(io)) => {
                let (state, rx) = (Arc::clone(&state), shutdown.clone());
                conns.spawn(async move {
                    connection(io, None, state, rx).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("admin connections still open at shutdown; closing them");
    }
    conns.abort_all();
}

enum Accepted {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> std::io::Result<Accepted> {
    match l {
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

/// Serves HTTP/1.1 on one connection until it closes or shutdown.
async fn connection<IO>(
    io: IO,
    peer: Option<IpAddr>,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(routes::handle(req, peer, &state).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = result {
        if e.is_incomplete_message() || e.is_canceled() {
            tracing::debug!(?peer, error = %e, "admin connection ended early");
        } else {
            tracing::warn!(?peer, error = %e, "admin connection error");
        }
    }
}

#[cfg(test)]
mod tests;
