//! The builder's persistent signed binary cache (`DATA_DIR/cache`) and the
//! Cache service that serves it to the session that built the outputs.
//!
//! The layout is a Nix binary cache (`<hash>.narinfo`, `nar/<hash>.nar.zst`).
//! A narinfo is made on first request from what the store records (hash,
//! size, references; fetched in batches for a session's whole closure) and
//! signed with the builder's key, so Nix can start fetching at once.
//!
//! Its NAR is served straight from the store, serialised in-process for
//! each byte range asked for: store paths are immutable, and copying one
//! into the cache before serving it would cost a write of every byte (about
//! a second of CPU per GiB) for a file no faster to read than the store.
//! What the cache keeps is what the store cannot give: once a NAR of at
//! least 1 MiB has been served to its end, it is compressed with zstd in
//! the background, and kept, with a narinfo naming it, when that saves at
//! least a tenth and the NAR matches the store's own hash. Later sessions
//! are then served the smaller file; incompressible outputs never pay for
//! decompression. Least recently used entries are pruned past the size
//! limit.
//!
//! A store that is not on this file system (reached only through
//! `nix-store --dump`) cannot be read by range, so its NARs are written to
//! the cache first, and every reader follows that write (see
//! [`super::nar_file`]).
//!
//! - `fill`: writing an entry from `nix-store --dump` while readers follow.
//! - `compress`: keeping a zstd copy of an entry when that pays.
//! - `prune`: the size limit, and what a crash left behind.

