"""Wire limits shared by the server and the client, so both ends agree from one constant."""

from __future__ import annotations

from typing import Final

#: The largest message either end sends or accepts: 64 MiB. Larger tensors travel in
#: chunks (GetTensorStream, SetTensorStream, ForwardStream); the Python client picks
#: the streamed call by itself.
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024

#: Tensor values one unary message may carry; the rest of the message gets the remainder.
MAX_VALUE_BYTES: Final = MAX_MESSAGE_BYTES - 64 * 1024

#: gRPC's default limit on a received message, in every language's gRPC library.
GRPC_DEFAULT_RECEIVE_BYTES: Final = 4 * 1024 * 1024

#: Values per message when a tensor is streamed (GetTensorStream, SetTensorStream,
#: ForwardStream): 4 MiB less 4 KiB for the rest of the message (its name, shapes and
#: padding take under 2 KiB), so that a default stream's messages stay under gRPC's default
#: receive limit and a client in another language reads them without raising it. A multiple
#: of 8: whole values of every dtype.
CHUNK_BYTES: Final = GRPC_DEFAULT_RECEIVE_BYTES - 4 * 1024

#: The Python client streams tensors it sends when their values exceed this.
STREAM_ABOVE_BYTES: Final = 32 * 1024 * 1024

#: Domain of the google.rpc.ErrorInfo attached to every error the server sends.
ERROR_DOMAIN: Final = "gradwire.dev"


def channel_options() -> list[tuple[str, int]]:
    """gRPC channel and server options for the message-size limit."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
