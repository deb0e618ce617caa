"""Tests for plots.py on small hand-made results written in the runner's CSV schema (that of
current campaigns, and the narrower one of older campaigns)."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from scipy import stats

import plots
from plots import GID_DIAGONAL
from results_store import summary_table

ACTIVATIONS = ("relu", "tanh")
P_VALUES = (0.0, 0.5, 0.9)
REPEATS = 3
EPOCHS = 3
BINS = 15
SINGLE_RUN_GROUP = ("relu", "label_uniform", 1.0)  # activation, noise type, p: the n = 1 group
CONFIG = dict(hidden_sizes="256-128", epochs=EPOCHS, batch_size=128, optimizer="adam",
              learning_rate=0.001, weight_decay=0.0, normalize=True, seed=0, cpu_threads=1,
              max_train_samples=2000, data_dir="data", use_cuda=False)
# What campaigns before pair-flip noise, loss correction and the new metrics ran and wrote.
OLD_NOISE_TYPES = ("label_uniform", "label_flip", "pixel_uniform", "pixel_empirical")
OLD_FIGURES = ("accuracy_vs_p", "loss_vs_p", "label_vs_pixel", "learning_curves", "macro_metrics", "label_noise_theory")
LABEL_TYPES = tuple(t for t in plots.NOISE_TYPES if plots.is_label_noise(t))
MATRIX = json.dumps([[0.0] * k + [1.0] + [0.0] * (9 - k) for k in (*range(1, 10), 0)])  # class k -> k + 1
VALIDATION_FRACTION = 0.1


def synthetic_metrics(activation: str, noise_type: str, p: float, repeat: int) -> dict:
    """Plausible final metrics: label noise costs loss (theory floor + a margin) more than
    accuracy, label_flip collapses at 0.9, label_pairflip beyond 0.5, pixel noise degrades
    both smoothly."""
    clean = 0.97 if activation == "relu" else 0.95
    jitter = 0.004 * (repeat - 1)
    if plots.is_label_noise(noise_type):
        accuracy = clean - 0.1 * p
        if noise_type == "label_flip" and p >= 0.9:
            accuracy = 0.1
        if noise_type == "label_pairflip" and p > 0.5:
            accuracy = 0.05
        floor_type = noise_type if noise_type in plots.THEORY_NOISE_TYPES else "label_uniform"
        loss = float(plots.theory_loss_floor(floor_type, min(p, 0.99))) + 0.1
    else:
        strength = 0.6 if noise_type == "pixel_uniform" else 0.3
        accuracy, loss = clean - strength * p**2, 0.1 + strength * p
    accuracy += jitter
    return dict(test_accuracy=accuracy, test_loss=loss + jitter, test_macro_precision=accuracy - 0.01,
                test_macro_recall=accuracy - 0.005, test_macro_roc_auc=0.5 + accuracy / 2,
                train_loss=loss + 0.2, n_params=235146, seconds=10.0 + repeat)


def synthetic_new_metrics(noise_type: str, p: float, repeat: int, loss_correction: str, base: dict) -> dict:
    """The metrics added with calibration, memorisation, early stopping and noisy test images
    (NaN where the runner leaves them undefined); forward correction gains accuracy and loss."""
    label = plots.is_label_noise(noise_type)
    accuracy, loss = base["test_accuracy"], base["test_loss"]
    if loss_correction == "forward":
        accuracy, loss = accuracy + 0.05 * p, loss - 0.3 * p
    jitter = 0.002 * repeat
    ece = 0.02 + (0.3 if label else 0.1) * p + jitter
    memorised = 0.2 * p + jitter if label and p > 0 else math.nan
    return dict(
        test_accuracy=accuracy, test_loss=loss, test_ece=ece, test_mean_confidence=accuracy - ece,
        memorised_fraction=memorised, corrupted_true_fraction=0.7 - 0.3 * p if label and p > 0 else math.nan,
        clean_train_accuracy=accuracy + 0.01 if label else math.nan,
        selected_epoch=EPOCHS - 1 if p > 0 else EPOCHS, selected_test_accuracy=accuracy + 0.02 * p,
        selected_test_loss=loss - 0.1 * p,
        noisy_test_accuracy=accuracy - 0.1 * p if not label else math.nan,
        noisy_test_loss=loss + 0.2 * p if not label else math.nan)


def synthetic_runs(model_types=("mlp",), activations=ACTIVATIONS, noise_types=OLD_NOISE_TYPES,
                   p_values=P_VALUES, with_single_run_group=True, with_failed_run=True, new_format=False,
                   loss_corrections=("none", "forward"), validation_fraction=VALIDATION_FRACTION) -> pd.DataFrame:
    """results_per_run.csv rows: every combination x REPEATS, plus the n = 1 group and a failed run.

    new_format: the columns of current campaigns (loss correction, noise matrix, validation
    fraction, calibration, memorisation, ...), every label noise type run with each of
    `loss_corrections`; else the columns of older campaigns only.
    """
    corrections_of = lambda t: loss_corrections if new_format and plots.is_label_noise(t) else ("none",)  # noqa: E731
    specs = [(m, a, t, c, p, r) for m in model_types for a in activations for t in noise_types
             for c in corrections_of(t) for p in p_values for r in range(REPEATS)]
    if with_single_run_group:
        specs.append((model_types[0], SINGLE_RUN_GROUP[0], SINGLE_RUN_GROUP[1], "none", SINGLE_RUN_GROUP[2], 0))
    rows = []
    for run_id, (model_type, activation, noise_type, correction, p, repeat) in enumerate(specs):
        row = dict(run_id=run_id, repeat=repeat, status="ok", error="", attempts=1,
                   finished_at="2024-01-01T00:00:00", dataset="mnist", model_type=model_type,
                   activation=activation, noise_type=noise_type, p=p, **CONFIG,
                   **synthetic_metrics(activation, noise_type, p, repeat))
        if new_format:
            row.update(loss_correction=correction, validation_fraction=validation_fraction,
                       noise_matrix=MATRIX if noise_type == "label_matrix" else None,
                       **synthetic_new_metrics(noise_type, p, repeat, correction, row))
        rows.append(row)
    if with_failed_run:
        metrics = [m for m in plots.SUMMARY_METRICS if m in rows[0]]
        rows.append(dict(rows[0], run_id=len(rows), status="failed", error="RuntimeError: boom", attempts=3,
                         **{m: np.nan for m in metrics}))
    return pd.DataFrame(rows)


def synthetic_history(runs: pd.DataFrame) -> pd.DataFrame:
    """results_history.csv: EPOCHS rows per ok run, converging to the run's final metrics
    (with the newer per-epoch columns if `runs` has them)."""
    rows = []
    for run in plots.ok_runs(runs).to_dict("records"):
        for epoch in range(1, EPOCHS + 1):
            remaining = EPOCHS - epoch
            row = {k: run[k] for k in ("run_id", "repeat", "dataset", "model_type", "activation", "noise_type", "p")}
            row.update(epoch=epoch, test_loss=run["test_loss"] + 0.05 * remaining,
                       test_accuracy=run["test_accuracy"] - 0.02 * remaining)
            if "loss_correction" in run:
                row.update(loss_correction=run["loss_correction"], test_ece=run["test_ece"],
                           test_mean_confidence=run["test_mean_confidence"],
                           memorised_fraction=run["memorised_fraction"] * epoch / EPOCHS,
                           corrupted_true_fraction=run["corrupted_true_fraction"],
                           clean_train_accuracy=run["clean_train_accuracy"], validation_loss=run["test_loss"])
            rows.append(row)
    return pd.DataFrame(rows)


def bin_count(bin_index: int, repeat: int) -> int:
    """Images in a reliability bin: none below bin 2 (confidence >= 1/K), more for later repeats."""
    return 0 if bin_index < 2 else (bin_index + 1) * (repeat + 1) * 10


def bin_accuracy(bin_index: int, repeat: int, p: float) -> float:
    return min(1.0, (bin_index + 0.5) / BINS + 0.05 * (repeat - 1) + 0.2 * p)


def synthetic_reliability(runs: pd.DataFrame) -> pd.DataFrame:
    """results_reliability.csv: BINS rows per ok run; empty bins have NaN confidence/accuracy."""
    rows = []
    for run in plots.ok_runs(runs).to_dict("records"):
        for b in range(BINS):
            count = bin_count(b, run["repeat"])
            rows.append({**{k: run[k] for k in ("run_id", "repeat", "dataset", "model_type", "activation",
                                                "noise_type", "p", "loss_correction")},
                         "bin": b, "count": float(count),
                         "confidence": (b + 0.5) / BINS if count else math.nan,
                         "accuracy": bin_accuracy(b, run["repeat"], run["p"]) if count else math.nan})
    return pd.DataFrame(rows)


def write_synthetic_results(directory, with_summary=True, with_history=True, **run_options):
    """Write the CSVs (summary and history optional; reliability for new-format runs) into
    `directory`; return the runs."""
    directory.mkdir(parents=True, exist_ok=True)
    runs = synthetic_runs(**run_options)
    runs.to_csv(directory / plots.RUNS_CSV, index=False)
    if with_summary:
        summary_table(runs).to_csv(directory / plots.SUMMARY_CSV, index=False)
    if with_history:
        synthetic_history(runs).to_csv(directory / plots.HISTORY_CSV, index=False)
    if "loss_correction" in runs:
        synthetic_reliability(runs).to_csv(directory / plots.RELIABILITY_CSV, index=False)
    return runs


@pytest.fixture
def results_dir(tmp_path):
    directory = tmp_path / "results"
    write_synthetic_results(directory)
    return directory


@pytest.fixture
def summary(results_dir):
    return plots.load_results(results_dir).summary


NEW_FORMAT = dict(noise_types=plots.NOISE_TYPES, new_format=True)


@pytest.fixture
def new_results_dir(tmp_path):
    """Results of a current campaign: every noise type, label noise with and without forward
    correction, a validation split, calibration, memorisation, reliability and noisy-test data."""
    directory = tmp_path / "new_results"
    write_synthetic_results(directory, **NEW_FORMAT)
    return directory


@pytest.fixture
def new_results(new_results_dir):
    return plots.load_results(new_results_dir)


def errorbars(ax):
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def ydata(container) -> np.ndarray:
    """The y values of an errorbar container's data line."""
    return np.asarray(container.lines[0].get_ydata(), dtype=float)


