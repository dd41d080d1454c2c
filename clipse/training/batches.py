"""Training batches on the training device: gathered from a split's decoded images (a read-only
memory map shared by the processes of a node), normalised, and optionally augmented.

On CUDA a batch is gathered into pinned host memory and copied asynchronously (two buffers
take turns, so gathering the next batch overlaps the copy of this one). Augmentation
(``--augment``) runs on the device, on the whole batch at once, with its random draws seeded
by (seed, step): a run and its resumed continuation see the same crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clipse.data import SplitTensors
from clipse.evaluation.encoding import ImageNormalizer
from clipse.training.distributed import SINGLE_PROCESS, Ranks

CROP_SCALE = (0.9, 1.0)        # share of the image area a crop keeps (OpenCLIP's training default)
CROP_RATIO = (3 / 4, 4 / 3)    # aspect ratios of the crop


def augment_batch(images: torch.Tensor, generator: torch.Generator, flip: bool,
                  rows: slice | None = None, draws: int | None = None) -> torch.Tensor:
    """Random resized crops (and horizontal flips) of a float (B, 3, R, R) batch, back at R x R:
    one affine resampling per image, drawn from ``generator`` on the CPU. A rank of a
    data-parallel run draws for the whole batch (``draws``) and keeps its ``rows``, so that its
    images get the crops they get in one process."""
    batch = draws or images.shape[0]
    area = torch.empty(batch).uniform_(*CROP_SCALE, generator=generator)
    log_ratio = torch.empty(batch).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=generator)
    ratio = log_ratio.exp()
    width, height = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    centre_x = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - height)
    mirror = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(batch)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * mirror, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    theta = theta[rows or slice(None)].contiguous()
    if images.device.type == "cuda":
        theta = theta.pin_memory()  # so that the copy below does not wait
    theta = theta.to(images.device, images.dtype, non_blocking=True)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@dataclass
class StepBatch:
    """A rank's share of one step's batch, on the device: its tokens, and its images as uint8
    until asked for (``images(rows)``: normalised and augmented), so that a micro-batched step
    holds floats for one chunk at a time."""

    raw_images: torch.Tensor     # (n, 3, R, R) uint8
    tokens: torch.Tensor         # (n, L)
    normalize: ImageNormalizer
    augment: str
    generator_seed: int
    offset: int                  # this share's first row in the global batch
    global_size: int

    def __len__(self) -> int:
        return len(self.tokens)

    def images(self, rows: slice = slice(None)) -> torch.Tensor:
        images = self.normalize(self.raw_images[rows])
        if self.augment == "none":
            return images
        start, stop, _ = rows.indices(len(self))
        generator = torch.Generator().manual_seed(self.generator_seed)
        return augment_batch(images, generator, flip=self.augment == "crop_flip",
                             rows=slice(self.offset + start, self.offset + stop), draws=self.global_size)


class TrainingBatches:
    """``batches(pairs, step, ranks) -> StepBatch``: this rank's share of a global batch."""

    def __init__(self, split: SplitTensors, normalize: ImageNormalizer, augment: str = "none", seed: int = 0):
        self.split, self.normalize, self.augment, self.seed = split, normalize, augment, seed
        self.device = normalize.device
        self._buffers: list[tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]] = []
        self._turn = 0

    def _gather_pinned(self, rows: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._buffers or self._buffers[0][0].shape[0] < len(rows):
            image_shape, token_shape = self.split.images.shape[1:], self.split.tokens.shape[1:]
            self._buffers = [(torch.empty((len(rows), *image_shape), dtype=torch.uint8).pin_memory(),
                              torch.empty((len(rows), *token_shape), dtype=self.split.tokens.dtype).pin_memory(),
                              torch.cuda.Event()) for _ in range(2)]
        images, tokens, copied = self._buffers[self._turn]
        self._turn = 1 - self._turn
        copied.synchronize()  # the copy out of this buffer two batches ago has finished
        n = len(rows)
        torch.index_select(self.split.images, 0, rows, out=images[:n])
        torch.index_select(self.split.tokens, 0, pairs, out=tokens[:n])
        on_device = images[:n].to(self.device, non_blocking=True), tokens[:n].to(self.device, non_blocking=True)
        copied.record()
        return on_device

    def __call__(self, batch: np.ndarray, step: int, ranks: Ranks = SINGLE_PROCESS) -> StepBatch:
        """The step's global ``batch`` of pair indices -> this rank's share of it."""
        mine = ranks.my_rows(len(batch))
        pairs = torch.from_numpy(batch[mine])
        rows = self.split.caption_image[pairs]
        if self.device.type == "cuda":
            images, tokens = self._gather_pinned(rows, pairs)
        else:
            images, tokens = self.split.images[rows], self.split.tokens[pairs]
        return StepBatch(images, tokens, self.normalize, self.augment, self.seed * 1_000_003 + step, mine.start,
                         len(batch))
