//! gRPC over local unix sockets, with the caller's credentials attached.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll},
};

use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{UnixListener, UnixStream},
};
use tokio_stream::{Stream, StreamExt, wrappers::UnixListenerStream};
use tonic::transport::{Channel, server::Connected};

/// The kernel-reported credentials of a unix-socket caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixPeer {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Process id, when the kernel reports one.
    pub pid: Option<i32>,
}

/// An accepted unix connection with its caller's credentials.
pub struct UnixConnection {
    stream: UnixStream,
    peer: UnixPeer,
}

impl AsyncRead for UnixConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for UnixConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for UnixConnection {
    type ConnectInfo = UnixPeer;

    fn connect_info(&self) -> UnixPeer {
        self.peer
    }
}

/// Binds a unix socket at `path` with permission bits `mode`, replacing a
/// stale socket file left by a dead process.
///
/// The caller must hold whatever lock makes it the only live server for
/// this path, or it would steal a running server's socket.
pub fn bind(path: &Path, mode: u32) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// The stream of accepted connections, each tagged with its credentials.
/// Connections whose credentials cannot be read are dropped.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<UnixConnection>> {
    UnixListenerStream::new(listener).filter_map(|accepted| {
        let stream = match accepted {
            Ok(stream) => stream,
            Err(err) => return Some(Err(err)),
        };
        let cred = stream.peer_cred().ok()?;
        Some(Ok(UnixConnection {
            peer: UnixPeer {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
            },
            stream,
        }))
    })
}

/// Opens a gRPC channel to the unix socket at `path`.
///
/// Connects lazily: the first call reports a missing socket or a permission
/// problem as an `UNAVAILABLE` status whose message names the path.
pub async fn connect(path: &Path) -> io::Result<Channel> {
    // Fail early with the real OS error (missing file, permission denied),
    // which callers turn into setup advice.
    drop(UnixStream::connect(path).await?);
    let path: PathBuf = path.to_owned();
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let path = path.clone();
        async move { UnixStream::connect(path).await.map(TokioIo::new) }
    });
    super::tuned_client_endpoint()
        .connect_with_connector(connector)
        .await
        .map_err(io::Error::other)
}
