//! Telling whoever started the builder that it is ready, so no supervisor
//! or test has to read the log: systemd's `sd_notify` protocol, and one JSON
//! line on stdout with `--ready-json`.

use std::{
    ffi::OsStr,
    io::{self, Write as _},
    os::{
        linux::net::SocketAddrExt as _,
        unix::{
            ffi::OsStrExt as _,
            net::{SocketAddr, UnixDatagram},
        },
    },
};

use anyhow::Context as _;

use crate::server::Ready;

/// Reports `ready` to systemd when it asked (`NOTIFY_SOCKET`), and on stdout
/// when `json` is set.
pub(super) fn announce(ready: &Ready, json: bool) -> anyhow::Result<()> {
    if let Some(socket) = std::env::var_os("NOTIFY_SOCKET") {
        // A lost notification makes systemd time the unit out, which says
        // more than failing a builder that works would.
        if let Err(err) = notify(&socket, "READY=1") {
            tracing::warn!("cannot notify systemd at {}: {err}", socket.display());
        }
    }
    if json {
        let mut stdout = io::stdout().lock();
        serde_json::to_writer(&mut stdout, ready).context("writing the readiness line")?;
        writeln!(stdout)
            .and_then(|()| stdout.flush())
            .context("writing the readiness line")?;
    }
    Ok(())
}

/// Sends `state` as one datagram to the socket named as in `NOTIFY_SOCKET`.
fn notify(socket: &OsStr, state: &str) -> io::Result<()> {
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &notify_address(socket)?)?;
    Ok(())
}

/// A leading `@` names a socket in the abstract namespace, as in systemd.
fn notify_address(socket: &OsStr) -> io::Result<SocketAddr> {
    match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(socket),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(listener: &UnixDatagram) -> String {
        let mut buffer = [0; 64];
        let len = listener.recv(&mut buffer).unwrap();
        String::from_utf8(buffer[..len].to_vec()).unwrap()
    }

    #[test]
    fn notifies_a_socket_named_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify(path.as_os_str(), "READY=1").unwrap();
        assert_eq!(receive(&listener), "READY=1");
    }

    #[test]
    fn notifies_an_abstract_socket_named_with_an_at() {
        let name = format!("drv-thru-test-{}", std::process::id());
        let listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        notify(OsStr::new(&format!("@{name}")), "READY=1").unwrap();
        assert_eq!(receive(&listener), "READY=1");
    }
}
