//! The plaintext ceiling: a loopback TCP proxy that moves bytes with
//! `splice(2)` through a pipe (no user-space copy, no TLS). One thread per
//! direction per connection; fine for the few dozen connections of the
//! small-request scenario it is used in.

use anyhow::{Context, Result};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

fn pipe() -> std::io::Result<(i32, i32)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((fds[0], fds[1]))
}

fn pump(from: TcpStream, to: TcpStream) {
    let Ok((r, w)) = pipe() else { return };
    let (fi, ti) = (from.as_raw_fd(), to.as_raw_fd());
    // No SPLICE_F_MORE: it corks the socket (200 ms delays on small writes).
    let flags = libc::SPLICE_F_MOVE;
    loop {
        // SAFETY: all four descriptors are open for the whole loop (we own
        // `from`, `to` and the pipe); null offsets are valid for sockets
        // and pipes.
        let n = unsafe {
            libc::splice(
                fi,
                std::ptr::null_mut(),
                w,
                std::ptr::null_mut(),
                1 << 16,
                flags,
            )
        };
        if n <= 0 {
            break;
        }
        let mut left = n as usize;
        while left > 0 {
            // SAFETY: as above.
            let m = unsafe {
                libc::splice(
                    r,
                    std::ptr::null_mut(),
                    ti,
                    std::ptr::null_mut(),
                    left,
                    flags,
                )
            };
            if m <= 0 {
                left = usize::MAX;
                break;
            }
            left -= m as usize;
        }
        if left == usize::MAX {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
    // SAFETY: closing the pipe ends we created and nobody else holds.
    unsafe {
        libc::close(r);
        libc::close(w);
    }
}

/// Serves until killed.
pub fn serve(listen: SocketAddr, backend: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        let Ok(b) = TcpStream::connect(backend) else {
            continue;
        };
        let _ = c.set_nodelay(true);
        let _ = b.set_nodelay(true);
        let (Ok(c2), Ok(b2)) = (c.try_clone(), b.try_clone()) else {
            continue;
        };
        std::thread::spawn(move || pump(c, b));
        std::thread::spawn(move || pump(b2, c2));
    }
    Ok(())
}
