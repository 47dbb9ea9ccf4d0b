//! Request routing and the handlers of the admin API.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Bytes};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::auth::{authorize, Decision};
use super::page;
use super::{AdminBackend, PutCertError};

/// Largest accepted `PUT /certs/{name}` body (PEM chain + key).
pub(crate) const MAX_CERT_BODY: usize = 1024 * 1024;
/// How long a client may take to send a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the request handlers share.
pub(crate) struct State {
    pub(crate) backend: Arc<dyn AdminBackend>,
    pub(crate) token: Option<String>,
}

/// The resource a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Index,
    Metrics,
    Sessions,
    Certs,
    Cert(String),
    Healthz,
    Readyz,
    NotFound,
}

impl Route {
    fn of(path: &str) -> Route {
        match path {
            "/" => Route::Index,
            "/metrics" => Route::Metrics,
            "/sessions" => Route::Sessions,
            "/certs" => Route::Certs,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            other => match other.strip_prefix("/certs/") {
                Some(name) if !name.is_empty() && !name.contains('/') => {
                    Route::Cert(name.to_owned())
                }
                _ => Route::NotFound,
            },
        }
    }

    /// The methods the resource answers (HEAD goes with GET).
    fn allow(&self) -> &'static str {
        match self {
            Route::Cert(_) => "PUT",
            _ => "GET, HEAD",
        }
    }

    fn allows(&self, m: &Method) -> bool {
        match self {
            Route::Cert(_) => m == Method::PUT,
            _ => m == Method::GET || m == Method::HEAD,
        }
    }

    /// Probes must work without credentials (load balancers, systemd, k8s).
    fn is_probe(&self) -> bool {
        matches!(self, Route::Healthz | Route::Readyz)
    }
}

/// Serves one request, logging it.
pub(crate) async fn handle<B>(
    req: Request<B>,
    peer: Option<IpAddr>,
    state: &State,
) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = route(req, peer, state).await;
    let status = resp.status().as_u16();
    let micros = start.elapsed().as_micros() as u64;
    if resp.status().is_server_error() {
        tracing::warn!(%method, %path, status, ?peer, micros, "admin request failed");
    } else {
        tracing::debug!(%method, %path, status, ?peer, micros, "admin request");
    }
    resp
}

async fn route<B>(req: Request<B>, peer: Option<IpAddr>, state: &State) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let route = Route::of(req.uri().path());
    if !route.is_probe() {
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        match authorize(peer, state.token.as_deref(), auth) {
            Decision::Allow => {}
            Decision::Unauthorized => {
                let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
            Decision::Forbidden => {
                return error(
                    StatusCode::FORBIDDEN,
                    "admin API is only served to local peers when no token is configured",
                )
            }
        }
    }
    if route == Route::NotFound {
        return error(StatusCode::NOT_FOUND, "no such resource");
    }
    if !route.allows(req.method()) {
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(route.allow()));
        return r;
    }
    let backend = &state.backend;
    match route {
        Route::Metrics => response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            backend.metrics_text().into(),
        ),
        Route::Sessions => match blocking(backend, |b| b.sessions()).await {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(r) => r,
        },
        Route::Certs => json_response(StatusCode::OK, &backend.certs()),
        Route::Healthz => probe(backend.healthy(), "ok\n", "unhealthy\n"),
        Route::Readyz => probe(backend.ready(), "ready\n", "not ready\n"),
        Route::Index => {
            let sessions = match blocking(backend, |b| b.sessions()).await {
                Ok(v) => v,
                Err(r) => return r,
            };
            let html = page::render(
                &sessions,
                &backend.certs(),
                backend.healthy(),
                backend.ready(),
            );
            let mut r = response(StatusCode::OK, "text/html; charset=utf-8", html.into());
            r.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
            );
            r
        }
        Route::Cert(name) => put_cert(req, name, backend).await,
        Route::NotFound => error(StatusCode::NOT_FOUND, "no such resource"),
    }
}

