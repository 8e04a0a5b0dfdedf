//! `--wan`: an emulated link between the two stores.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::{MIB, setup::progress, stores::Side};

/// One side's network namespace, joined to this one by a veth pair:
/// `PREFIX.1/24` on this namespace's end, `PREFIX.2/24` on the side's.
#[derive(Clone, Copy)]
pub(crate) struct WanNet {
    pub(crate) namespace: &'static str,
    pub(crate) prefix: &'static str,
}

impl WanNet {
    /// This namespace's end of the pair.
    pub(crate) fn outside(self) -> String {
        format!("{}-h", self.namespace)
    }

    pub(crate) fn inside(self) -> String {
        format!("{}-n", self.namespace)
    }
}

pub(crate) fn wan_net(side: Side) -> WanNet {
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
pub(crate) const WAN_DELAY: Duration = Duration::from_millis(25);

/// The link's speed, on what enters each namespace so both directions are
/// capped, with about 20 ms of queue as a router might have.
pub(crate) const WAN_TBF: [&str; 7] = ["tbf", "rate", "1gbit", "burst", "256kb", "latency", "20ms"];

/// Per socket of the delay line, past `net.core.rmem_max` (hence the FORCE
/// options, as root): more than 50 ms at 1 Gbit/s, so the line itself is
/// never where packets are lost.
pub(crate) const LINE_BUFFER: libc::c_int = 8 << 20;

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

/// The namespaces and veth pairs of `--wan`; dropping it removes them, also
/// when setting them up failed halfway.
pub(crate) struct Wan;

impl Wan {
    pub(crate) fn setup() -> Result<Self, String> {
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

    pub(crate) fn remove() {
        for side in [Side::Builder, Side::Client] {
            let _ = tool("ip", &["netns", "delete", wan_net(side).namespace]);
            // A namespace outlives its name while anything still uses it;
            // deleting our end of the pair takes the other end at once.
            let _ = tool("ip", &["link", "delete", &wan_net(side).outside()]);
        }
    }

    /// Times one round trip through a delay line to an echo in the builder's
    /// namespace, after checking that the client's has no other way there.
    pub(crate) fn probe(&self) -> Result<Duration, String> {
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
pub(crate) fn bind_in(side: Side) -> Result<UdpSocket, String> {
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
pub(crate) struct DelayLine {
    /// Where the client dials.
    pub(crate) addr: SocketAddr,
    /// The line's end towards the builder.
    pub(crate) builder_side: SocketAddr,
    pub(crate) up: Arc<Flow>,
    pub(crate) down: Arc<Flow>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) threads: Vec<thread::JoinHandle<()>>,
}

/// One direction's counters.
#[derive(Default)]
pub(crate) struct Flow {
    pub(crate) packets: AtomicU64,
    /// Sends: a GSO train of packets counts once.
    pub(crate) trains: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) send_errors: AtomicU64,
    /// Packets from anyone but the builder, or from it before the client spoke.
    pub(crate) strays: AtomicU64,
    /// Packets sent over a millisecond past their time, and the longest
    /// wait past it in µs: the line falling behind adds delay of its own.
    pub(crate) late: AtomicU64,
    pub(crate) late_us: AtomicU64,
}

impl DelayLine {
    pub(crate) fn start(builder: SocketAddr) -> Result<Self, String> {
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

    pub(crate) fn summary(&self) -> String {
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
pub(crate) fn forward(
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
pub(crate) fn datagram_header(name: &mut libc::sockaddr_in, iov: &mut libc::iovec) -> libc::msghdr {
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_name = std::ptr::from_mut(name).cast();
    header.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    header.msg_iov = iov;
    header.msg_iovlen = 1;
    header
}

/// Receives a datagram, or with `UDP_GRO` a train of them: `len` bytes cut
/// into `segment`-byte packets (the last may be shorter).
pub(crate) fn receive(
    socket: &UdpSocket,
    buffer: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<u16>)> {
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
pub(crate) fn send(
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
pub(crate) fn line_thread(
    name: String,
    work: impl FnOnce() + Send + 'static,
) -> thread::JoinHandle<()> {
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
pub(crate) fn udp_drops(addr: SocketAddr) -> Option<u64> {
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
pub(crate) fn tbf_drops(dev: &str) -> Option<u64> {
    let stats = tool("tc", &["-s", "qdisc", "show", "dev", dev]).ok()?;
    stats
        .split("dropped ")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}
