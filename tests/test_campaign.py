"""The campaign layer: command line, grid, validation, statistics, end-to-end campaigns."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import nnet_models as nm
import results_store as rs
import run_experiments as rx

# Final metrics of every ok run (finite whatever the noise type and p)...
ALWAYS_FINITE = ["test_accuracy", "test_loss", "test_macro_precision", "test_macro_recall",
                 "test_macro_roc_auc", "test_ece", "test_mean_confidence", "train_loss", "seconds", "train_seconds"]
# ...and those that exist only for some runs (NaN in the CSVs elsewhere)
MEMORISATION = ["memorised_fraction", "corrupted_true_fraction", "clean_train_accuracy"]  # label noise
SELECTED = ["selected_epoch", "selected_test_accuracy", "selected_test_loss"]  # validation_fraction > 0
NOISY_TEST = ["noisy_test_accuracy", "noisy_test_loss"]  # pixel noise
METRICS = ALWAYS_FINITE + MEMORISATION + SELECTED + NOISY_TEST
# A K x K row-stochastic M for label_matrix: half the mass stays, half goes to the next class.
HALF_NEXT = [[0.5 if j in (i, (i + 1) % 10) else 0.0 for j in range(10)] for i in range(10)]
IDX_NAMES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def config_of(*argv: str) -> dict:
    return rx.config_from_args(list(argv))[0]


def tiny_argv(output_dir, data_dir, *extra: str) -> list[str]:
    """8 runs (relu x {label_flip, pixel_uniform} x p {0, 0.5} x 2 repeats), 300 samples, 1 epoch."""
    return ["--activations", "relu", "--noise_types", "label_flip,pixel_uniform", "--ps", "0,0.5",
            "--extra_label_ps", "", "--repeats", "2", "--epochs", "1", "--max_train_samples", "300",
            "--hidden_sizes", "32", "--max_workers", "2",
            "--data_dir", str(data_dir), "--output_dir", str(output_dir), *extra]


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) in this process (workers are forked from it), with its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = rx.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def warm(mnist_dir):
    """Decode MNIST and train once in this process, so forked workers start warm (speed only)."""
    nm.train_and_evaluate(nm.TrainConfig(epochs=1, max_train_samples=200, hidden_sizes=(16,),
                                         data_dir=str(mnist_dir)))
    return mnist_dir


# ================================================================ command line


CLI_SAMPLES = {
    "datasets": ("mnist,fashion_mnist", ["mnist", "fashion_mnist"]),
    "activations": ("gelu,leaky_relu", ["gelu", "leaky_relu"]),
    "model_types": ("cnn", ["cnn"]),
    "noise_types": ("label_flip,pixel_uniform", ["label_flip", "pixel_uniform"]),
    "ps": ("0,0.5", [0, 0.5]),
    "extra_label_ps": ("0.97", [0.97]),
    "repeats": ("7", 7),
    "epochs": ("3", 3),
    "batch_size": ("64", 64),
    "optimizer": ("sgd", "sgd"),
    "learning_rate": ("0.05", 0.05),
    "weight_decay": ("1e-4", 1e-4),
    "hidden_sizes": ("64,32", [64, 32]),
    "normalize": ("false", False),
    "max_train_samples": ("500", 500),
    "seed": ("11", 11),
    "max_workers": ("3", 3),
    "cpu_threads_per_worker": ("2", 2),
    "pin_cpus": ("no", False),
    "max_attempts": ("5", 5),
    "retry_failed": ("false", False),
    "use_cuda": ("true", True),
    "data_dir": ("/some/data", "/some/data"),
    "output_dir": ("/some/out", "/some/out"),
    "executor": ("dask", "dask"),
    "dask_scheduler": ("tcp://10.0.0.1:8786", "tcp://10.0.0.1:8786"),
    "noise_matrix": ("matrix.json", "matrix.json"),
    "loss_corrections": ("none,forward", ["none", "forward"]),
    "validation_fraction": ("0.1", 0.1),
    "precision": ("bfloat16", "bfloat16"),
}


def test_cli_samples_cover_every_config_name():
    assert set(CLI_SAMPLES) == set(rx.CONFIG_NAMES)


def test_stored_metrics_are_the_documented_ones():
    assert set(rs.METRICS) == set(METRICS)
    assert set(rs.HISTORY_METRICS) == {"test_loss", "test_accuracy", "test_ece", "test_mean_confidence",
                                       *MEMORISATION, "validation_loss"}


@pytest.mark.parametrize("name", sorted(CLI_SAMPLES))
@pytest.mark.parametrize("spelling", ["underscores", "dashes"])
def test_every_config_name_can_be_overridden(name, spelling):
    text, expected = CLI_SAMPLES[name]
    flag = "--" + (name if spelling == "underscores" else name.replace("_", "-"))
    default = getattr(rx, name)
    assert default != expected  # the override is visible
    config = config_of(flag, text)
    assert config[name] == expected
    assert type(config[name]) is type(expected)
    # nothing else moved
    assert {k: v for k, v in config.items() if k != name} == \
        {k: getattr(rx, k) for k in rx.CONFIG_NAMES if k != name}


def test_lists_are_comma_separated():
    config = config_of("--ps", "0,0.5", "--noise_types", "label_flip,pixel_uniform",
                       "--activations", " relu , tanh ")
    assert config["ps"] == [0, 0.5]
    assert config["noise_types"] == ["label_flip", "pixel_uniform"]
    assert config["activations"] == ["relu", "tanh"]
    assert config_of("--ps", "0.25")["ps"] == [0.25]  # a single value is still a list
    assert config_of("--ps", "")["ps"] == []


def test_smoke_preset_and_explicit_flags_override_it():
    config = config_of("--smoke")
    for name, value in rx.SMOKE_PRESET.items():
        assert config[name] == value
    assert config["noise_types"] == rx.noise_types  # not in the preset: the config block's value

    config = config_of("--smoke", "--repeats", "3", "--ps", "0.2", "--max-train-samples", "none",
                       "--output_dir", "/x/y")
    assert config["repeats"] == 3
    assert config["ps"] == [0.2]
    assert config["max_train_samples"] is None
    assert config["output_dir"] == "/x/y"
    assert config["epochs"] == rx.SMOKE_PRESET["epochs"]  # the rest of the preset stays
    # order on the command line does not matter: explicit flags always win over --smoke
    assert config_of("--repeats", "3", "--smoke")["repeats"] == 3


def test_dry_run_prints_grid_and_writes_nothing(mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = ["--dry-run", "--smoke", "--data_dir", str(mnist_dir), "--output_dir", str(out)]
    assert rx.main(argv) == 0
    printed = capsys.readouterr().out
    specs = rx.build_grid(config_of(*argv))
    assert len(specs) == 32
    assert "32 runs in the grid" in printed
    for spec in specs:
        assert spec.run_id in printed
    lines = [line for line in printed.splitlines() if line.split(" ")[0] in {s.run_id for s in specs}]
    assert len(lines) == 32
    assert "p=0.50" in printed and "seed=" in printed
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # nothing at all in the working directory either


def test_estimate_calibrates_once_per_kind_of_run(mnist_dir, monkeypatch):
    """One calibration per (model, pixel noise drawn or not, ...): pixel-noise runs at p = 0
    draw no noise and go with the label-noise runs. Each run's estimate is epochs x (its
    training samples / the kind's rate + the kind's other seconds per epoch)."""
    calibrated = []
    rates = {False: (1000.0, 2.0), True: (500.0, 3.0)}  # without, with pixel noise

    def fake_calibrate(cfg):
        calibrated.append(cfg.draws_pixel_noise)
        return rates[cfg.draws_pixel_noise]

    monkeypatch.setattr(rx, "calibrate", fake_calibrate)
    specs = rx.build_grid(config_of("--smoke", "--epochs", "3", "--data_dir", str(mnist_dir)))
    assert {(s.config.noise_type in nm.PIXEL_NOISE_TYPES, s.config.p) for s in specs} >= {(True, 0.0), (True, 0.5)}
    estimates = rx.estimate_seconds(specs)
    assert sorted(calibrated) == [False, True]
    for spec, seconds in zip(specs, estimates):
        rate, other = rates[spec.config.noise_type in nm.PIXEL_NOISE_TYPES and spec.config.p > 0]
        assert seconds == pytest.approx(3 * (2000 / rate + other))


@pytest.mark.parametrize("use_cuda, unit", [(False, "CPU-minutes (1 thread(s))"), (True, "minutes on the GPU")])
def test_dry_run_estimate_names_its_unit(mnist_dir, monkeypatch, capsys, use_cuda, unit):
    monkeypatch.setattr(rx, "estimate_seconds", lambda specs: [90.0] * len(specs))
    rx.print_dry_run(config_of("--smoke", "--data_dir", str(mnist_dir), "--use_cuda", str(use_cuda),
                               "--max_workers", "1"))
    printed = capsys.readouterr().out  # 32 runs x 90 s on 1 worker
    assert f"Estimated per run: 1.5-1.5 {unit}; campaign wall time ~ 0.8 h (48 min) on 1 workers" in printed


def test_calibrate_splits_training_from_the_rest(mnist_dir):
    rate, other_seconds = rx.calibrate(nm.TrainConfig(data_dir=str(mnist_dir), noise_type="pixel_uniform"))
    assert rate > 0 and other_seconds > 0


def test_string_config_values_stay_strings(mnist_dir, tmp_path, monkeypatch, capsys):
    """`--output_dir 2024` is the directory "2024", not the int 2024 (which Path() rejects)."""
    assert config_of("--output_dir", "2024")["output_dir"] == "2024"
    assert config_of("--data_dir", "2024")["data_dir"] == "2024"
    monkeypatch.chdir(tmp_path)
    assert rx.main(["--dry-run", "--smoke", "--data_dir", str(mnist_dir), "--output_dir", "2024"]) == 0
    assert "output_dir=2024" in capsys.readouterr().out


# ================================================================ grid


def grid_config(**overrides) -> dict:
    config = config_of("--smoke")
    config["noise_matrix"] = HALF_NEXT  # (config block: nested list) used only where label_matrix is in noise_types
    config.update(overrides)
    return config


@pytest.mark.parametrize("overrides", [
    dict(activations=["relu"], noise_types=["pixel_uniform"], ps=[0.0], extra_label_ps=[], repeats=1),
    dict(activations=["relu", "tanh", "gelu"], noise_types=list(nm.NOISE_TYPES),
         ps=[0.0, 0.5, 1.0], extra_label_ps=[0.95], repeats=3),
    dict(datasets=["mnist", "fashion_mnist"], model_types=["mlp", "cnn"], activations=["relu", "tanh"],
         noise_types=["label_uniform", "pixel_empirical"], ps=[0.0, 0.3], extra_label_ps=[0.9, 1.0], repeats=2),
    # extra p values already in ps are not doubled; they never reach the pixel noise types
    dict(activations=["sigmoid"], noise_types=["label_flip", "pixel_uniform"], ps=[0.0, 1.0],
         extra_label_ps=[1.0, 0.95], repeats=4),
    # loss corrections multiply the label noise cells only (under pixel noise T = I)
    dict(activations=["relu"], noise_types=list(nm.NOISE_TYPES), loss_corrections=["none", "forward"],
         ps=[0.0, 0.5], extra_label_ps=[0.9], repeats=2),
    dict(activations=["relu", "tanh"], noise_types=["label_pairflip", "pixel_empirical"],
         loss_corrections=["forward"], ps=[0.3], extra_label_ps=[], repeats=1),
])
def test_grid_size(overrides):
    config = grid_config(**overrides)
    specs = rx.build_grid(config)
    label_ps = len(set(config["ps"]) | set(config["extra_label_ps"])) * len(config["loss_corrections"])
    pixel_ps = len(set(config["ps"]))
    per_noise = sum(label_ps if n in nm.LABEL_NOISE_TYPES else pixel_ps for n in config["noise_types"])
    expected = (len(config["datasets"]) * len(config["model_types"]) * len(config["activations"])
                * per_noise * config["repeats"])
    assert len(specs) == expected
    assert len({s.run_id for s in specs}) == len(specs)  # every run has its own id
    for spec in specs:
        if spec.config.noise_type in nm.PIXEL_NOISE_TYPES:
            assert spec.config.p in config["ps"]
            assert spec.config.loss_correction == "none"
        else:
            assert spec.config.p in set(config["ps"]) | set(config["extra_label_ps"])
            assert spec.config.loss_correction in config["loss_corrections"]
        # the matrix travels with label_matrix runs only
        expected_matrix = tuple(map(tuple, HALF_NEXT)) if spec.config.noise_type == "label_matrix" else None
        assert spec.config.noise_matrix == expected_matrix


def test_extra_label_ps_only_for_label_noise():
    specs = rx.build_grid(grid_config(activations=["relu"], noise_types=list(nm.NOISE_TYPES),
                                      ps=[0.0, 0.5], extra_label_ps=[0.95], repeats=1))
    ps = {}
    for spec in specs:
        ps.setdefault(spec.config.noise_type, set()).add(spec.config.p)
    assert ps == {"label_uniform": {0.0, 0.5, 0.95}, "label_flip": {0.0, 0.5, 0.95},
                  "label_pairflip": {0.0, 0.5, 0.95}, "label_matrix": {0.0, 0.5, 0.95},
                  "pixel_uniform": {0.0, 0.5}, "pixel_empirical": {0.0, 0.5}}


def test_repeat_seeds_are_paired_across_p_and_noise():
    config = grid_config(activations=["relu", "tanh"], noise_types=list(nm.NOISE_TYPES),
                         ps=[0.0, 0.4, 0.8], repeats=4)
    seeds = {}
    for spec in rx.build_grid(config):
        seeds.setdefault(spec.repeat, set()).add(spec.config.seed)
    assert sorted(seeds) == [0, 1, 2, 3]
    assert all(len(s) == 1 for s in seeds.values())  # one seed per repeat, whatever p / noise / activation
    per_repeat = [next(iter(seeds[r])) for r in range(4)]
    assert len(set(per_repeat)) == 4  # repeats differ
    assert per_repeat == [rx.repeat_seed(config["seed"], r) for r in range(4)]
    # another campaign seed gives other repeat seeds
    other = {s.config.seed for s in rx.build_grid({**config, "seed": 1})}
    assert other.isdisjoint(per_repeat)


def test_grid_is_reproducible():
    config = grid_config(noise_types=list(nm.NOISE_TYPES), repeats=3)
    first = [(s.run_id, s.repeat, s.config) for s in rx.build_grid(config)]
    second = [(s.run_id, s.repeat, s.config) for s in rx.build_grid(dict(config))]
    assert first == second
    # and independent of the order of the other lists' contents? at least of the process: ids are hashes
    assert all(len(run_id) == 16 and int(run_id, 16) >= 0 for run_id, _, _ in first)


def test_run_key_ignores_threads_and_paths_but_not_results_fields():
    base = nm.TrainConfig(p=0.3, seed=5, epochs=2, max_train_samples=1000)
    key = rx.run_key(base)
    assert rx.run_key(dataclasses.replace(base)) == key
    assert rx.run_key(dataclasses.replace(base, cpu_threads=4)) == key
    assert rx.run_key(dataclasses.replace(base, data_dir="/elsewhere/data")) == key
    changed = [dataclasses.replace(base, p=0.4), dataclasses.replace(base, seed=6),
               dataclasses.replace(base, epochs=3), dataclasses.replace(base, max_train_samples=None),
               dataclasses.replace(base, activation="tanh"), dataclasses.replace(base, noise_type="label_flip"),
               dataclasses.replace(base, hidden_sizes=(64,)), dataclasses.replace(base, learning_rate=0.01),
               dataclasses.replace(base, loss_correction="forward"),
               dataclasses.replace(base, validation_fraction=0.1),
               dataclasses.replace(base, precision="bfloat16"),
               dataclasses.replace(base, noise_type="label_matrix", noise_matrix=tuple(map(tuple, HALF_NEXT)))]
    keys = [rx.run_key(c) for c in changed]
    assert key not in keys
    assert len(set(keys)) == len(keys)


def test_grid_run_ids_do_not_depend_on_threads_or_data_dir():
    config = grid_config()
    ids = [s.run_id for s in rx.build_grid(config)]
    assert ids == [s.run_id for s in rx.build_grid({**config, "cpu_threads_per_worker": 2,
                                                             "data_dir": "/other"})]
    assert ids != [s.run_id for s in rx.build_grid({**config, "epochs": 2})]


def test_grid_runs_train_in_the_configured_precision():
    default, mixed = rx.build_grid(grid_config()), rx.build_grid(grid_config(precision="bfloat16"))
    assert {s.config.precision for s in default} == {"float32"}
    assert {s.config.precision for s in mixed} == {"bfloat16"}
    assert not {s.run_id for s in default} & {s.run_id for s in mixed}  # never resumed as each other


# ================================================================ validation


def assert_rejected(argv, tmp_path, capsys, *expected_in_message):
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert rx.main([*argv, "--output_dir", str(out)] if "--output_dir" not in argv else argv) == 2
    captured = capsys.readouterr()
    assert "invalid campaign configuration" in captured.err
    for text in expected_in_message:
        assert text in captured.err, f"{text!r} not in {captured.err!r}"
    assert captured.out == ""
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return captured.err


ALLOWED_ACTIVATIONS = "relu, tanh, sigmoid, leaky_relu, gelu"


@pytest.mark.parametrize("argv, expected", [
    (["--ps", "0,1.5"], ["ps: 1.5", "[0, 1]"]),
    (["--ps", "-0.1"], ["ps: -0.1", "[0, 1]"]),
    (["--ps=-0.1,0.5"], ["ps: -0.1", "[0, 1]"]),
    (["--extra_label_ps", "1.01"], ["extra_label_ps: 1.01", "[0, 1]"]),
    (["--ps", "nan"], ["ps: nan", "[0, 1]"]),
    (["--activations", "relu,swish"], ["'swish'", ALLOWED_ACTIVATIONS]),
    (["--model_types", "rnn"], ["'rnn'", "mlp, cnn"]),
    (["--noise_types", "gaussian"], ["'gaussian'", "label_uniform, label_flip, label_pairflip, label_matrix, "
                                                   "pixel_uniform, pixel_empirical"]),
    (["--loss_corrections", "backward"], ["loss_corrections: 'backward'", "none, forward"]),
    (["--loss_corrections", ""], ["loss_corrections is empty", "none, forward"]),
    (["--validation_fraction", "0.6"], ["validation_fraction: 0.6", "[0, 0.5]"]),
    (["--validation_fraction", "-0.1"], ["validation_fraction: -0.1", "[0, 0.5]"]),
    (["--datasets", "cifar10"], ["'cifar10'", "mnist, fashion_mnist"]),
    (["--optimizer", "rmsprop"], ["'rmsprop'", "adam, sgd"]),
    (["--precision", "float16"], ["precision: 'float16'", "float32, bfloat16"]),
    (["--repeats", "0"], ["repeats: 0", "integer >= 1"]),
    (["--epochs", "0"], ["epochs: 0", "integer >= 1"]),
    (["--epochs", "1.5"], ["epochs: 1.5", "integer >= 1"]),
    (["--max_workers", "0"], ["max_workers: 0", "integer >= 1 or None"]),
    (["--ps", ""], ["ps is empty"]),
    (["--activations", ""], ["activations is empty", ALLOWED_ACTIVATIONS]),
    (["--noise_types", ""], ["noise_types is empty"]),
    (["--use_cuda", "true", "--max_workers", "2"], ["use_cuda=True needs max_workers=1", "got 2"]),
    (["--learning_rate", "0"], ["learning_rate: 0"]),
    (["--normalize", "maybe"], ["normalize: 'maybe'", "true or false"]),
    (["--executor", "spark"], ["executor: 'spark'", "local, dask"]),
    (["--executor", "dask"], ["executor='dask' needs dask_scheduler"]),
])
def test_invalid_values_are_rejected_before_anything_is_written(argv, expected, mnist_dir, tmp_path, capsys):
    assert_rejected(["--smoke", "--data_dir", str(mnist_dir), *argv], tmp_path, capsys, *expected)


def test_every_problem_is_listed_at_once(mnist_dir, tmp_path, capsys):
    err = assert_rejected(["--smoke", "--data_dir", str(mnist_dir), "--ps", "2", "--activations", "swish",
                           "--repeats", "0"], tmp_path, capsys, "ps: 2", "'swish'", "repeats: 0")
    assert err.count("\n  - ") == 3


def test_output_dir_under_a_regular_file(mnist_dir, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    out = blocker / "out"
    err = assert_rejected(["--smoke", "--data_dir", str(mnist_dir), "--output_dir", str(out)], tmp_path, capsys,
                          "output_dir", str(out), "is not a directory")
    assert str(blocker) in err
    assert blocker.read_text() == "not a directory"
    # deeper below the file too, and the output dir being the file itself
    assert_rejected(["--smoke", "--data_dir", str(mnist_dir), "--output_dir", str(out / "a" / "b")],
                    tmp_path, capsys, "is not a directory")
    assert_rejected(["--smoke", "--data_dir", str(mnist_dir), "--output_dir", str(blocker)],
                    tmp_path, capsys, "is not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o500")
def test_output_dir_without_write_permission(mnist_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert_rejected(["--smoke", "--data_dir", str(mnist_dir), "--output_dir", str(locked / "out")],
                        tmp_path, capsys, "not writable")
    finally:
        locked.chmod(0o700)


def test_missing_data_names_the_four_files(tmp_path, tmp_path_factory, capsys):
    empty = tmp_path_factory.mktemp("no_mnist_here")
    err = assert_rejected(["--smoke", "--data_dir", str(empty)], tmp_path, capsys, "data_dir", str(empty))
    for name in IDX_NAMES:
        assert name in err
    assert "download failed" in err  # offline: torchvision's download was tried and failed


def test_use_cuda_with_default_workers_is_rejected(mnist_dir, tmp_path, capsys):
    assert_rejected(["--smoke", "--data_dir", str(mnist_dir), "--max_workers", "none", "--use_cuda", "yes"],
                    tmp_path, capsys, "use_cuda=True needs max_workers=1")


def test_validate_raises_config_error():
    config = config_of("--smoke", "--ps", "1.5")
    with pytest.raises(rx.ConfigError, match=r"ps: 1\.5"):
        rx.validate(config)
    assert isinstance(rx.ConfigError("x"), ValueError)


# ================================================================ statistics


def expected_stats(values: pd.Series) -> dict:
    values = values.astype(float).dropna()  # a metric a run does not have (NaN) is not counted
    n = len(values)
    mean = values.mean()
    if n < 2:
        return {"mean": mean, "std": math.nan, "stderr": math.nan, "ci95_low": math.nan, "ci95_high": math.nan}
    std = values.std(ddof=1)
    stderr = std / math.sqrt(n)
    half = stats.t.ppf(0.975, n - 1) * stderr  # (a constant metric: a CI of width 0 at the mean)
    return {"mean": mean, "std": std, "stderr": stderr, "ci95_low": mean - half, "ci95_high": mean + half}


def check_summary_against_per_run(per_run: pd.DataFrame, summary: pd.DataFrame) -> int:
    """Recompute every summary statistic with pandas/scipy from the per-run table."""
    ok = per_run[per_run["status"] == "ok"].copy()
    ok["max_train_samples"] = pd.to_numeric(ok["max_train_samples"]).astype("Float64").fillna(-1).astype(float)
    summary = summary.copy()
    summary["max_train_samples"] = pd.to_numeric(summary["max_train_samples"]).astype("Float64").fillna(-1).astype(float)
    for table in (ok, summary):  # no noise matrix (every type but label_matrix) is a group too
        table["noise_matrix"] = table["noise_matrix"].astype(object).where(table["noise_matrix"].notna(), "")
    groups = ok.groupby(rs.GROUP_FIELDS, sort=True)
    assert len(summary) == groups.ngroups
    # one summary row per group: the group keys are unique
    assert not summary.duplicated(rs.GROUP_FIELDS).any()
    summary = summary.set_index(rs.GROUP_FIELDS)
    for key, runs in groups:
        row = summary.loc[key]
        assert row["n"] == len(runs)
        for metric in METRICS:
            for stat, value in expected_stats(runs[metric]).items():
                got = row[f"{metric}_{stat}"]
                if math.isnan(value):
                    assert math.isnan(got), (key, metric, stat)
                else:
                    assert got == pytest.approx(value, rel=1e-9, abs=1e-12), (key, metric, stat)
    return groups.ngroups


def fake_record(run_id, *, p=0.0, epochs=1, max_train_samples=1000, activation="relu", repeat=0,
                status="ok", accuracy=0.9, loss=0.5):
    record = {"run_id": run_id, "repeat": repeat, "status": status, "error": "" if status == "ok" else "boom",
              "attempts": 1, "finished_at": "2024-01-01T00:00:00+00:00",
              "dataset": "mnist", "model_type": "mlp", "activation": activation, "hidden_sizes": "256-128",
              "noise_type": "label_flip", "p": p, "epochs": epochs, "batch_size": 128, "optimizer": "adam",
              "learning_rate": 0.001, "weight_decay": 0.0, "normalize": True,
              "max_train_samples": max_train_samples, "use_cuda": False, "seed": 100 + repeat,
              "cpu_threads": 1, "data_dir": "data", "noise_matrix": None, "loss_correction": "none",
              "validation_fraction": 0.0, "precision": "float32"}
    if status == "ok":
        record.update(test_accuracy=accuracy, test_loss=loss, test_macro_precision=accuracy - 0.01,
                      test_macro_recall=accuracy - 0.02, test_macro_roc_auc=0.99, train_loss=loss + 0.1,
                      test_ece=loss / 10, test_mean_confidence=accuracy + 0.05,
                      memorised_fraction=p * loss / 4, corrupted_true_fraction=1 - p * loss / 4,
                      clean_train_accuracy=accuracy + 0.01,
                      seconds=1.0 + repeat, n_params=1000, history_test_loss=[loss] * epochs,
                      history_test_accuracy=[accuracy] * epochs, history_test_ece=[loss / 10] * epochs,
                      reliability={"count": [0.0] * 13 + [100.0 * (1 + repeat), 900.0],
                                   "confidence": [math.nan] * 13 + [0.9, 0.97],
                                   "accuracy": [math.nan] * 13 + [accuracy, accuracy]})
    return record


@pytest.fixture
def hand_records():
    rng = np.random.default_rng(0)
    records = []
    def add(count, **kw):
        for r in range(count):
            records.append(fake_record(f"{len(records):016x}", repeat=r, accuracy=float(rng.uniform(0.5, 1)),
                                       loss=float(rng.uniform(0.1, 2)), **kw))
    add(3, p=0.0)                                        # group A, n = 3
    add(1, p=0.5)                                        # n = 1: std, stderr and CI are NaN
    add(2, p=0.0, epochs=2)                              # like A but 2 epochs: a group of its own
    add(2, p=0.0, max_train_samples=2000)                # like A but more samples
    add(4, p=0.0, max_train_samples=None)                # all samples (None) is a group too
    add(2, p=0.0, activation="tanh")
    records.append(fake_record("f" * 16, p=0.0, repeat=3, status="failed"))  # never pooled into A
    return records


def test_summary_statistics_on_hand_built_records(hand_records):
    per_run = rs.per_run_table(hand_records)
    assert len(per_run) == len(hand_records)
    summary = rs.summary_table(per_run)
    assert check_summary_against_per_run(per_run, summary) == 6
    assert sorted(summary["n"]) == [1, 2, 2, 2, 3, 4]
    # spot check group A by hand (the failed run is left out)
    a = [r for r in hand_records[:3]]
    acc = np.array([r["test_accuracy"] for r in a])
    row = summary[(summary["p"] == 0.0) & (summary["epochs"] == 1) & (summary["max_train_samples"] == 1000)
                  & (summary["activation"] == "relu")].iloc[0]
    assert row["n"] == 3
    assert row["test_accuracy_mean"] == pytest.approx(acc.mean())
    assert row["test_accuracy_std"] == pytest.approx(acc.std(ddof=1))
    assert row["test_accuracy_stderr"] == pytest.approx(acc.std(ddof=1) / math.sqrt(3))
    half = stats.t.ppf(0.975, 2) * acc.std(ddof=1) / math.sqrt(3)
    assert row["test_accuracy_ci95_low"] == pytest.approx(acc.mean() - half)
    assert row["test_accuracy_ci95_high"] == pytest.approx(acc.mean() + half)
    single = summary[summary["p"] == 0.5].iloc[0]
    assert single["n"] == 1 and single["test_accuracy_mean"] == pytest.approx(hand_records[3]["test_accuracy"])
    assert math.isnan(single["test_accuracy_std"]) and math.isnan(single["test_accuracy_ci95_low"])
    full = summary[summary["max_train_samples"].isna()]
    assert list(full["n"]) == [4]


def test_summary_never_pools_different_epochs_or_sample_counts(hand_records):
    summary = rs.summary_table(rs.per_run_table(hand_records))
    relu0 = summary[(summary["activation"] == "relu") & (summary["p"] == 0.0)]
    assert len(relu0) == 4
    combos = {(int(e), None if pd.isna(m) else int(m), int(n))
              for e, m, n in zip(relu0["epochs"], relu0["max_train_samples"], relu0["n"])}
    assert combos == {(1, 1000, 3), (2, 1000, 2), (1, 2000, 2), (1, None, 4)}


def test_summary_roundtrips_through_csv(hand_records, tmp_path):
    paths = rs.write_csvs(hand_records, tmp_path)
    per_run = pd.read_csv(paths["results_per_run.csv"])
    summary = pd.read_csv(paths["results_summary.csv"])
    assert check_summary_against_per_run(per_run, summary) == 6
    history = pd.read_csv(paths["results_history.csv"])
    ok = [r for r in hand_records if r["status"] == "ok"]
    assert len(history) == sum(r["epochs"] for r in ok)
    assert list(history.columns) == rs.RUN_KEYS + ["epoch"] + rs.HISTORY_METRICS
    assert np.allclose(history["test_ece"], [r["test_loss"] / 10 for r in ok for _ in range(r["epochs"])])
    assert history["validation_loss"].isna().all()  # no record has it
    reliability = pd.read_csv(paths["results_reliability.csv"])
    assert list(reliability.columns) == rs.RUN_KEYS + ["bin", "count", "confidence", "accuracy"]
    assert len(reliability) == 15 * len(ok)
    assert (reliability.groupby("run_id")["bin"].apply(list) == [list(range(15))] * len(ok)).all()
    counts = reliability.groupby("run_id")["count"].sum()
    assert counts.to_dict() == {r["run_id"]: 1000 + 100 * r["repeat"] for r in ok}


# ================================================================ end to end on real MNIST


@pytest.fixture(scope="module")
def smoke(warm, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "results"
    argv = ["--smoke", "--max_workers", "2", "--data_dir", str(warm), "--output_dir", str(out)]
    code, stdout, stderr = run_main(argv)
    return {"code": code, "out": out, "stdout": stdout, "stderr": stderr, "argv": argv,
            "specs": rx.build_grid(config_of(*argv)), "config": config_of(*argv)}


@pytest.mark.slow
def test_smoke_campaign_end_to_end(smoke):
    assert smoke["code"] == 0, smoke["stdout"] + smoke["stderr"]
    out, specs, config = smoke["out"], smoke["specs"], smoke["config"]
    assert len(specs) == 32
    assert "32 runs in the grid, 0 already done, 32 to run on 2 workers" in smoke["stdout"]
    assert "Done: 32 ok, 0 failed, 0 pending" in smoke["stdout"]
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == sorted(s.run_id for s in specs)

    per_run = pd.read_csv(out / "results_per_run.csv")
    assert len(per_run) == 32
    assert sorted(per_run["run_id"]) == sorted(s.run_id for s in specs)
    assert (per_run["status"] == "ok").all()
    assert per_run["error"].isna().all()
    expected_columns = {"run_id", "repeat", "status", "error", "attempts", "finished_at", "dataset", "model_type",
                        "activation", "hidden_sizes", "noise_type", "p", "epochs", "batch_size", "optimizer",
                        "learning_rate", "weight_decay", "normalize", "max_train_samples", "seed", "n_params",
                        "precision", *METRICS}
    assert expected_columns <= set(per_run.columns)
    assert not any(c.startswith("history_") for c in per_run.columns)
    assert (per_run["max_train_samples"] == 2000).all() and (per_run["epochs"] == 1).all()
    assert per_run["test_accuracy"].between(0.3, 1).all()  # 2000 samples, 1 epoch: clearly learned
    assert np.isfinite(per_run[ALWAYS_FINITE]).all().all()
    label = per_run["noise_type"].isin(nm.LABEL_NOISE_TYPES)
    assert per_run[SELECTED].isna().all().all()  # no validation split in the smoke campaign
    assert per_run.loc[label, NOISY_TEST].isna().all().all()
    assert np.isfinite(per_run.loc[~label, NOISY_TEST]).all().all()
    assert per_run.loc[~label, MEMORISATION].isna().all().all()
    assert np.isfinite(per_run.loc[label, "clean_train_accuracy"]).all()
    corrupted = label & (per_run["p"] > 0)  # p = 0: no corrupted example to memorise
    assert np.isfinite(per_run.loc[corrupted, MEMORISATION]).all().all()
    assert per_run.loc[label & (per_run["p"] == 0), ["memorised_fraction", "corrupted_true_fraction"]].isna().all().all()
    by_id = {s.run_id: s for s in specs}
    for row in per_run.itertuples():
        spec = by_id[row.run_id]
        assert (row.activation, row.noise_type, row.p, row.repeat, row.seed) == \
            (spec.config.activation, spec.config.noise_type, spec.config.p, spec.repeat, spec.config.seed)

    summary = pd.read_csv(out / "results_summary.csv")
    assert len(summary) == 16  # 2 activations x 4 noise types x 2 p
    assert (summary["n"] == config["repeats"]).all()
    assert set(zip(summary["activation"], summary["noise_type"], summary["p"])) == \
        {(s.config.activation, s.config.noise_type, s.config.p) for s in specs}

    history = pd.read_csv(out / "results_history.csv")
    assert len(history) == 32 * config["epochs"]
    assert set(history["epoch"]) == {1}
    reliability = pd.read_csv(out / "results_reliability.csv")
    assert len(reliability) == 32 * nm.ECE_BINS
    assert (reliability.groupby("run_id")["count"].sum() == 10_000).all()  # the whole test set
    merged = history.merge(per_run[["run_id", "test_accuracy", "test_loss"]], on="run_id", suffixes=("", "_final"))
    assert np.allclose(merged["test_accuracy"], merged["test_accuracy_final"])
    assert np.allclose(merged["test_loss"], merged["test_loss_final"])

    meta = json.loads((out / "campaign.json").read_text())
    assert meta["counts"] == {"done": 32, "failed": 0, "pending": 0}
    assert meta["grid_size"] == 32
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["numpy"] == np.__version__
    assert meta["versions"]["python"] == platform.python_version()
    assert meta["config"] == json.loads(json.dumps(config))
    assert meta["finished_at"] is not None and meta["workers"] == 2


@pytest.mark.slow
def test_smoke_summary_matches_pandas_on_the_per_run_csv(smoke):
    assert smoke["code"] == 0
    per_run = pd.read_csv(smoke["out"] / "results_per_run.csv")
    summary = pd.read_csv(smoke["out"] / "results_summary.csv")
    assert check_summary_against_per_run(per_run, summary) == 16
    # the p=0 runs of label and pixel noise are the same training (paired seeds, no noise)
    clean = per_run[per_run["p"] == 0].groupby(["activation", "repeat"])["test_accuracy"].nunique()
    assert (clean == 1).all()


@pytest.mark.slow
def test_smoke_records_match_csv(smoke):
    records = rs.RunStore(smoke["out"]).load()
    per_run = pd.read_csv(smoke["out"] / "results_per_run.csv").set_index("run_id")
    assert set(records) == set(per_run.index)
    for run_id, record in records.items():
        assert record["attempts"] == 1
        assert len(record["history_test_accuracy"]) == 1
        assert per_run.loc[run_id, "test_accuracy"] == pytest.approx(record["test_accuracy"])
        assert per_run.loc[run_id, "finished_at"] == record["finished_at"]


@pytest.mark.slow
def test_rerun_of_finished_campaign_runs_nothing(smoke):
    assert smoke["code"] == 0
    before = {p.name: p.stat().st_mtime_ns for p in (smoke["out"] / "runs").iterdir()}
    code, stdout, _ = run_main(smoke["argv"])
    assert code == 0
    assert "32 runs in the grid, 32 already done, 0 to run" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in (smoke["out"] / "runs").iterdir()} == before


# ================================================================ failures and determinism


def failing_cell(cfg: nm.TrainConfig) -> bool:
    return cfg.noise_type == "pixel_uniform" and cfg.p == 0.5 and cfg.seed == rx.repeat_seed(0, 1)


def test_a_failing_run_is_recorded_and_the_others_finish(warm, tmp_path, fail_runs):
    assert multiprocessing.get_start_method(allow_none=True) in (None, "fork") and \
        "fork" in multiprocessing.get_all_start_methods()  # the patch reaches the forked workers
    fail_runs(failing_cell, "injected failure for this one cell")
    out = tmp_path / "out"
    argv = tiny_argv(out, warm)
    code, stdout, _ = run_main(argv)
    assert code == 1
    specs = rx.build_grid(config_of(*argv))
    bad = [s for s in specs if failing_cell(s.config)]
    assert len(bad) == 1
    bad_id = bad[0].run_id
    records = rs.RunStore(out).load()
    assert set(records) == {s.run_id for s in specs}
    assert records[bad_id]["status"] == "failed"
    assert records[bad_id]["error"] == "RuntimeError: injected failure for this one cell"
    assert "sometimes_fails" in records[bad_id]["traceback"]
    assert all(r["status"] == "ok" for k, r in records.items() if k != bad_id)
    assert f"failed run {bad_id}" in stdout
    assert "Done: 7 ok, 1 failed, 0 pending" in stdout
    per_run = pd.read_csv(out / "results_per_run.csv").set_index("run_id")
    assert per_run.loc[bad_id, "status"] == "failed"
    assert "injected failure" in per_run.loc[bad_id, "error"]
    summary = pd.read_csv(out / "results_summary.csv")
    n = summary.set_index(["noise_type", "p"])["n"]
    assert n[("pixel_uniform", 0.5)] == 1 and n[("pixel_uniform", 0.0)] == 2
    history = pd.read_csv(out / "results_history.csv")
    assert bad_id not in set(history["run_id"]) and len(history) == 7
    meta = json.loads((out / "campaign.json").read_text())
    assert meta["counts"] == {"done": 7, "failed": 1, "pending": 0}


METRIC_KEYS = ["test_accuracy", "test_loss", "test_macro_precision", "test_macro_recall", "test_macro_roc_auc",
               "train_loss", "n_params", "history_test_loss", "history_test_accuracy", "seed", "p",
               "test_ece", "test_mean_confidence", "history_test_ece", "reliability"]


def same(a, b) -> bool:
    """Equality of stored values, where NaN equals NaN (empty reliability bins, memorisation at p=0)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def test_same_campaign_twice_gives_identical_metrics(warm, tmp_path):
    # the second time with one worker: scheduling must not matter either
    first, second = tmp_path / "a", tmp_path / "b"
    assert run_main(tiny_argv(first, warm, "--max_train_samples", "600"))[0] == 0
    assert run_main(tiny_argv(second, warm, "--max_train_samples", "600", "--max_workers", "1"))[0] == 0
    a, b = rs.RunStore(first).load(), rs.RunStore(second).load()
    assert len(a) == 8 and set(a) == set(b)
    for run_id in a:
        keys = METRIC_KEYS + [k for k in rs.METRICS + [f"history_{m}" for m in rs.HISTORY_METRICS]
                              if k in a[run_id] and k not in ("seconds", "train_seconds")]
        assert {"memorised_fraction", "noisy_test_accuracy"} & set(keys)  # the type-specific ones too
        assert same({k: a[run_id][k] for k in keys}, {k: b[run_id][k] for k in keys}), run_id
    # and the noise matters: p = 0.5 is not the same as p = 0
    accuracies = {(r["noise_type"], r["p"], r["repeat"]): r["test_accuracy"] for r in a.values()}
    assert accuracies[("label_flip", 0.5, 0)] != accuracies[("label_flip", 0.0, 0)]


