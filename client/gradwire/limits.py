"""Wire limits shared by the server and the client, so both ends agree from one constant."""

from __future__ import annotations

from typing import Final

#: The largest message either end sends or accepts: 64 MiB. A float32 tensor of
#: 16 Mi elements fits in one GetTensor; larger reads are refused with
#: RESOURCE_EXHAUSTED and a message saying how to read them in slices.
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024

#: Domain of the google.rpc.ErrorInfo attached to every error the server sends.
ERROR_DOMAIN: Final = "gradwire.dev"


def channel_options() -> list[tuple[str, int]]:
    """gRPC channel and server options for the message-size limit."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
