"""Config sections of issue 3: every field documented, keys never inline, cross-field checks."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from trainer.config.multiturn import (
    ApiBackendConfig,
    EnvironmentConfig,
    JudgeConfig,
    LlmJudgeReward,
    UserSimulatorConfig,
)


@pytest.mark.parametrize(
    "model", [ApiBackendConfig, UserSimulatorConfig, JudgeConfig, EnvironmentConfig, LlmJudgeReward]
)
def test_every_field_has_a_description(model: type[BaseModel]) -> None:
    missing = [name for name, f in model.model_fields.items() if not f.description and name not in ("type",)]
    assert missing == []


def test_defaults() -> None:
    user = UserSimulatorConfig(
        model="qwen-plus", api_base="https://dashscope.aliyuncs.com/compatible-mode/v1"
    )
    assert user.max_invalid_rate == 0.2 and user.backend == "api" and user.retries >= 1
    judge = JudgeConfig(model="qwen-plus")
    assert judge.temperature == 0.0  # verdicts are greedy and cacheable
    env = EnvironmentConfig(name="intentiongym", intentions="x.json")
    assert env.max_turns == 16 and env.score == "mean" and env.judge_backend == "api" and not env.merged


@pytest.mark.parametrize("key", ["api_key", "API_KEY", "token"])
def test_inline_key_is_rejected(key: str) -> None:
    with pytest.raises(ValidationError) as err:
        UserSimulatorConfig.model_validate({"model": "qwen-plus", key: "sk-123"})
    text = str(err.value)
    assert "api_key_env" in text and "environment variable" in text
    assert "sk-123" not in text.split("input_value")[0]  # the message itself does not echo the key


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        (UserSimulatorConfig, {"backend": "api"}, "model is not set"),
        (UserSimulatorConfig, {"backend": "local"}, "path is not set"),
        (UserSimulatorConfig, {"model": "m", "budget": 5}, "prices are 0"),
        # The value is never quoted (it is often the key itself): the message says what is wanted instead.
        (UserSimulatorConfig, {"model": "m", "api_key_env": "not a name"}, "is not a variable name"),
        (UserSimulatorConfig, {"model": "m", "max_concurrency": 0}, "greater than or equal to 1"),
        (UserSimulatorConfig, {"model": "m", "unknown": 1}, "Extra inputs"),
        (EnvironmentConfig, {"name": "intentiongym"}, "intentions is not set"),
        (
            EnvironmentConfig,
            {"name": "intentiongym", "intentions": "x", "merged": True, "judge_backend": "rule"},
            "merged",
        ),
        (EnvironmentConfig, {"score": "median"}, "sum"),
        (
            LlmJudgeReward,
            {"type": "llm_judge", "rubric": "r", "min_score": 5, "max_score": 5},
            "greater than",
        ),
    ],
)
def test_invalid_sections(model: type[BaseModel], data: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        model.model_validate(data)


def test_config_module_stays_light() -> None:
    import subprocess
    import sys

    code = "import sys, trainer.config.multiturn, trainer.envs, trainer.llm; print(sorted(m for m in ('torch', 'litellm', 'transformers') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
