"""Why the downlink LBGM sends a layer in full: the global update turned, or the residual tipped it.

The server's downlink decision per layer tests U = D_raw + e against the look-back L, where D_raw is
the round's wanted global update (candidate - previous) and e the residual that earlier scalar rounds
left out (error feedback, common/downlink.py). A full broadcast of a layer that has a look-back has one
of two causes, told apart by testing D_raw alone against L with the same threshold:

- turned: D_raw itself is not parallel enough to L (1 - cos^2(D_raw, L) > delta);
- tipped: D_raw would have passed, the residual carried in made U fail.

The federation runs in this process (lbgm.sim.federation.simulate: the same trainer, encoder, judge,
aggregation and downlink as the gRPC system) once per downlink dtype, with a ServerDownlink that
records, before each round's broadcast, both tests and the residual's share of U (|e|^2 / |U|^2).
Shares are weighted by floats, since a layer's bytes are what a decision costs. Writes a JSON file,
a markdown table on stdout and a plot of the largest layer's two test values round by round.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lbgm.common.downlink import Broadcast
from lbgm.common.lookback import decide
from lbgm.experiment.config import ConfigError, ExperimentConfig, load_config
from lbgm.server.downlink import ServerDownlink
from lbgm.sim.federation import simulate

from bench.common import chart, markdown_table, run_info, run_main, write_json

CAUSES = ("first", "turned", "tipped")  # why a layer went in full: no look-back yet, or the two above


def phase_error(update: torch.Tensor, lookback: torch.Tensor) -> float:
    """1 - cos^2(update, lookback), LBGM's test value (delta = 1 only makes decide return it)."""
    return decide([update], [lookback], 1.0).phase_error


