"""What a trained model is measured by (metrics.py): classification metrics and macro ROC-AUC,
calibration (ECE, reliability bins) and memorisation, checked by hand and against plain numpy."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from metrics import (ECE_BINS, calibration_bins, classification_metrics, expected_calibration_error, macro_roc_auc,
                     memorisation_metrics)

K = 10


def one_hot_logits(predictions, scale: float = 10.0) -> torch.Tensor:
    return nn.functional.one_hot(torch.as_tensor(predictions), K).float() * scale


# ================================================================ classification metrics


def reference_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Plain numpy: per-class precision/recall (0 when undefined), brute-force pairwise AUC."""
    probs = torch.softmax(logits.float(), 1).numpy().astype(np.float64)
    y = labels.numpy()
    pred = logits.argmax(1).numpy()
    precision, recall, aucs = [], [], []
    for k in range(K):
        tp = np.sum((pred == k) & (y == k))
        n_pred, n_true = np.sum(pred == k), np.sum(y == k)
        precision.append(tp / n_pred if n_pred else 0.0)
        recall.append(tp / n_true if n_true else 0.0)
        pos, neg = probs[y == k, k], probs[y != k, k]
        if len(pos) and len(neg):
            diff = pos[:, None] - neg[None, :]
            aucs.append(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg)))
    logp = logits.double().numpy() - np.log(np.exp(logits.double().numpy()).sum(1, keepdims=True))
    return {
        "test_loss": -logp[np.arange(len(y)), y].mean(),
        "test_accuracy": np.mean(pred == y),
        "test_macro_precision": np.mean(precision),
        "test_macro_recall": np.mean(recall),
        "test_macro_roc_auc": np.mean(aucs),
    }


def test_perfect_predictions():
    labels = torch.arange(K).repeat(3)
    m = classification_metrics(one_hot_logits(labels), labels)
    assert set(m) == {"test_loss", "test_accuracy", "test_macro_precision", "test_macro_recall",
                      "test_macro_roc_auc", "test_ece", "test_mean_confidence"}
    assert all(type(v) is float for v in m.values())
    assert m["test_accuracy"] == 1.0
    assert m["test_macro_precision"] == 1.0
    assert m["test_macro_recall"] == 1.0
    assert m["test_macro_roc_auc"] == 1.0
    # cross-entropy of a 10-vs-0 logit: log(1 + 9 e^-10)
    assert m["test_loss"] == pytest.approx(np.log1p(9 * np.exp(-10)), rel=1e-3)  # float32 loss
    # every prediction right with confidence 1 / (1 + 9 e^-10): the ECE is the gap to 1
    confidence = 1 / (1 + 9 * np.exp(-10))
    assert m["test_mean_confidence"] == pytest.approx(confidence, rel=1e-6)
    assert m["test_ece"] == pytest.approx(1 - confidence, rel=1e-2)


def test_never_predicted_class_counts_as_zero_precision():
    labels = torch.arange(K)              # one example of each class
    predictions = labels.clone()
    predictions[9] = 8                    # class 9 is never predicted
    m = classification_metrics(one_hot_logits(predictions), labels)
    assert m["test_accuracy"] == pytest.approx(0.9)
    # precision: classes 0..7 -> 1, class 8 -> 1/2, class 9 -> 0 (not NaN, not skipped)
    assert m["test_macro_precision"] == pytest.approx((8 + 0.5 + 0) / 10)
    assert m["test_macro_recall"] == pytest.approx(0.9)  # class 9 -> 0, the others 1
    assert np.isfinite(list(m.values())).all()


def test_hand_computed_precision_recall():
    # 20 examples, two of each class; the second copy of every class k is predicted as (k+1) % K
    labels = torch.arange(K).repeat(2)
    predictions = torch.cat([torch.arange(K), (torch.arange(K) + 1) % K])
    m = classification_metrics(one_hot_logits(predictions), labels)
    # every class predicted twice with one hit; every class has two examples with one hit
    assert m["test_accuracy"] == pytest.approx(0.5)
    assert m["test_macro_precision"] == pytest.approx(0.5)
    assert m["test_macro_recall"] == pytest.approx(0.5)


