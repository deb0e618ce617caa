"""Execute analysis.ipynb headless (nbclient) against campaign results.

The kernel is the "python3" kernelspec; jupyter_client starts it with the interpreter that
runs pytest, so run pytest with the virtualenv's python.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import plots
from test_plots import NEW_FORMAT, OLD_FIGURES, write_synthetic_results

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "analysis.ipynb"
ALL_FIGURES = set(plots.FIGURE_FILES.values())
OLD_CAMPAIGN_FIGURES = {plots.FIGURE_FILES[name] for name in OLD_FIGURES}


def execute_notebook(results_dir: Path, monkeypatch) -> nbformat.NotebookNode:
    """Run every cell with RESULTS_DIR = results_dir; raises CellExecutionError on any error."""
    monkeypatch.setenv("ANALYSIS_RESULTS_DIR", str(results_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    return notebook


def figures_written(results_dir: Path) -> set[str]:
    return {p.name for p in (results_dir / "figures").glob("*.png") if p.stat().st_size > 0}


def report_markdown(notebook) -> str:
    """The text of every Markdown object the notebook displayed (the computed report)."""
    return "\n".join(output["data"]["text/markdown"] for cell in notebook.cells if cell.cell_type == "code"
                     for output in cell.outputs if "text/markdown" in output.get("data", {}))


def test_committed_notebook_is_clean_and_parameterised():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code_cells)
    first = notebook.cells[0]
    assert first.cell_type == "code" and "RESULTS_DIR" in first.source and '"results"' in first.source


def test_notebook_on_synthetic_results_of_an_older_campaign(tmp_path, monkeypatch):
    results_dir = tmp_path / "results"
    runs = write_synthetic_results(results_dir)
    notebook = execute_notebook(results_dir, monkeypatch)
    assert figures_written(results_dir) == OLD_CAMPAIGN_FIGURES

    report = report_markdown(notebook)
    clean_accuracy = plots.ok_runs(runs).query("p == 0")["test_accuracy"].mean()
    assert f"test accuracy is {100 * clean_accuracy:.1f}%" in report  # numbers come from the CSVs
    assert "`label_flip` accuracy is 10.0%, essentially chance" in report  # synthetic flip collapses at 0.9
    assert "No noisy configuration beats the clean baseline" in report
    assert "These results have none of the newer measurements." in report


def test_notebook_on_synthetic_results_of_a_current_campaign(tmp_path, monkeypatch):
    results_dir = tmp_path / "results"
    runs = plots.ok_runs(write_synthetic_results(results_dir, **NEW_FORMAT))
    notebook = execute_notebook(results_dir, monkeypatch)
    assert figures_written(results_dir) == ALL_FIGURES

    report = report_markdown(notebook)
    uncorrected = runs[runs["loss_correction"] == "none"]
    at = lambda frame, noise_type, p: frame[(frame["noise_type"] == noise_type) & (frame["p"] == p)]  # noqa: E731
    # the older sentences see the uncorrected runs only
    assert f"test accuracy is {100 * uncorrected.query('p == 0')['test_accuracy'].mean():.1f}%" in report
    assert "`label_flip` accuracy is 10.0%, essentially chance" in report
    assert "beyond the pair-flip limit 0.5, `label_pairflip` accuracy is 5.0%, below chance" in report
    # the new ones, numbers from the CSVs (equal repeats per activation: plain means agree with the pooling)
    assert f"Without noise the test ECE is {uncorrected.query('p == 0')['test_ece'].mean():.3f}" in report
    none, forward = (at(runs[runs["loss_correction"] == c], "label_flip", 0.9) for c in ("none", "forward"))
    gain = 100 * (forward["test_accuracy"].mean() - none["test_accuracy"].mean())
    assert (f"`label_flip` at p = 0.9: accuracy {100 * none['test_accuracy'].mean():.1f}% → "
            f"{100 * forward['test_accuracy'].mean():.1f}% ({gain:+.1f} points)") in report
    assert "it helps every label-noise type there" in report
    assert (f"After the last epoch (3), on the corrupted training examples, the networks predict the noisy label "
            f"for {100 * at(uncorrected, 'label_uniform', 1.0)['memorised_fraction'].mean():.1f}% under "
            "`label_uniform` at p = 1") in report
    selected = 100 * (none["selected_test_accuracy"] - none["test_accuracy"]).mean()
    assert f"{selected:+.1f} points for `label_flip` at p = 0.9 (epoch 2.0 on average)" in report
    pixel = at(uncorrected, "pixel_uniform", 0.9)
    assert (f"`pixel_uniform` at p = 0.9 scores {100 * pixel['noisy_test_accuracy'].mean():.1f}% "
            f"(clean test images: {100 * pixel['test_accuracy'].mean():.1f}%)") in report


def test_notebook_with_only_the_per_run_csv(tmp_path, monkeypatch):
    write_synthetic_results(tmp_path, with_summary=False, with_history=False)
    notebook = execute_notebook(tmp_path, monkeypatch)
    assert figures_written(tmp_path) == OLD_CAMPAIGN_FIGURES - {plots.FIGURE_FILES["learning_curves"]}
    assert report_markdown(notebook)


def run_smoke_campaign(results_dir: Path, mnist_dir: Path, *options: str) -> None:
    """run_experiments.py --smoke with `options`; checks its CSVs and headline figures, then
    removes the figures so that the notebook must redraw them."""
    campaign = subprocess.run(
        [sys.executable, "run_experiments.py", "--smoke", "--output_dir", str(results_dir),
         "--data_dir", str(mnist_dir), *options],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert campaign.returncode == 0, campaign.stdout[-3000:] + campaign.stderr[-3000:]
    for name in (plots.RUNS_CSV, plots.SUMMARY_CSV, plots.HISTORY_CSV, plots.RELIABILITY_CSV):
        assert (results_dir / name).is_file()
    assert {plots.FIGURE_FILES[n] for n in plots.HEADLINE_FIGURES} <= figures_written(results_dir)
    shutil.rmtree(results_dir / "figures")


@pytest.mark.slow
def test_notebook_on_smoke_campaign(tmp_path, monkeypatch, mnist_dir):
    results_dir = tmp_path / "smoke"
    run_smoke_campaign(results_dir, mnist_dir)
    notebook = execute_notebook(results_dir, monkeypatch)
    # no forward-corrected runs and no validation split in the plain smoke grid
    assert figures_written(results_dir) == ALL_FIGURES - {plots.FIGURE_FILES["loss_correction"],
                                                          plots.FIGURE_FILES["early_stopping"]}
    report = report_markdown(notebook)
    assert "successful runs" in report and "Without noise the test ECE is" in report


@pytest.mark.slow
def test_notebook_on_smoke_campaign_with_the_new_options(tmp_path, monkeypatch, mnist_dir):
    results_dir = tmp_path / "smoke_new"
    run_smoke_campaign(results_dir, mnist_dir, "--noise_types", "label_flip,label_pairflip,pixel_uniform",
                       "--loss_corrections", "none,forward", "--validation_fraction", "0.1", "--activations", "relu")
    notebook = execute_notebook(results_dir, monkeypatch)
    assert figures_written(results_dir) == ALL_FIGURES
    report = report_markdown(notebook)
    for sentence_start in ("Without noise the test ECE is", "Forward loss correction at the largest label-noise level",
                           "After the last epoch (1), on the corrupted training examples",
                           "Choosing the epoch by the loss on the noisy validation split",
                           "Tested on images with the same noise, `pixel_uniform` at p = 0.5"):
        assert sentence_start in report
