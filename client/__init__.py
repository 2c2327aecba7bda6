"""The client API: federate an existing PyTorch training script by adding a few lines.

    import lbgm.client

    federation = lbgm.client.connect(model)      # joins the server that LBGM_SERVER names
    while federation.receive():                  # blocks until sampled; the global model is now in `model`
        train(model, loader, optimizer)          # the script's own loop, loss, optimizer and data, unchanged
        federation.send(num_samples=len(train_set), loss=loss)

The script keeps its model, data, optimizer and loop; the library does everything else a worker of
`lbgm worker` does: it joins, long-polls for rounds, computes the update, makes the LBGM decision per
layer, streams FullGradient/ScalarUpdate messages, retries transport failures, resends stale look-back
gradients in full and re-joins a restarted server.

The update a script sends is the change of its weights in units of the server's local learning rate,
g = (theta - theta_local) / local_lr, exactly as for a task's custom training (lbgm.task). The server
steps theta <- theta - server_lr * sum_k n_k g_k / sum_k n_k; with server_lr = local_lr (the default)
that is theta <- sum_k n_k theta_local,k / sum_k n_k, i.e. FedAvg whatever optimizer the script uses
(Adam, SGD with momentum, a scheduler, ...), and FedAvgM with server_momentum > 0.

The server needs no copy of the script: it runs from a weights file (`lbgm server --weights FILE`)
that `save_weights(model, FILE)` writes once from the script's model; every join and upload is
checked against it.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from torch import nn

from lbgm.common.tls import ChannelTls, channel_credentials
from lbgm.common.model_spec import TensorSpec, describe_model
from lbgm.common.weights import save_weights
from lbgm.common.wire import ReceivedTask
from lbgm.task import Evaluation, LocalResult, Shard
from lbgm.v1 import lbgm_pb2 as pb
from lbgm.worker.client import RetryPolicy, VirtualWorker, WorkerStats, WorkerStopped
from lbgm.worker.trainer import update_of

log = logging.getLogger(__name__)

MIN_JOIN_TOKEN_CHARACTERS = 16


class ClientError(RuntimeError):
    """The script used the client API wrongly, or the federation ended with an error; one line."""


@dataclass(frozen=True)
class RoundInfo:
    """The round the script is training: its number and the server's settings (a script may follow
    them or use its own)."""

    number: int
    total: int
    local_steps: int  # tau, the server's local steps per round
    batch_size: int
    lr: float  # the server's local learning rate: the unit of the update (see the module doc)


@dataclass(frozen=True)
class _Offer:
    """A round handed from the protocol thread to the script's thread."""

    global_state: Sequence[torch.Tensor]
    info: RoundInfo


@dataclass(frozen=True)
class _EvaluationRequest:
    """The server asks for an evaluation of this global model on the script's held-out data."""

    global_state: Sequence[torch.Tensor]


@dataclass(frozen=True)
class _End:
    """No more rounds: training finished (error None) or the worker failed."""

    error: BaseException | None


@dataclass(frozen=True)
class _Trained:
    update: list[torch.Tensor]
    loss: float
    num_samples: int


