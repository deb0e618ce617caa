"""Benchmark of the campaign runner against the original per-sample DataLoader design.

Run from the repository root (--quick: tiny grids, a smoke test whose numbers mean nothing):
    .venv/bin/python benchmarks/bench_campaign.py --data_dir ../shared/data/mnist [--quick]
        [--scaling] [--accuracy] [--mixed_precision] [--skip_reference] [--epochs 2]
It prints:
  (a) campaign throughput (training samples per second of wall time) of this product
      (run_experiments.py) and of the baseline (reference_pipeline.py: the original design, 2
      DataLoader workers per run), as subprocesses on the same grid: MLP relu, pixel_uniform,
      p in {0, 0.5}, full MNIST, W = 2 pool workers x 1 thread, campaigns of 2W and 6W runs; the
      ratios product / baseline of the 6W-run command's throughput, of its samples per CPU second
      (less sensitive to other users of the machine) and of the marginal throughput (the runs
      the larger campaign adds: a long campaign, without start-up costs);
  (b), (c) per-core training throughput of the MLP and the CNN (train_one_epoch, pixel noise
      p = 0.5, float32, 1 thread) in GFLOP/s (6 x forward multiply-adds per sample), as a
      fraction of a float32 torch.mm peak timed in alternation with it;
  (d) peak memory (RSS; PSS, shared pages split among their sharers; USS, private pages) of the
      largest worker process of (a)'s campaigns, next to a process that only imported torch;
  (f) --scaling: marginal throughput at 1, 2, 4, ... workers x 1 thread (2W- and 6W-run
      campaigns), and that of the training loops alone, as speed-ups over 1 worker;
  --accuracy: mean test accuracy +- stderr (ddof=1) of the product (with normalize=false, the
      baseline's inputs, and with its defaults) vs the baseline, within 2 stderr or not;
  --mixed_precision: CNN campaigns in float32 and in bfloat16 with the same seeds: wall-time
      ratio and accuracies, unpaired and paired by repeat.
In-process timings are the best of several; every comparison is a ratio from this one run.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import nnet_models as nm  # noqa: E402

PYTHON = sys.executable
REFERENCE = ROOT / "benchmarks" / "reference_pipeline.py"
MNIST_TRAIN_SIZE = 60_000
WORKERS = 2


def usable_cpus() -> int:
    """The CPUs this process may use, as the product counts them."""
    try:
        from executors import usable_cpus as product_usable_cpus
    except ImportError:
        return len(os.sched_getaffinity(0))
    return product_usable_cpus()


# ---------------------------------------------------------------- campaigns as subprocesses


@dataclass
class Grid:
    repeats: int
    epochs: int
    max_train: int | None = None  # None: full MNIST
    ps: str = "0,0.5"
    model_type: str = "mlp"

    def samples(self, runs: int) -> int:
        return runs * self.epochs * (self.max_train or MNIST_TRAIN_SIZE)


@dataclass
class Campaign:
    wall: float  # seconds
    cpu: float  # user + system seconds of all its processes
    samples: int  # training samples over all runs and epochs
    rows: list[dict]
    peak: dict[str, int] = field(default_factory=dict)  # "rss", "pss", "uss": bytes, largest worker

    @property
    def throughput(self) -> float:
        return self.samples / self.wall


def watch_memory(pid: int, peak: dict[str, int], stop: threading.Event) -> None:
    """Until stop is set, record the largest RSS, PSS and USS of any descendant of pid."""
    while not stop.wait(0.25):
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            try:
                memory = child.memory_full_info()
            except psutil.Error:
                continue
            for kind in ("rss", "pss", "uss"):
                peak[kind] = max(peak.get(kind, 0), getattr(memory, kind))


def children_cpu_seconds() -> float:
    """User + system time of all finished, waited-for descendants (grandchildren included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_campaign(command: list[str], out_dir: Path, grid: Grid) -> Campaign:
    """Run a campaign command (both scripts take --max_train_samples) and read its results_per_run.csv."""
    if grid.max_train:
        command = [*command, "--max_train_samples", str(grid.max_train)]
    cpu_before, started = children_cpu_seconds(), time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, stop = {}, threading.Event()
    watcher = threading.Thread(target=watch_memory, args=(process.pid, peak, stop), daemon=True)
    watcher.start()
    output, _ = process.communicate()
    wall, cpu = time.perf_counter() - started, children_cpu_seconds() - cpu_before
    stop.set()
    watcher.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}:\n{output[-3000:]}")
    with open(out_dir / "results_per_run.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    failed = [r for r in rows if r.get("status", "ok") != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} runs failed: {failed[0].get('error')}")
    return Campaign(wall, cpu, grid.samples(len(rows)), rows, peak)


