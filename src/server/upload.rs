//! Receiving input uploads: only announced, missing, content-addressed paths,
//! checked byte by byte, then handed to the builder's Nix as a throwaway
//! binary cache so that Nix checks them again and no trusted user rights are
//! needed.
//!
//! A session's inputs may arrive over several `UploadInputs` calls at once,
//! each carrying parts (byte ranges) of paths: one call rides one QUIC
//! stream, whose flow-control window caps it on a long link. Every part is
//! written where it belongs in the path's staging file, and the checks read
//! the NAR in order as soon as the bytes before a part are in. The call that
//! completes the last missing path imports them all; a failure anywhere
//! discards the whole upload.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    io::Write as _,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use tracing::{debug, info};

use super::session::{DeclaredInput, Session};
use crate::{
    nix::{
        content_address::ContentAddress,
        hash::Sha256Hash,
        nar::{NarHasher, NarValidator, single_file_contents},
        narinfo::NarInfo,
        store_path::StorePath,
    },
    nixcmd::Nix,
    proto::{UploadInputsRequest, UploadInputsResponse},
};

/// Text-hashed inputs (`.drv` files) are checked in memory; a derivation
/// this large is not a derivation.
const MAX_TEXT_INPUT: u64 = 16 << 20;

/// Bytes read back at a time when checking parts that arrived early.
const READ_BACK: usize = 1 << 20;

/// The upload of a session, shared by its concurrent calls; kept in the
/// session so it goes (staging and all) when the session does.
pub type Slot = Mutex<Option<Arc<Upload>>>;

/// One session's upload in progress.
#[derive(Debug)]
pub struct Upload {
    staging: PathBuf,
    state: Mutex<UploadState>,
}

#[derive(Debug)]
struct UploadState {
    /// Removed (with everything staged) when the upload ends either way.
    dir: Option<tempfile::TempDir>,
    paths: HashMap<StorePath, Arc<Mutex<Staged>>>,
    /// Paths checked in full, their narinfos written.
    checked: BTreeSet<StorePath>,
    /// Why the upload was abandoned, for calls still sending.
    failed: Option<Status>,
    /// Whether a call has taken on the import.
    importing: bool,
}

impl Upload {
    /// The session's upload, begun by this call if it is the first.
    fn of(session: &Session, uploads_dir: &Path) -> Result<Arc<Self>, Status> {
        let mut slot = session.upload.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(upload) = &*slot {
            return Ok(upload.clone());
        }
        let dir = staging_dir(uploads_dir, &session.id)?;
        let upload = Arc::new(Self {
            staging: dir.path().to_owned(),
            state: Mutex::new(UploadState {
                dir: Some(dir),
                paths: HashMap::new(),
                checked: BTreeSet::new(),
                failed: None,
                importing: false,
            }),
        });
        *slot = Some(upload.clone());
        Ok(upload)
    }

    fn state(&self) -> MutexGuard<'_, UploadState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_alive(&self) -> Result<(), Status> {
        check_alive(&self.state())
    }

    /// The staging file of `input`, created on its first part.
    fn path(&self, input: &DeclaredInput) -> Result<Arc<Mutex<Staged>>, Status> {
        let mut state = self.state();
        check_alive(&state)?;
        if let Some(staged) = state.paths.get(&input.path) {
            return Ok(staged.clone());
        }
        let staged = Arc::new(Mutex::new(Staged::start(input.clone(), &self.staging)?));
        state.paths.insert(input.path.clone(), staged.clone());
        Ok(staged)
    }

    /// Abandons the upload: nothing staged survives.
    fn fail(&self, status: &Status) {
        let mut state = self.state();
        state.failed.get_or_insert_with(|| status.clone());
        state.paths.clear();
        state.dir = None;
    }

    /// Records a path checked in full, writing its narinfo beside its NAR.
    /// Under the lock, so an upload failing meanwhile cannot pull the
    /// staging directory away halfway.
    fn complete(&self, narinfo: NarInfo) -> Result<(), Status> {
        let mut state = self.state();
        check_alive(&state)?;
        let file = self
            .staging
            .join(format!("{}.narinfo", narinfo.store_path.hash_part()));
        std::fs::write(file, narinfo.to_string()).map_err(internal("writing an upload narinfo"))?;
        state.checked.insert(narinfo.store_path);
        Ok(())
    }

    /// Whether every missing path is in and this call should import them.
    fn take_import(&self, missing: &BTreeSet<StorePath>) -> bool {
        let mut state = self.state();
        let ready = !state.importing && state.failed.is_none() && state.checked == *missing;
        if ready {
            state.importing = true;
        }
        ready
    }
}

