"""Training losses, one registry entry each (placeholder until the full set lands)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Loss:
    description: str
    settings: dict[str, float] = field(default_factory=dict)
    make: Callable = None
    needs_label_noise: bool = False


def forward(transition):
    return lambda logits, labels: nn.functional.nll_loss((torch.softmax(logits, 1) @ transition).clamp_min(1e-12).log(), labels)


LOSSES = {"ce": Loss("cross-entropy", make=lambda transition: nn.functional.cross_entropy),
          "forward": Loss("forward", make=forward, needs_label_noise=True)}