def test_precision_and_recall_differ_when_errors_are_one_sided():
    # every example of class 1 predicted as 0: precision of 0 is 1/2, recall of 1 is 0
    labels = torch.tensor([0, 0, 1, 1] + list(range(2, K)))
    predictions = torch.tensor([0, 0, 0, 0] + list(range(2, K)))
    m = classification_metrics(one_hot_logits(predictions), labels)
    assert m["test_macro_precision"] == pytest.approx((0.5 + 0 + 8) / K)
    assert m["test_macro_recall"] == pytest.approx((1 + 0 + 8) / K)


def test_constant_logits_give_auc_one_half():
    labels = torch.arange(K).repeat(4)
    m = classification_metrics(torch.zeros(len(labels), K), labels)
    assert m["test_macro_roc_auc"] == pytest.approx(0.5)
    assert m["test_loss"] == pytest.approx(np.log(K), rel=1e-6)
    # confidence 1/K everywhere; argmax of ties is class 0, right for 1 example in K
    assert m["test_mean_confidence"] == pytest.approx(1 / K, rel=1e-6)
    assert m["test_accuracy"] == pytest.approx(1 / K)
    assert m["test_ece"] == pytest.approx(0.0, abs=1e-6)


def test_reversed_ranking_gives_auc_zero():
    # the true class always gets the lowest score -> every one-vs-rest AUC is 0
    labels = torch.arange(K).repeat(3)
    assert classification_metrics(-one_hot_logits(labels), labels)["test_macro_roc_auc"] == pytest.approx(0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_numpy_reference(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (400,), generator=g)
    logits = torch.randn(400, K, generator=g)
    logits[torch.arange(400), labels] += 1.0                 # better than chance
    logits = torch.round(logits * 2) / 2                     # coarse values -> ties in the ranking
    got = classification_metrics(logits, labels)
    want = reference_metrics(logits, labels)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert 0.5 < got["test_macro_roc_auc"] < 1.0


def test_metrics_of_float64_and_bfloat16_logits_are_computed_in_float32():
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, K, (300,), generator=g)
    logits = torch.round(torch.randn(300, K, generator=g) * 4) / 4  # exact in bfloat16
    single = classification_metrics(logits, labels)
    for other in (logits.double(), logits.bfloat16()):
        assert classification_metrics(other, labels) == single


def test_metrics_of_another_number_of_classes():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    labels = torch.tensor([0, 1, 2, 2])
    m = classification_metrics(logits, labels)
    assert m["test_accuracy"] == 0.75
    assert m["test_macro_precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["test_macro_recall"] == pytest.approx((1 + 1 + 0.5) / 3)


# ================================================================ macro ROC-AUC


def test_macro_roc_auc_skips_classes_without_positives():
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.3, 0.7, 0.0], [0.4, 0.6, 0.0]])
    labels = np.array([0, 0, 1, 1])  # class 2 has no positives
    assert macro_roc_auc(probs, labels) == pytest.approx(1.0)
    labels = np.array([0, 1, 0, 1])
    # class 0: pos {0.9,0.3} vs neg {0.8,0.4}: pairs won 0.9>0.8,0.9>0.4,0.3<0.8,0.3<0.4 -> 2/4
    # class 1: pos {0.2,0.6} vs neg {0.1,0.7}: 0.2>0.1, 0.2<0.7, 0.6>0.1, 0.6<0.7 -> 2/4
    assert macro_roc_auc(probs, labels) == pytest.approx(0.5)


