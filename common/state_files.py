"""Tensor state on disk: LBG sets and models, written atomically.

A crash mid-write leaves the previous file intact (write to a temporary
file, fsync, rename). Files are loaded with `weights_only=True`, so they can
hold only tensors and plain containers, never arbitrary objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from lbgm.common.faults import crash_point
from lbgm.common.lookback import LookbackGradient


def save_atomic(path: Path, state: object, crash_label: str = "", durable: bool = True,
                in_memory: bool = True) -> None:
    """Replace `path` by `state` so that a crash or a full disk leaves the previous file as it was.

    The state is serialized in memory first: torch.save streaming into a file on a full disk fails
    with an opaque `enforce fail ... unexpected pos` and no path, while writing bytes gives the OS
    error (ENOSPC: No space left on device), raised again here with `path`. `in_memory=False` streams
    instead, for states larger than RAM should hold (memory-mapped tensors). The temporary file is
    removed on any failure. `durable=False` skips the fsync, for files a later step makes durable
    before anything trusts them. `crash_label` names this write's steps for the test hook (see faults).
    """
    buffer = io.BytesIO()
    if in_memory:
        torch.save(state, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as handle:
            if in_memory:
                handle.write(buffer.getbuffer())
            else:
                torch.save(state, handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from None
    except RuntimeError:  # torch.save streaming into a full disk
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise
    if crash_label:
        crash_point(f"{crash_label}.temp-written")
    os.replace(temporary, path)
    if crash_label:
        crash_point(f"{crash_label}.renamed")


def load(path: Path) -> object:
    return torch.load(path, weights_only=True)


def content_digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 (hex) over each tensor's dtype, shape and bytes: equal digests mean bit-identical tensors."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def lbgs_to_state(lbgs: dict[int, LookbackGradient]) -> dict[int, dict]:
    return {unit: {"version": lbg.version, "tensors": list(lbg.tensors)} for unit, lbg in lbgs.items()}


def lbgs_from_state(state: dict[int, dict]) -> dict[int, LookbackGradient]:
    return {int(unit): LookbackGradient(tuple(entry["tensors"]), int(entry["version"])) for unit, entry in state.items()}
