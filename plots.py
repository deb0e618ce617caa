"""Figures and the small amount of data handling they need, for a noise-robustness campaign.

Reads the CSVs that `run_experiments.py` writes (results_per_run.csv, results_summary.csv,
results_history.csv, results_reliability.csv) and draws:

  1. test accuracy vs p         (`plot_metric_vs_p(summary, "test_accuracy")`)
  2. test cross-entropy vs p    (`plot_metric_vs_p(summary, "test_loss")`)
  3. label vs pixel noise       (`plot_label_vs_pixel`)
  4. learning curves            (`plot_learning_curves`)
  5. macro precision/recall/AUC (`plot_macro_metrics`)
  6. label-noise theory         (`plot_label_noise_theory`)
  7. calibration vs p           (`plot_calibration`: test ECE, mean confidence)
  8. reliability diagrams       (`plot_reliability`)
  9. memorisation per epoch     (`plot_memorisation`)
 10. forward loss correction    (`plot_loss_correction`)
 11. early stopping             (`plot_early_stopping`)
 12. pixel noise on the test set (`plot_pixel_test_matching`)

Figures 1-9 show runs trained without loss correction only; figure 10 compares the two.
Figures 7-12 need columns and files that older campaigns did not write: their functions
return None when the data are absent, and `write_figures` skips them. Figures 1-3 also carry
the label-noise theory overlay (information limit, chance level, cross-entropy floor).
`write_headline_figures(output_dir)` writes figures 1 and 2; the campaign runner calls it at
the end of every campaign.

Figures are built as bare `matplotlib.figure.Figure` objects on an Agg canvas, never
through pyplot, so nothing depends on (or changes) the global backend and no figure
lingers in pyplot's registry when the runner calls this in a long-lived process.
The module deliberately does not import torch or nnet_models: plotting stays cheap.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import PIL.Image
from results_store import FIELD_DEFAULTS, GROUP_FIELDS, METRICS, summary_table
from results_store import HISTORY_METRICS as STORED_HISTORY_METRICS
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

NUM_CLASSES = 10  # K; the same for MNIST and Fashion-MNIST
LABEL_NOISE_TYPES = ("label_uniform", "label_flip", "label_pairflip", "label_matrix")
THEORY_NOISE_TYPES = ("label_uniform", "label_flip", "label_pairflip")  # label noise with a closed-form theory
PIXEL_NOISE_TYPES = ("pixel_uniform", "pixel_empirical")
NOISE_TYPES = LABEL_NOISE_TYPES + PIXEL_NOISE_TYPES
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "tanh", "sigmoid")  # column order of figures 1 and 2
NO_CORRECTION, FORWARD_CORRECTION = "none", "forward"  # values of loss_correction

RUNS_CSV = "results_per_run.csv"
SUMMARY_CSV = "results_summary.csv"
HISTORY_CSV = "results_history.csv"
RELIABILITY_CSV = "results_reliability.csv"

# A summary group is one configuration; runs differing only in seed/repeat share it.
GROUP_COLUMNS = tuple(GROUP_FIELDS)
# Group columns that are not on a plot's axes, legend or columns: each distinct
# combination of them gets its own row of subplots. (Loss correction is a filter or a line
# style; a label_matrix noise matrix is part of the noise type, see `with_loss_correction`.)
ROW_COLUMNS = tuple(c for c in GROUP_COLUMNS
                    if c not in ("activation", "noise_type", "p", "loss_correction", "noise_matrix"))
SUMMARY_METRICS = tuple(METRICS)
HISTORY_METRICS = tuple(STORED_HISTORY_METRICS)
MACRO_METRICS = ("test_macro_precision", "test_macro_recall", "test_macro_roc_auc")
LEARNING_CURVE_METRICS = ("test_accuracy", "test_loss")
CALIBRATION_METRICS = ("test_ece", "test_mean_confidence")
MEMORISATION_METRICS = ("memorised_fraction", "corrupted_true_fraction", "clean_train_accuracy")
PAIRED_METRICS = ("test_accuracy", "test_loss")  # rows of figures 10-12

METRIC_LABELS = {
    "test_accuracy": "test accuracy",
    "test_loss": "test cross-entropy (nats)",
    "test_macro_precision": "macro precision",
    "test_macro_recall": "macro recall",
    "test_macro_roc_auc": "macro ROC-AUC",
    "train_loss": "train loss (noisy labels)",
    "seconds": "seconds per run",
    "train_seconds": "seconds per run in training passes",
    "test_ece": "test ECE (15 bins)",
    "test_mean_confidence": "mean max-softmax confidence",
    "memorised_fraction": "corrupted: predicts noisy label",
    "corrupted_true_fraction": "corrupted: predicts true label",
    "clean_train_accuracy": "uncorrupted: train accuracy",
    "bin_accuracy": "accuracy in bin (clean test)",
    "epoch": "epoch (selected: mean)",
}
# Metrics that are fractions: their panels show the whole range 0..1.
FRACTION_METRICS = {"test_accuracy", *MACRO_METRICS, "test_mean_confidence", *MEMORISATION_METRICS, "bin_accuracy"}
NOISE_COLORS = {
    "label_uniform": "tab:blue", "label_flip": "tab:red", "label_pairflip": "tab:purple",
    "label_matrix": "tab:brown", "pixel_uniform": "tab:green", "pixel_empirical": "tab:orange",
}
EXTRA_COLORS = ("tab:pink", "tab:olive", "tab:cyan", "tab:gray")

FIGURE_FILES = {
    "accuracy_vs_p": "fig1_accuracy_vs_p.png",
    "loss_vs_p": "fig2_loss_vs_p.png",
    "label_vs_pixel": "fig3_label_vs_pixel.png",
    "learning_curves": "fig4_learning_curves.png",
    "macro_metrics": "fig5_macro_metrics.png",
    "label_noise_theory": "fig6_label_noise_theory.png",
    "calibration": "fig7_calibration.png",
    "reliability": "fig8_reliability.png",
    "memorisation": "fig9_memorisation.png",
    "loss_correction": "fig10_loss_correction.png",
    "early_stopping": "fig11_early_stopping.png",
    "pixel_test_matching": "fig12_pixel_test_matching.png",
}
HEADLINE_FIGURES = ("accuracy_vs_p", "loss_vs_p")
DPI = 110
PANEL_SIZE = (3.7, 2.8)  # inches per subplot
MIN_WIDTH = 7.5
TITLE_CHARACTERS = 40  # fit on one line above a panel
LEGEND_COLUMN_WIDTH = 2.5  # inches per legend column (entries are up to ~30 characters)
STYLE = {
    "font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9, "legend.fontsize": 8.5,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.titlesize": 11,
    "axes.grid": True, "grid.alpha": 0.3,
}
# gids of reference artists, so callers and tests can find them on an Axes.
GID_CHANCE = "chance"
GID_CHANCE_AUC = "chance_auc"
GID_LN_K = "ln_K"
GID_INFO_LIMIT = "info_limit:{}"
GID_THEORY_FLOOR = "theory_floor:{}"
GID_DIAGONAL = "diagonal"
GID_BIN_SHARE = "bin_share"
P_TOLERANCE = 1e-9
RELIABILITY_LEVELS = 3  # columns (noise levels) of figure 8


# ---------------------------------------------------------------- theory


def information_limit(noise_type: str, num_classes: int = NUM_CLASSES) -> float:
    """Noise level beyond which the noisy label's most likely value is no longer the true class.

    label_uniform: P(noisy | x) = (1-p) P(clean | x) + p/K, slope 1-p, so information
    survives up to p = 1. label_flip: P(noisy | x) = p/(K-1) + (1 - pK/(K-1)) P(clean | x),
    slope zero at p = (K-1)/K (labels independent of the image) and negative beyond (the
    argmax becomes a wrong class). label_pairflip: a class-c image is labelled c with
    probability 1-p and c+1 with probability p, so the argmax flips to c+1 at p = 1/2 (the
    label still tells the pair apart from the other classes). label_matrix: depends on the
    matrix, not drawn.
    """
    limits = {"label_uniform": 1.0, "label_flip": (num_classes - 1) / num_classes, "label_pairflip": 0.5}
    if noise_type not in limits:
        raise ValueError(f"no information limit for {noise_type!r}; noise types with one: {THEORY_NOISE_TYPES}")
    return limits[noise_type]


def theory_loss_floor(noise_type: str, p, num_classes: int = NUM_CLASSES):
    """Clean-label cross-entropy of a model that predicts the noisy-label posterior exactly.

    For a clean example whose class is certain, that model puts probability
    1 - p(K-1)/K (label_uniform) or 1 - p (label_flip, label_pairflip) on the true class.
    For label_uniform and label_flip that is 1/K at the information limit, i.e. a loss of
    ln K; for label_pairflip it is ln 2 there.
    """
    p = np.asarray(p, dtype=float)
    if noise_type == "label_uniform":
        q_true = 1.0 - p * (num_classes - 1) / num_classes
    elif noise_type in ("label_flip", "label_pairflip"):
        q_true = 1.0 - p
    else:
        raise ValueError(f"no theory floor for {noise_type!r}; noise types with one: {THEORY_NOISE_TYPES}")
    with np.errstate(divide="ignore"):
        return -np.log(q_true)


# ---------------------------------------------------------------- loading and summarising


@dataclass
class Results:
    """The CSVs of one output directory. `history` and `reliability` are None when their
    file is absent (reliability: campaigns before calibration was measured)."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    history: pd.DataFrame | None
    reliability: pd.DataFrame | None = None


