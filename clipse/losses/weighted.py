"""The one weighted-InfoNCE core every loss shares (docs/reference/losses.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = 100.0


def clamp_scale(scale: torch.Tensor | float) -> torch.Tensor | float:
    """The logit multiplier ``s = exp(logit_scale)`` is used clamped to at most 100."""
    if isinstance(scale, torch.Tensor):
        return scale.clamp(max=MAX_LOGIT_SCALE)
    return min(float(scale), MAX_LOGIT_SCALE)


def weighted_infonce(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    scale: torch.Tensor | float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE where sample j counts ``weights[i, j]`` times as a negative of sample i.

    ``weights`` has ones on the diagonal and is detached; ``None`` means all ones (plain CLIP
    InfoNCE). Computed stably as cross-entropy over ``l + log(w)`` and ``l^T + log(w)``: the
    same row i of ``w`` weighs image i's captions and caption i's images.
    """
    logits = clamp_scale(scale) * image_emb @ text_emb.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    logits_i2t, logits_t2i = logits, logits.T
    if weights is not None:
        log_w = weights.to(logits.dtype).log()
        logits_i2t, logits_t2i = logits_i2t + log_w, logits_t2i + log_w
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
