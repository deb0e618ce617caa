"""analysis.ipynb: committed executed on the reference results, and parameterised; executed headless (nbclient) against a
small synthetic campaign, it draws its figures into that campaign's figures/ folder.

The kernel is the "python3" kernelspec, which jupyter_client starts with the interpreter that
runs pytest: run pytest with the virtualenv's python.
"""
import base64
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import plots
import registry
from conftest import campaign, grid_records

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "analysis.ipynb"


def test_committed_notebook_is_executed_on_the_reference_results_and_parameterised():
    """It shows the reference campaign's figures on any notebook viewer, without running it."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1))
    assert not [output for cell in code_cells for output in cell.outputs if output.output_type == "error"]
    images = [base64.b64decode(output["data"]["image/png"]) for cell in code_cells for output in cell.outputs
              if "image/png" in output.get("data", {})]
    committed = {path.read_bytes() for path in (ROOT / "results" / "reference").glob("**/figures/*.png")}
    assert images and all(image in committed for image in images)  # executed on the committed results
    first = notebook.cells[0]
    assert first.cell_type == "code" and first.metadata.get("tags") == ["parameters"]
    assert 'os.environ.get("ANALYSIS_RESULTS_DIR", "results/reference")' in first.source


@pytest.mark.slow
def test_notebook_draws_every_figure_with_data_into_the_campaign(tmp_path, monkeypatch):
    records = grid_records(("relu", "tanh"), ("label_flip", "pixel_uniform"), seeds=(11, 22))
    records += grid_records(("relu",), ("label_flip",), seeds=(11, 22), loss="forward")
    results_dir = campaign(tmp_path / "campaign", records)
    longer = campaign(results_dir / "memorisation", grid_records(("relu",), ("label_uniform",), seeds=(11, 22)))
    monkeypatch.setenv("ANALYSIS_RESULTS_DIR", str(results_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    # the memorisation curve comes from the longer-training campaign beside it, and is saved there
    assert [path.name for path in (longer / "figures").glob("*.png")] == [plots.FIGURE_FILES["memorisation"]]
    written = {path.name for path in (results_dir / "figures").glob("*.png")}
    assert written == set(plots.FIGURE_FILES.values()) - {plots.FIGURE_FILES[name] for name in (
        "early_stopping", "memorisation", "models")}  # no validation split; memorisation: above; one model
    written |= {plots.FIGURE_FILES["memorisation"]}
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert sum("image/png" in output.get("data", {}) for output in outputs) == len(written)
    skipped = [output["text"] for output in outputs if output.get("name") == "stdout" and "skipped" in output["text"]]
    assert skipped == [f"{plots.FIGURE_FILES[name]}: no data for it in {results_dir}; skipped\n"
                       for name in ("early_stopping", "models")]  # no validation split, one model type
    tables = [output for output in outputs if "text/html" in output.get("data", {})]
    assert len(tables) == 19  # the runs not ok, the campaign overview and the seventeen tables


@pytest.mark.slow
def test_notebook_pointed_at_a_smoke_campaign_draws_that_campaigns_figures(mnist_dir, tmp_path, monkeypatch):
    from conftest import run_main

    out = tmp_path / "smoke"
    code, stdout, stderr = run_main(["--smoke", "--data_dir", str(mnist_dir), "--output_dir", str(out)])
    assert code == 0, stdout + stderr
    for png in (out / "figures").glob("*.png"):
        png.unlink()  # drawn again by the notebook below
    monkeypatch.setenv("ANALYSIS_RESULTS_DIR", str(out))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    written = sorted(path.name for path in (out / "figures").glob("*.png"))
    assert plots.FIGURE_FILES["accuracy_vs_p"] in written and len(written) >= 8
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if "image/png" in output.get("data", {})]
    assert len(images) == len(written)


@pytest.mark.slow
def test_the_report_shows_strings_of_the_results_files_as_text_and_counts_each_run_once(tmp_path, monkeypatch):
    """A results file is data, not markup: a dataset name with HTML in it is shown as text. A run reported after two
    lengths is one run, though it has a row per length."""
    name = "<b>mnist</b>"
    records = grid_records(("relu",), ("label_flip",), seeds=(11, 22), dataset=name)
    for r in records:
        r["reported"] = {"1": {**{m: r[m] for m in registry.METRICS}, "reliability": r["reliability"]}}
    results_dir = campaign(tmp_path / "campaign", records)
    monkeypatch.setenv("ANALYSIS_RESULTS_DIR", str(results_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    shown = [output["data"]["text/html"] for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.outputs if "text/html" in output.get("data", {})]
    assert shown and any("&lt;b&gt;mnist&lt;/b&gt;" in html for html in shown)
    assert not any(name in html for html in shown)
    markdown = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
                if "text/markdown" in output.get("data", {})]
    assert markdown == []  # no Markdown is built from the results
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.outputs)
    assert f"{results_dir}: {len(records)} ok runs; " in printed
