//! drv-thru: peer-to-peer remote Nix builds over Iroh.
//!
//! A builder serves the `drvthru.v1` gRPC services (see `proto/`) over Iroh
//! QUIC connections and over a local admin socket; clients reach it with a
//! ticket or as a trusted client.
//!
//! # Where things live
//!
//! The domain, pure (no processes, no I/O):
//! - [`nix`]: store paths, hashes, NARs, narinfo, signatures, `.drv` files.
//! - [`ticket`]: the `drvthru…` ticket string.
//! - [`units`]: durations and byte sizes as people write them.
//! - [`worker_protocol`]: Nix's worker protocol, the store side, as
//!   `drv-thru --stdio` speaks it to the local Nix.
//! - [`proto`]: the generated `drvthru.v1` code, fenced off, and the wire
//!   constants (ALPN, refusal metadata key).
//!
//! The powers, each in one place:
//! - [`nixcmd`]: the only code that runs `nix` and `nix-store`.
//! - [`store_nar`]: reads valid store paths as NARs, read-only.
//! - [`keys`]: the only code that reads or writes secret key files.
//! - [`helper`]: the client machine's root import helper, the only code
//!   that imports into the store for users Nix does not trust.
//!
//! The two sides and what connects them:
//! - [`transport`]: Iroh endpoints, and tonic's HTTP/2 over Iroh QUIC
//!   streams and unix sockets, each request tagged with its peer.
//! - [`server`]: the builder: its gRPC services (`server::service`), the
//!   state they use, the auth layer and the one error type that maps every
//!   refusal to a status.
//! - [`client`]: reaching a builder, and one remote build from an evaluated
//!   derivation to its signed outputs in the local store; also the store
//!   Nix's own scheduler builds through (`client::stdio_store`).
//! - [`loopback_cache`]: binary caches served to the local Nix over
//!   loopback HTTP, so Nix imports while the data still arrives.
//! - [`config`]: the server's JSON config and the client's `builders.json`.
//! - [`cli`]: one module per subcommand; arguments, progress and output.
//!
//! # One build, end to end
//!
//! `cli::build` parses the arguments and hands the derivation to
//! `client::remote_build`, which evaluates it with [`nixcmd`], decides the
//! import route (`client::trust`), dials the builder
//! ([`transport::quic`]) and runs the session (`client::session`). On the
//! builder, `server::auth` names the caller, `server::service::builder`
//! admits the session into `server::sessions`, takes the upload into
//! `server::upload` and queues the build (`server::build_queue`); the
//! outputs are signed into `server::cache` and served by
//! `server::service::cache` to `client::cache_proxy`, from which the local
//! Nix imports them after checking their signatures.

#![deny(missing_docs)]

pub mod cli;
pub mod client;
pub mod config;
pub mod helper;
pub mod keys;
pub mod loopback_cache;
pub mod nix;
pub mod nixcmd;
pub mod proto;
pub mod server;
pub mod store_nar;
pub mod ticket;
pub mod transport;
pub mod units;
pub mod worker_protocol;

#[cfg(test)]
#[path = "../tests/support/two_stores.rs"]
mod two_stores;
