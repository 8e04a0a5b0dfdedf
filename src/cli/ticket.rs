//! `drv-thru ticket`: issue and manage tickets through the builder's admin
//! socket.

use anyhow::{Context, anyhow};
use serde_json::json;

use super::{DataDirArg, Failure};
use crate::{
    client,
    proto::{self, TicketState, tickets_client::TicketsClient},
    ticket::Ticket,
    units::{ByteSize, HumanDuration, format_bytes},
};

#[derive(Debug, clap::Subcommand)]
pub(super) enum Command {
    /// Issue a ticket and print it (`drvthru...`) on stdout.
    ///
    /// Defaults: expires after 2h, 1 use, 30m of build time, 20G of upload.
    Create(CreateArgs),
    /// Show what a ticket string holds and, on its builder, its state.
    Inspect {
        /// The ticket string.
        ticket: String,
        #[command(flatten)]
        data_dir: DataDirArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List tickets (never prints their secrets).
    List {
        /// Include expired, revoked and used-up tickets.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        data_dir: DataDirArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the full ticket string of a ticket id.
    Reveal {
        /// The ticket id (from `ticket list`).
        id: String,
        #[command(flatten)]
        data_dir: DataDirArg,
    },
    /// Make a ticket unusable at once.
    Revoke {
        /// The ticket id (from `ticket list`).
        id: String,
        #[command(flatten)]
        data_dir: DataDirArg,
    },
}

#[derive(Debug, clap::Args)]
pub(super) struct CreateArgs {
    /// A label shown in `ticket list` and `status`.
    #[arg(long)]
    name: Option<String>,
    /// Lifetime, e.g. 30m, 2h, 7days.
    #[arg(long, value_name = "DURATION", default_value = "2h")]
    expires: HumanDuration,
    /// Number of builds the ticket admits.
    #[arg(long, value_name = "N", default_value_t = 1, conflicts_with = "unlimited", value_parser = clap::value_parser!(u32).range(1..))]
    uses: u32,
    /// Admit any number of builds until it expires or is revoked.
    #[arg(long)]
    unlimited: bool,
    /// Wall-clock limit of each build.
    #[arg(long, value_name = "DURATION", default_value = "30m")]
    max_build_time: HumanDuration,
    /// Limit on the input bytes each session may upload (20G = 20 GiB).
    #[arg(long, value_name = "SIZE", default_value = "20G")]
    max_upload_bytes: ByteSize,
    /// Only this client endpoint id (its `drv-thru key show`) may use it.
    #[arg(long, value_name = "ENDPOINT_ID")]
    bind_client: Option<iroh::EndpointId>,
    #[command(flatten)]
    data_dir: DataDirArg,
    /// Print JSON (ticket string, id and limits) instead of the bare ticket.
    #[arg(long)]
    json: bool,
}

pub(super) async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Create(args) => create(args).await,
        Command::Inspect {
            ticket,
            data_dir,
            json,
        } => inspect(&ticket, &data_dir, json).await,
        Command::List {
            all,
            data_dir,
            json,
        } => list(all, &data_dir, json).await,
        Command::Reveal { id, data_dir } => {
            let response = admin(&data_dir)
                .await?
                .reveal_ticket(proto::RevealTicketRequest { id })
                .await
                .map_err(client::status_error)?
                .into_inner();
            println!("{}", response.ticket_string);
            Ok(())
        }
        Command::Revoke { id, data_dir } => {
            let response = admin(&data_dir)
                .await?
                .revoke_ticket(proto::RevokeTicketRequest { id })
                .await
                .map_err(client::status_error)?
                .into_inner();
            let ticket = response.ticket.unwrap_or_default();
            eprintln!("revoked ticket {}", ticket.id);
            Ok(())
        }
    }
}

async fn admin(data_dir: &DataDirArg) -> anyhow::Result<TicketsClient<tonic::transport::Channel>> {
    Ok(TicketsClient::new(client::admin(&data_dir.data_dir).await?))
}

async fn create(args: CreateArgs) -> Result<(), Failure> {
    let request = proto::CreateTicketRequest {
        name: args.name.unwrap_or_default(),
        expires_in: Some(proto::duration(args.expires.get())),
        uses: if args.unlimited { 0 } else { args.uses },
        unlimited_uses: args.unlimited,
        limits: Some(proto::SessionLimits {
            max_build_time: Some(proto::duration(args.max_build_time.get())),
            max_upload_bytes: args.max_upload_bytes.get(),
        }),
        bind_client: args
            .bind_client
            .map(|id| id.to_string())
            .unwrap_or_default(),
    };
    let response = admin(&args.data_dir)
        .await?
        .create_ticket(request)
        .await
        .map_err(client::status_error)?
        .into_inner();
    let info = response
        .ticket
        .ok_or_else(|| anyhow!("the server returned no ticket record"))?;
    if args.json {
        let mut value = info_json(&info);
        value["ticket"] = json!(response.ticket_string);
        println!("{value}");
    } else {
        println!("{}", response.ticket_string);
        eprintln!("{}", describe(&info));
    }
    Ok(())
}

