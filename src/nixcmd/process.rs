//! Starting Nix processes with a controlled environment, and collecting what they print.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitStatus, Stdio};

use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, BufReader};
use tokio::process::Command;

use super::{Nix, NixCmdError};

/// Most stdout bytes kept from a command whose output is parsed.
pub(super) const MAX_STDOUT: usize = 256 * 1024 * 1024;

/// Lines of stderr kept for error messages.
pub(super) const STDERR_TAIL_LINES: usize = 40;

/// Longest stderr line kept for error messages, in bytes; the rest of a longer line is dropped.
const STDERR_LINE_BYTES: usize = 2000;

/// Longest line of a build log handed on, in bytes; the rest of a longer line is dropped.
pub(super) const MAX_LOG_LINE: usize = 64 * 1024;

/// Arguments shown in an error message before the rest are summarised.
const SHOWN_ARGS: usize = 24;

/// The Nix programs this module runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Program {
    /// `nix`, the new command line.
    Nix,
    /// `nix-store`, the legacy store command.
    NixStore,
    /// `nix-daemon`, spoken to over its stdin and stdout.
    NixDaemon,
}

impl Program {
    /// The program's file name.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Nix => "nix",
            Self::NixStore => "nix-store",
            Self::NixDaemon => "nix-daemon",
        }
    }
}

/// A program with its full argument vector; displays like a shell command line (for messages
/// only: it is never given to a shell).
#[derive(Debug, Clone)]
pub(super) struct CommandLine {
    pub(super) program: Program,
    pub(super) args: Vec<OsString>,
}

impl CommandLine {
    pub(super) fn new(program: Program, args: Vec<OsString>) -> Self {
        Self { program, args }
    }
}

impl fmt::Display for CommandLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.program.name())?;
        for (i, arg) in self.args.iter().enumerate().take(SHOWN_ARGS) {
            // `--option NAME VALUE` where NAME may hold a credential (`access-tokens`, …).
            let secret = i >= 2
                && self.args[i - 2] == "--option"
                && is_secret_setting(&self.args[i - 1].to_string_lossy());
            if secret {
                f.write_str(" [redacted]")?;
            } else {
                write!(f, " {}", quote(&arg.to_string_lossy()))?;
            }
        }
        if self.args.len() > SHOWN_ARGS {
            write!(f, " … ({} more arguments)", self.args.len() - SHOWN_ARGS)?;
        }
        Ok(())
    }
}

/// Whether a Nix setting's value may be a credential, so it is never shown.
fn is_secret_setting(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["token", "secret", "password", "netrc", "credential"]
        .iter()
        .any(|word| name.contains(word))
}

/// Quotes an argument the way a POSIX shell would need it, if it needs it.
fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._+-=,@:%^!#".contains(&b));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// What a finished command printed, and how it ended.
#[derive(Debug)]
pub(super) struct Output {
    pub(super) status: ExitStatus,
    pub(super) stdout: Vec<u8>,
    pub(super) stderr: String,
}

impl Output {
    pub(super) fn success(&self) -> bool {
        self.status.success()
    }

    pub(super) fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// The error for a command that failed.
    pub(super) fn failure(&self, line: &CommandLine) -> NixCmdError {
        NixCmdError::Failed {
            command: line.to_string(),
            status: describe_status(self.status),
            stderr: self.stderr.clone(),
        }
    }

    /// The error for output that cannot be read.
    pub(super) fn parse_error(&self, line: &CommandLine, reason: String) -> NixCmdError {
        NixCmdError::Parse {
            command: line.to_string(),
            reason,
            stderr: self.stderr.clone(),
        }
    }
}

/// `exited with code N` or `was killed by signal N`.
pub(super) fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => format!("ended with status {status}"),
    }
}

/// The last lines of a stream, each bounded, colour codes removed.
#[derive(Debug, Default)]
pub(super) struct Tail {
    lines: VecDeque<String>,
}

impl Tail {
    pub(super) fn push(&mut self, line: &str) {
        let line = super::log::strip_controls(line.trim_end());
        let line = truncate(&line, STDERR_LINE_BYTES);
        if self.lines.len() == STDERR_TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// The kept lines joined, with leading and trailing blank lines removed.
    pub(super) fn text(&self) -> String {
        let joined: Vec<&str> = self.lines.iter().map(String::as_str).collect();
        joined.join("\n").trim().to_owned()
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
pub(super) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Reads one line of at most `max` bytes into `buf` (without the newline); the rest of a longer
/// line is skipped. Returns `false` at the end of the stream with nothing read.
pub(super) async fn read_bounded_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    buf.clear();
    let mut any = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(any);
        }
        any = true;
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let consumed = done.unwrap_or(available.len());
        reader.consume(consumed);
        if done.is_some() {
            return Ok(true);
        }
    }
}

/// Collects the tail of a stderr stream until it ends.
pub(super) async fn collect_tail<R: AsyncRead + Unpin>(stream: R) -> std::io::Result<Tail> {
    let mut reader = BufReader::new(stream);
    let mut tail = Tail::default();
    let mut buf = Vec::new();
    while read_bounded_line(&mut reader, &mut buf, STDERR_LINE_BYTES).await? {
        tail.push(&String::from_utf8_lossy(&buf));
    }
    Ok(tail)
}

/// Reads a whole stream, failing once it exceeds `limit` bytes.
pub(super) async fn read_limited<R: AsyncRead + Unpin>(
    stream: R,
    limit: usize,
) -> std::io::Result<Result<Vec<u8>, ()>> {
    let mut out = Vec::new();
    let mut limited = stream.take(limit as u64 + 1);
    limited.read_to_end(&mut out).await?;
    Ok(if out.len() > limit { Err(()) } else { Ok(out) })
}