def product_campaign(grid: Grid, data_dir: Path, out_dir: Path, workers: int = WORKERS,
                     extra: tuple[str, ...] = ()) -> Campaign:
    command = [PYTHON, "run_experiments.py", "--output_dir", str(out_dir), "--data_dir", str(data_dir),
               "--model_types", grid.model_type, "--activations", "relu", "--noise_types", "pixel_uniform",
               "--ps", grid.ps, "--extra_label_ps", "", "--repeats", str(grid.repeats),
               "--epochs", str(grid.epochs), "--max_workers", str(workers), "--cpu_threads_per_worker", "1",
               *extra]
    return run_campaign(command, out_dir, grid)


def reference_campaign(grid: Grid, data_dir: Path, out_dir: Path) -> Campaign:
    command = [PYTHON, str(REFERENCE), "--output_dir", str(out_dir), "--data_dir", str(data_dir),
               "--model_types", grid.model_type, "--activations", "relu", "--ps", grid.ps,
               "--repeats", str(grid.repeats), "--epochs", str(grid.epochs), "--workers", str(WORKERS),
               "--threads", "1", "--data_workers", "2"]
    return run_campaign(command, out_dir, grid)


def marginal_throughput(small: Campaign, large: Campaign) -> float:
    """Samples per second of the runs the larger campaign adds (start-up and tail cancel out)."""
    return (large.samples - small.samples) / (large.wall - small.wall) if large.wall > small.wall else math.nan


def print_campaign(name: str, c: Campaign) -> None:
    print(f"    {name:9s} {len(c.rows):3d} runs: {c.wall:6.1f} s wall, {c.throughput:8,.0f} samples/s; "
          f"{c.cpu:6.1f} CPU s, {c.samples / c.cpu:8,.0f} samples per CPU s")


# ---------------------------------------------------------------- per-core throughput, in this process


def forward_macs_per_sample(model: torch.nn.Module) -> int:
    """Multiply-adds of one forward pass of one 1x28x28 image in the Conv2d and Linear layers."""
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        if isinstance(module, torch.nn.Conv2d):
            macs += output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            macs += module.in_features * module.out_features

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    hooks = [layer.register_forward_hook(count) for layer in layers]
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    return macs


def best_of_alternating(first, second, rounds: int) -> tuple[float, float]:
    """Best wall time of each of two functions, timed in alternation after one warm-up call each,
    so that both see the same load from other processes."""
    times = ([], [])
    for i in range(rounds + 1):
        for fn, spent in zip((first, second), times):
            started = time.perf_counter()
            fn()
            if i:
                spent.append(time.perf_counter() - started)
    return min(times[0]), min(times[1])


def core_throughput(name: str, model_type: str, data, n_samples: int, rounds: int) -> None:
    """train_one_epoch on the first n_samples images (pixel_uniform p=0.5, float32, 1 thread)
    against 50 float32 torch.mm of 512x784 by 784x256."""
    cfg = nm.TrainConfig(model_type=model_type, noise_type="pixel_uniform", p=0.5, seed=1)
    source = nm.BatchSource(cfg, data.train_images[:n_samples], torch.device("cpu"))
    labels = data.train_labels[:n_samples]
    model = nm.build_model(cfg.model_type, cfg.activation, cfg.hidden_sizes)
    optimizer = nm.Optimizer(model, cfg)
    order = nm.make_generator(cfg.seed, "data_order")
    a, b = torch.randn(512, 784), torch.randn(784, 256)
    train_s, mm_s = best_of_alternating(
        lambda: nm.train_one_epoch(model, optimizer, source, labels, cfg.batch_size, order),
        lambda: [torch.mm(a, b) for _ in range(50)], rounds)
    rate, peak = n_samples / train_s, 50 * 2 * 512 * 784 * 256 / mm_s / 1e9
    gflops = rate * 6 * forward_macs_per_sample(model) / 1e9
    print(f"{name} ({nm.count_parameters(model):,} parameters): {rate:,.0f} samples/s on 1 thread = "
          f"{gflops:.1f} GFLOP/s = {gflops / peak:.0%} of the torch.mm peak, {peak:.1f} GFLOP/s")


