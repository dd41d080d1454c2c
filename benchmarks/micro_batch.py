"""Micro-batching (``--micro-batch``, GradCache) against plain batches: peak memory and samples/s.

Three training steps side by side, each measured in a fresh process so that one's memory does
not hide another's: batch 128; batch 1,024; batch 1,024 with ``--micro-batch 128``. All three
run clipse's own step (``clipse.training.global_batch.contrastive_backward``, SANW-Debias, fused AdamW) on
``clipse-small`` with random images and tokens. Peak memory is the step's: on CUDA the peak
allocated by torch; on the CPU the process's peak resident memory minus its resident memory
before the first step (model, optimizer state and the batch's uint8 images already held),
measured in a process of its own whose allocator returns every large block to the system at
once (``MALLOC_MMAP_THRESHOLD_``): otherwise glibc keeps freed blocks and the peak resident
memory says more about fragmentation than about what a step holds. Samples/s come from another
process with the default allocator, which is faster.

    python benchmarks/micro_batch.py                 # the three configurations, on this machine
    python benchmarks/micro_batch.py --device cuda   # on a GPU

Targets: micro-batched peak within 1.3x of batch 128's, samples/s at least 0.7x of plain 1,024's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from clipse.config import TrainConfig  # noqa: E402
from clipse.evaluation.encoding import ImageNormalizer  # noqa: E402
from clipse.training.assembly import autocast_for, model_for, resolve_device  # noqa: E402
from clipse.training.batches import StepBatch  # noqa: E402
from clipse.training.distributed import SINGLE_PROCESS  # noqa: E402
from clipse.training.global_batch import contrastive_backward  # noqa: E402

CONFIGURATIONS = [("batch 128", 128, 0), ("batch 1024", 1024, 0), ("batch 1024, micro-batch 128", 1024, 128)]


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def measure(model_name: str, batch: int, micro_batch: int, steps: int, device_name: str) -> dict:
    """One configuration in this process: step peak memory (bytes) and samples/s."""
    torch.manual_seed(0)
    device = resolve_device(device_name)
    config = TrainConfig(model=model_name, loss="sanw_debias", device=device_name)
    loaded = model_for(config)
    model = loaded.model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for p in model.parameters():  # the optimizer's state exists before the baseline is taken
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    normalize = ImageNormalizer(loaded.mean, loaded.std, device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, loaded.image_size, loaded.image_size), dtype=torch.uint8,
                           generator=generator)
    tokens = torch.randint(1, 49_000, (batch, model.context_length), generator=generator)
    autocast = autocast_for(device, config.precision)
    loss = config.loss_function()
    if device.type == "cuda":
        images, tokens = images.to(device), tokens.to(device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resident_bytes()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        contrastive_backward(model, StepBatch(images, tokens, normalize, "none", 0, 0, batch), loss,
                             ranks=SINGLE_PROCESS, micro_batch=micro_batch, autocast=autocast, with_stats=True)
        optimizer.step()

    step()  # warm-up (also the first allocation of everything a step holds)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"peak_bytes": peak, "samples_per_s": batch * steps / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipse-small")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--measure", nargs=2, type=int, metavar=("BATCH", "MICRO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.model, *args.measure, args.steps, args.device)))
        return 0
    rows = []
    for label, batch, micro in CONFIGURATIONS:
        def run(steps: int, env: dict) -> dict:
            out = subprocess.run([sys.executable, __file__, "--measure", str(batch), str(micro), "--model", args.model,
                                  "--steps", str(steps), "--device", args.device],
                                 capture_output=True, text=True, check=True, env={**os.environ, **env})
            return json.loads(out.stdout.strip().splitlines()[-1])

        memory = run(1, {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)})
        rows.append({"configuration": label, "peak_bytes": memory["peak_bytes"],
                     "samples_per_s": run(args.steps, {})["samples_per_s"]})
        print(f"{label}: {rows[-1]['peak_bytes'] / 2**20:.0f} MB, {rows[-1]['samples_per_s']:.0f} samples/s",
              file=sys.stderr)
    small, plain, micro = rows
    print(f"{'configuration':<30} {'peak MB':>8} {'vs 128':>7} {'samples/s':>10} {'vs plain 1024':>14}")
    for row in rows:
        print(f"{row['configuration']:<30} {row['peak_bytes'] / 2**20:>8.0f} "
              f"{row['peak_bytes'] / small['peak_bytes']:>6.2f}x {row['samples_per_s']:>10.0f} "
              f"{row['samples_per_s'] / plain['samples_per_s']:>13.2f}x")
    with contextlib.suppress(Exception):
        threads = torch.get_num_threads()
    print(f"\n{args.model}, SANW-Debias, device {args.device}, torch threads {threads}: micro-batched peak "
          f"{micro['peak_bytes'] / small['peak_bytes']:.2f}x batch 128's (target <= 1.3x), samples/s "
          f"{micro['samples_per_s'] / plain['samples_per_s']:.2f}x plain batch 1024's (target >= 0.7x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
