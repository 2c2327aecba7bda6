"""The message streams of GetTask and SubmitUpdate, built and parsed.

Both directions use the same framing: a payload's first part carries its
metas and first chunk, TensorChunk parts carry the rest. Parsing checks
structure only (order, completeness, sizes); what an update means for the
model and the mirrors is judged by lbgm.server.updates.

Byte counts are the serialized size of each stream message plus gRPC's
5-byte length prefix: the application bytes on the wire (HTTP/2 frame
headers and TLS records are not included).

The server reads uploads from the raw bytes of each message (the CallGuard
hands SubmitUpdate its messages undeserialized): a chunk part, nearly all of
an upload, is recognised by its bytes and its payload copied once, straight
into the tensor's buffer (`chunk_payload`); any other part is parsed as a
message. Tests and tools may pass parsed UpdatePart messages instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import torch
from google.protobuf.message import DecodeError

from lbgm.common.codec import (
    CodecError, PayloadAssembler, enum_name, payload_view, split_chunks, tensor_meta, tensor_to_bytes,
)
from lbgm.common.compressors import PAYLOAD_TENSORS
from lbgm.common.downlink import Delivered, DeliveredLookback, DeliveredScalar
from lbgm.v1 import lbgm_pb2 as pb

GRPC_FRAME_BYTES = 5  # compressed-flag byte + 4-byte length before every message
Part = TypeVar("Part", pb.TaskPart, pb.UpdatePart)
Chunk = TypeVar("Chunk", pb.UpdatePart, bytes)


class MalformedStream(ValueError):
    """A stream's messages are out of order, incomplete or inconsistent."""


