"""Run a noise-robustness campaign: a grid of training runs fanned out over CPU workers.

Edit the config block below, or override any of its names on the command line. A run setting given as a
list is a grid axis: the grid is the product of all the lists.
    python run_experiments.py --ps 0,0.5 --noise_types label_flip,pixel_uniform --learning_rate 1e-3,1e-2
    python run_experiments.py --smoke          # tiny grid, well under a minute
    python run_experiments.py --dry-run        # the grid's size and an estimate, run nothing
Finished runs are stored one file each under OUTPUT_DIR/runs/ the moment they finish; running
the same command again resumes (only missing or failed runs are run).
"""
from __future__ import annotations

# ============================== config block: edit these ==============================
datasets = ["mnist"]                     # training data: mnist | fashion_mnist
activations = ["relu", "tanh", "sigmoid"]  # relu | tanh | sigmoid | leaky_relu (slope 0.1) | gelu
model_types = ["mlp"]                    # mlp (784 -> hidden_sizes -> 10) | cnn (two conv blocks, 128 dense)
noise_types = ["label_uniform", "label_flip", "pixel_uniform", "pixel_empirical"]  # also label_pairflip, label_matrix
noise_matrix = None                      # K x K row-stochastic M for label_matrix (T = (1-p) I + p M): nested list, JSON or a .json path
losses = ["ce"]                          # training losses (docs/losses.md); several = a paired comparison on the same seeds
loss_settings = {}                       # hyper-parameters by loss, e.g. {"gce": {"q": [0.5, 0.7]}} (a list: an axis); defaults: docs/losses.md
validation_fraction = 0.0                # in [0, 0.5]; e.g. 0.1 holds out noisy training data to pick the epoch
ps = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # noise levels, each in [0, 1]; p = 0 is one clean run shared by every noise type
extra_label_ps = [0.95, 1.0]             # further noise levels for the label noise types only
repeats = 5                              # runs per grid point; repeat r has the same seeds at every p (paired)
target_ci95 = None                       # e.g. 0.005: repeats until the 95% CI of mean test accuracy is +-0.005 (repeats = the minimum, >= 3)
max_repeats = 50                         # with target_ci95: the most repeats a grid point gets
epochs = 10                              # training epochs per run; a list trains once, for the longest, and reports each
batch_size = 128                         # training batch size
optimizer = "adam"                       # adam | sgd (momentum 0.9)
learning_rate = 1e-3                     # step size, > 0
weight_decay = 0.0                       # L2 penalty, >= 0
hidden_sizes = [256, 128]                # MLP hidden layer widths; a list of lists is an axis, e.g. [[256, 128], [64]]
normalize = True                         # standardize pixels (after the noise) with the dataset's mean and std
max_train_samples = None                 # None = the full training set; N = its first N examples
seed = 0                                 # campaign seed; repeat r's seed derives from (seed, r)
max_workers = None                       # worker processes; None = CPU count // cpu_threads_per_worker
cpu_threads_per_worker = 1               # torch threads per worker
pin_cpus = True                          # pin each worker to its own cores where the OS allows
allow_oversubscription = False           # allow workers x threads above twice the CPU count
max_attempts = 3                         # tries per run (worker deaths, failures across resumes)
retry_failed = True                      # on resume, run failed runs again (up to max_attempts)
use_cuda = False                         # train on the GPU (needs max_workers = 1)
precision = "float32"                    # float32 | bfloat16 (mixed-precision training passes, docs/performance.md)
data_dir = "data"                        # holds MNIST/raw/*.gz, FashionMNIST/raw/*.gz (torchvision layout) or one dataset's four files
output_dir = "results/campaign"          # where runs, CSVs and figures go
executor = "local"                       # local (worker processes on this machine) | dask (docs/cluster.md)
dask_scheduler = None                    # with executor = "dask": the scheduler's address, e.g. tcp://HOST:8786
stalled_run_factor = 5                   # a run this many times as slow as the slowest finished one of its kind is stalled: reported, locally rerun
# =======================================================================================
CONFIG_NAMES = [name for name in dict(globals()) if not name.startswith("_") and name != "annotations"]

import signal  # noqa: E402
import sys  # noqa: E402

STARTUP_INTERRUPTS: list[int] = []  # Ctrl-C while the libraries load: noted, and acted on once main() starts

if __name__ == "__main__":  # not raised at once: an exception in a handler run inside torch's C++ import aborts
    signal.signal(signal.SIGINT, lambda signum, frame: STARTUP_INTERRUPTS.append(signum))

import argparse
import ast
import contextlib
import dataclasses
from collections import Counter
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shlex
import subprocess
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import executors
import metrics
import nnet_models as nm
import registry
import results_store as rs
from losses import LOSSES, loss_function

MAX_GRID_SIZE = 1_000_000
CSV_REFRESH_SECONDS = 30  # during a campaign the CSVs are rewritten at most this often ...
CSV_REFRESH_SHARE = 0.03  # ... and less often where rewriting them would take more than this share of a core
SMOKE_PRESET = {"activations": ["relu", "tanh"], "model_types": ["mlp"], "ps": [0.0, 0.5], "extra_label_ps": [],
                "repeats": 2, "epochs": 1, "max_train_samples": 2000, "output_dir": "results/smoke"}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: a training config and its place in the campaign."""
    run_id: str
    repeat: int
    config: registry.TrainConfig


class ConfigError(ValueError):
    """Invalid config, or output_dir in use (args[0]: every problem, one line each); nothing was run or written."""


# ---------------------------------------------------------------- command line
# The run settings that may be grid axes (a list of values), with the TrainConfig field each one sets.
AXES = {"datasets": "dataset", "model_types": "model_type", "activations": "activation", "noise_types": "noise_type",
        "ps": "p", "losses": "loss", **{name: name for name in (
            "optimizer", "learning_rate", "weight_decay", "batch_size", "epochs", "normalize", "precision",
            "validation_fraction", "hidden_sizes", "max_train_samples")}}
TEXT_NAMES = {"noise_matrix", "dask_scheduler"}  # taken as text though their default is None
WORDS = {"none": None, "null": None, "true": True, "yes": True, "false": False, "no": False}


def literal(text: str):
    """A Python or JSON literal (none, true and false in any case); text that is neither stays text."""
    text = text.strip()
    if text.lower() in WORDS:
        return WORDS[text.lower()]
    for parse in (ast.literal_eval, json.loads):
        with contextlib.suppress(ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return parse(text)
    return text


def parse_value(name: str, text: str, default):
    """A command-line value, typed by the config block: text for names and paths; otherwise literals, and for a
    grid axis or a list a comma-separated list of them, or a bracketed list (hidden_sizes '[[256,128],[64]]')."""
    if name in TEXT_NAMES or isinstance(default, str) and name not in AXES:
        return text
    if name not in AXES and not isinstance(default, list) or text.strip().startswith("["):
        return literal(text)
    items = [literal(item) for item in text.split(",") if item.strip()]
    one_value = name != "hidden_sizes" and not isinstance(default, list) and len(items) == 1
    return items[0] if one_value else items


def axis_values(config: dict, name: str) -> list:
    """The values of a grid axis: a list, or one value (hidden_sizes: one list of widths, or a list of lists)."""
    value = config[name]
    if name == "hidden_sizes":
        return value if value and all(isinstance(v, list) for v in value) else [value]
    return value if isinstance(value, list) else [value]


def registered(title: str, entries: dict[str, str]) -> str:
    """A section of --help's closing text: a registry's entries, one per line with its description."""
    width = max(map(len, entries))
    return f"{title}:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in entries.items())


def with_defaults(loss) -> str:
    """A loss's description and, where it has settings, their defaults."""
    settings = ", ".join(f"{name} = {value:g}" for name, value in loss.settings.items())
    return f"{loss.description} [{settings}]" if settings else loss.description


