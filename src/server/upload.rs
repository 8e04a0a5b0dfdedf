//! Receiving input uploads: only announced, missing paths, content-addressed
//! or signed by a key the builder trusts, checked byte by byte, then handed
//! to the builder's Nix through `nix-daemon --stdio`, so that Nix checks
//! them again and no trusted user rights are needed.
//!
//! A session's inputs may arrive over several `UploadInputs` calls at once,
//! each carrying parts (byte ranges) of paths: one call rides one QUIC
//! stream, whose flow-control window caps it on a long link. A part that
//! arrives early is written where it belongs in the path's staging file, and
//! the checks read the NAR in order as soon as the bytes before a part are
//! in. A failure anywhere discards the whole upload.
//!
//! The import begins with the upload: Nix reads the staged NARs one after
//! the other, in dependency order, as far as they are checked (see
//! [`NarFile`](super::nar_file::NarFile)); bytes Nix takes as they come
//! are handed to it from memory and never written. The last byte of every
//! NAR is held back until all of them have passed, so no path of a failed
//! upload becomes valid (Nix, stopped halfway, may leave the invalid
//! directory it was writing, as after any interrupted substitution). The
//! call that completes the last missing path returns once the import has.

mod import;
mod staged;

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    time::Duration,
};

use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use tracing::{debug, info};

use self::{
    import::{ImportTask, StagingDir, import_while_arriving, stage},
    staged::Staged,
};
use super::{declared_input::DeclaredInput, error::ServerError, sessions::Session};
use crate::{
    nix::store_path::StorePath,
    nixcmd::Nix,
    proto::{UploadInputsRequest, UploadInputsResponse},
};

/// How long an upload call waits for the builder's Nix to take the bytes
/// held for it before writing them to disk after all.
const NIX_PATIENCE: Duration = Duration::from_secs(1);

/// The upload of a session, shared by its concurrent calls; empty between
/// uploads.
type Slot = tokio::sync::Mutex<Option<Arc<Upload>>>;

/// The upload slot of every session that has begun one, by session id.
/// Removing a session's slot drops its upload (staging, running import and
/// all) once no call holds it any more.
#[derive(Debug)]
pub struct Uploads {
    nix: Nix,
    dir: PathBuf,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl Uploads {
    /// Uploads staged under `dir` and imported by `nix`.
    pub fn new(nix: Nix, dir: PathBuf) -> Self {
        Self {
            nix,
            dir,
            slots: Mutex::default(),
        }
    }

    /// The upload slot of `session`; refused once the session is ended, so
    /// no slot outlives [`Self::remove`].
    fn slot(&self, session: &Session) -> Result<Arc<Slot>, ServerError> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if session.cancelled.is_cancelled() {
            return Err(ServerError::NotFound(format!(
                "no session {:?} on this connection; open a new session",
                session.id
            )));
        }
        Ok(slots.entry(session.id.clone()).or_default().clone())
    }

    /// Forgets the upload of session `id`, which has ended (and is
    /// cancelled).
    pub fn remove(&self, id: &str) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Receives one `UploadInputs` call for `session`. If this call
    /// completes the upload, it sees the import through before returning.
    /// Any failure, the call being dropped midway, or the session being
    /// cancelled (its ticket revoked, the server stopping) discards
    /// everything staged for the session.
    pub async fn receive(
        &self,
        session: &Session,
        stream: impl Stream<Item = Result<UploadInputsRequest, Status>>,
    ) -> Result<UploadInputsResponse, ServerError> {
        let slot = self.slot(session)?;
        tokio::select! {
            received = receive(session, &slot, &self.nix, &self.dir, stream) => received,
            () = session.cancelled.cancelled() => Err(ServerError::Cancelled(format!(
                "the session was cancelled: {}",
                session.cancelled_because().unwrap_or("its client left")
            ))),
        }
    }
}

/// Each path being received, by store path.
type StagedPaths = HashMap<StorePath, Arc<Mutex<Staged>>>;

/// One session's upload in progress.
#[derive(Debug)]
pub struct Upload {
    /// The paths it brings: the session's missing inputs when it began.
    missing: BTreeSet<StorePath>,
    state: Mutex<UploadState>,
}

