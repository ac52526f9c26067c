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
    name: Literal["sft", "grpo"] = Field(description="Training algorithm: `sft` or `grpo`.")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(
        8, ge=1, description="Prompts (GRPO) or examples (SFT) per optimizer step, over all processes."
    )
    group_size: int = Field(
        8,
        ge=1,
        description="GRPO: completions sampled per prompt; advantages are normalised within each group.",
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
    clip_range: float = Field(0.2, gt=0, description="GRPO: PPO-style ratio clip epsilon.")
    updates_per_batch: int = Field(
        1,
        ge=1,
        description="GRPO: optimizer passes over each batch of rollouts (μ in the GRPO paper). With 1, the old "
        "log-probs equal the current ones and are not recomputed.",
    )
    kl_coef: float = Field(
        0.0,
        ge=0,
        description="GRPO: weight of the KL penalty to the reference model (k3 estimator). With LoRA the reference is "
        "the base model with the adapter disabled; with full fine-tuning a frozen copy is kept only when > 0.",
    )
    entropy_coef: float = Field(0.0, ge=0, description="GRPO: weight of the entropy bonus.")
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


# ----------------------------------------------------------------------------- data


class GenerateDataConfig(Section):
    task: Literal["repeat-letter", "next-letter", "add-digits"] = Field(
        description="Built-in synthetic task written to `data.train.path` / `data.val.path` when they are missing."
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


class RolloutConfig(Section):
    engine: Literal["hf"] = Field("hf", description="Rollout engine: `hf` (in-process batched `generate`).")
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
        if self.algorithm.scheduler.type == "plateau" and not (
            self.eval.every_steps or self.eval.every_epochs
        ):
            raise ValueError(
                "algorithm.scheduler.type is plateau, which lowers the LR when evaluations stop improving, but no "
                "evaluation is scheduled: set eval.every_steps or eval.every_epochs"
            )
        if self.algorithm.name == "grpo" and not self.rewards and env.name == "single_turn":
            raise ValueError("GRPO needs at least one entry in `rewards` (e.g. `- {type: accuracy}`)")
        if env.name != "single_turn" and self.user_simulator is None:
            raise ValueError(
                f"environment.name is {env.name} but user_simulator is not set: add a user_simulator section "
                "(backend: api with model/api_base/api_key_env, or backend: local with a model path)"
            )
        needs_judge = [r.name or r.type for r in self.rewards if isinstance(r, LlmJudgeReward)]
        if env.name == "intentiongym" and env.judge_backend == "api" and not env.merged:
            needs_judge.append("environment.judge_backend: api")
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
        if c.sidecar and self.model.create_if_missing:
            raise ValueError(
                "cluster.rollout_gpus_per_node: the SGLang sidecar starts before the trainer and cannot load a model "
                "that model.create_if_missing builds later: set cluster.rollout_gpus_per_node: 0 or point model.path "
                "at an existing model"
            )
        return self
