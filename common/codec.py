"""Tensor <-> wire bytes: raw little-endian data plus dtype and shape.

No pickle, no .npy and no `repeated float`: a tensor is its raw bytes, so a
float32 value costs exactly 4 bytes and decoding is one copy. Large tensors
are cut into CHUNK_BYTES pieces; `TensorAssembler` puts them back together
and refuses anything that does not match what the header announced.
"""

from __future__ import annotations

import math
import mmap
import sys
from collections.abc import Sequence

import numpy
import torch
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from lbgm.common.grpc_options import CHUNK_BYTES  # ~1 MiB: per-message overhead vanishes, far below gRPC's limits
from lbgm.v1 import lbgm_pb2 as pb

# No model tensor has more dimensions (a convolution's weight has 4); a shape with
# more is refused before anything is computed from it.
MAX_DIMS = 8
_SHOWN_DIMS = 8  # an error message quotes at most this many of a shape's dimensions
# Values a shape may span counting zero dimensions as one: far above any tensor this system
# holds, far below where torch's stride arithmetic overflows int64.
MAX_EXTENT = 1 << 40

_TORCH_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: pb.FLOAT32,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.float64: pb.FLOAT64,
    torch.int64: pb.INT64,
    torch.int32: pb.INT32,
    torch.int16: pb.INT16,
    torch.int8: pb.INT8,
    torch.uint8: pb.UINT8,
    torch.bool: pb.BOOL,
}
_WIRE_TO_TORCH = {wire: dtype for dtype, wire in _TORCH_TO_WIRE.items()}
FLOAT_WIRE_DTYPES = frozenset({pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.FLOAT64})


class CodecError(ValueError):
    """A tensor on the wire does not match its announced dtype, shape or size."""


def wire_dtype(dtype: torch.dtype) -> int:
    try:
        return _TORCH_TO_WIRE[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} cannot travel; supported: {sorted(map(str, _TORCH_TO_WIRE))}") from None


def torch_dtype(wire: int) -> torch.dtype:
    try:
        return _WIRE_TO_TORCH[wire]
    except KeyError:
        raise CodecError(f"unknown wire dtype {wire}") from None


def element_size(wire: int) -> int:
    return torch.empty((), dtype=torch_dtype(wire)).element_size()


def enum_name(enum: EnumTypeWrapper, value: int) -> str:
    """The name of a protobuf enum value, or `unknown (77)`: proto3 enums arrive as any int32, and
    `enum.Name` raises on values the .proto does not define, so error messages use this instead."""
    try:
        return enum.Name(value)
    except ValueError:
        return f"unknown ({value})"


def shape_text(shape: Sequence[int]) -> str:
    """A shape for an error message, cut to its first dimensions: a hostile one may list 100,000."""
    if len(shape) <= _SHOWN_DIMS:
        return str(list(shape))
    shown = ", ".join(str(dim) for dim in shape[:_SHOWN_DIMS])
    return f"[{shown}, ...] ({len(shape)} dimensions)"


def announced_nbytes(meta: pb.TensorMeta, max_bytes: int) -> int:
    """The byte count dtype x shape needs, checked against `meta.nbytes` and `max_bytes`.

    The number of dimensions is checked before any arithmetic: at most MAX_DIMS int64 factors
    make a product of at most 504 bits, where a shape of 100,000 dimensions of 2^62 would make
    one of 6 million. Zero dimensions make a tensor empty but not small for torch (its strides
    still multiply the other dimensions), so the non-zero dimensions' product is bounded too."""
    size = element_size(meta.dtype)
    shape = meta.shape
    if len(shape) > MAX_DIMS:
        raise CodecError(f"tensor has {len(shape)} dimensions, at most {MAX_DIMS} are allowed")
    if any(dim < 0 for dim in shape):
        raise CodecError(f"negative dimension in shape {shape_text(shape)}")
    expected = math.prod(shape) * size
    if expected > max_bytes or math.prod(max(dim, 1) for dim in shape) > MAX_EXTENT:
        raise CodecError(f"tensor of shape {shape_text(shape)} and dtype {enum_name(pb.DType, meta.dtype)} "
                         f"is larger than the limit of {max_bytes} bytes")
    if meta.nbytes != expected:
        raise CodecError(f"tensor of shape {shape_text(shape)} and dtype {enum_name(pb.DType, meta.dtype)} "
                         f"needs {expected} bytes; header announced {meta.nbytes}")
    return expected


def tensor_meta(tensor: torch.Tensor) -> pb.TensorMeta:
    return pb.TensorMeta(
        dtype=wire_dtype(tensor.dtype),
        shape=list(tensor.shape),
        nbytes=tensor.numel() * tensor.element_size(),
    )


