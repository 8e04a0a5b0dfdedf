//! Running a case and judging it: the server's resources sampled while the
//! attack holds and a well-behaved build runs beside it, the ceilings they
//! must stay under, and the fault table the suite prints.

use std::{
    any::Any,
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use drv_thru::proto::{StatusRequest, builder_client::BuilderClient};
use tokio::sync::watch;

use crate::arena::{Arena, BUILD_BOUND};

/// How far the server's resident memory may grow over its level before a
/// case.
pub const RSS_GROWTH_CEILING: u64 = 64 << 20;
/// Open files the server may hold at any time.
pub const FD_CEILING: u32 = 256;
/// OS threads the server may run at any time.
pub const THREAD_CEILING: u32 = 128;
/// Live tokio tasks the server may hold at any time.
pub const TASK_CEILING: u64 = 4096;
/// How long an attack may take to set itself up.
const ATTACK_BOUND: Duration = Duration::from_secs(120);
/// How long the server's status may take to answer before it counts as
/// not answering.
const STATUS_BOUND: Duration = Duration::from_secs(3);
/// Time between samples.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The builder's resource use at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Resident bytes.
    pub rss: u64,
    /// Open file descriptors.
    pub fds: u32,
    /// OS threads.
    pub threads: u32,
    /// Live tokio tasks, as its status reports them (0 when it did not
    /// answer).
    pub tasks: u64,
    /// Whether its status answered within [`STATUS_BOUND`].
    pub answered: bool,
}

impl Sample {
    /// The highest of each figure in `self` and `other`; answered only if
    /// both did.
    fn max(self, other: Self) -> Self {
        Self {
            rss: self.rss.max(other.rss),
            fds: self.fds.max(other.fds),
            threads: self.threads.max(other.threads),
            tasks: self.tasks.max(other.tasks),
            answered: self.answered && other.answered,
        }
    }
}

/// Where to look at a builder from outside: its process and its admin
/// socket's data directory.
#[derive(Debug, Clone)]
pub struct Probe {
    pid: u32,
    data_dir: PathBuf,
}

impl Probe {
    /// The probe of `arena`'s builder.
    pub fn of(arena: &Arena) -> Self {
        Self {
            pid: arena.builder.pid(),
            data_dir: arena.builder.data_dir.clone(),
        }
    }

    /// Memory, files and threads from `/proc`, tasks from the builder's
    /// status over its admin socket.
    pub async fn sample(&self) -> Sample {
        let process =
            drv_thru::server::resources::of_process(&Path::new("/proc").join(self.pid.to_string()));
        let tasks = tokio::time::timeout(STATUS_BOUND, status_tasks(&self.data_dir))
            .await
            .ok()
            .flatten();
        Sample {
            rss: process.resident_bytes,
            fds: process.open_files,
            threads: process.threads,
            tasks: tasks.unwrap_or(0),
            answered: tasks.is_some(),
        }
    }

    /// Samples every [`SAMPLE_EVERY`] until `stop` changes; the peaks.
    async fn peaks(self, mut stop: watch::Receiver<bool>) -> Sample {
        let mut peak = self.sample().await;
        loop {
            tokio::select! {
                _ = stop.changed() => return peak,
                () = tokio::time::sleep(SAMPLE_EVERY) => peak = peak.max(self.sample().await),
            }
        }
    }
}

async fn status_tasks(data_dir: &Path) -> Option<u64> {
    let admin = drv_thru::client::admin(data_dir).await.ok()?;
    let status = BuilderClient::new(admin)
        .status(StatusRequest {})
        .await
        .ok()?
        .into_inner()
        .status?;
    Some(status.process?.tasks)
}

/// What an attack keeps hold of while the well-behaved build runs: its
/// endpoints (closed on release), background tasks (aborted) and anything
/// else (dropped).
#[derive(Default)]
pub struct Held {
    endpoints: Vec<iroh::Endpoint>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    things: Vec<Box<dyn Any + Send>>,
}

impl Held {
    /// Keeps `endpoint` open until release.
    pub fn endpoint(&mut self, endpoint: iroh::Endpoint) {
        self.endpoints.push(endpoint);
    }

    /// Keeps `task` running until release.
    pub fn task(&mut self, task: tokio::task::JoinHandle<()>) {
        self.tasks.push(task);
    }

    /// Keeps `thing` alive until release.
    pub fn keep(&mut self, thing: impl Any + Send) {
        self.things.push(Box::new(thing));
    }

    /// Lets everything go.
    pub async fn release(self) {
        for task in &self.tasks {
            task.abort();
        }
        drop(self.things);
        for endpoint in self.endpoints {
            endpoint.close().await;
        }
    }
}

/// What an attack saw (a status code, `Code/reason`, or a description
/// starting with `held` when the attack got into place) and what it holds.
pub type Outcome = (String, Held);

/// One line of the fault table.
#[derive(Debug)]
struct Row {
    case: String,
    expected: String,
    seen: String,
    baseline: Sample,
    peak: Sample,
    build: Result<Duration, String>,
    faults: Vec<String>,
}

