"""Training losses for learning under label noise, one entry per loss with its paper's defaults, and the
estimator of the noise transition matrix T that `forward_estimated` trains with (docs/losses.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

FORWARD_CLAMP = 1e-12  # noisy-label probabilities are clamped here before the log


@dataclass(frozen=True)
class Loss:
    description: str                 # one line, shown in --help and docs
    settings: dict[str, float]       # hyper-parameters and their paper defaults
    make: Callable                   # make(transition, **settings) -> fn(logits, labels) -> mean loss
    needs_label_noise: bool = False  # forward corrections: T differs from I only under label noise


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_percentile(percentile: float) -> None:
    _require(0 <= percentile <= 100, f"percentile must be in [0, 100], got {percentile:g}")


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log softmax in float32 at least: under bfloat16 autocast the logits are bfloat16 (3 significant digits)."""
    return F.log_softmax(logits, 1, dtype=torch.promote_types(logits.dtype, torch.float32))


def _log_p_label(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _log_probs(logits).gather(1, labels.unsqueeze(1)).squeeze(1)


def forward_corrected(transition: torch.Tensor | None):
    """Cross-entropy of the noisy label under softmax(z) T (T[i, j] = P(noisy j | true i))."""
    _require(transition is not None, "forward correction needs the K x K transition matrix T, got None")

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.nll_loss((torch.softmax(logits, 1) @ transition).clamp_min(FORWARD_CLAMP).log(), labels)
    return loss


def forward_with_estimate(transition: torch.Tensor | None, percentile: float, estimate_epochs: float):
    """forward_corrected with the estimated T, which the training loop estimates by these settings (docs/losses.md)."""
    _check_percentile(percentile)
    _require(estimate_epochs >= 1 and float(estimate_epochs).is_integer(),
             f"forward_estimated's estimate_epochs must be a whole number >= 1, got {estimate_epochs:g}")
    return forward_corrected(transition)


def generalized_cross_entropy(transition, q: float):
    _require(0 < q <= 1, f"gce's q must be in (0, 1], got {q:g}")

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (-torch.expm1(q * _log_p_label(logits, labels)) / q).mean()  # (1 - p_y^q) / q, exact as q -> 0
    return loss


def symmetric_cross_entropy(transition, alpha: float, beta: float, A: float):
    """alpha CE + beta RCE; with log 0 := A the reverse term -sum_k p_k log onehot_k is -A (1 - p_y)."""
    _require(alpha >= 0 and beta >= 0, f"sce's alpha and beta must be >= 0, got alpha={alpha:g}, beta={beta:g}")
    _require(A < 0, f"sce's A (the value of log 0) must be < 0, got {A:g}")

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p_label = _log_p_label(logits, labels)
        reverse = -A * -torch.expm1(log_p_label)  # -A (1 - p_y)
        return (alpha * -log_p_label + beta * reverse).mean()
    return loss


def smoothed_cross_entropy(transition, eps: float):
    _require(0 <= eps <= 1, f"label_smoothing's eps must be in [0, 1], got {eps:g}")
    return lambda logits, labels: F.cross_entropy(logits, labels, label_smoothing=eps)


def hard_bootstrap(transition, beta: float):
    """-[beta log p_y + (1 - beta) log p_argmax]: the predicted class is a constant target, like the label."""
    _require(0 <= beta <= 1, f"bootstrap's beta must be in [0, 1], got {beta:g}")

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = _log_probs(logits)
        return beta * F.nll_loss(log_p, labels) + (1 - beta) * F.nll_loss(log_p, logits.detach().argmax(1))
    return loss


LOSSES: dict[str, Loss] = {
    "ce": Loss("cross-entropy with the given (noisy) labels", {}, lambda transition: F.cross_entropy),
    "forward": Loss("forward correction with the true T: -log (softmax(z) T)[y] (Patrini et al. 2017)", {},
                    forward_corrected, needs_label_noise=True),
    "forward_estimated": Loss("forward correction with T estimated from a first model trained on the noisy labels "
                              "(Patrini et al. 2017)", {"percentile": 97.0, "estimate_epochs": 5.0},
                              forward_with_estimate, needs_label_noise=True),
    "gce": Loss("generalized cross-entropy (1 - p_y^q) / q (Zhang & Sabuncu 2018)", {"q": 0.7},
                generalized_cross_entropy),
    "sce": Loss("symmetric cross-entropy alpha CE + beta reverse CE, log 0 := A (Wang et al. 2019)",
                {"alpha": 0.01, "beta": 1.0, "A": -4.0}, symmetric_cross_entropy),
    "label_smoothing": Loss("cross-entropy against (1 - eps) one-hot + eps / K (Szegedy et al. 2016)", {"eps": 0.1},
                            smoothed_cross_entropy),
    "bootstrap": Loss("hard bootstrapping: beta CE with the label + (1 - beta) CE with the predicted class "
                      "(Reed et al. 2015)", {"beta": 0.8}, hard_bootstrap),
}


def _finite_number(name: str, setting: str, value) -> float:
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    _require(math.isfinite(number), f"loss {name!r} setting {setting}={value!r} is not a finite number")
    return number


def loss_settings(name: str, settings: dict | None) -> dict[str, float]:
    """The loss's settings: its paper defaults overridden by `settings`, whose names are checked."""
    _require(name in LOSSES, f"unknown loss {name!r}; allowed: {', '.join(LOSSES)}")
    defaults, settings = LOSSES[name].settings, settings or {}
    unknown = [setting for setting in settings if setting not in defaults]
    _require(not unknown, f"loss {name!r} has no setting {', '.join(map(repr, unknown))}; "
                          f"its settings: {', '.join(defaults) or 'none'}")
    return {**defaults, **{setting: _finite_number(name, setting, value) for setting, value in settings.items()}}


def loss_function(name: str, settings: dict | None, transition: torch.Tensor | None) -> Callable:
    """fn(logits, labels) -> mean loss of the named loss; `transition` (float, on the logits' device) is
    used by the forward corrections only."""
    resolved = loss_settings(name, settings)  # checks the name first
    return LOSSES[name].make(transition, **resolved)


def estimate_transition(probs: torch.Tensor, percentile: float = 97.0) -> torch.Tensor:
    """Patrini's anchor estimator, float64: row i of T is the softmax output of the example whose p(noisy i | x)
    is at `percentile` among all N examples (rank ceil(percentile/100 (N-1)) from the lowest; 100: the argmax)."""
    _check_percentile(percentile)
    probs = probs.detach().double()
    rank = math.ceil(percentile * (len(probs) - 1) / 100)
    anchors = probs.kthvalue(rank + 1, dim=0).indices  # one example per class
    rows = probs[anchors]
    return rows / rows.sum(1, keepdim=True)
