//! Baseline services: HTTP and sshd in the builder's store.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    link::{BUILDER_IP, in_namespace},
    stores::{Side, World},
};

pub(crate) struct Service {
    pub(crate) child: Child,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Waits until `child` listens at `addr`, which `side`'s link namespace
/// reaches if given, else this one.
pub(crate) fn wait_for_port(addr: SocketAddr, side: Option<Side>, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let connected = match side {
            Some(side) => in_namespace(side, move || TcpStream::connect(addr)).is_ok(),
            None => TcpStream::connect(addr).is_ok(),
        };
        if connected {
            return true;
        }
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

pub(crate) fn start_http(dir: &Path) -> Result<(Service, u16), String> {
    let port = free_port();
    let mut child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--directory")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|err| format!("python3: {err}"))?;
    if wait_for_port(
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        None,
        &mut child,
    ) {
        Ok((Service { child }, port))
    } else {
        let _ = child.kill();
        Err("python3 -m http.server did not start".to_owned())
    }
}

pub(crate) struct Ssh {
    pub(crate) service: Service,
    /// Where sshd listens.
    pub(crate) port: u16,
    pub(crate) opts: String,
    pub(crate) url: String,
}

/// An sshd in the builder's store, so `nix-daemon --stdio` serves that store
/// with the benchmark's Nix settings (no substituters), as drv-thru's builder
/// does: sshd gives its sessions an environment of its own. With a link, it
/// listens on the builder's address there.
pub(crate) fn start_sshd(world: &World) -> Result<Ssh, String> {
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.exists() {
        return Err("no /usr/sbin/sshd (apt-get install openssh-server)".to_owned());
    }
    let daemon = which("nix-daemon").ok_or("no nix-daemon on PATH")?;
    let dir = world.dir.join("ssh");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::create_dir_all("/run/sshd").map_err(|e| format!("/run/sshd: {e}"))?;
    for key in ["host", "client"] {
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(key))
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("ssh-keygen: {e}"))?;
        if !status.success() {
            return Err("ssh-keygen failed".to_owned());
        }
    }
    std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys"))
        .map_err(|e| e.to_string())?;
    let port = free_port();
    let (listen, side) = if world.link {
        (BUILDER_IP, Some(Side::Builder))
    } else {
        (Ipv4Addr::LOCALHOST, None)
    };
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress {listen}\nHostKey {host}\nPermitRootLogin yes\n\
             AuthorizedKeysFile {auth}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             PidFile none\nLogLevel ERROR\nSetEnv NIX_CONF_DIR={conf}\n",
            host = dir.join("host").display(),
            auth = dir.join("authorized_keys").display(),
            conf = world.dir.join("conf").display(),
        ),
    )
    .map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("sshd.log")).map_err(|e| format!("sshd.log: {e}"))?;
    let mut child = world
        .command(Side::Builder, sshd)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("sshd: {e}"))?;
    if !wait_for_port(SocketAddr::from((listen, port)), side, &mut child) {
        let _ = child.kill();
        let log = std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default();
        return Err(format!("sshd did not start: {}", log.trim()));
    }
    Ok(Ssh {
        service: Service { child },
        port,
        opts: format!(
            "-p {port} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            dir.join("client").display()
        ),
        url: format!("ssh-ng://root@{listen}?remote-program={}", daemon.display()),
    })
}

pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}
