//! `drv-thru machines`: the lines of Nix's machines file that let Nix's
//! own scheduler offload builds to the configured builders.
//!
//! Each line names the drv-thru binary as the `remote-program` of an
//! `ssh-ng://localhost` store: for that host Nix runs no ssh but starts
//! `PROGRAM --stdio --store NAME` itself and speaks its worker protocol
//! over the pipe.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;

use super::Failure;
use crate::{
    config::{self, SYSTEM_BUILDERS_FILE},
    nix::machines::{MachineLine, Scheduling},
};

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// The drv-thru binary Nix's daemon starts [default: this one, with
    /// symlinks resolved]. Give a path that survives upgrades.
    #[arg(long, value_name = "PATH")]
    program: Option<PathBuf>,
    /// The builders file to read. The daemon's drv-thru reads only the
    /// system one, so that is the default.
    #[arg(long, value_name = "FILE", default_value = SYSTEM_BUILDERS_FILE)]
    builders_file: PathBuf,
    /// Print a JSON array of the builders with their lines.
    #[arg(long)]
    json: bool,
}

/// One builder as `--json` prints it.
#[derive(Debug, Serialize)]
struct Machine<'a> {
    name: &'a str,
    uri: String,
    #[serde(flatten)]
    scheduling: &'a Scheduling,
    line: String,
}

pub(super) fn run(args: Args) -> Result<(), Failure> {
    let program = match args.program {
        Some(program) => program,
        None => std::env::current_exe()
            .and_then(|exe| exe.canonicalize())
            .context("cannot find the path of this drv-thru binary; pass --program")?,
    };
    check_program(&program)?;
    let builders = config::all_builders(&args.builders_file)?;
    let machines: Vec<Machine<'_>> = builders
        .iter()
        .map(|builder| {
            let uri = store_uri(&program, &builder.name);
            let line = MachineLine {
                uri: &uri,
                scheduling: &builder.scheduling,
            }
            .to_string();
            Machine {
                name: &builder.name,
                uri,
                scheduling: &builder.scheduling,
                line,
            }
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&machines)?);
    } else {
        for machine in &machines {
            println!("{}", machine.line);
        }
    }
    Ok(())
}

/// The store URI that makes Nix run `program --stdio --store NAME`.
/// Builder names need no escaping: the builders file allows only
/// characters that stand for themselves here.
fn store_uri(program: &Path, name: &str) -> String {
    format!(
        "ssh-ng://localhost?remote-program={}&remote-store={name}",
        program.display()
    )
}

/// Refuses a program path Nix would not pass through unchanged: older Nix
/// runs it through `bash -c`, the URI's query is split at `&` and `=` and
/// percent-decoded, and the machines file splits at spaces, `#` and `;`.
fn check_program(program: &Path) -> anyhow::Result<()> {
    let text = program.to_string_lossy();
    if !program.is_absolute() {
        bail!(
            "the program path {text:?} must be absolute: Nix's daemon starts it from its own working directory"
        );
    }
    if !text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '+' | '-'))
    {
        bail!(
            "the program path {text:?} cannot go into a machine line (only letters, digits and / . _ + - can); pass --program with a path to drv-thru without other characters"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_uri_names_the_program_and_the_builder() {
        assert_eq!(
            store_uri(
                Path::new("/nix/store/abc-drv-thru-0.1.0/bin/drv-thru"),
                "big.box-1"
            ),
            "ssh-ng://localhost?remote-program=/nix/store/abc-drv-thru-0.1.0/bin/drv-thru&remote-store=big.box-1"
        );
    }

    #[test]
    fn program_paths_that_nix_would_change_are_refused() {
        assert!(check_program(Path::new("/usr/local/bin/drv-thru")).is_ok());
        for (path, needle) in [
            ("drv-thru", "must be absolute"),
            ("/opt/my tools/drv-thru", "cannot go into a machine line"),
            ("/opt/a&b/drv-thru", "cannot go into a machine line"),
            ("/opt/100%/drv-thru", "cannot go into a machine line"),
        ] {
            let err = check_program(Path::new(path)).unwrap_err().to_string();
            assert!(err.contains(needle), "{path}: {err}");
        }
    }
}
