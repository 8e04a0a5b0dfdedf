//! The Builder service: status for observers, and build sessions (admission,
//! input upload, the build itself).

use std::{
    collections::{BTreeMap, BTreeSet},
    pin::Pin,
    sync::Arc,
};

use tokio_stream::{
    Stream, StreamExt,
    wrappers::{ReceiverStream, WatchStream},
};
use tonic::{Request, Response, Status, Streaming, metadata::MetadataValue};
use tracing::{error, info, warn};

use super::owner;
use crate::{
    config::Limits,
    nix::{content_address::ContentAddress, import_order::import_groups, store_path::StorePath},
    nixcmd::Nix,
    proto::{self, BuildPhase, BuildResult, builder_server},
    server::{
        auth::{Principal, principal},
        build_queue::{self, BuildContext},
        declared_input::DeclaredInput,
        error::{Budget, ServerError},
        sessions::{
            BuildState, MAX_IMPORT_GROUPS, MAX_INPUTS, MAX_TEXT_INPUT_BYTES, Session, Sessions,
        },
        signed_inputs::{self, TrustedKeys},
        status::{ClientLabel, StatusBoard},
        ticket_store::{TakeUseError, TicketStore},
        upload::Uploads,
    },
    transport::IrohPeer,
};

/// Serves [`builder_server::Builder`].
#[derive(Debug)]
pub struct BuilderService {
    board: Arc<StatusBoard>,
    tickets: Arc<TicketStore>,
    sessions: Arc<Sessions>,
    signing_key: String,
    uploads: Arc<Uploads>,
    build: BuildContext,
    idle_timeout: std::time::Duration,
}

impl BuilderService {
    /// A service reporting to `board`, admitting with `tickets`, keeping
    /// `sessions` (ended after `idle_timeout` unused) and their `uploads`,
    /// and building with `build`.
    pub fn new(
        board: Arc<StatusBoard>,
        tickets: Arc<TicketStore>,
        sessions: Arc<Sessions>,
        signing_key: String,
        uploads: Uploads,
        build: BuildContext,
        idle_timeout: std::time::Duration,
    ) -> Self {
        Self {
            board,
            tickets,
            sessions,
            signing_key,
            uploads: Arc::new(uploads),
            build,
            idle_timeout,
        }
    }

    fn nix(&self) -> &Nix {
        &self.build.nix
    }

    /// Takes a ticket holder's use and returns the limits of `principal`'s
    /// session.
    fn take_use(&self, principal: &Principal) -> Result<Limits, ServerError> {
        match principal {
            Principal::TrustedClient { limits, .. } => Ok(*limits),
            Principal::TicketHolder {
                ticket,
                secret,
                endpoint_id,
            } => {
                // Authentication did not take a use; admission does, under the
                // store's lock, so racing clients cannot share the last use.
                let ticket = self
                    .tickets
                    .take_use(ticket.id, secret, *endpoint_id, proto::now_unix())
                    .map_err(|err| match err {
                        TakeUseError::Refused(refused) => refused.into(),
                        TakeUseError::Store(err) => {
                            error!("{err:#}");
                            ServerError::Unavailable(
                                "the builder could not record the ticket use; try again".to_owned(),
                            )
                        }
                    })?;
                Ok(ticket.limits)
            }
            Principal::LocalAdmin { .. } => Err(ServerError::AdminCannotBuild),
        }
    }

