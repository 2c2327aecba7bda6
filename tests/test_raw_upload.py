"""The server reads uploads from each message's raw bytes (issue 18, item 2): the same update, the
same byte accounting and the same refusals as reading parsed UpdatePart messages."""

from __future__ import annotations

import grpc
import pytest
import torch

from lbgm.common.codec import CHUNK_BYTES, FRESH_MAPPING_BYTES
from lbgm.common.grpc_options import CHANNEL_OPTIONS, ERROR_DETAIL_KEY, worker_metadata
from lbgm.common.wire import (
    GRPC_FRAME_BYTES, FullLayer, MalformedStream, ScalarEntry, chunk_payload, encode_chunk_part, read_update_body,
    read_update_header, serialized_update_parts, submit_update_call, update_parts, wire_size,
)
from lbgm.experiment.config import ExperimentConfig
from lbgm.server.app import start_server
from lbgm.server.rounds import Coordinator
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc

from conftest import FAST, join_request

HEADER = pb.UpdateHeader(worker_id=3, token=b"token", round=7, num_samples=600, train_loss=0.25)


def uploads() -> dict[str, tuple[list[FullLayer], list[ScalarEntry], list[torch.Tensor]]]:
    """Uploads of every shape the wire carries: payloads of one chunk, of several and of an exact
    multiple of CHUNK_BYTES, one received into its own populated mapping (receive_buffer), several
    tensors in one payload (top-k, sign), scalars and buffers."""
    generator = torch.Generator().manual_seed(0)
    mapped = torch.randn(FRESH_MAPPING_BYTES // 4 + 3, generator=generator)
    big = torch.randn(CHUNK_BYTES // 4 * 2 + 1000, generator=generator)
    exact = torch.randn(CHUNK_BYTES // 4 * 3, generator=generator)
    small = torch.randn(5, 3, generator=generator)
    topk = (torch.arange(0, 300_000, 97, dtype=torch.int32), torch.randn(3093, generator=generator))
    sign = (torch.randint(0, 256, (126,), dtype=torch.uint8, generator=generator), torch.tensor([0.5]))
    return {
        "dense, several chunks": ([FullLayer.dense(0, 7, big)], [], []),
        "dense, an exact multiple of the chunk": ([FullLayer.dense(0, 7, exact)], [], []),
        "dense, received into a mapping of its own": ([FullLayer.dense(0, 7, mapped)], [], []),
        "float16 and a scalar": ([FullLayer.dense(1, 7, small.half())], [ScalarEntry(0, 0.5, 6)], []),
        "top-k": ([FullLayer(0, 7, pb.TOPK, topk)], [], []),
        "sign (126 bytes of bits, then a float32 scale)": ([FullLayer(2, 7, pb.SIGN, sign)], [], []),
        "buffers": ([FullLayer.dense(0, 7, small)], [], [torch.arange(10), torch.ones(3, 2)]),
    }


def read(stream) -> object:
    stream = iter(stream)
    return read_update_body(read_update_header(stream), stream, 1 << 26)


@pytest.mark.parametrize("name", list(uploads()))
def test_raw_messages_read_as_parsed_ones_bit_for_bit_and_byte_for_byte(name):
    full, scalars, buffers = uploads()[name]
    raw = read(serialized_update_parts(HEADER, full, scalars, buffers))
    parsed = read(update_parts(HEADER, full, scalars, buffers))
    assert raw.header == parsed.header == HEADER
    assert raw.bytes_by_kind == parsed.bytes_by_kind
    assert raw.wire_bytes == sum(wire_size(part) for part in update_parts(HEADER, full, scalars, buffers))
    assert raw.scalars == parsed.scalars == scalars
    for received in (raw, parsed):
        assert [(item.layer, item.lbg_version, item.codec) for item in received.full] == \
               [(item.layer, item.lbg_version, item.codec) for item in full]
        for item, sent in zip(received.full, full):
            assert [(p.dtype, p.shape) for p in item.parts] == [(p.dtype, p.shape) for p in sent.parts]
            assert all(torch.equal(p.view(torch.uint8), q.view(torch.uint8)) for p, q in zip(item.parts, sent.parts))
        assert sorted(received.buffers) == list(range(len(buffers)))
        assert all(torch.equal(received.buffers[i], buffers[i]) for i in range(len(buffers)))


def chunk_message(data: bytes, outer_length: bytes | None = None, inner_length: bytes | None = None,
                  extra: bytes = b"") -> bytes:
    """UpdatePart(chunk=TensorChunk(data=data)) by hand: lengths given raw (e.g. padded varints) or minimal."""
    inner = b"\x0a" + (inner_length or bytes([len(data)])) + data + extra
    return b"\x1a" + (outer_length or bytes([len(inner)])) + inner


def test_chunk_key_bytes_are_the_protos():
    message = pb.UpdatePart(chunk=pb.TensorChunk(data=b"abc")).SerializeToString()
    assert message == chunk_message(b"abc") == encode_chunk_part(memoryview(b"abc"))


def test_a_chunk_encoded_as_protobuf_encodes_it_is_read_in_place():
    data = bytes(range(256)) * 4096  # 1 MiB: three-byte lengths
    message = encode_chunk_part(memoryview(data))
    assert message == pb.UpdatePart(chunk=pb.TensorChunk(data=data)).SerializeToString()
    view = chunk_payload(message)
    assert view is not None and view.obj is message and view.tobytes() == data


NON_CANONICAL = {
    "padded outer length": chunk_message(b"abc", outer_length=b"\x85\x00"),
    "padded inner length": chunk_message(b"abc", outer_length=b"\x06", inner_length=b"\x83\x00"),
    "an unknown field after the data": chunk_message(b"abc", extra=b"\x10\x01"),
    "the data field twice": b"\x1a\x0a" + b"\x0a\x03abc" + b"\x0a\x03xyz",
    "the chunk field twice": chunk_message(b"abc") + chunk_message(b"xyz"),
}


@pytest.mark.parametrize("name", list(NON_CANONICAL))
def test_any_other_encoding_is_parsed_and_counted_as_before(name):
    """protobuf accepts these, so the server does too; their bytes are counted as ByteSize + 5, as
    every part was before the raw reading."""
    message = NON_CANONICAL[name]
    assert chunk_payload(message) is None
    parsed = pb.UpdatePart.FromString(message)
    head = pb.UpdatePart(full=pb.FullGradient(layer=0, lbg_version=1, codec=pb.DENSE, data=b"",
                                              parts=[pb.TensorMeta(dtype=pb.UINT8, shape=[len(parsed.chunk.data)],
                                                                   nbytes=len(parsed.chunk.data))]))
    messages = [pb.UpdatePart(header=HEADER).SerializeToString(), head.SerializeToString(), message]
    raw = read(messages)
    assert raw.full[0].parts[0].numpy().tobytes() == parsed.chunk.data
    assert raw.bytes_by_kind["full"] == wire_size(head) + parsed.ByteSize() + GRPC_FRAME_BYTES


@pytest.mark.parametrize("message", [b"\xff\xff\xff", b"\x1a\x05ab", chunk_message(b"abc")[:-1]])
def test_bytes_that_are_no_update_part_are_a_malformed_stream(message):
    with pytest.raises(MalformedStream, match="not a valid UpdatePart"):
        read([pb.UpdatePart(header=HEADER).SerializeToString(), message])
    with pytest.raises(MalformedStream, match="not a valid UpdatePart"):
        read_update_header(iter([message]))


def test_the_real_server_reads_raw_uploads_and_refuses_undecodable_ones_as_malformed(tmp_path):
    """Over gRPC, through the CallGuard that hands SubmitUpdate its raw messages: a valid upload is
    read to the end (and refused only because no round is open), undecodable bytes are MALFORMED
    (INVALID_ARGUMENT, counted as a refusal)."""
    coordinator = Coordinator(ExperimentConfig(name="raw", workers=1, rounds=1, **FAST), tmp_path / "run")
    running = start_server(coordinator, "127.0.0.1", 0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}", options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.AggregatorStub(channel)
            reply = stub.Join(join_request(stub, "raw-worker"), timeout=30)
            submit = submit_update_call(channel)
            header = pb.UpdateHeader(worker_id=reply.worker_id, token=reply.token, round=1, num_samples=1)
            layers = [FullLayer.dense(i, 1, torch.zeros(shape)) for i, shape in enumerate(coordinator.layer_shapes)]
            metadata = worker_metadata(reply.worker_id, reply.token)
            with pytest.raises(grpc.RpcError) as closed:
                submit(serialized_update_parts(header, layers, []), timeout=30, metadata=metadata)
            assert closed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "not open" in closed.value.details()
            before = coordinator.status().uplink_bytes
            garbage = [pb.UpdatePart(header=header).SerializeToString(), b"\xff\xff\xff"]
            with pytest.raises(grpc.RpcError) as malformed:
                submit(iter(garbage), timeout=30, metadata=metadata)
            assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid UpdatePart" in malformed.value.details()
            trailer = dict(malformed.value.trailing_metadata())[ERROR_DETAIL_KEY]
            assert pb.ErrorDetail.FromString(trailer).reason == pb.ErrorDetail.MALFORMED
            assert coordinator.status().uplink_bytes == before + len(garbage[0]) + GRPC_FRAME_BYTES
    finally:
        running.stop(grace=0)


def test_a_tensor_received_into_its_own_mapping_outlives_everything_else_that_held_it():
    values = torch.randn(FRESH_MAPPING_BYTES // 4 + 1)
    update = read(serialized_update_parts(HEADER, [FullLayer.dense(0, 7, values)], []))
    view = update.full[0].parts[0][-5:]
    del update
    assert torch.equal(view, values[-5:])
