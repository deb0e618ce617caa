"""Paired differences from the clean baseline, and repeats chosen for a precision target."""
import functools
import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import results_store as rs
import run_experiments as rx
from benchmarks import coverage
from conftest import run_main

LEVELS = {"normal": 0.945, "skewed (skewness 1)": 0.93}  # the coverage the sequential rule must reach
POINTS = 2000  # simulated grid points per spread


def consistent_with_at_least(coverage: float, level: float, points: int = POINTS) -> bool:
    """Not significantly below `level` (one-sided binomial test at 1%): with a few thousand simulated points the
    Monte Carlo error of a coverage (about +-0.005) is as large as the margins measured with many more points."""
    return coverage * points >= stats.binom.ppf(0.01, points, level)


@functools.cache
def simulated(first_stage: int) -> dict:
    """{(shape, std): (coverage of the sequential rule, its mean repeats, Stein's mean repeats)} at every spread seen
    in real campaigns, for normal and strongly skewed draws (target +-0.005, max_repeats 50)."""
    rng = np.random.default_rng(first_stage)
    sequential = rs.Target(half_width=0.005, first_stage=first_stage, max_repeats=50)
    stein = coverage.SteinTarget(half_width=0.005, first_stage=first_stage, max_repeats=50)
    cells = {}
    for shape, std in itertools.product(LEVELS, coverage.STDS):
        draw = functools.partial(coverage.SHAPES[shape], rng, std)
        covered, _, repeats = coverage.simulate(draw, sequential, POINTS)
        cells[shape, std] = covered, repeats, coverage.simulate(draw, stein, POINTS)[2]
    return cells


@pytest.mark.parametrize("first_stage", [3, 5])
def test_the_sequential_rule_covers_the_true_mean(first_stage):
    """The sequential rule's interval covers the true mean at the levels it was chosen for, at every spread
    (docs/statistics.md has the coverage measured with many more points)."""
    for (shape, std), (covered, _, _) in simulated(first_stage).items():
        assert consistent_with_at_least(covered, LEVELS[shape]), (shape, std, covered)


def test_the_sequential_rule_needs_fewer_runs_than_steins():
    """Averaged over the simulation (both first stages, both shapes, every spread): fewer runs than Stein's rule."""
    cells = [cell for first_stage in (3, 5) for cell in simulated(first_stage).values()]
    assert np.mean([sequential for _, sequential, _ in cells]) < np.mean([stein for _, _, stein in cells])


def test_the_coverage_check_fails_rules_that_stop_too_early():
    """The check has power: where the spread is near the target, two plain t intervals over runs whose number was
    chosen from the data cover clearly less than 94.5%: the one over the runs of Stein's rule, and stopping as
    soon as the plain 95% interval is within the target."""
    rng = np.random.default_rng(0)
    draw = functools.partial(coverage.SHAPES["normal"], rng, 0.006)
    for target in (coverage.SteinTarget(0.005, 3, 50), rs.Target(0.005, 3, 50, quantile=0.975)):
        plain = coverage.simulate(draw, target, POINTS)[1]
        assert not consistent_with_at_least(plain, LEVELS["normal"]) and plain < 0.925


def test_sequential_repeats_by_hand():
    target = rs.Target(half_width=0.01, first_stage=3, max_repeats=50)
    first = [0.90, 0.92, 0.94]  # sample std 0.02: the 99% bound 0.080 is above the target
    assert stats.t.ppf(0.99, 2) * 0.02 / math.sqrt(3) > 0.01
    # the next look: the fewest runs whose plain 95% interval at std 0.02 is within 0.01
    fewest = min(n for n in range(2, 51) if stats.t.ppf(0.975, n - 1) * 0.02 / math.sqrt(n) <= 0.01)
    assert target.repeats(first) == fewest == 18
    assert target.repeats(first + [0.92] * 14) == 18  # the look needs all 18: nothing new before then
    steady = first + [0.92] * 15  # std 0.0069 at 18 runs: within the 99% bound, the rule stops
    assert stats.t.ppf(0.99, 17) * np.std(steady, ddof=1) / math.sqrt(18) <= 0.01
    assert target.repeats(steady) == 18 and target.interval(steady) == (0.01, True)
    spread = first + [0.895, 0.945] * 7 + [0.92]  # std 0.023 at 18: more, as many as that spread implies
    implied = min(n for n in range(2, 51) if stats.t.ppf(0.975, n - 1) * np.std(spread, ddof=1) / math.sqrt(n) <= 0.01)
    assert 18 < target.repeats(spread) == implied < 50
    assert target.repeats([0.9, math.nan, math.nan]) == 3  # one ok run: no spread to go on, no more
    capped = rs.Target(half_width=0.001, first_stage=3, max_repeats=10)
    values = first + [0.91, 0.93] * 3 + [0.92]
    assert capped.repeats(first) == 10 and capped.repeats(values) == 10
    half, met = capped.interval(values)  # the plain t interval of all ten
    assert not met and half == pytest.approx(stats.t.ppf(0.975, 9) * np.std(values, ddof=1) / math.sqrt(10))