def test_macro_roc_auc_counts_ties_as_half():
    # class 0: positives {0.5, 0.9} vs negatives {0.5, 0.1}: 0.5=0.5 (1/2), 0.5>0.1, 0.9>0.5, 0.9>0.1 -> 3.5/4
    # class 1 (the complement 1 - p): 4 - 3.5 pairs won mirror-wise -> also 3.5/4
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.5, 0.5], [0.1, 0.9]])
    labels = np.array([0, 0, 1, 1])
    assert macro_roc_auc(probs, labels) == pytest.approx(3.5 / 4)
    # all tied: every pair is half a win
    assert macro_roc_auc(np.full((6, 3), 1 / 3), np.array([0, 1, 2, 0, 1, 2])) == pytest.approx(0.5)


# ================================================================ calibration


def logits_with_confidence(confidence: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax puts `confidence` on `predicted` and the rest evenly on the others."""
    n = len(confidence)
    rest = ((1 - confidence) / (K - 1)).clamp_min(1e-30)
    logits = rest.log().unsqueeze(1).repeat(1, K)
    logits[torch.arange(n), predicted] = confidence.log()
    return logits


def synthetic_predictor(n: int, seed: int, low: float, gap: float):
    """Confidences c ~ U[low, 1); the prediction is right with probability c - gap."""
    g = torch.Generator().manual_seed(seed)
    confidence = low + (1 - low) * torch.rand(n, generator=g, dtype=torch.float64)
    predicted = torch.randint(0, K, (n,), generator=g)
    right = torch.rand(n, generator=g, dtype=torch.float64) < confidence - gap
    wrong_label = (predicted + torch.randint(1, K, (n,), generator=g)) % K
    labels = torch.where(right, predicted, wrong_label)
    return logits_with_confidence(confidence, predicted).float(), labels, confidence


def test_perfectly_calibrated_predictor_has_ece_near_zero():
    logits, labels, confidence = synthetic_predictor(200_000, seed=0, low=0.15, gap=0.0)
    probs = torch.softmax(logits, 1)
    assert torch.allclose(probs.max(1).values.double(), confidence, atol=1e-5)  # the construction works
    ece = expected_calibration_error(probs, labels)
    # per bin |accuracy - confidence| ~ |N(0, sd)| with sd <= sqrt(.25 / 13000) = 0.0044: mean ~0.0035
    assert 0 <= ece < 0.012
    metrics = classification_metrics(logits, labels)
    assert metrics["test_ece"] == pytest.approx(ece, abs=1e-6)
    assert metrics["test_mean_confidence"] == pytest.approx(confidence.mean().item(), abs=1e-5)
    assert metrics["test_accuracy"] == pytest.approx(confidence.mean().item(), abs=0.005)


@pytest.mark.parametrize("gap", [0.1, 0.25])
def test_over_and_under_confident_predictors_have_ece_equal_to_their_gap(gap):
    logits, labels, _ = synthetic_predictor(200_000, seed=1, low=0.3, gap=gap)
    assert expected_calibration_error(torch.softmax(logits, 1), labels) == pytest.approx(gap, abs=0.012)
    # an under-confident one (right more often than it says) has the same gap
    g = torch.Generator().manual_seed(2)
    confidence = 0.15 + 0.5 * torch.rand(200_000, generator=g, dtype=torch.float64)
    predicted = torch.randint(0, K, (200_000,), generator=g)
    right = torch.rand(200_000, generator=g, dtype=torch.float64) < confidence + gap
    labels = torch.where(right, predicted, (predicted + 1) % K)
    under = torch.softmax(logits_with_confidence(confidence, predicted).float(), 1)
    assert expected_calibration_error(under, labels) == pytest.approx(gap, abs=0.012)


def probs_row(confidence: float, predicted: int) -> torch.Tensor:
    probs = torch.full((K,), (1 - confidence) / (K - 1), dtype=torch.float64)
    probs[predicted] = confidence
    return probs


def test_ece_and_reliability_bins_by_hand():
    probs = torch.stack([probs_row(0.95, 0), probs_row(0.95, 1), probs_row(0.5, 3), probs_row(0.25, 4),
                         probs_row(1.0, 6)])
    labels = torch.tensor([0, 2, 3, 5, 6])
    # bins of width 1/15: 0.95 -> 14, 0.5 -> 7, 0.25 -> 3, 1.0 -> 14 (the last bin is closed)
    bins = calibration_bins(probs, labels)
    assert set(bins) == {"count", "confidence", "accuracy"}
    assert all(len(v) == ECE_BINS == 15 for v in bins.values())
    assert bins["count"] == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3]
    assert bins["confidence"][14] == pytest.approx((0.95 + 0.95 + 1.0) / 3)
    assert bins["accuracy"][14] == pytest.approx(2 / 3)
    assert bins["accuracy"][7] == 1.0 and bins["accuracy"][3] == 0.0
    assert all(math.isnan(bins["accuracy"][b]) and math.isnan(bins["confidence"][b])
               for b in range(15) if bins["count"][b] == 0)
    gaps = 3 * abs(2 / 3 - 2.9 / 3) + abs(1 - 0.5) + abs(0 - 0.25)
    assert expected_calibration_error(probs, labels) == pytest.approx(gaps / 5)


def test_calibration_with_another_number_of_bins():
    probs = torch.stack([probs_row(0.95, 0), probs_row(0.95, 1), probs_row(0.5, 3), probs_row(0.25, 4)])
    labels = torch.tensor([0, 2, 3, 5])
    # bins of width 1/2: 0.25 -> 0, 0.5 and 0.95 -> 1
    bins = calibration_bins(probs, labels, bins=2)
    assert bins["count"] == [1, 3]
    assert bins["confidence"] == pytest.approx([0.25, (0.95 + 0.95 + 0.5) / 3])
    assert bins["accuracy"] == pytest.approx([0.0, 2 / 3])
    ece = (1 * abs(0 - 0.25) + 3 * abs(2 / 3 - 2.4 / 3)) / 4
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(ece)
    # one bin: the ECE is |accuracy - mean confidence|
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(abs(0.5 - 2.65 / 4))


def test_calibration_bins_count_every_example():
    logits, labels, confidence = synthetic_predictor(50_000, seed=3, low=0.1, gap=0.05)
    bins = calibration_bins(torch.softmax(logits, 1), labels)
    assert sum(bins["count"]) == 50_000
    edges = np.arange(16) / 15
    for b in range(15):
        if bins["count"][b]:
            assert edges[b] - 1e-6 <= bins["confidence"][b] <= edges[b + 1] + 1e-6
    # the reliability curve of this predictor sits `gap` below the diagonal
    full = [b for b in range(15) if bins["count"][b] > 2000]
    assert len(full) >= 10
    for b in full:
        assert bins["confidence"][b] - bins["accuracy"][b] == pytest.approx(0.05, abs=0.045)
    np.testing.assert_allclose(np.bincount(np.minimum((confidence.numpy() * 15).astype(int), 14), minlength=15),
                               bins["count"], atol=5)  # float32 softmax may move an edge case


# ================================================================ memorisation


def test_memorisation_metrics_by_hand():
    clean = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    noisy = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8])         # the last four are corrupted
    predictions = torch.tensor([0, 1, 9, 3, 5, 5, 7, 0])   # corrupted: noisy, true, noisy, neither
    m = memorisation_metrics(predictions, noisy, clean)
    assert m == {"memorised_fraction": 2 / 4, "corrupted_true_fraction": 1 / 4, "clean_train_accuracy": 3 / 4}


def test_memorisation_metrics_empty_subsets_are_nan():
    labels = torch.tensor([1, 2, 3])
    m = memorisation_metrics(torch.tensor([1, 0, 3]), labels, labels)  # nothing corrupted
    assert math.isnan(m["memorised_fraction"]) and math.isnan(m["corrupted_true_fraction"])
    assert m["clean_train_accuracy"] == pytest.approx(2 / 3)
    m = memorisation_metrics(torch.tensor([2, 2, 2]), torch.tensor([2, 3, 4]), labels)  # all corrupted
    assert m["memorised_fraction"] == pytest.approx(1 / 3) and m["corrupted_true_fraction"] == pytest.approx(1 / 3)
    assert math.isnan(m["clean_train_accuracy"])
