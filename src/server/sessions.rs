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

use super::{
    declared_input::DeclaredInput,
    error::{Budget, ServerError},
    status::ClientLabel,
};
use crate::{
    config::Limits,
    nix::{
        narinfo::NarInfo,
        store_path::{StorePath, StorePathHash},
    },
    proto,
    units::plural,
};

/// Inputs one session may announce; a derivation closure is far smaller.
/// Staging makes two files per missing input, so this also bounds those.
pub const MAX_INPUTS: usize = 50_000;

/// Bytes of text-hashed inputs (`.drv` files, `builtins.toFile` texts) one
/// session may announce. The builder's Nix reads the derivations of the
/// closure into memory to build it; a large system's come to tens of MiB.
pub const MAX_TEXT_INPUT_BYTES: u64 = 256 << 20;

/// Import groups one session's inputs may form. Each is its own `nix copy`
/// (see [`crate::nix::import_order`]): what evaluation produces forms two,
/// and only text files naming derivations add more, two at a time.
pub const MAX_IMPORT_GROUPS: usize = 16;

/// How many sessions the builder holds open at once (`max_sessions_per_client`,
/// `max_sessions_per_ticket` and `max_sessions` in the server config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCaps {
    /// Sessions one client (endpoint id) may hold, open or being admitted,
    /// so an unlimited ticket cannot pile up work.
    pub per_client: usize,
    /// Sessions one ticket may have open: client keys are free to make, so
    /// a per-client cap alone does not bound an unlimited ticket.
    pub per_ticket: usize,
    /// Sessions the builder holds, all clients together.
    pub total: usize,
}

impl Default for SessionCaps {
    /// 8 per client, 8 per ticket, 64 in all, as documented.
    fn default() -> Self {
        Self {
            per_client: 8,
            per_ticket: 8,
            total: 64,
        }
    }
}

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
    /// When the client last made progress with the session.
    last_active: std::time::Instant,
}

/// The connection a session belongs to: a client's endpoint id and which of
/// its connections (as the transport numbers them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// The client's endpoint id.
    pub endpoint_id: EndpointId,
    /// The connection's number, unique among the live ones.
    pub connection: usize,
}

/// One admitted session.
#[derive(Debug)]
pub struct Session {
    /// Its id.
    pub id: String,
    /// The connection that opened it; no other may use it.
    pub owner: Owner,
    /// Who it belongs to, for status and logs.
    pub label: ClientLabel,
    /// Its limits.
    pub limits: Limits,
    /// The derivation to build.
    pub drv: StorePath,
    /// The announced inputs.
    pub inputs: BTreeMap<StorePath, DeclaredInput>,
    /// Cancelled when the owner's connection closes, or by
    /// [`Session::cancel_because`].
    pub cancelled: CancellationToken,
    /// Why the session was cancelled, when it was not its client leaving.
    cancelled_because: std::sync::OnceLock<&'static str>,
    uploaded: AtomicU64,
    /// Work of the builder's own for the session under way.
    working: AtomicU64,
    /// `UploadInputs` calls under way.
    upload_calls: AtomicU64,
    state: Mutex<SessionState>,
}

impl Session {
    /// A new session that still lacks `missing`.
    pub fn new(
        id: String,
        owner: Owner,
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
            cancelled_because: std::sync::OnceLock::new(),
            uploaded: AtomicU64::new(0),
            working: AtomicU64::new(0),
            upload_calls: AtomicU64::new(0),
            state: Mutex::new(SessionState {
                missing,
                build: BuildState::NotStarted,
                readable: HashMap::new(),
                served_nars: HashMap::new(),
                outcome: None,
                last_active: std::time::Instant::now(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, SessionState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Cancels the session for a reason other than its client leaving: its
    /// build stops, and its outcome says `why`.
    pub fn cancel_because(&self, why: &'static str) {
        let _ = self.cancelled_because.set(why);
        self.cancelled.cancel();
    }

    /// Why the session was cancelled, if not because its client left.
    pub fn cancelled_because(&self) -> Option<&'static str> {
        self.cancelled_because.get().copied()
    }

    /// Records that the client just used the session.
    pub fn touch(&self) {
        self.state().last_active = std::time::Instant::now();
    }

    /// Marks the builder working for the session (importing its inputs)
    /// until the guard is dropped; it is not idle meanwhile.
    pub fn working(&self) -> Working<'_> {
        self.working.fetch_add(1, Ordering::SeqCst);
        Working(self)
    }

    /// Counts an `UploadInputs` call under way until [`UploadCall::end`] or
    /// the guard's drop.
    pub fn upload_call(&self) -> UploadCall<'_> {
        self.upload_calls.fetch_add(1, Ordering::SeqCst);
        UploadCall(Some(self))
    }

    /// How long the session has sat idle since admission or its last
    /// upload progress, short of its build. Once built or building it never
    /// is: its time limit bounds the build, and the connection what follows.
    pub fn idle_for(&self) -> std::time::Duration {
        let state = self.state();
        if state.build != BuildState::NotStarted || self.working.load(Ordering::SeqCst) > 0 {
            return std::time::Duration::ZERO;
        }
        state.last_active.elapsed()
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
        self.touch();
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
        ServerError::OverBudget(
            Budget::UploadBytes,
            format!(
                "upload exceeds this session's max_upload_bytes of {} ({} bytes); \
                 ask the builder's admin for a larger limit",
                self.limits.max_upload_bytes,
                self.limits.max_upload_bytes.get()
            ),
        )
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
            let missing = plural(state.missing.len() as u64, "input is", "inputs are");
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

/// The builder working for a session; see [`Session::working`].
#[derive(Debug)]
pub struct Working<'a>(&'a Session);

impl Drop for Working<'_> {
    fn drop(&mut self) {
        self.0.working.fetch_sub(1, Ordering::SeqCst);
        self.0.touch();
    }
}

/// An `UploadInputs` call of a session under way; see
/// [`Session::upload_call`].
#[derive(Debug)]
pub struct UploadCall<'a>(Option<&'a Session>);