def wire_size(message: pb.TaskPart | pb.UpdatePart) -> int:
    return message.ByteSize() + GRPC_FRAME_BYTES


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor turned into wire bytes once, so it can be sent many times."""

    meta: pb.TensorMeta
    chunks: list[bytes]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> EncodedTensor:
        return cls(meta=tensor_meta(tensor), chunks=split_chunks(tensor_to_bytes(tensor)))


def _model_tensor_parts(index: int, encoded: EncodedTensor, head: Callable[[pb.ModelTensor], Part],
                        chunk: Callable[[pb.TensorChunk], Part]) -> Iterator[Part]:
    yield head(pb.ModelTensor(index=index, meta=encoded.meta, data=encoded.chunks[0]))
    for data in encoded.chunks[1:]:
        yield chunk(pb.TensorChunk(data=data))


# ------------------------------------------------------------------ downlink


def task_parts(task: pb.RoundTask, model: Sequence[EncodedTensor]) -> Iterator[pb.TaskPart]:
    """RoundTask, then each model tensor (meta + first chunk, then the rest)."""
    yield pb.TaskPart(task=task)
    for index, encoded in enumerate(model):
        yield from _model_tensor_parts(index, encoded, lambda t: pb.TaskPart(tensor=t),
                                       lambda c: pb.TaskPart(chunk=c))


def update_task_parts(task: pb.RoundTask, items: Sequence[Delivered], buffers: Sequence[EncodedTensor],
                      first_buffer_index: int, encode: Callable[[torch.Tensor], EncodedTensor] = EncodedTensor.of,
                      ) -> Iterator[pb.TaskPart]:
    """RoundTask, then the global updates (per round: its look-backs in full, then one packed scalar
    message), then each buffer (update mode of the downlink). `encode` may reuse encodings."""
    yield pb.TaskPart(task=task)
    scalars: list[DeliveredScalar] = []

    def scalar_part() -> pb.TaskPart:
        return pb.TaskPart(downlink_scalars=pb.DownlinkScalars(
            round=scalars[0].round, layers=[s.layer for s in scalars], rhos=[s.rho for s in scalars],
            lbg_versions=[s.lbg_version for s in scalars]))

    for item in items:
        if scalars and item.round != scalars[0].round:
            yield scalar_part()
            scalars = []
        if isinstance(item, DeliveredScalar):
            scalars.append(item)
            continue
        encoded = encode(item.payload)
        yield pb.TaskPart(downlink_lookback=pb.DownlinkLookback(
            round=item.round, layer=item.layer, version=item.version, meta=encoded.meta, data=encoded.chunks[0]))
        for data in encoded.chunks[1:]:
            yield pb.TaskPart(chunk=pb.TensorChunk(data=data))
    if scalars:
        yield scalar_part()
    for index, encoded in enumerate(buffers, start=first_buffer_index):
        yield from _model_tensor_parts(index, encoded, lambda t: pb.TaskPart(tensor=t),
                                       lambda c: pb.TaskPart(chunk=c))


def task_part_kinds(parts: Iterable[pb.TaskPart], tensor_kind: str) -> Iterator[tuple[str, pb.TaskPart]]:
    """Each part of a GetTask answer with its kind for the byte counters: "task", "control" (idle,
    finished), `tensor_kind` for ModelTensor parts ("model" for the whole model, "update" for the
    buffers that go with updates), "update" for downlink look-backs, "scalar" for downlink scalars;
    a chunk counts as the payload it continues."""
    kinds = {"task": "task", "idle": "control", "finished": "control", "tensor": tensor_kind,
             "downlink_lookback": "update", "downlink_scalars": "scalar"}
    kind = "task"
    for part in parts:
        kind = kinds.get(part.WhichOneof("part"), kind)
        yield kind, part


@dataclass(frozen=True)
class ReceivedTask:
    task: pb.RoundTask
    tensors: list[torch.Tensor]  # parameters, then buffers; with model_updates, the buffers only
    updates: list[Delivered] = field(default_factory=list)  # with model_updates: the global updates, in order


def read_task(parts: Iterable[pb.TaskPart], max_tensor_bytes: int) -> ReceivedTask | pb.Finished | None:
    """A complete task, Finished, or None when the server answered idle. Downlink updates must come
    in round order within base_version + 1 .. model_version, a round's look-backs before its one
    scalar message, all before the buffers; whether they rebuild the model is the digest's to say."""
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
    task = first.task
    reader = _PayloadReader(max_tensor_bytes)
    tensors: list[torch.Tensor] = []
    updates: list[Delivered] = []
    position = (task.base_version, 1)  # (round, 1: look-backs may follow, 2: its scalars came)

    def advance(round_number: int, stage: int, what: str) -> None:
        nonlocal position
        if not task.model_updates or tensors:
            raise MalformedStream(f"unexpected {what} in a task stream" + (" after the buffers" if tensors else ""))
        in_order = (round_number, stage) > position or (round_number, stage) == position == (round_number, 1)
        if not (task.base_version < round_number <= task.model_version and in_order):
            raise MalformedStream(f"{what} of round {round_number} out of order (after round {position[0]}, "
                                  f"updates {task.base_version + 1}..{task.model_version})")
        position = (round_number, stage)

    def add_lookback(head: pb.DownlinkLookback, payload: list[torch.Tensor]) -> None:
        updates.append(DeliveredLookback(head.round, head.layer, head.version, payload[0]))

    for part in stream:
        kind = part.WhichOneof("part")
        if kind == "tensor":
            reader.start(part.tensor, [part.tensor.meta], part.tensor.data,
                         lambda head, payload: tensors.append(payload[0]))
        elif kind == "chunk":
            reader.add(part.chunk.data)
        elif kind == "downlink_lookback":
            reader.finish()
            head = part.downlink_lookback
            advance(head.round, 1, "downlink look-back")
            if head.version > head.round:
                raise MalformedStream(f"a look-back of version {head.version} in round {head.round}")
            reader.start(head, [head.meta], head.data, add_lookback)
        elif kind == "downlink_scalars":
            reader.finish()
            scalars = part.downlink_scalars
            advance(scalars.round, 2, "downlink scalars")
            if not scalars.layers or not len(scalars.layers) == len(scalars.rhos) == len(scalars.lbg_versions):
                raise MalformedStream(f"DownlinkScalars columns differ in length or are empty: {len(scalars.layers)} "
                                      f"layers, {len(scalars.rhos)} rhos, {len(scalars.lbg_versions)} versions")
            updates.extend(DeliveredScalar(scalars.round, layer, rho, version)
                           for layer, rho, version in zip(scalars.layers, scalars.rhos, scalars.lbg_versions))
        else:
            raise MalformedStream(f"unexpected {kind} part in a task stream")
    reader.finish()
    if len(tensors) != task.num_tensors:
        raise MalformedStream(f"task announced {task.num_tensors} tensors, got {len(tensors)}")
    return ReceivedTask(task=task, tensors=tensors, updates=updates)


