"""Run settings as grid axes: lists on the typed command line, a list of epochs as one run that reports each
length, loss settings as axes, the one clean run shared by every noise type, and the campaign's bookkeeping
(status counts kept per run, the CSV refresh interval that grows with what a rewrite costs)."""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import plots
import registry
import results_store as rs
import run_experiments as rx
from conftest import PER_RUN_LINE, TINY_RUNS, run_files, run_main, tiny_argv

SCALARS = ["max_workers", "cpu_threads_per_worker", "seed", "repeats", "target_ci95"]  # campaign settings, not axes
# Of every axis, a list of two values on the command line, and what it gives.
AXIS_LISTS = {
    "datasets": ("mnist,fashion_mnist", ["mnist", "fashion_mnist"]),
    "model_types": ("mlp,cnn", ["mlp", "cnn"]),
    "activations": ("relu,gelu", ["relu", "gelu"]),
    "noise_types": ("label_flip,pixel_uniform", ["label_flip", "pixel_uniform"]),
    "ps": ("0,0.5", [0, 0.5]),
    "losses": ("ce,gce", ["ce", "gce"]),
    "optimizer": ("adam,sgd", ["adam", "sgd"]),
    "learning_rate": ("1e-3,0.01", [0.001, 0.01]),
    "weight_decay": ("0,1e-4", [0, 0.0001]),
    "batch_size": ("64,128", [64, 128]),
    "epochs": ("1,3", [1, 3]),
    "normalize": ("true,false", [True, False]),
    "precision": ("float32,bfloat16", ["float32", "bfloat16"]),
    "validation_fraction": ("0,0.1", [0, 0.1]),
    "hidden_sizes": ("[[64], [32, 16]]", [[64], [32, 16]]),
    "max_train_samples": ("500,none", [500, None]),
}
# One value of each axis that gives one point: the grid of the other axes' defaults.
ONE_VALUE = ["--smoke", "--activations", "relu", "--noise_types", "label_flip", "--ps", "0.5", "--epochs", "1"]


def config_of(*argv: str) -> dict:
    return rx.config_from_args(list(argv))[0]


def assert_one_line_error(argv: list[str], tmp_path, *expected: str) -> str:
    """Exit code 2, one "error: " line on stderr naming what is wrong, nothing on stdout, nothing written."""
    before = sorted(tmp_path.iterdir())
    code, stdout, stderr = run_main([*argv, "--output_dir", str(tmp_path / "out")])
    assert code == 2 and stdout == "", stdout + stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
    for text in expected:
        assert text in stderr, f"{text!r} not in {stderr!r}"
    assert sorted(tmp_path.iterdir()) == before
    return stderr


# ================================================================ the typed command line


def test_the_axes_are_the_run_settings_and_each_sets_its_config_field():
    assert set(rx.AXES.values()) <= {f.name for f in dataclasses.fields(registry.TrainConfig)}
    assert set(AXIS_LISTS) == set(rx.AXES)  # a new axis needs a sample here
    assert not set(SCALARS) & set(rx.AXES)


@pytest.mark.parametrize("name", list(AXIS_LISTS))
def test_every_axis_takes_a_comma_list_or_a_bracketed_list(name):
    text, expected = AXIS_LISTS[name]
    config = config_of(*ONE_VALUE, f"--{name}", text)
    assert config[name] == expected
    assert config_of(*ONE_VALUE, f"--{name}", repr(expected))[name] == expected  # a bracketed Python list
    assert config_of(*ONE_VALUE, f"--{name}", json.dumps(expected))[name] == expected  # a bracketed JSON list
    assert rx.config_errors(config) == []
    specs = rx.build_grid(config)
    assert len(specs) == rx.grid_size(config)
    field = rx.AXES[name]
    values = {spec.config.epochs if name == "epochs" else getattr(spec.config, field) for spec in specs}
    if name == "epochs":  # one run of the longest, reporting the shorter length
        assert len(specs) == len(rx.build_grid(config_of(*ONE_VALUE))) and values == {3}
        assert {spec.config.reported_epochs for spec in specs} == {(1,)}
    elif name == "ps":  # p = 0 is the clean run
        assert {(s.config.noise_type, s.config.p) for s in specs} == {("none", 0.0), ("label_flip", 0.5)}
    else:
        assert len(specs) == 2 * len(rx.build_grid(config_of(*ONE_VALUE)))
        assert values == {tuple(v) if name == "hidden_sizes" else v for v in expected}


