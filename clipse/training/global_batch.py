"""The forward and backward pass of one training step, over the global batch.

The loss (with its SANW weights and statistics) always sees the whole batch: every rank's
embeddings, gathered (``clipse.training.distributed``). With ``--micro-batch M`` a rank's share is
encoded M pairs at a time, so that activations of only M pairs are held at once (the GradCache
scheme): first every chunk without a graph; then the loss on the whole batch, whose backward
pass gives the gradient of every embedding; then each chunk again, with its graph, back-propagated
from those embedding gradients. The parameters' gradient is the full-batch gradient (tested to
1e-5), for one more forward pass of the towers.
"""

from __future__ import annotations

from typing import Callable

import torch

from clipse.losses import ContrastiveLoss, Reference
from clipse.training.batches import StepBatch
from clipse.training.distributed import Ranks


def encode_pair(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor):
    # With --compile, a batch size stays part of the towers' graphs: after an epoch's smaller last
    # batch torch.compile would switch to one graph for every size, which ran each later full batch
    # 1.6 times slower on a 2-core CPU (benchmarks/compile_batch_sizes.py). No effect without --compile.
    torch._dynamo.mark_static(images, 0)
    torch._dynamo.mark_static(tokens, 0)
    return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def contrastive_backward(model: torch.nn.Module, batch: StepBatch, loss: ContrastiveLoss, *, ranks: Ranks,
                         micro_batch: int, autocast: Callable, with_stats: bool,
                         scale_loss: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                         false_negatives: torch.Tensor | None = None,
                         reference: Reference | None = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Gradients of the global-batch loss accumulated into this rank's parameters (to be averaged
    over the ranks); returns the loss, its statistics and the logit multiplier, detached.
    ``scale_loss`` is the gradient scaler's (float16 training); ``false_negatives`` the global
    batch's true false negatives, where known, and ``reference`` what the loss takes its affinity
    from, when not the embeddings themselves (``ContrastiveLoss.compute``)."""
    sizes = ranks.shares(batch.global_size)
    tokens = batch.tokens
    if micro_batch <= 0 or micro_batch >= len(batch):
        with autocast():
            image_emb, text_emb = encode_pair(model, batch.images(), tokens)
            scale = model.logit_scale.exp()
            value, stats = loss.compute(ranks.gather(image_emb.float(), sizes), ranks.gather(text_emb.float(), sizes),
                                        scale.float(), with_stats=with_stats, false_negatives=false_negatives,
                                        reference=reference, logit_bias=getattr(model, "logit_bias", None))
        scale_loss(value).backward()
        return value.detach(), stats, scale.detach()

    chunks = [slice(start, start + micro_batch) for start in range(0, len(batch), micro_batch)]
    with torch.no_grad(), autocast():
        encoded = [encode_pair(model, batch.images(c), tokens[c]) for c in chunks]
    image_all = ranks.gather_detached(torch.cat([i for i, _ in encoded]).float(), sizes).requires_grad_()
    text_all = ranks.gather_detached(torch.cat([t for _, t in encoded]).float(), sizes).requires_grad_()
    with autocast():
        scale = model.logit_scale.exp()
        value, stats = loss.compute(image_all, text_all, scale.float(), with_stats=with_stats,
                                    false_negatives=false_negatives, reference=reference,
                                    logit_bias=getattr(model, "logit_bias", None))
    scale_loss(value).backward()  # the embeddings' gradients, and logit_scale's
    # This rank's rows; times the world size, as the gathered path sends back the sum over ranks.
    mine = ranks.my_rows(batch.global_size)
    image_grad, text_grad = image_all.grad[mine] * ranks.world, text_all.grad[mine] * ranks.world
    for c in chunks:
        with autocast():
            image_emb, text_emb = encode_pair(model, batch.images(c), tokens[c])
        surrogate = (image_emb.float() * image_grad[c]).sum() + (text_emb.float() * text_grad[c]).sum()
        surrogate.backward()
    return value.detach(), stats, scale.detach()