class _PayloadReader:
    """Assembles one chunked payload at a time and hands it to a callback when complete."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._pending: tuple[object, PayloadAssembler, Callable] | None = None

    def start(self, head: object, metas: Sequence[pb.TensorMeta], data: bytes,
              done: Callable[[object, list[torch.Tensor]], None]) -> None:
        self.finish()
        try:
            assembler = PayloadAssembler(metas, self.max_bytes)
            assembler.add(data)
        except CodecError as error:
            raise MalformedStream(str(error)) from error
        self._pending = (head, assembler, done)

    def add(self, data: bytes | memoryview) -> None:
        if self._pending is None:
            raise MalformedStream("unexpected chunk: no payload was announced")
        if not data:  # every chunk moves its payload on, so chunks are bounded by the announced bytes
            raise MalformedStream("empty chunk: a TensorChunk must carry at least one byte")
        try:
            self._pending[1].add(data)
        except CodecError as error:
            raise MalformedStream(str(error)) from error

    def finish(self) -> None:
        if self._pending is None:
            return
        head, assembler, done = self._pending
        self._pending = None
        if not assembler.complete:
            raise MalformedStream(f"a payload announced {assembler.nbytes} bytes but its data ended early")
        try:
            done(head, assembler.tensors())
        except CodecError as error:
            raise MalformedStream(str(error)) from error


# ------------------------------------------------------------------ uplink


@dataclass(frozen=True)
class FullLayer:
    layer: int
    lbg_version: int
    codec: int  # pb.Codec
    parts: tuple[torch.Tensor, ...]  # the payload exactly as it travels

    @classmethod
    def dense(cls, layer: int, lbg_version: int, tensor: torch.Tensor) -> FullLayer:
        return cls(layer, lbg_version, pb.DENSE, (tensor,))


@dataclass(frozen=True)
class ScalarEntry:
    unit: int
    rho: float
    lbg_version: int


def _update_stream(
    header: pb.UpdateHeader, full: Sequence[FullLayer], scalars: Sequence[ScalarEntry],
    buffers: Sequence[torch.Tensor], chunk_part: Callable[[memoryview], Chunk],
) -> Iterator[pb.UpdatePart | Chunk]:
    """UpdateHeader, every full layer in chunks, one packed ScalarUpdate, then model buffers; the
    TensorChunk parts of full layers, nearly all of an upload's bytes, are made by `chunk_part`."""
    yield pb.UpdatePart(header=header)
    for item in full:
        chunks = split_chunks(payload_view(item.parts))
        yield pb.UpdatePart(full=pb.FullGradient(
            layer=item.layer, lbg_version=item.lbg_version, codec=item.codec,
            parts=[tensor_meta(part) for part in item.parts], data=bytes(chunks[0])))
        for chunk in chunks[1:]:
            yield chunk_part(chunk)
    if scalars:
        yield pb.UpdatePart(scalars=pb.ScalarUpdate(
            units=[s.unit for s in scalars], rhos=[s.rho for s in scalars],
            lbg_versions=[s.lbg_version for s in scalars]))
    for index, buffer in enumerate(buffers):
        yield from _model_tensor_parts(index, EncodedTensor.of(buffer), lambda t: pb.UpdatePart(buffer=t),
                                       lambda c: pb.UpdatePart(chunk=c))


def update_parts(
    header: pb.UpdateHeader, full: Sequence[FullLayer], scalars: Sequence[ScalarEntry],
    buffers: Sequence[torch.Tensor] = (),
) -> Iterator[pb.UpdatePart]:
    """One upload as messages (for tests, tools and accounting)."""
    return _update_stream(header, full, scalars, buffers,
                          lambda data: pb.UpdatePart(chunk=pb.TensorChunk(data=bytes(data))))


def serialized_update_parts(
    header: pb.UpdateHeader, full: Sequence[FullLayer], scalars: Sequence[ScalarEntry],
    buffers: Sequence[torch.Tensor] = (),
) -> Iterator[bytes]:
    """The same upload already serialized, for `submit_update_call`: chunk parts are encoded straight
    from the tensor's memory in one copy, where building and serializing messages takes three."""
    for part in _update_stream(header, full, scalars, buffers, encode_chunk_part):
        yield part if isinstance(part, bytes) else part.SerializeToString()


