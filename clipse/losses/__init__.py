"""Contrastive losses (formulas in ``docs/reference/losses.md``). Each takes L2-normalised embeddings and
the logit multiplier ``scale`` and returns ``(loss, stats)``; all are weighted InfoNCE with
different negative weights.

Every module of this package is imported here, so a loss is one module: a dataclass of its
parameters decorated with ``@register_loss`` (see ``clipse.losses.base``).
"""

from __future__ import annotations

import importlib
import pkgutil

from clipse.losses.base import (
    AFFINITY_SOURCES,
    LOSSES,
    STRENGTH_COLUMN,
    ContrastiveLoss,
    LossResult,
    Reference,
    loss_defaults,
    loss_names,
    loss_param,
    loss_parameters,
    register_loss,
)
from clipse.losses.weighted import MAX_LOGIT_SCALE, clamp_scale, weighted_infonce

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from clipse.losses.infonce import infonce_loss  # noqa: E402
from clipse.losses.sanw_bandpass import sanw_bandpass_loss  # noqa: E402
from clipse.losses.sanw_debias import sanw_debias_loss  # noqa: E402

__all__ = [
    "AFFINITY_SOURCES", "LOSSES", "MAX_LOGIT_SCALE", "STRENGTH_COLUMN", "ContrastiveLoss", "LossResult", "Reference", "clamp_scale", "infonce_loss",
    "loss_defaults", "loss_names", "loss_param", "loss_parameters", "register_loss", "sanw_bandpass_loss",
    "sanw_debias_loss", "weighted_infonce",
]
