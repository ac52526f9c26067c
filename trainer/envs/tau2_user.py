"""The simulated customer of tool-domain episodes: its prompt, its stop tokens, and checks for its faults.

Prompt (tau2's ``UserSimulator.system_prompt``, ``src/tau2/user/user_simulator.py``): global simulation
guidelines followed by ``<scenario>`` and the task's rendered user scenario. The guidelines are our own
wording of tau2's ``data/tau2/user_simulator/simulation_guidelines.md`` (same rules, same tokens);
``environment.user_guidelines`` points at tau2's file to use its text verbatim. The conversation is shown
with roles flipped (tau2's ``UserState.flip_roles``): the agent's text messages are the simulator's
``user`` turns, its own earlier messages its ``assistant`` turns; tool calls and results are not shown.
The first turn answers tau2's fixed opening, ``"Hi! How can I help you today?"``.

The simulator ends the episode with a token in its message (``user_simulator_base.py``): ``###STOP###``
(goal reached) and ``###TRANSFER###`` (it was transferred) end it for grading; ``###OUT-OF-SCOPE###``
(the scenario gave it nothing to go on) aborts it, and tau2 does not grade such a run.

Simulator faults. Users report up to 30% of failed tau2 trajectories come from the simulator, not the
agent; training on those would punish the agent for them. ``user_fault`` checks each simulator message
with simple, deliberately conservative rules (a false alarm drops a real failure of the agent from the
loss, so each rule needs the simulator to do something a customer would not):

- ``role_break``: it writes as the agent ("How can I help you today?", "As an AI", "I am the assistant"),
  writes a tool call, or replies nothing.
- ``goal_leak``: it names one of the agent's tools (``cancel_order``), quotes the prompt's scaffolding
  ("<scenario>", "Task instructions:"), or copies ``LEAK_WORDS`` or more consecutive words of its
  instructions verbatim (they are written in the second person: "You want to cancel ...").
- ``premature_stop``: it stops in its opening message, transfers itself although the agent called no
  transfer tool, or says ``###STOP###`` instead of answering the agent's request for confirmation ("Shall I
  cancel it?") while the task still needs a change the agent has not made (no write yet, DB not in the gold
  state): "agreeing to an action is not the same as the action being completed" (tau2's guidelines). A stop
  after a wrong write, a refusal or "anything else?" is the agent's outcome and is graded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from trainer.errors import UserError
from trainer.llm.parsing import strip_thinking
from trainer.llm.types import Message

STOP = "###STOP###"
TRANSFER = "###TRANSFER###"
OUT_OF_SCOPE = "###OUT-OF-SCOPE###"
FIRST_AGENT_MESSAGE = "Hi! How can I help you today?"  # tau2's DEFAULT_FIRST_AGENT_MESSAGE
LEAK_WORDS = 10
FAULT_CHECKS = ("role_break", "goal_leak", "premature_stop")

GUIDELINES = """# User simulation guidelines
You play a customer contacting a customer service agent. Simulate a realistic customer while following the
scenario instructions you are given.

## Principles
- Write one message at a time, as the customer, in a natural conversational flow.
- Follow the scenario instructions strictly. Do not invent information the scenario does not give you: treat
  anything not provided as unknown to you.
- Do not repeat the instructions verbatim: put them in your own words.
- Reveal information progressively: give a detail when the agent asks for it.

## Ending the conversation
- Keep the conversation going until the task is done. Agreeing to an action is not the same as the action
  being completed: when the agent offers to do something, wait until it confirms it is done.
- Before ending, check that every request in your instructions has been handled, not only some of them.
- When your goal is reached, write the token ###STOP### to end the conversation.
- If you are transferred to another agent, write the token ###TRANSFER###.
- If the scenario does not give you enough information to continue, write the token ###OUT-OF-SCOPE###."""


def system_prompt(scenario: str, guidelines: str = GUIDELINES) -> str:
    """tau2's user ``SYSTEM_PROMPT``: the guidelines, then the scenario."""
    return f"{guidelines.replace('<PERSONA_GUIDELINES>', '')}\n\n<scenario>\n{scenario}\n</scenario>"


