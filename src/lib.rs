//! drv-thru: peer-to-peer remote Nix builds over Iroh.
//!
//! A builder serves the `drvthru.v1` gRPC services (see `proto/`) over Iroh
//! QUIC connections and over a local admin socket; clients reach it with a
//! ticket or as a trusted client.
//!
//! Where things live:
//! - [`nix`]: the pure Nix domain (store paths, hashes, narinfo, signing);
//!   no processes, no I/O.
//! - [`nixcmd`]: the only code that runs `nix` and `nix-store`.
//! - [`keys`]: the only code that reads or writes secret key files.
//! - [`transport`]: tonic's HTTP/2 over Iroh streams and unix sockets.
//! - [`server`]: the builder's services, authorization layer and state.
//! - [`client`]: reaching a builder from the command line.
//! - [`helper`]: the client machine's root import helper, the only code
//!   that imports into the store for users Nix does not trust.
//! - [`loopback_cache`]: binary caches served to the local Nix over
//!   loopback HTTP, so Nix imports while the data still arrives.
//! - [`cli`]: one module per subcommand.

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
