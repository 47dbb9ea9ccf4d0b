//! One data-plane worker: a pinned thread with its own io_uring, its own
//! `SO_REUSEPORT` listener sockets, and a slab of connections.
//!
//! The loop only moves bytes and completions: all protocol decisions are in
//! [`Session`]. For each completion it tells the session the result, then
//! submits whatever operations the session asks for next.
//!
//! Completion `user_data` layout: bits 0..8 are a tag ([`OpKind`] for
//! connection operations, or one of the `TAG_*` constants), bits 8..64 the
//! slab key (or the listener index for accepts). A slab entry is removed
//! only when its session has no operation in flight, so a completion never
//! reaches a reused key.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;
use socket2::{Domain, SockAddr, Socket, Type};
use tracing::{debug, error, info, warn};

use crate::audit::AuditRecord;
use crate::config::BackendAddr;
use crate::metrics::WorkerMetrics;
use crate::session::{
    CloseReason, ControlEvent, Dir, Io, OpKind, Session, SessionConfig, PIPE_CAP,
};
use crate::uring::{new_ring, RingFlavor};
use ktls_setup::KtlsConn;
use rustls::server::ServerConnectionData;

// Tags below 0x80 are `OpKind`s.
const TAG_ACCEPT: u64 = 0x80;
const TAG_TICK: u64 = 0x81;
const TAG_WAKE: u64 = 0x82;
const TAG_CANCEL: u64 = 0x83;
/// Pipes kept for reuse per worker; more are closed when released.
const PIPE_POOL_MAX: usize = 1024;

/// Timer resolution for handshake, idle and drain deadlines.
const TICK: Duration = Duration::from_millis(100);

fn ud(key: usize, tag: u64) -> u64 {
    ((key as u64) << 8) | tag
}

/// Shared between the control thread and the workers.
#[derive(Debug, Default)]
pub struct Control {
    /// Stop accepting and let connections finish (SIGTERM).
    pub draining: AtomicBool,
    /// Close everything now (second signal, or drain period over).
    pub force: AtomicBool,
}

/// A resolved backend: the address to connect to and its socket domain.
#[derive(Debug)]
pub struct BackendTarget {
    addr: SockAddr,
    domain: Domain,
    is_tcp: bool,
    pub display: String,
}

impl BackendTarget {
    pub fn new(b: &BackendAddr) -> std::io::Result<Self> {
        Ok(match b {
            BackendAddr::Tcp(a) => Self {
                addr: SockAddr::from(*a),
                domain: Domain::for_address(*a),
                is_tcp: true,
                display: b.to_string(),
            },
            BackendAddr::Unix(p) => Self {
                addr: SockAddr::unix(p)?,
                domain: Domain::UNIX,
                is_tcp: false,
                display: b.to_string(),
            },
        })
    }
}

/// One listener as a worker sees it.
pub struct WorkerListener {
    /// This worker's own `SO_REUSEPORT` socket (already listening).
    pub socket: OwnedFd,
    pub session: SessionConfig,
    pub backend: Arc<BackendTarget>,
    pub info: Arc<ListenerInfo>,
}

/// What a worker needs to know about a listener beyond its session
/// settings.
#[derive(Debug)]
pub struct ListenerInfo {
    /// `listener[i]`, for logs, audit records and the admin API.
    pub name: String,
    /// Send a PROXY v2 header to the backend.
    pub proxy_protocol: bool,
    /// `tls.policy = "enforce"` with expected suites: handshakes that
    /// offered none of them count as policy deviations.
    pub policy_enforce: bool,
    /// TLS settings, swapped atomically on reload; read once per accept.
    pub tls: Arc<arc_swap::ArcSwap<rustls::ServerConfig>>,
}

/// Requests from the control side; answered on the worker's own time.
pub enum WorkerRequest {
    /// Describe every open session (same fields as the audit record).
    Sessions(std::sync::mpsc::Sender<Vec<crate::audit::AuditRecord>>),
}

/// Everything a worker thread needs.
pub struct WorkerParams {
    pub id: usize,
    pub listeners: Vec<WorkerListener>,
    pub max_connections: usize,
    pub ring_entries: u32,
    pub drain_timeout: Duration,
    pub metrics: Arc<WorkerMetrics>,
    pub control: Arc<Control>,
    /// eventfd the control thread writes to wake this worker.
    pub wake: OwnedFd,
    /// Requests (admin API), with `wake` written after each.
    pub requests: std::sync::mpsc::Receiver<WorkerRequest>,
    /// This worker's audit record buffer, when auditing is on.
    pub audit: Option<crate::audit::AuditSink>,
}

struct ListenerState {
    socket: Option<OwnedFd>,
    session: SessionConfig,
    backend: Arc<BackendTarget>,
    info: Arc<ListenerInfo>,
    /// A multishot accept is armed.
    accepting: bool,
    /// Re-arm at the next tick (after an accept error).
    rearm: bool,
}

struct Conn {
    session: Session,
    client: OwnedFd,
    backend: Option<OwnedFd>,
    listener: usize,
    cancel_sent: bool,
    handshake_counted: bool,
    accepted_at: Instant,
    /// Wall-clock time of the accept, for audit records.
    started: std::time::SystemTime,
    peer: Option<std::net::SocketAddr>,
    /// Our address on the client connection (only with PROXY headers).
    local: Option<std::net::SocketAddr>,
    /// The verified client certificate's subject, with mutual TLS.
    identity: Option<String>,
    /// Kernel TLS state once the record layer moved into the kernel.
    ktls: Option<KtlsConn<ServerConnectionData>>,
    /// The backend leg's kernel TLS state (double TLS offload).
    backend_ktls: Option<KtlsConn<rustls::client::ClientConnectionData>>,
    /// Pipes held while bytes are in flight: [up, down].
    pipes: [Option<Pipe>; 2],
    /// A bug (panic) hit this connection: its sockets are shut down and its
    /// remaining operations are awaited (mask) until the deadline; then it
    /// is dropped without freeing its buffers.
    poisoned: Option<(u32, Instant)>,
}

