"""Coverage of the 95% intervals that a precision target reports, by simulation (no training).

For each spread of run-to-run noise seen in real campaigns (sample std 0.0005 to 0.08), it
simulates many grid points whose metric draws have a known mean, chooses their repeats with
results_store.Target (Stein's two-stage rule) and counts how often the reported interval covers
the mean; for comparison, also the plain t interval over the same runs. Run from the
repository root (about a minute):
    .venv/bin/python benchmarks/coverage.py [--half_width 0.005] [--first_stage 5] [--points 4000]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import results_store as rs  # noqa: E402

STDS = [0.0005, 0.002, 0.004, 0.006, 0.01, 0.02, 0.08]
MEAN = 0.9
SHAPES = {  # name: draw(rng, std, k), mean MEAN and sample std `std`
    "normal": lambda rng, std, k: rng.normal(MEAN, std, k),
    "skewed (skewness 0.5)": lambda rng, std, k: MEAN - std * (rng.gamma(16, 1, k) - 16) / 4,
    "skewed (skewness 1)": lambda rng, std, k: MEAN - std * (rng.gamma(4, 1, k) - 4) / 2,
}


def coverage(draw, target: rs.Target, points: int) -> tuple[float, float, float]:
    """(coverage of the two-stage interval, of the plain t interval, mean repeats)."""
    two_stage = plain = repeats = 0
    for _ in range(points):
        first = draw(target.first_stage)
        n = target.repeats(first)
        values = np.concatenate([first, draw(n - target.first_stage)])
        error = abs(values.mean() - MEAN)
        two_stage += error <= target.half_width_of(first, n)
        plain += error <= stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)
        repeats += n
    return two_stage / points, plain / points, repeats / points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half_width", type=float, default=0.005)
    parser.add_argument("--first_stage", type=int, default=5)
    parser.add_argument("--max_repeats", type=int, default=50)
    parser.add_argument("--points", type=int, default=4000)
    args = parser.parse_args()
    target = rs.Target(args.half_width, args.first_stage, args.max_repeats)
    rng = np.random.default_rng(0)
    print(f"target half-width {args.half_width}, first stage {args.first_stage}, max_repeats {args.max_repeats}, "
          f"{args.points} simulated grid points per cell")
    print("| draws | std | two-stage interval | plain t interval | mean repeats |")
    print("|---|---|---|---|---|")
    for name, draw in SHAPES.items():
        for std in STDS:
            two_stage, plain, repeats = coverage(lambda k: draw(rng, std, k), target, args.points)
            print(f"| {name} | {std} | {two_stage:.3f} | {plain:.3f} | {repeats:.1f} |")


if __name__ == "__main__":
    main()