def _key(field: int) -> bytes:
    """A length-delimited field's key in protobuf's wire format."""
    return _varint(field << 3 | 2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_CHUNK_KEY = _key(pb.UpdatePart.DESCRIPTOR.fields_by_name["chunk"].number)
_CHUNK_DATA_KEY = _key(pb.TensorChunk.DESCRIPTOR.fields_by_name["data"].number)


def encode_chunk_part(data: memoryview) -> bytes:
    """UpdatePart(chunk=TensorChunk(data=data)).SerializeToString(), byte for byte, with one copy of data."""
    inner = [_CHUNK_DATA_KEY, _varint(len(data)), data]
    inner_bytes = sum(len(piece) for piece in inner)
    return b"".join([_CHUNK_KEY, _varint(inner_bytes), *inner])


def _read_varint(data: bytes, position: int) -> tuple[int, int] | None:
    """(value, position after it) of the minimally encoded varint at `position`; None for anything else
    (a truncated, padded or overlong one)."""
    value = shift = 0
    for index in range(position, min(len(data), position + 10)):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value, index + 1) if byte or index == position else None
        shift += 7
    return None


def chunk_payload(message: bytes) -> memoryview | None:
    """The data of a serialized UpdatePart holding only a TensorChunk, as a view into `message`, when
    it is encoded as protobuf encodes it (encode_chunk_part's form: each field once, minimal lengths),
    so that its size is its ByteSize; None for any other message, which is then parsed as one."""
    if not message.startswith(_CHUNK_KEY):
        return None
    outer = _read_varint(message, len(_CHUNK_KEY))
    if outer is None or outer[1] + outer[0] != len(message) \
            or not message.startswith(_CHUNK_DATA_KEY, outer[1]):
        return None
    inner = _read_varint(message, outer[1] + len(_CHUNK_DATA_KEY))
    if inner is None or inner[1] + inner[0] != len(message):
        return None
    return memoryview(message)[inner[1]:]


SUBMIT_UPDATE_METHOD = f"/{pb.DESCRIPTOR.services_by_name['Aggregator'].full_name}/SubmitUpdate"


def submit_update_call(channel: grpc.Channel) -> grpc.StreamUnaryMultiCallable:
    """Aggregator.SubmitUpdate taking `serialized_update_parts` as they are (the generated stub would
    serialize messages itself); the server sees the very same messages."""
    return channel.stream_unary(SUBMIT_UPDATE_METHOD, request_serializer=lambda part: part,
                                response_deserializer=pb.UpdateAck.FromString)


@dataclass
class ReceivedUpdate:
    """A structurally valid upload, not yet checked against model or mirrors."""

    header: pb.UpdateHeader
    full: list[FullLayer] = field(default_factory=list)
    scalars: list[ScalarEntry] = field(default_factory=list)
    buffers: dict[int, torch.Tensor] = field(default_factory=dict)
    bytes_by_kind: dict[str, int] = field(default_factory=lambda: {"header": 0, "full": 0, "scalar": 0})

    @property
    def wire_bytes(self) -> int:
        return sum(self.bytes_by_kind.values())


UploadMessage = pb.UpdatePart | bytes  # a parsed part, or one message's bytes as gRPC received them


def _upload_parts(stream: Iterator[UploadMessage]) -> Iterator[tuple[str, pb.UpdatePart | bytes | memoryview, int]]:
    """Each part as (kind, the part or, for a chunk, its data, its bytes on the wire). Draws one message
    per part, so the header can be read before the rest of the stream."""
    for message in stream:
        if isinstance(message, bytes):
            data = chunk_payload(message)
            if data is not None:
                yield "chunk", data, len(message) + GRPC_FRAME_BYTES
                continue
            try:
                message = pb.UpdatePart.FromString(message)
            except DecodeError as error:
                raise MalformedStream(f"an update part is not a valid UpdatePart message: {error}") from None
        kind = message.WhichOneof("part")
        yield kind, message.chunk.data if kind == "chunk" else message, wire_size(message)


def read_update_header(stream: Iterator[UploadMessage]) -> ReceivedUpdate:
    """The first part must be the header: the server authenticates before reading on."""
    kind, first, size = next(_upload_parts(stream), (None, None, 0))
    if kind != "header":
        raise MalformedStream(f"an update must start with its header, got {kind or 'nothing'}")
    update = ReceivedUpdate(header=first.header)
    update.bytes_by_kind["header"] += size
    return update


