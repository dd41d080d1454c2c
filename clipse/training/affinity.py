"""Where a loss's affinity comes from (``--affinity``; docs/reference/losses.md):

- ``online``: the embeddings being trained (no gradient through the affinity): the default;
- ``frozen``: the starting model (the pretrained checkpoint), never updated. Its embeddings of
  the training split, un-augmented, are computed once per run and looked up per batch;
- ``ema``: an exponential moving average of the model, ``θ_ema ← d·θ_ema + (1 − d)·θ`` after
  every optimizer step (``d`` = ``--ema-decay``, starting from the starting model); it encodes
  each batch as the model sees it, and is saved in ``last.pt`` and restored on resume;
- ``truth``: the data's known answer (the synthetic data): ``A_ij = 1`` where caption j truly
  describes image i or caption i image j, else 0; the oracle of what down-weighting false
  negatives can give.

A source gives the trainer a ``Reference`` for each step's global batch, which the loss turns
into its affinity (with its own ``rho`` for embeddings). Losses without an affinity ignore it.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch

from clipse.data import SplitTensors
from clipse.evaluation.encoding import ImageNormalizer, encode_split
from clipse.losses import Reference
from clipse.training.batches import StepBatch
from clipse.training.distributed import Ranks
from clipse.training.global_batch import encode_pair
from clipse.util.errors import UserError


class AffinitySource:
    """The online source: the loss computes its affinity from the embeddings it is given."""

    name: ClassVar[str] = "online"

    def reference(self, pairs: np.ndarray, batch: StepBatch, ranks: Ranks, autocast) -> Reference | None:
        """What the loss takes its affinity from for the global batch of these training pairs."""
        return None

    def after_step(self, model: torch.nn.Module) -> None:
        """Called after every optimizer step."""

    def state_dict(self) -> dict | None:
        """What ``last.pt`` keeps of the source (None: nothing, it is rebuilt on resume)."""
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass


class FrozenTeacher(AffinitySource):
    """The starting model's embeddings of every training pair, computed once."""

    name = "frozen"

    def __init__(self, model: torch.nn.Module, split: SplitTensors, normalize: ImageNormalizer, autocast):
        images, texts = encode_split(model, split, normalize, autocast)
        self.images, self.texts, self.caption_image = images, texts, split.caption_image
        self.device = normalize.device

    def reference(self, pairs, batch, ranks, autocast):
        rows = torch.from_numpy(pairs)
        return Reference(image=self.images[self.caption_image[rows]].to(self.device),
                         text=self.texts[rows].to(self.device))


class EmaTeacher(AffinitySource):
    """An exponential moving average of the model's parameters (its buffers copied), which
    encodes each step's batch without gradient."""

    name = "ema"

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def reference(self, pairs, batch, ranks, autocast):
        with autocast():
            image, text = encode_pair(self.model, batch.images(), batch.tokens)
        sizes = ranks.shares(batch.global_size)
        return Reference(image=ranks.gather_detached(image.float(), sizes), text=ranks.gather_detached(text.float(), sizes))

    @torch.no_grad()
    def after_step(self, model):
        teacher = list(self.model.parameters())
        student = [p.detach() for p in model.parameters()]
        torch._foreach_mul_(teacher, self.decay)  # θ_ema·d + θ·(1 − d), the two products rounded apart
        torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - self.decay))

    def state_dict(self):
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, state):
        if state is not None:
            self.model.load_state_dict(state["model"])


class GroundTruth(AffinitySource):
    """``A_ij = 1`` where either pair's caption truly describes the other's image (pairs of one
    image included), from the data's ground truth."""

    name = "truth"

    def __init__(self, split: SplitTensors, device: torch.device):
        if split.truth is None:
            raise UserError("--affinity truth needs data that knows which captions describe which images "
                            "(the synthetic shapes data)")
        self.split, self.device = split, device

    def reference(self, pairs, batch, ranks, autocast):
        describes = true_false_negatives(self.split, pairs, self.device)  # [i, j]: caption j describes image i
        return Reference(matrix=(describes | describes.T).float())


def true_false_negatives(split: SplitTensors, pairs: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """(B, B) bool of a global batch, where the data knows it: [i, j] is True when pair j's
    caption truly describes pair i's image (pairs of one image included)."""
    if split.truth is None:
        return None
    rows = torch.from_numpy(pairs)
    return split.truth.describes(rows, split.caption_image[rows]).T.to(device)


def affinity_source(name: str, model: torch.nn.Module, split: SplitTensors, normalize: ImageNormalizer, autocast,
                    ema_decay: float) -> AffinitySource:
    """The source ``--affinity`` names, built from the model as it starts (before any resume)."""
    if name == "frozen":
        return FrozenTeacher(model, split, normalize, autocast)
    if name == "ema":
        return EmaTeacher(model, ema_decay)
    if name == "truth":
        return GroundTruth(split, normalize.device)
    return AffinitySource()
