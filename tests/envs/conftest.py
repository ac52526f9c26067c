"""Fixtures for environment tests: one generated IntentionGym sample per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.envs.intentiongym_sample import write_sample


@pytest.fixture(scope="session")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sample(tmp_path_factory.mktemp("intentiongym"), train=12, test=4, seed=0)
