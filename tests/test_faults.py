"""Faults a campaign meets for real: wrongly typed records in its store, bad input, a CNN given widths, a burst of
Ctrl-C, a write error, a truncated CSV; and what the figures, tables and docs say about them."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import conftest
import plots
import results_store as rs
import run_experiments as rx
from conftest import TINY_RUNS, campaign, grid_records, run_files, run_main, tiny_argv

ROOT = Path(__file__).resolve().parents[1]


def grid_ids(argv: list[str]) -> set[str]:
    return {spec.run_id for spec in rx.build_grid(rx.config_from_args(argv)[0])}


def load_quietly(out: Path) -> dict[str, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every stored record must be valid here
        return rs.RunStore(out).load()


@pytest.fixture(scope="module")
def finished(mnist, mnist_dir, tmp_path_factory) -> Path:
    """A finished tiny campaign (tiny_argv), never altered: tests alter copies of it."""
    out = tmp_path_factory.mktemp("finished") / "results"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "write_figures", lambda *args, **kwargs: [])
        code, stdout, stderr = run_main(tiny_argv(out, mnist_dir))
    assert code == 0, stdout + stderr
    assert len(load_quietly(out)) == TINY_RUNS
    return out


@pytest.fixture
def finished_copy(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "results"))


# ================================================================ wrongly typed records in the store


def short_reliability(record: dict) -> None:
    record["reliability"] = {field: values[:3] for field, values in record["reliability"].items()}


def failed_for_good_without_error(record: dict) -> None:
    del record["error"]
    record.update(status="failed", attempts=3)  # tiny_argv's max_attempts: no try left


WRONG_RECORDS = {
    "attempts-text": lambda record: record.update(attempts="x"),
    "max_train_samples-text": lambda record: record.update(max_train_samples="abc"),
    "p-text": lambda record: record.update(p="abc"),
    "reliability-empty": lambda record: record.update(reliability={}),
    "reliability-short": short_reliability,
    "failed-without-error": failed_for_good_without_error,
}


@pytest.mark.parametrize("spoil", WRONG_RECORDS.values(), ids=WRONG_RECORDS.keys())
def test_a_wrongly_typed_record_is_moved_aside_and_its_run_redone(spoil, finished_copy, mnist_dir, no_figures):
    out = finished_copy
    argv = tiny_argv(out, mnist_dir)
    run_id = max(run_files(out))
    record = json.loads(run_files(out)[run_id].read_text())
    spoil(record)
    with pytest.raises(ValueError):
        rs.check_record(record, run_id)
    run_files(out)[run_id].write_text(json.dumps(record))

    with pytest.warns(UserWarning, match="moved the invalid run record") as caught:
        code, stdout, stderr = run_main(argv)
    assert code == 0, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert any(f"{run_id}.json" in str(warning.message) and "will be redone" in str(warning.message)
               for warning in caught)
    assert json.loads((out / "runs" / "invalid" / f"{run_id}.json").read_text()) == record  # moved as it was
    assert f"{TINY_RUNS} runs in the grid, {TINY_RUNS - 1} already done, 1 to run" in stdout
    records = load_quietly(out)
    rs.check_record(records[run_id], run_id)
    assert records[run_id]["status"] == "ok" and records[run_id]["attempts"] == 1
    assert set(records) == grid_ids(argv)
    for name in (rs.PER_RUN_CSV, rs.HISTORY_CSV, rs.RELIABILITY_CSV):
        assert set(rs.read_csv(out / name)["run_id"]) == grid_ids(argv), name
    assert sorted(rs.read_csv(out / rs.PER_RUN_CSV)["run_id"]) == sorted(grid_ids(argv))


# ================================================================ bad input


def symlink_loop(tmp_path: Path) -> Path:
    """An output_dir under two links that point at each other."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    return tmp_path / "a" / "results"


BAD_INPUT = {  # name: (output_dir under tmp_path, extra arguments, what the error line names)
    "noise_matrix-5000-deep": (lambda tmp: tmp / "results",
                               ["--noise_types", "label_matrix", "--noise_matrix", "[" * 5000 + "]" * 5000],
                               "noise_matrix: '[[[["),
    "output_dir-300-character-name": (lambda tmp: tmp / ("x" * 300) / "results", [], "output_dir: "),
    "output_dir-in-a-symlink-loop": (symlink_loop, [], "output_dir: "),
    "noise_matrix-without-label_matrix": (lambda tmp: tmp / "results", ["--noise_matrix", "[[1]]"],
                                          "noise_matrix is set but noise_types has no label_matrix"),
    "validation_fraction-holding-out-none": (lambda tmp: tmp / "results",
                                             ["--validation_fraction", "0.001", "--max_train_samples", "100"],
                                             "validation_fraction: 0.001 of 100 training examples holds out none"),
}


