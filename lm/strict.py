"""The base of every typed params model (lm/config.py's sections, lm/families.py's model configs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base: unknown keys are errors, instances are immutable, docstrings describe fields, and no float
    setting may be NaN or infinite (YAML's .nan / .inf: e.g. an infinite weight_decay would train NaNs)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)
