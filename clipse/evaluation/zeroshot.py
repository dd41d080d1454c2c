"""Zero-shot classification, by the CLIP_benchmark protocol (docs/reference/metrics.md#zero-shot):
a class's embedding is the L2-normalised mean of the L2-normalised text embeddings of its prompts
(one per template); an image's prediction is the class of highest cosine similarity; top-1 and
top-5 accuracy are fractions of the images. Ties count as the retrieval metrics' do: a class
tied with the true one shares its place in random order, so a model whose class scores all tie
scores chance, 1/K, not 100%.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clipse.data.cache import cached_images, cached_tokens
from clipse.data.zeroshot import ZeroShotSet
from clipse.evaluation.encoding import ImageNormalizer, encode_pairs
from clipse.evaluation.metrics import TiedRanks
from clipse.models import LoadedModel

ZEROSHOT_KEYS = ("zs_top1", "zs_top5")


@dataclass
class ZeroShotTensors:
    images: torch.Tensor        # (N, 3, R, R) uint8
    labels: torch.Tensor        # (N,) class index
    prompt_tokens: torch.Tensor  # (classes * templates, L), class by class
    n_classes: int
    n_templates: int


def zeroshot_tensors(dataset: ZeroShotSet, loaded: LoadedModel) -> ZeroShotTensors:
    """The set decoded and its prompts tokenised, once (the caches of ``clipse.data``)."""
    return ZeroShotTensors(
        images=cached_images(dataset.image_paths, loaded.image_size, "zeroshot"),
        labels=torch.as_tensor(dataset.labels),
        prompt_tokens=cached_tokens(dataset.prompts(), loaded.tokenizer, loaded.tokenizer_id),
        n_classes=len(dataset.classes), n_templates=len(dataset.templates))


def class_embeddings(prompt_emb: torch.Tensor, n_classes: int, n_templates: int) -> torch.Tensor:
    """(K * T, d) normalised prompt embeddings, class by class -> (K, d): each class's mean, normalised."""
    means = prompt_emb.reshape(n_classes, n_templates, -1).mean(dim=1)
    return torch.nn.functional.normalize(means, dim=1)


def zeroshot_metrics(image_emb: torch.Tensor, class_emb: torch.Tensor, labels) -> dict[str, float]:
    """Top-1 and top-5 accuracy of normalised image embeddings against class embeddings (top-K
    with K the class count when there are fewer than 5 classes)."""
    scores = torch.nan_to_num(image_emb.float() @ class_emb.float().T, nan=float("-inf"))
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    own = scores.gather(1, labels[:, None])
    ranks = TiedRanks((scores > own).sum(dim=1).numpy(), (scores == own).sum(dim=1).numpy(),
                      np.ones(len(labels), dtype=np.int64))
    return {"zs_top1": float(ranks.hit_rate(1).mean()), "zs_top5": float(ranks.hit_rate(min(5, scores.shape[1])).mean())}


def evaluate_zeroshot(model: torch.nn.Module, tensors: ZeroShotTensors, normalize: ImageNormalizer,
                      autocast) -> dict[str, float]:
    images, prompts = encode_pairs(model, tensors.images, tensors.prompt_tokens, normalize, autocast)
    classes = class_embeddings(prompts, tensors.n_classes, tensors.n_templates)
    return zeroshot_metrics(images, classes, tensors.labels)
