//! The per-connection protocol state machine, with no I/O of its own.
//!
//! A [`Session`] owns one client connection's buffers and its rustls
//! connection (unbuffered API: we own every byte buffer). It never touches a
//! socket. Instead, the driver (the io_uring worker, or a unit test) asks it
//! what I/O it wants with [`Session::poll_io`], performs that I/O, and reports
//! the result with [`Session::complete`]. Time is passed in with
//! [`Session::tick`]. This keeps protocol logic testable without sockets, in
//! the spirit of quinn's `quinn-proto`.
//!
//! Life of a session:
//! ```text
//!  accept ─▶ Sniff ──TLS──▶ Handshake ──▶ Relay ──▶ Done
//!              │ HTTP                       │ backend connect, relay both ways,
//!              ▼                            │ half-close each way, close_notify
//!           Reject (400, linger) ─▶ Done    ▼
//!              │ garbage ──────────────▶ Done (reason recorded)
//! ```
//!
//! Buffer safety contract with the driver: every [`Io`] returned by
//! `poll_io` carries a pointer into a buffer owned by this session. The
//! session guarantees that memory stays allocated and is neither moved nor
//! reused until the matching `complete` call, provided the driver (a) calls
//! `complete` exactly once for every `Io` it was given, and (b) does not drop
//! the session while [`Session::in_flight`] is non-zero.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, WriteTraffic};

use crate::buf::Buf;
use crate::sniff::{self, Sniff};

/// Capacity of the client→gateway TLS buffer (two maximum-size records).
pub const TLS_IN_CAP: usize = 34 * 1024;
/// Capacity of the gateway→client TLS buffer.
pub const TLS_OUT_CAP: usize = 34 * 1024;
/// Capacity of each plaintext buffer (client→backend, backend→client).
pub const PLAIN_CAP: usize = 32 * 1024;
/// Size of every buffer while its direction carries little: a quiet or
/// idle connection holds four of these, not the full sizes above. A buffer
/// grows to full size when a transfer needs it (a receive filled it, a
/// record does not fit) and shrinks back once drained by a small transfer.
pub const SMALL_CAP: usize = 2 * 1024;
/// Largest plaintext a TLS record can carry.
const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;
/// Bytes reserved per record for header, tag and padding when encrypting.
const RECORD_OVERHEAD: usize = 64;
/// How long a rejected plaintext client may keep sending after our answer
/// before we close (so the answer is not destroyed by a reset).
const LINGER: Duration = Duration::from_secs(2);

/// Settings a session needs, shared by all sessions of a listener.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub tls: Arc<rustls::ServerConfig>,
    /// Address shown in the `https://` hint when the request has no `Host`.
    pub public_addr: Arc<str>,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub backend_connect_timeout: Duration,
    /// Kernel TLS offload: what the kernel supports, or `None` for the
    /// user-space record path only.
    pub ktls: Option<Arc<crate::offload::KtlsSupport>>,
    /// TLS to the backend, when configured.
    pub upstream: Option<backend_tls::UpstreamTls>,
    /// Suites a handshake is expected to end with (`tls.expected_cipher_suites`);
    /// `None`: no check.
    pub expected_suites: Option<Arc<[rustls::CipherSuite]>>,
}

/// What the client's handshake negotiated, for logs, audit records and the
/// PROXY header.
#[derive(Debug, Clone, Default)]
pub struct HandshakeInfo {
    pub version: Option<rustls::ProtocolVersion>,
    pub suite: Option<rustls::CipherSuite>,
    pub group: Option<rustls::NamedGroup>,
    /// Server name the client asked for (SNI).
    pub sni: Option<String>,
    pub alpn: Option<Vec<u8>>,
    /// Resumed from a ticket or the session cache.
    pub resumed: bool,
    /// The client's certificate (leaf), when mutual TLS verified one.
    pub client_cert: Option<rustls::pki_types::CertificateDer<'static>>,
    /// From accept to the end of the handshake.
    pub duration: Duration,
    /// The suite is outside `tls.expected_cipher_suites`.
    pub policy_deviation: bool,
}

/// One I/O operation the session wants performed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Receive from the client into `ptr..ptr+len`.
    ClientRecv { ptr: *mut u8, len: usize },
    /// Send `ptr..ptr+len` to the client.
    ClientSend { ptr: *const u8, len: usize },
    /// `shutdown(SHUT_WR)` the client socket.
    ClientShutdown,
    /// Open a socket to the backend and connect it.
    BackendConnect,
    /// Receive from the backend into `ptr..ptr+len`.
    BackendRecv { ptr: *mut u8, len: usize },
    /// Send `ptr..ptr+len` to the backend.
    BackendSend { ptr: *const u8, len: usize },
    /// `shutdown(SHUT_WR)` the backend socket.
    BackendShutdown,
    /// Move the client connection's record layer into the kernel: the
    /// driver takes the rustls connection with
    /// [`Session::take_tls_for_offload`] and installs its keys.
    Offload,
    /// Wait until the client (kTLS) socket has a record to read.
    ClientPollIn,
    /// Wait until the backend socket is readable.
    BackendPollIn,
    /// Wait until the client socket is writable.
    ClientPollOut,
    /// Wait until the backend socket is writable.
    BackendPollOut,
    /// `splice` up to `len` bytes from the direction's source socket into
    /// its pipe.
    SpliceIn { dir: Dir, len: usize },
    /// `splice` up to `len` bytes from the direction's pipe into its
    /// destination socket.
    SpliceOut { dir: Dir, len: usize },
    /// Read one non-data record from the kTLS client socket and act on it;
    /// report with [`Session::control`].
    ClientControl,
    /// Send close_notify on the kTLS client socket.
    CloseNotify,
    /// Read one non-data record from the kTLS backend socket (double TLS)
    /// and act on it; report with [`Session::on_backend_control`].
    BackendControl,
}

/// A relay direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client to backend.
    Up,
    /// Backend to client.
    Down,
}

impl Io {
    /// The kind of operation, for completion routing.
    pub fn kind(&self) -> OpKind {
        match self {
            Io::ClientRecv { .. } => OpKind::ClientRecv,
            Io::ClientSend { .. } => OpKind::ClientSend,
            Io::ClientShutdown => OpKind::ClientShutdown,
            Io::BackendConnect => OpKind::BackendConnect,
            Io::BackendRecv { .. } => OpKind::BackendRecv,
            Io::BackendSend { .. } => OpKind::BackendSend,
            Io::BackendShutdown => OpKind::BackendShutdown,
            Io::Offload => OpKind::Offload,
            Io::ClientPollIn => OpKind::ClientPollIn,
            Io::BackendPollIn => OpKind::BackendPollIn,
            Io::ClientPollOut => OpKind::ClientPollOut,
            Io::BackendPollOut => OpKind::BackendPollOut,
            Io::SpliceIn { dir: Dir::Up, .. } => OpKind::SpliceUpIn,
            Io::SpliceOut { dir: Dir::Up, .. } => OpKind::SpliceUpOut,
            Io::SpliceIn { dir: Dir::Down, .. } => OpKind::SpliceDownIn,
            Io::SpliceOut { dir: Dir::Down, .. } => OpKind::SpliceDownOut,
            Io::ClientControl => OpKind::ClientControl,
            Io::CloseNotify => OpKind::CloseNotify,
            Io::BackendControl => OpKind::BackendControl,
        }
    }
}