def tensor_view(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a (CPU) tensor in row-major order, without copying them when the
    tensor is already contiguous: senders slice this view straight into their messages."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy()
    if sys.byteorder == "big" and flat.element_size() > 1:
        raw = flat.numpy().byteswap().view("uint8")  # pragma: no cover - LE hosts
    return memoryview(raw).cast("B")


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a (CPU) tensor, in row-major order."""
    return tensor_view(tensor).tobytes()


def payload_view(tensors: Sequence[torch.Tensor]) -> memoryview:
    """The bytes of tensors sent back to back as one payload; copies only when there are several."""
    if len(tensors) == 1:
        return tensor_view(tensors[0])
    return memoryview(b"".join(tensor_view(tensor) for tensor in tensors))


def tensor_from_bytes(data: bytes | bytearray, meta: pb.TensorMeta) -> torch.Tensor:
    """Inverse of tensor_to_bytes; checks the byte count against dtype x shape (announced_nbytes:
    no shape makes the check itself expensive)."""
    dtype = torch_dtype(meta.dtype)
    shape = tuple(meta.shape)
    expected = announced_nbytes(meta, max(len(data), meta.nbytes))
    if len(data) != expected:
        raise CodecError(f"tensor of shape {shape_text(shape)} and dtype {enum_name(pb.DType, meta.dtype)} "
                         f"needs {expected} bytes, {len(data)} arrived")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return _typed(torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8), meta)


def _typed(flat: torch.Tensor, meta: pb.TensorMeta) -> torch.Tensor:
    """A flat uint8 tensor of exactly meta.nbytes wire bytes as the tensor `meta` describes, without a copy."""
    if sys.byteorder == "big":  # pragma: no cover - LE hosts
        flat = flat.view(-1, element_size(meta.dtype)).flip(1).reshape(-1)
    return flat.view(torch_dtype(meta.dtype)).reshape(tuple(meta.shape))


def split_chunks(data: bytes | memoryview, chunk_bytes: int = CHUNK_BYTES) -> list[bytes | memoryview]:
    """The payload cut into pieces of at most chunk_bytes (at least one piece); slices of a memoryview
    are views, not copies."""
    if len(data) <= chunk_bytes:
        return [data]
    return [data[start:start + chunk_bytes] for start in range(0, len(data), chunk_bytes)]


# glibc serves every block this large with a fresh mapping (its adaptive mmap threshold stops at 32 MiB on
# 64-bit), whose pages then fault in one by one as they are first written.
FRESH_MAPPING_BYTES = 32 << 20


def receive_buffer(nbytes: int) -> torch.Tensor:
    """An unwritten uint8 buffer for `nbytes` received bytes. A block glibc would map afresh anyway is
    mapped here with its pages populated in one system call instead of a page fault per 4 KiB, which
    took as long as copying the payload in twice (bench.ingest)."""
    populate = getattr(mmap, "MAP_POPULATE", None)  # Linux
    if nbytes < FRESH_MAPPING_BYTES or populate is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return torch.frombuffer(mapping, dtype=torch.uint8)  # the tensor keeps the mapping alive


class PayloadAssembler:
    """Collects the chunks of one announced payload: one or more tensors, back to back.

    Refuses more bytes than announced, so a hostile sender cannot make the
    receiver buffer an unbounded stream; `max_bytes` bounds the announcement.
    """

    def __init__(self, metas: Sequence[pb.TensorMeta], max_bytes: int) -> None:
        if not metas:
            raise CodecError("a payload needs at least one tensor")
        self.metas = list(metas)
        self.nbytes = sum(meta.nbytes for meta in self.metas)
        if self.nbytes > max_bytes:
            raise CodecError(f"payload announces {self.nbytes} bytes, limit is {max_bytes}")
        for meta in self.metas:  # every meta agrees with its dtype and shape before a byte is buffered
            announced_nbytes(meta, max_bytes)
        # Allocated once and left unwritten (bytearray(n) would write n zeros first, as long as the copies
        # themselves take): each chunk is then a single copy, and every byte is written before it is read.
        self._buffer = receive_buffer(self.nbytes)
        self._array = self._buffer.numpy()
        self._received = 0

    def add(self, data: bytes | memoryview) -> None:
        end = self._received + len(data)
        if end > self.nbytes:
            raise CodecError(f"payload announced {self.nbytes} bytes but more arrived ({end} so far)")
        # numpy copies without the GIL (a memoryview assignment holds it): other uploads and gRPC's own
        # threads run meanwhile.
        self._array[self._received:end] = numpy.frombuffer(data, dtype=numpy.uint8)
        self._received = end

    @property
    def complete(self) -> bool:
        return self._received == self.nbytes

    def tensors(self) -> list[torch.Tensor]:
        if not self.complete:
            raise CodecError(f"payload announced {self.nbytes} bytes, {self._received} arrived")
        if len(self.metas) == 1:  # the common case: the tensor is the buffer itself
            return [_typed(self._buffer, self.metas[0])]
        out, start = [], 0
        for meta in self.metas:  # each copied out: a tensor must start at a multiple of its element size
            out.append(_typed(self._buffer[start:start + meta.nbytes].clone(), meta))
            start += meta.nbytes
        return out
