//! Per-session audit records as JSON lines, written off the data path.
//!
//! Each worker owns an [`AuditSink`]: [`AuditSink::push`] serializes a
//! record into the sink's own buffer (no lock, no syscall) and
//! [`AuditSink::flush`], called on the worker's periodic tick, hands the
//! whole buffer to the "audit-writer" thread with one channel send. The
//! writer appends buffers to the destination, reopens the file by path when
//! asked (logrotate's `create` mode, on SIGUSR1), and on shutdown
//! [`AuditWriter::finish`] drains everything and fsyncs.
//!
//! Workers never block on the writer: the channel is unbounded, but a sink
//! drops (and counts) a buffer instead of queueing it when more than
//! [`MAX_PENDING_BYTES`] are already waiting to be written.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A sink flushes by itself once its buffer grows past this.
pub const SINK_FLUSH_BYTES: usize = 64 * 1024;
/// Bytes queued for the writer beyond which sinks drop buffers.
pub const MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;
/// Mode of a newly created audit file (before umask).
pub const FILE_MODE: u32 = 0o640;
/// How often an idle writer checks for a reopen request.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// At most one write-error log line per this interval.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Buffers kept for reuse, and the largest capacity worth keeping.
const POOL_MAX_BUFFERS: usize = 64;
const POOL_MAX_CAPACITY: usize = 4 * SINK_FLUSH_BYTES;

/// One session, as one JSON line.
#[derive(serde::Serialize, Clone, Debug, PartialEq)]
pub struct AuditRecord {
    /// Session id, unique within the process.
    pub id: String,
    /// Listener name or address.
    pub listener: String,
    /// Accept time, RFC 3339 UTC with milliseconds (see [`format_time`]).
    pub start: String,
    /// Close time, same format.
    pub end: String,
    /// `end - start`.
    pub duration_ms: u64,
    /// Client address (`ip:port`).
    pub client: String,
    /// Backend address, if one was connected.
    pub backend: Option<String>,
    /// TLS server name the client sent.
    pub sni: Option<String>,
    /// Negotiated ALPN protocol.
    pub alpn: Option<String>,
    /// e.g. "TLSv1.3".
    pub tls_version: Option<String>,
    /// e.g. "TLS13_AES_128_GCM_SHA256".
    pub cipher_suite: Option<String>,
    /// Key exchange group, e.g. "X25519MLKEM768".
    pub kx_group: Option<String>,
    /// The TLS session was resumed.
    pub resumed: bool,
    /// Data path: "ktls", "userspace" or "none".
    pub path: &'static str,
    /// Client certificate identity, if one was presented.
    pub client_identity: Option<String>,
    /// Plaintext bytes client → backend.
    pub bytes_up: u64,
    /// Plaintext bytes backend → client.
    pub bytes_down: u64,
    /// Accept to handshake completion, if the handshake completed.
    pub handshake_ms: Option<f64>,
    /// Why the session ended.
    pub close_reason: String,
}

/// Where audit records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditDest {
    /// Append to this file (created 0640 if missing; reopened on request).
    File(PathBuf),
    /// Standard output (e.g. under systemd, to the journal).
    Stdout,
}

/// Why the audit log could not be set up or finished.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The audit file could not be opened for appending.
    #[error("audit log {path}: cannot open for appending: {source}")]
    Open {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The writer thread could not be started.
    #[error("audit log: cannot start the audit-writer thread: {0}")]
    Spawn(std::io::Error),
    /// The final fsync/flush failed.
    #[error("audit log {dest}: final sync failed: {source}")]
    Sync {
        /// The file (or "stdout").
        dest: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The writer thread panicked.
    #[error("audit log: the audit-writer thread panicked")]
    WriterPanicked,
}

/// Counters of the audit log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Records written to the destination.
    pub records_written: u64,
    /// Failed writes (and failed reopens).
    pub write_errors: u64,
    /// Records lost: over the memory cap, unserializable, or in a failed write.
    pub records_dropped: u64,
}

/// State shared by the log handle, the sinks and the writer thread.
#[derive(Default)]
struct Shared {
    records_written: AtomicU64,
    write_errors: AtomicU64,
    records_dropped: AtomicU64,
    pending_bytes: AtomicUsize,
    reopen: Arc<AtomicBool>,
    pool: Mutex<Vec<Vec<u8>>>,
}

