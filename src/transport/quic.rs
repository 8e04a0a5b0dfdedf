//! gRPC over Iroh QUIC connections.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use iroh::{
    Endpoint, EndpointAddr, EndpointId,
    endpoint::{Connection, RecvStream, SendStream, VarInt},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc, watch},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, server::Connected};
use tracing::{Instrument, debug, info_span, warn};

use super::endpoint::MAX_STREAMS_PER_CONNECTION;
use crate::proto::ALPN;

/// Time allowed for a QUIC handshake to complete.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed to dial a builder, including relay and hole punching.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// QUIC application close code: the server is at its connection limit.
const CLOSE_BUSY: u32 = 1;

/// QUIC application close code: the connection made no authorized call in
/// time.
const CLOSE_UNAUTHENTICATED: u32 = 2;

/// Streams a connection may have open before it authenticates: enough for
/// a health check and a first call, too few to pile up work.
const UNAUTHENTICATED_STREAMS: u32 = 2;

/// With every slot for strangers taken, a new connection closes the oldest
/// one that has sat this long without an authorized call. An honest client
/// calls within moments of its handshake, so idle connections cannot keep
/// a ticket holder out; a flood must keep replacing all of them this often.
const EVICTABLE_AFTER: Duration = Duration::from_secs(1);

/// How long a connection that closed another waits for the slot it freed.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// Who is on the other end of an Iroh-carried request.
#[derive(Debug, Clone)]
pub struct IrohPeer {
    /// The endpoint id the QUIC handshake proved.
    pub endpoint_id: EndpointId,
    /// The connection, so a handler can notice the peer leaving.
    pub connection: Connection,
    authenticated: Arc<watch::Sender<bool>>,
}

impl IrohPeer {
    /// This connection's number, unique among the endpoint's live ones.
    pub fn connection_id(&self) -> usize {
        self.connection.stable_id()
    }

    /// The peer at the other end of `connection`, and a watch of whether it
    /// has authenticated (`authenticated` already, or by
    /// [`Self::authenticated`] later).
    fn new(connection: Connection, authenticated: bool) -> (Self, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(authenticated);
        let peer = Self {
            endpoint_id: connection.remote_id(),
            connection,
            authenticated: Arc::new(tx),
        };
        (peer, rx)
    }

    /// Records that this connection made an authorized call: it leaves the
    /// slots for strangers and may open as many streams as any client.
    pub fn authenticated(&self) {
        self.authenticated
            .send_if_modified(|done| !std::mem::replace(done, true));
    }
}

/// How many Iroh connections the server takes, and from whom. A stranger
/// can make endpoint ids for free, so connections that have not shown a
/// ticket or a trusted key get slots of their own, a few streams and a
/// deadline, and can never take an authenticated client's place.
#[derive(Debug, Clone)]
pub struct ConnectionBudget {
    /// Authenticated connections at once.
    pub max_connections: u32,
    /// Connections not authenticated yet (or still in their handshake) at
    /// once, besides `max_connections`.
    pub max_unauthenticated: u32,
    /// Connections one endpoint id may hold.
    pub max_per_client: u32,
    /// Time a connection has to make its first authorized call.
    pub authentication_timeout: Duration,
    /// Endpoint ids that count as authenticated from the handshake on.
    pub trusted: HashSet<EndpointId>,
}

/// The server's slots: authenticated, unauthenticated, and by endpoint id.
struct Slots {
    budget: ConnectionBudget,
    /// Handshakes under way: who is calling is known only after one, so
    /// they have slots of their own, or a stranger holding every
    /// unauthenticated slot would keep trusted clients out too.
    handshakes: Arc<Semaphore>,
    authenticated: Arc<Semaphore>,
    unauthenticated: Arc<Semaphore>,
    per_client: std::sync::Mutex<HashMap<EndpointId, u32>>,
    /// Connections holding an unauthenticated slot, oldest first.
    waiting: std::sync::Mutex<VecDeque<(Instant, Connection)>>,
}