    /// The announced `signed` inputs the builder asks for (see
    /// [`signed_inputs`]), given the session's content-addressed `inputs`.
    /// Should its Nix fail to say which keys it trusts or which paths it
    /// has, none are: they are then built or substituted as if never
    /// announced.
    async fn accepted_signed(
        &self,
        session_id: &str,
        signed: Vec<DeclaredInput>,
        inputs: &BTreeMap<StorePath, DeclaredInput>,
    ) -> BTreeMap<StorePath, DeclaredInput> {
        if signed.is_empty() {
            return BTreeMap::new();
        }
        let keys = match self.nix().trust().await {
            Ok(trust) => TrustedKeys::from_config(&trust.trusted_public_keys),
            Err(err) => {
                warn!(session = %session_id, "signed inputs ignored: reading the trusted keys: {err}");
                return BTreeMap::new();
            }
        };
        let signed: Vec<DeclaredInput> = signed
            .into_iter()
            .filter(|input| keys.vouch_for(input))
            .collect();
        if signed.is_empty() {
            return BTreeMap::new();
        }
        let checked = signed_inputs::paths_to_check(&signed, inputs);
        let invalid: BTreeSet<StorePath> = match self.nix().invalid_paths(&checked).await {
            Ok(invalid) => invalid.into_iter().collect(),
            Err(err) => {
                warn!(session = %session_id, "signed inputs ignored: checking their references: {err}");
                return BTreeMap::new();
            }
        };
        let valid = checked
            .into_iter()
            .filter(|path| !invalid.contains(path))
            .collect();
        signed_inputs::accepted(signed, &keys, inputs, &valid)
    }

    /// Ends `session` when its connection closes or it sits idle: stops its
    /// build, drops its upload and its outputs' roots, frees its slot and
    /// records how it ended.
    fn end_when_over(&self, session: Arc<Session>, peer: IrohPeer) {
        let board = self.board.clone();
        let sessions = self.sessions.clone();
        let uploads = self.uploads.clone();
        let roots = self.build.roots.clone();
        let idle_timeout = self.idle_timeout;
        tokio::spawn(async move {
            let reason = tokio::select! {
                reason = peer.connection.closed() => reason.to_string(),
                () = idle(&session, idle_timeout) => {
                    session.cancel_because(
                        "no build started and no upload progressed for session_idle_timeout",
                    );
                    format!("idle for {}", humantime::format_duration(idle_timeout))
                }
            };
            session.cancelled.cancel();
            uploads.remove(&session.id);
            // Its client has fetched the outputs, or never will.
            roots.remove(&session.id);
            if sessions.remove(&session.id).is_some() {
                let why = session.cancelled_because().unwrap_or("client disconnected");
                let (result, message) = session
                    .outcome()
                    .unwrap_or((BuildResult::Cancelled, why.to_owned()));
                info!(session = %session.id, %reason, ?result, "session ended");
                board.finish(&session.id, result, &message);
            }
        });
    }
}

/// Returns once `session` has sat idle for `timeout`: admitted, but its
/// upload made no progress and its build did not start.
async fn idle(session: &Session, timeout: std::time::Duration) {
    loop {
        let idle_for = session.idle_for();
        if idle_for >= timeout {
            return;
        }
        tokio::time::sleep(timeout - idle_for).await;
    }
}

fn iroh_peer<T>(request: &Request<T>) -> Result<IrohPeer, ServerError> {
    request
        .extensions()
        .get::<IrohPeer>()
        .cloned()
        // The auth layer refuses session methods on the admin socket.
        .ok_or_else(|| {
            ServerError::Internal("a session call arrived without an Iroh peer".to_owned())
        })
}

/// Who is building, for status and logs.
fn client_label(principal: &Principal) -> Result<ClientLabel, ServerError> {
    match principal {
        Principal::TrustedClient {
            name, endpoint_id, ..
        } => Ok(ClientLabel {
            endpoint_id: endpoint_id.to_string(),
            label: name.clone(),
            ticket_id: None,
        }),
        Principal::TicketHolder {
            ticket,
            endpoint_id,
            ..
        } => Ok(ClientLabel {
            endpoint_id: endpoint_id.to_string(),
            label: ticket.name.clone(),
            ticket_id: Some(ticket.id.to_string()),
        }),
        Principal::LocalAdmin { .. } => Err(ServerError::AdminCannotBuild),
    }
}

/// A status row of a session being admitted, withdrawn unless the session
/// was admitted: a call cancelled half-way leaves no row behind.
struct AdmissionRow<'a> {
    board: &'a StatusBoard,
    session_id: &'a str,
    admitted: bool,
}

impl AdmissionRow<'_> {
    /// Keeps the row: the session was admitted.
    fn keep(mut self) {
        self.admitted = true;
    }
}

impl Drop for AdmissionRow<'_> {
    fn drop(&mut self) {
        if !self.admitted {
            self.board.withdraw(self.session_id);
        }
    }
}

