"""HN-NCE (Radenovic et al., "Filtering, Distillation, and Hard Negatives for Vision-Language
Pre-Training", CVPR 2023): the weighted-InfoNCE core with the negatives weighted by
``exp(β s A_ij)``, normalised to mean 1 over each anchor's negatives (``s`` the logit multiplier,
1/τ). The paper weighs by the cross-modal similarity of each direction; clipse weighs by the
same affinity ``A`` that SANW uses, from the same source (``--affinity``), so that HN-NCE and
SANW differ only in how they map affinity to weight. ``β = 0`` is InfoNCE."""

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
from clipse.losses.weighted import clamp_scale, weighted_infonce


def exponential_weights(aff: torch.Tensor, exponent_scale) -> torch.Tensor:
    """``exp(c A_ij)`` normalised to mean 1 over each row's off-diagonal entries (diagonal 1),
    through a softmax, so that a large ``c`` cannot overflow."""
    batch = aff.shape[0]
    eye = torch.eye(batch, dtype=torch.bool, device=aff.device)
    if batch < 2:
        return torch.ones_like(aff)
    share = torch.softmax((exponent_scale * aff).masked_fill(eye, float("-inf")), dim=1)
    return (share * (batch - 1)).masked_fill(eye, 1.0)


@register_loss
@dataclasses.dataclass(frozen=True)
class HardNegativeNce(ContrastiveLoss):
    beta: float = loss_param(0.5, "HCL / HN-NCE: concentration on hard negatives (0 = none)")
    rho: float = loss_param(0.5, "affinity mix: 1.0 = text-only affinity, 0.0 = image-only")

    name = "hn_nce"
    summary = "HN-NCE: negatives weighted by exp(beta A / tau) (Radenovic et al. 2023)"
    strength = "beta"
    uses_affinity = True

    def problems(self) -> list[str]:
        problems = [] if self.beta >= 0 else [f"beta={self.beta}: needs beta >= 0"]
        return problems + ([] if 0 <= self.rho <= 1 else [f"rho={self.rho}: needs 0 <= rho <= 1"])

    def negative_weights(self, image_emb: torch.Tensor, text_emb: torch.Tensor, reference: Reference | None = None,
                         scale=1.0) -> torch.Tensor:
        aff = affinity_of(image_emb, text_emb, self.rho, reference)
        return exponential_weights(aff, self.beta * torch.as_tensor(clamp_scale(scale)).detach())

    def __call__(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale,
                 reference: Reference | None = None) -> LossResult:
        aff = affinity_of(image_emb, text_emb, self.rho, reference)
        weights = exponential_weights(aff, self.beta * torch.as_tensor(clamp_scale(scale)).detach())
        return weighted_infonce(image_emb, text_emb, scale, weights), weight_stats(weights, aff)
