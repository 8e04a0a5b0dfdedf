//! Receiving input uploads: only announced, missing, content-addressed paths,
//! checked byte by byte, then handed to the builder's Nix as a throwaway
//! binary cache so that Nix checks them again and no trusted user rights are
//! needed.
//!
//! A session's inputs may arrive over several `UploadInputs` calls at once,
//! each carrying parts (byte ranges) of paths: one call rides one QUIC
//! stream, whose flow-control window caps it on a long link. A part that
//! arrives early is written where it belongs in the path's staging file, and
//! the checks read the NAR in order as soon as the bytes before a part are
//! in. A failure anywhere discards the whole upload.
//!
//! A large upload is imported while it arrives: Nix reads the staged NARs
//! through a loopback HTTP cache whose NARs follow the checks (see
//! [`crate::loopback_cache`], [`NarFile`]); bytes Nix takes as they come
//! are handed to it from memory and never written. The last byte of every NAR
//! is held back until all of them have passed, so no path of a failed upload
//! becomes valid (Nix, stopped halfway, may leave the invalid directory it
//! was writing, as after any interrupted substitution). A small upload is
//! imported from the directory once it is complete: for many small paths
//! Nix's file store is the faster reader.
//! Either way, the call that completes the last missing path returns once
//! the import has.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    io::Write as _,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::{StatusCode, header};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tokio_util::task::AbortOnDropHandle;
use tonic::Status;
use tracing::{debug, info};

use super::{
    nar_file::{Crowded, NarFile, Writer},
    session::{DeclaredInput, Session},
};
use crate::{
    loopback_cache::{Body, CacheFiles, LoopbackCache, respond},
    nix::{
        content_address::ContentAddress,
        hash::Sha256Hash,
        nar::{NarHasher, NarValidator, single_file_contents},
        narinfo::NarInfo,
        store_path::{StorePath, StorePathHash},
    },
    nixcmd::{Nix, NixCmdError},
    proto::{UploadInputsRequest, UploadInputsResponse},
};

/// Text-hashed inputs (`.drv` files) are checked in memory; a derivation
/// this large is not a derivation.
const MAX_TEXT_INPUT: u64 = 16 << 20;

/// How long an upload call waits for the builder's Nix to take the bytes
/// held for it before writing them to disk after all.
const NIX_PATIENCE: Duration = Duration::from_secs(1);

/// Bytes read back at a time when checking parts that arrived early.
const READ_BACK: usize = 1 << 20;

/// Uploads whose NARs average at least this many bytes are imported while
/// they arrive. Nix's HTTP store costs about a millisecond more per path
/// than its file store (2,000 small paths: 3.3 s against 1.0 s), which only
/// pays off when there is a transfer to overlap it with.
const PIPELINE_MIN_AVERAGE: u64 = 1 << 20;

/// The upload of a session, shared by its concurrent calls; kept in the
/// session so it goes (staging, running import and all) when the session
/// does.
pub type Slot = tokio::sync::Mutex<Option<Arc<Upload>>>;

/// Each path being received, by store path.
type StagedPaths = HashMap<StorePath, Arc<Mutex<Staged>>>;

/// One session's upload in progress.
#[derive(Debug)]
pub struct Upload {
    /// The paths it brings: the session's missing inputs when it began.
    missing: BTreeSet<StorePath>,
    staging: PathBuf,
    state: Mutex<UploadState>,
}

#[derive(Debug)]
struct UploadState {
    /// Every missing path, staged from the start.
    paths: StagedPaths,
    /// Paths checked in full.
    checked: BTreeSet<StorePath>,
    /// Why calls still sending must stop: the upload failed or is over.
    ended: Option<Status>,
    /// What the call that completes the upload takes to finish it; `None`
    /// once taken (or the upload failed).
    finish: Option<Finish>,
}

/// What finishing an upload takes: the import and the staging directory,
/// which the finishing call owns from then on, so a late failure of another
/// call cannot pull the directory away from under Nix.
#[derive(Debug)]
struct Finish {
    import: Import,
    dir: StagingDir,
}

/// How the builder's Nix imports an upload.
#[derive(Debug)]
enum Import {
    /// Nix reads the staging directory once every path is in.
    AfterTransfer,
    /// Nix is reading the staging directory through a loopback cache while
    /// the parts arrive. Dropping this stops both.
    Running {
        _cache: LoopbackCache,
        task: AbortOnDropHandle<Result<(), NixCmdError>>,
    },
}

/// A staging directory, removed on the blocking pool when dropped: it may
/// hold thousands of files or gigabytes.
#[derive(Debug)]
struct StagingDir(Option<tempfile::TempDir>);

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn_blocking(move || drop(dir));
        }
    }
}