class RecordingDownlink(ServerDownlink):
    """The server's downlink, unchanged, plus one record per layer and round of what it decided and why."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[dict[str, Any]] = []

    def step(self, number: int, previous: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor] | None,
             buffers: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], Broadcast]:
        tests = [] if candidate is None else [
            self._tests(before, after, held, carried)
            for before, after, held, carried in zip(previous, candidate, self.state.lookbacks, self.state.residual,
                                                    strict=True)]
        params, broadcast = super().step(number, previous, candidate, buffers)
        for layer, test in zip(broadcast.layers, tests, strict=True):
            self.records.append({"round": number, "layer": layer.layer, "full": layer.full, **test})
        return params, broadcast

    @staticmethod
    def _tests(before: torch.Tensor, after: torch.Tensor, held: Any, carried: torch.Tensor) -> dict[str, Any]:
        raw = after.to(torch.float32) - before.to(torch.float32)
        wanted = raw + carried
        wanted_norm = float(wanted.pow(2).sum())
        return {
            "floats": raw.numel(),
            "raw_error": None if held is None else phase_error(raw, held.tensor),
            "wanted_error": None if held is None else phase_error(wanted, held.tensor),
            "residual_share": float(carried.pow(2).sum()) / wanted_norm if wanted_norm > 0 else 0.0,
        }


def cause(record: dict[str, Any], delta: float) -> str | None:
    """Why a full layer went in full (None for a scalar)."""
    if not record["full"]:
        return None
    if record["raw_error"] is None:
        return "first"
    return "turned" if record["raw_error"] > delta else "tipped"


def summarize(records: list[dict[str, Any]], delta: float) -> dict[str, Any]:
    """Float-weighted shares of the layer-rounds: sent as scalars, and sent in full by cause."""
    total = sum(r["floats"] for r in records)
    by_cause = {name: sum(r["floats"] for r in records if cause(r, delta) == name) / total for name in CAUSES}
    scalars = [r for r in records if not r["full"]]
    later = [r for r in records if r["raw_error"] is not None]
    return {
        "layer_rounds": len(records),
        "scalar_layer_rounds": len(scalars),
        "floats_sent_in_full": sum(by_cause.values()),
        "full_by_cause": by_cause,
        "would_pass_without_residual": sum(r["floats"] for r in later if r["raw_error"] <= delta) / total,
        "mean_residual_share_at_full": weighted_mean([r for r in later if r["full"]], "residual_share"),
        "mean_residual_share_at_scalar": weighted_mean(scalars, "residual_share"),
    }


def weighted_mean(records: list[dict[str, Any]], key: str) -> float | None:
    floats = sum(r["floats"] for r in records)
    return sum(r[key] * r["floats"] for r in records) / floats if floats else None


def measure(config: ExperimentConfig, dtypes: list[str]) -> dict[str, Any]:
    """One simulated federation per downlink dtype: its per-layer records, summary and final accuracy."""
    results = {}
    for dtype in dtypes:
        started = time.monotonic()
        simulation = simulate(replace(config, downlink_dtype=dtype), evaluate_every_round=False,
                              downlink_type=RecordingDownlink)
        assert isinstance(simulation.downlink, RecordingDownlink)
        records = simulation.downlink.records
        results[dtype] = {"summary": summarize(records, config.downlink_delta), "records": records,
                          "final_accuracy": simulation.rounds[-1].get("test_accuracy"),
                          "seconds": time.monotonic() - started}
        print(f"{dtype}: {len(records)} layer-rounds in {results[dtype]['seconds']:.0f} s", flush=True)
    return results


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(results: dict[str, Any]) -> str:
    rows = []
    for dtype, result in results.items():
        summary = result["summary"]
        causes = summary["full_by_cause"]
        rows.append([dtype, f"{result['final_accuracy']:.4f}", percent(summary["floats_sent_in_full"]),
                     percent(causes["first"]), percent(causes["turned"]), percent(causes["tipped"]),
                     percent(summary["would_pass_without_residual"]),
                     percent(summary["mean_residual_share_at_scalar"]), percent(summary["mean_residual_share_at_full"])])
    return markdown_table(["downlink dtype", "final acc.", "floats sent in full", "first", "turned", "tipped",
                           "raw update would pass", "residual share at scalars", "residual share at full"], rows)


def plot(results: dict[str, Any], delta: float, path: Path) -> None:
    """The largest layer's test values round by round, per dtype: U (with the residual) and D_raw alone."""
    first = next(iter(results.values()))["records"]
    largest = max(first, key=lambda r: r["floats"])["layer"]
    with chart(path, f"Downlink decisions of the largest layer ({largest}); full when 1 - cos^2(U, L) > delta",
               "round", "1 - cos^2 against the look-back") as axes:
        for dtype, result in results.items():
            layer = [r for r in result["records"] if r["layer"] == largest and r["raw_error"] is not None]
            rounds = [r["round"] for r in layer]
            line, = axes.plot(rounds, [r["wanted_error"] for r in layer], linewidth=0.8, label=f"U = D_raw + e, {dtype}")
            axes.plot(rounds, [r["raw_error"] for r in layer], linewidth=0.8, linestyle=":", color=line.get_color(),
                      label=f"D_raw alone, {dtype}")
            full = [r for r in layer if r["full"]]
            axes.scatter([r["round"] for r in full], [r["wanted_error"] for r in full], s=6, color=line.get_color())
        axes.axhline(delta, color="black", linewidth=0.8, label=f"delta = {delta}")
        axes.set_ylim(0, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.downlink_decisions", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run from the repository root. Example: python -m bench.downlink_decisions --rounds 50")
    parser.add_argument("--config", type=Path, default=None, metavar="TOML",
                        help="experiment settings (default: the README's default job)")
    parser.add_argument("--data-dir", default=None, metavar="DIR", help="overrides the config's data_dir")
    parser.add_argument("--rounds", type=int, default=None, metavar="R", help="overrides the config's rounds")
    parser.add_argument("--delta", type=float, default=0.2, help="uplink LBGM threshold (default: 0.2)")
    parser.add_argument("--downlink-delta", type=float, default=0.2,
                        help="downlink LBGM threshold, above 0 (default: 0.2)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=("float32", "float16"),
                        metavar="DTYPE", help="downlink dtypes, one federation each (default: float32 float16)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench/downlink-decisions"), metavar="DIR",
                        help="where decisions.json and decisions.png go (default: runs/bench/downlink-decisions)")
    args = parser.parse_args(argv)
    if not 0 < args.downlink_delta <= 1:
        parser.error(f"--downlink-delta must lie in (0, 1], got {args.downlink_delta}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = {key: value for key, value in {"data_dir": args.data_dir, "rounds": args.rounds}.items()
                 if value is not None}
    try:
        config = load_config(args.config, {**overrides, "delta": args.delta, "downlink_delta": args.downlink_delta})
    except ConfigError as error:
        raise SystemExit(f"downlink_decisions: {error}") from None
    info = run_info()
    results = measure(config, args.dtypes)
    print(table(results))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot(results, config.downlink_delta, args.out_dir / "decisions.png")
    write_json(args.out_dir / "decisions.json", {"benchmark": "downlink_decisions", **info,
                                                "config": config.name, "rounds": config.rounds,
                                                "delta": config.delta, "downlink_delta": config.downlink_delta,
                                                "results": results})
    print(f"\nwrote {args.out_dir / 'decisions.json'} and decisions.png")


if __name__ == "__main__":
    run_main(main)
