//! The client side of drv-thru: reaching a builder (over Iroh as a ticket
//! holder or trusted client, or over the local admin socket) and running a
//! remote build there. Turns transport and status errors into messages that
//! say what to do.
//!
//! - [`remote_build`]: one build from an evaluated derivation to its outputs
//!   in the local store, reported through an [`remote_build::Observer`].
//! - [`trust`]: which route the outputs take into the local store, decided
//!   before anything is uploaded.
//! - [`session`]: the `Builder` calls of one session: admission, upload,
//!   build events.
//! - [`stdio_store`]: the store Nix's build hook talks to through a machine
//!   line, building on one builder per connection.
//! - [`cache_proxy`] and [`spool`]: the builder's signed outputs served to
//!   the local Nix, over loopback HTTP or from files.
//! - [`link`]: whether a transfer is compressed, from what the connection
//!   measured of its link.

pub mod cache_proxy;
pub mod link;
pub mod remote_build;
pub mod session;
pub mod spool;
pub mod stdio_store;
pub mod trust;

use std::{net::SocketAddr, path::Path};

use anyhow::{Context, anyhow};
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayUrl};
use tonic::{
    Code, Status,
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use self::link::{CompressMode, LinkPolicy};
use crate::{
    config::{self, NamedBuilder},
    keys,
    nix::signing,
    ticket::Ticket,
    transport::endpoint::{EndpointOptions, RelayChoice},
    transport::quic::Link,
};

/// A channel that presents a ticket with every call (or nothing).
pub type BuilderChannel = InterceptedService<Channel, Credentials>;

/// Adds the ticket's `authorization` metadata to every request.
#[derive(Debug, Clone, Default)]
pub struct Credentials(Option<AsciiMetadataValue>);

impl Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Which builder to use and how to authenticate to it.
#[derive(Debug, Clone)]
pub enum Target {
    /// A ticket: address, signing key and credentials in one.
    Ticket(Box<Ticket>),
    /// A named builder from `builders.json`: trusted-client access, or the
    /// ticket of its `ticket_file`.
    Named(Box<NamedBuilder>),
    /// An endpoint id given directly (trusted-client access).
    Direct {
        /// The builder's endpoint id.
        endpoint_id: EndpointId,
        /// A relay to reach it through.
        relay_url: Option<RelayUrl>,
        /// Direct addresses to dial.
        addrs: Vec<SocketAddr>,
    },
}

impl Target {
    /// The builder called `name` in the builders files (`--builder NAME`),
    /// with its ticket loaded if it names a `ticket_file`.
    pub fn named_builder(name: &str) -> anyhow::Result<Self> {
        Self::builder_in(&config::builders_files(), name)
    }

    /// The builder called `name` in the system's builders file alone
    /// ([`config::SYSTEM_BUILDERS_FILE`]): for a program run as root on
    /// behalf of every user (`--stdio` under nix-daemon), which no user's
    /// own file may steer.
    pub fn system_builder(name: &str) -> anyhow::Result<Self> {
        Self::builder_in(&[config::SYSTEM_BUILDERS_FILE.into()], name)
    }

    fn builder_in(files: &[std::path::PathBuf], name: &str) -> anyhow::Result<Self> {
        let builder = config::find_builder(files, name)?;
        Ok(Self::Named(Box::new(builder)))
    }

    /// The address to dial.
    pub fn addr(&self) -> anyhow::Result<EndpointAddr> {
        Ok(match self {
            Self::Ticket(ticket) => ticket.builder().clone(),
            Self::Named(builder) => {
                let mut addr = EndpointAddr::new(builder.endpoint_id);
                if let Some(relay) = &builder.relay_url {
                    let relay: RelayUrl = relay.parse().with_context(|| {
                        format!(
                            "builder {:?} in {}: invalid relay_url {relay:?}",
                            builder.name,
                            builder.source.display()
                        )
                    })?;
                    addr = addr.with_relay_url(relay);
                }
                builder
                    .addrs
                    .iter()
                    .fold(addr, |addr, direct| addr.with_ip_addr(*direct))
            }
            Self::Direct {
                endpoint_id,
                relay_url,
                addrs,
            } => {
                let addr = EndpointAddr::new(*endpoint_id);
                let addr = match relay_url {
                    Some(relay) => addr.with_relay_url(relay.clone()),
                    None => addr,
                };
                addrs
                    .iter()
                    .fold(addr, |addr, direct| addr.with_ip_addr(*direct))
            }
        })
    }

    /// The signing key this client trusts for the builder's outputs, if it
    /// was configured or handed over with a ticket.
    pub fn trusted_signing_key(&self) -> Option<&signing::PublicKey> {
        match self {
            Self::Ticket(ticket) => Some(ticket.signing_key()),
            Self::Named(builder) => builder.public_key.as_ref(),
            Self::Direct { .. } => None,
        }
    }

    fn credentials(&self) -> Credentials {
        let ticket = match self {
            Self::Ticket(ticket) => Some(&**ticket),
            Self::Named(builder) => builder.ticket.as_ref(),
            Self::Direct { .. } => None,
        };
        Credentials(ticket.map(|ticket| {
            ticket
                .secret()
                .authorization(ticket.id())
                .parse()
                .expect("the authorization value is ASCII")
        }))
    }
}

/// Round-trip time from which bulk transfers use parallel streams.
const PARALLEL_FROM_RTT: std::time::Duration = std::time::Duration::from_millis(5);

/// A live connection to a builder.
#[derive(Debug)]
pub struct Connection {
    /// Our endpoint; closing it ends the connection.
    pub endpoint: Endpoint,
    /// The gRPC channel with credentials attached.
    pub channel: BuilderChannel,
    link: Link,
    credentials: Credentials,
    policy: LinkPolicy,
}

impl Connection {
    /// How many streams a bulk transfer should spread over, at most `max`:
    /// one stream moves about its flow-control window (1.25 MB) per round
    /// trip, which on a short path is more than the CPU can encrypt, so
    /// there one stream is fastest; a long path needs several.
    pub async fn bulk_width(&self, max: usize) -> usize {
        match self.link.rtt().await {
            Some(rtt) if rtt < PARALLEL_FROM_RTT => 1,
            _ => max,
        }
    }

    /// `n` channels for bulk data besides [`Self::channel`], each on a QUIC
    /// stream of its own (opened on first use), so a transfer spread over
    /// them is not capped by one stream's flow-control window.
    pub fn bulk_channels(&self, n: usize) -> Vec<BuilderChannel> {
        (0..n)
            .map(|_| InterceptedService::new(self.link.lazy_channel(), self.credentials.clone()))
            .collect()
    }

    /// Whether its transfers are compressed, decided by `mode` and what the
    /// connection measures of its link (see [`link`]).
    pub fn link_policy(&self, mode: CompressMode) -> LinkPolicy {
        self.policy.with_mode(mode)
    }

    /// Closes the endpoint, telling the builder we are gone.
    pub async fn close(self) {
        let (sent, received) = self.policy.wire_totals().await;
        tracing::debug!(
            sent,
            received,
            "connection closing: UDP payload bytes moved"
        );
        self.endpoint.close().await;
    }
}

/// Connects to `target` from an endpoint of its own, closed again if that
/// fails; see [`bind`] and [`dial`].
pub async fn connect(
    target: &Target,
    relay: RelayChoice,
    key_file: Option<&Path>,
) -> anyhow::Result<Connection> {
    let endpoint = bind(relay, key_file).await?;
    let connection = dial(&endpoint, target).await;
    if connection.is_err() {
        endpoint.close().await;
    }
    connection
}

/// An endpoint with this user's client key (created on first use), from
/// which to dial builders. The caller closes it: iroh reports an endpoint
/// dropped unclosed as an error.
///
/// One persistent key per user, also for ticket builds, so a ticket bound to
/// `drv-thru key show`'s id works.
pub async fn bind(relay: RelayChoice, key_file: Option<&Path>) -> anyhow::Result<Endpoint> {
    let key_path = match key_file {
        Some(path) => path.to_owned(),
        None => keys::default_client_key_path().ok_or_else(|| {
            anyhow!("cannot find the client key: neither XDG_CONFIG_HOME nor HOME is set")
        })?,
    };
    let secret_key = keys::load_or_create_endpoint_key(&key_path)?;
    Ok(EndpointOptions::new(secret_key).relay(relay).bind().await?)
}

/// Connects to `target` from `endpoint`, which the connection then closes.
pub async fn dial(endpoint: &Endpoint, target: &Target) -> anyhow::Result<Connection> {
    let addr = target.addr()?;
    tracing::debug!(endpoint_id = %addr.id, "dialing the builder");
    let link = Link::dial(endpoint, addr).await?;
    let channel = link.channel().await?;
    let credentials = target.credentials();
    Ok(Connection {
        channel: InterceptedService::new(channel, credentials.clone()),
        endpoint: endpoint.clone(),
        policy: LinkPolicy::new(CompressMode::Auto, link.clone()),
        link,
        credentials,
    })
}

/// Connects to the admin socket of the server using `data_dir`.
pub async fn admin(data_dir: &Path) -> anyhow::Result<Channel> {
    let path = config::admin_socket_path(data_dir);
    crate::transport::unix::connect(&path).await.map_err(|err| {
        let hint = match err.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
                "no drv-thru server is running with data directory {} (start `drv-thru serve`, or pass --data-dir)",
                data_dir.display()
            ),
            std::io::ErrorKind::PermissionDenied => format!(
                "permission denied on {}: run as root or as a member of the builder's admin group",
                path.display()
            ),
            _ => format!("cannot reach the server's admin socket {}", path.display()),
        };
        anyhow::Error::new(err).context(hint)
    })
}

