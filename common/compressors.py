"""Base compressors that LBGM stacks on, each with a compact wire payload.

A compressor turns one layer's gradient into payload tensors (what travels:
indices + values, packed sign bits + a scale, int8 levels + a scale, or two
low-rank factors) and back. `decode` is a pure function of the payload and
the layer's shape, so worker and server rebuild exactly the same tensor from
the same bytes; that rebuilt tensor g~ = C(g) is what LBGM decides on and
what becomes the look-back gradient when the layer goes in full ("stacking":
LBGM runs on what the base compressor produces).

Devices: `compress` computes on the gradient's device (a worker's GPU), then
moves the payload to the CPU, where it is serialized, and decodes it there:
the worker's g~ is then the very tensor the server's `decode` makes from the
same bytes, whatever device produced them. Random draws come from a CPU
generator, so the stream does not depend on the device either.

State that persists across rounds (the error-feedback memory of top-k/sign/
QSGD, PowerSGD's warm-started Q) lives in `CompressorMemory`, owned by the
worker; `compress` only proposes the new state, which the worker commits once
the server accepted the upload.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from lbgm.common.compressor_settings import CompressorSettings
from lbgm.v1 import lbgm_pb2 as pb

CODEC_OF = {"none": pb.DENSE, "topk": pb.TOPK, "sign": pb.SIGN, "qsgd": pb.QSGD, "lowrank": pb.LOWRANK}
# How many tensors each codec's payload holds: the receiver refuses a FullGradient listing more.
PAYLOAD_TENSORS = {pb.DENSE: 1, pb.TOPK: 2, pb.SIGN: 2, pb.QSGD: 2, pb.LOWRANK: 2}
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


class PayloadError(ValueError):
    """A compressed payload does not fit the layer it claims to encode."""


@dataclass(frozen=True)
class Compressed:
    codec: int
    parts: tuple[torch.Tensor, ...]  # what travels (on the CPU)
    decoded: torch.Tensor  # decode(codec, parts, shape) on the CPU: what the server will rebuild, bit for bit
    lowrank_q: torch.Tensor | None = None  # PowerSGD's warm start for next round (on the gradient's device)


def topk_count(fraction: float, numel: int) -> int:
    """Values top-k keeps of `numel`: ceil(fraction x numel), at least one, with the fraction taken
    as the decimal it was written as (0.07 x 100 keeps 7; in binary floating point it is 7.000000000000001,
    whose ceiling keeps 8)."""
    return max(1, math.ceil(Fraction(repr(float(fraction))) * numel))


def compress(settings: CompressorSettings, gradient: torch.Tensor, warm_q: torch.Tensor | None,
             generator: torch.Generator, dense_dtype: torch.dtype = torch.float32) -> Compressed:
    """One layer through the base compressor (no memory applied here).

    A DENSE payload (compressor none, or a layer low rank cannot shrink) travels in `dense_dtype`,
    the run's wire dtype; the other codecs' payloads have the fixed dtypes of pb.Codec's comment.
    Computed on the gradient's device; the payload and its decoded form are returned on the CPU."""
    shape = tuple(gradient.shape)
    codec = CODEC_OF[settings.name]
    flat = gradient.detach().to(torch.float32).reshape(-1)
    if codec == pb.LOWRANK and not _factorising_pays(shape, settings.lowrank_rank):
        codec = pb.DENSE
    new_q = None
    if codec == pb.DENSE:
        parts = (gradient.detach().to(dense_dtype, copy=True),)
    elif codec == pb.TOPK:
        k = topk_count(settings.topk_fraction, flat.numel())
        indices = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        parts = (indices.to(torch.int32), flat[indices].clone())
    elif codec == pb.SIGN:
        scale = flat.abs().mean().reshape(1)
        parts = (pack_bits(flat >= 0), scale)
    elif codec == pb.QSGD:
        parts = _qsgd(flat, settings.quantization_levels, generator)
    else:
        parts, new_q = _power_iteration(gradient.detach().to(torch.float32).reshape(shape[0], -1),
                                        settings.lowrank_rank, warm_q, generator)
    parts = tuple(part.to("cpu") for part in parts)  # the CPU's own tensors stay as they are, uncopied
    return Compressed(codec=codec, parts=parts, decoded=decode(codec, parts, shape), lowrank_q=new_q)


