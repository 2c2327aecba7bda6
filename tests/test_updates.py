"""Encoder -> wire -> parser -> judge, and every rule the judge enforces."""

import dataclasses

import pytest
import torch

from lbgm.common.codec import CHUNK_BYTES, tensor_to_bytes
from lbgm.common.lookback import LookbackGradient, decision_units
from lbgm.common.wire import (
    FullLayer, MalformedStream, ReceivedUpdate, ScalarEntry, read_update_body, read_update_header,
    serialized_update_parts, update_parts,
)
from lbgm.server.updates import UpdateRejected, UploadRules, judge_update
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.worker.encoder import LbgmEncoder

SHAPES = ((4, 3), (4,))
UNITS = tuple(decision_units(2, "layer"))
RULES = UploadRules(layer_shapes=SHAPES, units=UNITS, dense_dtype=torch.float32, codec=pb.DENSE)


def header(round_number=1, **fields):
    return pb.UpdateHeader(worker_id=1, token=b"t", round=round_number, num_samples=fields.pop("num_samples", 10),
                           **fields)


def through_the_wire(head, full, scalars, max_tensor_bytes=1 << 20):
    stream = iter(update_parts(head, full, scalars))
    return read_update_body(read_update_header(stream), stream, max_tensor_bytes)


def gradient(scale=1.0):
    torch.manual_seed(0)
    return [torch.randn(shape) * scale for shape in SHAPES]


def judge(update, mirrors=None, round_number=1, rules=RULES):
    return judge_update(update, round_number, rules, mirrors or {})


def test_first_round_goes_full_and_mirror_equals_worker_lbg_bit_for_bit():
    encoder = LbgmEncoder(UNITS)
    encoded = encoder.encode(gradient(), 1, delta=0.5, wire_dtype=torch.float32)
    accepted = judge(through_the_wire(header(), encoded.full, encoded.scalars))
    encoder.commit(encoded)
    assert accepted.full_units == 2 and accepted.scalar_units == 0
    for unit, lbg in encoder.lbgs.items():
        mirror = accepted.new_mirrors[unit]
        assert mirror.version == lbg.version == 1
        assert [tensor_to_bytes(x) for x in mirror.tensors] == [tensor_to_bytes(x) for x in lbg.tensors]


def test_parallel_gradient_goes_as_scalars_and_is_rebuilt():
    encoder = LbgmEncoder(UNITS)
    first = encoder.encode(gradient(), 1, 0.5, torch.float32)
    mirrors = judge(through_the_wire(header(), first.full, first.scalars)).new_mirrors
    encoder.commit(first)
    second = encoder.encode(gradient(scale=-2.0), 2, 0.5, torch.float32)
    assert not second.full and len(second.scalars) == 2
    update = through_the_wire(header(2), second.full, second.scalars)
    assert update.bytes_by_kind["full"] == 0 and 0 < update.bytes_by_kind["scalar"] < 40
    accepted = judge(update, mirrors, round_number=2)
    for rebuilt, expected in zip(accepted.gradient, gradient(scale=-2.0)):
        assert torch.allclose(rebuilt, expected, atol=1e-5)
    assert accepted.new_mirrors == {} and accepted.floats_uploaded == 2
    # The server keeps the mirrors' own tensors and the scalars, not K products, while the round collects uploads.
    held = [mirrors[unit].tensors[0] for unit in range(len(UNITS))]
    assert all(source is lbg for source, lbg in zip(accepted.gradient.sources, held, strict=True))


def test_float16_wire_keeps_lbg_in_travelled_precision():
    encoder = LbgmEncoder(UNITS)
    encoded = encoder.encode(gradient(), 1, 0.5, torch.float16)
    rules = UploadRules(layer_shapes=SHAPES, units=UNITS, dense_dtype=torch.float16, codec=pb.DENSE)
    accepted = judge(through_the_wire(header(), encoded.full, encoded.scalars), rules=rules)
    encoder.commit(encoded)
    assert accepted.new_mirrors[0].tensors[0].dtype == torch.float16
    assert torch.equal(accepted.new_mirrors[0].tensors[0], encoder.lbgs[0].tensors[0])


