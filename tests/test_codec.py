"""Tensor codec: raw little-endian bytes + dtype + shape, chunked."""

import re
import time

import pytest
import torch

from lbgm.common.codec import (
    CHUNK_BYTES, MAX_DIMS, CodecError, PayloadAssembler, enum_name, shape_text, split_chunks, tensor_from_bytes,
    tensor_meta, tensor_to_bytes,
)
from lbgm.v1 import lbgm_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_round_trip_is_bit_exact(dtype):
    source = (torch.randn(3, 5, 7) * 100).to(dtype)
    back = tensor_from_bytes(tensor_to_bytes(source), tensor_meta(source))
    assert back.dtype == dtype and back.shape == source.shape
    assert tensor_to_bytes(back) == tensor_to_bytes(source)


def test_bytes_are_little_endian_float32():
    assert tensor_to_bytes(torch.tensor([1.0])) == b"\x00\x00\x80\x3f"


def test_scalar_and_empty_tensors():
    for source in (torch.tensor(2.5), torch.empty(0, 4)):
        back = tensor_from_bytes(tensor_to_bytes(source), tensor_meta(source))
        assert back.shape == source.shape and torch.equal(back, source)


def test_non_contiguous_tensor_travels_in_logical_order():
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    back = tensor_from_bytes(tensor_to_bytes(source), tensor_meta(source))
    assert torch.equal(back, source)


def test_multi_chunk_tensor_reassembles():
    source = torch.randn(CHUNK_BYTES // 4 * 3 + 17)  # a bit over 3 chunks of float32
    chunks = split_chunks(tensor_to_bytes(source))
    assert len(chunks) == 4 and all(len(c) <= CHUNK_BYTES for c in chunks)
    assembler = PayloadAssembler([tensor_meta(source)], max_bytes=1 << 30)
    for chunk in chunks:
        assembler.add(chunk)
    assert assembler.complete and torch.equal(assembler.tensors()[0], source)


def test_payload_of_several_tensors_splits_back_in_order():
    parts = [torch.arange(5, dtype=torch.int32), torch.randn(5), torch.tensor([7], dtype=torch.uint8)]
    assembler = PayloadAssembler([tensor_meta(p) for p in parts], max_bytes=1 << 20)
    for chunk in split_chunks(b"".join(tensor_to_bytes(p) for p in parts), chunk_bytes=7):
        assembler.add(chunk)
    assert all(torch.equal(a, b) for a, b in zip(assembler.tensors(), parts))


def test_wrong_byte_count_is_refused():
    meta = pb.TensorMeta(dtype=pb.FLOAT32, shape=[2, 2], nbytes=16)
    with pytest.raises(CodecError, match="needs 16 bytes"):
        tensor_from_bytes(b"\x00" * 12, meta)


def test_header_lying_about_size_is_refused():
    meta = pb.TensorMeta(dtype=pb.FLOAT32, shape=[2, 2], nbytes=12)
    with pytest.raises(CodecError):
        tensor_from_bytes(b"\x00" * 16, meta)


def test_more_bytes_than_announced_are_refused():
    assembler = PayloadAssembler([pb.TensorMeta(dtype=pb.FLOAT32, shape=[2], nbytes=8)], max_bytes=100)
    assembler.add(b"\x00" * 4)
    with pytest.raises(CodecError, match="more arrived"):
        assembler.add(b"\x00" * 8)


def test_announcement_over_the_limit_is_refused():
    with pytest.raises(CodecError, match="limit"):
        PayloadAssembler([pb.TensorMeta(dtype=pb.FLOAT32, shape=[1000], nbytes=4000)], max_bytes=1000)


def test_unknown_dtype_is_refused():
    with pytest.raises(CodecError, match="unknown wire dtype"):
        tensor_from_bytes(b"", pb.TensorMeta(dtype=pb.DTYPE_UNSPECIFIED, shape=[0], nbytes=0))


def test_a_shape_of_100000_huge_dimensions_is_refused_at_once_with_a_short_message():
    """Issue 13, item 1: the shape used to be multiplied out (31 s under the GIL) and the error
    message then failed to format the 6-million-bit product."""
    meta = pb.TensorMeta(dtype=pb.FLOAT32, shape=[2**62] * 100_000, nbytes=0)
    started = time.perf_counter()
    for check in (lambda: tensor_from_bytes(b"", meta), lambda: PayloadAssembler([meta], max_bytes=1 << 30)):
        with pytest.raises(CodecError, match=f"100000 dimensions, at most {MAX_DIMS}") as refused:
            check()
        assert len(str(refused.value)) < 200
    assert time.perf_counter() - started < 0.1


def test_a_long_shape_is_quoted_cut_short():
    assert shape_text([3] * 9) == "[3, 3, 3, 3, 3, 3, 3, 3, ...] (9 dimensions)"
    assert shape_text([200, 784]) == "[200, 784]"


@pytest.mark.parametrize("shape, message", [
    ([2**62, 2**62], "larger than the limit of 1024 bytes"),  # the product is never built past 8 factors
    ([0, 2**40, 2**40], "larger than the limit"),  # empty, but torch's strides would overflow
    ([3, -1], "negative dimension in shape [3, -1]"),
])
def test_a_meta_is_checked_before_a_byte_is_buffered(shape, message):
    with pytest.raises(CodecError, match=re.escape(message)):
        PayloadAssembler([pb.TensorMeta(dtype=pb.FLOAT32, shape=shape, nbytes=0)], max_bytes=1024)


def test_a_meta_whose_nbytes_contradicts_its_shape_is_refused_before_its_data():
    with pytest.raises(CodecError, match="needs 16 bytes; header announced 12"):
        PayloadAssembler([pb.TensorMeta(dtype=pb.FLOAT32, shape=[2, 2], nbytes=12)], max_bytes=1024)


def test_enum_names_are_total():
    assert enum_name(pb.Codec, pb.TOPK) == "TOPK"
    assert enum_name(pb.Codec, 77) == "unknown (77)"
    assert enum_name(pb.DType, -5) == "unknown (-5)"
