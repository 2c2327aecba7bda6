"""Score finished runs of the diabetes task: RMSE and R^2 of each run's final model on the held-out
test patients and on the workers' validation patients, next to its uplink bytes and the savings
against the delta = 0 run of the same settings in the same set.

    python examples/tabular/score.py runs/sweeps/tabular     # a folder of run folders, or run folders
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from diabetes import Examples, Scores, Shard, diabetes, mlp, rows_of, scores, worker_rows

# Settings a delta = 0 baseline may differ in: what LBGM does with the updates, and where files go.
NOT_COMPARED = {"delta", "name", "checkpoint_every", "granularity", "error_feedback", "data_dir"}


def run_folders(paths: list[Path]) -> list[Path]:
    """Each path is a run folder (holding summary.json) or a folder of run folders."""
    found = []
    for path in paths:
        found += [path] if (path / "summary.json").is_file() else sorted(p.parent for p in path.glob("*/summary.json"))
    return found


def validation_set(config: dict[str, Any]) -> Examples:
    """Every worker's validation patients together, split as the workers split them."""
    shards = [Shard(index, config["workers"], config["seed"], None) for index in range(config["workers"])]
    rows = torch.cat([worker_rows(shard)[1] for shard in shards])
    return rows_of(diabetes().train, rows)


def final_scores(run: Path, config: dict[str, Any]) -> tuple[Scores, Scores]:
    """(test, validation) scores of the run's final model."""
    model = mlp()
    state = torch.load(run / "final_model.pt", weights_only=True)
    with torch.no_grad():
        for param, value in zip(model.parameters(), state["params"], strict=True):
            param.copy_(value)
    return scores(model, diabetes().test), scores(model, validation_set(config))


def baseline_of(summary: dict[str, Any], summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The delta = 0 run with otherwise the same settings and as many rounds, if the set holds one."""
    def compared(config: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in config.items() if key not in NOT_COMPARED}

    return next((other for other in summaries if other["config"]["delta"] == 0
                 and other["rounds_completed"] == summary["rounds_completed"]
                 and compared(other["config"]) == compared(summary["config"])), None)


def table(runs: list[Path]) -> str:
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    lines = ["| run | delta | rounds | test RMSE | test R^2 | validation RMSE | uplink bytes | scalar/all units "
             "| saved vs delta=0 |", "|---|---|---|---|---|---|---|---|---|"]
    for run, summary in zip(runs, summaries):
        config = summary["config"]
        test, validation = final_scores(run, config)
        units = summary["scalar_units"] + summary["full_units"]
        baseline = baseline_of(summary, summaries)
        saved = f"{1 - summary['uplink_bytes'] / baseline['uplink_bytes']:.1%}" if baseline else "no baseline"
        lines.append(f"| {run.name} | {config['delta']:g} | {summary['rounds_completed']} | {test.rmse:.2f} "
                     f"| {test.r2:.3f} | {validation.rmse:.2f} | {summary['uplink_bytes']:,} "
                     f"| {summary['scalar_units']}/{units} | {saved} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, or folders of run folders")
    runs = run_folders(parser.parse_args().paths)
    if not runs:
        print("score.py: no finished run (a folder with summary.json) in the given paths", file=sys.stderr)
        return 2
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