def test_error_feedback_memory_is_what_the_server_did_not_see():
    encoder = LbgmEncoder(UNITS)
    encoder.commit(encoder.encode(gradient(), 1, 0.9, torch.float32, error_feedback=True))
    assert all(torch.count_nonzero(memory) == 0 for memory in encoder.memory.values())
    noisy = [g * 2 + 0.1 for g in gradient()]
    encoded = encoder.encode(noisy, 2, 0.9, torch.float32, error_feedback=True)
    encoder.commit(encoded)
    assert encoded.scalars
    for entry in encoded.scalars:
        layer = UNITS[entry.unit][0]
        server_view = encoder.lbgs[entry.unit].tensors[0] * entry.rho
        assert torch.allclose(encoder.memory[layer], noisy[layer] - server_view, atol=1e-6)


def test_stale_version_is_refused_naming_the_units():
    mirrors = {0: LookbackGradient((torch.ones(4, 3),), 3), 1: LookbackGradient((torch.ones(4),), 3)}
    update = through_the_wire(header(5), [], [ScalarEntry(0, 1.0, 3), ScalarEntry(1, 1.0, 4)])
    with pytest.raises(UpdateRejected) as refused:
        judge(update, mirrors, round_number=5)
    assert refused.value.reason == pb.ErrorDetail.STALE_LBG and refused.value.stale_units == [1]


def test_scalar_without_any_lbg_is_refused_as_stale():
    update = through_the_wire(header(2), [FullLayer.dense(0, 2, torch.zeros(4, 3))], [ScalarEntry(1, 1.0, 1)])
    with pytest.raises(UpdateRejected) as refused:
        judge(update, round_number=2)
    assert refused.value.stale_units == [1]


def full_update(**changes):
    layers = [FullLayer.dense(0, 1, torch.zeros(4, 3)), FullLayer.dense(1, 1, torch.zeros(4))]
    for index, change in changes.items():
        if "tensor" in change:
            change = {"parts": (change.pop("tensor"),), **change}
        layers[int(index[1:])] = dataclasses.replace(layers[int(index[1:])], **change)
    return ReceivedUpdate(header=header(), full=layers)


@pytest.mark.parametrize("update, message", [
    (full_update(l0={"tensor": torch.zeros(3, 4)}), "shape"),
    (full_update(l0={"tensor": torch.zeros(4, 3, dtype=torch.float64)}), "dtype"),
    (full_update(l1={"tensor": torch.tensor([0.0, float("nan"), 0.0, 0.0])}), "NaN"),
    (full_update(l1={"tensor": torch.tensor([0.0, float("inf"), 0.0, 0.0])}), "NaN or Inf"),
    (full_update(l1={"layer": 7}), "out of range"),
    (full_update(l1={"layer": 0}), "sent twice"),
    (full_update(l1={"lbg_version": 9}), "version"),
    (ReceivedUpdate(header=header(), full=[FullLayer.dense(0, 1, torch.zeros(4, 3))]), "either fully"),
    (full_update(l0={"codec": pb.TOPK}), "accepts DENSE"),
    (ReceivedUpdate(header=header(num_samples=0)), "num_samples"),
    (ReceivedUpdate(header=header(), scalars=[ScalarEntry(5, 1.0, 1)]), "out of range"),
    (ReceivedUpdate(header=header(), scalars=[ScalarEntry(0, float("nan"), 1)]), "not finite"),
])
def test_malformed_updates_are_refused(update, message):
    with pytest.raises(UpdateRejected, match=message) as refused:
        judge(update)
    assert refused.value.reason == pb.ErrorDetail.MALFORMED