impl UploadCall<'_> {
    /// Ends the call; whether no other call of the session is under way.
    pub fn end(mut self) -> bool {
        self.0
            .take()
            .is_some_and(|session| session.upload_calls.fetch_sub(1, Ordering::SeqCst) == 1)
    }
}

impl Drop for UploadCall<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.0.take() {
            session.upload_calls.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Who holds a session slot, admitted or still being admitted.
#[derive(Debug, Clone)]
struct Holder {
    owner: EndpointId,
    ticket: Option<String>,
    admitted: bool,
}

#[derive(Debug, Default)]
struct Table {
    sessions: HashMap<String, Arc<Session>>,
    /// Every slot by session id, the sessions' and those being admitted.
    holders: HashMap<String, Holder>,
}

/// All live sessions, and the slots of those being admitted.
#[derive(Debug, Default)]
pub struct Sessions {
    caps: SessionCaps,
    table: Mutex<Table>,
}

impl Sessions {
    /// No sessions yet, admitting at most `caps`.
    pub fn new(caps: SessionCaps) -> Self {
        Self {
            caps,
            table: Mutex::default(),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserves the slot of session `id` for `owner`, admitted with `ticket`
    /// if any, against the per-client and overall caps at once. Admission
    /// takes this before its first await, so racing calls cannot all pass
    /// a check made before any of them is counted. The slot is given back
    /// when the reservation is dropped unfulfilled.
    pub fn reserve(
        self: &Arc<Self>,
        id: String,
        owner: EndpointId,
        ticket: Option<String>,
    ) -> Result<Reservation, ServerError> {
        let mut table = self.table();
        let total = self.caps.total;
        if table.holders.len() >= total {
            return Err(ServerError::OverBudget(
                Budget::Sessions,
                format!(
                    "the builder already holds {total} sessions, the most it takes at once; \
                     try again later"
                ),
            ));
        }
        let open = table.holders.values().filter(|h| h.owner == owner).count();
        if open >= self.caps.per_client {
            return Err(ServerError::OverBudget(
                Budget::SessionsPerClient,
                format!(
                    "this client already has {open} open sessions, the most one client may hold; \
                     finish one first"
                ),
            ));
        }
        let holder = Holder {
            owner,
            ticket,
            admitted: false,
        };
        table.holders.insert(id.clone(), holder);
        Ok(Reservation {
            sessions: self.clone(),
            id: Some(id),
        })
    }

    /// Admits the session `make` returns into `reservation`'s slot, unless
    /// its ticket already has its cap of sessions. `make`
    /// runs under the table's lock, so the check and what it does (take a
    /// ticket use) are one step.
    pub fn admit(
        &self,
        mut reservation: Reservation,
        make: impl FnOnce() -> Result<Arc<Session>, ServerError>,
    ) -> Result<Arc<Session>, ServerError> {
        let id = reservation
            .id
            .take()
            .expect("a reservation is admitted once");
        let mut table = self.table();
        let Some(holder) = table.holders.get(&id).cloned() else {
            return Err(ServerError::Internal(format!("session slot {id} was lost")));
        };
        let per_ticket = self.caps.per_ticket;
        let made = match &holder.ticket {
            Some(ticket)
                if table
                    .holders
                    .values()
                    .filter(|h| h.admitted && h.ticket.as_ref() == Some(ticket))
                    .count()
                    >= per_ticket =>
            {
                Err(ServerError::OverBudget(
                    Budget::SessionsPerTicket,
                    format!(
                        "ticket {ticket} already has {per_ticket} open sessions, the most one \
                         ticket may have; finish one first"
                    ),
                ))
            }
            _ => make(),
        };
        match made {
            Ok(session) => {
                table.sessions.insert(id.clone(), session.clone());
                if let Some(holder) = table.holders.get_mut(&id) {
                    holder.admitted = true;
                }
                Ok(session)
            }
            Err(err) => {
                table.holders.remove(&id);
                Err(err)
            }
        }
    }

    /// The session `id` if `caller` (a connection) owns it. Another
    /// connection's session, even the same client's, looks exactly like a
    /// missing one, so ids reveal nothing.
    pub fn get(&self, id: &str, caller: Owner) -> Result<Arc<Session>, ServerError> {
        self.table()
            .sessions
            .get(id)
            .filter(|session| session.owner == caller)
            .cloned()
            .ok_or_else(|| {
                ServerError::NotFound(format!(
                    "no session {id:?} on this connection; open a new session"
                ))
            })
    }

    /// Cancels every session (at shutdown): their builds stop.
    pub fn cancel_all(&self) {
        for session in self.table().sessions.values() {
            session.cancelled.cancel();
        }
    }

    /// Cancels every session admitted with ticket `id`, saying `why`;
    /// returns how many there were.
    pub fn cancel_ticket(&self, id: &str, why: &'static str) -> usize {
        let table = self.table();
        let admitted = table
            .sessions
            .values()
            .filter(|session| session.label.ticket_id.as_deref() == Some(id));
        let mut count = 0;
        for session in admitted {
            session.cancel_because(why);
            count += 1;
        }
        count
    }

    /// Forgets session `id` and frees its slot.
    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let mut table = self.table();
        table.holders.remove(id);
        table.sessions.remove(id)
    }
}

/// A session slot being admitted; given back when dropped unless
/// [`Sessions::admit`] took it.
#[derive(Debug)]
pub struct Reservation {
    sessions: Arc<Sessions>,
    id: Option<String>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.sessions.table().holders.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_upload_call_under_way_ends_the_uploading() {
        let session = session("s", client(1));
        let (first, second) = (session.upload_call(), session.upload_call());
        drop(session.upload_call());
        assert!(!first.end(), "the second call is still under way");
        assert!(second.end());
        assert!(session.upload_call().end());
    }