def test_hidden_sizes_is_one_architecture_unless_it_is_a_list_of_lists():
    assert config_of("--hidden_sizes", "256,128")["hidden_sizes"] == [256, 128]
    assert config_of("--hidden_sizes", "[256, 128]")["hidden_sizes"] == [256, 128]
    assert config_of("--hidden_sizes", "64")["hidden_sizes"] == [64]
    one = rx.build_grid(config_of(*ONE_VALUE, "--hidden_sizes", "256,128"))
    assert {s.config.hidden_sizes for s in one} == {(256, 128)}
    two = rx.build_grid(config_of(*ONE_VALUE, "--hidden_sizes", "[[64],[32,16]]"))
    assert {s.config.hidden_sizes for s in two} == {(64,), (32, 16)} and len(two) == 2 * len(one)


def test_lowercase_words_and_literals_are_typed():
    assert rx.parse_value("max_workers", "none", None) is None
    assert rx.parse_value("normalize", "FALSE", True) is False
    assert rx.parse_value("normalize", "true,false", True) == [True, False]
    assert rx.parse_value("learning_rate", "1e-3", 1e-3) == 0.001 and rx.parse_value("seed", "7", 0) == 7
    assert rx.parse_value("output_dir", "2024", "results") == "2024"  # a path stays text
    assert rx.parse_value("noise_matrix", "[[1]]", None) == "[[1]]"  # parsed and checked later
    assert rx.parse_value("optimizer", "sgd", "adam") == "sgd"  # one value of an axis: not a list
    assert rx.parse_value("ps", "0.5", [0.0]) == [0.5]  # a list setting: a list, even of one


@pytest.mark.parametrize("name, text", [(name, text) for name in SCALARS for text in ("1,2", "[1, 2]")])
def test_campaign_settings_stay_scalars_and_reject_lists(name, text, mnist_dir, tmp_path):
    assert_one_line_error(["--smoke", "--data_dir", str(mnist_dir), f"--{name}", text], tmp_path, f"{name}: ",
                          "is not")


def test_output_dir_is_a_path_even_with_a_comma_and_a_list_of_them_is_refused(mnist_dir, tmp_path):
    assert config_of("--output_dir", "a,b")["output_dir"] == "a,b"  # a directory name
    config = config_of("--smoke", "--data_dir", str(mnist_dir))
    assert rx.config_errors({**config, "output_dir": ["a", "b"]}) == ["output_dir: ['a', 'b'] is not a non-empty path"]


@pytest.mark.parametrize("argv, expected", [
    (["--optimizer", "adam,rmsprop"], ["optimizer: 'rmsprop'", "one of: adam, sgd"]),
    (["--precision", "float32,float8"], ["precision: 'float8'", "one of: float32, bfloat16"]),
    (["--batch_size", "64,0"], ["batch_size: 0", "an integer >= 1"]),
    (["--learning_rate", "0.01,-1"], ["learning_rate: -1", "a number > 0"]),
    (["--weight_decay", "[0, -0.5]"], ["weight_decay: -0.5", "a number >= 0"]),
    (["--normalize", "true,maybe"], ["normalize: 'maybe'", "true or false"]),
    (["--validation_fraction", "0,0.7"], ["validation_fraction: 0.7", "a number in [0, 0.5]"]),
    (["--hidden_sizes", "[[64], [32, -1]]"], ["hidden_sizes: [32, -1]", "a non-empty list of integers >= 1"]),
    (["--hidden_sizes", "[[64], []]"], ["hidden_sizes: []", "a non-empty list of integers >= 1"]),
    (["--hidden_sizes", "[]"], ["hidden_sizes: []", "a non-empty list of integers >= 1"]),
    (["--max_train_samples", "500,0"], ["max_train_samples: 0", "an integer >= 1 or None"]),
    (["--epochs", "1,2.5"], ["epochs: 2.5", "an integer >= 1"]),
    (["--model_types", "mlp,rnn"], ["model_types: 'rnn'", "one of: mlp, cnn"]),
    (["--noise_types", "label_flip,none"], ["noise_types: None", "label_uniform, label_flip"]),
])
def test_a_bad_value_in_a_list_is_one_line_naming_it_and_the_allowed_ones(argv, expected, mnist_dir, tmp_path):
    assert_one_line_error(["--smoke", "--data_dir", str(mnist_dir), *argv], tmp_path, *expected)


