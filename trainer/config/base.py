"""The base of every config section, in its own module so that section modules (``cluster.py``) and the
``RunConfig`` in ``schema.py`` can both import it without a cycle."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, never silently ignored.

    pydantic's own error text quotes each bad input (``input_value=...``), and an input may be an API key that
    ``${VAR}`` pulled in: hidden. ``trainer.config`` renders its errors from ``errors()``, with keys hidden."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)


class RewardBase(Section):
    """Fields every entry of ``rewards`` has; here so that ``multiturn.py`` (``llm_judge``) needs no ``schema``."""

    weight: float = Field(1.0, description="Multiplier of this reward in the sum.")
    name: str | None = Field(None, description="Metric name (`reward/<name>`); defaults to the type.")
