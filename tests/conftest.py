"""Shared fixtures and helpers. The tests read real MNIST from NOISE_DATA_DIR (default: the
shared copy beside the checkout).

Test modules import the helpers with `from conftest import ...` (fixtures need no import), never
from one another. Project modules and the heavier libraries are imported inside the helpers that
use them, so that loading this file stays cheap."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import sys
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MNIST_DIR = Path(os.environ.get("NOISE_DATA_DIR", ROOT.parent / "shared" / "data" / "mnist"))


# ================================================================ real MNIST


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder of the four real MNIST files (fails the test when they are missing)."""
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"real MNIST not found in {MNIST_DIR}; set NOISE_DATA_DIR to the folder of the four files")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    """MNIST decoded once for the whole session."""
    import nnet_models as nm

    return nm.load_dataset("mnist", mnist_dir)


# ================================================================ running campaigns


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """run_experiments.main(argv) in this process (pool workers fork from it): exit code, stdout, stderr."""
    import run_experiments as rx

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = rx.main(argv)
    return code, out.getvalue(), err.getvalue()


TINY_RUNS = 6  # the runs of tiny_argv's grid


def tiny_argv(output_dir, data_dir, *extra: str) -> list[str]:
    """TINY_RUNS runs (relu x {the clean run at p = 0, label_flip at 0.5, pixel_uniform at 0.5} x 2 repeats),
    500 samples, 1 epoch."""
    return ["--activations", "relu", "--noise_types", "label_flip,pixel_uniform", "--ps", "0,0.5",
            "--extra_label_ps", "", "--repeats", "2", "--epochs", "1", "--max_train_samples", "500",
            "--hidden_sizes", "16", "--max_workers", "2",
            "--data_dir", str(data_dir), "--output_dir", str(output_dir), *extra]


@pytest.fixture
def no_figures(monkeypatch):
    """Campaigns skip drawing figures (seconds each; tested by the end-to-end tests and test_plots)."""
    import plots

    drawn = []
    monkeypatch.setattr(plots, "write_figures", lambda output_dir, *_, **__: drawn.append(Path(output_dir)) or [])
    return drawn


@pytest.fixture
def fail_runs(monkeypatch):
    """install(predicate, message): make nnet_models.train_and_evaluate raise for the configs that
    `predicate` picks (forked pool workers inherit the patch); returns a function undoing it."""
    import nnet_models as nm

    real = nm.train_and_evaluate

    def install(predicate, message="injected failure"):
        def sometimes_fails(cfg, data=None):
            if predicate(cfg):
                raise RuntimeError(message)
            return real(cfg, data)

        monkeypatch.setattr(nm, "train_and_evaluate", sometimes_fails)
        return lambda: monkeypatch.setattr(nm, "train_and_evaluate", real)

    return install


# ================================================================ what a campaign leaves behind

# The line a campaign prints for each finished run: "[k/N, ETA ...] what it says about the run".
PER_RUN_LINE = re.compile(r"\[(\d+)/(\d+), ETA [^\]]+\] (.*)")


def per_run_lines(stdout: str) -> list[str]:
    """The line said about each finished run, less its "[k/N, ETA ...] " prefix."""
    return [match[3] for line in stdout.splitlines() if (match := PER_RUN_LINE.fullmatch(line))]


def run_files(output_dir: Path) -> dict[str, Path]:
    """The stored run records of a campaign, by run id."""
    return {p.stem: p for p in (Path(output_dir) / "runs").glob("*.json")}


def snapshot(out: Path) -> dict[str, tuple[int, str]]:
    """run_id -> (mtime_ns, finished_at) of every stored record."""
    return {run_id: (path.stat().st_mtime_ns, json.loads(path.read_text())["finished_at"])
            for run_id, path in run_files(out).items()}


