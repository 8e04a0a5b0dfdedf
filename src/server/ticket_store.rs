//! The builder's persistent ticket records (`DATA_DIR/tickets.json`).
//!
//! Only the server process writes this file, and every change is on disk
//! (written to a temporary file, synced, renamed over the old one, directory
//! synced) before the change is acknowledged. So after a crash at any moment
//! the file holds either the state before or the state after an operation,
//! and a use that was granted to a client is never forgotten.
//!
//! Bearer secrets are not stored: each is derived from its ticket id with the
//! [`TicketKey`], so a leaked state file grants nothing.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use iroh::EndpointId;
use serde::{Deserialize, Serialize};

use crate::{
    config::Limits,
    keys::TicketKey,
    proto::{self, TicketState},
    ticket::{BearerSecret, TicketId},
};

/// Inactive tickets are kept this long (so a late client learns *why* its
/// ticket fails), then pruned.
const KEEP_INACTIVE_SECS: u64 = 30 * 24 * 3600;

/// The state file's format version.
const FORMAT_VERSION: u32 = 1;

/// One issued ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketRecord {
    /// Public id.
    pub id: TicketId,
    /// Admin-chosen label.
    pub name: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Issue order: larger than every other record's when it was issued, so
    /// tickets issued within one second still list newest first. 0 in state
    /// files written before serials were recorded.
    #[serde(default)]
    pub serial: u64,
    /// Unix seconds after which it admits nothing.
    pub expires_at: u64,
    /// Uses granted; `None` for unlimited.
    pub uses_granted: Option<u32>,
    /// Uses taken so far.
    pub uses_taken: u32,
    /// Per-session limits.
    pub limits: Limits,
    /// The only endpoint allowed to use it, if bound.
    pub bound_client: Option<EndpointId>,
    /// Unix seconds of revocation.
    pub revoked_at: Option<u64>,
}

impl TicketRecord {
    /// The ticket's state at `now`; revocation wins over expiry, expiry over
    /// exhaustion.
    pub fn state(&self, now: u64) -> TicketState {
        if self.revoked_at.is_some() {
            TicketState::Revoked
        } else if now >= self.expires_at {
            TicketState::Expired
        } else if self
            .uses_granted
            .is_some_and(|granted| self.uses_taken >= granted)
        {
            TicketState::UsedUp
        } else {
            TicketState::Active
        }
    }

    /// The protobuf form.
    pub fn to_proto(&self, now: u64) -> proto::TicketInfo {
        proto::TicketInfo {
            id: self.id.to_string(),
            name: self.name.clone(),
            created_at: Some(proto::timestamp(self.created_at)),
            expires_at: Some(proto::timestamp(self.expires_at)),
            uses_granted: self.uses_granted.unwrap_or(0),
            uses_taken: self.uses_taken,
            limits: Some(self.limits.into()),
            bound_client: self
                .bound_client
                .map(|id| id.to_string())
                .unwrap_or_default(),
            revoked_at: self.revoked_at.map(proto::timestamp),
            state: self.state(now).into(),
        }
    }

    fn inactive_since(&self, now: u64) -> Option<u64> {
        match self.state(now) {
            TicketState::Active | TicketState::Unspecified => None,
            TicketState::Revoked => self.revoked_at,
            TicketState::Expired => Some(self.expires_at),
            // The time of the last use is not recorded; expiry bounds it.
            TicketState::UsedUp => Some(self.expires_at.min(now)),
        }
    }
}

/// Why a presented ticket cannot be used. Each maps to its own gRPC status
/// and `drvthru-refusal` reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketRefusal {
    /// No such ticket here, or the secret does not match.
    #[error("this builder did not issue that ticket (or it was pruned long after expiring)")]
    Unknown,
    /// Revoked by an admin.
    #[error("ticket {0} was revoked by the builder's admin")]
    Revoked(TicketId),
    /// Past its expiry.
    #[error("ticket {id} expired {ago} ago; ask the builder's admin for a new one")]
    Expired {
        /// The ticket.
        id: TicketId,
        /// How long ago, for people.
        ago: String,
    },
    /// Every use taken.
    #[error(
        "ticket {id} has no uses left (all {granted} taken); ask the builder's admin for a new one"
    )]
    UsedUp {
        /// The ticket.
        id: TicketId,
        /// Uses it granted.
        granted: u32,
    },
    /// Bound to another endpoint.
    #[error(
        "ticket {id} is bound to client {bound}, but this client is {actual}; \
         build with the key it was bound to (`drv-thru key show` prints yours)"
    )]
    BoundElsewhere {
        /// The ticket.
        id: TicketId,
        /// The endpoint it is bound to.
        bound: EndpointId,
        /// The endpoint that presented it.
        actual: EndpointId,
    },
}

