//! The builder's persistent signed binary cache (`DATA_DIR/cache`) and the
//! Cache service that serves it to the session that built the outputs.
//!
//! The layout is a Nix binary cache (`<hash>.narinfo`, `nar/<filehash>.nar.zst`),
//! filled on first request: the NAR is dumped from the store, checked
//! against the store's own hash, compressed, and described by a narinfo
//! signed with the builder's key. Later requests, from any session, are
//! served from disk. Least recently used entries are pruned past the size
//! limit.

use std::{
    collections::HashMap,
    io::Write as _,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
};

use tokio::{io::AsyncReadExt, sync::Semaphore};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::{auth::principal, session::Sessions};
use crate::{
    nix::{
        hash::Sha256Hash,
        nar::NarHasher,
        narinfo::NarInfo,
        signing::SecretKey,
        store_path::{StorePath, StorePathHash},
    },
    nixcmd::Nix,
    proto::{self, cache_server},
    transport::IrohPeer,
};

/// Bytes per NAR chunk on the wire.
const CHUNK: usize = 256 << 10;

/// Why a cache entry could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The path is not valid in the builder's store.
    #[error("{0} is not in the builder's store")]
    NotInStore(StorePath),
    /// Nix failed.
    #[error(transparent)]
    Nix(#[from] crate::nixcmd::NixCmdError),
    /// The store's NAR does not match the store's own hash.
    #[error("the NAR of {0} does not match the hash the store records")]
    Corrupt(StorePath),
    /// Disk trouble.
    #[error("cache I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// The signed cache on disk.
#[derive(Debug)]
pub struct SignedCache {
    dir: PathBuf,
    key: SecretKey,
    nix: Nix,
    fills: Semaphore,
    max_bytes: Option<u64>,
    filling: Mutex<HashMap<StorePathHash, Arc<tokio::sync::Mutex<()>>>>,
}

impl SignedCache {
    /// A cache in `dir`, signing with `key`, filling at most `parallel_fills`
    /// entries at once and pruning past `max_bytes`.
    pub fn new(
        dir: PathBuf,
        key: SecretKey,
        nix: Nix,
        parallel_fills: usize,
        max_bytes: Option<u64>,
    ) -> Self {
        Self {
            dir,
            key,
            nix,
            fills: Semaphore::new(parallel_fills.max(1)),
            max_bytes,
            filling: Mutex::new(HashMap::new()),
        }
    }

    fn narinfo_path(&self, path: &StorePath) -> PathBuf {
        self.dir.join(format!("{}.narinfo", path.hash_part()))
    }

    async fn read_ready(&self, path: &StorePath) -> Option<NarInfo> {
        let file = self.narinfo_path(path);
        let text = tokio::fs::read_to_string(&file).await.ok()?;
        let narinfo: NarInfo = text.parse().ok()?;
        let ready = narinfo.store_path == *path
            && narinfo.is_signed_by(&self.key.to_public())
            && tokio::fs::metadata(self.dir.join(&narinfo.url))
                .await
                .is_ok();
        if ready {
            // The modification time is the LRU clock for pruning.
            let _ = filetime_touch(&file);
        }
        ready.then_some(narinfo)
    }

    /// The signed narinfo of `path`, filling the entry first if needed.
    pub async fn narinfo(&self, path: &StorePath) -> Result<NarInfo, CacheError> {
        if let Some(narinfo) = self.read_ready(path).await {
            return Ok(narinfo);
        }
        let lock = {
            let mut filling = self.filling.lock().unwrap_or_else(|p| p.into_inner());
            filling.entry(*path.hash_part()).or_default().clone()
        };
        let result = async {
            let _guard = lock.lock().await;
            if let Some(narinfo) = self.read_ready(path).await {
                return Ok(narinfo);
            }
            let _permit = self
                .fills
                .acquire()
                .await
                .expect("the semaphore is never closed");
            self.fill(path).await
        }
        .await;
        {
            let mut filling = self.filling.lock().unwrap_or_else(|p| p.into_inner());
            // The map holds only entries being filled, so it cannot grow without bound.
            if Arc::strong_count(&lock) == 2 {
                filling.remove(path.hash_part());
            }
        }
        if result.is_ok() {
            self.prune().await;
        }
        result
    }

    async fn fill(&self, path: &StorePath) -> Result<NarInfo, CacheError> {
        let info = self
            .nix
            .path_info(std::slice::from_ref(path))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| CacheError::NotInStore(path.clone()))?;
        let nar_dir = self.dir.join("nar");
        tokio::fs::create_dir_all(&nar_dir).await?;
        let tmp = tempfile::NamedTempFile::new_in(&nar_dir)?;
        let mut reader = self.nix.dump(path)?;
        let mut encoder = zstd::stream::write::Encoder::new(HashingWriter::new(tmp.reopen()?), 1)?;
        let mut nar = NarHasher::new();
        let mut buffer = vec![0u8; CHUNK];
        loop {
            let n = reader.read(&mut buffer).await?;
            if n == 0 {
                break;
            }
            nar.write_all(&buffer[..n])
                .expect("hashing into memory cannot fail");
            tokio::task::block_in_place(|| encoder.write_all(&buffer[..n]))?;
        }
        let writer = tokio::task::block_in_place(|| encoder.finish())?;
        let (file_hash, file_size) = writer.finish()?;
        let (nar_hash, nar_size) = nar.finish();
        if nar_hash != info.nar_hash || nar_size != info.nar_size {
            return Err(CacheError::Corrupt(path.clone()));
        }
        let url = format!("nar/{}.nar.zst", file_hash.to_nix_base32());
        tmp.persist(self.dir.join(&url)).map_err(|err| err.error)?;
        let mut narinfo = NarInfo {
            store_path: path.clone(),
            url,
            compression: Some("zstd".to_owned()),
            file_hash: Some(file_hash),
            file_size: Some(file_size),
            nar_hash,
            nar_size,
            // Nix lists a self-reference among the references; so do narinfos.
            references: info.references.into_iter().collect(),
            deriver: info.deriver,
            signatures: Vec::new(),
            ca: info.ca,
            extra: Vec::new(),
        };
        narinfo.sign(&self.key);
        let tmp_info = tempfile::NamedTempFile::new_in(&self.dir)?;
        tokio::fs::write(tmp_info.path(), narinfo.to_string()).await?;
        tmp_info
            .persist(self.narinfo_path(path))
            .map_err(|err| err.error)?;
        info!(%path, nar_size, file_size, "cache entry filled");
        Ok(narinfo)
    }

    /// Opens a NAR file named by a narinfo `URL:`.
    pub async fn open_nar(&self, url: &str) -> Option<tokio::fs::File> {
        let name = url.strip_prefix("nar/")?;
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return None;
        }
        tokio::fs::File::open(self.dir.join("nar").join(name))
            .await
            .ok()
    }

    /// Removes least recently used entries until the cache fits its limit.
    async fn prune(&self) {
        let Some(max) = self.max_bytes else {
            return;
        };
        let dir = self.dir.clone();
        let result = tokio::task::spawn_blocking(move || prune_dir(&dir, max)).await;
        match result {
            Ok(Ok(0)) => {}
            Ok(Ok(removed)) => info!(removed, "pruned cache entries"),
            Ok(Err(err)) => warn!("pruning the cache: {err}"),
            Err(err) => warn!("pruning the cache: {err}"),
        }
    }
}