def test_stein_repeats_by_hand():
    target = coverage.SteinTarget(half_width=0.01, first_stage=3, max_repeats=50)
    first = [0.90, 0.92, 0.94]  # sample std 0.02
    t = stats.t.ppf(0.975, 2)
    assert target.repeats(first) == 50 < math.ceil((t * 0.02 / 0.01) ** 2)  # 74.1: capped
    assert coverage.SteinTarget(0.05, 3, 50).repeats(first) == math.ceil((t * 0.02 / 0.05) ** 2) == 3
    assert coverage.SteinTarget(0.02, 3, 50).repeats(first) == math.ceil((t * 0.02 / 0.02) ** 2) == 19
    assert target.repeats([0.9]) == 3  # too few runs to estimate a spread: the minimum
    assert target.repeats([0.9, math.nan, math.nan]) == 3
    nineteen = first + [0.5] * 16  # the second stage does not change the plan or the interval's width
    assert coverage.SteinTarget(0.02, 3, 50).repeats(nineteen) == 19
    assert coverage.SteinTarget(0.02, 3, 50).interval(nineteen) == (pytest.approx(t * 0.02 / math.sqrt(19)), True)


def per_run_frame(rows) -> pd.DataFrame:
    defaults = {f: None for f in rs.GROUP_FIELDS}
    defaults.update(dataset="mnist", model_type="mlp", activation="relu", hidden_sizes="16", epochs=1,
                    batch_size=128, optimizer="adam", learning_rate=0.001, weight_decay=0.0, normalize=True,
                    use_cuda=False, loss_correction="none", validation_fraction=0.0, precision="float32")
    return pd.DataFrame([{**defaults, "status": "ok", "test_loss": 1 - row["test_accuracy"], **row} for row in rows])


def test_paired_differences_by_hand():
    """delta = metric at p minus metric of the p = 0 run with the same seed and settings; a run
    without such a partner has none."""
    rows = [dict(noise_type="label_flip", p=0.0, seed=s, repeat=s, test_accuracy=a)
            for s, a in [(1, 0.90), (2, 0.95), (3, 0.80)]]
    rows += [dict(noise_type="label_flip", p=0.5, seed=s, repeat=s, test_accuracy=a)
             for s, a in [(1, 0.85), (2, 0.91), (3, 0.74), (4, 0.5)]]  # seed 4 has no clean partner
    summary = rs.summary_table(per_run_frame(rows)).set_index("p")
    deltas = pd.Series([-0.05, -0.04, -0.06])
    assert summary.loc[0.5, "delta_test_accuracy_mean"] == pytest.approx(deltas.mean())
    assert summary.loc[0.5, "delta_test_accuracy_stderr"] == pytest.approx(deltas.std(ddof=1) / math.sqrt(3))
    half = stats.t.ppf(0.975, 2) * deltas.std(ddof=1) / math.sqrt(3)
    assert summary.loc[0.5, "delta_test_accuracy_ci95_low"] == pytest.approx(deltas.mean() - half)
    assert summary.loc[0.5, "delta_test_accuracy_ci95_high"] == pytest.approx(deltas.mean() + half)
    assert summary.loc[0.5, "delta_test_loss_mean"] == pytest.approx(-deltas.mean())
    assert math.isnan(summary.loc[0.0, "delta_test_accuracy_mean"])


def test_loss_effects_pair_runs_by_seed():
    """a loss minus ce, run by run on the same seed and settings; a run without its twin is left out."""
    ce = [(1, 0.80), (2, 0.85), (3, 0.70)]
    forward = [(1, 0.82), (2, 0.88), (3, 0.71), (4, 0.99)]  # seed 4 has no ce twin
    rows = [dict(noise_type="label_flip", p=0.5, seed=s, repeat=s, loss=loss, test_accuracy=a)
            for loss, runs in (("ce", ce), ("forward", forward)) for s, a in runs]
    effects = rs.loss_effects(per_run_frame(rows))
    differences = pd.Series([0.02, 0.03, 0.01])
    row = effects.iloc[0]
    assert len(effects) == 1 and row["n"] == 3 and row["loss"] == "forward"
    assert row["minus_ce_test_accuracy_mean"] == pytest.approx(differences.mean())
    assert row["minus_ce_test_accuracy_stderr"] == pytest.approx(differences.std(ddof=1) / math.sqrt(3))
    assert row["minus_ce_test_loss_mean"] == pytest.approx(-differences.mean())
    half = stats.t.ppf(0.975, 2) * differences.std(ddof=1) / math.sqrt(3)
    assert row["minus_ce_test_accuracy_ci95_high"] == pytest.approx(differences.mean() + half)