/// Kinds of operation; at most one of each is in flight per session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    ClientRecv = 0,
    ClientSend = 1,
    ClientShutdown = 2,
    BackendConnect = 3,
    BackendRecv = 4,
    BackendSend = 5,
    BackendShutdown = 6,
    Offload = 7,
    ClientPollIn = 8,
    BackendPollIn = 9,
    ClientPollOut = 10,
    BackendPollOut = 11,
    SpliceUpIn = 12,
    SpliceUpOut = 13,
    SpliceDownIn = 14,
    SpliceDownOut = 15,
    ClientControl = 16,
    CloseNotify = 17,
    BackendControl = 18,
}

impl OpKind {
    pub const ALL: [OpKind; 19] = [
        OpKind::ClientRecv,
        OpKind::ClientSend,
        OpKind::ClientShutdown,
        OpKind::BackendConnect,
        OpKind::BackendRecv,
        OpKind::BackendSend,
        OpKind::BackendShutdown,
        OpKind::Offload,
        OpKind::ClientPollIn,
        OpKind::BackendPollIn,
        OpKind::ClientPollOut,
        OpKind::BackendPollOut,
        OpKind::SpliceUpIn,
        OpKind::SpliceUpOut,
        OpKind::SpliceDownIn,
        OpKind::SpliceDownOut,
        OpKind::ClientControl,
        OpKind::CloseNotify,
        OpKind::BackendControl,
    ];

    pub fn bit(self) -> u32 {
        1 << (self as u8)
    }

    /// Decodes the value stored in completion user data.
    pub fn from_u8(v: u8) -> Option<OpKind> {
        OpKind::ALL.get(v as usize).copied()
    }
}

/// Why a session ended. Every session ends with exactly one reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CloseReason {
    #[error("closed normally")]
    Normal,
    #[error("plaintext HTTP on the TLS port (answered 400)")]
    PlaintextHttp,
    #[error("not TLS: first bytes are neither a TLS handshake nor HTTP")]
    NotTls,
    #[error("client closed before completing the handshake")]
    ClientGoneBeforeHandshake,
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("TLS handshake failed: {0}")]
    HandshakeFailed(rustls::Error),
    #[error("TLS error after the handshake: {0}")]
    TlsError(rustls::Error),
    #[error("backend connect failed: {0}")]
    BackendConnectFailed(Errno),
    #[error("backend connect timed out")]
    BackendConnectTimeout,
    #[error("backend reset the connection: {0}")]
    BackendReset(Errno),
    #[error("client I/O error: {0}")]
    ClientError(Errno),
    #[error("idle timeout")]
    IdleTimeout,
    #[error("closed by gateway shutdown")]
    Shutdown,
    #[error("kernel TLS offload failed: {0}")]
    KtlsFailed(String),
    #[error("kernel TLS: {0}")]
    KtlsClosed(String),
    #[error("TLS to the backend failed: {0}")]
    BackendTlsFailed(rustls::Error),
}

impl CloseReason {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::PlaintextHttp => "plaintext_http",
            CloseReason::NotTls => "not_tls",
            CloseReason::ClientGoneBeforeHandshake => "client_gone_before_handshake",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::HandshakeFailed(_) => "handshake_failed",
            CloseReason::TlsError(_) => "tls_error",
            CloseReason::BackendConnectFailed(_) => "backend_connect_failed",
            CloseReason::BackendConnectTimeout => "backend_connect_timeout",
            CloseReason::BackendReset(_) => "backend_reset",
            CloseReason::ClientError(_) => "client_error",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::KtlsFailed(_) => "ktls_failed",
            CloseReason::KtlsClosed(_) => "ktls_closed",
            CloseReason::BackendTlsFailed(_) => "backend_tls_failed",
        }
    }
}

/// An OS error number, displayed with its description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

/// Borrows a session's outbound buffers for [`encrypt_pending`], disjoint
/// from its rustls connection.
macro_rules! outbound {
    ($s:ident) => {
        Outbound {
            down: &mut $s.down,
            tls_out: &mut $s.tls_out,
            overflow_empty: $s.overflow.is_empty(),
            out_idle: $s.in_flight & OpKind::ClientSend.bit() == 0,
            down_idle: $s.in_flight & OpKind::BackendRecv.bit() == 0,
            backend_rd_done: $s.backend_rd_done,
            close_notify_queued: &mut $s.close_notify_queued,
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first bytes to tell TLS from plaintext.
    Sniff,
    /// Plaintext HTTP: answering 400, then lingering until the client closes.
    Reject,
    /// rustls handshake in progress.
    Handshake,
    /// Relaying between client and backend.
    Relay,
    /// Finished; waiting only for in-flight operations to complete.
    Done,
}

/// Who handles TLS records after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// rustls, in user space.
    User,
    /// Handshake done; waiting for the backend and a quiet socket, then
    /// the record layer moves to the kernel.
    PendingOffload,
    /// The kernel (kTLS); bytes move with splice.
    Kernel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Idle,
    Connecting,
    /// TCP connected, TLS handshake with the backend running.
    Handshaking,
    Connected,
    /// Unusable (refused, reset, or deliberately abandoned).
    Gone,
}

/// Counters a session keeps for the driver's metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Plaintext bytes relayed client → backend.
    pub bytes_up: u64,
    /// Plaintext bytes relayed backend → client.
    pub bytes_down: u64,
    /// Whether the TLS handshake completed.
    pub handshake_done: bool,
    /// Whether the client ended its stream with close_notify (vs. a bare FIN).
    pub client_close_notify: bool,
    /// Whether a 502 answer was sent.
    pub sent_502: bool,
    /// Whether records went through kernel TLS (vs. rustls in user space).
    pub ktls: bool,
    /// Of `bytes_up`/`bytes_down`, those moved with splice (kernel TLS).
    pub spliced_up: u64,
    pub spliced_down: u64,
}

