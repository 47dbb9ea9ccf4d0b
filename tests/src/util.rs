//! Small std-only helpers: temp dirs, ports, deterministic payloads,
//! bounded waiting and bounded external processes.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

/// A directory under the system temp dir, removed (recursively) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        for attempt in 0..100 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "{prefix}-{}-{n}-{nanos}-{attempt}",
                std::process::id()
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create temp dir {}: {e}", path.display()),
            }
        }
        panic!("cannot create a unique temp dir with prefix {prefix}");
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A loopback TCP port that was free a moment ago (bind 127.0.0.1:0, read
/// the port, drop).  Callers that hand it to another process must retry on
/// a bind race (see [`crate::Gateway::start_with`]).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Raise RLIMIT_NOFILE (soft) to at least `want` (capped at the hard limit).
/// Returns the resulting soft limit.
pub fn raise_nofile_limit(want: libc::rlim_t) -> libc::rlim_t {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            panic!("getrlimit: {}", io::Error::last_os_error());
        }
        if rl.rlim_cur < want {
            rl.rlim_cur = if rl.rlim_max == libc::RLIM_INFINITY {
                want
            } else {
                want.min(rl.rlim_max)
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                panic!("setrlimit: {}", io::Error::last_os_error());
            }
        }
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            panic!("getrlimit: {}", io::Error::last_os_error());
        }
    }
    rl.rlim_cur
}

/// Poll `cond` every 10 ms until it is true or `timeout` elapses.
/// Returns whether it became true.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A deterministic pseudo-random byte stream of a given length.
///
/// Bytes are generated in fixed 64 KiB blocks from a seeded `StdRng`, so the
/// stream content does not depend on how the reader chunks it.
pub struct SeededStream {
    rng: StdRng,
    block: Vec<u8>,
    pos: usize,
    remaining: u64,
}

const BLOCK: usize = 64 * 1024;

impl SeededStream {
    pub fn new(seed: u64, len: u64) -> SeededStream {
        SeededStream {
            rng: StdRng::seed_from_u64(seed),
            block: vec![0; BLOCK],
            pos: BLOCK,
            remaining: len,
        }
    }

    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Fill `buf` with the next bytes; returns 0 only at the end of the stream
    /// (or if `buf` is empty).
    pub fn fill(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() && self.remaining > 0 {
            if self.pos == BLOCK {
                self.rng.fill_bytes(&mut self.block);
                self.pos = 0;
            }
            let take = (buf.len() - n)
                .min(BLOCK - self.pos)
                .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
            buf[n..n + take].copy_from_slice(&self.block[self.pos..self.pos + take]);
            self.pos += take;
            n += take;
            self.remaining -= take as u64;
        }
        n
    }
}

impl Read for SeededStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(self.fill(buf))
    }
}

/// The whole seeded stream as a vector (for small and medium sizes).
pub fn seeded_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    let mut s = SeededStream::new(seed, len as u64);
    let n = s.fill(&mut v);
    assert_eq!(n, len);
    v
}

/// SHA-256 of the seeded stream without materialising it.
pub fn stream_sha256(seed: u64, len: u64) -> [u8; 32] {
    let mut s = SeededStream::new(seed, len);
    let mut h = Sha256::new();
    let mut buf = vec![0; BLOCK];
    loop {
        let n = s.fill(&mut buf);
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().into()
}

/// Fail (not skip) if an external tool is missing.
pub fn require_tool(tool: &str) {
    match Command::new(tool)
        .arg(if tool == "openssl" {
            "version"
        } else {
            "--version"
        })
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
            "`{tool}` is required by this test but is not installed; install it \
             (e.g. `apt-get install -y {tool}`; the test runner script does this)"
        ),
        Err(e) => panic!("cannot run `{tool}`: {e}"),
    }
}

/// Result of a bounded external command.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl CmdOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Run `cmd` with `stdin` bytes fed to it (stdin is then closed unless
/// `keep_stdin_open`), capture stdout/stderr, and kill it if it has not
/// exited after `timeout` (then panic with everything captured so far).
pub fn run_with_timeout(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    keep_stdin_open: bool,
    timeout: Duration,
) -> CmdOutput {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {desc}: {e}"));
    let mut child_stdin = child.stdin.take();
    if let (Some(data), Some(pipe)) = (stdin, child_stdin.as_mut()) {
        // Small inputs only: fits in the pipe buffer.
        let _ = pipe.write_all(data);
        let _ = pipe.flush();
    }
    let mut held_stdin = if keep_stdin_open { child_stdin } else { None };
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(s) => break Some(s),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    held_stdin.take();
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    match status {
        Some(status) => CmdOutput {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "{desc} did not exit within {timeout:?}; killed.\n--- stdout ---\n{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_stream_is_chunking_independent() {
        let whole = seeded_bytes(7, 200_001);
        let mut s = SeededStream::new(7, 200_001);
        let mut pieces = Vec::new();
        let mut sizes = [1usize, 3, 4095, 65536, 70000, 17].iter().cycle();
        loop {
            let mut buf = vec![0; *sizes.next().unwrap()];
            let n = s.fill(&mut buf);
            if n == 0 {
                break;
            }
            pieces.extend_from_slice(&buf[..n]);
        }
        assert_eq!(whole, pieces);
        assert_eq!(sha256(&whole), stream_sha256(7, 200_001));
        assert_ne!(seeded_bytes(8, 64), seeded_bytes(7, 64));
    }
}
