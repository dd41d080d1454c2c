"""Ground truth of a split: which captions truly describe which images (known for generated data).

Each image holds a set of facts and each caption requires some; caption c describes image i
when every fact c requires is among i's facts. Facts are stored as small integer tables, so
that a batch's or a whole split's truth is one vectorised comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np
import torch

PAD = -1        # padding of both tables: an image's padding satisfies a caption's padding
_CAPTION_BLOCK = 1024


@dataclass
class CaptionTruth:
    image_facts: torch.Tensor    # (N, F) int64: each image's facts, padded with PAD (at least one pad)
    caption_facts: torch.Tensor  # (C, K) int64: the facts each caption requires, padded with PAD

    @classmethod
    def from_facts(cls, images: Sequence[Iterable[str]], captions: Sequence[Iterable[str]]) -> "CaptionTruth":
        ids: dict[str, int] = {}

        def table(rows: Sequence[Iterable[str]], extra_pad: int) -> torch.Tensor:
            coded = [[ids.setdefault(fact, len(ids)) for fact in sorted(set(row))] for row in rows]
            width = max((len(row) for row in coded), default=0) + extra_pad
            return torch.tensor([row + [PAD] * (width - len(row)) for row in coded], dtype=torch.long).reshape(
                len(coded), width)

        return cls(image_facts=table(images, 1), caption_facts=table(captions, 0))

    def pack(self) -> np.ndarray:
        """Both tables in one flat int64 array (their shapes first), as the cache stores them."""
        return np.concatenate([np.array([*self.image_facts.shape, *self.caption_facts.shape], dtype=np.int64),
                               self.image_facts.numpy().ravel(), self.caption_facts.numpy().ravel()])

    @classmethod
    def unpack(cls, packed: np.ndarray) -> "CaptionTruth":
        n, f, c, k = (int(x) for x in packed[:4])
        tables = torch.from_numpy(np.asarray(packed[4:], dtype=np.int64))
        return cls(image_facts=tables[:n * f].reshape(n, f), caption_facts=tables[n * f:n * f + c * k].reshape(c, k))

    @cached_property
    def every_pair(self) -> torch.Tensor:
        """``describes()`` of the whole split, computed once (evaluation asks every epoch)."""
        return self.describes()

    def describes(self, caption_rows: torch.Tensor | None = None, image_rows: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """(len(caption_rows), len(image_rows)) bool: caption describes image (all rows by default)."""
        required = self.caption_facts if caption_rows is None else self.caption_facts[caption_rows]
        held = self.image_facts if image_rows is None else self.image_facts[image_rows]
        blocks = []
        for start in range(0, len(required), _CAPTION_BLOCK):
            block = required[start:start + _CAPTION_BLOCK]
            blocks.append((block[:, None, :, None] == held[None, :, None, :]).any(-1).all(-1))
        return torch.cat(blocks) if blocks else torch.zeros((0, len(held)), dtype=torch.bool)
