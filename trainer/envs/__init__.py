"""Environments the agent acts in: the contract (``base``), ``single_turn``, ``intentiongym``, ``quiz`` and ``tau2``.

``make_environment`` builds the one a config names. Environments take already-built LLM clients
(``trainer.llm.make_client``) so that the trainer owns the event loop, the cache and the counters.
Importing this package imports neither torch nor litellm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer.config.multiturn import EnvironmentConfig
from trainer.envs.base import Action, Environment, Episode, EpisodeResult, StepResult, aggregate, parse_action
from trainer.envs.single_turn import ScoreFn, SingleTurnEnvironment
from trainer.llm.types import LLMClient

__all__ = [
    "Action",
    "Environment",
    "Episode",
    "EpisodeResult",
    "StepResult",
    "aggregate",
    "make_environment",
    "parse_action",
]


def make_environment(
    cfg: EnvironmentConfig,
    *,
    user: LLMClient | None = None,
    judge: LLMClient | None = None,
    score_fn: ScoreFn | None = None,
    split: str = "train",
) -> Environment:
    """The environment of ``cfg``; ``split`` picks ``intentions`` or ``val_intentions`` for IntentionGym."""
    if cfg.name == "single_turn":
        return SingleTurnEnvironment(score_fn)
    if cfg.name == "intentiongym":
        from trainer.envs.intentiongym import IntentionGym

        if user is None:
            raise ValueError("intentiongym needs a user simulator client")
        return IntentionGym.from_config(cfg, user, judge, split=split)
    if cfg.name == "quiz":
        from trainer.envs.quiz import QuizEnvironment

        return QuizEnvironment(cfg.max_turns, cfg.score)
    if cfg.name == "tau2":
        from trainer.envs.tau2 import Tau2Environment

        if user is None:
            raise ValueError("tau2 needs a user simulator client")
        return Tau2Environment(cfg, user, judge)
    raise ValueError(f"unknown environment {cfg.name!r}")


def check_data(cfg: EnvironmentConfig, split: str, rows: Sequence[dict[str, Any]], source: str) -> None:
    """Fail before any model is loaded when ``rows`` do not fit the environment (unknown task ids; tau2: tasks
    that need what is not simulated)."""
    if cfg.name == "tau2":
        from trainer.envs.tau2 import check_rows as check_tau2_rows

        check_tau2_rows(cfg, rows, source)
        return
    if cfg.name != "intentiongym":
        return
    from trainer.envs.intentiongym import check_rows, load_intentions

    path = cfg.val_intentions if split == "val" and cfg.val_intentions else cfg.intentions
    assert path is not None  # the config validator requires it for intentiongym
    check_rows(rows, load_intentions(path), source, path)
