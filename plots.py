"""Figures and the small amount of data handling they need, for a noise-robustness campaign.

Reads the three CSVs that `run_experiments.py` writes (results_per_run.csv,
results_summary.csv, results_history.csv) and draws:

  1. test accuracy vs p         (`plot_metric_vs_p(summary, "test_accuracy")`)
  2. test cross-entropy vs p    (`plot_metric_vs_p(summary, "test_loss")`)
  3. label vs pixel noise       (`plot_label_vs_pixel`)
  4. learning curves            (`plot_learning_curves`)
  5. macro precision/recall/AUC (`plot_macro_metrics`)
  6. label-noise theory         (`plot_label_noise_theory`)

Figures 1-3 also carry the label-noise theory overlay (information limit, chance level,
cross-entropy floor). `write_headline_figures(output_dir)` writes figures 1 and 2; the
campaign runner calls it at the end of every campaign.

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
from results_store import summary_table
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

NUM_CLASSES = 10  # K; the same for MNIST and Fashion-MNIST
LABEL_NOISE_TYPES = ("label_uniform", "label_flip")
PIXEL_NOISE_TYPES = ("pixel_uniform", "pixel_empirical")
NOISE_TYPES = LABEL_NOISE_TYPES + PIXEL_NOISE_TYPES
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "tanh", "sigmoid")  # column order of figures 1 and 2

RUNS_CSV = "results_per_run.csv"
SUMMARY_CSV = "results_summary.csv"
HISTORY_CSV = "results_history.csv"

# A summary group is one configuration; runs differing only in seed/repeat share it.
GROUP_COLUMNS = (
    "dataset", "model_type", "activation", "hidden_sizes", "noise_type", "p", "epochs",
    "batch_size", "optimizer", "learning_rate", "weight_decay", "normalize",
    "max_train_samples", "use_cuda",
)
# Group columns that are not on a plot's axes, legend or columns: each distinct
# combination of them gets its own row of subplots.
ROW_COLUMNS = tuple(c for c in GROUP_COLUMNS if c not in ("activation", "noise_type", "p"))
SUMMARY_METRICS = (
    "test_accuracy", "test_loss", "test_macro_precision", "test_macro_recall",
    "test_macro_roc_auc", "train_loss", "seconds",
)
HISTORY_METRICS = ("test_accuracy", "test_loss")
MACRO_METRICS = ("test_macro_precision", "test_macro_recall", "test_macro_roc_auc")

METRIC_LABELS = {
    "test_accuracy": "test accuracy",
    "test_loss": "test cross-entropy (nats)",
    "test_macro_precision": "macro precision",
    "test_macro_recall": "macro recall",
    "test_macro_roc_auc": "macro ROC-AUC",
    "train_loss": "train loss (noisy labels)",
    "seconds": "seconds per run",
}
NOISE_COLORS = {
    "label_uniform": "tab:blue", "label_flip": "tab:red",
    "pixel_uniform": "tab:green", "pixel_empirical": "tab:orange",
}
EXTRA_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")

FIGURE_FILES = {
    "accuracy_vs_p": "fig1_accuracy_vs_p.png",
    "loss_vs_p": "fig2_loss_vs_p.png",
    "label_vs_pixel": "fig3_label_vs_pixel.png",
    "learning_curves": "fig4_learning_curves.png",
    "macro_metrics": "fig5_macro_metrics.png",
    "label_noise_theory": "fig6_label_noise_theory.png",
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
P_TOLERANCE = 1e-9


# ---------------------------------------------------------------- theory


def information_limit(noise_type: str, num_classes: int = NUM_CLASSES) -> float:
    """Noise level at which noisy labels become independent of the image.

    label_uniform: P(noisy | x) = (1-p) P(clean | x) + p/K, slope 1-p, so information
    survives up to p = 1. label_flip: P(noisy | x) = p/(K-1) + (1 - pK/(K-1)) P(clean | x),
    slope zero at p = (K-1)/K and negative beyond (the argmax becomes a wrong class).
    """
    if noise_type == "label_uniform":
        return 1.0
    if noise_type == "label_flip":
        return (num_classes - 1) / num_classes
    raise ValueError(f"no information limit for {noise_type!r}; label noise types: {LABEL_NOISE_TYPES}")


def theory_loss_floor(noise_type: str, p, num_classes: int = NUM_CLASSES):
    """Clean-label cross-entropy of a model that predicts the noisy-label posterior exactly.

    For a clean example whose class is certain, that model puts probability
    1 - p(K-1)/K (label_uniform) or 1 - p (label_flip) on the true class.
    Both equal 1/K at the information limit, i.e. a loss of ln K.
    """
    p = np.asarray(p, dtype=float)
    if noise_type == "label_uniform":
        q_true = 1.0 - p * (num_classes - 1) / num_classes
    elif noise_type == "label_flip":
        q_true = 1.0 - p
    else:
        raise ValueError(f"no theory floor for {noise_type!r}; label noise types: {LABEL_NOISE_TYPES}")
    with np.errstate(divide="ignore"):
        return -np.log(q_true)


# ---------------------------------------------------------------- loading and summarising


@dataclass
class Results:
    """The CSVs of one output directory. `history` is None when that file is absent."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    history: pd.DataFrame | None


