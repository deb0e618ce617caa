"""Tests for plots.py on small hand-made results written in the runner's CSV schema."""
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from scipy import stats

import plots
from results_store import summary_table

ACTIVATIONS = ("relu", "tanh")
P_VALUES = (0.0, 0.5, 0.9)
REPEATS = 3
EPOCHS = 3
SINGLE_RUN_GROUP = ("relu", "label_uniform", 1.0)  # activation, noise type, p: the n = 1 group
CONFIG = dict(hidden_sizes="256-128", epochs=EPOCHS, batch_size=128, optimizer="adam",
              learning_rate=0.001, weight_decay=0.0, normalize=True, seed=0, cpu_threads=1,
              max_train_samples=2000, data_dir="data", use_cuda=False)


def synthetic_metrics(activation: str, noise_type: str, p: float, repeat: int) -> dict:
    """Plausible final metrics: label noise costs loss (theory floor + a margin) more than
    accuracy, label_flip collapses at 0.9, pixel noise degrades both smoothly."""
    clean = 0.97 if activation == "relu" else 0.95
    jitter = 0.004 * (repeat - 1)
    if noise_type in plots.LABEL_NOISE_TYPES:
        collapsed = noise_type == "label_flip" and p >= 0.9
        accuracy = 0.1 if collapsed else clean - 0.1 * p
        loss = float(plots.theory_loss_floor(noise_type, min(p, 0.99))) + 0.1
    else:
        strength = 0.6 if noise_type == "pixel_uniform" else 0.3
        accuracy, loss = clean - strength * p**2, 0.1 + strength * p
    accuracy += jitter
    return dict(test_accuracy=accuracy, test_loss=loss + jitter, test_macro_precision=accuracy - 0.01,
                test_macro_recall=accuracy - 0.005, test_macro_roc_auc=0.5 + accuracy / 2,
                train_loss=loss + 0.2, n_params=235146, seconds=10.0 + repeat)


def synthetic_runs(model_types=("mlp",), activations=ACTIVATIONS, noise_types=plots.NOISE_TYPES,
                   p_values=P_VALUES, with_single_run_group=True, with_failed_run=True) -> pd.DataFrame:
    """results_per_run.csv rows: every combination x REPEATS, plus the n = 1 group and a failed run."""
    specs = [(m, a, t, p, r) for m in model_types for a in activations for t in noise_types
             for p in p_values for r in range(REPEATS)]
    if with_single_run_group:
        specs.append((model_types[0], *SINGLE_RUN_GROUP, 0))
    rows = []
    for run_id, (model_type, activation, noise_type, p, repeat) in enumerate(specs):
        rows.append(dict(run_id=run_id, repeat=repeat, status="ok", error="", attempts=1,
                         finished_at="2024-01-01T00:00:00", dataset="mnist", model_type=model_type,
                         activation=activation, noise_type=noise_type, p=p, **CONFIG,
                         **synthetic_metrics(activation, noise_type, p, repeat)))
    if with_failed_run:
        rows.append(dict(rows[0], run_id=len(rows), status="failed", error="RuntimeError: boom", attempts=3,
                         **{m: np.nan for m in plots.SUMMARY_METRICS}))
    return pd.DataFrame(rows)


def synthetic_history(runs: pd.DataFrame) -> pd.DataFrame:
    """results_history.csv: EPOCHS rows per ok run, converging to the run's final metrics."""
    rows = []
    for run in plots.ok_runs(runs).itertuples():
        for epoch in range(1, EPOCHS + 1):
            remaining = EPOCHS - epoch
            rows.append(dict(run_id=run.run_id, repeat=run.repeat, dataset=run.dataset,
                             model_type=run.model_type, activation=run.activation,
                             noise_type=run.noise_type, p=run.p, epoch=epoch,
                             test_loss=run.test_loss + 0.05 * remaining,
                             test_accuracy=run.test_accuracy - 0.02 * remaining))
    return pd.DataFrame(rows)


def write_synthetic_results(directory, with_summary=True, with_history=True, **run_options):
    """Write the three CSVs (summary and history optional) into `directory`; return the runs."""
    directory.mkdir(parents=True, exist_ok=True)
    runs = synthetic_runs(**run_options)
    runs.to_csv(directory / plots.RUNS_CSV, index=False)
    if with_summary:
        summary_table(runs).to_csv(directory / plots.SUMMARY_CSV, index=False)
    if with_history:
        synthetic_history(runs).to_csv(directory / plots.HISTORY_CSV, index=False)
    return runs


@pytest.fixture
def results_dir(tmp_path):
    directory = tmp_path / "results"
    write_synthetic_results(directory)
    return directory


