"""Contrastive losses of SPEC §1. Each takes L2-normalised embeddings and the logit multiplier
``scale`` and returns ``(loss, stats)``; the three differ only in the negative weights."""

from __future__ import annotations

from typing import Callable

import torch

from clipse.losses.sanw import (
    affinity,
    band_response,
    debias_raw_weights,
    mass_preserving,
    weight_stats,
)
from clipse.losses.weighted import MAX_LOGIT_SCALE, clamp_scale, weighted_infonce

LossResult = tuple[torch.Tensor, dict[str, torch.Tensor]]


def infonce_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale) -> LossResult:
    """CLIP's symmetric InfoNCE; its stats are those of all-ones weights (for comparison)."""
    aff = affinity(image_emb, text_emb)
    loss = weighted_infonce(image_emb, text_emb, scale)
    return loss, weight_stats(torch.ones_like(aff), aff)


def sanw_debias_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, scale, *,
    alpha: float, delta: float, lam: float, rho: float = 0.5,
) -> LossResult:
    """Down-weights likely false negatives: ``w~ = 1 - alpha * sigmoid(lam * (A - delta))``."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"sanw_debias needs 0 <= alpha < 1 (weights must stay positive), got {alpha}")
    aff = affinity(image_emb, text_emb, rho)
    weights = mass_preserving(debias_raw_weights(aff, alpha=alpha, delta=delta, lam=lam))
    return weighted_infonce(image_emb, text_emb, scale, weights), weight_stats(weights, aff)


def sanw_bandpass_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, scale, *,
    alpha: float, m1: float, m2: float, gamma: float, rho: float = 0.5,
) -> LossResult:
    """Emphasises mid-hard negatives: ``w~ = 1 + alpha * b`` with ``b`` high inside [m1, m2]."""
    if alpha < 0.0 or gamma <= 0.0 or not m1 < m2:
        raise ValueError(f"sanw_bandpass needs alpha >= 0, gamma > 0 and m1 < m2, got "
                         f"alpha={alpha}, gamma={gamma}, m1={m1}, m2={m2}")
    aff = affinity(image_emb, text_emb, rho)
    band = band_response(aff, m1=m1, m2=m2, gamma=gamma)
    weights = mass_preserving(1.0 + alpha * band)
    return weighted_infonce(image_emb, text_emb, scale, weights), weight_stats(weights, aff, band)


LOSSES: dict[str, Callable[..., LossResult]] = {
    "infonce": infonce_loss,
    "sanw_debias": sanw_debias_loss,
    "sanw_bandpass": sanw_bandpass_loss,
}

__all__ = [
    "LOSSES", "MAX_LOGIT_SCALE", "clamp_scale", "infonce_loss", "sanw_bandpass_loss",
    "sanw_debias_loss", "weighted_infonce",
]
