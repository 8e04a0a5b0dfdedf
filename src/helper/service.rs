//! The `ImportHelper` gRPC service.

use std::{sync::Arc, time::Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    HelperError,
    allowlist::SharedAllowlist,
    filter::NarinfoFilter,
    request::{ValidImport, exact_key},
};
use crate::{
    loopback_cache::LoopbackCache,
    nix::store_path::StorePath,
    nixcmd::Nix,
    proto::{
        CheckKeyRequest, CheckKeyResponse, ImportRequest, ImportResponse,
        import_helper_server::ImportHelper,
    },
    transport::UnixPeer,
};

/// Imports that may run at once; more wait their turn.
const CONCURRENT_IMPORTS: usize = 2;

/// Batches an import is split into at most, for progress reports.
const PROGRESS_STEPS: usize = 20;

/// The helper's state: the allowlist and how to run Nix.
#[derive(Debug)]
pub struct ImportHelperService {
    allowlist: Arc<SharedAllowlist>,
    nix: Nix,
    running: Arc<Semaphore>,
}

impl ImportHelperService {
    /// A service that imports with `nix` for keys on `allowlist`.
    pub fn new(allowlist: Arc<SharedAllowlist>, nix: Nix) -> Self {
        Self {
            allowlist,
            nix,
            running: Arc::new(Semaphore::new(CONCURRENT_IMPORTS)),
        }
    }
}

type ImportStream = ReceiverStream<Result<ImportResponse, Status>>;

#[tonic::async_trait]
impl ImportHelper for ImportHelperService {
    async fn check_key(
        &self,
        request: Request<CheckKeyRequest>,
    ) -> Result<Response<CheckKeyResponse>, Status> {
        let key = exact_key(&request.get_ref().builder_public_key).map_err(|err| {
            debug!("refused: {err}");
            err.to_status()
        })?;
        let allowlisted = self.allowlist.get().contains(&key);
        debug!(%key, allowlisted, "key checked");
        Ok(Response::new(CheckKeyResponse { allowlisted }))
    }

    type ImportStream = ImportStream;

    async fn import(
        &self,
        request: Request<ImportRequest>,
    ) -> Result<Response<ImportStream>, Status> {
        let uid = request.extensions().get::<UnixPeer>().map(|peer| peer.uid);
        let job = ValidImport::check(request.get_ref(), &self.allowlist.get()).map_err(|err| {
            warn!(?uid, "import refused: {err}");
            err.to_status()
        })?;
        let span = info_span!(
            "import",
            uid,
            key = %job.key.name(),
            cache = %job.url,
            paths = job.paths.len()
        );
        let (tx, rx) = mpsc::channel(4);
        let nix = self.nix.clone();
        let running = self.running.clone();
        tokio::spawn(
            async move {
                // The semaphore is never closed.
                let Ok(_turn) = running.acquire_owned().await else {
                    return;
                };
                run(&nix, &job, &tx).await;
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Copies the paths in batches, reporting after each; stops when the
/// caller has gone.
async fn run(nix: &Nix, job: &ValidImport, tx: &mpsc::Sender<Result<ImportResponse, Status>>) {
    let started = Instant::now();
    let total = job.paths.len();
    let report = |done: usize, bytes: u64| ImportResponse {
        paths_done: u32::try_from(done).unwrap_or(u32::MAX),
        paths_total: u32::try_from(total).unwrap_or(u32::MAX),
        bytes_done: bytes,
    };
    if tx.send(Ok(report(0, 0))).await.is_err() {
        return;
    }
    // Root's Nix reads only through the filter, never the caller's cache.
    let filter = match LoopbackCache::start(NarinfoFilter::new(job.url)) {
        Ok(filter) => filter,
        Err(err) => {
            let err = HelperError::ImportFailed(format!("starting the narinfo filter: {err}"));
            warn!("{err}");
            let _ = tx.send(Err(err.to_status())).await;
            return;
        }
    };
    let url = filter.url();
    let (mut done, mut bytes) = (0, 0);
    for batch in job.paths.chunks(total.div_ceil(PROGRESS_STEPS)) {
        match copy(nix, &url, job, batch).await {
            Ok(batch_bytes) => {
                done += batch.len();
                bytes += batch_bytes;
                debug!(done, bytes, "batch imported");
            }
            Err(err) => {
                warn!("{err}");
                let _ = tx.send(Err(err.to_status())).await;
                return;
            }
        }
        if tx.send(Ok(report(done, bytes))).await.is_err() {
            info!(done, "the caller went away; stopping");
            return;
        }
    }
    info!(
        bytes,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "imported"
    );
}

/// Copies one batch and returns the NAR bytes of its paths, after checking
/// that every one of them is now valid.
async fn copy(
    nix: &Nix,
    url: &str,
    job: &ValidImport,
    batch: &[StorePath],
) -> Result<u64, HelperError> {
    nix.copy_from(url, batch, Some(&job.key), true)
        .await
        .map_err(|err| HelperError::import_failed(&err))?;
    let infos = nix
        .path_info(batch)
        .await
        .map_err(|err| HelperError::import_failed(&err))?;
    if let Some(missing) = batch
        .iter()
        .find(|path| !infos.iter().any(|info| info.path == **path))
    {
        return Err(HelperError::ImportFailed(format!(
            "Nix reported success, but {missing} is not valid"
        )));
    }
    Ok(infos.iter().map(|info| info.nar_size).sum())
}
