//! A loopback HTTP binary cache ([`crate::loopback_cache`]) in front of the
//! builder's Cache service.
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
//!
//! Small NARs are fetched ahead of Nix's requests; those whose missing
//! references are small too can be imported from a [`Spool`] instead, which
//! spares Nix's HTTP cache its per-path cost.

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::{
    FutureExt as _, StreamExt as _,
    future::{BoxFuture, OptionFuture, Shared},
    stream,
};
use http_body_util::{BodyExt, StreamBody};
use hyper::{Response, StatusCode, body::Frame};
use tokio::sync::{OnceCell, Semaphore, oneshot, watch};
use tonic::codec::CompressionEncoding;
use tracing::{debug, warn};

use super::{
    BuilderChannel,
    link::{Direction, LinkPolicy},
    spool::Spool,
};
use crate::{
    loopback_cache::{Body, CacheFiles, LoopbackCache, respond},
    nix::{
        narinfo::NarInfo,
        signing::PublicKey,
        store_path::{StorePath, StorePathHash},
    },
    nixcmd::Nix,
    proto::{
        self, GetNarInfoRequest, GetNarRequest, GetNarsRequest, ListNarInfosRequest,
        MAX_CACHE_STREAMS_PER_SESSION, MAX_NARS_PER_CALL, cache_client::CacheClient,
    },
};

/// NARs up to this size are fetched ahead of Nix's requests.
const AHEAD_MAX: u64 = 256 << 10;

/// Bytes of NARs fetched ahead at most: what Nix may never ask for (paths
/// that appear in its store meanwhile) costs no more than this, and the
/// client stays within its memory target.
const AHEAD_BUDGET: u64 = 32 << 20;

/// Small paths worth a [`Spool`]: it saves Nix about half a millisecond
/// per path, but Nix starts only once they have all arrived, where over
/// HTTP its start-up (some 20 ms) overlaps the transfer.
const SPOOL_MIN: usize = 32;

/// Narinfos a listing may hold. It is kept in memory for the whole import,
/// so a builder must not grow it without bound; a closure larger than this
/// (some hundred MB of narinfos) is asked for one path at a time instead.
const MAX_LISTED: usize = 100_000;

/// `GetNars` calls for small NARs in flight at once.
const AHEAD_SLOTS: usize = 8;

/// Bytes of small NARs asked for in one `GetNars` call: enough that a call
/// carries many, few enough that calls spread over the channels.
const BATCH_BYTES: u64 = 1 << 20;

/// A call for the listing or for NARs that brings nothing for this long is
/// given up, and what it was to bring is asked for again as Nix asks. The
/// listing and the NARs fetched ahead are awaited before Nix runs, so its
/// stalled-download timeout does not cover them, and the spool would wait
/// for good. A builder that is still filling its cache from a store it
/// cannot read directly may take longer; that costs one fetch again.
const STALL: Duration = Duration::from_secs(60);

/// Bytes per range of a large NAR. With [`CacheProxy::start`]'s `fetches`
/// ranges in flight, at most `fetches` times this is buffered.
const SEGMENT: u64 = 4 << 20;

/// The running proxy; stops when dropped.
#[derive(Debug)]
pub struct CacheProxy {
    server: LoopbackCache,
    upstream: Upstream,
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
    listed: Arc<OnceCell<Option<Listed>>>,
    /// How many small NARs the listing named, once it is in.
    small_listed: Arc<watch::Sender<Option<usize>>>,
    /// Small NARs being fetched before Nix asks for them, by URL.
    ahead: Arc<Mutex<HashMap<String, Ahead>>>,
    /// What of the NARs fetched ahead could be spooled.
    spoolable: Arc<Mutex<Option<Spoolable>>>,
    ahead_slots: Arc<Semaphore>,
    /// The session's Cache streams open at once, within the builder's
    /// [`MAX_CACHE_STREAMS_PER_SESSION`]: however many NARs Nix asks for
    /// at once, the rest wait here rather than be refused.
    streams: Arc<Semaphore>,
    /// The local store, to tell which paths are worth fetching ahead.
    nix: Nix,
    /// Whether a call asks for its NARs compressed.
    link: LinkPolicy,
    /// URLs of files that narinfos named compressed already, which are
    /// never asked for compressed again.
    compressed: Arc<Mutex<HashSet<String>>>,
}

