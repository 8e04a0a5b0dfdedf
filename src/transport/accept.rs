//! Pacing an accept loop while the process is out of file descriptors.
//!
//! A listener with a connection in its backlog stays readable, so a loop
//! that calls `accept` again at once after `EMFILE` spins at full CPU (and
//! logs at full speed) without ever freeing the descriptor it lacks. A
//! loop paced by [`AcceptPacing`] instead sleeps, 100 ms at first and up to
//! 1 s, says so once, and says so again when it accepts once more.
//!
//! Iroh connections need no accept of this kind: they all share the
//! endpoint's UDP sockets.

use std::{io, time::Duration};

use tracing::{info, warn};

/// The first pause after running out.
const FIRST_PAUSE: Duration = Duration::from_millis(100);

/// The longest pause: how late, at worst, accepting resumes once
/// descriptors are free again.
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// The state of one accept loop.
#[derive(Debug)]
pub struct AcceptPacing {
    /// What accepts, for the log.
    name: &'static str,
    /// The next pause, while accepts fail for want of descriptors.
    pause: Option<Duration>,
}

impl AcceptPacing {
    /// Pacing for the loop accepting on `name` (for the log).
    pub fn new(name: &'static str) -> Self {
        Self { name, pause: None }
    }

    /// After `accept` failed with `err`: if the process or the system is out
    /// of descriptors (or of memory for one), waits before the next try and
    /// returns `true`; otherwise returns `false` at once, for the caller to
    /// deal with `err`.
    pub async fn failed(&mut self, err: &io::Error) -> bool {
        if !is_exhaustion(err) {
            return false;
        }
        let pause = match self.pause {
            None => {
                warn!(
                    "{}: cannot accept connections ({err}); pausing until descriptors are free",
                    self.name
                );
                FIRST_PAUSE
            }
            Some(pause) => pause,
        };
        self.pause = Some((pause * 2).min(LONGEST_PAUSE));
        tokio::time::sleep(pause).await;
        true
    }

    /// After `accept` succeeded.
    pub fn accepted(&mut self) {
        if self.pause.take().is_some() {
            info!("{}: accepting connections again", self.name);
        }
    }
}

/// Whether `err` is an accept failing for want of descriptors or memory,
/// which persists until something is freed, unlike a connection aborted
/// before it was accepted.
fn is_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pauses_grow_to_a_second_and_start_over_after_an_accept() {
        let mut pacing = AcceptPacing::new("test");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let mut pauses = Vec::new();
        for _ in 0..6 {
            let start = tokio::time::Instant::now();
            assert!(pacing.failed(&emfile).await);
            pauses.push(start.elapsed().as_millis());
        }
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000]);
        pacing.accepted();
        let start = tokio::time::Instant::now();
        assert!(
            pacing
                .failed(&io::Error::from_raw_os_error(libc::ENFILE))
                .await
        );
        assert_eq!(start.elapsed().as_millis(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn other_failures_are_left_to_the_caller_at_once() {
        let mut pacing = AcceptPacing::new("test");
        let start = tokio::time::Instant::now();
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert!(!pacing.failed(&aborted).await);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
