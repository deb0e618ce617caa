"""executors.LocalExecutor: a function over items on worker processes, whatever the items are.

Outcomes come back once per item: the return value, the exception raised, or WorkerDied for
an item that killed its worker process (SIGKILL, as the OOM killer does) every time it ran
alone. Workers are real processes; the deaths and freezes are real signals. (DaskExecutor:
tests/test_dask.py.)
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

import executors
import nnet_models as nm
from executor_tasks import odd_raises, square, stops_its_worker

ROOT = Path(__file__).resolve().parents[1]
BARRIER = None  # set by a test before the pool forks: the workers inherit it
PARENT_MARK = "as imported"


def run_local(fn, items, workers: int, **options):
    """The (item, outcome) generator of a LocalExecutor given `items`."""
    executor = executors.LocalExecutor(fn, workers, **options)
    for item in items:
        executor.submit(item)
    return executor.as_completed()


def outcomes_by_item(pairs) -> dict:
    pairs = list(pairs)
    counts = Counter(item for item, _ in pairs)
    assert max(counts.values()) == 1, f"items with more than one outcome: {counts.most_common(3)}"
    return dict(pairs)


def test_every_item_gets_its_outcome_once():
    assert outcomes_by_item(run_local(square, range(20), workers=2)) == {i: i * i for i in range(20)}
    assert list(run_local(square, [], workers=2)) == []


def test_exceptions_come_back_as_outcomes_and_the_other_items_finish():
    outcomes = outcomes_by_item(run_local(odd_raises, range(8), workers=2))
    assert {i: outcomes[i] for i in range(0, 8, 2)} == {0: 0, 2: 2, 4: 4, 6: 6}
    for i in range(1, 8, 2):
        assert isinstance(outcomes[i], ValueError) and str(outcomes[i]) == f"odd item {i}"


# ---------------------------------------------------------------- workers that die


def act(item):
    """item = (name, what, folder). Every start is logged as a line in folder/<name>.starts."""
    name, what, folder = item
    folder = Path(folder)
    with open(folder / f"{name}.starts", "a") as log:
        log.write(f"{os.getpid()}\n")
    first_time = len((folder / f"{name}.starts").read_text().splitlines()) == 1
    if what == "dies" or (what == "dies-once" and first_time):
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "dies-beside-neighbour":  # dies once the neighbour is running too (or at once, later)
        wait_for(folder / "neighbour.starts")
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "neighbour":  # still running when the worker beside it dies, and after
        wait_for(folder / "culprit.starts", lines=2)
    return f"{name} done"


def wait_for(path: Path, timeout: float = 60, lines: int = 0) -> None:
    """Until `path` exists with at least `lines` lines."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= lines) and time.monotonic() < deadline:
        time.sleep(0.01)


def starts(folder: Path, name: str) -> int:
    path = folder / f"{name}.starts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_an_item_that_always_kills_its_worker_gets_worker_died_after_max_attempts(tmp_path):
    items = [(f"ok{i}", "returns", str(tmp_path)) for i in range(4)]
    items.insert(2, ("culprit", "dies", str(tmp_path)))
    outcomes = outcomes_by_item(run_local(act, items, workers=1, max_attempts=2))
    culprit = outcomes.pop(items[2])
    assert isinstance(culprit, executors.WorkerDied)
    assert culprit.attempts == 2 and "worker process died 2 times" in str(culprit)
    assert starts(tmp_path, "culprit") == 2
    assert outcomes == {item: f"{item[0]} done" for item in items if item[0] != "culprit"}


def test_only_the_culprit_is_charged_for_deaths_not_the_item_running_beside_it(tmp_path):
    """The neighbour is running when the culprit's worker dies: it runs on undisturbed, and only the
    culprit is charged, up to max_attempts."""
    folder = str(tmp_path)
    items = [("culprit", "dies-beside-neighbour", folder), ("neighbour", "neighbour", folder),
             *[(f"ok{i}", "returns", folder) for i in range(3)]]
    outcomes = outcomes_by_item(run_local(act, items, workers=2, max_attempts=3))
    culprit = outcomes.pop(items[0])
    assert isinstance(culprit, executors.WorkerDied) and culprit.attempts == 3
    assert starts(tmp_path, "culprit") == 3
    assert starts(tmp_path, "neighbour") == 1  # never interrupted, never rerun
    assert outcomes == {item: f"{item[0]} done" for item in items[1:]}


