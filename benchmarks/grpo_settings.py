"""Settings shared by the three GRPO step commands (userloop, TRL, floor), so they cannot drift apart."""

from __future__ import annotations

import argparse

# The same adapter everywhere: userloop's defaults (model.lora), dropout off (userloop disables dropout in RL).
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def compared_command_parser(description: str) -> argparse.ArgumentParser:
    """The command line every compared GRPO command takes, so they cannot drift apart."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, required=True, help="prompts per step")
    ap.add_argument("--group", type=int, required=True, help="completions per prompt")
    ap.add_argument("--max-new", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=0.2)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    return ap
