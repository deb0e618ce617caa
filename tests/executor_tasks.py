"""Functions for the executors' tests: imported here, and sent to Dask workers only by upload."""
import os
import signal


def square(x):
    return x * x


def odd_raises(x):
    if x % 2:
        raise ValueError(f"odd item {x}")
    return x


def dies_on(x):
    if x == "die":
        os.kill(os.getpid(), signal.SIGKILL)  # the worker process, as the OOM killer would
    return x
