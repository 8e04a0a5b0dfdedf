//! Timing a command and the statistics of its samples.

use std::{
    io::Read as _,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{MIB, builder::Builder, options::Case};

/// One timed command: wall time and, for drv-thru, its peak RSS.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    pub(crate) secs: f64,
    pub(crate) client_rss: Option<u64>,
    pub(crate) server_rss: Option<u64>,
    /// CPU seconds of the client and the processes it waited for (its Nix).
    pub(crate) client_cpu: f64,
    /// CPU seconds of the far end (drv-thru's builder, or sshd with its
    /// sessions and `nix-daemon --stdio`) and the processes it waited for.
    pub(crate) server_cpu: Option<f64>,
    /// CPU seconds of the `--link` line's threads.
    pub(crate) line_cpu: Option<f64>,
}

/// Who does the far end of a timed command's work.
#[derive(Clone, Copy)]
pub(crate) enum Remote<'a> {
    /// Nobody: `nix copy` from `file://`, local builds.
    None,
    Builder(&'a Builder),
    /// A server whose sessions are threads or child processes it reaps
    /// (python's http.server, sshd).
    Server(u32),
}

impl Remote<'_> {
    fn pid(self) -> Option<u32> {
        match self {
            Remote::None => None,
            Remote::Builder(builder) => Some(builder.pid()),
            Remote::Server(pid) => Some(pid),
        }
    }
}

/// Waits a while for `pid`'s child processes to end, so their CPU time is
/// in its own: sshd reaps a session only after the client has gone.
fn wait_for_children(pid: u32) {
    let children = format!("/proc/{pid}/task/{pid}/children");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match std::fs::read_to_string(&children) {
            Ok(list) if !list.trim().is_empty() => thread::sleep(Duration::from_millis(10)),
            _ => return,
        }
    }
}

/// CPU seconds `pid` and its reaped children have used, from
/// `/proc/PID/stat` (utime, stime, cutime, cstime).
pub(crate) fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces, start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some(ticks as f64 / clock_ticks())
}

/// CPU seconds used by this process's reaped children so far.
pub(crate) fn children_cpu_secs() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid rusage for getrusage to fill.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

pub(crate) fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// `VmHWM` of `pid` in bytes.
pub(crate) fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets `VmHWM` of `pid` to its current RSS (`clear_refs` value 5).
pub(crate) fn reset_hwm(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Runs `command` to completion, sampling the child's peak RSS.
pub(crate) fn timed(mut command: Command, what: &str, remote: Remote<'_>) -> Sample {
    let server = match remote {
        Remote::Builder(builder) => Some(builder),
        _ => None,
    };
    if let Some(server) = server {
        reset_hwm(server.pid());
    }
    let server_cpu_before = remote.pid().and_then(cpu_secs);
    let client_cpu_before = children_cpu_secs();
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("{what}: {err}"));
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        thread::spawn(move || {
            let mut peak = None;
            while !done.load(Ordering::Relaxed) {
                if let Some(hwm) = vm_hwm(pid) {
                    peak = Some(hwm.max(peak.unwrap_or(0)));
                }
                thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut out = String::new();
    let _ = stdout.read_to_string(&mut out);
    let status = child.wait().expect("waiting for a child");
    let secs = start.elapsed().as_secs_f64();
    if let Remote::Server(pid) = remote {
        wait_for_children(pid);
    }
    done.store(true, Ordering::Relaxed);
    let client_rss = sampler.join().expect("sampler");
    let err = err_reader.join().expect("stderr reader");
    if !status.success() {
        let log = server.map_or(String::new(), |s| {
            let log = s.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines.len().saturating_sub(40);
            format!("\nbuilder log (last lines):\n{}", lines[tail..].join("\n"))
        });
        panic!("{what} failed ({status}):\n{err}{log}");
    }
    Sample {
        secs,
        client_rss,
        server_rss: server.and_then(|s| vm_hwm(s.pid())),
        client_cpu: children_cpu_secs() - client_cpu_before,
        server_cpu: remote
            .pid()
            .and_then(cpu_secs)
            .zip(server_cpu_before)
            .map(|(after, before)| after - before),
        line_cpu: None,
    }
}

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

pub(crate) fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The timings of one method in one case.
#[derive(Debug, Clone)]
pub(crate) struct Measured {
    pub(crate) case: Case,
    pub(crate) method: String,
    /// Which drv-thru build was measured, if any.
    pub(crate) variant: Option<usize>,
    pub(crate) bytes: u64,
    pub(crate) samples: Vec<Sample>,
}

impl Measured {
    pub(crate) fn secs(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.secs).collect()
    }

    pub(crate) fn median(&self) -> f64 {
        median(&self.secs())
    }

    pub(crate) fn mib_s(&self) -> f64 {
        self.bytes as f64 / MIB / self.median()
    }

    /// The median CPU seconds per GiB moved that `pick` finds.
    pub(crate) fn per_gib(&self, pick: fn(&Sample) -> Option<f64>) -> Option<f64> {
        let gib = self.bytes as f64 / (1u64 << 30) as f64;
        (gib > 0.0)
            .then(|| self.median_of(pick))
            .flatten()
            .map(|secs| secs / gib)
    }

    /// The median of what `pick` finds in the samples that have it.
    pub(crate) fn median_of(&self, pick: fn(&Sample) -> Option<f64>) -> Option<f64> {
        let values: Vec<f64> = self.samples.iter().filter_map(pick).collect();
        (!values.is_empty()).then(|| median(&values))
    }
}

/// The concurrency case's findings per run.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConcurrentRun {
    pub(crate) total: f64,
    pub(crate) per_build: Vec<f64>,
    pub(crate) finished: usize,
    pub(crate) fifo: bool,
    pub(crate) queued: usize,
    pub(crate) idle_after: bool,
}