/// One client connection's protocol state.
pub struct Session {
    cfg: SessionConfig,
    phase: Phase,
    tls: Option<UnbufferedServerConnection>,
    /// TLS (or sniffed plaintext) bytes from the client.
    tls_in: Buf,
    /// Bytes to the client (TLS records, or the plaintext 400 answer).
    tls_out: Buf,
    /// Handshake messages that did not fit `tls_out`; sent before anything else.
    overflow: Vec<u8>,
    /// Plaintext client → backend.
    up: Buf,
    /// Plaintext backend → client.
    down: Buf,
    in_flight: u32,
    backend: Backend,
    /// The client's TCP stream reached EOF.
    client_tcp_eof: bool,
    /// No more plaintext will come from the client (close_notify or EOF).
    client_rd_done: bool,
    /// The backend's stream reached EOF (no more plaintext to the client).
    backend_rd_done: bool,
    close_notify_queued: bool,
    client_wr_shut: bool,
    backend_wr_shut: bool,
    /// Whether the first plaintext from the client looked like HTTP.
    first_request_http: Option<bool>,
    /// The backend failed before sending anything: decide 502 vs close.
    awaiting_502_decision: bool,
    created: Instant,
    last_activity: Instant,
    connect_started: Option<Instant>,
    linger_until: Option<Instant>,
    handshake_duration: Option<Duration>,
    /// rustls reported a fatal error: only its alert remains to be sent.
    tls_dead: bool,
    /// Who encrypts records once the handshake is done.
    mode: Mode,
    /// Splice relay state, once offloaded.
    kernel: kernel::KernelRelay,
    reason: Option<CloseReason>,
    stats: SessionStats,
    /// TLS to the backend (user space), once connected.
    btls: Option<Box<backend_tls::BackendTls>>,
    /// The backend connection's records went into the kernel too (double
    /// TLS offload): `btls` is gone, the backend socket is a kTLS socket.
    backend_ktls: bool,
    /// What the handshake negotiated, once it completed.
    hs: Option<Box<HandshakeInfo>>,
    /// SNI read from the ClientHello (rustls' unbuffered API has no getter).
    sni: Option<Box<str>>,
    sni_checked: bool,
    /// The last client / backend receive filled all it was offered (more
    /// is probably waiting: use full-size buffers).
    client_read_full: bool,
    backend_read_full: bool,
    /// Bytes offered to the receive in flight.
    client_recv_offered: usize,
    backend_recv_offered: usize,
    /// Bytes sent to the backend before anything else (PROXY header). Not
    /// modified while a send of it is in flight.
    backend_prefix: Vec<u8>,
    /// The backend send in flight is of `backend_prefix`.
    prefix_in_flight: bool,
}

impl Session {
    /// A new session for a just-accepted client connection.
    pub fn new(cfg: SessionConfig, now: Instant) -> Self {
        Self {
            cfg,
            phase: Phase::Sniff,
            tls: None,
            tls_in: Buf::new(SMALL_CAP),
            tls_out: Buf::new(SMALL_CAP),
            overflow: Vec::new(),
            up: Buf::new(SMALL_CAP),
            down: Buf::new(SMALL_CAP),
            in_flight: 0,
            backend: Backend::Idle,
            client_tcp_eof: false,
            client_rd_done: false,
            backend_rd_done: false,
            close_notify_queued: false,
            client_wr_shut: false,
            backend_wr_shut: false,
            first_request_http: None,
            awaiting_502_decision: false,
            created: now,
            last_activity: now,
            connect_started: None,
            linger_until: None,
            handshake_duration: None,
            tls_dead: false,
            mode: Mode::User,
            kernel: kernel::KernelRelay::default(),
            reason: None,
            stats: SessionStats::default(),
            btls: None,
            backend_ktls: false,
            hs: None,
            sni: None,
            sni_checked: false,
            backend_prefix: Vec::new(),
            prefix_in_flight: false,
            client_read_full: false,
            backend_read_full: false,
            client_recv_offered: 0,
            backend_recv_offered: 0,
        }
    }

    /// What the handshake negotiated, once it completed.
    pub fn handshake_info(&self) -> Option<&HandshakeInfo> {
        self.hs.as_deref()
    }

    /// Bytes to send to the backend before any client byte (a PROXY
    /// protocol header). Only effective before the backend is connected.
    pub fn set_backend_prefix(&mut self, prefix: Vec<u8>) {
        if matches!(self.backend, Backend::Idle | Backend::Connecting) {
            self.backend_prefix = prefix;
        }
    }

    /// Backend TLS version and suite, once its handshake is done.
    pub fn backend_negotiated(&self) -> Option<(rustls::ProtocolVersion, rustls::CipherSuite)> {
        self.btls.as_ref()?.negotiated()
    }

