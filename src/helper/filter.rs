//! The cache root's Nix imports from: a loopback cache of the helper's own
//! in front of the caller's.
//!
//! The caller's cache is run by an unprivileged user, and a narinfo's `URL:`
//! is not covered by its signature. Passed on as it is, a narinfo could send
//! root's Nix to a local file (`file:///…`) or to another server, and a
//! redirect could do the same for a NAR. So root's Nix only ever sees this
//! filter: it passes a narinfo only if it names a plain file under `nar/`,
//! serves only the NAR files such narinfos named, and follows no redirect.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::BodyExt as _;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use super::request::LoopbackUrl;
use crate::{
    loopback_cache::{Body, CacheFiles, respond},
    nix::{
        narinfo::{MAX_NARINFO_LEN, NarInfo},
        store_path::StorePathHash,
    },
};

/// How long the caller's cache may take to connect and answer with headers;
/// the body then streams for as long as Nix waits for it.
const UPSTREAM_PATIENCE: Duration = Duration::from_secs(60);

/// A filter in front of the caller's cache at `upstream`.
#[derive(Debug, Clone)]
pub struct NarinfoFilter {
    upstream: LoopbackUrl,
    /// NAR URLs named by narinfos passed on, the only ones served.
    named: Arc<Mutex<HashSet<String>>>,
}

impl NarinfoFilter {
    /// A filter in front of the cache at `upstream`.
    pub fn new(upstream: LoopbackUrl) -> Self {
        Self {
            upstream,
            named: Arc::default(),
        }
    }

    /// `GET /path` on the caller's cache; a redirect or a failure to connect
    /// is a response of ours, never followed.
    async fn get(&self, path: &str) -> Result<Response<hyper::body::Incoming>, Response<Body>> {
        let fetch = async {
            let stream = tokio::net::TcpStream::connect(self.upstream.socket_addr()).await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(std::io::Error::other)?;
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    debug!("caller's cache connection: {err}");
                }
            });
            let request = Request::get(format!("/{path}"))
                .header(hyper::header::HOST, self.upstream.socket_addr().to_string())
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .map_err(std::io::Error::other)?;
            sender
                .send_request(request)
                .await
                .map_err(std::io::Error::other)
        };
        let response = match tokio::time::timeout(UPSTREAM_PATIENCE, fetch).await {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => {
                warn!("the caller's cache failed {path}: {err}");
                return Err(respond(
                    StatusCode::BAD_GATEWAY,
                    "the caller's cache failed",
                ));
            }
            Err(_) => {
                warn!("the caller's cache did not answer {path} in time");
                return Err(respond(StatusCode::GATEWAY_TIMEOUT, ""));
            }
        };
        match response.status() {
            StatusCode::OK => Ok(response),
            StatusCode::NOT_FOUND => Err(respond(StatusCode::NOT_FOUND, "")),
            other => {
                warn!("the caller's cache answered {path} with {other}");
                Err(respond(
                    StatusCode::BAD_GATEWAY,
                    "refused by the import helper",
                ))
            }
        }
    }
}

impl CacheFiles for NarinfoFilter {
    async fn narinfo(&self, hash: StorePathHash) -> Response<Body> {
        let response = match self.get(&format!("{hash}.narinfo")).await {
            Ok(response) => response,
            Err(response) => return response,
        };
        let body = http_body_util::Limited::new(response.into_body(), MAX_NARINFO_LEN);
        let text = match body.collect().await {
            Ok(body) => body.to_bytes(),
            Err(err) => {
                warn!("reading the narinfo of {hash}: {err}");
                return respond(StatusCode::BAD_GATEWAY, "unreadable narinfo");
            }
        };
        let narinfo = match std::str::from_utf8(&text).map(str::parse::<NarInfo>) {
            Ok(Ok(narinfo)) => narinfo,
            _ => {
                warn!("the caller's cache sent a malformed narinfo for {hash}");
                return respond(StatusCode::BAD_GATEWAY, "malformed narinfo");
            }
        };
        if *narinfo.store_path.hash_part() != hash || !narinfo.has_plain_nar_url() {
            warn!(
                url = narinfo.url,
                path = %narinfo.store_path,
                "refused a narinfo for another path or with a NAR outside nar/"
            );
            return respond(StatusCode::BAD_GATEWAY, "refused by the import helper");
        }
        self.named
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(narinfo.url.clone());
        respond(StatusCode::OK, narinfo.to_string())
    }

