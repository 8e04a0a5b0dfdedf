//! Whether a bulk transfer is worth compressing: only when the link is
//! slower than the compressor.
//!
//! zstd at gRPC's level 3 turns a NAR into fewer bytes at about 100–300 MB/s
//! of input per core, by the data. Over a link slower than that, the transfer then
//! moves at the link's speed divided by the compression ratio (or at the
//! compressor's, whichever is lower); over a faster one, compressing only
//! spends CPU and makes the transfer wait for it. So a transfer is
//! compressed when what is known of the link says it is slower than this
//! machine's compressor:
//!
//! - never between two sockets of one machine (loopback, or the same
//!   address at both ends of the path), where the link is memory;
//! - never once this connection has carried, in that direction, as many
//!   bytes per second on the wire as the compressor makes: the link is at
//!   least that fast;
//! - for an upload, never while QUIC's congestion window lets the client
//!   send that fast (the window divided by the round-trip time);
//! - otherwise, compressed: a path that is not loopback and has not shown
//!   itself faster than the compressor is taken for a slower one, as every
//!   link outside one machine or a data centre is. The first transfer's
//!   rate corrects that for the next.
//!
//! The compressor's speed is measured once per process, on this machine,
//! over a megabyte of NAR-like text ([`compressor_speed`]). A download is
//! compressed by the builder, whose speed the client cannot see; its own
//! stands in for it.
//!
//! `--compress always|never` (or `DRV_THRU_COMPRESS`) overrides the rule.

use std::{
    net::IpAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use iroh::{
    TransportAddr,
    endpoint::{Connection, LocalTransportAddr},
};
use tracing::debug;

use crate::transport::quic::Link;

/// `--compress`: whether bulk transfers are compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressMode {
    /// When the link is slower than this machine's compressor; never on
    /// loopback.
    #[default]
    Auto,
    /// Always, both ways.
    Always,
    /// Never.
    Never,
}

/// Which way a transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to builder: inputs.
    Up,
    /// Builder to client: outputs.
    Down,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Self::Up => 0,
            Self::Down => 1,
        }
    }
}

/// What is known of the link, for one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkEstimate {
    /// The path joins two sockets of this machine.
    pub same_host: bool,
    /// The highest rate, in wire bytes per second, this connection carried
    /// in this direction over a transfer long enough to count: the link is
    /// at least this fast.
    pub carried: Option<u64>,
    /// For the direction this side sends in: the congestion window divided
    /// by the round-trip time, a rate QUIC lets it send at now.
    pub window: Option<u64>,
}

impl LinkEstimate {
    /// The speed the link has shown, at least, in bytes per second.
    pub fn shown(&self) -> Option<u64> {
        self.carried.max(self.window)
    }
}

/// Why a transfer is or is not compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `--compress always`.
    Forced,
    /// `--compress never`.
    Off,
    /// Both ends are on this machine.
    SameHost,
    /// The link has shown itself at least as fast as the compressor.
    FasterThanCompressor,
    /// The link has not shown itself as fast as the compressor.
    SlowerThanCompressor,
}

impl Decision {
    /// Whether the transfer is compressed.
    pub fn compress(self) -> bool {
        matches!(self, Self::Forced | Self::SlowerThanCompressor)
    }

    /// A few words for the log.
    pub fn why(self) -> &'static str {
        match self {
            Self::Forced => "--compress always",
            Self::Off => "--compress never",
            Self::SameHost => "both ends on this machine",
            Self::FasterThanCompressor => "the link is faster than the compressor",
            Self::SlowerThanCompressor => "the link is not known to be faster than the compressor",
        }
    }
}

/// The rule: compress when `mode` says so, or, in [`CompressMode::Auto`],
/// when `link` is not on this machine and has not shown itself as fast as a
/// compressor making `compressor()` bytes per second (asked only then).
pub fn decide(
    mode: CompressMode,
    link: &LinkEstimate,
    compressor: impl FnOnce() -> u64,
) -> Decision {
    match mode {
        CompressMode::Always => Decision::Forced,
        CompressMode::Never => Decision::Off,
        CompressMode::Auto if link.same_host => Decision::SameHost,
        CompressMode::Auto => match link.shown() {
            Some(speed) if speed >= compressor() => Decision::FasterThanCompressor,
            _ => Decision::SlowerThanCompressor,
        },
    }
}

/// Wire bytes a transfer must move for its rate to count: shorter ones
/// measure round trips more than the link.
const SAMPLE_MIN_BYTES: u64 = 1 << 20;

/// What one connection's transfers decide by: the mode, the QUIC path and
/// the rates carried so far. Clones share the rates.
#[derive(Debug, Clone)]
pub struct LinkPolicy {
    mode: CompressMode,
    link: Link,
    /// The highest rate carried so far, by [`Direction::index`].
    carried: Arc<[AtomicU64; 2]>,
}

