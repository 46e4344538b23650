"""The model ladder: one :class:`~lm.models.base.LanguageModel` subclass per family, found by importing every
module of this package (a new family file registers itself: nothing here lists the families).

``build_model(cfg, vocab_size)`` is the one way to instantiate a model; the contract every family keeps is
in :mod:`lm.models.base`.
"""

from __future__ import annotations

import importlib
import pkgutil

from lm.families import ModelConfig, families
from lm.models.base import COMPONENTS, IGNORE_INDEX, REGISTRY, LanguageModel

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_model(cfg: ModelConfig, vocab_size: int) -> LanguageModel:
    """Instantiate the model of ``cfg``'s family.

    Initialisation draws from torch's global RNG: seed it (``torch.manual_seed``) first for a reproducible
    init. To count the parameters of a big model without allocating it, build it under
    ``with torch.device("meta"):``.
    """
    family = getattr(cfg, "family", None)
    if family not in REGISTRY:
        if family in families():
            raise ValueError(
                f"family {family!r} has a config but no model class: define a LanguageModel subclass with "
                f"Config = {type(cfg).__name__} in a module of lm/models/"
            )
        raise ValueError(f"unknown model family {family!r}; must be one of {', '.join(families())}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    return REGISTRY[family](cfg, vocab_size)


__all__ = ["COMPONENTS", "IGNORE_INDEX", "REGISTRY", "LanguageModel", "build_model"]
