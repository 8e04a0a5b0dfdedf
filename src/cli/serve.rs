//! `drv-thru serve`: run a builder.

mod ready;

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use iroh::EndpointId;

use super::Failure;
use crate::{
    config::{Limits, ServerConfig, TrustedClient},
    server,
    transport::endpoint::RelayChoice,
};

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// JSON configuration (the NixOS module writes one). Flags given here
    /// override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Check FILE as `--config FILE` would load it, with the flags given
    /// here, and exit instead of serving: status 0 and no output if the
    /// builder would start with it, else 2 and the reason. Touches neither
    /// the network nor the data directory and needs no root (the NixOS
    /// module runs it when the system is built). Whether `admin_group`
    /// exists is left to the start on the builder.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,

    /// State directory [default: /var/lib/drv-thru].
    #[arg(long, value_name = "DIR", env = "DRV_THRU_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// The Iroh secret key [default: DATA_DIR/secret.key]. The NixOS module
    /// passes an admin-provided key here as a systemd credential.
    #[arg(long, value_name = "FILE")]
    secret_key_file: Option<PathBuf>,

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
    let only_check = args.check_config.is_some();
    let ready_json = args.ready_json;
    let config = server_config(args, relay)?;
    if only_check {
        return Ok(());
    }
    server::run(config, |ready| ready::announce(&ready, ready_json))
        .await
        .context("drv-thru serve")?;
    Ok(())
}

/// The configuration `serve` starts with: the file, then the flags over it,
/// validated as the server validates it at start.
fn server_config(args: Args, relay: Option<RelayChoice>) -> anyhow::Result<ServerConfig> {
    let mut config = match args.config.or(args.check_config) {
        Some(path) => ServerConfig::load(&path)?,
        None => ServerConfig::default(),
    };
    if let Some(data_dir) = args.data_dir {
        config.data_dir = data_dir;
    }
    if let Some(file) = args.secret_key_file {
        config.secret_key_file = Some(file);
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
    config.validate().map_err(anyhow::Error::msg)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path};

    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    const ID: &str = "ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6";

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        let cli = Cli::try_parse_from(["drv-thru", "serve"].iter().chain(argv))?;
        match cli.command {
            Some(Command::Serve(args)) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn check(file: &Path, flags: &[&str]) -> anyhow::Result<ServerConfig> {
        let file = file.to_str().unwrap();
        let argv: Vec<&str> = ["--check-config", file]
            .into_iter()
            .chain(flags.iter().copied())
            .collect();
        server_config(parse(&argv)?, None)
    }

    #[test]
    fn check_config_applies_the_flags_start_would_apply() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.json");
        fs::write(&file, r#"{"max_concurrent_builds": 2}"#).unwrap();

        let config = check(&file, &["--secret-key-file", "/run/credentials/k"]).unwrap();
        assert_eq!(config.max_concurrent_builds, 2);
        assert_eq!(config.secret_key_path(), Path::new("/run/credentials/k"));

        let err = check(&file, &["--max-concurrent-builds", "0"]).unwrap_err();
        assert_eq!(err.to_string(), "max_concurrent_builds must be at least 1");
    }

    #[test]
    fn check_config_reports_the_file_and_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.json");
        fs::write(
            &file,
            format!(r#"{{"trusted_clients": {{"a": {{"public_key": "{ID}"}}}}}}"#),
        )
        .unwrap();
        let err = check(&file, &["--trusted-client", ID])
            .unwrap_err()
            .to_string();
        assert!(err.contains("same public_key"), "{err}");

        fs::write(&file, r#"{"cache_max_size": "lots"}"#).unwrap();
        let err = check(&file, &[]).unwrap_err().to_string();
        assert!(err.starts_with(file.to_str().unwrap()), "{err}");
        assert!(err.contains(r#"invalid size "lots""#), "{err}");
    }

    #[test]
    fn check_config_and_config_exclude_each_other() {
        let err = parse(&["--config", "a.json", "--check-config", "b.json"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }
}
