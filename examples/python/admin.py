"""The builder's admin socket (`DATA_DIR/admin.sock`) with stock grpcio.

    python3 admin.py SOCKET create NAME | list | revoke ID | watch
"""

import sys

import grpc
from google.protobuf import duration_pb2

from drvthru.v1 import builder_pb2, builder_pb2_grpc, tickets_pb2, tickets_pb2_grpc


def channel(socket_path: str) -> grpc.Channel:
    # grpcio would send the percent-encoded socket path as `:authority`,
    # which is not a valid authority; name a plain host instead.
    return grpc.insecure_channel(
        f"unix:{socket_path}", options=[("grpc.default_authority", "localhost")]
    )


def create(chan, name: str, uses: int = 1, expires_in_seconds: int = 0, bind_client: str = ""):
    request = tickets_pb2.CreateTicketRequest(name=name, uses=uses, bind_client=bind_client)
    if expires_in_seconds:
        request.expires_in.CopyFrom(duration_pb2.Duration(seconds=expires_in_seconds))
    return tickets_pb2_grpc.TicketsStub(chan).CreateTicket(request)


def list_tickets(chan, include_inactive: bool = True):
    request = tickets_pb2.ListTicketsRequest(include_inactive=include_inactive)
    return tickets_pb2_grpc.TicketsStub(chan).ListTickets(request).tickets


def revoke(chan, ticket_id: str):
    request = tickets_pb2.RevokeTicketRequest(id=ticket_id)
    return tickets_pb2_grpc.TicketsStub(chan).RevokeTicket(request).ticket


def watch(chan):
    """A status snapshot now and again on every change, as `drv-thru status --watch`
    shows; the stream runs until cancelled (`.cancel()`)."""
    return builder_pb2_grpc.BuilderStub(chan).WatchStatus(builder_pb2.WatchStatusRequest())


def main(socket_path: str, command: str, *args: str) -> None:
    chan = channel(socket_path)
    if command == "create":
        print(create(chan, *args).ticket_string)
    elif command == "list":
        for info in list_tickets(chan):
            state = tickets_pb2.TicketState.Name(info.state)
            print(info.id, info.name, state, f"{info.uses_taken}/{info.uses_granted or 'unlimited'}")
    elif command == "revoke":
        print(revoke(chan, *args).id, "revoked")
    elif command == "watch":
        for status in (response.status for response in watch(chan)):
            print(f"{status.open_connections} connections, {len(status.active)} active, "
                  f"{len(status.queued)} queued", flush=True)
    else:
        sys.exit(f"unknown command {command!r}; see the module's docstring")


if __name__ == "__main__":
    main(*sys.argv[1:])
