"""plots.py on small synthetic campaigns written through results_store (and, slow, on the
committed results): which figures exist, and that every drawn line is one experiment."""
import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

import plots
import registry
import results_store as rs
from conftest import EPOCHS, LABEL_PS, PIXEL_PS, SEEDS, campaign, grid_records, record

ROOT = Path(__file__).resolve().parents[1]
# Two permutation matrices for label_matrix: class k -> k + 1 and class k -> k + 2.
K = registry.NUM_CLASSES
MATRICES = tuple(tuple(tuple(float(j == (i + shift) % K) for j in range(K)) for i in range(K)) for shift in (1, 2))


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    """relu and tanh under label_uniform, label_flip and pixel_uniform; relu's label_flip also with
    the forward loss on the same seeds; tanh's label_uniform with the forward loss on two of them."""
    records = grid_records()
    records += grid_records(("relu",), ("label_flip",), loss="forward")
    records += grid_records(("tanh",), ("label_uniform",), seeds=SEEDS[:2], loss="forward")
    records += [{**record(SEEDS[0], "tanh", "label_uniform", 0.5), "run_id": "broken", "status": "failed"}]
    return campaign(tmp_path_factory.mktemp("campaign"), records)


@pytest.fixture(scope="module")
def results(results_dir) -> rs.Results:
    return rs.read_results(results_dir)


def errorbars(fig) -> list[tuple]:
    """(axes, container) of every error-bar line of `fig`."""
    return [(ax, c) for ax in fig.axes for c in ax.containers if isinstance(c, ErrorbarContainer)]


def experiment_lines(summary, metrics) -> list[dict]:
    """Every line a figure may draw: one experiment's means and standard errors over p."""
    keys = [f for f in rs.GROUP_FIELDS if f != "p"]
    lines = []
    for _, part in summary.groupby(keys, dropna=False):
        part = part.sort_values("p")
        for metric in metrics:
            rows = part[part[f"{metric}_mean"].notna()]
            lines.append(dict(activation=rows["activation"].iloc[0] if len(rows) else None, metric=metric,
                              noise_type=part["noise_type"].iloc[0], loss=part["loss"].iloc[0],
                              p=rows["p"].to_numpy(), mean=rows[f"{metric}_mean"].to_numpy(),
                              stderr=rows[f"{metric}_stderr"].to_numpy()))
    return lines


def matching_experiments(container, lines) -> list[dict]:
    line = container.lines[0]
    x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    return [e for e in lines if len(e["p"]) == len(x) and np.array_equal(e["p"], x) and np.array_equal(e["mean"], y)]


def is_paired_loss_panel(ax) -> bool:
    return ax.get_ylabel() == plots.LABELS[plots.PAIRED_LOSS]


def half_lengths(container) -> np.ndarray:
    segments = container.lines[2][0].get_segments()
    return np.array([(top[1] - bottom[1]) / 2 for bottom, top in segments])


@pytest.mark.parametrize("draw, metrics", [
    (lambda s, r: plots.plot_metric_vs_p(s, "test_accuracy"), ["test_accuracy"]),
    (lambda s, r: plots.plot_metric_vs_p(s, "test_loss"), ["test_loss"]),
    (lambda s, r: plots.plot_label_vs_pixel(s), ["test_accuracy", "test_loss"]),
    (lambda s, r: plots.plot_macro_metrics(s), ["test_macro_precision", "test_macro_recall", "test_macro_roc_auc"]),
    (lambda s, r: plots.plot_label_noise_theory(s), ["test_accuracy", "test_loss"]),
    (lambda s, r: plots.plot_calibration(s), ["test_ece", "test_mean_confidence"]),
    (lambda s, r: plots.plot_losses(s, r), ["test_accuracy", "test_loss"]),
    (lambda s, r: plots.plot_pixel_test_matching(s), ["test_accuracy", "test_loss", "noisy_test_accuracy",
                                                      "noisy_test_loss"]),
    (lambda s, r: plots.plot_paired_differences(s), ["delta_test_accuracy", "delta_test_loss"]),
])
def test_every_line_is_one_experiment_with_standard_error_bars(results, draw, metrics):
    fig = draw(results.summary, results.runs)
    lines = experiment_lines(results.summary, metrics)
    drawn = [(ax, c) for ax, c in errorbars(fig) if not is_paired_loss_panel(ax)]  # figure 10's own test
    assert drawn
    for ax, container in drawn:
        matches = matching_experiments(container, lines)
        assert len(matches) == 1, (ax.get_title().replace("\n", " "), container.get_label())
        experiment = matches[0]
        assert experiment["activation"] in ax.get_title().replace("\n", " ") + container.get_label()
        np.testing.assert_allclose(half_lengths(container), experiment["stderr"], rtol=1e-9)


def loss_in(title: str) -> str:
    """The loss a panel title names ("... · loss=forward · ..."); without one, ce."""
    return next((part.removeprefix("loss=") for part in title.split(" · ") if part.startswith("loss=")), "ce")


def test_figures_draw_each_loss_in_panels_of_its_own_and_compare_them_in_figure_ten(results):
    lines = experiment_lines(results.summary, ["test_accuracy"])
    by_panel = plots.plot_metric_vs_p(results.summary, "test_accuracy")
    for ax, container in errorbars(by_panel):
        assert matching_experiments(container, lines)[0]["loss"] == loss_in(ax.get_title().replace("\n", " "))
    assert {loss_in(ax.get_title().replace("\n", " ")) for ax, _ in errorbars(by_panel)} == {"ce", "forward"}
    compared = plots.plot_losses(results.summary, results.runs)
    by_loss = {}
    for ax, container in errorbars(compared):
        experiment = matching_experiments(container, lines)
        if experiment:  # the accuracy panels: a line per loss, labelled with it
            assert container.get_label() == experiment[0]["loss"]
            by_loss.setdefault(experiment[0]["loss"], set()).add(
                (experiment[0]["activation"], experiment[0]["noise_type"]))
    assert by_loss["forward"] == {("relu", "label_flip"), ("tanh", "label_uniform")}
    assert by_loss["ce"] >= by_loss["forward"]


