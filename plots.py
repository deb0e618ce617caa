"""Figures of a noise-robustness campaign, from `results_store.read_results` (which computes every statistic).

A line per experiment (runs differing only in the seed), a panel per combination of the settings that vary; a
figure without data is None. Bare Agg Figures (never pyplot): drawing leaves no global state behind.
    python plots.py OUTPUT_DIR [--report]   # figures into OUTPUT_DIR/figures/ (--report: and report.html)
"""
from __future__ import annotations

import signal
import sys

STARTUP_INTERRUPTS: list[int] = []  # Ctrl-C while the libraries load: noted, and acted on once main() starts
if __name__ == "__main__":
    signal.signal(signal.SIGINT, lambda signum, frame: STARTUP_INTERRUPTS.append(signum))

import argparse
import dataclasses
import json
import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import registry
import results_store as rs

K = registry.NUM_CLASSES
NOISE_ORDER = list(registry.NOISE_TYPES)
LABEL_NOISE, PIXEL_NOISE = registry.of_kind("label"), registry.of_kind("pixel")
NOTEBOOK = Path(__file__).resolve().parent / "analysis.ipynb"
REFERENCE_DIR = NOTEBOOK.parent / "results" / "reference"  # the campaign whose prose the notebook carries
# Config fields other than dataset and model that tell experiments apart: when one varies, its
# value joins the panel titles (activation, noise type and matrix and p are drawn apart).
OTHER_FIELDS = [f for f in rs.GROUP_FIELDS if f not in ("dataset", "model_type", "activation", "noise_type",
                                                           "noise_matrix", "p")]
PAIRED_LOSS = "minus_ce_test_accuracy"
WIDTHS = "hidden_sizes"  # an MLP's setting: a CNN's is empty, and a CNN is in every slice of it (select)
# What the report compares as remedies, side by side: the loss, early stopping and the training length.
REMEDY_FIELDS = [*rs.LOSS_FIELDS, "validation_fraction", "epochs"]
LABELS = {**{name: metric.label for name, metric in registry.METRICS.items()},
          "accuracy": "accuracy in bin", "delta_test_accuracy": "test accuracy − at p = 0",
          "delta_test_loss": "test cross-entropy − at p = 0", PAIRED_LOSS: "test accuracy: loss − ce (paired)"}
UNIT_RANGE = {name for name, metric in registry.METRICS.items() if metric.bounded} | {"accuracy"}  # y from 0 to 1
MAX_PANELS = 48  # a figure with more is drawn once per value of a varying setting (docs/outputs.md)
OVER_SEEDS = " (mean ± standard error over seeds)"
PANEL_SIZE = (3.4, 2.5)  # inches
DPI = 110
CELL_TIMEOUT = 600  # seconds a cell of the report's notebook may run
STYLE = {"font.size": 8.5, "axes.titlesize": 9, "legend.fontsize": 8, "axes.grid": True, "grid.alpha": 0.3}


def information_limit(noise: str) -> float | None:
    return registry.information_limit(noise) if noise in LABEL_NOISE and noise != "label_matrix" else None


def varying(table: pd.DataFrame, fields=OTHER_FIELDS) -> list[str]:
    """The `fields` with several values among the experiments of one model type (a CNN has no hidden_sizes)."""
    return [f for f in fields if table.groupby("model_type")[f].nunique(dropna=False).max() > 1]


def row_fields(table: pd.DataFrame, shown=("noise_type", "p"), exclude=()) -> list[str]:
    """The fields that tell a table's rows apart: `shown`, and every other setting with several values, less
    `exclude` (in GROUP_FIELDS order)."""
    several = {f for f in ("dataset", "model_type", "activation") if table[f].nunique() > 1} | set(varying(table))
    return [f for f in rs.GROUP_FIELDS if f in shown or f in several and f not in exclude]


def experiments(table: pd.DataFrame, apart=()) -> pd.DataFrame:
    """The rows plus `setting` (dataset · model · every varying field but those drawn `apart`) and `noise`, in
    the order of those fields' values."""
    fields = [f for f in varying(table) if f not in apart]
    table = table.sort_values(["dataset", "model_type", *fields], kind="stable")
    setting = table["dataset"].astype(str)
    for field in ([] if "model_type" in apart else ["model_type"]) + fields:
        text = table[field].astype(object).where(table[field].notna(), "none").astype(str)
        text = (" · " if field in ("model_type", "loss_settings") else f" · {field}=") + text
        absent = table[field].isna() & (field in (WIDTHS, "loss_settings"))  # a CNN's widths, ce's settings
        setting = setting + text.where(~absent, "")
    matrices = sorted(table["noise_matrix"].dropna().unique())
    number = {m: f"label_matrix #{i}" for i, m in enumerate(matrices, 1)} if len(matrices) > 1 else {}
    noise = [number.get(m, t) if t == "label_matrix" else t
             for m, t in zip(table["noise_matrix"], table["noise_type"])]
    columns = pd.DataFrame({"setting": setting, "noise": noise}, index=table.index)
    return pd.concat([table, columns], axis=1).copy()  # one block: figures add columns of their own


def ordered(values, canonical) -> list:
    """The distinct values: those in `canonical` in its order, then the others sorted."""
    present = set(values)
    return [v for v in canonical if v in present] + sorted(present - set(canonical))


def color(noise: str) -> str:
    return registry.NOISE_TYPES[noise].color if noise in registry.NOISE_TYPES else f"C{sum(map(ord, noise)) % 10}"