async fn put_cert<B>(
    req: Request<B>,
    name: String,
    backend: &Arc<dyn AdminBackend>,
) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_CERT_BODY as u64) {
        return too_large();
    }
    let pem = match read_body(req.into_body(), MAX_CERT_BODY, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(),
        Err(BodyError::Timeout) => {
            return error(StatusCode::REQUEST_TIMEOUT, "request body took too long")
        }
        Err(BodyError::Read(e)) => {
            tracing::warn!(error = %e, "admin: reading PUT /certs body failed");
            return error(StatusCode::BAD_REQUEST, "could not read the request body");
        }
    };
    let result = blocking(backend, move |b| b.put_cert(&name, &pem)).await;
    match result {
        Ok(Ok(v)) => json_response(StatusCode::OK, &v),
        Ok(Err(e @ PutCertError::UnknownName(_))) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Ok(Err(e @ PutCertError::Invalid(_))) => {
            tracing::warn!(error = %e, "admin: certificate upload rejected");
            error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string())
        }
        Err(r) => r,
    }
}

/// Why a request body could not be had.
#[derive(Debug)]
pub(crate) enum BodyError {
    TooLarge,
    Timeout,
    Read(Box<dyn std::error::Error + Send + Sync>),
}

/// Collects a body of at most `limit` bytes within `timeout`.
pub(crate) async fn read_body<B>(
    body: B,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Err(_) => Err(BodyError::Timeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(BodyError::TooLarge),
        Ok(Err(e)) => Err(BodyError::Read(e)),
    }
}

/// Runs a possibly slow backend call off the admin thread; a panic in it
/// becomes a 500.
async fn blocking<T, F>(backend: &Arc<dyn AdminBackend>, f: F) -> Result<T, Response<Full<Bytes>>>
where
    T: Send + 'static,
    F: FnOnce(&dyn AdminBackend) -> T + Send + 'static,
{
    let backend = Arc::clone(backend);
    tokio::task::spawn_blocking(move || f(backend.as_ref()))
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "admin backend call failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        })
}

fn probe(ok: bool, yes: &'static str, no: &'static str) -> Response<Full<Bytes>> {
    if ok {
        response(StatusCode::OK, "text/plain; charset=utf-8", yes.into())
    } else {
        response(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            no.into(),
        )
    }
}

fn too_large() -> Response<Full<Bytes>> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("body larger than {MAX_CERT_BODY} bytes"),
    )
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    match serde_json::to_vec(v) {
        Ok(body) => response(status, "application/json", body.into()),
        Err(e) => {
            tracing::warn!(error = %e, "admin: cannot serialize JSON");
            response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "application/json",
                Bytes::from_static(b"{\"error\":\"internal error\"}"),
            )
        }
    }
}

/// An error answer: `{"error": message}`.
fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": message }))
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_routes() {
        assert_eq!(Route::of("/"), Route::Index);
        assert_eq!(
            Route::of("/certs/api.example"),
            Route::Cert("api.example".into())
        );
        assert_eq!(Route::of("/certs/"), Route::NotFound);
        assert_eq!(Route::of("/certs/a/b"), Route::NotFound);
        assert_eq!(Route::of("/metrics/"), Route::NotFound);
        assert!(Route::Healthz.is_probe() && !Route::Metrics.is_probe());
        assert!(Route::Cert("x".into()).allows(&Method::PUT));
        assert!(!Route::Cert("x".into()).allows(&Method::GET));
        assert!(Route::Certs.allows(&Method::HEAD) && !Route::Certs.allows(&Method::PUT));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn body_limit_is_enforced_without_a_length_header() {
        let big = Full::new(Bytes::from(vec![b'a'; MAX_CERT_BODY + 1]));
        let r = read_body(big, MAX_CERT_BODY, Duration::from_secs(5)).await;
        assert!(matches!(r, Err(BodyError::TooLarge)), "{r:?}");
        let ok = Full::new(Bytes::from(vec![b'a'; MAX_CERT_BODY]));
        let r = read_body(ok, MAX_CERT_BODY, Duration::from_secs(5)).await;
        assert_eq!(r.unwrap().len(), MAX_CERT_BODY);
    }
}
