"""Optimizer settings and the learning-rate schedule: plain values and math, importable without torch
or Lightning (the config validation and `kbtune --help` paths import this)."""

from __future__ import annotations

import math

from kbtune.settings_base import settings


@settings
class OptimSettings:
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 50
    # The cosine decays to this fraction of the peak learning rate.
    min_lr_ratio: float = 0.1

    def validate(self) -> list[str]:
        p = []
        if not self.learning_rate > 0:
            p.append(f"optim.learning_rate: must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            p.append(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            p.append(f"optim.beta1/beta2: must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.warmup_steps < 0:
            p.append(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            p.append(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        return p


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine from 1 down to `min_ratio` at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
