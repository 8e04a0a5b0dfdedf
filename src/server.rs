//! The builder: state, services and the two transports they are served on.
//!
//! The same router (behind the same [`auth`] layer) is served twice: over
//! Iroh for clients, and over `DATA_DIR/admin.sock` for local admins.
//!
//! - [`service`]: the gRPC services; they authorize, parse, call the state
//!   below and report its [`error`]s as statuses.
//! - [`auth`]: who the caller is and which methods it may call.
//! - [`error`]: every refusal and failure, and its one mapping to a status.
//! - [`sessions`]: the admitted sessions, their limits and what they may read.
//! - [`declared_input`]: the inputs a client announces, checked.
//! - [`signed_inputs`]: which announced signed inputs (built elsewhere) the
//!   builder asks for.
//! - [`upload`]: receiving a session's inputs and importing them.
//! - [`build_queue`]: the build slots and running one session's build.
//! - [`cache`]: the signed output cache in `DATA_DIR/cache`.
//! - [`cache_streams`]: how many Cache streams a session and a connection
//!   may have open.
//! - [`gc_roots`]: each session's outputs kept from Nix's garbage collector.
//! - [`nar_file`]: a NAR file read by range while it is still written.
//! - [`status`]: the live status board.
//! - [`resources`]: the server process's own memory, files and tasks.
//! - [`ticket_store`]: the tickets and their state file.
//!
//! The Nix store is changed and queried only through [`crate::nixcmd`] (by
//! `upload`, `build_queue`, `cache` and the builder service's input check);
//! `cache` also reads store paths, read-only, through [`crate::store_nar`].
//! Secrets are loaded only through [`crate::keys`] (here, at startup);
//! `ticket_store` derives bearer secrets with its [`crate::keys::TicketKey`]
//! and `cache` signs with the key it is given.

pub mod auth;
pub mod build_queue;
pub mod cache;
pub mod cache_streams;
pub mod declared_input;
pub mod error;
pub mod gc_roots;
pub mod nar_file;
pub mod resources;
pub mod service;
pub mod sessions;
pub mod signed_inputs;
pub mod status;
pub mod ticket_store;
pub mod upload;

use std::{fs, os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use tonic::{codec::CompressionEncoding, transport::Server};
use tracing::info;

use self::{
    auth::{AdminPolicy, AuthLayer, AuthPolicy},
    build_queue::BuildContext,
    cache::SignedCache,
    gc_roots::GcRoots,
    service::{builder::BuilderService, cache::CacheService, tickets::TicketsService},
    sessions::{SessionCaps, Sessions},
    status::{ServerFacts, StatusBoard},
    ticket_store::TicketStore,
    upload::Uploads,
};
use crate::{
    config::{ServerConfig, admin_socket_path},
    keys::{self, SigningKeyFiles, TicketKey},
    nixcmd::Nix,
    proto::{
        self, builder_server::BuilderServer, cache_server::CacheServer,
        tickets_server::TicketsServer,
    },
    transport::{
        self,
        endpoint::{EndpointOptions, direct_addresses},
        http2,
        quic::{ConnectionBudget, IrohIncoming},
    },
};

/// Holds the data directory's lock for the server's lifetime, so two
/// servers never share one state directory.
#[derive(Debug)]
struct InstanceLock {
    _file: fs::File,
}

impl InstanceLock {
    fn acquire(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join("server.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if file.try_lock().is_err() {
            bail!(
                "another drv-thru server is already using {}; stop it first or pass a different --data-dir",
                data_dir.display()
            );
        }
        Ok(Self { _file: file })
    }
}

/// Removes what a server killed mid-way left in `data_dir`, which holds its
/// lock, so none of it belongs to a live server: half-written key and ticket
/// files (`.NAME….tmp`; the real files are only ever replaced whole, and a
/// key's may hold its secret), the admin socket's staging directories
/// (`.socket-…`) and staged uploads (no session survives a restart). The
/// cache and the garbage-collector roots clear their own when opened.
fn clear_leftovers(data_dir: &Path) {
    let Ok(entries) = fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let removed = if name.starts_with('.') && name.ends_with(".tmp") {
            fs::remove_file(entry.path())
        } else if name.starts_with(".socket-") || name == "uploads" {
            fs::remove_dir_all(entry.path())
        } else {
            continue;
        };
        match removed {
            Ok(()) => tracing::debug!("removed {name}, left by an earlier run"),
            Err(err) => tracing::warn!("removing {}: {err}", entry.path().display()),
        }
    }
}

