"""Decoding image files to square uint8 arrays, on one core or on every core the process may use.

The parallel decode runs in threads: Pillow releases the interpreter lock while it decodes and
resizes, and threads (unlike processes) work inside the daemon worker processes that run trials
and need no second import of clipse, torch and OpenCLIP per core.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipse.util.errors import UserError

BLOCK = 64            # images per task of a decoding thread
PARALLEL_FROM = 512   # below this, one thread


def decode_image(path: Path, resolution: int) -> np.ndarray:
    """RGB, shorter side resized to ``resolution`` (bicubic), centre-cropped square: (3, R, R)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (resolution * 2, resolution * 2))  # JPEG: decode at reduced scale
            square = ImageOps.fit(image.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise UserError(f"{path}: cannot decode image ({exc})") from None
    return np.asarray(square, dtype=np.uint8).transpose(2, 0, 1)


def _decode_block(paths: Sequence[Path], resolution: int) -> np.ndarray:
    return np.stack([decode_image(path, resolution) for path in paths])


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: what SLURM or taskset granted)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def decode_images(paths: Sequence[Path], resolution: int, workers: int | None = None,
                  advance: Callable[[int], None] = lambda n: None) -> np.ndarray:
    """Every image as one (N, 3, R, R) uint8 array, decoded by ``workers`` threads (default: one
    per usable CPU; none for a few hundred images). ``advance(n)`` is told of each n decoded."""
    out = np.empty((len(paths), 3, resolution, resolution), dtype=np.uint8)
    workers = workers or (usable_cpus() if len(paths) >= PARALLEL_FROM else 1)
    if workers <= 1:
        for row, path in enumerate(paths):
            out[row] = decode_image(path, resolution)
            advance(1)
        return out
    starts = range(0, len(paths), BLOCK)
    with ThreadPoolExecutor(min(workers, len(starts)), thread_name_prefix="clipse-decode") as pool:
        blocks = pool.map(_decode_block, [paths[s:s + BLOCK] for s in starts], [resolution] * len(starts))
        for start, block in zip(starts, blocks):
            out[start:start + len(block)] = block
            advance(len(block))
    return out
