"""Similarity-Aware Negative Weighting: affinity, the two weight families, normalisation, stats,
and ``SanwLoss``, the base both SANW losses share (their formulas are in ``docs/reference/losses.md``)."""

from __future__ import annotations

import dataclasses

import torch

from clipse.losses.base import (
    SUPPRESSED_BELOW,
    ContrastiveLoss,
    LossResult,
    Reference,
    loss_param,
)
from clipse.losses.weighted import weighted_infonce

# Statistic thresholds (docs/reference/losses.md): a negative is "suppressed" below 0.9 (SUPPRESSED_BELOW),
# "emphasised" above 1.1.
EMPHASISED_ABOVE = 1.1
BAND_COVERED_ABOVE = 0.5


@torch.no_grad()
def affinity(image_emb: torch.Tensor, text_emb: torch.Tensor, rho: float = 0.5) -> torch.Tensor:
    """``A_ij = rho <v_i, v_j> + (1 - rho) <u_i, u_j>``, without gradient, in float32 or wider."""
    u = image_emb.detach()
    v = text_emb.detach()
    if u.dtype in (torch.float16, torch.bfloat16):
        u, v = u.float(), v.float()
    return rho * (v @ v.T) + (1.0 - rho) * (u @ u.T)


def affinity_of(image_emb: torch.Tensor, text_emb: torch.Tensor, rho: float,
                reference: Reference | None = None) -> torch.Tensor:
    """The affinity a loss uses: the given matrix, else ``affinity`` of the reference's
    embeddings, else of the embeddings being trained (``--affinity``)."""
    if reference is None:
        return affinity(image_emb, text_emb, rho)
    if reference.matrix is not None:
        return reference.matrix.float()
    return affinity(reference.image, reference.text, rho)


def debias_raw_weights(aff: torch.Tensor, *, alpha: float, delta: float, lam: float) -> torch.Tensor:
    """``w~ = 1 - alpha * sigmoid(lambda * (A - delta))``: likely false negatives count less."""
    return 1.0 - alpha * torch.sigmoid(lam * (aff - delta))


def band_response(aff: torch.Tensor, *, m1: float, m2: float, gamma: float) -> torch.Tensor:
    """``b = sigmoid((A - m1) / gamma) * sigmoid((m2 - A) / gamma)``: high inside [m1, m2]."""
    return torch.sigmoid((aff - m1) / gamma) * torch.sigmoid((m2 - aff) / gamma)


def mass_preserving(raw: torch.Tensor) -> torch.Tensor:
    """Rescale each row's off-diagonal weights to average 1; the diagonal is set to 1.

    So the total negative mass equals InfoNCE's and only its distribution changes. With a
    single sample there are no negatives and the weights are just ``[[1]]``.
    """
    batch = raw.shape[0]
    eye = torch.eye(batch, dtype=torch.bool, device=raw.device)
    if batch < 2:
        return torch.ones_like(raw)
    off = raw.masked_fill(eye, 0.0)
    weights = off * ((batch - 1) / off.sum(dim=1, keepdim=True))
    return weights.masked_fill(eye, 1.0)


@torch.no_grad()
def weight_stats(
    weights: torch.Tensor, aff: torch.Tensor, band: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The weight statistics over the off-diagonal entries (NaN when the batch has no negatives).

    Values stay 0-d tensors, computed with masked reductions (no boolean indexing, whose output
    size a GPU would have to report back), so that a training step never waits for the device;
    ``weight_std`` is the population standard deviation.
    """
    batch = weights.shape[0]
    names = ["weight_mean", "weight_std", "weight_min", "weight_max", "share_suppressed", "share_emphasised",
             "affinity_mean"] + (["band_coverage"] if band is not None else [])
    if batch < 2:
        nan = torch.tensor(float("nan"), device=weights.device)
        return {name: nan for name in names}
    eye = torch.eye(batch, dtype=torch.bool, device=weights.device)
    off = (~eye).float()
    count = batch * (batch - 1)
    w = weights.float()
    mean = (w * off).sum() / count
    stats = {
        "weight_mean": mean,
        "weight_std": (((w - mean) ** 2) * off).sum().div(count).sqrt(),
        "weight_min": w.masked_fill(eye, float("inf")).amin(),
        "weight_max": w.masked_fill(eye, float("-inf")).amax(),
        "share_suppressed": ((w < SUPPRESSED_BELOW).float() * off).sum() / count,
        "share_emphasised": ((w > EMPHASISED_ABOVE).float() * off).sum() / count,
        "affinity_mean": (aff.float() * off).sum() / count,
    }
    if band is not None:
        stats["band_coverage"] = ((band > BAND_COVERED_ABOVE).float() * off).sum() / count
    return stats


@dataclasses.dataclass(frozen=True)
class SanwLoss(ContrastiveLoss):
    """Weighted InfoNCE whose negative weights come from the affinity, rescaled to average 1
    per sample. Subclasses give the raw weights (and any extra statistic)."""

    alpha: float = loss_param(0.2, "SANW strength")
    rho: float = loss_param(0.5, "affinity mix: 1.0 = text-only affinity, 0.0 = image-only")
    strength = "alpha"
    uses_affinity = True

    def raw_weights(self, aff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unnormalised weights from the affinity, and the band response where there is one."""
        raise NotImplementedError

    def problems(self) -> list[str]:
        return [] if 0 <= self.rho <= 1 else [f"rho={self.rho}: needs 0 <= rho <= 1"]

    def __call__(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale,
                 reference: Reference | None = None) -> LossResult:
        aff = affinity_of(image_emb, text_emb, self.rho, reference)
        raw, band = self.raw_weights(aff)
        weights = mass_preserving(raw)
        return weighted_infonce(image_emb, text_emb, scale, weights), weight_stats(weights, aff, band)

    def negative_weights(self, image_emb: torch.Tensor, text_emb: torch.Tensor, reference: Reference | None = None,
                         scale=1.0) -> torch.Tensor:
        return mass_preserving(self.raw_weights(affinity_of(image_emb, text_emb, self.rho, reference))[0])