/// The session's narinfos by hash part.
type Listed = HashMap<StorePathHash, String>;

/// A small NAR fetched ahead, whole.
type Ahead = Shared<BoxFuture<'static, Result<Bytes, String>>>;

/// Where a small NAR fetched ahead is handed over.
type NarSender = oneshot::Sender<Result<Bytes, String>>;

/// Small NARs to ask for in one `GetNars` call, and where each goes.
#[derive(Debug, Default)]
struct Batch {
    urls: Vec<String>,
    sizes: Vec<u64>,
    senders: Vec<NarSender>,
    /// The sum of `sizes`.
    bytes: u64,
}

impl Batch {
    /// Whether a file of `size` bytes still fits in the call.
    fn takes(&self, size: u64) -> bool {
        self.urls.len() < MAX_NARS_PER_CALL && self.bytes + size <= BATCH_BYTES
    }

    fn push(&mut self, url: String, size: u64, sender: NarSender) {
        self.urls.push(url);
        self.sizes.push(size);
        self.senders.push(sender);
        self.bytes += size;
    }
}

/// What a [`Spool`] may be made of.
#[derive(Debug)]
struct Spoolable {
    /// The narinfos of the small NARs fetched ahead.
    narinfos: Vec<NarInfo>,
    /// The narinfos of the listed paths the local store has.
    present: Vec<NarInfo>,
}

impl CacheProxy {
    /// Serves the builder's cache for `session_id` on a free loopback port,
    /// taking turns over `channels` and fetching up to `fetches` ranges of
    /// one large NAR at once, compressed where `link` says. With `key`,
    /// narinfos not signed by it are refused before Nix sees them.
    pub fn start(
        channels: Vec<BuilderChannel>,
        fetches: usize,
        link: LinkPolicy,
        session_id: String,
        key: Option<PublicKey>,
        nix: Nix,
    ) -> std::io::Result<Self> {
        assert!(!channels.is_empty(), "the loopback cache needs a channel");
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
            listed: Arc::default(),
            small_listed: Arc::new(watch::Sender::new(None)),
            ahead: Arc::default(),
            spoolable: Arc::default(),
            ahead_slots: Arc::new(Semaphore::new(AHEAD_SLOTS)),
            streams: Arc::new(Semaphore::new(MAX_CACHE_STREAMS_PER_SESSION)),
            nix,
            link,
            compressed: Arc::default(),
        };
        // Nix's first narinfo request would start the listing; it is already
        // known to come.
        let eager = upstream.clone();
        tokio::spawn(async move {
            eager.listed().await;
        });
        let server = LoopbackCache::start(upstream.clone())?;
        Ok(Self {
            server,
            upstream,
            received,
        })
    }

    /// Writes the small NARs fetched ahead that Nix can import without the
    /// rest into a [`Spool`], once they have arrived; `None` if there are
    /// fewer than `SPOOL_MIN` (32). They are then no longer kept for the HTTP
    /// cache.
    pub async fn spool(&self) -> std::io::Result<Option<Spool>> {
        // Decided on the listing alone when it names too few small NARs, so
        // a small build's Nix starts without waiting for the local store.
        // The listing was started with the proxy.
        let small = *self
            .upstream
            .small_listed
            .subscribe()
            .wait_for(Option::is_some)
            .await
            .map_err(std::io::Error::other)?;
        if small.unwrap_or(0) < SPOOL_MIN {
            return Ok(None);
        }
        self.upstream.listed().await;
        let spoolable = self
            .upstream
            .spoolable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(Spoolable { narinfos, present }) = spoolable else {
            return Ok(None);
        };
        let valid: HashSet<StorePath> = present.iter().map(|n| n.store_path.clone()).collect();
        let wanted = super::spool::self_contained(&narinfos, &valid);
        if wanted.len() < SPOOL_MIN {
            return Ok(None);
        }
        let mut fetched = Vec::with_capacity(wanted.len());
        let mut nars = HashMap::with_capacity(wanted.len());
        for narinfo in wanted {
            let early = self
                .upstream
                .ahead
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&narinfo.url)
                .cloned();
            // A NAR that failed to arrive is left to the HTTP cache, with
            // whatever refers to it.
            if let Some(Ok(nar)) = OptionFuture::from(early).await {
                nars.insert(narinfo.store_path.clone(), nar);
                fetched.push(narinfo.clone());
            }
        }
        let entries: Vec<(NarInfo, Bytes)> = super::spool::self_contained(&fetched, &valid)
            .into_iter()
            .map(|narinfo| (narinfo.clone(), nars[&narinfo.store_path].clone()))
            .collect();
        if entries.len() < SPOOL_MIN {
            return Ok(None);
        }
        let urls: Vec<String> = entries
            .iter()
            .map(|(narinfo, _)| narinfo.url.clone())
            .collect();
        let parent = super::spool::parent_dir();
        let spool = tokio::task::spawn_blocking(move || Spool::write(&parent, entries, &present))
            .await
            .map_err(std::io::Error::other)??;
        let mut ahead = self
            .upstream
            .ahead
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for url in &urls {
            ahead.remove(url);
        }
        debug!(paths = urls.len(), dir = %spool.dir().display(), "small outputs spooled");
        Ok(Some(spool))
    }

    /// The cache URL to give Nix.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// NAR bytes received from the builder so far.
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// `call`'s outcome, or DEADLINE_EXCEEDED once it has taken `limit`
/// ([`STALL`]).
async fn unstalled<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(tonic::Status::deadline_exceeded(format!(
            "the builder sent nothing for {limit:?}"
        )))
    })
}