def test_panel_titles_name_a_losss_settings_only_where_it_has_some(tmp_path):
    records = grid_records(("relu",), ("label_flip",)) + grid_records(("relu",), ("label_flip",), loss="gce",
                                                                      loss_settings=(("q", 0.7),))
    fig = plots.plot_metric_vs_p(rs.read_results(campaign(tmp_path, records)).summary)
    titles = sorted(ax.get_title().replace("\n", " ") for ax in fig.axes if ax.get_title())
    assert titles == ["mnist · mlp · loss=ce · relu", "mnist · mlp · loss=gce · q=0.7 · relu"]


def test_losses_panel_shows_each_loss_minus_ce_paired_by_seed(results):
    fig = plots.plot_losses(results.summary, results.runs)
    paired = {ax.get_title().replace("\n", " "): c for ax, c in errorbars(fig) if is_paired_loss_panel(ax)}
    assert sorted(paired) == ["mnist · mlp · relu · label_flip", "mnist · mlp · tanh · label_uniform"]
    assert {c.get_label() for c in paired.values()} == {"forward"}
    effects = rs.loss_effects(results.runs)
    for (activation, noise_type), seeds in ((("relu", "label_flip"), SEEDS), (("tanh", "label_uniform"), SEEDS[:2])):
        expected = effects[(effects["activation"] == activation) & (effects["noise_type"] == noise_type)]
        expected = expected.sort_values("p")
        assert expected["p"].tolist() == list(LABEL_PS) and (expected["n"] == len(seeds)).all()  # seeds of both
        container = paired[f"mnist · mlp · {activation} · {noise_type}"]
        np.testing.assert_allclose(np.asarray(container.lines[0].get_ydata(), float),
                                   expected["minus_ce_test_accuracy_mean"])
        np.testing.assert_allclose(half_lengths(container), expected["minus_ce_test_accuracy_stderr"])
    # by hand at one point: tanh, label_uniform, p = 0.5, forward minus ce on seeds 11 and 22
    ok = results.runs[results.runs["status"] == "ok"]
    runs = ok.set_index(["activation", "noise_type", "p", "loss", "seed"])["test_accuracy"]
    differences = [runs[("tanh", "label_uniform", 0.5, "forward", s)] - runs[("tanh", "label_uniform", 0.5, "ce", s)]
                   for s in SEEDS[:2]]
    row = effects[(effects["activation"] == "tanh") & (effects["p"] == 0.5)].iloc[0]
    assert row["minus_ce_test_accuracy_mean"] == pytest.approx(np.mean(differences))


def test_report_tables_hold_the_summary_values(results):
    summary = results.summary.set_index(plots.EXPERIMENT + ["loss"])
    clean = plots.clean_table(results.summary)
    assert list(clean.index.get_level_values("activation")) == ["relu", "tanh"]  # one row each, not per noise type
    row = summary.loc[("mnist", "mlp", "label_flip", "tanh", 0.0, "ce")]  # the first noise type's
    assert clean.loc[("mnist", "mlp", "tanh"), "accuracy"] == round(row["test_accuracy_mean"], 4)
    assert clean.loc[("mnist", "mlp", "tanh"), "CI low"] == round(row["test_accuracy_ci95_low"], 4)
    accuracy = plots.metric_table(results.summary, "test_loss")
    assert accuracy.loc[("mnist", "mlp", "pixel_uniform", 0.5), "relu"] == round(
        summary.loc[("mnist", "mlp", "pixel_uniform", "relu", 0.5, "ce"), "test_loss_mean"], 3)
    assert len(accuracy) == 2 * len(LABEL_PS) + len(PIXEL_PS)  # every noise level, uncorrected runs only
    excess = plots.posterior_excess_table(results.summary)
    assert excess.loc[("mnist", "mlp", "label_flip", 0.5), "relu"] == round(
        summary.loc[("mnist", "mlp", "label_flip", "relu", 0.5, "ce"), "test_loss_mean"] - np.log(2), 3)
    assert 1.0 not in excess.loc[("mnist", "mlp", "label_uniform")].index  # at the information limit
    pixel = plots.pixel_test_table(results.summary)
    assert pixel.loc[("mnist", "mlp", "pixel_uniform", 0.9), ("tanh", "noisy test")] == round(
        summary.loc[("mnist", "mlp", "pixel_uniform", "tanh", 0.9, "ce"), "noisy_test_accuracy_mean"], 3)


def test_memorisation_table_takes_the_epoch_of_highest_accuracy_and_the_last(results):
    table = plots.memorisation_table(results.curves)
    curves = results.curves[results.curves["loss"] == "ce"].set_index(plots.EXPERIMENT)
    assert len(table) == 2 * 2 * 3  # relu and tanh x two label noise types x p in {0.5, 0.9, 1.0}
    for key, row in table.iterrows():
        curve = curves.loc[key].set_index("epoch")
        best = curve["test_accuracy_mean"].idxmax()
        assert row[("at the highest test accuracy", "epoch")] == best
        memorised = curve.loc[best, "memorised_fraction_mean"]
        assert row[("at the highest test accuracy", "memorised")] == round(memorised, 3)
        assert row[("at the last epoch", "epoch")] == curve.index.max()


