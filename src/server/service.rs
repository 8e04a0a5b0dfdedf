//! The gRPC services, one file each. They are thin: they take the caller
//! from the auth layer, parse the request, call the state modules and turn
//! a [`ServerError`](super::error::ServerError) into a status at the edge.

pub mod builder;
pub mod cache;
pub mod tickets;

use super::sessions::Owner;
use crate::transport::IrohPeer;

/// The session owner `peer`'s connection is.
fn owner(peer: &IrohPeer) -> Owner {
    Owner {
        endpoint_id: peer.endpoint_id,
        connection: peer.connection_id(),
    }
}
