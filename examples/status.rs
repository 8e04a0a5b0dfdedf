//! Asks a drv-thru builder for its status over Iroh, the way a third-party
//! client would: from `proto/` and stock crates (`iroh`, `tonic`), without
//! drv-thru's own modules.
//!
//! ```text
//! SECRET_KEY_HEX=... cargo run --example status -- ENDPOINT_ID IP:PORT
//! ```
//!
//! The builder answers trusted clients only: set `SECRET_KEY_HEX` to the
//! 32-byte secret key (64 hex characters) of a client in its
//! `trusted_clients`. Without it, a fresh key is used and the builder
//! refuses it, which the example prints as the refusal a program matches on.

use std::net::SocketAddr;

use hyper_util::rt::TokioIo;
use iroh::{
    Endpoint, EndpointAddr, EndpointId, SecretKey,
    endpoint::{ConnectionError, PortmapperConfig, RelayMode, presets},
};
use tonic::transport::Channel;

// The stubs generated from `proto/` by this package's build script with
// tonic-prost-build, as a third party's build script would make them
// (`tonic_prost_build::compile_protos`); not drv-thru's own `proto` module.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("drvthru.v1");
}

use proto::{StatusRequest, builder_client::BuilderClient};

/// The ALPN of drv-thru's gRPC protocol (proto/README.md).
const ALPN: &[u8] = b"drv-thru/grpc/1";

/// Dials the builder and returns a gRPC channel to it, with the endpoint
/// it rides on (close it when done: dropping it aborts its connections).
/// Relays and address lookup are off: the builder is reached at a direct
/// address.
pub async fn connect(
    key: SecretKey,
    builder: EndpointId,
    addr: SocketAddr,
) -> anyhow::Result<(Endpoint, Channel)> {
    let endpoint = Endpoint::builder(presets::Minimal)
        .relay_mode(RelayMode::Disabled)
        .portmapper_config(PortmapperConfig::Disabled)
        .secret_key(key)
        .bind()
        .await?;
    let connection = endpoint
        .connect(EndpointAddr::new(builder).with_ip_addr(addr), ALPN)
        .await?;
    // The URI is never resolved: each HTTP/2 connection the channel makes
    // is a new bidirectional stream of the one QUIC connection.
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let connection = connection.clone();
            async move {
                let (send, recv) = connection.open_bi().await?;
                Ok::<_, ConnectionError>(TokioIo::new(tokio::io::join(recv, send)))
            }
        }))
        .await?;
    Ok((endpoint, channel))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [builder, addr] = args.as_slice() else {
        anyhow::bail!("usage: status ENDPOINT_ID IP:PORT (with SECRET_KEY_HEX set)");
    };
    let key = match std::env::var("SECRET_KEY_HEX") {
        Ok(hex) => SecretKey::from_bytes(
            &data_encoding::HEXLOWER_PERMISSIVE
                .decode(hex.trim().as_bytes())?
                .try_into()
                .map_err(|_| anyhow::anyhow!("SECRET_KEY_HEX must be 64 hex characters"))?,
        ),
        Err(_) => SecretKey::generate(),
    };
    let (endpoint, channel) = connect(key, builder.parse()?, addr.parse()?).await?;
    let reply = BuilderClient::new(channel).status(StatusRequest {}).await;
    endpoint.close().await;
    match reply {
        Ok(reply) => {
            let status = reply.into_inner().status.unwrap_or_default();
            println!(
                "builder {} (drv-thru {}): {} connections, {} active, {} queued",
                status.endpoint_id,
                status.server_version,
                status.open_connections,
                status.active.len(),
                status.queued.len()
            );
            Ok(())
        }
        Err(refused) => {
            // The stable reason a program matches on (proto/README.md, "Refusals").
            let reason = refused
                .metadata()
                .get("drvthru-refusal")
                .and_then(|value| value.to_str().ok())
                .unwrap_or("no reason");
            anyhow::bail!(
                "refused: {:?} ({reason}): {}",
                refused.code(),
                refused.message()
            )
        }
    }
}
