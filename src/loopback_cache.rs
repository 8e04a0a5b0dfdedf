//! A Nix binary cache served over HTTP on a loopback port, for Nix to import
//! from while the files are still arriving from elsewhere.
//!
//! Nix's `file://` store reads a NAR file once, to its current end; over
//! HTTP it reads a response body as it comes. Both sides of drv-thru import
//! this way: the client takes outputs from the builder's Cache service (see
//! `client::cache_proxy`), the builder takes uploaded inputs while their
//! parts are still coming in (see `server::upload`). What is served is up
//! to a [`CacheFiles`]; this module only speaks HTTP.
//!
//! Any local user can connect to a loopback port. A cache started with
//! [`LoopbackCache::start_private`] answers only requests carrying its
//! random secret (HTTP basic auth), which it writes to a netrc file only its
//! own user can read: Nix is given the file's path, never the secret, as
//! everything on a command line is visible to every local user.

use std::{
    convert::Infallible,
    fs,
    future::Future,
    io::Write as _,
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{
    Request, Response, StatusCode,
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq as _;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{nix::store_path::StorePathHash, transport::accept::AcceptPacing};

/// Connections served at once. Nix opens at most `http-connections` (25 by
/// default); others come from elsewhere on this machine and wait, rather
/// than take the process's file descriptors.
const MAX_CONNECTIONS: usize = 64;

/// A connection that sends no request this long is closed, so that idle
/// ones cannot hold the slots Nix needs.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A response body.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// What a loopback cache serves.
pub trait CacheFiles: Clone + Send + Sync + 'static {
    /// The `nix-cache-info` file.
    fn cache_info(&self) -> &'static str {
        "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 40\n"
    }

    /// The response to a request for the narinfo of the path with `hash`.
    fn narinfo(&self, hash: StorePathHash) -> impl Future<Output = Response<Body>> + Send;

    /// The response to a request for the file at `url` (`nar/…`), as a
    /// narinfo named it.
    fn nar(&self, url: String) -> impl Future<Output = Response<Body>> + Send;
}

/// The user name in a private cache's credentials; the password is what
/// is secret.
const NETRC_LOGIN: &str = "drv-thru";

/// A running loopback cache; stops accepting when dropped.
#[derive(Debug)]
pub struct LoopbackCache {
    addr: SocketAddr,
    stop: CancellationToken,
    netrc_file: Option<PathBuf>,
}

impl LoopbackCache {
    /// Serves `files` on a free port of 127.0.0.1, to anyone who connects.
    /// Must be called within a Tokio runtime.
    pub fn start(files: impl CacheFiles) -> std::io::Result<Self> {
        Self::serve(files, None)
    }

    /// Like [`Self::start`], answering only requests with the credentials it
    /// writes to a new netrc file (mode 0600) at `netrc_file`, for Nix's
    /// `netrc-file` setting; others get 401.
    pub fn start_private(files: impl CacheFiles, netrc_file: &Path) -> std::io::Result<Self> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|err| std::io::Error::other(err.to_string()))?;
        let password = data_encoding::HEXLOWER.encode(&secret);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(netrc_file)?;
        writeln!(
            file,
            "machine 127.0.0.1 login {NETRC_LOGIN} password {password}"
        )?;
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{NETRC_LOGIN}:{password}"));
        let mut cache = Self::serve(files, Some(Arc::from(format!("Basic {credentials}"))))?;
        cache.netrc_file = Some(netrc_file.to_owned());
        Ok(cache)
    }

    /// Serves `files`; with `authorization`, only to requests whose
    /// `Authorization` header is exactly that.
    fn serve(files: impl CacheFiles, authorization: Option<Arc<str>>) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut pacing = AcceptPacing::new("loopback cache");
        tokio::spawn(async move {
            loop {
                let slot = tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("never closed"),
                    _ = stopped.cancelled() => return,
                };
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stopped.cancelled() => return,
                };
                let stream = match accepted {
                    Ok((stream, _)) => {
                        pacing.accepted();
                        stream
                    }
                    Err(err) => {
                        if !pacing.failed(&err).await {
                            warn!("loopback cache: {err}");
                        }
                        continue;
                    }
                };
                // A response is written in pieces; without this, Nagle's
                // algorithm and delayed ACKs stall every small file ~40 ms.
                let _ = stream.set_nodelay(true);
                let (files, authorization) = (files.clone(), authorization.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    let service = service_fn(move |request| {
                        let files = files.clone();
                        let allowed = authorized(&request, authorization.as_deref());
                        async move {
                            Ok::<_, Infallible>(if allowed {
                                serve(&files, request).await
                            } else {
                                unauthorized()
                            })
                        }
                    });
                    if let Err(err) = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(REQUEST_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        debug!("loopback cache connection: {err}");
                    }
                });
            }
        });
        Ok(Self {
            addr,
            stop,
            netrc_file: None,
        })
    }

    /// The cache URL to give Nix.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The netrc file with the credentials of a private cache.
    pub fn netrc_file(&self) -> Option<&Path> {
        self.netrc_file.as_deref()
    }
}