impl Upload {
    /// The session's upload, begun by this call if it is the first; `None`
    /// if no input is missing (any more).
    async fn of(
        session: &Session,
        nix: &Nix,
        uploads_dir: &Path,
    ) -> Result<Option<Arc<Self>>, Status> {
        let mut slot = session.upload.lock().await;
        if let Some(upload) = &*slot {
            return Ok(Some(upload.clone()));
        }
        // Read under the lock: the call that finishes an upload marks its
        // paths present before it empties the slot.
        let missing = session.missing();
        if missing.is_empty() {
            return Ok(None);
        }
        let inputs: Vec<DeclaredInput> = missing
            .iter()
            .map(|path| session.inputs[path].clone())
            .collect();
        let total = inputs.iter().map(|input| input.nar_size).sum();
        // Refused before anything is staged: the announced sizes are exact.
        session.check_upload_room(total)?;
        let (uploads_dir, id) = (uploads_dir.to_owned(), session.id.clone());
        // Thousands of small inputs are thousands of files: not on a runtime
        // worker.
        let (dir, paths, served) =
            tokio::task::spawn_blocking(move || stage(&uploads_dir, &id, inputs))
                .await
                .map_err(|err| Status::internal(format!("staging an upload: {err}")))??;
        let cache = if total >= PIPELINE_MIN_AVERAGE.saturating_mul(missing.len() as u64) {
            debug!(session = %session.id, bytes = total, "importing the upload while it arrives");
            Some(LoopbackCache::start(Arc::new(served)).map_err(internal("serving an upload"))?)
        } else {
            None
        };
        let upload = Arc::new_cyclic(|upload: &Weak<Self>| {
            let import = match cache {
                Some(cache) => Import::Running {
                    task: import_while_arriving(nix, dir.path(), &cache, &missing, upload),
                    _cache: cache,
                },
                None => Import::AfterTransfer,
            };
            Self {
                missing,
                staging: dir.path().to_owned(),
                state: Mutex::new(UploadState {
                    paths,
                    checked: BTreeSet::new(),
                    ended: None,
                    finish: Some(Finish {
                        import,
                        dir: StagingDir(Some(dir)),
                    }),
                }),
            }
        });
        *slot = Some(upload.clone());
        Ok(Some(upload))
    }

    fn state(&self) -> MutexGuard<'_, UploadState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_alive(&self) -> Result<(), Status> {
        check_alive(&self.state())
    }

    /// The staging file of `path`.
    fn path(&self, path: &StorePath) -> Result<Arc<Mutex<Staged>>, Status> {
        let state = self.state();
        check_alive(&state)?;
        Ok(state.paths[path].clone())
    }

    /// Abandons the upload: nothing staged survives, and a running import
    /// is stopped. Once a call has taken the finished upload, a failing
    /// call changes nothing.
    fn fail(&self, status: &Status) {
        let ended = Status::aborted(format!(
            "another part of this upload failed: {}",
            status.message()
        ));
        self.abandon(ended, false);
    }

    /// The import gave up while parts are still arriving: the calls still
    /// sending stop with its reason. Once every part is in, the call
    /// finishing the upload reports it instead.
    fn import_gave_up(&self, status: Status) {
        self.abandon(status, true);
    }

    fn abandon(&self, ended: Status, only_while_arriving: bool) {
        let finish = {
            let mut state = self.state();
            if only_while_arriving && state.checked.len() == self.missing.len() {
                return;
            }
            let Some(finish) = state.finish.take() else {
                return;
            };
            state.ended = Some(ended);
            state.paths.clear();
            finish
        };
        drop(finish);
    }

    /// A call went away before it was done with the upload.
    fn call_gone(&self, session: &Session) {
        let finishing = {
            let state = self.state();
            state.finish.is_none() && state.ended.is_none()
        };
        if !finishing {
            self.fail(&Status::cancelled("an upload call was cancelled"));
            return;
        }
        // It was the call finishing the upload, and the import stopped with
        // it: the upload is over, unfinished, and the client may start
        // another in this session.
        self.end(Status::aborted(
            "the call finishing this upload was cancelled",
        ));
        if let Ok(mut slot) = session.upload.try_lock() {
            *slot = None;
        }
    }

    /// Why calls must stop, if they must.
    fn ended(&self) -> Option<Status> {
        self.state().ended.clone()
    }

    /// Records a path checked in full; once all are, lets readers have the
    /// last bytes.
    fn complete(&self, path: StorePath) -> Result<(), Status> {
        let mut state = self.state();
        check_alive(&state)?;
        state.checked.insert(path);
        if state.checked.len() == self.missing.len() {
            for staged in state.paths.values() {
                staged.lock().unwrap_or_else(|p| p.into_inner()).release();
            }
        }
        Ok(())
    }

    /// What finishing the upload takes, for the one call that should: once
    /// every missing path is in.
    fn take_finish(&self) -> Option<Finish> {
        let mut state = self.state();
        if state.ended.is_some() || state.checked.len() < self.missing.len() {
            return None;
        }
        state.finish.take()
    }

    /// Stops calls still sending, with `why`, once the upload is over.
    fn end(&self, why: Status) {
        let mut state = self.state();
        state.ended.get_or_insert(why);
        state.paths.clear();
    }
}