#[derive(Debug)]
struct UploadState {
    /// Every missing path, staged from the start.
    paths: StagedPaths,
    /// Paths checked in full.
    checked: BTreeSet<StorePath>,
    /// Why calls still sending must stop: the upload failed or is over.
    ended: Option<ServerError>,
    /// What the call that completes the upload takes to finish it; `None`
    /// once taken (or the upload failed).
    finish: Option<Finish>,
}

/// What finishing an upload takes: the import and the staging directory,
/// which the finishing call owns from then on, so a late failure of another
/// call cannot pull the directory away from under Nix.
#[derive(Debug)]
struct Finish {
    import: ImportTask,
    dir: StagingDir,
}

impl Upload {
    /// The session's upload, begun by this call if it is the first; `None`
    /// if no input is missing (any more).
    async fn join_or_begin(
        slot: &Slot,
        session: &Session,
        nix: &Nix,
        uploads_dir: &Path,
    ) -> Result<Option<Arc<Self>>, ServerError> {
        let mut slot = slot.lock().await;
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
        // Saturating: sizes are the peer's word, and a sum past u64 is
        // simply over any budget.
        let total = inputs
            .iter()
            .fold(0u64, |total, input| total.saturating_add(input.nar_size));
        // Refused before anything is staged: the announced sizes are exact.
        session.check_upload_room(total)?;
        let (uploads_dir, id) = (uploads_dir.to_owned(), session.id.clone());
        // Thousands of small inputs are thousands of files: not on a runtime
        // worker.
        let staging = tokio::task::spawn_blocking(move || stage(&uploads_dir, &id, inputs))
            .await
            .map_err(|err| ServerError::Internal(format!("staging an upload: {err}")))??;
        debug!(session = %session.id, bytes = total, "importing the upload while it arrives");
        let upload = Arc::new_cyclic(|upload: &Weak<Self>| {
            let import = import_while_arriving(nix, staging.narinfos, staging.nars, upload);
            Self {
                missing,
                state: Mutex::new(UploadState {
                    paths: staging.paths,
                    checked: BTreeSet::new(),
                    ended: None,
                    finish: Some(Finish {
                        import,
                        dir: StagingDir(Some(staging.dir)),
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

    fn check_alive(&self) -> Result<(), ServerError> {
        check_alive(&self.state())
    }

    /// The staging file of `path`.
    fn staged(&self, path: &StorePath) -> Result<Arc<Mutex<Staged>>, ServerError> {
        let state = self.state();
        check_alive(&state)?;
        Ok(state.paths[path].clone())
    }

    /// Abandons the upload: nothing staged survives, and a running import
    /// is stopped. Once a call has taken the finished upload, a failing
    /// call changes nothing.
    fn fail(&self, err: &ServerError) {
        let ended = ServerError::Aborted(format!("another part of this upload failed: {err}"));
        self.abandon(ended, false);
    }

    /// The import gave up while parts are still arriving: the calls still
    /// sending stop with its reason. Once every part is in, the call
    /// finishing the upload reports it instead.
    fn import_gave_up(&self, err: ServerError) {
        self.abandon(err, true);
    }

    fn abandon(&self, ended: ServerError, only_while_arriving: bool) {
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
    fn call_gone(&self, slot: &Slot) {
        let finishing = {
            let state = self.state();
            state.finish.is_none() && state.ended.is_none()
        };
        if !finishing {
            self.fail(&ServerError::Cancelled(
                "an upload call was cancelled".to_owned(),
            ));
            return;
        }
        // It was the call finishing the upload, and the import stopped with
        // it: the upload is over, unfinished, and the client may start
        // another in this session.
        self.end(ServerError::Aborted(
            "the call finishing this upload was cancelled".to_owned(),
        ));
        if let Ok(mut slot) = slot.try_lock() {
            *slot = None;
        }
    }

    /// Why calls must stop, if they must.
    fn ended(&self) -> Option<ServerError> {
        self.state().ended.clone()
    }

    /// Records a path checked in full; once all are, lets readers have the
    /// last bytes.
    fn complete(&self, path: StorePath) -> Result<(), ServerError> {
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
    fn end(&self, why: ServerError) {
        let mut state = self.state();
        state.ended.get_or_insert(why);
        state.paths.clear();
    }
}

fn check_alive(state: &UploadState) -> Result<(), ServerError> {
    match &state.ended {
        Some(err) => Err(err.clone()),
        None => Ok(()),
    }
}

/// Tells the upload when a call is dropped before it is done with it: the
/// client reset its stream or went away.
struct CallGuard<'a>(Option<(&'a Slot, &'a Upload)>);

impl CallGuard<'_> {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if let Some((slot, upload)) = self.0 {
            upload.call_gone(slot);
        }
    }
}

fn internal(action: &'static str) -> impl Fn(std::io::Error) -> ServerError {
    move |err| {
        tracing::error!("{action}: {err}");
        ServerError::Internal(format!("the builder failed {action}; see its log"))
    }
}

/// [`Uploads::receive`] with `session`'s slot, staging under `uploads_dir`.
async fn receive(
    session: &Session,
    slot: &Slot,
    nix: &Nix,
    uploads_dir: &Path,
    stream: impl Stream<Item = Result<UploadInputsRequest, Status>>,
) -> Result<UploadInputsResponse, ServerError> {
    let Some(upload) = Upload::join_or_begin(slot, session, nix, uploads_dir).await? else {
        return Ok(UploadInputsResponse::default());
    };
    let mut guard = CallGuard(Some((slot, &upload)));
    let bytes = match receive_parts(session, &upload, stream).await {
        Ok(bytes) => bytes,
        Err(err) => {
            guard.disarm();
            upload.fail(&err);
            return Err(err);
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
    // Nix recomputes each store path from the NAR and its `CA:` field, or
    // checks its signatures against its own trusted keys (signatures
    // required), so this needs no trusted-user rights and admits nothing
    // unverifiable.
    // Should this call be dropped meanwhile, `finish` goes with it: Nix is
    // stopped and the staging removed.
    // The builder's own work: the session is not idle while Nix imports.
    let working = session.working();
    let imported = finish.import.complete().await;
    drop(working);
    guard.disarm();
    drop(finish.dir);
    upload.end(ServerError::FailedPrecondition(
        "this upload is over".to_owned(),
    ));
    if imported.is_ok() {
        session.mark_present(&paths);
    }
    *slot.lock().await = None;
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
) -> Result<u64, ServerError> {
    tokio::pin!(stream);
    let mut part: Option<(StorePath, Arc<Mutex<Staged>>, u64)> = None;
    let mut bytes = 0u64;
    while let Some(message) = stream.next().await.transpose()? {
        upload.check_alive()?;
        if !message.store_path.is_empty() {
            let path: StorePath = message
                .store_path
                .parse()
                .map_err(|err| ServerError::InvalidArgument(format!("store_path: {err}")))?;
            if !upload.missing.contains(&path) {
                return Err(ServerError::InvalidArgument(format!(
                    "{path} was not reported missing for this session; only missing inputs are accepted"
                )));
            }
            debug!(session = %session.id, %path, offset = message.offset, "receiving input");
            let staged = upload.staged(&path)?;
            part = Some((path, staged, message.offset));
        }
        if message.data.is_empty() {
            continue;
        }
        let Some((path, staged, offset)) = part.as_mut() else {
            return Err(ServerError::InvalidArgument(
                "data before the first store_path".to_owned(),
            ));
        };
        let len = message.data.len() as u64;
        session.count_upload(len)?;
        bytes += len;
        let at = *offset;
        *offset = at.checked_add(len).ok_or_else(|| {
            ServerError::InvalidArgument(format!(
                "a part of {path} at offset {at} would end past any NAR"
            ))
        })?;
        let staged = staged.clone();
        let (complete, crowded) = tokio::task::spawn_blocking(move || {
            let mut staged = staged.lock().unwrap_or_else(|p| p.into_inner());
            let complete = staged.write(at, message.data)?;
            Ok((complete, staged.crowded()))
        })
        .await
        .map_err(|err| ServerError::Internal(format!("checking an upload: {err}")))?
        // Another call's failure may have removed the file meanwhile.
        .map_err(|err: ServerError| upload.ended().unwrap_or(err))?;
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
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        nix::{content_address::ContentAddress, hash::Sha256Hash},
        server::declared_input::Proof,
    };

    /// A source path holding `contents`, as announced by a client.
    pub(super) fn source(contents: &[u8], dir: &Path) -> (DeclaredInput, Vec<u8>) {
        announced(contents, dir, "src", |nar_hash| {
            format!("fixed:r:{nar_hash}").parse().unwrap()
        })
    }

    /// A text-hashed path holding `contents`, as a client announces a
    /// `.drv` file.
    pub(super) fn text(contents: &[u8], dir: &Path) -> (DeclaredInput, Vec<u8>) {
        announced(contents, dir, "t.drv", |_| {
            ContentAddress::Text(Sha256Hash::digest(contents))
        })
    }

    /// The NAR of `file`, a file or a tree.
    pub(super) fn nar_of(file: &Path) -> Vec<u8> {
        let mut nar = Vec::new();
        crate::store_nar::dump(file, 1000, |chunk| {
            nar.extend_from_slice(&chunk);
            Ok(())
        })
        .unwrap();
        nar
    }

    /// A path named `name` holding `contents`, with the content address
    /// `ca` makes of its NAR hash, and its NAR.
    fn announced(
        contents: &[u8],
        dir: &Path,
        name: &str,
        ca: impl FnOnce(&Sha256Hash) -> ContentAddress,
    ) -> (DeclaredInput, Vec<u8>) {
        let file = dir.join(name);
        std::fs::write(&file, contents).unwrap();
        let nar = nar_of(&file);
        let hash = Sha256Hash::digest(&nar);
        let ca = ca(&hash);
        let path = ca.store_path(name, &BTreeSet::new(), false).unwrap();
        let input = DeclaredInput {
            path,
            references: BTreeSet::new(),
            self_reference: false,
            proof: Proof::ContentAddress(ca),
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
        let waiting = tokio::sync::Notify::new();
        let stalled = stalls_after(part(0, &nar[..half]), &waiting);
        let uploads_of = Uploads::new(Nix::new(), uploads.clone());
        tokio::select! {
            _ = uploads_of.receive(&session, stalled) => {
                panic!("the call ended without the rest of its NAR")
            }
            () = waiting.notified() => {}
        }
        // The call was dropped with the select: the client went away.
        assert!(unstaged(&uploads).await, "the staging outlived the call");
        let rest = tokio_stream::iter([Ok(part(half, &nar[half..]))]);
        let refused = uploads_of.receive(&session, rest).await.unwrap_err();
        assert!(matches!(refused, ServerError::Aborted(_)), "{refused:?}");
    }

    /// A call that sends `first`, then stays open without sending more;
    /// `waiting` is notified when the call asks for more, so `first` is in.
    fn stalls_after(
        first: UploadInputsRequest,
        waiting: &tokio::sync::Notify,
    ) -> impl Stream<Item = Result<UploadInputsRequest, Status>> + '_ {
        tokio_stream::iter([Ok(first)]).chain(futures::stream::poll_fn(|_| {
            waiting.notify_one();
            std::task::Poll::Pending
        }))
    }

    #[tokio::test]
    async fn a_cancelled_session_ends_its_upload_call() {
        let work = tempfile::tempdir().unwrap();
        let uploads = work.path().join("uploads");
        let (input, nar) = source(b"a source whose ticket is revoked", work.path());
        let first = part(&input.path, 0, &nar[..nar.len() / 2]);
        let session = session_of(input);
        let waiting = tokio::sync::Notify::new();
        let uploads_of = Uploads::new(Nix::new(), uploads.clone());
        let call = uploads_of.receive(&session, stalls_after(first, &waiting));
        tokio::pin!(call);
        tokio::select! {
            _ = &mut call => panic!("the call ended without the rest of its NAR"),
            () = waiting.notified() => {}
        }
        session.cancel_because("its ticket was revoked");
        let ended = call.await.unwrap_err();
        assert!(
            matches!(&ended, ServerError::Cancelled(why) if why.contains("its ticket was revoked")),
            "{ended:?}"
        );
        assert!(unstaged(&uploads).await, "the staging outlived the session");
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
        session_missing([input])
    }

    /// A session missing `inputs`.
    fn session_missing(inputs: impl IntoIterator<Item = DeclaredInput>) -> Session {
        let inputs: BTreeMap<StorePath, DeclaredInput> = inputs
            .into_iter()
            .map(|input| (input.path.clone(), input))
            .collect();
        let missing = inputs.keys().cloned().collect();
        Session::new(
            "s".into(),
            crate::server::sessions::Owner {
                endpoint_id: iroh::SecretKey::from_bytes(&[1; 32]).public(),
                connection: 1,
            },
            crate::server::status::ClientLabel {
                endpoint_id: String::new(),
                label: String::new(),
                ticket_id: None,
            },
            crate::config::Limits::default(),
            "/nix/store/00000000000000000000000000000000-x.drv"
                .parse()
                .unwrap(),
            inputs,
            missing,
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
        let uploads_of = Uploads::new(nix, uploads.clone());
        let first = tokio_stream::iter([Ok(part(&path, 0, &nar[..1 << 20]))]);
        // Nix fails at once, so even this first call may see it fail.
        match uploads_of.receive(&session, first).await {
            Ok(partial) => assert_eq!(partial.paths_imported, 0),
            Err(err) => assert!(err.to_string().contains("could not run its Nix")),
        }
        // The upload goes with the import, staging and all.
        assert!(
            unstaged(&uploads).await,
            "the upload went on without its import"
        );
        let next = tokio_stream::iter([Ok(part(&path, 1 << 20, &nar[1 << 20..2 << 20]))]);
        let refused = uploads_of.receive(&session, next).await.err();
        let refused = refused.expect("the upload was stopped");
        assert!(
            refused.to_string().contains("could not run its Nix"),
            "{refused:?}"
        );
    }

    /// Announces two inputs of `size` bytes each and sends a part: refused
    /// as over the upload budget before staging touched the disk at all.
    async fn assert_over_budget_stages_nothing(size: u64) {
        let work = tempfile::tempdir().unwrap();
        let announce = |contents: &[u8]| {
            let (mut input, _) = source(contents, work.path());
            input.nar_size = size;
            input
        };
        let (a, b) = (announce(b"a"), announce(b"b"));
        let path = a.path.clone();
        let session = session_missing([a, b]);
        let uploads = work.path().join("uploads");
        let uploads_of = Uploads::new(Nix::new(), uploads.clone());
        let call = tokio_stream::iter([Ok(part(&path, 0, b"x"))]);
        let refused = uploads_of.receive(&session, call).await.unwrap_err();
        assert!(
            matches!(
                refused,
                ServerError::OverBudget(crate::server::error::Budget::UploadBytes, _)
            ),
            "{refused:?}"
        );
        assert!(
            !uploads.exists(),
            "staging began before the budget was checked"
        );
    }

    #[tokio::test]
    async fn an_upload_over_budget_stages_nothing() {
        let limit = crate::config::Limits::default().max_upload_bytes.get();
        assert_over_budget_stages_nothing(limit / 2 + 1).await;
    }

    #[tokio::test]
    async fn announced_sizes_past_u64_are_over_budget_not_a_panic() {
        assert_over_budget_stages_nothing(1 << 63).await;
    }

    #[tokio::test]
    async fn an_offset_past_u64_is_refused_not_a_panic() {
        let work = tempfile::tempdir().unwrap();
        let (input, _) = source(b"small", work.path());
        let path = input.path.clone();
        let session = session_of(input);
        let uploads_of = Uploads::new(Nix::new(), work.path().join("uploads"));
        let call = tokio_stream::iter([Ok(part(&path, usize::MAX - 1, b"four"))]);
        let refused = uploads_of.receive(&session, call).await.unwrap_err();
        assert!(
            matches!(&refused, ServerError::InvalidArgument(message) if message.contains("past any NAR")),
            "{refused:?}"
        );
    }
}
