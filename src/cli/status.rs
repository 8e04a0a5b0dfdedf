//! `drv-thru status`: a builder's capacity, active builds, queue and recent
//! results, once or live.

use std::{
    fmt::Write as _,
    io::{IsTerminal, Write},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context;
use serde_json::json;
use tonic::service::interceptor::InterceptedService;

use super::Failure;
use crate::{
    client::{self, BuilderChannel, Credentials, Target},
    config::DEFAULT_DATA_DIR,
    proto::{self, BuildPhase, BuildResult, builder_client::BuilderClient},
    transport::endpoint::RelayChoice,
    units::plural,
};

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Keep watching: the builder pushes every change.
    #[arg(long)]
    watch: bool,
    /// Print JSON (with --watch: one object per line).
    #[arg(long)]
    json: bool,
    /// The local builder's state directory (its admin socket is there).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR, env = "DRV_THRU_DATA_DIR")]
    data_dir: PathBuf,
    /// Watch a remote builder from builders.json instead (trusted clients).
    #[arg(long, value_name = "NAME", conflicts_with = "server")]
    builder: Option<String>,
    /// Watch a remote builder by endpoint id instead (trusted clients).
    #[arg(long, value_name = "ENDPOINT_ID")]
    server: Option<iroh::EndpointId>,
}

pub(super) async fn run(args: Args, relay: RelayChoice) -> Result<(), Failure> {
    let remote = match (&args.builder, args.server) {
        (Some(name), _) => Some(Target::named_builder(name)?),
        (None, Some(endpoint_id)) => Some(Target::Direct {
            endpoint_id,
            relay_url: None,
            addrs: Vec::new(),
        }),
        (None, None) => None,
    };
    let (channel, connection): (BuilderChannel, _) = match &remote {
        Some(target) => {
            let connection = client::connect(target, relay, None).await?;
            (connection.channel.clone(), Some(connection))
        }
        None => (
            InterceptedService::new(client::admin(&args.data_dir).await?, Credentials::default()),
            None,
        ),
    };
    let mut builder = BuilderClient::new(channel);
    let result = if args.watch {
        watch(&mut builder, args.json).await
    } else {
        builder
            .status(proto::StatusRequest {})
            .await
            .map_err(client::status_error)
            .and_then(|response| {
                print_once(&response.into_inner().status.unwrap_or_default(), args.json)
            })
    };
    if let Some(connection) = connection {
        connection.close().await;
    }
    Ok(result?)
}

fn print_once(status: &proto::BuilderStatus, json: bool) -> anyhow::Result<()> {
    let text = if json {
        format!("{}\n", status_json(status))
    } else {
        render(status)
    };
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing to stdout")
}

async fn watch(builder: &mut BuilderClient<BuilderChannel>, json: bool) -> anyhow::Result<()> {
    let mut stream = builder
        .watch_status(proto::WatchStatusRequest {})
        .await
        .map_err(client::status_error)?
        .into_inner();
    let redraw = !json && std::io::stdout().is_terminal();
    let mut stdout = std::io::stdout();
    while let Some(frame) = stream.message().await.map_err(client::status_error)? {
        let status = frame.status.unwrap_or_default();
        let text = if json {
            format!("{}\n", status_json(&status))
        } else if redraw {
            // Home the cursor and clear, so the frame replaces the last one.
            format!("\x1b[H\x1b[2J{}", render(&status))
        } else {
            format!("{}\n", render(&status))
        };
        stdout
            .write_all(text.as_bytes())
            .context("writing to stdout")?;
        stdout.flush().context("writing to stdout")?;
    }
    anyhow::bail!("the builder ended the status stream (it is shutting down)")
}

fn phase_name(phase: BuildPhase) -> &'static str {
    match phase {
        BuildPhase::Queued => "queued",
        BuildPhase::CheckingInputs => "checking inputs",
        BuildPhase::Uploading => "uploading",
        BuildPhase::Building => "building",
        BuildPhase::ServingOutputs => "serving outputs",
        BuildPhase::WaitingForClient => "waiting for client",
        BuildPhase::Unspecified => "unknown",
    }
}

fn result_name(result: BuildResult) -> &'static str {
    match result {
        BuildResult::Succeeded => "succeeded",
        BuildResult::Failed => "failed",
        BuildResult::LimitExceeded => "limit exceeded",
        BuildResult::Cancelled => "cancelled",
        BuildResult::Error => "error",
        BuildResult::Unspecified => "unknown",
    }
}