@pytest.fixture
def summary(results_dir):
    return plots.load_results(results_dir).summary


def errorbars(ax):
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def gids(ax):
    return {artist.get_gid() for artist in [*ax.lines, *ax.collections] if artist.get_gid()}


def used_axes(fig):
    """Axes that hold plotted data (skips blanked panels and the colorbar)."""
    return [ax for ax in fig.axes if ax.axison and ax.get_label() != "<colorbar>"]


# ---------------------------------------------------------------- theory


def test_information_limits_and_loss_floor_meet_at_ln_k():
    assert plots.information_limit("label_flip") == pytest.approx(0.9)
    assert plots.information_limit("label_uniform") == 1.0
    for noise_type in plots.LABEL_NOISE_TYPES:
        assert plots.theory_loss_floor(noise_type, 0.0) == pytest.approx(0.0)
        limit = plots.information_limit(noise_type)
        assert plots.theory_loss_floor(noise_type, limit) == pytest.approx(math.log(10))
    assert plots.theory_loss_floor("label_uniform", 0.5) == pytest.approx(-math.log(1 - 0.45))
    assert plots.theory_loss_floor("label_flip", 0.5) == pytest.approx(math.log(2))
    with pytest.raises(ValueError):
        plots.theory_loss_floor("pixel_uniform", 0.5)


# ---------------------------------------------------------------- summarising


def test_summary_table_matches_hand_computation():
    runs = synthetic_runs()
    summary = summary_table(runs)
    assert len(summary) == len(ACTIVATIONS) * len(plots.NOISE_TYPES) * len(P_VALUES) + 1
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
    assert len(merged) == len(pooled) == len(plots.NOISE_TYPES) * len(P_VALUES) + 1
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
        assert [c.get_label() for c in errorbars(ax)] == list(plots.NOISE_TYPES)
        assert ax.get_xlabel() == "noise level p"
        assert ax.get_ylabel() == "test accuracy"
        assert {"chance", "info_limit:label_flip"} <= gids(ax)
        assert not any(g.startswith("theory_floor") for g in gids(ax))
        # p = 1 (label_uniform's limit) is only measured for relu (the n = 1 group)
        assert ("info_limit:label_uniform" in gids(ax)) == ax.get_title().endswith("relu")
    legend_labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend_labels[:4] == list(plots.NOISE_TYPES) and "chance 1/K" in legend_labels
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
        assert len(errorbars(ax)) == len(plots.NOISE_TYPES)
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
        expected = plots.LABEL_NOISE_TYPES if label_family else plots.PIXEL_NOISE_TYPES
        assert [c.get_label() for c in errorbars(ax)] == list(expected)
        assert ax.get_xlabel() == "noise level p" and ax.get_ylabel()
        has_floor = any(g.startswith("theory_floor") for g in gids(ax))
        assert has_floor == (label_family and ax.get_ylabel().startswith("test cross-entropy"))


def test_macro_metrics_panels(summary):
    fig = plots.plot_macro_metrics(summary)
    axes = used_axes(fig)
    assert [ax.get_ylabel() for ax in axes] == ["macro precision", "macro recall", "macro ROC-AUC"]
    for ax in axes:
        assert len(errorbars(ax)) == len(plots.NOISE_TYPES)
    assert "chance_auc" in gids(axes[2]) and "chance_auc" not in gids(axes[0])


def test_label_noise_theory_figure(summary):
    fig = plots.plot_label_noise_theory(summary)
    axes = used_axes(fig)
    assert len(axes) == 2 * len(plots.LABEL_NOISE_TYPES)
    for ax in axes:
        assert len(errorbars(ax)) == 1  # one dataset/model, pooled over activations
        noise_type = ax.get_title()
        assert f"info_limit:{noise_type}" in gids(ax)
        if ax.get_ylabel().startswith("test cross-entropy"):
            assert f"theory_floor:{noise_type}" in gids(ax)


def test_learning_curves_one_line_per_p_with_band(results_dir):
    fig = plots.plot_learning_curves(plots.load_results(results_dir).history)
    axes = used_axes(fig)
    assert len(axes) == 2 * len(plots.NOISE_TYPES)
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
    assert {p.name for p in written} == set(plots.FIGURE_FILES.values()) - {plots.FIGURE_FILES["learning_curves"]}


def test_write_headline_figures_with_no_successful_run(tmp_path):
    synthetic_runs().assign(status="failed").to_csv(tmp_path / plots.RUNS_CSV, index=False)
    assert plots.write_headline_figures(tmp_path) == []
    assert plots.write_headline_figures(tmp_path / "empty") == []