/// Whether `request` may be served: by anyone without `expected`, else
/// only with exactly that `Authorization` header (compared in constant
/// time).
fn authorized(request: &Request<hyper::body::Incoming>, expected: Option<&str>) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    request
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|given| bool::from(given.as_bytes().ct_eq(expected.as_bytes())))
}

/// The answer to a request without the credentials; the connection is
/// closed after it, so a stranger does not keep a slot.
fn unauthorized() -> Response<Body> {
    let mut response = respond(StatusCode::UNAUTHORIZED, "");
    let headers = response.headers_mut();
    headers.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"drv-thru\""),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

impl Drop for LoopbackCache {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(files: &impl CacheFiles, request: Request<hyper::body::Incoming>) -> Response<Body> {
    if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "");
    }
    let path = request.uri().path().trim_start_matches('/');
    if path == "nix-cache-info" {
        return respond(StatusCode::OK, files.cache_info());
    }
    if let Some(hash) = path.strip_suffix(".narinfo") {
        return match hash.parse() {
            Ok(hash) => files.narinfo(hash).await,
            Err(_) => respond(StatusCode::NOT_FOUND, ""),
        };
    }
    if path.starts_with("nar/") {
        return files.nar(path.to_owned()).await;
    }
    respond(StatusCode::NOT_FOUND, "")
}

/// A response with a body known in full.
pub fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Serves only `nix-cache-info`.
    #[derive(Clone)]
    struct Nothing;

    impl CacheFiles for Nothing {
        async fn narinfo(&self, _: StorePathHash) -> Response<Body> {
            respond(StatusCode::NOT_FOUND, "")
        }

        async fn nar(&self, _: String) -> Response<Body> {
            respond(StatusCode::NOT_FOUND, "")
        }
    }

    /// The status line of a GET of `nix-cache-info` with `authorization`.
    async fn get(cache: &LoopbackCache, authorization: Option<&str>) -> String {
        let mut stream = tokio::net::TcpStream::connect(cache.addr).await.unwrap();
        let header = authorization
            .map(|value| format!("Authorization: {value}\r\n"))
            .unwrap_or_default();
        let request =
            format!("GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{header}\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply.lines().next().unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn a_private_cache_answers_only_with_the_secret_of_its_netrc_file() {
        let dir = tempfile::tempdir().unwrap();
        let netrc = dir.path().join("netrc");
        let cache = LoopbackCache::start_private(Nothing, &netrc).unwrap();
        assert_eq!(cache.netrc_file(), Some(netrc.as_path()));
        let mode = fs::metadata(&netrc).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let text = fs::read_to_string(&netrc).unwrap();
        let password = text.trim().rsplit(' ').next().unwrap();
        assert_eq!(password.len(), 64, "{text}");
        let basic = |login: &str, password: &str| {
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(format!("{login}:{password}"));
            format!("Basic {encoded}")
        };
        let unauthorized = "HTTP/1.1 401 Unauthorized";
        assert_eq!(get(&cache, None).await, unauthorized);
        assert_eq!(
            get(&cache, Some(&basic(NETRC_LOGIN, &"0".repeat(64)))).await,
            unauthorized
        );
        assert_eq!(
            get(&cache, Some(&basic(NETRC_LOGIN, password))).await,
            "HTTP/1.1 200 OK"
        );
        // Another cache has another secret.
        let other = LoopbackCache::start_private(Nothing, &dir.path().join("other")).unwrap();
        assert_eq!(
            get(&other, Some(&basic(NETRC_LOGIN, password))).await,
            unauthorized
        );
    }

    #[tokio::test]
    async fn an_open_cache_answers_anyone() {
        let cache = LoopbackCache::start(Nothing).unwrap();
        assert_eq!(cache.netrc_file(), None);
        assert_eq!(get(&cache, None).await, "HTTP/1.1 200 OK");
    }
}
