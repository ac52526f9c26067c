"""Write a small IntentionGym-format sample: verl Parquet rows plus the intention JSON (CONTEXT §2 schemas).

For tests and the quickstart, where UserRL's release is not at hand. The layout mirrors the real
config's paths::

    <out>/intention_multiturn/{train,test}.parquet
    <out>/intentiongym/all_intentions_{train,test}.json

Like upstream, the JSON holds more tasks than the Parquet rows use. Run it with
``python -m trainer.envs.intentiongym_sample --out data --train 32 --test 8``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

# (category, task, [(description, importance, inquiry, options)])
_TASKS: list[tuple[str, str, list[tuple[str, str, str, list[str]]]]] = [
    ("Travel", "Plan a weekend trip for me.", [
        ("Preferred type of destination", "3", "What kind of destination do you prefer?", ["beach", "mountains", "city"]),
        ("Budget for the trip", "2", "What is your budget for the trip?", ["under 500 dollars", "500 to 1000 dollars"]),
        ("Travel dates", "3", "Which dates will you travel?", ["next weekend", "end of the month"]),
        ("Travel companions", "1", "Who are your travel companions?", ["alone", "partner", "family"]),
    ]),
    ("Cooking", "Suggest a recipe for dinner tonight.", [
        ("Dietary restrictions", "3", "Do you have any dietary restrictions?", ["vegetarian", "gluten free", "none"]),
        ("Preferred cuisine", "2", "Which cuisine do you prefer?", ["italian", "mexican", "japanese"]),
        ("Available cooking time", "1", "How much cooking time do you have?", ["30 minutes", "one hour"]),
    ]),
    ("Fitness", "Create a workout plan for me.", [
        ("Fitness goal", "3", "What is your main fitness goal?", ["lose weight", "build muscle", "endurance"]),
        ("Available equipment", "2", "What equipment do you have available?", ["dumbbells", "gym membership"]),
        ("Training days per week", "2", "How many days per week can you train?", ["three days", "five days"]),
        ("Experience level", "1", "What is your experience level with exercise?", ["beginner", "advanced"]),
    ]),
    ("Shopping", "Recommend a laptop for me.", [
        ("Budget for the laptop", "3", "What is your budget for the laptop?", ["800 dollars", "1500 dollars"]),
        ("Primary use", "3", "What will you mainly use the laptop for?", ["gaming", "programming", "office work"]),
        ("Operating system preference", "2", "Which operating system do you prefer?", ["windows", "macos", "linux"]),
        ("Screen size", "1", "What screen size do you want?", ["13 inch", "15 inch"]),
    ]),
    ("Writing", "Write an email to my landlord.", [
        ("Issue to raise", "3", "What issue do you want to raise with the landlord?", ["broken heating", "rent increase"]),
        ("Tone of the email", "2", "What tone should the email have?", ["polite", "firm"]),
        ("Urgency", "1", "How urgent is the matter?", ["urgent", "not urgent"]),
    ]),
    ("Education", "Help me learn a new language.", [
        ("Target language", "3", "Which language do you want to learn?", ["spanish", "french", "mandarin"]),
        ("Current level", "2", "What is your current level in the language?", ["complete beginner", "intermediate"]),
        ("Daily study time", "1", "How much time can you study each day?", ["15 minutes", "one hour"]),
    ]),
    ("Entertainment", "Recommend a movie to watch tonight.", [
        ("Preferred genre", "3", "Which movie genre do you prefer?", ["comedy", "thriller", "drama"]),
        ("Audience", "2", "Who is watching the movie with you?", ["kids", "friends", "alone"]),
        ("Movie length", "1", "How long should the movie be?", ["under two hours", "any length"]),
    ]),
    ("Finance", "Help me save money each month.", [
        ("Monthly income", "3", "What is your monthly income?", ["2000 dollars", "5000 dollars"]),
        ("Largest expenses", "2", "What are your largest monthly expenses?", ["rent", "eating out", "car"]),
        ("Savings goal", "2", "What savings goal do you have?", ["emergency fund", "house deposit"]),
    ]),
]  # fmt: skip

SYSTEM_PROMPT = (
    "You are a helpful assistant in IntentionGym. The user gives you a vague task; before doing it you must "
    "find out what the user really wants. Ask one clarifying question per turn by calling the tool "
    'interact_with_env with {"content": "<your question>"}; the user\'s answer comes back as the tool result. '
    "Ask about the most important missing details first and ask about one detail per question.\n"
    "Call the tool like this:\n"
    '<tool_call>{"name": "interact_with_env", "arguments": {"content": "What is your budget?"}}</tool_call>'
)


def _intention(idx: int, split: str, rng: random.Random) -> dict[str, Any]:
    category, task, details = _TASKS[idx % len(_TASKS)]
    details = list(details)
    rng.shuffle(details)  # vary the order so nothing depends on position
    return {
        "id": f"intention-{split}-{idx:04d}",
        "category": category,
        "task": task,
        "missing_details": [
            {"description": d, "importance": imp, "inquiry": q, "options": list(opts)}
            for d, imp, q, opts in details
        ],
    }


def _row(item: dict[str, Any], index: int, split: str) -> dict[str, Any]:
    create = {
        "category": item["category"],
        "env_name": "IntentionGym",
        "id": item["id"],
        "task": item["task"],
    }
    return {
        "data_source": "interact_intention",
        "prompt": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Category: {item['category']}\nTask: {item['task']}"},
        ],
        "ability": "interaction",
        "reward_model": {
            "category": item["category"],
            "env_name": "IntentionGym",
            "ground_truth": ", ".join(d["description"] for d in item["missing_details"]),
            "id": item["id"],
            "style": "interaction",
            "task": item["task"],
        },
        "extra_info": {
            "index": index,
            "need_tools_kwargs": True,
            "split": split,
            "tools_kwargs": {"interact_with_env": {"create_kwargs": create}},
        },
    }


def write_sample(
    out_dir: str | Path, train: int = 32, test: int = 8, extra: int = 4, seed: int = 0
) -> dict[str, Path]:
    """Write the sample under ``out_dir``; return the four paths (``train``, ``test``, ``train_intentions``, ...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    rng = random.Random(seed)
    paths: dict[str, Path] = {}
    for split, n in (("train", train), ("test", test)):
        items = [_intention(i, split, rng) for i in range(n + extra)]
        rows = [_row(item, i, split) for i, item in enumerate(items[:n])]
        json_path = out / "intentiongym" / f"all_intentions_{split}.json"
        parquet_path = out / "intention_multiturn" / f"{split}.parquet"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        parquet_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(items, indent=1) + "\n", encoding="utf-8")
        pq.write_table(pa.Table.from_pylist(rows), parquet_path)
        paths[split] = parquet_path
        paths[f"{split}_intentions"] = json_path
    return paths


