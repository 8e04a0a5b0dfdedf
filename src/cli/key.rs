//! `drv-thru key`: this client's Iroh identity, or the machine's.

use std::path::PathBuf;

use anyhow::{anyhow, bail};

use super::Failure;
use crate::{config::MACHINE_KEY_FILE, keys};

#[derive(Debug, clap::Subcommand)]
pub(super) enum Command {
    /// Print this client's endpoint id, for a builder's trustedClients or
    /// `ticket create --bind-client`. Creates the key on first use.
    Show {
        /// The key file [default: $XDG_CONFIG_HOME/drv-thru/secret.key].
        #[arg(long, value_name = "FILE", conflicts_with = "machine")]
        key_file: Option<PathBuf>,
        /// Print the machine's endpoint id instead: the key Nix's daemon
        /// offloads builds with (/etc/drv-thru/machine.key). Needs root.
        #[arg(long)]
        machine: bool,
    },
}

pub(super) fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Show { key_file, machine } => {
            let path = if machine {
                machine_key_path()?
            } else {
                key_file
                    .or_else(keys::default_client_key_path)
                    .ok_or_else(|| {
                        anyhow!("neither XDG_CONFIG_HOME nor HOME is set; pass --key-file")
                    })?
            };
            let key = keys::load_or_create_endpoint_key(&path).map_err(anyhow::Error::from)?;
            println!("{}", key.public());
            Ok(())
        }
    }
}

/// The machine key's file, checked up front to be root's business: as
/// another user, reading or creating it would fail with a bare
/// "permission denied".
fn machine_key_path() -> anyhow::Result<PathBuf> {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the machine key {MACHINE_KEY_FILE} belongs to root: run `sudo drv-thru key show --machine`"
        );
    }
    Ok(PathBuf::from(MACHINE_KEY_FILE))
}