/// A connection's entry in [`Slots::waiting`], removed when dropped.
struct Waiting<'a> {
    slots: &'a Slots,
    id: usize,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.slots
            .waiting()
            .retain(|(_, connection)| connection.stable_id() != self.id);
    }
}

/// A connection's place in [`Slots`], given back when dropped.
struct Place {
    slots: Arc<Slots>,
    client: EndpointId,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut per_client = self
            .slots
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = per_client.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                per_client.remove(&self.client);
            }
        }
    }
}

impl Slots {
    fn waiting(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Connection)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An unauthenticated slot, making room by closing the oldest
    /// connection that has waited past [`EVICTABLE_AFTER`] if none is free.
    async fn unauthenticated_permit(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.unauthenticated.clone().try_acquire_owned() {
            return Some(permit);
        }
        let oldest = {
            let mut waiting = self.waiting();
            let due = waiting
                .front()
                .is_some_and(|(since, _)| since.elapsed() >= EVICTABLE_AFTER);
            due.then(|| waiting.pop_front()).flatten()
        };
        let (_, connection) = oldest?;
        debug!(peer = %connection.remote_id().fmt_short(), "closing an idle unauthenticated connection to make room");
        connection.close(
            VarInt::from_u32(CLOSE_UNAUTHENTICATED),
            b"authenticate first",
        );
        tokio::time::timeout(EVICTION_WAIT, self.unauthenticated.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Lists `connection` among those waiting to authenticate, until the
    /// returned entry is dropped.
    fn wait_list(&self, connection: &Connection) -> Waiting<'_> {
        self.waiting()
            .push_back((Instant::now(), connection.clone()));
        Waiting {
            slots: self,
            id: connection.stable_id(),
        }
    }

    /// A place for `client` holding `permit`, unless it has its share.
    fn place(self: &Arc<Self>, client: EndpointId, permit: OwnedSemaphorePermit) -> Option<Place> {
        let mut per_client = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_client.entry(client).or_default();
        if *count >= self.budget.max_per_client {
            return None;
        }
        *count += 1;
        Some(Place {
            slots: self.clone(),
            client,
            _permit: permit,
        })
    }
}

/// One bidirectional stream as a byte pipe for HTTP/2.
pub struct IrohStream {
    send: SendStream,
    recv: RecvStream,
    peer: IrohPeer,
}

impl IrohStream {
    fn new(send: SendStream, recv: RecvStream, peer: IrohPeer) -> Self {
        Self { send, recv, peer }
    }
}

impl AsyncRead for IrohStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.get_mut().recv), cx, buf)
    }
}

impl AsyncWrite for IrohStream {
    // `SendStream` has inherent `poll_*` methods with other error types, so
    // the trait is named explicitly.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.get_mut().send), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().send), cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.get_mut().send), cx)
    }
}

impl Connected for IrohStream {
    type ConnectInfo = IrohPeer;

    fn connect_info(&self) -> IrohPeer {
        self.peer.clone()
    }
}

/// The server side: accepted streams to hand to tonic's
/// `serve_with_incoming`, and a live count of open connections.
pub struct IrohIncoming {
    streams: mpsc::Receiver<io::Result<IrohStream>>,
    open: watch::Receiver<u32>,
}

