"""Benchmark of the campaign runner against the original per-sample DataLoader design.

Run from the repository root (about 3.5 minutes on 2 cores; --scaling adds about 1 there,
--accuracy about 1.5, --mixed_precision about 7):
    .venv/bin/python benchmarks/bench_campaign.py [--epochs 2] [--scaling] [--accuracy]
        [--mixed_precision] [--skip_reference] [--data_dir DIR]

It prints, in one run:
  (a) campaign throughput, in training samples/s for the whole machine (runs x epochs x
      training-set size over the wall time of the whole command), of this product
      (`run_experiments.py` as a subprocess) and of the original pipeline
      (../shared/bench/seed_reference.py as a subprocess) on the same small grids: MLP relu,
      pixel_uniform, p in {0, 0.5}, 2 and 6 repeats, full MNIST, 2 pool workers x 1 thread (the
      original with 2 DataLoader workers per run); their ratio, the ratio of samples per CPU
      second (user + system time of all processes), which is less sensitive to load from
      other users of the machine, and the ratio of marginal throughputs (what the larger
      campaign's 8 extra runs cost: the regime of a long campaign, without start-up costs);
  (b) per-core training throughput of the MLP at 1 thread (train_one_epoch with label noise
      and with pixel noise, no evaluation) as GFLOP/s (6 x parameters per sample) and as a fraction of the float32
      matmul peak measured alongside it with torch.mm (512x784x256, 1 thread), plus the time
      per batch of its parts;
  (c) the same for the CNN, with FLOPs = 2 x 3 x forward multiply-adds (counted from the
      layer shapes; the backward pass is counted as twice the forward); for the MLP and the CNN
      with pixel noise also with precision = "bfloat16" (mixed precision), its speed-up over
      float32 and its rate as a fraction of the same float32 peak;
  (d) peak memory per pool worker of the product (RSS; PSS, its shared pages divided among
      the processes sharing them; USS, pages private to the worker), next to a process that
      only imports torch;
  ceiling: the campaign throughput if every worker ran (b)'s training loops without pause
      (no start-up, evaluation or bookkeeping; runs at p = 0 draw no pixel noise), as a ratio
      to the original's marginal throughput, and the per-core rate 8x would need;
  (e) linearity: wall time of this product for N and 3N runs, their ratio, and the fixed and
      per-run parts of the wall time;
  (f) with --scaling: at 1, 2, 4, ... workers x 1 thread, up to the CPUs this process may use,
      the marginal campaign throughput and the throughput of the training loops alone (which
      start-up jitter does not touch), each as a speed-up over 1 worker and a fraction of linear;
  with --accuracy: mean test accuracy (+- stderr, stdev ddof=1) of this product, with
      normalize=false (the original's inputs) and with its defaults, vs the original
      (16 repeats, 10,000 training samples, 2 epochs, pixel_uniform p=0.5), and whether each
      difference is within 2 standard errors;
  with --mixed_precision: CNN campaigns (pixel_uniform p=0.5, full MNIST, 2 epochs, 12 repeats)
      in float32 and in bfloat16 with the same seeds: their wall-time ratio and mean test
      accuracies, unpaired and paired by repeat.

The machine is shared and noisy: in-process timings are the best of several, training and
the matmul peak are timed in alternation, and ratios are taken within one run of this script.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import nnet_models as nm  # noqa: E402
from run_experiments import usable_cpus  # noqa: E402

PYTHON = sys.executable
REFERENCE = ROOT.parent / "shared" / "bench" / "seed_reference.py"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"
TRAIN_SIZE = 60_000
WORKERS = 2


# ---------------------------------------------------------------- campaigns as subprocesses


@dataclass
class Campaign:
    """What one campaign command cost and produced."""

    wall: float
    cpu: float  # user + system seconds of the whole process tree
    samples: int
    rows: list[dict]
    worker_peak: dict[str, int]  # "rss", "pss", "uss": bytes, the largest over the pool workers

    @property
    def throughput(self) -> float:
        return self.samples / self.wall


class MemoryWatcher(threading.Thread):
    """Polls the pool workers of a campaign process (its forked children) for their RSS, PSS
    (shared pages divided among the processes sharing them) and USS (private pages)."""

    KINDS = ("rss", "pss", "uss")

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.process, self.interval = psutil.Process(pid), interval
        self.peaks: dict[str, dict[int, int]] = {kind: {} for kind in self.KINDS}  # kind -> pid -> bytes
        self.stopped = threading.Event()

    def worker_peak(self) -> dict[str, int]:
        return {kind: max(peaks.values(), default=0) for kind, peaks in self.peaks.items()}

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                parent_cmdline = self.process.cmdline()
                children = self.process.children(recursive=True)
            except psutil.Error:
                return
            for child in children:
                try:
                    if child.cmdline() != parent_cmdline:  # e.g. a resource tracker
                        continue
                    memory = child.memory_full_info()
                except psutil.Error:
                    continue
                for kind, peaks in self.peaks.items():
                    peaks[child.pid] = max(peaks.get(child.pid, 0), getattr(memory, kind))


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants, grandchildren too
    return usage.ru_utime + usage.ru_stime


def run_watched(command: list[str], env: dict | None = None,
                cwd: Path = ROOT) -> tuple[float, float, MemoryWatcher]:
    """Run a command to completion; returns its wall time, its CPU time (all its processes)
    and the memory of its workers."""
    cpu_before, started = children_cpu_seconds(), time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    watcher = MemoryWatcher(process.pid)
    watcher.start()
    output, _ = process.communicate()
    wall, cpu = time.perf_counter() - started, children_cpu_seconds() - cpu_before
    watcher.stopped.set()
    watcher.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}:\n{output[-3000:]}")
    return wall, cpu, watcher


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def training_samples(rows: list[dict], epochs: int, max_train: int | None) -> int:
    return len(rows) * epochs * (max_train or TRAIN_SIZE)


def product_campaign(data_dir: Path, out_dir: Path, ps: str, repeats: int, epochs: int,
                     max_train: int | None = None, extra_args: tuple[str, ...] = (),
                     workers: int = WORKERS) -> Campaign:
    """`run_experiments.py` end to end: MLP relu, pixel_uniform, `workers` workers x 1 thread."""
    command = [PYTHON, "run_experiments.py", "--model_types", "mlp", "--activations", "relu",
               "--noise_types", "pixel_uniform", "--ps", ps, "--repeats", str(repeats),
               "--epochs", str(epochs), "--max_workers", str(workers), "--cpu_threads_per_worker", "1",
               "--data_dir", str(data_dir), "--output_dir", str(out_dir), *extra_args]
    if max_train:
        command += ["--max_train_samples", str(max_train)]
    wall, cpu, watcher = run_watched(command)
    rows = read_csv(out_dir / "results_per_run.csv")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} product runs failed: {failed[0]['error']}")
    return Campaign(wall, cpu, training_samples(rows, epochs, max_train), rows, watcher.worker_peak())


def torchvision_layout(data_dir: Path, root: Path) -> Path:
    """Copy the four gz files to root/MNIST/raw/, where torchvision's MNIST looks for them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in nm.IDX_FILES.values():
        shutil.copy(data_dir / name, raw / name)
    return root