fn check_alive(state: &UploadState) -> Result<(), Status> {
    match &state.ended {
        Some(status) => Err(status.clone()),
        None => Ok(()),
    }
}

/// Starts Nix importing `missing` through `cache` in front of `staging`. If
/// Nix gives up before the upload is complete, the upload fails at once,
/// so its calls stop sending.
fn import_while_arriving(
    nix: &Nix,
    staging: &Path,
    cache: &LoopbackCache,
    missing: &BTreeSet<StorePath>,
    upload: &Weak<Upload>,
) -> AbortOnDropHandle<Result<(), NixCmdError>> {
    let (nix, staging, url) = (nix.clone(), staging.to_owned(), cache.url());
    let (paths, upload) = (missing.iter().cloned().collect::<Vec<_>>(), upload.clone());
    AbortOnDropHandle::new(tokio::spawn(async move {
        let imported = nix
            .add_content_addressed_from_cache(&staging, Some(&url), &paths)
            .await;
        if let (Err(err), Some(upload)) = (&imported, upload.upgrade()) {
            upload.import_gave_up(import_failed(err));
        }
        imported
    }))
}

/// The status for an import that failed: the client's inputs, unless the
/// builder could not run Nix at all.
fn import_failed(err: &NixCmdError) -> Status {
    match err {
        NixCmdError::Spawn { .. } | NixCmdError::Io { .. } => {
            tracing::error!("importing inputs: {err}");
            Status::internal("the builder could not run its Nix to import the inputs; see its log")
        }
        refused => Status::invalid_argument(format!(
            "the builder's Nix refused the uploaded inputs: {refused}"
        )),
    }
}

impl Import {
    /// Sees the import of `paths` from `staging` through.
    async fn complete(self, nix: &Nix, staging: &Path, paths: &[StorePath]) -> Result<(), Status> {
        let imported = match self {
            Self::Running { _cache, task } => task.await.map_err(|err| {
                tracing::error!("the import task failed: {err}");
                Status::internal("the builder's import of the inputs failed; see its log")
            })?,
            Self::AfterTransfer => {
                nix.add_content_addressed_from_cache(staging, None, paths)
                    .await
            }
        };
        imported.map_err(|err| import_failed(&err))
    }
}

/// Tells the upload when a call is dropped before it is done with it: the
/// client reset its stream or went away.
struct CallGuard<'a>(Option<(&'a Session, &'a Upload)>);

impl CallGuard<'_> {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if let Some((session, upload)) = self.0 {
            upload.call_gone(session);
        }
    }
}

/// A staging directory for `inputs`: the narinfo of each, an empty file for
/// each NAR, and what a loopback cache of it serves.
fn stage(
    uploads_dir: &Path,
    session_id: &str,
    inputs: Vec<DeclaredInput>,
) -> Result<(tempfile::TempDir, StagedPaths, Served), Status> {
    let dir = staging_dir(uploads_dir, session_id)?;
    let mut paths = HashMap::new();
    let mut served = Served::default();
    for input in inputs {
        let narinfo = narinfo(&input);
        let text = narinfo.to_string();
        let file = dir
            .path()
            .join(format!("{}.narinfo", input.path.hash_part()));
        std::fs::write(file, &text).map_err(internal("writing an upload narinfo"))?;
        let path = input.path.clone();
        let (staged, nar) = Staged::start(input, dir.path())?;
        served.narinfos.insert(*path.hash_part(), text);
        served.nars.insert(narinfo.url, nar);
        paths.insert(path, Arc::new(Mutex::new(staged)));
    }
    Ok((dir, paths, served))
}

fn staging_dir(uploads_dir: &Path, session_id: &str) -> Result<tempfile::TempDir, Status> {
    std::fs::create_dir_all(uploads_dir).map_err(internal("creating the uploads directory"))?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("{session_id}-"))
        .tempdir_in(uploads_dir)
        .map_err(internal("creating an upload directory"))?;
    std::fs::create_dir(dir.path().join("nar"))
        .map_err(internal("creating an upload directory"))?;
    std::fs::write(dir.path().join("nix-cache-info"), "StoreDir: /nix/store\n")
        .map_err(internal("creating an upload directory"))?;
    Ok(dir)
}