impl IrohIncoming {
    /// Starts accepting connections on `endpoint` within `budget`. The
    /// accept loop ends when the endpoint closes.
    pub fn start(endpoint: Endpoint, budget: ConnectionBudget) -> Self {
        let (tx, streams) = mpsc::channel(64);
        let (open_tx, open) = watch::channel(0u32);
        let slots = Arc::new(Slots {
            handshakes: Arc::new(Semaphore::new(budget.max_unauthenticated as usize)),
            authenticated: Arc::new(Semaphore::new(budget.max_connections as usize)),
            unauthenticated: Arc::new(Semaphore::new(budget.max_unauthenticated as usize)),
            per_client: std::sync::Mutex::default(),
            waiting: std::sync::Mutex::default(),
            budget,
        });
        let open_tx = Arc::new(open_tx);
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let Ok(handshake) = slots.handshakes.clone().try_acquire_owned() else {
                    warn!(remote = ?incoming.remote_addr(), "refusing connection: too many handshakes under way");
                    incoming.refuse();
                    continue;
                };
                let (tx, open_tx, slots) = (tx.clone(), open_tx.clone(), slots.clone());
                tokio::spawn(async move {
                    let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                        Ok(Ok(connection)) => connection,
                        Ok(Err(err)) => return debug!("handshake failed: {err}"),
                        Err(_) => return debug!("handshake timed out"),
                    };
                    drop(handshake);
                    let endpoint_id = connection.remote_id();
                    let span = info_span!("conn", peer = %endpoint_id.fmt_short());
                    let trusted = slots.budget.trusted.contains(&endpoint_id);
                    let permit = if trusted {
                        slots.authenticated.clone().try_acquire_owned().ok()
                    } else {
                        connection.set_max_concurrent_bi_streams(VarInt::from_u32(
                            UNAUTHENTICATED_STREAMS,
                        ));
                        slots.unauthenticated_permit().await
                    };
                    let Some(place) = permit.and_then(|permit| slots.place(endpoint_id, permit))
                    else {
                        warn!(peer = %endpoint_id.fmt_short(), "refusing connection: at the connection limit for it");
                        connection.close(VarInt::from_u32(CLOSE_BUSY), b"too many connections");
                        return;
                    };
                    let (peer, watched) = IrohPeer::new(connection.clone(), trusted);
                    async move {
                        debug!(trusted, "connection opened");
                        open_tx.send_modify(|n| *n += 1);
                        let accepting = accept_streams(&connection, &peer, &tx);
                        let gate = guard(&slots, &connection, place, watched);
                        tokio::select! {
                            () = accepting => {}
                            () = gate => {}
                        }
                        open_tx.send_modify(|n| *n -= 1);
                        debug!(reason = ?connection.close_reason(), "connection closed");
                    }
                    .instrument(span)
                    .await
                });
            }
        });
        Self { streams, open }
    }

    /// A watch of the number of open connections.
    pub fn open_connections(&self) -> watch::Receiver<u32> {
        self.open.clone()
    }

    /// The stream of accepted HTTP/2 connections.
    pub fn into_stream(self) -> ReceiverStream<io::Result<IrohStream>> {
        ReceiverStream::new(self.streams)
    }
}

/// Hands every stream of `connection` to tonic until it closes.
async fn accept_streams(
    connection: &Connection,
    peer: &IrohPeer,
    tx: &mpsc::Sender<io::Result<IrohStream>>,
) {
    while let Ok((send, recv)) = connection.accept_bi().await {
        if tx
            .send(Ok(IrohStream::new(send, recv, peer.clone())))
            .await
            .is_err()
        {
            connection.close(VarInt::from_u32(CLOSE_BUSY), b"server shutting down");
            break;
        }
    }
}

/// Holds `place` for `connection` while it lives: closes it if it does not
/// authenticate within the budget's time, and moves it to an authenticated
/// slot when it does. Returns only once it has closed the connection.
async fn guard(
    slots: &Arc<Slots>,
    connection: &Connection,
    place: Place,
    mut authenticated: watch::Receiver<bool>,
) {
    let _place = if *authenticated.borrow() {
        place
    } else {
        let waiting = slots.wait_list(connection);
        let deadline = slots.budget.authentication_timeout;
        if let Err(_late) =
            tokio::time::timeout(deadline, authenticated.wait_for(|done| *done)).await
        {
            debug!("closing a connection that did not authenticate in time");
            connection.close(
                VarInt::from_u32(CLOSE_UNAUTHENTICATED),
                b"authenticate first",
            );
            return;
        }
        let client = place.client;
        drop(waiting);
        drop(place);
        let promoted = slots
            .authenticated
            .clone()
            .try_acquire_owned()
            .ok()
            .and_then(|permit| slots.place(client, permit));
        let Some(place) = promoted else {
            warn!("closing a connection that authenticated with every slot taken");
            connection.close(VarInt::from_u32(CLOSE_BUSY), b"too many connections");
            return;
        };
        connection.set_max_concurrent_bi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION));
        place
    };
    std::future::pending().await
}

