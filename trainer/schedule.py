"""Learning-rate schedule: linear warm-up, then constant, cosine, or plateau reductions.

Kept as a pure function of (step, plateau scale) instead of a torch scheduler object, so resuming
needs only the step count and ``TrainState.lr_scale`` that the checkpoint already carries.
"""

from __future__ import annotations

import math

from trainer.config.schema import AlgorithmConfig


class LRSchedule:
    def __init__(self, cfg: AlgorithmConfig, total_steps: int):
        self.base = cfg.lr
        self.sched = cfg.scheduler
        self.total = max(1, total_steps)

    def lr(self, step: int, scale: float = 1.0) -> float:
        """LR for the optimizer step that follows ``step`` completed steps."""
        warm = self.sched.warmup_steps
        if warm and step < warm:
            return self.base * (step + 1) / (warm + 1) * scale
        if self.sched.type == "cosine":
            progress = min(1.0, (step - warm) / max(1, self.total - warm))
            floor = self.sched.min_lr_ratio
            return self.base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))) * scale
        return self.base * scale

    def apply(self, optimizer, step: int, scale: float = 1.0) -> None:
        lr = self.lr(step, scale)
        for group in optimizer.param_groups:
            group["lr"] = lr
