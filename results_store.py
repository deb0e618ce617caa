"""Persistence of finished runs and the CSVs derived from them.

Every finished run (ok or failed) is one JSON file `runs/<run_id>.json`, written to a
temporary name, fsynced and renamed, so a reader never sees a torn record, whatever kills
the campaign. The three CSVs are derived from that store and can be regenerated any time.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import pandas as pd
from scipy.special import stdtrit  # the t quantile; scipy.stats costs ~0.5 s and ~50 MiB to import

# Config fields that define an experiment; runs that differ in any of them are never pooled.
GROUP_FIELDS = [
    "dataset", "model_type", "activation", "hidden_sizes", "noise_type", "p", "epochs",
    "batch_size", "optimizer", "learning_rate", "weight_decay", "normalize",
    "max_train_samples", "use_cuda", "noise_matrix", "loss_correction", "validation_fraction",
    "precision",
]
# Fields added after the first results were stored: records without them had the default.
FIELD_DEFAULTS = {"noise_matrix": None, "loss_correction": "none", "validation_fraction": 0.0,
                  "precision": "float32"}
RUN_FIELDS = ["run_id", "repeat", "status", "error", "attempts", "finished_at"]
CONFIG_FIELDS = GROUP_FIELDS + ["seed", "cpu_threads", "data_dir"]
METRICS = [
    "test_accuracy", "test_loss", "test_macro_precision", "test_macro_recall",
    "test_macro_roc_auc", "test_ece", "test_mean_confidence", "train_loss",
    "memorised_fraction", "corrupted_true_fraction", "clean_train_accuracy",
    "selected_epoch", "selected_test_accuracy", "selected_test_loss",
    "noisy_test_accuracy", "noisy_test_loss", "seconds", "train_seconds",
]
HISTORY_METRICS = [
    "test_loss", "test_accuracy", "test_ece", "test_mean_confidence", "memorised_fraction",
    "corrupted_true_fraction", "clean_train_accuracy", "validation_loss",
]
RELIABILITY_FIELDS = ["count", "confidence", "accuracy"]
REQUIRED_KEYS = {"run_id", "repeat", "status", *(set(GROUP_FIELDS) - set(FIELD_DEFAULTS))}


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class RunStore:
    """One JSON record per finished run under `output_dir/runs/`."""

    def __init__(self, output_dir: str | Path):
        self.directory = Path(output_dir) / "runs"

    def save(self, record: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.directory / f"{record['run_id']}.json", json.dumps(record))

    def load(self) -> dict[str, dict]:
        """All readable records by run id; unreadable or incomplete ones are skipped with a warning
        (their runs count as not done, so the next campaign redoes them)."""
        records = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                missing = REQUIRED_KEYS - set(record)
                if missing:
                    raise ValueError(f"missing fields {sorted(missing)}")
            except (ValueError, OSError) as exc:
                warnings.warn(f"skipping unreadable run record {path}: {exc}; the run will be redone")
                continue
            records[record["run_id"]] = record
        return records


# ---------------------------------------------------------------- derived tables

# What identifies a run in the long-form tables (history, reliability).
RUN_KEYS = ["run_id", "repeat", "dataset", "model_type", "activation", "noise_type", "p", "loss_correction"]


def per_run_table(records: list[dict]) -> pd.DataFrame:
    """One row per run: run bookkeeping, config fields, final metrics (history left out)."""
    columns = RUN_FIELDS + CONFIG_FIELDS + ["n_params"] + METRICS
    table = pd.DataFrame(records).reindex(columns=columns)
    table["max_train_samples"] = table["max_train_samples"].astype("Int64")  # empty = all samples
    return table.sort_values(GROUP_FIELDS[:6] + ["repeat"], kind="stable", ignore_index=True)


def history_table(records: list[dict]) -> pd.DataFrame:
    """Per-epoch clean-test metrics in long form: one row per (run, epoch)."""
    rows = [
        {**{k: record[k] for k in RUN_KEYS}, "epoch": epoch + 1,
         **{m: record[f"history_{m}"][epoch] for m in HISTORY_METRICS if f"history_{m}" in record}}
        for record in records if record["status"] == "ok"
        for epoch in range(len(record["history_test_loss"]))
    ]
    return pd.DataFrame(rows, columns=RUN_KEYS + ["epoch"] + HISTORY_METRICS)


def reliability_table(records: list[dict]) -> pd.DataFrame:
    """Reliability-diagram bins of every run's final model on the clean test set, long form."""
    rows = [
        {**{k: record[k] for k in RUN_KEYS}, "bin": b, **{f: record["reliability"][f][b] for f in RELIABILITY_FIELDS}}
        for record in records if record["status"] == "ok" and "reliability" in record
        for b in range(len(record["reliability"]["count"]))
    ]
    return pd.DataFrame(rows, columns=RUN_KEYS + ["bin"] + RELIABILITY_FIELDS)


def describe(values: pd.Series) -> dict[str, float]:
    """Mean, sample std (ddof=1), standard error and t-based 95% CI of one group's values."""
    n = values.count()
    mean = values.mean()
    std = values.std(ddof=1) if n > 1 else math.nan
    stderr = std / math.sqrt(n) if n > 1 else math.nan
    half_width = stdtrit(n - 1, 0.975) * stderr if n > 1 else math.nan
    return {"mean": mean, "std": std, "stderr": stderr,
            "ci95_low": mean - half_width, "ci95_high": mean + half_width}


def summary_table(per_run: pd.DataFrame) -> pd.DataFrame:
    """Aggregate the ok runs of each experiment (every GROUP_FIELDS value the same)."""
    missing = {**{k: v for k, v in FIELD_DEFAULTS.items() if k not in per_run},
               **{m: math.nan for m in METRICS if m not in per_run}}
    ok = per_run[per_run["status"] == "ok"].assign(**missing)
    rows = []
    # dropna=False: max_train_samples is NaN (= all samples) and must still form a group.
    for group, runs in ok.groupby(GROUP_FIELDS, dropna=False, sort=True):
        row = dict(zip(GROUP_FIELDS, group), n=len(runs))
        for metric in METRICS:
            row.update({f"{metric}_{k}": v for k, v in describe(runs[metric].astype(float)).items()})
        rows.append(row)
    stat_columns = [f"{m}_{k}" for m in METRICS for k in ("mean", "std", "stderr", "ci95_low", "ci95_high")]
    return pd.DataFrame(rows, columns=GROUP_FIELDS + ["n"] + stat_columns)


def write_csvs(records: list[dict], output_dir: str | Path) -> dict[str, Path]:
    """(Re)write the per-run, summary and history CSVs from the stored records."""
    output_dir = Path(output_dir)
    records = [{**FIELD_DEFAULTS, **record} for record in records]  # older records lack newer fields
    per_run = per_run_table(records)
    tables = {
        "results_per_run.csv": per_run,
        "results_summary.csv": summary_table(per_run),
        "results_history.csv": history_table(records),
        "results_reliability.csv": reliability_table(records),
    }
    paths = {}
    for name, table in tables.items():
        paths[name] = output_dir / name
        atomic_write_text(paths[name], table.to_csv(index=False))
    return paths


def csv_value(value):
    """How a config value is stored in records and CSVs: hidden_sizes as '256-128', a noise
    matrix as JSON."""
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return json.dumps([list(row) for row in value])
    if isinstance(value, tuple):
        return "-".join(str(v) for v in value)
    return value