/// The narinfo an input is imported with: what the client announced, which
/// its NAR must match before Nix may read all of it.
fn narinfo(input: &DeclaredInput) -> NarInfo {
    NarInfo {
        store_path: input.path.clone(),
        url: nar_url(&input.path),
        compression: Some("none".to_owned()),
        file_hash: None,
        file_size: None,
        nar_hash: input.nar_hash,
        nar_size: input.nar_size,
        references: input.references.clone(),
        deriver: None,
        signatures: Vec::new(),
        ca: Some(input.ca.clone()),
        extra: Vec::new(),
    }
}

/// The staging directory as a loopback cache serves it: narinfos, and NARs
/// as far as they are checked.
#[derive(Debug, Default)]
struct Served {
    narinfos: HashMap<StorePathHash, String>,
    nars: HashMap<String, NarFile>,
}

impl CacheFiles for Arc<Served> {
    async fn narinfo(&self, hash: StorePathHash) -> hyper::Response<Body> {
        match self.narinfos.get(&hash) {
            Some(text) => respond(StatusCode::OK, text.clone()),
            None => respond(StatusCode::NOT_FOUND, ""),
        }
    }

    async fn nar(&self, url: String) -> hyper::Response<Body> {
        let Some(nar) = self.nars.get(&url) else {
            return respond(StatusCode::NOT_FOUND, "");
        };
        let chunks = match nar.read_range(0, 0) {
            Ok(chunks) => chunks,
            Err(status) => {
                return respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    status.message().to_owned(),
                );
            }
        };
        // An abandoned upload cuts the body short, and Nix drops the NAR.
        let frames = ReceiverStream::new(chunks).map(|chunk| {
            chunk
                .map(hyper::body::Frame::data)
                .map_err(|status| std::io::Error::other(status.message().to_owned()))
        });
        let mut response = hyper::Response::new(StreamBody::new(frames).boxed_unsync());
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, nar.size().into());
        response
    }
}

/// One path being received, possibly in parts out of order.
#[derive(Debug)]
struct Staged {
    input: DeclaredInput,
    /// Opened for each part only: an upload may stage more paths than a
    /// process may hold files open.
    at: PathBuf,
    /// Bytes checked, from the start.
    checked: u64,
    /// Parts written beyond `checked`, start → end; never overlapping.
    ahead: BTreeMap<u64, u64>,
    hasher: NarHasher,
    validator: NarValidator,
    text: Option<Vec<u8>>,
    /// Tells readers how far they may read; `None` once released.
    readers: Option<Writer>,
    /// Bytes readers were told of.
    published: u64,
}

impl Staged {
    /// Creates the staging file of `input`, and the view of it its readers get.
    fn start(input: DeclaredInput, staging: &Path) -> Result<(Self, NarFile), Status> {
        let text = match input.ca {
            ContentAddress::Text(_) if input.nar_size <= MAX_TEXT_INPUT => Some(Vec::new()),
            ContentAddress::Text(_) => {
                return Err(Status::invalid_argument(format!(
                    "input {} is a {}-byte text file; that is too large for a derivation",
                    input.path, input.nar_size
                )));
            }
            ContentAddress::Fixed { .. } => None,
        };
        let at = nar_file(staging, &input.path);
        File::create_new(&at).map_err(internal("creating an upload file"))?;
        let (nar, readers) = NarFile::growing_at(at.clone(), input.nar_size);
        let staged = Self {
            input,
            at,
            checked: 0,
            ahead: BTreeMap::new(),
            hasher: NarHasher::new(),
            validator: NarValidator::new(),
            text,
            readers: Some(readers),
            published: 0,
        };
        Ok((staged, nar))
    }

    /// Takes `data` at `offset` (to the file, or to a reader) and checks
    /// whatever is now contiguous.
    /// Returns whether the whole NAR is in and has passed every check.
    fn write(&mut self, offset: u64, data: Bytes) -> Result<bool, Status> {
        let result = self.write_and_check(offset, data);
        if let Err(status) = &result
            && let Some(readers) = self.readers.take()
        {
            readers.abandon(status.message());
        }
        result
    }

    fn write_and_check(&mut self, offset: u64, data: Bytes) -> Result<bool, Status> {
        let path = &self.input.path;
        let end = offset.saturating_add(data.len() as u64);
        if end > self.input.nar_size {
            return Err(Status::invalid_argument(format!(
                "the NAR of {path} is longer than the announced {} bytes",
                self.input.nar_size
            )));
        }
        let overlaps_before = self
            .ahead
            .range(..end)
            .next_back()
            .is_some_and(|(_, before_end)| *before_end > offset);
        if offset < self.checked || overlaps_before {
            return Err(Status::invalid_argument(format!(
                "bytes {offset}..{end} of {path} were sent twice"
            )));
        }
        if offset == self.checked {
            self.check(&data)?;
            match &self.readers {
                Some(readers) if readers.hands_off(offset) => {
                    self.write_out(readers, readers.hand_off(offset, data))?;
                }
                readers => {
                    // Bytes held for a reader that has stopped go to the file
                    // first, where a later reader finds them.
                    if let Some(readers) = readers {
                        self.write_out(readers, readers.idle_held())?;
                    }
                    write_at(&self.open()?, &data, offset)?;
                }
            }
        } else {
            write_at(&self.open()?, &data, offset)?;
            self.ahead.insert(offset, end);
        }
        if self.ahead.contains_key(&self.checked) {
            self.read_back(&self.open()?)?;
        }
        // Readers never get a whole NAR before the upload is complete.
        self.publish(self.checked.min(self.input.nar_size.saturating_sub(1)));
        if self.checked < self.input.nar_size {
            return Ok(false);
        }
        self.finish()?;
        Ok(true)
    }

