"""Crashes, signals, corrupt records and resuming: real processes and real signals.

The campaign is started as `python run_experiments.py ...` in its own session, so the whole
process group (driver and pool workers) can be signalled or killed at once.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import pandas as pd
import psutil
import pytest

import nnet_models as nm
import results_store as rs
import run_experiments as rx

ROOT = Path(__file__).resolve().parents[1]

# 12 runs: relu x {label_flip, pixel_uniform} x p {0, 0.3, 0.6} x 2 repeats, 2 epochs each
CRASH_ARGS = ["--activations", "relu", "--noise_types", "label_flip,pixel_uniform", "--ps", "0,0.3,0.6",
              "--extra_label_ps", "", "--repeats", "2", "--epochs", "2", "--max_train_samples", "3000",
              "--max_workers", "2"]
N_CRASH_RUNS = 12
METRIC_KEYS = ["test_accuracy", "test_loss", "test_macro_precision", "test_macro_recall", "test_macro_roc_auc",
               "train_loss", "history_test_loss", "history_test_accuracy", "seed", "p", "noise_type", "repeat"]
RESUME_HINT = "run the same command again to resume"


def crash_argv(out, data_dir, *extra) -> list[str]:
    return [*CRASH_ARGS, "--data_dir", str(data_dir), "--output_dir", str(out), *extra]


def tiny_argv(out, data_dir, *extra) -> list[str]:
    """8 quick runs (300 samples, 1 epoch, one hidden layer of 32)."""
    return ["--activations", "relu", "--noise_types", "label_flip,pixel_uniform", "--ps", "0,0.5",
            "--extra_label_ps", "", "--repeats", "2", "--epochs", "1", "--max_train_samples", "300",
            "--hidden_sizes", "32", "--max_workers", "2", "--data_dir", str(data_dir), "--output_dir", str(out),
            *extra]


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) in this process (pool workers fork from it), with its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = rx.main(argv)
    return code, out.getvalue(), err.getvalue()


def run_files(out: Path) -> dict[str, Path]:
    return {p.stem: p for p in (out / "runs").glob("*.json")} if (out / "runs").is_dir() else {}


def snapshot(out: Path) -> dict[str, tuple[int, str]]:
    """run_id -> (mtime_ns, finished_at) of every stored record; every file must be a whole record."""
    result = {}
    for run_id, path in run_files(out).items():
        record = json.loads(path.read_text())  # never torn, whatever killed the writer
        assert record["run_id"] == run_id
        result[run_id] = (path.stat().st_mtime_ns, record["finished_at"])
    return result


def load_quietly(out: Path) -> dict[str, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unreadable record here is a failure
        return rs.RunStore(out).load()


def metrics(records: dict[str, dict]) -> dict[str, dict]:
    return {run_id: {k: r.get(k) for k in METRIC_KEYS} for run_id, r in records.items()}


class Campaign:
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

    def wait_for_runs(self, out: Path, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(run_files(out)) < count:
            if self.proc.poll() is not None:
                pytest.fail(f"campaign exited ({self.proc.returncode}) before {count} runs were stored:\n"
                            + self.output())
            if time.monotonic() > deadline:
                pytest.fail(f"fewer than {count} runs stored after {timeout} s:\n" + self.output())
            time.sleep(0.02)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"campaign still running after {timeout} s:\n" + self.output())

    def group_alive(self) -> list[psutil.Process]:
        alive = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == self.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except (ProcessLookupError, psutil.Error):
                pass
        return alive

    def wait_group_gone(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while (alive := self.group_alive()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive, f"processes of the campaign left running: {alive}"

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
        campaign = Campaign(argv, log)
        started.append(campaign)
        return campaign

    yield start
    for campaign in started:
        campaign.kill()


@pytest.fixture(scope="module")
def warm(mnist_dir):
    """Decode MNIST and train once in this process, so forked workers start warm (speed only)."""
    nm.train_and_evaluate(nm.TrainConfig(epochs=1, max_train_samples=200, hidden_sizes=(16,),
                                         data_dir=str(mnist_dir)))
    return mnist_dir


@pytest.fixture(scope="module")
def reference(warm, tmp_path_factory):
    """The crash-test campaign run without interruption: its records by run id."""
    out = tmp_path_factory.mktemp("reference") / "results"
    code, stdout, stderr = run_main(crash_argv(out, warm))
    assert code == 0, stdout + stderr
    records = load_quietly(out)
    assert len(records) == N_CRASH_RUNS and all(r["status"] == "ok" for r in records.values())
    assert set(records) == {s.run_id for s in rx.build_grid(rx.config_from_args(crash_argv(out, warm))[0])}
    return records


def assert_complete_like(out: Path, reference: dict[str, dict]) -> None:
    """The campaign in `out` holds exactly the reference's runs, once each, with the same results."""
    records = load_quietly(out)
    assert set(records) == set(reference)
    assert all(r["status"] == "ok" for r in records.values())
    assert metrics(records) == metrics(reference)
    per_run = pd.read_csv(out / "results_per_run.csv")
    assert len(per_run) == len(reference)
    assert not per_run["run_id"].duplicated().any()
    assert set(per_run["run_id"]) == set(reference)
    assert (per_run["status"] == "ok").all()


