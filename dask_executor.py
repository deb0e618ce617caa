"""Run the campaign's grid on a Dask distributed cluster instead of a local process pool.

Start a scheduler, then workers of one thread each (one run at a time per worker process),
from the repository (or with it on PYTHONPATH), and point the campaign at the scheduler:

    dask scheduler --port 8786                                    # on one machine
    dask worker tcp://HOST:8786 --nworkers 8 --nthreads 1         # on each machine, in the repo
    python run_experiments.py --executor dask --dask-scheduler tcp://HOST:8786

Each task ships only a run's TrainConfig (plus its id); a worker process decodes the dataset once
(nnet_models.load_dataset caches it) and reuses it for all its runs, so every worker machine needs
the data at data_dir (a relative data_dir is resolved in the worker's working directory). Records
come back to the driver, which stores them: workers need no shared filesystem. A worker that dies
mid-run has its runs rescheduled by the scheduler on other workers (up to the scheduler's
`distributed.scheduler.allowed-failures`, default 3, then the run is recorded as failed).
"""
from __future__ import annotations

import logging
import sys
from concurrent.futures import CancelledError

from distributed import Client, KilledWorker, as_completed

import nnet_models as nm
import run_experiments as rx

CONNECT_TIMEOUT_S = 10


class SchedulerUnavailableError(ConnectionError):
    """No Dask scheduler answered at the configured address, or it went away mid-campaign."""


def run_task(run_id: str, repeat: int, cfg: nm.TrainConfig, threads: int) -> dict:
    """On a Dask worker: one run (run_experiments.run_one) with torch pinned to `threads` threads."""
    nm.torch.set_num_threads(threads)
    return rx.run_one(rx.RunSpec(run_id, repeat, cfg))


def connect(address: str, timeout: float = CONNECT_TIMEOUT_S) -> Client:
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise SchedulerUnavailableError(
            f"no Dask scheduler answered at {address!r} within {timeout:g} s; start one with "
            f"`dask scheduler` and check dask_scheduler, the host and the port ({exc})") from exc


def failed_record(spec: rx.RunSpec, attempts: int, error: str | None = None) -> dict:
    record = rx.worker_died_record(spec, attempts)
    if error:
        record["error"] = error
    return record


def execute_dask(specs: list[rx.RunSpec], config: dict, on_record, connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Run specs on the Dask cluster at config["dask_scheduler"]; on_record(record) once per run, here."""
    address, threads = config["dask_scheduler"], config["cpu_threads_per_worker"]
    client = connect(address, connect_timeout)
    pending = {}
    try:
        workers = client.nthreads()
        print(f"Dask scheduler {address}: {len(workers)} workers, {sum(workers.values())} threads"
              + ("" if workers else " (runs start as workers connect)"), file=sys.stderr, flush=True)
        pending = {client.submit(run_task, spec.run_id, spec.repeat, spec.config, threads,
                                 key=f"run-{spec.run_id}", retries=config["max_attempts"] - 1): spec
                   for spec in specs}
        for future in as_completed(pending, loop=client.loop):
            spec = pending.pop(future)
            try:
                record = future.result()
            except KilledWorker as exc:  # workers died this many times while running it
                record = failed_record(spec, exc.allowed_failures + 1)
            except Exception as exc:
                if isinstance(exc, CancelledError) or client.status != "running":
                    raise SchedulerUnavailableError(
                        f"lost the Dask scheduler at {address!r} ({str(exc).splitlines()[0]}); "
                        f"{len(pending) + 1} runs did not finish. Every finished run is stored: "
                        "run the same command again to resume.") from exc
                # the task itself raised on every retry (run_one never does: e.g. an ImportError)
                record = failed_record(spec, 1, f"dask task: {type(exc).__name__}: {exc}")
            on_record(record)
    except BaseException:  # Ctrl-C, a lost scheduler, on_record failing: drop what is left
        if pending and client.status == "running":
            client.cancel(list(pending))
        raise
    finally:
        close_quietly(client)


def close_quietly(client: Client) -> None:
    """Close the client; after a lost scheduler, distributed logs its cancelled reconnect as an error."""
    logger = logging.getLogger("distributed.client")
    level = logger.level
    if client.status != "running":
        logger.setLevel(logging.CRITICAL)
    try:
        client.close()
    finally:
        logger.setLevel(level)
