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
def encode_pairs(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, normalize: ImageNormalizer,
                 autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image once and every token row once; L2-normalised float32 embeddings on the CPU."""
    was_training = model.training
    model.eval()
    image_emb, text_emb = [], []
    with autocast():
        for start in range(0, len(images), ENCODE_BATCH):
            batch = normalize(images[start:start + ENCODE_BATCH])
            image_emb.append(model.encode_image(batch, normalize=True).float().cpu())
        for start in range(0, len(tokens), ENCODE_BATCH):
            batch = tokens[start:start + ENCODE_BATCH].to(normalize.device)
            text_emb.append(model.encode_text(batch, normalize=True).float().cpu())
    model.train(was_training)
    return torch.cat(image_emb), torch.cat(text_emb)


def encode_split(model: torch.nn.Module, tensors: SplitTensors, normalize: ImageNormalizer,
                 autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the split once and every caption once."""
    return encode_pairs(model, tensors.images, tensors.tokens, normalize, autocast)


def evaluate_split(model, tensors: SplitTensors, normalize: ImageNormalizer,
                   autocast) -> tuple[dict[str, float], RetrievalRanks]:
    image_emb, text_emb = encode_split(model, tensors, normalize, autocast)
    relevant = tensors.truth.every_pair if tensors.truth is not None else None
    ranks = retrieval_ranks(image_emb, text_emb, tensors.caption_image, relevant,
                            image_content=tensors.image_content, caption_content=tensors.caption_content)
    return metrics_from_ranks(ranks), ranks