def test_help_marks_the_names_that_take_lists(capsys):
    with pytest.raises(SystemExit):
        rx.main(["--help"])
    text = capsys.readouterr().out
    # each option's help: from its flags to the next option
    blocks = dict(re.findall(r"^  --([a-z0-9_-]+) VALUE(.*\n(?:(?!  -).*\n)*)", text, flags=re.MULTILINE))
    blocks = {flag.replace("-", "_"): " ".join(help_text.split()) for flag, help_text in blocks.items()}
    assert set(rx.CONFIG_NAMES) <= set(blocks)
    marked = {name for name in rx.CONFIG_NAMES if "[a grid axis: give a list]" in blocks[name]}
    assert marked == set(rx.AXES)


# ================================================================ loss settings


def test_a_list_of_loss_settings_is_an_axis():
    config = config_of(*ONE_VALUE, "--losses", "ce,gce,sce",
                       "--loss_settings", "{'gce': {'q': [0.5, 0.7]}, 'sce': {'alpha': [0.1, 1], 'beta': 0.5}}")
    variants = sorted({(s.config.loss, s.config.loss_settings) for s in rx.build_grid(config)})
    assert variants == [("ce", ()), ("gce", (("q", 0.5),)), ("gce", (("q", 0.7),)),
                        ("sce", (("A", -4.0), ("alpha", 0.1), ("beta", 0.5))),
                        ("sce", (("A", -4.0), ("alpha", 1.0), ("beta", 0.5)))]  # unset: the paper's default
    assert rx.grid_size(config) == len(rx.build_grid(config)) == 5 * len(rx.build_grid(config_of(*ONE_VALUE)))
    # the defaults given explicitly are the same runs as the defaults left out
    explicit = config_of(*ONE_VALUE, "--losses", "gce", "--loss_settings", "{'gce': {'q': 0.7}}")
    implicit = config_of(*ONE_VALUE, "--losses", "gce")
    assert [s.run_id for s in rx.build_grid(explicit)] == [s.run_id for s in rx.build_grid(implicit)]


@pytest.mark.parametrize("settings, losses, expected", [
    ("{'gce': {'qq': 1}}", "gce", ["loss_settings: loss 'gce' has no setting 'qq'; its settings: q"]),
    ("{'gce': {'q': [0.5, 2]}}", "gce", ["loss_settings: gce's q must be in (0, 1], got 2"]),
    ("{'gce': {'q': 'x'}}", "gce", ["loss_settings: loss 'gce' setting q='x' is not a finite number"]),
    ("{'gce': {'q': True}}", "gce", ["loss_settings: loss 'gce' setting q=True is not a finite number"]),
    ("{'gce': {'q': []}}", "gce", ["loss_settings: gce's q is empty; give at least one value"]),
    ("{'gce': {'q': [0.5, 0.5]}}", "gce", ["loss_settings: gce's q: 0.5 appears more than once"]),
    ("{'label_smoothing': {'eps': -0.1}}", "ce,label_smoothing", ["label_smoothing's eps must be in [0, 1]"]),
    ("{'sce': {'A': 1}}", "sce", ["sce's A (the value of log 0) must be < 0, got 1"]),
    ("{'sce': {'alpha': 1}}", "gce", ["loss_settings: 'sce' is not one of the grid's losses: gce"]),
    ("{'ce': {'q': 1}}", "ce", ["loss 'ce' has no setting 'q'; its settings: none"]),
    ("[0.5]", "gce", ["loss_settings: [0.5] is not a dict of settings by loss"]),
    ("{'gce': 0.5}", "gce", ["loss_settings: {'gce': 0.5} is not a dict of settings by loss"]),
    ("{'forward_estimated': {'estimate_epochs': 1.5}}", "forward_estimated",
     ["estimate_epochs must be a whole number >= 1, got 1.5"]),
])
def test_bad_loss_settings_are_one_line_errors(settings, losses, expected, mnist_dir, tmp_path):
    assert_one_line_error(["--smoke", "--data_dir", str(mnist_dir), "--losses", losses, "--loss_settings", settings],
                          tmp_path, *expected)


