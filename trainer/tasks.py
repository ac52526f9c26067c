"""Built-in synthetic tasks for the offline quickstart and tests.

Each single-turn task writes JSONL rows with ``prompt``, ``response`` and ``answer`` (so the same file
serves SFT and GRPO). They are small enough that the tiny random-initialised model learns them on a CPU
in minutes: the answer is one short token sequence that depends on the prompt through a fixed rule.
``seat-booking`` is the multi-turn one (IntentionGym format, ``trainer.envs.intentiongym_sample``).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config.schema import RunConfig


def _next_letter(rng: random.Random) -> dict:
    letter = rng.choice(string.ascii_lowercase[:-1])
    answer = chr(ord(letter) + 1)
    return {"prompt": f"The letter after {letter}", "response": answer, "answer": answer}


def _repeat_letter(rng: random.Random) -> dict:
    letter = rng.choice(string.ascii_lowercase)
    return {"prompt": f"Repeat the letter {letter}", "response": letter, "answer": letter}


def _add_digits(rng: random.Random) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    answer = str(a + b)
    return {"prompt": f"{a}+{b}=", "response": answer, "answer": answer}


TASKS: dict[str, Callable[[random.Random], dict]] = {
    "repeat-letter": _repeat_letter,
    "next-letter": _next_letter,
    "add-digits": _add_digits,
}


# Multi-turn tasks in IntentionGym format (``environment.name: intentiongym``), written by ``write_generated``.
INTENTION_TASKS = ("seat-booking",)


def generate_rows(task: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [TASKS[task](rng) for _ in range(n)]


def write_task_files(task: str, train_path: str | Path, val_path: str | Path | None, train_size: int,
                     val_size: int, seed: int) -> None:  # fmt: skip
    """Write the train (and val) files if they do not exist yet; validation rows use another seed."""
    for path, size, s in ((train_path, train_size, seed), (val_path, val_size, seed + 1_000_003)):
        if path is None or Path(path).exists():
            continue
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in generate_rows(task, size, s):
                f.write(json.dumps(row) + "\n")
        tmp.replace(path)


def write_generated(cfg: RunConfig) -> None:
    """Write ``cfg.data.generate``'s task where its files are missing: JSONL rows for the single-turn tasks;
    for ``seat-booking`` (multi-turn, IntentionGym format) Parquet rows at ``data.*.path`` and the intention
    JSON at ``environment.intentions`` / ``val_intentions``; for ``tau2-tasks`` JSONL rows naming the tasks of
    ``environment.domain_dir``."""
    g, data, env = cfg.data.generate, cfg.data, cfg.environment
    if g is None:
        return
    if g.task == "tau2-tasks":
        from trainer.envs.tau2_format import write_generated_rows

        write_generated_rows(cfg)
        return
    if g.task in INTENTION_TASKS:
        from trainer.envs.intentiongym_sample import write_seat_task

        assert env.intentions is not None  # the config validator requires it for intentiongym
        paths: dict[str, str | Path] = {"train": data.train.path, "train_intentions": env.intentions}
        sizes = {"train": g.train_size}
        if data.val is not None:
            paths.update(val=data.val.path, val_intentions=env.val_intentions or env.intentions)
            sizes["val"] = g.val_size
        write_seat_task(paths, sizes, g.seed)
        return
    write_task_files(g.task, data.train.path, data.val.path if data.val else None, g.train_size, g.val_size,
                     g.seed)  # fmt: skip


def sample_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on, so task prompts tokenise compactly."""
    rows = [r for task in TASKS for r in generate_rows(task, 200, 0)]
    return [f"{r['prompt']} {r['response']}" for r in rows] + [
        "system user assistant tool The user asks a question and the assistant answers it.",
    ]
