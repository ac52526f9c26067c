"""Config loading: every error names the field path, the bad value and what is allowed; CLI exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from launcher.cli import app
from trainer.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
BASE = {
    "name": "t",
    "model": {"path": "m"},
    "algorithm": {"name": "grpo"},
    "data": {"train": {"path": "x.jsonl"}},
    "rewards": [{"type": "accuracy"}],
}


def _error(overrides: list[str], raw: dict | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(dict(raw or BASE), overrides)
    return e.value.render()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["algorithm.lrr=1e-3"], "algorithm.lrr: unknown key (did you mean 'lr'?)"),
        (["algorithm.lr=-1"], "algorithm.lr: -1: Input should be greater than 0"),
        (["algorithm.lr=fast"], "algorithm.lr: 'fast': Input should be a valid number"),
        (["algorithm.group_size=0"], "algorithm.group_size: 0: Input should be greater than or equal to 1"),
        (["algorithm.group_size=1"], "algorithm: group_size is 1, but GRPO normalises rewards"),
        (["algorithm.name=dpo"], "algorithm.name: 'dpo': Input should be 'sft', 'grpo' or 'ppo'"),
        (["model.lora.r=0"], "model.lora.r: 0: Input should be greater than or equal to 1"),
        (
            ["rollout.temperature=-0.5"],
            "rollout.temperature: -0.5: Input should be greater than or equal to 0",
        ),
        (["rewards.0.wieght=2"], "rewards.0.wieght: unknown key (did you mean 'weight'?)"),
        (["rewards.0.type=magic"], "rewards.0.type: 'magic' is not a known type"),
        (["name=Bad_Name"], "name: 'Bad_Name': String should match pattern"),
        (["checkpoint.save_every_steps=5", "checkpoint.save_every_epochs=1"], "set either save_every_steps"),
        (["eval.every_steps=5"], "eval.every_steps/every_epochs is set but data.val is not"),
        (["rewards=[]"], "GRPO needs at least one entry in `rewards`"),
        (["rewards.5.weight=1"], "--set rewards.5.weight: '5' is not an index of a list of 1"),
        (["nonsense"], "--set 'nonsense': expected dotted.key=value"),
        (["data.generate={task: seat-booking}"], "seat-booking writes IntentionGym data"),
    ],
)
def test_errors_name_the_field(overrides: list[str], expected: str) -> None:
    assert expected in _error(overrides)


def test_all_problems_are_reported_at_once() -> None:
    message = _error(["algorithm.lr=-1", "model.lora.r=0", "algorithm.lrr=1"])
    assert "3 problems" in message


def test_missing_required_field() -> None:
    raw = {k: v for k, v in BASE.items() if k != "model"}
    assert "model: required field is missing" in _error([], raw)


def test_env_interpolation_and_name_template(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_DIR", "/models/q")
    cfg = parse_config({**BASE, "model": {"path": "${MODEL_DIR}/x"}, "output_dir": "out/{name}"})
    assert cfg.model.path == "/models/q/x"
    assert cfg.output_dir == "out/t"
    monkeypatch.delenv("MODEL_DIR")
    assert "model.path: environment variable MODEL_DIR is not set" in _error(
        [], {**BASE, "model": {"path": "${MODEL_DIR}"}}
    )
    cfg = parse_config({**BASE, "model": {"path": "${MODEL_DIR:-fallback}"}})
    assert cfg.model.path == "fallback"


def test_overrides_parse_yaml_values() -> None:
    cfg = parse_config(
        dict(BASE), ["algorithm.lr=3e-4", "model.lora.enabled=true", "model.lora.target_modules=[q_proj]"]
    )
    assert cfg.algorithm.lr == 3e-4
    assert cfg.model.lora.enabled is True
    assert cfg.model.lora.target_modules == ["q_proj"]


def test_yaml_syntax_error_has_a_line_number(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel:\n  path: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "invalid YAML: line" in e.value.render()


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(empty)


def test_every_shipped_config_validates() -> None:
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


runner = CliRunner()


def test_cli_validate_exit_2_and_message(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["validate", str(REPO / "configs" / "quickstart.yaml"), "--set", "algorithm.lr=-1"]
    )
    assert result.exit_code == 2
    assert "Error:" in result.stderr and "algorithm.lr: -1" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_validate_missing_files(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["validate", str(REPO / "configs" / "quickstart.yaml"), "--set", "data.generate=null",
         "--set", "data.train.path=/nope/train.jsonl"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "data.train.path: '/nope/train.jsonl': file not found" in result.stderr
    result = runner.invoke(app, ["validate", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "missing.yaml: file not found" in result.stderr


def test_cli_validate_ok() -> None:
    result = runner.invoke(app, ["validate", str(REPO / "configs" / "quickstart.yaml")])
    assert result.exit_code == 0, result.stderr
    assert "ok (grpo" in result.stdout


def test_readme_config_reference_is_current() -> None:
    from trainer.config.reference import embed

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert embed(readme) == readme, "README's config reference is stale: run `make docs`"


def test_cli_validate_intentiongym_without_data_names_where_it_comes_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "intentiongym.yaml")
    result = runner.invoke(app, ["validate", config])
    assert result.exit_code == 2
    assert "data.train.path: 'data/intention_multiturn/train.parquet': file not found" in result.stderr
    (hint,) = [line for line in result.stderr.splitlines() if line.startswith("Hint: ")]
    assert "UserRL's release (github.com/SalesforceAIResearch/UserRL)" in hint, hint
    assert "`python -m trainer.envs.intentiongym_sample --out data`" in hint, hint
    # The command the hint names writes exactly the files the config expects.
    subprocess.run([sys.executable, "-m", "trainer.envs.intentiongym_sample", "--out", "data"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=120)  # fmt: skip
    assert runner.invoke(app, ["validate", config]).exit_code == 0


def test_the_sample_hint_follows_the_configured_folder(tmp_path: Path) -> None:
    where = tmp_path / "ig"
    sets = [f"data.train.path={where}/intention_multiturn/train.parquet",
            f"data.val.path={where}/intention_multiturn/test.parquet",
            f"environment.intentions={where}/intentiongym/all_intentions_train.json",
            f"environment.val_intentions={where}/intentiongym/all_intentions_test.json"]  # fmt: skip
    args = ["validate", str(REPO / "configs" / "intentiongym.yaml"), *[x for s in sets for x in ("--set", s)]]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert f"`python -m trainer.envs.intentiongym_sample --out {where}`" in result.stderr
    # Paths that do not follow the sample's layout: the hint says which paths to point where.
    result = runner.invoke(app, [*args, "--set", f"data.val.path={where}/elsewhere.parquet"])
    assert "--out DIR` (then point data.*.path and environment.*intentions at DIR/" in result.stderr, (
        result.stderr
    )