/// A failed call's status, for a log line or an error.
fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Splits the chunks of one `GetNars` reply into its files, checking each
/// against the size its narinfo gave as the bytes arrive.
#[derive(Debug)]
struct BatchFiles<'a> {
    sizes: &'a [u64],
    /// The file being received.
    at: usize,
    chunks: Vec<Bytes>,
    got: u64,
}

impl<'a> BatchFiles<'a> {
    fn new(sizes: &'a [u64]) -> Self {
        Self {
            sizes,
            at: 0,
            chunks: Vec::new(),
            got: 0,
        }
    }

    /// Takes a chunk of file `index`; returns the files before it, which it
    /// completes, in order.
    fn push(&mut self, index: usize, data: Bytes) -> Result<Vec<Bytes>, String> {
        if index < self.at || index >= self.sizes.len() {
            return Err(format!(
                "the builder sent a chunk of file {index} while sending file {} of {}",
                self.at,
                self.sizes.len()
            ));
        }
        let mut done = Vec::new();
        while self.at < index {
            done.push(self.complete()?);
        }
        self.got += data.len() as u64;
        if self.got > self.sizes[self.at] {
            return Err(format!(
                "the builder sent more than the {} bytes of file {}",
                self.sizes[self.at], self.at
            ));
        }
        self.chunks.push(data);
        Ok(done)
    }

    /// At the end of the reply: the files still due.
    fn finish(&mut self) -> Result<Vec<Bytes>, String> {
        let mut done = Vec::new();
        while !self.is_finished() {
            done.push(self.complete()?);
        }
        Ok(done)
    }

    /// Whether every file has been handed out.
    fn is_finished(&self) -> bool {
        self.at == self.sizes.len()
    }

    fn complete(&mut self) -> Result<Bytes, String> {
        let size = self.sizes[self.at];
        if self.got != size {
            return Err(format!(
                "the builder sent {} of the {size} bytes of file {}",
                self.got, self.at
            ));
        }
        self.at += 1;
        self.got = 0;
        Ok(Bytes::from(std::mem::take(&mut self.chunks).concat()))
    }
}

