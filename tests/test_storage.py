"""Real storage faults: a full disk and a read-only file system, on a small tmpfs (needs root)."""
import subprocess
from pathlib import Path

import pytest

import results_store as rs
from conftest import TINY_RUNS, run_main, tiny_argv


@pytest.fixture
def small_disk(tmp_path):
    """A 40 KiB tmpfs mounted at tmp_path/disk; skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def remount(disk: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True)


def test_a_full_disk_stops_the_campaign_keeping_every_stored_run(mnist, mnist_dir, small_disk, no_figures):
    out = small_disk / "results"
    argv = tiny_argv(out, mnist_dir)
    code, stdout, stderr = run_main(argv)
    assert code == 1 and "Traceback" not in stderr
    error = next(line for line in stderr.splitlines() if line.startswith("error: could not write "))
    assert "No space left on device" in error and "run the same command again to resume" in error
    assert error.startswith(f"error: could not write {out}/")  # names the file it could not write
    stored = rs.RunStore(out).load()
    assert 1 <= len(stored) < TINY_RUNS and all(record["status"] == "ok" for record in stored.values())
    assert not list(out.rglob("*.tmp"))  # no half-written files left behind
    remount(small_disk, "size=16m")
    code, stdout, _ = run_main(argv)
    assert code == 0 and (f"{TINY_RUNS} runs in the grid, {len(stored)} already done, {TINY_RUNS - len(stored)} to run"
                          in stdout)
    assert len(rs.RunStore(out).load()) == TINY_RUNS


def test_a_read_only_output_dir_is_refused_before_anything_runs(mnist, mnist_dir, small_disk, no_figures):
    out = small_disk / "results"
    remount(small_disk, "size=16m")
    code, _, _ = run_main(tiny_argv(out, mnist_dir, "--ps", "0"))
    assert code == 0
    before = sorted(p.name for p in (out / "runs").iterdir())
    remount(small_disk, "ro")
    code, stdout, stderr = run_main(tiny_argv(out, mnist_dir))
    assert code == 2 and stdout == ""
    assert stderr.strip() == f"error: output_dir: {str(out)!r} is not writable (no write permission on {out})"
    assert sorted(p.name for p in (out / "runs").iterdir()) == before


def test_a_log_that_cannot_be_written_stops_the_log_not_the_campaign(mnist, mnist_dir, tmp_path, monkeypatch,
                                                                     no_figures):
    """campaign.log on a full disk (/dev/full: every write fails with ENOSPC): one warning, then the campaign goes
    on, and its runs and closing lines are all there; were the disk full for the records too, storing the next one
    would stop the campaign with the storage error."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    import run_experiments as rx

    opened = rx.Campaign.__init__

    def log_on_a_full_disk(self, *args):
        opened(self, *args)
        self.log_file.close()
        self.log_file = open("/dev/full", "a", buffering=1)

    monkeypatch.setattr(rx.Campaign, "__init__", log_on_a_full_disk)
    out = tmp_path / "results"
    code, stdout, stderr = run_main(tiny_argv(out, mnist_dir))
    assert code == 0, stderr
    assert stderr.splitlines() == ["warning: could not write /dev/full: No space left on device; the log stops here"]
    assert f"{TINY_RUNS} ok, 0 failed, 0 diverged, 0 pending." in stdout
    assert len(rs.RunStore(out).load()) == TINY_RUNS
