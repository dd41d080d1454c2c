"""Debiased contrastive loss (Chuang et al., "Debiased Contrastive Learning", NeurIPS 2020). With
class prior ``τ⁺`` (the chance that a negative is a false one) and N = B − 1 negatives per
anchor, the negatives' sum is replaced by ``N g``,
``g = max((mean_j≠i exp(l_ij) − τ⁺ exp(l_ii)) / (1 − τ⁺), exp(−s))`` (the floor is e^(−1/t)),
``loss_i = −l_ii + log(exp(l_ii) + N g)``, the mean of image→text and text→image. ``τ⁺ = 0`` is
InfoNCE. It corrects the denominator as a whole: no per-negative weights."""

from __future__ import annotations

import dataclasses

import torch

from clipse.losses.base import (
    ContrastiveLoss,
    LossResult,
    Reference,
    loss_param,
    register_loss,
)
from clipse.losses.sanw import affinity_of, weight_stats
from clipse.losses.weighted import clamp_scale


def debiased_direction(logits: torch.Tensor, scale, tau_plus: float, reweight: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Mean over rows of ``−l_ii + log(exp(l_ii) + N g_i)``, computed with each row's maximum
    taken out; ``reweight`` (B, B), mean 1 over each row's negatives, weighs the negatives
    (HCL's importance weights; None: all 1)."""
    batch = logits.shape[0]
    if batch < 2:
        return logits.new_zeros(())
    eye = torch.eye(batch, dtype=torch.bool, device=logits.device)
    top = logits.max(dim=1, keepdim=True).values.detach()
    shifted = (logits - top).exp()
    positive = shifted.diagonal()
    negatives = shifted.masked_fill(eye, 0.0) * (1.0 if reweight is None else reweight)
    n = batch - 1
    floor = torch.exp(-torch.as_tensor(scale, dtype=logits.dtype) - top.squeeze(1))
    g = torch.maximum((negatives.sum(dim=1) / n - tau_plus * positive) / (1.0 - tau_plus), floor)
    return (-(logits.diagonal() - top.squeeze(1)) + torch.log(positive + n * g)).mean()


@register_loss
@dataclasses.dataclass(frozen=True)
class DebiasedContrastive(ContrastiveLoss):
    tau_plus: float = loss_param(0.1, "DCL / HCL: class prior, the share of negatives taken to be false ones")

    name = "dcl"
    summary = "debiased contrastive loss (Chuang et al. 2020)"

    def problems(self) -> list[str]:
        return [] if 0 <= self.tau_plus < 1 else [f"tau_plus={self.tau_plus}: needs 0 <= tau_plus < 1"]

    def __call__(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale,
                 reference: Reference | None = None) -> LossResult:
        scale = clamp_scale(scale)
        logits = scale * image_emb @ text_emb.T
        loss = (debiased_direction(logits, scale, self.tau_plus) + debiased_direction(logits.T, scale, self.tau_plus)) / 2
        aff = affinity_of(image_emb, text_emb, 0.5, reference)  # only for its statistics
        return loss, weight_stats(torch.ones_like(aff), aff)
