//! Off-data-path housekeeping on one thread: certificate expiry warnings
//! and reloads on file changes (`notify`). Also the glue that lets the
//! admin API read and act on the running gateway.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use tracing::{debug, error, warn};

use crate::admin::{AdminBackend, PutCertError};
use crate::reload::ReloadError;
use crate::server::Shared;

/// How often certificate expiry is checked.
const EXPIRY_CHECK: Duration = Duration::from_secs(60);
/// The same certificate is warned about at most this often.
const EXPIRY_WARN_EVERY: Duration = Duration::from_secs(6 * 3600);
/// File events are collected this long before one reload runs (an editor or
/// `cp` of a chain and key produces several).
const DEBOUNCE: Duration = Duration::from_millis(300);

enum Msg {
    Stop,
    FileChanged(Vec<PathBuf>),
}

/// The housekeeping thread.
pub struct Maintenance {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Maintenance {
    /// Starts the thread; with `watch`, certificate/key/CRL/ticket-key
    /// files are watched (their directories, so replaced files are seen).
    pub fn start(shared: Arc<Shared>, watch: bool) -> Maintenance {
        let (tx, rx) = mpsc::channel();
        let files = shared.tls.watched_files();
        let watcher = if watch {
            start_watcher(&files, tx.clone())
        } else {
            None
        };
        let thread = std::thread::Builder::new()
            .name("maintenance".into())
            .spawn(move || run(shared, rx, files))
            .map_err(|e| error!(error = %e, "cannot start the maintenance thread"))
            .ok();
        Maintenance {
            tx,
            thread,
            _watcher: watcher,
        }
    }

    /// Stops the thread and the watcher.
    pub fn stop(mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start_watcher(files: &[PathBuf], tx: mpsc::Sender<Msg>) -> Option<notify::RecommendedWatcher> {
    let handler = move |res: notify::Result<notify::Event>| match res {
        Ok(ev) => {
            if matches!(ev.kind, notify::EventKind::Access(_)) {
                return;
            }
            let _ = tx.send(Msg::FileChanged(ev.paths));
        }
        Err(e) => warn!(error = %e, "file watcher error"),
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch certificate files; reload with SIGHUP or the admin API");
            return None;
        }
    };
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| absolute(f).parent().map(PathBuf::from))
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        if let Err(e) = watcher.watch(d, RecursiveMode::NonRecursive) {
            warn!(dir = %d.display(), error = %e, "cannot watch directory for certificate changes");
        }
    }
    debug!(dirs = dirs.len(), "watching certificate directories");
    Some(watcher)
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn run(shared: Arc<Shared>, rx: mpsc::Receiver<Msg>, files: Vec<PathBuf>) {
    let watched: Vec<PathBuf> = files.iter().map(|f| absolute(f)).collect();
    let mut last_warned: HashMap<(String, String), Instant> = HashMap::new();
    let mut next_expiry_check = Instant::now();
    let mut pending_reload: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now >= next_expiry_check {
            check_expiry(&shared, &mut last_warned, now);
            next_expiry_check = now + EXPIRY_CHECK;
        }
        if pending_reload.is_some_and(|t| now >= t) {
            pending_reload = None;
            let _ = shared.reload("file change");
        }
        let wait = match pending_reload {
            Some(t) => t.saturating_duration_since(now),
            None => next_expiry_check.saturating_duration_since(now),
        };
        match rx.recv_timeout(wait.max(Duration::from_millis(10))) {
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Msg::FileChanged(paths)) => {
                if paths.iter().any(|p| watched.contains(&absolute(p))) {
                    pending_reload.get_or_insert(Instant::now() + DEBOUNCE);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

fn check_expiry(shared: &Shared, last: &mut HashMap<(String, String), Instant>, now: Instant) {
    for (listener, name, secs) in shared.tls.expiring() {
        let key = (listener.clone(), name.clone());
        if last
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < EXPIRY_WARN_EVERY)
        {
            continue;
        }
        last.insert(key, now);
        if secs <= 0 {
            error!(
                listener,
                cert = name,
                "certificate has EXPIRED: new handshakes for it are refused; rotate it (SIGHUP, file change or PUT /certs/{name})"
            );
        } else {
            warn!(
                listener,
                cert = name,
                days_left = secs / 86_400,
                seconds_left = secs,
                "certificate expires soon"
            );
        }
    }
}

/// The admin API's view of the gateway.
pub struct AdminState(pub Arc<Shared>);

impl AdminBackend for AdminState {
    fn metrics_text(&self) -> String {
        self.0.metrics_text()
    }

    fn sessions(&self) -> serde_json::Value {
        serde_json::to_value(self.0.sessions(Duration::from_millis(200)))
            .unwrap_or(serde_json::Value::Array(Vec::new()))
    }

    fn certs(&self) -> serde_json::Value {
        let list: Vec<serde_json::Value> = self
            .0
            .tls
            .cert_infos()
            .into_iter()
            .map(|(listener, info)| {
                let mut v = serde_json::to_value(info).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("listener".into(), serde_json::Value::String(listener));
                }
                v
            })
            .collect();
        serde_json::Value::Array(list)
    }

    fn put_cert(&self, name: &str, pem: &[u8]) -> Result<serde_json::Value, PutCertError> {
        match self.0.tls.put_cert(name, pem) {
            Ok(info) => {
                tracing::info!(cert = name, "certificate replaced through the admin API");
                self.0
                    .reloads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(serde_json::to_value(info).unwrap_or_default())
            }
            Err(ReloadError::UnknownName(n)) => Err(PutCertError::UnknownName(n)),
            Err(e) => {
                warn!(cert = name, error = %e, "certificate upload refused; the old one keeps serving");
                self.0
                    .reload_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(PutCertError::Invalid(e.to_string()))
            }
        }
    }

    fn healthy(&self) -> bool {
        self.0.workers_running()
    }

    fn ready(&self) -> bool {
        self.0.ready()
    }
}