/// Whether a narinfo names a file small enough to fetch ahead.
fn is_small(narinfo: &NarInfo) -> bool {
    file_size(narinfo).is_some_and(|size| size <= AHEAD_MAX)
}

/// The size of the file a narinfo names, if it says.
fn file_size(narinfo: &NarInfo) -> Option<u64> {
    match (narinfo.compression.as_deref(), narinfo.file_size) {
        (_, Some(size)) => Some(size),
        (None | Some("none"), None) => Some(narinfo.nar_size),
        _ => None,
    }
}

impl CacheFiles for Upstream {
    async fn narinfo(&self, hash: StorePathHash) -> Response<Body> {
        let text = match self.listed().await {
            Some(listed) => match listed.get(&hash) {
                Some(text) => text.clone(),
                None => return respond(StatusCode::NOT_FOUND, ""),
            },
            None => match self.fetch_narinfo(&hash).await {
                Ok(text) => text,
                Err(response) => return response,
            },
        };
        match text.parse::<NarInfo>() {
            Ok(narinfo) if *narinfo.store_path.hash_part() != hash => {
                warn!(
                    "builder answered {hash} with the narinfo of {}",
                    narinfo.store_path
                );
                respond(StatusCode::BAD_GATEWAY, "narinfo for another path")
            }
            Ok(narinfo) if !narinfo.has_plain_nar_url() => {
                warn!(
                    "builder named {:?} as the NAR of {}, not a file under nar/",
                    narinfo.url, narinfo.store_path
                );
                respond(StatusCode::BAD_GATEWAY, "narinfo URL is not under nar/")
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
                if narinfo.is_compressed() {
                    let mut compressed = self.compressed.lock().unwrap_or_else(|p| p.into_inner());
                    compressed.insert(narinfo.url.clone());
                }
                if let Some(size) = file_size(&narinfo) {
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
        let early = self
            .ahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&url);
        if let Some(early) = early {
            match early.await {
                // Counted in `received` as it arrived.
                Ok(bytes) => return respond(StatusCode::OK, bytes),
                // Fetched ahead in vain; ask again below.
                Err(err) => debug!("{url} fetched ahead failed: {err}"),
            }
        }
        let size = self
            .sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&url)
            .copied();
        if let Some(size) = size.filter(|size| self.fetches > 1 && *size > SEGMENT) {
            return self.ranged(url, size);
        }
        let permit = self.streams.clone().acquire_owned().await;
        let measure = self.link.measure(Direction::Down).await;
        let reply = self
            .cache_for(std::slice::from_ref(&url))
            .await
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
        let frames = stream.map(move |chunk| {
            // The stream stays counted, and measured, for as long as Nix
            // reads the body.
            let _open = (&permit, &measure);
            match chunk {
                Ok(chunk) => {
                    received.fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
                    Ok(Frame::data(chunk.data))
                }
                // Nix sees a truncated body and rejects the NAR by its hash.
                Err(status) => Err(std::io::Error::other(status.message().to_owned())),
            }
        });
        Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)))
    }
}

impl Upstream {
    /// The next channel's client, in turn.
    fn cache(&self) -> CacheClient<BuilderChannel> {
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.caches.len();
        self.caches[at].clone()
    }

    /// The next channel's client for a call fetching the files at `urls`,
    /// asking for them compressed if the link says so and none is
    /// compressed already: zstd would only be spent on them twice.
    async fn cache_for(&self, urls: &[String]) -> CacheClient<BuilderChannel> {
        let cache = self.cache();
        let compressed = {
            let compressed = self.compressed.lock().unwrap_or_else(|p| p.into_inner());
            urls.iter().find(|url| compressed.contains(*url)).cloned()
        };
        if let Some(url) = compressed {
            debug!(url, "asking for it as it is: compressed already");
            return cache;
        }
        if self.link.compress(Direction::Down).await {
            cache.accept_compressed(CompressionEncoding::Zstd)
        } else {
            cache
        }
    }