def _read_csv(path: Path) -> pd.DataFrame | None:
    """The CSV, or None if missing/empty; a half-written last line (sweep running) is skipped.
    Run ids are read as text, so that every file agrees on their type. The frame is
    consolidated (read_csv gives one block per column; with the summary's 100+ columns, every
    column added later would warn that the frame is fragmented)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        return pd.read_csv(path, on_bad_lines="skip", dtype={"run_id": str}).copy()
    except pd.errors.EmptyDataError:
        return None


def with_defaults(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with the group columns that older campaigns did not write, at the value their
    runs had (no loss correction, no validation split, no noise matrix)."""
    return frame.assign(**{k: v for k, v in FIELD_DEFAULTS.items() if k not in frame.columns})


def ok_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Rows of successful runs that have their metrics (no status column: all such rows)."""
    ok = runs["test_accuracy"].notna() if "test_accuracy" in runs.columns else pd.Series(True, index=runs.index)
    if "status" in runs.columns:
        ok &= runs["status"] == "ok"
    return runs[ok]


def _per_run_rows(table: pd.DataFrame | None, good: pd.DataFrame, keys: list[str]) -> pd.DataFrame | None:
    """A long-form table (history, reliability) restricted to the ok runs `good`, without
    duplicated rows (a retried run), and with each run's config columns from the runs file
    that it lacks, so that its figures can split runs the way the summary does."""
    if table is None:
        return None
    if len(good) and "run_id" in good and "run_id" in table:
        table = table[table["run_id"].isin(good["run_id"])]
        config = [c for c in GROUP_COLUMNS if c in good and c not in table]
        if config:
            runs_config = good.drop_duplicates("run_id", keep="last")[["run_id", *config]]
            table = table.merge(runs_config, on="run_id", how="left")
    return with_defaults(table.drop_duplicates(["run_id", "repeat", *keys], keep="last"))


def load_results(output_dir: str | Path) -> Results:
    """Read an output directory, tolerating a campaign that is still running.

    The summary file is used only if it accounts for every ok run in results_per_run.csv;
    otherwise (missing, or written before the latest runs finished) it is recomputed.
    History and reliability rows are restricted to ok runs and de-duplicated, in case a
    retried run left rows from a failed attempt. Columns that older campaigns did not write
    get their default (`with_defaults`).
    """
    output_dir = Path(output_dir)
    runs = _read_csv(output_dir / RUNS_CSV)
    summary = _read_csv(output_dir / SUMMARY_CSV)
    if runs is None:
        runs = pd.DataFrame(columns=["run_id", "repeat", "status", *GROUP_COLUMNS, *SUMMARY_METRICS])
    good = ok_runs(runs)
    stale = summary is None or "n" not in summary or (len(good) and summary["n"].sum() != len(good))
    if stale:
        summary = summary_table(runs)
    return Results(runs=runs, summary=with_defaults(summary),
                   history=_per_run_rows(_read_csv(output_dir / HISTORY_CSV), good, ["epoch"]),
                   reliability=_per_run_rows(_read_csv(output_dir / RELIABILITY_CSV), good, ["bin"]))


def is_label_noise(noise_type: str) -> bool:
    """Whether `noise_type` corrupts labels (a numbered "label_matrix #i" included)."""
    return noise_type.split(" #")[0] in LABEL_NOISE_TYPES


def with_loss_correction(frame: pd.DataFrame, loss_correction: str | None = NO_CORRECTION) -> pd.DataFrame:
    """The rows of `frame` (summary, history or reliability) whose runs were trained with
    `loss_correction` (None: all rows); rows without that column count as uncorrected.

    If the label_matrix runs used several noise matrices, each becomes a noise type of its
    own, "label_matrix #1", "#2", ... (numbered in the order of the matrices' JSON text), so
    that no line mixes them.
    """
    if loss_correction is not None:
        frame = with_defaults(frame)
        frame = frame[frame["loss_correction"].fillna(NO_CORRECTION) == loss_correction]
    if "noise_matrix" not in frame:
        return frame
    is_matrix = frame["noise_type"] == "label_matrix"
    matrices = sorted(frame.loc[is_matrix, "noise_matrix"].dropna().unique())
    if len(matrices) < 2:
        return frame
    number = {matrix: f"label_matrix #{i}" for i, matrix in enumerate(matrices, start=1)}
    return frame.assign(noise_type=frame["noise_type"].mask(is_matrix, frame["noise_matrix"].map(number)))


def pool_groups(summary: pd.DataFrame, by, metrics=SUMMARY_METRICS) -> pd.DataFrame:
    """Average the summary groups that share the values of `by` (e.g. over activations).

    The pooled value is the plain mean of the group means (each activation weighs the same)
    and its standard error is sqrt(sum of the groups' stderr^2) / (number of groups): the
    groups are different experiments, so their spread is not sampling noise and must not
    widen the error bars. Returns `by`, n (runs in all), and M_mean / M_stderr.
    """
    keys = list(by) or ["_all"]
    frame = summary.assign(_all=0)
    grouped = frame.groupby(keys, dropna=False, sort=True)
    columns = {"n": grouped["n"].sum()}
    groups = grouped.size()
    for metric in (m for m in metrics if f"{m}_mean" in frame):
        columns[f"{metric}_mean"] = grouped[f"{metric}_mean"].mean()
        variance_sum = grouped[f"{metric}_stderr"].apply(lambda se: (se**2).sum(min_count=len(se)))
        columns[f"{metric}_stderr"] = np.sqrt(variance_sum) / groups
    pooled = pd.concat(columns, axis=1).reset_index()  # all at once: no fragmented frame
    return pooled.drop(columns="_all") if not by else pooled


def pool_over_activations(summary: pd.DataFrame) -> pd.DataFrame:
    """One group per (row facet, noise type, loss correction, p), all activations together."""
    summary = with_defaults(summary)
    keys = [c for c in (*ROW_COLUMNS, "noise_type", "loss_correction", "p") if c in summary.columns]
    return pool_groups(summary, keys)


def summarize_history(history: pd.DataFrame, by=None) -> pd.DataFrame:
    """Per-epoch mean and stderr over repeats for each activation, then averaged over
    activations like `pool_groups` does; by default one curve per (row facet, noise type,
    loss correction, p). Every history metric present is summarised."""
    by = (*ROW_COLUMNS, "noise_type", "loss_correction", "p") if by is None else by
    keys = [c for c in by if c in history.columns] + ["epoch"]
    metrics = [m for m in HISTORY_METRICS if m in history.columns]
    grouped = history.groupby(keys + ["activation"], dropna=False, sort=True)
    per_activation = grouped.size().rename("n").to_frame()
    for metric in metrics:
        per_activation[f"{metric}_mean"] = grouped[metric].mean()
        per_activation[f"{metric}_stderr"] = grouped[metric].std(ddof=1) / np.sqrt(grouped[metric].count())
    return pool_groups(per_activation.reset_index(), keys, metrics)


def pool_reliability(reliability: pd.DataFrame) -> pd.DataFrame:
    """Reliability-diagram bins pooled over runs (repeats and activations) for every (row
    facet, noise type, loss correction, p, bin): bin accuracy and confidence are averaged
    weighted by the bins' counts, i.e. as if all the runs' test predictions were one set."""
    keys = [c for c in (*ROW_COLUMNS, "noise_type", "loss_correction", "p", "bin") if c in reliability.columns]
    filled = reliability[reliability["count"] > 0]
    weighted = filled.assign(confidence=filled["confidence"] * filled["count"],
                             accuracy=filled["accuracy"] * filled["count"])
    pooled = weighted.groupby(keys, dropna=False, sort=True)[["count", "confidence", "accuracy"]].sum()
    return pooled.assign(confidence=pooled["confidence"] / pooled["count"],
                         accuracy=pooled["accuracy"] / pooled["count"]).reset_index()


def reliability_levels(ps) -> list[float]:
    """The noise levels figure 8 shows for one noise type: all if there are at most
    RELIABILITY_LEVELS, else the smallest (normally p = 0), the largest and the one nearest
    the middle of the range."""
    ps = sorted(set(ps))
    if len(ps) <= RELIABILITY_LEVELS:
        return ps
    middle = min(ps[1:-1], key=lambda p: abs(p - (ps[0] + ps[-1]) / 2))
    return [ps[0], middle, ps[-1]]


def _has_values(frame: pd.DataFrame | None, column: str) -> bool:
    return frame is not None and column in frame.columns and bool(frame[column].notna().any())


def _noise_types_with(frame: pd.DataFrame, column: str) -> list[str]:
    """Noise types (canonical order) with at least one value in `column`."""
    if column not in frame.columns:
        return []
    return ordered_noise_types(frame.loc[frame[column].notna(), "noise_type"])


# ---------------------------------------------------------------- plotting helpers


def noise_color(noise_type: str) -> str:
    """A fixed colour per noise type, so every figure uses the same one."""
    if noise_type in NOISE_COLORS:
        return NOISE_COLORS[noise_type]
    return EXTRA_COLORS[sum(map(ord, noise_type)) % len(EXTRA_COLORS)]


def _canonical_order(values, canonical) -> list[str]:
    """The distinct non-missing `values`: those in `canonical` in its order, then the rest sorted."""
    present = {v for v in values if isinstance(v, str)}
    return [v for v in canonical if v in present] + sorted(present - set(canonical))


def ordered_noise_types(values) -> list[str]:
    return _canonical_order(values, NOISE_TYPES)


@dataclass(frozen=True)
class Variant:
    """How one set of lines is drawn in a panel; figures 10-12 draw two variants side by side.

    Its lines show the runs trained with `loss_correction`, metric column `prefix + metric`
    ("" = final epoch on clean test images, "selected_" = epoch picked on the validation
    split, "noisy_" = test images with the training pixel noise), in `linestyle`.
    """

    label: str = ""
    linestyle: str = "-"
    prefix: str = ""
    loss_correction: str = NO_CORRECTION


PLAIN = (Variant(),)
CORRECTION_VARIANTS = (Variant("no correction"),
                       Variant("forward correction", "--", loss_correction=FORWARD_CORRECTION))
EARLY_STOPPING_VARIANTS = (Variant("final epoch"),
                           Variant("epoch of lowest noisy-validation loss", "--", prefix="selected_"))
PIXEL_TEST_VARIANTS = (Variant("clean test images"),
                       Variant("test images with the same pixel noise", "--", prefix="noisy_"))


def _row_facets(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Split `frame` by the row columns present, labelled "dataset · model_type" plus
    "column=value" for any other row column that varies within a dataset/model pair."""
    keys = [c for c in ROW_COLUMNS if c in frame.columns]
    if not keys or frame.empty:
        return [("all runs", frame)]
    base, others = keys[:2], keys[2:]
    within = frame.groupby(base, dropna=False)
    varying = [k for k in others if within[k].nunique(dropna=False).max() > 1]
    facets = []
    for values, part in frame.groupby(keys, dropna=False, sort=True):
        value_of = dict(zip(keys, values))
        label = " · ".join([*(str(value_of[k]) for k in base), *(f"{k}={value_of[k]}" for k in varying)])
        facets.append((label, part))
    return facets


def _facet_labels(frame: pd.DataFrame) -> pd.Series:
    """The row-facet label of every row of `frame`."""
    labels = [pd.Series(label, index=part.index) for label, part in _row_facets(frame)]
    return pd.concat(labels).reindex(frame.index)


def _title(text: str, frame: pd.DataFrame) -> str:
    """A figure title; says so when `frame` had loss-corrected runs that the figure leaves out."""
    corrected = "loss_correction" in frame and (frame["loss_correction"].fillna(NO_CORRECTION) != NO_CORRECTION).any()
    return f"{text}\nruns without loss correction (forward correction: figure 10)" if corrected else text


def _new_figure(n_rows: int, n_cols: int, title: str, extra_width: float = 0.0, extra_height: float = 1.2):
    """A constrained-layout Agg figure with an (n_rows, n_cols) grid of axes.

    The extra space is for the figure legend (below) or a colorbar (right); the figure is
    at least MIN_WIDTH wide so that a legend fits under a single column of panels.
    """
    width, height = PANEL_SIZE
    fig = Figure(figsize=(max(n_cols * width + extra_width, MIN_WIDTH),
                          n_rows * height + extra_height + 0.2 + 0.2 * (title.count("\n") + 1)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    fig.suptitle(title)
    return fig, axes


def _blank(ax, text: str = "no runs") -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.5")


def _label_axes(ax, metric: str, title: str, xlabel: str = "noise level p") -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    if len(title) > TITLE_CHARACTERS:  # too wide for one panel: move the last part to a 2nd line
        head, separator, tail = title.rpartition(" · ")
        title = f"{head}\n{tail}" if separator else title
    ax.set_title(title)
    if metric in FRACTION_METRICS:
        ax.set_ylim(-0.02, 1.02)
    if metric == "epoch":  # from epoch 1 to the last one drawn, integer ticks
        ax.set_ylim(0.5, np.ceil(ax.dataLim.y1) + 0.5)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _errorbar_lines(ax, frame: pd.DataFrame, metric: str, by: str, color_of, variant: Variant = PLAIN[0]) -> None:
    """One line per value of `by`: mean of `variant.prefix + metric` vs p with standard-error
    bars (none where n = 1), in the variant's line style; points without a value are left out."""
    column = f"{variant.prefix}{metric}"
    values = ordered_noise_types(frame[by]) if by == "noise_type" else list(dict.fromkeys(frame[by]))
    for value in values:
        part = frame[(frame[by] == value) & frame[f"{column}_mean"].notna()].sort_values("p")
        if part.empty:
            continue
        ax.errorbar(part["p"], part[f"{column}_mean"], yerr=part[f"{column}_stderr"],
                    color=color_of(value), label=f"{value}, {variant.label}" if variant.label else str(value),
                    linestyle=variant.linestyle, marker="o", markersize=3.5, capsize=2.5, linewidth=1.4, elinewidth=1)


def _theory_overlay(ax, metric: str, frame: pd.DataFrame, always_show_limits: bool = False,
                    color: str | None = None) -> None:
    """Label-noise reference lines for the data in `frame` (each artist has a gid, see GID_*).

    Accuracy: chance level 1/K. Both metrics: a dotted vertical line at each label noise
    type's information limit, if the measured p range reaches it (or always_show_limits).
    Loss: ln K (the loss of a uniform guess), and the theory floor -ln P(true class) as a
    dashed curve over the p range measured for that noise type. Noise types without a
    closed-form theory (label_matrix, pixel noise) get no limit or floor. Limits and floors
    are drawn in `color`, or in each noise type's colour if None.
    """
    noise_types = ordered_noise_types(frame["noise_type"])
    if metric == "test_accuracy":
        ax.axhline(1 / NUM_CLASSES, color="0.4", linewidth=0.9, gid=GID_CHANCE)
    if not any(map(is_label_noise, noise_types)) or metric not in ("test_accuracy", "test_loss"):
        return
    if metric == "test_loss":
        ax.axhline(np.log(NUM_CLASSES), color="0.4", linewidth=0.9, linestyle="-.", gid=GID_LN_K)
    for noise_type in (t for t in noise_types if t in THEORY_NOISE_TYPES):
        line_color = color or noise_color(noise_type)
        limit, p_max = information_limit(noise_type), _p_max(frame[frame["noise_type"] == noise_type])
        if always_show_limits or limit <= p_max + P_TOLERANCE:
            ax.axvline(limit, color=line_color, linestyle=":", linewidth=1.3, gid=GID_INFO_LIMIT.format(noise_type))
        if metric == "test_loss":
            grid = np.linspace(0.0, min(p_max, 0.99), 200)  # the flip floors diverge at p = 1
            ax.plot(grid, theory_loss_floor(noise_type, grid), color=line_color, linestyle="--",
                    linewidth=1.2, gid=GID_THEORY_FLOOR.format(noise_type))


def _reference_handles(fig) -> list[Line2D]:
    """Legend proxies for the kinds of reference line actually drawn on `fig` (found by gid)."""
    drawn = {line.get_gid() for ax in fig.axes for line in ax.lines if line.get_gid()}
    kinds = {gid.split(":")[0] for gid in drawn}
    limits = ", ".join(f"{t.removeprefix('label_')} {information_limit(t):g}" for t in THEORY_NOISE_TYPES
                       if GID_INFO_LIMIT.format(t) in drawn)
    proxies = {
        GID_CHANCE: dict(color="0.4", linewidth=0.9, label="chance 1/K"),
        GID_CHANCE_AUC: dict(color="0.4", linewidth=0.9, label="chance (ROC-AUC 0.5)"),
        GID_THEORY_FLOOR.split(":")[0]: dict(color="0.3", linestyle="--",
                                             label="theory floor −ln P̃(true class)\n(model = noisy-label posterior)"),
        GID_LN_K: dict(color="0.4", linestyle="-.", label="ln K (uniform guess)"),
        GID_INFO_LIMIT.split(":")[0]: dict(color="0.3", linestyle=":", label=f"information limit\n({limits})"),
    }
    return [Line2D([], [], **style) for gid, style in proxies.items() if gid in kinds]


def _figure_legend(fig, handles: list, title: str) -> None:
    """One legend for the whole figure, below the panels, in as many columns as fit."""
    ncols = min(len(handles), max(1, int(fig.get_figwidth() / LEGEND_COLUMN_WIDTH)))
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, title=title)


def _noise_legend(fig, noise_types, variants=PLAIN) -> None:
    """Noise types by colour, then (if there are several) the variants by line style, then
    the reference lines drawn."""
    handles = [Line2D([], [], color=noise_color(t), marker="o", markersize=3.5, label=t) for t in noise_types]
    title = "noise type"
    if len(variants) > 1:
        handles += [Line2D([], [], color="0.2", linestyle=v.linestyle, marker="o", markersize=3.5, label=v.label)
                    for v in variants]
        title = "noise type (colour) and line style"
    _figure_legend(fig, handles + _reference_handles(fig), title)


def _p_max(frame: pd.DataFrame) -> float:
    return float(frame["p"].max()) if len(frame) else 0.0


def _panel_grid_figure(pooled: pd.DataFrame, panels: list[list[tuple[str, str, list]]], title: str,
                       variants=PLAIN, theory_color: str | None = None) -> Figure:
    """The same grid of panels for every row facet of `pooled`, facets stacked vertically.

    `panels[r][c]` is (metric, panel title, noise types to draw). Each panel draws one
    error-bar line per noise type and variant (`Variant`), plus the theory overlay (in the
    noise types' colours, or `theory_color`); panels of one facet row that show the same metric share
    their y axis, so they can be compared side by side. Shared by figures 3, 5, 7 and 10-12,
    which differ only in their panel and variant lists.
    """
    facets = _row_facets(pooled)
    n_rows, n_cols = len(panels), len(panels[0])
    fig, axes = _new_figure(len(facets) * n_rows, n_cols, title)
    for facet_index, (facet_label, part) in enumerate(facets):
        for panel_row, row_panels in enumerate(panels):
            row = facet_index * n_rows + panel_row
            first_of_metric = {}
            for col, (metric, panel_title, noise_types) in enumerate(row_panels):
                ax, subset = axes[row, col], part[part["noise_type"].isin(noise_types)]
                layers = [(v, subset[subset["loss_correction"] == v.loss_correction]) for v in variants]
                layers = [(v, rows) for v, rows in layers if _has_values(rows, f"{v.prefix}{metric}_mean")]
                if not layers:
                    _blank(ax)
                    continue
                if metric in first_of_metric:
                    ax.sharey(first_of_metric[metric])
                first_of_metric.setdefault(metric, ax)
                for variant, rows in layers:
                    _errorbar_lines(ax, rows, metric, "noise_type", noise_color, variant)
                _theory_overlay(ax, metric, pd.concat([rows for _, rows in layers]), color=theory_color)
                if metric == "test_macro_roc_auc":
                    ax.axhline(0.5, color="0.4", linewidth=0.9, gid=GID_CHANCE_AUC)
                _label_axes(ax, metric, f"{facet_label} · {panel_title}")
    _noise_legend(fig, ordered_noise_types([t for row in panels for _, _, types in row for t in types]), variants)
    return fig


def _paired_figure(pooled: pd.DataFrame, noise_types: list[str], variants, title: str,
                   metrics=PAIRED_METRICS) -> Figure:
    """Figures 10-12: a column per noise type, a row per metric (accuracy, cross-entropy),
    each panel comparing the variants (solid vs dashed, with markers) with grey theory lines.
    A variant without a `prefix + metric` column is left out of that row."""
    panels = [[(metric, noise_type, [noise_type]) for noise_type in noise_types] for metric in metrics]
    return _panel_grid_figure(pooled, panels, title, variants, theory_color="0.45")


def _curves_figure(curves: pd.DataFrame, metrics, title: str) -> Figure:
    """Per-epoch curves (see `summarize_history`): one row per noise type, a column per metric
    for each dataset/model facet, one line per p (viridis colour bar) with a shaded stderr."""
    noise_types = ordered_noise_types(curves["noise_type"])
    facets = _row_facets(curves)
    fig, axes = _new_figure(len(noise_types), len(metrics) * len(facets), title, extra_width=1.0, extra_height=0.0)
    norm = Normalize(vmin=float(curves["p"].min()), vmax=max(float(curves["p"].max()), float(curves["p"].min()) + 1e-9))
    cmap = matplotlib.colormaps["viridis"]
    for row, noise_type in enumerate(noise_types):
        for facet_index, (facet_label, part) in enumerate(facets):
            subset = part[part["noise_type"] == noise_type]
            for offset, metric in enumerate(metrics):
                ax = axes[row, len(metrics) * facet_index + offset]
                if not _has_values(subset, f"{metric}_mean"):
                    _blank(ax)
                    continue
                _shaded_lines(ax, subset, metric, lambda p: cmap(norm(p)))
                _label_axes(ax, metric, f"{facet_label} · {noise_type}", xlabel="epoch")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="noise level p", shrink=0.6)
    return fig


def _shaded_lines(ax, curves: pd.DataFrame, metric: str, color_of) -> None:
    """One line per p over epochs, with a band of ± one standard error; a p whose metric is
    undefined (e.g. memorisation at p = 0, nothing corrupted) gets no line."""
    for p, part in curves.groupby("p", sort=True):
        part = part[part[f"{metric}_mean"].notna()].sort_values("epoch")
        if part.empty:
            continue
        mean, stderr = part[f"{metric}_mean"], part[f"{metric}_stderr"].fillna(0.0)
        ax.plot(part["epoch"], mean, color=color_of(p), linewidth=1.3, marker="o", markersize=3, label=f"p={p:g}")
        ax.fill_between(part["epoch"], mean - stderr, mean + stderr, color=color_of(p), alpha=0.2, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _reliability_panel(ax, bins: pd.DataFrame, n_bins: int, color: str) -> None:
    """One reliability diagram: the share of test images per confidence bin (grey bars), the
    diagonal of perfect calibration, and accuracy vs mean confidence of the non-empty bins,
    with the ECE of these pooled bins."""
    bins = bins.sort_values("bin")
    share = bins["count"] / bins["count"].sum()
    ax.bar((bins["bin"] + 0.5) / n_bins, share, width=0.9 / n_bins, color="0.82", gid=GID_BIN_SHARE)
    ax.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=0.9, gid=GID_DIAGONAL)
    ax.plot(bins["confidence"], bins["accuracy"], color=color, marker="o", markersize=3.5, linewidth=1.4)
    ece = float((share * (bins["accuracy"] - bins["confidence"]).abs()).sum())
    ax.text(0.97, 0.04, f"pooled ECE {ece:.3f}", transform=ax.transAxes, ha="right", va="bottom",
            bbox=dict(facecolor="white", edgecolor="0.7", alpha=0.85, boxstyle="round,pad=0.25"))
    ax.set_xlim(0, 1)


# ---------------------------------------------------------------- figures


@matplotlib.rc_context(STYLE)
def plot_metric_vs_p(summary: pd.DataFrame, metric: str = "test_accuracy") -> Figure:
    """Figures 1 and 2: rows = dataset/model (and any other varying config), columns =
    activations; mean `metric` vs p with stderr bars, one line per noise type (runs without
    loss correction)."""
    title = _title(f"{METRIC_LABELS.get(metric, metric)} vs noise level (mean ± standard error over repeats)", summary)
    summary = with_loss_correction(summary)
    facets = _row_facets(summary)
    activations = _canonical_order(summary["activation"], ACTIVATIONS)
    fig, axes = _new_figure(len(facets), max(len(activations), 1), title)
    for row, (facet_label, part) in enumerate(facets):
        for col, activation in enumerate(activations):
            ax, subset = axes[row, col], part[part["activation"] == activation]
            if subset.empty:
                _blank(ax)
                continue
            _errorbar_lines(ax, subset, metric, "noise_type", noise_color)
            _theory_overlay(ax, metric, subset)
            _label_axes(ax, metric, f"{facet_label} · {activation}")
    _noise_legend(fig, ordered_noise_types(summary["noise_type"]))
    return fig


@matplotlib.rc_context(STYLE)
def plot_label_vs_pixel(summary: pd.DataFrame) -> Figure:
    """Figure 3: label noise and pixel noise in adjacent columns (shared y), accuracy in
    one row and cross-entropy in the next; pooled over activations (stderr over all runs)."""
    title = _title("Label noise vs pixel noise (pooled over activations)", summary)
    pooled = pool_over_activations(with_loss_correction(summary))
    present = ordered_noise_types(pooled["noise_type"])
    families = [("label noise", [t for t in present if is_label_noise(t)]),
                ("pixel noise", [t for t in present if t in PIXEL_NOISE_TYPES])]
    families.append(("other noise", [t for t in present if not any(t in types for _, types in families)]))
    families = [(name, types) for name, types in families if types]
    panels = [[(metric, family, types) for family, types in families] for metric in ("test_accuracy", "test_loss")]
    return _panel_grid_figure(pooled, panels, title)


@matplotlib.rc_context(STYLE)
def plot_macro_metrics(summary: pd.DataFrame) -> Figure:
    """Figure 5: macro precision, recall and ROC-AUC vs p, pooled over activations."""
    title = _title("Macro metrics vs noise level (pooled over activations)", summary)
    pooled = pool_over_activations(with_loss_correction(summary))
    noise_types = ordered_noise_types(pooled["noise_type"])
    panels = [[(m, METRIC_LABELS[m], noise_types) for m in MACRO_METRICS if f"{m}_mean" in pooled]]
    return _panel_grid_figure(pooled, panels, title)


@matplotlib.rc_context(STYLE)
def plot_label_noise_theory(summary: pd.DataFrame) -> Figure:
    """Figure 6: measured label-noise curves against theory, one column per label noise type
    that has a closed-form theory (not label_matrix).

    One line per dataset/model (pooled over activations); black reference lines: the
    information limit, chance 1/K, ln K and the cross-entropy floor -ln P(true class).
    """
    title = _title(f"Label noise: measurements vs theory (K = {NUM_CLASSES})", summary)
    pooled = pool_over_activations(with_loss_correction(summary))
    label_types = [t for t in THEORY_NOISE_TYPES if t in set(pooled["noise_type"])]
    fig, axes = _new_figure(2, max(len(label_types), 1), title)
    if not label_types:
        for ax in axes.ravel():
            _blank(ax, "no label-noise runs")
        return fig
    pooled = pooled.assign(facet=_facet_labels(pooled))
    facet_labels = list(dict.fromkeys(pooled["facet"]))
    color_of = {label: f"C{i}" for i, label in enumerate(facet_labels)}.get
    for col, noise_type in enumerate(label_types):
        subset = pooled[pooled["noise_type"] == noise_type]
        for row, metric in enumerate(("test_accuracy", "test_loss")):
            ax = axes[row, col]
            _errorbar_lines(ax, subset, metric, "facet", color_of)
            _theory_overlay(ax, metric, subset, always_show_limits=True, color="black")
            _label_axes(ax, metric, noise_type)
    handles = [Line2D([], [], color=color_of(label), marker="o", markersize=3.5, label=label)
               for label in facet_labels]
    handles += _reference_handles(fig)
    _figure_legend(fig, handles, "measured, pooled over activations (lines) and theory (black)")
    return fig


@matplotlib.rc_context(STYLE)
def plot_learning_curves(history: pd.DataFrame | None) -> Figure | None:
    """Figure 4: test accuracy and loss per epoch, one line per p (viridis), one row per
    noise type, a column pair per dataset/model; mean over runs (repeats and activations)
    with a shaded standard error. None without history rows."""
    data = None if history is None else with_loss_correction(history)
    if data is None or data.empty:
        return None
    title = _title("Learning curves on the clean test set (mean ± standard error over runs)", history)
    return _curves_figure(summarize_history(data), LEARNING_CURVE_METRICS, title)


@matplotlib.rc_context(STYLE)
def plot_calibration(summary: pd.DataFrame) -> Figure | None:
    """Figure 7: test ECE and mean max-softmax confidence vs p, one line per noise type,
    pooled over activations. None if the summary has no ECE (older campaigns)."""
    pooled = pool_over_activations(with_loss_correction(summary))
    noise_types = _noise_types_with(pooled, "test_ece_mean")
    if not noise_types:
        return None
    panels = [[(metric, METRIC_LABELS[metric], noise_types) for metric in CALIBRATION_METRICS]]
    return _panel_grid_figure(pooled, panels, _title("Calibration on the clean test set (pooled over activations)",
                                                     summary))


@matplotlib.rc_context(STYLE)
def plot_reliability(reliability: pd.DataFrame | None) -> Figure | None:
    """Figure 8: reliability diagrams of the final models on the clean test set, one row per
    label noise type (and dataset/model), with its noise levels `reliability_levels` from left
    to right; bins pooled over runs weighted by their counts. None without reliability data."""
    if reliability is None:
        return None
    data = with_loss_correction(reliability)
    data = data[data["noise_type"].map(is_label_noise) & (data["count"] > 0)]
    if data.empty:
        return None
    pooled, n_bins = pool_reliability(data), int(reliability["bin"].max()) + 1
    rows = [(f"{facet_label} · {noise_type}", noise_type, part[part["noise_type"] == noise_type])
            for facet_label, part in _row_facets(pooled) for noise_type in ordered_noise_types(part["noise_type"])]
    levels = [reliability_levels(part["p"]) for _, _, part in rows]
    fig, axes = _new_figure(len(rows), max(map(len, levels)), _title(
        "Reliability diagrams on the clean test set (final models, bins pooled over runs)", reliability))
    for row, (row_label, noise_type, part) in enumerate(rows):
        for col, ax in enumerate(axes[row]):
            if col >= len(levels[row]):
                _blank(ax, "")
                continue
            p = levels[row][col]
            _reliability_panel(ax, part[part["p"] == p], n_bins, noise_color(noise_type))
            _label_axes(ax, "bin_accuracy", f"{row_label} · p = {p:g}", xlabel="confidence (max softmax)")
    handles = [Line2D([], [], color=noise_color(t), marker="o", markersize=3.5, label=t)
               for t in ordered_noise_types(pooled["noise_type"])]
    handles += [Line2D([], [], color="0.4", linestyle="--", linewidth=0.9, label="perfect calibration"),
                Patch(color="0.82", label="share of test images in the bin")]
    _figure_legend(fig, handles, "accuracy vs mean confidence per bin (15 equal-width bins)")
    return fig


@matplotlib.rc_context(STYLE)
def plot_memorisation(history: pd.DataFrame | None) -> Figure | None:
    """Figure 9: per epoch, for label noise, the fractions of corrupted training examples
    predicted as their noisy label (memorised) and as their true label, and the accuracy on
    the uncorrupted ones; one line per p, mean over runs with shaded stderr. None without
    these history columns (older campaigns, or no label noise)."""
    if history is None:
        return None
    data = with_loss_correction(history)
    data = data[data["noise_type"].map(is_label_noise)]
    if not _has_values(data, "memorised_fraction"):
        return None
    return _curves_figure(summarize_history(data), MEMORISATION_METRICS, _title(
        "Memorisation of noisy training labels (training examples, mean ± standard error over runs)", history))


@matplotlib.rc_context(STYLE)
def plot_loss_correction(summary: pd.DataFrame) -> Figure | None:
    """Figure 10: test accuracy and cross-entropy vs p without (solid) and with (dashed)
    forward loss correction, a column per label noise type that has both; pooled over
    activations. None if no noise type has both."""
    pooled = pool_over_activations(with_loss_correction(summary, None))
    by_correction = {c: set(_noise_types_with(pooled[pooled["loss_correction"] == c], "test_accuracy_mean"))
                     for c in (NO_CORRECTION, FORWARD_CORRECTION)}
    noise_types = [t for t in ordered_noise_types(pooled["noise_type"])
                   if t in by_correction[NO_CORRECTION] & by_correction[FORWARD_CORRECTION]]
    if not noise_types:
        return None
    return _paired_figure(pooled, noise_types, CORRECTION_VARIANTS,
                          "Forward loss correction (pooled over activations, mean ± standard error)")


@matplotlib.rc_context(STYLE)
def plot_early_stopping(summary: pd.DataFrame) -> Figure | None:
    """Figure 11: test accuracy and cross-entropy vs p of the final epoch (solid) and of the
    epoch with the lowest loss on the held-out noisy validation split (dashed), and (third
    row) which epoch that was. None without a validation split."""
    pooled = pool_over_activations(with_loss_correction(summary))
    noise_types = _noise_types_with(pooled, "selected_test_accuracy_mean")
    if not noise_types:
        return None
    return _paired_figure(pooled, noise_types, EARLY_STOPPING_VARIANTS,
                          _title("Early stopping on a noisy validation split (pooled over activations)", summary),
                          metrics=(*PAIRED_METRICS, "epoch"))  # "selected_epoch": the epoch picked


@matplotlib.rc_context(STYLE)
def plot_pixel_test_matching(summary: pd.DataFrame) -> Figure | None:
    """Figure 12: pixel-noise runs tested on clean test images (solid) and on test images
    carrying the same pixel noise as training (dashed). None without noisy-test metrics."""
    pooled = pool_over_activations(with_loss_correction(summary))
    noise_types = _noise_types_with(pooled, "noisy_test_accuracy_mean")
    if not noise_types:
        return None
    return _paired_figure(pooled, noise_types, PIXEL_TEST_VARIANTS,
                          "Pixel noise: clean vs equally noisy test images (pooled over activations)")


# ---------------------------------------------------------------- files


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG (creating folders) and return the path.

    The image is reduced to a 256-colour palette (no dithering, so lines stay crisp): a
    plot has few distinct colours, and this keeps even large grids of panels under ~200 KB.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    image = PIL.Image.open(buffer).convert("RGB")
    image.quantize(colors=256, method=PIL.Image.Quantize.FASTOCTREE, dither=PIL.Image.Dither.NONE).save(
        path, format="png", optimize=True)
    return path


def build_figure(name: str, results: Results) -> Figure | None:
    """The figure called `name` (a key of FIGURE_FILES), or None when the data for it are absent."""
    summary = results.summary
    from_history = {"learning_curves": plot_learning_curves, "memorisation": plot_memorisation}
    if name in from_history:
        return from_history[name](results.history)
    if name == "reliability":
        return plot_reliability(results.reliability)
    if summary is None or summary.empty:
        return None
    always = {  # figures 1-3, 5, 6: drawn whenever there are uncorrected runs
        "accuracy_vs_p": lambda: plot_metric_vs_p(summary, "test_accuracy"),
        "loss_vs_p": lambda: plot_metric_vs_p(summary, "test_loss"),
        "label_vs_pixel": lambda: plot_label_vs_pixel(summary),
        "macro_metrics": lambda: plot_macro_metrics(summary),
        "label_noise_theory": lambda: plot_label_noise_theory(summary),
    }
    if name in always:
        return always[name]() if not with_loss_correction(summary).empty else None
    builders = {  # figures 7, 10-12: None when their columns are absent
        "calibration": plot_calibration, "loss_correction": plot_loss_correction,
        "early_stopping": plot_early_stopping, "pixel_test_matching": plot_pixel_test_matching,
    }
    return builders[name](summary)


def write_figures(output_dir: str | Path, names=tuple(FIGURE_FILES), figures_dir: str | Path | None = None) -> list[Path]:
    """Build and save the named figures from the CSVs in `output_dir`; returns the paths written.

    Figures whose data are missing (no ok runs yet, no history file, columns that an older
    campaign did not write) are skipped.
    """
    results = load_results(output_dir)
    figures_dir = Path(figures_dir) if figures_dir is not None else Path(output_dir) / "figures"
    written = []
    for name in names:
        fig = build_figure(name, results)
        if fig is not None:
            written.append(save_figure(fig, figures_dir / FIGURE_FILES[name]))
    return written


def write_headline_figures(output_dir: str | Path) -> list[Path]:
    """Figures 1 and 2 (accuracy and cross-entropy vs p) into output_dir/figures/.

    Called by the campaign runner at the end of a campaign; returns the paths written
    (empty if there are no successful runs yet).
    """
    return write_figures(output_dir, HEADLINE_FIGURES)