    /// Operations currently in flight (bit per [`OpKind`]).
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Whether the session is over and nothing is in flight: the driver may
    /// close the sockets and drop it.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Done && self.in_flight == 0
    }

    /// Whether the session is over but operations are still in flight: the
    /// driver should cancel them.
    pub fn wants_cancel(&self) -> bool {
        self.phase == Phase::Done && self.in_flight != 0
    }

    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.reason.as_ref()
    }

    /// Counters for metrics and logs.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// How long the handshake took, once it completed.
    pub fn handshake_duration(&self) -> Option<Duration> {
        self.handshake_duration
    }

    /// Negotiated TLS version and cipher suite, once known.
    pub fn negotiated(&self) -> Option<(rustls::ProtocolVersion, rustls::CipherSuite)> {
        let tls = self.tls.as_ref()?;
        Some((
            tls.protocol_version()?,
            tls.negotiated_cipher_suite()?.suite(),
        ))
    }

    /// Whether the session's handshake phase (sniff or TLS) is still running.
    pub fn in_handshake(&self) -> bool {
        matches!(self.phase, Phase::Sniff | Phase::Handshake)
    }

    fn finish(&mut self, reason: CloseReason) {
        if self.reason.is_none() {
            self.reason = Some(reason);
        }
        self.phase = Phase::Done;
    }

    /// Ends the session now, e.g. when the drain period is over.
    pub fn abort(&mut self, reason: CloseReason) {
        self.finish(reason);
    }

    // ------------------------------------------------------------------
    // Driver interface

    /// The next operation to start, if any. Each returned `Io` is marked in
    /// flight until [`Session::complete`] is called for its kind.
    pub fn poll_io(&mut self) -> Option<Io> {
        if self.phase == Phase::Done {
            return None;
        }
        self.flush_overflow();
        let io = self.next_io()?;
        self.in_flight |= io.kind().bit();
        Some(io)
    }

    fn idle(&self, k: OpKind) -> bool {
        self.in_flight & k.bit() == 0
    }

    fn next_io(&mut self) -> Option<Io> {
        if self.mode == Mode::Kernel {
            return self.next_io_kernel();
        }
        // Client send: whatever is queued for the client.
        if self.idle(OpKind::ClientSend) && !self.tls_out.is_empty() && !self.client_wr_shut {
            let (ptr, len) = self.tls_out.filled_raw();
            return Some(Io::ClientSend { ptr, len });
        }
        // Client shutdown once our last bytes (close_notify or the 400) are out.
        if self.idle(OpKind::ClientSend)
            && self.idle(OpKind::ClientShutdown)
            && !self.client_wr_shut
            && self.tls_out.is_empty()
            && self.overflow.is_empty()
            && (self.close_notify_queued || self.phase == Phase::Reject)
        {
            self.client_wr_shut = true;
            return Some(Io::ClientShutdown);
        }
        // Client receive (none while the record layer is about to move
        // into the kernel: those bytes are the kernel's to decrypt).
        if self.idle(OpKind::ClientRecv) && !self.client_tcp_eof && self.mode == Mode::User {
            size_for_receive(&mut self.tls_in, TLS_IN_CAP, self.client_read_full);
            if self.tls_in.spare_len() < MAX_RECORD_PLAINTEXT {
                self.tls_in.compact();
            }
            let len = self.client_recv_len();
            if len > 0 {
                let (ptr, _) = self.tls_in.spare_raw();
                self.client_recv_offered = len;
                return Some(Io::ClientRecv { ptr, len });
            }
        }
        if self.phase != Phase::Relay {
            return None;
        }
        match self.backend {
            Backend::Idle if !self.awaiting_502_decision => {
                self.backend = Backend::Connecting;
                return Some(Io::BackendConnect);
            }
            Backend::Connected | Backend::Handshaking if self.btls.is_some() => {
                if let Some(io) = self.next_io_backend_tls() {
                    return Some(io);
                }
                if self.mode == Mode::PendingOffload && self.backend == Backend::Connected {
                    return self.offload_when_quiet();
                }
                return None;
            }
            Backend::Connected => {}
            _ => return None,
        }
        if !self.backend_prefix.is_empty() {
            // The PROXY header goes first, alone.
            if !self.idle(OpKind::BackendSend) {
                return None;
            }
            self.prefix_in_flight = true;
            return Some(Io::BackendSend {
                ptr: self.backend_prefix.as_ptr(),
                len: self.backend_prefix.len(),
            });
        }
        if self.mode == Mode::PendingOffload {
            return self.offload_when_quiet();
        }
        if self.idle(OpKind::BackendSend) && !self.up.is_empty() {
            let (ptr, len) = self.up.filled_raw();
            return Some(Io::BackendSend { ptr, len });
        }
        if self.idle(OpKind::BackendSend)
            && self.idle(OpKind::BackendShutdown)
            && !self.backend_wr_shut
            && self.client_rd_done
            && self.up.is_empty()
        {
            self.backend_wr_shut = true;
            return Some(Io::BackendShutdown);
        }
        if self.idle(OpKind::BackendRecv) && !self.backend_rd_done {
            size_for_receive(&mut self.down, PLAIN_CAP, self.backend_read_full);
            if self.down.spare_len() < MAX_RECORD_PLAINTEXT {
                self.down.compact();
            }
            if self.down.spare_len() > 0 {
                let (ptr, len) = self.down.spare_raw();
                self.backend_recv_offered = len;
                return Some(Io::BackendRecv { ptr, len });
            }
        }
        None
    }

    /// Backend I/O when the backend speaks TLS: move its record buffers.
    fn next_io_backend_tls(&mut self) -> Option<Io> {
        let send_idle = self.idle(OpKind::BackendSend);
        let recv_idle = self.idle(OpKind::BackendRecv);
        let shut_idle = self.idle(OpKind::BackendShutdown);
        // Both sockets are about to move into the kernel: read the backend
        // one record at a time during its handshake, and not at all after,
        // so every byte past the handshake is the kernel's to decrypt.
        let offloading = self.mode == Mode::PendingOffload;
        let b = self.btls.as_mut()?;
        b.flush_overflow(send_idle);
        if send_idle && !b.tls_out.is_empty() {
            let (ptr, len) = b.tls_out.filled_raw();
            return Some(Io::BackendSend { ptr, len });
        }
        if send_idle
            && shut_idle
            && !self.backend_wr_shut
            && b.close_notify_queued
            && b.tls_out.is_empty()
            && b.overflow_empty()
        {
            self.backend_wr_shut = true;
            return Some(Io::BackendShutdown);
        }
        let reads_over = b.tcp_eof || b.peer_closed || (offloading && b.handshake_done);
        if recv_idle && !reads_over {
            if b.tls_in.spare_len() < MAX_RECORD_PLAINTEXT {
                b.tls_in.compact();
            }
            let mut len = b.tls_in.spare_len();
            if offloading {
                len = len.min(kernel::record_remaining(b.tls_in.filled()));
            }
            if len > 0 {
                let (ptr, _) = b.tls_in.spare_raw();
                return Some(Io::BackendRecv { ptr, len });
            }
        }
        None
    }

    /// Reports the result of an operation started by `poll_io`: a byte count
    /// (or 0) on success, `-errno` on failure.
    pub fn complete(&mut self, kind: OpKind, res: i32, now: Instant) {
        debug_assert!(
            !self.idle(kind),
            "completion for an operation not in flight"
        );
        self.in_flight &= !kind.bit();
        if res > 0 {
            self.last_activity = now;
        }
        if self.phase == Phase::Done {
            return;
        }
        match kind {
            OpKind::ClientRecv => self.on_client_recv(res),
            OpKind::ClientSend => self.on_client_send(res),
            OpKind::ClientShutdown => {
                if self.phase == Phase::Reject {
                    self.linger_until = Some(now + LINGER);
                }
            }
            OpKind::BackendConnect => self.on_backend_connect(res, now),
            OpKind::BackendRecv => self.on_backend_recv(res),
            OpKind::BackendSend => self.on_backend_send(res),
            OpKind::BackendShutdown => {}
            OpKind::Offload => self.on_offloaded(res),
            _ => self.on_kernel_complete(kind, res),
        }
        self.pump(now);
    }

    /// Checks the session's timers. Returns whether one fired (and so the
    /// driver should look for new I/O); cheap when none did.
    pub fn tick(&mut self, now: Instant) -> bool {
        let since_start = now.duration_since(self.created);
        match self.phase {
            Phase::Done => return false,
            Phase::Sniff | Phase::Handshake => {
                if since_start < self.cfg.handshake_timeout {
                    return false;
                }
                self.finish(CloseReason::HandshakeTimeout);
                return true;
            }
            Phase::Reject => {
                let lingered = self.linger_until.is_some_and(|t| now >= t);
                if !lingered && since_start < self.cfg.handshake_timeout + LINGER {
                    return false;
                }
                self.finish(CloseReason::PlaintextHttp);
                return true;
            }
            Phase::Relay => {
                let connect_expired = self.backend == Backend::Connecting
                    && self
                        .connect_started
                        .is_some_and(|t| now.duration_since(t) >= self.cfg.backend_connect_timeout);
                if connect_expired {
                    // The connect op is cancelled by the driver once we are
                    // done; the backend is gone as of now.
                    self.backend_failed(CloseReason::BackendConnectTimeout);
                } else if now.duration_since(self.last_activity) >= self.cfg.idle_timeout {
                    self.close_gracefully(CloseReason::IdleTimeout);
                } else {
                    return false;
                }
            }
        }
        self.pump(now);
        true
    }

    // ------------------------------------------------------------------
    // Completions

    fn on_client_recv(&mut self, res: i32) {
        match res {
            n if n > 0 => {
                if self.phase == Phase::Reject {
                    // Discard whatever a rejected client keeps sending.
                    return;
                }
                self.client_read_full = n as usize >= self.client_recv_offered;
                self.tls_in.commit(n as usize);
            }
            0 => self.client_tcp_eof = true,
            e => match self.phase {
                Phase::Reject => self.finish(CloseReason::PlaintextHttp),
                _ => self.client_failed(Errno(-e)),
            },
        }
    }

    fn on_client_send(&mut self, res: i32) {
        if res >= 0 && self.mode == Mode::Kernel {
            // Plaintext from a backend control read, sent through the
            // client's kTLS socket.
            self.down.consume(res as usize);
            self.stats.bytes_down += res as u64;
            if self.down.is_empty() {
                self.down.compact();
            }
            return;
        }
        if res >= 0 {
            self.tls_out.consume(res as usize);
            if self.tls_out.is_empty() {
                self.tls_out.compact();
                shrink_after_small(&mut self.tls_out, res as usize);
            }
        } else if self.phase == Phase::Reject {
            self.finish(CloseReason::PlaintextHttp);
        } else {
            self.client_failed(Errno(-res));
        }
    }

    /// A socket error on the client side. After the client ended its own
    /// stream (close_notify or FIN) a reset is just how some clients close
    /// (they do not wait for our close_notify): that is a normal end.
    fn client_failed(&mut self, errno: Errno) {
        self.client_tcp_eof = true;
        if self.client_rd_done && self.up.is_empty() {
            self.finish(CloseReason::Normal);
        } else {
            self.finish(CloseReason::ClientError(errno));
        }
    }

    fn on_backend_connect(&mut self, res: i32, now: Instant) {
        if self.backend != Backend::Connecting {
            return;
        }
        let _ = now;
        if res < 0 {
            self.backend_failed(CloseReason::BackendConnectFailed(Errno(-res)));
            return;
        }
        let prefix = std::mem::take(&mut self.backend_prefix);
        if let Some(u) = &self.cfg.upstream {
            match backend_tls::BackendTls::new(u) {
                Ok(mut b) => {
                    // The PROXY header goes in clear, before the ClientHello.
                    b.tls_out.push_compacting(&prefix);
                    self.btls = Some(Box::new(b));
                    self.backend = Backend::Handshaking;
                }
                Err(e) => self.backend_failed(CloseReason::BackendTlsFailed(e)),
            }
            return;
        }
        // Sent on its own before anything from `up` (see `next_io`).
        self.backend_prefix = prefix;
        self.backend = Backend::Connected;
    }

    fn on_backend_recv(&mut self, res: i32) {
        if let Some(b) = self.btls.as_mut() {
            if !matches!(self.backend, Backend::Connected | Backend::Handshaking) {
                return;
            }
            match res {
                n if n > 0 => b.tls_in.commit(n as usize),
                0 => b.tcp_eof = true,
                e => self.backend_failed(CloseReason::BackendReset(Errno(-e))),
            }
            return;
        }
        if self.backend != Backend::Connected {
            return;
        }
        match res {
            n if n > 0 => {
                self.backend_read_full = n as usize >= self.backend_recv_offered;
                self.down.commit(n as usize);
                self.stats.bytes_down += n as u64;
            }
            0 => self.backend_rd_done = true,
            e => self.backend_failed(CloseReason::BackendReset(Errno(-e))),
        }
    }

    fn on_backend_send(&mut self, res: i32) {
        if let Some(b) = self.btls.as_mut() {
            if !matches!(self.backend, Backend::Connected | Backend::Handshaking) {
                return;
            }
            if res >= 0 {
                b.tls_out.consume(res as usize);
                if b.tls_out.is_empty() {
                    b.tls_out.compact();
                }
            } else {
                self.backend_failed(CloseReason::BackendReset(Errno(-res)));
            }
            return;
        }
        if self.backend != Backend::Connected {
            return;
        }
        if std::mem::take(&mut self.prefix_in_flight) {
            if res >= 0 {
                self.backend_prefix
                    .drain(..(res as usize).min(self.backend_prefix.len()));
            } else {
                self.backend_failed(CloseReason::BackendReset(Errno(-res)));
            }
            return;
        }
        if res >= 0 {
            self.up.consume(res as usize);
            self.stats.bytes_up += res as u64;
            if self.up.is_empty() {
                self.up.compact();
                if self.mode != Mode::Kernel {
                    shrink_after_small(&mut self.up, res as usize);
                }
            }
        } else {
            self.backend_failed(CloseReason::BackendReset(Errno(-res)));
        }
    }

    /// The backend is unusable. If it never sent a byte and the client's
    /// first request looks like HTTP, the client gets a `502`; otherwise a
    /// clean close (close_notify). The decision may have to wait for the
    /// client's first bytes.
    fn backend_failed(&mut self, reason: CloseReason) {
        if self.mode == Mode::PendingOffload {
            // rustls still holds the connection: answer (502 or close) in
            // user space.
            self.mode = Mode::User;
        }
        if self.mode == Mode::Kernel {
            self.backend = Backend::Gone;
            if self.reason.is_none() {
                self.reason = Some(reason);
            }
            self.kernel_close_gracefully();
            return;
        }
        self.backend = Backend::Gone;
        if self.reason.is_none() {
            self.reason = Some(reason);
        }
        self.up.clear_if(self.idle(OpKind::BackendSend));
        if self.stats.bytes_down > 0 {
            self.close_gracefully_keep_reason();
            return;
        }
        match self.first_request_http {
            Some(true) => self.send_502(),
            Some(false) => self.close_gracefully_keep_reason(),
            None if self.client_rd_done => self.close_gracefully_keep_reason(),
            None => self.awaiting_502_decision = true,
        }
    }

    fn send_502(&mut self) {
        self.awaiting_502_decision = false;
        self.stats.sent_502 = true;
        if self.idle(OpKind::BackendRecv) {
            self.down.clear();
        }
        let resp = sniff::bad_gateway_response();
        self.down
            .push_compacting_if(&resp, self.idle(OpKind::BackendRecv));
        self.backend_rd_done = true;
        self.client_rd_done = true;
    }

    fn close_gracefully(&mut self, reason: CloseReason) {
        if self.reason.is_none() {
            self.reason = Some(reason);
        }
        if self.mode == Mode::Kernel {
            self.kernel_close_gracefully();
        } else {
            self.close_gracefully_keep_reason();
        }
    }

    /// Stop relaying: send close_notify, then close. Plaintext not yet
    /// encrypted is dropped; records already queued still go out.
    fn close_gracefully_keep_reason(&mut self) {
        self.awaiting_502_decision = false;
        if self.backend != Backend::Gone {
            self.backend = Backend::Gone;
        }
        if self.idle(OpKind::BackendRecv) {
            self.down.clear();
        }
        self.backend_rd_done = true;
        self.client_rd_done = true;
    }

    // ------------------------------------------------------------------
    // Protocol progress

    fn pump(&mut self, now: Instant) {
        if self.phase == Phase::Sniff {
            self.pump_sniff();
        }
        if matches!(self.phase, Phase::Handshake | Phase::Relay)
            && !self.tls_dead
            && self.mode != Mode::Kernel
        {
            self.pump_backend_tls();
            self.pump_tls(now);
            self.pump_backend_tls();
            if self.btls.is_some() && !self.tls_dead && self.phase == Phase::Relay {
                // Plaintext the backend pump just produced: encrypt it.
                self.pump_tls(now);
            }
        }
        if self.phase == Phase::Relay {
            if self.mode == Mode::Kernel {
                self.check_kernel_done();
            } else {
                self.check_relay_done();
            }
        }
        if self.phase == Phase::Reject && self.client_tcp_eof && self.tls_out.is_empty() {
            self.finish(CloseReason::PlaintextHttp);
        }
    }

    fn pump_sniff(&mut self) {
        match sniff::sniff(self.tls_in.filled()) {
            Sniff::Tls => match UnbufferedServerConnection::new(self.cfg.tls.clone()) {
                Ok(conn) => {
                    self.tls = Some(conn);
                    self.phase = Phase::Handshake;
                }
                Err(e) => self.finish(CloseReason::HandshakeFailed(e)),
            },
            Sniff::Http => {
                let bytes = self.tls_in.filled();
                if sniff::head_complete(bytes)
                    || self.tls_in.spare_len() == 0
                    || self.client_tcp_eof
                {
                    let head = sniff::parse_head(bytes);
                    let resp = sniff::plaintext_http_response(&head, &self.cfg.public_addr);
                    self.tls_in.clear_if(self.idle(OpKind::ClientRecv));
                    self.tls_out.push_compacting(&resp);
                    self.phase = Phase::Reject;
                    self.reason = Some(CloseReason::PlaintextHttp);
                }
            }
            Sniff::Garbage => self.finish(CloseReason::NotTls),
            Sniff::NeedMore => {
                if self.client_tcp_eof {
                    self.finish(CloseReason::ClientGoneBeforeHandshake);
                }
            }
        }
    }

    /// Drives the backend's TLS connection, if any.
    fn pump_backend_tls(&mut self) {
        if !matches!(self.backend, Backend::Connected | Backend::Handshaking) {
            return;
        }
        let out_idle = self.idle(OpKind::BackendSend);
        let Some(b) = self.btls.as_mut() else {
            return;
        };
        if !b.tls_in.is_empty() && self.down.capacity() < PLAIN_CAP {
            // Backend records decrypt into `down`, which no operation uses
            // in this mode: room for a full record.
            self.down.resize(PLAIN_CAP);
        }
        let mut first_down = false;
        let res = b.pump(
            backend_tls::Plain {
                up: &mut self.up,
                down: &mut self.down,
                up_done: self.client_rd_done,
                bytes_up: &mut self.stats.bytes_up,
                bytes_down: &mut self.stats.bytes_down,
                first_down: &mut first_down,
            },
            out_idle,
        );
        let (done, closed) = (b.handshake_done, b.peer_closed);
        match res {
            Err(e) => self.backend_failed(CloseReason::BackendTlsFailed(e)),
            Ok(()) => {
                if done && self.backend == Backend::Handshaking {
                    self.backend = Backend::Connected;
                    if self.mode == Mode::PendingOffload && !self.backend_offload_possible() {
                        // The backend's suite cannot go into the kernel:
                        // both legs stay in user space.
                        self.mode = Mode::User;
                    }
                }
                if closed {
                    self.backend_rd_done = true;
                }
            }
        }
    }

    /// Called once, when the client's handshake completes.
    fn on_handshake_done(&mut self, now: Instant) {
        self.phase = Phase::Relay;
        self.stats.handshake_done = true;
        let duration = now.duration_since(self.created);
        self.handshake_duration = Some(duration);
        self.last_activity = now;
        self.connect_started = Some(now);
        let Some(tls) = self.tls.as_ref() else {
            return;
        };
        let suite = tls.negotiated_cipher_suite().map(|s| s.suite());
        let policy_deviation = match (&self.cfg.expected_suites, suite) {
            (Some(expected), Some(s)) => !expected.contains(&s),
            _ => false,
        };
        self.hs = Some(Box::new(HandshakeInfo {
            version: tls.protocol_version(),
            suite,
            group: tls.negotiated_key_exchange_group().map(|g| g.name()),
            sni: self.sni.take().map(String::from),
            alpn: tls.alpn_protocol().map(<[u8]>::to_vec),
            resumed: tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            client_cert: tls.peer_certificates().and_then(|c| c.first()).cloned(),
            duration,
            policy_deviation,
        }));
    }

    /// Reads the SNI from the ClientHello once its first record is in.
    fn check_sni(&mut self) {
        if self.sni_checked {
            return;
        }
        let have = self.tls_in.filled();
        if have.len() < 5 {
            return;
        }
        let len = u16::from_be_bytes([have[3], have[4]]) as usize;
        if have.len() < 5 + len {
            return;
        }
        self.sni_checked = true;
        self.sni = sniff::client_hello_sni(&have[5..5 + len]).map(Box::from);
    }

    /// Drives rustls until it needs I/O.
    fn pump_tls(&mut self, now: Instant) {
        if self.phase == Phase::Handshake {
            self.check_sni();
        }
        // Bounded: each iteration either makes progress or breaks.
        for _ in 0..10_000 {
            // Known before the call that completes the handshake: the suite
            // was chosen when the ClientHello was processed.
            let offload = self.phase == Phase::Handshake && self.offload_possible();
            let Some(tls) = self.tls.as_mut() else {
                return;
            };
            // Feed client records only while the plaintext they decrypt to is
            // sure to fit (backpressure), or during the handshake.
            let up_may_move =
                self.btls.is_some() || self.in_flight & OpKind::BackendSend.bit() == 0;
            let up_room = room(&self.up, up_may_move);
            let up_can_grow = up_may_move && self.up.capacity() < PLAIN_CAP;
            let read_allowed =
                !self.client_rd_done && (up_room >= MAX_RECORD_PLAINTEXT || up_can_grow);
            let input: &mut [u8] = if read_allowed {
                self.tls_in.filled_mut()
            } else {
                &mut []
            };
            let status = tls.process_tls_records(input);
            let discard = status.discard;
            let state = match status.state {
                Ok(state) => state,
                Err(e) => {
                    self.tls_in.consume(discard);
                    self.tls_failed(e);
                    return;
                }
            };
            let mut stop = false;
            let mut hs_done_now = false;
            match state {
                ConnectionState::ReadTraffic(mut rt) => {
                    // Data right behind the client's Finished.
                    hs_done_now = self.phase == Phase::Handshake;
                    let up_idle =
                        self.btls.is_some() || self.in_flight & OpKind::BackendSend.bit() == 0;
                    let mut progressed = false;
                    while let Some(len) = rt.peek_len() {
                        if room(&self.up, up_idle) < len.get()
                            && up_idle
                            && self.up.capacity() < PLAIN_CAP
                        {
                            // A record larger than the quiet-size buffer.
                            self.up.resize(PLAIN_CAP);
                        }
                        if room(&self.up, up_idle) < len.get() {
                            break;
                        }
                        match rt.next_record() {
                            Some(Ok(rec)) => {
                                if self.first_request_http.is_none() && !rec.payload.is_empty() {
                                    self.first_request_http =
                                        Some(sniff::looks_like_http(rec.payload));
                                }
                                self.up.push_compacting_if(rec.payload, up_idle);
                                progressed = true;
                            }
                            Some(Err(e)) => {
                                self.tls_in.consume(discard);
                                self.tls_failed(e);
                                return;
                            }
                            None => break,
                        }
                    }
                    stop = !progressed;
                }
                ConnectionState::EncodeTlsData(mut enc) => {
                    let out_idle = self.in_flight & OpKind::ClientSend.bit() == 0;
                    // Never drop a handshake message: what does not fit is
                    // parked in the overflow, sent before anything else.
                    let r =
                        encode_or_park(&mut enc, &mut self.tls_out, &mut self.overflow, out_idle);
                    if let Err(e) = r {
                        self.tls_in.consume(discard);
                        self.tls_failed(e);
                        return;
                    }
                }
                ConnectionState::TransmitTlsData(mut t) => {
                    if let Some(mut wt) = t.may_encrypt_app_data() {
                        if let Err(e) = encrypt_pending(&mut wt, outbound!(self)) {
                            self.tls_in.consume(discard);
                            self.tls_failed(e);
                            return;
                        }
                    }
                    // The records are in `tls_out`, which the driver sends.
                    t.done();
                }
                ConnectionState::BlockedHandshake => {
                    stop = true;
                    if self.client_tcp_eof {
                        self.tls_in.consume(discard);
                        self.finish(CloseReason::ClientGoneBeforeHandshake);
                        return;
                    }
                }
                ConnectionState::WriteTraffic(mut wt) => {
                    hs_done_now = self.phase == Phase::Handshake;
                    if let Err(e) = encrypt_pending(&mut wt, outbound!(self)) {
                        self.tls_in.consume(discard);
                        self.tls_failed(e);
                        return;
                    }
                    stop = true;
                    // No complete record left in what we were allowed to
                    // read: at TCP EOF, the client's stream is over.
                    if read_allowed && self.client_tcp_eof && !self.client_rd_done {
                        self.client_rd_done = true;
                    }
                }
                ConnectionState::PeerClosed => {
                    self.client_rd_done = true;
                    self.stats.client_close_notify = true;
                }
                ConnectionState::Closed => {
                    self.client_rd_done = true;
                    stop = true;
                }
                ConnectionState::ReadEarlyData(_) => {
                    // Early data is never enabled in our ServerConfig.
                    self.tls_in.consume(discard);
                    self.tls_failed(rustls::Error::General("unexpected early data".into()));
                    return;
                }
                _ => {
                    self.tls_in.consume(discard);
                    self.tls_failed(rustls::Error::General("unknown rustls state".into()));
                    return;
                }
            }
            self.tls_in.consume(discard);
            if hs_done_now && self.phase == Phase::Handshake {
                self.on_handshake_done(now);
                if offload {
                    self.mode = Mode::PendingOffload;
                }
            }
            if stop {
                break;
            }
        }
        if self.awaiting_502_decision {
            if let Some(http) = self.first_request_http {
                if http {
                    self.send_502();
                } else {
                    self.close_gracefully_keep_reason();
                }
                // Encrypt the answer (or the close_notify) right away.
                self.pump_tls_once_more(now);
            } else if self.client_rd_done {
                self.close_gracefully_keep_reason();
                self.pump_tls_once_more(now);
            }
        }
        if self.backend == Backend::Gone && self.idle(OpKind::BackendSend) {
            // Nothing will carry client bytes any more.
            self.up.clear();
        }
    }

    fn pump_tls_once_more(&mut self, now: Instant) {
        // `awaiting_502_decision` is now false, so this cannot recurse again.
        if !self.awaiting_502_decision {
            self.pump_tls(now);
        }
    }

    /// A TLS error: send the alert rustls queued (if any), then close.
    fn tls_failed(&mut self, err: rustls::Error) {
        let reason = if self.phase == Phase::Handshake {
            CloseReason::HandshakeFailed(err)
        } else {
            CloseReason::TlsError(err)
        };
        if self.reason.is_none() {
            self.reason = Some(reason);
        }
        self.tls_dead = true;
        // rustls queues an alert for the peer; later calls hand it out as
        // EncodeTlsData. Collect it (bounded), then close after sending it.
        if let Some(tls) = self.tls.as_mut() {
            for _ in 0..4 {
                // The same (already discarded-from) buffer as before: rustls
                // may still refer to handshake messages in it, and an empty
                // slice would not match those ranges.
                let status = tls.process_tls_records(self.tls_in.filled_mut());
                let discard = status.discard;
                let more = match status.state {
                    Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                        encode_into_vec(&mut enc, &mut self.overflow).is_ok()
                    }
                    Ok(ConnectionState::TransmitTlsData(t)) => {
                        t.done();
                        true
                    }
                    _ => false,
                };
                self.tls_in.consume(discard);
                if !more {
                    break;
                }
            }
        }
        self.client_rd_done = true;
        self.backend_rd_done = true;
        self.backend = Backend::Gone;
        self.close_notify_queued = true; // the alert ends the stream
        self.phase = Phase::Relay;
        self.flush_overflow();
        if self.overflow.is_empty() && self.tls_out.is_empty() {
            self.phase = Phase::Done;
        }
    }

    fn flush_overflow(&mut self) {
        if self.overflow.is_empty() {
            return;
        }
        let idle = self.idle(OpKind::ClientSend);
        let n = self.tls_out.push_compacting_if(&self.overflow, idle);
        self.overflow.drain(..n);
    }

    /// Relay phase over when both directions are finished.
    fn check_relay_done(&mut self) {
        let up_done = self.client_rd_done
            && (self.backend != Backend::Connected || (self.backend_wr_shut && self.up.is_empty()));
        let down_done = self.close_notify_queued
            && self.tls_out.is_empty()
            && self.overflow.is_empty()
            && (self.client_wr_shut || self.client_tcp_eof);
        // The client's TCP stream is over and nothing more can reach the
        // backend: either everything it sent was read, or the backend is gone.
        let client_gone = self.client_tcp_eof
            && (self.tls_in.is_empty()
                || (self.backend == Backend::Gone && !self.awaiting_502_decision));
        if down_done && (up_done || client_gone) {
            self.finish(CloseReason::Normal);
        }
    }
}

