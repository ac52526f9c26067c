"""Strict parsing of LLM replies shared by judges and environments: think blocks, one JSON object.

Strict means: after removing a ``<think>...</think>`` block, the reply is one JSON object, optionally
inside a single Markdown code fence (chat models add one even when told not to). Prose around it, a
list, or two objects are rejected with ``ValueError``; callers turn that into an invalid episode.
"""

from __future__ import annotations

import json
import re
from typing import Any

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)


def strip_thinking(text: str) -> str:
    """Drop ``<think>...</think>`` blocks (and everything before a bare ``</think>``); strip whitespace."""
    text = _THINK.sub("", text)
    if "</think>" in text and "<think>" not in text:
        text = text.split("</think>", 1)[1]
    return text.strip()


def json_object(text: str) -> dict[str, Any]:
    """The one JSON object ``text`` consists of; ValueError otherwise."""
    body = strip_thinking(text)
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"not a JSON object ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj
