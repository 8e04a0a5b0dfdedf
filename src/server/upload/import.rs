//! Importing an upload: the staging directory with a narinfo per input,
//! the loopback cache that serves it to the builder's Nix, and Nix reading
//! it either while the parts arrive or once they are all in.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::{Arc, Mutex, Weak},
};

use http_body_util::{BodyExt as _, StreamBody};
use hyper::{StatusCode, header};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tokio_util::task::AbortOnDropHandle;

use super::{
    StagedPaths, Upload, internal,
    staged::{PartsAhead, Staged, nar_url},
};
use crate::{
    loopback_cache::{Body, CacheFiles, LoopbackCache, respond},
    nix::store_path::{StorePath, StorePathHash},
    nixcmd::{Nix, NixCmdError, ServedCache},
    server::{declared_input::DeclaredInput, error::ServerError, nar_file::NarFile},
};

/// How the builder's Nix imports an upload.
#[derive(Debug)]
pub(super) enum ImportTask {
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

/// Starts Nix importing `missing` through `cache` in front of `staging`. If
/// Nix gives up before the upload is complete, the upload fails at once,
/// so its calls stop sending.
pub(super) fn import_while_arriving(
    nix: &Nix,
    staging: &Path,
    cache: &LoopbackCache,
    missing: &BTreeSet<StorePath>,
    upload: &Weak<Upload>,
) -> AbortOnDropHandle<Result<(), NixCmdError>> {
    let (nix, staging, url) = (nix.clone(), staging.to_owned(), cache.url());
    let netrc_file = cache.netrc_file().map(Path::to_owned);
    let (paths, upload) = (missing.iter().cloned().collect::<Vec<_>>(), upload.clone());
    AbortOnDropHandle::new(tokio::spawn(async move {
        let served = ServedCache {
            url: &url,
            netrc_file: netrc_file.as_deref(),
        };
        let imported = nix
            .add_verifiable_from_cache(&staging, Some(served), &paths)
            .await;
        if let (Err(err), Some(upload)) = (&imported, upload.upgrade()) {
            upload.import_gave_up(import_failed(err));
        }
        imported
    }))
}

/// The error for an import that failed: the client's inputs, unless the
/// builder could not run Nix at all.
fn import_failed(err: &NixCmdError) -> ServerError {
    match err {
        NixCmdError::Spawn { .. } | NixCmdError::Io { .. } => {
            tracing::error!("importing inputs: {err}");
            ServerError::Internal(
                "the builder could not run its Nix to import the inputs; see its log".to_owned(),
            )
        }
        refused => ServerError::InvalidArgument(format!(
            "the builder's Nix refused the uploaded inputs: {refused}"
        )),
    }
}

impl ImportTask {
    /// Sees the import of `paths` from `staging` through.
    pub(super) async fn complete(
        self,
        nix: &Nix,
        staging: &Path,
        paths: &[StorePath],
    ) -> Result<(), ServerError> {
        let imported = match self {
            Self::Running { _cache, task } => task.await.map_err(|err| {
                tracing::error!("the import task failed: {err}");
                ServerError::Internal(
                    "the builder's import of the inputs failed; see its log".to_owned(),
                )
            })?,
            Self::AfterTransfer => nix.add_verifiable_from_cache(staging, None, paths).await,
        };
        imported.map_err(|err| import_failed(&err))
    }
}

/// A staging directory for `inputs`: the narinfo of each, an empty file for
/// each NAR, and what a loopback cache of it serves.
pub(super) fn stage(
    uploads_dir: &Path,
    session_id: &str,
    inputs: Vec<DeclaredInput>,
) -> Result<(tempfile::TempDir, StagedPaths, LoopbackFiles), ServerError> {
    let dir = staging_dir(uploads_dir, session_id)?;
    let mut paths = HashMap::new();
    let mut files = LoopbackFiles::default();
    let parts_ahead = PartsAhead::default();
    for input in inputs {
        let narinfo = input.narinfo(nar_url(&input.path));
        let text = narinfo.to_string();
        let file = dir
            .path()
            .join(format!("{}.narinfo", input.path.hash_part()));
        std::fs::write(file, &text).map_err(internal("writing an upload narinfo"))?;
        let path = input.path.clone();
        let (staged, nar) = Staged::start(input, dir.path(), parts_ahead.clone())?;
        files.narinfos.insert(*path.hash_part(), text);
        files.nars.insert(narinfo.url, nar);
        paths.insert(path, Arc::new(Mutex::new(staged)));
    }
    Ok((dir, paths, files))
}

fn staging_dir(uploads_dir: &Path, session_id: &str) -> Result<tempfile::TempDir, ServerError> {
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

/// The staging directory as a loopback cache serves it: narinfos, and NARs
/// as far as they are checked.
#[derive(Debug, Default)]
pub(super) struct LoopbackFiles {
    narinfos: HashMap<StorePathHash, String>,
    nars: HashMap<String, NarFile>,
}

impl CacheFiles for Arc<LoopbackFiles> {
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
            Err(err) => {
                return respond(StatusCode::INTERNAL_SERVER_ERROR, err.to_string());
            }
        };
        // An abandoned upload cuts the body short, and Nix drops the NAR.
        let frames = ReceiverStream::new(chunks).map(|chunk| {
            chunk
                .map(hyper::body::Frame::data)
                .map_err(|err| std::io::Error::other(err.to_string()))
        });
        let mut response = hyper::Response::new(StreamBody::new(frames).boxed_unsync());
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, nar.size().into());
        response
    }
}
