"""The run config: one typed schema shared by the launcher and the trainer.

Every field is documented once, in its ``description``; ``python -m trainer.config.reference`` and the
README's reference table are generated from these descriptions. This module imports only pydantic
so that ``launcher validate``/``render`` start without torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from trainer.config.base import RewardBase, Section
from trainer.config.cluster import RUN_SUFFIX_LEN, ClusterConfig
from trainer.config.multiturn import EnvironmentConfig, JudgeConfig, LlmJudgeReward, UserSimulatorConfig
from trainer.config.parallel import ParallelConfig

# ----------------------------------------------------------------------------- model


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train a LoRA adapter (peft) instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (effective scale alpha/r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt, e.g. [q_proj, v_proj]; `all-linear` adapts every linear layer but the LM head.",
    )


class ModelConfig(Section):
    path: str = Field(
        description="Local directory of a Hugging Face causal LM (config, weights, tokenizer); loaded with "
        "`from_pretrained(path)`. A hub id works where the hub is reachable."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Parameter dtype. `auto`: bfloat16 on a GPU that supports it, float32 on CPU."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")
    create_if_missing: Literal["tiny-qwen3"] | None = Field(
        None,
        description="Build a tiny random-initialised Qwen3-architecture model and tokenizer at `path` when it "
        "does not exist (offline quickstart and tests). Leave unset for real models.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")


# ----------------------------------------------------------------------------- algorithm


class SchedulerConfig(Section):
    type: Literal["constant", "cosine", "plateau"] = Field(
        "constant",
        description="LR schedule after warm-up: `constant`; `cosine` decay to `min_lr_ratio`·lr at the last step; "
        "`plateau` multiplies the LR by `plateau_factor` when the early-stopping metric (or eval reward) has not "
        "improved for `plateau_patience` evaluations.",
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up from 0 over this many optimizer steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of `lr`.")
    plateau_factor: float = Field(0.5, gt=0, lt=1, description="LR multiplier on a plateau.")
    plateau_patience: int = Field(2, ge=1, description="Evaluations without improvement before the LR drops.")


class EarlyStoppingConfig(Section):
    metric: str | None = Field(
        None,
        description="Eval metric to watch, e.g. `eval/reward` or `eval/accuracy`; unset disables early stopping.",
    )
    patience: int = Field(3, ge=1, description="Evaluations without improvement before the run stops.")
    mode: Literal["max", "min"] = Field("max", description="Whether larger or smaller values are better.")


class AlgorithmConfig(Section):
    name: Literal["sft", "grpo", "ppo"] = Field(
        description="Training algorithm: `sft`, `grpo` (group-normalised rewards, no critic) or `ppo` (a learned "
        "critic, GAE advantages; `trainer/ppo.py`)."
    )
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(
        8, ge=1, description="Prompts (GRPO, PPO) or examples (SFT) per optimizer step, over all processes."
    )
    group_size: int = Field(
        8,
        ge=1,
        description="GRPO: completions sampled per prompt; advantages are normalised within each group (2 or "
        "more). PPO: episodes per prompt, no normalisation within them (the critic is the baseline); 1 is fine, "
        "more samples the same prompt several times per step.",
    )
    grad_accum: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step: the step's sequences are split into this many forward/backward "
        "passes to bound memory. Does not change the effective batch.",
    )
    epochs: int = Field(1, ge=1, description="Passes over the training set.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides `epochs`)."
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Gradient clipping norm; null disables clipping."
    )
    clip_range: float = Field(0.2, gt=0, description="GRPO, PPO: policy ratio clip epsilon.")
    updates_per_batch: int = Field(
        1,
        ge=1,
        description="GRPO, PPO: optimizer passes over each batch of rollouts (μ in the GRPO paper, PPO's epochs). "
        "The ratio's old log-probs are the first pass's own: no extra forward.",
    )
    tis_cap: float | None = Field(
        2.0,
        ge=1,
        description="GRPO, PPO: truncated importance sampling against the rollout engine's own numerics (Yao et "
        'al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"): a server samples '
        "in bf16 with its own kernels, so the probability it gave a token differs from the trainer's. Each agent "
        "token's policy-gradient term is weighted by min(p_trainer / p_engine, tis_cap), p_trainer from the "
        "update's first pass (the policy that was handed to the engine), p_engine as the engine reported it. "
        "Active whenever the engine reports per-token log-probs: `sglang` and `vllm` with `rollout.top_p` 1 and "
        "`rollout.top_k` 0 (`hf` samples with the trainer's own model and reports none). null: off. Logged as "
        "`rollout/tis_clip_frac` (share of agent tokens whose weight was capped) beside `rollout/logprob_diff`.",
    )
    kl_coef: float = Field(
        0.0,
        ge=0,
        description="GRPO: weight of the KL penalty to the reference model (k3 estimator). With LoRA the reference is "
        "the base model with the adapter disabled; with full fine-tuning a frozen copy is kept only when > 0.",
    )
    entropy_coef: float = Field(0.0, ge=0, description="GRPO, PPO: weight of the entropy bonus.")
    advantage: Literal["episode", "turn"] = Field(
        "episode",
        description="Credit assignment in multi-turn episodes. `episode`: one reward per episode (GRPO: one "
        "group-normalised advantage for all its turns; PPO: the reward on the episode's last agent token). "
        "`turn`: each agent turn is credited with its own turn reward (the environment's, the episode's other "
        "rewards on the last turn). GRPO then computes per turn the discounted return over the following turns "
        "(`turn_gamma`) and normalises it within the group per turn position (UserRL-style turn-level credit); PPO "
        "puts each turn reward on that turn's last token before GAE. Needs a multi-turn environment.",
    )
    turn_gamma: float = Field(
        1.0,
        ge=0,
        le=1,
        description="GRPO with `advantage: turn`: discount per turn of the returns, G_k = r_k + turn_gamma·G_{k+1}. "
        "0 credits each turn with its own reward only; 1 with everything that followed it (UserRL uses 0.8).",
    )
    gamma: float = Field(
        1.0, ge=0, le=1, description="PPO: discount per agent token in GAE (1.0 is usual for LLM episodes)."
    )
    lam: float = Field(
        0.95,
        ge=0,
        le=1,
        description="PPO: GAE λ; 1 uses the full return (low bias, high variance), lower values lean on the critic.",
    )
    value_loss_coef: float = Field(
        0.5, gt=0, description="PPO: weight of the value loss (scales the critic's gradient before clipping)."
    )
    value_clip: float = Field(
        0.2,
        gt=0,
        description="PPO: a value prediction may move at most this far from its sampling-time estimate per batch "
        "(clipped value loss); in reward units, so scale it with your rewards.",
    )
    critic_lr: float | None = Field(
        None,
        gt=0,
        description="PPO: the critic's learning rate (AdamW, constant). Unset: `lr`. Critics usually take a larger "
        "LR than the policy (e.g. 1e-5 vs 1e-6 for Qwen3-0.6B).",
    )
    critic_path: str | None = Field(
        None,
        description="PPO: causal-LM directory the critic's backbone is loaded from (its LM head is dropped, a "
        "scalar value head added). Unset: `model.path`. With `model.lora.enabled` the critic is LoRA-trained too.",
    )
    seed: int = Field(0, description="Seed for data order, sampling and initialisation.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="LR schedule.")
    early_stopping: EarlyStoppingConfig = Field(
        default_factory=EarlyStoppingConfig, description="Early stopping."
    )

    @model_validator(mode="after")
    def _grpo_needs_a_group(self) -> AlgorithmConfig:
        if self.name == "grpo" and self.group_size < 2:
            raise ValueError(
                f"group_size is {self.group_size}, but GRPO normalises rewards within a group: set "
                "algorithm.group_size to 2 or more"
            )
        return self

    @model_validator(mode="after")
    def _settings_of_other_algorithms(self) -> AlgorithmConfig:
        # A setting the chosen algorithm ignores is almost always a mistake (a config copied from another run, a
        # typo in `name`): refuse it by name rather than train without it.
        # Only values that differ from the defaults count: a dumped config (checkpoint, ConfigMap) lists every field.
        chosen = {k for k in self.model_fields_set if getattr(self, k) != type(self).model_fields[k].default}
        problems = []
        for key in sorted(chosen):
            if key in _PPO_ONLY and self.name != "ppo":
                problems.append(f"algorithm.{key} is a PPO setting but algorithm.name is {self.name}: remove it, "
                                "or set algorithm.name: ppo")  # fmt: skip
            elif key in ("advantage", "turn_gamma") and self.name == "sft":
                problems.append(f"algorithm.{key} applies to GRPO and PPO, not sft: remove it")
        if "turn_gamma" in chosen and self.name != "sft":
            if self.name == "ppo":
                problems.append("algorithm.turn_gamma is not used by PPO, which discounts per token with "
                                "algorithm.gamma: remove turn_gamma")  # fmt: skip
            elif self.advantage != "turn":
                problems.append("algorithm.turn_gamma only applies with algorithm.advantage: turn: set that, or "
                                "remove turn_gamma")  # fmt: skip
        if problems:
            raise ValueError("; ".join(problems))
        return self


_PPO_ONLY = ("gamma", "lam", "value_loss_coef", "value_clip", "critic_lr", "critic_path")


# ----------------------------------------------------------------------------- data


class GenerateDataConfig(Section):
    task: Literal["repeat-letter", "next-letter", "add-digits", "seat-booking", "tau2-tasks"] = Field(
        description="Built-in synthetic task written to `data.train.path` / `data.val.path` when they are missing. "
        "`seat-booking` is multi-turn (`environment.name: intentiongym`): Parquet rows plus the intention JSON "
        "at `environment.intentions` / `val_intentions`. `tau2-tasks` (`environment.name: tau2`): JSONL rows naming "
        "the tasks of `environment.domain_dir`'s `task_split` / `val_task_split`, cycling through them to "
        "`train_size` / `val_size` rows."
    )
    train_size: int = Field(256, ge=1, description="Rows in the generated training set.")
    val_size: int = Field(32, ge=1, description="Rows in the generated validation set.")
    seed: int = Field(0, description="Seed of the generator.")


FIELD_NAMES = ("prompt", "messages", "response", "answer")


class DatasetConfig(Section):
    path: str = Field(description="JSONL or Parquet file.")
    format: Literal["jsonl", "parquet"] | None = Field(
        None, description="File format; inferred from the suffix (.jsonl/.json, .parquet) when unset."
    )
    fields: dict[Literal["prompt", "messages", "response", "answer"], str] = Field(
        default_factory=dict,
        description="Map of our names (`prompt`, `messages`, `response`, `answer`) to the file's columns, e.g. "
        "`{prompt: input, response: output}`. Unmapped names are looked up under common column names.",
    )
    skip_bad_lines: bool = Field(
        False,
        description="JSONL only. False: a line that is not valid UTF-8 JSON (or not a JSON object) stops the run, "
        "naming its line number. True: such lines are skipped and counted, with one warning line "
        "`data.<split>: skipped N broken lines in PATH (first at line L)`; a file with no good line is still "
        "an error. Turn on for scraped or appended-to logs where a few torn lines are expected.",
    )


class DataConfig(Section):
    train: DatasetConfig = Field(description="Training set.")
    val: DatasetConfig | None = Field(
        None, description="Validation set (eval, early stopping, `launcher eval`)."
    )
    max_samples: int | None = Field(None, ge=1, description="Use only the first N rows of each set.")
    generate: GenerateDataConfig | None = Field(
        None, description="Generate a synthetic dataset when files are missing."
    )
    system_prompt: str | None = Field(None, description="System message prepended to every prompt.")
    max_prompt_tokens: int = Field(
        1024, ge=1, description="Prompts longer than this (in tokens) are an error."
    )
    use_chat_template: bool = Field(
        True,
        description="Render prompts with the tokenizer's chat template; false joins message contents raw.",
    )


# ----------------------------------------------------------------------------- rollout


def _url_port(url: str) -> int | None:
    from urllib.parse import urlparse

    try:
        return urlparse(url).port
    except ValueError:
        return None


class RemoteEngineConfig(Section):
    """What the server engines (`sglang`, `vllm`) share: timeouts, retries, in-flight bounds, the hand-over folder."""

    timeout_s: float = Field(
        300.0,
        gt=0,
        description="Per-request timeout of a generation request (SGLang `/generate`, vLLM `/v1/completions`; a "
        "reset connection or a timeout is retried twice, each time under a fresh request id).",
    )
    sync_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="Timeout of each weight hand-over call (SGLang `/update_weights_from_disk`, vLLM "
        "`/collective_rpc` `reload_weights`, LoRA load/unload): reloading a large model from disk can take minutes. "
        "A retry after a timeout first asks the server whether the reload landed, and saves to a fresh folder "
        "rather than over the one it may still read.",
    )
    max_inflight: int = Field(
        256,
        ge=1,
        description="Generation requests in flight at once from this process; the server batches them. Higher "
        "keeps the server busier; bounded so a large batch cannot queue thousands of requests.",
    )
    startup_timeout_s: float = Field(
        600.0,
        gt=0,
        description="How long the trainer waits for the server's readiness route (SGLang `/health_generate`, vLLM "
        "`/health`) to answer 200 at start (model load and CUDA-graph capture take minutes) before it stops with "
        "an error.",
    )
    sync_retries: int = Field(
        3,
        ge=1,
        description="Attempts of one weight hand-over before the run stops with an error: sampling from stale "
        "weights is never silently continued.",
    )
    weights_dir: str | None = Field(
        None,
        description="Directory both trainer and server can read, where new weights are handed over. Unset: env "
        "`USERLOOP_WEIGHTS_DIR` (the chart sets `/weights`, an in-memory volume of both containers), else "
        "`<output_dir>/engine_weights`. Point it at a RAM disk (e.g. under /dev/shm) for fast full-weight syncs.",
    )


class SglangConfig(RemoteEngineConfig):
    url: str | None = Field(
        None,
        description="Base URL of the SGLang server. Unset: env `USERLOOP_SGLANG_URL` (the chart sets it to the "
        "pod's sidecar), else `http://127.0.0.1:30000`. Resolved when the run starts, so a config rendered on a "
        "laptop still reaches the pod's own sidecar.",
    )
    sync: Literal["lora", "disk"] | None = Field(
        None,
        description="How new weights reach the server after every optimizer step. `lora`: the adapter is saved "
        "to `weights_dir` and loaded as `policy-n<node>-v<step>` (`/load_lora_adapter`), requests switch to it "
        "and the previous one is unloaded; needs `model.lora.enabled`. `disk`: the full model is saved (safetensors) "
        "and reloaded with `/update_weights_from_disk`. Unset: `lora` when LoRA is on, else `disk`.",
    )
    launch: bool = Field(
        False,
        description="`launcher run` starts `python -m sglang.launch_server` as a child process with the flags "
        "the chart gives the sidecar (`cluster.sglang`, LoRA settings), waits until it is ready and stops it "
        "at the end: a local GPU run then behaves like the pod. The server gets the last "
        "`cluster.rollout_gpus_per_node` visible GPUs (1 when unset), the trainer the rest; `url`, if set, must "
        "name its port. Needs `pip install userloop[sglang]`.",
    )


class VllmConfig(RemoteEngineConfig):
    url: str | None = Field(
        None,
        description="Base URL of the vLLM OpenAI-compatible server. Unset: env `USERLOOP_VLLM_URL` (the chart sets "
        "it to the pod's sidecar), else `http://127.0.0.1:8000`. Resolved when the run starts. The server needs "
        "`VLLM_SERVER_DEV_MODE=1` (and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` for LoRA) in its environment.",
    )
    sync: Literal["lora", "disk"] | None = Field(
        None,
        description="How new weights reach the server after every optimizer step. `lora`: the adapter is saved "
        "to `weights_dir` and loaded as `policy-n<node>-v<step>` (`/v1/load_lora_adapter`), requests name it and "
        "the previous one is unloaded; needs `model.lora.enabled`. `disk`: the full model is saved (safetensors); "
        "the server pauses (in-flight requests finish), reloads it (`/collective_rpc` `reload_weights`), labels it "
        "`v<step>`, drops its prefix cache and resumes. Unset: `lora` when LoRA is on, else `disk`.",
    )
    launch: bool = Field(
        False,
        description="`launcher run` starts `python -m vllm.entrypoints.openai.api_server` as a child process with "
        "the flags and environment the chart gives the sidecar (`cluster.vllm`, LoRA settings), on 127.0.0.1, "
        "waits for `/health` and stops it at the end. The interpreter is env `USERLOOP_VLLM_PYTHON` (e.g. "
        "`.venv-vllm/bin/python` from scripts/vllm_venv.sh), else the launcher's own. GPUs are split as with "
        "`rollout.sglang.launch`; `url`, if set, must name its port.",
    )


class RolloutConfig(Section):
    engine: Literal["hf", "sglang", "vllm"] = Field(
        "hf",
        description="Rollout engine: `hf` (in-process batched `generate` on the trainer's model), `sglang` (HTTP "
        "client of an SGLang 0.5.x server, the pod's sidecar) or `vllm` (HTTP client of a vLLM 0.32 OpenAI-compatible "
        "server, the pod's sidecar); with a server, weights are handed over after every step.",
    )
    sglang: SglangConfig = Field(
        default_factory=SglangConfig, description="SGLang server settings (`engine: sglang`)."
    )
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="vLLM server settings (`engine: vllm`).")

    def server(self) -> SglangConfig | VllmConfig | None:
        """The section of the engine in use when it is a server (`sglang`, `vllm`); None for `hf`."""
        return {"sglang": self.sglang, "vllm": self.vllm}.get(self.engine)

    max_new_tokens: int = Field(128, ge=1, description="Completion length limit.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables.")
    eval_temperature: float = Field(0.0, ge=0, description="Temperature used by evaluation (0: greedy).")


# ----------------------------------------------------------------------------- rewards


class AccuracyReward(RewardBase):
    type: Literal["accuracy"]
    match: Literal["exact", "prefix", "contains"] = Field(
        "exact",
        description="How the normalised completion is compared with the normalised answer: equal, starts with it, "
        "or contains it. The completion's final answer is taken from `\\boxed{}` or `Answer:` when present.",
    )


class LengthPenaltyReward(RewardBase):
    type: Literal["length_penalty"]
    penalty_scale: float = Field(1.0, ge=0, description="Penalty reached at `outer_ratio`.")
    max_penalty: float = Field(1.0, ge=0, description="Largest penalty (the curve is clipped here).")
    peak_ratio: float = Field(
        0.3, ge=0, le=1, description="Length ratio (tokens / max_new_tokens) up to which there is no penalty."
    )
    outer_ratio: float = Field(
        0.5, gt=0, le=1, description="Length ratio where the penalty reaches `penalty_scale`."
    )

    @model_validator(mode="after")
    def _ordered(self) -> LengthPenaltyReward:
        if self.outer_ratio <= self.peak_ratio:
            raise ValueError(
                f"outer_ratio ({self.outer_ratio}) must be greater than peak_ratio ({self.peak_ratio})"
            )
        return self


class StepReward(RewardBase):
    type: Literal["step"]
    step_bonus: float = Field(
        0.1, description="Bonus per reasoning step (a line starting with `Step N`, `N.` or `-`)."
    )
    max_steps: int = Field(10, ge=1, description="Steps beyond this earn nothing.")


class FormatReward(RewardBase):
    type: Literal["format"]
    pattern: str = Field(
        description="Python regular expression the whole completion (stripped) must match for 1.0, else 0.0, "
        "e.g. `<think>.*</think>.*` or `[a-z]`."
    )

    @model_validator(mode="after")
    def _compiles(self) -> FormatReward:
        import re

        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {e}") from None
        return self


class PythonReward(RewardBase):
    type: Literal["python"]
    function: str = Field(
        description="`module:callable` taking keyword arguments (completion, prompt, answer, row, num_tokens) and "
        "returning a float, or None when not applicable."
    )
    kwargs: dict = Field(default_factory=dict, description="Extra keyword arguments passed to the function.")

    @model_validator(mode="after")
    def _looks_like_a_reference(self) -> PythonReward:
        module, _, attr = self.function.partition(":")
        if not module or not attr:
            raise ValueError(f"function {self.function!r} must look like 'package.module:callable'")
        return self


RewardConfig = Annotated[
    AccuracyReward | LengthPenaltyReward | StepReward | FormatReward | PythonReward | LlmJudgeReward,
    Field(discriminator="type"),
]


# ----------------------------------------------------------------------------- checkpoints, eval, logging


class CheckpointConfig(Section):
    save_every_steps: int | None = Field(None, ge=1, description="Save every N optimizer steps.")
    save_every_epochs: int | None = Field(None, ge=1, description="Save at the end of every N epochs.")
    keep_last: int = Field(3, ge=1, description="Keep the newest N checkpoints; older ones are deleted.")
    resume: str = Field(
        "auto",
        description="`auto`: continue from the newest complete checkpoint in `output_dir` if any; `never`: start "
        "fresh (refuses to overwrite existing checkpoints); or a path to one `step_N` directory.",
    )
    save_final: bool = Field(True, description="Save a checkpoint when training ends.")
    background: bool = Field(
        True,
        description="Write the checkpoints of `save_every_*` while training goes on: the step waits only for a "
        "copy of the weights and optimizer state into host memory, then a thread writes, hashes and renames it. "
        "Costs host RAM for one more copy of both (kept between saves); set false where that does not fit. "
        "The final, SIGTERM and stop checkpoints are always complete before the process exits.",
    )
    grace_s: float = Field(
        90.0,
        gt=0,
        description="Seconds the trainer may take after SIGTERM (pod eviction) to stop: a step still sampling is "
        "abandoned, one already updating is finished, then a checkpoint is written and the process exits 143 "
        "(retryable). Must cover one update plus one save; `cluster.termination_grace_period_seconds` must "
        "exceed it, or the kubelet kills the pod mid-save.",
    )

    @model_validator(mode="after")
    def _one_cadence(self) -> CheckpointConfig:
        if self.save_every_steps is not None and self.save_every_epochs is not None:
            raise ValueError("set either save_every_steps or save_every_epochs, not both")
        return self


class EvalConfig(Section):
    every_steps: int | None = Field(None, ge=1, description="Evaluate on `data.val` every N steps.")
    every_epochs: int | None = Field(None, ge=1, description="Evaluate at the end of every N epochs.")
    max_samples: int | None = Field(None, ge=1, description="Evaluate on at most N validation rows.")

    @model_validator(mode="after")
    def _one_cadence(self) -> EvalConfig:
        if self.every_steps is not None and self.every_epochs is not None:
            raise ValueError("set either every_steps or every_epochs, not both")
        return self


class WandbConfig(Section):
    project: str = Field(description="Weights & Biases project.")
    name: str | None = Field(None, description="Run name (default: the config's `name`).")
    entity: str | None = Field(None, description="Team or user.")


class LoggingConfig(Section):
    every_steps: int = Field(
        1, ge=1, description="Print a step line every N steps (metrics.jsonl gets every step)."
    )
    wandb: WandbConfig | None = Field(
        None, description="Log to Weights & Biases (needs `pip install wandb`)."
    )
    plots: bool = Field(True, description="Write plots/*.png at the end of training.")


# ----------------------------------------------------------------------------- the run


class RunConfig(Section):
    name: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=40,
        description="Run name: lowercase letters, digits and '-' (it names Kubernetes objects too).",
    )
    output_dir: str = Field(
        "runs/{name}", description="Where checkpoints, logs and plots go; `{name}` is replaced."
    )
    model: ModelConfig = Field(description="Policy model.")
    algorithm: AlgorithmConfig = Field(description="Algorithm and optimisation.")
    data: DataConfig = Field(description="Datasets.")
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig, description="Generation settings (GRPO, eval)."
    )
    rewards: list[RewardConfig] = Field(
        default_factory=list, description="Rewards summed with their weights (GRPO, eval)."
    )
    environment: EnvironmentConfig = Field(
        default_factory=EnvironmentConfig,
        description="Where episodes run (GRPO): `single_turn` (one reply per prompt) or a multi-turn environment.",
    )
    user_simulator: UserSimulatorConfig | None = Field(
        None, description="The LLM that plays the user in multi-turn environments (`api` or `local` backend)."
    )
    judge: JudgeConfig | None = Field(
        None,
        description="The LLM that judges: IntentionGym's coverage judge (`environment.judge_backend: api`) and "
        "`llm_judge` rewards.",
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpointing and resume."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Periodic evaluation.")
    logging: LoggingConfig = Field(
        default_factory=LoggingConfig, description="Step lines, metrics, plots, wandb."
    )
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig,
        description="How several processes share the model: DDP replicas or FSDP2 shards, mixed precision, CPU offload.",
    )
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig,
        description="How `launcher submit` runs this config on Kubernetes (a Kubeflow PyTorchJob); ignored by local runs.",
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        env = self.environment
        if self.cluster.termination_grace_period_seconds < self.checkpoint.grace_s + 15:
            raise ValueError(
                f"cluster.termination_grace_period_seconds ({self.cluster.termination_grace_period_seconds}) must "
                f"exceed checkpoint.grace_s ({self.checkpoint.grace_s:g}) by at least 15 s, or the kubelet kills "
                "the trainer while it writes its preemption checkpoint"
            )
        if self.algorithm.name == "grpo" and self.rollout.temperature == 0:
            raise ValueError(
                "rollout.temperature is 0 (greedy): every completion of a group would be the same and GRPO would "
                "get no signal; use a temperature around 1.0 (evaluation uses rollout.eval_temperature)"
            )
        if self.algorithm.name == "ppo" and self.rollout.temperature == 0:
            raise ValueError(
                "rollout.temperature is 0 (greedy): PPO would never try another action and its log-probs are those "
                "of a sampled policy; use a temperature around 1.0 (evaluation uses rollout.eval_temperature)"
            )
        if self.algorithm.advantage == "turn" and env.name == "single_turn":
            raise ValueError(
                "algorithm.advantage is turn but environment.name is single_turn: a single-turn episode has one turn, "
                "where turn-level credit equals the episode's; use a multi-turn environment or advantage: episode"
            )
        if self.algorithm.scheduler.type == "plateau" and not (
            self.eval.every_steps or self.eval.every_epochs
        ):
            raise ValueError(
                "algorithm.scheduler.type is plateau, which lowers the LR when evaluations stop improving, but no "
                "evaluation is scheduled: set eval.every_steps or eval.every_epochs"
            )
        if self.algorithm.name in ("grpo", "ppo") and not self.rewards and env.name == "single_turn":
            raise ValueError(
                f"{self.algorithm.name.upper()} needs at least one entry in `rewards` (e.g. `- {{type: accuracy}}`)"
            )
        task = self.data.generate.task if self.data.generate else None
        if task is not None and (task == "seat-booking") != (env.name == "intentiongym"):
            raise ValueError(
                f"data.generate.task is {task} but environment.name is {env.name}: seat-booking writes IntentionGym "
                "data (environment.name: intentiongym); the other tasks are single-turn (environment.name: single_turn)"
            )
        if task is not None and (task == "tau2-tasks") != (env.name == "tau2"):
            raise ValueError(
                f"data.generate.task is {task} but environment.name is {env.name}: tau2-tasks writes rows naming the "
                "tasks of environment.domain_dir, for environment.name: tau2 (and tau2 needs those rows)"
            )
        if env.name in ("intentiongym", "tau2") and self.user_simulator is None:
            raise ValueError(
                f"environment.name is {env.name} but user_simulator is not set: add a user_simulator section "
                "(backend: api with model/api_base/api_key_env, or backend: local with a model path)"
            )
        needs_judge = [r.name or r.type for r in self.rewards if isinstance(r, LlmJudgeReward)]
        if env.name == "intentiongym" and env.judge_backend == "api" and not env.merged:
            needs_judge.append("environment.judge_backend: api")
        if env.name == "tau2" and env.nl_judge:
            needs_judge.append("environment.nl_judge")
        if needs_judge and self.judge is None:
            raise ValueError(
                f"{', '.join(needs_judge)} need(s) the judge LLM but judge is not set: add a judge section, or use "
                "environment.judge_backend: rule"
            )
        if env.name != "single_turn" and not self.data.use_chat_template:
            raise ValueError(
                f"environment.name {env.name} builds conversations with the tokenizer's chat template: set "
                "data.use_chat_template: true"
            )
        if (self.eval.every_steps or self.eval.every_epochs) and self.data.val is None:
            raise ValueError("eval.every_steps/every_epochs is set but data.val is not: add a validation set")
        if self.algorithm.early_stopping.metric and not (self.eval.every_steps or self.eval.every_epochs):
            raise ValueError(
                "algorithm.early_stopping.metric needs periodic evaluation: set eval.every_steps or eval.every_epochs"
            )
        for key, port in (("sglang", 30000), ("vllm", 8000)):
            server = getattr(self.rollout, key)
            if server.sync == "lora" and not self.model.lora.enabled:
                raise ValueError(
                    f"rollout.{key}.sync is lora but model.lora.enabled is false: there is no adapter to hand over; "
                    f"set rollout.{key}.sync: disk (or leave it unset) or enable model.lora"
                )
            if server.sync is None:  # resolved here so the logged config says which hand-over the run uses
                server.sync = "lora" if self.model.lora.enabled else "disk"
            if server.launch and server.url and _url_port(server.url) is None:
                raise ValueError(
                    f"rollout.{key}.url: {server.url} has no port; with rollout.{key}.launch: true the launcher "
                    f"starts the server on that URL's port, so write it (e.g. http://127.0.0.1:{port}) or leave url "
                    f"unset (cluster.{key}.port)"
                )
        sg = self.rollout.sglang
        if self.rollout.engine == "sglang" and sg.sync == "lora" and self.cluster.sglang.max_loaded_loras < 2:
            raise ValueError(
                f"cluster.sglang.max_loaded_loras: {self.cluster.sglang.max_loaded_loras} is too few for LoRA "
                "hand-overs: the serving adapter and the next version are loaded together; set it to 2 or more"
            )
        names = [r.name or r.type for r in self.rewards]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rewards share the metric name(s) {dupes}: give each a distinct `name`")
        return self

    @model_validator(mode="after")
    def _cluster_checks(self) -> RunConfig:
        c = self.cluster
        # Services named after the job's pods must be DNS-1035 labels: no leading digit, at most 63 characters.
        if not self.name[0].isalpha():
            raise ValueError(f"name: {self.name!r} must start with a letter (it names Kubernetes Services)")
        longest = f"{self.name}-{'x' * (RUN_SUFFIX_LEN - 1)}-worker-{max(c.nodes - 2, 0)}"
        if len(longest) > 63:
            raise ValueError(
                f"name: {self.name!r} is too long for cluster.nodes={c.nodes}: pod names like {longest!r} "
                f"({len(longest)} characters) must fit 63; shorten name to {len(self.name) - (len(longest) - 63)} "
                "characters or fewer"
            )
        if c.nodes > 1 and c.pvc.access_mode != "ReadWriteMany":
            raise ValueError(
                f"cluster.pvc.access_mode: {c.pvc.access_mode} cannot be mounted by the {c.nodes} pods of "
                "cluster.nodes on different nodes: use a ReadWriteMany claim (see k8s/pvc-rwx.yaml) or cluster.nodes: 1"
            )
        if c.sidecar and self.rollout.server() is None:
            raise ValueError(
                f"cluster.rollout_gpus_per_node: {c.rollout_gpus_per_node} gives GPUs to a rollout sidecar (SGLang or "
                f"vLLM) but rollout.engine is {self.rollout.engine}, so nothing would use it: set rollout.engine: "
                "sglang or vllm, or cluster.rollout_gpus_per_node: 0 to give every GPU to the trainer"
            )
        if c.sidecar and self.model.create_if_missing:
            server = "vLLM" if self.rollout.engine == "vllm" else "SGLang"
            raise ValueError(
                f"cluster.rollout_gpus_per_node: the {server} sidecar starts before the trainer and cannot load a model "
                "that model.create_if_missing builds later: set cluster.rollout_gpus_per_node: 0 or point model.path "
                "at an existing model"
            )
        return self
