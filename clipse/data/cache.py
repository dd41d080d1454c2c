"""Decode-once caches: images as resized uint8 tensors, captions as token tensors (docs/data.md).
The first decode of a split uses every CPU the process may use (``clipse.image_decode``); every
later load memory-maps the entry read-only, so the processes of a node share one copy.

Cache files live under ``$CLIPSE_CACHE/tensors``, named by a hash of what they were made from
(image paths with size and modification time, the split and the resolution; or the captions
and the tokenizer), so a changed file or setting makes a new entry instead of a stale hit.
Writes go through a temporary file and an atomic rename, so concurrent workers are safe (on
network filesystems too: no lock is needed); a write that fails (a full disk, a read-only
cache) is one warning, and the run goes on without that entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from clipse.errors import UserError
from clipse.image_decode import decode_images
from clipse.paths import cache_dir

CACHE_FORMAT = 1
log = logging.getLogger(__name__)


def _digest(parts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _cache_file(kind: str, key: str) -> Path:
    return cache_dir() / "tensors" / f"{kind}-{key}.npy"


def _load_or_build(path: Path, build: Callable[[], np.ndarray]) -> np.ndarray:
    """The cache entry, memory-mapped read-only: every process on a machine that reads it shares
    one copy through the page cache. Built (and written) when missing or damaged."""
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            pass  # a damaged entry is rebuilt below
    array = build()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk or a read-only cache: go on without the cache entry
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        log.warning("cannot write the cache entry %s (%s); going on without it", path, exc.strerror or exc)
        return array
    return np.load(path, mmap_mode="r")  # the built copy is freed: this process shares the page cache too


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over a read-only memory map (nothing in clipse writes into its data)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def cached_images(paths: Sequence[Path], resolution: int, split: str) -> torch.Tensor:
    """All images of a split as one (N, 3, R, R) uint8 tensor, decoded once and cached."""
    parts = [f"images{CACHE_FORMAT}", split, str(resolution)]
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            raise UserError(f"{path}: image file not found") from None
        parts.append(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}")

    def build() -> np.ndarray:
        with tqdm(total=len(paths), desc=f"decoding {split} images", unit="img",
                  disable=None if len(paths) > 2000 else True, leave=False) as bar:
            return decode_images(paths, resolution, advance=bar.update)

    return _read_only_tensor(_load_or_build(_cache_file("images", _digest(parts)), build))


def cached_tokens(captions: Sequence[str], tokenize: Callable[[list[str]], torch.Tensor],
                  tokenizer_id: str) -> torch.Tensor:
    """Token ids of every caption, (C, context_length), tokenised once and cached."""
    key = _digest([f"tokens{CACHE_FORMAT}", tokenizer_id, *captions])

    def build() -> np.ndarray:
        return tokenize(list(captions)).numpy().astype(np.int32)

    return _read_only_tensor(_load_or_build(_cache_file("tokens", key), build)).long()
