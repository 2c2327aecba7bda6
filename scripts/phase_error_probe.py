"""How parallel are consecutive rounds' gradients? (the quantity LBGM bets on)

Usage: python scripts/phase_error_probe.py --model cnn --local-steps 10 --batch-size 32 --lr 0.05

Trains one worker's shard (the first `--samples` embedded MNIST images) round
after round from the same starting model, and prints, for the model's largest
layer, the look-back phase error sin^2 between each round's accumulated
gradient and the LBG, refreshed every `--refresh` rounds as a sender with a
fixed delta would. Values near 0 mean LBGM can send scalars; near 1, it cannot.
"""

import argparse
import statistics

import torch

from lbgm.task import Examples
from lbgm.tasks.datasets import load_dataset
from lbgm.common.lookback import lookback_coefficient
from lbgm.tasks.models import MODELS, build_model
from lbgm.worker.trainer import LocalTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=sorted(MODELS))
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="0 = the whole shard")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--samples", type=int, default=1200)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--refresh", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist-embedded", "train")
    model = build_model(args.model, seed=0)
    params = [p.detach().clone() for p in model.parameters()]
    largest = max(range(len(params)), key=lambda i: params[i].numel())
    trainer = LocalTrainer.default(model, Examples(data.images[:args.samples], data.labels[:args.samples]), seed=0)
    lbg, errors = None, []
    for number in range(args.rounds):
        gradient, _ = trainer.train(params, args.local_steps, args.batch_size, args.lr)
        params = [p - args.lr * g for p, g in zip(params, gradient)]
        if lbg is not None:
            errors.append(lookback_coefficient([gradient[largest]], [lbg])[1])
        if number % args.refresh == 0:
            lbg = gradient[largest]
    print(f"{args.model} tau={args.local_steps} B={args.batch_size} lr={args.lr}: layer {largest} "
          f"({params[largest].numel()} values), sin^2 per round: {[round(e, 2) for e in errors]}")
    print(f"median sin^2 = {statistics.median(errors):.2f}")


if __name__ == "__main__":
    main()
