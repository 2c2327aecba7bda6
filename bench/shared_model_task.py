"""The built-in image-classification task with one model per worker process instead of one per
virtual worker, for bench.thousands (`--task bench/shared_model_task.py:classification`).

A virtual worker's model matters only while it trains: LocalTrainer.train loads the global model
into it first, and `lbgm worker` trains one virtual worker at a time (--parallel-training 1, the
default; it reads the buffers to upload before the next one starts) and leaves a model already on its
device untouched (Module.to would walk the gradients while another virtual worker trains), so the
process's virtual workers can share one module. That takes the model (1.72 MB for
the CNN) out of the memory each added virtual worker costs, which is what lets 5,000 of them fit
beside the server on this machine. Training, data, LBGM decisions and uploads are the built-in task's.
"""

from __future__ import annotations

import dataclasses
import threading

from torch import nn

from lbgm.task import Task, TaskOptions
from lbgm.tasks.image import classification as builtin_classification

_lock = threading.Lock()
_models: dict[TaskOptions, nn.Module] = {}


def classification(options: TaskOptions) -> Task:
    task = builtin_classification(options)

    def shared_model() -> nn.Module:
        """The first call builds the model (under the experiment's seed, as build_model calls it); every
        later call in this process returns that same module."""
        with _lock:
            if options not in _models:
                _models[options] = task.model()
            return _models[options]

    return dataclasses.replace(task, model=shared_model)
