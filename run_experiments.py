"""Run a noise-robustness campaign: a grid of training runs fanned out over CPU workers.

Edit the config block below, or override any of its names on the command line:
    python run_experiments.py --ps 0,0.5 --noise_types label_flip,pixel_uniform --repeats 3
    python run_experiments.py --smoke          # tiny grid, well under a minute
    python run_experiments.py --dry-run        # print the grid and an estimate, run nothing
Finished runs are stored one file each under OUTPUT_DIR/runs/ the moment they finish; running
the same command again resumes (only missing or failed runs are run).
"""
from __future__ import annotations

# ============================== config block: edit these ==============================
datasets = ["mnist"]                     # mnist | fashion_mnist
activations = ["relu", "tanh", "sigmoid"]  # relu | tanh | sigmoid | leaky_relu | gelu
model_types = ["mlp"]                    # mlp | cnn
noise_types = ["label_uniform", "label_flip", "pixel_uniform", "pixel_empirical"]
#   also label_pairflip (k -> k+1 mod K) and label_matrix (T = (1-p) I + p * noise_matrix)
noise_matrix = None                      # K x K row-stochastic M for label_matrix: nested list, JSON, or a .json path
loss_corrections = ["none"]              # none | forward (Patrini et al.), for label noise; both = paired comparison
validation_fraction = 0.0                # e.g. 0.1: hold out noisy training data to pick the epoch (early stopping)
ps = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # noise levels, each in [0, 1]
extra_label_ps = [0.95, 1.0]             # further p values for the label noise types only
repeats = 5                              # runs per grid point, seeds shared across p (paired)
epochs = 10
batch_size = 128
optimizer = "adam"                       # adam | sgd (momentum 0.9)
learning_rate = 1e-3
weight_decay = 0.0
hidden_sizes = [256, 128]                # MLP hidden layer widths
normalize = True                         # standardize pixels (after noise) with the dataset's mean/std
max_train_samples = None                 # None = the full training set; e.g. 2000 for a smoke run
seed = 0                                 # campaign seed; repeat r uses a seed derived from (seed, r)
max_workers = None                       # None = CPU count // cpu_threads_per_worker
cpu_threads_per_worker = 1
pin_cpus = True                          # pin each worker to its own cores where the OS allows
max_attempts = 3                         # tries per run (worker deaths, failures across resumes)
retry_failed = True                      # on resume, run failed runs again (up to max_attempts)
use_cuda = False                         # needs max_workers = 1
precision = "float32"                    # float32 | bfloat16: mixed-precision training (README, Performance)
data_dir = "data"                        # holds MNIST/raw/*.gz (torchvision layout) or the four files
output_dir = "results"
executor = "local"                       # local (process pool on this machine) | dask
dask_scheduler = None                    # with executor = "dask": the scheduler, e.g. "tcp://HOST:8786"
# =======================================================================================
CONFIG_NAMES = [name for name in dict(globals()) if not name.startswith("_") and name != "annotations"]

import argparse
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from pathlib import Path

import nnet_models as nm
from results_store import FIELD_DEFAULTS, RunStore, atomic_write_text, csv_value, write_csvs

EXECUTORS = ("local", "dask")
CSV_REFRESH_SECONDS = 30  # during a campaign, the CSVs are rewritten at most this often
SMOKE_PRESET = {
    "activations": ["relu", "tanh"], "model_types": ["mlp"], "ps": [0.0, 0.5], "extra_label_ps": [],
    "repeats": 2, "epochs": 1, "max_train_samples": 2000, "output_dir": "results/smoke",
}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: a training config plus its place in the campaign."""

    run_id: str
    repeat: int
    config: nm.TrainConfig


class ConfigError(ValueError):
    """The campaign's configuration is invalid; nothing has been run or written."""


# ---------------------------------------------------------------- command line


def parse_value(text: str, default):
    """Parse a command-line value by the type of the config block's default."""
    if isinstance(default, str):  # paths and names stay text, even "123"
        return text
    if isinstance(default, list):
        items = [item.strip() for item in text.split(",") if item.strip()]
        return items if default and isinstance(default[0], str) else [parse_scalar(i) for i in items]
    return parse_scalar(text)


def parse_scalar(text: str):
    text = text.strip()
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "yes", "false", "no"):
        return lowered in ("true", "yes")
    for number_type in (int, float):
        try:
            return number_type(text)
        except ValueError:
            pass
    return text


