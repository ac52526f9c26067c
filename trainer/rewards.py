"""Rewards: plain callables ``fn(*, completion, prompt, answer, row, num_tokens, max_new_tokens, **kw) -> float | None``.

The contract follows TRL's: keyword arguments in, one float (or None for "not applicable") out. Each
configured reward is logged under its own name (``reward/<name>``); the training reward is the
weighted sum of the applicable ones. ``python`` rewards load the user's own ``module:callable``.

Length penalty curve (``length_penalty``), with ``x = num_tokens / max_new_tokens``::

    penalty(x) = 0                                                       if x <= peak_ratio
               = -min(max_penalty, penalty_scale * (x - peak_ratio) / (outer_ratio - peak_ratio))   otherwise

so completions up to ``peak_ratio`` of the budget are free, the penalty reaches ``penalty_scale`` at
``outer_ratio`` and keeps growing linearly until it is clipped at ``max_penalty``. See
docs/length_penalty.png (``python -m trainer.rewards --plot docs/length_penalty.png``).
"""

from __future__ import annotations

import importlib
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainer.config.schema import (
    AccuracyReward,
    FormatReward,
    LengthPenaltyReward,
    PythonReward,
    RewardConfig,
    StepReward,
)
from trainer.errors import UserError

RewardFn = Callable[..., float | None]

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER = re.compile(r"answer\s*[:：]\s*(.+)", re.IGNORECASE)
_STEP = re.compile(r"^\s*(step\s*\d+\s*[:.)]?|\d+[.)]|[-*•])\s+", re.IGNORECASE | re.MULTILINE)
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and collapse whitespace."""
    return " ".join(text.lower().translate(_PUNCT).split())


def extract_answer(completion: str) -> str:
    """The final answer of a completion: the last ``\\boxed{}``, else what follows ``Answer:``, else all of it."""
    boxed = _BOXED.findall(completion)
    if boxed:
        return boxed[-1]
    m = _ANSWER.findall(completion)
    if m:
        lines = m[-1].strip().splitlines()
        return lines[0] if lines else ""
    return completion


def accuracy(*, completion: str, answer: str | None, match: str = "exact", **_: Any) -> float | None:
    if answer is None:
        return None
    got, want = normalize(extract_answer(completion)), normalize(answer)
    if match == "prefix":
        # Word-boundary prefix: "d" matches "d e" but not "dog".
        ok = got == want or got.startswith(want + " ")
    elif match == "contains":
        ok = want in got
    else:
        ok = got == want
    return 1.0 if ok else 0.0


def length_penalty_value(x: float, *, penalty_scale: float, max_penalty: float, peak_ratio: float,
                         outer_ratio: float) -> float:  # fmt: skip
    if x <= peak_ratio:
        return 0.0
    return -min(max_penalty, penalty_scale * (x - peak_ratio) / (outer_ratio - peak_ratio))


def length_penalty(*, num_tokens: int, max_new_tokens: int, penalty_scale: float, max_penalty: float,
                   peak_ratio: float, outer_ratio: float, **_: Any) -> float:  # fmt: skip
    return length_penalty_value(num_tokens / max(1, max_new_tokens), penalty_scale=penalty_scale,
                                max_penalty=max_penalty, peak_ratio=peak_ratio, outer_ratio=outer_ratio)  # fmt: skip


def step(*, completion: str, step_bonus: float = 0.1, max_steps: int = 10, **_: Any) -> float:
    return step_bonus * min(max_steps, len(_STEP.findall(completion)))


def format_match(*, completion: str, pattern: str, **_: Any) -> float:
    return 1.0 if re.fullmatch(pattern, completion.strip(), flags=re.DOTALL) else 0.0


@dataclass
class Reward:
    name: str
    weight: float
    fn: RewardFn
    kwargs: dict[str, Any]

    def __call__(self, **sample: Any) -> float | None:
        value = self.fn(**sample, **self.kwargs)
        return None if value is None else float(value)


def load_python_reward(ref: str) -> RewardFn:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"rewards: function {ref!r}", f"cannot import {module_name!r}: {e}",
                        hint="the module must be importable from the working directory or installed") from None  # fmt: skip
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"rewards: function {ref!r}", f"{module_name} has no callable {attr!r}")
    return fn


def build_rewards(configs: list[RewardConfig]) -> list[Reward]:
    rewards = []
    for rc in configs:
        name = rc.name or rc.type
        if isinstance(rc, AccuracyReward):
            rewards.append(Reward(name, rc.weight, accuracy, {"match": rc.match}))
        elif isinstance(rc, LengthPenaltyReward):
            kw = rc.model_dump(include={"penalty_scale", "max_penalty", "peak_ratio", "outer_ratio"})
            rewards.append(Reward(name, rc.weight, length_penalty, kw))
        elif isinstance(rc, StepReward):
            rewards.append(
                Reward(name, rc.weight, step, {"step_bonus": rc.step_bonus, "max_steps": rc.max_steps})
            )
        elif isinstance(rc, FormatReward):
            rewards.append(Reward(name, rc.weight, format_match, {"pattern": rc.pattern}))
        elif isinstance(rc, PythonReward):
            rewards.append(Reward(name, rc.weight, load_python_reward(rc.function), dict(rc.kwargs)))
        # ``llm_judge`` needs the judge client and the event loop: ``trainer.rollout`` scores it per episode.
    return rewards


def score(
    rewards: list[Reward], samples: list[dict[str, Any]]
) -> tuple[list[float], dict[str, list[float | None]]]:
    """Weighted total per sample and each reward's raw values (None where not applicable)."""
    parts: dict[str, list[float | None]] = {r.name: [r(**s) for s in samples] for r in rewards}
    totals = []
    for i in range(len(samples)):
        totals.append(sum(r.weight * v for r in rewards if (v := parts[r.name][i]) is not None))
    return totals, parts


def _plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [i / 200 for i in range(201)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for scale, maxp in ((1.0, 1.0), (2.0, 1.0), (0.5, 0.5)):
        kw = {"penalty_scale": scale, "max_penalty": maxp, "peak_ratio": 0.3, "outer_ratio": 0.5}
        ax.plot(xs, [length_penalty_value(x, **kw) for x in xs], label=f"scale {scale}, max {maxp}")
    ax.axvline(0.3, ls=":", c="grey")
    ax.axvline(0.5, ls=":", c="grey")
    ax.set_xlabel("num_tokens / max_new_tokens")
    ax.set_ylabel("reward")
    ax.set_title("length_penalty (peak_ratio 0.3, outer_ratio 0.5)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--plot":
        _plot(sys.argv[2])