def test_loss_settings_runs_are_stored_and_summarized_apart(mnist, mnist_dir, tmp_path, no_figures):
    out = tmp_path / "out"
    argv = [*tiny_argv(out, mnist_dir, "--noise_types", "label_flip", "--ps", "0.5", "--repeats", "1",
                       "--losses", "ce,gce"), "--loss_settings", "{'gce': {'q': [0.3, 0.9]}}"]
    code, stdout, stderr = run_main(argv)
    assert code == 0, stdout + stderr
    records = rs.RunStore(out).load().values()
    assert sorted((r["loss"], r["loss_settings"]) for r in records) == [("ce", ""), ("gce", "q=0.3"),
                                                                         ("gce", "q=0.9")]
    summary = rs.read_csv(out / rs.SUMMARY_CSV)
    assert sorted(summary["loss_settings"].fillna("")) == ["", "q=0.3", "q=0.9"] and (summary["n"] == 1).all()
    assert summary["test_loss_mean"].nunique() == 3  # three different trainings


# ================================================================ a list of epochs, and other axes, end to end


AXES_ARGV = ["--learning_rate", "0.001,0.01", "--hidden_sizes", "[[64],[32,16]]"]
SETTINGS = [(lr, hs) for lr in (0.001, 0.01) for hs in ("64", "32-16")]


@pytest.fixture(scope="module")
def axes_campaigns(mnist, mnist_dir, tmp_path_factory):
    """The tiny grid with two learning rates and two architectures, once with epochs 1,2 (figures drawn) and
    once with epochs 1 alone (no figures)."""
    both, one = tmp_path_factory.mktemp("epochs_1_2"), tmp_path_factory.mktemp("epochs_1")
    code, stdout, stderr = run_main(tiny_argv(both, mnist_dir, *AXES_ARGV, "--epochs", "1,2"))
    assert code == 0, stdout + stderr
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "write_figures", lambda *args, **kwargs: [])
        code, short_stdout, stderr = run_main(tiny_argv(one, mnist_dir, *AXES_ARGV, "--epochs", "1"))
    assert code == 0, short_stdout + stderr
    return SimpleNamespace(both=both, one=one, stdout=stdout)


def test_a_list_of_epochs_is_one_run_of_the_longest_per_grid_cell(axes_campaigns):
    records = rs.RunStore(axes_campaigns.both).load()
    # one run per (learning rate, widths, noise point, repeat), not one per length
    assert len(run_files(axes_campaigns.both)) == len(records) == len(SETTINGS) * TINY_RUNS
    cells = Counter((r["learning_rate"], r["hidden_sizes"], r["noise_type"], r["p"], r["repeat"])
                    for r in records.values())
    assert set(cells.values()) == {1} and {(lr, hs) for lr, hs, *_ in cells} == set(SETTINGS)
    for record in records.values():
        assert record["epochs"] == 2 and len(record["history_test_loss"]) == 2
        assert list(record["reported"]) == ["1"]
        assert record["reported"]["1"]["test_loss"] == record["history_test_loss"][0]
    per_run = rs.read_csv(axes_campaigns.both / rs.PER_RUN_CSV)
    assert sorted(Counter(per_run["epochs"]).items()) == [(1, len(records)), (2, len(records))]
    assert not per_run.duplicated(["run_id", "epochs"]).any()


def test_each_progress_line_names_the_settings_the_grid_varies(axes_campaigns):
    lines = [m[3] for m in map(PER_RUN_LINE.fullmatch, axes_campaigns.stdout.splitlines()) if m]
    named = Counter(re.search(r" learning_rate=(\S+) hidden_sizes=(\S+) r\d+: ", line).groups() for line in lines)
    assert named == {(str(lr), widths): TINY_RUNS for lr, widths in SETTINGS}


