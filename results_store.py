"""Finished runs on disk, and every table and statistic derived from them.

Each run is one JSON record `runs/<run_id>.json`, written atomically: whatever kills the campaign, a reader
never sees a torn record. The CSVs are derived from those records and can be rewritten at any time."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types as types_module
import typing
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import stdtrit

import registry
from registry import CLEAN, ECE_BINS

RUNS_DIR = "runs"
FIGURES_DIR = "figures"
PER_RUN_CSV = "results_per_run.csv"
SUMMARY_CSV = "results_summary.csv"
HISTORY_CSV = "results_history.csv"
RELIABILITY_CSV = "results_reliability.csv"
CAMPAIGN_JSON = "campaign.json"

# A run's results after each listed length are rows of their own, with `epochs` that length.
CONFIG_FIELDS = [field.name for field in dataclasses.fields(registry.TrainConfig) if field.name != "reported_epochs"]
# Runs that differ in any of these are different experiments and are never pooled. The other config fields do not
# change a run's result: the seed is what repeats vary.
GROUP_FIELDS = [name for name in CONFIG_FIELDS if name not in ("seed", "cpu_threads", "data_dir")]
RUN_FIELDS = ["run_id", "repeat", "status", "error", "diverged_epoch", "diverged_step", "attempts", "finished_at"]
# What identifies a run in the long tables (history, reliability).
RUN_KEYS = ["run_id", "repeat", "dataset", "model_type", "activation", "noise_type", "p", "loss", "epochs"]
STATISTICS = ("mean", "std", "stderr", "ci95_low", "ci95_high")
# A run's clean partner: the same settings and seed at p = 0, whatever the noise type.
PAIR_FIELDS = [name for name in GROUP_FIELDS if name not in ("p", "noise_type", "noise_matrix")]
DELTA_METRICS = ["test_accuracy", "test_loss"]
STATUSES = ("ok", "failed", "diverged", "not_identifiable")
RELIABILITY_FIELDS = ["count", "confidence", "accuracy"]
# The columns each CSV is read by.
KEY_COLUMNS = {PER_RUN_CSV: ["run_id", "status", *GROUP_FIELDS], SUMMARY_CSV: ["n", *GROUP_FIELDS],
               HISTORY_CSV: ["run_id", "epoch"], RELIABILITY_CSV: ["run_id", "epochs", "bin", *RELIABILITY_FIELDS]}


def plain_warnings() -> None:
    """Warnings print as one line, "warning: ...", without the file, line and source that raised them."""
    warnings.formatwarning = lambda message, *rest, **kwargs: f"warning: {message}\n"


def silence(stream) -> None:
    """Send the rest of `stream`'s output nowhere, quietly: its reader has gone (`| head`)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def atomic_write(path: Path, write) -> Path:
    """`write(tmp)` to a temporary file beside `path`, synced, which then replaces `path`: readers see the old or the
    new file, never a mix, and a full disk or a signal never leaves a truncated one. A storage error names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):  # name the file the user knows
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    directory = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power cut
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def remove_stale_temporaries(output_dir: Path) -> None:
    """Delete the temporary files atomic_write left in a campaign's folders where a process was killed mid-write."""
    import psutil
    output_dir = Path(output_dir)
    for tmp in [*output_dir.glob(".*.tmp"), *(output_dir / RUNS_DIR).glob(".*.tmp"),
                *(output_dir / FIGURES_DIR).rglob(".*.tmp")]:
        pid = tmp.name.rsplit(".", 2)[1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def csv_value(value):
    """How a config value is stored in records and CSVs: hidden_sizes as '256-128', a noise matrix as JSON,
    loss settings as 'q=0.7'."""
    if isinstance(value, tuple) and value and isinstance(value[0], tuple) and isinstance(value[0][0], str):
        return " ".join(f"{name}={number:g}" for name, number in value)
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return json.dumps([list(row) for row in value])
    if isinstance(value, tuple):
        return "-".join(str(v) for v in value)
    return value


class RunStore:
    """One JSON record per finished run under `output_dir/runs/`."""

    def __init__(self, output_dir: str | Path):
        self.directory = Path(output_dir) / RUNS_DIR

    def save(self, record: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.directory / f"{record['run_id']}.json", json.dumps(record))

    def load(self) -> dict[str, dict]:
        """All valid records by run id. An unreadable, incomplete or wrongly typed one is moved
        to runs/invalid/ with a warning; its run counts as not done, so the campaign redoes it."""
        records = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                check_record(record, path.stem)
            except (ValueError, OSError) as exc:
                (self.directory / "invalid").mkdir(exist_ok=True)
                path.replace(self.directory / "invalid" / path.name)
                warnings.warn(f"moved the invalid run record {path.name} to {self.directory / 'invalid'}/ "
                              f"({exc}); its run will be redone")
                continue
            records[record["run_id"]] = record
        return records


def stored_types(hint) -> tuple[type, ...]:
    """The JSON types a record holds for a TrainConfig field of type `hint` (tuples as csv_value's text)."""
    types = set()
    for part in typing.get_args(hint) if isinstance(hint, types_module.UnionType) else (hint,):
        origin = typing.get_origin(part) or part
        types |= {str} if origin is tuple else {int, float} if part is float else {origin}
    return tuple(types)


RECORD_SCHEMA = {"run_id": (str,), "repeat": (int,), "status": (str,), "error": (str,), "attempts": (int,),
                 **{name: stored_types(hint) for name, hint in typing.get_type_hints(registry.TrainConfig).items()}}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_results(results: dict, epochs: int | None = None) -> None:
    """Raise ValueError unless `results` (an ok record, or its results after a reported length) has every metric
    it holds as a number, `epochs` numbers of history each, and full reliability bins."""
    if bad := [m for m in ("test_accuracy", "test_loss", "seconds") if not is_number(results.get(m))]:
        raise ValueError(f"its metrics {bad} are missing or not numbers")
    if bad := [m for m in registry.METRICS if m in results and not (results[m] is None or is_number(results[m]))]:
        raise ValueError(f"its metrics {bad} are not numbers")
    history = [results[f"history_{m}"] for m in registry.METRICS if f"history_{m}" in results]
    if epochs is not None and not (history and all(isinstance(h, list) and len(h) == epochs for h in history)):
        raise ValueError(f"its history is missing or not {epochs} epochs long")
    bins = results.get("reliability")
    if not (isinstance(bins, dict) and all(len(bins.get(f) or []) == ECE_BINS for f in RELIABILITY_FIELDS)):
        raise ValueError("its reliability bins are missing or incomplete")


def check_record(record, run_id: str) -> None:
    """Raise ValueError unless `record` is a complete, well-typed run record of `run_id`."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if missing := set(RECORD_SCHEMA) - set(record):
        raise ValueError(f"missing fields {sorted(missing)}")
    if bad := [f"{name}={record[name]!r}" for name, types in RECORD_SCHEMA.items()
               if not isinstance(record[name], types) or isinstance(record[name], bool) != (bool in types)]:
        raise ValueError(f"wrongly typed fields: {', '.join(bad)[:200]}")
    if record["run_id"] != run_id or record["status"] not in STATUSES or record["attempts"] < 1:
        raise ValueError(f"run_id, status or attempts ({record['status']!r}, {record['attempts']}) is not what a "
                         f"record of {run_id} holds")
    if record["status"] == "ok":
        check_results(record, record["epochs"])
        reported = record.get("reported", {})
        if not isinstance(reported, dict) or not all(isinstance(r, dict) for r in reported.values()):
            raise ValueError("its results after shorter lengths are not a dict of results")
        for results in reported.values():
            check_results(results)


def summarize(frame: pd.DataFrame, by: list[str], metrics) -> pd.DataFrame:
    """One row per value of `by`: n (runs), then for every metric M (missing ones give empty columns) its mean,
    sample std (ddof=1), standard error and t-based 95% CI of the mean as M_<statistic>, over its non-empty values."""
    frame = frame.reindex(columns=list(dict.fromkeys([*by, *metrics])))
    values = frame[list(metrics)].apply(pd.to_numeric, errors="coerce")
    # dropna=False: max_train_samples and noise_matrix are empty for "all samples" and "none".
    groups = values.groupby([frame[key] for key in by], dropna=False, sort=True)
    count, mean, std = groups.count(), groups.mean(), groups.std(ddof=1)
    stderr = std / count ** 0.5
    half_width = stdtrit(count - 1, 0.975) * stderr
    statistics = {"mean": mean, "std": std, "stderr": stderr, "ci95_low": mean - half_width,
                  "ci95_high": mean + half_width}
    columns = {"n": groups.size(), **{f"{m}_{s}": statistics[s][m] for m in metrics for s in STATISTICS}}
    return pd.DataFrame(columns).reset_index()


def by_length(records: list[dict]) -> list[dict]:
    """Each record, then for each shorter length it reports, the record with those results and `epochs`. A length
    of a seed and setting that an earlier run of the store gives too (a grid rerun with more epochs listed) is the
    same training, the earlier run's result once: pooling both would count one seed twice."""
    rows, results_of = [], set()  # (settings, seed) of each ok row
    for record in sorted(records, key=lambda r: (r.get("finished_at") or "", r["run_id"])):
        for row in [record, *({**record, **results, "epochs": int(epochs)}
                              for epochs, results in record.get("reported", {}).items())]:
            key = (*(row[f] for f in GROUP_FIELDS), row["seed"]) if row["status"] == "ok" else None
            if key is None or key not in results_of:
                rows.append(row)
                results_of.add(key)
    return rows


def per_run_table(records: list[dict]) -> pd.DataFrame:
    """One row per run and reported length: bookkeeping, config fields, final metrics (history left out)."""
    columns = RUN_FIELDS + CONFIG_FIELDS + ["n_params"] + list(registry.METRICS) + ["estimated_transition"]
    table = pd.DataFrame(by_length(records)).reindex(columns=columns)
    table["estimated_transition"] = table["estimated_transition"].map(json.dumps, na_action="ignore")  # T-hat rows
    table["max_train_samples"] = table["max_train_samples"].astype("Int64")  # empty = all samples
    return table.sort_values(GROUP_FIELDS[:6] + ["repeat"], kind="stable", ignore_index=True)


def with_clean_runs_per_noise_type(ok: pd.DataFrame) -> pd.DataFrame:
    """The clean runs (p = 0, shared) counted as the p = 0 runs of every noise type run with the same settings."""
    clean, noisy = ok[ok["noise_type"] == CLEAN], ok[ok["noise_type"] != CLEAN]
    types = noisy[PAIR_FIELDS + ["noise_type", "noise_matrix"]].drop_duplicates()
    copies = clean.drop(columns=["noise_type", "noise_matrix"]).merge(types, on=PAIR_FIELDS, how="left")
    return pd.concat([noisy, copies.fillna({"noise_type": CLEAN})], ignore_index=True)


def with_paired_deltas(ok: pd.DataFrame) -> pd.DataFrame:
    """`ok` runs with delta_M for M in DELTA_METRICS: M minus M of the clean partner, the run at p = 0 with the
    same seed and settings, any noise type (at p = 0 all are the same run). Empty at p = 0 and with no partner."""
    keys = PAIR_FIELDS + ["seed"]
    clean = ok[ok["p"] == 0].drop_duplicates(keys)[keys + DELTA_METRICS]
    paired = ok.merge(clean, on=keys, how="left", suffixes=("", "_clean"))
    for metric in DELTA_METRICS:
        paired[f"delta_{metric}"] = (paired[metric] - paired[f"{metric}_clean"]).where(paired["p"] > 0)
    return paired


def summary_table(per_run: pd.DataFrame, target: Target | None = None) -> pd.DataFrame:
    """The ok runs of each experiment (every GROUP_FIELDS value the same) aggregated, with the paired differences
    from the clean baseline; with a precision `target`, test accuracy gets its rule's interval (`Target`)."""
    ok = with_clean_runs_per_noise_type(per_run[per_run["status"] == "ok"])
    metrics = list(registry.METRICS) + [f"delta_{m}" for m in DELTA_METRICS]
    summary = summarize(with_paired_deltas(ok), GROUP_FIELDS, metrics)
    summary = summary if target is None else with_target_intervals(summary, ok, target)
    # A t interval of a fraction can reach past 0 or 1 (few runs, a mean near the bound): clipped to [0, 1].
    for metric in set(registry.METRICS) - registry.unbounded_metrics():
        summary[f"{metric}_ci95_low"] = summary[f"{metric}_ci95_low"].clip(lower=0.0)
        summary[f"{metric}_ci95_high"] = summary[f"{metric}_ci95_high"].clip(upper=1.0)
    return summary


LOSS_FIELDS = ["loss", "loss_settings"]


def paired_effects(treated: pd.DataFrame, plain: pd.DataFrame, varied: list[str], name: str) -> pd.DataFrame:
    """`treated` runs minus their `plain` twins, the runs with the same seed and settings but for the `varied`
    fields, summarized as <name>_M_<statistic> for M in DELTA_METRICS, per experiment of the treated runs."""
    twins = [f for f in GROUP_FIELDS if f not in varied] + ["seed"]
    pairs = treated.merge(plain[twins + DELTA_METRICS], on=twins, suffixes=("", "_plain"))
    effects = {f"{name}_{m}": pairs[m] - pairs[f"{m}_plain"] for m in DELTA_METRICS}
    return summarize(pairs[GROUP_FIELDS].assign(**effects), GROUP_FIELDS, list(effects))


def loss_effects(runs: pd.DataFrame) -> pd.DataFrame:
    """Each loss other than ce minus ce with the same settings, run by run on the same seed (paired), as
    minus_ce_M_<statistic>."""
    ok = with_clean_runs_per_noise_type(runs[runs["status"] == "ok"])
    return paired_effects(ok[ok["loss"] != "ce"], ok[ok["loss"] == "ce"], LOSS_FIELDS, "minus_ce")


def early_stopping_effects(runs: pd.DataFrame) -> pd.DataFrame:
    """Early stopping as a remedy: each run with a validation split, at its epoch of lowest noisy-validation loss,
    minus its twin trained on all the data to the last epoch (same seed and settings, no split), as
    minus_last_epoch_M_<statistic>."""
    ok = with_clean_runs_per_noise_type(runs[runs["status"] == "ok"])
    stopped = ok[ok["validation_fraction"] > 0]
    stopped = stopped.assign(**{m: stopped[f"selected_{m}"] for m in DELTA_METRICS})
    return paired_effects(stopped, ok[ok["validation_fraction"] == 0], ["validation_fraction"], "minus_last_epoch")


# The sequential rule's stopping bound uses this t quantile instead of 97.5%: stopping where the spread is small by
# chance would otherwise cover the mean too rarely. Chosen by simulation (docs/statistics.md).
SEQUENTIAL_QUANTILE = 0.99


def ok_values(values) -> np.ndarray:
    """The values of the runs that ended ok: NaN marks the others."""
    values = np.asarray(values, dtype=float)
    return values[~np.isnan(values)]


def t_times_std(values, quantile: float = 0.975) -> float:
    """The `quantile` t quantile at n - 1 degrees of freedom times the sample std of the n values: a half-width at
    one run; NaN under two values."""
    return float(stdtrit(len(values) - 1, quantile) * np.std(values, ddof=1)) if len(values) >= 2 else math.nan


@dataclasses.dataclass(frozen=True)
class Target:
    """Repeats per experiment for a 95% CI of mean test accuracy at most `half_width` wide on each side, from
    `first_stage` to `max_repeats` runs. The rule looks at a point's first n repeats (n = first_stage, then as many
    as the last look planned) and stops or plans more, so a point's plan follows from its repeats in order alone:
    stop once t * s / sqrt(n) <= half_width (t: the `quantile` t quantile), reporting mean +- half_width; else plan
    the n at which s would give a plain 95% interval within the target (at least one more). See docs/statistics.md."""
    half_width: float
    first_stage: int
    max_repeats: int
    quantile: float = SEQUENTIAL_QUANTILE

    def repeats(self, values) -> int:
        """The repeats planned for a point, from the test accuracies of its repeats 0, 1, ... in order as far as they
        are stored (NaN: a run that did not end ok)."""
        n = self.first_stage
        while n <= len(values) and (more := self.next_look(values[:n])) > n:
            n = more
        return n

    def next_look(self, values) -> int:
        """At a look at a point's first n repeats: n to stop there, else the repeats to look at next."""
        if len(values) >= self.max_repeats or not self.bound(values) > self.half_width:  # NaN: no spread to go on
            return len(values)
        return max(len(values) + 1, self.implied_repeats(np.std(ok_values(values), ddof=1)))

    def bound(self, values) -> float:
        """The rule's stopping half-width: the `quantile` t quantile * s / sqrt(n) of the ok values."""
        ok = ok_values(values)
        return t_times_std(ok, self.quantile) / math.sqrt(len(ok))

    def implied_repeats(self, std: float) -> int:
        """The fewest repeats whose plain 95% interval, at sample std `std`, is within the target (at most
        max_repeats): the next look, where the stricter bound may still ask for more."""
        within = self.plain_half_widths_per_std * std <= self.half_width
        return int(within.argmax()) + 2 if within.any() else self.max_repeats

    @functools.cached_property
    def plain_half_widths_per_std(self) -> np.ndarray:
        """The plain 95% half-width per unit of sample std at n = 2, ..., max_repeats."""
        n = np.arange(2, self.max_repeats + 1)
        return stdtrit(n - 1, 0.975) / np.sqrt(n)

    def interval(self, values) -> tuple[float, bool]:
        """(half-width of the reported 95% interval, whether it is within the target), from the test accuracies of
        a point's repeats in order (NaN: not ok): half_width where the rule stopped within the target, else the
        plain t interval of all ok values."""
        ok = ok_values(values)
        n = self.repeats(values)
        if n <= len(values) and self.bound(values[:n]) <= self.half_width:
            return self.half_width, True
        return t_times_std(ok) / math.sqrt(len(ok)), False


def in_repeat_order(runs: pd.DataFrame) -> np.ndarray:
    """A point's test accuracies by repeat, NaN for a repeat without an ok run before its last one; empty where
    repeats recur (the store holds runs of several campaign seeds): the rule's order is then lost."""
    if runs["repeat"].duplicated().any():
        return np.array([])
    return runs.set_index("repeat")["test_accuracy"].reindex(range(runs["repeat"].max() + 1)).to_numpy()


def with_target_intervals(summary: pd.DataFrame, ok: pd.DataFrame, target: Target) -> pd.DataFrame:
    """The summary with test accuracy's interval from `target`'s rule, and `target_met`; a point whose runs have no
    one order of repeats keeps the plain t interval, its target not met."""
    in_order = ok.groupby(GROUP_FIELDS, dropna=False, sort=True)[["repeat", "test_accuracy"]].apply(in_repeat_order)
    values = in_order.reindex(pd.MultiIndex.from_frame(summary[GROUP_FIELDS]))
    intervals = pd.DataFrame([target.interval(v) if len(v) else (math.nan, False) for v in values],
                             index=summary.index, columns=["half", "met"])
    half, mean = intervals["half"].astype(float), summary["test_accuracy_mean"]
    return summary.assign(test_accuracy_ci95_low=(mean - half).fillna(summary["test_accuracy_ci95_low"]),
                          test_accuracy_ci95_high=(mean + half).fillna(summary["test_accuracy_ci95_high"]),
                          target_met=intervals["met"].astype(bool))


def history_table(records: list[dict]) -> pd.DataFrame:
    """Per-epoch metrics in long form: one row per (run, epoch)."""
    metrics = registry.per_epoch_metrics()
    rows = [{**{k: record[k] for k in RUN_KEYS}, "epoch": epoch + 1,
             **{m: record[f"history_{m}"][epoch] for m in metrics if f"history_{m}" in record}}
            for record in records if record["status"] == "ok"
            for epoch in range(len(record["history_test_loss"]))]
    return pd.DataFrame(rows, columns=RUN_KEYS + ["epoch"] + metrics)


def reliability_table(records: list[dict]) -> pd.DataFrame:
    """Reliability-diagram bins of every run's model on the clean test set after each reported length, long form."""
    rows = [{**{k: record[k] for k in RUN_KEYS}, "bin": b,
             **{f: record["reliability"][f][b] for f in RELIABILITY_FIELDS}}
            for record in by_length(records) if record["status"] == "ok" for b in range(ECE_BINS)]
    return pd.DataFrame(rows, columns=RUN_KEYS + ["bin"] + RELIABILITY_FIELDS)


def write_csvs(records: list[dict], output_dir: str | Path, target: Target | None = None) -> list[Path]:
    """(Re)write every CSV from the stored records; returns their paths."""
    per_run = per_run_table(records)
    tables = {PER_RUN_CSV: per_run, SUMMARY_CSV: summary_table(per_run, target),
              HISTORY_CSV: history_table(records), RELIABILITY_CSV: reliability_table(records)}
    for name, table in tables.items():
        atomic_write_text(Path(output_dir) / name, table.to_csv(index=False))
    return [Path(output_dir) / name for name in tables]


@dataclasses.dataclass
class Results:
    """A campaign's tables, as the figures use them. runs: one row per run. summary: one row per experiment.
    curves: per experiment and epoch, the history metrics' mean and standard error over repeats. reliability:
    per experiment and confidence bin, the bins of all its runs pooled (weighted by count)."""
    runs: pd.DataFrame
    summary: pd.DataFrame
    curves: pd.DataFrame
    reliability: pd.DataFrame


def read_results(output_dir: str | Path) -> Results:
    """Read the CSVs of an output directory (also while its campaign is still running)."""
    output_dir = Path(output_dir)
    runs = read_csv(output_dir / PER_RUN_CSV)
    config = with_clean_runs_per_noise_type(runs[runs["status"] == "ok"])[["run_id", *GROUP_FIELDS]]
    others = [f for f in GROUP_FIELDS if f != "epochs"]  # a run's history is of the length it trained
    history, reliability = (read_csv(output_dir / name).drop(columns=others, errors="ignore")
                            .merge(config, on=["run_id", "epochs"]) for name in (HISTORY_CSV, RELIABILITY_CSV))
    return Results(runs=runs, summary=read_csv(output_dir / SUMMARY_CSV),
                   curves=summarize(history, GROUP_FIELDS + ["epoch"], registry.per_epoch_metrics()),
                   reliability=pool_reliability(reliability))


class BrokenCSVError(ValueError):
    """A results CSV that cannot be read as this module writes it."""


REWRITE = "rewrite it from the stored runs with the campaign's command (it runs nothing that is done)"


def read_csv(path: Path) -> pd.DataFrame:
    """A CSV of this module, run ids read as text so that every table agrees on their type, and max_train_samples
    as whole numbers (empty: all samples)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is this a campaign's output_dir, and has a run finished?")
    if not ends_with_newline(path):  # written whole, a CSV ends with one
        warnings.warn(f"{path} ends in the middle of a line: it is truncated; {REWRITE}")
    try:
        table = pd.read_csv(path, dtype={"run_id": str, "noise_matrix": str, "hidden_sizes": str, "loss_settings": str,
                                        "estimated_transition": str, "max_train_samples": "Int64"})
    except ValueError as exc:  # not a CSV, or not text
        raise BrokenCSVError(f"{path} cannot be read ({' '.join(str(exc).split())[:120]}): {REWRITE}") from None
    if missing := [column for column in KEY_COLUMNS.get(path.name, []) if column not in table]:
        raise BrokenCSVError(f"{path} lacks the columns {', '.join(missing[:5])}: {REWRITE}")
    return table


def ends_with_newline(path: Path) -> bool:
    """Whether the file is empty or its last byte is a newline (read alone, not the whole file)."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def pool_reliability(reliability: pd.DataFrame) -> pd.DataFrame:
    """Each experiment's reliability bins pooled over its runs as if their test predictions were one set."""
    filled = reliability[reliability["count"] > 0]
    weighted = filled.assign(**{f: filled[f] * filled["count"] for f in ("confidence", "accuracy")})
    pooled = weighted.groupby(GROUP_FIELDS + ["bin"], dropna=False)[["count", "confidence", "accuracy"]].sum()
    return pooled.assign(**{f: pooled[f] / pooled["count"] for f in ("confidence", "accuracy")}).reset_index()