/// A pipe for splice: (read end, write end).
struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
}

impl Pipe {
    fn new() -> std::io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid out-array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two new descriptors that nothing else owns.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Best effort: a smaller pipe only means shorter splices.
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_CAP as libc::c_int) };
        Ok(Pipe { rd, wr })
    }
}

fn dir_index(d: Dir) -> usize {
    match d {
        Dir::Up => 0,
        Dir::Down => 1,
    }
}

/// At most one log line per second per category; counts what it held back.
#[derive(Default)]
struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[derive(Default)]
struct Limits {
    plaintext: RateLimit,
    handshake: RateLimit,
    backend: RateLimit,
    accept: RateLimit,
    full: RateLimit,
    ktls: RateLimit,
    policy: RateLimit,
}

struct Worker {
    // Declared first so it is dropped first: the kernel may still reference
    // `tick_ts` and `wake_buf` until the ring is gone.
    ring: IoUring,
    tick_ts: Box<types::Timespec>,
    wake_buf: Box<u64>,
    wake: OwnedFd,
    id: usize,
    listeners: Vec<ListenerState>,
    conns: Slab<Conn>,
    max_connections: usize,
    drain_timeout: Duration,
    drain_deadline: Option<Instant>,
    metrics: Arc<WorkerMetrics>,
    control: Arc<Control>,
    logs: Limits,
    keys: Vec<usize>,
    pipes: Vec<Pipe>,
    /// Scratch space for kTLS control records.
    control_buf: Box<[u8]>,
    requests: std::sync::mpsc::Receiver<WorkerRequest>,
    audit: Option<crate::audit::AuditSink>,
}

/// Runs a worker until it has drained. Call on the worker's own thread.
pub fn run(p: WorkerParams) -> std::io::Result<()> {
    let (ring, flavor) = new_ring(p.ring_entries)?;
    if p.id == 0 {
        match flavor {
            RingFlavor::DeferTaskrun => {
                debug!("io_uring: SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN")
            }
            RingFlavor::CoopTaskrun => {
                info!("io_uring: COOP_TASKRUN (no DEFER_TASKRUN on this kernel)")
            }
            RingFlavor::Plain => info!("io_uring: no optional setup flags on this kernel"),
        }
    }
    let mut w = Worker {
        ring,
        tick_ts: Box::new(types::Timespec::from(TICK)),
        wake_buf: Box::new(0),
        wake: p.wake,
        id: p.id,
        listeners: p
            .listeners
            .into_iter()
            .map(|l| ListenerState {
                socket: Some(l.socket),
                session: l.session,
                backend: l.backend,
                info: l.info,
                accepting: false,
                rearm: false,
            })
            .collect(),
        conns: Slab::with_capacity(1024),
        max_connections: p.max_connections,
        drain_timeout: p.drain_timeout,
        drain_deadline: None,
        metrics: p.metrics,
        control: p.control,
        logs: Limits::default(),
        keys: Vec::new(),
        pipes: Vec::new(),
        control_buf: vec![0u8; 17 * 1024].into_boxed_slice(),
        requests: p.requests,
        audit: p.audit,
    };
    w.run()
}

