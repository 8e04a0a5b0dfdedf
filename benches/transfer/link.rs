//! `--link`: an emulated network link between the two stores.
//!
//! The builder and the client each get a network namespace holding one end
//! of a veth pair, both ends in one subnet. The other ends stay in this
//! namespace without addresses, so the kernel routes nothing between them:
//! a bridge in this process, [`Line`], reads every Ethernet frame from one
//! of them and writes it to the other. ARP, TCP and UDP all cross it, so
//! `nix copy` over ssh-ng and drv-thru's QUIC see the same link. Each
//! direction is a router's queue, drained at the profile's rate, that drops
//! what arrives while it holds [`QUEUE`] or more, followed by the profile's
//! one-way delay. This kernel has no `netem`, so the delay has to be
//! emulated here.
//!
//! The line reads and writes with `PACKET_VNET_HDR`, so the endpoints' TSO
//! and UDP GSO trains cross whole (a syscall per 1,500-byte frame would take
//! much of a CPU at 1 Gbit/s) and their checksums stay to be filled in, as
//! between two veth ends. A train is shaped as the frames it stands for.

use std::{
    collections::VecDeque,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{MIB, setup::progress, stores::Side};

/// A link to emulate, by `--link NAME`.
#[derive(Debug)]
pub(crate) struct Profile {
    pub(crate) name: &'static str,
    /// Client to builder, in bits per second.
    pub(crate) up: u64,
    /// Builder to client, in bits per second.
    pub(crate) down: u64,
    /// Each way; the round trip is twice this.
    pub(crate) delay: Duration,
}

/// The links `--link` knows; `--wan` is the first.
pub(crate) const PROFILES: [Profile; 3] = [
    Profile {
        name: "1gbit-50ms",
        up: 1_000_000_000,
        down: 1_000_000_000,
        delay: Duration::from_millis(25),
    },
    Profile {
        name: "100mbit-20ms",
        up: 100_000_000,
        down: 100_000_000,
        delay: Duration::from_millis(10),
    },
    Profile {
        name: "home",
        up: 20_000_000,
        down: 100_000_000,
        delay: Duration::from_millis(15),
    },
];

impl Profile {
    pub(crate) fn named(name: &str) -> Option<&'static Profile> {
        PROFILES.iter().find(|profile| profile.name == name)
    }

    /// One line, for the report.
    pub(crate) fn describe(&self) -> String {
        format!(
            "{}: {} Mbit/s up (client to builder), {} Mbit/s down, {} ms round trip",
            self.name,
            self.up / 1_000_000,
            self.down / 1_000_000,
            2 * self.delay.as_millis()
        )
    }
}

/// How long each direction's queue may grow at its rate before it drops,
/// as a router's might; 2.5 MB at 1 Gbit/s, 50 KB at 20 Mbit/s.
pub(crate) const QUEUE: Duration = Duration::from_millis(20);

/// The builder's address, and the client's, in the link's one subnet.
pub(crate) const BUILDER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub(crate) const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);

/// What this run's namespaces and interfaces are named after: `dtl`, the
/// benchmark's pid and `-b` or `-c`. Runs side by side (from another
/// worktree) keep apart, and a crashed run's leftovers are found by pid.
const PREFIX: &str = "dtl";

fn name(pid: u32, side: Side) -> String {
    let letter = match side {
        Side::Builder => 'b',
        Side::Client => 'c',
    };
    format!("{PREFIX}{pid}-{letter}")
}

/// `side`'s network namespace.
pub(crate) fn namespace(side: Side) -> String {
    name(std::process::id(), side)
}

pub(crate) fn ip(side: Side) -> Ipv4Addr {
    match side {
        Side::Builder => BUILDER_IP,
        Side::Client => CLIENT_IP,
    }
}

/// This namespace's end of `side`'s veth pair.
pub(crate) fn outside(side: Side) -> String {
    format!("{}-h", namespace(side))
}

fn inside(side: Side) -> String {
    format!("{}-n", namespace(side))
}

