//! Running one session's build: a FIFO queue for the build slots, Nix's
//! structured log forwarded as typed events, the time limit, and
//! cancellation when the client leaves.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{cache::SignedCache, gc_roots::GcRoots, sessions::Session, status::StatusBoard};
use crate::{
    nix::{drv::Derivation, store_path::StorePath},
    nixcmd::{BuildEvent, LogRecord, Nix},
    proto::{self, BuildPhase, BuildResult, build_response::Event},
};

/// What a build needs from the server.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// Runs Nix.
    pub nix: Nix,
    /// Where progress is shown.
    pub board: Arc<StatusBoard>,
    /// The build slots; tokio's semaphore is fair, so waiting is FIFO.
    pub slots: Arc<Semaphore>,
    /// Running builds, so shutdown can wait for them to be stopped.
    pub tasks: TaskTracker,
    /// The signed cache, told about outputs as soon as they exist.
    pub cache: Arc<SignedCache>,
    /// Keeps each session's outputs from the garbage collector.
    pub roots: Arc<GcRoots>,
}

type Events = mpsc::Sender<proto::BuildResponse>;

/// How a build ended, for the client, the status board and the log.
struct Ending {
    result: BuildResult,
    message: String,
    outputs: Vec<proto::BuildOutput>,
}

impl Ending {
    fn new(result: BuildResult, message: impl Into<String>) -> Self {
        Self {
            result,
            message: message.into(),
            outputs: Vec::new(),
        }
    }
}

async fn send(events: &Events, event: Event) -> bool {
    events
        .send(proto::BuildResponse { event: Some(event) })
        .await
        .is_ok()
}

/// Queues, runs and reports the build of `session`, streaming events to
/// `events` until the last one (`finished`).
pub async fn run(context: BuildContext, session: Arc<Session>, rebuild: bool, events: Events) {
    let ending = queue_and_build(&context, &session, rebuild, &events).await;
    info!(session = %session.id, result = ?ending.result, message = %ending.message, "build ended");
    session.record_outcome(ending.result, &ending.message);
    if ending.result != BuildResult::Succeeded {
        session.finish_build(std::iter::empty());
        // Nothing to fetch; Nix has stopped, so no root can appear after this.
        context.roots.remove(&session.id);
    }
    send(
        &events,
        Event::Finished(proto::BuildFinished {
            result: ending.result.into(),
            message: ending.message,
            outputs: ending.outputs,
        }),
    )
    .await;
}

/// Queues `session` for a build slot, telling its client its position
/// whenever that changes.
async fn wait_for_slot(
    context: &BuildContext,
    session: &Session,
    events: &Events,
) -> Result<OwnedSemaphorePermit, Ending> {
    let board = &context.board;
    board.set_phase(&session.id, BuildPhase::Queued);
    let mut watch = board.subscribe();
    let mut position = 0;
    let acquire = context.slots.clone().acquire_owned();
    tokio::pin!(acquire);
    loop {
        let now = board.queue_position(&session.id);
        if now != position && now != 0 {
            position = now;
            if !send(events, Event::Queued(proto::BuildQueued { position })).await {
                return Err(Ending::new(
                    BuildResult::Cancelled,
                    "client left while queued",
                ));
            }
        }
        tokio::select! {
            permit = &mut acquire => return Ok(permit.expect("the build slots are never closed")),
            _ = watch.changed() => {}
            _ = session.cancelled.cancelled() => return Err(Ending::new(
                BuildResult::Cancelled,
                session.cancelled_because().unwrap_or("client left while queued"),
            )),
            _ = events.closed() => return Err(Ending::new(BuildResult::Cancelled, "client left while queued")),
        }
    }
}

async fn queue_and_build(
    context: &BuildContext,
    session: &Arc<Session>,
    rebuild: bool,
    events: &Events,
) -> Ending {
    let board = &context.board;
    // A free slot is taken at once, with no queue position to report: the
    // semaphore hands released slots to those waiting first, so this never
    // overtakes them.
    let permit = match context.slots.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => match wait_for_slot(context, session, events).await {
            Ok(permit) => permit,
            Err(ending) => return ending,
        },
    };
    board.set_phase(&session.id, BuildPhase::Building);
    let limit = session.limits.max_build_time;
    if !send(
        events,
        Event::Started(proto::BuildStarted {
            max_build_time: Some(proto::duration(limit.get())),
        }),
    )
    .await
    {
        return Ending::new(BuildResult::Cancelled, "client left");
    }
    let ending = build(context, session, rebuild, events).await;
    // The slot is free as soon as Nix is done, before outputs are served.
    drop(permit);
    if ending.result == BuildResult::Succeeded {
        board.set_phase(&session.id, BuildPhase::ServingOutputs);
    }
    ending
}