class TooManyPanels(ValueError):
    """A figure would have more than MAX_PANELS panels."""


class ReportError(RuntimeError):
    """A cell of analysis.ipynb failed on the campaign reported."""


@matplotlib.rc_context(STYLE)
def grid(panels: list[list], draw, title: str, xlabel: str = "noise level p") -> Figure:
    """A panel per (title, frame, metric) in rows `panels`, drawn by draw(ax, frame, metric); one legend below."""
    n_rows, n_cols = len(panels), max(map(len, panels))
    if n_rows * n_cols > MAX_PANELS:
        raise TooManyPanels(f"{title!r} would have {n_rows * n_cols} panels, more than {MAX_PANELS}")
    width = max(n_cols * PANEL_SIZE[0], 7.5)
    fig = Figure(figsize=(width, n_rows * PANEL_SIZE[1] + 1.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    fig.suptitle(title)
    for row, ax_row in zip(panels, axes):
        first_of = {}
        for panel, ax in zip(row + [None] * (n_cols - len(row)), ax_row):
            if panel is None or panel[1].empty:
                ax.set_axis_off()
                continue
            name, frame, metric = panel
            if metric in first_of:
                ax.sharey(first_of[metric])
            first_of.setdefault(metric, ax)
            draw(ax, frame, metric)
            ax.set(title=wrapped(name), xlabel=xlabel, ylabel=LABELS.get(metric, metric))
            if xlabel == "epoch":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if metric == "selected_epoch":  # one tick where every run picks the same epoch
                ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            if metric in UNIT_RANGE:
                ax.set_ylim(-0.02, 1.02)
    handles = {label: h for ax in fig.axes for h, label in zip(*ax.get_legend_handles_labels())}
    handles = dict(sorted(handles.items(), key=lambda item: not isinstance(item[1], ErrorbarContainer)))
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center",
                   ncols=max(1, min(len(handles), int(width / 2.8))))
    return fig


def wrapped(title: str, width: int = 45) -> str:
    """A panel title broken into lines after its " · " separators, each line at most about `width` characters."""
    lines = []
    for part in title.split(" · "):
        if lines and len(lines[-1]) + len(part) + 3 <= width:
            lines[-1] += f" · {part}"
        else:
            lines.append(part)
    return " ·\n".join(lines)


def errorbar_line(ax, frame: pd.DataFrame, column: str, label: str, color: str, linestyle: str = "-") -> None:
    """One experiment's `column` mean vs p, bars one standard error."""
    frame = frame[frame[f"{column}_mean"].notna()].sort_values("p")
    if frame["p"].duplicated().any():
        raise ValueError(f"line {label!r} would mix experiments: several rows per p")
    if len(frame):
        ax.errorbar(frame["p"], frame[f"{column}_mean"], yerr=frame[f"{column}_stderr"], label=label, color=color,
                    linestyle=linestyle, marker="o", markersize=3, capsize=2, linewidth=1.3, elinewidth=0.9)


def noise_lines(ax, frame: pd.DataFrame, column: str, linestyle: str = "-", variant: str = "") -> None:
    for noise in ordered(frame["noise"], NOISE_ORDER):
        label = f"{noise}, {variant}" if variant else noise
        errorbar_line(ax, frame[frame["noise"] == noise], column, label, color(noise), linestyle)


def theory(ax, frame: pd.DataFrame, metric: str, black: bool = False) -> None:
    """Chance, the information limits the p range reaches (all, if `black`), the noisy-label posterior's loss."""
    if metric == "test_accuracy":
        ax.axhline(1 / K, color="0.4", linewidth=0.9, label="chance 1/K", gid="chance")
    for noise in (n for n in ordered(frame["noise"], NOISE_ORDER) if information_limit(n) is not None):
        limit, p_max = information_limit(noise), frame.loc[frame["noise"] == noise, "p"].max()
        line_color, which = ("black", "") if black else (color(noise), f" ({noise})")
        if black or p_max >= limit:
            ax.axvline(limit, color=line_color, linestyle=":", linewidth=1.2, label=f"information limit{which}",
                       gid=f"information_limit:{noise}")
        p = np.linspace(0, min(p_max, limit), 200)
        p = p[p < limit]
        if metric == "test_loss" and p.size > 1:
            ax.plot(p, registry.posterior_model_loss(noise, p), color=line_color, linestyle="--", linewidth=1.1,
                    label=f"model = noisy-label posterior{which}", gid=f"posterior_model:{noise}")
    if metric == "test_macro_roc_auc":
        ax.axhline(0.5, color="0.4", linewidth=0.9, label="chance ROC-AUC 0.5")
    if metric.startswith("delta_"):
        ax.axhline(0.0, color="0.4", linewidth=0.9, label="no change from p = 0")
        ax.set_xlim(left=-0.02)  # from p = 0, which the differences are taken from
    if metric == PAIRED_LOSS:
        ax.axhline(0.0, color="0.4", linewidth=0.9, label="no change from ce")


def noise_panel(ax, frame: pd.DataFrame, metric: str) -> None:
    noise_lines(ax, frame, metric)
    theory(ax, frame, metric)


def by_activation(frame: pd.DataFrame, metrics, title: str, draw=noise_panel, by_noise: bool = False,
                  xlabel: str = "noise level p", metrics_across: bool = False) -> Figure | None:
    """A panel column per activation, a row per setting (and noise type, if `by_noise`) and metric with data;
    `metrics_across`: a column per metric, a row per setting (and noise type) and activation."""
    metrics = [m for m in metrics if f"{m}_mean" in frame and frame[f"{m}_mean"].notna().any()]
    if not metrics:
        return None
    rows = list(frame.groupby("setting", sort=False))
    if by_noise:
        rows = [(f"{setting} · {noise}", part[part["noise"] == noise]) for setting, part in rows
                for noise in ordered(part["noise"], NOISE_ORDER)]
    activations = ordered(frame["activation"], registry.ACTIVATIONS)
    if metrics_across:
        panels = [[(f"{name} · {a}", part[part["activation"] == a], m) for m in metrics]
                  for name, part in rows for a in activations if (part["activation"] == a).any()]
    else:
        panels = [[(f"{name} · {a}", part[part["activation"] == a], m) for a in activations]
                  for name, part in rows for m in metrics]
    return grid(panels, draw, title, xlabel)


def plot_metric_vs_p(summary: pd.DataFrame, metric: str = "test_accuracy") -> Figure | None:
    """Figures 1 and 2: `metric` vs p, a line per noise type."""
    return by_activation(experiments(summary), [metric], f"{LABELS[metric].capitalize()} vs noise level" + OVER_SEEDS)


def plot_paired_differences(summary: pd.DataFrame) -> Figure | None:
    """Figure 13: "does this p change accuracy?" answered with each run minus the clean run of its seed."""
    return by_activation(experiments(summary), ["delta_test_accuracy", "delta_test_loss"],
                         "Change from the clean run of the same seed (paired; mean ± standard error)")


def plot_label_vs_pixel(summary: pd.DataFrame) -> Figure | None:
    """Figure 3: label next to pixel noise, accuracy and cross-entropy; a row per setting and activation."""
    frame = experiments(summary)
    label = frame["noise_type"].isin(LABEL_NOISE)
    if not (label.any() and (~label).any()):
        return None
    families = (("label noise", frame[label]), ("pixel noise", frame[~label]))
    panels = [[(f"{setting} · {a} · {family}", part[(part["setting"] == setting) & (part["activation"] == a)], m)
               for m in ("test_accuracy", "test_loss") for family, part in families]
              for setting in frame["setting"].unique() for a in ordered(frame["activation"], registry.ACTIVATIONS)]
    return grid(panels, noise_panel, "Label noise vs pixel noise" + OVER_SEEDS)


def plot_macro_metrics(summary: pd.DataFrame) -> Figure | None:
    """Figure 5: macro precision, recall and ROC-AUC vs p."""
    metrics = ["test_macro_precision", "test_macro_recall", "test_macro_roc_auc"]
    return by_activation(experiments(summary), metrics, "Macro metrics vs noise level" + OVER_SEEDS)


def plot_calibration(summary: pd.DataFrame) -> Figure | None:
    """Figure 7: expected calibration error and mean max-softmax confidence on the clean test set."""
    return by_activation(experiments(summary), ["test_ece", "test_mean_confidence"],
                         "Calibration on the clean test set" + OVER_SEEDS)


def plot_label_noise_theory(summary: pd.DataFrame) -> Figure | None:
    """Figure 6: a column per label noise type with a closed-form theory (black), a line per activation."""
    frame = experiments(summary)
    frame = frame[[information_limit(n) is not None for n in frame["noise"]]]
    if frame.empty:
        return None

    def draw(ax, part, metric):
        for i, activation in enumerate(ordered(part["activation"], registry.ACTIVATIONS)):
            errorbar_line(ax, part[part["activation"] == activation], metric, activation, f"C{i}")
        theory(ax, part, metric, black=True)
    noises = ordered(frame["noise"], NOISE_ORDER)
    panels = [[(f"{setting} · {noise}", part[part["noise"] == noise], metric) for noise in noises]
              for setting, part in frame.groupby("setting", sort=False) for metric in ("test_accuracy", "test_loss")]
    return grid(panels, draw, f"Label noise: measurements (a line per activation) vs theory (black), K = {K}")


def plot_losses(summary: pd.DataFrame, runs: pd.DataFrame) -> Figure | None:
    """Figure 10: each loss against cross-entropy (ce): accuracy and cross-entropy vs p, a line per loss, and the
    paired difference in accuracy, loss minus ce run by run on the same seed."""
    if summary["loss"].nunique() < 2 or not (summary["loss"] == "ce").any():
        return None
    with_effects = summary.merge(rs.loss_effects(runs), on=rs.GROUP_FIELDS, how="left")
    frame = experiments(with_effects, apart=rs.LOSS_FIELDS)
    frame = frame.assign(variant=loss_variant(frame))
    variants = sorted(frame["variant"].unique(), key=lambda v: (v != "ce", v))

    def draw(ax, part, metric):
        ps = sorted(part["p"].unique())  # a loss without a run at some p gets a gap there
        for i, variant in enumerate(variants):
            line = part[part["variant"] == variant].set_index("p").reindex(ps)
            present = line[f"{metric}_mean"].notna()
            for _, segment in line[present].groupby((~present).cumsum()[present]):
                errorbar_line(ax, segment.reset_index(), metric, variant, "black" if variant == "ce" else f"C{i - 1}")
        theory(ax, part, metric)
    panels = [[(f"{setting} · {activation} · {noise}", part, m) for m in ("test_accuracy", "test_loss", PAIRED_LOSS)]
              for (setting, activation, noise), part in frame.groupby(["setting", "activation", "noise"], sort=False)
              if part["variant"].nunique() > 1]
    if not panels:
        return None
    return grid(panels, draw, "Losses vs cross-entropy (ce) on the same seeds" + OVER_SEEDS)


def plot_models(summary: pd.DataFrame) -> Figure | None:
    """Figure 14: model types side by side (an MLP per width where its widths vary), a line per model, a row per
    setting, activation and noise type."""
    frame = experiments(summary[summary["loss"] == "ce"], apart=["model_type", WIDTHS])
    if frame["model_type"].nunique() < 2:
        return None
    widths = (" " + frame[WIDTHS]).fillna("") if frame[WIDTHS].nunique() > 1 else ""
    frame = frame.assign(model=frame["model_type"] + widths)
    colors = {model: f"C{i}" for i, model in enumerate(sorted(frame["model"].unique()))}

    def draw(ax, part, metric):
        for model, line in part.groupby("model"):
            errorbar_line(ax, line, metric, model, colors[model])
        theory(ax, part, metric)
    panels = [[(f"{setting} · {activation} · {noise}", part, m) for m in ("test_accuracy", "test_loss")]
              for (setting, activation, noise), part in frame.groupby(["setting", "activation", "noise"], sort=False)]
    return grid(panels, draw, "Models under each noise type" + OVER_SEEDS)


def variant_figure(summary: pd.DataFrame, prefix: str, variants: tuple[str, str], title: str, noise_types,
                   extra=()) -> Figure | None:
    """Figures 11 and 12: accuracy and cross-entropy (solid) vs their `prefix` variant (dashed), then `extra`."""
    frame = experiments(summary[summary["noise_type"].isin(noise_types)
                                & summary[f"{prefix}test_accuracy_mean"].notna()])

    def draw(ax, part, metric):
        if metric not in extra:
            noise_lines(ax, part, metric, "-", variants[0])
        noise_lines(ax, part, metric if metric in extra else prefix + metric, "--", variants[1])
    return by_activation(frame, ("test_accuracy", "test_loss", *extra), title, draw, metrics_across=True)


def plot_early_stopping(summary: pd.DataFrame) -> Figure | None:
    """Figure 11: the final epoch vs the epoch of lowest noisy-validation loss, and which epoch that was."""
    return variant_figure(summary, "selected_", ("final epoch", "epoch of lowest noisy-validation loss"),
                          "Early stopping on a noisy validation split", NOISE_ORDER, extra=("selected_epoch",))


def plot_pixel_test_matching(summary: pd.DataFrame) -> Figure | None:
    """Figure 12: pixel-noise runs tested on clean images and on images with the same pixel noise."""
    return variant_figure(summary, "noisy_", ("clean test images", "equally noisy test images"),
                          "Pixel noise: clean vs equally noisy test images", PIXEL_NOISE)


@matplotlib.rc_context(STYLE)
def curves_figure(curves: pd.DataFrame, metrics, title: str, metrics_across: bool = False) -> Figure | None:
    """Per-epoch means (shaded: ± one standard error), a line per p (colour bar)."""
    cmap, norm = matplotlib.colormaps["viridis"], Normalize(0, 1)  # p, the same colours in every figure

    def draw(ax, part, metric):
        for p, line in part[part[f"{metric}_mean"].notna()].groupby("p"):
            line = line.sort_values("epoch")
            mean, stderr = line[f"{metric}_mean"], line[f"{metric}_stderr"]
            ax.plot(line["epoch"], mean, color=cmap(norm(p)), marker="o", markersize=2.5, linewidth=1.2)
            ax.fill_between(line["epoch"], mean - stderr, mean + stderr, color=cmap(norm(p)), alpha=0.2, linewidth=0)
    fig = by_activation(experiments(curves), metrics, title + OVER_SEEDS, draw, by_noise=True, xlabel="epoch",
                        metrics_across=metrics_across)
    if fig is not None:
        fig.colorbar(ScalarMappable(norm, cmap), ax=fig.axes, label="noise level p",
                     shrink=min(0.9, 6 / fig.get_figheight()))
    return fig


def plot_learning_curves(curves: pd.DataFrame) -> Figure | None:
    """Figure 4: clean-test accuracy and cross-entropy after each epoch."""
    return curves_figure(curves, ["test_accuracy", "test_loss"], "Learning curves on the clean test set")


def plot_memorisation(curves: pd.DataFrame) -> Figure | None:
    """Figure 9: per epoch at label noise p > 0, clean-test accuracy and what corrupted and uncorrupted training
    examples are predicted as."""
    label = curves[curves["noise_type"].isin(LABEL_NOISE) & (curves["p"] > 0)]
    metrics = ["test_accuracy", "memorised_fraction", "corrupted_true_fraction", "clean_train_accuracy"]
    return curves_figure(label, metrics, "Memorisation of noisy training labels", metrics_across=True)


def plot_reliability(reliability: pd.DataFrame) -> Figure | None:
    """Figure 8: reliability diagrams, a line per activation (seeds pooled), a column per p (at most three)."""
    frame = experiments(reliability)
    if frame.empty:
        return None

    def levels(noise, ps):
        ps = sorted(p for p in set(ps) if p < (information_limit(noise) or np.inf))
        return ps if len(ps) <= 3 else [ps[0], min(ps, key=lambda p: abs(p - (ps[0] + ps[-1]) / 2)), ps[-1]]

    def draw(ax, part, metric):
        ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=0.9, label="perfect calibration")
        for i, activation in enumerate(ordered(part["activation"], registry.ACTIVATIONS)):
            bins = part[part["activation"] == activation].sort_values("bin")
            ax.plot(bins["confidence"], bins[metric], color=f"C{i}", linewidth=1.1, label=activation)
            share = bins["count"] / bins["count"].sum()
            ax.scatter(bins["confidence"], bins[metric], s=2 + 60 * share, color=f"C{i}")
        ax.set_xlim(0, 1)
    panels = [[(f"{setting} · {noise} · p = {p:g}", part[(part["noise"] == noise) & (part["p"] == p)],
                "accuracy") for p in levels(noise, part.loc[part["noise"] == noise, "p"])]
              for setting, part in frame.groupby("setting", sort=False)
              for noise in ordered(part["noise"], NOISE_ORDER)]
    title = "Reliability on the clean test set (final models; marker area: share of test images)"
    return grid(panels, draw, title, xlabel="confidence (max softmax)")


