"""The message streams of GetTask and SubmitUpdate, built and parsed.

Both directions use the same framing: a tensor's first part carries its meta
and first chunk, TensorChunk parts carry the rest. Parsing checks structure
only (order, completeness, duplicates, sizes); what an update means for the
model and the mirrors is judged by lbgm.server.updates.

Byte counts are the serialized size of each stream message plus gRPC's
5-byte length prefix: the application bytes on the wire (HTTP/2 frame
headers and TLS records are not included).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lbgm.common.codec import CodecError, TensorAssembler, split_chunks, tensor_meta, tensor_to_bytes
from lbgm.v1 import lbgm_pb2 as pb

GRPC_FRAME_BYTES = 5  # compressed-flag byte + 4-byte length before every message


class MalformedStream(ValueError):
    """A stream's messages are out of order, incomplete or inconsistent."""


def wire_size(message: pb.TaskPart | pb.UpdatePart) -> int:
    return message.ByteSize() + GRPC_FRAME_BYTES


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor turned into wire parts once, so it can be sent many times."""

    meta: pb.TensorMeta
    chunks: list[bytes]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> EncodedTensor:
        return cls(meta=tensor_meta(tensor), chunks=split_chunks(tensor_to_bytes(tensor)))


# ------------------------------------------------------------------ downlink


def task_parts(task: pb.RoundTask, model: Sequence[EncodedTensor]) -> Iterator[pb.TaskPart]:
    """RoundTask, then each model tensor (meta + first chunk, then the rest)."""
    yield pb.TaskPart(task=task)
    for index, encoded in enumerate(model):
        yield pb.TaskPart(tensor=pb.ModelTensor(index=index, meta=encoded.meta, data=encoded.chunks[0]))
        for chunk in encoded.chunks[1:]:
            yield pb.TaskPart(chunk=pb.TensorChunk(data=chunk))


@dataclass(frozen=True)
class ReceivedTask:
    task: pb.RoundTask
    tensors: list[torch.Tensor]


def read_task(parts: Iterable[pb.TaskPart], max_tensor_bytes: int) -> ReceivedTask | pb.Finished | None:
    """A complete task, Finished, or None when the server answered idle."""
    stream = iter(parts)
    first = next(stream, None)
    if first is None:
        raise MalformedStream("task stream ended before its first message")
    kind = first.WhichOneof("part")
    if kind == "idle":
        return None
    if kind == "finished":
        return first.finished
    if kind != "task":
        raise MalformedStream(f"task stream must start with a task, got {kind}")
    tensors = _assemble(stream, "tensor", max_tensor_bytes, expected_count=first.task.num_tensors)
    return ReceivedTask(task=first.task, tensors=[tensor for _, tensor in tensors])


def _assemble(
    stream: Iterator[pb.TaskPart], head_kind: str, max_tensor_bytes: int, expected_count: int
) -> list[tuple[pb.ModelTensor, torch.Tensor]]:
    out: list[tuple[pb.ModelTensor, torch.Tensor]] = []
    assembler: TensorAssembler | None = None
    head = None
    try:
        for part in stream:
            kind = part.WhichOneof("part")
            if kind == head_kind:
                if assembler is not None and not assembler.complete:
                    raise MalformedStream(f"tensor {head.index} ended after fewer bytes than announced")
                if assembler is not None:
                    out.append((head, assembler.tensor()))
                head = getattr(part, kind)
                assembler = TensorAssembler(head.meta, max_tensor_bytes)
                assembler.add(head.data)
            elif kind == "chunk" and assembler is not None:
                assembler.add(part.chunk.data)
            else:
                raise MalformedStream(f"unexpected {kind} part in a task stream")
        if assembler is not None:
            if not assembler.complete:
                raise MalformedStream(f"stream ended inside tensor {head.index}")
            out.append((head, assembler.tensor()))
    except CodecError as error:
        raise MalformedStream(str(error)) from error
    if len(out) != expected_count or [h.index for h, _ in out] != list(range(expected_count)):
        raise MalformedStream(f"task announced {expected_count} tensors, got indices {[h.index for h, _ in out]}")
    return out


# ------------------------------------------------------------------ uplink


@dataclass(frozen=True)
class FullLayer:
    layer: int
    lbg_version: int
    tensor: torch.Tensor  # already in the wire dtype: exactly what the LBG becomes


@dataclass(frozen=True)
class ScalarEntry:
    unit: int
    rho: float
    lbg_version: int


def update_parts(
    header: pb.UpdateHeader, full: Sequence[FullLayer], scalars: Sequence[ScalarEntry]
) -> Iterator[pb.UpdatePart]:
    """UpdateHeader, every full layer in chunks, then one packed ScalarUpdate."""
    yield pb.UpdatePart(header=header)
    for item in full:
        encoded = EncodedTensor.of(item.tensor)
        yield pb.UpdatePart(
            full=pb.FullGradient(layer=item.layer, lbg_version=item.lbg_version, meta=encoded.meta, data=encoded.chunks[0])
        )
        for chunk in encoded.chunks[1:]:
            yield pb.UpdatePart(chunk=pb.TensorChunk(data=chunk))
    if scalars:
        yield pb.UpdatePart(
            scalars=pb.ScalarUpdate(
                units=[s.unit for s in scalars],
                rhos=[s.rho for s in scalars],
                lbg_versions=[s.lbg_version for s in scalars],
            )
        )


@dataclass
class ReceivedUpdate:
    """A structurally valid upload, not yet checked against model or mirrors."""

    header: pb.UpdateHeader
    full: list[FullLayer] = field(default_factory=list)
    scalars: list[ScalarEntry] = field(default_factory=list)
    bytes_by_kind: dict[str, int] = field(default_factory=lambda: {"header": 0, "full": 0, "scalar": 0})

    @property
    def wire_bytes(self) -> int:
        return sum(self.bytes_by_kind.values())


def read_update_header(stream: Iterator[pb.UpdatePart]) -> ReceivedUpdate:
    """The first part must be the header: the server authenticates before reading on."""
    first = next(stream, None)
    if first is None or first.WhichOneof("part") != "header":
        found = "nothing" if first is None else first.WhichOneof("part")
        raise MalformedStream(f"an update must start with its header, got {found}")
    update = ReceivedUpdate(header=first.header)
    update.bytes_by_kind["header"] += wire_size(first)
    return update


def read_update_body(update: ReceivedUpdate, stream: Iterator[pb.UpdatePart], max_tensor_bytes: int) -> ReceivedUpdate:
    """Reads full layers and the scalar part after the header into `update`."""
    pending: tuple[pb.FullGradient, TensorAssembler] | None = None

    def finish_pending() -> None:
        if pending is None:
            return
        head, assembler = pending
        if not assembler.complete:
            raise MalformedStream(
                f"layer {head.layer} announced {head.meta.nbytes} bytes but its data ended early"
            )
        update.full.append(FullLayer(layer=head.layer, lbg_version=head.lbg_version, tensor=assembler.tensor()))

    try:
        for part in stream:
            kind = part.WhichOneof("part")
            size = wire_size(part)
            if kind == "full":
                finish_pending()
                pending = (part.full, TensorAssembler(part.full.meta, max_tensor_bytes))
                pending[1].add(part.full.data)
                update.bytes_by_kind["full"] += size
            elif kind == "chunk" and pending is not None:
                pending[1].add(part.chunk.data)
                update.bytes_by_kind["full"] += size
            elif kind == "scalars" and not update.scalars:
                finish_pending()
                pending = None
                update.scalars = _scalar_entries(part.scalars)
                update.bytes_by_kind["scalar"] += size
            else:
                raise MalformedStream(f"unexpected {kind} part in an update stream")
        finish_pending()
    except CodecError as error:
        raise MalformedStream(str(error)) from error
    return update


def _scalar_entries(scalars: pb.ScalarUpdate) -> list[ScalarEntry]:
    counts = {len(scalars.units), len(scalars.rhos), len(scalars.lbg_versions)}
    if len(counts) != 1 or not scalars.units:
        raise MalformedStream(
            f"ScalarUpdate columns differ in length or are empty: {len(scalars.units)} units, "
            f"{len(scalars.rhos)} rhos, {len(scalars.lbg_versions)} versions"
        )
    return [
        ScalarEntry(unit=unit, rho=rho, lbg_version=version)
        for unit, rho, version in zip(scalars.units, scalars.rhos, scalars.lbg_versions)
    ]