def test_paired_vs_unpaired_table_by_hand(results):
    table = plots.paired_vs_unpaired_table(results.summary)
    assert table.loc["label_flip", "count"] == 2 * 3 and table.loc["pixel_uniform", "count"] == 2 * 2
    summary = results.summary[results.summary["loss"] == "ce"].set_index(
        ["activation", "noise_type", "p"])
    ratios = [summary.loc[(a, "pixel_uniform", p), "delta_test_accuracy_stderr"]
              / np.hypot(summary.loc[(a, "pixel_uniform", p), "test_accuracy_stderr"],
                         summary.loc[(a, "pixel_uniform", 0.0), "test_accuracy_stderr"])
              for a in ("relu", "tanh") for p in (0.5, 0.9)]
    assert table.loc["pixel_uniform", "min"] == round(min(ratios), 2)
    assert table.loc["pixel_uniform", "max"] == round(max(ratios), 2)


def test_panel_columns_are_activations_and_rows_settings(tmp_path):
    records = grid_records(("relu", "gelu"), ("label_flip",), seeds=SEEDS[:2])
    records += grid_records(("relu",), ("label_flip",), seeds=SEEDS[:2], model_type="cnn")
    fig = plots.plot_metric_vs_p(rs.read_results(campaign(tmp_path, records)).summary, "test_accuracy")
    titles = [[ax.get_title().replace("\n", " ") for ax in row] for row in np.reshape(fig.axes, (2, 2))]
    assert titles == [["mnist · cnn · relu", ""], ["mnist · mlp · relu", "mnist · mlp · gelu"]]


def test_posterior_model_loss_is_drawn_only_below_the_information_limit(results):
    fig = plots.plot_metric_vs_p(results.summary, "test_loss")
    curves = {line.get_gid(): line for ax in fig.axes for line in ax.lines
              if str(line.get_gid()).startswith("posterior_model")}
    assert set(curves) == {"posterior_model:label_uniform", "posterior_model:label_flip"}  # not pixel noise
    for noise_type, line in ((t, curves[f"posterior_model:{t}"]) for t in ("label_uniform", "label_flip")):
        p = np.asarray(line.get_xdata())
        assert p.min() == 0 and p.max() < plots.information_limit(noise_type) and p.max() > 0.89
        np.testing.assert_allclose(line.get_ydata(), registry.posterior_model_loss(noise_type, p))
    assert plots.information_limit("label_flip") == pytest.approx((K - 1) / K)
    assert plots.information_limit("pixel_uniform") is None and plots.information_limit("label_matrix") is None
    labels = [text.get_text() for legend in fig.legends for text in legend.get_texts()]
    assert "model = noisy-label posterior (label_flip)" in labels


def test_posterior_model_loss_of_each_label_noise_type():
    # label_uniform keeps 1 - p + p/K on the true class; flips keep 1 - p
    assert registry.posterior_model_loss("label_uniform", 0.5) == pytest.approx(-np.log(1 - 0.5 + 0.5 / K))
    assert registry.posterior_model_loss("label_flip", 0.5) == pytest.approx(np.log(2))
    assert registry.posterior_model_loss("label_pairflip", 0.25) == pytest.approx(-np.log(0.75))
    # at the flip limit (K-1)/K the posterior is uniform: ln K
    assert registry.posterior_model_loss("label_flip", (K - 1) / K) == pytest.approx(np.log(K))


def test_information_limit_lines_only_where_the_p_range_reaches_them(tmp_path):
    records = [record(s, "relu", "none", 0.0) for s in SEEDS[:2]]  # the clean runs: p = 0 of both types
    records += [record(s, "relu", "label_flip", p) for p in (0.3, 0.5) for s in SEEDS[:2]]
    records += [record(s, "relu", "label_pairflip", p) for p in (0.3, 0.5, 0.7) for s in SEEDS[:2]]
    summary = rs.read_results(campaign(tmp_path, records)).summary
    fig = plots.plot_metric_vs_p(summary, "test_loss")
    gids = {line.get_gid(): line for line in fig.axes[0].lines if line.get_gid()}
    assert set(gids) == {"information_limit:label_pairflip", "posterior_model:label_flip",
                         "posterior_model:label_pairflip"}
    assert max(gids["posterior_model:label_flip"].get_xdata()) == 0.5
    assert max(gids["posterior_model:label_pairflip"].get_xdata()) < 0.5
    theory = plots.plot_label_noise_theory(summary)  # figure 6 always shows the limits
    assert {line.get_gid() for ax in theory.axes for line in ax.lines} >= {
        "information_limit:label_flip", "information_limit:label_pairflip", "chance"}


def test_learning_curves_are_one_experiment_per_line(results):
    fig = plots.plot_learning_curves(results.curves)
    curves = results.curves
    lines = [(ax, line) for ax in fig.axes for line in ax.lines]
    experiments = curves[["loss", "activation", "noise_type", "p"]].drop_duplicates()
    assert len(experiments) == 2 * (2 * len(LABEL_PS) + len(PIXEL_PS)) + 2 * len(LABEL_PS)  # ce; forward
    assert len(lines) == 2 * len(experiments)  # test accuracy and cross-entropy
    for ax, line in lines:
        metric = "test_accuracy" if ax.get_ylabel() == plots.LABELS["test_accuracy"] else "test_loss"
        setting, noise_type, activation = ax.get_title().replace("\n", " ").rsplit(" · ", 2)
        part = curves[(curves["activation"] == activation) & (curves["noise_type"] == noise_type)
                      & (curves["loss"] == loss_in(setting))]
        matches = [p for p, one in part.groupby("p") if np.array_equal(one[f"{metric}_mean"], line.get_ydata())]
        assert len(matches) == 1


