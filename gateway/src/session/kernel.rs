//! The kernel-TLS relay mode of a [`Session`]: after the handshake the
//! client socket's record layer lives in the kernel, and bytes move with
//! `splice` socket → pipe → socket in both directions. Nothing is copied or
//! encrypted in user space; the session only keeps pipe fill levels and
//! readiness, and asks the driver for polls and splices.
//!
//! Offload sequence (see `offload_when_quiet`): during the handshake the
//! client is read record by record, so when rustls finishes no byte past
//! the last handshake record has left the socket. Once the backend is
//! connected and the handshake's last flight (and session tickets) is sent,
//! the driver takes the rustls connection and installs its keys in the
//! kernel; the next client byte is decrypted by the kernel.
//!
//! A non-data record at the head of the kTLS receive queue makes splice
//! fail (`EINVAL` on Linux 6.1, `EIO` on some versions); the driver then
//! reads it with `recvmsg` and reports what it was through
//! [`Session::on_control`].

use std::time::Instant;

use super::{Backend, CloseReason, Errno, Io, Mode, OpKind, Phase, Session};
use crate::buf::Buf;

/// Pipe capacity the splice relay plans with; the driver's pipes hold at
/// least this much (`F_SETPIPE_SZ`).
pub const PIPE_CAP: usize = 256 * 1024;

/// Plaintext buffer kept after offload (data read along with a control
/// record goes through it).
const CONTROL_DATA_CAP: usize = 4096;

/// TLS record content type `handshake`.
const CONTENT_HANDSHAKE: u8 = 0x16;

/// Splice relay state.
#[derive(Debug, Default)]
pub(super) struct KernelRelay {
    /// Bytes sitting in the client→backend pipe.
    up_fill: usize,
    /// Bytes sitting in the backend→client pipe.
    down_fill: usize,
    /// A pipe's content was abandoned (e.g. the backend went away): the
    /// driver must not reuse that pipe.
    up_dirty: bool,
    down_dirty: bool,
    client_readable: bool,
    backend_readable: bool,
    client_writable: bool,
    backend_writable: bool,
    /// A non-data record waits at the head of the client's receive queue.
    control_pending: bool,
    /// The same at the head of the backend's (kTLS backend only).
    backend_control_pending: bool,
}

/// What a control record read by the driver turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// close_notify: the client will send no more data.
    CloseNotify,
    /// Handled in the kernel connection (key update, ignorable alert).
    Handled,
    /// Application data after all (`n` bytes written into the buffer from
    /// [`Session::control_buf`]).
    Data(usize),
    /// Nothing to read yet.
    WouldBlock,
    /// The client's TCP stream ended.
    Eof,
    /// Cannot continue, but may close cleanly (e.g. the kernel cannot
    /// install the client's new keys after a KeyUpdate).
    CloseCleanly(String),
    /// Cannot continue; close now (fatal alert, decrypt error...).
    Fatal(String),
}

impl Session {
    /// Whether this session's connection will move to kernel TLS.
    pub(super) fn offload_possible(&self) -> bool {
        let Some(k) = &self.cfg.ktls else {
            return false;
        };
        match self.negotiated() {
            Some((version, suite)) => k.supports(version, suite),
            None => false,
        }
    }

    /// With TLS to the backend, whether its negotiated suite can go into
    /// the kernel as well (known once its handshake is done).
    pub(super) fn backend_offload_possible(&self) -> bool {
        match (&self.cfg.ktls, self.backend_negotiated()) {
            (Some(k), Some((version, suite))) => k.supports(version, suite),
            _ => false,
        }
    }

    /// How much to read from the client next. While a handshake that may
    /// end in offload runs, reads stop at record boundaries, so the kernel
    /// later starts exactly at a record.
    pub(super) fn client_recv_len(&self) -> usize {
        let spare = self.tls_in.spare_len();
        let aligned =
            self.cfg.ktls.is_some() && matches!(self.phase, Phase::Sniff | Phase::Handshake);
        if !aligned {
            return spare;
        }
        let have = self.tls_in.filled();
        if self.phase == Phase::Sniff && have.first().is_some_and(|&b| b != CONTENT_HANDSHAKE) {
            return spare; // plaintext being sniffed: read freely
        }
        record_remaining(have).min(spare)
    }

