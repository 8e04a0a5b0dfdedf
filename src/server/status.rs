//! The live status board: what `drv-thru status` shows and `WatchStatus`
//! streams. Every change goes through a `watch` channel, so watchers are
//! woken by the change itself, never by polling.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use tokio::sync::watch;

use crate::proto::{self, BuildPhase, BuildResult};

/// Who a session belongs to, as shown in status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLabel {
    /// The client's endpoint id.
    pub endpoint_id: String,
    /// Trusted-client name or ticket name.
    pub label: String,
    /// The ticket id, for ticket sessions.
    pub ticket_id: Option<String>,
}

/// One open session, as the board shows it.
#[derive(Debug, Clone)]
struct SessionRow {
    client: ClientLabel,
    drv_path: String,
    phase: BuildPhase,
    admitted_at: u64,
    admitted: Instant,
    phase_since: Instant,
}

#[derive(Debug, Clone)]
struct Finished {
    session_id: String,
    client: ClientLabel,
    drv_path: String,
    result: BuildResult,
    finished_at: u64,
    duration: Duration,
    message: String,
}

/// The board's contents; cheap to clone for a snapshot.
#[derive(Debug, Clone, Default)]
pub struct Board {
    open_connections: u32,
    sessions: BTreeMap<String, SessionRow>,
    queue: VecDeque<String>,
    recent: VecDeque<Finished>,
}

/// Static facts about the server that every snapshot repeats.
#[derive(Debug, Clone)]
pub struct ServerFacts {
    /// Endpoint id.
    pub endpoint_id: String,
    /// Direct addresses.
    pub direct_addresses: Vec<String>,
    /// Relay URL, if any.
    pub relay_url: String,
    /// Signing public key.
    pub signing_public_key: String,
    /// Unix start time.
    pub started_at: u64,
    /// Build slots.
    pub max_concurrent_builds: u32,
    /// How many finished sessions to keep.
    pub recent_limit: usize,
}

/// The shared status board.
#[derive(Debug)]
pub struct StatusBoard {
    facts: ServerFacts,
    board: watch::Sender<Board>,
}

impl StatusBoard {
    /// An empty board for a server with these facts.
    pub fn new(facts: ServerFacts) -> Self {
        Self {
            facts,
            board: watch::Sender::new(Board::default()),
        }
    }

    /// Records the number of open connections.
    pub fn set_open_connections(&self, open: u32) {
        self.board.send_if_modified(|board| {
            let changed = board.open_connections != open;
            board.open_connections = open;
            changed
        });
    }

    /// Adds an admitted session in `phase`.
    pub fn admit(&self, session_id: &str, client: ClientLabel, drv_path: &str, phase: BuildPhase) {
        let now = Instant::now();
        self.board.send_modify(|board| {
            board.sessions.insert(
                session_id.to_owned(),
                SessionRow {
                    client,
                    drv_path: drv_path.to_owned(),
                    phase,
                    admitted_at: proto::now_unix(),
                    admitted: now,
                    phase_since: now,
                },
            );
            if phase == BuildPhase::Queued {
                board.queue.push_back(session_id.to_owned());
            }
        });
    }

    /// Moves a session to `phase` (leaving the queue if it was queued).
    pub fn set_phase(&self, session_id: &str, phase: BuildPhase) {
        self.board.send_modify(|board| {
            if let Some(session) = board.sessions.get_mut(session_id) {
                session.phase = phase;
                session.phase_since = Instant::now();
            }
            if phase == BuildPhase::Queued {
                if !board.queue.iter().any(|id| id == session_id) {
                    board.queue.push_back(session_id.to_owned());
                }
            } else {
                board.queue.retain(|id| id != session_id);
            }
        });
    }

    /// Ends a session with `result`.
    pub fn finish(&self, session_id: &str, result: BuildResult, message: &str) {
        let recent_limit = self.facts.recent_limit;
        self.board.send_modify(|board| {
            board.queue.retain(|id| id != session_id);
            let Some(session) = board.sessions.remove(session_id) else {
                return;
            };
            board.recent.push_front(Finished {
                session_id: session_id.to_owned(),
                client: session.client,
                drv_path: session.drv_path,
                result,
                finished_at: proto::now_unix(),
                duration: session.admitted.elapsed(),
                message: message.to_owned(),
            });
            board.recent.truncate(recent_limit);
        });
    }

    /// Drops the row of a session that was never admitted, recording
    /// nothing: it was no build.
    pub fn withdraw(&self, session_id: &str) {
        self.board.send_if_modified(|board| {
            board.queue.retain(|id| id != session_id);
            board.sessions.remove(session_id).is_some()
        });
    }

    /// The 1-based queue position of `session_id`, or 0 if it is not queued.
    pub fn queue_position(&self, session_id: &str) -> u32 {
        self.board
            .borrow()
            .queue
            .iter()
            .position(|id| id == session_id)
            .map_or(0, |index| u32::try_from(index + 1).unwrap_or(u32::MAX))
    }