impl Nix {
    /// The value of `key` in the environment of the commands this handle runs.
    pub(super) fn env_value(&self, key: &str) -> Option<OsString> {
        let config = &self.config;
        let set = config.env.iter().rev().find(|(k, _)| k == key);
        match set {
            Some((_, value)) => Some(value.clone()),
            None if config.passthrough.iter().any(|k| k == key) => std::env::var_os(key),
            None => None,
        }
    }

    /// A tokio command for `line` with the handle's program location, environment and
    /// credentials; stdin is closed, stdout and stderr are piped, and the child is killed if
    /// dropped.
    pub(super) fn tokio_command(&self, line: &CommandLine) -> Command {
        let config = &self.config;
        let mut command = Command::new(self.program_path(line.program));
        command.args(&line.args);
        command.env_clear();
        for key in &config.passthrough {
            if let Some(value) = std::env::var_os(key) {
                command.env(key, value);
            }
        }
        for (key, value) in &config.env {
            command.env(key, value);
        }
        if let Some((uid, gid)) = config.credentials {
            command.uid(uid).gid(gid);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Starts `line` (see [`Self::tokio_command`]).
    pub(super) fn spawn(&self, line: &CommandLine) -> Result<tokio::process::Child, NixCmdError> {
        self.tokio_command(line)
            .spawn()
            .map_err(|source| NixCmdError::Spawn {
                command: line.to_string(),
                source,
            })
    }

    /// Runs a command to the end, collecting stdout (bounded) and the tail of stderr, once
    /// one of the handle's turns is free.
    pub(super) async fn run(&self, line: &CommandLine) -> Result<Output, NixCmdError> {
        // The semaphore is never closed.
        let _turn = self.config.turns.acquire().await;
        let mut child = self.spawn(line)?;
        let io_error = |source| NixCmdError::Io {
            command: line.to_string(),
            source,
        };
        let stdout = child.stdout.take().expect("stdout was piped");
        let stderr = child.stderr.take().expect("stderr was piped");
        let (stdout, tail) =
            tokio::try_join!(read_limited(stdout, MAX_STDOUT), collect_tail(stderr))
                .map_err(io_error)?;
        let status = child.wait().await.map_err(io_error)?;
        let stdout = stdout.map_err(|()| NixCmdError::OutputTooLarge {
            command: line.to_string(),
            limit: MAX_STDOUT,
        })?;
        tracing::debug!(command = %line, status = %describe_status(status), "nix command finished");
        Ok(Output {
            status,
            stdout,
            stderr: tail.text(),
        })
    }

    /// Runs a command that must succeed.
    pub(super) async fn run_ok(&self, line: &CommandLine) -> Result<Output, NixCmdError> {
        let output = self.run(line).await?;
        if output.success() {
            Ok(output)
        } else {
            Err(output.failure(line))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(
            quote("/nix/store/x-a.drv!out,dev"),
            "/nix/store/x-a.drv!out,dev"
        );
        assert_eq!(quote("path:/d#attr"), "path:/d#attr");
        assert_eq!(quote("nix-command flakes"), "'nix-command flakes'");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn credentials_in_options_are_not_shown() {
        let args = [
            "--option",
            "access-tokens",
            "github.com=ghp_x",
            "--option",
            "cores",
            "2",
        ]
        .map(OsString::from)
        .to_vec();
        let line = CommandLine::new(Program::Nix, args).to_string();
        assert_eq!(
            line,
            "nix --option access-tokens [redacted] --option cores 2"
        );
    }

    #[test]
    fn long_command_lines_are_summarised() {
        let args = (0..30).map(|i| OsString::from(format!("a{i}"))).collect();
        let line = CommandLine::new(Program::NixStore, args).to_string();
        assert!(line.starts_with("nix-store a0 a1 "));
        assert!(line.ends_with("a23 … (6 more arguments)"), "{line}");
    }

    #[test]
    fn tail_keeps_the_last_lines_bounded() {
        let mut tail = Tail::default();
        for i in 0..100 {
            tail.push(&format!("line {i}\n"));
        }
        tail.push(&"x".repeat(5000));
        tail.push("\u{1b}[31;1merror:\u{1b}[0m boom");
        let text = tail.text();
        assert_eq!(text.lines().count(), STDERR_TAIL_LINES);
        assert!(text.starts_with("line 62\n"));
        assert!(text.ends_with("…\nerror: boom"), "{text}");
        assert_eq!(Tail::default().text(), "");
    }

    #[test]
    fn truncates_at_character_boundaries() {
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("aüb", 2), "a…");
        assert_eq!(truncate("aüb", 3), "aü…");
    }

    #[tokio::test]
    async fn bounded_lines() {
        let data = b"short\nthis line is too long\n\nlast".as_slice();
        let mut reader = BufReader::with_capacity(4, data);
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        while read_bounded_line(&mut reader, &mut buf, 8).await.unwrap() {
            lines.push(String::from_utf8(buf.clone()).unwrap());
        }
        assert_eq!(lines, ["short", "this lin", "", "last"]);
    }

    #[tokio::test]
    async fn limited_reads() {
        assert_eq!(
            read_limited(&b"abc"[..], 3).await.unwrap(),
            Ok(b"abc".to_vec())
        );
        assert_eq!(read_limited(&b"abcd"[..], 3).await.unwrap(), Err(()));
    }

    #[test]
    fn statuses_read_well() {
        assert_eq!(
            describe_status(ExitStatus::from_raw(256)),
            "exited with code 1"
        );
        assert_eq!(
            describe_status(ExitStatus::from_raw(9)),
            "was killed by signal 9"
        );
    }
}