    fn open(&self) -> Result<File, Status> {
        File::options()
            .read(true)
            .write(true)
            .open(&self.at)
            .map_err(internal("opening an upload file"))
    }

    /// Writes bytes that `readers` held, at their offsets, to the file, and
    /// tells them so.
    fn write_out(&self, readers: &Writer, held: Vec<(u64, Bytes)>) -> Result<(), Status> {
        if let Some((last, bytes)) = held.last() {
            let file = self.open()?;
            for (at, bytes) in &held {
                write_at(&file, bytes, *at)?;
            }
            readers.written_out(last + bytes.len() as u64);
        }
        Ok(())
    }

    /// Checks the parts written ahead that are now contiguous, reading them
    /// back from `file`.
    fn read_back(&mut self, file: &File) -> Result<(), Status> {
        let mut buffer = vec![0; READ_BACK];
        while let Some(ahead_end) = self.ahead.remove(&self.checked) {
            while self.checked < ahead_end {
                let n = (ahead_end - self.checked).min(READ_BACK as u64) as usize;
                file.read_exact_at(&mut buffer[..n], self.checked)
                    .map_err(internal("reading an upload file back"))?;
                self.check(&buffer[..n])?;
            }
        }
        Ok(())
    }

    /// The held bytes a reader has yet to take, if they crowd memory.
    fn crowded(&self) -> Option<Crowded> {
        self.readers.as_ref()?.crowded()
    }

    fn publish(&mut self, upto: u64) {
        if let Some(readers) = &self.readers
            && upto > self.published
        {
            readers.advance(upto - self.published);
            self.published = upto;
        }
    }

    /// Lets readers have the whole NAR, which has passed every check.
    fn release(&mut self) {
        self.publish(self.input.nar_size);
        if let Some(readers) = self.readers.take() {
            readers.finish();
        }
    }

    fn check(&mut self, data: &[u8]) -> Result<(), Status> {
        self.validator.push(data).map_err(|err| {
            Status::invalid_argument(format!(
                "the NAR of {} is malformed: {err}",
                self.input.path
            ))
        })?;
        self.hasher
            .write_all(data)
            .expect("hashing into memory cannot fail");
        if let Some(text) = &mut self.text {
            text.extend_from_slice(data);
        }
        self.checked += data.len() as u64;
        Ok(())
    }

    /// Checks the complete NAR against what was announced.
    fn finish(&mut self) -> Result<(), Status> {
        let path = &self.input.path;
        std::mem::take(&mut self.validator)
            .finish()
            .map_err(|err| {
                Status::invalid_argument(format!(
                    "the NAR of {path} is incomplete or malformed: {err}"
                ))
            })?;
        let (hash, size) = std::mem::take(&mut self.hasher).finish();
        if size != self.input.nar_size || hash != self.input.nar_hash {
            return Err(Status::invalid_argument(format!(
                "the NAR of {path} does not match its announced hash and size ({hash}, {size} bytes)"
            )));
        }
        // Fixed-output paths need no more: the builder's Nix recomputes the
        // store path from the contents when importing.
        if let (ContentAddress::Text(expected), Some(nar)) = (&self.input.ca, &self.text) {
            let contents = single_file_contents(nar).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "{path} is text-addressed but its NAR is not a single regular file"
                ))
            })?;
            if Sha256Hash::digest(contents) != *expected {
                return Err(Status::invalid_argument(format!(
                    "the contents of {path} do not match its content address"
                )));
            }
        }
        Ok(())
    }
}

fn nar_url(path: &StorePath) -> String {
    format!("nar/{}.nar", path.hash_part())
}

fn nar_file(staging: &Path, path: &StorePath) -> PathBuf {
    staging.join(nar_url(path))
}

fn write_at(file: &File, data: &[u8], offset: u64) -> Result<(), Status> {
    file.write_all_at(data, offset)
        .map_err(internal("writing an upload file"))
}

fn internal(action: &'static str) -> impl Fn(std::io::Error) -> Status {
    move |err| {
        tracing::error!("{action}: {err}");
        Status::internal(format!("the builder failed {action}; see its log"))
    }
}