# ---------------------------------------------------------------- the report's tables (analysis.ipynb)
EXPERIMENT = ["dataset", "model_type", "noise_type", "activation", "p"]  # the index of the report's tables
NOISE_LEVEL = [f for f in EXPERIMENT if f != "activation"]  # the rows of the tables with a column per activation


def clean_runs_once(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with the clean runs (p = 0), which every noise type of a grid shares, once rather than per type."""
    return table[~((table["p"] == 0) & table.duplicated(rs.PAIR_FIELDS + ["p"]))]


def uncorrected(summary: pd.DataFrame) -> pd.DataFrame:
    """The runs of plain training: cross-entropy, no validation split (else the smallest), the shortest length; a
    table of several other settings (a slice the report did not choose) raises."""
    table = summary[summary["loss"] == "ce"]
    table = table[(table["validation_fraction"] == table["validation_fraction"].min())
                  & (table["epochs"] == table["epochs"].min())]
    if several := varying(table):
        raise ValueError(f"the tables take one value of each setting, and {', '.join(several)} vary: choose one "
                         "with the notebook's SLICE (plots.select)")
    return table


def select(results: rs.Results, **values) -> rs.Results:
    """The results with each named setting at the given value, e.g. select(results, learning_rate=0.001); a CNN,
    which has no hidden_sizes, is in every slice of them."""
    def part(table):
        for field, value in values.items():
            chosen = table[field].isna() if value is None else table[field].astype(str) == str(value)
            table = table[chosen | table[field].isna() & (field == WIDTHS)]
        return table
    return rs.Results(*(part(table) for table in dataclasses.astuple(results)))


def report_slice(results: rs.Results, chosen: dict) -> tuple[rs.Results, dict]:
    """The results at the `chosen` settings and then, for each other setting that still varies among them (the
    remedies aside: the report compares them), at its default value where they have it, else at its smallest; and
    the slice taken. A `chosen` setting or value the results do not have is a ValueError naming those they do."""
    taken = {}
    for field, value in chosen.items():
        if field not in rs.GROUP_FIELDS:
            raise ValueError(f"SLICE: {field!r} is not a setting of a run; the settings: {', '.join(rs.GROUP_FIELDS)}")
        if str(value) not in (ran := ran_values(results.summary[field])):
            among = "".join(f" with {k}={v}" for k, v in taken.items())
            raise ValueError(f"SLICE: {field}={value!r} is not among the values this campaign ran{among}: "
                             f"{', '.join(ran)}")
        results, taken = select(results, **{field: value}), {**taken, field: value}
    for field in [f for f in varying(results.summary) if f not in REMEDY_FIELDS]:
        if field in varying(results.summary):  # else the settings taken before have settled it
            taken[field] = default_or_smallest(field, results.summary[field])
            results = select(results, **{field: taken[field]})
    return results, taken


def ran_values(column: pd.Series) -> list[str]:
    """A setting's values in a table, as text; "None" where it is empty (max_train_samples: all samples)."""
    return sorted(column.dropna().astype(str).unique()) + (["None"] if column.isna().any() else [])


def default_or_smallest(field: str, values: pd.Series):
    """The value of `field` a run gets by default (TrainConfig) if it is among `values`, else the smallest of them
    (hidden_sizes: by their widths, so that 64 comes before 512)."""
    default = rs.csv_value(getattr(registry.TrainConfig(), field))
    if str(default) in ran_values(values):
        return default
    widths = (lambda v: tuple(map(int, v.split("-")))) if field == WIDTHS else None
    return sorted(values.dropna().unique(), key=widths)[0]


def overview_table(summary: pd.DataFrame) -> pd.DataFrame:
    """What the campaign ran: per dataset, model, noise type and loss, the activations, the number of noise
    levels, the epochs and the fewest seeds of any experiment."""
    return summary.groupby(["dataset", "model_type", "noise_type", "loss"]).agg(
        activations=("activation", lambda a: ", ".join(ordered(a, registry.ACTIVATIONS))),
        noise_levels=("p", "nunique"),
        epochs=("epochs", "max"), seeds_per_experiment=("n", "min"))


def clean_table(summary: pd.DataFrame) -> pd.DataFrame:
    """At p = 0, per activation: test accuracy with its 95% confidence interval, and cross-entropy (every noise
    type has its own p = 0 experiment, the same runs bit for bit: the first is shown)."""
    columns = {"n": "seeds", "test_accuracy_mean": "accuracy", "test_accuracy_ci95_low": "CI low",
               "test_accuracy_ci95_high": "CI high", "test_loss_mean": "cross-entropy"}
    clean = uncorrected(summary)
    clean = clean_runs_once(clean[clean["p"] == 0])
    return clean.set_index(["dataset", "model_type", "activation"])[list(columns)].rename(columns=columns).round(4)


def metric_table(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The mean of `metric` at every noise level, a column per activation."""
    return uncorrected(summary).pivot_table(index=NOISE_LEVEL, columns="activation", values=f"{metric}_mean").round(3)


def length_table(summary: pd.DataFrame, metrics: list[str], shown=("noise_type", "p")) -> pd.DataFrame:
    """The means of `metrics` after each reported length, a column per epochs, a row per value of `shown` and of every
    other setting that varies (without the noise type shown, the clean runs every noise type shares count once)."""
    if "noise_type" not in shown:
        summary = clean_runs_once(summary)
    rows = row_fields(summary, shown, exclude=["epochs", "noise_type"])
    return summary.pivot(index=rows, columns="epochs", values=[f"{m}_mean" for m in metrics])


def posterior_excess_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Test cross-entropy minus that of a model predicting the noisy-label posterior, below the information limit."""
    label = uncorrected(summary)
    label = label[label["p"] < label["noise_type"].map(lambda t: information_limit(t) or -1)]
    posterior = [float(registry.posterior_model_loss(t, p)) for t, p in zip(label["noise_type"], label["p"])]
    excess = label[EXPERIMENT].assign(excess=label["test_loss_mean"] - posterior)
    return excess.pivot_table(index=NOISE_LEVEL, columns="activation", values="excess").round(3)


def pixel_test_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Pixel noise: mean accuracy on clean and on equally noisy test images, a column pair per activation."""
    rows = uncorrected(summary).loc[lambda t: t["noise_type"].isin(PIXEL_NOISE)]
    names = {"test_accuracy_mean": "clean test", "noisy_test_accuracy_mean": "noisy test"}
    table = rows.pivot_table(index=NOISE_LEVEL, columns="activation", values=list(names))
    return table.rename(columns=names).swaplevel(axis=1).sort_index(axis=1).round(3)


def memorisation_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Label noise at p > 0: the epoch of highest mean test accuracy and the last epoch, with the test accuracy
    and the fraction of corrupted training examples predicted as their noisy label at each."""
    label = uncorrected(curves).loc[lambda t: t["noise_type"].isin(LABEL_NOISE) & (t["p"] > 0)]
    experiment = label.groupby(rs.GROUP_FIELDS, dropna=False)
    columns = {"epoch": "epoch", "test_accuracy_mean": "test accuracy", "memorised_fraction_mean": "memorised"}
    best, last = (label.loc[experiment[column].idxmax()].set_index(EXPERIMENT)[list(columns)].rename(columns=columns)
                  for column in ("test_accuracy_mean", "epoch"))
    return pd.concat({"at the highest test accuracy": best, "at the last epoch": last}, axis=1).sort_index().round(3)


def with_interval(table: pd.DataFrame, column: str, scale: float = 100, sign: str = "+") -> pd.Series:
    """`column`'s mean and 95% confidence interval as text, times `scale` (100: fractions in points)."""
    mean, low, high = (scale * table[f"{column}_{s}"] for s in ("mean", "ci95_low", "ci95_high"))
    form = f"{sign}.{1 if scale == 100 else 3}f"
    return pd.Series([f"{m:{form}} [{lo:{form}}, {hi:{form}}]" for m, lo, hi in zip(mean, low, high)],
                     index=table.index)


def loss_variant(table: pd.DataFrame) -> pd.Series:
    """Each row's loss with its settings, e.g. "gce q=0.7"."""
    return (table["loss"] + " " + table["loss_settings"].fillna("")).str.strip()


def remedy_table(runs: pd.DataFrame, metric: str = "test_accuracy") -> pd.DataFrame:
    """What protects against label noise: each loss minus ce, and early stopping (a validation split's epoch of
    lowest noisy-validation loss) minus the last epoch without a split, paired on the same seeds: the mean
    difference of `metric` (accuracy in points) and its 95% interval, a column per remedy."""
    scale = 100 if metric in UNIT_RANGE else 1
    losses = rs.loss_effects(runs).query("validation_fraction == 0")
    losses = losses.assign(remedy=loss_variant(losses), effect=with_interval(losses, f"minus_ce_{metric}", scale))
    stopped = rs.early_stopping_effects(runs)
    split = (stopped["validation_fraction"].map(" on {:.0%}".format) if stopped["validation_fraction"].nunique() > 1
             else "")
    named = "early stopping" + split + (" (" + loss_variant(stopped) + ")").where(stopped["loss"] != "ce", "")
    stopped = stopped.assign(remedy=named, effect=with_interval(stopped, f"minus_last_epoch_{metric}", scale))
    both = pd.concat([losses, stopped], ignore_index=True)
    if both.empty:
        return pd.DataFrame({"no remedy with its plain twin on the same seeds in these results": []})
    rows = row_fields(both, ("noise_type", "p", "epochs"), exclude=REMEDY_FIELDS)
    return both.pivot(index=rows, columns="remedy", values="effect").fillna("")


def transition_error_table(runs: pd.DataFrame) -> pd.DataFrame:
    """forward_estimated at p > 0: the mean and largest absolute error of its estimated T, and how far its diagonal
    (the share of labels kept) lies above the true one on average, each averaged over seeds."""
    estimated = runs[(runs["loss"] == "forward_estimated") & (runs["status"] == "ok") & (runs["p"] > 0)]
    estimated = estimated.drop_duplicates("run_id")  # the same estimate at every reported length
    if estimated.empty:
        return pd.DataFrame({"no forward_estimated run at p > 0 in these results": []})
    true = [registry.transition_matrix(t, p, json.loads(m) if isinstance(m, str) else None)
            for t, p, m in zip(estimated["noise_type"], estimated["p"], estimated["noise_matrix"])]
    bias = [np.mean(np.diag(json.loads(t_hat)) - np.diag(t))
            for t_hat, t in zip(estimated["estimated_transition"], true)]
    table = estimated.assign(diagonal_bias=bias).groupby(row_fields(estimated, exclude=["epochs"]), dropna=False)
    return table[["transition_error_mean", "transition_error_max", "diagonal_bias"]].mean().rename(columns={
        "transition_error_mean": "T error: mean", "transition_error_max": "T error: largest",
        "diagonal_bias": "diagonal: estimated − true"}).round(3)


def model_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy (points) with its 95% interval at each noise level, a column per model type."""
    frame = uncorrected(summary)
    accuracy = with_interval(frame, "test_accuracy", sign="").rename("accuracy")
    table = pd.concat([frame[NOISE_LEVEL + ["activation"]], accuracy], axis=1)
    datasets = ["dataset"] if frame["dataset"].nunique() > 1 else []
    return table.pivot(index=datasets + NOISE_LEVEL[2:] + ["activation"], columns="model_type", values="accuracy")


def paired_vs_unpaired_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per noise type, the standard error of the paired difference from p = 0 divided by the unpaired one,
    sqrt(se at p ** 2 + se at 0 ** 2): below 1, pairing narrows the interval."""
    table = uncorrected(summary)
    keys = EXPERIMENT[:4] + [f for f in rs.GROUP_FIELDS if f not in EXPERIMENT]
    clean = table[table["p"] == 0][keys + ["test_accuracy_stderr"]]
    noisy = table[table["p"] > 0].merge(clean, on=keys, suffixes=("", "_clean"))
    unpaired = (noisy["test_accuracy_stderr"] ** 2 + noisy["test_accuracy_stderr_clean"] ** 2) ** 0.5
    ratio = (noisy["delta_test_accuracy_stderr"] / unpaired).rename("paired / unpaired standard error")
    return ratio.groupby(noisy["noise_type"]).describe()[["count", "min", "50%", "max"]].round(2)


FIGURES = {  # name: (file, the figure of a results_store.Results, None when its data are absent)
    "accuracy_vs_p": ("fig1_accuracy_vs_p.png", lambda r: plot_metric_vs_p(r.summary, "test_accuracy")),
    "loss_vs_p": ("fig2_loss_vs_p.png", lambda r: plot_metric_vs_p(r.summary, "test_loss")),
    "label_vs_pixel": ("fig3_label_vs_pixel.png", lambda r: plot_label_vs_pixel(r.summary)),
    "learning_curves": ("fig4_learning_curves.png", lambda r: plot_learning_curves(r.curves)),
    "macro_metrics": ("fig5_macro_metrics.png", lambda r: plot_macro_metrics(r.summary)),
    "label_noise_theory": ("fig6_label_noise_theory.png", lambda r: plot_label_noise_theory(r.summary)),
    "calibration": ("fig7_calibration.png", lambda r: plot_calibration(r.summary)),
    "reliability": ("fig8_reliability.png", lambda r: plot_reliability(r.reliability)),
    "memorisation": ("fig9_memorisation.png", lambda r: plot_memorisation(r.curves)),
    "losses": ("fig10_losses.png", lambda r: plot_losses(r.summary, r.runs)),
    "early_stopping": ("fig11_early_stopping.png", lambda r: plot_early_stopping(r.summary)),
    "pixel_test_matching": ("fig12_pixel_test_matching.png", lambda r: plot_pixel_test_matching(r.summary)),
    "paired_differences": ("fig13_paired_differences.png", lambda r: plot_paired_differences(r.summary)),
    "models": ("fig14_models.png", lambda r: plot_models(r.summary)),
}
FIGURE_FILES = {name: file for name, (file, _) in FIGURES.items()}
HEADLINE_FIGURES = ("accuracy_vs_p", "loss_vs_p", "label_vs_pixel")  # drawn at the end of every campaign


def drawn(name: str, results: rs.Results, file: str | None = None) -> list[tuple[str, Figure]]:
    """(file, figure) of figure `name`; where it has too many panels to read, one per value of the varying
    setting with the most values, its file named after it (say so)."""
    file = file or FIGURES[name][0]
    try:
        fig = FIGURES[name][1](results)
    except TooManyPanels as exc:
        fields = [f for f in ["activation", "dataset", "model_type", *OTHER_FIELDS] if results.summary[f].nunique() > 1]
        if not fields:
            raise
        field = max(fields, key=lambda f: results.summary[f].nunique())
        print(f"note: {exc}; drawn once per {field} (or choose a slice: plots.select)")
        stem, values = Path(file).stem, sorted(results.summary[field].dropna().unique(), key=str)
        if field != WIDTHS and results.summary[field].isna().any():  # a CNN is in every slice of widths already
            values.append(None)  # max_train_samples: all samples
        return [item for value in values
                for item in drawn(name, select(results, **{field: value}), f"{stem}__{field}={value}.png")]
    return [] if fig is None else [(file, fig)]


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    return rs.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format=path.suffix.lstrip(".")))


