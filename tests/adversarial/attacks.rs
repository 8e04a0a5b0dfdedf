//! The attacks, each an async function from the arena to what it saw and
//! what it holds. The suite's tables and the soak run them.

use std::{collections::BTreeSet, time::Duration};

use bytes::Bytes;
use drv_thru::{
    client::Connection,
    nix::{
        content_address::{FileIngestionMethod, make_fixed_output_path, make_text_path},
        hash::{Hash, Sha256Hash},
    },
    proto::{
        self, ALPN, GetNarInfoRequest, GetNarRequest, InputPath, UploadInputsRequest,
        builder_client::BuilderClient, cache_client::CacheClient,
    },
    transport::endpoint::{EndpointOptions, RelayChoice},
};
use futures::{StreamExt, stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    arena::Arena,
    common::{bare_connection, refusal, session_request},
    faults::{Held, Outcome, Tally, count, tally_text},
};

/// Largest health request the builder takes (`proto/README.md`).
const PUBLIC_MESSAGE_LIMIT: usize = 16 << 10;
/// Largest request everywhere else.
const MESSAGE_LIMIT: usize = 4 << 20;

/// `CODE` or `CODE/reason` of a refused call, as the fault table shows it.
pub fn seen(status: &Status) -> String {
    match refusal(status) {
        "" => format!("{:?}", status.code()),
        reason => format!("{:?}/{reason}", status.code()),
    }
}

/// `Ok` or how the call was refused.
fn outcome<T>(result: Result<T, Status>) -> String {
    result.map_or_else(|status| seen(&status), |_| "Ok".to_owned())
}

/// `seen` with nothing held.
fn nothing_held(seen: String) -> Outcome {
    (seen, Held::default())
}

/// A fresh endpoint with a key of its own, made in memory.
async fn fresh_endpoint() -> iroh::Endpoint {
    EndpointOptions::new(iroh::SecretKey::generate())
        .relay(RelayChoice::Disabled)
        .bind()
        .await
        .unwrap()
}

/// Dials the builder with an ALPN it does not speak.
pub async fn wrong_alpn(arena: &Arena) -> Outcome {
    let endpoint = fresh_endpoint().await;
    let addr = arena.builder.direct_target().addr().unwrap();
    let result = endpoint.connect(addr, b"drv-thru/not-grpc/9").await;
    endpoint.close().await;
    nothing_held(match result {
        Ok(_) => "accepted".to_owned(),
        Err(_) => "handshake refused".to_owned(),
    })
}

/// Sends random bytes where the HTTP/2 preface belongs; the builder must
/// end the stream rather than wait.
pub async fn garbage_instead_of_http2(arena: &Arena) -> Outcome {
    let (endpoint, connection) =
        bare_connection(&arena.builder.direct_target(), &arena.key("garbage")).await;
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let garbage: Vec<u8> = (0..64 << 10)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    let _ = send.write_all(&garbage).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20)).await;
    endpoint.close().await;
    nothing_held(match ended {
        Ok(_) => "stream closed".to_owned(),
        Err(_) => "stream left open".to_owned(),
    })
}

/// An HTTP/2 connection spoken by hand over a QUIC stream of `connection`.
async fn h2_client(connection: &iroh::endpoint::Connection) -> h2::client::SendRequest<Bytes> {
    let (send, recv) = connection.open_bi().await.unwrap();
    let (client, driver) = h2::client::handshake(tokio::io::join(recv, send))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = driver.await;
    });
    client
}

