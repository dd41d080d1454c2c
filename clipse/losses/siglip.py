"""SigLIP (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023): every
image–caption pair of the batch is its own binary problem,
``loss = -(1/B) Σ_ij log σ(z_ij (s <u_i, v_j> + b))`` with ``z_ii = 1`` and ``z_ij = -1`` otherwise,
``b`` a learnable bias the model gains for it (``init_logit_bias``, the paper's -10). Symmetric by
construction; no affinity, so no negative weights of its own."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from clipse.losses.base import (
    ContrastiveLoss,
    LossResult,
    Reference,
    loss_param,
    register_loss,
)
from clipse.losses.sanw import affinity_of, weight_stats
from clipse.losses.weighted import clamp_scale


@register_loss
@dataclasses.dataclass(frozen=True)
class SigLip(ContrastiveLoss):
    init_logit_bias: float = loss_param(-10.0, "SigLIP: the learnable bias's starting value (the model gains one)")

    name = "siglip"
    summary = "SigLIP's pairwise sigmoid loss with a learnable bias"
    uses_logit_bias = True

    def prepare_model(self, model: torch.nn.Module) -> None:
        if getattr(model, "logit_bias", None) is None:
            model.logit_bias = torch.nn.Parameter(torch.full((1,), self.init_logit_bias,
                                                             device=model.logit_scale.device))

    def __call__(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale, reference: Reference | None = None,
                 logit_bias: torch.Tensor | None = None) -> LossResult:
        if logit_bias is None:
            raise ValueError("siglip needs the model's logit_bias (the trainer adds it)")
        logits = clamp_scale(scale) * image_emb @ text_emb.T + logit_bias
        signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
        loss = -F.logsigmoid(signs * logits).sum() / logits.shape[0]
        aff = affinity_of(image_emb, text_emb, 0.5, reference)  # only for its statistics
        return loss, weight_stats(torch.ones_like(aff), aff)
