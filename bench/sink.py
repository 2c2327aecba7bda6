"""gRPC's own floor: a method that only counts the bytes of a stream (no protobuf at all).

Kept free of torch and of the project's wire code, so that client processes of a benchmark
can name it without importing torch.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

HOST = "127.0.0.1"
SINK_METHOD = "/lbgm.bench.Sink/Drain"


def drain(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    """The stream's bytes are received and dropped, nothing is deserialized."""
    return sum(len(message) for message in request_iterator).to_bytes(8, "little")


def sink_handler() -> grpc.GenericRpcHandler:
    service, method = SINK_METHOD.strip("/").split("/")
    return grpc.method_handlers_generic_handler(service, {method: grpc.stream_unary_rpc_method_handler(drain)})
