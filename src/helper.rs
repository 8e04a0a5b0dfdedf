//! The import helper: the only code that imports into the local store on
//! behalf of users Nix does not trust.
//!
//! On a multi-user Nix machine an ordinary user cannot import paths signed
//! by a key the daemon does not trust. The helper runs as root on a unix
//! socket only its group can reach ([`DEFAULT_SOCKET`]) and serves the
//! `drvthru.v1.ImportHelper` service: given a builder key, a loopback cache
//! URL and exact store paths, it runs
//! `nix copy --from URL --option trusted-public-keys KEY --option require-sigs true PATHS`
//! through [`crate::nixcmd`], so Nix itself checks every path's signature
//! against that one key. Before Nix runs:
//!
//! - `auth`: the caller must be root, the helper's user or in its group
//!   (kernel credentials of the socket peer; logged with every request);
//! - [`request`]: the key must be written exactly and be on the
//!   [`allowlist`], the URL must be `http://127.0.0.1:PORT` or
//!   `http://[::1]:PORT`, and every path an exact store path, at most
//!   [`MAX_PATHS`] of them.
//!
//! Nix then reads through `filter`, the helper's own loopback cache in front
//! of the caller's: it passes only narinfos whose NAR is a plain file under
//! `nar/`, and follows no redirect, since signatures do not cover the URL.
//!
//! Refusals and failures map to gRPC codes in [`error`](mod@error) only.
//! [`client`] is the CLI's side of the protocol.

pub mod allowlist;
mod auth;
pub mod client;
pub mod error;
mod filter;
pub mod request;
pub(crate) mod service;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tracing::{error, info, warn};

use self::auth::{CallerLayer, CallerPolicy};
pub use self::{
    allowlist::{Allowlist, SharedAllowlist},
    error::HelperError,
    service::ImportHelperService,
};
use crate::{nixcmd::Nix, proto::import_helper_server::ImportHelperServer, transport};

/// Where the helper listens unless told otherwise, and where clients look
/// for it.
pub const DEFAULT_SOCKET: &str = "/run/drv-thru/import-helper.sock";

/// The environment variable that points clients at another socket.
pub const SOCKET_ENV: &str = "DRV_THRU_IMPORT_HELPER_SOCKET";

/// Most store paths in one import request.
pub const MAX_PATHS: usize = 10_000;

/// Largest request the helper decodes: room for [`MAX_PATHS`] paths of the
/// longest length Nix allows, and no more.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// How to run the helper.
#[derive(Debug, Clone)]
pub struct HelperOptions {
    /// The socket to serve on.
    pub socket: PathBuf,
    /// The allowlist file, re-read on SIGHUP.
    pub allowlist_file: PathBuf,
    /// The group whose members may call (a name or a numeric id); the
    /// socket is given to it. Without one, the helper's own group.
    pub group: Option<String>,
}

/// Serves the helper until SIGINT or SIGTERM, re-reading the allowlist on
/// SIGHUP; removes the socket on the way out.
pub async fn run(options: HelperOptions) -> anyhow::Result<()> {
    // Installed first: a signal that arrives once we report readiness must
    // be handled, not take the default action.
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;

    let list = Allowlist::load(&options.allowlist_file)?;
    if list.is_empty() {
        warn!(file = %options.allowlist_file.display(), "the allowlist is empty; every import will be refused");
    }
    let keys = list.len();
    let allowlist = Arc::new(SharedAllowlist::new(list));
    let (gid, group_name) = match &options.group {
        Some(group) => (resolve_group(group)?, Some(group.clone())),
        // SAFETY: getegid cannot fail and touches no memory.
        None => (unsafe { libc::getegid() }, None),
    };
    let policy = CallerPolicy {
        // SAFETY: geteuid cannot fail and touches no memory.
        helper_uid: unsafe { libc::geteuid() },
        gid,
        group_name,
    };

    let socket = &options.socket;
    let (listener, _socket) = bind(socket, options.group.is_some().then_some(gid))?;
    info!(socket = %socket.display(), gid, keys, "import helper ready");

    let service = ImportHelperService::new(allowlist.clone(), Nix::new());
    let shutdown = CancellationToken::new();
    let serving = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(16)
        .layer(CallerLayer::new(std::sync::Arc::new(policy)))
        .add_service(ImportHelperServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES))
        .serve_with_incoming_shutdown(
            transport::unix::incoming(listener),
            shutdown.clone().cancelled_owned(),
        );
    let signals = async {
        loop {
            tokio::select! {
                _ = interrupt.recv() => break,
                _ = terminate.recv() => break,
                _ = hangup.recv() => reload(&allowlist, &options.allowlist_file),
            }
        }
        info!("shutting down");
        shutdown.cancel();
    };
    let (served, ()) = tokio::join!(serving, signals);
    served.context("serving the import helper socket")
}

/// Re-reads the allowlist; a bad file keeps the old list.
fn reload(allowlist: &SharedAllowlist, file: &Path) {
    match Allowlist::load(file) {
        Ok(list) => {
            let keys = list.len();
            allowlist.replace(list);
            info!(keys, "allowlist reloaded");
        }
        Err(err) => error!(
            "keeping the previous allowlist: {:#}",
            anyhow::Error::from(err)
        ),
    }
}

/// A group given by name, or by number.
fn resolve_group(group: &str) -> anyhow::Result<u32> {
    if let Some(gid) = transport::unix::group_id(group) {
        return Ok(gid);
    }
    match group.parse() {
        Ok(gid) if group.bytes().all(|b| b.is_ascii_digit()) => Ok(gid),
        _ => bail!("group {group:?} does not exist"),
    }
}

/// Binds the socket `0660`, given to `gid` when set, after making sure no
/// other helper is serving it.
fn bind(
    socket: &Path,
    gid: Option<u32>,
) -> anyhow::Result<(tokio::net::UnixListener, transport::unix::SocketFile)> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!(
            "another import helper is already serving {}; stop it first",
            socket.display()
        );
    }
    if let Some(dir) = socket.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    transport::unix::bind(socket, 0o660, gid)
        .with_context(|| format!("binding {}", socket.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert_eq!(resolve_group("4242").unwrap(), 4242);
        assert!(resolve_group("no-such-group-drv-thru").is_err());
        assert!(resolve_group("+4242").is_err());
        assert!(resolve_group("-1").is_err());
    }

    #[test]
    fn the_request_limit_fits_the_path_limit() {
        // `/nix/store/` + 32 + `-` + 211, plus a few bytes of framing each.
        let longest = 11 + 32 + 1 + 211 + 3;
        assert!(MAX_PATHS * longest + 4096 < MAX_REQUEST_BYTES);
    }
}
