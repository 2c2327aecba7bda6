"""An upload holds at most what the model needs (issue 13, items 2 and 4).

read_update_body with the model's UploadLimits refuses, before buffering it, any part
beyond one FullGradient per layer, the codec's number of tensors per payload and one
message per model buffer; chunks must carry bytes. So the parts of one upload are at most
header + layers + scalars + buffers + one chunk per announced byte, and what the receiver
keeps is at most the announced bytes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
import torch

from lbgm.common.codec import tensor_meta, tensor_to_bytes
from lbgm.common.wire import (
    FullLayer, MalformedStream, UploadLimits, read_update_body, read_update_header, update_parts,
)
from lbgm.v1 import lbgm_pb2 as pb

LIMITS = UploadLimits(layers=2, buffers=1)
SHAPES = ((3, 4), (4,))
MAX_TENSOR_BYTES = 8 * 12
MAX_UPDATE_BYTES = 8 * (12 + 4 + 1)


def read(parts) -> None:
    stream = iter(parts)
    read_update_body(read_update_header(stream), stream, MAX_TENSOR_BYTES, MAX_UPDATE_BYTES, LIMITS)


def valid_parts() -> list[pb.UpdatePart]:
    full = [FullLayer.dense(layer, 1, torch.zeros(shape)) for layer, shape in enumerate(SHAPES)]
    return list(update_parts(pb.UpdateHeader(round=1, num_samples=1), full, [], [torch.zeros(1)]))


def full_part(layer: int, codec: int, metas: list[pb.TensorMeta], data: bytes = b"") -> pb.UpdatePart:
    return pb.UpdatePart(full=pb.FullGradient(layer=layer, lbg_version=1, codec=codec, parts=metas, data=data))


def dense_part(layer: int) -> pb.UpdatePart:
    tensor = torch.zeros(SHAPES[layer])
    return full_part(layer, pb.DENSE, [tensor_meta(tensor)], tensor_to_bytes(tensor))


EMPTY = pb.TensorMeta(dtype=pb.FLOAT32, shape=[0], nbytes=0)
HEADER = valid_parts()[0]


def test_the_limits_admit_a_valid_upload():
    read(valid_parts())


@pytest.mark.parametrize("parts, message", [
    ([full_part(0, pb.DENSE, [EMPTY] * 50_000)], "layer 0's DENSE payload lists 50000 tensors, expected 1"),
    ([full_part(0, pb.TOPK, [EMPTY] * 3)], "layer 0's TOPK payload lists 3 tensors, expected 2"),
    ([full_part(0, 77, [EMPTY])], "layer 0 uses codec unknown (77), known codecs are"),
    ([dense_part(0), dense_part(0)], "layer 0 sent twice"),
    ([dense_part(1), dense_part(0), dense_part(1)], "layer 1 sent twice"),
    ([full_part(2, pb.DENSE, [EMPTY])], "layer 2 out of range [0, 2)"),
    ([pb.UpdatePart(buffer=pb.ModelTensor(index=1, meta=EMPTY))], "buffer 1 out of range [0, 1)"),
    ([pb.UpdatePart(buffer=pb.ModelTensor(index=0, meta=EMPTY))] * 2, "buffer 0 sent twice"),
    ([full_part(0, pb.DENSE, [tensor_meta(torch.zeros(SHAPES[0]))]), pb.UpdatePart(chunk=pb.TensorChunk())],
     "empty chunk"),
])
def test_a_part_no_model_needs_is_refused(parts, message):
    with pytest.raises(MalformedStream, match=re.escape(message)):
        read([HEADER, *parts])


def test_an_endless_stream_is_refused_within_the_models_count_of_parts():
    """Whatever repeats (a layer, a buffer, a chunk, an empty chunk), the reader stops within
    header + layers + buffers + announced bytes parts: it pulls no part after the refusal."""
    layer = dense_part(0)
    announced_only = full_part(0, pb.DENSE, [tensor_meta(torch.zeros(SHAPES[0]))])
    endless = {
        "the same layer": lambda: layer,
        "the same buffer": lambda: pb.UpdatePart(buffer=pb.ModelTensor(index=0, meta=EMPTY)),
        "one-byte chunks": lambda: pb.UpdatePart(chunk=pb.TensorChunk(data=b"\0")),
        "empty chunks": lambda: pb.UpdatePart(chunk=pb.TensorChunk()),
    }
    for name, make in endless.items():
        pulled = 0

        def stream() -> Iterator[pb.UpdatePart]:
            nonlocal pulled
            yield HEADER
            yield announced_only
            while True:
                pulled += 1
                yield make()

        with pytest.raises(MalformedStream):
            read(stream())
        assert pulled <= 48 + 1, f"{name}: the 48 announced bytes allow at most 48 one-byte chunks, read {pulled}"


def test_fifty_thousand_empty_tensors_are_refused_in_the_first_message_quickly():
    """Issue 13, item 2: such lists used to be kept whole, 340 MB for 20 messages."""
    message = full_part(0, pb.DENSE, [EMPTY] * 50_000)
    started = time.perf_counter()
    pulled = 0

    def stream() -> Iterator[pb.UpdatePart]:
        nonlocal pulled
        yield HEADER
        for pulled in range(1, 21):
            yield message

    with pytest.raises(MalformedStream, match="lists 50000 tensors"):
        read(stream())
    assert pulled == 1 and time.perf_counter() - started < 1.0
