"""A small CNN on MNIST with its own model class, DataLoader, Adam, loop and evaluation: train.py
trains it alone, train_federated.py is the same script plus the lines that make it a federated
client (README.md beside this file shows the difference).

The data are the MNIST images embedded in lbgm (12,000 training and 2,000 test images of the
official files), so nothing is downloaded; torchvision's MNIST would serve the same way.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lbgm.client
from lbgm.tasks.datasets import load_dataset


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def mnist(split: str) -> TensorDataset:
    data = load_dataset("mnist-embedded", split)
    return TensorDataset(data.images, data.labels)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> float:
    model.train()
    total, batches = 0.0, 0
    for images, labels in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        total, batches = total + loss.item(), batches + 1
    return total / batches


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset) -> float:
    model.eval()
    images, labels = dataset.tensors
    return (model(images).argmax(1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    train_set, test_set = mnist("train"), mnist("test")
    model = Net()
    federation = lbgm.client.connect(model)  # joins the server at LBGM_SERVER as worker LBGM_NAME
    train_set = TensorDataset(*(data[federation.shard.index::federation.shard.count] for data in train_set.tensors))
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    while federation.receive():  # blocks until sampled, then `model` holds the global model; False once done
        loss = train_one_epoch(model, loader, optimizer)
        print(f"round {federation.round.number}: training loss {loss:.4f}, test accuracy {accuracy(model, test_set):.4f}")
        federation.send(num_samples=len(train_set), loss=loss)


if __name__ == "__main__":
    main()