def test_the_shorter_length_reported_is_the_shorter_campaign_bit_for_bit(axes_campaigns):
    summary = rs.read_csv(axes_campaigns.both / rs.SUMMARY_CSV)
    assert sorted(summary["epochs"].unique()) == [1, 2]
    short = rs.read_csv(axes_campaigns.one / rs.SUMMARY_CSV)
    timing = [c for c in summary.columns if "seconds" in c]
    keys = [f for f in rs.GROUP_FIELDS if summary[f].notna().any()]
    reported = summary[summary["epochs"] == 1].drop(columns=timing).sort_values(keys, ignore_index=True)
    alone = short.drop(columns=timing).sort_values(keys, ignore_index=True)
    assert len(reported) == len(alone) == len(SETTINGS) * 4  # settings x (label_flip, pixel_uniform) x (0, 0.5)
    pd.testing.assert_frame_equal(reported, alone, check_exact=True)
    # and run by run (the shorter campaign's runs have other ids: another config)
    fields = ["learning_rate", "hidden_sizes", "noise_type", "p", "repeat"]
    metrics = [m for m in registry.METRICS if "seconds" not in m]
    per_run = rs.read_csv(axes_campaigns.both / rs.PER_RUN_CSV)
    pairs = per_run[per_run["epochs"] == 1].merge(rs.read_csv(axes_campaigns.one / rs.PER_RUN_CSV), on=fields,
                                                  suffixes=("", "_alone"))
    assert len(pairs) == len(SETTINGS) * TINY_RUNS
    for metric in metrics:
        assert pairs[metric].equals(pairs[f"{metric}_alone"]), metric
    by_length = per_run.pivot(index="run_id", columns="epochs", values="test_loss")
    assert (by_length[1] != by_length[2]).all()  # the second epoch did change the model


def panel_settings(title: str) -> dict:
    """The name=value parts of a panel title."""
    return dict(part.split("=", 1) for part in title.split(" · ") if "=" in part)


def test_the_figures_show_each_setting_in_panels_of_its_own(axes_campaigns):
    out = axes_campaigns.both
    drawn = sorted(path.name for path in (out / "figures").glob("*.png"))
    assert drawn == sorted(plots.FIGURE_FILES[name] for name in plots.HEADLINE_FIGURES)
    results = rs.read_results(out)
    fig = plots.plot_metric_vs_p(results.summary, "test_accuracy")
    titles = [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.get_title()]
    assert len(titles) == len(set(titles)) == 2 * len(SETTINGS)  # every setting at epochs 1 and 2
    assert sorted((float(s["learning_rate"]), s["hidden_sizes"], int(s["epochs"])) for s in map(panel_settings, titles)) \
        == sorted((lr, hs, epochs) for lr, hs in SETTINGS for epochs in (1, 2))
    summary = results.summary
    for ax in fig.axes:
        if not ax.get_title():
            continue
        setting = panel_settings(ax.get_title().replace("\n", " "))
        rows = summary[(summary["learning_rate"] == float(setting["learning_rate"]))
                       & (summary["hidden_sizes"] == setting["hidden_sizes"])
                       & (summary["epochs"] == int(setting["epochs"]))]
        for container in ax.containers:
            noise = container.get_label()
            line = rows[rows["noise_type"] == noise].sort_values("p")
            np.testing.assert_array_equal(container.lines[0].get_ydata(), line["test_accuracy_mean"])
    # one length: the four settings, each in its own titled panel
    longest = plots.plot_metric_vs_p(plots.select(results, epochs=2).summary, "test_accuracy")
    settings = [panel_settings(ax.get_title().replace("\n", " ")) for ax in longest.axes if ax.get_title()]
    assert sorted((float(s["learning_rate"]), s["hidden_sizes"]) for s in settings) == sorted(SETTINGS)
    assert all("epochs" not in s for s in settings)  # no longer varying: not in the titles


# ================================================================ the clean run, counted everywhere alike


