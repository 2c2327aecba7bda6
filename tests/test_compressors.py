"""Base compressors: their payloads, wire sizes, decoding, and LBGM stacked on them."""

import math

import numpy as np
import pytest
import torch

from lbgm.common.codec import tensor_to_bytes
from lbgm.common.compressors import (
    CompressorSettings, PayloadError, compress, decode, pack_bits, topk_count, unpack_bits, zero_payload,
)
from lbgm.common.lookback import decision_units
from lbgm.common.wire import read_update_body, read_update_header, update_parts
from lbgm.server.updates import UploadRules, judge_update
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.worker.encoder import LbgmEncoder, compressor_settings

SHAPE = (64, 50)  # 3200 values: 12,800 bytes dense
NUMEL = math.prod(SHAPE)


def squeeze(name, tensor=None, **options):
    settings = CompressorSettings(name=name, **options)
    tensor = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) if tensor is None else tensor
    return compress(settings, tensor, None, torch.Generator().manual_seed(0)), tensor


def payload_bytes(result):
    return sum(len(tensor_to_bytes(part)) for part in result.parts)


def test_topk_keeps_the_largest_values_exactly():
    result, tensor = squeeze("topk", topk_fraction=0.1)
    kept = result.decoded != 0
    assert int(kept.sum()) == 320
    assert torch.equal(result.decoded[kept], tensor[kept])
    assert tensor.abs()[kept].min() >= tensor.abs()[~kept].max()
    assert payload_bytes(result) == 320 * 8  # int32 index + float32 value


def test_sign_sends_one_bit_per_value_and_a_scale():
    result, tensor = squeeze("sign")
    assert payload_bytes(result) == NUMEL // 8 + 4
    scale = tensor.abs().mean()
    assert torch.allclose(result.decoded, torch.where(tensor >= 0, scale, -scale))


def test_qsgd_is_int8_and_unbiased():
    result, _ = squeeze("qsgd")
    assert result.parts[0].dtype == torch.int8 and payload_bytes(result) == NUMEL + 4
    small = torch.randn(10, generator=torch.Generator().manual_seed(3))
    settings = CompressorSettings(name="qsgd", quantization_levels=4)
    generator = torch.Generator().manual_seed(0)
    mean = sum(compress(settings, small, None, generator).decoded for _ in range(2000)) / 2000
    assert torch.allclose(mean, small, atol=0.05)


def test_lowrank_recovers_a_low_rank_matrix():
    generator = torch.Generator().manual_seed(5)
    low_rank = torch.randn(64, 2, generator=generator) @ torch.randn(2, 50, generator=generator)
    result, _ = squeeze("lowrank", tensor=low_rank, lowrank_rank=2)
    assert payload_bytes(result) == (64 + 50) * 2 * 4
    assert torch.allclose(result.decoded, low_rank, rtol=1e-3, atol=1e-3)


def test_lowrank_sends_vectors_dense():
    result, _ = squeeze("lowrank", tensor=torch.randn(50))
    assert result.codec == pb.DENSE


@pytest.mark.parametrize("name", ["topk", "sign", "qsgd", "lowrank"])
def test_payload_size_depends_only_on_shape(name):
    real, _ = squeeze(name)
    codec, parts = zero_payload(CompressorSettings(name=name), SHAPE, torch.float32)
    assert codec == real.codec
    assert [p.shape for p in parts] == [p.shape for p in real.parts]


def test_bit_packing_round_trips():
    bits = torch.rand(29) > 0.5
    assert torch.equal(unpack_bits(pack_bits(bits), 29), bits)


@pytest.mark.parametrize("codec, parts, message", [
    (pb.TOPK, (torch.tensor([5, 3], dtype=torch.int32), torch.zeros(2)), "increasing"),
    (pb.TOPK, (torch.tensor([NUMEL], dtype=torch.int32), torch.zeros(1)), "out of range"),
    (pb.TOPK, (torch.tensor([1], dtype=torch.int64), torch.zeros(1)), "int32"),
    (pb.SIGN, (torch.zeros(3, dtype=torch.uint8), torch.ones(1)), "uint8 bytes"),
    (pb.QSGD, (torch.zeros(NUMEL, dtype=torch.int16), torch.ones(1)), "int8"),
    (pb.LOWRANK, (torch.zeros(64, 2), torch.zeros(49, 2)), "do not fit"),
    (pb.DENSE, (torch.zeros(2, 2),), "shape"),
    (99, (torch.zeros(1),), "unknown codec"),
])
def test_malformed_payloads_are_refused(codec, parts, message):
    with pytest.raises(PayloadError, match=message):
        decode(codec, parts, SHAPE)


@pytest.mark.parametrize("name", ["topk", "sign", "qsgd", "lowrank"])
def test_lbgm_stacked_on_a_compressor_keeps_mirrors_bit_identical(name):
    shapes = (SHAPE, (50,))
    units = tuple(decision_units(2, "layer"))
    settings = CompressorSettings(name=name, memory=False)  # memory would make rounds' inputs differ
    rules = UploadRules(layer_shapes=shapes, units=units, dense_dtype=torch.float32,
                        codec=compress(settings, torch.ones(SHAPE), None, torch.Generator()).codec)
    encoder = LbgmEncoder(units, settings, seed=0)
    mirrors = {}
    base = [torch.randn(s, generator=torch.Generator().manual_seed(9)) for s in shapes]
    scalars_seen = 0
    for round_number in (1, 2, 3):
        gradient = [b * (1 + 0.05 * round_number) for b in base]
        encoded = encoder.encode(gradient, round_number, delta=0.5, wire_dtype=torch.float32)
        stream = iter(update_parts(pb.UpdateHeader(round=round_number, num_samples=5), encoded.full, encoded.scalars))
        update = read_update_body(read_update_header(stream), stream, 1 << 20)
        accepted = judge_update(update, round_number, rules, mirrors)
        mirrors.update(accepted.new_mirrors)
        encoder.commit(encoded)
        scalars_seen += len(encoded.scalars)
        for unit, lbg in encoder.lbgs.items():
            assert mirrors[unit].version == lbg.version
            assert [tensor_to_bytes(t) for t in mirrors[unit].tensors] == [tensor_to_bytes(t) for t in lbg.tensors]
    assert scalars_seen > 0


