"""What a trained model is measured by: classification metrics, calibration, memorisation.

Pure functions of logits, probabilities and labels, so that tests check them by hand."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from registry import ECE_BINS, METRICS


def macro_roc_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the one-vs-rest ROC-AUC (Mann-Whitney form, ties averaged);
    classes without positives or without negatives are left out."""
    ranks = pd.DataFrame(probs).rank().to_numpy()  # per class, ties averaged
    aucs = []
    for k in range(probs.shape[1]):
        positive = labels == k
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos and n_neg:
            aucs.append((ranks[positive, k].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs))


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, list]:
    """Reliability-diagram data: per equal-width confidence bin, the count, mean confidence
    (max softmax) and accuracy (NaN for an empty bin)."""
    confidence, predictions = probs.max(1)
    which = (confidence.double() * bins).long().clamp_(max=bins - 1)
    counts = torch.bincount(which, minlength=bins).double()
    confidence_sums = torch.bincount(which, weights=confidence.double(), minlength=bins)
    correct_sums = torch.bincount(which, weights=(predictions == labels).double(), minlength=bins)
    return {"count": counts.tolist(), "confidence": (confidence_sums / counts).tolist(),
            "accuracy": (correct_sums / counts).tolist()}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Sum over bins of (bin size / N) * |accuracy - mean confidence|."""
    reliability = calibration_bins(probs, labels, bins)
    counts = torch.tensor(reliability["count"])
    gaps = (torch.tensor(reliability["accuracy"]) - torch.tensor(reliability["confidence"])).abs()
    return float((counts * gaps.nan_to_num(0.0)).sum() / counts.sum())


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Cross-entropy, accuracy, macro precision and recall (0 for a class never predicted),
    macro ROC-AUC, expected calibration error, mean confidence, and every registered `Metric.compute`."""
    logits, labels = logits.float().cpu(), labels.cpu()
    num_classes = logits.shape[1]
    probs = torch.softmax(logits, 1)
    predictions = logits.argmax(1)
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2)
    confusion = confusion.view(num_classes, num_classes).double()  # rows: true, columns: predicted
    true_positives = confusion.diag()
    metrics = {
        "test_loss": nn.functional.cross_entropy(logits, labels).item(),
        "test_accuracy": (predictions == labels).double().mean().item(),
        "test_macro_precision": (true_positives / confusion.sum(0).clamp(min=1)).mean().item(),
        "test_macro_recall": (true_positives / confusion.sum(1).clamp(min=1)).mean().item(),
        "test_macro_roc_auc": macro_roc_auc(probs.numpy(), labels.numpy()),
        "test_ece": expected_calibration_error(probs, labels),
        "test_mean_confidence": probs.max(1).values.mean().item(),
    }
    computed = {name: metric.compute for name, metric in METRICS.items() if metric.compute}
    return {**metrics, **{name: float(compute(probs.numpy(), labels.numpy())) for name, compute in computed.items()}}


def memorisation_metrics(predictions: torch.Tensor, noisy: torch.Tensor, clean: torch.Tensor) -> dict[str, float]:
    """How far the model follows the noisy labels of training examples. On the corrupted ones (noisy label != true
    label): the fraction predicted as their noisy label and as their true label; on the others, plain training
    accuracy. NaN where a subset is empty."""
    corrupted = noisy != clean
    hits = {
        "memorised_fraction": predictions[corrupted] == noisy[corrupted],
        "corrupted_true_fraction": predictions[corrupted] == clean[corrupted],
        "clean_train_accuracy": predictions[~corrupted] == clean[~corrupted],
    }
    return {name: hit.double().mean().item() if len(hit) else math.nan for name, hit in hits.items()}