    #[test]
    fn upload_limit_is_exact_and_refusal_counts_nothing() {
        let session = Session::new(
            "s".into(),
            on(client(1)),
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
        assert!(matches!(
            early,
            ServerError::OverBudget(Budget::UploadBytes, _)
        ));
        let refused = tonic::Status::from(session.count_upload(5).unwrap_err());
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("max_upload_bytes of 10"),
            "{}",
            refused.message()
        );
        assert_eq!(session.count_upload(4).unwrap(), 10);
    }

    fn session(id: &str, owner: EndpointId) -> Arc<Session> {
        session_with(id, owner, None)
    }

    fn session_with(id: &str, owner: EndpointId, ticket: Option<&str>) -> Arc<Session> {
        Arc::new(Session::new(
            id.into(),
            on(owner),
            ClientLabel {
                endpoint_id: String::new(),
                label: String::new(),
                ticket_id: ticket.map(str::to_owned),
            },
            Limits::default(),
            "/nix/store/00000000000000000000000000000000-x.drv"
                .parse()
                .unwrap(),
            BTreeMap::new(),
            BTreeSet::new(),
        ))
    }

    fn client(n: u8) -> EndpointId {
        iroh::SecretKey::from_bytes(&[n; 32]).public()
    }

    /// `client`'s first connection.
    fn on(client: EndpointId) -> Owner {
        Owner {
            endpoint_id: client,
            connection: 1,
        }
    }

    fn reason(err: ServerError) -> &'static str {
        match err {
            ServerError::OverBudget(budget, _) => budget.reason(),
            other => panic!("not a budget refusal: {other:?}"),
        }
    }

    #[test]
    fn a_client_reserves_its_cap_and_no_more_before_any_is_admitted() {
        let sessions = Arc::new(Sessions::default());
        let held: Vec<_> = (0..SessionCaps::default().per_client)
            .map(|n| sessions.reserve(format!("s{n}"), client(1), None).unwrap())
            .collect();
        let refused = sessions
            .reserve("more".into(), client(1), None)
            .unwrap_err();
        assert_eq!(reason(refused), "too-many-sessions-for-client");
        sessions.reserve("other".into(), client(2), None).unwrap();
        drop(held);
        sessions.reserve("again".into(), client(1), None).unwrap();
    }