def test_whole_model_granularity_is_one_unit():
    units = decision_units(2, "model")
    encoder = LbgmEncoder(units)
    first = encoder.encode(gradient(), 1, 0.5, torch.float32)
    assert len(first.full) == 2 and list(first.new_lbgs) == [0]
    encoder.commit(first)
    second = encoder.encode(gradient(scale=3.0), 2, 0.5, torch.float32)
    assert [s.unit for s in second.scalars] == [0]


def parts_of(head, *parts):
    return iter([pb.UpdatePart(header=head), *parts])


def test_stream_must_start_with_header():
    with pytest.raises(MalformedStream, match="header"):
        read_update_header(iter([pb.UpdatePart(chunk=pb.TensorChunk(data=b"x"))]))


def test_truncated_tensor_is_refused():
    full = pb.FullGradient(layer=0, lbg_version=1, parts=[pb.TensorMeta(dtype=pb.FLOAT32, shape=[4], nbytes=16)],
                           data=b"\x00" * 8)
    stream = parts_of(header(), pb.UpdatePart(full=full))
    with pytest.raises(MalformedStream, match="ended early"):
        read_update_body(read_update_header(stream), stream, 1 << 20)


def test_chunk_without_tensor_is_refused():
    stream = parts_of(header(), pb.UpdatePart(chunk=pb.TensorChunk(data=b"x")))
    with pytest.raises(MalformedStream, match="no payload was announced"):
        read_update_body(read_update_header(stream), stream, 1 << 20)


def test_second_header_is_refused():
    stream = parts_of(header(), pb.UpdatePart(header=header()))
    with pytest.raises(MalformedStream, match="unexpected header"):
        read_update_body(read_update_header(stream), stream, 1 << 20)


def test_scalar_columns_of_different_length_are_refused():
    scalars = pb.ScalarUpdate(units=[0, 1], rhos=[1.0], lbg_versions=[1, 1])
    stream = parts_of(header(), pb.UpdatePart(scalars=scalars))
    with pytest.raises(MalformedStream, match="differ in length"):
        read_update_body(read_update_header(stream), stream, 1 << 20)


def test_tensor_over_the_limit_is_refused_before_buffering():
    meta = pb.TensorMeta(dtype=pb.FLOAT32, shape=[1 << 20], nbytes=4 << 20)
    stream = parts_of(header(), pb.UpdatePart(full=pb.FullGradient(layer=0, lbg_version=1, parts=[meta])))
    with pytest.raises(MalformedStream, match="limit"):
        read_update_body(read_update_header(stream), stream, 1 << 20)


@pytest.mark.parametrize("tail_bytes", [1, 127, 128, 16_383, 16_384, CHUNK_BYTES - 1, CHUNK_BYTES])
def test_serialized_upload_is_byte_for_byte_the_message_stream(tail_bytes):
    """The worker's one-copy encoding must be exactly what protobuf would send, for every varint width
    of a chunk's length, and parse back to the same tensors."""
    payload = torch.randint(0, 256, (2 * CHUNK_BYTES + tail_bytes,), dtype=torch.uint8)
    packed = (torch.arange(6, dtype=torch.int32), torch.ones(6))  # a compressor's payload: several parts
    full = [FullLayer.dense(0, 3, payload), FullLayer(1, 0, pb.TOPK, packed)]
    scalars = [ScalarEntry(2, 0.5, 1)]
    buffers = [torch.full((CHUNK_BYTES // 4 + 5,), 2.0)]
    messages = [part.SerializeToString() for part in update_parts(header(), full, scalars, buffers)]
    serialized = list(serialized_update_parts(header(), full, scalars, buffers))
    assert serialized == messages and len(serialized) == 1 + 3 + 1 + 1 + 2
    stream = (pb.UpdatePart.FromString(data) for data in serialized)
    update = read_update_body(read_update_header(stream), stream, max_tensor_bytes=4 * CHUNK_BYTES)
    assert torch.equal(update.full[0].parts[0], payload)
    assert [torch.equal(a, b) for a, b in zip(update.full[1].parts, packed, strict=True)] == [True, True]
