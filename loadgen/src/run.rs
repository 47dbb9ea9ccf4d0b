//! Runs a load test: threads, bounds, warm-up, progress, merge.

use crate::client::{conn_task, tls_config, ConnSpec, Shared, Workload};
use crate::report::IntervalLog;
use crate::stats::{new_hist, Latency, Report, ThreadStats};
use hdrhistogram::Histogram;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use thiserror::Error;

/// Why a run could not start.
#[derive(Debug, Error)]
pub enum RunError {
    #[error("bad target URL {0:?}: want http://host:port/path or https://host:port/path")]
    Url(String),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot read CA file {path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("invalid option: {0}")]
    Option(String),
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// `rr`, `bulk`, `handshake` or `idle` (for the report).
    pub mode: String,
    pub workload: Workload,
    pub url: String,
    /// PEM file of trusted roots (TLS).
    pub ca: Option<PathBuf>,
    /// TLS server name to send/verify (default: the URL's host).
    pub server_name: Option<String>,
    pub cipher: String,
    pub resume: bool,
    pub threads: usize,
    pub connections: usize,
    pub rate: Option<f64>,
    pub duration: Duration,
    pub requests: Option<u64>,
    pub warmup: Duration,
    pub req_bytes: usize,
    pub resp_bytes: usize,
    pub sse: bool,
    pub verify: bool,
    pub timeout: Duration,
    pub progress: bool,
    /// Idle: connections opened per second while ramping up.
    pub ramp_rate: f64,
    /// Idle: file written once every connection is established.
    pub ready_file: Option<PathBuf>,
}

impl RunConfig {
    /// Defaults for a mode, against `url`.
    pub fn new(mode: &str, url: &str) -> Self {
        Self {
            mode: mode.into(),
            workload: Workload::RequestResponse,
            url: url.into(),
            ca: None,
            server_name: None,
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
            resume: false,
            threads: 1,
            connections: 1,
            rate: None,
            duration: Duration::from_secs(10),
            requests: None,
            warmup: Duration::ZERO,
            req_bytes: 256,
            resp_bytes: 256,
            sse: false,
            verify: false,
            timeout: Duration::from_secs(10),
            progress: false,
            ramp_rate: 2000.0,
            ready_file: None,
        }
    }
}

/// A finished run.
pub struct Outcome {
    pub report: Report,
    pub hist: Histogram<u64>,
    pub uncorrected: Histogram<u64>,
    pub interval_log: IntervalLog,
}

struct Url {
    tls: bool,
    host: String,
    addr: SocketAddr,
    path: String,
}

fn parse_url(url: &str) -> Result<Url, RunError> {
    let bad = || RunError::Url(url.into());
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad());
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if hostport.is_empty() {
        return Err(bad());
    }
    let with_port = if hostport.ends_with(']') || !hostport.contains(':') {
        format!("{hostport}:{}", if tls { 443 } else { 80 })
    } else {
        hostport.to_string()
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|_| RunError::Resolve(with_port.clone()))?
        .next()
        .ok_or_else(|| RunError::Resolve(with_port.clone()))?;
    let host = match with_port.rfind(':') {
        Some(i) => with_port[..i]
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        None => with_port.clone(),
    };
    Ok(Url {
        tls,
        host,
        addr,
        path: path.to_string(),
    })
}