def gids(ax):
    return {artist.get_gid() for artist in [*ax.lines, *ax.collections] if artist.get_gid()}


def used_axes(fig):
    """Axes that hold plotted data (skips blanked panels and the colorbar)."""
    return [ax for ax in fig.axes if ax.axison and ax.get_label() != "<colorbar>"]


# ---------------------------------------------------------------- theory


def test_information_limits_and_loss_floor_meet_at_ln_k():
    assert plots.information_limit("label_flip") == pytest.approx(0.9)
    assert plots.information_limit("label_uniform") == 1.0
    for noise_type in ("label_uniform", "label_flip"):
        assert plots.theory_loss_floor(noise_type, 0.0) == pytest.approx(0.0)
        limit = plots.information_limit(noise_type)
        assert plots.theory_loss_floor(noise_type, limit) == pytest.approx(math.log(10))
    assert plots.theory_loss_floor("label_uniform", 0.5) == pytest.approx(-math.log(1 - 0.45))
    assert plots.theory_loss_floor("label_flip", 0.5) == pytest.approx(math.log(2))
    for noise_type in ("pixel_uniform", "label_matrix"):  # no closed form (label_matrix: depends on M)
        with pytest.raises(ValueError):
            plots.theory_loss_floor(noise_type, 0.5)
        with pytest.raises(ValueError):
            plots.information_limit(noise_type)


