//! Running builds: `nix-store --realise` in a process group of its own, with its internal-json log
//! turned into events, and a kill that reaches the builders too.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard};

use tempfile::TempDir;
use tokio::io::BufReader;
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::log::{BuildEvent, Level, LogParser};
use super::process::{
    CommandLine, MAX_LOG_LINE, MAX_STDOUT, Tail, describe_status, read_bounded_line, read_limited,
};
use super::{Nix, NixCmdError, parse};
use crate::nix::store_path::{STORE_DIR, StorePath};

/// Events buffered between Nix and the consumer; when full, reading Nix's log waits.
const EVENT_BUFFER: usize = 1024;

/// Error messages kept for the outcome (the most recent ones).
const MAX_ERRORS: usize = 20;

/// A running build started by [`Nix::realise`].
///
/// Nix's log arrives as [`BuildEvent`]s ([`RealiseRun::next_event`], or
/// [`RealiseRun::take_events`] to read them elsewhere). Events are buffered up to a bound; if
/// nobody reads them, Nix waits, so read them or drop the receiver. [`RealiseRun::wait`] gives the
/// outcome (dropping the events not yet read).
///
/// `nix-store` runs as the leader of a new process group. [`RealiseRun::kill`] (or a
/// [`KillHandle`]) stops it with SIGKILL, and with it every process it started: Nix puts each local
/// builder in a session of its own, so the kill first stops the group, then kills the process groups
/// of all its descendants, then the group itself. A build that a nix-daemon runs is not our child;
/// the daemon stops it when our client process dies. Processes that left the process tree (a
/// double fork that reparents to init) are not found. Dropping the run kills it too.
pub struct RealiseRun {
    events: Option<mpsc::Receiver<LogRecord>>,
    control: Arc<Control>,
    driver: Option<JoinHandle<Result<RealiseOutcome, NixCmdError>>>,
}

impl std::fmt::Debug for RealiseRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealiseRun")
            .field("killed", &self.control.lock().killed)
            .finish_non_exhaustive()
    }
}

/// Kills a [`RealiseRun`] from anywhere, e.g. a timer. Cheap to clone.
#[derive(Clone, Debug)]
pub struct KillHandle {
    control: Arc<Control>,
}

impl KillHandle {
    /// Kills the build and everything it started, and stops any further step. Idempotent.
    pub fn kill(&self) {
        self.control.kill();
    }
}

/// How a build ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealiseOutcome {
    /// Exit status of the last `nix-store` run.
    pub status: ExitStatus,
    /// Whether it was ended by [`RealiseRun::kill`] (or by dropping the run).
    pub killed: bool,
    /// The output paths `nix-store` printed, on success.
    pub outputs: Vec<StorePath>,
    /// Error messages Nix reported (the last 20 of them), colour codes removed, e.g.
    /// `error: builder for '/nix/store/…-x.drv' failed with exit code 3`.
    pub errors: Vec<String>,
    /// The last lines of stderr that were not internal-json (e.g. a crash message).
    pub stderr_tail: String,
}

impl RealiseOutcome {
    /// Whether everything was built (or checked) successfully.
    pub fn success(&self) -> bool {
        self.status.success() && !self.killed
    }

    /// `nix-store`'s exit code, if it exited (100 for a failed build).
    pub fn exit_code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The most relevant error text: the first error Nix reported (usually the failing builder;
    /// later ones tend to be "1 dependencies … failed"), else the end of its other stderr output.
    pub fn error_message(&self) -> Option<&str> {
        self.errors
            .first()
            .map(String::as_str)
            .or_else(|| Some(self.stderr_tail.as_str()).filter(|s| !s.is_empty()))
    }

    /// Nix's failure bits from the exit code (`100 + mask`), if it is one of those codes.
    fn failure_bits(&self) -> Option<i32> {
        self.exit_code()
            .filter(|c| c & !0xf == 0x60)
            .map(|c| c & 0xf)
    }

    /// Whether a build hit `timeout` or `max-silent-time` (exit code 101 and friends).
    pub fn timed_out(&self) -> bool {
        self.failure_bits().is_some_and(|b| b & 0x1 != 0)
    }

    /// Whether a fixed-output hash did not match (exit code 102 and friends).
    pub fn hash_mismatch(&self) -> bool {
        self.failure_bits().is_some_and(|b| b & 0x2 != 0)
    }

    /// Whether `--check` found different output (exit code 104 and friends).
    pub fn not_deterministic(&self) -> bool {
        self.failure_bits().is_some_and(|b| b & 0x8 != 0)
    }
}

#[derive(Debug, Default)]
struct Control {
    state: Mutex<ControlState>,
}

#[derive(Debug, Default)]
struct ControlState {
    /// Pid (and process group id) of the running `nix-store`, until it has been reaped.
    leader: Option<u32>,
    killed: bool,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        // A panic while holding this lock leaves plain data behind; keep going with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kill(&self) {
        let mut state = self.lock();
        state.killed = true;
        if let Some(leader) = state.leader {
            kill_process_tree(leader);
        }
    }
}

