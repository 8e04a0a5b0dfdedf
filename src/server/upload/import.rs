//! Importing an upload: the staging directory with a file per input, and
//! the builder's Nix reading the inputs from it while the parts arrive.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex, Weak},
};

use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::AbortOnDropHandle;

use super::{
    StagedPaths, Upload, internal,
    staged::{PartsAhead, Staged},
};
use crate::{
    nix::{narinfo::NarInfo, store_path::StorePath},
    nixcmd::{Nix, NixCmdError},
    server::{declared_input::DeclaredInput, error::ServerError, nar_file::NarFile},
};

/// The builder's Nix importing an upload, which it began as soon as the
/// upload did: each input goes in once the inputs it refers to are in and
/// its bytes are checked. Dropping this stops it.
#[derive(Debug)]
pub(super) struct ImportTask(AbortOnDropHandle<Result<(), NixCmdError>>);

/// A staging directory, removed on the blocking pool when dropped: it may
/// hold thousands of files or gigabytes.
#[derive(Debug)]
pub(super) struct StagingDir(pub(super) Option<tempfile::TempDir>);

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn_blocking(move || drop(dir));
        }
    }
}

/// Starts Nix importing `inputs`, reading each from its staging file as
/// far as it is checked. If Nix gives up before the upload is complete,
/// the upload fails at once, so its calls stop sending.
pub(super) fn import_while_arriving(
    nix: &Nix,
    inputs: Vec<NarInfo>,
    nars: HashMap<StorePath, NarFile>,
    upload: &Weak<Upload>,
) -> ImportTask {
    let (nix, upload) = (nix.clone(), upload.clone());
    ImportTask(AbortOnDropHandle::new(tokio::spawn(async move {
        let open = |path: &StorePath| {
            let nar = nars
                .get(path)
                .ok_or_else(|| ServerError::Internal(format!("{path} was not staged")))?;
            nar.read_range(0, 0).map(ReceiverStream::new)
        };
        let imported = nix.add_verifiable(inputs, open).await;
        if let (Err(err), Some(upload)) = (&imported, upload.upgrade()) {
            upload.import_gave_up(import_failed(err));
        }
        imported
    })))
}

/// The error for an import that failed: the client's inputs, unless the
/// builder could not run Nix at all.
fn import_failed(err: &NixCmdError) -> ServerError {
    match err {
        NixCmdError::Refused(_) | NixCmdError::NotContentAddressed { .. } => {
            ServerError::InvalidArgument(format!(
                "the builder's Nix refused the uploaded inputs: {err}"
            ))
        }
        // The upload was abandoned, and says why.
        NixCmdError::NarSource { .. } => ServerError::Aborted(err.to_string()),
        _ => {
            tracing::error!("importing inputs: {err}");
            ServerError::Internal(
                "the builder could not run its Nix to import the inputs; see its log".to_owned(),
            )
        }
    }
}

impl ImportTask {
    /// Sees the import through.
    pub(super) async fn complete(self) -> Result<(), ServerError> {
        let imported = self.0.await.map_err(|err| {
            tracing::error!("the import task failed: {err}");
            ServerError::Internal(
                "the builder's import of the inputs failed; see its log".to_owned(),
            )
        })?;
        imported.map_err(|err| import_failed(&err))
    }
}

/// A staging directory for `inputs`, with one file where each NAR has its
/// place; the narinfos to import them with, and the NARs as Nix reads them.
pub(super) fn stage(
    uploads_dir: &Path,
    session_id: &str,
    inputs: Vec<DeclaredInput>,
) -> Result<Staging, ServerError> {
    let dir = staging_dir(uploads_dir, session_id)?;
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.path().join("nars"))
        .map_err(internal("creating the upload file"))?;
    let file = Arc::new(file);
    let mut staging = Staging {
        paths: HashMap::new(),
        narinfos: Vec::with_capacity(inputs.len()),
        nars: HashMap::new(),
        dir,
    };
    let parts_ahead = PartsAhead::default();
    // The sizes were checked against the upload budget, whose sum fits.
    let mut base = 0u64;
    for input in inputs {
        let (path, size) = (input.path.clone(), input.nar_size);
        staging.narinfos.push(input.narinfo());
        let (staged, nar) = Staged::start(input, &file, base, parts_ahead.clone());
        base = base.saturating_add(size);
        staging.nars.insert(path.clone(), nar);
        staging.paths.insert(path, Arc::new(Mutex::new(staged)));
    }
    Ok(staging)
}

/// An upload's staging directory and what it holds.
#[derive(Debug)]
pub(super) struct Staging {
    pub(super) dir: tempfile::TempDir,
    pub(super) paths: StagedPaths,
    pub(super) narinfos: Vec<NarInfo>,
    pub(super) nars: HashMap<StorePath, NarFile>,
}

fn staging_dir(uploads_dir: &Path, session_id: &str) -> Result<tempfile::TempDir, ServerError> {
    std::fs::create_dir_all(uploads_dir).map_err(internal("creating the uploads directory"))?;
    tempfile::Builder::new()
        .prefix(&format!("{session_id}-"))
        .tempdir_in(uploads_dir)
        .map_err(internal("creating an upload directory"))
}