/// The buffers `encrypt_pending` works on, borrowed apart from the rustls
/// connection (which the `WriteTraffic` state borrows).
struct Outbound<'a> {
    down: &'a mut Buf,
    tls_out: &'a mut Buf,
    overflow_empty: bool,
    /// No client send reads `tls_out`: it may be compacted.
    out_idle: bool,
    /// No backend receive writes `down`: it may be compacted.
    down_idle: bool,
    backend_rd_done: bool,
    close_notify_queued: &'a mut bool,
}

/// Encrypts pending backend plaintext into `tls_out`, then close_notify once
/// the backend's stream is over and everything before it is encrypted.
fn encrypt_pending(
    wt: &mut WriteTraffic<'_, rustls::server::ServerConnectionData>,
    o: Outbound<'_>,
) -> Result<(), rustls::Error> {
    if !o.overflow_empty {
        return Ok(());
    }
    if o.out_idle
        && o.tls_out.capacity() < TLS_OUT_CAP
        && o.down.len() + RECORD_OVERHEAD > o.tls_out.free_len()
    {
        // More than the quiet-size buffer holds: full-size records.
        o.tls_out.resize(TLS_OUT_CAP);
    }
    while !o.down.is_empty() {
        if o.out_idle && o.tls_out.spare_len() < MAX_RECORD_PLAINTEXT + RECORD_OVERHEAD {
            o.tls_out.compact();
        }
        let spare = o.tls_out.spare_len();
        if spare <= RECORD_OVERHEAD {
            break;
        }
        let n = o
            .down
            .len()
            .min(MAX_RECORD_PLAINTEXT)
            .min(spare - RECORD_OVERHEAD);
        match wt.encrypt(&o.down.filled()[..n], o.tls_out.spare_mut()) {
            Ok(written) => {
                o.tls_out.commit(written);
                o.down.consume(n);
            }
            Err(EncryptError::InsufficientSize(_)) => break,
            Err(EncryptError::EncryptExhausted) => return Err(rustls::Error::EncryptError),
        }
    }
    if o.down.is_empty() && o.down_idle {
        o.down.compact();
    }
    if o.backend_rd_done && o.down.is_empty() && !*o.close_notify_queued {
        if o.out_idle {
            o.tls_out.compact();
        }
        match wt.queue_close_notify(o.tls_out.spare_mut()) {
            Ok(n) => {
                o.tls_out.commit(n);
                *o.close_notify_queued = true;
            }
            Err(EncryptError::InsufficientSize(_)) => {}
            Err(EncryptError::EncryptExhausted) => return Err(rustls::Error::EncryptError),
        }
    }
    Ok(())
}

