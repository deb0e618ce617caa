"""Coverage of the 95% intervals that a precision target reports, by simulation (no training).

For each spread of run-to-run noise seen in real campaigns (sample std 0.0005 to 0.08), it
simulates many grid points whose metric draws have a known mean, chooses their repeats with
results_store.Target and counts how often the reported interval covers the mean: the sequential
rule (the product's) side by side with, for comparison, Stein's two-stage rule (SteinTarget, defined
here), the plain t interval over the runs of Stein's rule, and the plain sequential rule (stop as
soon as the plain 95% interval is within the target, and report it).
Run from the repository root (about a minute):
    .venv/bin/python benchmarks/coverage.py [--first_stage 5] [--points 4000] [--quantile 0.99] [--stds 0.01,0.02]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import results_store as rs  # noqa: E402

STDS = [0.0005, 0.002, 0.004, 0.006, 0.01, 0.02, 0.08]
MEAN = 0.9
SHAPES = {  # name: draw(rng, std, k), mean MEAN and sample std `std`; skewed: a long tail of bad runs
    "normal": lambda rng, std, k: rng.normal(MEAN, std, k),
    "skewed (skewness 0.5)": lambda rng, std, k: MEAN - std * (rng.gamma(16, 1, k) - 16) / 4,
    "skewed (skewness 1)": lambda rng, std, k: MEAN - std * (rng.gamma(4, 1, k) - 4) / 2,
}


class SteinTarget(rs.Target):
    """Stein's two-stage rule, a comparator for the sequential one: n = (t * s0 / half_width)^2 (from first_stage
    to max_repeats) from the first stage's std s0, reporting mean +- t * s0 / sqrt(n), n the ok values (t: the 97.5%
    quantile at first_stage - 1 degrees of freedom). `quantile` is unused."""

    def next_look(self, values) -> int:
        """The n planned from the first stage alone (first_stage where it has no spread), or more if already run."""
        t_s0 = rs.t_times_std(rs.ok_values(values[:self.first_stage]))
        if math.isnan(t_s0):
            return max(len(values), self.first_stage)
        n = math.ceil((t_s0 / self.half_width) ** 2)
        return max(len(values), int(min(self.max_repeats, max(self.first_stage, n))))

    def interval(self, values) -> tuple[float, bool]:
        half = rs.t_times_std(rs.ok_values(values[:self.first_stage])) / math.sqrt(len(rs.ok_values(values)))
        return half, half <= self.half_width


def simulate(draw, target: rs.Target, points: int) -> tuple[float, float, float]:
    """(coverage of the interval the rule reports, of the plain t interval over the same runs, mean repeats) over
    `points` simulated grid points; draw(k) gives k runs' values."""
    covered = plain = repeats = 0
    for _ in range(points):
        values = draw(target.max_repeats)
        n = target.repeats(values)
        values = values[:n]
        error = abs(values.mean() - MEAN)
        covered += error <= target.interval(values)[0]
        plain += error <= rs.t_times_std(values) / math.sqrt(n)
        repeats += n
    return covered / points, plain / points, repeats / points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half_width", type=float, default=0.005)
    parser.add_argument("--first_stage", type=int, default=5)
    parser.add_argument("--max_repeats", type=int, default=50)
    parser.add_argument("--points", type=int, default=4000)
    parser.add_argument("--quantile", type=float, default=rs.SEQUENTIAL_QUANTILE,
                        help="the t quantile of the sequential rule's stopping bound")
    parser.add_argument("--stds", default=",".join(map(str, STDS)), help="the spreads simulated, comma-separated")
    args = parser.parse_args()
    sequential = rs.Target(args.half_width, args.first_stage, args.max_repeats, args.quantile)
    stein = SteinTarget(args.half_width, args.first_stage, args.max_repeats)
    plain_sequential = rs.Target(args.half_width, args.first_stage, args.max_repeats, 0.975)
    rng = np.random.default_rng(0)
    print(f"target half-width {args.half_width}, first stage {args.first_stage}, max_repeats {args.max_repeats}, "
          f"sequential bound at the {args.quantile} t quantile, {args.points} simulated grid points per cell")
    print("| draws | std | sequential | its mean repeats | two-stage (Stein) | its mean repeats "
          "| plain t interval at Stein's n | plain sequential rule |")
    print("|---|---|---|---|---|---|---|---|")
    for name, draw in SHAPES.items():
        for std in [float(s) for s in args.stds.split(",")]:
            cells = [simulate(lambda k: draw(rng, std, k), target, args.points)
                     for target in (sequential, stein, plain_sequential)]
            (covered, _, repeats), (stein_covered, plain, stein_repeats), (_, plain_sequential_covered, _) = cells
            print(f"| {name} | {std} | {covered:.3f} | {repeats:.1f} | {stein_covered:.3f} | {stein_repeats:.1f} "
                  f"| {plain:.3f} | {plain_sequential_covered:.3f} |")


if __name__ == "__main__":
    main()