def test_pairflip_theory():
    """A class-c image keeps label c with probability 1 - p and gets c + 1 with p: the argmax
    flips at p = 1/2, and a model of the noisy posterior puts 1 - p on the true class."""
    assert plots.information_limit("label_pairflip") == 0.5
    np.testing.assert_allclose(plots.theory_loss_floor("label_pairflip", [0.0, 0.5, 0.9]),
                               -np.log([1.0, 0.5, 0.1]))


# ---------------------------------------------------------------- summarising


def test_summary_table_matches_hand_computation():
    runs = synthetic_runs()
    summary = summary_table(runs)
    assert len(summary) == len(ACTIVATIONS) * len(OLD_NOISE_TYPES) * len(P_VALUES) + 1
    assert summary["n"].sum() == len(runs) - 1  # the failed run is left out

    row = summary[(summary.activation == "relu") & (summary.noise_type == "pixel_uniform") & (summary.p == 0.5)]
    values = [synthetic_metrics("relu", "pixel_uniform", 0.5, r)["test_accuracy"] for r in range(REPEATS)]
    std = np.std(values, ddof=1)
    half_width = stats.t.ppf(0.975, REPEATS - 1) * std / math.sqrt(REPEATS)
    assert row["n"].item() == REPEATS
    assert row["test_accuracy_mean"].item() == pytest.approx(np.mean(values))
    assert row["test_accuracy_std"].item() == pytest.approx(std)
    assert row["test_accuracy_stderr"].item() == pytest.approx(std / math.sqrt(REPEATS))
    assert row["test_accuracy_ci95_low"].item() == pytest.approx(np.mean(values) - half_width)
    assert row["test_accuracy_ci95_high"].item() == pytest.approx(np.mean(values) + half_width)

    single = summary[summary.p == 1.0]
    assert single["n"].item() == 1
    assert single[["test_accuracy_std", "test_accuracy_stderr", "test_accuracy_ci95_low"]].isna().all(axis=None)