impl Shared {
    fn stats(&self) -> AuditStats {
        AuditStats {
            records_written: self.records_written.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
            records_dropped: self.records_dropped.load(Ordering::Relaxed),
        }
    }
}

/// A full buffer on its way to the writer.
struct Batch {
    bytes: Vec<u8>,
    records: u64,
}

/// Handle to an open audit log; hands out per-worker sinks. Drop every
/// clone (and every sink) before [`AuditWriter::finish`] can return.
#[derive(Clone)]
pub struct AuditLog {
    tx: Sender<Batch>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("stats", &self.shared.stats())
            .finish()
    }
}

/// The writer thread; [`AuditWriter::finish`] waits for it.
pub struct AuditWriter {
    thread: JoinHandle<Result<(), AuditError>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter")
            .field("stats", &self.shared.stats())
            .finish()
    }
}

impl AuditLog {
    /// Opens the destination (a file is opened `O_APPEND|O_CREAT`, mode
    /// 0640) and starts the "audit-writer" thread.
    pub fn open(dest: AuditDest) -> Result<(AuditLog, AuditWriter), AuditError> {
        let out = match &dest {
            AuditDest::File(path) => Output::File {
                file: Some(open_append(path)?),
                path: path.clone(),
            },
            AuditDest::Stdout => Output::Stdout,
        };
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer_loop(rx, out, &writer_shared))
            .map_err(AuditError::Spawn)?;
        Ok((
            AuditLog {
                tx,
                shared: shared.clone(),
            },
            AuditWriter { thread, shared },
        ))
    }

    /// A sink for one worker thread.
    pub fn worker_sink(&self) -> AuditSink {
        AuditSink {
            buf: Vec::new(),
            records: 0,
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }

    /// The flag that asks the writer to reopen the file by path before its
    /// next write (and within ~250 ms when idle). Async-signal-safe to set,
    /// e.g. `signal_hook::flag::register(SIGUSR1, log.reopen_handle())`.
    pub fn reopen_handle(&self) -> Arc<AtomicBool> {
        self.shared.reopen.clone()
    }

    /// Asks the writer to reopen the file (same as setting the flag).
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
    }

    /// Records written so far.
    pub fn records_written(&self) -> u64 {
        self.shared.records_written.load(Ordering::Relaxed)
    }

    /// Failed writes and reopens so far.
    pub fn write_errors(&self) -> u64 {
        self.shared.write_errors.load(Ordering::Relaxed)
    }

    /// Records lost so far.
    pub fn records_dropped(&self) -> u64 {
        self.shared.records_dropped.load(Ordering::Relaxed)
    }

    /// All counters.
    pub fn stats(&self) -> AuditStats {
        self.shared.stats()
    }
}

