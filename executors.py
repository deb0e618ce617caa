"""Run a function over many items in parallel: on local worker processes, or on a Dask cluster.

Each executor (EXECUTORS, by the config's name) takes items with `submit`, also while its `as_completed()` is
being iterated, and yields `(item, outcome)` in completion order; `outcome` is `fn(item)`'s return value, or the
exception it raised, or `WorkerDied` when the item killed its worker process on each of its tries (docs/cluster.md)."""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
import warnings
from collections import Counter, deque
from concurrent.futures import CancelledError
from multiprocessing import connection
from pathlib import Path

FIRST_RUN_GUESS = 900  # seconds a run may take before any has finished, times stalled_run_factor
MAX_LOCAL_WORKERS = 1024


class WorkerDied(RuntimeError):
    """The worker process running an item died (killed, out of memory, crashed) every time; a worker killed because
    its item stalled counts too."""

    def __init__(self, attempts: int):
        super().__init__(f"worker process died {attempts} times while running this run "
                         "(killed, out of memory or crashed)")
        self.attempts = attempts


class SchedulerUnavailableError(ConnectionError):
    """No Dask scheduler answered at the address, or it went away mid-campaign."""


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), else the CPU count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def max_local_workers() -> int:
    """The most worker processes the OS limits hold: each is a process, and takes two of its owner's files (its
    pipe and its sentinel)."""
    import resource
    limits = [resource.getrlimit(limit)[0] for limit in (resource.RLIMIT_NPROC, resource.RLIMIT_NOFILE)]
    return min(MAX_LOCAL_WORKERS, *(limit // 4 for limit in limits if limit != resource.RLIM_INFINITY))


class Executor:
    """Runs `fn` over the submitted items; each backend adds `config_errors(config)`, `from_config(fn, config,
    modules, describe=..., kind=...)` and `as_completed()`. A run is stalled once it has taken `stalled_run_factor`
    times as long as the slowest finished run of its `kind(item)`, and at least `min_stall_seconds` (before any has
    finished: the factor times FIRST_RUN_GUESS); a warning names it by `describe(item)`, and its worker."""

    def __init__(self, fn, stalled_run_factor: float = 5, min_stall_seconds: float = 60, describe=repr,
                 kind=lambda item: None):
        self.fn, self.factor, self.min_stall, self.describe = fn, stalled_run_factor, min_stall_seconds, describe
        self.kind = kind  # items of one kind take about as long
        self.queue: deque = deque()
        self.slowest: dict = {}  # seconds of the slowest finished item, by kind

    def submit(self, item) -> None:
        self.queue.append(item)

    def stall_limit(self, item) -> float:
        slowest = self.slowest.get(self.kind(item))
        return self.factor * FIRST_RUN_GUESS if slowest is None else max(self.min_stall, self.factor * slowest)

    def finished(self, item, seconds: float) -> None:
        self.slowest[self.kind(item)] = max(self.slowest.get(self.kind(item), 0), seconds)

    def warn_stalled(self, item, seconds: float, worker: str, action: str) -> None:
        slowest = self.slowest.get(self.kind(item))
        slowest = f"the slowest finished run of its kind took {slowest:.0f} s" if slowest is not None else \
            "no run of its kind has finished"
        warnings.warn(f"{self.describe(item)} has run for {seconds:.0f} s on {worker} ({slowest}; stalled_run_factor"
                      f" = {self.factor:g}): it looks stalled; {action}")


class LocalExecutor(Executor):
    """`workers` processes of `threads` CPU threads, started as items need them; each takes one item at a time
    through a pipe of its own, so a worker's death is its item's alone. A dead worker is replaced and its item
    charged: after `max_attempts` deaths the item gets `WorkerDied`, else it runs again. A stalled item's worker
    is killed, which counts as a death; the items beside it run on."""

    def __init__(self, fn, workers: int, threads: int = 1, pin_cpus: bool = True, use_cuda: bool = False,
                 max_attempts: int = 3, **stall):
        super().__init__(fn, **stall)
        self.workers, self.threads, self.pin_cpus, self.use_cuda = workers, threads, pin_cpus, use_cuda
        self.max_attempts, self.deaths = max_attempts, Counter()  # by id(item)

    @staticmethod
    def workers_of(config: dict) -> int:
        return config["max_workers"] or max(1, usable_cpus() // config["cpu_threads_per_worker"])

    @classmethod
    def config_errors(cls, config: dict) -> list[str]:
        """One process for the GPU, enough cores, and no more processes than the OS limits hold."""
        workers = cls.workers_of(config)
        slots = workers * config["cpu_threads_per_worker"]
        if workers > max_local_workers():
            return [f"max_workers: {workers} worker processes are more than this system holds (at most "
                    f"{max_local_workers()}, from RLIMIT_NPROC, RLIMIT_NOFILE and a cap of {MAX_LOCAL_WORKERS}); "
                    "lower it"]
        if slots > 2 * usable_cpus() and not config["allow_oversubscription"]:
            return [f"max_workers x cpu_threads_per_worker = {slots} threads on {usable_cpus()} CPUs; "
                    "lower them, or set allow_oversubscription = True to run that many anyway"]
        if config["use_cuda"] and config["max_workers"] != 1:
            return [f"use_cuda=True needs max_workers=1 (got {config['max_workers']!r}): one process owns the GPU"]
        if config["use_cuda"]:
            import torch
            if not torch.cuda.is_available():
                return ["use_cuda=True but torch sees no CUDA device; set use_cuda=False"]
        return []

    @classmethod
    def from_config(cls, fn, config: dict, modules=(), **stall):
        return cls(fn, cls.workers_of(config), config["cpu_threads_per_worker"], config["pin_cpus"], config["use_cuda"],
                   config["max_attempts"], stalled_run_factor=config["stalled_run_factor"], **stall)

    def as_completed(self):
        context = _start_method(self.threads, self.use_cuda, self.fn.__module__)
        cpus = _cpu_slots(self.workers, self.threads) if self.pin_cpus else None
        workers, idle, busy = {}, [], {}  # slot: (process, pipe); idle slots; pipe: (slot, item, start) of busy ones
        try:
            while self.queue or busy:
                while self.queue and len(busy) < self.workers:
                    slot = idle.pop() if idle else min(set(range(self.workers)) - set(workers))
                    if slot in workers and not workers[slot][0].is_alive():  # it died while idle: replaced
                        _end(workers.pop(slot))
                    workers[slot] = workers.get(slot) or _start_worker(context, self.fn, self.threads, cpus, slot)
                    item, pipe = self.queue.popleft(), workers[slot][1]
                    busy[pipe] = slot, item, time.monotonic()
                    with contextlib.suppress(OSError):  # a worker that dies now: its pipe reads as a death below
                        pipe.send(item)
                for pipe in connection.wait(list(busy), timeout=1):
                    slot, item, started = busy.pop(pipe)
                    try:
                        outcome = pipe.recv()
                    except (EOFError, OSError):  # the worker died
                        _end(workers.pop(slot))
                        self.deaths[id(item)] += 1
                        if self.deaths[id(item)] < self.max_attempts:
                            self.queue.appendleft(item)
                        else:
                            yield item, WorkerDied(self.max_attempts)
                        continue
                    idle.append(slot)
                    self.finished(item, time.monotonic() - started)
                    yield item, outcome
                self._kill_stalled(workers, busy)
        finally:
            _stop(workers)

    def _kill_stalled(self, workers: dict, busy: dict) -> None:
        """Kill the worker of each stalled item (its pipe then reads as a death), naming both."""
        now = time.monotonic()
        for slot, item, started in busy.values():
            process = workers[slot][0]
            if now - started > self.stall_limit(item) and process.is_alive():
                self.warn_stalled(item, now - started, f"worker process {process.pid}", "killing that worker; the "
                                  f"run is tried again, up to max_attempts = {self.max_attempts} times in all")
                process.kill()
                process.join()


def _start_worker(context, fn, threads: int, cpus: list[list[int]] | None, slot: int):
    """A worker process for `slot` and the parent's end of its pipe."""
    pipe, workers_end = context.Pipe()
    process = context.Process(target=_serve, args=(workers_end, fn, os.getpid(), threads, cpus and cpus[slot]),
                              daemon=True)
    process.start()
    workers_end.close()  # the worker's copy is then the only one: the pipe reads EOF once the worker is gone
    return process, pipe


def _serve(pipe, fn, owner: int, threads: int, cpus: list[int] | None) -> None:
    """A worker: run `fn` on each item the pipe brings and send back its outcome, until the pipe closes."""
    _exit_when_gone(owner)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited by fork
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(threads)
    if cpus:
        os.sched_setaffinity(0, cpus)
    with contextlib.suppress(EOFError):
        while True:
            item = pipe.recv()
            try:
                outcome = fn(item)
            except Exception as exc:
                outcome = exc
            try:
                pipe.send(outcome)
            except Exception as exc:  # an outcome that cannot be pickled
                pipe.send(RuntimeError(f"the outcome could not be sent back: {type(exc).__name__}: {exc}"))


def _exit_when_gone(pid: int) -> None:
    """End this worker within a second of process `pid` (the executor's owner) dying, even by kill -9.
    A forked worker's parent is that process, but a forkserver's worker is the forkserver's child,
    and the forkserver only exits once its workers have: so the worker watches the owner itself."""
    import psutil

    def watch() -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _start_method(threads: int, use_cuda: bool, preload: str):
    """Forked workers share the parent's memory (a decoded dataset) copy-on-write. But a child
    forked from a process that has run OpenMP threads hangs on its first multi-threaded op, and
    one forked after CUDA was queried cannot use CUDA: such workers start from a forkserver."""
    methods = multiprocessing.get_all_start_methods()
    if (threads > 1 or use_cuda) and "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([preload])
        return context
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def _cpu_slots(workers: int, threads: int) -> list[list[int]] | None:
    """Disjoint sets of `threads` cores, one per worker, or None where that is impossible."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else []
    if not cpus or workers * threads > len(cpus):
        return None
    return [cpus[i * threads : (i + 1) * threads] for i in range(workers)]


def _stop(workers: dict) -> None:
    """End every worker process now, busy or idle; gone on return: forked workers share the caller's open files
    (its lock)."""
    for process, _ in workers.values():
        process.kill()
    for worker in workers.values():
        _end(worker)


def _end(worker) -> None:
    """Reap a (process, pipe) worker that has exited or been killed, and close its pipe."""
    process, pipe = worker
    process.join()
    pipe.close()


class DaskExecutor(Executor):
    """The Dask cluster at `address`; workers need only the Python environment, as the files in `upload` (the
    modules fn needs) are sent to them. Dask reschedules a dead worker's item; one that kills workers too often
    gets `WorkerDied`. An unreachable or lost scheduler raises SchedulerUnavailableError. A stalled run is
    reported, naming its task and worker; the scheduler reruns it once it gives that worker up."""

    def __init__(self, fn, address: str, retries: int = 2, upload: tuple[Path, ...] = (),
                 connect_timeout: float = 10, no_progress_warning: float = 60, **stall):
        super().__init__(fn, **stall)
        self.address, self.retries, self.upload = address, retries, upload
        self.connect_timeout, self.no_progress_warning = connect_timeout, no_progress_warning
        self.running: dict = {}  # task key: (worker address, when it was first seen running there)
        self.warned: set = set()  # (task key, worker address) of the stalled runs reported
        self.watched_at = -float("inf")

    @staticmethod
    def config_errors(config: dict) -> list[str]:
        if not re.fullmatch(r"(tcp|tls)://[\w.\-\[\]:]+:\d+", str(config["dask_scheduler"])):
            return [f"dask_scheduler: {config['dask_scheduler']!r} is not a scheduler address like "
                    "tcp://HOST:8786 or tls://HOST:8786"]
        return []

    @classmethod
    def from_config(cls, fn, config: dict, modules=(), **stall):
        return cls(fn, config["dask_scheduler"], retries=config["max_attempts"] - 1, upload=tuple(modules),
                   stalled_run_factor=config["stalled_run_factor"], **stall)

    def as_completed(self):
        from distributed import Client, KilledWorker
        from distributed import as_completed as dask_completed

        client = _connect(Client, self.address, self.connect_timeout)
        pending = {}
        outcomes = dask_completed(loop=client.loop)  # not a default client's: there may be none
        try:
            for path in self.upload:
                client.upload_file(str(path), load=False)
            while True:
                while self.queue:
                    item = self.queue.popleft()
                    future = client.submit(self.fn, item, pure=False, retries=self.retries)
                    pending[future] = item
                    outcomes.add(future)
                if (future := self._next_finished(outcomes, client, pending)) is None:
                    return
                try:
                    outcome = future.result()
                except KilledWorker as exc:
                    outcome = WorkerDied(exc.allowed_failures + 1)
                except Exception as exc:
                    if isinstance(exc, CancelledError) or client.status != "running":
                        raise SchedulerUnavailableError(f"lost the Dask scheduler at {self.address!r} "
                                                        f"({str(exc).splitlines()[0]}); {len(pending)} items did "
                                                        "not finish") from exc
                    outcome = exc
                yield pending.pop(future), outcome
        finally:
            if pending and client.status == "running":
                client.cancel(list(pending))
            _close_quietly(client)

    def _next_finished(self, outcomes, client, pending: dict):
        """The next finished future, or None once all are done. Meanwhile stalled runs are reported, and so is
        every `no_progress_warning` seconds without a finished run, as a cluster whose workers are gone or keep
        dying otherwise waits in silence."""
        waited = 0.0
        while True:
            self._watch(client, pending)
            if outcomes.has_ready() or outcomes.is_empty():
                break
            time.sleep(0.25)
            waited += 0.25
            if waited >= self.no_progress_warning:
                workers = len(client.scheduler_info()["workers"])
                warnings.warn(f"no run has finished on the Dask cluster at {self.address} for {waited:.0f} s; it "
                              f"has {workers} worker(s) now: check that they are running and have this project's "
                              "environment and data (their logs say why they die)")
                waited = 0.0
        future = next(outcomes, None)
        if future is not None:  # one that finished before it was seen running took less than a few seconds
            started = self.running.pop(future.key, (None, time.monotonic()))[1]
            self.finished(pending[future], time.monotonic() - started)
        return future

    def _watch(self, client, pending: dict) -> None:
        """Every few seconds: note when each run started on which worker; report each that stalls there."""
        now = time.monotonic()
        if now - self.watched_at < min(5, self.min_stall / 4):
            return
        self.watched_at = now
        try:
            processing = client.processing()
        except Exception:  # a lost scheduler is reported with the futures
            return
        items = {future.key: item for future, item in pending.items()}
        for worker, keys in processing.items():
            for key in keys:
                if self.running.get(key, (None,))[0] != worker:
                    self.running[key] = worker, now
                seconds = now - self.running[key][1]
                if key in items and seconds > self.stall_limit(items[key]) and (key, worker) not in self.warned:
                    self.warned.add((key, worker))
                    self.warn_stalled(items[key], seconds, f"Dask worker {worker} (task {key})",
                                      "check that worker; the scheduler reruns the run elsewhere once it gives the "
                                      "worker up (distributed.scheduler.worker-ttl)")


EXECUTORS = {"local": LocalExecutor, "dask": DaskExecutor}


def _connect(client_class, address: str, timeout: float):
    """A client of the scheduler at `address`. Dask's own timeout does not cover a server that accepts the
    connection but never answers as a scheduler would, so the wait is bounded here too."""
    attempt: dict = {}

    def connect() -> None:
        try:
            attempt["client"] = client_class(address, timeout=timeout, set_as_default=False)
        except Exception as exc:  # reported below, in the caller's thread
            attempt["error"] = exc

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 5)
    if "client" in attempt:
        return attempt["client"]
    reason = attempt.get("error", f"no answer to Dask's handshake within {timeout + 5:g} s: is it a Dask scheduler?")
    raise SchedulerUnavailableError(f"no Dask scheduler answered at {address!r} within {timeout:g} s; start one "
                                    f"with `dask scheduler` and check the host and the port ({reason})")


def _close_quietly(client) -> None:
    """Close the client; after a lost scheduler, distributed logs its cancelled reconnect as an error."""
    logger = logging.getLogger("distributed.client")
    level = logger.level
    if client.status != "running":
        logger.setLevel(logging.CRITICAL)
    try:
        client.close()
    finally:
        logger.setLevel(level)