/// Errors of the store itself (not of a presented ticket).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the state file failed.
    #[error("ticket state file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The state file is not ours or is damaged.
    #[error(
        "ticket state file {path} is unreadable ({reason}); move it aside to start with no tickets"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What `take_use` can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TakeUseError {
    /// The ticket cannot be used.
    #[error(transparent)]
    Refused(#[from] TicketRefusal),
    /// The use could not be recorded, so it was not granted.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a new ticket should be.
#[derive(Debug, Clone)]
pub struct NewTicket {
    /// Label.
    pub name: String,
    /// Lifetime in seconds.
    pub lifetime_secs: u64,
    /// Uses; `None` for unlimited.
    pub uses: Option<u32>,
    /// Per-session limits.
    pub limits: Limits,
    /// Endpoint to bind to.
    pub bound_client: Option<EndpointId>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    tickets: Vec<TicketRecord>,
}

/// The ticket records, loaded once and kept in memory; every change is
/// written through to disk under the same lock that guards the records,
/// which is what makes `take_use` atomic across racing clients.
#[derive(Debug)]
pub struct TicketStore {
    path: PathBuf,
    key: TicketKey,
    records: Mutex<BTreeMap<TicketId, TicketRecord>>,
}

impl TicketStore {
    /// Opens the store in `data_dir`, creating an empty one if there is none.
    pub fn open(data_dir: &Path, key: TicketKey) -> Result<Self, StoreError> {
        let path = data_dir.join("tickets.json");
        let records = match fs::read_to_string(&path) {
            Ok(text) => {
                let file: StateFile =
                    serde_json::from_str(&text).map_err(|err| StoreError::Corrupt {
                        path: path.clone(),
                        reason: err.to_string(),
                    })?;
                if file.version != FORMAT_VERSION {
                    return Err(StoreError::Corrupt {
                        path,
                        reason: format!("format version {} is not supported", file.version),
                    });
                }
                file.tickets
                    .into_iter()
                    .map(|record| (record.id, record))
                    .collect()
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        Ok(Self {
            path,
            key,
            records: Mutex::new(records),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<TicketId, TicketRecord>> {
        // A panic while holding the lock cannot leave a half-applied change:
        // records are only replaced after the file write succeeded.
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The bearer secret of ticket `id`.
    pub fn secret(&self, id: TicketId) -> BearerSecret {
        BearerSecret::from_bytes(self.key.bearer_secret(&id.to_string()))
    }

    /// Issues a ticket and returns its record and secret.
    pub fn create(
        &self,
        new: NewTicket,
        now: u64,
    ) -> Result<(TicketRecord, BearerSecret), StoreError> {
        let mut records = self.lock();
        let mut id = TicketId::generate();
        while records.contains_key(&id) {
            id = TicketId::generate();
        }
        let serial = records.values().map(|r| r.serial).max().unwrap_or(0) + 1;
        let record = TicketRecord {
            id,
            name: new.name,
            created_at: now,
            serial,
            expires_at: now.saturating_add(new.lifetime_secs),
            uses_granted: new.uses,
            uses_taken: 0,
            limits: new.limits,
            bound_client: new.bound_client,
            revoked_at: None,
        };
        let mut next = records.clone();
        next.insert(id, record.clone());
        self.persist(&next, now)?;
        *records = next;
        Ok((record, self.secret(id)))
    }

    /// Checks that `secret` opens ticket `id` for `peer`, without taking a use.
    pub fn authenticate(
        &self,
        id: TicketId,
        secret: &BearerSecret,
        peer: EndpointId,
        now: u64,
    ) -> Result<TicketRecord, TicketRefusal> {
        let records = self.lock();
        self.check(&records, id, secret, peer, now).cloned()
    }

    /// Checks that `secret` opens ticket `id` for `peer`, whatever its state:
    /// a session admitted with a ticket runs to completion even after the
    /// ticket is used up or expires. (Revoking it cancels the session
    /// itself, in the Tickets service.)
    pub fn authenticate_session(
        &self,
        id: TicketId,
        secret: &BearerSecret,
        peer: EndpointId,
    ) -> Result<TicketRecord, TicketRefusal> {
        let records = self.lock();
        let record = records
            .get(&id)
            .filter(|_| self.secret(id).matches(secret))
            .ok_or(TicketRefusal::Unknown)?;
        if let Some(bound) = record.bound_client.filter(|bound| *bound != peer) {
            return Err(TicketRefusal::BoundElsewhere {
                id,
                bound,
                actual: peer,
            });
        }
        Ok(record.clone())
    }

    fn check<'a>(
        &self,
        records: &'a BTreeMap<TicketId, TicketRecord>,
        id: TicketId,
        secret: &BearerSecret,
        peer: EndpointId,
        now: u64,
    ) -> Result<&'a TicketRecord, TicketRefusal> {
        // Compare the secret before anything else, so a guessed id reveals
        // nothing about the ticket's state.
        let record = records
            .get(&id)
            .filter(|_| self.secret(id).matches(secret))
            .ok_or(TicketRefusal::Unknown)?;
        match record.state(now) {
            TicketState::Revoked => return Err(TicketRefusal::Revoked(id)),
            TicketState::Expired => {
                return Err(TicketRefusal::Expired {
                    id,
                    ago: humantime::format_duration(std::time::Duration::from_secs(
                        now.saturating_sub(record.expires_at),
                    ))
                    .to_string(),
                });
            }
            TicketState::UsedUp => {
                return Err(TicketRefusal::UsedUp {
                    id,
                    granted: record.uses_granted.unwrap_or(0),
                });
            }
            TicketState::Active | TicketState::Unspecified => {}
        }
        if let Some(bound) = record.bound_client.filter(|bound| *bound != peer) {
            return Err(TicketRefusal::BoundElsewhere {
                id,
                bound,
                actual: peer,
            });
        }
        Ok(record)
    }

    /// Takes one use of ticket `id` for `peer`: checks and records it under
    /// one lock, on disk before returning. An unbound ticket becomes bound
    /// to `peer`: whoever copies a ticket after its first use cannot use
    /// what is left of it.
    pub fn take_use(
        &self,
        id: TicketId,
        secret: &BearerSecret,
        peer: EndpointId,
        now: u64,
    ) -> Result<TicketRecord, TakeUseError> {
        let mut records = self.lock();
        let mut record = self.check(&records, id, secret, peer, now)?.clone();
        record.uses_taken += 1;
        record.bound_client.get_or_insert(peer);
        let mut next = records.clone();
        next.insert(id, record.clone());
        self.persist(&next, now)?;
        *records = next;
        Ok(record)
    }

    /// The record of ticket `id`.
    pub fn get(&self, id: TicketId) -> Option<TicketRecord> {
        self.lock().get(&id).cloned()
    }

    /// All records, newest first (by creation time, then issue order).
    pub fn list(&self) -> Vec<TicketRecord> {
        let mut all: Vec<TicketRecord> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| {
            (b.created_at, b.serial)
                .cmp(&(a.created_at, a.serial))
                .then(a.id.cmp(&b.id))
        });
        all
    }

    /// Revokes ticket `id`; revoking twice keeps the first time.
    pub fn revoke(&self, id: TicketId, now: u64) -> Result<Option<TicketRecord>, StoreError> {
        let mut records = self.lock();
        let Some(mut record) = records.get(&id).cloned() else {
            return Ok(None);
        };
        record.revoked_at.get_or_insert(now);
        let mut next = records.clone();
        next.insert(id, record.clone());
        self.persist(&next, now)?;
        *records = next;
        Ok(Some(record))
    }

    fn persist(
        &self,
        records: &BTreeMap<TicketId, TicketRecord>,
        now: u64,
    ) -> Result<(), StoreError> {
        let tickets = records
            .values()
            .filter(|record| {
                record
                    .inactive_since(now)
                    .is_none_or(|since| now.saturating_sub(since) < KEEP_INACTIVE_SECS)
            })
            .cloned()
            .collect();
        let file = StateFile {
            version: FORMAT_VERSION,
            tickets,
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("ticket records serialize");
        write_atomic(&self.path, &bytes).map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new
/// content, never a mix.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        // A change that failed leaves nothing behind.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn store(dir: &Path) -> TicketStore {
        TicketStore::open(dir, TicketKey::from_bytes([1; 32])).unwrap()
    }

    fn new_ticket(uses: Option<u32>) -> NewTicket {
        NewTicket {
            name: "friend".into(),
            lifetime_secs: 7200,
            uses,
            limits: Limits::default(),
            bound_client: None,
        }
    }

    fn peer(n: u8) -> EndpointId {
        iroh::SecretKey::from_bytes(&[n; 32]).public()
    }

    #[test]
    fn tickets_issued_within_one_second_list_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let issued: Vec<TicketId> = {
            let store = store(dir.path());
            (0..20)
                .map(|_| store.create(new_ticket(None), NOW).unwrap().0.id)
                .collect()
        };
        // The order survives a restart: it is in the state file.
        let listed: Vec<TicketId> = store(dir.path()).list().iter().map(|r| r.id).collect();
        assert_eq!(listed, issued.into_iter().rev().collect::<Vec<_>>());
    }

    #[test]
    fn one_use_ticket_admits_once_then_reports_used_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let (record, secret) = store.create(new_ticket(Some(1)), NOW).unwrap();
        store
            .authenticate(record.id, &secret, peer(1), NOW)
            .unwrap();
        store.take_use(record.id, &secret, peer(1), NOW).unwrap();
        let err = store
            .take_use(record.id, &secret, peer(2), NOW)
            .unwrap_err();
        assert!(
            matches!(
                err,
                TakeUseError::Refused(TicketRefusal::UsedUp { granted: 1, .. })
            ),
            "{err}"
        );
    }

    #[test]
    fn distinct_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let (record, secret) = store.create(new_ticket(Some(3)), NOW).unwrap();
        let wrong = BearerSecret::from_bytes([0; 32]);
        assert_eq!(
            store.authenticate(record.id, &wrong, peer(1), NOW),
            Err(TicketRefusal::Unknown)
        );
        assert_eq!(
            store.authenticate(TicketId::generate(), &secret, peer(1), NOW),
            Err(TicketRefusal::Unknown)
        );
        assert!(matches!(
            store.authenticate(record.id, &secret, peer(1), NOW + 7200),
            Err(TicketRefusal::Expired { .. })
        ));

        let bound = NewTicket {
            bound_client: Some(peer(5)),
            ..new_ticket(Some(1))
        };
        let (bound, bound_secret) = store.create(bound, NOW).unwrap();
        assert!(matches!(
            store.authenticate(bound.id, &bound_secret, peer(6), NOW),
            Err(TicketRefusal::BoundElsewhere { .. })
        ));
        store
            .authenticate(bound.id, &bound_secret, peer(5), NOW)
            .unwrap();

        store.revoke(record.id, NOW + 1).unwrap();
        assert_eq!(
            store.authenticate(record.id, &secret, peer(1), NOW + 2),
            Err(TicketRefusal::Revoked(record.id))
        );
    }

    #[test]
    fn state_survives_reopen_and_secrets_are_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (id, secret) = {
            let store = store(dir.path());
            let (record, secret) = store.create(new_ticket(None), NOW).unwrap();
            store.take_use(record.id, &secret, peer(1), NOW).unwrap();
            store.take_use(record.id, &secret, peer(1), NOW).unwrap();
            (record.id, secret)
        };
        let text = fs::read_to_string(dir.path().join("tickets.json")).unwrap();
        let secret_hex = secret.authorization(id);
        let secret_hex = secret_hex.rsplit('.').next().unwrap();
        assert!(!text.contains(secret_hex), "secrets must not be stored");
        let reopened = store(dir.path());
        assert_eq!(reopened.get(id).unwrap().uses_taken, 2);
        assert!(reopened.secret(id).matches(&secret));
    }

    #[test]
    fn racing_threads_get_exactly_the_granted_uses() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(store(dir.path()));
        let (record, secret) = store.create(new_ticket(Some(3)), NOW).unwrap();
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let store = store.clone();
                let secret = secret.clone();
                std::thread::spawn(move || store.take_use(record.id, &secret, peer(1), NOW).is_ok())
            })
            .collect();
        let granted = handles
            .into_iter()
            .filter(|_| true)
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(granted, 3);
    }

    #[test]
    fn the_first_use_binds_an_unbound_ticket_to_its_client() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let (record, secret) = store.create(new_ticket(Some(3)), NOW).unwrap();
        store
            .authenticate(record.id, &secret, peer(2), NOW)
            .unwrap();
        let taken = store.take_use(record.id, &secret, peer(1), NOW).unwrap();
        assert_eq!(taken.bound_client, Some(peer(1)));
        assert!(matches!(
            store.authenticate(record.id, &secret, peer(2), NOW),
            Err(TicketRefusal::BoundElsewhere { .. })
        ));
        assert!(matches!(
            store.take_use(record.id, &secret, peer(2), NOW),
            Err(TakeUseError::Refused(TicketRefusal::BoundElsewhere { .. }))
        ));
        store.take_use(record.id, &secret, peer(1), NOW).unwrap();
        assert_eq!(
            super::TicketStore::open(dir.path(), TicketKey::from_bytes([1; 32]))
                .unwrap()
                .get(record.id)
                .unwrap()
                .bound_client,
            Some(peer(1)),
            "the binding is on disk"
        );
    }

    #[test]
    fn prunes_long_inactive_tickets() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let (old, _) = store.create(new_ticket(Some(1)), NOW).unwrap();
        let later = NOW + KEEP_INACTIVE_SECS + 7200;
        store.create(new_ticket(Some(1)), later).unwrap();
        let reopened = TicketStore::open(dir.path(), TicketKey::from_bytes([1; 32])).unwrap();
        assert!(reopened.get(old.id).is_none());
        assert_eq!(reopened.list().len(), 1);
    }

    #[test]
    fn corrupt_state_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("tickets.json"), "{").unwrap();
        let err = TicketStore::open(dir.path(), TicketKey::from_bytes([1; 32])).unwrap_err();
        assert!(err.to_string().contains("tickets.json"), "{err}");
    }
}
