//! `drv-thru serve`: run a builder.

mod ready;

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use iroh::EndpointId;

use super::Failure;
use crate::{
    config::{Limits, ServerConfig, TrustedClient},
    endpoint::RelayChoice,
    server,
};

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// JSON configuration (the NixOS module writes one). Flags given here
    /// override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// State directory [default: /var/lib/drv-thru].
    #[arg(long, value_name = "DIR", env = "DRV_THRU_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// UDP address to listen on, e.g. 0.0.0.0:7000 (port 0 picks one). Every
    /// address the builder listens on is logged at startup.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,

    /// Trust this client endpoint id (repeatable), with the default limits
    /// (30m build time, 20G upload). Its name is the id's first characters.
    #[arg(long = "trusted-client", value_name = "ENDPOINT_ID")]
    trusted_clients: Vec<EndpointId>,

    /// Builds that may run at once.
    #[arg(long, value_name = "N")]
    max_concurrent_builds: Option<u32>,

    /// Members of this group may run `ticket` and `status` commands.
    #[arg(long, value_name = "GROUP")]
    admin_group: Option<String>,

    /// Once serving, print one JSON line on stdout: `endpoint_id`,
    /// `direct_addresses`, `admin_socket` and `signing_public_key`. (With
    /// `NOTIFY_SOCKET` set, systemd is told `READY=1` either way.)
    #[arg(long)]
    ready_json: bool,
}

pub(super) async fn run(args: Args, relay: Option<RelayChoice>) -> Result<(), Failure> {
    let mut config = match &args.config {
        Some(path) => ServerConfig::load(path)?,
        None => ServerConfig::default(),
    };
    if let Some(data_dir) = args.data_dir {
        config.data_dir = data_dir;
    }
    if let Some(listen) = args.listen {
        config.listen = Some(listen);
    }
    if let Some(relay) = relay {
        config.relay = relay;
    }
    if let Some(n) = args.max_concurrent_builds {
        config.max_concurrent_builds = n;
    }
    if let Some(group) = args.admin_group {
        config.admin_group = Some(group);
    }
    for id in args.trusted_clients {
        config.trusted_clients.insert(
            id.fmt_short().to_string(),
            TrustedClient {
                public_key: id,
                limits: Limits::default(),
            },
        );
    }
    server::run(config, |ready| ready::announce(&ready, args.ready_json))
        .await
        .context("drv-thru serve")?;
    Ok(())
}
