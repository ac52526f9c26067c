"""API keys and the config: a key is never echoed by an error, and an unset `api_key_env` variable is a
warning for `launcher validate`, an error (exit 2, before any model loads) for `launcher run` and
`python -m trainer`, and no concern of `launcher submit` (the pod gets the key from the Secret; see
tests/launcher/test_launcher_cli.py).

Runs in a folder holding the IntentionGym sample, so that configs/intentiongym.yaml (two API sections,
both naming DASHSCOPE_API_KEY) validates as shipped.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from launcher.cli import app
from trainer.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "intentiongym.yaml"
VAR = "DASHSCOPE_API_KEY"
runner = CliRunner()


def _key(prefix: str = "sk-", n: int = 32) -> str:
    """A realistic key: DashScope's are sk- and 32 alphanumerics."""
    return prefix + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(n))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from trainer.envs.intentiongym_sample import write_sample

    write_sample(tmp_path / "data", train=4, test=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(VAR, raising=False)
    return tmp_path


def _config_with(tmp_path: Path, old: str, new: str) -> Path:
    text = CONFIG.read_text()
    assert old in text
    path = tmp_path / "cfg.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


# ----------------------------------------------------------------------------- a key is never echoed


def _validate(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, ["validate", *args], env=env)
    return result.exit_code, result.stdout + result.stderr


def test_api_key_env_interpolated_to_the_key_is_rejected_without_echoing_it(workdir: Path) -> None:
    key = _key()
    cfg = _config_with(workdir, f"api_key_env: {VAR}", f"api_key_env: ${{{VAR}}}")
    for output in ("text", "json"):
        code, out = _validate(str(cfg), "--output", output, env={VAR: key})
        assert code == 2, out
        assert key not in out and key[3:] not in out
        assert "user_simulator.api_key_env" in out
        assert f"write `api_key_env: {VAR}`, not `${{{VAR}}}`" in out, out
    # Unset, it says the same (not "export DASHSCOPE_API_KEY", which would lead to the error above).
    code, out = _validate(str(cfg))
    assert code == 2 and f"write `api_key_env: {VAR}`, not `${{{VAR}}}`" in out, out


@pytest.mark.parametrize(
    "key",
    [_key(), _key("sk-proj-", 40), _key("AIza", 35), _key("", 40)],
    ids=["dashscope", "openai-project", "google", "bare-alphanumeric"],
)
def test_a_literal_key_in_api_key_env_is_rejected_without_echoing_it(key: str, workdir: Path) -> None:
    # On the command line (the shell expanded $DASHSCOPE_API_KEY) and in the file.
    code, out = _validate(str(CONFIG), "--set", f"judge.api_key_env={key}")
    assert code == 2, out
    assert key not in out and "judge.api_key_env" in out
    assert "wants the name of the environment variable" in out and f"api_key_env: {VAR}" in out
    cfg = _config_with(workdir, f"api_key_env: {VAR}", f"api_key_env: {key}")
    code, out = _validate(str(cfg))
    assert code == 2 and key not in out and "user_simulator.api_key_env" in out, out


def test_the_shell_expanded_key_is_traced_back_to_its_variable(workdir: Path) -> None:
    key = _key()
    code, out = _validate(str(CONFIG), "--set", f"judge.api_key_env={key}", env={VAR: key})
    assert code == 2 and key not in out
    assert f"it is the value of ${VAR}" in out, out


def test_a_key_interpolated_into_any_field_is_hidden(workdir: Path) -> None:
    key = _key()
    cfg = _config_with(workdir, "lr: 1.0e-6", f"lr: ${{{VAR}}}")
    code, out = _validate(str(cfg), env={VAR: key})
    assert code == 2 and "algorithm.lr" in out, out
    assert key not in out and key[3:] not in out


def test_pydantic_errors_never_show_the_input() -> None:
    """Python API users see pydantic's own text, which otherwise quotes every bad input."""
    key = _key()
    raw = {"name": "t", "model": {"path": "m"}, "algorithm": {"name": "sft", "lr": key},
           "data": {"train": {"path": "x.jsonl"}}}  # fmt: skip
    with pytest.raises(ValidationError) as err:
        RunConfig.model_validate(raw)
    assert key not in str(err.value)


def test_ordinary_variable_names_still_pass() -> None:
    for name in ("DASHSCOPE_API_KEY", "OPENAI_API_KEY", "my_relay_key", "KEY2", "_K"):
        cfg = load_config(CONFIG, [f"user_simulator.api_key_env={name}"])
        assert cfg.user_simulator is not None and cfg.user_simulator.api_key_env == name


# ----------------------------------------------------------------------------- unset variables


def test_validate_warns_about_an_unset_key_variable_and_exits_0(workdir: Path) -> None:
    result = runner.invoke(app, ["validate", str(CONFIG)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: user_simulator.api_key_env: environment variable {VAR} is not set: `launcher run` needs it "
        f"(export {VAR}=...); `launcher submit` does not (the pod reads it from the Secret dashscope-api-key)",
        f"warning: judge.api_key_env: environment variable {VAR} is not set: `launcher run` needs it "
        f"(export {VAR}=...); `launcher submit` does not (the pod reads it from the Secret dashscope-api-key)",
    ]
    as_json = runner.invoke(app, ["validate", str(CONFIG), "--output", "json"])
    assert as_json.exit_code == 0
    assert [w.split(":")[0] for w in json.loads(as_json.stdout)["warnings"]] == [
        "user_simulator.api_key_env",
        "judge.api_key_env",
    ]
    quiet = runner.invoke(app, ["validate", str(CONFIG)], env={VAR: _key()})
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr


def test_launcher_run_stops_before_the_trainer_starts(workdir: Path) -> None:
    result = runner.invoke(app, ["run", str(CONFIG)])
    assert result.exit_code == 2, result.output
    assert (
        f"  - user_simulator.api_key_env: environment variable {VAR} is not set (it should hold the API key for "
        "https://dashscope.aliyuncs.com/compatible-mode/v1)" in result.stderr.splitlines()
    ), result.stderr
    assert f"Hint: export {VAR}=... before starting the run" in result.stderr
    assert not (workdir / "runs").exists()  # the trainer never started


def test_python_m_trainer_stops_before_importing_torch(workdir: Path) -> None:
    probe = (
        "import sys\nfrom trainer.__main__ import main\n"
        f"code = main(['--config', {str(CONFIG)!r}])\n"
        "print('torch loaded:', 'torch' in sys.modules)\nsys.exit(code)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != VAR}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=workdir, env=env
    )
    assert out.returncode == 2, out.stderr
    assert "torch loaded: False" in out.stdout
    assert f"judge.api_key_env: environment variable {VAR} is not set" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_section_that_calls_no_api_needs_no_key(workdir: Path) -> None:
    sets = [
        "--set",
        "user_simulator.api_key_env=null",
        "--set",
        "judge.backend=local",
        "--set",
        "judge.path=.",
    ]
    result = runner.invoke(app, ["validate", str(CONFIG), *sets])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
