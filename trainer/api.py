"""The Python API: the same actions as the CLI, for notebooks and agent frameworks.

Each returns a result object whose ``to_dict()`` is the JSON the CLI prints
(``{"status": "success", ...}``); errors the user can fix raise ``trainer.errors.UserError``, whose ``str()``
is the one-line message and its ``Hint:``. Ctrl-C during ``train`` (a notebook's interrupt) checkpoints like
the CLI and raises ``trainer.errors.Interrupted`` (a ``KeyboardInterrupt``); call ``train`` again to resume.

    from trainer.config import load_config
    from trainer import api
    cfg = load_config("configs/quickstart.yaml", ["algorithm.max_steps=10"])
    print(api.train(cfg).to_dict())
"""

from __future__ import annotations

import signal
import threading
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
    """Run the configured algorithm; returns ``trainer.session.TrainResult``.

    However it ends, the caller gets back its SIGINT and SIGTERM handlers (the run replaces them while it
    trains) and ``output_dir``'s lock is released: a notebook can interrupt, fix and train again.
    """
    from trainer import run_lock

    if cfg.algorithm.name == "sft":
        from trainer.sft import train as run
    elif cfg.algorithm.name == "ppo":
        from trainer.ppo import train as run
    else:
        from trainer.grpo import train as run
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    held = run_lock.held()
    try:
        return run(cfg)
    finally:
        for lock in run_lock.held():
            if lock not in held:
                lock.release()
        for sig, handler in handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def inspect_data(cfg: RunConfig, split: str = "train") -> DataResult:
    from trainer.data import load_dataset

    if cfg.data.generate is not None:
        from trainer.tasks import write_generated

        write_generated(cfg)
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
    # A fresh checkout evaluating a copied checkpoint: the generated validation set is the training run's.
    if cfg.data.generate is not None:
        from trainer.tasks import write_generated

        write_generated(cfg)
    rows = load_dataset(cfg.data, "val").rows
    limit = max_samples or cfg.eval.max_samples
    rows = rows[:limit] if limit else rows
    engine = build_engine(cfg, model, tokenizer)
    if cfg.environment.name != "single_turn":
        metrics = _evaluate_episodes(cfg, engine, tokenizer, rows, build_rewards(cfg.rewards))
    else:
        ids = [encode_prompt(tokenizer, r["prompt"], cfg.data.use_chat_template) for r in rows]
        metrics = summarize(evaluate_rows(engine, rows, ids, cfg, build_rewards(cfg.rewards)))
    if "eval/reward" not in metrics:
        raise UserError(f"--checkpoint {checkpoint}", f"all {int(metrics.get('eval/invalid', 0))} evaluation "
                        "episodes were invalid (API failures or unparseable judge replies): no reward to report",
                        hint="check the user_simulator / judge endpoints, then run again")  # fmt: skip
    return EvalResult(checkpoint=str(path), samples=int(metrics["eval/samples"]), reward=metrics["eval/reward"],
                      accuracy=metrics.get("eval/accuracy"), metrics=metrics)  # fmt: skip


def _evaluate_episodes(
    cfg: RunConfig, engine, tokenizer, rows: list[dict[str, Any]], rewards
) -> dict[str, float]:
    """Multi-turn evaluation exactly as during training (``grpo._evaluate_episodes``): one episode per validation
    row at ``rollout.eval_temperature`` with the configured user simulator and judges, through
    ``EpisodeRunner.evaluate``. Invalid episodes are counted (``eval/invalid``), never scored."""
    from trainer.envs import check_data
    from trainer.llm import merge_snapshots
    from trainer.rollout import EpisodeRunner

    assert cfg.data.val is not None
    check_data(cfg.environment, "val", rows, cfg.data.val.path)
    # API calls of the evaluation go to the run's cache (api_cache.sqlite): evaluating twice pays once for judges.
    runner = EpisodeRunner(cfg, engine, tokenizer, rewards, cfg.output_dir, cfg.algorithm.seed)
    try:
        metrics = runner.evaluate([(i, r, []) for i, r in enumerate(rows)], lambda sums: sums)
        if runner.clients:  # api/calls, api/<role>/calls, latency, cost of the evaluation's own calls
            metrics.update(merge_snapshots([c.stats for c in runner.clients], reset_window=True))
    finally:
        runner.close()
    return metrics