fn filetime_touch(path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::options().append(true).open(path)?;
    file.set_modified(std::time::SystemTime::now())
}

fn prune_dir(dir: &Path, max: u64) -> std::io::Result<usize> {
    let mut entries = Vec::new();
    let mut total = 0u64;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".narinfo") {
            continue;
        }
        let Ok(narinfo) = std::fs::read_to_string(entry.path()).map(|t| t.parse::<NarInfo>())
        else {
            continue;
        };
        let Ok(narinfo) = narinfo else { continue };
        let size = narinfo.file_size.unwrap_or(narinfo.nar_size);
        total += size;
        entries.push((
            entry.metadata()?.modified()?,
            entry.path(),
            dir.join(&narinfo.url),
            size,
        ));
    }
    entries.sort_by_key(|(modified, ..)| *modified);
    let mut removed = 0;
    for (_, narinfo, nar, size) in entries {
        if total <= max {
            break;
        }
        std::fs::remove_file(&narinfo)?;
        let _ = std::fs::remove_file(&nar);
        total = total.saturating_sub(size);
        removed += 1;
    }
    Ok(removed)
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    size: u64,
}

impl<W: std::io::Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: sha2::Digest::new(),
            size: 0,
        }
    }

    fn finish(mut self) -> std::io::Result<(Sha256Hash, u64)> {
        self.inner.flush()?;
        let digest: [u8; 32] = sha2::Digest::finalize(self.hasher).into();
        Ok((Sha256Hash::from_bytes(digest), self.size))
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Serves [`cache_server::Cache`] to sessions.
#[derive(Debug)]
pub struct CacheService {
    cache: Arc<SignedCache>,
    sessions: Arc<Sessions>,
}

impl CacheService {
    /// A service over `cache` for `sessions`.
    pub fn new(cache: Arc<SignedCache>, sessions: Arc<Sessions>) -> Self {
        Self { cache, sessions }
    }

    fn session<T>(
        &self,
        request: &Request<T>,
        id: &str,
    ) -> Result<Arc<super::session::Session>, Status> {
        principal(request)?;
        let peer = request
            .extensions()
            .get::<IrohPeer>()
            .ok_or_else(|| Status::failed_precondition("the cache is served over Iroh"))?;
        self.sessions.get(id, peer.endpoint_id)
    }
}

type NarStream = Pin<Box<dyn Stream<Item = Result<proto::GetNarResponse, Status>> + Send>>;

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
            .map_err(|err| Status::invalid_argument(format!("store_path_hash: {err}")))?;
        let not_found =
            || Status::not_found(format!("{hash} is not an output of this session's build"));
        let path = session.readable(&hash).ok_or_else(not_found)?;
        let narinfo = self.cache.narinfo(&path).await.map_err(|err| {
            warn!(%path, "cache fill failed: {err}");
            match err {
                CacheError::NotInStore(_) => not_found(),
                other => Status::internal(format!("the builder could not serve {path}: {other}")),
            }
        })?;
        session.allow_nar(&narinfo.url);
        debug!(session = %session.id, %path, "narinfo served");
        Ok(Response::new(proto::GetNarInfoResponse {
            narinfo: narinfo.to_string(),
        }))
    }

    type GetNarStream = NarStream;

    async fn get_nar(
        &self,
        request: Request<proto::GetNarRequest>,
    ) -> Result<Response<NarStream>, Status> {
        let session = self.session(&request, &request.get_ref().session_id)?;
        let url = request.into_inner().url;
        let not_found =
            || Status::not_found(format!("{url} was not named by a narinfo of this session"));
        if !session.may_fetch_nar(&url) {
            return Err(not_found());
        }
        let mut file = self.cache.open_nar(&url).await.ok_or_else(not_found)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let mut chunk = vec![0u8; CHUNK];
                let result = match file.read(&mut chunk).await {
                    Ok(0) => return,
                    Ok(n) => {
                        chunk.truncate(n);
                        Ok(proto::GetNarResponse { data: chunk.into() })
                    }
                    Err(err) => Err(Status::internal(format!("reading a cached NAR: {err}"))),
                };
                let failed = result.is_err();
                if tx.send(result).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
