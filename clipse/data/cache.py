"""Decode-once caches: images as resized uint8 tensors, captions as token tensors, and the
generated data's ground truth (docs/reference/data.md).
The first decode of a split uses every CPU the process may use (``clipse.data.image_decode``); every
later load memory-maps the entry, so the processes of a node share one copy.

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
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from clipse.data.image_decode import decode_images
from clipse.data.truth import CaptionTruth
from clipse.util.errors import UserError
from clipse.util.paths import cache_dir

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


def _mapped(path: Path) -> np.ndarray:
    """The entry as a copy-on-write memory map: reading shares the page cache with every other
    process of the machine, and a stray write copies a page instead of crashing the process."""
    return np.load(path, mmap_mode="c")


def _load_or_build(path: Path, build: Callable[[], np.ndarray]) -> np.ndarray:
    """The cache entry, memory-mapped (``_mapped``). Built and written when missing or damaged.
    A new entry is published without replacing one another process wrote meanwhile: a file that
    other processes have mapped must not be swapped under them (on NFS their pages would go)."""
    damaged = False
    if path.is_file():
        try:
            return _mapped(path)
        except (OSError, ValueError, EOFError):
            damaged = True  # rebuilt below
    array = build()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        if damaged:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process published it first: use theirs
                pass
            os.unlink(tmp)
    except OSError as exc:  # a full disk or a read-only cache: go on without the cache entry
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        log.warning("cannot write the cache entry %s (%s); going on without it", path, exc.strerror or exc)
        return array
    return _mapped(path)  # the built copy is freed: this process shares the page cache too


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

    return torch.from_numpy(_load_or_build(_cache_file("images", _digest(parts)), build))


def cached_tokens(captions: Sequence[str], tokenize: Callable[[list[str]], torch.Tensor],
                  tokenizer_id: str) -> torch.Tensor:
    """Token ids of every caption, (C, context_length), tokenised once and cached."""
    key = _digest([f"tokens{CACHE_FORMAT}", tokenizer_id, *captions])

    def build() -> np.ndarray:
        return tokenize(list(captions)).numpy().astype(np.int32)

    return torch.from_numpy(_load_or_build(_cache_file("tokens", key), build)).long()


def cached_truth(parts: Sequence[str], build: Callable[[], CaptionTruth]) -> CaptionTruth:
    """A split's ground truth, built once and cached under a key made of ``parts`` (everything
    the truth is computed from)."""
    key = _digest([f"truth{CACHE_FORMAT}", *parts])
    return CaptionTruth.unpack(_load_or_build(_cache_file("truth", key), lambda: build().pack()))