def build_parser(defaults: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in defaults.items():
        flags = sorted({f"--{name}", f"--{name.replace('_', '-')}"})
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        parser.add_argument(*flags, dest=name, metavar="VALUE", help=f"(default: {shown})")
    parser.add_argument("--smoke", action="store_true", help="tiny grid on 2000 samples, 1 epoch")
    parser.add_argument("--dry-run", "--dry_run", action="store_true",
                        help="print the grid and an estimated wall time, run nothing")
    parser.add_argument("--fresh", action="store_true",
                        help="move existing results in output_dir aside and start over")
    return parser


def config_from_args(argv: list[str] | None) -> tuple[dict, argparse.Namespace]:
    """The config block, then the --smoke preset, then explicit command-line values."""
    defaults = {name: globals()[name] for name in CONFIG_NAMES}
    args = build_parser(defaults).parse_args(argv)
    config = dict(defaults)
    if args.smoke:
        config.update(SMOKE_PRESET)
    for name in CONFIG_NAMES:
        text = getattr(args, name)
        if text is not None:
            config[name] = parse_value(text, defaults[name])
    return config, args


# ---------------------------------------------------------------- validation


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def config_errors(config: dict) -> list[str]:
    """Every problem with the config's values, each naming the bad value and what is allowed."""
    errors = []
    choices = {"datasets": nm.DATASETS, "activations": nm.ACTIVATIONS,
               "model_types": nm.MODEL_TYPES, "noise_types": nm.NOISE_TYPES}
    for name, allowed in choices.items():
        values = config[name] if isinstance(config[name], list) else [config[name]]
        if not values:
            errors.append(f"{name} is empty; give at least one of: {', '.join(allowed)}")
        errors += [f"{name}: {v!r} is not one of: {', '.join(allowed)}" for v in values if v not in allowed]
    if not config["loss_corrections"]:
        errors.append(f"loss_corrections is empty; give at least one of: {', '.join(nm.LOSS_CORRECTIONS)}")
    errors += [f"loss_corrections: {v!r} is not one of: {', '.join(nm.LOSS_CORRECTIONS)}"
               for v in config["loss_corrections"] if v not in nm.LOSS_CORRECTIONS]
    if "label_matrix" in config["noise_types"]:
        if config["noise_matrix"] is None:
            errors.append("noise_types has label_matrix but noise_matrix is None; give a K x K "
                          "row-stochastic matrix (nested list, JSON text or a .json file)")
        else:
            try:
                parse_noise_matrix(config["noise_matrix"])
            except (ValueError, OSError) as exc:
                errors.append(f"noise_matrix: {exc}")
    fraction = config["validation_fraction"]
    if not (_is_number(fraction) and 0 <= fraction <= 0.5):
        errors.append(f"validation_fraction: {fraction!r} is not a number in [0, 0.5]")
    if config["optimizer"] not in nm.OPTIMIZERS:
        errors.append(f"optimizer: {config['optimizer']!r} is not one of: {', '.join(nm.OPTIMIZERS)}")
    if config["precision"] not in nm.PRECISIONS:
        errors.append(f"precision: {config['precision']!r} is not one of: {', '.join(nm.PRECISIONS)}")
    if not config["ps"]:
        errors.append("ps is empty; give at least one noise level in [0, 1]")
    for name in ("ps", "extra_label_ps"):
        errors += [f"{name}: {p!r} is not a number in [0, 1]" for p in config[name]
                   if not (_is_number(p) and 0 <= p <= 1)]
    positive_ints = ["repeats", "epochs", "batch_size", "cpu_threads_per_worker", "max_attempts"]
    optional_positive_ints = ["max_workers", "max_train_samples"]
    for name in positive_ints + optional_positive_ints:
        value = config[name]
        if (value is not None or name in positive_ints) and not (_is_int(value) and value >= 1):
            allowed = "an integer >= 1" + (" or None" if name in optional_positive_ints else "")
            errors.append(f"{name}: {value!r} is not {allowed}")
    hidden = config["hidden_sizes"]
    if not isinstance(hidden, list) or not all(_is_int(h) and h >= 1 for h in hidden):
        errors.append(f"hidden_sizes: {hidden!r} is not a list of integers >= 1")
    if not (_is_number(config["learning_rate"]) and config["learning_rate"] > 0):
        errors.append(f"learning_rate: {config['learning_rate']!r} is not a number > 0")
    if not (_is_number(config["weight_decay"]) and config["weight_decay"] >= 0):
        errors.append(f"weight_decay: {config['weight_decay']!r} is not a number >= 0")
    for name in ("normalize", "pin_cpus", "retry_failed", "use_cuda"):
        if not isinstance(config[name], bool):
            errors.append(f"{name}: {config[name]!r} is not true or false")
    if config["executor"] not in EXECUTORS:
        errors.append(f"executor: {config['executor']!r} is not one of: {', '.join(EXECUTORS)}")
    elif config["executor"] == "dask" and not config["dask_scheduler"]:
        errors.append("executor='dask' needs dask_scheduler, the scheduler's address, e.g. tcp://HOST:8786")
    if config["use_cuda"] is True:
        if config["max_workers"] != 1:
            errors.append(f"use_cuda=True needs max_workers=1 (got {config['max_workers']!r}): "
                          "one process owns the GPU")
        elif not nm.torch.cuda.is_available():
            errors.append("use_cuda=True but torch sees no CUDA device; set use_cuda=False")
    return errors


def output_dir_error(output_dir: str) -> str | None:
    """Why output_dir cannot be written, checked without creating anything."""
    path = Path(output_dir).resolve()
    existing = next(parent for parent in [path, *path.parents] if parent.exists())
    if not existing.is_dir():
        return f"output_dir: {output_dir!r} is not a directory ({existing} is a file)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"output_dir: {output_dir!r} is not writable (no write permission on {existing})"
    return None


def validate(config: dict) -> None:
    """Raise ConfigError listing every problem, before anything runs or is written."""
    errors = config_errors(config)
    if not errors:
        errors += filter(None, [output_dir_error(config["output_dir"])])
        local_datasets = config["datasets"] if config["executor"] == "local" else []  # else the workers' data
        for dataset in dict.fromkeys(local_datasets):
            try:
                nm.ensure_dataset(dataset, config["data_dir"])
            except nm.DataNotFoundError as exc:
                errors.append(f"data_dir: {exc}")
    if errors:
        raise ConfigError("invalid campaign configuration:\n  - " + "\n  - ".join(errors))


# ---------------------------------------------------------------- grid


def repeat_seed(campaign_seed: int, repeat: int) -> int:
    """The seed of repeat r: the same at every p and noise type, so comparisons are paired."""
    return nm.stream_seed(campaign_seed, f"repeat/{repeat}") % 2**31


def run_key(cfg: nm.TrainConfig) -> str:
    """A stable id from every field that affects the run's result (threads and paths do not).
    Fields added later are left out at their default, so earlier run ids stay valid."""
    fields = {k: csv_value(v) for k, v in dataclasses.asdict(cfg).items()
              if k not in ("cpu_threads", "data_dir") and not (k in FIELD_DEFAULTS and v == FIELD_DEFAULTS[k])}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def ps_for(noise_type: str, config: dict) -> list[float]:
    extra = config["extra_label_ps"] if noise_type in nm.LABEL_NOISE_TYPES else []
    return sorted({float(p) for p in config["ps"] + extra})


def grid_cells(config: dict):
    """(dataset, model_type, activation, noise_type, loss_correction, p, repeat) of every run;
    loss corrections vary for the label noise types only (under pixel noise T = I)."""
    for dataset, model_type, activation, noise_type in itertools.product(
            config["datasets"], config["model_types"], config["activations"], config["noise_types"]):
        corrections = config["loss_corrections"] if noise_type in nm.LABEL_NOISE_TYPES else ["none"]
        for correction, p, repeat in itertools.product(corrections, ps_for(noise_type, config), range(config["repeats"])):
            yield dataset, model_type, activation, noise_type, correction, p, repeat


def build_grid(config: dict) -> list[RunSpec]:
    """datasets x model_types x activations x noise_types (x loss_corrections) x ps x repeats."""
    shared = dict(
        hidden_sizes=tuple(config["hidden_sizes"]), epochs=config["epochs"], batch_size=config["batch_size"],
        optimizer=config["optimizer"], learning_rate=float(config["learning_rate"]),
        weight_decay=float(config["weight_decay"]), normalize=config["normalize"],
        cpu_threads=config["cpu_threads_per_worker"], max_train_samples=config["max_train_samples"],
        data_dir=str(config["data_dir"]), use_cuda=config["use_cuda"], precision=config["precision"],
        validation_fraction=float(config["validation_fraction"]))
    matrix = parse_noise_matrix(config["noise_matrix"]) if "label_matrix" in config["noise_types"] else None
    specs = []
    for dataset, model_type, activation, noise_type, correction, p, repeat in grid_cells(config):
        cfg = nm.TrainConfig(
            dataset=dataset, model_type=model_type, activation=activation, noise_type=noise_type, p=p,
            loss_correction=correction, seed=repeat_seed(config["seed"], repeat),
            noise_matrix=matrix if noise_type == "label_matrix" else None,
            **shared)
        specs.append(RunSpec(run_key(cfg), repeat, cfg))
    return specs


def parse_noise_matrix(value) -> tuple[tuple[float, ...], ...] | None:
    """The config's noise_matrix (nested list, JSON text or a JSON file's path) as checked tuples."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            value = json.loads(value)
        elif Path(value).is_file():
            value = json.loads(Path(value).read_text())
        else:
            raise ValueError(f"{value!r} is neither JSON text (a list of rows) nor an existing .json file")
    nm.check_noise_matrix(value)
    return tuple(tuple(float(x) for x in row) for row in value)


def resolved_workers(config: dict) -> int:
    return config["max_workers"] or max(1, usable_cpus() // config["cpu_threads_per_worker"])


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- one run, in a worker

_started_runs = None  # queue through which local workers announce the run they start


def init_worker(threads: int, cpu_slots: list[list[int]] | None, slot_counter, started_runs) -> None:
    """Pin this worker's thread count (and cores), once, when the pool starts it."""
    global _started_runs
    _started_runs = started_runs
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the driver's handler, inherited by fork
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    nm.torch.set_num_threads(threads)
    if cpu_slots:
        with slot_counter.get_lock():
            slot = slot_counter.value % len(cpu_slots)
            slot_counter.value += 1
        os.sched_setaffinity(0, cpu_slots[slot])


def run_one(spec: RunSpec) -> dict:
    """Train and evaluate one grid cell; an exception becomes a `failed` record, never a crash."""
    if _started_runs is not None:
        _started_runs.put(spec.run_id)
    record = {"run_id": spec.run_id, "repeat": spec.repeat}
    try:
        result = nm.train_and_evaluate(spec.config)
        record.update(status="ok", error="")
    except Exception as exc:
        result = dataclasses.asdict(spec.config)
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc())
    record.update({k: csv_value(v) for k, v in result.items()})
    record["finished_at"] = now()
    return record


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- executing the grid


