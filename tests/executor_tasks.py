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


def stops_its_worker(item):
    """item = (name, folder): "freeze", and "freeze-once" the first time, append their worker's pid to
    folder/<name>.pid and stop that process with SIGSTOP, as `kill -STOP` would; return the name once continued."""
    name, folder = item
    pids = os.path.join(folder, f"{name}.pid")
    if name == "freeze" or name == "freeze-once" and not os.path.exists(pids):
        with open(pids, "a") as log:
            log.write(f"{os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGSTOP)
    return name