# ================================================================ kill -9 and resume


@pytest.mark.slow
def test_kill_9_then_resume_completes_without_redoing_finished_runs(warm, reference, tmp_path, campaigns):
    out = tmp_path / "results"
    campaign = campaigns(crash_argv(out, warm), tmp_path / "first.log")
    campaign.wait_for_runs(out, 3)
    os.killpg(campaign.pid, signal.SIGKILL)
    campaign.wait(10)
    campaign.wait_group_gone()
    assert campaign.proc.returncode == -signal.SIGKILL

    before = snapshot(out)  # every file left behind is a whole record
    assert 3 <= len(before) < N_CRASH_RUNS, "the kill came too late to interrupt anything"
    assert set(before) <= set(reference)

    code, stdout, stderr = run_main(crash_argv(out, warm))
    assert code == 0, stdout + stderr
    done = len(before)
    assert f"{N_CRASH_RUNS} runs in the grid, {done} already done, {N_CRASH_RUNS - done} to run" in stdout
    assert stdout.count("[ok]") == N_CRASH_RUNS - done  # only the missing runs ran

    assert_complete_like(out, reference)
    after = snapshot(out)
    for run_id, stamp in before.items():
        assert after[run_id] == stamp, f"{run_id} was run again"
    per_run = pd.read_csv(out / "results_per_run.csv").set_index("run_id")
    for run_id, (_, finished_at) in before.items():
        assert per_run.loc[run_id, "finished_at"] == finished_at


# ================================================================ a worker dies


def pool_workers(pid: int) -> list[psutil.Process]:
    driver = psutil.Process(pid)
    return [c for c in driver.children() if c.cmdline() == driver.cmdline()]  # forked: same command line