def reference_campaign(tv_root: Path, out_dir: Path, ps: str, repeats: int, epochs: int,
                       max_train: int | None = None) -> Campaign:
    """The original pipeline (seed_reference.py) on the same grid: 2 workers x 1 thread,
    2 DataLoader workers per run."""
    env = dict(os.environ, REF_DATA=str(tv_root), REF_DATASET="MNIST", REF_ACTS="relu",
               REF_MODELS="mlp", REF_PS=ps, REF_REPEATS=str(repeats), REF_EPOCHS=str(epochs),
               REF_WORKERS=str(WORKERS), REF_THREADS="1", REF_DATA_WORKERS="2", REF_OUT=str(out_dir))
    env.pop("REF_MAX_TRAIN", None)
    if max_train:
        env["REF_MAX_TRAIN"] = str(max_train)
    wall, cpu, watcher = run_watched([PYTHON, str(REFERENCE)], env=env, cwd=REFERENCE.parent)
    rows = read_csv(out_dir / "results_per_run.csv")
    return Campaign(wall, cpu, training_samples(rows, epochs, max_train), rows, watcher.worker_peak())


def bare_torch_rss() -> int:
    """RSS in bytes of a fresh process that has only imported torch."""
    code = "import psutil, torch; print(psutil.Process().memory_info().rss)"
    return int(subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout)


# ---------------------------------------------------------------- per-core throughput, in process


def seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def best_seconds(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls of fn (after one warm-up call)."""
    fn()
    return min(seconds(fn) for _ in range(repeats))


def matmul_loop(calls: int = 50):
    """A function doing `calls` float32 torch.mm of 512x784 by 784x256, and its FLOPs."""
    a, b = torch.randn(512, 784), torch.randn(784, 256)

    def loop():
        for _ in range(calls):
            torch.mm(a, b)

    return loop, 2 * 512 * 784 * 256 * calls


def forward_macs_per_sample(model: torch.nn.Module) -> int:
    """Multiply-adds of one forward pass for one 1x28x28 image, in Conv2d and Linear layers
    (activations, pooling and the loss are not counted; nor is it that the first layer needs
    no input gradient, so 3 x forward slightly overcounts the first conv's backward)."""
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs += output.numel() * kernel  # a batch of one image
        elif isinstance(module, torch.nn.Linear):
            macs += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    return macs


@dataclass
class CoreThroughput:
    samples_per_s: float
    flops_per_sample: float
    peak_gflops: float
    breakdown_us: dict[str, float]

    @property
    def gflops(self) -> float:
        return self.samples_per_s * self.flops_per_sample / 1e9


def step_breakdown(model, optimizer, source, labels, batch_size: int, precision: str,
                   repeats: int = 30) -> dict[str, float]:
    """Microseconds per batch of: batch assembly (gather + noise + normalize),
    forward + backward, optimizer.step (best of `repeats` batches each)."""
    indices = torch.arange(batch_size)
    autocast = nm.training_precision(precision, torch.device("cpu"))

    def forward_backward():
        optimizer.zero_grad()
        nm.batch_loss(model, images, labels[indices], torch.nn.functional.cross_entropy, autocast).backward()

    images = source.batch(indices)
    parts = {"batch+noise": lambda: source.batch(indices), "fwd+bwd": forward_backward,
             "optimizer.step": optimizer.step}
    return {name: 1e6 * best_seconds(fn, repeats) for name, fn in parts.items()}


def core_throughput(model_type: str, n_samples: int, rounds: int, data: nm.Dataset,
                    noise_type: str = "pixel_uniform", precision: str = "float32") -> CoreThroughput:
    """train_one_epoch (noise_type at p = 0.5, in `precision`) on the first n_samples images,
    1 thread, with the product's optimizer.

    Training and the torch.mm peak are timed in alternation, in short stretches of similar
    length, and the best of `rounds` of each is kept, so both see the same load from others.
    """
    cfg = nm.TrainConfig(model_type=model_type, noise_type=noise_type, p=0.5, seed=1, precision=precision)
    images, labels = data.train_images[:n_samples], data.train_labels[:n_samples]
    source = nm.BatchSource(cfg, images, torch.device("cpu"))
    model = nm.build_model(cfg.model_type, cfg.activation, cfg.hidden_sizes)
    optimizer = nm.Optimizer(model, cfg)
    order = nm.make_generator(cfg.seed, "data_order")
    if model_type == "mlp":
        flops = 6 * nm.count_parameters(model)
    else:
        flops = 2 * 3 * forward_macs_per_sample(model)

    def train():
        nm.train_one_epoch(model, optimizer, source, labels, cfg.batch_size, order, precision=precision)

    matmul, matmul_flops = matmul_loop()
    train(), matmul()  # warm up
    train_times, matmul_times = [], []
    for _ in range(rounds):
        train_times.append(seconds(train))
        matmul_times.append(seconds(matmul))
    breakdown = step_breakdown(model, optimizer, source, labels, cfg.batch_size, precision)
    return CoreThroughput(n_samples / min(train_times), flops, matmul_flops / min(matmul_times) / 1e9, breakdown)


# ---------------------------------------------------------------- accuracy vs the original


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def compare_accuracy(label: str, product: Campaign, reference: Campaign, reference_name: str = "original") -> None:
    ours = [float(r["test_accuracy"]) for r in product.rows]
    theirs = [float(r["test_accuracy"]) for r in reference.rows]
    (m1, se1), (m2, se2) = mean_and_stderr(ours), mean_and_stderr(theirs)
    diff, se = m1 - m2, math.hypot(se1, se2)
    verdict = "within" if abs(diff) <= 2 * se else "OUTSIDE"
    print(f"  {label:34s} {m1:.4f} +- {se1:.4f} (n={len(ours)})  vs {reference_name} {m2:.4f} +- {se2:.4f} "
          f"(n={len(theirs)}): diff {diff:+.4f}, stderr {se:.4f} -> {abs(diff) / se:.2f} stderr, {verdict} 2")


def accuracy_check(data_dir: Path, tv_root: Path, tmp: Path, repeats: int, epochs: int = 2,
                   max_train: int = 10_000, p: str = "0.5") -> None:
    print(f"\nAccuracy vs the original (MLP relu, pixel_uniform p={p}, {max_train} training samples, "
          f"{epochs} epochs, {repeats} repeats; mean +- stderr, stdev with ddof=1):")
    reference = reference_campaign(tv_root, tmp / "acc_ref", p, repeats, epochs, max_train)
    same_inputs = product_campaign(data_dir, tmp / "acc_raw", p, repeats, epochs, max_train,
                                   ("--normalize", "false"))
    default = product_campaign(data_dir, tmp / "acc_default", p, repeats, epochs, max_train)
    compare_accuracy("product, normalize=false (as orig.)", same_inputs, reference)
    compare_accuracy("product, defaults (normalize=true)", default, reference)


def paired_accuracy_difference(first: Campaign, second: Campaign) -> tuple[float, float]:
    """Mean and standard error (ddof=1) of the test-accuracy difference of runs with the same
    repeat, i.e. the same seeds: initial weights, data order and noise."""
    by_repeat = {r["repeat"]: float(r["test_accuracy"]) for r in second.rows}
    return mean_and_stderr([float(r["test_accuracy"]) - by_repeat[r["repeat"]] for r in first.rows])


def precision_check(data_dir: Path, tmp: Path, repeats: int, epochs: int = 2, p: str = "0.5") -> None:
    """CNN campaigns in float32 and in bfloat16 with the same seeds: wall time and accuracy."""
    print(f"\nMixed precision (CNN relu, pixel_uniform p={p}, full MNIST, {epochs} epochs, {repeats} repeats, "
          f"{WORKERS} workers x 1 thread; mean +- stderr, stdev with ddof=1):")
    single, mixed = (product_campaign(data_dir, tmp / f"precision_{precision}", p, repeats, epochs,
                                      extra_args=("--model_types", "cnn", "--precision", precision))
                     for precision in ("float32", "bfloat16"))
    print(f"  campaign wall time: float32 {single.wall:.0f} s, bfloat16 {mixed.wall:.0f} s: "
          f"{single.wall / mixed.wall:.2f}x the throughput")
    compare_accuracy("bfloat16", mixed, single, "float32")
    diff, se = paired_accuracy_difference(mixed, single)
    print(f"  paired by repeat (same seeds): bfloat16 - float32 = {diff:+.4f} +- {se:.4f} "
          f"({abs(diff) / se:.2f} stderr)")


# ---------------------------------------------------------------- scaling with the number of workers


def worker_counts(cores: int) -> list[int]:
    """1, 2, 4, ... up to the number of cores, and the number of cores itself."""
    counts = [2**i for i in range(cores.bit_length()) if 2**i <= cores]
    return counts if counts[-1] == cores else [*counts, cores]


def training_loop_throughput(campaign: Campaign, workers: int, epochs: int) -> float:
    """Training samples/s of the machine counting only the runs' training passes: workers x the
    median run's samples per second of train_seconds (no start-up, evaluation or idle tail)."""
    per_run = [epochs * TRAIN_SIZE / float(row["train_seconds"]) for row in campaign.rows]
    return workers * statistics.median(per_run)


def scaling(data_dir: Path, tmp: Path, epochs: int) -> None:
    """Campaign throughput at 1, 2, 4, ... workers x 1 thread: marginal throughput between
    campaigns of 2W and 6W runs (p in {0, 0.5}, W and 3W repeats), so every worker has runs to
    do in both, and the throughput of the training loops alone in the larger campaign."""
    print(f"(f) scaling, W workers x 1 thread, {epochs} epochs, full MNIST: marginal throughput (campaigns "
          f"of 2W and 6W runs) and training-loop throughput (W x the median run's samples/s in training):")
    first = None
    for workers in worker_counts(usable_cpus()):  # the CPUs this process may use, as the runner counts them
        small, large = (product_campaign(data_dir, tmp / f"scaling_{workers}_{repeats}", "0,0.5", repeats,
                                         epochs, workers=workers) for repeats in (workers, 3 * workers))
        marginal, loops = marginal_throughput(small, large), training_loop_throughput(large, workers, epochs)
        first = first or (marginal, loops)
        print(f"    {workers:3d} workers: marginal {marginal:10,.0f} samples/s = {marginal / first[0]:5.2f}x "
              f"1 worker ({marginal / first[0] / workers:4.0%} of linear); training loops {loops:10,.0f} "
              f"samples/s = {loops / first[1]:5.2f}x ({loops / first[1] / workers:4.0%} of linear)")


# ---------------------------------------------------------------- report


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"


def memory(campaign: Campaign) -> str:
    peak = campaign.worker_peak
    return (f"RSS {mib(peak['rss'])}, PSS (shared pages split among their sharers) {mib(peak['pss'])}, "
            f"USS (pages private to it) {mib(peak['uss'])}")


def print_core(name: str, result: CoreThroughput, flops_rule: str) -> None:
    parts = ", ".join(f"{k} {v:.0f}" for k, v in result.breakdown_us.items())
    print(f"{name}: {result.samples_per_s:,.0f} samples/s on 1 thread = {result.gflops:.1f} GFLOP/s "
          f"({flops_rule}: {result.flops_per_sample / 1e6:.2f} MFLOP/sample) = "
          f"{result.gflops / result.peak_gflops:.0%} of torch.mm peak {result.peak_gflops:.1f} GFLOP/s\n"
          f"    per batch of 128, us: {parts}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA, help="folder of the four MNIST *-ubyte.gz")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run in the campaigns of (a) and (e)")
    parser.add_argument("--accuracy", action="store_true", help="also compare accuracy with the original")
    parser.add_argument("--accuracy_repeats", type=int, default=16)
    parser.add_argument("--mixed_precision", action="store_true",
                        help="also compare CNN campaigns in float32 and bfloat16 (time, accuracy)")
    parser.add_argument("--precision_repeats", type=int, default=12)
    parser.add_argument("--skip_reference", action="store_true", help="leave out the original pipeline")
    parser.add_argument("--scaling", action="store_true",
                        help="also measure throughput at 1, 2, 4, ... workers, up to the number of cores")
    return parser.parse_args()


def print_campaign(name: str, campaign: Campaign) -> None:
    print(f"    {name:13s} {len(campaign.rows)} runs: {campaign.wall:6.1f} s wall, "
          f"{campaign.throughput:8,.0f} training samples/s; {campaign.cpu:6.1f} CPU s, "
          f"{campaign.samples / campaign.cpu:8,.0f} samples per CPU s")


def marginal_throughput(small: Campaign, large: Campaign) -> float:
    """Training samples per second of the runs that the larger campaign adds: the throughput of
    a long campaign, once start-up and the last runs' tail no longer count."""
    return (large.samples - small.samples) / (large.wall - small.wall)


def pixel_noise_core_throughputs(model_type: str, name: str, samples: int, rounds: int, data: nm.Dataset,
                                 flops_rule: str) -> dict[str, CoreThroughput]:
    """core_throughput with pixel noise in float32 and in bfloat16, printed with their ratio."""
    single = core_throughput(model_type, samples, rounds, data)
    print_core(name, single, flops_rule)
    mixed = core_throughput(model_type, samples, rounds, data, precision="bfloat16")
    print_core("    same, precision bfloat16", mixed, flops_rule)
    print(f"    bfloat16 / float32 training throughput: {mixed.samples_per_s / single.samples_per_s:.2f}x")
    return {"float32": single, "bfloat16": mixed}


def print_linearity(small: Campaign, large: Campaign, tiny: Campaign) -> None:
    runs, more = len(small.rows), len(large.rows)
    per_run = (large.wall - small.wall) / (more - runs)
    print(f"(e) linearity: {runs} runs {small.wall:.1f} s ({small.cpu:.1f} CPU s), {more} runs {large.wall:.1f} s "
          f"({large.cpu:.1f} CPU s): ratio {large.wall / small.wall:.2f} wall, {large.cpu / small.cpu:.2f} CPU "
          f"for {more / runs:.0f}x the runs; {per_run:.2f} s wall per extra run\n"
          f"    fixed cost (a campaign of {len(tiny.rows)} runs on {tiny.samples // len(tiny.rows)} samples): "
          f"{tiny.wall:.1f} s wall, {tiny.cpu:.1f} CPU s")


def print_ceiling(clean: CoreThroughput, pixel: dict[str, CoreThroughput], original: float,
                  target: float = 8.0) -> None:
    """What (a)'s campaigns could reach at most: every worker running (b)'s MLP training loops
    without pause, against the original's marginal throughput. Half of (a)'s runs are at p = 0,
    which draw no pixel noise and train at the rate of the label-noise loop."""
    grid = 2 / (1 / clean.samples_per_s + 1 / pixel["float32"].samples_per_s)  # equal samples at each p
    print(f"ceiling: {WORKERS} workers running (b)'s MLP training loops without pause (no start-up, evaluation "
          f"or bookkeeping), over the original's marginal {original:,.0f} samples/s:\n"
          f"    (a)'s grid, p in {{0, 0.5}}: {WORKERS} x {grid:,.0f} = {WORKERS * grid / original:.1f}x; "
          f"pixel noise at p = 0.5 alone: {WORKERS * pixel['float32'].samples_per_s / original:.1f}x "
          f"(bfloat16: {WORKERS * pixel['bfloat16'].samples_per_s / original:.1f}x)\n"
          f"    {target:.0f}x would need {target * original / WORKERS:,.0f} samples/s per core, without pause")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          f"(others share this machine)")
    with tempfile.TemporaryDirectory(prefix="bench_campaign_") as tmp_name:
        tmp = Path(tmp_name)
        tv_root = torchvision_layout(args.data_dir, tmp / "tv")  # the original reads this layout
        print(f"(a) campaigns on the grid MLP relu, pixel_uniform, p in {{0, 0.5}}, 2 and 6 repeats, full MNIST, "
              f"{args.epochs} epochs per run, {WORKERS} workers x 1 thread:")
        product, product_3n = (product_campaign(args.data_dir, tmp / f"product_{repeats}", "0,0.5", repeats,
                                                args.epochs) for repeats in (2, 6))
        for campaign in (product, product_3n):
            print_campaign("this product", campaign)
        if not args.skip_reference:
            reference, reference_3n = (reference_campaign(tv_root, tmp / f"reference_{repeats}", "0,0.5", repeats,
                                                          args.epochs) for repeats in (2, 6))
            for campaign in (reference, reference_3n):
                print_campaign("original", campaign)
            print(f"    ratio product / original, {len(product_3n.rows)}-run campaign: throughput "
                  f"{product_3n.throughput / reference_3n.throughput:.1f}x, samples per CPU second "
                  f"{product_3n.samples / product_3n.cpu / (reference_3n.samples / reference_3n.cpu):.1f}x")
            ours = marginal_throughput(product, product_3n)
            original_marginal = marginal_throughput(reference, reference_3n)
            print(f"    ratio of marginal throughput (the {len(product_3n.rows) - len(product.rows)} runs the larger "
                  f"campaign adds, i.e. a long campaign): {ours:,.0f} / {original_marginal:,.0f} samples/s = "
                  f"{ours / original_marginal:.1f}x")

        data = nm.load_dataset("mnist", args.data_dir)
        label_mlp = core_throughput("mlp", 30 * 128, 15, data, "label_flip")
        print_core("(b) MLP 784-256-128-10, label noise", label_mlp, "6 x parameters")
        pixel_mlp = pixel_noise_core_throughputs("mlp", "    MLP 784-256-128-10, pixel noise", 30 * 128, 15, data,
                                                 "6 x parameters")
        pixel_noise_core_throughputs("cnn", "(c) CNN, pixel noise", 3 * 128, 5, data, "2 x 3 x forward multiply-adds")

        print(f"(d) peak memory per pool worker, this product: {memory(product_3n)}; "
              f"a process that only imported torch: RSS {mib(bare_torch_rss())}")
        if not args.skip_reference:
            print(f"    original: largest pool or DataLoader worker: {memory(reference_3n)}")
            print_ceiling(label_mlp, pixel_mlp, original_marginal)
        tiny = product_campaign(args.data_dir, tmp / "product_tiny", "0", 2, 1, max_train=128)
        print_linearity(product, product_3n, tiny)

        if args.scaling:
            scaling(args.data_dir, tmp, args.epochs)
        if args.accuracy:
            accuracy_check(args.data_dir, tv_root, tmp, args.accuracy_repeats)
        if args.mixed_precision:
            precision_check(args.data_dir, tmp, args.precision_repeats)
    print(f"Load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