    async fn fetch_narinfo(&self, hash: &StorePathHash) -> Result<String, Response<Body>> {
        let reply = self
            .cache()
            .get_nar_info(GetNarInfoRequest {
                session_id: self.session_id.clone(),
                store_path_hash: hash.to_string(),
            })
            .await;
        match reply {
            Ok(reply) => Ok(reply.into_inner().narinfo),
            Err(status) if status.code() == tonic::Code::NotFound => {
                Err(respond(StatusCode::NOT_FOUND, ""))
            }
            Err(status) => {
                warn!("builder refused narinfo {hash}: {}", status.message());
                Err(respond(
                    StatusCode::BAD_GATEWAY,
                    status.message().to_owned(),
                ))
            }
        }
    }

    /// The narinfos of the session's output closure, listed in one call the
    /// first time they are needed; `None` if the builder cannot list them
    /// (each is then asked for on its own).
    async fn listed(&self) -> Option<&Listed> {
        self.listed
            .get_or_init(|| async {
                let listing = self.list().await;
                let small = listing.as_ref().map_or(0, |(_, narinfos)| {
                    narinfos.iter().filter(|narinfo| is_small(narinfo)).count()
                });
                self.small_listed.send_replace(Some(small));
                let (listed, narinfos) = listing?;
                self.fetch_ahead(narinfos).await;
                Some(listed)
            })
            .await
            .as_ref()
    }

    /// The listing, with each narinfo parsed.
    async fn list(&self) -> Option<(Listed, Vec<NarInfo>)> {
        let request = ListNarInfosRequest {
            session_id: self.session_id.clone(),
        };
        let listing = async {
            let _open = self.streams.acquire().await;
            let mut stream = unstalled(STALL, self.cache().list_nar_infos(request))
                .await?
                .into_inner();
            let (mut listed, mut narinfos) = (Listed::new(), Vec::new());
            while let Some(item) = unstalled(STALL, stream.message()).await? {
                if narinfos.len() == MAX_LISTED {
                    return Err(tonic::Status::resource_exhausted(format!(
                        "the builder listed more than {MAX_LISTED} narinfos"
                    )));
                }
                match item.narinfo.parse::<NarInfo>() {
                    Ok(narinfo) => {
                        if narinfo.is_compressed() {
                            self.compressed
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(narinfo.url.clone());
                        }
                        listed.insert(*narinfo.store_path.hash_part(), item.narinfo);
                        narinfos.push(narinfo);
                    }
                    Err(err) => warn!("builder listed a malformed narinfo: {err}"),
                }
            }
            Ok::<_, tonic::Status>((listed, narinfos))
        };
        match listing.await {
            Ok(listed) => Some(listed),
            Err(status) => {
                if status.code() != tonic::Code::Unimplemented {
                    warn!(
                        "listing the builder's narinfos failed: {}",
                        status.message()
                    );
                }
                None
            }
        }
    }

