//! The Cache service: the signed cache, served to the session that built
//! the outputs, and only to it.

use std::sync::Arc;

use futures::{
    StreamExt as _, TryStreamExt as _,
    stream::{self, BoxStream},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use super::owner;
use crate::{
    nix::{
        narinfo::NarInfo,
        store_path::{StorePath, StorePathHash},
    },
    proto::{self, cache_server},
    server::{
        auth::principal,
        cache::{CacheError, NarStream, SignedCache},
        cache_streams::{CacheStreams, StreamPermit},
        error::ServerError,
        sessions::{Session, Sessions},
    },
    transport::IrohPeer,
};

/// Serves [`cache_server::Cache`] to sessions.
#[derive(Debug)]
pub struct CacheService {
    cache: Arc<SignedCache>,
    sessions: Arc<Sessions>,
    streams: Arc<CacheStreams>,
}

impl CacheService {
    /// A service over `cache` for `sessions`.
    pub fn new(cache: Arc<SignedCache>, sessions: Arc<Sessions>) -> Self {
        Self {
            cache,
            sessions,
            streams: Arc::default(),
        }
    }

    fn session<T>(&self, request: &Request<T>, id: &str) -> Result<Arc<Session>, ServerError> {
        principal(request)?;
        // The auth layer refuses the cache's methods on the admin socket.
        let peer = request.extensions().get::<IrohPeer>().ok_or_else(|| {
            ServerError::Internal("a cache call arrived without an Iroh peer".to_owned())
        })?;
        self.sessions.get(id, owner(peer))
    }

    /// Session `id` of the caller, and a permit for one more of its
    /// response streams: every streaming call takes one before it does
    /// any work, and its response holds it.
    fn session_stream<T>(
        &self,
        request: &Request<T>,
        id: &str,
    ) -> Result<(Arc<Session>, StreamPermit), ServerError> {
        let session = self.session(request, id)?;
        let permit = self.streams.open(&session.id, session.owner.connection)?;
        Ok((session, permit))
    }
}

fn not_an_output(hash: &StorePathHash) -> ServerError {
    ServerError::NotFound(format!("{hash} is not an output of this session's build"))
}

/// The signed narinfo of `path`, which `session` may read; its NAR may then
/// be fetched in this session.
async fn serve_narinfo(
    cache: &SignedCache,
    session: &Session,
    path: &StorePath,
) -> Result<NarInfo, ServerError> {
    let narinfo = cache
        .narinfo(path, || session.readable_paths())
        .await
        .map_err(|err| {
            warn!(%path, "making a narinfo: {err}");
            match err {
                CacheError::NotInStore(_) => not_an_output(path.hash_part()),
                other => {
                    ServerError::Internal(format!("the builder could not serve {path}: {other}"))
                }
            }
        })?;
    session.allow_nar(&narinfo);
    debug!(session = %session.id, %path, url = narinfo.url, "narinfo served");
    Ok(narinfo)
}

#[tonic::async_trait]
impl cache_server::Cache for CacheService {
    async fn get_cache_info(
        &self,
        _: Request<proto::GetCacheInfoRequest>,
    ) -> Result<Response<proto::GetCacheInfoResponse>, Status> {
        Ok(Response::new(proto::GetCacheInfoResponse {
            store_dir: crate::nix::store_path::STORE_DIR.to_owned(),
            priority: 40,
        }))
    }

    async fn get_nar_info(
        &self,
        request: Request<proto::GetNarInfoRequest>,
    ) -> Result<Response<proto::GetNarInfoResponse>, Status> {
        let session = self.session(&request, &request.get_ref().session_id)?;
        let hash: StorePathHash = request
            .get_ref()
            .store_path_hash
            .parse()
            .map_err(|err| ServerError::InvalidArgument(format!("store_path_hash: {err}")))?;
        let path = session
            .readable(&hash)
            .ok_or_else(|| not_an_output(&hash))?;
        let narinfo = serve_narinfo(&self.cache, &session, &path).await?;
        Ok(Response::new(proto::GetNarInfoResponse {
            narinfo: narinfo.to_string(),
        }))
    }

    type ListNarInfosStream = BoxStream<'static, Result<proto::ListNarInfosResponse, Status>>;

    async fn list_nar_infos(
        &self,
        request: Request<proto::ListNarInfosRequest>,
    ) -> Result<Response<Self::ListNarInfosStream>, Status> {
        let (session, permit) = self.session_stream(&request, &request.get_ref().session_id)?;
        let paths = session.readable_paths();
        if paths.is_empty() {
            return Err(ServerError::FailedPrecondition(
                "the session's build has not succeeded (yet): there are no outputs to list"
                    .to_owned(),
            )
            .into());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let cache = self.cache.clone();
        tokio::spawn(async move {
            for path in &paths {
                let reply = serve_narinfo(&cache, &session, path)
                    .await
                    .map(|narinfo| proto::ListNarInfosResponse {
                        narinfo: narinfo.to_string(),
                    })
                    .map_err(Status::from);
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(permit.hold(ReceiverStream::new(rx)).boxed()))
    }

    type GetNarStream = BoxStream<'static, Result<proto::GetNarResponse, Status>>;

    async fn get_nar(
        &self,
        request: Request<proto::GetNarRequest>,
    ) -> Result<Response<Self::GetNarStream>, Status> {
        let (session, permit) = self.session_stream(&request, &request.get_ref().session_id)?;
        let proto::GetNarRequest {
            url,
            offset,
            length,
            ..
        } = request.into_inner();
        let narinfo = session.served_nar(&url).ok_or_else(|| not_named(&url))?;
        let chunks = self
            .cache
            .read_nar(&narinfo, offset, length)?
            .ok_or_else(|| not_named(&url))?;
        let replies = chunks.map(|chunk| {
            chunk
                .map(|data| proto::GetNarResponse { data })
                .map_err(Status::from)
        });
        Ok(Response::new(permit.hold(replies).boxed()))
    }

    type GetNarsStream = BoxStream<'static, Result<proto::GetNarsResponse, Status>>;

    async fn get_nars(
        &self,
        request: Request<proto::GetNarsRequest>,
    ) -> Result<Response<Self::GetNarsStream>, Status> {
        let (session, permit) = self.session_stream(&request, &request.get_ref().session_id)?;
        let urls = request.into_inner().urls;
        if urls.len() > proto::MAX_NARS_PER_CALL {
            return Err(ServerError::InvalidArgument(format!(
                "{} URLs asked for at once; at most {}",
                urls.len(),
                proto::MAX_NARS_PER_CALL
            ))
            .into());
        }
        let narinfos = urls
            .iter()
            .map(|url| session.served_nar(url).ok_or_else(|| not_named(url)))
            .collect::<Result<Vec<_>, _>>()?;
        let cache = self.cache.clone();
        // Each file is opened only once the one before it has been sent.
        let files = stream::iter(narinfos.into_iter().zip(0u32..)).map(move |(narinfo, index)| {
            let chunks: NarStream = cache
                .read_nar(&narinfo, 0, 0)?
                .ok_or_else(|| not_named(&narinfo.url))?;
            Ok::<_, ServerError>(chunks.map_ok(move |data| proto::GetNarsResponse { index, data }))
        });
        let replies = files.try_flatten().map_err(Status::from);
        Ok(Response::new(permit.hold(Box::pin(replies)).boxed()))
    }
}

fn not_named(url: &str) -> ServerError {
    ServerError::NotFound(format!("{url} was not named by a narinfo of this session"))
}