# ----------------------------------------------------------------------------- the quickstart's seat-booking tasks

# Every task misses the same three details; the tiny random model can name each option in one token ("b", " 4"),
# so the rule judge sees a covered detail whenever the agent's one-token question names an option, and GRPO has
# a signal from the first step (a random token names some option ~1 time in 9). What the agent must learn is
# which details matter and to ask a *different* one each turn: asking a covered detail again earns 0.
SEAT_DETAILS: list[tuple[str, str, str, list[str]]] = [
    ("Row", "3", "Which row do you want to sit in?", ["b", "c", "d"]),
    ("Seat number", "2", "Which seat number do you want?", ["4", "5", "6"]),
    ("Hall", "1", "Which hall is the show in?", ["7", "8", "9"]),
]
SEAT_EVENTS = ["the film tonight", "the concert", "the play", "the match", "the opera", "the talk", "the show",
               "the musical"]  # fmt: skip
SEAT_SYSTEM_PROMPT = "Ask the user one short question per turn about what they want."


def seat_items(n: int, split: str, seed: int) -> list[dict[str, Any]]:
    """``n`` intention entries "Book me a seat for <event>." whose three missing details are ``SEAT_DETAILS``."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        details = list(SEAT_DETAILS)
        rng.shuffle(details)  # the order in the file carries no information
        items.append({
            "id": f"seat-{split}-{i:04d}", "category": "Booking", "task": f"Book me a seat for {rng.choice(SEAT_EVENTS)}.",
            "missing_details": [{"description": d, "importance": imp, "inquiry": q, "options": list(o)}
                                for d, imp, q, o in details],
        })  # fmt: skip
    return items


def write_seat_task(paths: dict[str, str | Path], sizes: dict[str, int], seed: int = 0) -> None:
    """The quickstart's data (``data.generate.task: seat-booking``): for each split in ``sizes`` (``train``,
    ``val``), verl-format Parquet rows at ``paths[split]`` and their intention JSON at
    ``paths[split + "_intentions"]`` (both splits' tasks in one file when the two paths are the same). Nothing
    is written when every file exists (a resumed run keeps its data)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [Path(paths[k]) for split in sizes for k in (split, f"{split}_intentions")]
    if all(f.exists() for f in files):
        return
    by_json: dict[Path, list[dict[str, Any]]] = {}
    for split, n in sizes.items():
        items = seat_items(n, split, seed + (0 if split == "train" else 1_000_003))
        rows = [_row(item, i, split) for i, item in enumerate(items)]
        for row in rows:
            row["prompt"][0]["content"] = SEAT_SYSTEM_PROMPT  # short: fewer context tokens per turn on a CPU
            row["prompt"][1]["content"] = row["reward_model"]["task"]
        by_json.setdefault(Path(paths[f"{split}_intentions"]), []).extend(items)
        _replace(Path(paths[split]), lambda tmp, rows=rows: pq.write_table(pa.Table.from_pylist(rows), tmp))
    for json_path, items in by_json.items():
        _replace(
            json_path, lambda tmp, items=items: tmp.write_text(json.dumps(items, indent=1) + "\n", "utf-8")
        )


def _replace(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a run killed meanwhile leaves no half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data", help="output folder (default: data)")
    ap.add_argument("--train", type=int, default=32, help="training rows")
    ap.add_argument("--test", type=int, default=8, help="test rows")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name, path in write_sample(args.out, args.train, args.test, seed=args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
