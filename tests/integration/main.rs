//! Integration tests: a real `drv-thru serve` process, real Iroh endpoints
//! on loopback (relays and address lookup off), real gRPC, and for builds
//! real Nix in separate stores.

mod authority;
#[path = "../support/builder.rs"]
mod builder;
mod builds;
mod cache;
mod common;
mod compression;
mod crash;
mod fleet;
mod helper;
mod scale_out;
mod server;
mod status;
mod tickets;
mod trusted;
#[path = "../support/two_stores.rs"]
mod two_stores;