def write_figures(output_dir: str | Path, figures_dir: str | Path | None = None, names=tuple(FIGURES)) -> list[Path]:
    """Draw the figures `names` with data in `output_dir`'s CSVs into `figures_dir` (default: output_dir/figures)."""
    results = rs.read_results(output_dir)
    figures_dir = Path(output_dir) / rs.FIGURES_DIR if figures_dir is None else Path(figures_dir)
    return [save_figure(fig, figures_dir / file) for name in names for file, fig in drawn(name, results)]


def run_interruptibly(coroutine) -> None:
    """Run `coroutine` on an event loop of its own; SIGINT or SIGTERM cancels it, lets its cleanup run (nbclient's:
    the kernel is shut down) and raises KeyboardInterrupt. The loop refuses signal handlers: nbclient would take
    both signals over and end in a traceback."""
    import asyncio

    class SignalsStayHere(asyncio.SelectorEventLoop):
        def add_signal_handler(self, *args):
            raise RuntimeError("plots.py handles the signals")

    loop, interrupted = SignalsStayHere(), []
    main = loop.create_task(coroutine)

    def interrupt(*_) -> None:
        interrupted.append(True)
        loop.call_soon_threadsafe(main.cancel)

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        loop.run_until_complete(main)
    except BaseException:
        if not interrupted:  # else it is how the cancelled coroutine ended
            raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if rest := asyncio.all_tasks(loop):  # nbclient's pollers
            for task in rest:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.close()
    if interrupted:
        raise KeyboardInterrupt