def test_memorisation_shows_label_noise_above_zero_only(results):
    fig = plots.plot_memorisation(results.curves)
    titles = {ax.get_title().replace("\n", " ") for ax in fig.axes if ax.get_title()}
    assert {title.rsplit(" · ", 2)[1] for title in titles} == {"label_uniform", "label_flip"}
    metrics = 4  # test accuracy, memorised, corrupted predicted as true, uncorrupted train accuracy
    experiments = 2 * 2 + 2  # ce: relu and tanh x the two label noise types; forward: one each
    assert len([line for ax in fig.axes for line in ax.lines]) == metrics * experiments * (len(LABEL_PS) - 1)


def test_reliability_lines_are_the_pooled_bins_of_one_experiment(results):
    fig = plots.plot_reliability(results.reliability)
    for ax in fig.axes:
        if not ax.get_title():
            continue
        setting, noise_type, p = ax.get_title().replace("\n", " ").rsplit(" · ", 2)
        pooled = results.reliability[results.reliability["loss"] == loss_in(setting)]
        assert float(p.removeprefix("p = ")) < (plots.information_limit(noise_type) or np.inf)
        for line in ax.lines[1:]:  # after the diagonal
            bins = pooled[(pooled["activation"] == line.get_label()) & (pooled["noise_type"] == noise_type)
                          & (pooled["p"] == float(p.removeprefix("p = ")))].sort_values("bin")
            np.testing.assert_array_equal(line.get_ydata(), bins["accuracy"])


def test_figures_without_their_data_are_none(tmp_path):
    pixel_only = rs.read_results(campaign(tmp_path / "pixel", grid_records(("relu",), ("pixel_uniform",))))
    assert plots.plot_label_vs_pixel(pixel_only.summary) is None
    assert plots.plot_label_noise_theory(pixel_only.summary) is None
    assert plots.plot_memorisation(pixel_only.curves) is None
    assert plots.plot_losses(pixel_only.summary, pixel_only.runs) is None
    assert plots.plot_early_stopping(pixel_only.summary) is None
    label_only = rs.read_results(campaign(tmp_path / "label", grid_records(("relu",), ("label_flip",))))
    assert plots.plot_pixel_test_matching(label_only.summary) is None
    assert plots.plot_metric_vs_p(label_only.summary, "test_accuracy") is not None


def test_a_campaign_without_successful_runs_has_no_figures(tmp_path):
    failed = [{**r, "status": "failed", "error": "RuntimeError"} for r in grid_records(("relu",), ("label_flip",))]
    assert plots.write_figures(campaign(tmp_path, failed)) == []


def test_early_stopping_compares_the_final_and_the_selected_epoch(tmp_path):
    records = grid_records(("relu",), ("label_flip",), validation_fraction=0.1)
    results = rs.read_results(campaign(tmp_path, records))
    fig = plots.plot_early_stopping(results.summary)
    lines = experiment_lines(results.summary, ["test_accuracy", "selected_test_accuracy", "selected_epoch"])
    matched = {matching_experiments(c, lines)[0]["metric"] for _, c in errorbars(fig) if matching_experiments(c, lines)}
    assert matched == {"test_accuracy", "selected_test_accuracy", "selected_epoch"}


def test_several_noise_matrices_get_lines_of_their_own(tmp_path):
    records = [record(s, "relu", "none", 0.0) for s in SEEDS[:2]]
    records += [record(s, "relu", "label_matrix", 0.4, noise_matrix=m) for m in MATRICES for s in SEEDS[:2]]
    fig = plots.plot_metric_vs_p(rs.read_results(campaign(tmp_path, records)).summary, "test_accuracy")
    assert sorted(c.get_label() for _, c in errorbars(fig)) == ["label_matrix #1", "label_matrix #2"]


