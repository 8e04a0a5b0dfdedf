//! The gRPC services, one file each. They are thin: they take the caller
//! from the auth layer, parse the request, call the state modules and turn
//! a [`ServerError`](super::error::ServerError) into a status at the edge.

pub mod builder;
pub mod cache;
pub mod tickets;
