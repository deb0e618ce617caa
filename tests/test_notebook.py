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
from test_plots import write_synthetic_results

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "analysis.ipynb"
ALL_FIGURES = set(plots.FIGURE_FILES.values())


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


def test_notebook_on_synthetic_results(tmp_path, monkeypatch):
    results_dir = tmp_path / "results"
    runs = write_synthetic_results(results_dir)
    notebook = execute_notebook(results_dir, monkeypatch)
    assert figures_written(results_dir) == ALL_FIGURES

    report = report_markdown(notebook)
    clean_accuracy = plots.ok_runs(runs).query("p == 0")["test_accuracy"].mean()
    assert f"test accuracy is {100 * clean_accuracy:.1f}%" in report  # numbers come from the CSVs
    assert "`label_flip` accuracy is 10.0%, essentially chance" in report  # synthetic flip collapses at 0.9
    assert "No noisy configuration beats the clean baseline" in report


def test_notebook_with_only_the_per_run_csv(tmp_path, monkeypatch):
    write_synthetic_results(tmp_path, with_summary=False, with_history=False)
    notebook = execute_notebook(tmp_path, monkeypatch)
    assert figures_written(tmp_path) == ALL_FIGURES - {plots.FIGURE_FILES["learning_curves"]}
    assert report_markdown(notebook)


@pytest.mark.slow
def test_notebook_on_smoke_campaign(tmp_path, monkeypatch, mnist_dir):
    results_dir = tmp_path / "smoke"
    campaign = subprocess.run(
        [sys.executable, "run_experiments.py", "--smoke", "--output_dir", str(results_dir),
         "--data_dir", str(mnist_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert campaign.returncode == 0, campaign.stdout[-3000:] + campaign.stderr[-3000:]
    for name in (plots.RUNS_CSV, plots.SUMMARY_CSV, plots.HISTORY_CSV):
        assert (results_dir / name).is_file()
    # the runner draws the headline figures itself; remove them so the notebook must redraw them
    assert {plots.FIGURE_FILES[n] for n in plots.HEADLINE_FIGURES} <= figures_written(results_dir)
    shutil.rmtree(results_dir / "figures")

    notebook = execute_notebook(results_dir, monkeypatch)
    assert figures_written(results_dir) == ALL_FIGURES
    assert "successful runs" in report_markdown(notebook)
