//! Transfer benchmark: drv-thru against `nix copy` on the same data, in one run.
//!
//! ```text
//! cargo bench --bench transfer -- [--size 1G] [--runs 3] [--json] [--cases LIST]
//!                                  [--small-count 2000] [--clients 8] [--dir DIR] [--keep]
//!                                  [--compare OTHER_DRV_THRU_BINARY [--compare-label before]]
//!                                  [--wan]
//! ```
//!
//! `--compare` measures a second drv-thru build (its own builder process and
//! client) in the same run, for before/after figures on equal terms.
//!
//! `--wan` measures drv-thru alone, and only download, upload, small-up and
//! small-down, over an emulated link instead of loopback: the builder and the
//! client each get a network namespace joined to this one by a veth pair
//! capped at 1 Gbit/s (`tbf`), with no route between them. The client dials
//! a UDP delay line in this process that forwards to the builder 25 ms later
//! each way (50 ms round trip; this kernel has no `netem`).
//!
//! Like the end-to-end tests, it makes two Nix stores on this machine (a
//! directory bind-mounted over `/nix` in a private mount namespace each), starts
//! a real `drv-thru serve` in the builder's store and runs the real
//! `drv-thru build` in the client's. Needs root; skips with a message otherwise.
//!
//! Every case builds a `.drv` that was instantiated during setup, so evaluation
//! is never timed. Baselines move the same store paths with `nix copy`: from a
//! `file://?compression=none` cache, from the same cache over loopback HTTP
//! (`python3 -m http.server`) and over `ssh-ng://` through an sshd started in
//! the builder's store (skipped with a note when there is no sshd). Caches are
//! filled before timing; drv-thru's builder cache is measured both cold (filled
//! by the timed request) and warm.
//!
//! Prints a markdown table of medians (or JSON with `--json`). It asserts
//! nothing about timing.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsStr,
    fmt::Write as _,
    io::{self, BufRead, BufReader, Read, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

const MIB: f64 = 1024.0 * 1024.0;

// === options ===

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    Download,
    DownloadText,
    Upload,
    SmallUp,
    SmallDown,
    Trivial,
    Concurrent,
}

impl Case {
    const ALL: [Case; 7] = [
        Case::Download,
        Case::DownloadText,
        Case::Upload,
        Case::SmallUp,
        Case::SmallDown,
        Case::Trivial,
        Case::Concurrent,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::Download => "download",
            Case::DownloadText => "download-text",
            Case::Upload => "upload",
            Case::SmallUp => "small-up",
            Case::SmallDown => "small-down",
            Case::Trivial => "trivial",
            Case::Concurrent => "concurrent",
        }
    }
}

#[derive(Debug)]
struct Options {
    size: u64,
    runs: usize,
    json: bool,
    cases: Vec<Case>,
    small_count: usize,
    clients: usize,
    dir: Option<PathBuf>,
    keep: bool,
    compare: Option<PathBuf>,
    compare_label: String,
    wan: bool,
}

const USAGE: &str = "usage: cargo bench --bench transfer -- [--size 1G] [--runs 3] [--json] \
[--cases download,download-text,upload,small-up,small-down,trivial,concurrent] \
[--small-count 2000] [--clients 8] [--dir DIR] [--keep] [--compare OTHER_DRV_THRU_BINARY [--compare-label before]] \
[--wan (only download, upload, small-up, small-down: over a 50 ms, 1 Gbit/s emulated link)]";

fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |at| text.split_at(at));
    let number: u64 = digits.parse().map_err(|_| format!("bad size {text:?}"))?;
    let shift = match unit.trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        _ => return Err(format!("bad size unit in {text:?} (use K, M or G)")),
    };
    Ok(number << shift)
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        size: 1 << 30,
        runs: 3,
        json: false,
        cases: Case::ALL.to_vec(),
        small_count: 2000,
        clients: 8,
        dir: None,
        keep: false,
        compare: None,
        compare_label: "before".to_owned(),
        wan: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--size" => options.size = parse_size(&value("--size")?)?,
            "--runs" => {
                options.runs = value("--runs")?
                    .parse()
                    .map_err(|_| "--runs needs a number")?
            }
            "--json" => options.json = true,
            "--cases" => {
                let list = value("--cases")?;
                options.cases = list
                    .split(',')
                    .filter(|name| !name.is_empty())
                    .map(|name| {
                        Case::ALL
                            .into_iter()
                            .find(|case| case.name() == name)
                            .ok_or(format!("unknown case {name:?}"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--small-count" => {
                options.small_count = value("--small-count")?
                    .parse()
                    .map_err(|_| "--small-count needs a number")?
            }
            "--clients" => {
                options.clients = value("--clients")?
                    .parse()
                    .map_err(|_| "--clients needs a number")?
            }
            "--dir" => options.dir = Some(PathBuf::from(value("--dir")?)),
            "--keep" => options.keep = true,
            "--compare" => options.compare = Some(PathBuf::from(value("--compare")?)),
            "--compare-label" => options.compare_label = value("--compare-label")?,
            "--wan" => options.wan = true,
            "--help" | "-h" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if options.runs == 0 || options.size < 1024 || options.small_count == 0 || options.clients == 0
    {
        return Err(format!("sizes and counts must be positive\n{USAGE}"));
    }
    options.cases.sort();
    options.cases.dedup();
    Ok(options)
}

// === stores ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Builder,
    Client,
}

/// Where everything lives: `DIR/stores/{builder,client}` are the two `/nix`
/// directories, `DIR/home/*` their users' homes.
struct World {
    dir: PathBuf,
    conf: PathBuf,
    /// Whether each side runs in its `--wan` network namespace.
    wan: bool,
    /// The client's `XDG_RUNTIME_DIR`: a private directory on a tmpfs, as a
    /// systemd login session has (`None` without `/dev/shm`).
    runtime: Option<tempfile::TempDir>,
}

impl World {
    fn store_dir(&self, side: Side) -> PathBuf {
        self.dir.join("stores").join(match side {
            Side::Builder => "builder",
            Side::Client => "client",
        })
    }

    fn home(&self, side: Side) -> PathBuf {
        self.dir.join("home").join(match side {
            Side::Builder => "builder",
            Side::Client => "client",
        })
    }

    /// `program` with `side`'s store mounted on `/nix` (and in `side`'s
    /// network namespace with `--wan`).
    fn command(&self, side: Side, program: impl AsRef<OsStr>) -> Command {
        let home = self.home(side);
        let mut command = if self.wan {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", wan_net(side).namespace, "unshare"]);
            command
        } else {
            Command::new("unshare")
        };
        command
            .args([
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                r#"mount --bind "$0" /nix && exec "$@""#,
            ])
            .arg(self.store_dir(side))
            .arg(program)
            .env("NIX_CONF_DIR", &self.conf)
            .env("XDG_CACHE_HOME", "/nix/var/xdg-cache")
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("HOME", &home)
            .env_remove("XDG_RUNTIME_DIR")
            .env("DRV_THRU_RELAY", "disabled")
            .env_remove("RUST_LOG")
            .env_remove("DRV_THRU_DATA_DIR")
            .env_remove("NIX_REMOTE")
            .current_dir(&self.dir);
        if let (Side::Client, Some(runtime)) = (side, &self.runtime) {
            command.env("XDG_RUNTIME_DIR", runtime.path());
        }
        command
    }

    fn run_ok(&self, side: Side, program: &str, args: &[&str]) -> String {
        let output = self
            .command(side, program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("running {program}: {err}"));
        check(&output, program, args);
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// Deletes whichever of `paths` are valid, all at once.
    fn delete(&self, side: Side, paths: &[String]) {
        if paths.is_empty() {
            return;
        }
        let mut args = vec!["--check-validity", "--print-invalid"];
        args.extend(paths.iter().map(String::as_str));
        let invalid = self.run_ok(side, "nix-store", &args);
        let invalid: Vec<&str> = invalid.lines().collect();
        let valid: Vec<&str> = paths
            .iter()
            .map(String::as_str)
            .filter(|p| !invalid.contains(p))
            .collect();
        if valid.is_empty() {
            return;
        }
        let mut args = vec!["--delete"];
        args.extend(valid);
        // Nix counts files open in any process as roots, and both stores
        // share this machine's /proc: while the builder still reads its copy
        // of a path (compressing it for its cache), the client's copy of the
        // same path counts as alive.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let output = self
                .command(side, "nix-store")
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|err| panic!("running nix-store: {err}"));
            let alive = String::from_utf8_lossy(&output.stderr).contains("still alive");
            if output.status.success() || !alive || Instant::now() > deadline {
                check(&output, "nix-store", &args);
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Forgets Nix's narinfo cache, so every run asks its cache afresh.
    fn forget_narinfo_cache(&self, side: Side) {
        let _ = std::fs::remove_dir_all(self.store_dir(side).join("var/xdg-cache"));
    }
}

fn check(output: &Output, program: &str, args: &[&str]) {
    assert!(
        output.status.success(),
        "{program} {} failed ({}):\n{}",
        shorten(&args.join(" ")),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn shorten(text: &str) -> String {
    if text.len() > 300 {
        format!("{}…", &text[..text.floor_char_boundary(300)])
    } else {
        text.to_owned()
    }
}

// === the builder process ===

struct Server {
    child: Child,
    endpoint_id: String,
    addr: SocketAddr,
    data_dir: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(world: &World, bin: &Path, name: &str, trusted: &str) -> Self {
        let data_dir = world.dir.join(format!("builder-data-{name}"));
        let listen = if world.wan {
            format!("{}.2:0", wan_net(Side::Builder).prefix)
        } else {
            "127.0.0.1:0".to_owned()
        };
        let mut child = world
            .command(Side::Builder, bin)
            .args(["serve", "--listen", &listen, "--data-dir"])
            .arg(&data_dir)
            .args(["--trusted-client", trusted, "--max-concurrent-builds", "2"])
            .env("RUST_LOG", "drv_thru=info,iroh=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting drv-thru serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let writer = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                writer.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let (mut endpoint_id, mut addr) = (None, None);
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| {
                    panic!(
                        "drv-thru serve did not become ready:\n{}",
                        log.lock().unwrap().join("\n")
                    )
                });
            if let Some(rest) = line.split("endpoint_id=").nth(1) {
                endpoint_id = rest.split_whitespace().next().map(str::to_owned);
            }
            if let Some(rest) = line.split("listening on ").nth(1) {
                addr = addr.or_else(|| rest.split_whitespace().next().and_then(|a| a.parse().ok()));
            }
            if line.contains("admin socket ready") {
                break;
            }
        }
        Self {
            child,
            endpoint_id: endpoint_id.expect("the log names the endpoint id"),
            addr: addr.expect("the log names a listening address"),
            data_dir,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Empties the builder's signed output cache.
    fn clear_cache(&self) {
        let cache = self.data_dir.join("cache");
        if let Ok(entries) = std::fs::read_dir(&cache) {
            for entry in entries.flatten() {
                let path = entry.path();
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
    }

    fn status(&self, world: &World) -> Value {
        let out = world.run_ok(
            Side::Builder,
            drv_thru_bin().to_str().expect("UTF-8 path"),
            &[
                "status",
                "--json",
                "--data-dir",
                self.data_dir.to_str().expect("UTF-8 path"),
            ],
        );
        serde_json::from_str(&out).expect("status --json prints JSON")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drv_thru_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_drv-thru"))
}

/// A drv-thru build to measure: this tree's, or another given with `--compare`.
struct Variant {
    /// How the table names it.
    label: String,
    /// Its `drv-thru` binary, for both the builder and the client.
    bin: PathBuf,
    /// Its builder, and its name in the client's builders.json.
    server: Server,
    name: String,
    /// What the client dials with `--wan`.
    line: Option<DelayLine>,
}

// === helper services: HTTP and sshd ===

struct Service {
    child: Child,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn wait_for_port(port: u16, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

fn start_http(dir: &Path) -> Result<(Service, u16), String> {
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
    if wait_for_port(port, &mut child) {
        Ok((Service { child }, port))
    } else {
        let _ = child.kill();
        Err("python3 -m http.server did not start".to_owned())
    }
}

struct Ssh {
    _service: Service,
    opts: String,
    url: String,
}

/// An sshd in the builder's store, so `nix-daemon --stdio` serves that store.
fn start_sshd(world: &World) -> Result<Ssh, String> {
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
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPermitRootLogin yes\n\
             AuthorizedKeysFile {auth}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             PidFile none\nLogLevel ERROR\n",
            host = dir.join("host").display(),
            auth = dir.join("authorized_keys").display(),
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut child = world
        .command(Side::Builder, sshd)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("sshd: {e}"))?;
    if !wait_for_port(port, &mut child) {
        let _ = child.kill();
        return Err("sshd did not start".to_owned());
    }
    Ok(Ssh {
        _service: Service { child },
        opts: format!(
            "-p {port} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            dir.join("client").display()
        ),
        url: format!(
            "ssh-ng://root@127.0.0.1?remote-program={}",
            daemon.display()
        ),
    })
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

// === --wan: an emulated link ===

/// One side's network namespace, joined to this one by a veth pair:
/// `PREFIX.1/24` on this namespace's end, `PREFIX.2/24` on the side's.
#[derive(Clone, Copy)]
struct WanNet {
    namespace: &'static str,
    prefix: &'static str,
}

impl WanNet {
    /// This namespace's end of the pair.
    fn outside(self) -> String {
        format!("{}-h", self.namespace)
    }

    fn inside(self) -> String {
        format!("{}-n", self.namespace)
    }
}

fn wan_net(side: Side) -> WanNet {
    match side {
        Side::Builder => WanNet {
            namespace: "dtb-srv",
            prefix: "10.77.0",
        },
        Side::Client => WanNet {
            namespace: "dtb-cli",
            prefix: "10.77.1",
        },
    }
}

/// Each way; the round trip is twice this.
const WAN_DELAY: Duration = Duration::from_millis(25);

/// The link's speed, on what enters each namespace so both directions are
/// capped, with about 20 ms of queue as a router might have.
const WAN_TBF: [&str; 7] = ["tbf", "rate", "1gbit", "burst", "256kb", "latency", "20ms"];

/// Per socket of the delay line, past `net.core.rmem_max` (hence the FORCE
/// options, as root): more than 50 ms at 1 Gbit/s, so the line itself is
/// never where packets are lost.
const LINE_BUFFER: libc::c_int = 8 << 20;

/// Runs a setup tool, for its output.
fn tool(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("{program}: {err}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The namespaces and veth pairs of `--wan`; dropping it removes them, also
/// when setting them up failed halfway.
struct Wan;

impl Wan {
    fn setup() -> Result<Self, String> {
        // What a crashed run left behind.
        Self::remove();
        let wan = Wan;
        for side in [Side::Builder, Side::Client] {
            let net = wan_net(side);
            let WanNet { namespace, prefix } = net;
            let (outside, inside) = (net.outside(), net.inside());
            tool("ip", &["netns", "add", namespace])?;
            tool(
                "ip",
                &[
                    "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns",
                    namespace,
                ],
            )?;
            tool(
                "ip",
                &["addr", "add", &format!("{prefix}.1/24"), "dev", &outside],
            )?;
            tool("ip", &["link", "set", &outside, "up"])?;
            // No default route: the other namespace is reachable only through
            // the delay line, so Iroh finds no direct path around it.
            let addr = format!("{prefix}.2/24");
            tool(
                "ip",
                &["-n", namespace, "addr", "add", &addr, "dev", &inside],
            )?;
            tool("ip", &["-n", namespace, "link", "set", &inside, "up"])?;
            // The client's cache proxy listens on loopback.
            tool("ip", &["-n", namespace, "link", "set", "lo", "up"])?;
            let mut tc = vec!["qdisc", "add", "dev", &outside, "root"];
            tc.extend(WAN_TBF);
            tool("tc", &tc)?;
        }
        Ok(wan)
    }

    fn remove() {
        for side in [Side::Builder, Side::Client] {
            let _ = tool("ip", &["netns", "delete", wan_net(side).namespace]);
            // A namespace outlives its name while anything still uses it;
            // deleting our end of the pair takes the other end at once.
            let _ = tool("ip", &["link", "delete", &wan_net(side).outside()]);
        }
    }

    /// Times one round trip through a delay line to an echo in the builder's
    /// namespace, after checking that the client's has no other way there.
    fn probe(&self) -> Result<Duration, String> {
        let echo = bind_in(Side::Builder)?;
        let client = bind_in(Side::Client)?;
        let echo_addr = echo.local_addr().map_err(|e| e.to_string())?;
        if client.send_to(b"direct", echo_addr).is_ok() {
            return Err(format!(
                "the client's namespace reaches {echo_addr} without the delay line"
            ));
        }
        let line = DelayLine::start(echo_addr)?;
        let echoer = thread::spawn(move || {
            let mut buffer = [0u8; 64];
            let (len, from) = echo.recv_from(&mut buffer)?;
            echo.send_to(&buffer[..len], from)
        });
        let start = Instant::now();
        client
            .send_to(b"ping", line.addr)
            .and_then(|_| client.recv_from(&mut [0u8; 64]))
            .map_err(|e| format!("no echo through the delay line: {e}"))?;
        let rtt = start.elapsed();
        echoer
            .join()
            .expect("echo thread")
            .map_err(|e| format!("echo: {e}"))?;
        Ok(rtt)
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        Self::remove();
    }
}

/// A UDP socket on `side`'s end of its veth pair, giving up reading after
/// 5 s. A socket stays in the namespace it was made in, so only a
/// short-lived thread has to enter it.
fn bind_in(side: Side) -> Result<UdpSocket, String> {
    let net = wan_net(side);
    let namespace = std::fs::File::open(format!("/run/netns/{}", net.namespace))
        .map_err(|e| format!("{}: {e}", net.namespace))?;
    let addr = format!("{}.2:0", net.prefix);
    thread::spawn(move || {
        if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = UdpSocket::bind(addr)?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(socket)
    })
    .join()
    .expect("namespace thread")
    .map_err(|e| format!("a socket in {}: {e}", net.namespace))
}

/// A stand-in for `tc netem delay`, which this kernel lacks: forwards UDP
/// between the client's namespace and the builder's, `WAN_DELAY` late each
/// way. The builder sees the line as its client, as if behind NAT; replies go
/// to whoever sent last.
struct DelayLine {
    /// Where the client dials.
    addr: SocketAddr,
    /// The line's end towards the builder.
    builder_side: SocketAddr,
    up: Arc<Flow>,
    down: Arc<Flow>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// One direction's counters.
#[derive(Default)]
struct Flow {
    packets: AtomicU64,
    /// Sends: a GSO train of packets counts once.
    trains: AtomicU64,
    bytes: AtomicU64,
    send_errors: AtomicU64,
    /// Packets from anyone but the builder, or from it before the client spoke.
    strays: AtomicU64,
    /// Packets sent over a millisecond past their time, and the longest
    /// wait past it in µs: the line falling behind adds delay of its own.
    late: AtomicU64,
    late_us: AtomicU64,
}

impl DelayLine {
    fn start(builder: SocketAddr) -> Result<Self, String> {
        let bind = |side: Side| -> Result<UdpSocket, String> {
            let socket = UdpSocket::bind(format!("{}.1:0", wan_net(side).prefix))
                .map_err(|e| format!("delay line: {e}"))?;
            let (size, on) = (LINE_BUFFER, 1 as libc::c_int);
            for (level, option, value) in [
                (libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size),
                (libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &size),
                (libc::SOL_UDP, libc::UDP_GRO, &on),
            ] {
                let set = unsafe {
                    libc::setsockopt(
                        socket.as_raw_fd(),
                        level,
                        option,
                        (&raw const *value).cast(),
                        size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if set != 0 {
                    return Err(format!(
                        "delay line socket option {option}: {}",
                        io::Error::last_os_error()
                    ));
                }
            }
            // Wakes the receiving threads now and then to notice `stop`.
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .map_err(|e| e.to_string())?;
            Ok(socket)
        };
        let client_side = bind(Side::Client)?;
        let builder_side = bind(Side::Builder)?;
        let clone = |socket: &UdpSocket| socket.try_clone().map_err(|e| e.to_string());
        let client = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (up, down) = (Arc::new(Flow::default()), Arc::new(Flow::default()));
        let mut threads = Vec::new();
        let last_sender = client.clone();
        threads.extend(forward(
            "up",
            clone(&client_side)?,
            clone(&builder_side)?,
            up.clone(),
            stop.clone(),
            move |from| {
                *last_sender.lock().unwrap() = Some(from);
                Some(builder)
            },
        ));
        threads.extend(forward(
            "down",
            clone(&builder_side)?,
            clone(&client_side)?,
            down.clone(),
            stop.clone(),
            move |from| {
                if from == builder {
                    *client.lock().unwrap()
                } else {
                    None
                }
            },
        ));
        Ok(Self {
            addr: client_side.local_addr().map_err(|e| e.to_string())?,
            builder_side: builder_side.local_addr().map_err(|e| e.to_string())?,
            up,
            down,
            stop,
            threads,
        })
    }

    fn summary(&self) -> String {
        let flow = |name: &str, flow: &Flow, receiver: SocketAddr| {
            format!(
                "{name} {} packets in {} sends ({:.1} MiB), {} dropped by the line's socket, \
                 {} send errors, {} strays, {} over 1 ms late (at most {:.1} ms)",
                flow.packets.load(Ordering::Relaxed),
                flow.trains.load(Ordering::Relaxed),
                flow.bytes.load(Ordering::Relaxed) as f64 / MIB,
                udp_drops(receiver).map_or("?".to_owned(), |n| n.to_string()),
                flow.send_errors.load(Ordering::Relaxed),
                flow.strays.load(Ordering::Relaxed),
                flow.late.load(Ordering::Relaxed),
                flow.late_us.load(Ordering::Relaxed) as f64 / 1000.0
            )
        };
        format!(
            "{}; {}",
            flow("up", &self.up, self.addr),
            flow("down", &self.down, self.builder_side)
        )
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Sends what arrives on `input` from `output`, `WAN_DELAY` later, to where
/// `route` says for its sender (or nowhere). Receiving and sending are
/// separate threads so that waiting never delays reading; with one constant
/// delay, arrival order is already deadline order. Trains of packets that an
/// endpoint sent at once with GSO stay whole: with a syscall per packet the
/// line would need a good part of a CPU, which the endpoints lack.
fn forward(
    name: &str,
    input: UdpSocket,
    output: UdpSocket,
    flow: Arc<Flow>,
    stop: Arc<AtomicBool>,
    mut route: impl FnMut(SocketAddr) -> Option<SocketAddr> + Send + 'static,
) -> [thread::JoinHandle<()>; 2] {
    let (queue, queued) = mpsc::channel::<(Instant, SocketAddr, Vec<u8>, Option<u16>)>();
    let receiving = {
        let flow = flow.clone();
        line_thread(format!("line-{name}-recv"), move || {
            let mut buffer = vec![0u8; 1 << 16];
            while !stop.load(Ordering::Relaxed) {
                let Ok((len, from, segment)) = receive(&input, &mut buffer) else {
                    continue;
                };
                match route(from) {
                    Some(to) => {
                        let due = Instant::now() + WAN_DELAY;
                        let _ = queue.send((due, to, buffer[..len].to_vec(), segment));
                    }
                    None => {
                        flow.strays.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let sending = line_thread(format!("line-{name}-send"), move || {
        for (due, to, packet, segment) in queued {
            thread::sleep(due.saturating_duration_since(Instant::now()));
            let late = due.elapsed();
            if late > Duration::from_millis(1) {
                flow.late.fetch_add(1, Ordering::Relaxed);
            }
            flow.late_us
                .fetch_max(late.as_micros() as u64, Ordering::Relaxed);
            match send(&output, to, &packet, segment) {
                Ok(()) => {
                    let segment = segment.map_or(packet.len(), usize::from);
                    let packets = packet.len().div_ceil(segment.max(1)) as u64;
                    flow.packets.fetch_add(packets, Ordering::Relaxed);
                    flow.trains.fetch_add(1, Ordering::Relaxed);
                    flow.bytes.fetch_add(packet.len() as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    flow.send_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    [receiving, sending]
}

/// A message header for one datagram from or to `name`, in `iov`; both
/// must outlive the header's use.
fn datagram_header(name: &mut libc::sockaddr_in, iov: &mut libc::iovec) -> libc::msghdr {
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_name = std::ptr::from_mut(name).cast();
    header.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    header.msg_iov = iov;
    header.msg_iovlen = 1;
    header
}

/// Receives a datagram, or with `UDP_GRO` a train of them: `len` bytes cut
/// into `segment`-byte packets (the last may be shorter).
fn receive(socket: &UdpSocket, buffer: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<u16>)> {
    let mut name: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    let mut control = [0u64; 8];
    let mut header = datagram_header(&mut name, &mut iov);
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = size_of_val(&control);
    let len = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut header, 0) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut segment = None;
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const header) };
    while let Some(message) = unsafe { cmsg.as_ref() } {
        if message.cmsg_level == libc::SOL_UDP && message.cmsg_type == libc::UDP_GRO {
            let size = unsafe { libc::CMSG_DATA(cmsg).cast::<libc::c_int>().read_unaligned() };
            segment = u16::try_from(size).ok();
        }
        cmsg = unsafe { libc::CMSG_NXTHDR(&raw const header, cmsg) };
    }
    let from = SocketAddr::from((
        Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)),
        u16::from_be(name.sin_port),
    ));
    Ok((len as usize, from, segment))
}

/// Sends what `receive` got, a train again (`UDP_SEGMENT`) if it was one.
fn send(
    socket: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
    segment: Option<u16>,
) -> io::Result<()> {
    let SocketAddr::V4(to) = to else {
        return Err(io::ErrorKind::Unsupported.into());
    };
    let mut name = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    let mut control = [0u64; 4];
    let mut header = datagram_header(&mut name, &mut iov);
    if let Some(segment) = segment.filter(|&segment| usize::from(segment) < payload.len()) {
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const header);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
            libc::CMSG_DATA(cmsg).cast::<u16>().write_unaligned(segment);
        }
    }
    if unsafe { libc::sendmsg(socket.as_raw_fd(), &raw const header, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A thread of the delay line, at a real-time priority: the builder and the
/// client keep both CPUs busy, and a line that waits for a turn adds delay.
fn line_thread(name: String, work: impl FnOnce() + Send + 'static) -> thread::JoinHandle<()> {
    thread::Builder::new()
        .name(name)
        .spawn(move || {
            let param = libc::sched_param { sched_priority: 10 };
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
                progress(&format!(
                    "delay line without real-time priority: {}",
                    io::Error::last_os_error()
                ));
            }
            work()
        })
        .expect("starting a delay line thread")
}

/// Datagrams the kernel dropped for want of room in the socket bound to
/// `addr`, from `/proc/net/udp`.
fn udp_drops(addr: SocketAddr) -> Option<u64> {
    let SocketAddr::V4(addr) = addr else {
        return None;
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(addr.ip().octets()),
        addr.port()
    );
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    let row = table
        .lines()
        .find(|row| row.split_whitespace().nth(1) == Some(local.as_str()))?;
    row.split_whitespace().last()?.parse().ok()
}

/// What `tbf` on `dev` dropped: the emulated link's own losses.
fn tbf_drops(dev: &str) -> Option<u64> {
    let stats = tool("tc", &["-s", "qdisc", "show", "dev", dev]).ok()?;
    stats
        .split("dropped ")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

// === measuring ===

/// One timed command: wall time and, for drv-thru, its peak RSS.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    secs: f64,
    client_rss: Option<u64>,
    server_rss: Option<u64>,
    /// CPU seconds of the client and the processes it waited for (its Nix).
    client_cpu: f64,
    /// CPU seconds of the builder and the processes it waited for.
    server_cpu: Option<f64>,
}

/// CPU seconds `pid` and its reaped children have used, from
/// `/proc/PID/stat` (utime, stime, cutime, cstime).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces, start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some(ticks as f64 / clock_ticks())
}

/// CPU seconds used by this process's reaped children so far.
fn children_cpu_secs() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid rusage for getrusage to fill.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// `VmHWM` of `pid` in bytes.
fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets `VmHWM` of `pid` to its current RSS (`clear_refs` value 5).
fn reset_hwm(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Runs `command` to completion, sampling the child's peak RSS.
fn timed(mut command: Command, what: &str, server: Option<&Server>) -> Sample {
    if let Some(server) = server {
        reset_hwm(server.pid());
    }
    let server_cpu_before = server.and_then(|s| cpu_secs(s.pid()));
    let client_cpu_before = children_cpu_secs();
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("{what}: {err}"));
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        thread::spawn(move || {
            let mut peak = None;
            while !done.load(Ordering::Relaxed) {
                if let Some(hwm) = vm_hwm(pid) {
                    peak = Some(hwm.max(peak.unwrap_or(0)));
                }
                thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut out = String::new();
    let _ = stdout.read_to_string(&mut out);
    let status = child.wait().expect("waiting for a child");
    let secs = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let client_rss = sampler.join().expect("sampler");
    let err = err_reader.join().expect("stderr reader");
    if !status.success() {
        let log = server.map_or(String::new(), |s| {
            let log = s.log.lock().unwrap();
            let tail = log.len().saturating_sub(40);
            format!("\nbuilder log (last lines):\n{}", log[tail..].join("\n"))
        });
        panic!("{what} failed ({status}):\n{err}{log}");
    }
    Sample {
        secs,
        client_rss,
        server_rss: server.and_then(|s| vm_hwm(s.pid())),
        client_cpu: children_cpu_secs() - client_cpu_before,
        server_cpu: server
            .and_then(|s| cpu_secs(s.pid()))
            .zip(server_cpu_before)
            .map(|(after, before)| after - before),
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The timings of one method in one case.
#[derive(Debug, Clone)]
struct Measured {
    case: Case,
    method: String,
    bytes: u64,
    samples: Vec<Sample>,
}

impl Measured {
    fn secs(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.secs).collect()
    }

    fn median(&self) -> f64 {
        median(&self.secs())
    }

    fn mib_s(&self) -> f64 {
        self.bytes as f64 / MIB / self.median()
    }

    /// The median of what `pick` finds in the samples that have it.
    fn median_of(&self, pick: fn(&Sample) -> Option<f64>) -> Option<f64> {
        let values: Vec<f64> = self.samples.iter().filter_map(pick).collect();
        (!values.is_empty()).then(|| median(&values))
    }
}

/// The concurrency case's findings per run.
#[derive(Debug, Clone, Default)]
struct ConcurrentRun {
    total: f64,
    per_build: Vec<f64>,
    finished: usize,
    fifo: bool,
    queued: usize,
    idle_after: bool,
}

// === the bench's Nix expression ===

const EXPRESSION: &str = r#"
# Written by benches/transfer.rs. Only a static busybox is needed.
let
  params = import ./params.nix;
  inherit (params) salt size smallCount freshCount;
  system = "x86_64-linux";
  bb = builtins.path { path = ./bb; name = "busybox-static"; };
  tools = derivation {
    name = "bench-tools";
    inherit system salt;
    builder = "${bb}/bin/busybox";
    args = [ "sh" "-euc" "${bb}/bin/busybox mkdir -p $out/bin; ${bb}/bin/busybox --install -s $out/bin" ];
  };
  mk = name: script: attrs: derivation ({
    inherit name system salt;
    builder = "${tools}/bin/sh";
    args = [ "-euc" script ];
    PATH = "${tools}/bin";
  } // attrs);
  range = n: builtins.genList (i: i) n;
  smallOutputs = map (i: "o${toString i}") (range smallCount);
  smallSrcs = map (i: builtins.path { path = ./data/small + "/s${toString i}"; name = "bench-small-src-${toString i}"; }) (range smallCount);
  upSrc = builtins.path { path = ./data/upload.bin; name = "bench-upload-src"; };
  fresh = tag: builtins.listToAttrs (map (i: {
    name = "n${toString i}";
    value = mk "bench-${tag}-${toString i}" "${if tag == "conc" then "sleep 0.3; " else ""}echo ${tag} ${toString i} > $out" { };
  }) (range freshCount));
in rec {
  inherit tools;

  # Incompressible.
  rand = mk "bench-rand" "head -c ${toString size} /dev/urandom > $out" { };

  # Text: a hex dump of random bytes (zstd -1 makes it about 47 %).
  text = mk "bench-text" ''
    od -An -tx1 -v /dev/urandom | head -c 8388608 > chunk
    i=0
    while [ $i -le $(( ${toString size} / 8388608 )) ]; do cat chunk; i=$((i+1)); done | head -c ${toString size} > $out
  '' { };

  # A source the builder lacks; the build does not read it.
  upload = mk "bench-upload" ": ${upSrc}; echo uploaded > $out" { };

  # Many small sources the builder lacks.
  smallUp = mk "bench-small-up" "echo uploaded > $out" { srcs = smallSrcs; passAsFile = [ "srcs" ]; };

  # Many small outputs, 1-16 KiB of random data each, and one path referring to all.
  smallMulti = mk "bench-small-multi" ''
    i=0
    while [ $i -lt ${toString smallCount} ]; do
      eval "o=\$o$i"
      head -c $(( 1024 + (i * 7919 % 16) * 1024 )) /dev/urandom > "$o"
      i=$((i+1))
    done
  '' { outputs = smallOutputs; };
  smallDown = mk "bench-small-down" "cp $refsPath $out" {
    refs = map (o: smallMulti.${o}) smallOutputs;
    passAsFile = [ "refs" ];
  };

  remote = fresh "remote";
  local = fresh "local";
  conc = fresh "conc";
}
"#;

fn small_size(i: usize) -> usize {
    1024 + (i * 7919 % 16) * 1024
}

// === setup ===

struct Paths {
    rand_drv: String,
    rand: String,
    text_drv: String,
    text: String,
    upload_drv: String,
    upload_out: String,
    upload_src: String,
    small_up_drv: String,
    small_up_out: String,
    small_srcs: Vec<String>,
    small_down_drv: String,
    small_down_closure: Vec<String>,
    small_down: String,
    small_bytes: u64,
    remote: Vec<String>,
    local: Vec<String>,
    conc: Vec<String>,
}

struct Bench {
    options: Options,
    world: World,
    variants: Vec<Variant>,
    paths: Paths,
    http: Option<(Service, u16)>,
    ssh: Result<Ssh, String>,
    notes: Vec<String>,
    /// After `variants`, so the builders leave the namespaces before they go.
    wan: Option<Wan>,
    _tmp: Option<tempfile::TempDir>,
}

fn write_random(path: &Path, len: usize) {
    let mut urandom = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    let mut file = std::fs::File::create(path).expect("creating a data file");
    let mut buffer = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buffer.len());
        urandom
            .read_exact(&mut buffer[..n])
            .expect("reading /dev/urandom");
        file.write_all(&buffer[..n]).expect("writing a data file");
        left -= n;
    }
}

fn busybox() -> Option<&'static str> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|path| Path::new(path).exists())
}

fn lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Bench {
    fn setup(mut options: Options) -> Result<Self, String> {
        let busybox = busybox().ok_or("no static busybox (apt-get install busybox-static)")?;
        let mut notes = Vec::new();
        let wan = if options.wan {
            let (wan_cases, skipped): (Vec<Case>, Vec<Case>) =
                options.cases.iter().partition(|case| {
                    matches!(
                        case,
                        Case::Download | Case::Upload | Case::SmallUp | Case::SmallDown
                    )
                });
            if !skipped.is_empty() {
                let names: Vec<&str> = skipped.iter().map(|case| case.name()).collect();
                notes.push(format!(
                    "--wan measures only download, upload, small-up and small-down; skipped {}",
                    names.join(", ")
                ));
            }
            options.cases = wan_cases;
            let wan = Wan::setup()?;
            let rtt = wan.probe()?;
            progress(&format!(
                "a round trip through the delay line takes {:.1} ms",
                rtt.as_secs_f64() * 1000.0
            ));
            notes.push(format!(
                "WAN: builder and client in network namespaces joined through this host by veth \
                 pairs, each direction shaped by `{}`, {} ms one-way delay added by a userspace \
                 UDP delay line (probe round trip {:.1} ms); no nix copy baselines, as the line \
                 carries only drv-thru's UDP",
                WAN_TBF.join(" "),
                WAN_DELAY.as_millis(),
                rtt.as_secs_f64() * 1000.0
            ));
            Some(wan)
        } else {
            None
        };
        let (tmp, dir) = match &options.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
                (None, dir.canonicalize().map_err(|e| e.to_string())?)
            }
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("drv-thru-bench-")
                    .tempdir_in("/tmp")
                    .map_err(|e| e.to_string())?;
                let dir = tmp.path().to_owned();
                (Some(tmp), dir)
            }
        };
        let tmp = match tmp {
            Some(tmp) if options.keep => {
                let _ = tmp.keep();
                None
            }
            other => other,
        };
        let conf = dir.join("conf");
        let world = World {
            dir: dir.clone(),
            conf: conf.clone(),
            wan: wan.is_some(),
            runtime: tempfile::Builder::new()
                .prefix("drv-thru-bench-run-")
                .tempdir_in("/dev/shm")
                .ok(),
        };
        for side in [Side::Builder, Side::Client] {
            std::fs::create_dir_all(world.store_dir(side)).map_err(|e| e.to_string())?;
            std::fs::create_dir_all(world.home(side).join(".config/drv-thru"))
                .map_err(|e| e.to_string())?;
        }
        std::fs::create_dir_all(&conf).map_err(|e| e.to_string())?;
        std::fs::write(
            conf.join("nix.conf"),
            "sandbox = false\nsubstituters =\nexperimental-features = nix-command flakes\n\
             build-users-group =\nwarn-dirty = false\nmax-jobs = 2\n",
        )
        .map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir.join("bb/bin")).map_err(|e| e.to_string())?;
        std::fs::copy(busybox, dir.join("bb/bin/busybox")).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir.join("data/small")).map_err(|e| e.to_string())?;

        let salt = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let fresh = options.runs * options.clients.max(2) + 1;
        std::fs::write(
            dir.join("params.nix"),
            format!(
                "{{ salt = \"{salt}\"; size = {}; smallCount = {}; freshCount = {fresh}; }}\n",
                options.size, options.small_count
            ),
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("bench.nix"), EXPRESSION).map_err(|e| e.to_string())?;
        progress(&format!(
            "setup in {}: {} of random upload data, {} small files",
            dir.display(),
            human(options.size),
            options.small_count
        ));
        write_random(&dir.join("data/upload.bin"), options.size as usize);
        let mut small_bytes = 0u64;
        for i in 0..options.small_count {
            write_random(&dir.join(format!("data/small/s{i}")), small_size(i));
            small_bytes += small_size(i) as u64;
        }

        // The client instantiates everything; the builder only what it builds.
        let fresh_attrs = |tag: &str, n: usize| -> Vec<String> {
            (0..n).map(|i| format!("{tag}.n{i}")).collect()
        };
        let runs = options.runs;
        let mut client_attrs: Vec<String> =
            ["tools", "rand", "text", "upload", "smallUp", "smallDown"]
                .map(str::to_owned)
                .to_vec();
        client_attrs.extend(fresh_attrs("remote", runs * 2));
        client_attrs.extend(fresh_attrs("local", runs));
        client_attrs.extend(fresh_attrs("conc", runs * options.clients));
        progress("instantiating in the client store");
        let drvs = instantiate(&world, Side::Client, &client_attrs);
        let drv = |attr: &str| drvs[attr].clone();
        progress("building download data in the builder store");
        let builder_attrs: Vec<String> = ["tools", "rand", "text", "smallDown"]
            .map(str::to_owned)
            .to_vec();
        let builder_drvs = instantiate(&world, Side::Builder, &builder_attrs);
        for attr in &builder_attrs {
            assert_eq!(
                builder_drvs[attr], drvs[attr],
                "both stores instantiate the same {attr}"
            );
        }
        let outputs = |side: Side, drv: &str| -> Vec<String> {
            lines(&world.run_ok(side, "nix-store", &["--realise", drv]))
        };
        let rand = outputs(Side::Builder, &drv("rand")).remove(0);
        let text = outputs(Side::Builder, &drv("text")).remove(0);
        let small_down = outputs(Side::Builder, &drv("smallDown")).remove(0);
        let small_down_closure = lines(&world.run_ok(
            Side::Builder,
            "nix-store",
            &["--query", "--requisites", &small_down],
        ));
        let query_out = |drv: &str| -> String {
            lines(&world.run_ok(Side::Client, "nix-store", &["--query", "--outputs", drv]))
                .remove(0)
        };
        let upload_drv = drv("upload");
        let small_up_drv = drv("smallUp");
        let refs = |drv: &str| -> Vec<String> {
            lines(&world.run_ok(Side::Client, "nix-store", &["--query", "--references", drv]))
        };
        let upload_src = refs(&upload_drv)
            .into_iter()
            .find(|p| p.ends_with("-bench-upload-src"))
            .expect("the upload derivation refers to its source");
        let small_srcs: Vec<String> = refs(&small_up_drv)
            .into_iter()
            .filter(|p| p.contains("-bench-small-src-"))
            .collect();
        assert_eq!(small_srcs.len(), options.small_count);

        let paths = Paths {
            rand_drv: drv("rand"),
            rand,
            text_drv: drv("text"),
            text,
            upload_out: query_out(&upload_drv),
            upload_drv,
            upload_src,
            small_up_out: query_out(&small_up_drv),
            small_up_drv,
            small_srcs,
            small_down_drv: drv("smallDown"),
            small_down_closure,
            small_down,
            small_bytes,
            remote: fresh_attrs("remote", runs * 2)
                .iter()
                .map(|a| drv(a))
                .collect(),
            local: fresh_attrs("local", runs).iter().map(|a| drv(a)).collect(),
            conc: fresh_attrs("conc", runs * options.clients)
                .iter()
                .map(|a| drv(a))
                .collect(),
        };

        let (http, ssh) = if wan.is_some() {
            (None, Err("--wan".to_owned()))
        } else {
            progress("filling the file:// caches for the baselines");
            let mut down: Vec<&str> = vec![&paths.rand, &paths.text, &paths.small_down];
            down.sort();
            let down_url = format!("file://{}/cache-down?compression=none", dir.display());
            let mut args = vec!["copy", "--to", down_url.as_str()];
            args.extend(down);
            world.run_ok(Side::Builder, "nix", &args);
            let up_url = format!("file://{}/cache-up?compression=none", dir.display());
            let mut args = vec!["copy", "--to", up_url.as_str(), paths.upload_src.as_str()];
            args.extend(paths.small_srcs.iter().map(String::as_str));
            world.run_ok(Side::Client, "nix", &args);

            let http = match start_http(&dir) {
                Ok(http) => Some(http),
                Err(err) => {
                    notes.push(format!("http baseline skipped: {err}"));
                    None
                }
            };
            let ssh = start_sshd(&world);
            if let Err(err) = &ssh {
                notes.push(format!("ssh-ng baseline skipped: {err}"));
            }
            (http, ssh)
        };

        // The client is a trusted client of the builder and knows its key.
        let key = world.home(Side::Client).join(".config/drv-thru/secret.key");
        let client_id = drv_thru::keys::load_or_create_endpoint_key(&key)
            .map_err(|e| format!("client key: {e}"))?
            .public()
            .to_string();
        let mut builds = vec![("drv-thru".to_owned(), drv_thru_bin().to_owned())];
        if let Some(other) = &options.compare {
            let other = other
                .canonicalize()
                .map_err(|e| format!("--compare: {e}"))?;
            builds.push((format!("drv-thru ({})", options.compare_label), other));
        }
        let mut variants = Vec::new();
        let mut builders = serde_json::Map::new();
        for (i, (label, bin)) in builds.into_iter().enumerate() {
            let name = format!("bench{i}");
            let server = Server::start(&world, &bin, &name, &client_id);
            let public_key = std::fs::read_to_string(server.data_dir.join("signing-public.key"))
                .map_err(|e| format!("builder signing key: {e}"))?;
            let (label, line) = if wan.is_some() {
                let line = DelayLine::start(server.addr)?;
                let label = format!("{label} over {} ms WAN", 2 * WAN_DELAY.as_millis());
                (label, Some(line))
            } else {
                (label, None)
            };
            let addr = line.as_ref().map_or(server.addr, |line| line.addr);
            builders.insert(
                name.clone(),
                json!({
                    "endpoint_id": server.endpoint_id,
                    "relay_url": null,
                    "addrs": [addr.to_string()],
                    "public_key": public_key.trim(),
                }),
            );
            variants.push(Variant {
                label,
                bin,
                server,
                name,
                line,
            });
        }
        std::fs::write(
            world
                .home(Side::Client)
                .join(".config/drv-thru/builders.json"),
            json!({ "builders": builders }).to_string(),
        )
        .map_err(|e| e.to_string())?;

        Ok(Self {
            options,
            world,
            variants,
            paths,
            http,
            ssh,
            notes,
            wan,
            _tmp: tmp,
        })
    }

    fn drv_thru_build(&self, variant: &Variant, drv: &str) -> Command {
        let mut command = self.world.command(Side::Client, &variant.bin);
        command.args([
            "build",
            drv,
            "--builder",
            &variant.name,
            "--no-nom",
            "--no-link",
        ]);
        command
    }

    fn nix_copy(&self, side: Side, direction: &str, url: &str, paths: &[&str]) -> Command {
        let mut command = self.world.command(side, "nix");
        command.args(["copy", "--no-check-sigs", direction, url]);
        command.args(paths);
        if let Ok(ssh) = &self.ssh {
            command.env("NIX_SSHOPTS", &ssh.opts);
        }
        command
    }

    fn http_url(&self, cache: &str) -> Option<String> {
        self.http
            .as_ref()
            .map(|(_, port)| format!("http://127.0.0.1:{port}/{cache}"))
    }

    fn file_url(&self, cache: &str) -> String {
        format!("file://{}/{cache}", self.world.dir.display())
    }
}

fn instantiate(world: &World, side: Side, attrs: &[String]) -> HashMap<String, String> {
    let mut found = HashMap::new();
    // Bounded batches keep the command line short.
    for batch in attrs.chunks(200) {
        let mut args: Vec<&str> = vec!["bench.nix"];
        for attr in batch {
            args.extend(["-A", attr]);
        }
        let out = lines(&world.run_ok(side, "nix-instantiate", &args));
        assert_eq!(out.len(), batch.len(), "one .drv per attribute: {out:?}");
        found.extend(batch.iter().cloned().zip(out));
    }
    found
}

fn progress(message: &str) {
    eprintln!("bench: {message}");
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else if bytes >= 1 << 20 {
        format!("{:.0} MiB", bytes as f64 / MIB)
    } else {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    }
}

// === cases ===

/// What to undo before each run of a method, so every run does the same work.
#[derive(Clone, Copy)]
struct Reset<'a> {
    /// Paths to delete from the client's store.
    client: &'a [String],
    /// Paths to delete from the builder's store.
    builder: &'a [String],
    /// Whether to empty the builder's signed output cache.
    cold_cache: bool,
}

impl Bench {
    fn measure(
        &self,
        case: Case,
        method: String,
        bytes: u64,
        reset: Reset<'_>,
        server: Option<&Server>,
        mut command: impl FnMut() -> Command,
    ) -> Measured {
        let mut samples = Vec::new();
        for run in 0..self.options.runs {
            self.world.delete(Side::Client, reset.client);
            self.world.delete(Side::Builder, reset.builder);
            if reset.cold_cache {
                for variant in &self.variants {
                    variant.server.clear_cache();
                }
            }
            self.world.forget_narinfo_cache(Side::Client);
            self.world.forget_narinfo_cache(Side::Builder);
            sync();
            let what = format!("{} / {method} (run {})", case.name(), run + 1);
            let sample = timed(command(), &what, server);
            progress(&format!("{what}: {:.2} s", sample.secs));
            samples.push(sample);
        }
        Measured {
            case,
            method,
            bytes,
            samples,
        }
    }

    fn download(&self, case: Case) -> Vec<Measured> {
        let p = &self.paths;
        let (drv, paths, bytes): (&str, Vec<String>, u64) = match case {
            Case::Download => (&p.rand_drv, vec![p.rand.clone()], self.options.size),
            Case::DownloadText => (&p.text_drv, vec![p.text.clone()], self.options.size),
            _ => (&p.small_down_drv, self.small_down_paths(), p.small_bytes),
        };
        let top = match case {
            Case::Download => p.rand.as_str(),
            Case::DownloadText => p.text.as_str(),
            _ => p.small_down.as_str(),
        };
        let warm = Reset {
            client: &paths,
            builder: &[],
            cold_cache: false,
        };
        let cold = Reset {
            cold_cache: true,
            ..warm
        };
        let mut results = Vec::new();
        for variant in &self.variants {
            for (reset, which) in [(cold, "cold"), (warm, "warm")] {
                results.push(self.measure(
                    case,
                    format!("{} (builder cache {which})", variant.label),
                    bytes,
                    reset,
                    Some(&variant.server),
                    || self.drv_thru_build(variant, drv),
                ));
            }
        }
        results.extend(self.baselines(case, bytes, warm, |url| {
            self.nix_copy(Side::Client, "--from", url, &[top])
        }));
        results
    }

    /// The three `nix copy` baselines; `copy` makes the command for a URL.
    fn baselines(
        &self,
        case: Case,
        bytes: u64,
        reset: Reset<'_>,
        copy: impl Fn(&str) -> Command,
    ) -> Vec<Measured> {
        if self.wan.is_some() {
            return Vec::new();
        }
        let cache = match case {
            Case::Upload | Case::SmallUp => "cache-up",
            _ => "cache-down",
        };
        let mut urls = vec![("nix copy file://", self.file_url(cache))];
        if let Some(http) = self.http_url(cache) {
            urls.push(("nix copy http://", http));
        }
        if let Ok(ssh) = &self.ssh {
            urls.push(("nix copy ssh-ng://", ssh.url.clone()));
        }
        urls.into_iter()
            .map(|(method, url)| {
                self.measure(case, method.to_owned(), bytes, reset, None, || copy(&url))
            })
            .collect()
    }

    fn small_down_paths(&self) -> Vec<String> {
        self.paths.small_down_closure.clone()
    }

    fn upload(&self, case: Case) -> Vec<Measured> {
        let p = &self.paths;
        let (drv, out, srcs, bytes): (&str, &str, Vec<String>, u64) = match case {
            Case::Upload => (
                &p.upload_drv,
                &p.upload_out,
                vec![p.upload_src.clone()],
                self.options.size,
            ),
            _ => (
                &p.small_up_drv,
                &p.small_up_out,
                p.small_srcs.clone(),
                p.small_bytes,
            ),
        };
        // What a drv-thru run leaves on the builder, so each run starts afresh.
        let mut builder_paths = vec![out.to_owned(), drv.to_owned()];
        builder_paths.extend(srcs.iter().cloned());
        let src_refs: Vec<&str> = srcs.iter().map(String::as_str).collect();
        let client_paths = [out.to_owned()];
        let reset = Reset {
            client: &client_paths,
            builder: &builder_paths,
            cold_cache: false,
        };
        let mut results: Vec<Measured> = self
            .variants
            .iter()
            .map(|variant| {
                self.measure(
                    case,
                    variant.label.clone(),
                    bytes,
                    reset,
                    Some(&variant.server),
                    || self.drv_thru_build(variant, drv),
                )
            })
            .collect();
        results.extend(self.baselines(case, bytes, reset, |url| {
            if url.starts_with("ssh-ng:") {
                self.nix_copy(Side::Client, "--to", url, &src_refs)
            } else {
                self.nix_copy(Side::Builder, "--from", url, &src_refs)
            }
        }));
        results
    }

    fn trivial(&self) -> Vec<Measured> {
        let run = |method: String, drvs: &[String], remote: Option<&Variant>| {
            let mut samples = Vec::new();
            for (i, drv) in drvs.iter().enumerate() {
                sync();
                let command = match remote {
                    Some(variant) => self.drv_thru_build(variant, drv),
                    None => {
                        let mut command = self.world.command(Side::Client, "nix");
                        command.args(["build", "--no-link", drv]);
                        command
                    }
                };
                let what = format!("trivial / {method} (run {})", i + 1);
                let sample = timed(command, &what, remote.map(|v| &v.server));
                progress(&format!("{what}: {:.3} s", sample.secs));
                samples.push(sample);
            }
            Measured {
                case: Case::Trivial,
                method,
                bytes: 0,
                samples,
            }
        };
        let runs = self.options.runs;
        let mut results: Vec<Measured> = self
            .variants
            .iter()
            .zip(self.paths.remote.chunks(runs))
            .map(|(variant, drvs)| run(format!("{} build", variant.label), drvs, Some(variant)))
            .collect();
        results.push(run("local nix build".to_owned(), &self.paths.local, None));
        results
    }

    fn concurrent(&self) -> Vec<ConcurrentRun> {
        let clients = self.options.clients;
        let variant = &self.variants[0];
        let mut runs = Vec::new();
        for (run, drvs) in self.paths.conc.chunks(clients).enumerate() {
            let order = Arc::new(Mutex::new(QueueOrder::default()));
            let stop = Arc::new(AtomicBool::new(false));
            let watcher = {
                let order = order.clone();
                let stop = stop.clone();
                let data_dir = variant.server.data_dir.clone();
                thread::spawn(move || watch_queue(&data_dir, &order, &stop))
            };
            // Let the watcher subscribe first.
            thread::sleep(Duration::from_millis(300));
            let start = Instant::now();
            let children: Vec<_> = drvs
                .iter()
                .map(|drv| {
                    let mut command = self.drv_thru_build(variant, drv);
                    command
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped());
                    (Instant::now(), command.spawn().expect("starting a client"))
                })
                .collect();
            let mut per_build = Vec::new();
            let mut finished = 0;
            let handles: Vec<_> = children
                .into_iter()
                .map(|(started, mut child)| {
                    thread::spawn(move || {
                        let mut err = String::new();
                        if let Some(mut stderr) = child.stderr.take() {
                            let _ = stderr.read_to_string(&mut err);
                        }
                        let status = child.wait().expect("waiting for a client");
                        (started.elapsed().as_secs_f64(), status.success(), err)
                    })
                })
                .collect();
            for handle in handles {
                let (secs, ok, err) = handle.join().expect("client thread");
                per_build.push(secs);
                if ok {
                    finished += 1;
                } else {
                    progress(&format!("a concurrent client failed:\n{err}"));
                }
            }
            let total = start.elapsed().as_secs_f64();
            // Give the builder a moment to record the last sessions' ends.
            let mut idle_after = false;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let status = variant.server.status(&self.world);
                let busy = status["active"].as_array().map_or(1, Vec::len)
                    + status["queued"].as_array().map_or(1, Vec::len);
                if busy == 0 {
                    idle_after = true;
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            stop.store(true, Ordering::Relaxed);
            let _ = watcher.join();
            let order = order.lock().unwrap();
            let result = ConcurrentRun {
                total,
                per_build,
                finished,
                fifo: order.is_fifo(),
                queued: order.queued.len(),
                idle_after,
            };
            progress(&format!(
                "concurrent (run {}): {:.2} s, {finished}/{clients} finished, {} queued, FIFO {}, idle after {}",
                run + 1,
                result.total,
                result.queued,
                result.fifo,
                result.idle_after
            ));
            runs.push(result);
        }
        runs
    }
}

fn sync() {
    unsafe { libc::sync() };
}

/// The order builds entered the queue and the order they started building,
/// from the builder's status stream.
#[derive(Debug, Default)]
struct QueueOrder {
    queued: Vec<String>,
    started: Vec<String>,
}

impl QueueOrder {
    fn observe(&mut self, status: &drv_thru::proto::BuilderStatus) {
        let mut queued: Vec<_> = status.queued.iter().collect();
        queued.sort_by_key(|q| q.position);
        for build in queued {
            if !self.queued.contains(&build.session_id) {
                self.queued.push(build.session_id.clone());
            }
        }
        for build in &status.active {
            let building = matches!(
                build.phase(),
                drv_thru::proto::BuildPhase::Building | drv_thru::proto::BuildPhase::ServingOutputs
            );
            if building && !self.started.contains(&build.session_id) {
                self.started.push(build.session_id.clone());
            }
        }
    }

    /// Whether the builds that waited started in the order they were queued.
    fn is_fifo(&self) -> bool {
        let started: Vec<&String> = self
            .started
            .iter()
            .filter(|id| self.queued.contains(id))
            .collect();
        let queued: Vec<&String> = self
            .queued
            .iter()
            .filter(|id| started.contains(id))
            .collect();
        started == queued
    }
}

fn watch_queue(data_dir: &Path, order: &Mutex<QueueOrder>, stop: &AtomicBool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let Ok(channel) = drv_thru::client::admin(data_dir).await else {
            progress("cannot watch the builder's status; FIFO not checked");
            return;
        };
        let mut client = drv_thru::proto::builder_client::BuilderClient::new(channel);
        let Ok(stream) = client
            .watch_status(drv_thru::proto::WatchStatusRequest::default())
            .await
        else {
            return;
        };
        let mut stream = stream.into_inner();
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(100), stream.message()).await {
                Ok(Ok(Some(message))) => {
                    if let Some(status) = message.status {
                        order.lock().unwrap().observe(&status);
                    }
                }
                Ok(_) => return,
                Err(_) => {}
            }
        }
    });
}

// === report ===

fn fmt_ratio(numerator: f64, denominator: f64) -> String {
    if numerator.is_finite() && denominator.is_finite() && denominator > 0.0 {
        format!("{:.2}×", numerator / denominator)
    } else {
        "–".to_owned()
    }
}

fn rate(mib_s: f64) -> String {
    if mib_s < 10.0 {
        format!("{mib_s:.1}")
    } else {
        format!("{mib_s:.0}")
    }
}

fn mib(bytes: Option<f64>) -> String {
    bytes.map_or("–".to_owned(), |b| format!("{:.1}", b / MIB))
}

struct Report {
    measured: Vec<Measured>,
    concurrent: Vec<ConcurrentRun>,
}

impl Bench {
    /// What crossed the emulated link. Fails if drv-thru moved more than
    /// the delay line carried, which would mean it found a way around.
    fn wan_report(&self, report: &Report) -> Vec<String> {
        let Some(_) = &self.wan else {
            return Vec::new();
        };
        let mut notes = Vec::new();
        for variant in &self.variants {
            let Some(line) = &variant.line else {
                continue;
            };
            let moved: u64 = report
                .measured
                .iter()
                .filter(|m| m.method.starts_with(&variant.label))
                .map(|m| m.bytes * m.samples.len() as u64)
                .sum();
            let carried =
                line.up.bytes.load(Ordering::Relaxed) + line.down.bytes.load(Ordering::Relaxed);
            assert!(
                carried >= moved,
                "{}: the delay line carried {carried} bytes, less than the {moved} moved",
                variant.label
            );
            notes.push(format!(
                "delay line of {}: {}",
                variant.label,
                line.summary()
            ));
        }
        let drops = [Side::Client, Side::Builder].map(|side| {
            tbf_drops(&wan_net(side).outside()).map_or("?".to_owned(), |n| n.to_string())
        });
        notes.push(format!(
            "tbf dropped {} packets towards the client, {} towards the builder",
            drops[0], drops[1]
        ));
        notes
    }

    fn meta(&self) -> Value {
        let nix = Command::new("nix")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let cpus = thread::available_parallelism().map_or(0, |n| n.get());
        json!({
            "date": date,
            "nix": nix,
            "cpus": cpus,
            "size_bytes": self.options.size,
            "runs": self.options.runs,
            "small_count": self.options.small_count,
            "small_bytes": self.paths.small_bytes,
            "clients": self.options.clients,
            "max_concurrent_builds": 2,
            "notes": self.notes,
        })
    }

    fn markdown(&self, report: &Report) -> String {
        let meta = self.meta();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "drv-thru transfer benchmark, {}; {}; {} CPUs; size {}, {} small paths ({}); medians of {} runs\n",
            meta["date"].as_str().unwrap_or(""),
            meta["nix"].as_str().unwrap_or(""),
            meta["cpus"],
            human(self.options.size),
            self.options.small_count,
            human(self.paths.small_bytes),
            self.options.runs
        );
        let transfer: Vec<&Measured> = report
            .measured
            .iter()
            .filter(|m| m.case != Case::Trivial)
            .collect();
        if !transfer.is_empty() {
            out.push_str("| case | method | median s | MiB/s | min–max s | vs file:// | vs http | vs ssh-ng |\n");
            out.push_str("|---|---|---|---|---|---|---|---|\n");
            for m in &transfer {
                let baseline = |name: &str| {
                    transfer
                        .iter()
                        .find(|b| b.case == m.case && b.method == name)
                        .map_or(f64::NAN, |b| b.median())
                };
                let secs = m.secs();
                let (min, max) = (
                    secs.iter().copied().fold(f64::INFINITY, f64::min),
                    secs.iter().copied().fold(0.0, f64::max),
                );
                let ratios = if m.method.starts_with("drv-thru") {
                    ["nix copy file://", "nix copy http://", "nix copy ssh-ng://"]
                        .map(|b| fmt_ratio(baseline(b), m.median()))
                } else {
                    ["", "", ""].map(str::to_owned)
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.2} | {} | {:.2}–{:.2} | {} | {} | {} |",
                    m.case.name(),
                    m.method,
                    m.median(),
                    rate(m.mib_s()),
                    min,
                    max,
                    ratios[0],
                    ratios[1],
                    ratios[2]
                );
            }
            out.push_str("\nRatios are throughput relative to the baseline (baseline time ÷ drv-thru time; above 1 is faster). drv-thru times are a whole `drv-thru build` of an instantiated .drv (session, upload, a no-op or trivial build, import).\n");
        }
        let trivial: Vec<&Measured> = report
            .measured
            .iter()
            .filter(|m| m.case == Case::Trivial)
            .collect();
        if let Some(local) = trivial.iter().find(|m| !m.method.starts_with("drv-thru")) {
            let _ = writeln!(
                out,
                "\n| trivial build (`echo > $out`), evaluation excluded | median s | min–max s | overhead s |\n|---|---|---|---|"
            );
            for m in &trivial {
                let secs = m.secs();
                let overhead = if m.method.starts_with("drv-thru") {
                    format!("**{:.3}**", m.median() - local.median())
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "| {} | {:.3} | {:.3}–{:.3} | {overhead} |",
                    m.method,
                    m.median(),
                    secs.iter().copied().fold(f64::INFINITY, f64::min),
                    secs.iter().copied().fold(0.0, f64::max)
                );
            }
        }
        if !report.concurrent.is_empty() {
            let c = &report.concurrent;
            let totals: Vec<f64> = c.iter().map(|r| r.total).collect();
            let all: Vec<f64> = c.iter().flat_map(|r| r.per_build.clone()).collect();
            let _ = writeln!(
                out,
                "\n| {} clients at once, max_concurrent_builds = 2 (builds sleep 0.3 s) | value |\n|---|---|",
                self.options.clients
            );
            let _ = writeln!(out, "| total s (median) | {:.2} |", median(&totals));
            let _ = writeln!(out, "| per build p50 s | {:.2} |", percentile(&all, 50.0));
            let _ = writeln!(out, "| per build p99 s | {:.2} |", percentile(&all, 99.0));
            let _ = writeln!(
                out,
                "| finished | {}/{} |",
                c.iter().map(|r| r.finished).sum::<usize>(),
                c.len() * self.options.clients
            );
            let _ = writeln!(
                out,
                "| builds that waited in the queue | {} |",
                c.iter().map(|r| r.queued).sum::<usize>()
            );
            let _ = writeln!(
                out,
                "| started in FIFO order | {} |",
                if c.iter().all(|r| r.fifo) {
                    "yes"
                } else {
                    "NO"
                }
            );
            let _ = writeln!(
                out,
                "| builder idle afterwards (no slot held) | {} |",
                if c.iter().all(|r| r.idle_after) {
                    "yes"
                } else {
                    "NO"
                }
            );
        }
        let rss: Vec<&Measured> = report
            .measured
            .iter()
            .filter(|m| {
                matches!(m.case, Case::Download | Case::Upload) && m.method.starts_with("drv-thru")
            })
            .collect();
        if !rss.is_empty() {
            out.push_str("\n| peak RSS (VmHWM, drv-thru processes only), median | server MiB | client MiB |\n|---|---|---|\n");
            for m in rss {
                let _ = writeln!(
                    out,
                    "| {} / {} | {} | {} |",
                    m.case.name(),
                    m.method,
                    mib(m.median_of(|s| s.server_rss.map(|b| b as f64))),
                    mib(m.median_of(|s| s.client_rss.map(|b| b as f64)))
                );
            }
        }
        let cpu: Vec<&Measured> = report
            .measured
            .iter()
            .filter(|m| m.bytes > 0 && (m.method.starts_with("drv-thru") || self.wan.is_none()))
            .collect();
        if !cpu.is_empty() {
            out.push_str(
                "\n| CPU seconds, median (each side with the Nix processes it waited for) | builder | client |\n|---|---|---|\n",
            );
            for m in cpu {
                let builder = m.median_of(|s| s.server_cpu);
                let _ = writeln!(
                    out,
                    "| {} / {} | {} | {:.2} |",
                    m.case.name(),
                    m.method,
                    builder.map_or("–".to_owned(), |secs| format!("{secs:.2}")),
                    m.median_of(|s| Some(s.client_cpu)).unwrap_or(f64::NAN)
                );
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "\nNote: {note}");
        }
        out
    }

    fn json(&self, report: &Report) -> Value {
        let measured: Vec<Value> = report
            .measured
            .iter()
            .map(|m| {
                let baselines: BTreeMap<&str, f64> = report
                    .measured
                    .iter()
                    .filter(|b| b.case == m.case && b.method.starts_with("nix copy"))
                    .map(|b| (b.method.as_str(), b.median() / m.median()))
                    .collect();
                json!({
                    "case": m.case.name(),
                    "method": m.method,
                    "bytes": m.bytes,
                    "secs": m.secs(),
                    "median_secs": m.median(),
                    "mib_per_sec": if m.bytes > 0 { json!(m.mib_s()) } else { Value::Null },
                    "throughput_vs": if m.method.starts_with("drv-thru") { json!(baselines) } else { Value::Null },
                    "server_peak_rss_bytes": m.samples.iter().map(|s| s.server_rss).collect::<Vec<_>>(),
                    "client_peak_rss_bytes": m.samples.iter().map(|s| s.client_rss).collect::<Vec<_>>(),
                    "server_cpu_secs": m.samples.iter().map(|s| s.server_cpu).collect::<Vec<_>>(),
                    "client_cpu_secs": m.samples.iter().map(|s| s.client_cpu).collect::<Vec<_>>(),
                })
            })
            .collect();
        let concurrent: Vec<Value> = report
            .concurrent
            .iter()
            .map(|r| {
                json!({
                    "total_secs": r.total,
                    "per_build_secs": r.per_build,
                    "finished": r.finished,
                    "queued": r.queued,
                    "fifo": r.fifo,
                    "idle_after": r.idle_after,
                })
            })
            .collect();
        json!({ "meta": self.meta(), "measured": measured, "concurrent": concurrent })
    }
}

fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(err) => {
            eprintln!("{err}");
            std::process::exit(2);
        }
    };
    if unsafe { libc::geteuid() } != 0 {
        println!(
            "skipping the transfer benchmark: it needs root (private mount namespaces for two Nix stores)"
        );
        return;
    }
    if Command::new("nix-store").arg("--version").output().is_err() {
        println!("skipping the transfer benchmark: Nix is not installed");
        return;
    }
    let json_output = options.json;
    let mut bench = match Bench::setup(options) {
        Ok(bench) => bench,
        Err(err) => {
            println!("skipping the transfer benchmark: {err}");
            return;
        }
    };
    let mut report = Report {
        measured: Vec::new(),
        concurrent: Vec::new(),
    };
    for case in bench.options.cases.clone() {
        progress(&format!("case {}", case.name()));
        match case {
            Case::Download | Case::DownloadText | Case::SmallDown => {
                report.measured.extend(bench.download(case))
            }
            Case::Upload | Case::SmallUp => report.measured.extend(bench.upload(case)),
            Case::Trivial => report.measured.extend(bench.trivial()),
            Case::Concurrent => report.concurrent = bench.concurrent(),
        }
    }
    for note in bench.wan_report(&report) {
        progress(&note);
        bench.notes.push(note);
    }
    if json_output {
        println!(
            "{}",
            serde_json::to_string_pretty(&bench.json(&report)).expect("JSON")
        );
    } else {
        println!("{}", bench.markdown(&report));
    }
    progress("done");
}
