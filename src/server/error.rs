//! Why the server refuses or fails a call, and the one place that maps it to
//! a gRPC status.
//!
//! Refusals with a public reason (`proto/README.md`, "Refusals") carry it in
//! the [`REFUSAL_METADATA`] of their status. The other kinds say which gRPC
//! code they are reported with; their message is made where the failure is
//! understood. Internal failures log their detail there and say "see its
//! log" here, so no caller learns the builder's internals.

use iroh::EndpointId;
use thiserror::Error;
use tonic::{Code, Status, metadata::MetadataValue};

use super::ticket_store::TicketRefusal;
use crate::proto::REFUSAL_METADATA;

/// A budget a peer can use up. Each is refused with `RESOURCE_EXHAUSTED`
/// and its own public reason, so a client can tell which limit it met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Sessions one client (endpoint id) may hold open at once.
    SessionsPerClient,
    /// Sessions one ticket may have open at once.
    SessionsPerTicket,
    /// Sessions the builder holds open at once, all clients together.
    Sessions,
    /// Input bytes one session may upload (`max_upload_bytes`).
    UploadBytes,
    /// Inputs one session may announce.
    Inputs,
    /// Bytes of text-hashed inputs (`.drv` files) one session may announce.
    TextInputBytes,
    /// Import groups (one Nix process each) one session's inputs may need.
    ImportGroups,
    /// Parts of one session's upload held ahead of the bytes before them.
    PartsAhead,
    /// Cache streams open at once, per session or per connection.
    CacheStreams,
}

impl Budget {
    /// The `drvthru-refusal` reason it is refused with.
    pub fn reason(self) -> &'static str {
        match self {
            Self::SessionsPerClient => "too-many-sessions-for-client",
            Self::SessionsPerTicket => "too-many-sessions-for-ticket",
            Self::Sessions => "too-many-sessions",
            Self::UploadBytes => "upload-too-large",
            Self::Inputs => "too-many-inputs",
            Self::TextInputBytes => "text-inputs-too-large",
            Self::ImportGroups => "too-many-import-groups",
            Self::PartsAhead => "too-many-parts-ahead",
            Self::CacheStreams => "too-many-cache-streams",
        }
    }
}

/// Everything the server refuses or fails with.
#[derive(Debug, Clone, Error)]
pub enum ServerError {
    /// An Iroh client neither trusted nor presenting a ticket.
    #[error(
        "client {0} is not trusted by this builder and presented no ticket; \
         use --ticket, or ask the builder's admin to add this key to trustedClients"
    )]
    ClientNotTrusted(EndpointId),
    /// Ticket credentials that are not `Bearer <id>.<secret>`.
    #[error("malformed ticket credentials in the authorization metadata")]
    MalformedCredentials,
    /// The presented ticket does not admit the caller.
    #[error(transparent)]
    Ticket(#[from] TicketRefusal),
    /// An authenticated caller asking for what its kind of caller may not do.
    #[error("{0}")]
    NotAllowed(&'static str),
    /// An admin socket caller who is not an admin.
    #[error("managing this builder requires root{}", admins_besides_root(.admin_group.as_deref()))]
    NotAdmin {
        /// The configured admin group, if any.
        admin_group: Option<String>,
    },
    /// The local admin calling a build session's or the cache's methods:
    /// admins manage the builder, clients build on it over Iroh.
    #[error(
        "build sessions and the cache are served over Iroh, not the admin socket; \
         the admin socket manages the builder"
    )]
    AdminCannotBuild,
    /// The request is malformed or asks for something impossible.
    #[error("{0}")]
    InvalidArgument(String),
    /// What the request names does not exist (for this caller).
    #[error("{0}")]
    NotFound(String),
    /// The request does not fit the state it finds.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A budget would be exceeded; the message says which and what to do.
    #[error("{1}")]
    OverBudget(Budget, String),
    /// A byte range past the end.
    #[error("{0}")]
    OutOfRange(String),
    /// Another call's failure ended the work this one was part of.
    #[error("{0}")]
    Aborted(String),
    /// The work was given up because a call went away.
    #[error("{0}")]
    Cancelled(String),
    /// A passing failure; trying again may work.
    #[error("{0}")]
    Unavailable(String),
    /// The builder failed; the detail is in its log.
    #[error("{0}")]
    Internal(String),
    /// The client's request stream failed; passed on as it came.
    #[error("{}", .0.message())]
    Incoming(Status),
}

