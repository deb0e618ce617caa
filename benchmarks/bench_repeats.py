"""How much CPU time a precision target saves against a fixed number of repeats.

Runs one targeted campaign (`run_experiments.py --target_ci95 H`) on a grid with a realistic
spread of run-to-run noise: MLP relu, label_flip and pixel_uniform, p in {0, 0.1, ..., 0.9} plus
0.95 and 1.0 for label_flip, 10,000 training samples, 3 epochs. From its runs it measures:
  - the CPU time the targeted campaign took (each run trains on one thread: the sum of the
    runs' seconds);
  - the fixed-repeat design that reaches the same worst-case half-width: the smallest n such
    that every grid point's 95% interval t(n-1) * s / sqrt(n), with s its measured sample std,
    is at most the widest interval the targeted campaign reported; its CPU time is n times the
    measured mean seconds of a run at each point;
and prints their ratio. Run from the repository root (about 5 minutes on 2 cores):
    .venv/bin/python benchmarks/bench_repeats.py --data_dir ../shared/data/mnist [--half_width 0.015]
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]


def targeted_campaign(args, output_dir: Path) -> None:
    command = [sys.executable, str(ROOT / "run_experiments.py"), "--output_dir", str(output_dir),
               "--data_dir", args.data_dir, "--model_types", "mlp", "--activations", "relu",
               "--noise_types", "label_flip,pixel_uniform", "--ps", ",".join(f"{p / 10:g}" for p in range(10)),
               "--extra_label_ps", "0.95,1.0", "--max_train_samples", "10000", "--epochs", "3",
               "--repeats", str(args.first_stage), "--target_ci95", str(args.half_width),
               "--max_repeats", str(args.max_repeats)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def fixed_repeats_for(stds: pd.Series, half_width: float, most: int = 10_000) -> int:
    """The smallest n with t(n-1) * s / sqrt(n) <= half_width for every std s."""
    worst = stds.max()
    for n in range(2, most):
        if stats.t.ppf(0.975, n - 1) * worst / math.sqrt(n) <= half_width:
            return n
    return most


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--half_width", type=float, default=0.015)
    parser.add_argument("--first_stage", type=int, default=5)
    parser.add_argument("--max_repeats", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        targeted_campaign(args, Path(tmp))
        runs = pd.read_csv(Path(tmp) / "results_per_run.csv")
        summary = pd.read_csv(Path(tmp) / "results_summary.csv")
    runs = runs[runs["status"] == "ok"]
    points = runs.groupby(["noise_type", "p"])
    worst = ((summary["test_accuracy_ci95_high"] - summary["test_accuracy_ci95_low"]) / 2).max()
    n_fixed = fixed_repeats_for(points["test_accuracy"].std(ddof=1), worst)
    targeted_cpu = runs["seconds"].sum()
    fixed_cpu = n_fixed * points["seconds"].mean().sum()
    spread = points["test_accuracy"].agg(["size", "std"]).rename(columns={"size": "repeats"})
    print(spread.round(4).to_string())
    print(f"grid: {len(summary)} points; targeted campaign (half-width {args.half_width}, first stage "
          f"{args.first_stage}, max_repeats {args.max_repeats}): {len(runs)} runs, repeats per point "
          f"{points.size().min()}-{points.size().max()}, {int(summary['target_met'].sum())} points met the target")
    print(f"widest reported 95% half-width: {worst:.4f}; the fixed design needs {n_fixed} repeats at every "
          f"point for it ({n_fixed * len(summary)} runs)")
    print(f"CPU time: targeted {targeted_cpu / 60:.1f} min, fixed {fixed_cpu / 60:.1f} min: "
          f"the targeted campaign needs {fixed_cpu / targeted_cpu:.2f}x less")


if __name__ == "__main__":
    main()