def test_paired_partner_ignores_the_noise_type_but_not_other_settings():
    rows = [dict(noise_type="label_uniform", p=0.0, seed=1, repeat=0, test_accuracy=0.9),
            dict(noise_type="pixel_uniform", p=0.5, seed=1, repeat=0, test_accuracy=0.8),
            dict(noise_type="pixel_uniform", p=0.5, seed=1, repeat=0, test_accuracy=0.7, epochs=2)]
    summary = rs.summary_table(per_run_frame(rows)).set_index(["p", "epochs"])
    assert summary.loc[(0.5, 1), "delta_test_accuracy_mean"] == pytest.approx(-0.1)
    assert math.isnan(summary.loc[(0.5, 2), "delta_test_accuracy_mean"])  # no clean run with 2 epochs


def test_the_summary_reports_each_rules_interval():
    """sequential: mean +- target where the rule stopped within it, the plain t interval where max_repeats capped
    it; Stein's comparator (benchmarks/coverage.py): mean +- t * s0 / sqrt(n), s0 the first stage's std."""
    steady, noisy = [0.900, 0.901, 0.899], [0.80, 0.90, 0.85, 0.95]  # noisy: no rule meets 0.01 in 4 runs
    rows = [dict(noise_type="label_flip", p=p, seed=r, repeat=r, test_accuracy=a)
            for p, values in ((0.0, steady), (0.5, noisy)) for r, a in enumerate(values)]
    target = rs.Target(half_width=0.01, first_stage=3, max_repeats=4)
    stein = coverage.SteinTarget(half_width=0.01, first_stage=3, max_repeats=4)
    expected = {  # (rule, p): (half-width, target met)
        ("sequential", 0.0): (0.01, True),
        ("sequential", 0.5): (stats.t.ppf(0.975, 3) * np.std(noisy, ddof=1) / 2, False),
        ("stein", 0.0): (stats.t.ppf(0.975, 2) * np.std(steady, ddof=1) / math.sqrt(3), True),
        ("stein", 0.5): (stats.t.ppf(0.975, 2) * np.std(noisy[:3], ddof=1) / 2, False)}
    for name, rule in (("sequential", target), ("stein", stein)):
        summary = rs.summary_table(per_run_frame(rows), rule).set_index("p")
        for p in (0.0, 0.5):
            half, met = expected[name, p]
            mean = summary.loc[p, "test_accuracy_mean"]
            assert summary.loc[p, "test_accuracy_ci95_low"] == pytest.approx(mean - half)
            assert summary.loc[p, "test_accuracy_ci95_high"] == pytest.approx(mean + half)
            assert summary.loc[p, "target_met"] == met


def test_a_point_with_runs_of_two_campaign_seeds_gets_the_plain_interval():
    """A store holding runs of two campaign seeds (the grid rerun with another `seed`) has two runs per repeat
    number: the rule's order of repeats is lost, so the point gets the plain t interval of all its runs, its target
    not met; a point with runs of one seed still gets the rule's."""
    steady = [0.900, 0.901, 0.899]
    rows = [dict(noise_type="label_flip", p=p, seed=campaign * 100 + r, repeat=r, test_accuracy=a + campaign / 100)
            for p, campaigns in ((0.0, (0,)), (0.5, (0, 1))) for campaign in campaigns for r, a in enumerate(steady)]
    summary = rs.summary_table(per_run_frame(rows), rs.Target(half_width=0.01, first_stage=3, max_repeats=10))
    summary = summary.set_index("p")
    two_seeds = [a + c / 100 for c in (0, 1) for a in steady]
    half = stats.t.ppf(0.975, 5) * np.std(two_seeds, ddof=1) / math.sqrt(6)
    assert summary.loc[0.5, "n"] == 6
    assert summary.loc[0.5, "test_accuracy_ci95_high"] - summary.loc[0.5, "test_accuracy_mean"] == pytest.approx(half)
    assert not summary.loc[0.5, "target_met"]
    assert summary.loc[0.0, "target_met"]
    assert summary.loc[0.0, "test_accuracy_ci95_high"] - summary.loc[0.0, "test_accuracy_mean"] == pytest.approx(0.01)


