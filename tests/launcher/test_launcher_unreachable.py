"""Every cluster command against an API server that cannot be reached: one `Error:` line naming the
server's URL and the cause, a `Hint:`, exit 1, no traceback, and no long urllib3 retries.

The servers are real sockets on 127.0.0.1: a port nobody listens on (connection refused), the HTTP test
double addressed as https (TLS handshake fails), and a listener that accepts and never answers (timeout).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from launcher_k8s_double import K8sDouble
from launcher_paths import DATA, REPO
from typer.testing import CliRunner

import launcher.cluster
from launcher.cli import app

runner = CliRunner()
CONFIG = str(DATA / "sidecar.yaml")
# A real submission needs published images (the defaults are placeholders: see test_launcher_cli.py).
IMAGES = ["--set", "cluster.image=registry.example.com/team/userloop-trainer:0.1.0",
          "--set", "cluster.sglang_image=registry.example.com/team/userloop-sglang:v0.5.19-cu129"]  # fmt: skip

COMMANDS = {
    "submit": ["submit", CONFIG, *IMAGES],
    "doctor": ["doctor", CONFIG],
    "doctor-without-config": ["doctor"],
    "status": ["status", "sidecar-020304ab"],
    "delete": ["delete", "sidecar-020304ab"],
    "list": ["list"],
    "logs": ["logs", "sidecar-020304ab"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "tester", "namespace": "userloop"}}],
    }))  # fmt: skip
    return path


def _invoke(args: list[str], kubeconfig: Path) -> Any:
    # catch_exceptions=False: an exception that escapes the command fails the test instead of passing as exit 1.
    return runner.invoke(app, [*args, "--kubeconfig", str(kubeconfig)], catch_exceptions=False)


def _assert_one_error(output: str, url: str, cause: str) -> None:
    # `info:` lines are the offline checks' summary (submit's memory plan), printed before any cluster call.
    lines = [line for line in output.splitlines() if not line.startswith("info: ")]
    assert len(lines) == 2, output
    error, hint = lines
    assert error.startswith("Error: ") and f"cannot reach the API server {url}: {cause}" in error, output
    assert hint.startswith("Hint: ") and "kubectl cluster-info" in hint and "context dead" in hint, output
    assert "Traceback" not in output and "MaxRetryError" not in output


@pytest.mark.parametrize("command", list(COMMANDS), ids=list(COMMANDS))
def test_a_refused_connection_is_one_error_naming_the_server(command: str, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    result = _invoke(COMMANDS[command], _kubeconfig(tmp_path / "kubeconfig", url))
    assert result.exit_code == 1, result.output
    _assert_one_error(result.output, url, "connection refused")


def test_a_refused_connection_prints_no_traceback_from_the_real_entry_point(tmp_path: Path) -> None:
    """Typer prints its rich traceback only outside CliRunner: run the installed entry point."""
    url = f"http://127.0.0.1:{_free_port()}"
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", url)
    for args in (COMMANDS["status"], COMMANDS["submit"]):
        out = subprocess.run(
            [sys.executable, "-m", "launcher", *args, "--kubeconfig", str(kubeconfig)],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )  # fmt: skip
        assert out.returncode == 1, out.stderr
        _assert_one_error(out.stderr, url, "connection refused")


def test_a_tls_failure_says_tls(tmp_path: Path) -> None:
    double = K8sDouble().start()  # speaks plain HTTP: a TLS client's handshake fails
    try:
        url = double.url.replace("http://", "https://")
        result = _invoke(COMMANDS["status"], _kubeconfig(tmp_path / "kubeconfig", url))
    finally:
        double.stop()
    assert result.exit_code == 1, result.output
    _assert_one_error(result.output, url, "TLS handshake failed")
    assert "certificate-authority" in result.output


@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """Accepts connections and never answers; the list holds every connection accepted."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        server.close()
        for conn in accepted:
            conn.close()


@pytest.mark.parametrize("command", ["status", "delete", "list", "doctor"])
def test_a_silent_server_times_out_once_without_retries(
    command: str,
    silent_server: tuple[str, list[socket.socket]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The real limits are 10 s to connect and 60 s to read; the test shortens the wait, not the logic.
    monkeypatch.setattr(launcher.cluster, "REQUEST_TIMEOUT", (2, 0.3))
    url, accepted = silent_server
    result = _invoke(COMMANDS[command], _kubeconfig(tmp_path / "kubeconfig", url))
    assert result.exit_code == 1, result.output
    _assert_one_error(result.output, url, "no answer within 0.3 s")
    # urllib3's default would have sent the request 4 times (3 retries), each waiting the full timeout.
    assert len(accepted) == 1