mod compress;
mod fill;
mod prune;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    ops::Range,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{StreamExt as _, stream::BoxStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use self::{
    fill::OpenEntries,
    prune::{filetime_touch, prune_dir, remove_leftovers},
};
use super::{
    error::ServerError,
    nar_file::{NarFile, READ_AHEAD, range_end},
};
use crate::{
    nix::{
        narinfo::NarInfo,
        signing::SecretKey,
        store_path::{STORE_DIR, StorePath},
    },
    nixcmd::{Nix, PathInfo},
    store_nar::{self, Serialiser, Step},
    transport::http2::CHUNK,
};

/// Path infos fetched with one `nix path-info` call: a session's closure
/// is asked for in batches this large, ahead of Nix's narinfo requests.
const INFO_BATCH: usize = 1000;

/// Path infos kept for the narinfo requests and fills to come; past this
/// all are dropped (a later request then asks Nix again).
const MAX_KNOWN_INFOS: usize = 20_000;

/// Serialisers kept paused at the end of a range, for the next range of the
/// same NAR (see [`SignedCache::serve_from_store`]), and for how long.
const MAX_PARKED: usize = 16;
const PARKED_FOR: Duration = Duration::from_secs(30);

/// Why a cache entry could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The path is not valid in the builder's store.
    #[error("{0} is not in the builder's store")]
    NotInStore(StorePath),
    /// Nix failed.
    #[error(transparent)]
    Nix(#[from] crate::nixcmd::NixCmdError),
    /// The store's NAR does not match the store's own hash or size.
    #[error("the NAR of {0} does not match the hash and size the store records")]
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
    /// Permits to write or compress an entry.
    fills: Arc<Semaphore>,
    max_bytes: Option<u64>,
    /// Entries being filled (one writer each) or just filled.
    open: OpenEntries,
    /// Paths whose NARs are being compressed or were not worth it.
    tried: Mutex<HashSet<StorePath>>,
    /// Serialisers paused at the end of a range, with their NAR's URL and
    /// when they paused.
    parked: Mutex<VecDeque<(String, Instant, Serialiser)>>,
    /// What the store records about paths about to be asked for.
    infos: Mutex<HashMap<StorePath, PathInfo>>,
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
        remove_leftovers(&dir);
        Self {
            dir,
            key,
            nix,
            fills: Arc::new(Semaphore::new(parallel_fills.max(1))),
            max_bytes,
            open: OpenEntries::default(),
            tried: Mutex::new(HashSet::new()),
            parked: Mutex::new(VecDeque::new()),
            infos: Mutex::new(HashMap::new()),
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

    /// The signed narinfo of `path`: from disk if its entry is complete,
    /// else made from what the store records, its NAR to be streamed by
    /// [`Self::read_nar`]. `neighbours` (the rest of the requester's
    /// closure) are looked up in the same batch, so a closure of many small
    /// paths costs a few `nix path-info` calls, not one per path.
    pub async fn narinfo(
        &self,
        path: &StorePath,
        neighbours: impl FnOnce() -> Vec<StorePath>,
    ) -> Result<NarInfo, CacheError> {
        if let Some(narinfo) = self.read_ready(path).await {
            return Ok(narinfo);
        }
        let info = self.path_info(path, neighbours).await?;
        let mut narinfo = info.to_narinfo(format!("nar/{}.nar", info.nar_hash.to_nix_base32()));
        narinfo.signatures.clear();
        narinfo.sign(&self.key);
        Ok(narinfo)
    }

    async fn path_info(
        &self,
        path: &StorePath,
        neighbours: impl FnOnce() -> Vec<StorePath>,
    ) -> Result<PathInfo, CacheError> {
        if let Some(info) = self.known_info(path) {
            return Ok(info);
        }
        let mut batch = vec![path.clone()];
        {
            let known = self.infos.lock().unwrap_or_else(|p| p.into_inner());
            batch.extend(
                neighbours()
                    .into_iter()
                    .filter(|p| p != path && !known.contains_key(p))
                    .filter(|p| !self.narinfo_path(p).exists())
                    .take(INFO_BATCH - 1),
            );
        }
        self.remember(self.nix.path_info(&batch).await?);
        self.known_info(path)
            .ok_or_else(|| CacheError::NotInStore(path.clone()))
    }

    /// Keeps what the store records about `infos`' paths for the narinfo
    /// requests to come.
    pub fn remember(&self, infos: Vec<PathInfo>) {
        let mut known = self.infos.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() + infos.len() > MAX_KNOWN_INFOS {
            known.clear();
        }
        known.extend(infos.into_iter().map(|info| (info.path.clone(), info)));
    }

    /// What the store records about `path`, if known. Kept, not taken: a
    /// session asking again for the same narinfo must not make the builder
    /// run Nix again (the map is bounded by [`MAX_KNOWN_INFOS`]).
    fn known_info(&self, path: &StorePath) -> Option<PathInfo> {
        self.infos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
            .cloned()
    }

    /// Streams `length` bytes from `offset` (0: to the end) of the NAR file
    /// that `narinfo` (one this cache signed) names. `None` if there is no
    /// such file: a compressed file pruned meanwhile, as only plain NARs can
    /// be made again exactly as their narinfo says.
    pub fn read_nar(
        self: &Arc<Self>,
        narinfo: &NarInfo,
        offset: u64,
        length: u64,
    ) -> Result<Option<NarStream>, ServerError> {
        let Some(name) = narinfo
            .url
            .strip_prefix("nar/")
            .filter(|_| narinfo.has_plain_nar_url())
        else {
            return Ok(None);
        };
        let unservable = |err: CacheError| {
            warn!(url = %narinfo.url, "opening a cache entry: {err}");
            ServerError::Internal(format!(
                "the builder could not serve {}: {err}",
                narinfo.url
            ))
        };
        let file = match self.file(narinfo, name).map_err(unservable)? {
            Some(file) => file,
            None if !matches!(narinfo.compression.as_deref(), None | Some("none")) => {
                return Ok(None);
            }
            None => match store_nar::physical(&narinfo.store_path) {
                Some(path) => {
                    return self
                        .serve_from_store(path, narinfo, offset, length)
                        .map(Some);
                }
                None if Path::new(STORE_DIR).is_dir() => return Err(gone(&narinfo.store_path)),
                None => self.start_fill(narinfo.clone()).map_err(unservable)?,
            },
        };
        let chunks = file.read_range(offset, length)?;
        Ok(Some(ReceiverStream::new(chunks).boxed()))
    }

    /// The cache's file for `narinfo`, named `name`: being filled, or on disk.
    fn file(&self, narinfo: &NarInfo, name: &str) -> Result<Option<NarFile>, CacheError> {
        if let Some(entry) = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&narinfo.url)
        {
            entry.touched = Instant::now();
            return Ok(Some(entry.nar.clone()));
        }
        match std::fs::File::open(self.dir.join("nar").join(name)) {
            Ok(file) => {
                let size = file.metadata()?.len();
                Ok(Some(NarFile::complete(file, size)))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Serialises a byte range of the NAR of `narinfo`'s path, at `path` on
    /// this file system. A client fetching consecutive ranges of a large NAR
    /// (over several streams) gets each from where the previous one paused,
    /// not from a new walk of the tree. Once one has been served to its end,
    /// compressing it is tried in the background.
    fn serve_from_store(
        self: &Arc<Self>,
        path: PathBuf,
        narinfo: &NarInfo,
        offset: u64,
        length: u64,
    ) -> Result<NarStream, ServerError> {
        let end = range_end(offset, length, narinfo.nar_size)?;
        let nar = match self.unpark(&narinfo.url, offset) {
            Some(mut nar) => {
                nar.continue_with(offset..end);
                nar
            }
            None => Serialiser::new(path, offset..end, CHUNK),
        };
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let (cache, narinfo) = (self.clone(), narinfo.clone());
        tokio::spawn(async move {
            let store_path = &narinfo.store_path;
            let steps = store_nar::stream(nar);
            tokio::pin!(steps);
            let mut sent = 0;
            while let Some(step) = steps.next().await {
                match step {
                    Ok(Step::Chunk(bytes)) => {
                        sent += bytes.len() as u64;
                        if tx.send(Ok(bytes)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Step::End(_)) if sent != end - offset => {
                        let err = CacheError::Corrupt(store_path.clone());
                        warn!("{err}");
                        let _ = tx.send(Err(ServerError::Internal(err.to_string()))).await;
                    }
                    Ok(Step::End(_)) if end == narinfo.nar_size => {
                        cache.compress_later(narinfo.clone());
                    }
                    Ok(Step::End(nar)) => cache.park(&narinfo.url, nar),
                    Err(err) => {
                        warn!(%store_path, "serving a NAR from the store: {err}");
                        let status = match store_nar::physical(store_path) {
                            None => gone(store_path),
                            Some(_) => ServerError::Internal(format!(
                                "the builder could not serve {store_path}: {err}"
                            )),
                        };
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(ReceiverStream::new(rx).boxed())
    }

    fn park(&self, url: &str, mut nar: Serialiser) {
        nar.close_files();
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        if parked.len() >= MAX_PARKED {
            parked.pop_front();
        }
        parked.push_back((url.to_owned(), Instant::now(), nar));
    }

    /// The serialiser of `url` paused closest before `offset`: with several
    /// ranges in flight, the next range starts a few ranges after the one
    /// that just ended, and skipping those costs only their metadata.
    fn unpark(&self, url: &str, offset: u64) -> Option<Serialiser> {
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        parked.retain(|(_, since, _)| since.elapsed() < PARKED_FOR);
        let (at, _) = parked
            .iter()
            .enumerate()
            .filter(|(_, (u, _, nar))| u == url && nar.position() <= offset)
            .max_by_key(|(_, (_, _, nar))| nar.position())?;
        parked.remove(at).map(|(_, _, nar)| nar)
    }
}

/// A path that left the builder's store (collected as garbage) after its
/// narinfo was served.
fn gone(path: &StorePath) -> ServerError {
    ServerError::NotFound(format!(
        "{path} is no longer in the builder's store (garbage-collected?); build again"
    ))
}

/// A stream of NAR bytes for the Cache service.
pub type NarStream = BoxStream<'static, Result<Bytes, ServerError>>;

/// Hands a range of a NAR to a sink; returns how many bytes it handed on.
type ReadNar<'a> =
    &'a dyn Fn(Range<u64>, &mut dyn FnMut(Bytes) -> std::io::Result<()>) -> std::io::Result<u64>;

/// Runs cache file work on the blocking pool.
async fn on_blocking_pool<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|err| Err(CacheError::Io(std::io::Error::other(err))))
}

/// Writes `narinfo` as the entry of its path, whose NAR file is in place,
/// then prunes the cache down to `max_bytes`.
fn record_entry(
    dir: &Path,
    narinfo_path: &Path,
    narinfo: &NarInfo,
    max_bytes: Option<u64>,
) -> Result<(), CacheError> {
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(tmp.path(), narinfo.to_string())?;
    tmp.persist(narinfo_path).map_err(|err| err.error)?;
    if let Some(max) = max_bytes {
        match prune_dir(dir, max) {
            Ok(0) => {}
            Ok(removed) => info!(removed, "pruned cache entries"),
            Err(err) => warn!("pruning the cache: {err}"),
        }
    }
    Ok(())
}