def test_write_figures_writes_every_figure_with_data(results_dir, tmp_path):
    paths = plots.write_figures(results_dir, figures_dir=tmp_path)
    # no validation split, one model type
    expected = set(plots.FIGURE_FILES.values()) - {plots.FIGURE_FILES["early_stopping"], plots.FIGURE_FILES["models"]}
    assert {p.name for p in paths} == expected and all(p.parent == tmp_path for p in paths)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_command_line_redraws_into_the_campaign_and_exits_2_without_results(tmp_path):
    directory = campaign(tmp_path / "small", grid_records(("relu",), ("label_uniform",), seeds=SEEDS[:2]))
    done = subprocess.run([sys.executable, "plots.py", str(directory)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    printed = [Path(line) for line in done.stdout.splitlines()]
    assert printed and all(p.parent == directory / "figures" and p.is_file() for p in printed)
    (tmp_path / "empty").mkdir()
    empty = subprocess.run([sys.executable, "plots.py", str(tmp_path / "empty")], cwd=ROOT, capture_output=True,
                           text=True)
    assert empty.returncode == 2 and len(empty.stderr.strip().splitlines()) == 1 and not empty.stdout


@pytest.mark.slow
def test_figures_of_the_committed_results(tmp_path):
    paths = plots.write_figures(ROOT / "results" / "reference", figures_dir=tmp_path)
    assert {p.name for p in paths} >= {plots.FIGURE_FILES[name] for name in ("accuracy_vs_p", "loss_vs_p",
                                                                             "losses", "reliability")}


def test_overview_table_says_what_the_campaign_ran(results):
    table = plots.overview_table(results.summary)
    assert table.loc[("mnist", "mlp", "label_flip", "ce"), "activations"] == "relu, tanh"
    assert table.loc[("mnist", "mlp", "label_flip", "forward"), "activations"] == "relu"
    assert table.loc[("mnist", "mlp", "label_uniform", "forward"), "seeds_per_experiment"] == 2  # tanh: 2 seeds
    assert table.loc[("mnist", "mlp", "pixel_uniform", "ce"), "noise_levels"] == len(PIXEL_PS)


# ---------------------------------------------------------------- the command line on a full or read-only disk


@pytest.fixture
def drawn(tmp_path) -> Path:
    """A campaign with every figure drawn and a report.html, as a previous plots.py left them."""
    directory = campaign(tmp_path / "drawn", grid_records(("relu",), ("label_uniform", "pixel_uniform")))
    plots.write_figures(directory)
    (directory / "report.html").write_text("<html>the previous report</html>")
    return directory


def contents(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, temporary ones included, by relative path."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run_plots(directory: Path, *options: str, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "plots.py", str(directory), *options], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, preexec_fn=preexec_fn)


def assert_storage_error(done: subprocess.CompletedProcess, path: Path, reason: str) -> None:
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert done.stderr == (f"error: {path}: {reason}. Free some space or fix the permissions, then run the same "
                           "command again; the figures and report already there are unchanged.\n")


def test_a_file_size_limit_leaves_the_previous_figures_whole(drawn):
    """RLIMIT_FSIZE (SIGXFSZ ignored) fails writes beyond 10 kB, as a full disk fails them."""
    before = contents(drawn)

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))

    done = run_plots(drawn, preexec_fn=small_files)
    assert_storage_error(done, drawn / "figures" / plots.FIGURE_FILES["accuracy_vs_p"], "File too large")
    assert contents(drawn) == before


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MB tmpfs mounted at tmp_path/disk (needs the right to mount: root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path) -> None:
    """Take every free byte of the filesystem at `disk`."""
    with open(disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"\0" * 4096)


def test_a_full_disk_leaves_the_previous_figures_and_report_whole(drawn, small_tmpfs):
    out = small_tmpfs / "campaign"
    shutil.copytree(drawn, out)
    fill(small_tmpfs)
    before = contents(out)
    assert_storage_error(run_plots(out), out / "figures" / plots.FIGURE_FILES["accuracy_vs_p"],
                         "No space left on device")
    assert contents(out) == before


@contextlib.contextmanager
def read_only(directory: Path):
    """No file can be created, replaced or removed in `directory`: write permission taken away, and for root,
    whom permissions do not stop, the immutable attribute (chattr +i)."""
    mode = directory.stat().st_mode
    directory.chmod(0o555)
    immutable = os.geteuid() == 0
    if immutable and subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        directory.chmod(mode)
        pytest.skip("running as root on a filesystem without chattr +i: cannot make a directory read-only")
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.chmod(mode)


def test_a_read_only_figures_directory_is_named_and_left_as_it_was(drawn):
    before = contents(drawn)
    with read_only(drawn / "figures"):
        done = run_plots(drawn)
    reason = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
    assert_storage_error(done, drawn / "figures" / plots.FIGURE_FILES["accuracy_vs_p"], reason)
    assert contents(drawn) == before


@pytest.mark.slow
def test_a_report_that_cannot_be_written_leaves_the_previous_one(drawn):
    """The notebook runs, then report.html cannot replace the previous one; the kernel talks over
    IPC, so Jupyter's warning about unencrypted TCP never shows."""
    with read_only(drawn):
        done = run_plots(drawn, "--report")
    reason = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert done.stderr.startswith(f"error: {drawn / 'report.html'}: {reason}. Free some space"), done.stderr
    assert (drawn / "report.html").read_text() == "<html>the previous report</html>"
    assert not list(drawn.glob(".*.tmp"))


@pytest.mark.parametrize("options", [[], ["--report"]])
@pytest.mark.parametrize("runs", ["failed", "diverged", "none"])
def test_a_campaign_without_a_finished_run_is_said_in_one_line(tmp_path, options, runs):
    status = "failed" if runs == "none" else runs
    failed = [{**r, "status": status, "error": "RuntimeError"} for r in grid_records(("relu",), ("label_flip",))]
    directory = campaign(tmp_path, failed)
    if runs == "none":  # a per-run CSV with its header only
        per_run = directory / rs.PER_RUN_CSV
        per_run.write_text(per_run.read_text().splitlines()[0] + "\n")
    done = run_plots(directory, *options)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"no finished run in {directory}/{rs.PER_RUN_CSV} (none has finished yet, or none "
                           "ended ok): nothing to draw or report\n")
    assert not (directory / "figures").exists() and not (directory / "report.html").exists()


def test_panel_titles_break_after_a_separator_only():
    title = "mnist · mlp · epochs=30 · validation_fraction=0.1 · learning_rate=0.001 · relu · label_flip"
    lines = plots.wrapped(title).split("\n")
    assert len(lines) > 1 and all(len(line) <= 47 for line in lines)
    assert all(line.endswith(" ·") for line in lines[:-1]) and " ".join(lines) == title
    assert plots.wrapped("mnist · mlp") == "mnist · mlp"


def test_models_figure_draws_a_line_per_model_on_the_same_seeds(tmp_path):
    records = grid_records(("relu",), ("label_flip",)) + grid_records(("relu",), ("label_flip",), model_type="cnn",
                                                                      hidden_sizes=())
    results = rs.read_results(campaign(tmp_path, records))
    assert plots.varying(results.summary) == []  # a CNN's empty hidden_sizes is no setting of its own
    fig = plots.plot_models(results.summary)
    titles = {ax.get_title().replace("\n", " ") for ax in fig.axes if ax.get_title()}
    assert titles == {"mnist · relu · label_flip"}
    for _, container in errorbars(fig):
        model = container.get_label()
        line = results.summary[(results.summary["model_type"] == model) & (results.summary["noise_type"] == "label_flip")]
        assert sorted(container.lines[0].get_ydata()) in (sorted(line["test_accuracy_mean"]),
                                                          sorted(line["test_loss_mean"]))
    assert {c.get_label() for _, c in errorbars(fig)} == {"mlp", "cnn"}
    table = plots.model_table(results.summary)
    assert list(table.columns) == ["cnn", "mlp"] and len(table) == len(LABEL_PS)
    assert plots.plot_models(rs.read_results(campaign(tmp_path / "one", grid_records(("relu",)))).summary) is None


