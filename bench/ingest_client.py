"""One uploading worker of bench.ingest, in its own OS process (so K of them are not one GIL).

Kept free of torch: K spawned processes each importing torch would cost ~365 MB apiece
and nothing here needs it. The upload's bytes come from a file bench.ingest wrote once
(the TensorMeta, the first chunk, and every later chunk part exactly as
lbgm.common.wire.serialized_update_parts encodes them); only the two messages that name
the round (UpdateHeader, FullGradient) are built here, before the clock starts.

Commands arrive on stdin, one a line: `upload R` streams the upload of round R into
the real server's SubmitUpdate, `drain R` streams the very same bytes into the bare
Sink/Drain method, `quit` ends. Each answer is one JSON line on stdout with the
perf_counter (CLOCK_MONOTONIC, the same clock in every process) at the first message
and at the reply, so the parent can time all K streams as one.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from pathlib import Path

import grpc

from lbgm.common.grpc_options import CHANNEL_OPTIONS, worker_metadata
from lbgm.v1 import lbgm_pb2 as pb

from bench.sink import HOST, SINK_METHOD

UPLOAD_TIMEOUT_SECONDS = 600.0
SUBMIT_UPDATE_METHOD = f"/{pb.DESCRIPTOR.services_by_name['Aggregator'].full_name}/SubmitUpdate"


def round_parts(payload: dict, worker_id: int, token: bytes, round_number: int) -> list[bytes]:
    """The serialized upload of one round: header, FullGradient with the first chunk, the other chunks."""
    header = pb.UpdatePart(header=pb.UpdateHeader(worker_id=worker_id, token=token, round=round_number,
                                                  num_samples=1))
    full = pb.UpdatePart(full=pb.FullGradient(layer=0, lbg_version=round_number, codec=pb.DENSE,
                                              parts=[pb.TensorMeta.FromString(payload["meta"])],
                                              data=payload["first"]))
    return [header.SerializeToString(), full.SerializeToString(), *payload["chunks"]]


def main(port: int, sink_port: int, worker_id: int, token: bytes, payload_file: Path) -> None:
    payload = pickle.loads(payload_file.read_bytes())
    metadata = worker_metadata(worker_id, token)
    with grpc.insecure_channel(f"{HOST}:{port}", options=CHANNEL_OPTIONS) as channel, \
            grpc.insecure_channel(f"{HOST}:{sink_port}", options=CHANNEL_OPTIONS) as sink_channel:
        submit = channel.stream_unary(SUBMIT_UPDATE_METHOD, request_serializer=lambda part: part,
                                      response_deserializer=pb.UpdateAck.FromString)
        sink = sink_channel.stream_unary(SINK_METHOD, request_serializer=lambda part: part,
                                         response_deserializer=lambda reply: reply)
        grpc.channel_ready_future(channel).result(timeout=60)  # connection setup is not throughput
        sink(iter([b""]), timeout=60)
        print(json.dumps({"ready": worker_id}), flush=True)
        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            if command == "quit":
                return
            parts = round_parts(payload, worker_id, token, int(argument))
            started = time.perf_counter()
            if command == "upload":
                ack = submit(iter(parts), timeout=UPLOAD_TIMEOUT_SECONDS, metadata=metadata)
                if ack.full_units != 1:
                    raise RuntimeError(f"the server accepted {ack.full_units} full layers, expected 1")
            else:
                counted = int.from_bytes(sink(iter(parts), timeout=UPLOAD_TIMEOUT_SECONDS), "little")
                if counted != sum(map(len, parts)):
                    raise RuntimeError(f"the sink counted {counted} bytes, {sum(map(len, parts))} were sent")
            ended = time.perf_counter()
            print(json.dumps({"started": started, "ended": ended, "bytes": sum(map(len, parts)),
                              "messages": len(parts)}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), bytes.fromhex(sys.argv[4]), Path(sys.argv[5]))
