//! Streaming a store path's NAR out of `nix-store --dump`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::process::{Child, ChildStdout};
use tokio::task::JoinHandle;

use super::process::{CommandLine, Tail, collect_tail, describe_status};
use super::{Nix, NixCmdError};

type Finish = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// The NAR of a store path as `nix-store --dump` writes it.
///
/// Reading returns the NAR bytes; the read that reaches the end waits for the process and fails
/// (with a [`NixCmdError`] inside the `io::Error`) if it did not exit successfully, so a stream
/// read to the end without error is a complete NAR. Dropping the stream kills the process.
pub struct NarDump {
    stdout: ChildStdout,
    child: Option<Child>,
    stderr: Option<JoinHandle<io::Result<Tail>>>,
    line: CommandLine,
    finish: Option<Finish>,
    done: bool,
}

impl std::fmt::Debug for NarDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NarDump")
            .field("command", &self.line.to_string())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl NarDump {
    pub(super) fn spawn(nix: &Nix, line: CommandLine) -> Result<Self, NixCmdError> {
        let mut child = nix.spawn(&line)?;
        let stdout = child.stdout.take().expect("stdout was piped");
        let stderr = child.stderr.take().expect("stderr was piped");
        Ok(Self {
            stdout,
            child: Some(child),
            stderr: Some(tokio::spawn(collect_tail(stderr))),
            line,
            finish: None,
            done: false,
        })
    }

    /// The future that waits for the process once stdout has ended.
    fn finish(&mut self) -> Finish {
        let child = self.child.take();
        let stderr = self.stderr.take();
        let command = self.line.to_string();
        Box::pin(async move {
            let io_error = |source| {
                io::Error::other(NixCmdError::Io {
                    command: command.clone(),
                    source,
                })
            };
            let Some(mut child) = child else {
                return Ok(());
            };
            let status = child.wait().await.map_err(io_error)?;
            let tail = match stderr {
                Some(task) => task
                    .await
                    .map_err(|e| io_error(io::Error::other(e)))?
                    .map_err(io_error)?,
                None => Tail::default(),
            };
            if status.success() {
                Ok(())
            } else {
                Err(io::Error::other(NixCmdError::Failed {
                    command: command.clone(),
                    status: describe_status(status),
                    stderr: tail.text(),
                }))
            }
        })
    }
}

impl AsyncRead for NarDump {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(Ok(()));
        }
        if this.finish.is_none() {
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.stdout).poll_read(cx, buf))?;
            if buf.filled().len() > before || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            this.finish = Some(this.finish());
        }
        let finish = this.finish.as_mut().expect("set above");
        let result = ready!(finish.as_mut().poll(cx));
        this.finish = None;
        this.done = true;
        Poll::Ready(result)
    }
}