def test_models_figure_draws_an_mlp_per_width_beside_the_cnn_in_the_same_panels(tmp_path):
    records = [r for widths in ((64,), (32, 16)) for r in grid_records(("relu",), ("label_flip",), hidden_sizes=widths)]
    records += grid_records(("relu",), ("label_flip",), model_type="cnn", hidden_sizes=())
    summary = rs.read_results(campaign(tmp_path, records)).summary
    fig = plots.plot_models(summary)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["mnist · relu · label_flip"] * 2  # a row: accuracy, cross-entropy
    for ax, metric in zip(panels, ("test_accuracy", "test_loss")):
        lines = {c.get_label(): c.lines[0].get_ydata() for c in ax.containers if isinstance(c, ErrorbarContainer)}
        assert sorted(lines) == ["cnn", "mlp 32-16", "mlp 64"]
        mlp_64 = summary[(summary["hidden_sizes"] == "64") & (summary["noise_type"] == "label_flip")].sort_values("p")
        np.testing.assert_array_equal(lines["mlp 64"], mlp_64[f"{metric}_mean"])


def test_a_cnn_beside_mlps_of_two_widths_has_no_widths_in_its_panel_titles(tmp_path):
    records = [r for widths in ((64,), (32, 16)) for r in grid_records(("relu",), ("label_flip",), hidden_sizes=widths)]
    records += grid_records(("relu",), ("label_flip",), model_type="cnn", hidden_sizes=())
    fig = plots.plot_metric_vs_p(rs.read_results(campaign(tmp_path, records)).summary)
    titles = sorted(ax.get_title().replace(" ·\n", " · ") for ax in fig.axes if ax.get_title())
    assert titles == ["mnist · cnn · relu", "mnist · mlp · hidden_sizes=32-16 · relu",
                      "mnist · mlp · hidden_sizes=64 · relu"]


def test_remedy_table_puts_each_loss_and_early_stopping_beside_plain_ce(tmp_path):
    records = (grid_records(("relu",), ("label_flip",)) + grid_records(("relu",), ("label_flip",), loss="gce")
               + grid_records(("relu",), ("label_flip",), validation_fraction=0.1))
    results = rs.read_results(campaign(tmp_path, records))
    table = plots.remedy_table(results.runs)
    assert list(table.columns) == ["early stopping", "gce"]
    assert table.index.names == ["noise_type", "p", "epochs"] and len(table) == len(LABEL_PS)
    gce = rs.loss_effects(results.runs).set_index("p").loc[0.5]
    mean, low, high = (100 * gce[f"minus_ce_test_accuracy_{s}"] for s in ("mean", "ci95_low", "ci95_high"))
    assert table.loc[("label_flip", 0.5, EPOCHS), "gce"] == f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"


def test_a_figure_with_too_many_panels_is_drawn_once_per_value_of_a_setting(tmp_path, capsys):
    """Four activations under five noise types, two losses: figure 10 would have 60 panels."""
    activations = ("relu", "tanh", "sigmoid", "gelu")
    noise_types = ("label_uniform", "label_flip", "label_pairflip", "pixel_uniform", "pixel_empirical")
    records = [r for loss in ("ce", "gce") for r in grid_records(activations, noise_types, SEEDS[:2], loss=loss)]
    results = rs.read_results(campaign(tmp_path, records))
    drawn = plots.drawn("losses", results)
    assert capsys.readouterr().out == (
        "note: 'Losses vs cross-entropy (ce) on the same seeds (mean ± standard error over seeds)' would have 60 "
        f"panels, more than {plots.MAX_PANELS}; drawn once per activation (or choose a slice: plots.select)\n")
    assert sorted(file for file, _ in drawn) == sorted(f"fig10_losses__activation={a}.png" for a in activations)
    for file, fig in drawn:
        titles = [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.get_title()]
        activation = file.removesuffix(".png").rsplit("=", 1)[1]
        assert len(titles) == 3 * len(noise_types) and all(f" · {activation} · " in title for title in titles)


def test_the_report_slice_keeps_the_remedies_and_its_tables_take_plain_training(tmp_path):
    """Two learning rates, and ce, gce and ce with a validation split: the report takes the first learning rate and
    keeps every remedy; its tables of the noise's effect take plain ce without a split."""
    records = [r for lr in (1e-3, 1e-2) for loss, split in (("ce", 0.0), ("gce", 0.0), ("ce", 0.1))
               for r in grid_records(("relu", "tanh"), ("label_flip",), learning_rate=lr, loss=loss,
                                     validation_fraction=split)]
    results, chosen = plots.report_slice(rs.read_results(campaign(tmp_path, records)), {})
    assert chosen == {"learning_rate": 0.001} and set(results.summary["learning_rate"]) == {0.001}
    summary = results.summary
    assert set(zip(summary["loss"], summary["validation_fraction"])) == {("ce", 0.0), ("gce", 0.0), ("ce", 0.1)}
    plain = summary.query("loss == 'ce' and validation_fraction == 0").set_index(["activation", "p"])
    table = plots.metric_table(summary, "test_accuracy")
    assert table.loc[("mnist", "mlp", "label_flip", 0.5), "tanh"] == round(plain.loc[("tanh", 0.5),
                                                                                     "test_accuracy_mean"], 3)
    assert {"early stopping", "gce"} <= set(plots.remedy_table(results.runs).columns)