/// One line of Nix's log during a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// What the line says.
    pub event: BuildEvent,
    /// The line's JSON as Nix wrote it (after `@nix `), for renderers such as
    /// nix-output-monitor that read Nix's own structured log; `None` for
    /// plain lines.
    pub internal_json: Option<String>,
}

impl RealiseRun {
    /// Starts the first step now (so a missing program is reported here) and the rest in a task.
    pub(super) fn start(nix: &Nix, steps: Vec<CommandLine>) -> Result<Self, NixCmdError> {
        let control = Arc::new(Control::default());
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let mut steps = steps.into_iter();
        let first = steps.next().expect("realise has at least one step");
        let tmp = build_tmp(nix).map_err(|source| NixCmdError::Io {
            command: first.to_string(),
            source,
        })?;
        let child = spawn_step(nix, &first, &control, tmp.path())?;
        let nix = nix.clone();
        let rest: Vec<CommandLine> = steps.collect();
        let driven = control.clone();
        let driver = tokio::spawn(async move {
            let outcome = drive(nix, first, child, rest, driven, tx, tmp.path()).await;
            // A build tree may be large: removed on the blocking pool.
            let _ = tokio::task::spawn_blocking(move || drop(tmp)).await;
            outcome
        });
        Ok(Self {
            events: Some(rx),
            control,
            driver: Some(driver),
        })
    }

    /// The next event, or `None` when the build has ended and every event was read (or the
    /// receiver was taken).
    pub async fn next_event(&mut self) -> Option<LogRecord> {
        self.events.as_mut()?.recv().await
    }

    /// Takes the event receiver, to read events in another task.
    pub fn take_events(&mut self) -> Option<mpsc::Receiver<LogRecord>> {
        self.events.take()
    }

    /// A handle that kills this build.
    pub fn kill_handle(&self) -> KillHandle {
        KillHandle {
            control: self.control.clone(),
        }
    }

    /// Kills the build and everything it started. The outcome then says `killed`.
    pub fn kill(&self) {
        self.control.kill();
    }

    /// Waits for the build to end. A failed build is an `Ok` outcome; `Err` means Nix could not be
    /// run or watched.
    pub async fn wait(mut self) -> Result<RealiseOutcome, NixCmdError> {
        // Unread events would hold the log reader up.
        self.events = None;
        let driver = self.driver.take().expect("the driver is taken only here");
        match driver.await {
            Ok(result) => result,
            Err(e) => Err(NixCmdError::Io {
                command: "nix-store --realise".to_owned(),
                source: std::io::Error::other(e),
            }),
        }
    }
}

impl Drop for RealiseRun {
    fn drop(&mut self) {
        if self.driver.is_some() {
            self.control.kill();
        }
    }
}

/// Spawns one step as a process group leader, unless the run was killed already.
fn spawn_step(
    nix: &Nix,
    line: &CommandLine,
    control: &Control,
    tmp: &Path,
) -> Result<Option<Child>, NixCmdError> {
    let mut command = nix.tokio_command(line);
    command.process_group(0).env("TMPDIR", tmp);
    // Holding the lock across the spawn means a kill either comes before (and we do not start)
    // or sees the new leader.
    let mut state = control.lock();
    if state.killed {
        return Ok(None);
    }
    let child = command.spawn().map_err(|source| NixCmdError::Spawn {
        command: line.to_string(),
        source,
    })?;
    state.leader = child.id();
    tracing::debug!(command = %line, pid = ?state.leader, "started nix build");
    Ok(Some(child))
}