    /// A receiver that wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<Board> {
        self.board.subscribe()
    }

    /// The current snapshot in protobuf form.
    pub fn snapshot(&self) -> proto::BuilderStatus {
        self.render(&self.board.borrow())
    }

    /// Renders `board` with this server's facts.
    pub fn render(&self, board: &Board) -> proto::BuilderStatus {
        let facts = &self.facts;
        let client = |label: &ClientLabel| proto::BuildClient {
            endpoint_id: label.endpoint_id.clone(),
            label: label.label.clone(),
            ticket_id: label.ticket_id.clone().unwrap_or_default(),
        };
        let mut active: Vec<(&String, &SessionRow)> = board
            .sessions
            .iter()
            .filter(|(_, session)| session.phase != BuildPhase::Queued)
            .collect();
        active.sort_by_key(|(_, session)| session.admitted);
        proto::BuilderStatus {
            endpoint_id: facts.endpoint_id.clone(),
            direct_addresses: facts.direct_addresses.clone(),
            relay_url: facts.relay_url.clone(),
            signing_public_key: facts.signing_public_key.clone(),
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: Some(proto::timestamp(facts.started_at)),
            max_concurrent_builds: facts.max_concurrent_builds,
            open_connections: board.open_connections,
            active: active
                .into_iter()
                .map(|(id, session)| proto::ActiveBuild {
                    session_id: id.clone(),
                    client: Some(client(&session.client)),
                    drv_path: session.drv_path.clone(),
                    phase: session.phase.into(),
                    admitted_at: Some(proto::timestamp(session.admitted_at)),
                    phase_elapsed: Some(proto::duration(session.phase_since.elapsed())),
                })
                .collect(),
            queued: board
                .queue
                .iter()
                .zip(1u32..)
                .filter_map(|(id, position)| {
                    let session = board.sessions.get(id)?;
                    Some(proto::QueuedBuild {
                        session_id: id.clone(),
                        client: Some(client(&session.client)),
                        drv_path: session.drv_path.clone(),
                        position,
                        waited: Some(proto::duration(session.phase_since.elapsed())),
                    })
                })
                .collect(),
            recent: board
                .recent
                .iter()
                .map(|finished| proto::FinishedBuild {
                    session_id: finished.session_id.clone(),
                    client: Some(client(&finished.client)),
                    drv_path: finished.drv_path.clone(),
                    result: finished.result.into(),
                    finished_at: Some(proto::timestamp(finished.finished_at)),
                    duration: Some(proto::duration(finished.duration)),
                    message: finished.message.clone(),
                })
                .collect(),
            process: Some(super::resources::sample()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(recent_limit: usize) -> StatusBoard {
        StatusBoard::new(ServerFacts {
            endpoint_id: "e".into(),
            direct_addresses: vec![],
            relay_url: String::new(),
            signing_public_key: "k:x".into(),
            started_at: 0,
            max_concurrent_builds: 1,
            recent_limit,
        })
    }

    fn client(name: &str) -> ClientLabel {
        ClientLabel {
            endpoint_id: "c".into(),
            label: name.into(),
            ticket_id: None,
        }
    }

    #[test]
    fn queue_positions_follow_admission_order() {
        let board = board(5);
        board.admit("a", client("a"), "/nix/store/a.drv", BuildPhase::Queued);
        board.admit("b", client("b"), "/nix/store/b.drv", BuildPhase::Queued);
        board.set_phase("a", BuildPhase::Building);
        let snapshot = board.snapshot();
        assert_eq!(snapshot.active.len(), 1);
        assert_eq!(snapshot.active[0].session_id, "a");
        assert_eq!(snapshot.queued.len(), 1);
        assert_eq!(
            (
                snapshot.queued[0].session_id.as_str(),
                snapshot.queued[0].position
            ),
            ("b", 1)
        );
    }

    #[test]
    fn finished_sessions_are_kept_newest_first_up_to_the_limit() {
        let board = board(2);
        for id in ["a", "b", "c"] {
            board.admit(
                id,
                client(id),
                "/nix/store/x.drv",
                BuildPhase::CheckingInputs,
            );
            board.finish(id, BuildResult::Succeeded, "");
        }
        let recent: Vec<String> = board
            .snapshot()
            .recent
            .into_iter()
            .map(|f| f.session_id)
            .collect();
        assert_eq!(recent, ["c", "b"]);
    }

    #[tokio::test]
    async fn watchers_wake_on_change() {
        let board = board(1);
        let mut rx = board.subscribe();
        rx.borrow_and_update();
        board.set_open_connections(3);
        tokio::time::timeout(Duration::from_secs(1), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(board.render(&rx.borrow()).open_connections, 3);
        board.set_open_connections(3);
        assert!(
            !rx.has_changed().unwrap(),
            "an unchanged value must not wake watchers"
        );
    }
}