/// Runs a setup tool, for its output.
pub(crate) fn tool(program: &str, args: &[&str]) -> Result<String, String> {
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

/// Runs `work` on a thread in `side`'s namespace. Sockets it makes stay
/// there, so only this short-lived thread has to enter it.
pub(crate) fn in_namespace<T: Send + 'static>(
    side: Side,
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, String> {
    let name = namespace(side);
    let file =
        std::fs::File::open(format!("/run/netns/{name}")).map_err(|e| format!("{name}: {e}"))?;
    thread::spawn(move || {
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        work()
    })
    .join()
    .expect("namespace thread")
    .map_err(|e| format!("in {name}: {e}"))
}

/// The namespaces, the veth pairs and the line between them; dropping it
/// removes them, also when setting them up failed halfway.
pub(crate) struct Link {
    pub(crate) profile: &'static Profile,
    pub(crate) line: Option<Line>,
}

/// What [`Link::probe`] found.
pub(crate) struct Probe {
    /// The shortest of a few UDP round trips and TCP connects.
    pub(crate) udp_rtt: Duration,
    pub(crate) tcp_connect: Duration,
    /// Raw TCP throughput each way, in bits per second, after slow start,
    /// with socket buffers larger than the link's bandwidth-delay product.
    pub(crate) tcp_up: f64,
    pub(crate) tcp_down: f64,
    /// The endpoints' TCP congestion control, which ssh-ng's TCP uses.
    pub(crate) congestion: String,
    /// The line's CPU seconds for those streams, and the bytes it carried.
    pub(crate) line_cpu: f64,
    pub(crate) line_bytes: u64,
}

impl Link {
    pub(crate) fn setup(profile: &'static Profile) -> Result<Self, String> {
        Self::remove_stale();
        let mut link = Link {
            profile,
            line: None,
        };
        for side in [Side::Builder, Side::Client] {
            let (ns, outside, inside) = (namespace(side), outside(side), inside(side));
            let ns = ns.as_str();
            tool("ip", &["netns", "add", ns])?;
            tool(
                "ip",
                &[
                    "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", ns,
                ],
            )?;
            // No IPv6 link-local chatter from either end, and no address
            // here: this namespace must not route between the pairs.
            tool(
                "ip",
                &["link", "set", &outside, "addrgenmode", "none", "up"],
            )?;
            tool(
                "ip",
                &["-n", ns, "link", "set", &inside, "addrgenmode", "none"],
            )?;
            let addr = format!("{}/24", ip(side));
            tool("ip", &["-n", ns, "addr", "add", &addr, "dev", &inside])?;
            tool("ip", &["-n", ns, "link", "set", &inside, "up"])?;
            // The client's cache proxy listens on loopback.
            tool("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        link.isolated()?;
        link.line = Some(Line::start(profile)?);
        Ok(link)
    }

    /// Removes the namespaces and pairs of the run with `pid`.
    fn remove(pid: u32) {
        for side in [Side::Builder, Side::Client] {
            let _ = tool("ip", &["netns", "delete", &name(pid, side)]);
            // A namespace outlives its name while anything still uses it;
            // deleting our end of the pair takes the other end at once.
            let _ = tool("ip", &["link", "delete", &format!("{}-h", name(pid, side))]);
        }
    }

    /// Removes what runs that crashed left behind.
    fn remove_stale() {
        let Ok(entries) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name();
            let pid = file
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|n| n.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok());
            if let Some(pid) = pid.filter(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                Self::remove(pid);
            }
        }
    }

    pub(crate) fn line(&self) -> &Line {
        self.line.as_ref().expect("the line runs once set up")
    }

    /// Fails if the client's namespace reaches the builder's without the
    /// line, which does not run yet.
    fn isolated(&self) -> Result<(), String> {
        let echo = udp_in(Side::Builder, Duration::from_millis(300))?;
        let client = udp_in(Side::Client, Duration::from_millis(300))?;
        let to = echo.local_addr().map_err(|e| e.to_string())?;
        let _ = client.send_to(b"direct", to);
        match echo.recv_from(&mut [0u8; 16]) {
            Ok(_) => Err(format!(
                "the client's namespace reaches {to} without the delay line"
            )),
            Err(_) => Ok(()),
        }
    }

    /// Measures the link as an endpoint sees it: UDP and TCP round trips,
    /// and a raw TCP stream each way.
    pub(crate) fn probe(&self) -> Result<Probe, String> {
        let echo = udp_in(Side::Builder, Duration::from_secs(5))?;
        let client = udp_in(Side::Client, Duration::from_secs(5))?;
        let to = echo.local_addr().map_err(|e| e.to_string())?;
        let echoer = thread::spawn(move || -> io::Result<()> {
            let mut buffer = [0u8; 64];
            for _ in 0..5 {
                let (len, from) = echo.recv_from(&mut buffer)?;
                echo.send_to(&buffer[..len], from)?;
            }
            Ok(())
        });
        let mut udp_rtt = Duration::MAX;
        for _ in 0..5 {
            let start = Instant::now();
            client
                .send_to(b"ping", to)
                .and_then(|_| client.recv_from(&mut [0u8; 64]))
                .map_err(|e| format!("no UDP echo through the line: {e}"))?;
            udp_rtt = udp_rtt.min(start.elapsed());
        }
        echoer
            .join()
            .expect("echo thread")
            .map_err(|e| format!("echo: {e}"))?;
        let listener = in_namespace(Side::Builder, || TcpListener::bind((BUILDER_IP, 0)))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let mut tcp_connect = Duration::MAX;
        for _ in 0..3 {
            let (took, _) = in_namespace(Side::Client, move || {
                let start = Instant::now();
                let stream = TcpStream::connect(addr)?;
                Ok((start.elapsed(), stream))
            })?;
            tcp_connect = tcp_connect.min(took);
            // Out of the backlog, so the rate probes accept their own.
            listener.accept().map_err(|e| e.to_string())?;
        }
        let line = self.line();
        let carried =
            || line.up.bytes.load(Ordering::Relaxed) + line.down.bytes.load(Ordering::Relaxed);
        let (cpu_before, carried_before) = (line.cpu_secs(), carried());
        let tcp_up = tcp_rate(&listener, Side::Client, self.profile)?;
        let tcp_down = tcp_rate(&listener, Side::Builder, self.profile)?;
        let congestion = in_namespace(Side::Client, || {
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        })?;
        Ok(Probe {
            congestion: congestion.trim().to_owned(),
            udp_rtt,
            tcp_connect,
            tcp_up,
            tcp_down,
            line_cpu: line.cpu_secs() - cpu_before,
            line_bytes: carried() - carried_before,
        })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // The line's sockets hold the outside ends.
        self.line = None;
        Self::remove(std::process::id());
    }
}

/// A UDP socket on `side`'s address, giving up reading after `timeout`.
fn udp_in(side: Side, timeout: Duration) -> Result<UdpSocket, String> {
    in_namespace(side, move || {
        let socket = UdpSocket::bind((ip(side), 0))?;
        socket.set_read_timeout(Some(timeout))?;
        Ok(socket)
    })
}

/// How long [`tcp_rate`] sends, and how much of the start it leaves out
/// as slow start.
const RATE_PROBE: Duration = Duration::from_secs(3);
const RATE_SKIP: Duration = Duration::from_secs(1);

/// Bits per second of one TCP stream from `sender`'s namespace to the
/// other, on a connection `listener` (the builder's) accepts.
fn tcp_rate(listener: &TcpListener, sender: Side, profile: &Profile) -> Result<f64, String> {
    let rate = match sender {
        Side::Client => profile.up,
        Side::Builder => profile.down,
    };
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let connect =
        in_namespace(Side::Client, move || TcpStream::connect(addr)).map_err(|e| e.to_string())?;
    let (accepted, _) = listener.accept().map_err(|e| e.to_string())?;
    let (mut from, mut to) = match sender {
        Side::Client => (connect, accepted),
        Side::Builder => (accepted, connect),
    };
    // Four bandwidth-delay products, past the default `tcp_wmem` whose
    // 4 MiB hold about 450 Mbit/s at a 50 ms round trip: the probe measures
    // the link, not the endpoints, and what it sent drains soon.
    let bdp = rate * 2 * profile.delay.as_millis() as u64 / 8 / 1000;
    let buffer = libc::c_int::try_from(4 * bdp)
        .unwrap_or(libc::c_int::MAX)
        .max(1 << 20);
    set_option(
        from.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        buffer,
    )?;
    set_option(
        to.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        buffer,
    )?;
    let writer = thread::spawn(move || -> io::Result<()> {
        let chunk = vec![0x5au8; 1 << 16];
        let start = Instant::now();
        while start.elapsed() < RATE_PROBE {
            from.write_all(&chunk)?;
        }
        from.shutdown(std::net::Shutdown::Write)
    });
    let mut buffer = vec![0u8; 1 << 16];
    let start = Instant::now();
    let mut counted = 0u64;
    let mut since = None;
    loop {
        let n = to.read(&mut buffer).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        match since {
            Some(_) => counted += n as u64,
            None if start.elapsed() >= RATE_SKIP => since = Some(Instant::now()),
            None => {}
        }
    }
    writer
        .join()
        .expect("probe writer")
        .map_err(|e| format!("probe stream: {e}"))?;
    let since = since.ok_or("the probe stream ended during slow start")?;
    Ok(counted as f64 * 8.0 / since.elapsed().as_secs_f64())
}

/// Which way a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Way {
    /// Client to builder.
    Up,
    Down,
}

