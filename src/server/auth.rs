//! Authorization as a tower layer: every request is mapped to a
//! [`Principal`] before any handler runs, and methods a principal may not
//! call are refused here, in one place.
//!
//! Who the caller is comes from the transport, never from the request body:
//! the Iroh handshake proves an endpoint id, the kernel reports a unix
//! socket caller's uid. A ticket is presented as `authorization: Bearer
//! <id>.<secret>` metadata and checked (without taking a use) on every call.

use std::{collections::BTreeMap, sync::Arc};

use iroh::EndpointId;
use tonic::{Status, body::Body};
use tracing::{debug, warn};

use super::{
    error::ServerError,
    ticket_store::{TicketRecord, TicketStore},
};
use crate::{
    config::Limits,
    proto,
    ticket::BearerSecret,
    transport::{
        IrohPeer, UnixPeer,
        authorize::{AuthorizeLayer, Policy},
    },
};

/// An authenticated caller.
#[derive(Debug, Clone)]
pub enum Principal {
    /// A local user on the admin socket allowed to manage the builder.
    LocalAdmin {
        /// The caller's uid.
        uid: u32,
    },
    /// A client configured in `trusted_clients`.
    TrustedClient {
        /// Its configured name.
        name: String,
        /// Its endpoint id.
        endpoint_id: EndpointId,
        /// Its per-session limits.
        limits: Limits,
    },
    /// A client presenting a valid ticket.
    TicketHolder {
        /// The ticket's record when the call was authorized.
        ticket: TicketRecord,
        /// The presented secret, needed again to take a use.
        secret: BearerSecret,
        /// The client's endpoint id.
        endpoint_id: EndpointId,
    },
}

/// What a method requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Anyone who can connect: health checks and reflection.
    Public,
    /// The local admin only.
    Admin,
    /// The local admin or a trusted client: watching the builder.
    Observer,
    /// A trusted client or the holder of a usable ticket: opening a session.
    Admission,
    /// A trusted client or the holder of the ticket that admitted a session:
    /// continuing it (uploads, the build, its outputs). Handlers check that
    /// the session belongs to the caller.
    Session,
}

fn access_for(path: &str) -> Access {
    const BUILDER: &str = "/drvthru.v1.Builder/";
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        Access::Public
    } else if path == "/drvthru.v1.Builder/Status" || path == "/drvthru.v1.Builder/WatchStatus" {
        Access::Observer
    } else if path == "/drvthru.v1.Builder/OpenSession" {
        Access::Admission
    } else if path.starts_with(BUILDER) || path.starts_with("/drvthru.v1.Cache/") {
        Access::Session
    } else {
        // Tickets and anything not listed: deny unless admin.
        Access::Admin
    }
}

/// Who may use the admin socket besides root.
#[derive(Debug, Clone, Copy)]
pub struct AdminPolicy {
    /// The uid the server runs as.
    pub server_uid: u32,
    /// Members of this group are admins too.
    pub admin_gid: Option<u32>,
}

impl AdminPolicy {
    fn allows(&self, peer: &UnixPeer) -> bool {
        if peer.uid == 0 || peer.uid == self.server_uid {
            return true;
        }
        let Some(gid) = self.admin_gid else {
            return false;
        };
        peer.is_member_of(gid)
    }
}

/// The facts authorization decides with.
#[derive(Debug)]
pub struct AuthPolicy {
    tickets: Arc<TicketStore>,
    trusted: BTreeMap<EndpointId, (String, Limits)>,
    admins: AdminPolicy,
    admin_group_name: Option<String>,
}

impl AuthPolicy {
    /// A policy over these tickets, trusted clients and admins.
    pub fn new(
        tickets: Arc<TicketStore>,
        trusted: impl IntoIterator<Item = (String, EndpointId, Limits)>,
        admins: AdminPolicy,
        admin_group_name: Option<String>,
    ) -> Self {
        Self {
            tickets,
            trusted: trusted
                .into_iter()
                .map(|(name, id, limits)| (id, (name, limits)))
                .collect(),
            admins,
            admin_group_name,
        }
    }

