"""The Python API: the same actions as the CLI, for notebooks and agent frameworks.

Each returns a result object whose ``to_dict()`` is the JSON the CLI prints
(``{"status": "success", ...}``); errors the user can fix raise ``trainer.errors.UserError``.

    from trainer.config import load_config
    from trainer import api
    cfg = load_config("configs/quickstart.yaml", ["algorithm.max_steps=10"])
    print(api.train(cfg).to_dict())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.config.schema import RunConfig
from trainer.errors import UserError


@dataclass
class DataResult:
    path: str
    format: str
    rows: int
    columns: dict[str, str]
    example: dict[str, Any]
    status: str = "success"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResult:
    checkpoint: str
    samples: int
    reward: float
    accuracy: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "success"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train(cfg: RunConfig):
    """Run the configured algorithm; returns ``trainer.session.TrainResult``."""
    if cfg.algorithm.name == "sft":
        from trainer.sft import train as run
    else:
        from trainer.grpo import train as run
    return run(cfg)


def inspect_data(cfg: RunConfig, split: str = "train") -> DataResult:
    from trainer.data import load_dataset

    if cfg.data.generate is not None:
        from trainer.tasks import write_task_files

        g = cfg.data.generate
        write_task_files(g.task, cfg.data.train.path, cfg.data.val.path if cfg.data.val else None,
                         g.train_size, g.val_size, g.seed)  # fmt: skip
    ds = load_dataset(cfg.data, split)
    first = ds.rows[0]
    example = {"prompt": first["prompt"], "response": first["response"], "answer": first["answer"]}
    return DataResult(path=ds.path, format=ds.format, rows=len(ds), columns=ds.columns, example=example)


def evaluate(cfg: RunConfig, checkpoint: str | Path, max_samples: int | None = None) -> EvalResult:
    """Accuracy and mean reward of ``checkpoint`` (a ``step_N`` dir or its ``policy/``) on ``data.val``."""
    import torch

    from trainer.data import load_dataset
    from trainer.engines import build_engine
    from trainer.evaluate import evaluate_rows, summarize
    from trainer.model import load_policy, load_tokenizer, quiet_libraries
    from trainer.prompts import check_chat_template, encode_prompt
    from trainer.rewards import build_rewards

    if cfg.environment.name != "single_turn":
        raise UserError(
            f"environment.name: {cfg.environment.name}",
            "`launcher eval` scores single-turn completions; multi-turn episodes are evaluated during training",
            hint="set eval.every_epochs or eval.every_steps and read eval/reward in logs/metrics.jsonl",
        )
    quiet_libraries()
    path = Path(checkpoint)
    policy_dir = path / "policy" if (path / "policy").is_dir() else path
    if not policy_dir.is_dir():
        raise UserError(
            f"--checkpoint {checkpoint}", "directory not found", hint="pass runs/<name>/checkpoints/step_N"
        )
    if cfg.data.val is None:
        raise UserError("data.val", "evaluation needs a validation set")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(policy_dir)
    if cfg.data.use_chat_template:
        check_chat_template(tokenizer, str(policy_dir))
    model = load_policy(cfg.model, device, policy_dir).eval()
    rows = load_dataset(cfg.data, "val").rows
    limit = max_samples or cfg.eval.max_samples
    rows = rows[:limit] if limit else rows
    ids = [encode_prompt(tokenizer, r["prompt"], cfg.data.use_chat_template) for r in rows]
    engine = build_engine(cfg, model, tokenizer)
    metrics = summarize(evaluate_rows(engine, rows, ids, cfg, build_rewards(cfg.rewards)))
    return EvalResult(checkpoint=str(path), samples=int(metrics["eval/samples"]), reward=metrics["eval/reward"],
                      accuracy=metrics.get("eval/accuracy"), metrics=metrics)  # fmt: skip
