"""Unary gRPC calls to a drv-thru builder over Iroh, with the `iroh` and `h2` packages.

Each QUIC bidirectional stream carries one HTTP/2 connection (prior
knowledge, no TLS: QUIC already authenticates both ends). This module opens
one such stream per call, which keeps it short; a real client would reuse
the HTTP/2 connection for many calls.
"""

import struct
import urllib.parse

import h2.config
import h2.connection
import h2.events
import iroh

ALPN = b"drv-thru/grpc/1"


class _Offline(iroh.Preset):
    """No relays, no address lookup: the builder is dialed at a direct address."""

    def apply(self, builder):
        builder.apply_minimal()


async def endpoint(secret_key: bytes | None = None) -> iroh.Endpoint:
    """An endpoint on loopback; its key is the client's identity (its endpoint id)."""
    options = iroh.EndpointOptions(
        preset=_Offline(), bind_addr="127.0.0.1:0", secret_key=secret_key, alpns=[ALPN]
    )
    return await iroh.Endpoint.bind(options)


async def connect(ep: iroh.Endpoint, builder_id: str, address: str) -> iroh.Connection:
    addr = iroh.EndpointAddr(iroh.EndpointId.from_string(builder_id), None, [address])
    return await ep.connect(addr, ALPN)


class RpcError(Exception):
    def __init__(self, code: int, message: str, refusal: str | None):
        super().__init__(f"gRPC status {code}: {message} (refusal: {refusal})")
        self.code, self.message, self.refusal = code, message, refusal


async def call(conn: iroh.Connection, method: str, request, response_type, metadata=()):
    """Calls `method` (e.g. `/drvthru.v1.Builder/Status`); returns the reply or raises RpcError."""
    stream = await conn.open_bi()
    send, recv = stream.send(), stream.recv()
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2c.initiate_connection()
    sid = h2c.get_next_available_stream_id()
    h2c.send_headers(sid, [
        (":method", "POST"), (":scheme", "http"), (":path", method),
        # Any plain host name will do; the builder does not look at it.
        (":authority", "localhost"),
        ("content-type", "application/grpc"), ("te", "trailers"),
        *metadata,
    ])
    body = request.SerializeToString()
    # A gRPC message: no compression (0), then its length, big-endian.
    h2c.send_data(sid, struct.pack(">BI", 0, len(body)) + body, end_stream=True)
    await send.write_all(h2c.data_to_send())

    headers, data, ended = {}, b"", False
    while not ended:
        chunk = await recv.read(65536)
        if not chunk:
            raise ConnectionError("the builder closed the stream before the call ended")
        for event in h2c.receive_data(chunk):
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                headers.update((k.decode(), v.decode()) for k, v in event.headers)
            elif isinstance(event, h2.events.DataReceived):
                data += event.data
                h2c.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
            elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                raise ConnectionError(f"the builder ended the HTTP/2 stream: {event}")
        await send.write_all(h2c.data_to_send())
    await send.finish()

    code = int(headers.get("grpc-status", "2"))
    if code != 0:
        message = urllib.parse.unquote(headers.get("grpc-message", ""))
        raise RpcError(code, message, headers.get("drvthru-refusal"))
    (length,) = struct.unpack(">I", data[1:5])
    return response_type.FromString(data[5:5 + length])