def test_pool_over_activations_averages_activation_means_with_their_stderrs():
    runs = plots.ok_runs(synthetic_runs())
    pooled = plots.pool_over_activations(summary_table(runs))
    per_activation = runs.groupby(["noise_type", "p", "activation"])["test_loss"].agg(["mean", "std", "count"])
    per_activation["se2"] = per_activation["std"] ** 2 / per_activation["count"]
    direct = per_activation.groupby(["noise_type", "p"]).agg(
        mean=("mean", "mean"), se2=("se2", lambda s: s.sum(min_count=len(s))), groups=("mean", "size"),
        count=("count", "sum")).reset_index()
    merged = pooled.merge(direct, on=["noise_type", "p"])
    assert len(merged) == len(pooled) == len(OLD_NOISE_TYPES) * len(P_VALUES) + 1
    np.testing.assert_allclose(merged["test_loss_mean"], merged["mean"])
    np.testing.assert_allclose(merged["test_loss_stderr"], np.sqrt(merged["se2"]) / merged["groups"], equal_nan=True)
    np.testing.assert_allclose(merged["n"], merged["count"])
    assert merged["test_loss_stderr"].isna().sum() == 1  # the n = 1 group has no error bar


def test_load_results_recomputes_missing_or_stale_summary(tmp_path):
    runs = write_synthetic_results(tmp_path, with_summary=False, with_history=False)
    loaded = plots.load_results(tmp_path)
    assert loaded.history is None
    assert loaded.summary["n"].sum() == len(plots.ok_runs(runs))

    # a summary written before the last runs finished is replaced
    summary_table(runs.iloc[:10]).to_csv(tmp_path / plots.SUMMARY_CSV, index=False)
    assert plots.load_results(tmp_path).summary["n"].sum() == len(plots.ok_runs(runs))


def test_load_results_drops_history_of_failed_and_duplicated_attempts(results_dir):
    history = pd.read_csv(results_dir / plots.HISTORY_CSV)
    stray = history.iloc[:EPOCHS].assign(run_id=10_000)  # a run that is not ok in the runs file
    pd.concat([history, history.iloc[:EPOCHS], stray]).to_csv(results_dir / plots.HISTORY_CSV, index=False)
    assert len(plots.load_results(results_dir).history) == len(history)


def test_summarize_history_means_over_repeats_and_activations(results_dir):
    curves = plots.summarize_history(plots.load_results(results_dir).history)
    row = curves[(curves.noise_type == "pixel_uniform") & (curves.p == 0.5) & (curves.epoch == EPOCHS)]
    expected = np.mean([synthetic_metrics(a, "pixel_uniform", 0.5, r)["test_accuracy"]
                        for a in ACTIVATIONS for r in range(REPEATS)])
    assert row["n"].item() == len(ACTIVATIONS) * REPEATS
    assert row["test_accuracy_mean"].item() == pytest.approx(expected)


# ---------------------------------------------------------------- figures


def test_accuracy_vs_p_has_one_errorbar_line_per_noise_type_and_theory(summary):
    fig = plots.plot_metric_vs_p(summary, "test_accuracy")
    axes = used_axes(fig)
    assert len(axes) == len(ACTIVATIONS)
    for ax in axes:
        assert [c.get_label() for c in errorbars(ax)] == list(OLD_NOISE_TYPES)
        assert ax.get_xlabel() == "noise level p"
        assert ax.get_ylabel() == "test accuracy"
        assert {"chance", "info_limit:label_flip"} <= gids(ax)
        assert not any(g.startswith("theory_floor") for g in gids(ax))
        # p = 1 (label_uniform's limit) is only measured for relu (the n = 1 group)
        assert ("info_limit:label_uniform" in gids(ax)) == ax.get_title().endswith("relu")
    legend_labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend_labels[:4] == list(OLD_NOISE_TYPES) and "chance 1/K" in legend_labels
    assert any(label.startswith("information limit") for label in legend_labels)
    assert not any(label.startswith("theory floor") for label in legend_labels)  # not drawn on accuracy


def test_single_run_group_is_drawn_without_error_bar(summary):
    fig = plots.plot_metric_vs_p(summary, "test_accuracy")
    relu = next(ax for ax in used_axes(fig) if ax.get_title().endswith("relu"))
    uniform = next(c for c in errorbars(relu) if c.get_label() == "label_uniform")
    data_line, _, (bars,) = uniform.lines
    assert len(data_line.get_xdata()) == len(P_VALUES) + 1  # p = 1 is plotted ...
    finite_bars = [s for s in bars.get_segments() if s.size and np.isfinite(s).all()]
    assert len(finite_bars) == len(P_VALUES)  # ... but has no error bar (n = 1)