class _ScriptJob:
    """The LocalJob (lbgm.worker.client) of a script: train() hands the round over to the script's thread
    and waits until the script calls send()."""

    def __init__(self, model: nn.Module, evaluate: Callable[[nn.Module], Evaluation] | None) -> None:
        self.model = model
        self.evaluate_model = evaluate
        self.rounds: queue.Queue[_Offer | _EvaluationRequest | _End] = queue.Queue()
        self.results: queue.Queue[_Trained | None] = queue.Queue()  # None: stop waiting
        self.evaluations: queue.Queue[Evaluation | None] = queue.Queue()  # None: no evaluation after all
        self.uploads: queue.Queue[bool] = queue.Queue()
        self.total_rounds = 0  # of the run, as the current round's task says
        self._num_samples = 0

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def train(self, global_state: list[torch.Tensor], local_steps: int, batch_size: int, lr: float,
              round_number: int) -> tuple[list[torch.Tensor], float]:
        info = RoundInfo(round_number, self.total_rounds, local_steps, batch_size, lr)
        self.rounds.put(_Offer(global_state, info))
        trained = self.results.get()
        if trained is None:
            raise WorkerStopped()
        self._num_samples = trained.num_samples
        return trained.update, trained.loss

    def evaluate(self, global_state: list[torch.Tensor]) -> Evaluation | None:
        """Federated evaluation: the script's thread runs the script's `evaluate` on the global model
        (in receive(), so the protocol thread never touches the model while the script uses it)."""
        if self.evaluate_model is None:
            return None
        self.rounds.put(_EvaluationRequest(global_state))
        return self.evaluations.get()

    def buffers(self) -> list[torch.Tensor]:
        return [buffer.detach().cpu().clone() for buffer in self.model.buffers()]

    def position(self) -> None:
        """A script draws its own batches: a round redone after a server resumed trains on what it draws then."""

    def restore(self, position: None) -> None:
        """Nothing to restore (see position)."""


class _ScriptWorker(VirtualWorker):
    """A virtual worker whose job is the script: it also tells the script when it joined and how each
    upload ended."""

    def __init__(self, job: _ScriptJob, joined: threading.Event, **settings) -> None:
        super().__init__(job=self._make_job, **settings)
        self.job = job
        self.joined = joined
        self.shard: Shard | None = None

    def model_tensors(self, spec: pb.ExperimentSpec) -> list[TensorSpec]:
        """The script's model, which the server compares with its own at join."""
        return describe_model(self.job.model)

    def _make_job(self, spec: pb.ExperimentSpec, shard_index: int) -> _ScriptJob:
        self.shard = Shard(shard_index, spec.num_shards, spec.seed, None)
        return self.job

    def join(self, stub) -> None:
        super().join(stub)
        self.joined.set()

    def run_round(self, submit: grpc.StreamUnaryMultiCallable, received: ReceivedTask) -> bool:
        self.job.total_rounds = received.task.total_rounds
        accepted = super().run_round(submit, received)
        self.job.uploads.put(accepted)
        return accepted


def describe(error: BaseException | None) -> str:
    """One line for a failure: a refused call by its status and the server's message."""
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error)


def _token(join_token: str | bytes | None) -> bytes | None:
    """The join token: the argument, else LBGM_JOIN_TOKEN, else the first line of LBGM_JOIN_TOKEN_FILE."""
    if join_token is None:
        join_token = os.environ.get("LBGM_JOIN_TOKEN") or None
    if join_token is None and (path := os.environ.get("LBGM_JOIN_TOKEN_FILE")):
        try:
            join_token = (Path(path).read_text().splitlines() or [""])[0].strip()
        except OSError as error:
            raise ClientError(f"cannot read LBGM_JOIN_TOKEN_FILE {path}: {error.strerror or error}") from None
    if join_token is None:
        return None
    token = join_token.encode() if isinstance(join_token, str) else join_token
    if len(token) < MIN_JOIN_TOKEN_CHARACTERS:
        raise ClientError(f"the join token must be at least {MIN_JOIN_TOKEN_CHARACTERS} characters, got {len(token)}")
    return token


def _tls(ca: Path | None, cert: Path | None, key: Path | None, server_name: str) -> ChannelTls | None:
    """TLS if any TLS setting is given (arguments, else LBGM_TLS_CA/_CERT/_KEY/_SERVER_NAME); else plaintext."""
    def setting(value: Path | None, variable: str) -> Path | None:
        return value if value is not None else Path(os.environ[variable]) if os.environ.get(variable) else None
    ca, cert, key = setting(ca, "LBGM_TLS_CA"), setting(cert, "LBGM_TLS_CERT"), setting(key, "LBGM_TLS_KEY")
    server_name = server_name or os.environ.get("LBGM_TLS_SERVER_NAME", "")
    if ca is None and cert is None and key is None and not server_name:
        return None
    try:
        return ChannelTls(channel_credentials(ca, cert, key), server_name)
    except (OSError, ValueError) as error:
        raise ClientError(f"TLS: {error}") from None