/// Why a builder could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Dialling timed out.
    #[error(
        "no answer from builder {0} within {secs}s: is it running and reachable \
         (check its address, relay setting and firewall)?",
        secs = CONNECT_TIMEOUT.as_secs()
    )]
    Timeout(EndpointId),
    /// Iroh could not connect.
    #[error("cannot connect to builder {id}: {reason}")]
    Connect {
        /// The builder.
        id: EndpointId,
        /// Iroh's explanation.
        reason: String,
    },
    /// The HTTP/2 channel could not be set up.
    #[error("cannot open a gRPC channel to builder {id}: {source}")]
    Channel {
        /// The builder.
        id: EndpointId,
        /// tonic's explanation.
        #[source]
        source: tonic::transport::Error,
    },
}

async fn dial(endpoint: &Endpoint, addr: EndpointAddr) -> Result<Connection, ConnectError> {
    let id = addr.id;
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect(addr, ALPN)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(err)) => Err(ConnectError::Connect {
            id,
            reason: err.to_string(),
        }),
        Err(_) => Err(ConnectError::Timeout(id)),
    }
}

/// A QUIC connection to a builder from which gRPC channels are made.
///
/// Each channel is an HTTP/2 connection on a bidirectional stream of its
/// own, with its own flow-control window: bulk transfers spread over several
/// channels to fill a long link. If the connection dies, the next channel
/// (or reconnecting one) dials again.
#[derive(Debug, Clone)]
pub struct Link {
    connection: Arc<Mutex<Connection>>,
    endpoint: Endpoint,
    addr: EndpointAddr,
}

impl Link {
    /// Dials the builder at `addr`.
    pub async fn dial(endpoint: &Endpoint, addr: EndpointAddr) -> Result<Self, ConnectError> {
        let connection = dial(endpoint, addr.clone()).await?;
        Ok(Self {
            connection: Arc::new(Mutex::new(connection)),
            endpoint: endpoint.clone(),
            addr,
        })
    }

    /// The round-trip time of the path in use, as QUIC estimates it.
    pub async fn rtt(&self) -> Option<Duration> {
        let connection = self.connection.lock().await;
        let paths = connection.paths();
        paths
            .iter()
            .find(|path| path.is_selected())
            .map(|path| path.rtt())
    }

    /// The QUIC connection in use, for its statistics.
    pub async fn connection(&self) -> Connection {
        self.connection.lock().await.clone()
    }

    /// A channel whose HTTP/2 connection is set up now.
    pub async fn channel(&self) -> Result<Channel, ConnectError> {
        super::tuned_client_endpoint()
            .connect_with_connector(self.connector())
            .await
            .map_err(|source| ConnectError::Channel {
                id: self.addr.id,
                source,
            })
    }

    /// A channel that opens its stream on first use.
    pub fn lazy_channel(&self) -> Channel {
        super::tuned_client_endpoint().connect_with_connector_lazy(self.connector())
    }

    fn connector(
        &self,
    ) -> impl tower::Service<
        tonic::codegen::http::Uri,
        Response = TokioIo<IrohStream>,
        Error = io::Error,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        let link = self.clone();
        tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let link = link.clone();
            async move {
                let mut connection = link.connection.lock().await;
                if connection.close_reason().is_some() {
                    *connection = dial(&link.endpoint, link.addr.clone())
                        .await
                        .map_err(io::Error::other)?;
                }
                let (send, recv) = connection.open_bi().await.map_err(io::Error::other)?;
                // The builder needs no authentication from us.
                let peer = IrohPeer::new(connection.clone(), true).0;
                Ok::<_, io::Error>(TokioIo::new(IrohStream::new(send, recv, peer)))
            }
        })
    }
}