fn admins_besides_root(admin_group: Option<&str>) -> String {
    match admin_group {
        Some(group) => format!(", the server's user, or a member of group {group:?}"),
        None => " or the server's user".to_owned(),
    }
}

impl ServerError {
    /// The code and, for refusals, the public reason of this error.
    fn code_and_reason(&self) -> (Code, Option<&'static str>) {
        match self {
            Self::ClientNotTrusted(_) => (Code::Unauthenticated, Some("client-not-trusted")),
            Self::MalformedCredentials | Self::Ticket(TicketRefusal::Unknown) => {
                (Code::Unauthenticated, Some("ticket-unknown"))
            }
            Self::Ticket(TicketRefusal::Revoked(_)) => {
                (Code::PermissionDenied, Some("ticket-revoked"))
            }
            Self::Ticket(TicketRefusal::Expired { .. }) => {
                (Code::PermissionDenied, Some("ticket-expired"))
            }
            Self::Ticket(TicketRefusal::UsedUp { .. }) => {
                (Code::ResourceExhausted, Some("ticket-used-up"))
            }
            Self::Ticket(TicketRefusal::BoundElsewhere { .. }) => {
                (Code::PermissionDenied, Some("ticket-bound-to-other-client"))
            }
            Self::NotAllowed(_) | Self::AdminCannotBuild => {
                (Code::PermissionDenied, Some("not-allowed"))
            }
            Self::NotAdmin { .. } => (Code::PermissionDenied, Some("not-admin")),
            Self::InvalidArgument(_) => (Code::InvalidArgument, None),
            Self::NotFound(_) => (Code::NotFound, None),
            Self::FailedPrecondition(_) => (Code::FailedPrecondition, None),
            Self::OverBudget(budget, _) => (Code::ResourceExhausted, Some(budget.reason())),
            Self::OutOfRange(_) => (Code::OutOfRange, None),
            Self::Aborted(_) => (Code::Aborted, None),
            Self::Cancelled(_) => (Code::Cancelled, None),
            Self::Unavailable(_) => (Code::Unavailable, None),
            Self::Internal(_) => (Code::Internal, None),
            Self::Incoming(status) => (status.code(), None),
        }
    }
}

impl From<Status> for ServerError {
    fn from(status: Status) -> Self {
        Self::Incoming(status)
    }
}

impl From<ServerError> for Status {
    fn from(err: ServerError) -> Self {
        if let ServerError::Incoming(status) = err {
            return status;
        }
        let (code, reason) = err.code_and_reason();
        let mut status = Status::new(code, err.to_string());
        if let Some(reason) = reason {
            status
                .metadata_mut()
                .insert(REFUSAL_METADATA, MetadataValue::from_static(reason));
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_a_reason_code() {
        let status = Status::from(ServerError::Ticket(TicketRefusal::Unknown));
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(
            status.metadata().get(REFUSAL_METADATA).unwrap(),
            "ticket-unknown"
        );
    }

    #[test]
    fn an_exhausted_budget_is_named() {
        let status = Status::from(ServerError::OverBudget(Budget::Sessions, "too many".into()));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.metadata().get(REFUSAL_METADATA).unwrap(),
            "too-many-sessions"
        );
    }

    #[test]
    fn other_kinds_carry_no_reason() {
        let status = Status::from(ServerError::NotFound("no such thing".into()));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "no such thing");
        assert!(status.metadata().get(REFUSAL_METADATA).is_none());
    }

    #[test]
    fn not_admin_names_who_may_manage_the_builder() {
        let status = Status::from(ServerError::NotAdmin {
            admin_group: Some("wheel".into()),
        });
        assert_eq!(
            status.message(),
            "managing this builder requires root, the server's user, or a member of group \"wheel\""
        );
        assert_eq!(
            status.metadata().get(REFUSAL_METADATA).unwrap(),
            "not-admin"
        );
    }
}