def test_the_report_slice_takes_a_settings_default_else_its_smallest_value(tmp_path):
    records = [r for precision in ("float32", "bfloat16") for lr in (3e-2, 1e-2)
               for r in grid_records(("relu",), ("label_flip",), precision=precision, learning_rate=lr)]
    results, chosen = plots.report_slice(rs.read_results(campaign(tmp_path, records)), {})
    assert chosen == {"precision": "float32", "learning_rate": 0.01}
    assert set(zip(results.runs["precision"], results.runs["learning_rate"])) == {("float32", 0.01)}
    for chosen, message in [({"precision": "float16"}, "SLICE: precision='float16' is not among the values this "
                                                       "campaign ran: bfloat16, float32"),
                            ({"learning_rat": 0.01},
                             "SLICE: 'learning_rat' is not a setting of a run; the settings: ")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            plots.report_slice(rs.read_results(campaign(tmp_path, records)), chosen)
    widths = [r for sizes in ((512,), (64,), (64, 32)) for r in grid_records(("relu",), hidden_sizes=sizes)]
    assert plots.report_slice(rs.read_results(campaign(tmp_path / "widths", widths)), {})[1] == {"hidden_sizes": "64"}


def test_the_report_slice_takes_each_setting_among_the_runs_the_settings_before_it_left(tmp_path):
    """Two grids in one output_dir: batches of 64 without weight decay, of 128 with. The default batch size, 128,
    leaves weight decay 1e-4 only: the slice takes it rather than the default 0, which would leave nothing."""
    records = [r for batch, decay in ((64, 0.0), (128, 1e-4))
               for r in grid_records(("relu",), ("label_flip",), batch_size=batch, weight_decay=decay)]
    results = rs.read_results(campaign(tmp_path, records))
    sliced, chosen = plots.report_slice(results, {})
    assert chosen == {"batch_size": 128} and len(sliced.runs) == len(records) // 2
    assert set(zip(sliced.summary["batch_size"], sliced.summary["weight_decay"])) == {(128, 1e-4)}
    with pytest.raises(ValueError, match=re.escape("SLICE: weight_decay=0.0 is not among the values this campaign "
                                                   "ran with batch_size=128: 0.0001")):
        plots.report_slice(results, {"batch_size": 128, "weight_decay": 0.0})


def test_the_report_slice_takes_all_samples_where_the_campaign_ran_them(tmp_path):
    """max_train_samples' default, None (all samples), is an empty cell of the CSVs: the slice takes it, and a
    chosen number of samples is matched as a whole number."""
    records = [r for samples in (None, 500)
               for r in grid_records(("relu",), ("label_flip",), max_train_samples=samples)]
    results = rs.read_results(campaign(tmp_path, records))
    everything, chosen = plots.report_slice(results, {})
    assert chosen == {"max_train_samples": None} and everything.runs["max_train_samples"].isna().all()
    assert len(everything.runs) == len(records) // 2
    some, chosen = plots.report_slice(results, {"max_train_samples": 500})
    assert chosen == {"max_train_samples": 500} and set(some.summary["max_train_samples"]) == {500}


def test_a_figure_split_by_the_number_of_samples_draws_the_runs_on_all_samples_too(tmp_path, capsys):
    records = [r for samples in (None, 100, 200, 300, 400)
               for r in grid_records(("relu", "tanh", "sigmoid"), ("label_flip", "pixel_uniform"), SEEDS[:2],
                                     max_train_samples=samples)]
    summary = rs.read_results(campaign(tmp_path, records)).summary
    drawn = dict(plots.drawn("label_vs_pixel", rs.read_results(tmp_path)))
    assert "drawn once per max_train_samples" in capsys.readouterr().out
    assert sorted(drawn) == sorted(f"fig3_label_vs_pixel__max_train_samples={n}.png"
                                   for n in (None, 100, 200, 300, 400))
    on_all = summary[summary["max_train_samples"].isna() & (summary["activation"] == "relu")
                     & (summary["noise_type"] == "label_flip")].sort_values("p")
    lines = [c.lines[0].get_ydata() for _, c in errorbars(drawn["fig3_label_vs_pixel__max_train_samples=None.png"])
             if c.get_label() == "label_flip"]
    assert any(np.array_equal(line, on_all["test_accuracy_mean"]) for line in lines)


def test_the_report_slice_of_mlp_widths_keeps_the_cnn(tmp_path):
    records = [r for widths in ((64,), (32, 16)) for r in grid_records(("relu",), ("label_flip",), hidden_sizes=widths)]
    records += grid_records(("relu",), ("label_flip",), model_type="cnn", hidden_sizes=())
    results, chosen = plots.report_slice(rs.read_results(campaign(tmp_path, records)), {})
    assert chosen == {"hidden_sizes": "32-16"}
    for table in (results.summary, results.runs, results.curves):
        assert set(zip(table["model_type"], table["hidden_sizes"].fillna(""))) == {("mlp", "32-16"), ("cnn", "")}
    assert set(plots.model_table(results.summary).columns) == {"cnn", "mlp"}


def test_the_remedy_table_names_early_stopping_by_its_loss_settings_and_split(tmp_path):
    """gce at two q and two validation splits: a column per early stopping, none pooled with another."""
    records = [r for loss, settings in (("ce", ()), ("gce", (("q", 0.5),)), ("gce", (("q", 0.7),)))
               for split in (0.0, 0.1, 0.2)
               for r in grid_records(("relu",), ("label_flip",), loss=loss, loss_settings=settings,
                                     validation_fraction=split)]
    runs = rs.read_results(campaign(tmp_path, records)).runs
    table = plots.remedy_table(runs)
    assert sorted(table.columns) == sorted(["gce q=0.5", "gce q=0.7", *(
        f"early stopping on {split}{variant}" for split in ("10%", "20%")
        for variant in ("", " (gce q=0.5)", " (gce q=0.7)"))])
    effects = rs.early_stopping_effects(runs).set_index(["loss_settings", "validation_fraction", "p"])
    effect = effects.loc[("q=0.7", 0.2, 0.5)]
    mean, low, high = (100 * effect[f"minus_last_epoch_test_accuracy_{s}"] for s in ("mean", "ci95_low", "ci95_high"))
    assert table.loc[("label_flip", 0.5, EPOCHS), "early stopping on 20% (gce q=0.7)"] == \
        f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"


def test_the_report_keeps_every_training_length_and_its_tables_take_the_shortest(tmp_path):
    records = grid_records(("relu",), ("label_flip",))
    for r in records:  # also reported after 2 epochs, 0.1 less accurate
        r["reported"] = {"2": {**{m: r[m] for m in registry.METRICS}, "test_accuracy": r["test_accuracy"] - 0.1,
                               "reliability": r["reliability"]}}
    results, chosen = plots.report_slice(rs.read_results(campaign(tmp_path, records)), {})
    assert chosen == {} and set(results.summary["epochs"]) == {2, EPOCHS}
    lengths = plots.length_table(results.summary, ["test_accuracy"])
    assert list(lengths.columns) == [("test_accuracy_mean", 2), ("test_accuracy_mean", EPOCHS)]
    assert (lengths[("test_accuracy_mean", EPOCHS)] - lengths[("test_accuracy_mean", 2)]).round(9).eq(0.1).all()
    shortest = results.summary.query("epochs == 2").set_index(["noise_type", "p"])
    table = plots.metric_table(results.summary, "test_accuracy")
    assert table.loc[("mnist", "mlp", "label_flip", 0.5), "relu"] == round(shortest.loc[("label_flip", 0.5),
                                                                                        "test_accuracy_mean"], 3)


def test_the_length_and_model_tables_keep_each_setting_apart(tmp_path):
    """Two datasets, two model types, two activations: a row each; the clean runs shared by two noise types once."""
    records = [r for dataset in ("mnist", "fashion_mnist") for model, widths in (("mlp", (256, 128)), ("cnn", ()))
               for r in grid_records(("relu", "tanh"), ("label_flip", "pixel_uniform"), dataset=dataset,
                                     model_type=model, hidden_sizes=widths)]
    summary = rs.read_results(campaign(tmp_path, records)).summary
    models = plots.model_table(summary)
    assert models.index.names == ["dataset", "noise_type", "p", "activation"] and list(models.columns) == ["cnn", "mlp"]
    assert len(models) == 2 * (len(LABEL_PS) + len(PIXEL_PS)) * 2
    lengths = plots.length_table(summary, ["test_accuracy"])
    assert lengths.index.names == ["dataset", "model_type", "activation", "noise_type", "p"]
    one = summary.set_index(["dataset", "model_type", "activation", "noise_type", "p"]).loc[
        ("fashion_mnist", "cnn", "tanh", "label_flip", 0.5)]
    assert lengths.loc[("fashion_mnist", "cnn", "tanh", "label_flip", 0.5), ("test_accuracy_mean", EPOCHS)] == \
        one["test_accuracy_mean"]
    clean = plots.length_table(summary[summary["p"] == 0], ["test_accuracy", "test_ece"], shown=["loss"])
    assert clean.index.names == ["dataset", "model_type", "activation", "loss"] and len(clean) == 2 * 2 * 2


def test_the_tables_of_plain_training_are_empty_for_a_campaign_without_plain_ce(tmp_path):
    summary = rs.read_results(campaign(tmp_path, grid_records(("relu",), ("label_flip",), loss="gce"))).summary
    tables = [plots.clean_table(summary), plots.metric_table(summary, "test_accuracy"),
              plots.posterior_excess_table(summary), plots.pixel_test_table(summary)]
    assert all(table.empty for table in tables)


def test_the_remedy_and_transition_tables_keep_each_activation_apart(tmp_path):
    """Several activations: a row per experiment, never two pooled (forward_estimated's T-hat: exact for relu,
    its diagonal 0.1 too high for tanh)."""
    records = [r for loss in ("ce", "gce", "forward_estimated")
               for r in grid_records(("relu", "tanh"), ("label_flip",), loss=loss)]
    for r in records:
        if r["loss"] == "forward_estimated":
            bias = np.eye(K) * (0.1 if r["activation"] == "tanh" else 0.0)
            r["estimated_transition"] = (registry.transition_matrix(r["noise_type"], r["p"]) + bias).tolist()
    runs = rs.read_results(campaign(tmp_path, records)).runs
    table = plots.remedy_table(runs)
    assert table.index.names == ["activation", "noise_type", "p", "epochs"] and len(table) == 2 * len(LABEL_PS)
    gce = rs.loss_effects(runs).set_index(["loss", "activation", "p"]).loc[("gce", "tanh", 0.5)]
    mean, low, high = (100 * gce[f"minus_ce_test_accuracy_{s}"] for s in ("mean", "ci95_low", "ci95_high"))
    assert table.loc[("tanh", "label_flip", 0.5, EPOCHS), "gce"] == f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"
    errors = plots.transition_error_table(runs)
    assert errors.index.names == ["activation", "noise_type", "p"] and len(errors) == 2 * (len(LABEL_PS) - 1)
    assert set(errors.loc["relu", "diagonal: estimated − true"]) == {0.0}
    assert set(errors.loc["tanh", "diagonal: estimated − true"]) == {0.1}
