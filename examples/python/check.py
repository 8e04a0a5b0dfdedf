"""Runs the examples against a running builder and checks every documented outcome.

    python3 check.py READY_JSON TRUSTED_KEY_HEX DRV_FILE

READY_JSON is the line `drv-thru serve --ready-json` printed; TRUSTED_KEY_HEX
the 32-byte secret key of a client the builder was started to trust
(`--trusted-client`); DRV_FILE a small `.drv` file a ticket holder opens
sessions for (`tests/data/nix/...-t.drv`). Exits non-zero on any difference.
"""

import asyncio
import hashlib
import json
import os
import struct
import sys

import grpc

import admin
import iroh_grpc
import ticket as tickets
from drvthru.v1 import builder_pb2, builder_pb2_grpc, tickets_pb2

# What each case must get: status code and `drvthru-refusal` reason
# (proto/README.md, "Refusals"); None where the builder sends no reason,
# ("OK", None) where the call must succeed.
EXPECTED = {
    "stranger asks for Status": ("UNAUTHENTICATED", "client-not-trusted"),
    "stranger calls Tickets over Iroh": ("UNAUTHENTICATED", "client-not-trusted"),
    "trusted client calls Tickets over Iroh": ("PERMISSION_DENIED", "not-allowed"),
    "ticket holder asks for Status": ("PERMISSION_DENIED", "not-allowed"),
    "second session on a one-use ticket": ("RESOURCE_EXHAUSTED", "ticket-used-up"),
    "revoked ticket": ("PERMISSION_DENIED", "ticket-revoked"),
    "expired ticket": ("PERMISSION_DENIED", "ticket-expired"),
    "ticket bound to another client": ("PERMISSION_DENIED", "ticket-bound-to-other-client"),
    "wrong secret": ("UNAUTHENTICATED", "ticket-unknown"),
    "a space before the `.`": ("UNAUTHENTICATED", "ticket-unknown"),
    "`bearer` in lowercase, the secret in uppercase": ("OK", None),
    "admin socket: revoke an unknown ticket": ("NOT_FOUND", None),
    "admin socket: grpcio's default `:authority` (the socket path)": ("INTERNAL", None),
    "admin socket: open a build session": ("PERMISSION_DENIED", "not-allowed"),
}

failures, checked = [], set()


def check(case: str, code: str, reason: str | None) -> None:
    checked.add(case)
    want = EXPECTED[case]
    verdict = "ok" if (code, reason) == want else f"FAILED, expected {want}"
    print(f"{case}: {code} {reason} {verdict}")
    if verdict != "ok":
        failures.append(case)


def nar_of_file(contents: bytes) -> bytes:
    """The NAR (`nix-store --dump`) of a regular, non-executable file."""
    def string(s: bytes) -> bytes:
        return struct.pack("<Q", len(s)) + s + b"\0" * (-len(s) % 8)
    return b"".join(map(string, [b"nix-archive-1", b"(", b"type", b"regular",
                                 b"contents", contents, b")"]))


def open_session_request(drv_file: str) -> builder_pb2.OpenSessionRequest:
    contents = open(drv_file, "rb").read()
    nar = nar_of_file(contents)
    path = "/nix/store/" + os.path.basename(drv_file)
    return builder_pb2.OpenSessionRequest(drv_path=path, inputs=[builder_pb2.InputPath(
        store_path=path,
        content_address="text:sha256:" + hashlib.sha256(contents).hexdigest(),
        nar_hash="sha256:" + hashlib.sha256(nar).hexdigest(),
        nar_size=len(nar),
    )])


CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


async def outcome(case, conn, method, request, response_type, metadata=()):
    try:
        await iroh_grpc.call(conn, method, request, response_type, metadata)
        check(case, "OK", None)
    except iroh_grpc.RpcError as err:
        check(case, CODE_NAMES[err.code], err.refusal)


def admin_outcome(case, call, *args):
    try:
        call(*args)
        check(case, "OK", None)
    except grpc.RpcError as err:
        reason = dict(err.trailing_metadata() or ()).get("drvthru-refusal")
        check(case, err.code().name, reason)


STATUS = ("/drvthru.v1.Builder/Status", builder_pb2.StatusRequest(), builder_pb2.StatusResponse)
LIST_TICKETS = ("/drvthru.v1.Tickets/ListTickets", tickets_pb2.ListTicketsRequest(),
                tickets_pb2.ListTicketsResponse)


