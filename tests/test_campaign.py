"""The campaign: config block and command line, validation, the grid, the dry run, whole
campaigns on real MNIST, resuming, --fresh and the CSVs refreshed while a campaign runs.

(Crashes, signals and corrupt records: test_crash.py. The store and statistics:
test_results_store.py. The executors: test_executors.py, test_dask.py.)
"""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

import nnet_models as nm
import plots
import registry
import results_store as rs
import run_experiments as rx
from conftest import (PER_RUN_LINE, TINY_RUNS, check_summary_against_per_run, per_run_lines, run_files, run_main,
                      same, snapshot, tiny_argv)
from registry import ECE_BINS

ROOT = Path(__file__).resolve().parents[1]
# The final metrics of every ok run (finite whatever the noise type and p)...
ALWAYS_FINITE = ["test_accuracy", "test_loss", "test_macro_precision", "test_macro_recall",
                 "test_macro_roc_auc", "test_ece", "test_mean_confidence", "train_loss", "seconds", "train_seconds"]
# ...and those that exist only for some runs (empty in the CSVs elsewhere)
MEMORISATION = ["memorised_fraction", "corrupted_true_fraction", "clean_train_accuracy"]  # label noise
SELECTED = ["validation_loss", "selected_epoch", "selected_test_accuracy", "selected_test_loss"]  # validation_fraction > 0
NOISY_TEST = ["noisy_test_accuracy", "noisy_test_loss"]  # every run (without pixel noise: the clean test's)
TRANSITION_ERROR = ["transition_error_mean", "transition_error_max"]  # forward_estimated
K = registry.NUM_CLASSES
LABEL_TYPES, PIXEL_TYPES = registry.of_kind("label"), registry.of_kind("pixel")
IDENTITY = [[1.0 if i == j else 0.0 for j in range(K)] for i in range(K)]
NEXT = [[1.0 if j == (i + 1) % K else 0.0 for j in range(K)] for i in range(K)]  # k -> k+1 mod K
HALF_NEXT = [[0.5 if j in (i, (i + 1) % K) else 0.0 for j in range(K)] for i in range(K)]


def as_tuples(matrix) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(x) for x in row) for row in matrix)


def config_of(*argv: str) -> dict:
    return rx.config_from_args(list(argv))[0]


def progress(stdout: str) -> list[str]:
    """The "k/N" of each per-run line."""
    return [f"{match[1]}/{match[2]}" for line in stdout.splitlines() if (match := PER_RUN_LINE.fullmatch(line))]


# ================================================================ config block and command line


def test_every_config_name_has_help_from_its_config_block_comment(capsys):
    with pytest.raises(SystemExit) as info:
        rx.main(["--help"])
    assert info.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (at hyphens too)
    parser = rx.build_parser({name: getattr(rx, name) for name in rx.CONFIG_NAMES})
    helps = {action.dest: action.help for action in parser._actions}
    for name in rx.CONFIG_NAMES:
        assert f"--{name}" in text and f"--{name.replace('_', '-')}" in text
        comment = helps[name].rsplit(" (default:", 1)[0]
        assert comment, f"{name} has no comment in the config block"
        assert "".join(helps[name].replace("%%", "%").split()) in text
    assert "noiselevels,eachin[0,1];p=0isonecleanrunsharedbyeverynoisetype[agridaxis:givealist](default:[0.0,0.1,0.2" in text
    assert "whereruns,CSVsandfiguresgo(default:results/campaign)" in text


def test_the_config_block_is_a_valid_campaign():
    config = config_of()
    assert config["losses"] == ["ce"] and config["loss_settings"] == {}
    assert rx.config_errors(config) == []
    assert config["output_dir"] == "results/campaign"
    specs = rx.build_grid(config)
    label = sum(t in LABEL_TYPES for t in config["noise_types"])
    pixel = len(config["noise_types"]) - label
    noisy_ps = len(set(config["ps"]) - {0})
    label_ps = len(set(config["ps"] + config["extra_label_ps"]) - {0})
    # one clean run (p = 0) per activation and repeat, shared by every noise type
    assert len(specs) == len(config["activations"]) * config["repeats"] * (1 + label * label_ps + pixel * noisy_ps)


CLI_SAMPLES = {  # name: (text on the command line, the value it gives)
    "datasets": ("mnist,fashion_mnist", ["mnist", "fashion_mnist"]),
    "activations": ("gelu,leaky_relu", ["gelu", "leaky_relu"]),
    "model_types": ("cnn", ["cnn"]),
    "noise_types": ("label_flip,pixel_uniform", ["label_flip", "pixel_uniform"]),
    "ps": ("0,0.5", [0, 0.5]),
    "extra_label_ps": ("0.97", [0.97]),
    "repeats": ("7", 7),
    "target_ci95": ("0.005", 0.005),
    "max_repeats": ("20", 20),
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
    "allow_oversubscription": ("yes", True),
    "max_attempts": ("5", 5),
    "retry_failed": ("false", False),
    "use_cuda": ("true", True),
    "data_dir": ("/some/data", "/some/data"),
    "output_dir": ("/some/out", "/some/out"),
    "executor": ("dask", "dask"),
    "dask_scheduler": ("tcp://10.0.0.1:8786", "tcp://10.0.0.1:8786"),
    "noise_matrix": ("matrix.json", "matrix.json"),
    "losses": ("ce,gce", ["ce", "gce"]),
    "loss_settings": ("{'gce': {'q': [0.5, 0.7]}}", {"gce": {"q": [0.5, 0.7]}}),
    "validation_fraction": ("0.1", 0.1),
    "precision": ("bfloat16", "bfloat16"),
    "stalled_run_factor": ("2.5", 2.5),
}


@pytest.mark.parametrize("name", rx.CONFIG_NAMES)  # a new config name needs a sample here
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
    assert config_of("--hidden_sizes", "8")["hidden_sizes"] == [8]


def test_none_and_booleans_on_the_command_line():
    assert config_of("--max_workers", "none")["max_workers"] is None
    assert config_of("--max-train-samples", "None")["max_train_samples"] is None
    assert config_of("--normalize", "yes")["normalize"] is True
    assert config_of("--pin_cpus", "False")["pin_cpus"] is False


def test_string_config_values_stay_strings():
    """`--output_dir 2024` is the directory "2024", not the int 2024 (which Path() rejects);
    losses stay names, numeric lists stay numbers."""
    assert config_of("--output_dir", "2024")["output_dir"] == "2024"
    assert config_of("--data_dir", "2024")["data_dir"] == "2024"
    assert config_of("--losses", "ce")["losses"] == ["ce"]
    assert config_of("--losses", " forward , ce ")["losses"] == ["forward", "ce"]
    assert config_of("--activations", "1")["activations"] == [1]  # a literal, rejected by validation:
    assert rx.config_errors(config_of("--smoke", "--activations", "1")) == [
        f"activations: 1 is not one of: {ALLOWED_ACTIVATIONS}"]


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


def test_an_unknown_flag_is_an_error_naming_it(capsys):
    with pytest.raises(SystemExit) as info:
        rx.main(["--smoke", "--learningrate", "0.1"])
    assert info.value.code == 2
    assert "unrecognized arguments: --learningrate 0.1" in capsys.readouterr().err


# ================================================================ validation


def assert_rejected(argv, tmp_path, *expected_in_message) -> str:
    """main() exits with 2, lists the problems on stderr (one "error: " line each), and writes
    nothing anywhere."""
    out = tmp_path / "out"
    argv = argv if "--output_dir" in argv else [*argv, "--output_dir", str(out)]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, stderr = run_main(argv)
    assert code == 2, stdout + stderr
    assert stderr.splitlines() and all(line.startswith("error: ") for line in stderr.splitlines()), stderr
    for text in expected_in_message:
        assert text in stderr, f"{text!r} not in {stderr!r}"
    assert stdout == ""
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return stderr


ALLOWED_ACTIVATIONS = "relu, tanh, sigmoid, leaky_relu, gelu"


@pytest.mark.parametrize("argv, expected", [
    (["--ps", "0,1.5"], ["ps: 1.5", "[0, 1]"]),
    (["--ps", "-0.1"], ["ps: -0.1", "[0, 1]"]),
    (["--ps=-0.1,0.5"], ["ps: -0.1", "[0, 1]"]),
    (["--extra_label_ps", "1.01"], ["extra_label_ps: 1.01", "[0, 1]"]),
    (["--ps", "nan"], ["ps: 'nan'", "[0, 1]"]),  # not a Python literal: text
    (["--ps", "inf"], ["ps: 'inf'", "[0, 1]"]),
    (["--ps", "1e999"], ["ps: inf", "[0, 1]"]),
    (["--ps", "half"], ["ps: 'half'", "[0, 1]"]),
    (["--activations", "relu,swish"], ["activations: 'swish'", ALLOWED_ACTIVATIONS]),
    (["--model_types", "rnn"], ["model_types: 'rnn'", "mlp, cnn"]),
    (["--noise_types", "gaussian"], ["noise_types: 'gaussian'", "label_uniform, label_flip, label_pairflip, "
                                                                "label_matrix, pixel_uniform, pixel_empirical"]),
    (["--losses", "backward"], ["losses: 'backward'", "ce, forward, forward_estimated, gce, sce"]),
    (["--losses", ""], ["losses is empty", "ce, forward"]),
    (["--validation_fraction", "0.6"], ["validation_fraction: 0.6", "[0, 0.5]"]),
    (["--validation_fraction", "-0.1"], ["validation_fraction: -0.1", "[0, 0.5]"]),
    (["--datasets", "cifar10"], ["datasets: 'cifar10'", "mnist, fashion_mnist"]),
    (["--optimizer", "rmsprop"], ["optimizer: 'rmsprop'", "adam, sgd"]),
    (["--precision", "float16"], ["precision: 'float16'", "float32, bfloat16"]),
    (["--repeats", "0"], ["repeats: 0", "an integer >= 1"]),
    (["--epochs", "0"], ["epochs: 0", "an integer >= 1"]),
    (["--epochs", "1.5"], ["epochs: 1.5", "an integer >= 1"]),
    (["--batch_size", "0"], ["batch_size: 0", "an integer >= 1"]),
    (["--cpu_threads_per_worker", "0"], ["cpu_threads_per_worker: 0", "an integer >= 1"]),
    (["--max_attempts", "0"], ["max_attempts: 0", "an integer >= 1"]),
    (["--max_workers", "0"], ["max_workers: 0", "an integer >= 1 or None"]),
    (["--max_train_samples", "0"], ["max_train_samples: 0", "an integer >= 1 or None"]),
    (["--seed", "x"], ["seed: 'x'", "an integer"]),
    (["--hidden_sizes", "16,abc"], ["hidden_sizes: [16, 'abc']", "a non-empty list of integers >= 1"]),
    (["--hidden_sizes", "0"], ["hidden_sizes: [0]", "a non-empty list of integers >= 1"]),
    (["--ps", ""], ["ps is empty", "[0, 1]"]),
    (["--activations", ""], ["activations is empty", ALLOWED_ACTIVATIONS]),
    (["--noise_types", ""], ["noise_types is empty"]),
    (["--use_cuda", "true", "--max_workers", "2"], ["use_cuda=True needs max_workers=1", "got 2"]),
    (["--max_workers", "none", "--use_cuda", "yes"], ["use_cuda=True needs max_workers=1", "got None"]),
    (["--learning_rate", "0"], ["learning_rate: 0", "a number > 0"]),
    (["--weight_decay", "-1"], ["weight_decay: -1", "a number >= 0"]),
    (["--normalize", "maybe"], ["normalize: 'maybe'", "true or false"]),
    (["--pin_cpus", "2"], ["pin_cpus: 2", "true or false"]),
    (["--executor", "spark"], ["executor: 'spark'", "local, dask"]),
    (["--executor", "dask"], ["dask_scheduler: None is not a scheduler address", "tcp://HOST:8786"]),
    (["--executor", "dask", "--dask_scheduler", "localhost:8786"], ["dask_scheduler: 'localhost:8786'",
                                                                    "tcp://HOST:8786", "tls://HOST:8786"]),
    (["--executor", "dask", "--dask_scheduler", "tcp://host"], ["dask_scheduler: 'tcp://host'", "tcp://HOST:8786"]),
    (["--activations", "relu,tanh,relu"], ["activations: 'relu' appears more than once"]),
    (["--ps", "0,0.5,0.5"], ["ps: 0.5 appears more than once"]),
    (["--max_train_samples", "60001"], ["max_train_samples: 60001 is more than the 60000 training examples of mnist",
                                        "at most 60000, or None"]),
    (["--repeats", "1000000"], ["the grid has 10,000,000 runs, more than 1,000,000"]),
])
def test_invalid_values_are_rejected_before_anything_is_written(argv, expected, mnist_dir, tmp_path):
    assert_rejected(["--smoke", "--data_dir", str(mnist_dir), *argv], tmp_path, *expected)


def test_every_problem_is_listed_at_once(mnist_dir, tmp_path):
    err = assert_rejected(["--smoke", "--data_dir", str(mnist_dir), "--ps", "2", "--activations", "swish",
                           "--repeats", "0"], tmp_path, "ps: 2", "'swish'", "repeats: 0")
    assert len(err.splitlines()) == 3


@pytest.mark.parametrize("name", ["output_dir", "data_dir"])
def test_empty_paths_are_rejected(name, mnist_dir, tmp_path):
    argv = ["--smoke", "--data_dir", str(mnist_dir), "--output_dir", str(tmp_path / "out"), f"--{name}", " "]
    assert_rejected(argv, tmp_path, f"{name}: ' ' is not a non-empty path")


def test_more_threads_than_twice_the_cpus_needs_allow_oversubscription(mnist_dir, tmp_path):
    cpus = len(os.sched_getaffinity(0))
    too_many = ["--smoke", "--data_dir", str(mnist_dir), "--max_workers", str(cpus + 1),
                "--cpu_threads_per_worker", "2", "--output_dir", str(tmp_path / "out")]
    assert_rejected(too_many, tmp_path, f"max_workers x cpu_threads_per_worker = {2 * cpus + 2} threads on "
                                        f"{cpus} CPUs", "allow_oversubscription = True")
    rx.validate(config_of(*too_many, "--allow_oversubscription", "true"))
    rx.validate(config_of(*too_many[:4], str(cpus)))  # twice the CPUs is still fine

@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a CUDA device here")
def test_use_cuda_without_a_cuda_device_is_rejected(mnist_dir, tmp_path):
    assert_rejected(["--smoke", "--data_dir", str(mnist_dir), "--use_cuda", "true", "--max_workers", "1"],
                    tmp_path, "use_cuda=True but torch sees no CUDA device")