def test_multithreaded_workers_start_after_the_caller_ran_threaded_torch(mnist_dir, tmp_path):
    """A worker forked from a process that already ran OpenMP threads hangs on its first
    multi-threaded op; workers of several threads must start anyway (as from a notebook)."""
    argv = tiny_argv(tmp_path, mnist_dir, "--cpu_threads_per_worker", "2", "--max_workers", "1", "--repeats", "1")
    code = (
        "import sys, torch, run_experiments as rx\n"
        "torch.set_num_threads(2)\n"
        "torch.ones(4_000_000).mul(2.0).sum()  # starts this process's OpenMP threads\n"
        f"sys.exit(rx.main({argv!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(rx.__file__).parent)
    assert done.returncode == 0, done.stderr
    records = rs.RunStore(tmp_path).load()
    assert len(records) == 4 and {r["status"] for r in records.values()} == {"ok"}
    assert {r["cpu_threads"] for r in records.values()} == {2}


def test_workers_share_the_dataset_by_fork_unless_threaded_or_on_cuda():
    assert rx.pool_context(1, use_cuda=False).get_start_method() == "fork"
    assert rx.pool_context(2, use_cuda=False).get_start_method() == "forkserver"
    assert rx.pool_context(1, use_cuda=True).get_start_method() == "forkserver"  # CUDA cannot cross a fork


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_campaign_on_cuda(mnist_dir, tmp_path):
    argv = tiny_argv(tmp_path, mnist_dir, "--use_cuda", "true", "--max_workers", "1")
    assert run_main(argv)[0] == 0
    records = rs.RunStore(tmp_path).load()
    assert len(records) == 8 and {r["status"] for r in records.values()} == {"ok"}, records
    assert {r["use_cuda"] for r in records.values()} == {True}
