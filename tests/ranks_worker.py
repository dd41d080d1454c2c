"""A toy two-tower model and the per-rank step the data-parallel tests run in spawned processes
(a module, so that the processes can import it)."""

import contextlib

import torch
import torch.distributed as dist

from clipse.config import TrainConfig
from clipse.training.batches import StepBatch
from clipse.training.distributed import SINGLE_PROCESS, Ranks
from clipse.training.global_batch import contrastive_backward

DIM, TOKENS, EMBED = 12, 6, 8


class ToyClip(torch.nn.Module):
    """Linear towers with a hidden layer: small, deterministic, and with a real logit_scale."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.GELU(), torch.nn.Linear(16, EMBED))
        self.text = torch.nn.Sequential(torch.nn.Linear(TOKENS, 16), torch.nn.GELU(), torch.nn.Linear(16, EMBED))
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.5))

    def encode_image(self, x, normalize=True):
        return torch.nn.functional.normalize(self.image(x), dim=-1)

    def encode_text(self, x, normalize=True):
        return torch.nn.functional.normalize(self.text(x), dim=-1)


def batch(size: int):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(size, DIM, generator=generator, dtype=torch.float64)
    tokens = torch.randn(size, TOKENS, generator=generator, dtype=torch.float64)
    # near-duplicate pairs, so that SANW's weights are far from 1
    images[1::3] = images[0::3][:len(images[1::3])] + 0.05 * images[1::3]
    return images.float(), tokens.float()


def step(loss_name: str, size: int, micro_batch: int, ranks: Ranks = SINGLE_PROCESS):
    """The loss and the averaged gradients of one step over a global batch of ``size`` pairs."""
    model = ToyClip()
    images, tokens = batch(size)
    mine = ranks.my_rows(size)
    share = StepBatch(images[mine], tokens[mine], lambda x: x, "none", 0, mine.start, size)
    # strong weights over this batch's affinities (about -0.3 to 0.5), so that SANW really reweights
    params = {"alpha": 0.8, "delta": 0.1, "lambda": 10.0, "m1": 0.0, "m2": 0.4, "gamma": 0.05}
    loss = TrainConfig(loss=loss_name, loss_params=params).loss_function()
    value, stats, _ = contrastive_backward(model, share, loss, ranks=ranks, micro_batch=micro_batch,
                                           autocast=contextlib.nullcontext, with_stats=True)
    ranks.average_gradients(model.parameters())
    return float(value), {k: float(v) for k, v in stats.items()}, {n: p.grad.clone() for n, p in
                                                                   model.named_parameters()}


def rank_main(rank: int, world: int, init_file: str, loss_name: str, size: int, micro_batch: int, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = step(loss_name, size, micro_batch, Ranks(rank, world, rank))
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()
