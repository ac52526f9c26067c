"""The agent-action parser: Qwen3-style tool calls, plain text, and every malformed shape."""

from __future__ import annotations

import pytest

from trainer.envs.base import parse_action

CALL = (
    '<tool_call>{"name": "interact_with_env", "arguments": {"content": "What is your budget?"}}</tool_call>'
)


@pytest.mark.parametrize(
    ("text", "kind", "name", "content"),
    [
        (CALL, "tool_call", "interact_with_env", "What is your budget?"),
        (
            "Let me ask.\n" + CALL.replace("><", ">\n<") + "\n",
            "tool_call",
            "interact_with_env",
            "What is your budget?",
        ),
        (
            "<think>The budget matters most.</think>\n" + CALL,
            "tool_call",
            "interact_with_env",
            "What is your budget?",
        ),
        (
            "I reasoned without an opening tag</think>" + CALL,
            "tool_call",
            "interact_with_env",
            "What is your budget?",
        ),
        (
            '<tool_call>{"name": "interact_with_env", "arguments": "{\\"content\\": \\"Dates?\\"}"}</tool_call>',
            "tool_call",
            "interact_with_env",
            "Dates?",
        ),
        ("Here is your trip plan.", "text", None, None),
        ("<think>done</think>Here is your plan.", "text", None, None),
    ],
)
def test_valid_actions(text: str, kind: str, name: str | None, content: str | None) -> None:
    action = parse_action(text)
    assert action.kind == kind
    assert action.error is None
    assert action.name == name
    if content is not None:
        assert action.arguments["content"] == content


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty reply"),
        ("<think>only thinking</think>", "empty reply"),
        ("<tool_call>{not json}</tool_call>", "not valid JSON"),
        ('<tool_call>{"name": "interact_with_env", "arguments": {"content": "a"}}', "unbalanced"),
        ('<tool_call>["interact_with_env"]</tool_call>', '"name"'),
        ('<tool_call>{"arguments": {}}</tool_call>', '"name"'),
        ('<tool_call>{"name": "x", "arguments": [1]}</tool_call>', "not a JSON object"),
        ('<tool_call>{"name": "x", "arguments": "oops"}</tool_call>', "not a JSON object"),
        (CALL + CALL, "one tool call per turn, got 2"),
    ],
)
def test_malformed_actions(text: str, reason: str) -> None:
    action = parse_action(text)
    assert action.kind == "malformed"
    assert action.error is not None and reason in action.error
