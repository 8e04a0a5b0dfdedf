//! Building Iroh endpoints from our configuration: relay mode, listen
//! address and the QUIC limits every drv-thru connection runs under.

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use iroh::{
    Endpoint, RelayMode, RelayUrl,
    endpoint::{PortmapperConfig, QuicTransportConfig, VarInt, presets},
};

use crate::proto::ALPN;

/// Connections that stay silent this long are closed, which is also how a
/// vanished peer is noticed. Long builds are not silent: both sides send
/// keep-alives well within it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Keep-alive interval, well inside [`IDLE_TIMEOUT`] on both sides.
const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// Bidirectional streams (HTTP/2 connections) a peer may hold open on one
/// QUIC connection: enough for a control channel plus parallel bulk
/// transfers, few enough that a peer cannot pile up server tasks.
pub(crate) const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// Where relays come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RelayChoice {
    /// n0's public relays and address lookup (Iroh's default).
    #[default]
    Default,
    /// No relays and no address lookup: direct addresses only, fully offline.
    Disabled,
    /// A self-hosted relay.
    Custom(RelayUrl),
}

/// An invalid `--relay` value.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid relay {0:?}: use `default`, `disabled` or a relay URL such as https://relay.example.org"
)]
pub struct ParseRelayError(String);

impl FromStr for RelayChoice {
    type Err = ParseRelayError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "default" | "" => Ok(Self::Default),
            "disabled" | "off" | "none" => Ok(Self::Disabled),
            url if url.starts_with("http://") || url.starts_with("https://") => url
                .parse()
                .map(Self::Custom)
                .map_err(|_| ParseRelayError(text.to_owned())),
            _ => Err(ParseRelayError(text.to_owned())),
        }
    }
}

impl fmt::Display for RelayChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::Disabled => f.write_str("disabled"),
            Self::Custom(url) => url.fmt(f),
        }
    }
}

impl serde::Serialize for RelayChoice {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for RelayChoice {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Everything needed to bind an endpoint.
#[derive(Debug)]
pub struct EndpointOptions {
    secret_key: iroh::SecretKey,
    relay: RelayChoice,
    listen: Option<SocketAddr>,
    accept: bool,
}

impl EndpointOptions {
    /// Options for an endpoint with this identity; relays as Iroh defaults,
    /// any UDP port, not accepting connections.
    pub fn new(secret_key: iroh::SecretKey) -> Self {
        Self {
            secret_key,
            relay: RelayChoice::Default,
            listen: None,
            accept: false,
        }
    }

    /// Chooses the relay mode.
    pub fn relay(mut self, relay: RelayChoice) -> Self {
        self.relay = relay;
        self
    }

    /// Binds exactly this UDP socket instead of Iroh's default ones.
    pub fn listen(mut self, listen: Option<SocketAddr>) -> Self {
        self.listen = listen;
        self
    }

    /// Accepts incoming drv-thru connections (servers only).
    pub fn accept_connections(mut self) -> Self {
        self.accept = true;
        self
    }

    /// Binds the endpoint. Never waits for relays: offline use must not stall.
    pub async fn bind(self) -> Result<Endpoint, BindError> {
        let transport = QuicTransportConfig::builder()
            .max_idle_timeout(Some(
                IDLE_TIMEOUT
                    .try_into()
                    .expect("a 10 s idle timeout fits QUIC's limit"),
            ))
            .keep_alive_interval(KEEP_ALIVE)
            .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .build();
        let mut builder = match &self.relay {
            RelayChoice::Disabled => Endpoint::builder(presets::Minimal)
                .relay_mode(RelayMode::Disabled)
                .portmapper_config(PortmapperConfig::Disabled),
            RelayChoice::Default => Endpoint::builder(presets::N0),
            RelayChoice::Custom(url) => {
                Endpoint::builder(presets::N0).relay_mode(RelayMode::custom([url.clone()]))
            }
        }
        .secret_key(self.secret_key)
        .transport_config(transport);
        if self.accept {
            builder = builder.alpns(vec![ALPN.to_vec()]);
        }
        if let Some(listen) = self.listen {
            builder = builder
                .clear_ip_transports()
                .bind_addr(listen)
                .map_err(|err| BindError::Address(listen, err.to_string()))?;
        }
        builder
            .bind()
            .await
            .map_err(|err| BindError::Bind(err.to_string()))
    }
}

/// Why an endpoint could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The listen address is unusable.
    #[error("cannot listen on {0}: {1}")]
    Address(SocketAddr, String),
    /// Iroh could not bind.
    #[error("cannot start the Iroh endpoint: {0}")]
    Bind(String),
}

/// The direct addresses an endpoint can be dialled on: the sockets it bound
/// (which include loopback when bound to it), then what Iroh discovered.
pub fn direct_addresses(endpoint: &Endpoint) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = endpoint
        .bound_sockets()
        .into_iter()
        .filter(|addr| !addr.ip().is_unspecified())
        .collect();
    for addr in endpoint.addr().ip_addrs() {
        if !addrs.contains(addr) {
            addrs.push(*addr);
        }
    }
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_relay_choices() {
        assert_eq!(
            "default".parse::<RelayChoice>().unwrap(),
            RelayChoice::Default
        );
        assert_eq!(
            "disabled".parse::<RelayChoice>().unwrap(),
            RelayChoice::Disabled
        );
        assert!(matches!(
            "https://relay.example.org".parse::<RelayChoice>().unwrap(),
            RelayChoice::Custom(_)
        ));
        let err = "sometimes".parse::<RelayChoice>().unwrap_err().to_string();
        assert!(err.contains("disabled"), "{err}");
    }

    #[tokio::test]
    async fn offline_endpoint_reports_its_loopback_address() {
        let endpoint = EndpointOptions::new(iroh::SecretKey::generate())
            .relay(RelayChoice::Disabled)
            .listen(Some("127.0.0.1:0".parse().unwrap()))
            .accept_connections()
            .bind()
            .await
            .unwrap();
        let addrs = direct_addresses(&endpoint);
        assert!(
            addrs
                .iter()
                .any(|addr| addr.ip().is_loopback() && addr.port() != 0),
            "{addrs:?}"
        );
        endpoint.close().await;
    }
}
