"""CLIP's symmetric InfoNCE: every negative weighs 1."""

from __future__ import annotations

import dataclasses

import torch

from clipse.losses.base import ContrastiveLoss, LossResult, Reference, register_loss
from clipse.losses.sanw import affinity_of, weight_stats
from clipse.losses.weighted import weighted_infonce


@register_loss
@dataclasses.dataclass(frozen=True)
class InfoNCE(ContrastiveLoss):
    """Its statistics are those of all-ones weights, so every run logs the same columns."""

    name = "infonce"
    summary = "CLIP's symmetric InfoNCE"

    def __call__(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale,
                 reference: Reference | None = None) -> LossResult:
        aff = affinity_of(image_emb, text_emb, 0.5, reference)  # only for its statistics
        return weighted_infonce(image_emb, text_emb, scale), weight_stats(torch.ones_like(aff), aff)

    def compute(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale, with_stats: bool = True,
                false_negatives: torch.Tensor | None = None, reference: Reference | None = None,
                logit_bias: torch.Tensor | None = None) -> LossResult:
        """Without statistics, no affinity: InfoNCE needs none (a subclass that redefines
        ``__call__`` has it called at every step, as any loss)."""
        if with_stats or type(self).__call__ is not InfoNCE.__call__:
            return super().compute(image_emb, text_emb, scale, with_stats, false_negatives, reference, logit_bias)
        return weighted_infonce(image_emb, text_emb, scale), {}


def infonce_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale) -> LossResult:
    return InfoNCE()(image_emb, text_emb, scale)
