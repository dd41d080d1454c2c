"""Node-shared data, measured: the first decode in one thread and in one per usable core, and the
memory four worker processes use for one dataset when each loads its own copy (how clipse read
its cache before) and when they share the read-only memory map (how it reads it now).

Memory is the proportional set size (PSS, from /proc/self/smaps_rollup): a page shared by k
processes counts 1/k in each, so the sum over the workers is what the machine really spends.
Each worker reports what loading the images and reading every one of them added to its PSS.

    python benchmarks/node_data.py                 # 3,000 JPEGs decoded to 224 px (450 MB)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from clipse.data.image_decode import decode_images, usable_cpus  # noqa: E402

RESOLUTION = 224


def write_images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = np.full((256, 320, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        for _ in range(4):
            x, y = rng.integers(0, 280), rng.integers(0, 220)
            pixels[y:y + 36, x:x + 40] = rng.integers(0, 256, 3)
        pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"{i:05d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def pss_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Pss in /proc/self/smaps_rollup")


def worker(mode: str, paths: list[Path], barrier, results) -> None:
    import torch

    from clipse.data.cache import cached_images

    before = pss_mb()
    if mode == "own copy":  # what each process did before: the whole entry read into its memory
        images = torch.from_numpy(np.load(next((Path(os.environ["CLIPSE_CACHE"]) / "tensors").glob("images-*.npy"))))
    else:
        images = cached_images(paths, RESOLUTION, "train")
    total = 0
    for start in range(0, len(images), 256):  # read every image, as an epoch does
        total += int(images[start:start + 256].sum(dtype=torch.int64))
    barrier.wait()  # every worker holds its data now
    results.put(pss_mb() - before)
    barrier.wait()


def measure(mode: str, paths: list[Path], workers: int) -> list[float]:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(workers), context.Queue()
    processes = [context.Process(target=worker, args=(mode, paths, barrier, results)) for _ in range(workers)]
    for process in processes:
        process.start()
    values = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipse-node-") as tmp:
        os.environ["CLIPSE_CACHE"] = str(Path(tmp) / "cache")
        paths = write_images(Path(tmp), args.images)
        rates = {}
        for cpus in (1, usable_cpus()):
            started = time.perf_counter()
            decode_images(paths, RESOLUTION, workers=cpus)
            rates[cpus] = len(paths) / (time.perf_counter() - started)
        from clipse.data.cache import cached_images

        size_mb = cached_images(paths, RESOLUTION, "train").numel() / 2**20  # writes the cache entry
        memory = {mode: measure(mode, paths, args.workers) for mode in ("own copy", "shared memory map")}
    print(f"decoding {args.images} JPEGs (320x256) to {RESOLUTION} px:")
    for cpus, rate in rates.items():
        print(f"  {cpus} thread(s): {rate:7.1f} images/s")
    print(f"  ratio all/one: {rates[usable_cpus()] / rates[1]:.2f}x on {usable_cpus()} usable CPUs")
    print(f"\nmemory of {args.workers} workers holding the decoded split ({size_mb:.0f} MB), PSS added per worker:")
    for mode, values in memory.items():
        print(f"  {mode:18} " + "  ".join(f"{v:6.0f}" for v in values) + f"  | total {sum(values):6.0f} MB "
              f"= {sum(values) / size_mb:.2f}x the data")
    own, shared = (sum(memory[m]) for m in ("own copy", "shared memory map"))
    print(f"  shared / own copies: {shared / own:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