/// Looks up a group id by name.
fn group_id(name: &str) -> anyhow::Result<u32> {
    transport::unix::group_id(name).with_context(|| {
        format!("admin group {name:?} does not exist; create it or change admin_group")
    })
}

fn create_data_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating data directory {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o750))
            .with_context(|| format!("setting permissions of {}", dir.display()))?;
    }
    Ok(())
}

/// What a builder reports once it accepts connections on both transports.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    /// The Iroh endpoint id clients dial.
    pub endpoint_id: String,
    /// The UDP addresses the endpoint is bound to.
    pub direct_addresses: Vec<std::net::SocketAddr>,
    /// The admin socket's path.
    pub admin_socket: std::path::PathBuf,
    /// The key outputs are signed with (`name:base64`).
    pub signing_public_key: String,
}

/// Runs the builder until SIGINT or SIGTERM; calls `on_ready` once it
/// accepts connections.
pub async fn run(
    config: ServerConfig,
    on_ready: impl FnOnce(Ready) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    // Installed first: a signal that arrives once we report readiness must
    // stop us gracefully, not kill us with the default action.
    let signals = Signals::install()?;
    let data_dir = config.data_dir.clone();
    create_data_dir(&data_dir)?;
    let _lock = InstanceLock::acquire(&data_dir)?;
    clear_leftovers(&data_dir);

    let secret_key = keys::load_or_create_endpoint_key(&config.secret_key_path())?;
    let signing = SigningKeyFiles::load_or_create(&data_dir)?;
    let tickets = Arc::new(TicketStore::open(
        &data_dir,
        TicketKey::load_or_create(&data_dir.join("ticket-secret.key"))?,
    )?);
    let admin_gid = config.admin_group.as_deref().map(group_id).transpose()?;

    let endpoint = EndpointOptions::new(secret_key)
        .relay(config.relay.clone())
        .listen(config.listen)
        .accept_connections()
        .bind()
        .await?;
    let addresses = direct_addresses(&endpoint);
    info!(endpoint_id = %endpoint.id(), relay = %config.relay, "builder endpoint ready");
    for addr in &addresses {
        info!("listening on {addr}");
    }
    info!(key = %signing.public, "outputs are signed with this key");

    let board = Arc::new(StatusBoard::new(ServerFacts {
        endpoint_id: endpoint.id().to_string(),
        direct_addresses: addresses.iter().map(ToString::to_string).collect(),
        relay_url: endpoint
            .addr()
            .relay_urls()
            .next()
            .map(ToString::to_string)
            .unwrap_or_default(),
        signing_public_key: signing.public.to_string(),
        started_at: proto::now_unix(),
        max_concurrent_builds: config.max_concurrent_builds,
        recent_limit: config.recent_builds_limit as usize,
    }));
    let policy = Arc::new(AuthPolicy::new(
        tickets.clone(),
        config
            .trusted_clients
            .iter()
            .map(|(name, client)| (name.clone(), client.public_key, client.limits)),
        AdminPolicy {
            server_uid: unsafe { libc::geteuid() },
            admin_gid,
        },
        config.admin_group.clone(),
    ));
    let nix = Nix::builder().spare_connection().build();
    let sessions = Arc::new(Sessions::new(SessionCaps {
        per_client: config.max_sessions_per_client as usize,
        per_ticket: config.max_sessions_per_ticket as usize,
        total: config.max_sessions as usize,
    }));
    let uploads_dir = data_dir.join("uploads");
    let parallel_fills = config
        .output_cache_max_parallel_fills
        .map(|n| n as usize)
        .unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(4, |n| n.get().clamp(1, 16))
        });
    let public_key = signing.public.clone();
    let cache = Arc::new(SignedCache::new(
        data_dir.join("cache"),
        signing.secret,
        nix.clone(),
        parallel_fills,
        config.cache_max_size.map(|size| size.get()),
    ));
    let build = BuildContext {
        nix,
        board: board.clone(),
        slots: Arc::new(tokio::sync::Semaphore::new(
            config.max_concurrent_builds as usize,
        )),
        tasks: tokio_util::task::TaskTracker::new(),
        cache: cache.clone(),
        roots: Arc::new(
            GcRoots::open(data_dir.join("gcroots"))
                .with_context(|| format!("clearing {}", data_dir.join("gcroots").display()))?,
        ),
    };
    let builds = build.tasks.clone();
    let services = Services {
        builder: Arc::new(BuilderService::new(
            board.clone(),
            tickets.clone(),
            sessions.clone(),
            public_key.to_string(),
            Uploads::new(build.nix.clone(), uploads_dir),
            build,
            config.session_idle_timeout.get(),
        )),
        tickets: Arc::new(TicketsService::new(
            tickets,
            sessions.clone(),
            endpoint.clone(),
            public_key,
        )),
        cache: Arc::new(CacheService::new(cache, sessions.clone())),
        layer: AuthLayer::new(policy),
    };

    let iroh_incoming = IrohIncoming::start(
        endpoint.clone(),
        ConnectionBudget {
            max_connections: config.max_connections,
            max_unauthenticated: config.max_unauthenticated_connections,
            max_per_client: config.max_connections_per_client,
            authentication_timeout: config.authentication_timeout.get(),
            trusted: config
                .trusted_clients
                .values()
                .map(|client| client.public_key)
                .collect(),
        },
    );
    let mut open = iroh_incoming.open_connections();
    let board_for_connections = board.clone();
    tokio::spawn(async move {
        while open.changed().await.is_ok() {
            let count = *open.borrow_and_update();
            board_for_connections.set_open_connections(count);
        }
    });

    let shutdown = CancellationToken::new();
    let admin_path = admin_socket_path(&data_dir);
    let (admin_listener, _admin_socket) = transport::unix::bind(
        &admin_path,
        if admin_gid.is_some() { 0o660 } else { 0o600 },
        admin_gid,
    )
    .with_context(|| format!("binding admin socket {}", admin_path.display()))?;
    info!(path = %admin_path.display(), "admin socket ready");
    on_ready(Ready {
        endpoint_id: endpoint.id().to_string(),
        direct_addresses: addresses,
        admin_socket: admin_path,
        signing_public_key: signing.public.to_string(),
    })?;

    let over_iroh = services.server(false).serve_with_incoming_shutdown(
        iroh_incoming.into_stream(),
        shutdown.clone().cancelled_owned(),
    );
    let over_admin = services.server(true).serve_with_incoming_shutdown(
        transport::unix::incoming(admin_listener),
        shutdown.clone().cancelled_owned(),
    );
    let serving = async { tokio::join!(over_iroh, over_admin) };
    tokio::pin!(serving);
    let (iroh_result, admin_result) = tokio::select! {
        results = &mut serving => results,
        () = signals.wait() => {
            info!("shutting down");
            // Sessions first, so that no build or upload holds the drain
            // open; then calls get a bounded time to end by themselves.
            sessions.cancel_all();
            shutdown.cancel();
            match tokio::time::timeout(DRAIN, &mut serving).await {
                Ok(results) => results,
                Err(_) => {
                    tracing::warn!("calls still open {} s after the shutdown began were cut off", DRAIN.as_secs());
                    (Ok(()), Ok(()))
                }
            }
        }
    };
    // Builds must not outlive the server: wait until Nix and its builders
    // are gone.
    builds.close();
    if tokio::time::timeout(Duration::from_secs(15), builds.wait())
        .await
        .is_err()
    {
        tracing::warn!("some builds did not stop within 15 s");
    }
    // Closing the endpoint tells connected clients at once instead of
    // leaving them to time out.
    tokio::time::timeout(Duration::from_secs(5), endpoint.close())
        .await
        .ok();
    iroh_result.context("serving over Iroh")?;
    admin_result.context("serving the admin socket")?;
    Ok(())
}