def decode(codec: int, parts: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The dense tensor a payload stands for (float32; a DENSE payload as it travelled); PayloadError
    if it cannot fit `shape`."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if codec not in PAYLOAD_TENSORS:
        raise PayloadError(f"unknown codec {codec}")
    if codec == pb.DENSE:
        _expect(parts, 1, "a dense layer is one tensor")
        if tuple(parts[0].shape) != shape:
            raise PayloadError(f"dense tensor has shape {list(parts[0].shape)}, expected {list(shape)}")
        return parts[0]
    if codec == pb.TOPK:
        _expect(parts, 2, "top-k needs indices and values")
        indices, values = parts
        if indices.dtype != torch.int32 or values.dtype != torch.float32 or indices.dim() != 1 \
                or indices.shape != values.shape:
            raise PayloadError("top-k needs 1-D int32 indices and float32 values of equal length")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise PayloadError(f"top-k index out of range [0, {numel})")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise PayloadError("top-k indices must be strictly increasing")
        dense = torch.zeros(numel, dtype=torch.float32)
        dense[indices.long()] = values
        return dense.reshape(shape)
    if codec == pb.SIGN:
        _expect(parts, 2, "sign needs packed bits and a scale")
        bits, scale = parts
        if bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8 or scale.dtype != torch.float32 \
                or scale.numel() != 1:
            raise PayloadError(f"sign needs {(numel + 7) // 8} uint8 bytes and one float32 scale")
        signs = unpack_bits(bits, numel).to(torch.float32) * 2 - 1
        return (signs * scale).reshape(shape)
    if codec == pb.QSGD:
        _expect(parts, 2, "QSGD needs int8 levels and a scale")
        levels, scale = parts
        if levels.dtype != torch.int8 or levels.numel() != numel or scale.dtype != torch.float32 \
                or scale.numel() != 1:
            raise PayloadError(f"QSGD needs {numel} int8 levels and one float32 scale")
        return (levels.to(torch.float32) * scale).reshape(shape)
    if codec == pb.LOWRANK:
        _expect(parts, 2, "low rank needs two factors")
        p, q = parts
        rows = shape[0] if shape else 0
        if p.dtype != torch.float32 or q.dtype != torch.float32 or p.dim() != 2 or q.dim() != 2 \
                or p.shape[0] != rows or q.shape[0] * rows != numel or p.shape[1] != q.shape[1]:
            raise PayloadError(f"low-rank factors {list(p.shape)} x {list(q.shape)} do not fit shape {list(shape)}")
        return outer_product_sum(p, q).reshape(shape)
    raise AssertionError(f"codec {codec} is in PAYLOAD_TENSORS but not decoded")


def outer_product_sum(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P Q^T as the sum over the rank of the outer products p_j q_j^T, added in the order j = 0, 1, ...

    Elementwise multiplication and addition are correctly rounded IEEE operations, so these bits are
    the same on every CPU and thread count; a matrix product's are not (BLAS kernels choose their
    own summation order and fuse multiply-adds). Worker and server must agree bit for bit, because
    the result becomes the look-back gradient on both sides."""
    total = torch.zeros(p.shape[0], q.shape[0], dtype=torch.float32)
    for j in range(p.shape[1]):
        total = total + p[:, j:j + 1] * q[:, j:j + 1].t()
    return total


def _factorising_pays(shape: tuple[int, ...], rank: int) -> bool:
    """Rank-r factors of an m x n matrix cost r(m + n) values instead of mn; vectors never pay."""
    if len(shape) < 2:
        return False
    rows = shape[0]
    cols = math.prod(shape[1:])
    return rank * (rows + cols) < rows * cols


def _expect(parts: Sequence[torch.Tensor], count: int, what: str) -> None:
    if len(parts) != count:
        raise PayloadError(f"{what}; got {len(parts)} tensors")


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Booleans -> uint8, 8 per byte, most significant bit first."""
    padded = torch.zeros((bits.numel() + 7) // 8 * 8, dtype=torch.uint8, device=bits.device)
    padded[:bits.numel()] = bits.reshape(-1).to(torch.uint8)
    return (padded.reshape(-1, 8) * _BIT_WEIGHTS.to(bits.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    bits = (packed.reshape(-1, 1) & _BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(-1)[:count]


def _qsgd(flat: torch.Tensor, levels: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """QSGD (Alistarh et al. 2017): unbiased stochastic rounding of |g|/||g|| to `levels` levels."""
    norm = flat.norm()
    if norm == 0:
        return torch.zeros(flat.numel(), dtype=torch.int8), torch.zeros(1)
    scaled = flat.abs() / norm * levels
    lower = scaled.floor()
    uniform = torch.rand(flat.numel(), generator=generator).to(flat.device)
    rounded = lower + (uniform < (scaled - lower)).to(torch.float32)
    quantized = (torch.sign(flat) * rounded).clamp(-levels, levels).to(torch.int8)
    return quantized, (norm / levels).reshape(1).to(torch.float32)


def _power_iteration(matrix: torch.Tensor, rank: int, warm_q: torch.Tensor | None,
                     generator: torch.Generator) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """PowerSGD (Vogels et al. 2019): one power iteration, Q warm-started from the last round."""
    cols = matrix.shape[1]
    q = warm_q if warm_q is not None and warm_q.shape == (cols, rank) else \
        torch.randn(cols, rank, generator=generator).to(matrix.device)
    p, _ = torch.linalg.qr(matrix @ q)
    q = matrix.t() @ p
    return (p.contiguous(), q.contiguous()), q.clone()


def zero_payload(settings: CompressorSettings, shape: Sequence[int],
                 dense_dtype: torch.dtype) -> tuple[int, tuple[torch.Tensor, ...]]:
    """Codec and payload of an all-zero layer. Every codec's payload size depends only
    on the layer's shape, so this prices a full upload without a real gradient."""
    result = compress(settings, torch.zeros(tuple(shape)), None, torch.Generator().manual_seed(0), dense_dtype)
    return result.codec, result.parts
