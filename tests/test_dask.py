"""The Dask executor against a real `dask scheduler` and `dask worker` processes on 127.0.0.1."""
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("distributed")
import cloudpickle
from distributed import Client

import dask_executor
import nnet_models as nm
import run_experiments as rx
from test_models import same  # equality where NaN equals NaN

ROOT = Path(__file__).resolve().parents[1]
DASK = [sys.executable, "-m", "dask"]  # the venv's `dask` command line
VOLATILE = {"seconds", "train_seconds", "finished_at"}  # the only fields that may differ between executions


class LoopbackCluster:
    """A scheduler and single-threaded workers as subprocesses, each in its own process group."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.address = None
        self.client = None

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.directory / f"{name}-{len(self.procs)}.log", "w")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.Popen(DASK + args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def start_scheduler(self) -> str:
        scheduler_file = self.directory / "scheduler.json"
        proc = self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                         "--scheduler-file", str(scheduler_file)])
        deadline = time.monotonic() + 60
        while self.address is None:
            assert proc.poll() is None and time.monotonic() < deadline, "dask scheduler did not start"
            try:
                self.address = json.loads(scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
        assert self.address.startswith("tcp://127.0.0.1:")
        self.client = Client(self.address, timeout=30, set_as_default=False)
        return self.address

    def start_worker(self) -> subprocess.Popen:
        return self._spawn("worker", ["worker", self.address, "--host", "127.0.0.1", "--nworkers", "1",
                                      "--nthreads", "1", "--no-dashboard", "--death-timeout", "60",
                                      "--local-directory", str(self.directory / "workers")])

    def worker_count(self) -> int:
        return len(self.client.nthreads())

    def wait_for_workers(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.worker_count() != n:
            assert time.monotonic() < deadline, f"{self.worker_count()} dask workers connected, expected {n}"
            time.sleep(0.1)

    def kill_group(self, pid: int) -> None:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        if self.client is not None:
            dask_executor.close_quietly(self.client)
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
    cluster = start_cluster(tmp_path_factory.mktemp("dask"), workers=2)
    yield cluster
    cluster.stop()


@pytest.fixture
def restore_torch_threads():
    threads = nm.torch.get_num_threads()
    yield
    nm.torch.set_num_threads(threads)


def campaign_config(mnist_dir, address, tmp_path, **overrides) -> dict:
    """A config dict as run_experiments.config_from_args builds it, on a small grid."""
    config, _ = rx.config_from_args([])
    config.update(data_dir=str(mnist_dir), output_dir=str(tmp_path / "results"), dask_scheduler=address,
                  executor="dask", activations=["relu"], noise_types=["label_uniform", "pixel_uniform"],
                  ps=[0.0, 0.5], extra_label_ps=[], repeats=2, epochs=1, max_train_samples=500)
    config.update(overrides)
    assert not rx.config_errors(config)
    return config


def assert_each_run_once(records: list[dict], specs) -> None:
    counts = collections.Counter(record["run_id"] for record in records)
    assert max(counts.values()) == 1, f"runs recorded more than once: {counts.most_common(3)}"
    assert set(counts) == {spec.run_id for spec in specs}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- fast


def test_tasks_ship_only_the_train_config(mnist_dir, tmp_path):
    spec = rx.build_grid(campaign_config(mnist_dir, "tcp://127.0.0.1:8786", tmp_path))[0]
    nm.load_dataset("mnist", mnist_dir)  # a cached dataset in this process must not leak into tasks
    payload = cloudpickle.dumps((dask_executor.run_task, spec.run_id, spec.repeat, spec.config, 1))
    assert len(payload) < 2_000


def test_no_scheduler_gives_a_clear_connection_error(mnist_dir, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    config = campaign_config(mnist_dir, address, tmp_path)
    records = []
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="no Dask scheduler answered at 'tcp://127.0.0.1:") as info:
        dask_executor.execute_dask(rx.build_grid(config), config, records.append, connect_timeout=1)
    assert isinstance(info.value, dask_executor.SchedulerUnavailableError)
    assert address in str(info.value)
    assert records == []
    assert time.monotonic() - started < 15


# ---------------------------------------------------------------- real scheduler and workers


@pytest.mark.slow
def test_dask_records_equal_local_ones(cluster, mnist_dir, tmp_path, restore_torch_threads):
    config = campaign_config(mnist_dir, cluster.address, tmp_path)
    specs = rx.build_grid(config)
    assert len(specs) == 8
    records = []
    dask_executor.execute_dask(specs, config, records.append)

    assert_each_run_once(records, specs)
    assert all(record["status"] == "ok" for record in records), [r["error"] for r in records]
    by_id = {record["run_id"]: record for record in records}
    for spec in specs:
        local = rx.run_one(spec)
        remote = by_id[spec.run_id]
        assert same({k: v for k, v in remote.items() if k not in VOLATILE},
                    {k: v for k, v in local.items() if k not in VOLATILE}), spec
    # each worker process decoded MNIST once and kept it for its later runs
    cached = cluster.client.run(eval, "list(__import__('nnet_models')._DATASET_CACHE)")
    assert len(cached) == 2
    assert all(len(keys) == 1 and keys[0][0] == "mnist" for keys in cached.values())


@pytest.mark.slow
def test_ctrl_c_cancels_outstanding_runs(cluster, mnist_dir, tmp_path):
    config = campaign_config(mnist_dir, cluster.address, tmp_path, max_train_samples=20_000, seed=1)
    records = []

    def interrupt_after_first(record):
        records.append(record)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dask_executor.execute_dask(rx.build_grid(config), config, interrupt_after_first)
    assert len(records) == 1
    deadline = time.monotonic() + 30  # runs already executing finish; everything else is dropped
    while any(cluster.client.processing().values()):
        assert time.monotonic() < deadline, cluster.client.processing()
        time.sleep(0.1)


@pytest.mark.slow
def test_killed_worker_runs_are_rescheduled(cluster, mnist_dir, tmp_path):
    config = campaign_config(mnist_dir, cluster.address, tmp_path, activations=["relu", "tanh", "sigmoid"],
                             noise_types=["pixel_uniform"], ps=[0.5], max_train_samples=30_000, seed=2)
    specs = rx.build_grid(config)
    assert len(specs) == 6
    records, in_flight = [], []

    def kill_a_busy_worker_after_first(record):
        records.append(record)
        if len(records) == 1:
            processing = cluster.client.processing()
            pids = cluster.client.run(os.getpid)
            victim = next(address for address, keys in processing.items() if keys)
            in_flight.extend(key.removeprefix("run-") for key in processing[victim])
            cluster.kill_group(pids[victim])  # SIGKILL: the worker and its nanny, mid-run
            cluster.start_worker()  # a replacement joins mid-campaign

    dask_executor.execute_dask(specs, config, kill_a_busy_worker_after_first)

    assert in_flight
    assert_each_run_once(records, specs)
    assert all(record["status"] == "ok" for record in records), [r["error"] for r in records]
    assert set(in_flight) <= {record["run_id"] for record in records}
    cluster.wait_for_workers(2)


@pytest.mark.slow
def test_lost_scheduler_keeps_finished_runs_and_raises(mnist_dir, tmp_path):
    lonely = start_cluster(tmp_path / "cluster", workers=1)
    try:
        config = campaign_config(mnist_dir, lonely.address, tmp_path, max_train_samples=20_000, seed=3)
        specs = rx.build_grid(config)
        records, killed_at = [], []

        def kill_scheduler_after_first(record):
            records.append(record)
            if len(records) == 1:
                lonely.kill_group(lonely.procs[0].pid)
                killed_at.append(time.monotonic())

        with pytest.raises(ConnectionError, match="lost the Dask scheduler") as info:
            dask_executor.execute_dask(specs, config, kill_scheduler_after_first, connect_timeout=2)
        assert lonely.address in str(info.value)
        assert time.monotonic() - killed_at[0] < 10  # noticed at once, not after a reconnect timeout
        assert 1 <= len(records) < len(specs)
        assert len({record["run_id"] for record in records}) == len(records)
    finally:
        lonely.stop()
