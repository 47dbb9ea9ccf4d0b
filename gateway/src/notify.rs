//! systemd `sd_notify` (`READY=1`, `STOPPING=1`, `STATUS=`), spoken
//! directly over `$NOTIFY_SOCKET`: a single datagram, no library needed.

use std::os::unix::net::UnixDatagram;

/// Sends `state` to systemd if the service runs under `Type=notify`.
/// Returns whether a message was sent. Errors are ignored by design: a
/// missing or broken notify socket must not stop the gateway.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        abstract_send(&sock, abstract_name, state)
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(&path))
            .is_ok()
    };
    sent
}

fn abstract_send(sock: &UnixDatagram, name: &[u8], state: &str) -> bool {
    use std::os::linux::net::SocketAddrExt;
    match std::os::unix::net::SocketAddr::from_abstract_name(name) {
        Ok(addr) => sock.send_to_addr(state.as_bytes(), &addr).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_notify_socket() {
        let dir = std::env::temp_dir().join(format!("notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        // SAFETY: no other test in this process reads or writes NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        assert!(notify("READY=1"));
        // SAFETY: as above.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(!notify("READY=1"), "no socket, no message");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
