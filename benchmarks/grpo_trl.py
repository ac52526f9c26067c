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
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from benchmarks.grpo_settings import compared_command_parser

T_START = time.perf_counter()  # before torch is imported: the process's own start-up counts


def main(argv: list[str] | None = None) -> None:
    args = compared_command_parser(__doc__.splitlines()[0]).parse_args(argv)
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
    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as out_dir:
        config = GRPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=args.batch * args.group,
            gradient_accumulation_steps=1,
            steps_per_generation=1,
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
            use_cpu=True,
            bf16=False,
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
        trainer.train()
    result = {"step_s": timer.step_s, "tokens": tokens, "completions": args.batch * args.group,
              "in_process_s": time.perf_counter() - T_START}  # fmt: skip
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
