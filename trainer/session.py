"""What every algorithm loop shares: processes, model, optimizer, data order, resume, checkpoints, eval, logs.

A loop (``trainer/sft.py``, ``trainer/grpo.py``) reads like its algorithm::

    session = Session.start(cfg)
    for rows in session.batches():          # this process's share of the next batch
        loss = ...                          # algorithm-specific
        session.backward(loss)
        grad_norm = session.optimizer_step()
        if session.end_step(metrics):       # logs, checkpoints, evaluates; True when the run must stop
            break
    return session.finish()

Order of ``start`` matters: the config is checked and inputs are read *before* the model is loaded
or anything is written, so bad input fails fast and leaves ``output_dir`` untouched.
"""

from __future__ import annotations

import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MethodType
from typing import Any

import torch
import yaml

from trainer import checkpoint
from trainer.config import dump_config
from trainer.config.schema import RunConfig
from trainer.data import load_dataset
from trainer.engines import build_engine
from trainer.envs import check_data
from trainer.errors import UserError
from trainer.evaluate import evaluate_rows, summarize
from trainer.metrics import MetricsLogger, format_duration, step_line, write_plots
from trainer.model import (
    autocast_bf16,
    disable_dropout,
    ensure_model,
    load_policy,
    load_tokenizer,
    quiet_libraries,
    trainable_parameters,
    unwrap,
)
from trainer.prompts import check_chat_template, encode_prompt
from trainer.rewards import build_rewards
from trainer.schedule import LRSchedule

EXIT_PREEMPTED = 128 + signal.SIGTERM  # retryable for the PyTorchJob's ExitCode restart policy


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments that resume needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next batch (0-based)
    batch_in_epoch: int = 0  # index of the next batch within its epoch
    best_metric: float | None = None
    evals_without_improvement: int = 0
    lr_scale: float = 1.0  # plateau reductions so far
    stopped_early: bool = False