def test_an_item_whose_worker_died_once_finishes_when_rerun(tmp_path):
    items = [("flaky", "dies-once", str(tmp_path)), *[(f"ok{i}", "returns", str(tmp_path)) for i in range(5)]]
    outcomes = outcomes_by_item(run_local(act, items, workers=2, max_attempts=2))
    assert outcomes == {item: f"{item[0]} done" for item in items}
    assert starts(tmp_path, "flaky") == 2


def pid_or_echo(item):
    return os.getpid() if item == "pid" else item


def test_a_worker_that_died_while_idle_is_replaced_without_charging_the_next_item():
    executor = executors.LocalExecutor(pid_or_echo, workers=1, max_attempts=1)
    executor.submit("pid")
    outcomes = executor.as_completed()
    _, worker = next(outcomes)
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 60  # until it is dead, its last thread too, and left for the executor to reap
    while psutil.Process(worker).status() != psutil.STATUS_ZOMBIE or len(os.listdir(f"/proc/{worker}/task")) > 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    executor.submit("next")
    assert list(outcomes) == [("next", "next")]


def pid_then_block(item):
    index, folder = item
    if index == 0:
        return os.getpid()
    (Path(folder) / f"{os.getpid()}.pid").touch()
    time.sleep(120)


def test_closing_the_outcomes_early_stops_the_workers(tmp_path):
    """What Ctrl-C in the consumer does: the items still running are abandoned, and no worker
    process is left behind."""
    outcomes = run_local(pid_then_block, [(i, str(tmp_path)) for i in range(4)], workers=2)
    item, first_pid = next(outcomes)
    assert item[0] == 0
    deadline = time.monotonic() + 60  # until the other worker runs item 1 (item 2 waits: the consumer is paused)
    while not list(tmp_path.glob("*.pid")) and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = {int(p.stem) for p in tmp_path.glob("*.pid")} | {first_pid}
    assert len(workers) == 2
    outcomes.close()
    # gone by now, not merely signalled: a forked worker holds the caller's open files (a
    # campaign's output-directory lock) for as long as it lives
    assert [pid for pid in workers if psutil.pid_exists(pid)] == []


# ---------------------------------------------------------------- workers that freeze


THAW_AFTER = 120  # seconds


@pytest.fixture
def thaw(tmp_path):
    """Continues (SIGCONT) the processes that tasks stopped, every THAW_AFTER seconds: a test of
    stall detection then fails instead of hanging when nothing detects the stall."""
    done = threading.Event()

    def continue_stopped() -> None:
        while not done.wait(THAW_AFTER):
            for pid in (int(line) for path in tmp_path.glob("*.pid") for line in path.read_text().split()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    threading.Thread(target=continue_stopped, daemon=True).start()
    yield
    done.set()


def stall_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "looks stalled" in str(w.message)]


def frozen_pids(folder: Path, name: str) -> list[int]:
    return [int(line) for line in (folder / f"{name}.pid").read_text().split()]


def test_a_frozen_worker_is_named_killed_and_its_run_rerun(tmp_path, thaw):
    """A worker stopped by SIGSTOP mid-run: once the run has taken over 5 times as long as the
    slowest finished one (at least 1 s here), a warning names the run and the worker's pid, the
    worker is killed and the run runs again on a new one."""
    items = [(name, str(tmp_path)) for name in ("a", "b", "c", "d", "freeze-once", "e", "f", "g")]
    with pytest.warns(UserWarning) as caught:
        outcomes = outcomes_by_item(run_local(stops_its_worker, items, workers=2, min_stall_seconds=1))
    assert outcomes == {item: item[0] for item in items}
    [pid] = frozen_pids(tmp_path, "freeze-once")
    [warning] = stall_warnings(caught)
    assert warning.startswith(f"{items[4]!r} has run for ") and f" s on worker process {pid} (" in warning
    assert "the slowest finished run of its kind took 0 s; stalled_run_factor = 5)" in warning
    assert not psutil.pid_exists(pid)


