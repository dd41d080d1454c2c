"""False-negative elimination (Huynh et al., "Boosting Contrastive Self-Supervised Learning with
False Negative Cancellation", WACV 2022): negatives taken to be false ones are removed from the
denominator, weight 0, the others keep weight 1 (no renormalisation: SANW-Debias with hard 0/1
weights and no mass preservation). Which ones: each anchor's ``fnc_top_k`` negatives of highest
affinity when it is above 0, else those with affinity above ``fnc_threshold``; the affinity is
SANW's, from the same source (``--affinity``). The paper's attraction variant (treating them as
positives) is not implemented."""

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
from clipse.losses.weighted import weighted_infonce


@register_loss
@dataclasses.dataclass(frozen=True)
class FalseNegativeCancellation(ContrastiveLoss):
    fnc_threshold: float = loss_param(0.8, "FNC: negatives with an affinity above this are removed")
    fnc_top_k: int = loss_param(0, "FNC: remove each anchor's k negatives of highest affinity instead (0 = use the "
                                   "threshold)")
    rho: float = loss_param(0.5, "affinity mix: 1.0 = text-only affinity, 0.0 = image-only")

    name = "fnc"
    summary = "false-negative elimination (Huynh et al. 2022)"
    uses_affinity = True

    def problems(self) -> list[str]:
        problems = [] if self.fnc_top_k >= 0 else [f"fnc_top_k={self.fnc_top_k}: needs fnc_top_k >= 0"]
        return problems + ([] if 0 <= self.rho <= 1 else [f"rho={self.rho}: needs 0 <= rho <= 1"])

    def negative_weights(self, image_emb: torch.Tensor, text_emb: torch.Tensor, reference: Reference | None = None,
                         scale=1.0) -> torch.Tensor:
        aff = affinity_of(image_emb, text_emb, self.rho, reference)
        return self._weights(aff)

    def _weights(self, aff: torch.Tensor) -> torch.Tensor:
        batch = aff.shape[0]
        eye = torch.eye(batch, dtype=torch.bool, device=aff.device)
        if self.fnc_top_k > 0 and batch > 1:
            k = min(self.fnc_top_k, batch - 1)
            top = aff.masked_fill(eye, float("-inf")).topk(k, dim=1).indices
            removed = torch.zeros_like(eye).scatter_(1, top, True)
        else:
            removed = (aff > self.fnc_threshold) & ~eye
        return (~removed).to(aff.dtype)

    def __call__(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale,
                 reference: Reference | None = None) -> LossResult:
        aff = affinity_of(image_emb, text_emb, self.rho, reference)
        weights = self._weights(aff)
        return weighted_infonce(image_emb, text_emb, scale, weights), weight_stats(weights, aff)