# ---------------------------------------------------------------- optional parts


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def compare_accuracy(label: str, ours: Campaign, theirs: Campaign, their_name: str) -> None:
    (m1, se1), (m2, se2) = (mean_and_stderr([float(r["test_accuracy"]) for r in c.rows]) for c in (ours, theirs))
    diff, se = m1 - m2, math.hypot(se1, se2)
    print(f"    {label:30s} {m1:.4f} +- {se1:.4f} vs {their_name} {m2:.4f} +- {se2:.4f}: difference "
          f"{diff:+.4f} = {abs(diff) / se:.2f} stderr, {'within' if abs(diff) <= 2 * se else 'OUTSIDE'} 2")


def accuracy(data_dir: Path, tmp: Path, grid: Grid) -> None:
    print(f"accuracy (MLP relu, pixel_uniform p={grid.ps}, {grid.max_train} training samples, {grid.epochs} "
          f"epochs, {grid.repeats} repeats; mean +- stderr, ddof=1):")
    baseline = reference_campaign(grid, data_dir, tmp / "accuracy_baseline")
    same_inputs = product_campaign(grid, data_dir, tmp / "accuracy_raw", extra=("--normalize", "false"))
    defaults = product_campaign(grid, data_dir, tmp / "accuracy_defaults")
    compare_accuracy("product, normalize=false", same_inputs, baseline, "baseline")
    compare_accuracy("product, defaults", defaults, baseline, "baseline")


def mixed_precision(data_dir: Path, tmp: Path, grid: Grid) -> None:
    print(f"mixed precision (CNN relu, pixel_uniform p={grid.ps}, {grid.max_train or 'all'} training samples, "
          f"{grid.epochs} epochs, {grid.repeats} repeats, {WORKERS} workers x 1 thread; mean +- stderr, ddof=1):")
    single, mixed = (product_campaign(grid, data_dir, tmp / f"precision_{precision}", extra=("--precision", precision))
                     for precision in ("float32", "bfloat16"))
    print(f"    wall time: float32 {single.wall:.0f} s, bfloat16 {mixed.wall:.0f} s: bfloat16 has "
          f"{single.wall / mixed.wall:.2f}x the throughput")
    compare_accuracy("bfloat16", mixed, single, "float32")
    float32_by_repeat = {r["repeat"]: float(r["test_accuracy"]) for r in single.rows}
    diff, se = mean_and_stderr([float(r["test_accuracy"]) - float32_by_repeat[r["repeat"]] for r in mixed.rows])
    print(f"    paired by repeat (same seeds): bfloat16 - float32 = {diff:+.4f} +- {se:.4f}")


def scaling(data_dir: Path, tmp: Path, epochs: int, max_train: int | None) -> None:
    print(f"(f) scaling, W workers x 1 thread, {epochs} epochs: marginal throughput (campaigns of 2W and 6W "
          f"runs) and training-loop throughput (W x the median run's samples per train_seconds):")
    cores = usable_cpus()
    first = None
    for workers in sorted({2**i for i in range(cores.bit_length()) if 2**i <= cores} | {cores}):
        small, large = (product_campaign(Grid(r, epochs, max_train), data_dir, tmp / f"scaling_{workers}_{r}", workers)
                        for r in (workers, 3 * workers))
        per_run = [epochs * (max_train or MNIST_TRAIN_SIZE) / float(r["train_seconds"]) for r in large.rows]
        marginal, loops = marginal_throughput(small, large), workers * statistics.median(per_run)
        first = first or (marginal, loops)
        print(f"    {workers:3d} workers: marginal {marginal:9,.0f} samples/s = {marginal / first[0]:5.2f}x 1 worker "
              f"({marginal / first[0] / workers:.0%} of linear); training loops {loops:9,.0f} samples/s = "
              f"{loops / first[1]:5.2f}x ({loops / first[1] / workers:.0%} of linear)")