def kill_a_busy_worker(campaign: Campaign, out: Path) -> int:
    """SIGKILL one pool worker while runs are still to do; returns how many runs were stored then."""
    campaign.wait_for_runs(out, 1)
    deadline = time.monotonic() + 30
    while len(workers := pool_workers(campaign.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(workers) == 2, workers
    stored = len(run_files(out))
    workers[0].kill()
    assert stored < N_CRASH_RUNS - 2, "the worker was killed too late to matter"
    return stored


@pytest.mark.slow
def test_killed_worker_is_replaced_and_every_run_finishes(warm, reference, tmp_path, campaigns):
    out = tmp_path / "results"
    campaign = campaigns(crash_argv(out, warm), tmp_path / "campaign.log")
    kill_a_busy_worker(campaign, out)
    code = campaign.wait(180)
    output = campaign.output()
    assert code == 0, output
    assert "A worker process died" in output
    assert f"Done: {N_CRASH_RUNS} ok, 0 failed, 0 pending" in output
    assert_complete_like(out, reference)
    campaign.wait_group_gone()


@pytest.fixture
def worker_dies(monkeypatch, tmp_path):
    """train_and_evaluate SIGKILLs its own worker on one grid cell (like the OOM killer would):
    every time or only the first time; optionally after a delay, with the healthy runs slowed down."""
    real = nm.train_and_evaluate
    marker = tmp_path / "died-once"

    def install(always: bool, cell=None, die_after: float = 0.0, healthy_extra: float = 0.0):
        cell = cell or failing_cell

        def maybe_die(cfg, data=None):
            if cell(cfg) and (always or not marker.exists()):
                marker.touch()
                time.sleep(die_after)
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(healthy_extra)
            return real(cfg, data)
        monkeypatch.setattr(nm, "train_and_evaluate", maybe_die)

    return install


def test_worker_that_dies_every_time_is_failed_after_max_attempts(warm, tmp_path, worker_dies):
    worker_dies(always=True)
    out = tmp_path / "results"
    argv = tiny_argv(out, warm, "--max_attempts", "2", "--max_workers", "1")  # one worker: nothing else in flight
    bad_id = next(s.run_id for s in rx.build_grid(rx.config_from_args(argv)[0]) if failing_cell(s.config))
    code, stdout, stderr = run_main(argv)
    assert code == 1, stdout + stderr
    assert stderr.count("A worker process died") == 2
    records = load_quietly(out)
    assert len(records) == 8
    assert records[bad_id]["status"] == "failed"
    assert "worker process died 2 times" in records[bad_id]["error"]
    assert records[bad_id]["attempts"] == 2
    assert all(r["status"] == "ok" for k, r in records.items() if k != bad_id)
    assert f"failed run {bad_id}" in stdout
    # out of tries: a resume does not run it again
    code, stdout, _ = run_main(argv)
    assert code == 1 and "7 already done, 1 failed for good (out of attempts), 0 to run" in stdout


def test_a_worker_that_always_dies_does_not_fail_the_runs_beside_it(warm, tmp_path, worker_dies):
    """BUG: when a worker dies, execute_local charges an attempt to *every* run in flight, and the
    restarted pool resubmits the same runs side by side; so the healthy run that keeps sharing the
    pool with a run that always kills its worker is also recorded as failed ("worker process died
    3 times") although it never crashed anything."""
    out = tmp_path / "results"
    argv = tiny_argv(out, warm, "--max_attempts", "3")
    specs = rx.build_grid(rx.config_from_args(argv)[0])
    bad_id = specs[0].run_id  # first in the queue: its neighbour is specs[1], every time
    # it dies 0.2 s in, while the (slower) healthy run beside it is still training
    worker_dies(always=True, cell=lambda cfg: rx.run_key(cfg) == bad_id, die_after=0.2, healthy_extra=0.6)
    code, stdout, stderr = run_main(argv)
    assert code == 1, stdout + stderr
    records = load_quietly(out)
    assert records[bad_id]["status"] == "failed"
    collateral = {k: r["error"] for k, r in records.items() if k != bad_id and r["status"] != "ok"}
    assert collateral == {}


def test_worker_death_counts_as_an_attempt_in_the_record(warm, tmp_path, worker_dies):
    """BUG: a run whose worker died once and then succeeded is stored with attempts=1; the death
    charged in execute_local is lost, so max_attempts is not enforced across resumes."""
    worker_dies(always=False)
    out = tmp_path / "results"
    argv = tiny_argv(out, warm)
    bad_id = next(s.run_id for s in rx.build_grid(rx.config_from_args(argv)[0]) if failing_cell(s.config))
    code, stdout, stderr = run_main(argv)
    assert code == 0, stdout + stderr
    assert "A worker process died" in stderr
    records = load_quietly(out)
    assert all(r["status"] == "ok" for r in records.values()) and len(records) == 8
    assert records[bad_id]["attempts"] == 2


# ================================================================ Ctrl-C and SIGTERM


@pytest.mark.slow
@pytest.mark.parametrize("sig, whole_group", [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGTERM, True)],
                         ids=["sigint-group", "sigterm-driver", "sigterm-group"])
def test_signal_stops_campaign_cleanly_and_it_resumes(sig, whole_group, warm, reference, tmp_path, campaigns):
    out = tmp_path / "results"
    campaign = campaigns(crash_argv(out, warm), tmp_path / "campaign.log")
    campaign.wait_for_runs(out, 2)
    sent = time.monotonic()
    if whole_group:  # Ctrl-C in a terminal signals the whole foreground group
        os.killpg(campaign.pid, sig)
    else:
        os.kill(campaign.pid, sig)
    code = campaign.wait(30)
    elapsed = time.monotonic() - sent
    output = campaign.output()
    assert code == 130, output
    assert elapsed < 10, f"took {elapsed:.1f} s to stop"
    assert RESUME_HINT in output
    campaign.wait_group_gone(5)  # the workers were stopped too

    files = run_files(out)
    assert 2 <= len(files) < N_CRASH_RUNS, "the signal came too late to interrupt anything"
    records = load_quietly(out)
    per_run = pd.read_csv(out / "results_per_run.csv")
    assert len(per_run) == len(files)
    assert set(per_run["run_id"]) == set(files) == set(records)
    assert (per_run["status"] == "ok").all()
    summary = pd.read_csv(out / "results_summary.csv")
    assert summary["n"].sum() == len(files)
    history = pd.read_csv(out / "results_history.csv")
    assert len(history) == 2 * len(files)
    meta = json.loads((out / "campaign.json").read_text())
    assert meta["counts"] == {"done": len(files), "failed": 0, "pending": N_CRASH_RUNS - len(files)}
    assert meta["finished_at"] is None
    assert f"Done: {len(files)} ok, 0 failed, {N_CRASH_RUNS - len(files)} pending" in output

    before = snapshot(out)
    code, stdout, _ = run_main(crash_argv(out, warm))
    assert code == 0, stdout
    assert f"{len(files)} already done, {N_CRASH_RUNS - len(files)} to run" in stdout
    assert_complete_like(out, reference)
    after = snapshot(out)
    assert all(after[k] == v for k, v in before.items())


def test_interrupt_just_after_a_record_is_saved_keeps_csvs_consistent(warm, tmp_path, monkeypatch):
    """BUG: Ctrl-C/SIGTERM raise KeyboardInterrupt at whatever bytecode the driver is running. If it
    lands in on_record after store.save() has renamed the record into runs/ (e.g. during the
    directory fsync) but before `records[run_id] = record`, finish() writes CSVs and campaign.json
    from the in-memory dict and leave that run out: results_per_run.csv has fewer rows than runs/
    has files, and "Done: N ok" under-counts. (The signal tests above hit this now and then.)"""
    real_save = rs.RunStore.save
    saved = []

    def save_then_interrupt(self, record):
        real_save(self, record)
        saved.append(record["run_id"])
        if len(saved) == 3:
            raise KeyboardInterrupt  # what the SIGINT/SIGTERM handler raises, arriving right here

    monkeypatch.setattr(rs.RunStore, "save", save_then_interrupt)
    out = tmp_path / "results"
    code, stdout, _ = run_main(tiny_argv(out, warm))
    assert code == 130
    assert RESUME_HINT in stdout
    files = run_files(out)
    assert set(files) == set(saved) and len(files) == 3
    per_run = pd.read_csv(out / "results_per_run.csv")
    meta = json.loads((out / "campaign.json").read_text())
    assert sorted(per_run["run_id"]) == sorted(files)
    assert meta["counts"]["done"] == len(files)
    assert "Done: 3 ok, 0 failed, 5 pending" in stdout


# ================================================================ corrupt records


@pytest.fixture
def tiny_campaign(warm, tmp_path):
    out = tmp_path / "results"
    argv = tiny_argv(out, warm)
    code, stdout, stderr = run_main(argv)
    assert code == 0, stdout + stderr
    assert len(run_files(out)) == 8
    return out, argv


def test_corrupt_records_are_skipped_with_a_warning_and_redone(tiny_campaign):
    out, argv = tiny_campaign
    files = run_files(out)
    torn_id, partial_id = sorted(files)[:2]
    good_before = {k: v for k, v in snapshot(out).items() if k not in (torn_id, partial_id)}
    original = json.loads(files[partial_id].read_text())
    files[torn_id].write_text('{"run_id": "' + torn_id + '", "status": "o')  # cut off mid-write
    files[partial_id].write_text(json.dumps({"run_id": partial_id, "status": "ok",
                                             "test_accuracy": 0.5}))  # valid JSON, fields missing

    with pytest.warns(UserWarning) as caught:
        records = rs.RunStore(out).load()
    assert set(records) == set(files) - {torn_id, partial_id}
    messages = [str(w.message) for w in caught if "skipping unreadable run record" in str(w.message)]
    assert len(messages) == 2
    assert any(torn_id in m for m in messages)
    assert any(partial_id in m and "missing fields" in m and "'p'" in m for m in messages)

    with pytest.warns(UserWarning, match="skipping unreadable run record"):
        code, stdout, _ = run_main(argv)
    assert code == 0, stdout
    assert "8 runs in the grid, 6 already done, 2 to run" in stdout
    assert stdout.count("[ok]") == 2
    records = load_quietly(out)  # both are whole records again
    assert len(records) == 8 and all(r["status"] == "ok" for r in records.values())
    assert records[partial_id]["test_accuracy"] == original["test_accuracy"]  # redone, same result
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in good_before} == good_before  # the rest untouched
    assert len(pd.read_csv(out / "results_per_run.csv")) == 8


