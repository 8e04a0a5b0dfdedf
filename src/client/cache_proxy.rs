//! A loopback HTTP binary cache in front of the builder's Cache service.
//!
//! Local Nix imports outputs with `nix copy --from http://127.0.0.1:PORT`, so
//! Nix itself checks every signature and hash. Each file Nix asks for is
//! fetched from the builder as Nix asks for it and streamed straight
//! through: nothing is mirrored to disk first, and only paths Nix actually
//! lacks are transferred.
//!
//! Requests are spread over several channels, each an HTTP/2 connection on
//! a QUIC stream of its own: one stream's flow-control window caps it near
//! window / round-trip time, which on a long link is far below the link's
//! speed. A large NAR is fetched as consecutive ranges, a few at once,
//! handed to Nix in order.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use futures::{StreamExt as _, stream};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::BuilderChannel;
use crate::{
    nix::{narinfo::NarInfo, signing::PublicKey, store_path::StorePathHash},
    proto::{GetNarInfoRequest, GetNarRequest, cache_client::CacheClient},
};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Bytes per range of a large NAR. With [`CacheProxy::start`]'s `fetches`
/// ranges in flight, at most `fetches` times this is buffered.
const SEGMENT: u64 = 4 << 20;

/// The running proxy; stops when dropped.
#[derive(Debug)]
pub struct CacheProxy {
    addr: SocketAddr,
    stop: CancellationToken,
    received: Arc<AtomicU64>,
}

#[derive(Debug, Clone)]
struct Upstream {
    caches: Arc<[CacheClient<BuilderChannel>]>,
    next: Arc<AtomicUsize>,
    session_id: String,
    key: Option<PublicKey>,
    received: Arc<AtomicU64>,
    /// File sizes named by the narinfos served, by NAR URL.
    sizes: Arc<Mutex<HashMap<String, u64>>>,
    fetches: usize,
}

impl CacheProxy {
    /// Serves the builder's cache for `session_id` on a free loopback port,
    /// taking turns over `channels` and fetching up to `fetches` ranges of
    /// one large NAR at once. With `key`, narinfos not signed by it are
    /// refused before Nix sees them.
    pub async fn start(
        channels: Vec<BuilderChannel>,
        fetches: usize,
        session_id: String,
        key: Option<PublicKey>,
    ) -> std::io::Result<Self> {
        assert!(!channels.is_empty(), "the loopback cache needs a channel");
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let received = Arc::new(AtomicU64::new(0));
        let upstream = Upstream {
            caches: channels
                .into_iter()
                .map(|channel| {
                    CacheClient::new(channel)
                        .max_decoding_message_size(crate::transport::http2::MAX_MESSAGE_SIZE)
                })
                .collect(),
            next: Arc::default(),
            session_id,
            key,
            received: received.clone(),
            sizes: Arc::default(),
            fetches: fetches.max(1),
        };
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(err) => { warn!("loopback cache: {err}"); continue; }
                    },
                    _ = stopped.cancelled() => return,
                };
                // A response is written in pieces; without this, Nagle's
                // algorithm and delayed ACKs stall every small file ~40 ms.
                let _ = stream.set_nodelay(true);
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let upstream = upstream.clone();
                        async move { Ok::<_, Infallible>(upstream.serve(request).await) }
                    });
                    if let Err(err) = hyper::server::conn::http1::Builder::new()
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
            received,
        })
    }

    /// The cache URL to give Nix.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// NAR bytes received from the builder so far.
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for CacheProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
}

impl Upstream {
    /// The next channel's client, in turn.
    fn cache(&self) -> CacheClient<BuilderChannel> {
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.caches.len();
        self.caches[at].clone()
    }

