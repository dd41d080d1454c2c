"""Decoupled contrastive loss (Yeh et al., "Decoupled Contrastive Learning", ECCV 2022): the
positive is removed from the denominator, ``loss_i = −l_ii + log Σ_j≠i exp(l_ij)``, the mean of
image→text and text→image. A batch of one pair has no negatives and its loss is 0."""

from __future__ import annotations

import dataclasses

import torch

from clipse.losses.base import ContrastiveLoss, LossResult, Reference, register_loss
from clipse.losses.sanw import affinity_of, weight_stats
from clipse.losses.weighted import clamp_scale


def decoupled_direction(logits: torch.Tensor) -> torch.Tensor:
    batch = logits.shape[0]
    if batch < 2:
        return logits.new_zeros(())
    eye = torch.eye(batch, dtype=torch.bool, device=logits.device)
    return (logits.masked_fill(eye, float("-inf")).logsumexp(dim=1) - logits.diagonal()).mean()


@register_loss
@dataclasses.dataclass(frozen=True)
class Decoupled(ContrastiveLoss):
    name = "decoupled"
    summary = "decoupled contrastive loss: no positive in the denominator (Yeh et al. 2022)"

    def __call__(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale,
                 reference: Reference | None = None) -> LossResult:
        logits = clamp_scale(scale) * image_emb @ text_emb.T
        loss = (decoupled_direction(logits) + decoupled_direction(logits.T)) / 2
        aff = affinity_of(image_emb, text_emb, 0.5, reference)  # only for its statistics
        return loss, weight_stats(torch.ones_like(aff), aff)