def test_two_noise_types_share_one_clean_run_and_every_count_agrees(mnist, mnist_dir, tmp_path, monkeypatch,
                                                                   no_figures):
    out = tmp_path / "out"
    argv = tiny_argv(out, mnist_dir)
    monkeypatch.setattr(rx, "estimate_seconds", lambda specs: [1.0] * len(specs))  # calibration: not the point
    code, dry, _ = run_main([*argv, "--dry-run"])
    assert code == 0
    head = dry.splitlines()[0]
    assert head.startswith(f"{TINY_RUNS} runs: 1 loss (with its settings) x 3 noise points (p = 0 once, shared "
                           "by the noise types) x 2 repeats;")
    factors = [int(n) for n in re.findall(r"(\d+) (?:loss|noise point|repeat)", head)]
    assert np.prod(factors) == TINY_RUNS

    code, stdout, stderr = run_main(argv)
    assert code == 0, stdout + stderr
    records = rs.RunStore(out).load().values()
    clean = [r for r in records if r["p"] == 0]
    assert len(records) == TINY_RUNS and sorted(r["repeat"] for r in clean) == [0, 1]  # one per repeat
    assert {r["noise_type"] for r in clean} == {registry.CLEAN} and all(r["noise_matrix"] is None for r in clean)
    meta = json.loads((out / rs.CAMPAIGN_JSON).read_text())
    assert meta["grid_size"] == TINY_RUNS
    assert meta["counts"] == {"done": TINY_RUNS, "failed": 0, "diverged": 0, "not_identifiable": 0, "pending": 0}
    lines = stdout.splitlines()
    assert lines[0].startswith(f"{TINY_RUNS} runs in the grid, 0 already done, {TINY_RUNS} to run on ")
    progress = [PER_RUN_LINE.fullmatch(line) for line in lines if PER_RUN_LINE.fullmatch(line)]
    assert [(int(m[1]), int(m[2])) for m in progress] == [(k, TINY_RUNS) for k in range(1, TINY_RUNS + 1)]
    assert sum(" none p=0.00 " in m[3] for m in progress) == 2
    assert f"{TINY_RUNS} ok, 0 failed, 0 diverged, 0 pending." in lines
    # the summary counts the clean runs as the p = 0 point of both noise types
    summary = rs.read_csv(out / rs.SUMMARY_CSV).set_index(["noise_type", "p"])
    assert summary.loc[("label_flip", 0.0), "n"] == summary.loc[("pixel_uniform", 0.0), "n"] == 2
    at_zero = summary.loc[("label_flip", 0.0), "test_accuracy_mean"]
    assert at_zero == summary.loc[("pixel_uniform", 0.0), "test_accuracy_mean"]
    assert at_zero == pytest.approx(np.mean([r["test_accuracy"] for r in clean]), rel=1e-12)
    code, stdout, _ = run_main(argv)  # resumed: every count the same
    assert code == 0 and f"{TINY_RUNS} runs in the grid, {TINY_RUNS} already done, 0 to run" in stdout


def test_runs_start_one_of_each_kind_in_turn(mnist, mnist_dir, tmp_path, no_figures):
    """A kind of run (the same settings but the seed and the noise; drawing pixel noise or not) takes about as long:
    its runs take turns with the other kinds', so the first to finish stand for the rest in the ETA."""
    code, stdout, stderr = run_main(tiny_argv(tmp_path / "out", mnist_dir, "--max_workers", "1"))
    assert code == 0, stderr
    said = [PER_RUN_LINE.fullmatch(line)[3] for line in stdout.splitlines() if PER_RUN_LINE.fullmatch(line)]
    assert [re.match(r"\[ok\] mlp/relu (\w+ p=\S+ r\d)", line)[1] for line in said] == [
        "none p=0.00 r0", "pixel_uniform p=0.50 r0", "none p=0.00 r1", "pixel_uniform p=0.50 r1",
        "label_flip p=0.50 r0", "label_flip p=0.50 r1"]


# ================================================================ bookkeeping


def ok_record(spec: rx.RunSpec, accuracy: float = 0.5) -> dict:
    """A stored ok run of `spec` with the fields a record must hold (no training)."""
    bins = {"count": [0.0] * registry.ECE_BINS, "confidence": [0.0] * registry.ECE_BINS,
            "accuracy": [0.0] * registry.ECE_BINS}
    return rx.run_record(spec, "ok", test_accuracy=accuracy, test_loss=1.0, seconds=1.0, train_seconds=0.5,
                         history_test_loss=[1.0] * spec.config.epochs, reliability=bins)