impl LinkPolicy {
    /// A policy in `mode` for the connection `link`.
    pub(crate) fn new(mode: CompressMode, link: Link) -> Self {
        Self {
            mode,
            link,
            carried: Arc::default(),
        }
    }

    /// This policy in `mode` instead, sharing the rates carried so far.
    pub fn with_mode(&self, mode: CompressMode) -> Self {
        Self {
            mode,
            ..self.clone()
        }
    }

    /// Whether the next transfer in `direction` is compressed; the reason
    /// is logged.
    pub async fn compress(&self, direction: Direction) -> bool {
        if self.mode != CompressMode::Auto {
            return self.mode == CompressMode::Always;
        }
        let connection = self.link.connection().await;
        let (same_host, window) = path_facts(&connection);
        let carried = self.carried[direction.index()].load(Ordering::Relaxed);
        let estimate = LinkEstimate {
            same_host,
            carried: (carried > 0).then_some(carried),
            window: window.filter(|_| direction == Direction::Up),
        };
        let decision = decide(self.mode, &estimate, compressor_speed);
        debug!(
            ?direction,
            compress = decision.compress(),
            why = decision.why(),
            link_bytes_per_s = estimate.shown(),
            "transfer compression"
        );
        decision.compress()
    }

    /// Starts measuring a transfer in `direction`: when the returned guard
    /// is dropped, the wire bytes the connection moved that way meanwhile,
    /// over the time it took, count as a rate the link carried.
    pub async fn measure(&self, direction: Direction) -> Measure {
        let connection = self.link.connection().await;
        Measure {
            start: wire_bytes(&connection, direction),
            connection,
            direction,
            since: Instant::now(),
            carried: self.carried.clone(),
        }
    }

    /// The wire bytes this connection has sent and received so far (since
    /// it was last dialled again).
    pub async fn wire_totals(&self) -> (u64, u64) {
        let connection = self.link.connection().await;
        (
            wire_bytes(&connection, Direction::Up),
            wire_bytes(&connection, Direction::Down),
        )
    }
}

/// A transfer being measured; see [`LinkPolicy::measure`].
#[derive(Debug)]
pub struct Measure {
    connection: Connection,
    direction: Direction,
    start: u64,
    since: Instant,
    carried: Arc<[AtomicU64; 2]>,
}

impl Drop for Measure {
    fn drop(&mut self) {
        let moved = wire_bytes(&self.connection, self.direction).saturating_sub(self.start);
        if let Some(rate) = rate(moved, self.since.elapsed()) {
            self.carried[self.direction.index()].fetch_max(rate, Ordering::Relaxed);
        }
    }
}

/// Bytes per second of `moved` bytes over `took`, if enough were moved to
/// tell.
fn rate(moved: u64, took: Duration) -> Option<u64> {
    if moved < SAMPLE_MIN_BYTES || took.is_zero() {
        return None;
    }
    Some((moved as f64 / took.as_secs_f64()) as u64)
}

/// UDP payload bytes `connection` has moved in `direction`.
fn wire_bytes(connection: &Connection, direction: Direction) -> u64 {
    let stats = connection.stats();
    match direction {
        Direction::Up => stats.udp_tx.bytes,
        Direction::Down => stats.udp_rx.bytes,
    }
}

/// Of the path `connection` uses: whether both its ends are on this
/// machine, and its congestion window over its round-trip time.
fn path_facts(connection: &Connection) -> (bool, Option<u64>) {
    let paths = connection.paths();
    let Some(path) = paths.iter().find(|path| path.is_selected()) else {
        return (false, None);
    };
    let same_host = match path.remote_addr() {
        TransportAddr::Ip(remote) => {
            let local = match path.local_addr() {
                LocalTransportAddr::Ip(local) => *local,
                _ => None,
            };
            same_host(remote.ip(), local)
        }
        _ => false,
    };
    let stats = path.stats();
    let window = (!stats.rtt.is_zero())
        .then(|| (stats.cwnd as f64 / stats.rtt.as_secs_f64()) as u64)
        .filter(|rate| *rate > 0);
    (same_host, window)
}

/// Whether a path from `local` to `remote` stays on this machine: a
/// loopback address, or the same address at both ends (the kernel routes
/// a machine's own addresses over loopback).
fn same_host(remote: IpAddr, local: Option<IpAddr>) -> bool {
    let remote = remote.to_canonical();
    remote.is_loopback() || local.is_some_and(|local| local.to_canonical() == remote)
}

/// Bytes of input per second that zstd at gRPC's level compresses on one
/// core of this machine, measured once per process: the best of three
/// rounds over a megabyte of text like a NAR's (paths, words and numbers).
pub fn compressor_speed() -> u64 {
    static SPEED: OnceLock<u64> = OnceLock::new();
    *SPEED.get_or_init(|| {
        let sample = nar_like_text(1 << 20);
        let best = (0..3)
            .filter_map(|_| {
                let since = Instant::now();
                zstd::bulk::compress(&sample, zstd::DEFAULT_COMPRESSION_LEVEL).ok()?;
                Some(since.elapsed())
            })
            .min()
            .unwrap_or(Duration::MAX);
        let speed = rate(sample.len() as u64, best).unwrap_or(0);
        debug!(bytes_per_s = speed, "zstd measured on this machine");
        speed
    })
}