/// Before posting a receive into `buf` (nothing in flight on it): full
/// size when the last receive filled what it was offered or a partial
/// record needs more room than the buffer has; back to the quiet size when
/// it is empty and the last receive was small.
fn size_for_receive(buf: &mut Buf, full: usize, last_read_full: bool) {
    let cap = buf.capacity();
    if cap < full {
        let partial_need = if buf.is_empty() {
            0
        } else {
            buf.len() + kernel::record_remaining(buf.filled())
        };
        if last_read_full || partial_need > cap {
            buf.resize(full);
        }
    } else if cap > SMALL_CAP && buf.is_empty() && !last_read_full {
        *buf = Buf::new(SMALL_CAP);
    }
}

/// After a send drained `buf` (nothing in flight on it): back to the quiet
/// size when that send was small.
fn shrink_after_small(buf: &mut Buf, last_send: usize) {
    if buf.capacity() > SMALL_CAP && buf.is_empty() && last_send < SMALL_CAP {
        *buf = Buf::new(SMALL_CAP);
    }
}

/// Free room in a buffer: all of it when no send reads from it (so it may be
/// compacted), otherwise only the space after the filled bytes.
fn room(buf: &Buf, may_compact: bool) -> usize {
    if may_compact {
        buf.free_len()
    } else {
        buf.spare_len()
    }
}

