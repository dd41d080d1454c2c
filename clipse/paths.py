"""Where clipse keeps generated data and caches.

``CLIPSE_CACHE`` (default ``~/.cache/clipse``) holds the generated synthetic dataset and the
decoded-image and token caches; on a cluster point it at a filesystem every node sees.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    return Path(os.environ.get("CLIPSE_CACHE", Path.home() / ".cache" / "clipse")).expanduser()
