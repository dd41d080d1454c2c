import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Every test session gets its own CLIPSE_CACHE: no test reads another run's caches."""
    os.environ["CLIPSE_CACHE"] = str(tmp_path_factory.mktemp("clipse-cache"))
    yield


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("CLIPSE_CACHE", str(folder))
    return folder