def test_a_run_that_freezes_every_time_gets_worker_died_after_max_attempts(tmp_path, thaw):
    items = [(name, str(tmp_path)) for name in ("a", "b", "freeze", "c")]
    with pytest.warns(UserWarning) as caught:
        outcomes = outcomes_by_item(run_local(stops_its_worker, items, workers=2, max_attempts=2,
                                              min_stall_seconds=1))
    frozen = outcomes.pop(items[2])
    assert isinstance(frozen, executors.WorkerDied) and frozen.attempts == 2
    assert outcomes == {item: item[0] for item in items if item[0] != "freeze"}
    pids = frozen_pids(tmp_path, "freeze")
    assert len(pids) == 2 and len(stall_warnings(caught)) == 2
    assert [pid for pid in pids if psutil.pid_exists(pid)] == []


def pid_after_go(item):
    """item = (name, folder): the worker's pid; "b" returns once folder/go exists."""
    name, folder = item
    if name == "b":
        wait_for(Path(folder) / "go")
    return os.getpid()


def test_a_run_sent_to_a_worker_frozen_while_idle_is_named_stalled_and_rerun_elsewhere(tmp_path, thaw):
    """A worker frozen between runs: the next run it is sent stalls there, is named with the worker's
    pid, and runs again on another worker once that one is killed."""
    executor = executors.LocalExecutor(pid_after_go, 2, pin_cpus=False, min_stall_seconds=1)
    for name in ("a", "b"):
        executor.submit((name, str(tmp_path)))
    pids = {}
    with pytest.warns(UserWarning) as caught:
        for (name, _), pid in executor.as_completed():
            pids[name] = pid
            if name == "a":  # while "b" runs on the other worker
                os.kill(pid, signal.SIGSTOP)
                (tmp_path / "idle.pid").write_text(str(pid))
                executor.submit(("c", str(tmp_path)))
                (tmp_path / "go").touch()
    assert sorted(pids) == ["a", "b", "c"] and pids["c"] != pids["a"]
    [warning] = stall_warnings(caught)
    assert warning.startswith(f"{('c', str(tmp_path))!r} has run for ")
    assert f" s on worker process {pids['a']} (" in warning and not psutil.pid_exists(pids["a"])


# ---------------------------------------------------------------- how many workers


def pool_size(item):
    """The number of worker processes in this worker's pool: the caller's forked children."""
    parent = psutil.Process(os.getppid())
    return sum(child.cmdline() == parent.cmdline() for child in parent.children())


def test_no_more_workers_start_than_there_are_items_and_later_items_widen_the_pool():
    executor = executors.LocalExecutor(pool_size, workers=4, pin_cpus=False)
    for item in range(2):
        executor.submit(item)
    outcomes = []
    for item, outcome in executor.as_completed():
        if not outcomes:
            for later in range(2, 8):
                executor.submit(later)
        outcomes.append((item, outcome))
    sizes = outcomes_by_item(outcomes)
    assert sorted(sizes) == list(range(8))
    assert max(sizes[0], sizes[1]) <= 2  # not 4 processes for 2 items
    assert max(sizes[item] for item in range(2, 8)) == 4


def test_worker_counts_beyond_the_os_limits_are_refused():
    import resource

    import run_experiments as rx

    config = {**rx.config_from_args(["--allow_oversubscription", "true"])[0], "max_workers": 60}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))  # room for 50 workers
    try:
        assert executors.max_local_workers() == 50
        [error] = rx.placement_errors(config)
        assert error.startswith("max_workers: 60 worker processes are more than this system holds (at most 50, ")
        assert rx.placement_errors({**config, "max_workers": 50}) == []
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert rx.placement_errors({**config, "max_workers": executors.MAX_LOCAL_WORKERS + 1})