/// Encodes a handshake message into `out`, or into `overflow` when it does
/// not fit or something is already parked there (order is kept). Either
/// side's connection.
fn encode_or_park<Data>(
    enc: &mut rustls::unbuffered::EncodeTlsData<'_, Data>,
    out: &mut Buf,
    overflow: &mut Vec<u8>,
    out_idle: bool,
) -> Result<(), rustls::Error> {
    if !overflow.is_empty() {
        return encode_into_vec(enc, overflow);
    }
    if out_idle {
        out.compact();
    }
    match enc.encode(out.spare_mut()) {
        Ok(n) => {
            out.commit(n);
            Ok(())
        }
        Err(EncodeError::InsufficientSize(_)) => encode_into_vec(enc, overflow),
        Err(EncodeError::AlreadyEncoded) => Ok(()),
    }
}

/// Encodes a handshake message into a growable vector (for messages that
/// do not fit the record buffer). Either side's connection.
fn encode_into_vec<Data>(
    enc: &mut rustls::unbuffered::EncodeTlsData<'_, Data>,
    out: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    let start = out.len();
    let mut need = 4096;
    for _ in 0..8 {
        out.resize(start + need, 0);
        match enc.encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(e)) => need = e.required_size.max(need * 2),
            Err(EncodeError::AlreadyEncoded) => {
                out.truncate(start);
                return Ok(());
            }
        }
    }
    out.truncate(start);
    Err(rustls::Error::General("handshake message too large".into()))
}

