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
use tokio_stream::Stream;
use tonic::transport::{Channel, server::Connected};

use super::accept::AcceptPacing;

/// The kernel-reported credentials of a unix-socket caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixPeer {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Process id, when the kernel reports one (for logs only: the process
    /// may be gone, and its id reused, by the time anyone looks).
    pub pid: Option<i32>,
    /// Supplementary groups of the connecting process when it connected.
    pub groups: Vec<u32>,
}

impl UnixPeer {
    /// Whether the caller belonged to group `gid` when it connected: as its
    /// primary group or among its supplementary groups, both as the kernel
    /// recorded them on the socket.
    pub fn is_member_of(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// `SO_PEERGROUPS` (Linux 4.13+) as asm-generic numbers it, for x86_64 and
/// aarch64; the libc crate does not export it.
const SO_PEERGROUPS: libc::c_int = 59;

/// The supplementary groups the kernel recorded for the process at the other
/// end of `stream` when it connected. Unlike the process's current groups,
/// they cannot change, and they belong to that connection, not to whatever
/// process has its id later.
fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(std::mem::size_of_val(groups.as_slice()))
            .map_err(io::Error::other)?;
        // SAFETY: the buffer holds `len` bytes, and the kernel writes at
        // most that many and says how many in `len`.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        // ERANGE: too small, and `len` says what it takes.
        if err.raw_os_error() != Some(libc::ERANGE) || count <= groups.len() {
            return Err(err);
        }
        groups.resize(count, 0);
    }
}

/// The id of the group named `name`, if there is one.
pub fn group_id(name: &str) -> Option<u32> {
    let c_name = std::ffi::CString::new(name).ok()?;
    // SAFETY: `group` is plain data that getgrnam_r fills in.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer refers to live, correctly sized storage above.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(group.gr_gid)
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
        self.peer.clone()
    }
}

/// A socket file that is removed when dropped, so a stopped server leaves
/// no stale socket behind.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.0)
            && err.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.0.display(), "could not remove socket: {err}");
        }
    }
}

/// Binds a unix socket at `path` with permission bits `mode`, owned by
/// group `gid` when given, replacing a stale socket file left by a dead
/// process.
///
/// The socket is bound in a fresh directory of our own (mode 0700, beside
/// `path`) and renamed into place only once its mode and group are set: it
/// is never connectable with the umask's looser permissions, and nobody
/// else can swap it for a symlink that the mode and group would then be set
/// on. The caller must hold whatever lock makes it the only live server for
/// this path, or it would steal a running server's socket.
pub fn bind(path: &Path, mode: u32, gid: Option<u32>) -> io::Result<(UnixListener, SocketFile)> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a socket path needs a file name",
        )
    })?;
    let staging = tempfile::Builder::new()
        .prefix(".socket-")
        .tempdir_in(dir)?;
    let staged = staging.path().join(name);
    let listener = UnixListener::bind(&staged)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&staged, None, Some(gid))?;
    }
    std::fs::rename(&staged, path)?;
    Ok((listener, SocketFile(path.to_owned())))
}

/// The stream of accepted connections, each tagged with its credentials.
/// Connections whose credentials cannot be read are dropped. While the
/// process is out of descriptors, accepting pauses ([`AcceptPacing`]).
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<UnixConnection>> {
    let pacing = AcceptPacing::new("unix socket");
    futures::stream::unfold((listener, pacing), |(listener, mut pacing)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    pacing.accepted();
                    if let Some(connection) = with_credentials(stream) {
                        return Some((Ok(connection), (listener, pacing)));
                    }
                }
                Err(err) if pacing.failed(&err).await => {}
                Err(err) => return Some((Err(err), (listener, pacing))),
            }
        }
    })
}

/// `stream` with its caller's credentials, if the kernel reports them.
fn with_credentials(stream: UnixStream) -> Option<UnixConnection> {
    let cred = stream.peer_cred().ok()?;
    let groups = peer_groups(&stream).ok()?;
    Some(UnixConnection {
        peer: UnixPeer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups,
        },
        stream,
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

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    use super::*;

    #[tokio::test]
    async fn membership_counts_the_groups_recorded_at_connect_time() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, _file) = bind(&dir.path().join("s.sock"), 0o600, None).unwrap();
        let mut accepted = Box::pin(incoming(listener));
        let _client = UnixStream::connect(dir.path().join("s.sock"))
            .await
            .unwrap();
        let peer = accepted.next().await.unwrap().unwrap().peer;

        let mut groups = vec![0 as libc::gid_t; 256];
        // SAFETY: the buffer holds `groups.len()` gids.
        let n = unsafe { libc::getgroups(groups.len() as i32, groups.as_mut_ptr()) };
        groups.truncate(usize::try_from(n).unwrap());
        // SAFETY: getegid cannot fail and touches no memory.
        let primary = unsafe { libc::getegid() };
        assert_eq!(peer.gid, primary);
        for gid in groups.iter().copied().chain([primary]) {
            assert!(peer.is_member_of(gid), "{gid}");
        }
        assert!(!peer.is_member_of(u32::MAX - 2));
    }

    #[tokio::test]
    async fn binds_with_its_mode_and_leaves_nothing_else_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        std::fs::write(&path, "stale").unwrap();
        let (_listener, file) = bind(&path, 0o660, None).unwrap();
        let mode = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660);
        UnixStream::connect(&path).await.unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["admin.sock"]);
        drop(file);
        assert!(!path.exists());
    }

    #[test]
    fn looks_up_groups_by_name() {
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-drv-thru"), None);
        assert_eq!(group_id("nul\0byte"), None);
    }
}