/// Receives one `UploadInputs` call for `session`, staging under
/// `uploads_dir`. If this call completes the upload, it sees the import
/// through before returning. Any failure, or the call being dropped midway,
/// discards everything staged for the session.
pub async fn receive(
    session: &Session,
    nix: &Nix,
    uploads_dir: &Path,
    stream: impl Stream<Item = Result<UploadInputsRequest, Status>>,
) -> Result<UploadInputsResponse, Status> {
    let Some(upload) = Upload::of(session, nix, uploads_dir).await? else {
        return Ok(UploadInputsResponse::default());
    };
    let mut guard = CallGuard(Some((session, &upload)));
    let bytes = match receive_parts(session, &upload, stream).await {
        Ok(bytes) => bytes,
        Err(status) => {
            guard.disarm();
            upload.fail(&status);
            return Err(status);
        }
    };
    // Another call may be finishing it; then this one is done.
    let Some(finish) = upload.take_finish() else {
        guard.disarm();
        return Ok(UploadInputsResponse {
            paths_imported: 0,
            bytes_received: bytes,
        });
    };
    let paths: Vec<StorePath> = upload.missing.iter().cloned().collect();
    // Nix recomputes each store path from the NAR and its `CA:` field, so
    // this needs no trusted-user rights and admits nothing unverifiable.
    // Should this call be dropped meanwhile, `finish` goes with it: Nix is
    // stopped and the staging removed.
    let imported = finish.import.complete(nix, &upload.staging, &paths).await;
    guard.disarm();
    drop(finish.dir);
    upload.end(Status::failed_precondition("this upload is over"));
    if imported.is_ok() {
        session.mark_present(&paths);
    }
    *session.upload.lock().await = None;
    imported?;
    info!(session = %session.id, paths = paths.len(), "inputs uploaded");
    Ok(UploadInputsResponse {
        paths_imported: u32::try_from(paths.len()).unwrap_or(u32::MAX),
        bytes_received: bytes,
    })
}

