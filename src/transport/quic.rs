//! gRPC over Iroh QUIC connections.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use iroh::{
    Endpoint, EndpointAddr, EndpointId,
    endpoint::{Connection, RecvStream, SendStream, VarInt},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{Mutex, Semaphore, mpsc, watch},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, server::Connected};
use tracing::{Instrument, debug, info_span, warn};

use crate::proto::ALPN;

/// Time allowed for a QUIC handshake to complete.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed to dial a builder, including relay and hole punching.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// QUIC application close code: the server is at its connection limit.
const CLOSE_BUSY: u32 = 1;

/// Who is on the other end of an Iroh-carried request.
#[derive(Debug, Clone)]
pub struct IrohPeer {
    /// The endpoint id the QUIC handshake proved.
    pub endpoint_id: EndpointId,
    /// The connection, so a handler can notice the peer leaving.
    pub connection: Connection,
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
    /// Starts accepting connections on `endpoint`, at most `max_connections`
    /// at once. The accept loop ends when the endpoint closes.
    pub fn start(endpoint: Endpoint, max_connections: u32) -> Self {
        let (tx, streams) = mpsc::channel(64);
        let (open_tx, open) = watch::channel(0u32);
        let limit = Arc::new(Semaphore::new(max_connections as usize));
        let open_tx = Arc::new(open_tx);
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    warn!(remote = ?incoming.remote_addr(), "refusing connection: at max_connections");
                    incoming.refuse();
                    continue;
                };
                let tx = tx.clone();
                let open_tx = open_tx.clone();
                tokio::spawn(async move {
                    let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                        Ok(Ok(connection)) => connection,
                        Ok(Err(err)) => return debug!("handshake failed: {err}"),
                        Err(_) => return debug!("handshake timed out"),
                    };
                    let endpoint_id = connection.remote_id();
                    let span = info_span!("conn", peer = %endpoint_id.fmt_short());
                    async move {
                        debug!("connection opened");
                        open_tx.send_modify(|n| *n += 1);
                        let peer = IrohPeer {
                            endpoint_id,
                            connection: connection.clone(),
                        };
                        while let Ok((send, recv)) = connection.accept_bi().await {
                            if tx
                                .send(Ok(IrohStream::new(send, recv, peer.clone())))
                                .await
                                .is_err()
                            {
                                connection
                                    .close(VarInt::from_u32(CLOSE_BUSY), b"server shutting down");
                                break;
                            }
                        }
                        open_tx.send_modify(|n| *n -= 1);
                        debug!(reason = ?connection.close_reason(), "connection closed");
                        drop(permit);
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
                let peer = IrohPeer {
                    endpoint_id: connection.remote_id(),
                    connection: connection.clone(),
                };
                Ok::<_, io::Error>(TokioIo::new(IrohStream::new(send, recv, peer)))
            }
        })
    }
}
