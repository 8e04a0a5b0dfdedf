//! Admitted build sessions: who owns each one, what it may upload, and which
//! cache entries it may read.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use iroh::EndpointId;
use tokio_util::sync::CancellationToken;

use super::{declared_input::DeclaredInput, error::ServerError, status::ClientLabel};
use crate::{
    config::Limits,
    nix::{
        narinfo::NarInfo,
        store_path::{StorePath, StorePathHash},
    },
    proto,
};

/// Inputs one session may announce; a derivation closure is far smaller.
pub const MAX_INPUTS: usize = 50_000;

/// Sessions one client may hold open at once, so an unlimited ticket cannot
/// pile up work.
pub const MAX_SESSIONS_PER_CLIENT: usize = 8;

/// Where a session's build is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildState {
    /// Inputs may still be uploaded.
    NotStarted,
    /// Queued or building.
    Running,
    /// Finished (in any way); outputs may be fetched if it succeeded.
    Done,
}

#[derive(Debug)]
struct SessionState {
    missing: BTreeSet<StorePath>,
    build: BuildState,
    /// The outputs' closure by hash part, once built: what the session may
    /// read from the cache.
    readable: HashMap<StorePathHash, StorePath>,
    /// Narinfos served to this session, by NAR URL: what it may fetch, and
    /// what to serve it from once the cache's file is gone.
    served_nars: HashMap<String, NarInfo>,
    /// How the build ended, once it has.
    outcome: Option<(proto::BuildResult, String)>,
}

/// One admitted session.
#[derive(Debug)]
pub struct Session {
    /// Its id.
    pub id: String,
    /// The endpoint that opened it; no one else may use it.
    pub owner: EndpointId,
    /// Who it belongs to, for status and logs.
    pub label: ClientLabel,
    /// Its limits.
    pub limits: Limits,
    /// The derivation to build.
    pub drv: StorePath,
    /// The announced inputs.
    pub inputs: BTreeMap<StorePath, DeclaredInput>,
    /// Cancelled when the owner's connection closes.
    pub cancelled: CancellationToken,
    uploaded: AtomicU64,
    state: Mutex<SessionState>,
}