# ---------------------------------------------------------------- threads, affinity, start method


def describe_worker(item):
    if BARRIER is not None:
        BARRIER.wait(timeout=60)  # every worker holds an item at once
    return {"pid": os.getpid(), "cpus": sorted(os.sched_getaffinity(0)), "omp": os.environ.get("OMP_NUM_THREADS"),
            "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN, "mark": PARENT_MARK,
            "datasets": sorted(key[0] for key in nm._DATASET_CACHE)}


@pytest.fixture
def two_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two usable CPUs")
    return cpus


def test_pinned_workers_get_disjoint_cores(two_cpus, monkeypatch):
    import multiprocessing

    monkeypatch.setattr(sys.modules[__name__], "BARRIER", multiprocessing.get_context("fork").Barrier(2))
    outcomes = outcomes_by_item(run_local(describe_worker, range(2), workers=2, threads=1, pin_cpus=True))
    assert len({o["pid"] for o in outcomes.values()}) == 2
    assert sorted(o["cpus"] for o in outcomes.values()) == [[two_cpus[0]], [two_cpus[1]]]
    assert {o["omp"] for o in outcomes.values()} == {"1"}
    assert all(o["sigint_ignored"] for o in outcomes.values())  # Ctrl-C is the driver's to handle


def test_unpinned_workers_may_use_every_core(two_cpus):
    outcomes = outcomes_by_item(run_local(describe_worker, range(2), workers=2, threads=1, pin_cpus=False))
    assert all(o["cpus"] == two_cpus for o in outcomes.values())


def test_more_threads_than_cores_leaves_workers_unpinned(two_cpus):
    outcomes = outcomes_by_item(run_local(describe_worker, range(2), workers=len(two_cpus), threads=2))
    assert all(o["cpus"] == two_cpus for o in outcomes.values())


def test_single_threaded_workers_fork_and_share_the_decoded_dataset(mnist, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "PARENT_MARK", "set in the parent")
    outcome = next(run_local(describe_worker, [0], workers=1, threads=1))[1]
    assert outcome["mark"] == "set in the parent"  # the parent's memory, as it was at the fork
    assert "mnist" in outcome["datasets"]


def test_multithreaded_workers_start_from_a_forkserver(two_cpus, monkeypatch):
    """A child forked from a process that ran OpenMP threads hangs on its first multi-threaded
    op, so workers of several threads do not fork from the caller (nor do CUDA workers)."""
    monkeypatch.setattr(sys.modules[__name__], "PARENT_MARK", "set in the parent")
    outcome = next(run_local(describe_worker, [0], workers=1, threads=2, pin_cpus=True))[1]
    assert outcome["mark"] == "as imported"  # not the caller's memory
    assert outcome["omp"] == "2"
    assert outcome["cpus"] == two_cpus[:2]


def test_usable_cpus_follow_the_affinity_mask():
    """In a container or under taskset the CPU count overstates what a process may use."""
    code = ("import os, executors, run_experiments as rx\n"
            "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
            "config = rx.config_from_args(['--max_workers', 'none'])[0]\n"
            "print(executors.usable_cpus(), rx.resolved_workers(config))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"]
    assert executors.usable_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("executor", ["local", "dask"])
@pytest.mark.parametrize("factor", [1.5, 0, "5", True, float("inf")])
def test_stalled_run_factor_must_be_a_number_of_at_least_2(executor, factor):
    import run_experiments as rx

    config = {**rx.config_from_args([])[0], "executor": executor, "dask_scheduler": "tcp://10.0.0.5:8786"}
    assert rx.config_errors(config) == []
    assert rx.config_errors({**config, "stalled_run_factor": factor}) == \
        [f"stalled_run_factor: {factor!r} is not a number >= 2"]
