"""userloop's trainer: SFT and GRPO for LLM agents, run by ``python -m trainer --config PATH``.

This package's ``__init__`` imports nothing heavy: the launcher imports ``trainer.config`` without torch.
The notebook API lives in ``trainer.api`` (``train``, ``evaluate``, ``inspect_data``).
"""

__version__ = "0.1.0"