    /// Starts fetching the small NARs of `narinfos` that the local store
    /// lacks, up to [`AHEAD_BUDGET`] bytes: Nix asks for each path's NAR only
    /// after the last one is imported, so over a long link every small path
    /// would otherwise cost a round trip.
    async fn fetch_ahead(&self, narinfos: Vec<NarInfo>) {
        if !narinfos.iter().any(is_small) {
            return;
        }
        // All of them: whether a small path can be spooled depends on its
        // references, small or not.
        let paths: Vec<StorePath> = narinfos.iter().map(|n| n.store_path.clone()).collect();
        let lacking: HashSet<StorePath> = match self.nix.invalid_paths(&paths).await {
            Ok(lacking) => lacking.into_iter().collect(),
            Err(err) => {
                debug!("not fetching ahead: {err}");
                return;
            }
        };
        let mut budget = AHEAD_BUDGET;
        let mut fetching = Vec::new();
        let mut present = Vec::with_capacity(narinfos.len() - lacking.len());
        let mut batches: Vec<Batch> = Vec::new();
        let mut ahead = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
        for narinfo in narinfos {
            if !lacking.contains(&narinfo.store_path) {
                present.push(narinfo);
                continue;
            }
            let Some(size) = file_size(&narinfo).filter(|size| *size <= AHEAD_MAX.min(budget))
            else {
                continue;
            };
            // Nix would never ask for it: its narinfo is refused.
            if self
                .key
                .as_ref()
                .is_some_and(|key| !narinfo.is_signed_by(key))
            {
                continue;
            }
            if let Entry::Vacant(entry) = ahead.entry(narinfo.url.clone()) {
                budget -= size;
                let (tx, rx) = oneshot::channel();
                entry.insert(
                    rx.map(|got| got.unwrap_or_else(|_| Err("fetch abandoned".to_owned())))
                        .boxed()
                        .shared(),
                );
                if !batches.last().is_some_and(|batch| batch.takes(size)) {
                    batches.push(Batch::default());
                }
                batches
                    .last_mut()
                    .expect("pushed")
                    .push(narinfo.url.clone(), size, tx);
            }
            fetching.push(narinfo);
        }
        drop(ahead);
        for batch in batches {
            tokio::spawn(self.clone().fetch_batch(batch));
        }
        *self.spoolable.lock().unwrap_or_else(|p| p.into_inner()) = Some(Spoolable {
            narinfos: fetching,
            present,
        });
    }

