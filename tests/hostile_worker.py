"""A worker process that tries to destroy the global model with well-formed uploads.

It is a real VirtualWorker (real gRPC, the real join, task and upload protocol,
including STALE_LBG resends); only its encoder lies. Every round it is sampled:

  huge        every layer in full, every value 1e30 (finite in float32, so the
              server's NaN/Inf check lets it through);
  scaled-lbg  every layer in full with every value 1e-30 (this becomes its LBG),
              then, every later round, one scalar per unit with rho = 1e38 against
              that LBG: rho * LBG = 1e8 per value, which passes the server's
              overflow check, in 40 bytes of upload.

Run: python tests/hostile_worker.py --server HOST:PORT --name NAME --attack huge
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Collection, Sequence

import torch

from lbgm.common.wire import ScalarEntry
from lbgm.v1 import lbgm_pb2_grpc as pb_grpc
from lbgm.worker.client import RetryPolicy, VirtualWorker
from lbgm.worker.encoder import EncodedRound, LbgmEncoder

ATTACKS = ("huge", "scaled-lbg")
HUGE = 1e30
TINY_LBG = 1e-30
HUGE_RHO = 1e38


class HostileEncoder(LbgmEncoder):
    """An encoder that ignores the gradient and sends the attack instead."""

    def __init__(self, honest: LbgmEncoder, attack: str) -> None:
        super().__init__(honest.units, honest.compressor)
        self.attack = attack

    def encode(self, gradient: Sequence[torch.Tensor], round_number: int, delta: float, wire_dtype: torch.dtype,
               force_full: Collection[int] = (), error_feedback: bool = False) -> EncodedRound:
        armed = self.attack == "scaled-lbg" and not force_full and len(self.lbgs) == len(self.units)
        if armed:  # every unit's LBG is the tiny one: blow it up with scalars alone
            full_round = super().encode(gradient, round_number, 0.0, wire_dtype)
            scalars = [ScalarEntry(unit=unit, rho=HUGE_RHO, lbg_version=self.lbgs[unit].version)
                       for unit in range(len(self.units))]
            return dataclasses.replace(full_round, full=[], scalars=scalars, new_lbgs={}, memory={}, warm_q={})
        value = HUGE if self.attack == "huge" else TINY_LBG
        return super().encode([torch.full_like(g, value) for g in gradient], round_number, 0.0, wire_dtype)


class HostileWorker(VirtualWorker):
    def __init__(self, attack: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attack = attack

    def join(self, stub: pb_grpc.AggregatorStub) -> None:
        super().join(stub)
        if not isinstance(self.encoder, HostileEncoder):
            self.encoder = HostileEncoder(self.encoder, self.attack)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="HOST:PORT")
    parser.add_argument("--name", required=True)
    parser.add_argument("--attack", choices=ATTACKS, required=True)
    parser.add_argument("--poll-seconds", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    worker = HostileWorker(args.attack, args.name, args.server, poll_seconds=args.poll_seconds,
                           retry=RetryPolicy(give_up_seconds=30.0))
    stats = worker.run()
    logging.info("%s (%s): %d uploads accepted, %d refused", args.name, args.attack, stats.rounds,
                 stats.refused_rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