def _read_csv(path: Path) -> pd.DataFrame | None:
    """The CSV, or None if missing/empty; a half-written last line (sweep running) is skipped."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        return pd.read_csv(path, on_bad_lines="skip")
    except pd.errors.EmptyDataError:
        return None


def ok_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Rows of successful runs that have their metrics (no status column: all such rows)."""
    ok = runs["test_accuracy"].notna() if "test_accuracy" in runs.columns else pd.Series(True, index=runs.index)
    if "status" in runs.columns:
        ok &= runs["status"] == "ok"
    return runs[ok]


def load_results(output_dir: str | Path) -> Results:
    """Read an output directory, tolerating a campaign that is still running.

    The summary file is used only if it accounts for every ok run in results_per_run.csv;
    otherwise (missing, or written before the latest runs finished) it is recomputed.
    History rows are restricted to ok runs and de-duplicated, in case a retried run
    left rows from a failed attempt.
    """
    output_dir = Path(output_dir)
    runs = _read_csv(output_dir / RUNS_CSV)
    summary = _read_csv(output_dir / SUMMARY_CSV)
    history = _read_csv(output_dir / HISTORY_CSV)
    if runs is None:
        runs = pd.DataFrame(columns=["run_id", "repeat", "status", *GROUP_COLUMNS, *SUMMARY_METRICS])
    good = ok_runs(runs)
    stale = summary is None or "n" not in summary or (len(good) and summary["n"].sum() != len(good))
    if stale:
        summary = summary_table(runs)
    if history is not None:
        if len(good) and "run_id" in good:
            history = history[history["run_id"].isin(good["run_id"])]
        history = history.drop_duplicates(["run_id", "repeat", "epoch"], keep="last")
    return Results(runs=runs, summary=summary, history=history)


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
    pooled = grouped["n"].sum().to_frame()
    groups = grouped.size()
    for metric in (m for m in metrics if f"{m}_mean" in frame):
        pooled[f"{metric}_mean"] = grouped[f"{metric}_mean"].mean()
        variance_sum = grouped[f"{metric}_stderr"].apply(lambda se: (se**2).sum(min_count=len(se)))
        pooled[f"{metric}_stderr"] = np.sqrt(variance_sum) / groups
    pooled = pooled.reset_index()
    return pooled.drop(columns="_all") if not by else pooled


def pool_over_activations(summary: pd.DataFrame) -> pd.DataFrame:
    """One group per (row facet, noise type, p), all activations together."""
    keys = [c for c in (*ROW_COLUMNS, "noise_type", "p") if c in summary.columns]
    return pool_groups(summary, keys)


