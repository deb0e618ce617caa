"""executors.DaskExecutor against a real `dask scheduler` and `dask worker` processes on 127.0.0.1.

The scheduler and workers are started as a user would start them on another machine: from
another directory, with no PYTHONPATH, so they have the Python environment but none of this
project's modules; the campaign sends its modules to them (Client.upload_file).
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("distributed")
import cloudpickle
import psutil
from distributed import Client

import executors
import nnet_models as nm
import results_store as rs
import run_experiments as rx
from conftest import TINY_RUNS, per_run_lines, run_files, run_main, same

ROOT = Path(__file__).resolve().parents[1]
SCHEDULER = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
WORKER = [str(Path(sys.executable).parent / "dask"), "worker"]  # the environment's `dask` command
if not Path(WORKER[0]).is_file():
    WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]
VOLATILE = {"seconds", "train_seconds", "finished_at", "attempts"}  # what may differ between executions


class LoopbackCluster:
    """A scheduler and single-threaded workers as subprocesses started in `directory`, each in
    its own process group, without PYTHONPATH, every listener bound to 127.0.0.1 as
    docs/cluster.md says. A task that killed 2 workers is given up."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = "1"
        self.env["DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION"] = "1.0"  # as docs/cluster.md advises
        self.procs: list[subprocess.Popen] = []
        self.address = None
        self.client = None

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        with open(self.directory / f"{name}-{len(self.procs)}.log", "w") as log:
            proc = subprocess.Popen(command, cwd=self.directory, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_scheduler(self) -> str:
        scheduler_file = self.directory / "scheduler.json"
        proc = self._spawn("scheduler", [*SCHEDULER, "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                                         "127.0.0.1:0", "--scheduler-file", str(scheduler_file)])
        deadline = time.monotonic() + 120
        while self.address is None:
            assert proc.poll() is None and time.monotonic() < deadline, "dask scheduler did not start"
            try:
                self.address = json.loads(scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
        assert self.address.startswith("tcp://127.0.0.1:")
        self.client = Client(self.address, timeout=60, set_as_default=False)
        return self.address

    def start_worker(self) -> subprocess.Popen:
        return self._spawn("worker", [*WORKER, self.address, "--host", "127.0.0.1", "--dashboard-address",
                                      "127.0.0.1:0", "--nworkers", "1", "--nthreads", "1", "--death-timeout", "60",
                                      "--local-directory", str(self.directory / "workers")])

    def worker_count(self) -> int:
        return len(self.client.nthreads())

    def wait_for_workers(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.worker_count() != n:
            assert time.monotonic() < deadline, f"{self.worker_count()} dask workers connected, expected {n}"
            time.sleep(0.1)

    def wait_until_idle(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while any(self.client.processing().values()):
            assert time.monotonic() < deadline, f"tasks still on the workers: {self.client.processing()}"
            time.sleep(0.1)

    def kill_group(self, pid: int) -> None:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        if self.client is not None:
            executors._close_quietly(self.client)
        for proc in self.procs:
            self.kill_group(proc.pid)
            proc.wait(timeout=30)


def start_cluster(directory: Path, workers: int) -> LoopbackCluster:
    cluster = LoopbackCluster(directory)
    try:
        cluster.start_scheduler()
        for _ in range(workers):
            cluster.start_worker()
        cluster.wait_for_workers(workers)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("dask-cluster"), workers=2)
    # the workers have this project's environment but not its modules
    assert set(cluster.client.run(os.getcwd).values()) == {str(cluster.directory)}
    assert set(cluster.client.run(eval, "__import__('importlib.util').util.find_spec('run_experiments')").values()) \
        == {None}
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def tasks():
    """The tasks module: importable here, and a file to upload to the workers, which cannot import it."""
    import executor_tasks

    return executor_tasks


def dask_argv(address, mnist_dir, out, *extra) -> list[str]:
    """8 runs (relu x {label_uniform, pixel_uniform} x p {0, 0.5} x 2 repeats), 500 samples, 1 epoch."""
    return ["--executor", "dask", "--dask_scheduler", address, "--activations", "relu",
            "--noise_types", "label_uniform,pixel_uniform", "--ps", "0,0.5", "--extra_label_ps", "",
            "--repeats", "2", "--epochs", "1", "--max_train_samples", "500", "--hidden_sizes", "16",
            "--data_dir", str(mnist_dir), "--output_dir", str(out), *extra]


def config_of(argv) -> dict:
    config = rx.config_from_args(argv)[0]
    rx.validate(config)
    return config


def run_dask(fn, items, address: str, **options):
    """The (item, outcome) generator of a DaskExecutor given `items`."""
    executor = executors.DaskExecutor(fn, address, **options)
    for item in items:
        executor.submit(item)
    return executor.as_completed()


def outcomes_by_item(pairs) -> dict:
    pairs = list(pairs)
    counts = collections.Counter(item for item, _ in pairs)
    assert max(counts.values(), default=1) == 1, f"items with more than one outcome: {counts.most_common(3)}"
    return dict(pairs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_sockets(proc: subprocess.Popen) -> dict[str, list[str]]:
    """"ADDRESS:PORT" of every listening TCP socket of a process and of its children, by process name and pid."""
    processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    return {f"{p.name()} {p.pid}": [f"{c.laddr.ip}:{c.laddr.port}" for c in p.net_connections("tcp")
                                     if c.status == psutil.CONN_LISTEN] for p in processes}


# ---------------------------------------------------------------- no cluster needed


def test_tasks_ship_only_the_run_spec(mnist_dir, tmp_path):
    spec = rx.build_grid(config_of(dask_argv("tcp://127.0.0.1:8786", mnist_dir, tmp_path)))[0]
    nm.load_dataset("mnist", mnist_dir)  # a cached dataset in this process must not leak into tasks
    payload = cloudpickle.dumps((rx.run_one, spec))
    assert len(payload) < 2_000


def test_no_scheduler_gives_a_clear_connection_error(tasks):
    address = f"tcp://127.0.0.1:{free_port()}"
    outcomes = run_dask(tasks.square, [1, 2], address, connect_timeout=1)
    with pytest.raises(ConnectionError, match="no Dask scheduler answered at 'tcp://127.0.0.1:") as info:
        next(outcomes)
    assert isinstance(info.value, executors.SchedulerUnavailableError)
    assert address in str(info.value) and "within 1 s" in str(info.value) and "dask scheduler" in str(info.value)


@pytest.mark.slow
def test_a_campaign_without_its_scheduler_stops_with_the_error(mnist_dir, tmp_path, no_figures):
    out = tmp_path / "results"
    address = f"tcp://127.0.0.1:{free_port()}"
    code, stdout, stderr = run_main(dask_argv(address, mnist_dir, out))
    assert code == 1, stdout + stderr  # an error, not an interruption
    assert f"error: no Dask scheduler answered at {address!r}" in stderr
    assert f"{TINY_RUNS} runs in the grid, 0 already done, {TINY_RUNS} to run on the Dask cluster at {address}." in stdout
    assert f"0 ok, 0 failed, 0 diverged, {TINY_RUNS} pending." in stdout and "run the same command again to resume" in stdout
    assert run_files(out) == {}


# ---------------------------------------------------------------- real scheduler and workers


def test_every_listener_of_the_cluster_is_bound_to_the_loopback_interface(cluster):
    """docs/cluster.md's flags: the scheduler (its port and its HTTP server, which serves metrics
    and task information even with --no-dashboard), each nanny, each worker and its HTTP server."""
    scheduler, *workers = (listening_sockets(proc) for proc in cluster.procs[:3])
    assert len(scheduler) == 1 and len(next(iter(scheduler.values()))) == 2
    for worker in workers:  # a nanny with one port, its worker process with two (and helpers with none)
        assert sorted(len(ports) for ports in worker.values() if ports) == [1, 2], worker
    every = [address for sockets in (scheduler, *workers) for ports in sockets.values() for address in ports]
    assert [address for address in every if not address.startswith("127.0.0.1:")] == [], (scheduler, workers)


@pytest.mark.slow
def test_a_campaign_runs_on_the_cluster_as_it_would_here(cluster, mnist, mnist_dir, tmp_path):
    out = tmp_path / "results"
    argv = dask_argv(cluster.address, mnist_dir, out)
    code, stdout, stderr = run_main(argv)
    assert code == 0, stdout + stderr
    assert f"{TINY_RUNS} runs in the grid, 0 already done, {TINY_RUNS} to run on the Dask cluster at {cluster.address}." in stdout
    assert len(per_run_lines(stdout)) == TINY_RUNS and f"{TINY_RUNS} ok, 0 failed, 0 diverged, 0 pending." in stdout
    specs = rx.build_grid(config_of(argv))
    records = rs.RunStore(out).load()
    assert set(records) == {spec.run_id for spec in specs}
    assert all(record["status"] == "ok" and record["attempts"] == 1 for record in records.values()), \
        [r["error"] for r in records.values()]
    for spec in specs:  # the same result as a run on this machine
        local = rx.run_one(spec)
        assert same({k: v for k, v in records[spec.run_id].items() if k not in VOLATILE},
                    {k: v for k, v in local.items() if k not in VOLATILE}), spec
    assert len(rs.read_csv(out / rs.PER_RUN_CSV)) == TINY_RUNS and len(rs.read_csv(out / rs.SUMMARY_CSV)) == 4
    assert list((out / "figures").glob("*.png"))
    # each worker process decoded MNIST once and kept it for its later runs
    cached = cluster.client.run(eval, "list(__import__('nnet_models')._DATASET_CACHE)")
    assert len(cached) == 2
    assert all(len(keys) == 1 and keys[0][0] == "mnist" for keys in cached.values())


@pytest.mark.slow
def test_outcomes_exceptions_and_worker_deaths(cluster, tasks):
    upload = [Path(tasks.__file__)]
    assert outcomes_by_item(run_dask(tasks.square, range(10), cluster.address, upload=upload)) == \
        {i: i * i for i in range(10)}
    outcomes = outcomes_by_item(run_dask(tasks.odd_raises, range(6), cluster.address, retries=1,
                                                   upload=upload))
    assert {i: outcomes[i] for i in (0, 2, 4)} == {0: 0, 2: 2, 4: 4}
    for i in (1, 3, 5):
        assert isinstance(outcomes[i], ValueError) and str(outcomes[i]) == f"odd item {i}"
    # a task that kills every worker it runs on: the others finish, it alone is given up
    outcomes = outcomes_by_item(run_dask(tasks.dies_on, ["a", "die", "b", "c"], cluster.address,
                                                   upload=upload))
    assert {k: outcomes[k] for k in "abc"} == {"a": "a", "b": "b", "c": "c"}
    assert isinstance(outcomes["die"], executors.WorkerDied)
    assert outcomes["die"].attempts == 2  # DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=1: two deaths
    cluster.wait_for_workers(2)  # the nannies restarted them


@pytest.mark.slow
def test_a_frozen_worker_is_named_with_its_stalled_run(cluster, tasks, tmp_path):
    """A worker process stopped by SIGSTOP mid-run: once the run has taken over 5 times as long as
    the slowest finished one (at least 1 s here), a warning names the run, its task and the
    worker; continued, the worker finishes the run. Runs submitted while the outcomes come in
    are run too."""
    pids = cluster.client.run(os.getpid)  # by worker address, asked before one is frozen
    executor = executors.DaskExecutor(tasks.stops_its_worker, cluster.address, upload=[Path(tasks.__file__)],
                                      min_stall_seconds=1)
    for name in "abcd":
        executor.submit((name, str(tmp_path)))
    outcomes = executor.as_completed()
    finished = [next(outcomes) for _ in range(4)]
    frozen = ("freeze", str(tmp_path))
    executor.submit(frozen)

    def continue_once_warned(caught: list) -> None:
        deadline = time.monotonic() + 120  # without a warning the worker is continued then, and the test fails
        while not caught and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in (tmp_path / "freeze.pid").read_text().split():
            os.kill(int(pid), signal.SIGCONT)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        continuer = threading.Thread(target=continue_once_warned, args=(caught,))
        continuer.start()
        finished += list(outcomes)
    continuer.join()
    assert outcomes_by_item(finished) == {**{(name, str(tmp_path)): name for name in "abcd"}, frozen: "freeze"}
    [warning] = [str(w.message) for w in caught]
    [pid] = (tmp_path / "freeze.pid").read_text().split()
    [address] = [address for address, worker_pid in pids.items() if worker_pid == int(pid)]
    assert warning.startswith(f"{frozen!r} has run for ")
    assert f" s on Dask worker {address} (task stops_its_worker-" in warning and "looks stalled" in warning


@pytest.mark.slow
def test_killed_worker_runs_are_rescheduled(cluster, mnist, mnist_dir, tmp_path):
    config = config_of(dask_argv(cluster.address, mnist_dir, tmp_path, "--activations", "relu,tanh,sigmoid",
                                 "--noise_types", "pixel_uniform", "--ps", "0.5", "--max_train_samples", "5000",
                                 "--seed", "2"))
    specs = rx.build_grid(config)
    assert len(specs) == 6
    outcomes, in_flight, executor = [], [], rx.executor_for(config)
    for spec in specs:
        executor.submit(spec)
    for spec, outcome in executor.as_completed():
        outcomes.append((spec, outcome))
        if len(outcomes) == 1:
            processing = cluster.client.processing()
            pids = cluster.client.run(os.getpid)
            victim = next(address for address, keys in processing.items() if keys)
            in_flight.extend(processing[victim])
            cluster.kill_group(pids[victim])  # SIGKILL: the worker and its nanny, mid-run
            cluster.start_worker()  # a replacement joins mid-campaign
    assert in_flight
    assert sorted(spec.run_id for spec, _ in outcomes) == sorted(spec.run_id for spec in specs)  # each once
    assert all(isinstance(o, dict) and o["status"] == "ok" for _, o in outcomes), outcomes
    cluster.wait_for_workers(2)


@pytest.mark.slow
def test_ctrl_c_stops_a_dask_campaign_and_cancels_its_runs(cluster, mnist, mnist_dir, tmp_path, no_figures):
    out = tmp_path / "results"
    argv = dask_argv(cluster.address, mnist_dir, out, "--max_train_samples", "5000", "--seed", "1")
    with open(tmp_path / "campaign.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-u", "run_experiments.py", *argv], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not run_files(out):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "campaign.log").read_text()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=120) == 130, (tmp_path / "campaign.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = (tmp_path / "campaign.log").read_text()
    assert "run the same command again to resume" in output and "Traceback" not in output
    stored = len(run_files(out))
    assert 1 <= stored < 8
    cluster.wait_until_idle()  # the runs not finished were cancelled, not left running
    code, stdout, _ = run_main(argv)
    assert code == 0 and f"{TINY_RUNS} runs in the grid, {stored} already done, {TINY_RUNS - stored} to run" in stdout
    assert len(rs.RunStore(out).load()) == TINY_RUNS


@pytest.mark.slow
def test_lost_scheduler_keeps_finished_runs_and_stops(mnist, mnist_dir, tmp_path, no_figures):
    lonely = start_cluster(tmp_path / "cluster", workers=1)
    out = tmp_path / "results"
    killed = threading.Event()

    def kill_scheduler_after_the_first_run():
        deadline = time.monotonic() + 180
        while not run_files(out) and time.monotonic() < deadline:
            time.sleep(0.02)
        lonely.kill_group(lonely.procs[0].pid)
        killed.set()

    killer = threading.Thread(target=kill_scheduler_after_the_first_run, daemon=True)
    try:
        killer.start()
        code, stdout, stderr = run_main(dask_argv(lonely.address, mnist_dir, out, "--max_train_samples", "5000",
                                                  "--seed", "3"))
        assert killed.is_set()
        assert code == 1, stdout + stderr  # an error, not an interruption
        assert f"error: lost the Dask scheduler at {lonely.address!r}" in stderr
        stored = rs.RunStore(out).load()
        assert 1 <= len(stored) < TINY_RUNS and all(r["status"] == "ok" for r in stored.values())
        assert sorted(rs.read_csv(out / rs.PER_RUN_CSV)["run_id"]) == sorted(stored)
        assert f"{len(stored)} ok, 0 failed, 0 diverged, {TINY_RUNS - len(stored)} pending." in stdout
    finally:
        killer.join(timeout=200)
        lonely.stop()
        shutil.rmtree(tmp_path / "cluster", ignore_errors=True)


def test_something_at_the_address_that_is_not_a_scheduler_is_reported_not_waited_for(tmp_path):
    """A server that accepts the connection but never speaks Dask: an error with a message, no hang."""
    script = tmp_path / "connect.py"
    script.write_text(
        "import socket, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import executors\n"
        "server = socket.socket()\n"
        "server.bind(('127.0.0.1', 0))\n"
        "server.listen()\n"
        "address = 'tcp://127.0.0.1:%d' % server.getsockname()[1]\n"
        "try:\n"
        "    executor = executors.DaskExecutor(str, address, connect_timeout=2)\n"
        "    executor.submit(1)\n"
        "    list(executor.as_completed())\n"
        "except executors.SchedulerUnavailableError as exc:\n"
        "    print('error:', exc)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("error: no Dask scheduler answered at 'tcp://127.0.0.1:"), result.stdout
    assert "is it a Dask scheduler?" in result.stdout


@pytest.mark.slow
def test_a_cluster_that_makes_no_progress_says_so(tmp_path):
    """A scheduler without workers: the campaign is told, instead of waiting in silence; the runs
    go ahead once a worker joins."""
    lonely = start_cluster(tmp_path / "cluster", workers=0)
    try:
        joiner = threading.Timer(6, lonely.start_worker)  # after the first warnings
        joiner.start()
        with pytest.warns(UserWarning, match=r"no run has finished on the Dask cluster at .* for 2 s; it has 0 worker"):
            outcomes = dict(run_dask(str, [1, 2], lonely.address, no_progress_warning=2))
        assert outcomes == {1: "1", 2: "2"}
        joiner.join()
    finally:
        lonely.stop()