def cpu_slots_for(workers: int, threads: int) -> list[list[int]] | None:
    """Disjoint sets of cores, one per worker, or None when pinning is impossible."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if workers * threads > len(cpus):
        return None
    return [cpus[i * threads : (i + 1) * threads] for i in range(workers)]


def worker_died_record(spec: RunSpec, attempts: int) -> dict:
    record = {"run_id": spec.run_id, "repeat": spec.repeat, "status": "failed", "attempts": attempts,
              "error": f"worker process died {attempts} times while running this run "
                       "(killed, out of memory or crashed)", "finished_at": now()}
    record.update({k: csv_value(v) for k, v in dataclasses.asdict(spec.config).items()})
    return record


def drain(queue) -> set[str]:
    items = set()
    while not queue.empty():
        items.add(queue.get())
    return items


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what is queued and stop the worker processes now, without waiting for runs."""
    pool.shutdown(wait=False, cancel_futures=True)
    for child in multiprocessing.active_children():
        child.terminate()


def pool_context(threads: int, use_cuda: bool):
    """How to start the pool's workers. Forked from this process, they share its decoded dataset
    copy-on-write. But a forked child cannot start OpenMP threads (it hangs) if this process
    has already run multi-threaded torch ops, as a notebook kernel may have, nor use CUDA once
    this process has asked torch about the GPU: so workers of several threads, and CUDA
    workers, are forked from a fresh server process instead, each decoding the data."""
    methods = multiprocessing.get_all_start_methods()
    if (threads > 1 or use_cuda) and "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["nnet_models"])
        return context
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def run_pool(specs: list[RunSpec], workers: int, config: dict, on_done) -> set[str]:
    """Run specs on a fresh process pool, calling on_done(record) for each finished run.

    Returns the ids of the runs that were in flight when a worker process died (which breaks
    the whole pool), or an empty set when every run finished.
    """
    threads = config["cpu_threads_per_worker"]
    context = pool_context(threads, config["use_cuda"])
    slots = cpu_slots_for(workers, threads) if config["pin_cpus"] else None
    started = context.SimpleQueue()
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker,
                               initargs=(threads, slots, context.Value("i", 0), started))
    unfinished = {spec.run_id for spec in specs}
    try:
        futures = [pool.submit(run_one, spec) for spec in specs]
        for future in as_completed(futures):
            if future.exception() is None:
                record = future.result()
                unfinished.discard(record["run_id"])
                on_done(record)
            elif not isinstance(future.exception(), BrokenProcessPool):
                raise future.exception()
    except BaseException:
        stop_pool(pool)
        raise
    pool.shutdown(wait=True)
    return drain(started) & unfinished