/// How long calls may take to end once a shutdown begins: long-lived
/// streams (status watches, health watches) would otherwise hold it open.
const DRAIN: Duration = Duration::from_secs(5);

/// SIGINT and SIGTERM, both meaning "shut down gracefully".
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Largest request the services open to anyone (health, reflection)
/// decode: theirs are a service name or a symbol, and a peer that need not
/// authenticate must not make the builder hold megabytes.
const PUBLIC_MESSAGE_SIZE: usize = 16 << 10;

/// Server reflection describing exactly the services the builder serves:
/// `proto::FILE_DESCRIPTOR_SET` also holds the import helper's, which only
/// the helper serves. Both reflection versions are listed, since tools ask
/// for one or the other (grpcurl v1, grpcio-reflection's client v1alpha).
fn reflection_of_the_builder() -> tonic_reflection::server::Builder<'static> {
    [
        proto::builder_server::SERVICE_NAME,
        proto::tickets_server::SERVICE_NAME,
        proto::cache_server::SERVICE_NAME,
        tonic_health::pb::health_server::SERVICE_NAME,
        tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
        tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
    ]
    .into_iter()
    .fold(
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ),
        |builder, name| builder.with_service_name(name),
    )
}

/// The services every transport serves.
struct Services {
    builder: Arc<BuilderService>,
    tickets: Arc<TicketsService>,
    cache: Arc<CacheService>,
    layer: AuthLayer,
}