/// `len` bytes of text with the redundancy of a NAR of scripts, headers
/// and store paths: lines of a few recurring words, paths and numbers from
/// a fixed pseudo-random sequence.
fn nar_like_text(len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "/nix/store/",
        "-glibc-2.40",
        "include",
        "define",
        "return",
        "static",
        "const",
        "echo",
        "export",
        "PATH",
        "lib",
        "share",
        "if",
        "then",
        "fi",
        "for",
        "done",
        "int",
        "void",
        "char",
    ];
    let mut text = Vec::with_capacity(len + 64);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    while text.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        text.extend_from_slice(WORDS[(state % WORDS.len() as u64) as usize].as_bytes());
        text.push(if state & 7 == 0 { b'\n' } else { b' ' });
        if state & 15 == 1 {
            text.extend_from_slice(format!("{:x}", state >> 40).as_bytes());
        }
    }
    text.truncate(len);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;
    const COMPRESSOR: u64 = 400 * MB;

    fn link(same_host: bool, carried: Option<u64>, window: Option<u64>) -> LinkEstimate {
        LinkEstimate {
            same_host,
            carried,
            window,
        }
    }

    #[test]
    fn loopback_is_never_compressed_in_auto() {
        let estimate = link(true, None, None);
        assert_eq!(
            decide(CompressMode::Auto, &estimate, || COMPRESSOR),
            Decision::SameHost
        );
        // Even a slow-looking one: the bytes never leave the machine, and
        // the compressor is not even measured.
        let slow = link(true, Some(MB), Some(MB));
        let unmeasured = || panic!("the compressor was measured");
        assert!(!decide(CompressMode::Auto, &slow, unmeasured).compress());
    }

    #[test]
    fn an_unmeasured_remote_link_is_compressed() {
        assert_eq!(
            decide(CompressMode::Auto, &link(false, None, None), || COMPRESSOR),
            Decision::SlowerThanCompressor
        );
    }

    #[test]
    fn a_link_that_carried_more_than_the_compressor_makes_is_not_compressed() {
        let fast = link(false, Some(COMPRESSOR), None);
        assert_eq!(
            decide(CompressMode::Auto, &fast, || COMPRESSOR),
            Decision::FasterThanCompressor
        );
        let slow = link(false, Some(COMPRESSOR - 1), None);
        assert!(decide(CompressMode::Auto, &slow, || COMPRESSOR).compress());
    }

    #[test]
    fn a_wide_congestion_window_alone_shows_a_fast_link() {
        let wide = link(false, Some(10 * MB), Some(2 * COMPRESSOR));
        assert!(!decide(CompressMode::Auto, &wide, || COMPRESSOR).compress());
        let narrow = link(false, Some(10 * MB), Some(20 * MB));
        assert!(decide(CompressMode::Auto, &narrow, || COMPRESSOR).compress());
    }

    #[test]
    fn the_flag_overrides_the_rule_both_ways() {
        for estimate in [link(true, None, None), link(false, Some(MB), None)] {
            assert_eq!(
                decide(CompressMode::Always, &estimate, || COMPRESSOR),
                Decision::Forced
            );
            assert_eq!(
                decide(CompressMode::Never, &estimate, || COMPRESSOR),
                Decision::Off
            );
        }
        assert!(Decision::Forced.compress());
        assert!(!Decision::Off.compress());
    }

    #[test]
    fn short_transfers_measure_no_rate() {
        assert_eq!(rate(SAMPLE_MIN_BYTES - 1, Duration::from_millis(1)), None);
        assert_eq!(rate(SAMPLE_MIN_BYTES, Duration::ZERO), None);
        assert_eq!(
            rate(4 * SAMPLE_MIN_BYTES, Duration::from_millis(500)),
            Some(8 * SAMPLE_MIN_BYTES)
        );
    }

    #[test]
    fn same_host_paths_are_loopback_or_one_address_at_both_ends() {
        let lan: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert!(same_host("127.0.0.1".parse().unwrap(), None));
        assert!(same_host("::1".parse().unwrap(), Some(other)));
        assert!(same_host("::ffff:127.0.0.1".parse().unwrap(), None));
        assert!(same_host(lan, Some(lan)));
        assert!(!same_host(lan, Some(other)));
        assert!(!same_host(lan, None));
    }

    #[test]
    fn the_sample_text_compresses_like_text() {
        let text = nar_like_text(1 << 20);
        assert_eq!(text.len(), 1 << 20);
        let compressed = zstd::bulk::compress(&text, zstd::DEFAULT_COMPRESSION_LEVEL).unwrap();
        let ratio = compressed.len() as f64 / text.len() as f64;
        assert!((0.15..0.6).contains(&ratio), "ratio {ratio}");
        assert!(compressor_speed() > 0);
    }
}