    /// Fetches the whole files of `batch` in one `GetNars` call, handing
    /// each to its sender as soon as it is complete. What fails here is
    /// asked for again on its own when Nix wants it.
    async fn fetch_batch(self, batch: Batch) {
        let Batch {
            urls,
            sizes,
            senders,
            ..
        } = batch;
        let _permit = self.ahead_slots.acquire().await;
        let request = GetNarsRequest {
            session_id: self.session_id.clone(),
            urls: urls.clone(),
        };
        let mut senders = senders.into_iter();
        let open = self.streams.clone().acquire_owned().await;
        let mut cache = self.cache_for(&urls).await;
        let _measure = self.link.measure(Direction::Down).await;
        let failure = match unstalled(STALL, cache.get_nars(request)).await {
            Ok(reply) => match self
                .receive_batch(reply.into_inner(), &sizes, &mut senders)
                .await
            {
                Ok(()) => return,
                Err(failure) => failure,
            },
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                // A builder from before GetNars: one call per file, each
                // counted on its own.
                drop(open);
                for ((url, size), tx) in urls.into_iter().zip(sizes).zip(senders) {
                    let got = self.clone().range(url, 0, size).await;
                    let _ = tx.send(
                        got.map(|chunks| Bytes::from(chunks.concat()))
                            .map_err(|err| err.to_string()),
                    );
                }
                return;
            }
            Err(status) => status_text(&status),
        };
        warn!("fetching {} small NARs: {failure}", urls.len());
        for tx in senders {
            let _ = tx.send(Err(failure.clone()));
        }
    }

    /// Hands each file of a `GetNars` reply of files of `sizes` to the next
    /// of `senders` as soon as it is complete; on failure, the senders of
    /// the files not complete are left in `senders`.
    async fn receive_batch(
        &self,
        mut stream: tonic::Streaming<proto::GetNarsResponse>,
        sizes: &[u64],
        senders: &mut impl Iterator<Item = NarSender>,
    ) -> Result<(), String> {
        let mut files = BatchFiles::new(sizes);
        while !files.is_finished() {
            let done = match unstalled(STALL, stream.message()).await {
                Ok(Some(chunk)) => {
                    self.received
                        .fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
                    files.push(chunk.index as usize, chunk.data)
                }
                Ok(None) => files.finish(),
                Err(status) => Err(status_text(&status)),
            }?;
            for (nar, tx) in done.into_iter().zip(senders.by_ref()) {
                let _ = tx.send(Ok(nar));
            }
        }
        Ok(())
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

    /// Bytes `offset..offset + length` of the file at `url`; a failure is
    /// logged here, as Nix only sees a body cut short.
    async fn range(self, url: String, offset: u64, length: u64) -> std::io::Result<Vec<Bytes>> {
        self.fetch_range(&url, offset, length).await.map_err(|why| {
            let err = format!(
                "fetching bytes {offset}..{} of {url}: {why}",
                offset + length
            );
            warn!("{err}");
            std::io::Error::other(err)
        })
    }

    async fn fetch_range(&self, url: &str, offset: u64, length: u64) -> Result<Vec<Bytes>, String> {
        let failed = |status: tonic::Status| status_text(&status);
        let request = GetNarRequest {
            session_id: self.session_id.clone(),
            url: url.to_owned(),
            offset,
            length,
        };
        let _open = self.streams.acquire().await;
        let mut cache = self.cache_for(std::slice::from_ref(&request.url)).await;
        let _measure = self.link.measure(Direction::Down).await;
        let mut stream = unstalled(STALL, cache.get_nar(request))
            .await
            .map_err(failed)?
            .into_inner();
        let mut chunks = Vec::new();
        let mut got = 0;
        while let Some(chunk) = unstalled(STALL, stream.message()).await.map_err(failed)? {
            got += chunk.data.len() as u64;
            if got > length {
                return Err(format!("the builder sent more than {length} bytes"));
            }
            self.received
                .fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
            chunks.push(chunk.data);
        }
        if got != length {
            return Err(format!("the builder sent {got} of {length} bytes"));
        }
        Ok(chunks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(text: &'static str) -> Bytes {
        Bytes::from_static(text.as_bytes())
    }

    #[tokio::test]
    async fn a_stalled_call_is_given_up() {
        let limit = Duration::from_millis(20);
        let stalled = unstalled(limit, std::future::pending::<Result<(), tonic::Status>>()).await;
        assert_eq!(stalled.unwrap_err().code(), tonic::Code::DeadlineExceeded);
        let answered = unstalled(limit, async { Ok::<_, tonic::Status>(7) }).await;
        assert_eq!(answered.unwrap(), 7);
    }

    #[test]
    fn batch_files_come_out_whole_and_in_order() {
        let sizes = [3, 1, 4];
        let mut files = BatchFiles::new(&sizes);
        assert!(files.push(0, bytes("ab")).unwrap().is_empty());
        assert!(files.push(0, bytes("c")).unwrap().is_empty());
        assert_eq!(files.push(1, bytes("d")).unwrap(), [bytes("abc")]);
        assert_eq!(files.push(2, bytes("efgh")).unwrap(), [bytes("d")]);
        assert!(!files.is_finished());
        assert_eq!(files.finish().unwrap(), [bytes("efgh")]);
        assert!(files.is_finished());
    }

    #[test]
    fn batch_files_refuse_what_does_not_add_up() {
        let sizes = [2, 2];
        // Too many bytes, refused as they arrive.
        let mut files = BatchFiles::new(&sizes);
        files.push(0, bytes("ab")).unwrap();
        assert!(files.push(0, bytes("c")).is_err());
        // A file skipped, or cut short.
        let mut files = BatchFiles::new(&sizes);
        assert!(files.push(1, bytes("ab")).is_err());
        let mut files = BatchFiles::new(&sizes);
        files.push(0, bytes("ab")).unwrap();
        files.push(1, bytes("c")).unwrap();
        assert!(files.finish().is_err());
        // Back to an earlier file, or one not asked for.
        let mut files = BatchFiles::new(&sizes);
        files.push(0, bytes("ab")).unwrap();
        files.push(1, bytes("c")).unwrap();
        assert!(files.push(0, bytes("d")).is_err());
        assert!(BatchFiles::new(&sizes).push(2, bytes("a")).is_err());
    }
}
