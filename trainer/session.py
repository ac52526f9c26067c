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
or anything is written, so bad input fails fast and leaves ``output_dir`` untouched. Then global rank 0 locks
``output_dir`` (``trainer.run_lock``: one run per directory) before the checkpoint to resume is chosen and
anything is written, and a resume that cannot work (``max_steps`` below the checkpoint's step) fails before
the model loads. How the processes share the model (DDP replicas or FSDP shards, ``trainer.parallel``) is
decided just before it loads, since it decides where the model is loaded (the GPU, or the CPU for FSDP to
shard it onto the GPU layer by layer).

Stopping early: SIGTERM (pod eviction) and a first Ctrl-C (SIGINT) both abandon the step in flight if its
update has not started (``preemption_point``), else finish it, then checkpoint and exit: 143 after SIGTERM
(retryable for the PyTorchJob), 130 after Ctrl-C (it still did not finish; run the same command again to
resume). A second Ctrl-C, or a SIGTERM after Ctrl-C, stops at once without a checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MethodType
from typing import Any

import torch
import yaml

from trainer import checkpoint, checkpoint_dcp, parallel, run_lock
from trainer.config import dump_config
from trainer.config.schema import RunConfig
from trainer.data import load_dataset
from trainer.engines import build_engine
from trainer.envs import check_data
from trainer.errors import EXIT_USAGE, Interrupted, UserError
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
        # The first stop request (SIGTERM or SIGINT), acted on at the step's preemption point or end.
        self._stop_signal: int | None = None
        self._stop_at: float | None = None
        # The step in flight passed preemption_point: a stop request finishes it rather than abandons it.
        self._update_started = False
        self._lock: run_lock.RunLock | None = None  # rank 0's hold on output_dir
        self._step_rng: dict[str, Any] = {}
        self.saved_step = -1  # step of the last checkpoint this process took part in (same on every rank)
        self._saver = checkpoint.BackgroundSaver()  # rank 0's writer thread; at most one save in flight
        self._save_pending = False  # a background save was started and not yet joined (same on every rank)
        # Algorithms whose evaluation is not single-turn generation (multi-turn episodes) set their own.
        self.evaluator: Callable[[], dict[str, float]] | None = None
        # Models trained beside the policy (PPO's critic), by name (``add_model``): each checkpoint holds <name>/
        # with its weights and its optimizer's state (DDP), or its export with its shards in dcp/ (FSDP).
        self.extra_models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
        # DDP or FSDP: chosen in _load_model, once the processes and the inputs are known.
        self.plan = parallel.ParallelPlan("ddp", "not chosen yet")
        self._gathers = False  # FSDP + in-process engine: gather the full weights for sampling (_load_model)
        self._gathered = False  # they are gathered now
        self._own_group = False  # this session created the (one-process) process group FSDP runs in

    # ------------------------------------------------------------------ setup

    @classmethod
    def start(cls, cfg: RunConfig) -> Session:
        s = cls(cfg)
        s._init_processes()
        s._load_inputs()
        s._lock_output_dir()
        s._choose_resume()
        s._load_model()
        s._init_logging()
        # Python runs handlers in the main thread only: an API call from another thread keeps the caller's.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, s._on_sigterm)
            signal.signal(signal.SIGINT, s._on_sigint)
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

    def _lock_output_dir(self) -> None:
        """Rank 0 takes ``output_dir``'s lock; every rank stops (exit 2) if another run holds it."""
        error = None
        if self.is_main:
            try:
                self._lock = run_lock.acquire(self.output_dir)
            except UserError as e:
                error = e
        if self._any_rank(error is not None):
            if error is not None:
                raise error
            raise SystemExit(EXIT_USAGE)  # rank 0 says which run holds output_dir
        if self._lock is not None and self._lock.stale is not None:
            print(f"taking over {self._lock.path} from a run that ended without releasing it "
                  f"({self._lock.stale.describe()})", flush=True)  # fmt: skip
        if self._lock is not None and not self._lock.flock:
            print(f"warning: {self._lock.path}: the filesystem has no file locks; two runs into this "
                  "output_dir are not prevented", flush=True)  # fmt: skip

    def _choose_resume(self) -> None:
        cfg = self.cfg
        self.resume_from = checkpoint.resolve_resume(self.output_dir, cfg.checkpoint.resume)
        if self.resume_from is not None:
            saved = yaml.safe_load((self.resume_from / "config.yaml").read_text())
            if saved.get("algorithm", {}).get("name") != cfg.algorithm.name:
                raise UserError(f"checkpoint {self.resume_from}", f"was written by a {saved['algorithm']['name']} run; "
                                f"this config trains {cfg.algorithm.name}",
                                hint=f"start the new stage in its own output_dir with model.path: {self.resume_from}/policy")  # fmt: skip
            self._check_steps_left(checkpoint.step_of(self.resume_from))
            if self.is_main:
                moved = checkpoint.set_aside_newer(self.output_dir, self.resume_from)
                if moved:
                    print(
                        f"resuming from an older checkpoint: moved {moved} to checkpoints/abandoned/",
                        flush=True,
                    )
        self.accelerator.wait_for_everyone()

    def _check_steps_left(self, resumed_step: int | None) -> None:
        """A run that would resume past its own end: it would report the checkpoint's steps as its result, and
        the checkpoint the caller asked for (``step_<max_steps>``) would not exist."""
        if resumed_step is None or resumed_step <= self.total_steps:
            return
        algo = self.cfg.algorithm
        by_max_steps = algo.max_steps is not None and algo.max_steps == self.total_steps
        what = ("algorithm.max_steps", f"{algo.max_steps}") if by_max_steps else (
            "algorithm.epochs", f"{algo.epochs} ({self.total_steps} steps of {self.steps_per_epoch})")  # fmt: skip
        raise UserError(what[0], f"{what[1]} is below step {resumed_step} of the checkpoint this run would "
                        f"resume ({self.resume_from}, checkpoint.resume: {self.cfg.checkpoint.resume})",
                        hint=f"raise {what[0]} to continue that run, start a new one in another output_dir "
                        "(or name, when output_dir uses {name}), or resume an earlier checkpoint: "
                        f"checkpoint.resume: {checkpoint.checkpoints_dir(self.output_dir)}/step_N")  # fmt: skip

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
        self.plan = parallel.choose(cfg, self.world, self.device)
        if self.plan.fsdp and self.world == 1:
            # FSDP needs a process group, also alone (CPU offload on one GPU).
            self._own_group = parallel.init_single_process_group(self.device)
        torch.manual_seed(cfg.algorithm.seed)  # identical initialisation (LoRA A matrices) on every rank
        model = load_policy(cfg.model, self.device, policy_dir, place=not self.plan.fsdp)
        if cfg.algorithm.name != "sft":
            disable_dropout(model)
        model.train()
        self.model, self.optimizer = self._prepare(model, cfg.algorithm.lr)
        if not self.plan.fsdp:
            autocast_only(self.model, self.accelerator)
        self.policy = unwrap(self.model)
        # The in-process engine samples from the trainer's own model: under FSDP every layer is gathered for the
        # rollout (no collectives while sampling) and resharded before the update (trainer.parallel.full_weights).
        self._gathers = self.plan.fsdp and cfg.rollout.engine == "hf"
        self.state = TrainState()
        self.schedule = LRSchedule(cfg.algorithm, self.total_steps)
        self._seed_rngs()
        if self.resume_from is not None:
            saved = checkpoint.load_state(self.resume_from)
            self._restore("policy", self.model, self.optimizer, saved.get("optimizer"))
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

    def _prepare(self, model: torch.nn.Module, lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """A trained model and its AdamW: sharded (FSDP; built on the CPU, moved to the device layer by layer) or
        on the device and wrapped by accelerate (DDP)."""
        if self.plan.fsdp:
            model = parallel.shard(model, self.plan, self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.algorithm.weight_decay)
        if self.plan.fsdp:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def _restore(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 positional: dict[str, Any] | None) -> None:  # fmt: skip
        """Optimizer state (and, from a sharded checkpoint, the trained weights) of ``name`` from ``resume_from``.
        ``positional``: a DDP checkpoint's ``optimizer.state_dict()``. Any mix of strategies and world sizes."""
        assert self.resume_from is not None
        if checkpoint_dcp.is_sharded_checkpoint(self.resume_from):
            checkpoint_dcp.restore(self.resume_from, {name: (model, optimizer)})
        elif positional is None:
            raise UserError(f"checkpoint {self.resume_from}", f"holds no optimizer state for {name}")
        elif self.plan.fsdp:
            checkpoint_dcp.restore_positional(model, optimizer, positional)
        else:
            optimizer.load_state_dict(positional)

    def add_model(
        self, name: str, model: torch.nn.Module, lr: float
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Train ``model`` (loaded with ``place=not plan.fsdp``) beside the policy, as PPO's critic: wrapped or
        sharded as the policy is, with its own AdamW, restored from the resumed checkpoint, saved in ``<name>/``."""
        model, optimizer = self._prepare(model, lr)
        if self.resume_from is not None:
            state = self.resume_from / name / "training_state.pt"
            # weights_only=False: an optimizer state dict we wrote ourselves (plain tensors and numbers).
            positional = (
                torch.load(state, map_location="cpu", weights_only=False) if state.is_file() else None
            )
            self._restore(name, model, optimizer, positional)
        self.extra_models[name] = (model, optimizer)
        return model, optimizer

    def prepare_frozen(self, model: torch.nn.Module | None) -> torch.nn.Module | None:
        """A frozen model beside the policy (GRPO's KL reference, loaded with ``place=not plan.fsdp``): sharded
        like the policy under FSDP, so it costs 1/N of its weights per process."""
        if model is not None and self.plan.fsdp:
            return parallel.shard(model, self.plan, self.device)
        return model

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
        info(f"userloop {cfg.algorithm.name} run {cfg.name!r}: output {self.output_dir}; resolved config in "
             f"{self.output_dir / 'config.yaml'} and {self.logger.logs / 'train.log'}")  # fmt: skip
        # ~160 lines: in train.log for the record, not on a terminal or in a notebook cell above the step lines.
        info("resolved config:\n" + dump_config(cfg).rstrip(), echo=False)
        info(f"model {cfg.model.path}: {total:,} parameters, {trainable:,} trainable"
             f"{' (LoRA)' if cfg.model.lora.enabled else ''}, {self.world} process(es) on {self.device.type}")  # fmt: skip
        info(f"data: {len(self.train_rows)} train rows, {len(self.val_rows)} val rows; "
             f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps")  # fmt: skip
        info(self.plan.describe(self.world))
        info(parallel.memory_line(cfg, self.world, self.device, self.plan.strategy))
        if self.plan.fsdp and cfg.checkpoint.background:
            info(
                "checkpoint.background does not apply to FSDP yet: the ranks write their shards at the save point"
            )
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
            self._update_started = False
            self._generation_weights(self.cfg.algorithm.name != "sft")  # the rollout comes next (GRPO, PPO)
            yield [(i, self.train_rows[i], self.train_prompt_ids[i]) for i in idx]

    def preemption_point(self) -> None:
        """Call between a step's rollouts and its update: after SIGTERM or Ctrl-C, abandon the step, not finish it.

        Nothing of the step has reached the weights or the optimizer yet, so restoring the RNG streams of the
        step's start makes the checkpoint exactly that of the last finished step: the restarted pod redoes
        this step with the same samples. Saves up to one update's time of the grace period.
        """
        # One statement (no call in between, so no signal handler either): a request that came before it is this
        # process's vote to abandon the step; one that comes after is answered at the end of the step.
        stop, self._update_started = self._stop_signal is not None, True
        self._generation_weights(False)  # the update (and any checkpoint) works on the shards
        if not self._any_rank(stop):
            return
        self.optimizer.zero_grad(set_to_none=True)
        _set_rng_state(self._step_rng)
        self._exit_stopped("abandoning the step in flight")

    def _exit_stopped(self, what: str) -> None:
        """Checkpoint the last finished step and leave: exit 143 after SIGTERM; after Ctrl-C raise ``Interrupted``
        (``python -m trainer`` exits 130, ``EXIT_INTERRUPTED``)."""
        st = self.state
        elapsed = time.monotonic() - (self._stop_at or time.monotonic())
        # Every rank leaves the same way (a collective; both callers are at one): a Ctrl-C anywhere is a Ctrl-C.
        if not self._any_rank(self._stop_signal == signal.SIGINT):
            self.logger.info(f"SIGTERM {elapsed:.1f}s ago: {what}, checkpointing step {st.step} and exiting "
                             f"with {EXIT_PREEMPTED} (retryable; grace {self.cfg.checkpoint.grace_s:.0f}s)")  # fmt: skip
            if self.saved_step != st.step:  # the grace period is short: never write the same step twice
                self.save()
            self.wait_for_save()  # the step's background save may still be writing
            self._close()
            raise SystemExit(EXIT_PREEMPTED)
        # Ctrl-C: the line that said so was printed by the handler; train.log gets it here.
        self.logger.info(f"interrupted (Ctrl-C) {elapsed:.1f}s ago: {what}", echo=False)
        # Step 0 is the model as it was loaded: nothing to keep.
        if st.step > 0 and self.saved_step != st.step:
            self.save()
        self.wait_for_save()
        latest = checkpoint.latest(self.output_dir, verify=False) if self.is_main else None
        if latest is None:
            self.logger.info("interrupted before the first step finished: no checkpoint")
        else:
            self.logger.info(f"interrupted at step {st.step}/{self.total_steps}: checkpoint {latest}; to resume from "
                             f"it, {self._how_to_resume()}")  # fmt: skip
        self._close()
        raise Interrupted(f"interrupted at step {st.step}; last checkpoint {latest}")

    def _how_to_resume(self) -> str:
        # USERLOOP_COMMAND: set by `launcher run` and `python -m trainer`; without it this is the Python API.
        if os.environ.get("USERLOOP_COMMAND"):
            return f"run the same command again: {run_lock.command_line()}"
        return "call api.train with the same config again"

    def _close(self) -> None:
        """Logs closed, ``output_dir`` released: what every way out of a run that got this far does."""
        self.logger.close()
        if self._lock is not None:
            self._lock.release()
        if self._own_group:
            torch.distributed.destroy_process_group()
            self._own_group = False

    def _generation_weights(self, on: bool) -> None:
        """FSDP with the in-process engine: gather the full weights for sampling, or reshard them (collectives:
        every rank passes the same points). Nothing otherwise."""
        if self._gathers and on != self._gathered:
            (parallel.gather if on else parallel.release)(self.model)
            self._gathered = on

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Backward pass; ``sync=False`` for all but the last micro-batch of a step skips DDP's gradient
        all-reduce. FSDP reduce-scatters every micro-batch (its accumulated gradients stay sharded)."""
        if self.plan.fsdp:
            loss.backward()
        elif sync:
            self.accelerator.backward(loss)
        else:
            with self.accelerator.no_sync(self.model):
                self.accelerator.backward(loss)

    def optimizer_step(self) -> float:
        max_norm = self.cfg.algorithm.max_grad_norm
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = parallel.clip_grad_norm(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":  # the step's timings are host clocks: let them cover AdamW's kernels
            torch.cuda.synchronize(self.device)
        return norm

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
        self._update_started = False  # a stop request from here on is about the next step, not yet begun
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
        if self._any_rank(self._stop_signal is not None):
            self._exit_stopped("step finished")
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
        gathered = self._gathered
        self._generation_weights(True)
        try:
            return self._evaluate()
        finally:
            self._generation_weights(gathered)

    def _evaluate(self) -> dict[str, float]:
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
        if self.plan.fsdp:
            return self._save_sharded(states)
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

    def _save_sharded(self, rngs: list[Any]) -> Path | None:
        """FSDP: every rank writes its shards, rank 0 the export and the rest (``trainer.checkpoint_dcp``)."""
        self._generation_weights(False)
        state = {"state": asdict(self.state), "rng": rngs, "config": self.cfg.model_dump(mode="json")}
        models = {"policy": (self.model, self.optimizer), **self.extra_models}
        path = checkpoint_dcp.save(self.output_dir, self.state.step, models, self.tokenizer, state,
                                   dump_config(self.cfg), self.cfg.checkpoint.keep_last, self._any_rank)  # fmt: skip
        if path is not None:
            self.logger.info(f"checkpoint {path}")
        self.saved_step = self.state.step
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
        if self.world > 1 and not self.plan.fsdp:  # FSDP's processes hold different shards by design
            self._check_replicas_in_sync()
        elapsed = time.monotonic() - self._t_start
        peak = parallel.peak_memory_line(cfg, self.world, self.device, self.plan.strategy)
        if peak is not None:
            self.logger.info(peak)
        self.logger.info(f"done: {self.state.step} steps in {format_duration(elapsed)}"
                         f"{' (stopped early)' if self.state.stopped_early else ''}; last checkpoint {latest}")  # fmt: skip
        self._close()
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
        # Finish or abandon the current step, checkpoint, exit 143: see preemption_point and end_step.
        if self._stop_signal is None:
            self._stop_signal, self._stop_at = signal.SIGTERM, time.monotonic()
        elif self._stop_signal == signal.SIGINT:
            # After Ctrl-C: bare torchrun answers a second Ctrl-C by sending its workers SIGTERM.
            self._stop_now("SIGTERM after Ctrl-C")

    def _on_sigint(self, signum, frame) -> None:
        if self._stop_signal is not None:
            self._stop_now("second Ctrl-C")
        self._stop_signal, self._stop_at = signal.SIGINT, time.monotonic()
        n = self.state.step + 1
        if self.world > 1:  # the ranks vote at preemption_point: this one cannot tell yet what the others saw
            self._say(f"interrupted during step {n}/{self.total_steps}: checkpointing once it is finished or "
                      "abandoned; press Ctrl-C again to stop at once")  # fmt: skip
            return
        # GRPO and PPO call preemption_point between a step's rollouts and its update; SFT finishes every step.
        if self.cfg.algorithm.name != "sft" and not self._update_started:
            keep = f"checkpointing step {n - 1}" if n > 1 else "nothing to checkpoint yet"
            plan = f"abandoning step {n}/{self.total_steps} (its update has not started), {keep}"
        else:
            plan = f"finishing step {n}/{self.total_steps}, then checkpointing it"
        self._say(f"interrupted: {plan}; press Ctrl-C again to stop at once")

    def _stop_now(self, why: str) -> None:
        self._say(f"{why}: stopping at once, without a checkpoint (earlier ones are complete)")
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a further Ctrl-C interrupts the unwinding
        raise Interrupted(why)

    def _say(self, line: str) -> None:
        """Print from a signal handler: one write(2), as print() may be inside a write to stdout right now
        (a re-entrant call into the same buffered stream raises RuntimeError)."""
        if self.is_main:
            with contextlib.suppress(OSError):
                os.write(1, (line + "\n").encode())


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