def test_loss_vs_p_draws_theory_floor_per_label_noise_type_in_its_colour(summary):
    fig = plots.plot_metric_vs_p(summary, "test_loss")
    for ax in used_axes(fig):
        assert len(errorbars(ax)) == len(OLD_NOISE_TYPES)
        assert ax.get_ylabel() == "test cross-entropy (nats)"
        floors = {line.get_gid(): line for line in ax.lines if (line.get_gid() or "").startswith("theory_floor")}
        assert set(floors) == {"theory_floor:label_uniform", "theory_floor:label_flip"}
        for gid, line in floors.items():
            noise_type = gid.split(":")[1]
            assert line.get_color() == plots.noise_color(noise_type) and line.get_linestyle() == "--"
            np.testing.assert_allclose(line.get_ydata(), plots.theory_loss_floor(noise_type, line.get_xdata()))
        assert "ln_K" in gids(ax) and "chance" not in gids(ax)


def test_metric_vs_p_has_a_row_per_model_and_blanks_missing_activations(tmp_path):
    runs = pd.concat([synthetic_runs(model_types=("mlp",)),
                      synthetic_runs(model_types=("cnn",), activations=("relu",), noise_types=("label_flip",),
                                     with_single_run_group=False, with_failed_run=False).assign(run_id=lambda f: f.run_id + 1000)])
    fig = plots.plot_metric_vs_p(summary_table(runs), "test_accuracy")
    assert len(fig.axes) == 2 * len(ACTIVATIONS)
    assert len(used_axes(fig)) == len(ACTIVATIONS) + 1
    cnn = next(ax for ax in used_axes(fig) if "cnn" in ax.get_title())
    assert [c.get_label() for c in errorbars(cnn)] == ["label_flip"]


def test_label_vs_pixel_puts_families_side_by_side(summary):
    fig = plots.plot_label_vs_pixel(summary)
    axes = used_axes(fig)
    assert len(axes) == 4  # (accuracy, loss) x (label, pixel)
    for ax in axes:
        label_family = "label noise" in ax.get_title()
        expected = OLD_NOISE_TYPES[:2] if label_family else plots.PIXEL_NOISE_TYPES
        assert [c.get_label() for c in errorbars(ax)] == list(expected)
        assert ax.get_xlabel() == "noise level p" and ax.get_ylabel()
        has_floor = any(g.startswith("theory_floor") for g in gids(ax))
        assert has_floor == (label_family and ax.get_ylabel().startswith("test cross-entropy"))


def test_macro_metrics_panels(summary):
    fig = plots.plot_macro_metrics(summary)
    axes = used_axes(fig)
    assert [ax.get_ylabel() for ax in axes] == ["macro precision", "macro recall", "macro ROC-AUC"]
    for ax in axes:
        assert len(errorbars(ax)) == len(OLD_NOISE_TYPES)
    assert "chance_auc" in gids(axes[2]) and "chance_auc" not in gids(axes[0])


def test_label_noise_theory_figure(summary):
    fig = plots.plot_label_noise_theory(summary)
    axes = used_axes(fig)
    assert len(axes) == 2 * 2  # label_uniform and label_flip
    for ax in axes:
        assert len(errorbars(ax)) == 1  # one dataset/model, pooled over activations
        noise_type = ax.get_title()
        assert f"info_limit:{noise_type}" in gids(ax)
        if ax.get_ylabel().startswith("test cross-entropy"):
            assert f"theory_floor:{noise_type}" in gids(ax)


def test_learning_curves_one_line_per_p_with_band(results_dir):
    fig = plots.plot_learning_curves(plots.load_results(results_dir).history)
    axes = used_axes(fig)
    assert len(axes) == 2 * len(OLD_NOISE_TYPES)
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    for ax in axes:
        n_p = len(P_VALUES) + ("label_uniform" in ax.get_title())  # the n = 1 group adds p = 1
        assert len(ax.lines) == len(ax.collections) == n_p
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel() in ("test accuracy", "test cross-entropy (nats)")


def test_figures_cope_with_a_single_noise_type_and_activation(tmp_path):
    runs = synthetic_runs(activations=("gelu",), noise_types=("pixel_empirical",), with_single_run_group=False)
    summary = summary_table(runs)
    for fig in (plots.plot_metric_vs_p(summary, "test_loss"), plots.plot_label_vs_pixel(summary),
                plots.plot_macro_metrics(summary), plots.plot_label_noise_theory(summary)):
        plots.save_figure(fig, tmp_path / "f.png")
        assert (tmp_path / "f.png").stat().st_size > 0


