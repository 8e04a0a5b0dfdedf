"""Decodes a drv-thru ticket string (`drvthru...`), as proto/README.md describes it."""

import base64
import hashlib
import ipaddress
import struct
from dataclasses import dataclass


@dataclass
class Ticket:
    builder_id: str  # the builder's endpoint id, 64 hex characters
    relay_url: str | None
    addresses: list[str]  # direct `IP:PORT` addresses of the builder
    signing_key: str  # `NAME:BASE64`, the key its outputs are signed with
    id: str  # 16 hex characters
    secret: bytes

    def authorization(self) -> str:
        """The metadata value a ticket holder sends on every call."""
        return f"Bearer {self.id}.{self.secret.hex()}"


def decode(text: str) -> Ticket:
    body = text.strip().removeprefix("drvthru").upper()
    record = base64.b32decode(body + "=" * (-len(body) % 8))
    record, checksum = record[:-4], record[-4:]
    if hashlib.sha256(record).digest()[:4] != checksum:
        raise ValueError("ticket is damaged (checksum mismatch)")
    reader = _Reader(record)
    if reader.take(1)[0] != 1:
        raise ValueError("unsupported ticket format version")
    builder_id = reader.take(32).hex()
    ticket_id = reader.take(8).hex()
    secret = reader.take(32)
    key_name = reader.take(reader.take(1)[0]).decode()
    key = base64.b64encode(reader.take(32)).decode()
    # Integers are big-endian.
    relay_url = reader.take(struct.unpack(">H", reader.take(2))[0]).decode() or None
    addresses = []
    for _ in range(reader.take(1)[0]):
        family = reader.take(1)[0]
        ip = ipaddress.ip_address(reader.take(4 if family == 4 else 16))
        (port,) = struct.unpack(">H", reader.take(2))
        addresses.append(f"{ip}:{port}" if family == 4 else f"[{ip}]:{port}")
    if reader.rest:
        raise ValueError("ticket has trailing bytes")
    return Ticket(builder_id, relay_url, addresses, f"{key_name}:{key}", ticket_id, secret)


class _Reader:
    def __init__(self, data: bytes):
        self.rest = data

    def take(self, n: int) -> bytes:
        if len(self.rest) < n:
            raise ValueError("ticket is truncated")
        head, self.rest = self.rest[:n], self.rest[n:]
        return head