@pytest.mark.slow
def test_targeted_campaign_meets_its_target_or_the_cap_with_fewer_runs(mnist_dir, tmp_path, no_figures):
    """Every grid point meets the target, reported as mean +- target, or reaches max_repeats, reported with its
    plain t interval; the campaign needs fewer runs than the fixed design that gives every point max_repeats; a
    rerun runs nothing more."""
    out = tmp_path / "out"
    argv = ["--activations", "relu", "--noise_types", "label_flip", "--ps", "0,0.5,0.9", "--extra_label_ps", "",
            "--repeats", "3", "--max_repeats", "10", "--target_ci95", "0.02", "--epochs", "1",
            "--max_train_samples", "5000", "--hidden_sizes", "32", "--data_dir", str(mnist_dir),
            "--output_dir", str(out)]
    code, stdout, _ = run_main(argv)
    assert code == 0
    summary = pd.read_csv(out / rs.SUMMARY_CSV)
    runs = pd.read_csv(out / rs.PER_RUN_CSV)
    plain = stats.t.ppf(0.975, summary["n"] - 1) * summary["test_accuracy_stderr"]
    half = plain.where(~summary["target_met"], 0.02)
    mean = summary["test_accuracy_mean"]
    assert np.allclose(summary["test_accuracy_ci95_low"], (mean - half).clip(lower=0))
    assert np.allclose(summary["test_accuracy_ci95_high"], (mean + half).clip(upper=1))
    assert (summary["target_met"] | (summary["n"] >= 10)).all()
    assert len(runs) < 10 * len(summary)
    for _, repeats in runs.groupby("p")["repeat"]:  # the next repeat indices: seeds stay paired across p
        assert sorted(repeats) == list(range(len(repeats)))
    capped = summary[~summary["target_met"]]
    if len(capped):
        assert f"{len(capped)} grid point(s) reached max_repeats = 10 before the 95% interval" in stdout
    for p in capped["p"]:
        assert f"\n  mlp/relu {'label_flip' if p else 'none'} p={p:.2f}\n" in stdout
    code, stdout, _ = run_main(argv)
    assert code == 0 and "0 to run" in stdout


def closed(campaign: rx.Campaign) -> rx.Campaign:
    campaign.log_file.close()
    campaign.lock.close()
    return campaign


def test_a_resumed_campaign_plans_the_same_repeats(tmp_path):
    """A point's plan follows from its stored repeats in order, whatever order they finished in: the campaign that
    queued each wave as runs finished out of order, and one resumed from the stored records, plan the same."""
    argv = ["--activations", "relu", "--noise_types", "label_flip", "--ps", "0.5", "--extra_label_ps", "",
            "--repeats", "3", "--max_repeats", "40", "--target_ci95", "0.01", "--output_dir", str(tmp_path)]
    config, _ = rx.config_from_args(argv)
    accuracy = np.random.default_rng(1).normal(0.8, 0.02, 40)
    live = rx.Campaign(config, rx.build_grid(config))
    (point,) = live.planned
    queue, order, waves = list(live.specs), np.random.default_rng(2), 0
    while queue:
        spec = queue.pop(order.integers(len(queue)))  # runs finish in any order
        bins = {field: [0.0] * rs.ECE_BINS for field in rs.RELIABILITY_FIELDS}
        record = (rx.run_record(spec, "failed", "worker lost", attempts=1) if spec.repeat == 4 else
                  rx.run_record(spec, "ok", test_accuracy=accuracy[spec.repeat], test_loss=0.5, seconds=1.0,
                                train_seconds=1.0, history_test_loss=[0.5] * config["epochs"], reliability=bins,
                                attempts=1))
        live.store.save(record)
        live.records[spec.run_id] = record
        more = live.more_repeats(point)
        queue += more
        waves += bool(more)
    closed(live)
    resumed = closed(rx.Campaign(config, rx.build_grid(config)))
    assert waves >= 2  # the first stage and at least two more waves
    values = [math.nan if r == 4 else a for r, a in enumerate(accuracy)]
    assert resumed.planned == live.planned == {point: rs.Target(0.01, 3, 40).repeats(values)}
    assert sorted(s.repeat for s in resumed.specs) == sorted(s.repeat for s in live.specs) == list(
        range(live.planned[point]))


def test_intervals_of_fractions_are_clipped_to_the_unit_interval():
    """Accuracies 0.999, 1, 1: the t interval reaches past 1 and is clipped there; a loss is not clipped."""
    rows = [dict(noise_type="label_flip", p=0.9, seed=s, repeat=s, test_accuracy=a, test_loss=a - 1.0)
            for s, a in [(1, 0.999), (2, 1.0), (3, 1.0)]]
    row = rs.summary_table(per_run_frame(rows)).iloc[0]
    values = pd.Series([0.999, 1.0, 1.0])
    half = stats.t.ppf(0.975, 2) * values.std(ddof=1) / math.sqrt(3)
    assert values.mean() + half > 1 and row["test_accuracy_ci95_high"] == 1.0
    assert row["test_accuracy_ci95_low"] == pytest.approx(values.mean() - half)
    assert row["test_loss_ci95_low"] == pytest.approx(values.mean() - 1 - half)  # unbounded: as computed
    assert row["test_loss_ci95_high"] == pytest.approx(values.mean() - 1 + half)