# ---------------------------------------------------------------- files


def test_write_headline_figures_writes_small_pngs(results_dir):
    paths = plots.write_headline_figures(results_dir)
    assert [p.name for p in paths] == [plots.FIGURE_FILES[n] for n in plots.HEADLINE_FIGURES]
    for path in paths:
        assert path.parent == results_dir / "figures"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 0 < path.stat().st_size < 200_000


def test_write_headline_figures_without_history_or_summary(tmp_path):
    write_synthetic_results(tmp_path, with_summary=False, with_history=False)
    assert len(plots.write_headline_figures(tmp_path)) == 2


def test_write_figures_skips_learning_curves_without_history(tmp_path):
    write_synthetic_results(tmp_path, with_history=False)
    written = plots.write_figures(tmp_path)
    assert {p.name for p in written} == {plots.FIGURE_FILES[n] for n in OLD_FIGURES if n != "learning_curves"}


def test_write_figures_writes_every_figure_for_current_results(tmp_path):
    write_synthetic_results(tmp_path, noise_types=("label_flip", "pixel_uniform"), activations=("relu",),
                            new_format=True)  # small: the notebook test draws the full set
    written = plots.write_figures(tmp_path)
    assert [p.name for p in written] == list(plots.FIGURE_FILES.values())
    for path in written:
        assert 0 < path.stat().st_size < 200_000


def test_write_headline_figures_with_no_successful_run(tmp_path):
    synthetic_runs().assign(status="failed").to_csv(tmp_path / plots.RUNS_CSV, index=False)
    assert plots.write_headline_figures(tmp_path) == []
    assert plots.write_headline_figures(tmp_path / "empty") == []


# ---------------------------------------------------------------- older results


def test_old_results_get_defaults_and_skip_the_new_figures(results_dir):
    results = plots.load_results(results_dir)
    assert set(results.summary["loss_correction"]) == {"none"}
    assert set(results.summary["validation_fraction"]) == {0.0}
    assert set(results.history["loss_correction"]) == {"none"}
    assert results.reliability is None
    new_figures = [name for name in plots.FIGURE_FILES if name not in OLD_FIGURES]
    assert len(new_figures) == 6
    for name in new_figures:  # write_figures skips them: test_write_figures_skips_learning_curves_without_history
        assert plots.build_figure(name, results) is None, name


def test_new_figures_skip_columns_that_are_all_missing(tmp_path):
    """A current campaign without the options: no forward runs, no validation split, no pixel noise."""
    runs = synthetic_runs(noise_types=("label_flip",), new_format=True, loss_corrections=("none",))
    runs = runs.assign(selected_epoch=np.nan, selected_test_accuracy=np.nan, selected_test_loss=np.nan,
                       validation_fraction=0.0)
    summary = summary_table(runs)
    assert plots.plot_loss_correction(summary) is None
    assert plots.plot_early_stopping(summary) is None
    assert plots.plot_pixel_test_matching(summary) is None
    assert plots.plot_calibration(summary) is not None


# ---------------------------------------------------------------- current results


def test_load_results_attaches_each_runs_config_to_history_and_reliability(new_results):
    ok = plots.ok_runs(new_results.runs)
    for table in (new_results.history, new_results.reliability):
        assert set(table["run_id"]) == set(ok["run_id"])
        assert set(table["validation_fraction"]) == {VALIDATION_FRACTION}
        assert set(table["loss_correction"]) == {"none", "forward"}
        assert set(table["hidden_sizes"]) == {CONFIG["hidden_sizes"]}
    assert len(new_results.reliability) == len(ok) * BINS


def test_every_noise_type_has_its_own_colour():
    colours = [plots.noise_color(t) for t in plots.NOISE_TYPES]
    assert len(set(colours)) == len(colours) == 6