def tree(directory: Path) -> list[str]:
    """Every path under `directory`, links not followed."""
    return sorted(os.path.join(top, name) for top, dirs, files in os.walk(directory) for name in dirs + files)


@pytest.mark.parametrize("output_dir, extra, named", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_exits_2_in_one_line_writing_nothing(output_dir, extra, named, mnist, mnist_dir, tmp_path):
    out = output_dir(tmp_path)
    before = tree(tmp_path)
    code, stdout, stderr = run_main(tiny_argv(out, mnist_dir, *extra))
    assert code == 2 and stdout == ""
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ") and named in stderr, stderr
    if named == "output_dir: ":
        assert str(out)[:60] in stderr
    assert tree(tmp_path) == before
    assert not os.path.lexists(out)


# ================================================================ a CNN ignores hidden_sizes

GRID_ARGS = ["--activations", "relu", "--noise_types", "label_flip", "--ps", "0,0.5", "--extra_label_ps", "",
             "--repeats", "2"]


def test_a_cnn_given_other_widths_has_the_same_run_ids():
    cnn_64 = grid_ids([*GRID_ARGS, "--model_types", "cnn", "--hidden_sizes", "64"])
    cnn_32 = grid_ids([*GRID_ARGS, "--model_types", "cnn", "--hidden_sizes", "32"])
    assert len(cnn_64) == 2 * 2  # the clean point and label_flip at 0.5, 2 repeats
    assert cnn_64 == cnn_32
    mlp_64 = grid_ids([*GRID_ARGS, "--model_types", "mlp", "--hidden_sizes", "64"])
    assert mlp_64 != grid_ids([*GRID_ARGS, "--model_types", "mlp", "--hidden_sizes", "32"])  # an MLP's do differ


def test_mlp_and_cnn_over_two_widths_have_one_cnn_point_per_noise_point_and_repeat(mnist, mnist_dir, tmp_path,
                                                                                     monkeypatch):
    argv = [*GRID_ARGS, "--model_types", "mlp,cnn", "--hidden_sizes", "[[64],[32]]", "--data_dir", str(mnist_dir),
            "--output_dir", str(tmp_path / "results")]
    config = rx.config_from_args(argv)[0]
    specs = rx.build_grid(config)
    cnn = [(s.config.noise_type, s.config.p, s.repeat) for s in specs if s.config.model_type == "cnn"]
    mlp = [(s.config.hidden_sizes, s.config.noise_type, s.config.p, s.repeat) for s in specs
           if s.config.model_type == "mlp"]
    assert sorted(cnn) == sorted({("none", 0.0, r) for r in range(2)} | {("label_flip", 0.5, r) for r in range(2)})
    assert len(mlp) == len(set(mlp)) == 2 * 2 * 2
    assert rx.grid_size(config) == len(specs) == 12
    monkeypatch.setattr(rx, "estimate_seconds", lambda specs: [1.0] * len(specs))  # no calibration runs
    code, stdout, stderr = run_main(["--dry-run", *argv])
    assert code == 0, stderr
    head = stdout.splitlines()[0]  # the factors it names multiply to the count
    assert head.startswith(f"{len(specs)} runs: 3 architectures (mlp at 2 hidden_sizes, cnn) x ")
    assert math.prod(map(int, re.findall(r"(?:^| x )(\d+) ", head.split(";")[0].split(": ", 1)[1]))) == len(specs)
    assert not (tmp_path / "results").exists()
    varying = rx.varying_settings(config)  # how the progress and closing lines name a run
    names = sorted(rx.spec_name(s, varying) for s in specs if s.config.p == 0 and s.repeat == 0)
    assert names == ["cnn/relu none p=0.00 r0", "mlp/relu none p=0.00 hidden_sizes=32 r0",
                     "mlp/relu none p=0.00 hidden_sizes=64 r0"]


# ================================================================ Ctrl-C, several times

SIGNAL_REPEATS = 6  # 3 noise points x 6 repeats, one worker: still running after the first runs


@pytest.fixture
def campaign_process(tmp_path):
    """start(argv): `python run_experiments.py argv` in a session of its own, output in tmp_path/campaign.out;
    whatever is left of it is killed at the end."""
    started = []

    def start(argv: list[str]) -> subprocess.Popen:
        with open(tmp_path / "campaign.out", "w") as log:
            started.append(subprocess.Popen([sys.executable, "-u", "run_experiments.py", *argv], cwd=ROOT,
                                            start_new_session=True, stdout=log, stderr=subprocess.STDOUT))
        return started[-1]

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def wait_for_stored_runs(proc: subprocess.Popen, out: Path, count: int, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(run_files(out)) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"fewer than {count} runs stored (exit code {proc.returncode}):\n{log.read_text()}")
        time.sleep(0.05)


def interrupt_until_exit(proc: subprocess.Popen, first: int, timeout: float = 300) -> int:
    """SIGINT to the process group, as Ctrl-C in a terminal: `first` times 0.1 s apart, then (first = 0) every
    0.1 s until the process exits; returns its exit code."""
    deadline = time.monotonic() + timeout
    sent = 0
    while proc.poll() is None and (first == 0 or sent < first) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        sent += 1
        time.sleep(0.1)
    return proc.wait(timeout=max(1.0, deadline - time.monotonic()))


@pytest.mark.slow
@pytest.mark.parametrize("signals", [3, 0], ids=["three-quick-sigints", "sigints-throughout-the-closing"])
def test_repeated_sigints_stop_the_campaign_with_closing_counts_of_the_stored_runs(signals, mnist_dir, tmp_path,
                                                                                  campaign_process):
    out = tmp_path / "results"
    argv = tiny_argv(out, mnist_dir, "--repeats", str(SIGNAL_REPEATS), "--max_workers", "1")
    total = len(grid_ids(argv))
    proc = campaign_process(argv)
    log = tmp_path / "campaign.out"
    wait_for_stored_runs(proc, out, 2, log)
    code = interrupt_until_exit(proc, signals)
    output = log.read_text()
    assert code == 130, output
    assert "Traceback" not in output
    stored = load_quietly(out)
    assert 2 <= len(stored) < total, "the signals came too late to interrupt anything"
    closing = re.search(r"^(\d+) ok, 0 failed, 0 diverged, (\d+) pending\.", output, flags=re.MULTILINE)
    assert closing, output
    assert (int(closing[1]), int(closing[2])) == (len(stored), total - len(stored))
    assert sorted(rs.read_csv(out / rs.PER_RUN_CSV)["run_id"]) == sorted(stored)
    assert "run the same command again to resume" in output


# ================================================================ a reader that goes away (| head)


@pytest.mark.parametrize("flag", ["--list", "--check", None])
def test_a_reader_of_the_output_that_goes_away_ends_nothing_in_a_traceback(flag, mnist_dir, tmp_path):
    """The dry run's list and the check end quietly; a campaign runs to its end, its lines in campaign.log."""
    out = tmp_path / "results"
    command = [sys.executable, "run_experiments.py", *tiny_argv(out, mnist_dir), *([flag] if flag else [])]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline()
    process.stdout.close()  # as `| head -1` does
    _, stderr = process.communicate(timeout=300)
    assert stderr == ""
    if flag:
        assert process.returncode == 1 and not out.exists()
    else:
        assert process.returncode == 0 and len(run_files(out)) == TINY_RUNS
        assert f"{TINY_RUNS} ok, 0 failed" in (out / "campaign.log").read_text()


def test_plots_ends_quietly_when_the_reader_of_its_list_of_files_has_gone(tmp_path):
    directory = campaign(tmp_path / "campaign", grid_records(("relu",), ("label_flip",)))
    process = subprocess.Popen([sys.executable, "plots.py", str(directory)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # gone before the list of files is printed
    _, stderr = process.communicate(timeout=300)
    assert (process.returncode, stderr) == (1, "")
    assert (directory / "figures" / plots.FIGURE_FILES["accuracy_vs_p"]).is_file()


# ================================================================ a write error names its file


def test_a_write_error_without_a_file_name_names_the_file_being_written(mnist, mnist_dir, tmp_path, monkeypatch,
                                                                        no_figures):
    """A full disk seen by fsync raises OSError(ENOSPC) that names no file: the message names the run record."""
    real_fsync = os.fsync

    def fsync_of_a_full_disk(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode) and "/runs/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(rs.os, "fsync", fsync_of_a_full_disk)
    out = tmp_path / "results"
    code, stdout, stderr = run_main(tiny_argv(out, mnist_dir, "--ps", "0"))
    assert code == 1 and "Traceback" not in stdout + stderr
    error = re.fullmatch(r"error: could not write (\S+): No space left on device\. (.*)", stderr.strip())
    assert error, stderr
    written = Path(error[1])
    assert written.parent == out / "runs" and written.suffix == ".json" and not written.exists()
    assert "run the same command again to resume" in error[2] and "Free some space" in error[2]
    assert not list(out.rglob("*.tmp"))


# ================================================================ a truncated CSV


@pytest.fixture
def truncated(finished_copy) -> Path:
    """The copy's per-run CSV cut in the middle of its last line."""
    path = finished_copy / rs.PER_RUN_CSV
    text = path.read_bytes()
    last_line_start = text.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(text[: (last_line_start + len(text)) // 2])
    return path


def test_a_truncated_csv_is_named_when_read(truncated):
    with pytest.warns(UserWarning, match=re.escape(f"{truncated} ends in the middle of a line: it is truncated")):
        rs.read_results(truncated.parent)


@pytest.mark.slow
def test_plots_py_prints_that_a_csv_is_truncated(truncated):
    done = subprocess.run([sys.executable, "plots.py", str(truncated.parent)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert f"{truncated} ends in the middle of a line: it is truncated" in done.stderr, done.stderr
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("name, content, problem", [
    (rs.SUMMARY_CSV, b'garbage,"unclosed\n1,2\n', "cannot be read (Error tokenizing data."),
    (rs.HISTORY_CSV, b"\xff\xfe\x00garbage\n", "cannot be read ('utf-8' codec can't decode byte 0xff"),
    (rs.RELIABILITY_CSV, b"", "cannot be read (No columns to parse from file)"),
    (rs.PER_RUN_CSV, b"a,b\n1,2\n", "lacks the columns run_id, status, dataset, model_type, activation:"),
])
def test_a_broken_csv_is_named_with_what_to_do(finished_copy, name, content, problem):
    path = finished_copy / name
    path.write_bytes(content)
    with pytest.raises(rs.BrokenCSVError) as info:
        rs.read_results(finished_copy)
    assert str(info.value).startswith(f"{path} {problem}") and str(info.value).endswith(rs.REWRITE)


def test_plots_py_names_a_broken_csv_and_the_campaign_command_rewrites_it(finished_copy, mnist_dir):
    path = finished_copy / rs.HISTORY_CSV
    path.write_bytes(b"\x00\x01\x02\n")
    done = subprocess.run([sys.executable, "plots.py", str(finished_copy)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"error: {path} lacks the columns run_id, epoch: {rs.REWRITE}\n"
    code, stdout, _ = run_main(tiny_argv(finished_copy, mnist_dir))
    assert code == 0 and "0 to run" in stdout
    assert len(rs.read_results(finished_copy).curves)


# ================================================================ figures and tables


def test_learning_curves_of_two_epochs_have_integer_epoch_ticks(tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, "EPOCHS", 2)
    results = rs.read_results(campaign(tmp_path, grid_records(("relu",), ("label_flip", "pixel_uniform"))))
    fig = plots.plot_learning_curves(results.curves)
    fig.canvas.draw()
    epoch_axes = [ax for ax in fig.axes if ax.get_xlabel() == "epoch"]
    assert len(epoch_axes) >= 2
    for ax in epoch_axes:
        labels = [label.get_text() for label in ax.xaxis.get_majorticklabels()]
        assert {"1", "2"} <= set(labels) and all(re.fullmatch(r"\d+", label) for label in labels), labels


def test_the_selected_epoch_has_integer_ticks_when_every_run_picks_the_same(tmp_path):
    records = grid_records(("relu",), ("label_flip",), validation_fraction=0.1)
    for record in records:
        record["selected_epoch"] = 1
    fig = plots.plot_early_stopping(rs.read_results(campaign(tmp_path, records)).summary)
    fig.canvas.draw()
    selected = [ax for ax in fig.axes if ax.get_ylabel() == plots.LABELS["selected_epoch"]]
    assert len(selected) == 1
    low, high = selected[0].get_ylim()
    assert [tick for tick in selected[0].get_yticks() if low <= tick <= high] == [1]


def test_the_remedy_and_transition_tables_of_runs_with_only_ce_say_so(tmp_path):
    runs = rs.read_results(campaign(tmp_path, grid_records(("relu",), ("label_flip",)))).runs
    assert set(runs["loss"]) == {"ce"}
    assert "no remedy with its plain twin" in plots.remedy_table(runs).to_string()
    assert "no forward_estimated run at p > 0" in plots.transition_error_table(runs).to_string()


# ================================================================ campaign.lock


def test_campaign_lock_stays_free_after_a_campaign_and_the_next_one_runs(finished, finished_copy, mnist_dir,
                                                                          no_figures):
    lock = finished / "campaign.lock"
    assert lock.read_text().startswith(f"PID {os.getpid()} on ")  # run_main ran it in this process
    with open(lock) as handle:  # not held: nothing is stale
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    code, stdout, stderr = run_main(tiny_argv(finished_copy, mnist_dir, "--repeats", "3"))
    assert code == 0, stdout + stderr
    assert f"{TINY_RUNS * 3 // 2} runs in the grid, {TINY_RUNS} already done, {TINY_RUNS // 2} to run" in stdout
    assert len(load_quietly(finished_copy)) == TINY_RUNS * 3 // 2
    assert (finished_copy / "campaign.lock").is_file()


def test_outputs_doc_lists_campaign_lock_and_every_status():
    doc = (ROOT / "docs" / "outputs.md").read_text()
    assert "`campaign.lock`" in doc
    assert rs.STATUSES == ("ok", "failed", "diverged", "not_identifiable")
    assert all(f"`{status}`" in doc for status in rs.STATUSES)
