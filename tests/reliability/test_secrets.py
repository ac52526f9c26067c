"""A marker API key, used for real, appears in nothing a local run, a render or a dry-run submit produces.

The key sits in the variable the config names (``DASHSCOPE_API_KEY`` for both ``user_simulator`` and
``judge`` in configs/intentiongym.yaml). The run goes through the real chain on 127.0.0.1::

    launcher run -> python -m trainer -> FaultProxy -> ScoreUpstream (scripts/soak.py) -> transformers serve

with faults scripted so that calls fail in every way that produces an error message: injected 500,
429, cut-off JSON and a dropped connection at the proxy, and a 401 and a 500 from the upstream whose
error messages *quote the Authorization header*, as careless relays do. The remaining calls succeed
and are cached (the judge runs at temperature 0). Then every byte produced is searched for the key,
its random part and its base64 form. The upstream must have received the key as a Bearer token,
so a run that never used it cannot pass.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "intentiongym.yaml"
KEY_ENV = "DASHSCOPE_API_KEY"  # what configs/intentiongym.yaml names for both API sections


def _launcher(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args], capture_output=True, env=env, timeout=240, cwd=REPO
    )


def _sets(overrides: list[str]) -> list[str]:
    return [x for item in overrides for x in ("--set", item)]


def _blobs(path: Path) -> Iterator[tuple[str, bytes]]:
    """Every file under ``path`` as bytes, and each member of a zip (``torch.save``) decompressed too."""
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        data = f.read_bytes()
        yield str(f), data
        if zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                for name in z.namelist():
                    yield f"{f}!{name}", z.read(name)


def _dicts(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            yield from _dicts(item)


def test_the_api_key_never_leaves_the_environment(
    tmp_path: Path, tiny_model: Path, chain: Any, soak: ModuleType
) -> None:
    """``chain``: the conftest's ``Chain`` (server, upstream, proxy)."""
    server, upstream, proxy = chain.server, chain.upstream, chain.proxy
    marker = f"sk-MARKER-{secrets.token_hex(12)}"
    env = dict(os.environ, **{KEY_ENV: marker}, PYTHONUNBUFFERED="1")
    overrides = [
        *soak.run_overrides(
            tmp_path, tiny_model, f"{proxy.url}/v1", server.model, key_env=KEY_ENV, max_steps=2, timeout_s=5.0
        ),  # fmt: skip
        "checkpoint.save_every_steps=1",  # a checkpoint (config.yaml, training_state.pt) at each step
        "user_simulator.invalid_window=4",
    ]
    # The first five requests that reach the upstream fail with a message quoting the key: four 401s
    # (not retried) and a 500 (retried).
    upstream.echo_key_errors(401, 401, 401, 401, 500)
    # Step 1's four judge calls start together: their first attempts get the proxy's four faults, their
    # retries (retries=1) the upstream's four 401s, so all four fail with a key-quoting message. In step 2
    # the first request gets the key-quoting 500 and is retried; all four calls succeed and are cached.
    proxy.script("server_error", "rate_limit", "malformed", "drop")

    run = _launcher(["run", str(CONFIG), *_sets(overrides)], env)
    out_dir = tmp_path / "run"
    assert run.returncode == 0, (run.stdout[-3000:] + run.stderr[-3000:]).decode(errors="replace")

    render_dir = tmp_path / "rendered"
    render = _launcher(
        ["render", str(CONFIG), *_sets(overrides), "--run-name", "intentiongym-secrets", "--out-dir",
         str(render_dir)], env,
    )  # fmt: skip
    assert render.returncode == 0, render.stderr.decode(errors="replace")
    # submit (--dry-run too) refuses the default images, placeholders nobody publishes.
    images = ["cluster.image=registry.example.com/team/userloop-trainer:0.1.0"]
    dry = _launcher(["submit", "--dry-run", str(CONFIG), *_sets(overrides), *_sets(images)], env)
    assert dry.returncode == 0, dry.stderr.decode(errors="replace")

    # The key was really used: every request carried it, and the upstream saw it as a Bearer token.
    stats = proxy.stats()
    assert stats["requests"] > 0 and stats["with_authorization"] == stats["requests"]
    assert f"Bearer {marker}" in upstream.authorizations
    # Calls failed (with messages quoting the key) and calls succeeded (and were cached).
    last = json.loads((out_dir / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2
    assert (last["api/calls"], last["api/failed"]) == (8, 4) and last["api/retries"] >= 5
    with sqlite3.connect(out_dir / "api_cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] >= 1
    assert (out_dir / "checkpoints" / "step_2" / "config.yaml").is_file()
    # The render produced what a submission sends: a ConfigMap with the run config, a job taking the key
    # from the Secret the config names.
    docs = [d for f in sorted(render_dir.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "PyTorchJob"} <= kinds, kinds
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    refs = [e.get("valueFrom") for e in _dicts(job) if e.get("name") == KEY_ENV]
    assert refs and all(r == {"secretKeyRef": {"name": "dashscope-api-key", "key": "api-key"}} for r in refs)

    needles = {
        "the key": marker.encode(),
        "its random part": marker.split("-")[-1].encode(),
        "its base64": base64.b64encode(marker.encode()),
    }
    places: list[tuple[str, bytes]] = [
        (f"{name} {stream}", getattr(proc, stream))
        for name, proc in (("launcher run", run), ("launcher render", render), ("submit --dry-run", dry))
        for stream in ("stdout", "stderr")
    ]
    places += list(_blobs(out_dir)) + list(_blobs(render_dir))
    searched = {p for p, _ in places}
    for must in ("metrics.jsonl", "episodes.jsonl", "train.log", "api_cache.sqlite", "config.yaml",
                 "training_state.pt", "configmap"):  # fmt: skip
        assert any(must in p.lower() for p in searched), (
            f"nothing named {must} was searched: {sorted(searched)}"
        )
    leaks = [
        f"{what} in {where}" for where, data in places for what, needle in needles.items() if needle in data
    ]
    assert leaks == []
    # The key-quoting error messages were really produced and kept, redacted, in the episode log.
    episodes = [json.loads(line) for line in (out_dir / "logs" / "episodes.jsonl").read_text().splitlines()]
    failed = [e["invalid"] for e in episodes if e["step"] == 1]
    assert failed and all("auth 401" in why and "Bearer [REDACTED]" in why for why in failed), failed
