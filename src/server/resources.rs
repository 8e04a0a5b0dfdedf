//! The server process's own resource use, read from `/proc/self`: what
//! status reports so that a peer making the builder spend memory, files or
//! tasks shows up (and what the adversarial suite and the soak watch).

use std::{fs, path::Path};

use crate::proto;

/// The process's resource use right now. A figure that cannot be read (no
/// `/proc`, outside a tokio runtime) is reported as 0.
pub fn sample() -> proto::ProcessResources {
    proto::ProcessResources {
        tasks: tokio::runtime::Handle::try_current()
            .map_or(0, |runtime| runtime.metrics().num_alive_tasks() as u64),
        ..of_process(Path::new("/proc/self"))
    }
}

/// The memory, open files and threads of the process whose `/proc`
/// directory is `proc_dir` (for `/proc/self`, the files include the one
/// reading the list). Tasks are 0: only the process itself can count them.
pub fn of_process(proc_dir: &Path) -> proto::ProcessResources {
    let status = fs::read_to_string(proc_dir.join("status")).unwrap_or_default();
    let (resident_bytes, threads) = parse_status(&status);
    proto::ProcessResources {
        resident_bytes,
        open_files: count_entries(&proc_dir.join("fd")),
        threads,
        tasks: 0,
    }
}

/// Resident bytes (`VmRSS`, which the kernel gives in kB) and threads
/// (`Threads`) from a `/proc/PID/status` text.
fn parse_status(status: &str) -> (u64, u32) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|value| value.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let threads = u32::try_from(field("Threads")).unwrap_or(u32::MAX);
    (field("VmRSS").saturating_mul(1024), threads)
}

/// The entries of `dir`.
fn count_entries(dir: &Path) -> u32 {
    let count = fs::read_dir(dir).map_or(0, Iterator::count);
    u32::try_from(count).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_bytes_and_threads() {
        let status = "Name:\tdrv-thru\nVmPeak:\t  99999 kB\nVmRSS:\t   41984 kB\n\
                      RssAnon:\t 1 kB\nThreads:\t7\n";
        assert_eq!(parse_status(status), (41984 * 1024, 7));
    }

    #[test]
    fn missing_or_garbled_fields_read_as_zero() {
        assert_eq!(parse_status(""), (0, 0));
        assert_eq!(parse_status("VmRSS:\tlots kB\nThreadsX:\t3\n"), (0, 0));
    }

    #[test]
    fn open_files_count_what_this_process_opens() {
        let files: Vec<fs::File> = (0..5)
            .map(|_| fs::File::open("/proc/self/status").unwrap())
            .collect();
        // Other tests in this binary open and close files concurrently, so
        // only a lower bound holds.
        assert!(sample().open_files >= 5);
        drop(files);
    }

    #[tokio::test]
    async fn a_live_process_reports_memory_threads_and_tasks() {
        let _task = tokio::spawn(std::future::pending::<()>());
        let now = sample();
        assert!(now.resident_bytes > 1 << 20, "{now:?}");
        assert!(now.threads >= 1, "{now:?}");
        assert!(now.tasks >= 1, "{now:?}");
    }
}
