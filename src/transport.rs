//! Carrying tonic's HTTP/2 over our two transports.
//!
//! - [`endpoint`]: the Iroh endpoints both sides bind, from our
//!   configuration (relay mode, listen address, QUIC limits).
//! - [`quic`]: every QUIC bidirectional stream of a connection with our ALPN
//!   is one HTTP/2 connection. Requests carry the peer's handshake-proven
//!   endpoint id as an [`IrohPeer`] extension.
//! - [`unix`]: the builder's local admin socket and the client machine's
//!   import helper. Requests carry the caller's kernel-reported credentials
//!   as a [`UnixPeer`] extension.
//! - [`accept`]: pausing an accept loop while the process is out of file
//!   descriptors, rather than spinning.

pub mod accept;
pub mod authorize;
pub mod endpoint;
pub mod quic;
pub mod unix;

pub use self::{quic::IrohPeer, unix::UnixPeer};

/// HTTP/2 tuning shared by both ends: 1 MiB frames and 8/16 MiB stream and
/// connection windows measured best for bulk transfers over Iroh. 2/4 MiB
/// windows cut the builder's peak RSS on an upload by 9 MiB but uploads
/// over a 50 ms link by an eighth (docs/performance.md, "Two malloc arenas").
pub mod http2 {
    /// Largest HTTP/2 frame we send or accept.
    pub const MAX_FRAME_SIZE: u32 = 1 << 20;
    /// Per-stream flow-control window.
    pub const STREAM_WINDOW: u32 = 8 << 20;
    /// Per-connection flow-control window.
    pub const CONNECTION_WINDOW: u32 = 16 << 20;
    /// Largest gRPC message we decode: chunked data stays far below it, and
    /// anything bigger is a misbehaving peer.
    pub const MAX_MESSAGE_SIZE: usize = 4 << 20;
    /// NAR bytes per gRPC message, both ways, and per read when the builder
    /// fills or compresses its cache: large enough to amortise per-message
    /// costs, small enough to keep memory flat.
    pub const CHUNK: usize = 256 << 10;
}

/// Turns a tonic client endpoint into one tuned for our transports.
pub(crate) fn tuned_client_endpoint() -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from_static("http://drv-thru.invalid")
        .initial_stream_window_size(http2::STREAM_WINDOW)
        .initial_connection_window_size(http2::CONNECTION_WINDOW)
        .max_frame_size(http2::MAX_FRAME_SIZE)
        .http2_max_header_list_size(64 << 10)
        .connect_timeout(std::time::Duration::from_secs(30))
}