/// Queues an SQE, submitting first if the queue is full.
fn push(ring: &mut IoUring, sqe: &squeue::Entry) -> std::io::Result<()> {
    for _ in 0..64 {
        // SAFETY: every buffer an SQE points to is owned by a `Session`
        // (which keeps it allocated and unmoved until the completion, see
        // `session` module docs), by a `BackendTarget` behind an `Arc` held
        // by the listener for the worker's life, or by the `Worker`'s boxed
        // `tick_ts`/`wake_buf`, which outlive the ring.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
    Err(std::io::Error::other("submission queue stays full"))
}

impl Worker {
    fn run(&mut self) -> std::io::Result<()> {
        for i in 0..self.listeners.len() {
            self.arm_accept(i)?;
        }
        self.arm_tick()?;
        self.arm_wake()?;
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(1024);
        loop {
            if self.drain_deadline.is_some()
                && self.conns.is_empty()
                && self.listeners.iter().all(|l| !l.accepting)
            {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            cqes.clear();
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            let now = Instant::now();
            for &(user_data, res, flags) in &cqes {
                self.dispatch(user_data, res, flags, now)?;
            }
        }
        debug!(worker = self.id, "worker drained");
        Ok(())
    }

    fn dispatch(
        &mut self,
        user_data: u64,
        res: i32,
        flags: u32,
        now: Instant,
    ) -> std::io::Result<()> {
        let tag = user_data & 0xff;
        let key = (user_data >> 8) as usize;
        match tag {
            TAG_ACCEPT => self.on_accept(key, res, flags, now),
            TAG_TICK => self.on_tick(now)?,
            TAG_WAKE => self.on_wake(res, now)?,
            TAG_CANCEL => {}
            t => match (OpKind::from_u8(t as u8), self.conns.get_mut(key)) {
                (Some(kind), Some(conn)) => {
                    if (kind == OpKind::SpliceDownOut || kind == OpKind::SpliceUpOut) && res > 0 {
                        let rekey = self.listeners[conn.listener]
                            .session
                            .ktls
                            .as_ref()
                            .is_some_and(|k| k.rekey);
                        if kind == OpKind::SpliceDownOut {
                            account_sent(conn, res as u64, rekey, now);
                        } else {
                            account_sent_backend(conn, res as u64, rekey, now);
                        }
                    }
                    if let Some((mask, _)) = conn.poisoned.as_mut() {
                        *mask &= !kind.bit();
                        if *mask == 0 {
                            self.bury(key);
                        }
                        return Ok(());
                    }
                    self.guarded(key, now, |w| {
                        if let Some(conn) = w.conns.get_mut(key) {
                            conn.session.complete(kind, res, now);
                        }
                        w.drive(key, now);
                    });
                }
                _ => warn!(
                    worker = self.id,
                    user_data, "completion for no known operation"
                ),
            },
        }
        Ok(())
    }

    fn arm_accept(&mut self, i: usize) -> std::io::Result<()> {
        let l = &mut self.listeners[i];
        let Some(sock) = l.socket.as_ref() else {
            return Ok(());
        };
        let sqe = opcode::AcceptMulti::new(types::Fd(sock.as_raw_fd()))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(ud(i, TAG_ACCEPT));
        push(&mut self.ring, &sqe)?;
        l.accepting = true;
        l.rearm = false;
        Ok(())
    }

    fn arm_tick(&mut self) -> std::io::Result<()> {
        let sqe = opcode::Timeout::new(&*self.tick_ts as *const types::Timespec)
            .build()
            .user_data(TAG_TICK);
        push(&mut self.ring, &sqe)
    }

    fn arm_wake(&mut self) -> std::io::Result<()> {
        let sqe = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            &mut *self.wake_buf as *mut u64 as *mut u8,
            8,
        )
        .build()
        .user_data(TAG_WAKE);
        push(&mut self.ring, &sqe)
    }

    fn on_accept(&mut self, i: usize, res: i32, flags: u32, now: Instant) {
        if !cqueue::more(flags) {
            self.listeners[i].accepting = false;
            if self.drain_deadline.is_some() {
                // Drain: the accept is over, let the socket go.
                self.listeners[i].socket = None;
            } else {
                self.listeners[i].rearm = true;
            }
        }
        if res < 0 {
            let errno = -res;
            if self.drain_deadline.is_none() && !matches!(errno, libc::ECONNABORTED | libc::EAGAIN)
            {
                if let Some(skipped) = self.logs.accept.allow(now) {
                    warn!(
                        worker = self.id,
                        error = %std::io::Error::from_raw_os_error(errno),
                        skipped,
                        "accept failed"
                    );
                }
            }
            return;
        }
        // SAFETY: a successful accept returns a new file descriptor that
        // nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(res) };
        if self.drain_deadline.is_some() {
            return;
        }
        if self.conns.len() >= self.max_connections {
            WorkerMetrics::inc(&self.metrics.rejected_max_connections);
            if let Some(skipped) = self.logs.full.allow(now) {
                warn!(
                    worker = self.id,
                    max = self.max_connections,
                    skipped,
                    "worker at max connections; closing new connection"
                );
            }
            return;
        }
        let sock = socket2::SockRef::from(&fd);
        let _ = sock.set_tcp_nodelay(true);
        let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
        let local = if self.listeners[i].info.proxy_protocol {
            sock.local_addr().ok().and_then(|a| a.as_socket())
        } else {
            None
        };
        let mut cfg = self.listeners[i].session.clone();
        // The listener's current TLS settings (certificates rotate by
        // swapping this pointer; sessions keep the one they started with).
        cfg.tls = self.listeners[i].info.tls.load_full();
        let session = Session::new(cfg, now);
        let key = self.conns.insert(Conn {
            session,
            client: fd,
            backend: None,
            listener: i,
            cancel_sent: false,
            handshake_counted: false,
            accepted_at: now,
            started: std::time::SystemTime::now(),
            peer,
            local,
            identity: None,
            ktls: None,
            backend_ktls: None,
            pipes: [None, None],
            poisoned: None,
        });
        WorkerMetrics::inc(&self.metrics.accepted);
        WorkerMetrics::inc(&self.metrics.active);
        self.guarded(key, now, |w| w.drive(key, now));
        if self.listeners[i].rearm && self.drain_deadline.is_none() {
            if let Err(e) = self.arm_accept(i) {
                warn!(worker = self.id, error = %e, "cannot re-arm accept");
            }
        }
    }

    fn on_tick(&mut self, now: Instant) -> std::io::Result<()> {
        self.arm_tick()?;
        if let Some(a) = self.audit.as_mut() {
            a.flush();
        }
        if self.drain_deadline.is_none() {
            for i in 0..self.listeners.len() {
                if self.listeners[i].rearm && !self.listeners[i].accepting {
                    self.arm_accept(i)?;
                }
            }
        }
        let force = self.control.force.load(Ordering::Relaxed)
            || self.drain_deadline.is_some_and(|d| now >= d);
        self.keys.clear();
        self.keys.extend(self.conns.iter().map(|(k, _)| k));
        for idx in 0..self.keys.len() {
            let key = self.keys[idx];
            if let Some(conn) = self.conns.get_mut(key) {
                if let Some((_, deadline)) = conn.poisoned {
                    if now >= deadline {
                        self.bury(key);
                    }
                    continue;
                }
                self.guarded(key, now, |w| {
                    if let Some(conn) = w.conns.get_mut(key) {
                        if force {
                            conn.session.abort(CloseReason::Shutdown);
                        } else if !conn.session.tick(now) {
                            return;
                        }
                    }
                    w.drive(key, now);
                });
            }
        }
        Ok(())
    }

    fn on_wake(&mut self, res: i32, now: Instant) -> std::io::Result<()> {
        if res >= 0 || res == -libc::EINTR {
            self.arm_wake()?;
        }
        while let Ok(req) = self.requests.try_recv() {
            match req {
                WorkerRequest::Sessions(reply) => {
                    let list: Vec<AuditRecord> = self
                        .conns
                        .iter()
                        .map(|(k, c)| self.describe(k, c, now, true))
                        .collect();
                    let _ = reply.send(list);
                }
            }
        }
        if self.control.draining.load(Ordering::Relaxed) && self.drain_deadline.is_none() {
            self.drain_deadline = Some(now + self.drain_timeout);
            debug!(worker = self.id, open = self.conns.len(), "draining");
            for i in 0..self.listeners.len() {
                if let Some(sock) = self.listeners[i].socket.as_ref() {
                    // Leave the listening state at once so new connects are
                    // refused; the multishot accept then ends by itself.
                    // SAFETY: plain syscall on a socket we own.
                    unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
                }
                if self.listeners[i].accepting {
                    let sqe = opcode::AsyncCancel::new(ud(i, TAG_ACCEPT))
                        .build()
                        .user_data(TAG_CANCEL);
                    push(&mut self.ring, &sqe)?;
                } else {
                    self.listeners[i].socket = None;
                }
            }
        }
        if self.control.force.load(Ordering::Relaxed) {
            self.on_tick(now)?;
        }
        Ok(())
    }

    /// Runs `f` (session work for connection `key`); a panic in it — a
    /// bug, never expected — costs that one connection, not the worker:
    /// its sockets are shut down (completing whatever the kernel still
    /// holds), its operations cancelled, and it is dropped once they are
    /// back or a deadline passes. Its buffers are leaked, never freed, so
    /// a late kernel write cannot touch reused memory.
    fn guarded(&mut self, key: usize, now: Instant, f: impl FnOnce(&mut Self)) {
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        if res.is_ok() {
            return;
        }
        WorkerMetrics::inc(&self.metrics.internal_errors);
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        error!(
            worker = self.id,
            conn = key,
            peer = %conn.peer.map_or_else(|| "-".to_string(), |a| a.to_string()),
            "internal error (panic) while handling a connection; closing it (other connections are not affected)"
        );
        // SAFETY: plain syscalls on sockets this connection owns.
        unsafe {
            libc::shutdown(conn.client.as_raw_fd(), libc::SHUT_RDWR);
            if let Some(b) = &conn.backend {
                libc::shutdown(b.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
        let mask = conn.session.in_flight();
        conn.poisoned = Some((mask, now + Duration::from_secs(10)));
        for kind in OpKind::ALL {
            if mask & kind.bit() != 0 {
                let sqe = opcode::AsyncCancel::new(ud(key, kind as u64))
                    .build()
                    .user_data(TAG_CANCEL);
                let _ = push(&mut self.ring, &sqe);
            }
        }
        if mask == 0 {
            self.bury(key);
        }
    }

    /// Drops a poisoned connection: sockets closed, session leaked.
    fn bury(&mut self, key: usize) {
        if let Some(conn) = self.conns.try_remove(key) {
            self.metrics.active.fetch_sub(1, Ordering::Relaxed);
            WorkerMetrics::inc(&self.metrics.closed);
            let Conn {
                session,
                client,
                backend,
                ..
            } = conn;
            drop((client, backend));
            std::mem::forget(session);
        }
    }

    /// Submits what a connection's session wants next; closes it when done.
    fn drive(&mut self, key: usize, now: Instant) {
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            let Some(io) = conn.session.poll_io() else {
                break;
            };
            let kind = io.kind();
            let client = conn.client.as_raw_fd();
            let backend = conn.backend.as_ref().map(|f| f.as_raw_fd());
            let sqe = match io {
                Io::ClientRecv { ptr, len } => {
                    opcode::Recv::new(types::Fd(client), ptr, len as u32).build()
                }
                Io::ClientSend { ptr, len } => {
                    opcode::Send::new(types::Fd(client), ptr, len as u32)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                }
                Io::ClientShutdown => {
                    opcode::Shutdown::new(types::Fd(client), libc::SHUT_WR).build()
                }
                Io::BackendConnect => {
                    let target = self.listeners[conn.listener].backend.clone();
                    match open_backend(&target) {
                        Ok(sock) => {
                            let fd: OwnedFd = sock.into();
                            let raw = fd.as_raw_fd();
                            conn.backend = Some(fd);
                            opcode::Connect::new(
                                types::Fd(raw),
                                target.addr.as_ptr() as *const libc::sockaddr,
                                target.addr.len(),
                            )
                            .build()
                        }
                        Err(e) => {
                            let errno = e.raw_os_error().unwrap_or(libc::EIO);
                            conn.session.complete(kind, -errno, now);
                            continue;
                        }
                    }
                }
                Io::BackendRecv { ptr, len } => match backend {
                    Some(fd) => opcode::Recv::new(types::Fd(fd), ptr, len as u32).build(),
                    None => {
                        conn.session.complete(kind, -libc::ENOTCONN, now);
                        continue;
                    }
                },
                Io::BackendSend { ptr, len } => match backend {
                    Some(fd) => opcode::Send::new(types::Fd(fd), ptr, len as u32)
                        .flags(libc::MSG_NOSIGNAL)
                        .build(),
                    None => {
                        conn.session.complete(kind, -libc::ENOTCONN, now);
                        continue;
                    }
                },
                Io::BackendShutdown => match backend {
                    Some(fd) => {
                        if let (Some(k), Some(b)) =
                            (conn.backend_ktls.as_mut(), conn.backend.as_ref())
                        {
                            // A kTLS backend gets close_notify before the FIN.
                            if let Err(e) = k.send_close_notify(b.as_fd()) {
                                debug!(worker = self.id, conn = key, error = %e, "close_notify to the backend failed");
                            }
                        }
                        opcode::Shutdown::new(types::Fd(fd), libc::SHUT_WR).build()
                    }
                    None => {
                        conn.session.complete(kind, -libc::ENOTCONN, now);
                        continue;
                    }
                },
                Io::Offload => {
                    let res = offload(conn);
                    if let Err(e) = &res {
                        if let Some(skipped) = self.logs.ktls.allow(now) {
                            warn!(worker = self.id, conn = key, error = %e, skipped, "kernel TLS offload failed; closing the connection");
                        }
                    }
                    conn.session
                        .complete(kind, if res.is_ok() { 0 } else { -libc::EIO }, now);
                    continue;
                }
                Io::ClientPollIn => poll(client, libc::POLLIN),
                Io::ClientPollOut => poll(client, libc::POLLOUT),
                Io::BackendPollIn | Io::BackendPollOut => match backend {
                    Some(fd) => poll(
                        fd,
                        if io == Io::BackendPollIn {
                            libc::POLLIN
                        } else {
                            libc::POLLOUT
                        },
                    ),
                    None => {
                        conn.session.complete(kind, -libc::ENOTCONN, now);
                        continue;
                    }
                },
                Io::SpliceIn { dir, len } | Io::SpliceOut { dir, len } => {
                    let slot = &mut conn.pipes[dir_index(dir)];
                    if slot.is_none() {
                        match self.pipes.pop().map_or_else(Pipe::new, Ok) {
                            Ok(p) => *slot = Some(p),
                            Err(e) => {
                                let errno = e.raw_os_error().unwrap_or(libc::EMFILE);
                                conn.session.complete(kind, -errno, now);
                                continue;
                            }
                        }
                    }
                    let (Some(pipe), Some(backend)) = (slot.as_ref(), backend) else {
                        conn.session.complete(kind, -libc::ENOTCONN, now);
                        continue;
                    };
                    let (src, dst) = match (io, dir) {
                        (Io::SpliceIn { .. }, Dir::Up) => (client, pipe.wr.as_raw_fd()),
                        (Io::SpliceIn { .. }, Dir::Down) => (backend, pipe.wr.as_raw_fd()),
                        (_, Dir::Up) => (pipe.rd.as_raw_fd(), backend),
                        (_, Dir::Down) => (pipe.rd.as_raw_fd(), client),
                    };
                    opcode::Splice::new(
                        types::Fd(src),
                        -1,
                        types::Fd(dst),
                        -1,
                        len.min(u32::MAX as usize) as u32,
                    )
                    .flags(libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE)
                    .build()
                }
                Io::ClientControl | Io::BackendControl => {
                    let backend_leg = io == Io::BackendControl;
                    let ev = if backend_leg {
                        read_backend_control(conn, &mut self.control_buf)
                    } else {
                        read_control(conn, &mut self.control_buf)
                    };
                    if let ControlEvent::Fatal(msg) | ControlEvent::CloseCleanly(msg) = &ev {
                        if let Some(skipped) = self.logs.ktls.allow(now) {
                            info!(
                                worker = self.id,
                                conn = key,
                                leg = if backend_leg { "backend" } else { "client" },
                                skipped,
                                "kernel TLS connection ends: {msg}"
                            );
                        }
                    }
                    if backend_leg {
                        conn.session.on_backend_control(ev, now);
                    } else {
                        conn.session.on_control(ev, now);
                    }
                    continue;
                }
                Io::CloseNotify => {
                    let res = match conn.ktls.as_mut() {
                        Some(k) => match k.send_close_notify(conn.client.as_fd()) {
                            Ok(()) => 0,
                            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                        },
                        None => -libc::ENOTCONN,
                    };
                    conn.session.complete(kind, res, now);
                    continue;
                }
            };
            let sqe = sqe.user_data(ud(key, kind as u64));
            if let Err(e) = push(&mut self.ring, &sqe) {
                warn!(worker = self.id, error = %e, "cannot submit I/O; failing the operation");
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.session.complete(kind, -libc::EIO, now);
                }
            }
        }
        self.after_drive(key, now);
    }

    fn after_drive(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if !conn.handshake_counted && conn.session.stats().handshake_done {
            conn.handshake_counted = true;
            WorkerMetrics::inc(&self.metrics.handshakes);
            let listener = &self.listeners[conn.listener];
            if let Some(hs) = conn.session.handshake_info() {
                self.metrics.handshake_time.record(hs.duration);
                let identity = hs
                    .client_cert
                    .as_ref()
                    .and_then(crate::certs::peer_identity);
                debug!(
                    worker = self.id,
                    conn = key,
                    listener = %listener.info.name,
                    peer = %conn.peer.map_or_else(|| "-".to_string(), |a| a.to_string()),
                    version = ?hs.version,
                    suite = ?hs.suite,
                    group = ?hs.group,
                    sni = hs.sni.as_deref().unwrap_or("-"),
                    alpn = %hs.alpn.as_deref().map_or(std::borrow::Cow::Borrowed("-"), String::from_utf8_lossy),
                    resumed = hs.resumed,
                    client_cert = identity.as_deref().unwrap_or("-"),
                    duration_us = hs.duration.as_micros() as u64,
                    "handshake complete"
                );
                if hs.policy_deviation {
                    WorkerMetrics::inc(&self.metrics.policy_deviations);
                    if let Some(skipped) = self.logs.policy.allow(now) {
                        warn!(
                            worker = self.id,
                            listener = %listener.info.name,
                            peer = %conn.peer.map_or_else(|| "-".to_string(), |a| a.to_string()),
                            suite = ?hs.suite,
                            version = ?hs.version,
                            skipped,
                            "TLS policy deviation: negotiated suite is not in tls.expected_cipher_suites"
                        );
                    }
                }
                if listener.info.proxy_protocol {
                    let header = proxy_header(conn, hs, identity.as_deref());
                    conn.session.set_backend_prefix(header);
                }
                conn.identity = identity;
            }
        }
        if conn.session.wants_cancel() && !conn.cancel_sent {
            conn.cancel_sent = true;
            let in_flight = conn.session.in_flight();
            for kind in OpKind::ALL {
                if in_flight & kind.bit() != 0 {
                    let sqe = opcode::AsyncCancel::new(ud(key, kind as u64))
                        .build()
                        .user_data(TAG_CANCEL);
                    if push(&mut self.ring, &sqe).is_err() {
                        // Fall back to shutting the sockets down, which
                        // completes pending receives and sends.
                        // SAFETY: plain syscalls on sockets we own.
                        unsafe {
                            libc::shutdown(conn.client.as_raw_fd(), libc::SHUT_RDWR);
                            if let Some(b) = &conn.backend {
                                libc::shutdown(b.as_raw_fd(), libc::SHUT_RDWR);
                            }
                        }
                    }
                }
            }
        }
        // Pipes are held only while bytes are in flight.
        for dir in [Dir::Up, Dir::Down] {
            let i = dir_index(dir);
            if conn.pipes[i].is_some() && !conn.session.needs_pipe(dir) {
                if let Some(p) = conn.pipes[i].take() {
                    if !conn.session.pipe_dirty(dir) && self.pipes.len() < PIPE_POOL_MAX {
                        self.pipes.push(p);
                    }
                }
            }
        }
        if conn.session.is_finished() {
            let conn = self.conns.remove(key);
            self.closed(key, conn, now);
        }
    }

    fn closed(&mut self, key: usize, conn: Conn, now: Instant) {
        self.metrics
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let reason = conn.session.close_reason();
        self.metrics.record_close(reason);
        let stats = conn.session.stats();
        self.metrics
            .bytes_up
            .fetch_add(stats.bytes_up, Ordering::Relaxed);
        self.metrics
            .bytes_down
            .fetch_add(stats.bytes_down, Ordering::Relaxed);
        if stats.sent_502 {
            WorkerMetrics::inc(&self.metrics.responses_502);
        }
        if stats.handshake_done {
            if stats.ktls {
                WorkerMetrics::inc(&self.metrics.ktls_connections);
            } else {
                WorkerMetrics::inc(&self.metrics.userspace_path);
            }
        }
        self.metrics
            .spliced_up
            .fetch_add(stats.spliced_up, Ordering::Relaxed);
        self.metrics
            .spliced_down
            .fetch_add(stats.spliced_down, Ordering::Relaxed);
        let backend = &self.listeners[conn.listener].backend.display;
        let peer = conn.peer.map_or_else(|| "-".to_string(), |a| a.to_string());
        match reason {
            Some(r @ CloseReason::PlaintextHttp) | Some(r @ CloseReason::NotTls) => {
                if let Some(skipped) = self.logs.plaintext.allow(now) {
                    warn!(worker = self.id, peer, skipped, "rejected: {r}");
                }
            }
            Some(
                r @ CloseReason::HandshakeFailed(rustls::Error::PeerIncompatible(
                    rustls::PeerIncompatible::NoCipherSuitesInCommon,
                )),
            ) if self.listeners[conn.listener].info.policy_enforce => {
                WorkerMetrics::inc(&self.metrics.policy_deviations);
                if let Some(skipped) = self.logs.policy.allow(now) {
                    warn!(
                        worker = self.id,
                        listener = %self.listeners[conn.listener].info.name,
                        peer,
                        skipped,
                        "TLS policy: refused a client that offered none of tls.expected_cipher_suites ({r})"
                    );
                }
            }
            Some(r @ CloseReason::HandshakeFailed(_)) | Some(r @ CloseReason::HandshakeTimeout) => {
                if let Some(skipped) = self.logs.handshake.allow(now) {
                    info!(worker = self.id, peer, skipped, "{r}");
                }
            }
            Some(
                r @ (CloseReason::BackendConnectFailed(_)
                | CloseReason::BackendConnectTimeout
                | CloseReason::BackendReset(_)
                | CloseReason::BackendTlsFailed(_)),
            ) => {
                if let Some(skipped) = self.logs.backend.allow(now) {
                    warn!(
                        worker = self.id,
                        peer,
                        backend,
                        sent_502 = stats.sent_502,
                        skipped,
                        "{r}"
                    );
                }
            }
            _ => {}
        }
        debug!(
            worker = self.id,
            conn = key,
            peer,
            reason = reason.map_or("unknown", |r| r.label()),
            bytes_up = stats.bytes_up,
            bytes_down = stats.bytes_down,
            duration_ms = now.duration_since(conn.accepted_at).as_millis() as u64,
            "connection closed"
        );
        if self.audit.is_some() {
            let rec = self.describe(key, &conn, now, false);
            if let Some(a) = self.audit.as_mut() {
                a.push(&rec);
            }
        }
        // Dropping `conn` closes both sockets; nothing is in flight.
    }

    /// The audit record of a connection: final when `active` is false,
    /// otherwise a snapshot for the admin API.
    fn describe(&self, key: usize, conn: &Conn, now: Instant, active: bool) -> AuditRecord {
        let l = &self.listeners[conn.listener];
        let stats = conn.session.stats();
        let hs = conn.session.handshake_info();
        let elapsed = now.duration_since(conn.accepted_at);
        let end = conn.started + elapsed;
        let label = |v: Option<String>| v.filter(|s| !s.is_empty());
        AuditRecord {
            id: format!("{}-{}-{}", self.id, key, unix_micros(conn.started)),
            listener: l.info.name.clone(),
            start: crate::audit::format_time(conn.started),
            end: if active {
                String::new()
            } else {
                crate::audit::format_time(end)
            },
            duration_ms: elapsed.as_millis() as u64,
            client: conn.peer.map_or_else(|| "-".to_string(), |a| a.to_string()),
            backend: (conn.backend.is_some() || stats.bytes_up > 0)
                .then(|| l.backend.display.clone()),
            sni: hs.and_then(|h| h.sni.clone()),
            alpn: hs.and_then(|h| {
                h.alpn
                    .as_deref()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
            }),
            tls_version: label(hs.and_then(|h| h.version).map(version_name)),
            cipher_suite: hs
                .and_then(|h| h.suite)
                .and_then(|s| s.as_str())
                .map(String::from),
            kx_group: hs.and_then(|h| h.group).map(|g| format!("{g:?}")),
            resumed: hs.is_some_and(|h| h.resumed),
            path: if stats.ktls {
                "ktls"
            } else if stats.handshake_done {
                "userspace"
            } else {
                "none"
            },
            client_identity: conn.identity.clone(),
            bytes_up: stats.bytes_up,
            bytes_down: stats.bytes_down,
            handshake_ms: hs.map(|h| h.duration.as_secs_f64() * 1000.0),
            close_reason: if active {
                "active".to_string()
            } else {
                conn.session
                    .close_reason()
                    .map_or("unknown", |r| r.label())
                    .to_string()
            },
        }
    }
}

fn unix_micros(t: std::time::SystemTime) -> u128 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// `TLSv1.3`-style names, as OpenSSL and PROXY headers spell them.
fn version_name(v: rustls::ProtocolVersion) -> String {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".into(),
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".into(),
        other => format!("{other:?}"),
    }
}

/// The PROXY v2 header for a connection whose handshake just completed.
fn proxy_header(
    conn: &Conn,
    hs: &crate::session::HandshakeInfo,
    identity: Option<&str>,
) -> Vec<u8> {
    let (Some(src), Some(dst)) = (conn.peer, conn.local) else {
        return crate::proxy_v2::encode_local();
    };
    let version = hs.version.map(version_name).unwrap_or_default();
    let cipher = hs.suite.and_then(|s| s.as_str()).unwrap_or("");
    let cn = identity.and_then(|id| {
        id.split(',')
            .find_map(|part| part.trim().strip_prefix("CN="))
    });
    let tlvs = crate::proxy_v2::TlsTlvs {
        version: &version,
        cipher,
        sni: hs.sni.as_deref(),
        alpn: hs.alpn.as_deref(),
        client_cn: cn,
        client_cert_presented: hs.client_cert.is_some(),
        client_cert_verified: hs.client_cert.is_some(),
    };
    crate::proxy_v2::encode(src, dst, Some(&tlvs))
}

fn open_backend(target: &BackendTarget) -> std::io::Result<Socket> {
    let sock = Socket::new(target.domain, Type::STREAM.nonblocking(), None)?;
    if target.is_tcp {
        sock.set_tcp_nodelay(true)?;
    }
    Ok(sock)
}

fn poll(fd: libc::c_int, events: libc::c_short) -> squeue::Entry {
    opcode::PollAdd::new(types::Fd(fd), events as u32).build()
}

/// Moves a finished handshake's record layer into the kernel.
fn offload(conn: &mut Conn) -> Result<(), String> {
    let tls = conn
        .session
        .take_tls_for_offload()
        .ok_or("no rustls connection to offload")?;
    let (secrets, kernel) = tls
        .dangerous_into_kernel_connection()
        .map_err(|e| format!("extracting secrets: {e}"))?;
    let k = KtlsConn::offload(conn.client.as_fd(), secrets, kernel).map_err(|e| e.to_string())?;
    conn.ktls = Some(k);
    if let Some(btls) = conn.session.take_backend_tls_for_offload() {
        let backend = conn
            .backend
            .as_ref()
            .ok_or("backend TLS without a backend socket")?;
        let (secrets, kernel) = btls
            .dangerous_into_kernel_connection()
            .map_err(|e| format!("extracting backend secrets: {e}"))?;
        let k = KtlsConn::offload(backend.as_fd(), secrets, kernel)
            .map_err(|e| format!("backend: {e}"))?;
        conn.backend_ktls = Some(k);
    }
    Ok(())
}

/// A kTLS connection of either side, as the control-record reader and the
/// confidentiality-limit accounting see it.
trait KernelSide {
    /// Acts on a non-data record (close_notify, KeyUpdate, tickets, alerts).
    fn handle(
        &mut self,
        fd: BorrowedFd<'_>,
        typ: u8,
        payload: &[u8],
    ) -> Result<ktls_setup::ControlOutcome, ktls_setup::KtlsError>;
    fn note_sent(&mut self, bytes: u64) -> bool;
    fn update_tx_keys(&mut self, fd: BorrowedFd<'_>) -> Result<(), ktls_setup::KtlsError>;
}

impl KernelSide for KtlsConn<ServerConnectionData> {
    fn handle(
        &mut self,
        fd: BorrowedFd<'_>,
        typ: u8,
        payload: &[u8],
    ) -> Result<ktls_setup::ControlOutcome, ktls_setup::KtlsError> {
        self.handle_record(fd, typ, payload)
    }
    fn note_sent(&mut self, bytes: u64) -> bool {
        KtlsConn::note_sent(self, bytes)
    }
    fn update_tx_keys(&mut self, fd: BorrowedFd<'_>) -> Result<(), ktls_setup::KtlsError> {
        KtlsConn::update_tx_keys(self, fd, false)
    }
}

impl KernelSide for KtlsConn<rustls::client::ClientConnectionData> {
    fn handle(
        &mut self,
        fd: BorrowedFd<'_>,
        typ: u8,
        payload: &[u8],
    ) -> Result<ktls_setup::ControlOutcome, ktls_setup::KtlsError> {
        self.handle_record(fd, typ, payload)
    }
    fn note_sent(&mut self, bytes: u64) -> bool {
        KtlsConn::note_sent(self, bytes)
    }
    fn update_tx_keys(&mut self, fd: BorrowedFd<'_>) -> Result<(), ktls_setup::KtlsError> {
        KtlsConn::update_tx_keys(self, fd, false)
    }
}

/// Reads the non-data record at the head of a kTLS socket (`peer`: "client"
/// or "backend") and acts on it. A data record read instead lands in `out`.
fn read_control_record(
    k: &mut dyn KernelSide,
    fd: BorrowedFd<'_>,
    scratch: &mut [u8],
    out: &mut [u8],
    peer: &str,
) -> ControlEvent {
    let limit = out.len().min(scratch.len());
    match ktls_setup::sock::recv_record(fd, &mut scratch[..limit]) {
        Ok((ktls_setup::sock::CONTENT_APPLICATION_DATA, 0)) => ControlEvent::Eof,
        Ok((ktls_setup::sock::CONTENT_APPLICATION_DATA, n)) => {
            out[..n].copy_from_slice(&scratch[..n]);
            ControlEvent::Data(n)
        }
        Ok((typ, n)) => match k.handle(fd, typ, &scratch[..n]) {
            Ok(ktls_setup::ControlOutcome::CloseNotify) => ControlEvent::CloseNotify,
            Ok(_) => ControlEvent::Handled,
            Err(ktls_setup::KtlsError::RekeyUnsupported) => ControlEvent::CloseCleanly(format!(
                "the {peer} updated its TLS 1.3 keys (KeyUpdate) and this kernel cannot install new keys on a kTLS socket (needs Linux 6.14+); closing cleanly"
            )),
            Err(e) => ControlEvent::Fatal(e.to_string()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => ControlEvent::WouldBlock,
        Err(e) if e.raw_os_error() == Some(libc::EBADMSG) => {
            ControlEvent::Fatal(format!("a record from the {peer} failed to decrypt"))
        }
        Err(e) => ControlEvent::Fatal(format!("reading a control record from the {peer}: {e}")),
    }
}

/// Reads a control record from the client's kTLS socket.
fn read_control(conn: &mut Conn, scratch: &mut [u8]) -> ControlEvent {
    let Some(k) = conn.ktls.as_mut() else {
        return ControlEvent::Fatal("control record without kernel TLS".into());
    };
    let out = conn.session.control_buf();
    read_control_record(k, conn.client.as_fd(), scratch, out, "client")
}

/// Reads a control record from the backend's kTLS socket (double TLS).
fn read_backend_control(conn: &mut Conn, scratch: &mut [u8]) -> ControlEvent {
    let (Some(k), Some(fd)) = (conn.backend_ktls.as_mut(), conn.backend.as_ref()) else {
        return ControlEvent::Fatal("backend control record without kernel TLS".into());
    };
    let out = conn.session.backend_control_buf();
    read_control_record(k, fd.as_fd(), scratch, out, "backend")
}

/// Counts records sent under the current key; near the suite's
/// confidentiality limit, update the keys (TLS 1.3, on kernels that can
/// rekey) or close cleanly. No KeyUpdate is sent unless the kernel can
/// install the new key: the peer would switch keys and the close_notify
/// that follows would no longer decrypt.
fn note_sent_on(
    k: &mut dyn KernelSide,
    fd: BorrowedFd<'_>,
    session: &mut Session,
    bytes: u64,
    rekey: bool,
    now: Instant,
) {
    if !k.note_sent(bytes) {
        return;
    }
    if !rekey {
        session.kernel_error(
            "confidentiality limit of the cipher suite reached and this kernel cannot update kTLS keys".into(),
            now,
        );
    } else if let Err(e) = k.update_tx_keys(fd) {
        session.kernel_error(
            format!("confidentiality limit reached and keys cannot be updated: {e}"),
            now,
        );
    }
}

/// [`note_sent_on`] for the client leg.
fn account_sent(conn: &mut Conn, bytes: u64, rekey: bool, now: Instant) {
    if let Some(k) = conn.ktls.as_mut() {
        note_sent_on(k, conn.client.as_fd(), &mut conn.session, bytes, rekey, now);
    }
}

/// [`note_sent_on`] for the backend leg of a double-TLS offload.
fn account_sent_backend(conn: &mut Conn, bytes: u64, rekey: bool, now: Instant) {
    if let (Some(k), Some(fd)) = (conn.backend_ktls.as_mut(), conn.backend.as_ref()) {
        note_sent_on(k, fd.as_fd(), &mut conn.session, bytes, rekey, now);
    }
}
