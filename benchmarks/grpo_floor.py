"""The floor of a GRPO step: one batched ``generate`` and one forward/backward + AdamW step, nothing else.

No rewards, no advantages from data (a fixed random sign per sequence stands in), no logging, no metrics:
what any GRPO trainer must at least do per step on the same model, prompts and shapes. Run as its own
process by ``benchmarks.grpo_step`` so its whole-process time (imports and model load included) compares
with ``launcher run`` and TRL's::

    python -m benchmarks.grpo_floor --model DIR --data train.jsonl --batch 8 --group 8 --max-new 16 \
        --lr 1e-5 --steps 10 [--lora] --out result.json
"""

from __future__ import annotations

import json
import time

from benchmarks.grpo_settings import compared_command_parser

T_START = time.perf_counter()  # before torch is imported: the process's own start-up counts


def main(argv: list[str] | None = None) -> None:
    args = compared_command_parser(__doc__.splitlines()[0]).parse_args(argv)

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.grpo_settings import LORA

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    with open(args.data, encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    eos = tok.eos_token_id
    step_s, gen_s, update_s, tokens = [], [], [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        rows = [prompts[(step * args.batch + i) % len(prompts)] for i in range(args.batch)]
        enc = tok([p for p in rows for _ in range(args.group)], return_tensors="pt", padding=True,
                  add_special_tokens=False)  # fmt: skip
        width = enc.input_ids.shape[1]
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new, do_sample=True, temperature=args.temperature,
                                 top_p=None, top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=eos)  # fmt: skip
        t1 = time.perf_counter()
        completion = out[:, width:]
        # Tokens up to and including the first EOS are trained; later ones are padding.
        after_eos = (completion == eos).long().cumsum(1) - (completion == eos).long()
        mask = torch.cat([torch.zeros_like(enc.input_ids), (after_eos == 0).long()], 1)
        attn = torch.cat([enc.attention_mask, mask[:, width:]], 1)
        adv = torch.randn(out.shape[0]).sign()
        logits = model(input_ids=out, attention_mask=attn).logits[:, :-1].float()
        logp = F.log_softmax(logits / args.temperature, -1).gather(-1, out[:, 1:].unsqueeze(-1)).squeeze(-1)
        target = mask[:, 1:].float()
        n = target.sum().clamp(min=1)
        loss = -(torch.exp(logp - logp.detach()) * adv[:, None] * target).sum() / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
        gen_s.append(t1 - t0)
        update_s.append(step_s[-1] - gen_s[-1])
        tokens.append(int(target.sum()))
    result = {"step_s": step_s, "generate_s": gen_s, "update_s": update_s, "tokens": tokens, "completions": args.batch * args.group,
              "in_process_s": time.perf_counter() - T_START}  # fmt: skip
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
