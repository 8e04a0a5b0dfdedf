//! `drv-thru import-helper`: serve the root import helper on a unix socket.

use std::path::PathBuf;

use super::Failure;
use crate::helper::{self, DEFAULT_SOCKET, HelperOptions};

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// The unix socket to serve on. It is created mode 0660, so only the
    /// owner and the group can connect.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,

    /// The allowlist: builder signing public keys (NAME:BASE64), one per
    /// line; blank lines and lines starting with `#` are ignored. Re-read on
    /// SIGHUP (a bad file then keeps the previous list).
    #[arg(long, value_name = "FILE")]
    trusted_public_key_file: PathBuf,

    /// The group (name or id) whose members may use the helper; the socket
    /// is given to it [default: the helper's own group].
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
}

pub(super) async fn run(args: Args) -> Result<(), Failure> {
    helper::run(HelperOptions {
        socket: args.socket,
        allowlist_file: args.trusted_public_key_file,
        group: args.group,
    })
    .await?;
    Ok(())
}