impl Session {
    /// A new session that still lacks `missing`.
    pub fn new(
        id: String,
        owner: EndpointId,
        label: ClientLabel,
        limits: Limits,
        drv: StorePath,
        inputs: BTreeMap<StorePath, DeclaredInput>,
        missing: BTreeSet<StorePath>,
    ) -> Self {
        Self {
            id,
            owner,
            label,
            limits,
            drv,
            inputs,
            cancelled: CancellationToken::new(),
            uploaded: AtomicU64::new(0),
            state: Mutex::new(SessionState {
                missing,
                build: BuildState::NotStarted,
                readable: HashMap::new(),
                served_nars: HashMap::new(),
                outcome: None,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, SessionState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The inputs still missing on the builder.
    pub fn missing(&self) -> BTreeSet<StorePath> {
        self.state().missing.clone()
    }

    /// Records that `paths` are now valid on the builder.
    pub fn mark_present(&self, paths: &[StorePath]) {
        let mut state = self.state();
        for path in paths {
            state.missing.remove(path);
        }
    }

    /// Counts `bytes` more of upload against the limit; refuses (without
    /// counting) once the limit would be exceeded.
    pub fn count_upload(&self, bytes: u64) -> Result<u64, ServerError> {
        let limit = self.limits.max_upload_bytes.get();
        let before = self
            .uploaded
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |so_far| {
                so_far.checked_add(bytes).filter(|total| *total <= limit)
            })
            .map_err(|_| self.upload_too_large())?;
        Ok(before + bytes)
    }

    /// Refuses, without counting anything, if `bytes` more would exceed
    /// the upload limit.
    pub fn check_upload_room(&self, bytes: u64) -> Result<(), ServerError> {
        let so_far = self.uploaded.load(Ordering::SeqCst);
        match so_far.checked_add(bytes) {
            Some(total) if total <= self.limits.max_upload_bytes.get() => Ok(()),
            _ => Err(self.upload_too_large()),
        }
    }

    fn upload_too_large(&self) -> ServerError {
        ServerError::ResourceExhausted(format!(
            "upload exceeds this session's max_upload_bytes of {} ({} bytes); \
             ask the builder's admin for a larger limit",
            self.limits.max_upload_bytes,
            self.limits.max_upload_bytes.get()
        ))
    }

    /// Moves the session from not started to running; a session builds once.
    pub fn start_build(&self) -> Result<(), ServerError> {
        let mut state = self.state();
        if state.build != BuildState::NotStarted {
            return Err(ServerError::FailedPrecondition(
                "this session has already built; open a new session".to_owned(),
            ));
        }
        if let Some(first) = state.missing.iter().next() {
            let missing = match state.missing.len() {
                1 => "1 input is".to_owned(),
                n => format!("{n} inputs are"),
            };
            return Err(ServerError::FailedPrecondition(format!(
                "{missing} still missing on the builder (e.g. {first}); upload them first"
            )));
        }
        state.build = BuildState::Running;
        Ok(())
    }

    /// Ends the build; `readable` is the outputs' closure if it succeeded.
    pub fn finish_build(&self, readable: impl IntoIterator<Item = StorePath>) {
        let mut state = self.state();
        state.build = BuildState::Done;
        state.readable = readable
            .into_iter()
            .map(|path| (*path.hash_part(), path))
            .collect();
    }

    /// Records how the build ended.
    pub fn record_outcome(&self, result: proto::BuildResult, message: &str) {
        self.state().outcome = Some((result, message.to_owned()));
    }

    /// How the build ended, if it has.
    pub fn outcome(&self) -> Option<(proto::BuildResult, String)> {
        self.state().outcome.clone()
    }

    /// Whether the build is queued or running.
    pub fn build_state(&self) -> BuildState {
        self.state().build
    }

    /// The store path of `hash` if this session may read its cache entry.
    pub fn readable(&self, hash: &StorePathHash) -> Option<StorePath> {
        self.state().readable.get(hash).cloned()
    }

    /// Every store path this session may read (its outputs' closure).
    pub fn readable_paths(&self) -> Vec<StorePath> {
        self.state().readable.values().cloned().collect()
    }

    /// Remembers that `narinfo` was served to this session.
    pub fn allow_nar(&self, narinfo: &NarInfo) {
        self.state()
            .served_nars
            .insert(narinfo.url.clone(), narinfo.clone());
    }

    /// The narinfo served to this session that names `url`, if any.
    pub fn served_nar(&self, url: &str) -> Option<NarInfo> {
        self.state().served_nars.get(url).cloned()
    }
}

/// All live sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
}

impl Sessions {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Refuses a new session for `peer` when it already holds the maximum.
    pub fn ensure_capacity(&self, peer: EndpointId) -> Result<(), ServerError> {
        let open = self
            .map()
            .values()
            .filter(|session| session.owner == peer)
            .count();
        if open >= MAX_SESSIONS_PER_CLIENT {
            return Err(ServerError::ResourceExhausted(format!(
                "this client already has {open} open sessions, the most one client may hold; finish one first"
            )));
        }
        Ok(())
    }

    /// Registers a session.
    pub fn insert(&self, session: Arc<Session>) {
        self.map().insert(session.id.clone(), session);
    }

    /// The session `id` if `peer` owns it. Another peer's session looks
    /// exactly like a missing one, so ids reveal nothing.
    pub fn get(&self, id: &str, peer: EndpointId) -> Result<Arc<Session>, ServerError> {
        self.map()
            .get(id)
            .filter(|session| session.owner == peer)
            .cloned()
            .ok_or_else(|| {
                ServerError::NotFound(format!(
                    "no session {id:?} on this connection; open a new session"
                ))
            })
    }

    /// Cancels every session (at shutdown): their builds stop.
    pub fn cancel_all(&self) {
        for session in self.map().values() {
            session.cancelled.cancel();
        }
    }

    /// Forgets session `id`.
    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        self.map().remove(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_limit_is_exact_and_refusal_counts_nothing() {
        let session = Session::new(
            "s".into(),
            iroh::SecretKey::from_bytes(&[1; 32]).public(),
            ClientLabel {
                endpoint_id: String::new(),
                label: String::new(),
                ticket_id: None,
            },
            Limits {
                max_upload_bytes: crate::units::ByteSize::new(10),
                ..Limits::default()
            },
            "/nix/store/00000000000000000000000000000000-x.drv"
                .parse()
                .unwrap(),
            BTreeMap::new(),
            BTreeSet::new(),
        );
        session.check_upload_room(10).unwrap();
        assert_eq!(session.count_upload(6).unwrap(), 6);
        session.check_upload_room(4).unwrap();
        let early = session.check_upload_room(5).unwrap_err();
        assert!(matches!(early, ServerError::ResourceExhausted(_)));
        let refused = tonic::Status::from(session.count_upload(5).unwrap_err());
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("max_upload_bytes of 10"),
            "{}",
            refused.message()
        );
        assert_eq!(session.count_upload(4).unwrap(), 10);
    }
}