def test_output_dir_under_a_regular_file(mnist_dir, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    out = blocker / "out"
    err = assert_rejected(["--smoke", "--data_dir", str(mnist_dir), "--output_dir", str(out)], tmp_path,
                          "output_dir", str(out), "is not a directory")
    assert str(blocker) in err
    assert blocker.read_text() == "not a directory"
    # deeper below the file too, and the output dir being the file itself
    assert_rejected(["--smoke", "--data_dir", str(mnist_dir), "--output_dir", str(out / "a" / "b")],
                    tmp_path, "is not a directory")
    assert_rejected(["--smoke", "--data_dir", str(mnist_dir), "--output_dir", str(blocker)],
                    tmp_path, "is not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o500")
def test_output_dir_without_write_permission(mnist_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert_rejected(["--smoke", "--data_dir", str(mnist_dir), "--output_dir", str(locked / "out")],
                        tmp_path, "not writable", str(locked))
    finally:
        locked.chmod(0o700)


def test_missing_data_names_the_four_files(tmp_path, tmp_path_factory):
    empty = tmp_path_factory.mktemp("no_mnist_here")
    err = assert_rejected(["--smoke", "--data_dir", str(empty)], tmp_path, "data_dir", str(empty))
    for name in nm.IDX_FILES.values():
        assert name in err
    assert "download failed" in err  # offline: torchvision's download was tried and failed


def test_a_tilde_in_output_dir_is_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_of("--output_dir", "~/campaign")["output_dir"] == str(tmp_path / "campaign")
    assert config_of("--data_dir", "~/data")["data_dir"] == "~/data"  # expanded where it is read: on each worker


def test_with_the_dask_executor_the_data_are_the_workers_business(tmp_path):
    config = config_of("--smoke", "--executor", "dask", "--dask_scheduler", "tcp://127.0.0.1:8786",
                       "--data_dir", str(tmp_path / "only-on-the-workers"), "--output_dir", str(tmp_path / "out"))
    rx.validate(config)  # no error: this machine need not have the data


@pytest.mark.parametrize("flag", ["--check", "--dry-run", "--list"])
def test_checks_that_train_here_need_the_data_here_also_for_a_dask_campaign(tmp_path, flag):
    missing = tmp_path / "only-on-the-workers"
    assert_rejected(["--smoke", flag, "--executor", "dask", "--dask_scheduler", "tcp://127.0.0.1:8786", "--data_dir",
                     str(missing)], tmp_path, "data_dir: mnist data not found", str(missing))


def test_validate_raises_config_error_listing_every_problem():
    with pytest.raises(rx.ConfigError) as info:
        rx.validate(config_of("--smoke", "--ps", "1.5", "--epochs", "0"))
    assert isinstance(info.value, ValueError)
    assert sorted(info.value.args[0]) == ["epochs: 0 is not an integer >= 1", "ps: 1.5 is not a number in [0, 1]"]


# ---------------------------------------------------------------- the noise matrix of label_matrix


def matrix_argv(mnist_dir, tmp_path, *extra: str) -> list[str]:
    return ["--smoke", "--noise_types", "label_matrix", "--data_dir", str(mnist_dir),
            "--output_dir", str(tmp_path / "out"), *extra]


def write_json(tmp_path, name, matrix) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(matrix))
    return str(path)


def compact_json(matrix) -> str:
    return json.dumps(matrix, separators=(",", ":")).replace(".0,", ",").replace(".0]", "]")


def test_label_matrix_without_noise_matrix_is_rejected(mnist_dir, tmp_path):
    assert_rejected(matrix_argv(mnist_dir, tmp_path), tmp_path, "label_matrix", "noise_matrix is None",
                    "row-stochastic")
    # without label_matrix in the grid, no matrix is needed
    assert rx.config_errors(config_of("--smoke")) == []


@pytest.mark.parametrize("bad, expected", [
    (HALF_NEXT[:9], ["noise_matrix", "10x10", "(9, 10)"]),
    ([[2.0, -1.0] + [0.0] * 8] + IDENTITY[1:], ["noise_matrix", "negative"]),
    ([[0.5] * 10] + IDENTITY[1:], ["noise_matrix", "row 0 sums to 5", "sum to 1"]),
])
@pytest.mark.parametrize("given_as", ["file", "text"])
def test_bad_noise_matrix_is_rejected_naming_the_problem(bad, expected, given_as, mnist_dir, tmp_path):
    value = write_json(tmp_path, "bad.json", bad) if given_as == "file" else compact_json(bad)
    assert_rejected(matrix_argv(mnist_dir, tmp_path, "--noise_matrix", value), tmp_path, *expected)


@pytest.mark.parametrize("value", ["[[1, 0], [0", "5", "x" * 300], ids=["broken-json", "number", "long-text"])
def test_noise_matrix_that_is_neither_a_matrix_nor_a_file_is_rejected(value, mnist_dir, tmp_path):
    assert_rejected(matrix_argv(mnist_dir, tmp_path, "--noise_matrix", value), tmp_path, "noise_matrix: ")


def test_missing_noise_matrix_file_is_named_in_the_error(mnist_dir, tmp_path):
    missing = str(tmp_path / "no_such_matrix.json")
    assert_rejected(matrix_argv(mnist_dir, tmp_path, "--noise_matrix", missing), tmp_path, "noise_matrix", missing,
                    "neither JSON text", "nor an existing .json file")


def test_noise_matrix_file_under_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_json(tmp_path, "next.json", NEXT)
    assert rx.parse_noise_matrix("~/next.json") == as_tuples(NEXT)


def test_noise_matrix_from_a_json_file_and_from_json_text(mnist_dir, tmp_path):
    path = write_json(tmp_path, "next.json", NEXT)
    text = compact_json(NEXT)
    assert json.loads(text) == NEXT
    grids = []
    for value in (path, text):
        config = config_of(*matrix_argv(mnist_dir, tmp_path, "--noise_matrix", value,
                                        "--losses", "ce,forward"))
        assert config["noise_matrix"] == value  # kept as given; parsed when the grid is built
        assert config["losses"] == ["ce", "forward"]
        assert rx.config_errors(config) == []
        grids.append(rx.build_grid(config))
    from_file, from_text = grids
    assert len(from_file) == 2 * 2 * 2 * 2  # activations x (clean, p = 0.5) x repeats x losses
    assert all(s.config.noise_matrix == (as_tuples(NEXT) if s.config.p else None) for s in from_file)
    # the same matrix, however given, is the same run
    assert [s.run_id for s in from_file] == [s.run_id for s in from_text]
    assert [s.config for s in from_file] == [s.config for s in from_text]
    # ...and another matrix is another run, but for the clean one (p = 0), which has no matrix
    other = rx.build_grid({**config_of(*matrix_argv(mnist_dir, tmp_path), "--losses", "ce,forward"),
                           "noise_matrix": HALF_NEXT})
    assert {s.run_id for s in other} & {s.run_id for s in from_file} == {s.run_id for s in other if s.config.p == 0}
    assert len([s for s in other if s.config.p == 0]) == 8


def test_long_noise_matrix_json_text_is_accepted(mnist_dir, tmp_path):
    text = json.dumps(HALF_NEXT)  # what json.dumps / a person writes: ~540 characters
    assert len(text) > 255  # longer than a file name may be
    config = config_of(*matrix_argv(mnist_dir, tmp_path, "--noise_matrix", text))
    assert rx.config_errors(config) == []
    assert {s.config.noise_matrix for s in rx.build_grid(config)} == {as_tuples(HALF_NEXT), None}  # None: p = 0


# ================================================================ grid


def grid_config(**overrides) -> dict:
    config = config_of("--smoke")
    config["noise_matrix"] = HALF_NEXT  # (config block: nested list) used only where label_matrix is in noise_types
    config.update(overrides)
    return config


@pytest.mark.parametrize("overrides", [
    dict(activations=["relu"], noise_types=["pixel_uniform"], ps=[0.0], extra_label_ps=[], repeats=1),
    dict(activations=["relu", "tanh", "gelu"], noise_types=list(registry.noisy_types()),
         ps=[0.0, 0.5, 1.0], extra_label_ps=[0.95], repeats=3),
    dict(datasets=["mnist", "fashion_mnist"], model_types=["mlp", "cnn"], activations=["relu", "tanh"],
         noise_types=["label_uniform", "pixel_empirical"], ps=[0.0, 0.3], extra_label_ps=[0.9, 1.0], repeats=2),
    # extra p values already in ps are not doubled; they never reach the pixel noise types
    dict(activations=["sigmoid"], noise_types=["label_flip", "pixel_uniform"], ps=[0.0, 1.0],
         extra_label_ps=[1.0, 0.95], repeats=4),
    # losses multiply every point (under pixel noise and at p = 0, T = I: forward is cross-entropy)
    dict(activations=["relu"], noise_types=list(registry.noisy_types()), losses=["ce", "forward"],
         ps=[0.0, 0.5], extra_label_ps=[0.9], repeats=2),
    dict(activations=["relu", "tanh"], noise_types=["label_pairflip", "pixel_empirical"],
         losses=["forward"], ps=[0.3], extra_label_ps=[], repeats=1),
    # without p = 0, no clean run; a setting given as a list is an axis
    dict(activations=["relu"], noise_types=["label_flip"], ps=[0.2], extra_label_ps=[0.4], repeats=2,
         learning_rate=[0.001, 0.01, 0.1], batch_size=[32, 64], hidden_sizes=[[16], [8, 8]]),
    # a list of epochs is one run of the longest (not an axis of runs)
    dict(activations=["relu"], noise_types=["pixel_uniform"], ps=[0.0, 0.5], extra_label_ps=[], repeats=2,
         epochs=[1, 3, 2]),
])
def test_grid_size(overrides):
    config = grid_config(**overrides)
    specs = rx.build_grid(config)
    label_ps = len((set(config["ps"]) | set(config["extra_label_ps"])) - {0})
    pixel_ps = len(set(config["ps"]) - {0})
    clean = 0 in config["ps"]
    per_setting = clean + sum(label_ps if n in LABEL_TYPES else pixel_ps for n in config["noise_types"])
    axes = [name for name in rx.TRAINING_AXES if isinstance(config[name], list)
            and (name != "hidden_sizes" or isinstance(config[name][0], list))]
    expected = (np.prod([len(config[name]) for name in axes]) * len(config["losses"]) * per_setting
                * config["repeats"])
    assert len(specs) == expected == rx.grid_size(config)
    assert len({s.run_id for s in specs}) == len(specs)  # every run has its own id
    for spec in specs:
        cfg = spec.config
        if cfg.p == 0:  # the clean run, the same for every noise type
            assert cfg.noise_type == registry.CLEAN
        elif cfg.noise_type in PIXEL_TYPES:
            assert cfg.p in config["ps"]
        else:
            assert cfg.p in set(config["ps"]) | set(config["extra_label_ps"])
        assert cfg.noise_type in (registry.CLEAN, *config["noise_types"])
        assert cfg.loss in config["losses"]
        # the matrix travels with label_matrix runs only
        assert cfg.noise_matrix == (as_tuples(HALF_NEXT) if cfg.noise_type == "label_matrix" else None)
        epochs = sorted(rx.axis_values(config, "epochs"))
        assert (cfg.epochs, cfg.reported_epochs) == (epochs[-1], tuple(epochs[:-1]))


def test_grid_cells_carry_the_campaign_settings():
    config = grid_config(epochs=3, batch_size=64, optimizer="sgd", learning_rate=0.05, weight_decay=1e-4,
                         hidden_sizes=[32, 8], normalize=False, max_train_samples=700, cpu_threads_per_worker=2,
                         data_dir="/d", validation_fraction=0.1, precision="bfloat16")
    for spec in rx.build_grid(config):
        cfg = spec.config
        assert (cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.learning_rate, cfg.weight_decay, cfg.hidden_sizes,
                cfg.normalize, cfg.max_train_samples, cfg.cpu_threads, cfg.data_dir, cfg.validation_fraction,
                cfg.precision) == (3, 64, "sgd", 0.05, 1e-4, (32, 8), False, 700, 2, "/d", 0.1, "bfloat16")
        assert spec.run_id == rx.run_key(cfg)


def test_extra_label_ps_only_for_label_noise():
    specs = rx.build_grid(grid_config(activations=["relu"], noise_types=list(registry.noisy_types()),
                                      ps=[0.0, 0.5], extra_label_ps=[0.95], repeats=1))
    ps = {}
    for spec in specs:
        ps.setdefault(spec.config.noise_type, set()).add(spec.config.p)
    assert ps == {"none": {0.0}, "label_uniform": {0.5, 0.95}, "label_flip": {0.5, 0.95},
                  "label_pairflip": {0.5, 0.95}, "label_matrix": {0.5, 0.95},
                  "pixel_uniform": {0.5}, "pixel_empirical": {0.5}}


def test_repeat_seeds_are_paired_across_p_and_noise():
    config = grid_config(activations=["relu", "tanh"], noise_types=list(registry.noisy_types()),
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


def test_grid_is_reproducible_in_another_process():
    config = grid_config(noise_types=list(registry.noisy_types()), repeats=3, learning_rate=[0.001, 0.01],
                         epochs=[1, 2], losses=["ce", "gce"], loss_settings={"gce": {"q": [0.5, 0.7]}})
    first = [(s.run_id, s.repeat, s.config) for s in rx.build_grid(config)]
    assert first == [(s.run_id, s.repeat, s.config) for s in rx.build_grid(dict(config))]
    assert all(len(run_id) == 16 and int(run_id, 16) >= 0 for run_id, _, _ in first)
    # run ids are hashes, not Python's per-process string hashes
    code = ("import json, sys, run_experiments as rx\n"
            "config = json.loads(sys.argv[1])\n"
            "print(' '.join(s.run_id for s in rx.build_grid(config)))\n")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(config)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [run_id for run_id, _, _ in first]


def test_run_key_ignores_threads_and_paths_but_not_results_fields():
    base = registry.TrainConfig(noise_type="label_uniform", p=0.3, seed=5, epochs=2, max_train_samples=1000)
    key = rx.run_key(base)
    assert rx.run_key(dataclasses.replace(base)) == key
    assert rx.run_key(dataclasses.replace(base, cpu_threads=4)) == key
    assert rx.run_key(dataclasses.replace(base, data_dir="/elsewhere/data")) == key
    matrix_run = dataclasses.replace(base, noise_type="label_matrix", noise_matrix=as_tuples(HALF_NEXT))
    changed = [dataclasses.replace(base, p=0.4), dataclasses.replace(base, seed=6),
               dataclasses.replace(base, epochs=3), dataclasses.replace(base, max_train_samples=None),
               dataclasses.replace(base, activation="tanh"), dataclasses.replace(base, noise_type="label_flip"),
               dataclasses.replace(base, hidden_sizes=(64,)), dataclasses.replace(base, learning_rate=0.01),
               dataclasses.replace(base, batch_size=64), dataclasses.replace(base, optimizer="sgd"),
               dataclasses.replace(base, weight_decay=1e-4), dataclasses.replace(base, normalize=False),
               dataclasses.replace(base, dataset="fashion_mnist"), dataclasses.replace(base, model_type="cnn"),
               dataclasses.replace(base, use_cuda=True),
               dataclasses.replace(base, loss="forward"),
               dataclasses.replace(base, loss="gce", loss_settings=(("q", 0.7),)),
               dataclasses.replace(base, loss="gce", loss_settings=(("q", 0.5),)),
               dataclasses.replace(base, reported_epochs=(1,)),
               dataclasses.replace(base, validation_fraction=0.1),
               dataclasses.replace(base, validation_fraction=0.2),
               dataclasses.replace(base, precision="bfloat16"),
               matrix_run, dataclasses.replace(matrix_run, noise_matrix=as_tuples(NEXT))]
    keys = [rx.run_key(c) for c in changed]
    assert key not in keys
    assert len(set(keys)) == len(keys)
    # every field but the threads and the data path is in some variant above
    varied = {f.name for f in dataclasses.fields(registry.TrainConfig)
              if any(getattr(c, f.name) != getattr(base, f.name) for c in changed)}
    assert varied == {f.name for f in dataclasses.fields(registry.TrainConfig)} - {"cpu_threads", "data_dir"}


def test_grid_run_ids_do_not_depend_on_threads_or_data_dir():
    config = grid_config()
    ids = [s.run_id for s in rx.build_grid(config)]
    assert ids == [s.run_id for s in rx.build_grid({**config, "cpu_threads_per_worker": 2, "data_dir": "/other"})]
    assert ids != [s.run_id for s in rx.build_grid({**config, "epochs": 2})]


def test_grid_run_ids_do_not_depend_on_how_numbers_are_written():
    """`0` or `0.0`, `1` or `1.0` in the config block or on the command line: the same runs."""
    as_floats = grid_config(ps=[0.0, 1.0], extra_label_ps=[], learning_rate=1.0, weight_decay=0.0,
                            validation_fraction=0.0)
    as_ints = grid_config(ps=[0, 1], extra_label_ps=[], learning_rate=1, weight_decay=0, validation_fraction=0)
    assert [s.run_id for s in rx.build_grid(as_ints)] == [s.run_id for s in rx.build_grid(as_floats)]
    cli = config_of("--smoke", "--ps", "0,1", "--learning_rate", "1", "--weight_decay", "0")
    assert [s.run_id for s in rx.build_grid({**cli, "noise_matrix": HALF_NEXT})] == \
        [s.run_id for s in rx.build_grid(grid_config(ps=[0.0, 1.0], learning_rate=1.0))]


def test_grid_runs_train_in_the_configured_precision():
    default, mixed = rx.build_grid(grid_config()), rx.build_grid(grid_config(precision="bfloat16"))
    assert {s.config.precision for s in default} == {"float32"}
    assert {s.config.precision for s in mixed} == {"bfloat16"}
    assert not {s.run_id for s in default} & {s.run_id for s in mixed}  # never resumed as each other


# ================================================================ dry run


def test_dry_run_prints_the_grid_and_writes_nothing(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = ["--dry-run", "--smoke", "--hidden_sizes", "16", "--max_workers", "2", "--data_dir", str(mnist_dir),
            "--output_dir", str(out)]
    code, printed, _ = run_main(argv)
    assert code == 0
    specs = rx.build_grid(config_of(*argv))
    assert len(specs) == 20
    assert printed.startswith(f"20 runs: 2 activations x 1 loss (with its settings) x 5 noise points (p = 0 once, "
                              f"shared by the noise types) x 2 repeats; 2 workers x 1 thread; output_dir={out}\n")
    assert "Estimated wall time " in printed and " on 2 workers (" in printed
    assert not any(spec.run_id in printed for spec in specs)  # the runs are listed on request only
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # nothing at all in the working directory either

    code, printed, _ = run_main([*argv[1:], "--list"])  # a dry run without --dry-run: the list runs nothing
    assert code == 0
    listed = [line for line in printed.splitlines() if line.split(" ")[0] in {s.run_id for s in specs}]
    assert len(listed) == 20
    for spec, line in zip(specs, listed):
        cfg = spec.config
        assert line == (f"{spec.run_id} mlp/{cfg.activation} {cfg.noise_type} p={cfg.p:.2f} r{spec.repeat} "
                        f"seed={cfg.seed} epochs=1")
    assert list(tmp_path.iterdir()) == []


def test_dry_run_of_an_invalid_config_is_rejected(mnist_dir, tmp_path):
    assert_rejected(["--dry-run", "--smoke", "--data_dir", str(mnist_dir), "--ps", "7"], tmp_path, "ps: 7")


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
    assert {(s.config.noise_type, s.config.p) for s in specs} >= {("none", 0.0), ("label_flip", 0.5),
                                                                 ("pixel_uniform", 0.5)}
    estimates = rx.estimate_seconds(specs)
    assert sorted(calibrated) == [False, True]
    for spec, seconds in zip(specs, estimates):
        rate, other = rates[spec.config.noise_type in PIXEL_TYPES and spec.config.p > 0]
        assert seconds == pytest.approx(3 * (2000 / rate + other))
    # all samples: the dataset's size
    full = rx.build_grid(config_of("--smoke", "--max_train_samples", "none", "--data_dir", str(mnist_dir)))
    assert rx.estimate_seconds(full[:1]) == [pytest.approx(60_000 / 1000.0 + 2.0)]
    # forward_estimated also trains its first model, for estimate_epochs (here 4) without the per-epoch evaluation
    estimated = rx.build_grid(config_of("--smoke", "--epochs", "3", "--noise_types", "label_flip", "--data_dir",
                                        str(mnist_dir), "--losses", "forward_estimated",
                                        "--loss_settings", "{'forward_estimated': {'estimate_epochs': 4}}"))
    assert rx.estimate_seconds(estimated[:1]) == [pytest.approx(3 * (2000 / 1000.0 + 2.0) + 4 * 2000 / 1000.0)]


def test_durations_read_at_every_scale():
    """A smoke run's fraction of a second is not shown as 0 s."""
    assert [rx.duration(s) for s in (0, 0.26, 45.4, 720, 3.4 * 3600)] == ["0 s", "0.3 s", "45 s", "12 min", "3.4 h"]


@pytest.mark.parametrize("use_cuda, where", [(False, "on 1 thread"), (True, "on the GPU")])
def test_dry_run_estimate_line(mnist_dir, monkeypatch, capsys, use_cuda, where):
    monkeypatch.setattr(rx, "estimate_seconds", lambda specs: [120.0] * len(specs))
    rx.print_dry_run(config_of("--smoke", "--data_dir", str(mnist_dir), "--use_cuda", str(use_cuda),
                               "--max_workers", "1"))
    printed = capsys.readouterr().out  # 20 runs x 2 min on 1 worker
    assert f"Estimated wall time 40 min on 1 workers (2 min to 2 min per run {where}); peak memory at most " in printed


def test_dry_run_for_a_dask_cluster_names_it_and_the_time_on_one_worker(mnist_dir, monkeypatch, capsys):
    """The cluster's size is not known before it runs; this machine's CPU count says nothing of it."""
    monkeypatch.setattr(rx, "estimate_seconds", lambda specs: [120.0] * len(specs))
    rx.print_dry_run(config_of("--smoke", "--data_dir", str(mnist_dir), "--executor", "dask", "--dask_scheduler",
                               "tcp://10.0.0.5:8786"))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith("x 2 repeats; the Dask cluster at tcp://10.0.0.5:8786; output_dir=results/smoke")
    assert printed[2] == ("Estimated wall time 40 min on one worker, to divide by the Dask cluster's workers (2 min to "
                          f"2 min per run on 1 thread); peak memory at most {printed[2].split('most ')[1]}")
    assert printed[2].endswith(" MB per worker.")


def test_dry_run_wall_time_is_at_least_the_longest_run(mnist_dir, monkeypatch, capsys):
    monkeypatch.setattr(rx, "estimate_seconds", lambda specs: [30.0] * (len(specs) - 1) + [4 * 3600.0])
    rx.print_dry_run(config_of("--smoke", "--data_dir", str(mnist_dir), "--max_workers", "32"))
    assert "Estimated wall time 4.0 h on 32 workers (30 s to 4.0 h per run" in capsys.readouterr().out


def test_calibrate_splits_training_from_the_rest(mnist_dir):
    rate, other_seconds = rx.calibrate(registry.TrainConfig(data_dir=str(mnist_dir), noise_type="pixel_uniform", p=0.5,
                                                      hidden_sizes=(16,)))
    assert rate > 0 and other_seconds > 0


def test_calibrate_trains_with_cross_entropy_whatever_the_loss(monkeypatch):
    """forward_estimated's first model would otherwise count as per-epoch time (estimate_seconds adds it apart)."""
    trained = []

    def fake_run(cfg):
        trained.append(cfg)
        return {"seconds": 3.0, "train_seconds": 2.0}

    monkeypatch.setattr(rx.nm, "train_and_evaluate", fake_run)
    kind = registry.TrainConfig(loss="forward_estimated", loss_settings=(("estimate_epochs", 5.0),
                                                                         ("percentile", 97.0)), epochs=30)
    assert rx.calibrate(kind) == (8192 / 2.0, 1.0)
    assert {(cfg.loss, cfg.loss_settings, cfg.epochs) for cfg in trained} == {("ce", (), 1)}


def test_dry_run_with_a_numeric_output_dir(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rx, "estimate_seconds", lambda specs: [1.0] * len(specs))
    code, printed, _ = run_main(["--dry-run", "--smoke", "--data_dir", str(mnist_dir), "--output_dir", "2024"])
    assert code == 0 and "output_dir=2024" in printed
    assert list(tmp_path.iterdir()) == []


# ================================================================ a whole campaign on real MNIST


@pytest.fixture(scope="module")
def smoke(mnist, mnist_dir, tmp_path_factory):
    """`--smoke` as a user runs it (20 runs on 2000 samples, 1 epoch), with figures."""
    out = tmp_path_factory.mktemp("smoke") / "results"
    argv = ["--smoke", "--max_workers", "2", "--data_dir", str(mnist_dir), "--output_dir", str(out)]
    code, stdout, stderr = run_main(argv)
    return {"code": code, "out": out, "stdout": stdout, "stderr": stderr, "argv": argv,
            "specs": rx.build_grid(config_of(*argv)), "config": config_of(*argv)}


@pytest.mark.slow
def test_smoke_campaign_end_to_end(smoke):
    assert smoke["code"] == 0, smoke["stdout"] + smoke["stderr"]
    out, specs, config = smoke["out"], smoke["specs"], smoke["config"]
    assert len(specs) == 20  # 2 activations x (the clean run + 4 noise types at p = 0.5) x 2 repeats
    assert sorted(run_files(out)) == sorted(s.run_id for s in specs)

    per_run = rs.read_csv(out / rs.PER_RUN_CSV)
    metrics = list(registry.METRICS)
    assert len(per_run) == 20
    assert sorted(per_run["run_id"]) == sorted(s.run_id for s in specs)
    assert (per_run["status"] == "ok").all() and (per_run["attempts"] == 1).all()
    assert per_run["error"].isna().all()
    assert set(rs.RUN_FIELDS + rs.CONFIG_FIELDS + ["n_params", "estimated_transition"] + metrics) == set(per_run.columns)
    assert sorted(ALWAYS_FINITE + MEMORISATION + SELECTED + NOISY_TEST + TRANSITION_ERROR) == sorted(metrics)
    assert (per_run["max_train_samples"] == 2000).all() and (per_run["epochs"] == 1).all()
    assert per_run["test_accuracy"].between(0.3, 1).all()  # 2000 samples, 1 epoch: clearly learned
    assert np.isfinite(per_run[ALWAYS_FINITE + NOISY_TEST]).all().all()
    assert per_run[SELECTED + TRANSITION_ERROR].isna().all().all()  # no validation split, no estimated T
    pixel = per_run["noise_type"].isin(PIXEL_TYPES)
    # without pixel noise the noisy test images are the clean ones
    assert (per_run.loc[~pixel, "noisy_test_accuracy"] == per_run.loc[~pixel, "test_accuracy"]).all()
    assert per_run.loc[pixel, MEMORISATION].isna().all().all()
    assert np.isfinite(per_run.loc[~pixel, "clean_train_accuracy"]).all()
    corrupted = per_run["noise_type"].isin(LABEL_TYPES)  # all at p = 0.5; the clean runs corrupt nothing
    assert np.isfinite(per_run.loc[corrupted, MEMORISATION]).all().all()
    clean = per_run["noise_type"] == registry.CLEAN
    assert clean.sum() == 4 and (per_run.loc[clean, "p"] == 0).all()
    assert per_run.loc[clean, ["memorised_fraction", "corrupted_true_fraction"]].isna().all().all()
    by_id = {s.run_id: s for s in specs}
    for row in per_run.itertuples():
        spec = by_id[row.run_id]
        assert (row.activation, row.noise_type, row.p, row.repeat, row.seed) == \
            (spec.config.activation, spec.config.noise_type, spec.config.p, spec.repeat, spec.config.seed)

    summary = rs.read_csv(out / rs.SUMMARY_CSV)
    assert len(summary) == 16  # 2 activations x 4 noise types x 2 p: the clean runs are every type's p = 0
    assert (summary["n"] == config["repeats"]).all()
    assert set(zip(summary["activation"], summary["noise_type"], summary["p"])) == \
        {(a, t, p) for a in config["activations"] for t in config["noise_types"] for p in (0.0, 0.5)}

    history = rs.read_csv(out / rs.HISTORY_CSV)
    assert len(history) == 20 * config["epochs"]
    assert set(history["epoch"]) == {1}
    assert set(registry.per_epoch_metrics()) <= set(history.columns)
    reliability = rs.read_csv(out / rs.RELIABILITY_CSV)
    assert len(reliability) == 20 * ECE_BINS
    assert (reliability.groupby("run_id")["count"].sum() == 10_000).all()  # the whole test set
    merged = history.merge(per_run[["run_id", "test_accuracy", "test_loss"]], on="run_id", suffixes=("", "_final"))
    assert np.allclose(merged["test_accuracy"], merged["test_accuracy_final"])
    assert np.allclose(merged["test_loss"], merged["test_loss_final"])

    meta = json.loads((out / rs.CAMPAIGN_JSON).read_text())
    assert meta["counts"] == {"done": 20, "failed": 0, "diverged": 0, "not_identifiable": 0, "pending": 0}
    assert meta["grid_size"] == 20
    machine = meta["machine"]  # what reproducibility depends on
    assert {k: machine[k] for k in ("python", "torch", "numpy", "cpu_count", "cpu_capability")} == {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    assert machine["cpu"] and machine["blas"] and any("MKL" in k or "oneDNN" in k for k in machine["kernels"])
    assert meta["config"] == json.loads(json.dumps(config))
    assert meta["finished_at"] is not None and meta["workers"] == 2
    assert meta["host"] == platform.node()

    figures = sorted((out / "figures").glob("*.png"))
    assert [f.name for f in figures] == sorted(plots.FIGURE_FILES[name] for name in plots.HEADLINE_FIGURES)
    assert all(f.stat().st_size > 0 for f in figures)
    assert "Could not draw the figures" not in smoke["stderr"]


def test_the_report_command_of_the_closing_lines_reads_back_as_typed_from_any_directory(tmp_path, monkeypatch):
    """With the interpreter that ran the campaign, as a user following the README has it: .venv/bin/python."""
    out = tmp_path / "my results"
    monkeypatch.setattr(sys, "executable", str(ROOT / ".venv" / "bin" / "python"))
    monkeypatch.chdir(ROOT)
    assert rx.plots_command(out) == f".venv/bin/python plots.py '{out}' --report"
    monkeypatch.chdir(tmp_path)
    assert shlex.split(rx.plots_command(out)) == [sys.executable, str(ROOT / "plots.py"), str(out), "--report"]


@pytest.mark.slow
def test_smoke_campaign_says_where_everything_is(smoke):
    out, stdout = smoke["out"], smoke["stdout"]
    lines = stdout.splitlines()
    assert lines[0] == f"20 runs in the grid, 0 already done, 20 to run on 2 workers x 1 thread. Results: {out}/"
    assert progress(stdout) == [f"{k}/20" for k in range(1, 21)]
    runs = per_run_lines(stdout)
    assert all(re.fullmatch(r"\[ok\] mlp/(relu|tanh) \w+ p=0\.(00|50) r[01]: "
                            r"acc=0\.\d{4} loss=\d\.\d{4} \(\d+\.\ds\)", line) for line in runs), runs
    assert "20 ok, 0 failed, 0 diverged, 0 pending." in lines
    csv_line = next(line for line in lines if line.startswith("CSVs: "))
    named = re.findall(r"(/\S+?)[,;]?(?= |$)", csv_line)
    assert [Path(p) for p in named] == [out / rs.PER_RUN_CSV, out / rs.SUMMARY_CSV, out / rs.HISTORY_CSV,
                                        out / "figures", out / "campaign.log"]
    assert all(Path(p).exists() for p in named)
    report = next(line for line in lines if line.startswith("Every figure and the report: "))
    assert report == f"Every figure and the report: {rx.plots_command(out)}  (writes {out}/report.html)"
    python, *command = shlex.split(report.split(": ", 1)[1])[:4]
    assert Path(python).resolve() == Path(sys.executable).resolve() and command == ["plots.py", str(out), "--report"]
    assert (ROOT / "analysis.ipynb").is_file() and (ROOT / "plots.py").is_file()

    log = (out / "campaign.log").read_text().splitlines()
    stamps = [line.split(" ", 1)[0] for line in log]
    assert all(datetime.fromisoformat(stamp).tzinfo is not None for stamp in stamps)
    assert [line.split(" ", 1)[1] for line in log][:len(lines)] == lines  # everything said is in the log


@pytest.mark.slow
def test_smoke_summary_matches_pandas_on_the_per_run_csv(smoke):
    assert smoke["code"] == 0
    per_run = rs.read_csv(smoke["out"] / rs.PER_RUN_CSV)
    summary = rs.read_csv(smoke["out"] / rs.SUMMARY_CSV)
    assert check_summary_against_per_run(per_run, summary) == 16
    # one clean run per activation and repeat, the p = 0 point of every noise type
    assert per_run[per_run["p"] == 0].groupby(["activation", "repeat"]).size().tolist() == [1] * 4
    at_zero = summary[summary["p"] == 0].groupby("activation")["test_accuracy_mean"].nunique()
    assert (at_zero == 1).all()


@pytest.mark.slow
def test_smoke_records_match_csv(smoke):
    records = rs.RunStore(smoke["out"]).load()
    per_run = rs.read_csv(smoke["out"] / rs.PER_RUN_CSV).set_index("run_id")
    assert set(records) == set(per_run.index)
    for run_id, record in records.items():
        assert record["attempts"] == 1
        assert len(record["history_test_accuracy"]) == 1
        assert per_run.loc[run_id, "test_accuracy"] == pytest.approx(record["test_accuracy"])
        assert per_run.loc[run_id, "finished_at"] == record["finished_at"]


@pytest.mark.slow
def test_rerun_of_a_finished_campaign_runs_nothing_and_appends_to_its_log(smoke, no_figures):
    assert smoke["code"] == 0
    before = snapshot(smoke["out"])
    log_before = (smoke["out"] / "campaign.log").read_text()
    code, stdout, _ = run_main(smoke["argv"])
    assert code == 0
    assert "20 runs in the grid, 20 already done, 0 to run" in stdout
    assert per_run_lines(stdout) == []
    assert snapshot(smoke["out"]) == before
    log = (smoke["out"] / "campaign.log").read_text()
    assert log.startswith(log_before) and "20 runs in the grid, 20 already done" in log[len(log_before):]


def failing_cell(cfg: registry.TrainConfig) -> bool:
    return cfg.noise_type == "pixel_uniform" and cfg.p == 0.5 and cfg.seed == rx.repeat_seed(0, 1)


def test_a_failing_run_is_recorded_and_the_others_finish(mnist, mnist_dir, tmp_path, fail_runs, no_figures):
    fail_runs(failing_cell, "injected failure for this one cell")  # forked workers inherit the patch
    out = tmp_path / "out"
    argv = tiny_argv(out, mnist_dir)
    code, stdout, stderr = run_main(argv)
    assert code == 1, stdout + stderr
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
    assert "[FAILED] mlp/relu pixel_uniform p=0.50 r1: RuntimeError: injected failure for this one cell" \
        in per_run_lines(stdout)
    assert f"  failed run {bad_id}: [FAILED] mlp/relu pixel_uniform p=0.50 r1" in stdout
    assert "5 ok, 1 failed, 0 diverged, 0 pending." in stdout
    per_run = rs.read_csv(out / rs.PER_RUN_CSV).set_index("run_id")
    assert per_run.loc[bad_id, "status"] == "failed"
    assert "injected failure" in per_run.loc[bad_id, "error"]
    summary = rs.read_csv(out / rs.SUMMARY_CSV)
    n = summary.set_index(["noise_type", "p"])["n"]
    assert n[("pixel_uniform", 0.5)] == 1 and n[("pixel_uniform", 0.0)] == 2
    history = rs.read_csv(out / rs.HISTORY_CSV)
    assert bad_id not in set(history["run_id"]) and len(history) == 5
    meta = json.loads((out / rs.CAMPAIGN_JSON).read_text())
    assert meta["counts"] == {"done": 5, "failed": 1, "diverged": 0, "not_identifiable": 0, "pending": 0}
    assert no_figures == [out]  # drawn from what there is


METRIC_KEYS = ["test_accuracy", "test_loss", "test_macro_precision", "test_macro_recall", "test_macro_roc_auc",
               "train_loss", "n_params", "history_test_loss", "history_test_accuracy", "seed", "p",
               "test_ece", "test_mean_confidence", "history_test_ece", "reliability"]


def test_same_campaign_twice_gives_identical_metrics(mnist, mnist_dir, tmp_path, no_figures):
    # the second time with one worker: scheduling must not matter either
    first, second = tmp_path / "a", tmp_path / "b"
    assert run_main(tiny_argv(first, mnist_dir))[0] == 0
    assert run_main(tiny_argv(second, mnist_dir, "--max_workers", "1"))[0] == 0
    a, b = rs.RunStore(first).load(), rs.RunStore(second).load()
    assert len(a) == TINY_RUNS and set(a) == set(b)
    for run_id in a:
        keys = METRIC_KEYS + [k for k in [*registry.METRICS, *(f"history_{m}" for m in registry.per_epoch_metrics())]
                              if k in a[run_id] and k not in ("seconds", "train_seconds")]
        assert {"memorised_fraction", "noisy_test_accuracy"} & set(keys)  # the type-specific ones too
        assert same({k: a[run_id][k] for k in keys}, {k: b[run_id][k] for k in keys}), run_id
    # and the noise matters: p = 0.5 is not the same as p = 0
    accuracies = {(r["noise_type"], r["p"], r["repeat"]): r["test_accuracy"] for r in a.values()}
    assert accuracies[("label_flip", 0.5, 0)] != accuracies[("none", 0.0, 0)]


def test_multithreaded_workers_start_after_the_caller_ran_threaded_torch(mnist_dir, tmp_path):
    """A worker forked from a process that already ran OpenMP threads hangs on its first
    multi-threaded op; workers of several threads must start anyway (as from a notebook)."""
    argv = tiny_argv(tmp_path, mnist_dir, "--cpu_threads_per_worker", "2", "--max_workers", "1", "--repeats", "1")
    code = (
        "import sys, torch, plots, run_experiments as rx\n"
        "plots.write_figures = lambda *args, **kwargs: []  # (figures: not the point, and seconds)\n"
        "torch.set_num_threads(2)\n"
        "torch.ones(4_000_000).mul(2.0).sum()  # starts this process's OpenMP threads\n"
        f"sys.exit(rx.main({argv!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    records = rs.RunStore(tmp_path).load()
    assert len(records) == TINY_RUNS // 2 and {r["status"] for r in records.values()} == {"ok"}
    assert {r["cpu_threads"] for r in records.values()} == {2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_campaign_on_cuda(mnist_dir, tmp_path, no_figures):
    argv = tiny_argv(tmp_path, mnist_dir, "--use_cuda", "true", "--max_workers", "1")
    assert run_main(argv)[0] == 0
    records = rs.RunStore(tmp_path).load()
    assert len(records) == TINY_RUNS and {r["status"] for r in records.values()} == {"ok"}, records
    assert {r["use_cuda"] for r in records.values()} == {True}


@pytest.mark.slow
def test_label_matrix_campaign_end_to_end(mnist, mnist_dir, tmp_path):
    """Two real runs (ce / forward) of label_matrix with the matrix from a file, figures included."""
    path = write_json(tmp_path, "next.json", HALF_NEXT)
    out = tmp_path / "out"
    argv = ["--activations", "relu", "--noise_types", "label_matrix", "--noise_matrix", path,
            "--losses", "ce,forward", "--ps", "0.6", "--extra_label_ps", "", "--repeats", "1",
            "--epochs", "1", "--max_train_samples", "500", "--hidden_sizes", "16", "--max_workers", "1",
            "--data_dir", str(mnist_dir), "--output_dir", str(out)]
    code, stdout, stderr = run_main(argv)
    assert code == 0, stdout + stderr
    assert " loss=forward p=0.60" in stdout
    records = rs.RunStore(out).load()
    specs = rx.build_grid(config_of(*argv))
    assert set(records) == {s.run_id for s in specs} and len(records) == 2
    assert {r["loss"] for r in records.values()} == {"ce", "forward"}
    for record in records.values():
        assert record["status"] == "ok"
        assert json.loads(record["noise_matrix"]) == HALF_NEXT  # stored as JSON
        assert 0 <= record["memorised_fraction"] <= 1
    per_run = rs.read_csv(out / rs.PER_RUN_CSV)
    assert sorted(per_run["loss"]) == ["ce", "forward"]
    summary = rs.read_csv(out / rs.SUMMARY_CSV)
    assert len(summary) == 2 and (summary["n"] == 1).all()  # losses are never pooled
    assert len(rs.read_csv(out / rs.RELIABILITY_CSV)) == 2 * ECE_BINS
    assert list((out / "figures").glob("*.png")) and "Could not draw the figures" not in stderr


# ================================================================ CSVs refreshed during a campaign


@pytest.fixture
def csv_writes(monkeypatch, tmp_path):
    """Each write of the CSVs: (records written, runs a reader of the CSVs sees right after)."""
    writes = []
    real = rs.write_csvs

    def write_and_read_back(records, output_dir, target=None):
        paths = real(records, output_dir, target)
        writes.append((len(records), len(rs.read_results(output_dir).runs)))
        return paths

    monkeypatch.setattr(rs, "write_csvs", write_and_read_back)
    return writes


def test_csvs_are_refreshed_during_the_campaign(mnist, mnist_dir, tmp_path, monkeypatch, csv_writes, no_figures):
    monkeypatch.setattr(rx, "CSV_REFRESH_SECONDS", -1)  # due after every run, however long a write takes
    monkeypatch.setattr(rx, "CSV_REFRESH_SHARE", math.inf)
    code, _, _ = run_main(tiny_argv(tmp_path / "out", mnist_dir))
    assert code == 0
    assert csv_writes == [(k, k) for k in range(1, TINY_RUNS + 1)] + [(TINY_RUNS, TINY_RUNS)]  # and once at the end


def test_csvs_are_refreshed_at_most_every_csv_refresh_seconds(mnist, mnist_dir, tmp_path, monkeypatch, csv_writes,
                                                             no_figures):
    monkeypatch.setattr(rx, "CSV_REFRESH_SECONDS", 3600)
    code, _, _ = run_main(tiny_argv(tmp_path / "out", mnist_dir))
    assert code == 0
    assert csv_writes == [(1, 1), (TINY_RUNS, TINY_RUNS)]  # after the first run (a report can follow at once), then at the end


# ================================================================ resuming


@pytest.fixture
def tiny_campaign(mnist, mnist_dir, tmp_path, no_figures):
    out = tmp_path / "results"
    argv = tiny_argv(out, mnist_dir)
    code, stdout, stderr = run_main(argv)
    assert code == 0, stdout + stderr
    assert len(run_files(out)) == TINY_RUNS
    return out, argv


def test_extending_the_grid_runs_only_the_new_runs(tiny_campaign):
    out, argv = tiny_campaign
    before = snapshot(out)

    code, stdout, _ = run_main([*argv, "--ps", "0,0.5,0.8"])
    assert code == 0, stdout
    assert "10 runs in the grid, 6 already done, 4 to run" in stdout
    assert progress(stdout) == ["1/4", "2/4", "3/4", "4/4"]
    assert all("p=0.80" in line for line in per_run_lines(stdout))
    middle = snapshot(out)
    assert {k: middle[k] for k in before} == before
    assert {r["p"] for k, r in rs.RunStore(out).load().items() if k not in before} == {0.8}

    code, stdout, _ = run_main([*argv, "--ps", "0,0.5,0.8", "--repeats", "3"])
    assert code == 0, stdout
    assert "15 runs in the grid, 10 already done, 5 to run" in stdout
    after = snapshot(out)
    assert {k: after[k] for k in middle} == middle
    assert {r["repeat"] for k, r in rs.RunStore(out).load().items() if k not in middle} == {2}
    assert len(rs.read_csv(out / rs.PER_RUN_CSV)) == 15
    summary = rs.read_csv(out / rs.SUMMARY_CSV)
    assert len(summary) == 6 and (summary["n"] == 3).all()

    # shrinking the grid back runs nothing; the stored extra runs stay in the CSVs
    code, stdout, _ = run_main(argv)
    assert code == 0 and "6 runs in the grid, 6 already done, 0 to run" in stdout
    assert snapshot(out) == after
    assert len(rs.read_csv(out / rs.PER_RUN_CSV)) == 15


def bad_cell(cfg: registry.TrainConfig) -> bool:
    return cfg.noise_type == "label_flip" and cfg.p == 0.5 and cfg.seed == rx.repeat_seed(0, 0)


@pytest.fixture
def broken_cell(fail_runs):
    """train_and_evaluate raises for one grid cell; calling the fixture's value "fixes the bug"."""
    return fail_runs(bad_cell)


def test_failed_runs_are_retried_until_max_attempts(mnist, mnist_dir, tmp_path, broken_cell, no_figures):
    out = tmp_path / "results"
    argv = tiny_argv(out, mnist_dir, "--max_attempts", "2")
    bad_id = next(s.run_id for s in rx.build_grid(config_of(*argv)) if bad_cell(s.config))

    code, stdout, _ = run_main(argv)
    assert code == 1 and f"failed run {bad_id}" in stdout
    assert "6 runs in the grid, 0 already done, 6 to run" in stdout
    record = rs.RunStore(out).load()[bad_id]
    assert (record["status"], record["attempts"], record["error"]) == ("failed", 1, "RuntimeError: injected failure")
    others = {k: v for k, v in snapshot(out).items() if k != bad_id}

    code, stdout, _ = run_main(argv)  # attempt 2 of 2
    assert code == 1 and f"failed run {bad_id}" in stdout
    assert "6 runs in the grid, 5 already done, 1 to run" in stdout
    assert progress(stdout) == ["1/1"]
    assert rs.RunStore(out).load()[bad_id]["attempts"] == 2
    assert {k: v for k, v in snapshot(out).items() if k != bad_id} == others
    stamp = snapshot(out)[bad_id]

    code, stdout, _ = run_main(argv)  # no tries left: reported, not retried
    assert code == 1 and f"failed run {bad_id}" in stdout and "injected failure" in stdout
    assert "6 runs in the grid, 5 already done, 1 not to rerun (failed for good, diverged or not identifiable), 0 to run" in stdout
    assert snapshot(out)[bad_id] == stamp
    per_run = rs.read_csv(out / rs.PER_RUN_CSV).set_index("run_id")
    assert per_run.loc[bad_id, "status"] == "failed" and per_run.loc[bad_id, "attempts"] == 2

    broken_cell()  # the cause is fixed; allow one more try
    code, stdout, _ = run_main([*argv, "--max_attempts", "3"])
    assert code == 0, stdout
    assert "1 to run" in stdout
    record = rs.RunStore(out).load()[bad_id]
    assert record["status"] == "ok" and record["attempts"] == 3 and record["error"] == ""
    assert "traceback" not in record


def test_failed_runs_are_not_retried_when_retry_failed_is_off(mnist, mnist_dir, tmp_path, broken_cell, no_figures):
    out = tmp_path / "results"
    argv = tiny_argv(out, mnist_dir, "--retry_failed", "false")
    code, _, _ = run_main(argv)
    assert code == 1
    stamps = snapshot(out)
    broken_cell()
    code, stdout, _ = run_main(argv)
    assert code == 1 and "6 runs in the grid, 5 already done, 1 not to rerun (failed for good, diverged or not identifiable), 0 to run" in stdout
    assert snapshot(out) == stamps
    code, stdout, _ = run_main(tiny_argv(out, mnist_dir))  # retry_failed back on
    assert code == 0 and "1 to run" in stdout


def test_diverged_runs_are_recorded_and_not_rerun(mnist, mnist_dir, tmp_path, no_figures):
    """A run whose training loss becomes NaN is `diverged`: deterministic, so never retried."""
    out = tmp_path / "results"
    argv = tiny_argv(out, mnist_dir, "--noise_types", "label_flip", "--ps", "0,0.5", "--optimizer", "sgd",
                     "--learning_rate", "1e12")
    code, stdout, stderr = run_main(argv)
    assert code == 1, stdout + stderr
    records = rs.RunStore(out).load()
    assert len(records) == 4
    for run_id, record in records.items():
        assert record["status"] == "diverged" and record["attempts"] == 1
        assert record["diverged_epoch"] == 1 and record["diverged_step"] >= 1
        assert f"training loss became nan at step {record['diverged_step']} of epoch 1" == record["error"]
    closing = [line.split(": ")[1] for line in stdout.splitlines() if line.startswith("  diverged run ")]
    assert closing == [f"[DIVERGED] mlp/relu {point} r{r}" for point in ("label_flip p=0.50", "none p=0.00")
                       for r in (0, 1)]  # in the order of their names
    assert len(per_run_lines(stdout)) == 4 and all(line.startswith("[DIVERGED] ") for line in per_run_lines(stdout))
    assert "0 ok, 0 failed, 4 diverged, 0 pending." in stdout
    per_run = rs.read_csv(out / rs.PER_RUN_CSV)
    assert (per_run["status"] == "diverged").all() and len(rs.read_csv(out / rs.SUMMARY_CSV)) == 0
    assert json.loads((out / rs.CAMPAIGN_JSON).read_text())["counts"] == \
        {"done": 0, "failed": 0, "diverged": 4, "not_identifiable": 0, "pending": 0}
    stamps = snapshot(out)
    code, stdout, _ = run_main([*argv, "--max_attempts", "5"])
    assert code == 1
    assert "4 runs in the grid, 0 already done, 4 not to rerun (failed for good, diverged or not identifiable), 0 to run" in stdout
    assert snapshot(out) == stamps


def test_forward_correction_with_a_singular_transition_matrix_is_not_run(mnist, mnist_dir, tmp_path, no_figures):
    """label_flip at p = 0.9 makes T singular: its forward-corrected runs are recorded as
    not_identifiable without training, never summarised, never rerun; the others train."""
    out = tmp_path / "results"
    argv = tiny_argv(out, mnist_dir, "--noise_types", "label_flip", "--ps", "0.5,0.9", "--losses", "ce,forward")
    code, stdout, stderr = run_main(argv + ["--dry-run"])  # named before anything runs
    note = ("note: forward correction is not identifiable at label_flip p=0.9 (T singular or condition number above "
            "10000); those runs are recorded as not_identifiable and not trained.")
    assert code == 0 and note in stdout.splitlines(), stdout + stderr
    code, stdout, stderr = run_main(argv)
    assert code == 0, stdout + stderr
    lines = stdout.splitlines()
    assert lines.index(note) < next(i for i, line in enumerate(lines) if line.startswith("[1/"))
    records = rs.RunStore(out).load().values()
    skipped = [r for r in records if r["status"] == "not_identifiable"]
    assert len(skipped) == 2 and all(r["loss"] == "forward" and r["p"] == 0.9 for r in skipped)
    assert all("seconds" not in r and "condition number" in r["error"] for r in skipped)
    assert sum(r["status"] == "ok" for r in records) == 6
    assert "6 ok, 0 failed, 0 diverged, 0 pending. 2 not run: forward correction with a singular T." in stdout
    summary = rs.read_csv(out / rs.SUMMARY_CSV)
    assert len(summary) == 3 and not ((summary["p"] == 0.9) & (summary["loss"] == "forward")).any()
    code, stdout, _ = run_main(argv)
    assert code == 0 and "0 to run" in stdout


def test_storage_error_stops_the_campaign_keeping_what_is_stored(mnist, mnist_dir, tmp_path, monkeypatch,
                                                                 no_figures):
    out = tmp_path / "results"
    real_save = rs.RunStore.save
    saved = []

    def save_until_the_disk_is_full(self, record):
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / "x.json"))
        real_save(self, record)
        saved.append(record["run_id"])

    monkeypatch.setattr(rs.RunStore, "save", save_until_the_disk_is_full)
    argv = tiny_argv(out, mnist_dir)
    code, stdout, stderr = run_main(argv)
    assert code == 1
    assert (f"error: could not write {out / 'runs' / 'x.json'}: No space left on device. The campaign stopped; "
            "every run finished before this is stored.") in stderr
    assert "run the same command again to resume" in stderr
    assert sorted(run_files(out)) == sorted(saved)
    monkeypatch.setattr(rs.RunStore, "save", real_save)  # space freed
    code, stdout, _ = run_main(argv)
    assert code == 0 and "6 runs in the grid, 2 already done, 4 to run" in stdout
    assert len(rs.RunStore(out).load()) == TINY_RUNS


def test_a_second_campaign_in_the_same_output_dir_is_refused(mnist, mnist_dir, tmp_path, no_figures):
    out = tmp_path / "results"
    out.mkdir()
    running = rx.lock_output_dir(out)  # what a running campaign holds
    try:
        code, stdout, stderr = run_main(tiny_argv(out, mnist_dir))
        assert code == 2, stdout + stderr
        assert f"error: another campaign (PID {os.getpid()} on {platform.node()}) is running in {out}/" in stderr
        assert not (out / "runs").exists() and stdout == ""
        code, stdout, stderr = run_main([*tiny_argv(out, mnist_dir), "--fresh"])  # nor moved aside
        assert code == 2 and "error: another campaign" in stderr and stdout == ""
        assert out.is_dir() and [path.name for path in tmp_path.iterdir()] == ["results"]
    finally:
        running.close()
    code, stdout, _ = run_main(tiny_argv(out, mnist_dir))  # once it has finished
    assert code == 0 and len(run_files(out)) == TINY_RUNS


def test_the_lock_of_a_dead_campaign_is_taken_over(mnist, mnist_dir, tmp_path, no_figures):
    """A lock file left by a campaign that died (nobody holds the lock any more) does not stop the next."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "campaign.lock").write_text("PID 999999 on a-host-that-died")
    code, stdout, stderr = run_main(tiny_argv(out, mnist_dir))
    assert code == 0, stdout + stderr
    assert len(run_files(out)) == TINY_RUNS
    assert (out / "campaign.lock").read_text() == f"PID {os.getpid()} on {platform.node()}"


# ================================================================ --check


def test_check_fits_100_examples_per_training_setup(mnist, mnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run_main(["--check", "--smoke", "--model_types", "mlp,cnn", "--data_dir", str(mnist_dir)])
    assert code == 0, stdout
    assert stdout.startswith("Checking that each of the 4 training set-ups can fit 100 clean training examples...")
    lines = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 4 and all(line.startswith("[ok] dataset=mnist, model_type=") for line in lines)
    assert sum("model_type=mlp, activation=relu, hidden_sizes=256-128, optimizer=adam" in line for line in lines) == 1
    assert sum("model_type=cnn, activation=tanh, optimizer=adam" in line for line in lines) == 1  # a CNN has no widths
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_check_names_the_setups_that_cannot_learn(mnist, mnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run_main(["--check", "--smoke", "--activations", "relu", "--learning_rate", "1e-9",
                                "--data_dir", str(mnist_dir)])
    assert code == 1
    assert re.search(r"^\[FAILS\] dataset=mnist, model_type=mlp, activation=relu, hidden_sizes=256-128, "
                     r"optimizer=adam, learning_rate=1e-09, .*: training accuracy 0\.\d\d", stdout, re.MULTILINE)
    assert "1 set-up(s) cannot fit 100 examples" in stdout and "learning_rate" in stdout
    assert list(tmp_path.iterdir()) == []


# ================================================================ --fresh


def test_fresh_moves_old_results_aside_and_runs_everything(tiny_campaign):
    out, argv = tiny_campaign
    old_files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert Path("runs") in {p.parent for p in old_files} and Path("campaign.log") in old_files

    code, stdout, _ = run_main([*argv, "--fresh"])
    assert code == 0, stdout
    moved_lines = [line for line in stdout.splitlines() if line.startswith("Moved the previous results to ")]
    assert len(moved_lines) == 1
    moved = Path(moved_lines[0].removeprefix("Moved the previous results to ").strip())
    assert moved.is_dir() and moved.parent == out.parent and moved.name.startswith(out.name + ".old-")
    assert {p.relative_to(moved): p.read_bytes() for p in moved.rglob("*") if p.is_file()} == old_files
    assert "6 runs in the grid, 0 already done, 6 to run" in stdout
    assert len(per_run_lines(stdout)) == TINY_RUNS
    new = rs.RunStore(out).load()
    assert len(new) == TINY_RUNS
    assert {k: v["test_accuracy"] for k, v in new.items()} == \
        {k: v["test_accuracy"] for k, v in rs.RunStore(moved).load().items()}
    log = (out / "campaign.log").read_text()
    assert log.count("runs in the grid") == 1  # a log of its own


def test_fresh_on_an_empty_or_missing_dir_moves_nothing(mnist, mnist_dir, tmp_path, no_figures):
    out = tmp_path / "results"
    code, stdout, _ = run_main(tiny_argv(out, mnist_dir, "--fresh", "--ps", "0"))
    assert code == 0 and "Moved" not in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert rx.move_aside(empty) is None and empty.is_dir()


def test_fresh_twice_within_one_second_keeps_both_old_results(tmp_path, monkeypatch):
    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2024, 5, 6, 7, 8, 9, tzinfo=tz)

    monkeypatch.setattr(rx, "datetime", FrozenClock)
    out = tmp_path / "results"
    moved = []
    for generation in ("first", "second", "third"):
        (out / "runs").mkdir(parents=True)
        (out / "runs" / f"{generation}.json").write_text(generation)
        moved.append(rx.move_aside(out))
        assert not out.exists()
    assert len(set(moved)) == 3
    assert [next((m / "runs").iterdir()).read_text() for m in moved] == ["first", "second", "third"]
