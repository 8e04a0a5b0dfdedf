//! `drv-thru --stdio --store NAME`: the program a machine line
//! `ssh-ng://localhost?remote-program=ABS/drv-thru&remote-store=NAME` makes
//! Nix start (Nix appends `--stdio --store NAME`), serving Nix's worker
//! protocol on stdin/stdout for the builder `NAME` of builders.json
//! ([`crate::client::stdio_store`]).

use anyhow::anyhow;

use super::Failure;
use crate::{client::stdio_store, config::SYSTEM_BUILDERS_FILE, transport::endpoint::RelayChoice};

/// The top-level options Nix passes to a machine line's remote program.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Serve Nix's worker protocol on stdin/stdout, as the remote program
    /// of a machine line `ssh-ng://localhost?remote-program=...&remote-store=NAME`.
    #[arg(long)]
    pub stdio: bool,

    /// With --stdio: the builders.json entry to build on.
    #[arg(long, value_name = "NAME", requires = "stdio")]
    pub store: Option<String>,
}

/// Serves Nix until it closes the connection.
pub async fn run(args: Args, relay: RelayChoice) -> Result<(), Failure> {
    let name = args.store.ok_or_else(|| {
        anyhow!(
            "no builder named: add `&remote-store=NAME` to the machine line, NAME being an entry of {SYSTEM_BUILDERS_FILE}"
        )
    })?;
    // Nix kills its build hook's whole process group with SIGKILL, which
    // would leave the builder to notice the lost connection only when it
    // times out. In a session of its own the program outlives the hook,
    // sees stdin end and closes the connection, so the builder cancels the
    // build at once. Failing means it leads a group already: nothing to do.
    // SAFETY: setsid(2) changes no memory.
    unsafe { libc::setsid() };
    stdio_store::serve(&name, relay, tokio::io::stdin(), tokio::io::stdout()).await?;
    Ok(())
}
