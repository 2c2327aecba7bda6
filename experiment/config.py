"""Experiment configuration: one frozen dataclass, loadable from TOML, with
every field documented once (the CLI builds its --help from these docs).

Precedence: defaults < config file < LBGM_* environment variables (`lbgm server` and
`lbgm worker`, cli/options.py) < command-line flags.
"""

from __future__ import annotations

import argparse
import json
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbgm.common.compressor_settings import COMPRESSORS, CompressorSettings
from lbgm.tasks import BUILTIN_TASK, INITS

if TYPE_CHECKING:  # both import torch, which `lbgm run`'s launcher process never loads
    from lbgm.server.robust import RobustRule
    from lbgm.task import TaskOptions

WIRE_DTYPES = ("float32", "float16", "bfloat16")
DOWNLINK_DTYPES = ("float32", "float16")
GRANULARITIES = ("layer", "model")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _doc(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class ExperimentConfig:
    """Defaults are the default job: the authors' reference preset (tau = 1 step on one
    full-shard batch) with a small MLP on the embedded MNIST subset. Full-shard gradients
    are what make consecutive rounds' gradients nearly parallel, which LBGM exploits;
    minibatch noise (e.g. tau = 10, B = 32) leaves them nearly orthogonal and LBGM
    then sends almost everything in full."""

    name: str = _doc("run name; results go to <out_dir>/<name>", "lbgm")
    task: str = _doc("the federated job: package.module:name or path/to/file.py:name naming a lbgm.task.Task or a "
                     "factory of one (docs/TASKS.md); the built-in image-classification task reads dataset, model, "
                     "partition, classes_per_worker, dirichlet_alpha, eval_batch_size and init", BUILTIN_TASK)
    weights: str = _doc("a server runs from this initial weights file (safetensors, written by `lbgm init-weights`) "
                        "instead of the task: it then loads no task code and no data, checks uploads against the "
                        "file's tensors, trusts the workers' sample counts up to max_worker_samples and evaluates "
                        "through the workers (federated_eval_every); `task` is then only what `lbgm run` gives its "
                        "workers. Empty: the server builds the task's model", "")
    dataset: str = _doc("data set of the built-in task: mnist-embedded, mnist, fashion-mnist, cifar10, cifar100",
                        "mnist-embedded")
    data_dir: str = _doc("folder holding the task's data, e.g. MNIST/raw or FashionMNIST/raw (may be read-only)", "")
    model: str = _doc("model of the built-in task: cnn, fcn, mlp, resnet18, vgg19_bn", "mlp")
    partition: str = _doc("how the built-in task splits the training set: iid, shards, dirichlet, reference (the "
                          "LBGM authors' split, replayed draw for draw with torch and numpy seeded by seed; "
                          "docs/RESULTS.md)", "iid")
    classes_per_worker: int = _doc("classes per worker for partition=shards or reference", 3)
    dirichlet_alpha: float = _doc("concentration for partition=dirichlet (smaller = more skewed)", 0.5)
    seed: int = _doc("seed for model init, partition, client sampling and local batches", 0)
    init: str = _doc("initial weights of the built-in task's model: default (this torch's initialisation under "
                     "torch.manual_seed(seed)) or reference (the same draws computed as torch 1.4, the LBGM "
                     "authors' version, computed them: their weights for the seed)", "default")
    workers: int = _doc("number of workers (= data shards)", 10)
    min_workers: int = _doc("workers that must join before round 1 (0 = all)", 0)
    fraction: float = _doc("fraction of joined workers sampled each round", 1.0)
    rounds: int = _doc("global rounds", 200)
    local_steps: int = _doc("tau: local SGD steps per round", 1)
    batch_size: int = _doc("local minibatch size (0 = the whole shard in one batch)", 0)
    local_lr: float = _doc("local SGD learning rate", 0.3)
    server_lr: float = _doc("server step size on the aggregated gradient (0 = same as local_lr: FedAvg)", 0.0)
    server_momentum: float = _doc("server heavy-ball momentum (the reference uses 0.9)", 0.0)
    delta: float = _doc("LBGM threshold on the look-back phase error; 0 sends everything in full", 0.2)
    error_feedback: bool = _doc("carry each scalar update's residual g - rho*LBG into the next round's gradient", False)
    compressor: str = _doc(f"base compressor under LBGM: {', '.join(COMPRESSORS)}", "none")
    topk_fraction: float = _doc("share of each layer's values that top-k keeps: ceil(fraction x size), at least 1",
                                0.1)
    quantization_levels: int = _doc("QSGD levels per sign (1-127, int8 payload)", 127)
    lowrank_rank: int = _doc("rank of the low-rank (PowerSGD) compressor", 2)
    compressor_memory: bool = _doc("error feedback for the base compressor's own loss", True)
    granularity: str = _doc("one LBGM decision per 'layer' (parameter tensor) or for the whole 'model'", "layer")
    wire_dtype: str = _doc(f"dtype of dense payloads on the wire: {', '.join(WIRE_DTYPES)}; with compressor none every "
                           "layer, with lowrank its vectors; topk, sign, qsgd and the lowrank factors have fixed "
                           "dtypes (float32 values and scales, int32 indices, packed bits, int8 levels)", "float32")
    downlink_delta: float = _doc("downlink LBGM threshold on the phase error between a layer's global update and "
                                 "the last one the server broadcast in full: at or below it the workers get one "
                                 "scalar for the layer; what the scalar leaves out is carried into the next round's "
                                 "update on the server (error feedback). With downlink_dtype float32, 0 sends the "
                                 "whole model every round; otherwise workers holding the previous model get the "
                                 "round's update, and the others the updates they missed or the whole model", 0.0)
    downlink_dtype: str = _doc(f"dtype of the downlink's full layers: {', '.join(DOWNLINK_DTYPES)}; float16 puts "
                               "the downlink in update mode even with downlink_delta 0 (the rounding is carried "
                               "forward like a scalar's residual)", "float32")
    round_timeout: float = _doc("seconds a round waits for sampled workers before closing with what arrived", 120.0)
    eval_batch_size: int = _doc("batch size of the server's test-set evaluation", 1000)
    federated_eval_every: int = _doc("federated evaluation: every N rounds the sampled workers evaluate the global "
                                     "model they receive on their own held-out data (the task's validation_data) "
                                     "before training, and after the last round every joined worker evaluates the "
                                     "final model; the server averages the figures weighted by sample counts. 0 = "
                                     "off; -1 = every round when the server has no central evaluation (weights, or "
                                     "a task without test_data), else off", -1)
    max_worker_samples: int = _doc("a server without the task's data (weights) cannot know the shards' sizes: it "
                                   "refuses an upload or evaluation claiming more samples than this (the claim is "
                                   "the worker's aggregation weight)", 1_000_000)
    checkpoint_every: int = _doc("write a resumable server checkpoint every N rounds (0: never)", 1)
    update_norm_bound: float = _doc("a layer of an update whose norm exceeds this many times that layer's median "
                                    "over the round's updates is scaled down to the median (needs >= 3 updates; "
                                    "0 = off)", 10.0)
    loss_guard_ratio: float = _doc("keep the previous model when a round's test loss exceeds this many times the "
                                   "previous one and the previous + 1 (0 = off; non-finite models are always kept out)",
                                   2.0)

    def __post_init__(self) -> None:
        checks = [
            (self.granularity in GRANULARITIES, f"granularity must be one of {list(GRANULARITIES)}, got {self.granularity!r}"),
            (self.wire_dtype in WIRE_DTYPES, f"wire_dtype must be one of {list(WIRE_DTYPES)}, got {self.wire_dtype!r}"),
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
            (0 <= self.min_workers <= self.workers, f"min_workers must lie in [0, workers={self.workers}], got {self.min_workers}"),
            (0.0 < self.fraction <= 1.0, f"fraction must lie in (0, 1], got {self.fraction}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.local_steps >= 1, f"local_steps must be >= 1, got {self.local_steps}"),
            (self.batch_size >= 0, f"batch_size must be >= 0, got {self.batch_size}"),
            (self.local_lr > 0, f"local_lr must be > 0, got {self.local_lr}"),
            (self.server_lr >= 0, f"server_lr must be >= 0, got {self.server_lr}"),
            (0.0 <= self.server_momentum < 1.0, f"server_momentum must lie in [0, 1), got {self.server_momentum}"),
            (0.0 <= self.delta <= 1.0, f"delta must lie in [0, 1], got {self.delta}"),
            (0.0 <= self.downlink_delta <= 1.0, f"downlink_delta must lie in [0, 1], got {self.downlink_delta}"),
            (self.downlink_dtype in DOWNLINK_DTYPES,
             f"downlink_dtype must be one of {list(DOWNLINK_DTYPES)}, got {self.downlink_dtype!r}"),
            (self.classes_per_worker >= 1, f"classes_per_worker must be >= 1, got {self.classes_per_worker}"),
            (self.init in INITS, f"init must be one of {list(INITS)}, got {self.init!r}"),
            (self.dirichlet_alpha > 0, f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}"),
            (self.round_timeout > 0, f"round_timeout must be > 0, got {self.round_timeout}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.federated_eval_every >= -1,
             f"federated_eval_every must be -1 (auto), 0 (off) or a number of rounds >= 1, got {self.federated_eval_every}"),
            (self.max_worker_samples >= 1, f"max_worker_samples must be >= 1, got {self.max_worker_samples}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (0.0 <= self.update_norm_bound < math.inf, f"update_norm_bound must be finite and >= 0, got {self.update_norm_bound}"),
            (self.loss_guard_ratio == 0.0 or 1.0 < self.loss_guard_ratio < math.inf,
             f"loss_guard_ratio must be 0 (off) or finite and > 1, got {self.loss_guard_ratio}"),
        ]
        problems = [message for ok, message in checks if not ok]
        try:
            self.compressor_settings
        except ValueError as error:
            problems.append(str(error))
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def compressor_settings(self) -> CompressorSettings:
        return CompressorSettings(name=self.compressor, topk_fraction=self.topk_fraction,
                                  quantization_levels=self.quantization_levels, lowrank_rank=self.lowrank_rank,
                                  memory=self.compressor_memory)

    @property
    def task_options(self) -> TaskOptions:
        from lbgm.task import TaskOptions

        return TaskOptions(dataset=self.dataset, model=self.model, partition=self.partition,
                           classes_per_worker=self.classes_per_worker, dirichlet_alpha=self.dirichlet_alpha,
                           eval_batch_size=self.eval_batch_size, init=self.init)

    @property
    def data_path(self) -> Path | None:
        return Path(self.data_dir) if self.data_dir else None

    @property
    def robust_rule(self) -> RobustRule:
        from lbgm.server.robust import RobustRule

        return RobustRule(norm_bound=self.update_norm_bound, loss_ratio=self.loss_guard_ratio)

    @property
    def downlink_updates(self) -> bool:
        """Whether the downlink sends global updates (update mode) instead of the whole model every round."""
        return self.downlink_delta > 0.0 or self.downlink_dtype != "float32"

    @property
    def effective_server_lr(self) -> float:
        return self.server_lr or self.local_lr

    @property
    def effective_min_workers(self) -> int:
        return self.min_workers or self.workers

    def federated_eval_period(self, central_evaluation: bool) -> int:
        """Rounds between federated evaluations (0 = none), resolving -1 (auto) for a server that
        does or does not evaluate centrally."""
        if self.federated_eval_every == -1:
            return 0 if central_evaluation else 1
        return self.federated_eval_every

    def with_overrides(self, overrides: dict[str, Any]) -> ExperimentConfig:
        return dataclasses.replace(self, **_checked(overrides, source="overrides"))


FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig)}


def _checked(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Values with known names and the right types (ints are accepted for floats)."""
    checked = {}
    for key, value in values.items():
        if key not in FIELDS:
            raise ConfigError(f"{source}: unknown setting {key!r}; known settings: {', '.join(FIELDS)}")
        expected = type(FIELDS[key].default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not expected:
            raise ConfigError(f"{source}: {key} must be a {expected.__name__}, got {value!r}")
        checked[key] = value
    return checked


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Defaults, then the TOML file (top-level keys or an [experiment] table), then overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            document = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
        values.update(_checked(document.get("experiment", document), source=str(path)))
    values.update(_checked(overrides or {}, source="command line"))
    try:
        return ExperimentConfig(**values)
    except ConfigError as error:
        raise ConfigError(f"{path or 'command line'}: {error}") from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per config field, with the field's doc and default as help."""
    group = parser.add_argument_group("experiment settings (override the config file)")
    group.add_argument("--config", type=Path, help="TOML file with experiment settings")
    for name, spec in FIELDS.items():
        flag = f"--{name.replace('_', '-')}"
        text = f"{spec.metadata['help']} (default: {spec.default!r})"
        if isinstance(spec.default, bool):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = type(spec.default)
            group.add_argument(flag, dest=name, type=kind, default=None, metavar=kind.__name__.upper(), help=text)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    overrides = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    return load_config(args.config, overrides)


def config_to_toml(config: ExperimentConfig) -> str:
    """The config as a TOML document that load_config reads back unchanged."""
    lines = ["[experiment]"]
    for name, value in dataclasses.asdict(config).items():
        # JSON string escapes are valid TOML basic-string escapes.
        rendered = json.dumps(value) if isinstance(value, (str, bool)) else repr(value)
        lines.append(f"{name} = {rendered}")
    return "\n".join(lines) + "\n"