class FakeClock:
    """time.monotonic and time.process_time of run_experiments, advanced by hand."""

    def __init__(self):
        self.now, self.cpu = 1000.0, 0.0

    def monotonic(self) -> float:
        return self.now

    def process_time(self) -> float:
        return self.cpu


@pytest.fixture
def campaign(tmp_path, mnist_dir, monkeypatch):
    """A Campaign of the tiny grid, its CSV writes counted, its clock faked; closed at the end."""
    clock, writes = FakeClock(), []
    monkeypatch.setattr(rx, "time", clock)
    monkeypatch.setattr(rs, "write_csvs", lambda records, *args: writes.append(len(records)))
    config = config_of(*tiny_argv(tmp_path / "out", mnist_dir))
    campaign = rx.Campaign(config, rx.build_grid(config))
    campaign.started, campaign.bar = clock.monotonic(), SimpleNamespace(total=len(campaign.specs), update=lambda: None,
                                                                         disable=True)
    yield SimpleNamespace(campaign=campaign, clock=clock, writes=writes)
    campaign.log_file.close()
    campaign.lock.close()


def test_status_counts_stay_right_through_retries_and_changes(campaign, capsys):
    c = campaign.campaign
    specs = c.specs
    failures = [rx.run_record(specs[0], "failed", "boom"), rx.run_record(specs[0], "failed", "boom again"),
                ok_record(specs[0]), rx.run_record(specs[1], "diverged", "nan"),
                rx.run_record(specs[2], "not_identifiable", "singular"), ok_record(specs[3]),
                rx.run_record(specs[4], "failed", "boom"), ok_record(specs[4]), ok_record(specs[3], 0.75)]
    for record in failures:
        c.add(record)
        recount = Counter(c.status(spec.run_id) for spec in specs)
        assert {status: n for status, n in c.statuses.items() if n} == dict(recount)
        stored = Counter(r["status"] for r in rs.RunStore(c.output_dir).load().values())
        meta = json.loads((c.output_dir / rs.CAMPAIGN_JSON).read_text())["counts"]
        assert meta == {"done": stored["ok"], "failed": stored["failed"], "diverged": stored["diverged"],
                        "not_identifiable": stored["not_identifiable"], "pending": len(specs) - sum(stored.values())}
    assert meta == {"done": 3, "failed": 0, "diverged": 1, "not_identifiable": 1, "pending": 1}
    assert c.records[specs[0].run_id]["attempts"] == 3 and c.records[specs[3].run_id]["attempts"] == 2
    assert len(capsys.readouterr().out.splitlines()) == len(failures)  # a progress line per run


def test_the_csv_refresh_interval_grows_with_what_a_rewrite_costs(campaign, monkeypatch):
    c, clock, writes = campaign.campaign, campaign.clock, campaign.writes
    slow = 10.0  # CPU seconds per rewrite: 200 s between rewrites keep them at 5% of a core
    monkeypatch.setattr(rs, "write_csvs", lambda records, *args: writes.append(len(records)) or setattr(
        clock, "cpu", clock.cpu + slow))
    specs = c.specs
    c.add(ok_record(specs[0]))
    assert writes == [1]  # the first run at once
    assert c.csv_interval == pytest.approx(slow / rx.CSV_REFRESH_SHARE) and c.csv_interval > rx.CSV_REFRESH_SECONDS
    clock.now += rx.CSV_REFRESH_SECONDS + 1
    c.add(ok_record(specs[1]))
    assert writes == [1]  # due by the plain interval, not yet by the cost
    clock.now += slow / rx.CSV_REFRESH_SHARE
    c.add(ok_record(specs[2]))
    assert writes == [1, 3]
    slow = 0.5  # cheap again: back to the plain interval
    clock.now += c.csv_interval + 1
    c.add(ok_record(specs[3]))
    assert writes == [1, 3, 4] and c.csv_interval == rx.CSV_REFRESH_SECONDS
    clock.now += rx.CSV_REFRESH_SECONDS + 1
    c.add(ok_record(specs[4]))
    assert writes == [1, 3, 4, 5]