def execute_local(specs: list[RunSpec], config: dict, on_record) -> None:
    """Run specs on a local process pool; a pool broken by a dead worker is replaced.

    The runs that were in flight when a worker died are suspects: each is rerun alone, so only
    a run that kills its worker while alone is charged a crash (and after `max_attempts`
    crashes recorded as failed); the innocent ones simply finish. A record's `attempts` counts
    every start of the run, interrupted ones included.
    """
    remaining = {spec.run_id: spec for spec in specs}
    interruptions = dict.fromkeys(remaining, 0)
    crashes = dict.fromkeys(remaining, 0)
    suspects: set[str] = set()

    def on_done(record: dict) -> None:
        del remaining[record["run_id"]]
        record["attempts"] = 1 + interruptions[record["run_id"]]
        on_record(record)

    def after_crash(in_flight: set[str]) -> None:
        print(f"A worker process died while running {len(in_flight)} run(s); rerunning them one at a "
              "time to find the one that crashes.", file=sys.stderr, flush=True)
        for run_id in in_flight:
            interruptions[run_id] += 1
        if len(in_flight) == 1:  # it was alone: the culprit
            (run_id,) = in_flight
            crashes[run_id] += 1
            if crashes[run_id] >= config["max_attempts"]:
                on_record(worker_died_record(remaining.pop(run_id), interruptions[run_id]))
                return
        suspects.update(in_flight)

    while remaining:
        if suspects:
            alone = suspects.pop()
            in_flight = run_pool([remaining[alone]], 1, config, on_done)
        else:
            in_flight = run_pool(list(remaining.values()), resolved_workers(config), config, on_done)
        if in_flight:
            after_crash(in_flight)