    fn authorize(&self, request: &http::Request<Body>) -> Result<Option<Principal>, ServerError> {
        let access = access_for(request.uri().path());
        if access == Access::Public {
            return Ok(None);
        }
        if let Some(peer) = request.extensions().get::<UnixPeer>() {
            return if !self.admins.allows(peer) {
                warn!(uid = peer.uid, pid = ?peer.pid, "refused admin socket caller");
                Err(ServerError::NotAdmin {
                    admin_group: self.admin_group_name.clone(),
                })
            } else if matches!(access, Access::Admission | Access::Session) {
                Err(ServerError::AdminCannotBuild)
            } else {
                Ok(Some(Principal::LocalAdmin { uid: peer.uid }))
            };
        }
        let Some(peer) = request.extensions().get::<IrohPeer>() else {
            return Err(ServerError::Internal(
                "request arrived without transport identity".to_owned(),
            ));
        };
        let principal = self.authenticate_peer(peer.endpoint_id, request.headers(), access)?;
        let allowed = matches!(
            (access, &principal),
            (Access::Observer, Some(Principal::TrustedClient { .. }))
                | (
                    Access::Admission | Access::Session,
                    Some(Principal::TrustedClient { .. } | Principal::TicketHolder { .. })
                )
        );
        if allowed {
            peer.authenticated();
            return Ok(principal);
        }
        Err(match principal {
            None => ServerError::ClientNotTrusted(peer.endpoint_id),
            Some(_) => ServerError::NotAllowed(match access {
                Access::Admin => {
                    "only the builder's local admin may do this (on the builder, through its admin socket)"
                }
                _ => {
                    "ticket holders may build but not watch the builder; trusted clients may watch it"
                }
            }),
        })
    }

    fn authenticate_peer(
        &self,
        endpoint_id: EndpointId,
        headers: &http::HeaderMap,
        access: Access,
    ) -> Result<Option<Principal>, ServerError> {
        if let Some((name, limits)) = self.trusted.get(&endpoint_id) {
            return Ok(Some(Principal::TrustedClient {
                name: name.clone(),
                endpoint_id,
                limits: *limits,
            }));
        }
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Ok(None);
        };
        let (id, secret) = value
            .to_str()
            .ok()
            .and_then(BearerSecret::from_authorization)
            .ok_or(ServerError::MalformedCredentials)?;
        let checked = if access == Access::Session {
            self.tickets.authenticate_session(id, &secret, endpoint_id)
        } else {
            self.tickets
                .authenticate(id, &secret, endpoint_id, proto::now_unix())
        };
        match checked {
            Ok(ticket) => Ok(Some(Principal::TicketHolder {
                ticket,
                secret,
                endpoint_id,
            })),
            Err(refused) => {
                debug!(peer = %endpoint_id.fmt_short(), ticket = %id, %refused, "ticket refused");
                Err(refused.into())
            }
        }
    }
}

impl Policy for AuthPolicy {
    type Grant = Principal;

    fn authorize(&self, request: &http::Request<Body>) -> Result<Option<Principal>, Status> {
        AuthPolicy::authorize(self, request).map_err(Status::from)
    }
}

/// The layer that authorizes every request of the builder's router.
pub type AuthLayer = AuthorizeLayer<AuthPolicy>;

/// The principal the auth layer attached to `request`.
///
/// Handlers call this only for methods the layer guards, so a missing
/// principal is a wiring bug, reported as `INTERNAL`.
pub fn principal<T>(request: &tonic::Request<T>) -> Result<&Principal, ServerError> {
    request.extensions().get::<Principal>().ok_or_else(|| {
        ServerError::Internal("request reached a handler without authorization".to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_map_to_access_levels() {
        assert_eq!(access_for("/grpc.health.v1.Health/Check"), Access::Public);
        assert_eq!(
            access_for("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Access::Public
        );
        assert_eq!(access_for("/drvthru.v1.Builder/Status"), Access::Observer);
        assert_eq!(
            access_for("/drvthru.v1.Builder/WatchStatus"),
            Access::Observer
        );
        assert_eq!(
            access_for("/drvthru.v1.Builder/OpenSession"),
            Access::Admission
        );
        assert_eq!(
            access_for("/drvthru.v1.Builder/UploadInputs"),
            Access::Session
        );
        assert_eq!(access_for("/drvthru.v1.Cache/GetNar"), Access::Session);
        assert_eq!(
            access_for("/drvthru.v1.Tickets/CreateTicket"),
            Access::Admin
        );
        assert_eq!(access_for("/drvthru.v1.Unknown/Thing"), Access::Admin);
    }

    #[test]
    fn admin_policy_accepts_root_self_and_group() {
        let policy = AdminPolicy {
            server_uid: 500,
            admin_gid: Some(10),
        };
        let peer = |uid, gid| UnixPeer {
            uid,
            gid,
            pid: None,
            groups: vec![7],
        };
        assert!(policy.allows(&peer(0, 0)));
        assert!(policy.allows(&peer(500, 500)));
        assert!(policy.allows(&peer(1000, 10)));
        assert!(!policy.allows(&peer(1000, 100)));
        assert!(
            !AdminPolicy {
                server_uid: 500,
                admin_gid: None
            }
            .allows(&peer(1000, 10))
        );
    }
}