/// Turns a refused or failed call into an error that says what happened.
pub fn status_error(status: Status) -> anyhow::Error {
    let message = status.message().trim();
    match status.code() {
        Code::Unavailable => anyhow!("the builder is unreachable or went away: {message}"),
        Code::Unimplemented => anyhow!(
            "the builder does not support this request (is it an older drv-thru?): {message}"
        ),
        Code::DeadlineExceeded => anyhow!("the builder did not answer in time: {message}"),
        _ if message.is_empty() => anyhow!("the builder refused the request ({:?})", status.code()),
        _ => anyhow!("{message}"),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::ticket::{BearerSecret, TicketId};

    #[test]
    fn a_named_builder_with_a_ticket_file_presents_the_ticket() {
        let dir = tempfile::tempdir().unwrap();
        let builder_id = iroh::SecretKey::from_bytes(&[3; 32]).public();
        let ticket = Ticket::new(
            EndpointAddr::new(builder_id).with_ip_addr("127.0.0.1:7000".parse().unwrap()),
            signing::SecretKey::generate("drv-thru-test-1")
                .unwrap()
                .to_public(),
            TicketId::generate(),
            BearerSecret::from_bytes([7; 32]),
        );
        let ticket_file = dir.path().join("ticket");
        std::fs::write(&ticket_file, ticket.to_string()).unwrap();
        std::fs::set_permissions(&ticket_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let builders = dir.path().join("builders.json");
        std::fs::write(
            &builders,
            format!(
                r#"{{"builders": {{"farm": {{"ticket_file": "{}"}}}}}}"#,
                ticket_file.display()
            ),
        )
        .unwrap();
        let target = Target::Named(Box::new(config::find_builder(&[builders], "farm").unwrap()));

        let Credentials(Some(authorization)) = target.credentials() else {
            panic!("the ticket is not presented");
        };
        assert_eq!(
            authorization.to_str().unwrap(),
            ticket.secret().authorization(ticket.id())
        );
        assert_eq!(&target.addr().unwrap(), ticket.builder());
        assert_eq!(target.trusted_signing_key(), Some(ticket.signing_key()));
    }
}