impl Way {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Way::Up => "up",
            Way::Down => "down",
        }
    }
}

/// One direction's counters.
#[derive(Default)]
pub(crate) struct Counters {
    /// Reads of the input; a TSO or GSO train counts once.
    pub(crate) frames: AtomicU64,
    /// Frames on the emulated wire, a train counting as what it stands for.
    pub(crate) packets: AtomicU64,
    /// Their bytes, Ethernet headers included (as `tc` counts).
    pub(crate) bytes: AtomicU64,
    /// Frames the full queue dropped: the emulated router's losses.
    pub(crate) dropped: AtomicU64,
    /// Frames the line could not read whole or not send.
    pub(crate) errors: AtomicU64,
    /// Frames sent over a millisecond past their time, and the longest
    /// wait past it in µs: the line falling behind adds delay of its own.
    pub(crate) late: AtomicU64,
    pub(crate) late_us: AtomicU64,
}

/// A service on the builder whose traffic the line counts apart: drv-thru's
/// UDP port, or sshd's TCP port.
pub(crate) struct Watched {
    pub(crate) name: String,
    protocol: u8,
    port: u16,
    /// Bytes up and down.
    pub(crate) bytes: [AtomicU64; 2],
}

impl Watched {
    pub(crate) fn total(&self) -> u64 {
        self.bytes.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// The bridge between the two outside ends; see the module comment.
pub(crate) struct Line {
    pub(crate) up: Arc<Counters>,
    pub(crate) down: Arc<Counters>,
    watched: Arc<RwLock<Vec<Arc<Watched>>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
    /// The line's threads, whose CPU time is its cost.
    tids: Arc<Mutex<Vec<libc::pid_t>>>,
}

/// `struct virtio_net_hdr`, which `PACKET_VNET_HDR` puts before each frame.
const VNET_HDR: usize = 10;
const VNET_GSO_NONE: u8 = 0;

/// The largest frame read: a 64 KiB train and its headers.
const FRAME_MAX: usize = VNET_HDR + (1 << 16) + 256;

/// Frames per `recvmmsg`/`sendmmsg`.
const BATCH: usize = 32;

/// How long the reading threads let frames gather after a short read, and
/// how early the sending threads send frames that are almost due, along
/// with one that is: waking a thread per frame costs tens of µs on a VM.
const GATHER: Duration = Duration::from_millis(1);
const SLACK: Duration = Duration::from_micros(500);

/// When the kernel received the frame of `header`, from `SO_TIMESTAMPNS`.
fn arrived(header: &libc::msghdr) -> Option<SystemTime> {
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(header) };
    while let Some(message) = unsafe { cmsg.as_ref() } {
        if message.cmsg_level == libc::SOL_SOCKET && message.cmsg_type == libc::SO_TIMESTAMPNS {
            let at = unsafe {
                libc::CMSG_DATA(cmsg)
                    .cast::<libc::timespec>()
                    .read_unaligned()
            };
            return Some(UNIX_EPOCH + Duration::new(at.tv_sec as u64, at.tv_nsec as u32));
        }
        cmsg = unsafe { libc::CMSG_NXTHDR(header, cmsg) };
    }
    None
}

impl Line {
    fn start(profile: &'static Profile) -> Result<Self, String> {
        let builder = Arc::new(packet_socket(&outside(Side::Builder))?);
        let client = Arc::new(packet_socket(&outside(Side::Client))?);
        let mut line = Line {
            up: Arc::default(),
            down: Arc::default(),
            watched: Arc::default(),
            stop: Arc::default(),
            threads: Vec::new(),
            tids: Arc::default(),
        };
        for (way, input, output, rate, counters) in [
            (Way::Up, &client, &builder, profile.up, line.up.clone()),
            (
                Way::Down,
                &builder,
                &client,
                profile.down,
                line.down.clone(),
            ),
        ] {
            let (queue, queued) = mpsc::channel();
            let shaper = Shaper {
                rate,
                delay: profile.delay,
                busy_until: Instant::now(),
            };
            let receive = Receive {
                way,
                input: input.clone(),
                shaper,
                counters: counters.clone(),
                watched: line.watched.clone(),
                stop: line.stop.clone(),
                queue,
            };
            line.threads.push(line_thread(
                format!("line-{}-recv", way.name()),
                line.tids.clone(),
                move || receive.run(),
            ));
            let output = output.clone();
            line.threads.push(line_thread(
                format!("line-{}-send", way.name()),
                line.tids.clone(),
                move || send_loop(&output, &queued, &counters),
            ));
        }
        Ok(line)
    }

