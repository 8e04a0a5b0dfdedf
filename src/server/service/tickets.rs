//! The Tickets service: issuing and managing tickets through the admin socket.

use std::sync::Arc;

use iroh::{Endpoint, EndpointAddr};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::{
    config::Limits,
    nix::signing,
    proto::{self, tickets_server},
    server::{
        error::ServerError,
        sessions::Sessions,
        ticket_store::{NewTicket, StoreError, TicketRecord, TicketStore},
    },
    ticket::{Ticket, TicketId, TicketParseError},
    transport::endpoint::direct_addresses,
    units::{ByteSize, HumanDuration},
};

/// Tickets expire after this long unless told otherwise.
pub const DEFAULT_LIFETIME_SECS: u64 = 2 * 3600;

/// Serves [`tickets_server::Tickets`].
#[derive(Debug)]
pub struct TicketsService {
    store: Arc<TicketStore>,
    /// Live sessions, cancelled when their ticket is revoked.
    sessions: Arc<Sessions>,
    endpoint: Endpoint,
    signing_key: signing::PublicKey,
}

impl TicketsService {
    /// A service issuing tickets for `endpoint`, whose outputs `signing_key`
    /// signs, and revoking them along with their `sessions`.
    pub fn new(
        store: Arc<TicketStore>,
        sessions: Arc<Sessions>,
        endpoint: Endpoint,
        signing_key: signing::PublicKey,
    ) -> Self {
        Self {
            store,
            sessions,
            endpoint,
            signing_key,
        }
    }

    /// The ticket string of `record`, with the builder's current addresses.
    fn ticket_string(&self, record: &TicketRecord) -> String {
        let mut addr = EndpointAddr::new(self.endpoint.id());
        for relay in self.endpoint.addr().relay_urls() {
            addr = addr.with_relay_url(relay.clone());
        }
        for direct in direct_addresses(&self.endpoint) {
            addr = addr.with_ip_addr(direct);
        }
        Ticket::new(
            addr,
            self.signing_key.clone(),
            record.id,
            self.store.secret(record.id),
        )
        .to_string()
    }

    fn find(&self, id: &str) -> Result<TicketRecord, ServerError> {
        let id: TicketId = id.parse().map_err(invalid_ticket)?;
        self.store.get(id).ok_or_else(|| {
            ServerError::NotFound(format!(
                "no ticket with id {id} (see `drv-thru ticket list --all`)"
            ))
        })
    }
}

fn invalid_ticket(err: TicketParseError) -> ServerError {
    ServerError::InvalidArgument(err.to_string())
}

/// A change the builder could not write to disk is not made; the admin may
/// retry once the disk is fixed, as `proto/README.md` promises.
fn store_failed(err: StoreError) -> ServerError {
    tracing::error!("{err:#}");
    ServerError::Unavailable(
        "the builder could not record the ticket change (see its log); nothing was changed, try again"
            .to_owned(),
    )
}

fn new_ticket(request: proto::CreateTicketRequest) -> Result<NewTicket, ServerError> {
    let lifetime_secs = match request.expires_in {
        None => DEFAULT_LIFETIME_SECS,
        Some(expires_in) => proto::std_duration(&expires_in)
            .map(|d| d.as_secs())
            .filter(|secs| *secs > 0)
            .ok_or_else(|| {
                ServerError::InvalidArgument("expires_in must be a positive duration".to_owned())
            })?,
    };
    let uses = match (request.unlimited_uses, request.uses) {
        (true, 0) => None,
        (true, _) => {
            return Err(ServerError::InvalidArgument(
                "give either a number of uses or unlimited uses, not both".to_owned(),
            ));
        }
        (false, 0) => Some(1),
        (false, uses) => Some(uses),
    };
    let defaults = Limits::default();
    let limits = match request.limits {
        None => defaults,
        Some(limits) => Limits {
            max_build_time: match limits.max_build_time {
                None => defaults.max_build_time,
                Some(duration) => proto::std_duration(&duration)
                    .and_then(|d| HumanDuration::try_from(d).ok())
                    .ok_or_else(|| {
                        ServerError::InvalidArgument(
                            "max_build_time must be a positive duration".to_owned(),
                        )
                    })?,
            },
            max_upload_bytes: match limits.max_upload_bytes {
                0 => defaults.max_upload_bytes,
                bytes => ByteSize::new(bytes),
            },
        },
    };
    let bound_client = match request.bind_client.trim() {
        "" => None,
        id => Some(id.parse().map_err(|_| {
            ServerError::InvalidArgument(format!(
                "bind_client {id:?} is not an endpoint id (64 hex characters, as `drv-thru key show` prints)"
            ))
        })?),
    };
    Ok(NewTicket {
        name: request.name.trim().to_owned(),
        lifetime_secs,
        uses,
        limits,
        bound_client,
    })
}

