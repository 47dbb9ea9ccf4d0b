//! Socket options for kernel TLS, and non-data records.
//!
//! All functions take a borrowed descriptor and make one system call; they
//! work on blocking and non-blocking sockets alike (a non-blocking socket
//! may return `WouldBlock`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use ktls_sys::bindings as sys;

use crate::crypto::CryptoInfo;
use crate::KtlsError;

/// `SOL_TLS` from `<linux/socket.h>`.
pub const SOL_TLS: libc::c_int = 282;
/// TLS record content types.
pub const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
pub const CONTENT_ALERT: u8 = 21;
pub const CONTENT_HANDSHAKE: u8 = 22;
pub const CONTENT_APPLICATION_DATA: u8 = 23;

/// A record direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Tx,
    Rx,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Tx => "TLS_TX",
            Direction::Rx => "TLS_RX",
        })
    }
}

fn setsockopt(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    val: &[u8],
) -> io::Result<()> {
    // SAFETY: `val` is a live buffer of `val.len()` bytes for the duration of
    // the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            val.as_ptr() as *const libc::c_void,
            val.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Attaches the `tls` upper-layer protocol to a connected TCP socket.
/// `ENOENT` here means the kernel has no TLS support (module not loaded or
/// `CONFIG_TLS` unset).
pub fn enable_ulp(fd: BorrowedFd<'_>) -> Result<(), KtlsError> {
    setsockopt(fd, libc::SOL_TCP, libc::TCP_ULP, b"tls").map_err(KtlsError::Unavailable)
}

/// Installs one direction's keys.
pub fn set_crypto(fd: BorrowedFd<'_>, dir: Direction, info: &CryptoInfo) -> Result<(), KtlsError> {
    let name = match dir {
        Direction::Tx => sys::TLS_TX,
        Direction::Rx => sys::TLS_RX,
    } as libc::c_int;
    setsockopt(fd, SOL_TLS, name, info.as_bytes()).map_err(|source| KtlsError::CryptoRejected {
        dir,
        cipher: info.cipher(),
        source,
    })
}

/// TLS 1.3: promise the kernel the peer sends no record padding, so it can
/// decrypt straight into the destination (Linux 6.0+). Optional.
pub fn set_rx_expect_no_pad(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: u32 = 1;
    setsockopt(
        fd,
        SOL_TLS,
        sys::TLS_RX_EXPECT_NO_PAD as libc::c_int,
        &one.to_ne_bytes(),
    )
}

/// Sends one record of `content_type` (an alert, a handshake message) on a
/// socket with `TLS_TX` set. Returns the payload bytes sent.
pub fn send_record(fd: BorrowedFd<'_>, content_type: u8, data: &[u8]) -> io::Result<usize> {
    let mut cmsg_buf = [0u64; 4]; // aligned, larger than CMSG_SPACE(1)
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: zeroed msghdr is a valid "empty" value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as usize;
    // SAFETY: `msg` points at `cmsg_buf`, which has room for one header
    // with a 1-byte payload (CMSG_SPACE(1) <= 32 bytes); the pointers the
    // macros return stay inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = SOL_TLS;
        (*c).cmsg_type = sys::TLS_SET_RECORD_TYPE as libc::c_int;
        (*c).cmsg_len = libc::CMSG_LEN(1) as usize;
        *libc::CMSG_DATA(c) = content_type;
    }
    // SAFETY: `msg`, `iov` and `cmsg_buf` are live for the call; `data` is
    // only read.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Receives one record's payload (or part of it) from a socket with
/// `TLS_RX` set. Returns its content type and length; 0 bytes of
/// application data means EOF.
pub fn recv_record(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(u8, usize)> {
    let mut cmsg_buf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: zeroed msghdr is a valid "empty" value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf);
    // SAFETY: `msg` describes `buf` and `cmsg_buf`, both live and writable
    // for the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut content_type = CONTENT_APPLICATION_DATA;
    // SAFETY: the kernel filled `msg.msg_control` up to `msg_controllen`;
    // the CMSG macros only walk inside that range.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_TLS
                && (*c).cmsg_type == sys::TLS_GET_RECORD_TYPE as libc::c_int
            {
                content_type = *libc::CMSG_DATA(c);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((content_type, n as usize))
}
