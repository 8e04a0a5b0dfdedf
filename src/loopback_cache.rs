//! A Nix binary cache served over HTTP on a loopback port, for Nix to import
//! from while the files are still arriving from elsewhere.
//!
//! Nix's `file://` store reads a NAR file once, to its current end; over
//! HTTP it reads a response body as it comes. The client takes outputs from
//! the builder's Cache service this way (see `client::cache_proxy`), and
//! the import helper filters narinfos (see `helper::filter`). What is
//! served is up to a [`CacheFiles`]; this module only speaks HTTP. Any
//! local user can connect to a loopback port, so nothing served here may
//! be secret.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{Request, Response, StatusCode, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
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

/// A running loopback cache; stops accepting when dropped.
#[derive(Debug)]
pub struct LoopbackCache {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl LoopbackCache {
    /// Serves `files` on a free port of 127.0.0.1, to anyone who connects.
    /// Must be called within a Tokio runtime.
    pub fn start(files: impl CacheFiles) -> std::io::Result<Self> {
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
                let files = files.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let service = service_fn(move |request| {
                        let files = files.clone();
                        async move { Ok::<_, Infallible>(serve(&files, request).await) }
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
        Ok(Self { addr, stop })
    }

    /// The cache URL to give Nix.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
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

    /// The status line of a GET of `nix-cache-info`.
    async fn get(cache: &LoopbackCache) -> String {
        let mut stream = tokio::net::TcpStream::connect(cache.addr).await.unwrap();
        let request = "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply.lines().next().unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn a_cache_answers_anyone() {
        let cache = LoopbackCache::start(Nothing).unwrap();
        assert_eq!(get(&cache).await, "HTTP/1.1 200 OK");
    }
}
