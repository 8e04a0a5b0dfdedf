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

impl UnixPeer {
    /// Whether the caller belongs to group `gid`: as its primary group, or
    /// among the supplementary groups of its process (read from
    /// `/proc/PID/status`, as the kernel reports only the primary group).
    ///
    /// The supplementary groups are those of the process at the time of the
    /// call; a caller whose process has gone is judged by its primary group.
    pub fn is_member_of(&self, gid: u32) -> bool {
        self.gid == gid || self.pid.is_some_and(|pid| process_in_group(pid, gid))
    }
}

/// Whether process `pid` has `gid` among its supplementary groups.
fn process_in_group(pid: i32, gid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .is_some_and(|groups| groups.split_whitespace().any(|g| g.parse() == Ok(gid)))
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
        self.peer
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
/// The socket is bound under a temporary name and renamed into place only
/// once its mode and group are set, so it is never connectable with the
/// umask's looser permissions. The caller must hold whatever lock makes it
/// the only live server for this path, or it would steal a running
/// server's socket.
pub fn bind(path: &Path, mode: u32, gid: Option<u32>) -> io::Result<(UnixListener, SocketFile)> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy())
        .unwrap_or_default();
    let staging = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    match std::fs::remove_file(&staging) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let listener = UnixListener::bind(&staging)?;
    let staged = SocketFile(staging.clone());
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&staging, None, Some(gid))?;
    }
    std::fs::rename(&staging, path)?;
    std::mem::forget(staged);
    Ok((listener, SocketFile(path.to_owned())))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_counts_primary_and_supplementary_groups() {
        let peer = |gid, pid| UnixPeer {
            uid: 1000,
            gid,
            pid,
        };
        assert!(peer(10, None).is_member_of(10));
        assert!(!peer(10, None).is_member_of(11));

        // This process's supplementary groups come from /proc.
        let mut groups = vec![0 as libc::gid_t; 256];
        // SAFETY: the buffer holds `groups.len()` gids.
        let n = unsafe { libc::getgroups(groups.len() as i32, groups.as_mut_ptr()) };
        groups.truncate(usize::try_from(n).unwrap());
        let me = Some(std::process::id() as i32);
        for gid in groups {
            assert!(peer(u32::MAX - 1, me).is_member_of(gid), "{gid}");
        }
        assert!(!peer(u32::MAX - 1, me).is_member_of(u32::MAX - 2));
        // A process that is gone has only its primary group.
        assert!(!peer(u32::MAX - 1, Some(i32::MAX)).is_member_of(0));
    }

    #[test]
    fn looks_up_groups_by_name() {
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-drv-thru"), None);
        assert_eq!(group_id("nul\0byte"), None);
    }
}
