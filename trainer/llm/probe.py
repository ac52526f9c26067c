"""``check_endpoints``: every configured API endpoint answers and takes its key before a run's first step.

Without it a dead ``api_base`` or a wrong key shows up only as invalid episodes, and not at all when the agent
never calls the tool that reaches the API (0 calls, reward 0, exit 0: issue 12). ``EpisodeRunner`` calls it
when it starts (training and ``launcher eval``)::

    loop.run(check_endpoints(clients))   # raises UserError naming the role, the URL and the cause

Each client's ``probe`` (``ApiClient.probe``: ``GET /models``, or a 1-token completion where the list is not
served) runs where its calls run, in the API worker process. Clients without a ``probe`` (the local
backend, test doubles) are skipped; clients sharing an endpoint, key variable, model and ``extra_body`` are
probed once.
Imports nothing heavy.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from trainer.errors import UserError
from trainer.llm.types import DEFAULT_API_BASE, ProbeResult


async def check_endpoints(clients: Sequence[Any]) -> None:
    """Probe each distinct endpoint of ``clients`` at once; raise one ``UserError`` for all that failed."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for client in clients:
        if getattr(client, "probe", None) is None:
            continue
        cfg = client.cfg
        key = (cfg.api_base, cfg.api_key_env, client.model, json.dumps(cfg.extra_body, sort_keys=True))
        groups.setdefault(key, []).append(client)
    shared = list(groups.values())
    results: list[ProbeResult] = await asyncio.gather(*(group[0].probe() for group in shared))
    failed = []
    for group, res in zip(shared, results, strict=True):
        if res.warning:
            print(f"warning: start-up check of {res.warning}", file=sys.stderr, flush=True)
        if not res.ok:
            failed.append((group, res))
    if not failed:
        return
    sources = [f"{c.role}.api_base" for group, _ in failed for c in group]
    problems = [_problem(group[0], res) for group, res in failed]
    hints = list(dict.fromkeys(_hint(group[0], res) for group, res in failed))
    raise UserError(", ".join(sources), problems, hint="; ".join(hints))


def _problem(client: Any, res: ProbeResult) -> str:
    base = client.cfg.api_base or DEFAULT_API_BASE
    env = client.cfg.api_key_env
    what = {
        "connection": f"cannot reach {base}",
        "timeout": f"{base} did not answer",
        "auth": f"{base} refused the key" + (f" in {env}" if env else " (none sent: api_key_env is not set)"),
        "not_found": f"{base} has no such route or model ({client.model})",
        "bad_request": f"{base} refused a 1-token request with these settings",
    }.get(res.kind or "", f"{base} failed its start-up check")
    status = f"HTTP {res.status}: " if res.status else ""
    return f"{what}: {status}{res.reason} ({res.checked})"


def _hint(client: Any, res: ProbeResult) -> str:
    role, base = client.role, client.cfg.api_base or DEFAULT_API_BASE
    env = client.cfg.api_key_env
    if res.kind == "connection":
        return (
            f"check that the server at {base} runs and is reachable from here, and {role}.api_base "
            "(scheme, host, port, the /v1 suffix)"
        )
    if res.kind == "timeout":
        return f"check the network path to {base} (proxy, firewall) or raise {role}.timeout_s"
    if res.kind == "auth":
        if env is None:
            return f"set {role}.api_key_env to the variable that holds the key for {base}"
        return f"check the key in {env}: is it for {base}, valid, with quota left?"
    if res.kind == "not_found":
        return f"check {role}.api_base (OpenAI-compatible servers want it to end in /v1) and {role}.model"
    if res.kind == "bad_request":
        return f"check {role}.model and {role}.extra_body against the server's answer above"
    return "see the error above; USERLOOP_DEBUG=1 shows more"