impl Buf {
    /// Appends, compacting first only when `may_compact`.
    fn push_compacting_if(&mut self, data: &[u8], may_compact: bool) -> usize {
        if may_compact {
            self.push_compacting(data)
        } else {
            let n = data.len().min(self.spare_len());
            self.spare_mut()[..n].copy_from_slice(&data[..n]);
            self.commit(n);
            n
        }
    }

    /// Forgets the filled bytes when no operation uses them.
    fn clear_if(&mut self, idle: bool) {
        if idle {
            self.clear();
        }
    }
}

mod backend_tls;
mod kernel;
pub use backend_tls::UpstreamTls;
pub use kernel::{ControlEvent, PIPE_CAP};

impl Session {
    /// Hands the backend's rustls connection to the driver (double TLS
    /// offload). Only valid while `Io::Offload` is in flight.
    pub fn take_backend_tls_for_offload(
        &mut self,
    ) -> Option<rustls::client::UnbufferedClientConnection> {
        if self.idle(OpKind::Offload) {
            return None;
        }
        let b = self.btls.take()?;
        self.backend_ktls = true;
        Some(b.into_conn())
    }

    /// Whether the backend socket is a kTLS socket.
    pub fn backend_is_ktls(&self) -> bool {
        self.backend_ktls
    }
}
#[cfg(test)]
mod tests;