async fn build(
    context: &BuildContext,
    session: &Arc<Session>,
    rebuild: bool,
    events: &Events,
) -> Ending {
    let limit = session.limits.max_build_time;
    let root = match context.roots.link_for(&session.id) {
        Ok(root) => root,
        Err(err) => {
            return Ending::new(
                BuildResult::Error,
                format!("cannot make the outputs' garbage-collector roots: {err}"),
            );
        }
    };
    let mut run = match context
        .nix
        .realise(&session.drv, None, rebuild, Some(&root))
    {
        Ok(run) => run,
        Err(err) => return Ending::new(BuildResult::Error, format!("cannot start Nix: {err}")),
    };
    let deadline = tokio::time::sleep(limit.get());
    tokio::pin!(deadline);
    let stopped = loop {
        tokio::select! {
            event = run.next_event() => {
                let Some(event) = event else { break None };
                let Some(event) = forwarded(event) else { continue };
                if !send(events, event).await {
                    break Some(Ending::new(BuildResult::Cancelled, "client left during the build"));
                }
            }
            _ = &mut deadline => break Some(Ending::new(
                BuildResult::LimitExceeded,
                format!("the build exceeded this session's max_build_time of {limit} and was stopped"),
            )),
            _ = session.cancelled.cancelled() => break Some(Ending::new(
                BuildResult::Cancelled,
                session.cancelled_because().unwrap_or("client left during the build"),
            )),
            _ = events.closed() => break Some(Ending::new(BuildResult::Cancelled, "client left during the build")),
        }
    };
    if let Some(ending) = stopped {
        // Kills the whole process tree; waiting makes sure it is gone
        // before the slot is given to the next build.
        run.kill();
        let _ = run.wait().await;
        return ending;
    }
    match run.wait().await {
        Ok(outcome) if outcome.success() => outputs(context, session).await,
        Ok(outcome) => Ending::new(
            BuildResult::Failed,
            outcome
                .error_message()
                .unwrap_or("the build failed")
                .to_owned(),
        ),
        Err(err) => Ending::new(BuildResult::Error, format!("running Nix: {err}")),
    }
}

/// The client-facing form of a Nix log line: build output, phases and Nix's
/// own messages as typed events, and every structured line's JSON for
/// renderers such as nix-output-monitor (with empty text when there is
/// nothing to print plainly).
fn forwarded(record: LogRecord) -> Option<Event> {
    let json = record.internal_json.unwrap_or_default();
    let line = |drv: Option<StorePath>, text: String, json: String| {
        Event::Log(proto::BuildLogLine {
            drv_path: drv.map(|d| d.to_string()).unwrap_or_default(),
            text,
            internal_json: json,
        })
    };
    match record.event {
        BuildEvent::LogLine {
            drv, line: text, ..
        } => Some(line(drv, text, json)),
        BuildEvent::Phase { drv, phase, .. } => Some(Event::Phase(proto::BuildPhaseChange {
            drv_path: drv.map(|d| d.to_string()).unwrap_or_default(),
            phase,
            internal_json: json,
        })),
        BuildEvent::BuildStarted { drv, text, .. } => Some(line(Some(drv), text, json)),
        BuildEvent::Message { text, .. } | BuildEvent::Plain(text) => Some(line(None, text, json)),
        _ if !json.is_empty() => Some(line(None, String::new(), json)),
        _ => None,
    }
}

async fn outputs(context: &BuildContext, session: &Arc<Session>) -> Ending {
    let drv = match tokio::fs::read(session.drv.to_string())
        .await
        .map(|bytes| Derivation::parse(&bytes))
    {
        Ok(Ok(drv)) => drv,
        Ok(Err(err)) => {
            return Ending::new(
                BuildResult::Error,
                format!("reading {}: {err}", session.drv),
            );
        }
        Err(err) => {
            return Ending::new(
                BuildResult::Error,
                format!("reading {}: {err}", session.drv),
            );
        }
    };
    let outputs: Vec<(String, StorePath)> = drv
        .outputs()
        .iter()
        .filter_map(|(name, output)| Some((name.clone(), output.path()?.clone())))
        .collect();
    let paths: Vec<StorePath> = outputs.iter().map(|(_, path)| path.clone()).collect();
    let closure = match context.nix.closure_infos(&paths).await {
        Ok(infos) => {
            let closure: Vec<StorePath> = infos.iter().map(|info| info.path.clone()).collect();
            // The client asks for these narinfos next; it then needs no Nix call.
            context.cache.remember(infos);
            closure
        }
        Err(err) => {
            warn!(session = %session.id, "output closure: {err}");
            return Ending::new(
                BuildResult::Error,
                format!("the outputs are not valid after the build: {err}"),
            );
        }
    };
    session.finish_build(closure);
    Ending {
        result: BuildResult::Succeeded,
        message: String::new(),
        outputs: outputs
            .into_iter()
            .map(|(name, path)| proto::BuildOutput {
                name,
                store_path: path.to_string(),
            })
            .collect(),
    }
}