def without_reference_prose(notebook, output_dir: Path):
    """The notebook for a report of `output_dir`: unless that is the reference campaign, the cells tagged
    "reference" (prose about its results) are left out, which one note says where the first was; the figures and
    tables stay."""
    if output_dir.resolve() == REFERENCE_DIR:
        return notebook
    import nbformat
    prose = ["reference" in cell.metadata.get("tags", []) for cell in notebook.cells]
    note = nbformat.v4.new_markdown_cell(f"*This report is of {output_dir}: the prose about the reference "
                                         "campaign's results (results/reference/) is left out; every figure and "
                                         "table below is of this campaign.*")
    notebook.cells = [cell for cell, left_out in zip(notebook.cells, prose) if not left_out]
    if any(prose):
        notebook.cells.insert(prose.index(True), note)
    return notebook


def write_report(output_dir: Path) -> Path:
    """Execute analysis.ipynb on the campaign in `output_dir` and save it as output_dir/report.html."""
    import atexit
    import tempfile

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    notebook = without_reference_prose(nbformat.read(NOTEBOOK, as_version=4), Path(output_dir))
    os.environ["ANALYSIS_RESULTS_DIR"] = str(Path(output_dir).resolve())  # read by the parameters cell
    # the kernel talks over Unix sockets (IPC), not unencrypted TCP; their names start with this absolute path
    sockets = f"{tempfile.gettempdir()}/report-kernel-{os.getpid()}"
    ipc = Config({"KernelManager": {"transport": "ipc", "ip": sockets}})
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, shutdown_kernel="immediate", config=ipc,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        run_interruptibly(client.async_execute())
    except CellExecutionError as exc:
        raise ReportError(f"analysis.ipynb failed on {output_dir}: {exc.ename}: {' '.join(exc.evalue.split())} "
                          "(the figures are drawn; report.html is unchanged)") from None
    except Exception as exc:  # of the kernel: killed or out of memory (at start or later), or a cell past the timeout
        atexit.unregister(client._cleanup_kernel)  # left registered by a kernel that failed to start: it fails at exit
        stopped = f"analysis.ipynb stopped on {output_dir}"
        if isinstance(exc, CellTimeoutError):
            raise ReportError(f"{stopped}: a cell ran for more than {CELL_TIMEOUT} s; report.html is unchanged. For "
                              "a grid this large, choose a slice (SLICE in the notebook's first cell) or raise "
                              "plots.CELL_TIMEOUT") from None
        raise ReportError(f"{stopped}: its kernel stopped ({' '.join(str(exc).split())[:120] or type(exc).__name__}; "
                          "killed, or out of memory?); the figures are drawn and report.html is unchanged: run the "
                          "same command again") from None
    html = HTMLExporter().from_notebook_node(notebook)[0]
    return rs.atomic_write(Path(output_dir) / "report.html", lambda tmp: tmp.write_text(html))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Redraw every figure of a campaign into OUTPUT_DIR/figures/.")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--report", action="store_true",
                        help="also render analysis.ipynb as OUTPUT_DIR/report.html")
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # ends it as Ctrl-C does
        if STARTUP_INTERRUPTS:
            raise KeyboardInterrupt
        rs.plain_warnings()
        args = parser.parse_args(argv)
        runs = rs.read_csv(args.output_dir / rs.PER_RUN_CSV)
        if not (runs["status"] == "ok").any():
            parser.exit(2, f"no finished run in {args.output_dir}/{rs.PER_RUN_CSV} (none has finished yet, or none "
                           "ended ok): nothing to draw or report\n")
        paths = write_figures(args.output_dir)
        if args.report:
            paths.append(write_report(args.output_dir))
        print("\n".join(map(str, paths)), flush=True)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of the list of files has gone (| head)
        rs.silence(sys.stdout)
        return 1
    except (ReportError, rs.BrokenCSVError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and exc.filename is None:  # from results_store: a CSV is missing
            parser.exit(2, f"no results in {args.output_dir}: {exc}\n")
        print(f"error: {exc.filename}: {exc.strerror or exc}. Free some space or fix the permissions, then run the "
              "same command again; the figures and report already there are unchanged.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