    /// In `PendingOffload` with the backend connected: flush what rustls
    /// still has to say, then ask for the offload.
    pub(super) fn offload_when_quiet(&mut self) -> Option<Io> {
        if !self.tls_out.is_empty()
            || !self.overflow.is_empty()
            || !self.idle(OpKind::ClientSend)
            || !self.idle(OpKind::ClientRecv)
        {
            return None;
        }
        if !self.tls_in.is_empty() {
            // Bytes past the handshake already left the socket (should not
            // happen with record-aligned reads): stay in user space.
            self.mode = Mode::User;
            return None;
        }
        if let Some(b) = &self.btls {
            // Double TLS: the backend leg must be quiet too, and every
            // plaintext byte already decrypted delivered (by the user-space
            // record layers) before the keys move.
            if !b.tls_in.is_empty() {
                self.mode = Mode::User;
                return None;
            }
            if !b.handshake_done
                || !b.tls_out.is_empty()
                || !b.overflow_empty()
                || !self.up.is_empty()
                || !self.down.is_empty()
                || !self.idle(OpKind::BackendSend)
                || !self.idle(OpKind::BackendRecv)
                || !self.idle(OpKind::Offload)
            {
                return None;
            }
            return Some(Io::Offload);
        }
        if !self.up.is_empty() {
            if self.idle(OpKind::BackendSend) {
                let (ptr, len) = self.up.filled_raw();
                return Some(Io::BackendSend { ptr, len });
            }
            return None;
        }
        if !self.idle(OpKind::BackendSend) || !self.idle(OpKind::Offload) {
            return None;
        }
        Some(Io::Offload)
    }

    /// Hands the rustls connection to the driver, which moves its keys into
    /// the kernel. Only valid while `Io::Offload` is in flight.
    pub fn take_tls_for_offload(&mut self) -> Option<rustls::server::UnbufferedServerConnection> {
        if self.idle(OpKind::Offload) {
            return None;
        }
        self.tls.take()
    }

    pub(super) fn on_offloaded(&mut self, res: i32) {
        if res < 0 {
            self.finish(CloseReason::KtlsFailed(Errno(-res).to_string()));
            return;
        }
        self.mode = Mode::Kernel;
        self.stats.ktls = true;
        // The record buffers are no longer needed: the kernel holds the
        // bytes now. Keep a small plaintext buffer for the rare data record
        // read together with a control record.
        self.tls_in = Buf::new(0);
        self.tls_out = Buf::new(0);
        // With a kTLS backend, a small buffer for a data record read
        // together with a backend control record.
        self.down = Buf::new(if self.backend_ktls {
            CONTROL_DATA_CAP
        } else {
            0
        });
        if self.up.is_empty() && self.idle(OpKind::BackendSend) {
            self.up = Buf::new(CONTROL_DATA_CAP);
        }
        let k = &mut self.kernel;
        k.client_readable = true;
        k.backend_readable = true;
        k.client_writable = true;
        k.backend_writable = true;
    }

    /// Whether the driver must hold a pipe for `dir` (bytes in it, or a
    /// splice using it in flight).
    pub fn needs_pipe(&self, dir: super::Dir) -> bool {
        match dir {
            super::Dir::Up => {
                self.kernel.up_fill > 0
                    || !self.idle(OpKind::SpliceUpIn)
                    || !self.idle(OpKind::SpliceUpOut)
            }
            super::Dir::Down => {
                self.kernel.down_fill > 0
                    || !self.idle(OpKind::SpliceDownIn)
                    || !self.idle(OpKind::SpliceDownOut)
            }
        }
    }

    /// Whether `dir`'s pipe may hold abandoned bytes (close it, don't reuse).
    pub fn pipe_dirty(&self, dir: super::Dir) -> bool {
        match dir {
            super::Dir::Up => self.kernel.up_dirty || self.kernel.up_fill > 0,
            super::Dir::Down => self.kernel.down_dirty || self.kernel.down_fill > 0,
        }
    }

    /// Buffer for a control read that turns out to be application data.
    pub fn control_buf(&mut self) -> &mut [u8] {
        if self.idle(OpKind::BackendSend) {
            self.up.compact();
        }
        self.up.spare_mut()
    }