    async fn serve(&self, request: Request<hyper::body::Incoming>) -> Response<Body> {
        let path = request.uri().path().trim_start_matches('/').to_owned();
        if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
            return respond(StatusCode::METHOD_NOT_ALLOWED, "");
        }
        if path == "nix-cache-info" {
            return respond(
                StatusCode::OK,
                "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 40\n",
            );
        }
        if let Some(hash) = path.strip_suffix(".narinfo") {
            return self.narinfo(hash).await;
        }
        if path.starts_with("nar/") {
            return self.nar(path).await;
        }
        respond(StatusCode::NOT_FOUND, "")
    }

    async fn narinfo(&self, hash: &str) -> Response<Body> {
        let Ok(hash) = hash.parse::<StorePathHash>() else {
            return respond(StatusCode::NOT_FOUND, "");
        };
        let reply = self
            .cache()
            .get_nar_info(GetNarInfoRequest {
                session_id: self.session_id.clone(),
                store_path_hash: hash.to_string(),
            })
            .await;
        let text = match reply {
            Ok(reply) => reply.into_inner().narinfo,
            Err(status) if status.code() == tonic::Code::NotFound => {
                return respond(StatusCode::NOT_FOUND, "");
            }
            Err(status) => {
                warn!("builder refused narinfo {hash}: {}", status.message());
                return respond(StatusCode::BAD_GATEWAY, status.message().to_owned());
            }
        };
        match text.parse::<NarInfo>() {
            Ok(narinfo) if *narinfo.store_path.hash_part() != hash => {
                warn!(
                    "builder answered {hash} with the narinfo of {}",
                    narinfo.store_path
                );
                respond(StatusCode::BAD_GATEWAY, "narinfo for another path")
            }
            Ok(narinfo)
                if self
                    .key
                    .as_ref()
                    .is_some_and(|key| !narinfo.is_signed_by(key)) =>
            {
                warn!(
                    "narinfo of {} is not signed by the trusted builder key",
                    narinfo.store_path
                );
                respond(
                    StatusCode::BAD_GATEWAY,
                    "narinfo not signed by the trusted key",
                )
            }
            Ok(narinfo) => {
                let size = match (narinfo.compression.as_deref(), narinfo.file_size) {
                    (_, Some(size)) => Some(size),
                    (None | Some("none"), None) => Some(narinfo.nar_size),
                    _ => None,
                };
                if let Some(size) = size {
                    let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
                    sizes.insert(narinfo.url, size);
                }
                respond(StatusCode::OK, text)
            }
            Err(err) => {
                warn!("builder sent a malformed narinfo for {hash}: {err}");
                respond(StatusCode::BAD_GATEWAY, "malformed narinfo")
            }
        }
    }

    async fn nar(&self, url: String) -> Response<Body> {
        let size = self
            .sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&url)
            .copied();
        if let Some(size) = size.filter(|size| *size > SEGMENT) {
            return self.ranged(url, size);
        }
        let reply = self
            .cache()
            .get_nar(GetNarRequest {
                session_id: self.session_id.clone(),
                url,
                offset: 0,
                length: 0,
            })
            .await;
        let stream = match reply {
            Ok(reply) => reply.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => {
                return respond(StatusCode::NOT_FOUND, "");
            }
            Err(status) => return respond(StatusCode::BAD_GATEWAY, status.message().to_owned()),
        };
        let received = self.received.clone();
        let frames = stream.map(move |chunk| match chunk {
            Ok(chunk) => {
                received.fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
                Ok(Frame::data(chunk.data))
            }
            // Nix sees a truncated body and rejects the NAR by its hash.
            Err(status) => Err(std::io::Error::other(status.message().to_owned())),
        });
        Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)))
    }

    /// The file at `url`, `size` bytes, fetched in ranges over the channels
    /// in turn, `fetches` at once, and passed on in order.
    fn ranged(&self, url: String, size: u64) -> Response<Body> {
        let upstream = self.clone();
        let ranges = (0..size)
            .step_by(SEGMENT as usize)
            .map(move |offset| (offset, SEGMENT.min(size - offset)));
        let frames = stream::iter(ranges)
            .map(move |(offset, length)| upstream.clone().range(url.clone(), offset, length))
            .buffered(self.fetches)
            .flat_map(|range| match range {
                Ok(chunks) => stream::iter(chunks.into_iter().map(|chunk| Ok(Frame::data(chunk))))
                    .left_stream(),
                // Nix sees a truncated body and rejects the NAR.
                Err(err) => stream::iter([Err(err)]).right_stream(),
            });
        Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)))
    }

    async fn range(self, url: String, offset: u64, length: u64) -> std::io::Result<Vec<Bytes>> {
        let failed = |status: tonic::Status| {
            std::io::Error::other(format!(
                "fetching bytes {offset}..{} of {url}: {}",
                offset + length,
                status.message()
            ))
        };
        let mut stream = self
            .cache()
            .get_nar(GetNarRequest {
                session_id: self.session_id.clone(),
                url: url.clone(),
                offset,
                length,
            })
            .await
            .map_err(failed)?
            .into_inner();
        let mut chunks = Vec::new();
        let mut got = 0;
        while let Some(chunk) = stream.message().await.map_err(failed)? {
            got += chunk.data.len() as u64;
            self.received
                .fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
            chunks.push(chunk.data);
        }
        if got != length {
            return Err(std::io::Error::other(format!(
                "the builder sent {got} of {length} bytes from offset {offset} of {url}"
            )));
        }
        Ok(chunks)
    }
}
