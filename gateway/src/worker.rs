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

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;
use socket2::{Domain, SockAddr, Socket, Type};
use tracing::{debug, info, warn};

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
}

struct ListenerState {
    socket: Option<OwnedFd>,
    session: SessionConfig,
    backend: Arc<BackendTarget>,
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
    peer: Option<std::net::SocketAddr>,
    /// Kernel TLS state once the record layer moved into the kernel.
    ktls: Option<KtlsConn<ServerConnectionData>>,
    /// Pipes held while bytes are in flight: [up, down].
    pipes: [Option<Pipe>; 2],
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
                    if kind == OpKind::SpliceDownOut && res > 0 {
                        let rekey = self.listeners[conn.listener]
                            .session
                            .ktls
                            .as_ref()
                            .is_some_and(|k| k.rekey);
                        account_sent(conn, res as u64, rekey, now);
                    }
                    conn.session.complete(kind, res, now);
                    self.drive(key, now);
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
        let session = Session::new(self.listeners[i].session.clone(), now);
        let key = self.conns.insert(Conn {
            session,
            client: fd,
            backend: None,
            listener: i,
            cancel_sent: false,
            handshake_counted: false,
            accepted_at: now,
            peer,
            ktls: None,
            pipes: [None, None],
        });
        WorkerMetrics::inc(&self.metrics.accepted);
        WorkerMetrics::inc(&self.metrics.active);
        self.drive(key, now);
        if self.listeners[i].rearm && self.drain_deadline.is_none() {
            if let Err(e) = self.arm_accept(i) {
                warn!(worker = self.id, error = %e, "cannot re-arm accept");
            }
        }
    }

    fn on_tick(&mut self, now: Instant) -> std::io::Result<()> {
        self.arm_tick()?;
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
                if force {
                    conn.session.abort(CloseReason::Shutdown);
                } else if !conn.session.tick(now) {
                    continue;
                }
                self.drive(key, now);
            }
        }
        Ok(())
    }

    fn on_wake(&mut self, res: i32, now: Instant) -> std::io::Result<()> {
        if res >= 0 || res == -libc::EINTR {
            self.arm_wake()?;
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
                    Some(fd) => opcode::Shutdown::new(types::Fd(fd), libc::SHUT_WR).build(),
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
                Io::ClientControl => {
                    let ev = read_control(conn, &mut self.control_buf);
                    if let ControlEvent::Fatal(msg) | ControlEvent::CloseCleanly(msg) = &ev {
                        if let Some(skipped) = self.logs.ktls.allow(now) {
                            info!(
                                worker = self.id,
                                conn = key,
                                skipped,
                                "kernel TLS connection ends: {msg}"
                            );
                        }
                    }
                    conn.session.on_control(ev, now);
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
            if let Some((version, suite)) = conn.session.negotiated() {
                debug!(
                    worker = self.id,
                    conn = key,
                    ?version,
                    ?suite,
                    duration_us = conn
                        .session
                        .handshake_duration()
                        .map_or(0, |d| d.as_micros() as u64),
                    "handshake complete"
                );
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
            Some(r @ CloseReason::HandshakeFailed(_)) | Some(r @ CloseReason::HandshakeTimeout) => {
                if let Some(skipped) = self.logs.handshake.allow(now) {
                    info!(worker = self.id, peer, skipped, "{r}");
                }
            }
            Some(
                r @ (CloseReason::BackendConnectFailed(_)
                | CloseReason::BackendConnectTimeout
                | CloseReason::BackendReset(_)),
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
        // Dropping `conn` closes both sockets; nothing is in flight.
    }
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
    Ok(())
}

/// Reads the non-data record at the head of a kTLS client socket and acts
/// on it (close_notify, KeyUpdate, alerts).
fn read_control(conn: &mut Conn, scratch: &mut [u8]) -> ControlEvent {
    let Some(k) = conn.ktls.as_mut() else {
        return ControlEvent::Fatal("control record without kernel TLS".into());
    };
    let limit = conn.session.control_buf().len().min(scratch.len());
    match ktls_setup::sock::recv_record(conn.client.as_fd(), &mut scratch[..limit]) {
        Ok((ktls_setup::sock::CONTENT_APPLICATION_DATA, 0)) => ControlEvent::Eof,
        Ok((ktls_setup::sock::CONTENT_APPLICATION_DATA, n)) => {
            conn.session.control_buf()[..n].copy_from_slice(&scratch[..n]);
            ControlEvent::Data(n)
        }
        Ok((typ, n)) => match k.handle_record(conn.client.as_fd(), typ, &scratch[..n]) {
            Ok(ktls_setup::ControlOutcome::CloseNotify) => ControlEvent::CloseNotify,
            Ok(_) => ControlEvent::Handled,
            Err(ktls_setup::KtlsError::RekeyUnsupported) => ControlEvent::CloseCleanly(
                "the client updated its TLS 1.3 keys (KeyUpdate) and this kernel cannot install new keys on a kTLS socket (needs Linux 6.14+); closing cleanly".into(),
            ),
            Err(e) => ControlEvent::Fatal(e.to_string()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => ControlEvent::WouldBlock,
        Err(e) if e.raw_os_error() == Some(libc::EBADMSG) => {
            ControlEvent::Fatal("a record from the client failed to decrypt".into())
        }
        Err(e) => ControlEvent::Fatal(format!("reading a control record: {e}")),
    }
}

/// Counts records sent under the current key; near the suite's
/// confidentiality limit, update the keys (TLS 1.3, on kernels that can
/// rekey) or close cleanly. No KeyUpdate is sent unless the kernel can
/// install the new key: the peer would switch keys and the close_notify
/// that follows would no longer decrypt.
fn account_sent(conn: &mut Conn, bytes: u64, rekey: bool, now: Instant) {
    let Some(k) = conn.ktls.as_mut() else {
        return;
    };
    if k.note_sent(bytes) {
        if !rekey {
            conn.session.kernel_error(
                "confidentiality limit of the cipher suite reached and this kernel cannot update kTLS keys".into(),
                now,
            );
        } else if let Err(e) = k.update_tx_keys(conn.client.as_fd(), false) {
            conn.session.kernel_error(
                format!("confidentiality limit reached and keys cannot be updated: {e}"),
                now,
            );
        }
    }
}
