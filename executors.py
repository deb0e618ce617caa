"""Run a function over many items in parallel: on local worker processes, or on a Dask cluster.

Both executors yield `(item, outcome)` in completion order; `outcome` is `fn(item)`'s return value, or the
exception it raised, or `WorkerDied` when the item killed its worker process every time it ran."""
from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, CancelledError, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

CRASHED = object()  # the outcome of an item that was running when a worker process died
_started = None  # in a worker: the queue through which it announces each item it starts


class WorkerDied(RuntimeError):
    """The worker process running an item died (killed, out of memory, crashed), every time."""

    def __init__(self, attempts: int):
        super().__init__(f"worker process died {attempts} times while running this run "
                         "(killed, out of memory or crashed)")
        self.attempts = attempts


class SchedulerUnavailableError(ConnectionError):
    """No Dask scheduler answered at the address, or it went away mid-campaign."""


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), else the CPU count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_local(fn, items, workers: int, threads: int = 1, pin_cpus: bool = True, use_cuda: bool = False,
              max_attempts: int = 3):
    """Run fn over items on `workers` processes of `threads` CPU threads; a deque of items may grow meanwhile. A
    dead worker breaks the pool: a new one reruns the items that were running one at a time, so that only an item
    that kills its worker while running alone is charged: after `max_attempts` such deaths it gets `WorkerDied`."""
    queue = items if isinstance(items, deque) else deque(items)
    suspects: deque = deque()
    deaths = Counter()  # by id(item)
    while queue or suspects:
        alone = deque([suspects.popleft()]) if suspects else None
        in_flight = []
        for item, outcome in _pool_outcomes(fn, alone or queue, 1 if alone else workers, threads, pin_cpus, use_cuda):
            if outcome is CRASHED:
                in_flight.append(item)
            else:
                yield item, outcome
        if len(in_flight) == 1:
            deaths[id(in_flight[0])] += 1
            if deaths[id(in_flight[0])] >= max_attempts:
                yield in_flight.pop(), WorkerDied(max_attempts)
        suspects.extend(in_flight)


def _pool_outcomes(fn, source: deque, workers: int, threads: int, pin_cpus: bool, use_cuda: bool):
    """(item, outcome) of the items taken from `source` (appended ones too) on a fresh pool. If a worker dies:
    (item, CRASHED) for each started, unfinished item; unstarted ones go back to `source`; the pool is given up."""
    context = _start_method(threads, use_cuda, fn.__module__)
    started = context.SimpleQueue()
    slots = _cpu_slots(workers, threads) if pin_cpus else None
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(os.getpid(), threads, slots, context.Value("i", 0), started))
    futures, lost, keys = {}, {}, itertools.count()
    try:
        while futures or (source and not lost):
            while source and not lost:
                key, item = next(keys), source.popleft()
                futures[pool.submit(_announce_and_call, key, fn, item)] = key, item
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                key, item = futures.pop(future)
                if isinstance(future.exception(), BrokenProcessPool):  # then the rest fail at once too
                    lost[key] = item
                else:
                    yield item, future.exception() or future.result()
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown(wait=True)
    started_keys = set()
    while not started.empty():
        started_keys.add(started.get())
    for key, item in reversed(lost.items()):
        if key in started_keys:
            yield item, CRASHED
        else:
            source.appendleft(item)


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
    _started.put(key)
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


def run_dask(fn, items, address: str, retries: int = 2, upload: tuple[Path, ...] = (), connect_timeout: float = 10,
             stall_warning: float = 60):
    """Run fn over items on the Dask cluster at `address`; workers need only the Python environment, as the files
    in `upload` (the modules fn needs) are sent to them. Dask reschedules a dead worker's item; one that kills
    workers too often gets `WorkerDied`. An unreachable or lost scheduler raises SchedulerUnavailableError."""
    from distributed import Client, KilledWorker
    from distributed import as_completed as dask_completed

    client = _connect(Client, address, connect_timeout)
    queue = items if isinstance(items, deque) else deque(items)
    pending = {}
    outcomes = dask_completed(loop=client.loop)  # not a default client's: there may be none
    try:
        for path in upload:
            client.upload_file(str(path), load=False)
        while True:
            while queue:
                item = queue.popleft()
                future = client.submit(fn, item, pure=False, retries=retries)
                pending[future] = item
                outcomes.add(future)
            future = _next_finished(outcomes, client, address, stall_warning)
            if future is None:
                return
            try:
                outcome = future.result()
            except KilledWorker as exc:
                outcome = WorkerDied(exc.allowed_failures + 1)
            except Exception as exc:
                if isinstance(exc, CancelledError) or client.status != "running":
                    raise SchedulerUnavailableError(f"lost the Dask scheduler at {address!r} "
                                                    f"({str(exc).splitlines()[0]}); {len(pending)} items did not "
                                                    "finish") from exc
                outcome = exc
            yield pending.pop(future), outcome
    finally:
        if pending and client.status == "running":
            client.cancel(list(pending))
        _close_quietly(client)


def _next_finished(outcomes, client, address: str, stall_warning: float):
    """The next finished future, or None once all are done; a warning for every `stall_warning` seconds
    without one, as a cluster whose workers are gone or keep dying otherwise waits in silence."""
    waited = 0.0
    while not outcomes.has_ready() and not outcomes.is_empty():
        time.sleep(0.25)
        waited += 0.25
        if waited >= stall_warning:
            workers = len(client.scheduler_info()["workers"])
            warnings.warn(f"no run has finished on the Dask cluster at {address} for {waited:.0f} s; it has "
                          f"{workers} worker(s) now: check that they are running and have this project's "
                          "environment and data (their logs say why they die)")
            waited = 0.0
    return next(outcomes, None)


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