def build_parser(defaults: dict) -> argparse.ArgumentParser:
    noise_types = {name: registry.NOISE_TYPES[name].description for name in registry.noisy_types()}
    losses = {name: with_defaults(loss) for name, loss in LOSSES.items()}
    epilog = f"{registered('noise types', noise_types)}\n\n{registered('losses [default loss_settings]', losses)}"
    parser = argparse.ArgumentParser(description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    block = Path(__file__).read_text().split("# =====")[1]  # the comment after each config name: its flag's help
    comments = dict(re.findall(r"^(\w+) = .*?#\s*(.+)$", block, flags=re.MULTILINE))
    for name, default in defaults.items():
        shown = json.dumps(default) if isinstance(default, list) else default
        axis = " [a grid axis: give a list]" if name in AXES else ""
        parser.add_argument(*sorted({f"--{name}", f"--{name.replace('_', '-')}"}), dest=name, metavar="VALUE",
                            help=f"{comments.get(name, '')}{axis} (default: {shown})".replace("%", "%%"))
    parser.add_argument("--smoke", action="store_true", help="tiny grid on 2000 samples, 1 epoch, into results/smoke")
    parser.add_argument("--dry-run", "--dry_run", action="store_true",
                        help="print the grid's size and an estimated wall time and memory, run nothing")
    parser.add_argument("--check", action="store_true",
                        help="check that each training set-up can fit 100 clean examples, run nothing else")
    parser.add_argument("--list", action="store_true", help="the dry run, and every run of the grid listed")
    parser.add_argument("--fresh", action="store_true", help="move existing results in output_dir aside and start over")
    return parser


def config_from_args(argv: list[str] | None) -> tuple[dict, argparse.Namespace]:
    """The config block, then the --smoke preset, then explicit command-line values; output_dir with ~ expanded
    (data_dir is expanded where the runs read it: on a Dask worker, ~ is that worker's home)."""
    defaults = {name: globals()[name] for name in CONFIG_NAMES}
    args = build_parser(defaults).parse_args(argv)
    config = {**defaults, **(SMOKE_PRESET if args.smoke else {})}
    config.update({name: parse_value(name, getattr(args, name), defaults[name])
                   for name in CONFIG_NAMES if getattr(args, name) is not None})
    if isinstance(config["output_dir"], str):
        config["output_dir"] = os.path.expanduser(config["output_dir"])
    return config, args


# ---------------------------------------------------------------- validation
def one_of(options) -> tuple:
    """(check, allowed) of a choice; `options` may be a function: the options registered when checked."""
    current = options if callable(options) else lambda: options
    return (lambda v: v in current(), lambda: f"one of: {', '.join(current())}")


def integer_at_least_1(v) -> bool:
    return type(v) is int and v >= 1


# name: (check of one value, what is allowed); a grid axis's check applies to each of its values
RULES = {
    "datasets": one_of(tuple(registry.DATASETS)), "model_types": one_of(registry.MODEL_TYPES),
    "activations": one_of(registry.ACTIVATIONS), "noise_types": one_of(registry.noisy_types),
    "losses": one_of(tuple(LOSSES)), "optimizer": one_of(registry.OPTIMIZERS),
    "precision": one_of(registry.PRECISIONS), "executor": one_of(tuple(executors.EXECUTORS)),
    **{name: (lambda v: rs.is_number(v) and 0 <= v <= 1, "a number in [0, 1]") for name in ("ps", "extra_label_ps")},
    **{name: (integer_at_least_1, "an integer >= 1")
       for name in ("repeats", "epochs", "batch_size", "cpu_threads_per_worker", "max_attempts", "max_repeats")},
    "target_ci95": (lambda v: v is None or rs.is_number(v) and 0 < v < 1, "a number in (0, 1) or None"),
    "max_workers": (lambda v: v is None or integer_at_least_1(v), "an integer >= 1 or None"),
    "max_train_samples": (lambda v: v is None or integer_at_least_1(v), "an integer >= 1 or None"),
    "seed": (lambda v: type(v) is int, "an integer"),
    "learning_rate": (lambda v: rs.is_number(v) and 0 < v <= sys.float_info.max, "a number > 0"),
    "weight_decay": (lambda v: rs.is_number(v) and 0 <= v <= sys.float_info.max, "a number >= 0"),
    "validation_fraction": (lambda v: rs.is_number(v) and 0 <= v <= 0.5, "a number in [0, 0.5]"),
    "stalled_run_factor": (lambda v: rs.is_number(v) and 2 <= v <= sys.float_info.max, "a number >= 2"),
    "hidden_sizes": (lambda v: isinstance(v, list) and v and all(integer_at_least_1(h) for h in v),
                     "a non-empty list of integers >= 1 (a list of such lists for several)"),
    **{name: (lambda v: isinstance(v, bool), "true or false")
       for name in ("normalize", "pin_cpus", "retry_failed", "use_cuda", "allow_oversubscription")},
    **{name: (lambda v: isinstance(v, str) and v.strip(), "a non-empty path") for name in ("output_dir", "data_dir")},
}


def config_errors(config: dict) -> list[str]:
    """Every problem with the config's values, each naming the bad value and what is allowed."""
    errors = []
    for name, (check, allowed) in RULES.items():
        allowed = allowed() if callable(allowed) else allowed
        values = axis_values(config, name) if name in AXES or name == "extra_label_ps" else [config[name]]
        errors += [f"{name}: {v!r} is not {allowed}" for v in values if not check(v)]
        if values or name != "extra_label_ps":  # a list that is no axis of its own, and may be empty
            errors += list_errors(name, values, allowed)
    errors = errors or loss_settings_errors(config)
    if errors:  # the checks below build on valid values
        return errors
    if config["target_ci95"] is not None and not 3 <= config["repeats"] <= config["max_repeats"]:
        errors.append(f"repeats: {config['repeats']} must be at least 3 and at most max_repeats "
                      f"({config['max_repeats']}) with target_ci95: it is then the minimum number of repeats")
    if "label_matrix" not in axis_values(config, "noise_types") and config["noise_matrix"] is not None:
        errors.append("noise_matrix is set but noise_types has no label_matrix, which is what uses it; add "
                      "label_matrix to noise_types, or set noise_matrix = None")
    if "label_matrix" in config["noise_types"] and config["noise_matrix"] is None:
        errors.append("noise_types has label_matrix but noise_matrix is None; give a K x K "
                      "row-stochastic matrix (nested list, JSON text or a .json file)")
    elif "label_matrix" in config["noise_types"]:
        try:
            parse_noise_matrix(config["noise_matrix"])
        except (ValueError, OSError, RecursionError) as exc:
            errors.append(f"noise_matrix: {str(config['noise_matrix'])[:80]!r} is not a K x K row-stochastic "
                          f"matrix (nested list, JSON text or a .json file): {exc}")
    return errors + placement_errors(config)


def placement_errors(config: dict) -> list[str]:
    """Where the runs can go, as the configured executor sees it."""
    return executors.EXECUTORS[config["executor"]].config_errors(config)


def validate(config: dict, trains_here: bool = False) -> None:
    """Raise ConfigError listing every problem, before anything runs or is written. The data are checked where
    runs train on this machine: with local workers, or `trains_here` (--check and --dry-run)."""
    errors = config_errors(config)
    if not errors and (size := grid_size(config)) > MAX_GRID_SIZE:
        errors.append(f"the grid has {size:,} runs, more than {MAX_GRID_SIZE:,}; fewer ps, repeats or other factors")
    if not errors:
        errors += output_dir_errors(config["output_dir"])
        # the data files decode and hold enough examples (decoded once: the forked workers share this copy; Dask
        # workers check their own)
        samples = axis_values(config, "max_train_samples")
        for dataset in axis_values(config, "datasets") if trains_here or config["executor"] == "local" else []:
            try:
                n_train = len(nm.load_dataset(dataset, config["data_dir"]).train_labels)
            except (nm.DataNotFoundError, nm.DataFileError) as exc:
                errors.append(f"data_dir: {exc}")
                continue
            errors += [f"max_train_samples: {n} is more than the {n_train} training examples of {dataset}; give at "
                       f"most {n_train}, or None for all" for n in samples if (n or 0) > n_train]
            errors += [f"validation_fraction: {f} of {n or n_train} training examples holds out none; give at least "
                       f"{1 / (n or n_train):.2g}, or 0 for no validation split"
                       for f in axis_values(config, "validation_fraction") for n in samples
                       if f > 0 and round(f * min(n or n_train, n_train)) == 0]
    if errors:
        raise ConfigError(errors)


def output_dir_errors(output_dir: str) -> list[str]:
    """Can output_dir be written? Checked without creating anything."""
    try:
        path = Path(output_dir).resolve()
        existing = next(parent for parent in [path, *path.parents] if parent.exists())
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop
        return [f"output_dir: {output_dir[:100]!r} is not a usable path: {exc}"[:300]]
    if not existing.is_dir():
        return [f"output_dir: {output_dir!r} is not a directory ({existing} is a file)"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"output_dir: {output_dir!r} is not writable (no write permission on {existing})"]
    return []


def list_errors(name: str, values: list, allowed: str) -> list[str]:
    """An axis's values must be given, each once."""
    if not values:
        return [f"{name} is empty; give at least one value: {allowed}"]
    return [f"{name}: {v} appears more than once; give each value once"
            for v, n in Counter(map(repr, values)).items() if n > 1]


def loss_settings_errors(config: dict) -> list[str]:
    """Problems with loss_settings: a dict by loss of the grid, of that loss's settings, in their ranges."""
    settings, grid_losses = config["loss_settings"], axis_values(config, "losses")
    if not isinstance(settings, dict) or not all(isinstance(given, dict) for given in settings.values()):
        return [f"loss_settings: {settings!r} is not a dict of settings by loss, e.g. {{'gce': {{'q': 0.7}}}}"]
    if unknown := [loss for loss in settings if loss not in grid_losses]:
        return [f"loss_settings: {loss!r} is not one of the grid's losses: {', '.join(map(str, grid_losses))}"
                for loss in unknown]
    errors = [error for loss, given in settings.items() for name in given
              for error in list_errors(f"loss_settings: {loss}'s {name}", axis_values(given, name), "a number")]
    for loss, variant in loss_variants(config) if not errors else []:
        try:
            loss_function(loss, dict(variant), nm.torch.eye(registry.NUM_CLASSES))
        except ValueError as exc:
            errors.append(f"loss_settings: {exc}")
    return list(dict.fromkeys(errors))


def parse_noise_matrix(value) -> tuple[tuple[float, ...], ...]:
    """The config's noise_matrix (nested list, JSON text or a JSON file's path) as checked tuples."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            value = json.loads(value)
        elif Path(value).expanduser().is_file():
            value = json.loads(Path(value).expanduser().read_text())
        else:
            raise ValueError(f"{value!r} is neither JSON text (a list of rows) nor an existing .json file")
    return tuple(tuple(float(x) for x in row) for row in registry.check_noise_matrix(value))


# ---------------------------------------------------------------- grid
def repeat_seed(campaign_seed: int, repeat: int) -> int:
    """The seed of repeat r: the same at every p and noise type, so comparisons are paired."""
    return nm.stream_seed(campaign_seed, f"repeat/{repeat}") % 2**31


def stored_config(cfg: registry.TrainConfig) -> dict:
    """The config's fields as records and CSVs store them."""
    return {k: rs.csv_value(v) for k, v in dataclasses.asdict(cfg).items()}


def run_key(cfg: registry.TrainConfig) -> str:
    """A stable id from every field that affects the run's result (threads and paths do not)."""
    fields = {k: v for k, v in stored_config(cfg).items() if k not in ("cpu_threads", "data_dir")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def noise_ps(noise_type: str, config: dict) -> list[float]:
    label_noise = registry.NOISE_TYPES[noise_type].kind == "label"
    return sorted({float(p) for p in config["ps"] + (config["extra_label_ps"] if label_noise else [])})


def noise_points(config: dict) -> list[tuple[str, float]]:
    """(noise type, p) of the grid: one clean point (p = 0) for all noise types, then each type's p > 0."""
    clean = [(registry.CLEAN, 0.0)] if any(0 in noise_ps(t, config) for t in axis_values(config, "noise_types")) else []
    return clean + [(t, p) for t in axis_values(config, "noise_types") for p in noise_ps(t, config) if p > 0]


def loss_variants(config: dict) -> list[tuple[str, tuple[tuple[str, float], ...]]]:
    """(loss, its settings) of the grid: each loss with every combination of its settings' values."""
    variants = []
    for loss in axis_values(config, "losses"):
        given = config["loss_settings"].get(loss, {})
        names = sorted(set(LOSSES[loss].settings) | set(given))
        values = [axis_values(given, name) if name in given else [LOSSES[loss].settings[name]] for name in names]
        variants += [(loss, tuple(zip(names, combination))) for combination in itertools.product(*values)]
    return variants


TRAINING_AXES = [name for name in AXES if name not in ("noise_types", "ps", "losses", "epochs")]


def architectures(config: dict) -> int:
    """The grid's models: an MLP per hidden_sizes, and the CNN, which has no widths."""
    models = axis_values(config, "model_types")
    return models.count("mlp") * len(axis_values(config, "hidden_sizes")) + models.count("cnn")


def grid_size(config: dict) -> int:
    """The number of runs build_grid would make, counted without making them."""
    others = [name for name in TRAINING_AXES if name not in ("model_types", "hidden_sizes")]
    return (math.prod(len(axis_values(config, name)) for name in others) * architectures(config)
            * len(loss_variants(config)) * len(noise_points(config)) * config["repeats"])


def build_grid(config: dict) -> list[RunSpec]:
    """The product of every axis, noise points and repeats. A list of epochs is one run of the longest that
    reports the others (the learning rate is constant, so its results after fewer epochs are a shorter run's)."""
    epochs = sorted(axis_values(config, "epochs"))
    shared = dict(epochs=epochs[-1], reported_epochs=tuple(epochs[:-1]), cpu_threads=config["cpu_threads_per_worker"],
                  data_dir=str(config["data_dir"]), use_cuda=config["use_cuda"])
    matrix = parse_noise_matrix(config["noise_matrix"]) if "label_matrix" in config["noise_types"] else None
    specs = []
    for values in itertools.product(*(axis_values(config, name) for name in TRAINING_AXES)):
        setting = {AXES[name]: value for name, value in zip(TRAINING_AXES, values)}
        cnn = setting["model_type"] == "cnn"  # its widths are fixed: hidden_sizes would only change its run id
        floats = {name: float(setting[name]) for name in ("learning_rate", "weight_decay", "validation_fraction")}
        setting.update(hidden_sizes=() if cnn else tuple(setting["hidden_sizes"]), **floats)
        for (loss, loss_settings), (noise_type, p) in itertools.product(loss_variants(config), noise_points(config)):
            settings = tuple((name, float(value)) for name, value in loss_settings)
            point = registry.TrainConfig(**setting, **shared, loss=loss, loss_settings=settings, noise_type=noise_type,
                                         p=p, noise_matrix=matrix if noise_type == "label_matrix" else None)
            specs += [spec_for(point, repeat, config["seed"]) for repeat in range(config["repeats"])]
    return list({spec.run_id: spec for spec in specs}.values())  # a CNN's points at every hidden_sizes are one


def spec_for(point: registry.TrainConfig, repeat: int, campaign_seed: int) -> RunSpec:
    """Repeat `repeat` of a grid point (a config whose seed is not yet set)."""
    cfg = dataclasses.replace(point, seed=repeat_seed(campaign_seed, repeat))
    return RunSpec(run_key(cfg), repeat, cfg)


def resolved_workers(config: dict) -> int:
    return executors.LocalExecutor.workers_of(config)


# ---------------------------------------------------------------- one run, in a worker
def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_record(spec: RunSpec, status: str, error: str = "", **fields) -> dict:
    """A stored run: bookkeeping, every config field as the CSVs write it, and `fields`."""
    return {"run_id": spec.run_id, "repeat": spec.repeat, "status": status, "error": error,
            "finished_at": now(), **stored_config(spec.config), **{k: rs.csv_value(v) for k, v in fields.items()}}


def run_one(spec: RunSpec) -> dict:
    """Train and evaluate one grid cell; an exception becomes a `failed` record, never a crash."""
    if problem := nm.forward_correction_problem(spec.config):
        return run_record(spec, "not_identifiable", problem)
    try:
        result = nm.train_and_evaluate(spec.config)
    except nm.DivergedError as exc:  # deterministic: not retried on resume
        return run_record(spec, "diverged", str(exc), diverged_epoch=exc.epoch, diverged_step=exc.step)
    except Exception as exc:
        return run_record(spec, "failed", f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    return run_record(spec, "ok", **result)


def executor_for(config: dict) -> executors.Executor:
    """The configured executor of run_one, naming runs by their settings in its warnings."""
    modules = [Path(m.__file__) for m in (registry, metrics, sys.modules["losses"], nm, rs, executors,
                                          sys.modules[__name__])]
    varying = varying_settings(config)
    return executors.EXECUTORS[config["executor"]].from_config(
        run_one, config, modules, describe=lambda s: f"run {s.run_id} ({spec_name(s, varying)})", kind=run_kind)


def run_kind(spec: RunSpec) -> tuple:
    """Runs of one kind take about as long: they differ only in the seed and the noise, but for whether pixel
    noise is drawn."""
    clean = dataclasses.replace(spec.config, seed=0, p=0.0, noise_type=registry.CLEAN, noise_matrix=None)
    return clean, spec.config.draws_pixel_noise


def interleaved(specs: list[RunSpec]) -> list[RunSpec]:
    """The runs, one of each kind in turn (else in grid order): the first to finish stand for the rest, so the
    ETA holds from the start whatever order the axes give, and a stopped campaign has some runs of each kind."""
    seen, turns = Counter(), []
    for spec in specs:
        kind = run_kind(spec)
        seen[kind] += 1
        turns.append(seen[kind])
    return [spec for _, spec in sorted(zip(turns, specs), key=lambda pair: pair[0])]


# ---------------------------------------------------------------- the campaign
def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    return None


def machine() -> dict:
    """What a run's last digits depend on (docs/noise.md): the CPU, the library versions and the math kernels."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, flags=re.MULTILINE)
    build = nm.torch.__config__.show()
    kernels = [line.strip("- ") for line in build.splitlines() if re.search(r"Math Kernel|MKL-DNN|oneDNN", line)]
    return {"cpu": cpu[1].strip() if cpu else platform.processor(), "cpu_count": os.cpu_count(),
            "cpu_capability": nm.torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "torch": nm.torch.__version__, "numpy": nm.np.__version__,
            "blas": re.search(r"BLAS_INFO=(\w+)", build)[1] if "BLAS_INFO=" in build else None, "kernels": kernels}


def move_aside(output_dir: Path) -> Path | None:
    """For --fresh: rename an existing output_dir to a timestamped sibling (never delete)."""
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return None
    lock_output_dir(output_dir).close()  # a running campaign's results are never moved
    name = f"{output_dir.name}.old-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    targets = (output_dir.with_name(name + (f"-{n}" if n > 1 else "")) for n in itertools.count(1))
    target = next(candidate for candidate in targets if not candidate.exists())
    output_dir.rename(target)
    return target


def varying_settings(config: dict) -> list[str]:
    """The run settings the grid varies besides those every line about a run names (run_name)."""
    named = ("model_types", "activations", "noise_types", "ps", "losses", "epochs")  # a list of epochs is one run
    return [AXES[name] for name in AXES if name not in named and len(axis_values(config, name)) > 1]


def point_name(run: dict, varying=()) -> str:
    """How every line names a grid point (config fields as records store them): model/activation, noise, its loss
    but ce, p and the `varying` settings."""
    loss = f" loss={' '.join(filter(None, [run['loss'], run['loss_settings']]))}" if run["loss"] != "ce" else ""
    settings = "".join(f" {name}={run[name]}" for name in varying if run[name] != "")  # a CNN: no hidden_sizes
    return f"{run['model_type']}/{run['activation']} {run['noise_type']}{loss} p={run['p']:.2f}{settings}"


def run_name(run: dict, varying=()) -> str:
    """A run: its grid point and its repeat."""
    return f"{point_name(run, varying)} r{run['repeat']}"


def spec_name(spec: RunSpec, varying=()) -> str:
    return run_name({**stored_config(spec.config), "repeat": spec.repeat}, varying)


def describe_run(record: dict, varying=()) -> str:
    head = run_name(record, varying)
    if record["status"] != "ok":
        return f"[{record['status'].upper()}] {head}: {record['error']}"
    return f"[ok] {head}: acc={record['test_accuracy']:.4f} loss={record['test_loss']:.4f} ({record['seconds']:.1f}s)"


def lock_output_dir(output_dir: Path):
    """Lock OUTPUT_DIR/campaign.lock, naming the holder; the kernel drops it when the holder dies (never stale)."""
    import fcntl
    handle = open(output_dir / "campaign.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError([f"another campaign ({holder}) is running in {output_dir}/; wait for it to finish or "
                           "stop it, or give this one another output_dir"]) from None
    handle.truncate(0)
    handle.write(f"PID {os.getpid()} on {platform.node()}")
    handle.flush()
    return handle


class Campaign:
    """One campaign's runs and bookkeeping: the run store, campaign.json, the CSVs, the log and progress."""

    def __init__(self, config: dict, specs: list[RunSpec]):
        self.config, self.specs = config, list(specs)
        self.output_dir = Path(config["output_dir"])
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.lock = lock_output_dir(self.output_dir)
        rs.remove_stale_temporaries(self.output_dir)
        self.store = rs.RunStore(self.output_dir)
        self.records = self.store.load()
        self.recount()
        self.target = (rs.Target(float(config["target_ci95"]), config["repeats"], config["max_repeats"])
                       if config["target_ci95"] is not None else None)
        # repeats per grid point: the config's `repeats`, or as many as a precision target's rule has planned
        self.planned = {dataclasses.replace(spec.config, seed=0): config["repeats"] for spec in specs}
        for point in list(self.planned):  # a resumed campaign continues to its target
            self.more_repeats(point)
        self.metadata = {"config": config, "grid_size": len(self.specs), "machine": machine(),
                         "git_commit": git_commit(), "host": platform.node(),
                         "workers": resolved_workers(config), "started_at": now(), "finished_at": None}
        self.log_file = open(self.output_dir / "campaign.log", "a", buffering=1)  # line-buffered: flushed per line
        self.csvs_written_at, self.csv_interval = -math.inf, CSV_REFRESH_SECONDS  # the first run is in them at once
        self.done, self.bar, self.varying = 0, None, varying_settings(config)

    def more_repeats(self, point: registry.TrainConfig) -> list[RunSpec]:
        """The runs `point` (seed 0) needs beyond those planned, from its stored repeats 0, 1, ... up to the first
        missing one (so a resumed campaign plans the same), added to the specs."""
        if self.target is None:
            return []
        seed = self.config["seed"]
        records = (self.records.get(spec_for(point, r, seed).run_id) for r in range(self.target.max_repeats))
        n = self.target.repeats([record["test_accuracy"] if record["status"] == "ok" else math.nan
                                 for record in itertools.takewhile(bool, records)])
        more = [spec_for(point, r, seed) for r in range(self.planned[point], n)]
        self.planned[point] = max(self.planned[point], n)
        self.specs += more
        self.statuses.update(self.status(spec.run_id) for spec in more)
        return more

    def say(self, message: str, error: bool = False) -> None:
        stream = sys.stderr if error else sys.stdout
        try:
            if self.bar is not None and not self.bar.disable:
                self.bar.write(message, file=stream)
            else:
                print(message, file=stream, flush=True)
        except BrokenPipeError:  # its reader has gone (| head): the campaign runs on, and the log has every line
            rs.silence(stream)
        try:
            if not self.log_file.closed:
                self.log_file.write(f"{now()} {message}\n")
        except OSError as exc:  # a full disk: the console has the lines, and storing the next run stops the campaign
            self.close_log()
            print(f"warning: could not write {self.log_file.name}: {exc.strerror or exc}; the log stops here",
                  file=sys.stderr)

    def close_log(self) -> None:
        with contextlib.suppress(OSError):  # a line it could not write is still in its buffer
            self.log_file.close()

    def status(self, run_id: str) -> str:
        return self.records.get(run_id, {"status": "pending"})["status"]

    def recount(self) -> None:
        self.statuses = Counter(self.status(spec.run_id) for spec in self.specs)

    def write_metadata(self) -> None:
        counts = {"done": self.statuses["ok"], **{s: self.statuses[s] for s in (*rs.STATUSES[1:], "pending")}}
        self.metadata.update(counts=counts, updated_at=now())
        rs.atomic_write_text(self.output_dir / rs.CAMPAIGN_JSON, json.dumps(self.metadata, indent=2, default=str))

    def add(self, record: dict) -> None:
        """Store a finished run before anything is said about it; refresh the CSVs now and then."""
        record["attempts"] = record.get("attempts", 1) + self.records.get(record["run_id"], {}).get("attempts", 0)
        self.store.save(record)
        self.statuses[self.status(record["run_id"])] -= 1
        self.statuses[record["status"]] += 1
        self.records[record["run_id"]] = record
        self.write_metadata()
        if time.monotonic() - self.csvs_written_at > self.csv_interval:  # the notebook can follow along
            cpu_started = time.process_time()
            rs.write_csvs(list(self.records.values()), self.output_dir, self.target)
            self.csv_interval = max(CSV_REFRESH_SECONDS, (time.process_time() - cpu_started) / CSV_REFRESH_SHARE)
            self.csvs_written_at = time.monotonic()
        self.done += 1
        remaining = (time.monotonic() - self.started) / self.done * (self.bar.total - self.done)
        self.say(f"[{self.done}/{self.bar.total}, ETA {duration(remaining)}] {describe_run(record, self.varying)}")
        self.bar.update()

    def run(self, todo: list[RunSpec]) -> str:
        """Run and store `todo`: "finished", "interrupted" (Ctrl-C, SIGTERM) or "stopped" (scheduler lost)."""
        from tqdm import tqdm
        self.started = time.monotonic()
        # a progress bar on a terminal; redirected output gets plain lines with an ETA only
        self.bar = tqdm(total=len(todo), unit="run", dynamic_ncols=True, disable=not sys.stdout.isatty() or not todo)
        executor = executor_for(self.config)
        for spec in todo:
            executor.submit(spec)
        try:
            # SIGTERM stops as Ctrl-C does; closing the outcomes stops the workers at once
            with signals_interrupting(), contextlib.closing(executor.as_completed()) as outcomes:
                for spec, outcome in outcomes:
                    if isinstance(outcome, executors.WorkerDied):  # else the executor returns run_one's record
                        outcome = {**run_record(spec, "failed", str(outcome)), "attempts": outcome.attempts}
                    elif isinstance(outcome, BaseException):
                        outcome = run_record(spec, "failed", f"executor: {type(outcome).__name__}: {outcome}")
                    self.add(outcome)
                    for more in self.more_repeats(dataclasses.replace(spec.config, seed=0)):
                        executor.submit(more)  # run by the same workers, no pause between rounds
                        self.bar.total += 1
        except KeyboardInterrupt:
            return "interrupted"
        except executors.SchedulerUnavailableError as exc:
            self.say(f"error: {exc}", error=True)
            return "stopped"
        finally:
            self.bar.close()
        return "finished"

    def write_outputs(self, finished: bool) -> bool:
        """The CSVs and headline figures, from the stored records (a signal may land between a save and its
        bookkeeping); plots.py draws every figure on request (docs/performance.md). False: Ctrl-C or SIGTERM
        skipped the figures."""
        self.records = self.store.load()
        self.recount()
        self.metadata["finished_at"] = now() if finished else None
        rs.write_csvs(list(self.records.values()), self.output_dir, self.target)
        self.write_metadata()
        try:
            import plots
            with signals_interrupting():  # the CSVs are written: Ctrl-C need not wait for the figures
                plots.write_figures(self.output_dir, names=plots.HEADLINE_FIGURES)
        except KeyboardInterrupt:
            self.say("Interrupted: the headline figures were not drawn; the command below draws them.")
            return False
        except Exception as exc:  # figures are a convenience; the CSVs are the result
            self.say(f"Could not draw the figures: {type(exc).__name__}: {exc}", error=True)
        return True


def not_identifiable_note(specs: list[RunSpec]) -> str:
    """A line naming the grid points where forward correction's T is singular (checked before anything runs):
    their runs are recorded as not_identifiable, untrained, so that the rest of the grid still runs."""
    points = {(s.config.noise_type, s.config.p, s.config.noise_matrix): s.config for s in specs
              if s.config.loss == "forward"}
    singular = sorted({f"{t} p={p:g}" for (t, p, _), cfg in points.items() if nm.forward_correction_problem(cfg)})
    return (f"note: forward correction is not identifiable at {', '.join(singular)} (T singular or condition number "
            f"above {nm.MAX_CONDITION:g}); those runs are recorded as not_identifiable and not trained."
            if singular else "")


def run_campaign(config: dict, fresh: bool = False) -> int:
    """Run every missing run of the grid; returns the process exit code."""
    specs = build_grid(config)
    if fresh and (moved := move_aside(Path(config["output_dir"]))):
        print(f"Moved the previous results to {moved}")
    try:
        campaign = Campaign(config, specs)  # a ConfigError if another campaign runs there
    except OSError as exc:
        print(storage_error(exc), file=sys.stderr)
        return 1
    specs = campaign.specs  # with the repeats a precision target has already asked for
    try:
        # to do: runs never finished, plus failed ones while retry_failed and tries are left
        retry = {run_id for run_id, record in campaign.records.items() if record["status"] == "failed"
                 and config["retry_failed"] and record.get("attempts", 1) < config["max_attempts"]}
        todo = interleaved([spec for spec in specs if spec.run_id not in campaign.records or spec.run_id in retry])
        campaign.write_metadata()
        if note := not_identifiable_note(specs):
            campaign.say(note)
        done = campaign.metadata["counts"]["done"]
        given_up = len(specs) - len(todo) - done
        not_rerun = f"{given_up} not to rerun (failed for good, diverged or not identifiable), "
        campaign.say(f"{len(specs)} runs in the grid, {done} already done, " + (not_rerun if given_up else "")
                     + f"{len(todo)} to run on {placement(config)}. Results: {campaign.output_dir}/")
        try:
            ending = campaign.run(todo)
        except KeyboardInterrupt:  # another Ctrl-C while the workers stop
            ending = "interrupted"
        with signals_ignored():
            drawn = campaign.write_outputs(finished=ending == "finished")
            exit_code = report_outcome(campaign, ending)
            return exit_code if drawn else 130  # stopped as asked, though nothing was left to run
    except OSError as exc:  # disk full, read-only, runs/ gone: stop, keeping what is stored
        campaign.say(storage_error(exc), error=True)
        return 1
    finally:
        campaign.close_log()
        campaign.lock.close()


@contextlib.contextmanager
def signals_handled(handler):
    """Ctrl-C and SIGTERM handled by `handler` meanwhile."""
    previous = {stop: signal.signal(stop, handler) for stop in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for stop, handled_before in previous.items():
            signal.signal(stop, handled_before)


def signals_ignored():
    """Ctrl-C and SIGTERM ignored: once the runs have stopped, they would lose the closing lines, not time."""
    return signals_handled(signal.SIG_IGN)


def signals_interrupting():
    """Ctrl-C and SIGTERM raise KeyboardInterrupt."""
    return signals_handled(signal.default_int_handler)


def storage_error(exc: OSError) -> str:
    return (f"error: could not write {exc.filename or 'a results file'}: {exc.strerror or exc}. The campaign "
            "stopped; every run finished before this is stored. Free some space or fix the permissions, "
            "then run the same command again to resume.")


def report_outcome(campaign: Campaign, ending: str) -> int:
    """The closing lines: counts, where the results are, and what to do next."""
    counts = campaign.metadata["counts"]  # as write_outputs just wrote them
    out = campaign.output_dir
    campaign.say(f"{counts['done']} ok, {counts['failed']} failed, {counts['diverged']} diverged, "
                 f"{counts['pending']} pending."
                 + (f" {counts['not_identifiable']} not run: forward correction with a singular T."
                    if counts["not_identifiable"] else ""))
    failed = sorted((r for r in campaign.records.values() if r["status"] in ("failed", "diverged")),
                    key=lambda record: run_name(record, campaign.varying))
    for record in failed:
        campaign.say(f"  {record['status']} run {record['run_id']}: {describe_run(record, campaign.varying)}")
    target = campaign.target
    if capped := [p for p, n in campaign.planned.items() if n >= target.max_repeats] if target else []:
        campaign.say(f"{len(capped)} grid point(s) reached max_repeats = {target.max_repeats} before the 95% "
                     f"interval of their mean test accuracy was within +-{target.half_width:g}:")
    for point in capped:
        campaign.say(f"  {point_name(stored_config(point), campaign.varying)}")
    campaign.say(f"CSVs: {out}/{rs.PER_RUN_CSV}, {out}/{rs.SUMMARY_CSV}, {out}/{rs.HISTORY_CSV}; "
                 f"headline figures: {out}/{rs.FIGURES_DIR}/; log: {out}/campaign.log")
    campaign.say(f"Every figure and the report: {plots_command(out)}  (writes {out}/report.html)")
    if ending == "interrupted":
        campaign.say("Interrupted. Every finished run is saved; run the same command again to resume.")
        return 130
    if ending == "stopped":
        campaign.say("Every finished run is saved; once the scheduler answers, run the same command again to resume.")
        return 1
    return 1 if failed else 0


def plots_command(output_dir: Path) -> str:
    """The shell command, from this working directory and with this interpreter (a virtual environment's, say),
    that draws every figure of `output_dir` and its report."""
    def from_here(path: Path) -> str:  # elsewhere: its full path
        with contextlib.suppress(ValueError):
            return str(path.relative_to(Path.cwd()))
        return str(path)
    script = from_here(Path(__file__).resolve().with_name("plots.py"))
    return shlex.join([from_here(Path(sys.executable).absolute()), script, str(output_dir), "--report"])


# ---------------------------------------------------------------- checks before a campaign
def preflight_check(config: dict) -> int:
    """Can each training set-up of the grid fit 100 clean examples? Returns the exit code."""
    fields = ("dataset", "model_type", "activation", "hidden_sizes", "optimizer", "learning_rate", "weight_decay",
              "normalize")
    setups = {}
    for spec in build_grid(config):
        setups.setdefault(tuple(getattr(spec.config, f) for f in fields), spec.config)
    print(f"Checking that each of the {len(setups)} training set-ups can fit 100 clean training examples...",
          flush=True)
    failing = 0
    for cfg in setups.values():
        accuracy, loss = nm.fits_tiny_subset(cfg, nm.load_dataset(cfg.dataset, cfg.data_dir))
        fits = accuracy >= 0.95 and math.isfinite(loss)
        failing += not fits
        values = ", ".join(f"{f}={v}" for f in fields if (v := rs.csv_value(getattr(cfg, f))) != "")  # a CNN: no widths
        print(f"[{'ok' if fits else 'FAILS'}] {values}: training accuracy {accuracy:.2f}, loss {loss:.3g}")
    if failing:
        print(f"{failing} set-up(s) cannot fit 100 examples (accuracy below 0.95 or loss not finite): "
              "fix them (learning_rate, optimizer, ...) before starting the campaign.")
    return 1 if failing else 0


# ---------------------------------------------------------------- dry run
def calibrate(cfg: registry.TrainConfig) -> tuple[float, float]:
    """(samples per second, other seconds per epoch) of a kind of run: the faster of two one-epoch runs, with
    cross-entropy (the other losses cost about as much a step; forward_estimated's first model is counted apart)."""
    one_epoch = dataclasses.replace(cfg, epochs=1, max_train_samples=8192 if cfg.model_type == "mlp" else 1024,
                                    loss="ce", loss_settings=())
    nm.train_and_evaluate(dataclasses.replace(one_epoch, max_train_samples=256))
    best = min((nm.train_and_evaluate(one_epoch) for _ in range(2)), key=lambda result: result["seconds"])
    return one_epoch.max_train_samples / best["train_seconds"], best["seconds"] - best["train_seconds"]


def estimate_seconds(specs: list[RunSpec]) -> list[float]:
    """Estimated seconds of each run (forward_estimated's first model included), calibrating once per kind (model,
    batch, pixel noise or not, ...)."""
    rates, estimates = {}, []
    for spec in specs:
        cfg = spec.config
        kind = (cfg.dataset, cfg.model_type, cfg.hidden_sizes, cfg.batch_size,
                cfg.draws_pixel_noise, cfg.use_cuda, cfg.precision)
        if kind not in rates:
            dataset_size = len(nm.load_dataset(cfg.dataset, cfg.data_dir).train_labels)
            rates[kind] = (*calibrate(cfg), min(cfg.max_train_samples or dataset_size, dataset_size))
        samples_per_second, fixed, n_train = rates[kind]
        estimates.append(cfg.epochs * (n_train / samples_per_second + fixed)
                         + nm.first_stage_epochs(cfg) * n_train / samples_per_second)
    return estimates


def duration(seconds: float) -> str:
    """'0.3 s', '45 s', '12 min' or '3.4 h'."""
    if seconds < 1:  # a smoke run's
        return f"{seconds:.1g} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def grid_factors(config: dict) -> str:
    """How the grid's size comes about, axis by axis."""
    epochs = sorted(axis_values(config, "epochs"))
    axes = {name: f"{len(axis_values(config, name))} {name}" for name in TRAINING_AXES
            if len(axis_values(config, name)) > 1}
    models, widths = axis_values(config, "model_types"), len(axis_values(config, "hidden_sizes"))
    if "cnn" in models and widths > 1:  # a CNN has one architecture, whatever the hidden_sizes
        del axes["hidden_sizes"]
        if "mlp" in models:
            axes["model_types"] = f"{architectures(config)} architectures (mlp at {widths} hidden_sizes, cnn)"
    points = noise_points(config)
    clean = " (p = 0 once, shared by the noise types)" if points and points[0][1] == 0 else ""
    reported = f"; epochs {', '.join(map(str, epochs))}: one run of {epochs[-1]} reports each"
    return (" x ".join([*axes.values(), counted(len(loss_variants(config)), "loss (with its settings)",
                                                "losses (with their settings)"),
                        counted(len(points), "noise point", "noise points") + clean,
                        counted(config["repeats"], "repeat", "repeats")])
            + (reported if len(epochs) > 1 else ""))


def counted(n: int, one: str, several: str) -> str:
    return f"{n} {one if n == 1 else several}"


def placement(config: dict) -> str:
    """Where the runs go: this machine's workers, or the Dask cluster."""
    if config["executor"] == "dask":
        return f"the Dask cluster at {config['dask_scheduler']}"
    threads = counted(config["cpu_threads_per_worker"], "thread", "threads")
    return f"{counted(resolved_workers(config), 'worker', 'workers')} x {threads}"


def print_dry_run(config: dict, list_runs: bool = False) -> None:
    """The grid's size per factor and an estimated wall time and memory; the runs themselves on request."""
    import resource
    specs = build_grid(config)
    local, threads = config["executor"] == "local", config["cpu_threads_per_worker"]
    workers = resolved_workers(config) if local else 1  # a cluster's size is known once it runs
    print(f"{len(specs)} runs: {grid_factors(config)}; {placement(config)}; output_dir={config['output_dir']}")
    print("Calibrating: three short runs of each kind of run (a few seconds each)...", flush=True)
    nm.torch.set_num_threads(threads)
    seconds = estimate_seconds(specs)
    wall = max(sum(seconds) / workers, max(seconds))
    memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    where = "on the GPU" if config["use_cuda"] else f"on {counted(threads, 'thread', 'threads')}"
    on = f"on {workers} workers" if local else "on one worker, to divide by the Dask cluster's workers"
    print(f"Estimated wall time {duration(wall)} {on} ({duration(min(seconds))} to {duration(max(seconds))} per run "
          f"{where}); peak memory at most {memory_mb:.0f} MB per worker"
          + (f", {workers * memory_mb / 1024:.1f} GB in all." if local else "."))
    if config["target_ci95"] is not None:
        most = config["max_repeats"] / config["repeats"]
        print(f"With target_ci95 = {config['target_ci95']}: from {len(specs)} runs "
              f"({duration(wall)}) if every grid point meets it at once, to {round(len(specs) * most)} runs "
              f"({duration(wall * most)}) if every one needs max_repeats.")
    if note := not_identifiable_note(specs):
        print(note)
    varying = varying_settings(config)
    for spec in specs if list_runs else []:
        print(f"{spec.run_id} {spec_name(spec, varying)} seed={spec.config.seed} epochs={spec.config.epochs}")


def main(argv: list[str] | None = None) -> int:
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if STARTUP_INTERRUPTS:
            raise KeyboardInterrupt
        rs.plain_warnings()
        config, args = config_from_args(argv)
        dry_run = args.dry_run or args.list
        validate(config, trains_here=args.check or dry_run)
        if args.check:
            exit_code = preflight_check(config)
        elif dry_run:
            print_dry_run(config, args.list)
            exit_code = 0
        else:
            exit_code = run_campaign(config, fresh=args.fresh)
        sys.stdout.flush()  # a reader that has gone (| head) shows here, not at exit
        return exit_code
    except ConfigError as exc:
        print("\n".join(f"error: {line}" for line in exc.args[0]), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted before the campaign started; nothing was run.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the dry run's or the check's lines has gone (| head)
        rs.silence(sys.stdout)
        return 1


if __name__ == "__main__":
    exit_code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the closing lines are out: nothing is left to interrupt
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(exit_code)