def summarize_history(history: pd.DataFrame, by=("dataset", "model_type", "noise_type", "p")) -> pd.DataFrame:
    """Per-epoch mean and stderr over repeats for each activation, then averaged over
    activations like `pool_groups` does."""
    keys = [c for c in by if c in history.columns] + ["epoch"]
    grouped = history.groupby(keys + ["activation"], dropna=False, sort=True)
    per_activation = grouped.size().rename("n").to_frame()
    for metric in HISTORY_METRICS:
        per_activation[f"{metric}_mean"] = grouped[metric].mean()
        per_activation[f"{metric}_stderr"] = grouped[metric].std(ddof=1) / np.sqrt(per_activation["n"])
    return pool_groups(per_activation.reset_index(), keys, HISTORY_METRICS)


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


def _new_figure(n_rows: int, n_cols: int, title: str, extra_width: float = 0.0, extra_height: float = 1.2):
    """A constrained-layout Agg figure with an (n_rows, n_cols) grid of axes.

    The extra space is for the figure legend (below) or a colorbar (right); the figure is
    at least MIN_WIDTH wide so that a legend fits under a single column of panels.
    """
    width, height = PANEL_SIZE
    fig = Figure(figsize=(max(n_cols * width + extra_width, MIN_WIDTH), n_rows * height + extra_height + 0.4),
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
    if metric == "test_accuracy" or metric in MACRO_METRICS:
        ax.set_ylim(-0.02, 1.02)


def _errorbar_lines(ax, frame: pd.DataFrame, metric: str, by: str, color_of) -> None:
    """One line per value of `by`: mean vs p with standard-error bars (none where n = 1)."""
    values = ordered_noise_types(frame[by]) if by == "noise_type" else list(dict.fromkeys(frame[by]))
    for value in values:
        part = frame[frame[by] == value].sort_values("p")
        ax.errorbar(part["p"], part[f"{metric}_mean"], yerr=part[f"{metric}_stderr"],
                    color=color_of(value), label=str(value), marker="o", markersize=3.5,
                    capsize=2.5, linewidth=1.4, elinewidth=1)


def _theory_overlay(ax, metric: str, frame: pd.DataFrame, always_show_limits: bool = False,
                    per_type_color: bool = True) -> None:
    """Label-noise reference lines for the data in `frame` (each artist has a gid, see GID_*).

    Accuracy: chance level 1/K. Both metrics: a dotted vertical line at each label noise
    type's information limit, if the measured p range reaches it (or always_show_limits).
    Loss: ln K (the loss of a uniform guess), and the theory floor -ln P(true class) as a
    dashed curve over the p range measured for that noise type.
    """
    label_types = [t for t in ordered_noise_types(frame["noise_type"]) if t in LABEL_NOISE_TYPES]
    if metric == "test_accuracy":
        ax.axhline(1 / NUM_CLASSES, color="0.4", linewidth=0.9, gid=GID_CHANCE)
    if not label_types or metric not in ("test_accuracy", "test_loss"):
        return
    if metric == "test_loss":
        ax.axhline(np.log(NUM_CLASSES), color="0.4", linewidth=0.9, linestyle="-.", gid=GID_LN_K)
    for noise_type in label_types:
        color = noise_color(noise_type) if per_type_color else "black"
        limit, p_max = information_limit(noise_type), _p_max(frame[frame["noise_type"] == noise_type])
        if always_show_limits or limit <= p_max + P_TOLERANCE:
            ax.axvline(limit, color=color, linestyle=":", linewidth=1.3, gid=GID_INFO_LIMIT.format(noise_type))
        if metric == "test_loss":
            grid = np.linspace(0.0, min(p_max, 0.99), 200)  # label_flip's floor diverges at p = 1
            ax.plot(grid, theory_loss_floor(noise_type, grid), color=color, linestyle="--",
                    linewidth=1.2, gid=GID_THEORY_FLOOR.format(noise_type))


def _reference_handles(fig) -> list[Line2D]:
    """Legend proxies for the kinds of reference line actually drawn on `fig` (found by gid)."""
    drawn = {line.get_gid().split(":")[0] for ax in fig.axes for line in ax.lines if line.get_gid()}
    limits = ", ".join(f"{t.removeprefix('label_')} {information_limit(t):g}" for t in LABEL_NOISE_TYPES)
    proxies = {
        GID_CHANCE: dict(color="0.4", linewidth=0.9, label="chance 1/K"),
        GID_CHANCE_AUC: dict(color="0.4", linewidth=0.9, label="chance (ROC-AUC 0.5)"),
        GID_THEORY_FLOOR.split(":")[0]: dict(color="0.3", linestyle="--",
                                             label="theory floor −ln P̃(true class)\n(model = noisy-label posterior)"),
        GID_LN_K: dict(color="0.4", linestyle="-.", label="ln K (uniform guess)"),
        GID_INFO_LIMIT.split(":")[0]: dict(color="0.3", linestyle=":", label=f"information limit\n({limits})"),
    }
    return [Line2D([], [], **style) for gid, style in proxies.items() if gid in drawn]


def _figure_legend(fig, handles: list, title: str) -> None:
    """One legend for the whole figure, below the panels, in as many columns as fit."""
    ncols = min(len(handles), max(1, int(fig.get_figwidth() / LEGEND_COLUMN_WIDTH)))
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, title=title)


