"""SANW-Debias: down-weights likely false negatives, ``w~ = 1 - alpha * sigmoid(lambda (A - delta))``."""

from __future__ import annotations

import dataclasses

import torch

from clipse.losses.base import LossResult, loss_param, register_loss
from clipse.losses.sanw import SanwLoss, debias_raw_weights


@register_loss
@dataclasses.dataclass(frozen=True)
class SanwDebias(SanwLoss):
    delta: float = loss_param(0.3, "SANW-Debias threshold on the affinity")
    lam: float = loss_param(1.0, "SANW-Debias gate sharpness", key="lambda")

    name = "sanw_debias"
    summary = "SANW-Debias: likely false negatives count less"

    def raw_weights(self, aff: torch.Tensor) -> tuple[torch.Tensor, None]:
        return debias_raw_weights(aff, alpha=self.alpha, delta=self.delta, lam=self.lam), None

    def problems(self) -> list[str]:
        own = [] if 0 <= self.alpha < 1 else [f"alpha={self.alpha}: SANW-Debias needs 0 <= alpha < 1 "
                                               "(weights must stay positive)"]
        return own + super().problems()


def sanw_debias_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale, *, alpha: float, delta: float,
                     lam: float, rho: float = SanwDebias.rho) -> LossResult:
    return SanwDebias(alpha=alpha, delta=delta, lam=lam, rho=rho).checked()(image_emb, text_emb, scale)
