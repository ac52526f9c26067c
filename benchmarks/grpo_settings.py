"""Settings shared by the three GRPO step commands (userloop, TRL, floor), so they cannot drift apart."""

from __future__ import annotations

# The same adapter everywhere: userloop's defaults (model.lora), dropout off (userloop disables dropout in RL).
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