def _noise_legend(fig, noise_types) -> None:
    handles = [Line2D([], [], color=noise_color(t), marker="o", markersize=3.5, label=t) for t in noise_types]
    _figure_legend(fig, handles + _reference_handles(fig), "noise type")


def _p_max(frame: pd.DataFrame) -> float:
    return float(frame["p"].max()) if len(frame) else 0.0


def _panel_grid_figure(pooled: pd.DataFrame, panels: list[list[tuple[str, str, list]]], title: str) -> Figure:
    """The same grid of panels for every row facet of `pooled`, facets stacked vertically.

    `panels[r][c]` is (metric, panel title, noise types to draw). Each panel draws one
    error-bar line per noise type, plus the theory overlay; panels of one facet row that
    show the same metric share their y axis, so they can be compared side by side.
    Shared by figures 3 and 5, which differ only in their panel lists.
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
                if subset.empty:
                    _blank(ax)
                    continue
                if metric in first_of_metric:
                    ax.sharey(first_of_metric[metric])
                first_of_metric.setdefault(metric, ax)
                _errorbar_lines(ax, subset, metric, "noise_type", noise_color)
                _theory_overlay(ax, metric, subset)
                if metric == "test_macro_roc_auc":
                    ax.axhline(0.5, color="0.4", linewidth=0.9, gid=GID_CHANCE_AUC)
                _label_axes(ax, metric, f"{facet_label} · {panel_title}")
    _noise_legend(fig, ordered_noise_types(pooled["noise_type"]))
    return fig


# ---------------------------------------------------------------- figures


@matplotlib.rc_context(STYLE)
def plot_metric_vs_p(summary: pd.DataFrame, metric: str = "test_accuracy") -> Figure:
    """Figures 1 and 2: rows = dataset/model (and any other varying config), columns =
    activations; mean `metric` vs p with stderr bars, one line per noise type."""
    facets = _row_facets(summary)
    activations = _canonical_order(summary["activation"], ACTIVATIONS)
    fig, axes = _new_figure(len(facets), max(len(activations), 1),
                            f"{METRIC_LABELS.get(metric, metric)} vs noise level (mean ± standard error over repeats)")
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
    pooled = pool_over_activations(summary)
    present = set(pooled["noise_type"])
    families = [(name, [t for t in types if t in present])
                for name, types in (("label noise", LABEL_NOISE_TYPES), ("pixel noise", PIXEL_NOISE_TYPES))]
    families = [(name, types) for name, types in families if types]
    other = sorted(present - set(NOISE_TYPES))
    if other:
        families.append(("other noise", other))
    panels = [[(metric, family, types) for family, types in families] for metric in ("test_accuracy", "test_loss")]
    return _panel_grid_figure(pooled, panels, "Label noise vs pixel noise (pooled over activations)")


@matplotlib.rc_context(STYLE)
def plot_macro_metrics(summary: pd.DataFrame) -> Figure:
    """Figure 5: macro precision, recall and ROC-AUC vs p, pooled over activations."""
    pooled = pool_over_activations(summary)
    noise_types = ordered_noise_types(pooled["noise_type"])
    panels = [[(m, METRIC_LABELS[m], noise_types) for m in MACRO_METRICS if f"{m}_mean" in pooled]]
    return _panel_grid_figure(pooled, panels, "Macro metrics vs noise level (pooled over activations)")


@matplotlib.rc_context(STYLE)
def plot_label_noise_theory(summary: pd.DataFrame) -> Figure:
    """Figure 6: measured label-noise curves against theory, one column per label noise type.

    One line per dataset/model (pooled over activations); black reference lines: the
    information limit, chance 1/K, ln K and the cross-entropy floor -ln P(true class).
    """
    pooled = pool_over_activations(summary)
    label_types = [t for t in LABEL_NOISE_TYPES if t in set(pooled["noise_type"])]
    fig, axes = _new_figure(2, max(len(label_types), 1), f"Label noise: measurements vs theory (K = {NUM_CLASSES})")
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
            _theory_overlay(ax, metric, subset, always_show_limits=True, per_type_color=False)
            _label_axes(ax, metric, noise_type)
    handles = [Line2D([], [], color=color_of(label), marker="o", markersize=3.5, label=label)
               for label in facet_labels]
    handles += _reference_handles(fig)
    _figure_legend(fig, handles, "measured, pooled over activations (lines) and theory (black)")
    return fig


@matplotlib.rc_context(STYLE)
def plot_learning_curves(history: pd.DataFrame) -> Figure:
    """Figure 4: test accuracy and loss per epoch, one line per p (viridis), one row per
    noise type, a column pair per dataset/model; mean over runs (repeats and activations)
    with a shaded standard error."""
    curves = summarize_history(history)
    noise_types = ordered_noise_types(curves["noise_type"])
    facets = _row_facets(curves)
    fig, axes = _new_figure(len(noise_types), 2 * len(facets),
                            "Learning curves on the clean test set (mean ± standard error over runs)",
                            extra_width=1.0, extra_height=0.0)
    norm = Normalize(vmin=float(curves["p"].min()), vmax=max(float(curves["p"].max()), float(curves["p"].min()) + 1e-9))
    cmap = matplotlib.colormaps["viridis"]
    for row, noise_type in enumerate(noise_types):
        for facet_index, (facet_label, part) in enumerate(facets):
            subset = part[part["noise_type"] == noise_type]
            for offset, metric in enumerate(HISTORY_METRICS):
                ax = axes[row, 2 * facet_index + offset]
                if subset.empty:
                    _blank(ax)
                    continue
                _shaded_lines(ax, subset, metric, lambda p: cmap(norm(p)))
                _label_axes(ax, metric, f"{facet_label} · {noise_type}", xlabel="epoch")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="noise level p", shrink=0.6)
    return fig


def _shaded_lines(ax, curves: pd.DataFrame, metric: str, color_of) -> None:
    """One line per p over epochs, with a band of ± one standard error."""
    for p, part in curves.groupby("p", sort=True):
        part = part.sort_values("epoch")
        mean, stderr = part[f"{metric}_mean"], part[f"{metric}_stderr"].fillna(0.0)
        ax.plot(part["epoch"], mean, color=color_of(p), linewidth=1.3, marker="o", markersize=3, label=f"p={p:g}")
        ax.fill_between(part["epoch"], mean - stderr, mean + stderr, color=color_of(p), alpha=0.2, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


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
    if name == "learning_curves":
        return plot_learning_curves(results.history) if results.history is not None and len(results.history) else None
    if summary is None or summary.empty:
        return None
    builders = {
        "accuracy_vs_p": lambda: plot_metric_vs_p(summary, "test_accuracy"),
        "loss_vs_p": lambda: plot_metric_vs_p(summary, "test_loss"),
        "label_vs_pixel": lambda: plot_label_vs_pixel(summary),
        "macro_metrics": lambda: plot_macro_metrics(summary),
        "label_noise_theory": lambda: plot_label_noise_theory(summary),
    }
    return builders[name]()


def write_figures(output_dir: str | Path, names=tuple(FIGURE_FILES), figures_dir: str | Path | None = None) -> list[Path]:
    """Build and save the named figures from the CSVs in `output_dir`; returns the paths written.

    Figures whose data are missing (no ok runs yet, no history file) are skipped.
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
