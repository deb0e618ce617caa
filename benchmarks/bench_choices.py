"""The speed choices in the code, each against the plain alternative it replaced, in one run.

Every code comment that points to docs/performance.md names one of these. Each line times the
product's way and the plain way in alternation (best of several rounds, 1 thread) and prints
their ratio. Run from the repository root (about 2 minutes on 2 cores):
    .venv/bin/python benchmarks/bench_choices.py --data_dir ../shared/data/mnist
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nnet_models as nm  # noqa: E402


def best_seconds(fn, calls: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def compare(name: str, product, plain, calls: int) -> None:
    """Time both in alternation; print the product's time, the plain one's, and the ratio."""
    product_s, plain_s = float("inf"), float("inf")
    for _ in range(3):
        product_s = min(product_s, best_seconds(product, calls, 2))
        plain_s = min(plain_s, best_seconds(plain, calls, 2))
    print(f"{name}: {product_s * 1e6:,.0f} us vs {plain_s * 1e6:,.0f} us plain: {plain_s / product_s:.2f}x", flush=True)


def pixel_noise(images: torch.Tensor) -> None:
    generator = torch.Generator().manual_seed(0)
    grey = images[:128].float()
    u = torch.rand(grey.shape, generator=generator)
    compare("noisy batch: select with a float mask (lerp) vs a bool mask (torch.where)",
            lambda: torch.lerp(grey, u * 510.0, torch.lt(u, 0.5, out=torch.empty_like(u))),
            lambda: torch.where(u < 0.5, u * 510.0, grey), 2000)
    cdf = nm.pixel_intensity_cdf(images)
    table = nm.grey_level_quantiles(cdf)
    compare("empirical noise values: quantile-table lookup vs a binary search per pixel",
            lambda: table[(u * len(table)).long().clamp_(max=len(table) - 1)],
            lambda: torch.searchsorted(cdf, u.reshape(-1), right=True), 1000)


def training_loop(data: nm.Dataset, cfg: nm.TrainConfig, optimizer_of, samples: int = 8192):
    """An epoch of train_one_epoch on `samples` examples, as a function."""
    source = nm.BatchSource(cfg, data.train_images[:samples], torch.device("cpu"))
    labels = data.train_labels[:samples]
    torch.manual_seed(0)
    model = nm.build_model(cfg.model_type, cfg.activation, cfg.hidden_sizes)
    optimizer = optimizer_of(model)
    order = torch.Generator().manual_seed(0)
    return lambda: nm.train_one_epoch(model, optimizer, source, labels, cfg.batch_size, order)


def optimizer_class(data: nm.Dataset) -> None:
    cfg = nm.TrainConfig(noise_type="pixel_uniform", p=0.5)
    compare("MLP training epoch (8,192 samples): torch.optim's fused Adam kernel vs the torch.optim.Adam class",
            training_loop(data, cfg, lambda model: nm.Optimizer(model, cfg)),
            training_loop(data, cfg, lambda model: torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)), 2)


def subnormals(data: nm.Dataset) -> None:
    """Later epochs of an MLP whose dead units' Adam moments have decayed towards subnormals."""
    cfg = nm.TrainConfig(noise_type="label_flip", p=0.0)
    epoch = training_loop(data, cfg, lambda model: nm.Optimizer(model, cfg), samples=60_000)
    for _ in range(3):
        epoch()

    def with_flush(flush: bool):
        def run():
            torch.set_flush_denormal(flush)
            epoch()
        return run
    compare("MLP epoch 4+ on 60,000 samples: subnormal floats flushed to zero vs kept",
            with_flush(True), with_flush(False), 1)
    torch.set_flush_denormal(True)


def cnn_choices(data: nm.Dataset) -> None:
    cfg = nm.TrainConfig(model_type="cnn", noise_type="pixel_uniform", p=0.5)
    images = nm.BatchSource(cfg, data.train_images[:128], torch.device("cpu")).batch(torch.arange(128))
    labels = data.train_labels[:128]

    def step_of(model: nn.Module):
        optimizer = nm.Optimizer(model, cfg)

        def step():
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        return step

    torch.manual_seed(0)
    product = nm.build_model("cnn", "relu")
    plain_layout = nm.SimpleCNN("relu")
    compare("CNN training step: channels-last vs channels-first tensors", step_of(product), step_of(plain_layout), 5)
    textbook = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)).to(memory_format=torch.channels_last)
    compare("CNN training step: max-pool before the activation vs conv-activation-pool", step_of(product),
            step_of(textbook), 5)
    test = nm.BatchSource(nm.TrainConfig(), data.test_images[:5000], torch.device("cpu"))
    indices = torch.arange(5000)

    def evaluate(batch_size: int):
        def run():
            product.eval()
            with torch.inference_mode():
                for start in range(0, 5000, batch_size):
                    product(test.batch(indices[start:start + batch_size]))
        return run
    compare(f"CNN evaluation of 5,000 images: batches of {nm.EVAL_BATCH_SIZE} vs 1,000",
            evaluate(nm.EVAL_BATCH_SIZE), evaluate(1000), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    data = nm.load_dataset("mnist", args.data_dir)
    print(f"torch {torch.__version__}, 1 thread; each line: product's way vs the plain way, best of several rounds")
    pixel_noise(data.train_images)
    optimizer_class(data)
    cnn_choices(data)
    subnormals(data)


if __name__ == "__main__":
    main()
