//! What the server does with the `:authority` stock clients send
//! (`proto/README.md`, "The `:authority`"): the HTTP/2 library resets a
//! request whose authority is not a URI authority, on both transports. The
//! `h2` crate cannot send such a request, so it is framed by hand here.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::common::{Builder, bare_connection, key_file};

/// HTTP/2 frame types and flags used below (RFC 9113, section 6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
/// RST_STREAM's code for a malformed request.
const PROTOCOL_ERROR: u32 = 0x1;

/// What the server did with a request.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// It answered with response headers: the request got through.
    Headers,
    /// It reset the stream with this error code.
    Reset(u32),
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// One HPACK "literal header field without indexing, new name", no Huffman
/// coding (RFC 7541, section 6.2.2): bytes go on the wire as given.
fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0];
    for text in [name, value] {
        assert!(text.len() < 127, "one-byte lengths only");
        out.push(text.len() as u8);
        out.extend(text.as_bytes());
    }
    out
}

/// Sends a health check with `authority` (none if `None`) on a fresh
/// HTTP/2 connection over `io`, and reads what the server does with it.
async fn health_check_with(
    mut io: impl AsyncRead + AsyncWrite + Unpin,
    authority: Option<&str>,
) -> Answer {
    let mut block = [
        literal(":method", "POST"),
        literal(":scheme", "http"),
        literal(":path", "/grpc.health.v1.Health/Check"),
    ]
    .concat();
    if let Some(authority) = authority {
        block.extend(literal(":authority", authority));
    }
    block.extend(literal("content-type", "application/grpc"));
    block.extend(literal("te", "trailers"));
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS, 1, &block));
    // An empty HealthCheckRequest in gRPC's framing.
    out.extend(frame(DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]));
    io.write_all(&out).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut head = [0u8; 9];
            io.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
            let mut payload = vec![0; len];
            io.read_exact(&mut payload).await.unwrap();
            match (kind, stream) {
                (SETTINGS, 0) if flags & ACK == 0 => {
                    io.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
                }
                (HEADERS, 1) => return Answer::Headers,
                (RST_STREAM, 1) => {
                    return Answer::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                }
                (GOAWAY, _) => panic!("the server ended the connection"),
                _ => {}
            }
        }
    })
    .await
    .expect("the server answers within 10 s")
}

/// The authorities stock clients send, and what becomes of them.
const CASES: [(Option<&str>, Answer); 5] = [
    (Some("localhost"), Answer::Headers),
    (None, Answer::Headers),
    (Some("drv-thru.invalid:443"), Answer::Headers),
    // grpcio on a unix socket: the percent-encoded path.
    (
        Some("%2Fvar%2Flib%2Fdrv-thru%2Fadmin.sock"),
        Answer::Reset(PROTOCOL_ERROR),
    ),
    (Some(""), Answer::Reset(PROTOCOL_ERROR)),
];

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_authority_is_reset_on_both_transports() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let (endpoint, connection) =
        bare_connection(&builder.direct_target(), &key_file(dir.path(), "h2")).await;
    for (authority, expected) in CASES {
        let socket = tokio::net::UnixStream::connect(&builder.ready.admin_socket)
            .await
            .unwrap();
        assert_eq!(
            health_check_with(socket, authority).await,
            expected,
            "admin socket, :authority {authority:?}"
        );
        let (send, recv) = connection.open_bi().await.unwrap();
        assert_eq!(
            health_check_with(tokio::io::join(recv, send), authority).await,
            expected,
            "Iroh, :authority {authority:?}"
        );
    }
    endpoint.close().await;
}
