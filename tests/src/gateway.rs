//! Locating, spawning, probing and stopping the `mcp-tls-gateway` binary.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::pki::Pki;
use crate::util::{free_port, loopback};

/// Path of the gateway binary: `$MCP_TLS_GATEWAY_BIN`, else
/// `target/<profile>/mcp-tls-gateway` next to this test's `deps/` dir.
pub fn gateway_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MCP_TLS_GATEWAY_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "MCP_TLS_GATEWAY_BIN={} does not exist",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-bin>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is not in target/<profile>/deps");
    let bin = profile_dir.join("mcp-tls-gateway");
    if !bin.is_file() {
        let profile = profile_dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let flag = match profile.as_str() {
            "debug" => String::new(),
            "release" => " --release".to_string(),
            other => format!(" --profile {other}"),
        };
        panic!(
            "gateway binary not found at {}: run `cargo build -p mcp-tls-gateway{flag}` first \
             (same profile as the tests), or set MCP_TLS_GATEWAY_BIN",
            bin.display()
        );
    }
    bin
}

/// A running gateway process.  Its stdout+stderr are captured into an
/// in-memory log (printed if the test panics while the handle is alive).
/// Dropping the handle SIGKILLs the process if it is still running.
pub struct Gateway {
    child: Child,
    port: u16,
    args: Vec<String>,
    log: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

enum StartError {
    AddrInUse(String),
    Fatal(String),
}

impl Gateway {
    /// The standard CLI shape used by most tests:
    /// `--listen 127.0.0.1:PORT --cert chain.pem --key key.pem --backend B --workers 2 EXTRA...`
    pub fn start(pki: &Pki, backend: &str, extra: &[&str]) -> Gateway {
        let chain = pki.chain.display().to_string();
        let key = pki.key.display().to_string();
        Gateway::start_with(|port| {
            let mut v: Vec<String> = vec![
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--cert".into(),
                chain.clone(),
                "--key".into(),
                key.clone(),
                "--backend".into(),
                backend.into(),
                "--workers".into(),
                "2".into(),
            ];
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        })
    }

    /// Pick a free port, build the argument list for it, spawn and wait until
    /// ready.  Retries with a new port when the gateway could not bind.
    pub fn start_with(mut make_args: impl FnMut(u16) -> Vec<String>) -> Gateway {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let args = make_args(port);
            match Gateway::spawn_and_wait(port, args) {
                Ok(g) => return g,
                Err(StartError::AddrInUse(log)) => last = log,
                Err(StartError::Fatal(msg)) => panic!("{msg}"),
            }
        }
        panic!("gateway could not bind a free port after 5 attempts; last log:\n{last}");
    }

    fn spawn_and_wait(port: u16, args: Vec<String>) -> Result<Gateway, StartError> {
        let bin = gateway_bin();
        let mut child = Command::new(&bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin.display()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("stdout"));
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("stderr"));
        for mut pipe in [out, err] {
            let log = Arc::clone(&log);
            readers.push(thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => log.lock().unwrap().extend_from_slice(&buf[..n]),
                    }
                }
            }));
        }
        let mut gw = Gateway {
            child,
            port,
            args,
            log,
            readers,
            status: None,
        };

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = gw.try_wait() {
                gw.join_readers();
                let log = gw.log();
                let lower = log.to_lowercase();
                if lower.contains("in use") || lower.contains("os error 98") {
                    return Err(StartError::AddrInUse(log));
                }
                return Err(StartError::Fatal(format!(
                    "gateway {} exited before becoming ready ({status}); args: {:?}\n\
                     (if this binary is stale, rebuild it: cargo build -p mcp-tls-gateway)\n\
                     --- gateway log ---\n{log}",
                    bin.display(),
                    gw.args
                )));
            }
            let (ours, foreign) = gw.listeners().unwrap_or((true, false));
            if foreign {
                // Someone else (e.g. another test's gateway using SO_REUSEPORT)
                // listens on the same port: treat like a bind race and retry.
                gw.kill();
                gw.join_readers();
                return Err(StartError::AddrInUse(format!(
                    "another process also listens on port {port}"
                )));
            }
            if ours && TcpStream::connect_timeout(&gw.addr(), Duration::from_millis(200)).is_ok() {
                return Ok(gw);
            }
            if Instant::now() >= deadline {
                let args = gw.args.clone();
                gw.kill();
                gw.join_readers();
                return Err(StartError::Fatal(format!(
                    "gateway {} did not accept TCP on 127.0.0.1:{port} within 10 s; args: {args:?}\n--- gateway log ---\n{}",
                    bin.display(),
                    gw.log()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// LISTEN sockets on our port: (one is owned by the gateway process,
    /// one is owned by someone else).  Guards against port races, including
    /// two processes sharing a port through SO_REUSEPORT.  `None` if /proc
    /// could not be read.
    fn listeners(&self) -> Option<(bool, bool)> {
        let pid = self.child.id();
        let mut inodes = Vec::new();
        for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
            if let Ok(target) = std::fs::read_link(e.path()) {
                let t = target.to_string_lossy();
                if let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.push(ino.to_string());
                }
            }
        }
        let (mut ours, mut foreign) = (false, false);
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(table) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                // cols[1] = local address:port (hex), cols[3] = state (0A = LISTEN),
                // cols[9] = inode
                if cols.len() < 10 || cols[3] != "0A" {
                    continue;
                }
                let Some(port_hex) = cols[1].rsplit(':').next() else {
                    continue;
                };
                if u16::from_str_radix(port_hex, 16).ok() != Some(self.port) {
                    continue;
                }
                if inodes.iter().any(|i| i == cols[9]) {
                    ours = true;
                } else {
                    foreign = true;
                }
            }
        }
        Some((ours, foreign))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Everything the gateway wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    pub fn signal(&self, sig: libc::c_int) {
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.child.id(),
            std::io::Error::last_os_error()
        );
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Wait for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                self.join_readers();
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill(); // SIGKILL
            self.status = self.child.wait().ok();
        }
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        self.join_readers();
        if thread::panicking() {
            eprintln!(
                "--- gateway log (pid {}, args {:?}, status {:?}) ---\n{}\n--- end of gateway log ---",
                self.child.id(),
                self.args,
                self.status,
                self.log()
            );
        }
    }
}
