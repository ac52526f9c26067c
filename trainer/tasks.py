"""Built-in synthetic tasks for the offline quickstart and tests.

Each task writes JSONL rows with ``prompt``, ``response`` and ``answer`` (so the same file serves SFT
and GRPO). They are small enough that the tiny random-initialised model learns them on a CPU in
minutes: the answer is one short token sequence that depends on the prompt through a fixed rule.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path


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


def sample_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on, so task prompts tokenise compactly."""
    rows = [r for task in TASKS for r in generate_rows(task, 200, 0)]
    return [f"{r['prompt']} {r['response']}" for r in rows] + [
        "system user assistant tool The user asks a question and the assistant answers it.",
    ]