def test_topk_error_feedback_carries_what_was_dropped():
    units = tuple(decision_units(1, "layer"))
    encoder = LbgmEncoder(units, CompressorSettings(name="topk", topk_fraction=0.25), seed=0)
    gradient = [torch.tensor([4.0, -3.0, 2.0, 1.0])]
    encoded = encoder.encode(gradient, 1, delta=0.0, wire_dtype=torch.float32)
    encoder.commit(encoded)
    assert torch.equal(encoder.memory[0], torch.tensor([0.0, -3.0, 2.0, 1.0]))
    second = encoder.encode([torch.zeros(4)], 2, delta=0.0, wire_dtype=torch.float32)
    assert torch.equal(second.full[0].parts[1], torch.tensor([-3.0]))  # the carried value now wins


LOWRANK_CASES = [((5, 7), 1), ((5, 7), 3), ((16, 3, 3), 2), ((40, 30), 4)]


@pytest.mark.parametrize("shape, rank", LOWRANK_CASES)
def test_lowrank_decode_is_the_fixed_order_sum_of_outer_products_bit_for_bit(shape, rank):
    """Issue 13, item 13: element (i, k) is ((p_i0 q_k0 + p_i1 q_k1) + p_i2 q_k2) + ..., each operation a
    correctly rounded float32 one (numpy scalars here), so every CPU gets these bits; a matrix
    product's kernel chooses its own order and fuses multiply-adds."""
    generator = torch.Generator().manual_seed(rank)
    rows, cols = shape[0], math.prod(shape[1:])
    p, q = torch.randn(rows, rank, generator=generator), torch.randn(cols, rank, generator=generator)
    pn, qn = p.numpy(), q.numpy()
    expected = np.zeros((rows, cols), dtype=np.float32)
    for i in range(rows):
        for k in range(cols):
            total = np.float32(0)
            for j in range(rank):
                total = np.float32(total + np.float32(pn[i, j] * qn[k, j]))
            expected[i, k] = total
    decoded = decode(pb.LOWRANK, (p, q), shape)
    assert decoded.dtype == torch.float32 and decoded.shape == shape
    assert tensor_to_bytes(decoded) == expected.tobytes()


def test_lowrank_decode_does_not_depend_on_the_thread_count():
    generator = torch.Generator().manual_seed(0)
    p, q = torch.randn(300, 4, generator=generator), torch.randn(500, 4, generator=generator)
    threads = torch.get_num_threads()
    try:
        decoded = []
        for count in (1, 2, 4):
            torch.set_num_threads(count)
            decoded.append(tensor_to_bytes(decode(pb.LOWRANK, (p, q), (300, 500))))
    finally:
        torch.set_num_threads(threads)
    assert decoded[0] == decoded[1] == decoded[2]


@pytest.mark.parametrize("fraction, numel, kept", [
    (0.1, 400_000, 40_000),  # the audit's case: a float32 0.1 kept 40,001
    (0.1, 156_800, 15_680),
    (0.07, 100, 7),  # 0.07 * 100 is 7.000000000000001 in binary floating point
    (0.25, 10, 3),  # ceil
    (0.001, 10, 1),  # at least one
    (1.0, 17, 17),
])
def test_topk_keeps_the_ceiling_of_the_decimal_fraction(fraction, numel, kept):
    assert topk_count(fraction, numel) == kept
    result = compress(CompressorSettings(name="topk", topk_fraction=fraction), torch.randn(numel), None,
                      torch.Generator())
    assert result.parts[0].numel() == kept


def test_topk_fraction_travels_exactly_in_round_settings():
    settings = pb.TrainSettings.FromString(pb.TrainSettings(codec=pb.TOPK, topk_fraction=0.1).SerializeToString())
    assert compressor_settings(settings).topk_fraction == 0.1


@pytest.mark.parametrize("wire_dtype", [torch.float16, torch.bfloat16])
def test_lowrank_sends_the_vectors_it_cannot_shrink_in_the_wire_dtype(wire_dtype):
    """Issue 13, item 10: the server expects every DENSE payload in the wire dtype; the low-rank
    fallback sent float32 and every upload was refused."""
    shapes = (SHAPE, (50,))
    units = tuple(decision_units(2, "layer"))
    settings = CompressorSettings(name="lowrank")
    rules = UploadRules(layer_shapes=shapes, units=units, dense_dtype=wire_dtype, codec=pb.LOWRANK)
    encoded = LbgmEncoder(units, settings).encode([torch.randn(s) for s in shapes], 1, delta=0.5,
                                                  wire_dtype=wire_dtype)
    assert [(f.codec, [p.dtype for p in f.parts]) for f in encoded.full] == \
        [(pb.LOWRANK, [torch.float32, torch.float32]), (pb.DENSE, [wire_dtype])]
    stream = iter(update_parts(pb.UpdateHeader(round=1, num_samples=5), encoded.full, encoded.scalars))
    accepted = judge_update(read_update_body(read_update_header(stream), stream, 1 << 20), 1, rules, {})
    assert [tensor_to_bytes(t) for t in accepted.new_mirrors[1].tensors] == \
        [tensor_to_bytes(t) for t in encoded.new_lbgs[1].tensors]