def execute(specs: list[RunSpec], config: dict, on_record) -> None:
    if config["executor"] == "dask":
        import dask_executor  # dask is needed for executor = "dask" alone

        dask_executor.execute_dask(specs, config, on_record)
    else:
        execute_local(specs, config, on_record)


# ---------------------------------------------------------------- campaign bookkeeping


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def campaign_metadata(config: dict, grid_size: int) -> dict:
    import numpy

    return {
        "config": config, "grid_size": grid_size,
        "versions": {"python": platform.python_version(), "torch": nm.torch.__version__,
                     "numpy": numpy.__version__},
        "git_commit": git_commit(), "host": platform.node(), "cpu_count": os.cpu_count(),
        "workers": resolved_workers(config), "started_at": now(), "finished_at": None,
    }


def count_statuses(specs: list[RunSpec], records: dict[str, dict]) -> dict[str, int]:
    statuses = [records[s.run_id]["status"] if s.run_id in records else "pending" for s in specs]
    return {"done": statuses.count("ok"), "failed": statuses.count("failed"),
            "pending": statuses.count("pending")}


def write_metadata(path: Path, metadata: dict, specs, records) -> None:
    metadata["counts"] = count_statuses(specs, records)
    metadata["updated_at"] = now()
    atomic_write_text(path, json.dumps(metadata, indent=2, default=str))


def runs_to_do(specs: list[RunSpec], records: dict[str, dict], config: dict) -> list[RunSpec]:
    """Runs never finished, plus failed ones while retry_failed and tries are left."""
    def needs_run(spec):
        record = records.get(spec.run_id)
        if record is None:
            return True
        return (record["status"] == "failed" and config["retry_failed"]
                and record.get("attempts", 1) < config["max_attempts"])
    return [spec for spec in specs if needs_run(spec)]