@pytest.mark.parametrize("content", [
    "", "{", "not json at all", "\x00" * 64, "[]", '"a string"', '{"run_id": "x"}',
    "null", "42",  # valid JSON, but not an object
], ids=["empty", "open-brace", "text", "nul-bytes", "list", "string", "missing-fields", "null", "number"])
def test_store_loader_skips_any_unreadable_file(tmp_path, content):
    store = rs.RunStore(tmp_path)
    good = {"run_id": "a" * 16, "repeat": 0, "status": "ok",
            **{field: 1 for field in rs.GROUP_FIELDS}}
    store.save(good)
    (store.directory / ("b" * 16 + ".json")).write_text(content)
    with pytest.warns(UserWarning, match="skipping unreadable run record"):
        records = store.load()
    assert records == {"a" * 16: good}


# ================================================================ --fresh


def test_fresh_moves_old_results_aside_and_runs_everything(tiny_campaign):
    out, argv = tiny_campaign
    old_files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert Path("runs") in {p.parent for p in old_files}

    code, stdout, _ = run_main([*argv, "--fresh"])
    assert code == 0, stdout
    moved_lines = [line for line in stdout.splitlines() if line.startswith("Moved the previous results to ")]
    assert len(moved_lines) == 1
    moved = Path(moved_lines[0].removeprefix("Moved the previous results to ").strip())
    assert moved.is_dir() and moved.parent == out.parent and moved.name.startswith(out.name + ".old-")
    assert {p.relative_to(moved): p.read_bytes() for p in moved.rglob("*") if p.is_file()} == old_files
    assert "8 runs in the grid, 0 already done, 8 to run" in stdout
    assert stdout.count("[ok]") == 8
    new = load_quietly(out)
    assert len(new) == 8
    assert {k: v["test_accuracy"] for k, v in new.items()} == \
        {k: v["test_accuracy"] for k, v in load_quietly(moved).items()}