def load_guidelines(path: str | None) -> str:
    if path is None:
        return GUIDELINES
    p = Path(path)
    if not p.is_file():
        raise UserError(f"environment.user_guidelines: {path}", "file not found",
                        hint="e.g. <tau2-bench>/data/tau2/user_simulator/simulation_guidelines.md")  # fmt: skip
    return p.read_text(encoding="utf-8").strip()


def simulator_messages(system: str, dialogue: Sequence[tuple[str, str]]) -> list[Message]:
    """The simulator's view of ``dialogue`` (``(speaker, text)`` with speaker ``agent`` or ``user``): roles flipped."""
    flipped = [{"role": "user" if who == "agent" else "assistant", "content": text} for who, text in dialogue]
    return [{"role": "system", "content": system}, *flipped]


def parse_reply(text: str) -> str:
    """The simulator's message without a think block. An empty reply is a failed call (retried, then invalid)."""
    reply = strip_thinking(text)
    if not reply:
        raise ValueError("empty reply")
    return reply


def stop_token(text: str) -> str | None:
    """The ending token in a message; out-of-scope first, as tau2's ``USER_STOP_TOKENS`` order it (a message with
    both an abort and a stop is an abort)."""
    for token in (OUT_OF_SCOPE, STOP, TRANSFER):
        if token in text:
            return token
    return None


# ----------------------------------------------------------------------------- fault checks

_AGENT_VOICE = re.compile(
    r"how (can|may) i (help|assist) you|\bas an ai\b|\bi(?:'m| am) (?:an? |the |your )?(?:ai|assistant|language model|"
    r"customer service (?:agent|representative))\b|^\s*(?:assistant|agent)\s*:",
    re.IGNORECASE | re.MULTILINE,
)
_TOOL_MARKUP = re.compile(r"<tool_call>|\"arguments\"\s*:|\"name\"\s*:\s*\"")
_SCAFFOLD = re.compile(
    r"<\s*/?\s*scenario\s*>|\b(?:task instructions|reason for call|known info|unknown info)\s*:|"
    r"\b(?:task_instructions|reason_for_call|known_info|unknown_info)\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"[a-z0-9']+")


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def role_break(text: str) -> str | None:
    if not text.strip():
        return "empty message"
    if _TOOL_MARKUP.search(text):
        return "wrote a tool call"
    m = _AGENT_VOICE.search(text)
    return f"wrote as the agent ({m.group(0).strip()!r})" if m else None


def goal_leak(
    text: str, tool_names: Sequence[str], instructions: Sequence[str], n: int = LEAK_WORDS
) -> str | None:
    # Only names a customer would not say by chance: tau2's `calculate` or `think` are plain words.
    for name in tool_names:
        if "_" in name and re.search(rf"\b{re.escape(name)}\b", text):
            return f"named the agent's tool {name}"
    m = _SCAFFOLD.search(text)
    if m:
        return f"quoted the prompt ({m.group(0)!r})"
    said = _ngrams(text, n)
    for ins in instructions:
        copied = said & _ngrams(ins, n)
        if copied:
            return f"copied its instructions verbatim ({' '.join(next(iter(copied)))!r})"
    return None


_CONFIRM = re.compile(
    r"\b(?:shall|should|may|can) i\b|\b(?:do|would) you (?:want|like) me to\b|\bconfirm\b|\bproceed\b|\byes\b",
    re.IGNORECASE,
)


def asks_confirmation(agent_text: str) -> bool:
    """The agent's message ends by asking the customer to approve an action (not "anything else?")."""
    text = agent_text.strip()
    return text.endswith("?") and bool(_CONFIRM.search(text)) and "anything else" not in text.lower()


def premature_stop(token: str, opening: bool, awaiting_confirmation: bool, change_pending: bool,
                   agent_transferred: bool) -> str | None:  # fmt: skip
    """``change_pending``: the task's gold state needs a DB change and the agent has made no change yet."""
    if token == OUT_OF_SCOPE:
        return None  # its own category (always excluded), not a premature stop
    if opening:
        return f"ended the conversation in its opening message ({token})"
    if token == TRANSFER and not agent_transferred:
        return "claimed a transfer the agent never made"
    if token == STOP and awaiting_confirmation and change_pending:
        return "stopped instead of answering the agent's request for confirmation, before the task was done"
    return None
