//! Integration tests of the control plane: a real `drv-thru serve` process,
//! real Iroh endpoints on loopback (relays and address lookup off) and real
//! gRPC, over both the Iroh transport and the admin socket.

mod common;
mod server;
mod status;
mod tickets;
mod trusted;
