"""Properties of the tensor codec, the update stream, the update judge and the
compressors, checked on random inputs (hypothesis).

- Any tensor of a supported dtype and shape (0-d and empty included) survives
  bytes -> chunks of any size -> tensor bit for bit; every truncation or
  extension is refused with the codec's or the wire's own error type.
- Random well-formed uploads are accepted with a gradient and mirrors that are
  exactly what was sent; every kind of corruption is refused with its reason,
  and the judge never touches the mirrors it was given.
- Any stream at all (a plausible upload, randomly edited) ends in acceptance,
  MalformedStream or UpdateRejected: the errors the servicer turns into statuses.
- Each compressor's payload decodes to the layer's shape in float32 and has the
  size its wire format documents (lbgm.proto, enum Codec).
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lbgm.common.codec import (
    MAX_EXTENT, CodecError, PayloadAssembler, element_size, split_chunks, tensor_from_bytes, tensor_meta, tensor_to_bytes,
)
from lbgm.common.compressor_settings import COMPRESSORS
from lbgm.common.compressors import (
    PAYLOAD_TENSORS, CompressorSettings, compress, decode, pack_bits, unpack_bits, zero_payload,
)
from lbgm.common.lookback import LookbackGradient, decision_units, rebuild
from lbgm.common.wire import (
    EncodedTensor, FullLayer, MalformedStream, ReceivedUpdate, ScalarEntry, UploadLimits, read_task,
    read_update_body, read_update_header, task_parts, update_parts, wire_size,
)
from lbgm.server.updates import UpdateRejected, UploadRules, judge_update
from lbgm.v1 import lbgm_pb2 as pb

PROPERTY = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]
DENSE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # the run's possible wire dtypes


# ------------------------------------------------------------------ strategies


shapes = st.lists(st.integers(0, 5), max_size=4).map(tuple)  # () is 0-d; a 0 anywhere makes it empty


@st.composite
def tensors(draw, dtype=st.sampled_from(DTYPES), shape=shapes) -> torch.Tensor:
    """Any bit pattern the dtype can hold (NaN payloads and infinities included); bools are 0 or 1."""
    dtype, shape = draw(dtype), draw(shape)
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if size == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:
        raw = bytearray(byte & 1 for byte in raw)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)


def finite(shape: Sequence[int], dtype: torch.dtype, bound: float = 4.0):
    """Finite values that every dense wire dtype (float16 included) holds."""
    count = math.prod(shape)
    values = st.lists(st.floats(-bound, bound, width=16), min_size=count, max_size=count)
    return values.map(lambda v: torch.tensor(v, dtype=torch.float32).reshape(tuple(shape)).to(dtype))


float32s = st.floats(width=32)  # what a proto `float` can carry, NaN and Inf included


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and tensor_to_bytes(a) == tensor_to_bytes(b)


# ------------------------------------------------------------------ tensor codec


@PROPERTY
@given(tensor=tensors(), transpose=st.booleans())
def test_tensor_round_trips_bit_exactly(tensor, transpose):
    if transpose and tensor.dim() >= 2:
        tensor = tensor.transpose(0, 1)  # not contiguous: travels in logical order
    meta = tensor_meta(tensor)
    data = tensor_to_bytes(tensor)
    assert len(data) == meta.nbytes == tensor.numel() * tensor.element_size()
    back = tensor_from_bytes(data, meta)
    assert same_bits(back, tensor.contiguous())


@PROPERTY
@given(parts=st.lists(tensors(), min_size=1, max_size=4), chunk_bytes=st.integers(1, 64))
def test_payload_reassembles_from_chunks_of_any_size(parts, chunk_bytes):
    data = b"".join(tensor_to_bytes(t) for t in parts)
    chunks = split_chunks(data, chunk_bytes)
    assert b"".join(chunks) == data and chunks and all(len(c) <= chunk_bytes for c in chunks)
    assembler = PayloadAssembler([tensor_meta(t) for t in parts], max_bytes=len(data))
    for chunk in chunks:
        assembler.add(chunk)
    assert assembler.complete
    assert all(same_bits(a, b) for a, b in zip(assembler.tensors(), parts, strict=True))


@PROPERTY
@given(parts=st.lists(tensors(), min_size=1, max_size=3), chunk_bytes=st.integers(1, 64), data=st.data())
def test_truncated_or_extended_payload_raises_codec_error(parts, chunk_bytes, data):
    whole = b"".join(tensor_to_bytes(t) for t in parts)
    metas = [tensor_meta(t) for t in parts]
    extra = data.draw(st.binary(min_size=1, max_size=16), label="extra")
    with pytest.raises(CodecError, match="more arrived"):
        assembler = PayloadAssembler(metas, max_bytes=len(whole) + len(extra))
        for chunk in split_chunks(whole + extra, chunk_bytes):
            assembler.add(chunk)
    if whole:
        cut = data.draw(st.integers(0, len(whole) - 1), label="cut")
        assembler = PayloadAssembler(metas, max_bytes=len(whole))
        for chunk in split_chunks(whole[:cut], chunk_bytes):
            assembler.add(chunk)
        assert not assembler.complete
        with pytest.raises(CodecError):
            assembler.tensors()
    with pytest.raises(CodecError):
        tensor_from_bytes(tensor_to_bytes(parts[0]) + extra, metas[0])


small_changes = st.one_of(st.just(0), st.integers(-9, 9))


@PROPERTY
@given(tensor=tensors(), nbytes_change=small_changes, length_change=small_changes,
       dtype=st.one_of(st.none(), st.integers(-2, 14)),
       shape=st.one_of(st.none(), st.lists(st.integers(-2, 2**40), max_size=4)))
def test_bytes_decode_only_when_dtype_shape_and_sizes_all_agree(tensor, nbytes_change, length_change, dtype, shape):
    meta = tensor_meta(tensor)
    data = tensor_to_bytes(tensor)
    meta.nbytes = max(0, meta.nbytes + nbytes_change)
    data = data[:max(0, len(data) + length_change)] + b"\0" * max(0, length_change)
    if dtype is not None:
        meta.dtype = dtype
    if shape is not None:
        meta.shape[:] = shape
    try:
        size = math.prod(meta.shape) * element_size(meta.dtype)
    except CodecError:
        size = None  # a dtype the wire does not define
    agree = size is not None and min(meta.shape, default=0) >= 0 and size == len(data) == meta.nbytes \
        and math.prod(max(dim, 1) for dim in meta.shape) <= MAX_EXTENT  # torch's strides must not overflow
    try:
        decoded = tensor_from_bytes(data, meta)
    except CodecError:
        assert not agree, f"refused a consistent tensor: {meta}"
        return
    assert agree, f"decoded bytes that contradict their meta: {meta} with {len(data)} bytes"
    assert list(decoded.shape) == list(meta.shape) and tensor_meta(decoded).dtype == meta.dtype


# ------------------------------------------------------------------ update and task streams


def rechunk(parts: Sequence, chunk_bytes: int) -> list:
    """The same stream with every payload cut into chunk_bytes pieces (the wire allows any cut)."""
    out, pending = [], None

    def flush():
        if pending is not None:
            head, kind, pieces = pending
            cut = split_chunks(b"".join(pieces), chunk_bytes)
            head = type(head).FromString(head.SerializeToString())
            getattr(head, kind).data = cut[0]
            out.extend([head, *(type(head)(chunk=pb.TensorChunk(data=piece)) for piece in cut[1:])])

    for part in parts:
        kind = part.WhichOneof("part")
        if kind == "chunk":
            pending[2].append(part.chunk.data)
            continue
        flush()
        pending = (part, kind, [getattr(part, kind).data]) if kind in ("full", "buffer", "tensor") else None
        if pending is None:
            out.append(part)
    flush()
    return out


def over_the_wire(parts: Sequence) -> list:
    """Each message serialized and parsed again, as the receiver gets it."""
    return [type(part).FromString(part.SerializeToString()) for part in parts]


def data_of(part) -> bytes:
    return getattr(part, part.WhichOneof("part")).data


def with_data(part, data: bytes):
    changed = type(part).FromString(part.SerializeToString())
    getattr(changed, changed.WhichOneof("part")).data = data
    return changed


full_layers = st.sampled_from(list(pb.Codec.values())).flatmap(lambda codec: st.builds(
    FullLayer, layer=st.integers(0, 2**32 - 1), lbg_version=st.integers(0, 2**32 - 1), codec=st.just(codec),
    parts=st.lists(tensors(), min_size=PAYLOAD_TENSORS[codec], max_size=PAYLOAD_TENSORS[codec]).map(tuple)))
scalar_entries = st.builds(ScalarEntry, unit=st.integers(0, 2**32 - 1), rho=float32s,
                           lbg_version=st.integers(0, 2**32 - 1))
headers = st.builds(pb.UpdateHeader, worker_id=st.integers(0, 2**32 - 1), token=st.binary(max_size=16),
                    round=st.integers(0, 2**32 - 1), num_samples=st.integers(0, 2**64 - 1), train_loss=float32s)
update_streams = st.tuples(headers, st.lists(full_layers, max_size=3, unique_by=lambda full: full.layer),
                           st.lists(scalar_entries, max_size=3),
                           st.lists(tensors(), max_size=2), st.integers(1, 48)).map(
    lambda t: (t, over_the_wire(rechunk(list(update_parts(t[0], t[1], t[2], t[3])), t[4]))))


def read_update(parts) -> ReceivedUpdate:
    stream = iter(parts)
    return read_update_body(read_update_header(stream), stream, max_tensor_bytes=1 << 20)


@PROPERTY
@given(case=update_streams)
def test_update_stream_round_trips_for_any_chunking(case):
    (header, full, scalars, buffers, _), parts = case
    update = read_update(parts)
    assert update.header.SerializeToString() == header.SerializeToString()
    assert [(f.layer, f.lbg_version, f.codec) for f in update.full] == [(f.layer, f.lbg_version, f.codec) for f in full]
    for got, sent in zip(update.full, full, strict=True):
        assert all(same_bits(a, b) for a, b in zip(got.parts, sent.parts, strict=True))
    bits = lambda rho: struct.pack("<f", rho)  # noqa: E731 - NaN-safe equality
    assert [(s.unit, bits(s.rho), s.lbg_version) for s in update.scalars] == \
        [(s.unit, bits(s.rho), s.lbg_version) for s in scalars]
    assert sorted(update.buffers) == list(range(len(buffers)))
    assert all(same_bits(update.buffers[i], b) for i, b in enumerate(buffers))
    assert update.wire_bytes == sum(wire_size(part) for part in parts)


@PROPERTY
@given(case=update_streams, data=st.data())
def test_truncated_or_extended_update_stream_raises_malformed_stream(case, data):
    _, parts = case
    carrying = [i for i, p in enumerate(parts) if p.WhichOneof("part") in ("full", "buffer", "chunk")]
    non_empty = [i for i in carrying if data_of(parts[i])]
    chunks = [i for i, p in enumerate(parts) if p.WhichOneof("part") == "chunk"]
    options = (["extend"] * bool(carrying) + ["truncate"] * bool(non_empty)
               + ["drop chunk", "repeat chunk"] * bool(chunks))
    if not options:
        return  # no payload at all: nothing to cut
    how = data.draw(st.sampled_from(options), label="how")
    bad = list(parts)
    if how == "extend":
        index = data.draw(st.sampled_from(carrying), label="part")
        bad[index] = with_data(parts[index], data_of(parts[index]) + data.draw(st.binary(min_size=1, max_size=8)))
    elif how == "truncate":
        index = data.draw(st.sampled_from(non_empty), label="part")
        cut = data.draw(st.integers(0, len(data_of(parts[index])) - 1), label="cut")
        bad[index] = with_data(parts[index], data_of(parts[index])[:cut])
    else:
        index = data.draw(st.sampled_from(chunks), label="chunk")
        bad[index:index + 1] = [] if how == "drop chunk" else [parts[index]] * 2  # chunks are never empty
    with pytest.raises(MalformedStream):
        read_update(bad)


@PROPERTY
@given(model=st.lists(tensors(), min_size=1, max_size=3), chunk_bytes=st.integers(1, 48), data=st.data())
def test_task_stream_round_trips_and_refuses_a_cut(model, chunk_bytes, data):
    task = pb.RoundTask(round=3, num_tensors=len(model))
    parts = over_the_wire(rechunk(list(task_parts(task, [EncodedTensor.of(t) for t in model])), chunk_bytes))
    received = read_task(parts, max_tensor_bytes=1 << 20)
    assert received.task == task and all(same_bits(a, b) for a, b in zip(received.tensors, model, strict=True))
    carrying = [i for i, p in enumerate(parts) if p.WhichOneof("part") != "task" and data_of(p)]
    if carrying:
        index = data.draw(st.sampled_from(carrying), label="part")
        bad = list(parts)
        bad[index] = with_data(parts[index], data_of(parts[index])[:-1])
        with pytest.raises(MalformedStream):
            read_task(bad, max_tensor_bytes=1 << 20)


# ------------------------------------------------------------------ any stream through parser and judge


@st.composite
def payload_heads(draw) -> tuple[list[pb.TensorMeta], bytes]:
    """Metas that are mostly self-consistent, and bytes that mostly fit them."""
    metas = []
    for _ in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from([*range(1, 11), 0, 42]))
        shape = draw(st.lists(st.integers(-1, 4), max_size=3))
        honest = math.prod(shape) * (element_size(dtype) if dtype in range(1, 11) else 4)
        nbytes = draw(st.one_of(st.just(max(0, honest)), st.integers(0, 64)))
        metas.append(pb.TensorMeta(dtype=dtype, shape=shape, nbytes=nbytes))
    total = sum(meta.nbytes for meta in metas)
    return metas, draw(st.binary(min_size=max(0, total - 2), max_size=total + 2))


@st.composite
def any_part(draw) -> pb.UpdatePart:
    kind = draw(st.sampled_from(["full", "full", "full", "chunk", "scalars", "buffer", "header"]))
    if kind == "full":
        metas, data = draw(payload_heads())
        return pb.UpdatePart(full=pb.FullGradient(layer=draw(st.integers(0, 3)), lbg_version=draw(st.integers(0, 2)),
                                                  codec=draw(st.integers(0, 5)), parts=metas, data=data))
    if kind == "chunk":
        return pb.UpdatePart(chunk=pb.TensorChunk(data=draw(st.binary(max_size=16))))
    if kind == "scalars":
        column = lambda values: st.lists(values, max_size=3)  # noqa: E731 - columns may differ in length
        return pb.UpdatePart(scalars=pb.ScalarUpdate(units=draw(column(st.integers(0, 3))),
                                                     rhos=draw(column(float32s)),
                                                     lbg_versions=draw(column(st.integers(0, 2)))))
    if kind == "buffer":
        metas, data = draw(payload_heads())
        return pb.UpdatePart(buffer=pb.ModelTensor(index=draw(st.integers(0, 2)), meta=(metas or [None])[0],
                                                   data=data))
    return pb.UpdatePart(header=pb.UpdateHeader(round=1, num_samples=1))


FUZZ_RULES = UploadRules(layer_shapes=((2, 3), (3,)), units=((0,), (1,)), dense_dtype=torch.float32, codec=pb.TOPK)


@st.composite
def plausible_streams(draw) -> list[pb.UpdatePart]:
    """An upload for FUZZ_RULES (layer 0 dense or top-k, layer 1 dense or a scalar; any values,
    versions 0-2) with up to three random edits: a part inserted, a part dropped, bytes cut or added."""
    sometimes = lambda valid, other: st.one_of(valid, valid, valid, other)  # noqa: E731 - mostly valid
    value = sometimes(st.floats(-1e3, 1e3, width=32), float32s)
    values = lambda n: st.lists(value, min_size=n, max_size=n).map(torch.tensor)  # noqa: E731
    version = sometimes(st.just(1), st.integers(0, 2))
    if draw(st.booleans()):
        layer0 = FullLayer.dense(0, draw(version), draw(values(6)).reshape(2, 3))
    else:
        kept = sorted(draw(st.sets(st.integers(0, 5), min_size=1, max_size=6)))
        layer0 = FullLayer(0, draw(version), pb.TOPK,
                           (torch.tensor(kept, dtype=torch.int32), draw(values(len(kept)))))
    full, scalars = [layer0], []
    if draw(st.booleans()):
        full.append(FullLayer.dense(1, draw(version), draw(values(3))))
    else:
        scalars.append(ScalarEntry(1, draw(value), draw(version)))
    header = pb.UpdateHeader(round=1, num_samples=draw(sometimes(st.just(1), st.integers(0, 3))),
                             train_loss=draw(value))
    parts = list(update_parts(header, draw(st.permutations(full)), scalars))
    for _ in range(draw(sometimes(st.just(0), st.integers(1, 3)))):
        edit = draw(st.sampled_from(["insert", "drop", "cut", "add"]))
        index = draw(st.integers(1, len(parts)))
        if edit == "insert":
            parts.insert(index, draw(any_part()))
        elif index < len(parts) and edit == "drop":
            del parts[index]
        elif index < len(parts) and parts[index].WhichOneof("part") in ("full", "chunk", "buffer"):
            data = data_of(parts[index])
            parts[index] = with_data(parts[index], data[:-1] if edit == "cut" else data + b"\x7f")
    return parts


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=plausible_streams(), lbg_version=st.sampled_from([1, 1, 0, 2]))
def test_any_stream_is_accepted_or_refused_with_the_protocols_own_errors(parts, lbg_version):
    """Whatever the stream, the server's parse-then-judge path either accepts the upload or raises
    MalformedStream / UpdateRejected, which become precise statuses; never another error."""
    stream = iter(over_the_wire(parts))
    # A huge but finite LBG entry: any |rho| > 3.4 would rebuild it to Inf.
    mirrors = {1: LookbackGradient((torch.tensor([1.0, -2.0, 1e38]),), lbg_version)} if lbg_version else {}
    try:
        update = read_update_body(read_update_header(stream), stream, max_tensor_bytes=256, max_update_bytes=512,
                                  limits=UploadLimits(layers=2, buffers=0))
    except MalformedStream:
        event("malformed stream")
        return
    try:
        accepted = judge_update(update, 1, FUZZ_RULES, mirrors)
    except UpdateRejected as refused:
        assert refused.reason in (pb.ErrorDetail.MALFORMED, pb.ErrorDetail.STALE_LBG)
        event(f"refused: {pb.ErrorDetail.Reason.Name(refused.reason)}")
        return
    event("accepted")
    assert len(accepted.gradient) == 2 and all(bool(torch.isfinite(g).all()) for g in accepted.gradient)


# ------------------------------------------------------------------ the update judge


@dataclasses.dataclass
class Scenario:
    rules: UploadRules
    round_number: int
    mirrors: dict[int, LookbackGradient]
    update: ReceivedUpdate


@st.composite
def scenarios(draw, unit0: str | None = None) -> Scenario:
    """A well-formed upload: each unit in full, or as a scalar against the LBG the server holds.
    `unit0` forces unit 0 to go "full" or as a "scalar"."""
    layer_shapes = tuple(tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
                         for _ in range(draw(st.integers(1, 3))))
    units = tuple(decision_units(len(layer_shapes), draw(st.sampled_from(["layer", "model"]))))
    dense = draw(st.sampled_from(DENSE_DTYPES))
    rules = UploadRules(layer_shapes=layer_shapes, units=units, dense_dtype=dense, codec=pb.DENSE)
    round_number = draw(st.integers(2, 10_000))
    mirrors, full, scalars = {}, [], []
    for index, unit in enumerate(units):
        forced = unit0 if index == 0 else None
        if forced == "scalar" or (forced is None and draw(st.booleans())):
            mirrors[index] = LookbackGradient(tuple(draw(finite(layer_shapes[layer], dense)) for layer in unit),
                                              draw(st.integers(1, round_number - 1)))
        as_scalar = forced == "scalar" or (forced is None and index in mirrors and draw(st.booleans()))
        if as_scalar:
            rho = draw(st.floats(-1e3, 1e3, width=32))
            scalars.append(ScalarEntry(index, rho, mirrors[index].version))
        else:
            full += [FullLayer.dense(layer, round_number, draw(finite(layer_shapes[layer], dense))) for layer in unit]
    header = pb.UpdateHeader(worker_id=1, round=round_number, num_samples=draw(st.integers(1, 2**40)),
                             train_loss=draw(st.floats(0, 100, width=32)))
    update = ReceivedUpdate(header=header, full=draw(st.permutations(full)), scalars=draw(st.permutations(scalars)))
    return Scenario(rules, round_number, mirrors, update)


def snapshot(scenario: Scenario):
    """Everything judge_update must leave alone, as bytes."""
    mirrors = {unit: (id(lbg), lbg.version, [tensor_to_bytes(t) for t in lbg.tensors])
               for unit, lbg in scenario.mirrors.items()}
    sent = [(f.layer, f.lbg_version, [tensor_to_bytes(t) for t in f.parts]) for f in scenario.update.full]
    return mirrors, sent


@PROPERTY
@given(scenario=scenarios())
def test_well_formed_update_is_accepted_and_rebuilt_exactly(scenario):
    s, before = scenario, snapshot(scenario)
    accepted = judge_update(s.update, s.round_number, s.rules, s.mirrors)
    full = {f.layer: f.parts[0] for f in s.update.full}
    scalars = {e.unit: e for e in s.update.scalars}
    assert len(accepted.gradient) == len(s.rules.layer_shapes)
    for index, unit in enumerate(s.rules.units):
        if index in scalars:
            expected = rebuild(s.mirrors[index].tensors, scalars[index].rho)
            assert index not in accepted.new_mirrors
        else:
            expected = [full[layer].to(torch.float32) for layer in unit]
            mirror = accepted.new_mirrors[index]
            assert mirror.version == s.round_number  # stored as it travelled
            assert all(same_bits(a, full[layer]) for a, layer in zip(mirror.tensors, unit, strict=True))
        for layer, tensor in zip(unit, expected, strict=True):
            assert same_bits(accepted.gradient[layer], tensor)
    assert (accepted.full_units, accepted.scalar_units) == (len(s.rules.units) - len(scalars), len(scalars))
    assert accepted.floats_uploaded == sum(t.numel() for t in full.values()) + len(scalars)
    assert accepted.num_samples == s.update.header.num_samples
    assert snapshot(s) == before


def first_full_of_unit0(s: Scenario) -> int:
    return next(i for i, f in enumerate(s.update.full) if f.layer == s.rules.units[0][0])


def replace_full(s: Scenario, change: Callable[[FullLayer], FullLayer]) -> None:
    index = first_full_of_unit0(s)
    s.update.full[index] = change(s.update.full[index])


def poke(tensor: torch.Tensor, value: float, position: int) -> torch.Tensor:
    poked = tensor.clone().reshape(-1)
    poked[position % poked.numel()] = value
    return poked.reshape(tensor.shape)


# Each corruption: (what unit 0 must be, how to corrupt, expected reason, message fragment).
CORRUPTIONS = {
    "wrong shape": ("full", lambda s, d: replace_full(s, lambda f: dataclasses.replace(
        f, parts=(f.parts[0].reshape(-1) if f.parts[0].dim() > 1 else f.parts[0].reshape(1, -1),))),
        pb.ErrorDetail.MALFORMED, "shape"),
    "wrong dtype": ("full", lambda s, d: replace_full(s, lambda f: dataclasses.replace(f, parts=(f.parts[0].to(
        d.draw(st.sampled_from([t for t in (*DENSE_DTYPES, torch.float64) if t != s.rules.dense_dtype]))),))),
        pb.ErrorDetail.MALFORMED, "dtype"),
    "layer out of range": ("full", lambda s, d: replace_full(s, lambda f: dataclasses.replace(
        f, layer=len(s.rules.layer_shapes) + d.draw(st.integers(0, 2**31)))),
        pb.ErrorDetail.MALFORMED, "out of range"),
    "NaN or Inf": ("full", lambda s, d: replace_full(s, lambda f: dataclasses.replace(f, parts=(poke(
        f.parts[0], d.draw(st.sampled_from([math.nan, math.inf, -math.inf])), d.draw(st.integers(0, 99))),))),
        pb.ErrorDetail.MALFORMED, "NaN or Inf"),
    "wrong LBG version": ("full", lambda s, d: replace_full(s, lambda f: dataclasses.replace(
        f, lbg_version=d.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != s.round_number)))),
        pb.ErrorDetail.MALFORMED, "version"),
    "layer sent twice": ("full", lambda s, d: s.update.full.append(s.update.full[first_full_of_unit0(s)]),
                         pb.ErrorDetail.MALFORMED, "sent twice"),
    "layer missing": ("full", lambda s, d: s.update.full.pop(first_full_of_unit0(s)),
                      pb.ErrorDetail.MALFORMED, "either fully"),
    "full and scalar": ("full", lambda s, d: s.update.scalars.append(ScalarEntry(0, 1.0, 1)),
                        pb.ErrorDetail.MALFORMED, "either fully"),
    "scalar without mirror": ("scalar", lambda s, d: s.mirrors.pop(0), pb.ErrorDetail.STALE_LBG, "units [0]"),
    "scalar of another version": ("scalar", lambda s, d: s.mirrors.update({0: dataclasses.replace(
        s.mirrors[0], version=s.mirrors[0].version + d.draw(st.integers(1, 10)))}),
        pb.ErrorDetail.STALE_LBG, "units [0]"),
    "rho not finite": ("scalar", lambda s, d: s.update.scalars.__setitem__(0, dataclasses.replace(
        s.update.scalars[0], rho=d.draw(st.sampled_from([math.nan, math.inf, -math.inf])))),
        pb.ErrorDetail.MALFORMED, "not finite"),
    "rho overflowing the LBG": ("scalar", lambda s, d: (
        s.mirrors.update({0: dataclasses.replace(s.mirrors[0], tensors=(
            poke(s.mirrors[0].tensors[0], 2.0, 0), *s.mirrors[0].tensors[1:]))}),
        s.update.scalars.__setitem__(0, dataclasses.replace(s.update.scalars[0], rho=3e38))),
        pb.ErrorDetail.MALFORMED, "overflows"),
    "scalar unit out of range": ("scalar", lambda s, d: s.update.scalars.append(
        ScalarEntry(len(s.rules.units) + d.draw(st.integers(0, 2**31)), 1.0, 1)), pb.ErrorDetail.MALFORMED,
        "out of range"),
    "two scalars for a unit": ("scalar", lambda s, d: s.update.scalars.append(s.update.scalars[0]),
                               pb.ErrorDetail.MALFORMED, "two scalars"),
    "no samples": (None, lambda s, d: s.update.header.__setattr__("num_samples", 0),
                   pb.ErrorDetail.MALFORMED, "num_samples"),
    "loss not finite": (None, lambda s, d: s.update.header.__setattr__("train_loss", math.inf),
                        pb.ErrorDetail.MALFORMED, "train_loss"),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_update_is_refused_with_its_reason_and_touches_nothing(name, data):
    unit0, corrupt, reason, fragment = CORRUPTIONS[name]
    s = data.draw(scenarios(unit0), label="scenario")
    if unit0 == "scalar":  # the scalar for unit 0 goes first, so the corruptions can find it at index 0
        s.update.scalars.sort(key=lambda e: e.unit != 0)
    corrupt(s, data)
    before = snapshot(s)
    with pytest.raises(UpdateRejected, match=re.escape(fragment)) as refused:
        judge_update(s.update, s.round_number, s.rules, s.mirrors)
    assert refused.value.reason == reason
    if reason == pb.ErrorDetail.STALE_LBG:
        assert refused.value.stale_units == [0]
    assert snapshot(s) == before


# ------------------------------------------------------------------ compressors


def documented_payload_bytes(name: str, settings_: CompressorSettings, shape: tuple[int, ...]) -> tuple[int, int]:
    """(codec, payload bytes) as lbgm.proto's Codec comments describe the payload."""
    n = math.prod(shape)
    if name == "topk":
        return pb.TOPK, 8 * max(1, math.ceil(settings_.topk_fraction * n))  # int32 index + float32 value
    if name == "sign":
        return pb.SIGN, (n + 7) // 8 + 4  # packed bits + one float32 scale
    if name == "qsgd":
        return pb.QSGD, n + 4  # int8 levels + one float32 scale
    if name == "lowrank" and len(shape) >= 2:
        rows, cols, r = shape[0], n // shape[0], settings_.lowrank_rank
        if r * (rows + cols) < rows * cols:
            return pb.LOWRANK, 4 * r * (rows + cols)  # float32 P (rows x r) and Q (cols x r)
    return pb.DENSE, 4 * n  # the layer in float32