#[tonic::async_trait]
impl tickets_server::Tickets for TicketsService {
    async fn create_ticket(
        &self,
        request: Request<proto::CreateTicketRequest>,
    ) -> Result<Response<proto::CreateTicketResponse>, Status> {
        let new = new_ticket(request.into_inner())?;
        let now = proto::now_unix();
        let (record, _) = self.store.create(new, now).map_err(store_failed)?;
        info!(ticket = %record.id, name = %record.name, "ticket created");
        Ok(Response::new(proto::CreateTicketResponse {
            ticket_string: self.ticket_string(&record),
            ticket: Some(record.to_proto(now)),
        }))
    }

    async fn inspect_ticket(
        &self,
        request: Request<proto::InspectTicketRequest>,
    ) -> Result<Response<proto::InspectTicketResponse>, Status> {
        let ticket: Ticket = request
            .into_inner()
            .ticket_string
            .parse()
            .map_err(invalid_ticket)?;
        let not_here = || {
            ServerError::NotFound(format!(
                "ticket {} was not issued by this builder",
                ticket.id()
            ))
        };
        if ticket.builder_id() != self.endpoint.id() {
            return Err(not_here().into());
        }
        let record = self
            .store
            .get(ticket.id())
            .filter(|_| self.store.secret(ticket.id()).matches(ticket.secret()))
            .ok_or_else(not_here)?;
        Ok(Response::new(proto::InspectTicketResponse {
            ticket: Some(record.to_proto(proto::now_unix())),
        }))
    }

    async fn list_tickets(
        &self,
        request: Request<proto::ListTicketsRequest>,
    ) -> Result<Response<proto::ListTicketsResponse>, Status> {
        let include_inactive = request.into_inner().include_inactive;
        let now = proto::now_unix();
        let tickets = self
            .store
            .list()
            .into_iter()
            .filter(|record| include_inactive || record.state(now) == proto::TicketState::Active)
            .map(|record| record.to_proto(now))
            .collect();
        Ok(Response::new(proto::ListTicketsResponse { tickets }))
    }

    async fn reveal_ticket(
        &self,
        request: Request<proto::RevealTicketRequest>,
    ) -> Result<Response<proto::RevealTicketResponse>, Status> {
        let record = self.find(&request.into_inner().id)?;
        info!(ticket = %record.id, "ticket revealed");
        Ok(Response::new(proto::RevealTicketResponse {
            ticket_string: self.ticket_string(&record),
            ticket: Some(record.to_proto(proto::now_unix())),
        }))
    }

    async fn revoke_ticket(
        &self,
        request: Request<proto::RevokeTicketRequest>,
    ) -> Result<Response<proto::RevokeTicketResponse>, Status> {
        let id = self.find(&request.into_inner().id)?.id;
        let now = proto::now_unix();
        let record = self
            .store
            .revoke(id, now)
            .map_err(store_failed)?
            .ok_or_else(|| ServerError::NotFound(format!("no ticket with id {id}")))?;
        let cancelled = self
            .sessions
            .cancel_ticket(&id.to_string(), "its ticket was revoked");
        info!(ticket = %id, sessions_cancelled = cancelled, "ticket revoked");
        Ok(Response::new(proto::RevokeTicketResponse {
            ticket: Some(record.to_proto(now)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_request_defaults_match_the_docs() {
        let new = new_ticket(proto::CreateTicketRequest::default()).unwrap();
        assert_eq!(new.lifetime_secs, 7200);
        assert_eq!(new.uses, Some(1));
        assert_eq!(new.limits, Limits::default());
        assert_eq!(new.bound_client, None);
    }

    #[test]
    fn create_request_rejects_contradictions() {
        let both = proto::CreateTicketRequest {
            uses: 2,
            unlimited_uses: true,
            ..Default::default()
        };
        assert!(matches!(
            new_ticket(both).unwrap_err(),
            ServerError::InvalidArgument(_)
        ));
        let bad_bind = proto::CreateTicketRequest {
            bind_client: "alex".into(),
            ..Default::default()
        };
        assert!(
            new_ticket(bad_bind)
                .unwrap_err()
                .to_string()
                .contains("key show")
        );
        let unlimited = proto::CreateTicketRequest {
            unlimited_uses: true,
            ..Default::default()
        };
        assert_eq!(new_ticket(unlimited).unwrap().uses, None);
    }
}