impl Services {
    /// The router for one transport; server reflection only where
    /// `reflection` says (the admin socket): it echoes each request into
    /// its reply, which a stranger that never reads could pile up.
    fn server(
        &self,
        reflection: bool,
    ) -> tonic::transport::server::Router<
        tower::layer::util::Stack<AuthLayer, tower::layer::util::Identity>,
    > {
        let (health_reporter, health) = tonic_health::server::health_reporter();
        // Serving is unconditional once the router exists; readiness is the
        // socket or endpoint accepting at all.
        tokio::spawn(async move {
            health_reporter
                .set_serving::<BuilderServer<BuilderService>>()
                .await;
            health_reporter
                .set_serving::<TicketsServer<TicketsService>>()
                .await;
            health_reporter
                .set_serving::<CacheServer<CacheService>>()
                .await;
        });
        let reflection_v1 = reflection.then(|| {
            reflection_of_the_builder()
                .build_v1()
                .expect("the embedded descriptor sets are valid")
                .max_decoding_message_size(PUBLIC_MESSAGE_SIZE)
        });
        let reflection_v1alpha = reflection.then(|| {
            reflection_of_the_builder()
                .build_v1alpha()
                .expect("the embedded descriptor sets are valid")
                .max_decoding_message_size(PUBLIC_MESSAGE_SIZE)
        });
        Server::builder()
            .initial_stream_window_size(http2::STREAM_WINDOW)
            .initial_connection_window_size(http2::CONNECTION_WINDOW)
            .max_frame_size(http2::MAX_FRAME_SIZE)
            .max_concurrent_streams(64)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .layer(self.layer.clone())
            .add_service(health.max_decoding_message_size(PUBLIC_MESSAGE_SIZE))
            .add_optional_service(reflection_v1)
            .add_optional_service(reflection_v1alpha)
            // Compression is the client's choice, per call: it asks for zstd
            // only where its link is slower than the compressor
            // (`client::link`). A message that decompresses past the size
            // limit is refused (`RESOURCE_EXHAUSTED`) as soon as it passes
            // it, so compression buys a peer no larger messages.
            .add_service(
                BuilderServer::from_arc(self.builder.clone())
                    .max_decoding_message_size(http2::MAX_MESSAGE_SIZE)
                    .accept_compressed(CompressionEncoding::Zstd)
                    .send_compressed(CompressionEncoding::Zstd),
            )
            .add_service(
                TicketsServer::from_arc(self.tickets.clone())
                    .max_decoding_message_size(http2::MAX_MESSAGE_SIZE),
            )
            .add_service(
                CacheServer::from_arc(self.cache.clone())
                    .max_decoding_message_size(http2::MAX_MESSAGE_SIZE)
                    .accept_compressed(CompressionEncoding::Zstd)
                    .send_compressed(CompressionEncoding::Zstd),
            )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn leftovers_of_a_killed_server_are_cleared_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        for file in [
            ".tickets.json.tmp",
            ".secret.key.4242.tmp",
            "tickets.json",
            "secret.key",
            "server.lock",
        ] {
            std::fs::write(data.join(file), "x").unwrap();
        }
        for sub in [".socket-AbC123", "uploads/s-1", "cache/nar"] {
            std::fs::create_dir_all(data.join(sub)).unwrap();
        }
        super::clear_leftovers(data);
        let mut left: Vec<String> = std::fs::read_dir(data)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["cache", "secret.key", "server.lock", "tickets.json"]);
    }
}