fn short(duration: Option<&prost_types::Duration>) -> String {
    let secs = duration
        .and_then(proto::std_duration)
        .unwrap_or_default()
        .as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

fn client_label(client: Option<&proto::BuildClient>) -> String {
    let Some(client) = client else {
        return "?".to_owned();
    };
    let short_id: String = client.endpoint_id.chars().take(10).collect();
    let who = if client.label.is_empty() {
        short_id
    } else {
        client.label.clone()
    };
    if client.ticket_id.is_empty() {
        who
    } else {
        format!("{who} (ticket {})", client.ticket_id)
    }
}

fn render(status: &proto::BuilderStatus) -> String {
    let mut out = String::new();
    let busy = status
        .active
        .iter()
        .filter(|a| a.phase() == BuildPhase::Building)
        .count();
    let slots = status.max_concurrent_builds as usize;
    let bar: String = (0..slots)
        .map(|i| if i < busy { '#' } else { '.' })
        .collect();
    let _ = writeln!(out, "builder   {}", status.endpoint_id);
    let _ = writeln!(
        out,
        "address   {}",
        if status.direct_addresses.is_empty() {
            "(none)".to_owned()
        } else {
            status.direct_addresses.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "relay     {}",
        if status.relay_url.is_empty() {
            "none"
        } else {
            &status.relay_url
        }
    );
    let _ = writeln!(out, "signing   {}", status.signing_public_key);
    let _ = writeln!(
        out,
        "capacity  [{bar}] {busy}/{slots} building, {} queued, {}",
        status.queued.len(),
        plural(status.open_connections, "connection", "connections")
    );
    if let Some(process) = &status.process {
        let _ = writeln!(
            out,
            "process   {} MiB resident, {}, {} threads, {} tasks",
            process.resident_bytes >> 20,
            plural(process.open_files, "open file", "open files"),
            process.threads,
            process.tasks
        );
    }
    if status.active.is_empty() && status.queued.is_empty() {
        let _ = writeln!(out, "idle");
    }
    if !status.active.is_empty() {
        let _ = writeln!(out, "active:");
        for build in &status.active {
            let _ = writeln!(
                out,
                "  {}  {:<15}  {:>7}  {}  {}",
                build.session_id,
                phase_name(build.phase()),
                short(build.phase_elapsed.as_ref()),
                client_label(build.client.as_ref()),
                build.drv_path
            );
        }
    }
    if !status.queued.is_empty() {
        let _ = writeln!(out, "queued:");
        for build in &status.queued {
            let _ = writeln!(
                out,
                "  {:>3}. {}  waited {:>7}  {}  {}",
                build.position,
                build.session_id,
                short(build.waited.as_ref()),
                client_label(build.client.as_ref()),
                build.drv_path
            );
        }
    }
    if !status.recent.is_empty() {
        let _ = writeln!(out, "recent:");
        for build in &status.recent {
            let message = if build.message.is_empty() {
                String::new()
            } else {
                format!(" ({})", build.message)
            };
            let _ = writeln!(
                out,
                "  {}  {:<14} after {:>7}  {}  {}{message}",
                build.session_id,
                result_name(build.result()),
                short(build.duration.as_ref()),
                client_label(build.client.as_ref()),
                build.drv_path
            );
        }
    }
    out
}

fn duration_secs(duration: Option<&prost_types::Duration>) -> f64 {
    duration
        .and_then(proto::std_duration)
        .map(|d: Duration| d.as_secs_f64())
        .unwrap_or_default()
}

fn client_json(client: Option<&proto::BuildClient>) -> serde_json::Value {
    client.map_or(serde_json::Value::Null, |client| {
        json!({
            "endpoint_id": client.endpoint_id,
            "label": client.label,
            "ticket_id": if client.ticket_id.is_empty() { None } else { Some(&client.ticket_id) },
        })
    })
}

fn status_json(status: &proto::BuilderStatus) -> serde_json::Value {
    json!({
        "endpoint_id": status.endpoint_id,
        "direct_addresses": status.direct_addresses,
        "relay_url": if status.relay_url.is_empty() { None } else { Some(&status.relay_url) },
        "signing_public_key": status.signing_public_key,
        "server_version": status.server_version,
        "started_at": status.started_at.as_ref().map(proto::unix_secs),
        "max_concurrent_builds": status.max_concurrent_builds,
        "open_connections": status.open_connections,
        "process": status.process.as_ref().map(|process| json!({
            "resident_bytes": process.resident_bytes,
            "open_files": process.open_files,
            "threads": process.threads,
            "tasks": process.tasks,
        })),
        "active": status.active.iter().map(|build| json!({
            "session_id": build.session_id,
            "client": client_json(build.client.as_ref()),
            "drv_path": build.drv_path,
            "phase": phase_name(build.phase()),
            "admitted_at": build.admitted_at.as_ref().map(proto::unix_secs),
            "phase_elapsed_secs": duration_secs(build.phase_elapsed.as_ref()),
        })).collect::<Vec<_>>(),
        "queued": status.queued.iter().map(|build| json!({
            "session_id": build.session_id,
            "client": client_json(build.client.as_ref()),
            "drv_path": build.drv_path,
            "position": build.position,
            "waited_secs": duration_secs(build.waited.as_ref()),
        })).collect::<Vec<_>>(),
        "recent": status.recent.iter().map(|build| json!({
            "session_id": build.session_id,
            "client": client_json(build.client.as_ref()),
            "drv_path": build.drv_path,
            "result": result_name(build.result()),
            "finished_at": build.finished_at.as_ref().map(proto::unix_secs),
            "duration_secs": duration_secs(build.duration.as_ref()),
            "message": build.message,
        })).collect::<Vec<_>>(),
    })
}
