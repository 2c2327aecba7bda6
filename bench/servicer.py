"""A SubmitUpdate-only aggregator for benchmarks, served in its own process.

It reads every upload from its messages' raw bytes with the server's own
read_update_header and read_update_body, under the server's gRPC options, so
a benchmark pays the real transport and parsing cost; it skips authentication,
judging and aggregation, which are not transport (bench.ingest runs the whole
server). A second method, Sink/Drain (bench.sink), only counts the bytes of a
stream: the floor gRPC itself sets, with no protobuf at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from multiprocessing.connection import Connection

import grpc

from lbgm.common.grpc_options import SERVER_OPTIONS
from lbgm.common.wire import MalformedStream, UploadLimits, read_update_body, read_update_header
from lbgm.v1 import lbgm_pb2 as pb

from bench.common import wait_for_stop
from bench.sink import HOST, SINK_METHOD, sink_handler

__all__ = ["HOST", "SINK_METHOD", "BenchAggregator", "serve"]  # HOST and SINK_METHOD: bench.sink

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name
BENCH_UPLOAD_LIMITS = UploadLimits(layers=1, buffers=0)  # the benchmark's model: one layer, no buffers


class BenchAggregator:
    """SubmitUpdate read as the real service reads it, from each message's raw bytes."""

    def __init__(self, max_tensor_bytes: int) -> None:
        self.max_tensor_bytes = max_tensor_bytes  # the real service allows the largest layer at 8 bytes per value

    def SubmitUpdate(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.UpdateAck:
        stream = iter(request_iterator)
        try:
            # A benchmark upload holds one layer, so the bound on a whole upload is that on one tensor.
            update = read_update_body(read_update_header(stream), stream, self.max_tensor_bytes,
                                      self.max_tensor_bytes, BENCH_UPLOAD_LIMITS)
        except MalformedStream as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.UpdateAck(round=update.header.round, full_units=len(update.full),
                            scalar_units=len(update.scalars))


def serve(connection: Connection, max_tensor_bytes: int) -> None:
    """Child-process entry point (see bench.common.child_server): serve on a free loopback port until STOP."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=SERVER_OPTIONS)
    # SubmitUpdate alone, its messages undeserialized (the real server's CallGuard hands them over alike).
    submit = grpc.stream_unary_rpc_method_handler(BenchAggregator(max_tensor_bytes).SubmitUpdate,
                                                  response_serializer=pb.UpdateAck.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"SubmitUpdate": submit}),
                                     sink_handler()))
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    connection.send(port)
    wait_for_stop(connection)
    server.stop(grace=1).wait()