fn check_alive(state: &UploadState) -> Result<(), Status> {
    match &state.failed {
        Some(status) => Err(Status::aborted(format!(
            "another part of this upload failed: {}",
            status.message()
        ))),
        None => Ok(()),
    }
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

/// One path being received, possibly in parts out of order.
#[derive(Debug)]
struct Staged {
    input: DeclaredInput,
    file: File,
    /// Bytes written and checked, from the start.
    checked: u64,
    /// Parts written beyond `checked`, start → end; never overlapping.
    ahead: BTreeMap<u64, u64>,
    hasher: NarHasher,
    validator: NarValidator,
    text: Option<Vec<u8>>,
}

impl Staged {
    fn start(input: DeclaredInput, staging: &Path) -> Result<Self, Status> {
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
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(nar_file(staging, &input.path))
            .map_err(internal("creating an upload file"))?;
        Ok(Self {
            input,
            file,
            checked: 0,
            ahead: BTreeMap::new(),
            hasher: NarHasher::new(),
            validator: NarValidator::new(),
            text,
        })
    }

    /// Stores `data` at `offset` and checks whatever is now contiguous.
    /// Returns the narinfo to import with once the whole NAR is in.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<Option<NarInfo>, Status> {
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
        self.file
            .write_all_at(data, offset)
            .map_err(internal("writing an upload file"))?;
        if offset == self.checked {
            self.check(data)?;
        } else {
            self.ahead.insert(offset, end);
        }
        while let Some(ahead_end) = self.ahead.remove(&self.checked) {
            let mut buffer = vec![0; READ_BACK];
            while self.checked < ahead_end {
                let n = (ahead_end - self.checked).min(READ_BACK as u64) as usize;
                self.file
                    .read_exact_at(&mut buffer[..n], self.checked)
                    .map_err(internal("reading an upload file back"))?;
                self.check(&buffer[..n])?;
            }
        }
        if self.checked < self.input.nar_size {
            return Ok(None);
        }
        self.finish().map(Some)
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

    /// Checks the complete NAR and returns the narinfo to import it with.
    fn finish(&mut self) -> Result<NarInfo, Status> {
        let path = self.input.path.clone();
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
        Ok(NarInfo {
            store_path: path.clone(),
            url: nar_url(&path),
            compression: Some("none".to_owned()),
            file_hash: None,
            file_size: None,
            nar_hash: hash,
            nar_size: size,
            references: self.input.references.clone(),
            deriver: None,
            signatures: Vec::new(),
            ca: Some(self.input.ca.clone()),
            extra: Vec::new(),
        })
    }
}

fn nar_url(path: &StorePath) -> String {
    format!("nar/{}.nar", path.hash_part())
}

fn nar_file(staging: &Path, path: &StorePath) -> PathBuf {
    staging.join(nar_url(path))
}

fn internal(action: &'static str) -> impl Fn(std::io::Error) -> Status {
    move |err| {
        tracing::error!("{action}: {err}");
        Status::internal(format!("the builder failed {action}; see its log"))
    }
}

/// Receives one `UploadInputs` call for `session`, staging under
/// `uploads_dir`. If this call completes the upload, it imports the inputs
/// before returning. Any failure discards everything staged for the
/// session.
pub async fn receive(
    session: &Session,
    nix: &Nix,
    uploads_dir: &Path,
    stream: impl Stream<Item = Result<UploadInputsRequest, Status>>,
) -> Result<UploadInputsResponse, Status> {
    let missing = session.missing();
    if missing.is_empty() {
        return Ok(UploadInputsResponse::default());
    }
    let upload = Upload::of(session, uploads_dir)?;
    let result = receive_parts(session, &missing, &upload, stream).await;
    let bytes = match result {
        Ok(bytes) => bytes,
        Err(status) => {
            upload.fail(&status);
            return Err(status);
        }
    };
    // Another call may have imported meanwhile; `take_import` then says no.
    if !upload.take_import(&missing) {
        return Ok(UploadInputsResponse {
            paths_imported: 0,
            bytes_received: bytes,
        });
    }
    let paths: Vec<StorePath> = missing.into_iter().collect();
    // Nix recomputes each store path from the NAR and its `CA:` field, so
    // this needs no trusted-user rights and admits nothing unverifiable.
    let imported = nix
        .add_content_addressed_from_cache(&upload.staging, &paths)
        .await
        .map_err(|err| {
            Status::invalid_argument(format!(
                "the builder's Nix refused the uploaded inputs: {err}"
            ))
        });
    upload.fail(&Status::aborted("the upload is over"));
    *session.upload.lock().unwrap_or_else(|p| p.into_inner()) = None;
    imported?;
    session.mark_present(&paths);
    info!(session = %session.id, paths = paths.len(), "inputs uploaded");
    Ok(UploadInputsResponse {
        paths_imported: u32::try_from(paths.len()).unwrap_or(u32::MAX),
        bytes_received: bytes,
    })
}

/// Writes and checks the parts of one call; returns the bytes it carried.
async fn receive_parts(
    session: &Session,
    missing: &BTreeSet<StorePath>,
    upload: &Upload,
    stream: impl Stream<Item = Result<UploadInputsRequest, Status>>,
) -> Result<u64, Status> {
    tokio::pin!(stream);
    let mut part: Option<(Arc<Mutex<Staged>>, u64)> = None;
    let mut bytes = 0u64;
    while let Some(message) = stream.next().await.transpose()? {
        upload.check_alive()?;
        if !message.store_path.is_empty() {
            let path: StorePath = message
                .store_path
                .parse()
                .map_err(|err| Status::invalid_argument(format!("store_path: {err}")))?;
            if !missing.contains(&path) {
                return Err(Status::invalid_argument(format!(
                    "{path} was not reported missing for this session; only missing inputs are accepted"
                )));
            }
            let input = &session.inputs[&path];
            debug!(session = %session.id, %path, offset = message.offset, "receiving input");
            part = Some((upload.path(input)?, message.offset));
        }
        if message.data.is_empty() {
            continue;
        }
        let Some((staged, offset)) = part.as_mut() else {
            return Err(Status::invalid_argument("data before the first store_path"));
        };
        let len = message.data.len() as u64;
        session.count_upload(len)?;
        bytes += len;
        let at = *offset;
        *offset += len;
        let staged = staged.clone();
        let written = tokio::task::spawn_blocking(move || {
            staged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(at, &message.data)
        })
        .await
        .map_err(|err| Status::internal(format!("checking an upload: {err}")))??;
        if let Some(narinfo) = written {
            upload.complete(narinfo)?;
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

    #[test]
    fn parts_in_any_order_make_the_nar() {
        let staging = tempfile::tempdir().unwrap();
        std::fs::create_dir(staging.path().join("nar")).unwrap();
        let contents: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let (input, nar) = source(&contents, staging.path());
        let mut staged = Staged::start(input.clone(), staging.path()).unwrap();
        let cuts = [0, 9_000, 20_000, 33_333, nar.len()];
        let parts: Vec<(u64, &[u8])> = cuts
            .windows(2)
            .map(|w| (w[0] as u64, &nar[w[0]..w[1]]))
            .collect();
        for (offset, data) in [parts[2], parts[3], parts[1]] {
            assert!(staged.write(offset, data).unwrap().is_none());
        }
        let narinfo = staged.write(parts[0].0, parts[0].1).unwrap().unwrap();
        assert_eq!(narinfo.nar_hash, input.nar_hash);
        assert_eq!(narinfo.nar_size, nar.len() as u64);
        let staged_file = std::fs::read(nar_file(staging.path(), &input.path)).unwrap();
        assert_eq!(staged_file, nar);
    }

    #[test]
    fn overlapping_long_or_wrong_parts_are_refused() {
        let staging = tempfile::tempdir().unwrap();
        std::fs::create_dir(staging.path().join("nar")).unwrap();
        let (input, nar) = source(b"some source text", staging.path());
        let mut staged = Staged::start(input.clone(), staging.path()).unwrap();
        staged.write(40, &nar[40..60]).unwrap();
        let twice = staged.write(50, &nar[50..70]).unwrap_err();
        assert!(twice.message().contains("sent twice"), "{twice:?}");
        let early = staged.write(30, &nar[30..45]).unwrap_err();
        assert!(early.message().contains("sent twice"), "{early:?}");
        let long = staged.write(nar.len() as u64 - 2, b"abc").unwrap_err();
        assert!(long.message().contains("longer"), "{long:?}");

        let staging = tempfile::tempdir().unwrap();
        std::fs::create_dir(staging.path().join("nar")).unwrap();
        let (input, mut nar) = source(b"some source text", staging.path());
        let mut staged = Staged::start(input, staging.path()).unwrap();
        let last = nar.len() - 20;
        nar[last] ^= 1;
        let err = staged.write(0, &nar).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
}
