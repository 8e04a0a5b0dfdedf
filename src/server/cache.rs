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

use std::{
    collections::{HashMap, HashSet, VecDeque},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    ops::Range,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{
    StreamExt as _, TryStreamExt as _,
    stream::{self, BoxStream},
};
use tokio::{
    io::AsyncReadExt,
    sync::{Semaphore, mpsc},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::nar_file::{NarFile, Writer, range_end};
use super::{auth::principal, session::Sessions};
use crate::{
    nix::{
        hash::Sha256Hash,
        nar::NarHasher,
        narinfo::NarInfo,
        signing::SecretKey,
        store_path::{STORE_DIR, StorePath, StorePathHash},
    },
    nixcmd::{Nix, PathInfo},
    proto::{self, cache_server},
    store_nar::{self, Serialiser, Step},
    transport::{IrohPeer, http2::CHUNK},
};

/// Path infos fetched with one `nix path-info` call: a session's closure
/// is asked for in batches this large, ahead of Nix's narinfo requests.
const INFO_BATCH: usize = 1000;

/// Path infos kept for fills to come; beyond this the oldest batch is
/// dropped (a fill then asks for its own).
const MAX_KNOWN_INFOS: usize = 20_000;

/// Paths remembered as not worth compressing (or being compressed);
/// beyond this they are forgotten, and at worst tried once more.
const MAX_TRIED: usize = 20_000;

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
        if let Some(info) = self.take_info(path) {
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
        self.take_info(path)
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

    fn take_info(&self, path: &StorePath) -> Option<PathInfo> {
        self.infos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(path)
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
    ) -> Result<Option<NarStream>, Status> {
        let Some(name) = narinfo.url.strip_prefix("nar/") else {
            return Ok(None);
        };
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Ok(None);
        }
        let unservable = |err: CacheError| {
            warn!(url = %narinfo.url, "opening a cache entry: {err}");
            Status::internal(format!(
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
    ) -> Result<NarStream, Status> {
        let end = range_end(offset, length, narinfo.nar_size)?;
        let nar = match self.unpark(&narinfo.url, offset) {
            Some(mut nar) => {
                nar.continue_with(offset..end);
                nar
            }
            None => Serialiser::new(path, offset..end, CHUNK),
        };
        let (tx, rx) = mpsc::channel(4);
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
                        let _ = tx.send(Err(Status::internal(err.to_string()))).await;
                    }
                    Ok(Step::End(_)) if end == narinfo.nar_size => {
                        cache.compress_later(narinfo.clone());
                    }
                    Ok(Step::End(nar)) => cache.park(&narinfo.url, nar),
                    Err(err) => {
                        warn!(%store_path, "serving a NAR from the store: {err}");
                        let status = match store_nar::physical(store_path) {
                            None => gone(store_path),
                            Some(_) => Status::internal(format!(
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

    /// Tries, once per path and holding a fill permit, to keep a compressed
    /// copy of the plain NAR that `narinfo` names.
    fn compress_later(self: &Arc<Self>, narinfo: NarInfo) {
        if narinfo.nar_size < COMPRESS_FROM {
            return;
        }
        {
            let mut tried = self.tried.lock().unwrap_or_else(|p| p.into_inner());
            if tried.len() >= MAX_TRIED {
                tried.clear();
            }
            if !tried.insert(narinfo.store_path.clone()) {
                return;
            }
        }
        let cache = self.clone();
        tokio::spawn(async move {
            let _permit = cache.fills.clone().acquire_owned().await;
            let path = narinfo.store_path.clone();
            if cache.read_ready(&path).await.is_none() {
                let keep = cache.clone();
                match on_blocking_pool(move || keep.keep_compressed(&narinfo)).await {
                    Ok(true) => info!(%path, "cache entry compressed"),
                    Ok(false) => {
                        debug!(%path, "not worth compressing");
                        return;
                    }
                    Err(err) => warn!(%path, "compressing a cache entry: {err}"),
                }
            }
            // Kept entries are found on disk, and a failure may pass.
            cache
                .tried
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&path);
        });
    }

    /// Keeps a compressed copy of the plain NAR `narinfo` names, read from
    /// the store, if that pays; returns whether it did.
    fn keep_compressed(&self, narinfo: &NarInfo) -> Result<bool, CacheError> {
        let path = &narinfo.store_path;
        let physical =
            store_nar::physical(path).ok_or_else(|| CacheError::NotInStore(path.clone()))?;
        let read: ReadNar = &|range, sink| store_nar::dump_range(&physical, range, CHUNK, sink);
        let Some(compressed) = compress(read, &self.dir, narinfo)? else {
            return Ok(false);
        };
        record_entry(
            &self.dir,
            &self.narinfo_path(path),
            &compressed,
            self.max_bytes,
        )?;
        Ok(true)
    }

    /// Starts writing the entry of `narinfo` from `nix-store --dump`; readers
    /// follow the returned file as it grows.
    fn start_fill(&self, narinfo: NarInfo) -> Result<NarFile, CacheError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = open.get(&narinfo.url) {
            return Ok(entry.nar.clone());
        }
        let nar_dir = self.dir.join("nar");
        std::fs::create_dir_all(&nar_dir)?;
        let tmp = tempfile::NamedTempFile::new_in(&nar_dir)?;
        let (nar, writer) = NarFile::growing(tmp.reopen()?, narinfo.nar_size);
        open.insert(
            narinfo.url.clone(),
            OpenEntry {
                nar: nar.clone(),
                touched: Instant::now(),
            },
        );
        let fill = Fill {
            dir: self.dir.clone(),
            narinfo_path: self.narinfo_path(&narinfo.store_path),
            max_bytes: self.max_bytes,
            nix: self.nix.clone(),
            narinfo,
        };
        let fills = self.fills.clone();
        let open = self.open.clone();
        tokio::spawn(async move {
            let url = fill.narinfo.url.clone();
            let path = fill.narinfo.store_path.clone();
            let nar_size = fill.narinfo.nar_size;
            let permit = fills.acquire_owned().await;
            let result = on_blocking_pool(move || fill.run(tmp, writer)).await;
            drop(permit);
            match result {
                Ok(replaced) => {
                    info!(%path, nar_size, "cache entry filled");
                    if replaced {
                        linger(&open, &url).await;
                    }
                }
                Err(err) => warn!(%path, "filling a cache entry: {err}"),
            }
            open.lock().unwrap_or_else(|p| p.into_inner()).remove(&url);
        });
        Ok(nar)
    }
}

/// How long an entry whose plain file compression replaced stays readable
/// under the URL it was filled as, after its last use: a client may still
/// be fetching ranges of it (one that pauses longer gets the plain NAR
/// filled again). Short, because while the file is open the kernel writes
/// the deleted file's pages back to disk like any other.
const LINGER: Duration = Duration::from_secs(10);

async fn linger(open: &OpenEntries, url: &str) {
    loop {
        let touched = match open.lock().unwrap_or_else(|p| p.into_inner()).get(url) {
            Some(entry) => entry.touched,
            None => return,
        };
        if touched.elapsed() >= LINGER {
            return;
        }
        tokio::time::sleep(LINGER - touched.elapsed()).await;
    }
}

/// Entries being filled or recently filled, by URL.
type OpenEntries = Arc<Mutex<HashMap<String, OpenEntry>>>;

#[derive(Debug)]
struct OpenEntry {
    nar: NarFile,
    touched: Instant,
}

/// A stream of NAR bytes for the Cache service.
pub type NarStream = BoxStream<'static, Result<Bytes, Status>>;

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

/// Everything needed to write one cache entry on a blocking thread.
struct Fill {
    dir: PathBuf,
    narinfo_path: PathBuf,
    narinfo: NarInfo,
    max_bytes: Option<u64>,
    nix: Nix,
}

impl Fill {
    /// Writes the NAR into `tmp`, telling readers through `writer`, checks it
    /// against the store's hash and only then makes it an entry (compressed
    /// if that pays), narinfo last. Returns whether a compressed file
    /// replaced the plain one.
    fn run(self, tmp: tempfile::NamedTempFile, writer: Writer) -> Result<bool, CacheError> {
        match self.write(tmp.as_file(), &writer) {
            Ok(()) => {}
            Err(err) => {
                writer.abandon(&format!(
                    "the builder could not serve {}: {err}",
                    self.narinfo.store_path
                ));
                return Err(err);
            }
        }
        let plain = self.dir.join(&self.narinfo.url);
        tmp.persist(&plain).map_err(|err| err.error)?;
        writer.finish();
        let compressed = if self.narinfo.nar_size >= COMPRESS_FROM {
            compress(
                &|range, sink| read_file(&plain, range, sink),
                &self.dir,
                &self.narinfo,
            )
        } else {
            Ok(None)
        };
        let (narinfo, replaced) = match compressed {
            Ok(Some(compressed)) => {
                // Readers hold the plain file open, so it can go.
                let _ = std::fs::remove_file(&plain);
                (compressed, true)
            }
            Ok(None) => (self.narinfo.clone(), false),
            Err(err) => {
                warn!(path = %self.narinfo.store_path, "compressing a cache entry: {err}");
                (self.narinfo.clone(), false)
            }
        };
        record_entry(&self.dir, &self.narinfo_path, &narinfo, self.max_bytes)?;
        Ok(replaced)
    }

    fn write(&self, mut out: &std::fs::File, writer: &Writer) -> Result<(), CacheError> {
        let mut hasher = NarHasher::new();
        let mut sink = |bytes: Bytes| -> std::io::Result<()> {
            hasher
                .write_all(&bytes)
                .expect("hashing into memory cannot fail");
            out.write_all(&bytes)?;
            writer.advance(bytes.len() as u64);
            Ok(())
        };
        let handle = tokio::runtime::Handle::current();
        handle.block_on(async {
            let mut reader = self.nix.dump(&self.narinfo.store_path)?;
            let mut buffer = vec![0u8; CHUNK];
            loop {
                let n = reader.read(&mut buffer).await?;
                if n == 0 {
                    break;
                }
                sink(Bytes::copy_from_slice(&buffer[..n]))?;
            }
            Ok::<_, CacheError>(())
        })?;
        let (nar_hash, nar_size) = hasher.finish();
        if nar_hash != self.narinfo.nar_hash || nar_size != self.narinfo.nar_size {
            return Err(CacheError::Corrupt(self.narinfo.store_path.clone()));
        }
        Ok(())
    }
}

/// Entries shrink to at most this fraction (in tenths) of their NAR size,
/// or they stay uncompressed.
const WORTHWHILE_TENTHS: u64 = 9;

/// Smaller NARs stay uncompressed: their transfer costs round trips, not
/// bytes.
const COMPRESS_FROM: u64 = 1 << 20;

/// A zstd-compressed copy of the NAR of `narinfo`, which `read` gives, with
/// the narinfo naming it, when that saves at least a tenth. Compressible
/// outputs then cost less to send and store, while incompressible ones
/// never pay for decompression. The signature covers the NAR's hash and
/// size, not the file, so it stays valid, and the NAR is checked against
/// them. The first MiB decides whether trying the whole NAR is worth it:
/// random data would otherwise cost seconds of CPU per GiB for nothing.
fn compress(read: ReadNar, dir: &Path, narinfo: &NarInfo) -> Result<Option<NarInfo>, CacheError> {
    let mut sample = Vec::with_capacity(COMPRESS_FROM as usize);
    read(0..COMPRESS_FROM, &mut |bytes| {
        sample.extend_from_slice(&bytes);
        Ok(())
    })?;
    let compressed = zstd::bulk::compress(&sample, 3)?;
    if !worthwhile(compressed.len() as u64, sample.len() as u64) {
        return Ok(None);
    }
    let nar_dir = dir.join("nar");
    std::fs::create_dir_all(&nar_dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(nar_dir)?;
    let mut encoder = zstd::stream::Encoder::new(HashingWriter::new(tmp.as_file_mut()), 3)?;
    let mut nar = NarHasher::new();
    read(0..u64::MAX, &mut |bytes| {
        nar.write_all(&bytes)?;
        encoder.write_all(&bytes)
    })?;
    let (file_hash, file_size) = encoder.finish()?.finish();
    if nar.finish() != (narinfo.nar_hash, narinfo.nar_size) {
        return Err(CacheError::Corrupt(narinfo.store_path.clone()));
    }
    if !worthwhile(file_size, narinfo.nar_size) {
        return Ok(None);
    }
    let url = format!("nar/{}.nar.zst", file_hash.to_nix_base32());
    tmp.persist(dir.join(&url)).map_err(|err| err.error)?;
    Ok(Some(NarInfo {
        url,
        compression: Some("zstd".to_owned()),
        file_hash: Some(file_hash),
        file_size: Some(file_size),
        ..narinfo.clone()
    }))
}

/// Hands `range` of the file at `path` to `sink` in chunks.
fn read_file(
    path: &Path,
    range: Range<u64>,
    sink: &mut dyn FnMut(Bytes) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(range.start))?;
    let mut file = file.take(range.end.saturating_sub(range.start));
    let mut sent = 0;
    loop {
        let mut chunk = Vec::with_capacity(CHUNK);
        let n = (&mut file).take(CHUNK as u64).read_to_end(&mut chunk)?;
        if n == 0 {
            return Ok(sent);
        }
        sent += n as u64;
        sink(chunk.into())?;
    }
}

fn worthwhile(compressed: u64, plain: u64) -> bool {
    compressed.saturating_mul(10) <= plain.saturating_mul(WORTHWHILE_TENTHS)
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

    fn finish(self) -> (Sha256Hash, u64) {
        let digest: [u8; 32] = sha2::Digest::finalize(self.hasher).into();
        (Sha256Hash::from_bytes(digest), self.size)
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

/// Removes the temporary files of fills a crash cut short: entries are only
/// ever made by renaming a complete file into place.
fn remove_leftovers(dir: &Path) {
    for dir in [dir.to_owned(), dir.join("nar")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
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

/// A path that left the builder's store (collected as garbage) after its
/// narinfo was served.
fn gone(path: &StorePath) -> Status {
    Status::not_found(format!(
        "{path} is no longer in the builder's store (garbage-collected?); build again"
    ))
}

fn not_an_output(hash: &StorePathHash) -> Status {
    Status::not_found(format!("{hash} is not an output of this session's build"))
}

/// The signed narinfo of `path`, which `session` may read; its NAR may then
/// be fetched in this session.
async fn serve_narinfo(
    cache: &SignedCache,
    session: &super::session::Session,
    path: &StorePath,
) -> Result<NarInfo, Status> {
    let narinfo = cache
        .narinfo(path, || session.readable_paths())
        .await
        .map_err(|err| {
            warn!(%path, "making a narinfo: {err}");
            match err {
                CacheError::NotInStore(_) => not_an_output(path.hash_part()),
                other => Status::internal(format!("the builder could not serve {path}: {other}")),
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
            .map_err(|err| Status::invalid_argument(format!("store_path_hash: {err}")))?;
        let path = session
            .readable(&hash)
            .ok_or_else(|| not_an_output(&hash))?;
        let narinfo = serve_narinfo(&self.cache, &session, &path).await?;
        Ok(Response::new(proto::GetNarInfoResponse {
            narinfo: narinfo.to_string(),
        }))
    }

    type ListNarInfosStream = ReceiverStream<Result<proto::ListNarInfosResponse, Status>>;

    async fn list_nar_infos(
        &self,
        request: Request<proto::ListNarInfosRequest>,
    ) -> Result<Response<Self::ListNarInfosStream>, Status> {
        let session = self.session(&request, &request.get_ref().session_id)?;
        let paths = session.readable_paths();
        if paths.is_empty() {
            return Err(Status::failed_precondition(
                "the session's build has not succeeded (yet): there are no outputs to list",
            ));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let cache = self.cache.clone();
        tokio::spawn(async move {
            for path in &paths {
                let reply = serve_narinfo(&cache, &session, path).await.map(|narinfo| {
                    proto::ListNarInfosResponse {
                        narinfo: narinfo.to_string(),
                    }
                });
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type GetNarStream = BoxStream<'static, Result<proto::GetNarResponse, Status>>;

    async fn get_nar(
        &self,
        request: Request<proto::GetNarRequest>,
    ) -> Result<Response<Self::GetNarStream>, Status> {
        let session = self.session(&request, &request.get_ref().session_id)?;
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
        Ok(Response::new(
            chunks
                .map(|chunk| chunk.map(|data| proto::GetNarResponse { data }))
                .boxed(),
        ))
    }

    type GetNarsStream = BoxStream<'static, Result<proto::GetNarsResponse, Status>>;

    async fn get_nars(
        &self,
        request: Request<proto::GetNarsRequest>,
    ) -> Result<Response<Self::GetNarsStream>, Status> {
        let session = self.session(&request, &request.get_ref().session_id)?;
        let urls = request.into_inner().urls;
        if urls.len() > proto::MAX_NARS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} URLs asked for at once; at most {}",
                urls.len(),
                proto::MAX_NARS_PER_CALL
            )));
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
            Ok::<_, Status>(chunks.map_ok(move |data| proto::GetNarsResponse { index, data }))
        });
        Ok(Response::new(files.try_flatten().boxed()))
    }
}

fn not_named(url: &str) -> Status {
    Status::not_found(format!("{url} was not named by a narinfo of this session"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_removes_what_interrupted_fills_left() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("nar")).unwrap();
        for name in [
            "nar/.tmpAbC123",
            ".tmpXyZ789",
            "nar/kept.nar",
            "kept.narinfo",
        ] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        SignedCache::new(
            dir.path().to_owned(),
            SecretKey::generate("drv-thru-test-1").unwrap(),
            Nix::new(),
            1,
            None,
        );
        let mut left: Vec<String> = ["", "nar"]
            .iter()
            .flat_map(|sub| std::fs::read_dir(dir.path().join(sub)).unwrap())
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["kept.nar", "kept.narinfo", "nar"]);
    }
}