    #[test]
    fn the_builder_holds_at_most_its_cap_of_sessions() {
        let sessions = Arc::new(Sessions::default());
        let caps = SessionCaps::default();
        let held: Vec<_> = (0..caps.total)
            .map(|n| {
                let owner = client(u8::try_from(n / caps.per_client).unwrap());
                sessions.reserve(format!("s{n}"), owner, None).unwrap()
            })
            .collect();
        let refused = sessions
            .reserve("more".into(), client(200), None)
            .unwrap_err();
        assert_eq!(reason(refused), "too-many-sessions");
        drop(held);
    }

    #[test]
    fn a_ticket_admits_its_cap_and_a_refused_admission_frees_its_slot() {
        let sessions = Arc::new(Sessions::default());
        let caps = SessionCaps::default();
        for n in 0..caps.per_ticket {
            let owner = client(u8::try_from(n).unwrap());
            let id = format!("s{n}");
            let slot = sessions
                .reserve(id.clone(), owner, Some("t".into()))
                .unwrap();
            sessions.admit(slot, || Ok(session(&id, owner))).unwrap();
        }
        let late = client(100);
        let slot = sessions
            .reserve("late".into(), late, Some("t".into()))
            .unwrap();
        let mut made = false;
        let refused = sessions
            .admit(slot, || {
                made = true;
                Ok(session("late", late))
            })
            .unwrap_err();
        assert_eq!(reason(refused), "too-many-sessions-for-ticket");
        assert!(!made, "a refused admission must not take a ticket use");
        // The slot is free again: the late client can hold its full share.
        let _share: Vec<_> = (0..caps.per_client)
            .map(|n| sessions.reserve(format!("l{n}"), late, None).unwrap())
            .collect();
        assert!(sessions.get("s0", on(client(0))).is_ok());
        let other_connection = Owner {
            connection: 2,
            ..on(client(0))
        };
        assert!(sessions.get("s0", other_connection).is_err());
        sessions.remove("s0");
        assert!(sessions.get("s0", on(client(0))).is_err());
    }

    #[test]
    fn lowered_caps_are_applied() {
        let sessions = Arc::new(Sessions::new(SessionCaps {
            per_client: 2,
            per_ticket: 1,
            total: 3,
        }));
        let admit = |id: &str, owner: u8, ticket: &str| {
            let slot = sessions.reserve(id.into(), client(owner), Some(ticket.into()))?;
            sessions.admit(slot, || Ok(session(id, client(owner))))
        };
        admit("a", 1, "t").unwrap();
        assert_eq!(
            reason(admit("b", 2, "t").unwrap_err()),
            "too-many-sessions-for-ticket"
        );
        admit("c", 1, "u").unwrap();
        assert_eq!(
            reason(admit("d", 1, "v").unwrap_err()),
            "too-many-sessions-for-client"
        );
        admit("e", 2, "v").unwrap();
        assert_eq!(reason(admit("f", 3, "w").unwrap_err()), "too-many-sessions");
    }

    #[test]
    fn revoking_a_ticket_cancels_its_sessions_and_says_why() {
        let sessions = Arc::new(Sessions::default());
        for (id, owner, ticket) in [("a", 1, "t"), ("b", 2, "t"), ("c", 3, "u")] {
            let slot = sessions
                .reserve(id.into(), client(owner), Some(ticket.into()))
                .unwrap();
            sessions
                .admit(slot, || Ok(session_with(id, client(owner), Some(ticket))))
                .unwrap();
        }
        assert_eq!(sessions.cancel_ticket("t", "its ticket was revoked"), 2);
        let a = sessions.get("a", on(client(1))).unwrap();
        assert!(a.cancelled.is_cancelled());
        assert_eq!(a.cancelled_because(), Some("its ticket was revoked"));
        assert!(
            !sessions
                .get("c", on(client(3)))
                .unwrap()
                .cancelled
                .is_cancelled()
        );
    }

    #[test]
    fn a_session_is_idle_until_it_progresses_or_builds() {
        let session = session("s", client(1));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(session.idle_for() >= std::time::Duration::from_millis(20));
        session.touch();
        assert!(session.idle_for() < std::time::Duration::from_millis(20));
        let working = session.working();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(session.idle_for(), std::time::Duration::ZERO);
        drop(working);
        session.start_build().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(session.idle_for(), std::time::Duration::ZERO);
    }
}
