"""The benchmark's baseline: the original per-sample DataLoader design of this campaign runner.

It does, per run, what the first version of the project did, so that its throughput stands
for the original's:
  torchvision MNIST (ToTensor) -> per-sample pixel corruption in Dataset.__getitem__
  -> DataLoader(shuffle=True, num_workers=--data_workers) -> MLP or CNN, Adam, cross-entropy
  -> evaluation on the clean test set (DataLoader, batches of 1000),
with one ProcessPoolExecutor job per run (--workers jobs at a time, --threads torch threads each).
Only pixel noise (uniform replacement with probability p) is supported. It is self-contained:
it imports nothing from the project, and benchmarks/bench_campaign.py runs it as a subprocess.

Run from the repository root, for example:
    .venv/bin/python benchmarks/reference_pipeline.py --data_dir ../shared/data/mnist \
        --ps 0,0.5 --repeats 2 --epochs 1 --workers 2 --threads 1 --data_workers 2 --output_dir /tmp/ref

--data_dir holds the four *-ubyte.gz files (directly, or in MNIST/raw/ or FashionMNIST/raw/); they are
copied once into the layout torchvision reads (OUTPUT_DIR/torchvision/MNIST/raw/); nothing is downloaded.
It prints one line per finished run and writes OUTPUT_DIR/results_per_run.csv (one row per run:
its settings, repeat, train_loss, test_loss, test_accuracy, seconds).
"""
from __future__ import annotations

import argparse
import csv
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
               "leaky_relu": lambda: nn.LeakyReLU(0.1), "gelu": nn.GELU}


@dataclass
class RunConfig:
    dataset_root: str
    dataset: str
    model_type: str
    activation: str
    p: float
    repeat: int
    seed: int
    epochs: int
    batch_size: int
    data_workers: int
    threads: int
    max_train_samples: int | None
    learning_rate: float = 1e-3
    weight_decay: float = 0.0


def build_model(model_type: str, activation: str) -> nn.Module:
    act = ACTIVATIONS[activation]
    if model_type == "mlp":  # 784-256-128-10
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), act(), nn.Linear(256, 128), act(),
                             nn.Linear(128, 10))
    return nn.Sequential(  # two conv blocks, then 3136-128-10
        nn.Conv2d(1, 32, 3, padding=1), act(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), act(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), act(), nn.Linear(128, 10))


class CorruptedDataset(Dataset):
    """Each pixel of each sample is replaced, with probability p, by a uniform value in [0, 1),
    drawn anew every time the sample is read (in the DataLoader worker)."""

    def __init__(self, base: Dataset, p: float):
        self.base, self.p = base, p

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        if self.p > 0:
            x = torch.where(torch.rand_like(x) < self.p, torch.rand_like(x), x)
        return x, y


def data_loaders(cfg: RunConfig) -> tuple[DataLoader, DataLoader]:
    dataset_class = getattr(datasets, TORCHVISION_CLASSES[cfg.dataset])
    train = dataset_class(cfg.dataset_root, train=True, transform=transforms.ToTensor())
    test = dataset_class(cfg.dataset_root, train=False, transform=transforms.ToTensor())
    if cfg.max_train_samples is not None:
        train = Subset(train, range(cfg.max_train_samples))
    return (DataLoader(CorruptedDataset(train, cfg.p), batch_size=cfg.batch_size, shuffle=True,
                       num_workers=cfg.data_workers),
            DataLoader(test, batch_size=1000, shuffle=False, num_workers=cfg.data_workers))


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer) -> float:
    model.train()
    total = 0.0
    for x, y in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
    return total / len(loader.dataset)


def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """(mean test loss, test accuracy)."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            loss += nn.functional.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
    return loss / len(loader.dataset), correct / len(loader.dataset)


def train_and_evaluate(cfg: RunConfig) -> dict:
    """One run, in a pool worker; its seconds include building the datasets and loaders."""
    started = time.time()
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_loader, test_loader = data_loaders(cfg)
    model = build_model(cfg.model_type, cfg.activation)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    for _ in range(cfg.epochs):
        train_loss = train_one_epoch(model, train_loader, optimizer)
    test_loss, accuracy = evaluate(model, test_loader)
    record = asdict(cfg)
    del record["dataset_root"]
    record.update(train_loss=train_loss, test_loss=test_loss, test_accuracy=accuracy,
                  seconds=time.time() - started)
    return record


def torchvision_root(data_dir: Path, dataset: str, root: Path) -> Path:
    """Copy the four IDX files (from data_dir, or data_dir/<class name>/raw/) to
    root/<class name>/raw/ and let torchvision unpack them there."""
    raw = root / TORCHVISION_CLASSES[dataset] / "raw"
    source = data_dir if (data_dir / IDX_FILES[0]).exists() else data_dir / raw.relative_to(root)
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        if not (raw / name).exists():
            shutil.copy(source / name, raw / name)
    getattr(datasets, TORCHVISION_CLASSES[dataset])(root, train=True, download=True)  # unpacks, offline
    return root


def comma_list(kind):
    return lambda text: [kind(item) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, required=True, help="folder of the four *-ubyte.gz files")
    parser.add_argument("--output_dir", type=Path, default=Path("/tmp/reference_pipeline"))
    parser.add_argument("--dataset", choices=sorted(TORCHVISION_CLASSES), default="mnist")
    parser.add_argument("--model_types", type=comma_list(str), default=["mlp"], help="mlp,cnn")
    parser.add_argument("--activations", type=comma_list(str), default=["relu"], help=",".join(ACTIVATIONS))
    parser.add_argument("--ps", type=comma_list(float), default=[0.0, 0.5], help="pixel-noise probabilities")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--max_train_samples", type=int, default=None, help="first N training images only")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (pool processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--data_workers", type=int, default=2, help="DataLoader worker processes per run")
    parser.add_argument("--seed", type=int, default=1234, help="seeds the runs' seeds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    root = torchvision_root(args.data_dir, args.dataset, args.output_dir / "torchvision")
    seeds = random.Random(args.seed)
    configs = [RunConfig(str(root), args.dataset, model_type, activation, p, repeat, seeds.randint(1, 10**9),
                         args.epochs, args.batch_size, args.data_workers, args.threads, args.max_train_samples)
               for activation in args.activations for model_type in args.model_types
               for p in args.ps for repeat in range(args.repeats)]
    print(f"Launching {len(configs)} runs with {args.workers} workers...", flush=True)
    records = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for future in as_completed([pool.submit(train_and_evaluate, cfg) for cfg in configs]):
            r = future.result()
            records.append(r)
            print(f"[{r['model_type']}/{r['activation']}] p={r['p']:.2f} repeat={r['repeat']} "
                  f"acc={r['test_accuracy']:.4f} {r['seconds']:.1f}s", flush=True)
    with open(args.output_dir / "results_per_run.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


if __name__ == "__main__":
    main()