impl AuditWriter {
    /// Waits until every [`AuditLog`] clone and [`AuditSink`] is dropped
    /// (sinks flush on drop) and every buffer is written, then fsyncs the
    /// file (or flushes stdout) and returns the final counters. Blocks for
    /// as long as any sender is alive.
    pub fn finish(self) -> Result<AuditStats, AuditError> {
        match self.thread.join() {
            Ok(result) => result.map(|()| self.shared.stats()),
            Err(_) => Err(AuditError::WriterPanicked),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> AuditStats {
        self.shared.stats()
    }
}

/// One worker's buffer of serialized records. Not shared between threads.
pub struct AuditSink {
    buf: Vec<u8>,
    records: u64,
    tx: Sender<Batch>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink")
            .field("buffered_bytes", &self.buf.len())
            .field("buffered_records", &self.records)
            .finish()
    }
}

impl AuditSink {
    /// Appends one record as a JSON line to the sink's buffer; flushes when
    /// the buffer exceeds [`SINK_FLUSH_BYTES`].
    pub fn push(&mut self, record: &AuditRecord) {
        let before = self.buf.len();
        match serde_json::to_writer(&mut self.buf, record) {
            Ok(()) => {
                self.buf.push(b'\n');
                self.records += 1;
            }
            Err(_) => {
                self.buf.truncate(before);
                self.shared.records_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.buf.len() > SINK_FLUSH_BYTES {
            self.flush();
        }
    }

    /// Hands the buffered records to the writer (one channel send) and
    /// takes a recycled buffer. Never blocks on I/O.
    pub fn flush(&mut self) {
        if self.records == 0 {
            self.buf.clear();
            return;
        }
        let len = self.buf.len();
        let pending = self.shared.pending_bytes.fetch_add(len, Ordering::AcqRel);
        if pending + len > MAX_PENDING_BYTES {
            self.shared.pending_bytes.fetch_sub(len, Ordering::AcqRel);
            self.drop_buffered();
            return;
        }
        let next = self.recycled();
        let bytes = std::mem::replace(&mut self.buf, next);
        let batch = Batch {
            bytes,
            records: std::mem::take(&mut self.records),
        };
        if let Err(mpsc::SendError(batch)) = self.tx.send(batch) {
            // The writer is gone (it panicked): count the loss.
            self.shared.pending_bytes.fetch_sub(len, Ordering::AcqRel);
            self.shared
                .records_dropped
                .fetch_add(batch.records, Ordering::Relaxed);
        }
    }

    /// Records pushed but not yet flushed.
    pub fn buffered_records(&self) -> u64 {
        self.records
    }

    fn drop_buffered(&mut self) {
        self.shared
            .records_dropped
            .fetch_add(std::mem::take(&mut self.records), Ordering::Relaxed);
        self.buf.clear();
    }

    fn recycled(&self) -> Vec<u8> {
        // try_lock: a worker never waits for the pool.
        self.shared
            .pool
            .try_lock()
            .ok()
            .and_then(|mut pool| pool.pop())
            .unwrap_or_default()
    }
}

impl Drop for AuditSink {
    fn drop(&mut self) {
        self.flush();
    }
}

enum Output {
    File { file: Option<File>, path: PathBuf },
    Stdout,
}

impl Output {
    fn name(&self) -> String {
        match self {
            Output::File { path, .. } => path.display().to_string(),
            Output::Stdout => "stdout".into(),
        }
    }

    /// Closes the file and opens it again by path (after a rename).
    fn reopen(&mut self) -> std::io::Result<()> {
        if let Output::File { file, path } = self {
            if let Some(old) = file.take() {
                // Best effort: what was written stays in the renamed file.
                let _ = old.sync_data();
            }
            *file = Some(open_append_io(path)?);
        }
        Ok(())
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Output::File { file, path } => {
                if file.is_none() {
                    *file = Some(open_append_io(path)?);
                }
                match file {
                    Some(f) => f.write_all(bytes),
                    None => Ok(()),
                }
            }
            Output::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        match self {
            Output::File { file: Some(f), .. } => f.sync_all(),
            Output::File { file: None, .. } => Ok(()),
            Output::Stdout => std::io::stdout().lock().flush(),
        }
    }
}

fn open_append_io(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)
}

fn open_append(path: &Path) -> Result<File, AuditError> {
    open_append_io(path).map_err(|source| AuditError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Logs at most one error line per [`ERROR_LOG_INTERVAL`].
struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    fn error(&mut self, dest: &str, what: &str, err: &std::io::Error) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < ERROR_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        self.last = Some(now);
        let suppressed = std::mem::take(&mut self.suppressed);
        tracing::error!(audit_log = dest, error = %err, suppressed, "audit log: {what} failed");
    }
}

fn writer_loop(rx: Receiver<Batch>, mut out: Output, shared: &Shared) -> Result<(), AuditError> {
    let mut errors = RateLimited {
        last: None,
        suppressed: 0,
    };
    let check_reopen = |out: &mut Output, errors: &mut RateLimited| {
        if shared.reopen.swap(false, Ordering::AcqRel) {
            if let Err(e) = out.reopen() {
                shared.write_errors.fetch_add(1, Ordering::Relaxed);
                errors.error(&out.name(), "reopen", &e);
            }
        }
    };
    loop {
        let batch = match rx.recv_timeout(IDLE_POLL) {
            Ok(batch) => batch,
            Err(RecvTimeoutError::Timeout) => {
                check_reopen(&mut out, &mut errors);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        check_reopen(&mut out, &mut errors);
        match out.write_all(&batch.bytes) {
            Ok(()) => {
                shared
                    .records_written
                    .fetch_add(batch.records, Ordering::Relaxed);
            }
            Err(e) => {
                shared.write_errors.fetch_add(1, Ordering::Relaxed);
                shared
                    .records_dropped
                    .fetch_add(batch.records, Ordering::Relaxed);
                errors.error(&out.name(), "write", &e);
            }
        }
        shared
            .pending_bytes
            .fetch_sub(batch.bytes.len(), Ordering::AcqRel);
        recycle(shared, batch.bytes);
    }
    out.sync().map_err(|source| AuditError::Sync {
        dest: out.name(),
        source,
    })
}

fn recycle(shared: &Shared, mut bytes: Vec<u8>) {
    if bytes.capacity() > POOL_MAX_CAPACITY {
        return;
    }
    bytes.clear();
    if let Ok(mut pool) = shared.pool.lock() {
        if pool.len() < POOL_MAX_BUFFERS {
            pool.push(bytes);
        }
    }
}

/// Formats a time as RFC 3339 UTC with milliseconds:
/// `2024-05-01T12:34:56.789Z` (`humantime`). Times before 1970 print as
/// the epoch.
pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t.max(UNIX_EPOCH)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "audit-test-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn record(id: &str) -> AuditRecord {
        AuditRecord {
            id: id.into(),
            listener: "public".into(),
            start: "2024-05-01T12:00:00.000Z".into(),
            end: "2024-05-01T12:00:01.500Z".into(),
            duration_ms: 1500,
            client: "192.0.2.1:50000".into(),
            backend: Some("127.0.0.1:9000".into()),
            sni: Some("mcp.example.com".into()),
            alpn: None,
            tls_version: Some("TLSv1.3".into()),
            cipher_suite: Some("TLS13_AES_128_GCM_SHA256".into()),
            kx_group: Some("X25519".into()),
            resumed: false,
            path: "userspace",
            client_identity: None,
            bytes_up: 123,
            bytes_down: 4567,
            handshake_ms: Some(2.5),
            close_reason: "client_eof".into(),
        }
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn ids(path: &Path) -> Vec<String> {
        lines(path)
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect()
    }

    fn wait_written(log: &AuditLog, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.records_written() < n {
            assert!(
                Instant::now() < deadline,
                "writer did not write {n} records"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn records_round_trip_as_json_lines() {
        let d = TempDir::new("rt");
        let path = d.0.join("audit.log");
        let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).unwrap();
        let mut sink = log.worker_sink();
        let mut second = record("s-2");
        second.alpn = Some("h2".into());
        second.resumed = true;
        second.path = "ktls";
        second.backend = None;
        second.handshake_ms = None;
        second.client_identity = Some("CN=agent".into());
        sink.push(&record("s-1"));
        sink.push(&second);
        assert_eq!(sink.buffered_records(), 2);
        // Nothing reaches the file before a flush.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(std::fs::read(&path).unwrap().len(), 0);
        drop(sink);
        drop(log);
        let stats = writer.finish().unwrap();
        assert_eq!(stats.records_written, 2);
        assert_eq!(stats.records_dropped, 0);

        let v = lines(&path);
        assert_eq!(v.len(), 2);
        let a = &v[0];
        assert_eq!(a["id"], "s-1");
        assert_eq!(a["listener"], "public");
        assert_eq!(a["start"], "2024-05-01T12:00:00.000Z");
        assert_eq!(a["end"], "2024-05-01T12:00:01.500Z");
        assert_eq!(a["duration_ms"], 1500);
        assert_eq!(a["client"], "192.0.2.1:50000");
        assert_eq!(a["backend"], "127.0.0.1:9000");
        assert_eq!(a["sni"], "mcp.example.com");
        assert!(a["alpn"].is_null());
        assert_eq!(a["tls_version"], "TLSv1.3");
        assert_eq!(a["cipher_suite"], "TLS13_AES_128_GCM_SHA256");
        assert_eq!(a["kx_group"], "X25519");
        assert_eq!(a["resumed"], false);
        assert_eq!(a["path"], "userspace");
        assert!(a["client_identity"].is_null());
        assert_eq!(a["bytes_up"], 123);
        assert_eq!(a["bytes_down"], 4567);
        assert_eq!(a["handshake_ms"], 2.5);
        assert_eq!(a["close_reason"], "client_eof");
        assert_eq!(a.as_object().unwrap().len(), 19);
        let b = &v[1];
        assert_eq!(b["id"], "s-2");
        assert_eq!(b["alpn"], "h2");
        assert_eq!(b["resumed"], true);
        assert_eq!(b["path"], "ktls");
        assert!(b["backend"].is_null());
        assert!(b["handshake_ms"].is_null());
        assert_eq!(b["client_identity"], "CN=agent");
    }

    #[test]
    fn file_is_created_0640_and_appended_to() {
        use std::os::unix::fs::PermissionsExt;
        let d = TempDir::new("mode");
        let path = d.0.join("audit.log");
        std::fs::write(d.0.join("other"), b"x").unwrap();
        let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        // umask can only remove bits.
        assert_eq!(mode & !FILE_MODE, 0, "mode {mode:o}");
        let mut sink = log.worker_sink();
        sink.push(&record("first"));
        drop((sink, log));
        writer.finish().unwrap();
        // A second open appends rather than truncating.
        let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).unwrap();
        log.worker_sink().push(&record("second"));
        drop(log);
        writer.finish().unwrap();
        assert_eq!(ids(&path), vec!["first", "second"]);
    }

    #[test]
    fn open_error_names_the_file() {
        let d = TempDir::new("err");
        let path = d.0.join("no-such-dir").join("audit.log");
        let err = AuditLog::open(AuditDest::File(path.clone())).unwrap_err();
        assert!(matches!(err, AuditError::Open { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn four_threads_every_record_exactly_once() {
        const THREADS: usize = 4;
        const PER_THREAD: usize = 5_000;
        let d = TempDir::new("mt");
        let path = d.0.join("audit.log");
        let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).unwrap();
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let mut sink = log.worker_sink();
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        sink.push(&record(&format!("{t}-{i}")));
                        if i % 97 == 0 {
                            sink.flush(); // the periodic tick
                        }
                    }
                    // sink dropped here: flushes the rest
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        drop(log);
        let stats = writer.finish().unwrap();
        assert_eq!(stats.records_written, (THREADS * PER_THREAD) as u64);
        assert_eq!(stats.records_dropped, 0);
        assert_eq!(stats.write_errors, 0);

        let got = ids(&path);
        assert_eq!(got.len(), THREADS * PER_THREAD);
        let unique: HashSet<&String> = got.iter().collect();
        assert_eq!(unique.len(), THREADS * PER_THREAD);
        for t in 0..THREADS {
            for i in [0, PER_THREAD / 2, PER_THREAD - 1] {
                assert!(unique.contains(&format!("{t}-{i}")));
            }
        }
    }

    #[test]
    fn big_buffer_flushes_by_itself() {
        let d = TempDir::new("big");
        let path = d.0.join("audit.log");
        let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).unwrap();
        let mut sink = log.worker_sink();
        let mut n = 0u64;
        while sink.buffered_records() == n {
            sink.push(&record(&format!("r{n}")));
            n += 1;
            assert!(n < 10_000, "push never flushed");
        }
        // The flush happened on the push that crossed 64 KiB.
        assert_eq!(sink.buffered_records(), 0);
        wait_written(&log, n);
        drop((sink, log));
        writer.finish().unwrap();
        assert_eq!(ids(&path).len() as u64, n);
    }

    #[test]
    fn reopen_after_rename_like_logrotate() {
        let d = TempDir::new("rot");
        let path = d.0.join("audit.log");
        let rotated = d.0.join("audit.log.1");
        let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).unwrap();
        let mut sink = log.worker_sink();
        for i in 0..10 {
            sink.push(&record(&format!("old-{i}")));
        }
        sink.flush();
        wait_written(&log, 10);

        std::fs::rename(&path, &rotated).unwrap();
        // Without a reopen the writer would keep appending to the renamed file.
        log.reopen_handle().store(true, Ordering::Release);
        for i in 0..5 {
            sink.push(&record(&format!("new-{i}")));
        }
        sink.flush();
        wait_written(&log, 15);
        drop(sink);
        drop(log);
        writer.finish().unwrap();

        let old: Vec<String> = (0..10).map(|i| format!("old-{i}")).collect();
        let new: Vec<String> = (0..5).map(|i| format!("new-{i}")).collect();
        assert_eq!(ids(&rotated), old);
        assert_eq!(ids(&path), new);
    }

    #[test]
    fn idle_writer_reopens_promptly() {
        let d = TempDir::new("idle");
        let path = d.0.join("audit.log");
        let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).unwrap();
        std::fs::rename(&path, d.0.join("audit.log.1")).unwrap();
        log.reopen();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !path.exists() {
            assert!(Instant::now() < deadline, "file was not recreated");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(log);
        writer.finish().unwrap();
    }

    #[test]
    fn finish_drains_everything_and_waits_for_sinks() {
        let d = TempDir::new("fin");
        let path = d.0.join("audit.log");
        let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).unwrap();
        let mut sink = log.worker_sink();
        drop(log);
        // A worker still running while finish() is called: finish must wait
        // for its sink to be dropped and write what it pushed last.
        let worker = std::thread::spawn(move || {
            for i in 0..1000 {
                sink.push(&record(&format!("f{i}")));
            }
            std::thread::sleep(Duration::from_millis(300));
            sink.push(&record("last"));
        });
        let stats = writer.finish().unwrap();
        worker.join().unwrap();
        assert_eq!(stats.records_written, 1001);
        let got = ids(&path);
        assert_eq!(got.len(), 1001);
        assert_eq!(got.last().map(String::as_str), Some("last"));
    }

    #[test]
    fn write_errors_are_counted_not_fatal() {
        // /dev/full fails every write with ENOSPC.
        let full = PathBuf::from("/dev/full");
        if !full.exists() {
            return;
        }
        let (log, writer) = AuditLog::open(AuditDest::File(full)).unwrap();
        let mut sink = log.worker_sink();
        sink.push(&record("a"));
        sink.push(&record("b"));
        sink.flush();
        sink.push(&record("c"));
        sink.flush();
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.write_errors() < 2 {
            assert!(Instant::now() < deadline, "errors not counted");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(log.records_dropped(), 3);
        assert_eq!(log.records_written(), 0);
        drop((sink, log));
        // The final fsync of /dev/full may or may not fail; it must return.
        let _ = writer.finish();
    }

    #[test]
    fn over_the_memory_cap_drops_and_counts() {
        let (log, writer) = AuditLog::open(AuditDest::Stdout).unwrap();
        // Pretend the writer is far behind.
        log.shared
            .pending_bytes
            .store(MAX_PENDING_BYTES, Ordering::Release);
        let mut sink = log.worker_sink();
        sink.push(&record("x"));
        sink.push(&record("y"));
        sink.flush();
        assert_eq!(log.records_dropped(), 2);
        assert_eq!(sink.buffered_records(), 0);
        log.shared.pending_bytes.store(0, Ordering::Release);
        drop((sink, log));
        assert_eq!(writer.finish().unwrap().records_written, 0);
    }

    #[test]
    fn stdout_destination_constructs_and_finishes() {
        let (log, writer) = AuditLog::open(AuditDest::Stdout).unwrap();
        let sink = log.worker_sink();
        drop(sink); // empty flush sends nothing
        drop(log);
        let stats = writer.finish().unwrap();
        assert_eq!(stats, AuditStats::default());
    }

    #[test]
    fn time_format_is_rfc3339_utc_millis() {
        assert_eq!(format_time(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2024-02-29T23:59:59.123Z (a leap day)
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_199_123);
        assert_eq!(format_time(t), "2024-02-29T23:59:59.123Z");
        // 2000-03-01T00:00:00.000Z (century leap year boundary)
        let t = UNIX_EPOCH + Duration::from_secs(951_868_800);
        assert_eq!(format_time(t), "2000-03-01T00:00:00.000Z");
        // 2100-12-31T12:30:45.999Z
        let t = UNIX_EPOCH + Duration::from_millis(4_133_939_445_999);
        assert_eq!(format_time(t), "2100-12-31T12:30:45.999Z");
        assert_eq!(
            format_time(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }
}