/// Where `nix-store` makes the build directories of the builds it runs itself (a nix-daemon uses
/// its own). A killed `nix-store` cannot remove them; this directory goes, with whatever is left in
/// it, when the run has ended. Build users must reach their directories inside it, and a handle
/// running Nix as another user must be able to write to it.
fn build_tmp(nix: &Nix) -> std::io::Result<TempDir> {
    let parent = nix
        .env_value("TMPDIR")
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    let tmp = tempfile::Builder::new()
        .prefix("drv-thru-build-")
        .tempdir_in(parent)?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))?;
    if let Some((uid, gid)) = nix.config.credentials {
        std::os::unix::fs::chown(tmp.path(), Some(uid), Some(gid))?;
    }
    Ok(tmp)
}

/// Runs the steps one after the other, forwarding events, until one fails or is killed.
async fn drive(
    nix: Nix,
    first: CommandLine,
    first_child: Option<Child>,
    rest: Vec<CommandLine>,
    control: Arc<Control>,
    tx: mpsc::Sender<LogRecord>,
    tmp: &Path,
) -> Result<RealiseOutcome, NixCmdError> {
    let mut tx = Some(tx);
    let mut errors = Vec::new();
    let mut line = first;
    let mut child = first_child;
    let mut rest = rest.into_iter();
    loop {
        let Some(running) = child else {
            // Killed before this step started.
            return Ok(RealiseOutcome {
                status: killed_status(),
                killed: true,
                outputs: Vec::new(),
                errors,
                stderr_tail: String::new(),
            });
        };
        let (status, stdout, tail) = watch(running, &line, &control, &mut tx, &mut errors).await?;
        let killed = control.lock().killed;
        if !status.success() || killed {
            return Ok(RealiseOutcome {
                status,
                killed,
                outputs: Vec::new(),
                errors,
                stderr_tail: tail.text(),
            });
        }
        match rest.next() {
            Some(next) => {
                child = spawn_step(&nix, &next, &control, tmp)?;
                line = next;
            }
            None => {
                let outputs = parse::path_lines(&root_targets(&String::from_utf8_lossy(&stdout)))
                    .map_err(|reason| NixCmdError::Parse {
                    command: line.to_string(),
                    reason,
                    stderr: tail.text(),
                })?;
                return Ok(RealiseOutcome {
                    status,
                    killed,
                    outputs,
                    errors,
                    stderr_tail: tail.text(),
                });
            }
        }
    }
}

