"""registry.py: a noise type and a metric registered there reach validation, training, the records, the CSVs and
the summaries; the tables and figures load without torch; the closed-form theory of the label noise types."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import metrics
import nnet_models as nm
import registry
import results_store as rs
import run_experiments as rx
from losses import LOSSES
from conftest import run_main, tiny_argv

ROOT = Path(__file__).resolve().parents[1]
K = registry.NUM_CLASSES
TOY_NOISE, TOY_METRIC = "label_to_zero", "test_top2_accuracy"


def to_class_zero(k: int) -> np.ndarray:
    """M of the toy noise: every class is relabelled as class 0."""
    relabel = np.zeros((k, k))
    relabel[:, 0] = 1.0
    return relabel


def top2_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """The share of examples whose label is among the two most probable classes."""
    return float((np.argsort(-probs, axis=1)[:, :2] == labels[:, None]).any(axis=1).mean())


@pytest.fixture
def toys(monkeypatch):
    """The toy noise type and the toy metric, registered for this test (and the workers it forks)."""
    monkeypatch.setitem(registry.NOISE_TYPES, TOY_NOISE,
                        registry.NoiseType("a share p of labels relabelled as class 0", "tab:cyan", "label",
                                           relabel=to_class_zero))
    monkeypatch.setitem(registry.METRICS, TOY_METRIC,
                        registry.Metric("top-2 accuracy", per_epoch=True, compute=top2_accuracy))


# ================================================================ the toy entries, piece by piece


def test_the_toy_noise_type_passes_validation(toys, mnist_dir):
    config = rx.config_from_args(["--smoke", "--noise_types", f"label_flip,{TOY_NOISE}",
                                  "--data_dir", str(mnist_dir)])[0]
    assert rx.config_errors(config) == []
    specs = rx.build_grid(config)
    assert {s.config.noise_type for s in specs} == {registry.CLEAN, "label_flip", TOY_NOISE}
    # a label noise type: it gets the extra label noise levels too
    assert rx.noise_ps(TOY_NOISE, {"ps": [0.0, 0.5], "extra_label_ps": [0.9]}) == [0.0, 0.5, 0.9]


def test_help_lists_every_noise_type_and_loss_with_its_description(toys, capsys):
    with pytest.raises(SystemExit):
        rx.main(["--help"])
    shown = capsys.readouterr().out
    assert re.search(rf"^  {TOY_NOISE} +a share p of labels relabelled as class 0$", shown, flags=re.MULTILINE)
    for name in registry.noisy_types():
        description = registry.NOISE_TYPES[name].description
        assert re.search(rf"^  {name} +{re.escape(description)}$", shown, flags=re.MULTILINE)
    for name, loss in LOSSES.items():
        assert re.search(rf"^  {name} +{re.escape(loss.description)}", shown, flags=re.MULTILINE)
    assert "(Zhang & Sabuncu 2018) [q = 0.7]\n" in shown and "(Wang et al. 2019) [alpha = 0.01, beta = 1, A = -4]\n" in shown


def test_the_toy_noise_redraws_exactly_round_pN_labels_from_its_matrix(toys, mnist):
    labels = mnist.train_labels[:1001]
    relabel = registry.relabel_matrix(TOY_NOISE)
    np.testing.assert_array_equal(relabel, to_class_zero(K))
    noisy, mask = nm.corrupt_labels(labels, 0.4, torch.from_numpy(relabel), nm.make_generator(0, "label_noise"))
    assert int(mask.sum()) == round(0.4 * 1001)
    assert (noisy[mask] == 0).all() and torch.equal(noisy[~mask], labels[~mask])
    # a run draws them from its label_noise stream
    cfg = registry.TrainConfig(noise_type=TOY_NOISE, p=0.4, max_train_samples=1001)
    run = nm.prepare_run(cfg, mnist, torch.device("cpu"))
    assert torch.equal(run.labels, noisy) and torch.equal(run.clean_labels, labels)
    np.testing.assert_allclose(nm.transition_matrix(cfg).numpy(), 0.6 * np.eye(K) + 0.4 * to_class_zero(K),
                               atol=1e-7)


def test_the_toy_metric_is_computed_with_the_classification_metrics(toys):
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [2.0, 3.0, 1.0], [1.0, 3.0, 2.0]])
    labels = torch.tensor([1, 0, 2, 2])  # second, last, last, second most probable
    values = metrics.classification_metrics(logits, labels)
    assert values[TOY_METRIC] == 0.5 and values["test_accuracy"] == 0.0
    assert isinstance(values[TOY_METRIC], float)


def test_the_registry_theory_of_the_toy_noise(toys):
    # class 0 keeps its label whatever p; every other class is outvoted by class 0 once p > 1 - p
    assert registry.information_limit(TOY_NOISE) == 0.5
    p = np.array([0.0, 0.2, 0.45])
    np.testing.assert_allclose(registry.posterior_model_loss(TOY_NOISE, p), (K - 1) / K * -np.log(1 - p))


# ================================================================ a real campaign with both


@pytest.fixture
def toy_campaign(toys, mnist, mnist_dir, tmp_path, no_figures):
    out = tmp_path / "out"
    argv = tiny_argv(out, mnist_dir, "--noise_types", f"label_flip,{TOY_NOISE}", "--max_workers", "1",
                     "--epochs", "2")
    code, stdout, stderr = run_main(argv)
    assert code == 0, stdout + stderr
    return out


def test_a_campaign_stores_the_toy_noise_and_the_toy_metric(toy_campaign, mnist):
    records = rs.RunStore(toy_campaign).load().values()
    assert sorted(r["noise_type"] for r in records) == sorted([registry.CLEAN, "label_flip", TOY_NOISE] * 2)
    for record in records:
        assert record["status"] == "ok"
        assert record["test_accuracy"] <= record[TOY_METRIC] <= 1  # the true class among the two most probable
        assert len(record[f"history_{TOY_METRIC}"]) == 2 and record[f"history_{TOY_METRIC}"][-1] == record[TOY_METRIC]
    toy = [r for r in records if r["noise_type"] == TOY_NOISE]
    # trained on labels half of which say 0: the model is pulled towards class 0 (its corrupted examples
    # are of every class, and it predicts their noisy label, 0, for many of them)
    assert all(r["memorised_fraction"] > 0.3 for r in toy)


def test_the_csvs_and_summaries_carry_the_toy_metric(toy_campaign):
    per_run = rs.read_csv(toy_campaign / rs.PER_RUN_CSV)
    assert TOY_METRIC in per_run.columns and per_run[TOY_METRIC].between(0, 1).all()
    history = rs.read_csv(toy_campaign / rs.HISTORY_CSV)
    assert TOY_METRIC in history.columns and history[TOY_METRIC].notna().all()
    summary = rs.read_csv(toy_campaign / rs.SUMMARY_CSV).set_index(["noise_type", "p"])
    toy = per_run[per_run["noise_type"] == TOY_NOISE][TOY_METRIC]
    row = summary.loc[(TOY_NOISE, 0.5)]
    assert row["n"] == 2
    assert row[f"{TOY_METRIC}_mean"] == pytest.approx(toy.mean())
    assert row[f"{TOY_METRIC}_std"] == pytest.approx(toy.std(ddof=1))
    assert 0 <= row[f"{TOY_METRIC}_ci95_low"] <= row[f"{TOY_METRIC}_mean"] <= row[f"{TOY_METRIC}_ci95_high"] <= 1
    # the clean runs are the toy noise's p = 0 point too
    clean = per_run[per_run["noise_type"] == registry.CLEAN][TOY_METRIC]
    assert summary.loc[(TOY_NOISE, 0.0), f"{TOY_METRIC}_mean"] == pytest.approx(clean.mean())


# ================================================================ no torch for tables and figures


def test_tables_and_figures_load_without_torch():
    done = subprocess.run([sys.executable, "-c", "import plots, results_store, sys; assert 'torch' not in sys.modules"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_no_torch_check_can_fail():
    done = subprocess.run([sys.executable, "-c", "import metrics, sys; assert 'torch' not in sys.modules"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "AssertionError" in done.stderr


# ================================================================ closed forms of the label noise types


@pytest.mark.parametrize("noise_type, limit", [("label_uniform", 1.0), ("label_flip", (K - 1) / K),
                                               ("label_pairflip", 0.5)])
def test_information_limits(noise_type, limit):
    assert registry.information_limit(noise_type) == pytest.approx(limit, rel=1e-12)
    # below the limit the true class is the most likely noisy label of every class, at it no longer
    below = registry.transition_matrix(noise_type, limit - 1e-6)
    assert (below.argmax(1) == np.arange(K)).all()
    at = registry.transition_matrix(noise_type, min(limit + 1e-6, 1.0))
    assert not all(at[i, i] > np.delete(at[i], i).max() for i in range(K))


def test_information_limit_of_a_matrix_and_of_the_other_kinds():
    next_class = np.roll(np.eye(K), 1, axis=1)
    assert registry.information_limit("label_matrix", next_class) == 0.5  # the pair flip as a matrix
    half_next = 0.5 * (np.eye(K) + next_class)  # half stays: the true class never loses
    assert registry.information_limit("label_matrix", half_next) == 1.0
    for noise_type in (*registry.of_kind("pixel"), registry.CLEAN):
        assert registry.information_limit(noise_type) is None


def test_posterior_model_loss_closed_forms():
    p = np.linspace(0, 0.85, 18)
    np.testing.assert_allclose(registry.posterior_model_loss("label_uniform", p), -np.log(1 - p * (K - 1) / K),
                               rtol=1e-12)
    for noise_type in ("label_flip", "label_pairflip"):
        np.testing.assert_allclose(registry.posterior_model_loss(noise_type, p), -np.log(1 - p), rtol=1e-12)
    assert registry.posterior_model_loss("label_flip", 0.5) == pytest.approx(np.log(2))
    assert np.shape(registry.posterior_model_loss("label_uniform", 0.3)) == ()  # a number in, a number out
