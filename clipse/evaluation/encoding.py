"""Encoding a split once and scoring retrieval on it (docs/reference/metrics.md)."""

from __future__ import annotations

import torch

from clipse.data import SplitTensors
from clipse.evaluation.metrics import (
    RetrievalRanks,
    metrics_from_ranks,
    retrieval_ranks,
)

ENCODE_BATCH = 512


class ImageNormalizer:
    """uint8 (B, 3, R, R) -> normalised float on the device; runs on tensors, not PIL images."""

    def __init__(self, mean, std, device: torch.device):
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.device, non_blocking=True).float() - self.mean) / self.std


@torch.no_grad()
def encode_split(model: torch.nn.Module, tensors: SplitTensors, normalize: ImageNormalizer,
                 autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image once and every caption once; L2-normalised float32 embeddings on the CPU."""
    was_training = model.training
    model.eval()
    images, texts = [], []
    with autocast():
        for start in range(0, len(tensors.images), ENCODE_BATCH):
            batch = normalize(tensors.images[start:start + ENCODE_BATCH])
            images.append(model.encode_image(batch, normalize=True).float().cpu())
        for start in range(0, len(tensors.tokens), ENCODE_BATCH):
            batch = tensors.tokens[start:start + ENCODE_BATCH].to(normalize.device)
            texts.append(model.encode_text(batch, normalize=True).float().cpu())
    model.train(was_training)
    return torch.cat(images), torch.cat(texts)


def evaluate_split(model, tensors: SplitTensors, normalize: ImageNormalizer,
                   autocast) -> tuple[dict[str, float], RetrievalRanks]:
    image_emb, text_emb = encode_split(model, tensors, normalize, autocast)
    relevant = tensors.truth.every_pair if tensors.truth is not None else None
    ranks = retrieval_ranks(image_emb, text_emb, tensors.caption_image, relevant,
                            image_content=tensors.image_content, caption_content=tensors.caption_content)
    return metrics_from_ranks(ranks), ranks