async def main(ready_json: str, trusted_key: str, drv_file: str) -> None:
    ready = json.loads(ready_json)
    builder_id, address = ready["endpoint_id"], ready["direct_addresses"][0]
    chan = admin.channel(ready["admin_socket"])
    session = open_session_request(drv_file)
    trusted_ep = await iroh_grpc.endpoint(bytes.fromhex(trusted_key))
    stranger_ep = await iroh_grpc.endpoint()

    # The admin socket: watch a trusted client connect.
    watch = admin.watch(chan)
    first = next(watch).status
    assert first.endpoint_id == builder_id, first.endpoint_id
    trusted = await iroh_grpc.connect(trusted_ep, builder_id, address)
    changed = next(watch).status
    assert changed.open_connections == first.open_connections + 1, changed
    watch.cancel()
    print("admin socket: watched a connection open")

    # The admin socket: create, list and revoke tickets.
    one_use = admin.create(chan, "one use")
    to_revoke = admin.create(chan, "to revoke")
    expiring = admin.create(chan, "expiring", expires_in_seconds=1)
    lenient = admin.create(chan, "lenient")
    bound = admin.create(chan, "bound", bind_client=str(trusted_ep.id()))
    listed = [info.id for info in admin.list_tickets(chan)]
    newest_first = [t.ticket.id for t in (bound, lenient, expiring, to_revoke, one_use)]
    assert listed == newest_first, (listed, newest_first)
    revoked = admin.revoke(chan, to_revoke.ticket.id)
    assert revoked.state == tickets_pb2.TICKET_STATE_REVOKED, revoked
    print("admin socket: created, listed and revoked tickets")
    admin_outcome("admin socket: revoke an unknown ticket", admin.revoke, chan, "0" * 16)
    admin_outcome("admin socket: open a build session",
                  builder_pb2_grpc.BuilderStub(chan).OpenSession, session)
    # Why admin.channel sets `grpc.default_authority` (proto/README.md).
    admin_outcome("admin socket: grpcio's default `:authority` (the socket path)",
                  admin.list_tickets, grpc.insecure_channel(f"unix:{ready['admin_socket']}"))

    # Over Iroh: the trusted client and a stranger.
    reply = await iroh_grpc.call(trusted, *STATUS)
    assert reply.status.endpoint_id == builder_id, reply
    print("trusted client: Status over Iroh")
    await outcome("trusted client calls Tickets over Iroh", trusted, *LIST_TICKETS)
    stranger = await iroh_grpc.connect(stranger_ep, builder_id, address)
    await outcome("stranger asks for Status", stranger, *STATUS)
    await outcome("stranger calls Tickets over Iroh", stranger, *LIST_TICKETS)

    # Over Iroh: the stranger holding tickets.
    def bearer(created) -> list[tuple[str, str]]:
        held = tickets.decode(created.ticket_string)
        assert (held.builder_id, held.id) == (builder_id, created.ticket.id), held
        assert address in held.addresses, held
        return [("authorization", held.authorization())]

    def presenting(value: str) -> list[tuple[str, str]]:
        return [("authorization", value)]

    open_session = ("/drvthru.v1.Builder/OpenSession", session, builder_pb2.OpenSessionResponse)
    holder = bearer(one_use)
    await outcome("ticket holder asks for Status", stranger, *STATUS, holder)
    admitted = await iroh_grpc.call(stranger, *open_session, holder)
    print(f"ticket holder: admitted as session {admitted.session_id}")
    await outcome("second session on a one-use ticket", stranger, *open_session, holder)
    await outcome("revoked ticket", stranger, *open_session, bearer(to_revoke))
    await outcome("ticket bound to another client", stranger, *open_session, bearer(bound))
    # How the server reads `authorization` (proto/README.md).
    ticket_id = lenient.ticket.id
    secret = tickets.decode(lenient.ticket_string).secret.hex()
    await outcome("wrong secret", stranger, *open_session,
                  presenting(f"Bearer {ticket_id}.{'0' * 64}"))
    await outcome("a space before the `.`", stranger, *open_session,
                  presenting(f"Bearer {ticket_id} .{secret}"))
    await outcome("`bearer` in lowercase, the secret in uppercase", stranger, *open_session,
                  presenting(f"bearer {ticket_id}.{secret.upper()}"))
    # Expiry is kept in whole seconds: 1.5 s after its creation the ticket
    # is past it.
    await asyncio.sleep(1.5)
    await outcome("expired ticket", stranger, *open_session, bearer(expiring))

    for ep in (trusted_ep, stranger_ep):
        await ep.close()
    if failures:
        sys.exit(f"{len(failures)} outcome(s) differ from the documented ones: {failures}")
    if unchecked := EXPECTED.keys() - checked:
        sys.exit(f"cases never run: {sorted(unchecked)}")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
