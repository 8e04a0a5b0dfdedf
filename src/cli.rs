//! The command line: parsing, logging setup and dispatch to one module per
//! subcommand.

mod build;
mod import_helper;
mod key;
mod machines;
mod nix_stdio;
mod serve;
mod status;
mod ticket;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::{config::DEFAULT_DATA_DIR, transport::endpoint::RelayChoice};

/// Peer-to-peer remote Nix builds over Iroh.
///
/// A builder runs `drv-thru serve`; its admin hands out one-time tickets
/// (`drv-thru ticket create`) or trusts a client's key for good. Clients
/// build on it with a ticket or as a trusted client, and get the outputs
/// back as store paths signed by the builder.
#[derive(Debug, Parser)]
#[command(
    name = "drv-thru",
    version,
    propagate_version = true,
    max_term_width = 100,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// More log output on stderr (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Relays: `default` (n0's public relays and address lookup),
    /// `disabled` (direct addresses only, fully offline) or a relay URL.
    #[arg(long, global = true, env = "DRV_THRU_RELAY", value_name = "MODE|URL")]
    relay: Option<RelayChoice>,

    #[command(flatten)]
    stdio: nix_stdio::Args,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build an installable on a remote builder and import the signed outputs.
    ///
    /// Evaluates locally, skips the builder when the outputs are already
    /// valid here, uploads only the inputs the builder lacks, streams the
    /// build log, and imports the outputs through Nix's signature checks.
    /// Prints the output paths on stdout and creates a `result` link.
    /// Exit status: 0 built, 1 the build failed, 2 any other error.
    Build(Box<build::Args>),
    /// Run a builder.
    Serve(serve::Args),
    /// Create and manage build tickets (on the builder).
    #[command(subcommand)]
    Ticket(ticket::Command),
    /// Show a builder's active builds, queue and recent results.
    Status(status::Args),
    /// Manage this client's Iroh key.
    #[command(subcommand)]
    Key(key::Command),
    /// Print `/etc/nix/machines` lines that offload Nix's builds to the
    /// builders of /etc/drv-thru/builders.json.
    ///
    /// Nix's own scheduler then picks among them by system, features,
    /// max jobs and speed factor, for `nix build` and everything else.
    Machines(machines::Args),
    /// Run the root import helper for users Nix does not trust (on a client).
    ///
    /// Imports builder outputs signed by an allowlisted key, from a loopback
    /// cache, for members of its group; `build` uses it when needed.
    ImportHelper(import_helper::Args),
}

/// Where the builder keeps its state, shared by the builder-side commands.
#[derive(Debug, Clone, clap::Args)]
struct DataDirArg {
    /// The builder's state directory (keys, tickets, admin socket).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR, env = "DRV_THRU_DATA_DIR")]
    data_dir: PathBuf,
}

/// How a command failed, for the exit code.
#[derive(Debug)]
pub enum Failure {
    /// A usage, configuration, network or server problem (exit 2).
    Error(anyhow::Error),
    /// The build itself failed (exit 1); the message is the builder's.
    BuildFailed(String),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(err: E) -> Self {
        Self::Error(err.into())
    }
}

fn init_logging(verbose: u8, default: &str) {
    let filter = match verbose {
        0 => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
        1 => EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("drv_thru=debug,iroh=info")),
        _ => EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("drv_thru=trace,iroh=debug")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Keeps glibc's malloc to two arenas unless `MALLOC_ARENA_MAX` says
/// otherwise; runs first, before any thread starts.
///
/// By default every thread that allocates may get an arena of its own (up
/// to eight per core), each keeping what was freed in it. NAR buffers are
/// allocated on one runtime or blocking-pool thread and freed on another,
/// so freed memory piles up in many arenas: the builder's peak RSS for a
/// 1 GiB upload after the download cases fell from 73.7 to 59.2 MiB with
/// two, at the same speed (docs/performance.md, "Two malloc arenas").
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: no other thread exists yet to allocate concurrently.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Parses the command line, runs the command and reports its outcome.
pub fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    if cli.command.is_none() && !cli.stdio.stdio {
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingSubcommand,
                "a command is needed (see --help)",
            )
            .exit();
    }
    if cli.command.is_none()
        && let Some(code) = nix_stdio::stand_in()
    {
        return code;
    }
    // The server's log is its interface; a client command logs only
    // warnings unless asked.
    let default_filter = match cli.command {
        Some(Command::Serve(_) | Command::ImportHelper(_)) => "drv_thru=info,iroh=warn",
        _ => "drv_thru=warn,iroh=error",
    };
    init_logging(cli.verbose, default_filter);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    let relay = cli.relay.clone().unwrap_or_default();
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Build(args)) => build::run(*args, relay.clone()).await,
            Some(Command::Serve(args)) => serve::run(args, cli.relay).await,
            Some(Command::Ticket(command)) => ticket::run(command).await,
            Some(Command::Status(args)) => status::run(args, relay).await,
            Some(Command::Key(command)) => key::run(command),
            Some(Command::Machines(args)) => machines::run(args),
            Some(Command::ImportHelper(args)) => import_helper::run(args).await,
            None => nix_stdio::run(cli.stdio.clone(), relay).await,
        }
    });
    // Tokio reads stdin on a blocking thread the runtime would wait for on
    // drop, while Nix may keep the pipe open.
    if cli.stdio.stdio {
        runtime.shutdown_background();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Error(err)) => {
            report(&err, cli.verbose > 0);
            ExitCode::from(2)
        }
        Err(Failure::BuildFailed(message)) => {
            eprintln!("error: the build failed on the builder: {message}");
            ExitCode::from(1)
        }
    }
}

/// Prints an error as one line, or with its causes one per line when
/// verbose. A closed stdout (`| head`) is not an error worth a message.
fn report(err: &anyhow::Error, verbose: bool) {
    if err
        .downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    {
        return;
    }
    if verbose {
        eprintln!("error: {err}");
        for cause in err.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
    } else {
        eprintln!("error: {err:#}");
    }
}