def same(a, b) -> bool:
    """Equality of stored values, where NaN equals NaN (empty reliability bins)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


# ================================================================ summary statistics, recomputed


def expected_stats(values: pd.Series, fraction: bool = False) -> dict:
    """mean, std (ddof=1), stderr and the t-based 95% CI of the non-missing values (of a fraction:
    clipped to [0, 1])."""
    from scipy import stats

    values = values.astype(float).dropna()  # a metric a run does not have (NaN) is not counted
    n = len(values)
    mean = values.mean()
    if n < 2:
        return {"mean": mean, "std": math.nan, "stderr": math.nan, "ci95_low": math.nan, "ci95_high": math.nan}
    std = values.std(ddof=1)
    stderr = std / math.sqrt(n)
    half = stats.t.ppf(0.975, n - 1) * stderr  # (a constant metric: a CI of width 0 at the mean)
    low, high = (max(mean - half, 0.0), min(mean + half, 1.0)) if fraction else (mean - half, mean + half)
    return {"mean": mean, "std": std, "stderr": stderr, "ci95_low": low, "ci95_high": high}


def with_clean_copies(ok: pd.DataFrame) -> pd.DataFrame:
    """The noisy runs, and each clean run (noise type "none") once as the p = 0 run of every noise type run with
    the same other settings (kept as "none" where there is none)."""
    import pandas as pd

    import results_store as rs

    def key(row) -> tuple:
        return tuple(str(row[f]) for f in rs.PAIR_FIELDS)
    noisy = ok[ok["noise_type"] != "none"]
    types: dict[tuple, list] = {}
    for _, row in noisy.iterrows():
        if (row["noise_type"], row["noise_matrix"]) not in types.setdefault(key(row), []):
            types[key(row)].append((row["noise_type"], row["noise_matrix"]))
    copies = [{**row.to_dict(), "noise_type": noise_type, "noise_matrix": matrix}
              for _, row in ok[ok["noise_type"] == "none"].iterrows()
              for noise_type, matrix in types.get(key(row), [("none", row["noise_matrix"])])]
    return pd.concat([noisy, pd.DataFrame(copies, columns=ok.columns)], ignore_index=True)


def check_summary_against_per_run(per_run: pd.DataFrame, summary: pd.DataFrame) -> int:
    """Recompute every summary statistic with pandas/scipy from the per-run table, each clean run counted at p = 0
    of every noise type; returns the number of experiments (groups)."""
    import pandas as pd

    import registry
    import results_store as rs

    ok = per_run[per_run["status"] == "ok"].copy()
    summary = summary.copy()
    for table in (ok, summary):  # all samples (empty) and no noise matrix (empty) are groups too
        table["max_train_samples"] = pd.to_numeric(table["max_train_samples"]).astype("Float64").fillna(-1).astype(float)
        table["noise_matrix"] = table["noise_matrix"].astype(object).where(table["noise_matrix"].notna(), "")
        table["loss_settings"] = table["loss_settings"].astype(object).where(table["loss_settings"].notna(), "")
    groups = with_clean_copies(ok).groupby(rs.GROUP_FIELDS, sort=True)
    assert len(summary) == groups.ngroups
    assert not summary.duplicated(rs.GROUP_FIELDS).any()  # one row per experiment
    summary = summary.set_index(rs.GROUP_FIELDS)
    for key, runs in groups:
        row = summary.loc[key]
        assert row["n"] == len(runs)
        for metric in registry.METRICS:
            fraction = metric not in registry.unbounded_metrics()
            for stat, value in expected_stats(runs[metric], fraction=fraction).items():
                got = row[f"{metric}_{stat}"]
                if math.isnan(value):
                    assert math.isnan(got), (key, metric, stat)
                else:
                    assert got == pytest.approx(value, rel=1e-9, abs=1e-12), (key, metric, stat)
    return groups.ngroups


# ================================================================ synthetic campaigns (plots, notebook)

EPOCHS = 3
SEEDS = (11, 22, 33)
LABEL_PS = (0.0, 0.5, 0.9, 1.0)
PIXEL_PS = (0.0, 0.5, 0.9)


def record(seed: int, activation="relu", noise_type="label_uniform", p=0.0, **config) -> dict:
    """One finished run with random metrics: every experiment's values differ, so a line that
    mixed two experiments would match neither."""
    import numpy as np

    import registry
    import results_store as rs

    cfg = registry.TrainConfig(activation=activation, noise_type=noise_type, p=p, seed=seed, epochs=EPOCHS, **config)
    fields = {name: rs.csv_value(value) for name, value in dataclasses.asdict(cfg).items()}
    rng = np.random.default_rng(zlib.crc32(repr(sorted(fields.items())).encode()))
    metrics = {m: float(rng.uniform(0.1, 0.9)) for m in registry.METRICS}
    kind = registry.NOISE_TYPES[noise_type].kind
    corrupted = kind == "label" and p > 0
    for m in ("memorised_fraction", "corrupted_true_fraction"):
        metrics[m] = metrics[m] if corrupted else float("nan")
    if not cfg.validation_fraction:
        metrics.update(selected_epoch=np.nan, selected_test_accuracy=np.nan, selected_test_loss=np.nan)
    if kind != "pixel":  # the noisy test images are the clean ones
        metrics.update(noisy_test_accuracy=metrics["test_accuracy"], noisy_test_loss=metrics["test_loss"])
    if cfg.loss != "forward_estimated":
        metrics.update(transition_error_mean=np.nan, transition_error_max=np.nan)
    undefined = {m for m, value in metrics.items() if np.isnan(value)}
    history = {f"history_{m}": [np.nan if m in undefined else float(v) for v in rng.uniform(0.1, 0.9, EPOCHS)]
               for m in registry.per_epoch_metrics()}
    counts = rng.integers(0, 50, rs.ECE_BINS).astype(float)
    reliability = {"count": counts.tolist(), "confidence": ((np.arange(rs.ECE_BINS) + 0.5) / rs.ECE_BINS).tolist(),
                   "accuracy": rng.uniform(0, 1, rs.ECE_BINS).tolist()}
    return {"run_id": f"{zlib.crc32(repr(sorted(fields.items())).encode()):08x}", "repeat": SEEDS.index(seed),
            "status": "ok", "error": None, "attempts": 1, "finished_at": "2024-01-01T00:00:00", **fields,
            "n_params": 1000, **metrics, **history, "reliability": reliability}


def grid_records(activations=("relu", "tanh"), noise_types=("label_uniform", "label_flip", "pixel_uniform"),
                 seeds=SEEDS, **config) -> list[dict]:
    """record() of every activation x seed: the clean run (noise type "none", p = 0), shared by every noise type
    as campaigns run it, and every noise type at each p > 0 of LABEL_PS or PIXEL_PS."""
    import registry

    clean = [record(seed, a, "none", 0.0, **config) for a in activations for seed in seeds]
    return clean + [record(seed, a, t, p, **config) for a in activations for t in noise_types
                    for p in (PIXEL_PS if registry.NOISE_TYPES[t].kind == "pixel" else LABEL_PS) if p > 0
                    for seed in seeds]


def campaign(directory: Path, records: list[dict]) -> Path:
    """A campaign folder holding the CSVs of `records` (written by results_store); returns it."""
    import results_store as rs

    directory.mkdir(parents=True, exist_ok=True)
    rs.write_csvs(records, directory)
    return directory