    /// Result of an `Io::ClientControl`; completes that operation.
    pub fn on_control(&mut self, ev: ControlEvent, now: Instant) {
        debug_assert!(!self.idle(OpKind::ClientControl));
        self.in_flight &= !OpKind::ClientControl.bit();
        self.kernel.control_pending = false;
        if self.phase == Phase::Done {
            return;
        }
        match ev {
            ControlEvent::CloseNotify => {
                self.client_rd_done = true;
                self.stats.client_close_notify = true;
            }
            ControlEvent::Handled => self.kernel.client_readable = true,
            ControlEvent::Data(n) => {
                self.up.commit(n);
                self.last_activity = now;
                self.kernel.client_readable = true;
            }
            ControlEvent::WouldBlock => self.kernel.client_readable = false,
            ControlEvent::Eof => {
                self.client_tcp_eof = true;
                self.client_rd_done = true;
            }
            ControlEvent::CloseCleanly(msg) => {
                if self.reason.is_none() {
                    self.reason = Some(CloseReason::KtlsClosed(msg));
                }
                self.kernel_close_gracefully();
            }
            ControlEvent::Fatal(msg) => {
                self.finish(CloseReason::KtlsClosed(msg));
                return;
            }
        }
        self.pump(now);
    }

    /// Buffer for a backend control read that turns out to be data.
    pub fn backend_control_buf(&mut self) -> &mut [u8] {
        if self.idle(OpKind::ClientSend) {
            self.down.compact();
        }
        self.down.spare_mut()
    }

    /// Result of an `Io::BackendControl`; completes that operation.
    pub fn on_backend_control(&mut self, ev: ControlEvent, now: Instant) {
        debug_assert!(!self.idle(OpKind::BackendControl));
        self.in_flight &= !OpKind::BackendControl.bit();
        self.kernel.backend_control_pending = false;
        if self.phase == Phase::Done {
            return;
        }
        match ev {
            ControlEvent::CloseNotify | ControlEvent::Eof => self.backend_rd_done = true,
            ControlEvent::Handled => self.kernel.backend_readable = true,
            ControlEvent::Data(n) => {
                self.down.commit(n);
                self.last_activity = now;
                self.kernel.backend_readable = true;
            }
            ControlEvent::WouldBlock => self.kernel.backend_readable = false,
            ControlEvent::CloseCleanly(msg) => {
                if self.reason.is_none() {
                    self.reason = Some(CloseReason::KtlsClosed(msg));
                }
                self.kernel_close_gracefully();
            }
            ControlEvent::Fatal(msg) => {
                self.finish(CloseReason::KtlsClosed(format!("backend: {msg}")));
                return;
            }
        }
        self.pump(now);
    }

    /// The driver could not keep the kernel connection going (e.g. the
    /// confidentiality limit with no rekey support): close cleanly.
    pub fn kernel_error(&mut self, msg: String, now: Instant) {
        if self.phase == Phase::Done {
            return;
        }
        if self.reason.is_none() {
            self.reason = Some(CloseReason::KtlsClosed(msg));
        }
        self.kernel_close_gracefully();
        self.pump(now);
    }

    /// Stop relaying client bytes; deliver what the backend already sent,
    /// then close_notify and close.
    pub(super) fn kernel_close_gracefully(&mut self) {
        if self.backend == Backend::Connected || self.backend == Backend::Connecting {
            self.backend = Backend::Gone;
        }
        if self.kernel.up_fill > 0 {
            self.kernel.up_fill = 0;
            self.kernel.up_dirty = true;
        }
        if self.idle(OpKind::BackendSend) {
            self.up.clear();
        }
        self.client_rd_done = true;
        self.backend_rd_done = true;
    }

