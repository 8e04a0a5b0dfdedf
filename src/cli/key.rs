//! `drv-thru key`: this client's Iroh identity.

use std::path::PathBuf;

use anyhow::anyhow;

use super::Failure;
use crate::keys;

#[derive(Debug, clap::Subcommand)]
pub(super) enum Command {
    /// Print this client's endpoint id, for a builder's trustedClients or
    /// `ticket create --bind-client`. Creates the key on first use.
    Show {
        /// The key file [default: $XDG_CONFIG_HOME/drv-thru/secret.key].
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
    },
}

pub(super) fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Show { key_file } => {
            let path = key_file
                .or_else(keys::default_client_key_path)
                .ok_or_else(|| {
                    anyhow!("neither XDG_CONFIG_HOME nor HOME is set; pass --key-file")
                })?;
            let key = keys::load_or_create_endpoint_key(&path).map_err(anyhow::Error::from)?;
            println!("{}", key.public());
            Ok(())
        }
    }
}
