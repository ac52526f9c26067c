"""Prompts and strict reply parsers of IntentionGym's LLM roles: the user simulator and the coverage judge.

Three prompts, each a list of chat messages:

- ``user_messages``: the simulated user, who knows the task and *all* its hidden details and answers
  the agent's question in character, revealing only what was asked.
- ``judge_messages``: the coverage judge, shown the details not yet covered (numbered 1..k) and the
  question; it must reply with exactly ``{"covered": [<numbers>]}``.
- ``merged_messages``: both at once (``environment.merged``), reply ``{"reply": "...", "covered": [...]}``.

Parsing is strict: one JSON object (optionally inside one Markdown code fence, which chat models add
even when told not to), with exactly the expected keys and types and numbers in range. Anything
else raises ``ValueError``; the client reports it as a failed call and the episode becomes invalid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer.llm.parsing import json_object, strip_thinking
from trainer.llm.types import Message


def _detail_lines(details: Sequence[Any], with_options: bool) -> str:
    lines = []
    for i, d in enumerate(details, 1):
        extra = f" (possible answers: {', '.join(d.options)})" if with_options and d.options else ""
        lines.append(f"{i}. {d.description}{extra}")
    return "\n".join(lines)


def _persona(task: str, details: Sequence[Any]) -> str:
    prefs = "\n".join(
        f"- {d.description}"
        + (f" (one of: {', '.join(d.options)}; pick one and stay consistent)" if d.options else "")
        for d in details
    )
    return (
        "You are role-playing a person who asked an AI assistant for help with this task:\n"
        f"{task}\n\n"
        "You have specific preferences that the assistant does not know yet:\n"
        f"{prefs}\n\n"
        "The assistant asks you clarifying questions. Answer each question briefly and naturally, in character, "
        "as this person. Reveal only the details the question actually asks about; do not volunteer the others. "
        "If it asks about something not listed, answer as an ordinary person would, vaguely. Never say that you "
        "are role-playing or that you have a list."
    )


def _history(turns: Sequence[tuple[str, str]], question: str) -> list[Message]:
    # From the simulator's side the agent's questions are the "user" turns and its own answers the "assistant" ones.
    msgs: list[Message] = []
    for q, a in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": question})
    return msgs


def user_messages(
    task: str, details: Sequence[Any], turns: Sequence[tuple[str, str]], question: str
) -> list[Message]:
    system = _persona(task, details) + "\nReply with your answer only."
    return [{"role": "system", "content": system}, *_history(turns, question)]


def judge_messages(task: str, remaining: Sequence[Any], question: str) -> list[Message]:
    system = (
        "You judge which hidden details of a task a clarifying question asks about. A detail is covered when the "
        "question explicitly asks for it or clearly invites the user to state it; a vague or generic question "
        "covers nothing. Reply with one JSON object and nothing else: "
        '{"covered": [<numbers of the covered details>]}, e.g. {"covered": [2]} or {"covered": []}.'
    )
    user = (
        f"Task: {task}\n\nDetails not yet asked about:\n{_detail_lines(remaining, with_options=True)}\n\n"
        f"Question: {question}"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def merged_messages(
    task: str,
    details: Sequence[Any],
    remaining: Sequence[Any],
    turns: Sequence[tuple[str, str]],
    question: str,
) -> list[Message]:
    system = (
        _persona(task, details)
        + "\n\nYou also report which of these not-yet-discussed details the latest question asks about "
        "(covered when it explicitly asks for it or clearly invites you to state it):\n"
        + _detail_lines(remaining, with_options=False)
        + '\n\nReply with one JSON object and nothing else: {"reply": "<your answer in character>", '
        '"covered": [<numbers of the covered details>]}.'
    )
    return [{"role": "system", "content": system}, *_history(turns, question)]


# ----------------------------------------------------------------------------- strict parsers


def _covered(obj: dict[str, Any], k: int) -> list[int]:
    numbers = obj.get("covered")
    if not isinstance(numbers, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in numbers
    ):
        raise ValueError('"covered" must be a list of integers')
    bad = [n for n in numbers if not 1 <= n <= k]
    if bad:
        raise ValueError(f'"covered" has {bad}, outside 1..{k}')
    return sorted({n - 1 for n in numbers})  # 0-based indices into the remaining details


def parse_verdict(text: str, k: int) -> list[int]:
    """Indices (0-based) of the covered details among the ``k`` shown, from ``{"covered": [...]}``."""
    obj = json_object(text)
    if set(obj) != {"covered"}:
        raise ValueError(f'expected exactly the key "covered", got {sorted(obj)}')
    return _covered(obj, k)


def parse_merged(text: str, k: int) -> tuple[str, list[int]]:
    """``(reply, covered indices)`` from ``{"reply": "...", "covered": [...]}``."""
    obj = json_object(text)
    if set(obj) != {"reply", "covered"}:
        raise ValueError(f'expected exactly the keys "reply" and "covered", got {sorted(obj)}')
    reply = obj["reply"]
    if not isinstance(reply, str) or not reply.strip():
        raise ValueError('"reply" must be a non-empty string')
    return reply.strip(), _covered(obj, k)


def parse_reply(text: str) -> str:
    """The simulated user's answer; an empty one (e.g. all tokens spent thinking) is a failure."""
    reply = strip_thinking(text)
    if not reply:
        raise ValueError("empty reply")
    return reply