    pub(super) fn next_io_kernel(&mut self) -> Option<Io> {
        let cap = PIPE_CAP;
        if self.backend == Backend::Connected {
            // Client → backend.
            if self.kernel.control_pending
                && self.idle(OpKind::ClientControl)
                && self.idle(OpKind::SpliceUpIn)
                && self.idle(OpKind::BackendSend)
            {
                self.up.compact();
                if self.up.spare_len() > 0 {
                    return Some(Io::ClientControl);
                }
            }
            if self.idle(OpKind::BackendSend)
                && !self.up.is_empty()
                && self.kernel.up_fill == 0
                && self.idle(OpKind::SpliceUpOut)
            {
                let (ptr, len) = self.up.filled_raw();
                return Some(Io::BackendSend { ptr, len });
            }
            if !self.client_rd_done
                && !self.kernel.control_pending
                && self.up.is_empty()
                && self.kernel.up_fill < cap
                && self.idle(OpKind::SpliceUpIn)
                && self.idle(OpKind::ClientPollIn)
                && self.idle(OpKind::ClientControl)
            {
                return Some(if self.kernel.client_readable {
                    Io::SpliceIn {
                        dir: super::Dir::Up,
                        len: cap - self.kernel.up_fill,
                    }
                } else {
                    Io::ClientPollIn
                });
            }
            if self.kernel.up_fill > 0
                && self.idle(OpKind::SpliceUpOut)
                && self.idle(OpKind::BackendPollOut)
            {
                return Some(if self.kernel.backend_writable {
                    Io::SpliceOut {
                        dir: super::Dir::Up,
                        len: self.kernel.up_fill,
                    }
                } else {
                    Io::BackendPollOut
                });
            }
            if self.client_rd_done
                && self.kernel.up_fill == 0
                && self.up.is_empty()
                && !self.backend_wr_shut
                && self.idle(OpKind::SpliceUpIn)
                && self.idle(OpKind::SpliceUpOut)
                && self.idle(OpKind::BackendSend)
                && self.idle(OpKind::BackendShutdown)
            {
                self.backend_wr_shut = true;
                return Some(Io::BackendShutdown);
            }
            // Backend → client.
            if self.kernel.backend_control_pending
                && self.idle(OpKind::BackendControl)
                && self.idle(OpKind::SpliceDownIn)
                && self.idle(OpKind::ClientSend)
                && self.kernel.down_fill == 0
            {
                self.down.compact();
                if self.down.spare_len() > 0 {
                    return Some(Io::BackendControl);
                }
            }
            if !self.backend_rd_done
                && !self.kernel.backend_control_pending
                && self.down.is_empty()
                && self.kernel.down_fill < cap
                && self.idle(OpKind::SpliceDownIn)
                && self.idle(OpKind::BackendPollIn)
            {
                return Some(if self.kernel.backend_readable {
                    Io::SpliceIn {
                        dir: super::Dir::Down,
                        len: cap - self.kernel.down_fill,
                    }
                } else {
                    Io::BackendPollIn
                });
            }
        }
        if !self.down.is_empty()
            && self.kernel.down_fill == 0
            && !self.client_wr_shut
            && self.idle(OpKind::SpliceDownOut)
            && self.idle(OpKind::ClientSend)
        {
            let (ptr, len) = self.down.filled_raw();
            return Some(Io::ClientSend { ptr, len });
        }
        if self.kernel.down_fill > 0
            && !self.client_wr_shut
            && self.idle(OpKind::SpliceDownOut)
            && self.idle(OpKind::ClientPollOut)
        {
            return Some(if self.kernel.client_writable {
                Io::SpliceOut {
                    dir: super::Dir::Down,
                    len: self.kernel.down_fill,
                }
            } else {
                Io::ClientPollOut
            });
        }
        if self.backend_rd_done
            && self.kernel.down_fill == 0
            && self.down.is_empty()
            && self.idle(OpKind::ClientSend)
            && !self.close_notify_queued
            && self.idle(OpKind::SpliceDownIn)
            && self.idle(OpKind::SpliceDownOut)
            && self.idle(OpKind::CloseNotify)
            && !self.client_wr_shut
        {
            return Some(Io::CloseNotify);
        }
        if self.close_notify_queued
            && !self.client_wr_shut
            && self.idle(OpKind::CloseNotify)
            && self.idle(OpKind::ClientShutdown)
        {
            self.client_wr_shut = true;
            return Some(Io::ClientShutdown);
        }
        None
    }

