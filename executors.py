"""Run a function over many items in parallel: on local worker processes, or on a Dask cluster.

Each executor (EXECUTORS, by the config's name) takes items with `submit`, also while its `as_completed()` is
being iterated, and yields `(item, outcome)` in completion order; `outcome` is `fn(item)`'s return value, or the
exception it raised, or `WorkerDied` when the item killed its worker process every time it ran (docs/cluster.md)."""
from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
import warnings
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, CancelledError, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

CRASHED = object()  # the outcome of an item that was running when a worker process died
STALLED = object()  # the outcome of an item whose stalled worker process was killed
FIRST_RUN_GUESS = 900  # seconds a run may take before any has finished, times stalled_run_factor
MAX_LOCAL_WORKERS = 1024
_started = None  # in a worker: the queue through which it announces each item it starts


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
    """The most worker processes the OS limits hold: each is a process and takes two of the pool owner's files."""
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

    @staticmethod
    def config_errors(config: dict) -> list[str]:
        """Each problem with the config's values for this executor, one line each."""
        factor = config["stalled_run_factor"]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 2 <= factor < float("inf"):
            return [f"stalled_run_factor: {factor!r} is not a number >= 2"]
        return []

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
    """`workers` processes of `threads` CPU threads, never more than there are items. A dead worker breaks the
    pool: a new one reruns the items that were running one at a time, so that only an item that kills its worker
    while running alone is charged: after `max_attempts` such deaths it gets `WorkerDied`. A stalled item's
    worker is killed and the item run again, charged as for a death; the items beside it are not."""

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
        return Executor.config_errors(config)

    @classmethod
    def from_config(cls, fn, config: dict, modules=(), **stall):
        return cls(fn, cls.workers_of(config), config["cpu_threads_per_worker"], config["pin_cpus"], config["use_cuda"],
                   config["max_attempts"], stalled_run_factor=config["stalled_run_factor"], **stall)

    def charge(self, item) -> bool:
        """Count a death of `item`'s worker; True once it has had `max_attempts`."""
        self.deaths[id(item)] += 1
        return self.deaths[id(item)] >= self.max_attempts

    def as_completed(self):
        suspects: deque = deque()
        while self.queue or suspects:
            alone = deque([suspects.popleft()]) if suspects else None
            in_flight = []
            for item, outcome in self._pool_outcomes(alone or self.queue, 1 if alone else self.workers):
                if outcome is CRASHED:
                    in_flight.append(item)
                elif outcome is STALLED and self.charge(item):
                    yield item, WorkerDied(self.max_attempts)
                elif outcome is STALLED:
                    self.queue.appendleft(item)
                else:
                    yield item, outcome
            if len(in_flight) == 1 and self.charge(in_flight[0]):
                yield in_flight.pop(), WorkerDied(self.max_attempts)
            suspects.extend(in_flight)

    def _pool_outcomes(self, source: deque, workers: int):
        """(item, outcome) of the items taken from `source` (appended ones too) on a fresh pool of at most
        `workers`, given up once more items wait than it has workers and a wider one would do. If a worker dies:
        (item, CRASHED) for each started, unfinished item; unstarted ones go back to `source`; the pool is given
        up. If a stalled worker was killed: (item, STALLED) for its item, the others go back to `source`."""
        width = min(workers, len(source))
        pool, started = self._new_pool(width)
        futures, lost, running, keys, stalled = {}, {}, {}, itertools.count(), None
        quiet_since = time.monotonic()  # of the pool's last start or finish

        def note_starts() -> None:
            nonlocal quiet_since
            while not started.empty():
                key, pid = started.get()
                quiet_since = time.monotonic()
                running[key] = pid, quiet_since

        def open_to_more() -> bool:
            return bool(source) and not lost and (width == workers or len(futures) + len(source) <= width)

        try:
            while futures or open_to_more():
                while open_to_more():
                    key, item = next(keys), source.popleft()
                    futures[pool.submit(_announce_and_call, key, self.fn, item)] = key, item
                done, _ = wait(futures, timeout=1, return_when=FIRST_COMPLETED)
                note_starts()
                for future in done:
                    key, item = futures.pop(future)
                    if isinstance(future.exception(), BrokenProcessPool):  # then the rest fail at once too
                        lost[key] = item
                    else:
                        quiet_since = time.monotonic()
                        self.finished(item, quiet_since - running.pop(key)[1])
                        yield item, future.exception() or future.result()
                if stalled is None and not lost:
                    stalled = self._kill_stalled(pool, futures, running, time.monotonic() - quiet_since)
        except BaseException:
            _stop(pool)
            raise
        pool.shutdown(wait=True)
        note_starts()
        for key, item in reversed(lost.items()):
            if key == stalled:
                yield item, STALLED
            elif key in running and stalled is None:
                yield item, CRASHED
            else:
                source.appendleft(item)

    def _new_pool(self, width: int):
        """A pool of `width` workers, and the queue through which each announces (key, pid) of the item it starts."""
        context = _start_method(self.threads, self.use_cuda, self.fn.__module__)
        started = context.SimpleQueue()
        slots = _cpu_slots(width, self.threads) if self.pin_cpus else None
        return ProcessPoolExecutor(width, mp_context=context, initializer=_init_worker,
                                   initargs=(os.getpid(), self.threads, slots, context.Value("i", 0), started)), started

    def _kill_stalled(self, pool: ProcessPoolExecutor, futures: dict, running: dict, quiet: float):
        """Kill the worker of the longest running run if it is stalled and return that run's key; or, if runs wait
        but none has started or finished for as long, kill every worker and return "pool": a worker frozen while
        it waits for a run holds the queue that the others take runs from. Else None."""
        now, items = time.monotonic(), dict(futures.values())
        if running:
            seconds, key, pid = max((now - since, key, pid) for key, (pid, since) in running.items())
            if seconds <= self.stall_limit(items[key]):
                return None
            self.warn_stalled(items[key], seconds, f"worker process {pid}", "killing that worker; the run is tried "
                              f"again, up to max_attempts = {self.max_attempts} times in all")
            pids = [pid]
        elif futures and quiet > max(map(self.stall_limit, items.values())):
            key, pids = "pool", list(pool._processes)
            warnings.warn(f"no run has started or finished on the local workers for {quiet:.0f} s while "
                          f"{len(futures)} wait: a worker looks stalled; restarting the workers (processes "
                          f"{', '.join(map(str, pids))})")
        else:
            return None
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return key


def _init_worker(owner: int, threads: int, slots: list[list[int]] | None, slot_counter, started) -> None:
    global _started
    _started = started
    _exit_when_gone(owner)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited by fork
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(threads)
    if slots:
        with slot_counter.get_lock():
            slot = slots[slot_counter.value % len(slots)]
            slot_counter.value += 1
        os.sched_setaffinity(0, slot)


def _exit_when_gone(pid: int) -> None:
    """End this worker within a second of process `pid` (the pool's owner) dying, even by kill -9.
    A forked worker's parent is that process, but a forkserver's worker is the forkserver's child,
    and the forkserver only exits once its workers have: so the worker watches the owner itself."""
    import psutil

    def watch() -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _announce_and_call(key, fn, item):
    _started.put((key, os.getpid()))
    return fn(item)


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


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what is queued and end the worker processes now, without waiting for items."""
    processes = list((pool._processes or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:  # gone on return: forked workers share the caller's open files (its lock)
        process.kill()
        process.join()


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
        return Executor.config_errors(config)

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