async fn inspect(text: &str, data_dir: &DataDirArg, json: bool) -> Result<(), Failure> {
    let ticket: Ticket = text.parse().context("cannot read the ticket")?;
    // The builder's own view is optional: inspecting works on any machine,
    // the state only where the builder runs.
    let state = match client::admin(&data_dir.data_dir).await {
        Ok(channel) => Some(
            TicketsClient::new(channel)
                .inspect_ticket(proto::InspectTicketRequest {
                    ticket_string: text.trim().to_owned(),
                })
                .await
                .map_err(client::status_error)
                .map(|response| response.into_inner().ticket.unwrap_or_default()),
        ),
        Err(_) => None,
    };
    let addrs: Vec<String> = ticket
        .builder()
        .ip_addrs()
        .map(ToString::to_string)
        .collect();
    let relay = ticket
        .builder()
        .relay_urls()
        .next()
        .map(ToString::to_string);
    if json {
        let mut value = json!({
            "id": ticket.id().to_string(),
            "builder_endpoint_id": ticket.builder_id().to_string(),
            "direct_addresses": addrs,
            "relay_url": relay,
            "signing_public_key": ticket.signing_key().to_string(),
        });
        match &state {
            Some(Ok(info)) => value["state"] = info_json(info),
            Some(Err(err)) => value["state_error"] = json!(format!("{err:#}")),
            None => {}
        }
        println!("{value}");
        return Ok(());
    }
    println!("ticket      {}", ticket.id());
    println!("builder     {}", ticket.builder_id());
    println!(
        "addresses   {}",
        if addrs.is_empty() {
            "(none: found through relay or lookup)".to_owned()
        } else {
            addrs.join(", ")
        }
    );
    println!("relay       {}", relay.as_deref().unwrap_or("none"));
    println!("signing key {}", ticket.signing_key());
    match state {
        Some(Ok(info)) => println!("on builder  {}", describe(&info)),
        Some(Err(err)) => println!("on builder  {err:#}"),
        None => println!("on builder  (no local builder admin socket; state unknown)"),
    }
    Ok(())
}

async fn list(all: bool, data_dir: &DataDirArg, json: bool) -> Result<(), Failure> {
    let tickets = admin(data_dir)
        .await?
        .list_tickets(proto::ListTicketsRequest {
            include_inactive: all,
        })
        .await
        .map_err(client::status_error)?
        .into_inner()
        .tickets;
    if json {
        println!(
            "{}",
            serde_json::Value::Array(tickets.iter().map(info_json).collect())
        );
        return Ok(());
    }
    if tickets.is_empty() {
        eprintln!("no {}tickets", if all { "" } else { "active " });
        return Ok(());
    }
    println!(
        "{:<16}  {:<8}  {:<7}  {:<16}  NAME",
        "ID", "STATE", "USES", "EXPIRES"
    );
    for info in &tickets {
        println!(
            "{:<16}  {:<8}  {:<7}  {:<16}  {}",
            info.id,
            state_name(info.state()),
            uses(info),
            expires(info),
            info.name
        );
    }
    Ok(())
}

fn state_name(state: TicketState) -> &'static str {
    match state {
        TicketState::Active => "active",
        TicketState::Expired => "expired",
        TicketState::Revoked => "revoked",
        TicketState::UsedUp => "used-up",
        TicketState::Unspecified => "unknown",
    }
}

fn uses(info: &proto::TicketInfo) -> String {
    match info.uses_granted {
        0 => format!("{}/∞", info.uses_taken),
        granted => format!("{}/{granted}", info.uses_taken),
    }
}

fn expires(info: &proto::TicketInfo) -> String {
    let at = info.expires_at.as_ref().map(proto::unix_secs).unwrap_or(0);
    let now = proto::now_unix();
    let span =
        |secs: u64| humantime::format_duration(std::time::Duration::from_secs(secs)).to_string();
    if at > now {
        format!("in {}", span(at - now))
    } else {
        format!("{} ago", span(now - at))
    }
}

fn describe(info: &proto::TicketInfo) -> String {
    let limits = info.limits.unwrap_or_default();
    let build_time = limits
        .max_build_time
        .as_ref()
        .and_then(proto::std_duration)
        .map(|d| humantime::format_duration(d).to_string())
        .unwrap_or_default();
    let bound = if info.bound_client.is_empty() {
        String::new()
    } else {
        format!(", bound to {}", info.bound_client)
    };
    format!(
        "ticket {}{}: {}, expires {}, uses {}, max build time {build_time}, max upload {}{bound}",
        info.id,
        if info.name.is_empty() {
            String::new()
        } else {
            format!(" ({})", info.name)
        },
        state_name(info.state()),
        expires(info),
        uses(info),
        format_bytes(limits.max_upload_bytes),
    )
}

fn info_json(info: &proto::TicketInfo) -> serde_json::Value {
    let limits = info.limits.unwrap_or_default();
    json!({
        "id": info.id,
        "name": info.name,
        "state": state_name(info.state()),
        "created_at": info.created_at.as_ref().map(proto::unix_secs),
        "expires_at": info.expires_at.as_ref().map(proto::unix_secs),
        "uses_granted": if info.uses_granted == 0 { None } else { Some(info.uses_granted) },
        "uses_taken": info.uses_taken,
        "max_build_time_secs": limits.max_build_time.as_ref().and_then(proto::std_duration).map(|d| d.as_secs()),
        "max_upload_bytes": limits.max_upload_bytes,
        "bound_client": if info.bound_client.is_empty() { None } else { Some(&info.bound_client) },
        "revoked_at": info.revoked_at.as_ref().map(proto::unix_secs),
    })
}
