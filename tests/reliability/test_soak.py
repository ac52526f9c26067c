"""The short fault soak: ``scripts/soak.py --minutes 0.5`` keeps every invariant of the long one.

30 % of requests fail at the fault proxy (429, 500, stalls, cut-off JSON, dropped connections); the run
keeps stepping, every failed call is exactly one invalid episode, no invalid episode has a reward.
Figures (steps, timings) are not asserted; nor is flat memory, which half a minute cannot show (the
4-minute soak's figures are in docs/reliability.md).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest


@pytest.mark.slow
def test_short_soak_keeps_the_invariants(tmp_path: Path, tiny_model: Path, soak: ModuleType) -> None:
    result = soak.run_soak(
        0.5, rate=0.3, interval_s=1.0, work=tmp_path, tiny_model=tiny_model, say=lambda _: None
    )
    assert soak.check(result, flat=False) == [], soak.table(result) + "\n" + result.stdout_tail
    assert result.samples, "the trainer process was never sampled"
    # Descriptors and connections stay bounded (max_concurrency 4 per client, two clients).
    assert max(s.connections for s in result.samples) <= 16
    assert sum(result.proxy["faults"].values()) > 0