def test_fresh_on_an_empty_or_missing_dir_moves_nothing(warm, tmp_path):
    out = tmp_path / "results"
    code, stdout, _ = run_main(tiny_argv(out, warm, "--fresh", "--ps", "0"))
    assert code == 0 and "Moved" not in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_fresh_twice_within_one_second_keeps_both_old_results(tmp_path, monkeypatch):
    """BUG: move_aside names the old dir by a timestamp to the second; a second --fresh in the
    same second renames onto the first's (non-empty) dir and dies with OSError (ENOTEMPTY)."""
    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2024, 5, 6, 7, 8, 9, tzinfo=tz)

    monkeypatch.setattr(rx, "datetime", FrozenClock)
    out = tmp_path / "results"
    moved = []
    for generation in ("first", "second"):
        (out / "runs").mkdir(parents=True)
        (out / "runs" / f"{generation}.json").write_text(generation)
        moved.append(rx.move_aside(out))
        assert not out.exists()
    assert moved[0] != moved[1]
    assert (moved[0] / "runs" / "first.json").read_text() == "first"
    assert (moved[1] / "runs" / "second.json").read_text() == "second"


# ================================================================ extending a campaign


def test_extending_the_grid_runs_only_the_new_runs(tiny_campaign):
    out, argv = tiny_campaign
    before = snapshot(out)

    code, stdout, _ = run_main([*argv, "--ps", "0,0.5,0.8"])
    assert code == 0, stdout
    assert "12 runs in the grid, 8 already done, 4 to run" in stdout
    assert stdout.count("[ok]") == 4 and "p=0.80" in stdout and "p=0.50" not in stdout
    middle = snapshot(out)
    assert {k: middle[k] for k in before} == before
    assert {r["p"] for k, r in load_quietly(out).items() if k not in before} == {0.8}

    code, stdout, _ = run_main([*argv, "--ps", "0,0.5,0.8", "--repeats", "3"])
    assert code == 0, stdout
    assert "18 runs in the grid, 12 already done, 6 to run" in stdout
    after = snapshot(out)
    assert {k: after[k] for k in middle} == middle
    assert {r["repeat"] for k, r in load_quietly(out).items() if k not in middle} == {2}
    per_run = pd.read_csv(out / "results_per_run.csv")
    assert len(per_run) == 18
    summary = pd.read_csv(out / "results_summary.csv")
    assert len(summary) == 6 and (summary["n"] == 3).all()

    # shrinking the grid back runs nothing; the stored extra runs stay in the CSVs
    code, stdout, _ = run_main(argv)
    assert code == 0 and "8 runs in the grid, 8 already done, 0 to run" in stdout
    assert snapshot(out) == after