@dataclass
class TrainResult:
    status: str
    output_dir: str
    steps: int
    last_checkpoint: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Session:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self._preempted = False
        self._sigterm_at: float | None = None
        self._step_rng: dict[str, Any] = {}
        self.saved_step = -1  # step of the last checkpoint this process took part in (same on every rank)
        self._saver = checkpoint.BackgroundSaver()  # rank 0's writer thread; at most one save in flight
        self._save_pending = False  # a background save was started and not yet joined (same on every rank)
        # Algorithms whose evaluation is not single-turn generation (multi-turn episodes) set their own.
        self.evaluator: Callable[[], dict[str, float]] | None = None
        # Models trained beside the policy (PPO's critic), by name: each checkpoint holds <name>/ with its weights
        # and its optimizer's state; the algorithm restores them from resume_from/<name>/.
        self.extra_models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}

    # ------------------------------------------------------------------ setup

    @classmethod
    def start(cls, cfg: RunConfig) -> Session:
        s = cls(cfg)
        s._init_processes()
        s._load_inputs()
        s._load_model()
        s._init_logging()
        signal.signal(signal.SIGTERM, s._on_sigterm)
        return s

    def _init_processes(self) -> None:
        from accelerate import Accelerator

        mixed = "bf16" if autocast_bf16(self.cfg.model) else "no"
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed)
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        if self.cfg.algorithm.batch_size % self.world:
            raise UserError("algorithm.batch_size", f"{self.cfg.algorithm.batch_size} is not divisible by the "
                            f"{self.world} processes", hint="use a multiple of the process count")  # fmt: skip
        quiet_libraries()

    def _load_inputs(self) -> None:
        cfg = self.cfg
        if cfg.data.generate is not None and self.is_main:
            from trainer.tasks import write_generated

            write_generated(cfg)
        if self.is_main:
            ensure_model(cfg.model)
        self.accelerator.wait_for_everyone()
        self.tokenizer = load_tokenizer(cfg.model.path)
        if cfg.data.use_chat_template:
            check_chat_template(self.tokenizer, cfg.model.path)
        self.train_rows = load_dataset(cfg.data, "train").rows
        self.val_rows = load_dataset(cfg.data, "val").rows if cfg.data.val else []
        check_data(cfg.environment, "train", self.train_rows, cfg.data.train.path)
        if cfg.data.val is not None:
            check_data(cfg.environment, "val", self.val_rows, cfg.data.val.path)
        self.train_prompt_ids = self._encode_prompts(self.train_rows, "train")
        self.val_prompt_ids = self._encode_prompts(self.val_rows, "val")
        self.steps_per_epoch = len(self.train_rows) // cfg.algorithm.batch_size
        if self.steps_per_epoch == 0:
            raise UserError("algorithm.batch_size", f"{cfg.algorithm.batch_size} is larger than the training set "
                            f"({len(self.train_rows)} rows)", hint="lower batch_size or add data")  # fmt: skip
        by_epochs = self.steps_per_epoch * cfg.algorithm.epochs
        self.total_steps = min(by_epochs, cfg.algorithm.max_steps) if cfg.algorithm.max_steps else by_epochs
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.rewards = build_rewards(cfg.rewards)
        self.resume_from = checkpoint.resolve_resume(self.output_dir, cfg.checkpoint.resume)
        if self.resume_from is not None:
            saved = yaml.safe_load((self.resume_from / "config.yaml").read_text())
            if saved.get("algorithm", {}).get("name") != cfg.algorithm.name:
                raise UserError(f"checkpoint {self.resume_from}", f"was written by a {saved['algorithm']['name']} run; "
                                f"this config trains {cfg.algorithm.name}",
                                hint=f"start the new stage in its own output_dir with model.path: {self.resume_from}/policy")  # fmt: skip
            if self.is_main:
                moved = checkpoint.set_aside_newer(self.output_dir, self.resume_from)
                if moved:
                    print(
                        f"resuming from an older checkpoint: moved {moved} to checkpoints/abandoned/",
                        flush=True,
                    )
        self.accelerator.wait_for_everyone()

    def _encode_prompts(self, rows: list[dict], split: str) -> list[list[int]]:
        limit = self.cfg.data.max_prompt_tokens
        ids = [encode_prompt(self.tokenizer, r["prompt"], self.cfg.data.use_chat_template) for r in rows]
        for i, p in enumerate(ids):
            if len(p) > limit:
                raise UserError(f"data.{split}", f"row {i}: prompt has {len(p)} tokens, more than "
                                f"data.max_prompt_tokens={limit}", hint="raise data.max_prompt_tokens or shorten the prompt")  # fmt: skip
        return ids

    def _load_model(self) -> None:
        cfg = self.cfg
        policy_dir = self.resume_from / "policy" if self.resume_from else None
        torch.manual_seed(cfg.algorithm.seed)  # identical initialisation (LoRA A matrices) on every rank
        model = load_policy(cfg.model, self.device, policy_dir)
        if cfg.algorithm.name != "sft":
            disable_dropout(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.algorithm.lr, weight_decay=cfg.algorithm.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        autocast_only(self.model, self.accelerator)
        self.policy = unwrap(self.model)
        self.state = TrainState()
        self.schedule = LRSchedule(cfg.algorithm, self.total_steps)
        self._seed_rngs()
        if self.resume_from is not None:
            saved = checkpoint.load_state(self.resume_from)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.state = TrainState(**saved["state"])
            self.saved_step = self.state.step  # that step is on disk already
            rng = saved["rng"][self.rank] if self.rank < len(saved["rng"]) else None
            if rng is not None:
                _set_rng_state(rng)
        self.schedule.apply(self.optimizer, self.state.step, self.state.lr_scale)
        # After resume: an SGLang server must sample from the resumed weights from the first rollout on. One
        # process per node (its local rank 0) hands them to that node's server; _any_rank is the barrier.
        self.engine = build_engine(cfg, self.model, self.tokenizer, self.state.step, self._any_rank,
                                   self.accelerator.local_process_index == 0, f"r{self.rank}")  # fmt: skip

    def _seed_rngs(self) -> None:
        seed = self.cfg.algorithm.seed + 1000 * self.rank  # different samples on each rank
        random.seed(seed)
        torch.manual_seed(seed)

    def _init_logging(self) -> None:
        cfg = self.cfg
        self.logger = MetricsLogger(self.output_dir, self.is_main, self.state.step, cfg.logging.wandb, cfg.name,
                                    cfg.model_dump(mode="json"))  # fmt: skip
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        trainable, total = trainable_parameters(self.policy)
        info = self.logger.info
        info(f"userloop {cfg.algorithm.name} run {cfg.name!r}: output {self.output_dir}")
        info("resolved config:\n" + dump_config(cfg).rstrip())
        info(f"model {cfg.model.path}: {total:,} parameters, {trainable:,} trainable"
             f"{' (LoRA)' if cfg.model.lora.enabled else ''}, {self.world} process(es) on {self.device.type}")  # fmt: skip
        info(f"data: {len(self.train_rows)} train rows, {len(self.val_rows)} val rows; "
             f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps")  # fmt: skip
        if self.resume_from is not None:
            info(f"resumed from {self.resume_from} at step {self.state.step}")
        self._t_start = time.monotonic()
        self._step_start = self.state.step

    # ------------------------------------------------------------------ the loop's parts

    def batches(self):
        """This process's rows of each remaining batch, in a seeded order that resume reproduces."""
        bs = self.cfg.algorithm.batch_size
        while self.state.step < self.total_steps and not self.state.stopped_early:
            order = torch.randperm(len(self.train_rows),
                                   generator=torch.Generator().manual_seed(self.cfg.algorithm.seed + self.state.epoch))  # fmt: skip
            start = self.state.batch_in_epoch * bs
            idx = order[start : start + bs].tolist()[self.rank :: self.world]
            self._t_step = time.perf_counter()
            self._step_rng = _get_rng_state()  # what a checkpoint of the last finished step must hold
            yield [(i, self.train_rows[i], self.train_prompt_ids[i]) for i in idx]

    def preemption_point(self) -> None:
        """Call between a step's rollouts and its update: after SIGTERM, abandon the step rather than finish it.

        Nothing of the step has reached the weights or the optimizer yet, so restoring the RNG streams of the
        step's start makes the checkpoint exactly that of the last finished step: the restarted pod redoes
        this step with the same samples. Saves up to one update's time of the grace period.
        """
        if not self._any_rank(self._preempted):
            return
        self.optimizer.zero_grad(set_to_none=True)
        _set_rng_state(self._step_rng)
        self._exit_preempted("abandoning the step in flight")

    def _exit_preempted(self, what: str) -> None:
        elapsed = time.monotonic() - (self._sigterm_at or time.monotonic())
        self.logger.info(f"SIGTERM {elapsed:.1f}s ago: {what}, checkpointing step {self.state.step} and exiting "
                         f"with {EXIT_PREEMPTED} (retryable; grace {self.cfg.checkpoint.grace_s:.0f}s)")  # fmt: skip
        if self.saved_step != self.state.step:  # the grace period is short: never write the same step twice
            self.save()
        self.wait_for_save()  # the step's background save may still be writing
        self.logger.close()
        raise SystemExit(EXIT_PREEMPTED)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Backward pass; ``sync=False`` for all but the last micro-batch of a step skips the gradient all-reduce."""
        if sync:
            self.accelerator.backward(loss)
        else:
            with self.accelerator.no_sync(self.model):
                self.accelerator.backward(loss)

    def optimizer_step(self) -> float:
        max_norm = self.cfg.algorithm.max_grad_norm
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":  # the step's timings are host clocks: let them cover AdamW's kernels
            torch.cuda.synchronize(self.device)
        return float(norm)

    def reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over processes (identity with one process)."""
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], device=self.device, dtype=torch.float64)
        t = self.accelerator.reduce(t, reduction="mean")
        return dict(zip(keys, t.tolist(), strict=True))

    def loss_denominator(self, local_tokens: float) -> float:
        """Divide a rank's summed token loss by this so the DDP-averaged gradient is the global token mean.

        DDP averages gradients over ranks; dividing each rank's sum by its own token count would weigh the
        tokens of a rank with short completions more. ``global_tokens / world`` makes every token count once.
        """
        if self.world == 1:
            return max(local_tokens, 1.0)
        t = torch.tensor([local_tokens], device=self.device, dtype=torch.float64)
        total = float(self.accelerator.reduce(t, reduction="sum").item())
        return max(total, 1.0) / self.world

    def end_step(self, metrics: dict[str, Any]) -> bool:
        """Advance the step and data position, log, evaluate and checkpoint; True when the run must stop."""
        st = self.state
        st.step += 1
        st.batch_in_epoch += 1
        epoch_done = st.batch_in_epoch >= self.steps_per_epoch
        if epoch_done:
            st.epoch += 1
            st.batch_in_epoch = 0
        step_s = time.perf_counter() - self._t_step
        epoch = st.epoch if epoch_done else st.epoch + 1  # 1-based epoch this step belongs to
        metrics = {"step": st.step, "epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                   "time/step_s": step_s, **metrics}  # fmt: skip
        if "tokens" in metrics:
            metrics["throughput/tokens_per_s"] = metrics["tokens"] / max(step_s, 1e-9)
        cad = self.cfg.eval
        if (cad.every_steps and st.step % cad.every_steps == 0) or (
            cad.every_epochs and epoch_done and st.epoch % cad.every_epochs == 0
        ):
            metrics.update(self.evaluate())
            self._after_eval(metrics)
        done = st.step >= self.total_steps
        eta = (
            (time.monotonic() - self._t_start)
            / max(1, st.step - self._step_start)
            * (self.total_steps - st.step)
        )
        show = st.step % self.cfg.logging.every_steps == 0 or done or st.step == 1
        self.logger.step(
            metrics, step_line(metrics, self.total_steps, self.total_epochs, eta) if show else None
        )
        ck = self.cfg.checkpoint
        if (ck.save_every_steps and st.step % ck.save_every_steps == 0) or (
            ck.save_every_epochs and epoch_done and st.epoch % ck.save_every_epochs == 0
        ):
            self.save(background=ck.background)
        self.schedule.apply(self.optimizer, st.step, st.lr_scale)
        if self._any_rank(self._preempted):
            self._exit_preempted("step finished")
        return done or st.stopped_early

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when any rank says so (all ranks must agree to checkpoint together)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def evaluate(self) -> dict[str, float]:
        # An engine outside the process must sample this step's weights: SFT never hands them over otherwise
        # (GRPO/PPO already did after the step's update: a no-op then).
        self.engine.sync_weights(self.state.step)
        if self.evaluator is not None:
            return self.evaluator()
        rows = self.val_rows[: self.cfg.eval.max_samples] if self.cfg.eval.max_samples else self.val_rows
        ids = self.val_prompt_ids[: len(rows)]
        sums = evaluate_rows(self.engine, rows[self.rank :: self.world], ids[self.rank :: self.world],
                             self.cfg, self.rewards)  # fmt: skip
        if self.world > 1:
            keys = sorted(sums)
            t = self.accelerator.reduce(
                torch.tensor([sums[k] for k in keys], device=self.device), reduction="sum"
            )
            sums = dict(zip(keys, t.tolist(), strict=True))
        return summarize(sums)

    def _after_eval(self, metrics: dict[str, Any]) -> None:
        es = self.cfg.algorithm.early_stopping
        sched = self.cfg.algorithm.scheduler
        if not es.metric and sched.type != "plateau":
            return
        name = es.metric or "eval/reward"
        if name not in metrics:
            self.logger.info(f"warning: eval produced no {name!r} this time (have "
                             f"{sorted(k for k in metrics if k.startswith('eval/'))}); early stopping skips it")  # fmt: skip
            return
        value = metrics[name]
        st = self.state
        better = st.best_metric is None or (
            value > st.best_metric if es.mode == "max" else value < st.best_metric
        )
        if better:
            st.best_metric, st.evals_without_improvement = value, 0
            return
        st.evals_without_improvement += 1
        if sched.type == "plateau" and st.evals_without_improvement % sched.plateau_patience == 0:
            st.lr_scale *= sched.plateau_factor
        if es.metric and st.evals_without_improvement >= es.patience:
            st.stopped_early = True
            self.logger.info(f"early stopping: {name} has not improved on {st.best_metric:.4f} for "
                             f"{es.patience} evaluations")  # fmt: skip

    # ------------------------------------------------------------------ checkpoints and the end

    def save(self, background: bool = False) -> Path | None:
        """Checkpoint the current step (a collective); first joins the background save still in flight.

        ``background``: rank 0 copies the state to host memory and returns while a thread writes it (the path
        is logged when it is joined: at the next save, on SIGTERM or in ``finish``); returns None. A failed
        background write raises its ``CheckpointWriteError`` at that join, on every rank.
        """
        self.wait_for_save()
        rng = _get_rng_state()
        states = [rng]
        if self.world > 1:
            states = [None] * self.world
            torch.distributed.all_gather_object(states, rng)
        path, error = None, None
        if self.is_main:
            state = {"state": asdict(self.state), "optimizer": self.optimizer.state_dict(), "rng": states,
                     "config": self.cfg.model_dump(mode="json")}  # fmt: skip
            try:
                extra = {name: (unwrap(m), opt.state_dict()) for name, (m, opt) in self.extra_models.items()}
                if background:
                    self._saver.start(self.output_dir, self.state.step, self.policy, self.tokenizer, state,
                                      dump_config(self.cfg), self.cfg.checkpoint.keep_last, extra)  # fmt: skip
                else:
                    path = checkpoint.save(self.output_dir, self.state.step, self.policy, self.tokenizer,
                                           state, dump_config(self.cfg), self.cfg.checkpoint.keep_last, extra)  # fmt: skip
                    self.logger.info(f"checkpoint {path}")
            except checkpoint.CheckpointWriteError as e:
                error = e
        # Doubles as the barrier after the save: every rank learns whether rank 0 could write.
        if self._any_rank(error is not None):
            raise error or checkpoint.CheckpointWriteError(
                str(self.output_dir), "rank 0 could not write a checkpoint"
            )
        self.saved_step = self.state.step
        self._save_pending = background
        return path

    def wait_for_save(self) -> None:
        """Join the background save in flight, if any (a collective: every rank learns whether it failed)."""
        if not self._save_pending:
            return
        self._save_pending = False
        error = None
        if self.is_main:
            try:
                path = self._saver.wait()
                self.logger.info(f"checkpoint {path} (written while training: the step waited "
                                 f"{self._saver.snapshot_s:.2f}s for the host copy)")  # fmt: skip
            except checkpoint.CheckpointWriteError as e:
                error = e
        if self._any_rank(error is not None):
            raise error or checkpoint.CheckpointWriteError(
                str(self.output_dir), "rank 0 could not write a checkpoint"
            )

    def finish(self, last_metrics: dict[str, Any] | None = None) -> TrainResult:
        cfg = self.cfg
        # Every rank takes the same branch: save() is a collective.
        if cfg.checkpoint.save_final and self.saved_step != self.state.step:
            self.save()
        self.wait_for_save()
        latest = checkpoint.latest(self.output_dir, verify=False) if self.is_main else None
        if self.is_main and cfg.logging.plots and self.logger.metrics_path.exists():
            write_plots(self.logger.metrics_path, self.output_dir / "plots")
        if self.world > 1:
            self._check_replicas_in_sync()
        elapsed = time.monotonic() - self._t_start
        self.logger.info(f"done: {self.state.step} steps in {format_duration(elapsed)}"
                         f"{' (stopped early)' if self.state.stopped_early else ''}; last checkpoint {latest}")  # fmt: skip
        self.logger.close()
        return TrainResult(status="success", output_dir=str(self.output_dir), steps=self.state.step,
                           last_checkpoint=str(latest) if latest else None, metrics=last_metrics or {},
                           stopped_early=self.state.stopped_early)  # fmt: skip

    def _check_replicas_in_sync(self) -> None:
        """DDP keeps one model on every rank; a mismatch means a bug or a rank that skipped a step."""
        models = [self.policy, *(unwrap(m) for m, _ in self.extra_models.values())]  # PPO: the critic too
        local = torch.stack(
            [p.detach().double().sum() for m in models for p in m.parameters() if p.requires_grad]
        ).sum()
        spread = self.accelerator.gather(local.reshape(1).to(self.device))
        if float(spread.max() - spread.min()) > 1e-6 * max(1.0, float(spread.abs().max())):
            raise RuntimeError(f"ranks hold different weights after training: {spread.tolist()}")
        self.logger.info(f"replicas in sync: {self.world} processes hold the same weights")

    def _on_sigterm(self, signum, frame) -> None:
        # Finish the current step, checkpoint, exit 143: see end_step.
        self._preempted = True
        self._sigterm_at = time.monotonic()


def autocast_only(model: torch.nn.Module, accelerator) -> None:
    """Keep accelerate's bf16 autocast around the policy's forward, but not its cast of every output to float32.

    That cast copies the logits ([trained tokens x vocabulary]: 600 MB per 1,000 tokens with Qwen3's 152k) to
    float32, and the loss would keep the copy for the backward pass. ``trainer.logprobs`` reads bf16 logits
    in float32 chunk by chunk, and ``generate`` up-casts the one position it samples from itself.
    """
    inner = unwrap(model)
    original = inner.__dict__.get("_original_forward")  # set by accelerate's prepare under native AMP
    if original is None or not accelerator.native_amp:
        return
    from accelerate.utils import get_mixed_precision_context_manager

    autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
    func = getattr(original, "__func__", None)
    inner.forward = MethodType(autocast(func), inner) if func is not None else autocast(original)


def _get_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