class Federation:
    """A script's membership of a federation: see the module doc. Made by `connect`."""

    def __init__(self, model: nn.Module, evaluate: Callable[[nn.Module], Evaluation] | None,
                 worker_settings: dict, join_timeout: float) -> None:
        self.model = model
        self._job = _ScriptJob(model, evaluate)
        joined = threading.Event()
        self._worker = _ScriptWorker(self._job, joined, **worker_settings)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"lbgm-{self._worker.name}", daemon=True)
        self._thread.start()
        give_up = time.monotonic() + join_timeout
        while not joined.wait(0.1):
            if not self._thread.is_alive():
                raise ClientError(f"could not join the federation at {self._worker.target}: "
                                  f"{describe(self._failure)}")
            if time.monotonic() > give_up:
                self.close()
                raise ClientError(f"could not join the federation at {self._worker.target} in time")
        self.shard: Shard = self._worker.shard  # which part of the data this worker should train on
        self.round: RoundInfo | None = None  # the round received and not sent yet
        self._start: list[torch.Tensor] = []
        self._finished = False

    def _run(self) -> None:
        try:
            self._worker.run()
            error = None
        except WorkerStopped:
            error = None
        except BaseException as failure:  # noqa: BLE001 - handed to the script's thread, which raises it
            error = failure
            self._failure = failure
        self._job.rounds.put(_End(error))

    @property
    def name(self) -> str:
        return self._worker.name

    @property
    def stats(self) -> WorkerStats:
        """Rounds uploaded, full and scalar units sent, stale resends, refused rounds."""
        return self._worker.stats

    def receive(self) -> bool:
        """Wait until this worker is sampled and put the global model into `model` (parameters and
        buffers); False once training finished. Raises ClientError if the federation failed."""
        if self.round is not None:
            raise ClientError(f"round {self.round.number} was received but not sent: call send() first")
        if self._finished:
            return False
        while isinstance(item := self._job.rounds.get(), _EvaluationRequest):
            self._evaluate(item.global_state)
        if isinstance(item, _End):
            self._finished = True
            if item.error is not None:
                raise ClientError(f"the federation ended with an error: {describe(item.error)}") from item.error
            return False
        self._load(item.global_state)
        params = list(self.model.parameters())
        self._start = [value.to(param.device) for value, param in zip(item.global_state, params)]
        self.round = item.info
        return True

    def _load(self, global_state: Sequence[torch.Tensor]) -> None:
        """Put the global model (parameters, then buffers) into the script's model, on its device."""
        with torch.no_grad():
            for target, value in zip([*self.model.parameters(), *self.model.buffers()], global_state, strict=True):
                target.copy_(value)

    def _evaluate(self, global_state: Sequence[torch.Tensor]) -> None:
        """Run the script's `evaluate` on the global model and hand the result to the protocol thread
        (which reports it); whatever happens, the protocol thread gets an answer."""
        evaluation = None
        try:
            self._load(global_state)
            result = self._job.evaluate_model(self.model)
            if not isinstance(result, Evaluation) or result.samples < 1:
                raise ClientError(f"evaluate must return a lbgm.task.Evaluation with samples >= 1 (the held-out "
                                  f"samples it covers), got {result!r}")
            evaluation = result
        finally:
            self._job.evaluations.put(evaluation)

    def send(self, num_samples: int, loss: float) -> bool:
        """Send what the script's training made of the received model (the update is computed from the
        weights in `model`, see the module doc) with the round's training loss (the server averages it
        into train_loss); waits for the server's answer: True if it accepted the update, False if it
        refused it (e.g. the round closed before it arrived)."""
        if self.round is None:
            raise ClientError("nothing to send: call receive() first")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ClientError(f"num_samples must be a positive int (the samples the round trained on), "
                              f"got {num_samples!r}")
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            raise ClientError(f"loss must be a finite number (the round's training loss), got {loss!r}")
        trained = [p.detach() for p in self.model.parameters()]
        self._check_shapes(trained)
        update = update_of(LocalResult(float(loss)), self._start, trained, self.round.lr)
        self.round = None
        self._job.results.put(_Trained(update, float(loss), num_samples))
        return self._job.uploads.get()

    def _check_shapes(self, trained: Sequence[torch.Tensor]) -> None:
        """The script must train the model it connected with, in place: same parameters, shapes and dtypes."""
        names = [name for name, _ in self.model.named_parameters()]
        if len(trained) != len(self._start):
            raise ClientError(f"the model now has {len(trained)} parameters, the server's has {len(self._start)}")
        for name, now, start in zip(names, trained, self._start):
            if now.shape != start.shape or now.dtype != start.dtype:
                raise ClientError(f"parameter {name} is {now.dtype} {tuple(now.shape)} now, the server's model has "
                                  f"{start.dtype} {tuple(start.shape)}: nothing was sent")

    def close(self) -> None:
        """Stop taking part (the server goes on without this worker); safe to call twice."""
        self._worker.stop.set()
        self._job.results.put(None)
        self._job.evaluations.put(None)
        self._thread.join(timeout=10)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(model: nn.Module, *, server: str | None = None, name: str | None = None,
            join_token: str | bytes | None = None, tls_ca: Path | None = None, tls_cert: Path | None = None,
            tls_key: Path | None = None, tls_server_name: str = "", state_dir: Path | None = None,
            give_up_seconds: float = 300.0, poll_seconds: float = 20.0,
            evaluate: Callable[[nn.Module], Evaluation] | None = None) -> Federation:
    """Join the federation at `server` (else LBGM_SERVER) as worker `name` (else LBGM_NAME, else the host
    name: give each process on one machine its own) and return once joined.

    Every setting falls back to the variable `lbgm worker` reads for it: LBGM_JOIN_TOKEN (or
    LBGM_JOIN_TOKEN_FILE), LBGM_TLS_CA, LBGM_TLS_CERT, LBGM_TLS_KEY, LBGM_TLS_SERVER_NAME, LBGM_STATE_DIR.
    `model` must match the server's model (names, shapes, dtypes); the join is refused otherwise.
    `evaluate(model) -> lbgm.task.Evaluation` (loss, accuracy, metrics, and `samples`, the held-out
    samples it covers) is the script's evaluation on its own held-out data: the server asks for it
    every `federated_eval_every` rounds and after the last (federated evaluation); it runs in the
    script's thread, inside receive(), on the global model. Without it the worker reports no samples.
    """
    server = server or os.environ.get("LBGM_SERVER", "")
    if ":" not in server:
        raise ClientError(f"the server address must look like HOST:PORT (server= or LBGM_SERVER), got {server!r}")
    name = name or os.environ.get("LBGM_NAME") or socket.gethostname()
    if state_dir is None and os.environ.get("LBGM_STATE_DIR"):
        state_dir = Path(os.environ["LBGM_STATE_DIR"])
    settings = dict(name=name, target=server, poll_seconds=poll_seconds,
                    retry=RetryPolicy(give_up_seconds=give_up_seconds), state_dir=state_dir,
                    tls=_tls(tls_ca, tls_cert, tls_key, tls_server_name), join_token=_token(join_token))
    return Federation(model, evaluate, settings, join_timeout=give_up_seconds + 30)


__all__ = ["ClientError", "Federation", "RoundInfo", "connect", "save_weights"]