    pub(super) fn on_kernel_complete(&mut self, kind: OpKind, res: i32) {
        let cancelled = res == -libc::ECANCELED;
        match kind {
            OpKind::ClientPollIn if res >= 0 => self.kernel.client_readable = true,
            OpKind::BackendPollIn if res >= 0 => self.kernel.backend_readable = true,
            OpKind::ClientPollOut if res >= 0 => self.kernel.client_writable = true,
            OpKind::BackendPollOut if res >= 0 => self.kernel.backend_writable = true,
            OpKind::SpliceUpIn => match res {
                n if n > 0 => self.kernel.up_fill += n as usize,
                0 => {
                    // TCP FIN without close_notify.
                    self.client_tcp_eof = true;
                    self.client_rd_done = true;
                }
                e if e == -libc::EAGAIN => self.kernel.client_readable = false,
                e if e == -libc::EINVAL || e == -libc::EIO => self.kernel.control_pending = true,
                e if e == -libc::EBADMSG => self.finish(CloseReason::KtlsClosed(
                    "record failed to decrypt (EBADMSG)".into(),
                )),
                _ if cancelled => {}
                e => self.client_failed(Errno(-e)),
            },
            OpKind::SpliceUpOut => match res {
                n if n >= 0 => {
                    let n = (n as usize).min(self.kernel.up_fill);
                    self.kernel.up_fill -= n;
                    self.stats.bytes_up += n as u64;
                    self.stats.spliced_up += n as u64;
                }
                e if e == -libc::EAGAIN => self.kernel.backend_writable = false,
                _ if cancelled => {}
                e => self.backend_failed(CloseReason::BackendReset(Errno(-e))),
            },
            OpKind::SpliceDownIn => match res {
                n if n > 0 => self.kernel.down_fill += n as usize,
                0 => self.backend_rd_done = true,
                e if e == -libc::EAGAIN => self.kernel.backend_readable = false,
                e if self.backend_ktls && (e == -libc::EINVAL || e == -libc::EIO) => {
                    self.kernel.backend_control_pending = true
                }
                e if self.backend_ktls && e == -libc::EBADMSG => self.finish(
                    CloseReason::KtlsClosed("a record from the backend failed to decrypt".into()),
                ),
                _ if cancelled => {}
                e => self.backend_failed(CloseReason::BackendReset(Errno(-e))),
            },
            OpKind::SpliceDownOut => match res {
                n if n >= 0 => {
                    let n = (n as usize).min(self.kernel.down_fill);
                    self.kernel.down_fill -= n;
                    self.stats.bytes_down += n as u64;
                    self.stats.spliced_down += n as u64;
                }
                e if e == -libc::EAGAIN => self.kernel.client_writable = false,
                _ if cancelled => {}
                e => self.client_failed(Errno(-e)),
            },
            OpKind::CloseNotify => {
                if res >= 0 {
                    self.close_notify_queued = true;
                } else if !cancelled {
                    self.client_failed(Errno(-res));
                }
            }
            OpKind::ClientControl => {
                // Reported through `on_control`; a raw completion means the
                // driver could not run it.
                self.kernel.control_pending = false;
                if res < 0 && !cancelled {
                    self.client_failed(Errno(-res));
                }
            }
            OpKind::BackendControl => {
                self.kernel.backend_control_pending = false;
                if res < 0 && !cancelled {
                    self.backend_failed(CloseReason::BackendReset(Errno(-res)));
                }
            }
            _ => {}
        }
    }

    /// Kernel relay over when both directions are finished.
    pub(super) fn check_kernel_done(&mut self) {
        let up_done = self.client_rd_done
            && self.kernel.up_fill == 0
            && self.up.is_empty()
            && (self.backend != Backend::Connected || self.backend_wr_shut);
        let down_done = self.close_notify_queued && (self.client_wr_shut || self.client_tcp_eof);
        if up_done && down_done {
            self.finish(CloseReason::Normal);
        }
    }
}

/// Bytes still missing to complete the last (partial) TLS record in `buf`,
/// or 5 (a header) if `buf` ends exactly at a record boundary.
pub(super) fn record_remaining(buf: &[u8]) -> usize {
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        if rest.len() < 5 {
            return 5 - rest.len();
        }
        let len = 5 + u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if rest.len() < len {
            return len - rest.len();
        }
        pos += len;
        if pos == buf.len() {
            return 5;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::record_remaining;

    #[test]
    fn record_boundaries() {
        assert_eq!(record_remaining(&[]), 5);
        assert_eq!(record_remaining(&[0x16, 3]), 3);
        assert_eq!(record_remaining(&[0x16, 3, 1, 0, 10]), 10);
        assert_eq!(record_remaining(&[0x16, 3, 1, 0, 2, 0xaa]), 1);
        assert_eq!(record_remaining(&[0x16, 3, 1, 0, 1, 0xaa]), 5);
        assert_eq!(record_remaining(&[0x16, 3, 1, 0, 1, 0xaa, 0x17, 3]), 3);
    }
}