# ---------------------------------------------------------------- main


def memory(c: Campaign) -> str:
    return ", ".join(f"{kind.upper()} {c.peak.get(kind, 0) / 2**20:.0f} MiB" for kind in ("rss", "pss", "uss"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=ROOT / "data", help="folder of the four MNIST *-ubyte.gz")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run in (a) and (f)")
    parser.add_argument("--quick", action="store_true", help="tiny grids and few samples: a smoke test")
    parser.add_argument("--skip_reference", action="store_true", help="leave out the baseline in (a)")
    parser.add_argument("--scaling", action="store_true", help="(f): 1, 2, 4, ... workers, up to the CPUs")
    parser.add_argument("--accuracy", action="store_true", help="accuracy of product vs baseline")
    parser.add_argument("--mixed_precision", action="store_true", help="CNN campaigns in float32 and bfloat16")
    args = parser.parse_args()
    data_dir = args.data_dir.resolve()
    epochs, max_train = (1, 1000) if args.quick else (args.epochs, None)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    with tempfile.TemporaryDirectory(prefix="bench_campaign_") as tmp_name:
        tmp = Path(tmp_name)
        grids = [Grid(repeats, epochs, max_train) for repeats in (WORKERS, 3 * WORKERS)]
        print(f"(a) campaigns: MLP relu, pixel_uniform, p in {{0, 0.5}}, {max_train or 'all'} training samples, "
              f"{epochs} epochs per run, {WORKERS} workers x 1 thread:")
        product = [product_campaign(g, data_dir, tmp / f"product_{g.repeats}") for g in grids]
        for c in product:
            print_campaign("product", c)
        if not args.skip_reference:
            baseline = [reference_campaign(g, data_dir, tmp / f"baseline_{g.repeats}") for g in grids]
            for c in baseline:
                print_campaign("baseline", c)
            ours, theirs = marginal_throughput(*product), marginal_throughput(*baseline)
            print(f"    product / baseline, {len(product[1].rows)}-run campaign: throughput "
                  f"{product[1].throughput / baseline[1].throughput:.1f}x, samples per CPU s "
                  f"{product[1].samples / product[1].cpu / (baseline[1].samples / baseline[1].cpu):.1f}x; "
                  f"marginal throughput {ours:,.0f} / {theirs:,.0f} samples/s = {ours / theirs:.1f}x")

        data = nm.load_dataset("mnist", data_dir)
        mlp_batches, cnn_batches, rounds = (4, 1, 2) if args.quick else (30, 3, 10)
        core_throughput("(b) MLP 784-256-128-10", "mlp", data, mlp_batches * 128, rounds)
        core_throughput("(c) CNN", "cnn", data, cnn_batches * 128, rounds)

        bare = subprocess.run([PYTHON, "-c", "import psutil, torch; print(psutil.Process().memory_info().rss)"],
                              capture_output=True, text=True, check=True)
        print(f"(d) peak memory of the largest worker process, product: {memory(product[1])}; "
              f"a process that only imported torch: RSS {int(bare.stdout) / 2**20:.0f} MiB")
        if not args.skip_reference:
            print(f"    baseline (pool and DataLoader workers): {memory(baseline[1])}")

        if args.scaling:
            scaling(data_dir, tmp, epochs, max_train)
        quick = args.quick
        if args.accuracy:
            accuracy(data_dir, tmp, Grid(2 if quick else 16, 1 if quick else 2, 1000 if quick else 10_000, "0.5"))
        if args.mixed_precision:
            mixed_precision(data_dir, tmp, Grid(2 if quick else 12, 1 if quick else 2, max_train, "0.5", "cnn"))
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