impl Row {
    fn line(&self) -> String {
        let build = match &self.build {
            Ok(took) => format!("{:.1}s", took.as_secs_f64()),
            Err(_) => "FAILED".to_owned(),
        };
        format!(
            "{:<36} {:<28} {:<44} rss +{:>3} MiB  fds {:>3}  threads {:>3}  tasks {:>4}  build {:>6}  {}",
            self.case,
            self.expected,
            self.seen,
            self.peak.rss.saturating_sub(self.baseline.rss) >> 20,
            self.peak.fds,
            self.peak.threads,
            self.peak.tasks,
            build,
            if self.faults.is_empty() {
                "ok".to_owned()
            } else {
                format!("FAULT: {}", self.faults.join("; "))
            }
        )
    }
}

/// The cases run so far in one test; printed as they go, judged at the end.
pub struct FaultTable {
    title: &'static str,
    rows: Vec<Row>,
}

impl FaultTable {
    /// An empty table for the test called `title`.
    pub fn new(title: &'static str) -> Self {
        println!(
            "fault table: {title}\n{:<36} {:<28} {:<44} peaks while attacked",
            "case", "expected", "seen"
        );
        Self {
            title,
            rows: Vec::new(),
        }
    }

    /// Runs `attack` on `arena`; while what it holds is held, runs a
    /// well-behaved build; samples the builder all along; records the row.
    /// A case passes when what it saw starts with `expected`, the build
    /// succeeded within [`BUILD_BOUND`], the status always answered, and
    /// the peaks stayed under the ceilings.
    pub async fn run(
        &mut self,
        arena: &Arena,
        case: &str,
        expected: &str,
        attack: impl Future<Output = Outcome>,
    ) {
        let probe = Probe::of(arena);
        let baseline = probe.sample().await;
        let (stop, stopped) = watch::channel(false);
        let sampler = tokio::spawn(probe.peaks(stopped));
        let (seen, held) = tokio::time::timeout(ATTACK_BOUND, attack)
            .await
            .unwrap_or_else(|_| {
                (
                    "the attack did not get into place".to_owned(),
                    Held::default(),
                )
            });
        let build = tokio::task::block_in_place(|| arena.well_behaved_build());
        held.release().await;
        let _ = stop.send(true);
        let peak = sampler.await.unwrap();
        let mut row = Row {
            case: case.to_owned(),
            expected: expected.to_owned(),
            seen,
            baseline,
            peak,
            build,
            faults: Vec::new(),
        };
        row.faults = judge(&row);
        println!("{}", row.line());
        self.rows.push(row);
    }

    /// Prints the whole table again and fails naming every case that did.
    pub fn finish(self) {
        println!("fault table: {} (all cases)", self.title);
        for row in &self.rows {
            println!("{}", row.line());
        }
        let failed: Vec<String> = self
            .rows
            .iter()
            .filter(|row| !row.faults.is_empty())
            .map(|row| format!("{}: {}", row.case, row.faults.join("; ")))
            .collect();
        assert!(failed.is_empty(), "cases failed:\n{}", failed.join("\n"));
    }
}

/// Why `row` failed, if it did.
fn judge(row: &Row) -> Vec<String> {
    let mut faults = Vec::new();
    if !row.seen.starts_with(&row.expected) {
        faults.push(format!("expected {}, saw {}", row.expected, row.seen));
    }
    match &row.build {
        Ok(took) if *took > BUILD_BOUND => {
            faults.push(format!("the well-behaved build took {took:?}"));
        }
        Ok(_) => {}
        Err(err) => faults.push(format!("the well-behaved build failed: {err}")),
    }
    let growth = row.peak.rss.saturating_sub(row.baseline.rss);
    if growth > RSS_GROWTH_CEILING {
        faults.push(format!("resident memory grew by {} MiB", growth >> 20));
    }
    if row.peak.fds > FD_CEILING {
        faults.push(format!("{} open files", row.peak.fds));
    }
    if row.peak.threads > THREAD_CEILING {
        faults.push(format!("{} threads", row.peak.threads));
    }
    if row.peak.tasks > TASK_CEILING {
        faults.push(format!("{} tasks", row.peak.tasks));
    }
    if !row.peak.answered {
        faults.push("the status did not answer within 3 s".to_owned());
    }
    faults
}

/// Serializes the suite's tests, so each case's figures are its own and
/// the two cores are not shared by several builders at once.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Counts, shared between an attack's tasks.
pub type Tally = Arc<Mutex<std::collections::BTreeMap<String, u32>>>;

/// Counts one more `key` in `tally`.
pub fn count(tally: &Tally, key: impl Into<String>) {
    *tally.lock().unwrap().entry(key.into()).or_default() += 1;
}

/// `tally` as `key ×count, …`.
pub fn tally_text(tally: &Tally) -> String {
    tally
        .lock()
        .unwrap()
        .iter()
        .map(|(key, count)| format!("{key} ×{count}"))
        .collect::<Vec<_>>()
        .join(", ")
}