    /// Counts `protocol` traffic to and from `port` on the builder apart,
    /// under `name`.
    pub(crate) fn watch(&self, name: &str, protocol: u8, port: u16) -> Arc<Watched> {
        let watched = Arc::new(Watched {
            name: name.to_owned(),
            protocol,
            port,
            bytes: Default::default(),
        });
        self.watched.write().unwrap().push(watched.clone());
        watched
    }

    /// CPU seconds the line's threads have used.
    pub(crate) fn cpu_secs(&self) -> f64 {
        let ticks: u64 = self
            .tids
            .lock()
            .unwrap()
            .iter()
            .filter_map(|tid| thread_ticks(*tid))
            .sum();
        ticks as f64 / crate::measure::clock_ticks()
    }

    pub(crate) fn summary(&self) -> String {
        let way = |way: Way, c: &Counters| {
            format!(
                "{} {} packets in {} reads ({:.1} MiB), {} dropped by the full queue, {} errors, \
                 {} sent over 1 ms late (at most {:.1} ms)",
                way.name(),
                c.packets.load(Ordering::Relaxed),
                c.frames.load(Ordering::Relaxed),
                c.bytes.load(Ordering::Relaxed) as f64 / MIB,
                c.dropped.load(Ordering::Relaxed),
                c.errors.load(Ordering::Relaxed),
                c.late.load(Ordering::Relaxed),
                c.late_us.load(Ordering::Relaxed) as f64 / 1000.0
            )
        };
        format!("{}; {}", way(Way::Up, &self.up), way(Way::Down, &self.down))
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// utime + stime of one of this process's threads, in clock ticks (its
/// cutime and cstime are the whole process's).
fn thread_ticks(tid: libc::pid_t) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    fields
        .get(11..13)?
        .iter()
        .map(|f| f.parse::<u64>().ok())
        .sum()
}

fn check(result: libc::c_int, what: &str) -> Result<(), String> {
    if result < 0 {
        Err(format!("{what}: {}", io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

fn set_option(
    fd: RawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> Result<(), String> {
    let set = unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(set, &format!("the line's socket option {option}"))
}

/// A packet socket on `dev` that sees every frame arriving there (not what
/// this namespace sends), with its virtio header.
fn packet_socket(dev: &str) -> Result<OwnedFd, String> {
    let all = (libc::ETH_P_ALL as u16).to_be();
    // Protocol 0 until bound, so no other interface's frames slip in first.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    check(fd, "a packet socket for the line")?;
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // Past `net.core.rmem_max` (hence FORCE, as root): the line itself must
    // not be where frames are lost.
    for (level, option, value) in [
        (libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1),
        (libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1),
        (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1),
        (libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20),
        (libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 16 << 20),
    ] {
        set_option(fd, level, option, value)?;
    }
    // Wakes the reading thread now and then to notice `stop`.
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    let set = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    check(set, "the line's receive timeout")?;
    let name = std::ffi::CString::new(dev).expect("an interface name");
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(format!("{dev}: {}", io::Error::last_os_error()));
    }
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = index as i32;
    let bound = unsafe {
        libc::bind(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    check(bound, &format!("binding the line to {dev}"))?;
    Ok(socket)
}

/// One direction's router queue and wire: when each frame is due at the
/// far end.
struct Shaper {
    rate: u64,
    delay: Duration,
    /// When the wire has sent all it holds.
    busy_until: Instant,
}

impl Shaper {
    /// When a frame of `bytes` on the wire that arrives at `now` reaches the
    /// far end, or `None` if the queue is full. A train is admitted whole if
    /// the queue has room when it starts.
    fn admit(&mut self, now: Instant, bytes: u64) -> Option<Instant> {
        let start = self.busy_until.max(now);
        if start - now >= QUEUE {
            return None;
        }
        self.busy_until = start + Duration::from_nanos(bytes * 8 * 1_000_000_000 / self.rate);
        Some(self.busy_until + self.delay)
    }
}

/// IPv4 protocol numbers.
pub(crate) const TCP: u8 = 6;
pub(crate) const UDP: u8 = 17;

/// What one frame is, as far as the line cares.
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    /// IPv4 protocol, addresses and ports, if it is TCP or UDP over IPv4.
    flow: Option<(u8, Ipv4Addr, u16, Ipv4Addr, u16)>,
    /// Frames on the wire, and their bytes.
    packets: u64,
    wire_bytes: u64,
}

/// Reads a frame after its virtio header.
fn parse(data: &[u8]) -> Frame {
    let (header, frame) = data.split_at(VNET_HDR.min(data.len()));
    let single = Frame {
        flow: None,
        packets: 1,
        wire_bytes: frame.len() as u64,
    };
    let Some(ip) = frame.get(14..).filter(|_| frame[12..14] == [0x08, 0x00]) else {
        return single;
    };
    let Some(&first) = ip.first() else {
        return single;
    };
    let ihl = usize::from(first & 0x0f) * 4;
    let (Some(protocol), Some(transport)) = (ip.get(9).copied(), ip.get(ihl..)) else {
        return single;
    };
    let transport_header = match (protocol, transport.get(12)) {
        (TCP, Some(offset)) => usize::from(offset >> 4) * 4,
        (UDP, _) => 8,
        _ => return single,
    };
    if transport.len() < 4 || ip.len() < 20 {
        return single;
    }
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    let port = |at: usize| u16::from_be_bytes([transport[at], transport[at + 1]]);
    let flow = Some((protocol, addr(12), port(0), addr(16), port(2)));
    let headers = 14 + ihl + transport_header;
    let gso_size = u16::from_le_bytes([header[4], header[5]]) as usize;
    let payload = frame.len().saturating_sub(headers);
    let packets = if header[1] != VNET_GSO_NONE && gso_size > 0 {
        payload.div_ceil(gso_size).max(1)
    } else {
        1
    };
    Frame {
        flow,
        packets: packets as u64,
        wire_bytes: (frame.len() + (packets - 1) * headers) as u64,
    }
}

/// A frame due at the far end.
type Due = (Instant, Vec<u8>);

/// One direction's reading half.
struct Receive {
    way: Way,
    input: Arc<OwnedFd>,
    shaper: Shaper,
    counters: Arc<Counters>,
    watched: Arc<RwLock<Vec<Arc<Watched>>>>,
    stop: Arc<AtomicBool>,
    queue: mpsc::Sender<Due>,
}

impl Receive {
    fn run(mut self) {
        let mut buffers = vec![vec![0u8; FRAME_MAX]; BATCH];
        let mut controls = vec![[0u64; 8]; BATCH];
        let mut iovs: Vec<libc::iovec> = buffers
            .iter_mut()
            .map(|buffer| libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: buffer.len(),
            })
            .collect();
        let mut messages: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(&mut controls)
            .map(|(iov, control)| {
                let mut message: libc::mmsghdr = unsafe { std::mem::zeroed() };
                message.msg_hdr.msg_iov = iov;
                message.msg_hdr.msg_iovlen = 1;
                message.msg_hdr.msg_control = control.as_mut_ptr().cast();
                message
            })
            .collect();
        while !self.stop.load(Ordering::Relaxed) {
            for message in &mut messages {
                message.msg_hdr.msg_controllen = size_of::<[u64; 8]>();
            }
            let n = unsafe {
                libc::recvmmsg(
                    self.input.as_raw_fd(),
                    messages.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                continue;
            }
            let (now, wall) = (Instant::now(), SystemTime::now());
            for (message, buffer) in messages.iter_mut().zip(&buffers).take(n as usize) {
                let len = message.msg_len as usize;
                if message.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len < VNET_HDR + 14 {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let age = arrived(&message.msg_hdr)
                    .and_then(|at| wall.duration_since(at).ok())
                    .unwrap_or_default();
                self.forward(now.checked_sub(age).unwrap_or(now), &buffer[..len]);
            }
            // Let frames gather rather than wake for each: their kernel
            // timestamps keep their arrival times, and the delay is longer.
            if (n as usize) < BATCH {
                thread::sleep(GATHER);
            }
        }
    }

    /// Queues a frame that arrived at `arrival`, or drops it.
    fn forward(&mut self, arrival: Instant, data: &[u8]) {
        let frame = parse(data);
        self.counters.frames.fetch_add(1, Ordering::Relaxed);
        let Some(due) = self.shaper.admit(arrival, frame.wire_bytes) else {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if let Some((protocol, src, src_port, dst, dst_port)) = frame.flow {
            let (ip, port) = match self.way {
                Way::Up => (dst, dst_port),
                Way::Down => (src, src_port),
            };
            if ip == BUILDER_IP {
                for watched in self.watched.read().unwrap().iter() {
                    if watched.protocol == protocol && watched.port == port {
                        watched.bytes[self.way as usize]
                            .fetch_add(frame.wire_bytes, Ordering::Relaxed);
                    }
                }
            }
        }
        self.counters
            .packets
            .fetch_add(frame.packets, Ordering::Relaxed);
        self.counters
            .bytes
            .fetch_add(frame.wire_bytes, Ordering::Relaxed);
        let _ = self.queue.send((due, data.to_vec()));
    }
}

/// Sends what `queued` holds to `output`, each at its time. With one delay
/// per direction, arrival order is already due order.
fn send_loop(output: &OwnedFd, queued: &mpsc::Receiver<Due>, counters: &Counters) {
    let mut pending: VecDeque<Due> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match queued.recv() {
                Ok(due) => pending.push_back(due),
                Err(_) => return,
            }
        }
        let due = pending.front().expect("a frame").0;
        thread::sleep(due.saturating_duration_since(Instant::now()));
        pending.extend(queued.try_iter());
        let now = Instant::now();
        let late = now.saturating_duration_since(due);
        if late > Duration::from_millis(1) {
            counters.late.fetch_add(1, Ordering::Relaxed);
        }
        counters
            .late_us
            .fetch_max(late.as_micros() as u64, Ordering::Relaxed);
        let ready = pending
            .iter()
            .take(BATCH)
            .take_while(|(due, _)| *due <= now + SLACK)
            .count()
            .max(1);
        let batch: Vec<Due> = pending.drain(..ready).collect();
        send_batch(output, &batch, counters);
    }
}

fn send_batch(output: &OwnedFd, batch: &[Due], counters: &Counters) {
    let mut iovs: Vec<libc::iovec> = batch
        .iter()
        .map(|(_, frame)| libc::iovec {
            iov_base: frame.as_ptr().cast_mut().cast(),
            iov_len: frame.len(),
        })
        .collect();
    let mut messages: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            let mut message: libc::mmsghdr = unsafe { std::mem::zeroed() };
            message.msg_hdr.msg_iov = iov;
            message.msg_hdr.msg_iovlen = 1;
            message
        })
        .collect();
    let mut at = 0;
    while at < messages.len() {
        let sent = unsafe {
            libc::sendmmsg(
                output.as_raw_fd(),
                messages[at..].as_mut_ptr(),
                (messages.len() - at) as libc::c_uint,
                0,
            )
        };
        if sent <= 0 {
            // The frame at `at` failed; the rest may not.
            counters.errors.fetch_add(1, Ordering::Relaxed);
            at += 1;
        } else {
            at += sent as usize;
        }
    }
}

/// A thread of the line, at a real-time priority: the builder and the
/// client keep both CPUs busy, and a line that waits for a turn adds delay.
fn line_thread(
    name: String,
    tids: Arc<Mutex<Vec<libc::pid_t>>>,
    work: impl FnOnce() + Send + 'static,
) -> thread::JoinHandle<()> {
    thread::Builder::new()
        .name(name)
        .spawn(move || {
            tids.lock().unwrap().push(unsafe { libc::gettid() });
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