/// `nix-store --realise`'s stdout with every root link it printed (with `--add-root`, instead of
/// the output) replaced by the store path it points to. Store paths are kept as they are: an
/// output may itself be a symlink.
fn root_targets(stdout: &str) -> String {
    stdout
        .lines()
        .map(str::trim)
        .map(|line| match std::fs::read_link(line) {
            Ok(target) if !line.starts_with(STORE_DIR) => target.to_string_lossy().into_owned(),
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads one step's stdout and stderr to the end, then reaps it.
async fn watch(
    mut child: Child,
    line: &CommandLine,
    control: &Control,
    tx: &mut Option<mpsc::Sender<LogRecord>>,
    errors: &mut Vec<String>,
) -> Result<(ExitStatus, Vec<u8>, Tail), NixCmdError> {
    let io_error = |source| NixCmdError::Io {
        command: line.to_string(),
        source,
    };
    let stdout = child.stdout.take().expect("stdout was piped");
    let stderr = child.stderr.take().expect("stderr was piped");
    let read_log = async {
        let mut reader = BufReader::new(stderr);
        let mut parser = LogParser::new();
        let mut tail = Tail::default();
        let mut buf = Vec::new();
        while read_bounded_line(&mut reader, &mut buf, MAX_LOG_LINE).await? {
            let text = String::from_utf8_lossy(&buf);
            let event = parser.parse(&text);
            let internal_json = text.strip_prefix("@nix ").map(str::to_owned);
            match &event {
                BuildEvent::Message {
                    level: Level::Error,
                    text,
                } => {
                    if errors.len() == MAX_ERRORS {
                        errors.remove(0);
                    }
                    errors.push(text.clone());
                }
                BuildEvent::Plain(text) => tail.push(text),
                _ => {}
            }
            if let Some(sender) = tx
                && sender
                    .send(LogRecord {
                        event,
                        internal_json,
                    })
                    .await
                    .is_err()
            {
                // Nobody listens any more; keep reading so Nix is not blocked.
                *tx = None;
            }
        }
        Ok::<_, std::io::Error>(tail)
    };
    let (stdout, tail) =
        tokio::try_join!(read_limited(stdout, MAX_STDOUT), read_log).map_err(io_error)?;
    let status = child.wait().await;
    // Reaped (or lost): the pid may be reused from now on, so it must no longer be signalled.
    control.lock().leader = None;
    let status = status.map_err(io_error)?;
    let stdout = stdout.map_err(|()| NixCmdError::OutputTooLarge {
        command: line.to_string(),
        limit: MAX_STDOUT,
    })?;
    tracing::debug!(command = %line, status = %describe_status(status), "nix build step ended");
    Ok((status, stdout, tail))
}

/// The status reported when a step never ran because the run was killed first.
fn killed_status() -> ExitStatus {
    use std::os::unix::process::ExitStatusExt as _;
    ExitStatus::from_raw(libc::SIGKILL)
}

/// SIGKILLs the process group led by `leader` and the process groups of all its descendants.
///
/// The group is stopped first so `nix-store` cannot start new builders meanwhile. Must only be
/// called while `leader` has not been reaped, so the ids cannot belong to anyone else.
fn kill_process_tree(leader: u32) {
    let Ok(leader) = i32::try_from(leader) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe { libc::kill(-leader, libc::SIGSTOP) };
    let own_group = {
        // SAFETY: getpgrp(2) cannot fail.
        unsafe { libc::getpgrp() }
    };
    let descendants = descendants(leader);
    let groups: BTreeSet<i32> = descendants
        .iter()
        .map(|(_, pgid)| *pgid)
        .filter(|&g| g > 1 && g != leader && g != own_group)
        .collect();
    for group in groups {
        // SAFETY: as above.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    }
    for (pid, _) in descendants {
        // SAFETY: kill(2) on a pid; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // SAFETY: as above.
    unsafe { libc::kill(-leader, libc::SIGKILL) };
}

/// Kills the builds that an earlier, killed process left running with roots under `dir`: the
/// process trees of `nix-store --realise --add-root DIR/…` group leaders, found in `/proc`. Such a
/// build would go on with no time limit and make its roots again after they were cleared. Returns
/// how many it killed, once they have stopped (or after a few seconds).
///
/// Only for a `dir` that no live process roots builds in (e.g. under a lock the caller holds).
/// Only this user's processes are candidates: another user's command line can name any `dir`.
pub fn kill_builds_rooted_in(dir: &Path) -> usize {
    let leaders: Vec<i32> = process_ids()
        .filter(|&pid| {
            // SAFETY: geteuid cannot fail and touches no memory.
            let ours = std::fs::metadata(format!("/proc/{pid}"))
                .is_ok_and(|meta| meta.uid() == unsafe { libc::geteuid() });
            let leads_group = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parse_stat(&stat))
                .is_some_and(|(_, pgid)| pgid == pid);
            ours && leads_group
                && roots_in(
                    &std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default(),
                    dir,
                )
        })
        .collect();
    for &leader in &leaders {
        // The id was checked just above; an orphan is reaped by init only once killed.
        kill_process_tree(leader as u32);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while leaders.iter().any(|&pid| running(pid)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    leaders.len()
}

/// Whether a `/proc/PID/cmdline` has `--add-root` with a link under `dir`.
fn roots_in(cmdline: &[u8], dir: &Path) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(2).any(|pair| {
        pair[0] == b"--add-root" && Path::new(std::ffi::OsStr::from_bytes(pair[1])).starts_with(dir)
    })
}

/// Whether process `pid` exists and is not a zombie (which runs no more code).
pub(super) fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// All descendants of `root` as (pid, process group id), from `/proc`. Empty where there is no
/// `/proc`.
fn descendants(root: i32) -> Vec<(i32, i32)> {
    let mut children: HashMap<i32, Vec<(i32, i32)>> = HashMap::new();
    for pid in process_ids() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((ppid, pgid)) = parse_stat(&stat) {
            children.entry(ppid).or_default().push((pid, pgid));
        }
    }
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(parent) = queue.pop() {
        for &(pid, pgid) in children.get(&parent).map(Vec::as_slice).unwrap_or_default() {
            // A pid cannot be its own ancestor, but stay safe against a racy snapshot.
            if pid != root && !out.iter().any(|&(p, _)| p == pid) {
                out.push((pid, pgid));
                queue.push(pid);
            }
        }
    }
    out
}

/// The ids of the processes in `/proc` now; none where there is no `/proc`.
pub(super) fn process_ids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}

/// Parent pid and process group id from `/proc/PID/stat`: `pid (comm) state ppid pgrp …`, where
/// `comm` may itself hold spaces and parentheses.
fn parse_stat(stat: &str) -> Option<(i32, i32)> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace();
    let _state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((ppid, pgrp))
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};

    use super::*;

    fn outcome(code: i32) -> RealiseOutcome {
        RealiseOutcome {
            status: ExitStatus::from_raw(code << 8),
            killed: false,
            outputs: Vec::new(),
            errors: Vec::new(),
            stderr_tail: String::new(),
        }
    }

    #[test]
    fn decodes_nix_exit_codes() {
        let ok = outcome(0);
        assert!(ok.success());
        assert!(!ok.timed_out() && !ok.hash_mismatch() && !ok.not_deterministic());
        let failed = outcome(100);
        assert!(!failed.success());
        assert!(!failed.timed_out() && !failed.not_deterministic());
        assert!(outcome(101).timed_out());
        assert!(outcome(102).hash_mismatch());
        assert!(outcome(104).not_deterministic());
        assert!(outcome(105).timed_out() && outcome(105).not_deterministic());
        // Other codes carry no bits.
        assert!(!outcome(1).timed_out());
        assert!(!outcome(9).timed_out());
    }

    #[test]
    fn error_message_prefers_the_first_error() {
        let mut o = outcome(100);
        assert_eq!(o.error_message(), None);
        o.stderr_tail = "Aborted".into();
        assert_eq!(o.error_message(), Some("Aborted"));
        o.errors = vec![
            "error: builder failed".into(),
            "error: 1 dependencies".into(),
        ];
        assert_eq!(o.error_message(), Some("error: builder failed"));
    }

    #[test]
    fn kills_the_builds_rooted_in_a_directory_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("gcroots");
        let spawn = |root: &Path| {
            // `; true` keeps the shell from exec'ing sleep, so its cmdline stays.
            std::process::Command::new("sh")
                .args(["-c", "sleep 300; true", "--add-root"])
                .arg(root)
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let mut orphan = spawn(&ours.join("s-1/result"));
        let mut other = spawn(&dir.path().join("elsewhere/result"));
        assert_eq!(kill_builds_rooted_in(&ours), 1);
        assert_eq!(orphan.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(other.try_wait().unwrap().is_none());
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[test]
    fn parses_proc_stat() {
        assert_eq!(
            parse_stat("1234 (sh) S 1200 1234 1200 0 -1 4194560 ..."),
            Some((1200, 1234))
        );
        assert_eq!(
            parse_stat("77 (odd) name) R 5 77 5 0"),
            Some((5, 77)),
            "comm with a parenthesis"
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[tokio::test]
    async fn finds_descendants_and_kills_them() {
        // A shell that starts a child in a session of its own: the case of a Nix builder.
        let mut leader = tokio::process::Command::new("sh")
            .args(["-c", "setsid sleep 300 & sleep 300"])
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = i32::try_from(leader.id().unwrap()).unwrap();
        let mut found = Vec::new();
        // Generous: a loaded machine may be slow to fork.
        for _ in 0..1000 {
            found = descendants(pid);
            // Both children exist and the background one has called setsid.
            if found.len() >= 2 && found.iter().any(|&(p, g)| p == g) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found.iter().any(|&(p, g)| p == g),
            "the setsid child leads a group"
        );
        kill_process_tree(leader.id().unwrap());
        let status = leader.wait().await.unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        for (child, _) in found {
            let mut gone = false;
            for _ in 0..1000 {
                // Gone, or a zombie waiting for init to reap it.
                let stat = std::fs::read_to_string(format!("/proc/{child}/stat"));
                if stat.map_or(true, |s| s.contains(") Z ")) {
                    gone = true;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            assert!(gone, "process {child} survived");
        }
    }
}