fn load_roots(path: &PathBuf) -> Result<rustls::RootCertStore, RunError> {
    let err = |message: String| RunError::Ca {
        path: path.clone(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&bytes) {
        let c = c.map_err(|e| err(e.to_string()))?;
        roots.add(c).map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no CERTIFICATE in file".into()));
    }
    Ok(roots)
}

struct Tick {
    index: u64,
    hist: Histogram<u64>,
    requests: u64,
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage struct for the duration of the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raises the soft open-files limit to the hard limit (idle runs need
/// thousands of sockets).
pub fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

/// Runs the load test described by `cfg`.
pub fn run(cfg: &RunConfig) -> Result<Outcome, RunError> {
    if cfg.connections == 0 || cfg.threads == 0 {
        return Err(RunError::Option(
            "--connections and --threads must be at least 1".into(),
        ));
    }
    if cfg.rate.is_some_and(|r| r <= 0.0 || r.is_nan()) {
        return Err(RunError::Option("--rate must be positive".into()));
    }
    raise_nofile();
    let url = parse_url(&cfg.url)?;
    let tls = if url.tls {
        let roots = match &cfg.ca {
            Some(p) => load_roots(p)?,
            None => {
                return Err(RunError::Option(
                    "https:// needs --ca FILE (the trusted root)".into(),
                ))
            }
        };
        let name = cfg.server_name.clone().unwrap_or_else(|| url.host.clone());
        let name = ServerName::try_from(name).map_err(|e| RunError::Tls(e.to_string()))?;
        Some((roots, name))
    } else {
        None
    };
    let threads = cfg.threads.min(cfg.connections);
    let t0 = Instant::now() + Duration::from_millis(20);
    let start_wall = SystemTime::now();
    let measure_start = t0 + cfg.warmup;
    let end = measure_start + cfg.duration;
    let shared = Arc::new(Shared::default());
    let (tx, rx) = mpsc::channel::<Tick>();
    let mut handles = Vec::new();
    for t in 0..threads {
        // One TLS config per thread: its session store (for --resume)
        // is then only touched by that thread.
        let tls = match &tls {
            Some((roots, name)) => Some((
                tls_config(roots.clone(), &cfg.cipher, cfg.resume).map_err(RunError::Tls)?,
                name.clone(),
            )),
            None => None,
        };
        let spec = Arc::new(ConnSpec {
            addr: url.addr,
            host: url.host.clone(),
            path: url.path.clone(),
            tls,
            workload: cfg.workload.clone(),
            req_bytes: cfg.req_bytes,
            resp_bytes: cfg.resp_bytes,
            sse: cfg.sse,
            verify: cfg.verify,
            timeout: cfg.timeout,
            interval: cfg
                .rate
                .map(|r| Duration::from_secs_f64(cfg.connections as f64 / r)),
            t0,
            measure_start,
            end,
            max_requests: cfg.requests,
            connections: cfg.connections,
        });
        let conns: Vec<usize> = (t..cfg.connections).step_by(threads).collect();
        let shared = shared.clone();
        let tx = tx.clone();
        let ramp = matches!(cfg.workload, Workload::Idle { .. })
            .then(|| Duration::from_secs_f64(1.0 / cfg.ramp_rate.max(1.0)));
        let h = std::thread::Builder::new()
            .name(format!("loadgen-{t}"))
            .spawn(move || thread_main(spec, shared, tx, conns, ramp))
            .map_err(RunError::Thread)?;
        handles.push(h);
    }
    drop(tx);

    // Collect interval ticks, print progress, watch the bounds.
    let mut log = IntervalLog::new(start_wall);
    let mut pending: std::collections::BTreeMap<u64, (usize, Histogram<u64>, u64)> =
        Default::default();
    let tty = std::io::stderr().is_terminal();
    let mut cpu_at_start = None;
    let mut open_at_end = 0;
    let mut ready_written = false;
    let mut last_line = Instant::now();
    loop {
        let now = Instant::now();
        if cpu_at_start.is_none() && now >= measure_start {
            cpu_at_start = Some(cpu_seconds());
        }
        if now < end {
            open_at_end = shared.open.load(Ordering::Relaxed);
        }
        if !ready_written {
            if let Some(path) = &cfg.ready_file {
                if shared.established.load(Ordering::Relaxed) >= cfg.connections {
                    std::fs::write(path, format!("{}\n", cfg.connections)).map_err(|source| {
                        RunError::Write {
                            path: path.clone(),
                            source,
                        }
                    })?;
                    ready_written = true;
                }
            }
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(tick) => {
                let e = pending
                    .entry(tick.index)
                    .or_insert_with(|| (0, new_hist(), 0));
                e.0 += 1;
                let _ = e.1.add(&tick.hist);
                e.2 += tick.requests;
                if e.0 == threads {
                    if let Some((_, h, n)) = pending.remove(&tick.index) {
                        let off = Duration::from_secs(tick.index);
                        if cfg.progress && (tty || last_line.elapsed() >= Duration::from_secs(10)) {
                            last_line = Instant::now();
                            let l = Latency::from_hist(&h);
                            let phase = if t0 + off < measure_start {
                                " (warm-up)"
                            } else {
                                ""
                            };
                            let line = format!(
                                "[{:>4}s] {:>9} req/s  p50 {:>8.1}µs  p99 {:>8.1}µs  max {:>9.1}µs  open {}{}",
                                tick.index + 1,
                                n,
                                l.p50,
                                l.p99,
                                l.max,
                                shared.open.load(Ordering::Relaxed),
                                phase
                            );
                            let mut err = std::io::stderr().lock();
                            if tty {
                                let _ = write!(err, "\r\x1b[2K{line}");
                            } else {
                                let _ = writeln!(err, "{line}");
                            }
                            let _ = err.flush();
                        }
                        if !h.is_empty() {
                            log.push(off, Duration::from_secs(1), h);
                        }
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for (index, (_, h, _)) in pending {
        if !h.is_empty() {
            log.push(Duration::from_secs(index), Duration::from_secs(1), h);
        }
    }
    if cfg.progress && tty {
        eprintln!();
    }
    let stopped = Instant::now().min(end);
    let cpu = cpu_seconds() - cpu_at_start.unwrap_or(0.0);
    let mut total = ThreadStats::new();
    for h in handles {
        if let Ok(s) = h.join() {
            total.merge(&s);
        }
    }
    let window = stopped.saturating_duration_since(measure_start);
    let mut report = Report {
        mode: cfg.mode.clone(),
        target: cfg.url.clone(),
        tls: url.tls,
        threads,
        connections: cfg.connections,
        rate: cfg.rate,
        req_bytes: cfg.req_bytes,
        resp_bytes: cfg.resp_bytes,
        sse: cfg.sse,
        verify: cfg.verify,
        warmup_s: cfg.warmup.as_secs_f64(),
        client_cpu_s: cpu,
        ..Default::default()
    };
    report.fill(&total, window, cfg.rate.is_some());
    report.established = shared.established.load(Ordering::Relaxed) as u64;
    report.open_at_end = open_at_end as u64;
    Ok(Outcome {
        report,
        hist: total.hist,
        uncorrected: total.uncorrected,
        interval_log: log,
    })
}

fn thread_main(
    spec: Arc<ConnSpec>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Tick>,
    conns: Vec<usize>,
    ramp: Option<Duration>,
) -> ThreadStats {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot build runtime: {e}");
            return ThreadStats::new();
        }
    };
    let stats = Rc::new(RefCell::new(ThreadStats::new()));
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let mut tasks = Vec::new();
        for c in conns {
            let spec = spec.clone();
            let shared = shared.clone();
            let stats = stats.clone();
            let start = ramp.map(|gap| spec.t0 + gap * c as u32);
            tasks.push(tokio::task::spawn_local(async move {
                if let Some(at) = start {
                    if at >= spec.end {
                        return;
                    }
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                }
                conn_task(c, spec, shared, stats).await;
            }));
        }
        let ticker = {
            let stats = stats.clone();
            let tx = tx.clone();
            let t0 = spec.t0;
            tokio::task::spawn_local(async move {
                let mut k = 0u64;
                loop {
                    let at = t0 + Duration::from_secs(k + 1);
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                    let (hist, requests) = stats.borrow_mut().take_interval();
                    if tx
                        .send(Tick {
                            index: k,
                            hist,
                            requests,
                        })
                        .is_err()
                    {
                        return;
                    }
                    k += 1;
                }
            })
        };
        for t in tasks {
            let _ = t.await;
        }
        ticker.abort();
        // The last (partial) interval.
        let (hist, requests) = stats.borrow_mut().take_interval();
        let index = Instant::now().saturating_duration_since(spec.t0).as_secs();
        let _ = tx.send(Tick {
            index,
            hist,
            requests,
        });
    });
    drop(local);
    match Rc::try_unwrap(stats) {
        Ok(cell) => cell.into_inner(),
        Err(rc) => rc.borrow().clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Read;
    use std::net::TcpListener;

    fn quick(url: &str) -> RunConfig {
        let mut cfg = RunConfig::new("rr", url);
        cfg.threads = 1;
        cfg.connections = 2;
        cfg.requests = Some(50);
        cfg.duration = Duration::from_secs(20);
        cfg.verify = true;
        cfg.timeout = Duration::from_secs(5);
        cfg
    }

    #[test]
    fn verified_run_against_the_backend() {
        let b = crate::backend::spawn("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        for sse in [false, true] {
            let mut cfg = quick(&format!("http://{}/mcp", b.addr));
            cfg.sse = sse;
            cfg.resp_bytes = 5000;
            let out = run(&cfg).unwrap();
            assert_eq!(out.report.errors_total, 0, "{:?}", out.report.errors);
            assert_eq!(out.report.requests, 50);
            assert_eq!(out.report.latency_us.count, 50);
        }
    }

    /// A server that answers every request with the right body but one
    /// byte flipped (`flip = false`: the right body).
    fn tiny_server(flip: bool) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // Wait for a whole request (head + Content-Length body).
                        let parsed = {
                            let mut h = [httparse::EMPTY_HEADER; 32];
                            let mut r = httparse::Request::new(&mut h);
                            match r.parse(&buf) {
                                Ok(httparse::Status::Complete(n)) => {
                                    let len = r
                                        .headers
                                        .iter()
                                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                                        .and_then(|h| {
                                            std::str::from_utf8(h.value).ok()?.parse::<usize>().ok()
                                        })
                                        .unwrap_or(0);
                                    let size = r
                                        .headers
                                        .iter()
                                        .find(|h| h.name.eq_ignore_ascii_case("x-resp-bytes"))
                                        .and_then(|h| {
                                            std::str::from_utf8(h.value).ok()?.parse::<usize>().ok()
                                        })
                                        .unwrap_or(64);
                                    (buf.len() >= n + len).then_some((n + len, size, n))
                                }
                                _ => None,
                            }
                        };
                        if let Some((total, size, head)) = parsed {
                            let id = crate::body::find_id(&buf[head..total]).unwrap_or(0);
                            buf.drain(..total);
                            let mut body = crate::body::response(id, size);
                            if flip {
                                let at = body.len() / 2;
                                body[at] ^= 0x20;
                            }
                            let mut out = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            out.extend_from_slice(&body);
                            if s.write_all(&out).is_err() {
                                return;
                            }
                            continue;
                        }
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn verify_catches_one_corrupted_byte() {
        let good = run(&quick(&format!("http://{}/mcp", tiny_server(false)))).unwrap();
        assert_eq!(good.report.errors_total, 0, "{:?}", good.report.errors);
        assert_eq!(good.report.requests, 50);

        let bad = run(&quick(&format!("http://{}/mcp", tiny_server(true)))).unwrap();
        assert_eq!(bad.report.requests, 50);
        // Every response is caught, warm-up ones included.
        let all = bad.report.requests + bad.report.warmup_requests;
        assert_eq!(
            bad.report.errors.get("verify_mismatch"),
            Some(&all),
            "{:?}",
            bad.report.errors
        );
        assert_eq!(bad.report.errors_total, all);

        // Without --verify the corruption goes unnoticed (framing is intact).
        let mut cfg = quick(&format!("http://{}/mcp", tiny_server(true)));
        cfg.verify = false;
        let blind = run(&cfg).unwrap();
        assert_eq!(blind.report.errors_total, 0);
    }

    #[test]
    fn urls() {
        let u = parse_url("https://127.0.0.1:8443/mcp").unwrap();
        assert!(u.tls);
        assert_eq!(u.host, "127.0.0.1");
        assert_eq!(u.addr.port(), 8443);
        assert_eq!(u.path, "/mcp");
        let u = parse_url("http://localhost:9").unwrap();
        assert_eq!(u.path, "/");
        assert_eq!(u.host, "localhost");
        assert!(parse_url("ftp://x").is_err());
    }
}
