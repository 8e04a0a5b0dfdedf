//! `drv-thru --stdio --store NAME`: the program a machine line
//! `ssh-ng://localhost?remote-program=ABS/drv-thru&remote-store=NAME` makes
//! Nix start (Nix appends `--stdio --store NAME`), serving Nix's worker
//! protocol on stdin/stdout for the builder `NAME` of builders.json
//! ([`crate::client::stdio_store`]).

use std::{os::unix::process::CommandExt, process::ExitCode};

use anyhow::{Context, anyhow};

use super::Failure;
use crate::{client::stdio_store, config::SYSTEM_BUILDERS_FILE, transport::endpoint::RelayChoice};

/// The top-level options Nix passes to a machine line's remote program.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Serve Nix's worker protocol on stdin/stdout, as the remote program
    /// of a machine line `ssh-ng://localhost?remote-program=...&remote-store=NAME`.
    #[arg(long)]
    pub stdio: bool,

    /// With --stdio: the builder to build on, by its name in
    /// /etc/drv-thru/builders.json (the only builders file --stdio reads).
    #[arg(long, value_name = "NAME", requires = "stdio")]
    pub store: Option<String>,
}

/// Set by the process Nix starts for the child that serves: the process id
/// of Nix's build hook, whose connections share their outputs.
const HOOK_ENV: &str = "DRV_THRU_STDIO_HOOK";

/// Runs the process that serves and waits for it, unless this is that
/// process (`None`); returns its exit status.
///
/// Nix ends a connection by killing its process with SIGKILL, and kills
/// its build hook's whole process group, which leaves no time to close the
/// connection to the builder: the builder would keep the build running,
/// and the connection counted against this client's limit, until it timed
/// out. So the process Nix starts leaves the hook's process group and only
/// runs a child sharing its stdin and stdout. When Nix kills it, the child
/// sees stdin end and closes the connection at once, and the builder
/// cancels the build. Runs before any thread starts.
pub fn stand_in() -> Option<ExitCode> {
    if std::env::var_os(HOOK_ENV).is_some() {
        return None;
    }
    let hook = std::os::unix::process::parent_id();
    // Failing means it leads a group already: nothing to do.
    // SAFETY: setsid(2) changes no memory.
    unsafe { libc::setsid() };
    let mut args = std::env::args_os();
    // /proc/self/exe still runs this binary if a new one replaced it since.
    let status = std::process::Command::new("/proc/self/exe")
        .arg0(args.next().unwrap_or_else(|| "drv-thru".into()))
        .args(args)
        .env(HOOK_ENV, hook.to_string())
        .status();
    Some(match status {
        Ok(status) => ExitCode::from(
            status
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(2),
        ),
        Err(err) => {
            eprintln!("error: cannot start drv-thru's stdio server: {err}");
            ExitCode::from(2)
        }
    })
}

/// Serves Nix until it closes the connection.
pub async fn run(args: Args, relay: RelayChoice) -> Result<(), Failure> {
    let name = args.store.ok_or_else(|| {
        anyhow!(
            "no builder named: add `&remote-store=NAME` to the machine line, NAME being an entry of {SYSTEM_BUILDERS_FILE}"
        )
    })?;
    let hook = std::env::var(HOOK_ENV)
        .ok()
        .and_then(|hook| hook.parse().ok())
        .with_context(|| format!("{HOOK_ENV} does not hold a process id"))?;
    stdio_store::serve(&name, hook, relay, tokio::io::stdin(), tokio::io::stdout()).await?;
    Ok(())
}
