"""The embedded pretrained model: a tiny CLIP pretrained by clipse itself on a generated corpus,
so that the default workflow is what real use is (fine-tune a pretrained model) without a
download. ``--pretrained shapes-pretrained`` names it like any pretrained tag.

The recipe (``PretrainingRecipe``) trains ``clipse-tiny`` from scratch with InfoNCE on the
``pretraining`` domain of the synthetic data: another data seed, more images, and shifted from
the fine-tuning data (docs/reference/data.md): no purple or orange shapes, no black
backgrounds, and no caption that says where a shape is. It is built once, on first use, into
``$CLIPSE_CACHE/pretrained/<tag>-<key>.pt``; the key hashes the recipe and the versions of
clipse's generator, torch and OpenCLIP, so another recipe or version builds its own file.
Building is deterministic on the CPU (the same file twice). Processes that build at once each
build in a folder of their own and the first to finish publishes; the search, the final report
and ``python -m clipse.pretrain`` build it before starting workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch

from clipse.config import TrainConfig
from clipse.data.synthetic import GENERATOR_VERSION
from clipse.util.checkpoints import read_checkpoint
from clipse.util.errors import UserError
from clipse.util.paths import cache_dir


@dataclass(frozen=True)
class PretrainingRecipe:
    """How the embedded model is made: every setting of its pretraining run."""

    model: str = "clipse-tiny"
    images: int = 4000            # training images of the pretraining corpus (5 captions each)
    val_images: int = 200
    epochs: int = 10
    lr: float = 2e-3
    batch_size: int = 128
    init_temperature: float = 0.03
    data_seed: int = 1            # the fine-tuning data uses seed 0
    seed: int = 0
    domain: str = "pretraining"

    def config(self, run_dir: Path) -> TrainConfig:
        return TrainConfig(
            model=self.model, pretrained=None, loss="infonce", shapes_train_images=self.images,
            shapes_val_images=self.val_images, shapes_test_images=1, shapes_domain=self.domain,
            data_seed=self.data_seed, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
            init_temperature=self.init_temperature, seed=self.seed, run_dir=str(run_dir),
            registry=str(run_dir / "registry.csv"), affinity="online")

    @property
    def key(self) -> str:
        parts = {"recipe": dataclasses.asdict(self), "generator": GENERATOR_VERSION, "torch": torch.__version__,
                 "open_clip": open_clip.__version__}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


EMBEDDED = {"shapes-pretrained": PretrainingRecipe()}


def is_embedded(pretrained: str | None) -> bool:
    return pretrained in EMBEDDED


def weights_file(tag: str, recipe: PretrainingRecipe | None = None) -> Path:
    recipe = recipe or EMBEDDED[tag]
    return cache_dir() / "pretrained" / f"{tag}-{recipe.key}.pt"


def check_model(tag: str, model: str) -> None:
    if model != EMBEDDED[tag].model:
        raise UserError(f"--pretrained {tag} is a {EMBEDDED[tag].model} model; it cannot load into --model {model}")


def built_file(tag: str) -> Path:
    """The embedded model's weights, which ``ensure_built`` made."""
    path = weights_file(tag)
    if not path.is_file():
        raise UserError(f"the embedded pretrained model '{tag}' is not built yet: python -m clipse.pretrain build")
    return path


def ensure_built(tag: str, train: Callable, recipe: PretrainingRecipe | None = None) -> Path:
    """The embedded model's file, built first if missing (``train`` is the trainer: this module
    sits below it). Prints a progress line and the trainer's epoch lines while it builds."""
    recipe = recipe or EMBEDDED[tag]
    path = weights_file(tag, recipe)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the embedded pretrained model '{tag}' once ({recipe.model}, {recipe.images} images, "
          f"{recipe.epochs} epochs; a few minutes on a CPU) into {path}", file=sys.stderr, flush=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent))
    try:
        result = train(recipe.config(staging / "run"))
        state = read_checkpoint(staging / "run" / "best.pt", "cpu")
        payload = {"state_dict": state["state_dict"], "tag": tag, "recipe": dataclasses.asdict(recipe),
                   "key": recipe.key, "pretraining_val_metrics": result.best_metrics}
        torch.save(payload, staging / "weights.pt")
        try:
            os.link(staging / "weights.pt", path)
        except FileExistsError:  # another process published it first: theirs is the same file
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"the embedded pretrained model '{tag}' is built: {path}", file=sys.stderr, flush=True)
    return path


def describe(tag: str) -> dict:
    """What the built file says of itself: recipe, key and its pretraining validation metrics."""
    state = read_checkpoint(built_file(tag), "cpu")
    return {"tag": tag, "file": str(built_file(tag)), "recipe": state["recipe"], "key": state["key"],
            "pretraining_val_metrics": state["pretraining_val_metrics"]}
