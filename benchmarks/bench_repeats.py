"""How much CPU time a precision target saves against a fixed number of repeats, for the same answer.

No training: it builds campaigns by resampling a real one (default: results/reference, 5 ok runs
per grid point). In each bootstrap campaign every grid point draws its runs with replacement from
its own ok runs (test accuracy), and the precision rule chooses its repeats as a campaign would
(results_store.Target, on the runs in order). The comparator is the fixed design, one number of
repeats n at every point, that reaches the same worst-case half-width W, the widest 95% interval
the rule's campaign reports:
  - oracle: n from the spreads known in advance (the std of each point's resampled distribution):
    the smallest n with t(n-1) * largest std / sqrt(n) <= W;
  - pilot: the same from the spreads a user could have guessed from a pilot of the same cost as
    the rule's first stage (first_stage runs per point, which the fixed design then reuses).
CPU time is runs weighted by the point's mean seconds per run. It prints the median and the 5-95%
range, over the bootstrap campaigns, of the ratio fixed / rule for the sequential rule and, for
comparison, for Stein's two-stage rule (SteinTarget in coverage.py), then the savings of two grid
features by grid arithmetic: one clean (p = 0) run per seed shared by every noise type, and one
run for a list of epochs (trained once for the longest), and the total. Run from the repository
root (under a minute):
    .venv/bin/python benchmarks/bench_repeats.py [--half_width 0.005] [--first_stage 5] [--campaigns 200]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import stdtrit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import results_store as rs  # noqa: E402
from coverage import SteinTarget  # noqa: E402


def fixed_repeats_for(std: float, half_width: float, most: int = 10_000) -> int:
    """The smallest n >= 2 with t(n-1) * std / sqrt(n) <= half_width (at most `most`)."""
    n = np.arange(2, most)
    within = stdtrit(n - 1, 0.975) * std / np.sqrt(n) <= half_width
    return int(n[within.argmax()]) if within.any() else most


def bootstrap_campaign(points: list[np.ndarray], target: rs.Target, rng) -> dict:
    """One resampled campaign under `target`: its repeats per point, worst reported half-width and pilot spreads."""
    draws = [rng.choice(values, target.max_repeats) for values in points]
    repeats = np.array([target.repeats(d) for d in draws])
    worst = max(target.interval(d[:n])[0] for d, n in zip(draws, repeats))
    pilot_std = max(np.std(d[:target.first_stage], ddof=1) for d in draws)
    return {"repeats": repeats, "worst": worst, "pilot_std": pilot_std}


def epoch_list_saving(runs: pd.DataFrame, epochs: list[int]) -> float:
    """CPU of one run per listed epoch count over that of one run for the longest that is evaluated at each; a run's
    seconds = its time outside training (counted once per listed epoch in both) + epochs x training per epoch."""
    outside = (runs["seconds"] - runs["train_seconds"]).mean()
    per_epoch = (runs["train_seconds"] / runs["epochs"]).mean()
    return (len(epochs) * outside + sum(epochs) * per_epoch) / (len(epochs) * outside + max(epochs) * per_epoch)


def quantiles(values) -> str:
    low, median, high = np.quantile(values, [0.05, 0.5, 0.95])
    return f"median {median:.2f}x (5-95%: {low:.2f}-{high:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(ROOT / "results" / "reference" / rs.PER_RUN_CSV))
    parser.add_argument("--half_width", type=float, default=0.005)
    parser.add_argument("--first_stage", type=int, default=5)
    parser.add_argument("--max_repeats", type=int, default=50)
    parser.add_argument("--campaigns", type=int, default=200)
    parser.add_argument("--epochs", default="5,10,30", help="the list of epochs whose one-run saving is computed")
    args = parser.parse_args()
    runs = pd.read_csv(args.runs, dtype={"noise_matrix": str, "hidden_sizes": str})
    ok = runs[runs["status"] == "ok"]
    grid = ok.groupby(rs.GROUP_FIELDS, dropna=False, sort=True)
    points = [group["test_accuracy"].to_numpy() for _, group in grid]
    seconds = grid["seconds"].mean().to_numpy()
    stds = np.array([np.std(values) for values in points])  # of the resampled distributions
    keys = grid.size().index.to_frame(index=False)
    shared_clean = ((keys["p"] == 0) & keys.duplicated(rs.PAIR_FIELDS + ["p"])).to_numpy()  # another point's run
    print(f"{args.runs}: {len(points)} grid points, {grid.size().min()}-{grid.size().max()} ok runs each, their "
          f"std (ddof 0) {stds.min():.4f}-{stds.max():.4f} (median {np.median(stds):.4f}); {args.campaigns} bootstrap "
          f"campaigns; target +-{args.half_width}, first stage {args.first_stage}, max_repeats {args.max_repeats}")
    rng = np.random.default_rng(0)
    totals = {}
    for rule, target_class in (("sequential", rs.Target), ("stein", SteinTarget)):
        target = target_class(args.half_width, args.first_stage, args.max_repeats)
        campaigns = [bootstrap_campaign(points, target, rng) for _ in range(args.campaigns)]
        rule_cpu = np.array([c["repeats"] @ seconds for c in campaigns])
        oracle = np.array([fixed_repeats_for(stds.max(), c["worst"]) for c in campaigns])
        pilot = np.array([max(args.first_stage, fixed_repeats_for(c["pilot_std"], c["worst"])) for c in campaigns])
        shared = np.array([c["repeats"][~shared_clean] @ seconds[~shared_clean] for c in campaigns])
        totals[rule] = oracle * seconds.sum() / shared
        repeats = np.concatenate([c["repeats"] for c in campaigns])
        print(f"{rule}: repeats per point {np.median(repeats):.0f} median, {repeats.mean():.1f} mean, "
              f"{np.mean(repeats >= args.max_repeats):.0%} at max_repeats; widest reported half-width W median "
              f"{np.median([c['worst'] for c in campaigns]):.4f}; fixed design for W: {np.median(oracle):.0f} "
              f"repeats (oracle), {np.median(pilot):.0f} (pilot), medians")
        print(f"  CPU fixed / rule, oracle spreads: {quantiles(oracle * seconds.sum() / rule_cpu)}")
        print(f"  CPU fixed / rule, pilot spreads:  {quantiles(pilot * seconds.sum() / rule_cpu)}")
        print(f"  with one shared clean run per seed (oracle): {quantiles(totals[rule])}")
    epochs = [int(e) for e in args.epochs.split(",")]
    saving = epoch_list_saving(ok, epochs)
    print(f"shared clean runs: {shared_clean.sum()} of the {len(points)} grid points are the clean run of another "
          f"noise type; one run for epochs {epochs} instead of one per entry: {saving:.2f}x less CPU")
    for rule, total in totals.items():
        print(f"total, {rule} rule with both features against today's fixed design (oracle): "
              f"{quantiles(total * saving)}")


if __name__ == "__main__":
    main()
