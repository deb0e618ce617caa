"""Campaign throughput of this checkout against another checkout of the product (before/after a change).

Run from the repository root:
    .venv/bin/python benchmarks/bench_versions.py OTHER_CHECKOUT --data_dir ../shared/data/mnist [--rounds 3]
Both run_experiments.py run the same campaigns as bench_campaign.py's (a) (MLP relu, pixel_uniform, p in
{0, 0.5}, full MNIST, 2 epochs per run, 2 workers x 1 thread) with 4 and 12 runs, alternating between the
checkouts round by round so that a change in the machine's speed hits both alike. It prints each round and
the medians: whole 12-run command and marginal throughput (the 8 runs the larger campaign adds), and this
checkout's ratio to the other.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MNIST_TRAIN_SIZE, EPOCHS = 60_000, 2


def campaign_seconds(checkout: Path, repeats: int, data_dir: Path) -> float:
    """Wall time of one campaign of 2 x `repeats` runs with `checkout`'s run_experiments.py."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "run_experiments.py", "--model_types", "mlp", "--activations", "relu",
                   "--noise_types", "pixel_uniform", "--ps", "0,0.5", "--extra_label_ps", "", "--repeats",
                   str(repeats), "--epochs", str(EPOCHS), "--max_workers", "2", "--cpu_threads_per_worker", "1",
                   "--data_dir", str(data_dir), "--output_dir", out]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=checkout, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{checkout}: run_experiments.py failed:\n{done.stdout}{done.stderr}")
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--data_dir", type=Path, default=ROOT / "data", help="folder of the four MNIST *-ubyte.gz")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    samples_per_run = MNIST_TRAIN_SIZE * EPOCHS
    checkouts = {"this": ROOT, "other": args.other.resolve()}
    whole, marginal = {name: [] for name in checkouts}, {name: [] for name in checkouts}
    for round_ in range(args.rounds):
        for name in ("this", "other") if round_ % 2 else ("other", "this"):
            small, large = (campaign_seconds(checkouts[name], r, args.data_dir.resolve()) for r in (2, 6))
            whole[name].append(12 * samples_per_run / large)
            marginal[name].append(8 * samples_per_run / (large - small))
            print(f"{name:5}  4 runs {small:5.1f} s, 12 runs {large:5.1f} s: whole {whole[name][-1]:,.0f}, "
                  f"marginal {marginal[name][-1]:,.0f} samples/s", flush=True)
    for label, values in (("whole 12-run command", whole), ("marginal throughput", marginal)):
        this, other = statistics.median(values["this"]), statistics.median(values["other"])
        print(f"{label}: this {this:,.0f}, other {other:,.0f} samples/s (medians): this / other = {this / other:.3f}")


if __name__ == "__main__":
    main()