/// Writes and checks the parts of one call; returns the bytes it carried.
async fn receive_parts(
    session: &Session,
    upload: &Upload,
    stream: impl Stream<Item = Result<UploadInputsRequest, Status>>,
) -> Result<u64, Status> {
    tokio::pin!(stream);
    let mut part: Option<(StorePath, Arc<Mutex<Staged>>, u64)> = None;
    let mut bytes = 0u64;
    while let Some(message) = stream.next().await.transpose()? {
        upload.check_alive()?;
        if !message.store_path.is_empty() {
            let path: StorePath = message
                .store_path
                .parse()
                .map_err(|err| Status::invalid_argument(format!("store_path: {err}")))?;
            if !upload.missing.contains(&path) {
                return Err(Status::invalid_argument(format!(
                    "{path} was not reported missing for this session; only missing inputs are accepted"
                )));
            }
            debug!(session = %session.id, %path, offset = message.offset, "receiving input");
            let staged = upload.path(&path)?;
            part = Some((path, staged, message.offset));
        }
        if message.data.is_empty() {
            continue;
        }
        let Some((path, staged, offset)) = part.as_mut() else {
            return Err(Status::invalid_argument("data before the first store_path"));
        };
        let len = message.data.len() as u64;
        session.count_upload(len)?;
        bytes += len;
        let at = *offset;
        *offset += len;
        let staged = staged.clone();
        let (complete, crowded) = tokio::task::spawn_blocking(move || {
            let mut staged = staged.lock().unwrap_or_else(|p| p.into_inner());
            let complete = staged.write(at, message.data)?;
            Ok((complete, staged.crowded()))
        })
        .await
        .map_err(|err| Status::internal(format!("checking an upload: {err}")))?
        // Another call's failure may have removed the file meanwhile.
        .map_err(|status: Status| upload.ended().unwrap_or(status))?;
        if complete {
            upload.complete(path.clone())?;
        }
        // Bytes a reading Nix has yet to take are better waited for than
        // written to disk; the rest of the call waits with them.
        if let Some(crowded) = crowded {
            crowded.wait(NIX_PATIENCE).await;
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source path holding `contents`, as announced by a client.
    fn source(contents: &[u8], dir: &Path) -> (DeclaredInput, Vec<u8>) {
        let file = dir.join("src");
        std::fs::write(&file, contents).unwrap();
        let mut nar = Vec::new();
        crate::store_nar::dump(&file, 1000, |chunk| {
            nar.extend_from_slice(&chunk);
            Ok(())
        })
        .unwrap();
        let hash = Sha256Hash::digest(&nar);
        let ca: ContentAddress = format!("fixed:r:{hash}").parse().unwrap();
        let path = ca.store_path("src", &BTreeSet::new(), false).unwrap();
        let input = DeclaredInput {
            path,
            references: BTreeSet::new(),
            ca,
            nar_hash: hash,
            nar_size: nar.len() as u64,
        };
        (input, nar)
    }

    #[tokio::test]
    async fn a_call_dropped_midway_discards_the_upload() {
        let work = tempfile::tempdir().unwrap();
        let uploads = work.path().join("uploads");
        let (input, nar) = source(b"a source that never arrives in full", work.path());
        let path = input.path.clone();
        let session = session_of(input);
        let part = |offset: usize, data: &[u8]| part(&path, offset, data);
        let half = nar.len() / 2;
        // Half the NAR, then the call stays open without sending more; the
        // call asking for more means the first half is in.
        let waiting = tokio::sync::Notify::new();
        let stalled =
            tokio_stream::iter([Ok(part(0, &nar[..half]))]).chain(futures::stream::poll_fn(|_| {
                waiting.notify_one();
                std::task::Poll::Pending
            }));
        let nix = Nix::new();
        tokio::select! {
            _ = receive(&session, &nix, &uploads, stalled) => {
                panic!("the call ended without the rest of its NAR")
            }
            () = waiting.notified() => {}
        }
        // The call was dropped with the select: the client went away.
        assert!(unstaged(&uploads).await, "the staging outlived the call");
        let rest = tokio_stream::iter([Ok(part(half, &nar[half..]))]);
        let refused = receive(&session, &nix, &uploads, rest).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Aborted, "{refused:?}");
    }

    /// Whether `uploads` is empty within a few seconds (staging is removed
    /// on the blocking pool).
    async fn unstaged(uploads: &Path) -> bool {
        for _ in 0..500 {
            if std::fs::read_dir(uploads).map_or(0, |entries| entries.count()) == 0 {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        false
    }

    /// A session missing only `input`.
    fn session_of(input: DeclaredInput) -> Session {
        let path = input.path.clone();
        Session::new(
            "s".into(),
            iroh::SecretKey::from_bytes(&[1; 32]).public(),
            crate::server::status::ClientLabel {
                endpoint_id: String::new(),
                label: String::new(),
                ticket_id: None,
            },
            crate::config::Limits::default(),
            "/nix/store/00000000000000000000000000000000-x.drv"
                .parse()
                .unwrap(),
            BTreeMap::from([(path.clone(), input)]),
            BTreeSet::from([path]),
        )
    }

    /// A message starting a part of `path`'s NAR at `offset`.
    fn part(path: &StorePath, offset: usize, data: &[u8]) -> UploadInputsRequest {
        UploadInputsRequest {
            session_id: "s".into(),
            store_path: path.to_string(),
            offset: offset as u64,
            data: data.to_vec().into(),
        }
    }

    #[tokio::test]
    async fn an_import_that_fails_early_stops_the_upload() {
        let work = tempfile::tempdir().unwrap();
        let uploads = work.path().join("uploads");
        // Large enough to be imported while it arrives, by a Nix that cannot run.
        let contents = vec![7; 3 << 20];
        let (input, nar) = source(&contents, work.path());
        let path = input.path.clone();
        let session = session_of(input);
        let nix = Nix::builder()
            .program_dir(work.path().join("no-nix"))
            .build();
        let first = tokio_stream::iter([Ok(part(&path, 0, &nar[..1 << 20]))]);
        // Nix fails at once, so even this first call may see it fail.
        match receive(&session, &nix, &uploads, first).await {
            Ok(partial) => assert_eq!(partial.paths_imported, 0),
            Err(status) => assert!(status.message().contains("could not run its Nix")),
        }
        // The upload goes with the import, staging and all.
        assert!(
            unstaged(&uploads).await,
            "the upload went on without its import"
        );
        let next = tokio_stream::iter([Ok(part(&path, 1 << 20, &nar[1 << 20..2 << 20]))]);
        let refused = receive(&session, &nix, &uploads, next).await.err();
        let refused = refused.expect("the upload was stopped");
        assert!(
            refused.message().contains("could not run its Nix"),
            "{refused:?}"
        );
    }

    async fn read_all(nar: &NarFile) -> Result<Vec<u8>, Status> {
        collect(nar.read_range(0, 0)?).await
    }

    async fn collect(
        mut chunks: tokio::sync::mpsc::Receiver<Result<Bytes, Status>>,
    ) -> Result<Vec<u8>, Status> {
        let mut out = Vec::new();
        while let Some(chunk) = chunks.recv().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    /// `contents` as an announced source, and its staging in a new directory.
    fn stage_source(
        contents: &[u8],
    ) -> (tempfile::TempDir, DeclaredInput, Vec<u8>, Staged, NarFile) {
        let staging = tempfile::tempdir().unwrap();
        std::fs::create_dir(staging.path().join("nar")).unwrap();
        let (input, nar) = source(contents, staging.path());
        let (staged, served) = Staged::start(input.clone(), staging.path()).unwrap();
        (staging, input, nar, staged, served)
    }

    #[tokio::test]
    async fn parts_in_any_order_make_the_nar_which_readers_get_once_released() {
        let contents: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let (staging, input, nar, mut staged, served) = stage_source(&contents);
        let cuts = [0, 9_000, 20_000, 33_333, nar.len()];
        let parts: Vec<(u64, &[u8])> = cuts
            .windows(2)
            .map(|w| (w[0] as u64, &nar[w[0]..w[1]]))
            .collect();
        for (offset, data) in [parts[2], parts[3], parts[1]] {
            assert!(!staged.write(offset, Bytes::copy_from_slice(data)).unwrap());
        }
        assert!(
            staged
                .write(parts[0].0, Bytes::copy_from_slice(parts[0].1))
                .unwrap()
        );
        // Nobody was reading: all of it is in the file.
        let staged_file = std::fs::read(nar_file(staging.path(), &input.path)).unwrap();
        assert_eq!(staged_file, nar);
        // Checked in full, but held back until the whole upload is.
        let reader = tokio::spawn(async move { read_all(&served).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!reader.is_finished());
        staged.release();
        assert_eq!(reader.await.unwrap().unwrap(), nar);
    }

    #[tokio::test]
    async fn a_reader_that_keeps_up_gets_the_nar_without_a_file() {
        let contents: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (staging, input, nar, mut staged, served) = stage_source(&contents);
        let reader = tokio::spawn(collect(served.read_range(0, 0).unwrap()));
        let nar = Bytes::from(nar);
        for at in (0..nar.len()).step_by(30_000) {
            let part = nar.slice(at..(at + 30_000).min(nar.len()));
            staged.write(at as u64, part).unwrap();
            tokio::task::yield_now().await;
        }
        // Held back until the whole upload has passed, as from a file.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!reader.is_finished());
        staged.release();
        assert_eq!(reader.await.unwrap().unwrap(), nar);
        let staged_file = std::fs::read(nar_file(staging.path(), &input.path)).unwrap();
        assert!(
            staged_file.is_empty(),
            "{} bytes written",
            staged_file.len()
        );
        let again = served.read_range(0, 0).unwrap_err();
        assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    }

    /// A NAR in parts, cut at `cuts`.
    fn parts(nar: &Bytes, cuts: &[usize]) -> Vec<(u64, Bytes)> {
        cuts.windows(2)
            .map(|w| (w[0] as u64, nar.slice(w[0]..w[1])))
            .collect()
    }

    #[tokio::test]
    async fn a_reader_gets_the_nar_from_the_file_and_from_memory_alike() {
        let contents: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let (_staging, _, nar, mut staged, served) = stage_source(&contents);
        let nar = Bytes::from(nar);
        let parts = parts(&nar, &[0, 40_000, 90_000, 150_000, 220_000, nar.len()]);
        // Before anyone reads: to the file.
        staged.write(parts[0].0, parts[0].1.clone()).unwrap();
        let reader = tokio::spawn(collect(served.read_range(0, 0).unwrap()));
        // Early, so to the file; then in order, held for the reader; the
        // early part read back; in order again.
        for i in [2, 1, 3, 4] {
            staged.write(parts[i].0, parts[i].1.clone()).unwrap();
            tokio::task::yield_now().await;
        }
        staged.release();
        assert_eq!(reader.await.unwrap().unwrap(), nar);
    }

    #[tokio::test]
    async fn overlapping_long_or_wrong_parts_are_refused() {
        let (_staging, _, nar, mut staged, _) = stage_source(b"some source text");
        staged
            .write(40, Bytes::copy_from_slice(&nar[40..60]))
            .unwrap();
        let twice = staged
            .write(50, Bytes::copy_from_slice(&nar[50..70]))
            .unwrap_err();
        assert!(twice.message().contains("sent twice"), "{twice:?}");
        let early = staged
            .write(30, Bytes::copy_from_slice(&nar[30..45]))
            .unwrap_err();
        assert!(early.message().contains("sent twice"), "{early:?}");
        let long = staged
            .write(nar.len() as u64 - 2, Bytes::from_static(b"abc"))
            .unwrap_err();
        assert!(long.message().contains("longer"), "{long:?}");

        let (_staging, _, mut nar, mut staged, served) = stage_source(b"some source text");
        let last = nar.len() - 20;
        nar[last] ^= 1;
        let err = staged.write(0, Bytes::from(nar)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        // Readers learn why, and never get the bytes that failed.
        let read = read_all(&served).await.unwrap_err();
        assert!(read.message().contains("does not match"), "{read:?}");
    }
}
