"""SANW-Bandpass: emphasises mid-hard negatives, ``w~ = 1 + alpha * b`` with ``b`` high inside [m1, m2]."""

from __future__ import annotations

import dataclasses

import torch

from clipse.losses.base import LossResult, loss_param, register_loss
from clipse.losses.sanw import SanwLoss, band_response


@register_loss
@dataclasses.dataclass(frozen=True)
class SanwBandpass(SanwLoss):
    m1: float = loss_param(0.2, "SANW-Bandpass lower band edge")
    m2: float = loss_param(0.85, "SANW-Bandpass upper band edge")
    gamma: float = loss_param(0.75, "SANW-Bandpass edge width")

    name = "sanw_bandpass"
    summary = "SANW-Bandpass: mid-hard negatives count more"

    def raw_weights(self, aff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        band = band_response(aff, m1=self.m1, m2=self.m2, gamma=self.gamma)
        return 1.0 + self.alpha * band, band

    def problems(self) -> list[str]:
        own = []
        if self.alpha < 0:
            own.append(f"alpha={self.alpha}: SANW-Bandpass needs alpha >= 0")
        if not self.m1 < self.m2:
            own.append(f"m1={self.m1}, m2={self.m2}: the band needs m1 < m2")
        if self.gamma <= 0:
            own.append(f"gamma={self.gamma}: needs gamma > 0")
        return own + super().problems()


def sanw_bandpass_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale, *, alpha: float, m1: float,
                       m2: float, gamma: float, rho: float = SanwBandpass.rho) -> LossResult:
    return SanwBandpass(alpha=alpha, m1=m1, m2=m2, gamma=gamma, rho=rho).checked()(image_emb, text_emb, scale)