    async fn nar(&self, url: String) -> Response<Body> {
        let named = self
            .named
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&url);
        if !named {
            return respond(StatusCode::NOT_FOUND, "");
        }
        match self.get(&url).await {
            Ok(response) => Response::new(
                response
                    .into_body()
                    .map_err(std::io::Error::other)
                    .boxed_unsync(),
            ),
            Err(response) => response,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{loopback_cache::LoopbackCache, nix::signing::SecretKey};

    /// A hostile caller's cache: one narinfo, with the NAR URL given, and a
    /// redirect for every NAR.
    #[derive(Clone)]
    struct Hostile {
        narinfo: String,
        redirect_nars: bool,
    }

    impl CacheFiles for Hostile {
        async fn narinfo(&self, _: StorePathHash) -> Response<Body> {
            respond(StatusCode::OK, self.narinfo.clone())
        }

        async fn nar(&self, _: String) -> Response<Body> {
            if self.redirect_nars {
                let mut response = respond(StatusCode::FOUND, "");
                response.headers_mut().insert(
                    hyper::header::LOCATION,
                    "file:///etc/shadow".parse().unwrap(),
                );
                return response;
            }
            respond(StatusCode::OK, "nar bytes")
        }
    }

    fn narinfo(url: &str) -> NarInfo {
        let mut info: NarInfo = "StorePath: /nix/store/5hc9jpc0mm9w0msgpb7j2dnk0xdvarkm-d\n\
             URL: nar/x.nar\nNarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\n\
             NarSize: 840\nReferences: \n"
            .parse()
            .unwrap();
        info.url = url.to_owned();
        let key = SecretKey::generate("builder-1").unwrap();
        info.signatures
            .push(key.sign(info.fingerprint().as_bytes()));
        info
    }

    async fn get(base: &str, path: &str) -> (StatusCode, String) {
        let url: LoopbackUrl = base.parse().unwrap();
        match NarinfoFilter::new(url).get(path).await {
            Ok(response) => {
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (StatusCode::OK, String::from_utf8_lossy(&body).into_owned())
            }
            Err(response) => (response.status(), String::new()),
        }
    }

    /// The filter in front of `upstream`, as root's Nix would reach it.
    fn filtered(upstream: Hostile) -> (LoopbackCache, LoopbackCache) {
        let upstream = LoopbackCache::start(upstream).unwrap();
        let filter =
            LoopbackCache::start(NarinfoFilter::new(upstream.url().parse().unwrap())).unwrap();
        (upstream, filter)
    }

    #[tokio::test]
    async fn passes_a_narinfo_with_a_plain_nar_and_then_that_nar() {
        let info = narinfo("nar/x.nar");
        let hash = info.store_path.hash_part().to_string();
        let (_upstream, filter) = filtered(Hostile {
            narinfo: info.to_string(),
            redirect_nars: false,
        });
        assert_eq!(
            get(&filter.url(), "nar/x.nar").await.0,
            StatusCode::NOT_FOUND,
            "a NAR no narinfo named"
        );
        let (status, text) = get(&filter.url(), &format!("{hash}.narinfo")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(text.parse::<NarInfo>().unwrap(), info);
        assert_eq!(
            get(&filter.url(), "nar/x.nar").await,
            (StatusCode::OK, "nar bytes".to_owned())
        );
    }

    #[tokio::test]
    async fn refuses_a_signed_narinfo_pointing_outside_the_cache() {
        for url in [
            "file:///etc/shadow",
            "http://10.0.0.1/nar/x.nar",
            "nar/../x",
        ] {
            let info = narinfo(url);
            let hash = info.store_path.hash_part().to_string();
            let (_upstream, filter) = filtered(Hostile {
                narinfo: info.to_string(),
                redirect_nars: false,
            });
            let (status, _) = get(&filter.url(), &format!("{hash}.narinfo")).await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{url}");
        }
    }

    #[tokio::test]
    async fn follows_no_redirect() {
        let info = narinfo("nar/x.nar");
        let hash = info.store_path.hash_part().to_string();
        let (_upstream, filter) = filtered(Hostile {
            narinfo: info.to_string(),
            redirect_nars: true,
        });
        assert_eq!(
            get(&filter.url(), &format!("{hash}.narinfo")).await.0,
            StatusCode::OK
        );
        assert_eq!(
            get(&filter.url(), "nar/x.nar").await.0,
            StatusCode::BAD_GATEWAY
        );
    }
}
