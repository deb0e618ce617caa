"""The researcher's path after a campaign: the report, and a checkout that stays clean."""
import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import results_store as rs
from conftest import TINY_RUNS, campaign, grid_records, tiny_argv

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_report_renders_while_the_campaign_runs(mnist, mnist_dir, tmp_path):
    """`plots.py DIR --report` works mid-sweep, from the CSVs written so far, and the sweep goes on."""
    out = tmp_path / "out"
    argv = tiny_argv(out, mnist_dir, "--max_train_samples", "None", "--epochs", "3", "--max_workers", "1")
    with open(tmp_path / "campaign.out", "w") as log:
        campaign = subprocess.Popen([sys.executable, "run_experiments.py", *argv], cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / rs.PER_RUN_CSV).is_file():
            assert campaign.poll() is None and time.monotonic() < deadline, (tmp_path / "campaign.out").read_text()
            time.sleep(0.1)
        assert campaign.poll() is None  # the report starts while the campaign runs
        report = subprocess.run([sys.executable, "plots.py", str(out), "--report"], cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        assert report.returncode == 0, report.stderr
        assert str(out / "report.html") in report.stdout.splitlines()
        html = (out / "report.html").read_text()
        assert "Test accuracy and cross-entropy against the noise level" in html and "data:image/png;base64" in html
        assert campaign.wait(timeout=300) == 0
        assert len(rs.read_csv(out / rs.PER_RUN_CSV)) == TINY_RUNS
    finally:
        if campaign.poll() is None:
            campaign.kill()


@pytest.mark.slow
def test_readme_smoke_command_leaves_a_clean_checkout_clean(mnist_dir, tmp_path):
    """In a fresh clone, the README's smoke campaign writes only ignored files."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    run = subprocess.run([sys.executable, "run_experiments.py", "--smoke", "--data_dir", str(mnist_dir)], cwd=clone,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (clone / "results" / "smoke" / rs.SUMMARY_CSV).is_file()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                            capture_output=True, text=True, check=True)
    assert status.stdout == ""


def wait_until(condition, process: subprocess.Popen, seconds: float = 180):
    """Poll `condition()` until it returns something true, and return that, while `process` runs."""
    deadline = time.monotonic() + seconds
    while not (result := condition()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return result


@contextlib.contextmanager
def report_and_its_kernel(directory: Path):
    """`plots.py DIR --report` running, and its notebook kernel process once it has started; killed if left."""
    report = subprocess.Popen([sys.executable, "plots.py", str(directory), "--report"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield report, wait_until(lambda: [p for p in psutil.Process(report.pid).children(recursive=True)
                                          if "ipykernel_launcher" in " ".join(p.cmdline())], report)[0]
    finally:
        if report.poll() is None:
            report.kill()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_report_quietly_and_its_kernel_too(tmp_path, signum):
    """Ctrl-C or SIGTERM while the notebook runs: exit code 130, no traceback, no kernel left,
    and no report.html, whole or partial."""
    directory = campaign(tmp_path / "campaign", grid_records(("relu",), ("label_uniform",)))
    with report_and_its_kernel(directory) as (report, kernel):
        report.send_signal(signum)
        stdout, stderr = report.communicate(timeout=120)
    assert report.returncode == 130 and stderr == "", stderr
    assert not (directory / "report.html").exists() and not list(directory.rglob(".*.tmp"))
    assert not kernel.is_running() or kernel.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("when", ["starting", "running"])
def test_a_killed_kernel_ends_the_report_in_one_line(tmp_path, when):
    """The notebook's kernel killed (as the OOM killer would) as it starts, or once it runs cells (it has redrawn
    the first figure): exit code 1, one line that says what to do, no report.html."""
    directory = campaign(tmp_path / "campaign", grid_records(("relu",), ("label_uniform", "pixel_uniform")))
    first_figure = directory / "figures" / "fig3_label_vs_pixel.png"
    with report_and_its_kernel(directory) as (report, kernel):
        drawn_by_plots = first_figure.stat().st_ino
        if when == "running":  # the notebook replaces the figure
            wait_until(lambda: first_figure.stat().st_ino != drawn_by_plots, report)
        kernel.kill()
        _, stderr = report.communicate(timeout=120)
    assert report.returncode == 1
    assert re.fullmatch(f"error: analysis.ipynb stopped on {re.escape(str(directory))}: its kernel stopped "
                        r"\(Kernel died[^\n]*; killed, or out of memory\?\); the figures are drawn and report.html is "
                        "unchanged: run the same command again\n", stderr), stderr
    assert not (directory / "report.html").exists()


def test_a_cell_past_the_timeout_ends_the_report_in_one_line(tmp_path, monkeypatch):
    import nbformat

    import plots

    directory = campaign(tmp_path / "campaign", grid_records(("relu",), ("label_uniform",)))
    slow = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import time\ntime.sleep(60)")])
    nbformat.write(slow, tmp_path / "slow.ipynb")
    monkeypatch.setattr(plots, "NOTEBOOK", tmp_path / "slow.ipynb")
    monkeypatch.setattr(plots, "CELL_TIMEOUT", 1)
    monkeypatch.setenv("ANALYSIS_RESULTS_DIR", str(directory))  # which write_report sets: restored after the test
    with pytest.raises(plots.ReportError) as info:
        plots.write_report(directory)
    assert str(info.value) == (f"analysis.ipynb stopped on {directory}: a cell ran for more than 1 s; report.html is "
                               "unchanged. For a grid this large, choose a slice (SLICE in the notebook's first cell) "
                               "or raise plots.CELL_TIMEOUT")
    assert not (directory / "report.html").exists()


@pytest.mark.slow
def test_the_report_of_another_campaign_carries_no_reference_prose(tmp_path):
    """Its figures and tables are that campaign's; one note says that the prose about the reference is left out."""
    import nbformat

    directory = campaign(tmp_path / "campaign", grid_records(("relu",), ("label_flip", "pixel_uniform")))
    report = subprocess.run([sys.executable, "plots.py", str(directory), "--report"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert report.returncode == 0, report.stderr
    html = (directory / "report.html").read_text()
    reference = [cell.source for cell in nbformat.read(ROOT / "analysis.ipynb", as_version=4).cells
                 if "reference" in cell.metadata.get("tags", [])]
    assert len(reference) >= 5
    for number in ("95.5%", "82.2%", "90.2%", "97.5", "0.803", "58.0–73.4%", "1.2–2.2%"):
        assert number in "".join(reference) and number not in html
    assert html.count("the prose about the reference campaign's results (results/reference/) is left out") == 1
    assert "Test accuracy and cross-entropy against the noise level" in html and "data:image/png;base64" in html


@pytest.mark.slow
def test_the_report_of_a_large_grid_draws_too_wide_figures_once_per_value(tmp_path, monkeypatch):
    """Four activations under five noise types, two losses: a figure of over MAX_PANELS panels is drawn once per
    activation in the report as by plots.py (test_plots), and the tables keep the activations apart."""
    import plots

    activations = ("relu", "tanh", "sigmoid", "gelu")
    noise_types = ("label_uniform", "label_flip", "label_pairflip", "pixel_uniform", "pixel_empirical")
    records = [r for loss in ("ce", "gce") for r in grid_records(activations, noise_types, (11, 22), loss=loss)]
    directory = campaign(tmp_path / "campaign", records)
    monkeypatch.setenv("ANALYSIS_RESULTS_DIR", "")  # which write_report sets: restored after the test
    html = plots.write_report(directory).read_text()  # the notebook alone, which saves the figures it shows
    for activation in activations:
        assert (directory / "figures" / f"fig10_losses__activation={activation}.png").is_file()
    assert "would have 60 panels" in html and "Traceback" not in html


@pytest.mark.slow
def test_the_report_of_a_slice_leaves_the_whole_grids_figures_as_they_are(tmp_path):
    """Two learning rates: plots.py draws both into figures/, a panel row each; the report shows the slice of the
    first and saves its figures in a folder of their own beside them."""
    from matplotlib.image import imread

    records = [r for rate in (0.001, 0.01) for r in grid_records(("relu",), ("label_flip",), learning_rate=rate)]
    directory = campaign(tmp_path / "campaign", records)
    report = subprocess.run([sys.executable, "plots.py", str(directory), "--report"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert report.returncode == 0, report.stderr
    sliced = directory / "figures" / "slice__learning_rate=0.001"
    assert f"their figures saved in {sliced}/" in (directory / "report.html").read_text()
    heights = [imread(folder / "fig1_accuracy_vs_p.png").shape[0] for folder in (directory / "figures", sliced)]
    assert heights[0] > 1.5 * heights[1]  # the whole grid's two rows of panels, the slice's one


def test_a_report_whose_notebook_fails_says_so_in_one_line(tmp_path, monkeypatch):
    """A broken campaign beside the one reported (a summary without its per-run CSV) fails a cell: one line naming
    the error, exit code 1, the previous report.html kept."""
    directory = campaign(tmp_path / "campaign", grid_records(("relu",), ("label_flip",)))
    broken = directory / "memorisation"
    broken.mkdir()
    (broken / rs.SUMMARY_CSV).write_text((directory / rs.SUMMARY_CSV).read_text())
    (directory / "report.html").write_text("<html>the previous report</html>")
    monkeypatch.setenv("ANALYSIS_MEMORISATION_DIR", str(broken))
    report = subprocess.run([sys.executable, "plots.py", str(directory), "--report"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert report.returncode == 1 and report.stdout == ""
    assert report.stderr == (f"error: analysis.ipynb failed on {directory}: FileNotFoundError: {broken / rs.PER_RUN_CSV} "
                             "not found: is this a campaign's output_dir, and has a run finished? (the figures are "
                             "drawn; report.html is unchanged)\n")
    assert (directory / "report.html").read_text() == "<html>the previous report</html>"
    assert (directory / "figures").is_dir()
