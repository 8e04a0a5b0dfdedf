//! The Builder service: status for observers, and build session admission.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
};

use tokio_stream::{Stream, StreamExt, wrappers::WatchStream};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{
    auth::{Principal, principal, ticket_refusal_status},
    status::{ClientLabel, StatusBoard},
    ticket_store::{TakeUseError, TicketStore},
};
use crate::{
    nix::store_path::StorePath,
    proto::{self, BuildPhase, BuildResult, builder_server},
    transport::IrohPeer,
};

/// An admitted session: who owns it.
#[derive(Debug)]
struct Session {
    owner: iroh::EndpointId,
}

/// Serves [`builder_server::Builder`].
#[derive(Debug)]
pub struct BuilderService {
    board: Arc<StatusBoard>,
    tickets: Arc<TicketStore>,
    signing_key: String,
    sessions: Arc<Mutex<HashMap<String, Session>>>,
}

impl BuilderService {
    /// A service reporting to `board` and admitting with `tickets`.
    pub fn new(board: Arc<StatusBoard>, tickets: Arc<TicketStore>, signing_key: String) -> Self {
        Self {
            board,
            tickets,
            signing_key,
            sessions: Arc::default(),
        }
    }
}

fn new_session_id() -> String {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    format!("s-{}", data_encoding::HEXLOWER.encode(&bytes))
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<proto::WatchStatusResponse, Status>> + Send>>;

#[tonic::async_trait]
impl builder_server::Builder for BuilderService {
    async fn status(
        &self,
        _: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        Ok(Response::new(proto::StatusResponse {
            status: Some(self.board.snapshot()),
        }))
    }

    type WatchStatusStream = StatusStream;

    async fn watch_status(
        &self,
        _: Request<proto::WatchStatusRequest>,
    ) -> Result<Response<StatusStream>, Status> {
        let board = self.board.clone();
        let stream = WatchStream::new(self.board.subscribe()).map(move |snapshot| {
            Ok(proto::WatchStatusResponse {
                status: Some(board.render(&snapshot)),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn open_session(
        &self,
        request: Request<proto::OpenSessionRequest>,
    ) -> Result<Response<proto::OpenSessionResponse>, Status> {
        let principal = principal(&request)?.clone();
        let peer = request
            .extensions()
            .get::<IrohPeer>()
            .cloned()
            .ok_or_else(|| {
                Status::failed_precondition(
                    "build sessions are opened over Iroh, not the admin socket",
                )
            })?;
        let drv_path: StorePath = request
            .get_ref()
            .drv_path
            .parse()
            .map_err(|err| Status::invalid_argument(format!("drv_path: {err}")))?;
        if !drv_path.is_derivation() {
            return Err(Status::invalid_argument(format!(
                "drv_path {drv_path} is not a derivation (.drv)"
            )));
        }
        let (label, limits) = match principal {
            Principal::TrustedClient {
                name,
                endpoint_id,
                limits,
            } => (
                ClientLabel {
                    endpoint_id: endpoint_id.to_string(),
                    label: name,
                    ticket_id: None,
                },
                limits,
            ),
            Principal::TicketHolder {
                ticket,
                secret,
                endpoint_id,
            } => {
                // Authentication did not take a use; admission does, under the
                // store's lock, so racing clients cannot share the last use.
                let ticket = self
                    .tickets
                    .take_use(ticket.id, &secret, endpoint_id, proto::now_unix())
                    .map_err(|err| match err {
                        TakeUseError::Refused(refused) => ticket_refusal_status(&refused),
                        TakeUseError::Store(err) => {
                            tracing::error!("{err:#}");
                            Status::unavailable(
                                "the builder could not record the ticket use; try again",
                            )
                        }
                    })?;
                (
                    ClientLabel {
                        endpoint_id: endpoint_id.to_string(),
                        label: ticket.name.clone(),
                        ticket_id: Some(ticket.id.to_string()),
                    },
                    ticket.limits,
                )
            }
            Principal::LocalAdmin { .. } => {
                return Err(Status::permission_denied(
                    "the local admin does not build through the admin socket",
                ));
            }
        };
        let session_id = new_session_id();
        info!(session = %session_id, client = %label.label, peer = %peer.endpoint_id.fmt_short(), drv = %drv_path, "session admitted");
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(
                session_id.clone(),
                Session {
                    owner: peer.endpoint_id,
                },
            );
        self.board.admit(
            &session_id,
            label.clone(),
            &drv_path.to_string(),
            BuildPhase::CheckingInputs,
        );

        // A session lives as long as its connection: a vanished client
        // frees everything it held within the QUIC idle timeout.
        let board = self.board.clone();
        let sessions = self.sessions.clone();
        let id = session_id.clone();
        tokio::spawn(async move {
            let reason = peer.connection.closed().await;
            let removed = sessions
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(&id);
            if let Some(session) = removed {
                warn!(session = %id, peer = %session.owner.fmt_short(), %reason, "client left; session cancelled");
                board.finish(&id, BuildResult::Cancelled, "client disconnected");
            }
        });

        Ok(Response::new(proto::OpenSessionResponse {
            session_id,
            limits: Some(limits.into()),
            signing_public_key: self.signing_key.clone(),
            client_label: label.label,
        }))
    }
}