fn new_session_id() -> String {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    format!("s-{}", data_encoding::HEXLOWER.encode(&bytes))
}

/// The content-addressed inputs of `drv_path`, checked; `signed` more
/// inputs are announced besides, which count against the same budget.
fn declared_inputs(
    drv_path: &StorePath,
    inputs: Vec<proto::InputPath>,
    signed: usize,
) -> Result<BTreeMap<StorePath, DeclaredInput>, ServerError> {
    let announced = inputs.len().saturating_add(signed);
    if announced > MAX_INPUTS {
        return Err(ServerError::OverBudget(
            Budget::Inputs,
            format!(
                "{announced} inputs announced (signed ones included); a session may announce \
                 at most {MAX_INPUTS}"
            ),
        ));
    }
    let mut declared = BTreeMap::new();
    for input in inputs {
        let input = DeclaredInput::from_proto(input)?;
        declared.insert(input.path.clone(), input);
    }
    // Saturating: sizes are the peer's word, and a sum past u64 is over
    // any budget.
    let text_bytes = declared
        .values()
        .filter(|input| matches!(input.content_address(), Some(ContentAddress::Text(_))))
        .fold(0u64, |total, input| total.saturating_add(input.nar_size));
    if text_bytes > MAX_TEXT_INPUT_BYTES {
        return Err(ServerError::OverBudget(
            Budget::TextInputBytes,
            format!(
                "the text inputs (.drv files) announced come to {text_bytes} bytes; \
                 a session may announce at most {MAX_TEXT_INPUT_BYTES}"
            ),
        ));
    }
    if !declared.contains_key(drv_path) {
        return Err(ServerError::InvalidArgument(format!(
            "the inputs must include the derivation {drv_path} itself"
        )));
    }
    for input in declared.values() {
        if let Some(outside) = input.references.iter().find(|r| !declared.contains_key(*r)) {
            return Err(ServerError::InvalidArgument(format!(
                "input {} refers to {outside}, which is not among the inputs (send the whole closure)",
                input.path
            )));
        }
    }
    Ok(declared)
}