@dataclass(frozen=True)
class UploadLimits:
    """How many payloads an upload may list, from the model it updates: at most one FullGradient per
    layer and one buffer message per model buffer, each layer index in [0, layers) and each buffer
    index in [0, buffers). With the byte limits, the codec's tensor count per payload and non-empty
    chunks, they bound what one upload can make the receiver hold and how many parts it may have."""

    layers: int
    buffers: int


def read_update_body(update: ReceivedUpdate, stream: Iterator[UploadMessage], max_tensor_bytes: int,
                     max_update_bytes: int | None = None, limits: UploadLimits | None = None) -> ReceivedUpdate:
    """Reads full layers, the scalar part and buffers after the header into `update`.

    `max_update_bytes` bounds the payload bytes announced by the whole stream and `limits` the
    number of payloads, so a sender repeating or inventing parts cannot make the receiver buffer
    without limit. Without `limits` (tools and tests that know no model) indices are not bounded
    here; judge_update checks them against the model."""
    reader = _PayloadReader(max_tensor_bytes)
    current_kind = "full"
    announced = 0
    layers_seen: set[int] = set()
    buffers_seen: set[int] = set()

    def announce(metas: Sequence[pb.TensorMeta]) -> None:
        nonlocal announced
        announced += sum(meta.nbytes for meta in metas)
        if max_update_bytes is not None and announced > max_update_bytes:
            raise MalformedStream(f"update announces {announced} payload bytes so far, "
                                  f"more than the limit of {max_update_bytes} for one upload")

    def add_full(head: pb.FullGradient, payload: list[torch.Tensor]) -> None:
        update.full.append(FullLayer(head.layer, head.lbg_version, head.codec, tuple(payload)))

    def add_buffer(head: pb.ModelTensor, payload: list[torch.Tensor]) -> None:
        update.buffers[head.index] = payload[0]

    def check_full(head: pb.FullGradient) -> None:
        """Before any of its bytes are buffered: a known codec, its number of tensors, a new layer."""
        if head.codec not in PAYLOAD_TENSORS:
            raise MalformedStream(f"layer {head.layer} uses codec {enum_name(pb.Codec, head.codec)}, "
                                  f"known codecs are {sorted(map(pb.Codec.Name, PAYLOAD_TENSORS))}")
        if len(head.parts) != PAYLOAD_TENSORS[head.codec]:
            raise MalformedStream(f"layer {head.layer}'s {pb.Codec.Name(head.codec)} payload lists "
                                  f"{len(head.parts)} tensors, expected {PAYLOAD_TENSORS[head.codec]}")
        if limits is not None and head.layer >= limits.layers:
            raise MalformedStream(f"layer {head.layer} out of range [0, {limits.layers})")
        if head.layer in layers_seen:
            raise MalformedStream(f"layer {head.layer} sent twice")
        layers_seen.add(head.layer)

    def check_buffer(head: pb.ModelTensor) -> None:
        if limits is not None and head.index >= limits.buffers:
            raise MalformedStream(f"buffer {head.index} out of range [0, {limits.buffers}): "
                                  f"the model has {limits.buffers} buffers")
        if head.index in buffers_seen:
            raise MalformedStream(f"buffer {head.index} sent twice")
        buffers_seen.add(head.index)

    for kind, part, size in _upload_parts(stream):
        if kind == "full":
            current_kind = "full"
            check_full(part.full)
            announce(part.full.parts)
            reader.start(part.full, part.full.parts, part.full.data, add_full)
        elif kind == "buffer":
            current_kind = "buffer"
            check_buffer(part.buffer)
            announce([part.buffer.meta])
            reader.start(part.buffer, [part.buffer.meta], part.buffer.data, add_buffer)
        elif kind == "chunk":  # continues the payload being read, and counts as its kind
            reader.add(part)
        elif kind == "scalars" and not update.scalars:
            reader.finish()
            current_kind = "scalar"
            update.scalars = _scalar_entries(part.scalars)
        else:
            raise MalformedStream(f"unexpected {kind} part in an update stream")
        update.bytes_by_kind[current_kind] = update.bytes_by_kind.get(current_kind, 0) + size
    reader.finish()
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
