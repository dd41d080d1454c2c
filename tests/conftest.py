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


def tiny_config(tmp_path: Path, **changes):
    """A training config that runs in a second or two: tiny synthetic data, two epochs."""
    from clipse.config import TrainConfig

    settings = dict(shapes_train_images=48, shapes_val_images=12, shapes_test_images=12, epochs=2,
                    batch_size=16, progress=False, data_root=str(tmp_path.parent / f"shapes-{tmp_path.name}"),
                    run_dir=str(tmp_path / "run"), registry=str(tmp_path / "registry.csv"), threads=1)
    settings.update(changes)
    return TrainConfig(**settings)


@pytest.fixture
def tiny(tmp_path):
    return lambda **changes: tiny_config(tmp_path, **changes)
