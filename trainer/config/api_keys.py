"""API keys and the config: which variables a run reads its keys from, reading one, and keeping keys out
of messages.

A config never holds a key: ``api_key_env`` names the environment variable that does (configs are copied
into checkpoints, ConfigMaps and logs). Who needs the variable set: the trainer (``python -m trainer``,
``launcher run``: ``check_paths`` fails early without it), the API worker (``read_api_key``); not
``launcher submit``, whose pod gets the variable from the Secret ``cluster.api_key_secret``; ``launcher
validate`` only warns. Imports nothing heavy, like the rest of ``trainer.config``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

# Sections of the run config that may call an OpenAI-compatible API with a key.
API_SECTIONS = ("user_simulator", "judge")
# Variable names that hold secrets (also what the launcher scans rendered manifests for).
SECRET_NAME = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Prefixes of the keys of common providers and relays (OpenAI, DashScope, Anthropic, Google, Hugging Face,
# GitHub, Groq, xAI, GitLab), each followed by a long random part.
_KEY_SHAPED = re.compile(
    r"\b(?:sk|gsk|xai|glpat)[-_][A-Za-z0-9_-]{16,}"
    r"|\bAIza[A-Za-z0-9_-]{30,}"
    r"|\b(?:hf|gh[pousr]|github_pat)_[A-Za-z0-9_]{20,}"
)
# A long run of letters and digits: random, not words joined by '_' as variable names are.
_RANDOM_RUN = re.compile(r"[A-Za-z0-9]{20,}")


def api_key_vars(cfg: Any) -> dict[str, str]:
    """``{"user_simulator.api_key_env": "DASHSCOPE_API_KEY", ...}``: every section of ``cfg`` that calls an
    API and names a key variable (the trainer builds a client, and reads the key, for each)."""
    wanted = {}
    for role in API_SECTIONS:
        section = getattr(cfg, role, None)
        env = getattr(section, "api_key_env", None)
        if env and getattr(section, "backend", "api") == "api":
            wanted[f"{role}.api_key_env"] = env
    return wanted


def _unset(section: Any, environ: Mapping[str, str]) -> str | None:
    """The problem with ``section``'s key variable, or None when it is set (or names none)."""
    if section.api_key_env is None or environ.get(section.api_key_env):
        return None
    base = section.api_base or "api.openai.com"
    return f"environment variable {section.api_key_env} is not set (it should hold the API key for {base})"


def unset_api_keys(cfg: Any, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{field: problem}`` for each key variable of ``cfg`` that is unset or empty."""
    environ = os.environ if environ is None else environ
    problems = {}
    for field in api_key_vars(cfg):
        problem = _unset(getattr(cfg, field.split(".")[0]), environ)
        if problem:
            problems[field] = problem
    return problems


def read_api_key(section: Any, role: str) -> str:
    """The API key of an ``ApiBackendConfig`` from the variable it names; "none" when it names none.

    Read in each process that needs it (the trainer, to redact; the API worker, to send): the key travels
    through the environment only, never through a config, a message between processes, a log or a file.
    """
    from trainer.errors import UserError

    if section.api_key_env is None:
        # Local OpenAI-compatible servers ignore the key, but the OpenAI client insists on one.
        return "none"
    problem = _unset(section, os.environ)
    if problem:
        raise UserError(
            f"{role}.api_key_env", problem, hint=f"export {section.api_key_env}=... before starting the run"
        )
    return os.environ[section.api_key_env]


def looks_like_key(value: str) -> bool:
    """Whether ``value`` is shaped like an API key rather than a variable name (``DASHSCOPE_API_KEY``)."""
    if _KEY_SHAPED.search(value):
        return True
    for run in _RANDOM_RUN.findall(value):
        # Two of three marks of randomness: "DASHSCOPEAPIKEY2024" has one (digits), a hex key two.
        marks = (run != run.upper() and run != run.lower()) + any(c.isdigit() for c in run) + (len(run) >= 32)
        if marks >= 2:
            return True
    return False


def variable_holding(value: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The name of an environment variable whose value is ``value`` (secret-looking names first)."""
    environ = os.environ if environ is None else environ
    if len(value) < 8:
        return None
    names = sorted((n for n, v in environ.items() if v == value), key=lambda n: not SECRET_NAME.search(n))
    return names[0] if names else None


def hide_keys(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with API keys replaced by ``[hidden]``: the values of secret-named environment variables
    (a ``${DASHSCOPE_API_KEY}`` lands the key in any field) and anything shaped like a provider's key."""
    environ = os.environ if environ is None else environ
    for name, value in environ.items():
        if len(value) >= 8 and SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "[hidden]")
    return _KEY_SHAPED.sub("[hidden]", text)
