//! The generated `drvthru.v1` code, fenced off from hand-written code, plus
//! conversions between its messages and our domain types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod generated {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]

    tonic::include_proto!("drvthru.v1");
}

pub use generated::*;

/// The ALPN of drv-thru's gRPC protocol. Every QUIC bidirectional stream on a
/// connection with this ALPN carries one HTTP/2 (gRPC) connection. The
/// version is the proto package's (`drvthru.v1`).
pub const ALPN: &[u8] = b"drv-thru/grpc/1";

/// Response metadata naming why a call was refused, in a stable
/// machine-readable form for third-party clients.
pub const REFUSAL_METADATA: &str = "drvthru-refusal";

/// gRPC's response metadata listing the message encodings a server accepts
/// in requests; the builder sends it with `Builder/OpenSession`.
pub const ACCEPT_ENCODING_METADATA: &str = "grpc-accept-encoding";

/// What the builder lists in [`ACCEPT_ENCODING_METADATA`]: zstd-compressed
/// messages or plain ones.
pub const ACCEPTED_ENCODINGS: &str = "zstd,identity";

/// URLs `Cache/GetNars` takes in one call, as `cache.proto` says.
pub const MAX_NARS_PER_CALL: usize = 1024;

/// `Cache` streams (`ListNarInfos`, `GetNar`, `GetNars`) one session may
/// have open at once, as `proto/README.md` says; more are refused with
/// `too-many-cache-streams`. Enough to fill a long link (4 ranges of a large
/// NAR at once, and 8 calls of small NARs); each holds buffers on the
/// builder while its reader is slow.
pub const MAX_CACHE_STREAMS_PER_SESSION: usize = 16;

/// The encoded descriptors of every `drvthru.v1` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("drvthru_descriptor");

/// A protobuf timestamp for a Unix time in seconds.
pub fn timestamp(unix_secs: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(unix_secs).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

/// Unix seconds of a protobuf timestamp (negative times clamp to the epoch).
pub fn unix_secs(timestamp: &prost_types::Timestamp) -> u64 {
    u64::try_from(timestamp.seconds).unwrap_or(0)
}

/// A protobuf duration.
pub fn duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// A std duration from a protobuf one; negative durations are `None`.
pub fn std_duration(duration: &prost_types::Duration) -> Option<Duration> {
    let seconds = u64::try_from(duration.seconds).ok()?;
    let nanos = u32::try_from(duration.nanos).ok()?;
    Some(Duration::new(seconds, nanos))
}

/// The current Unix time in seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl From<crate::config::Limits> for SessionLimits {
    fn from(limits: crate::config::Limits) -> Self {
        Self {
            max_build_time: Some(duration(limits.max_build_time.get())),
            max_upload_bytes: limits.max_upload_bytes.get(),
        }
    }
}
