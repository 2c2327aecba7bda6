"""`lbgm init-weights`: write a task's initial model as a weights file, for a server that runs
without the task's code (`lbgm server --weights FILE`, docs/TASKS.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lbgm.cli.options import add_log_level
from lbgm.experiment.config import add_config_arguments, config_from_args
from lbgm.common.weights import save_weights
from lbgm.task.loader import build_model, load_task


def add_parser(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "init-weights", help="write a task's initial model as a safetensors weights file for `lbgm server --weights`",
        description="Build the task's model exactly as the server would (the task's model factory under "
                    "torch.manual_seed(seed), with the experiment's task options) and write its parameters and "
                    "buffers, under their state-dict names, with lbgm's metadata (parameter order = LBGM layer "
                    "order; which tensors are buffers) to a safetensors file. A server started with --weights FILE "
                    "and the same experiment settings then needs neither the task's code nor its data.")
    command.add_argument("--out", type=Path, required=True, help="the weights file to write (.safetensors)")
    add_log_level(command)
    add_config_arguments(command)
    command.set_defaults(func=cmd_init_weights)


def cmd_init_weights(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    model = build_model(load_task(config.task, config.task_options), config.seed, config.task)
    state = save_weights(model, args.out)
    print(f"wrote {args.out}: the initial model of task {config.task} (seed {config.seed}), "
          f"{len(state.parameter_specs)} parameters and {len(state.buffer_specs)} buffers; start the server with "
          f"--weights {args.out} and the same experiment settings")
    return 0