layer_shapes = st.lists(st.integers(1, 7), max_size=3).map(tuple)  # parameters are never empty


@PROPERTY
@given(name=st.sampled_from(COMPRESSORS), shape=layer_shapes, data=st.data(),
       fraction=st.floats(0.01, 1.0), levels=st.integers(1, 127), rank=st.integers(1, 3), seed=st.integers(0, 99))
def test_compressed_payload_decodes_to_the_layer_and_has_the_documented_size(name, shape, data, fraction, levels,
                                                                              rank, seed):
    settings_ = CompressorSettings(name=name, topk_fraction=fraction, quantization_levels=levels, lowrank_rank=rank)
    gradient = data.draw(finite(shape, torch.float32, bound=1e3), label="gradient")
    result = compress(settings_, gradient, None, torch.Generator().manual_seed(seed))
    codec, size = documented_payload_bytes(name, settings_, shape)
    assert result.codec == codec
    assert sum(tensor_meta(p).nbytes for p in result.parts) == size
    decoded = decode(result.codec, result.parts, shape)
    assert decoded.shape == shape and decoded.dtype == torch.float32 and same_bits(decoded, result.decoded)
    # The size depends on the shape alone: an all-zero layer prices the same upload.
    zero_codec, zero_parts = zero_payload(settings_, shape, torch.float32)
    assert zero_codec == result.codec
    assert [(p.dtype, p.shape) for p in zero_parts] == [(p.dtype, p.shape) for p in result.parts]
    # Through the wire: the server decodes exactly what the worker decoded.
    parts = list(update_parts(pb.UpdateHeader(), [FullLayer(0, 1, result.codec, result.parts)], []))
    assert sum(len(data_of(p)) for p in parts[1:]) == size
    received = read_update(parts).full[0]
    assert same_bits(decode(received.codec, received.parts, shape), result.decoded)


@PROPERTY
@given(shape=layer_shapes, data=st.data(), fraction=st.floats(0.01, 1.0))
def test_topk_keeps_the_largest_magnitudes_exactly(shape, data, fraction):
    gradient = data.draw(finite(shape, torch.float32, bound=1e3), label="gradient")
    result = compress(CompressorSettings(name="topk", topk_fraction=fraction), gradient, None, torch.Generator())
    indices, values = result.parts
    flat = gradient.reshape(-1)
    assert torch.equal(values, flat[indices.long()])
    dropped = torch.ones(flat.numel(), dtype=torch.bool)
    dropped[indices.long()] = False
    if dropped.any():
        assert flat[indices.long()].abs().min() >= flat[dropped].abs().max()


@PROPERTY
@given(bits=st.lists(st.booleans(), max_size=70))
def test_sign_bits_pack_msb_first_and_unpack(bits):
    packed = pack_bits(torch.tensor(bits, dtype=torch.bool))
    assert packed.dtype == torch.uint8 and packed.numel() == (len(bits) + 7) // 8
    assert unpack_bits(packed, len(bits)).tolist() == bits
    if bits:
        assert bool(packed[0] & 0x80) == bits[0]