def test_figures_1_to_6_show_uncorrected_runs_only(new_results):
    summary = new_results.summary
    uncorrected = plots.pool_groups(summary[summary["loss_correction"] == "none"], ["activation", "noise_type", "p"])
    fig = plots.plot_metric_vs_p(summary, "test_accuracy")
    assert "without loss correction" in fig.get_suptitle()
    for ax in used_axes(fig):
        activation = ax.get_title().rsplit(" · ", 1)[1]
        assert [c.get_label() for c in errorbars(ax)] == list(plots.NOISE_TYPES)
        for container in errorbars(ax):
            expected = uncorrected[(uncorrected.activation == activation) & (uncorrected.noise_type == container.get_label())]
            np.testing.assert_allclose(ydata(container), expected.sort_values("p")["test_accuracy_mean"])
        assert {"info_limit:label_flip", "info_limit:label_pairflip"} <= gids(ax)
        assert not any(g.endswith("label_matrix") for g in gids(ax))  # no theory for a user's matrix
    for fig in (plots.plot_label_vs_pixel(summary), plots.plot_macro_metrics(summary)):
        labels = [c.get_label() for ax in used_axes(fig) for c in errorbars(ax)]
        assert sorted(labels) == sorted(list(plots.NOISE_TYPES) * (len(labels) // len(plots.NOISE_TYPES)))
    theory = plots.plot_label_noise_theory(summary)
    assert sorted({ax.get_title() for ax in used_axes(theory)}) == sorted(plots.THEORY_NOISE_TYPES)
    assert all(len(errorbars(ax)) == 1 for ax in used_axes(theory))


def test_learning_curves_leave_out_corrected_runs(new_results):
    fig = plots.plot_learning_curves(new_results.history)
    axes = used_axes(fig)
    assert len(axes) == 2 * len(plots.NOISE_TYPES)
    for ax in axes:
        n_p = len(P_VALUES) + ("label_uniform" in ax.get_title())
        assert len(ax.lines) == n_p  # one line per p, not one per (p, loss correction)


def test_calibration_figure(new_results):
    fig = plots.plot_calibration(new_results.summary)
    axes = used_axes(fig)
    assert [ax.get_ylabel() for ax in axes] == [plots.METRIC_LABELS["test_ece"], plots.METRIC_LABELS["test_mean_confidence"]]
    pooled = plots.pool_over_activations(new_results.summary)
    for ax in axes:
        assert [c.get_label() for c in errorbars(ax)] == list(plots.NOISE_TYPES)
        assert all(np.isfinite(s).all() for c in errorbars(ax) if c.get_label() != "label_uniform"
                   for s in c.lines[2][0].get_segments())  # stderr bars everywhere but the n = 1 group
    flip = next(c for c in errorbars(axes[0]) if c.get_label() == "label_flip")
    expected = pooled[(pooled.noise_type == "label_flip") & (pooled.loss_correction == "none")]["test_ece_mean"]
    np.testing.assert_allclose(ydata(flip), expected)


def test_reliability_levels():
    assert plots.reliability_levels([0.0, 0.5]) == [0.0, 0.5]
    assert plots.reliability_levels([0.9, 0.0, 0.5, 0.9]) == [0.0, 0.5, 0.9]
    assert plots.reliability_levels([round(0.1 * i, 1) for i in range(10)] + [0.95]) == [0.0, 0.5, 0.95]


def test_reliability_figure_pools_bins_weighted_by_count(new_results):
    fig = plots.plot_reliability(new_results.reliability)
    axes = used_axes(fig)
    assert len(fig.axes) == len(axes) == len(LABEL_TYPES) * plots.RELIABILITY_LEVELS
    # each noise type's own levels: label_uniform's sweep (and the n = 1 group) reaches p = 1
    assert [ax.get_title().rsplit(" · ", 1)[1] for ax in axes[:6]] == ["p = 0", "p = 0.5", "p = 1"] + [
        "p = 0", "p = 0.5", "p = 0.9"]
    for ax in axes:
        assert GID_DIAGONAL in gids(ax) and ax.get_xlabel() == "confidence (max softmax)"
        assert len([line for line in ax.lines if not line.get_gid()]) == 1
    flip = next(ax for ax in axes if "label_flip" in ax.get_title() and ax.get_title().endswith("p = 0.5"))
    (line,) = [line for line in flip.lines if not line.get_gid()]
    assert len(line.get_xdata()) == BINS - 2  # empty bins are left out
    # bin 5, pooled over both activations and all repeats of the uncorrected runs, weighted by count
    weights = [bin_count(5, r) for _ in ACTIVATIONS for r in range(REPEATS)]
    accuracies = [bin_accuracy(5, r, 0.5) for _ in ACTIVATIONS for r in range(REPEATS)]
    assert line.get_ydata()[3] == pytest.approx(np.average(accuracies, weights=weights))
    assert line.get_xdata()[3] == pytest.approx(5.5 / BINS)


def test_memorisation_figure(new_results):
    fig = plots.plot_memorisation(new_results.history)
    axes = used_axes(fig)
    assert len(axes) == len(LABEL_TYPES) * len(plots.MEMORISATION_METRICS)
    for ax in axes:
        noisy_ps = len(P_VALUES) - 1 + ("label_uniform" in ax.get_title())  # p > 0; the n = 1 group adds p = 1
        expected = noisy_ps + (ax.get_ylabel() == plots.METRIC_LABELS["clean_train_accuracy"])  # p = 0 too
        assert len(ax.lines) == len(ax.collections) == expected
        assert ax.get_xlabel() == "epoch"
    memorised = next(ax for ax in axes if ax.get_title().endswith("label_flip")
                     and ax.get_ylabel() == plots.METRIC_LABELS["memorised_fraction"])
    half = next(line for line in memorised.lines if line.get_label() == "p=0.5")
    runs = plots.ok_runs(new_results.runs).query("noise_type == 'label_flip' and p == 0.5 and loss_correction == 'none'")
    assert half.get_ydata()[-1] == pytest.approx(runs["memorised_fraction"].mean())


def test_loss_correction_figure_pairs_uncorrected_and_forward_runs(new_results):
    fig = plots.plot_loss_correction(new_results.summary)
    axes = used_axes(fig)
    assert len(axes) == 2 * len(LABEL_TYPES)
    pooled = plots.pool_over_activations(new_results.summary)
    for ax in axes:
        noise_type = ax.get_title().rsplit(" · ", 1)[1]
        assert [c.get_label() for c in errorbars(ax)] == [f"{noise_type}, no correction", f"{noise_type}, forward correction"]
        none, forward = errorbars(ax)
        assert none.lines[0].get_linestyle() == "-" and forward.lines[0].get_linestyle() == "--"
        metric = "test_accuracy" if ax.get_ylabel() == "test accuracy" else "test_loss"
        expected = pooled[(pooled.noise_type == noise_type) & (pooled.loss_correction == "forward")][f"{metric}_mean"]
        np.testing.assert_allclose(ydata(forward), expected)
    legend_labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert {"no correction", "forward correction"} <= set(legend_labels)
    assert not any(label.startswith("pixel") for label in legend_labels)


def test_early_stopping_figure(new_results):
    fig = plots.plot_early_stopping(new_results.summary)
    axes = used_axes(fig)
    assert len(axes) == 3 * len(plots.NOISE_TYPES)
    for ax in axes:
        if ax.get_ylabel() == plots.METRIC_LABELS["epoch"]:  # only the selected epoch
            (selected,) = errorbars(ax)
            assert list(ydata(selected)) == [EPOCHS] + [EPOCHS - 1] * (len(ydata(selected)) - 1)
        else:
            assert [c.lines[0].get_linestyle() for c in errorbars(ax)] == ["-", "--"]
            assert errorbars(ax)[1].get_label().endswith("epoch of lowest noisy-validation loss")


def test_pixel_test_matching_figure(new_results):
    fig = plots.plot_pixel_test_matching(new_results.summary)
    axes = used_axes(fig)
    assert len(axes) == 2 * len(plots.PIXEL_NOISE_TYPES)
    for ax in axes:
        assert len(errorbars(ax)) == 2
        clean, noisy = map(ydata, errorbars(ax))
        if ax.get_ylabel() == "test accuracy":
            np.testing.assert_allclose(clean - noisy, 0.1 * np.array(P_VALUES))


def test_several_noise_matrices_are_never_mixed():
    runs = [synthetic_runs(noise_types=("label_matrix",), new_format=True, loss_corrections=("none",),
                           with_single_run_group=False, with_failed_run=False)]
    runs.append(runs[0].assign(run_id=runs[0].run_id + 1000, noise_matrix=json.dumps(np.eye(10).tolist()),
                               test_accuracy=runs[0].test_accuracy + 0.01))
    summary = summary_table(pd.concat(runs))
    for ax in used_axes(plots.plot_metric_vs_p(summary, "test_accuracy")):
        lines = {c.get_label(): ydata(c) for c in errorbars(ax)}
        assert set(lines) == {"label_matrix #1", "label_matrix #2"}
        assert len(lines["label_matrix #1"]) == len(P_VALUES)
        assert plots.noise_color("label_matrix #1") != plots.noise_color("label_matrix #2")


def test_validation_fractions_get_rows_of_their_own(tmp_path):
    runs = [synthetic_runs(new_format=True, validation_fraction=fraction, with_failed_run=False)
            for fraction in (0.0, VALIDATION_FRACTION)]
    summary = summary_table(pd.concat([runs[0], runs[1].assign(run_id=runs[1].run_id + 1000)]))
    fig = plots.plot_metric_vs_p(summary, "test_accuracy")
    titles = [ax.get_title() for ax in used_axes(fig)]
    assert len(titles) == 2 * len(ACTIVATIONS)
    assert sum(f"validation_fraction={VALIDATION_FRACTION}" in t for t in titles) == len(ACTIVATIONS)