/// The head of a gRPC call of `path`; its body is sent after.
fn grpc_request(path: &str) -> http::Request<()> {
    http::Request::post(format!("http://builder{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// `message` in gRPC's length-prefixed framing.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut framed = vec![0];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed.into()
}

/// A health `Check` whose body is not a protobuf message: valid HTTP/2,
/// garbage gRPC.
pub async fn garbage_grpc_message(arena: &Arena) -> Outcome {
    let (endpoint, connection) =
        bare_connection(&arena.builder.direct_target(), &arena.key("badgrpc")).await;
    let mut client = h2_client(&connection).await;
    let (response, mut body) = client
        .send_request(grpc_request("/grpc.health.v1.Health/Check"), false)
        .unwrap();
    body.send_data(grpc_frame(&[0xff; 64]), true).unwrap();
    let seen = match tokio::time::timeout(Duration::from_secs(10), response).await {
        Ok(Ok(response)) => grpc_status_of(response).await,
        Ok(Err(err)) => format!("reset: {err}"),
        Err(_) => "no answer".to_owned(),
    };
    endpoint.close().await;
    nothing_held(seen)
}

/// The gRPC status of a hand-made call's response: from its headers
/// (trailers-only) or its trailers.
async fn grpc_status_of(response: http::Response<h2::RecvStream>) -> String {
    match grpc_status_and_message(response).await {
        Ok((code, _)) => code,
        Err(missing) => missing,
    }
}

/// `grpc-message` as it was before gRPC percent-encoded it.
fn percent_decoded(message: &str) -> String {
    let bytes = message.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escaped = (bytes[at] == b'%')
            .then(|| message.get(at + 1..at + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                at += 3;
            }
            None => {
                decoded.push(bytes[at]);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// The gRPC status code and message of a hand-made call's response, or
/// what it lacks.
async fn grpc_status_and_message(
    response: http::Response<h2::RecvStream>,
) -> Result<(String, String), String> {
    let status_of = |headers: &http::HeaderMap| {
        let code = headers
            .get("grpc-status")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<i32>().ok())?;
        let message = headers
            .get("grpc-message")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        Some((
            format!("{:?}", tonic::Code::from(code)),
            percent_decoded(message),
        ))
    };
    if let Some(status) = status_of(response.headers()) {
        return Ok(status);
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        if chunk.is_err() {
            break;
        }
    }
    match body.trailers().await {
        Ok(Some(trailers)) => status_of(&trailers).ok_or_else(|| "no grpc-status".to_owned()),
        _ => Err("no trailers".to_owned()),
    }
}

/// A health `Check` naming a service of `length` bytes.
async fn health_check(arena: &Arena, key: &str, length: usize) -> Result<(), Status> {
    let stranger = arena.stranger(key).await;
    let result = HealthClient::new(stranger.channel.clone())
        .check(HealthCheckRequest {
            service: "x".repeat(length),
        })
        .await;
    stranger.close().await;
    result.map(drop)
}

/// A health request just over the public services' limit.
pub async fn oversized_health_request(arena: &Arena) -> Outcome {
    nothing_held(outcome(
        health_check(arena, "oversized-health", PUBLIC_MESSAGE_LIMIT + 1).await,
    ))
}

/// Finding 19: a health `Check` for an unknown service with a name just
/// under the limit; the answer must not echo it back whole.
pub async fn huge_unknown_service_name(arena: &Arena) -> Outcome {
    let refused = health_check(arena, "long-name", PUBLIC_MESSAGE_LIMIT - 64)
        .await
        .expect_err("no such service");
    let length = refused.message().len();
    nothing_held(if length <= 1024 {
        seen(&refused)
    } else {
        format!("{} echoing {length} bytes", seen(&refused))
    })
}

/// Finding 2: reflection, which echoes requests, is not served over Iroh.
pub async fn reflection_over_iroh(arena: &Arena) -> Outcome {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let stranger = arena.stranger("reflector").await;
    let request = ServerReflectionRequest {
        host: "x".repeat(PUBLIC_MESSAGE_LIMIT - 64),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let result = ServerReflectionClient::new(stranger.channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await;
    stranger.close().await;
    nothing_held(outcome(result))
}

/// Finding 2: strangers (`peers` of them, each with the two QUIC streams
/// it is allowed) send health requests of nearly 16 KiB on as many HTTP/2
/// streams as they are given, and never read a reply.
pub async fn unread_requests_from_strangers(arena: &Arena, peers: usize) -> Outcome {
    let mut held = Held::default();
    let sent = Tally::default();
    let target = arena.builder.direct_target();
    for peer in 0..peers {
        let (endpoint, connection) =
            bare_connection(&target, &arena.key(&format!("unread-{peer}"))).await;
        for _ in 0..2 {
            let Ok(client) =
                tokio::time::timeout(Duration::from_secs(5), h2_client(&connection)).await
            else {
                count(&sent, "no stream");
                continue;
            };
            let name = HealthCheckRequest {
                service: "y".repeat(PUBLIC_MESSAGE_LIMIT - 64),
            };
            let message = grpc_frame(&prost::Message::encode_to_vec(&name));
            for _ in 0..64 {
                let ready =
                    tokio::time::timeout(Duration::from_millis(500), client.clone().ready()).await;
                let Ok(Ok(mut ready)) = ready else {
                    count(&sent, "refused a stream");
                    break;
                };
                let Ok((response, mut body)) =
                    ready.send_request(grpc_request("/grpc.health.v1.Health/Check"), false)
                else {
                    break;
                };
                let _ = body.send_data(message.clone(), true);
                count(&sent, "sent");
                held.keep((response, body));
            }
            held.keep(client);
        }
        held.keep(connection);
        held.endpoint(endpoint);
    }
    (format!("held: {}", tally_text(&sent)), held)
}

/// Finding 1 and "thousands of connection attempts": `keys` strangers dial
/// `per_key` connections each at once and then sit idle.
pub async fn idle_connections_from_many_keys(
    arena: &Arena,
    keys: usize,
    per_key: usize,
) -> Outcome {
    let addr = arena.builder.direct_target().addr().unwrap();
    let endpoints: Vec<iroh::Endpoint> = stream::iter(0..keys)
        .map(|_| fresh_endpoint())
        .buffer_unordered(32)
        .collect()
        .await;
    let attempts = endpoints.iter().flat_map(|endpoint| {
        let addr = addr.clone();
        (0..per_key).map(move |_| (endpoint.clone(), addr.clone()))
    });
    let connections: Vec<Option<iroh::endpoint::Connection>> = stream::iter(attempts)
        .map(|(endpoint, addr)| async move { endpoint.connect(addr, ALPN).await.ok() })
        .buffer_unordered(128)
        .collect()
        .await;
    // A connection refused for want of a slot is closed at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let open = connections
        .iter()
        .flatten()
        .filter(|connection| connection.close_reason().is_none())
        .count();
    let mut held = Held::default();
    held.keep(connections);
    for endpoint in endpoints {
        held.endpoint(endpoint);
    }
    (
        format!("held: {open} of {} attempts open", keys * per_key),
        held,
    )
}

/// An `OpenSession` larger than the 4 MiB every authenticated call may send.
pub async fn oversized_authenticated_message(arena: &Arena) -> Outcome {
    let holder = arena.holder("oversized").await;
    let mut request = session_request();
    request.drv_path = format!("/nix/store/{}", "a".repeat(MESSAGE_LIMIT + 1));
    let result = BuilderClient::new(holder.channel.clone())
        .open_session(request)
        .await;
    holder.close().await;
    nothing_held(outcome(result))
}

/// A name no store has a path of yet: `prefix`, this process and a counter.
fn fresh_name(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{}-{n}", std::process::id(), proto::now_unix())
}

/// A text input no store has yet (its contents are its fresh name), and
/// its NAR.
fn fresh_text_input(prefix: &str) -> (InputPath, Vec<u8>) {
    let name = fresh_name(prefix);
    text_input(&name, name.as_bytes())
}

/// Opens a session on `holder` for the fixture `.drv` with `inputs`
/// declared besides; its id.
async fn session_with(holder: &Connection, inputs: &[InputPath]) -> Result<String, Status> {
    let mut request = session_request();
    request.inputs.splice(0..0, inputs.iter().cloned());
    let opened = BuilderClient::new(holder.channel.clone())
        .open_session(request)
        .await?;
    Ok(opened.into_inner().session_id)
}

/// Uploads `parts` (store path, offset, bytes) in one call of `session`.
async fn upload(
    holder: &Connection,
    session: &str,
    parts: Vec<(String, u64, Vec<u8>)>,
) -> Result<proto::UploadInputsResponse, Status> {
    let messages = parts
        .into_iter()
        .map(|(store_path, offset, data)| UploadInputsRequest {
            session_id: session.to_owned(),
            store_path,
            data: data.into(),
            offset,
        });
    BuilderClient::new(holder.channel.clone())
        .upload_inputs(tokio_stream::iter(messages.collect::<Vec<_>>()))
        .await
        .map(tonic::Response::into_inner)
}

/// The fixture `.drv`'s NAR, as the fixture session declares it.
fn fixture_nar() -> Vec<u8> {
    let request = session_request();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nix");
    let name = request.drv_path.trim_start_matches("/nix/store/");
    nar_of_file(&std::fs::read(dir.join(name)).unwrap())
}

/// Declares a fresh input on `key`'s connection and uploads what `part`
/// makes of it: (store path, offset, data).
async fn upload_to_fresh_session(
    arena: &Arena,
    key: &str,
    part: impl FnOnce(&InputPath, Vec<u8>) -> (String, u64, Vec<u8>),
) -> Outcome {
    let holder = arena.holder(key).await;
    let (input, nar) = fresh_text_input(key);
    let session = session_with(&holder, std::slice::from_ref(&input))
        .await
        .unwrap();
    let result = upload(&holder, &session, vec![part(&input, nar)]).await;
    holder.close().await;
    nothing_held(outcome(result))
}

/// Uploads a path the session never declared.
pub async fn unannounced_upload(arena: &Arena) -> Outcome {
    upload_to_fresh_session(arena, "unannounced", |_, nar| {
        (format!("/nix/store/{}-unannounced", "0".repeat(32)), 0, nar)
    })
    .await
}

/// Uploads a declared input with one byte changed.
pub async fn mismatching_upload(arena: &Arena) -> Outcome {
    upload_to_fresh_session(arena, "mismatching", |input, mut nar| {
        let inside = nar.len() - 20;
        nar[inside] ^= 1;
        (input.store_path.clone(), 0, nar)
    })
    .await
}

/// Finding 12: a part announced at an offset near 2^64.
pub async fn offset_near_2_pow_64(arena: &Arena) -> Outcome {
    upload_to_fresh_session(arena, "huge-offset", |input, _| {
        (input.store_path.clone(), u64::MAX - 3, vec![0; 64])
    })
    .await
}

/// A NAR writer for hand-made (and hostile) archives.
#[derive(Default)]
pub struct Nar(Vec<u8>);

impl Nar {
    /// Appends one NAR string: length, bytes, zero padding to 8.
    pub fn s(mut self, bytes: &[u8]) -> Self {
        self.0
            .extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        self.0.extend_from_slice(bytes);
        self.0.resize(self.0.len().next_multiple_of(8), 0);
        self
    }

    /// Appends several strings.
    pub fn strs(self, strings: &[&str]) -> Self {
        strings.iter().fold(self, |nar, s| nar.s(s.as_bytes()))
    }

    /// The archive.
    pub fn bytes(self) -> Vec<u8> {
        self.0
    }
}

/// The NAR of a regular file with `contents`.
pub fn nar_of_file(contents: &[u8]) -> Vec<u8> {
    Nar::default()
        .strs(&["nix-archive-1", "(", "type", "regular", "contents"])
        .s(contents)
        .strs(&[")"])
        .bytes()
}

/// A directory NAR with one symlink entry called `name` pointing at
/// `target`.
fn nar_with_link(name: &str, target: &str) -> Vec<u8> {
    Nar::default()
        .strs(&[
            "nix-archive-1",
            "(",
            "type",
            "directory",
            "entry",
            "(",
            "name",
        ])
        .strs(&[
            name, "node", "(", "type", "symlink", "target", target, ")", ")", ")",
        ])
        .bytes()
}

/// `nar` declared as a source (`fixed:r:sha256`) input called `name`.
fn source_input(name: &str, nar: &[u8]) -> InputPath {
    let hash = Sha256Hash::digest(nar);
    let path = make_fixed_output_path(
        name,
        FileIngestionMethod::Recursive,
        &Hash::from(hash),
        &BTreeSet::new(),
        false,
    )
    .unwrap();
    InputPath {
        store_path: path.to_string(),
        references: Vec::new(),
        content_address: format!("fixed:r:{hash}"),
        nar_hash: hash.to_string(),
        nar_size: nar.len() as u64,
    }
}

/// `contents` declared as a text input called `name`, and its NAR.
pub fn text_input(name: &str, contents: &[u8]) -> (InputPath, Vec<u8>) {
    let nar = nar_of_file(contents);
    let hash = Sha256Hash::digest(contents);
    let path = make_text_path(name, &hash, &BTreeSet::new()).unwrap();
    let input = InputPath {
        store_path: path.to_string(),
        references: Vec::new(),
        content_address: format!("text:{hash}"),
        nar_hash: Sha256Hash::digest(&nar).to_string(),
        nar_size: nar.len() as u64,
    };
    (input, nar)
}

/// Declares the fixture `.drv` and `input` on `holder`'s connection and
/// uploads both whole (so `Ok` means imported); what the call that failed
/// saw, or `Ok`.
async fn upload_hand_made(holder: Connection, input: InputPath, nar: Vec<u8>) -> String {
    let seen = match session_with(&holder, std::slice::from_ref(&input)).await {
        Ok(session) => {
            let parts = vec![
                (input.store_path, 0, nar),
                (session_request().drv_path, 0, fixture_nar()),
            ];
            outcome(upload(&holder, &session, parts).await)
        }
        Err(status) => seen(&status),
    };
    holder.close().await;
    seen
}

/// A source NAR with an entry called `..`.
pub async fn nar_with_dot_dot(arena: &Arena) -> Outcome {
    let nar = nar_with_link("..", "x");
    nothing_held(
        upload_hand_made(
            arena.holder("dotdot").await,
            source_input("dotdot", &nar),
            nar,
        )
        .await,
    )
}

/// A source NAR holding an absolute symlink: Nix allows these, so it is
/// imported, as the link it is (nothing outside the store is written).
pub async fn nar_with_absolute_symlink(arena: &Arena) -> Outcome {
    let nar = nar_with_link("escape", "/etc/passwd");
    let input = source_input("abslink", &nar);
    let path = input.store_path.clone();
    let seen = upload_hand_made(arena.holder("abslink").await, input, nar).await;
    let link = arena.builder_store_path(&path).join("escape");
    let stays_a_link = std::fs::symlink_metadata(&link)
        .map(|meta| meta.file_type().is_symlink())
        .unwrap_or(false);
    nothing_held(if stays_a_link || seen != "Ok" {
        seen
    } else {
        format!("{seen} but {} is no symlink", link.display())
    })
}

/// One ticket holder's session read by another holder with a ticket of its
/// own: every Cache read is refused.
pub async fn read_another_sessions_cache(arena: &Arena) -> Outcome {
    let owner = arena.holder("owner").await;
    let built = arena.built_session(&owner, 4096).await;
    let other = arena.holder("other").await;
    let cache = || CacheClient::new(other.channel.clone());
    let narinfo = cache()
        .get_nar_info(GetNarInfoRequest {
            session_id: built.id.clone(),
            store_path_hash: built.output_hash,
        })
        .await;
    let nar = cache()
        .get_nar(GetNarRequest {
            session_id: built.id,
            url: built.url,
            offset: 0,
            length: 0,
        })
        .await;
    let seen = [outcome(narinfo), outcome(nar)];
    other.close().await;
    owner.close().await;
    nothing_held(if seen[0] == seen[1] {
        seen[0].clone()
    } else {
        seen.join(" and ")
    })
}

/// Revokes the ticket of a session while its upload is under way.
pub async fn ticket_revoked_mid_upload(arena: &Arena) -> Outcome {
    let ticket = arena.ticket(&["--unlimited", "--expires", "1day"]);
    let id = ticket.id().to_string();
    let holder = drv_thru::client::connect(
        &drv_thru::client::Target::Ticket(Box::new(ticket)),
        RelayChoice::Disabled,
        Some(&arena.key("revoked")),
    )
    .await
    .unwrap();
    let (input, nar) = text_input("revoked-input", &vec![b'r'; 2 << 20]);
    let session = session_with(&holder, std::slice::from_ref(&input))
        .await
        .unwrap();
    let (parts, call) = streaming_upload(&holder);
    let part = |offset: usize, len: usize| UploadInputsRequest {
        session_id: session.clone(),
        store_path: input.store_path.clone(),
        data: nar[offset..offset + len].to_vec().into(),
        offset: offset as u64,
    };
    parts.send(part(0, 256 << 10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| arena.builder.cli_ok(&["ticket", "revoke", &id]));
    // The client goes on sending as if nothing happened.
    let _ = parts.send(part(256 << 10, 256 << 10)).await;
    let result = tokio::time::timeout(Duration::from_secs(20), call).await;
    drop(parts);
    holder.close().await;
    nothing_held(match result {
        Ok(joined) => outcome(joined.unwrap()),
        Err(_) => "the upload went on".to_owned(),
    })
}

/// Finding 6: `calls` concurrent `OpenSession`s with one unlimited ticket
/// from `keys` clients; how many were admitted, and how the rest were
/// refused. The sessions stay open (held) during the build beside.
pub async fn open_session_race(arena: &Arena, keys: usize, calls: usize) -> Outcome {
    let ticket = arena.ticket(&["--unlimited", "--expires", "1day"]);
    let mut holders = Vec::new();
    for key in 0..keys {
        let target = drv_thru::client::Target::Ticket(Box::new(ticket.clone()));
        holders.push(
            drv_thru::client::connect(
                &target,
                RelayChoice::Disabled,
                Some(&arena.key(&format!("racer-{keys}-{key}"))),
            )
            .await
            .unwrap(),
        );
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(calls));
    let tasks: Vec<_> = (0..calls)
        .map(|call| {
            let channel = holders[call % keys].channel.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                BuilderClient::new(channel)
                    .open_session(session_request())
                    .await
            })
        })
        .collect();
    let tally = Tally::default();
    for task in tasks {
        let key = outcome(task.await.unwrap());
        count(&tally, key);
    }
    let admitted = tally.lock().unwrap().get("Ok").copied().unwrap_or(0);
    let mut held = Held::default();
    for holder in holders {
        held.endpoint(holder.endpoint.clone());
        held.keep(holder);
    }
    (
        format!("{admitted} admitted ({})", tally_text(&tally)),
        held,
    )
}

/// An honest upload over its ticket's `--max-upload-bytes`.
pub async fn over_limit_upload(arena: &Arena) -> Outcome {
    let holder = arena
        .holder_with("over-limit", &["--max-upload-bytes", "1K"])
        .await;
    let (input, nar) = text_input("over-limit", &[b'o'; 4096]);
    nothing_held(upload_hand_made(holder, input, nar).await)
}

/// Finding 12: two source inputs each announced at 2^63 bytes, whose sum
/// wraps; the first byte of one is sent.
pub async fn sizes_near_2_pow_63(arena: &Arena) -> Outcome {
    let holder = arena.holder("huge-sizes").await;
    let huge = |prefix| {
        let name = fresh_name(prefix);
        let mut input = source_input(&name, &nar_of_file(name.as_bytes()));
        input.nar_size = 1 << 63;
        input
    };
    let inputs = [huge("huge-a"), huge("huge-b")];
    let seen = match session_with(&holder, &inputs).await {
        Ok(session) => {
            let part = (inputs[0].store_path.clone(), 0, vec![1]);
            outcome(upload(&holder, &session, vec![part]).await)
        }
        Err(status) => seen(&status),
    };
    holder.close().await;
    nothing_held(seen)
}

/// Finding 13: `OpenSession`s cancelled at growing points of their way;
/// afterwards (the connection closed) no session may be left behind.
pub async fn open_session_cancelled_half_way(arena: &Arena) -> Outcome {
    let holder = arena.holder("canceller").await;
    let mut admitted = 0;
    for attempt in 0..20u64 {
        let mut request = session_request();
        let (input, _) = text_input(&format!("cancel-{attempt}"), &attempt.to_le_bytes());
        request.inputs.insert(0, input);
        let mut client = BuilderClient::new(holder.channel.clone());
        let call = client.open_session(request);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(attempt * 3), call).await {
            admitted += 1;
        }
    }
    holder.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let ghosts = loop {
        let status: serde_json::Value = serde_json::from_str(&tokio::task::block_in_place(|| {
            arena.builder.cli_ok(&["status", "--json"])
        }))
        .unwrap();
        let rows =
            status["active"].as_array().unwrap().len() + status["queued"].as_array().unwrap().len();
        if rows == 0 || tokio::time::Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    nothing_held(format!(
        "{} ({admitted} of 20 admitted before cancelling)",
        if ghosts == 0 {
            "no ghost sessions".to_owned()
        } else {
            format!("{ghosts} ghost sessions")
        }
    ))
}

/// Nix processes (`nix`, `nix-store`) running below `pid`.
fn nix_processes_below(pid: u32) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let command = head.split_once('(').map_or("", |(_, command)| command);
        let parent = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if parent == Some(pid) && command.starts_with("nix") {
            count += 1;
        }
    }
    count
}

/// Finding 5: `calls` `GetNarInfo`s at once for a built session's output;
/// at most 8 Nix processes may run for them.
pub async fn repeated_get_nar_info(arena: &Arena, calls: usize) -> Outcome {
    let holder = arena.holder("narinfo").await;
    let built = arena.built_session(&holder, 4096).await;
    let pid = arena.builder.pid();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let counter = tokio::spawn(async move {
        let mut most = 0;
        loop {
            most = most.max(nix_processes_below(pid));
            tokio::select! {
                _ = stopped.changed() => return most,
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });
    let tally = Tally::default();
    let results: Vec<String> = stream::iter(0..calls)
        .map(|_| {
            let mut cache = CacheClient::new(holder.channel.clone());
            let request = GetNarInfoRequest {
                session_id: built.id.clone(),
                store_path_hash: built.output_hash.clone(),
            };
            async move { outcome(cache.get_nar_info(request).await) }
        })
        .buffer_unordered(calls)
        .collect()
        .await;
    for result in results {
        count(&tally, result);
    }
    let _ = stop.send(true);
    let most = counter.await.unwrap();
    holder.close().await;
    nothing_held(format!(
        "{} ({most} Nix processes at most; {})",
        if most <= 8 { "bounded" } else { "unbounded" },
        tally_text(&tally)
    ))
}

/// Finding 3: `inputs` text inputs of `size` bytes each uploaded whole,
/// after one more declared first and never sent, so the upload never ends.
pub async fn unfinished_text_inputs(arena: &Arena, inputs: usize, size: usize) -> Outcome {
    let holder = arena.holder("text-hoarder").await;
    let (declared, nars): (Vec<InputPath>, Vec<Vec<u8>>) = (0..=inputs)
        .map(|n| {
            let mut contents = vec![b'a' + (n % 26) as u8; size];
            contents[..8].copy_from_slice(&(n as u64).to_le_bytes());
            text_input(&format!("hoard-{n}"), &contents)
        })
        .unzip();
    let session = match session_with(&holder, &declared).await {
        Ok(session) => session,
        Err(status) => {
            holder.close().await;
            return nothing_held(seen(&status));
        }
    };
    let (tx, call) = streaming_upload(&holder);
    for (input, nar) in declared.iter().zip(nars).skip(1) {
        let sent = tx
            .send(UploadInputsRequest {
                session_id: session.clone(),
                store_path: input.store_path.clone(),
                data: nar.into(),
                offset: 0,
            })
            .await;
        if sent.is_err() {
            break;
        }
    }
    held_or_refused(holder, call, tx, "text inputs uploaded").await
}

/// An upload call on `holder`'s connection whose messages are sent
/// through the returned sender.
fn streaming_upload(holder: &Connection) -> (mpsc::Sender<UploadInputsRequest>, UploadCall) {
    let (tx, rx) = mpsc::channel(4);
    let mut builder = BuilderClient::new(holder.channel.clone());
    let call = tokio::spawn(async move { builder.upload_inputs(ReceiverStream::new(rx)).await });
    (tx, call)
}

/// A running upload call.
type UploadCall =
    tokio::task::JoinHandle<Result<tonic::Response<proto::UploadInputsResponse>, Status>>;

/// What an upload call that should still be running saw after a moment:
/// its refusal, or `held: what` with the call (and its sender) held open.
async fn held_or_refused(
    holder: Connection,
    mut call: UploadCall,
    sender: mpsc::Sender<UploadInputsRequest>,
    what: &str,
) -> Outcome {
    let early = tokio::time::timeout(Duration::from_secs(2), &mut call).await;
    let mut held = Held::default();
    let seen = match early {
        Ok(joined) => outcome(joined.unwrap()),
        Err(_) => {
            held.task(tokio::spawn(async move {
                let _ = call.await;
            }));
            held.keep(sender);
            format!("held: {what}")
        }
    };
    held.endpoint(holder.endpoint.clone());
    held.keep(holder);
    (seen, held)
}

/// Finding 9: every other 8-byte piece of a text input, from its end
/// backwards and never its first, so nothing can be imported and every
/// piece waits apart from its neighbours.
pub async fn tiny_out_of_order_pieces(arena: &Arena, size: usize) -> Outcome {
    let holder = arena.holder("piecemeal").await;
    let (input, nar) = text_input("piecemeal", &vec![b'p'; size]);
    let session = session_with(&holder, std::slice::from_ref(&input))
        .await
        .unwrap();
    let (tx, call) = streaming_upload(&holder);
    let mut offset = (nar.len() - 8) / 8 * 8;
    while offset >= 8 {
        let end = (offset + 8).min(nar.len());
        let piece = UploadInputsRequest {
            session_id: session.clone(),
            store_path: input.store_path.clone(),
            data: nar[offset..end].to_vec().into(),
            offset: offset as u64,
        };
        if tx.send(piece).await.is_err() {
            break;
        }
        // Every other piece: gaps keep the pieces from merging.
        offset = offset.saturating_sub(16);
    }
    held_or_refused(holder, call, tx, "pieces sent").await
}

/// Finding 8: a session declaring `count` small inputs, each of which
/// would be staged.
pub async fn many_declared_inputs(arena: &Arena, count: usize) -> Outcome {
    let holder = arena.holder("declarer").await;
    let inputs: Vec<InputPath> = (0..count)
        .map(|n| text_input(&format!("d{n}"), &(n as u64).to_le_bytes()).0)
        .collect();
    let result = session_with(&holder, &inputs).await;
    let mut held = Held::default();
    held.endpoint(holder.endpoint.clone());
    held.keep(holder);
    (outcome(result), held)
}

/// Finding 4: `streams` `GetNar` calls for a built session's large output,
/// spread over the connection's QUIC streams, none of them read.
pub async fn unread_get_nar_streams(arena: &Arena, streams: usize) -> Outcome {
    let holder = arena.holder("nar-hoarder").await;
    let built = arena.built_session(&holder, 4 << 20).await;
    let channels = holder.bulk_channels(16);
    let tally = Tally::default();
    let mut held = Held::default();
    for n in 0..streams {
        let mut cache = CacheClient::new(channels[n % channels.len()].clone());
        let call = cache.get_nar(GetNarRequest {
            session_id: built.id.clone(),
            url: built.url.clone(),
            offset: 0,
            length: 0,
        });
        let key = match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok(response)) => {
                held.keep(response);
                "held".to_owned()
            }
            Ok(Err(status)) => seen(&status),
            Err(_) => "no answer".to_owned(),
        };
        count(&tally, key);
    }
    held.endpoint(holder.endpoint.clone());
    held.keep(holder);
    let refused = tally
        .lock()
        .unwrap()
        .keys()
        .find(|key| key.starts_with("ResourceExhausted"))
        .cloned();
    // Calls past the HTTP/2 stream limits wait on the client ("no answer").
    let seen = match refused {
        Some(key) => format!("{key} ({})", tally_text(&tally)),
        None => format!("held: {streams} unread streams"),
    };
    (seen, held)
}

/// What a zstd bomb inflates to: 256 times the largest message.
const BOMB_BYTES: u64 = 1 << 30;

/// `message`, already compressed, in gRPC's length-prefixed framing.
fn compressed_grpc_frame(message: &[u8]) -> Bytes {
    let mut framed = vec![1];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed.into()
}

/// An `UploadInputsRequest` starting a part of `store_path` whose data is
/// [`BOMB_BYTES`] of zeros, zstd-compressed into a few KiB without ever
/// being whole in memory.
fn zstd_bomb(store_path: &str) -> Vec<u8> {
    use std::io::Write as _;
    let mut head = prost::Message::encode_to_vec(&UploadInputsRequest {
        store_path: store_path.to_owned(),
        ..Default::default()
    });
    // Field 3 (`data`), length-delimited.
    head.push(3 << 3 | 2);
    prost::encoding::encode_varint(BOMB_BYTES, &mut head);
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
    encoder.write_all(&head).unwrap();
    let zeros = vec![0; 1 << 20];
    for _ in 0..BOMB_BYTES / zeros.len() as u64 {
        encoder.write_all(&zeros).unwrap();
    }
    encoder.finish().unwrap()
}

/// A hand-made gRPC call of `path` as the holder of `authorization`,
/// with `headers` besides; its response and its body to send.
fn authorized_call(
    client: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    authorization: &str,
    headers: &[(&'static str, &str)],
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let mut request = grpc_request(path);
    let all = request.headers_mut();
    all.insert("authorization", authorization.parse().unwrap());
    for (name, value) in headers {
        all.insert(*name, value.parse().unwrap());
    }
    client.send_request(request, false).unwrap()
}

/// An upload part whose one message is a zstd frame of a few KiB that
/// inflates to 1 GiB: the builder must stop inflating at its 4 MiB message
/// limit, refuse the call and keep nothing of the upload.
pub async fn zstd_bomb_in_an_upload_part(arena: &Arena) -> Outcome {
    let ticket = arena.ticket(&["--unlimited", "--expires", "1day"]);
    let authorization = ticket.secret().authorization(ticket.id());
    let target = drv_thru::client::Target::Ticket(Box::new(ticket));
    let (endpoint, connection) = bare_connection(&target, &arena.key("zstd-bomb")).await;
    let mut client = h2_client(&connection).await;
    let (input, _) = fresh_text_input("zstd-bomb");
    let mut request = session_request();
    request.inputs.insert(0, input.clone());
    let (response, mut body) = authorized_call(
        &mut client,
        "/drvthru.v1.Builder/OpenSession",
        &authorization,
        &[],
    );
    body.send_data(grpc_frame(&prost::Message::encode_to_vec(&request)), true)
        .unwrap();
    let mut reply = response.await.unwrap().into_body();
    let mut framed = Vec::new();
    while let Some(chunk) = reply.data().await {
        framed.extend_from_slice(&chunk.unwrap());
    }
    let opened: proto::OpenSessionResponse =
        prost::Message::decode(framed.get(5..).expect("OpenSession answered")).unwrap();

    let bomb = zstd_bomb(&input.store_path);
    let (response, mut body) = authorized_call(
        &mut client,
        "/drvthru.v1.Builder/UploadInputs",
        &authorization,
        &[("grpc-encoding", "zstd")],
    );
    let first = UploadInputsRequest {
        session_id: opened.session_id,
        ..Default::default()
    };
    body.send_data(grpc_frame(&prost::Message::encode_to_vec(&first)), false)
        .unwrap();
    body.send_data(compressed_grpc_frame(&bomb), true).unwrap();
    let seen = match tokio::time::timeout(Duration::from_secs(10), response).await {
        Ok(Ok(response)) => match grpc_status_and_message(response).await {
            // tonic's message names the limit: "Error decompressing: size
            // limit, of 4194304 bytes, exceeded while decompressing message".
            Ok((code, message)) if message.contains("size limit") => code,
            Ok((code, message)) => format!("{code} ({message})"),
            Err(missing) => missing,
        },
        Ok(Err(err)) => format!("reset: {err}"),
        Err(_) => "no answer".to_owned(),
    };
    let mut staged = arena.staging_bytes();
    for _ in 0..50 {
        if staged == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        staged = arena.staging_bytes();
    }
    endpoint.close().await;
    nothing_held(format!(
        "{seen}, {staged} bytes staged ({} KiB inflating to {} MiB)",
        bomb.len() >> 10,
        BOMB_BYTES >> 20
    ))
}
