"""Crashes, signals, corrupt records and resuming: real processes and real signals.

A campaign is started as `python run_experiments.py ...` in its own session, so the whole
process group (driver and pool workers) can be signalled or killed at once, like Ctrl-C in a
terminal or the OOM killer. Whatever stops it, running the same command again must end with
exactly the results of a campaign that was never interrupted.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest

import nnet_models as nm
import registry
import results_store as rs
import run_experiments as rx
from conftest import TINY_RUNS, campaign, grid_records, per_run_lines, run_files, run_main, snapshot, tiny_argv

ROOT = Path(__file__).resolve().parents[1]

# 10 runs: relu x {the clean run, label_flip and pixel_uniform at p 0.3 and 0.6} x 2 repeats, 2 epochs each
CRASH_ARGS = ["--activations", "relu", "--noise_types", "label_flip,pixel_uniform", "--ps", "0,0.3,0.6",
              "--extra_label_ps", "", "--repeats", "2", "--epochs", "2", "--max_train_samples", "3000",
              "--max_workers", "2"]
N_CRASH_RUNS = 10
METRIC_KEYS = ["test_accuracy", "test_loss", "test_macro_precision", "test_macro_recall", "test_macro_roc_auc",
               "train_loss", "history_test_loss", "history_test_accuracy", "seed", "p", "noise_type", "repeat"]
RESUME_HINT = "run the same command again to resume"


def crash_argv(out, data_dir, *extra) -> list[str]:
    return [*CRASH_ARGS, "--data_dir", str(data_dir), "--output_dir", str(out), *extra]


def load_quietly(out: Path) -> dict[str, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unreadable record here is a failure
        return rs.RunStore(out).load()


def whole_records(out: Path) -> dict[str, tuple[int, str]]:
    """snapshot() of a campaign's records, each file checked to be a whole record."""
    for run_id, path in run_files(out).items():
        assert json.loads(path.read_text())["run_id"] == run_id  # never torn, whatever killed the writer
    return snapshot(out)


def metrics(records: dict[str, dict]) -> dict[str, dict]:
    return {run_id: {k: r.get(k) for k in METRIC_KEYS} for run_id, r in records.items()}