/// The inputs in the order the builder's Nix adds them, references first.
/// Clients are asked to send missing inputs in this order, so an import that
/// reads inputs while they arrive never waits for one that comes last.
/// Refused if that takes more than [`MAX_IMPORT_GROUPS`] Nix processes.
fn import_order(
    inputs: &BTreeMap<StorePath, DeclaredInput>,
) -> Result<Vec<StorePath>, ServerError> {
    let references = inputs
        .iter()
        .map(|(path, input)| (path.clone(), input.references.clone()))
        .collect();
    let groups = import_groups(&references).map_err(|cycle| {
        ServerError::InvalidArgument(format!("{cycle}; a store closure has no cycles"))
    })?;
    if groups.len() > MAX_IMPORT_GROUPS {
        return Err(ServerError::OverBudget(
            Budget::ImportGroups,
            format!(
                "the inputs form {} import groups (paths that refer to .drv files, \
                 and .drv files that refer to those, each start one, and each takes the \
                 builder a Nix process); a session may form at most {MAX_IMPORT_GROUPS}",
                groups.len()
            ),
        ));
    }
    Ok(groups.into_iter().flat_map(|group| group.paths).collect())
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<proto::WatchStatusResponse, Status>> + Send>>;
type BuildStream = Pin<Box<dyn Stream<Item = Result<proto::BuildResponse, Status>> + Send>>;

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
        let peer = iroh_peer(&request)?;
        let proto::OpenSessionRequest {
            drv_path,
            inputs,
            signed_inputs,
        } = request.into_inner();
        let drv_path: StorePath = drv_path
            .parse()
            .map_err(|err| ServerError::InvalidArgument(format!("drv_path: {err}")))?;
        if !drv_path.is_derivation() {
            return Err(ServerError::InvalidArgument(format!(
                "drv_path {drv_path} is not a derivation (.drv)"
            ))
            .into());
        }
        let mut inputs = declared_inputs(&drv_path, inputs, signed_inputs.len())?;
        let signed = signed_inputs
            .into_iter()
            .map(DeclaredInput::signed_from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        let mut order = import_order(&inputs)?;
        let label = client_label(&principal)?;
        let session_id = new_session_id();
        // From here on the slot is held, and given back however the call
        // ends; the ticket use is taken only with the admission itself, so
        // a call cancelled while Nix checks the inputs costs none.
        let reservation = self.sessions.reserve(
            session_id.clone(),
            peer.endpoint_id,
            label.ticket_id.clone(),
        )?;
        self.board.admit(
            &session_id,
            label.clone(),
            &drv_path.to_string(),
            BuildPhase::CheckingInputs,
        );
        let row = AdmissionRow {
            board: &self.board,
            session_id: &session_id,
            admitted: false,
        };
        let accepted = self.accepted_signed(&session_id, signed, &inputs).await;
        if !accepted.is_empty() {
            info!(session = %session_id, paths = accepted.len(), "signed inputs accepted");
            inputs.extend(accepted);
            order = import_order(&inputs)?;
        }
        let missing = match self.nix().invalid_paths(&order).await {
            Ok(invalid) => {
                let invalid: BTreeSet<StorePath> = invalid.into_iter().collect();
                order
                    .into_iter()
                    .filter(|path| invalid.contains(path))
                    .collect::<Vec<_>>()
            }
            Err(err) => {
                error!(session = %session_id, "checking inputs: {err}");
                self.board
                    .finish(&session_id, BuildResult::Error, "could not check inputs");
                return Err(ServerError::Internal(
                    "the builder could not check which inputs it has; see its log".to_owned(),
                )
                .into());
            }
        };
        let mut limits = Limits::default();
        let session = self.sessions.admit(reservation, || {
            limits = self.take_use(&principal)?;
            Ok(Arc::new(Session::new(
                session_id.clone(),
                owner(&peer),
                label.clone(),
                limits,
                drv_path.clone(),
                inputs,
                missing.iter().cloned().collect(),
            )))
        })?;
        row.keep();
        self.board
            .set_phase(&session_id, BuildPhase::WaitingForClient);
        info!(session = %session_id, client = %label.label, peer = %peer.endpoint_id.fmt_short(), drv = %drv_path, "session admitted");
        self.end_when_over(session, peer);
        let mut response = Response::new(proto::OpenSessionResponse {
            session_id,
            limits: Some(limits.into()),
            signing_public_key: self.signing_key.clone(),
            client_label: label.label,
            missing_inputs: missing.iter().map(ToString::to_string).collect(),
        });
        // gRPC's own way of saying which encodings requests may use, so a
        // client compresses its upload only for a builder that takes it.
        response.metadata_mut().insert(
            proto::ACCEPT_ENCODING_METADATA,
            MetadataValue::from_static(proto::ACCEPTED_ENCODINGS),
        );
        Ok(response)
    }

    async fn upload_inputs(
        &self,
        request: Request<Streaming<proto::UploadInputsRequest>>,
    ) -> Result<Response<proto::UploadInputsResponse>, Status> {
        let peer = iroh_peer(&request)?;
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| ServerError::InvalidArgument("empty upload".to_owned()))?;
        let session = self.sessions.get(&first.session_id, owner(&peer))?;
        if session.build_state() != BuildState::NotStarted {
            return Err(ServerError::FailedPrecondition(
                "inputs can only be uploaded before the build starts".to_owned(),
            )
            .into());
        }
        let call = session.upload_call();
        self.board.set_phase(&session.id, BuildPhase::Uploading);
        let messages = tokio_stream::once(Ok(first)).chain(stream);
        let result = self.uploads.receive(&session, messages).await;
        // A client may upload over several calls at once: it is waited for
        // only once none is under way.
        if call.end() {
            self.board
                .set_phase(&session.id, BuildPhase::WaitingForClient);
        }
        Ok(Response::new(result?))
    }

    type BuildStream = BuildStream;

    async fn build(
        &self,
        request: Request<proto::BuildRequest>,
    ) -> Result<Response<BuildStream>, Status> {
        let peer = iroh_peer(&request)?;
        let proto::BuildRequest {
            session_id,
            rebuild,
        } = request.into_inner();
        let session = self.sessions.get(&session_id, owner(&peer))?;
        session.start_build()?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        self.build
            .tasks
            .spawn(build_queue::run(self.build.clone(), session, rebuild, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::{nix::hash::Sha256Hash, proto::REFUSAL_METADATA};

    /// A text-hashed input named `name` holding `contents` and referring to
    /// `references`, announced with a NAR of `nar_size` bytes.
    fn text_input(
        name: &str,
        contents: &str,
        references: &[&proto::InputPath],
        nar_size: u64,
    ) -> proto::InputPath {
        let ca = ContentAddress::Text(Sha256Hash::digest(contents.as_bytes()));
        let references: BTreeSet<StorePath> = references
            .iter()
            .map(|input| input.store_path.parse().unwrap())
            .collect();
        proto::InputPath {
            store_path: ca.store_path(name, &references, false).unwrap().to_string(),
            references: references.iter().map(ToString::to_string).collect(),
            content_address: ca.to_string(),
            nar_hash: Sha256Hash::digest(b"not checked here").to_string(),
            nar_size,
        }
    }

    /// Announces `inputs`, the last being the derivation to build, as
    /// `OpenSession` checks them before anything else.
    fn announce(inputs: Vec<proto::InputPath>) -> Result<Vec<StorePath>, ServerError> {
        let drv: StorePath = inputs.last().unwrap().store_path.parse().unwrap();
        import_order(&declared_inputs(&drv, inputs, 0)?)
    }

    /// The refusal reason of a budget `refused` met.
    fn over_budget(refused: ServerError) -> String {
        let status = Status::from(refused);
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let reason = status.metadata().get(REFUSAL_METADATA).unwrap();
        reason.to_str().unwrap().to_owned()
    }

    #[test]
    fn more_inputs_than_a_session_may_announce_are_refused() {
        let inputs = vec![proto::InputPath::default(); MAX_INPUTS];
        let drv: StorePath = "/nix/store/00000000000000000000000000000000-x.drv"
            .parse()
            .unwrap();
        let refused = declared_inputs(&drv, inputs, 1).unwrap_err();
        assert_eq!(over_budget(refused), "too-many-inputs");
    }

    #[test]
    fn text_inputs_are_refused_past_their_budget_in_all() {
        let half = MAX_TEXT_INPUT_BYTES / 2;
        let source = text_input("names", "hello", &[], half);
        let drv = text_input("x.drv", "Derive([])", &[&source], half);
        assert_eq!(announce(vec![source.clone(), drv]).unwrap().len(), 2);

        let drv = text_input("x.drv", "Derive([])", &[&source], half + 1);
        let refused = announce(vec![source, drv]).unwrap_err();
        assert_eq!(over_budget(refused), "text-inputs-too-large");

        // Sizes are the peer's word: a sum past u64 is over budget too.
        let huge = text_input("names", "hello", &[], u64::MAX);
        let drv = text_input("x.drv", "Derive([])", &[&huge], u64::MAX);
        let refused = announce(vec![huge, drv]).unwrap_err();
        assert_eq!(over_budget(refused), "text-inputs-too-large");
    }

    /// A chain of `len` inputs alternating text files and `.drv` files,
    /// each naming the one before; each starts an import group of its own.
    fn alternating_chain(len: usize) -> Vec<proto::InputPath> {
        let mut chain: Vec<proto::InputPath> = Vec::new();
        for i in 0..len {
            let name = if i % 2 == 0 {
                format!("text{i}")
            } else {
                format!("step{i}.drv")
            };
            let before: Vec<&proto::InputPath> = chain.last().into_iter().collect();
            let input = text_input(&name, &format!("step {i}"), &before, 100);
            chain.push(input);
        }
        chain
    }

    #[test]
    fn a_chain_of_more_import_groups_than_allowed_is_refused() {
        let allowed = alternating_chain(MAX_IMPORT_GROUPS);
        assert_eq!(announce(allowed).unwrap().len(), MAX_IMPORT_GROUPS);

        let refused = announce(alternating_chain(MAX_IMPORT_GROUPS + 2)).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains(&format!("{} import groups", MAX_IMPORT_GROUPS + 2)),
            "{refused}"
        );
        assert_eq!(over_budget(refused), "too-many-import-groups");
    }
}
