"""TRL's ``GRPOTrainer`` configured like the userloop benchmark run, as its own process (``bench`` extra).

Equivalence with ``launcher run`` on the benchmark config (see ``benchmarks.grpo_step``):
``num_generations`` = group_size and ``per_device_train_batch_size`` = batch_size x group_size with one
generation batch per optimizer step, so one step = batch_size prompts x group_size completions;
``max_completion_length`` = max_new_tokens; ``beta=0`` (no KL, no reference model); ``loss_type="dapo"``
(token-level sum over the step's completion tokens divided by their number, userloop's loss);
``scale_rewards="group"``; ``epsilon`` = clip_range; the same LR (constant), ``torch.optim.AdamW`` without
weight decay, ``max_grad_norm=1``, temperature, top_p=1, top_k off, dropout off, float32 on the CPU (GRPOConfig
defaults to bf16), activation checkpointing off (GRPOConfig defaults to on), no vLLM, no checkpoints, no
reporting. The reward is userloop's own ``accuracy`` on the same rows.

Per-step time: a callback's ``on_step_begin`` -> ``on_step_end`` span (generation, reward, forward/backward,
clip and optimizer step), the span userloop's ``time/step_s`` covers.

    python -m benchmarks.grpo_trl --model DIR --data train.jsonl --batch 8 --group 8 --max-new 16 \
        --lr 1e-5 --steps 10 [--lora] --out result.json

Options of the GPU benchmark (``benchmarks.gpu``; without them the run is the CPU benchmark's, unchanged):
``--device cuda`` (no ``use_cpu``), ``--bf16`` (GRPOConfig ``bf16=True``: float32 master weights, forwards under
bf16 autocast, as userloop's ``model.dtype: auto`` on a GPU), ``--grad-accum N`` (each step's
batch x group completions in N micro-batches: ``per_device_train_batch_size`` = batch x group / N,
``gradient_accumulation_steps`` = ``steps_per_generation`` = N, still one generation per optimizer step, so no
old log-prob forward) and ``--phases``: per step, the time inside ``model.generate`` and inside
``_generate_and_score_completions`` (generation, decoding, rewards, advantages), each bracketed by
``torch.cuda.synchronize()`` on a GPU (so is the step span), and the shape of every training forward
(rows, width = prompt + completion columns, positions the fused LM head scores) for the FLOP count.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from benchmarks.grpo_settings import compared_command_parser

T_START = time.perf_counter()  # before torch is imported: the process's own start-up counts


def main(argv: list[str] | None = None) -> None:
    ap = compared_command_parser(__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast over float32 master weights")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--phases", action="store_true", help="time generate and scoring; trace forwards")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.grpo_settings import LORA
    from trainer.rewards import accuracy

    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

    def accuracy_reward(completions: list[str], answer: list[str], **_) -> list[float | None]:
        return [accuracy(completion=c, answer=a) for c, a in zip(completions, answer, strict=True)]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.step_s: list[float] = []
            self._t = 0.0

        def on_step_begin(self, *_, **__) -> None:
            self._t = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            self.step_s.append(time.perf_counter() - self._t)

    tokens: list[float] = []

    class TokenLog(TrainerCallback):
        def on_log(self, _args, _state, _control, logs=None, **__) -> None:
            if logs and "completions/mean_length" in logs:
                tokens.append(logs["completions/mean_length"] * args.batch * args.group)

    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA)
    timer = StepTimer()
    phases = _Phases(args.device == "cuda") if args.phases else None
    if phases is not None:
        timer = phases.step_timer(timer)
    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as out_dir:
        config = GRPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=args.batch * args.group // args.grad_accum,
            gradient_accumulation_steps=args.grad_accum,
            steps_per_generation=args.grad_accum,
            num_generations=args.group,
            num_iterations=1,
            max_completion_length=args.max_new,
            temperature=args.temperature,
            top_p=1.0,
            top_k=0,
            beta=0.0,
            epsilon=args.clip,
            loss_type="dapo",
            scale_rewards="group",
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_steps=args.steps,
            disable_dropout=True,
            activation_checkpointing=False,  # GRPOConfig defaults to True (recomputes activations); userloop: off
            optim="adamw_torch",  # torch.optim.AdamW, as userloop and the floor (TRL's default is the fused kernel)
            use_vllm=False,
            use_cpu=args.device == "cpu",
            bf16=args.bf16,
            model_init_kwargs={"dtype": "float32"},
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=args.seed,
        )
        trainer = GRPOTrainer(
            model=args.model,
            reward_funcs=accuracy_reward,
            args=config,
            train_dataset=dataset,
            peft_config=peft_config,
            callbacks=[timer, TokenLog()],
        )
        if phases is not None:
            phases.install(trainer)
        trainer.train()
    result = {"step_s": timer.step_s, "tokens": tokens, "completions": args.batch * args.group,
              "in_process_s": time.perf_counter() - T_START}  # fmt: skip
    if phases is not None:
        result.update(phases.result())
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f)


class _Phases:
    """``--phases``: per optimizer step, the time in ``generate`` and in ``_generate_and_score_completions``, and
    the shapes of the training forwards (``_get_per_token_logps_and_entropies`` with grad enabled)."""

    def __init__(self, cuda: bool) -> None:
        import torch

        self.torch = torch
        self.cuda = cuda
        self.generate_s: list[float] = []
        self.gen_score_s: list[float] = []
        self.forwards: list[list[dict]] = []  # per step: one entry per forward with grad
        self.no_grad_forwards = 0
        self._gen = self._score = 0.0
        self._fwd: list[dict] = []

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def step_timer(self, timer):
        """``timer`` with synchronised span ends and the per-step phase accumulators reset and collected."""
        begin, end = timer.on_step_begin, timer.on_step_end

        def on_step_begin(*a, **k):
            self.sync()
            self._gen = self._score = 0.0
            self._fwd = []
            begin(*a, **k)

        def on_step_end(*a, **k):
            self.sync()
            end(*a, **k)
            self.generate_s.append(self._gen)
            self.gen_score_s.append(self._score)
            self.forwards.append(self._fwd)

        timer.on_step_begin, timer.on_step_end = on_step_begin, on_step_end
        return timer

    def install(self, trainer) -> None:
        model = trainer.model
        generate = model.generate
        score = trainer._generate_and_score_completions
        logps = trainer._get_per_token_logps_and_entropies
        torch = self.torch

        def timed_generate(*a, **k):
            self.sync()
            t0 = time.perf_counter()
            out = generate(*a, **k)
            self.sync()
            self._gen += time.perf_counter() - t0
            return out

        def timed_score(*a, **k):
            self.sync()
            t0 = time.perf_counter()
            out = score(*a, **k)
            self.sync()
            self._score += time.perf_counter() - t0
            return out

        def traced_logps(model_, input_ids, attention_mask, logits_to_keep, *a, **k):
            # scored: the real tokens of the last logits_to_keep columns (the fused head's shifted labels)
            if torch.is_grad_enabled():
                self._fwd.append({"rows": int(input_ids.shape[0]), "width": int(input_ids.shape[1]),
                                  "scored": attention_mask[:, -logits_to_keep:].sum()})  # fmt: skip
            else:
                self.no_grad_forwards += 1
            return logps(model_, input_ids, attention_mask, logits_to_keep, *a, **k)

        model.generate = timed_generate
        trainer._generate_and_score_completions = timed_score
        trainer._get_per_token_logps_and_entropies = traced_logps

    def result(self) -> dict:
        forwards = [[{**f, "scored": int(f["scored"])} for f in step] for step in self.forwards]
        return {"generate_s": self.generate_s, "gen_score_s": self.gen_score_s, "forwards": forwards,
                "no_grad_forwards": self.no_grad_forwards}  # fmt: skip


if __name__ == "__main__":
    main()