# ================================================================ failed runs and retries


def failing_cell(cfg: nm.TrainConfig) -> bool:
    return cfg.noise_type == "label_flip" and cfg.p == 0.5 and cfg.seed == rx.repeat_seed(0, 0)


@pytest.fixture
def broken_cell(fail_runs):
    """train_and_evaluate raises for one grid cell; calling the fixture's value "fixes the bug"."""
    return fail_runs(failing_cell)


def test_failed_runs_are_retried_until_max_attempts(warm, tmp_path, broken_cell):
    out = tmp_path / "results"
    argv = tiny_argv(out, warm, "--max_attempts", "2")
    bad_id = next(s.run_id for s in rx.build_grid(rx.config_from_args(argv)[0]) if failing_cell(s.config))

    code, stdout, _ = run_main(argv)
    assert code == 1 and f"failed run {bad_id}" in stdout
    assert "8 runs in the grid, 0 already done, 8 to run" in stdout
    record = load_quietly(out)[bad_id]
    assert (record["status"], record["attempts"], record["error"]) == ("failed", 1, "RuntimeError: injected failure")
    others = {k: v for k, v in snapshot(out).items() if k != bad_id}

    code, stdout, _ = run_main(argv)  # attempt 2 of 2
    assert code == 1 and f"failed run {bad_id}" in stdout
    assert "8 runs in the grid, 7 already done, 1 to run" in stdout
    assert load_quietly(out)[bad_id]["attempts"] == 2
    assert {k: v for k, v in snapshot(out).items() if k != bad_id} == others
    stamp = snapshot(out)[bad_id]

    code, stdout, _ = run_main(argv)  # no tries left: reported, not retried
    assert code == 1 and f"failed run {bad_id}" in stdout and "injected failure" in stdout
    assert "8 runs in the grid, 7 already done, 1 failed for good (out of attempts), 0 to run" in stdout
    assert snapshot(out)[bad_id] == stamp
    per_run = pd.read_csv(out / "results_per_run.csv").set_index("run_id")
    assert per_run.loc[bad_id, "status"] == "failed" and per_run.loc[bad_id, "attempts"] == 2

    broken_cell()  # the cause is fixed; allow one more try
    code, stdout, _ = run_main([*argv, "--max_attempts", "3"])
    assert code == 0, stdout
    assert "1 to run" in stdout
    record = load_quietly(out)[bad_id]
    assert record["status"] == "ok" and record["attempts"] == 3 and record["error"] == ""


def test_failed_runs_are_not_retried_when_retry_failed_is_off(warm, tmp_path, broken_cell):
    out = tmp_path / "results"
    argv = tiny_argv(out, warm, "--retry_failed", "false")
    code, _, _ = run_main(argv)
    assert code == 1
    stamps = snapshot(out)
    broken_cell()
    code, stdout, _ = run_main(argv)
    assert code == 1 and "8 runs in the grid, 7 already done, 1 failed for good (out of attempts), 0 to run" in stdout
    assert snapshot(out) == stamps
    code, stdout, _ = run_main(tiny_argv(out, warm))  # retry_failed back on
    assert code == 0 and "1 to run" in stdout