class CampaignProcess:
    """`python run_experiments.py ...` in its own session, its output in a log file."""

    def __init__(self, argv: list[str], log: Path):
        self.log = log
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-u", "run_experiments.py", *argv], cwd=ROOT,
                                     start_new_session=True, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text()

    def wait_for_runs(self, out: Path, count: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while len(run_files(out)) < count:
            if self.proc.poll() is not None:
                pytest.fail(f"campaign exited ({self.proc.returncode}) before {count} runs were stored:\n"
                            + self.output())
            if time.monotonic() > deadline:
                pytest.fail(f"fewer than {count} runs stored after {timeout} s:\n" + self.output())
            time.sleep(0.02)

    def wait_for_output(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{text!r} never printed:\n" + self.output())
            time.sleep(0.02)

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"campaign still running after {timeout} s:\n" + self.output())

    def group_alive(self) -> list[psutil.Process]:
        """The group's processes that still hold resources: a zombie counts until its last thread has exited (a
        process's main thread can be a zombie while its other threads still close its files, and its locks)."""
        alive = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == self.pid and (proc.status() != psutil.STATUS_ZOMBIE
                                                         or len(os.listdir(f"/proc/{proc.pid}/task")) > 1):
                    alive.append(proc)
            except (OSError, psutil.Error):
                pass
        return alive

    def wait_group_gone(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while (alive := self.group_alive()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive, f"processes of the campaign left running: {alive}"

    def pool_workers(self) -> list[psutil.Process]:
        driver = psutil.Process(self.pid)
        return [c for c in driver.children() if c.cmdline() == driver.cmdline()]  # forked: same command line

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log_file.close()


@pytest.fixture
def campaigns():
    """Start campaigns with campaigns(argv, log); whatever is left of them is killed at the end."""
    started = []

    def start(argv, log):
        campaign = CampaignProcess(argv, log)
        started.append(campaign)
        return campaign

    yield start
    for campaign in started:
        campaign.kill()


@pytest.fixture(scope="module")
def reference(mnist, mnist_dir, tmp_path_factory):
    """The crash-test campaign run without interruption: its records by run id."""
    import plots

    out = tmp_path_factory.mktemp("reference") / "results"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "write_figures", lambda *args, **kwargs: [])
        code, stdout, stderr = run_main(crash_argv(out, mnist_dir))
    assert code == 0, stdout + stderr
    records = load_quietly(out)
    assert len(records) == N_CRASH_RUNS and all(r["status"] == "ok" for r in records.values())
    assert set(records) == {s.run_id for s in rx.build_grid(rx.config_from_args(crash_argv(out, mnist_dir))[0])}
    return records


def assert_complete_like(out: Path, reference: dict[str, dict]) -> None:
    """The campaign in `out` holds exactly the reference's runs, once each, with the same results."""
    records = load_quietly(out)
    assert set(records) == set(reference)
    assert all(r["status"] == "ok" for r in records.values())
    assert metrics(records) == metrics(reference)
    per_run = rs.read_csv(out / rs.PER_RUN_CSV)
    assert len(per_run) == len(reference)
    assert not per_run["run_id"].duplicated().any()
    assert set(per_run["run_id"]) == set(reference)
    assert (per_run["status"] == "ok").all()


# ================================================================ kill -9 and resume


@pytest.mark.slow
@pytest.mark.parametrize("whole_group", [True, False], ids=["driver-and-workers", "driver-alone"])
def test_kill_9_then_resume_completes_without_redoing_finished_runs(whole_group, mnist_dir, reference, tmp_path,
                                                                    campaigns, no_figures):
    out = tmp_path / "results"
    campaign = campaigns(crash_argv(out, mnist_dir), tmp_path / "first.log")
    campaign.wait_for_runs(out, 3)
    if whole_group:
        os.killpg(campaign.pid, signal.SIGKILL)
    else:  # the orphaned pool workers must go away by themselves
        os.kill(campaign.pid, signal.SIGKILL)
    assert campaign.wait() == -signal.SIGKILL
    campaign.wait_group_gone()
    assert f"PID {campaign.pid} " in (out / "campaign.lock").read_text()  # the dead campaign's lock...

    before = whole_records(out)  # every file left behind is a whole record
    assert 3 <= len(before) < N_CRASH_RUNS, "the kill came too late to interrupt anything"
    assert set(before) <= set(reference)
    torn = out / "runs" / f".{next(iter(reference))}.json.{campaign.pid}.tmp"  # as a kill mid-write leaves it
    torn.write_text('{"run_id": ')
    writing = out / "figures" / f".fig1.png.{os.getppid()}.tmp"  # a live process's write in progress
    writing.parent.mkdir(exist_ok=True)
    writing.write_text("PNG")

    code, stdout, stderr = run_main(crash_argv(out, mnist_dir))  # ...is taken over
    assert code == 0, stdout + stderr
    assert not torn.exists() and writing.exists()
    done = len(before)
    assert f"{N_CRASH_RUNS} runs in the grid, {done} already done, {N_CRASH_RUNS - done} to run" in stdout
    assert len(per_run_lines(stdout)) == N_CRASH_RUNS - done  # only the missing runs ran

    assert_complete_like(out, reference)
    after = snapshot(out)
    for run_id, stamp in before.items():
        assert after[run_id] == stamp, f"{run_id} was run again"
    per_run = rs.read_csv(out / rs.PER_RUN_CSV).set_index("run_id")
    for run_id, (_, finished_at) in before.items():
        assert per_run.loc[run_id, "finished_at"] == finished_at
    assert (per_run["attempts"] == 1).all()


# ================================================================ a worker dies


@pytest.mark.slow
def test_killed_worker_is_replaced_and_every_run_finishes(mnist_dir, reference, tmp_path, campaigns):
    out = tmp_path / "results"
    campaign = campaigns(crash_argv(out, mnist_dir), tmp_path / "campaign.log")
    campaign.wait_for_runs(out, 1)
    deadline = time.monotonic() + 60
    while len(workers := campaign.pool_workers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(workers) == 2, workers
    stored = len(run_files(out))
    workers[0].kill()  # SIGKILL, as the OOM killer does
    assert stored < N_CRASH_RUNS - 2, "the worker was killed too late to matter"

    code = campaign.wait()
    output = campaign.output()
    assert code == 0, output
    assert f"{N_CRASH_RUNS} ok, 0 failed, 0 diverged, 0 pending." in output
    assert_complete_like(out, reference)
    # the runs interrupted by the death were rerun and count once
    assert (rs.read_csv(out / rs.PER_RUN_CSV)["attempts"] == 1).all()
    campaign.wait_group_gone()


@pytest.fixture
def worker_dies(monkeypatch, tmp_path):
    """install(cell, ...): train_and_evaluate SIGKILLs its own worker process (as the OOM killer
    would) on the grid cell `cell` picks, every time or only the first time; optionally only
    once the run `beside` picks has started (that one runs on until a worker has died)."""
    real = nm.train_and_evaluate
    folder = tmp_path / "markers"
    folder.mkdir()

    def wait_for(marker: str) -> None:
        deadline = time.monotonic() + 60
        while not (folder / marker).exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    def install(cell, always: bool = True, beside=None):
        def maybe_die(cfg, data=None):
            if beside is not None and beside(cfg) and not (folder / "beside-started").exists():
                (folder / "beside-started").touch()
                wait_for("died")  # still running when its neighbour's worker dies
            if cell(cfg) and (always or not (folder / "died").exists()):
                if beside is not None:
                    wait_for("beside-started")
                (folder / "died").touch()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(cfg, data)

        monkeypatch.setattr(nm, "train_and_evaluate", maybe_die)

    return install


def failing_cell(cfg: registry.TrainConfig) -> bool:
    return cfg.noise_type == "label_flip" and cfg.p == 0.5 and cfg.seed == rx.repeat_seed(0, 0)


def test_a_run_that_kills_its_worker_every_time_is_failed_after_max_attempts(mnist, mnist_dir, tmp_path,
                                                                             worker_dies, no_figures):
    worker_dies(failing_cell)
    out = tmp_path / "results"
    argv = tiny_argv(out, mnist_dir, "--max_attempts", "2")
    bad_id = next(s.run_id for s in rx.build_grid(rx.config_from_args(argv)[0]) if failing_cell(s.config))
    code, stdout, stderr = run_main(argv)
    assert code == 1, stdout + stderr
    records = load_quietly(out)
    assert len(records) == TINY_RUNS
    assert records[bad_id]["status"] == "failed"
    assert records[bad_id]["error"] == ("worker process died 2 times while running this run "
                                        "(killed, out of memory or crashed)")
    assert records[bad_id]["attempts"] == 2
    assert all(r["status"] == "ok" and r["attempts"] == 1 for k, r in records.items() if k != bad_id)
    assert f"  failed run {bad_id}: [FAILED] mlp/relu label_flip p=0.50 r0: worker process died 2 times" in stdout
    assert "5 ok, 1 failed, 0 diverged, 0 pending." in stdout
    # out of tries: a resume does not run it again
    code, stdout, _ = run_main(argv)
    assert code == 1 and "5 already done, 1 not to rerun (failed for good, diverged or not identifiable), 0 to run" in stdout


def test_only_the_run_that_kills_its_worker_is_charged_not_the_one_beside_it(mnist, mnist_dir, tmp_path,
                                                                              worker_dies, no_figures):
    """Both runs are in flight when the culprit's worker dies: only the culprit is charged and fails;
    the other runs on and is recorded as one attempt."""
    out = tmp_path / "results"
    argv = tiny_argv(out, mnist_dir, "--max_attempts", "2")
    specs = rx.build_grid(rx.config_from_args(argv)[0])
    culprit, neighbour = specs[0], specs[1]  # the first two runs go to the two workers
    worker_dies(lambda cfg: cfg == culprit.config, beside=lambda cfg: cfg == neighbour.config)
    code, stdout, stderr = run_main(argv)
    assert code == 1, stdout + stderr
    records = load_quietly(out)
    assert (records[culprit.run_id]["status"], records[culprit.run_id]["attempts"]) == ("failed", 2)
    assert "worker process died 2 times" in records[culprit.run_id]["error"]
    assert (records[neighbour.run_id]["status"], records[neighbour.run_id]["attempts"]) == ("ok", 1)
    assert {k: (r["status"], r["attempts"]) for k, r in records.items() if k != culprit.run_id} == \
        {s.run_id: ("ok", 1) for s in specs[1:]}


def test_a_run_whose_worker_died_once_is_rerun_and_stored_once(mnist, mnist_dir, tmp_path, worker_dies,
                                                                no_figures):
    worker_dies(failing_cell, always=False)
    out = tmp_path / "results"
    argv = tiny_argv(out, mnist_dir)
    bad_id = next(s.run_id for s in rx.build_grid(rx.config_from_args(argv)[0]) if failing_cell(s.config))
    code, stdout, stderr = run_main(argv)
    assert code == 0, stdout + stderr
    assert (tmp_path / "markers" / "died").exists()  # it did die once
    records = load_quietly(out)
    assert len(records) == TINY_RUNS and all(r["status"] == "ok" for r in records.values())
    assert records[bad_id]["attempts"] == 1  # a death of a run that then finished is not a failed try
    assert len(per_run_lines(stdout)) == TINY_RUNS


# ================================================================ Ctrl-C and SIGTERM


@pytest.mark.slow
@pytest.mark.parametrize("sig, whole_group", [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGTERM, True)],
                         ids=["sigint-group", "sigterm-driver", "sigterm-group"])
def test_signal_stops_campaign_cleanly_and_it_resumes(sig, whole_group, mnist_dir, reference, tmp_path, campaigns,
                                                      no_figures):
    out = tmp_path / "results"
    campaign = campaigns(crash_argv(out, mnist_dir), tmp_path / "campaign.log")
    campaign.wait_for_runs(out, 2)
    if whole_group:  # Ctrl-C in a terminal signals the whole foreground group
        os.killpg(campaign.pid, sig)
    else:
        os.kill(campaign.pid, sig)
    code = campaign.wait()
    output = campaign.output()
    assert code == 130, output
    assert RESUME_HINT in output
    assert "Traceback" not in output
    campaign.wait_group_gone()  # the workers were stopped too

    files = run_files(out)
    assert 2 <= len(files) < N_CRASH_RUNS, "the signal came too late to interrupt anything"
    records = load_quietly(out)
    per_run = rs.read_csv(out / rs.PER_RUN_CSV)
    assert len(per_run) == len(files)
    assert set(per_run["run_id"]) == set(files) == set(records)
    assert (per_run["status"] == "ok").all()
    summary = rs.read_csv(out / rs.SUMMARY_CSV)
    clean = sum(r["noise_type"] == registry.CLEAN for r in records.values())
    noisy_types = {r["noise_type"] for r in records.values()} - {registry.CLEAN}
    assert summary["n"].sum() == len(files) - clean + clean * max(1, len(noisy_types))  # p = 0 of every type
    history = rs.read_csv(out / rs.HISTORY_CSV)
    assert len(history) == 2 * len(files)
    meta = json.loads((out / rs.CAMPAIGN_JSON).read_text())
    assert meta["counts"] == {"done": len(files), "failed": 0, "diverged": 0, "not_identifiable": 0, "pending": N_CRASH_RUNS - len(files)}
    assert meta["finished_at"] is None
    assert f"{len(files)} ok, 0 failed, 0 diverged, {N_CRASH_RUNS - len(files)} pending." in output
    assert (out / "figures").is_dir()  # drawn from what there is

    before = snapshot(out)
    code, stdout, _ = run_main(crash_argv(out, mnist_dir))
    assert code == 0, stdout
    assert f"{len(files)} already done, {N_CRASH_RUNS - len(files)} to run" in stdout
    assert_complete_like(out, reference)
    after = snapshot(out)
    assert all(after[k] == v for k, v in before.items())


def test_interrupt_just_after_a_record_is_saved_keeps_csvs_consistent(mnist, mnist_dir, tmp_path, monkeypatch,
                                                                      no_figures):
    """Ctrl-C/SIGTERM raise KeyboardInterrupt at whatever bytecode the driver is running: here
    right after a record was renamed into runs/, before any bookkeeping. The CSVs, campaign.json
    and the closing counts still hold every stored run, and an immediate resume (same process)
    runs exactly the rest."""
    real_save = rs.RunStore.save
    saved = []

    def save_then_interrupt(self, record):
        real_save(self, record)
        saved.append(record["run_id"])
        if len(saved) == 3:
            raise KeyboardInterrupt  # what the SIGINT/SIGTERM handler raises, arriving right here

    monkeypatch.setattr(rs.RunStore, "save", save_then_interrupt)
    out = tmp_path / "results"
    code, stdout, _ = run_main(tiny_argv(out, mnist_dir))
    assert code == 130
    assert RESUME_HINT in stdout
    files = run_files(out)
    assert set(files) == set(saved) and len(files) == 3
    per_run = rs.read_csv(out / rs.PER_RUN_CSV)
    meta = json.loads((out / rs.CAMPAIGN_JSON).read_text())
    assert sorted(per_run["run_id"]) == sorted(files)
    assert meta["counts"]["done"] == len(files)
    assert "3 ok, 0 failed, 0 diverged, 3 pending." in stdout

    monkeypatch.setattr(rs.RunStore, "save", real_save)
    code, stdout, stderr = run_main(tiny_argv(out, mnist_dir))
    assert code == 0, stdout + stderr
    assert "6 runs in the grid, 3 already done, 3 to run" in stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_headline_figures_are_drawn_skips_them(signum, mnist, mnist_dir, tmp_path, monkeypatch):
    """Once every run is stored and the CSVs written, Ctrl-C or SIGTERM does not wait for the figures (a minute on
    a large grid): they are skipped, the closing lines still come, and the exit code says it was interrupted."""
    import plots

    def interrupted_drawing(output_dir, names=None):
        os.kill(os.getpid(), signum)
        time.sleep(30)  # drawing: the signal's KeyboardInterrupt lands here
        raise AssertionError("the signal was ignored")

    monkeypatch.setattr(plots, "write_figures", interrupted_drawing)
    out = tmp_path / "results"
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    code, stdout, stderr = run_main(tiny_argv(out, mnist_dir))
    assert code == 130, stdout + stderr  # stopped as asked: a `&&` after the command runs nothing more
    assert "Could not draw" not in stderr
    assert "Interrupted: the headline figures were not drawn; the command below draws them." in stdout
    assert f"{TINY_RUNS} ok, 0 failed, 0 diverged, 0 pending." in stdout
    assert f"Every figure and the report: {rx.plots_command(out)}" in stdout
    assert len(rs.read_csv(out / rs.PER_RUN_CSV)) == TINY_RUNS
    assert json.loads((out / rs.CAMPAIGN_JSON).read_text())["finished_at"] is not None
    assert signal.getsignal(signal.SIGTERM) == sigterm_handler  # restored


def test_sigint_during_the_dry_run_ends_it_quietly(mnist_dir, tmp_path, campaigns):
    argv = ["--dry-run", "--smoke", "--data_dir", str(mnist_dir), "--output_dir", str(tmp_path / "out")]
    campaign = campaigns(argv, tmp_path / "dry-run.log")
    campaign.wait_for_output("Calibrating")  # seconds of training from here
    os.killpg(campaign.pid, signal.SIGINT)
    assert campaign.wait() == 130
    output = campaign.output()
    assert output.rstrip().endswith("Interrupted before the campaign started; nothing was run.")
    assert "Traceback" not in output and "Estimated wall time" not in output
    assert list(tmp_path.iterdir()) == [tmp_path / "dry-run.log"]


@pytest.mark.parametrize("after", [0.3, 1.5])  # while the libraries load; while the data are checked
def test_sigint_during_start_up_ends_it_quietly(mnist_dir, tmp_path, after):
    out = tmp_path / "out"
    campaign = subprocess.Popen([sys.executable, "run_experiments.py", "--smoke", "--data_dir", str(mnist_dir),
                                 "--output_dir", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    time.sleep(after)
    os.killpg(campaign.pid, signal.SIGINT)
    output, _ = campaign.communicate(timeout=120)
    assert campaign.returncode == 130 and "Traceback" not in output, output


INTERRUPTED_WHILE_IMPORTING = """
import importlib.abc, os, runpy, signal, sys
script, module = sys.argv.pop(1), sys.argv.pop(1)

class Interrupt(importlib.abc.MetaPathFinder):  # Ctrl-C as the script starts to import `module`
    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)

sys.meta_path.insert(0, Interrupt())
sys.argv[0] = script
sys.path.insert(0, os.getcwd())
runpy.run_path(script, run_name="__main__")
"""


def interrupted_while_importing(script: str, module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", INTERRUPTED_WHILE_IMPORTING, script, module, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_sigint_while_the_libraries_load_is_acted_on_once_they_have(mnist_dir, tmp_path):
    """Not raised in the signal handler: one raised while torch's C++ code imports modules aborts the process
    ("terminate called after throwing an instance of 'pybind11::error_already_set'") or is lost."""
    out = tmp_path / "out"
    done = interrupted_while_importing("run_experiments.py", "nnet_models", "--smoke", "--data_dir", str(mnist_dir),
                                       "--output_dir", str(out))
    assert done.returncode == 130 and done.stdout == ""
    assert done.stderr == "Interrupted before the campaign started; nothing was run.\n"
    assert not out.exists()


def test_sigint_while_plots_py_loads_its_libraries_ends_it_quietly(tmp_path):
    directory = campaign(tmp_path / "campaign", grid_records(("relu",), ("label_flip",)))
    done = interrupted_while_importing("plots.py", "results_store", str(directory))
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "")
    assert not (directory / "figures").exists()


# ================================================================ corrupt records


def test_corrupt_records_are_skipped_with_a_warning_and_redone(mnist, mnist_dir, tmp_path, no_figures):
    out = tmp_path / "results"
    argv = tiny_argv(out, mnist_dir)
    code, stdout, stderr = run_main(argv)
    assert code == 0, stdout + stderr
    files = run_files(out)
    assert len(files) == TINY_RUNS
    torn_id, partial_id = sorted(files)[:2]
    good_before = {k: v for k, v in snapshot(out).items() if k not in (torn_id, partial_id)}
    original = json.loads(files[partial_id].read_text())
    files[torn_id].write_text('{"run_id": "' + torn_id + '", "status": "o')  # cut off mid-write
    files[partial_id].write_text(json.dumps({"run_id": partial_id, "status": "ok",
                                             "test_accuracy": 0.5}))  # valid JSON, fields missing

    with pytest.warns(UserWarning, match="moved the invalid run record") as caught:
        code, stdout, stderr = run_main(argv)
    assert code == 0, stdout
    messages = [str(w.message) for w in caught if "moved the invalid run record" in str(w.message)]
    assert len(messages) == 2
    assert any(torn_id in m for m in messages)
    assert any(partial_id in m and "missing fields" in m for m in messages)
    assert sorted(p.stem for p in (out / "runs" / "invalid").iterdir()) == sorted([torn_id, partial_id])
    assert "6 runs in the grid, 4 already done, 2 to run" in stdout
    assert len(per_run_lines(stdout)) == 2
    records = load_quietly(out)  # both are whole records again
    assert len(records) == TINY_RUNS and all(r["status"] == "ok" for r in records.values())
    assert records[partial_id]["test_accuracy"] == original["test_accuracy"]  # redone, same result
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in good_before} == good_before  # the rest untouched
    assert len(rs.read_csv(out / rs.PER_RUN_CSV)) == TINY_RUNS


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])  # forked workers; workers of a forkserver
def test_workers_exit_when_the_campaign_process_is_killed(mnist, mnist_dir, tmp_path, threads):
    """kill -9 of the campaign process alone leaves no worker (nor forkserver) running on."""
    out = tmp_path / "results"
    argv = tiny_argv(out, mnist_dir, "--max_train_samples", "None", "--epochs", "3",
                     "--max_workers", str(3 - threads), "--cpu_threads_per_worker", str(threads))
    driver = subprocess.Popen([sys.executable, "run_experiments.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not [c for c in psutil.Process(driver.pid).children(recursive=True) if "python" in c.name()]:
            assert driver.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(3)  # the pool is up and training
        helpers = psutil.Process(driver.pid).children(recursive=True)
        driver.kill()
        driver.wait()
        gone, alive = psutil.wait_procs(helpers, timeout=30)
        assert not alive, [p.cmdline()[:3] for p in alive]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