def move_aside(output_dir: Path) -> Path | None:
    """For --fresh: rename an existing output_dir to a timestamped sibling (never delete)."""
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    target = output_dir.with_name(f"{output_dir.name}.old-{stamp}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = output_dir.with_name(f"{output_dir.name}.old-{stamp}-{suffix}")
    output_dir.rename(target)
    return target


def describe_run(record: dict) -> str:
    correction = " +forward" if record.get("loss_correction") == "forward" else ""
    head = (f"{record['model_type']}/{record['activation']} {record['noise_type']}{correction} "
            f"p={record['p']:.2f} r{record['repeat']}")
    if record["status"] != "ok":
        return f"[FAILED] {head}: {record['error']}"
    return (f"[ok] {head}: acc={record['test_accuracy']:.4f} loss={record['test_loss']:.4f} "
            f"({record['seconds']:.1f}s)")


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def finish(output_dir: Path, records: dict[str, dict], specs, metadata) -> None:
    """Regenerate the CSVs (and headline figures) from everything stored."""
    write_csvs(list(records.values()), output_dir)
    write_metadata(output_dir / "campaign.json", metadata, specs, records)
    try:
        import plots

        plots.write_headline_figures(output_dir)
    except Exception as exc:  # figures are a convenience; the CSVs are the result
        print(f"Could not draw the figures: {type(exc).__name__}: {exc}", file=sys.stderr)


def run_campaign(config: dict, fresh: bool = False) -> int:
    """Run every missing run of the grid; returns the process exit code."""
    from tqdm import tqdm

    specs = build_grid(config)
    output_dir = Path(config["output_dir"])
    if fresh and (moved := move_aside(output_dir)):
        print(f"Moved the previous results to {moved}")
    output_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore(output_dir)
    records = store.load()
    todo = runs_to_do(specs, records, config)
    metadata = campaign_metadata(config, len(specs))
    write_metadata(output_dir / "campaign.json", metadata, specs, records)
    if config["executor"] == "local":
        warn_oversubscription(config)
        for dataset in dict.fromkeys(config["datasets"]):  # fails here if unreadable; forked workers share it
            nm.load_dataset(dataset, config["data_dir"])
        where = f"{resolved_workers(config)} workers x {config['cpu_threads_per_worker']} threads"
    else:
        where = f"the Dask cluster at {config['dask_scheduler']}"
    given_up = len(specs) - len(todo) - count_statuses(specs, records)["done"]
    print(f"{len(specs)} runs in the grid, {len(specs) - len(todo) - given_up} already done, "
          + (f"{given_up} failed for good (out of attempts), " if given_up else "") +
          f"{len(todo)} to run on {where}. Results: {output_dir}/", flush=True)

    progress = tqdm(total=len(todo), unit="run", dynamic_ncols=True, disable=not todo)

    csvs_written_at = time.monotonic()

    def on_record(record: dict) -> None:
        nonlocal csvs_written_at
        previous = records.get(record["run_id"], {})
        record["attempts"] = record.get("attempts", 1) + previous.get("attempts", 0)
        store.save(record)  # persisted before anything is printed about it
        records[record["run_id"]] = record
        write_metadata(output_dir / "campaign.json", metadata, specs, records)
        if time.monotonic() - csvs_written_at > CSV_REFRESH_SECONDS:  # the notebook can follow along
            write_csvs(list(records.values()), output_dir)
            csvs_written_at = time.monotonic()
        progress.write(describe_run(record))
        progress.update()

    previous_sigterm = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    interrupted = False
    try:
        execute(todo, config, on_record)
    except KeyboardInterrupt:
        interrupted = True
    except ConnectionError as exc:  # the Dask scheduler is unreachable or went away mid-campaign
        progress.write(f"error: {exc}", file=sys.stderr)
        interrupted = True  # every finished run is stored; the CSVs are written below
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        progress.close()
    metadata["finished_at"] = None if interrupted else now()
    records = store.load()  # the files are the truth: a signal may land between a save and its bookkeeping
    finish(output_dir, records, specs, metadata)
    return report_outcome(specs, records, output_dir, interrupted)


def report_outcome(specs, records, output_dir: Path, interrupted: bool) -> int:
    counts = count_statuses(specs, records)
    print(f"Done: {counts['done']} ok, {counts['failed']} failed, {counts['pending']} pending. "
          f"CSVs in {output_dir}/")
    if interrupted:
        print("Interrupted. Every finished run is saved; run the same command again to resume.")
        return 130
    failed = [records[s.run_id] for s in specs if records.get(s.run_id, {}).get("status") == "failed"]
    for record in failed:
        print(f"  failed run {record['run_id']}: {describe_run(record)}")
    return 1 if failed else 0


def warn_oversubscription(config: dict) -> None:
    workers, threads = resolved_workers(config), config["cpu_threads_per_worker"]
    if workers * threads > usable_cpus():
        warnings.warn(f"max_workers x cpu_threads_per_worker = {workers} x {threads} exceeds the "
                      f"{usable_cpus()} CPUs available: runs will compete for cores and slow down")


def calibrate(cfg: nm.TrainConfig) -> tuple[float, float]:
    """(training samples per second, other seconds per epoch: set-up and evaluation) of one
    run's kind, from the faster of two one-epoch runs (after a warm-up), as other load on the
    machine only ever slows a run down."""
    one_epoch = dataclasses.replace(cfg, epochs=1, max_train_samples=8192 if cfg.model_type == "mlp" else 1024)
    nm.train_and_evaluate(dataclasses.replace(one_epoch, max_train_samples=256))  # warm-up
    best = min((nm.train_and_evaluate(one_epoch) for _ in range(2)), key=lambda result: result["seconds"])
    return one_epoch.max_train_samples / best["train_seconds"], best["seconds"] - best["train_seconds"]


def estimate_seconds(specs: list[RunSpec]) -> list[float]:
    """Estimated seconds of each run, calibrating once per kind of run (model, batch, pixel noise or not)."""
    rates = {}
    estimates = []
    for spec in specs:
        cfg = spec.config
        kind = (cfg.dataset, cfg.model_type, cfg.hidden_sizes, cfg.batch_size,
                cfg.draws_pixel_noise, cfg.use_cuda, cfg.precision)
        if kind not in rates:
            dataset_size = len(nm.load_dataset(cfg.dataset, cfg.data_dir).train_labels)
            rates[kind] = (*calibrate(cfg), min(cfg.max_train_samples or dataset_size, dataset_size))
        samples_per_second, fixed, n_train = rates[kind]
        estimates.append(cfg.epochs * (n_train / samples_per_second + fixed))
    return estimates


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_dry_run(config: dict) -> None:
    """The grid, then a wall-time and memory estimate from a few seconds of calibration."""
    specs = build_grid(config)
    for spec in specs:
        cfg = spec.config
        print(f"{spec.run_id} {cfg.dataset} {cfg.model_type}/{cfg.activation} {cfg.noise_type} "
              f"p={cfg.p:.2f} repeat={spec.repeat} seed={cfg.seed} epochs={cfg.epochs}")
    workers, threads = resolved_workers(config), config["cpu_threads_per_worker"]
    print(f"{len(specs)} runs in the grid; {workers} workers x {threads} threads; "
          f"output_dir={config['output_dir']}")
    print("Calibrating: three short runs of each kind (model, noise kind), ~5 s for an MLP, ~15 s for a CNN...",
          flush=True)
    nm.torch.set_num_threads(threads)
    seconds = estimate_seconds(specs)
    wall = max(sum(seconds) / workers, max(seconds))
    unit = "minutes on the GPU" if config["use_cuda"] else f"CPU-minutes ({threads} thread(s))"
    memory_mb = peak_rss_mb()
    print(f"Estimated per run: {min(seconds) / 60:.1f}-{max(seconds) / 60:.1f} {unit}; "
          f"campaign wall time ~ {wall / 3600:.1f} h ({wall / 60:.0f} min) on {workers} workers; "
          f"peak memory ~ {memory_mb:.0f} MB per worker, ~ {workers * memory_mb / 1024:.1f} GB in all "
          f"(upper bounds: each worker counts the pages it shares).")


def main(argv: list[str] | None = None) -> int:
    config, args = config_from_args(argv)
    try:
        validate(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_dry_run(config)
        return 0
    return run_campaign(config, fresh=args.fresh)


if __name__ == "__main__":
    sys.exit(main())
