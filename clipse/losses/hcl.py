"""Hard-negative contrastive loss (Robinson et al., "Contrastive Learning with Hard Negative
Samples", ICLR 2021): DCL's debiased denominator with the negatives importance-weighted by their
hardness, ``q_ij = exp(β l_ij) / mean_k≠i exp(β l_ik)`` (mean 1 over each anchor's negatives),
``g = max((mean_j≠i q_ij exp(l_ij) − τ⁺ exp(l_ii)) / (1 − τ⁺), exp(−s))``, as the authors' code
computes it (the weights keep their gradient), per direction from that direction's logits, the
mean of both. ``β = 0`` is DCL; ``β = 0, τ⁺ = 0`` is InfoNCE. The natural control for
SANW-Bandpass: it emphasises hard negatives by the model's own cross-modal similarity."""

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
from clipse.losses.dcl import debiased_direction
from clipse.losses.hn_nce import exponential_weights
from clipse.losses.sanw import affinity_of, weight_stats
from clipse.losses.weighted import clamp_scale


@register_loss
@dataclasses.dataclass(frozen=True)
class HardNegativeContrastive(ContrastiveLoss):
    beta: float = loss_param(0.5, "HCL / HN-NCE: concentration on hard negatives (0 = none)")
    tau_plus: float = loss_param(0.1, "DCL / HCL: class prior, the share of negatives taken to be false ones")

    name = "hcl"
    summary = "hard-negative contrastive loss (Robinson et al. 2021)"
    strength = "beta"

    def problems(self) -> list[str]:
        problems = [] if 0 <= self.tau_plus < 1 else [f"tau_plus={self.tau_plus}: needs 0 <= tau_plus < 1"]
        return problems + ([] if self.beta >= 0 else [f"beta={self.beta}: needs beta >= 0"])

    def __call__(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale,
                 reference: Reference | None = None) -> LossResult:
        scale = clamp_scale(scale)
        logits = scale * image_emb @ text_emb.T
        i2t, t2i = exponential_weights(logits, self.beta), exponential_weights(logits.T, self.beta)
        loss = (debiased_direction(logits, scale, self.tau_plus, i2t)
                + debiased_direction(logits.T, scale, self.tau_plus, t2i)) / 2
        aff = affinity_of(image_emb, text_emb, 0.5, reference)
        return loss, weight_stats(i2t.detach(), aff)

    def negative_weights(self, image_emb: torch.Tensor, text_emb: torch.Tensor, reference: Reference | None = None,
                         scale=1.0) -> torch.Tensor:
        """The image→text direction's hardness weights (text→image has its own, from the transpose)."""
        return exponential_weights(clamp_scale(scale) * image_emb @ text_emb.T, self.beta).detach()
