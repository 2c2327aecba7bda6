"""A worker's own state as of each round the server may still return to.

A server that crashes resumes from its last checkpoint, and redoes the rounds
after it. A worker that kept its later state would send something else in a
redone round than in the first attempt: its error-feedback memory would
already hold the lost round's residual, its PowerSGD warm start and minibatch
position would have moved on. So the worker records a snapshot after every
upload the server accepted, forgets those older than the server's last
checkpoint (RoundTask.checkpointed_round), and on (re)join returns to the
snapshot of the last round the server holds from it
(JoinReply.last_accepted_round). Snapshots are shallow, so one costs only the
tensors that changed in its round (with error feedback: one model copy).
"""

from __future__ import annotations

from dataclasses import dataclass

from lbgm.worker.encoder import EncoderState
from lbgm.worker.trainer import BatchPosition


@dataclass(frozen=True)
class WorkerSnapshot:
    encoder: EncoderState
    batches: BatchPosition


class StateHistory:
    """Snapshots by round: the state right after that round's upload was accepted."""

    def __init__(self) -> None:
        self._snapshots: dict[int, WorkerSnapshot] = {}

    def rounds(self) -> list[int]:
        return sorted(self._snapshots)

    def record(self, round_number: int, snapshot: WorkerSnapshot) -> None:
        self._snapshots[round_number] = snapshot

    def forget_before(self, checkpointed_round: int) -> None:
        """Keep the newest snapshot at or before the server's last checkpoint, and every later one:
        a crash can take the server back to that checkpoint, never further."""
        floor = max((r for r in self._snapshots if r <= checkpointed_round), default=None)
        if floor is not None:
            self._snapshots = {r: s for r, s in self._snapshots.items() if r >= floor}

    def restart_at(self, round_number: int, snapshot: WorkerSnapshot) -> None:
        """Forget every snapshot: `snapshot` is the state as of `round_number` from now on."""
        self._snapshots = {round_number: snapshot}

    def rewind(self, round_number: int) -> WorkerSnapshot | None:
        """The snapshot of `round_number`, forgetting every later one (the server lost those rounds);
        None if there is none (then nothing is forgotten)."""
        snapshot = self._snapshots.get(round_number)
        if snapshot is not None:
            self._snapshots = {r: s for r, s in self._snapshots.items() if r <= round_number}
        return snapshot
